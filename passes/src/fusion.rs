//! Partitioning of a graph into kernels: greedy fusion in topological order of elementwise
//! chains, contraction epilogues and row-wise reductions, without ever creating a cycle
//! between kernels.
//!
//! Fusion rules (node `n` joins the kernel of one of its producers, else starts its own):
//! - elementwise ops join an `Elementwise` kernel of the same output shape, a `Contraction`
//!   kernel as epilogue when their output has the contraction's output shape, or a
//!   `Reduction` kernel when their output has the reduction's input or reduced shape;
//! - reductions (`Reduce*`, `Softmax`, `LogSoftmax`, `LayerNormalization`, global pooling)
//!   join the kernel producing their data input when it is an `Elementwise` kernel over the
//!   reduction's input shape (a prologue) or a `Reduction` kernel with the same input shape and
//!   axes (so a decomposed LayerNorm is one kernel);
//! - an elementwise op may also join an `Elementwise` kernel of the same shape that reads one
//!   of its (non-constant) inputs (sibling fusion);
//! - contractions, data movement and other ops always start a kernel; `Reshape`, `Flatten`,
//!   `Squeeze` and `Unsqueeze` are `Alias` kernels (zero-copy views of a contiguous buffer)
//!   unless their output is a graph output.
//!
//! A merge is legal only if no other kernel feeding `n` is reachable from the kernel it joins
//! (`A → X → B` with `X` outside forbids fusing `A` and `B`).

use kiln_ir::ops::array::ArrayOp;
use kiln_ir::ops::elementwise::ElementwiseOp;
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::{NnOp, PoolKind};
use kiln_ir::ops::reduce::{ReduceAxes, ReduceOp};
use kiln_ir::shape::norm_axis;
use kiln_ir::{Dim, Graph, IrError, Shape, Tensor, ValueId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// What a kernel computes, which decides how the code generator lowers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KernelKind {
    /// A DAG of elementwise ops over one iteration space (inputs may broadcast).
    Elementwise,
    /// One MatMul/Gemm/Conv with a fused elementwise epilogue.
    Contraction,
    /// Row-wise reductions over the same axes with elementwise prologue/epilogue.
    Reduction,
    /// One data movement op (copying).
    DataMovement,
    /// A zero-copy view (Reshape/Flatten/Squeeze/Unsqueeze): the output shares the input's buffer.
    Alias,
    /// Any other op, one node per kernel.
    Opaque,
}

/// One kernel: a set of graph nodes compiled and run together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    /// Kernel name (`k0`, `k1`, ...).
    pub name: String,
    /// What the kernel computes.
    pub kind: KernelKind,
    /// Indices into `graph.nodes`, ascending (hence topological).
    pub nodes: Vec<usize>,
    /// Values read by the kernel and produced elsewhere (graph inputs, constants, other
    /// kernels' outputs), in order of first use.
    pub inputs: Vec<ValueId>,
    /// Values the kernel produces that are used by other kernels, are graph outputs, or have
    /// no user at all.
    pub outputs: Vec<ValueId>,
}

/// A partition of a graph's nodes into kernels, in a valid execution order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// The kernels, in topological order.
    pub kernels: Vec<Kernel>,
}

/// The row space of a reduction: its input shape and the reduced axes.
#[derive(Clone, Debug, PartialEq)]
struct RowSpace {
    /// Shape of the reduced input.
    input: Shape,
    /// Shape with the reduced axes (the statistics' shape).
    reduced: Shape,
    /// Reduced axes, normalized and sorted.
    axes: Vec<usize>,
}

/// How a node takes part in fusion.
#[derive(Clone, Debug, PartialEq)]
enum Class {
    Elementwise,
    Contraction,
    Reduction(RowSpace),
    DataMovement,
    Alias,
    Opaque,
}

/// A kernel being built.
struct Group {
    kind: KernelKind,
    nodes: Vec<usize>,
    /// Iteration space: output shape (elementwise, contraction).
    shape: Shape,
    /// For reductions, their row space.
    rows: Option<RowSpace>,
}

