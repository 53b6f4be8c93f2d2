//! The GPU op kernels (conv, depthwise conv, LayerNorm, reductions, elementwise chains,
//! attention) without a GPU:
//!
//! * every kernel × representative shapes and schedules × every SKU of the device database
//!   is lowered to PTX and assembled with `ptxas -arch=sm_XX -v` (once per architecture),
//!   with registers, static shared memory and spills checked against each SKU's limits
//!   (skipped visibly without `ptxas`);
//! * the CPU references the CUDA runtime test compares the kernels with
//!   (`common/gpu_ref.rs`) are checked against the reference interpreter (`kiln_ir::interp`)
//!   on graphs with the ONNX ops they stand for (Conv, LayerNormalization, Reduce*,
//!   MatMul + Softmax);
//! * the PTX fixtures of `runtime/tests/cuda_ops.rs` (`runtime/tests/ptx/kiln_t_*.sm_80.ptx`)
//!   are current (`KILN_UPDATE_PTX=1` rewrites them) and the cases' launch geometry agrees
//!   with the generators';
//! * the same kernels, as MLIR, run on the SIMT emulator (`common/gpu_emu.rs`) with the
//!   runtime test's launch geometry and arguments, against the CPU references.

use kiln_codegen::gpu::kernels::attention::{attention, AttentionSpec};
use kiln_codegen::gpu::kernels::attention_mma::{self, attention_f16_mma};
use kiln_codegen::gpu::kernels::conv::{conv2d, ConvGeom, ConvLayout, Epilogue, GpuConvSchedule};
use kiln_codegen::gpu::kernels::conv_mma::{conv2d_f16_mma, conv2d_mma, ConvMmaSchedule};
use kiln_codegen::gpu::kernels::depthwise::depthwise_conv2d;
use kiln_codegen::gpu::kernels::elementwise::{chain, EwBinary, EwChain, EwInput, EwStep, EwUnary};
use kiln_codegen::gpu::kernels::gemm_mma::MmaInput;
use kiln_codegen::gpu::kernels::norm::layer_norm;
use kiln_codegen::gpu::kernels::reduce::{reduce_rows, ReduceKind, RowMode};
use kiln_codegen::gpu::{compile_kernel, DeviceDb, Elem, GpuKernel, Sku};
use kiln_ir::ops::elementwise::{BinaryKind, UnaryKind};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::{AutoPad, ConvAttrs, LayerNormAttrs, NnOp, SoftmaxAttrs, WindowAttrs};
use kiln_ir::ops::reduce::{ReduceAxes, ReduceOp};
use kiln_ir::{DType, Op, Tensor};

use crate::common;
use crate::gpu_emu;
use crate::gpu_ref;
use crate::ptxas;

use common::Builder;
use gpu_emu::EArg;
use gpu_ref::*;

fn geom(c: &ConvCase) -> ConvGeom {
    let [n, ch, h, w, oc, kh, kw] = c.dims.map(|d| d as u64);
    ConvGeom {
        n,
        c: ch,
        h,
        w,
        oc,
        kh,
        kw,
        stride: c.stride.map(|d| d as u64),
        pads: c.pads.map(|d| d as u64),
        dilation: c.dilation.map(|d| d as u64),
    }
}

fn epilogue(c: &ConvCase) -> Epilogue {
    Epilogue {
        bias: c.epilogue[0],
        residual: c.epilogue[1],
        relu: c.epilogue[2],
    }
}

fn schedule(t: [u32; 5]) -> GpuConvSchedule {
    let [bm, bn, bk, tm, tn] = t;
    GpuConvSchedule { bm, bn, bk, tm, tn }
}

fn mma_schedule(c: &ConvCase) -> ConvMmaSchedule {
    ConvMmaSchedule {
        warps: c.tile[0],
        n_tiles: c.tile[1],
        ..Default::default()
    }
}

fn conv_kernel(c: &ConvCase, sku: &Sku) -> GpuKernel {
    let layout = if c.nhwc {
        ConvLayout::Nhwc
    } else {
        ConvLayout::Nchw
    };
    if c.depthwise {
        depthwise_conv2d(c.name, &geom(c), epilogue(c)).unwrap()
    } else if c.mma {
        conv2d_f16_mma(c.name, &geom(c), layout, epilogue(c), &mma_schedule(c), sku).unwrap()
    } else {
        conv2d(
            c.name,
            &geom(c),
            layout,
            epilogue(c),
            &schedule(c.tile),
            sku,
        )
        .unwrap()
    }
}

