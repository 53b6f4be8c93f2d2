//! `DataMovement` kernels as strided copy loops.
//!
//! A kernel of one node (static shapes) becomes an `scf.for` nest over an output (or, for
//! `Concat`, over each input) whose body computes the source index of every element, loads
//! it and stores it: `Transpose` (any permutation), `Gather` (any axis, `i64` indices,
//! negative indices wrapped), `Split` and `Slice` (static starts and steps, offsets on the
//! axis), `Concat` (each input stored at its offset), `Expand` (broadcast inputs read at
//! index 0), `Identity`-like copies, and `Reshape`/`Flatten`/`Squeeze`/`Unsqueeze` whose
//! result is a graph output (a flat copy; elsewhere they are zero-copy `Alias` views), and
//! `Pad` in every mode (`pad_params`, `pad_sources`, shared with the GPU's generic
//! path). Element types: `f32`, `i64` and `bool` (bytes).

use super::elementwise::Body;
use super::{Lowered, Ty, GRAPH_KERNEL_PIPELINE};
use crate::cpu::abi::{memref_type_of, Dim as PDim, Prologue};
use crate::cpu::{Kernel, KernelSignature};
use kiln_ir::ops::array::{ArrayOp, IntsArg, PadMode};
use kiln_ir::ops::elementwise::ElementwiseOp;
use kiln_ir::{Graph, Node, Op, ValueId};
use kiln_passes::fusion;

/// A static shape.
fn known(g: &Graph, v: ValueId) -> Result<Vec<usize>, String> {
    g.values[v]
        .fact
        .shape
        .as_known()
        .ok_or_else(|| format!("value '{}' has a symbolic shape", g.values[v].name))
}

/// The value of an ints argument of `node` (`None` when absent: the default applies);
/// an input must be a constant.
pub(crate) fn ints(g: &Graph, node: &Node, a: &IntsArg) -> Result<Option<Vec<i64>>, String> {
    match a {
        IntsArg::Default => Ok(None),
        IntsArg::Attr(v) => Ok(Some(v.clone())),
        IntsArg::Input(i) => match node.inputs.get(*i).copied().flatten() {
            None => Ok(None),
            Some(v) => g
                .const_value(v)
                .map(|t| Some(t.to_f64_vec().iter().map(|&x| x as i64).collect()))
                .ok_or_else(|| format!("node '{}': input {i} is not constant", node.name)),
        },
    }
}

/// Normalizes a possibly negative axis (one still below zero becomes 0).
pub(crate) fn norm_axis(a: i64, rank: usize) -> usize {
    if a < 0 {
        (a + rank as i64).max(0) as usize
    } else {
        a as usize
    }
}

