//! Ops that cut, join or border tensors: `Concat`, `Split`, `Slice`, `Pad`, `Trilu`.

use super::{
    axis_of, check_same_dtype, norm_axes, owned, same, standard, take_outer, to_usize, IntsArg,
    Known, PadMode,
};
use crate::map_tensor;
use crate::ops::{opt, req, Fact, OpResult};
use crate::shape::{Dim, Shape};
use crate::tensor::{Elem, Tensor};
use ndarray::{ArrayD, ArrayViewD, Axis};

// ----- Concat ----------------------------------------------------------------------------

/// Shape inference of `Concat`.
pub(super) fn infer_concat(axis: i64, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let first = req(inputs, 0)?;
    let rank = first.shape.rank();
    if rank == 0 {
        return Err("input 0: Concat needs tensors of rank >= 1".into());
    }
    let axis = axis_of(axis, rank)?;
    let mut dims = first.shape.dims().to_vec();
    for i in 1..inputs.len() {
        let f = req(inputs, i)?;
        let what = format!("input {i}");
        check_same_dtype(f, first.dtype, &what)?;
        if f.shape.rank() != rank {
            return Err(format!(
                "{what}: rank {} != rank {rank} of input 0",
                f.shape.rank()
            ));
        }
        for (d, (o, n)) in dims.iter_mut().zip(f.shape.dims()).enumerate() {
            if d == axis {
                *o = match (o.known(), n.known()) {
                    (Some(a), Some(b)) => a.checked_add(b).map_or_else(Dim::unknown, Dim::Known),
                    (Some(0), None) => n.clone(),
                    (None, Some(0)) => o.clone(),
                    _ => Dim::unknown(),
                };
            } else if !o.compatible(n) {
                return Err(format!(
                    "{what}: shape {} does not match {} off axis {axis}",
                    f.shape, first.shape
                ));
            } else if o.known().is_none() && n.known().is_some() {
                *o = n.clone();
            }
        }
    }
    Ok(vec![Fact::new(first.dtype, Shape(dims))])
}

fn concat_of<T: Elem>(
    _like: &ArrayD<T>,
    axis: usize,
    inputs: &[Option<&Tensor>],
) -> OpResult<ArrayD<T>> {
    let views = (0..inputs.len())
        .map(|i| Ok(same::<T>(req(inputs, i)?, &format!("input {i}"))?.view()))
        .collect::<OpResult<Vec<ArrayViewD<'_, T>>>>()?;
    let shapes: Vec<&[usize]> = views.iter().map(|v| v.shape()).collect();
    let off_axis = |s: &[usize]| [&s[..axis.min(s.len())], &s[(axis + 1).min(s.len())..]].concat();
    let bad = |s: &&[usize]| s.len() != shapes[0].len() || off_axis(s) != off_axis(shapes[0]);
    if shapes.iter().any(bad) {
        return Err(format!(
            "cannot concatenate shapes {shapes:?} along axis {axis}"
        ));
    }
    // Contiguous inputs (the usual case): each is `outer` runs of `len / outer` elements,
    // copied in turn (ndarray's general concatenate walks element by element, which made
    // folding concatenated weights the bulk of the e-graph search time).
    let outer: usize = shapes[0][..axis].iter().product();
    let slices: Option<Vec<&[T]>> = views.iter().map(|v| v.as_slice()).collect();
    if let (Some(slices), true) = (slices, outer > 0) {
        let mut dims = shapes[0].to_vec();
        dims[axis] = shapes.iter().map(|s| s[axis]).sum();
        let mut out = Vec::with_capacity(dims.iter().product());
        for o in 0..outer {
            for s in &slices {
                let run = s.len() / outer;
                out.extend_from_slice(&s[o * run..(o + 1) * run]);
            }
        }
        return ArrayD::from_shape_vec(dims, out).map_err(|e| e.to_string());
    }
    ndarray::concatenate(Axis(axis), &views)
        .map_err(|e| format!("cannot concatenate shapes {shapes:?} along axis {axis}: {e}"))
}

