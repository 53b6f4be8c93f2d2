//! The model zoo: small real-world-shaped models (`<repo>/tests/zoo/<name>/`, written by
//! `scripts/make_zoo.py`) run through import → reference interpreter and compared with the
//! onnxruntime outputs stored next to them.
//!
//! Each output must match within `1e-4 × max(1, max|expected|)` (absolute, scaled to the
//! output's magnitude) and must not be degenerate (all finite, not constant).
//! `KILN_ZOO_FILTER=substr` runs only the models whose name contains `substr`.

use kiln_ir::onnx::{load, load_tensor_pb};
use kiln_ir::{interp, Tensor};
use std::path::{Path, PathBuf};

/// Tolerance relative to the output's scale: `max|a - e| <= REL_TOL * max(1, max|e|)`.
const REL_TOL: f64 = 1e-4;

/// The zoo folder, `<repo>/tests/zoo`.
fn zoo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("zoo")
}

/// Reads `<dir>/<prefix>_0.pb`, `<prefix>_1.pb`, ... until one is missing.
fn read_pbs(dir: &Path, prefix: &str) -> Result<Vec<Tensor>, String> {
    let mut out = Vec::new();
    loop {
        let p = dir.join(format!("{prefix}_{}.pb", out.len()));
        if !p.exists() {
            return Ok(out);
        }
        out.push(load_tensor_pb(&p).map_err(|e| e.to_string())?.1);
    }
}

/// Checks `actual` against `expected` with an absolute tolerance scaled to the output:
/// `max|a - e| <= rel * max(1, max|e|)`. Also rejects degenerate expectations and results
/// (non-finite values, or a float output that is constant).
fn check_scaled(actual: &Tensor, expected: &Tensor, rel: f64) -> Result<String, String> {
    if actual.dtype() != expected.dtype() || actual.shape() != expected.shape() {
        return Err(format!(
            "got {} {:?}, expected {} {:?}",
            actual.dtype(),
            actual.shape(),
            expected.dtype(),
            expected.shape()
        ));
    }
    let a = actual.to_f64_vec();
    let e = expected.to_f64_vec();
    if e.is_empty() {
        return Err("expected output is empty".into());
    }
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        return Err(format!("element {i} is {} (expected {})", a[i], e[i]));
    }
    let scale = e.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let tol = rel * scale;
    let (worst, err) = a
        .iter()
        .zip(&e)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold(
            (0, 0.0f64),
            |(wi, w), (i, d)| if d > w { (i, d) } else { (wi, w) },
        );
    if err > tol {
        return Err(format!(
            "max abs error {err:.3e} > tolerance {tol:.3e} at element {worst} \
             (flat index into {:?}): got {}, expected {}",
            expected.shape(),
            a[worst],
            e[worst]
        ));
    }
    let mean = a.iter().sum::<f64>() / a.len() as f64;
    let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
    if expected.dtype().is_float() && std <= 1e-3 * scale {
        return Err(format!(
            "degenerate output: std {std:.3e} (max|expected| {scale:.3e})"
        ));
    }
    Ok(format!(
        "max abs error {err:.2e} (tol {tol:.2e}), std {std:.3}"
    ))
}

/// Runs one zoo model on each of its test data sets; returns a line per output, or the
/// first failure.
fn run_model(dir: &Path) -> Result<Vec<String>, String> {
    let g = load(dir.join("model.onnx")).map_err(|e| format!("import failed: {e}"))?;
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("test_data_set_"))
        })
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err("no test_data_set_* folder".into());
    }
    let mut lines = Vec::new();
    for set in sets {
        let set_name = set.file_name().unwrap().to_string_lossy().into_owned();
        let inputs = read_pbs(&set, "input")?;
        let expected = read_pbs(&set, "output")?;
        if expected.is_empty() {
            return Err(format!("{set_name}: no output_*.pb"));
        }
        let outs = interp::run(&g, &inputs).map_err(|e| format!("{set_name}: interpreter: {e}"))?;
        if outs.len() != expected.len() {
            return Err(format!(
                "{set_name}: {} outputs, expected {}",
                outs.len(),
                expected.len()
            ));
        }
        for (k, (a, e)) in outs.iter().zip(&expected).enumerate() {
            let name = &g.values[g.outputs[k]].name;
            let msg = check_scaled(a, e, REL_TOL)
                .map_err(|m| format!("{set_name}: output {k} '{name}': {m}"))?;
            lines.push(format!("{set_name}: output {k} '{name}': {msg}"));
        }
    }
    Ok(lines)
}

#[test]
fn zoo_models_match_onnxruntime() {
    let root = zoo_dir();
    let filter = std::env::var("KILN_ZOO_FILTER").unwrap_or_default();
    let mut models: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/make_zoo.py)", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model.onnx").exists())
        .collect();
    models.sort();
    assert!(!models.is_empty(), "no models in {}", root.display());
    let mut failures = Vec::new();
    let mut ran = 0;
    for dir in models {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if !name.contains(&filter) {
            continue;
        }
        ran += 1;
        // a panicking op must not hide the other models' results
        let res = std::panic::catch_unwind(|| run_model(&dir))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_message(p.as_ref()))));
        match res {
            Ok(lines) => {
                for l in lines {
                    println!("zoo {name}: ok: {l}");
                }
            }
            Err(m) => {
                println!("zoo {name}: FAILED: {m}");
                failures.push(format!("{name}: {m}"));
            }
        }
    }
    assert!(ran > 0, "KILN_ZOO_FILTER='{filter}' matches no model");
    assert!(
        failures.is_empty(),
        "{} of {ran} zoo models failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// The message of a caught panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

#[test]
fn check_scaled_uses_output_scale() {
    let e = Tensor::from_vec(&[3], vec![100.0f32, -50.0, 0.0]);
    // 5e-3 error is within 1e-4 * 100 = 1e-2
    let a = Tensor::from_vec(&[3], vec![100.005f32, -50.0, 0.0]);
    assert!(check_scaled(&a, &e, 1e-4).is_ok());
    let a = Tensor::from_vec(&[3], vec![100.0f32, -50.0, 0.05]);
    assert!(check_scaled(&a, &e, 1e-4).is_err());
    // small outputs: the scale floor is 1
    let e = Tensor::from_vec(&[2], vec![1e-3f32, -1e-3]);
    let a = Tensor::from_vec(&[2], vec![1.05e-3f32, -1e-3]);
    assert!(check_scaled(&a, &e, 1e-4).is_ok());
    // constant and non-finite outputs are degenerate
    let c = Tensor::from_vec(&[2], vec![2.0f32, 2.0]);
    assert!(check_scaled(&c, &c, 1e-4).is_err());
    let n = Tensor::from_vec(&[2], vec![f32::NAN, 2.0]);
    assert!(check_scaled(&n, &c, 1e-4).is_err());
}
