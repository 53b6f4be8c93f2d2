//! Reductions and ops that scan along an axis: the `Reduce*` family (one variant with a
//! [`ReduceKind`]), `ArgMax`/`ArgMin`, `CumSum` and `TopK`.
//!
//! Numerics: float reductions accumulate in f64 and round once to the element type; integer
//! sums/products are exact with wrapping (like numpy with `dtype=x.dtype`). Empty reductions
//! give the identity element of the reduction (0 for sums, 1 for products, -inf/+inf or the
//! integer extremes for Max/Min, -inf for the log reductions), as ONNX's tests expect.

use super::{opt, req, Fact, OnnxNode, OpFamily, OpResult};
use crate::dtype::DType;
use crate::shape::{norm_axis, Dim, Shape};
use crate::tensor::{Elem, Tensor};
use crate::{map_tensor, with_tensor};
use ndarray::{ArrayD, ArrayView1, ArrayViewMut1, Axis, IxDyn, Zip};
use std::cmp::Ordering;

/// Which reduction a `Reduce*` op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReduceKind {
    /// `ReduceSum`: sum.
    Sum,
    /// `ReduceMean`: arithmetic mean.
    Mean,
    /// `ReduceMax`: maximum.
    Max,
    /// `ReduceMin`: minimum.
    Min,
    /// `ReduceProd`: product.
    Prod,
    /// `ReduceL1`: sum of absolute values.
    L1,
    /// `ReduceL2`: square root of the sum of squares.
    L2,
    /// `ReduceLogSum`: log of the sum.
    LogSum,
    /// `ReduceLogSumExp`: log of the sum of exponentials (computed stably).
    LogSumExp,
    /// `ReduceSumSquare`: sum of squares.
    SumSquare,
}

const REDUCE_KINDS: [ReduceKind; 10] = [
    ReduceKind::Sum,
    ReduceKind::Mean,
    ReduceKind::Max,
    ReduceKind::Min,
    ReduceKind::Prod,
    ReduceKind::L1,
    ReduceKind::L2,
    ReduceKind::LogSum,
    ReduceKind::LogSumExp,
    ReduceKind::SumSquare,
];

impl ReduceKind {
    /// The ONNX op type.
    pub fn op_type(self) -> &'static str {
        match self {
            ReduceKind::Sum => "ReduceSum",
            ReduceKind::Mean => "ReduceMean",
            ReduceKind::Max => "ReduceMax",
            ReduceKind::Min => "ReduceMin",
            ReduceKind::Prod => "ReduceProd",
            ReduceKind::L1 => "ReduceL1",
            ReduceKind::L2 => "ReduceL2",
            ReduceKind::LogSum => "ReduceLogSum",
            ReduceKind::LogSumExp => "ReduceLogSumExp",
            ReduceKind::SumSquare => "ReduceSumSquare",
        }
    }

    /// First opset in which `axes` is an input rather than an attribute.
    pub fn axes_input_since(self) -> i64 {
        if self == ReduceKind::Sum {
            13
        } else {
            18
        }
    }

    /// Whether the reduction accepts bool data (only Max/Min, since opset 20).
    fn accepts(self, dtype: DType) -> bool {
        dtype != DType::Bool || matches!(self, ReduceKind::Max | ReduceKind::Min)
    }
}

/// Where the axes of a `Reduce*` op come from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReduceAxes {
    /// The `axes` attribute (older opsets); `None` (absent) reduces over all axes.
    Attr(Option<Vec<i64>>),
    /// The optional second input (ReduceSum since 13, the others since 18).
    Input,
}

/// ArgMax or ArgMin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ArgKind {
    /// Index of the maximum.
    Max,
    /// Index of the minimum.
    Min,
}

/// Ops of the reduction family.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ReduceOp {
    /// `ReduceSum`, `ReduceMean`, ... over a set of axes.
    Reduce {
        /// Which reduction.
        kind: ReduceKind,
        /// Where the axes come from.
        axes: ReduceAxes,
        /// Keep reduced axes as size-1 dims.
        keepdims: bool,
        /// With empty (or absent) axes input: reduce over no axis instead of all axes.
        noop_with_empty_axes: bool,
    },
    /// `ArgMax` / `ArgMin` along one axis; output i64.
    Arg {
        /// Max or min.
        kind: ArgKind,
        /// The axis (may be negative).
        axis: i64,
        /// Keep the reduced axis as a size-1 dim.
        keepdims: bool,
        /// On ties, return the last index instead of the first.
        select_last_index: bool,
    },
    /// `CumSum` along the axis given as the second input.
    CumSum {
        /// Exclude the current element from its sum.
        exclusive: bool,
        /// Sum from the end.
        reverse: bool,
    },
    /// `TopK`: the `k` largest (or smallest) values along an axis, with their i64 indices.
    TopK {
        /// `k` as attribute (opset 1); `None` when it is the second input (opset 10+).
        k: Option<i64>,
        /// The axis (may be negative).
        axis: i64,
        /// Largest (true) or smallest (false) values.
        largest: bool,
        /// Whether the output must be sorted (it always is here).
        sorted: bool,
    },
}

