//! Elementwise ops: arithmetic, math functions and activations, comparisons, logic, bitwise
//! ops, `Clip`, `Where`, `Cast`/`CastLike`, `Identity` and (inference-mode) `Dropout`.
//!
//! Ops are grouped by arity and element-type rules ([`UnaryKind`], [`BinaryKind`],
//! [`VariadicKind`], [`CompareKind`], [`LogicalKind`], [`PredicateKind`]), so that parsing,
//! inference and evaluation are written once per group. Binary and variadic ops use ONNX
//! multidirectional (numpy) broadcasting.
//!
//! Reference numerics: float ops compute in f64 and round once to the element type (exact
//! IEEE results for `+ - * / sqrt`, at least as accurate as f32 math elsewhere); integer ops
//! compute exactly in i128 and wrap to the element width like C (so `Div` truncates toward
//! zero, overflow wraps). Integer division or modulo by zero is an error.

use super::{opt, req, Fact, OnnxNode, OpFamily, OpResult};
use crate::dtype::DType;
use crate::shape::{broadcast_dims, broadcast_shapes, Shape};
use crate::tensor::{Elem, Tensor};
use ndarray::{ArrayD, ArrayViewD, IxDyn, Zip};

// ---------------------------------------------------------------------------------------------
// Op kinds
// ---------------------------------------------------------------------------------------------

/// `Gelu`'s `approximate` attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GeluApprox {
    /// Exact: `0.5 x (1 + erf(x / sqrt 2))`.
    None,
    /// Tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    Tanh,
}

/// Ops with one input and one output of the same type and shape.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum UnaryKind {
    /// `-x` (signed integers wrap).
    Neg,
    /// `|x|`.
    Abs,
    /// -1, 0 or 1 (NaN stays NaN).
    Sign,
    /// `max(x, 0)`.
    Relu,
    /// Bitwise complement (integers only).
    BitwiseNot,
    /// Square root.
    Sqrt,
    /// `e^x`.
    Exp,
    /// Natural logarithm.
    Log,
    /// `1 / x`.
    Reciprocal,
    /// Round toward -inf.
    Floor,
    /// Round toward +inf.
    Ceil,
    /// Round half to even.
    Round,
    /// Error function.
    Erf,
    /// Hyperbolic tangent.
    Tanh,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// `x < 0 ? alpha x : x`.
    LeakyRelu {
        /// Slope for negative inputs (default 0.01).
        alpha: f32,
    },
    /// `x < 0 ? alpha (e^x - 1) : x`.
    Elu {
        /// Scale of the negative part (default 1).
        alpha: f32,
    },
    /// `x <= 0 ? gamma alpha (e^x - 1) : gamma x`.
    Selu {
        /// Default 1.67326319217681884765625.
        alpha: f32,
        /// Default 1.05070102214813232421875.
        gamma: f32,
    },
    /// `max(0, x) + min(0, alpha (e^(x/alpha) - 1))`.
    Celu {
        /// Default 1 (must be non-zero).
        alpha: f32,
    },
    /// `x > alpha ? x : 0`.
    ThresholdedRelu {
        /// Threshold (default 1).
        alpha: f32,
    },
    /// `clamp(alpha x + beta, 0, 1)`.
    HardSigmoid {
        /// Default 0.2.
        alpha: f32,
        /// Default 0.5.
        beta: f32,
    },
    /// `x clamp(x / 6 + 1/2, 0, 1)`.
    HardSwish,
    /// Gaussian error linear unit.
    Gelu {
        /// Exact or tanh approximation.
        approximate: GeluApprox,
    },
    /// `ln(1 + e^x)`.
    Softplus,
    /// `x / (1 + |x|)`.
    Softsign,
    /// `x tanh(softplus(x))`.
    Mish,
    /// Sine.
    Sin,
    /// Cosine.
    Cos,
    /// Tangent.
    Tan,
    /// Arcsine.
    Asin,
    /// Arccosine.
    Acos,
    /// Arctangent.
    Atan,
    /// Hyperbolic sine.
    Sinh,
    /// Hyperbolic cosine.
    Cosh,
    /// Inverse hyperbolic sine.
    Asinh,
    /// Inverse hyperbolic cosine.
    Acosh,
    /// Inverse hyperbolic tangent.
    Atanh,
}

/// `BitShift`'s `direction` attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ShiftDirection {
    /// `x << y`.
    Left,
    /// `x >> y` (arithmetic for signed types).
    Right,
}

/// Ops with two broadcast inputs of the same type (except `Pow`'s exponent) and one output
/// of the first input's type.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum BinaryKind {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b` (integers truncate toward zero).
    Div,
    /// `a ^ b`; the exponent may have any numeric type, the output has the base's type.
    Pow,
    /// Remainder.
    Mod {
        /// `true`: C `fmod` (sign of the dividend); `false`: sign of the divisor.
        fmod: bool,
    },
    /// Bit shift; shifts outside `0..bits` give 0 (or -1 for right shifts of negatives).
    BitShift(ShiftDirection),
    /// `a & b`.
    BitwiseAnd,
    /// `a | b`.
    BitwiseOr,
    /// `a ^ b`.
    BitwiseXor,
    /// `x < 0 ? slope x : x`; the slope broadcasts to the shape of `x`.
    PRelu,
}

/// Ops over one or more broadcast inputs of the same type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VariadicKind {
    /// Elementwise maximum (NaN propagates).
    Max,
    /// Elementwise minimum (NaN propagates).
    Min,
    /// Elementwise sum.
    Sum,
    /// Elementwise mean.
    Mean,
}

/// Comparisons: two broadcast inputs of the same type, bool output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CompareKind {
    /// `a == b`.
    Equal,
    /// `a < b`.
    Less,
    /// `a > b`.
    Greater,
    /// `a <= b`.
    LessOrEqual,
    /// `a >= b`.
    GreaterOrEqual,
}

/// Boolean binary logic: two broadcast bool inputs, bool output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogicalKind {
    /// `a && b`.
    And,
    /// `a || b`.
    Or,
    /// `a != b`.
    Xor,
}

/// Float classification: one float input, bool output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PredicateKind {
    /// `x` is NaN.
    IsNaN,
    /// `x` is an infinity of a selected sign.
    IsInf {
        /// Detect -inf (default true).
        detect_negative: bool,
        /// Detect +inf (default true).
        detect_positive: bool,
    },
}

/// Where `Clip` takes its bounds from.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ClipBounds {
    /// Opset >= 11: optional scalar inputs 1 (`min`) and 2 (`max`).
    Inputs,
    /// Opset < 11: `min`/`max` attributes (absent: unbounded).
    Attrs {
        /// Lower bound.
        min: Option<f32>,
        /// Upper bound.
        max: Option<f32>,
    },
}

/// Attributes of `Dropout`, which the reference runs in inference mode (identity).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DropoutAttrs {
    /// The `ratio` attribute (opset < 12, default 0.5); from opset 12 the ratio is input 1.
    pub ratio: f32,
    /// Whether the node has the optional `mask` output.
    pub mask: bool,
    /// Whether the mask is bool (opset >= 10) or of the data's type (older opsets).
    pub bool_mask: bool,
}

/// Ops of the elementwise family.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ElementwiseOp {
    /// One input, same type and shape out.
    Unary(UnaryKind),
    /// Two broadcast inputs.
    Binary(BinaryKind),
    /// One or more broadcast inputs.
    Variadic(VariadicKind),
    /// Two broadcast inputs, bool output.
    Compare(CompareKind),
    /// Two broadcast bool inputs, bool output.
    Logical(LogicalKind),
    /// Boolean negation.
    Not,
    /// Float classification, bool output.
    Predicate(PredicateKind),
    /// Clamp to `[min, max]` (`min > max` gives `max`).
    Clip(ClipBounds),
    /// `cond ? x : y` with three-way broadcasting.
    Where,
    /// Conversion to a dtype.
    Cast {
        /// Target dtype.
        to: DType,
        /// The `saturate` attribute (default true): float8 targets clamp out-of-range values
        /// to ±max instead of giving ±inf / NaN.
        saturate: bool,
    },
    /// Conversion to the dtype of input 1.
    CastLike {
        /// The `saturate` attribute, as for `Cast`.
        saturate: bool,
    },
    /// Copy.
    Identity,
    /// Dropout in inference mode: output = input, mask all true.
    Dropout(DropoutAttrs),
}

// ---------------------------------------------------------------------------------------------
// Names and parsing
// ---------------------------------------------------------------------------------------------

impl UnaryKind {
    /// Kinds without attributes, looked up by name when parsing.
    const SIMPLE: [UnaryKind; 30] = {
        use UnaryKind::*;
        [
            Neg, Abs, Sign, Relu, BitwiseNot, Sqrt, Exp, Log, Reciprocal, Floor, Ceil, Round, Erf,
            Tanh, Sigmoid, HardSwish, Softplus, Softsign, Mish, Sin, Cos, Tan, Asin, Acos, Atan,
            Sinh, Cosh, Asinh, Acosh, Atanh,
        ]
    };

