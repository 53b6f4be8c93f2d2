//! Graph kernels lowered by `cpu::lower::lower_partition`, compiled into one library and
//! checked kernel by kernel against the reference interpreter on the same inputs.

use kiln_ir::ops::elementwise::{
    BinaryKind, ClipBounds, CompareKind, ElementwiseOp, GeluApprox, UnaryKind, VariadicKind,
};
use kiln_ir::ops::linalg::{Gemm, LinalgOp};
use kiln_ir::{DType, Op, Tensor};
use kiln_passes::fusion::KernelKind;
use rand::SeedableRng;

use crate::common;
use common::*;

#[test]
fn elementwise_chain_with_broadcasting_and_constants() {
    let mut b = Builder::new("ew");
    let x = b.input("x", DType::F32, &[3, 5, 17]);
    let bias = b.input("bias", DType::F32, &[17]);
    let col = b.input("col", DType::F32, &[3, 1, 1]);
    let w = b.konst(
        "w",
        Tensor::from_vec(&[5, 1], vec![0.5f32, -1.0, 2.0, 0.25, 3.0]),
    );
    let two = b.konst("two", Tensor::scalar(2.0f32));
    let a = b.binary(BinaryKind::Add, x, bias);
    let m = b.binary(BinaryKind::Mul, a, w);
    let s = b.binary(BinaryKind::Sub, m, col);
    let d = b.binary(BinaryKind::Div, s, two);
    let p = b.binary(BinaryKind::Pow, d, two);
    let mx = b.ew(ElementwiseOp::Variadic(VariadicKind::Max), &[p, d, a]);
    let r = b.unary(UnaryKind::Relu, s);
    let out = b.binary(BinaryKind::Add, mx, r);
    let g = b.finish(&[out, r]);
    let rep = check(&g, &random_inputs(&g, 1));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
    assert_eq!(count(&rep, KernelKind::Elementwise), (1, 1));
}

#[test]
fn unary_math_ops() {
    use UnaryKind::*;
    let kinds = [
        Neg,
        Abs,
        Sign,
        Relu,
        Sqrt,
        Exp,
        Log,
        Reciprocal,
        Floor,
        Ceil,
        Round,
        Erf,
        Tanh,
        Sigmoid,
        LeakyRelu { alpha: 0.1 },
        Elu { alpha: 1.5 },
        Selu {
            alpha: 1.673_263_2,
            gamma: 1.050_701,
        },
        Celu { alpha: 0.7 },
        ThresholdedRelu { alpha: 0.3 },
        HardSigmoid {
            alpha: 0.2,
            beta: 0.5,
        },
        HardSwish,
        Gelu {
            approximate: GeluApprox::None,
        },
        Gelu {
            approximate: GeluApprox::Tanh,
        },
        Softplus,
        Softsign,
        Mish,
        Sin,
        Cos,
        Tan,
        Atan,
        Sinh,
        Cosh,
        Asinh,
    ];
    let mut b = Builder::new("unary");
    let x = b.input("x", DType::F32, &[4, 33]);
    // |x| + 0.5 keeps Sqrt/Log finite; Asin/Acos/Atanh/Acosh get inputs in their domain.
    let ax = b.unary(Abs, x);
    let half = b.konst("half", Tensor::scalar(0.5f32));
    let pos = b.binary(BinaryKind::Add, ax, half);
    let mut outs = Vec::new();
    for k in kinds {
        let arg = if matches!(k, Sqrt | Log) { pos } else { x };
        outs.push(b.unary(k, arg));
    }
    let small = b.konst("small", Tensor::scalar(0.4f32));
    let xs = b.binary(BinaryKind::Mul, x, small);
    for k in [Asin, Acos, Atanh] {
        outs.push(b.unary(k, xs));
    }
    let one = b.konst("one", Tensor::scalar(1.0f32));
    let big = b.binary(BinaryKind::Add, pos, one);
    outs.push(b.unary(Acosh, big));
    let g = b.finish(&outs);
    let rep = check(&g, &random_inputs(&g, 2));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
}

#[test]
fn compare_where_clip_cast() {
    let mut b = Builder::new("select");
    let x = b.input("x", DType::F32, &[6, 10]);
    let y = b.input("y", DType::F32, &[10]);
    let c = b.input("c", DType::Bool, &[6, 1]);
    let i = b.input("i", DType::I64, &[6, 10]);
    let lt = b.ew(ElementwiseOp::Compare(CompareKind::Less), &[x, y]);
    let both = b.ew(
        ElementwiseOp::Logical(kiln_ir::ops::elementwise::LogicalKind::And),
        &[lt, c],
    );
    let w = b.ew(ElementwiseOp::Where, &[both, x, y]);
    let lo = b.konst("lo", Tensor::scalar(-0.5f32));
    let hi = b.konst("hi", Tensor::scalar(0.75f32));
    let cl = b.node(
        Op::Elementwise(ElementwiseOp::Clip(ClipBounds::Inputs)),
        &[Some(w), Some(lo), Some(hi)],
    );
    let fi = b.ew(
        ElementwiseOp::Cast {
            to: DType::F32,
            saturate: true,
        },
        &[i],
    );
    let sum = b.binary(BinaryKind::Add, cl, fi);
    let three = b.konst("three", Tensor::scalar(3i64));
    let ii = b.binary(BinaryKind::Mul, i, three);
    let back = b.ew(
        ElementwiseOp::Cast {
            to: DType::I64,
            saturate: true,
        },
        &[sum],
    );
    let g = b.finish(&[sum, both, ii, back]);
    let rep = check(&g, &random_inputs(&g, 3));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
}

