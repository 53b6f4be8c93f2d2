//! Runs the ONNX backend node tests whose graphs only use elementwise ops (plus `Constant`)
//! through `ElementwiseOp` inference and evaluation. A small self-contained loader, so the
//! elementwise family can be checked independently of the importer.
//!
//! Data: `$KILN_NODE_DATA` or `<workspace>/.data/node`; skipped when absent. Set
//! `KILN_ELEMENTWISE_FILTER` to a substring of test names to run a subset.

use kiln_ir::ops::elementwise::ElementwiseOp;
use kiln_ir::ops::{AttrValue, OnnxNode, OpFamily};
use kiln_ir::{DType, Fact, Shape, Tensor};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[allow(clippy::all, dead_code, missing_docs)]
mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// Decodes a tensor; `None` for dtypes Kiln does not support.
fn tensor(t: &onnx::TensorProto) -> Option<Tensor> {
    let dtype = DType::from_onnx(t.data_type?)?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let raw = t.raw_data.clone().unwrap_or_default();
    macro_rules! from_raw {
        ($ty:ty) => {{
            let w = std::mem::size_of::<$ty>();
            let v: Vec<$ty> = raw
                .chunks_exact(w)
                .map(|c| <$ty>::from_le_bytes(c.try_into().unwrap()))
                .collect();
            v
        }};
    }
    let use_raw = t.raw_data.is_some();
    let out = match dtype {
        DType::F32 if use_raw => Tensor::try_from_vec(&shape, from_raw!(f32)),
        DType::F32 => Tensor::try_from_vec(&shape, t.float_data.clone()),
        DType::F64 if use_raw => Tensor::try_from_vec(&shape, from_raw!(f64)),
        DType::F64 => Tensor::try_from_vec(&shape, t.double_data.clone()),
        DType::I64 if use_raw => Tensor::try_from_vec(&shape, from_raw!(i64)),
        DType::I64 => Tensor::try_from_vec(&shape, t.int64_data.clone()),
        DType::U64 if use_raw => Tensor::try_from_vec(&shape, from_raw!(u64)),
        DType::U64 => Tensor::try_from_vec(&shape, t.uint64_data.clone()),
        DType::U32 if use_raw => Tensor::try_from_vec(&shape, from_raw!(u32)),
        DType::U32 => {
            Tensor::try_from_vec(&shape, t.uint64_data.iter().map(|&v| v as u32).collect())
        }
        DType::I32 if use_raw => Tensor::try_from_vec(&shape, from_raw!(i32)),
        DType::I32 => Tensor::try_from_vec(&shape, t.int32_data.clone()),
        DType::I16 if use_raw => Tensor::try_from_vec(&shape, from_raw!(i16)),
        DType::U16 if use_raw => Tensor::try_from_vec(&shape, from_raw!(u16)),
        DType::I8 if use_raw => Tensor::try_from_vec(&shape, from_raw!(i8)),
        DType::U8 if use_raw => Tensor::try_from_vec(&shape, from_raw!(u8)),
        DType::Bool if use_raw => {
            Tensor::try_from_vec(&shape, raw.iter().map(|&b| b != 0).collect())
        }
        DType::F16 if use_raw => Tensor::try_from_vec(
            &shape,
            from_raw!(u16)
                .into_iter()
                .map(half::f16::from_bits)
                .collect(),
        ),
        DType::BF16 if use_raw => Tensor::try_from_vec(
            &shape,
            from_raw!(u16)
                .into_iter()
                .map(half::bf16::from_bits)
                .collect(),
        ),
        // remaining small types in int32_data
        _ => {
            let bits: Vec<i32> = t.int32_data.clone();
            let f = Tensor::from_vec(&[bits.len()], bits.iter().map(|&b| b as i64).collect());
            let v = match dtype {
                DType::F16 => Tensor::try_from_vec(
                    &[bits.len()],
                    bits.iter()
                        .map(|&b| half::f16::from_bits(b as u16))
                        .collect(),
                ),
                DType::BF16 => Tensor::try_from_vec(
                    &[bits.len()],
                    bits.iter()
                        .map(|&b| half::bf16::from_bits(b as u16))
                        .collect(),
                ),
                _ => Ok(f.cast(dtype)),
            };
            v.and_then(|v| v.reshape(&shape))
        }
    };
    let out = out.ok()?;
    (out.len() == n).then_some(out)
}

