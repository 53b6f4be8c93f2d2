//! IR-level clean-ups run right after import: constant folding and dead-code removal.

use crate::graph::Graph;

/// Removes nodes whose every output was folded to a constant by inference (e.g. the
/// Shape→Gather→Unsqueeze→Concat chains exporters emit before a Reshape), keeping the
/// values as constants. Returns the number of nodes removed.
pub fn fold_constants(g: &mut Graph) -> usize {
    let before = g.nodes.len();
    let values = &g.values;
    g.nodes
        .retain(|n| !n.outputs.iter().all(|&o| values[o].fact.value.is_some()));
    before - g.nodes.len()
}

/// Removes nodes none of whose outputs reach a graph output. Returns the number removed.
pub fn remove_dead(g: &mut Graph) -> usize {
    let before = g.nodes.len();
    let mut live = vec![false; g.values.len()];
    for &o in &g.outputs {
        live[o] = true;
    }
    let mut keep = vec![false; g.nodes.len()];
    for (ni, n) in g.nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|&o| live[o]) {
            keep[ni] = true;
            for i in n.inputs.iter().flatten() {
                live[*i] = true;
            }
        }
    }
    let mut it = keep.into_iter();
    g.nodes.retain(|_| it.next().unwrap_or(false));
    before - g.nodes.len()
}

/// Runs [`fold_constants`] then [`remove_dead`]; returns the total number of nodes removed.
pub fn simplify(g: &mut Graph) -> usize {
    fold_constants(g) + remove_dead(g)
}