#[test]
fn matmul_and_gemm_with_epilogues() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut b = Builder::new("mm");
    let x = b.input("x", DType::F32, &[2, 7, 20]);
    let w = b.konst("w", random_tensor(DType::F32, &[20, 33], &mut rng));
    let bias = b.konst("bias", random_tensor(DType::F32, &[33], &mut rng));
    let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
    let a = b.binary(BinaryKind::Add, mm, bias);
    let gl = b.unary(
        UnaryKind::Gelu {
            approximate: GeluApprox::None,
        },
        a,
    );
    // Gemm with transposed operands, alpha, beta and a row-broadcast C.
    let x2 = b.input("x2", DType::F32, &[13, 9]);
    let w2 = b.konst("w2", random_tensor(DType::F32, &[21, 13], &mut rng));
    let c2 = b.konst("c2", random_tensor(DType::F32, &[21], &mut rng));
    let gm = b.node(
        Op::Linalg(LinalgOp::Gemm(Gemm {
            alpha: 0.5,
            beta: 2.0,
            trans_a: true,
            trans_b: true,
        })),
        &[Some(x2), Some(w2), Some(c2)],
    );
    let t = b.unary(UnaryKind::Tanh, gm);
    // Plain Gemm, no epilogue.
    let w3 = b.konst("w3", random_tensor(DType::F32, &[9, 40], &mut rng));
    let plain = b.node(
        Op::Linalg(LinalgOp::Gemm(Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: false,
        })),
        &[Some(x2), Some(w3)],
    );
    let g = b.finish(&[gl, t, gm, plain]);
    let rep = check(&g, &random_inputs(&g, 5));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
    assert_eq!(count(&rep, KernelKind::Contraction), (3, 3));
}

#[test]
fn zoo_models() {
    for name in ["mlp", "bert", "gpt"] {
        let (g, inputs) = zoo(name);
        let rep = check(&g, &inputs);
        let (ew, ew_total) = count(&rep, KernelKind::Elementwise);
        let (c, c_total) = count(&rep, KernelKind::Contraction);
        eprintln!(
            "{name}: elementwise {ew}/{ew_total}, contraction {c}/{c_total}, {} kernels not lowered",
            rep.lowering.unsupported.len()
        );
        for u in &rep.lowering.unsupported {
            let k = &rep.partition.kernels[u.index];
            if matches!(k.kind, KernelKind::Elementwise | KernelKind::Contraction) {
                eprintln!("  {} {:?}: {}", k.name, k.kind, u.reason);
            }
        }
        // Every elementwise and contraction kernel of these models lowers.
        assert_eq!((c, ew), (c_total, ew_total), "{name}");
    }
}

#[test]
fn batched_matmul_with_epilogue() {
    let mut b = Builder::new("bmm");
    let q = b.input("q", DType::F32, &[2, 3, 7, 16]);
    let k = b.input("k", DType::F32, &[2, 3, 16, 9]);
    let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(q), Some(k)]);
    let s = b.konst("s", Tensor::scalar(0.25f32));
    let y = b.binary(BinaryKind::Mul, mm, s);
    let g = b.finish(&[y]);
    let rep = check(&g, &random_inputs(&g, 6));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
}

/// Batched MatMuls big enough to split into tasks over the batch (no epilogue: attention's
/// `P·V`, and one with A broadcast), run as three consecutive task ranges by `check`.
#[test]
fn batched_matmul_splits_over_the_batch() {
    for (a_shape, b_shape) in [
        (vec![2, 6, 64, 48], vec![2, 6, 48, 40]),
        (vec![64, 48], vec![5, 48, 72]),
    ] {
        let mut b = Builder::new("bmm_split");
        let a = b.input("a", DType::F32, &a_shape);
        let w = b.input("w", DType::F32, &b_shape);
        let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(a), Some(w)]);
        let g = b.finish(&[mm]);
        let rep = check(&g, &random_inputs(&g, 13));
        assert!(
            rep.lowering.unsupported.is_empty(),
            "{:?}",
            rep.lowering.unsupported
        );
        let tasks = rep.lowering.kernels[0].kernel.signature.tasks;
        assert_eq!(
            tasks as usize,
            b_shape[..b_shape.len() - 2].iter().product::<usize>()
        );
    }
}

