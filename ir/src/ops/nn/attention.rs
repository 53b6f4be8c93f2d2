//! `Attention` (opset 23–25): scaled dot-product attention over `Q`, `K`, `V` in the 4-D
//! `[batch, heads, seq, head_size]` or 3-D `[batch, seq, heads·head_size]` layout, with
//! multi-, grouped- and multi-query heads, a boolean or additive `attn_mask` (its last dim
//! may be shorter than the keys: the rest is masked), causal and sliding-window masks
//! aligned bottom-right on the cache offset, an internal KV cache (`past_key`/`past_value` →
//! `present_key`/`present_value`), an external one (`nonpad_kv_seqlen`), `softcap`, and the
//! optional `qk_matmul_output` in its four modes.
//!
//! The reference computes in f64 and rounds the outputs to `Q`'s dtype. A query row whose
//! mask disallows every key gives a zero row (in `Y` and in mode-3 probabilities), decided on
//! the mask, as ONNX's reference does.

use super::{float_input, from_f64, same_dtype};
use crate::dtype::DType;
use crate::ops::{opt, req, Fact, OnnxNode, OpResult};
use crate::shape::{Dim, Shape};
use crate::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};

/// Input positions of `Attention`.
pub mod input {
    /// `Q`.
    pub const Q: usize = 0;
    /// `K`.
    pub const K: usize = 1;
    /// `V`.
    pub const V: usize = 2;
    /// `attn_mask` (bool, or additive in `Q`'s dtype).
    pub const MASK: usize = 3;
    /// `past_key`.
    pub const PAST_KEY: usize = 4;
    /// `past_value`.
    pub const PAST_VALUE: usize = 5;
    /// `nonpad_kv_seqlen` (int64, one per batch entry).
    pub const NONPAD: usize = 6;
}

/// What the optional fourth output `qk_matmul_output` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QkOutput {
    /// Mode 0: the scaled `Q·Kᵀ`, before `softcap` (as the operator's text and onnxruntime
    /// have it; ONNX's Python reference gives mode 1's value).
    Raw,
    /// Mode 1: the scores after `softcap`.
    Scores,
    /// Mode 2: the scores plus the mask bias.
    WithBias,
    /// Mode 3: the softmax probabilities (fully-masked rows zero).
    Probabilities,
}

/// Attributes of `Attention`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttentionAttrs {
    /// `is_causal`.
    pub causal: bool,
    /// `q_num_heads` (3-D inputs).
    pub q_heads: Option<usize>,
    /// `kv_num_heads` (3-D inputs).
    pub kv_heads: Option<usize>,
    /// `scale` (default `1/√head_size`).
    pub scale: Option<f32>,
    /// `softcap` (0: none).
    pub softcap: f32,
    /// `qk_matmul_output_mode`.
    pub qk_output: QkOutput,
    /// `left_window_size` (-1: unbounded).
    pub left_window: i64,
    /// `right_window_size` (-1: unbounded).
    pub right_window: i64,
    /// Outputs the node declares.
    pub num_outputs: usize,
}

/// The resolved sizes of one `Attention` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// Batch.
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (divides `q_heads`).
    pub kv_heads: usize,
    /// Query sequence length.
    pub q_seq: usize,
    /// New key/value sequence length.
    pub kv_seq: usize,
    /// Cached (`past_key`) sequence length.
    pub past: usize,
    /// Head size of `Q` and `K`.
    pub head: usize,
    /// Head size of `V`.
    pub v_head: usize,
}

impl AttentionDims {
    /// Keys attended: `past + kv_seq`.
    pub fn total(&self) -> usize {
        self.past + self.kv_seq
    }
}

fn window(node: &OnnxNode, name: &str) -> OpResult<i64> {
    let v = node.int_or(name, -1)?;
    if v < -1 {
        return Err(format!(
            "attribute '{name}': expected -1 or more, found {v}"
        ));
    }
    Ok(v)
}

