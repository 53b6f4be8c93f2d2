//! Random graphs (`passes/tests/common/random_graphs.rs`: matrix products and convolution
//! cells) compiled at `-O0`, `-O2` (equality saturation, DAG-aware extraction) and `-O3`
//! (ILP extraction), run on the CPU, and planned for `cuda:h100` at `-O0` and `-O2` (the
//! GPU cost model picks other rewrites) with the plan emulated on the CPU: every result is
//! what the reference interpreter computes on the input graph. The per-rule and e-graph-level tests check the rewrites;
//! this checks what follows them (folding, fusion, memory planning, codegen) on the graphs
//! the rewrites produce.

use crate::random_graphs::{conv_graph, matrix_graph, rnn_graph, Step, CONV_KINDS, MATRIX_KINDS};
use kiln::ir::{interp, Graph, Tensor};
use kiln::{Compiler, Session, TensorView};
use rand::{Rng, SeedableRng};

/// Compiles `g` at each level, runs it on `inputs`, compares with the interpreter.
fn check(what: &str, g: &Graph, inputs: &[Tensor]) {
    let want = interp::run(g, inputs).unwrap_or_else(|e| panic!("{what}: interpreter: {e}"));
    let data: Vec<Vec<f32>> = inputs
        .iter()
        .map(|t| t.to_f64_vec().into_iter().map(|x| x as f32).collect())
        .collect();
    let views: Vec<TensorView> = inputs
        .iter()
        .zip(&data)
        .map(|(t, d)| TensorView::from_f32(t.shape(), d))
        .collect();
    check_gpu_plan(what, g, inputs, &want);
    for level in [0u8, 2, 3] {
        let case = format!("{what} -O{level}");
        let art = Compiler::new()
            .opt_level(level)
            .compile(g)
            .unwrap_or_else(|e| panic!("{case}: compile: {e:#}"));
        let outs = Session::new(&art)
            .and_then(|s| s.run(&views))
            .unwrap_or_else(|e| panic!("{case}: run: {e:#}"));
        let outs: Vec<Tensor> = outs
            .iter()
            .map(|o| Tensor::from_vec(&o.shape, o.as_f32().expect("f32 output").to_vec()))
            .collect();
        assert_matches(&case, &outs, &want);
    }
}

/// Each output within `1e-4` of the largest expected magnitude (at least 1).
fn assert_matches(case: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len(), "{case}: outputs");
    for (k, (got, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(got.shape(), w.shape(), "{case}: output {k} shape");
        let (got, w) = (got.to_f64_vec(), w.to_f64_vec());
        let scale = w.iter().fold(1f64, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(
            err <= 1e-4 * scale,
            "{case}: output {k}: error {err:.2e} (scale {scale:.2e})"
        );
    }
}

/// Emulates `g`'s `cuda:h100` plan (the GPU lowering and the GPU cost model's rewrites;
/// every launch run on the CPU over a host arena) at each level against the interpreter.
fn check_gpu_plan(what: &str, g: &Graph, inputs: &[Tensor], want: &[Tensor]) {
    for level in [0u8, 2] {
        let case = format!("{what} cuda:h100 -O{level}");
        let opts = kiln::compile::CompileOptions {
            opt_level: Some(level),
            ..Default::default()
        };
        let e = kiln::gpu_compile::emulate_graph(g, "random", "cuda:h100", &opts, inputs, |_| {})
            .unwrap_or_else(|e| panic!("{case}: {e:#}"));
        assert_matches(&case, &e.outputs, want);
    }
}

/// `count` random graphs of each family at `scale` (see the generators), compiled at every
/// level and checked.
fn sweep(seed: u64, count: u64, scale: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..count {
        let n = rng.random_range(3..10);
        let const_w = i % 4 < 2;
        if i % 2 == 0 {
            let ops: Vec<Step> = (0..n)
                .map(|_| Step::random(MATRIX_KINDS, &mut rng))
                .collect();
            let dims = (rng.random(), rng.random(), scale);
            let (g, inputs) = matrix_graph(dims, i % 3 == 0, &ops, const_w, i);
            check(
                &format!("matrix graph {i} x{scale} {ops:?} const {const_w}"),
                &g,
                &inputs,
            );
        } else {
            let ops: Vec<Step> = (0..n).map(|_| Step::random(CONV_KINDS, &mut rng)).collect();
            let (g, inputs) = conv_graph((rng.random(), rng.random(), scale), &ops, const_w, i);
            check(
                &format!("conv cell {i} x{scale} {ops:?} const {const_w}"),
                &g,
                &inputs,
            );
        }
    }
}

#[test]
fn random_graphs_compile_and_run_at_every_level() {
    sweep(2026, 16, 1);
}

/// Unrolled RNNs with shared weights (their input projections merge over the steps at
/// `-O2`), Elman and LSTM cells, weights constant or inputs, tiny and at scale.
#[test]
fn random_rnns_compile_and_run_at_every_level() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2029);
    for i in 0..6u64 {
        let (steps, h, scale) = (rng.random_range(2..7), rng.random(), [1, 8][i as usize % 2]);
        let (lstm, const_w) = (i % 3 != 0, i % 4 < 2);
        let (g, inputs) = rnn_graph((steps, h, scale), lstm, const_w, i);
        check(
            &format!("rnn {i}: {steps} steps h{h} x{scale} lstm {lstm} const {const_w}"),
            &g,
            &inputs,
        );
    }
}

/// Sizes where the CPU kernels tile, vectorise and split into tasks (products up to 192
/// wide, convolutions of 16–32 channels at 17–19 pixels a side).
#[test]
fn bigger_random_graphs_compile_and_run_at_every_level() {
    sweep(2027, 6, 8);
    sweep(2028, 4, 24);
}
