//! Launch geometry and dispatch of `gpu::lower::lower_partition` on small graphs: which
//! kernel each fusion kernel becomes, its grid/block and buffer offsets as functions of the
//! static shapes, and the error for what is not lowered. (Numerical results are checked in
//! the root crate's `tests/gpu_compile.rs` by running the plans on the CPU.)

use kiln_codegen::gpu::kernels::conv::{ConvGeom, Epilogue, GpuConvSchedule};
use kiln_codegen::gpu::kernels::depthwise;
use kiln_codegen::gpu::kernels::gemm::GpuGemmSchedule;
use kiln_codegen::gpu::kernels::reduce::ReduceKind as RowReduce;
use kiln_codegen::gpu::lower::{lower_partition, HostKernel, LaunchArg, LowerOptions, Operand};
use kiln_codegen::gpu::tuning::gemm_f32_name;
use kiln_codegen::gpu::{DeviceDb, GpuError};
use kiln_ir::ops::elementwise::{BinaryKind, UnaryKind};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::{AutoPad, ConvAttrs, LayerNormAttrs, NnOp, SoftmaxAttrs, WindowAttrs};
use kiln_ir::ops::reduce::{ReduceAxes, ReduceKind, ReduceOp};
use kiln_ir::{DType, Graph, Op, Tensor, ValueId};

use crate::common;
use common::*;

fn opts() -> LowerOptions {
    LowerOptions::for_sku(DeviceDb::builtin().unwrap().get("h100").unwrap())
}

fn lower(g: &Graph) -> Result<kiln_codegen::gpu::lower::GpuLowering, GpuError> {
    lower_partition(g, &kiln_passes::partition(g), &opts())
}

/// `(offset, len)` of buffer argument `i`.
fn view(a: &[LaunchArg], i: usize) -> (u64, u64) {
    match &a[i] {
        LaunchArg::Buf { offset, len, .. } => (*offset, *len),
        other => panic!("arg {i} is {other:?}"),
    }
}

#[test]
fn batched_matmul_is_one_gemm_per_batch_with_broadcast_offsets() {
    let mut b = Builder::new("bmm");
    let x = b.input("x", DType::F32, &[2, 1, 5, 7]);
    let w = b.input("w", DType::F32, &[3, 7, 4]);
    let y = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    assert_eq!(l.launches.len(), 6);
    // the untuned schedule of a 5-row product: 16-row tiles, K = 7 not split
    let s = GpuGemmSchedule::for_problem(5, 4, 7, 132);
    assert_eq!((s.bm, s.split_k), (16, 1));
    let grid = s.grid(5, 4);
    for (bi, la) in l.launches.iter().enumerate() {
        let (b0, b1) = (bi / 3, bi % 3);
        assert_eq!(la.kernel, gemm_f32_name(&s));
        assert!(!la.generic);
        assert_eq!(la.grid, grid);
        assert_eq!(view(&la.args, 0), ((b0 * 35) as u64, 35));
        assert_eq!(view(&la.args, 1), ((b1 * 28) as u64, 28));
        assert_eq!(view(&la.args, 2), ((bi * 20) as u64, 20));
        assert_eq!(
            la.args[3..],
            [
                LaunchArg::Index(5),
                LaunchArg::Index(4),
                LaunchArg::Index(7)
            ]
        );
    }
    // One GEMM kernel in the module, whatever the number of launches.
    assert_eq!(l.kernels.len(), 1);
}

