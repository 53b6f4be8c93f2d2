//! The ONNX backend node tests through the whole compiler: every node test that the reference
//! interpreter passes is compiled (in-process, `kiln::compile`) to an artifact, loaded with the
//! runtime and run on the test's inputs, and its outputs are compared with the expected ones.
//!
//! Outcomes: `pass` (every kernel compiled to code); `pass (reference steps)` (some kernels
//! have no code generator yet and ran as reference steps on the runtime's interpreter, or
//! shapes depend on input values and a dynamic tail ran on it);
//! `fail` (the runtime refused the inputs or the outputs differ: a wrong answer, never
//! acceptable); `not compiled` (the compiler refused the model with a clear error, e.g. an
//! output shape that depends on input values).
//!
//! Data: `$KILN_NODE_TESTS` or `<repo>/.data/node` (written by `scripts/setup.sh`).
//! `KILN_CONFORMANCE_FILTER=substr` runs only matching tests and prints each result. A full
//! run writes `docs/conformance_artifact.md` and fails if any test fails or fewer tests pass
//! than recorded in `tests/conformance_artifact_baseline.txt` (`KILN_UPDATE_BASELINE=1`
//! records the new count).

use kiln::compile::{compile_with, CompileOptions};
use kiln::ir::onnx::tensor_proto::{from_raw, to_raw};
use kiln::ir::{interp, Tensor};
use kiln::runtime::{AlignedBuf, Model, TensorView};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// The interpreter does not pass this test: not required here.
    Skipped,
    /// Passes with every kernel compiled to code.
    Pass,
    /// Passes, some kernels running as reference steps (no code generator yet).
    PassReference,
    Fail,
    NotCompiled,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn data_dir() -> PathBuf {
    std::env::var_os("KILN_NODE_TESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".data/node"))
}

fn load_set(dir: &Path, prefix: &str) -> Result<Vec<Tensor>, String> {
    let mut v = Vec::new();
    for k in 0.. {
        let p = dir.join(format!("{prefix}_{k}.pb"));
        if !p.exists() {
            break;
        }
        v.push(kiln::io::read_tensor(&p).map_err(|e| e.to_string())?);
    }
    Ok(v)
}

/// Runs the compiled model on `inputs`.
pub(crate) fn run_artifact(model: &mut Model, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let bufs: Vec<(kiln::runtime::DType, AlignedBuf)> = inputs
        .iter()
        .map(|t| {
            let dt = t.dtype();
            Ok((dt, AlignedBuf::from_bytes(&to_raw(t))))
        })
        .collect::<Result<_, String>>()?;
    let views: Vec<TensorView> = inputs
        .iter()
        .zip(&bufs)
        .map(|(t, (dt, b))| TensorView::new(*dt, t.shape(), b.as_slice()))
        .collect();
    let outs = model.run(&views).map_err(|e| format!("run: {e}"))?;
    outs.iter()
        .map(|t| from_raw(t.dtype, &t.shape, t.data.as_slice()).map_err(|e| e.to_string()))
        .collect()
}

fn run_case(dir: &Path, scratch: &Path) -> (Outcome, String) {
    let model_path = dir.join("model.onnx");
    let Ok(g) = kiln::ir::onnx::load(&model_path) else {
        return (Outcome::Skipped, String::new());
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
    let mut cases = Vec::new();
    for set in &sets {
        let (Ok(inputs), Ok(expected)) = (load_set(set, "input"), load_set(set, "output")) else {
            return (Outcome::Skipped, String::new());
        };
        // Required only where the interpreter passes.
        match interp::run(&g, &inputs) {
            Ok(outs)
                if outs.len() >= expected.len()
                    && outs
                        .iter()
                        .zip(&expected)
                        .all(|(o, e)| o.check_close(e, 1e-3, 1e-7).is_ok()) => {}
            _ => return (Outcome::Skipped, String::new()),
        }
        if inputs.len() != g.inputs.len() {
            return (Outcome::Skipped, String::new());
        }
        cases.push((inputs, expected));
    }
    if cases.is_empty() {
        return (Outcome::Skipped, String::new());
    }
    let mut outcome = Outcome::Pass;
    for (inputs, expected) in cases {
        let mut opts = CompileOptions::default();
        for (&v, t) in g.inputs.iter().zip(&inputs) {
            opts.shapes
                .insert(g.values[v].name.clone(), t.shape().to_vec());
        }
        let artifact = match compile_with(&model_path, &opts, |_, _| {}) {
            Ok((a, _)) => a,
            Err(e) => {
                let msg = format!("{e:#}");
                return (Outcome::NotCompiled, reason_of(&msg));
            }
        };
        // Through the file format too: save, load.
        let path = scratch.join("case.kiln");
        if let Err(e) = artifact.save(&path) {
            return (Outcome::Fail, format!("save: {e}"));
        }
        let mut model = match Model::load(&path) {
            Ok(m) => m,
            Err(e) => return (Outcome::Fail, format!("load: {e}")),
        };
        let plan = model.plan();
        if plan.steps.iter().any(|s| s.reference.is_some()) || plan.tail.is_some() {
            outcome = Outcome::PassReference;
        }
        let outs = match run_artifact(&mut model, &inputs) {
            Ok(o) => o,
            Err(e) => return (Outcome::Fail, e),
        };
        for (k, (o, e)) in outs.iter().zip(&expected).enumerate() {
            if let Err(m) = o.check_close(e, 1e-3, 1e-6) {
                return (Outcome::Fail, format!("output {k}: {m}"));
            }
        }
    }
    (outcome, String::new())
}

/// A short, groupable reason from a compile error: the last line without kernel names.
fn reason_of(msg: &str) -> String {
    if msg.contains("depends on the values of inputs") || msg.contains("specialise symbolic dims") {
        return "a shape depends on input values (data-dependent shape; static compile only)"
            .into();
    }
    let line = msg
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(msg)
        .trim();
    // "  k0 (Opaque: TopK): Opaque kernels are not lowered yet" -> "Opaque: TopK: ..."
    match line.split_once(" (") {
        Some((_, rest)) => rest.replacen("):", ":", 1),
        None => line.to_string(),
    }
}

fn op_of(dir: &Path) -> String {
    let Ok(g) = kiln::ir::onnx::load(dir.join("model.onnx")) else {
        return "?".into();
    };
    let mut ops: Vec<&str> = g.nodes.iter().map(|n| n.op.op_type()).collect();
    ops.dedup();
    ops.first().copied().unwrap_or("(none)").to_string()
}

#[test]
fn node_tests_through_the_artifact_path() {
    let dir = data_dir();
    assert!(
        dir.join("COMPLETE").exists(),
        "ONNX node tests not found at {} — run scripts/setup.sh first (or set KILN_NODE_TESTS)",
        dir.display()
    );
    let filter = std::env::var("KILN_CONFORMANCE_FILTER").ok();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| filter.as_deref().is_none_or(|f| n.contains(f)))
        .collect();
    names.sort();
    let scratch = std::env::temp_dir().join(format!("kiln-conf-art-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let t0 = std::time::Instant::now();
    let mut results = Vec::new();
    for name in &names {
        let d = dir.join(name);
        let (outcome, reason) =
            std::panic::catch_unwind(AssertUnwindSafe(|| run_case(&d, &scratch)))
                .unwrap_or_else(|_| (Outcome::Fail, "panicked".into()));
        if filter.is_some() && outcome != Outcome::Skipped {
            println!("{name}: {outcome:?} {reason}");
        }
        results.push((name.clone(), op_of(&d), outcome, reason));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let count = |o: Outcome| results.iter().filter(|r| r.2 == o).count();
    let (native, pass_ref, fail, nc) = (
        count(Outcome::Pass),
        count(Outcome::PassReference),
        count(Outcome::Fail),
        count(Outcome::NotCompiled),
    );
    let pass = native + pass_ref;
    let required = pass + fail + nc;
    println!(
        "artifact path: {pass} / {required} interpreter-passing node tests pass ({native} fully \
         compiled, {pass_ref} with reference steps), {fail} fail, {nc} not compiled ({:.0} s)",
        t0.elapsed().as_secs_f64()
    );
    let failures: Vec<String> = results
        .iter()
        .filter(|r| r.2 == Outcome::Fail)
        .map(|r| format!("{}: {}", r.0, r.3))
        .collect();
    if filter.is_some() {
        assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
        return;
    }
    write_report(&results, [native, pass_ref, fail, nc]);
    let baseline_path = repo().join("tests/conformance_artifact_baseline.txt");
    if std::env::var_os("KILN_UPDATE_BASELINE").is_some() {
        std::fs::write(&baseline_path, format!("{pass} {native}\n")).unwrap();
    }
    let baseline: Vec<usize> = std::fs::read_to_string(&baseline_path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let (baseline, baseline_native) = (
        baseline.first().copied().unwrap_or(0),
        baseline.get(1).copied().unwrap_or(0),
    );
    assert!(
        native >= baseline_native,
        "artifact path: {native} node tests pass fully compiled, fewer than the baseline \
         {baseline_native}"
    );
    assert!(
        failures.is_empty(),
        "compiled models gave wrong answers:\n{}",
        failures.join("\n")
    );
    assert!(
        pass >= baseline,
        "artifact path: {pass} node tests pass, fewer than the baseline {baseline}"
    );
}

fn write_report(results: &[(String, String, Outcome, String)], counts: [usize; 4]) {
    let [native, pass_ref, fail, nc] = counts;
    let pass = native + pass_ref;
    let mut per_op: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    let mut ref_ops: BTreeMap<&str, usize> = BTreeMap::new();
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, op, o, reason) in results {
        let e = per_op.entry(op).or_default();
        match o {
            Outcome::Pass => e[0] += 1,
            Outcome::PassReference => {
                e[1] += 1;
                *ref_ops.entry(op).or_default() += 1;
            }
            Outcome::Fail => e[2] += 1,
            Outcome::NotCompiled => {
                e[3] += 1;
                *reasons.entry(reason).or_default() += 1;
            }
            Outcome::Skipped => {}
        }
    }
    let required = pass + fail + nc;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Conformance through the artifact path\n\n_Written by `tests/conformance_artifact.rs` \
         (`cargo test --release -p kiln --test e2e conformance_artifact::`)._\n\nEvery ONNX node test \
         that the reference interpreter passes (see [conformance.md](conformance.md)) is \
         compiled with `kiln::compile`, saved as an artifact, loaded by the runtime and run; \
         outputs are compared with the test's expected outputs (rtol 1e-3, atol 1e-6).\n\n\
         **{pass} / {required} pass** through the artifact path: **{native}** with every \
         kernel compiled to code, {pass_ref} with some kernels as *reference steps* (no code \
         generator for that op or dtype yet: the runtime evaluates them with the reference \
         interpreter, see `runtime/src/reference.rs`) or a *dynamic tail* (shapes that depend \
         on input values: those nodes run on the interpreter at run-time shapes); {fail} give \
         a wrong answer; {nc} are \
         refused by the compiler with a clear error (listed below by reason).\n"
    );
    let _ = writeln!(md, "## Per op (first op of the test model)\n");
    let _ = writeln!(
        md,
        "| op | pass (compiled) | pass (reference steps) | fail | not compiled |\n|---|---|---|---|---|"
    );
    for (op, [p, r, f, n]) in &per_op {
        if p + r + f + n > 0 {
            let _ = writeln!(md, "| {op} | {p} | {r} | {f} | {n} |");
        }
    }
    let _ = writeln!(md, "\n## Ops that still need reference steps (tests)\n");
    let mut ro: Vec<_> = ref_ops.into_iter().collect();
    ro.sort_by_key(|r| std::cmp::Reverse(r.1));
    let list: Vec<String> = ro.iter().map(|(op, n)| format!("{op} ({n})")).collect();
    let _ = writeln!(md, "{}", list.join(", "));
    let _ = writeln!(md, "\n## Why tests are not compiled\n");
    let _ = writeln!(md, "| reason | tests |\n|---|---|");
    let mut rs: Vec<_> = reasons.into_iter().collect();
    rs.sort_by_key(|r| std::cmp::Reverse(r.1));
    for (r, n) in rs {
        let _ = writeln!(md, "| {} | {n} |", r.replace('|', "\\|"));
    }
    let fails: Vec<_> = results.iter().filter(|r| r.2 == Outcome::Fail).collect();
    if !fails.is_empty() {
        let _ = writeln!(md, "\n## Failures\n");
        for (name, _, _, reason) in fails {
            let _ = writeln!(md, "- `{name}`: {reason}");
        }
    }
    kiln::io::write_atomic(&repo().join("docs/conformance_artifact.md"), md.as_bytes()).unwrap();
}
