//! Ops that read or write elements at given indices: `Gather`, `GatherElements`, `GatherND`,
//! `ScatterElements`, `ScatterND`, `OneHot`, `NonZero`.
//!
//! Every index is range checked (and normalised when negative) before any element is read,
//! so bad indices give errors, never panics.

use super::{axis_of, check_same_dtype, same, standard, strides_of, Reduction};
use crate::dtype::DType;
use crate::ops::{req, Fact, OpResult};
use crate::shape::{Dim, Shape};
use crate::tensor::{Elem, Tensor};
use crate::{map_tensor, with_tensor};
use ndarray::{ArrayD, Dimension, IxDyn};
use std::cmp::Ordering;

const INDICES: &str = "input 1 (indices)";

/// Checks that an indices input is int32 or int64.
fn check_indices(dtype: DType) -> OpResult<()> {
    match dtype {
        DType::I32 | DType::I64 => Ok(()),
        d => Err(format!("{INDICES}: expected int32 or int64, found {d}")),
    }
}

/// Normalises index `i` into `[0, n)` (negative counts from the end).
fn norm_index(i: i64, n: usize, what: &str) -> OpResult<usize> {
    let j = if i < 0 { i + n as i64 } else { i };
    if (0..n as i64).contains(&j) {
        Ok(j as usize)
    } else {
        Err(format!(
            "{what}: index {i} is out of range for a dim of size {n}"
        ))
    }
}

/// The indices input, normalised against `n`.
fn indices_within(t: &Tensor, n: usize) -> OpResult<Vec<usize>> {
    check_indices(t.dtype())?;
    t.to_i64_vec()
        .into_iter()
        .map(|i| norm_index(i, n, INDICES))
        .collect()
}

/// Row-major linear offset of `idx` for the given strides.
fn linear(idx: &[usize], strides: &[usize]) -> usize {
    idx.iter().zip(strides).map(|(i, s)| i * s).sum()
}

// ----- Gather ----------------------------------------------------------------------------

/// Shape inference of `Gather`.
pub(super) fn infer_gather(axis: i64, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let (x, idx) = (req(inputs, 0)?, req(inputs, 1)?);
    check_indices(idx.dtype)?;
    if x.shape.rank() == 0 {
        return Err("input 0: Gather needs rank >= 1".into());
    }
    let axis = axis_of(axis, x.shape.rank())?;
    let d = x.shape.dims();
    let dims = [&d[..axis], idx.shape.dims(), &d[axis + 1..]].concat();
    Ok(vec![Fact::new(x.dtype, Shape(dims))])
}

fn gather_of<T: Elem>(a: &ArrayD<T>, axis: usize, idx: &[usize], idx_shape: &[usize]) -> ArrayD<T> {
    let q = idx_shape.len();
    let s = a.shape();
    let out_shape = [&s[..axis], idx_shape, &s[axis + 1..]].concat();
    let st = strides_of(idx_shape);
    let mut src = vec![0usize; a.ndim()];
    ArrayD::from_shape_fn(IxDyn(&out_shape), |o| {
        let o = o.slice();
        src[..axis].copy_from_slice(&o[..axis]);
        src[axis] = idx[linear(&o[axis..axis + q], &st)];
        src[axis + 1..].copy_from_slice(&o[axis + q..]);
        a[&src[..]]
    })
}

/// `Gather`.
pub(super) fn gather(axis: i64, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let (x, it) = (req(inputs, 0)?, req(inputs, 1)?);
    if x.rank() == 0 {
        return Err("input 0: Gather needs rank >= 1".into());
    }
    let axis = axis_of(axis, x.rank())?;
    let idx = indices_within(it, x.shape()[axis])?;
    Ok(map_tensor!(x, a => gather_of(a, axis, &idx, it.shape())))
}

// ----- GatherElements / ScatterElements --------------------------------------------------

