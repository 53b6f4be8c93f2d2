//! Which tensor-core GEMM serves a problem on a SKU: the sm_90 warpgroup kernel
//! ([`gemm_wgmma`]) when the SKU has `wgmma` (database feature) and the problem fits it
//! (f16/bf16, one matrix, `N` and `K` multiples of 8), else the `mma.sync` kernel
//! ([`gemm_mma`]) with the widest `cp.async` the shapes allow.

use super::epilogue::Epilogue;
use super::gemm_mma::{gemm_mma, MmaGemm, MmaInput, MmaOutput, MmaSchedule};
use super::gemm_wgmma::{gemm_wgmma, WgmmaGemm, WgmmaSchedule};
use crate::gpu::{GpuError, Sku};

/// A GEMM problem as the kernels see it (row-major, element strides between batches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmProblem {
    /// Rows of A and C.
    pub m: u64,
    /// Columns of B and C.
    pub n: u64,
    /// Columns of A, rows of B.
    pub k: u64,
    /// Number of matrices (grid.z).
    pub batch: u64,
    /// Elements between consecutive A matrices.
    pub stride_a: u64,
    /// Elements between consecutive B matrices (0: one B for all).
    pub stride_b: u64,
    /// Input element type.
    pub input: MmaInput,
    /// Output element type.
    pub output: MmaOutput,
}

/// The kernel chosen by [`select`].
#[derive(Debug, Clone)]
pub enum TensorCoreGemm {
    /// `mma.sync` + `cp.async` (sm_80+).
    Mma(MmaGemm),
    /// TMA + `wgmma` (sm_90).
    Wgmma(WgmmaGemm),
}

impl TensorCoreGemm {
    /// The generated kernel.
    pub fn kernel(&self) -> &crate::gpu::GpuKernel {
        match self {
            TensorCoreGemm::Mma(g) => &g.kernel,
            TensorCoreGemm::Wgmma(g) => &g.kernel,
        }
    }
}

/// Chooses and generates the tensor-core GEMM `name` for `p` on `sku` with the default
/// schedule of that kernel (for `wgmma`, [`WgmmaSchedule::for_problem`]). Fails naming the reason when neither kernel can compute `p`
/// (e.g. an odd `K` with 16-bit inputs: no `cp.async` width divides it; use the SIMT
/// `gemm_f32` on f32 data) or the SKU has no tensor cores for the input type.
pub fn select(
    name: &str,
    p: &GemmProblem,
    epilogue: &Epilogue,
    sku: &Sku,
) -> Result<TensorCoreGemm, GpuError> {
    let ws = WgmmaSchedule::for_problem(p.m, p.n, p.output, sku.sm_count);
    let wgmma_fits = p.input != MmaInput::TF32
        && p.batch <= 1
        && p.n.is_multiple_of(8)
        && p.k.is_multiple_of(8)
        && p.n > 0
        && p.k > 0;
    if wgmma_fits && ws.validate(sku).is_ok() {
        return Ok(TensorCoreGemm::Wgmma(gemm_wgmma(
            name, p.input, p.output, epilogue, &ws,
        )?));
    }
    let eb = u64::from(p.input.bytes());
    let aligned = |ve: u64| {
        [p.n, p.k, p.stride_a, p.stride_b]
            .iter()
            .all(|v| v.is_multiple_of(ve))
    };
    let vec_bytes = [16u32, 8, 4]
        .into_iter()
        .filter(|&v| u64::from(v) >= eb)
        .find(|&v| aligned(u64::from(v) / eb))
        .ok_or_else(|| {
            GpuError::Schedule(format!(
                "{name}: N = {}, K = {} and the batch strides must be multiples of {} for \
                 the tensor-core GEMMs' cp.async copies",
                p.n,
                p.k,
                4 / eb
            ))
        })?;
    let s = MmaSchedule {
        vec_bytes,
        ..MmaSchedule::default()
    };
    s.validate(p.input, sku)?;
    Ok(TensorCoreGemm::Mma(gemm_mma(
        name, p.input, p.output, epilogue, &s,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::DeviceDb;

    fn problem(n: u64, k: u64, batch: u64, input: MmaInput) -> GemmProblem {
        GemmProblem {
            m: 512,
            n,
            k,
            batch,
            stride_a: 512 * k * u64::from(batch > 1),
            stride_b: 0,
            input,
            output: MmaOutput::F32,
        }
    }

    #[test]
    fn wgmma_on_sm_90_mma_elsewhere() {
        let db = DeviceDb::builtin().unwrap();
        let h100 = db.parse_target("cuda:h100").unwrap();
        let a100 = db.parse_target("cuda:a100").unwrap();
        let e = Epilogue::none();
        let p = problem(1024, 1024, 1, MmaInput::F16);
        assert!(matches!(
            select("g", &p, &e, h100).unwrap(),
            TensorCoreGemm::Wgmma(_)
        ));
        assert!(matches!(
            select("g", &p, &e, a100).unwrap(),
            TensorCoreGemm::Mma(_)
        ));
        // Batched, tf32 or N not a multiple of 8: mma.sync even on sm_90, with narrower
        // copies where the shapes need them.
        for (q, vec) in [
            (problem(1024, 1024, 4, MmaInput::F16), 16),
            (problem(1024, 1024, 1, MmaInput::TF32), 16),
            (problem(1020, 1024, 1, MmaInput::BF16), 8),
            (problem(1024, 1026, 1, MmaInput::F16), 4),
        ] {
            match select("g", &q, &e, h100).unwrap() {
                TensorCoreGemm::Mma(g) => assert_eq!(g.schedule.vec_bytes, vec, "{q:?}"),
                TensorCoreGemm::Wgmma(_) => panic!("{q:?}: wgmma"),
            }
        }
        // Odd K with 16-bit inputs: no copy width fits.
        let err = select("g", &problem(64, 63, 1, MmaInput::F16), &e, a100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiples of 2"), "{err}");
    }
}
