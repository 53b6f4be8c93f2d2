//! Normalizations: `BatchNormalization`, `InstanceNormalization`, `LayerNormalization`,
//! `GroupNormalization`, `LpNormalization` and `LRN`. Statistics are computed in f64
//! (two-pass mean / population variance).

use super::softmax::axis_split;
use super::{float_input, from_f64, min_rank, same_dtype, size_attr, vector_of};
use crate::dtype::DType;
use crate::ops::{opt, req, Fact, OnnxNode, OpResult};
use crate::shape::{norm_axis, Dim, Shape};
use crate::tensor::Tensor;
use ndarray::IxDyn;

/// Mean and population variance of `v` (NaN for an empty slice).
fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var)
}

/// The values of `t` broadcast (numpy-style, unidirectionally) to `shape`, row-major.
fn broadcast_to(t: &Tensor, shape: &[usize], name: &str) -> OpResult<Vec<f64>> {
    let a = t.to_f64_array();
    let b = a.broadcast(IxDyn(shape)).ok_or_else(|| {
        format!(
            "input '{name}' of shape {:?} does not broadcast to {shape:?}",
            t.shape()
        )
    })?;
    Ok(b.iter().copied().collect())
}

/// Checks that `f` can broadcast unidirectionally to `target`.
fn check_broadcast(f: &Fact, name: &str, target: &[Dim]) -> OpResult<()> {
    let dims = f.shape.dims();
    let ok = dims.len() <= target.len()
        && dims
            .iter()
            .zip(&target[target.len() - dims.len()..])
            .all(|(d, t)| d == &Dim::Known(1) || d.compatible(t));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "input '{name}' of shape {} does not broadcast to {}",
            f.shape,
            Shape(target.to_vec())
        ))
    }
}

/// Parses the `stash_type` attribute (an ONNX dtype code, default FLOAT).
fn parse_stash(node: &OnnxNode) -> OpResult<DType> {
    let code = node.int_or("stash_type", 1)?;
    match DType::from_onnx(code as i32) {
        Some(d) if d.is_float() => Ok(d),
        _ => Err(format!(
            "attribute 'stash_type': expected a floating-point dtype code, found {code}"
        )),
    }
}

/// Attributes of `BatchNormalization`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchNormAttrs {
    /// `epsilon` (default 1e-5).
    pub epsilon: f32,
    /// `momentum` for the running statistics (default 0.9).
    pub momentum: f32,
    /// Training mode (opset >= 14 `training_mode`): normalize with the batch statistics and
    /// output the updated running mean and variance.
    pub training: bool,
    /// `spatial` = 0 (opset < 9): the parameters have one value per activation, shape
    /// `X.shape[1..]`, instead of one per channel.
    pub per_activation: bool,
    /// Number of outputs the node declares.
    pub num_outputs: usize,
}

impl BatchNormAttrs {
    /// Parses `BatchNormalization` attributes.
    pub fn parse(node: &OnnxNode) -> OpResult<BatchNormAttrs> {
        let training = if node.opset >= 14 {
            match node.int_or("training_mode", 0)? {
                0 => false,
                1 => true,
                v => {
                    return Err(format!(
                        "attribute 'training_mode': expected 0 or 1, found {v}"
                    ))
                }
            }
        } else {
            false
        };
        let max_out = if training { 3 } else { 1 };
        if node.num_outputs > max_out {
            return Err(format!(
                "{} outputs declared, but only {max_out} are defined {}",
                node.num_outputs,
                if node.opset >= 14 {
                    "with this training_mode"
                } else {
                    "(training outputs of BatchNormalization before opset 14 are not supported)"
                }
            ));
        }
        Ok(BatchNormAttrs {
            epsilon: node.float_or("epsilon", 1e-5)?,
            momentum: node.float_or("momentum", 0.9)?,
            training,
            per_activation: node.opset < 9 && node.int_or("spatial", 1)? == 0,
            num_outputs: node.num_outputs,
        })
    }

