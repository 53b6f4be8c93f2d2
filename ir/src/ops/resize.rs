//! `Resize` (all opsets) and the deprecated `Upsample`, following
//! `onnx/reference/ops/op_resize.py`: interpolation is separable, so the input is resized one
//! axis at a time in f64 with per-output-position coefficients (nearest, linear, cubic, with
//! optional antialiasing), then cast back with saturation (integers round half to even).

use super::{opt, req, Fact, OnnxNode, OpFamily, OpResult};
use crate::dtype::DType;
use crate::shape::{norm_axis, Dim, Shape};
use crate::tensor::Tensor;
use ndarray::{ArrayD, Axis};

/// Interpolation mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResizeMode {
    /// Nearest neighbour (see [`NearestMode`]).
    Nearest,
    /// (Multi-)linear.
    Linear,
    /// Cubic with coefficient `cubic_coeff_a`.
    Cubic,
}

/// How an output coordinate maps to an input coordinate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CoordMode {
    /// `(y + 0.5) / scale - 0.5`.
    HalfPixel,
    /// Like half_pixel, centred when the output size was rounded.
    HalfPixelSymmetric,
    /// Like half_pixel, but `-0.5` when the output length is 1.
    PytorchHalfPixel,
    /// `y * (in - 1) / (out - 1)`.
    AlignCorners,
    /// `y / scale`.
    Asymmetric,
    /// Crop the region of interest `roi` then resize; outside points take
    /// `extrapolation_value`.
    TfCropAndResize,
    /// `(y + 0.5) / scale` (opset 11 only).
    TfHalfPixelForNn,
}

/// Rounding of the source coordinate in nearest mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NearestMode {
    /// Round, halves down.
    RoundPreferFloor,
    /// Round, halves up.
    RoundPreferCeil,
    /// Floor.
    Floor,
    /// Ceil.
    Ceil,
}

/// How `sizes` is honoured when resizing several axes (opset 18+).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AspectPolicy {
    /// Each axis gets its own size.
    Stretch,
    /// One common scale, the largest for which no axis exceeds its size.
    NotLarger,
    /// One common scale, the smallest for which no axis is below its size.
    NotSmaller,
}

/// Attributes of `Resize` (and `Upsample`, which uses a subset).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResizeAttrs {
    /// Interpolation mode.
    pub mode: ResizeMode,
    /// Coordinate transformation.
    pub coord: CoordMode,
    /// Rounding in nearest mode.
    pub nearest: NearestMode,
    /// Cubic coefficient `A`.
    pub cubic_coeff_a: f32,
    /// Drop (and renormalise away) the weights of points outside the input.
    pub exclude_outside: bool,
    /// Value of points outside the input in tf_crop_and_resize mode.
    pub extrapolation_value: f32,
    /// Antialiasing filter when downsampling (linear/cubic).
    pub antialias: bool,
    /// The axes that `roi`/`scales`/`sizes` refer to (`None`: all axes).
    pub axes: Option<Vec<i64>>,
    /// Aspect ratio policy for `sizes`.
    pub keep_aspect_ratio_policy: AspectPolicy,
}

/// Where the scales/sizes come from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ResizeInputs {
    /// Opset 11+: inputs `X, roi, scales, sizes`.
    Full,
    /// Resize-10 and Upsample-9: inputs `X, scales`.
    Scales,
    /// Upsample-7: the `scales` attribute.
    ScalesAttr(Vec<f32>),
}

/// Ops of the resize family.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ResizeOp {
    /// `Resize`.
    Resize(ResizeAttrs, ResizeInputs),
    /// `Upsample` (deprecated; same as Resize-10 with asymmetric coordinates).
    Upsample(ResizeAttrs, ResizeInputs),
}

fn parse_enum<T: Copy>(
    node: &OnnxNode,
    name: &str,
    default: &str,
    table: &[(&str, T)],
) -> OpResult<T> {
    let v = node.string_or(name, default)?;
    table
        .iter()
        .find(|(s, _)| *s == v)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = table.iter().map(|(s, _)| *s).collect();
            format!("attribute '{name}': '{v}' is not one of {names:?}")
        })
}

fn flag(node: &OnnxNode, name: &str) -> OpResult<bool> {
    match node.int_or(name, 0)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("attribute '{name}': expected 0 or 1, found {v}")),
    }
}