/// `Concat`.
pub(super) fn concat(axis: i64, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let first = req(inputs, 0)?;
    if first.rank() == 0 {
        return Err("input 0: Concat needs tensors of rank >= 1".into());
    }
    let axis = axis_of(axis, first.rank())?;
    Ok(map_tensor!(first, a => concat_of(a, axis, inputs)?))
}

// ----- Split -----------------------------------------------------------------------------

const SPLIT: &str = "split";

/// The part sizes of `Split` along an axis of size `dim`.
fn split_sizes(dim: usize, split: Option<Vec<i64>>, outputs: usize) -> OpResult<Vec<usize>> {
    let Some(split) = split else {
        // chunks of ceil(dim / outputs); the last ones get what is left (possibly nothing),
        // like the ONNX reference implementation.
        let part = dim.div_ceil(outputs);
        return Ok((0..outputs)
            .map(|i| dim.saturating_sub(i * part).min(part))
            .collect());
    };
    if split.len() != outputs {
        return Err(format!(
            "{SPLIT}: {} sizes for {outputs} outputs",
            split.len()
        ));
    }
    let parts = split
        .iter()
        .map(|&s| to_usize(s, SPLIT))
        .collect::<OpResult<Vec<_>>>()?;
    if parts.iter().try_fold(0usize, |a, &p| a.checked_add(p)) != Some(dim) {
        return Err(format!(
            "{SPLIT}: sizes {split:?} do not add up to the dim {dim}"
        ));
    }
    Ok(parts)
}

/// Shape inference of `Split`.
pub(super) fn infer_split(
    axis: i64,
    split: &IntsArg,
    outputs: usize,
    inputs: &[Option<&Fact>],
) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let axis = axis_of(axis, x.shape.rank())?;
    let dim = x.shape.dim(axis);
    let parts: Vec<Dim> = match (split.infer(inputs, SPLIT)?, dim.known()) {
        (Known::Value(v), Some(d)) => split_sizes(d, Some(v), outputs)?
            .into_iter()
            .map(Dim::Known)
            .collect(),
        (Known::Value(v), None) => {
            let sizes = v
                .iter()
                .map(|&s| to_usize(s, SPLIT))
                .collect::<OpResult<Vec<_>>>()?;
            if sizes.len() != outputs {
                return Err(format!(
                    "{SPLIT}: {} sizes for {outputs} outputs",
                    sizes.len()
                ));
            }
            sizes.into_iter().map(Dim::Known).collect()
        }
        (Known::Absent, Some(d)) => split_sizes(d, None, outputs)?
            .into_iter()
            .map(Dim::Known)
            .collect(),
        (Known::Absent, None) if outputs == 1 => vec![dim.clone()],
        _ => vec![Dim::unknown(); outputs],
    };
    Ok(parts
        .into_iter()
        .map(|p| {
            let mut s = x.shape.clone();
            s.0[axis] = p;
            Fact::new(x.dtype, s)
        })
        .collect())
}

/// `Split`.
pub(super) fn split(
    axis: i64,
    split: &IntsArg,
    outputs: usize,
    inputs: &[Option<&Tensor>],
) -> OpResult<Vec<Tensor>> {
    let x = req(inputs, 0)?;
    let axis = axis_of(axis, x.rank())?;
    let parts = split_sizes(x.shape()[axis], split.eval(inputs, SPLIT)?, outputs)?;
    let mut start = 0;
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let range = ndarray::Slice::from(start..start + p);
        out.push(map_tensor!(x, a => owned(a.slice_axis(Axis(axis), range))));
        start += p;
    }
    Ok(out)
}

// ----- Slice -----------------------------------------------------------------------------

/// The per-axis parameters of `Slice` after defaults: `(axis, start, end, step)`.
type SliceAxes = Vec<(usize, i64, i64, i64)>;

