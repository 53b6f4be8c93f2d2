//! Folding of constant affine ops into the weights and bias of the contraction before them:
//! inference `BatchNormalization` after `Conv`, `Add` of a constant per-channel vector into a
//! `Conv`/`Gemm` bias, and `Mul` by a constant (scalar, or per-channel for `Conv`) into the
//! weights. Each rewrite only fires when the contraction's output has no other user, so the
//! result computes the same function with one node less. An inference `BatchNormalization`
//! that cannot fold (after a ReLU, an Add, a Concat: pre-activation ResNets, DenseNet)
//! becomes `x * s + t` with constant per-channel `s` and `t` ([`decompose_batchnorm`]),
//! elementwise ops that fuse into the kernels around them on every target.

use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{DType, Graph, Op, Tensor, ValueId};
use std::collections::HashSet;

/// Counts of the rewrites done by [`fold_all`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FoldStats {
    /// `BatchNormalization` nodes folded into the `Conv` before them.
    pub batchnorm: usize,
    /// `Add` nodes folded into a `Conv`/`Gemm` bias.
    pub add: usize,
    /// `Mul` nodes folded into `Conv` weights or `Gemm` scales.
    pub mul: usize,
    /// `BatchNormalization` nodes that could not fold, rewritten as `x * s + t`.
    #[serde(default)]
    pub batchnorm_affine: usize,
}

/// Runs [`fold_batchnorm`], [`fold_add_into_bias`] and [`fold_mul_into_weights`] until none
/// applies, then [`decompose_batchnorm`] on what is left (and the folds again: its `Mul`
/// and `Add` may fold into a `Gemm` before them); returns how many of each were done.
pub fn fold_all(g: &mut Graph) -> FoldStats {
    let mut s = FoldStats::default();
    loop {
        let (b, m, a) = (
            fold_batchnorm(g),
            fold_mul_into_weights(g),
            fold_add_into_bias(g),
        );
        s.batchnorm += b;
        s.mul += m;
        s.add += a;
        if b + m + a > 0 {
            continue;
        }
        let d = decompose_batchnorm(g);
        s.batchnorm_affine += d;
        if d == 0 {
            return s;
        }
    }
}

/// Rewrites each inference `BatchNormalization` with constant parameters into `x * s + t`
/// (`s = scale / sqrt(var + eps)`, `t = bias - mean * s`, constants broadcast per channel,
/// or per activation for `spatial = 0`), keeping its output value. Returns the number
/// rewritten. Run after [`fold_batchnorm`], which removes those after a `Conv` entirely.
pub fn decompose_batchnorm(g: &mut Graph) -> usize {
    let mut taken = HashSet::new();
    let mut count = 0;
    let mut ni = 0;
    while ni < g.nodes.len() {
        match batchnorm_affine(g, ni) {
            Some((s, t)) => {
                let n = g.nodes[ni].clone();
                let (x, out) = (n.inputs[0].expect("checked"), n.outputs[0]);
                let dt = g.values[out].fact.dtype;
                let s = g.add_const(
                    fresh_name(g, &mut taken, &format!("{}.scale", n.name)),
                    s.cast(dt),
                );
                let t = g.add_const(
                    fresh_name(g, &mut taken, &format!("{}.shift", n.name)),
                    t.cast(dt),
                );
                let fact = g.values[out].fact.clone();
                let mid = g.add_value(
                    fresh_name(g, &mut taken, &format!("{}.scaled", n.name)),
                    fact,
                );
                let node = |name: String, kind: BinaryKind, ins: [ValueId; 2], out: ValueId| {
                    kiln_ir::Node {
                        name,
                        op: Op::Elementwise(ElementwiseOp::Binary(kind)),
                        inputs: ins.iter().map(|&v| Some(v)).collect(),
                        outputs: vec![out],
                    }
                };
                g.nodes[ni] = node(format!("{}.mul", n.name), BinaryKind::Mul, [x, s], mid);
                g.nodes.insert(
                    ni + 1,
                    node(format!("{}.add", n.name), BinaryKind::Add, [mid, t], out),
                );
                count += 1;
                ni += 2;
            }
            None => ni += 1,
        }
    }
    count
}