fn row_mode(c: &RowCase) -> RowMode {
    if c.block {
        RowMode::Block { threads: 256 }
    } else {
        RowMode::Warp { rows_per_block: 4 }
    }
}

fn row_kernel(c: &RowCase) -> GpuKernel {
    let mode = row_mode(c);
    match c.op {
        "layernorm" => layer_norm(c.name, mode).unwrap(),
        op => {
            let kind = match op {
                "sum" => ReduceKind::Sum,
                "mean" => ReduceKind::Mean,
                _ => ReduceKind::Max,
            };
            reduce_rows(c.name, kind, mode).unwrap()
        }
    }
}

fn attn_spec(c: &AttnCase) -> AttentionSpec {
    let elem = if c.f16 { Elem::F16 } else { Elem::F32 };
    AttentionSpec::new(c.dims[3] as u32, c.causal, elem)
}

fn attn_kernel(c: &AttnCase, sku: &Sku) -> GpuKernel {
    if c.mma {
        attention_f16_mma(c.name, &attn_spec(c), sku).unwrap()
    } else {
        attention(c.name, &attn_spec(c), sku).unwrap()
    }
}

/// The elementwise chain of the runtime test ([`EW_NAME`]):
/// `y = sigmoid(tanh(x · col + row) - relu(x) · s)`.
fn ew_case() -> EwChain {
    EwChain {
        inputs: vec![
            EwInput::Tensor,
            EwInput::ColVec,
            EwInput::RowVec,
            EwInput::Scalar,
        ],
        steps: vec![
            EwStep::Binary(EwBinary::Mul, 0, 1),
            EwStep::Binary(EwBinary::Add, 4, 2),
            EwStep::Unary(EwUnary::Tanh, 5),
            EwStep::Unary(EwUnary::Relu, 0),
            EwStep::Binary(EwBinary::Mul, 7, 3),
            EwStep::Binary(EwBinary::Sub, 6, 8),
            EwStep::Unary(EwUnary::Sigmoid, 9),
        ],
    }
}

/// Every kernel the runtime test runs, generated for `sku`.
fn runtime_kernels(sku: &Sku) -> Vec<GpuKernel> {
    let mut ks: Vec<GpuKernel> = CONV_CASES.iter().map(|c| conv_kernel(c, sku)).collect();
    ks.extend(ROW_CASES.iter().map(row_kernel));
    ks.extend(ATTN_CASES.iter().map(|c| attn_kernel(c, sku)));
    ks.push(chain(EW_NAME, &ew_case()).unwrap());
    ks
}

/// More schedules and shapes than the runtime test runs, for the `ptxas` sweep.
fn sweep_kernels(sku: &Sku) -> Vec<GpuKernel> {
    let mut ks = runtime_kernels(sku);
    let g = ConvGeom {
        n: 1,
        c: 64,
        h: 56,
        w: 56,
        oc: 128,
        kh: 3,
        kw: 3,
        stride: [2, 2],
        pads: [1, 1, 1, 1],
        dilation: [1, 1],
    };
    let epi = Epilogue {
        bias: true,
        residual: true,
        relu: true,
    };
    for (i, t) in [
        [64, 64, 16, 4, 4],
        [128, 128, 8, 8, 8],
        [128, 64, 8, 8, 4],
        [32, 32, 32, 2, 2],
        [16, 16, 4, 1, 1],
        [64, 128, 16, 4, 8],
    ]
    .into_iter()
    .enumerate()
    {
        let s = schedule(t);
        if s.validate(sku).is_err() {
            continue;
        }
        for (l, layout) in [ConvLayout::Nchw, ConvLayout::Nhwc].into_iter().enumerate() {
            let name = format!("sweep_conv_{i}_{l}");
            ks.push(conv2d(&name, &g, layout, epi, &s, sku).unwrap());
        }
    }
    for (i, (warps, n_tiles)) in [(4, 4), (8, 8), (2, 1), (4, 8)].into_iter().enumerate() {
        let s = ConvMmaSchedule {
            warps,
            n_tiles,
            ..Default::default()
        };
        for (l, layout) in [ConvLayout::Nchw, ConvLayout::Nhwc].into_iter().enumerate() {
            let name = format!("sweep_conv_mma_{i}_{l}");
            ks.push(conv2d_f16_mma(&name, &g, layout, epi, &s, sku).unwrap());
        }
    }
    for (i, mode) in [
        RowMode::Warp { rows_per_block: 1 },
        RowMode::Warp { rows_per_block: 8 },
        RowMode::Block { threads: 128 },
        RowMode::Block { threads: 1024 },
    ]
    .into_iter()
    .enumerate()
    {
        ks.push(layer_norm(&format!("sweep_ln_{i}"), mode).unwrap());
        ks.push(reduce_rows(&format!("sweep_max_{i}"), ReduceKind::Max, mode).unwrap());
    }
    for (i, (d, w, causal, elem)) in [
        (128, 4, true, Elem::F16),
        (64, 8, false, Elem::F32),
        (128, 8, false, Elem::F32),
        (32, 16, true, Elem::F16),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = AttentionSpec {
            rows_per_block: w,
            ..AttentionSpec::new(d, causal, elem)
        };
        ks.push(attention(&format!("sweep_attn_{i}"), &spec, sku).unwrap());
    }
    for (i, (d, w, causal)) in [
        (128, 4, true),
        (64, 8, false),
        (16, 1, false),
        (128, 2, false),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = AttentionSpec {
            rows_per_block: w,
            ..AttentionSpec::new(d, causal, Elem::F16)
        };
        ks.push(attention_f16_mma(&format!("sweep_attn_mma_{i}"), &spec, sku).unwrap());
    }
    ks
}