/// Evenly spaced batches (one matrix per batch in both operands, or one A broadcast to
/// every B: eqsat's stacked projections) are one launch of the batched kernel over grid.z,
/// with the strides as scalars.
#[test]
fn evenly_spaced_batches_are_one_batched_launch() {
    for (a_shape, sa) in [(vec![3usize, 5, 7], 35u64), (vec![5, 7], 0)] {
        let mut b = Builder::new("bmm");
        let x = b.input("x", DType::F32, &a_shape);
        let w = b.input("w", DType::F32, &[3, 7, 4]);
        let y = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
        let g = b.finish(&[y]);
        let l = lower(&g).unwrap();
        assert_eq!(l.launches.len(), 1, "{:#?}", l.launches);
        let la = &l.launches[0];
        let s = GpuGemmSchedule::for_batched(3, 5, 4, 7, 132);
        assert_eq!(la.kernel, format!("{}_batched", gemm_f32_name(&s)));
        assert_eq!(la.grid, s.grid_batched(3, 5, 4));
        assert_eq!(la.grid[2], 3);
        assert_eq!(view(&la.args, 0), (0, 2 * sa + 35));
        assert_eq!(view(&la.args, 1), (0, 3 * 28));
        assert_eq!(view(&la.args, 2), (0, 3 * 20));
        let scalars: Vec<i64> = [5, 4, 7, sa as i64, 28, 20].to_vec();
        assert_eq!(
            la.args[3..],
            scalars
                .iter()
                .map(|&v| LaunchArg::Index(v))
                .collect::<Vec<_>>()[..]
        );
    }
}

