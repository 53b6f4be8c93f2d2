//! `kiln tune`: autotuning a model's kernels for the machine it runs on, recorded in a
//! tuning database that `kiln compile --db` reads.
//!
//! The model is planned as `kiln compile` would (same shapes, same passes); every tunable
//! kernel of the partition ([`kiln_codegen::cpu::lower::tuning::tunable`]: MatMul/Gemm and
//! Conv contractions with their fused epilogues) becomes a [`ModelTask`] — identical kernels
//! are tuned once. Each candidate schedule is compiled and measured in a child process
//! (`kiln tune-worker`, see [`worker_main`]) so that a kernel that crashes or hangs is
//! recorded as such and the tuner goes on: candidates of a batch are compiled in parallel,
//! then measured one at a time (warm-up, repeated runs until `min_time`, median), each
//! checked against the reference interpreter on the same random inputs. The search itself
//! (evolutionary, cost-model guided, resumable) is [`kiln_tune::Tuner`].

use crate::compile::{compile_graph, kernel_graph, CompileOptions};
use crate::pipeline;
use anyhow::{bail, Context, Result};
use kiln_codegen::cpu::lower::tuning::{tunable_for, Tunable};
use kiln_ir::Graph;
use kiln_tune::{Config, Measurer, Outcome, Space, Task, TuningDb, Workload};
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The version records are keyed by: records of other versions are kept but not used.
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One tunable kernel of a model, as a standalone graph that can be compiled alone.
#[derive(Debug, Clone)]
pub struct ModelTask {
    /// Workload, space and default schedule.
    pub tunable: Tunable,
    /// The kernel's nodes as a graph (constants kept, so weights are packed as in the model).
    pub graph: Graph,
    /// How many kernels of the model share this workload.
    pub occurrences: usize,
}

impl Task for ModelTask {
    fn workload(&self) -> &Workload {
        &self.tunable.workload
    }
    fn space(&self) -> &Space {
        &self.tunable.space
    }
    fn check(&self, c: &Config) -> Result<(), String> {
        self.tunable.check(c)
    }
    fn default_config(&self) -> Config {
        self.tunable.default.clone()
    }
}

/// The tuning-database target of CPU code generated for LLVM CPU `cpu` on this machine:
/// `cpu:<llvm cpu>@<processor model>` (records of one processor do not apply to another).
pub fn cpu_target(cpu: &str) -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("cpu:{cpu}@{model}")
}

/// The tunable kernels of `model` planned with `opts` (shapes, opt level), identical
/// workloads merged.
pub fn model_tasks(model: &Path, opts: &CompileOptions) -> Result<Vec<ModelTask>> {
    let g = kiln_ir::onnx::load(model)?;
    let popts = pipeline::Options {
        shapes: opts.shapes.clone(),
        print_after: Vec::new(),
        opt_level: opts.opt_level,
        measured_us: opts.measured_us.clone(),
        device: None,
        eqsat_limits: opts.eqsat_limits.clone(),
    };
    let planned = pipeline::plan_graph(g, &popts, |_, _| {})?;
    let (g, p) = (&planned.graph, &planned.partition);
    let mut tasks: Vec<ModelTask> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for k in &p.kernels {
        let Some(t) = tunable_for(g, k, kiln_codegen::cpu::cpu_lanes(&opts.cpu)) else {
            continue;
        };
        let fp = t.workload.fingerprint();
        if let Some(&i) = seen.get(&fp) {
            tasks[i].occurrences += 1;
            continue;
        }
        let (graph, _, _) = kernel_graph(g, k, usize::MAX)?;
        seen.insert(fp, tasks.len());
        tasks.push(ModelTask {
            tunable: t,
            graph,
            occurrences: 1,
        });
    }
    Ok(tasks)
}

/// Splits `total` trials over tasks in proportion to their work (MACs × occurrences), at
/// least `min` each.
pub fn allocate_trials(tasks: &[ModelTask], total: usize, min: usize) -> Vec<usize> {
    let w: Vec<f64> = tasks
        .iter()
        .map(|t| (t.tunable.macs.max(1) as f64 * t.occurrences as f64).sqrt())
        .collect();
    let sum: f64 = w.iter().sum::<f64>().max(1e-9);
    w.iter()
        .map(|x| ((total as f64 * x / sum).round() as usize).max(min))
        .collect()
}