#[test]
fn every_op_kernel_assembles_and_fits_every_sku() {
    let Some(ptxas) = ptxas::find_ptxas() else {
        println!("SKIPPED: no ptxas (set KILN_PTXAS or run scripts/setup.sh)");
        return;
    };
    let db = DeviceDb::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut archs: Vec<&str> = db.skus().iter().map(|s| s.arch.as_str()).collect();
    archs.sort();
    archs.dedup();
    println!(
        "{:<30} {:<6} {:>5} {:>8} {:>7}  skus",
        "kernel", "arch", "regs", "smem B", "threads"
    );
    let mut count = 0;
    for arch in archs {
        let skus: Vec<&Sku> = db.skus().iter().filter(|s| s.arch == arch).collect();
        // Kernels generated for the smallest SKU of the arch are valid on all of them.
        for k in sweep_kernels(skus[0]) {
            let ptx = compile_kernel(&k, skus[0])
                .unwrap_or_else(|e| panic!("{} for {arch}: {e}", k.name));
            let u = ptxas::assemble(&ptxas, dir.path(), &ptx.text, arch, &k.name)
                .unwrap_or_else(|e| panic!("{e}"));
            for sku in &skus {
                k.check_fits(sku).unwrap();
                ptxas::check_limits(&u, &k, sku);
            }
            let names: Vec<&str> = skus.iter().map(|s| s.name.as_str()).collect();
            println!(
                "{:<30} {:<6} {:>5} {:>8} {:>7}  {}",
                k.name,
                arch,
                u.registers,
                u.smem,
                k.threads(),
                names.join(",")
            );
            count += 1;
        }
    }
    println!("{count} kernel × arch assemblies");
    assert!(count > 100, "{count} kernels assembled");
}

