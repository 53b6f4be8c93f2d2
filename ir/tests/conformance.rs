//! The ONNX backend node tests as Kiln's conformance suite: every test model goes through
//! import → verify → reference interpreter and is compared with the expected outputs.
//!
//! Data: `$KILN_NODE_TESTS` or `<repo>/.data/node` (written by `scripts/setup.sh`).
//! `KILN_CONFORMANCE_FILTER=substr` runs only matching tests and prints each result.
//! A full run writes `docs/conformance.md` and fails if fewer tests pass than recorded in
//! `ir/tests/conformance_baseline.txt` (`KILN_UPDATE_BASELINE=1` records the new counts).

use kiln_ir::onnx::{load, load_tensor_pb, proto};
use kiln_ir::{interp, IrError, Tensor};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

/// The ops the Foundation issue requires (plus Constant, which import folds away).
const REQUIRED_OPS: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "Neg",
    "Abs",
    "Reciprocal",
    "Erf",
    "Tanh",
    "Sigmoid",
    "Relu",
    "LeakyRelu",
    "Elu",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Clip",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Where",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Not",
    "And",
    "Or",
    "Cast",
    "MatMul",
    "Gemm",
    "Conv",
    "ConvTranspose",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Softmax",
    "LogSoftmax",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "GatherElements",
    "Expand",
    "Tile",
    "Pad",
    "Shape",
    "Size",
    "ConstantOfShape",
    "Constant",
    "Range",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL2",
    "ArgMax",
    "ArgMin",
    "Identity",
    "Dropout",
    "Resize",
    "Einsum",
    "Trilu",
    "CumSum",
    "TopK",
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Outcome {
    Pass,
    Fail,
    Unsupported,
}

struct CaseResult {
    name: String,
    ops: BTreeSet<String>,
    outcome: Outcome,
    reason: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn data_dir() -> PathBuf {
    std::env::var_os("KILN_NODE_TESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".data/node"))
}

/// Op types used by a model (read straight from the protobuf, even if import fails).
fn model_ops(path: &Path) -> BTreeSet<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return BTreeSet::new();
    };
    let Ok(m) = proto::ModelProto::decode(bytes.as_slice()) else {
        return BTreeSet::new();
    };
    m.graph
        .iter()
        .flat_map(|g| g.node.iter())
        .map(|n| {
            if matches!(n.domain(), "" | "ai.onnx") {
                n.op_type().to_string()
            } else {
                format!("{}::{}", n.domain(), n.op_type())
            }
        })
        .collect()
}

fn load_set(dir: &Path, prefix: &str) -> Result<Vec<Tensor>, String> {
    let mut v = Vec::new();
    for k in 0.. {
        let p = dir.join(format!("{prefix}_{k}.pb"));
        if !p.exists() {
            break;
        }
        v.push(load_tensor_pb(&p).map_err(|e| e.to_string())?.1);
    }
    Ok(v)
}

fn run_case(dir: &Path) -> (Outcome, String) {
    let g = match load(dir.join("model.onnx")) {
        Ok(g) => g,
        Err(e @ IrError::Unsupported { .. }) => return (Outcome::Unsupported, e.to_string()),
        Err(e) => {
            let msg = e.to_string();
            let unsupported = msg.contains("not supported");
            return (
                if unsupported {
                    Outcome::Unsupported
                } else {
                    Outcome::Fail
                },
                format!("import: {msg}"),
            );
        }
    };
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    sets.sort();
    if sets.is_empty() {
        return (Outcome::Fail, "no test data sets".into());
    }
    for set in sets {
        let inputs = match load_set(&set, "input") {
            Ok(v) => v,
            Err(e) => return (Outcome::Unsupported, format!("test data: {e}")),
        };
        let expected = match load_set(&set, "output") {
            Ok(v) => v,
            Err(e) => return (Outcome::Unsupported, format!("test data: {e}")),
        };
        let outs = match interp::run(&g, &inputs) {
            Ok(o) => o,
            Err(e) => return (Outcome::Fail, format!("run: {e}")),
        };
        if outs.len() < expected.len() {
            return (
                Outcome::Fail,
                format!("{} outputs, expected {}", outs.len(), expected.len()),
            );
        }
        for (k, (o, e)) in outs.iter().zip(&expected).enumerate() {
            if let Err(m) = o.check_close(e, 1e-3, 1e-7) {
                return (Outcome::Fail, format!("output {k}: {m}"));
            }
        }
    }
    (Outcome::Pass, String::new())
}

fn run_all(filter: Option<&str>) -> Vec<CaseResult> {
    let dir = data_dir();
    assert!(
        dir.join("COMPLETE").exists(),
        "ONNX node tests not found at {} — run scripts/setup.sh first (or set KILN_NODE_TESTS)",
        dir.display()
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("read node test dir")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| filter.is_none_or(|f| n.contains(f)))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let d = dir.join(&name);
            let ops = model_ops(&d.join("model.onnx"));
            let (outcome, reason) = std::panic::catch_unwind(AssertUnwindSafe(|| run_case(&d)))
                .unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    (Outcome::Fail, format!("PANIC: {msg}"))
                });
            CaseResult {
                name,
                ops,
                outcome,
                reason,
            }
        })
        .collect()
}