/// True when both shapes are equal and contain no anonymous dim.
fn same_shape(a: &Shape, b: &Shape) -> bool {
    a == b && !a.dims().iter().any(Dim::is_anonymous)
}

/// The reduced shape of `input` over `axes` (kept as size-1 dims when `keep`).
fn reduce_shape(input: &Shape, axes: &[usize], keep: bool) -> Shape {
    Shape(
        input
            .dims()
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match (axes.contains(&i), keep) {
                (false, _) => Some(d.clone()),
                (true, true) => Some(Dim::Known(1)),
                (true, false) => None,
            })
            .collect(),
    )
}

/// Normalized, sorted axes; `None` if any is out of range.
fn norm_axes(axes: &[i64], rank: usize) -> Option<Vec<usize>> {
    let mut v: Vec<usize> = axes
        .iter()
        .map(|&a| norm_axis(a, rank).ok())
        .collect::<Option<_>>()?;
    v.sort_unstable();
    v.dedup();
    Some(v)
}

/// The fusion class of node `ni`.
fn classify(g: &Graph, ni: usize) -> Class {
    let n = &g.nodes[ni];
    let in_fact = |k: usize| {
        n.inputs
            .get(k)
            .copied()
            .flatten()
            .map(|v| &g.values[v].fact)
    };
    let Some(x) = in_fact(0) else {
        return Class::Opaque;
    };
    let rank = x.shape.rank();
    let rows = |axes: Vec<usize>, keep: bool| {
        Class::Reduction(RowSpace {
            input: x.shape.clone(),
            reduced: reduce_shape(&x.shape, &axes, keep),
            axes,
        })
    };
    let single = n.outputs.len() == 1;
    match &n.op {
        kiln_ir::Op::Elementwise(ElementwiseOp::Dropout(_)) if !single => Class::Opaque,
        kiln_ir::Op::Elementwise(_) => Class::Elementwise,
        kiln_ir::Op::Linalg(LinalgOp::MatMul | LinalgOp::Gemm(_)) => Class::Contraction,
        kiln_ir::Op::Nn(NnOp::Conv(_)) => Class::Contraction,
        kiln_ir::Op::Nn(NnOp::Softmax(a) | NnOp::LogSoftmax(a)) => {
            let Ok(axis) = norm_axis(a.axis, rank) else {
                return Class::Opaque;
            };
            let axes = if a.coerce_2d {
                (axis..rank).collect()
            } else {
                vec![axis]
            };
            rows(axes, true)
        }
        kiln_ir::Op::Nn(NnOp::LayerNormalization(a)) if single => {
            let Ok(axis) = norm_axis(a.axis, rank) else {
                return Class::Opaque;
            };
            rows((axis..rank).collect(), true)
        }
        kiln_ir::Op::Nn(NnOp::GlobalPool(PoolKind::Average { .. } | PoolKind::Max)) => {
            rows((2..rank).collect(), true)
        }
        kiln_ir::Op::Reduce(ReduceOp::Reduce {
            axes,
            keepdims,
            noop_with_empty_axes,
            ..
        }) => {
            let list: Option<Vec<i64>> = match axes {
                ReduceAxes::Attr(a) => Some(a.clone().unwrap_or_default()),
                ReduceAxes::Input => match n.inputs.get(1).copied().flatten() {
                    None => Some(vec![]),
                    Some(v) => g.const_value(v).map(Tensor::to_i64_vec),
                },
            };
            match list {
                Some(l) if l.is_empty() && *noop_with_empty_axes => Class::Opaque,
                Some(l) if l.is_empty() => rows((0..rank).collect(), *keepdims),
                Some(l) => match norm_axes(&l, rank) {
                    Some(a) => rows(a, *keepdims),
                    None => Class::Opaque,
                },
                None => Class::Opaque,
            }
        }
        kiln_ir::Op::Array(
            ArrayOp::Reshape { .. }
            | ArrayOp::Flatten { .. }
            | ArrayOp::Squeeze { .. }
            | ArrayOp::Unsqueeze { .. },
        ) if !g.outputs.contains(&n.outputs[0]) => Class::Alias,
        kiln_ir::Op::Array(_) => Class::DataMovement,
        _ => Class::Opaque,
    }
}