/// The PTX the CUDA runtime test loads, for sm_80 (JIT-compiled by the driver for newer
/// GPUs), and the launch geometry the test uses.
#[test]
fn runtime_ops_ptx_fixtures_are_current() {
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:sm_80")
        .unwrap();
    for k in runtime_kernels(sku) {
        let ptx = compile_kernel(&k, sku).unwrap();
        ptxas::check_fixture(&format!("{}.sm_80.ptx", k.name), &ptx.text);
    }
    for c in CONV_CASES {
        let (grid, block) = c.launch();
        if c.depthwise {
            assert_eq!(block, [kiln_codegen::gpu::kernels::depthwise::BLOCK, 1, 1]);
        } else if c.mma {
            assert_eq!(mma_schedule(c).launch(&geom(c)).unwrap(), (grid, block));
        } else {
            assert_eq!(schedule(c.tile).launch(&geom(c)).unwrap(), (grid, block));
        }
        let k = conv_kernel(c, sku);
        assert_eq!(k.block, block, "{}", c.name);
        assert_eq!(
            (geom(c).oh() as usize, geom(c).ow() as usize),
            (c.oh(), c.ow())
        );
    }
    for c in ROW_CASES {
        let mode = row_mode(c);
        for &(rows, _) in c.shapes {
            assert_eq!(c.launch(rows), (mode.grid(rows as u64), mode.block()));
        }
    }
    for c in ATTN_CASES {
        let spec = attn_spec(c);
        let (grid, block) = c.launch();
        let (bh, sq) = (c.dims[0] as u64, c.dims[1] as u64);
        if c.mma {
            assert_eq!(attention_mma::launch(&spec, bh, sq).unwrap(), (grid, block));
        } else {
            assert_eq!(spec.grid(bh, sq).unwrap(), grid);
            assert_eq!(spec.block(), block);
        }
        assert!((spec.scale - c.scale()).abs() == 0.0);
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_f64_vec().into_iter().map(|v| v as f32).collect()
}

fn window(c: &ConvCase) -> WindowAttrs {
    WindowAttrs {
        auto_pad: AutoPad::NotSet,
        kernel_shape: None,
        strides: Some(c.stride.to_vec()),
        dilations: Some(c.dilation.to_vec()),
        pads: Some(c.pads.to_vec()),
    }
}

/// Conv (+ bias, + residual Add, Relu) graphs through the interpreter against
/// [`conv_cpu`] (NHWC cases: inputs, weights and residual transposed for the reference,
/// its output transposed back).
#[test]
fn conv_reference_matches_interpreter() {
    for (ci, c) in CONV_CASES.iter().enumerate() {
        let [n, ch, h, w, oc, kh, kw] = c.dims;
        let (oh, ow) = (c.oh(), c.ow());
        let wshape = if c.depthwise {
            [oc, 1, kh, kw]
        } else {
            [oc, ch, kh, kw]
        };
        let mut b = Builder::new("conv");
        let xv = b.input("x", DType::F32, &[n, ch, h, w]);
        let wv = b.input("w", DType::F32, &wshape);
        let mut ins = vec![Some(xv), Some(wv)];
        let mut args = vec![
            Tensor::from_vec(&[n, ch, h, w], values(n * ch * h * w, 10 + ci as u64)),
            Tensor::from_vec(&wshape, values(wshape.iter().product(), 20 + ci as u64)),
        ];
        if c.epilogue[0] {
            ins.push(Some(b.input("b", DType::F32, &[oc])));
            args.push(Tensor::from_vec(&[oc], values(oc, 30 + ci as u64)));
        }
        let mut y = b.node(
            Op::Nn(NnOp::Conv(ConvAttrs {
                window: window(c),
                group: if c.depthwise { ch } else { 1 },
            })),
            &ins,
        );
        let yshape = [n, oc, oh, ow];
        if c.epilogue[1] {
            let r = b.input("r", DType::F32, &yshape);
            args.push(Tensor::from_vec(
                &yshape,
                values(yshape.iter().product(), 40 + ci as u64),
            ));
            y = b.binary(BinaryKind::Add, y, r);
        }
        if c.epilogue[2] {
            y = b.unary(UnaryKind::Relu, y);
        }
        let g = b.finish(&[y]);
        let want = to_vec(&kiln_ir::interp::run(&g, &args).unwrap()[0]);
        let x = to_vec(&args[0]);
        let wt = to_vec(&args[1]);
        let bias = c.epilogue[0].then(|| to_vec(&args[2]));
        let res = c.epilogue[1].then(|| to_vec(args.last().unwrap()));
        let got = if c.nhwc {
            let xh = nchw_to_nhwc(&x, [n, ch, h, w]);
            let wh = nchw_to_nhwc(&wt, wshape);
            let rh = res.as_ref().map(|r| nchw_to_nhwc(r, yshape));
            let y = conv_cpu(c, &xh, &wh, bias.as_deref(), rh.as_deref());
            nhwc_to_nchw(&y, yshape)
        } else {
            conv_cpu(c, &x, &wt, bias.as_deref(), res.as_deref())
        };
        let e = rel_err(&got, &want);
        assert!(e <= 1e-5, "{}: relative error {e}", c.name);
        assert!(want.iter().any(|&v| v != 0.0), "{}: trivial output", c.name);
    }
}

fn reduce_op(kind: kiln_ir::ops::reduce::ReduceKind) -> Op {
    Op::Reduce(ReduceOp::Reduce {
        kind,
        axes: ReduceAxes::Attr(Some(vec![-1])),
        keepdims: true,
        noop_with_empty_axes: false,
    })
}

/// LayerNormalization and ReduceSum/Mean/Max over the last axis through the interpreter
/// against [`layer_norm_cpu`] and [`reduce_cpu`].
#[test]
fn row_references_match_interpreter() {
    use kiln_ir::ops::reduce::ReduceKind as K;
    for (rows, n) in [(7, 33), (3, 1000), (2, 1)] {
        let eps = 1e-5f32;
        let mut b = Builder::new("ln");
        let x = b.input("x", DType::F32, &[rows, n]);
        let s = b.input("s", DType::F32, &[n]);
        let bb = b.input("b", DType::F32, &[n]);
        let y = b.node(
            Op::Nn(NnOp::LayerNormalization(LayerNormAttrs {
                axis: -1,
                epsilon: eps,
                stash_type: DType::F32,
                num_outputs: 1,
            })),
            &[Some(x), Some(s), Some(bb)],
        );
        let sum = b.node(reduce_op(K::Sum), &[Some(x)]);
        let mean = b.node(reduce_op(K::Mean), &[Some(x)]);
        let max = b.node(reduce_op(K::Max), &[Some(x)]);
        let g = b.finish(&[y, sum, mean, max]);
        let xs: Vec<f32> = values(rows * n, 3).iter().map(|v| v * 3.0 + 0.5).collect();
        let (sc, bi) = (values(n, 4), values(n, 5));
        let args = [
            Tensor::from_vec(&[rows, n], xs.clone()),
            Tensor::from_vec(&[n], sc.clone()),
            Tensor::from_vec(&[n], bi.clone()),
        ];
        let out = kiln_ir::interp::run(&g, &args).unwrap();
        let e = rel_err(&layer_norm_cpu(&xs, &sc, &bi, n, eps), &to_vec(&out[0]));
        assert!(e <= 1e-5, "layernorm {rows}x{n}: {e}");
        for (i, k) in ["sum", "mean", "max"].into_iter().enumerate() {
            let e = rel_err(&reduce_cpu(k, &xs, n), &to_vec(&out[i + 1]));
            assert!(e <= 1e-5, "{k} {rows}x{n}: {e}");
        }
    }
}

/// `Softmax(Q·Kᵀ·scale + mask)·V` through the interpreter against [`attention_cpu`]
/// (the causal mask as an additive `-inf` upper triangle).
#[test]
fn attention_reference_matches_interpreter() {
    for c in ATTN_CASES {
        let [bh, sq, skv, d] = c.dims;
        let q = values(bh * sq * d, 7);
        let k = values(bh * skv * d, 8);
        let v = values(bh * skv * d, 9);
        let mut kt = vec![0.0f32; k.len()];
        for b in 0..bh {
            for j in 0..skv {
                for x in 0..d {
                    kt[(b * d + x) * skv + j] = k[(b * skv + j) * d + x];
                }
            }
        }
        let mut mask = vec![0.0f32; sq * skv];
        if c.causal {
            for i in 0..sq {
                for j in i + 1..skv {
                    mask[i * skv + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mut b = Builder::new("attn");
        let qv = b.input("q", DType::F32, &[bh, sq, d]);
        let kv = b.input("kt", DType::F32, &[bh, d, skv]);
        let vv = b.input("v", DType::F32, &[bh, skv, d]);
        let mv = b.input("mask", DType::F32, &[sq, skv]);
        let s = b.konst("scale", Tensor::scalar(c.scale()));
        let qk = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(qv), Some(kv)]);
        let qk = b.binary(BinaryKind::Mul, qk, s);
        let qk = b.binary(BinaryKind::Add, qk, mv);
        let p = b.node(
            Op::Nn(NnOp::Softmax(SoftmaxAttrs {
                axis: -1,
                coerce_2d: false,
            })),
            &[Some(qk)],
        );
        let o = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(p), Some(vv)]);
        let g = b.finish(&[o]);
        let args = [
            Tensor::from_vec(&[bh, sq, d], q.clone()),
            Tensor::from_vec(&[bh, d, skv], kt),
            Tensor::from_vec(&[bh, skv, d], v.clone()),
            Tensor::from_vec(&[sq, skv], mask),
        ];
        let want = to_vec(&kiln_ir::interp::run(&g, &args).unwrap()[0]);
        let got = attention_cpu(&q, &k, &v, c.dims, c.scale(), c.causal);
        let e = rel_err(&got, &want);
        assert!(e <= 1e-5, "{}: {e}", c.name);
    }
}

/// The elementwise chain's CPU semantics ([`EwChain::eval`]) against the same ops through
/// the interpreter (broadcast `[rows, 1]` and `[cols]` operands).
#[test]
fn elementwise_chain_matches_interpreter() {
    let ch = ew_case();
    let (rows, cols) = (5, 13);
    let x = values(rows * cols, 11);
    let col = values(cols, 12);
    let row = values(rows, 13);
    let s = 0.75f32;
    let mut b = Builder::new("ew");
    let xv = b.input("x", DType::F32, &[rows, cols]);
    let cv = b.input("col", DType::F32, &[cols]);
    let rv = b.input("row", DType::F32, &[rows, 1]);
    let sv = b.konst("s", Tensor::scalar(s));
    let t = b.binary(BinaryKind::Mul, xv, cv);
    let t = b.binary(BinaryKind::Add, t, rv);
    let t = b.unary(UnaryKind::Tanh, t);
    let r = b.unary(UnaryKind::Relu, xv);
    let r = b.binary(BinaryKind::Mul, r, sv);
    let y = b.binary(BinaryKind::Sub, t, r);
    let y = b.unary(UnaryKind::Sigmoid, y);
    let g = b.finish(&[y]);
    let args = [
        Tensor::from_vec(&[rows, cols], x.clone()),
        Tensor::from_vec(&[cols], col.clone()),
        Tensor::from_vec(&[rows, 1], row.clone()),
    ];
    let want = to_vec(&kiln_ir::interp::run(&g, &args).unwrap()[0]);
    let got = ch.eval(&[&x, &col, &row], &[s], rows, cols).unwrap();
    let e = rel_err(&got, &want);
    assert!(e <= 1e-6, "{e}");
    let e = rel_err(&ew_case_cpu(&x, &col, &row, s, cols), &want);
    assert!(e <= 1e-6, "{e}");
}

fn emu_sku() -> &'static Sku {
    DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:sm_80")
        .unwrap()
}

