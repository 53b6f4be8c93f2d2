//! Ops that only change or report shapes, and the ops that create tensors from shapes:
//! `Reshape`, `Transpose`, `Flatten`, `Squeeze`, `Unsqueeze`, `Expand`, `Tile`, `Shape`,
//! `Size`, `ConstantOfShape`, `Range`, `EyeLike`.

use super::{
    check_size, dim_product, int_values, known, norm_axes, same, take_outer, to_usize, IntsArg,
    Known,
};
use crate::dtype::DType;
use crate::ops::{req, Fact, OpResult};
use crate::shape::{broadcast_dims, broadcast_shapes, Dim, Shape};
use crate::tensor::{Elem, Tensor};
use crate::{map_tensor, with_tensor};

use ndarray::{ArrayD, IxDyn};

const SHAPE_IN: &str = "input 1 (shape)";

/// The concrete dims of a symbolic shape computed from known dims.
fn concrete(s: Shape) -> OpResult<Vec<usize>> {
    s.as_known()
        .ok_or_else(|| format!("internal: shape {s} is not concrete"))
}

// ----- Reshape ---------------------------------------------------------------------------

/// The output shape of `Reshape(input, spec)`; works on symbolic shapes, and on concrete
/// ones (where it also checks the element count).
fn reshape_dims(input: &Shape, spec: &[i64], allowzero: bool) -> OpResult<Shape> {
    let mut out = Vec::with_capacity(spec.len());
    let mut infer_at = None;
    for (i, &s) in spec.iter().enumerate() {
        out.push(match s {
            -1 if infer_at.is_some() => return Err(format!("{SHAPE_IN}: more than one -1")),
            -1 => {
                infer_at = Some(i);
                Dim::Known(1)
            }
            0 if !allowzero => input.0.get(i).cloned().ok_or_else(|| {
                format!(
                    "{SHAPE_IN}: 0 at position {i} copies a dim that the rank-{} input lacks",
                    input.rank()
                )
            })?,
            s if s < 0 => return Err(format!("{SHAPE_IN}: invalid dim {s}")),
            s => Dim::Known(s as usize),
        });
    }
    match infer_at {
        Some(_) if allowzero && spec.contains(&0) => Err(format!(
            "{SHAPE_IN}: -1 together with 0 when allowzero is set"
        )),
        Some(at) => {
            out[at] = missing_dim(input.dims(), &out)?;
            Ok(Shape(out))
        }
        None => {
            let out = Shape(out);
            if out.is_known() && super::numel(&out).is_none() {
                return Err(format!("{SHAPE_IN}: {out} is too large"));
            }
            match (super::numel(input), super::numel(&out)) {
                (Some(a), Some(b)) if a != b => Err(format!(
                    "cannot reshape {input} ({a} elements) to {out} ({b} elements)"
                )),
                _ => Ok(out),
            }
        }
    }
}

/// The dim that `-1` stands for (its own slot in `out` holds 1): symbols of the input
/// that reappear in the output cancel; the rest must be known.
fn missing_dim(input: &[Dim], out: &[Dim]) -> OpResult<Dim> {
    let mut syms: Vec<&Dim> = input.iter().filter(|d| d.known().is_none()).collect();
    for d in out.iter().filter(|d| d.known().is_none()) {
        match syms.iter().position(|s| *s == d && !d.is_anonymous()) {
            Some(p) => {
                syms.remove(p);
            }
            None => return Ok(Dim::unknown()),
        }
    }
    if !syms.is_empty() {
        return Ok(Dim::unknown());
    }
    let prod = |dims: &[Dim]| {
        dims.iter()
            .filter_map(Dim::known)
            .try_fold(1usize, usize::checked_mul)
    };
    let (Some(total), Some(rest)) = (prod(input), prod(out)) else {
        return Err(format!("{SHAPE_IN}: {} is too large", Shape(out.to_vec())));
    };
    if rest == 0 || total % rest != 0 {
        return Err(format!(
            "cannot reshape {} to {} (-1 cannot be inferred)",
            Shape(input.to_vec()),
            Shape(out.to_vec())
        ));
    }
    Ok(Dim::Known(total / rest))
}

/// Shape inference of `Reshape`.
pub(super) fn infer_reshape(
    shape: &IntsArg,
    allowzero: bool,
    inputs: &[Option<&Fact>],
) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let out = match shape.infer(inputs, SHAPE_IN)? {
        Known::Value(spec) => reshape_dims(&x.shape, &spec, allowzero)?,
        Known::Absent => return Err(format!("{SHAPE_IN} is required but missing")),
        Known::Unknown => match shape.infer_len(inputs) {
            Some(n) => Shape::unknown(n),
            None => {
                return Err(format!(
                    "{SHAPE_IN}: its length must be known statically (and at most 64)"
                ))
            }
        },
    };
    Ok(vec![Fact::new(x.dtype, out)])
}

