//! `Contraction` kernels whose contraction is a 2-D `Conv` (NCHW, f32, static shapes, any
//! stride/padding/dilation/group), with a bias and a fused elementwise epilogue.
//!
//! * `group = 1`: per batch image, the input is unfolded (im2col) into a scratch buffer
//!   `cols[Cin·kh·kw, OH·OW]` allocated inside the kernel, then the packed matmul of
//!   [`crate::cpu::matmul`] computes `W[Cout, Cin·kh·kw] · cols` straight into the image's
//!   rows of the output (viewed as `[N·Cout, OH·OW]`). A 1×1 convolution with unit strides
//!   and no padding skips the unfolding: the input image already is `cols`.
//! * Other groups (depthwise included): a direct `scf.for` loop nest, accumulating the taps
//!   of each output element (padding taps are skipped).
//!
//! The bias and the epilogue nodes then run as one `linalg.generic` over the output shape,
//! in place, like [`super::contraction`] does for `MatMul`.

use super::elementwise::InputKind;
use super::elementwise::{classify_input, emit_generic, Body, GenericInput, GenericOutput};
use super::{Lowered, SymDims, Ty, GRAPH_KERNEL_PIPELINE};
use crate::cpu::abi::{Dim as PDim, Prologue};
use crate::cpu::matmul::{matmul_memref_func, MatmulSchedule, STRIDED_2D};
use crate::cpu::{Kernel, KernelSignature};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{DType, Dim, Graph, Op, ValueId};
use kiln_passes::fusion;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Loop-nest text with fresh SSA names and index constants hoisted to the function body.
#[derive(Debug, Default)]
pub(crate) struct Loops {
    /// Constant definitions (emitted before [`Loops::text`]).
    consts: String,
    cache: HashMap<String, String>,
    /// The loop nest.
    pub(crate) text: String,
    next: usize,
}

impl Loops {
    /// A fresh SSA name `%<stem>N`.
    pub(crate) fn fresh(&mut self, stem: &str) -> String {
        self.next += 1;
        format!("%lp_{stem}{}", self.next)
    }

    /// Emits `%xN = rhs` and returns `%xN`.
    pub(crate) fn op(&mut self, rhs: &str) -> String {
        let v = self.fresh("x");
        let _ = writeln!(self.text, "  {v} = {rhs}");
        v
    }

    /// Emits a line as is.
    pub(crate) fn line(&mut self, l: &str) {
        let _ = writeln!(self.text, "  {l}");
    }

    /// A hoisted constant of type `ty` with literal `lit`.
    fn konst(&mut self, lit: &str, ty: &str) -> String {
        let key = format!("{lit}:{ty}");
        if let Some(v) = self.cache.get(&key) {
            return v.clone();
        }
        self.next += 1;
        let v = format!("%lp_k{}", self.next);
        let _ = writeln!(self.consts, "  {v} = arith.constant {lit} : {ty}");
        self.cache.insert(key, v.clone());
        v
    }

    /// An `index` constant.
    pub(crate) fn c(&mut self, x: i64) -> String {
        self.konst(&x.to_string(), "index")
    }

    /// An `f32` constant (bit-exact).
    pub(crate) fn f(&mut self, x: f32) -> String {
        self.konst(&format!("0x{:08X}", x.to_bits()), "f32")
    }

    /// Opens `scf.for %i = 0 to n step 1` and returns `%i`.
    pub(crate) fn open(&mut self, n: usize) -> String {
        let (z, one, hi) = (self.c(0), self.c(1), self.c(n as i64));
        let i = self.fresh("i");
        self.line(&format!("scf.for {i} = {z} to {hi} step {one} {{"));
        i
    }

    /// Opens `scf.for %i = 0 to n step 1 iter_args(%a = init) -> f32`; returns `(%i, %a,
    /// %r)`, `%r` being the loop's result once [`Loops::close_acc`] closes it.
    pub(crate) fn open_acc(&mut self, n: usize, init: &str) -> (String, String, String) {
        let (z, one, hi) = (self.c(0), self.c(1), self.c(n as i64));
        let i = self.fresh("i");
        let a = self.fresh("a");
        let r = self.fresh("r");
        self.line(&format!(
            "{r} = scf.for {i} = {z} to {hi} step {one} iter_args({a} = {init}) -> (f32) {{"
        ));
        (i, a, r)
    }