/// Batched MatMul with A broadcast over B's batch: a 2-D A against 3-D and 4-D stacks of B
/// (run-time and constant B: stacked projections), an A whose batch dims are 1, with an
/// epilogue; each lowers (no interpreter fallback) and matches the interpreter.
#[test]
fn batched_matmul_with_broadcast_a() {
    for (a_shape, b_shape, konst) in [
        (vec![7, 16], vec![3, 16, 9], false),
        (vec![7, 16], vec![3, 16, 9], true),
        (vec![5, 12], vec![2, 3, 12, 20], false),
        (vec![1, 1, 7, 16], vec![2, 3, 16, 9], false),
    ] {
        let mut b = Builder::new("bmm_bcast");
        let a = b.input("a", DType::F32, &a_shape);
        let w = if konst {
            let n: usize = b_shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
                .collect();
            b.konst("w", Tensor::from_vec(&b_shape, data))
        } else {
            b.input("w", DType::F32, &b_shape)
        };
        let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(a), Some(w)]);
        let s = b.konst("s", Tensor::scalar(0.5f32));
        let y = b.binary(BinaryKind::Mul, mm, s);
        let g = b.finish(&[y]);
        let rep = check(&g, &random_inputs(&g, 11));
        assert!(
            rep.lowering.unsupported.is_empty(),
            "{a_shape:?} x {b_shape:?}: {:?}",
            rep.lowering.unsupported
        );
    }
}

/// MatMul/Gemm with a constant B packed at compile time (`matmul::pack_b`): the kernel gets
/// the packed panels as a derived constant instead of B, for products spanning several
/// `nc` column blocks, `kc` depth blocks and `mc` row blocks with edges everywhere (a small
/// schedule makes small shapes cross every block boundary), a row-split kernel with a bias
/// epilogue, and a batched A folded into M; a non-constant B keeps the run-time packing.
#[test]
fn constant_b_is_packed_at_compile_time() {
    use kiln_codegen::cpu::lower::conv::ConvSchedule;
    use kiln_codegen::cpu::matmul::MatmulSchedule;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut b = Builder::new("prepack");
    let mut outs = Vec::new();
    for (i, (m, k, n)) in [(5, 37, 70), (13, 16, 32), (1, 1, 1), (30, 50, 9)]
        .into_iter()
        .enumerate()
    {
        let x = b.input(&format!("x{i}"), DType::F32, &[m, k]);
        let w = b.konst(
            &format!("w{i}"),
            random_tensor(DType::F32, &[k, n], &mut rng),
        );
        outs.push(b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]));
    }
    // Gemm + bias + Relu, big enough to split into row tasks
    let x = b.input("xg", DType::F32, &[64, 72]);
    let w = b.konst("wg", random_tensor(DType::F32, &[72, 90], &mut rng));
    let bias = b.konst("bg", random_tensor(DType::F32, &[90], &mut rng));
    let gm = b.node(
        Op::Linalg(LinalgOp::Gemm(Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: false,
        })),
        &[Some(x), Some(w), Some(bias)],
    );
    outs.push(b.unary(UnaryKind::Relu, gm));
    // batch dims of A folded into M
    let x = b.input("xb", DType::F32, &[2, 3, 11, 20]);
    let w = b.konst("wb", random_tensor(DType::F32, &[20, 17], &mut rng));
    outs.push(b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]));
    // a B computed at run time: packed per call
    let p = b.input("p", DType::F32, &[9, 20]);
    let q = b.input("q", DType::F32, &[20, 11]);
    outs.push(b.node(Op::Linalg(LinalgOp::MatMul), &[Some(p), Some(q)]));
    let g = b.finish(&outs);
    let small = ConvSchedule {
        matmul: MatmulSchedule {
            mr: 3,
            nr: 16,
            mc: 6,
            kc: 8,
            nc: 32,
            ..MatmulSchedule::default()
        },
        ..ConvSchedule::default()
    };
    // 16-lane (AVX-512) tiles: compiled for x86-64-v3 here, LLVM splits each vector in two
    // (slow, but the indexing of 16-lane panels is what is checked)
    let small16 = ConvSchedule {
        matmul: MatmulSchedule {
            mr: 3,
            nr: 32,
            mc: 6,
            kc: 8,
            nc: 64,
            vector_width: 16,
            ..MatmulSchedule::default()
        },
        ..ConvSchedule::default()
    };
    for sched in [
        small,
        ConvSchedule::default(),
        small16,
        ConvSchedule::for_lanes(16),
    ] {
        let rep = check_with(&g, &random_inputs(&g, 7), &sched);
        assert!(
            rep.lowering.unsupported.is_empty(),
            "{:?}",
            rep.lowering.unsupported
        );
        let packed: Vec<usize> = rep
            .lowering
            .kernels
            .iter()
            .map(|k| k.consts.len())
            .collect();
        // every product but the last reads a packed constant, and never B itself
        assert_eq!(packed, [1, 1, 1, 1, 1, 1, 0], "{sched:?}");
        for k in &rep.lowering.kernels[..6] {
            assert!(k.consts[0].name.contains(".packed"), "{}", k.consts[0].name);
            let names: Vec<&str> = k
                .inputs
                .iter()
                .map(|&v| g.values[v].name.as_str())
                .collect();
            assert!(
                names.iter().all(|n| !n.starts_with('w')),
                "{}: reads B ({names:?})",
                k.kernel.signature.name
            );
        }
    }
}
