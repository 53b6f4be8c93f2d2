//! Launch geometry and dispatch of `gpu::lower::lower_partition` on small graphs: which
//! kernel each fusion kernel becomes, its grid/block and buffer offsets as functions of the
//! static shapes, and the error for what is not lowered. (Numerical results are checked in
//! the root crate's `tests/gpu_compile.rs` by running the plans on the CPU.)

use kiln_codegen::gpu::kernels::gemm::GpuGemmSchedule;
use kiln_codegen::gpu::lower::{lower_partition, LaunchArg, LowerOptions, Operand};
use kiln_codegen::gpu::{DeviceDb, GpuError};
use kiln_ir::ops::elementwise::UnaryKind;
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::{NnOp, SoftmaxAttrs};
use kiln_ir::{DType, Graph, Op};

mod common;
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
    let grid = GpuGemmSchedule::default().grid(5, 4);
    for (bi, la) in l.launches.iter().enumerate() {
        let (b0, b1) = (bi / 3, bi % 3);
        assert_eq!(la.kernel, "kiln_gemm_f32");
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