/// Attributes of the legacy forms (Resize-10, Upsample): asymmetric coordinates, nearest
/// rounds down.
fn legacy_attrs(node: &OnnxNode) -> OpResult<ResizeAttrs> {
    let mode = parse_enum(
        node,
        "mode",
        "nearest",
        &[
            ("nearest", ResizeMode::Nearest),
            ("linear", ResizeMode::Linear),
            ("bilinear", ResizeMode::Linear),
        ],
    )?;
    Ok(ResizeAttrs {
        mode,
        coord: CoordMode::Asymmetric,
        nearest: NearestMode::Floor,
        cubic_coeff_a: -0.75,
        exclude_outside: false,
        extrapolation_value: 0.0,
        antialias: false,
        axes: None,
        keep_aspect_ratio_policy: AspectPolicy::Stretch,
    })
}

fn full_attrs(node: &OnnxNode) -> OpResult<ResizeAttrs> {
    let mut coords = vec![
        ("half_pixel", CoordMode::HalfPixel),
        ("pytorch_half_pixel", CoordMode::PytorchHalfPixel),
        ("align_corners", CoordMode::AlignCorners),
        ("asymmetric", CoordMode::Asymmetric),
        ("tf_crop_and_resize", CoordMode::TfCropAndResize),
    ];
    if node.opset < 13 {
        coords.push(("tf_half_pixel_for_nn", CoordMode::TfHalfPixelForNn));
    }
    if node.opset >= 18 {
        coords.push(("half_pixel_symmetric", CoordMode::HalfPixelSymmetric));
    }
    let attrs = ResizeAttrs {
        mode: parse_enum(
            node,
            "mode",
            "nearest",
            &[
                ("nearest", ResizeMode::Nearest),
                ("linear", ResizeMode::Linear),
                ("cubic", ResizeMode::Cubic),
            ],
        )?,
        coord: parse_enum(
            node,
            "coordinate_transformation_mode",
            "half_pixel",
            &coords,
        )?,
        nearest: parse_enum(
            node,
            "nearest_mode",
            "round_prefer_floor",
            &[
                ("round_prefer_floor", NearestMode::RoundPreferFloor),
                ("round_prefer_ceil", NearestMode::RoundPreferCeil),
                ("floor", NearestMode::Floor),
                ("ceil", NearestMode::Ceil),
            ],
        )?,
        cubic_coeff_a: node.float_or("cubic_coeff_a", -0.75)?,
        exclude_outside: flag(node, "exclude_outside")?,
        extrapolation_value: node.float_or("extrapolation_value", 0.0)?,
        antialias: flag(node, "antialias")?,
        axes: node.ints("axes")?,
        keep_aspect_ratio_policy: parse_enum(
            node,
            "keep_aspect_ratio_policy",
            "stretch",
            &[
                ("stretch", AspectPolicy::Stretch),
                ("not_larger", AspectPolicy::NotLarger),
                ("not_smaller", AspectPolicy::NotSmaller),
            ],
        )?,
    };
    if attrs.antialias && attrs.mode == ResizeMode::Nearest {
        return Err("attribute 'antialias': not supported with mode 'nearest'".into());
    }
    Ok(attrs)
}

fn check_arity(node: &OnnxNode, min: usize, max: usize) -> OpResult<()> {
    let n = node.num_inputs();
    if n < min || n > max || !node.has_input(0) {
        return Err(format!(
            "expected {min} to {max} inputs (input 0 present), found {n}"
        ));
    }
    if node.num_outputs > 1 {
        return Err(format!("expected 1 output, found {}", node.num_outputs));
    }
    Ok(())
}

impl OpFamily for ResizeOp {
    fn from_onnx(node: &OnnxNode) -> OpResult<Option<Self>> {
        let is_resize = match node.op_type.as_str() {
            "Resize" => true,
            "Upsample" => false,
            _ => return Ok(None),
        };
        let (attrs, inputs) = if is_resize && node.opset >= 11 {
            check_arity(node, 1, 4)?;
            if !node.has_input(2) && !node.has_input(3) {
                return Err("one of inputs 2 (scales) and 3 (sizes) is required".into());
            }
            (full_attrs(node)?, ResizeInputs::Full)
        } else if is_resize || node.opset >= 9 {
            check_arity(node, 2, 2)?;
            if !node.has_input(1) {
                return Err("input 1 (scales) is required".into());
            }
            (legacy_attrs(node)?, ResizeInputs::Scales)
        } else {
            check_arity(node, 1, 1)?;
            let scales = node
                .floats("scales")?
                .ok_or("required attribute 'scales' is missing")?;
            (legacy_attrs(node)?, ResizeInputs::ScalesAttr(scales))
        };
        Ok(Some(if is_resize {
            ResizeOp::Resize(attrs, inputs)
        } else {
            ResizeOp::Upsample(attrs, inputs)
        }))
    }