/// Reads a 0/1 INT attribute as a bool.
fn flag(node: &OnnxNode, name: &str, default: bool) -> OpResult<bool> {
    match node.int_or(name, default as i64)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("attribute '{name}': expected 0 or 1, found {v}")),
    }
}

/// Checks the input and output counts of a node.
fn check_arity(node: &OnnxNode, inputs: (usize, usize), max_outputs: usize) -> OpResult<()> {
    let n = node.num_inputs();
    if n < inputs.0 || n > inputs.1 {
        return Err(format!(
            "expected {} to {} inputs, found {n}",
            inputs.0, inputs.1
        ));
    }
    if (0..inputs.0).any(|i| !node.has_input(i)) {
        return Err(format!("the first {} inputs are required", inputs.0));
    }
    if node.num_outputs > max_outputs {
        return Err(format!(
            "expected at most {max_outputs} outputs, found {}",
            node.num_outputs
        ));
    }
    Ok(())
}

fn reduce_from_onnx(node: &OnnxNode, kind: ReduceKind) -> OpResult<ReduceOp> {
    let keepdims = flag(node, "keepdims", true)?;
    let noop_with_empty_axes = flag(node, "noop_with_empty_axes", false)?;
    let axes = if node.opset >= kind.axes_input_since() {
        if node.attrs.contains_key("axes") {
            return Err(format!(
                "attribute 'axes': not allowed since opset {} (axes is an input)",
                kind.axes_input_since()
            ));
        }
        check_arity(node, (1, 2), 1)?;
        ReduceAxes::Input
    } else {
        check_arity(node, (1, 1), 1)?;
        ReduceAxes::Attr(node.ints("axes")?)
    };
    Ok(ReduceOp::Reduce {
        kind,
        axes,
        keepdims,
        noop_with_empty_axes,
    })
}

impl OpFamily for ReduceOp {
    fn from_onnx(node: &OnnxNode) -> OpResult<Option<Self>> {
        let op = node.op_type.as_str();
        if let Some(kind) = REDUCE_KINDS.iter().find(|k| k.op_type() == op) {
            return reduce_from_onnx(node, *kind).map(Some);
        }
        Ok(Some(match op {
            "ArgMax" | "ArgMin" => {
                check_arity(node, (1, 1), 1)?;
                ReduceOp::Arg {
                    kind: if op == "ArgMax" {
                        ArgKind::Max
                    } else {
                        ArgKind::Min
                    },
                    axis: node.int_or("axis", 0)?,
                    keepdims: flag(node, "keepdims", true)?,
                    select_last_index: flag(node, "select_last_index", false)?,
                }
            }
            "CumSum" => {
                check_arity(node, (2, 2), 1)?;
                ReduceOp::CumSum {
                    exclusive: flag(node, "exclusive", false)?,
                    reverse: flag(node, "reverse", false)?,
                }
            }
            "TopK" => {
                let k = if node.opset < 10 {
                    check_arity(node, (1, 1), 2)?;
                    let k = node.req_int("k")?;
                    if k < 0 {
                        return Err(format!("attribute 'k': must be >= 0, found {k}"));
                    }
                    Some(k)
                } else {
                    check_arity(node, (2, 2), 2)?;
                    None
                };
                ReduceOp::TopK {
                    k,
                    axis: node.int_or("axis", -1)?,
                    largest: flag(node, "largest", true)?,
                    sorted: flag(node, "sorted", true)?,
                }
            }
            _ => return Ok(None),
        }))
    }

