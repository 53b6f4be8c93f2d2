//! Sharding propagation through the nodes of one stage.
//!
//! [`propagate`] walks a stage's nodes in order and gives every value it produces a
//! [`Sharding`] over the stage's device group: the contractions named in the split list
//! start a sharding ([`SplitKind::Column`] → split on the feature axis, [`SplitKind::Row`]
//! → [`Sharding::Partial`]), and every other node *follows* the sharding of its inputs when
//! its semantics allow computing each shard from local data alone:
//!
//! | op | follows a split on axis `a` when |
//! |---|---|
//! | elementwise (broadcasting) | every split input is split the same way; replicated inputs that are not broadcast along `a` are sliced locally |
//! | Transpose | always (the axis moves) |
//! | Reshape, Flatten, Squeeze, Unsqueeze | `a` maps to one output axis, whole, split into leading sub-axes, or merged with trailing ones |
//! | Softmax, LogSoftmax, LayerNorm, RmsNorm | `a` is not normalized |
//! | Reduce*, ArgMax/Min | `a` is not reduced |
//! | Concat, Split, Slice | `a` is not the op's axis (nor sliced) |
//! | Gather | the data is split off the gather axis, or the indices are split |
//! | MatMul | a shared batch axis, `M` of `A`, or `N` of `B` |
//! | Gemm | `M` of `A` |
//! | Conv, pooling, BatchNorm | `a` = 0 (batch); also `a` = 1 for depthwise Conv and pooling |
//! | Expand | the output keeps `a`'s length |
//!
//! Any other case makes the node read its inputs *replicated*: a split input is
//! all-gathered, a partial one all-reduced ([`Collective`]), once per value, before the
//! first node that needs it. Values read after the stage (and graph outputs) are made
//! replicated at its end. A `Partial` value never flows into another node: it is
//! all-reduced first (Megatron's row-parallel layer followed by its all-reduce).

use super::plan::{NodeSplit, Sharding, SplitKind};
use kiln_ir::ops::array::ArrayOp;
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::ops::reduce::{ReduceAxes, ReduceOp};
use kiln_ir::{Graph, Op, ValueId};
use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// A communication step that makes a value replicated on every rank of the group.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Collective {
    /// Sum of the ranks' partial values.
    AllReduce {
        /// The partial value.
        value: ValueId,
    },
    /// Concatenation of the ranks' shards along `axis`.
    AllGather {
        /// The split value.
        value: ValueId,
        /// The split axis.
        axis: usize,
        /// Entries per rank along `axis`.
        sizes: Vec<usize>,
    },
}

impl Collective {
    /// The value it makes replicated.
    pub fn value(&self) -> ValueId {
        match self {
            Collective::AllReduce { value } | Collective::AllGather { value, .. } => *value,
        }
    }
}

/// The result of [`propagate`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Propagation {
    /// Sharding of every value as produced inside the stage or received by it (index
    /// `ValueId`; `None`: the stage does not touch it).
    pub sharding: Vec<Option<Sharding>>,
    /// Collectives turning a value replicated, each run before node `.0` (`nodes.end`:
    /// after the stage's last node).
    pub collectives: Vec<(usize, Collective)>,
    /// `(node, input index)` pairs that read the replicated (gathered / all-reduced)
    /// version of their input.
    pub gathered_inputs: Vec<(usize, usize)>,
    /// `(node, input index, sharding)`: a replicated input (possibly the gathered version)
    /// that each rank slices locally, without communication.
    pub sliced_inputs: Vec<(usize, usize, Sharding)>,
}

impl Propagation {
    /// Whether `(node, input)` reads the gathered version of its input.
    pub fn reads_gathered(&self, node: usize, input: usize) -> bool {
        self.gathered_inputs.contains(&(node, input))
    }

    /// The local slice `(node, input)` takes of a replicated input, if any.
    pub fn slice_of(&self, node: usize, input: usize) -> Option<&Sharding> {
        self.sliced_inputs
            .iter()
            .find(|(n, i, _)| *n == node && *i == input)
            .map(|(_, _, s)| s)
    }

    /// Bytes each collective moves in total (global tensor size), for cost models.
    pub fn collective_bytes(&self, g: &Graph) -> Vec<(usize, u64)> {
        self.collectives
            .iter()
            .map(|(at, c)| {
                let f = &g.values[c.value()].fact;
                let n: usize = f.shape.as_known().map_or(0, |d| d.iter().product());
                (*at, (n * f.dtype.size_of().max(1)) as u64)
            })
            .collect()
    }
}

/// The shape rank `i` of the group holds of a value of global shape `global`.
pub fn local_shape(global: &[usize], s: &Sharding, i: usize) -> Vec<usize> {
    let mut out = global.to_vec();
    if let Sharding::Split { axis, sizes } = s {
        if let (Some(d), Some(&n)) = (out.get_mut(*axis), sizes.get(i)) {
            *d = n;
        }
    }
    out
}

