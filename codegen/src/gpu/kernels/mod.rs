//! GPU kernels written as MLIR text (see [`gpu`](super) for the parameter ABI).
//!
//! * [`elementwise`]: fused `y = relu(x * a + b)` with a grid-stride loop.
//! * [`gemm`]: tiled f32 GEMM staged through shared memory, parametric [`gemm::GpuGemmSchedule`].
//! * [`gemm_f16`]: f16 GEMM on tensor cores (`nvgpu.mma.sync` m16n8k16, sm_80+).
//! * [`softmax`]: row softmax, one warp per row, `gpu.shuffle` reductions.

pub mod elementwise;
pub mod gemm;
pub mod gemm_f16;
pub mod softmax;

pub mod conv;
pub mod emit;

use super::GpuKernel;

/// Every kernel of this module with its default schedule (used by the PTX validation test
/// and as examples).
pub fn all_default() -> Result<Vec<GpuKernel>, super::GpuError> {
    Ok(vec![
        elementwise::mul_add_relu("kiln_ew_mul_add_relu"),
        gemm::gemm_f32("kiln_gemm_f32", &gemm::GpuGemmSchedule::default())?,
        softmax::row_softmax("kiln_softmax_rows", 4),
        gemm_f16::gemm_f16_mma("kiln_gemm_f16_mma"),
    ])
}

/// Launch geometry: blocks per grid for `n` items, `per_block` items per block, capped at
/// `max_blocks` (grid-stride kernels cover the rest).
pub fn blocks_for(n: u64, per_block: u64, max_blocks: u64) -> u32 {
    let b = n.div_ceil(per_block.max(1)).clamp(1, max_blocks.max(1));
    u32::try_from(b).unwrap_or(u32::MAX)
}
