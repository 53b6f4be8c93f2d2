//! Lowering a [`ParallelPlan`] to one program per rank.
//!
//! A [`RankProgram`] is a list of [`Step`]s: [`Step::Compute`] segments (ordinary graphs over
//! the rank's *local* shapes: the nodes between two communication points) and communication
//! steps (send / receive, all-reduce, all-gather within a stage's group). Tensors on a rank
//! are named by *keys*:
//!
//! * `in:NAME` — graph input `NAME` as the caller gave it (rank 0 only);
//! * `NAME` — value `NAME` in the sharding its stage gives it (local shape);
//! * `NAME@full` — the replicated (gathered, all-reduced or received whole) value;
//! * `NAME@nKiI` — a replicated value sliced locally for input `I` of node `K`;
//! * `out:NAME` — graph output `NAME` received by rank 0.
//!
//! Every segment graph names its inputs and outputs by key, so the executor moves tensors
//! between segments and messages by name. The steps of all ranks are emitted in one global
//! order (stage by stage, node by node), so with blocking point-to-point messages and
//! collectives no rank can wait on a step another rank reaches only later: the programs
//! never deadlock.
//!
//! Shardings come from [`super::propagate`]-style propagation: a pipeline stage on one rank
//! with no splits has every value replicated; a data-parallel stage splits its batch-carrying
//! inputs on axis 0; a tensor-parallel stage splits the weights of the listed contractions
//! (Column: weight columns and bias slice; Row: weight rows, bias on the group's first rank
//! only). Reshape / Expand shape constants are rewritten to the local output shape; every
//! segment is re-inferred and verified, and a node whose inferred local shape differs from
//! the propagated one is an error naming it.

use super::plan::{NodeSplit, ParallelPlan, Sharding, SplitKind, StageMode};
use super::propagate::{local_shape, propagate, Collective, Propagation};
use kiln_ir::ops::array::ArrayOp;
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{map_tensor, DType, Fact, Graph, Node, Op, Shape, Tensor, ValueId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// A slice `start..start + len` of one axis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AxisSlice {
    /// The axis.
    pub axis: usize,
    /// First index.
    pub start: usize,
    /// Number of entries.
    pub len: usize,
}

/// One step of a rank's program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Step {
    /// Run a graph: its inputs and outputs are named by the keys they read and write.
    Compute(Graph),
    /// Send the tensor `key` (or a slice of it) to rank `to`.
    Send {
        /// The key sent.
        key: String,
        /// The receiving rank.
        to: usize,
        /// Send only this slice.
        slice: Option<AxisSlice>,
    },
    /// Receive a tensor from rank `from` into `key`.
    Recv {
        /// The key written.
        key: String,
        /// The sending rank.
        from: usize,
        /// Its element type.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// Sum `key` over the ranks of `group` (every rank gets the sum) into `out`.
    AllReduce {
        /// The partial sum held by this rank.
        key: String,
        /// The key written.
        out: String,
        /// The ranks taking part (this rank among them).
        group: Vec<usize>,
    },
    /// Concatenate the shards `key` of `group` along `axis` (rank `group[i]` holding
    /// `sizes[i]` entries) into `out` on every rank of the group.
    AllGather {
        /// This rank's shard.
        key: String,
        /// The key written.
        out: String,
        /// The concatenation axis.
        axis: usize,
        /// Entries per group rank.
        sizes: Vec<usize>,
        /// The ranks taking part.
        group: Vec<usize>,
    },
}

/// The program of one rank.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankProgram {
    /// The rank.
    pub rank: usize,
    /// Keys the graph inputs are stored under before the first step (rank 0: one per graph
    /// input, in order; other ranks: none).
    pub inputs: Vec<String>,
    /// The steps.
    pub steps: Vec<Step>,
    /// Keys holding the graph outputs after the last step, in order (rank 0 only).
    pub outputs: Vec<String>,
}

