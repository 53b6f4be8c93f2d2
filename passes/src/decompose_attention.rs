//! Expands `Attention` nodes with static shapes into the ops every target compiles: the
//! head split of 3-D inputs (`Reshape`, `Transpose`), the cache concatenation, the scaled
//! product `Q·Kᵀ` (grouped-query heads as one product per key/value head: the query heads
//! sharing a key head are stacked along the rows, so `K` and `V` are never repeated),
//! `softcap`, the mask bias, `Softmax`, the fully-masked-row guard and the product with `V`.
//! Constant parts of the bias (causal and window masks, a constant `attn_mask`) fold into one
//! constant at once, and the guard is left out when no row of a constant bias is fully
//! masked.
//!
//! An external cache (`nonpad_kv_seqlen`, valid keys per batch entry at run time) becomes
//! comparisons of constant index tables with it (the padding, causal and window bounds at
//! the entry's offset). Left as they are (the interpreter runs them on the CPU): shapes that
//! are not all static, and empty inputs.

use crate::graph_builder::Builder;
use kiln_ir::ops::nn::{AttentionAttrs, NnOp, QkOutput};
use kiln_ir::ops::AttrValue;
use kiln_ir::{DType, Graph, Node, Op, Tensor, ValueId};

/// Expands every `Attention` node that can be (see the module doc); returns how many.
pub fn decompose_all(g: &mut Graph) -> usize {
    let mut count = 0;
    let mut ni = 0;
    while ni < g.nodes.len() {
        let attrs = match &g.nodes[ni].op {
            Op::Nn(NnOp::Attention(a)) if expandable(g, &g.nodes[ni]) => a.clone(),
            _ => {
                ni += 1;
                continue;
            }
        };
        let node = g.nodes.remove(ni);
        expand(&mut Builder::new(g, &node), &attrs, &node);
        count += 1;
    }
    if count > 0 {
        g.toposort()
            .expect("expanded attention only reads earlier values");
    }
    count
}

/// Static, non-empty shapes and a float dtype.
fn expandable(g: &Graph, n: &Node) -> bool {
    let known = |v: ValueId| g.values[v].fact.shape.as_known();
    g.values[n.outputs[0]].fact.dtype.is_float()
        && n.inputs
            .iter()
            .flatten()
            .chain(&n.outputs)
            .all(|&v| known(v).is_some_and(|s| !s.contains(&0) || s.is_empty()))
}

