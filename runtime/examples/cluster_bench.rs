//! Latency of artifacts, single-device or sharded, with every rank a thread of this process
//! (channels as transport; one core per rank when the machine has them):
//! `cluster_bench RUNS A.kiln [B.kiln ...]` prints mean / p50 / min ms per artifact.
//! A runtime-only binary (no LLVM, no MPI) to measure on machines without a Kiln build.

use kiln_runtime::cluster::{ClusterModel, ThreadTransport};
use kiln_runtime::{Artifact, DimSpec, Model, Tensor, TensorView};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn zeros(art: &Artifact) -> Vec<Tensor> {
    art.plan
        .inputs
        .iter()
        .map(|io| {
            let shape = io
                .shape
                .iter()
                .map(|d| match d {
                    DimSpec::Fixed(n) => *n as usize,
                    _ => 1,
                })
                .collect();
            Tensor::zeroed(io.dtype, shape)
        })
        .collect()
}

fn stats(mut t: Vec<f64>) -> String {
    t.sort_by(f64::total_cmp);
    let mean = t.iter().sum::<f64>() / t.len() as f64;
    format!(
        "mean {mean:.3} ms  p50 {:.3} ms  min {:.3} ms",
        t[t.len() / 2],
        t[0]
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args[0].parse().expect("RUNS");
    for path in &args[1..] {
        let art = Artifact::load(path.as_ref()).unwrap_or_else(|e| panic!("{e}"));
        let ins = zeros(&art);
        let Some(cp) = art.plan.cluster.clone() else {
            let mut m = Model::from_artifact(art.clone(), path).unwrap();
            let views: Vec<TensorView> = ins.iter().map(|t| t.view()).collect();
            let mut t = Vec::new();
            for i in 0..runs + 10 {
                let t0 = Instant::now();
                m.run(&views).unwrap();
                if i >= 10 {
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            println!("{path}: 1 rank: {}", stats(t));
            continue;
        };
        let world = cp.world;
        let transports = ThreadTransport::world(world, Duration::from_secs(60));
        let barrier = Arc::new(Barrier::new(world));
        let times = std::thread::scope(|s| {
            let hs: Vec<_> = transports
                .into_iter()
                .map(|mut tr| {
                    let (art, ins, barrier) = (&art, &ins, barrier.clone());
                    s.spawn(move || {
                        use kiln_runtime::cluster::Transport;
                        let r = tr.rank();
                        let mut m = ClusterModel::new(art, r, path).unwrap();
                        let views: Vec<TensorView> = if r == 0 {
                            ins.iter().map(|t| t.view()).collect()
                        } else {
                            Vec::new()
                        };
                        let mut t = Vec::new();
                        for i in 0..runs + 10 {
                            barrier.wait();
                            let t0 = Instant::now();
                            m.run(&mut tr, &views).unwrap();
                            if i >= 10 {
                                t.push(t0.elapsed().as_secs_f64() * 1e3);
                            }
                        }
                        t
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).next().unwrap()
        });
        println!("{path}: {world} ranks (threads): {}", stats(times));
    }
}
