//! Property tests: random shapes (and attributes) for the MatMul, Gemm, Softmax and
//! LayerNormalization kernels, each compiled and checked against the reference interpreter
//! by the shared harness (which also runs every task-split kernel as three task ranges).
//! Conv has its own random-shape test in `conv_pool_kernels.rs`.
//!
//! Each case compiles a kernel with LLVM, so the case counts are small; raise them with
//! `PROPTEST_CASES=N`.

use kiln_ir::ops::elementwise::{BinaryKind, UnaryKind};
use kiln_ir::ops::linalg::{Gemm, LinalgOp};
use kiln_ir::ops::nn::{LayerNormAttrs, NnOp, SoftmaxAttrs};
use kiln_ir::{DType, Op};
use kiln_passes::fusion::KernelKind;
use proptest::prelude::*;
use rand::SeedableRng;

use crate::common;
use common::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

/// Every kernel of `kind` lowered (and, by `check`, matching the interpreter).
fn all_lowered(r: &Report, kind: KernelKind) {
    let (l, t) = count(r, kind);
    assert!(t > 0, "no {kind:?} kernel");
    assert_eq!(l, t, "{kind:?}: {:?}", r.lowering.unsupported);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// `relu?(A·B + bias?)` with A of rank 2 or 3 and random M, K, N.
    #[test]
    fn matmul_random_shapes(
        batch in 0usize..3,
        m in 1usize..40,
        k in 1usize..70,
        n in 1usize..50,
        bias in any::<bool>(),
        relu in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut b = Builder::new("mm");
        let a_shape: Vec<usize> = if batch == 0 { vec![m, k] } else { vec![batch, m, k] };
        let x = b.input("x", DType::F32, &a_shape);
        let w = b.konst("w", random_tensor(DType::F32, &[k, n], &mut rng));
        let mut y = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
        if bias {
            let c = b.konst("c", random_tensor(DType::F32, &[n], &mut rng));
            y = b.binary(BinaryKind::Add, y, c);
        }
        if relu {
            y = b.unary(UnaryKind::Relu, y);
        }
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, seed));
        all_lowered(&r, KernelKind::Contraction);
    }

    /// Gemm with random transposes, alpha, beta and C broadcast.
    #[test]
    fn gemm_random_attributes(
        m in 1usize..30,
        k in 1usize..40,
        n in 1usize..40,
        trans_a in any::<bool>(),
        trans_b in any::<bool>(),
        alpha in -2.0f32..2.0,
        beta in -2.0f32..2.0,
        c_kind in 0usize..3,
        seed in any::<u64>(),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut b = Builder::new("gemm");
        let a_shape = if trans_a { [k, m] } else { [m, k] };
        let b_shape = if trans_b { [n, k] } else { [k, n] };
        let x = b.input("x", DType::F32, &a_shape);
        let w = b.konst("w", random_tensor(DType::F32, &b_shape, &mut rng));
        let mut inputs = vec![Some(x), Some(w)];
        match c_kind {
            1 => inputs.push(Some(b.konst("c", random_tensor(DType::F32, &[n], &mut rng)))),
            2 => inputs.push(Some(b.konst("c", random_tensor(DType::F32, &[m, n], &mut rng)))),
            _ => {}
        }
        let y = b.node(
            Op::Linalg(LinalgOp::Gemm(Gemm { alpha, beta, trans_a, trans_b })),
            &inputs,
        );
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, seed));
        all_lowered(&r, KernelKind::Contraction);
    }

    /// Softmax / LogSoftmax over the last axis of a random rank-1..4 shape.
    #[test]
    fn softmax_random_shapes(
        dims in proptest::collection::vec(1usize..6, 0..3),
        last in 1usize..80,
        log in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut shape = dims;
        shape.push(last);
        let mut b = Builder::new("softmax");
        let x = b.input("x", DType::F32, &shape);
        let a = SoftmaxAttrs { axis: -1, coerce_2d: false };
        let op = if log { Op::Nn(NnOp::LogSoftmax(a)) } else { Op::Nn(NnOp::Softmax(a)) };
        let y = b.node(op, &[Some(x)]);
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, seed));
        all_lowered(&r, KernelKind::Reduction);
    }

    /// LayerNormalization over the last axis with random scale, bias and epsilon.
    #[test]
    fn layer_norm_random_shapes(
        dims in proptest::collection::vec(1usize..6, 0..3),
        last in 1usize..80,
        epsilon in 1e-6f32..1e-2,
        with_bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut shape = dims;
        shape.push(last);
        let mut b = Builder::new("ln");
        let x = b.input("x", DType::F32, &shape);
        let scale = b.konst("scale", random_tensor(DType::F32, &[last], &mut rng));
        let mut inputs = vec![Some(x), Some(scale)];
        if with_bias {
            inputs.push(Some(b.konst("bias", random_tensor(DType::F32, &[last], &mut rng))));
        }
        let y = b.node(
            Op::Nn(NnOp::LayerNormalization(LayerNormAttrs {
                axis: -1,
                epsilon,
                stash_type: DType::F32,
                num_outputs: 1,
            })),
            &inputs,
        );
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, seed));
        all_lowered(&r, KernelKind::Reduction);
    }
}

