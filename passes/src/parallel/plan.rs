//! The parallel plan: a pipeline of stages over disjoint device groups.
//!
//! Semantics (what a plan means; the lowering to per-rank programs implements exactly
//! this, and the simulator predicts its time):
//!
//! * The world has [`ParallelPlan::world`] ranks, one process per device; rank `r` runs on
//!   device `r` of the cluster description.
//! * [`ParallelPlan::stages`] split the graph's nodes (in the graph's topological order)
//!   into contiguous ranges, in order. Stage `i` runs on [`Stage::ranks`]; every rank is in
//!   exactly one stage. Values produced in one stage and read in a later one (or graph
//!   outputs) cross the stage boundary replicated: the producing stage gathers them and
//!   sends them to the ranks of every consuming stage (rank 0 gathers the graph outputs).
//! * A [`StageMode::DataParallel`] stage: every rank runs all of the stage's nodes on its
//!   own slice of the batch axis (axis 0 of every activation; constants replicated), rank
//!   `ranks[i]` taking `batch[i]` rows. Unequal slices serve devices of unequal speed.
//! * A [`StageMode::TensorParallel`] stage: every rank runs every node of the stage;
//!   the contractions listed in `splits` have their constant weight split over the ranks
//!   ([`SplitKind::Column`]: output features, the result sharded on its feature axis;
//!   [`SplitKind::Row`]: the contraction axis, each rank holding partial sums that are
//!   all-reduced). Every other node follows the sharding of its inputs where it can
//!   (elementwise ops, reshapes and transposes that keep the sharded axis whole, batched
//!   MatMuls over a sharded batch/head axis, reductions over other axes); where it cannot,
//!   its inputs are all-gathered to replicated first. An empty `splits` list with one rank
//!   is a plain single-device stage.

use serde::{Deserialize, Serialize};
use std::ops::Range;

/// How one tensor is laid out over the ranks of a device group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sharding {
    /// Every rank holds the whole tensor.
    Replicated,
    /// Rank `i` of the group holds `sizes[i]` consecutive entries of axis `axis`.
    Split {
        /// The split axis.
        axis: usize,
        /// Entries per rank along `axis` (their sum is the axis length).
        sizes: Vec<usize>,
    },
    /// Every rank holds a tensor of the full shape; the value is their sum.
    Partial,
}

/// How a contraction's constant weight is split over a tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SplitKind {
    /// Split the output features (MatMul/Gemm `N`, Conv output channels); the output is
    /// sharded on its feature axis (last axis of a MatMul/Gemm, axis 1 of a Conv).
    Column,
    /// Split the contraction axis (MatMul/Gemm `K`, Conv input channels); the data input
    /// must be sharded on that axis in the same sizes; the output is [`Sharding::Partial`].
    Row,
}

/// The split of one contraction in a tensor-parallel stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSplit {
    /// Index of the node in `graph.nodes`.
    pub node: usize,
    /// Which axis of the weight is split.
    pub kind: SplitKind,
    /// Entries of the split axis per rank of the stage, in the order of [`Stage::ranks`].
    pub sizes: Vec<usize>,
}

/// How a stage uses its device group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageMode {
    /// Every rank runs every node on its slice of the batch axis.
    DataParallel {
        /// Rows of axis 0 per rank, in the order of [`Stage::ranks`].
        batch: Vec<usize>,
    },
    /// Every rank runs every node; the listed contractions are split.
    TensorParallel {
        /// The split contractions, in node order.
        splits: Vec<NodeSplit>,
    },
}

/// One pipeline stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// The stage's nodes: `graph.nodes[nodes.start..nodes.end]`.
    pub nodes: Range<usize>,
    /// The ranks that run it.
    pub ranks: Vec<usize>,
    /// Data or tensor parallel.
    pub mode: StageMode,
}

/// A whole-graph parallel plan (see the module doc for its semantics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelPlan {
    /// Number of ranks.
    pub world: usize,
    /// Pipeline stages, in order.
    pub stages: Vec<Stage>,
    /// Micro-batches the batch is cut into for pipelining (1: none).
    pub micro_batches: usize,
}