/// What one node wants of its inputs and produces.
struct Decision {
    /// Per input: `None` = take as is; `Some(Replicated)` = needs it replicated;
    /// `Some(Split)` = needs this split (sliced locally from a replicated version).
    wants: Vec<Option<Sharding>>,
    /// Per output.
    outputs: Vec<Sharding>,
}

/// Propagates shardings through `g.nodes[nodes]` (see the module doc). Stage inputs not in
/// `inputs` are replicated; values used after the stage (or graph outputs) are made
/// replicated at its end. Errors name the node whose split does not fit its op.
pub fn propagate(
    g: &Graph,
    nodes: Range<usize>,
    inputs: &[(ValueId, Sharding)],
    splits: &[NodeSplit],
) -> Result<Propagation, String> {
    let mut p = Propagation {
        sharding: vec![None; g.values.len()],
        ..Default::default()
    };
    for (v, s) in inputs {
        if *v >= g.values.len() {
            return Err(format!("stage input {v} is not a value of the graph"));
        }
        check_sizes(g, *v, s)?;
        p.sharding[*v] = Some(s.clone());
    }
    let split_of: HashMap<usize, &NodeSplit> = splits.iter().map(|s| (s.node, s)).collect();
    for sp in splits {
        if !nodes.contains(&sp.node) {
            return Err(format!(
                "split node {} is outside the stage {nodes:?}",
                sp.node
            ));
        }
    }
    // Value → collective already scheduled for it.
    let mut gathered: HashSet<ValueId> = HashSet::new();
    for ni in nodes.clone() {
        let node = &g.nodes[ni];
        let ins: Vec<Sharding> = node
            .inputs
            .iter()
            .map(|v| {
                v.and_then(|v| p.sharding[v].clone())
                    .unwrap_or(Sharding::Replicated)
            })
            .collect();
        for v in node.inputs.iter().flatten() {
            if p.sharding[*v].is_none() {
                p.sharding[*v] = Some(Sharding::Replicated);
            }
        }
        let d = match split_of.get(&ni) {
            Some(sp) => split_node(g, ni, sp).map_err(|e| format!("node '{}': {e}", node.name))?,
            None => follow(g, ni, &ins).unwrap_or_else(|| replicate_all(g, ni)),
        };
        for (i, want) in d.wants.iter().enumerate() {
            let Some(v) = node.inputs[i] else { continue };
            let Some(want) = want else { continue };
            let have = &ins[i];
            if have == want {
                continue;
            }
            if *have != Sharding::Replicated {
                if gathered.insert(v) {
                    p.collectives.push((ni, to_replicated(v, have)));
                }
                p.gathered_inputs.push((ni, i));
            }
            if *want != Sharding::Replicated {
                check_sizes(g, v, want).map_err(|e| format!("node '{}': {e}", node.name))?;
                p.sliced_inputs.push((ni, i, want.clone()));
            }
        }
        for (o, s) in node.outputs.iter().zip(d.outputs) {
            check_sizes(g, *o, &s).map_err(|e| format!("node '{}': {e}", node.name))?;
            p.sharding[*o] = Some(s);
        }
    }
    // Values needed after the stage.
    let mut live_after: Vec<ValueId> = g.outputs.clone();
    for n in &g.nodes[nodes.end..] {
        live_after.extend(n.inputs.iter().flatten());
    }
    live_after.sort_unstable();
    live_after.dedup();
    for v in live_after {
        match &p.sharding[v] {
            Some(s) if *s != Sharding::Replicated && gathered.insert(v) => {
                p.collectives.push((nodes.end, to_replicated(v, s)));
            }
            _ => {}
        }
    }
    Ok(p)
}

fn to_replicated(v: ValueId, s: &Sharding) -> Collective {
    match s {
        Sharding::Split { axis, sizes } => Collective::AllGather {
            value: v,
            axis: *axis,
            sizes: sizes.clone(),
        },
        _ => Collective::AllReduce { value: v },
    }
}

fn check_sizes(g: &Graph, v: ValueId, s: &Sharding) -> Result<(), String> {
    if let Sharding::Split { axis, sizes } = s {
        let dims = known(g, v).ok_or_else(|| {
            format!(
                "value '{}' is split but has a symbolic shape",
                g.values[v].name
            )
        })?;
        let d = dims.get(*axis).ok_or_else(|| {
            format!(
                "value '{}' of rank {} split on axis {axis}",
                g.values[v].name,
                dims.len()
            )
        })?;
        if sizes.iter().sum::<usize>() != *d {
            return Err(format!(
                "value '{}': split sizes {sizes:?} do not add up to axis {axis} of length {d}",
                g.values[v].name
            ));
        }
    }
    Ok(())
}

fn known(g: &Graph, v: ValueId) -> Option<Vec<usize>> {
    g.values[v].fact.shape.as_known()
}

