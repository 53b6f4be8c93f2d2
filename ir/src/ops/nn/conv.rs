//! `Conv` and `ConvTranspose`: plain loops over precomputed runs of window taps (see
//! [`Window::runs`]), accumulating in f64, one output channel plane at a time.

use super::window::{AutoPad, Axis, Run, Window, WindowAttrs};
use super::{
    float_input, from_f64, min_rank, positive_ints, same_dtype, size_attr, size_ints, vector_of,
};
use crate::ops::{opt, req, Fact, OnnxNode, OpResult};
use crate::shape::{Dim, Shape};
use crate::tensor::Tensor;

/// Attributes of `Conv`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConvAttrs {
    /// Window attributes (kernel, strides, dilations, pads, auto_pad).
    pub window: WindowAttrs,
    /// `group` (default 1).
    pub group: usize,
}

/// Attributes of `ConvTranspose`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConvTransposeAttrs {
    /// Window attributes (kernel, strides, dilations, pads, auto_pad).
    pub window: WindowAttrs,
    /// `group` (default 1).
    pub group: usize,
    /// `output_padding`: extra size added at the end of each spatial axis (default 0).
    pub output_padding: Option<Vec<usize>>,
    /// `output_shape`: the spatial output size; pads are then derived from it.
    pub output_shape: Option<Vec<usize>>,
}

/// Parses the `group` attribute (>= 1).
fn parse_group(node: &OnnxNode) -> OpResult<usize> {
    size_attr("group", node.int_or("group", 1)?, 1)
}

/// The input/weight facts of a convolution after the checks common to both directions:
/// (X, W, spatial rank).
fn conv_inputs<'a>(
    inputs: &[Option<&'a Fact>],
    window: &WindowAttrs,
) -> OpResult<(&'a Fact, &'a Fact, usize)> {
    let x = req(inputs, 0)?;
    let w = req(inputs, 1)?;
    let dt = float_input(x, "X")?;
    same_dtype(w, "W", dt, "X")?;
    min_rank(x, "X", 3)?;
    let r = x.shape.rank() - 2;
    if w.shape.rank() != r + 2 {
        return Err(format!(
            "input 'W': expected rank {} like X {}, found shape {}",
            r + 2,
            x.shape,
            w.shape
        ));
    }
    window.check_rank(r)?;
    if let Some(b) = opt(inputs, 2) {
        same_dtype(b, "B", dt, "X")?;
    }
    Ok((x, w, r))
}

/// Checks that `dim` (when known) is a multiple of `group`.
fn check_divisible(dim: &Dim, group: usize, what: &str) -> OpResult<()> {
    match dim.known() {
        Some(n) if n % group != 0 => {
            Err(format!("{what} ({n}) is not divisible by group ({group})"))
        }
        _ => Ok(()),
    }
}

/// Output spatial dims from per-axis geometry, unknown where input or kernel is unknown.
fn spatial_dims(
    x: &Fact,
    kernel: &[Option<usize>],
    mut axis: impl FnMut(usize, usize, usize) -> OpResult<Axis>,
    pick: fn(&Axis) -> usize,
) -> OpResult<Vec<Dim>> {
    kernel
        .iter()
        .enumerate()
        .map(|(i, k)| match (x.shape.dim(i + 2).known(), k) {
            (Some(n), Some(k)) => Ok(Dim::Known(pick(&axis(i, n, *k)?))),
            _ => Ok(Dim::unknown()),
        })
        .collect()
}

/// Flat f64 data of the optional bias input, or zeros.
fn bias(b: Option<&Tensor>, m: usize) -> Vec<f64> {
    b.map_or_else(|| vec![0.0; m], Tensor::to_f64_vec)
}

impl ConvAttrs {
    /// Parses `Conv` attributes.
    pub fn parse(node: &OnnxNode) -> OpResult<ConvAttrs> {
        Ok(ConvAttrs {
            window: WindowAttrs::parse(node, false)?,
            group: parse_group(node)?,
        })
    }