/// The kernel kind of a node that starts a kernel on its own.
fn start_kind(c: &Class) -> KernelKind {
    match c {
        Class::Elementwise => KernelKind::Elementwise,
        Class::Contraction => KernelKind::Contraction,
        Class::Reduction(_) => KernelKind::Reduction,
        Class::DataMovement => KernelKind::DataMovement,
        Class::Alias => KernelKind::Alias,
        Class::Opaque => KernelKind::Opaque,
    }
}

/// Whether node `ni` of class `c` may join group `gr` (ignoring cycles); if so, the group's
/// new row space when it changes.
fn may_join(g: &Graph, ni: usize, c: &Class, gr: &Group) -> Option<Option<RowSpace>> {
    let n = &g.nodes[ni];
    let out = &g.values[n.outputs[0]].fact.shape;
    match (c, gr.kind) {
        (Class::Elementwise, KernelKind::Elementwise | KernelKind::Contraction) => {
            same_shape(out, &gr.shape).then_some(None)
        }
        (Class::Elementwise, KernelKind::Reduction) => {
            let r = gr.rows.as_ref()?;
            (same_shape(out, &r.input) || same_shape(out, &r.reduced)).then_some(None)
        }
        (Class::Reduction(rs), KernelKind::Elementwise) => {
            same_shape(&rs.input, &gr.shape).then(|| Some(rs.clone()))
        }
        (Class::Reduction(rs), KernelKind::Reduction) => {
            let r = gr.rows.as_ref()?;
            (same_shape(&rs.input, &r.input) && rs.reduced == r.reduced && rs.axes == r.axes)
                .then_some(None)
        }
        _ => None,
    }
}

/// Whether group `to` is reachable from group `from` along `succ` edges.
fn reachable(succ: &[HashSet<usize>], from: usize, to: usize) -> bool {
    let mut seen = vec![false; succ.len()];
    let mut stack = vec![from];
    while let Some(x) = stack.pop() {
        if x == to {
            return true;
        }
        if std::mem::replace(&mut seen[x], true) {
            continue;
        }
        stack.extend(succ[x].iter().copied());
    }
    false
}