/// Measures candidates in `kiln tune-worker` child processes (see the module doc).
pub struct WorkerMeasurer {
    /// The `kiln` executable.
    pub exe: PathBuf,
    /// LLVM CPU name the kernels are compiled for.
    pub cpu: String,
    /// Threads the kernel runs on while measured.
    pub threads: usize,
    /// A candidate's compilation or measurement taking longer is recorded as a timeout.
    pub timeout: Duration,
    /// Minimum measuring time per candidate, in seconds.
    pub min_time: f64,
    /// Compiles candidates in parallel (one thread per core).
    compile_pool: rayon::ThreadPool,
    dir: tempfile::TempDir,
}

impl WorkerMeasurer {
    /// A measurer running `exe tune-worker`.
    pub fn new(exe: PathBuf, cpu: &str, threads: usize) -> Result<Self> {
        Ok(Self {
            exe,
            cpu: cpu.to_string(),
            threads,
            timeout: Duration::from_secs(60),
            min_time: 0.05,
            compile_pool: rayon::ThreadPoolBuilder::new()
                .build()
                .context("starting the compile threads")?,
            dir: tempfile::tempdir().context("creating a scratch directory for candidates")?,
        })
    }

    fn graph_file(&self, task: &dyn Task, graph: &Graph) -> Result<PathBuf> {
        let p = self
            .dir
            .path()
            .join(format!("task_{}.json", task.workload().fingerprint()));
        if !p.exists() {
            std::fs::write(&p, serde_json::to_vec(graph)?)?;
        }
        Ok(p)
    }

    fn measure_task(&self, task: &ModelTask, configs: &[Config]) -> Result<Vec<Outcome>> {
        let graph = self.graph_file(task, &task.graph)?;
        let workload = task.workload().fingerprint();
        let compiled: Vec<Result<PathBuf, Outcome>> = self.compile_pool.install(|| {
            configs
                .par_iter()
                .enumerate()
                .map(|(i, c)| {
                    let out = self.dir.path().join(format!("cand_{i}.kiln"));
                    let mut cmd = Command::new(&self.exe);
                    cmd.arg("tune-worker")
                        .arg("compile")
                        .arg(&graph)
                        .arg(serde_json::to_string(c).expect("config serializes"))
                        .arg(&out)
                        .args(["--cpu", &self.cpu, "--workload", &workload]);
                    match run_child(cmd, self.timeout) {
                        Outcome::Ok { .. } => Ok(out),
                        other => Err(other),
                    }
                })
                .collect()
        });
        Ok(compiled
            .into_iter()
            .map(|r| match r {
                Err(o) => o,
                Ok(artifact) => {
                    let mut cmd = Command::new(&self.exe);
                    cmd.arg("tune-worker")
                        .arg("measure")
                        .arg(&graph)
                        .arg(&artifact)
                        .args(["--threads", &self.threads.to_string()])
                        .args(["--min-time", &self.min_time.to_string()]);
                    let o = run_child(cmd, self.timeout);
                    let _ = std::fs::remove_file(&artifact);
                    o
                }
            })
            .collect())
    }
}

/// Tasks given to [`WorkerMeasurer`] must be [`ModelTask`]s; this finds one by fingerprint.
pub struct ModelMeasurer<'a> {
    /// The tasks being tuned.
    pub tasks: &'a [ModelTask],
    /// The measurer.
    pub inner: &'a WorkerMeasurer,
}

impl Measurer for ModelMeasurer<'_> {
    fn measure(&mut self, task: &dyn Task, configs: &[Config]) -> Vec<Outcome> {
        let fp = task.workload().fingerprint();
        let Some(t) = self
            .tasks
            .iter()
            .find(|t| t.tunable.workload.fingerprint() == fp)
        else {
            return configs
                .iter()
                .map(|_| Outcome::Invalid {
                    msg: "unknown task".into(),
                })
                .collect();
        };
        match self.inner.measure_task(t, configs) {
            Ok(o) => o,
            Err(e) => configs
                .iter()
                .map(|_| Outcome::Invalid {
                    msg: format!("{e:#}"),
                })
                .collect(),
        }
    }
}