/// `Reshape`.
pub(super) fn reshape(
    shape: &IntsArg,
    allowzero: bool,
    inputs: &[Option<&Tensor>],
) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let spec = shape
        .eval(inputs, SHAPE_IN)?
        .ok_or_else(|| format!("{SHAPE_IN} is required but missing"))?;
    let dims = concrete(reshape_dims(&known(x.shape()), &spec, allowzero)?)?;
    check_size(&dims, SHAPE_IN)?;
    x.reshape(&dims)
}

// ----- Transpose -------------------------------------------------------------------------

fn perm_of(perm: Option<&[i64]>, rank: usize) -> OpResult<Vec<usize>> {
    match perm {
        None => Ok((0..rank).rev().collect()),
        Some(p) if p.len() != rank => Err(format!(
            "attribute 'perm': {} entries for a rank-{rank} input",
            p.len()
        )),
        Some(p) => norm_axes(p, rank, "attribute 'perm'"),
    }
}

/// Shape inference of `Transpose`.
pub(super) fn infer_transpose(
    perm: Option<&[i64]>,
    inputs: &[Option<&Fact>],
) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let perm = perm_of(perm, x.shape.rank())?;
    let dims = perm.iter().map(|&p| x.shape.dim(p).clone()).collect();
    Ok(vec![Fact::new(x.dtype, Shape(dims))])
}

/// `Transpose`.
pub(super) fn transpose(perm: Option<&[i64]>, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let perm = perm_of(perm, x.rank())?;
    Ok(map_tensor!(x, a => a
        .view()
        .permuted_axes(IxDyn(&perm))
        .as_standard_layout()
        .into_owned()))
}

// ----- Flatten ---------------------------------------------------------------------------

fn flatten_dims(axis: i64, s: &Shape) -> OpResult<Shape> {
    let r = s.rank() as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if !(0..=r).contains(&a) {
        return Err(format!(
            "attribute 'axis': {axis} out of range for rank {r}"
        ));
    }
    let (outer, inner) = s.dims().split_at(a as usize);
    Ok(Shape(vec![dim_product(outer), dim_product(inner)]))
}

/// Shape inference of `Flatten`.
pub(super) fn infer_flatten(axis: i64, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    Ok(vec![Fact::new(x.dtype, flatten_dims(axis, &x.shape)?)])
}

/// `Flatten`.
pub(super) fn flatten(axis: i64, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    x.reshape(&concrete(flatten_dims(axis, &known(x.shape()))?)?)
}

// ----- Squeeze / Unsqueeze ---------------------------------------------------------------

const AXES: &str = "axes";

/// Squeezed shape; without axes, every dim known to be 1 goes (symbolic dims are kept).
fn squeeze_dims(s: &Shape, axes: Option<&[i64]>) -> OpResult<Shape> {
    let Some(axes) = axes else {
        return Ok(Shape(
            s.dims()
                .iter()
                .filter(|d| d.known() != Some(1))
                .cloned()
                .collect(),
        ));
    };
    let axes = norm_axes(axes, s.rank(), AXES)?;
    for &a in &axes {
        if !s.dim(a).compatible(&Dim::Known(1)) {
            return Err(format!(
                "{AXES}: cannot squeeze axis {a} of size {}",
                s.dim(a)
            ));
        }
    }
    let dims = s.dims().iter().enumerate();
    Ok(Shape(
        dims.filter(|(i, _)| !axes.contains(i))
            .map(|(_, d)| d.clone())
            .collect(),
    ))
}

/// Unsqueezed shape (axes refer to the output).
fn unsqueeze_dims(s: &Shape, axes: &[i64]) -> OpResult<Shape> {
    let rank = s.rank() + axes.len();
    let axes = norm_axes(axes, rank, AXES)?;
    let mut rest = s.dims().iter();
    let dims = (0..rank).map(|i| {
        if axes.contains(&i) {
            Some(Dim::Known(1))
        } else {
            rest.next().cloned()
        }
    });
    Ok(Shape(
        dims.collect::<Option<_>>()
            .ok_or("axes: internal rank mismatch")?,
    ))
}

