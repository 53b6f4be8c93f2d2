//! Runs the ONNX backend node tests of the reduce / linalg / resize op families (single-node
//! models) directly through `Op::from_onnx`, `Op::infer` and `Op::eval`, without the graph
//! importer. Skips silently when the test data is not on disk.
//! Filter with `KILN_FAMILY_FILTER=<substring>`.

use kiln_ir::ops::{AttrValue, Fact, OnnxNode, Op};
use kiln_ir::{DType, Shape, Tensor};
use prost::Message;
use std::path::Path;

#[allow(clippy::all, dead_code, missing_docs)]
mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

const DATA: &str = "/work/main/.data/node";

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

fn le<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunk size")))
        .collect()
}

fn tensor(t: &onnx::TensorProto) -> Tensor {
    let code = t.data_type.unwrap_or(0);
    let dtype = DType::from_onnx(code).unwrap_or_else(|| panic!("dtype {code}"));
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let raw = t.raw_data.clone().unwrap_or_default();
    let has_raw = t.raw_data.is_some();
    macro_rules! build {
        ($ty:ty, $n:literal, $conv:expr, $field:expr) => {{
            let v: Vec<$ty> = if has_raw {
                le::<$n, $ty>(&raw, $conv)
            } else {
                $field
            };
            Tensor::from_vec(&shape, v)
        }};
    }
    match dtype {
        DType::F32 => build!(f32, 4, f32::from_le_bytes, t.float_data.clone()),
        DType::F64 => build!(f64, 8, f64::from_le_bytes, t.double_data.clone()),
        DType::I64 => build!(i64, 8, i64::from_le_bytes, t.int64_data.clone()),
        DType::I32 => build!(i32, 4, i32::from_le_bytes, t.int32_data.clone()),
        DType::U64 => build!(u64, 8, u64::from_le_bytes, t.uint64_data.clone()),
        DType::U32 => build!(
            u32,
            4,
            u32::from_le_bytes,
            t.uint64_data.iter().map(|&x| x as u32).collect()
        ),
        DType::I16 => build!(
            i16,
            2,
            i16::from_le_bytes,
            t.int32_data.iter().map(|&x| x as i16).collect()
        ),
        DType::U16 => build!(
            u16,
            2,
            u16::from_le_bytes,
            t.int32_data.iter().map(|&x| x as u16).collect()
        ),
        DType::I8 => build!(
            i8,
            1,
            i8::from_le_bytes,
            t.int32_data.iter().map(|&x| x as i8).collect()
        ),
        DType::U8 => build!(
            u8,
            1,
            u8::from_le_bytes,
            t.int32_data.iter().map(|&x| x as u8).collect()
        ),
        DType::Bool => build!(
            bool,
            1,
            |b: [u8; 1]| b[0] != 0,
            t.int32_data.iter().map(|&x| x != 0).collect()
        ),
        DType::F16 => build!(
            half::f16,
            2,
            |b| half::f16::from_bits(u16::from_le_bytes(b)),
            t.int32_data
                .iter()
                .map(|&x| half::f16::from_bits(x as u16))
                .collect()
        ),
        DType::BF16 => build!(
            half::bf16,
            2,
            |b| half::bf16::from_bits(u16::from_le_bytes(b)),
            t.int32_data
                .iter()
                .map(|&x| half::bf16::from_bits(x as u16))
                .collect()
        ),
    }
}

fn attr(a: &onnx::AttributeProto) -> AttrValue {
    match a.r#type.unwrap_or(0) {
        1 => AttrValue::Float(a.f.unwrap_or(0.0)),
        2 => AttrValue::Int(a.i.unwrap_or(0)),
        3 => AttrValue::String(String::from_utf8_lossy(a.s.as_deref().unwrap_or(&[])).into()),
        4 => AttrValue::Tensor(tensor(a.t.as_ref().expect("tensor attr"))),
        6 => AttrValue::Floats(a.floats.clone()),
        7 => AttrValue::Ints(a.ints.clone()),
        t => panic!("attribute type {t}"),
    }
}

fn load_pb(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).expect("read pb");
    tensor(&onnx::TensorProto::decode(bytes.as_slice()).expect("decode tensor"))
}

/// Runs one test; Err describes the failure.
fn run(dir: &Path) -> Result<(), String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let model = onnx::ModelProto::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
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
    let Ok(rd) = std::fs::read_dir(DATA) else {
        eprintln!("no node test data at {DATA}; skipping");
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
        match run(&Path::new(DATA).join(name)) {
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