/// Runs a worker command: its last stdout line is an [`Outcome`] (JSON); death by signal or
/// a non-zero exit is a crash, running past `timeout` a timeout (the child is killed).
fn run_child(mut cmd: Command, timeout: Duration) -> Outcome {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Invalid {
                msg: format!("cannot start the worker: {e}"),
            }
        }
    };
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                return Outcome::Crash {
                    msg: format!("waiting for the worker: {e}"),
                }
            }
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let Some(status) = status else {
        return Outcome::Timeout {
            limit_s: timeout.as_secs_f64(),
        };
    };
    if !status.success() {
        let tail: String = err.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        return Outcome::Crash {
            msg: format!("worker {status}: {tail}"),
        };
    }
    match out.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) => serde_json::from_str(l).unwrap_or_else(|e| Outcome::Crash {
            msg: format!("worker printed no outcome ({e}): {l}"),
        }),
        None => Outcome::Crash {
            msg: "worker printed nothing".into(),
        },
    }
}

/// `kiln tune-worker compile GRAPH CONFIG OUT --cpu CPU --workload FINGERPRINT` and
/// `kiln tune-worker measure GRAPH ARTIFACT --threads N --min-time S`: prints one
/// [`Outcome`] as JSON (compile: `ok` with the compile time; measure: the median latency, or
/// `wrong` if the outputs differ from the reference interpreter's).
pub fn worker_main(args: &[String]) -> Result<Outcome> {
    let flag = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let load_graph = |p: &str| -> Result<Graph> {
        serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {p}"))?)
            .with_context(|| format!("{p}: not a kernel graph"))
    };
    match args {
        [mode, graph, config, out, ..] if mode == "compile" => {
            let g = load_graph(graph)?;
            let config: Config = serde_json::from_str(config).context("bad config")?;
            inject_fault(&config);
            let t0 = Instant::now();
            let workload = flag("--workload").context("--workload FINGERPRINT is required")?;
            let mut schedules = HashMap::new();
            schedules.insert(workload.to_string(), config);
            let opts = CompileOptions {
                cpu: flag("--cpu").unwrap_or("x86-64-v3").to_string(),
                opt_level: Some(0),
                schedules: Arc::new(schedules),
                ..Default::default()
            };
            let (artifact, report) = match compile_graph(&g, graph, &opts, |_, _| {}) {
                Ok(r) => r,
                Err(e) => {
                    return Ok(Outcome::Invalid {
                        msg: format!("compile: {e:#}"),
                    })
                }
            };
            if report.tuned != 1 {
                return Ok(Outcome::Invalid {
                    msg: format!(
                        "the kernel was not reproduced alone ({} tuned kernels)",
                        report.tuned
                    ),
                });
            }
            artifact.save(Path::new(out))?;
            Ok(Outcome::Ok {
                seconds: t0.elapsed().as_secs_f64(),
            })
        }
        [mode, graph, artifact, ..] if mode == "measure" => {
            let g = load_graph(graph)?;
            let threads: usize = flag("--threads").unwrap_or("1").parse()?;
            let min_time: f64 = flag("--min-time").unwrap_or("0.05").parse()?;
            measure(&g, Path::new(artifact), threads, min_time)
        }
        _ => bail!(
            "usage: kiln tune-worker compile GRAPH CONFIG OUT --cpu CPU --workload FP | \
             measure GRAPH ARTIFACT --threads N --min-time S"
        ),
    }
}

/// Test hook: with `KILN_TUNE_INJECT=crash:PARAM=VALUE` (or `hang:...`) in the environment,
/// the worker aborts (or sleeps forever) on candidates whose `PARAM` is `VALUE` — how the
/// tests check that a crashing or hanging candidate is recorded and tuning goes on.
fn inject_fault(config: &Config) {
    let Ok(spec) = std::env::var("KILN_TUNE_INJECT") else {
        return;
    };
    let Some((fault, cond)) = spec.split_once(':') else {
        return;
    };
    let Some((param, value)) = cond.split_once('=') else {
        return;
    };
    if config.get(param).map(|v| v.to_string()).as_deref() != Some(value) {
        return;
    }
    match fault {
        "crash" => std::process::abort(),
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        _ => {}
    }
}