fn buf(a: &EArg) -> Vec<f32> {
    match a {
        EArg::Buf(v) => v.clone(),
        _ => panic!("not a buffer"),
    }
}

/// Runs conv kernel `k` of case `ci` on the emulator with inputs rounded by `round` (what
/// its 16-bit buffers hold; identity for f32) and returns its relative error against the
/// CPU conv of the same values.
fn emulated_conv_error(
    ci: usize,
    c: &ConvCase,
    k: &GpuKernel,
    round: fn(&[f32]) -> Vec<f32>,
) -> f32 {
    let (xl, wl, yl) = c.lens();
    let x = round(&values(xl, 100 + ci as u64));
    let w = round(&values(wl, 200 + ci as u64));
    let bias = values(c.dims[4], 300 + ci as u64);
    let res = values(yl, 400 + ci as u64);
    let mut args = vec![EArg::Buf(x.clone()), EArg::Buf(w.clone())];
    if c.epilogue[0] {
        args.push(EArg::Buf(bias.clone()));
    }
    if c.epilogue[1] {
        args.push(EArg::Buf(res.clone()));
    }
    args.push(EArg::Buf(vec![f32::NAN; yl]));
    let (grid, block) = c.launch();
    gpu_emu::run(&k.mlir, grid, block, &mut args);
    let y = buf(args.last().unwrap());
    let want = conv_cpu(
        c,
        &x,
        &w,
        c.epilogue[0].then_some(&bias[..]),
        c.epilogue[1].then_some(&res[..]),
    );
    rel_err(&y, &want)
}