    /// Outputs: `Y` like X, and in training mode the running mean / variance `[C]`.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        float_input(x, "X")?;
        min_rank(x, "X", 2)?;
        let names = ["X", "scale", "B", "input_mean", "input_var"];
        let param = Shape(if self.per_activation {
            x.shape.dims()[1..].to_vec()
        } else {
            vec![x.shape.dim(1).clone()]
        });
        for (i, name) in names.iter().enumerate().skip(1) {
            let p = req(inputs, i)?;
            float_input(p, name)?;
            let ok = p.shape.rank() == param.rank()
                && p.shape
                    .dims()
                    .iter()
                    .zip(param.dims())
                    .all(|(a, b)| a.compatible(b));
            if !ok {
                return Err(format!(
                    "input '{name}': expected shape {param}, found {}",
                    p.shape
                ));
            }
        }
        let mut outs = vec![Fact::new(x.dtype, x.shape.clone())];
        for i in 1..self.num_outputs {
            outs.push(Fact::new(req(inputs, 2 + i)?.dtype, param.clone()));
        }
        Ok(outs)
    }

    /// Reference batch normalization.
    pub fn eval(&self, inputs: &[Option<&Tensor>], outs: &[Fact]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let xs = x.shape();
        let (n, c) = (xs[0], xs[1]);
        let sp: usize = xs[2..].iter().product();
        let xv = x.to_f64_vec();
        let p: Vec<Vec<f64>> = (1..5)
            .map(|i| req(inputs, i).map(Tensor::to_f64_vec))
            .collect::<OpResult<_>>()?;
        let (scale, bias, mut mean, mut var) = (&p[0], &p[1], p[2].clone(), p[3].clone());
        let eps = self.epsilon as f64;
        let mut running = Vec::new();
        if self.training {
            let m = self.momentum as f64;
            let mut buf = Vec::with_capacity(n * sp);
            for ch in 0..c {
                buf.clear();
                for ni in 0..n {
                    buf.extend_from_slice(&xv[(ni * c + ch) * sp..][..sp]);
                }
                let (bm, bv) = mean_var(&buf);
                running.push((mean[ch] * m + bm * (1.0 - m), var[ch] * m + bv * (1.0 - m)));
                (mean[ch], var[ch]) = (bm, bv);
            }
        }
        let per_act = self.per_activation;
        let y: Vec<f64> = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let j = if per_act { i % (c * sp) } else { (i / sp) % c };
                scale[j] * (v - mean[j]) / (var[j] + eps).sqrt() + bias[j]
            })
            .collect();
        let mut res = vec![from_f64(x.dtype(), xs, y)?];
        let stats = [
            running.iter().map(|r| r.0).collect::<Vec<_>>(),
            running.iter().map(|r| r.1).collect(),
        ];
        for (f, s) in outs.iter().skip(1).zip(stats) {
            res.push(from_f64(f.dtype, &[c], s)?);
        }
        Ok(res)
    }
}

/// `InstanceNormalization`: X `[N, C, ...]` float, scale and B `[C]`.
pub fn infer_instance(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    let dt = float_input(x, "input")?;
    min_rank(x, "input", 3)?;
    for (i, name) in [(1, "scale"), (2, "B")] {
        let p = req(inputs, i)?;
        same_dtype(p, name, dt, "input")?;
        vector_of(p, name, x.shape.dim(1))?;
    }
    Ok(vec![Fact::new(dt, x.shape.clone())])
}

/// Normalizes each channel plane of each group `[g * group_len, (g + 1) * group_len)` of
/// `xv` (planes of `sp` elements), then applies `affine(plane, value)`.
fn normalize_groups(
    xv: &[f64],
    group_len: usize,
    sp: usize,
    eps: f64,
    affine: impl Fn(usize, f64) -> f64,
) -> Vec<f64> {
    let mut y = Vec::with_capacity(xv.len());
    if group_len == 0 {
        return y;
    }
    for (g, chunk) in xv.chunks(group_len).enumerate() {
        let (mean, var) = mean_var(chunk);
        let inv = 1.0 / (var + eps).sqrt();
        let first_plane = g * group_len / sp.max(1);
        y.extend(chunk.iter().enumerate().map(|(i, &v)| {
            let plane = first_plane + i / sp.max(1);
            affine(plane, (v - mean) * inv)
        }));
    }
    y
}

/// Reference instance normalization.
pub fn eval_instance(epsilon: f32, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
    let x = req(inputs, 0)?;
    let (scale, bias) = (req(inputs, 1)?.to_f64_vec(), req(inputs, 2)?.to_f64_vec());
    let c = x.shape()[1];
    let sp: usize = x.shape()[2..].iter().product();
    let affine = |plane: usize, v: f64| scale[plane % c] * v + bias[plane % c];
    let y = normalize_groups(&x.to_f64_vec(), sp, sp, epsilon as f64, affine);
    Ok(vec![from_f64(x.dtype(), x.shape(), y)?])
}

