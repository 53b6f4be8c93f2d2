//! Pooling: `MaxPool` (with `Indices`), `AveragePool`, `LpPool` and the global forms.
//!
//! Windows are enumerated with [`Window::runs`]; positions outside the input are skipped
//! (max, Lp) or only counted in the divisor (`AveragePool` with `count_include_pad`).

use super::window::{strides_of, unravel, Window, WindowAttrs};
use super::{float_input, from_f64, min_rank};
use crate::dtype::DType;
use crate::ops::{req, Fact, OnnxNode, OpResult};
use crate::shape::{Dim, Shape};
use crate::tensor::{Elem, Tensor};
use crate::with_tensor;
use ndarray::ArrayD;

/// The reduction of a pooling op.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum PoolKind {
    /// Maximum (only for the global form; windowed max pooling is [`MaxPoolAttrs`]).
    Max,
    /// Mean; `count_include_pad` makes padding positions count in the divisor.
    Average {
        /// `count_include_pad` (default false).
        count_include_pad: bool,
    },
    /// `(sum |x|^p)^(1/p)`.
    Lp {
        /// `p` (default 2).
        p: f32,
    },
}

impl PoolKind {
    /// The ONNX op type of this pooling, global or windowed.
    pub fn op_type(self, global: bool) -> &'static str {
        match (self, global) {
            (PoolKind::Max, true) => "GlobalMaxPool",
            (PoolKind::Max, false) => "MaxPool",
            (PoolKind::Average { .. }, true) => "GlobalAveragePool",
            (PoolKind::Average { .. }, false) => "AveragePool",
            (PoolKind::Lp { .. }, true) => "GlobalLpPool",
            (PoolKind::Lp { .. }, false) => "LpPool",
        }
    }

    /// Parses the kind of a `Global*Pool` node.
    pub fn parse_global(node: &OnnxNode) -> OpResult<PoolKind> {
        match node.op_type.as_str() {
            "GlobalMaxPool" => Ok(PoolKind::Max),
            "GlobalAveragePool" => Ok(PoolKind::Average {
                count_include_pad: false,
            }),
            _ => Ok(PoolKind::Lp { p: parse_p(node)? }),
        }
    }
}

/// Parses LpPool's `p` (FLOAT in opset 1, INT later; default 2).
fn parse_p(node: &OnnxNode) -> OpResult<f32> {
    match node.float_or("p", 2.0)? {
        p if p > 0.0 => Ok(p),
        p => Err(format!(
            "attribute 'p': expected a positive value, found {p}"
        )),
    }
}

/// Attributes of `AveragePool` and `LpPool`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PoolAttrs {
    /// Average or Lp.
    pub kind: PoolKind,
    /// Window attributes (`kernel_shape` is required).
    pub window: WindowAttrs,
    /// `ceil_mode` (default false): round the output size up.
    pub ceil_mode: bool,
}

/// Attributes of `MaxPool`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MaxPoolAttrs {
    /// Window attributes (`kernel_shape` is required).
    pub window: WindowAttrs,
    /// `ceil_mode` (default false).
    pub ceil_mode: bool,
    /// `storage_order` = 1: `Indices` are column-major within each spatial plane.
    pub column_major_indices: bool,
    /// Whether the node declares the second output, `Indices`.
    pub with_indices: bool,
}

/// Parses a 0/1 flag attribute.
fn flag(node: &OnnxNode, name: &str) -> OpResult<bool> {
    match node.int_or(name, 0)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("attribute '{name}': expected 0 or 1, found {v}")),
    }
}

/// The output fact of a windowed pooling over `x` (rank >= 3, float unless `ints_ok`).
fn pool_fact(x: &Fact, window: &WindowAttrs, ceil_mode: bool, ints_ok: bool) -> OpResult<Fact> {
    if !(ints_ok && matches!(x.dtype, DType::I8 | DType::U8)) {
        float_input(x, "X")?;
    }
    min_rank(x, "X", 3)?;
    let r = x.shape.rank() - 2;
    window.check_rank(r)?;
    let kernel = window.kernel(r, None)?;
    let mut dims = x.shape.dims()[..2].to_vec();
    for (i, k) in kernel.iter().enumerate() {
        dims.push(match (x.shape.dim(i + 2).known(), k) {
            (Some(n), Some(k)) => Dim::Known(window.axis(i, r, n, *k, ceil_mode)?.output),
            _ => Dim::unknown(),
        });
    }
    Ok(Fact::new(x.dtype, Shape(dims)))
}

