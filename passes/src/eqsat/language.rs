//! The e-graph language: Kiln's tensor ops as e-nodes.
//!
//! The ops that rewrite rules look at have their own node (`add`, `matmul`, `transpose`,
//! `conv`...); every other op becomes a generic `(op @K inputs...)` node whose attributes live
//! in the analysis' op table under key `K`. Leaves are graph inputs (by name), constants
//! (`#K`, a key into the analysis' constant table), integer attributes, integer lists
//! (`[0,2,1]`), attribute keys (`@K`) and `none` for an absent optional input. A node with
//! several outputs is a tuple, projected by `(out K tuple)`.

use egg::{define_language, Id, Symbol};
use kiln_ir::ops::array::{ArrayOp, IntsArg};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, UnaryKind};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::Op;
use std::fmt;
use std::str::FromStr;

/// A list of integers (a permutation), written `[0,2,1]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ints(pub Vec<i64>);

impl fmt::Display for Ints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: Vec<String> = self.0.iter().map(|v| v.to_string()).collect();
        write!(f, "[{}]", s.join(","))
    }
}

impl FromStr for Ints {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let inner = s
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(|| format!("'{s}' is not an int list"))?;
        if inner.is_empty() {
            return Ok(Ints(vec![]));
        }
        inner
            .split(',')
            .map(|v| v.parse::<i64>().map_err(|e| format!("'{s}': {e}")))
            .collect::<Result<_, _>>()
            .map(Ints)
    }
}

macro_rules! key_type {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u32);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                s.strip_prefix($prefix)
                    .and_then(|k| k.parse().ok())
                    .map($name)
                    .ok_or_else(|| format!("'{s}' is not a {}", stringify!($name)))
            }
        }
    };
}

key_type!(
    /// Key of an op (with its attributes) in the analysis' op table, written `@K`.
    AttrKey,
    "@"
);
key_type!(
    /// Key of a constant tensor in the analysis' constant table, written `#K`.
    ConstKey,
    "#"
);

define_language! {
    /// Kiln tensor ops as e-nodes (see the module doc for the leaves). Variants are the
    /// elementwise ops `add sub mul div neg relu sigmoid tanh exp erf sqrt abs`, `matmul`,
    /// `(transpose [perm] x)`, `(reshape x shape)`, `(concat axis x...)`,
    /// `(slice x starts ends axes steps)`, `(conv @attrs x w b)`, the generic
    /// `(op @attrs inputs...)`, `(out k tuple)`, `none`, the parallel ops `(shard axis k x)`,
    /// `(gather axis k x)`, `(allreduce k x)` (see [`super::dist`]), and the leaves.
    #[allow(missing_docs)]
    pub enum Kiln {
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "neg" = Neg(Id),
        "relu" = Relu(Id),
        "sigmoid" = Sigmoid(Id),
        "tanh" = Tanh(Id),
        "exp" = Exp(Id),
        "erf" = Erf(Id),
        "sqrt" = Sqrt(Id),
        "abs" = Abs(Id),
        "matmul" = MatMul([Id; 2]),
        // (transpose [perm] x)
        "transpose" = Transpose([Id; 2]),
        // (reshape x shape), shape an int64 tensor value
        "reshape" = Reshape([Id; 2]),
        // (concat axis x...)
        "concat" = Concat(Box<[Id]>),
        // (slice x starts ends axes steps), axes/steps may be `none`
        "slice" = Slice([Id; 5]),
        // (conv @attrs x w b), b may be `none`
        "conv" = Conv([Id; 4]),
        // (op @attrs inputs...): any other op
        "op" = Op(Box<[Id]>),
        // (out k tuple): output k of a multi-output op
        "out" = Out([Id; 2]),
        "none" = NoneArg([Id; 0]),
        // (shard axis k x): part `rank` of `k` equal parts of x along `axis` (Partition)
        "shard" = Shard([Id; 3]),
        // (gather axis k x): the parts of x concatenated along `axis` (all-gather, Combine)
        "gather" = Gather([Id; 3]),
        // (allreduce k x): the sum of the ranks' partial x (all-reduce, Reduction)
        "allreduce" = AllReduce([Id; 2]),
        Int(i64),
        Ints(Ints),
        Attr(AttrKey),
        Const(ConstKey),
        Input(Symbol),
    }
}

