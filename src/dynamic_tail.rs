//! Splitting a specialised graph where its shapes stop being static.
//!
//! After specialisation every value of an ordinary model has a static shape. A model whose
//! shapes depend on input *values* (a `Reshape` whose shape is a graph input, `NonZero`,
//! `TopK` with a `k` input, ...) keeps unknown dims. [`split`] cuts such a graph in two:
//! - the *static prefix*: every node whose outputs have static shapes and whose inputs are
//!   produced by such nodes (or are graph inputs / constants). It is compiled as usual
//!   (kernels, arena, memory plan);
//! - the *dynamic tail*: all other nodes. It is stored in the plan as a small graph and run by
//!   the runtime's reference interpreter with run-time shapes (`kiln_runtime::plan::DynamicTail`).
//!
//! The prefix graph keeps all graph inputs (same order); its outputs are the model outputs it
//! computes (in model order), then the *boundary* values: values it computes that the tail
//! reads. Boundary outputs force those values to be materialised; the compiler gives them
//! arena space after the memory plan's.

use anyhow::{Context, Result};
use kiln_ir::{Graph, Node, ValueId};
use std::collections::{HashMap, HashSet};

/// Where a specialised graph was split (see the module doc).
#[derive(Clone, Debug)]
pub struct DynamicSplit {
    /// The specialised graph before splitting; `tail_nodes` and `boundary` refer to it.
    pub full: Graph,
    /// Nodes of `full` in the dynamic tail, in topological order.
    pub tail_nodes: Vec<usize>,
    /// Model outputs (indices into `full.outputs`) that the tail computes.
    pub tail_outputs: Vec<usize>,
    /// For each of the prefix graph's first outputs, the model output (index into
    /// `full.outputs`) it is.
    pub prefix_outputs: Vec<usize>,
    /// Values of `full` computed by the prefix and read by the tail that are not model
    /// outputs; they are the prefix graph's last outputs, in this order.
    pub boundary: Vec<ValueId>,
}

impl DynamicSplit {
    /// The op types of the tail, in order of first appearance.
    pub fn ops(&self) -> Vec<&'static str> {
        let mut ops: Vec<&'static str> = Vec::new();
        for &n in &self.tail_nodes {
            let op = self.full.nodes[n].op.op_type();
            if !ops.contains(&op) {
                ops.push(op);
            }
        }
        ops
    }

    /// Names of the model outputs the tail computes.
    pub fn output_names(&self) -> Vec<&str> {
        self.tail_outputs
            .iter()
            .map(|&i| self.full.values[self.full.outputs[i]].name.as_str())
            .collect()
    }
}

/// Splits `g` (specialised: graph inputs static) into a static prefix graph and a dynamic
/// tail; `None` when every value has a static shape.
pub fn split(g: &Graph) -> Result<Option<(Graph, DynamicSplit)>> {
    let prod = g.producers();
    let mut is_static = vec![true; g.nodes.len()];
    let mut any_dynamic = false;
    for (ni, n) in g.nodes.iter().enumerate() {
        let inputs_static = n
            .inputs
            .iter()
            .flatten()
            .all(|&v| prod[v].is_none_or(|p| is_static[p]));
        let outputs_static = n.outputs.iter().all(|&o| g.values[o].fact.shape.is_known());
        is_static[ni] = inputs_static && outputs_static;
        any_dynamic |= !is_static[ni];
    }
    if !any_dynamic {
        return Ok(None);
    }
    let tail_nodes: Vec<usize> = (0..g.nodes.len()).filter(|&n| !is_static[n]).collect();
    let tail_made = |v: ValueId| prod[v].is_some_and(|p| !is_static[p]);
    let (mut tail_outputs, mut prefix_outputs) = (Vec::new(), Vec::new());
    for (i, &o) in g.outputs.iter().enumerate() {
        if tail_made(o) {
            tail_outputs.push(i);
        } else {
            prefix_outputs.push(i);
        }
    }
    let prefix_made = |v: ValueId| prod[v].is_some_and(|p| is_static[p]);
    let mut boundary = Vec::new();
    let mut seen = HashSet::new();
    for &n in &tail_nodes {
        for &v in g.nodes[n].inputs.iter().flatten() {
            if prefix_made(v) && !g.outputs.contains(&v) && seen.insert(v) {
                boundary.push(v);
            }
        }
    }

    // The prefix graph: all graph inputs, the static nodes, the values they use.
    let mut p = Graph {
        name: g.name.clone(),
        opset: g.opset,
        ..Default::default()
    };
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    for &i in &g.inputs {
        let id = p.add_value(g.values[i].name.clone(), g.values[i].fact.clone());
        p.inputs.push(id);
        map.insert(i, id);
    }
    let mut value = |p: &mut Graph, v: ValueId| -> ValueId {
        *map.entry(v)
            .or_insert_with(|| p.add_value(g.values[v].name.clone(), g.values[v].fact.clone()))
    };
    for (ni, n) in g.nodes.iter().enumerate() {
        if !is_static[ni] {
            continue;
        }
        let inputs = n
            .inputs
            .iter()
            .map(|i| i.map(|v| value(&mut p, v)))
            .collect();
        let outputs = n.outputs.iter().map(|&o| value(&mut p, o)).collect();
        p.nodes.push(Node {
            name: n.name.clone(),
            op: n.op.clone(),
            inputs,
            outputs,
        });
    }
    for &i in &prefix_outputs {
        let o = value(&mut p, g.outputs[i]);
        p.outputs.push(o);
    }
    for &v in &boundary {
        let o = value(&mut p, v);
        p.outputs.push(o);
    }
    kiln_ir::verify::verify(&p).context("static prefix of a model with a dynamic tail")?;
    Ok(Some((
        p,
        DynamicSplit {
            full: g.clone(),
            tail_nodes,
            tail_outputs,
            prefix_outputs,
            boundary,
        },
    )))
}
