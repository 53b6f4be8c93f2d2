//! The default plan until a plan search is available: a pipeline of one stage per rank,
//! cut where the running sum of node FLOPs (the eqsat cost model's count) crosses equal
//! shares of the total.

use super::plan::{ParallelPlan, Stage, StageMode};
use crate::eqsat::cost::flops;
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