/// The constant factor and term of node `ni` when it is an inference `BatchNormalization`
/// with constant parameters over a float input of rank ≥ 2, shaped to broadcast against it.
fn batchnorm_affine(g: &Graph, ni: usize) -> Option<(Tensor, Tensor)> {
    let n = &g.nodes[ni];
    let Op::Nn(NnOp::BatchNormalization(a)) = &n.op else {
        return None;
    };
    let x = n.inputs.first().copied().flatten()?;
    let fact = &g.values[x].fact;
    let rank = fact.shape.rank();
    if a.training
        || n.outputs.len() != 1
        || rank < 2
        || !fact.dtype.is_float()
        || fact.dtype.is_low_precision()
    {
        return None;
    }
    let params: Vec<&Tensor> = n.inputs[1..]
        .iter()
        .map(|i| i.and_then(|i| g.const_value(i)))
        .collect::<Option<_>>()?;
    let [scale, bias, mean, var] = params.as_slice() else {
        return None;
    };
    let len = scale.len();
    if [bias, mean, var].iter().any(|p| p.len() != len) {
        return None;
    }
    let eps = a.epsilon as f64;
    let (scale, bias, mean, var) = (
        scale.to_f64_vec(),
        bias.to_f64_vec(),
        mean.to_f64_vec(),
        var.to_f64_vec(),
    );
    let s: Vec<f64> = (0..len).map(|c| scale[c] / (var[c] + eps).sqrt()).collect();
    let t: Vec<f64> = (0..len).map(|c| bias[c] - mean[c] * s[c]).collect();
    let shape: Vec<usize> = if a.per_activation {
        // one value per activation: the parameters have the shape of X without its batch dim
        let dims = fact.shape.as_known()?;
        if dims[1..].iter().product::<usize>() != len {
            return None;
        }
        dims[1..].to_vec()
    } else {
        std::iter::once(len)
            .chain(std::iter::repeat_n(1, rank - 2))
            .collect()
    };
    Some((Tensor::from_vec(&shape, s), Tensor::from_vec(&shape, t)))
}

/// What the folding needs to know about a contraction node producing a single-use value.
enum Contraction {
    /// A `Conv` with its constant weight and (optional) constant bias.
    Conv {
        /// The weight.
        weight: Box<Tensor>,
        /// The bias, if any.
        bias: Option<Box<Tensor>>,
    },
    /// A `Gemm` (the weight stays as it is; alpha/beta/C change).
    Gemm,
}

/// The contraction node producing `v` when `v` has exactly one user (and is no graph
/// output), with constant parameters.
fn single_use_contraction(g: &Graph, v: ValueId, uses: &[usize]) -> Option<(usize, Contraction)> {
    if uses[v] != 1 || g.outputs.contains(&v) {
        return None;
    }
    let ni = g.nodes.iter().position(|n| n.outputs.contains(&v))?;
    let n = &g.nodes[ni];
    match &n.op {
        Op::Nn(NnOp::Conv(_)) => {
            let weight = Box::new(g.const_value(n.inputs.get(1).copied().flatten()?)?.clone());
            let bias = match n.inputs.get(2).copied().flatten() {
                Some(b) => Some(Box::new(g.const_value(b)?.clone())),
                None => None,
            };
            if !weight.dtype().is_float() || weight.rank() < 1 {
                return None;
            }
            Some((ni, Contraction::Conv { weight, bias }))
        }
        Op::Linalg(LinalgOp::Gemm(_)) => Some((ni, Contraction::Gemm)),
        _ => None,
    }
}

/// A fresh value name starting with `base`.
fn fresh_name(g: &Graph, taken: &mut HashSet<String>, base: &str) -> String {
    if taken.is_empty() {
        taken.extend(g.values.iter().map(|v| v.name.clone()));
    }
    let mut name = base.to_string();
    let mut k = 1;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}

/// Scales the output channels of a conv weight `[M, ...]` by `scale[m]` and returns the new
/// weight and the bias `bias[m] * scale[m] + shift[m]` (a missing bias counts as zero).
fn scale_conv(
    weight: &Tensor,
    bias: Option<&Tensor>,
    scale: &[f64],
    shift: &[f64],
) -> (Tensor, Tensor) {
    let m = weight.shape()[0];
    let per = weight.len() / m.max(1);
    let w: Vec<f64> = weight
        .to_f64_vec()
        .iter()
        .enumerate()
        .map(|(i, x)| x * scale[i / per.max(1)])
        .collect();
    let b0 = bias.map(|b| b.to_f64_vec()).unwrap_or_else(|| vec![0.0; m]);
    let b: Vec<f64> = (0..m).map(|c| b0[c] * scale[c] + shift[c]).collect();
    let dt = weight.dtype();
    (
        Tensor::from_vec(weight.shape(), w).cast(dt),
        Tensor::from_vec(&[m], b).cast(dt),
    )
}

