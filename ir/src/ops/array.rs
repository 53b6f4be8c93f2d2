//! Placeholder op family `ArrayOp`: to be filled in.

use super::{Fact, OnnxNode, OpFamily, OpResult};
use crate::tensor::Tensor;

/// Ops of this family.
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayOp {}

impl OpFamily for ArrayOp {
    fn from_onnx(_node: &OnnxNode) -> OpResult<Option<Self>> {
        Ok(None)
    }
    fn op_type(&self) -> &'static str {
        match *self {}
    }
    fn infer(&self, _inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        match *self {}
    }
    fn eval(&self, _inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        match *self {}
    }
}