/// Attributes of `LayerNormalization` and `RMSNormalization`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerNormAttrs {
    /// First normalized axis (default -1): statistics are over `X.shape[axis..]`.
    pub axis: i64,
    /// `epsilon` (default 1e-5).
    pub epsilon: f32,
    /// `stash_type`: dtype of the `Mean` and `InvStdDev` outputs (default f32).
    pub stash_type: DType,
    /// Number of outputs the node declares (`Y`, `Mean`, `InvStdDev`).
    pub num_outputs: usize,
}

impl LayerNormAttrs {
    /// Parses `LayerNormalization` attributes.
    pub fn parse(node: &OnnxNode) -> OpResult<LayerNormAttrs> {
        Ok(LayerNormAttrs {
            axis: node.int_or("axis", -1)?,
            epsilon: node.float_or("epsilon", 1e-5)?,
            stash_type: parse_stash(node)?,
            num_outputs: node.num_outputs,
        })
    }

    /// Outputs: `Y` like X; `Mean` and `InvStdDev` of shape `X.shape[..axis] + [1...]`.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        let dt = float_input(x, "X")?;
        min_rank(x, "X", 1)?;
        let axis =
            norm_axis(self.axis, x.shape.rank()).map_err(|e| format!("attribute 'axis': {e}"))?;
        let normalized = &x.shape.dims()[axis..];
        for (i, name) in [(1, "Scale"), (2, "B")] {
            if let Some(p) = opt(inputs, i) {
                same_dtype(p, name, dt, "X")?;
                check_broadcast(p, name, normalized)?;
            }
        }
        req(inputs, 1)?;
        let mut stat = x.shape.dims()[..axis].to_vec();
        stat.resize(x.shape.rank(), Dim::Known(1));
        let mut outs = vec![Fact::new(dt, x.shape.clone())];
        for _ in 1..self.num_outputs {
            outs.push(Fact::new(self.stash_type, Shape(stat.clone())));
        }
        Ok(outs)
    }

    /// Reference layer normalization; with `rms`, RMS normalization (no mean subtraction:
    /// the "variance" is the mean of squares).
    pub fn eval(
        &self,
        inputs: &[Option<&Tensor>],
        outs: &[Fact],
        rms: bool,
    ) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let xs = x.shape();
        let axis = norm_axis(self.axis, xs.len())?;
        let normalized = &xs[axis..];
        let cols: usize = normalized.iter().product();
        let scale = broadcast_to(req(inputs, 1)?, normalized, "Scale")?;
        let bias = match opt(inputs, 2) {
            Some(b) => broadcast_to(b, normalized, "B")?,
            None => vec![0.0; cols],
        };
        let xv = x.to_f64_vec();
        let rows = xv.len().checked_div(cols).unwrap_or(0);
        let (mut means, mut invs) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        let mut y = Vec::with_capacity(xv.len());
        for row in xv.chunks(cols.max(1)).take(rows) {
            let (mean, var) = if rms {
                (
                    0.0,
                    row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64,
                )
            } else {
                mean_var(row)
            };
            let inv = 1.0 / (var + self.epsilon as f64).sqrt();
            y.extend(
                row.iter()
                    .enumerate()
                    .map(|(j, &v)| (v - mean) * inv * scale[j] + bias[j]),
            );
            means.push(mean);
            invs.push(inv);
        }
        let mut res = vec![from_f64(x.dtype(), xs, y)?];
        for (f, stat) in outs.iter().skip(1).zip([means, invs]) {
            let shape = f
                .shape
                .as_known()
                .ok_or("internal: statistics shape unknown")?;
            res.push(from_f64(f.dtype, &shape, stat)?);
        }
        Ok(res)
    }
}

/// Attributes of `GroupNormalization`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupNormAttrs {
    /// `num_groups` (required): channels are split into this many groups.
    pub num_groups: usize,
    /// `epsilon` (default 1e-5).
    pub epsilon: f32,
    /// Opset >= 21: scale and bias have one value per channel (opset 18: one per group).
    pub per_channel: bool,
}

impl GroupNormAttrs {
    /// Parses `GroupNormalization` attributes.
    pub fn parse(node: &OnnxNode) -> OpResult<GroupNormAttrs> {
        let num_groups = size_attr("num_groups", node.req_int("num_groups")?, 1)?;
        parse_stash(node)?;
        Ok(GroupNormAttrs {
            num_groups,
            epsilon: node.float_or("epsilon", 1e-5)?,
            per_channel: node.opset >= 21,
        })
    }