    /// The ONNX op type.
    pub fn name(self) -> &'static str {
        use UnaryKind::*;
        match self {
            Neg => "Neg",
            Abs => "Abs",
            Sign => "Sign",
            Relu => "Relu",
            BitwiseNot => "BitwiseNot",
            Sqrt => "Sqrt",
            Exp => "Exp",
            Log => "Log",
            Reciprocal => "Reciprocal",
            Floor => "Floor",
            Ceil => "Ceil",
            Round => "Round",
            Erf => "Erf",
            Tanh => "Tanh",
            Sigmoid => "Sigmoid",
            LeakyRelu { .. } => "LeakyRelu",
            Elu { .. } => "Elu",
            Selu { .. } => "Selu",
            Celu { .. } => "Celu",
            ThresholdedRelu { .. } => "ThresholdedRelu",
            HardSigmoid { .. } => "HardSigmoid",
            HardSwish => "HardSwish",
            Gelu { .. } => "Gelu",
            Softplus => "Softplus",
            Softsign => "Softsign",
            Mish => "Mish",
            Sin => "Sin",
            Cos => "Cos",
            Tan => "Tan",
            Asin => "Asin",
            Acos => "Acos",
            Atan => "Atan",
            Sinh => "Sinh",
            Cosh => "Cosh",
            Asinh => "Asinh",
            Acosh => "Acosh",
            Atanh => "Atanh",
        }
    }

    fn parse(node: &OnnxNode) -> OpResult<Option<UnaryKind>> {
        use UnaryKind::*;
        Ok(Some(match node.op_type.as_str() {
            "LeakyRelu" => LeakyRelu {
                alpha: node.float_or("alpha", 0.01)?,
            },
            "Elu" => Elu {
                alpha: node.float_or("alpha", 1.0)?,
            },
            "Selu" => Selu {
                alpha: node.float_or("alpha", 1.673_263_2)?,
                gamma: node.float_or("gamma", 1.050_701)?,
            },
            "Celu" => {
                let alpha = node.float_or("alpha", 1.0)?;
                if alpha == 0.0 {
                    return Err("attribute 'alpha': must be non-zero".into());
                }
                Celu { alpha }
            }
            "ThresholdedRelu" => ThresholdedRelu {
                alpha: node.float_or("alpha", 1.0)?,
            },
            "HardSigmoid" => HardSigmoid {
                alpha: node.float_or("alpha", 0.2)?,
                beta: node.float_or("beta", 0.5)?,
            },
            "Gelu" => Gelu {
                approximate: match node.string_or("approximate", "none")?.as_str() {
                    "none" => GeluApprox::None,
                    "tanh" => GeluApprox::Tanh,
                    other => {
                        return Err(format!(
                        "attribute 'approximate': expected \"none\" or \"tanh\", found {other:?}"
                    ))
                    }
                },
            },
            name => return Ok(Self::SIMPLE.into_iter().find(|k| k.name() == name)),
        }))
    }

    fn types(self) -> Types {
        use UnaryKind::*;
        match self {
            Neg | Relu => Types::SignedOrFloat,
            Abs | Sign => Types::Numeric,
            BitwiseNot => Types::Int,
            _ => Types::Float,
        }
    }
}

impl BinaryKind {
    const SIMPLE: [BinaryKind; 9] = {
        use BinaryKind::*;
        [
            Add, Sub, Mul, Div, Pow, BitwiseAnd, BitwiseOr, BitwiseXor, PRelu,
        ]
    };

    /// The ONNX op type.
    pub fn name(self) -> &'static str {
        use BinaryKind::*;
        match self {
            Add => "Add",
            Sub => "Sub",
            Mul => "Mul",
            Div => "Div",
            Pow => "Pow",
            Mod { .. } => "Mod",
            BitShift(_) => "BitShift",
            BitwiseAnd => "BitwiseAnd",
            BitwiseOr => "BitwiseOr",
            BitwiseXor => "BitwiseXor",
            PRelu => "PRelu",
        }
    }

    fn parse(node: &OnnxNode) -> OpResult<Option<BinaryKind>> {
        match node.op_type.as_str() {
            "Mod" => match node.int_or("fmod", 0)? {
                0 => Ok(Some(BinaryKind::Mod { fmod: false })),
                1 => Ok(Some(BinaryKind::Mod { fmod: true })),
                v => Err(format!("attribute 'fmod': expected 0 or 1, found {v}")),
            },
            "BitShift" => match node.string("direction")?.as_deref() {
                Some("LEFT") => Ok(Some(BinaryKind::BitShift(ShiftDirection::Left))),
                Some("RIGHT") => Ok(Some(BinaryKind::BitShift(ShiftDirection::Right))),
                Some(other) => Err(format!(
                    "attribute 'direction': expected \"LEFT\" or \"RIGHT\", found {other:?}"
                )),
                None => Err("required attribute 'direction' is missing".into()),
            },
            name => {
                let kind = Self::SIMPLE.into_iter().find(|k| k.name() == name);
                if kind.is_some() && node.opset < 7 && node.attrs.contains_key("axis") {
                    return Err(
                        "attribute 'axis': legacy (opset < 7) broadcasting along an \
                                axis is not supported"
                            .into(),
                    );
                }
                Ok(kind)
            }
        }
    }

    fn types(self) -> Types {
        use BinaryKind::*;
        match self {
            BitShift(_) | BitwiseAnd | BitwiseOr | BitwiseXor => Types::Int,
            _ => Types::Numeric,
        }
    }

    /// Whether integer evaluation divides by input 1 (zero divisors are errors).
    fn divides(self) -> bool {
        matches!(self, BinaryKind::Div | BinaryKind::Mod { .. })
    }
}

impl VariadicKind {
    const ALL: [VariadicKind; 4] = [Self::Max, Self::Min, Self::Sum, Self::Mean];

    /// The ONNX op type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Max => "Max",
            Self::Min => "Min",
            Self::Sum => "Sum",
            Self::Mean => "Mean",
        }
    }

    fn types(self) -> Types {
        match self {
            Self::Max | Self::Min => Types::Numeric,
            Self::Sum | Self::Mean => Types::Float,
        }
    }
}

impl CompareKind {
    const ALL: [CompareKind; 5] = [
        Self::Equal,
        Self::Less,
        Self::Greater,
        Self::LessOrEqual,
        Self::GreaterOrEqual,
    ];

    /// The ONNX op type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Equal => "Equal",
            Self::Less => "Less",
            Self::Greater => "Greater",
            Self::LessOrEqual => "LessOrEqual",
            Self::GreaterOrEqual => "GreaterOrEqual",
        }
    }

    fn types(self) -> Types {
        match self {
            Self::Equal => Types::Any,
            _ => Types::Numeric,
        }
    }

    fn test<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            Self::Equal => a == b,
            Self::Less => a < b,
            Self::Greater => a > b,
            Self::LessOrEqual => a <= b,
            Self::GreaterOrEqual => a >= b,
        }
    }
}

impl LogicalKind {
    const ALL: [LogicalKind; 3] = [Self::And, Self::Or, Self::Xor];

    /// The ONNX op type.
    pub fn name(self) -> &'static str {
        match self {
            Self::And => "And",
            Self::Or => "Or",
            Self::Xor => "Xor",
        }
    }

    fn apply(self, a: bool, b: bool) -> bool {
        match self {
            Self::And => a && b,
            Self::Or => a || b,
            Self::Xor => a != b,
        }
    }
}

impl PredicateKind {
    /// The ONNX op type.
    pub fn name(self) -> &'static str {
        match self {
            Self::IsNaN => "IsNaN",
            Self::IsInf { .. } => "IsInf",
        }
    }

    fn test(self, x: f64) -> bool {
        match self {
            Self::IsNaN => x.is_nan(),
            Self::IsInf {
                detect_negative,
                detect_positive,
            } => {
                (detect_negative && x == f64::NEG_INFINITY)
                    || (detect_positive && x == f64::INFINITY)
            }
        }
    }
}

/// A boolean attribute stored as an INT (0 or 1).
fn bool_attr(node: &OnnxNode, name: &str, default: bool) -> OpResult<bool> {
    match node.int(name)? {
        None => Ok(default),
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        Some(v) => Err(format!("attribute '{name}': expected 0 or 1, found {v}")),
    }
}

/// `Cast`'s `round_mode` (opset 24, for `FLOAT8E8M0` targets): only the default "up".
fn check_round_mode(node: &OnnxNode) -> OpResult<()> {
    match node.string("round_mode")? {
        Some(m) if m != "up" => Err(format!(
            "attribute 'round_mode': \"{m}\" is not supported (only \"up\")"
        )),
        _ => Ok(()),
    }
}

impl ElementwiseOp {
    /// Parses the ops that are not unary or binary kinds.
    fn parse_other(node: &OnnxNode) -> OpResult<Option<ElementwiseOp>> {
        use ElementwiseOp::*;
        let name = node.op_type.as_str();
        let by_name = |n: &str| n == name;
        if let Some(k) = VariadicKind::ALL.into_iter().find(|k| by_name(k.name())) {
            return Ok(Some(Variadic(k)));
        }
        if let Some(k) = CompareKind::ALL.into_iter().find(|k| by_name(k.name())) {
            return Ok(Some(Compare(k)));
        }
        if let Some(k) = LogicalKind::ALL.into_iter().find(|k| by_name(k.name())) {
            return Ok(Some(Logical(k)));
        }
        Ok(Some(match name {
            "Not" => Not,
            "IsNaN" => Predicate(PredicateKind::IsNaN),
            "IsInf" => Predicate(PredicateKind::IsInf {
                detect_negative: bool_attr(node, "detect_negative", true)?,
                detect_positive: bool_attr(node, "detect_positive", true)?,
            }),
            "Clip" if node.opset < 11 => Clip(ClipBounds::Attrs {
                min: node.float("min")?,
                max: node.float("max")?,
            }),
            "Clip" => Clip(ClipBounds::Inputs),
            "Where" => Where,
            "Cast" => {
                let saturate = bool_attr(node, "saturate", true)?;
                check_round_mode(node)?;
                let code = node.req_int("to")?;
                let to = i32::try_from(code)
                    .ok()
                    .and_then(DType::from_onnx)
                    .ok_or_else(|| {
                        format!(
                            "attribute 'to': data type {} ({code}) is not supported",
                            DType::onnx_name(code.try_into().unwrap_or(-1))
                        )
                    })?;
                Cast { to, saturate }
            }
            "CastLike" => {
                check_round_mode(node)?;
                CastLike {
                    saturate: bool_attr(node, "saturate", true)?,
                }
            }
            "Identity" => Identity,
            "Dropout" => {
                let ratio = node.float_or("ratio", 0.5)?;
                if !(0.0..1.0).contains(&ratio) {
                    return Err(format!(
                        "attribute 'ratio': must be in [0, 1), found {ratio}"
                    ));
                }
                Dropout(DropoutAttrs {
                    ratio,
                    mask: node.num_outputs > 1,
                    bool_mask: node.opset >= 10,
                })
            }
            _ => return Ok(None),
        }))
    }

