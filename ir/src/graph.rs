//! The typed graph: values (SSA, each with a [`Fact`]), nodes holding typed [`Op`]s, graph
//! inputs and outputs. Nodes are kept in topological order.

use crate::error::{IrError, Result};
use crate::ops::{Fact, Op};
use crate::tensor::Tensor;
use petgraph::graph::DiGraph;
use std::collections::HashMap;
use std::sync::Arc;

/// Index of a value in [`Graph::values`].
pub type ValueId = usize;

/// A value: a named SSA edge with what is statically known about it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Value {
    /// Name (from the ONNX model; unique within the graph).
    pub name: String,
    /// Dtype, shape, and the constant contents for initializers and folded values.
    pub fact: Fact,
}

/// A node: one typed op applied to values.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Node {
    /// Node name (from the ONNX model, or generated `op_type_N`).
    pub name: String,
    /// The op with its typed attributes.
    pub op: Op,
    /// Input values; `None` for absent optional inputs.
    pub inputs: Vec<Option<ValueId>>,
    /// Output values.
    pub outputs: Vec<ValueId>,
}

/// A typed dataflow graph.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Graph {
    /// Graph name.
    pub name: String,
    /// Opset version of the default ONNX domain.
    pub opset: i64,
    /// All values; a value with `fact.value` set and no producer is a constant (initializer).
    pub values: Vec<Value>,
    /// Nodes, in topological order.
    pub nodes: Vec<Node>,
    /// Graph inputs, in order.
    pub inputs: Vec<ValueId>,
    /// Graph outputs, in order.
    pub outputs: Vec<ValueId>,
}

impl Graph {
    /// Adds a value and returns its id.
    pub fn add_value(&mut self, name: impl Into<String>, fact: Fact) -> ValueId {
        self.values.push(Value {
            name: name.into(),
            fact,
        });
        self.values.len() - 1
    }

    /// Adds a constant value (an initializer).
    pub fn add_const(&mut self, name: impl Into<String>, t: Tensor) -> ValueId {
        self.add_value(name, Fact::constant(t))
    }

    /// The value with this name, if any.
    pub fn find_value(&self, name: &str) -> Option<ValueId> {
        self.values.iter().position(|v| v.name == name)
    }

    /// The constant tensor of a value, if it is constant.
    pub fn const_value(&self, id: ValueId) -> Option<&Tensor> {
        self.values[id].fact.value()
    }

    /// For each value, the index of the node producing it (`None` for inputs and constants).
    pub fn producers(&self) -> Vec<Option<usize>> {
        let mut p = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &o in &n.outputs {
                p[o] = Some(i);
            }
        }
        p
    }

    /// For each value, the number of node inputs and graph outputs that use it.
    pub fn use_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.values.len()];
        for n in &self.nodes {
            for i in n.inputs.iter().flatten() {
                c[*i] += 1;
            }
        }
        for &o in &self.outputs {
            c[o] += 1;
        }
        c
    }

    /// Reorders nodes topologically (stable: keeps the given order where it is valid).
    /// Errors on a cycle, naming a node on it.
    pub fn toposort(&mut self) -> Result<()> {
        let prod = self.producers();
        let mut g: DiGraph<usize, ()> = DiGraph::new();
        let idx: Vec<_> = (0..self.nodes.len()).map(|i| g.add_node(i)).collect();
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().flatten() {
                if let Some(p) = prod[*v] {
                    g.add_edge(idx[p], idx[i], ());
                }
            }
        }
        let order = petgraph::algo::toposort(&g, None).map_err(|c| IrError::Graph {
            graph: self.name.clone(),
            msg: format!("cycle through node '{}'", self.nodes[g[c.node_id()]].name),
        })?;
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        self.nodes = order
            .into_iter()
            .map(|n| old[g[n]].take().expect("each node once"))
            .collect();
        Ok(())
    }

    /// Runs shape/dtype inference over all nodes in order, replacing the output facts.
    /// Outputs whose inputs are all constant (and small) get their value computed, so shape
    /// sub-graphs fold to constants.
    pub fn infer(&mut self) -> Result<()> {
        for ni in 0..self.nodes.len() {
            let outs = self.infer_node(ni)?;
            let node = &self.nodes[ni];
            if outs.len() < node.outputs.len() {
                return Err(self.node_err(
                    ni,
                    format!(
                        "op produces {} outputs but the node declares {}",
                        outs.len(),
                        node.outputs.len()
                    ),
                ));
            }
            let node_outputs = node.outputs.clone();
            for (o, f) in node_outputs.into_iter().zip(outs) {
                self.values[o].fact = f;
            }
        }
        Ok(())
    }

    /// Infers the output facts of node `ni` from the current facts of its inputs.
    pub fn infer_node(&self, ni: usize) -> Result<Vec<Fact>> {
        /// Constant inputs up to this many elements are folded during inference.
        const FOLD_LIMIT: usize = 1 << 16;
        let node = &self.nodes[ni];
        let facts: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| i.map(|i| &self.values[i].fact))
            .collect();
        let mut outs = node.op.infer(&facts).map_err(|m| self.node_err(ni, m))?;
        let all_const = facts.iter().flatten().all(|f| f.value.is_some());
        let small = facts
            .iter()
            .flatten()
            .all(|f| f.value().is_some_and(|t| t.len() <= FOLD_LIMIT));
        let outs_small = outs
            .iter()
            .all(|f| f.shape.numel().is_some_and(|n| n <= FOLD_LIMIT));
        if all_const && small && outs_small && outs.iter().any(|f| f.value.is_none()) {
            let tensors: Vec<Option<&Tensor>> =
                facts.iter().map(|f| f.and_then(|f| f.value())).collect();
            let vals = node.op.eval(&tensors).map_err(|m| self.node_err(ni, m))?;
            for (f, v) in outs.iter_mut().zip(vals) {
                *f = Fact::constant(v);
            }
        }
        Ok(outs)
    }

    /// An error about node `ni`.
    pub fn node_err(&self, ni: usize, msg: impl Into<String>) -> IrError {
        let n = &self.nodes[ni];
        IrError::Node {
            node: n.name.clone(),
            op_type: n.op.op_type().to_string(),
            msg: msg.into(),
        }
    }

    /// Total number of elements and bytes held in constants (parameters).
    pub fn param_stats(&self) -> (usize, usize) {
        let prod = self.producers();
        self.values
            .iter()
            .enumerate()
            .filter(|(i, _)| prod[*i].is_none())
            .filter_map(|(_, v)| v.fact.value())
            .fold((0, 0), |(n, b), t| (n + t.len(), b + t.byte_size()))
    }

    /// Histogram of op types, sorted by count then name.
    pub fn op_histogram(&self) -> Vec<(&'static str, usize)> {
        let mut h: HashMap<&'static str, usize> = HashMap::new();
        for n in &self.nodes {
            *h.entry(n.op.op_type()).or_default() += 1;
        }
        let mut v: Vec<_> = h.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }

    /// Replaces the constant contents of a value.
    pub fn set_const(&mut self, id: ValueId, t: Tensor) {
        self.values[id].fact = Fact::constant(t);
    }

    /// The constant tensor of a value as a shared pointer, if constant.
    pub fn const_arc(&self, id: ValueId) -> Option<Arc<Tensor>> {
        self.values[id].fact.value.clone()
    }
}
