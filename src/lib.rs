//! Kiln: a deep learning compiler for ONNX models. This crate is the public library API and
//! the `kiln` command line.

pub use kiln_ir as ir;
pub use kiln_passes as passes;
pub use kiln_runtime as runtime;
