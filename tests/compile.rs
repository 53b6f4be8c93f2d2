//! End-to-end tests of `kiln compile` and `kiln run`: compile a zoo model to an artifact, run
//! it with the runtime and check it against the model's reference outputs.

use crate::common;
use common::{kiln, tmp};
use std::path::{Path, PathBuf};

fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/zoo")
        .join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn mlp_compiles_runs_and_matches_reference() {
    let dir = tmp("mlp");
    let art = dir.join("mlp.kiln");
    let model = zoo("mlp").join("model.onnx");
    // test_data_set_0 holds input 'input' of shape 2x32
    let (ok, text) = kiln(&[
        "compile",
        s(&model),
        "--target",
        "cpu:x86-64-v3",
        "--shape",
        "input=2x32",
        "-o",
        s(&art),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("3 compiled") && text.contains("llvm+link") && text.contains("wrote"),
        "{text}"
    );
    let out = dir.join("out.npz");
    let (ok, text) = kiln(&[
        "run",
        s(&art),
        "--check",
        s(&zoo("mlp").join("test_data_set_0")),
        "-o",
        s(&out),
        "--repeat",
        "3",
    ]);
    assert!(ok && text.contains("OK: matches the reference"), "{text}");
    assert!(text.contains("mean latency over 3 runs"), "{text}");
    assert!(out.exists());
    // random inputs
    let (ok, text) = kiln(&["run", s(&art), "--seed", "1"]);
    assert!(ok && text.contains("output: f32[2, 10]"), "{text}");
    // an input of the wrong shape is refused by the runtime
    let (ok, text) = kiln(&[
        "run",
        s(&art),
        "--check",
        s(&zoo("mlp").join("test_data_set_0")),
        "--input",
        &format!(
            "input={}",
            s(&zoo("mlp").join("test_data_set_0/output_0.pb"))
        ),
    ]);
    assert!(!ok && text.contains("input"), "{text}");
}

#[test]
fn corrupted_artifact_is_a_clean_error() {
    let dir = tmp("corrupt");
    let art = dir.join("mlp.kiln");
    let (ok, text) = kiln(&[
        "compile",
        s(&zoo("mlp").join("model.onnx")),
        "--shape",
        "input=2x32",
        "-o",
        s(&art),
    ]);
    assert!(ok, "{text}");
    let mut bytes = std::fs::read(&art).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let bad = dir.join("bad.kiln");
    std::fs::write(&bad, &bytes).unwrap();
    let (ok, text) = kiln(&["run", s(&bad)]);
    assert!(
        !ok && text.contains("bad.kiln") && text.contains("corrupt") && !text.contains("panicked"),
        "{text}"
    );
    let (ok, text) = kiln(&["run", s(&dir.join("missing.kiln"))]);
    assert!(!ok && text.contains("missing.kiln"), "{text}");
}

#[test]
fn kernels_without_codegen_run_on_the_reference_interpreter() {
    // ArgMax has no code generator yet (the ONNX node tests are written by scripts/setup.sh).
    let case =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".data/node/test_argmax_default_axis_example");
    let dir = tmp("argmax");
    let art = dir.join("argmax.kiln");
    let model = case.join("model.onnx");
    // With --no-reference-kernels, the compile fails and lists the kernel.
    let (ok, text) = kiln(&[
        "compile",
        s(&model),
        "--no-reference-kernels",
        "-o",
        s(&art),
    ]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("cannot be compiled yet") && text.contains("ArgMax"),
        "{text}"
    );
    assert!(!art.exists());
    // By default it becomes a reference step, reported, and the artifact is correct.
    let (ok, text) = kiln(&["compile", s(&model), "-o", s(&art)]);
    assert!(
        ok && text.contains("reference interpreter") && text.contains("ArgMax"),
        "{text}"
    );
    let (ok, text) = kiln(&["run", s(&art), "--check", s(&case.join("test_data_set_0"))]);
    assert!(ok && text.contains("OK: matches the reference"), "{text}");
    let (ok, text) = kiln(&[
        "compile",
        s(&zoo("mlp").join("model.onnx")),
        "--target",
        "gpu",
    ]);
    assert!(!ok && text.contains("--target 'gpu'"), "{text}");
}

/// Compiles a zoo model with the given `--shape` flags and checks the artifact against the
/// model's first test data set.
fn compile_and_check(name: &str, shapes: &[&str]) {
    compile_and_check_for(name, shapes, "cpu");
}

/// [`compile_and_check`] for `--target target`.
fn compile_and_check_for(name: &str, shapes: &[&str], target: &str) {
    let dir = tmp(name);
    let art = dir.join(format!("{name}.kiln"));
    let model = zoo(name).join("model.onnx");
    let mut args = vec!["compile", s(&model), "--target", target, "-o", s(&art)];
    for sh in shapes {
        args.extend(["--shape", sh]);
    }
    let (ok, text) = kiln(&args);
    assert!(ok, "{name}: {text}");
    let data = zoo(name).join("test_data_set_0");
    // One thread, and split steps over 2 and 3 threads (the first runs use the pool; conv
    // tasks are bands of rows × channel blocks that chunks cut anywhere).
    for threads in ["1", "2", "3"] {
        let (ok, text) = kiln(&["run", s(&art), "--check", s(&data), "--threads", threads]);
        assert!(
            ok && text.contains("OK: matches the reference"),
            "{name} at {threads} threads: {text}"
        );
    }
}

