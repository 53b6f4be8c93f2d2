//! Neural-network ops: convolutions (`Conv`, `ConvTranspose`), pooling (`MaxPool`,
//! `AveragePool`, `LpPool` and their global forms), normalizations (`BatchNormalization`,
//! `InstanceNormalization`, `LayerNormalization`, `RMSNormalization`, `GroupNormalization`,
//! `LpNormalization`, `LRN`), the softmax family (`Softmax`, `LogSoftmax`, `Hardmax`) and
//! the recurrent layers (`RNN`, `GRU`, `LSTM`) and `Attention`.
//!
//! The reference implementations compute in f64 on flat row-major buffers (integer `MaxPool`
//! compares the elements themselves) and round back to the input dtype.

pub mod attention;
pub mod conv;
pub mod norm;
pub mod pool;
pub mod recurrent;
pub mod softmax;
pub mod window;

use super::{Fact, OnnxNode, OpFamily, OpResult};
use crate::dtype::DType;
use crate::shape::{Dim, Shape};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};

pub use attention::{AttentionAttrs, QkOutput};
pub use conv::{ConvAttrs, ConvTransposeAttrs};
pub use norm::{BatchNormAttrs, GroupNormAttrs, LayerNormAttrs, LrnAttrs};
pub use pool::{MaxPoolAttrs, PoolAttrs, PoolKind};
pub use recurrent::{Activation, Cell, Direction, RecurrentAttrs};
pub use softmax::SoftmaxAttrs;
pub use window::{AutoPad, WindowAttrs};

/// Ops of the neural-network family.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum NnOp {
    /// `Conv`: N-D convolution with groups, strides, dilations and padding.
    Conv(ConvAttrs),
    /// `ConvTranspose`: the adjoint of `Conv` (a.k.a. deconvolution).
    ConvTranspose(ConvTransposeAttrs),
    /// `MaxPool`, with the optional `Indices` output.
    MaxPool(MaxPoolAttrs),
    /// `AveragePool` and `LpPool` (the pooling kind says which).
    Pool(PoolAttrs),
    /// `GlobalAveragePool`, `GlobalMaxPool`, `GlobalLpPool`: pooling over all spatial dims.
    GlobalPool(PoolKind),
    /// `BatchNormalization` (inference, or training mode statistics).
    BatchNormalization(BatchNormAttrs),
    /// `InstanceNormalization`.
    InstanceNormalization {
        /// `epsilon` (default 1e-5).
        epsilon: f32,
    },
    /// `LayerNormalization` with its optional `Mean` / `InvStdDev` outputs.
    LayerNormalization(LayerNormAttrs),
    /// `RMSNormalization` (opset 23): like `LayerNormalization` without centering or bias.
    RmsNormalization(LayerNormAttrs),
    /// `GroupNormalization`.
    GroupNormalization(GroupNormAttrs),
    /// `LpNormalization`.
    LpNormalization {
        /// `axis` (default -1).
        axis: i64,
        /// `p`: 1 or 2 (default 2).
        p: u8,
    },
    /// `LRN`: local response normalization across channels.
    Lrn(LrnAttrs),
    /// `Softmax`.
    Softmax(SoftmaxAttrs),
    /// `LogSoftmax`.
    LogSoftmax(SoftmaxAttrs),
    /// `Hardmax`.
    Hardmax(SoftmaxAttrs),
    /// `RNN`, `GRU`, `LSTM` (the cell says which).
    Recurrent(RecurrentAttrs),
    /// `Attention` (opset 23+): scaled dot-product attention with masks and a KV cache.
    Attention(AttentionAttrs),
}