fn rank_of(g: &Graph, v: ValueId) -> usize {
    g.values[v].fact.shape.dims().len()
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Every input replicated, every output replicated.
fn replicate_all(g: &Graph, ni: usize) -> Decision {
    let n = &g.nodes[ni];
    Decision {
        wants: vec![Some(Sharding::Replicated); n.inputs.len()],
        outputs: vec![Sharding::Replicated; n.outputs.len()],
    }
}

/// The decision for a split contraction.
fn split_node(g: &Graph, ni: usize, sp: &NodeSplit) -> Result<Decision, String> {
    let n = &g.nodes[ni];
    let input = |i: usize| -> Result<ValueId, String> {
        n.inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("input {i} is missing"))
    };
    let x = input(0)?;
    let w = input(1)?;
    let xs = known(g, x).ok_or("the data input has a symbolic shape")?;
    let ws = known(g, w).ok_or("the weight has a symbolic shape")?;
    if g.const_value(w).is_none() {
        return Err("the weight (input 1) is not a constant".into());
    }
    let sizes = sp.sizes.clone();
    let total: usize = sizes.iter().sum();
    // (axis of the data input split by Row, output feature axis, N, K)
    let (x_k_axis, out_axis, nn, kk) = match &n.op {
        Op::Linalg(LinalgOp::MatMul) => {
            if ws.len() != 2 || xs.is_empty() {
                return Err("MatMul split needs a 2-D constant weight".into());
            }
            let r = rank_of(g, n.outputs[0]);
            (xs.len() - 1, r - 1, ws[1], ws[0])
        }
        Op::Linalg(LinalgOp::Gemm(gm)) => {
            let (kk, nn) = if gm.trans_b {
                (ws[1], ws[0])
            } else {
                (ws[0], ws[1])
            };
            (if gm.trans_a { 0 } else { 1 }, 1, nn, kk)
        }
        Op::Nn(NnOp::Conv(c)) => {
            if c.group != 1 {
                return Err(format!("Conv split needs group = 1, found {}", c.group));
            }
            (1, 1, ws[0], xs.get(1).copied().unwrap_or(0))
        }
        other => {
            return Err(format!(
                "{:?} split of a {} (only MatMul, Gemm, Conv)",
                sp.kind,
                other.op_type()
            ))
        }
    };
    let mut wants = vec![None; n.inputs.len()];
    match sp.kind {
        SplitKind::Column => {
            if total != nn {
                return Err(format!(
                    "Column split sizes {sizes:?} do not add up to {nn} output features"
                ));
            }
            wants[0] = Some(Sharding::Replicated);
            Ok(Decision {
                wants,
                outputs: vec![Sharding::Split {
                    axis: out_axis,
                    sizes,
                }],
            })
        }
        SplitKind::Row => {
            if total != kk {
                return Err(format!(
                    "Row split sizes {sizes:?} do not add up to the contraction length {kk}"
                ));
            }
            wants[0] = Some(Sharding::Split {
                axis: x_k_axis,
                sizes,
            });
            Ok(Decision {
                wants,
                outputs: vec![Sharding::Partial],
            })
        }
    }
}

/// The split (axis, sizes) of a sharding, if split.
fn split_parts(s: &Sharding) -> Option<(usize, &[usize])> {
    match s {
        Sharding::Split { axis, sizes } => Some((*axis, sizes)),
        _ => None,
    }
}