    fn op_type(&self) -> &'static str {
        match self {
            ReduceOp::Reduce { kind, .. } => kind.op_type(),
            ReduceOp::Arg {
                kind: ArgKind::Max, ..
            } => "ArgMax",
            ReduceOp::Arg {
                kind: ArgKind::Min, ..
            } => "ArgMin",
            ReduceOp::CumSum { .. } => "CumSum",
            ReduceOp::TopK { .. } => "TopK",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        match self {
            ReduceOp::Reduce { .. } => self.infer_reduce(x, opt(inputs, 1)),
            ReduceOp::Arg { axis, keepdims, .. } => {
                if x.dtype == DType::Bool {
                    return Err("input 0: ArgMax/ArgMin do not accept bool".into());
                }
                let ax = axis_of(*axis, x.shape.rank())?;
                let mask: Vec<bool> = (0..x.shape.rank()).map(|i| i == ax).collect();
                Ok(vec![Fact::new(
                    DType::I64,
                    reduced_shape(&x.shape, &mask, *keepdims),
                )])
            }
            ReduceOp::CumSum { .. } => {
                let axis = req(inputs, 1)?;
                check_numeric(x.dtype, "CumSum")?;
                check_scalar_int(axis, "axis")?;
                if let Some(v) = axis.value() {
                    axis_of(scalar_i64(v, "axis")?, x.shape.rank())?;
                }
                Ok(vec![Fact::new(x.dtype, x.shape.clone())])
            }
            ReduceOp::TopK { k, axis, .. } => {
                check_numeric(x.dtype, "TopK")?;
                let ax = axis_of(*axis, x.shape.rank())?;
                let k = match k {
                    Some(k) => Some(*k),
                    None => {
                        let kf = req(inputs, 1)?;
                        check_scalar_int(kf, "k")?;
                        kf.value().map(|v| scalar_i64(v, "k")).transpose()?
                    }
                };
                let mut dims = x.shape.0.clone();
                dims[ax] = match k {
                    Some(k) => {
                        let k = check_k(k, dims[ax].known())?;
                        Dim::Known(k)
                    }
                    None => Dim::unknown(),
                };
                Ok(vec![
                    Fact::new(x.dtype, Shape(dims.clone())),
                    Fact::new(DType::I64, Shape(dims)),
                ])
            }
        }
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        match self {
            ReduceOp::Reduce { kind, keepdims, .. } => {
                if !kind.accepts(x.dtype()) {
                    return Err(format!("input 0: {} does not accept bool", kind.op_type()));
                }
                let axes_input = opt(inputs, 1).map(axes_values).transpose()?;
                let mask = self.axes_mask(x.rank(), axes_input.as_deref())?;
                Ok(vec![reduce_tensor(*kind, x, &mask, *keepdims)?])
            }
            ReduceOp::Arg {
                kind,
                axis,
                keepdims,
                select_last_index,
            } => {
                if x.dtype() == DType::Bool {
                    return Err("input 0: ArgMax/ArgMin do not accept bool".into());
                }
                let ax = axis_of(*axis, x.rank())?;
                if x.shape()[ax] == 0 {
                    return Err(format!("input 0: cannot take arg of empty axis {ax}"));
                }
                let out = with_tensor!(x, a => per_lane(a, ax, 1, |lane, mut o: ArrayViewMut1<i64>| {
                    o[0] = arg_extreme(lane, *kind, *select_last_index) as i64;
                }));
                let t = Tensor::I64(out);
                Ok(vec![squeeze_axis(t, ax, *keepdims)?])
            }
            ReduceOp::CumSum { exclusive, reverse } => {
                check_numeric(x.dtype(), "CumSum")?;
                let axis_t = req(inputs, 1)?;
                if !matches!(axis_t.dtype(), DType::I32 | DType::I64) || axis_t.len() != 1 {
                    return Err("input 1 (axis): expected a single int32/int64 value".into());
                }
                let ax = axis_of(scalar_i64(axis_t, "axis")?, x.rank())?;
                let n = x.shape()[ax];
                Ok(vec![map_tensor!(x, a => per_lane(a, ax, n, |lane, o| {
                    cumsum_lane(lane, o, *exclusive, *reverse)
                }))])
            }
            ReduceOp::TopK {
                k, axis, largest, ..
            } => {
                check_numeric(x.dtype(), "TopK")?;
                let k = match k {
                    Some(k) => *k,
                    None => scalar_i64(req(inputs, 1)?, "k")?,
                };
                let ax = axis_of(*axis, x.rank())?;
                let k = check_k(k, Some(x.shape()[ax]))?;
                Ok(with_tensor!(x, a => top_k(a, ax, k, *largest)))
            }
        }
    }
}

impl ReduceOp {
    /// The reduced-axes mask for input rank `rank` (`axes_input`: the values of the axes
    /// input; absent or empty means all axes, or none with `noop_with_empty_axes`).
    fn axes_mask(&self, rank: usize, axes_input: Option<&[i64]>) -> OpResult<Vec<bool>> {
        let ReduceOp::Reduce {
            axes,
            noop_with_empty_axes,
            ..
        } = self
        else {
            return Err("not a Reduce op".into());
        };
        let list: Option<&[i64]> = match axes {
            ReduceAxes::Attr(v) => v.as_deref(),
            ReduceAxes::Input => axes_input,
        };
        let list = match list {
            Some(l) if !l.is_empty() => l,
            _ if *noop_with_empty_axes => return Ok(vec![false; rank]),
            _ => return Ok(vec![true; rank]),
        };
        let mut mask = vec![false; rank];
        for &a in list {
            let i = norm_axis(a, rank).map_err(|e| format!("axes: {e}"))?;
            if rank == 0 || mask[i] {
                return Err(format!(
                    "axes: axis {a} repeated or invalid for rank {rank}"
                ));
            }
            mask[i] = true;
        }
        Ok(mask)
    }

