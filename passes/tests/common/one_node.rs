//! Builds the graph of one ONNX node (shared by the `kiln-passes` tests and the end-to-end
//! tests through `#[path]`).
#![allow(dead_code)]

use kiln_ir::ops::{AttrValue, OnnxNode};
use kiln_ir::{DType, Fact, Graph, Node, Op, Shape, ValueId};

/// Appends the node `op_type` (`opset`, `attrs`) named `name`, reading `ins` (absent inputs
/// `None`) and writing `nout` new values `y0`, `y1`, … that become the graph's outputs, then
/// infers the graph's types.
pub fn push_node(
    g: &mut Graph,
    (op_type, opset, name): (&str, i64, &str),
    attrs: &[(&str, AttrValue)],
    ins: Vec<Option<ValueId>>,
    nout: usize,
) {
    let node = OnnxNode::new(
        op_type,
        opset,
        attrs,
        ins.iter().map(Option::is_some).collect(),
        nout,
    );
    let op = Op::from_onnx(&node).unwrap().unwrap();
    let outs: Vec<ValueId> = (0..nout)
        .map(|k| g.add_value(format!("y{k}"), Fact::new(DType::F32, Shape::unknown(0))))
        .collect();
    g.nodes.push(Node {
        name: name.into(),
        op,
        inputs: ins,
        outputs: outs.clone(),
    });
    g.outputs = outs;
    g.infer().unwrap();
}
