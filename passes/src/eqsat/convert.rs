//! Graph → e-graph (every value becomes an e-class; inputs and constants become leaves) and
//! a choice of one e-node per e-class → graph (graph inputs and outputs keep their names).

use super::analysis::{KilnAnalysis, KilnEGraph, Kind};
use super::language::{slice_op, AttrKey, Ints, Kiln, Lowered, BINARY, UNARY};
use egg::{Id, Language, Symbol};
use kiln_ir::ops::array::{ArrayOp, IntsArg};
use kiln_ir::ops::elementwise::ElementwiseOp;
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{Fact, Graph, IrError, Node, Op, Result, ValueId};
use std::collections::{HashMap, HashSet};

fn err(g: &Graph, msg: impl Into<String>) -> IrError {
    IrError::Graph {
        graph: g.name.clone(),
        msg: format!("eqsat: {}", msg.into()),
    }
}

/// The e-node of a single-output op, with its own node where the language has one.
fn enode(eg: &mut KilnEGraph, op: &Op, ins: &[Id], none: Id) -> Kiln {
    if let Op::Elementwise(ElementwiseOp::Binary(k)) = op {
        if let (Some((_, f, _)), [a, b]) = (BINARY.iter().find(|(_, _, kk)| kk == k), ins) {
            return f([*a, *b]);
        }
    }
    if let Op::Elementwise(ElementwiseOp::Unary(k)) = op {
        if let (Some((_, f, _)), [a]) = (UNARY.iter().find(|(_, _, kk)| kk == k), ins) {
            return f(*a);
        }
    }
    match (op, ins) {
        (Op::Linalg(LinalgOp::MatMul), [a, b]) => return Kiln::MatMul([*a, *b]),
        (Op::Array(ArrayOp::Transpose { perm }), [x]) => {
            let perm = perm.clone().or_else(|| {
                let r = eg[*x].data.fact()?.shape.rank() as i64;
                Some((0..r).rev().collect())
            });
            if let Some(p) = perm {
                let p = eg.add(Kiln::Ints(Ints(p)));
                return Kiln::Transpose([p, *x]);
            }
        }
        (
            Op::Array(ArrayOp::Reshape {
                shape: IntsArg::Input(1),
                allowzero: false,
            }),
            [x, s],
        ) => return Kiln::Reshape([*x, *s]),
        (Op::Array(ArrayOp::Concat { axis }), _) if !ins.is_empty() => {
            let a = eg.add(Kiln::Int(*axis));
            let mut c = vec![a];
            c.extend_from_slice(ins);
            return Kiln::Concat(c.into());
        }
        (Op::Array(ArrayOp::Slice { .. }), _)
            if *op == slice_op() && (3..=5).contains(&ins.len()) =>
        {
            let mut c = [none; 5];
            c[..ins.len()].copy_from_slice(ins);
            return Kiln::Slice(c);
        }
        (Op::Nn(NnOp::Conv(_)), _) if (2..=3).contains(&ins.len()) => {
            let k = eg.analysis.intern_op(op, 1);
            let a = eg.add(Kiln::Attr(k));
            let b = ins.get(2).copied().unwrap_or(none);
            return Kiln::Conv([a, ins[0], ins[1], b]);
        }
        _ => {}
    }
    let k = eg.analysis.intern_op(op, 1);
    generic(eg, k, ins)
}

fn generic(eg: &mut KilnEGraph, k: AttrKey, ins: &[Id]) -> Kiln {
    let a = eg.add(Kiln::Attr(k));
    let mut c = vec![a];
    c.extend_from_slice(ins);
    Kiln::Op(c.into())
}

