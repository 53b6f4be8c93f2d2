//! Shape manipulation and data movement ops: `Reshape`, `Transpose`, `Flatten`, `Squeeze`,
//! `Unsqueeze`, `Concat`, `Split`, `Slice`, `Gather*`, `Scatter*`, `Expand`, `Tile`, `Pad`,
//! `Shape`, `Size`, `ConstantOfShape`, `Range`, `Trilu`, `OneHot`, `DepthToSpace`,
//! `SpaceToDepth`, `NonZero` and `EyeLike`.
//!
//! Attributes that later opsets turned into inputs (Reshape `shape`, Squeeze/Unsqueeze `axes`,
//! Split `split`, Slice `starts`/`ends`/`axes`/`steps`, Pad `pads`/`value`) are held as an
//! [`IntsArg`], which says whether the list came from the attribute or is read from an input.
//!
//! `infer` propagates constant values: `Shape`/`Size` of statically known shapes are
//! constants, and any op of this family whose inputs are all constant (and whose output is
//! small) is evaluated, so that exporter shape chains (`Shape → Gather → Unsqueeze → Concat →
//! Reshape`) fold into static shapes.

mod indexing;
mod layout;
mod shape_ops;
mod slicing;
#[cfg(test)]
mod tests;

use super::{Fact, OnnxNode, OpFamily, OpResult};
use crate::dtype::DType;
use crate::shape::{Dim, Shape};
use crate::tensor::{Elem, Tensor};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// Outputs with at most this many elements are folded into constants by `infer`.
const FOLD_LIMIT: usize = 1 << 16;

/// A list of ints that older opsets give as an attribute and newer ones as an input.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum IntsArg {
    /// Not given at all: the op's default applies.
    Default,
    /// Given by the attribute.
    Attr(Vec<i64>),
    /// Read from this input slot (an absent input means the default).
    Input(usize),
}

/// The reduction of `ScatterElements` / `ScatterND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reduction {
    /// Overwrite.
    None,
    /// Add to the existing value.
    Add,
    /// Multiply the existing value.
    Mul,
    /// Keep the maximum.
    Max,
    /// Keep the minimum.
    Min,
}

/// The border mode of `Pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PadMode {
    /// Fill with a constant.
    Constant,
    /// Mirror without repeating the edge element.
    Reflect,
    /// Repeat the edge element.
    Edge,
    /// Wrap around (periodic).
    Wrap,
}

/// The channel ordering of `DepthToSpace` / `SpaceToDepth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BlockMode {
    /// Depth-column-row: the block offset is the outer part of the channel index.
    Dcr,
    /// Column-row-depth: the block offset is the inner part of the channel index.
    Crd,
}