impl OpFamily for NnOp {
    fn from_onnx(node: &OnnxNode) -> OpResult<Option<Self>> {
        let op = match node.op_type.as_str() {
            "Conv" => NnOp::Conv(ConvAttrs::parse(node)?),
            "ConvTranspose" => NnOp::ConvTranspose(ConvTransposeAttrs::parse(node)?),
            "MaxPool" => NnOp::MaxPool(MaxPoolAttrs::parse(node)?),
            "AveragePool" | "LpPool" => NnOp::Pool(PoolAttrs::parse(node)?),
            "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
                NnOp::GlobalPool(PoolKind::parse_global(node)?)
            }
            "BatchNormalization" => NnOp::BatchNormalization(BatchNormAttrs::parse(node)?),
            "InstanceNormalization" => NnOp::InstanceNormalization {
                epsilon: node.float_or("epsilon", 1e-5)?,
            },
            "LayerNormalization" => NnOp::LayerNormalization(LayerNormAttrs::parse(node)?),
            "RMSNormalization" => NnOp::RmsNormalization(LayerNormAttrs::parse(node)?),
            "GroupNormalization" => NnOp::GroupNormalization(GroupNormAttrs::parse(node)?),
            "LpNormalization" => NnOp::LpNormalization {
                axis: node.int_or("axis", -1)?,
                p: match node.int_or("p", 2)? {
                    1 => 1,
                    2 => 2,
                    p => return Err(format!("attribute 'p': expected 1 or 2, found {p}")),
                },
            },
            "LRN" => NnOp::Lrn(LrnAttrs::parse(node)?),
            "Softmax" => NnOp::Softmax(SoftmaxAttrs::parse(node)?),
            "LogSoftmax" => NnOp::LogSoftmax(SoftmaxAttrs::parse(node)?),
            "Hardmax" => NnOp::Hardmax(SoftmaxAttrs::parse(node)?),
            "RNN" => NnOp::Recurrent(RecurrentAttrs::parse(Cell::Rnn, node)?),
            "GRU" => NnOp::Recurrent(RecurrentAttrs::parse(Cell::Gru, node)?),
            "LSTM" => NnOp::Recurrent(RecurrentAttrs::parse(Cell::Lstm, node)?),
            "Attention" => NnOp::Attention(AttentionAttrs::parse(node)?),
            _ => return Ok(None),
        };
        op.check_arity(node)?;
        Ok(Some(op))
    }

    fn op_type(&self) -> &'static str {
        match self {
            NnOp::Conv(_) => "Conv",
            NnOp::ConvTranspose(_) => "ConvTranspose",
            NnOp::MaxPool(_) => "MaxPool",
            NnOp::Pool(p) => p.kind.op_type(false),
            NnOp::GlobalPool(k) => k.op_type(true),
            NnOp::BatchNormalization(_) => "BatchNormalization",
            NnOp::InstanceNormalization { .. } => "InstanceNormalization",
            NnOp::LayerNormalization(_) => "LayerNormalization",
            NnOp::RmsNormalization(_) => "RMSNormalization",
            NnOp::GroupNormalization(_) => "GroupNormalization",
            NnOp::LpNormalization { .. } => "LpNormalization",
            NnOp::Lrn(_) => "LRN",
            NnOp::Softmax(_) => "Softmax",
            NnOp::LogSoftmax(_) => "LogSoftmax",
            NnOp::Hardmax(_) => "Hardmax",
            NnOp::Recurrent(a) => a.op_type(),
            NnOp::Attention(_) => "Attention",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        match self {
            NnOp::Conv(a) => a.infer(inputs),
            NnOp::ConvTranspose(a) => a.infer(inputs),
            NnOp::MaxPool(a) => a.infer(inputs),
            NnOp::Pool(a) => a.infer(inputs),
            NnOp::GlobalPool(_) => pool::infer_global(inputs),
            NnOp::BatchNormalization(a) => a.infer(inputs),
            NnOp::InstanceNormalization { .. } => norm::infer_instance(inputs),
            NnOp::LayerNormalization(a) | NnOp::RmsNormalization(a) => a.infer(inputs),
            NnOp::GroupNormalization(a) => a.infer(inputs),
            NnOp::LpNormalization { axis, .. } => norm::infer_lp(*axis, inputs),
            NnOp::Lrn(_) => norm::infer_lrn(inputs),
            NnOp::Softmax(a) | NnOp::LogSoftmax(a) | NnOp::Hardmax(a) => a.infer(inputs),
            NnOp::Recurrent(a) => a.infer(inputs),
            NnOp::Attention(a) => a.infer(inputs),
        }
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        // Inference on the concrete shapes validates the inputs and gives the output shapes.
        let facts: Vec<Option<Fact>> = inputs
            .iter()
            .map(|t| t.map(|t| Fact::new(t.dtype(), Shape::known(t.shape()))))
            .collect();
        let refs: Vec<Option<&Fact>> = facts.iter().map(Option::as_ref).collect();
        let outs = self.infer(&refs)?;
        let shapes: Vec<Vec<usize>> = outs
            .iter()
            .map(|f| f.shape.as_known().ok_or("output shape is not static"))
            .collect::<Result<_, _>>()?;
        match self {
            NnOp::Conv(a) => a.eval(inputs, &shapes[0]),
            NnOp::ConvTranspose(a) => a.eval(inputs, &shapes[0]),
            NnOp::MaxPool(a) => a.eval(inputs),
            NnOp::Pool(a) => a.eval(inputs),
            NnOp::GlobalPool(k) => pool::eval_global(*k, inputs, &shapes[0]),
            NnOp::BatchNormalization(a) => a.eval(inputs, &outs),
            NnOp::InstanceNormalization { epsilon } => norm::eval_instance(*epsilon, inputs),
            NnOp::LayerNormalization(a) => a.eval(inputs, &outs, false),
            NnOp::RmsNormalization(a) => a.eval(inputs, &outs, true),
            NnOp::GroupNormalization(a) => a.eval(inputs),
            NnOp::LpNormalization { axis, p } => norm::eval_lp(*axis, *p, inputs),
            NnOp::Lrn(a) => a.eval(inputs),
            NnOp::Softmax(a) => a.eval(softmax::Kind::Softmax, inputs),
            NnOp::LogSoftmax(a) => a.eval(softmax::Kind::LogSoftmax, inputs),
            NnOp::Hardmax(a) => a.eval(softmax::Kind::Hardmax, inputs),
            NnOp::Recurrent(a) => a.eval(inputs),
            NnOp::Attention(a) => a.eval(inputs),
        }
    }
}

