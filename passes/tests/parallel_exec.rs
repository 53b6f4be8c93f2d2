//! The lowering of parallel plans to per-rank programs, run in one process (tensors
//! exchanged in memory, segments by the reference interpreter) against the interpreter on
//! the whole graph: pipeline, data-parallel and tensor-parallel plans of the zoo models.

mod common;

use common::{assert_close, load_zoo, ZOO};
use kiln_ir::{Graph, Tensor};
use kiln_passes::parallel::inprocess::run_in_process;
use kiln_passes::parallel::lower::{lower, Step};
use kiln_passes::parallel::pipeline_split::{alternating_splits, balanced_pipeline};
use kiln_passes::parallel::{ParallelPlan, Stage, StageMode};

/// The graph plans are made for: simplified, specialised, folded.
fn prepared(name: &str) -> (Graph, Vec<Tensor>) {
    let (mut g, inputs) = load_zoo(name, 7);
    kiln_ir::simplify::simplify(&mut g);
    kiln_passes::fold_batchnorm::fold_all(&mut g);
    kiln_passes::prepack::pretranspose_gemm_weights(&mut g);
    kiln_ir::simplify::simplify(&mut g);
    (g, inputs)
}

/// A zoo model at batch 4 (integer inputs: the test data repeated; float inputs random).
fn prepared_batch4(name: &str) -> (Graph, Vec<Tensor>) {
    prepared_batch(name, 4, 4)
}

/// A zoo model prepared at batch `b`, with inputs of batch `n` (the test data repeated).
fn prepared_batch(name: &str, b: usize, n: usize) -> (Graph, Vec<Tensor>) {
    let dir = common::zoo_dir(name);
    let mut g = kiln_ir::onnx::load(dir.join("model.onnx")).unwrap();
    let (_, small) = load_zoo(name, 3);
    let inputs: Vec<Tensor> = small
        .iter()
        .map(|t| {
            let parts = vec![t.clone(); n / t.shape()[0]];
            kiln_passes::parallel::inprocess::concat(&parts, 0).unwrap()
        })
        .collect();
    let shapes: Vec<Vec<usize>> = inputs
        .iter()
        .map(|t| {
            let mut s = t.shape().to_vec();
            s[0] = b;
            s
        })
        .collect();
    kiln_passes::specialize::specialize_inputs(&mut g, &shapes).unwrap();
    kiln_ir::simplify::simplify(&mut g);
    kiln_passes::fold_batchnorm::fold_all(&mut g);
    kiln_passes::prepack::pretranspose_gemm_weights(&mut g);
    kiln_ir::simplify::simplify(&mut g);
    (g, inputs)
}

fn tp_stage(g: &Graph, nodes: std::ops::Range<usize>, ranks: Vec<usize>) -> Stage {
    Stage {
        mode: StageMode::TensorParallel {
            splits: alternating_splits(g, nodes.clone(), ranks.len()),
        },
        nodes,
        ranks,
    }
}

/// Lowers `plan`, checks every segment verifies, runs all ranks in process and compares
/// with the interpreter.
fn check(
    what: &str,
    g: &Graph,
    plan: &ParallelPlan,
    inputs: &[Tensor],
) -> kiln_passes::parallel::lower::Programs {
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
    progs
}

/// Number of all-reduce and all-gather steps over all ranks.
fn collectives(p: &kiln_passes::parallel::lower::Programs) -> (usize, usize) {
    let steps = p.ranks.iter().flat_map(|r| &r.steps);
    let (mut ar, mut ag) = (0, 0);
    for s in steps {
        match s {
            Step::AllReduce { .. } => ar += 1,
            Step::AllGather { .. } => ag += 1,
            _ => {}
        }
    }
    (ar, ag)
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
    // a rank in no stage
    let mut plan = balanced_pipeline(&g, 2).unwrap();
    plan.world = 3;
    assert!(lower(&g, &plan).unwrap_err().contains("rank 2"));
    // a split of a node that is not a contraction
    let relu = g
        .nodes
        .iter()
        .position(|n| n.op.op_type() == "Relu")
        .unwrap();
    let plan = ParallelPlan {
        world: 2,
        stages: vec![Stage {
            nodes: 0..g.nodes.len(),
            ranks: vec![0, 1],
            mode: StageMode::TensorParallel {
                splits: vec![kiln_passes::parallel::NodeSplit {
                    node: relu,
                    kind: kiln_passes::parallel::SplitKind::Column,
                    sizes: vec![1, 1],
                }],
            },
        }],
        micro_batches: 1,
    };
    let e = lower(&g, &plan).unwrap_err();
    assert!(e.contains("stage 0") && e.contains("Relu"), "{e}");
    let mut plan = balanced_pipeline(&g, 2).unwrap();
    plan.stages[1].ranks = vec![0];
    assert!(lower(&g, &plan).is_err());
}

