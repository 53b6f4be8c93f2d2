//! GPU kernels written as MLIR text (see [`gpu`](super) for the parameter ABI).
//!
//! * [`elementwise`]: fused `y = relu(x * a + b)` with a grid-stride loop.
//! * [`gemm`]: tiled f32 GEMM staged through shared memory, parametric [`gemm::GpuGemmSchedule`].
//! * [`gemm_f16`]: f16 GEMM on tensor cores (`nvgpu.mma.sync` m16n8k16, sm_80+).
//! * [`softmax`]: row softmax, one warp per row, `gpu.shuffle` reductions.
//! * [`gemm_mma`]: tensor-core GEMM for sm_80+ (f16/bf16/tf32, `cp.async` pipeline,
//!   `ldmatrix`, several `mma.sync` tiles per warp, batched, split-K) with fused
//!   [`epilogue`]s (bias, relu/gelu/sigmoid/silu, residual, alpha/beta).
//! * [`gemm_wgmma`]: sm_90 GEMM with `wgmma` on TMA-loaded, mbarrier-pipelined shared memory.
//! * [`gemm_select`]: picks the wgmma kernel where the SKU has `wgmma`, else `mma.sync`.
//! * [`conv`]: implicit-GEMM 2-D convolution (NCHW / NHWC, fused epilogue,
//!   [`conv::GpuConvSchedule`]); [`conv_mma`]: the same with f16 inputs on tensor cores
//!   (`nvgpu.mma.sync`); [`depthwise`]: depthwise convolution.
//! * [`norm`]: LayerNorm; [`reduce`]: last-axis Sum / Mean / Max ([`reduce::RowMode`]: a
//!   warp or a block per row).
//! * [`elementwise::chain`]: fused elementwise chains with broadcasting.
//! * [`attention`]: flash-style fused attention (f32 / f16, causal); [`attention_mma`]: the
//!   same on tensor cores (f16, `nvgpu.mma.sync`).
//! * [`emit`]: the MLIR text builder these generators share.

pub mod elementwise;
pub mod gemm;
pub mod gemm_f16;
pub mod softmax;

pub mod attention;
pub mod attention_mma;
pub mod conv;
pub mod conv_mma;
pub mod depthwise;
pub mod emit;
pub mod epilogue;
pub mod gemm_mma;
pub mod gemm_select;
pub mod gemm_wgmma;
pub mod norm;
pub mod reduce;

use super::GpuKernel;

/// Every kernel of this module with its default schedule (used by the PTX validation test
/// and as examples).
pub fn all_default() -> Result<Vec<GpuKernel>, super::GpuError> {
    Ok([
        elementwise::mul_add_relu("kiln_ew_mul_add_relu"),
        gemm::gemm_f32("kiln_gemm_f32", &gemm::GpuGemmSchedule::default())?,
        gemm::gemm_f32_batched(
            "kiln_gemm_f32_batched_split",
            &gemm::GpuGemmSchedule::for_batched(3, 128, 768, 768, 132),
        )?,
        softmax::row_softmax("kiln_softmax_rows", 4),
        gemm_f16::gemm_f16_mma("kiln_gemm_f16_mma"),
    ]
    .into_iter()
    .chain(gemm_mma::default_kernels()?.into_iter().map(|g| g.kernel))
    .chain(ops_default()?)
    .collect())
}

/// The conv, depthwise, normalization, reduction, elementwise-chain and attention kernels
/// with default schedules and representative static shapes (generated for the sm_80 limits,
/// which every SKU of the database meets).
pub fn ops_default() -> Result<Vec<GpuKernel>, super::GpuError> {
    use conv::{ConvGeom, ConvLayout, Epilogue, GpuConvSchedule};
    let sku = super::DeviceDb::builtin()?.parse_target("cuda:sm_80")?;
    let g = ConvGeom {
        n: 1,
        c: 64,
        h: 28,
        w: 28,
        oc: 64,
        kh: 3,
        kw: 3,
        stride: [1, 1],
        pads: [1, 1, 1, 1],
        dilation: [1, 1],
    };
    let epi = Epilogue {
        bias: true,
        residual: false,
        relu: true,
    };
    let s = GpuConvSchedule::default();
    let dw = ConvGeom { oc: g.c, ..g };
    let row = reduce::RowMode::Warp { rows_per_block: 4 };
    let blk = reduce::RowMode::Block { threads: 256 };
    Ok(vec![
        conv::conv2d("kiln_conv_nchw", &g, ConvLayout::Nchw, epi, &s, sku)?,
        conv::conv2d("kiln_conv_nhwc", &g, ConvLayout::Nhwc, epi, &s, sku)?,
        conv::conv2d_split_k("kiln_conv_nchw_s4", &g, &s, 4, sku)?,
        conv_mma::conv2d_f16_mma(
            "kiln_conv_f16_mma_nhwc",
            &g,
            ConvLayout::Nhwc,
            epi,
            &conv_mma::ConvMmaSchedule::default(),
            sku,
        )?,
        depthwise::depthwise_conv2d("kiln_dwconv", &dw, epi)?,
        norm::layer_norm("kiln_layernorm_warp", row)?,
        norm::layer_norm("kiln_layernorm_block", blk)?,
        reduce::reduce_rows("kiln_reduce_mean", reduce::ReduceKind::Mean, row)?,
        reduce::reduce_rows("kiln_reduce_sum_block", reduce::ReduceKind::Sum, blk)?,
        attention::attention(
            "kiln_attention_f32",
            &attention::AttentionSpec::new(64, false, super::Elem::F32),
            sku,
        )?,
        attention::attention(
            "kiln_attention_f16_causal",
            &attention::AttentionSpec::new(64, true, super::Elem::F16),
            sku,
        )?,
        attention_mma::attention_f16_mma(
            "kiln_attention_f16_mma",
            &attention::AttentionSpec::new(64, true, super::Elem::F16),
            sku,
        )?,
    ])
}

/// Launch geometry: blocks per grid for `n` items, `per_block` items per block, capped at
/// `max_blocks` (grid-stride kernels cover the rest).
pub fn blocks_for(n: u64, per_block: u64, max_blocks: u64) -> u32 {
    let b = n.div_ceil(per_block.max(1)).clamp(1, max_blocks.max(1));
    u32::try_from(b).unwrap_or(u32::MAX)
}

/// The tuning space of the block-tiled SIMT kernels (f32 GEMM, f32 conv): block tile
/// `bm × bn`, stage depth `bk`, thread tile `tm × tn`.
pub fn block_tile_space() -> kiln_tune::Space {
    use kiln_tune::Param;
    kiln_tune::Space::new(vec![
        Param::new("bm", &[16, 32, 64, 128]),
        Param::new("bn", &[16, 32, 64, 128]),
        Param::new("bk", &[4, 8, 16, 32]),
        Param::new("tm", &[1, 2, 4, 8]),
        Param::new("tn", &[1, 2, 4, 8]),
    ])
}