/// Shape inference of `Squeeze`.
pub(super) fn infer_squeeze(axes: &IntsArg, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let out = match axes.infer(inputs, AXES)? {
        Known::Value(a) => squeeze_dims(&x.shape, Some(&a))?,
        Known::Absent => squeeze_dims(&x.shape, None)?,
        Known::Unknown => match axes.infer_len(inputs) {
            Some(n) if n <= x.shape.rank() => Shape::unknown(x.shape.rank() - n),
            _ => {
                return Err(format!(
                    "{AXES}: its length must be known statically (and at most 64)"
                ))
            }
        },
    };
    Ok(vec![Fact::new(x.dtype, out)])
}

/// `Squeeze`.
pub(super) fn squeeze(axes: &IntsArg, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let axes = axes.eval(inputs, AXES)?;
    x.reshape(&concrete(squeeze_dims(
        &known(x.shape()),
        axes.as_deref(),
    )?)?)
}

/// Shape inference of `Unsqueeze`.
pub(super) fn infer_unsqueeze(axes: &IntsArg, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let out = match axes.infer(inputs, AXES)? {
        Known::Value(a) => unsqueeze_dims(&x.shape, &a)?,
        Known::Absent => return Err(format!("{AXES} is required but missing")),
        Known::Unknown => match axes.infer_len(inputs) {
            Some(n) => Shape::unknown(x.shape.rank() + n),
            None => {
                return Err(format!(
                    "{AXES}: its length must be known statically (and at most 64)"
                ))
            }
        },
    };
    Ok(vec![Fact::new(x.dtype, out)])
}

/// `Unsqueeze`.
pub(super) fn unsqueeze(axes: &IntsArg, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let axes = axes
        .eval(inputs, AXES)?
        .ok_or_else(|| format!("{AXES} is required but missing"))?;
    x.reshape(&concrete(unsqueeze_dims(&known(x.shape()), &axes)?)?)
}

// ----- Expand / Tile ---------------------------------------------------------------------

/// Non-negative sizes from a shape-like list.
fn sizes(v: &[i64], what: &str) -> OpResult<Vec<usize>> {
    v.iter().map(|&d| to_usize(d, what)).collect()
}

/// Shape inference of `Expand`.
pub(super) fn infer_expand(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let arg = IntsArg::Input(1);
    let out = match arg.infer(inputs, SHAPE_IN)? {
        Known::Value(v) => broadcast_dims(&[&x.shape, &known(&sizes(&v, SHAPE_IN)?)])?,
        Known::Absent => return Err(format!("{SHAPE_IN} is required but missing")),
        Known::Unknown => {
            let n = arg.infer_len(inputs).ok_or_else(|| {
                format!("{SHAPE_IN}: its length must be known statically (and at most 64)")
            })?;
            let rank = n.max(x.shape.rank());
            let off = rank - x.shape.rank();
            let dim = |i: usize| match i.checked_sub(off).map(|i| x.shape.dim(i)) {
                Some(Dim::Known(d)) if *d != 1 => Dim::Known(*d),
                _ => Dim::unknown(),
            };
            Shape((0..rank).map(dim).collect())
        }
    };
    Ok(vec![Fact::new(x.dtype, out)])
}

/// `Expand`.
pub(super) fn expand(inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let s = sizes(&int_values(req(inputs, 1)?, SHAPE_IN)?, SHAPE_IN)?;
    let out = broadcast_shapes(&[x.shape(), &s])?;
    check_size(&out, SHAPE_IN)?;
    Ok(map_tensor!(x, a => a
        .broadcast(IxDyn(&out))
        .ok_or_else(|| format!("cannot expand {:?} to {out:?}", x.shape()))?
        .as_standard_layout()
        .into_owned()))
}

const REPEATS: &str = "input 1 (repeats)";

fn repeats_of(v: Vec<i64>, rank: usize) -> OpResult<Vec<usize>> {
    if v.len() != rank {
        return Err(format!(
            "{REPEATS}: {} values for a rank-{rank} input",
            v.len()
        ));
    }
    sizes(&v, REPEATS)
}

/// Shape inference of `Tile`.
pub(super) fn infer_tile(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let rank = x.shape.rank();
    let out = match IntsArg::Input(1).infer(inputs, REPEATS)? {
        Known::Value(v) => {
            let reps = repeats_of(v, rank)?;
            let tile = |(d, r): (&Dim, &usize)| match (d, r) {
                (_, 0) => Dim::Known(0),
                (d, 1) => d.clone(),
                (Dim::Known(d), r) => d.checked_mul(*r).map_or_else(Dim::unknown, Dim::Known),
                _ => Dim::unknown(),
            };
            Shape(x.shape.dims().iter().zip(&reps).map(tile).collect())
        }
        Known::Absent => return Err(format!("{REPEATS} is required but missing")),
        Known::Unknown => Shape::unknown(rank),
    };
    Ok(vec![Fact::new(x.dtype, out)])
}