    /// Output: `[N, M, spatial...]` for X `[N, C, ...]` and W `[M, C/group, k...]`.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let (x, w, r) = conv_inputs(inputs, &self.window)?;
        let (c, m) = (x.shape.dim(1), w.shape.dim(0));
        if let (Some(c), Some(wc)) = (c.known(), w.shape.dim(1).known()) {
            if c != wc * self.group {
                return Err(format!(
                    "input 'W' {} expects {} input channels with group {}, but X {} has {c}",
                    w.shape,
                    wc * self.group,
                    self.group,
                    x.shape
                ));
            }
        }
        check_divisible(c, self.group, "input channels")?;
        check_divisible(m, self.group, "output channels")?;
        if let Some(b) = opt(inputs, 2) {
            vector_of(b, "B", m)?;
        }
        let kernel = self.window.kernel(r, Some(&w.shape.dims()[2..]))?;
        let spatial = spatial_dims(
            x,
            &kernel,
            |i, n, k| self.window.axis(i, r, n, k, false),
            |a| a.output,
        )?;
        let mut dims = vec![x.shape.dim(0).clone(), m.clone()];
        dims.extend(spatial);
        Ok(vec![Fact::new(x.dtype, Shape(dims))])
    }

    /// Reference convolution (inputs already validated by `infer`).
    pub fn eval(&self, inputs: &[Option<&Tensor>], out_shape: &[usize]) -> OpResult<Vec<Tensor>> {
        let (x, w) = (req(inputs, 0)?, req(inputs, 1)?);
        let (xs, ws) = (x.shape(), w.shape());
        let r = xs.len() - 2;
        let win = Window(
            (0..r)
                .map(|i| self.window.axis(i, r, xs[i + 2], ws[i + 2], false))
                .collect::<OpResult<_>>()?,
        );
        let (c, m, g) = (xs[1], ws[0], self.group);
        let (cg, mg) = (c / g, m / g);
        let in_sz: usize = xs[2..].iter().product();
        let k_sz: usize = ws[2..].iter().product();
        let out_sz: usize = out_shape[2..].iter().product();
        let (xv, wv, bv) = (x.to_f64_vec(), w.to_f64_vec(), bias(opt(inputs, 2), m));
        let runs = win.runs();
        let s = win.inner_stride();
        let mut y = vec![0.0; out_shape.iter().product()];
        if out_sz > 0 {
            for (plane, yp) in y.chunks_mut(out_sz).enumerate() {
                let (ni, oc) = (plane / m, plane % m);
                yp.fill(bv[oc]);
                let gi = oc / mg;
                for icg in 0..cg {
                    let xp = &xv[(ni * c + gi * cg + icg) * in_sz..][..in_sz];
                    let wp = &wv[(oc * cg + icg) * k_sz..][..k_sz];
                    correlate(yp, xp, wp, &runs, s);
                }
            }
        }
        Ok(vec![from_f64(x.dtype(), out_shape, y)?])
    }
}

/// `out[o + j] += w[k] * inp[i + j * s]` over all runs: one input plane into one output
/// plane.
fn correlate(out: &mut [f64], inp: &[f64], w: &[f64], runs: &[Run], s: usize) {
    for r in runs {
        let wk = w[r.k];
        let o = &mut out[r.out..r.out + r.len];
        if s == 1 {
            // contiguous: lets the compiler vectorize
            for (ov, iv) in o.iter_mut().zip(&inp[r.inp..r.inp + r.len]) {
                *ov += wk * iv;
            }
        } else {
            for (ov, iv) in o.iter_mut().zip(inp[r.inp..].iter().step_by(s)) {
                *ov += wk * iv;
            }
        }
    }
}

/// The adjoint of [`correlate`]: `out[i + j * s] += w[k] * inp[o + j]`.
fn scatter(out: &mut [f64], inp: &[f64], w: &[f64], runs: &[Run], s: usize) {
    for r in runs {
        let wk = w[r.k];
        let i = &inp[r.out..r.out + r.len];
        for (ov, iv) in out[r.inp..].iter_mut().step_by(s).zip(i) {
            *ov += wk * iv;
        }
    }
}

impl ConvTransposeAttrs {
    /// Parses `ConvTranspose` attributes.
    pub fn parse(node: &OnnxNode) -> OpResult<ConvTransposeAttrs> {
        Ok(ConvTransposeAttrs {
            window: WindowAttrs::parse(node, false)?,
            group: parse_group(node)?,
            output_padding: size_ints(node, "output_padding", 0)?,
            output_shape: positive_ints(node, "output_shape")?,
        })
    }

    /// Checks the lengths of `output_padding` / `output_shape` against the spatial rank.
    fn check_rank(&self, r: usize) -> OpResult<()> {
        if let Some(p) = &self.output_padding {
            if p.len() != r && p.len() != 2 * r {
                return Err(format!(
                    "attribute 'output_padding': expected {r} values, found {}",
                    p.len()
                ));
            }
        }
        if let Some(s) = &self.output_shape {
            if s.len() != r && s.len() != r + 2 {
                return Err(format!(
                    "attribute 'output_shape': expected {r} values, found {}",
                    s.len()
                ));
            }
        }
        Ok(())
    }