/// Partitions the graph into kernels (see the module doc for the rules).
pub fn partition(g: &Graph) -> Partition {
    let prod = g.producers();
    let mut groups: Vec<Group> = Vec::new();
    let mut succ: Vec<HashSet<usize>> = Vec::new();
    let mut group_of = vec![usize::MAX; g.nodes.len()];
    // for each value, the groups of the nodes read it so far (for sibling fusion)
    let mut reader_groups: Vec<Vec<usize>> = vec![Vec::new(); g.values.len()];
    for ni in 0..g.nodes.len() {
        let n = &g.nodes[ni];
        let c = classify(g, ni);
        // groups producing this node's inputs, most recent first
        let mut in_groups: Vec<usize> = n
            .inputs
            .iter()
            .flatten()
            .filter_map(|&v| prod[v].map(|p| group_of[p]))
            .collect();
        in_groups.sort_unstable();
        in_groups.dedup();
        let candidates: Vec<usize> = match &c {
            Class::Elementwise => {
                // producers first (most recent first), then elementwise siblings reading
                // one of the same non-constant values
                let mut c: Vec<usize> = in_groups.iter().rev().copied().collect();
                for &v in n.inputs.iter().flatten() {
                    if g.const_value(v).is_some() && prod[v].is_none() {
                        continue;
                    }
                    for &s in reader_groups[v].iter().rev() {
                        if groups[s].kind == KernelKind::Elementwise && !c.contains(&s) {
                            c.push(s);
                        }
                    }
                }
                c
            }
            Class::Reduction(_) => n.inputs[0]
                .and_then(|v| prod[v])
                .map(|p| vec![group_of[p]])
                .unwrap_or_default(),
            _ => vec![],
        };
        let mut chosen = None;
        for cand in candidates {
            let Some(rows) = may_join(g, ni, &c, &groups[cand]) else {
                continue;
            };
            if in_groups
                .iter()
                .any(|&h| h != cand && reachable(&succ, cand, h))
            {
                continue;
            }
            chosen = Some((cand, rows));
            break;
        }
        let gi = match chosen {
            Some((gi, rows)) => {
                let gr = &mut groups[gi];
                if let Some(r) = rows {
                    gr.kind = KernelKind::Reduction;
                    gr.rows = Some(r);
                }
                gr.nodes.push(ni);
                gi
            }
            None => {
                let rows = match &c {
                    Class::Reduction(r) => Some(r.clone()),
                    _ => None,
                };
                groups.push(Group {
                    kind: start_kind(&c),
                    nodes: vec![ni],
                    shape: g.values[n.outputs[0]].fact.shape.clone(),
                    rows,
                });
                succ.push(HashSet::new());
                groups.len() - 1
            }
        };
        group_of[ni] = gi;
        for &v in n.inputs.iter().flatten() {
            if !reader_groups[v].contains(&gi) {
                reader_groups[v].push(gi);
            }
        }
        for &h in &in_groups {
            if h != gi {
                succ[h].insert(gi);
            }
        }
    }
    // order the groups topologically (Kahn, smallest id first for stability)
    let mut indeg = vec![0usize; groups.len()];
    for s in &succ {
        for &t in s {
            indeg[t] += 1;
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..groups.len()).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(groups.len());
    while let Some(&x) = ready.iter().next() {
        ready.remove(&x);
        order.push(x);
        for &t in &succ[x] {
            indeg[t] -= 1;
            if indeg[t] == 0 {
                ready.insert(t);
            }
        }
    }
    debug_assert_eq!(order.len(), groups.len(), "fusion created a cycle");
    let assignment: Vec<(KernelKind, Vec<usize>)> = order
        .into_iter()
        .map(|gi| (groups[gi].kind, groups[gi].nodes.clone()))
        .collect();
    Partition::from_assignment(g, assignment)
}

impl Partition {
    /// Builds a partition from kernels given as (kind, nodes), computing names, sorted node
    /// lists and the boundary values. The kernels must already be in a valid order.
    pub fn from_assignment(g: &Graph, kernels: Vec<(KernelKind, Vec<usize>)>) -> Partition {
        let mut kernel_of = vec![usize::MAX; g.nodes.len()];
        for (k, (_, nodes)) in kernels.iter().enumerate() {
            for &n in nodes {
                kernel_of[n] = k;
            }
        }
        let kernels = kernels
            .into_iter()
            .enumerate()
            .map(|(k, (kind, mut nodes))| {
                nodes.sort_unstable();
                let (inputs, outputs) = boundary(g, &kernel_of, k, &nodes);
                Kernel {
                    name: format!("k{k}"),
                    kind,
                    nodes,
                    inputs,
                    outputs,
                }
            })
            .collect();
        Partition { kernels }
    }

    /// For each node, the index of its kernel (`usize::MAX` for a node in no kernel).
    pub fn kernel_of_node(&self, num_nodes: usize) -> Vec<usize> {
        let mut k = vec![usize::MAX; num_nodes];
        for (ki, kernel) in self.kernels.iter().enumerate() {
            for &n in &kernel.nodes {
                if n < num_nodes {
                    k[n] = ki;
                }
            }
        }
        k
    }

    /// Checks that every node is in exactly one kernel, node lists are ascending, kernels are
    /// in a valid topological order, inputs/outputs are exactly the values crossing kernel
    /// boundaries, and the kinds fit their nodes (one contraction per `Contraction` kernel, a
    /// single reshape-like node per `Alias` kernel).
    pub fn verify(&self, g: &Graph) -> Result<(), String> {
        let mut kernel_of = vec![usize::MAX; g.nodes.len()];
        for (ki, k) in self.kernels.iter().enumerate() {
            if k.nodes.is_empty() {
                return Err(format!("kernel {} is empty", k.name));
            }
            if k.nodes.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("kernel {}: nodes are not ascending", k.name));
            }
            for &n in &k.nodes {
                if n >= g.nodes.len() {
                    return Err(format!("kernel {}: node {n} out of range", k.name));
                }
                if kernel_of[n] != usize::MAX {
                    return Err(format!(
                        "node {n} ('{}') is in kernels {} and {}",
                        g.nodes[n].name, self.kernels[kernel_of[n]].name, k.name
                    ));
                }
                kernel_of[n] = ki;
            }
        }
        if let Some(n) = kernel_of.iter().position(|&k| k == usize::MAX) {
            return Err(format!("node {n} ('{}') is in no kernel", g.nodes[n].name));
        }
        let prod = g.producers();
        for (ki, k) in self.kernels.iter().enumerate() {
            for &n in &k.nodes {
                for v in g.nodes[n].inputs.iter().flatten() {
                    if let Some(p) = prod[*v] {
                        if kernel_of[p] > ki {
                            return Err(format!(
                                "kernel {} reads '{}' produced by the later kernel {}",
                                k.name, g.values[*v].name, self.kernels[kernel_of[p]].name
                            ));
                        }
                    }
                }
            }
            let (ins, outs) = boundary(g, &kernel_of, ki, &k.nodes);
            let set = |v: &[ValueId]| v.iter().copied().collect::<HashSet<_>>();
            if set(&ins) != set(&k.inputs) || ins.len() != k.inputs.len() {
                return Err(format!(
                    "kernel {}: inputs {:?} but the boundary is {:?}",
                    k.name, k.inputs, ins
                ));
            }
            if set(&outs) != set(&k.outputs) || outs.len() != k.outputs.len() {
                return Err(format!(
                    "kernel {}: outputs {:?} but the boundary is {:?}",
                    k.name, k.outputs, outs
                ));
            }
            let classes: Vec<Class> = k.nodes.iter().map(|&n| classify(g, n)).collect();
            let contractions = classes.iter().filter(|c| **c == Class::Contraction).count();
            let ok = match k.kind {
                KernelKind::Contraction => {
                    contractions == 1
                        && classes
                            .iter()
                            .all(|c| matches!(c, Class::Contraction | Class::Elementwise))
                }
                KernelKind::Elementwise => classes.iter().all(|c| *c == Class::Elementwise),
                KernelKind::Reduction => classes
                    .iter()
                    .all(|c| matches!(c, Class::Reduction(_) | Class::Elementwise)),
                KernelKind::Alias => classes == [Class::Alias],
                KernelKind::DataMovement | KernelKind::Opaque => k.nodes.len() == 1,
            };
            if !ok {
                return Err(format!(
                    "kernel {}: nodes do not fit kind {:?}",
                    k.name, k.kind
                ));
            }
        }
        Ok(())
    }

    /// A printable form naming values and ops: one line per kernel,
    /// `k3 Contraction [Conv, Add, Relu] (%x, %w, %b) -> (%y)`.
    pub fn display<'a>(&'a self, g: &'a Graph) -> PartitionDisplay<'a> {
        PartitionDisplay { p: self, g }
    }

    /// One line: `<graph>: N nodes -> K kernels (Contraction a, Elementwise b, ...)`.
    pub fn summary(&self, g: &Graph) -> String {
        let mut by_kind: BTreeMap<KernelKind, usize> = BTreeMap::new();
        for k in &self.kernels {
            *by_kind.entry(k.kind).or_default() += 1;
        }
        let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k:?} {n}")).collect();
        format!(
            "{}: {} nodes -> {} kernels ({})",
            g.name,
            g.nodes.len(),
            self.kernels.len(),
            kinds.join(", ")
        )
    }
}

