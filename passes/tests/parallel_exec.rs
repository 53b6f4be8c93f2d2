//! The lowering of parallel plans to per-rank programs, run in one process (tensors
//! exchanged in memory, segments by the reference interpreter) against the interpreter on
//! the whole graph: pipeline, data-parallel and tensor-parallel plans of the zoo models.

mod common;

use common::{assert_close, load_zoo, ZOO};
use kiln_ir::{Graph, Tensor};
use kiln_passes::parallel::inprocess::run_in_process;
use kiln_passes::parallel::lower::{lower, Step};
use kiln_passes::parallel::pipeline_split::balanced_pipeline;
use kiln_passes::parallel::ParallelPlan;

/// The graph plans are made for: simplified, specialised, folded.
fn prepared(name: &str) -> (Graph, Vec<Tensor>) {
    let (mut g, inputs) = load_zoo(name, 7);
    kiln_ir::simplify::simplify(&mut g);
    kiln_passes::fold_batchnorm::fold_all(&mut g);
    kiln_passes::prepack::pretranspose_gemm_weights(&mut g);
    kiln_ir::simplify::simplify(&mut g);
    (g, inputs)
}

/// Lowers `plan`, checks every segment verifies, runs all ranks in process and compares
/// with the interpreter.
fn check(what: &str, g: &Graph, plan: &ParallelPlan, inputs: &[Tensor]) {
    let progs = lower(g, plan).unwrap_or_else(|e| panic!("{what}: lower: {e}"));
    assert_eq!(progs.ranks.len(), plan.world);
    for p in &progs.ranks {
        for s in &p.steps {
            if let Step::Compute(sg) = s {
                kiln_ir::verify::verify(sg).unwrap_or_else(|e| panic!("{what}: {e}"));
            }
        }
    }
    let expected = kiln_ir::interp::run(g, inputs).unwrap();
    let got = run_in_process(&progs, inputs, |_, _, sg, ins| {
        kiln_ir::interp::run(sg, ins).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_close(what, &got, &expected, 1e-4);
}

#[test]
fn pipeline_plans_of_zoo_models_match_the_interpreter() {
    for name in ZOO {
        let (g, inputs) = prepared(name);
        for world in [2, 4] {
            let plan = balanced_pipeline(&g, world).unwrap();
            check(&format!("{name} pipeline x{world}"), &g, &plan, &inputs);
        }
    }
}

#[test]
fn pipeline_messages_cross_stage_boundaries_only() {
    let (g, _) = prepared("mlp");
    let plan = balanced_pipeline(&g, 2).unwrap();
    let progs = lower(&g, &plan).unwrap();
    // rank 0 sends to rank 1 and gets the output back; rank 1 receives, computes, sends
    let kinds = |r: usize| -> Vec<&'static str> {
        progs.ranks[r]
            .steps
            .iter()
            .map(|s| match s {
                Step::Compute(_) => "compute",
                Step::Send { .. } => "send",
                Step::Recv { .. } => "recv",
                _ => "collective",
            })
            .collect()
    };
    assert_eq!(kinds(1).first(), Some(&"recv"));
    assert_eq!(kinds(1).last(), Some(&"send"));
    assert_eq!(kinds(0).last(), Some(&"recv"));
    assert!(kinds(0).contains(&"compute") && kinds(1).contains(&"compute"));
}

#[test]
fn bad_plans_are_refused_with_a_reason() {
    let (g, _) = prepared("mlp");
    let mut plan = balanced_pipeline(&g, 2).unwrap();
    plan.micro_batches = 0;
    assert!(lower(&g, &plan).unwrap_err().contains("micro_batches"));
    let mut plan = balanced_pipeline(&g, 2).unwrap();
    plan.stages[1].ranks = vec![0];
    assert!(lower(&g, &plan).is_err());
}
