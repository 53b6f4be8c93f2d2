//! The code generator's integration tests, one module per file, in ONE test binary (each
//! test binary links LLVM and MLIR statically, about 300 MB). Run one file's tests with e.g.
//! `cargo test --release -p kiln-codegen --test kernels gpu_ptx::`.

mod common;
#[path = "common/gpu_emu.rs"]
mod gpu_emu;
#[path = "common/gpu_ref.rs"]
mod gpu_ref;
#[path = "common/ptxas.rs"]
mod ptxas;

mod conv_pool_kernels;
mod cpu_kernels;
mod fastmath;
mod gpu_gemm_ptx;
mod gpu_lower;
mod gpu_model_kernels;
mod gpu_ops_ptx;
mod gpu_ptx;
mod gpu_tune_emu;
mod graph_kernels;
mod matmul_transform;
mod properties;
mod reduction_movement;
