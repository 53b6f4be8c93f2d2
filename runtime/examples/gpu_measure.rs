//! Measures a GPU tuning bundle (written by `kiln tune MODEL --target cuda:SKU --export DIR`)
//! on the GPU present and writes the results as JSON lines in the tuning database's export
//! format, for `kiln db import`. A runtime-only program (no LLVM/MLIR), so it can be carried
//! to a GPU machine that has no compiler.
//!
//! ```sh
//! cargo run --release -p kiln-runtime --features cuda --example gpu_measure -- DIR \
//!     [-o RESULTS.jsonl] [--runs N] [--warmup N] [--timeout SECONDS] [--no-flush]
//! kiln db import RESULTS.jsonl --db tuning.db
//! ```
//!
//! Each task's candidates run in a child process of this program (a faulting kernel poisons
//! its process's CUDA context): a candidate whose child dies is recorded as a crash, one that
//! takes longer than `--timeout` (default 20 s, including the module's JIT compilation) as a
//! timeout, and a new child goes on with the next candidate. Per candidate (see
//! `kiln_runtime::tune_measure`): module load (error: invalid), one run compared with the
//! expected output (beyond the task's tolerance: wrong), warm-up, then `--runs` (default
//! 20) launches timed with CUDA events, L2 flushed before each; the median is recorded.
//! Without a GPU it says so and exits with status 2. Default output: `DIR/results.jsonl`.

use kiln_runtime::tune_bundle::{result_line, Manifest, MeasureOutcome};
use kiln_runtime::tune_measure::{GpuMeasurer, MeasureOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

struct Args {
    dir: PathBuf,
    out: Option<PathBuf>,
    opts: MeasureOptions,
    timeout: f64,
    /// Internal: measure candidates `from..` of task `task` in this process.
    child: Option<(usize, usize)>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        dir: PathBuf::new(),
        out: None,
        opts: MeasureOptions::default(),
        timeout: 20.0,
        child: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    let mut dir = None;
    let num = |v: Option<&String>, name: &str| -> Result<f64, String> {
        v.and_then(|s| s.parse::<f64>().ok())
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| format!("{name} needs a non-negative number"))
    };
    while let Some(s) = it.next() {
        match s.as_str() {
            "-o" | "--output" => a.out = it.next().map(PathBuf::from),
            "--runs" => a.opts.runs = num(it.next(), "--runs")?.max(1.0) as usize,
            "--warmup" => a.opts.warmup = num(it.next(), "--warmup")? as usize,
            "--timeout" => a.timeout = num(it.next(), "--timeout")?.max(1.0),
            "--no-flush" => a.opts.flush_l2 = false,
            "--child" => {
                let t = num(it.next(), "--child TASK FROM")? as usize;
                let f = num(it.next(), "--child TASK FROM")? as usize;
                a.child = Some((t, f));
            }
            _ if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ => dir = Some(PathBuf::from(s)),
        }
    }
    a.dir = dir.ok_or(
        "usage: gpu_measure BUNDLE_DIR [-o RESULTS.jsonl] [--runs N] [--warmup N] \
         [--timeout S] [--no-flush]",
    )?;
    Ok(a)
}

/// Child: one JSON line `[candidate, outcome]` per measured candidate of the task.
fn child(a: &Args, task: usize, from: usize) -> Result<(), String> {
    let m = Manifest::load(&a.dir).map_err(|e| e.0)?;
    let t = m.tasks.get(task).ok_or(format!("no task {task}"))?;
    let mut g = GpuMeasurer::new(&m, a.opts).map_err(|e| e.to_string())?;
    let mut data = g.task_data(&a.dir, t)?;
    let mut out = std::io::stdout().lock();
    for (ci, c) in t.candidates.iter().enumerate().skip(from) {
        let o = g.measure(&a.dir, t, c, &mut data);
        let _ = writeln!(out, "{}", serde_json::json!([ci, o]));
        let _ = out.flush();
    }
    Ok(())
}