/// A `Pad` node's `(begin, end)` pads per axis of a rank-`rank` input and its fill value
/// (input 2, else the attribute); pads, axes and value must be constants.
pub(crate) fn pad_params(
    g: &Graph,
    node: &Node,
    rank: usize,
) -> Result<(Vec<(i64, i64)>, f64), String> {
    let Op::Array(ArrayOp::Pad {
        pads, value, axes, ..
    }) = &node.op
    else {
        return Err(format!("node '{}' is not a Pad", node.name));
    };
    let pads = ints(g, node, pads)?.ok_or("Pad without pads")?;
    let axes: Vec<usize> = match ints(g, node, axes)? {
        Some(a) => a.iter().map(|&x| norm_axis(x, rank)).collect(),
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() || axes.iter().any(|&a| a >= rank) {
        return Err(format!(
            "{} pads for axes {axes:?} of rank {rank}",
            pads.len()
        ));
    }
    let mut edges = vec![(0i64, 0i64); rank];
    for (j, &ax) in axes.iter().enumerate() {
        edges[ax] = (pads[j], pads[j + axes.len()]);
    }
    let fill = match node.inputs.get(2).copied().flatten() {
        Some(v) => g
            .const_value(v)
            .and_then(|t| t.to_f64_vec().first().copied())
            .ok_or_else(|| format!("node '{}': Pad value is not constant", node.name))?,
        None => *value as f64,
    };
    Ok((edges, fill))
}

/// Where index `i` of a padded axis reads, as the interpreter defines `Pad`: negative pads
/// first crop the input (`in_dim` long), then output index `i` reads index `i - begin` of
/// the cropped input, mapped back into it by the mode (edge: clamped; reflect: mirrored
/// without the edge; wrap: periodic; constant: clamped, with an `i1` that is false where
/// the fill value goes). The returned index is always inside the input.
fn pad_source(
    b: &mut Body,
    i: &str,
    (begin, end): (i64, i64),
    in_dim: usize,
    mode: PadMode,
) -> Result<(String, Option<String>), String> {
    let off = (-begin).max(0);
    let kept = in_dim as i64 - off - (-end).max(0);
    if kept <= 0 {
        return Err("Pad crops an axis to nothing".into());
    }
    let c = |b: &mut Body, v: i64| b.op(&format!("arith.constant {v} : index"));
    let (zero, dim, last) = (c(b, 0), c(b, kept), c(b, kept - 1));
    let pb = c(b, begin.max(0));
    let mut s = b.op(&format!("arith.subi {i}, {pb} : index"));
    let mut inside = None;
    match mode {
        PadMode::Constant => {
            let lo = b.op(&format!("arith.cmpi sge, {s}, {zero} : index"));
            let hi = b.op(&format!("arith.cmpi sle, {s}, {last} : index"));
            inside = Some(b.op(&format!("arith.andi {lo}, {hi} : i1")));
        }
        PadMode::Edge => {}
        PadMode::Reflect => {
            // -s before the start, 2·last - s after the end
            let neg = b.op(&format!("arith.subi {zero}, {s} : index"));
            let before = b.op(&format!("arith.cmpi slt, {s}, {zero} : index"));
            s = b.op(&format!("arith.select {before}, {neg}, {s} : index"));
            let two_last = b.op(&format!("arith.addi {last}, {last} : index"));
            let back = b.op(&format!("arith.subi {two_last}, {s} : index"));
            let after = b.op(&format!("arith.cmpi sgt, {s}, {last} : index"));
            s = b.op(&format!("arith.select {after}, {back}, {s} : index"));
        }
        PadMode::Wrap => {
            let r = b.op(&format!("arith.remsi {s}, {dim} : index"));
            let r = b.op(&format!("arith.addi {r}, {dim} : index"));
            s = b.op(&format!("arith.remsi {r}, {dim} : index"));
        }
    }
    // clamped into the cropped input, then offset past the crop
    let s = b.op(&format!("arith.maxsi {s}, {zero} : index"));
    let s = b.op(&format!("arith.minsi {s}, {last} : index"));
    let o = c(b, off);
    Ok((b.op(&format!("arith.addi {s}, {o} : index")), inside))
}

/// The source indices of output multi-index `idx` of a `Pad` with `edges` over an input of
/// shape `in_s` (see [`pad_source`]; unpadded axes read their own index), and for the
/// constant mode the `i1` that is true where every axis reads inside the input.
pub(crate) fn pad_sources(
    b: &mut Body,
    idx: &[String],
    edges: &[(i64, i64)],
    in_s: &[usize],
    mode: PadMode,
) -> Result<(Vec<String>, Option<String>), String> {
    let mut inside: Option<String> = None;
    let mut src = Vec::with_capacity(idx.len());
    for (d, i) in idx.iter().enumerate() {
        if edges[d] == (0, 0) {
            src.push(i.clone());
            continue;
        }
        let (s, ok) = pad_source(b, i, edges[d], in_s[d], mode)?;
        src.push(s);
        if let Some(ok) = ok {
            inside = Some(match inside {
                Some(acc) => b.op(&format!("arith.andi {acc}, {ok} : i1")),
                None => ok,
            });
        }
    }
    Ok((src, inside))
}

/// The fill value of a `Pad` as an MLIR constant of type `ty`.
pub(crate) fn pad_fill(b: &mut Body, fill: f64, ty: Ty) -> String {
    b.op(&match ty {
        Ty::F32 => format!("arith.constant 0x{:08X} : f32", (fill as f32).to_bits()),
        Ty::I64 => format!("arith.constant {} : i64", fill as i64),
        Ty::I1 => format!("arith.constant {} : i1", i64::from(fill != 0.0)),
    })
}

/// Emits a loop nest over `shape` and calls `f` with the induction variables inside it.
fn nest(
    b: &mut Body,
    shape: &[usize],
    f: impl FnOnce(&mut Body, &[String]) -> Result<(), String>,
) -> Result<(), String> {
    let c0 = b.op("arith.constant 0 : index");
    let c1 = b.op("arith.constant 1 : index");
    let mut ivs = Vec::new();
    for &d in shape {
        let n = b.op(&format!("arith.constant {d} : index"));
        let iv = b.fresh();
        b.raw(&format!("scf.for {iv} = {c0} to {n} step {c1} {{"));
        ivs.push(iv);
    }
    f(b, &ivs)?;
    for _ in shape {
        b.raw("}");
    }
    Ok(())
}

/// Tile size of [`tiled_nest`].
const TILE: usize = 16;

/// Like [`nest`], with the two dims `tiled` (the output's last dim and the one walking the
/// input's contiguous axis, for a transpose) iterated in `TILE`×`TILE` tiles, so that the
/// reads and the writes of a tile each touch `TILE` cache lines.
fn tiled_nest(
    b: &mut Body,
    shape: &[usize],
    tiled: (usize, usize),
    f: impl FnOnce(&mut Body, &[String]) -> Result<(), String>,
) -> Result<(), String> {
    let c0 = b.op("arith.constant 0 : index");
    let c1 = b.op("arith.constant 1 : index");
    let ct = b.op(&format!("arith.constant {TILE} : index"));
    let mut ivs = vec![String::new(); shape.len()];
    let mut open = 0;
    for (d, &n) in shape.iter().enumerate() {
        if d == tiled.0 || d == tiled.1 {
            continue;
        }
        let n = b.op(&format!("arith.constant {n} : index"));
        ivs[d] = b.fresh();
        b.raw(&format!("scf.for {} = {c0} to {n} step {c1} {{", ivs[d]));
        open += 1;
    }
    let mut starts = Vec::new();
    for d in [tiled.0, tiled.1] {
        let n = b.op(&format!("arith.constant {} : index", shape[d]));
        let t0 = b.fresh();
        b.raw(&format!("scf.for {t0} = {c0} to {n} step {ct} {{"));
        starts.push((t0, n));
        open += 1;
    }
    for (d, (t0, n)) in [tiled.0, tiled.1].into_iter().zip(starts) {
        let t1 = b.op(&format!("arith.addi {t0}, {ct} : index"));
        let end = b.op(&format!("arith.minui {t1}, {n} : index"));
        ivs[d] = b.fresh();
        b.raw(&format!("scf.for {} = {t0} to {end} step {c1} {{", ivs[d]));
        open += 1;
    }
    f(b, &ivs)?;
    for _ in 0..open {
        b.raw("}");
    }
    Ok(())
}

/// `iv + off` (or `iv * step + off`) as an index.
fn affine(b: &mut Body, iv: &str, step: i64, off: i64) -> String {
    let mut x = iv.to_string();
    if step != 1 {
        let s = b.op(&format!("arith.constant {step} : index"));
        x = b.op(&format!("arith.muli {x}, {s} : index"));
    }
    if off != 0 {
        let o = b.op(&format!("arith.constant {off} : index"));
        x = b.op(&format!("arith.addi {x}, {o} : index"));
    }
    x
}

/// Emits `dst[di] = src[si]`.
fn copy(b: &mut Body, src: (&str, &[String]), dst: (&str, &[String]), elem: &str) {
    let x = b.op(&format!(
        "memref.load {}[{}] : {}",
        src.0,
        src.1.join(", "),
        memref_type_of(src.1.len(), elem)
    ));
    b.raw(&format!(
        "memref.store {x}, {}[{}] : {}",
        dst.0,
        dst.1.join(", "),
        memref_type_of(dst.1.len(), elem)
    ));
}

/// Lowers a `DataMovement` kernel.
pub(crate) fn lower(g: &Graph, k: &fusion::Kernel, name: &str) -> Result<Lowered, String> {
    let [ni] = k.nodes[..] else {
        return Err("data movement kernels of several nodes".into());
    };
    let node = &g.nodes[ni];
    let data = node
        .inputs
        .first()
        .copied()
        .flatten()
        .ok_or("missing data input")?;
    let elem = Ty::of(g.values[data].fact.dtype)?.storage();
    let mut p = Prologue::new();
    let mut b = Body::default();
    // Buffer inputs: the data inputs (and Gather's indices); other inputs are constants.
    let buf_inputs: Vec<ValueId> = match &node.op {
        Op::Array(ArrayOp::Concat { .. }) => node.inputs.iter().flatten().copied().collect(),
        Op::Array(ArrayOp::Gather { .. }) => {
            vec![
                data,
                node.inputs.get(1).copied().flatten().ok_or("indices")?,
            ]
        }
        _ => vec![data],
    };
    if k.inputs
        .iter()
        .any(|&v| !buf_inputs.contains(&v) && g.const_value(v).is_none())
    {
        return Err("a data movement input other than data is not constant".into());
    }
    // Reshape-like ops (a graph output, so not a zero-copy view): a flat copy.
    let reshape_like = matches!(
        node.op,
        Op::Array(
            ArrayOp::Reshape { .. }
                | ArrayOp::Flatten { .. }
                | ArrayOp::Squeeze { .. }
                | ArrayOp::Unsqueeze { .. }
        )
    );
    let flat = |v: ValueId| -> Result<Vec<usize>, String> {
        let s = known(g, v)?;
        Ok(if reshape_like {
            vec![s.iter().product()]
        } else {
            s
        })
    };
    let mut mems = Vec::new();
    for (i, &v) in buf_inputs.iter().enumerate() {
        let s = flat(v)?;
        let ty = Ty::of(g.values[v].fact.dtype)?;
        let sd: Vec<PDim> = s.iter().map(|&d| PDim::Const(d as i64)).collect();
        mems.push((p.memref(i, &sd, ty.storage()), s));
    }
    let mut outs = Vec::new();
    for (i, &v) in k.outputs.iter().enumerate() {
        let s = flat(v)?;
        let sd: Vec<PDim> = s.iter().map(|&d| PDim::Const(d as i64)).collect();
        outs.push((p.memref(buf_inputs.len() + i, &sd, elem), s));
    }
    let out_pos = |v: ValueId| k.outputs.iter().position(|&o| o == v);
    let (src, in_s) = mems[0].clone();
    let rank = in_s.len();
    match &node.op {
        Op::Array(ArrayOp::Transpose { perm }) => {
            let perm: Vec<usize> = match perm {
                Some(pm) => pm.iter().map(|&a| norm_axis(a, rank)).collect(),
                None => (0..rank).rev().collect(),
            };
            let (dst, os) = outs[0].clone();
            let body = |b: &mut Body, ivs: &[String]| {
                let mut si = vec![String::new(); rank];
                for (i, &pa) in perm.iter().enumerate() {
                    si[pa] = ivs[i].clone();
                }
                copy(b, (&src, &si), (&dst, ivs), elem);
                Ok(())
            };
            // the output dim that walks the input's contiguous axis
            let q = perm.iter().position(|&pa| pa == rank - 1);
            match q {
                Some(q) if q != rank - 1 && os[q] >= TILE && os[rank - 1] >= TILE => {
                    tiled_nest(&mut b, &os, (q, rank - 1), body)?
                }
                _ => nest(&mut b, &os, body)?,
            }
        }
        Op::Array(ArrayOp::Gather { axis }) => {
            let a = norm_axis(*axis, rank);
            let (ind, is) = mems[1].clone();
            let q = is.len();
            if g.values[buf_inputs[1]].fact.dtype != kiln_ir::DType::I64 {
                return Err("Gather indices must be i64".into());
            }
            let (dst, os) = outs[0].clone();
            let dim = in_s[a] as i64;
            nest(&mut b, &os, |b, ivs| {
                let idx = b.op(&format!(
                    "memref.load {ind}[{}] : {}",
                    ivs[a..a + q].join(", "),
                    memref_type_of(q, "i64")
                ));
                let z = b.op("arith.constant 0 : i64");
                let d = b.op(&format!("arith.constant {dim} : i64"));
                let neg = b.op(&format!("arith.cmpi slt, {idx}, {z} : i64"));
                let w = b.op(&format!("arith.addi {idx}, {d} : i64"));
                let s = b.op(&format!("arith.select {neg}, {w}, {idx} : i64"));
                let ix = b.op(&format!("arith.index_cast {s} : i64 to index"));
                let mut si: Vec<String> = ivs[..a].to_vec();
                si.push(ix);
                si.extend(ivs[a + q..].iter().cloned());
                copy(b, (&src, &si), (&dst, ivs), elem);
                Ok(())
            })?;
        }
        Op::Array(ArrayOp::Split { axis, .. }) => {
            let a = norm_axis(*axis, rank);
            let mut off = 0i64;
            for &o in &node.outputs {
                let os = known(g, o)?;
                if let Some(pos) = out_pos(o) {
                    let dst = outs[pos].0.clone();
                    nest(&mut b, &os, |b, ivs| {
                        let mut si = ivs.to_vec();
                        si[a] = affine(b, &ivs[a], 1, off);
                        copy(b, (&src, &si), (&dst, ivs), elem);
                        Ok(())
                    })?;
                }
                off += os[a] as i64;
            }
        }
        Op::Array(ArrayOp::Slice {
            starts,
            axes,
            steps,
            ..
        }) => {
            let st = ints(g, node, starts)?.ok_or("Slice without starts")?;
            let ax: Vec<usize> = ints(g, node, axes)?
                .unwrap_or_else(|| (0..st.len() as i64).collect())
                .iter()
                .map(|&a| norm_axis(a, rank))
                .collect();
            let sp = ints(g, node, steps)?.unwrap_or_else(|| vec![1; st.len()]);
            let mut start = vec![0i64; rank];
            let mut step = vec![1i64; rank];
            for (i, &a) in ax.iter().enumerate() {
                let d = in_s[a] as i64;
                let mut s0 = st[i];
                if s0 < 0 {
                    s0 += d;
                }
                s0 = if sp[i] > 0 {
                    s0.clamp(0, d)
                } else {
                    s0.clamp(0, d - 1)
                };
                start[a] = s0;
                step[a] = sp[i];
            }
            let (dst, os) = outs[0].clone();
            nest(&mut b, &os, |b, ivs| {
                let si: Vec<String> = (0..rank)
                    .map(|d| affine(b, &ivs[d], step[d], start[d]))
                    .collect();
                copy(b, (&src, &si), (&dst, ivs), elem);
                Ok(())
            })?;
        }
        Op::Array(ArrayOp::Concat { axis }) => {
            let (dst, os) = outs[0].clone();
            let a = norm_axis(*axis, os.len());
            let mut off = 0i64;
            for (m, s) in &mems {
                nest(&mut b, s, |b, ivs| {
                    let mut di = ivs.to_vec();
                    di[a] = affine(b, &ivs[a], 1, off);
                    copy(b, (m, ivs), (&dst, &di), elem);
                    Ok(())
                })?;
                off += s[a] as i64;
            }
        }
        _ if reshape_like => {
            let (dst, os) = outs[0].clone();
            nest(&mut b, &os, |b, ivs| {
                copy(b, (&src, ivs), (&dst, ivs), elem);
                Ok(())
            })?;
        }
        Op::Array(ArrayOp::Expand) | Op::Elementwise(ElementwiseOp::Identity) => {
            let (dst, os) = outs[0].clone();
            if os.len() < rank {
                return Err("Expand to a lower rank".into());
            }
            let shift = os.len() - rank;
            nest(&mut b, &os, |b, ivs| {
                let c0 = b.op("arith.constant 0 : index");
                let si: Vec<String> = (0..rank)
                    .map(|j| {
                        if in_s[j] == os[j + shift] {
                            ivs[j + shift].clone()
                        } else {
                            c0.clone()
                        }
                    })
                    .collect();
                copy(b, (&src, &si), (&dst, ivs), elem);
                Ok(())
            })?;
        }
        Op::Array(ArrayOp::Pad { mode, .. }) => {
            let (edges, fill) = pad_params(g, node, rank)?;
            let ty = Ty::of(g.values[data].fact.dtype)?;
            let (dst, os) = outs[0].clone();
            nest(&mut b, &os, |b, ivs| {
                let (si, inside) = pad_sources(b, ivs, &edges, &in_s, *mode)?;
                let mut x = b.op(&format!(
                    "memref.load {src}[{}] : {}",
                    si.join(", "),
                    memref_type_of(rank, elem)
                ));
                if let Some(ok) = inside {
                    // bytes hold bools: the fill goes in as a byte too
                    let f = if ty == Ty::I1 {
                        b.op(&format!("arith.constant {} : i8", i64::from(fill != 0.0)))
                    } else {
                        pad_fill(b, fill, ty)
                    };
                    x = b.op(&format!("arith.select {ok}, {x}, {f} : {elem}"));
                }
                b.raw(&format!(
                    "memref.store {x}, {dst}[{}] : {}",
                    ivs.join(", "),
                    memref_type_of(rank, elem)
                ));
                Ok(())
            })?;
        }
        other => return Err(format!("{} is not lowered yet", other.op_type())),
    }
    if node
        .outputs
        .iter()
        .any(|&o| g.values[o].fact.dtype != g.values[data].fact.dtype)
    {
        return Err("output dtype differs from the data dtype".into());
    }
    p.push(&b.into_text());
    let kernel = Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: buf_inputs.len(),
            outputs: outs.len(),
            dims: vec![],
            tasks: 1,
            scratch_bytes: 0,
        },
        mlir: p.finish(name),
        pipeline: GRAPH_KERNEL_PIPELINE.to_string(),
    };
    Ok((kernel, buf_inputs, k.outputs.clone()))
}
