//! How an e-class's value is laid out over the ranks of one tensor-parallel group: the
//! analysis part that makes the parallel ops (`shard`, `gather`, `allreduce`) first-class
//! e-nodes (Unity's Partition / Combine / Reduction).
//!
//! A class is [`Dist::Rep`] (every rank holds the whole value: every class of an ordinary
//! graph), [`Dist::Split`] (rank `i` holds part `i` of `k` equal parts along an axis) or
//! [`Dist::Partial`] (every rank holds a tensor of the full shape; the value is their
//! sum). The facts of a split class are the *local* (per-rank) ones, so an e-node over
//! split classes is exactly the op each rank runs on its part, shape inference and cost
//! model unchanged; [`of`] says which layout its result has, or why it has none (the
//! e-node is then ill-typed and never extracted). Parallel rules (`parallel::joint`) only
//! union classes of the same layout.

use super::analysis::{Data, KilnAnalysis, Kind};
use super::language::{Kiln, Lowered};
use egg::Id;
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, UnaryKind};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{Fact, Op};

/// The layout of a value over a tensor-parallel group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dist {
    /// Every rank holds the whole value.
    #[default]
    Rep,
    /// Rank `i` holds part `i` of `k` equal parts along `axis`.
    Split {
        /// The split axis.
        axis: usize,
        /// Number of parts (ranks).
        k: usize,
    },
    /// Every rank holds a full-shape tensor; the value is the sum over the `k` ranks.
    Partial {
        /// Number of ranks.
        k: usize,
    },
}

fn dims(f: &Fact) -> Option<Vec<usize>> {
    f.shape.as_known()
}

/// The local facts of a parallel e-node (`shard`, `gather`, `allreduce`) from its input's:
/// `None` for any other e-node.
pub fn parallel_facts<'a>(
    node: &Kiln,
    data: impl Fn(Id) -> &'a Data,
) -> Option<Result<Fact, String>> {
    let int = |i: Id| data(i).int.and_then(|v| usize::try_from(v).ok());
    type Scale = fn(usize, usize) -> Option<usize>;
    let (axis, k, x, scale): (Option<usize>, usize, Id, Scale) = match node {
        Kiln::Shard([a, k, x]) => (int(*a), int(*k)?, *x, |d, k| {
            (k > 0 && d % k == 0).then(|| d / k)
        }),
        Kiln::Gather([a, k, x]) => (int(*a), int(*k)?, *x, |d, k| Some(d * k)),
        Kiln::AllReduce([k, x]) => (None, int(*k)?, *x, |d, _| Some(d)),
        _ => return None,
    };
    let r = (|| {
        let f = data(x).fact().ok_or("parallel op over a non-value")?;
        let mut d = dims(f).ok_or("parallel op over an unknown shape")?;
        if let Some(a) = axis {
            let v = d.get_mut(a).ok_or("parallel op axis out of range")?;
            *v = scale(*v, k).ok_or("split axis not divisible by the group size")?;
        }
        Ok(Fact::new(f.dtype, kiln_ir::Shape::known(&d)))
    })();
    Some(r)
}

