//! Code generation: lowers fused kernels through MLIR (melior) and LLVM (inkwell).