/// Checks the shapes of an elements-wise gather/scatter: same rank, and indices no larger
/// than the data off the axis.
fn check_elements(data: &Shape, idx: &Shape, axis: usize) -> OpResult<()> {
    if data.rank() != idx.rank() {
        return Err(format!(
            "{INDICES}: rank {} != data rank {}",
            idx.rank(),
            data.rank()
        ));
    }
    for (d, (a, b)) in data.dims().iter().zip(idx.dims()).enumerate() {
        if let (Some(a), Some(b), true) = (a.known(), b.known(), d != axis) {
            if b > a {
                return Err(format!(
                    "{INDICES}: shape {idx} exceeds data shape {data} on axis {d}"
                ));
            }
        }
    }
    Ok(())
}

/// Shape inference of `GatherElements`.
pub(super) fn infer_gather_elements(axis: i64, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let (x, idx) = (req(inputs, 0)?, req(inputs, 1)?);
    check_indices(idx.dtype)?;
    let axis = axis_of(axis, x.shape.rank())?;
    check_elements(&x.shape, &idx.shape, axis)?;
    Ok(vec![Fact::new(x.dtype, idx.shape.clone())])
}

fn gather_elements_of<T: Elem>(
    a: &ArrayD<T>,
    axis: usize,
    idx: &[usize],
    shape: &[usize],
) -> ArrayD<T> {
    let st = strides_of(shape);
    let mut src = vec![0usize; a.ndim()];
    ArrayD::from_shape_fn(IxDyn(shape), |o| {
        let o = o.slice();
        src.copy_from_slice(o);
        src[axis] = idx[linear(o, &st)];
        a[&src[..]]
    })
}

/// `GatherElements`.
pub(super) fn gather_elements(axis: i64, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let (x, it) = (req(inputs, 0)?, req(inputs, 1)?);
    let axis = axis_of(axis, x.rank())?;
    check_elements(&Shape::known(x.shape()), &Shape::known(it.shape()), axis)?;
    let idx = indices_within(it, x.shape()[axis])?;
    Ok(map_tensor!(x, a => gather_elements_of(a, axis, &idx, it.shape())))
}

/// Combines an existing value `x` with an update `y`.
fn combine<T: Elem>(r: Reduction, x: T, y: T) -> T {
    let arith = |f: fn(f64, f64) -> f64, g: fn(i64, i64) -> i64| {
        if T::DTYPE.is_float() {
            T::from_f64(f(x.to_f64(), y.to_f64()))
        } else {
            T::from_i64(g(x.to_i64(), y.to_i64()))
        }
    };
    // NaN propagates like numpy's maximum/minimum.
    let pick = |want: Ordering| match x.partial_cmp(&y) {
        None if x.partial_cmp(&x).is_none() => x,
        None => y,
        Some(o) if o == want => y,
        Some(_) => x,
    };
    match r {
        Reduction::None => y,
        Reduction::Add => arith(|a, b| a + b, i64::wrapping_add),
        Reduction::Mul => arith(|a, b| a * b, i64::wrapping_mul),
        Reduction::Max => pick(Ordering::Less),
        Reduction::Min => pick(Ordering::Greater),
    }
}

/// Shape inference of `ScatterElements`.
pub(super) fn infer_scatter_elements(axis: i64, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let (x, idx, upd) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
    check_indices(idx.dtype)?;
    check_same_dtype(upd, x.dtype, "input 2 (updates)")?;
    let axis = axis_of(axis, x.shape.rank())?;
    check_elements(&x.shape, &idx.shape, axis)?;
    check_update_shape(&idx.shape, &upd.shape)?;
    Ok(vec![Fact::new(x.dtype, x.shape.clone())])
}

fn check_update_shape(want: &Shape, upd: &Shape) -> OpResult<()> {
    let ok = want.rank() == upd.rank()
        && want
            .dims()
            .iter()
            .zip(upd.dims())
            .all(|(a, b)| a.compatible(b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "input 2 (updates): shape {upd} does not match the expected {want}"
        ))
    }
}

