//! Typed ops. Each op family lives in its own file and implements [`OpFamily`]: parsing from
//! the loosely typed ONNX node ([`OnnxNode`]), shape/dtype inference over [`Fact`]s, and a
//! reference implementation over [`Tensor`]s.
//!
//! Errors inside ops are plain strings naming the attribute or input at fault; the graph
//! layer adds the node name and op type.

pub mod array;
pub mod elementwise;
pub mod linalg;
pub mod nn;
pub mod reduce;
pub mod resize;

use crate::dtype::DType;
use crate::shape::Shape;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Result of op-level functions: errors are messages naming the attribute/input at fault.
pub type OpResult<T> = Result<T, String>;

/// What is known statically about a value: dtype, shape, and its contents if constant.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fact {
    /// Element type.
    pub dtype: DType,
    /// Shape (dims may be symbolic).
    pub shape: Shape,
    /// The value, when it is a compile-time constant.
    pub value: Option<Arc<Tensor>>,
}

impl Fact {
    /// A fact with no known value.
    pub fn new(dtype: DType, shape: Shape) -> Fact {
        Fact {
            dtype,
            shape,
            value: None,
        }
    }

    /// The fact of a constant tensor.
    pub fn constant(t: Tensor) -> Fact {
        Fact {
            dtype: t.dtype(),
            shape: Shape::known(t.shape()),
            value: Some(Arc::new(t)),
        }
    }

    /// A constant fact sharing `t` (no copy of its data).
    pub fn constant_shared(t: Arc<Tensor>) -> Fact {
        Fact {
            dtype: t.dtype(),
            shape: Shape::known(t.shape()),
            value: Some(t),
        }
    }

    /// The constant value, if known.
    pub fn value(&self) -> Option<&Tensor> {
        self.value.as_deref()
    }
}

/// A loosely typed ONNX attribute value (the import model).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AttrValue {
    /// `FLOAT`
    Float(f32),
    /// `INT`
    Int(i64),
    /// `STRING` (decoded as UTF-8, lossy)
    String(String),
    /// `TENSOR`
    Tensor(Tensor),
    /// `FLOATS`
    Floats(Vec<f32>),
    /// `INTS`
    Ints(Vec<i64>),
    /// `STRINGS`
    Strings(Vec<String>),
}

/// An ONNX node as imported, before it becomes a typed [`Op`]: op type, attributes by name,
/// and input/output arity. Its accessors produce errors that name the attribute.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct OnnxNode {
    /// Node name (for messages).
    pub name: String,
    /// ONNX op type, e.g. `Conv`.
    pub op_type: String,
    /// Opset version of the default domain.
    pub opset: i64,
    /// Attributes by name.
    pub attrs: BTreeMap<String, AttrValue>,
    /// For each input slot, whether it is present (ONNX marks absent optional inputs with "").
    pub inputs_present: Vec<bool>,
    /// Number of outputs the node declares.
    pub num_outputs: usize,
}

impl OnnxNode {
    /// Builds a node (for tests and programmatic construction): op type, opset, attributes,
    /// which input slots are present, and the number of outputs.
    pub fn new(
        op_type: &str,
        opset: i64,
        attrs: &[(&str, AttrValue)],
        inputs_present: Vec<bool>,
        num_outputs: usize,
    ) -> OnnxNode {
        OnnxNode {
            name: op_type.to_string(),
            op_type: op_type.to_string(),
            opset,
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            inputs_present,
            num_outputs,
        }
    }

    fn wrong(&self, name: &str, want: &str) -> String {
        format!(
            "attribute '{name}': expected {want}, found {:?}",
            self.attrs.get(name)
        )
    }

    /// An optional INT attribute.
    pub fn int(&self, name: &str) -> OpResult<Option<i64>> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(AttrValue::Int(v)) => Ok(Some(*v)),
            Some(_) => Err(self.wrong(name, "an int")),
        }
    }

    /// An INT attribute with a default.
    pub fn int_or(&self, name: &str, default: i64) -> OpResult<i64> {
        Ok(self.int(name)?.unwrap_or(default))
    }

    /// A required INT attribute.
    pub fn req_int(&self, name: &str) -> OpResult<i64> {
        self.int(name)?
            .ok_or_else(|| format!("required attribute '{name}' is missing"))
    }

    /// An optional FLOAT attribute.
    pub fn float(&self, name: &str) -> OpResult<Option<f32>> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(AttrValue::Float(v)) => Ok(Some(*v)),
            Some(AttrValue::Int(v)) => Ok(Some(*v as f32)),
            Some(_) => Err(self.wrong(name, "a float")),
        }
    }

    /// A FLOAT attribute with a default.
    pub fn float_or(&self, name: &str, default: f32) -> OpResult<f32> {
        Ok(self.float(name)?.unwrap_or(default))
    }

    /// An optional STRING attribute.
    pub fn string(&self, name: &str) -> OpResult<Option<String>> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(AttrValue::String(v)) => Ok(Some(v.clone())),
            Some(_) => Err(self.wrong(name, "a string")),
        }
    }

    /// A STRING attribute with a default.
    pub fn string_or(&self, name: &str, default: &str) -> OpResult<String> {
        Ok(self.string(name)?.unwrap_or_else(|| default.to_string()))
    }

    /// An optional INTS attribute.
    pub fn ints(&self, name: &str) -> OpResult<Option<Vec<i64>>> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(AttrValue::Ints(v)) => Ok(Some(v.clone())),
            Some(AttrValue::Int(v)) => Ok(Some(vec![*v])),
            Some(_) => Err(self.wrong(name, "a list of ints")),
        }
    }

    /// An optional FLOATS attribute.
    pub fn floats(&self, name: &str) -> OpResult<Option<Vec<f32>>> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(AttrValue::Floats(v)) => Ok(Some(v.clone())),
            Some(AttrValue::Float(v)) => Ok(Some(vec![*v])),
            Some(_) => Err(self.wrong(name, "a list of floats")),
        }
    }

    /// An optional TENSOR attribute.
    pub fn tensor(&self, name: &str) -> OpResult<Option<Tensor>> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(AttrValue::Tensor(v)) => Ok(Some(v.clone())),
            Some(_) => Err(self.wrong(name, "a tensor")),
        }
    }

    /// Whether input slot `i` is present.
    pub fn has_input(&self, i: usize) -> bool {
        self.inputs_present.get(i).copied().unwrap_or(false)
    }

    /// Number of input slots (present or not).
    pub fn num_inputs(&self) -> usize {
        self.inputs_present.len()
    }
}