/// Combines starts/ends/axes/steps, checking lengths, axes and steps.
fn slice_axes(rank: usize, lists: [Option<Vec<i64>>; 4]) -> OpResult<SliceAxes> {
    let [starts, ends, axes, steps] = lists;
    let starts = starts.ok_or("starts are required")?;
    let ends = ends.ok_or("ends are required")?;
    let n = starts.len();
    let axes = axes.unwrap_or_else(|| (0..n as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; n]);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return Err(format!(
            "starts, ends, axes and steps have lengths {n}, {}, {}, {}",
            ends.len(),
            axes.len(),
            steps.len()
        ));
    }
    let axes = norm_axes(&axes, rank, "axes")?;
    if steps.contains(&0) {
        return Err("steps: a step must not be 0".into());
    }
    Ok((0..n)
        .map(|i| (axes[i], starts[i], ends[i], steps[i]))
        .collect())
}

/// The first index and the length of a slice of a dim of size `dim` (ONNX clamping rules).
fn clamp_slice(dim: usize, start: i64, end: i64, step: i64) -> (i64, usize) {
    let d = dim as i64;
    let wrap = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let (s, e) = (wrap(start), wrap(end));
    let (s, e) = if step > 0 {
        (s.max(0).min(d), e.max(0).min(d))
    } else {
        (s.max(0).min(d - 1), e.max(-1).min(d - 1))
    };
    let (span, step) = (
        (e as i128 - s as i128) * step.signum() as i128,
        (step as i128).abs(),
    );
    let len = if span > 0 {
        (span + step - 1) / step
    } else {
        0
    };
    (s, len as usize)
}

/// Resolves the four lists of `Slice` statically; `None` when some value is unknown.
fn infer_lists(
    args: [&IntsArg; 4],
    inputs: &[Option<&Fact>],
) -> OpResult<Option<[Option<Vec<i64>>; 4]>> {
    let names = ["starts", "ends", "axes", "steps"];
    let mut out: [Option<Vec<i64>>; 4] = Default::default();
    let mut complete = true;
    for i in 0..4 {
        match args[i].infer(inputs, names[i])? {
            Known::Value(v) => out[i] = Some(v),
            Known::Absent => {}
            Known::Unknown => complete = false,
        }
    }
    Ok(complete.then_some(out))
}

/// See [`super::ArrayOp::slice_window`].
pub(super) fn slice_window(
    args: [&IntsArg; 4],
    inputs: &[Option<&Fact>],
) -> Option<Vec<(usize, usize, i64)>> {
    let x = inputs.first().copied().flatten()?;
    let dims = x.shape.as_known()?;
    let lists = infer_lists(args, inputs).ok()??;
    let mut window: Vec<(usize, usize, i64)> = dims.iter().map(|&d| (0, d, 1)).collect();
    for (axis, start, end, step) in slice_axes(dims.len(), lists).ok()? {
        let (first, len) = clamp_slice(dims[axis], start, end, step);
        window[axis] = (usize::try_from(first).ok()?, len, step);
    }
    Some(window)
}

/// Shape inference of `Slice`.
pub(super) fn infer_slice(args: [&IntsArg; 4], inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let Some(lists) = infer_lists(args, inputs)? else {
        // which axes are sliced is unknown: only the rank is.
        return Ok(vec![Fact::new(x.dtype, Shape::unknown(x.shape.rank()))]);
    };
    let mut dims = x.shape.dims().to_vec();
    for (axis, start, end, step) in slice_axes(x.shape.rank(), lists)? {
        dims[axis] = match &dims[axis] {
            Dim::Known(d) => Dim::Known(clamp_slice(*d, start, end, step).1),
            // the whole axis: exporters write [0:INT_MAX].
            d if start == 0 && step == 1 && end >= i32::MAX as i64 => d.clone(),
            _ => Dim::unknown(),
        };
    }
    Ok(vec![Fact::new(x.dtype, Shape(dims))])
}