/// Ops of the array family.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ArrayOp {
    /// `Reshape`: `0` copies the input dim (unless `allowzero`), `-1` is inferred.
    Reshape {
        /// The target shape (attribute before opset 5, input 1 after).
        shape: IntsArg,
        /// A `0` in the shape means a zero dim rather than "copy".
        allowzero: bool,
    },
    /// `Transpose` (default permutation: reverse the axes).
    Transpose {
        /// The permutation, if given.
        perm: Option<Vec<i64>>,
    },
    /// `Flatten` to 2-D around `axis`.
    Flatten {
        /// Split point, in `[-rank, rank]`.
        axis: i64,
    },
    /// `Squeeze` size-1 axes (all of them by default).
    Squeeze {
        /// Axes to remove (attribute before opset 13, input 1 after).
        axes: IntsArg,
    },
    /// `Unsqueeze`: insert size-1 axes.
    Unsqueeze {
        /// Axes in the output (attribute before opset 13, input 1 after).
        axes: IntsArg,
    },
    /// `Concat` along an axis.
    Concat {
        /// The axis.
        axis: i64,
    },
    /// `Split` into several outputs along an axis.
    Split {
        /// The axis.
        axis: i64,
        /// Part sizes (attribute before opset 13, input 1 after); equal parts by default.
        split: IntsArg,
        /// Number of outputs.
        outputs: usize,
    },
    /// `Slice` (attributes in opset 1, inputs from opset 10).
    Slice {
        /// Start indices.
        starts: IntsArg,
        /// End indices (exclusive).
        ends: IntsArg,
        /// Axes the starts/ends apply to (default: the first axes).
        axes: IntsArg,
        /// Steps (default 1).
        steps: IntsArg,
    },
    /// `Gather` along an axis.
    Gather {
        /// The axis.
        axis: i64,
    },
    /// `GatherElements` along an axis.
    GatherElements {
        /// The axis.
        axis: i64,
    },
    /// `GatherND`.
    GatherND {
        /// Number of leading batch dims shared by data and indices.
        batch_dims: usize,
    },
    /// `ScatterElements` (also the deprecated `Scatter`).
    ScatterElements {
        /// The axis.
        axis: i64,
        /// How updates combine with existing values.
        reduction: Reduction,
    },
    /// `ScatterND`.
    ScatterND {
        /// How updates combine with existing values.
        reduction: Reduction,
    },
    /// `Expand` (bidirectional broadcast to a shape).
    Expand,
    /// `Tile` (repeat along each axis).
    Tile,
    /// `Pad`.
    Pad {
        /// Border mode.
        mode: PadMode,
        /// Pads as `[begin..., end...]` (attribute before opset 11, input 1 after).
        pads: IntsArg,
        /// Constant fill from the attribute (before opset 11); input 2 overrides it.
        value: f32,
        /// Axes the pads apply to (input 3, opset 18).
        axes: IntsArg,
    },
    /// `Shape`, optionally sliced to `[start, end)` (opset 15).
    Shape {
        /// First dim.
        start: i64,
        /// One past the last dim (default: rank).
        end: Option<i64>,
    },
    /// `Size`: the number of elements.
    Size,
    /// `ConstantOfShape`.
    ConstantOfShape {
        /// The one-element fill value (its dtype is the output dtype).
        value: Tensor,
    },
    /// `Range(start, limit, delta)`.
    Range,
    /// `Trilu`: keep the upper or lower triangle of the last two dims.
    Trilu {
        /// Keep the upper triangle (else the lower one).
        upper: bool,
    },
    /// `OneHot`.
    OneHot {
        /// Where the new depth axis goes, in `[-rank-1, rank]`.
        axis: i64,
    },
    /// `DepthToSpace`.
    DepthToSpace {
        /// Block size.
        blocksize: usize,
        /// Channel ordering.
        mode: BlockMode,
    },
    /// `SpaceToDepth`.
    SpaceToDepth {
        /// Block size.
        blocksize: usize,
        /// Channel ordering.
        mode: BlockMode,
    },
    /// `NonZero`: indices of the non-zero elements, shape `[rank, count]`.
    NonZero,
    /// `EyeLike`: a 2-D tensor with ones on diagonal `k`.
    EyeLike {
        /// Output dtype (default: the input's).
        dtype: Option<DType>,
        /// Diagonal offset.
        k: i64,
    },
}

/// Checks the number of input slots (`min` of which must be present) and that the node
/// declares at most one output.
fn arity(node: &OnnxNode, min: usize, max: usize) -> OpResult<()> {
    let n = node.num_inputs();
    if n < min || n > max {
        let want = if min == max {
            format!("{min}")
        } else {
            format!("{min} to {max}")
        };
        return Err(format!("expected {want} inputs, found {n}"));
    }
    if let Some(i) = (0..min).find(|&i| !node.has_input(i)) {
        return Err(format!("input {i} is required but missing"));
    }
    if node.num_outputs > 1 {
        return Err(format!("expected 1 output, found {}", node.num_outputs));
    }
    Ok(())
}

/// A boolean (0/1) INT attribute.
fn flag(node: &OnnxNode, name: &str, default: bool) -> OpResult<bool> {
    match node.int_or(name, default as i64)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("attribute '{name}': expected 0 or 1, found {v}")),
    }
}

/// A required positive INT attribute.
fn positive(node: &OnnxNode, name: &str) -> OpResult<usize> {
    let v = node.req_int(name)?;
    usize::try_from(v)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("attribute '{name}': expected a positive int, found {v}"))
}

/// The `axes` list of Squeeze/Unsqueeze: attribute before opset 13, input 1 after.
fn axes_arg(node: &OnnxNode) -> OpResult<IntsArg> {
    if node.opset >= 13 {
        arity(node, 1, 2)?;
        Ok(IntsArg::Input(1))
    } else {
        arity(node, 1, 1)?;
        Ok(node.ints("axes")?.map_or(IntsArg::Default, IntsArg::Attr))
    }
}