fn heads(node: &OnnxNode, name: &str) -> OpResult<Option<usize>> {
    node.int(name)?
        .map(|v| super::size_attr(name, v, 1))
        .transpose()
}

impl AttentionAttrs {
    /// Parses the attributes of an `Attention` node.
    pub fn parse(node: &OnnxNode) -> OpResult<AttentionAttrs> {
        let qk_output = match node.int_or("qk_matmul_output_mode", 0)? {
            0 => QkOutput::Raw,
            1 => QkOutput::Scores,
            2 => QkOutput::WithBias,
            3 => QkOutput::Probabilities,
            m => {
                return Err(format!(
                    "attribute 'qk_matmul_output_mode': expected 0 to 3, found {m}"
                ))
            }
        };
        if let Some(p) = node.int("softmax_precision")? {
            if ![1, 10, 11, 16].contains(&p) {
                return Err(format!(
                    "attribute 'softmax_precision': expected 1, 10, 11 or 16, found {p}"
                ));
            }
        }
        let softcap = node.float_or("softcap", 0.0)?;
        if softcap.is_nan() || softcap < 0.0 {
            return Err(format!(
                "attribute 'softcap': expected a non-negative value, found {softcap}"
            ));
        }
        let scale = node.float("scale")?;
        if scale.is_some_and(|s| !s.is_finite()) {
            return Err("attribute 'scale': expected a finite value".into());
        }
        Ok(AttentionAttrs {
            causal: node.int_or("is_causal", 0)? != 0,
            q_heads: heads(node, "q_num_heads")?,
            kv_heads: heads(node, "kv_num_heads")?,
            scale,
            softcap,
            qk_output,
            left_window: window(node, "left_window_size")?,
            right_window: window(node, "right_window_size")?,
            num_outputs: node.num_outputs,
        })
    }

    /// (min inputs, max inputs, max outputs).
    pub fn arity(&self) -> (usize, usize, usize) {
        (3, 7, 4)
    }

    /// Whether a sliding window restricts the keys.
    pub fn windowed(&self) -> bool {
        self.left_window >= 0 || self.right_window >= 0
    }

    /// The scale `Q·Kᵀ` is multiplied by, for query head size `head`.
    pub fn scale_for(&self, head: usize) -> f64 {
        self.scale.map_or(1.0 / (head as f64).sqrt(), |s| s as f64)
    }