/// The concrete window of a pooling over an input of shape `xs`.
fn pool_window(window: &WindowAttrs, xs: &[usize], ceil_mode: bool) -> OpResult<Window> {
    let r = xs.len() - 2;
    let kernel = window.kernel(r, None)?;
    Ok(Window(
        (0..r)
            .map(|i| window.axis(i, r, xs[i + 2], kernel[i].unwrap_or(1), ceil_mode))
            .collect::<OpResult<_>>()?,
    ))
}

/// Output shape `[N, C, spatial...]` of a window.
fn out_shape(xs: &[usize], win: &Window) -> Vec<usize> {
    let mut s = xs[..2].to_vec();
    s.extend(win.output_dims());
    s
}

impl PoolAttrs {
    /// Parses `AveragePool` / `LpPool` attributes.
    pub fn parse(node: &OnnxNode) -> OpResult<PoolAttrs> {
        let kind = if node.op_type == "LpPool" {
            PoolKind::Lp { p: parse_p(node)? }
        } else {
            PoolKind::Average {
                count_include_pad: flag(node, "count_include_pad")?,
            }
        };
        Ok(PoolAttrs {
            kind,
            window: WindowAttrs::parse(node, true)?,
            ceil_mode: flag(node, "ceil_mode")?,
        })
    }

    /// Output: `[N, C, pooled spatial...]`.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        Ok(vec![pool_fact(x, &self.window, self.ceil_mode, false)?])
    }

    /// Reference average / Lp pooling.
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let xs = x.shape();
        let win = pool_window(&self.window, xs, self.ceil_mode)?;
        let shape = out_shape(xs, &win);
        let (in_sz, out_sz) = (
            win.input_dims().iter().product(),
            win.output_dims().iter().product(),
        );
        let runs = win.runs();
        let s = win.inner_stride();
        let xv = x.to_f64_vec();
        let planes = xs[0] * xs[1];
        let mut y = vec![0.0; planes * out_sz];
        let mut count = vec![0usize; out_sz];
        let lp = match self.kind {
            PoolKind::Lp { p } => Some(p as f64),
            _ => None,
        };
        for plane in 0..planes {
            let xp = &xv[plane * in_sz..][..in_sz];
            let yp = &mut y[plane * out_sz..][..out_sz];
            for r in &runs {
                for j in 0..r.len {
                    let v = xp[r.inp + j * s];
                    yp[r.out + j] += lp.map_or(v, |p| v.abs().powf(p));
                    if plane == 0 {
                        count[r.out + j] += 1;
                    }
                }
            }
        }
        if let PoolKind::Average { count_include_pad } = self.kind {
            if count_include_pad {
                count = padded_counts(&win);
            }
        }
        for (o, v) in y.iter_mut().enumerate() {
            *v = match lp {
                Some(p) => v.powf(1.0 / p),
                None => *v / count[o % out_sz] as f64,
            };
        }
        Ok(vec![from_f64(x.dtype(), &shape, y)?])
    }
}

/// For each output position, the number of window taps inside the padded input
/// `[-pad_begin, input + pad_end)` (the divisor of `count_include_pad`).
fn padded_counts(win: &Window) -> Vec<usize> {
    let per_axis: Vec<Vec<usize>> = win
        .0
        .iter()
        .map(|a| {
            (0..a.output)
                .map(|o| {
                    (0..a.kernel)
                        .filter(|&k| {
                            let p = a.position(o, k);
                            p >= -a.pad_begin && p < a.input as i64 + a.pad_end
                        })
                        .count()
                })
                .collect()
        })
        .collect();
    let dims = win.output_dims();
    let mut idx = vec![0; dims.len()];
    (0..dims.iter().product())
        .map(|o| {
            unravel(o, &dims, &mut idx);
            idx.iter().zip(&per_axis).map(|(&i, c)| c[i]).product()
        })
        .collect()
}

impl MaxPoolAttrs {
    /// Parses `MaxPool` attributes.
    pub fn parse(node: &OnnxNode) -> OpResult<MaxPoolAttrs> {
        Ok(MaxPoolAttrs {
            window: WindowAttrs::parse(node, true)?,
            ceil_mode: flag(node, "ceil_mode")?,
            column_major_indices: flag(node, "storage_order")?,
            with_indices: node.num_outputs > 1,
        })
    }