fn parse_reduction(node: &OnnxNode) -> OpResult<Reduction> {
    Ok(match node.string_or("reduction", "none")?.as_str() {
        "none" => Reduction::None,
        "add" => Reduction::Add,
        "mul" => Reduction::Mul,
        "max" => Reduction::Max,
        "min" => Reduction::Min,
        r => return Err(format!("attribute 'reduction': unknown reduction '{r}'")),
    })
}

fn parse_block_mode(node: &OnnxNode) -> OpResult<BlockMode> {
    Ok(match node.string_or("mode", "DCR")?.as_str() {
        "DCR" => BlockMode::Dcr,
        "CRD" => BlockMode::Crd,
        m => {
            return Err(format!(
                "attribute 'mode': expected DCR or CRD, found '{m}'"
            ))
        }
    })
}

fn parse_pad(node: &OnnxNode) -> OpResult<ArrayOp> {
    let mode = match node.string_or("mode", "constant")?.as_str() {
        "constant" => PadMode::Constant,
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        "wrap" => PadMode::Wrap,
        m => return Err(format!("attribute 'mode': unknown pad mode '{m}'")),
    };
    if node.opset >= 11 {
        arity(node, 2, if node.opset >= 18 { 4 } else { 3 })?;
        let axes = if node.opset >= 18 {
            IntsArg::Input(3)
        } else {
            IntsArg::Default
        };
        return Ok(ArrayOp::Pad {
            mode,
            pads: IntsArg::Input(1),
            value: 0.0,
            axes,
        });
    }
    arity(node, 1, 1)?;
    let name = if node.opset < 2 { "paddings" } else { "pads" };
    let pads = node
        .ints(name)?
        .ok_or_else(|| format!("required attribute '{name}' is missing"))?;
    Ok(ArrayOp::Pad {
        mode,
        pads: IntsArg::Attr(pads),
        value: node.float_or("value", 0.0)?,
        axes: IntsArg::Default,
    })
}

fn parse_split(node: &OnnxNode) -> OpResult<ArrayOp> {
    let axis = node.int_or("axis", 0)?;
    let split = if node.opset >= 13 {
        if node.num_inputs() > 2 || !node.has_input(0) {
            return Err("expected 1 or 2 inputs".into());
        }
        IntsArg::Input(1)
    } else {
        if node.num_inputs() != 1 || !node.has_input(0) {
            return Err("expected 1 input".into());
        }
        node.ints("split")?.map_or(IntsArg::Default, IntsArg::Attr)
    };
    let outputs = match node.int("num_outputs")? {
        Some(n) if n < 1 => {
            return Err(format!(
                "attribute 'num_outputs': expected a positive int, found {n}"
            ))
        }
        Some(n) if node.num_outputs > 0 && n as usize != node.num_outputs => {
            return Err(format!(
                "attribute 'num_outputs': {n} but the node has {} outputs",
                node.num_outputs
            ))
        }
        Some(n) => n as usize,
        None if node.num_outputs == 0 => return Err("Split needs at least 1 output".into()),
        None => node.num_outputs,
    };
    Ok(ArrayOp::Split {
        axis,
        split,
        outputs,
    })
}

fn parse_slice(node: &OnnxNode) -> OpResult<ArrayOp> {
    if node.opset >= 10 {
        arity(node, 3, 5)?;
        return Ok(ArrayOp::Slice {
            starts: IntsArg::Input(1),
            ends: IntsArg::Input(2),
            axes: IntsArg::Input(3),
            steps: IntsArg::Input(4),
        });
    }
    arity(node, 1, 1)?;
    let req = |name: &str| {
        node.ints(name)?
            .map(IntsArg::Attr)
            .ok_or_else(|| format!("required attribute '{name}' is missing"))
    };
    Ok(ArrayOp::Slice {
        starts: req("starts")?,
        ends: req("ends")?,
        axes: node.ints("axes")?.map_or(IntsArg::Default, IntsArg::Attr),
        steps: IntsArg::Default,
    })
}