/// `Tile`.
pub(super) fn tile(inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let reps = repeats_of(int_values(req(inputs, 1)?, REPEATS)?, x.rank())?;
    let out: Vec<usize> = x
        .shape()
        .iter()
        .zip(&reps)
        .map(|(d, r)| d.saturating_mul(*r))
        .collect();
    check_size(&out, REPEATS)?;
    let maps: Vec<Vec<Option<usize>>> = x
        .shape()
        .iter()
        .zip(&reps)
        .map(|(&d, &r)| (0..d * r).map(|i| Some(i % d)).collect())
        .collect();
    Ok(map_tensor!(x, a => take_outer(a, &maps, Default::default())))
}

// ----- Shape / Size ----------------------------------------------------------------------

/// The clamped `[start, end)` range of `Shape` (opset 15 semantics).
fn shape_range(start: i64, end: Option<i64>, rank: usize) -> (usize, usize) {
    let r = rank as i64;
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let s = clamp(start);
    let e = clamp(end.unwrap_or(r));
    (s, e.max(s))
}

/// Shape inference of `Shape`; the value is known when the selected dims are.
pub(super) fn infer_shape(
    start: i64,
    end: Option<i64>,
    inputs: &[Option<&Fact>],
) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let (s, e) = shape_range(start, end, x.shape.rank());
    let dims = Shape(x.shape.dims()[s..e].to_vec());
    Ok(vec![match dims.as_known() {
        Some(d) => Fact::constant(Tensor::vec_i64(
            &d.iter().map(|&d| d as i64).collect::<Vec<_>>(),
        )),
        None => Fact::new(DType::I64, known(&[e - s])),
    }])
}

/// `Shape`.
pub(super) fn shape(start: i64, end: Option<i64>, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let (s, e) = shape_range(start, end, x.rank());
    let dims: Vec<i64> = x.shape()[s..e].iter().map(|&d| d as i64).collect();
    Ok(Tensor::vec_i64(&dims))
}

/// Shape inference of `Size`; the value is known when the shape is.
pub(super) fn infer_size(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    Ok(vec![match super::numel(&x.shape) {
        Some(n) => Fact::constant(Tensor::scalar(n as i64)),
        None => Fact::new(DType::I64, Shape::default()),
    }])
}

/// `Size`.
pub(super) fn size(inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    Ok(Tensor::scalar(req(inputs, 0)?.len() as i64))
}

// ----- ConstantOfShape / EyeLike / Range ---------------------------------------------------

/// Shape inference of `ConstantOfShape`.
pub(super) fn infer_constant_of_shape(
    value: &Tensor,
    inputs: &[Option<&Fact>],
) -> OpResult<Vec<Fact>> {
    let arg = IntsArg::Input(0);
    let out = match arg.infer(inputs, "input 0 (shape)")? {
        Known::Value(v) => known(&sizes(&v, "input 0 (shape)")?),
        Known::Absent => return Err("input 0 is required but missing".into()),
        Known::Unknown => match arg.infer_len(inputs) {
            Some(n) => Shape::unknown(n),
            None => {
                return Err(
                    "input 0 (shape): its length must be known statically (and at most 64)".into(),
                )
            }
        },
    };
    Ok(vec![Fact::new(value.dtype(), out)])
}

/// `ConstantOfShape` (an empty shape gives a scalar).
pub(super) fn constant_of_shape(value: &Tensor, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let what = "input 0 (shape)";
    let dims = sizes(&int_values(req(inputs, 0)?, what)?, what)?;
    check_size(&dims, what)?;
    Ok(map_tensor!(value, v => {
        let fill = v.iter().next().copied().unwrap_or_default();
        ArrayD::from_elem(IxDyn(&dims), fill)
    }))
}

/// Shape inference of `EyeLike`.
pub(super) fn infer_eye_like(
    dtype: Option<DType>,
    inputs: &[Option<&Fact>],
) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    if x.shape.rank() != 2 {
        return Err(format!(
            "input 0: expected a 2-D tensor, found shape {}",
            x.shape
        ));
    }
    Ok(vec![Fact::new(dtype.unwrap_or(x.dtype), x.shape.clone())])
}

