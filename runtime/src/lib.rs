//! Runtime: loads compiled artifacts and runs them (no LLVM/MLIR dependency).
pub mod kernel_lib;
