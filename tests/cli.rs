//! End-to-end tests of the `kiln` command line on the zoo models.

use crate::common;
use common::{kiln, tmp};
use std::path::{Path, PathBuf};

fn zoo() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/zoo");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("model.onnx").exists())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    assert!(!v.is_empty(), "no zoo models under {}", dir.display());
    v
}

#[test]
fn inspect_every_zoo_model() {
    let tmp = tmp("cli");
    for m in zoo() {
        let model = m.join("model.onnx");
        let dot = tmp.join("g.dot");
        let (ok, out) = kiln(&[
            "inspect",
            model.to_str().unwrap(),
            "--dot",
            dot.to_str().unwrap(),
        ]);
        assert!(ok, "{}: {out}", m.display());
        assert!(
            out.contains("parameters:") && out.contains("opset"),
            "{out}"
        );
        let dot_text = std::fs::read_to_string(&dot).unwrap();
        assert!(dot_text.starts_with("digraph"), "{dot_text}");
    }
}

#[test]
fn eval_every_zoo_model_matches_reference() {
    let tmp = tmp("cli-eval");
    for m in zoo() {
        let model = m.join("model.onnx");
        let data = m.join("test_data_set_0");
        let out = tmp.join("out.npz");
        let (ok, text) = kiln(&[
            "eval",
            model.to_str().unwrap(),
            "--check",
            data.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(
            ok && text.contains("OK: matches the reference"),
            "{}: {text}",
            m.display()
        );
        assert!(out.exists());
        // random inputs work too
        let (ok, text) = kiln(&["eval", model.to_str().unwrap(), "--seed", "3"]);
        assert!(ok, "{}: {text}", m.display());
    }
}

#[test]
fn bad_input_is_a_clean_error() {
    let tmp = tmp("cli-bad");
    let bad = tmp.join("garbage.onnx");
    std::fs::write(&bad, b"\x08\x07\x12\xff\xff garbage").unwrap();
    let (ok, text) = kiln(&["inspect", bad.to_str().unwrap()]);
    assert!(
        !ok && text.contains("garbage.onnx") && !text.contains("panicked"),
        "{text}"
    );
    let (ok, text) = kiln(&["eval", "/nonexistent.onnx"]);
    assert!(!ok && text.contains("/nonexistent.onnx"), "{text}");
    let model = zoo()[0].join("model.onnx");
    let (ok, text) = kiln(&[
        "eval",
        model.to_str().unwrap(),
        "--input",
        "nosuchinput=x.npy",
    ]);
    assert!(!ok && text.contains("nosuchinput"), "{text}");
}

#[test]
fn plan_every_zoo_model_and_print_stages() {
    for m in zoo() {
        let model = m.join("model.onnx");
        let (ok, out) = kiln(&["plan", model.to_str().unwrap(), "--print-after=all"]);
        assert!(ok, "{}: {out}", m.display());
        for stage in [
            "import",
            "simplify",
            "specialize",
            "unroll",
            "decompose",
            "fold",
            "fusion",
            "memory",
        ] {
            assert!(
                out.contains(&format!("IR after {stage}")),
                "{}: no {stage} dump",
                m.display()
            );
        }
        assert!(out.contains("kernels") && out.contains("arena"), "{out}");
    }
    let model = zoo()[0].join("model.onnx");
    let (ok, out) = kiln(&["plan", model.to_str().unwrap(), "--print-after=nosuchstage"]);
    assert!(
        !ok && out.contains("nosuchstage") && out.contains("fusion"),
        "{out}"
    );
}

#[test]
fn compile_explains_rewrites_under_the_given_eqsat_limits() {
    let dir = tmp("eqsat-limits");
    let out = dir.join("m.kiln");
    let bert = zoo_model("bert");
    let compile = |extra: &[&str]| {
        let mut args = vec!["compile", bert.as_str(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        kiln(&args)
    };
    let (ok, text) = compile(&["--explain", "rewrites"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("eqsat: 8 iterations")
            && text.contains("rules applied")
            && text.contains("kept"),
        "{text}"
    );
    let (ok, text) = compile(&["--explain", "rewrites", "--eqsat-iters", "1"]);
    assert!(
        ok && text.contains("eqsat: 1 iterations (iteration limit)"),
        "{text}"
    );
    let (ok, text) = compile(&["--explain", "rewrites", "--eqsat-nodes", "60"]);
    assert!(ok && text.contains("(e-node limit, at "), "{text}");
    let (ok, text) = compile(&["--explain", "rewrites", "--extractor", "greedy"]);
    assert!(
        ok && text.contains("kept greedy") || text.contains("kept input"),
        "{text}"
    );
    // the cost model follows the target's vector width
    assert!(text.contains("analytical(cpu:"), "{text}");
    let (ok, text) = compile(&["--explain", "rewrites", "--target", "cpu:x86-64-v4"]);
    assert!(ok && text.contains("analytical(cpu-avx512:"), "{text}");
    // the plan command takes the same limits
    let (ok, text) = kiln(&[
        "plan",
        bert.as_str(),
        "--print-after=eqsat",
        "--eqsat-iters",
        "1",
    ]);
    assert!(ok && text.contains("(iteration limit)"), "{text}");
    // errors name the flag, and write nothing
    std::fs::remove_file(&out).unwrap();
    let (ok, text) = compile(&["--extractor", "best"]);
    assert!(
        !ok && text.contains("--extractor") && text.contains("greedy, dag or ilp"),
        "{text}"
    );
    let (ok, text) = compile(&["-O0", "--eqsat-nodes", "100"]);
    assert!(!ok && text.contains("-O0"), "{text}");
    let (ok, text) = compile(&["--eqsat-time=-1"]);
    assert!(!ok && text.contains("--eqsat-time"), "{text}");
    assert!(!out.exists(), "a failed compile leaves no artifact");
}

fn zoo_model(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/zoo")
        .join(name)
        .join("model.onnx")
        .to_str()
        .unwrap()
        .to_string()
}