#[test]
fn emulated_conv_kernels_match_cpu() {
    for (ci, c) in CONV_CASES.iter().enumerate() {
        let k = conv_kernel(c, emu_sku());
        // The tensor-core cases read f16 buffers.
        let round = if c.mma { round_f16 } else { <[f32]>::to_vec };
        let e = emulated_conv_error(ci, c, &k, round);
        println!("{}: rel err {e:.2e}", c.name);
        assert!(e <= 1e-5, "{}: relative error {e}", c.name);
    }
}

/// The bf16 tensor-core conv (`nvvm.mma.sync` on packed registers) on the emulator: the
/// f16 mma cases with bf16 inputs against the CPU conv of the same (bf16-rounded) values.
#[test]
fn emulated_bf16_conv_kernels_match_cpu() {
    let mut n = 0;
    for (ci, c) in CONV_CASES.iter().enumerate().filter(|(_, c)| c.mma) {
        let layout = if c.nhwc {
            ConvLayout::Nhwc
        } else {
            ConvLayout::Nchw
        };
        let k = conv2d_mma(
            c.name,
            &geom(c),
            layout,
            epilogue(c),
            &mma_schedule(c),
            emu_sku(),
            MmaInput::BF16,
        )
        .unwrap();
        assert!(k.mlir.contains("nvvm.mma.sync"));
        let e = emulated_conv_error(ci, c, &k, round_bf16);
        println!("{} (bf16): rel err {e:.2e}", c.name);
        assert!(e <= 1e-5, "{} (bf16): relative error {e}", c.name);
        n += 1;
    }
    assert!(n >= 2, "{n} tensor-core conv cases");
}

