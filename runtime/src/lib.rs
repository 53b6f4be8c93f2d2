//! Runtime: loads compiled artifacts and runs them (no LLVM/MLIR dependency).
pub mod artifact;
pub mod kernel_lib;
pub mod plan;
