//! The e-class analysis: what is known about the value of each e-class (dtype, shape, and
//! the constant contents when all its inputs are constant), computed with the ops' own
//! inference and reference evaluation. Constant classes get a constant leaf (constant
//! folding).

use super::dist::{self, Dist};
use super::language::{AttrKey, ConstKey, Kiln, Lowered};
use egg::{Analysis, DidMerge, EGraph, Id, Symbol};
use kiln_ir::{Fact, Op, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// An op of the op table with the number of outputs its node declares.
#[derive(Clone, Debug)]
pub struct OpEntry {
    /// The typed op with its attributes.
    pub op: Op,
    /// Number of outputs of the node (more than one: the e-class is a tuple).
    pub outputs: usize,
}

/// A constant of the constant table, with its name in the source graph when it has one.
#[derive(Clone, Debug)]
pub struct ConstEntry {
    /// The tensor.
    pub tensor: Arc<Tensor>,
    /// Its name in the source graph (`None` for constants made by rewrites).
    pub name: Option<String>,
}

/// The analysis: the op and constant tables the leaves refer to, and the graph inputs.
#[derive(Clone, Debug)]
pub struct KilnAnalysis {
    /// Ops referred to by `@K` leaves.
    pub ops: Vec<OpEntry>,
    op_index: HashMap<String, AttrKey>,
    /// Tensors referred to by `#K` leaves.
    pub consts: Vec<ConstEntry>,
    /// Facts of the graph inputs, by name.
    pub inputs: HashMap<Symbol, Fact>,
    /// Constant values up to this many elements are computed and folded into leaves.
    pub fold_limit: usize,
    /// Keys of small unnamed constants by contents, so equal ones share a leaf (and the
    /// e-nodes that use them hash-cons).
    small_consts: HashMap<String, ConstKey>,
}

impl Default for KilnAnalysis {
    fn default() -> Self {
        KilnAnalysis {
            ops: Vec::new(),
            op_index: HashMap::new(),
            consts: Vec::new(),
            inputs: HashMap::new(),
            fold_limit: 1 << 21,
            small_consts: HashMap::new(),
        }
    }
}

impl KilnAnalysis {
    /// An empty analysis folding constants up to `fold_limit` elements.
    pub fn with_fold_limit(fold_limit: usize) -> Self {
        KilnAnalysis {
            fold_limit,
            ..Default::default()
        }
    }

    /// Interns an op (equal ops share a key, so equal nodes hash-cons).
    pub fn intern_op(&mut self, op: &Op, outputs: usize) -> AttrKey {
        let text = format!("{outputs}:{op:?}");
        if let Some(k) = self.op_index.get(&text) {
            return *k;
        }
        let k = AttrKey(self.ops.len() as u32);
        self.ops.push(OpEntry {
            op: op.clone(),
            outputs,
        });
        self.op_index.insert(text, k);
        k
    }

    /// Adds a constant to the table and returns its key. An unnamed constant of at most 64
    /// elements equal to one added before gets the same key.
    pub fn add_const(&mut self, tensor: Arc<Tensor>, name: Option<String>) -> ConstKey {
        let text = (name.is_none() && tensor.len() <= 64).then(|| {
            let vals: Vec<i64> = if tensor.dtype().is_float() {
                // bit patterns: -0.0 and 0.0, NaNs stay apart
                tensor
                    .to_f64_vec()
                    .iter()
                    .map(|v| v.to_bits() as i64)
                    .collect()
            } else {
                tensor.to_i64_vec()
            };
            format!("{:?}{:?}{vals:?}", tensor.dtype(), tensor.shape())
        });
        if let Some(k) = text.as_ref().and_then(|t| self.small_consts.get(t)) {
            return *k;
        }
        self.consts.push(ConstEntry { tensor, name });
        let k = ConstKey(self.consts.len() as u32 - 1);
        if let Some(t) = text {
            self.small_consts.insert(t, k);
        }
        k
    }

    /// The op table entry of a key (`None` for a key not in the table).
    pub fn op(&self, k: AttrKey) -> Option<&OpEntry> {
        self.ops.get(k.0 as usize)
    }
}

/// What an e-class is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A tensor value (`facts[0]`).
    Value,
    /// The outputs of a multi-output op (`facts`), used through `out`.
    Tuple,
    /// An attribute leaf (int, int list, op key).
    Attr,
    /// An absent optional input.
    None,
    /// An ill-typed node (inference failed); never extracted.
    Invalid,
}

