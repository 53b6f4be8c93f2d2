//! Pooling kernels as `scf.for` loop nests over static NCHW f32 buffers:
//!
//! * an `Opaque` kernel made of one 2-D `MaxPool` (kernel, strides, pads, dilations,
//!   `ceil_mode`; no `Indices` output): the maximum of the window taps inside the input;
//! * a `Reduction` kernel made of one `GlobalAveragePool` or `GlobalMaxPool` (any rank ≥ 3):
//!   the mean (maximum) of each `[n, c]` plane.

use super::conv::{known, Loops, Window2};
use super::{Lowered, GRAPH_KERNEL_PIPELINE};
use crate::cpu::abi::{Dim as PDim, Prologue};
use crate::cpu::{Kernel, KernelSignature};
use kiln_ir::ops::nn::{NnOp, PoolKind};
use kiln_ir::{DType, Graph, Op};
use kiln_passes::fusion;

/// Whether `k` is a single pooling node this module lowers.
pub(crate) fn handles(g: &Graph, k: &fusion::Kernel) -> bool {
    k.nodes.len() == 1
        && matches!(
            g.nodes[k.nodes[0]].op,
            Op::Nn(NnOp::MaxPool(_))
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
    match &node.op {
        Op::Nn(NnOp::MaxPool(a)) => {
            if a.with_indices {
                return Err("MaxPool with Indices".into());
            }
            let Some(ks) = a.window.kernel_shape.clone().filter(|k| k.len() == 2) else {
                return Err("MaxPool of rank other than 2-D".into());
            };
            let win = Window2::new(&a.window, &xs, [ks[0], ks[1]], a.ceil_mode)?;
            if ys != [win.n, win.c, win.oh, win.ow] {
                return Err("MaxPool shapes do not match".into());
            }
            let x = p.memref_f32(0, &cd(&xs));
            let y = p.memref_f32(1, &cd(&ys));
            let t4 = "memref<?x?x?x?xf32>";
            let n = l.open(win.n);
            let c = l.open(win.c);
            let oh = l.open(win.oh);
            let ow = l.open(win.ow);
            let ninf = l.f(f32::NEG_INFINITY);
            let (ki, a0, r0) = l.open_acc(win.k[0], &ninf);
            let (ih, okh) = win.tap(&mut l, 0, &oh, &ki);
            let (kj, a1, r1) = l.open_acc(win.k[1], &a0);
            let (iw, okw) = win.tap(&mut l, 1, &ow, &kj);
            let ok = l.op(&format!("arith.andi {okh}, {okw} : i1"));
            let (v, xv, m) = (l.fresh("x"), l.fresh("x"), l.fresh("x"));
            l.line(&format!(
                "{v} = scf.if {ok} -> (f32) {{\n    {xv} = memref.load {x}[{n}, {c}, {ih}, {iw}] : {t4}\n    {m} = arith.maximumf {xv}, {a1} : f32\n    scf.yield {m} : f32\n  }} else {{\n    scf.yield {a1} : f32\n  }}"
            ));
            l.close_acc(&v);
            l.close_acc(&r1);
            l.line(&format!(
                "memref.store {r0}, {y}[{n}, {c}, {oh}, {ow}] : {t4}"
            ));
            for _ in 0..4 {
                l.close();
            }
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
    p.push(&l.finish());
    let kernel = Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: 1,
            outputs: 1,
            dims: vec![],
            tasks: 1,
        },
        mlir: p.finish(name),
        pipeline: GRAPH_KERNEL_PIPELINE.to_string(),
    };
    Ok((kernel, vec![x_v], vec![y_v]))
}
