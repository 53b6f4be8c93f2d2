//! Conv contractions and pooling kernels lowered by `cpu::lower::lower_partition`
//! (`conv.rs`, `pool.rs`), checked kernel by kernel against the reference interpreter, and
//! the CNN zoo models (resnet, mobilenet) lowered completely.

use kiln_codegen::cpu::lower::conv::ConvSchedule;
use kiln_ir::ops::elementwise::{BinaryKind, ClipBounds, ElementwiseOp, UnaryKind};
use kiln_ir::ops::nn::{AutoPad, ConvAttrs, MaxPoolAttrs, NnOp, PoolAttrs, PoolKind, WindowAttrs};
use kiln_ir::{DType, Op, Tensor, ValueId};
use kiln_passes::fusion::KernelKind;
use rand::SeedableRng;

use crate::common;
use common::*;

/// Window attributes: strides, pads (begin = end), dilations.
fn window(kernel: Option<[usize; 2]>, s: usize, p: usize, d: usize) -> WindowAttrs {
    WindowAttrs {
        auto_pad: AutoPad::NotSet,
        kernel_shape: kernel.map(|k| k.to_vec()),
        strides: Some(vec![s, s]),
        dilations: Some(vec![d, d]),
        pads: Some(vec![p; 4]),
    }
}

/// A random f32 constant.
fn rand_const(b: &mut Builder, name: &str, shape: &[usize], seed: u64) -> ValueId {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = random_tensor(DType::F32, shape, &mut rng);
    b.konst(name, t)
}

/// Conv geometry of one test case.
struct Case {
    n: usize,
    c: usize,
    hw: [usize; 2],
    m: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    group: usize,
    bias: bool,
}

/// A graph `Conv` (+ residual `Add`) + `Relu` for `case`, checked against the interpreter.
fn conv_case(case: &Case, residual: bool, seed: u64) {
    let mut b = Builder::new("conv");
    let x = b.input("x", DType::F32, &[case.n, case.c, case.hw[0], case.hw[1]]);
    let w = rand_const(
        &mut b,
        "w",
        &[case.m, case.c / case.group, case.k, case.k],
        seed,
    );
    let mut ins = vec![Some(x), Some(w)];
    if case.bias {
        ins.push(Some(rand_const(&mut b, "b", &[case.m], seed + 1)));
    }
    let conv = b.node(
        Op::Nn(NnOp::Conv(ConvAttrs {
            window: window(None, case.s, case.p, case.d),
            group: case.group,
        })),
        &ins,
    );
    let mut y = conv;
    if residual {
        b.g.infer().expect("infer");
        let shape = b.g.values[conv].fact.shape.as_known().unwrap();
        let r = b.input("r", DType::F32, &shape);
        y = b.binary(BinaryKind::Add, y, r);
    }
    y = b.unary(UnaryKind::Relu, y);
    let g = b.finish(&[y]);
    let rep = check(&g, &random_inputs(&g, seed));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
    assert_eq!(count(&rep, KernelKind::Contraction), (1, 1));
}

