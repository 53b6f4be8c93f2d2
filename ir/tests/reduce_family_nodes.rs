//! Runs the ONNX backend node tests of the reduce / linalg / resize op families (single-node
//! models) directly through `Op::from_onnx`, `Op::infer` and `Op::eval`, without the graph
//! importer, checking inference both with non-constant and with constant parameter inputs.
//! Data: `$KILN_NODE_TESTS` or `<repo>/.data/node`; skipped when absent.
//! Filter with `KILN_FAMILY_FILTER=<substring>`.

use kiln_ir::onnx::{load_tensor_pb, proto, tensor_proto};
use kiln_ir::ops::{AttrValue, Fact, OnnxNode, Op};
use kiln_ir::{Shape, Tensor};
use prost::Message;
use std::path::{Path, PathBuf};

const PREFIXES: &[&str] = &[
    "test_reduce_",
    "test_argmax",
    "test_argmin",
    "test_cumsum",
    "test_top_k",
    "test_matmul_",
    "test_matmulinteger",
    "test_gemm",
    "test_einsum",
    "test_resize",
    "test_upsample",
];

/// `$KILN_NODE_TESTS` or `<repo>/.data/node`.
fn data_dir() -> PathBuf {
    std::env::var_os("KILN_NODE_TESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.data/node"))
}

fn attr(a: &proto::AttributeProto) -> AttrValue {
    match a.r#type.unwrap_or(0) {
        1 => AttrValue::Float(a.f()),
        2 => AttrValue::Int(a.i()),
        3 => AttrValue::String(String::from_utf8_lossy(a.s()).into()),
        4 => AttrValue::Tensor(tensor_proto::decode(a.t.as_ref().expect("tensor"), None).unwrap()),
        6 => AttrValue::Floats(a.floats.clone()),
        7 => AttrValue::Ints(a.ints.clone()),
        t => panic!("attribute type {t}"),
    }
}

fn load_pb(path: &Path) -> Tensor {
    load_tensor_pb(path).expect("test tensor").1
}

/// Runs one test; Err describes the failure.
fn run(dir: &Path) -> Result<(), String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let model = proto::ModelProto::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty())
        .and_then(|o| o.version)
        .unwrap_or(1);
    let graph = model.graph.as_ref().ok_or("no graph")?;
    if graph.node.len() != 1 {
        return Err("SKIP multi-node".into());
    }
    let n = &graph.node[0];
    let node = OnnxNode {
        name: n.name.clone().unwrap_or_default(),
        op_type: n.op_type.clone().unwrap_or_default(),
        opset,
        attrs: n
            .attribute
            .iter()
            .map(|a| (a.name.clone().unwrap_or_default(), attr(a)))
            .collect(),
        inputs_present: n.input.iter().map(|s| !s.is_empty()).collect(),
        num_outputs: n.output.len(),
    };
    let op = Op::from_onnx(&node)?.ok_or("op not recognised")?;
    let ds = dir.join("test_data_set_0");
    let mut graph_inputs = Vec::new();
    for (i, gi) in graph.input.iter().enumerate() {
        let t = load_pb(&ds.join(format!("input_{i}.pb")));
        graph_inputs.push((gi.name.clone().unwrap_or_default(), t));
    }
    let ins: Vec<Option<&Tensor>> = n
        .input
        .iter()
        .map(|name| {
            graph_inputs
                .iter()
                .find(|(g, _)| !name.is_empty() && g == name)
                .map(|(_, t)| t)
        })
        .collect();
    let expected: Vec<Tensor> = (0..n.output.len())
        .map(|i| load_pb(&ds.join(format!("output_{i}.pb"))))
        .collect();
    // infer without values (only the data input is non constant in spirit) and with values
    let facts: Vec<Option<Fact>> = ins
        .iter()
        .map(|t| t.map(|t| Fact::new(t.dtype(), Shape::known(t.shape()))))
        .collect();
    let const_facts: Vec<Option<Fact>> = ins
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.map(|t| {
                if i == 0 {
                    Fact::new(t.dtype(), Shape::known(t.shape()))
                } else {
                    Fact::constant(t.clone())
                }
            })
        })
        .collect();
    for (label, fs) in [("infer", &facts), ("infer(const)", &const_facts)] {
        let refs: Vec<Option<&Fact>> = fs.iter().map(|f| f.as_ref()).collect();
        let out = op.infer(&refs).map_err(|e| format!("{label}: {e}"))?;
        for (o, e) in out.iter().zip(&expected) {
            let ok = o.dtype == e.dtype()
                && o.shape.rank() == e.rank()
                && o.shape
                    .0
                    .iter()
                    .zip(e.shape())
                    .all(|(d, &n)| d.compatible(&n.into()));
            if !ok {
                return Err(format!(
                    "{label}: {} {} vs expected {} {:?}",
                    o.dtype,
                    o.shape,
                    e.dtype(),
                    e.shape()
                ));
            }
        }
    }
    let out = op.eval(&ins).map_err(|e| format!("eval: {e}"))?;
    for (i, (o, e)) in out.iter().zip(&expected).enumerate() {
        o.check_close(e, 1e-3, 1e-7)
            .map_err(|m| format!("output {i}: {m}"))?;
    }
    Ok(())
}

#[test]
fn family_node_tests() {
    let dir = data_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        eprintln!("no node test data at {}; skipping", dir.display());
        return;
    };
    let filter = std::env::var("KILN_FAMILY_FILTER").unwrap_or_default();
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| PREFIXES.iter().any(|p| n.starts_with(p)))
        .filter(|n| !n.ends_with("_expanded") && n.contains(&filter))
        .collect();
    names.sort();
    let (mut pass, mut fail) = (0, Vec::new());
    for name in &names {
        match run(&dir.join(name)) {
            Ok(()) => pass += 1,
            Err(e) if e.starts_with("SKIP") => {}
            Err(e) => fail.push(format!("{name}: {e}")),
        }
    }
    for f in &fail {
        eprintln!("FAIL {f}");
    }
    eprintln!("{pass} passed, {} failed", fail.len());
    assert!(fail.is_empty(), "{} node tests failed", fail.len());
}