/// `Slice`.
pub(super) fn slice(args: [&IntsArg; 4], inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let names = ["starts", "ends", "axes", "steps"];
    let mut lists: [Option<Vec<i64>>; 4] = Default::default();
    for i in 0..4 {
        lists[i] = args[i].eval(inputs, names[i])?;
    }
    let mut maps: Vec<Vec<Option<usize>>> = x
        .shape()
        .iter()
        .map(|&d| (0..d).map(Some).collect())
        .collect();
    for (axis, start, end, step) in slice_axes(x.rank(), lists)? {
        let (s, len) = clamp_slice(x.shape()[axis], start, end, step);
        maps[axis] = (0..len as i64)
            .map(|i| Some((s + i * step) as usize))
            .collect();
    }
    Ok(map_tensor!(x, a => take_outer(a, &maps, Default::default())))
}

// ----- Pad -------------------------------------------------------------------------------

const PADS: &str = "pads";

/// `(begin, end)` pads for every axis, from the pads list and the optional axes.
fn pads_per_axis(rank: usize, pads: &[i64], axes: Option<Vec<i64>>) -> OpResult<Vec<(i64, i64)>> {
    let axes = match axes {
        Some(a) => norm_axes(&a, rank, "input 3 (axes)")?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(format!(
            "{PADS}: {} values for {} axes (expected twice as many)",
            pads.len(),
            axes.len()
        ));
    }
    let mut out = vec![(0, 0); rank];
    for (i, &a) in axes.iter().enumerate() {
        out[a] = (pads[i], pads[axes.len() + i]);
    }
    Ok(out)
}

/// The padded size of a dim, checking that negative pads do not crop more than it has.
fn padded_dim(dim: usize, (b, e): (i64, i64)) -> OpResult<usize> {
    let n = dim as i128 + b as i128 + e as i128;
    let crop = (-(b as i128)).max(0) + (-(e as i128)).max(0);
    if n < 0 || crop > dim as i128 {
        return Err(format!("{PADS}: ({b}, {e}) crop more than the dim {dim}"));
    }
    usize::try_from(n).map_err(|_| format!("{PADS}: ({b}, {e}) are too large"))
}

/// Source index (or `None` for the fill value) of each output position along one axis.
fn pad_map(dim: usize, (b, e): (i64, i64), mode: PadMode) -> OpResult<Vec<Option<usize>>> {
    let out = padded_dim(dim, (b, e))?;
    let crop = (-b).max(0);
    let m = dim as i64 - crop - (-e).max(0);
    let before = b.max(0);
    if m == 0 && out > 0 && mode != PadMode::Constant {
        return Err(format!("{PADS}: cannot pad an empty axis in {mode:?} mode"));
    }
    let at = |o: usize| {
        let i = o as i64 - before;
        let j = match mode {
            PadMode::Constant => (0..m).contains(&i).then_some(i),
            PadMode::Edge => Some(i.clamp(0, m - 1)),
            PadMode::Wrap => Some(i.rem_euclid(m)),
            PadMode::Reflect if m == 1 => Some(0),
            PadMode::Reflect => {
                let period = 2 * (m - 1);
                let k = i.rem_euclid(period);
                Some(if k >= m { period - k } else { k })
            }
        };
        j.map(|j| (j + crop) as usize)
    };
    Ok((0..out).map(at).collect())
}