    /// The geometry of spatial axis `i` of `r`, seen as the forward convolution whose adjoint
    /// this is: its "input" is the ConvTranspose output (size derived from the attributes)
    /// and its "output" is the ConvTranspose input of size `input`.
    fn axis(&self, i: usize, r: usize, input: usize, kernel: usize) -> OpResult<Axis> {
        let wa = &self.window;
        let (stride, dilation) = (wa.stride(i), wa.dilation(i));
        if kernel == 0 {
            return Err(format!("kernel size of spatial axis {i} is 0"));
        }
        let out_pad = self.output_padding.as_ref().map_or(0, |p| p[i]);
        let eff = ((kernel - 1) * dilation + 1) as i64;
        let natural = i64::try_from(stride as u128 * input.saturating_sub(1) as u128)
            .ok()
            .and_then(|n| n.checked_add(out_pad as i64 + eff))
            .ok_or_else(|| format!("spatial axis {i}: input size {input} too large"))?;
        let target = match &self.output_shape {
            Some(s) => Some(s[s.len() - r + i]),
            None if wa.auto_pad.is_same() => Some(input.saturating_mul(stride)),
            None => None,
        };
        let (output, pad_begin, pad_end) = match target {
            Some(out) => {
                let total = natural.saturating_sub(out as i64);
                let half = total.div_euclid(2);
                let (pb, pe) = if wa.auto_pad == AutoPad::SameUpper {
                    (half, total - half)
                } else {
                    (total - half, half)
                };
                (out as i64, pb, pe)
            }
            None => {
                let (pb, pe) = if wa.auto_pad == AutoPad::Valid {
                    (0, 0)
                } else {
                    wa.pad(i, r)
                };
                let (pb, pe) = (pb as i64, pe as i64);
                (natural - pb - pe, pb, pe)
            }
        };
        if output < 0 {
            return Err(format!(
                "spatial axis {i}: output size {output} is negative (pads too large)"
            ));
        }
        Ok(Axis {
            input: output as usize,
            output: input,
            kernel,
            stride,
            dilation,
            pad_begin,
            pad_end,
        })
    }

    /// Output: `[N, W[1] * group, spatial...]` for X `[N, C, ...]` and W `[C, M/group, k...]`.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let (x, w, r) = conv_inputs(inputs, &self.window)?;
        self.check_rank(r)?;
        let c = x.shape.dim(1);
        if !c.compatible(w.shape.dim(0)) {
            return Err(format!(
                "input 'W' {} expects {} input channels, but X {} has {c}",
                w.shape,
                w.shape.dim(0),
                x.shape
            ));
        }
        check_divisible(c, self.group, "input channels")?;
        let m = match w.shape.dim(1).known() {
            Some(mg) => Dim::Known(mg * self.group),
            None => Dim::unknown(),
        };
        if let Some(b) = opt(inputs, 2) {
            vector_of(b, "B", &m)?;
        }
        let kernel = self.window.kernel(r, Some(&w.shape.dims()[2..]))?;
        let spatial = spatial_dims(x, &kernel, |i, n, k| self.axis(i, r, n, k), |a| a.input)?;
        let mut dims = vec![x.shape.dim(0).clone(), m];
        dims.extend(spatial);
        Ok(vec![Fact::new(x.dtype, Shape(dims))])
    }

    /// Reference transposed convolution (inputs already validated by `infer`).
    pub fn eval(&self, inputs: &[Option<&Tensor>], out_shape: &[usize]) -> OpResult<Vec<Tensor>> {
        let (x, w) = (req(inputs, 0)?, req(inputs, 1)?);
        let (xs, ws) = (x.shape(), w.shape());
        let r = xs.len() - 2;
        let win = Window(
            (0..r)
                .map(|i| self.axis(i, r, xs[i + 2], ws[i + 2]))
                .collect::<OpResult<_>>()?,
        );
        let (c, g, mg) = (xs[1], self.group, ws[1]);
        let (cg, m) = (c / g, mg * g);
        let in_sz: usize = xs[2..].iter().product();
        let k_sz: usize = ws[2..].iter().product();
        let out_sz: usize = out_shape[2..].iter().product();
        let (xv, wv, bv) = (x.to_f64_vec(), w.to_f64_vec(), bias(opt(inputs, 2), m));
        let runs = win.runs();
        let s = win.inner_stride();
        let mut y = vec![0.0; out_shape.iter().product()];
        if out_sz > 0 {
            for (plane, yp) in y.chunks_mut(out_sz).enumerate() {
                let (ni, oc) = (plane / m, plane % m);
                yp.fill(bv[oc]);
                let (gi, ocg) = (oc / mg, oc % mg);
                for icg in 0..cg {
                    let ic = gi * cg + icg;
                    let xp = &xv[(ni * c + ic) * in_sz..][..in_sz];
                    let wp = &wv[(ic * mg + ocg) * k_sz..][..k_sz];
                    scatter(yp, xp, wp, &runs, s);
                }
            }
        }
        Ok(vec![from_f64(x.dtype(), out_shape, y)?])
    }
}
