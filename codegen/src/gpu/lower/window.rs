//! Pooling on the generic path, one thread per output element: 2-D `MaxPool` (window max
//! over the taps inside the input), 2-D `AveragePool` (window sum over the taps inside the
//! input, divided by their count — or, with `count_include_pad`, by the count of taps inside
//! the padded input; both counts are products of per-axis counts) and `GlobalAveragePool` /
//! `GlobalMaxPool` (a loop over the spatial positions of one `(n, c)` plane).

use super::generic::{Gen, GenKernel};
use super::{node_input, shape_of};
use crate::cpu::lower::conv::Window2;
use crate::cpu::lower::Ty;
use kiln_ir::ops::nn::{NnOp, PoolAttrs, PoolKind};
use kiln_ir::{Graph, Op};
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

/// The input element that output position `o = (oh, ow)` reads at tap `t = (th, tw)` of
/// window `win`: `(inside, offset)`, `inside` whether `o·s − p + t·d` lies in the input on
/// both axes, `offset` its row-major offset in one `h × w` plane (clamped to 0 when outside,
/// so the load stays in bounds).
pub(crate) fn tap_offset(
    gen: &mut Gen,
    win: &Window2,
    o: [&str; 2],
    t: [&str; 2],
) -> (String, String) {
    let pos = |gen: &mut Gen, ax: usize, size: usize| {
        let s = gen.c(win.s[ax] as i64);
        let d = gen.c(win.d[ax] as i64);
        let p = gen.c(win.p[ax]);
        let a = gen.ix("muli", o[ax], &s);
        let b = gen.ix("muli", t[ax], &d);
        let c = gen.ix("addi", &a, &b);
        let v = gen.ix("subi", &c, &p);
        let z = gen.c(0);
        let n = gen.c(size as i64);
        let ge = gen.b.op(&format!("arith.cmpi sge, {v}, {z} : index"));
        let lt = gen.b.op(&format!("arith.cmpi slt, {v}, {n} : index"));
        let ok = gen.b.op(&format!("arith.andi {ge}, {lt} : i1"));
        (v, ok)
    };
    let (ih, okh) = pos(gen, 0, win.h);
    let (iw, okw) = pos(gen, 1, win.w);
    let ok = gen.b.op(&format!("arith.andi {okh}, {okw} : i1"));
    let z = gen.c(0);
    let ihc = gen.b.op(&format!("arith.select {ok}, {ih}, {z} : index"));
    let iwc = gen.b.op(&format!("arith.select {ok}, {iw}, {z} : index"));
    let wc = gen.c(win.w as i64);
    let r0 = gen.ix("muli", &ihc, &wc);
    let r1 = gen.ix("addi", &r0, &iwc);
    (ok, r1)
}

/// `for t in 0..n` with an f32 accumulator: returns (induction var, accumulator, result).
pub(crate) fn open_acc(gen: &mut Gen, n: usize, init: &str) -> (String, String, String) {
    let c0 = gen.c(0);
    let c1 = gen.c(1);
    let cn = gen.c(n as i64);
    let (j, acc, res) = (gen.b.fresh(), gen.b.fresh(), gen.b.fresh());
    gen.b.raw(&format!(
        "{res} = scf.for {j} = {c0} to {cn} step {c1} iter_args({acc} = {init}) -> (f32) {{"
    ));
    (j, acc, res)
}

/// The 2-D window of a pooling node (`what` names it in errors) over input shape `xs`, with
/// output shape `ys`; and, for the output element `%i`, its `[n, c, oh, ow]` indices and
/// the offset of its `(n, c)` input plane.
fn pool_window(
    gen: &mut Gen,
    window: &kiln_ir::ops::nn::WindowAttrs,
    ceil_mode: bool,
    xs: &[usize],
    ys: &[usize],
    what: &str,
) -> Result<(Window2, Vec<String>, String), String> {
    let Some(ks) = window.kernel_shape.clone().filter(|k| k.len() == 2) else {
        return Err(format!("{what} of rank other than 2-D"));
    };
    let win = Window2::new(window, xs, [ks[0], ks[1]], ceil_mode)?;
    if ys != [win.n, win.c, win.oh, win.ow] {
        return Err(format!("{what} shapes do not match"));
    }
    let idx = gen.unravel("%i", ys);
    let plane = gen.c((win.h * win.w) as i64);
    let nc0 = gen.c(win.c as i64);
    let nc1 = gen.ix("muli", &idx[0], &nc0);
    let nc = gen.ix("addi", &nc1, &idx[1]);
    let base = gen.ix("muli", &nc, &plane);
    Ok((win, idx, base))
}