/// `EyeLike`.
pub(super) fn eye_like(
    dtype: Option<DType>,
    k: i64,
    inputs: &[Option<&Tensor>],
) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let &[rows, cols] = x.shape() else {
        return Err(format!(
            "input 0: expected a 2-D tensor, found shape {:?}",
            x.shape()
        ));
    };
    let eye = ArrayD::from_shape_fn(IxDyn(&[rows, cols]), |i| {
        f64::from(u8::from(i[1] as i64 - i[0] as i64 == k))
    });
    Ok(Tensor::from_f64_array(dtype.unwrap_or(x.dtype()), eye))
}

/// The element count of `Range`, computed exactly for integers.
fn range_len<T: Elem>(start: T, limit: T, delta: T) -> OpResult<usize> {
    let n = if T::DTYPE.is_float() {
        let (s, l, d) = (start.to_f64(), limit.to_f64(), delta.to_f64());
        let n = ((l - s) / d).ceil().max(0.0);
        if d == 0.0 || !n.is_finite() {
            return Err(format!("Range({s}, {l}, {d}) is not finite"));
        }
        n
    } else {
        let (s, l, d) = (
            start.to_i64() as i128,
            limit.to_i64() as i128,
            delta.to_i64() as i128,
        );
        if d == 0 {
            return Err("input 2 (delta): must not be 0".into());
        }
        let diff = l - s;
        // ceil division for either sign of `d`.
        let n = diff / d + i128::from(diff % d != 0 && (diff < 0) == (d < 0));
        n.max(0) as f64
    };
    if n > super::MAX_ELEMENTS as f64 {
        return Err(format!("Range of {n} elements is too large"));
    }
    Ok(n as usize)
}

/// The three scalars of `Range` as element type `T`.
fn range_args<T: Elem>(inputs: &[Option<&Tensor>]) -> OpResult<[T; 3]> {
    let names = ["start", "limit", "delta"];
    let mut out = [T::default(); 3];
    for (i, o) in out.iter_mut().enumerate() {
        let what = format!("input {i} ({})", names[i]);
        let a = same::<T>(req(inputs, i)?, &what)?;
        if a.len() != 1 {
            return Err(format!(
                "{what}: expected a scalar, found shape {:?}",
                a.shape()
            ));
        }
        *o = a.iter().next().copied().unwrap_or_default();
    }
    Ok(out)
}

fn range_of<T: Elem>(inputs: &[Option<&Tensor>]) -> OpResult<ArrayD<T>> {
    let [start, limit, delta] = range_args::<T>(inputs)?;
    let n = range_len(start, limit, delta)?;
    let v: Vec<T> = if T::DTYPE.is_float() {
        let (s, d) = (start.to_f64(), delta.to_f64());
        (0..n).map(|i| T::from_f64(s + i as f64 * d)).collect()
    } else {
        let (s, d) = (start.to_i64(), delta.to_i64());
        (0..n as i64)
            .map(|i| T::from_i64(s.wrapping_add(i.wrapping_mul(d))))
            .collect()
    };
    ArrayD::from_shape_vec(IxDyn(&[n]), v).map_err(|e| e.to_string())
}

/// The output length of `Range` from constant inputs.
fn range_count<T: Elem>(_like: &ArrayD<T>, inputs: &[Option<&Tensor>]) -> OpResult<usize> {
    let [start, limit, delta] = range_args::<T>(inputs)?;
    range_len(start, limit, delta)
}

/// Shape inference of `Range`: the length is known when all three inputs are.
pub(super) fn infer_range(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let start = req(inputs, 0)?;
    if start.dtype == DType::Bool {
        return Err("input 0 (start): Range does not support bool".into());
    }
    let mut values = Vec::new();
    for i in 0..3 {
        let f = req(inputs, i)?;
        super::check_same_dtype(f, start.dtype, &format!("input {i}"))?;
        if f.shape.numel().is_some_and(|n| n != 1) {
            return Err(format!(
                "input {i}: expected a scalar, found shape {}",
                f.shape
            ));
        }
        values.push(f.value());
    }
    let len = match (values[0], values.iter().all(Option::is_some)) {
        (Some(s), true) => Dim::Known(with_tensor!(s, a => range_count(a, &values)?)),
        _ => Dim::unknown(),
    };
    Ok(vec![Fact::new(start.dtype, Shape(vec![len]))])
}

/// `Range`.
pub(super) fn range(inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let start = req(inputs, 0)?;
    if start.dtype() == DType::Bool {
        return Err("input 0 (start): Range does not support bool".into());
    }
    Ok(map_tensor!(start, _a => range_of(inputs)?))
}