/// Rewrites node `ci` (a `Conv`) to use the given weight and bias, take over the outputs of
/// node `ri`, and removes node `ri`.
fn replace_conv_params(
    g: &mut Graph,
    taken: &mut HashSet<String>,
    ci: usize,
    ri: usize,
    w: Tensor,
    b: Tensor,
) {
    let base = g.nodes[ci].name.clone();
    let wn = fresh_name(g, taken, &format!("{base}.folded_weight"));
    let bn = fresh_name(g, taken, &format!("{base}.folded_bias"));
    let w = g.add_const(wn, w);
    let b = g.add_const(bn, b);
    let outs = g.nodes[ri].outputs.clone();
    let conv = &mut g.nodes[ci];
    conv.inputs.resize(3, None);
    conv.inputs[1] = Some(w);
    conv.inputs[2] = Some(b);
    conv.outputs = outs;
    g.nodes.remove(ri);
}

/// Per-channel values of a constant `c` broadcast against an NCHW-like output of `channels`
/// channels and rank `rank` (a scalar, or a tensor whose only non-1 dim is the channel dim).
fn per_channel(c: &Tensor, channels: usize, rank: usize, axis: usize) -> Option<Vec<f64>> {
    if c.rank() > rank || !c.dtype().is_float() {
        return None;
    }
    if c.len() == 1 {
        return Some(vec![c.scalar_f64()?; channels]);
    }
    let off = rank - c.rank();
    let ok = c
        .shape()
        .iter()
        .enumerate()
        .all(|(i, &d)| d == 1 || (i + off == axis && d == channels));
    ok.then(|| c.to_f64_vec())
}

/// Folds inference `BatchNormalization` (constant scale, bias, mean and variance) into the
/// `Conv` producing its input, when that output has no other user. Returns the number folded.
pub fn fold_batchnorm(g: &mut Graph) -> usize {
    let mut taken = HashSet::new();
    let mut count = 0;
    let mut ni = 0;
    while ni < g.nodes.len() {
        let n = &g.nodes[ni];
        let Op::Nn(NnOp::BatchNormalization(a)) = &n.op else {
            ni += 1;
            continue;
        };
        if a.training || a.per_activation || n.outputs.len() != 1 {
            ni += 1;
            continue;
        }
        let params: Option<Vec<Vec<f64>>> = n.inputs[1..]
            .iter()
            .map(|i| i.and_then(|i| g.const_value(i)).map(|t| t.to_f64_vec()))
            .collect();
        let uses = g.use_counts();
        let (Some(x), Some(p)) = (n.inputs[0], params) else {
            ni += 1;
            continue;
        };
        let Some((ci, Contraction::Conv { weight, bias })) = single_use_contraction(g, x, &uses)
        else {
            ni += 1;
            continue;
        };
        let m = weight.shape()[0];
        if p.iter().any(|v| v.len() != m) {
            ni += 1;
            continue;
        }
        let eps = a.epsilon as f64;
        let scale: Vec<f64> = (0..m).map(|c| p[0][c] / (p[3][c] + eps).sqrt()).collect();
        let shift: Vec<f64> = (0..m).map(|c| p[1][c] - p[2][c] * scale[c]).collect();
        let (w, b) = scale_conv(&weight, bias.as_deref(), &scale, &shift);
        replace_conv_params(g, &mut taken, ci, ni, w, b);
        count += 1;
        // the conv stays before the removed node: re-examine from it
        ni = ci + 1;
    }
    count
}

/// Folds `Add(y, c)` / `Add(c, y)` with `c` a constant per-channel vector (or scalar) into the
/// bias of the `Conv` or `Gemm` producing `y`, when `y` has no other user. Returns the number
/// of `Add` nodes removed.
pub fn fold_add_into_bias(g: &mut Graph) -> usize {
    fold_affine(g, BinaryKind::Add)
}

/// Folds `Mul(y, s)` / `Mul(s, y)` into the `Conv` producing `y` (constant scalar or
/// per-channel `s`: weights and bias scaled) or the `Gemm` producing `y` (constant scalar `s`:
/// alpha and beta scaled), when `y` has no other user. Returns the number of `Mul` removed.
pub fn fold_mul_into_weights(g: &mut Graph) -> usize {
    fold_affine(g, BinaryKind::Mul)
}

/// Shared driver of [`fold_add_into_bias`] and [`fold_mul_into_weights`].
fn fold_affine(g: &mut Graph, kind: BinaryKind) -> usize {
    let mut taken = HashSet::new();
    let mut count = 0;
    let mut ni = 0;
    while ni < g.nodes.len() {
        if fold_affine_at(g, &mut taken, ni, kind) {
            count += 1;
        } else {
            ni += 1;
        }
    }
    count
}