/// All ranks' programs of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Programs {
    /// Number of ranks.
    pub world: usize,
    /// One program per rank, in rank order.
    pub ranks: Vec<RankProgram>,
    /// Micro-batches: every rank runs its program this many times per call, rank 0 on
    /// consecutive slices of axis 0 of the graph inputs, concatenating the outputs along
    /// axis 0 (stage `s` works on micro-batch `k` while stage `s + 1` works on `k - 1`).
    pub micro_batches: usize,
}

impl Step {
    /// A short description (`compute 12 nodes`, `send x to 1`, ...).
    pub fn describe(&self) -> String {
        match self {
            Step::Compute(g) => format!("compute {} nodes", g.nodes.len()),
            Step::Send { key, to, .. } => format!("send {key} to {to}"),
            Step::Recv { key, from, .. } => format!("recv {key} from {from}"),
            Step::AllReduce { key, group, .. } => format!("all-reduce {key} over {group:?}"),
            Step::AllGather { key, group, .. } => format!("all-gather {key} over {group:?}"),
        }
    }
}

/// Where a tensor of a rank comes from, before cutting into segments.
enum Instr {
    /// A node of the plan's graph with its local inputs/outputs resolved to keys.
    Node {
        node: Node,
        inputs: Vec<Option<Operand>>,
        outputs: Vec<String>,
    },
    /// A local slice of a replicated tensor (becomes a `Slice` node).
    Slice {
        src: String,
        dst: String,
        slice: AxisSlice,
    },
    /// A communication step.
    Comm(Step),
}

/// A node input on a rank: a tensor key or a (possibly sliced) constant.
enum Operand {
    Key(String),
    Const(Tensor),
}

/// Per-rank state while emitting.
#[derive(Default)]
struct Rank {
    instrs: Vec<Instr>,
    /// Key → (dtype, local shape).
    meta: HashMap<String, (DType, Vec<usize>)>,
    /// Value → key of its replicated copy on this rank.
    full: HashMap<ValueId, String>,
}