/// The layout of the value an e-node computes, from its children's layouts and the local
/// facts (`out`: the node's output facts), or why it has none.
pub fn of<'a>(
    an: &KilnAnalysis,
    node: &Kiln,
    out: &[Fact],
    data: impl Fn(Id) -> &'a Data,
) -> Result<Dist, String> {
    let int = |i: Id| data(i).int.and_then(|v| usize::try_from(v).ok());
    match node {
        Kiln::Shard([a, k, x]) => {
            return match data(*x).dist {
                Dist::Rep => Ok(Dist::Split {
                    axis: int(*a).ok_or("shard: bad axis")?,
                    k: int(*k).ok_or("shard: bad k")?,
                }),
                d => Err(format!("shard of a {d:?} value")),
            };
        }
        Kiln::Gather([a, k, x]) => {
            let want = Dist::Split {
                axis: int(*a).ok_or("gather: bad axis")?,
                k: int(*k).ok_or("gather: bad k")?,
            };
            return if data(*x).dist == want {
                Ok(Dist::Rep)
            } else {
                Err(format!("gather {want:?} of a {:?} value", data(*x).dist))
            };
        }
        Kiln::AllReduce([k, x]) => {
            let want = Dist::Partial {
                k: int(*k).ok_or("allreduce: bad k")?,
            };
            return if data(*x).dist == want {
                Ok(Dist::Rep)
            } else {
                Err(format!("allreduce of a {:?} value", data(*x).dist))
            };
        }
        _ => {}
    }
    let lowered = node.lower(|i| data(i).int, |i| data(i).ints.clone(), |i| data(i).attr);
    let (op, ins): (Op, Vec<Id>) = match lowered {
        None | Some(Lowered::Leaf) => return Ok(Dist::Rep),
        Some(Lowered::Out(_, t)) => {
            return match data(t).dist {
                Dist::Rep => Ok(Dist::Rep),
                d => Err(format!("output of a {d:?} tuple")),
            }
        }
        Some(Lowered::Op(op, ins)) => (op, ins),
        Some(Lowered::Table(k, ins)) => match an.op(k) {
            Some(e) => (e.op.clone(), ins.to_vec()),
            None => return Ok(Dist::Rep),
        },
    };
    let vals: Vec<(usize, &Data)> = ins
        .iter()
        .enumerate()
        .map(|(i, &c)| (i, data(c)))
        .filter(|(_, d)| d.kind == Kind::Value)
        .collect();
    if vals.iter().all(|(_, d)| d.dist == Dist::Rep) {
        return Ok(Dist::Rep);
    }
    let out_rank = out.first().map_or(0, |f| f.shape.rank());
    let rank = |d: &Data| d.fact().map_or(0, |f| f.shape.rank());
    let unsupported = || Err(format!("{} cannot run on sharded inputs", op.op_type()));
    match &op {
        Op::Elementwise(ElementwiseOp::Unary(u)) => match (vals[0].1.dist, u) {
            (Dist::Split { .. }, _) => Ok(vals[0].1.dist),
            (Dist::Partial { .. }, UnaryKind::Neg) => Ok(vals[0].1.dist),
            _ => unsupported(),
        },
        Op::Elementwise(ElementwiseOp::Identity) => match vals[0].1.dist {
            d @ Dist::Split { .. } => Ok(d),
            _ => unsupported(),
        },
        Op::Elementwise(ElementwiseOp::Binary(b)) if vals.len() == 2 => {
            binary(*b, vals[0].1, vals[1].1, out_rank, rank)
        }
        Op::Linalg(LinalgOp::MatMul) if vals.len() == 2 => {
            matmul(vals[0].1, vals[1].1, out_rank, rank)
        }
        Op::Array(kiln_ir::ops::array::ArrayOp::Transpose { perm: Some(p) }) => {
            match vals[0].1.dist {
                Dist::Split { axis, k } => {
                    let a = p
                        .iter()
                        .position(|&q| q == axis as i64)
                        .ok_or("transpose: split axis missing from perm")?;
                    Ok(Dist::Split { axis: a, k })
                }
                d => Ok(d),
            }
        }
        Op::Array(kiln_ir::ops::array::ArrayOp::Reshape { .. }) => {
            // Only the data input may be split (the shape is a replicated constant).
            if vals.iter().skip(1).any(|(_, d)| d.dist != Dist::Rep) {
                return unsupported();
            }
            match vals[0].1.dist {
                Dist::Split { axis, k } => {
                    let is = vals[0].1.shape().ok_or("reshape: unknown shape")?;
                    let os = out.first().and_then(dims).ok_or("reshape: unknown shape")?;
                    let a = reshape_axis(&is, &os, axis)
                        .ok_or("reshape moves the split axis across others")?;
                    Ok(Dist::Split { axis: a, k })
                }
                d => Ok(d),
            }
        }
        Op::Nn(NnOp::Softmax(a) | NnOp::LogSoftmax(a)) if vals.len() == 1 => match vals[0].1.dist {
            Dist::Split { axis, k } => {
                let sa = norm(a.axis, out_rank).ok_or("softmax: bad axis")?;
                let ok = if a.coerce_2d { axis < sa } else { axis != sa };
                ok.then_some(Dist::Split { axis, k })
                    .ok_or_else(|| "softmax over the split axis".to_string())
            }
            _ => unsupported(),
        },
        Op::Nn(NnOp::Conv(c)) if c.group == 1 => {
            let d = |i: usize| {
                ins.get(i)
                    .map(|&x| data(x))
                    .filter(|d| d.kind == Kind::Value)
            };
            let (x, w, b) = (
                d(0).ok_or("conv: no input")?,
                d(1).ok_or("conv: no weight")?,
                d(2),
            );
            let bd = b.map(|b| b.dist);
            match (x.dist, w.dist, bd) {
                // output channels
                (Dist::Rep, Dist::Split { axis: 0, k }, None)
                | (Dist::Rep, Dist::Split { axis: 0, k }, Some(Dist::Split { axis: 0, .. })) => {
                    Ok(Dist::Split { axis: 1, k })
                }
                // input channels: partial sums (no bias: it would be added k times)
                (Dist::Split { axis: 1, k }, Dist::Split { axis: 1, k: k2 }, None) if k == k2 => {
                    Ok(Dist::Partial { k })
                }
                // batch
                (Dist::Split { axis: 0, k }, Dist::Rep, None | Some(Dist::Rep)) => {
                    Ok(Dist::Split { axis: 0, k })
                }
                _ => unsupported(),
            }
        }
        Op::Nn(NnOp::MaxPool(_) | NnOp::Pool(_) | NnOp::GlobalPool(_)) if vals.len() == 1 => {
            match vals[0].1.dist {
                d @ Dist::Split { axis, .. } if axis <= 1 => Ok(d),
                _ => unsupported(),
            }
        }
        Op::Array(kiln_ir::ops::array::ArrayOp::Flatten { .. }) => match vals[0].1.dist {
            Dist::Split { axis, k } => {
                let is = vals[0].1.shape().ok_or("flatten: unknown shape")?;
                let os = out.first().and_then(dims).ok_or("flatten: unknown shape")?;
                let a = reshape_axis(&is, &os, axis)
                    .ok_or("flatten moves the split axis across others")?;
                Ok(Dist::Split { axis: a, k })
            }
            _ => unsupported(),
        },
        Op::Nn(NnOp::LayerNormalization(a)) => {
            if vals.iter().skip(1).any(|(_, d)| d.dist != Dist::Rep) {
                return unsupported();
            }
            match vals[0].1.dist {
                Dist::Split { axis, k } => {
                    let na = norm(a.axis, out_rank).ok_or("layernorm: bad axis")?;
                    (axis < na)
                        .then_some(Dist::Split { axis, k })
                        .ok_or_else(|| "layernorm over the split axis".to_string())
                }
                _ => unsupported(),
            }
        }
        _ => unsupported(),
    }
}