/// The decision for a node that is not split, if it can follow its inputs' sharding.
fn follow(g: &Graph, ni: usize, ins: &[Sharding]) -> Option<Decision> {
    let n = &g.nodes[ni];
    let all_replicated = ins.iter().all(|s| *s == Sharding::Replicated);
    if all_replicated {
        return Some(Decision {
            wants: vec![None; n.inputs.len()],
            outputs: vec![Sharding::Replicated; n.outputs.len()],
        });
    }
    if ins.contains(&Sharding::Partial) {
        return None;
    }
    // The first split input decides; ops then say where that axis goes.
    let (first, _) = ins
        .iter()
        .enumerate()
        .find(|(_, s)| matches!(s, Sharding::Split { .. }))?;
    let (axis, sizes) = split_parts(&ins[first])?;
    let sizes = sizes.to_vec();
    let out_rank = |o: usize| rank_of(g, n.outputs[o]);
    let single = |out_axis: usize, wants: Vec<Option<Sharding>>| -> Option<Decision> {
        Some(Decision {
            wants,
            outputs: vec![
                Sharding::Split {
                    axis: out_axis,
                    sizes: sizes.clone(),
                };
                n.outputs.len()
            ],
        })
    };
    // Keep input `first` as is, the others replicated.
    let only_first = |wants_first: Option<Sharding>| -> Vec<Option<Sharding>> {
        (0..n.inputs.len())
            .map(|i| {
                if i == first {
                    wants_first.clone()
                } else {
                    Some(Sharding::Replicated)
                }
            })
            .collect()
    };
    match &n.op {
        Op::Elementwise(_) => {
            let r = out_rank(0);
            let out_axis = axis + r - rank_of(g, n.inputs[first]?);
            let out_dim = known(g, n.outputs[0])?[out_axis];
            let wants = broadcast_wants(g, ni, ins, out_axis, &sizes, out_dim)?;
            single(out_axis, wants)
        }
        Op::Array(ArrayOp::Transpose { perm }) => {
            let r = out_rank(0);
            let perm: Vec<usize> = match perm {
                Some(p) => p.iter().map(|&a| norm_axis(a, r)).collect::<Option<_>>()?,
                None => (0..r).rev().collect(),
            };
            let out_axis = perm.iter().position(|&a| a == axis)?;
            single(out_axis, only_first(None))
        }
        Op::Array(
            ArrayOp::Reshape { .. }
            | ArrayOp::Flatten { .. }
            | ArrayOp::Squeeze { .. }
            | ArrayOp::Unsqueeze { .. },
        ) if first == 0 => {
            let is = known(g, n.inputs[0]?)?;
            let os = known(g, n.outputs[0])?;
            let (out_axis, out_sizes) = map_reshape(&is, &os, axis, &sizes)?;
            Some(Decision {
                wants: only_first(None),
                outputs: vec![Sharding::Split {
                    axis: out_axis,
                    sizes: out_sizes,
                }],
            })
        }
        Op::Nn(NnOp::Softmax(a) | NnOp::LogSoftmax(a)) if first == 0 => {
            let r = out_rank(0);
            let sa = norm_axis(a.axis, r)?;
            let ok = if a.coerce_2d { axis < sa } else { axis != sa };
            ok.then(|| single(axis, only_first(None)))?
        }
        Op::Nn(NnOp::LayerNormalization(a) | NnOp::RmsNormalization(a)) if first == 0 => {
            let r = rank_of(g, n.inputs[0]?);
            let na = norm_axis(a.axis, r)?;
            (axis < na).then(|| single(axis, only_first(None)))?
        }
        Op::Reduce(ReduceOp::Reduce {
            axes,
            keepdims,
            noop_with_empty_axes,
            ..
        }) if first == 0 => {
            let r = rank_of(g, n.inputs[0]?);
            let list: Vec<i64> = match axes {
                ReduceAxes::Attr(Some(a)) => a.clone(),
                ReduceAxes::Attr(None) => vec![],
                ReduceAxes::Input => match n.inputs.get(1).copied().flatten() {
                    Some(v) => g.const_value(v)?.to_i64_vec(),
                    None => vec![],
                },
            };
            if list.is_empty() && !noop_with_empty_axes {
                return None; // reduces every axis
            }
            let red: Vec<usize> = list
                .iter()
                .map(|&a| norm_axis(a, r))
                .collect::<Option<_>>()?;
            if red.contains(&axis) {
                return None;
            }
            let out_axis = if *keepdims {
                axis
            } else {
                axis - red.iter().filter(|&&a| a < axis).count()
            };
            single(out_axis, only_first(None))
        }
        Op::Reduce(ReduceOp::Arg {
            axis: ra, keepdims, ..
        }) if first == 0 => {
            let r = rank_of(g, n.inputs[0]?);
            let ra = norm_axis(*ra, r)?;
            if ra == axis {
                return None;
            }
            let out_axis = if *keepdims || axis < ra {
                axis
            } else {
                axis - 1
            };
            single(out_axis, only_first(None))
        }
        Op::Array(ArrayOp::Concat { axis: ca }) => {
            let r = out_rank(0);
            if norm_axis(*ca, r)? == axis {
                return None;
            }
            let want = Sharding::Split {
                axis,
                sizes: sizes.clone(),
            };
            let wants = ins
                .iter()
                .map(|s| (*s != want).then(|| want.clone()))
                .collect();
            single(axis, wants)
        }
        Op::Array(ArrayOp::Split { axis: sa, .. }) if first == 0 => {
            let r = out_rank(0);
            (norm_axis(*sa, r)? != axis).then(|| single(axis, only_first(None)))?
        }
        Op::Array(ArrayOp::Slice { .. }) if first == 0 => {
            let is = known(g, n.inputs[0]?)?;
            let os = known(g, n.outputs[0])?;
            if is[axis] != os[axis] || sliced_axes(g, ni, is.len())?.contains(&axis) {
                return None;
            }
            single(axis, only_first(None))
        }
        Op::Array(ArrayOp::Gather { axis: ga }) => {
            let r = rank_of(g, n.inputs[0]?);
            let ga = norm_axis(*ga, r)?;
            let ir = rank_of(g, n.inputs[1]?);
            match first {
                0 if axis != ga && ins.get(1) == Some(&Sharding::Replicated) => {
                    let out_axis = if axis < ga { axis } else { axis + ir - 1 };
                    single(out_axis, vec![None, None])
                }
                1 if ins[0] == Sharding::Replicated => single(ga + axis, vec![None, None]),
                _ => None,
            }
        }
        Op::Array(ArrayOp::Expand) if first == 0 => {
            let is = known(g, n.inputs[0]?)?;
            let os = known(g, n.outputs[0])?;
            let out_axis = axis + os.len() - is.len();
            (os[out_axis] == is[axis]).then(|| single(out_axis, only_first(None)))?
        }
        Op::Linalg(LinalgOp::MatMul) => follow_matmul(g, ni, ins, first, axis, &sizes),
        Op::Linalg(LinalgOp::Gemm(gm)) if first == 0 && !gm.trans_a && axis == 0 => {
            // Rows of A: C must not vary along M (or is sliced).
            let out_dim = known(g, n.outputs[0])?[0];
            let mut wants = vec![None, Some(Sharding::Replicated)];
            if let Some(c) = n.inputs.get(2).copied().flatten() {
                let cs = known(g, c)?;
                let cdim = if cs.len() == 2 { cs[0] } else { 1 };
                wants.push(if cdim == out_dim && out_dim != 1 {
                    Some(Sharding::Split {
                        axis: 0,
                        sizes: sizes.clone(),
                    })
                } else {
                    Some(Sharding::Replicated)
                });
            }
            single(0, wants)
        }
        Op::Nn(NnOp::Conv(c)) if first == 0 => {
            let xs = known(g, n.inputs[0]?)?;
            let depthwise =
                c.group == xs.get(1).copied()? && known(g, n.inputs[1]?)?.first() == xs.get(1);
            match axis {
                0 => single(0, only_first(None)),
                1 if depthwise => {
                    let ch = Some(Sharding::Split {
                        axis: 0,
                        sizes: sizes.clone(),
                    });
                    let wants = (0..n.inputs.len())
                        .map(|i| if i == 0 { None } else { ch.clone() })
                        .collect();
                    single(1, wants)
                }
                _ => None,
            }
        }
        Op::Nn(NnOp::MaxPool(_) | NnOp::Pool(_) | NnOp::GlobalPool(_)) if first == 0 => {
            (axis <= 1).then(|| single(axis, only_first(None)))?
        }
        Op::Nn(NnOp::BatchNormalization(_)) if first == 0 && axis == 0 => {
            single(0, only_first(None))
        }
        _ => None,
    }
}