fn scatter_elements_of<T: Elem>(
    a: &ArrayD<T>,
    upd: &Tensor,
    axis: usize,
    idx: &[usize],
    r: Reduction,
) -> OpResult<ArrayD<T>> {
    let upd = same::<T>(upd, "input 2 (updates)")?;
    let mut out = standard(a.clone());
    let mut dst = vec![0usize; a.ndim()];
    let st = strides_of(upd.shape());
    for (p, &y) in upd.indexed_iter() {
        let p = p.slice();
        dst.copy_from_slice(p);
        dst[axis] = idx[linear(p, &st)];
        let x = &mut out[&dst[..]];
        *x = combine(r, *x, y);
    }
    Ok(out)
}

/// `ScatterElements`.
pub(super) fn scatter_elements(
    axis: i64,
    r: Reduction,
    inputs: &[Option<&Tensor>],
) -> OpResult<Tensor> {
    let (x, it, upd) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
    let axis = axis_of(axis, x.rank())?;
    let idx_shape = Shape::known(it.shape());
    check_elements(&Shape::known(x.shape()), &idx_shape, axis)?;
    check_update_shape(&idx_shape, &Shape::known(upd.shape()))?;
    let idx = indices_within(it, x.shape()[axis])?;
    Ok(map_tensor!(x, a => scatter_elements_of(a, upd, axis, &idx, r)?))
}

// ----- GatherND / ScatterND --------------------------------------------------------------

/// The index tuples of an ND gather/scatter, each normalised against the data dims starting
/// at `first`, flattened.
fn nd_tuples(t: &Tensor, data: &[usize], first: usize) -> OpResult<Vec<usize>> {
    check_indices(t.dtype())?;
    let k = t.shape().last().copied().unwrap_or(0);
    let v = t.to_i64_vec();
    v.iter()
        .enumerate()
        .map(|(n, &i)| norm_index(i, data[first + n % k], INDICES))
        .collect()
}

/// Output dims of `GatherND`, checking ranks and batch dims.
fn gather_nd_dims(data: &Shape, idx: &Shape, b: usize) -> OpResult<Shape> {
    let (r, q) = (data.rank(), idx.rank());
    if q == 0 || b >= q.min(r) {
        return Err(format!(
            "batch_dims {b} must be less than the ranks of data ({r}) and indices ({q})"
        ));
    }
    let Some(k) = idx.dim(q - 1).known() else {
        return Ok(Shape::unknown(0));
    };
    if k > r - b {
        return Err(format!(
            "{INDICES}: tuples of {k} indices for {} data dims",
            r - b
        ));
    }
    for i in 0..b {
        if !data.dim(i).compatible(idx.dim(i)) {
            return Err(format!("{INDICES}: batch dim {i} differs from the data's"));
        }
    }
    Ok(Shape(
        [&idx.dims()[..q - 1], &data.dims()[b + k..]].concat(),
    ))
}

/// Shape inference of `GatherND`.
pub(super) fn infer_gather_nd(b: usize, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let (x, idx) = (req(inputs, 0)?, req(inputs, 1)?);
    check_indices(idx.dtype)?;
    let out = gather_nd_dims(&x.shape, &idx.shape, b)?;
    if out.rank() == 0 && idx.shape.dim(idx.shape.rank() - 1).known().is_none() {
        return Err(format!(
            "{INDICES}: the tuple length (last dim) must be known statically"
        ));
    }
    Ok(vec![Fact::new(x.dtype, out)])
}

fn gather_nd_of<T: Elem>(
    a: &ArrayD<T>,
    b: usize,
    tuples: &[usize],
    idx_shape: &[usize],
    out: &[usize],
) -> ArrayD<T> {
    let q = idx_shape.len();
    let k = idx_shape[q - 1];
    let st = strides_of(&idx_shape[..q - 1]);
    let mut src = vec![0usize; a.ndim()];
    ArrayD::from_shape_fn(IxDyn(out), |o| {
        let o = o.slice();
        let t = linear(&o[..q - 1], &st) * k;
        src[..b].copy_from_slice(&o[..b]);
        src[b..b + k].copy_from_slice(&tuples[t..t + k]);
        src[b + k..].copy_from_slice(&o[q - 1..]);
        a[&src[..]]
    })
}