/// The task count of each lowered kernel of `r`.
fn task_counts(r: &Report) -> Vec<u64> {
    r.lowering
        .kernels
        .iter()
        .map(|k| k.kernel.signature.tasks)
        .collect()
}

/// Products above the task-split threshold are split into row tasks (the harness runs them
/// as three task ranges); rank-3 A with a fused bias + GELU epilogue and a residual.
#[test]
fn large_matmul_splits_into_row_tasks() {
    use kiln_ir::ops::elementwise::GeluApprox;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut b = Builder::new("mm_split");
    let x = b.input("x", DType::F32, &[2, 37, 96]);
    let res = b.input("res", DType::F32, &[2, 37, 130]);
    let w = b.konst("w", random_tensor(DType::F32, &[96, 130], &mut rng));
    let c = b.konst("c", random_tensor(DType::F32, &[130], &mut rng));
    let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
    let a = b.binary(BinaryKind::Add, mm, c);
    let gl = b.unary(
        UnaryKind::Gelu {
            approximate: GeluApprox::Tanh,
        },
        a,
    );
    let y = b.binary(BinaryKind::Add, gl, res);
    let g = b.finish(&[y]);
    let r = check(&g, &random_inputs(&g, 3));
    all_lowered(&r, KernelKind::Contraction);
    let tasks = task_counts(&r);
    assert_eq!(tasks, vec![74], "one task per product row");
}

/// One-row products (GEMV) above the threshold split into column tasks over B packed in
/// blocks of the task width (the harness runs them as three task ranges, the last past the
/// end): ragged widths, a fused bias + ReLU, a residual row, an output kept on the way, a
/// rank-3 `[1, 1, K]` A.
#[test]
fn one_row_matmul_splits_into_column_tasks() {
    for (i, (k, n, rank3)) in [(512, 512, false), (300, 1000, true), (4096, 77, false)]
        .into_iter()
        .enumerate()
    {
        let mut rng = rand::rngs::StdRng::seed_from_u64(20 + i as u64);
        let mut b = Builder::new("mm_cols");
        let xs: &[usize] = if rank3 { &[1, 1, k] } else { &[1, k] };
        let ys: &[usize] = if rank3 { &[1, 1, n] } else { &[1, n] };
        let x = b.input("x", DType::F32, xs);
        let res = b.input("res", DType::F32, ys);
        let w = b.konst("w", random_tensor(DType::F32, &[k, n], &mut rng));
        let c = b.konst("c", random_tensor(DType::F32, &[n], &mut rng));
        let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
        let a = b.binary(BinaryKind::Add, mm, c);
        let r = b.unary(UnaryKind::Relu, a);
        let y = b.binary(BinaryKind::Add, r, res);
        let g = b.finish(&[a, y]);
        let rep = check(&g, &random_inputs(&g, 5));
        all_lowered(&rep, KernelKind::Contraction);
        let tasks = rep.lowering.kernels[0].kernel.signature.tasks;
        // 8 tasks of 64 and 128 columns; 3 of 32 for the narrow one (one panel each: a
        // one-row product's register tile is 1 × 4 vectors)
        let want = if n == 77 { 3 } else { 8 };
        assert_eq!(tasks, want, "{k}x{n}: column tasks");
    }
}