    /// Output types: `Y`, `present_key`, `present_value`, `qk_matmul_output`.
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let (q, k, v) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        let dt = float_input(q, "Q")?;
        same_dtype(k, "K", dt, "Q")?;
        same_dtype(v, "V", dt, "Q")?;
        let rank = q.shape.rank();
        if rank != 3 && rank != 4 {
            return Err(format!(
                "input 'Q': expected rank 3 or 4, found {}",
                q.shape
            ));
        }
        for (f, name) in [(k, "K"), (v, "V")] {
            if f.shape.rank() != rank {
                return Err(format!(
                    "input '{name}': expected rank {rank} like 'Q', found {}",
                    f.shape
                ));
            }
        }
        let (qd, kd, vd) = (q.shape.dims(), k.shape.dims(), v.shape.dims());
        let k_ = Dim::Known;
        // 4-D views: [batch, heads, seq, head]
        let (q4, k4, v4) = if rank == 4 {
            for (given, at, name) in [
                (self.q_heads, &qd[1], "q_num_heads"),
                (self.kv_heads, &kd[1], "kv_num_heads"),
            ] {
                if given.is_some_and(|h| !at.compatible(&k_(h))) {
                    return Err(format!(
                        "attribute '{name}': {} does not match the inputs' {at} heads",
                        given.unwrap_or(0)
                    ));
                }
            }
            (qd.to_vec(), kd.to_vec(), vd.to_vec())
        } else {
            let (Some(hq), Some(hkv)) = (self.q_heads, self.kv_heads) else {
                return Err(
                    "3-D inputs need the attributes 'q_num_heads' and 'kv_num_heads'".into(),
                );
            };
            let split = |d: &[Dim], h: usize, name: &str| -> OpResult<Vec<Dim>> {
                let head = match d[2].known() {
                    Some(n) if n % h == 0 => k_(n / h),
                    Some(n) => {
                        return Err(format!(
                            "input '{name}': hidden size {n} is not a multiple of {h} heads"
                        ))
                    }
                    None => Dim::unknown(),
                };
                Ok(vec![d[0].clone(), k_(h), d[1].clone(), head])
            };
            (
                split(qd, hq, "Q")?,
                split(kd, hkv, "K")?,
                split(vd, hkv, "V")?,
            )
        };
        let mismatch = |what: &str, a: &Dim, b: &Dim| -> OpResult<()> {
            if a.compatible(b) {
                Ok(())
            } else {
                Err(format!(
                    "{what}: {a} != {b} (Q {}, K {}, V {})",
                    q.shape, k.shape, v.shape
                ))
            }
        };
        mismatch("batch of K", &k4[0], &q4[0])?;
        mismatch("batch of V", &v4[0], &q4[0])?;
        mismatch("heads of V", &v4[1], &k4[1])?;
        mismatch("sequence of V", &v4[2], &k4[2])?;
        mismatch("head size of K", &k4[3], &q4[3])?;
        if let (Some(hq), Some(hkv)) = (q4[1].known(), k4[1].known()) {
            if hkv == 0 || hq % hkv != 0 {
                return Err(format!(
                    "{hq} query heads are not a multiple of {hkv} key/value heads"
                ));
            }
        }
        let past = match (opt(inputs, input::PAST_KEY), opt(inputs, input::PAST_VALUE)) {
            (None, None) => None,
            (Some(pk), Some(pv)) => {
                same_dtype(pk, "past_key", dt, "Q")?;
                same_dtype(pv, "past_value", dt, "Q")?;
                let want = |f: &Fact, name: &str, head: &Dim| -> OpResult<()> {
                    let d = f.shape.dims();
                    let ok = d.len() == 4
                        && d[0].compatible(&q4[0])
                        && d[1].compatible(&k4[1])
                        && d[3].compatible(head);
                    if ok {
                        Ok(())
                    } else {
                        Err(format!(
                            "input '{name}': expected [{}, {}, past, {head}], found {}",
                            q4[0], k4[1], f.shape
                        ))
                    }
                };
                want(pk, "past_key", &k4[3])?;
                want(pv, "past_value", &v4[3])?;
                mismatch(
                    "past length of past_value",
                    pv.shape.dim(2),
                    pk.shape.dim(2),
                )?;
                Some(pk.shape.dim(2).clone())
            }
            _ => return Err("inputs 'past_key' and 'past_value' go together".into()),
        };
        if let Some(n) = opt(inputs, input::NONPAD) {
            if past.is_some() {
                return Err("input 'nonpad_kv_seqlen' cannot be used with 'past_key'".into());
            }
            if n.dtype != DType::I64 || n.shape.rank() != 1 || !n.shape.dim(0).compatible(&q4[0]) {
                return Err(format!(
                    "input 'nonpad_kv_seqlen': expected int64 [{}], found {} {}",
                    q4[0], n.dtype, n.shape
                ));
            }
        }
        let total = match &past {
            None => k4[2].clone(),
            Some(p) => match (p.known(), k4[2].known()) {
                (Some(a), Some(b)) => k_(a + b),
                _ => Dim::unknown(),
            },
        };
        if let Some(m) = opt(inputs, input::MASK) {
            if m.dtype != DType::Bool {
                same_dtype(m, "attn_mask", dt, "Q")?;
            }
            let md = m.shape.dims();
            let full = [&q4[0], &q4[1], &q4[2], &total];
            let ok = (1..=4).contains(&md.len())
                && md
                    .iter()
                    .rev()
                    .zip(full.iter().rev())
                    .enumerate()
                    .all(|(i, (a, b))| {
                        a == &k_(1)
                            || a.compatible(b)
                            || (i == 0
                                && matches!((a.known(), b.known()), (Some(x), Some(y)) if x < y))
                    });
            if !ok {
                return Err(format!(
                    "input 'attn_mask': shape {} does not broadcast to [{}, {}, {}, {total}]",
                    m.shape, q4[0], q4[1], q4[2]
                ));
            }
        }
        let y = if rank == 4 {
            vec![q4[0].clone(), q4[1].clone(), q4[2].clone(), v4[3].clone()]
        } else {
            let hidden = match (q4[1].known(), v4[3].known()) {
                (Some(h), Some(d)) => k_(h * d),
                _ => Dim::unknown(),
            };
            vec![q4[0].clone(), q4[2].clone(), hidden]
        };
        let mut outs = vec![Fact::new(dt, Shape(y))];
        let present = |head: &Dim| {
            Fact::new(
                dt,
                Shape(vec![
                    q4[0].clone(),
                    k4[1].clone(),
                    total.clone(),
                    head.clone(),
                ]),
            )
        };
        if self.num_outputs >= 2 {
            outs.push(present(&k4[3]));
        }
        if self.num_outputs >= 3 {
            outs.push(present(&v4[3]));
        }
        if self.num_outputs >= 4 {
            outs.push(Fact::new(
                dt,
                Shape(vec![q4[0].clone(), q4[1].clone(), q4[2].clone(), total]),
            ));
        }
        Ok(outs)
    }

    /// The reference attention.
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let q = req(inputs, input::Q)?;
        let dt = q.dtype();
        let rank = q.shape().len();
        // 4-D [batch, heads, seq, head] values
        let four = |t: &Tensor, heads: Option<usize>| -> (Vec<f64>, [usize; 4]) {
            let s = t.shape();
            if rank == 4 {
                return (t.to_f64_vec(), [s[0], s[1], s[2], s[3]]);
            }
            let h = heads.expect("checked by infer");
            let shape = [s[0], h, s[1], s[2] / h];
            let a = ArrayD::from_shape_vec(IxDyn(&[s[0], s[1], h, s[2] / h]), t.to_f64_vec())
                .expect("shape checked by infer");
            (
                a.permuted_axes(IxDyn(&[0, 2, 1, 3]))
                    .iter()
                    .copied()
                    .collect(),
                shape,
            )
        };
        let (qv, qs) = four(q, self.q_heads);
        let (kv, ks) = four(req(inputs, input::K)?, self.kv_heads);
        let (vv, vs) = four(req(inputs, input::V)?, self.kv_heads);
        let past = opt(inputs, input::PAST_KEY).map_or(0, |t| t.shape()[2]);
        let d = AttentionDims {
            batch: qs[0],
            q_heads: qs[1],
            kv_heads: ks[1],
            q_seq: qs[2],
            kv_seq: ks[2],
            past,
            head: qs[3],
            v_head: vs[3],
        };
        let total = d.total();
        // present = concat(past, new) along the sequence
        let concat = |p: Option<&Tensor>, new: &[f64], head: usize| -> Vec<f64> {
            let pv = p.map(|t| t.to_f64_vec()).unwrap_or_default();
            let mut out = Vec::with_capacity(d.batch * d.kv_heads * total * head);
            for bh in 0..d.batch * d.kv_heads {
                out.extend_from_slice(&pv[bh * past * head..][..past * head]);
                out.extend_from_slice(&new[bh * d.kv_seq * head..][..d.kv_seq * head]);
            }
            out
        };
        let pk = concat(opt(inputs, input::PAST_KEY), &kv, d.head);
        let pv = concat(opt(inputs, input::PAST_VALUE), &vv, d.v_head);
        let nonpad: Option<Vec<i64>> = opt(inputs, input::NONPAD).map(|t| t.to_i64_vec());
        if let Some(n) = &nonpad {
            if n.len() != d.batch {
                return Err(format!(
                    "input 'nonpad_kv_seqlen': {} entries for a batch of {}",
                    n.len(),
                    d.batch
                ));
            }
        }
        let bias = Bias::new(self, &d, opt(inputs, input::MASK), nonpad.as_deref())?;
        // Q and K are each scaled by √scale, as ONNX specifies (rounded to the dtype)
        let s = round_to(dt, self.scale_for(d.head).sqrt());
        let softcap = self.softcap as f64;
        let reps = d.q_heads / d.kv_heads;
        let mut y = vec![0.0; d.batch * d.q_heads * d.q_seq * d.v_head];
        let mut qk_out = vec![0.0; d.batch * d.q_heads * d.q_seq * total];
        let mut scores = vec![0.0; total];
        let mut raw = vec![0.0; total];
        let mut biases = vec![0.0; total];
        for b in 0..d.batch {
            for h in 0..d.q_heads {
                let kvh = (b * d.kv_heads + h / reps) * total;
                for i in 0..d.q_seq {
                    let qrow = &qv[((b * d.q_heads + h) * d.q_seq + i) * d.head..][..d.head];
                    for j in 0..total {
                        let krow = &pk[(kvh + j) * d.head..][..d.head];
                        let mut x: f64 =
                            qrow.iter().zip(krow).map(|(a, c)| (a * s) * (c * s)).sum();
                        raw[j] = x;
                        if softcap > 0.0 {
                            x = softcap * (x / softcap).tanh();
                        }
                        scores[j] = x;
                        biases[j] = bias.at(b, h, i, j);
                    }
                    let row = ((b * d.q_heads + h) * d.q_seq + i) * total;
                    let out = &mut qk_out[row..][..total];
                    match self.qk_output {
                        QkOutput::Raw => out.copy_from_slice(&raw),
                        QkOutput::Scores => out.copy_from_slice(&scores),
                        QkOutput::WithBias => {
                            for j in 0..total {
                                out[j] = scores[j] + biases[j];
                            }
                        }
                        QkOutput::Probabilities => {}
                    }
                    // softmax; a row the mask disallows entirely is zero
                    let masked = biases.iter().all(|&v| v == f64::NEG_INFINITY);
                    let x: Vec<f64> = scores.iter().zip(&biases).map(|(a, c)| a + c).collect();
                    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| {
                        if v.is_nan() || m.is_nan() {
                            f64::NAN
                        } else {
                            m.max(v)
                        }
                    });
                    let p: Vec<f64> = if masked || m == f64::NEG_INFINITY {
                        vec![0.0; total]
                    } else {
                        let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        e.iter().map(|v| v / sum).collect()
                    };
                    if self.qk_output == QkOutput::Probabilities {
                        out.copy_from_slice(&p);
                    }
                    let yrow = &mut y[((b * d.q_heads + h) * d.q_seq + i) * d.v_head..][..d.v_head];
                    for (j, &pj) in p.iter().enumerate() {
                        if pj != 0.0 {
                            let vrow = &pv[(kvh + j) * d.v_head..][..d.v_head];
                            for (o, &vj) in yrow.iter_mut().zip(vrow) {
                                *o += pj * vj;
                            }
                        }
                    }
                }
            }
        }
        let y = if rank == 4 {
            from_f64(dt, &[d.batch, d.q_heads, d.q_seq, d.v_head], y)?
        } else {
            let a = ArrayD::from_shape_vec(IxDyn(&[d.batch, d.q_heads, d.q_seq, d.v_head]), y)
                .map_err(|e| format!("internal: {e}"))?;
            let t: Vec<f64> = a
                .permuted_axes(IxDyn(&[0, 2, 1, 3]))
                .iter()
                .copied()
                .collect();
            from_f64(dt, &[d.batch, d.q_seq, d.q_heads * d.v_head], t)?
        };
        let mut outs = vec![y];
        if self.num_outputs >= 2 {
            outs.push(from_f64(dt, &[d.batch, d.kv_heads, total, d.head], pk)?);
        }
        if self.num_outputs >= 3 {
            outs.push(from_f64(dt, &[d.batch, d.kv_heads, total, d.v_head], pv)?);
        }
        if self.num_outputs >= 4 {
            outs.push(from_f64(dt, &[d.batch, d.q_heads, d.q_seq, total], qk_out)?);
        }
        Ok(outs)
    }
}

