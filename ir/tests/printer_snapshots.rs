//! Snapshot tests of the text printer and of the IR clean-ups (`insta`).

use kiln_ir::onnx::{load_bytes, proto};
use kiln_ir::printer::to_text;
use kiln_ir::simplify::simplify;
use prost::Message;

fn vi(name: &str, elem: i32, dims: &[&str]) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(n) => Value::DimValue(n),
                Err(_) => Value::DimParam(d.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(elem),
                    shape: Some(proto::TensorShapeProto { dim }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<proto::AttributeProto>,
) -> proto::NodeProto {
    proto::NodeProto {
        name: Some(outputs[0].to_string()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn ints_attr(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn init_f32(name: &str, dims: &[i64]) -> proto::TensorProto {
    let n: i64 = dims.iter().product();
    proto::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: (0..n).map(|i| i as f32 * 0.5).collect(),
        ..Default::default()
    }
}

fn init_i64(name: &str, v: &[i64]) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(7),
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

/// x: f32[2,N... ] → MatMul(w) → Relu → Reshape with an exporter-style shape chain
/// (Shape → Gather → Unsqueeze → Concat) → y; plus a dead branch.
fn model() -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(proto::GraphProto {
            name: Some("snap".into()),
            node: vec![
                node("MatMul", &["x", "w"], &["h"], vec![]),
                node("Relu", &["h"], &["r"], vec![]),
                node("Shape", &["r"], &["s"], vec![]),
                node("Gather", &["s", "zero"], &["d0"], vec![]),
                node("Unsqueeze", &["d0", "axes0"], &["d0u"], vec![]),
                node(
                    "Concat",
                    &["d0u", "minus1"],
                    &["newshape"],
                    vec![proto::AttributeProto {
                        name: Some("axis".into()),
                        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
                        i: Some(0),
                        ..Default::default()
                    }],
                ),
                node("Reshape", &["r", "newshape"], &["y"], vec![]),
                node(
                    "Transpose",
                    &["r"],
                    &["dead"],
                    vec![ints_attr("perm", &[1, 0])],
                ),
            ],
            initializer: vec![
                init_f32("w", &[3, 4]),
                proto::TensorProto {
                    name: Some("zero".into()),
                    data_type: Some(7),
                    int64_data: vec![0],
                    ..Default::default()
                },
                init_i64("axes0", &[0]),
                init_i64("minus1", &[-1]),
            ],
            input: vec![vi("x", 1, &["2", "3"])],
            output: vec![vi("y", 1, &["2", "4"])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn printer_before_and_after_simplify() {
    let mut g = load_bytes(&model().encode_to_vec(), "snap.onnx", None).unwrap();
    insta::assert_snapshot!("imported", to_text(&g));
    let removed = simplify(&mut g);
    assert_eq!(
        removed, 5,
        "four shape-chain nodes folded, one dead Transpose removed"
    );
    kiln_ir::verify::verify(&g).unwrap();
    insta::assert_snapshot!("simplified", to_text(&g));
}
