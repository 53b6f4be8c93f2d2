//! ONNX test data for the runtime-only examples (`gpu_zoo`, `gpu_cluster`): the tensors of a
//! model's test-data folder and the error measure they are checked with.

use std::path::{Path, PathBuf};

/// The artifacts `*.kiln` of `dir`, sorted, each with its file name and model (the file
/// name up to the first dot: `MODEL.TAG.kiln`, whose test data is in `dir/MODEL/`).
pub fn artifacts(dir: &Path) -> Vec<(PathBuf, String, String)> {
    let mut arts: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("artifact folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "kiln"))
        .collect();
    arts.sort();
    arts.into_iter()
        .map(|p| {
            let file = p.file_name().unwrap().to_string_lossy().to_string();
            let model = file.split('.').next().unwrap().to_string();
            (p, file, model)
        })
        .collect()
}

/// The test tensors `PREFIX_0.pb`, `PREFIX_1.pb`, ... of `dir`.
pub fn tensors(dir: &Path, prefix: &str) -> Vec<kiln_ir::Tensor> {
    let mut out = vec![];
    for k in 0.. {
        let p = dir.join(format!("{prefix}_{k}.pb"));
        if !p.exists() {
            break;
        }
        out.push(kiln_ir::onnx::load_tensor_pb(&p).expect("test tensor").1);
    }
    out
}

/// Largest `|a - b| / max(|b|, 1)` of outputs `got` (element type and raw bytes each)
/// against `want`; infinite for a NaN or a missing output.
pub fn max_rel_error(got: &[(kiln_ir::DType, &[u8])], want: &[kiln_ir::Tensor]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let mut err = 0f64;
    for ((dt, bytes), w) in got.iter().zip(want) {
        let t = kiln_ir::onnx::tensor_proto::from_raw(*dt, w.shape(), bytes).expect("output bytes");
        for (a, b) in t.to_f64_vec().iter().zip(w.to_f64_vec()) {
            let e = (a - b).abs() / b.abs().max(1.0);
            err = if e.is_nan() {
                f64::INFINITY
            } else {
                err.max(e)
            };
        }
    }
    err
}