/// Runs `artifact` (compiled from `g`) on random inputs: checks its outputs against the
/// reference interpreter, then times it (median of runs over at least `min_time` s).
fn measure(g: &Graph, artifact: &Path, threads: usize, min_time: f64) -> Result<Outcome> {
    let inputs = crate::random_inputs(g, 1)?;
    let expected = kiln_ir::interp::run(g, &inputs)?;
    let mut session = crate::Session::load(artifact)?;
    session.set_threads(threads);
    let bufs = crate::io::runtime_buffers(&inputs);
    let views = crate::io::tensor_views(&inputs, &bufs);
    let outs = session.run(&views)?;
    for (k, (o, e)) in outs.iter().zip(&expected).enumerate() {
        let o = crate::io::graph_tensor(o)?;
        if let Err(m) = o.check_close(e, 1e-3, 1e-5) {
            return Ok(Outcome::Wrong {
                msg: format!("output {k}: {m}"),
            });
        }
    }
    let mut out_bufs: Vec<kiln_runtime::AlignedBuf> = outs
        .iter()
        .map(|t| kiln_runtime::AlignedBuf::zeroed(t.data.len()))
        .collect();
    let mut run = || -> Result<f64> {
        let mut o: Vec<&mut [u8]> = out_bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        let t = Instant::now();
        session.run_into(&views, &mut o)?;
        Ok(t.elapsed().as_secs_f64())
    };
    for _ in 0..3 {
        run()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed().as_secs_f64() < min_time && times.len() < 100_000) {
        times.push(run()?);
    }
    times.sort_by(f64::total_cmp);
    Ok(Outcome::Ok {
        seconds: times[times.len() / 2],
    })
}

/// A tuned schedule replaces the default only if it measured at least this much faster
/// (kernel timings at the microsecond scale have a few percent of noise; a "winner" within
/// it may well be slower in the model).
pub const MIN_GAIN: f64 = 0.03;

/// The tuned schedules for `target` in the database at `db`, by workload fingerprint — the
/// fastest record of each workload, where it beats the default schedule's fastest record by
/// [`MIN_GAIN`] (or the default was never measured) — and the measured op times for the
/// eqsat cost model (see [`kiln_passes::eqsat::cost::measured_table`]).
pub fn load_schedules(db: &Path, target: &str) -> Result<TunedSchedules> {
    let db = TuningDb::open(db)?;
    let gpu_sku = target
        .starts_with("cuda:")
        .then(|| crate::gpu_compile::resolve_sku(target))
        .transpose()?;
    // (best record, fastest default) per workload
    let mut per: HashMap<String, (kiln_tune::Record, Option<f64>)> = HashMap::new();
    for r in db.ok_records(target, KILN_VERSION)? {
        let Some(s) = r.outcome.seconds() else {
            continue;
        };
        let default = match gpu_sku {
            // GPU workloads: the default depends on the shapes and the SKU.
            Some(sku) if r.kind.starts_with("gpu_") => {
                kiln_codegen::gpu::tuning::GpuTunable::from_description(&r.description, sku)
                    .map(|t| t.default)
            }
            // CPU workloads: the default follows the target's vector registers
            _ => {
                let cpu = target
                    .strip_prefix("cpu:")
                    .and_then(|t| t.split('@').next())
                    .unwrap_or("x86-64-v3");
                kiln_codegen::cpu::lower::tuning::default_config_for(
                    &r.kind,
                    kiln_codegen::cpu::cpu_lanes(cpu),
                )
            }
        };
        let is_default = default.as_ref() == Some(&r.config);
        let e = per
            .entry(r.workload.clone())
            .or_insert_with(|| (r.clone(), None));
        if is_default {
            e.1 = Some(e.1.map_or(s, |d: f64| d.min(s)));
        }
        if s < e.0.outcome.seconds().unwrap_or(f64::INFINITY) {
            e.0 = r;
        }
    }
    let measured = kiln_passes::eqsat::cost::measured_table(
        per.values()
            .filter_map(|(r, _)| Some((r.description.as_str(), r.outcome.seconds()?))),
    );
    let schedules = per
        .into_iter()
        .filter(|(_, (best, default))| {
            let b = best.outcome.seconds().unwrap_or(f64::INFINITY);
            default.is_none_or(|d| b <= d * (1.0 - MIN_GAIN))
        })
        .map(|(k, (best, _))| (k, best.config))
        .collect();
    Ok(TunedSchedules {
        schedules,
        measured_us: measured,
    })
}