/// A unary op with its own node: name, constructor and kind.
pub type UnaryEntry = (&'static str, fn(Id) -> Kiln, UnaryKind);
/// A binary op with its own node: name, constructor and kind.
pub type BinaryEntry = (&'static str, fn([Id; 2]) -> Kiln, BinaryKind);

/// The unary elementwise ops with their own node.
pub const UNARY: [UnaryEntry; 8] = [
    ("neg", Kiln::Neg, UnaryKind::Neg),
    ("relu", Kiln::Relu, UnaryKind::Relu),
    ("sigmoid", Kiln::Sigmoid, UnaryKind::Sigmoid),
    ("tanh", Kiln::Tanh, UnaryKind::Tanh),
    ("exp", Kiln::Exp, UnaryKind::Exp),
    ("erf", Kiln::Erf, UnaryKind::Erf),
    ("sqrt", Kiln::Sqrt, UnaryKind::Sqrt),
    ("abs", Kiln::Abs, UnaryKind::Abs),
];

/// The binary elementwise ops with their own node.
pub const BINARY: [BinaryEntry; 4] = [
    ("add", Kiln::Add, BinaryKind::Add),
    ("sub", Kiln::Sub, BinaryKind::Sub),
    ("mul", Kiln::Mul, BinaryKind::Mul),
    ("div", Kiln::Div, BinaryKind::Div),
];

/// The canonical `Slice` op (all arguments as inputs 1..=4).
pub fn slice_op() -> Op {
    Op::Array(ArrayOp::Slice {
        starts: IntsArg::Input(1),
        ends: IntsArg::Input(2),
        axes: IntsArg::Input(3),
        steps: IntsArg::Input(4),
    })
}

/// The canonical `Reshape` op (shape as input 1, no `allowzero`).
pub fn reshape_op() -> Op {
    Op::Array(ArrayOp::Reshape {
        shape: IntsArg::Input(1),
        allowzero: false,
    })
}

/// What an e-node computes: the op and its input slots (children that are values, `none`
/// children included), or why it is not an op.
pub enum Lowered<'a> {
    /// An op applied to these input classes.
    Op(Op, Vec<Id>),
    /// A leaf or attribute: no op.
    Leaf,
    /// Output `k` of a tuple class.
    Out(Id, Id),
    /// An op stored in the op table applied to these inputs.
    Table(AttrKey, &'a [Id]),
}

impl Kiln {
    /// Lowers an e-node to an op. `int(id)` / `ints(id)` read attribute leaves of children.
    pub fn lower(
        &self,
        int: impl Fn(Id) -> Option<i64>,
        ints: impl Fn(Id) -> Option<Vec<i64>>,
        attr: impl Fn(Id) -> Option<AttrKey>,
    ) -> Option<Lowered<'_>> {
        let ew = |o| Op::Elementwise(o);
        let un = |k| ew(ElementwiseOp::Unary(k));
        let bin = |k| ew(ElementwiseOp::Binary(k));
        Some(match self {
            Kiln::Add(c) => Lowered::Op(bin(BinaryKind::Add), c.to_vec()),
            Kiln::Sub(c) => Lowered::Op(bin(BinaryKind::Sub), c.to_vec()),
            Kiln::Mul(c) => Lowered::Op(bin(BinaryKind::Mul), c.to_vec()),
            Kiln::Div(c) => Lowered::Op(bin(BinaryKind::Div), c.to_vec()),
            Kiln::Neg(c) => Lowered::Op(un(UnaryKind::Neg), vec![*c]),
            Kiln::Relu(c) => Lowered::Op(un(UnaryKind::Relu), vec![*c]),
            Kiln::Sigmoid(c) => Lowered::Op(un(UnaryKind::Sigmoid), vec![*c]),
            Kiln::Tanh(c) => Lowered::Op(un(UnaryKind::Tanh), vec![*c]),
            Kiln::Exp(c) => Lowered::Op(un(UnaryKind::Exp), vec![*c]),
            Kiln::Erf(c) => Lowered::Op(un(UnaryKind::Erf), vec![*c]),
            Kiln::Sqrt(c) => Lowered::Op(un(UnaryKind::Sqrt), vec![*c]),
            Kiln::Abs(c) => Lowered::Op(un(UnaryKind::Abs), vec![*c]),
            Kiln::MatMul(c) => Lowered::Op(Op::Linalg(LinalgOp::MatMul), c.to_vec()),
            Kiln::Transpose([p, x]) => Lowered::Op(
                Op::Array(ArrayOp::Transpose {
                    perm: Some(ints(*p)?),
                }),
                vec![*x],
            ),
            Kiln::Reshape(c) => Lowered::Op(reshape_op(), c.to_vec()),
            Kiln::Concat(c) => {
                let axis = int(*c.first()?)?;
                Lowered::Op(Op::Array(ArrayOp::Concat { axis }), c[1..].to_vec())
            }
            Kiln::Slice(c) => Lowered::Op(slice_op(), c.to_vec()),
            Kiln::Conv([a, rest @ ..]) => Lowered::Table(attr(*a)?, rest),
            Kiln::Op(c) => Lowered::Table(attr(*c.first()?)?, &c[1..]),
            Kiln::Out([k, t]) => Lowered::Out(*k, *t),
            // communication, not an op of the graph (see `super::dist`)
            Kiln::Shard(_) | Kiln::Gather(_) | Kiln::AllReduce(_) => return None,
            Kiln::NoneArg(_)
            | Kiln::Int(_)
            | Kiln::Ints(_)
            | Kiln::Attr(_)
            | Kiln::Const(_)
            | Kiln::Input(_) => Lowered::Leaf,
        })
    }

    /// Whether this node is a MatMul, Gemm-like or Conv contraction (for fusion-aware costs).
    pub fn is_contraction(&self) -> bool {
        matches!(self, Kiln::MatMul(_) | Kiln::Conv(_))
    }
}
