//! Specialisation of a graph's symbolic input dims to concrete sizes, so that later stages
//! (memory planning, code generation) see static shapes.

use kiln_ir::simplify::simplify;
use kiln_ir::{Dim, Graph, IrError, Result, Shape};
use std::collections::HashMap;

/// Replaces the named symbolic dims of the graph inputs by the given sizes, re-runs inference
/// (which folds shape sub-graphs to constants) and removes the folded and dead nodes.
pub fn specialize_dims(g: &mut Graph, dims: &HashMap<String, usize>) -> Result<()> {
    for &i in &g.inputs {
        let shape = &mut g.values[i].fact.shape;
        for d in shape.0.iter_mut() {
            if let Dim::Sym(s) = d {
                if let Some(&n) = dims.get(s.as_str()) {
                    *d = Dim::Known(n);
                }
            }
        }
    }
    g.infer()?;
    simplify(g);
    Ok(())
}

/// Sets every graph input to the given concrete shape (in the order of `g.inputs`), checking
/// it against the declared shape, then re-runs inference and simplifies like
/// [`specialize_dims`].
pub fn specialize_inputs(g: &mut Graph, shapes: &[Vec<usize>]) -> Result<()> {
    if shapes.len() != g.inputs.len() {
        return Err(IrError::Graph {
            graph: g.name.clone(),
            msg: format!(
                "specialize: {} shapes given for {} inputs",
                shapes.len(),
                g.inputs.len()
            ),
        });
    }
    for (&i, s) in g.inputs.clone().iter().zip(shapes) {
        let v = &g.values[i];
        let ok = v.fact.shape.rank() == s.len()
            && v.fact.shape.dims().iter().zip(s).all(|(d, &n)| match d {
                Dim::Known(k) => *k == n,
                Dim::Sym(_) => true,
            });
        if !ok {
            return Err(IrError::Input {
                name: v.name.clone(),
                msg: format!("specialize: shape {s:?} does not match {}", v.fact.shape),
            });
        }
        g.values[i].fact.shape = Shape::known(s);
    }
    g.infer()?;
    simplify(g);
    Ok(())
}