/// Tries to fold the `Add`/`Mul` node `ni`; true when it was removed.
fn fold_affine_at(g: &mut Graph, taken: &mut HashSet<String>, ni: usize, kind: BinaryKind) -> bool {
    let n = &g.nodes[ni];
    if n.op != Op::Elementwise(ElementwiseOp::Binary(kind)) || n.inputs.len() != 2 {
        return false;
    }
    let (Some(a), Some(b)) = (n.inputs[0], n.inputs[1]) else {
        return false;
    };
    let (y, c) = match (g.const_value(a).is_some(), g.const_value(b).is_some()) {
        (false, true) => (a, b),
        (true, false) => (b, a),
        _ => return false,
    };
    let c = g.const_value(c).expect("checked").clone();
    let out = n.outputs[0];
    let uses = g.use_counts();
    let Some((ci, contraction)) = single_use_contraction(g, y, &uses) else {
        return false;
    };
    let yf = &g.values[y].fact;
    // the constant must not change the output's shape or dtype by broadcasting
    if yf.shape != g.values[out].fact.shape || yf.dtype != c.dtype() || c.rank() > yf.shape.rank() {
        return false;
    }
    match contraction {
        Contraction::Conv { weight, bias } => {
            let m = weight.shape()[0];
            let Some(v) = per_channel(&c, m, yf.shape.rank(), 1) else {
                return false;
            };
            let (scale, shift) = match kind {
                BinaryKind::Add => (vec![1.0; m], v),
                _ => (v, vec![0.0; m]),
            };
            let (w, b) = scale_conv(&weight, bias.as_deref(), &scale, &shift);
            replace_conv_params(g, taken, ci, ni, w, b);
            true
        }
        Contraction::Gemm => fold_into_gemm(g, taken, ci, ni, &c, kind),
    }
}

/// Folds the constant `c` of the `Add`/`Mul` node `ni` into the `Gemm` node `ci`.
fn fold_into_gemm(
    g: &mut Graph,
    taken: &mut HashSet<String>,
    ci: usize,
    ni: usize,
    c: &Tensor,
    kind: BinaryKind,
) -> bool {
    let Op::Linalg(LinalgOp::Gemm(mut attrs)) = g.nodes[ci].op.clone() else {
        return false;
    };
    let out_shape = match g.values[g.nodes[ci].outputs[0]].fact.shape.as_known() {
        Some(s) => s,
        None => return false,
    };
    let old_c = g.nodes[ci].inputs.get(2).copied().flatten();
    match kind {
        BinaryKind::Mul => {
            let Some(s) = (c.len() == 1).then(|| c.scalar_f64()).flatten() else {
                return false;
            };
            attrs.alpha = (attrs.alpha as f64 * s) as f32;
            attrs.beta = (attrs.beta as f64 * s) as f32;
        }
        _ => {
            // new C = beta * C + c, which must broadcast to the output unchanged
            let dt = c.dtype();
            if dt != DType::F32 && dt != DType::F64 {
                return false;
            }
            let (shape, vals) = match old_c.map(|o| g.const_value(o)) {
                None => (c.shape().to_vec(), c.to_f64_vec()),
                Some(None) => return false,
                Some(Some(t)) => {
                    let Ok(s) = kiln_ir::shape::broadcast_shapes(&[t.shape(), c.shape()]) else {
                        return false;
                    };
                    let (ta, ca) = (t.to_f64_array(), c.to_f64_array());
                    let (Some(ta), Some(ca)) = (
                        ta.broadcast(ndarray::IxDyn(&s)),
                        ca.broadcast(ndarray::IxDyn(&s)),
                    ) else {
                        return false;
                    };
                    let beta = attrs.beta as f64;
                    let v: Vec<f64> = ta
                        .iter()
                        .zip(ca.iter())
                        .map(|(x, y)| beta * x + y)
                        .collect();
                    (s, v)
                }
            };
            if shape.len() > 2
                || kiln_ir::shape::broadcast_shapes(&[&out_shape, &shape]).ok()
                    != Some(out_shape.clone())
            {
                return false;
            }
            attrs.beta = 1.0;
            let name = fresh_name(g, taken, &format!("{}.folded_c", g.nodes[ci].name));
            let t = Tensor::from_vec(&shape, vals).cast(dt);
            let id = g.add_const(name, t);
            g.nodes[ci].inputs.resize(3, None);
            g.nodes[ci].inputs[2] = Some(id);
        }
    }
    let outs = g.nodes[ni].outputs.clone();
    g.nodes[ci].op = Op::Linalg(LinalgOp::Gemm(attrs));
    g.nodes[ci].outputs = outs;
    g.nodes.remove(ni);
    true
}