#[test]
fn emulated_row_kernels_match_cpu() {
    for c in ROW_CASES {
        let k = row_kernel(c);
        for (si, &(rows, n)) in c.shapes.iter().enumerate() {
            let x: Vec<f32> = values(rows * n, 500 + si as u64)
                .iter()
                .map(|v| v * 4.0 + 1.0)
                .collect();
            let (grid, block) = c.launch(rows);
            let (got, want) = if c.op == "layernorm" {
                let (s, b) = (values(n, 600), values(n, 700));
                let eps = 1e-5;
                let mut args = vec![
                    EArg::Buf(x.clone()),
                    EArg::Buf(s.clone()),
                    EArg::Buf(b.clone()),
                    EArg::Buf(vec![f32::NAN; rows * n]),
                    EArg::Index(rows as i64),
                    EArg::Index(n as i64),
                    EArg::F32(eps),
                ];
                gpu_emu::run(&k.mlir, grid, block, &mut args);
                (buf(&args[3]), layer_norm_cpu(&x, &s, &b, n, eps))
            } else {
                let mut args = vec![
                    EArg::Buf(x.clone()),
                    EArg::Buf(vec![f32::NAN; rows]),
                    EArg::Index(rows as i64),
                    EArg::Index(n as i64),
                ];
                gpu_emu::run(&k.mlir, grid, block, &mut args);
                (buf(&args[1]), reduce_cpu(c.op, &x, n))
            };
            let e = rel_err(&got, &want);
            println!("{} {rows}x{n}: rel err {e:.2e}", c.name);
            assert!(e <= 1e-5, "{} {rows}x{n}: relative error {e}", c.name);
        }
    }
}

#[test]
fn emulated_elementwise_chain_matches_cpu() {
    let k = chain(EW_NAME, &ew_case()).unwrap();
    for &(rows, cols) in &EW_SHAPES[..1] {
        let x: Vec<f32> = values(rows * cols, 800).iter().map(|v| v * 3.0).collect();
        let (col, row, s) = (values(cols, 801), values(rows, 802), 0.75f32);
        let mut args = vec![
            EArg::Buf(x.clone()),
            EArg::Buf(col.clone()),
            EArg::Buf(row.clone()),
            EArg::F32(s),
            EArg::Buf(vec![f32::NAN; rows * cols]),
            EArg::Index(rows as i64),
            EArg::Index(cols as i64),
        ];
        // One block: the grid-stride loop covers the rest.
        gpu_emu::run(&k.mlir, [1, 1, 1], [256, 1, 1], &mut args);
        let e = rel_err(&buf(&args[4]), &ew_case_cpu(&x, &col, &row, s, cols));
        assert!(e <= 1e-5, "{rows}x{cols}: relative error {e}");
    }
}

