//! End-to-end test of `kiln bench` (Kiln vs onnxruntime) on the smallest zoo model.

use crate::common;
use common::{kiln, tmp};
use std::path::Path;

#[test]
fn bench_mlp_prints_table_ratio_roofline_memory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("tests/zoo/mlp/model.onnx");
    let json = tmp("bench").join("bench.json");
    let (ok, out) = kiln(&[
        "bench",
        model.to_str().unwrap(),
        "--runs",
        "50",
        "--threads",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    for col in ["p50 ms", "p90 ms", "p99 ms", "min ms", "mean ms"] {
        assert!(out.contains(col), "no column '{col}':\n{out}");
    }
    assert!(out.contains("\nkiln "), "{out}");
    assert!(
        out.contains("roofline:") && out.contains("GFLOP/s"),
        "{out}"
    );
    assert!(out.contains("memory (peak RSS growth"), "{out}");
    assert!(
        out.contains("test_data_set_0"),
        "inputs from the test data:\n{out}"
    );
    let j = std::fs::read_to_string(&json).unwrap();
    if root.join(".venv/bin/python").exists() {
        // onnxruntime ran: its row, the ratio, agreement with Kiln
        assert!(
            out.contains("onnxruntime ") && out.contains("kiln/ort"),
            "{out}"
        );
        let ratio = out
            .lines()
            .find(|l| l.starts_with("kiln/ort"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|r| r.trim_end_matches('x').parse::<f64>().ok());
        assert!(ratio.is_some_and(|r| r > 0.0), "no p50 ratio:\n{out}");
        assert!(j.contains("\"ratio_p50\""), "{j}");
    } else {
        eprintln!("no .venv: onnxruntime part skipped");
    }
}

#[test]
fn bench_errors_are_clear() {
    let (ok, out) = kiln(&["bench", "no/such/model.onnx"]);
    assert!(!ok && out.contains("no such model file"), "{out}");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/zoo/mlp/model.onnx");
    let (ok, out) = kiln(&["bench", model.to_str().unwrap(), "--threads", "0"]);
    assert!(!ok && out.contains("--threads"), "{out}");
    // a python without onnxruntime: Kiln-only output with a note, not a failure
    let m = model.to_str().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", m, "--runs", "5", "--warmup", "1"])
        .env("KILN_PYTHON", "/nonexistent/python")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("onnxruntime unavailable"), "{text}");
    assert!(!text.contains("kiln/ort"), "{text}");
}