/// Builds the e-graph of a graph: returns it with the e-class of each graph output.
pub fn to_egraph(g: &Graph, fold_limit: usize) -> Result<(KilnEGraph, Vec<Id>)> {
    let mut an = KilnAnalysis::with_fold_limit(fold_limit);
    for &i in &g.inputs {
        let v = g
            .values
            .get(i)
            .ok_or_else(|| err(g, "input id out of range"))?;
        an.inputs.insert(Symbol::from(&v.name), v.fact.clone());
    }
    let mut eg = KilnEGraph::new(an);
    let prod = g.producers();
    let mut cls: Vec<Option<Id>> = vec![None; g.values.len()];
    for &i in &g.inputs {
        cls[i] = Some(eg.add(Kiln::Input(Symbol::from(&g.values[i].name))));
    }
    for (i, v) in g.values.iter().enumerate() {
        if prod[i].is_none() && cls[i].is_none() {
            if let Some(t) = &v.fact.value {
                let k = eg.analysis.add_const(t.clone(), Some(v.name.clone()));
                cls[i] = Some(eg.add(Kiln::Const(k)));
            }
        }
    }
    let none = eg.add(Kiln::NoneArg([]));
    for n in &g.nodes {
        let mut ins = Vec::with_capacity(n.inputs.len());
        for i in &n.inputs {
            ins.push(match i {
                None => none,
                Some(v) => cls.get(*v).copied().flatten().ok_or_else(|| {
                    err(
                        g,
                        format!(
                            "node '{}': input {} is used before it is defined",
                            n.name,
                            g.values.get(*v).map_or("?", |v| v.name.as_str())
                        ),
                    )
                })?,
            });
        }
        if n.outputs.len() == 1 {
            let node = enode(&mut eg, &n.op, &ins, none);
            cls[n.outputs[0]] = Some(eg.add(node));
        } else {
            let k = eg.analysis.intern_op(&n.op, n.outputs.len());
            let node = generic(&mut eg, k, &ins);
            let t = eg.add(node);
            for (j, &o) in n.outputs.iter().enumerate() {
                let ji = eg.add(Kiln::Int(j as i64));
                cls[o] = Some(eg.add(Kiln::Out([ji, t])));
            }
        }
    }
    let roots = g
        .outputs
        .iter()
        .map(|&o| {
            cls.get(o).copied().flatten().ok_or_else(|| {
                err(
                    g,
                    format!(
                        "output {} is not defined",
                        g.values.get(o).map_or("?", |v| v.name.as_str())
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    eg.rebuild();
    Ok((eg, roots))
}

/// What an emitted e-class became.
#[derive(Clone, Copy)]
enum Emitted {
    Value(ValueId),
    Tuple(usize),
    NoValue,
}

/// Builds a graph from a choice of one e-node per e-class (only classes reachable from
/// `roots` need a choice). Inputs, outputs, graph name and opset come from `template`;
/// output values keep their names (an `Identity` is added where an output is an input, a
/// constant, or another output). Errors on a cycle or a missing choice.
pub fn to_graph(
    eg: &KilnEGraph,
    roots: &[Id],
    choice: &HashMap<Id, Kiln>,
    template: &Graph,
) -> Result<Graph> {
    to_graph_traced(eg, roots, choice, template).map(|(g, _)| g)
}

/// [`to_graph`], also returning the value each emitted value e-class became.
pub fn to_graph_traced(
    eg: &KilnEGraph,
    roots: &[Id],
    choice: &HashMap<Id, Kiln>,
    template: &Graph,
) -> Result<(Graph, HashMap<Id, ValueId>)> {
    let mut g = Graph {
        name: template.name.clone(),
        opset: template.opset,
        ..Default::default()
    };
    let mut used: HashSet<String> = template.values.iter().map(|v| v.name.clone()).collect();
    let mut by_name: HashMap<&str, ValueId> = HashMap::new();
    for &i in &template.inputs {
        let v = &template.values[i];
        let id = g.add_value(v.name.clone(), v.fact.clone());
        g.inputs.push(id);
        by_name.insert(v.name.as_str(), id);
    }
    let mut fresh = 0usize;
    let mut fresh_name = |prefix: &str| loop {
        fresh += 1;
        let n = format!("{prefix}_{fresh}");
        if used.insert(n.clone()) {
            return n;
        }
    };
    let mut done: HashMap<Id, Emitted> = HashMap::new();
    let mut const_vals: HashMap<u32, ValueId> = HashMap::new();
    let mut on_stack: HashSet<Id> = HashSet::new();
    for &root in roots {
        let mut stack: Vec<(Id, bool)> = vec![(eg.find(root), false)];
        while let Some((c, expanded)) = stack.pop() {
            if done.contains_key(&c) {
                continue;
            }
            let node = choice
                .get(&c)
                .ok_or_else(|| err(template, format!("no e-node chosen for e-class {c}")))?;
            if !expanded {
                if !on_stack.insert(c) {
                    return Err(err(template, "the chosen e-nodes form a cycle"));
                }
                stack.push((c, true));
                for &ch in node.children() {
                    let ch = eg.find(ch);
                    if !done.contains_key(&ch) {
                        if on_stack.contains(&ch) {
                            return Err(err(template, "the chosen e-nodes form a cycle"));
                        }
                        stack.push((ch, false));
                    }
                }
                continue;
            }
            on_stack.remove(&c);
            let d = &eg[c].data;
            let value_of = |ch: Id, done: &HashMap<Id, Emitted>| -> Result<Option<ValueId>> {
                let ch = eg.find(ch);
                match (eg[ch].data.kind, done.get(&ch)) {
                    (Kind::None, _) => Ok(None),
                    (_, Some(Emitted::Value(v))) => Ok(Some(*v)),
                    _ => Err(err(template, format!("e-class {ch} is not a value"))),
                }
            };
            let em = match node {
                Kiln::Input(s) => Emitted::Value(
                    *by_name
                        .get(s.as_str())
                        .ok_or_else(|| err(template, format!("unknown input '{s}'")))?,
                ),
                Kiln::Const(k) => {
                    if let Some(&v) = const_vals.get(&k.0) {
                        Emitted::Value(v)
                    } else {
                        let e = eg
                            .analysis
                            .consts
                            .get(k.0 as usize)
                            .ok_or_else(|| err(template, format!("unknown constant {k}")))?;
                        let name = match &e.name {
                            Some(n) if !by_name.contains_key(n.as_str()) => n.clone(),
                            _ => fresh_name("eqsat_const"),
                        };
                        let v = g.add_value(name, Fact::constant_shared(e.tensor.clone()));
                        const_vals.insert(k.0, v);
                        Emitted::Value(v)
                    }
                }
                Kiln::Int(_) | Kiln::Ints(_) | Kiln::Attr(_) | Kiln::NoneArg(_) => Emitted::NoValue,
                _ => {
                    let lowered = node
                        .lower(
                            |i| eg[i].data.int,
                            |i| eg[i].data.ints.clone(),
                            |i| eg[i].data.attr,
                        )
                        .ok_or_else(|| err(template, "malformed e-node"))?;
                    let (op, ins, nout) = match lowered {
                        Lowered::Out(k, t) => {
                            let k = eg[k].data.int.unwrap_or(-1);
                            match done.get(&eg.find(t)) {
                                Some(Emitted::Tuple(ni)) => {
                                    let outs = &g.nodes[*ni].outputs;
                                    let v = usize::try_from(k)
                                        .ok()
                                        .and_then(|k| outs.get(k))
                                        .ok_or_else(|| err(template, "bad output index"))?;
                                    done.insert(c, Emitted::Value(*v));
                                    continue;
                                }
                                _ => return Err(err(template, "out of a non-tuple")),
                            }
                        }
                        Lowered::Op(op, ins) => (op, ins, 1),
                        Lowered::Table(k, ins) => {
                            let e = eg
                                .analysis
                                .op(k)
                                .ok_or_else(|| err(template, "unknown op key"))?;
                            (e.op.clone(), ins.to_vec(), e.outputs)
                        }
                        Lowered::Leaf => return Err(err(template, "unexpected leaf")),
                    };
                    let inputs = ins
                        .iter()
                        .map(|&i| value_of(i, &done))
                        .collect::<Result<Vec<_>>>()?;
                    let mut outputs = Vec::with_capacity(nout);
                    for j in 0..nout {
                        let mut f = d
                            .facts
                            .get(j)
                            .cloned()
                            .ok_or_else(|| err(template, "e-class without facts"))?;
                        f.value = None;
                        outputs.push(g.add_value(fresh_name("eqsat"), f));
                    }
                    let name = fresh_name(&format!("eqsat_{}", op.op_type()));
                    g.nodes.push(Node {
                        name,
                        op,
                        inputs,
                        outputs: outputs.clone(),
                    });
                    if d.kind == Kind::Tuple {
                        Emitted::Tuple(g.nodes.len() - 1)
                    } else {
                        Emitted::Value(outputs[0])
                    }
                }
            };
            done.insert(c, em);
        }
    }
    // outputs, with their names
    let prod = g.producers();
    let mut named: HashSet<ValueId> = HashSet::new();
    for (&root, &tout) in roots.iter().zip(&template.outputs) {
        let want = &template.values[tout].name;
        let v = match done.get(&eg.find(root)) {
            Some(Emitted::Value(v)) => *v,
            _ => return Err(err(template, format!("output '{want}' is not a value"))),
        };
        if prod[v].is_some() && !named.contains(&v) {
            g.values[v].name = want.clone();
            named.insert(v);
            g.outputs.push(v);
        } else {
            let o = g.add_value(want.clone(), template.values[tout].fact.clone());
            g.values[o].fact.value = None;
            g.nodes.push(Node {
                name: fresh_name("eqsat_Identity"),
                op: Op::Elementwise(ElementwiseOp::Identity),
                inputs: vec![Some(v)],
                outputs: vec![o],
            });
            named.insert(o);
            g.outputs.push(o);
        }
    }
    g.infer()?;
    kiln_ir::verify::verify(&g)?;
    for (&a, &b) in g.outputs.iter().zip(&template.outputs) {
        let (fa, fb) = (&g.values[a].fact, &template.values[b].fact);
        if fa.dtype != fb.dtype || fa.shape != fb.shape {
            return Err(err(
                template,
                format!(
                    "output '{}' changed type: {} {} -> {} {}",
                    g.values[a].name, fb.dtype, fb.shape, fa.dtype, fa.shape
                ),
            ));
        }
    }
    let values = done
        .into_iter()
        .filter_map(|(c, e)| match e {
            Emitted::Value(v) => Some((c, v)),
            _ => None,
        })
        .collect();
    Ok((g, values))
}