#[test]
fn emulated_attention_kernels_match_cpu() {
    for (ci, c) in ATTN_CASES.iter().enumerate() {
        let k = attn_kernel(c, emu_sku());
        let [bh, sq, skv, d] = c.dims;
        let seed = 900 + 10 * ci as u64;
        let scale2 = |v: Vec<f32>| v.into_iter().map(|x| x * 2.0).collect::<Vec<f32>>();
        let mut q = scale2(values(bh * sq * d, seed));
        let mut kk = scale2(values(bh * skv * d, seed + 1));
        let mut v = values(bh * skv * d, seed + 2);
        if c.f16 {
            q = round_f16(&q);
            kk = round_f16(&kk);
            v = round_f16(&v);
        }
        let mut args = vec![
            EArg::Buf(q.clone()),
            EArg::Buf(kk.clone()),
            EArg::Buf(v.clone()),
            EArg::Buf(vec![f32::NAN; bh * sq * d]),
            EArg::Index(bh as i64),
            EArg::Index(sq as i64),
            EArg::Index(skv as i64),
        ];
        let (grid, block) = c.launch();
        gpu_emu::run(&k.mlir, grid, block, &mut args);
        let want = attention_cpu(&q, &kk, &v, c.dims, c.scale(), c.causal);
        let e = rel_err(&buf(&args[3]), &want);
        let tol = if c.f16 { 1e-2 } else { 1e-5 };
        println!("{}: rel err {e:.2e}", c.name);
        assert!(e <= tol, "{}: relative error {e}", c.name);
    }
}

/// The emulator is a real check: a kernel whose warp reduction reads the wrong lanes
/// (`gpu.shuffle idx` instead of `xor`) or whose block-level combine is wrong produces a
/// different result.
#[test]
fn emulator_catches_broken_kernels() {
    let c = &ROW_CASES[3]; // block-per-row ReduceSum
    let k = row_kernel(c);
    let (rows, n) = (3, 300);
    let x = values(rows * n, 5);
    let want = reduce_cpu("sum", &x, n);
    let run = |mlir: &str| {
        let mut args = vec![
            EArg::Buf(x.clone()),
            EArg::Buf(vec![0.0; rows]),
            EArg::Index(rows as i64),
            EArg::Index(n as i64),
        ];
        let (grid, block) = c.launch(rows);
        gpu_emu::run(mlir, grid, block, &mut args);
        rel_err(&buf(&args[1]), &want)
    };
    assert!(run(&k.mlir) <= 1e-5);
    assert!(k.mlir.contains("gpu.shuffle xor"));
    let bad = k.mlir.replace("gpu.shuffle xor", "gpu.shuffle idx");
    assert!(run(&bad) > 1e-3, "idx shuffles went unnoticed");
    let bad = k.mlir.replacen("arith.addf", "arith.maximumf", 1);
    assert!(run(&bad) > 1e-3, "a wrong partial sum went unnoticed");
}

/// The emulator's `mma.sync` fragment layouts agree with an independently written kernel:
/// the f16 tensor-core GEMM (`gemm_f16::gemm_f16_mma`) against a CPU matmul.
#[test]
fn emulated_gemm_f16_mma_matches_cpu() {
    use kiln_codegen::gpu::kernels::gemm_f16::{gemm_f16_mma, WARPS};
    let k = gemm_f16_mma("g");
    let (m, n, kk) = (19, 37, 40);
    let a = round_f16(&values(m * kk, 1));
    let b = round_f16(&values(kk * n, 2));
    let mut args = vec![
        EArg::Buf(a.clone()),
        EArg::Buf(b.clone()),
        EArg::Buf(vec![f32::NAN; m * n]),
        EArg::Index(m as i64),
        EArg::Index(n as i64),
        EArg::Index(kk as i64),
    ];
    let grid = [(n as u32).div_ceil(8 * WARPS), (m as u32).div_ceil(16), 1];
    gpu_emu::run(&k.mlir, grid, [32 * WARPS, 1, 1], &mut args);
    let want: Vec<f32> = (0..m * n)
        .map(|i| (0..kk).map(|p| a[i / n * kk + p] * b[p * n + i % n]).sum())
        .collect();
    let e = rel_err(&buf(&args[2]), &want);
    assert!(e <= 1e-5, "relative error {e}");
}

/// Shared arrays read with vector loads (`ld.shared.v2/v4`) are declared 16-byte aligned.
#[test]
fn shared_arrays_are_16_byte_aligned() {
    let sku = emu_sku();
    for k in runtime_kernels(sku) {
        let ptx = compile_kernel(&k, sku).unwrap().text;
        for line in ptx.lines().filter(|l| l.contains(".shared .align")) {
            assert!(line.contains(".align 16"), "{}: {line}", k.name);
        }
    }
}
