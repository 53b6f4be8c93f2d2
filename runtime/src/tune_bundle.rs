//! GPU tuning bundles: candidates compiled on a machine with LLVM, measured on a GPU machine
//! that has none (TVM's RPC split: build here, measure there).
//!
//! A bundle is a folder: `manifest.json` ([`Manifest`]), one PTX file per candidate, and per
//! task its input buffers and the expected output (little-endian raw files), shared by the
//! task's candidates. `kiln tune MODEL --target cuda:SKU --export DIR` writes it; the
//! runtime-only measurer (`runtime/examples/gpu_measure.rs`, or `kiln tune` itself where a
//! GPU is present) loads each candidate's module, checks its output against the expected one
//! and times it ([`crate::tune_measure`], feature `cuda`), then writes one JSON line per
//! candidate in the tuning database's export format ([`result_line`]), which `kiln db
//! import` reads.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The bundle format version written in [`Manifest::format`].
pub const BUNDLE_FORMAT: u32 = 1;

/// The manifest of a bundle (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`BUNDLE_FORMAT`].
    pub format: u32,
    /// The tuning-database target the results are recorded for (`cuda:h200`).
    pub target: String,
    /// The SKU name (`h200`).
    pub sku: String,
    /// Its architecture (`sm_90`).
    pub arch: String,
    /// The Kiln version that generated the kernels (records are keyed by it).
    pub kiln_version: String,
    /// The SKU's L2 size: the measurer writes twice as much between timed runs.
    pub l2_bytes: u64,
    /// The tasks.
    pub tasks: Vec<BundleTask>,
}

/// One tuning task: a kernel template at fixed shapes, its data and its candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleTask {
    /// Workload fingerprint.
    pub workload: String,
    /// Template kind (`gpu_gemm_mma`).
    pub kind: String,
    /// Workload description.
    pub description: String,
    /// Cost-model features of the workload.
    pub workload_features: Vec<f32>,
    /// The kernel's buffers (inputs from files, the output zero-filled).
    pub buffers: Vec<BundleBuffer>,
    /// Index of the output buffer in `buffers` (f32).
    pub output: usize,
    /// File of the expected output (f32).
    pub expected: String,
    /// Largest accepted `max |out - expected| / max(max |expected|, 1)`.
    pub tolerance: f64,
    /// The candidates.
    pub candidates: Vec<BundleCandidate>,
}

/// A kernel buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleBuffer {
    /// Name (`A`, `B`, `bias`, `C`).
    pub name: String,
    /// File with the initial content (`len · elem_bytes` bytes), or none: zero-filled.
    pub file: Option<String>,
    /// Element size: 4 (f32) or 2 (f16 / bf16 bits).
    pub elem_bytes: u32,
    /// Elements.
    pub len: u64,
}

/// One candidate schedule, compiled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleCandidate {
    /// The schedule (parameter → value), as recorded in the tuning database.
    pub config: BTreeMap<String, i64>,
    /// PTX file.
    pub ptx: String,
    /// Entry name.
    pub entry: String,
    /// Launch arguments in parameter order.
    pub args: Vec<BundleArg>,
    /// Blocks per grid.
    pub grid: [u32; 3],
    /// Threads per block.
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

/// One launch argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BundleArg {
    /// A buffer (`memref<?xT>`) of the task.
    Buf {
        /// Index in [`BundleTask::buffers`].
        buffer: usize,
    },
    /// An `index` scalar.
    Index {
        /// The value.
        value: i64,
    },
    /// An `f32` scalar.
    F32 {
        /// The value.
        value: f32,
    },
    /// A TMA descriptor of a 16-bit row-major matrix in a buffer.
    TensorMap {
        /// Index in [`BundleTask::buffers`] (2-byte elements).
        buffer: usize,
        /// Global extent, innermost first.
        dims: [u64; 2],
        /// Byte stride of the outer dimension.
        row_bytes: u64,
        /// Box extent, innermost first.
        box_dims: [u32; 2],
        /// bf16 (else f16).
        bf16: bool,
    },
}

/// What became of one candidate: the same JSON as the tuning database's outcome
/// (`{"status": "ok", "seconds": ...}`, `invalid`, `crash`, `timeout`, `wrong`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum MeasureOutcome {
    /// Correct; median kernel time in seconds.
    Ok {
        /// Median latency.
        seconds: f64,
    },
    /// The module did not load or the launch was refused.
    Invalid {
        /// Why.
        msg: String,
    },
    /// The kernel faulted (or its measuring process died).
    Crash {
        /// What happened.
        msg: String,
    },
    /// It did not finish in time.
    Timeout {
        /// The limit in seconds.
        limit_s: f64,
    },
    /// Its output differs from the expected one.
    Wrong {
        /// The error.
        msg: String,
    },
}

/// A bundle error, naming the file or field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BundleError(pub String);