/// Row-wise kernels of at least 2¹⁶ elements split into one task per row (the harness runs
/// them as three task ranges, the last past the end): a Softmax over BERT's attention
/// scores `[12, 128, 128]` (rank 3: each row's indices recovered from the flat task index)
/// and a LayerNorm over `[128, 768]`; small ones stay serial.
#[test]
fn big_row_wise_kernels_split_into_row_tasks() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let cases: [(&[usize], bool, u64); 3] = [
        (&[12, 128, 128], false, 1536),
        (&[128, 768], true, 128),
        (&[4, 64], false, 1),
    ];
    for (shape, layer_norm, want) in cases {
        let mut b = Builder::new("rows");
        let x = b.input("x", DType::F32, shape);
        let last = shape[shape.len() - 1];
        let y = if layer_norm {
            let scale = b.konst("scale", random_tensor(DType::F32, &[last], &mut rng));
            let bias = b.konst("bias", random_tensor(DType::F32, &[last], &mut rng));
            b.node(
                Op::Nn(NnOp::LayerNormalization(LayerNormAttrs {
                    axis: -1,
                    epsilon: 1e-5,
                    stash_type: DType::F32,
                    num_outputs: 1,
                })),
                &[Some(x), Some(scale), Some(bias)],
            )
        } else {
            let a = SoftmaxAttrs {
                axis: -1,
                coerce_2d: false,
            };
            b.node(Op::Nn(NnOp::Softmax(a)), &[Some(x)])
        };
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, 9));
        all_lowered(&r, KernelKind::Reduction);
        let tasks = task_counts(&r);
        assert_eq!(tasks, vec![want], "{shape:?}");
    }
}

/// Elementwise kernels of at least 2¹⁶ elements split into tasks along their first axis of
/// size ≥ 2 (the harness runs three task ranges, the last past the end): an NCHW
/// `relu(x · s + b)` with a per-channel broadcast `[1, C, 1, 1]` (split along C) and a
/// last-axis broadcast, a `[3, 200, 120]` add (split along the batch), a small one serial.
#[test]
fn big_elementwise_kernels_split_into_tasks() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let cases: [(&[usize], u64); 3] = [
        (&[1, 64, 32, 32], 64),
        (&[3, 200, 120], 3),
        (&[1, 8, 16], 1),
    ];
    for (shape, want) in cases {
        let mut b = Builder::new("ew");
        let x = b.input("x", DType::F32, shape);
        let r = shape.len();
        let mut chan = vec![1; r];
        chan[r.min(2) - 1] = shape[r.min(2) - 1];
        let s = b.input("s", DType::F32, &chan);
        let last = b.konst("last", random_tensor(DType::F32, &[shape[r - 1]], &mut rng));
        let m = b.binary(BinaryKind::Mul, x, s);
        let a = b.binary(BinaryKind::Add, m, last);
        let y = b.unary(UnaryKind::Relu, a);
        let g = b.finish(&[y]);
        let rep = check(&g, &random_inputs(&g, 3));
        all_lowered(&rep, KernelKind::Elementwise);
        let tasks = task_counts(&rep);
        assert_eq!(tasks, vec![want], "{shape:?}");
    }
}