/// The boundary values of kernel `k` made of `nodes` (ascending): inputs in order of first
/// use, outputs in production order.
fn boundary(
    g: &Graph,
    kernel_of: &[usize],
    k: usize,
    nodes: &[usize],
) -> (Vec<ValueId>, Vec<ValueId>) {
    let prod = g.producers();
    let mut inputs = Vec::new();
    let mut seen = HashSet::new();
    for &n in nodes {
        for &v in g.nodes[n].inputs.iter().flatten() {
            let inside = prod[v].is_some_and(|p| kernel_of[p] == k);
            if !inside && seen.insert(v) {
                inputs.push(v);
            }
        }
    }
    // users of each value outside kernel k, and whether it has any user at all
    let mut used_outside = vec![false; g.values.len()];
    let mut used = vec![false; g.values.len()];
    for (ni, n) in g.nodes.iter().enumerate() {
        for &v in n.inputs.iter().flatten() {
            used[v] = true;
            if kernel_of[ni] != k {
                used_outside[v] = true;
            }
        }
    }
    for &o in &g.outputs {
        used[o] = true;
        used_outside[o] = true;
    }
    let outputs = nodes
        .iter()
        .flat_map(|&n| g.nodes[n].outputs.iter().copied())
        .filter(|&v| used_outside[v] || !used[v])
        .collect();
    (inputs, outputs)
}

