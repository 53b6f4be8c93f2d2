//! ONNX import: protobuf bytes → loosely typed nodes ([`OnnxNode`]) → typed [`Graph`].
//!
//! The protobuf types are generated at build time from the vendored `proto/onnx.proto`.

pub mod tensor_proto;

use crate::error::{IrError, Result};
use crate::graph::{Graph, Node, ValueId};
use crate::ops::{AttrValue, Fact, OnnxNode, Op};
use crate::shape::{Dim, Shape};
use crate::tensor::Tensor;
use crate::DType;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Types generated from `onnx.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use proto::attribute_proto::AttributeType;

/// Loads an ONNX model file into a typed, shape-inferred graph.
pub fn load(path: impl AsRef<Path>) -> Result<Graph> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| IrError::Io {
        path: path.display().to_string(),
        source,
    })?;
    load_bytes(&bytes, &path.display().to_string(), path.parent())
}

/// Loads an ONNX model from bytes. `path` is used in messages; `base_dir` resolves
/// external data.
pub fn load_bytes(bytes: &[u8], path: &str, base_dir: Option<&Path>) -> Result<Graph> {
    let model = proto::ModelProto::decode(bytes).map_err(|e| IrError::Decode {
        path: path.to_string(),
        msg: e.to_string(),
    })?;
    Importer {
        path: path.to_string(),
        base_dir,
    }
    .model(&model)
}

/// Reads a `.pb` file holding one `TensorProto` (ONNX test data format).
pub fn load_tensor_pb(path: impl AsRef<Path>) -> Result<(String, Tensor)> {
    let path = path.as_ref();
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| IrError::Io {
        path: p.clone(),
        source,
    })?;
    let t = proto::TensorProto::decode(bytes.as_slice()).map_err(|e| IrError::Decode {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let tensor = tensor_proto::decode(&t, path.parent()).map_err(|msg| IrError::Model {
        path: p,
        field: format!("tensor '{}'", t.name()),
        msg,
    })?;
    Ok((t.name().to_string(), tensor))
}

/// Writes a tensor as a `.pb` file holding one `TensorProto`.
pub fn tensor_pb_bytes(name: &str, t: &Tensor) -> Vec<u8> {
    tensor_proto::encode(name, t).encode_to_vec()
}

struct Importer<'a> {
    path: String,
    base_dir: Option<&'a Path>,
}

impl Importer<'_> {
    fn err(&self, field: impl Into<String>, msg: impl Into<String>) -> IrError {
        IrError::Model {
            path: self.path.clone(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    fn model(&self, m: &proto::ModelProto) -> Result<Graph> {
        let mut opset = None;
        // Other domains are fine unless a node uses them (reported per node).
        for o in &m.opset_import {
            if matches!(o.domain(), "" | "ai.onnx") {
                opset = Some(o.version());
            }
        }
        let opset = match (opset, m.opset_import.is_empty()) {
            (Some(v), _) => v,
            // IR version < 3 models have no opset_import: opset 1.
            (None, true) => 1,
            // Only other domains: a default-domain node is an error (see `graph`).
            (None, false) => 0,
        };
        let g = m
            .graph
            .as_ref()
            .ok_or_else(|| self.err("graph", "missing"))?;
        self.graph(g, opset)
    }

    fn graph(&self, g: &proto::GraphProto, opset: i64) -> Result<Graph> {
        let mut graph = Graph {
            name: g.name().to_string(),
            opset,
            ..Default::default()
        };
        let mut names: HashMap<String, ValueId> = HashMap::new();
        if !g.sparse_initializer.is_empty() {
            return Err(self.err(
                "graph.sparse_initializer",
                "sparse initializers are not supported",
            ));
        }
        for (i, t) in g.initializer.iter().enumerate() {
            let field = format!("graph.initializer[{i}] '{}'", t.name());
            if t.name().is_empty() {
                return Err(self.err(field, "initializer has no name"));
            }
            let tensor = tensor_proto::decode(t, self.base_dir).map_err(|m| self.err(&field, m))?;
            let id = graph.add_const(t.name(), tensor);
            names.insert(t.name().to_string(), id);
        }
        for (i, vi) in g.input.iter().enumerate() {
            if names.contains_key(vi.name()) {
                // An input with an initializer of the same name: a constant with a default.
                continue;
            }
            let field = format!("graph.input[{i}] '{}'", vi.name());
            let fact = self.value_info(vi).map_err(|m| self.err(&field, m))?;
            let id = graph.add_value(vi.name(), fact);
            names.insert(vi.name().to_string(), id);
            graph.inputs.push(id);
        }
        // Create all node outputs first, so nodes may come in any order.
        let mut pending = Vec::new();
        for (ni, n) in g.node.iter().enumerate() {
            let node_name = if n.name().is_empty() {
                format!("{}_{ni}", n.op_type())
            } else {
                n.name().to_string()
            };
            let field = format!("graph.node[{ni}] '{node_name}' ({})", n.op_type());
            match n.domain() {
                "" | "ai.onnx" if opset == 0 => {
                    return Err(self.err(
                        &field,
                        "opset_import has no entry for the default ONNX domain",
                    ))
                }
                "" | "ai.onnx" => {}
                d => {
                    return Err(IrError::Unsupported {
                        node: node_name,
                        op_type: n.op_type().to_string(),
                        domain: format!("{d}::"),
                        opset,
                    })
                }
            }
            let onnx_node = self
                .onnx_node(n, &node_name, opset)
                .map_err(|m| self.err(&field, m))?;
            let mut outputs = Vec::new();
            for o in &n.output {
                if o.is_empty() {
                    // an optional output that is not wanted: give it a private value
                    outputs.push(graph.add_value(
                        format!("{node_name}:unused{}", outputs.len()),
                        Fact::new(DType::F32, Shape::default()),
                    ));
                    continue;
                }
                if names.contains_key(o) {
                    return Err(self.err(&field, format!("output '{o}' is defined twice")));
                }
                let id = graph.add_value(o.clone(), Fact::new(DType::F32, Shape::default()));
                names.insert(o.clone(), id);
                outputs.push(id);
            }
            pending.push((ni, node_name, onnx_node, outputs));
        }
        for (ni, node_name, onnx_node, outputs) in pending {
            let n = &g.node[ni];
            let field = format!("graph.node[{ni}] '{node_name}' ({})", n.op_type());
            let mut inputs = Vec::new();
            for inp in &n.input {
                if inp.is_empty() {
                    inputs.push(None);
                    continue;
                }
                let id = *names.get(inp).ok_or_else(|| {
                    self.err(&field, format!("input '{inp}' is not a graph input, an initializer or the output of any node"))
                })?;
                inputs.push(Some(id));
            }
            if n.op_type() == "Constant" {
                let t = constant_value(&onnx_node).map_err(|m| self.err(&field, m))?;
                if outputs.len() != 1 {
                    return Err(self.err(&field, "Constant must have exactly one output"));
                }
                graph.set_const(outputs[0], t);
                continue;
            }
            let op = match Op::from_onnx(&onnx_node).map_err(|msg| IrError::Node {
                node: node_name.clone(),
                op_type: n.op_type().to_string(),
                msg,
            })? {
                Some(op) => op,
                None => {
                    return Err(IrError::Unsupported {
                        node: node_name,
                        op_type: n.op_type().to_string(),
                        domain: String::new(),
                        opset,
                    })
                }
            };
            graph.nodes.push(Node {
                name: node_name,
                op,
                inputs,
                outputs,
            });
        }
        let mut declared = Vec::new();
        for (i, vi) in g.output.iter().enumerate() {
            let field = format!("graph.output[{i}] '{}'", vi.name());
            let id = *names.get(vi.name()).ok_or_else(|| {
                self.err(&field, "not produced by any node, initializer or input")
            })?;
            graph.outputs.push(id);
            declared.push((field, id, self.value_info(vi).ok()));
        }
        graph.toposort()?;
        graph.infer()?;
        for (field, id, fact) in declared {
            let Some(fact) = fact else { continue };
            let got = &graph.values[id].fact;
            if got.dtype != fact.dtype {
                return Err(self.err(
                    field,
                    format!(
                        "declared {} but the graph computes {}",
                        fact.dtype, got.dtype
                    ),
                ));
            }
            let compatible = got.shape.rank() == fact.shape.rank()
                && got
                    .shape
                    .0
                    .iter()
                    .zip(&fact.shape.0)
                    .all(|(a, b)| a.compatible(b));
            if !compatible && fact.shape.rank() > 0 {
                return Err(self.err(
                    field,
                    format!(
                        "declared shape {} but the graph computes {}",
                        fact.shape, got.shape
                    ),
                ));
            }
        }
        crate::verify::verify(&graph)?;
        Ok(graph)
    }

    fn value_info(&self, vi: &proto::ValueInfoProto) -> std::result::Result<Fact, String> {
        use proto::type_proto::Value;
        let ty = vi
            .r#type
            .as_ref()
            .and_then(|t| t.value.as_ref())
            .ok_or("type is missing")?;
        let Value::TensorType(tt) = ty else {
            return Err(
                "sequence, map, optional and sparse types are not supported (only tensors)".into(),
            );
        };
        let code = tt.elem_type();
        let dtype = DType::from_onnx(code).ok_or_else(|| {
            format!(
                "elem_type {code} ({}) is not supported",
                DType::onnx_name(code)
            )
        })?;
        let shape = tt
            .shape
            .as_ref()
            .ok_or("shape is missing (rank unknown); fix the input shape")?;
        let dims = shape
            .dim
            .iter()
            .map(|d| {
                use proto::tensor_shape_proto::dimension::Value as D;
                match &d.value {
                    Some(D::DimValue(v)) if *v >= 0 => Ok(Dim::Known(*v as usize)),
                    Some(D::DimValue(v)) => Err(format!("negative dim_value {v}")),
                    Some(D::DimParam(p)) if !p.is_empty() => Ok(Dim::Sym(p.clone())),
                    _ => Ok(Dim::unknown()),
                }
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(Fact::new(dtype, Shape(dims)))
    }

    fn onnx_node(
        &self,
        n: &proto::NodeProto,
        name: &str,
        opset: i64,
    ) -> std::result::Result<OnnxNode, String> {
        let mut attrs = BTreeMap::new();
        for a in &n.attribute {
            let an = a.name();
            if a.ref_attr_name.is_some() {
                return Err(format!(
                    "attribute '{an}': references to function attributes are not supported"
                ));
            }
            let v = match a.r#type() {
                AttributeType::Float => AttrValue::Float(a.f()),
                AttributeType::Int => AttrValue::Int(a.i()),
                AttributeType::String => {
                    AttrValue::String(String::from_utf8_lossy(a.s()).into_owned())
                }
                AttributeType::Tensor => {
                    let t =
                        a.t.as_ref()
                            .ok_or_else(|| format!("attribute '{an}': tensor is missing"))?;
                    AttrValue::Tensor(
                        tensor_proto::decode(t, self.base_dir)
                            .map_err(|m| format!("attribute '{an}': {m}"))?,
                    )
                }
                AttributeType::Floats => AttrValue::Floats(a.floats.clone()),
                AttributeType::Ints => AttrValue::Ints(a.ints.clone()),
                AttributeType::Strings => AttrValue::Strings(
                    a.strings
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect(),
                ),
                AttributeType::Graph | AttributeType::Graphs => {
                    return Err(format!(
                    "attribute '{an}': nested graphs (If/Loop/Scan bodies) are not supported yet"
                ))
                }
                other => {
                    return Err(format!(
                        "attribute '{an}': attribute type {other:?} is not supported"
                    ))
                }
            };
            attrs.insert(an.to_string(), v);
        }
        Ok(OnnxNode {
            name: name.to_string(),
            op_type: n.op_type().to_string(),
            opset,
            attrs,
            inputs_present: n.input.iter().map(|i| !i.is_empty()).collect(),
            num_outputs: n.output.len(),
        })
    }
}

/// The value of a `Constant` node from whichever attribute holds it.
fn constant_value(n: &OnnxNode) -> std::result::Result<Tensor, String> {
    if n.attrs.len() != 1 {
        return Err(format!(
            "Constant needs exactly one value attribute, found {:?}",
            n.attrs.keys().collect::<Vec<_>>()
        ));
    }
    Ok(match n.attrs.iter().next().expect("one attr") {
        (_, AttrValue::Tensor(t)) => t.clone(),
        (k, AttrValue::Float(f)) if k == "value_float" => Tensor::scalar(*f),
        (k, AttrValue::Int(i)) if k == "value_int" => Tensor::scalar(*i),
        (k, AttrValue::Floats(f)) if k == "value_floats" => Tensor::from_vec(&[f.len()], f.clone()),
        (k, AttrValue::Ints(i)) if k == "value_ints" => Tensor::vec_i64(i),
        (k, _) => {
            return Err(format!(
                "attribute '{k}': not supported for Constant (string and sparse values are not)"
            ))
        }
    })
}