fn parse_constant_of_shape(node: &OnnxNode) -> OpResult<ArrayOp> {
    arity(node, 1, 1)?;
    let value = match node.tensor("value")? {
        None => Tensor::scalar(0f32),
        Some(t) if t.len() == 1 => t,
        Some(t) => {
            return Err(format!(
                "attribute 'value': expected a one-element tensor, found shape {:?}",
                t.shape()
            ))
        }
    };
    Ok(ArrayOp::ConstantOfShape { value })
}

fn parse_eye_like(node: &OnnxNode) -> OpResult<ArrayOp> {
    arity(node, 1, 1)?;
    let dtype = match node.int("dtype")? {
        None => None,
        Some(code) => Some(
            i32::try_from(code)
                .ok()
                .and_then(DType::from_onnx)
                .ok_or_else(|| {
                    format!(
                        "attribute 'dtype': unsupported data type {code} ({})",
                        DType::onnx_name(code as i32)
                    )
                })?,
        ),
    };
    Ok(ArrayOp::EyeLike {
        dtype,
        k: node.int_or("k", 0)?,
    })
}

impl ArrayOp {
    /// Parses the ops with no attributes or a single simple one.
    fn parse_simple(node: &OnnxNode) -> OpResult<Option<ArrayOp>> {
        use ArrayOp::*;
        let (op, min, max) = match node.op_type.as_str() {
            "Transpose" => (
                Transpose {
                    perm: node.ints("perm")?,
                },
                1,
                1,
            ),
            "Flatten" => (
                Flatten {
                    axis: node.int_or("axis", 1)?,
                },
                1,
                1,
            ),
            "Concat" => (
                Concat {
                    axis: node.req_int("axis")?,
                },
                1,
                usize::MAX,
            ),
            "Gather" => (
                Gather {
                    axis: node.int_or("axis", 0)?,
                },
                2,
                2,
            ),
            "GatherElements" => (
                GatherElements {
                    axis: node.int_or("axis", 0)?,
                },
                2,
                2,
            ),
            "GatherND" => {
                let b = node.int_or("batch_dims", 0)?;
                let batch_dims = usize::try_from(b).map_err(|_| {
                    format!("attribute 'batch_dims': expected a non-negative int, found {b}")
                })?;
                (GatherND { batch_dims }, 2, 2)
            }
            "ScatterElements" | "Scatter" => {
                let reduction = parse_reduction(node)?;
                (
                    ScatterElements {
                        axis: node.int_or("axis", 0)?,
                        reduction,
                    },
                    3,
                    3,
                )
            }
            "ScatterND" => (
                ScatterND {
                    reduction: parse_reduction(node)?,
                },
                3,
                3,
            ),
            "Expand" => (Expand, 2, 2),
            "Tile" => (Tile, 2, 2),
            "Shape" => {
                let start = node.int_or("start", 0)?;
                (
                    Shape {
                        start,
                        end: node.int("end")?,
                    },
                    1,
                    1,
                )
            }
            "Size" => (Size, 1, 1),
            "Range" => (Range, 3, 3),
            "Trilu" => (
                Trilu {
                    upper: flag(node, "upper", true)?,
                },
                1,
                2,
            ),
            "OneHot" => (
                OneHot {
                    axis: node.int_or("axis", -1)?,
                },
                3,
                3,
            ),
            "DepthToSpace" | "SpaceToDepth" => {
                let blocksize = positive(node, "blocksize")?;
                let mode = parse_block_mode(node)?;
                let op = if node.op_type == "DepthToSpace" {
                    DepthToSpace { blocksize, mode }
                } else {
                    SpaceToDepth { blocksize, mode }
                };
                (op, 1, 1)
            }
            "NonZero" => (NonZero, 1, 1),
            _ => return Ok(None),
        };
        arity(node, min, max)?;
        Ok(Some(op))
    }
}

impl OpFamily for ArrayOp {
    fn from_onnx(node: &OnnxNode) -> OpResult<Option<Self>> {
        let op = match node.op_type.as_str() {
            "Reshape" if node.opset < 5 => {
                arity(node, 1, 1)?;
                let shape = node
                    .ints("shape")?
                    .ok_or("required attribute 'shape' is missing")?;
                ArrayOp::Reshape {
                    shape: IntsArg::Attr(shape),
                    allowzero: false,
                }
            }
            "Reshape" => {
                arity(node, 2, 2)?;
                ArrayOp::Reshape {
                    shape: IntsArg::Input(1),
                    allowzero: flag(node, "allowzero", false)?,
                }
            }
            "Squeeze" => ArrayOp::Squeeze {
                axes: axes_arg(node)?,
            },
            "Unsqueeze" => {
                let axes = axes_arg(node)?;
                if axes == IntsArg::Default {
                    return Err("required attribute 'axes' is missing".into());
                }
                ArrayOp::Unsqueeze { axes }
            }
            "Split" => parse_split(node)?,
            "Slice" => parse_slice(node)?,
            "Pad" => parse_pad(node)?,
            "ConstantOfShape" => parse_constant_of_shape(node)?,
            "EyeLike" => parse_eye_like(node)?,
            _ => return ArrayOp::parse_simple(node),
        };
        Ok(Some(op))
    }

