//! Stand-in for `propagate` (being written on main): the same API; only trivial stages.
#![allow(dead_code)]

use super::plan::{NodeSplit, Sharding};
use kiln_ir::{Graph, ValueId};
use std::ops::Range;

/// A collective turning a value replicated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collective {
    /// Sum of partial values.
    AllReduce { value: ValueId },
    /// Concatenation of shards.
    AllGather {
        value: ValueId,
        axis: usize,
        sizes: Vec<usize>,
    },
}

/// The shardings of a stage.
#[derive(Clone, Debug, Default)]
pub struct Propagation {
    pub sharding: Vec<Option<Sharding>>,
    pub collectives: Vec<(usize, Collective)>,
    pub gathered_inputs: Vec<(usize, usize)>,
    pub sliced_inputs: Vec<(usize, usize, Sharding)>,
}

/// Stand-in: fails for anything but trivial stages.
pub fn propagate(
    _g: &Graph,
    _nodes: Range<usize>,
    _inputs: &[(ValueId, Sharding)],
    _splits: &[NodeSplit],
) -> Result<Propagation, String> {
    Err("data/tensor-parallel stages need sharding propagation (not merged yet)".into())
}

/// The shape rank `i` of the group holds of a value of global shape `global`.
pub fn local_shape(global: &[usize], s: &Sharding, i: usize) -> Vec<usize> {
    let mut l = global.to_vec();
    if let Sharding::Split { axis, sizes } = s {
        l[*axis] = sizes[i];
    }
    l
}
