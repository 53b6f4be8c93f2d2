//! Runs compiled GPU artifacts on the GPU present and checks and times them; a runtime-only
//! program (no LLVM/MLIR), so it can be carried to a GPU machine that has no compiler.
//!
//! ```sh
//! cargo run --release -p kiln-runtime --features cuda --example gpu_zoo -- DIR [RUNS [FILE]]
//! ```
//!
//! `DIR` holds artifacts named `MODEL.PRECISION.kiln` and, per model, a folder `MODEL/` with
//! `input_K.pb` / `output_K.pb` (ONNX test-data tensors). For each artifact: load it twice
//! (the first load JIT-compiles the PTX and fills the cubin cache, the second reads it back;
//! both load times printed), run it on the inputs, compare every output with the expected
//! one (largest `|a - b| / max(|b|, 1)`), then time `RUNS` runs (default 200, after 20
//! warm-up runs) end to end — inputs uploaded from pinned host memory, the CUDA graph
//! replayed, outputs downloaded — and print the median and the minimum. With
//! `KILN_PROFILE=N`, also each kernel entry's device time (CUDA events around every launch,
//! median of `N` runs; `CudaModel::profile`) on stderr.

#[path = "common/test_data.rs"]
mod test_data;

use kiln_runtime::artifact::Artifact;
use kiln_runtime::cuda_model::CudaModel;
use std::path::Path;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = Path::new(args.first().map(String::as_str).unwrap_or("."));
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(200);
    // one artifact only (a failing kernel poisons the CUDA context of its process, so the
    // check script runs each artifact in a process of its own), without the table header
    let only = args.get(2);
    if kiln_runtime::cuda::device_count() == 0 {
        eprintln!("no CUDA device");
        std::process::exit(2);
    }
    let mut arts = test_data::artifacts(dir);
    if let Some(o) = only {
        arts.retain(|(_, file, _)| file == o);
    } else {
        println!(
            "| artifact | launches | load ms (JIT / cached) | max rel. error | p50 ms | min ms |"
        );
        println!("|---|---|---|---|---|---|");
    }
    for (path, file, model) in arts {
        let art = match Artifact::load(&path) {
            Ok(a) => a,
            Err(e) => {
                println!("| {file} | load error: {e} |");
                continue;
            }
        };
        let mut loads = vec![];
        let mut m = None;
        for _ in 0..2 {
            let t = Instant::now();
            match CudaModel::load(&art, true) {
                Ok(x) => {
                    loads.push(format!(
                        "{:.1} ({:?})",
                        t.elapsed().as_secs_f64() * 1e3,
                        x.cubin
                    ));
                    if let Some(w) = &x.warning {
                        eprintln!("{file}: {w}");
                    }
                    m = Some(x);
                }
                Err(e) => {
                    println!("| {file} | CUDA load error: {e} |");
                    break;
                }
            }
        }
        let Some(mut m) = m else { continue };
        let ins = test_data::tensors(&dir.join(&model), "input");
        let want = test_data::tensors(&dir.join(&model), "output");
        let raw: Vec<Vec<u8>> = ins
            .iter()
            .map(kiln_ir::onnx::tensor_proto::to_raw)
            .collect();
        let refs: Vec<&[u8]> = raw.iter().map(|r| r.as_slice()).collect();
        let outs = match m.run(&refs) {
            Ok(o) => o,
            Err(e) => {
                println!("| {file} | run error: {e} |");
                continue;
            }
        };
        let got: Vec<(kiln_ir::DType, &[u8])> = m
            .plan()
            .outputs
            .iter()
            .zip(&outs)
            .map(|(io, b)| (io.dtype, b.as_slice()))
            .collect();
        let err = test_data::max_rel_error(&got, &want);
        for _ in 0..20 {
            m.run(&refs).expect("warm-up run");
        }
        let mut t: Vec<f64> = (0..runs)
            .map(|_| {
                let s = Instant::now();
                m.run(&refs).expect("timed run");
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(|a, b| a.total_cmp(b));
        let steps = m.plan().gpu.as_ref().map_or(0, |g| g.steps.len());
        println!(
            "| {file} | {steps} | {} | {err:.2e} | {:.4} | {:.4} |",
            loads.join(" / "),
            t[t.len() / 2],
            t[0]
        );
        // KILN_PROFILE=N: device time per kernel entry (median of N event-timed runs) to
        // stderr, so the table on stdout keeps one line per artifact
        if let Some(n) = std::env::var("KILN_PROFILE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            match m.profile(&refs, n) {
                Ok(times) => eprintln!(
                    "profile of {file} (median of {n} runs):\n{}",
                    kiln_runtime::cuda_model::profile_table(&times, 12)
                ),
                Err(e) => eprintln!("profile of {file}: {e}"),
            }
        }
    }
}
