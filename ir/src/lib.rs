//! Kiln's graph IR: ONNX import, typed ops with shape/dtype inference, graph passes that
//! belong to the IR (constant folding, dead-code removal), a verifier, a stable text form and
//! the reference interpreter that defines the semantics of every op.

pub mod dtype;
pub mod error;
pub mod ops;
pub mod shape;
pub mod tensor;

pub use dtype::DType;
pub use error::{IrError, Result};
pub use ops::{Fact, Op};
pub use shape::{Dim, Shape};
pub use tensor::{Elem, Tensor};
pub mod graph;
pub mod interp;
pub mod onnx;
pub mod printer;
pub mod simplify;
pub mod verify;

pub use graph::{Graph, Node, Value, ValueId};