/// The analysis data of an e-class.
#[derive(Clone, Debug)]
pub struct Data {
    /// What the class is.
    pub kind: Kind,
    /// Output facts (one for a value, several for a tuple).
    pub facts: Vec<Fact>,
    /// The integer of an `Int` leaf.
    pub int: Option<i64>,
    /// The list of an `Ints` leaf.
    pub ints: Option<Vec<i64>>,
    /// The key of an `Attr` leaf.
    pub attr: Option<AttrKey>,
    /// Why inference failed (for `Kind::Invalid`).
    pub error: Option<String>,
    /// The layout over a tensor-parallel group (facts are per rank when not replicated).
    pub dist: Dist,
}

impl Data {
    fn of(kind: Kind, facts: Vec<Fact>) -> Data {
        Data {
            kind,
            facts,
            int: None,
            ints: None,
            attr: None,
            error: None,
            dist: Dist::Rep,
        }
    }

    fn invalid(msg: String) -> Data {
        Data {
            error: Some(msg),
            ..Data::of(Kind::Invalid, vec![])
        }
    }

    /// The fact of a value class.
    pub fn fact(&self) -> Option<&Fact> {
        match self.kind {
            Kind::Value => self.facts.first(),
            _ => None,
        }
    }

    /// The constant contents of a value class, if known.
    pub fn value(&self) -> Option<&Tensor> {
        self.fact().and_then(|f| f.value())
    }

    /// The static shape of a value class, if all its dims are known.
    pub fn shape(&self) -> Option<Vec<usize>> {
        self.fact().and_then(|f| f.shape.as_known())
    }
}

/// The output facts of an e-node from the data of its children: `(kind, facts)`. With
/// `fold`, outputs of constant inputs are evaluated (up to the fold limit); cost queries,
/// which need only dtypes and shapes, pass `false`.
pub fn node_facts<'a>(
    an: &KilnAnalysis,
    node: &Kiln,
    data: impl Fn(Id) -> &'a Data,
    fold: bool,
) -> Result<(Kind, Vec<Fact>), String> {
    match node {
        Kiln::NoneArg(_) => return Ok((Kind::None, vec![])),
        Kiln::Int(_) | Kiln::Ints(_) | Kiln::Attr(_) => return Ok((Kind::Attr, vec![])),
        Kiln::Const(k) => {
            let c = an
                .consts
                .get(k.0 as usize)
                .ok_or_else(|| format!("constant {k} is not in the table"))?;
            let t = c.tensor.clone();
            let mut f = Fact::new(t.dtype(), kiln_ir::Shape::known(t.shape()));
            f.value = Some(t);
            return Ok((Kind::Value, vec![f]));
        }
        Kiln::Input(s) => {
            let f = an
                .inputs
                .get(s)
                .ok_or_else(|| format!("'{s}' is not a graph input"))?;
            return Ok((Kind::Value, vec![f.clone()]));
        }
        _ => {}
    }
    if let Some(f) = dist::parallel_facts(node, &data) {
        return Ok((Kind::Value, vec![f?]));
    }
    let lowered = node
        .lower(|i| data(i).int, |i| data(i).ints.clone(), |i| data(i).attr)
        .ok_or("malformed node (attribute leaf missing)")?;
    let (op, ins, outputs) = match lowered {
        Lowered::Leaf => return Err("unexpected leaf".into()),
        Lowered::Out(k, t) => {
            let k = data(k).int.ok_or("out: index is not an int")?;
            let d = data(t);
            if d.kind != Kind::Tuple {
                return Err("out: not a tuple".into());
            }
            let f = usize::try_from(k)
                .ok()
                .and_then(|k| d.facts.get(k))
                .ok_or_else(|| format!("out: no output {k}"))?;
            return Ok((Kind::Value, vec![f.clone()]));
        }
        Lowered::Op(op, ins) => (op, ins, 1),
        Lowered::Table(k, ins) => {
            let e = an
                .op(k)
                .ok_or_else(|| format!("op {k} is not in the table"))?;
            (e.op.clone(), ins.to_vec(), e.outputs)
        }
    };
    let mut facts: Vec<Option<&Fact>> = Vec::with_capacity(ins.len());
    for &i in &ins {
        let d = data(i);
        match d.kind {
            Kind::None => facts.push(None),
            Kind::Value => facts.push(d.facts.first()),
            k => return Err(format!("input is {k:?}, not a value")),
        }
    }
    let mut outs = op.infer(&facts)?;
    if outs.len() < outputs {
        return Err(format!("{} outputs, expected {outputs}", outs.len()));
    }
    let all_const = facts.iter().flatten().all(|f| f.value.is_some());
    let small = |n: Option<usize>| n.is_some_and(|n| n <= an.fold_limit);
    if fold
        && all_const
        && outs.iter().any(|f| f.value.is_none())
        && outs.iter().all(|f| small(f.shape.numel()))
    {
        let ts: Vec<Option<&Tensor>> = facts.iter().map(|f| f.and_then(|f| f.value())).collect();
        if let Ok(vals) = op.eval(&ts) {
            for (f, v) in outs.iter_mut().zip(vals) {
                if f.value.is_none() {
                    f.value = Some(Arc::new(v));
                }
            }
        }
    }
    let kind = if outputs > 1 {
        Kind::Tuple
    } else {
        Kind::Value
    };
    if kind == Kind::Value {
        outs.truncate(1);
    }
    Ok((kind, outs))
}