impl NnOp {
    /// The (min inputs, max inputs, max outputs) the op accepts.
    fn arity(&self) -> (usize, usize, usize) {
        match self {
            NnOp::Conv(_) | NnOp::ConvTranspose(_) => (2, 3, 1),
            NnOp::MaxPool(_) => (1, 1, 2),
            NnOp::BatchNormalization(_) => (5, 5, 5),
            NnOp::InstanceNormalization { .. } | NnOp::GroupNormalization(_) => (3, 3, 1),
            NnOp::LayerNormalization(_) => (2, 3, 3),
            NnOp::RmsNormalization(_) => (2, 2, 1),
            NnOp::Recurrent(a) => a.arity(),
            NnOp::Attention(a) => a.arity(),
            _ => (1, 1, 1),
        }
    }

    /// Checks the node's input and output counts.
    fn check_arity(&self, node: &OnnxNode) -> OpResult<()> {
        let (min_in, max_in, max_out) = self.arity();
        let n = node.num_inputs();
        if n > max_in || (0..min_in).any(|i| !node.has_input(i)) {
            return Err(format!(
                "expected {min_in} to {max_in} inputs (the first {min_in} present), found {n}"
            ));
        }
        if node.num_outputs == 0 || node.num_outputs > max_out {
            return Err(format!(
                "expected 1 to {max_out} outputs, found {}",
                node.num_outputs
            ));
        }
        Ok(())
    }
}

/// Largest size-like attribute value accepted (keeps all index arithmetic in range).
const MAX_ATTR: i64 = i32::MAX as i64;

/// Checks a size-like attribute value: `min <= v <= 2^31 - 1`.
fn size_attr(name: &str, v: i64, min: i64) -> OpResult<usize> {
    if (min..=MAX_ATTR).contains(&v) {
        Ok(v as usize)
    } else {
        Err(format!(
            "attribute '{name}': expected a value in [{min}, {MAX_ATTR}], found {v}"
        ))
    }
}

/// Parses an optional INTS attribute of sizes, each in `[min, 2^31 - 1]`.
fn size_ints(node: &OnnxNode, name: &str, min: i64) -> OpResult<Option<Vec<usize>>> {
    node.ints(name)?
        .map(|v| v.iter().map(|&x| size_attr(name, x, min)).collect())
        .transpose()
}

/// Parses an optional INTS attribute whose values must all be >= 1.
fn positive_ints(node: &OnnxNode, name: &str) -> OpResult<Option<Vec<usize>>> {
    size_ints(node, name, 1)
}

/// Formats dims like a shape: `[N,3,224]`.
fn dims_text(dims: &[Dim]) -> String {
    Shape(dims.to_vec()).to_string()
}

/// Checks that input `name` has a floating-point dtype.
fn float_input(f: &Fact, name: &str) -> OpResult<DType> {
    if f.dtype.is_float() {
        Ok(f.dtype)
    } else {
        Err(format!(
            "input '{name}': expected a floating-point tensor, found {}",
            f.dtype
        ))
    }
}

/// Checks that `f` has the dtype `want` of input `of`.
fn same_dtype(f: &Fact, name: &str, want: DType, of: &str) -> OpResult<()> {
    if f.dtype == want {
        Ok(())
    } else {
        Err(format!(
            "input '{name}' has dtype {} but '{of}' has dtype {want}",
            f.dtype
        ))
    }
}

/// Checks that input `name` has rank at least `min`.
fn min_rank(f: &Fact, name: &str, min: usize) -> OpResult<()> {
    if f.shape.rank() >= min {
        Ok(())
    } else {
        Err(format!(
            "input '{name}': expected rank >= {min}, found shape {}",
            f.shape
        ))
    }
}

/// Checks that input `name` is 1-D of length compatible with `len`.
fn vector_of(f: &Fact, name: &str, len: &Dim) -> OpResult<()> {
    if f.shape.rank() == 1 && f.shape.dim(0).compatible(len) {
        Ok(())
    } else {
        Err(format!(
            "input '{name}': expected shape [{len}], found {}",
            f.shape
        ))
    }
}

/// Builds a tensor of `dtype` and `shape` from f64 values (rounding like `Cast`).
fn from_f64(dtype: DType, shape: &[usize], data: Vec<f64>) -> OpResult<Tensor> {
    let a = ArrayD::from_shape_vec(IxDyn(shape), data)
        .map_err(|_| format!("internal: result does not fill shape {shape:?}"))?;
    Ok(Tensor::from_f64_array(dtype, a))
}

#[cfg(test)]
mod tests;
