//! The ONNX backend node tests whose graphs only use elementwise ops, run node by node: each
//! node's evaluated outputs must agree with the facts inferred at import (dtype, rank, known
//! dims), and the graph outputs must match the expected data (rtol 1e-3, atol 1e-7).
//!
//! Data: `$KILN_NODE_TESTS` or `<repo>/.data/node`; skipped when absent.
//! `KILN_ELEMENTWISE_FILTER=substr` runs a subset; `KILN_ELEMENTWISE_VERBOSE=1` lists skips.

use kiln_ir::onnx::{load, load_tensor_pb};
use kiln_ir::{Op, Tensor};
use std::path::{Path, PathBuf};

enum Outcome {
    Pass,
    Skip(String),
    Fail(String),
}

fn load_set(dir: &Path, prefix: &str) -> Result<Vec<Tensor>, String> {
    (0..)
        .map(|k| dir.join(format!("{prefix}_{k}.pb")))
        .take_while(|p| p.exists())
        .map(|p| {
            load_tensor_pb(&p)
                .map(|(_, t)| t)
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn run_case(dir: &Path) -> Outcome {
    let g = match load(dir.join("model.onnx")) {
        Ok(g) => g,
        Err(e) => return Outcome::Skip(format!("import: {e}")),
    };
    if let Some(n) = g.nodes.iter().find(|n| !matches!(n.op, Op::Elementwise(_))) {
        return Outcome::Skip(format!("op {}", n.op.op_type()));
    }
    let data = dir.join("test_data_set_0");
    let (inputs, expected) = match (load_set(&data, "input"), load_set(&data, "output")) {
        (Ok(i), Ok(o)) if !o.is_empty() => (i, o),
        _ => return Outcome::Skip("no usable test data".into()),
    };
    let mut vals: Vec<Option<Tensor>> = g
        .values
        .iter()
        .map(|v| v.fact.value.as_deref().cloned())
        .collect();
    for (&id, t) in g.inputs.iter().zip(inputs) {
        vals[id] = Some(t);
    }
    for n in &g.nodes {
        let args: Vec<Option<&Tensor>> = n
            .inputs
            .iter()
            .map(|i| i.and_then(|i| vals[i].as_ref()))
            .collect();
        let outs = match n.op.eval(&args) {
            Ok(o) => o,
            Err(e) => return Outcome::Fail(format!("{}: eval: {e}", n.op.op_type())),
        };
        for (&o, t) in n.outputs.iter().zip(outs) {
            let f = &g.values[o].fact;
            let dims_ok = f.shape.rank() == t.rank()
                && f.shape
                    .dims()
                    .iter()
                    .zip(t.shape())
                    .all(|(d, &s)| d.known().is_none_or(|k| k == s));
            if f.dtype != t.dtype() || !dims_ok {
                return Outcome::Fail(format!(
                    "{}: inferred {} {} but eval gave {} {:?}",
                    n.op.op_type(),
                    f.dtype,
                    f.shape,
                    t.dtype(),
                    t.shape()
                ));
            }
            vals[o] = Some(t);
        }
    }
    for (k, (&o, e)) in g.outputs.iter().zip(&expected).enumerate() {
        let Some(got) = &vals[o] else {
            return Outcome::Fail(format!("output {k} not computed"));
        };
        if let Err(m) = got.check_close(e, 1e-3, 1e-7) {
            return Outcome::Fail(format!("output {k}: {m}"));
        }
    }
    Outcome::Pass
}

#[test]
fn elementwise_node_tests() {
    let root = std::env::var_os("KILN_NODE_TESTS")
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
