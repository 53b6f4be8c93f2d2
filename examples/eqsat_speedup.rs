//! Measured end-to-end CPU speed-up of equality saturation on tensat's evaluation graphs
//! (built by `passes/examples/eqsat_bench.rs`): each graph, with its weights made constants
//! (random values, so that weight-only sub-graphs such as concatenated MatMul weights fold
//! at compile time), is compiled at `-O0` (no eqsat) and `-O2`, and both artifacts are timed
//! on one thread, interleaved (median of rounds).
//!
//! `cargo run --release --example eqsat_speedup [-O3] [MODEL...]` (models: squeezenet,
//! vgg19, resnext50, nasrnn, nasnet, inception, bert, gpt2; the big ones take minutes to
//! compile); `-O3` compares `-O0` with `-O3` (ILP extraction) instead of `-O2`;
//! `KILN_TARGET=cpu:NAME` compiles for that CPU (e.g. `cpu:native`; default `cpu`);
//! `KILN_THREADS=N` runs both artifacts on `N` threads (what `kiln run` does by default with
//! every core) instead of one.
//!
//! `--gpu SKU DIR` compiles each graph for `cuda:SKU` at `-O0` and `-O2` (the GPU cost
//! model) into `DIR/MODEL.O0.kiln` and `DIR/MODEL.O2.kiln` with `DIR/MODEL/input_0.pb` and
//! the CPU interpreter's `output_0.pb`, the layout `gpu_zoo` times and checks on a GPU
//! machine (`scripts/gpu_pack.sh` fills `.gpu/eqsat`). The weights are a short repeating
//! sequence, so the artifacts compress well for the trip.

#[path = "support/tensat.rs"]
mod tensat;

use kiln::ir::{Graph, Tensor};
use kiln::{Compiler, Session, TensorView};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Median seconds per run of `s` on `x`, over `rounds` rounds of `per` runs.
fn time(s: &Session, x: &[f32], shape: &[usize], per: usize) -> f64 {
    let v = [TensorView::from_f32(shape, x)];
    let t = Instant::now();
    for _ in 0..per {
        s.run(&v).expect("run");
    }
    t.elapsed().as_secs_f64() / per as f64
}

/// Like [`tensat::weights_to_constants`], with weights repeating every 4099 values (random within
/// the period): the same arithmetic, artifacts that compress to almost nothing. Each tensor
/// starts at its own random phase and has its own scale, so no two weights are equal (equal
/// constants would let the compiler merge projections that differ in the real model).
fn periodic_weights(g: &mut Graph, rng: &mut impl Rng) {
    g.infer().expect("the benchmark graphs infer");
    let period: Vec<f32> = (0..4099).map(|_| rng.random_range(-0.05..0.05)).collect();
    let weights: Vec<usize> = g.inputs[1..].to_vec();
    for v in weights {
        let shape = g.values[v].fact.shape.as_known().expect("static weights");
        let n: usize = shape.iter().product();
        let phase = rng.random_range(0..period.len());
        let scale: f32 = rng.random_range(0.5..1.5);
        let data: Vec<f32> = (0..n)
            .map(|i| scale * period[(i + phase) % period.len()])
            .collect();
        g.set_const(v, Tensor::from_vec(&shape, data));
    }
    g.inputs.truncate(1);
}

