//! Bad input never panics: each case gives an error naming the file, node and field.

use kiln_ir::onnx::{load_bytes, proto};
use kiln_ir::{interp, Tensor};
use prost::Message;

fn tensor_type(elem: i32, dims: &[i64]) -> proto::TypeProto {
    use proto::tensor_shape_proto::{dimension::Value, Dimension};
    proto::TypeProto {
        value: Some(proto::type_proto::Value::TensorType(
            proto::type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            },
        )),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: i32, dims: &[i64]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(tensor_type(elem, dims)),
        ..Default::default()
    }
}

fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
    proto::NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A model `y = Add(x, b)` with x: f32[2,3]; `b` is an initializer of shape `b_dims`.
fn add_model(b_dims: &[i64], nodes: Vec<proto::NodeProto>) -> proto::ModelProto {
    let n: i64 = b_dims.iter().product();
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(proto::GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: vec![proto::TensorProto {
                name: Some("b".into()),
                dims: b_dims.to_vec(),
                data_type: Some(1),
                float_data: vec![1.0; n as usize],
                ..Default::default()
            }],
            input: vec![value_info("x", 1, &[2, 3])],
            output: vec![value_info("y", 1, &[2, 3])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn err_of(m: &proto::ModelProto) -> String {
    match load_bytes(&m.encode_to_vec(), "bad.onnx", None) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_and_garbled_files() {
    let good = add_model(&[3], vec![node("add0", "Add", &["x", "b"], &["y"])]).encode_to_vec();
    for cut in [1, good.len() / 3, good.len() - 1] {
        // truncation either fails to decode or leaves a model that fails validation
        if let Err(e) = load_bytes(&good[..cut], "cut.onnx", None) {
            assert!(e.to_string().contains("cut.onnx"), "{e}");
        }
    }
    let e = load_bytes(b"\xff\xff\xff\xff garbage", "garbled.onnx", None).unwrap_err();
    assert!(e.to_string().contains("garbled.onnx"), "{e}");
    let e = kiln_ir::onnx::load("/nonexistent/model.onnx").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/model.onnx"), "{e}");
}

#[test]
fn missing_initializer_names_node_and_input() {
    let m = add_model(&[3], vec![node("add0", "Add", &["x", "missing_w"], &["y"])]);
    let e = err_of(&m);
    assert!(e.contains("add0") && e.contains("missing_w"), "{e}");
}

#[test]
fn unknown_op_names_node_and_op() {
    let m = add_model(&[3], vec![node("frob0", "Frobnicate", &["x", "b"], &["y"])]);
    let e = err_of(&m);
    assert!(e.contains("frob0") && e.contains("Frobnicate"), "{e}");
    let mut m = add_model(&[3], vec![node("c0", "Foo", &["x", "b"], &["y"])]);
    m.graph.as_mut().unwrap().node[0].domain = Some("com.example".into());
    let e = err_of(&m);
    assert!(e.contains("com.example") && e.contains("c0"), "{e}");
}

#[test]
fn inconsistent_shape_names_node() {
    let m = add_model(&[4], vec![node("add0", "Add", &["x", "b"], &["y"])]);
    let e = err_of(&m);
    assert!(e.contains("add0"), "{e}");
}

#[test]
fn bad_initializer_data_names_field() {
    let mut m = add_model(&[3], vec![node("add0", "Add", &["x", "b"], &["y"])]);
    m.graph.as_mut().unwrap().initializer[0].float_data.pop();
    let e = err_of(&m);
    assert!(
        e.contains("initializer") && e.contains("'b'") && e.contains("float_data"),
        "{e}"
    );
}

#[test]
fn cycle_is_an_error() {
    let m = add_model(
        &[3],
        vec![
            node("a", "Add", &["x", "t2"], &["t1"]),
            node("b", "Add", &["t1", "b"], &["t2"]),
            node("c", "Identity", &["t2"], &["y"]),
        ],
    );
    let e = err_of(&m);
    assert!(e.contains("cycle"), "{e}");
}

#[test]
fn wrong_input_dtype_and_shape() {
    let m = add_model(&[3], vec![node("add0", "Add", &["x", "b"], &["y"])]);
    let g = load_bytes(&m.encode_to_vec(), "ok.onnx", None).unwrap();
    let e = interp::run(&g, &[Tensor::from_vec(&[2, 3], vec![1i64; 6])]).unwrap_err();
    assert!(
        e.to_string().contains("'x'") && e.to_string().contains("dtype"),
        "{e}"
    );
    let e = interp::run(&g, &[Tensor::from_vec(&[3, 2], vec![1f32; 6])]).unwrap_err();
    assert!(
        e.to_string().contains("'x'") && e.to_string().contains("shape"),
        "{e}"
    );
    let ok = interp::run(&g, &[Tensor::from_vec(&[2, 3], vec![1f32; 6])]).unwrap();
    assert_eq!(ok[0].to_f64_vec(), vec![2.0; 6]);
}