fn in_list(r: &CaseResult) -> bool {
    !r.ops.is_empty() && r.ops.iter().all(|o| REQUIRED_OPS.contains(&o.as_str()))
}

fn count(rs: &[&CaseResult], o: Outcome) -> usize {
    rs.iter().filter(|r| r.outcome == o).count()
}

fn report(results: &[CaseResult]) -> String {
    let all: Vec<&CaseResult> = results.iter().collect();
    let listed: Vec<&CaseResult> = results.iter().filter(|r| in_list(r)).collect();
    let (lp, tp) = (count(&listed, Outcome::Pass), count(&all, Outcome::Pass));
    let mut s = String::new();
    let _ = writeln!(s, "# ONNX conformance (backend node tests)\n");
    let _ = writeln!(s, "Generated by `cargo test -p kiln-ir --test conformance` (reference interpreter: import → verify → run → compare, rtol 1e-3, atol 1e-7). Do not edit by hand.\n");
    let _ = writeln!(
        s,
        "- node tests whose ops are all in the Foundation list: **{lp} / {} passed ({:.1}%)**",
        listed.len(),
        100.0 * lp as f64 / listed.len().max(1) as f64
    );
    let _ = writeln!(
        s,
        "- all node tests: **{tp} / {} passed** ({} failed, {} unsupported)\n",
        all.len(),
        count(&all, Outcome::Fail),
        count(&all, Outcome::Unsupported)
    );
    // per-op table: a test counts for every op it uses
    let mut per_op: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    for r in &all {
        for op in &r.ops {
            per_op.entry(op.as_str()).or_default()[r.outcome as usize] += 1;
        }
    }
    let _ = writeln!(
        s,
        "## Per op\n\n| op | in list | pass | fail | unsupported |\n|---|---|---|---|---|"
    );
    for (op, [p, f, u]) in &per_op {
        let listed = if REQUIRED_OPS.contains(op) { "yes" } else { "" };
        let _ = writeln!(s, "| {op} | {listed} | {p} | {f} | {u} |");
    }
    let _ = writeln!(s, "\n## Failing tests (all ops in the list)\n");
    for r in listed.iter().filter(|r| r.outcome != Outcome::Pass) {
        let _ = writeln!(s, "- `{}`: {}", r.name, r.reason.replace('\n', " "));
    }
    let _ = writeln!(s, "\n## Other tests not passing (ops outside the list)\n");
    for r in all
        .iter()
        .filter(|r| !in_list(r) && r.outcome != Outcome::Pass)
    {
        let what = if r.outcome == Outcome::Fail {
            "fail"
        } else {
            "unsupported"
        };
        let _ = writeln!(
            s,
            "- `{}` ({what}): {}",
            r.name,
            r.reason.replace('\n', " ")
        );
    }
    s
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

#[test]
fn onnx_node_conformance() {
    let filter = std::env::var("KILN_CONFORMANCE_FILTER").ok();
    let results = run_all(filter.as_deref());
    if filter.is_some() {
        for r in &results {
            println!("{:?} {} {:?} {}", r.outcome, r.name, r.ops, r.reason);
        }
        let refs: Vec<&CaseResult> = results.iter().collect();
        println!(
            "{} passed, {} failed, {} unsupported",
            count(&refs, Outcome::Pass),
            count(&refs, Outcome::Fail),
            count(&refs, Outcome::Unsupported)
        );
        return;
    }
    let md = report(&results);
    write_atomic(&repo_root().join("docs/conformance.md"), &md);
    let listed: Vec<&CaseResult> = results.iter().filter(|r| in_list(r)).collect();
    let all: Vec<&CaseResult> = results.iter().collect();
    let (lp, tp) = (count(&listed, Outcome::Pass), count(&all, Outcome::Pass));
    println!(
        "conformance: {lp}/{} in-list tests pass, {tp}/{} overall",
        listed.len(),
        all.len()
    );
    let baseline_path = repo_root().join("ir/tests/conformance_baseline.txt");
    if std::env::var_os("KILN_UPDATE_BASELINE").is_some() {
        write_atomic(&baseline_path, &format!("{lp} {tp}\n"));
        return;
    }
    let base = std::fs::read_to_string(&baseline_path).unwrap_or_default();
    let nums: Vec<usize> = base
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let (blp, btp) = (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
    );
    assert!(
        lp >= blp,
        "in-list conformance dropped: {lp} < recorded {blp} (see docs/conformance.md)"
    );
    assert!(
        tp >= btp,
        "overall conformance dropped: {tp} < recorded {btp} (see docs/conformance.md)"
    );
}
