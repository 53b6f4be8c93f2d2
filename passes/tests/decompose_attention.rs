//! `decompose_attention`: random `Attention` nodes (3-D and 4-D inputs; multi-, grouped- and
//! multi-query heads; bool and float masks of every rank, shorter than the keys or not, as
//! inputs or constants; causal and window masks; a KV cache; `scale`, `softcap`; every
//! `qk_matmul_output` mode) expanded into ordinary ops compute what the reference op computes,
//! fully-masked rows included.

mod common;

use common::one_node::push_node;
use common::random_f32;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::ops::AttrValue;
use kiln_ir::{interp, DType, Fact, Graph, Op, Shape, Tensor};
use kiln_passes::decompose_attention::decompose_all;
use rand::{Rng, SeedableRng};

/// A graph of one `Attention` node and its random inputs.
fn attention(seed: u64) -> (Graph, Vec<Tensor>, String) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let r = |rng: &mut rand::rngs::StdRng, lo: usize, hi: usize| rng.random_range(lo..hi);
    let (batch, hkv, reps) = (r(&mut rng, 1, 3), r(&mut rng, 1, 3), r(&mut rng, 1, 4));
    let hq = hkv * reps;
    let (sq, kv, head, v_head) = (
        r(&mut rng, 1, 5),
        r(&mut rng, 1, 6),
        r(&mut rng, 1, 5),
        r(&mut rng, 1, 5),
    );
    let past = if rng.random_bool(0.4) {
        r(&mut rng, 1, 4)
    } else {
        0
    };
    let total = past + kv;
    let three = rng.random_bool(0.4);
    // f16 in one case of five (computed in f32 by the expansion)
    let dt = if rng.random_bool(0.2) {
        DType::F16
    } else {
        DType::F32
    };
    let rand = |shape: &[usize], rng: &mut rand::rngs::StdRng| random_f32(shape, rng).cast(dt);
    let mut attrs: Vec<(&str, AttrValue)> = vec![];
    if three {
        attrs.push(("q_num_heads", AttrValue::Int(hq as i64)));
        attrs.push(("kv_num_heads", AttrValue::Int(hkv as i64)));
    }
    if rng.random_bool(0.5) {
        attrs.push(("is_causal", AttrValue::Int(1)));
    }
    if rng.random_bool(0.3) {
        attrs.push(("scale", AttrValue::Float(rng.random_range(0.1..2.0))));
    }
    if rng.random_bool(0.3) {
        attrs.push(("softcap", AttrValue::Float(rng.random_range(0.5..3.0))));
    }
    if rng.random_bool(0.25) {
        attrs.push(("left_window_size", AttrValue::Int(r(&mut rng, 0, 3) as i64)));
    }
    if rng.random_bool(0.25) {
        attrs.push((
            "right_window_size",
            AttrValue::Int(r(&mut rng, 0, 3) as i64),
        ));
    }
    let nout = [1, 3, 4][r(&mut rng, 0, 3)];
    if nout == 4 {
        attrs.push((
            "qk_matmul_output_mode",
            AttrValue::Int(r(&mut rng, 0, 4) as i64),
        ));
    }
    let (q_shape, k_shape, v_shape) = if three {
        (
            vec![batch, sq, hq * head],
            vec![batch, kv, hkv * head],
            vec![batch, kv, hkv * v_head],
        )
    } else {
        (
            vec![batch, hq, sq, head],
            vec![batch, hkv, kv, head],
            vec![batch, hkv, kv, v_head],
        )
    };
    let mut g = Graph {
        name: "attention".into(),
        opset: 25,
        ..Default::default()
    };
    let mut ins = vec![None; 6];
    let mut inputs = vec![];
    let mut add = |g: &mut Graph, slot: usize, t: Tensor, constant: bool| {
        let name = format!("in{slot}");
        let v = if constant {
            g.add_const(name, t)
        } else {
            let v = g.add_value(name, Fact::new(t.dtype(), Shape::known(t.shape())));
            g.inputs.push(v);
            inputs.push(t);
            v
        };
        ins[slot] = Some(v);
    };
    add(&mut g, 0, rand(&q_shape, &mut rng), false);
    add(&mut g, 1, rand(&k_shape, &mut rng), false);
    add(&mut g, 2, rand(&v_shape, &mut rng), false);
    let mask_kind = ["none", "bool", "float"][r(&mut rng, 0, 3)];
    if mask_kind != "none" {
        // right-aligned [.., sq, keys]; keys may fall short of the total (the rest masked)
        let keys = if rng.random_bool(0.3) {
            r(&mut rng, 1, total + 1)
        } else {
            total
        };
        let mut shape = vec![sq, keys];
        let rank = r(&mut rng, 2, 5);
        if rank >= 3 {
            shape.insert(0, if rng.random_bool(0.5) { hq } else { 1 });
        }
        if rank == 4 {
            shape.insert(0, if rng.random_bool(0.5) { batch } else { 1 });
        }
        let n: usize = shape.iter().product();
        let t = if mask_kind == "bool" {
            Tensor::from_vec(&shape, (0..n).map(|_| rng.random_bool(0.7)).collect())
        } else {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.random_bool(0.15) {
                        f32::NEG_INFINITY
                    } else {
                        rng.random_range(-1.0f32..1.0)
                    }
                })
                .collect();
            Tensor::from_vec(&shape, v).cast(dt)
        };
        let constant = rng.random_bool(0.5);
        add(&mut g, 3, t, constant);
    }
    if past > 0 {
        add(&mut g, 4, rand(&[batch, hkv, past, head], &mut rng), false);
        add(
            &mut g,
            5,
            rand(&[batch, hkv, past, v_head], &mut rng),
            false,
        );
    }
    let last = ins.iter().rposition(Option::is_some).unwrap();
    ins.truncate(last + 1);
    push_node(&mut g, ("Attention", 25, "attn"), &attrs, ins, nout);
    let what = format!(
        "seed {seed}: b {batch} hq {hq} hkv {hkv} sq {sq} kv {kv} past {past} head {head}/{v_head} \
         3-D {three} {dt} mask {mask_kind} outputs {nout} {attrs:?}"
    );
    (g, inputs, what)
}

