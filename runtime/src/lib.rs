//! Runtime: loads compiled artifacts and runs them (no LLVM/MLIR dependency).
//!
//! - [`plan`]: the execution plan the compiler fills in.
//! - [`artifact`]: the `MODEL.kiln` file format (plan + weights + kernel library).
//! - [`executor`]: [`Model`] loads an artifact once and runs it.
//! - [`cluster`]: sharded artifacts (one program per rank) and their execution over a
//!   [`cluster::Transport`] (MPI with feature `mpi`: `mpi_transport`; GPU to GPU through
//!   NCCL with feature `nccl`: `nccl_transport`).
//! - [`kernel_lib`]: loading kernel shared libraries and calling kernels.
//! - `reference`: steps without compiled code, run by the reference interpreter.
//! - `cuda` (feature `cuda`): loading PTX and launching kernels on NVIDIA GPUs;
//!   `cuda_model`: runs a `cuda:SKU` artifact's GPU plan.
//! - [`pool`]: the spinning fork-join pool that runs a kernel's task ranges on several cores.
//! - [`split_choice`]: whether splitting steps over the pool pays on this machine now (timed).
//! - [`tune_bundle`]: GPU tuning bundles (candidates built elsewhere); `tune_measure`
//!   (feature `cuda`) times them on the GPU present.
mod affinity;
pub mod artifact;
pub mod cluster;
pub mod cubin_cache;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_model;
pub mod executor;
mod instance;
pub mod kernel_lib;
#[cfg(feature = "mpi")]
pub mod mpi_transport;
#[cfg(feature = "nccl")]
pub mod nccl_transport;
pub mod plan;
pub mod pool;
mod reference;
pub mod split_choice;
pub mod tune_bundle;
#[cfg(feature = "cuda")]
pub mod tune_measure;

pub use artifact::{Artifact, ArtifactError};
pub use executor::{AlignedBuf, LoadError, Model, RunError, Tensor, TensorView};
pub use plan::{
    BufRef, DType, DimExpr, DimSpec, DynamicTail, ExecPlan, GpuArg, GpuPlan, GpuStep, IoSpec, Step,
    SymBound, WeightSpec,
};
