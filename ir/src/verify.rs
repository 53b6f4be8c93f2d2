//! The graph verifier: structural invariants that every pass must preserve.

use crate::error::{IrError, Result};
use crate::graph::Graph;
use std::collections::HashSet;

/// Checks that the graph is well formed: ids in range, every value defined once and before
/// use (topological order), names unique, inputs not produced by nodes, every output
/// defined, and the stored facts agree with a fresh inference of each node.
pub fn verify(g: &Graph) -> Result<()> {
    let err = |msg: String| IrError::Graph {
        graph: g.name.clone(),
        msg,
    };
    let nv = g.values.len();
    let mut names = HashSet::new();
    for v in &g.values {
        if !names.insert(v.name.as_str()) {
            return Err(err(format!("value name '{}' is used twice", v.name)));
        }
    }
    let mut defined = vec![false; nv];
    for &i in &g.inputs {
        if i >= nv {
            return Err(err(format!("graph input id {i} out of range")));
        }
        defined[i] = true;
    }
    let prod = g.producers();
    for (i, v) in g.values.iter().enumerate() {
        if v.fact.value.is_some() && prod[i].is_none() {
            defined[i] = true;
        }
    }
    for (ni, n) in g.nodes.iter().enumerate() {
        for (k, inp) in n.inputs.iter().enumerate() {
            if let Some(i) = *inp {
                if i >= nv || !defined[i] {
                    return Err(g.node_err(ni, format!("input {k} is used before it is defined")));
                }
            }
        }
        for &o in &n.outputs {
            if o >= nv {
                return Err(g.node_err(ni, format!("output id {o} out of range")));
            }
            if defined[o] && prod[o] != Some(ni) || g.inputs.contains(&o) {
                return Err(g.node_err(
                    ni,
                    format!("output '{}' is defined twice", g.values[o].name),
                ));
            }
            defined[o] = true;
        }
        let fresh = g.infer_node(ni)?;
        for (&o, f) in n.outputs.iter().zip(&fresh) {
            let have = &g.values[o].fact;
            if have.dtype != f.dtype || have.shape.rank() != f.shape.rank() {
                return Err(g.node_err(
                    ni,
                    format!(
                        "stored fact of '{}' ({} {}) disagrees with inference ({} {})",
                        g.values[o].name, have.dtype, have.shape, f.dtype, f.shape
                    ),
                ));
            }
        }
    }
    for &o in &g.outputs {
        if o >= nv || !defined[o] {
            return Err(err(format!("graph output id {o} is not defined")));
        }
    }
    Ok(())
}
