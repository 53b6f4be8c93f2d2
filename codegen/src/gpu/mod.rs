//! The CUDA code-generation path: kernels written in MLIR (`gpu`, `scf`, `memref`, `arith`,
//! `vector`, `nvgpu`) inside a `gpu.module`, lowered by MLIR's NVVM target to PTX for one SKU
//! of the device database. The runtime loads the PTX with the CUDA driver
//! (`kiln_runtime::cuda`, feature `cuda`); no PTX is written by hand.
//!
//! * [`device`]: the SKU database (`codegen/data/gpus.toml`) and `cuda:...` targets.
//! * [`pipeline`]: MLIR → NVVM → PTX ([`compile_kernel`]).
//! * [`kernels`]: elementwise, tiled f32 GEMM, f16 tensor-core GEMM, row softmax.
//!
//! # Kernel ABI
//! Kernel parameters follow MLIR's default memref lowering: every buffer parameter
//! `memref<?xT>` (always 1-D, row-major data indexed by the kernel) becomes five PTX
//! parameters `(allocated ptr, aligned ptr, offset: i64, size: i64, stride: i64)`; the
//! runtime passes `(p, p, 0, len, 1)`. `index` scalars are `i64`, `f32` scalars are `f32`.
//! [`GpuKernel::params`] lists the parameters at the MLIR level, in order.

pub mod device;
pub mod kernels;
pub mod lower;
pub mod pipeline;
pub mod ptxas;
pub mod tuning;

pub use device::{DeviceDb, Sku};
pub use pipeline::compile_kernel;

/// An error of the GPU path.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The device database is malformed.
    #[error("GPU device database: {0}")]
    Database(String),
    /// A target string names no known SKU.
    #[error("unknown GPU target '{target}'; known targets: {known}")]
    UnknownTarget {
        /// The target as given.
        target: String,
        /// Every accepted target, comma separated.
        known: String,
    },
    /// The kernel needs a feature (e.g. `mma.sync.f16`) the SKU lacks.
    #[error("kernel '{kernel}' needs '{feature}', which {sku} ({arch}) does not have")]
    Unsupported {
        /// The kernel name.
        kernel: String,
        /// The missing feature.
        feature: String,
        /// The SKU.
        sku: String,
        /// Its architecture.
        arch: String,
    },
    /// A schedule is invalid (zero or non-dividing tile sizes, too many threads, ...).
    #[error("invalid GPU schedule: {0}")]
    Schedule(String),
    /// A fusion kernel cannot be lowered to GPU kernels (the message names it and its ops).
    #[error("{0}")]
    Lowering(String),
    /// MLIR parsing, lowering or PTX serialization failed.
    #[error(transparent)]
    Codegen(#[from] crate::CodegenError),
}

/// Element type of a buffer parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer.
    I64,
    /// One byte (booleans).
    I8,
}

impl Elem {
    /// The MLIR type name.
    pub fn mlir(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::BF16 => "bf16",
            Elem::I64 => "i64",
            Elem::I8 => "i8",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::BF16 => 2,
            Elem::I64 => 8,
            Elem::I8 => 1,
        }
    }
}

/// One kernel parameter at the MLIR level (see the module docs for the PTX expansion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelParam {
    /// A `memref<?xT>` buffer (five PTX parameters).
    Buffer {
        /// Parameter name (documentation only).
        name: String,
        /// Element type.
        elem: Elem,
    },
    /// An `f32` scalar.
    F32(String),
    /// An `index` scalar (`i64` in PTX).
    Index(String),
    /// A TMA descriptor: the device address of a 64-byte-aligned `CUtensorMap` in global
    /// memory (one `u64` PTX parameter; see `kernels::gemm_wgmma`).
    TensorMap(String),
}

/// One GPU kernel: a `gpu.func` in MLIR text plus what is needed to launch it.
#[derive(Debug, Clone)]
pub struct GpuKernel {
    /// The kernel's entry symbol (the `gpu.func` name).
    pub name: String,
    /// One `gpu.func ... kernel` (plus private helpers), without the enclosing `gpu.module`.
    pub mlir: String,
    /// Parameters in order.
    pub params: Vec<KernelParam>,
    /// Threads per block `(x, y, z)` the kernel is written for.
    pub block: [u32; 3],
    /// Static shared memory the kernel declares, in bytes (checked against the SKU).
    pub shared_bytes: u32,
    /// Database features the kernel needs (`mma.sync.f16`, ...).
    pub requires: Vec<String>,
}

impl GpuKernel {
    /// Threads per block.
    pub fn threads(&self) -> u32 {
        self.block.iter().product()
    }

    /// The PTX target for `sku`: its architecture, or the architecture-specific variant
    /// (`sm_90a`) when the kernel uses `wgmma`, which exists only there.
    pub fn chip(&self, sku: &Sku) -> String {
        if self.requires.iter().any(|r| r == "wgmma") {
            format!("{}a", sku.arch)
        } else {
            sku.arch.clone()
        }
    }

    /// Checks that the SKU can run this kernel (features, block size, static shared
    /// memory).
    pub fn check_fits(&self, sku: &Sku) -> Result<(), GpuError> {
        if let Some(f) = self.requires.iter().find(|f| !sku.has(f)) {
            return Err(GpuError::Unsupported {
                kernel: self.name.clone(),
                feature: f.clone(),
                sku: sku.name.clone(),
                arch: sku.arch.clone(),
            });
        }
        if self.threads() == 0 || self.threads() > sku.max_threads_per_block {
            return Err(GpuError::Schedule(format!(
                "kernel '{}': {} threads per block (limit {} on {})",
                self.name,
                self.threads(),
                sku.max_threads_per_block,
                sku.name
            )));
        }
        if self.shared_bytes > sku.shared_mem_per_block {
            return Err(GpuError::Schedule(format!(
                "kernel '{}': {} B of static shared memory (limit {} on {})",
                self.name, self.shared_bytes, sku.shared_mem_per_block, sku.name
            )));
        }
        Ok(())
    }
}

/// PTX assembly for one kernel and one SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ptx {
    /// The PTX text (`.version`, `.target sm_XX`, one `.entry`).
    pub text: String,
    /// The entry symbol.
    pub entry: String,
    /// The architecture it targets (`sm_90`).
    pub arch: String,
}
