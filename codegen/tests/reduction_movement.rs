//! `Reduction` and `DataMovement` kernels lowered by `cpu::lower::lower_partition`, compiled
//! into one library and checked kernel by kernel against the reference interpreter on random
//! inputs, plus the transformer zoo models (every such kernel lowers and matches).

use kiln_ir::ops::array::{ArrayOp, IntsArg};
use kiln_ir::ops::elementwise::{BinaryKind, UnaryKind};
use kiln_ir::ops::nn::{LayerNormAttrs, NnOp, SoftmaxAttrs};
use kiln_ir::ops::reduce::{ReduceAxes, ReduceKind, ReduceOp};
use kiln_ir::{DType, Fact, Node, Op, Shape, Tensor};
use kiln_passes::fusion::KernelKind;

use crate::common;
use common::*;

fn i64s(v: &[i64]) -> Tensor {
    Tensor::from_vec(&[v.len()], v.to_vec())
}

/// Every kernel of `kind` in `r` lowered.
fn all_lowered(r: &Report, kind: KernelKind) {
    let (l, t) = count(r, kind);
    for u in &r.lowering.unsupported {
        eprintln!("{}: {}", r.partition.kernels[u.index].name, u.reason);
    }
    assert!(t > 0, "no {kind:?} kernel");
    assert_eq!(l, t, "{kind:?}");
}

fn reduce(kind: ReduceKind, keepdims: bool) -> Op {
    Op::Reduce(ReduceOp::Reduce {
        kind,
        axes: ReduceAxes::Attr(Some(vec![-1])),
        keepdims,
        noop_with_empty_axes: false,
    })
}

#[test]
fn softmax_with_scale_and_mask_prologue() {
    for log in [false, true] {
        let mut b = Builder::new("softmax");
        let x = b.input("x", DType::F32, &[2, 3, 5, 7]);
        let m = b.input("m", DType::F32, &[2, 1, 1, 7]);
        let s = b.konst("s", Tensor::from_vec(&[], vec![0.125f32]));
        let xs = b.binary(BinaryKind::Mul, x, s);
        let xm = b.binary(BinaryKind::Add, xs, m);
        let a = SoftmaxAttrs {
            axis: -1,
            coerce_2d: false,
        };
        let op = if log {
            Op::Nn(NnOp::LogSoftmax(a))
        } else {
            Op::Nn(NnOp::Softmax(a))
        };
        let y = b.node(op, &[Some(xm)]);
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, 1));
        all_lowered(&r, KernelKind::Reduction);
    }
}

#[test]
fn layer_norm_with_residual_add() {
    let mut b = Builder::new("ln");
    let x = b.input("x", DType::F32, &[2, 5, 16]);
    let res = b.input("res", DType::F32, &[2, 5, 16]);
    let scale = b.input("scale", DType::F32, &[16]);
    let bias = b.input("bias", DType::F32, &[16]);
    let h = b.binary(BinaryKind::Add, x, res);
    let y = b.node(
        Op::Nn(NnOp::LayerNormalization(LayerNormAttrs {
            axis: -1,
            epsilon: 1e-5,
            stash_type: DType::F32,
            num_outputs: 1,
        })),
        &[Some(h), Some(scale), Some(bias)],
    );
    let g = b.finish(&[y, h]);
    let r = check(&g, &random_inputs(&g, 2));
    all_lowered(&r, KernelKind::Reduction);
}

#[test]
fn decomposed_layer_norm_chain() {
    let mut b = Builder::new("dln");
    let x = b.input("x", DType::F32, &[3, 4, 32]);
    let gamma = b.input("gamma", DType::F32, &[32]);
    let beta = b.input("beta", DType::F32, &[32]);
    let two = b.konst("two", Tensor::from_vec(&[], vec![2.0f32]));
    let eps = b.konst("eps", Tensor::from_vec(&[], vec![1e-12f32]));
    let mean = b.node(reduce(ReduceKind::Mean, true), &[Some(x)]);
    let d = b.binary(BinaryKind::Sub, x, mean);
    let sq = b.binary(BinaryKind::Pow, d, two);
    let var = b.node(reduce(ReduceKind::Mean, true), &[Some(sq)]);
    let ve = b.binary(BinaryKind::Add, var, eps);
    let sd = b.unary(UnaryKind::Sqrt, ve);
    let n = b.binary(BinaryKind::Div, d, sd);
    let m = b.binary(BinaryKind::Mul, n, gamma);
    let y = b.binary(BinaryKind::Add, m, beta);
    let g = b.finish(&[y]);
    let r = check(&g, &random_inputs(&g, 3));
    all_lowered(&r, KernelKind::Reduction);
}

#[test]
fn last_axis_reductions_with_and_without_keepdims() {
    for (kind, keep) in [
        (ReduceKind::Sum, true),
        (ReduceKind::Max, false),
        (ReduceKind::Mean, false),
        (ReduceKind::Min, true),
    ] {
        let mut b = Builder::new("red");
        let x = b.input("x", DType::F32, &[4, 6, 9]);
        let e = b.unary(UnaryKind::Exp, x);
        let y = b.node(reduce(kind, keep), &[Some(e)]);
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, 4));
        all_lowered(&r, KernelKind::Reduction);
    }
    // ReduceSum with its axes as an input.
    let mut b = Builder::new("red_in");
    let x = b.input("x", DType::F32, &[5, 8]);
    let axes = b.konst("axes", i64s(&[1]));
    let y = b.node(
        Op::Reduce(ReduceOp::Reduce {
            kind: ReduceKind::Sum,
            axes: ReduceAxes::Input,
            keepdims: true,
            noop_with_empty_axes: false,
        }),
        &[Some(x), Some(axes)],
    );
    let g = b.finish(&[y]);
    let r = check(&g, &random_inputs(&g, 5));
    all_lowered(&r, KernelKind::Reduction);
}