    /// Closes an accumulating loop (see [`Loops::open_acc`]) yielding `v`.
    pub(crate) fn close_acc(&mut self, v: &str) {
        self.line(&format!("scf.yield {v} : f32\n  }}"));
    }

    /// Closes a loop.
    pub(crate) fn close(&mut self) {
        self.line("}");
    }

    /// `a * x + b` on `index` values with constants `x`, `b`.
    pub(crate) fn affine(&mut self, a: &str, x: i64, b: i64) -> String {
        let mut v = a.to_string();
        if x != 1 {
            let c = self.c(x);
            v = self.op(&format!("arith.muli {v}, {c} : index"));
        }
        if b != 0 {
            let c = self.c(b);
            v = self.op(&format!("arith.addi {v}, {c} : index"));
        }
        v
    }

    /// `a + b` on `index` values.
    pub(crate) fn add(&mut self, a: &str, b: &str) -> String {
        self.op(&format!("arith.addi {a}, {b} : index"))
    }

    /// `0 <= v < n` (signed) as an `i1`.
    pub(crate) fn in_range(&mut self, v: &str, n: usize) -> String {
        let (z, hi) = (self.c(0), self.c(n as i64));
        let lo = self.op(&format!("arith.cmpi sge, {v}, {z} : index"));
        let up = self.op(&format!("arith.cmpi slt, {v}, {hi} : index"));
        self.op(&format!("arith.andi {lo}, {up} : i1"))
    }

    /// The constants followed by the loop nest.
    pub(crate) fn finish(self) -> String {
        self.consts + &self.text
    }
}

/// Geometry of a 2-D sliding window over a static NCHW input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window2 {
    /// Batch, channels, height, width of the input.
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    /// Output height and width.
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    /// Kernel, strides, dilations, begin pads (height, width).
    pub(crate) k: [usize; 2],
    pub(crate) s: [usize; 2],
    pub(crate) d: [usize; 2],
    pub(crate) p: [i64; 2],
}

impl Window2 {
    /// The window of `attrs` over input `x` with kernel `k`.
    pub(crate) fn new(
        attrs: &kiln_ir::ops::nn::WindowAttrs,
        x: &[usize],
        k: [usize; 2],
        ceil_mode: bool,
    ) -> Result<Window2, String> {
        if x.len() != 4 {
            return Err(format!("input of rank {} (2-D NCHW only)", x.len()));
        }
        let ah = attrs.axis(0, 2, x[2], k[0], ceil_mode)?;
        let aw = attrs.axis(1, 2, x[3], k[1], ceil_mode)?;
        Ok(Window2 {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            oh: ah.output,
            ow: aw.output,
            k,
            s: [ah.stride, aw.stride],
            d: [ah.dilation, aw.dilation],
            p: [ah.pad_begin, aw.pad_begin],
        })
    }

    /// The input row (or column, `axis` 1) read by output `o` and tap `t`, and whether it is
    /// inside the input.
    pub(crate) fn tap(&self, l: &mut Loops, axis: usize, o: &str, t: &str) -> (String, String) {
        let a = l.affine(o, self.s[axis] as i64, -self.p[axis]);
        let b = l.affine(t, self.d[axis] as i64, 0);
        let v = l.add(&a, &b);
        let size = if axis == 0 { self.h } else { self.w };
        let ok = l.in_range(&v, size);
        (v, ok)
    }
}

/// The static shape of a value.
pub(crate) fn known(g: &Graph, v: ValueId) -> Result<Vec<usize>, String> {
    g.values[v]
        .fact
        .shape
        .dims()
        .iter()
        .map(Dim::known)
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| format!("value '{}' has symbolic dims", g.values[v].name))
}