    fn infer_reduce(&self, x: &Fact, axes: Option<&Fact>) -> OpResult<Vec<Fact>> {
        let ReduceOp::Reduce { kind, keepdims, .. } = self else {
            return Err("not a Reduce op".into());
        };
        if !kind.accepts(x.dtype) {
            return Err(format!("input 0: {} does not accept bool", kind.op_type()));
        }
        let rank = x.shape.rank();
        let mut axes_vals = None;
        if let Some(a) = axes {
            if a.dtype != DType::I64 || a.shape.rank() > 1 {
                return Err(format!(
                    "input 1 (axes): expected a 1-D int64 tensor, found {} {}",
                    a.dtype, a.shape
                ));
            }
            axes_vals = match a.value() {
                Some(v) => Some(v.to_i64_vec()),
                // an axes input known to be empty behaves like a constant empty list
                None if a.shape.numel() == Some(0) => Some(vec![]),
                None => None,
            };
            if axes_vals.is_none() {
                let shape = if *keepdims {
                    Shape::unknown(rank)
                } else {
                    match a.shape.numel() {
                        Some(n) if n <= rank => Shape::unknown(rank - n),
                        Some(n) => return Err(format!("axes: {n} axes for rank {rank}")),
                        None => return Err("axes: unknown axes give an unknown rank".into()),
                    }
                };
                return Ok(vec![Fact::new(x.dtype, shape)]);
            }
        }
        let mask = self.axes_mask(rank, axes_vals.as_deref())?;
        Ok(vec![Fact::new(
            x.dtype,
            reduced_shape(&x.shape, &mask, *keepdims),
        )])
    }
}

/// Normalises an axis for an op that needs rank >= 1.
fn axis_of(axis: i64, rank: usize) -> OpResult<usize> {
    if rank == 0 {
        return Err("input 0: expected rank >= 1, found a scalar".into());
    }
    norm_axis(axis, rank).map_err(|e| format!("attribute 'axis': {e}"))
}

/// Checks `k` against the axis length (when known).
fn check_k(k: i64, len: Option<usize>) -> OpResult<usize> {
    if k < 0 {
        return Err(format!("k: must be >= 0, found {k}"));
    }
    match len {
        Some(n) if k as u64 > n as u64 => Err(format!("k: {k} is larger than the axis length {n}")),
        _ => Ok(k as usize),
    }
}

fn check_numeric(dtype: DType, op: &str) -> OpResult<()> {
    if dtype == DType::Bool {
        return Err(format!("input 0: {op} does not accept bool"));
    }
    Ok(())
}

fn check_scalar_int(f: &Fact, name: &str) -> OpResult<()> {
    let one = f.shape.numel().is_none_or(|n| n == 1) && f.shape.rank() <= 1;
    if !f.dtype.is_int() || !one {
        return Err(format!(
            "input 1 ({name}): expected a single integer, found {} {}",
            f.dtype, f.shape
        ));
    }
    Ok(())
}

/// The single integer of a one-element tensor.
fn scalar_i64(t: &Tensor, name: &str) -> OpResult<i64> {
    match t.to_i64_vec().as_slice() {
        [v] if t.dtype().is_int() => Ok(*v),
        _ => Err(format!(
            "input ({name}): expected a single integer, found {t:?}"
        )),
    }
}

/// The values of an axes input (a 1-D or scalar int64 tensor).
fn axes_values(t: &Tensor) -> OpResult<Vec<i64>> {
    if t.dtype() != DType::I64 || t.rank() > 1 {
        return Err(format!("input 1 (axes): expected 1-D int64, found {t:?}"));
    }
    Ok(t.to_i64_vec())
}

/// The shape after reducing the axes in `mask`.
fn reduced_shape(shape: &Shape, mask: &[bool], keepdims: bool) -> Shape {
    let dims = shape
        .0
        .iter()
        .zip(mask)
        .filter_map(|(d, &m)| match (m, keepdims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::Known(1)),
            (true, false) => None,
        });
    Shape(dims.collect())
}

/// Removes size-1 axis `ax` unless `keepdims`.
fn squeeze_axis(t: Tensor, ax: usize, keepdims: bool) -> OpResult<Tensor> {
    if keepdims {
        return Ok(t);
    }
    let mut shape = t.shape().to_vec();
    shape.remove(ax);
    t.reshape(&shape)
}

/// An accumulator type: f64 for float elements, wrapping i64 for integers (and bool), so
/// that integer arithmetic is exact modulo the width of the element type.
pub(crate) trait Acc: Copy {
    /// Additive identity.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Converts an element.
    fn of<T: Elem>(x: T) -> Self;
    /// Converts back to an element type (float: round; integer: wrap).
    fn to<T: Elem>(self) -> T;
    /// Addition (wrapping for integers).
    fn add(self, o: Self) -> Self;
    /// Multiplication (wrapping for integers).
    fn mul(self, o: Self) -> Self;
}

impl Acc for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    fn of<T: Elem>(x: T) -> f64 {
        x.to_f64()
    }
    fn to<T: Elem>(self) -> T {
        T::from_f64(self)
    }
    fn add(self, o: f64) -> f64 {
        self + o
    }
    fn mul(self, o: f64) -> f64 {
        self * o
    }
}

impl Acc for i64 {
    const ZERO: i64 = 0;
    const ONE: i64 = 1;
    fn of<T: Elem>(x: T) -> i64 {
        x.to_i64()
    }
    fn to<T: Elem>(self) -> T {
        T::from_i64(self)
    }
    fn add(self, o: i64) -> i64 {
        self.wrapping_add(o)
    }
    fn mul(self, o: i64) -> i64 {
        self.wrapping_mul(o)
    }
}

