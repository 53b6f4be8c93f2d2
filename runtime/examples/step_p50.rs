//! Per-step latency distribution of a compiled artifact: runs it `N` times at `T` threads
//! (f32 inputs all 0.5, others all zero) and prints each step's p50 and min (µs), and the p50 of
//! whole runs. `kiln run --profile` prints means, which a few descheduled runs on a shared
//! machine dominate.
//!
//! `cargo run --release -p kiln-runtime --example step_p50 MODEL.kiln [THREADS] [RUNS]`

use kiln_runtime::{DType, DimSpec, Model, TensorView};
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: step_p50 MODEL.kiln [THREADS] [RUNS]")?;
    let threads: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let runs: usize = args.get(3).map_or(Ok(2000), |s| s.parse())?;
    let mut model = Model::load(std::path::Path::new(path))?;
    model.set_threads(threads);
    let shapes: Vec<Vec<usize>> = model
        .plan()
        .inputs
        .iter()
        .map(|i| {
            i.shape
                .iter()
                .map(|d| match d {
                    DimSpec::Fixed(n) => *n as usize,
                    DimSpec::Sym(_) | DimSpec::Dynamic => 1,
                })
                .collect()
        })
        .collect();
    let dtypes: Vec<DType> = model.plan().inputs.iter().map(|i| i.dtype).collect();
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .zip(&dtypes)
        .map(|(s, &dt)| {
            let n: usize = s.iter().product();
            match dt {
                DType::F32 => 0.5f32.to_ne_bytes().repeat(n),
                _ => vec![0; n * dt.size_of()],
            }
        })
        .collect();
    let views: Vec<TensorView> = shapes
        .iter()
        .zip(&data)
        .zip(&dtypes)
        .map(|((s, d), &dt)| TensorView::new(dt, s, d))
        .collect();
    model.profile(&views, 50)?;
    let mut per_step: Vec<Vec<Duration>> = Vec::new();
    let mut totals = Vec::with_capacity(runs);
    let mut names = Vec::new();
    for _ in 0..runs {
        let prof = model.profile(&views, 1)?;
        totals.push(prof.iter().map(|p| p.1).sum::<Duration>());
        if per_step.is_empty() {
            per_step = vec![Vec::with_capacity(runs); prof.len()];
            names = prof.iter().map(|p| p.0.clone()).collect();
        }
        for (v, p) in per_step.iter_mut().zip(&prof) {
            v.push(p.1);
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let stat = |v: &mut Vec<Duration>| {
        v.sort();
        (us(v[v.len() / 2]), us(v[0]))
    };
    let mut sum_p50 = 0.0;
    for (name, v) in names.iter().zip(per_step.iter_mut()) {
        let (p50, min) = stat(v);
        sum_p50 += p50;
        println!("  {p50:8.2} us p50 {min:8.2} us min  {name}");
    }
    let (p50, min) = stat(&mut totals);
    println!("{threads} thread(s), {runs} runs: run p50 {p50:.2} us, min {min:.2} us (sum of step p50s {sum_p50:.2} us)");
    Ok(())
}