#[test]
fn transformer_zoo_models_compile_and_match_reference() {
    compile_and_check("bert", &["input_ids=1x16", "attention_mask=1x16"]);
    compile_and_check("gpt", &["input_ids=2x16"]);
}

/// On an AVX-512 machine, models compiled for `cpu:x86-64-v4` (16-lane MatMul tiles, 32
/// registers) match the reference; elsewhere the artifact could not run, and the test says
/// so and checks nothing.
#[test]
fn avx512_target_matches_reference() {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        println!("SKIPPED: no AVX-512 on this machine");
        return;
    }
    compile_and_check_for("mlp", &["input=2x32"], "cpu:x86-64-v4");
    compile_and_check_for(
        "bert",
        &["input_ids=1x16", "attention_mask=1x16"],
        "cpu:x86-64-v4",
    );
    compile_and_check_for("gpt", &["input_ids=2x16"], "cpu:native");
}

#[test]
fn cnn_zoo_models_compile_and_match_reference() {
    compile_and_check("resnet", &[]);
    compile_and_check("mobilenet", &[]);
}

#[test]
fn max_batch_artifact_accepts_every_batch_up_to_the_bound() {
    // gpt's input_ids is [batch, seq]: seq fixed to 16, batch 1..=2 from one artifact.
    let dir = tmp("maxbatch");
    let art = dir.join("gpt.kiln");
    let model = zoo("gpt").join("model.onnx");
    let (ok, text) = kiln(&[
        "compile",
        s(&model),
        "--shape",
        "input_ids=1x16",
        "--max-batch",
        "2",
        "-o",
        s(&art),
    ]);
    assert!(ok && text.contains("shape variants: 2"), "{text}");
    // batch 2 (the test data) matches the reference ...
    let data = zoo("gpt").join("test_data_set_0");
    let (ok, text) = kiln(&["run", s(&art), "--check", s(&data), "--threads", "2"]);
    assert!(ok && text.contains("OK: matches the reference"), "{text}");
    // ... and batch 1 runs too (random inputs follow the first variant).
    let (ok, text) = kiln(&["run", s(&art), "--seed", "3"]);
    assert!(ok && text.contains("f32[1, 16,"), "{text}");
    // A batch above the bound is refused with the accepted shapes.
    let art1 = dir.join("mlp1.kiln");
    let (ok, text) = kiln(&[
        "compile",
        s(&zoo("mlp").join("model.onnx")),
        "--max-batch",
        "1",
        "-o",
        s(&art1),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = kiln(&[
        "run",
        s(&art1),
        "--check",
        s(&zoo("mlp").join("test_data_set_0")),
    ]);
    assert!(
        !ok && text.contains("axis 0 is 2") && !text.contains("panicked"),
        "{text}"
    );
    // A model without a symbolic batch dim says so.
    let (ok, text) = kiln(&[
        "compile",
        s(&zoo("resnet").join("model.onnx")),
        "--max-batch",
        "2",
        "-o",
        s(&dir.join("r.kiln")),
    ]);
    assert!(
        !ok && text.contains("no graph input has a symbolic first"),
        "{text}"
    );
}

#[test]
fn run_accepts_an_onnx_model_directly() {
    // Compiled in-process with the --check inputs' shapes (bert's dims are symbolic).
    let (ok, text) = kiln(&[
        "run",
        s(&zoo("bert").join("model.onnx")),
        "--check",
        s(&zoo("bert").join("test_data_set_0")),
        "--threads",
        "1",
    ]);
    assert!(
        ok && text.contains("compiled") && text.contains("OK: matches the reference"),
        "{text}"
    );
    let (ok, text) = kiln(&[
        "run",
        s(&zoo("mlp").join("model.onnx")),
        "--shape",
        "input=3x32",
    ]);
    assert!(ok && text.contains("f32[3, 10]"), "{text}");
}

#[test]
fn data_dependent_shapes_compile_to_a_dynamic_tail() {
    // NonZero's output shape depends on its input's values; Reshape's on its shape input.
    for name in ["test_nonzero_example", "test_reshape_reduced_dims"] {
        let case = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".data/node")
            .join(name);
        let dir = tmp(name);
        let art = dir.join("m.kiln");
        let model = case.join("model.onnx");
        let (ok, text) = kiln(&[
            "compile",
            s(&model),
            "--no-reference-kernels",
            "-o",
            s(&art),
        ]);
        assert!(
            !ok && text.contains("dynamic tail") && text.contains("--no-reference-kernels"),
            "{text}"
        );
        let (ok, text) = kiln(&["compile", s(&model), "-o", s(&art)]);
        assert!(
            ok && text.contains("a dynamic tail runs on the reference interpreter"),
            "{text}"
        );
        let (ok, text) = kiln(&["run", s(&art), "--check", s(&case.join("test_data_set_0"))]);
        assert!(
            ok && text.contains("OK: matches the reference"),
            "{name}: {text}"
        );
    }
}