#[test]
fn conv_im2col_shapes() {
    let base = Case {
        n: 2,
        c: 3,
        hw: [9, 11],
        m: 5,
        k: 3,
        s: 1,
        p: 1,
        d: 1,
        group: 1,
        bias: true,
    };
    let cases = [
        Case { ..base },
        Case { s: 2, ..base },
        Case { k: 1, p: 0, ..base },
        Case {
            k: 1,
            p: 0,
            s: 2,
            bias: false,
            ..base
        },
        Case {
            k: 7,
            p: 3,
            s: 2,
            hw: [16, 16],
            m: 8,
            ..base
        },
        Case { d: 2, p: 2, ..base },
        Case {
            p: 0,
            c: 17,
            m: 20,
            ..base
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        conv_case(c, i % 2 == 0, 10 + i as u64);
    }
}

#[test]
fn conv_grouped_and_depthwise() {
    let base = Case {
        n: 1,
        c: 8,
        hw: [10, 7],
        m: 8,
        k: 3,
        s: 1,
        p: 1,
        d: 1,
        group: 8,
        bias: true,
    };
    let cases = [
        Case { ..base },
        Case { s: 2, ..base },
        Case {
            k: 5,
            p: 2,
            bias: false,
            ..base
        },
        Case {
            group: 2,
            m: 6,
            ..base
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        conv_case(c, i % 2 == 1, 30 + i as u64);
    }
}

#[test]
fn conv_with_clip_epilogue() {
    let mut b = Builder::new("convclip");
    let x = b.input("x", DType::F32, &[1, 4, 8, 8]);
    let w = rand_const(&mut b, "w", &[6, 4, 3, 3], 3);
    let conv = b.node(
        Op::Nn(NnOp::Conv(ConvAttrs {
            window: window(None, 2, 1, 1),
            group: 1,
        })),
        &[Some(x), Some(w)],
    );
    let lo = b.konst("lo", Tensor::scalar(0.0f32));
    let hi = b.konst("hi", Tensor::scalar(6.0f32));
    let y = b.node(
        Op::Elementwise(ElementwiseOp::Clip(ClipBounds::Inputs)),
        &[Some(conv), Some(lo), Some(hi)],
    );
    let g = b.finish(&[y]);
    let rep = check(&g, &random_inputs(&g, 4));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
}

/// A Conv whose output also leaves its kernel (NasNet's `h`, read by `relu(h)` in the kernel
/// and by an `Add` and a pool outside it) keeps the fused one-pass form, storing `h` on the
/// way, so it still splits into tasks (the generic epilogue pass ran serially).
#[test]
fn conv_whose_output_leaves_the_kernel_splits_into_tasks() {
    for k in [1, 3] {
        let mut b = Builder::new("convtap");
        let x = b.input("x", DType::F32, &[1, 16, 14, 14]);
        let w = rand_const(&mut b, "w", &[32, 16, k, k], 5);
        let bias = rand_const(&mut b, "b", &[32], 6);
        let h = b.node(
            Op::Nn(NnOp::Conv(ConvAttrs {
                window: window(None, 1, k / 2, 1),
                group: 1,
            })),
            &[Some(x), Some(w), Some(bias)],
        );
        let y = b.unary(UnaryKind::Relu, h);
        let y2 = b.unary(UnaryKind::Relu, h);
        let r = b.input("r", DType::F32, &[1, 32, 14, 14]);
        let a = b.binary(BinaryKind::Add, r, h);
        let y3 = b.unary(UnaryKind::Relu, a);
        let g = b.finish(&[h, y, y2, a, y3]);
        let rep = check(&g, &random_inputs(&g, 7));
        assert_eq!(count(&rep, KernelKind::Contraction), (1, 1));
        let kernel = &rep.lowering.kernels[0];
        assert_eq!(kernel.outputs.len(), 5, "one kernel, every output");
        assert!(
            kernel.kernel.signature.tasks > 1,
            "{k}x{k}: {} task(s)",
            kernel.kernel.signature.tasks
        );
    }
}

#[test]
fn pools() {
    for (i, (k, s, p, ceil)) in [
        (3, 2, 1, false),
        (2, 2, 0, false),
        (3, 1, 0, true),
        (3, 2, 0, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = Builder::new("pool");
        let x = b.input("x", DType::F32, &[2, 3, 11, 9]);
        let mp = b.node(
            Op::Nn(NnOp::MaxPool(MaxPoolAttrs {
                window: window(Some([k, k]), s, p, 1),
                ceil_mode: ceil,
                column_major_indices: false,
                with_indices: false,
            })),
            &[Some(x)],
        );
        let avg = b.node(
            Op::Nn(NnOp::GlobalPool(PoolKind::Average {
                count_include_pad: false,
            })),
            &[Some(mp)],
        );
        let mx = b.node(Op::Nn(NnOp::GlobalPool(PoolKind::Max)), &[Some(x)]);
        // AveragePool with either divisor (count_include_pad only without ceil_mode, as
        // ONNX's default exporters write it), dilated on one case
        let ap = |b: &mut Builder, include: bool, d: usize| {
            b.node(
                Op::Nn(NnOp::Pool(PoolAttrs {
                    kind: PoolKind::Average {
                        count_include_pad: include,
                    },
                    window: window(Some([k, k]), s, p, d),
                    ceil_mode: ceil,
                })),
                &[Some(x)],
            )
        };
        let a0 = ap(&mut b, false, 1);
        let a1 = ap(&mut b, !ceil, 1);
        let a2 = ap(&mut b, i == 0, 1 + usize::from(i == 0));
        let g = b.finish(&[mp, avg, mx, a0, a1, a2]);
        let rep = check(&g, &random_inputs(&g, 50 + i as u64));
        assert!(
            rep.lowering.unsupported.is_empty(),
            "{:?}",
            rep.lowering.unsupported
        );
    }
}

#[test]
fn cnn_zoo_models_lower_completely() {
    for name in ["resnet", "mobilenet"] {
        let (mut g, inputs) = zoo(name);
        kiln_passes::fold_batchnorm::fold_all(&mut g);
        kiln_ir::simplify::simplify(&mut g);
        let rep = check(&g, &inputs);
        // `Alias` kernels are zero-copy views: they need no code.
        let missing: Vec<String> = rep
            .lowering
            .unsupported
            .iter()
            .filter(|u| rep.partition.kernels[u.index].kind != KernelKind::Alias)
            .map(|u| format!("{}: {}", rep.partition.kernels[u.index].name, u.reason))
            .collect();
        assert!(missing.is_empty(), "{name}: {missing:?}");
        assert_eq!(
            count(&rep, KernelKind::Contraction).0,
            count(&rep, KernelKind::Contraction).1
        );
    }
}

/// The fused epilogue of a random Conv case.
#[derive(Debug, Clone, Copy)]
enum Tail {
    None,
    Relu,
    AddRelu,
    Clip,
    HardSwish,
    ScaleAdd,
    /// `relu(conv)`, with `conv` a graph output too (the kernel stores it on the way).
    ReluKeep,
    /// `relu(conv + r)`, with `conv + r` a graph output too.
    AddReluKeep,
    /// `conv`, `relu(conv)` and `relu(conv + r)`, all graph outputs (NasNet's cells).
    Tree,
}

/// A Conv with arbitrary (asymmetric) pads and `tail`, checked against the interpreter.
#[allow(clippy::too_many_arguments)]
fn conv_random(
    n: usize,
    c: usize,
    hw: [usize; 2],
    m: usize,
    k: [usize; 2],
    s: [usize; 2],
    pads: [usize; 4],
    d: [usize; 2],
    group: usize,
    bias: bool,
    tail: Tail,
    seed: u64,
) {
    let sched = ConvSchedule::default();
    conv_random_with(&sched, n, c, hw, m, k, s, pads, d, group, bias, tail, seed);
}

/// [`conv_random`] with the Conv schedule `sched`.
#[allow(clippy::too_many_arguments)]
fn conv_random_with(
    sched: &ConvSchedule,
    n: usize,
    c: usize,
    hw: [usize; 2],
    m: usize,
    k: [usize; 2],
    s: [usize; 2],
    pads: [usize; 4],
    d: [usize; 2],
    group: usize,
    bias: bool,
    tail: Tail,
    seed: u64,
) {
    let mut b = Builder::new("convr");
    let x = b.input("x", DType::F32, &[n, c, hw[0], hw[1]]);
    let w = rand_const(&mut b, "w", &[m, c / group, k[0], k[1]], seed);
    let mut ins = vec![Some(x), Some(w)];
    if bias {
        ins.push(Some(rand_const(&mut b, "b", &[m], seed + 1)));
    }
    let conv = b.node(
        Op::Nn(NnOp::Conv(ConvAttrs {
            window: WindowAttrs {
                auto_pad: AutoPad::NotSet,
                kernel_shape: None,
                strides: Some(s.to_vec()),
                dilations: Some(d.to_vec()),
                pads: Some(pads.to_vec()),
            },
            group,
        })),
        &ins,
    );
    b.g.infer().expect("infer");
    let shape = b.g.values[conv].fact.shape.as_known().unwrap();
    let mut kept = Vec::new();
    let y = match tail {
        Tail::ReluKeep => {
            kept.push(conv);
            b.unary(UnaryKind::Relu, conv)
        }
        Tail::AddReluKeep => {
            let r = b.input("r", DType::F32, &shape);
            let a = b.binary(BinaryKind::Add, r, conv);
            kept.push(a);
            b.unary(UnaryKind::Relu, a)
        }
        Tail::Tree => {
            let r = b.input("r", DType::F32, &shape);
            let relu = b.unary(UnaryKind::Relu, conv);
            let a = b.binary(BinaryKind::Add, conv, r);
            kept.extend([conv, relu]);
            b.unary(UnaryKind::Relu, a)
        }
        Tail::None => conv,
        Tail::Relu => b.unary(UnaryKind::Relu, conv),
        Tail::AddRelu => {
            let r = b.input("r", DType::F32, &shape);
            let a = b.binary(BinaryKind::Add, conv, r);
            b.unary(UnaryKind::Relu, a)
        }
        Tail::Clip => {
            let lo = b.konst("lo", Tensor::scalar(-0.5f32));
            let hi = b.konst("hi", Tensor::scalar(0.75f32));
            b.node(
                Op::Elementwise(ElementwiseOp::Clip(ClipBounds::Inputs)),
                &[Some(conv), Some(lo), Some(hi)],
            )
        }
        Tail::HardSwish => b.unary(UnaryKind::HardSwish, conv),
        Tail::ScaleAdd => {
            let sc = b.konst("sc", Tensor::scalar(1.5f32));
            let r = b.input("r", DType::F32, &shape);
            let t = b.binary(BinaryKind::Mul, sc, conv);
            b.binary(BinaryKind::Add, r, t)
        }
    };
    kept.push(y);
    let g = b.finish(&kept);
    let rep = check_with(&g, &random_inputs(&g, seed), sched);
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
    assert_eq!(count(&rep, KernelKind::Contraction), (1, 1));
}

/// Property test: random Conv geometries (batch 1–2, kernels 1–7, strides 1–3, asymmetric
/// pads, dilation, groups incl. depthwise, odd sizes) with every fused epilogue, against the
/// reference interpreter. `KILN_CONV_CASES` sets the number of cases (default 40).
#[test]
fn conv_random_shapes_match_interpreter() {
    let cases: usize = std::env::var("KILN_CONV_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    random_convs(&ConvSchedule::default(), cases, 0xC0417);
}

/// [`conv_random_shapes_match_interpreter`] with the AVX-512 schedule: the plain direct form
/// on 16-lane vectors with its taller register tiles (compiled for x86-64-v3 here, where
/// LLVM splits each vector in two: the indexing is what is checked).
#[test]
fn conv_random_shapes_on_16_lanes_match_interpreter() {
    let cases: usize = std::env::var("KILN_CONV_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    random_convs(&ConvSchedule::for_lanes(16), cases, 0x16_1A4E);
}

/// `cases` random Conv geometries (see [`conv_random_shapes_match_interpreter`]) lowered
/// with `sched`, from RNG seed `seed`.
fn random_convs(sched: &ConvSchedule, cases: usize, seed: u64) {
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tails = [
        Tail::None,
        Tail::Relu,
        Tail::AddRelu,
        Tail::Clip,
        Tail::HardSwish,
        Tail::ScaleAdd,
        Tail::ReluKeep,
        Tail::AddReluKeep,
        Tail::Tree,
    ];
    let mut done = 0;
    while done < cases {
        let k = [
            [1, 1, 2, 3, 3, 5, 7][rng.random_range(0..7)],
            [1, 1, 2, 3, 3, 5, 7][rng.random_range(0..7)],
        ];
        let s = [rng.random_range(1..=3), rng.random_range(1..=3)];
        let d = [
            if rng.random_bool(0.2) { 2 } else { 1 },
            if rng.random_bool(0.2) { 2 } else { 1 },
        ];
        let pads = [
            rng.random_range(0..k[0]),
            rng.random_range(0..k[1]),
            rng.random_range(0..k[0]),
            rng.random_range(0..k[1]),
        ];
        let hw = [rng.random_range(1..24), rng.random_range(1..40)];
        let ext = |i: usize| (k[i] - 1) * d[i] + 1;
        if hw[0] + pads[0] + pads[2] < ext(0) || hw[1] + pads[1] + pads[3] < ext(1) {
            continue;
        }
        let group = [1, 1, 1, 2, 3, 0][rng.random_range(0..6)];
        let (c, m, group) = if group == 0 {
            let c = rng.random_range(1..20);
            (c, c, c)
        } else {
            (
                group * rng.random_range(1..7),
                group * rng.random_range(1..12),
                group,
            )
        };
        let n = rng.random_range(1..=2);
        let tail = tails[rng.random_range(0..tails.len())];
        let bias = rng.random_bool(0.7);
        eprintln!(
            "case {done}: n{n} c{c} hw{hw:?} m{m} k{k:?} s{s:?} p{pads:?} d{d:?} g{group} bias {bias} {tail:?}"
        );
        conv_random_with(
            sched,
            n,
            c,
            hw,
            m,
            k,
            s,
            pads,
            d,
            group,
            bias,
            tail,
            1000 + done as u64,
        );
        done += 1;
    }
}

/// Few output positions per channel (the dot-product form): 1–16 positions, ragged channel
/// blocks, reduction lengths not a multiple of 8, batch 2, every epilogue.
#[test]
fn conv_few_positions() {
    let tails = [
        Tail::AddRelu,
        Tail::Relu,
        Tail::None,
        Tail::Clip,
        Tail::HardSwish,
        Tail::ScaleAdd,
        Tail::ReluKeep,
        Tail::AddReluKeep,
        Tail::Tree,
    ];
    // (n, c, hw, m, k, s, p)
    type Geometry = (usize, usize, [usize; 2], usize, usize, usize, usize);
    let cases: [Geometry; 6] = [
        (1, 20, [2, 2], 13, 3, 1, 1),
        (2, 9, [4, 4], 7, 3, 2, 1),
        (1, 16, [2, 4], 32, 3, 1, 1),
        (2, 5, [1, 1], 11, 1, 1, 0),
        (1, 3, [3, 5], 4, 3, 1, 1),
        (1, 8, [7, 7], 9, 3, 2, 0),
    ];
    for (i, &(n, c, hw, m, k, s, p)) in cases.iter().enumerate() {
        conv_random(
            n,
            c,
            hw,
            m,
            [k, k],
            [s, s],
            [p; 4],
            [1, 1],
            1,
            i % 3 != 2,
            tails[i],
            70 + i as u64,
        );
    }
}

/// Property test of the channel-vector form (lanes over output channels, packed filter):
/// random `group = 1` convs with 1–64 output positions and 8–40 output channels (ragged
/// channel blocks), kernels 1–5, strides 1–2, asymmetric pads, dilation, batch 1–2, every
/// fused epilogue. `KILN_CONV_CASES` sets the number of cases (default 40).
#[test]
fn conv_channel_form_random_shapes() {
    channel_form_cases(&ConvSchedule::default(), 8, 0xC4A7, 40);
}

/// [`conv_channel_form_random_shapes`] with the AVX-512 schedule: 16 output channels per
/// vector (16–80 channels, ragged blocks) and its taller register tiles (compiled for
/// x86-64-v3 here, where LLVM splits each vector in two: the indexing is what is checked).
#[test]
fn conv_channel_form_on_16_lanes_random_shapes() {
    channel_form_cases(&ConvSchedule::for_lanes(16), 16, 0x16C4A7, 24);
}

/// `cases` random channel-form convs (see [`conv_channel_form_random_shapes`]) with `base`
/// (the form forced), `lanes`–`5·lanes` output channels, from RNG seed `seed`.
fn channel_form_cases(base: &ConvSchedule, lanes: usize, seed: u64, default_cases: usize) {
    use rand::Rng;
    let cases: usize = std::env::var("KILN_CONV_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tails = [
        Tail::None,
        Tail::Relu,
        Tail::AddRelu,
        Tail::Clip,
        Tail::HardSwish,
        Tail::ScaleAdd,
        Tail::ReluKeep,
        Tail::AddReluKeep,
        Tail::Tree,
    ];
    let mut done = 0;
    while done < cases {
        let k = [
            [1, 2, 3, 3, 5][rng.random_range(0..5)],
            [1, 2, 3, 3, 5][rng.random_range(0..5)],
        ];
        let s = [rng.random_range(1..=2), rng.random_range(1..=2)];
        let d = [
            if rng.random_bool(0.2) { 2 } else { 1 },
            if rng.random_bool(0.2) { 2 } else { 1 },
        ];
        let pads = [
            rng.random_range(0..k[0]),
            rng.random_range(0..k[1]),
            rng.random_range(0..k[0]),
            rng.random_range(0..k[1]),
        ];
        let hw = [rng.random_range(1..12), rng.random_range(1..12)];
        let ext = |i: usize| (k[i] - 1) * d[i] + 1;
        if hw[0] + pads[0] + pads[2] < ext(0) || hw[1] + pads[1] + pads[3] < ext(1) {
            continue;
        }
        let oh = (hw[0] + pads[0] + pads[2] - ext(0)) / s[0] + 1;
        let ow = (hw[1] + pads[1] + pads[3] - ext(1)) / s[1] + 1;
        if oh * ow > 64 {
            continue;
        }
        let (c, m) = (rng.random_range(1..24), rng.random_range(lanes..=5 * lanes));
        let n = rng.random_range(1..=2);
        let tail = tails[rng.random_range(0..tails.len())];
        let bias = rng.random_bool(0.7);
        eprintln!(
            "case {done}: n{n} c{c} hw{hw:?} m{m} k{k:?} s{s:?} p{pads:?} d{d:?} bias {bias} {tail:?}"
        );
        let sched = ConvSchedule {
            chan_below_lane_use_pct: 101,
            ..*base
        };
        conv_random_with(
            &sched,
            n,
            c,
            hw,
            m,
            k,
            s,
            pads,
            d,
            1,
            bias,
            tail,
            5000 + done as u64,
        );
        done += 1;
    }
}

/// Property test of Winograd F(2×2, 3×3), forced on random 3×3 stride-1 `group = 1` convs:
/// odd and even output sizes (partial 2×2 tiles), 1–20 channels in and out (ragged channel
/// blocks), asymmetric pads, batch 1–2, every fused epilogue. `KILN_CONV_CASES` sets the
/// number of cases (default 40).
#[test]
fn conv_winograd_random_shapes() {
    use rand::Rng;
    let cases: usize = std::env::var("KILN_CONV_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x3163);
    let tails = [
        Tail::None,
        Tail::Relu,
        Tail::AddRelu,
        Tail::Clip,
        Tail::HardSwish,
        Tail::ScaleAdd,
        Tail::ReluKeep,
        Tail::AddReluKeep,
        Tail::Tree,
    ];
    let sched8 = ConvSchedule {
        chan_max_positions: 0,
        winograd_min_channels: 1,
        winograd_min_positions: 0,
        ..ConvSchedule::default()
    };
    // and on 16-lane vectors (AVX-512 targets; split in two by LLVM here)
    let sched16 = ConvSchedule {
        matmul: ConvSchedule::for_lanes(16).matmul,
        ..sched8
    };
    for done in 0..cases + cases / 2 {
        let sched = if done < cases { sched8 } else { sched16 };
        let pads = [
            rng.random_range(0..3),
            rng.random_range(0..3),
            rng.random_range(0..3),
            rng.random_range(0..3),
        ];
        let hw = [rng.random_range(1..20), rng.random_range(1..30)];
        if hw[0] + pads[0] + pads[2] < 3 || hw[1] + pads[1] + pads[3] < 3 {
            continue;
        }
        let (c, m) = (rng.random_range(1..20), rng.random_range(1..20));
        let n = rng.random_range(1..=2);
        let tail = tails[rng.random_range(0..tails.len())];
        let bias = rng.random_bool(0.7);
        eprintln!("case {done}: n{n} c{c} hw{hw:?} m{m} p{pads:?} bias {bias} {tail:?}");
        conv_random_with(
            &sched,
            n,
            c,
            hw,
            m,
            [3, 3],
            [1, 1],
            pads,
            [1, 1],
            1,
            bias,
            tail,
            9000 + done as u64,
        );
    }
}