    /// Output: `Y` like X `[N, C, ...]`; C must be a multiple of `num_groups`.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        let dt = float_input(x, "X")?;
        min_rank(x, "X", 2)?;
        let c = x.shape.dim(1);
        if let Some(c) = c.known() {
            if c % self.num_groups != 0 {
                return Err(format!(
                    "input 'X': {c} channels are not divisible by num_groups {}",
                    self.num_groups
                ));
            }
        }
        let len = if self.per_channel {
            c.clone()
        } else {
            Dim::Known(self.num_groups)
        };
        for (i, name) in [(1, "scale"), (2, "bias")] {
            let p = req(inputs, i)?;
            same_dtype(p, name, dt, "X")?;
            vector_of(p, name, &len)?;
        }
        Ok(vec![Fact::new(dt, x.shape.clone())])
    }

    /// Reference group normalization.
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let (scale, bias) = (req(inputs, 1)?.to_f64_vec(), req(inputs, 2)?.to_f64_vec());
        let c = x.shape()[1];
        let sp: usize = x.shape()[2..].iter().product();
        let per_group = c / self.num_groups;
        let per_channel = self.per_channel;
        let affine = |plane: usize, v: f64| {
            let ch = plane % c;
            let j = if per_channel { ch } else { ch / per_group };
            scale[j] * v + bias[j]
        };
        let eps = self.epsilon as f64;
        let y = normalize_groups(&x.to_f64_vec(), per_group * sp, sp, eps, affine);
        Ok(vec![from_f64(x.dtype(), x.shape(), y)?])
    }
}

/// `LpNormalization`: output like the float input; `axis` must be in range.
pub fn infer_lp(axis: i64, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    float_input(x, "input")?;
    min_rank(x, "input", 1)?;
    norm_axis(axis, x.shape.rank()).map_err(|e| format!("attribute 'axis': {e}"))?;
    Ok(vec![Fact::new(x.dtype, x.shape.clone())])
}

/// Reference Lp normalization along `axis` (0 where the norm is 0).
pub fn eval_lp(axis: i64, p: u8, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
    let x = req(inputs, 0)?;
    let (outer, n, inner) = axis_split(x.shape(), axis, false)?;
    let mut y = x.to_f64_vec();
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * n + j) * inner + i;
            let norm = if p == 1 {
                (0..n).map(|j| y[at(j)].abs()).sum::<f64>()
            } else {
                (0..n).map(|j| y[at(j)] * y[at(j)]).sum::<f64>().sqrt()
            };
            for j in 0..n {
                let v = &mut y[at(j)];
                *v = if norm == 0.0 { 0.0 } else { *v / norm };
            }
        }
    }
    Ok(vec![from_f64(x.dtype(), x.shape(), y)?])
}

/// Attributes of `LRN`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrnAttrs {
    /// `alpha` (default 1e-4).
    pub alpha: f32,
    /// `beta` (default 0.75).
    pub beta: f32,
    /// `bias` (default 1).
    pub bias: f32,
    /// `size` (required): number of channels summed over.
    pub size: usize,
}

/// `LRN`: output like the float input `[N, C, ...]`.
pub fn infer_lrn(inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    float_input(x, "X")?;
    min_rank(x, "X", 3)?;
    Ok(vec![Fact::new(x.dtype, x.shape.clone())])
}

impl LrnAttrs {
    /// Parses `LRN` attributes.
    pub fn parse(node: &OnnxNode) -> OpResult<LrnAttrs> {
        let size = size_attr("size", node.req_int("size")?, 1)?;
        Ok(LrnAttrs {
            alpha: node.float_or("alpha", 1e-4)?,
            beta: node.float_or("beta", 0.75)?,
            bias: node.float_or("bias", 1.0)?,
            size,
        })
    }

    /// Reference LRN: `x / (bias + alpha / size * sum of squares over nearby channels)^beta`
    /// with channels `[c - floor((size-1)/2), c + ceil((size-1)/2)]`.
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let xs = x.shape();
        let (c, sp) = (xs[1], xs[2..].iter().product::<usize>());
        let xv = x.to_f64_vec();
        let (before, after) = ((self.size - 1) / 2, self.size / 2);
        let (alpha, beta, bias) = (self.alpha as f64, self.beta as f64, self.bias as f64);
        let y: Vec<f64> = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (ni, ch, s) = (i / (c * sp), (i / sp) % c, i % sp);
                let lo = ch.saturating_sub(before);
                let hi = (ch + after).min(c - 1);
                let sq: f64 = (lo..=hi).map(|k| xv[(ni * c + k) * sp + s].powi(2)).sum();
                v / (bias + alpha / self.size as f64 * sq).powf(beta)
            })
            .collect();
        Ok(vec![from_f64(x.dtype(), xs, y)?])
    }
}