impl Manifest {
    /// Reads `DIR/manifest.json` and checks it: format version, buffer and argument indices,
    /// buffer files present with the right sizes, PTX files present.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| BundleError(format!("{}: {e}", path.display())))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            BundleError(format!(
                "{}: not a tuning bundle manifest: {e}",
                path.display()
            ))
        })?;
        if m.format != BUNDLE_FORMAT {
            return Err(BundleError(format!(
                "{}: bundle format {} (this measurer reads {BUNDLE_FORMAT})",
                path.display(),
                m.format
            )));
        }
        for (ti, t) in m.tasks.iter().enumerate() {
            let ctx = |what: String| {
                BundleError(format!(
                    "{}: task {ti} ({}): {what}",
                    path.display(),
                    t.description
                ))
            };
            if t.output >= t.buffers.len() || t.buffers[t.output].elem_bytes != 4 {
                return Err(ctx(format!("output {} is not an f32 buffer", t.output)));
            }
            for b in &t.buffers {
                if !matches!(b.elem_bytes, 2 | 4) {
                    return Err(ctx(format!(
                        "buffer '{}': elem_bytes {}",
                        b.name, b.elem_bytes
                    )));
                }
                if let Some(f) = &b.file {
                    let want = b.len * u64::from(b.elem_bytes);
                    let got = std::fs::metadata(dir.join(f)).map(|md| md.len());
                    if got.as_ref().ok() != Some(&want) {
                        return Err(ctx(format!(
                            "buffer '{}': file {f} must hold {want} bytes ({got:?})",
                            b.name
                        )));
                    }
                }
            }
            let out_bytes = t.buffers[t.output].len * 4;
            let got = std::fs::metadata(dir.join(&t.expected)).map(|md| md.len());
            if got.as_ref().ok() != Some(&out_bytes) {
                return Err(ctx(format!(
                    "expected output {} must hold {out_bytes} bytes",
                    t.expected
                )));
            }
            for (ci, c) in t.candidates.iter().enumerate() {
                if !dir.join(&c.ptx).is_file() {
                    return Err(ctx(format!("candidate {ci}: PTX file {} missing", c.ptx)));
                }
                for a in &c.args {
                    let bad = match a {
                        BundleArg::Buf { buffer } => *buffer >= t.buffers.len(),
                        BundleArg::TensorMap { buffer, .. } => {
                            t.buffers.get(*buffer).is_none_or(|b| b.elem_bytes != 2)
                        }
                        _ => false,
                    };
                    if bad {
                        return Err(ctx(format!(
                            "candidate {ci}: argument {a:?} names no suitable buffer"
                        )));
                    }
                }
            }
        }
        Ok(m)
    }
}

/// Reads a raw little-endian f32 file.
pub fn read_f32(path: &Path) -> Result<Vec<f32>, BundleError> {
    let b = std::fs::read(path).map_err(|e| BundleError(format!("{}: {e}", path.display())))?;
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads a raw little-endian u16 file.
pub fn read_u16(path: &Path) -> Result<Vec<u16>, BundleError> {
    let b = std::fs::read(path).map_err(|e| BundleError(format!("{}: {e}", path.display())))?;
    Ok(b.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect())
}

/// `Err` naming the error when `got` is not within `tol` of `want`: `max |got - want| /
/// max(max |want|, 1)` (NaN or a length mismatch is wrong).
pub fn compare(got: &[f32], want: &[f32], tol: f64) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("{} values, expected {}", got.len(), want.len()));
    }
    let scale = want.iter().fold(1f64, |m, &w| m.max(f64::from(w).abs()));
    let mut worst = (0f64, 0usize);
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let e = (f64::from(a) - f64::from(b)).abs() / scale;
        if e.is_nan() {
            return Err(format!("value {i} is {a} (expected {b})"));
        }
        if e > worst.0 {
            worst = (e, i);
        }
    }
    if worst.0 > tol {
        let i = worst.1;
        return Err(format!(
            "value {i}: {} vs expected {} (error {:.3e} > tolerance {tol:.1e})",
            got[i], want[i], worst.0
        ));
    }
    Ok(worst.0)
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One result as a JSON line in the tuning database's export format (`kiln db import`
/// reads it): uid, workload, kind, description, workload_features, target, kiln_version,
/// config, outcome, measured_at.
pub fn result_line(
    m: &Manifest,
    t: &BundleTask,
    c: &BundleCandidate,
    o: &MeasureOutcome,
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seed = format!(
        "{}|{}|{:?}|{}|{}",
        t.workload,
        m.target,
        c.config,
        now.as_nanos(),
        std::process::id()
    );
    let uid = format!("{:016x}{:016x}", fnv1a(&seed), fnv1a(&format!("{seed}#")));
    serde_json::json!({
        "uid": uid,
        "workload": t.workload,
        "kind": t.kind,
        "description": t.description,
        "workload_features": t.workload_features,
        "target": m.target,
        "kiln_version": m.kiln_version,
        "config": c.config,
        "outcome": o,
        "measured_at": now.as_secs_f64(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_is_relative_to_the_largest_expected_value() {
        assert!(compare(&[1.0, 100.0], &[1.001, 100.0], 1e-4).is_ok());
        assert!(compare(&[1.0, 2.0], &[1.1, 2.0], 1e-2).is_err());
        assert!(compare(&[f32::NAN], &[1.0], 1.0).is_err());
        assert!(compare(&[1.0], &[1.0, 2.0], 1.0).is_err());
    }

    #[test]
    fn outcomes_serialize_as_the_tuning_database_does() {
        let o = MeasureOutcome::Ok { seconds: 0.25 };
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"status":"ok","seconds":0.25}"#
        );
    }
}