/// Applies `f` to each 1-D lane of `a` along `ax`, writing a lane of length `out_len` of a
/// new array (same shape as `a` except `out_len` along `ax`).
fn per_lane<T: Elem, U: Elem>(
    a: &ArrayD<T>,
    ax: usize,
    out_len: usize,
    f: impl FnMut(ArrayView1<T>, ArrayViewMut1<U>),
) -> ArrayD<U> {
    let mut shape = a.shape().to_vec();
    shape[ax] = out_len;
    let mut out = ArrayD::<U>::default(IxDyn(&shape));
    Zip::from(a.lanes(Axis(ax)))
        .and(out.lanes_mut(Axis(ax)))
        .for_each(f);
    out
}

/// True for NaN (the only value not equal to itself).
fn is_nan<T: Elem>(x: T) -> bool {
    x.partial_cmp(&x).is_none()
}

/// Total order for sorting: NaN is greater than everything (as numpy sorts).
fn total_cmp<T: Elem>(a: T, b: T) -> Ordering {
    a.partial_cmp(&b)
        .unwrap_or_else(|| is_nan(a).cmp(&is_nan(b)))
}

/// Index of the max/min of a non-empty lane; NaN wins (first NaN), like numpy.
fn arg_extreme<T: Elem>(lane: ArrayView1<T>, kind: ArgKind, last: bool) -> usize {
    let mut best = 0;
    for (i, &v) in lane.iter().enumerate().skip(1) {
        let b = lane[best];
        if is_nan(b) {
            break;
        }
        let ord = match kind {
            ArgKind::Max => total_cmp(v, b),
            ArgKind::Min if is_nan(v) => Ordering::Greater,
            ArgKind::Min => total_cmp(b, v),
        };
        if ord == Ordering::Greater || (last && ord == Ordering::Equal) {
            best = i;
        }
    }
    best
}

fn cumsum_lane<T: Elem>(
    lane: ArrayView1<T>,
    out: ArrayViewMut1<T>,
    exclusive: bool,
    reverse: bool,
) {
    if T::DTYPE.is_float() {
        cumsum_lane_acc::<f64, T>(lane, out, exclusive, reverse)
    } else {
        cumsum_lane_acc::<i64, T>(lane, out, exclusive, reverse)
    }
}

fn cumsum_lane_acc<A: Acc, T: Elem>(
    lane: ArrayView1<T>,
    mut out: ArrayViewMut1<T>,
    exclusive: bool,
    reverse: bool,
) {
    let n = lane.len();
    let mut acc = A::ZERO;
    for j in 0..n {
        let i = if reverse { n - 1 - j } else { j };
        let next = acc.add(A::of(lane[i]));
        out[i] = if exclusive { acc.to() } else { next.to() };
        acc = next;
    }
}

/// TopK along `ax`: values and i64 indices, sorted, ties broken by the lower index.
fn top_k<T: Elem>(a: &ArrayD<T>, ax: usize, k: usize, largest: bool) -> Vec<Tensor> {
    let idx = per_lane(a, ax, k, |lane, mut o: ArrayViewMut1<i64>| {
        let mut order: Vec<usize> = (0..lane.len()).collect();
        order.sort_by(|&i, &j| {
            let ord = total_cmp(lane[i], lane[j]);
            let ord = if largest { ord.reverse() } else { ord };
            ord.then(i.cmp(&j))
        });
        for (o, &i) in o.iter_mut().zip(&order) {
            *o = i as i64;
        }
    });
    let mut vals = ArrayD::<T>::default(idx.raw_dim());
    Zip::from(a.lanes(Axis(ax)))
        .and(idx.lanes(Axis(ax)))
        .and(vals.lanes_mut(Axis(ax)))
        .for_each(|l, ix, mut v| {
            for (v, &i) in v.iter_mut().zip(ix.iter()) {
                *v = l[i as usize];
            }
        });
    vec![T::wrap(vals), Tensor::I64(idx)]
}

