//! Simple plans until a plan search is available: a pipeline of one stage per rank, cut
//! where the running sum of node FLOPs (the eqsat cost model's count) crosses equal shares
//! of the total ([`balanced_pipeline`]); Megatron-style tensor-parallel splits
//! ([`alternating_splits`]) and an even data-parallel batch ([`even`]).

use super::plan::{NodeSplit, ParallelPlan, SplitKind, Stage, StageMode};
use crate::eqsat::cost::flops;
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::Op;
use kiln_ir::{Fact, Graph};

/// FLOPs of each node of `g` (at least 1, so data movement counts too).
pub fn node_flops(g: &Graph) -> Vec<f64> {
    g.nodes
        .iter()
        .map(|n| {
            let ins: Vec<Option<&Fact>> = n
                .inputs
                .iter()
                .map(|i| i.map(|i| &g.values[i].fact))
                .collect();
            let outs: Vec<Fact> = n
                .outputs
                .iter()
                .map(|&o| g.values[o].fact.clone())
                .collect();
            flops(&n.op, &ins, &outs).max(1.0)
        })
        .collect()
}

/// A pipeline over `world` ranks (stage `i` on rank `i`) with about equal FLOPs per stage.
/// Fails if the graph has fewer nodes than ranks.
pub fn balanced_pipeline(g: &Graph, world: usize) -> Result<ParallelPlan, String> {
    if world == 0 {
        return Err("a plan needs at least 1 rank".into());
    }
    let n = g.nodes.len();
    if n < world {
        return Err(format!(
            "graph '{}' has {n} nodes, too few for a {world}-stage pipeline",
            g.name
        ));
    }
    let f = node_flops(g);
    let total: f64 = f.iter().sum();
    let mut cuts = vec![0];
    let mut acc = 0.0;
    for (k, x) in f.iter().enumerate() {
        acc += x;
        let stage = cuts.len(); // next cut index
        let remaining_nodes = n - (k + 1);
        let remaining_stages = world - stage;
        if stage < world
            && remaining_nodes >= remaining_stages
            && (acc >= total * stage as f64 / world as f64 || remaining_nodes == remaining_stages)
        {
            cuts.push(k + 1);
        }
    }
    cuts.push(n);
    let stages = cuts
        .windows(2)
        .enumerate()
        .map(|(r, w)| Stage {
            nodes: w[0]..w[1],
            ranks: vec![r],
            mode: StageMode::TensorParallel { splits: vec![] },
        })
        .collect();
    let plan = ParallelPlan {
        world,
        stages,
        micro_batches: 1,
    };
    plan.validate(n)?;
    Ok(plan)
}

/// `n` split into `parts` sizes differing by at most 1 (larger ones first).
pub fn even(n: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| n / parts + usize::from(i < n % parts))
        .collect()
}

/// Megatron-style splits of the constant-weight contractions (MatMul with a 2-D weight,
/// Gemm, Conv with one group) among `nodes` over `ranks` ranks: Column, then Row for the
/// next one, alternating — the pattern of attention (QKV / output projection) and MLP
/// blocks, where the Row split's partial sums are all-reduced once per pair. Contractions
/// with fewer features than ranks are left whole.
pub fn alternating_splits(
    g: &Graph,
    nodes: std::ops::Range<usize>,
    ranks: usize,
) -> Vec<NodeSplit> {
    let mut out = Vec::new();
    for k in nodes {
        let n = &g.nodes[k];
        let Some(w) = n.inputs.get(1).copied().flatten() else {
            continue;
        };
        let Some(wt) = g.const_value(w) else { continue };
        let ws = wt.shape();
        let (nn, kk) = match &n.op {
            Op::Linalg(LinalgOp::MatMul) if ws.len() == 2 => (ws[1], ws[0]),
            Op::Linalg(LinalgOp::Gemm(gm)) if gm.trans_b => (ws[0], ws[1]),
            Op::Linalg(LinalgOp::Gemm(_)) => (ws[1], ws[0]),
            Op::Nn(NnOp::Conv(c)) if c.group == 1 => (ws[0], ws[1]),
            _ => continue,
        };
        let kind = if out.len() % 2 == 0 {
            SplitKind::Column
        } else {
            SplitKind::Row
        };
        let len = if kind == SplitKind::Column { nn } else { kk };
        if len < ranks {
            continue;
        }
        out.push(NodeSplit {
            node: k,
            kind,
            sizes: even(len, ranks),
        });
    }
    out
}

/// One tensor-parallel stage over ranks `0..world` with [`alternating_splits`].
pub fn tensor_parallel(g: &Graph, world: usize) -> ParallelPlan {
    ParallelPlan {
        world,
        stages: vec![Stage {
            nodes: 0..g.nodes.len(),
            ranks: (0..world).collect(),
            mode: StageMode::TensorParallel {
                splits: alternating_splits(g, 0..g.nodes.len(), world),
            },
        }],
        micro_batches: 1,
    }
}

/// One data-parallel stage over ranks `0..world`, the batch `batch` split evenly.
pub fn data_parallel(g: &Graph, world: usize, batch: usize) -> ParallelPlan {
    ParallelPlan {
        world,
        stages: vec![Stage {
            nodes: 0..g.nodes.len(),
            ranks: (0..world).collect(),
            mode: StageMode::DataParallel {
                batch: even(batch, world),
            },
        }],
        micro_batches: 1,
    }
}