/// Display adapter of a [`Partition`] with the graph's value names and op types.
pub struct PartitionDisplay<'a> {
    p: &'a Partition,
    g: &'a Graph,
}

impl fmt::Display for PartitionDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |vs: &[ValueId]| {
            vs.iter()
                .map(|&v| format!("%{}", self.g.values[v].name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for k in &self.p.kernels {
            let ops: Vec<&str> = k
                .nodes
                .iter()
                .map(|&n| self.g.nodes[n].op.op_type())
                .collect();
            writeln!(
                f,
                "{} {:?} [{}] ({}) -> ({})",
                k.name,
                k.kind,
                ops.join(", "),
                names(&k.inputs),
                names(&k.outputs)
            )?;
        }
        Ok(())
    }
}

/// Runs the graph kernel by kernel: each kernel is a sub-graph (its nodes, its boundary
/// values as inputs/outputs) run by the reference interpreter. Returns the graph outputs;
/// used to check that a partition preserves the semantics.
pub fn run_kernels(g: &Graph, p: &Partition, inputs: &[Tensor]) -> kiln_ir::Result<Vec<Tensor>> {
    kiln_ir::interp::check_inputs(g, inputs)?;
    let prod = g.producers();
    let mut env: Vec<Option<Tensor>> = vec![None; g.values.len()];
    for (&id, t) in g.inputs.iter().zip(inputs) {
        env[id] = Some(t.clone());
    }
    for k in &p.kernels {
        let mut sub = Graph {
            name: format!("{}.{}", g.name, k.name),
            opset: g.opset,
            values: g.values.clone(),
            nodes: k.nodes.iter().map(|&n| g.nodes[n].clone()).collect(),
            inputs: vec![],
            outputs: k.outputs.clone(),
        };
        let mut args = Vec::new();
        for &v in &k.inputs {
            let is_const = prod[v].is_none() && g.values[v].fact.value.is_some();
            if is_const {
                continue;
            }
            let t = env[v].clone().ok_or_else(|| IrError::Graph {
                graph: g.name.clone(),
                msg: format!(
                    "kernel {}: input '{}' has no value",
                    k.name, g.values[v].name
                ),
            })?;
            // the declared fact may be symbolic; the interpreter checks against it
            sub.values[v].fact.value = None;
            sub.inputs.push(v);
            args.push(t);
        }
        let outs = kiln_ir::interp::run(&sub, &args)?;
        for (&v, t) in k.outputs.iter().zip(outs) {
            env[v] = Some(t);
        }
    }
    g.outputs
        .iter()
        .map(|&o| {
            env[o].clone().ok_or_else(|| IrError::Graph {
                graph: g.name.clone(),
                msg: format!("output '{}' was not computed", g.values[o].name),
            })
        })
        .collect()
}