/// Lowers `plan` over `g` (static shapes, nodes in topological order) to one program per
/// rank. With `plan.micro_batches = m > 1`, `g` is the graph at the *micro-batch* size (axis
/// 0 of every graph input and output is `B / m`; data-parallel slices add up to it) and the
/// programs run `m` times per call (see [`Programs::micro_batches`]). Errors name the
/// stage, node or value that cannot be lowered.
pub fn lower(g: &Graph, plan: &ParallelPlan) -> Result<Programs, String> {
    plan.validate(g.nodes.len())?;
    for &v in g.inputs.iter().chain(&g.outputs) {
        let Some(shape) = g.values[v].fact.shape.as_known() else {
            return Err(format!(
                "value '{}': shape {:?} is not static; specialise the inputs first",
                g.values[v].name, g.values[v].fact.shape
            ));
        };
        if plan.micro_batches > 1 && shape.is_empty() {
            return Err(format!(
                "micro_batches = {}: graph input/output '{}' is a scalar, not batched on axis 0",
                plan.micro_batches, g.values[v].name
            ));
        }
    }
    let producers = g.producers();
    let is_const = |v: ValueId| {
        producers[v].is_none() && g.values[v].fact.value.is_some() && !g.inputs.contains(&v)
    };
    // last node index reading each value (graph outputs: usize::MAX)
    let mut last_use = vec![None::<usize>; g.values.len()];
    for (k, n) in g.nodes.iter().enumerate() {
        for v in n.inputs.iter().flatten() {
            last_use[*v] = Some(k);
        }
    }
    for &o in &g.outputs {
        last_use[o] = Some(usize::MAX);
    }
    let mut ranks: Vec<Rank> = (0..plan.world).map(|_| Rank::default()).collect();
    let mut inputs0 = Vec::new();
    for &v in &g.inputs {
        let key = format!("in:{}", g.values[v].name);
        let val = &g.values[v];
        ranks[0].meta.insert(
            key.clone(),
            (val.fact.dtype, val.fact.shape.as_known().unwrap()),
        );
        ranks[0].full.insert(v, key.clone());
        inputs0.push(key);
    }
    // Ranks holding each value whole (key per rank in `Rank::full`).
    let mut holders: HashMap<ValueId, Vec<usize>> =
        g.inputs.iter().map(|&v| (v, vec![0])).collect();

    for (si, stage) in plan.stages.iter().enumerate() {
        let nodes = stage.nodes.clone();
        let group = &stage.ranks;
        let produced: HashSet<ValueId> = g.nodes[nodes.clone()]
            .iter()
            .flat_map(|n| n.outputs.iter().copied())
            .collect();
        let mut stage_inputs: Vec<ValueId> = Vec::new();
        for n in &g.nodes[nodes.clone()] {
            for &v in n.inputs.iter().flatten() {
                if !produced.contains(&v) && !is_const(v) && !stage_inputs.contains(&v) {
                    stage_inputs.push(v);
                }
            }
        }
        let (in_shardings, splits): (Vec<(ValueId, Sharding)>, &[NodeSplit]) = match &stage.mode {
            StageMode::DataParallel { batch } => {
                let total: usize = batch.iter().sum();
                let ins = stage_inputs
                    .iter()
                    .filter(|&&v| {
                        g.values[v]
                            .fact
                            .shape
                            .as_known()
                            .is_some_and(|s| s.first() == Some(&total))
                    })
                    .map(|&v| {
                        (
                            v,
                            Sharding::Split {
                                axis: 0,
                                sizes: batch.clone(),
                            },
                        )
                    })
                    .collect();
                (ins, &[])
            }
            StageMode::TensorParallel { splits } => (Vec::new(), splits.as_slice()),
        };
        let p: Propagation = if group.len() == 1 && splits.is_empty() {
            replicated(g)
        } else {
            propagate(g, nodes.clone(), &in_shardings, splits)
                .map_err(|e| format!("stage {si}: {e}"))?
        };
        let sharding = |v: ValueId| -> Sharding {
            p.sharding
                .get(v)
                .cloned()
                .flatten()
                .unwrap_or(Sharding::Replicated)
        };
        let gathered: HashSet<(usize, usize)> = p.gathered_inputs.iter().copied().collect();
        let sliced: HashMap<(usize, usize), Sharding> = p
            .sliced_inputs
            .iter()
            .map(|(n, i, s)| ((*n, *i), s.clone()))
            .collect();
        let split_of: HashMap<usize, &NodeSplit> = splits.iter().map(|s| (s.node, s)).collect();

        // 1. stage inputs: received whole or as this rank's slice
        for (i, &r) in group.iter().enumerate() {
            for &v in &stage_inputs {
                let val = &g.values[v];
                let global = val.fact.shape.as_known().ok_or_else(|| {
                    format!("stage {si}: value '{}' has no static shape", val.name)
                })?;
                let sh = sharding(v);
                let local = local_shape(&global, &sh, i);
                let slice = match &sh {
                    Sharding::Split { axis, sizes } => Some(AxisSlice {
                        axis: *axis,
                        start: sizes[..i].iter().sum(),
                        len: sizes[i],
                    }),
                    _ => None,
                };
                let hs = holders.get(&v).ok_or_else(|| {
                    format!(
                        "stage {si}: value '{}' is read before it is produced",
                        val.name
                    )
                })?;
                let key = val.name.clone();
                if hs.contains(&r) {
                    let src = ranks[r].full[&v].clone();
                    match slice {
                        None => {
                            // read the whole copy in place
                            ranks[r].meta.insert(key.clone(), (val.fact.dtype, local));
                            alias(&mut ranks[r], &key, &src);
                        }
                        Some(slice) => {
                            ranks[r].meta.insert(key.clone(), (val.fact.dtype, local));
                            ranks[r].instrs.push(Instr::Slice {
                                src,
                                dst: key,
                                slice,
                            });
                        }
                    }
                } else {
                    let from = hs[i % hs.len()];
                    let src = ranks[from].full[&v].clone();
                    ranks[from].instrs.push(Instr::Comm(Step::Send {
                        key: src,
                        to: r,
                        slice,
                    }));
                    ranks[r]
                        .meta
                        .insert(key.clone(), (val.fact.dtype, local.clone()));
                    if sh == Sharding::Replicated {
                        ranks[r].full.insert(v, key.clone());
                    }
                    ranks[r].instrs.push(Instr::Comm(Step::Recv {
                        key,
                        from,
                        dtype: val.fact.dtype,
                        shape: local,
                    }));
                }
            }
        }

        // 2. the nodes with the collectives between them
        for (i, &r) in group.iter().enumerate() {
            let rk = &mut ranks[r];
            let full_key = |v: ValueId| format!("{}@full", g.values[v].name);
            let emit_collectives = |rk: &mut Rank,
                                    at: usize,
                                    colls: &mut std::iter::Peekable<
                std::slice::Iter<'_, (usize, Collective)>,
            >| {
                while let Some((k, c)) = colls.peek() {
                    if *k != at {
                        break;
                    }
                    colls.next();
                    let (v, step) = match c {
                        Collective::AllReduce { value } => (
                            *value,
                            Step::AllReduce {
                                key: g.values[*value].name.clone(),
                                out: full_key(*value),
                                group: group.clone(),
                            },
                        ),
                        Collective::AllGather { value, axis, sizes } => (
                            *value,
                            Step::AllGather {
                                key: g.values[*value].name.clone(),
                                out: full_key(*value),
                                axis: *axis,
                                sizes: sizes.clone(),
                                group: group.clone(),
                            },
                        ),
                    };
                    let val = &g.values[v];
                    rk.meta.insert(
                        full_key(v),
                        (
                            val.fact.dtype,
                            val.fact.shape.as_known().unwrap_or_default(),
                        ),
                    );
                    rk.full.insert(v, full_key(v));
                    rk.instrs.push(Instr::Comm(step));
                }
            };
            // collectives must come in node order
            let mut sorted = p.collectives.clone();
            sorted.sort_by_key(|(k, _)| *k);
            let mut colls = sorted.iter().peekable();
            for k in nodes.clone() {
                emit_collectives(rk, k, &mut colls);
                let node = &g.nodes[k];
                let mut new_node = node.clone();
                let mut operands = Vec::new();
                for (idx, inp) in node.inputs.iter().enumerate() {
                    let Some(v) = *inp else {
                        operands.push(None);
                        continue;
                    };
                    let val = &g.values[v];
                    let err = |m: String| {
                        format!(
                            "stage {si}: node '{}' ({}): {m}",
                            node.name,
                            node.op.op_type()
                        )
                    };
                    if is_const(v) {
                        let t = g.values[v].fact.value().unwrap();
                        let t = if let Some(sp) = split_of.get(&k) {
                            match split_const(node, idx, t, sp, i).map_err(err)? {
                                Some(t) => t,
                                None => {
                                    operands.push(None);
                                    continue;
                                }
                            }
                        } else if let Some(Sharding::Split { axis, sizes }) = sliced.get(&(k, idx))
                        {
                            slice_tensor(t, *axis, sizes[..i].iter().sum(), sizes[i])
                                .map_err(err)?
                        } else {
                            t.clone()
                        };
                        operands.push(Some(Operand::Const(t)));
                        continue;
                    }
                    let key = if let Some(sh) = sliced.get(&(k, idx)) {
                        let Sharding::Split { axis, sizes } = sh else {
                            return Err(err(format!(
                                "input '{}': sliced input with sharding {sh:?}",
                                val.name
                            )));
                        };
                        let src = rk.full.get(&v).cloned().unwrap_or_else(|| val.name.clone());
                        let dst = format!("{}@n{k}i{idx}", val.name);
                        let global = val.fact.shape.as_known().unwrap_or_default();
                        rk.meta
                            .insert(dst.clone(), (val.fact.dtype, local_shape(&global, sh, i)));
                        rk.instrs.push(Instr::Slice {
                            src,
                            dst: dst.clone(),
                            slice: AxisSlice {
                                axis: *axis,
                                start: sizes[..i].iter().sum(),
                                len: sizes[i],
                            },
                        });
                        dst
                    } else if gathered.contains(&(k, idx)) {
                        rk.full.get(&v).cloned().ok_or_else(|| {
                            err(format!(
                                "input '{}' is read replicated but was never gathered",
                                val.name
                            ))
                        })?
                    } else {
                        val.name.clone()
                    };
                    if !rk.meta.contains_key(&key) {
                        return Err(err(format!(
                            "input '{}' (key {key}) is not available on rank {r}",
                            val.name
                        )));
                    }
                    operands.push(Some(Operand::Key(key)));
                }
                let mut outs = Vec::new();
                for &o in &node.outputs {
                    let val = &g.values[o];
                    let global = val.fact.shape.as_known().ok_or_else(|| {
                        format!(
                            "stage {si}: node '{}': output '{}' has no static shape",
                            node.name, val.name
                        )
                    })?;
                    let sh = sharding(o);
                    rk.meta.insert(
                        val.name.clone(),
                        (val.fact.dtype, local_shape(&global, &sh, i)),
                    );
                    if sh == Sharding::Replicated {
                        rk.full.insert(o, val.name.clone());
                    }
                    outs.push(val.name.clone());
                }
                // Reshape / Expand: the shape operand becomes the local output shape
                let local_out = rk.meta[&outs[0]].1.clone();
                match &node.op {
                    Op::Array(ArrayOp::Reshape { .. }) | Op::Array(ArrayOp::Expand) => {
                        if let Some(Some(Operand::Const(_))) = operands.get(1) {
                            let s: Vec<i64> = local_out.iter().map(|&d| d as i64).collect();
                            operands[1] = Some(Operand::Const(Tensor::vec_i64(&s)));
                        }
                    }
                    // a depthwise / grouped Conv following a channel split: fewer groups
                    Op::Nn(NnOp::Conv(c)) if c.group > 1 => {
                        let global_c = node.inputs[0]
                            .and_then(|x| g.values[x].fact.shape.as_known())
                            .and_then(|s| s.get(1).copied());
                        let local_c = match operands.first() {
                            Some(Some(Operand::Key(k))) => rk.meta[k].1.get(1).copied(),
                            _ => None,
                        };
                        if let (Some(gc), Some(lc)) = (global_c, local_c) {
                            if gc != lc && (c.group * lc) % gc == 0 {
                                let mut c = c.clone();
                                c.group = c.group * lc / gc;
                                new_node.op = Op::Nn(NnOp::Conv(c));
                            }
                        }
                    }
                    _ => {}
                }
                new_node.inputs = vec![None; operands.len()];
                rk.instrs.push(Instr::Node {
                    node: new_node,
                    inputs: operands,
                    outputs: outs,
                });
            }
            emit_collectives(rk, nodes.end, &mut colls);
        }

        // 3. values used after the stage are now held whole by the whole group
        for &v in &produced {
            let used_later = last_use[v].is_some_and(|u| u >= nodes.end);
            if !used_later {
                continue;
            }
            for &r in group {
                if !ranks[r].full.contains_key(&v) {
                    return Err(format!(
                        "stage {si}: value '{}' is used after the stage but not replicated at its end",
                        g.values[v].name
                    ));
                }
            }
            holders.insert(v, group.clone());
        }
    }

    // graph outputs to rank 0
    let mut outputs0 = Vec::new();
    for &o in &g.outputs {
        let val = &g.values[o];
        if let Some(k) = ranks[0].full.get(&o) {
            outputs0.push(k.clone());
            continue;
        }
        let hs = holders.get(&o).ok_or_else(|| {
            format!(
                "graph output '{}' is a constant or never produced",
                val.name
            )
        })?;
        let from = hs[0];
        let src = ranks[from].full[&o].clone();
        let key = format!("out:{}", val.name);
        ranks[from].instrs.push(Instr::Comm(Step::Send {
            key: src,
            to: 0,
            slice: None,
        }));
        let shape = val.fact.shape.as_known().unwrap();
        ranks[0]
            .meta
            .insert(key.clone(), (val.fact.dtype, shape.clone()));
        ranks[0].instrs.push(Instr::Comm(Step::Recv {
            key: key.clone(),
            from,
            dtype: val.fact.dtype,
            shape,
        }));
        ranks[0].full.insert(o, key.clone());
        outputs0.push(key);
    }

    let mut programs = Vec::new();
    for (r, rk) in ranks.into_iter().enumerate() {
        let finals: Vec<String> = if r == 0 { outputs0.clone() } else { Vec::new() };
        let steps = segment(g, rk, &finals).map_err(|e| format!("rank {r}: {e}"))?;
        programs.push(RankProgram {
            rank: r,
            inputs: if r == 0 { inputs0.clone() } else { Vec::new() },
            steps,
            outputs: finals,
        });
    }
    Ok(Programs {
        world: plan.world,
        ranks: programs,
        micro_batches: plan.micro_batches,
    })
}