/// Input `i`, which must be present.
pub fn req<'a, T: ?Sized>(inputs: &[Option<&'a T>], i: usize) -> OpResult<&'a T> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("input {i} is required but missing"))
}

/// Input `i`, if present.
pub fn opt<'a, T: ?Sized>(inputs: &[Option<&'a T>], i: usize) -> Option<&'a T> {
    inputs.get(i).copied().flatten()
}

/// One family of ops (one file of `ops/`).
pub trait OpFamily: Sized + Clone + fmt::Debug + PartialEq {
    /// Parses an ONNX node of the default domain. `Ok(None)` when `node.op_type` is not in
    /// this family; `Err` names the bad attribute.
    fn from_onnx(node: &OnnxNode) -> OpResult<Option<Self>>;
    /// The ONNX op type, e.g. `"Conv"`.
    fn op_type(&self) -> &'static str;
    /// Output facts from input facts (absent optional inputs are `None`). May fill
    /// `Fact::value` when the output is a known constant (e.g. `Shape` of a static shape).
    fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>>;
    /// Reference semantics: output tensors from input tensors.
    fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>>;
}

/// A typed op: one variant per op family.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// Elementwise math, comparisons, logic, activations, Cast, Where, Identity...
    Elementwise(elementwise::ElementwiseOp),
    /// Conv, pooling, normalization, Softmax.
    Nn(nn::NnOp),
    /// Shape manipulation and data movement.
    Array(array::ArrayOp),
    /// Reductions, ArgMax/ArgMin, CumSum, TopK.
    Reduce(reduce::ReduceOp),
    /// MatMul, Gemm, Einsum.
    Linalg(linalg::LinalgOp),
    /// Resize.
    Resize(resize::ResizeOp),
}

macro_rules! dispatch {
    ($self:expr, $o:ident => $e:expr) => {
        match $self {
            Op::Elementwise($o) => $e,
            Op::Nn($o) => $e,
            Op::Array($o) => $e,
            Op::Reduce($o) => $e,
            Op::Linalg($o) => $e,
            Op::Resize($o) => $e,
        }
    };
}

impl Op {
    /// Parses an ONNX node of the default domain into a typed op; `Ok(None)` if no family
    /// knows the op type.
    pub fn from_onnx(node: &OnnxNode) -> OpResult<Option<Op>> {
        if let Some(o) = elementwise::ElementwiseOp::from_onnx(node)? {
            return Ok(Some(Op::Elementwise(o)));
        }
        if let Some(o) = nn::NnOp::from_onnx(node)? {
            return Ok(Some(Op::Nn(o)));
        }
        if let Some(o) = array::ArrayOp::from_onnx(node)? {
            return Ok(Some(Op::Array(o)));
        }
        if let Some(o) = reduce::ReduceOp::from_onnx(node)? {
            return Ok(Some(Op::Reduce(o)));
        }
        if let Some(o) = linalg::LinalgOp::from_onnx(node)? {
            return Ok(Some(Op::Linalg(o)));
        }
        if let Some(o) = resize::ResizeOp::from_onnx(node)? {
            return Ok(Some(Op::Resize(o)));
        }
        Ok(None)
    }

    /// The ONNX op type.
    pub fn op_type(&self) -> &'static str {
        dispatch!(self, o => o.op_type())
    }

    /// Shape and dtype inference.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        dispatch!(self, o => o.infer(inputs))
    }

    /// Reference evaluation.
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        dispatch!(self, o => o.eval(inputs))
    }

    /// The typed attributes, printed for the text form (stable: derived `Debug`).
    pub fn attrs_text(&self) -> String {
        dispatch!(self, o => format!("{o:?}"))
    }
}

/// A canonical text naming an op application: the op with its attributes, and each input's
/// dtype and shape (`c` after a constant input; `-` for an omitted optional input). Two
/// applications with the same signature compute the same function of their non-constant
/// inputs' shapes, so measured kernel times are keyed by it (tuning database, cost models).
pub fn op_signature(op: &Op, inputs: &[Option<&Fact>]) -> String {
    let ins: Vec<String> = inputs
        .iter()
        .map(|f| match f {
            Some(f) => {
                let c = if f.value.is_some() { "c" } else { "" };
                format!("{}{}{c}", f.dtype.name(), f.shape)
            }
            None => "-".into(),
        })
        .collect();
    format!("{op:?}({})", ins.join(","))
}