    fn op_type(&self) -> &'static str {
        use ArrayOp::*;
        match self {
            Reshape { .. } => "Reshape",
            Transpose { .. } => "Transpose",
            Flatten { .. } => "Flatten",
            Squeeze { .. } => "Squeeze",
            Unsqueeze { .. } => "Unsqueeze",
            Concat { .. } => "Concat",
            Split { .. } => "Split",
            Slice { .. } => "Slice",
            Gather { .. } => "Gather",
            GatherElements { .. } => "GatherElements",
            GatherND { .. } => "GatherND",
            ScatterElements { .. } => "ScatterElements",
            ScatterND { .. } => "ScatterND",
            Expand => "Expand",
            Tile => "Tile",
            Pad { .. } => "Pad",
            Shape { .. } => "Shape",
            Size => "Size",
            ConstantOfShape { .. } => "ConstantOfShape",
            Range => "Range",
            Trilu { .. } => "Trilu",
            OneHot { .. } => "OneHot",
            DepthToSpace { .. } => "DepthToSpace",
            SpaceToDepth { .. } => "SpaceToDepth",
            NonZero => "NonZero",
            EyeLike { .. } => "EyeLike",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        use ArrayOp::*;
        let facts = match self {
            Reshape { shape, allowzero } => shape_ops::infer_reshape(shape, *allowzero, inputs)?,
            Transpose { perm } => shape_ops::infer_transpose(perm.as_deref(), inputs)?,
            Flatten { axis } => shape_ops::infer_flatten(*axis, inputs)?,
            Squeeze { axes } => shape_ops::infer_squeeze(axes, inputs)?,
            Unsqueeze { axes } => shape_ops::infer_unsqueeze(axes, inputs)?,
            Expand => shape_ops::infer_expand(inputs)?,
            Tile => shape_ops::infer_tile(inputs)?,
            Shape { start, end } => shape_ops::infer_shape(*start, *end, inputs)?,
            Size => shape_ops::infer_size(inputs)?,
            ConstantOfShape { value } => shape_ops::infer_constant_of_shape(value, inputs)?,
            Range => shape_ops::infer_range(inputs)?,
            EyeLike { dtype, .. } => shape_ops::infer_eye_like(*dtype, inputs)?,
            Concat { axis } => slicing::infer_concat(*axis, inputs)?,
            Split {
                axis,
                split,
                outputs,
            } => slicing::infer_split(*axis, split, *outputs, inputs)?,
            Slice {
                starts,
                ends,
                axes,
                steps,
            } => slicing::infer_slice([starts, ends, axes, steps], inputs)?,
            Pad { pads, axes, .. } => slicing::infer_pad(pads, axes, inputs)?,
            Trilu { .. } => slicing::infer_trilu(inputs)?,
            DepthToSpace { blocksize, .. } => layout::infer_depth_to_space(*blocksize, inputs)?,
            SpaceToDepth { blocksize, .. } => layout::infer_space_to_depth(*blocksize, inputs)?,
            Gather { axis } => indexing::infer_gather(*axis, inputs)?,
            GatherElements { axis } => indexing::infer_gather_elements(*axis, inputs)?,
            GatherND { batch_dims } => indexing::infer_gather_nd(*batch_dims, inputs)?,
            ScatterElements { axis, .. } => indexing::infer_scatter_elements(*axis, inputs)?,
            ScatterND { .. } => indexing::infer_scatter_nd(inputs)?,
            OneHot { axis } => indexing::infer_one_hot(*axis, inputs)?,
            NonZero => indexing::infer_non_zero(inputs)?,
        };
        if let Some(f) = facts
            .iter()
            .find(|f| f.shape.is_known() && numel(&f.shape).is_none())
        {
            return Err(format!("output shape {} is too large", f.shape));
        }
        self.fold(inputs, facts)
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        use ArrayOp::*;
        let one = |t: Tensor| vec![t];
        Ok(match self {
            Reshape { shape, allowzero } => one(shape_ops::reshape(shape, *allowzero, inputs)?),
            Transpose { perm } => one(shape_ops::transpose(perm.as_deref(), inputs)?),
            Flatten { axis } => one(shape_ops::flatten(*axis, inputs)?),
            Squeeze { axes } => one(shape_ops::squeeze(axes, inputs)?),
            Unsqueeze { axes } => one(shape_ops::unsqueeze(axes, inputs)?),
            Expand => one(shape_ops::expand(inputs)?),
            Tile => one(shape_ops::tile(inputs)?),
            Shape { start, end } => one(shape_ops::shape(*start, *end, inputs)?),
            Size => one(shape_ops::size(inputs)?),
            ConstantOfShape { value } => one(shape_ops::constant_of_shape(value, inputs)?),
            Range => one(shape_ops::range(inputs)?),
            EyeLike { dtype, k } => one(shape_ops::eye_like(*dtype, *k, inputs)?),
            Concat { axis } => one(slicing::concat(*axis, inputs)?),
            Split {
                axis,
                split,
                outputs,
            } => slicing::split(*axis, split, *outputs, inputs)?,
            Slice {
                starts,
                ends,
                axes,
                steps,
            } => one(slicing::slice([starts, ends, axes, steps], inputs)?),
            Pad {
                mode,
                pads,
                value,
                axes,
            } => one(slicing::pad(*mode, pads, *value, axes, inputs)?),
            Trilu { upper } => one(slicing::trilu(*upper, inputs)?),
            DepthToSpace { blocksize, mode } => {
                one(layout::depth_to_space(*blocksize, *mode, inputs)?)
            }
            SpaceToDepth { blocksize, mode } => {
                one(layout::space_to_depth(*blocksize, *mode, inputs)?)
            }
            Gather { axis } => one(indexing::gather(*axis, inputs)?),
            GatherElements { axis } => one(indexing::gather_elements(*axis, inputs)?),
            GatherND { batch_dims } => one(indexing::gather_nd(*batch_dims, inputs)?),
            ScatterElements { axis, reduction } => {
                one(indexing::scatter_elements(*axis, *reduction, inputs)?)
            }
            ScatterND { reduction } => one(indexing::scatter_nd(*reduction, inputs)?),
            OneHot { axis } => one(indexing::one_hot(*axis, inputs)?),
            NonZero => one(indexing::non_zero(inputs)?),
        })
    }
}