    /// Outputs: `Y` `[N, C, pooled spatial...]` and optionally i64 `Indices` of that shape.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        let y = pool_fact(x, &self.window, self.ceil_mode, true)?;
        let mut outs = vec![y.clone()];
        if self.with_indices {
            outs.push(Fact::new(DType::I64, y.shape));
        }
        Ok(outs)
    }

    /// Reference max pooling; `Indices` are flat indices into X (row- or column-major
    /// within each spatial plane).
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let xs = x.shape();
        let win = pool_window(&self.window, xs, self.ceil_mode)?;
        let shape = out_shape(xs, &win);
        let (y, idx) = with_tensor!(x, a => {
            let (y, idx) = max_pool(a, &win, self.column_major_indices)?;
            (Tensor::try_from_vec(&shape, y)?, idx)
        });
        let mut outs = vec![y];
        if self.with_indices {
            outs.push(Tensor::try_from_vec(&shape, idx)?);
        }
        Ok(outs)
    }
}

/// Max pooling of every channel plane of `a`: (values, flat indices into `a`).
fn max_pool<T: Elem>(a: &ArrayD<T>, win: &Window, col_major: bool) -> OpResult<(Vec<T>, Vec<i64>)> {
    let x = a.as_standard_layout();
    let xv = x.as_slice().ok_or("internal: non-contiguous input")?;
    let in_dims = win.input_dims();
    let in_sz: usize = in_dims.iter().product();
    let out_sz: usize = win.output_dims().iter().product();
    let planes = a.shape()[0] * a.shape()[1];
    let runs = win.runs();
    let s = win.inner_stride();
    let mut y = vec![T::default(); planes * out_sz];
    let mut idx = vec![-1i64; planes * out_sz];
    for plane in 0..planes {
        let xp = &xv[plane * in_sz..][..in_sz];
        let yp = &mut y[plane * out_sz..][..out_sz];
        let ip = &mut idx[plane * out_sz..][..out_sz];
        for r in &runs {
            for j in 0..r.len {
                let (o, i) = (r.out + j, r.inp + j * s);
                if ip[o] < 0 || xp[i] > yp[o] {
                    yp[o] = xp[i];
                    ip[o] = i as i64;
                }
            }
        }
        let base = (plane * in_sz) as i64;
        for v in ip.iter_mut().filter(|v| **v >= 0) {
            let off = if col_major {
                column_major_offset(*v as usize, &in_dims)
            } else {
                *v as usize
            };
            *v = base + off as i64;
        }
    }
    Ok((y, idx))
}

/// Converts a row-major flat offset within `dims` into the column-major offset.
fn column_major_offset(flat: usize, dims: &[usize]) -> usize {
    let mut idx = vec![0; dims.len()];
    unravel(flat, dims, &mut idx);
    let mut rev: Vec<usize> = dims.to_vec();
    rev.reverse();
    let st = strides_of(&rev);
    idx.iter()
        .enumerate()
        .map(|(d, &i)| i * st[dims.len() - 1 - d])
        .sum()
}

/// Output of a global pooling: `[N, C, 1, ...]`.
pub fn infer_global(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    float_input(x, "X")?;
    min_rank(x, "X", 2)?;
    let mut dims = x.shape.dims()[..2].to_vec();
    dims.resize(x.shape.rank(), Dim::Known(1));
    Ok(vec![Fact::new(x.dtype, Shape(dims))])
}

/// Reference global pooling over all spatial positions of each channel plane.
pub fn eval_global(
    kind: PoolKind,
    inputs: &[Option<&Tensor>],
    shape: &[usize],
) -> OpResult<Vec<Tensor>> {
    let x = req(inputs, 0)?;
    let xv = x.to_f64_vec();
    let in_sz: usize = x.shape()[2..].iter().product();
    let planes = x.shape()[0] * x.shape()[1];
    let y: Vec<f64> = (0..planes)
        .map(|p| {
            let v = &xv[p * in_sz..][..in_sz];
            match kind {
                PoolKind::Max => {
                    v.iter().fold(
                        f64::NEG_INFINITY,
                        |m, &x| {
                            if x > m || x.is_nan() {
                                x
                            } else {
                                m
                            }
                        },
                    )
                }
                PoolKind::Average { .. } => v.iter().sum::<f64>() / in_sz as f64,
                PoolKind::Lp { p } => {
                    let p = p as f64;
                    v.iter().map(|x| x.abs().powf(p)).sum::<f64>().powf(1.0 / p)
                }
            }
        })
        .collect();
    Ok(vec![from_f64(x.dtype(), shape, y)?])
}