/// Shape inference of `Pad`.
pub(super) fn infer_pad(
    pads: &IntsArg,
    axes: &IntsArg,
    inputs: &[Option<&Fact>],
) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let rank = x.shape.rank();
    if let Some(v) = opt(inputs, 2) {
        check_same_dtype(v, x.dtype, "input 2 (constant_value)")?;
    }
    let axes = match axes.infer(inputs, "input 3 (axes)")? {
        Known::Value(a) => Some(a),
        Known::Absent => None,
        Known::Unknown => return Ok(vec![Fact::new(x.dtype, Shape::unknown(rank))]),
    };
    let pads = match pads.infer(inputs, PADS)? {
        Known::Value(p) => p,
        Known::Absent => return Err(format!("{PADS} are required but missing")),
        Known::Unknown => return Ok(vec![Fact::new(x.dtype, Shape::unknown(rank))]),
    };
    let per_axis = pads_per_axis(rank, &pads, axes)?;
    let dims = x.shape.dims().iter().zip(per_axis).map(|(d, p)| match d {
        Dim::Known(d) => padded_dim(*d, p).map(Dim::Known),
        d if p == (0, 0) => Ok(d.clone()),
        _ => Ok(Dim::unknown()),
    });
    Ok(vec![Fact::new(
        x.dtype,
        Shape(dims.collect::<OpResult<_>>()?),
    )])
}

/// The fill value of constant-mode `Pad`: input 2 when present, else the attribute.
fn pad_fill<T: Elem>(attr: f32, input: Option<&Tensor>) -> OpResult<T> {
    let Some(t) = input else {
        return Ok(T::from_f64(attr as f64));
    };
    let a = same::<T>(t, "input 2 (constant_value)")?;
    if a.len() > 1 {
        return Err(format!(
            "input 2 (constant_value): expected a scalar, found shape {:?}",
            a.shape()
        ));
    }
    Ok(a.iter().next().copied().unwrap_or_default())
}

/// `Pad`.
pub(super) fn pad(
    mode: PadMode,
    pads: &IntsArg,
    value: f32,
    axes: &IntsArg,
    inputs: &[Option<&Tensor>],
) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let p = pads
        .eval(inputs, PADS)?
        .ok_or_else(|| format!("{PADS} are required but missing"))?;
    let per_axis = pads_per_axis(x.rank(), &p, axes.eval(inputs, "input 3 (axes)")?)?;
    let out = x
        .shape()
        .iter()
        .zip(&per_axis)
        .map(|(&d, &p)| padded_dim(d, p))
        .collect::<OpResult<Vec<_>>>()?;
    super::check_size(&out, PADS)?;
    let maps = x
        .shape()
        .iter()
        .zip(per_axis)
        .map(|(&d, p)| pad_map(d, p, mode))
        .collect::<OpResult<Vec<_>>>()?;
    Ok(map_tensor!(x, a => take_outer(a, &maps, pad_fill(value, opt(inputs, 2))?)))
}

// ----- Trilu -----------------------------------------------------------------------------

/// Shape inference of `Trilu`.
pub(super) fn infer_trilu(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    if x.shape.rank() < 2 {
        return Err(format!(
            "input 0: expected rank >= 2, found shape {}",
            x.shape
        ));
    }
    if let Some(k) = opt(inputs, 1) {
        super::check_int(k.dtype, "input 1 (k)")?;
    }
    Ok(vec![Fact::new(x.dtype, x.shape.clone())])
}

fn trilu_of<T: Elem>(a: &ArrayD<T>, upper: bool, k: i64) -> ArrayD<T> {
    let mut out = standard(a.clone());
    let r = out.ndim();
    for (idx, v) in out.indexed_iter_mut() {
        let diag = idx[r - 1] as i64 - idx[r - 2] as i64;
        if (upper && diag < k) || (!upper && diag > k) {
            *v = T::default();
        }
    }
    out
}

/// `Trilu`.
pub(super) fn trilu(upper: bool, inputs: &[Option<&Tensor>]) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    if x.rank() < 2 {
        return Err(format!(
            "input 0: expected rank >= 2, found shape {:?}",
            x.shape()
        ));
    }
    let k = match opt(inputs, 1) {
        None => 0,
        Some(t) => match super::int_values(t, "input 1 (k)")?[..] {
            [k] => k,
            _ => {
                return Err(format!(
                    "input 1 (k): expected a scalar, found shape {:?}",
                    t.shape()
                ))
            }
        },
    };
    Ok(map_tensor!(x, a => trilu_of(a, upper, k)))
}
