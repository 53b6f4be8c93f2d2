//! `Softmax`, `LogSoftmax` and `Hardmax`. Before opset 13 the input is coerced to 2-D
//! `[prod(dims[..axis]), prod(dims[axis..])]` (default axis 1) and the op works on rows;
//! from opset 13 it works along the single axis `axis` (default -1).

use super::{float_input, from_f64};
use crate::ops::{req, Fact, OnnxNode, OpResult};
use crate::shape::norm_axis;
use crate::tensor::Tensor;

/// Which of the three ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// `exp(x - max) / sum(exp(x - max))`.
    Softmax,
    /// `x - max - log(sum(exp(x - max)))`.
    LogSoftmax,
    /// 1 at the first maximum, 0 elsewhere.
    Hardmax,
}

/// Attributes of `Softmax`, `LogSoftmax` and `Hardmax`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SoftmaxAttrs {
    /// `axis` (default 1 before opset 13, -1 from 13).
    pub axis: i64,
    /// Opset < 13 semantics: coerce to 2-D at `axis` and normalize whole rows.
    pub coerce_2d: bool,
}

/// Splits `shape` around `axis` into (outer, n, inner) sizes: element `(o, j, i)` is at
/// `(o * n + j) * inner + i`, and the op reduces over `j`. With `coerce_2d` the reduced
/// part is all of `dims[axis..]` (and `axis` may equal the rank).
pub fn axis_split(shape: &[usize], axis: i64, coerce_2d: bool) -> OpResult<(usize, usize, usize)> {
    let r = shape.len();
    let a = if coerce_2d {
        // axis in [-r, r]: negative values count from the rank, like ONNX's Flatten.
        let a = if axis < 0 { axis + r as i64 } else { axis };
        if (0..=r as i64).contains(&a) {
            Ok(a as usize)
        } else {
            Err(format!("axis {axis} out of range for rank {r}"))
        }
    } else if r == 0 {
        Err("input must have rank >= 1".to_string())
    } else {
        norm_axis(axis, r)
    }
    .map_err(|e| format!("attribute 'axis': {e}"))?;
    let outer = shape[..a].iter().product();
    if coerce_2d {
        Ok((outer, shape[a..].iter().product(), 1))
    } else {
        Ok((outer, shape[a], shape[a + 1..].iter().product()))
    }
}

impl SoftmaxAttrs {
    /// Parses the `axis` attribute with the opset's default and semantics.
    pub fn parse(node: &OnnxNode) -> OpResult<SoftmaxAttrs> {
        let coerce_2d = node.opset < 13;
        Ok(SoftmaxAttrs {
            axis: node.int_or("axis", if coerce_2d { 1 } else { -1 })?,
            coerce_2d,
        })
    }

    /// Output like the float input; checks `axis`.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        float_input(x, "input")?;
        let dims: Vec<usize> = vec![1; x.shape.rank()];
        axis_split(&dims, self.axis, self.coerce_2d)?;
        Ok(vec![Fact::new(x.dtype, x.shape.clone())])
    }

    /// Reference implementation of `kind`.
    pub fn eval(&self, kind: Kind, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let (outer, n, inner) = axis_split(x.shape(), self.axis, self.coerce_2d)?;
        let mut y = x.to_f64_vec();
        let mut lane = vec![0.0; n];
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| (o * n + j) * inner + i;
                for (j, v) in lane.iter_mut().enumerate() {
                    *v = y[at(j)];
                }
                normalize(kind, &mut lane);
                for (j, v) in lane.iter().enumerate() {
                    y[at(j)] = *v;
                }
            }
        }
        Ok(vec![from_f64(x.dtype(), x.shape(), y)?])
    }
}

/// Applies `kind` to one lane in place.
fn normalize(kind: Kind, lane: &mut [f64]) {
    let max = lane.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match kind {
        Kind::Hardmax => {
            let first = lane.iter().position(|&v| v == max);
            for (j, v) in lane.iter_mut().enumerate() {
                *v = if Some(j) == first { 1.0 } else { 0.0 };
            }
        }
        Kind::Softmax => {
            let mut sum = 0.0;
            for v in lane.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            lane.iter_mut().for_each(|v| *v /= sum);
        }
        Kind::LogSoftmax => {
            let sum: f64 = lane.iter().map(|v| (v - max).exp()).sum();
            let log = sum.ln();
            lane.iter_mut().for_each(|v| *v = *v - max - log);
        }
    }
}
