//! Pooling kernels as `scf.for` loop nests over static NCHW f32 buffers:
//!
//! * an `Opaque` kernel made of one 2-D `MaxPool` (kernel, strides, pads, dilations,
//!   `ceil_mode`; no `Indices` output): the maximum of the window taps inside the input,
//!   vectorised over output positions on a `-inf`-padded, stride-phase-split copy of the
//!   input (see [`emit_pool`]);
//! * the same for one 2-D `AveragePool`: the sum over a zero-padded copy times a table of
//!   reciprocal tap counts per output position (taps inside the input, or with
//!   `count_include_pad` inside the padded input; per-axis counts multiply);
//! * a `Reduction` kernel made of one `GlobalAveragePool` or `GlobalMaxPool` (any rank ≥ 3):
//!   the mean (maximum) of each `[n, c]` plane.

use super::conv::{emit_copy, emit_store, known, Grid, Loops, Window2, M1, MT, VT, VW};
use super::{Lowered, GRAPH_KERNEL_PIPELINE};
use crate::cpu::abi::{Dim as PDim, Prologue};
use crate::cpu::{Kernel, KernelSignature};
use kiln_ir::ops::nn::{NnOp, PoolAttrs, PoolKind};
use kiln_ir::{DType, Graph, Op};
use kiln_passes::fusion;

/// Whether `k` is a single pooling node this module lowers.
pub(crate) fn handles(g: &Graph, k: &fusion::Kernel) -> bool {
    k.nodes.len() == 1
        && matches!(
            g.nodes[k.nodes[0]].op,
            Op::Nn(NnOp::MaxPool(_))
                | Op::Nn(NnOp::Pool(PoolAttrs {
                    kind: PoolKind::Average { .. },
                    ..
                }))
                | Op::Nn(NnOp::GlobalPool(PoolKind::Average { .. }))
                | Op::Nn(NnOp::GlobalPool(PoolKind::Max))
        )
}

/// Lowers a single-node pooling kernel (see [`handles`]).
pub(crate) fn lower(g: &Graph, k: &fusion::Kernel, name: &str) -> Result<Lowered, String> {
    let node = &g.nodes[k.nodes[0]];
    let x_v = node.inputs[0].ok_or("missing pooling input")?;
    let y_v = node.outputs[0];
    if node.outputs.len() != 1 || k.outputs != [y_v] {
        return Err("pooling with more than one output".into());
    }
    for v in [x_v, y_v] {
        if g.values[v].fact.dtype != DType::F32 {
            return Err(format!(
                "pooling on {} (f32 only)",
                g.values[v].fact.dtype.name()
            ));
        }
    }
    let xs = known(g, x_v)?;
    let ys = known(g, y_v)?;
    let cd = |d: &[usize]| d.iter().map(|&x| PDim::Const(x as i64)).collect::<Vec<_>>();
    let mut p = Prologue::new();
    let mut l = Loops::default();
    let mut tasks = 1;
    // 2-D windowed pooling: (window, ceil_mode, AveragePool's count_include_pad, name)
    let windowed = match &node.op {
        Op::Nn(NnOp::MaxPool(a)) if a.with_indices => {
            return Err("MaxPool with Indices".into());
        }
        Op::Nn(NnOp::MaxPool(a)) => Some((&a.window, a.ceil_mode, None, "MaxPool")),
        Op::Nn(NnOp::Pool(a)) => match a.kind {
            PoolKind::Average { count_include_pad } => Some((
                &a.window,
                a.ceil_mode,
                Some(count_include_pad),
                "AveragePool",
            )),
            _ => return Err("LpPool is not lowered yet".into()),
        },
        _ => None,
    };
    match &node.op {
        _ if windowed.is_some() => {
            let (window, ceil, include_pad, what) = windowed.expect("windowed pooling");
            let Some(ks) = window.kernel_shape.clone().filter(|k| k.len() == 2) else {
                return Err(format!("{what} of rank other than 2-D"));
            };
            let win = Window2::new(window, &xs, [ks[0], ks[1]], ceil)?;
            if ys != [win.n, win.c, win.oh, win.ow] {
                return Err(format!("{what} shapes do not match"));
            }
            let avg = match include_pad {
                Some(inc) => Some(win.divisor_ranges(window, ceil, inc)?),
                None => None,
            };
            let x = p.memref_f32(0, &cd(&xs));
            let y = p.memref_f32(1, &cd(&[ys.iter().product()]));
            let tc = p.const_index((win.n * win.c) as i64);
            let range = p.task_range(&tc);
            emit_pool(&mut l, &win, &x, &y, &range, avg);
            tasks = (win.n * win.c) as u64;
        }
        Op::Nn(NnOp::GlobalPool(kind)) => {
            if xs.len() < 3 {
                return Err("global pooling of rank < 3".into());
            }
            let (nc, hw) = (xs[0] * xs[1], xs[2..].iter().product::<usize>());
            let x = p.memref_f32(0, &cd(&[nc, hw]));
            let y = p.memref_f32(1, &cd(&[nc]));
            let avg = matches!(kind, PoolKind::Average { .. });
            let i = l.open(nc);
            let init = l.f(if avg { 0.0 } else { f32::NEG_INFINITY });
            let (j, a, r) = l.open_acc(hw, &init);
            let xv = l.op(&format!("memref.load {x}[{i}, {j}] : memref<?x?xf32>"));
            let s = if avg {
                l.op(&format!("arith.addf {a}, {xv} : f32"))
            } else {
                l.op(&format!("arith.maximumf {a}, {xv} : f32"))
            };
            l.close_acc(&s);
            let out = if avg {
                let inv = l.f(1.0 / hw as f32);
                l.op(&format!("arith.mulf {r}, {inv} : f32"))
            } else {
                r
            };
            l.line(&format!("memref.store {out}, {y}[{i}] : memref<?xf32>"));
            l.close();
        }
        other => return Err(format!("{} is not lowered yet", other.op_type())),
    }
    let scratch_bytes = l.scratch_bytes();
    p.push(&l.finish());
    let kernel = Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: 1,
            outputs: 1,
            dims: vec![],
            tasks,
            scratch_bytes,
        },
        mlir: p.finish(name),
        pipeline: GRAPH_KERNEL_PIPELINE.to_string(),
    };
    Ok((kernel, vec![x_v], vec![y_v]))
}