    fn op_type(&self) -> &'static str {
        match self {
            ResizeOp::Resize(..) => "Resize",
            ResizeOp::Upsample(..) => "Upsample",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        if x.dtype == DType::Bool {
            return Err("input 0: bool is not supported".into());
        }
        let (attrs, _) = self.parts();
        let rank = x.shape.rank();
        let axes = resolved_axes(attrs, rank)?;
        let mut known = true;
        let mut get = |i: usize, want_float: bool| -> OpResult<Option<Tensor>> {
            let Some(f) = opt(inputs, i) else {
                return Ok(None);
            };
            check_param_dtype(i, f.dtype, want_float)?;
            match f.value() {
                Some(v) => Ok((!v.is_empty()).then(|| v.clone())),
                None if f.shape.numel() == Some(0) => Ok(None),
                None => {
                    known = false;
                    Ok(None)
                }
            }
        };
        let params = self.params_with(&mut get)?;
        let in_dims = x.shape.as_known();
        let dims = match (known, in_dims) {
            (true, Some(d)) => Shape::known(&plan(attrs, &d, &axes, params)?.out),
            (true, None) if attrs.keep_aspect_ratio_policy == AspectPolicy::Stretch => {
                symbolic_out(&x.shape, &axes, &params)
            }
            _ => {
                let mut dims = x.shape.0.clone();
                for &a in &axes {
                    dims[a] = Dim::unknown();
                }
                Shape(dims)
            }
        };
        Ok(vec![Fact::new(x.dtype, dims)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        if x.dtype() == DType::Bool {
            return Err("input 0: bool is not supported".into());
        }
        let (attrs, _) = self.parts();
        let axes = resolved_axes(attrs, x.rank())?;
        let mut get = |i: usize, want_float: bool| -> OpResult<Option<Tensor>> {
            let Some(t) = opt(inputs, i) else {
                return Ok(None);
            };
            check_param_dtype(i, t.dtype(), want_float)?;
            Ok((!t.is_empty()).then(|| t.clone()))
        };
        let params = self.params_with(&mut get)?;
        let p = plan(attrs, x.shape(), &axes, params)?;
        let mut data = x.to_f64_array();
        for &a in &axes {
            let identity = (p.scales[a] - 1.0).abs() <= 1e-9
                && p.out[a] == data.shape()[a]
                && p.roi
                    .as_ref()
                    .is_none_or(|r| r[a].abs() <= 1e-9 && (r[a + x.rank()] - 1.0).abs() <= 1e-9);
            if !identity {
                data = resize_axis(attrs, &data, a, &p)?;
            }
        }
        Ok(vec![saturate(x.dtype(), data)])
    }
}

/// The scale/size/roi parameters, as given (per listed axis).
struct Params {
    roi: Option<Vec<f64>>,
    scales: Option<Vec<f64>>,
    sizes: Option<Vec<i64>>,
}

/// Output shape for a partly symbolic input with known parameters (stretch policy): an
/// axis is known when its size is given, or its input dim is known, or its scale is 1.
fn symbolic_out(x: &Shape, axes: &[usize], p: &Params) -> Shape {
    let mut dims = x.0.clone();
    for (i, &a) in axes.iter().enumerate() {
        let size = p.sizes.as_ref().and_then(|s| s.get(i)).copied();
        let scale = p.scales.as_ref().and_then(|s| s.get(i)).copied();
        dims[a] = match (size, scale, x.0[a].known()) {
            (Some(s), _, _) if s >= 0 => Dim::Known(s as usize),
            (_, Some(f), Some(d)) if f > 0.0 => Dim::Known((f * d as f64) as usize),
            (_, Some(1.0), _) => x.0[a].clone(),
            _ => Dim::unknown(),
        };
    }
    Shape(dims)
}

/// The resolved per-axis resize parameters (over all axes of the input).
struct Plan {
    /// Scale of each axis.
    scales: Vec<f64>,
    /// Output length of each axis.
    out: Vec<usize>,
    /// Region of interest: starts then ends, one per axis (`None`: absent).
    roi: Option<Vec<f64>>,
}

fn check_param_dtype(i: usize, dtype: DType, want_float: bool) -> OpResult<()> {
    let ok = if want_float {
        dtype.is_float()
    } else {
        dtype == DType::I64
    };
    if !ok {
        let want = if want_float { "a float" } else { "an int64" };
        return Err(format!("input {i}: expected {want} tensor, found {dtype}"));
    }
    Ok(())
}

impl ResizeOp {
    fn parts(&self) -> (&ResizeAttrs, &ResizeInputs) {
        match self {
            ResizeOp::Resize(a, i) | ResizeOp::Upsample(a, i) => (a, i),
        }
    }

    /// Collects the parameters; `get(i, float)` gives input `i` when present and non-empty.
    fn params_with(
        &self,
        get: &mut dyn FnMut(usize, bool) -> OpResult<Option<Tensor>>,
    ) -> OpResult<Params> {
        let f64s = |t: Option<Tensor>| t.map(|t| t.to_f64_vec());
        Ok(match self.parts().1 {
            ResizeInputs::Full => Params {
                roi: f64s(get(1, true)?),
                scales: f64s(get(2, true)?),
                sizes: get(3, false)?.map(|t| t.to_i64_vec()),
            },
            ResizeInputs::Scales => Params {
                roi: None,
                scales: f64s(get(1, true)?),
                sizes: None,
            },
            ResizeInputs::ScalesAttr(s) => Params {
                roi: None,
                scales: Some(s.iter().map(|&v| f64::from(v)).collect()),
                sizes: None,
            },
        })
    }
}

/// The axes that are resized, normalised, in attribute order.
fn resolved_axes(attrs: &ResizeAttrs, rank: usize) -> OpResult<Vec<usize>> {
    let Some(axes) = &attrs.axes else {
        return Ok((0..rank).collect());
    };
    let mut out = Vec::new();
    for &a in axes {
        let n = norm_axis(a, rank).map_err(|e| format!("attribute 'axes': {e}"))?;
        if rank == 0 || out.contains(&n) {
            return Err(format!("attribute 'axes': axis {a} repeated or invalid"));
        }
        out.push(n);
    }
    Ok(out)
}

/// Resolves scales, output sizes and roi over all axes (see `_interpolate_nd`).
fn plan(attrs: &ResizeAttrs, shape: &[usize], axes: &[usize], p: Params) -> OpResult<Plan> {
    let r = shape.len();
    let n = axes.len();
    let check_len = |what: &str, len: usize, want: usize| {
        if len == want {
            Ok(())
        } else {
            Err(format!("{what}: expected {want} values, found {len}"))
        }
    };
    let roi = match p.roi {
        Some(v) => {
            check_len("input 1 (roi)", v.len(), 2 * n)?;
            let mut full: Vec<f64> = [vec![0.0; r], vec![1.0; r]].concat();
            for (i, &a) in axes.iter().enumerate() {
                full[a] = v[i];
                full[r + a] = v[n + i];
            }
            Some(full)
        }
        None => None,
    };
    if attrs.coord == CoordMode::TfCropAndResize && roi.is_none() {
        return Err("input 1 (roi): required by tf_crop_and_resize".into());
    }
    let (scales, out) = match (p.scales, p.sizes) {
        (Some(_), Some(_)) => return Err("only one of scales and sizes may be given".into()),
        (None, None) => return Err("one of scales and sizes is required".into()),
        (Some(s), None) => {
            check_len("scales", s.len(), n)?;
            let mut scales = vec![1.0; r];
            for (&a, &v) in axes.iter().zip(&s) {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(format!("scales: {v} is not a positive number"));
                }
                scales[a] = v;
            }
            let out = scales
                .iter()
                .zip(shape)
                .map(|(&s, &d)| (s * d as f64) as usize)
                .collect();
            (scales, out)
        }
        (None, Some(sz)) => {
            check_len("sizes", sz.len(), n)?;
            sizes_plan(attrs, shape, axes, &sz)?
        }
    };
    Ok(Plan { scales, out, roi })
}

/// Scales and output sizes from the `sizes` input, honouring the aspect ratio policy.
fn sizes_plan(
    attrs: &ResizeAttrs,
    shape: &[usize],
    axes: &[usize],
    sizes: &[i64],
) -> OpResult<(Vec<f64>, Vec<usize>)> {
    let mut out = shape.to_vec();
    let mut scales = vec![1.0; shape.len()];
    for (&a, &s) in axes.iter().zip(sizes) {
        if s < 0 {
            return Err(format!("sizes: negative size {s}"));
        }
        if shape[a] == 0 && s != 0 {
            return Err(format!("sizes: cannot resize empty axis {a} to {s}"));
        }
        out[a] = s as usize;
        scales[a] = if shape[a] == 0 {
            1.0
        } else {
            s as f64 / shape[a] as f64
        };
    }
    let pick = match attrs.keep_aspect_ratio_policy {
        AspectPolicy::Stretch => return Ok((scales, out)),
        AspectPolicy::NotLarger => f64::min,
        AspectPolicy::NotSmaller => f64::max,
    };
    let first = axes.first().map(|&a| scales[a]).unwrap_or(1.0);
    let scale = axes.iter().map(|&a| scales[a]).fold(first, pick);
    for &a in axes {
        scales[a] = scale;
        out[a] = (scale * shape[a] as f64 + 0.5) as usize;
    }
    Ok((scales, out))
}

/// The source coordinate of output position `y` along one axis; `None` when it falls
/// outside the input in tf_crop_and_resize mode (extrapolation).
fn source_coord(
    coord: CoordMode,
    y: f64,
    scale: f64,
    in_len: usize,
    out_len: usize,
    roi: Option<(f64, f64)>,
) -> Option<f64> {
    let input_width = in_len as f64;
    let output_width = scale * input_width;
    let x = match coord {
        CoordMode::HalfPixel => (y + 0.5) / scale - 0.5,
        CoordMode::HalfPixelSymmetric => {
            let adjustment = out_len as f64 / output_width;
            let center = input_width / 2.0;
            let offset = center * (1.0 - adjustment);
            offset + (y + 0.5) / scale - 0.5
        }
        CoordMode::PytorchHalfPixel if output_width == 1.0 => -0.5,
        CoordMode::PytorchHalfPixel => (y + 0.5) / scale - 0.5,
        CoordMode::AlignCorners if output_width == 1.0 => 0.0,
        CoordMode::AlignCorners => y * (input_width - 1.0) / (output_width - 1.0),
        CoordMode::Asymmetric => y / scale,
        CoordMode::TfHalfPixelForNn => (y + 0.5) / scale,
        CoordMode::TfCropAndResize => {
            let (start, end) = roi.unwrap_or((0.0, 1.0));
            let x = if output_width == 1.0 {
                (end - start) * (input_width - 1.0) / 2.0
            } else {
                y * (end - start) * (input_width - 1.0) / (output_width - 1.0)
            };
            let x = x + start * (input_width - 1.0);
            if x < 0.0 || x > input_width - 1.0 {
                return None;
            }
            x
        }
    };
    Some(x)
}

/// Interpolation weights for a source coordinate whose fractional position past its left
/// neighbour is `ratio` (in `(0, 1]`); even length, window starting `len/2 - 1` points
/// left of the left neighbour.
fn coeffs(attrs: &ResizeAttrs, ratio: f64, scale: f64) -> Vec<f64> {
    let a = f64::from(attrs.cubic_coeff_a);
    match (attrs.mode, attrs.antialias) {
        (ResizeMode::Nearest, _) => {
            let right = if ratio == 1.0 {
                true
            } else {
                match attrs.nearest {
                    NearestMode::RoundPreferFloor => ratio > 0.5,
                    NearestMode::RoundPreferCeil => ratio >= 0.5,
                    NearestMode::Floor => false,
                    NearestMode::Ceil => true,
                }
            };
            if right {
                vec![0.0, 1.0]
            } else {
                vec![1.0, 0.0]
            }
        }
        (ResizeMode::Linear, false) => vec![1.0 - ratio, ratio],
        (ResizeMode::Cubic, false) => {
            let (r1, q) = (ratio + 1.0, 1.0 - ratio);
            let q1 = q + 1.0;
            vec![
                ((a * r1 - 5.0 * a) * r1 + 8.0 * a) * r1 - 4.0 * a,
                ((a + 2.0) * ratio - (a + 3.0)) * ratio * ratio + 1.0,
                ((a + 2.0) * q - (a + 3.0)) * q * q + 1.0,
                ((a * q1 - 5.0 * a) * q1 + 8.0 * a) * q1 - 4.0 * a,
            ]
        }
        (ResizeMode::Linear, true) => {
            let s = scale.min(1.0);
            let start = (-1.0 / s).floor() as i64 + 1;
            let footprint = 2 - 2 * start;
            normalized((start..start + footprint).map(|i| {
                let x = (i as f64 - ratio) * s;
                (1.0 - x.abs()).clamp(0.0, 1.0)
            }))
        }
        (ResizeMode::Cubic, true) => {
            let s = scale.min(1.0);
            let i_start = (-2.0 / s).floor() as i64 + 1;
            let i_end = 2 - i_start;
            normalized((i_start..i_end).map(|i| cubic_kernel(s * (i as f64 - ratio), a)))
        }
    }
}

fn cubic_kernel(x: f64, a: f64) -> f64 {
    let x = x.abs();
    let (x2, x3) = (x * x, x * x * x);
    if x <= 1.0 {
        (a + 2.0) * x3 - (a + 3.0) * x2 + 1.0
    } else if x < 2.0 {
        a * x3 - 5.0 * a * x2 + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}

fn normalized(it: impl Iterator<Item = f64>) -> Vec<f64> {
    let v: Vec<f64> = it.collect();
    let s: f64 = v.iter().sum();
    v.into_iter().map(|c| c / s).collect()
}

/// Resizes `data` along axis `ax` (see `_interpolate_1d_along_axis`).
fn resize_axis(
    attrs: &ResizeAttrs,
    data: &ArrayD<f64>,
    ax: usize,
    p: &Plan,
) -> OpResult<ArrayD<f64>> {
    let in_len = data.shape()[ax];
    let out_len = p.out[ax];
    let mut shape = data.shape().to_vec();
    shape[ax] = out_len;
    let mut out = ArrayD::<f64>::zeros(shape);
    if out_len == 0 {
        return Ok(out);
    }
    if in_len == 0 {
        return Err(format!(
            "input 0: cannot resize empty axis {ax} to {out_len}"
        ));
    }
    let r = data.ndim();
    let roi = p.roi.as_ref().map(|v| (v[ax], v[ax + r]));
    let extrapolation = f64::from(attrs.extrapolation_value);
    for y in 0..out_len {
        let mut dst = out.index_axis_mut(Axis(ax), y);
        let Some(x) = source_coord(attrs.coord, y as f64, p.scales[ax], in_len, out_len, roi)
        else {
            dst.fill(extrapolation);
            continue;
        };
        for (idx, c) in neighbours(attrs, x, p.scales[ax], in_len) {
            if c != 0.0 {
                dst.scaled_add(c, &data.index_axis(Axis(ax), idx));
            }
        }
    }
    Ok(out)
}

/// The (clamped input index, weight) pairs for source coordinate `x`.
fn neighbours(attrs: &ResizeAttrs, x: f64, scale: f64, in_len: usize) -> Vec<(usize, f64)> {
    let xf = x.floor();
    let ratio = if x == xf { 1.0 } else { x - xf };
    let mut cs = coeffs(attrs, ratio, scale);
    let n = cs.len() as i64;
    // window start, as `_get_neighbor_idxes` picks it in the edge-padded array
    let pad = (n + 1) / 2;
    let xp = x + pad as f64;
    let pp = xp.floor();
    let frac = xp - pp;
    let offset = if n % 2 == 0 {
        if frac == 0.0 {
            -(n / 2)
        } else {
            -(n / 2) + 1
        }
    } else if frac <= 0.5 {
        -((n - 1) / 2)
    } else {
        -((n - 1) / 2) + 1
    };
    let start = pp as i64 + offset - pad;
    let last = in_len as i64 - 1;
    if attrs.exclude_outside {
        for (j, c) in cs.iter_mut().enumerate() {
            let i = start + j as i64;
            if i < 0 || i > last {
                *c = 0.0;
            }
        }
        let s: f64 = cs.iter().sum();
        let s = if s == 0.0 { 1.0 } else { s };
        cs.iter_mut().for_each(|c| *c /= s);
    }
    cs.into_iter()
        .enumerate()
        .map(|(j, c)| ((start + j as i64).clamp(0, last) as usize, c))
        .collect()
}

/// Casts f64 results back with saturation; integers round half to even first.
fn saturate(dtype: DType, a: ArrayD<f64>) -> Tensor {
    let max = match dtype {
        DType::F32 => f64::from(f32::MAX),
        DType::F16 => half::f16::MAX.to_f64(),
        DType::BF16 => half::bf16::MAX.to_f64(),
        _ => f64::INFINITY,
    };
    let a = if dtype.is_float() {
        a.mapv(|v| v.clamp(-max, max))
    } else {
        a.mapv(f64::round_ties_even)
    };
    Tensor::from_f64_array(dtype, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::AttrValue;

    fn node(op: &str, opset: i64, inputs: &[bool], attrs: &[(&str, AttrValue)]) -> OnnxNode {
        OnnxNode::new(op, opset, attrs, inputs.to_vec(), 1)
    }

    fn parse(op: &str, opset: i64, inputs: &[bool], attrs: &[(&str, AttrValue)]) -> ResizeOp {
        ResizeOp::from_onnx(&node(op, opset, inputs, attrs))
            .unwrap()
            .unwrap()
    }

    fn s(v: &str) -> AttrValue {
        AttrValue::String(v.into())
    }

    /// Evaluates, checking that inference with constant parameters agrees.
    fn run(op: &ResizeOp, inputs: &[Option<&Tensor>]) -> Tensor {
        let out = op.eval(inputs).unwrap().remove(0);
        let facts: Vec<Option<Fact>> = inputs
            .iter()
            .map(|t| t.map(|t| Fact::constant(t.clone())))
            .collect();
        let refs: Vec<Option<&Fact>> = facts.iter().map(Option::as_ref).collect();
        let f = op.infer(&refs).unwrap().remove(0);
        assert_eq!((f.dtype, f.shape), (out.dtype(), Shape::known(out.shape())));
        out
    }

    fn image(h: usize, w: usize) -> Tensor {
        Tensor::from_vec(&[1, 1, h, w], (0..h * w).map(|i| i as f32).collect())
    }

    fn assert_close(t: &Tensor, want: &[f64]) {
        let got = t.to_f64_vec();
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn legacy_forms() {
        let x = Tensor::from_vec(&[1, 1, 2, 2], vec![1f32, 2., 3., 4.]);
        let up7 = parse(
            "Upsample",
            7,
            &[true],
            &[("scales", AttrValue::Floats(vec![1., 1., 2., 3.]))],
        );
        let y = run(&up7, &[Some(&x)]);
        assert_eq!(y.shape(), &[1, 1, 4, 6]);
        assert_eq!(&y.to_f64_vec()[..6], &[1., 1., 1., 2., 2., 2.]);
        let r10 = parse("Resize", 10, &[true, true], &[("mode", s("linear"))]);
        let scales = Tensor::from_vec(&[4], vec![1f32, 1., 2., 2.]);
        let y = run(&r10, &[Some(&x), Some(&scales)]);
        assert_close(
            &y,
            &[
                1., 1.5, 2., 2., 2., 2.5, 3., 3., 3., 3.5, 4., 4., 3., 3.5, 4., 4.,
            ],
        );
    }

    #[test]
    fn integer_output_rounds_half_to_even() {
        let x = Tensor::from_vec(&[1, 1, 2, 3], vec![0u8, 100, 255, 7, 50, 200]);
        let op = parse(
            "Resize",
            13,
            &[true, false, false, true],
            &[
                ("mode", s("linear")),
                ("coordinate_transformation_mode", s("align_corners")),
            ],
        );
        let sizes = Tensor::vec_i64(&[1, 1, 3, 5]);
        let y = run(&op, &[Some(&x), None, None, Some(&sizes)]);
        assert_eq!(
            y.to_i64_vec(),
            vec![0, 50, 100, 178, 255, 4, 39, 75, 151, 228, 7, 28, 50, 125, 200]
        );
    }

    #[test]
    fn opset11_tf_half_pixel_for_nn() {
        let op = parse(
            "Resize",
            11,
            &[true, true, true],
            &[("coordinate_transformation_mode", s("tf_half_pixel_for_nn"))],
        );
        let roi = Tensor::from_vec::<f32>(&[0], vec![]);
        let scales = Tensor::from_vec(&[4], vec![1f32, 1., 0.6, 0.6]);
        let y = run(&op, &[Some(&image(4, 4)), Some(&roi), Some(&scales)]);
        assert_eq!(y.to_f64_vec(), vec![5., 6., 9., 10.]);
    }

    #[test]
    fn cubic_antialias_exclude_outside() {
        let op = parse(
            "Resize",
            18,
            &[true, false, true],
            &[
                ("mode", s("cubic")),
                ("antialias", AttrValue::Int(1)),
                ("exclude_outside", AttrValue::Int(1)),
            ],
        );
        let scales = Tensor::from_vec(&[4], vec![1f32, 1., 0.6, 0.6]);
        let y = run(&op, &[Some(&image(4, 4)), None, Some(&scales)]);
        assert_close(
            &y,
            &[
                1.607_139_587_402_343_8,
                3.390_975_475_311_279_3,
                8.742_483_139_038_086,
                10.526_319_503_784_18,
            ],
        );
    }

    #[test]
    fn attribute_errors() {
        let bad: &[(i64, &[(&str, AttrValue)])] = &[
            (18, &[("mode", s("area"))]),
            (18, &[("coordinate_transformation_mode", s("foo"))]),
            (
                13,
                &[("coordinate_transformation_mode", s("half_pixel_symmetric"))],
            ),
            (
                13,
                &[("coordinate_transformation_mode", s("tf_half_pixel_for_nn"))],
            ),
            (18, &[("antialias", AttrValue::Int(1))]),
            (18, &[("keep_aspect_ratio_policy", s("fit"))]),
        ];
        for (opset, attrs) in bad {
            let n = node("Resize", *opset, &[true, false, true], attrs);
            assert!(ResizeOp::from_onnx(&n).is_err(), "{attrs:?}");
        }
        let neither = node("Resize", 13, &[true, true], &[]);
        assert!(ResizeOp::from_onnx(&neither).is_err());
        let up7 = node("Upsample", 7, &[true], &[]);
        assert!(ResizeOp::from_onnx(&up7).is_err());
    }

    #[test]
    fn input_errors() {
        let op = parse("Resize", 13, &[true, false, true, true], &[]);
        let x = image(2, 2);
        let scales = Tensor::from_vec(&[4], vec![1f32, 1., 2., 2.]);
        let sizes = Tensor::vec_i64(&[1, 1, 4, 4]);
        assert!(op
            .eval(&[Some(&x), None, Some(&scales), Some(&sizes)])
            .is_err());
        let short = Tensor::from_vec(&[2], vec![2f32, 2.]);
        assert!(op.eval(&[Some(&x), None, Some(&short), None]).is_err());
        let neg = Tensor::from_vec(&[4], vec![1f32, 1., -2., 2.]);
        assert!(op.eval(&[Some(&x), None, Some(&neg), None]).is_err());
        let int_scales = Tensor::vec_i64(&[1, 1, 2, 2]);
        assert!(op.eval(&[Some(&x), None, Some(&int_scales), None]).is_err());
        let crop = parse(
            "Resize",
            13,
            &[true, false, false, true],
            &[("coordinate_transformation_mode", s("tf_crop_and_resize"))],
        );
        assert!(crop.eval(&[Some(&x), None, None, Some(&sizes)]).is_err());
        let axes = parse(
            "Resize",
            18,
            &[true, false, true],
            &[("axes", AttrValue::Ints(vec![2, -2]))],
        );
        assert!(axes.eval(&[Some(&x), None, Some(&short)]).is_err());
    }

    #[test]
    fn inference_with_unknown_parameters() {
        let op = parse(
            "Resize",
            18,
            &[true, false, false, true],
            &[("axes", AttrValue::Ints(vec![2, 3]))],
        );
        let x = Fact::new(
            DType::F32,
            Shape(vec![
                Dim::Sym("N".into()),
                Dim::Known(3),
                Dim::Known(4),
                Dim::Known(4),
            ]),
        );
        let sizes = Fact::new(DType::I64, Shape::known(&[2]));
        let out = op.infer(&[Some(&x), None, None, Some(&sizes)]).unwrap();
        assert_eq!(out[0].shape.to_string(), "[N,3,?,?]");
        let sizes = Fact::constant(Tensor::vec_i64(&[8, 2]));
        let out = op.infer(&[Some(&x), None, None, Some(&sizes)]).unwrap();
        assert_eq!(out[0].shape.to_string(), "[N,3,8,2]");
        let all = parse("Resize", 13, &[true, false, true], &[]);
        let scales = Fact::constant(Tensor::from_vec(&[4], vec![1f32, 1., 2., 0.5]));
        let out = all.infer(&[Some(&x), None, Some(&scales)]).unwrap();
        assert_eq!(out[0].shape.to_string(), "[N,3,8,2]");
    }
}
