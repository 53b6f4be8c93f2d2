//! Code generation: lowers fused kernels through MLIR (`melior`) and LLVM (`inkwell`) to
//! x86-64 object code (and, for GPU targets, PTX).
//!
//! For now this crate holds the two toolchain entry points that everything else builds on:
//! [`mlir::run_pipeline`] (parse MLIR text, run a named pass pipeline) and
//! [`llvm::emit_object`] (LLVM IR text → optimised object code for a named CPU), and the
//! CPU kernel path built on them, [`cpu`]: MLIR kernels → LLVM IR → object code → one
//! shared library with a uniform C ABI; and the CUDA path, [`gpu`]: MLIR kernels in a
//! `gpu.module` → PTX per SKU of a device database.

pub mod cpu;
pub mod gpu;
pub mod llvm;
pub mod mlir;

/// An error from MLIR or LLVM.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// MLIR text could not be parsed.
    #[error("MLIR parse error in {what}")]
    MlirParse {
        /// What was being parsed.
        what: String,
    },
    /// A pass pipeline failed or could not be parsed.
    #[error("MLIR pass pipeline '{pipeline}' failed: {msg}")]
    MlirPass {
        /// The pipeline text.
        pipeline: String,
        /// MLIR's message.
        msg: String,
    },
    /// Translating the LLVM dialect to LLVM IR failed.
    #[error("MLIR to LLVM IR translation: {0}")]
    Translate(String),
    /// Linking the shared library failed.
    #[error("link: {0}")]
    Link(String),
    /// LLVM failed (bad IR, unknown target or CPU, emission failure).
    #[error("LLVM: {0}")]
    Llvm(String),
}
