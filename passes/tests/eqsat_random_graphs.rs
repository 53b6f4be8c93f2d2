//! Whole random graphs through `eqsat::optimize`: the per-rule property tests
//! (`eqsat_rules.rs`) check each rewrite alone; here many rules interact in one e-graph,
//! and the extracted graph (greedy, DAG-aware and ILP extractors, under cost models that
//! favour different rewrites) must compute what the input graph computes on random inputs
//! (reference interpreter), keep its input/output names, and never cost more.
//!
//! Two families: products of matrices (MatMul chains, shared inputs, parallel projections,
//! transposes, concat/slice/split, reshapes, elementwise ops with broadcasting) and
//! convolution cells (1×1/3×3/grouped Convs sharing inputs, pools, BatchNorm, channel
//! concat/slice). Weights are graph inputs in some cases, constants in others (then
//! weight-only sub-graphs fold).

mod common;
#[path = "common/random_graphs.rs"]
mod random_graphs;

use common::assert_close;
use kiln_ir::{interp, Graph, Tensor};
use kiln_passes::eqsat::cost::Device;
use kiln_passes::eqsat::{optimize, EqsatOptions, ExtractorKind};
use proptest::prelude::*;
use rand::SeedableRng;
use random_graphs::{conv_graph, matrix_graph, rnn_graph, Step, CONV_KINDS, MATRIX_KINDS};

fn steps(kinds: u8) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (0..kinds, 0u8..6, 0u8..16, any::<u8>()).prop_map(|(kind, a, b, p)| Step { kind, a, b, p }),
        2..12,
    )
}

/// Cost models that favour different rewrites: a CPU core, an H100, and a device where
/// only the number of kernels counts (every merge pays).
fn devices() -> Vec<Device> {
    let launch_bound = Device {
        name: "launch-bound".into(),
        launch_us: 1000.0,
        ..Device::cpu()
    };
    vec![
        Device::cpu(),
        Device::gpu("h100", 132, 51_000.0, 3350.0),
        launch_bound,
    ]
}

/// Optimizes `g` with every extractor under every device model and checks the result.
fn check(what: &str, g: &Graph, inputs: &[Tensor]) {
    let want = interp::run(g, inputs).unwrap_or_else(|e| panic!("{what}: input graph: {e}"));
    for device in devices() {
        for extractor in ExtractorKind::ALL {
            let opts = EqsatOptions {
                extractor,
                device: device.clone(),
                ilp_time_limit: std::time::Duration::from_millis(300),
                ..Default::default()
            };
            let case = format!("{what} ({}, {extractor:?})", device.name);
            let (out, rep) = optimize(g, &opts).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(
                rep.cost_after <= rep.cost_before * (1.0 + 1e-9),
                "{case}: cost {} -> {}",
                rep.cost_before,
                rep.cost_after
            );
            let names = |h: &Graph, vs: &[usize]| -> Vec<String> {
                vs.iter().map(|&v| h.values[v].name.clone()).collect()
            };
            assert_eq!(
                names(&out, &out.inputs),
                names(g, &g.inputs),
                "{case}: inputs"
            );
            assert_eq!(
                names(&out, &out.outputs),
                names(g, &g.outputs),
                "{case}: outputs"
            );
            let got =
                interp::run(&out, inputs).unwrap_or_else(|e| panic!("{case}: result: {e}\n{rep}"));
            assert_close(&format!("{case}\n{rep}"), &got, &want, 1e-4);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_matrix_graphs_keep_their_values(
        r in 0u8..3, c in 0u8..5, two in any::<bool>(), const_w in any::<bool>(),
        ops in steps(MATRIX_KINDS), seed in any::<u64>(),
    ) {
        let (g, inputs) = matrix_graph((r, c, 1), two, &ops, const_w, seed);
        check(&format!("matrix graph {ops:?} const {const_w}"), &g, &inputs);
    }

    #[test]
    fn random_conv_cells_keep_their_values(
        c in 0u8..3, hw in 0u8..3, const_w in any::<bool>(), ops in steps(CONV_KINDS), seed in any::<u64>(),
    ) {
        let (g, inputs) = conv_graph((c, hw, 1), &ops, const_w, seed);
        check(&format!("conv cell {ops:?} const {const_w}"), &g, &inputs);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn random_rnns_keep_their_values(
        steps in 1usize..6, h in 0u8..5, lstm in any::<bool>(), const_w in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let (g, inputs) = rnn_graph((steps, h, 1), lstm, const_w, seed);
        check(&format!("rnn {steps} steps h{h} lstm {lstm} const {const_w}"), &g, &inputs);
    }
}

/// An unrolled LSTM whose weights every step shares: under the CPU model the steps' input
/// projections become one product over the steps' rows (the weight is read once instead of
/// once per step), the recurrent ones stay one per step, and the result is unchanged.
#[test]
fn rnn_input_projections_merge_over_the_steps() {
    let steps = 6;
    let (g, inputs) = rnn_graph((steps, 4, 8), true, true, 3);
    let want = interp::run(&g, &inputs).unwrap();
    let products = |h: &Graph| -> Vec<Vec<usize>> {
        h.nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.op,
                    kiln_ir::Op::Linalg(kiln_ir::ops::linalg::LinalgOp::MatMul)
                )
            })
            .map(|n| h.values[n.outputs[0]].fact.shape.as_known().unwrap())
            .collect()
    };
    assert_eq!(products(&g).len(), 2 * steps);
    for extractor in [ExtractorKind::Dag, ExtractorKind::Ilp] {
        let opts = EqsatOptions {
            extractor,
            ..Default::default()
        };
        let (out, rep) = optimize(&g, &opts).unwrap();
        assert!(
            rep.rules_applied.contains_key("merge-shared-weight"),
            "{rep}"
        );
        let p = products(&out);
        assert_eq!(p.len(), steps + 1, "{extractor:?}: {p:?}\n{rep}");
        assert!(p.contains(&vec![steps, 4 * 64]), "{extractor:?}: {p:?}");
        assert!(rep.cost_after < 0.8 * rep.cost_before, "{rep}");
        assert_close(
            &format!("{extractor:?}"),
            &interp::run(&out, &inputs).unwrap(),
            &want,
            1e-4,
        );
    }
}

/// The generators reach what they are meant to exercise: the multi-pattern merges,
/// reassociation and the Concat/Slice algebra apply in their graphs.
#[test]
fn random_graphs_reach_the_merge_rules() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut applied = std::collections::BTreeSet::new();
    for i in 0..40u64 {
        let ops: Vec<Step> = (0..8)
            .map(|_| Step::random(MATRIX_KINDS, &mut rng))
            .collect();
        let (g, _) = if i % 2 == 0 {
            matrix_graph((1, 2, 1), true, &ops, i % 4 == 0, i)
        } else {
            conv_graph((1, 1, 1), &ops, i % 4 == 1, i)
        };
        let opts = EqsatOptions {
            device: devices().pop().unwrap(),
            ..Default::default()
        };
        let (_, rep) = optimize(&g, &opts).unwrap();
        applied.extend(rep.rules_applied.into_keys());
    }
    for rule in [
        "merge-parallel-matmul",
        "merge-parallel-conv",
        "matmul-assoc",
        "concat-slices",
        "merge-shared-weight",
    ] {
        assert!(applied.contains(rule), "{rule} never applied: {applied:?}");
    }
}