#[test]
fn transpose_gather_concat_slice_expand() {
    let mut b = Builder::new("mv");
    let x = b.input("x", DType::F32, &[2, 3, 4, 5]);
    let t = b.node(
        Op::Array(ArrayOp::Transpose {
            perm: Some(vec![0, 2, 1, 3]),
        }),
        &[Some(x)],
    );
    let t2 = b.node(Op::Array(ArrayOp::Transpose { perm: None }), &[Some(x)]);
    let emb = b.input("emb", DType::F32, &[8, 6]);
    let ids = b.input("ids", DType::I64, &[2, 3]);
    let ga = b.node(
        Op::Array(ArrayOp::Gather { axis: 0 }),
        &[Some(emb), Some(ids)],
    );
    let d3 = b.input("d3", DType::F32, &[3, 9, 4]);
    let ids1 = b.input("ids1", DType::I64, &[5]);
    let g1 = b.node(
        Op::Array(ArrayOp::Gather { axis: 1 }),
        &[Some(d3), Some(ids1)],
    );
    let c1 = b.input("c1", DType::F32, &[2, 3, 5]);
    let c2 = b.input("c2", DType::F32, &[2, 4, 5]);
    let cc = b.node(
        Op::Array(ArrayOp::Concat { axis: 1 }),
        &[Some(c1), Some(c2)],
    );
    let sl = b.node(
        Op::Array(ArrayOp::Slice {
            starts: IntsArg::Attr(vec![-1, 1]),
            ends: IntsArg::Attr(vec![-100, 5]),
            axes: IntsArg::Attr(vec![1, 2]),
            steps: IntsArg::Attr(vec![-2, 2]),
        }),
        &[Some(cc)],
    );
    let e = b.input("e", DType::F32, &[3, 1]);
    let shape = b.konst("shape", i64s(&[2, 3, 4]));
    let ex = b.node(Op::Array(ArrayOp::Expand), &[Some(e), Some(shape)]);
    let g = b.finish(&[t, t2, ga, g1, sl, ex]);
    let r = check(&g, &random_inputs(&g, 6));
    all_lowered(&r, KernelKind::DataMovement);
}

/// Transposes that move the input's contiguous axis inward, large enough to be copied in
/// tiles, with partial tiles at the edges (and one that is not tiled: a dim under 16).
#[test]
fn tiled_transposes() {
    let mut b = Builder::new("tiled");
    let x = b.input("x", DType::F32, &[2, 37, 3, 20]);
    let mut outs = vec![];
    for perm in [
        vec![0, 3, 2, 1],
        vec![3, 1, 0, 2],
        vec![0, 2, 3, 1],
        vec![1, 0, 3, 2],
    ] {
        outs.push(b.node(
            Op::Array(ArrayOp::Transpose { perm: Some(perm) }),
            &[Some(x)],
        ));
    }
    let y = b.input("y", DType::F32, &[16, 48]);
    outs.push(b.node(Op::Array(ArrayOp::Transpose { perm: None }), &[Some(y)]));
    let g = b.finish(&outs);
    let r = check(&g, &random_inputs(&g, 7));
    all_lowered(&r, KernelKind::DataMovement);
}

#[test]
fn split_into_parts() {
    let mut b = Builder::new("split");
    let x = b.input("x", DType::F32, &[2, 7, 3]);
    let n = b.g.nodes.len();
    let o0 = b.g.add_value("s0", Fact::new(DType::F32, Shape(vec![])));
    let o1 = b.g.add_value("s1", Fact::new(DType::F32, Shape(vec![])));
    b.g.nodes.push(Node {
        name: format!("n{n}"),
        op: Op::Array(ArrayOp::Split {
            axis: 1,
            split: IntsArg::Attr(vec![3, 4]),
            outputs: 2,
        }),
        inputs: vec![Some(x)],
        outputs: vec![o0, o1],
    });
    let g = b.finish(&[o0, o1]);
    let r = check(&g, &random_inputs(&g, 7));
    all_lowered(&r, KernelKind::DataMovement);
}

#[test]
fn zoo_transformers_lower_fully() {
    for name in ["bert", "gpt"] {
        let (g, inputs) = zoo(name);
        let rep = check(&g, &inputs);
        for kind in [KernelKind::Reduction, KernelKind::DataMovement] {
            let (l, t) = count(&rep, kind);
            eprintln!("{name}: {kind:?} {l}/{t}");
        }
        for u in &rep.lowering.unsupported {
            let k = &rep.partition.kernels[u.index];
            eprintln!("  {} {:?}: {}", k.name, k.kind, u.reason);
            assert_eq!(k.kind, KernelKind::Alias, "{name} {}: {}", k.name, u.reason);
        }
    }
}
