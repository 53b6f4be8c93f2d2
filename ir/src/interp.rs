//! The reference interpreter: runs a graph node by node with each op's reference `eval`.
//! It defines the semantics every compiled artifact is checked against.

use crate::error::{IrError, Result};
use crate::graph::Graph;
use crate::shape::Dim;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// Checks runtime inputs against the graph's declared inputs (count, dtype, rank, known dims,
/// consistent symbolic dims).
pub fn check_inputs(g: &Graph, inputs: &[Tensor]) -> Result<()> {
    if inputs.len() != g.inputs.len() {
        return Err(IrError::Input {
            name: "<all>".into(),
            msg: format!("expected {} inputs, got {}", g.inputs.len(), inputs.len()),
        });
    }
    let mut syms: HashMap<&str, usize> = HashMap::new();
    for (&id, t) in g.inputs.iter().zip(inputs) {
        let v = &g.values[id];
        let bad = |msg: String| IrError::Input {
            name: v.name.clone(),
            msg,
        };
        if t.dtype() != v.fact.dtype {
            return Err(bad(format!(
                "expected dtype {}, got {}",
                v.fact.dtype,
                t.dtype()
            )));
        }
        if t.rank() != v.fact.shape.rank() {
            return Err(bad(format!(
                "expected shape {}, got {:?} (rank differs)",
                v.fact.shape,
                t.shape()
            )));
        }
        for (d, &n) in v.fact.shape.dims().iter().zip(t.shape()) {
            match d {
                Dim::Known(k) if *k != n => {
                    return Err(bad(format!(
                        "expected shape {}, got {:?}",
                        v.fact.shape,
                        t.shape()
                    )))
                }
                Dim::Sym(s) if s != "?" => {
                    if let Some(&prev) = syms.get(s.as_str()) {
                        if prev != n {
                            return Err(bad(format!(
                                "dim '{s}' is {n} here but {prev} in an earlier input"
                            )));
                        }
                    }
                    syms.insert(s, n);
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Runs the graph on `inputs` (in the order of `g.inputs`) and returns the outputs (in the
/// order of `g.outputs`).
pub fn run(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    check_inputs(g, inputs)?;
    let mut vals: Vec<Option<Arc<Tensor>>> =
        g.values.iter().map(|v| v.fact.value.clone()).collect();
    let prod = g.producers();
    for (i, v) in vals.iter_mut().enumerate() {
        if prod[i].is_some() {
            *v = None; // computed at run time, even when inference folded it
        }
    }
    for (&id, t) in g.inputs.iter().zip(inputs) {
        vals[id] = Some(Arc::new(t.clone()));
    }
    // free each value after its last use
    let mut last_use = vec![usize::MAX; g.values.len()];
    for (ni, n) in g.nodes.iter().enumerate() {
        for i in n.inputs.iter().flatten() {
            last_use[*i] = ni;
        }
    }
    for &o in &g.outputs {
        last_use[o] = usize::MAX;
    }
    for (ni, n) in g.nodes.iter().enumerate() {
        let args: Vec<Option<Arc<Tensor>>> = n
            .inputs
            .iter()
            .map(|i| match i {
                Some(i) => vals[*i].clone().map(Some).ok_or_else(|| {
                    g.node_err(ni, format!("input '{}' has no value", g.values[*i].name))
                }),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        let refs: Vec<Option<&Tensor>> = args.iter().map(|a| a.as_deref()).collect();
        let outs = n.op.eval(&refs).map_err(|m| g.node_err(ni, m))?;
        if outs.len() < n.outputs.len() {
            return Err(g.node_err(
                ni,
                format!(
                    "op returned {} outputs, node has {}",
                    outs.len(),
                    n.outputs.len()
                ),
            ));
        }
        for (&o, t) in n.outputs.iter().zip(outs) {
            vals[o] = Some(Arc::new(t));
        }
        for i in n.inputs.iter().flatten() {
            if last_use[*i] == ni && prod[*i].is_some() {
                vals[*i] = None;
            }
        }
    }
    g.outputs
        .iter()
        .map(|&o| {
            vals[o].as_deref().cloned().ok_or_else(|| IrError::Graph {
                graph: g.name.clone(),
                msg: format!("output '{}' was not computed", g.values[o].name),
            })
        })
        .collect()
}