impl Analysis<Kiln> for KilnAnalysis {
    type Data = Data;

    fn make(egraph: &mut EGraph<Kiln, Self>, enode: &Kiln, _id: Id) -> Data {
        let mut d = match node_facts(&egraph.analysis, enode, |i| &egraph[i].data, true) {
            Ok((kind, facts)) => Data::of(kind, facts),
            Err(e) => Data::invalid(e),
        };
        if d.kind == Kind::Value {
            match dist::of(&egraph.analysis, enode, &d.facts, |i| &egraph[i].data) {
                Ok(Dist::Rep) => {}
                Ok(x) => {
                    // a part held by one rank is not a constant of the graph
                    d.dist = x;
                    d.facts[0].value = None;
                }
                Err(e) => d = Data::invalid(e),
            }
        }
        match enode {
            Kiln::Int(v) => d.int = Some(*v),
            Kiln::Ints(v) => d.ints = Some(v.0.clone()),
            Kiln::Attr(k) => d.attr = Some(*k),
            _ => {}
        }
        d
    }

    fn merge(&mut self, to: &mut Data, from: Data) -> DidMerge {
        if to.kind == Kind::Invalid {
            let changed = from.kind != Kind::Invalid;
            if changed {
                *to = from;
            }
            return DidMerge(changed, false);
        }
        if from.kind == Kind::Invalid || to.kind != from.kind {
            return DidMerge(false, true);
        }
        let mut to_changed = false;
        let mut from_changed = false;
        for (t, f) in to.facts.iter_mut().zip(&from.facts) {
            match (&t.value, &f.value) {
                (None, Some(v)) => {
                    t.value = Some(v.clone());
                    to_changed = true;
                }
                (Some(_), None) => from_changed = true,
                _ => {}
            }
        }
        DidMerge(to_changed, from_changed)
    }

    fn modify(egraph: &mut EGraph<Kiln, Self>, id: Id) {
        let Some(t) = egraph[id].data.value() else {
            return;
        };
        if t.len() > egraph.analysis.fold_limit
            || egraph[id].nodes.iter().any(|n| matches!(n, Kiln::Const(_)))
        {
            return;
        }
        let t = egraph[id].data.facts[0].value.clone().expect("constant");
        let k = egraph.analysis.add_const(t, None);
        let c = egraph.add(Kiln::Const(k));
        egraph.union(id, c);
    }
}

/// The e-graph type of this module.
pub type KilnEGraph = EGraph<Kiln, KilnAnalysis>;