#[test]
fn matmul_with_2d_weight_folds_the_batch_and_runs_its_epilogue_in_place() {
    let mut b = Builder::new("mm_relu");
    let x = b.input("x", DType::F32, &[3, 5, 7]);
    let w = b.input("w", DType::F32, &[7, 4]);
    let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
    let y = b.unary(UnaryKind::Relu, mm);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    assert_eq!(l.launches.len(), 2, "{:#?}", l.launches);
    let (gemm, epi) = (&l.launches[0], &l.launches[1]);
    assert_eq!(gemm.args[3], LaunchArg::Index(15));
    assert!(epi.generic && epi.kernel.ends_with("_epilogue"));
    // The epilogue reads and writes the GEMM's output buffer (the kernel output y).
    assert!(epi
        .args
        .iter()
        .all(|a| matches!(a, LaunchArg::Buf { operand: Operand::Value(v), .. } if *v == y)));
    assert_eq!(epi.grid, [1, 1, 1]); // 60 elements, 256 threads per block
    assert_eq!(l.generic_epilogues(), vec![0]);
    assert!(l.generic_kernels().is_empty());
    // Generic-only: one kernel with the dot product and the epilogue inline.
    let only = lower_partition(
        &g,
        &kiln_passes::partition(&g),
        &LowerOptions {
            specialized: false,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(only.launches.len(), 1);
    assert_eq!(only.generic_kernels(), vec![0]);
}

#[test]
fn softmax_uses_the_warp_per_row_kernel() {
    let mut b = Builder::new("softmax");
    let x = b.input("x", DType::F32, &[2, 3, 5, 7]);
    let a = SoftmaxAttrs {
        axis: -1,
        coerce_2d: false,
    };
    let y = b.node(Op::Nn(NnOp::Softmax(a)), &[Some(x)]);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    let [la] = &l.launches[..] else { panic!() };
    assert_eq!(la.kernel, "kiln_softmax_rows");
    assert_eq!((la.grid, la.block), ([8, 1, 1], [32, 4, 1]));
    assert_eq!(la.args[2..], [LaunchArg::Index(30), LaunchArg::Index(7)]);
}

#[test]
fn generic_grids_cover_the_items_up_to_the_cap() {
    let mut b = Builder::new("ew");
    let x = b.input("x", DType::F32, &[1000]);
    let y = b.unary(UnaryKind::Tanh, x);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    assert_eq!(
        (l.launches[0].grid, l.launches[0].block),
        ([4, 1, 1], [256, 1, 1])
    );
    let mut b = Builder::new("ew_big");
    let x = b.input("x", DType::F32, &[1 << 24]);
    let y = b.unary(UnaryKind::Tanh, x);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    let sms = DeviceDb::builtin().unwrap().get("h100").unwrap().sm_count;
    assert_eq!(l.launches[0].grid, [32 * sms, 1, 1]);
}

#[test]
fn kernels_without_a_gpu_lowering_are_errors_naming_kernel_and_op() {
    let mut b = Builder::new("softmax0");
    let x = b.input("x", DType::F32, &[4, 6]);
    let a = SoftmaxAttrs {
        axis: 0,
        coerce_2d: false,
    };
    let y = b.node(Op::Nn(NnOp::Softmax(a)), &[Some(x)]);
    let g = b.finish(&[y]);
    let e = lower(&g).err().unwrap().to_string();
    assert!(
        e.contains("kernel k0 (Reduction: Softmax) cannot be lowered to the GPU")
            && e.contains("axis 0"),
        "{e}"
    );
}

/// A Conv node `x * w (+ b)` with stride `s`, symmetric pad `p`, dilation 1 and `group`.
fn conv_node(
    b: &mut Builder,
    x: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
    (s, p, group): (usize, usize, usize),
) -> ValueId {
    let window = WindowAttrs {
        auto_pad: AutoPad::NotSet,
        kernel_shape: None,
        strides: Some(vec![s, s]),
        dilations: Some(vec![1, 1]),
        pads: Some(vec![p; 4]),
    };
    b.node(
        Op::Nn(NnOp::Conv(ConvAttrs { window, group })),
        &[Some(x), Some(w), bias],
    )
}

fn h100() -> &'static kiln_codegen::gpu::Sku {
    DeviceDb::builtin().unwrap().get("h100").unwrap()
}

fn geom(n: u64, c: u64, hw: u64, oc: u64, k: u64, s: u64, p: u64) -> ConvGeom {
    ConvGeom {
        n,
        c,
        h: hw,
        w: hw,
        oc,
        kh: k,
        kw: k,
        stride: [s, s],
        pads: [p; 4],
        dilation: [1, 1],
    }
}

#[test]
fn conv_bias_residual_relu_is_one_implicit_gemm_conv_launch() {
    let mut b = Builder::new("conv_res");
    let x = b.input("x", DType::F32, &[2, 8, 10, 10]);
    let w = b.konst(
        "w",
        Tensor::from_vec(&[16, 8, 3, 3], vec![0.5f32; 16 * 8 * 9]),
    );
    let bias = b.konst("b", Tensor::from_vec(&[16], vec![1f32; 16]));
    let r = b.input("r", DType::F32, &[2, 16, 5, 5]);
    let c = conv_node(&mut b, x, w, Some(bias), (2, 1, 1));
    let a = b.binary(BinaryKind::Add, r, c);
    let y = b.unary(UnaryKind::Relu, a);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    let [la] = &l.launches[..] else {
        panic!("{:#?}", l.launches)
    };
    assert!(!la.generic);
    // End pads are only what the output size needs (the kernel zero-fills outside X).
    let gm = ConvGeom {
        pads: [1, 1, 0, 0],
        ..geom(2, 8, 10, 16, 3, 2, 1)
    };
    let (grid, block) = GpuConvSchedule::for_geom(&gm, h100()).launch(&gm).unwrap();
    assert_eq!((la.grid, la.block), (grid, block));
    // X, W, bias, residual, Y.
    assert_eq!(la.args.len(), 5);
    assert_eq!(view(&la.args, 3), (0, 2 * 16 * 25));
    assert!(matches!(&la.args[3], LaunchArg::Buf { operand: Operand::Value(v), .. } if *v == r));
    assert!(matches!(&la.args[4], LaunchArg::Buf { operand: Operand::Value(v), .. } if *v == y));
    let epi = Epilogue {
        bias: true,
        residual: true,
        relu: true,
    };
    assert_eq!(
        l.host_kernel(&la.kernel),
        Some(&HostKernel::Conv { geom: gm, epi })
    );
    assert!(l.generic_kernels().is_empty() && l.generic_epilogues().is_empty());
    // Generic-only mode: one direct-conv kernel.
    let only = lower_partition(
        &g,
        &kiln_passes::partition(&g),
        &LowerOptions {
            specialized: false,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(only.launches.len(), 1);
    assert_eq!(only.generic_kernels(), vec![0]);
}

#[test]
fn conv_with_another_epilogue_runs_it_in_place_after_the_conv() {
    let mut b = Builder::new("conv_sig");
    let x = b.input("x", DType::F32, &[1, 3, 7, 7]);
    let w = b.konst("w", Tensor::from_vec(&[5, 3, 1, 1], vec![0.25f32; 15]));
    let c = conv_node(&mut b, x, w, None, (1, 0, 1));
    let y = b.unary(UnaryKind::Sigmoid, c);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    let [conv, epi] = &l.launches[..] else {
        panic!("{:#?}", l.launches)
    };
    assert!(!conv.generic && epi.generic);
    let gm = geom(1, 3, 7, 5, 1, 1, 0);
    assert_eq!(
        l.host_kernel(&conv.kernel),
        Some(&HostKernel::Conv {
            geom: gm,
            epi: Epilogue::default()
        })
    );
    // The conv writes the output buffer; the epilogue reads and rewrites it.
    assert_eq!(conv.args.len(), 3);
    assert!(matches!(&conv.args[2], LaunchArg::Buf { operand: Operand::Value(v), .. } if *v == y));
    assert_eq!(l.generic_epilogues(), vec![0]);
}

#[test]
fn depthwise_conv_uses_the_depthwise_kernel() {
    let mut b = Builder::new("dw");
    let x = b.input("x", DType::F32, &[1, 8, 9, 9]);
    let w = b.konst("w", Tensor::from_vec(&[8, 1, 3, 3], vec![0.1f32; 72]));
    let bias = b.konst("b", Tensor::from_vec(&[8], vec![0.5f32; 8]));
    let c = conv_node(&mut b, x, w, Some(bias), (1, 1, 8));
    let y = b.unary(UnaryKind::Relu, c);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    let [la] = &l.launches[..] else {
        panic!("{:#?}", l.launches)
    };
    assert!(!la.generic);
    let gm = geom(1, 8, 9, 8, 3, 1, 1);
    assert_eq!((la.grid, la.block), depthwise::launch(&gm, h100()));
    assert_eq!(la.args.len(), 4);
    let epi = Epilogue {
        bias: true,
        residual: false,
        relu: true,
    };
    assert_eq!(
        l.host_kernel(&la.kernel),
        Some(&HostKernel::Depthwise { geom: gm, epi })
    );
    // A grouped conv that is neither (1 < groups < C) stays generic.
    let mut b = Builder::new("grouped");
    let x = b.input("x", DType::F32, &[1, 8, 9, 9]);
    let w = b.konst("w", Tensor::from_vec(&[8, 2, 3, 3], vec![0.1f32; 144]));
    let y = conv_node(&mut b, x, w, None, (1, 1, 4));
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    assert_eq!(l.generic_kernels(), vec![0]);
}

#[test]
fn layer_norm_uses_the_row_kernel_warp_or_block_by_row_length() {
    for (cols, block, grid) in [
        (64usize, [32, 4, 1], [3, 1, 1]),
        (2048, [256, 1, 1], [10, 1, 1]),
    ] {
        let mut b = Builder::new("ln");
        let x = b.input("x", DType::F32, &[2, 5, cols]);
        let sc = b.konst("s", Tensor::from_vec(&[cols], vec![1.5f32; cols]));
        let bi = b.konst("b", Tensor::from_vec(&[cols], vec![0.5f32; cols]));
        let a = LayerNormAttrs {
            axis: -1,
            epsilon: 1e-3,
            stash_type: DType::F32,
            num_outputs: 1,
        };
        let y = b.node(
            Op::Nn(NnOp::LayerNormalization(a)),
            &[Some(x), Some(sc), Some(bi)],
        );
        let g = b.finish(&[y]);
        let l = lower(&g).unwrap();
        let [la] = &l.launches[..] else {
            panic!("{:#?}", l.launches)
        };
        assert!(!la.generic);
        let mode = if cols <= 1024 { "warp4" } else { "block256" };
        assert_eq!(la.kernel, format!("kiln_layer_norm_{mode}"));
        assert_eq!((la.grid, la.block), (grid, block));
        assert_eq!(view(&la.args, 1), (0, cols as u64));
        assert_eq!(
            la.args[4..],
            [
                LaunchArg::Index(10),
                LaunchArg::Index(cols as i64),
                LaunchArg::F32(1e-3)
            ]
        );
        assert_eq!(l.host_kernel(&la.kernel), Some(&HostKernel::LayerNorm));
    }
}

#[test]
fn last_axis_reductions_use_the_row_kernel_unless_fused() {
    let reduce = |kind| {
        Op::Reduce(ReduceOp::Reduce {
            kind,
            axes: ReduceAxes::Attr(Some(vec![-1])),
            keepdims: true,
            noop_with_empty_axes: false,
        })
    };
    let mut b = Builder::new("rmean");
    let x = b.input("x", DType::F32, &[3, 4, 100]);
    let y = b.node(reduce(ReduceKind::Mean), &[Some(x)]);
    let g = b.finish(&[y]);
    let l = lower(&g).unwrap();
    let [la] = &l.launches[..] else {
        panic!("{:#?}", l.launches)
    };
    assert!(!la.generic);
    assert_eq!(la.kernel, "kiln_reduce_mean_warp4");
    assert_eq!((la.grid, la.block), ([3, 1, 1], [32, 4, 1]));
    assert_eq!(view(&la.args, 1), (0, 12));
    assert_eq!(la.args[2..], [LaunchArg::Index(12), LaunchArg::Index(100)]);
    assert_eq!(
        l.host_kernel(&la.kernel),
        Some(&HostKernel::Reduce(RowReduce::Mean))
    );
    // With a prologue (exp) it stays on the generic path; ReduceMin has no row kernel.
    let mut b = Builder::new("rsum_exp");
    let x = b.input("x", DType::F32, &[3, 100]);
    let e = b.unary(UnaryKind::Exp, x);
    let y = b.node(reduce(ReduceKind::Sum), &[Some(e)]);
    let g = b.finish(&[y]);
    assert_eq!(lower(&g).unwrap().generic_kernels(), vec![0]);
    let mut b = Builder::new("rmin");
    let x = b.input("x", DType::F32, &[3, 100]);
    let y = b.node(reduce(ReduceKind::Min), &[Some(x)]);
    let g = b.finish(&[y]);
    assert_eq!(lower(&g).unwrap().generic_kernels(), vec![0]);
}

#[test]
fn residual_add_then_layer_norm_is_a_generic_prologue_then_the_row_kernel() {
    for add_is_output in [false, true] {
        let mut b = Builder::new("add_ln");
        let x = b.input("x", DType::F32, &[4, 32]);
        let r = b.input("r", DType::F32, &[4, 32]);
        let sc = b.konst("s", Tensor::from_vec(&[32], vec![1.5f32; 32]));
        let bi = b.konst("b", Tensor::from_vec(&[32], vec![0.5f32; 32]));
        let s = b.binary(BinaryKind::Add, x, r);
        let a = LayerNormAttrs {
            axis: -1,
            epsilon: 1e-5,
            stash_type: DType::F32,
            num_outputs: 1,
        };
        let y = b.node(
            Op::Nn(NnOp::LayerNormalization(a)),
            &[Some(s), Some(sc), Some(bi)],
        );
        let outs = if add_is_output { vec![y, s] } else { vec![y] };
        let g = b.finish(&outs);
        let p = kiln_passes::partition(&g);
        let l = lower_partition(&g, &p, &opts()).unwrap();
        assert_eq!(p.kernels.len(), 1, "Add and LayerNorm fused");
        let [pro, ln] = &l.launches[..] else {
            panic!("{:#?}", l.launches)
        };
        assert!(pro.generic && !ln.generic);
        assert_eq!(ln.kernel, "kiln_layer_norm_warp4");
        // The prologue writes the buffer LayerNorm reads: the sum's if it is an output,
        // else LayerNorm's own output (normalized in place).
        let src = if add_is_output { s } else { y };
        assert!(
            matches!(&ln.args[0], LaunchArg::Buf { operand: Operand::Value(v), .. } if *v == src)
        );
        assert!(
            matches!(&ln.args[3], LaunchArg::Buf { operand: Operand::Value(v), .. } if *v == y)
        );
        assert_eq!(l.generic_epilogues(), vec![0]);
    }
}