/// The number of taps of window axis `ax` whose input position lies in `[lo, hi)` for
/// output index `o` (an `index` value), as an f32.
fn tap_count(l: &mut Loops, win: &Window2, ax: usize, o: &str, (lo, hi): (i64, i64)) -> String {
    let zero = l.f(0.0);
    let one = l.f(1.0);
    let base = l.affine(o, win.s[ax] as i64, -win.p[ax]);
    let (t, acc, res) = l.open_acc(win.k[ax], &zero);
    let td = l.affine(&t, win.d[ax] as i64, 0);
    let v = l.add(&base, &td);
    let (lo, hi) = (l.c(lo), l.c(hi));
    let ge = l.op(&format!("arith.cmpi sge, {v}, {lo} : index"));
    let lt = l.op(&format!("arith.cmpi slt, {v}, {hi} : index"));
    let ok = l.op(&format!("arith.andi {ge}, {lt} : i1"));
    let inc = l.op(&format!("arith.select {ok}, {one}, {zero} : f32"));
    let n = l.op(&format!("arith.addf {acc}, {inc} : f32"));
    l.close_acc(&n);
    res
}

/// A vectorised 2-D MaxPool (`avg` = `None`) or AveragePool: each image is copied into a
/// `-inf`-padded (zero-padded) stride-phase-split buffer ([`Grid`]), so every tap of a run
/// of 8 output positions is one unit-stride vector load; up to 4 vectors per channel and
/// tap. Tasks: one per `(image, channel)`. Rows narrower than the grid go through a
/// per-channel scratch whose pad columns are dropped on the way out. For AveragePool, `avg`
/// holds per axis the input range whose taps the divisor counts; a table of reciprocal
/// counts per grid position, filled once per call, scales the window sums.
fn emit_pool(
    l: &mut Loops,
    win: &Window2,
    x: &str,
    y: &str,
    tasks: &(String, String),
    avg: Option<[(i64, i64); 2]>,
) {
    let grid = Grid::new(win);
    let (wq, plane, slots) = (grid.wq, grid.plane(), grid.slots());
    let npos = win.oh * wq;
    let nv = npos.div_ceil(VW).clamp(1, 4);
    let nr = nv * VW;
    let gp = npos.div_ceil(nr) * nr;
    let direct = wq == win.ow;
    let (fill, combine) = match avg {
        None => (l.vsplat(f32::NEG_INFINITY), "arith.maximumf"),
        Some(_) => (l.vsplat(0.0), "arith.addf"),
    };
    // One channel's padded copy: filled once per call, its interior rewritten per task.
    let len = (slots * plane + nr + wq + VW).div_ceil(VW) * VW;
    let xp = l.scratch(len);
    let i = l.open_range(0, len, VW);
    emit_store(l, &xp, &fill, &i, None);
    l.close();
    // AveragePool: 1 / count per grid position (1 in the grid's pad columns and the tail)
    let recip = avg.map(|ranges| {
        let rc = l.scratch(gp);
        let ones = l.vsplat(1.0);
        let i = l.open_range(0, gp, VW);
        emit_store(l, &rc, &ones, &i, None);
        l.close();
        let one = l.f(1.0);
        let oh = l.open(win.oh);
        let ch = tap_count(l, win, 0, &oh, ranges[0]);
        let row = l.affine(&oh, wq as i64, 0);
        let ow = l.open(win.ow);
        let cw = tap_count(l, win, 1, &ow, ranges[1]);
        let n = l.op(&format!("arith.mulf {ch}, {cw} : f32"));
        let r = l.op(&format!("arith.divf {one}, {n} : f32"));
        let at = l.add(&row, &ow);
        l.line(&format!("memref.store {r}, {rc}[{at}] : {M1}"));
        l.close();
        l.close();
        rc
    });
    let yb = (!direct).then(|| l.scratch(gp + 2 * VW));
    // One task per (image, channel), which copies its own channel.
    let t = l.fresh("t");
    let one = l.c(1);
    l.line(&format!(
        "scf.for {t} = {} to {} step {one} {{",
        tasks.0, tasks.1
    ));
    let cc = l.c(win.c as i64);
    let n = l.op(&format!("arith.divui {t}, {cc} : index"));
    let c = l.op(&format!("arith.remui {t}, {cc} : index"));
    emit_copy(l, win, &grid, x, &xp, &n, &c, 1, true, None);
    let xc = l.c(0);
    let nc = l.affine(&n, win.c as i64, 0);
    let ncc = l.add(&nc, &c);
    let ybase = l.affine(&ncc, (win.oh * win.ow) as i64, 0);
    let full_end = if direct { npos / nr * nr } else { gp };
    for (lo, hi, tail) in [(0, full_end, false), (full_end, gp, true)] {
        if lo >= hi {
            continue;
        }
        let q0 = l.open_range(lo, hi, nr);
        let xb = l.add(&xc, &q0);
        let mut acc = vec![fill.clone(); nv];
        for ki in 0..win.k[0] {
            for kj in 0..win.k[1] {
                let off = grid.tap(win, ki, kj);
                for (v, a) in acc.iter_mut().enumerate() {
                    let i = l.addc(&xb, off + v * VW);
                    let t = l.op(&format!("vector.load {xp}[{i}] : {M1}, {VT}"));
                    *a = l.op(&format!("{combine} {a}, {t} : {VT}"));
                }
            }
        }
        if let Some(rc) = &recip {
            for (v, a) in acc.iter_mut().enumerate() {
                let i = l.addc(&q0, v * VW);
                let r = l.op(&format!("vector.load {rc}[{i}] : {M1}, {VT}"));
                *a = l.op(&format!("arith.mulf {a}, {r} : {VT}"));
            }
        }
        for (v, a) in acc.iter().enumerate() {
            let pos = l.addc(&q0, v * VW);
            match &yb {
                None => {
                    let idx = l.add(&ybase, &pos);
                    let mask = tail.then(|| {
                        let np = l.c(npos as i64);
                        let left = l.op(&format!("arith.subi {np}, {pos} : index"));
                        l.op(&format!("vector.create_mask {left} : {MT}"))
                    });
                    emit_store(l, y, a, &idx, mask.as_deref());
                }
                Some(yb) => emit_store(l, yb, a, &pos, None),
            }
        }
        l.close();
    }
    if let Some(yb) = &yb {
        let oh = l.open(win.oh);
        let src0 = l.affine(&oh, wq as i64, 0);
        let dr = l.affine(&oh, win.ow as i64, 0);
        let dst0 = l.add(&ybase, &dr);
        for j in 0..win.ow.div_ceil(VW) {
            let si = l.addc(&src0, j * VW);
            let di = l.addc(&dst0, j * VW);
            let left = win.ow - j * VW;
            let mask = (left < VW).then(|| l.op(&format!("vector.constant_mask [{left}] : {MT}")));
            let v = l.op(&format!("vector.load {yb}[{si}] : {M1}, {VT}"));
            emit_store(l, y, &v, &di, mask.as_deref());
        }
        l.close();
    }
    l.close();
}