/// Reduces `t` over the axes in `mask`.
fn reduce_tensor(kind: ReduceKind, t: &Tensor, mask: &[bool], keepdims: bool) -> OpResult<Tensor> {
    let out = map_tensor!(t, a => reduce_array(kind, a, mask));
    let shape: Vec<usize> = t
        .shape()
        .iter()
        .zip(mask)
        .filter_map(|(&d, &m)| match (m, keepdims) {
            (false, _) => Some(d),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect();
    out.reshape(&shape)
}

/// Reduces `a` over the axes in `mask`; the result has the kept dims only (flattened
/// order), reshaped by the caller.
fn reduce_array<T: Elem>(kind: ReduceKind, a: &ArrayD<T>, mask: &[bool]) -> ArrayD<T> {
    let kept: Vec<usize> = (0..a.ndim()).filter(|&i| !mask[i]).collect();
    let reduced: Vec<usize> = (0..a.ndim()).filter(|&i| mask[i]).collect();
    let n_out: usize = kept.iter().map(|&i| a.shape()[i]).product();
    let group: usize = reduced.iter().map(|&i| a.shape()[i]).product();
    let perm: Vec<usize> = kept.iter().chain(&reduced).copied().collect();
    let data: Vec<T> = a
        .view()
        .permuted_axes(IxDyn(&perm))
        .iter()
        .copied()
        .collect();
    let out: Vec<T> = if group == 0 {
        (0..n_out).map(|_| reduce_group(kind, &[])).collect()
    } else {
        data.chunks(group).map(|g| reduce_group(kind, g)).collect()
    };
    ArrayD::from_shape_vec(IxDyn(&[out.len()]), out).expect("1-D length matches")
}

/// Reduces one group of values.
fn reduce_group<T: Elem>(kind: ReduceKind, vals: &[T]) -> T {
    match kind {
        ReduceKind::Max => extreme(vals, true),
        ReduceKind::Min => extreme(vals, false),
        _ if T::DTYPE.is_float() => T::from_f64(reduce_f64(kind, vals)),
        ReduceKind::L2 | ReduceKind::LogSum | ReduceKind::LogSumExp => {
            T::from_f64(reduce_f64(kind, vals))
        }
        _ => reduce_int(kind, vals),
    }
}

/// Sum, product, sum of squares, L1 or mean of integers, exact (wrapping) in i64; the
/// mean truncates toward zero like numpy's integer mean.
fn reduce_int<T: Elem>(kind: ReduceKind, vals: &[T]) -> T {
    let signed = T::DTYPE.is_signed_int();
    let it = vals.iter().map(|v| v.to_i64());
    let r = match kind {
        ReduceKind::Prod => it.fold(1, i64::wrapping_mul),
        ReduceKind::SumSquare => it.fold(0i64, |s, v| s.wrapping_add(v.wrapping_mul(v))),
        ReduceKind::L1 => it.fold(0i64, |s, v| {
            s.wrapping_add(if signed { v.wrapping_abs() } else { v })
        }),
        ReduceKind::Mean => it.fold(0, i64::wrapping_add) / vals.len().max(1) as i64,
        _ => it.fold(0, i64::wrapping_add),
    };
    T::from_i64(r)
}

/// A float reduction computed in f64.
fn reduce_f64<T: Elem>(kind: ReduceKind, vals: &[T]) -> f64 {
    let it = vals.iter().map(|v| v.to_f64());
    match kind {
        ReduceKind::Sum => it.sum(),
        ReduceKind::Mean => it.sum::<f64>() / vals.len() as f64,
        ReduceKind::Prod => it.product(),
        ReduceKind::L1 => it.map(f64::abs).sum(),
        ReduceKind::L2 => it.map(|v| v * v).sum::<f64>().sqrt(),
        ReduceKind::SumSquare => it.map(|v| v * v).sum(),
        ReduceKind::LogSum => it.sum::<f64>().ln(),
        ReduceKind::LogSumExp => {
            let m = it
                .clone()
                .filter(|v| v.is_finite())
                .fold(f64::NEG_INFINITY, f64::max);
            let m = if m.is_finite() { m } else { 0.0 };
            it.map(|v| (v - m).exp()).sum::<f64>().ln() + m
        }
        ReduceKind::Max => it.fold(f64::NEG_INFINITY, f64::max),
        ReduceKind::Min => it.fold(f64::INFINITY, f64::min),
    }
}

/// The max (or min) of `vals`, NaN-propagating; the identity for an empty group is the
/// lowest (highest) value of the type (-inf/+inf for floats, false/true for bool).
fn extreme<T: Elem>(vals: &[T], max: bool) -> T {
    let mut acc = identity_extreme::<T>(max);
    for &v in vals {
        if is_nan(v) {
            return v;
        }
        if (max && v > acc) || (!max && v < acc) {
            acc = v;
        }
    }
    acc
}

fn identity_extreme<T: Elem>(max: bool) -> T {
    match (T::DTYPE == DType::Bool, max) {
        (true, true) => T::from_f64(0.0),
        (true, false) => T::from_f64(1.0),
        (false, true) => T::from_f64(f64::NEG_INFINITY),
        (false, false) => T::from_f64(f64::INFINITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::AttrValue;

    fn node(op: &str, opset: i64, n_in: usize, attrs: &[(&str, AttrValue)]) -> OnnxNode {
        OnnxNode::new(op, opset, attrs, vec![true; n_in], 1)
    }

    fn parse(op: &str, opset: i64, n_in: usize, attrs: &[(&str, AttrValue)]) -> ReduceOp {
        ReduceOp::from_onnx(&node(op, opset, n_in, attrs))
            .unwrap()
            .unwrap()
    }

    fn run(op: &ReduceOp, inputs: &[&Tensor]) -> Vec<Tensor> {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        let out = op.eval(&ins).unwrap();
        // inference must agree with evaluation
        let facts: Vec<Fact> = inputs
            .iter()
            .map(|t| Fact::constant((*t).clone()))
            .collect();
        let refs: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
        let inferred = op.infer(&refs).unwrap();
        for (f, t) in inferred.iter().zip(&out) {
            assert_eq!(f.dtype, t.dtype());
            assert_eq!(f.shape, Shape::known(t.shape()));
        }
        out
    }

    fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape, v.to_vec())
    }

    #[test]
    fn not_in_family() {
        assert!(ReduceOp::from_onnx(&node("Relu", 13, 1, &[]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn axes_attribute_form() {
        let op = parse(
            "ReduceMean",
            13,
            1,
            &[
                ("axes", AttrValue::Ints(vec![-1])),
                ("keepdims", AttrValue::Int(0)),
            ],
        );
        let x = f32s(&[2, 3], &[1., 2., 3., 4., 5., 9.]);
        let y = &run(&op, &[&x])[0];
        assert_eq!(y.shape(), &[2]);
        assert_eq!(y.to_f64_vec(), vec![2.0, 6.0]);
        // no axes attribute: all axes
        let all = parse("ReduceSum", 11, 1, &[]);
        assert_eq!(run(&all, &[&x])[0].to_f64_vec(), vec![24.0]);
        assert_eq!(run(&all, &[&x])[0].shape(), &[1, 1]);
    }

    #[test]
    fn axes_attribute_rejected_after_change() {
        let n = node("ReduceSum", 13, 1, &[("axes", AttrValue::Ints(vec![0]))]);
        let e = ReduceOp::from_onnx(&n).unwrap_err();
        assert!(e.contains("attribute 'axes'"), "{e}");
        let n = node("ReduceMax", 17, 2, &[]);
        assert!(ReduceOp::from_onnx(&n).is_err());
    }

    #[test]
    fn integer_reductions_are_exact() {
        let x = Tensor::from_vec(&[2, 2], vec![-3i64, 0, 5, 6]);
        let axes = Tensor::vec_i64(&[1]);
        let mean = parse("ReduceMean", 18, 2, &[]);
        assert_eq!(run(&mean, &[&x, &axes])[0].to_i64_vec(), vec![-1, 5]);
        let big = Tensor::from_vec(&[2], vec![i64::MAX - 1, 1]);
        let sum = parse("ReduceSum", 13, 2, &[]);
        assert_eq!(
            run(&sum, &[&big, &Tensor::vec_i64(&[])])[0].to_i64_vec(),
            vec![i64::MAX]
        );
        let l1 = parse("ReduceL1", 18, 1, &[]);
        let i8s = Tensor::from_vec(&[3], vec![-3i8, 4, -5]);
        assert_eq!(run(&l1, &[&i8s])[0].to_i64_vec(), vec![12]);
        let prod = parse("ReduceProd", 18, 1, &[]);
        let u8s = Tensor::from_vec(&[2], vec![16u8, 17]);
        assert_eq!(run(&prod, &[&u8s])[0].to_i64_vec(), vec![(16 * 17) % 256]);
    }

    #[test]
    fn empty_reductions_give_identities() {
        let x = Tensor::from_vec::<i32>(&[2, 0], vec![]);
        let axes = Tensor::vec_i64(&[1]);
        let max = parse("ReduceMax", 18, 2, &[("keepdims", AttrValue::Int(0))]);
        assert_eq!(
            run(&max, &[&x, &axes])[0].to_i64_vec(),
            vec![i32::MIN as i64; 2]
        );
        let min = parse("ReduceMin", 18, 2, &[]);
        assert_eq!(
            run(&min, &[&x, &axes])[0].to_i64_vec(),
            vec![i32::MAX as i64; 2]
        );
        let f = Tensor::from_vec::<f32>(&[2, 0], vec![]);
        let lse = parse("ReduceLogSumExp", 18, 2, &[]);
        assert_eq!(
            run(&lse, &[&f, &axes])[0].to_f64_vec(),
            vec![f64::NEG_INFINITY; 2]
        );
        let prod = parse("ReduceProd", 18, 2, &[]);
        assert_eq!(run(&prod, &[&f, &axes])[0].to_f64_vec(), vec![1.0; 2]);
    }

    #[test]
    fn noop_with_empty_axes_applies_elementwise() {
        let op = parse(
            "ReduceL2",
            18,
            2,
            &[("noop_with_empty_axes", AttrValue::Int(1))],
        );
        let x = f32s(&[3], &[-1., 2., -3.]);
        let y = &run(&op, &[&x, &Tensor::vec_i64(&[])])[0];
        assert_eq!(y.to_f64_vec(), vec![1., 2., 3.]);
        assert_eq!(y.shape(), &[3]);
    }

    #[test]
    fn log_sum_exp_is_stable_and_nan_propagates() {
        let op = parse("ReduceLogSumExp", 18, 1, &[("keepdims", AttrValue::Int(0))]);
        let x = Tensor::from_vec(&[3], vec![1000.0f64, 1001.0, f64::NEG_INFINITY]);
        let y = run(&op, &[&x])[0].to_f64_vec()[0];
        assert!((y - 1_001.313_261_687_518_2).abs() < 1e-9, "{y}");
        let max = parse("ReduceMax", 18, 1, &[]);
        let n = f32s(&[3], &[1., f32::NAN, 3.]);
        assert!(run(&max, &[&n])[0].to_f64_vec()[0].is_nan());
    }

    #[test]
    fn bad_axes_are_errors() {
        let op = parse("ReduceSum", 13, 2, &[]);
        let x = f32s(&[2, 2], &[1., 2., 3., 4.]);
        for bad in [vec![2], vec![0, -2], vec![-3]] {
            let axes = Tensor::vec_i64(&bad);
            assert!(op.eval(&[Some(&x), Some(&axes)]).is_err(), "{bad:?}");
            let facts = [Fact::constant(x.clone()), Fact::constant(axes)];
            assert!(op.infer(&[Some(&facts[0]), Some(&facts[1])]).is_err());
        }
        let i32_axes = Tensor::from_vec(&[1], vec![0i32]);
        assert!(op.eval(&[Some(&x), Some(&i32_axes)]).is_err());
        let b = Tensor::from_vec(&[2], vec![true, false]);
        assert!(op.eval(&[Some(&b), None]).is_err());
    }

    #[test]
    fn infer_with_unknown_axes() {
        let op = parse("ReduceSum", 13, 2, &[("keepdims", AttrValue::Int(0))]);
        let x = Fact::new(DType::F32, Shape(vec![Dim::Sym("N".into()), Dim::Known(4)]));
        let axes = Fact::new(DType::I64, Shape::known(&[1]));
        let out = op.infer(&[Some(&x), Some(&axes)]).unwrap();
        assert_eq!(out[0].shape.rank(), 1);
        let axes = Fact::constant(Tensor::vec_i64(&[1]));
        let out = op.infer(&[Some(&x), Some(&axes)]).unwrap();
        assert_eq!(out[0].shape.to_string(), "[N]");
    }

    #[test]
    fn arg_extremes() {
        let x = f32s(&[2, 3], &[1., f32::NAN, 3., 2., 5., 5.]);
        let amax = parse("ArgMax", 13, 1, &[("axis", AttrValue::Int(1))]);
        assert_eq!(run(&amax, &[&x])[0].to_i64_vec(), vec![1, 1]);
        assert_eq!(run(&amax, &[&x])[0].shape(), &[2, 1]);
        let amin = parse("ArgMin", 13, 1, &[("axis", AttrValue::Int(-1))]);
        assert_eq!(run(&amin, &[&x])[0].to_i64_vec(), vec![1, 0]);
        let last = parse(
            "ArgMax",
            13,
            1,
            &[
                ("axis", AttrValue::Int(1)),
                ("keepdims", AttrValue::Int(0)),
                ("select_last_index", AttrValue::Int(1)),
            ],
        );
        let y = &run(&last, &[&x])[0];
        assert_eq!(y.to_i64_vec(), vec![1, 2]);
        assert_eq!(y.shape(), &[2]);
        let bad = parse("ArgMax", 13, 1, &[("axis", AttrValue::Int(2))]);
        assert!(bad.eval(&[Some(&x)]).is_err());
        let empty = Tensor::from_vec::<f32>(&[0], vec![]);
        assert!(amax.eval(&[Some(&empty)]).is_err());
    }

    #[test]
    fn cumsum_variants() {
        let x = Tensor::from_vec(&[2, 3], vec![1i32, 2, 3, 4, 5, 6]);
        let axis = Tensor::scalar(1i64);
        let op = parse(
            "CumSum",
            14,
            2,
            &[
                ("exclusive", AttrValue::Int(1)),
                ("reverse", AttrValue::Int(1)),
            ],
        );
        assert_eq!(
            run(&op, &[&x, &axis])[0].to_i64_vec(),
            vec![5, 3, 0, 11, 6, 0]
        );
        let plain = parse("CumSum", 14, 2, &[]);
        let axis0 = Tensor::from_vec(&[1], vec![-2i32]);
        assert_eq!(
            run(&plain, &[&x, &axis0])[0].to_i64_vec(),
            vec![1, 2, 3, 5, 7, 9]
        );
        let bad = Tensor::scalar(2i64);
        assert!(plain.eval(&[Some(&x), Some(&bad)]).is_err());
    }

    #[test]
    fn top_k_forms() {
        let x = f32s(&[2, 4], &[1., 3., 3., 2., f32::NAN, 0., 7., 7.]);
        let v1 = parse("TopK", 1, 1, &[("k", AttrValue::Int(2))]);
        let out = run(&v1, &[&x]);
        assert_eq!(out[1].to_i64_vec(), vec![1, 2, 0, 2]);
        assert_eq!(out[0].shape(), &[2, 2]);
        let small = parse(
            "TopK",
            11,
            2,
            &[("largest", AttrValue::Int(0)), ("axis", AttrValue::Int(1))],
        );
        let k = Tensor::vec_i64(&[3]);
        let out = run(&small, &[&x, &k]);
        assert_eq!(out[1].to_i64_vec(), vec![0, 3, 1, 1, 2, 3]);
        assert_eq!(out[0].to_f64_vec(), vec![1., 2., 3., 0., 7., 7.]);
        let too_big = Tensor::vec_i64(&[5]);
        assert!(small.eval(&[Some(&x), Some(&too_big)]).is_err());
        let neg = Tensor::vec_i64(&[-1]);
        assert!(small.eval(&[Some(&x), Some(&neg)]).is_err());
        let e = ReduceOp::from_onnx(&node("TopK", 1, 1, &[])).unwrap_err();
        assert!(e.contains("'k'"), "{e}");
    }
}
