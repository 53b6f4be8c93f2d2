//! Runs the ONNX backend node tests of the `nn` op family (Conv, pooling, normalization,
//! Softmax...) directly against `NnOp`: decodes each single-node model and its test data,
//! checks inference and the reference implementation against the expected outputs.
//!
//! The node test data lives outside the repository; the test passes vacuously when it is
//! absent. Set `KILN_NODE_DATA` to point elsewhere, `KILN_NN_FILTER` to select tests.

use kiln_ir::onnx::{load_tensor_pb, proto, tensor_proto};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::ops::{AttrValue, Fact, OnnxNode, OpFamily};
use kiln_ir::{DType, Shape, Tensor};
use prost::Message;
use std::path::Path;

/// Decodes a `TensorProto` with the importer's decoder.
fn tensor(t: &proto::TensorProto) -> Result<Tensor, String> {
    tensor_proto::decode(t, None)
}

fn attr(a: &proto::AttributeProto) -> Result<AttrValue, String> {
    Ok(match a.r#type.unwrap_or(0) {
        1 => AttrValue::Float(a.f.unwrap_or(0.0)),
        2 => AttrValue::Int(a.i.unwrap_or(0)),
        3 => AttrValue::String(String::from_utf8_lossy(a.s.as_deref().unwrap_or(&[])).into()),
        4 => AttrValue::Tensor(tensor(a.t.as_ref().ok_or("tensor attr")?)?),
        6 => AttrValue::Floats(a.floats.clone()),
        7 => AttrValue::Ints(a.ints.clone()),
        8 => AttrValue::Strings(
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into())
                .collect(),
        ),
        t => return Err(format!("attribute type {t}")),
    })
}

fn load_pb(path: &Path) -> Result<Tensor, String> {
    load_tensor_pb(path)
        .map(|(_, t)| t)
        .map_err(|e| e.to_string())
}

/// Runs one test directory; `Ok(false)` when the model is not a single `nn` node.
fn run_case(dir: &Path) -> Result<bool, String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let model = proto::ModelProto::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    let graph = model.graph.ok_or("no graph")?;
    if graph.node.len() != 1 {
        return Ok(false);
    }
    let n = &graph.node[0];
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty())
        .and_then(|o| o.version)
        .unwrap_or(1);
    let mut attrs = std::collections::BTreeMap::new();
    for a in &n.attribute {
        // Graph / sparse attributes belong to control-flow ops of other families.
        let Ok(v) = attr(a) else { return Ok(false) };
        attrs.insert(a.name.clone().unwrap_or_default(), v);
    }
    let node = OnnxNode {
        name: n.name.clone().unwrap_or_default(),
        op_type: n.op_type.clone().unwrap_or_default(),
        opset,
        attrs,
        inputs_present: n.input.iter().map(|s| !s.is_empty()).collect(),
        num_outputs: n.output.len(),
    };
    let Some(op) = NnOp::from_onnx(&node)? else {
        return Ok(false);
    };
    let data = dir.join("test_data_set_0");
    let mut inputs: Vec<Option<Tensor>> = Vec::new();
    let mut k = 0;
    for name in &n.input {
        if name.is_empty() {
            inputs.push(None);
        } else {
            inputs.push(Some(load_pb(&data.join(format!("input_{k}.pb")))?));
            k += 1;
        }
    }
    let facts: Vec<Option<Fact>> = inputs
        .iter()
        .map(|t| {
            t.as_ref()
                .map(|t| Fact::new(t.dtype(), Shape::known(t.shape())))
        })
        .collect();
    let fact_refs: Vec<Option<&Fact>> = facts.iter().map(|f| f.as_ref()).collect();
    let inferred = op.infer(&fact_refs).map_err(|e| format!("infer: {e}"))?;
    let in_refs: Vec<Option<&Tensor>> = inputs.iter().map(|t| t.as_ref()).collect();
    let outs = op.eval(&in_refs).map_err(|e| format!("eval: {e}"))?;
    // the test data numbers the outputs the node produces (empty names skipped)
    let mut k = 0;
    for (i, name) in n.output.iter().enumerate() {
        if name.is_empty() {
            continue;
        }
        let expected = load_pb(&data.join(format!("output_{k}.pb")))?;
        k += 1;
        let got = outs.get(i).ok_or(format!("output {i} missing"))?;
        let fact = inferred
            .get(i)
            .ok_or(format!("inferred output {i} missing"))?;
        if fact.dtype != expected.dtype() || fact.shape != Shape::known(expected.shape()) {
            return Err(format!(
                "output {i}: inferred {} {} but expected {} {:?}",
                fact.dtype,
                fact.shape,
                expected.dtype(),
                expected.shape()
            ));
        }
        // bf16 keeps 8 significant bits, so rtol 1e-3 is finer than one of its ulps; the
        // expected bf16 outputs also round every intermediate op (Attention's differ from
        // the reference's single rounding by up to 2 ulps): compared within 2^-6
        let rtol = if expected.dtype() == DType::BF16 {
            2f64.powi(-6)
        } else {
            1e-3
        };
        got.check_close(&expected, rtol, 1e-7)
            .map_err(|e| format!("output {i}: {e}"))?;
    }
    Ok(true)
}