/// The propagation of a single-rank stage without splits: every value replicated.
fn replicated(g: &Graph) -> Propagation {
    Propagation {
        sharding: vec![None; g.values.len()],
        collectives: Vec::new(),
        gathered_inputs: Vec::new(),
        sliced_inputs: Vec::new(),
    }
}

/// Makes `key` another name of the tensor `src` on a rank (a stage input read whole).
fn alias(rk: &mut Rank, key: &str, src: &str) {
    if key != src {
        rk.instrs.push(Instr::Slice {
            src: src.to_string(),
            dst: key.to_string(),
            slice: AxisSlice {
                axis: usize::MAX,
                start: 0,
                len: 0,
            },
        });
    }
}

/// The constant input `idx` of split node `node` as rank `i` of the group holds it (`None`:
/// the input is dropped, e.g. the bias of a Row split on all but the first rank).
fn split_const(
    node: &Node,
    idx: usize,
    t: &Tensor,
    sp: &NodeSplit,
    i: usize,
) -> Result<Option<Tensor>, String> {
    let start: usize = sp.sizes[..i].iter().sum();
    let len = sp.sizes[i];
    let rank = t.rank();
    let sl = |axis: usize| slice_tensor(t, axis, start, len).map(Some);
    match (&node.op, sp.kind, idx) {
        (Op::Linalg(LinalgOp::MatMul), _, 0) => Err("the split weight must be input 1 (B)".into()),
        (Op::Linalg(LinalgOp::MatMul), SplitKind::Column, 1) if rank >= 2 => sl(rank - 1),
        (Op::Linalg(LinalgOp::MatMul), SplitKind::Row, 1) if rank >= 2 => sl(rank - 2),
        (Op::Linalg(LinalgOp::Gemm(gm)), kind, 1) => {
            let col_axis = if gm.trans_b { 0 } else { 1 };
            sl(if kind == SplitKind::Column {
                col_axis
            } else {
                1 - col_axis
            })
        }
        (Op::Linalg(LinalgOp::Gemm(_)), SplitKind::Column, 2) => {
            if rank == 0 || t.shape()[rank - 1] == 1 {
                Ok(Some(t.clone()))
            } else {
                sl(rank - 1)
            }
        }
        (Op::Nn(NnOp::Conv(_)), SplitKind::Column, 1 | 2) => sl(0),
        (Op::Nn(NnOp::Conv(c)), SplitKind::Row, 1) => {
            if c.group != 1 {
                return Err(format!("a Row split needs group = 1, not {}", c.group));
            }
            sl(1)
        }
        (Op::Linalg(LinalgOp::Gemm(_)) | Op::Nn(NnOp::Conv(_)), SplitKind::Row, 2) => {
            Ok((i == 0).then(|| t.clone()))
        }
        (Op::Linalg(LinalgOp::Gemm(_)), _, 0) => Err("the split weight must be input 1 (B)".into()),
        (Op::Nn(NnOp::Conv(_)), _, 0) => Err("the split weight must be input 1 (W)".into()),
        (Op::Linalg(_) | Op::Nn(NnOp::Conv(_)), k, _) => Err(format!(
            "cannot apply a {k:?} split to constant input {idx} of rank {rank}"
        )),
        (op, _, _) => Err(format!(
            "{} cannot be split (MatMul, Gemm or Conv only)",
            op.op_type()
        )),
    }
}