/// Wants of a broadcasting op whose output is split on `out_axis` (length `out_dim`):
/// split inputs must match, replicated inputs that are not broadcast along the axis are
/// sliced. `None` if a split input disagrees.
fn broadcast_wants(
    g: &Graph,
    ni: usize,
    ins: &[Sharding],
    out_axis: usize,
    sizes: &[usize],
    out_dim: usize,
) -> Option<Vec<Option<Sharding>>> {
    let n = &g.nodes[ni];
    let r = rank_of(g, n.outputs[0]);
    let mut wants = vec![];
    for (i, v) in n.inputs.iter().enumerate() {
        let Some(v) = v else {
            wants.push(None);
            continue;
        };
        let vr = rank_of(g, *v);
        let lead = r - vr;
        let dim = if out_axis >= lead {
            known(g, *v)?[out_axis - lead]
        } else {
            1
        };
        let want = if dim == 1 && out_dim != 1 {
            Sharding::Replicated
        } else if dim == out_dim {
            Sharding::Split {
                axis: out_axis - lead,
                sizes: sizes.to_vec(),
            }
        } else {
            return None;
        };
        match (&ins[i], &want) {
            (have, w) if have == w => wants.push(None),
            (Sharding::Split { .. }, _) => return None,
            _ => wants.push(Some(want)),
        }
    }
    Some(wants)
}

/// Where a split of input axis `axis` (sizes `sizes`) lands after a reshape from `is` to
/// `os`: the same axis whole, its leading sub-axis (sizes divided by the inner sub-axes),
/// or the merged axis it leads (sizes multiplied by the merged inner axes).
pub(crate) fn map_reshape(
    is: &[usize],
    os: &[usize],
    axis: usize,
    sizes: &[usize],
) -> Option<(usize, Vec<usize>)> {
    let before: usize = is[..axis].iter().product();
    let d = is[axis];
    let mut prefix = 1usize;
    for b in 0..os.len() {
        if prefix == before && os[b] != 1 {
            if os[b] == d {
                return Some((b, sizes.to_vec()));
            }
            if os[b] < d {
                // axis split into os[b] × inner
                let mut inner = 1;
                for &o in &os[b + 1..] {
                    inner *= o;
                    if os[b] * inner == d {
                        break;
                    }
                }
                if os[b] * inner == d && sizes.iter().all(|s| s % inner == 0) {
                    return Some((b, sizes.iter().map(|s| s / inner).collect()));
                }
                return None;
            }
            // merged with following input axes
            let mut inner = 1;
            for &i in &is[axis + 1..] {
                inner *= i;
                if d * inner == os[b] {
                    return Some((b, sizes.iter().map(|s| s * inner).collect()));
                }
            }
            return None;
        }
        prefix *= os[b];
        if prefix > before {
            return None;
        }
    }
    None
}