/// Runs children for `task` until every candidate has an outcome.
fn run_task(a: &Args, exe: &Path, task: usize, n: usize) -> Vec<MeasureOutcome> {
    let mut got: Vec<Option<MeasureOutcome>> = vec![None; n];
    let mut from = 0;
    while from < n {
        let mut cmd = Command::new(exe);
        cmd.arg(&a.dir)
            .args(["--runs", &a.opts.runs.to_string()])
            .args(["--warmup", &a.opts.warmup.to_string()])
            .args(["--child", &task.to_string(), &from.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !a.opts.flush_l2 {
            cmd.arg("--no-flush");
        }
        let mut ch = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                got[from] = Some(MeasureOutcome::Crash {
                    msg: format!("cannot start the measuring process: {e}"),
                });
                from += 1;
                continue;
            }
        };
        let stdout = ch.stdout.take().expect("piped");
        let stderr = ch.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s);
            s
        });
        loop {
            match rx.recv_timeout(Duration::from_secs_f64(a.timeout)) {
                Ok(line) => {
                    if let Ok((ci, o)) = serde_json::from_str::<(usize, MeasureOutcome)>(&line) {
                        if ci < n {
                            got[ci] = Some(o);
                            from = ci + 1;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = ch.kill();
                    let _ = ch.wait();
                    got[from] = Some(MeasureOutcome::Timeout { limit_s: a.timeout });
                    from += 1;
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = ch.wait();
                    let tail = err.join().unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(2).collect();
                    if from < n && got[from].is_none() {
                        got[from] = Some(MeasureOutcome::Crash {
                            msg: format!("measuring process {status:?}: {}", tail.join(" | ")),
                        });
                        from += 1;
                    }
                    break;
                }
            }
        }
    }
    got.into_iter()
        .map(|o| {
            o.unwrap_or(MeasureOutcome::Crash {
                msg: "no outcome".into(),
            })
        })
        .collect()
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_measure: {e}");
            std::process::exit(1);
        }
    };
    if let Some((t, f)) = a.child {
        if let Err(e) = child(&a, t, f) {
            eprintln!("gpu_measure: {e}");
            std::process::exit(1);
        }
        return;
    }
    let m = match Manifest::load(&a.dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("gpu_measure: {e}");
            std::process::exit(1);
        }
    };
    if kiln_runtime::cuda::device_count() == 0 {
        eprintln!(
            "gpu_measure: no CUDA device (no libcuda or no GPU on this machine); run it on a \
             machine with a {} ({}) GPU",
            m.sku, m.arch
        );
        std::process::exit(2);
    }
    // The device must be the bundle's architecture (checked once here, not per child).
    match GpuMeasurer::new(&m, a.opts) {
        Ok(g) => println!(
            "device: {} (bundle for {}, {})",
            g.device_name(),
            m.sku,
            m.arch
        ),
        Err(e) => {
            eprintln!("gpu_measure: {e}");
            std::process::exit(1);
        }
    }
    let exe = std::env::current_exe().expect("own executable");
    let out_path = a.out.clone().unwrap_or_else(|| a.dir.join("results.jsonl"));
    let mut out = match std::fs::File::create(&out_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("gpu_measure: {}: {e}", out_path.display());
            std::process::exit(1);
        }
    };
    println!(
        "| task | candidates | ok | default us | best us | speed-up | best config |\n|---|---|---|---|---|---|---|"
    );
    let mut lines = 0;
    for (ti, t) in m.tasks.iter().enumerate() {
        let outcomes = run_task(&a, &exe, ti, t.candidates.len());
        let mut best: Option<(f64, usize)> = None;
        for (ci, o) in outcomes.iter().enumerate() {
            let c = &t.candidates[ci];
            let _ = writeln!(out, "{}", result_line(&m, t, c, o));
            lines += 1;
            if let MeasureOutcome::Ok { seconds } = o {
                if best.is_none_or(|(b, _)| *seconds < b) {
                    best = Some((*seconds, ci));
                }
            } else {
                eprintln!("task {ti} candidate {ci} ({}): {o:?}", c.entry);
            }
        }
        let ok = outcomes
            .iter()
            .filter(|o| matches!(o, MeasureOutcome::Ok { .. }))
            .count();
        // The exporter puts the default schedule first.
        let d = match outcomes.first() {
            Some(MeasureOutcome::Ok { seconds }) => Some(*seconds),
            _ => None,
        };
        let us = |x: Option<f64>| x.map_or("-".to_string(), |s| format!("{:.2}", s * 1e6));
        println!(
            "| {} | {} | {ok} | {} | {} | {} | {} |",
            t.description,
            t.candidates.len(),
            us(d),
            us(best.map(|b| b.0)),
            match (d, best) {
                (Some(d), Some((b, _))) => format!("{:.2}x", d / b),
                _ => "-".into(),
            },
            best.map_or("-".to_string(), |(_, ci)| format!(
                "{:?}",
                t.candidates[ci].config
            ))
        );
    }
    let _ = out.flush();
    println!("wrote {lines} results to {}", out_path.display());
}