impl ArrayOp {
    /// The statically known window of a `Slice`: for every axis of the input, the first
    /// index, the length and the step (`(0, dim, 1)` for axes not sliced), after ONNX's
    /// clamping. `None` for other ops, or when the input shape or a list is not known.
    pub fn slice_window(&self, inputs: &[Option<&Fact>]) -> Option<Vec<(usize, usize, i64)>> {
        let ArrayOp::Slice {
            starts,
            ends,
            axes,
            steps,
        } = self
        else {
            return None;
        };
        slicing::slice_window([starts, ends, axes, steps], inputs)
    }

    /// The byte range `(offset, length)` of the input that a `Slice` takes when that is one
    /// contiguous range (every axis before the last cut of extent 1 in the output, the cut
    /// axis with step 1 or one element): the output can then be a view. `None` otherwise.
    pub fn contiguous_slice(&self, inputs: &[Option<&Fact>]) -> Option<(usize, usize)> {
        let window = self.slice_window(inputs)?;
        let x = inputs.first().copied().flatten()?;
        let dims = x.shape.as_known()?;
        let elem = x.dtype.size_of();
        let stride = |a: usize| dims[a + 1..].iter().product::<usize>();
        // the last axis that is cut; the axes after it are whole
        let Some(cut) = window
            .iter()
            .zip(&dims)
            .rposition(|(&(first, len, _), &d)| (first, len) != (0, d))
        else {
            return Some((0, dims.iter().product::<usize>() * elem));
        };
        if (window[cut].2 != 1 && window[cut].1 > 1) || window[..cut].iter().any(|w| w.1 != 1) {
            return None;
        }
        let offset: usize = window
            .iter()
            .enumerate()
            .map(|(a, w)| w.0 * stride(a))
            .sum();
        Some((offset * elem, window[cut].1 * stride(cut) * elem))
    }