#[test]
fn tensor_parallel_plans_of_zoo_models_match_the_interpreter() {
    for name in ZOO {
        let (g, inputs) = prepared(name);
        for world in [2, 4] {
            let plan = ParallelPlan {
                world,
                stages: vec![tp_stage(&g, 0..g.nodes.len(), (0..world).collect())],
                micro_batches: 1,
            };
            let what = format!("{name} tensor parallel x{world}");
            let progs = check(&what, &g, &plan, &inputs);
            // Row splits all-reduce their partial sums on every rank
            let (ar, _) = collectives(&progs);
            assert!(ar >= world, "{what}: {ar} all-reduces");
        }
    }
}

#[test]
fn data_parallel_plans_match_the_interpreter() {
    for name in ["mlp", "bert", "gpt"] {
        let (g, inputs) = prepared_batch4(name);
        for batch in [vec![2, 2], vec![1, 1, 1, 1], vec![3, 1]] {
            let plan = ParallelPlan {
                world: batch.len(),
                stages: vec![Stage {
                    nodes: 0..g.nodes.len(),
                    ranks: (0..batch.len()).collect(),
                    mode: StageMode::DataParallel {
                        batch: batch.clone(),
                    },
                }],
                micro_batches: 1,
            };
            let what = format!("{name} data parallel {batch:?}");
            let progs = check(&what, &g, &plan, &inputs);
            // the last rank computes on its own rows only
            let last = progs.ranks.last().unwrap();
            let seg = last
                .steps
                .iter()
                .find_map(|s| match s {
                    Step::Compute(sg) => Some(sg),
                    _ => None,
                })
                .unwrap();
            let x = &seg.values[seg.inputs[0]];
            assert_eq!(
                x.fact.shape.dims()[0].known(),
                Some(*batch.last().unwrap()),
                "{what}"
            );
        }
    }
}

#[test]
fn mixed_pipeline_of_parallel_stages_matches_the_interpreter() {
    // stage 0 data parallel on ranks 1 and 2, stage 1 tensor parallel on ranks 3 and 0:
    // inputs scattered from rank 0, the boundary resharded, outputs back to rank 0
    for name in ["mlp", "bert", "gpt"] {
        let (g, inputs) = prepared_batch4(name);
        let mid = g.nodes.len() / 2;
        let plan = ParallelPlan {
            world: 4,
            stages: vec![
                Stage {
                    nodes: 0..mid,
                    ranks: vec![1, 2],
                    mode: StageMode::DataParallel { batch: vec![2, 2] },
                },
                tp_stage(&g, mid..g.nodes.len(), vec![3, 0]),
            ],
            micro_batches: 1,
        };
        check(&format!("{name} dp+tp"), &g, &plan, &inputs);
    }
}

#[test]
fn micro_batched_pipelines_match_the_interpreter() {
    // batch 4 in 2 micro-batches of 2: the programs are lowered on the batch-2 graph and
    // run twice; compared with the interpreter on the batch-4 graph
    for name in ["mlp", "bert", "gpt"] {
        let (full, inputs) = prepared_batch(name, 4, 4);
        let (micro, _) = prepared_batch(name, 2, 4);
        assert_eq!(full.nodes.len(), micro.nodes.len(), "{name}");
        let mut plan = balanced_pipeline(&micro, 2).unwrap();
        plan.micro_batches = 2;
        let progs = lower(&micro, &plan).unwrap();
        assert_eq!(progs.micro_batches, 2);
        let expected = kiln_ir::interp::run(&full, &inputs).unwrap();
        let got = run_in_process(&progs, &inputs, |_, _, sg, ins| {
            kiln_ir::interp::run(sg, ins).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_close(&format!("{name} micro-batched"), &got, &expected, 1e-4);
    }
}