/// `GatherND`.
pub(super) fn gather_nd(b: usize, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let (x, it) = (req(inputs, 0)?, req(inputs, 1)?);
    let out = gather_nd_dims(&Shape::known(x.shape()), &Shape::known(it.shape()), b)?;
    let out = out.as_known().ok_or("internal: GatherND shape")?;
    let tuples = nd_tuples(it, x.shape(), b)?;
    Ok(map_tensor!(x, a => gather_nd_of(a, b, &tuples, it.shape(), &out)))
}

/// The expected `updates` shape of `ScatterND`.
fn scatter_nd_updates(data: &Shape, idx: &Shape) -> OpResult<Option<Shape>> {
    let q = idx.rank();
    if q == 0 {
        return Err(format!("{INDICES}: expected rank >= 1"));
    }
    let Some(k) = idx.dim(q - 1).known() else {
        return Ok(None);
    };
    if k > data.rank() {
        return Err(format!(
            "{INDICES}: tuples of {k} indices for {} data dims",
            data.rank()
        ));
    }
    Ok(Some(Shape(
        [&idx.dims()[..q - 1], &data.dims()[k..]].concat(),
    )))
}

/// Shape inference of `ScatterND`.
pub(super) fn infer_scatter_nd(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let (x, idx, upd) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
    check_indices(idx.dtype)?;
    check_same_dtype(upd, x.dtype, "input 2 (updates)")?;
    if let Some(want) = scatter_nd_updates(&x.shape, &idx.shape)? {
        check_update_shape(&want, &upd.shape)?;
    }
    Ok(vec![Fact::new(x.dtype, x.shape.clone())])
}

fn scatter_nd_of<T: Elem>(
    a: &ArrayD<T>,
    upd: &Tensor,
    tuples: &[usize],
    k: usize,
    r: Reduction,
) -> OpResult<ArrayD<T>> {
    let upd = same::<T>(upd, "input 2 (updates)")?;
    let shape = a.shape().to_vec();
    let mut out: Vec<T> = a.iter().copied().collect();
    let st = strides_of(&shape);
    let block: usize = shape[k..].iter().product();
    let upd: Vec<T> = upd.iter().copied().collect();
    for (n, t) in tuples
        .chunks(k.max(1))
        .enumerate()
        .take(upd.len() / block.max(1))
    {
        let base = if k == 0 { 0 } else { linear(t, &st) };
        for e in 0..block {
            out[base + e] = combine(r, out[base + e], upd[n * block + e]);
        }
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| format!("internal: {e}"))
}

/// `ScatterND`.
pub(super) fn scatter_nd(r: Reduction, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let (x, it, upd) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
    let want = scatter_nd_updates(&Shape::known(x.shape()), &Shape::known(it.shape()))?
        .ok_or("internal: ScatterND shape")?;
    check_update_shape(&want, &Shape::known(upd.shape()))?;
    let k = it.shape()[it.rank() - 1];
    if k == 0 {
        return Err(format!("{INDICES}: empty index tuples"));
    }
    let tuples = nd_tuples(it, x.shape(), 0)?;
    Ok(map_tensor!(x, a => scatter_nd_of(a, upd, &tuples, k, r)?))
}

// ----- OneHot / NonZero ------------------------------------------------------------------

/// The position of the new axis of `OneHot` for indices of rank `rank`.
fn one_hot_axis(axis: i64, rank: usize) -> OpResult<usize> {
    crate::shape::norm_axis(axis, rank + 1).map_err(|e| format!("attribute 'axis': {e}"))
}