    /// Replaces `facts` by constants when every present input is a constant and the outputs
    /// are small: the op is then evaluated at compile time.
    fn fold(&self, inputs: &[Option<&Fact>], facts: Vec<Fact>) -> OpResult<Vec<Fact>> {
        if facts.iter().all(|f| f.value.is_some()) {
            return Ok(facts);
        }
        let values: Option<Vec<Option<&Tensor>>> = inputs
            .iter()
            .map(|f| match f {
                None => Some(None),
                Some(f) => f.value().map(Some),
            })
            .collect();
        let Some(values) = values else {
            return Ok(facts);
        };
        let small = |n: Option<usize>| n.is_some_and(|n| n <= FOLD_LIMIT);
        let bounded = match self {
            // the output is no larger than the input.
            ArrayOp::NonZero => values.iter().flatten().all(|t| 2 * t.len() <= FOLD_LIMIT),
            _ => facts.iter().all(|f| small(numel(&f.shape))),
        };
        if !bounded {
            return Ok(facts);
        }
        Ok(self
            .eval(&values)?
            .into_iter()
            .map(Fact::constant)
            .collect())
    }
}

// ---------------------------------------------------------------------------------------
// Helpers shared by the submodules.

/// What `infer` knows about an [`IntsArg`].
enum Known<T> {
    /// Not given: the default applies.
    Absent,
    /// A constant value.
    Value(T),
    /// Given by an input whose value is not known statically.
    Unknown,
}

/// Checks that `dtype` is an integer type (shape-like inputs).
fn check_int(dtype: DType, what: &str) -> OpResult<()> {
    if dtype.is_int() {
        Ok(())
    } else {
        Err(format!("{what}: expected an integer tensor, found {dtype}"))
    }
}

/// The elements of an integer tensor.
fn int_values(t: &Tensor, what: &str) -> OpResult<Vec<i64>> {
    check_int(t.dtype(), what)?;
    Ok(t.to_i64_vec())
}

impl IntsArg {
    /// The list at run time; `None` means "use the default".
    fn eval(&self, inputs: &[Option<&Tensor>], what: &str) -> OpResult<Option<Vec<i64>>> {
        match self {
            IntsArg::Default => Ok(None),
            IntsArg::Attr(v) => Ok(Some(v.clone())),
            IntsArg::Input(i) => super::opt(inputs, *i)
                .map(|t| int_values(t, what))
                .transpose(),
        }
    }

    /// The list as known statically.
    fn infer(&self, inputs: &[Option<&Fact>], what: &str) -> OpResult<Known<Vec<i64>>> {
        match self {
            IntsArg::Default => Ok(Known::Absent),
            IntsArg::Attr(v) => Ok(Known::Value(v.clone())),
            IntsArg::Input(i) => match super::opt(inputs, *i) {
                None => Ok(Known::Absent),
                Some(f) => {
                    check_int(f.dtype, what)?;
                    Ok(f.value()
                        .map_or(Known::Unknown, |t| Known::Value(t.to_i64_vec())))
                }
            },
        }
    }

    /// The static length of the list, if known (from the value or the input's 1-D shape).
    fn infer_len(&self, inputs: &[Option<&Fact>]) -> Option<usize> {
        match self {
            IntsArg::Default => None,
            IntsArg::Attr(v) => Some(v.len()),
            IntsArg::Input(i) => {
                let f = super::opt(inputs, *i)?;
                numel(&f.shape).filter(|&n| n <= crate::shape::MAX_RANK)
            }
        }
    }
}

/// Normalises an axis and returns it as an index (errors name the attribute). Unlike
/// [`crate::shape::norm_axis`], rank 0 has no valid axis.
fn axis_of(axis: i64, rank: usize) -> OpResult<usize> {
    norm_index_axis(axis, rank).map_err(|e| format!("attribute 'axis': {e}"))
}

/// An axis of a tensor of rank `rank` (which must be at least 1).
fn norm_index_axis(axis: i64, rank: usize) -> OpResult<usize> {
    if rank == 0 {
        return Err(format!("axis {axis} out of range for rank 0"));
    }
    crate::shape::norm_axis(axis, rank)
}

