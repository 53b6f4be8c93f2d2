//! ONNX `Attention` through the whole compiler: expanded into ordinary ops (`decompose`
//! stage), compiled for the CPU at `-O0` and `-O2` with every kernel compiled to code, and
//! planned for `cuda:h100` (the plan emulated on the CPU), every result equal to the
//! reference op's.

use crate::conformance_artifact::run_artifact;
use crate::one_node::push_node;
use kiln::compile::{compile_graph, CompileOptions};
use kiln::ir::ops::AttrValue;
use kiln::ir::{interp, Fact, Graph, Shape, Tensor};
use kiln::runtime::Model;
use rand::{Rng, SeedableRng};

/// A decoder step's attention: 3-D `Q`/`K`/`V` inputs with 8 query heads over 2 key/value
/// heads of size 16, a KV cache of 5, a bool padding mask (one batch entry fully masked),
/// causal; outputs `Y` and the new cache. `softcap` variant: 4-D inputs, a constant float mask, softcap and the scores with
/// their bias as a fourth output.
fn model(softcap: bool, seed: u64) -> (Graph, Vec<Tensor>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |dims: &[usize]| {
        let n = dims.iter().product();
        Tensor::from_vec(dims, (0..n).map(|_| rng.random_range(-1f32..1.0)).collect())
    };
    let (b, hq, hkv, sq, kv, past, d) = (2, 8, 2, 3, 3, 5, 16);
    let total = past + kv;
    let mut g = Graph {
        name: "attention".into(),
        opset: 23,
        ..Default::default()
    };
    let mut inputs = vec![];
    let mut input = |g: &mut Graph, name: &str, t: Tensor| {
        let v = g.add_value(name, Fact::new(t.dtype(), Shape::known(t.shape())));
        g.inputs.push(v);
        inputs.push(t);
        Some(v)
    };
    let (ins, attrs, nout) = if softcap {
        let q = input(&mut g, "q", t(&[b, hq, sq, d]));
        let k = input(&mut g, "k", t(&[b, hkv, total, d]));
        let v = input(&mut g, "v", t(&[b, hkv, total, d]));
        let mask = g.add_const("mask", t(&[hq, sq, total]));
        (
            vec![q, k, v, Some(mask)],
            vec![
                ("softcap", AttrValue::Float(2.0)),
                ("qk_matmul_output_mode", AttrValue::Int(2)),
            ],
            4,
        )
    } else {
        let q = input(&mut g, "q", t(&[b, sq, hq * d]));
        let k = input(&mut g, "k", t(&[b, kv, hkv * d]));
        let v = input(&mut g, "v", t(&[b, kv, hkv * d]));
        // batch entry 0 skips key 1; entry 1 attends nothing (its rows are zero)
        let keep: Vec<bool> = (0..b * total)
            .map(|i| i / total == 0 && i % total != 1)
            .collect();
        let mask = input(&mut g, "mask", Tensor::from_vec(&[b, 1, 1, total], keep));
        let pk = input(&mut g, "past_key", t(&[b, hkv, past, d]));
        let pv = input(&mut g, "past_value", t(&[b, hkv, past, d]));
        (
            vec![q, k, v, mask, pk, pv],
            vec![
                ("is_causal", AttrValue::Int(1)),
                ("q_num_heads", AttrValue::Int(hq as i64)),
                ("kv_num_heads", AttrValue::Int(hkv as i64)),
            ],
            3,
        )
    };
    push_node(&mut g, ("Attention", 23, "attn"), &attrs, ins, nout);
    (g, inputs)
}

fn assert_close(case: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len(), "{case}");
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.shape(), b.shape(), "{case}");
        for (x, y) in a.to_f64_vec().iter().zip(b.to_f64_vec()) {
            // masked scores are −∞ in both
            let ok = if y.is_finite() {
                (x - y).abs() < 1e-4
            } else {
                *x == y
            };
            assert!(ok, "{case}: output {k}: {x} != {y}");
        }
    }
}

#[test]
fn attention_compiles_for_cpu_and_gpu() {
    for softcap in [false, true] {
        let (g, inputs) = model(softcap, softcap as u64);
        let want = interp::run(&g, &inputs).unwrap();
        for level in [0u8, 2] {
            let case = format!("softcap {softcap} -O{level}");
            let opts = CompileOptions {
                opt_level: Some(level),
                ..Default::default()
            };
            let (art, report) = compile_graph(&g, "attention", &opts, |_, _| {}).unwrap();
            assert!(
                report.reference.is_empty(),
                "{case}: reference steps {:?}",
                report.reference
            );
            let mut m = Model::from_artifact(art, "attention").unwrap();
            let got = run_artifact(&mut m, &inputs).unwrap();
            assert_close(&case, &got, &want);
            let e =
                kiln::gpu_compile::emulate_graph(&g, "attn", "cuda:h100", &opts, &inputs, |_| {})
                    .unwrap_or_else(|e| panic!("{case} cuda:h100: {e:#}"));
            assert_close(&format!("{case} cuda:h100"), &e.outputs, &want);
        }
    }
}