    /// Allowed (required, maximum) input counts and (minimum, maximum) output counts.
    fn arity(&self, opset: i64) -> ((usize, usize), (usize, usize)) {
        use ElementwiseOp::*;
        match self {
            Unary(_) | Not | Predicate(_) | Cast { .. } | Identity => ((1, 1), (1, 1)),
            Clip(ClipBounds::Attrs { .. }) => ((1, 1), (1, 1)),
            Binary(_) | Compare(_) | Logical(_) | CastLike { .. } => ((2, 2), (1, 1)),
            Variadic(_) => ((1, usize::MAX), (1, 1)),
            Clip(ClipBounds::Inputs) => ((1, 3), (1, 1)),
            Where => ((3, 3), (1, 1)),
            Dropout(_) => ((1, if opset >= 12 { 3 } else { 1 }), (1, 2)),
        }
    }

    /// Checks the node's input and output counts against [`Self::arity`].
    fn check_arity(&self, node: &OnnxNode) -> OpResult<()> {
        let ((min_in, max_in), (min_out, max_out)) = self.arity(node.opset);
        let range = |lo: usize, hi: usize| match (lo, hi) {
            (lo, usize::MAX) => format!("at least {lo}"),
            (lo, hi) if lo == hi => format!("{lo}"),
            (lo, hi) => format!("{lo} to {hi}"),
        };
        let n = node.num_inputs();
        if !(min_in..=max_in).contains(&n) {
            return Err(format!(
                "expected {} inputs, found {n}",
                range(min_in, max_in)
            ));
        }
        // variadic ops need every slot, the others their first `min_in`
        let required = if max_in == usize::MAX { n } else { min_in };
        if let Some(i) = (0..required).find(|&i| !node.has_input(i)) {
            return Err(format!("input {i} is required but missing"));
        }
        if !(min_out..=max_out).contains(&node.num_outputs) {
            return Err(format!(
                "expected {} outputs, found {}",
                range(min_out, max_out),
                node.num_outputs
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Type rules
// ---------------------------------------------------------------------------------------------

/// A set of accepted element types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Types {
    Float,
    SignedOrFloat,
    Numeric,
    Int,
    Bool,
    Any,
}

impl Types {
    fn accepts(self, d: DType) -> bool {
        if d.is_low_precision() {
            // stored, moved and cast only: no kernel computes on them
            return self == Types::Any;
        }
        match self {
            Types::Float => d.is_float(),
            Types::SignedOrFloat => d.is_float() || d.is_signed_int(),
            Types::Numeric => d != DType::Bool,
            Types::Int => d.is_int(),
            Types::Bool => d == DType::Bool,
            Types::Any => true,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Types::Float => "a float type",
            Types::SignedOrFloat => "a signed integer or float type",
            Types::Numeric => "a numeric type",
            Types::Int => "an integer type",
            Types::Bool => "bool",
            Types::Any => "any type",
        }
    }
}

/// The dtype of input `i`, which must be present.
fn dtype_of(d: &[Option<DType>], i: usize) -> OpResult<DType> {
    d.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("input {i} is required but missing"))
}

/// Checks that input `i` has a dtype in `t`.
fn expect(op: &str, i: usize, d: DType, t: Types) -> OpResult<DType> {
    if t.accepts(d) {
        Ok(d)
    } else if d.is_low_precision() {
        Err(format!("input {i}: dtype {d} is not supported by {op}"))
    } else {
        Err(format!(
            "input {i}: {op} expects {}, found {d}",
            t.describe()
        ))
    }
}

/// Checks that input `i` has the same dtype as input `j`.
fn same(i: usize, d: DType, j: usize, want: DType) -> OpResult<()> {
    if d == want {
        Ok(())
    } else {
        Err(format!(
            "input {i}: dtype {d} does not match input {j} dtype {want}"
        ))
    }
}

impl ElementwiseOp {
    /// Validates the input dtypes and returns the output dtypes.
    fn out_dtypes(&self, d: &[Option<DType>]) -> OpResult<Vec<DType>> {
        use ElementwiseOp::*;
        let op = self.op_type();
        let first = |t: Types| expect(op, 0, dtype_of(d, 0)?, t);
        // input 0 in `t`, input 1 of the same dtype
        let pair = |t: Types| -> OpResult<DType> {
            let x = first(t)?;
            same(1, dtype_of(d, 1)?, 0, x)?;
            Ok(x)
        };
        // optional inputs present in `d` from index `from` with the dtype `want`
        let rest_same = |from: usize, want: DType| -> OpResult<()> {
            (from..d.len()).try_for_each(|i| d[i].map_or(Ok(()), |di| same(i, di, 0, want)))
        };
        Ok(match self {
            Unary(k) => vec![first(k.types())?],
            Binary(BinaryKind::Pow) => {
                expect(op, 1, dtype_of(d, 1)?, Types::Numeric)?;
                vec![first(Types::Numeric)?]
            }
            Binary(k) => vec![pair(k.types())?],
            Variadic(k) => {
                let x = first(k.types())?;
                rest_same(1, x)?;
                vec![x]
            }
            Compare(k) => {
                pair(k.types())?;
                vec![DType::Bool]
            }
            Logical(_) => vec![pair(Types::Bool)?],
            Not => vec![first(Types::Bool)?],
            Predicate(_) => {
                first(Types::Float)?;
                vec![DType::Bool]
            }
            Clip(_) => {
                let x = first(Types::Numeric)?;
                rest_same(1, x)?;
                vec![x]
            }
            Where => {
                first(Types::Bool)?;
                let x = dtype_of(d, 1)?;
                same(2, dtype_of(d, 2)?, 1, x)?;
                vec![x]
            }
            Cast { to, .. } => {
                dtype_of(d, 0)?;
                vec![*to]
            }
            CastLike { .. } => {
                dtype_of(d, 0)?;
                vec![dtype_of(d, 1)?]
            }
            Identity => vec![dtype_of(d, 0)?],
            Dropout(a) => {
                let x = first(Types::Float)?;
                if let Some(r) = d.get(1).copied().flatten() {
                    expect(op, 1, r, Types::Float)?;
                }
                if let Some(t) = d.get(2).copied().flatten() {
                    expect(op, 2, t, Types::Bool)?;
                }
                let mut out = vec![x];
                if a.mask {
                    out.push(if a.bool_mask { DType::Bool } else { x });
                }
                out
            }
        })
    }

    /// The output shape (the same for every output) from the input shapes.
    fn out_shape(&self, s: &[Option<&Shape>]) -> OpResult<Shape> {
        use ElementwiseOp::*;
        let x = req(s, 0)?;
        match self {
            Binary(BinaryKind::PRelu) => {
                let slope = req(s, 1)?;
                let b = broadcast_dims(&[x, slope])?;
                let fits = b.rank() == x.rank()
                    && b.dims().iter().zip(x.dims()).all(|(b, x)| b.compatible(x));
                if !fits {
                    return Err(format!(
                        "input 1: slope shape {slope} does not broadcast to input shape {x}"
                    ));
                }
                Ok(x.clone())
            }
            Binary(_) | Compare(_) | Logical(_) | Variadic(_) | Where => {
                let present: Vec<&Shape> = s.iter().flatten().copied().collect();
                broadcast_dims(&present)
            }
            Clip(ClipBounds::Inputs) => {
                for i in 1..3 {
                    if let Some(n) = opt(s, i).and_then(Shape::numel) {
                        if n != 1 {
                            return Err(format!("input {i}: Clip bound must be a scalar"));
                        }
                    }
                }
                Ok(x.clone())
            }
            _ => Ok(x.clone()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar kernels
// ---------------------------------------------------------------------------------------------

/// NaN-propagating maximum (any element type).
fn max_nan<T: PartialOrd>(a: T, b: T) -> T {
    #[allow(clippy::eq_op)] // `a != a` detects NaN generically
    let a_nan = a != a;
    if a_nan || a >= b {
        a
    } else {
        b
    }
}

/// NaN-propagating minimum (any element type).
fn min_nan<T: PartialOrd>(a: T, b: T) -> T {
    #[allow(clippy::eq_op)]
    let a_nan = a != a;
    if a_nan || a <= b {
        a
    } else {
        b
    }
}

/// `ln(1 + e^x)` without overflow.
fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// Remainder with the sign of the divisor (numpy `mod`), signed zeros included.
fn floor_mod_f64(x: f64, y: f64) -> f64 {
    let r = x % y;
    if r == 0.0 {
        0.0f64.copysign(y)
    } else if (r < 0.0) != (y < 0.0) {
        r + y
    } else {
        r
    }
}

/// Integer remainder with the sign of the divisor.
fn floor_mod_int(x: i128, y: i128) -> i128 {
    let r = x.checked_rem(y).unwrap_or(0);
    if r != 0 && ((r < 0) != (y < 0)) {
        r + y
    } else {
        r
    }
}

/// Integer power by squaring (wrapping, truncated to the element width by the caller);
/// negative exponents give the truncated value of `1 / x^-e`.
fn int_pow(base: i128, exp: i128) -> i128 {
    if exp < 0 {
        return match base {
            1 => 1,
            -1 if exp % 2 == 0 => 1,
            -1 => -1,
            _ => 0,
        };
    }
    let (mut acc, mut b, mut e) = (1i128, base, exp);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wrapping_mul(b);
        }
        b = b.wrapping_mul(b);
        e >>= 1;
    }
    acc
}

/// Bit shift of a value of `bits` width; out-of-range shift amounts shift everything out.
fn shift(x: i128, s: i128, bits: u32, dir: ShiftDirection) -> i128 {
    let in_range = (0..bits as i128).contains(&s);
    match (dir, in_range) {
        (ShiftDirection::Left, true) => x.wrapping_shl(s as u32),
        (ShiftDirection::Right, true) => x >> s,
        (ShiftDirection::Left, false) => 0,
        (ShiftDirection::Right, false) => {
            if x < 0 {
                -1
            } else {
                0
            }
        }
    }
}

impl UnaryKind {
    /// The function on floats. Integer-only kinds (excluded by the type rules) return `x`.
    fn apply_f64(self, x: f64) -> f64 {
        use UnaryKind::*;
        match self {
            Neg => -x,
            Abs => x.abs(),
            Sign if x > 0.0 => 1.0,
            Sign if x < 0.0 => -1.0,
            Sign | BitwiseNot => x,
            Relu if x < 0.0 => 0.0,
            Relu => x,
            Sqrt => x.sqrt(),
            Exp => x.exp(),
            Log => x.ln(),
            Reciprocal => 1.0 / x,
            Floor => x.floor(),
            Ceil => x.ceil(),
            Round => x.round_ties_even(),
            Erf => erf(x),
            Tanh => x.tanh(),
            Sigmoid if x >= 0.0 => 1.0 / (1.0 + (-x).exp()),
            Sigmoid => x.exp() / (1.0 + x.exp()),
            LeakyRelu { alpha } if x < 0.0 => f64::from(alpha) * x,
            Elu { alpha } if x < 0.0 => f64::from(alpha) * x.exp_m1(),
            LeakyRelu { .. } | Elu { .. } => x,
            Selu { alpha, gamma } if x <= 0.0 => {
                f64::from(gamma) * (f64::from(alpha) * x.exp() - f64::from(alpha))
            }
            Selu { gamma, .. } => f64::from(gamma) * x,
            Celu { .. } if x > 0.0 => x,
            Celu { alpha } => f64::from(alpha) * (x / f64::from(alpha)).exp_m1(),
            ThresholdedRelu { alpha } if x > f64::from(alpha) => x,
            ThresholdedRelu { .. } => 0.0,
            HardSigmoid { alpha, beta } => (f64::from(alpha) * x + f64::from(beta)).clamp(0.0, 1.0),
            HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Gelu {
                approximate: GeluApprox::None,
            } => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            Gelu {
                approximate: GeluApprox::Tanh,
            } => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
            }
            Softplus => softplus(x),
            Softsign => x / (1.0 + x.abs()),
            Mish => x * softplus(x).tanh(),
            Sin => x.sin(),
            Cos => x.cos(),
            Tan => x.tan(),
            Asin => x.asin(),
            Acos => x.acos(),
            Atan => x.atan(),
            Sinh => x.sinh(),
            Cosh => x.cosh(),
            Asinh => x.asinh(),
            Acosh => x.acosh(),
            Atanh => x.atanh(),
        }
    }

    /// The function on integers (exact; wrapped to the width by the caller). Float-only
    /// kinds (excluded by the type rules) return `x`.
    fn apply_int(self, x: i128) -> i128 {
        match self {
            UnaryKind::Neg => -x,
            UnaryKind::Abs => x.abs(),
            UnaryKind::Sign => x.signum(),
            UnaryKind::Relu => x.max(0),
            UnaryKind::BitwiseNot => !x,
            _ => x,
        }
    }
}

impl BinaryKind {
    /// The function on floats (`Pow` and integer-only kinds are handled elsewhere).
    fn apply_f64(self, x: f64, y: f64) -> f64 {
        use BinaryKind::*;
        match self {
            Add => x + y,
            Sub => x - y,
            Mul => x * y,
            Div => x / y,
            Pow => x.powf(y),
            Mod { fmod: true } => x % y,
            Mod { fmod: false } => floor_mod_f64(x, y),
            PRelu if x < 0.0 => y * x,
            PRelu | BitShift(_) | BitwiseAnd | BitwiseOr | BitwiseXor => x,
        }
    }

    /// The function on integers of `bits` width, computed exactly in i128 (the caller wraps
    /// the result to the width). Divisors are non-zero (checked by the caller).
    fn apply_int(self, x: i128, y: i128, bits: u32) -> i128 {
        use BinaryKind::*;
        match self {
            Add => x + y,
            Sub => x - y,
            Mul => x.wrapping_mul(y),
            Div => x.checked_div(y).unwrap_or(0),
            Pow => int_pow(x, y),
            Mod { fmod: true } => x.checked_rem(y).unwrap_or(0),
            Mod { fmod: false } => floor_mod_int(x, y),
            BitShift(dir) => shift(x, y, bits, dir),
            BitwiseAnd => x & y,
            BitwiseOr => x | y,
            BitwiseXor => x ^ y,
            PRelu if x < 0 => x.wrapping_mul(y),
            PRelu => x,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Array helpers
// ---------------------------------------------------------------------------------------------

/// Integer element types, computed on exactly as i128 and wrapped back like a C cast.
trait IntElem: Elem {
    /// Width in bits.
    const BITS: u32;
    /// The exact value.
    fn to_i128(self) -> i128;
    /// The value modulo 2^BITS.
    fn from_i128(v: i128) -> Self;
}

macro_rules! impl_int_elem {
    ($($t:ty),*) => {
        $(impl IntElem for $t {
            const BITS: u32 = <$t>::BITS;
            fn to_i128(self) -> i128 {
                self as i128
            }
            fn from_i128(v: i128) -> Self {
                v as $t
            }
        })*
    };
}

impl_int_elem!(i8, i16, i32, i64, u8, u16, u32, u64);

/// Runs `$body` with `$x` bound to the array of `$t` if its variant is in the list.
macro_rules! on_one {
    ([$($v:ident),*], $t:expr, $x:ident => $body:expr) => {
        match $t {
            $(Tensor::$v($x) => Some($body),)*
            #[allow(unreachable_patterns)]
            _ => None,
        }
    };
}

/// Runs `$body` with `$x`, `$y` bound to the arrays of `$a`, `$b` if both hold the same
/// variant from the list.
macro_rules! on_pair {
    ([$($v:ident),*], $a:expr, $b:expr, $x:ident, $y:ident => $body:expr) => {
        match ($a, $b) {
            $((Tensor::$v($x), Tensor::$v($y)) => Some($body),)*
            _ => None,
        }
    };
}

/// [`on_one!`] over the float dtypes.
macro_rules! on_floats {
    ($($rest:tt)*) => { on_one!([F32, F16, BF16, F64], $($rest)*) };
}

/// [`on_one!`] over the integer dtypes.
macro_rules! on_ints {
    ($($rest:tt)*) => { on_one!([I8, I16, I32, I64, U8, U16, U32, U64], $($rest)*) };
}

/// [`on_one!`] over the numeric (non-bool) dtypes.
macro_rules! on_numeric {
    ($($rest:tt)*) => {
        on_one!([F32, F16, BF16, F64, I8, I16, I32, I64, U8, U16, U32, U64], $($rest)*)
    };
}

/// [`on_pair!`] over the float dtypes.
macro_rules! on_float_pair {
    ($($rest:tt)*) => { on_pair!([F32, F16, BF16, F64], $($rest)*) };
}

/// [`on_pair!`] over the integer dtypes.
macro_rules! on_int_pair {
    ($($rest:tt)*) => { on_pair!([I8, I16, I32, I64, U8, U16, U32, U64], $($rest)*) };
}

/// [`on_pair!`] over every dtype.
macro_rules! on_any_pair {
    ($($rest:tt)*) => {
        on_pair!([F32, F16, BF16, F64, I8, I16, I32, I64, U8, U16, U32, U64, Bool], $($rest)*)
    };
}

/// Error for a dtype combination no kernel handles (the type rules should prevent it).
fn unsupported(op: &str, ts: &[&Tensor]) -> String {
    let d: Vec<String> = ts.iter().map(|t| t.dtype().to_string()).collect();
    format!("{op}: unsupported input dtypes ({})", d.join(", "))
}

/// A view of `a` broadcast to `shape`.
fn bview<'a, T>(a: &'a ArrayD<T>, shape: &[usize]) -> OpResult<ArrayViewD<'a, T>> {
    a.broadcast(IxDyn(shape))
        .ok_or_else(|| format!("cannot broadcast shape {:?} to {shape:?}", a.shape()))
}

/// `f` applied to the broadcast pairs of `a` and `b`.
fn zip_with<A: Copy, B: Copy, C>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    f: impl Fn(A, B) -> C,
) -> OpResult<ArrayD<C>> {
    let shape = broadcast_shapes(&[a.shape(), b.shape()])?;
    let (a, b) = (bview(a, &shape)?, bview(b, &shape)?);
    Ok(Zip::from(&a).and(&b).map_collect(|&x, &y| f(x, y)))
}

/// [`zip_with`] wrapped into a tensor.
fn zip_elems<T: Elem, U: Elem>(
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: impl Fn(T, T) -> U,
) -> OpResult<Tensor> {
    zip_with(a, b, f).map(U::wrap)
}

/// A float binary function computed in f64 and rounded to `T`.
fn zip_f64<T: Elem>(a: &ArrayD<T>, b: &ArrayD<T>, f: impl Fn(f64, f64) -> f64) -> OpResult<Tensor> {
    zip_elems(a, b, |x, y| T::from_f64(f(x.to_f64(), y.to_f64())))
}

/// An integer binary function computed in i128 (given the width) and wrapped to `T`.
fn zip_int<T: IntElem>(
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: impl Fn(i128, i128, u32) -> i128,
) -> OpResult<Tensor> {
    zip_elems(a, b, |x, y| {
        T::from_i128(f(x.to_i128(), y.to_i128(), T::BITS))
    })
}

/// `f` applied to every element, wrapped into a tensor.
fn map_elems<T: Elem, U: Elem>(a: &ArrayD<T>, f: impl Fn(T) -> U) -> Tensor {
    U::wrap(a.mapv(f))
}

/// A float function computed in f64 and rounded to `T`.
fn map_f64<T: Elem>(a: &ArrayD<T>, f: impl Fn(f64) -> f64) -> Tensor {
    map_elems(a, |x| T::from_f64(f(x.to_f64())))
}

/// An integer function computed in i128 and wrapped to `T`.
fn map_int<T: IntElem>(a: &ArrayD<T>, f: impl Fn(i128) -> i128) -> Tensor {
    map_elems(a, |x| T::from_i128(f(x.to_i128())))
}

/// The elements of an integer tensor as exact i128 values.
fn int_values(t: &Tensor) -> Option<ArrayD<i128>> {
    on_ints!(t, a => a.mapv(IntElem::to_i128))
}

/// `cond ? a : b` with three-way broadcasting.
fn select<T: Elem>(cond: &ArrayD<bool>, a: &ArrayD<T>, b: &ArrayD<T>) -> OpResult<Tensor> {
    let shape = broadcast_shapes(&[cond.shape(), a.shape(), b.shape()])?;
    let (c, a, b) = (bview(cond, &shape)?, bview(a, &shape)?, bview(b, &shape)?);
    Ok(T::wrap(
        Zip::from(&c)
            .and(&a)
            .and(&b)
            .map_collect(|&c, &x, &y| if c { x } else { y }),
    ))
}

/// The single element of an optional bound input of type `T`.
fn bound<T: Elem>(t: Option<&Tensor>, i: usize) -> OpResult<Option<T>> {
    let Some(t) = t else { return Ok(None) };
    let a = T::view(t)
        .ok_or_else(|| format!("input {i}: dtype {} does not match input 0", t.dtype()))?;
    match a.len() {
        1 => Ok(a.iter().next().copied()),
        n => Err(format!(
            "input {i}: Clip bound must be a scalar, found {n} elements"
        )),
    }
}

/// `Clip` of an array of any numeric type.
fn clip<T: Elem>(
    a: &ArrayD<T>,
    bounds: ClipBounds,
    inputs: &[Option<&Tensor>],
) -> OpResult<Tensor> {
    let (lo, hi) = match bounds {
        ClipBounds::Inputs => (
            bound::<T>(opt(inputs, 1), 1)?,
            bound::<T>(opt(inputs, 2), 2)?,
        ),
        ClipBounds::Attrs { min, max } => (
            min.map(|v| T::from_f64(v.into())),
            max.map(|v| T::from_f64(v.into())),
        ),
    };
    Ok(map_elems(a, |x| {
        let x = lo.map_or(x, |l| max_nan(x, l));
        hi.map_or(x, |h| min_nan(x, h))
    }))
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

impl UnaryKind {
    fn eval(self, x: &Tensor) -> OpResult<Tensor> {
        on_floats!(x, a => map_f64(a, |v| self.apply_f64(v)))
            .or_else(|| on_ints!(x, a => map_int(a, |v| self.apply_int(v))))
            .ok_or_else(|| unsupported(self.name(), &[x]))
    }
}

impl BinaryKind {
    fn eval(self, a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
        if self == BinaryKind::Pow {
            return pow(a, b);
        }
        if self.divides() && b.dtype().is_int() && b.to_i64_vec().contains(&0) {
            return Err(format!("{}: integer division by zero", self.name()));
        }
        let out = on_float_pair!(a, b, x, y => zip_f64(x, y, |p, q| self.apply_f64(p, q)))
            .or_else(
                || on_int_pair!(a, b, x, y => zip_int(x, y, |p, q, w| self.apply_int(p, q, w))),
            )
            .ok_or_else(|| unsupported(self.name(), &[a, b]))??;
        if self == BinaryKind::PRelu && out.shape() != a.shape() {
            return Err(format!(
                "input 1: slope shape {:?} does not broadcast to input shape {:?}",
                b.shape(),
                a.shape()
            ));
        }
        Ok(out)
    }
}

/// `Pow`: any numeric base and exponent types; the output has the base's type. Integer
/// powers of integers are exact (wrapping); other combinations compute in f64.
fn pow(a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    let int_exp = (a.dtype().is_int() && b.dtype().is_int())
        .then(|| int_values(b))
        .flatten();
    let out = match int_exp {
        Some(e) => on_ints!(a, x => pow_int(x, &e)),
        None => {
            let e = b.to_f64_array();
            on_numeric!(a, x => pow_f64(x, &e))
        }
    };
    out.ok_or_else(|| unsupported("Pow", &[a, b]))?
}

/// Integer base, integer exponent.
fn pow_int<T: IntElem>(a: &ArrayD<T>, e: &ArrayD<i128>) -> OpResult<Tensor> {
    zip_with(a, e, |p, q| T::from_i128(int_pow(p.to_i128(), q))).map(T::wrap)
}

/// Any base, exponent as f64.
fn pow_f64<T: Elem>(a: &ArrayD<T>, e: &ArrayD<f64>) -> OpResult<Tensor> {
    zip_with(a, e, |p, q| T::from_f64(p.to_f64().powf(q))).map(T::wrap)
}

impl VariadicKind {
    /// Folds the next input into the accumulator.
    fn combine(self, acc: &Tensor, x: &Tensor) -> OpResult<Tensor> {
        let out = match self {
            Self::Max => on_any_pair!(acc, x, p, q => zip_elems(p, q, max_nan)),
            Self::Min => on_any_pair!(acc, x, p, q => zip_elems(p, q, min_nan)),
            Self::Sum | Self::Mean => on_float_pair!(acc, x, p, q => zip_f64(p, q, |u, v| u + v)),
        };
        out.ok_or_else(|| unsupported(self.name(), &[acc, x]))?
    }

    fn eval(self, xs: &[&Tensor]) -> OpResult<Tensor> {
        let (first, rest) = xs
            .split_first()
            .ok_or_else(|| format!("{}: needs at least one input", self.name()))?;
        let mut acc = (*first).clone();
        for x in rest {
            acc = self.combine(&acc, x)?;
        }
        if self == Self::Mean {
            let n = xs.len() as f64;
            acc = on_floats!(&acc, a => map_f64(a, |v| v / n))
                .ok_or_else(|| unsupported("Mean", xs))?;
        }
        Ok(acc)
    }
}

impl ElementwiseOp {
    /// `Dropout` in inference mode (training mode only with ratio 0, which is the identity).
    fn dropout(a: DropoutAttrs, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let ratio = match opt(inputs, 1) {
            Some(r) => r.scalar_f64().ok_or("input 1: ratio must be a scalar")?,
            None => a.ratio.into(),
        };
        let training = match opt(inputs, 2) {
            Some(t) => {
                t.scalar_f64()
                    .ok_or("input 2: training_mode must be a scalar")?
                    != 0.0
            }
            None => false,
        };
        if training && ratio != 0.0 {
            return Err(format!(
                "training_mode Dropout with ratio {ratio} is random and not supported"
            ));
        }
        let mut out = vec![x.clone()];
        if a.mask {
            let ones = ArrayD::from_elem(IxDyn(x.shape()), true);
            let mask = Tensor::Bool(ones);
            out.push(if a.bool_mask {
                mask
            } else {
                mask.cast(x.dtype())
            });
        }
        Ok(out)
    }

    fn eval_one(&self, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
        use ElementwiseOp::*;
        let op = self.op_type();
        let x = req(inputs, 0)?;
        let y = || req(inputs, 1);
        let out = match self {
            Unary(k) => return k.eval(x),
            Binary(k) => return k.eval(x, y()?),
            Variadic(k) => {
                let xs: Vec<&Tensor> = inputs.iter().flatten().copied().collect();
                return k.eval(&xs);
            }
            Compare(k) => on_any_pair!(x, y()?, p, q => zip_elems(p, q, |u, v| k.test(u, v))),
            Logical(k) => on_pair!([Bool], x, y()?, p, q => zip_elems(p, q, |u, v| k.apply(u, v))),
            Not => on_one!([Bool], x, a => Ok(map_elems(a, |v: bool| !v))),
            Predicate(k) => on_floats!(x, a => Ok(map_elems(a, |v| k.test(v.to_f64())))),
            Clip(b) => on_numeric!(x, a => clip(a, *b, inputs)),
            Where => {
                let (a, b) = (y()?, req(inputs, 2)?);
                match x {
                    Tensor::Bool(c) => on_any_pair!(a, b, p, q => select(c, p, q)),
                    _ => None,
                }
            }
            Cast { to, saturate } => Some(Ok(x.cast_saturate(*to, *saturate))),
            CastLike { saturate } => Some(Ok(x.cast_saturate(y()?.dtype(), *saturate))),
            Identity => Some(Ok(x.clone())),
            Dropout(_) => None,
        };
        let all: Vec<&Tensor> = inputs.iter().flatten().copied().collect();
        out.ok_or_else(|| unsupported(op, &all))?
    }
}

impl OpFamily for ElementwiseOp {
    fn from_onnx(node: &OnnxNode) -> OpResult<Option<Self>> {
        let op = if let Some(k) = UnaryKind::parse(node)? {
            ElementwiseOp::Unary(k)
        } else if let Some(k) = BinaryKind::parse(node)? {
            ElementwiseOp::Binary(k)
        } else if let Some(op) = Self::parse_other(node)? {
            op
        } else {
            return Ok(None);
        };
        op.check_arity(node)?;
        Ok(Some(op))
    }

    fn op_type(&self) -> &'static str {
        use ElementwiseOp::*;
        match self {
            Unary(k) => k.name(),
            Binary(k) => k.name(),
            Variadic(k) => k.name(),
            Compare(k) => k.name(),
            Logical(k) => k.name(),
            Not => "Not",
            Predicate(k) => k.name(),
            Clip(_) => "Clip",
            Where => "Where",
            Cast { .. } => "Cast",
            CastLike { .. } => "CastLike",
            Identity => "Identity",
            Dropout(_) => "Dropout",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let dtypes: Vec<Option<DType>> = inputs.iter().map(|f| f.map(|f| f.dtype)).collect();
        let shapes: Vec<Option<&Shape>> = inputs.iter().map(|f| f.map(|f| &f.shape)).collect();
        let out = self.out_dtypes(&dtypes)?;
        let shape = self.out_shape(&shapes)?;
        Ok(out
            .into_iter()
            .map(|d| Fact::new(d, shape.clone()))
            .collect())
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let dtypes: Vec<Option<DType>> = inputs.iter().map(|t| t.map(Tensor::dtype)).collect();
        self.out_dtypes(&dtypes)?;
        match self {
            ElementwiseOp::Dropout(a) => Self::dropout(*a, inputs),
            _ => Ok(vec![self.eval_one(inputs)?]),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// erf
// ---------------------------------------------------------------------------------------------

use erf_impl::erf;

/// The error function (not in Rust's stable std).
mod erf_impl {
    #![allow(clippy::excessive_precision)]
    // Port of FreeBSD's s_erf.c (via the `libm` crate):
    // Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
    // Developed at SunPro, a Sun Microsystems, Inc. business. Permission to use, copy, modify,
    // and distribute this software is freely granted, provided that this notice is preserved.
    const ERX: f64 = 8.45062911510467529297e-01;
    const EFX8: f64 = 1.02703333676410069053e+00;
    const PP: [f64; 5] = [
        1.28379167095512558561e-01,
        -3.25042107247001499370e-01,
        -2.84817495755985104766e-02,
        -5.77027029648944159157e-03,
        -2.37630166566501626084e-05,
    ];
    const QQ: [f64; 6] = [
        1.0,
        3.97917223959155352819e-01,
        6.50222499887672944485e-02,
        5.08130628187576562776e-03,
        1.32494738004321644526e-04,
        -3.96022827877536812320e-06,
    ];
    const PA: [f64; 7] = [
        -2.36211856075265944077e-03,
        4.14856118683748331666e-01,
        -3.72207876035701323847e-01,
        3.18346619901161753674e-01,
        -1.10894694282396677476e-01,
        3.54783043256182359371e-02,
        -2.16637559486879084300e-03,
    ];
    const QA: [f64; 7] = [
        1.0,
        1.06420880400844228286e-01,
        5.40397917702171048937e-01,
        7.18286544141962662868e-02,
        1.26171219808761642112e-01,
        1.36370839120290507362e-02,
        1.19844998467991074170e-02,
    ];
    const RA: [f64; 8] = [
        -9.86494403484714822705e-03,
        -6.93858572707181764372e-01,
        -1.05586262253232909814e+01,
        -6.23753324503260060396e+01,
        -1.62396669462573470355e+02,
        -1.84605092906711035994e+02,
        -8.12874355063065934246e+01,
        -9.81432934416914548592e+00,
    ];
    const SA: [f64; 9] = [
        1.0,
        1.96512716674392571292e+01,
        1.37657754143519042600e+02,
        4.34565877475229228821e+02,
        6.45387271733267880336e+02,
        4.29008140027567833386e+02,
        1.08635005541779435134e+02,
        6.57024977031928170135e+00,
        -6.04244152148580987438e-02,
    ];
    const RB: [f64; 7] = [
        -9.86494292470009928597e-03,
        -7.99283237680523006574e-01,
        -1.77579549177547519889e+01,
        -1.60636384855821916062e+02,
        -6.37566443368389627722e+02,
        -1.02509513161107724954e+03,
        -4.83519191608651397019e+02,
    ];
    const SB: [f64; 8] = [
        1.0,
        3.03380607434824582924e+01,
        3.25792512996573918826e+02,
        1.53672958608443695994e+03,
        3.19985821950859553908e+03,
        2.55305040643316442583e+03,
        4.74528541206955367215e+02,
        -2.24409524465858183362e+01,
    ];

    /// Polynomial with coefficients in increasing degree (Horner).
    fn poly(c: &[f64], x: f64) -> f64 {
        c.iter().rev().fold(0.0, |acc, &k| acc * x + k)
    }

    /// The error function, accurate to about 1 ulp in f64.
    pub(super) fn erf(x: f64) -> f64 {
        if x.is_nan() {
            return x;
        }
        let ax = x.abs();
        if ax < 0.84375 {
            if ax < f64::from_bits(0x3e30_0000_0000_0000) {
                return 0.125 * (8.0 * x + EFX8 * x);
            }
            let z = x * x;
            return x + x * (poly(&PP, z) / poly(&QQ, z));
        }
        let y = if ax < 1.25 {
            let s = ax - 1.0;
            ERX + poly(&PA, s) / poly(&QA, s)
        } else if ax < 6.0 {
            let s = 1.0 / (ax * ax);
            let (r, q) = if ax < 1.0 / 0.35 {
                (poly(&RA, s), poly(&SA, s))
            } else {
                (poly(&RB, s), poly(&SB, s))
            };
            // z: ax with the low 32 bits cleared, so that z*z is exact
            let z = f64::from_bits(ax.to_bits() & 0xffff_ffff_0000_0000);
            1.0 - (-z * z - 0.5625).exp() * ((z - ax) * (z + ax) + r / q).exp() / ax
        } else {
            1.0
        };
        y.copysign(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::AttrValue;
    use crate::shape::Dim;

    fn node(
        op: &str,
        opset: i64,
        attrs: &[(&str, AttrValue)],
        n_in: usize,
        n_out: usize,
    ) -> OnnxNode {
        OnnxNode::new(op, opset, attrs, vec![true; n_in], n_out)
    }

    fn parse(op: &str, opset: i64, attrs: &[(&str, AttrValue)], n_in: usize) -> ElementwiseOp {
        ElementwiseOp::from_onnx(&node(op, opset, attrs, n_in, 1))
            .expect("parses")
            .expect("is elementwise")
    }

    fn run(op: &ElementwiseOp, inputs: &[&Tensor]) -> OpResult<Tensor> {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.eval(&ins).map(|mut v| v.remove(0))
    }

    fn ints(t: &Tensor) -> Vec<i64> {
        t.to_i64_vec()
    }

    fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape, v.to_vec())
    }

    #[test]
    fn parse_errors_and_other_families() {
        let n = node("Conv", 13, &[], 2, 1);
        assert_eq!(ElementwiseOp::from_onnx(&n).unwrap(), None);
        let bad = node(
            "Gelu",
            20,
            &[("approximate", AttrValue::String("erf".into()))],
            1,
            1,
        );
        assert!(ElementwiseOp::from_onnx(&bad)
            .unwrap_err()
            .contains("'approximate'"));
        let arity = node("Add", 14, &[], 3, 1);
        assert!(ElementwiseOp::from_onnx(&arity)
            .unwrap_err()
            .contains("expected 2 inputs"));
        let cast = node("Cast", 21, &[("to", AttrValue::Int(8))], 1, 1);
        assert!(ElementwiseOp::from_onnx(&cast)
            .unwrap_err()
            .contains("'to'"));
        let shift = node("BitShift", 11, &[], 2, 1);
        assert!(ElementwiseOp::from_onnx(&shift)
            .unwrap_err()
            .contains("'direction'"));
        let mut missing = node("Where", 16, &[], 3, 1);
        missing.inputs_present[1] = false;
        assert!(ElementwiseOp::from_onnx(&missing)
            .unwrap_err()
            .contains("input 1"));
        let empty = node("Max", 13, &[], 0, 1);
        assert!(ElementwiseOp::from_onnx(&empty).is_err());
        assert_eq!(parse("Selu", 6, &[], 1).op_type(), "Selu");
    }

    #[test]
    fn integer_arithmetic_is_c_like() {
        let a = Tensor::from_vec(&[4], vec![-7i32, 7, -7, i32::MIN]);
        let b = Tensor::from_vec(&[4], vec![2i32, -2, -2, -1]);
        let div = run(&parse("Div", 14, &[], 2), &[&a, &b]).unwrap();
        assert_eq!(ints(&div), vec![-3, -3, 3, i32::MIN as i64]);
        let zero = Tensor::from_vec(&[4], vec![1i32, 0, 1, 1]);
        assert!(run(&parse("Div", 14, &[], 2), &[&a, &zero]).is_err());
        let x = Tensor::from_vec(&[2], vec![i8::MIN, 5]);
        assert_eq!(
            ints(&run(&parse("Neg", 13, &[], 1), &[&x]).unwrap()),
            vec![-128, -5]
        );
        assert_eq!(
            ints(&run(&parse("Abs", 13, &[], 1), &[&x]).unwrap()),
            vec![-128, 5]
        );
        let u = Tensor::from_vec(&[1], vec![250u8]);
        let v = Tensor::from_vec(&[1], vec![10u8]);
        assert_eq!(
            ints(&run(&parse("Add", 14, &[], 2), &[&u, &v]).unwrap()),
            vec![4]
        );
        assert_eq!(
            ints(&run(&parse("Sub", 14, &[], 2), &[&v, &u]).unwrap()),
            vec![16]
        );
    }

    #[test]
    fn modulo_signs() {
        let x = Tensor::from_vec(&[6], vec![-4i64, 7, 5, 4, -7, 8]);
        let y = Tensor::from_vec(&[6], vec![2i64, -3, 8, -2, 3, 5]);
        let m = run(&parse("Mod", 13, &[], 2), &[&x, &y]).unwrap();
        assert_eq!(ints(&m), vec![0, -2, 5, 0, 2, 3]);
        let f = run(
            &parse("Mod", 13, &[("fmod", AttrValue::Int(1))], 2),
            &[&x, &y],
        )
        .unwrap();
        assert_eq!(ints(&f), vec![0, 1, 5, 0, -1, 3]);
        let xf = f32s(&[3], &[-3.0, 3.0, -0.0]);
        let yf = f32s(&[3], &[f32::INFINITY, -2.0, 2.0]);
        let m = run(&parse("Mod", 13, &[], 2), &[&xf, &yf]).unwrap();
        let v = m.to_f64_vec();
        assert_eq!(v[0], f64::INFINITY);
        assert_eq!(v[1], -1.0);
        assert!(v[2] == 0.0 && v[2].is_sign_positive());
    }

    #[test]
    fn pow_mixed_types() {
        let pow = parse("Pow", 15, &[], 2);
        let b = Tensor::from_vec(&[3], vec![2i64, 3, -2]);
        let e = Tensor::from_vec(&[3], vec![10i64, 0, 3]);
        assert_eq!(ints(&run(&pow, &[&b, &e]).unwrap()), vec![1024, 1, -8]);
        let bi = Tensor::from_vec(&[2], vec![4i32, 9]);
        let ef = f32s(&[1], &[0.5]);
        let r = run(&pow, &[&bi, &ef]).unwrap();
        assert_eq!((r.dtype(), ints(&r)), (DType::I32, vec![2, 3]));
        let bf = f32s(&[2], &[2.0, 1.5]);
        let ei = Tensor::from_vec(&[2], vec![3u64, 2]);
        assert_eq!(
            run(&pow, &[&bf, &ei]).unwrap().to_f64_vec(),
            vec![8.0, 2.25]
        );
        let facts = [
            Fact::new(DType::I32, Shape::known(&[2])),
            Fact::new(DType::F32, Shape::known(&[])),
        ];
        let out = pow.infer(&[Some(&facts[0]), Some(&facts[1])]).unwrap();
        assert_eq!(out[0].dtype, DType::I32);
    }

    #[test]
    fn bit_shifts() {
        let right = parse(
            "BitShift",
            11,
            &[("direction", AttrValue::String("RIGHT".into()))],
            2,
        );
        let left = parse(
            "BitShift",
            11,
            &[("direction", AttrValue::String("LEFT".into()))],
            2,
        );
        let x = Tensor::from_vec(&[3], vec![-8i8, 4, -1]);
        let s = Tensor::from_vec(&[3], vec![8i8, 9, 127]);
        assert_eq!(ints(&run(&right, &[&x, &s]).unwrap()), vec![-1, 0, -1]);
        assert_eq!(ints(&run(&left, &[&x, &s]).unwrap()), vec![0, 0, 0]);
        let x = Tensor::from_vec(&[3], vec![64i8, 1, -64]);
        let s = Tensor::from_vec(&[3], vec![1i8, 7, 1]);
        assert_eq!(
            ints(&run(&left, &[&x, &s]).unwrap()),
            vec![-128, -128, -128]
        );
        let x = Tensor::from_vec(&[1], vec![u64::MAX]);
        let s = Tensor::from_vec(&[1], vec![63u64]);
        assert_eq!(run(&right, &[&x, &s]).unwrap().to_i64_vec(), vec![1]);
    }

    #[test]
    fn clip_forms() {
        let x = f32s(&[4], &[-2.0, -0.5, 0.5, f32::NAN]);
        let old = parse(
            "Clip",
            6,
            &[
                ("min", AttrValue::Float(-1.0)),
                ("max", AttrValue::Float(0.0)),
            ],
            1,
        );
        let v = run(&old, &[&x]).unwrap().to_f64_vec();
        assert_eq!(&v[..3], &[-1.0, -0.5, 0.0]);
        assert!(v[3].is_nan());
        let new = parse("Clip", 13, &[], 3);
        let lo = Tensor::scalar(0.0f32);
        let hi = Tensor::scalar(-1.0f32);
        let v = run(&new, &[&x, &lo, &hi]).unwrap().to_f64_vec();
        assert_eq!(&v[..3], &[-1.0, -1.0, -1.0]);
        let mut only_max = node("Clip", 13, &[], 3, 1);
        only_max.inputs_present[1] = false;
        let op = ElementwiseOp::from_onnx(&only_max).unwrap().unwrap();
        let i = Tensor::from_vec(&[3], vec![-100i8, 5, 100]);
        let m = Tensor::scalar(10i8);
        let out = op.eval(&[Some(&i), None, Some(&m)]).unwrap();
        assert_eq!(ints(&out[0]), vec![-100, 5, 10]);
        let vec_bound = f32s(&[2], &[0.0, 1.0]);
        assert!(run(&new, &[&x, &vec_bound]).is_err());
    }

    #[test]
    fn variadic_broadcast_and_nan() {
        let a = f32s(&[2, 1], &[1.0, f32::NAN]);
        let b = f32s(&[3], &[0.0, 2.0, 4.0]);
        let c = f32s(&[], &[3.0]);
        let max = run(&parse("Max", 13, &[], 3), &[&a, &b, &c]).unwrap();
        assert_eq!(max.shape(), &[2, 3]);
        let v = max.to_f64_vec();
        assert_eq!(&v[..3], &[3.0, 3.0, 4.0]);
        assert!(v[3..].iter().all(|x| x.is_nan()));
        let mean = run(&parse("Mean", 13, &[], 2), &[&b, &c]).unwrap();
        assert_eq!(mean.to_f64_vec(), vec![1.5, 2.5, 3.5]);
        let one = run(&parse("Sum", 13, &[], 1), &[&b]).unwrap();
        assert_eq!(one, b);
        let i = Tensor::from_vec(&[1], vec![1i32]);
        assert!(run(&parse("Sum", 13, &[], 2), &[&b, &i]).is_err());
    }

    #[test]
    fn where_compare_logic() {
        let c = Tensor::from_vec(&[2, 1], vec![true, false]);
        let x = Tensor::from_vec(&[2], vec![1i64, 2]);
        let y = Tensor::scalar(9i64);
        let w = run(&parse("Where", 16, &[], 3), &[&c, &x, &y]).unwrap();
        assert_eq!((w.shape(), ints(&w)), (&[2usize, 2][..], vec![1, 2, 9, 9]));
        let less = run(&parse("Less", 13, &[], 2), &[&x, &y]).unwrap();
        assert_eq!(less, Tensor::from_vec(&[2], vec![true, true]));
        let n = f32s(&[1], &[f32::NAN]);
        let eq = run(&parse("Equal", 13, &[], 2), &[&n, &n]).unwrap();
        assert_eq!(eq, Tensor::from_vec(&[1], vec![false]));
        let t = Tensor::from_vec(&[2], vec![true, false]);
        let xor = run(&parse("Xor", 7, &[], 2), &[&t, &c]).unwrap();
        assert_eq!(ints(&xor), vec![0, 1, 1, 0]);
        assert_eq!(
            ints(&run(&parse("Not", 1, &[], 1), &[&t]).unwrap()),
            vec![0, 1]
        );
        assert!(run(&parse("And", 7, &[], 2), &[&t, &x]).is_err());
    }

    #[test]
    fn float_functions() {
        let x = f32s(&[5], &[0.5, 1.5, 2.5, -0.5, -2.5]);
        let r = run(&parse("Round", 11, &[], 1), &[&x]).unwrap();
        assert_eq!(r.to_f64_vec(), vec![0.0, 2.0, 2.0, -0.0, -2.0]);
        let cases = [
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.5, 0.9999992569016276),
            (-0.1, -0.1124629160182849),
            (1e-10, 1.1283791670955126e-10),
            (0.9, 0.7969082124228322),
            (1.3, 0.9340079449406524),
        ];
        for (v, want) in cases {
            assert!((erf(v) - want).abs() <= 2e-16, "erf({v})");
        }
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert!(erf(f64::NAN).is_nan());
        let inf = f32s(&[3], &[f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        let pos_only = parse("IsInf", 20, &[("detect_negative", AttrValue::Int(0))], 1);
        assert_eq!(ints(&run(&pos_only, &[&inf]).unwrap()), vec![1, 0, 0]);
        assert_eq!(
            ints(&run(&parse("IsNaN", 20, &[], 1), &[&inf]).unwrap()),
            vec![0, 0, 1]
        );
        let h = Tensor::from_vec(&[1], vec![half::f16::from_f32(-1.0)]);
        let e = run(&parse("Elu", 6, &[], 1), &[&h]).unwrap();
        assert_eq!(e.dtype(), DType::F16);
        assert!((e.to_f64_vec()[0] - (-0.632)).abs() < 1e-3);
        let i = Tensor::from_vec(&[1], vec![1i32]);
        assert!(run(&parse("Sqrt", 13, &[], 1), &[&i]).is_err());
        let relu = run(
            &parse("Relu", 14, &[], 1),
            &[&Tensor::from_vec(&[2], vec![-3i8, 3])],
        );
        assert_eq!(ints(&relu.unwrap()), vec![0, 3]);
    }

    #[test]
    fn cast_and_identity() {
        let x = f32s(&[3], &[1.7, -1.7, f32::NAN]);
        let c = parse(
            "Cast",
            19,
            &[("to", AttrValue::Int(7)), ("saturate", AttrValue::Int(0))],
            1,
        );
        assert_eq!(ints(&run(&c, &[&x]).unwrap()), vec![1, -1, 0]);
        let like = Tensor::from_vec(&[0], Vec::<bool>::new());
        let b = run(&parse("CastLike", 19, &[], 2), &[&x, &like]).unwrap();
        assert_eq!(b, Tensor::from_vec(&[3], vec![true, true, true]));
        assert_eq!(run(&parse("Identity", 16, &[], 1), &[&like]).unwrap(), like);
    }

    #[test]
    fn low_precision_cast_and_rejection() {
        let x = f32s(&[3], &[1e6, 1.0625, f32::NAN]);
        let to = ("to", AttrValue::Int(17)); // FLOAT8E4M3FN
        let sat = run(&parse("Cast", 19, std::slice::from_ref(&to), 1), &[&x]).unwrap();
        assert_eq!(sat.dtype(), DType::F8E4M3FN);
        let v = sat.to_f64_vec();
        assert_eq!(&v[..2], &[448.0, 1.0]);
        assert!(v[2].is_nan());
        let no_sat = parse("Cast", 19, &[to, ("saturate", AttrValue::Int(0))], 1);
        assert!(run(&no_sat, &[&x]).unwrap().to_f64_vec()[0].is_nan());
        let back = run(&parse("CastLike", 19, &[], 2), &[&sat, &x]).unwrap();
        assert_eq!(back.dtype(), DType::F32);
        // arithmetic rejects low-precision dtypes at type inference
        let f8 = Fact::new(DType::F8E4M3FN, Shape::known(&[3]));
        let err = parse("Add", 14, &[], 2)
            .infer(&[Some(&f8), Some(&f8)])
            .unwrap_err();
        assert!(err.contains("dtype f8e4m3fn is not supported"), "{err}");
        assert!(parse("Sqrt", 13, &[], 1).infer(&[Some(&f8)]).is_err());
        assert!(run(&parse("Add", 14, &[], 2), &[&sat, &sat]).is_err());
        let id = run(&parse("Identity", 16, &[], 1), &[&sat]).unwrap();
        assert!(id.check_close(&sat, 0.0, 0.0).is_ok());
    }

    #[test]
    fn dropout_inference_mode() {
        let x = f32s(&[2], &[1.0, 2.0]);
        let op = ElementwiseOp::from_onnx(&node("Dropout", 22, &[], 3, 2))
            .unwrap()
            .unwrap();
        let ratio = Tensor::scalar(0.5f32);
        let off = Tensor::scalar(false);
        let out = op.eval(&[Some(&x), Some(&ratio), Some(&off)]).unwrap();
        assert_eq!(
            out,
            vec![x.clone(), Tensor::from_vec(&[2], vec![true, true])]
        );
        let on = Tensor::scalar(true);
        assert!(op.eval(&[Some(&x), Some(&ratio), Some(&on)]).is_err());
        let zero = Tensor::scalar(0.0f32);
        assert!(op.eval(&[Some(&x), Some(&zero), Some(&on)]).is_ok());
        let old = ElementwiseOp::from_onnx(&node(
            "Dropout",
            7,
            &[("ratio", AttrValue::Float(0.2))],
            1,
            2,
        ))
        .unwrap()
        .unwrap();
        let out = old.eval(&[Some(&x)]).unwrap();
        assert_eq!(out[1], f32s(&[2], &[1.0, 1.0]));
        let bad = node("Dropout", 7, &[("ratio", AttrValue::Float(1.5))], 1, 1);
        assert!(ElementwiseOp::from_onnx(&bad).is_err());
        assert!(ElementwiseOp::from_onnx(&node("Dropout", 11, &[], 2, 1)).is_err());
    }

    #[test]
    fn inference() {
        let n = Shape(vec![Dim::Sym("N".into()), Dim::Known(1)]);
        let a = Fact::new(DType::F32, n);
        let b = Fact::new(DType::F32, Shape::known(&[4]));
        let add = parse("Add", 14, &[], 2);
        let out = add.infer(&[Some(&a), Some(&b)]).unwrap();
        assert_eq!(out[0].shape.to_string(), "[N,4]");
        let i = Fact::new(DType::I64, Shape::known(&[4]));
        assert!(add
            .infer(&[Some(&a), Some(&i)])
            .unwrap_err()
            .contains("does not match"));
        let c = Fact::new(DType::F32, Shape::known(&[3]));
        assert!(add.infer(&[Some(&b), Some(&c)]).is_err());
        let cmp = parse("GreaterOrEqual", 16, &[], 2)
            .infer(&[Some(&a), Some(&b)])
            .unwrap();
        assert_eq!(cmp[0].dtype, DType::Bool);
        let prelu = parse("PRelu", 16, &[], 2);
        let x = Fact::new(DType::F32, Shape::known(&[2, 3]));
        let slope = Fact::new(DType::F32, Shape::known(&[3]));
        assert_eq!(
            prelu.infer(&[Some(&x), Some(&slope)]).unwrap()[0].shape,
            x.shape
        );
        let wide = Fact::new(DType::F32, Shape::known(&[4, 2, 3]));
        assert!(prelu.infer(&[Some(&x), Some(&wide)]).is_err());
        let xt = f32s(&[2, 3], &[0.0; 6]);
        let wt = f32s(&[4, 2, 3], &[0.0; 24]);
        assert!(run(&prelu, &[&xt, &wt]).is_err());
        let cast = parse("Cast", 13, &[("to", AttrValue::Int(10))], 1);
        assert_eq!(cast.infer(&[Some(&a)]).unwrap()[0].dtype, DType::F16);
        let sqrt = parse("Sqrt", 13, &[], 1);
        assert!(sqrt.infer(&[Some(&i)]).unwrap_err().contains("float"));
        assert!(sqrt.infer(&[None]).is_err());
        let w = parse("Where", 16, &[], 3);
        assert!(w
            .infer(&[Some(&a), Some(&a), Some(&a)])
            .unwrap_err()
            .contains("bool"));
    }

    /// Every op on every dtype combination and some awkward shapes and values: eval never
    /// panics, and whenever it succeeds, inference agrees with the result.
    #[test]
    fn never_panics_and_infer_agrees() {
        let shapes: [&[usize]; 5] = [&[], &[0], &[3], &[2, 1], &[2, 3]];
        let values = [0.0, -1.0, 2.5, f64::NAN, -1e30, 255.0, 64.0];
        let make = |d: DType, s: &[usize], k: usize| {
            let n: usize = s.iter().product();
            let v: Vec<f64> = (0..n).map(|i| values[(i + k) % values.len()]).collect();
            Tensor::from_f64_array(d, ArrayD::from_shape_vec(IxDyn(s), v).unwrap())
        };
        let dtypes = [
            DType::F32,
            DType::F16,
            DType::I8,
            DType::U64,
            DType::I64,
            DType::Bool,
        ];
        let shift = ("direction", AttrValue::String("LEFT".into()));
        let names: Vec<(&str, Vec<(&str, AttrValue)>)> = UnaryKind::SIMPLE
            .iter()
            .map(|k| k.name())
            .chain([
                "LeakyRelu",
                "Elu",
                "Selu",
                "Celu",
                "ThresholdedRelu",
                "HardSigmoid",
                "Gelu",
            ])
            .chain(BinaryKind::SIMPLE.iter().map(|k| k.name()))
            .chain(VariadicKind::ALL.iter().map(|k| k.name()))
            .chain(CompareKind::ALL.iter().map(|k| k.name()))
            .chain(LogicalKind::ALL.iter().map(|k| k.name()))
            .chain([
                "Not", "IsNaN", "IsInf", "Clip", "Where", "CastLike", "Identity", "Mod",
            ])
            .map(|n| (n, vec![]))
            .chain([
                ("BitShift", vec![shift]),
                ("Cast", vec![("to", AttrValue::Int(6))]),
            ])
            .collect();
        let mut evaluated = 0;
        for (name, attrs) in &names {
            for n_in in 1..=3 {
                let Ok(Some(op)) = ElementwiseOp::from_onnx(&node(name, 17, attrs, n_in, 1)) else {
                    continue;
                };
                for (di, &d0) in dtypes.iter().enumerate() {
                    for &d1 in &dtypes[di.saturating_sub(1)..] {
                        for (si, s0) in shapes.iter().enumerate() {
                            let s1 = shapes[(si + 2) % shapes.len()];
                            let ts: Vec<Tensor> = (0..n_in)
                                .map(|i| {
                                    if i == 0 {
                                        make(d0, s0, i)
                                    } else {
                                        make(d1, s1, i)
                                    }
                                })
                                .collect();
                            let ins: Vec<Option<&Tensor>> = ts.iter().map(Some).collect();
                            let facts: Vec<Fact> = ts
                                .iter()
                                .map(|t| Fact::new(t.dtype(), Shape::known(t.shape())))
                                .collect();
                            let fs: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
                            let Ok(outs) = op.eval(&ins) else { continue };
                            evaluated += 1;
                            let inferred = op.infer(&fs).unwrap_or_else(|e| {
                                panic!("{name} {ins:?}: eval ok but infer failed: {e}")
                            });
                            for (o, f) in outs.iter().zip(&inferred) {
                                assert_eq!(o.dtype(), f.dtype, "{name} {ins:?}");
                                assert_eq!(Shape::known(o.shape()), f.shape, "{name} {ins:?}");
                            }
                        }
                    }
                }
            }
        }
        assert!(evaluated > 1000, "only {evaluated} evaluations succeeded");
    }
}