/// Normalises a list of axes against `rank`, rejecting duplicates.
fn norm_axes(axes: &[i64], rank: usize, what: &str) -> OpResult<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = norm_index_axis(a, rank).map_err(|e| format!("{what}: {e}"))?;
        if out.contains(&n) {
            return Err(format!("{what}: axis {a} appears twice"));
        }
        out.push(n);
    }
    Ok(out)
}

/// The number of elements of a shape, if all dims are known and the count fits a `usize`.
fn numel(s: &Shape) -> Option<usize> {
    s.dims()
        .iter()
        .try_fold(1usize, |acc, d| d.known().and_then(|d| acc.checked_mul(d)))
}

/// The product of dims: known if all are known, 0 if any is 0, else unknown.
fn dim_product(dims: &[Dim]) -> Dim {
    if dims.iter().any(|d| d.known() == Some(0)) {
        return Dim::Known(0);
    }
    let mut syms = dims.iter().filter(|d| d.known() != Some(1));
    match (syms.next(), syms.next()) {
        (None, _) => Dim::Known(1),
        (Some(d), None) => d.clone(),
        _ => dims
            .iter()
            .map(Dim::known)
            .try_fold(1usize, |acc, d| d.and_then(|d| acc.checked_mul(d)))
            .map_or_else(Dim::unknown, Dim::Known),
    }
}

/// Converts a non-negative i64 to usize, naming the quantity on error.
fn to_usize(v: i64, what: &str) -> OpResult<usize> {
    usize::try_from(v).map_err(|_| format!("{what}: expected a non-negative value, found {v}"))
}

/// Borrows `t` as element type `T` (the dtype of a sibling input), naming it on error.
fn same<'a, T: Elem>(t: &'a Tensor, what: &str) -> OpResult<&'a ArrayD<T>> {
    T::view(t).ok_or_else(|| format!("{what}: expected dtype {}, found {}", T::DTYPE, t.dtype()))
}

/// Checks that a fact has the dtype of the data input.
fn check_same_dtype(f: &Fact, dtype: DType, what: &str) -> OpResult<()> {
    if f.dtype == dtype {
        Ok(())
    } else {
        Err(format!("{what}: expected dtype {dtype}, found {}", f.dtype))
    }
}

/// Builds an array whose element at each output index is read from `a` at the index whose
/// coordinate along axis `d` is `maps[d][i_d]`; `None` in a map gives `fill`. The maps must
/// be in range for `a` (callers build them from checked values).
fn take_outer<T: Elem>(a: &ArrayD<T>, maps: &[Vec<Option<usize>>], fill: T) -> ArrayD<T> {
    let shape: Vec<usize> = maps.iter().map(Vec::len).collect();
    let mut src = vec![0usize; maps.len()];
    ArrayD::from_shape_fn(IxDyn(&shape), |idx| {
        for (d, m) in maps.iter().enumerate() {
            match m[idx[d]] {
                Some(i) => src[d] = i,
                None => return fill,
            }
        }
        a[&src[..]]
    })
}

/// The array in standard (row-major) layout.
fn standard<T: Elem>(a: ArrayD<T>) -> ArrayD<T> {
    if a.is_standard_layout() {
        a
    } else {
        a.as_standard_layout().into_owned()
    }
}

/// An owned copy of a view, in standard layout.
fn owned<T: Elem>(v: ArrayViewD<'_, T>) -> ArrayD<T> {
    v.as_standard_layout().into_owned()
}

/// Row-major strides of a shape.
fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The largest output (in elements) that `eval` agrees to build.
const MAX_ELEMENTS: usize = 1 << 32;

/// Checks that an output of shape `dims` is not absurdly large (it would abort on
/// allocation), naming the input that asks for it.
fn check_size(dims: &[usize], what: &str) -> OpResult<()> {
    // zero dims are skipped (like ndarray does): an empty output may still need per-axis
    // index maps, and ndarray rejects such shapes too.
    dims.iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .map(|_| ())
        .ok_or_else(|| format!("{what}: output shape {dims:?} is too large"))
}

/// A known shape as symbolic [`Shape`] dims.
fn known(dims: &[usize]) -> Shape {
    Shape::known(dims)
}