/// Equal where either is not finite (masked scores are −∞), within `rel` of the largest
/// finite magnitude elsewhere.
fn assert_close(what: &str, got: &[Tensor], want: &[Tensor], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (k, (a, e)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.shape(), e.shape(), "{what}: output {k} shape");
        let (av, ev) = (a.to_f64_vec(), e.to_f64_vec());
        let scale = ev
            .iter()
            .filter(|x| x.is_finite())
            .fold(1.0f64, |m, x| m.max(x.abs()));
        for (i, (x, y)) in av.iter().zip(&ev).enumerate() {
            let ok = if x.is_finite() && y.is_finite() {
                (x - y).abs() <= rel * scale
            } else {
                x == y || (x.is_nan() && y.is_nan())
            };
            assert!(ok, "{what}: output {k} element {i}: {x} != {y}");
        }
    }
}

#[test]
fn expanded_attention_matches_the_reference_op() {
    for seed in 0..300 {
        let (g, inputs, what) = attention(seed);
        let want = interp::run(&g, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut d = g.clone();
        assert_eq!(decompose_all(&mut d), 1, "{what}");
        kiln_ir::verify::verify(&d).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            !d.nodes
                .iter()
                .any(|n| matches!(n.op, Op::Nn(NnOp::Attention(_)))),
            "{what}: not expanded"
        );
        let names = |h: &Graph| -> Vec<String> {
            h.outputs
                .iter()
                .map(|&v| h.values[v].name.clone())
                .collect()
        };
        assert_eq!(names(&d), names(&g), "{what}");
        let got = interp::run(&d, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let f16 = g.values[g.outputs[0]].fact.dtype == DType::F16;
        assert_close(&what, &got, &want, if f16 { 2e-3 } else { 1e-5 });
    }
}

/// An external cache (`nonpad_kv_seqlen`: valid keys per batch entry, given at run time, from
/// below zero to past the keys) expands as well, with the causal and window bounds at each
/// entry's offset.
#[test]
fn external_cache_matches_the_reference_op() {
    let mut checked = 0;
    for seed in 0..300 {
        let (mut g, mut inputs, what) = attention(seed);
        if g.nodes[0].inputs.len() > 4 {
            continue; // an internal cache (past_key) excludes an external one
        }
        let batch = inputs[0].shape()[0];
        let total = g.values[g.nodes[0].inputs[1].unwrap()].fact.shape.dims()
            [if inputs[1].shape().len() == 3 { 1 } else { 2 }]
        .known()
        .unwrap() as i64;
        let n = g.add_value("nonpad", Fact::new(DType::I64, Shape::known(&[batch])));
        g.inputs.push(n);
        let lens: Vec<i64> = (0..batch as i64)
            .map(|e| (seed as i64 * 7 + e * 3) % (total + 3) - 1)
            .collect();
        inputs.push(Tensor::vec_i64(&lens));
        g.nodes[0].inputs.resize(7, None);
        g.nodes[0].inputs[6] = Some(n);
        g.infer().unwrap();
        let what = format!("{what} nonpad {lens:?}");
        let want = interp::run(&g, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut d = g.clone();
        assert_eq!(decompose_all(&mut d), 1, "{what}");
        kiln_ir::verify::verify(&d).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = interp::run(&d, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let f16 = g.values[g.outputs[0]].fact.dtype == DType::F16;
        assert_close(&what, &got, &want, if f16 { 2e-3 } else { 1e-5 });
        checked += 1;
    }
    assert!(checked > 100, "{checked}");
}