/// Axes a Slice node cuts (from its constant `axes` input, default the first ones).
fn sliced_axes(g: &Graph, ni: usize, rank: usize) -> Option<Vec<usize>> {
    let n = &g.nodes[ni];
    let ArrayOp::Slice { starts, axes, .. } = (match &n.op {
        Op::Array(a) => a,
        _ => return None,
    }) else {
        return None;
    };
    use kiln_ir::ops::array::IntsArg;
    let ints = |a: &IntsArg| -> Option<Option<Vec<i64>>> {
        match a {
            IntsArg::Default => Some(None),
            IntsArg::Attr(v) => Some(Some(v.clone())),
            IntsArg::Input(i) => match n.inputs.get(*i).copied().flatten() {
                Some(v) => Some(Some(g.const_value(v)?.to_i64_vec())),
                None => Some(None),
            },
        }
    };
    let count = ints(starts)?.map_or(0, |s| s.len());
    let list = ints(axes)?.unwrap_or_else(|| (0..count as i64).collect());
    list.iter().map(|&a| norm_axis(a, rank)).collect()
}

/// MatMul over two activations (or a weight not chosen for a split).
fn follow_matmul(
    g: &Graph,
    ni: usize,
    ins: &[Sharding],
    first: usize,
    axis: usize,
    sizes: &[usize],
) -> Option<Decision> {
    let n = &g.nodes[ni];
    let (a, b) = (n.inputs[0]?, n.inputs[1]?);
    let (ash, bsh) = (known(g, a)?, known(g, b)?);
    let ys = known(g, n.outputs[0])?;
    let r = ys.len();
    if ash.len() < 2 || bsh.len() < 2 {
        return None;
    }
    let split = |axis: usize| Sharding::Split {
        axis,
        sizes: sizes.to_vec(),
    };
    let out = |axis: usize, wants: Vec<Option<Sharding>>| {
        Some(Decision {
            wants,
            outputs: vec![split(axis)],
        })
    };
    let in_rank = if first == 0 { ash.len() } else { bsh.len() };
    let out_axis = axis + r - in_rank;
    if out_axis < r - 2 {
        // A shared batch axis: the other operand follows if its aligned dim is full,
        // stays whole if broadcast.
        let (other, osh) = if first == 0 { (1, &bsh) } else { (0, &ash) };
        let lead = r - osh.len();
        let odim = if out_axis >= lead {
            osh[out_axis - lead]
        } else {
            1
        };
        let want_other = if odim == ys[out_axis] && odim != 1 {
            split(out_axis - lead)
        } else if odim == 1 {
            Sharding::Replicated
        } else {
            return None;
        };
        let mut wants = vec![None, None];
        if ins[other] != want_other {
            if matches!(ins[other], Sharding::Split { .. }) {
                return None;
            }
            wants[other] = Some(want_other);
        }
        return out(out_axis, wants);
    }
    match (first, axis + 2 == in_rank) {
        // rows of A
        (0, true) if ins[1] == Sharding::Replicated => {
            out(r - 2, vec![None, Some(Sharding::Replicated)])
        }
        // columns of B
        (1, false) if axis + 1 == in_rank && ins[0] == Sharding::Replicated => {
            out(r - 1, vec![Some(Sharding::Replicated), None])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, UnaryKind};
    use kiln_ir::{DType, Fact, Node, Shape, Tensor};

    struct B {
        g: Graph,
    }

    impl B {
        fn new() -> Self {
            B {
                g: Graph {
                    name: "t".into(),
                    opset: 17,
                    ..Default::default()
                },
            }
        }
        fn input(&mut self, name: &str, dims: &[usize]) -> ValueId {
            let v = self
                .g
                .add_value(name, Fact::new(DType::F32, Shape::known(dims)));
            self.g.inputs.push(v);
            v
        }
        fn weight(&mut self, name: &str, dims: &[usize]) -> ValueId {
            let n: usize = dims.iter().product();
            self.g
                .add_const(name, Tensor::from_vec(dims, vec![0.5f32; n]))
        }
        fn ints(&mut self, name: &str, v: &[i64]) -> ValueId {
            self.g
                .add_const(name, Tensor::from_vec(&[v.len()], v.to_vec()))
        }
        fn node(&mut self, op: Op, ins: &[ValueId], out_dims: &[usize]) -> ValueId {
            let n = self.g.nodes.len();
            let o = self.g.add_value(
                format!("v{n}"),
                Fact::new(DType::F32, Shape::known(out_dims)),
            );
            self.g.nodes.push(Node {
                name: format!("n{n}"),
                op,
                inputs: ins.iter().map(|&i| Some(i)).collect(),
                outputs: vec![o],
            });
            o
        }
    }

    fn matmul() -> Op {
        Op::Linalg(LinalgOp::MatMul)
    }
    fn add() -> Op {
        Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add))
    }
    fn split(node: usize, kind: SplitKind, sizes: &[usize]) -> NodeSplit {
        NodeSplit {
            node,
            kind,
            sizes: sizes.to_vec(),
        }
    }

    /// Megatron's MLP: x·W1 + b1 → Gelu-ish → ·W2 (+ b2): column then row, one all-reduce.
    #[test]
    fn megatron_mlp_needs_one_all_reduce() {
        let mut b = B::new();
        let x = b.input("x", &[2, 8, 16]);
        let w1 = b.weight("w1", &[16, 64]);
        let b1 = b.weight("b1", &[64]);
        let w2 = b.weight("w2", &[64, 16]);
        let b2 = b.weight("b2", &[16]);
        let h = b.node(matmul(), &[x, w1], &[2, 8, 64]);
        let hb = b.node(add(), &[h, b1], &[2, 8, 64]);
        let a = b.node(
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Tanh)),
            &[hb],
            &[2, 8, 64],
        );
        let y = b.node(matmul(), &[a, w2], &[2, 8, 16]);
        let yb = b.node(add(), &[y, b2], &[2, 8, 16]);
        b.g.outputs.push(yb);
        let p = propagate(
            &b.g,
            0..5,
            &[],
            &[
                split(0, SplitKind::Column, &[40, 24]),
                split(3, SplitKind::Row, &[40, 24]),
            ],
        )
        .unwrap();
        let s = |axis, sizes: &[usize]| {
            Some(Sharding::Split {
                axis,
                sizes: sizes.to_vec(),
            })
        };
        assert_eq!(p.sharding[h], s(2, &[40, 24]));
        assert_eq!(p.sharding[a], s(2, &[40, 24]));
        assert_eq!(p.sharding[y], Some(Sharding::Partial));
        assert_eq!(p.sharding[yb], Some(Sharding::Replicated));
        assert_eq!(p.collectives, vec![(4, Collective::AllReduce { value: y })]);
        assert_eq!(p.gathered_inputs, vec![(4, 0)]);
        // the bias of the column layer is sliced locally
        assert_eq!(
            p.slice_of(1, 1),
            Some(&Sharding::Split {
                axis: 0,
                sizes: vec![40, 24]
            })
        );
        assert_eq!(
            local_shape(&[2, 8, 64], p.sharding[h].as_ref().unwrap(), 1),
            vec![2, 8, 24]
        );
    }

    /// Attention heads: a column-split projection reshaped to heads and transposed keeps the
    /// head axis split; scores and context stay per head; the output projection is a row
    /// split.
    #[test]
    fn attention_heads_follow_the_column_split() {
        let mut b = B::new();
        let x = b.input("x", &[1, 4, 8]); // [B, S, H], 2 heads of 4
        let wq = b.weight("wq", &[8, 8]);
        let wk = b.weight("wk", &[8, 8]);
        let wv = b.weight("wv", &[8, 8]);
        let wo = b.weight("wo", &[8, 8]);
        let shp = b.ints("shp", &[1, 4, 2, 4]);
        let back = b.ints("back", &[1, 4, 8]);
        let heads = |b: &mut B, w| {
            let p = b.node(matmul(), &[x, w], &[1, 4, 8]);
            let r = b.node(
                Op::Array(ArrayOp::Reshape {
                    shape: kiln_ir::ops::array::IntsArg::Input(1),
                    allowzero: false,
                }),
                &[p, shp],
                &[1, 4, 2, 4],
            );
            b.node(
                Op::Array(ArrayOp::Transpose {
                    perm: Some(vec![0, 2, 1, 3]),
                }),
                &[r],
                &[1, 2, 4, 4],
            )
        };
        let q = heads(&mut b, wq); // nodes 0..3
        let k = heads(&mut b, wk); // 3..6
        let v = heads(&mut b, wv); // 6..9
        let kt = b.node(
            Op::Array(ArrayOp::Transpose {
                perm: Some(vec![0, 1, 3, 2]),
            }),
            &[k],
            &[1, 2, 4, 4],
        ); // 9
        let sc = b.node(matmul(), &[q, kt], &[1, 2, 4, 4]); // 10
        let pr = b.node(
            Op::Nn(NnOp::Softmax(kiln_ir::ops::nn::SoftmaxAttrs {
                axis: -1,
                coerce_2d: false,
            })),
            &[sc],
            &[1, 2, 4, 4],
        ); // 11
        let ctx = b.node(matmul(), &[pr, v], &[1, 2, 4, 4]); // 12
        let ct = b.node(
            Op::Array(ArrayOp::Transpose {
                perm: Some(vec![0, 2, 1, 3]),
            }),
            &[ctx],
            &[1, 4, 2, 4],
        ); // 13
        let m = b.node(
            Op::Array(ArrayOp::Reshape {
                shape: kiln_ir::ops::array::IntsArg::Input(1),
                allowzero: false,
            }),
            &[ct, back],
            &[1, 4, 8],
        ); // 14
        let o = b.node(matmul(), &[m, wo], &[1, 4, 8]); // 15
        b.g.outputs.push(o);
        let cols = [4, 4];
        let p = propagate(
            &b.g,
            0..16,
            &[],
            &[
                split(0, SplitKind::Column, &cols),
                split(3, SplitKind::Column, &cols),
                split(6, SplitKind::Column, &cols),
                split(15, SplitKind::Row, &cols),
            ],
        )
        .unwrap();
        let heads_split = Some(Sharding::Split {
            axis: 1,
            sizes: vec![1, 1],
        });
        assert_eq!(p.sharding[q], heads_split);
        assert_eq!(p.sharding[sc], heads_split);
        assert_eq!(p.sharding[ctx], heads_split);
        assert_eq!(
            p.sharding[m],
            Some(Sharding::Split {
                axis: 2,
                sizes: vec![4, 4]
            })
        );
        // only the final all-reduce
        assert_eq!(
            p.collectives,
            vec![(16, Collective::AllReduce { value: o })]
        );
        assert!(p.sliced_inputs.is_empty(), "{:?}", p.sliced_inputs);
    }

    #[test]
    fn unsupported_follow_gathers_once() {
        let mut b = B::new();
        let x = b.input("x", &[4, 6]);
        let w = b.weight("w", &[6, 6]);
        let h = b.node(matmul(), &[x, w], &[4, 6]);
        // Softmax over the split axis: gather first; two consumers share one gather.
        let sm = Op::Nn(NnOp::Softmax(kiln_ir::ops::nn::SoftmaxAttrs {
            axis: 1,
            coerce_2d: false,
        }));
        let s1 = b.node(sm.clone(), &[h], &[4, 6]);
        let s2 = b.node(sm, &[h], &[4, 6]);
        let y = b.node(add(), &[s1, s2], &[4, 6]);
        b.g.outputs.push(y);
        let p = propagate(&b.g, 0..4, &[], &[split(0, SplitKind::Column, &[3, 3])]).unwrap();
        assert_eq!(
            p.collectives,
            vec![(
                1,
                Collective::AllGather {
                    value: h,
                    axis: 1,
                    sizes: vec![3, 3]
                }
            )]
        );
        assert_eq!(p.gathered_inputs, vec![(1, 0), (2, 0)]);
        assert_eq!(p.sharding[y], Some(Sharding::Replicated));
    }

    #[test]
    fn data_parallel_batch_follows_everything() {
        let mut b = B::new();
        let x = b.input("x", &[6, 3, 8, 8]);
        let w = b.weight("w", &[4, 3, 3, 3]);
        let c = b.node(
            Op::Nn(NnOp::Conv(kiln_ir::ops::nn::ConvAttrs {
                group: 1,
                window: kiln_ir::ops::nn::WindowAttrs {
                    auto_pad: kiln_ir::ops::nn::AutoPad::NotSet,
                    kernel_shape: None,
                    strides: None,
                    dilations: None,
                    pads: None,
                },
            })),
            &[x, w],
            &[6, 4, 6, 6],
        );
        let r = b.node(
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)),
            &[c],
            &[6, 4, 6, 6],
        );
        let f = b.node(Op::Array(ArrayOp::Flatten { axis: 1 }), &[r], &[6, 144]);
        let w2 = b.weight("w2", &[144, 10]);
        let y = b.node(matmul(), &[f, w2], &[6, 10]);
        b.g.outputs.push(y);
        let batch = Sharding::Split {
            axis: 0,
            sizes: vec![4, 2],
        };
        let p = propagate(&b.g, 0..4, &[(x, batch.clone())], &[]).unwrap();
        for v in [c, r, f, y] {
            assert_eq!(p.sharding[v].as_ref(), Some(&batch));
        }
        assert_eq!(
            p.collectives,
            vec![(
                4,
                Collective::AllGather {
                    value: y,
                    axis: 0,
                    sizes: vec![4, 2]
                }
            )]
        );
    }

    #[test]
    fn bad_splits_are_errors() {
        let mut b = B::new();
        let x = b.input("x", &[4, 6]);
        let w = b.weight("w", &[6, 6]);
        let h = b.node(matmul(), &[x, w], &[4, 6]);
        b.g.outputs.push(h);
        let e = propagate(&b.g, 0..1, &[], &[split(0, SplitKind::Column, &[3, 2])]).unwrap_err();
        assert!(e.contains("n0") && e.contains("add up"), "{e}");
        let e = propagate(&b.g, 0..1, &[], &[split(1, SplitKind::Row, &[3, 3])]).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        b.node(add(), &[h, w], &[4, 6]);
        let e = propagate(&b.g, 0..2, &[], &[split(1, SplitKind::Row, &[3, 3])]).unwrap_err();
        assert!(e.contains("n1") && e.contains("only MatMul"), "{e}");
    }

    #[test]
    fn reshape_mapping() {
        // split into heads
        assert_eq!(
            map_reshape(&[2, 8], &[2, 2, 4], 1, &[4, 4]),
            Some((1, vec![1, 1]))
        );
        // merge heads back
        assert_eq!(
            map_reshape(&[2, 2, 4], &[2, 8], 1, &[1, 1]),
            Some((1, vec![4, 4]))
        );
        // unchanged axis with unsqueeze around it
        assert_eq!(
            map_reshape(&[6, 5], &[1, 6, 1, 5], 0, &[3, 3]),
            Some((1, vec![3, 3]))
        );
        // split sizes that do not divide the inner sub-axis
        assert_eq!(map_reshape(&[2, 8], &[2, 2, 4], 1, &[6, 2]), None);
        // the split axis would be cut in the middle
        assert_eq!(map_reshape(&[6, 4], &[4, 6], 0, &[3, 3]), None);
    }
}