/// `t[.., start..start + len, ..]` along `axis`.
pub fn slice_tensor(t: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor, String> {
    if axis >= t.rank() || start + len > t.shape()[axis] {
        return Err(format!(
            "slice {start}..{} of axis {axis} is outside shape {:?}",
            start + len,
            t.shape()
        ));
    }
    Ok(map_tensor!(t, a => a
        .slice_axis(ndarray::Axis(axis), ndarray::Slice::from(start..start + len))
        .to_owned()))
}

/// Cuts a rank's instructions into steps: maximal runs of nodes become compute segments.
fn segment(g: &Graph, rk: Rank, finals: &[String]) -> Result<Vec<Step>, String> {
    let Rank { instrs, meta, .. } = rk;
    // keys read by each instruction
    let reads = |ins: &Instr| -> Vec<String> {
        match ins {
            Instr::Node { inputs, .. } => inputs
                .iter()
                .flatten()
                .filter_map(|o| match o {
                    Operand::Key(k) => Some(k.clone()),
                    Operand::Const(_) => None,
                })
                .collect(),
            Instr::Slice { src, .. } => vec![src.clone()],
            Instr::Comm(Step::Send { key, .. })
            | Instr::Comm(Step::AllReduce { key, .. })
            | Instr::Comm(Step::AllGather { key, .. }) => vec![key.clone()],
            Instr::Comm(_) => Vec::new(),
        }
    };
    let mut last_read: HashMap<String, usize> = HashMap::new();
    for (i, ins) in instrs.iter().enumerate() {
        for k in reads(ins) {
            last_read.insert(k, i);
        }
    }
    for k in finals {
        last_read.insert(k.clone(), usize::MAX);
    }
    let mut steps = Vec::new();
    let mut i = 0;
    let mut instrs: Vec<Option<Instr>> = instrs.into_iter().map(Some).collect();
    while i < instrs.len() {
        if let Some(Instr::Comm(_)) = &instrs[i] {
            let Some(Instr::Comm(s)) = instrs[i].take() else {
                unreachable!()
            };
            steps.push(s);
            i += 1;
            continue;
        }
        let start = i;
        while i < instrs.len() && !matches!(instrs[i], Some(Instr::Comm(_))) {
            i += 1;
        }
        let seg: Vec<Instr> = instrs[start..i]
            .iter_mut()
            .map(|x| x.take().unwrap())
            .collect();
        if let Some(graph) =
            build_segment(g, seg, &meta, |k| last_read.get(k).is_some_and(|&l| l >= i))?
        {
            steps.push(Step::Compute(graph));
        }
    }
    Ok(steps)
}

/// A value with the local shape the sharding expects of it.
type Expected = (ValueId, Vec<usize>);

/// Builds one segment graph; `live_after(key)` says whether a key is read after it. `None`
/// when the segment has no outputs.
fn build_segment(
    g: &Graph,
    seg: Vec<Instr>,
    meta: &HashMap<String, (DType, Vec<usize>)>,
    live_after: impl Fn(&str) -> bool,
) -> Result<Option<Graph>, String> {
    let mut sg = Graph {
        name: g.name.clone(),
        opset: g.opset,
        ..Default::default()
    };
    let mut ids: HashMap<String, ValueId> = HashMap::new();
    let mut produced: Vec<String> = Vec::new();
    let fact_of = |k: &str| -> Result<Fact, String> {
        let (d, s) = meta.get(k).ok_or_else(|| format!("no tensor '{k}'"))?;
        Ok(Fact::new(*d, Shape::known(s)))
    };
    let get =
        |sg: &mut Graph, ids: &mut HashMap<String, ValueId>, k: &str| -> Result<ValueId, String> {
            if let Some(&v) = ids.get(k) {
                return Ok(v);
            }
            let v = sg.add_value(k, fact_of(k)?);
            sg.inputs.push(v);
            ids.insert(k.to_string(), v);
            Ok(v)
        };
    let mut nconst = 0;
    // per node: its outputs with the local shapes the sharding expects
    let mut checks: Vec<(usize, Vec<Expected>)> = Vec::new();
    for ins in seg {
        match ins {
            Instr::Node {
                mut node,
                inputs,
                outputs,
            } => {
                for (j, o) in inputs.into_iter().enumerate() {
                    node.inputs[j] = match o {
                        None => None,
                        Some(Operand::Key(k)) => Some(get(&mut sg, &mut ids, &k)?),
                        Some(Operand::Const(t)) => {
                            nconst += 1;
                            Some(sg.add_const(format!("{}_c{nconst}", node.name), t))
                        }
                    };
                }
                let mut outs = Vec::new();
                let mut check = Vec::new();
                for k in outputs {
                    let f = fact_of(&k)?;
                    let v = sg.add_value(
                        k.clone(),
                        Fact::new(f.dtype, Shape::unknown(f.shape.rank())),
                    );
                    check.push((v, f.shape.as_known().unwrap()));
                    ids.insert(k.clone(), v);
                    produced.push(k);
                    outs.push(v);
                }
                node.outputs = outs;
                sg.nodes.push(node);
                checks.push((sg.nodes.len() - 1, check));
            }
            Instr::Slice { src, dst, slice } => {
                let s = get(&mut sg, &mut ids, &src)?;
                let f = fact_of(&dst)?;
                let out = sg.add_value(
                    dst.clone(),
                    Fact::new(f.dtype, Shape::unknown(f.shape.rank())),
                );
                let node = if slice.axis == usize::MAX {
                    Node {
                        name: format!("alias_{dst}"),
                        op: Op::Elementwise(kiln_ir::ops::elementwise::ElementwiseOp::Identity),
                        inputs: vec![Some(s)],
                        outputs: vec![out],
                    }
                } else {
                    let c = |sg: &mut Graph, n: &str, x: usize| {
                        sg.add_const(format!("{dst}_{n}"), Tensor::vec_i64(&[x as i64]))
                    };
                    let st = c(&mut sg, "start", slice.start);
                    let en = c(&mut sg, "end", slice.start + slice.len);
                    let ax = c(&mut sg, "axis", slice.axis);
                    Node {
                        name: format!("slice_{dst}"),
                        op: Op::Array(ArrayOp::Slice {
                            starts: kiln_ir::ops::array::IntsArg::Input(1),
                            ends: kiln_ir::ops::array::IntsArg::Input(2),
                            axes: kiln_ir::ops::array::IntsArg::Input(3),
                            steps: kiln_ir::ops::array::IntsArg::Input(4),
                        }),
                        inputs: vec![Some(s), Some(st), Some(en), Some(ax)],
                        outputs: vec![out],
                    }
                };
                sg.nodes.push(node);
                checks.push((sg.nodes.len() - 1, vec![(out, f.shape.as_known().unwrap())]));
                ids.insert(dst.clone(), out);
                produced.push(dst);
            }
            Instr::Comm(_) => unreachable!("segments hold no communication"),
        }
    }
    for k in &produced {
        if live_after(k) {
            sg.outputs.push(ids[k]);
        }
    }
    if sg.outputs.is_empty() {
        return Ok(None);
    }
    // infer node by node and check the local shapes
    for (ni, check) in checks {
        let outs = sg.infer_node(ni).map_err(|e| e.to_string())?;
        let node_outs = sg.nodes[ni].outputs.clone();
        for (o, f) in node_outs.iter().zip(outs) {
            sg.values[*o].fact = f;
        }
        for (v, want) in check {
            let got = sg.values[v].fact.shape.as_known();
            if got.as_deref() != Some(&want[..]) {
                return Err(format!(
                    "node '{}' ({}): local output '{}' has shape {:?}, the sharding expects {want:?}",
                    sg.nodes[ni].name,
                    sg.nodes[ni].op.op_type(),
                    sg.values[v].name,
                    sg.values[v].fact.shape
                ));
            }
        }
    }
    kiln_ir::verify::verify(&sg).map_err(|e| e.to_string())?;
    Ok(Some(sg))
}