fn attr(a: &onnx::AttributeProto) -> Option<AttrValue> {
    Some(match a.r#type? {
        1 => AttrValue::Float(a.f?),
        2 => AttrValue::Int(a.i?),
        3 => AttrValue::String(String::from_utf8_lossy(a.s.as_deref()?).into_owned()),
        4 => AttrValue::Tensor(tensor(a.t.as_ref()?)?),
        6 => AttrValue::Floats(a.floats.clone()),
        7 => AttrValue::Ints(a.ints.clone()),
        8 => AttrValue::Strings(
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        ),
        _ => return None,
    })
}

fn load_pb(p: &Path) -> Option<Tensor> {
    let bytes = std::fs::read(p).ok()?;
    tensor(&onnx::TensorProto::decode(bytes.as_slice()).ok()?)
}

enum Outcome {
    Pass,
    Skip(String),
    Fail(String),
}

fn run_case(dir: &Path) -> Outcome {
    let Ok(bytes) = std::fs::read(dir.join("model.onnx")) else {
        return Outcome::Skip("no model".into());
    };
    let model = onnx::ModelProto::decode(bytes.as_slice()).expect("model decodes");
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty())
        .and_then(|o| o.version)
        .unwrap_or(1);
    let graph = model.graph.expect("graph");
    let ours = |n: &onnx::NodeProto| {
        let op_type = n.op_type.clone().unwrap_or_default();
        let probe = OnnxNode {
            op_type: op_type.clone(),
            opset,
            ..OnnxNode::default()
        };
        // parse without attributes/arity just to know whether the op is in the family
        op_type == "Constant" || !matches!(ElementwiseOp::from_onnx(&probe), Ok(None))
    };
    if let Some(n) = graph.node.iter().find(|n| !ours(n)) {
        return Outcome::Skip(format!("op {:?}", n.op_type));
    }
    let mut values: HashMap<String, Tensor> = HashMap::new();
    let mut facts: HashMap<String, Fact> = HashMap::new();
    for init in &graph.initializer {
        let Some(t) = tensor(init) else {
            return Outcome::Skip("initializer dtype".into());
        };
        let name = init.name.clone().unwrap_or_default();
        facts.insert(name.clone(), Fact::new(t.dtype(), Shape::known(t.shape())));
        values.insert(name, t);
    }
    let data = dir.join("test_data_set_0");
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !values.contains_key(i.name.as_deref().unwrap_or("")))
        .collect();
    for (k, i) in inputs.iter().enumerate() {
        let Some(t) = load_pb(&data.join(format!("input_{k}.pb"))) else {
            return Outcome::Skip("input dtype".into());
        };
        let name = i.name.clone().unwrap_or_default();
        facts.insert(name.clone(), Fact::new(t.dtype(), Shape::known(t.shape())));
        values.insert(name, t);
    }
    for node in &graph.node {
        let op_type = node.op_type.clone().unwrap_or_default();
        let mut attrs = BTreeMap::new();
        for a in &node.attribute {
            match attr(a) {
                Some(v) => attrs.insert(a.name.clone().unwrap_or_default(), v),
                None => return Outcome::Skip(format!("attribute {:?}", a.name)),
            };
        }
        if op_type == "Constant" {
            let t = match attrs.iter().next() {
                Some((_, AttrValue::Tensor(t))) => t.clone(),
                Some((_, AttrValue::Float(v))) => Tensor::scalar(*v),
                Some((_, AttrValue::Int(v))) => Tensor::scalar(*v),
                Some((_, AttrValue::Floats(v))) => Tensor::from_vec(&[v.len()], v.clone()),
                Some((_, AttrValue::Ints(v))) => Tensor::vec_i64(v),
                _ => return Outcome::Skip("Constant form".into()),
            };
            facts.insert(
                node.output[0].clone(),
                Fact::new(t.dtype(), Shape::known(t.shape())),
            );
            values.insert(node.output[0].clone(), t);
            continue;
        }
        let onnx_node = OnnxNode {
            name: node.name.clone().unwrap_or_default(),
            op_type: op_type.clone(),
            opset,
            attrs,
            inputs_present: node.input.iter().map(|i| !i.is_empty()).collect(),
            num_outputs: node.output.len(),
        };
        let op = match ElementwiseOp::from_onnx(&onnx_node) {
            Ok(Some(op)) => op,
            Ok(None) => return Outcome::Skip(format!("op {op_type}")),
            Err(e) if e.starts_with("attribute 'to'") => return Outcome::Skip(e),
            Err(e) => return Outcome::Fail(format!("{op_type}: from_onnx: {e}")),
        };
        let in_t: Vec<Option<&Tensor>> = node
            .input
            .iter()
            .map(|i| if i.is_empty() { None } else { values.get(i) })
            .collect();
        let in_f: Vec<Option<&Fact>> = node
            .input
            .iter()
            .map(|i| if i.is_empty() { None } else { facts.get(i) })
            .collect();
        let inferred = match op.infer(&in_f) {
            Ok(f) => f,
            Err(e) => return Outcome::Fail(format!("{op_type}: infer: {e}")),
        };
        let outs = match op.eval(&in_t) {
            Ok(o) => o,
            Err(e) => return Outcome::Fail(format!("{op_type}: eval: {e}")),
        };
        for ((name, t), f) in node.output.iter().zip(outs).zip(inferred) {
            if f.dtype != t.dtype() || f.shape != Shape::known(t.shape()) {
                return Outcome::Fail(format!(
                    "{op_type}: inferred {} {} but eval gave {} {:?}",
                    f.dtype,
                    f.shape,
                    t.dtype(),
                    t.shape()
                ));
            }
            facts.insert(name.clone(), f);
            values.insert(name.clone(), t);
        }
    }
    for (k, o) in graph.output.iter().enumerate() {
        let Some(expected) = load_pb(&data.join(format!("output_{k}.pb"))) else {
            return Outcome::Skip("output dtype".into());
        };
        let got = &values[o.name.as_deref().unwrap_or("")];
        if let Err(e) = got.check_close(&expected, 1e-3, 1e-7) {
            return Outcome::Fail(format!("output {k}: {e}"));
        }
    }
    Outcome::Pass
}