/// What a tuning database gives the compiler (see [`load_schedules`]).
#[derive(Debug, Clone, Default)]
pub struct TunedSchedules {
    /// Best schedule by workload fingerprint.
    pub schedules: HashMap<String, Config>,
    /// Measured µs by op signature.
    pub measured_us: HashMap<String, f64>,
}

impl TunedSchedules {
    /// Sets these as `opts`' schedules and measured times.
    pub fn apply(self, opts: &mut CompileOptions) {
        opts.schedules = Arc::new(self.schedules);
        opts.measured_us = Arc::new(self.measured_us);
    }
}

/// Settings of [`tune_model`] (`kiln tune`).
#[derive(Debug, Clone)]
pub struct TuneSettings {
    /// Shapes, opt level and LLVM CPU, as for `kiln compile`.
    pub compile: CompileOptions,
    /// The tuning database.
    pub db: PathBuf,
    /// New measurements to make over all tasks.
    pub trials: usize,
    /// Threads each kernel runs on while measured.
    pub threads: usize,
    /// Per-candidate compile and measure time limit.
    pub timeout: Duration,
    /// Minimum measuring time per candidate, in seconds.
    pub min_time: f64,
    /// The `kiln` executable that runs `tune-worker`.
    pub exe: PathBuf,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// The outcome of tuning one task.
#[derive(Debug, Clone)]
pub struct TaskSummary {
    /// The kernel's short label.
    pub workload: String,
    /// Kernels of the model with this workload.
    pub occurrences: usize,
    /// Latency with the default schedule.
    pub default_seconds: Option<f64>,
    /// Best latency known and its schedule.
    pub best: Option<(Config, f64)>,
    /// Measurements made in this run, and how many failed.
    pub measured: usize,
    /// Failed measurements in this run.
    pub failed: usize,
}

/// Tunes every tunable kernel of `model` (see the module doc); stops early and keeps every
/// measurement if killed. Returns one summary per task.
pub fn tune_model(model: &Path, s: &TuneSettings) -> Result<Vec<TaskSummary>> {
    let tasks = model_tasks(model, &s.compile)?;
    if tasks.is_empty() {
        bail!(
            "{}: no tunable kernels (MatMul/Gemm/Conv on f32 with static shapes)",
            model.display()
        );
    }
    let db = TuningDb::open(&s.db)?;
    let target = cpu_target(&s.compile.cpu);
    let mut tuner = kiln_tune::Tuner::new(&db, &target, KILN_VERSION);
    let mut measurer = WorkerMeasurer::new(s.exe.clone(), &s.compile.cpu, s.threads)?;
    measurer.timeout = s.timeout;
    measurer.min_time = s.min_time;
    let budget = allocate_trials(&tasks, s.trials, 4.min(s.trials));
    let total: usize = budget.iter().sum();
    let bar = if s.progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} trials, eta {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut out = Vec::new();
    let mut base = 0u64;
    for (i, (task, trials)) in tasks.iter().zip(&budget).enumerate() {
        let opts = kiln_tune::TuneOptions {
            trials: *trials,
            ..Default::default()
        };
        let mut m = ModelMeasurer {
            tasks: &tasks,
            inner: &measurer,
        };
        let n = tasks.len();
        let r = tuner.tune(task, &mut m, &opts, &mut |p| {
            bar.set_position(base + p.done as u64);
            let us = |x: Option<f64>| x.map(|s| format!("{:.1}", s * 1e6)).unwrap_or("-".into());
            bar.set_message(format!(
                "task {}/{n}: best {} us (default {} us)",
                i + 1,
                us(p.best_seconds),
                us(p.default_seconds)
            ));
        })?;
        base += *trials as u64;
        out.push(TaskSummary {
            workload: task.tunable.label.clone(),
            occurrences: task.occurrences,
            default_seconds: r.default_seconds,
            best: r.best,
            measured: r.measured,
            failed: r.failed,
        });
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Opens a tuning database that must exist already (for export), naming it if not.
pub fn open_existing_db(path: &Path) -> Result<TuningDb> {
    if !path.exists() {
        bail!("tuning database {} does not exist", path.display());
    }
    Ok(TuningDb::open(path)?)
}