#[test]
fn nn_node_tests() {
    let root = std::env::var("KILN_NODE_DATA").unwrap_or("/work/main/.data/node".into());
    let filter = std::env::var("KILN_NN_FILTER").unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(&root) else {
        eprintln!("no node test data at {root}; skipping");
        return;
    };
    let mut dirs: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    let (mut passed, mut failed) = (0, Vec::new());
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if !dir.join("model.onnx").exists() || !name.contains(&filter) {
            continue;
        }
        match run_case(&dir) {
            Ok(true) => passed += 1,
            Ok(false) => {}
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    eprintln!("nn node tests: {passed} passed, {} failed", failed.len());
    for f in &failed {
        eprintln!("  FAIL {f}");
    }
    assert!(failed.is_empty(), "{} nn node tests failed", failed.len());
}

/// Times ResNet-sized convolutions (run with `--release -- --ignored --nocapture`).
#[test]
#[ignore]
fn resnet_conv_timing() {
    let conv = |x: &[usize], w: &[usize], stride: i64, pad: i64| {
        let mut attrs = std::collections::BTreeMap::new();
        attrs.insert("strides".into(), AttrValue::Ints(vec![stride; 2]));
        attrs.insert("pads".into(), AttrValue::Ints(vec![pad; 4]));
        let node = OnnxNode {
            op_type: "Conv".into(),
            opset: 11,
            attrs,
            inputs_present: vec![true; 3],
            num_outputs: 1,
            ..Default::default()
        };
        let op = NnOp::from_onnx(&node).unwrap().unwrap();
        let fill = |s: &[usize]| {
            let n: usize = s.iter().product();
            Tensor::from_vec(s, (0..n).map(|i| (i % 7) as f32 * 0.1).collect())
        };
        let (xt, wt, bt) = (fill(x), fill(w), fill(&w[..1]));
        let t = std::time::Instant::now();
        let y = op.eval(&[Some(&xt), Some(&wt), Some(&bt)]).unwrap();
        eprintln!(
            "conv {x:?} * {w:?} -> {:?}: {:?}",
            y[0].shape(),
            t.elapsed()
        );
    };
    conv(&[1, 3, 224, 224], &[64, 3, 7, 7], 2, 3);
    conv(&[1, 64, 56, 56], &[64, 64, 3, 3], 1, 1);
    conv(&[1, 256, 56, 56], &[64, 256, 1, 1], 1, 0);
    conv(&[1, 512, 7, 7], &[512, 512, 3, 3], 1, 1);
}