#[test]
fn elementwise_node_tests() {
    let root = std::env::var_os("KILN_NODE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.data/node"));
    let Ok(entries) = std::fs::read_dir(&root) else {
        eprintln!("no node test data at {}: skipped", root.display());
        return;
    };
    let filter = std::env::var("KILN_ELEMENTWISE_FILTER").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter(|p| p.to_string_lossy().contains(&filter))
        .collect();
    dirs.sort();
    let (mut pass, mut skips, mut fails) = (0, Vec::new(), Vec::new());
    for d in &dirs {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        match run_case(d) {
            Outcome::Pass => pass += 1,
            Outcome::Skip(why) => skips.push((name, why)),
            // random training-mode dropout is documented as unsupported
            Outcome::Fail(why)
                if name.starts_with("test_training_dropout") && why.contains("not supported") =>
            {
                skips.push((name, why))
            }
            Outcome::Fail(why) => fails.push((name, why)),
        }
    }
    if std::env::var_os("KILN_ELEMENTWISE_VERBOSE").is_some() {
        for (n, why) in &skips {
            eprintln!("skip {n}: {why}");
        }
    }
    for (n, why) in &fails {
        eprintln!("FAIL {n}: {why}");
    }
    eprintln!(
        "elementwise node tests: {pass} passed, {} failed, {} skipped",
        fails.len(),
        skips.len()
    );
    assert!(fails.is_empty(), "{} node tests failed", fails.len());
}