fn norm(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Where the split axis `axis` of a reshape's input goes in its output (local shapes `is`
/// → `os`): the output axis after the same prefix of elements that starts a block whose
/// contiguous chunks are the input's.
pub fn reshape_axis(is: &[usize], os: &[usize], axis: usize) -> Option<usize> {
    crate::parallel::propagate::map_reshape(is, os, axis, &[*is.get(axis)?]).map(|(b, _)| b)
}

/// The output axis a split axis of an operand of rank `r` lands on in a broadcast result
/// of rank `out_rank`.
fn aligned(axis: usize, r: usize, out_rank: usize) -> usize {
    axis + out_rank - r
}

/// Whether a replicated operand broadcasts along output axis `oa` (its dim there is 1 or it
/// has no such axis), so that every rank can use it whole against its part.
fn broadcasts_along(d: &Data, oa: usize, out_rank: usize) -> bool {
    let Some(s) = d.shape() else { return false };
    let r = s.len();
    oa + r < out_rank || s[oa + r - out_rank] == 1
}

fn binary(
    b: BinaryKind,
    x: &Data,
    y: &Data,
    out_rank: usize,
    rank: impl Fn(&Data) -> usize,
) -> Result<Dist, String> {
    let err = || Err(format!("{b:?} of a {:?} and a {:?} value", x.dist, y.dist));
    match (x.dist, y.dist) {
        (Dist::Split { axis: a, k }, Dist::Split { axis: c, k: k2 }) => {
            let (oa, oc) = (aligned(a, rank(x), out_rank), aligned(c, rank(y), out_rank));
            if k == k2 && oa == oc {
                Ok(Dist::Split { axis: oa, k })
            } else {
                err()
            }
        }
        (Dist::Split { axis, k }, Dist::Rep) => {
            let oa = aligned(axis, rank(x), out_rank);
            if broadcasts_along(y, oa, out_rank) {
                Ok(Dist::Split { axis: oa, k })
            } else {
                err()
            }
        }
        (Dist::Rep, Dist::Split { axis, k }) => {
            let oa = aligned(axis, rank(y), out_rank);
            if broadcasts_along(x, oa, out_rank) {
                Ok(Dist::Split { axis: oa, k })
            } else {
                err()
            }
        }
        (Dist::Partial { k }, Dist::Partial { k: k2 })
            if k == k2 && matches!(b, BinaryKind::Add | BinaryKind::Sub) =>
        {
            Ok(Dist::Partial { k })
        }
        (Dist::Partial { k }, Dist::Rep) if matches!(b, BinaryKind::Mul | BinaryKind::Div) => {
            Ok(Dist::Partial { k })
        }
        (Dist::Rep, Dist::Partial { k }) if b == BinaryKind::Mul => Ok(Dist::Partial { k }),
        _ => err(),
    }
}

fn matmul(
    a: &Data,
    b: &Data,
    out_rank: usize,
    rank: impl Fn(&Data) -> usize,
) -> Result<Dist, String> {
    let (ra, rb) = (rank(a), rank(b));
    if ra < 2 || rb < 2 {
        return Err("sharded MatMul of a vector".into());
    }
    let err = || Err(format!("MatMul of a {:?} and a {:?} value", a.dist, b.dist));
    match (a.dist, b.dist) {
        // column: the weight's output features are split
        (Dist::Rep, Dist::Split { axis, k }) if axis == rb - 1 => Ok(Dist::Split {
            axis: out_rank - 1,
            k,
        }),
        // row: both split along the contraction
        (Dist::Split { axis, k }, Dist::Split { axis: c, k: k2 })
            if axis == ra - 1 && c == rb - 2 && k == k2 =>
        {
            Ok(Dist::Partial { k })
        }
        // rows of A
        (Dist::Split { axis, k }, Dist::Rep) if axis == ra - 2 => Ok(Dist::Split {
            axis: out_rank - 2,
            k,
        }),
        // batch axes
        (Dist::Split { axis, k }, Dist::Split { axis: c, k: k2 })
            if axis < ra - 2
                && c < rb - 2
                && k == k2
                && aligned(axis, ra, out_rank) == aligned(c, rb, out_rank) =>
        {
            Ok(Dist::Split {
                axis: aligned(axis, ra, out_rank),
                k,
            })
        }
        (Dist::Split { axis, k }, Dist::Rep)
            if axis < ra - 2 && broadcasts_along(b, aligned(axis, ra, out_rank), out_rank) =>
        {
            Ok(Dist::Split {
                axis: aligned(axis, ra, out_rank),
                k,
            })
        }
        (Dist::Rep, Dist::Split { axis, k })
            if axis < rb - 2 && broadcasts_along(a, aligned(axis, rb, out_rank), out_rank) =>
        {
            Ok(Dist::Split {
                axis: aligned(axis, rb, out_rank),
                k,
            })
        }
        _ => err(),
    }
}
