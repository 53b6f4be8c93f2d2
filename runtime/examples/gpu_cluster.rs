//! Runs sharded (cluster) artifacts with every rank a thread of this process and checks
//! their outputs against the model's test data; a runtime-only program (no LLVM, no MPI), so
//! it can be carried to a GPU machine with no compiler. With feature `cuda`, ranks whose
//! segments were compiled for a GPU run them on GPU `rank mod <GPUs visible>` (on a
//! one-GPU machine every rank shares it; tensors cross ranks through host memory). With
//! feature `nccl`, where every rank has a GPU of its own, they cross GPU to GPU through
//! NCCL (`kiln_runtime::nccl_transport::wanted`); the table's transport column says which.
//!
//! ```sh
//! cargo run --release -p kiln-runtime --features cuda --example gpu_cluster -- DIR [RUNS]
//! ```
//!
//! `DIR` holds artifacts named `MODEL.TAG.kiln` and, per model, a folder `MODEL/` with
//! `input_K.pb` / `output_K.pb` (ONNX test-data tensors). Prints one table row per artifact:
//! ranks, largest `|a - b| / max(|b|, 1)` over the outputs, and the median and minimum
//! latency of `RUNS` runs (default 20, after 3 warm-up runs; each rank keeps its loaded
//! model).

use kiln_runtime::artifact::Artifact;
#[path = "common/test_data.rs"]
mod test_data;

use kiln_runtime::cluster::{ClusterModel, ThreadTransport, Transport};
use kiln_runtime::{AlignedBuf, Tensor, TensorView};
use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = Path::new(args.first().map(String::as_str).unwrap_or("."));
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(20);
    println!("| artifact | ranks | transport | max rel. error | p50 ms | min ms |");
    println!("|---|---|---|---|---|---|");
    for (path, file, model) in test_data::artifacts(dir) {
        let art = match Artifact::load(&path) {
            Ok(a) => a,
            Err(e) => {
                println!("| {file} | load error: {e} |");
                continue;
            }
        };
        let Some(cp) = &art.plan.cluster else {
            println!("| {file} | not a cluster artifact |");
            continue;
        };
        let world = cp.world;
        let ins = test_data::tensors(&dir.join(&model), "input");
        let want = test_data::tensors(&dir.join(&model), "output");
        let bufs: Vec<(kiln_runtime::DType, Vec<usize>, AlignedBuf)> = ins
            .iter()
            .map(|t| {
                let raw = kiln_ir::onnx::tensor_proto::to_raw(t);
                (t.dtype(), t.shape().to_vec(), AlignedBuf::from_bytes(&raw))
            })
            .collect();
        let origin = path.display().to_string();
        // One thread per rank, each keeping its model: rank 0's first outputs are checked,
        // every run after 3 warm-up runs timed (the ranks meet in their messages; a rank
        // that fails makes the others time out instead of waiting forever).
        #[cfg(feature = "nccl")]
        let nccl = match kiln_runtime::nccl_transport::wanted(&art, world) {
            Ok(b) => b,
            Err(e) => {
                println!("| {file} | {world} | {e} |");
                continue;
            }
        };
        #[cfg(feature = "nccl")]
        let via = if nccl { "NCCL" } else { "host" };
        #[cfg(not(feature = "nccl"))]
        let via = "host";
        let transports = ThreadTransport::world(world, Duration::from_secs(60));
        let result = std::thread::scope(|s| {
            let hs: Vec<_> = transports
                .into_iter()
                .map(|mut tr| {
                    let (art, bufs, origin) = (&art, &bufs, &origin);
                    s.spawn(move || -> Result<(Vec<Tensor>, Vec<f64>), String> {
                        let r = tr.rank();
                        let mut m = ClusterModel::new(art, r, origin)?;
                        // GPU to GPU through NCCL where each rank has a GPU of its own
                        let mut nt: Option<Box<dyn Transport>> = None;
                        #[cfg(feature = "nccl")]
                        if nccl {
                            nt = Some(Box::new(
                                kiln_runtime::nccl_transport::NcclTransport::new(
                                    &mut tr,
                                    m.groups(),
                                    kiln_runtime::cuda::rank_device(r),
                                    Duration::from_secs(60),
                                )
                                .map_err(|e| format!("rank {r}: {e}"))?,
                            ));
                        }
                        let link: &mut dyn Transport = match nt.as_mut() {
                            Some(b) => b.as_mut(),
                            None => &mut tr,
                        };
                        let views: Vec<TensorView> = if r == 0 {
                            bufs.iter()
                                .map(|(d, sh, b)| TensorView {
                                    dtype: *d,
                                    shape: sh,
                                    data: b.as_slice(),
                                })
                                .collect()
                        } else {
                            Vec::new()
                        };
                        let mut first = Vec::new();
                        let mut t = Vec::new();
                        for i in 0..runs + 3 {
                            let t0 = Instant::now();
                            let out = m.run(link, &views)?;
                            if i == 0 {
                                first = out;
                            } else if i >= 3 {
                                t.push(t0.elapsed().as_secs_f64() * 1e3);
                            }
                        }
                        Ok((first, t))
                    })
                })
                .collect();
            let mut rank0 = None;
            for h in hs {
                let r = h.join().unwrap_or_else(|_| Err("a rank panicked".into()));
                if rank0.is_none() {
                    rank0 = Some(r);
                }
            }
            rank0.expect("rank 0")
        });
        let (outs, mut t) = match result {
            Ok(x) => x,
            Err(e) => {
                println!("| {file} | {world} | {via} | run error: {e} |");
                continue;
            }
        };
        let got: Vec<(kiln_ir::DType, &[u8])> =
            outs.iter().map(|t| (t.dtype, t.data.as_slice())).collect();
        let err = test_data::max_rel_error(&got, &want);
        t.sort_by(f64::total_cmp);
        println!(
            "| {file} | {world} | {via} | {err:.2e} | {:.3} | {:.3} |",
            t[t.len() / 2],
            t[0]
        );
    }
}