/// `v` rounded to `dt` (as a `Cast` would).
fn round_to(dt: DType, v: f64) -> f64 {
    Tensor::from_f64_array(dt, ArrayD::from_elem(IxDyn(&[]), v)).to_f64_vec()[0]
}

/// The additive bias of every score: `attn_mask` (bool: 0 or −∞; float: added, its missing
/// trailing keys −∞), the causal and window masks at the cache offset, and the padding of an
/// external cache.
struct Bias<'a> {
    attrs: &'a AttentionAttrs,
    /// The mask's values as 4-D `[b, h, q, k]` with its broadcast dims of size 1.
    mask: Option<(Vec<f64>, [usize; 4])>,
    /// Per batch entry: the causal/window offset, and the valid key count.
    offset: Vec<i64>,
    valid: Vec<usize>,
}

impl<'a> Bias<'a> {
    fn new(
        attrs: &'a AttentionAttrs,
        d: &AttentionDims,
        mask: Option<&Tensor>,
        nonpad: Option<&[i64]>,
    ) -> OpResult<Bias<'a>> {
        let total = d.total();
        let mask = mask.map(|m| {
            let s = m.shape();
            let mut dims = [1usize; 4];
            dims[4 - s.len()..].copy_from_slice(s);
            let bool_mask = m.dtype() == DType::Bool;
            let v = m
                .to_f64_vec()
                .into_iter()
                .map(|x| match (bool_mask, x != 0.0) {
                    (true, true) => 0.0,
                    (true, false) => f64::NEG_INFINITY,
                    (false, _) => x,
                })
                .collect();
            (v, dims)
        });
        if let Some((_, dims)) = &mask {
            if dims[3] > total {
                return Err(format!(
                    "input 'attn_mask': {} keys for {total} keys in all",
                    dims[3]
                ));
            }
        }
        let (offset, valid) = match nonpad {
            Some(n) => (
                n.iter().map(|&v| v - d.q_seq as i64).collect(),
                n.iter()
                    .map(|&v| usize::try_from(v).map_or(0, |v| v.min(total)))
                    .collect(),
            ),
            None => (vec![d.past as i64; d.batch], vec![total; d.batch]),
        };
        Ok(Bias {
            attrs,
            mask,
            offset,
            valid,
        })
    }

    fn at(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        let mut v = 0.0;
        if let Some((m, dims)) = &self.mask {
            v = if j >= dims[3] {
                f64::NEG_INFINITY
            } else {
                let ix = |x: usize, n: usize| if n == 1 { 0 } else { x };
                m[((ix(b, dims[0]) * dims[1] + ix(h, dims[1])) * dims[2] + ix(i, dims[2]))
                    * dims[3]
                    + j]
            };
        }
        let diff = i as i64 + self.offset[b] - j as i64;
        let a = self.attrs;
        let out = (a.causal && diff < 0)
            || (a.left_window >= 0 && diff > a.left_window)
            || (a.right_window >= 0 && -diff > a.right_window)
            || j >= self.valid[b];
        if out {
            f64::NEG_INFINITY
        } else {
            v
        }
    }
}