fn expand(b: &mut Builder, a: &AttentionAttrs, node: &Node) {
    use kiln_ir::ops::nn::attention::input;
    let input = |i: usize| node.inputs.get(i).copied().flatten();
    let shape = |b: &Builder, v: ValueId| b.g.values[v].fact.shape.as_known().expect("static");
    let (q, k, v) = (
        input(input::Q).expect("Q"),
        input(input::K).expect("K"),
        input(input::V).expect("V"),
    );
    let three = shape(b, q).len() == 3;
    // 4-D [batch, heads, seq, head]
    let heads = |b: &mut Builder, x: ValueId, h: Option<usize>| -> ValueId {
        if !three {
            return x;
        }
        let s = shape(b, x);
        let h = h.expect("3-D inputs name their heads") as i64;
        let r = b.reshape(x, &[s[0] as i64, s[1] as i64, h, s[2] as i64 / h]);
        b.transpose(r, &[0, 2, 1, 3])
    };
    let q4 = heads(b, q, a.q_heads);
    let k4 = heads(b, k, a.kv_heads);
    let v4 = heads(b, v, a.kv_heads);
    let outs = &node.outputs;
    // the cache: present = concat(past, new) on the sequence axis
    let cat = |b: &mut Builder, past: Option<ValueId>, new: ValueId, out: Option<ValueId>| match (
        past, out,
    ) {
        (Some(p), out) => b.op_into("Concat", &[("axis", AttrValue::Int(2))], &[p, new], out),
        (None, Some(o)) => b.op_into("Identity", &[], &[new], Some(o)),
        (None, None) => new,
    };
    let kall = cat(b, input(input::PAST_KEY), k4, outs.get(1).copied());
    let vall = cat(b, input(input::PAST_VALUE), v4, outs.get(2).copied());
    // f16 / bf16 compute in f32 (one rounding at the end, as the reference op does)
    let dt = b.dtype;
    let narrow = matches!(dt, DType::F16 | DType::BF16);
    if narrow {
        b.dtype = DType::F32;
    }
    let wide = |b: &mut Builder, x: ValueId| -> ValueId {
        if narrow {
            b.op(
                "Cast",
                &[("to", AttrValue::Int(DType::F32.to_onnx() as i64))],
                &[x],
            )
        } else {
            x
        }
    };
    let (q4w, kall, vall) = (wide(b, q4), wide(b, kall), wide(b, vall));
    let (qs, ks) = (shape(b, q4), shape(b, kall));
    let (batch, hq, sq, head) = (qs[0] as i64, qs[1] as i64, qs[2] as i64, qs[3]);
    let (hkv, total) = (ks[1] as i64, ks[2] as i64);
    let reps = hq / hkv;
    let v_head = shape(b, vall)[3] as i64;
    // Q·Kᵀ·scale, ONNX's √scale on each side rounded to the dtype first
    let s = Tensor::scalar(a.scale_for(head).sqrt() as f32)
        .cast(dt)
        .to_f64_vec()[0];
    let factor = b.scalar((s * s) as f32);
    let qscaled = b.bin("Mul", q4w, factor);
    // the query heads of one key/value head as one stack of rows
    let grouped = |b: &mut Builder, x: ValueId, cols: i64| -> ValueId {
        if reps == 1 {
            x
        } else {
            b.reshape(x, &[batch, hkv, reps * sq, cols])
        }
    };
    let ungrouped = |b: &mut Builder, x: ValueId, cols: i64| -> ValueId {
        if reps == 1 {
            x
        } else {
            b.reshape(x, &[batch, hq, sq, cols])
        }
    };
    let qg = grouped(b, qscaled, head as i64);
    let kt = b.transpose(kall, &[0, 1, 3, 2]);
    let scores = b.bin("MatMul", qg, kt);
    let mut scores = ungrouped(b, scores, total);
    let raw = scores;
    if a.softcap > 0.0 {
        let c = b.scalar(a.softcap);
        let d = b.bin("Div", scores, c);
        let t = b.op("Tanh", &[], &[d]);
        scores = b.bin("Mul", t, c);
    }
    let past = total - shape(b, k4)[2] as i64;
    let mask = input(input::MASK).map(|m| {
        if b.g.values[m].fact.dtype == DType::Bool {
            m
        } else {
            wide(b, m)
        }
    });
    let nonpad = input(input::NONPAD);
    let bias = mask_bias(b, a, mask, nonpad, (sq as usize, total as usize, past));
    let x = match bias {
        Some(bias) => b.bin("Add", scores, bias),
        None => scores,
    };
    let sm = b.op("Softmax", &[("axis", AttrValue::Int(-1))], &[x]);
    // a row whose bias disallows every key is zero (softmax of −∞ everywhere is NaN)
    let p = match bias {
        Some(bias) => {
            let m = b.op(
                "ReduceMax",
                &[
                    ("axes", AttrValue::Ints(vec![-1])),
                    ("keepdims", AttrValue::Int(1)),
                ],
                &[bias],
            );
            let ninf = b.scalar(f32::NEG_INFINITY);
            let full = b.bin("Equal", m, ninf);
            let none =
                b.g.const_value(full)
                    .is_some_and(|t| t.to_f64_vec().iter().all(|&x| x == 0.0));
            if none {
                sm
            } else {
                let zero = b.scalar(0.0);
                b.op("Where", &[], &[full, zero, sm])
            }
        }
        None => sm,
    };
    if let Some(&out) = outs.get(3) {
        let src = match a.qk_output {
            QkOutput::Raw => raw,
            QkOutput::Scores => scores,
            QkOutput::WithBias => x,
            QkOutput::Probabilities => p,
        };
        narrow_into(b, src, out, narrow.then_some(dt));
    }
    let pg = grouped(b, p, total);
    let y = b.bin("MatMul", pg, vall);
    let y = ungrouped(b, y, v_head);
    let y = if three {
        let t = b.transpose(y, &[0, 2, 1, 3]);
        b.reshape(t, &[batch, sq, hq * v_head])
    } else {
        y
    };
    narrow_into(b, y, outs[0], narrow.then_some(dt));
}

/// `x` written into `out`, cast to `to` when given.
fn narrow_into(b: &mut Builder, x: ValueId, out: ValueId, to: Option<DType>) {
    match to {
        Some(dt) => b.op_into(
            "Cast",
            &[("to", AttrValue::Int(dt.to_onnx() as i64))],
            &[x],
            Some(out),
        ),
        None => b.op_into("Identity", &[], &[x], Some(out)),
    };
}