impl ParallelPlan {
    /// The plan that runs the whole graph of `num_nodes` nodes on rank 0 alone.
    pub fn single(num_nodes: usize) -> Self {
        ParallelPlan {
            world: 1,
            stages: vec![Stage {
                nodes: 0..num_nodes,
                ranks: vec![0],
                mode: StageMode::TensorParallel { splits: vec![] },
            }],
            micro_batches: 1,
        }
    }

    /// Checks the structural rules of the module doc against a graph of `num_nodes` nodes:
    /// stages cover `0..num_nodes` contiguously in order, every rank `0..world` is in
    /// exactly one stage, per-rank size lists have one entry per rank of their stage, and
    /// split nodes lie inside their stage. (Whether a split fits its op is checked when
    /// the plan is lowered.)
    pub fn validate(&self, num_nodes: usize) -> Result<(), String> {
        if self.micro_batches == 0 {
            return Err("micro_batches must be at least 1".into());
        }
        let mut next = 0;
        let mut seen = vec![false; self.world];
        for (i, s) in self.stages.iter().enumerate() {
            if s.nodes.start != next || s.nodes.end < s.nodes.start {
                return Err(format!(
                    "stage {i}: nodes {:?} do not continue at node {next}",
                    s.nodes
                ));
            }
            next = s.nodes.end;
            if s.ranks.is_empty() {
                return Err(format!("stage {i}: no ranks"));
            }
            for &r in &s.ranks {
                match seen.get_mut(r) {
                    None => return Err(format!("stage {i}: rank {r} ≥ world {}", self.world)),
                    Some(true) => return Err(format!("stage {i}: rank {r} is in two stages")),
                    Some(s) => *s = true,
                }
            }
            match &s.mode {
                StageMode::DataParallel { batch } => {
                    if batch.len() != s.ranks.len() {
                        return Err(format!(
                            "stage {i}: {} batch slices for {} ranks",
                            batch.len(),
                            s.ranks.len()
                        ));
                    }
                }
                StageMode::TensorParallel { splits } => {
                    for sp in splits {
                        if !s.nodes.contains(&sp.node) {
                            return Err(format!(
                                "stage {i}: split node {} is outside {:?}",
                                sp.node, s.nodes
                            ));
                        }
                        if sp.sizes.len() != s.ranks.len() {
                            return Err(format!(
                                "stage {i}: node {}: {} split sizes for {} ranks",
                                sp.node,
                                sp.sizes.len(),
                                s.ranks.len()
                            ));
                        }
                    }
                }
            }
        }
        if next != num_nodes {
            return Err(format!(
                "stages end at node {next}, the graph has {num_nodes}"
            ));
        }
        if let Some(r) = seen.iter().position(|s| !s) {
            return Err(format!("rank {r} is in no stage"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(nodes: Range<usize>, ranks: Vec<usize>) -> Stage {
        Stage {
            nodes,
            ranks,
            mode: StageMode::TensorParallel { splits: vec![] },
        }
    }

    #[test]
    fn single_plan_is_valid() {
        ParallelPlan::single(7).validate(7).unwrap();
        assert!(ParallelPlan::single(7).validate(8).is_err());
    }

    #[test]
    fn validate_rejects_gaps_and_shared_ranks() {
        let ok = ParallelPlan {
            world: 3,
            stages: vec![tp(0..4, vec![0]), tp(4..9, vec![1, 2])],
            micro_batches: 2,
        };
        ok.validate(9).unwrap();
        let mut gap = ok.clone();
        gap.stages[1].nodes = 5..9;
        assert!(gap.validate(9).unwrap_err().contains("continue"));
        let mut shared = ok.clone();
        shared.stages[1].ranks = vec![0, 2];
        assert!(shared.validate(9).unwrap_err().contains("two stages"));
        let mut missing = ok.clone();
        missing.world = 4;
        assert!(missing.validate(9).unwrap_err().contains("rank 3"));
        let mut bad_split = ok;
        bad_split.stages[1].mode = StageMode::TensorParallel {
            splits: vec![NodeSplit {
                node: 2,
                kind: SplitKind::Column,
                sizes: vec![1, 1],
            }],
        };
        assert!(bad_split.validate(9).unwrap_err().contains("outside"));
    }
}