/// Prints the 15 slowest steps of `s` over `n` runs (`KILN_PROFILE=N`).
fn print_profile(what: &str, s: &Session, x: &[f32], shape: &[usize], n: usize) {
    let v = [TensorView::from_f32(shape, x)];
    let mut prof = s.profile(&v, n).expect("profile");
    let total: f64 = prof.iter().map(|(_, t)| t.as_secs_f64()).sum();
    println!(
        "{what}: {} steps, {:.3} ms per run",
        prof.len(),
        total * 1e3 / n as f64
    );
    prof.sort_by_key(|p| std::cmp::Reverse(p.1));
    for (k, t) in prof.iter().take(
        std::env::var("KILN_PROFILE_TOP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15),
    ) {
        let t = t.as_secs_f64();
        println!(
            "  {:>8.3} ms {:>5.1}%  {k}",
            t * 1e3 / n as f64,
            100.0 * t / total
        );
    }
}

/// `KILN_EMULATE=1` with `--gpu`: runs the GPU plan of `g` at `-O{level}` on the CPU (the
/// plan emulation of `kiln::gpu_compile`: every launch in order over a host arena) and
/// prints its launches and its largest relative error against the interpreter.
fn emulate_check(g: &Graph, name: &str, sku: &str, level: u8, x: &Tensor, want: &Tensor) {
    let opts = kiln::compile::CompileOptions {
        opt_level: Some(level),
        ..Default::default()
    };
    let t0 = Instant::now();
    let target = format!("cuda:{sku}");
    match kiln::gpu_compile::emulate_graph(g, name, &target, &opts, std::slice::from_ref(x), |_| {})
    {
        Ok(e) => {
            let (got, w) = (e.outputs[0].to_f64_vec(), want.to_f64_vec());
            let scale = w.iter().fold(1f64, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs() / scale)
                .fold(0f64, f64::max);
            let gemms = e
                .lowering
                .launches
                .iter()
                .filter(|l| l.kernel.starts_with("kiln_gemm_f32"))
                .count();
            println!(
                "{name} -O{level} emulated: {} launches ({gemms} f32 GEMMs), max rel. error {err:.1e} ({:.1} s)",
                e.steps,
                t0.elapsed().as_secs_f64()
            );
            if std::env::var("KILN_EMULATE").as_deref() == Ok("2") {
                println!("  {}", launch_kinds(&e.lowering));
            }
        }
        Err(e) => println!("{name} -O{level} emulated: {e:#}"),
    }
}

/// The launches of a plan by kind (`kiln_k12_conv_relu` → `conv_relu`), for `KILN_EMULATE=2`.
fn launch_kinds(l: &kiln_codegen::gpu::lower::GpuLowering) -> String {
    let mut n: std::collections::BTreeMap<String, usize> = Default::default();
    for la in &l.launches {
        let k = la.kernel.trim_start_matches("kiln_");
        let k = match k.split_once('_') {
            Some((head, rest))
                if head.starts_with('k') && head[1..].chars().all(|c| c.is_ascii_digit()) =>
            {
                rest
            }
            _ => k,
        };
        *n.entry(k.to_string()).or_default() += 1;
    }
    n.iter()
        .map(|(k, c)| format!("{k} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A benchmark graph: name, tensat's published speed-up, builder.
/// `--gpu SKU DIR`: see the module doc.
fn pack_for_gpu(models: &[tensat::Model], only: &[String], sku: &str, dir: &str) {
    let dir = std::path::Path::new(dir);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (name, _, build) in models {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let (g, shape, x) = tensat::prepared(*build, periodic_weights, &mut rng);
        let xt = Tensor::from_vec(&shape, x);
        let want = kiln::ir::interp::run(&g, std::slice::from_ref(&xt)).expect("interpreter");
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("mkdir");
        let in_name = g.values[g.inputs[0]].name.clone();
        std::fs::write(
            data.join("input_0.pb"),
            kiln::ir::onnx::tensor_pb_bytes(&in_name, &xt),
        )
        .expect("write input");
        std::fs::write(
            data.join("output_0.pb"),
            kiln::ir::onnx::tensor_pb_bytes("output", &want[0]),
        )
        .expect("write output");
        for level in [0u8, 2] {
            let t0 = Instant::now();
            let mut report = String::new();
            let art = Compiler::new()
                .target(&format!("cuda:{sku}"))
                .and_then(|c| {
                    c.opt_level(level)
                        .print_after("eqsat")
                        .compile_with_ir(&g, |_, text| report.push_str(text))
                });
            match art {
                Ok(a) => {
                    let path = dir.join(format!("{name}.O{level}.kiln"));
                    a.save(&path).expect("save");
                    let cost = report
                        .lines()
                        .find(|l| l.starts_with("cost"))
                        .unwrap_or("")
                        .to_string();
                    println!(
                        "{name} -O{level}: {} in {:.1} s; {cost}",
                        path.display(),
                        t0.elapsed().as_secs_f64()
                    );
                }
                Err(e) => println!("{name} -O{level}: cannot compile for cuda:{sku}: {e:#}"),
            }
            if std::env::var("KILN_EMULATE").is_ok() {
                emulate_check(&g, name, sku, level, &xt, &want[0]);
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gpu = args
        .iter()
        .position(|a| a == "--gpu")
        .map(|i| (args[i + 1].clone(), args[i + 2].clone()));
    let opt: u8 = if args.iter().any(|a| a == "-O3") {
        3
    } else {
        2
    };
    let only: Vec<String> = match &gpu {
        Some((sku, dir)) => args
            .iter()
            .filter(|a| *a != "--gpu" && *a != sku && *a != dir)
            .cloned()
            .collect(),
        None => args.into_iter().filter(|a| a != "-O3").collect(),
    };
    let models = tensat::models();
    if let Some((sku, dir)) = &gpu {
        pack_for_gpu(&models, &only, sku, dir);
        return;
    }
    // `KILN_THREADS=N`: run each artifact on N threads (default 1)
    let threads: usize = std::env::var("KILN_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // `KILN_TARGET=cpu:NAME`: compile for that CPU (default `cpu`, x86-64-v3)
    let target = std::env::var("KILN_TARGET").unwrap_or_else(|_| "cpu".into());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    println!("threads per run: {threads}, target {target}");
    println!("| model | -O0 ms | -O{opt} ms | measured speed-up | eqsat report (-O{opt}) | tensat speed-up (GPU) |");
    println!("|---|---|---|---|---|---|");
    for (name, tensat, build) in models {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let (g, shape, x) = tensat::prepared(build, tensat::weights_to_constants, &mut rng);
        let mut arts = Vec::new();
        let mut applied = String::new();
        for level in [0u8, opt] {
            let mut report = String::new();
            let art = Compiler::new()
                .target(&target)
                .unwrap_or_else(|e| panic!("KILN_TARGET={target}: {e}"))
                .opt_level(level)
                .print_after("eqsat")
                .compile_with_ir(&g, |_, text| report.push_str(text))
                .unwrap_or_else(|e| panic!("{name} -O{level}: {e}"));
            if level == opt {
                // "rules applied (N of M):" and "... (G% less), ..., kept K" of the report
                let text = report.split(kiln::pipeline::EQSAT_IR).next().unwrap_or("");
                applied = text
                    .lines()
                    .filter(|l| l.starts_with("rules applied") || l.starts_with("cost"))
                    .map(|l| l.trim_end_matches(':').to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
            }
            let mut session = Session::new(&art).expect("load");
            session.set_threads(threads);
            arts.push(session);
        }
        if let Some(n) = std::env::var("KILN_PROFILE")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            for (level, s) in [0, opt].iter().zip(&arts) {
                print_profile(&format!("{name} -O{level}"), s, &x, &shape, n);
            }
        }
        // the rewritten graph's output against the input graph's
        let v = [TensorView::from_f32(&shape, &x)];
        let (y0, y2) = (arts[0].run(&v).expect("run"), arts[1].run(&v).expect("run"));
        let (a, b) = (y0[0].as_f32().expect("f32"), y2[0].as_f32().expect("f32"));
        let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs() / scale)
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-3,
            "{name}: -O{opt} output differs from -O0 by {diff}"
        );
        // warm up, then interleave rounds and keep the median
        let per = 5;
        let (mut t0, mut t2) = (Vec::new(), Vec::new());
        time(&arts[0], &x, &shape, 1);
        time(&arts[1], &x, &shape, 1);
        for round in 0..6 {
            // alternate which artifact goes first: on several threads each session's
            // `split_choice` calibrates on its own, and the order of a pair can matter
            if round % 2 == 0 {
                t0.push(time(&arts[0], &x, &shape, per));
                t2.push(time(&arts[1], &x, &shape, per));
            } else {
                t2.push(time(&arts[1], &x, &shape, per));
                t0.push(time(&arts[0], &x, &shape, per));
            }
        }
        t0.sort_by(f64::total_cmp);
        t2.sort_by(f64::total_cmp);
        let (a, b) = (t0[t0.len() / 2], t2[t2.len() / 2]);
        // where eqsat kept the input graph both artifacts compute the same graph: their
        // difference is the spread between two loaded instances, not a speed-up
        let same = if applied.contains("kept input") {
            " (same graph)"
        } else {
            ""
        };
        println!(
            "| {name} | {:.2} | {:.2} | {:+.1}%{same} | {applied} | {tensat} |",
            a * 1e3,
            b * 1e3,
            100.0 * (a / b - 1.0)
        );
    }
}