/// The additive bias `[.., q_seq, total]` of the scores: `attn_mask` (bool → 0 / −∞; keys
/// past its last dim −∞) plus the causal and window masks at the cache offset; `None` when
/// there is nothing to mask. `past` is the cached sequence length; with an external cache
/// (`nonpad`, valid keys per batch entry at run time) the offset is `nonpad − q_seq` per
/// entry and keys past `nonpad` are masked.
fn mask_bias(
    b: &mut Builder,
    a: &AttentionAttrs,
    mask: Option<ValueId>,
    nonpad: Option<ValueId>,
    (sq, total, past): (usize, usize, i64),
) -> Option<ValueId> {
    let ninf = b.scalar(f32::NEG_INFINITY);
    let mask = mask.map(|m| {
        let m = if b.g.values[m].fact.dtype == DType::Bool {
            let zero = b.scalar(0.0);
            b.op("Where", &[], &[m, zero, ninf])
        } else {
            m
        };
        let ms = b.g.values[m].fact.shape.as_known().expect("static");
        let last = *ms.last().expect("a mask has a key axis");
        if last < total {
            let mut pad = ms.clone();
            *pad.last_mut().expect("rank >= 1") = total - last;
            let n = b.name("k");
            let fill = Tensor::from_vec(&pad, vec![f32::NEG_INFINITY; pad.iter().product()]);
            let fill = b.g.add_const(n, fill.cast(b.dtype));
            b.op("Concat", &[("axis", AttrValue::Int(-1))], &[m, fill])
        } else {
            m
        }
    });
    if let Some(n) = nonpad {
        let w = external_cache_bias(b, a, n, sq, total);
        return Some(match mask {
            Some(m) => b.bin("Add", m, w),
            None => w,
        });
    }
    // causal / window: query i (at absolute position i + past) may see key j
    let window = (a.causal || a.windowed()).then(|| {
        let mut v = vec![0f32; sq * total];
        for i in 0..sq {
            for j in 0..total {
                let diff = i as i64 + past - j as i64;
                let out = (a.causal && diff < 0)
                    || (a.left_window >= 0 && diff > a.left_window)
                    || (a.right_window >= 0 && -diff > a.right_window);
                if out {
                    v[i * total + j] = f32::NEG_INFINITY;
                }
            }
        }
        let n = b.name("k");
        b.g.add_const(n, Tensor::from_vec(&[sq, total], v).cast(b.dtype))
    });
    match (mask, window) {
        (Some(m), Some(w)) => Some(b.bin("Add", m, w)),
        (m, w) => m.or(w),
    }
}

/// The bias `[batch, 1, q_seq, total]` of an external cache: query `i` of batch entry `e`
/// may see key `j` when `j < nonpad[e]` and, at the offset `nonpad[e] − q_seq`, the causal
/// and window bounds allow it (each bound a comparison of a constant `[q_seq, total]` index
/// table with the entry's `nonpad`).
fn external_cache_bias(
    b: &mut Builder,
    a: &AttentionAttrs,
    nonpad: ValueId,
    sq: usize,
    total: usize,
) -> ValueId {
    let batch = b.g.values[nonpad].fact.shape.as_known().expect("static")[0] as i64;
    let np = b.reshape(nonpad, &[batch, 1, 1, 1]);
    // a constant [1, 1, q_seq, total] table of f(i, j)
    let table = |b: &mut Builder, f: &dyn Fn(i64, i64) -> i64| -> ValueId {
        let v: Vec<i64> = (0..sq as i64)
            .flat_map(|i| (0..total as i64).map(move |j| (i, j)))
            .map(|(i, j)| f(i, j))
            .collect();
        let n = b.name("k");
        b.g.add_const(n, Tensor::from_vec(&[1, 1, sq, total], v))
    };
    // j < nonpad
    let j = table(b, &|_, j| j);
    let mut allowed = b.bin("Less", j, np);
    let sq = sq as i64;
    let mut and = |b: &mut Builder, c: ValueId| {
        allowed = b.bin("And", allowed, c);
    };
    if a.causal {
        // j <= i + nonpad − q_seq  ⟺  j − i + q_seq <= nonpad
        let t = table(b, &|i, j| j - i + sq);
        let c = b.bin("LessOrEqual", t, np);
        and(b, c);
    }
    if a.left_window >= 0 {
        // i + nonpad − q_seq − j <= left  ⟺  nonpad <= left + q_seq − i + j
        let l = a.left_window;
        let t = table(b, &|i, j| l + sq - i + j);
        let c = b.bin("LessOrEqual", np, t);
        and(b, c);
    }
    if a.right_window >= 0 {
        // j − i − nonpad + q_seq <= right  ⟺  j − i + q_seq − right <= nonpad
        let r = a.right_window;
        let t = table(b, &|i, j| j - i + sq - r);
        let c = b.bin("LessOrEqual", t, np);
        and(b, c);
    }
    let (zero, ninf) = (b.scalar(0.0), b.scalar(f32::NEG_INFINITY));
    b.op("Where", &[], &[allowed, zero, ninf])
}