/// Whether `k` is a contraction whose main node is a `Conv`.
pub(crate) fn is_conv(g: &Graph, k: &fusion::Kernel) -> bool {
    k.nodes
        .iter()
        .any(|&n| matches!(g.nodes[n].op, Op::Nn(NnOp::Conv(_))))
}

/// Static dims as prologue dims.
fn cdims(d: &[usize]) -> Vec<PDim> {
    d.iter().map(|&x| PDim::Const(x as i64)).collect()
}

/// Lowers a `Contraction` kernel whose contraction is a `Conv` (see the module doc).
pub(crate) fn lower(g: &Graph, k: &fusion::Kernel, name: &str) -> Result<Lowered, String> {
    let ci = k
        .nodes
        .iter()
        .copied()
        .find(|&n| matches!(g.nodes[n].op, Op::Nn(NnOp::Conv(_))))
        .ok_or("no Conv in the kernel")?;
    let cn = &g.nodes[ci];
    let Op::Nn(NnOp::Conv(attrs)) = &cn.op else {
        unreachable!()
    };
    let (Some(x_v), Some(w_v)) = (cn.inputs[0], cn.inputs[1]) else {
        return Err("missing Conv operand".into());
    };
    let b_v = cn.inputs.get(2).copied().flatten();
    let y_v = cn.outputs[0];
    for v in [x_v, w_v, y_v].into_iter().chain(b_v) {
        if g.values[v].fact.dtype != DType::F32 {
            return Err(format!(
                "Conv on {} (f32 only)",
                g.values[v].fact.dtype.name()
            ));
        }
    }
    let xs = known(g, x_v)?;
    let ws = known(g, w_v)?;
    let ys = known(g, y_v)?;
    if ws.len() != 4 || xs.len() != 4 {
        return Err("Conv of rank other than 2-D".into());
    }
    let win = Window2::new(&attrs.window, &xs, [ws[2], ws[3]], false)?;
    let group = attrs.group;
    let m = ws[0];
    if ys != [win.n, m, win.oh, win.ow] || win.c % group != 0 || m % group != 0 {
        return Err("Conv shapes do not match".into());
    }
    let y_s = g.values[y_v].fact.shape.dims().to_vec();
    for &n in &k.nodes {
        if n != ci
            && g.nodes[n]
                .outputs
                .iter()
                .any(|&o| g.values[o].fact.shape.dims() != y_s)
        {
            return Err(format!(
                "epilogue node '{}' has another shape than the Conv",
                g.nodes[n].name
            ));
        }
    }
    let epi_nodes: Vec<usize> = k.nodes.iter().copied().filter(|&n| n != ci).collect();
    let mut syms = SymDims::default();
    let mut p = Prologue::new();
    let mut body = Body::default();
    let mut args = vec![x_v, w_v];
    let mut ins = Vec::new();
    let (kk, pp) = (win.c / group * win.k[0] * win.k[1], win.oh * win.ow);
    let pointwise = group == 1
        && win.k == [1, 1]
        && win.s == [1, 1]
        && win.p == [0, 0]
        && (win.oh, win.ow) == (win.h, win.w);
    let (x_mem, w_mem) = if group == 1 {
        let x = if pointwise {
            p.memref_f32(0, &cdims(&[win.n * win.c, win.h * win.w]))
        } else {
            p.memref_f32(0, &cdims(&xs))
        };
        (x, p.memref_f32(1, &cdims(&[m, kk])))
    } else {
        (p.memref_f32(0, &cdims(&xs)), p.memref_f32(1, &cdims(&ws)))
    };
    if let Some(b) = b_v {
        let memref = p.memref_f32(args.len(), &cdims(&[m]));
        args.push(b);
        ins.push(GenericInput {
            value: b,
            memref,
            dims: vec![1],
            ty: Ty::F32,
        });
    }
    for &v in &k.inputs {
        if v == x_v || v == w_v || Some(v) == b_v {
            let used = epi_nodes
                .iter()
                .any(|&n| g.nodes[n].inputs.contains(&Some(v)));
            if used {
                return Err("a Conv operand is also used by the epilogue".into());
            }
            continue;
        }
        let ty = Ty::of(g.values[v].fact.dtype)?;
        match classify_input(g, v, &y_s)? {
            InputKind::Scalar(x) => body.bind_const(v, x, ty),
            InputKind::Buffer(dims) => {
                let sd: Vec<Dim> = dims.iter().map(|&d| y_s[d].clone()).collect();
                let memref = p.memref(args.len(), &syms.dims(&sd)?, ty.storage());
                args.push(v);
                ins.push(GenericInput {
                    value: v,
                    memref,
                    dims,
                    ty,
                });
            }
        }
    }
    let full = syms.dims(&y_s)?;
    let mut outs = Vec::new();
    for (i, &v) in k.outputs.iter().enumerate() {
        let ty = Ty::of(g.values[v].fact.dtype)?;
        let memref = p.memref(args.len() + i, &full, ty.storage());
        outs.push(GenericOutput {
            value: v,
            memref,
            ty,
        });
    }
    let pi = outs
        .iter()
        .position(|o| o.ty == Ty::F32)
        .ok_or("no f32 output to hold the convolution")?;
    let out_arg = args.len() + pi;
    let mm = format!("{name}_mm");
    let mut l = Loops::default();
    if group == 1 {
        let y2 = p.memref_f32(out_arg, &cdims(&[win.n * m, pp]));
        let st = STRIDED_2D;
        let dyn2 = "memref<?x?xf32>";
        let wc = l.op(&format!("memref.cast {w_mem} : {dyn2} to {st}"));
        let cols = if pointwise {
            None
        } else {
            let (ck, cp) = (l.c(kk as i64), l.c(pp as i64));
            let c = l.op(&format!(
                "memref.alloc({ck}, {cp}) {{alignment = 64 : i64}} : {dyn2}"
            ));
            let cc = l.op(&format!("memref.cast {c} : {dyn2} to {st}"));
            Some((c, cc))
        };
        let n = l.open(win.n);
        let xcols = match &cols {
            None => {
                let r = l.affine(&n, win.c as i64, 0);
                let (cc, cp) = (l.c(win.c as i64), l.c(pp as i64));
                l.op(&format!(
                    "memref.subview {x_mem}[{r}, 0] [{cc}, {cp}] [1, 1] : {dyn2} to {st}"
                ))
            }
            Some((c, cc)) => {
                // im2col: cols[(ci·kh + ki)·kw + kj, oh·OW + ow] = x[n, ci, ih, iw] or 0.
                let ch = l.open(win.c);
                let ki = l.open(win.k[0]);
                let kj = l.open(win.k[1]);
                let r0 = l.affine(&ch, win.k[0] as i64, 0);
                let r1 = l.add(&r0, &ki);
                let r2 = l.affine(&r1, win.k[1] as i64, 0);
                let row = l.add(&r2, &kj);
                let oh = l.open(win.oh);
                let (ih, okh) = win.tap(&mut l, 0, &oh, &ki);
                let cb = l.affine(&oh, win.ow as i64, 0);
                let ow = l.open(win.ow);
                let (iw, okw) = win.tap(&mut l, 1, &ow, &kj);
                let ok = l.op(&format!("arith.andi {okh}, {okw} : i1"));
                let zero = l.f(0.0);
                let v = l.fresh("x");
                let ld = l.fresh("x");
                l.line(&format!(
                    "{v} = scf.if {ok} -> (f32) {{\n    {ld} = memref.load {x_mem}[{n}, {ch}, {ih}, {iw}] : memref<?x?x?x?xf32>\n    scf.yield {ld} : f32\n  }} else {{\n    scf.yield {zero} : f32\n  }}"
                ));
                let col = l.add(&cb, &ow);
                l.line(&format!("memref.store {v}, {c}[{row}, {col}] : {dyn2}"));
                for _ in 0..5 {
                    l.close();
                }
                cc.clone()
            }
        };
        let r = l.affine(&n, m as i64, 0);
        let (cm, cp) = (l.c(m as i64), l.c(pp as i64));
        let yv = l.op(&format!(
            "memref.subview {y2}[{r}, 0] [{cm}, {cp}] [1, 1] : {dyn2} to {st}"
        ));
        l.line(&format!(
            "func.call @{mm}({wc}, {xcols}, {yv}) : ({st}, {st}, {st}) -> ()"
        ));
        l.close();
        if let Some((c, _)) = cols {
            l.line(&format!("memref.dealloc {c} : {dyn2}"));
        }
    } else {
        // Direct loop nest: y[n, o, oh, ow] = Σ x[n, g·cg + c, ih, iw] · w[o, c, ki, kj].
        let y = &outs[pi].memref;
        let t4 = "memref<?x?x?x?xf32>";
        let (cg, mg) = (win.c / group, m / group);
        let n = l.open(win.n);
        let o = l.open(m);
        let mgc = l.c(mg as i64);
        let gi = l.op(&format!("arith.divui {o}, {mgc} : index"));
        let base = l.affine(&gi, cg as i64, 0);
        let oh = l.open(win.oh);
        let ow = l.open(win.ow);
        let zero = l.f(0.0);
        let (c, a0, r0) = l.open_acc(cg, &zero);
        let ch = l.add(&base, &c);
        let (ki, a1, r1) = l.open_acc(win.k[0], &a0);
        let (ih, okh) = win.tap(&mut l, 0, &oh, &ki);
        let (kj, a2, r2) = l.open_acc(win.k[1], &a1);
        let (iw, okw) = win.tap(&mut l, 1, &ow, &kj);
        let ok = l.op(&format!("arith.andi {okh}, {okw} : i1"));
        let (v, xv, wv, s) = (l.fresh("x"), l.fresh("x"), l.fresh("x"), l.fresh("x"));
        l.line(&format!(
            "{v} = scf.if {ok} -> (f32) {{\n    {xv} = memref.load {x_mem}[{n}, {ch}, {ih}, {iw}] : {t4}\n    {wv} = memref.load {w_mem}[{o}, {c}, {ki}, {kj}] : {t4}\n    {s} = math.fma {xv}, {wv}, {a2} : f32\n    scf.yield {s} : f32\n  }} else {{\n    scf.yield {a2} : f32\n  }}"
        ));
        l.close_acc(&v);
        l.close_acc(&r2);
        l.close_acc(&r1);
        l.line(&format!(
            "memref.store {r0}, {y}[{n}, {o}, {oh}, {ow}] : {t4}"
        ));
        for _ in 0..4 {
            l.close();
        }
    }
    let mut t = l.finish();
    let need_generic = !epi_nodes.is_empty() || b_v.is_some() || outs.len() > 1;
    if need_generic {
        ins.insert(
            0,
            GenericInput {
                value: y_v,
                memref: outs[pi].memref.clone(),
                dims: (0..y_s.len()).collect(),
                ty: Ty::F32,
            },
        );
        let text = emit_generic(g, y_s.len(), &ins, &outs, body, &epi_nodes, |b| {
            let (mut y, _) = b.get(y_v, g)?;
            if let Some(bv) = b_v {
                let (bias, _) = b.get(bv, g)?;
                y = b.f2("addf", &y, &bias);
            }
            b.vals.insert(y_v, (y, Ty::F32));
            Ok(())
        })?;
        t.push_str(&text);
    } else if k.outputs != [y_v] {
        return Err("Conv output is not the kernel output".into());
    }
    p.push(&t);
    let mut mlir = p.finish(name);
    if group == 1 {
        mlir.push_str(&matmul_memref_func(&mm, &MatmulSchedule::default()));
    }
    let kernel = Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: args.len(),
            outputs: outs.len(),
            dims: syms.0,
            tasks: 1,
        },
        mlir,
        pipeline: GRAPH_KERNEL_PIPELINE.to_string(),
    };
    Ok((kernel, args, k.outputs.clone()))
}