/// Shape inference of `OneHot`.
pub(super) fn infer_one_hot(axis: i64, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let (idx, depth, values) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
    check_numeric(idx.dtype, depth.dtype)?;
    if values.shape.numel().is_some_and(|n| n != 2) {
        return Err(format!(
            "input 2 (values): expected 2 elements, found shape {}",
            values.shape
        ));
    }
    let axis = one_hot_axis(axis, idx.shape.rank())?;
    let d = match depth.value() {
        Some(t) => Dim::Known(depth_of(t)?),
        None => Dim::unknown(),
    };
    let mut dims = idx.shape.dims().to_vec();
    dims.insert(axis, d);
    Ok(vec![Fact::new(values.dtype, Shape(dims))])
}

/// `OneHot` indices and depth must be numeric.
fn check_numeric(idx: DType, depth: DType) -> OpResult<()> {
    for (d, what) in [(idx, "input 0 (indices)"), (depth, "input 1 (depth)")] {
        if d == DType::Bool {
            return Err(format!("{what}: expected a numeric tensor, found bool"));
        }
    }
    Ok(())
}

fn depth_of(t: &Tensor) -> OpResult<usize> {
    let what = "input 1 (depth)";
    let d = t
        .scalar_f64()
        .ok_or_else(|| format!("{what}: expected a scalar, found shape {:?}", t.shape()))?;
    if !(0.0..=(i32::MAX as f64)).contains(&d) {
        return Err(format!("{what}: invalid depth {d}"));
    }
    Ok(d as usize)
}

fn one_hot_of<T: Elem>(
    values: &ArrayD<T>,
    idx: &[i64],
    idx_shape: &[usize],
    depth: usize,
    axis: usize,
) -> OpResult<ArrayD<T>> {
    let &[off, on] = values.iter().copied().collect::<Vec<T>>().as_slice() else {
        return Err(format!(
            "input 2 (values): expected 2 elements, found shape {:?}",
            values.shape()
        ));
    };
    let mut out_shape = idx_shape.to_vec();
    out_shape.insert(axis, depth);
    super::check_size(&out_shape, "input 1 (depth)")?;
    let st = strides_of(idx_shape);
    let mut pos = vec![0usize; idx_shape.len()];
    Ok(ArrayD::from_shape_fn(IxDyn(&out_shape), |o| {
        let o = o.slice();
        pos[..axis].copy_from_slice(&o[..axis]);
        pos[axis..].copy_from_slice(&o[axis + 1..]);
        let i = idx[linear(&pos, &st)];
        let i = if i < 0 { i + depth as i64 } else { i };
        if i == o[axis] as i64 {
            on
        } else {
            off
        }
    }))
}

/// `OneHot` (negative indices count from `depth`; out-of-range ones give all `off`).
pub(super) fn one_hot(axis: i64, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let (it, depth, values) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
    check_numeric(it.dtype(), depth.dtype())?;
    let axis = one_hot_axis(axis, it.rank())?;
    let depth = depth_of(depth)?;
    let idx = it.to_i64_vec();
    Ok(map_tensor!(values, v => one_hot_of(v, &idx, it.shape(), depth, axis)?))
}

/// Shape inference of `NonZero`: `[rank, ?]`.
pub(super) fn infer_non_zero(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let rank = x.shape.rank().max(1);
    Ok(vec![Fact::new(
        DType::I64,
        Shape(vec![Dim::Known(rank), Dim::unknown()]),
    )])
}

fn non_zero_of<T: Elem>(a: &ArrayD<T>) -> Tensor {
    let rank = a.ndim().max(1);
    let coords: Vec<Vec<usize>> = a
        .indexed_iter()
        .filter(|(_, &v)| v != T::default())
        .map(|(i, _)| {
            if i.ndim() == 0 {
                vec![0]
            } else {
                i.slice().to_vec()
            }
        })
        .collect();
    let n = coords.len();
    let data = (0..rank)
        .flat_map(|d| coords.iter().map(move |c| c[d] as i64))
        .collect();
    Tensor::from_vec(&[rank, n], data)
}

/// `NonZero` (a scalar counts as a 1-element vector, like numpy).
pub(super) fn non_zero(inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    Ok(with_tensor!(x, a => non_zero_of(a)))
}