/// Lowers a pooling kernel (see [`handles`]).
pub(crate) fn lower(g: &Graph, k: &fusion::Kernel, name: &str) -> Result<GenKernel, String> {
    let ni = k.nodes[0];
    let node = &g.nodes[ni];
    let x = node_input(g, ni, 0)?;
    let y = node.outputs[0];
    if g.values[x].fact.dtype != kiln_ir::DType::F32 || k.outputs != [y] {
        return Err("pooling of f32 with one output only".into());
    }
    let xs = shape_of(g, x)?;
    let ys = shape_of(g, y)?;
    let mut gen = Gen::default();
    let (xb, _) = gen.value_buf(g, x)?;
    let (yb, _) = gen.value_buf(g, y)?;
    match &node.op {
        Op::Nn(NnOp::MaxPool(a)) => {
            if a.with_indices {
                return Err("MaxPool with Indices".into());
            }
            let (win, idx, base) =
                pool_window(&mut gen, &a.window, a.ceil_mode, &xs, &ys, "MaxPool")?;
            let ninf = gen.b.fc(f32::NEG_INFINITY);
            let saved = gen.consts.clone();
            let (th, acc_h, res_h) = open_acc(&mut gen, win.k[0], &ninf);
            let (tw, acc_w, res_w) = open_acc(&mut gen, win.k[1], &acc_h);
            let (ok, r1) = tap_offset(&mut gen, &win, [&idx[2], &idx[3]], [&th, &tw]);
            let at = gen.ix("addi", &base, &r1);
            let v = gen.load(xb, &at, Ty::F32);
            let m = gen.b.op(&format!("arith.maximumf {acc_w}, {v} : f32"));
            let nv = gen.b.op(&format!("arith.select {ok}, {m}, {acc_w} : f32"));
            gen.b.raw(&format!("scf.yield {nv} : f32"));
            gen.b.raw("}");
            gen.b.raw(&format!("scf.yield {res_w} : f32"));
            gen.b.raw("}");
            gen.consts = saved;
            gen.store(yb, "%i", &res_h, Ty::F32);
            Ok(gen.finish(name, ys.iter().product::<usize>() as u64))
        }
        Op::Nn(NnOp::Pool(a)) => {
            let PoolKind::Average { count_include_pad } = a.kind else {
                return Err("LpPool".into());
            };
            let (win, idx, base) =
                pool_window(&mut gen, &a.window, a.ceil_mode, &xs, &ys, "AveragePool")?;
            let range = win.divisor_ranges(&a.window, a.ceil_mode, count_include_pad)?;
            let zero = gen.b.fc(0.0);
            let one = gen.b.fc(1.0);
            let saved = gen.consts.clone();
            // per-axis count of taps in `range`
            let mut counts = Vec::new();
            for ax in 0..2 {
                let (t, acc, res) = open_acc(&mut gen, win.k[ax], &zero);
                let s = gen.c(win.s[ax] as i64);
                let d = gen.c(win.d[ax] as i64);
                let p = gen.c(win.p[ax]);
                let o = gen.ix("muli", &idx[2 + ax], &s);
                let td = gen.ix("muli", &t, &d);
                let at = gen.ix("addi", &o, &td);
                let v = gen.ix("subi", &at, &p);
                let lo = gen.c(range[ax].0);
                let hi = gen.c(range[ax].1);
                let ge = gen.b.op(&format!("arith.cmpi sge, {v}, {lo} : index"));
                let lt = gen.b.op(&format!("arith.cmpi slt, {v}, {hi} : index"));
                let ok = gen.b.op(&format!("arith.andi {ge}, {lt} : i1"));
                let inc = gen.b.op(&format!("arith.select {ok}, {one}, {zero} : f32"));
                let n = gen.b.f2("addf", &acc, &inc);
                gen.b.raw(&format!("scf.yield {n} : f32"));
                gen.b.raw("}");
                gen.consts = saved.clone();
                counts.push(res);
            }
            let (th, acc_h, res_h) = open_acc(&mut gen, win.k[0], &zero);
            let (tw, acc_w, res_w) = open_acc(&mut gen, win.k[1], &acc_h);
            let (ok, r1) = tap_offset(&mut gen, &win, [&idx[2], &idx[3]], [&th, &tw]);
            let at = gen.ix("addi", &base, &r1);
            let v = gen.load(xb, &at, Ty::F32);
            let sum = gen.b.f2("addf", &acc_w, &v);
            let nv = gen
                .b
                .op(&format!("arith.select {ok}, {sum}, {acc_w} : f32"));
            gen.b.raw(&format!("scf.yield {nv} : f32"));
            gen.b.raw("}");
            gen.b.raw(&format!("scf.yield {res_w} : f32"));
            gen.b.raw("}");
            gen.consts = saved;
            let count = gen.b.f2("mulf", &counts[0], &counts[1]);
            let r = gen.b.f2("divf", &res_h, &count);
            gen.store(yb, "%i", &r, Ty::F32);
            Ok(gen.finish(name, ys.iter().product::<usize>() as u64))
        }
        Op::Nn(NnOp::GlobalPool(kind)) => {
            if xs.len() < 3 {
                return Err("global pooling of rank < 3".into());
            }
            let (nc, hw) = (xs[0] * xs[1], xs[2..].iter().product::<usize>());
            let avg = matches!(kind, PoolKind::Average { .. });
            let init = gen.b.fc(if avg { 0.0 } else { f32::NEG_INFINITY });
            let hwc = gen.c(hw as i64);
            let base = gen.ix("muli", "%i", &hwc);
            let saved = gen.consts.clone();
            let (j, acc, res) = open_acc(&mut gen, hw, &init);
            let at = gen.ix("addi", &base, &j);
            let v = gen.load(xb, &at, Ty::F32);
            let n = if avg {
                gen.b.f2("addf", &acc, &v)
            } else {
                gen.b.op(&format!("arith.maximumf {acc}, {v} : f32"))
            };
            gen.b.raw(&format!("scf.yield {n} : f32"));
            gen.b.raw("}");
            gen.consts = saved;
            let r = if avg {
                let c = gen.b.fc(hw as f32);
                gen.b.f2("divf", &res, &c)
            } else {
                res
            };
            gen.store(yb, "%i", &r, Ty::F32);
            Ok(gen.finish(name, nc as u64))
        }
        other => Err(format!("{} is not pooling", other.op_type())),
    }
}
