//! The `kiln` command line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln::ir::{interp, Tensor};
use std::path::{Path, PathBuf};

/// Kiln: a deep learning compiler for ONNX models.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a model's opset, inputs/outputs, op histogram and parameter count.
    Inspect {
        /// The ONNX model.
        model: PathBuf,
        /// Also write the graph in Graphviz format to this file.
        #[arg(long)]
        dot: Option<PathBuf>,
        /// Also print the IR in Kiln's text form.
        #[arg(long)]
        ir: bool,
    },
    /// Run the graph-level compile pipeline (simplify, specialize, unroll, decompose, fold, fusion, memory plan)
    /// and print the kernels and the arena size. Code generation comes after these stages.
    Plan {
        /// The ONNX model.
        model: PathBuf,
        /// Fix an input's shape: NAME=1x3x224x224 (symbolic dims default to 1).
        #[arg(long = "shape", value_name = "NAME=DIMS")]
        shapes: Vec<String>,
        /// Print the IR after this stage (import, simplify, specialize, unroll, decompose, fold, eqsat, fusion, memory,
        /// or all); may be repeated.
        #[arg(long = "print-after", value_name = "STAGE")]
        print_after: Vec<String>,
        /// Optimisation level: -O0 (no eqsat), -O1, -O2 (default), -O3 (longer search).
        #[arg(short = 'O', value_name = "LEVEL")]
        opt_level: Option<u8>,
        #[command(flatten)]
        eqsat: EqsatArgs,
        /// Search a parallel plan for this cluster file (docs/parallel.md) and print it
        /// beside the best pure data-parallel and tensor-parallel plans.
        #[arg(long, value_name = "FILE")]
        cluster: Option<PathBuf>,
        /// With --cluster: the batch size (axis 0 of every input).
        #[arg(long, value_name = "N", requires = "cluster")]
        batch: Option<usize>,
        /// With --cluster: print the plan report as JSON.
        #[arg(long, requires = "cluster")]
        json: bool,
        /// With --cluster: minimise the latency of one batch instead of maximising the
        /// throughput of a stream of batches.
        #[arg(long, requires = "cluster")]
        latency: bool,
    },
    /// Run a model with the reference interpreter.
    Eval {
        /// The ONNX model.
        model: PathBuf,
        /// An input as NAME=FILE (.npy or .pb); inputs not given are random.
        #[arg(long = "input", value_name = "NAME=FILE")]
        inputs: Vec<String>,
        /// A test data folder (input_K.pb / output_K.pb): take inputs from it and check the
        /// outputs against its expected outputs.
        #[arg(long, value_name = "DIR")]
        check: Option<PathBuf>,
        /// Write the outputs here (.npz, or .npy for one output).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Seed for random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Compile a model into a deployable artifact (execution plan, weights, kernel library).
    /// Only models whose kernels can all be lowered to code compile today.
    Compile {
        /// The ONNX model.
        model: PathBuf,
        /// Target: cpu (x86-64-v3), cpu:x86-64-v3, cpu:x86-64-v4, cpu:native, ...
        #[arg(long, default_value = "cpu")]
        target: String,
        /// The artifact to write (default: the model path with extension .kiln).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Fix an input's shape: NAME=1x3x224x224 (symbolic dims default to 1).
        #[arg(long = "shape", value_name = "NAME=DIMS")]
        shapes: Vec<String>,
        /// Print the IR after this stage (import, simplify, specialize, unroll, decompose, fold, eqsat, fusion, memory,
        /// or all); may be repeated.
        #[arg(long = "print-after", value_name = "STAGE")]
        print_after: Vec<String>,
        /// Accept any batch size 1..=N at run time for inputs whose first dim is symbolic
        /// (one static specialisation per size in the artifact).
        #[arg(long, value_name = "N")]
        max_batch: Option<usize>,
        /// Explain a stage: `rewrites` prints the eqsat report (rules applied, cost).
        #[arg(long, value_name = "WHAT")]
        explain: Option<String>,
        /// Optimisation level: -O0 (no eqsat), -O1, -O2 (default), -O3 (longer search).
        #[arg(short = 'O', value_name = "LEVEL")]
        opt_level: Option<u8>,
        #[command(flatten)]
        eqsat: EqsatArgs,
        /// Fail instead of running kernels that have no compiled code yet on the reference
        /// interpreter.
        #[arg(long)]
        no_reference_kernels: bool,
        /// Use the best schedules of this tuning database (written by `kiln tune`).
        #[arg(long, value_name = "FILE")]
        db: Option<PathBuf>,
        /// cuda targets: what MatMul/Gemm compute on: f32 (default), tf32, f16 or bf16
        /// (tensor cores, f32 accumulation; other ops stay f32).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Shard the model over N ranks (CPU, or every rank on `--target cuda:SKU`; one
        /// artifact with every rank's program; run with `mpirun -n N kiln run`); the plan is
        /// a FLOP-balanced pipeline unless --plan.
        #[arg(long, value_name = "N")]
        ranks: Option<usize>,
        /// Shard the model with this parallel plan (JSON `ParallelPlan` over the graph of
        /// `kiln plan -O0`).
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
        /// Shard the model over the ranks (CPU cores or GPUs) of this cluster file with the
        /// plan search (lowest predicted latency); run with `mpirun -n <devices> kiln run`.
        #[arg(long, value_name = "FILE")]
        cluster: Option<PathBuf>,
        /// With --ranks: `pipeline` (default), `tensor` (Megatron splits) or `data` parallel.
        #[arg(long, value_name = "MODE", default_value = "pipeline")]
        mode: String,
    },
    /// Autotune the model's MatMul/Gemm/Conv kernels on this machine, recording every
    /// measurement in a tuning database (stop and resume at will; `kiln compile --db` uses it).
    Tune {
        /// The ONNX model.
        model: PathBuf,
        /// Target: cpu (x86-64-v3), cpu:NAME, or cuda:SKU (GPU kernels: measured here if a
        /// GPU is present, else written as a bundle with --export).
        #[arg(long, default_value = "cpu")]
        target: String,
        /// Measurements to make in this run, over all kernels.
        #[arg(long, default_value_t = 200)]
        trials: usize,
        /// The tuning database (created if missing).
        #[arg(long, default_value = "tuning.db")]
        db: PathBuf,
        /// Fix an input's shape: NAME=DIMS.
        #[arg(long = "shape", value_name = "NAME=DIMS")]
        shapes: Vec<String>,
        /// Optimisation level of the graph passes (as for compile).
        #[arg(short = 'O', value_name = "LEVEL")]
        opt_level: Option<u8>,
        /// Threads each kernel runs on while measured.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Seconds after which a candidate's compilation or run counts as hung.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Minimum measuring time per candidate, in seconds.
        #[arg(long, default_value_t = 0.05)]
        min_time: f64,
        /// cuda targets: the precision MatMul/Gemm are compiled at (f32, tf32, f16, bf16).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// cuda targets: write a bundle of candidates (PTX, launches, inputs, expected
        /// outputs) to DIR for the runtime-only `gpu_measure` on a GPU machine, instead of
        /// measuring here.
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
        /// cuda targets: candidates per kernel in a bundle (per round when measuring here).
        #[arg(long, default_value_t = 8)]
        candidates: usize,
    },
    /// Tuning database records: export as JSON lines, import them on another machine.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// (internal) compiles or measures one tuning candidate; used by `kiln tune`.
    #[command(hide = true)]
    TuneWorker {
        /// Worker arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a compiled artifact (MODEL.kiln) with the runtime.
    Run {
        /// The artifact (MODEL.kiln), or an ONNX model, compiled in-process first.
        artifact: PathBuf,
        /// For an ONNX model: fix an input's shape, NAME=DIMS (default: the shapes of the
        /// --check inputs, else symbolic dims as 1).
        #[arg(long = "shape", value_name = "NAME=DIMS")]
        shapes: Vec<String>,
        /// An input as NAME=FILE (.npy or .pb); inputs not given are random.
        #[arg(long = "input", value_name = "NAME=FILE")]
        inputs: Vec<String>,
        /// A test data folder (input_K.pb / output_K.pb): take inputs from it and check the
        /// outputs against its expected outputs.
        #[arg(long, value_name = "DIR")]
        check: Option<PathBuf>,
        /// Write the outputs here (.npz, or .npy for one output).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Run this many more times and print the mean latency.
        #[arg(long)]
        repeat: Option<usize>,
        /// Seed for random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Run this many times and print the time per kernel, slowest first (a cuda
        /// artifact: device time per kernel entry, CUDA events around each launch).
        #[arg(long, value_name = "N")]
        profile: Option<usize>,
        /// Threads to run on (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// cuda artifacts: run even if the GPU present is not the SKU the artifact was
        /// compiled for (a warning instead of an error).
        #[arg(long)]
        allow_sku_mismatch: bool,
    },
    /// Time a model with Kiln and onnxruntime side by side (interleaved rounds): p50/p90/p99/
    /// min/mean, their ratio, a roofline line and peak memory. See `kiln::bench`.
    Bench(BenchArgs),
}

/// `kiln db` actions.
#[derive(Subcommand)]
enum DbAction {
    /// Write every record as one JSON object per line.
    Export {
        /// The tuning database.
        #[arg(long, default_value = "tuning.db")]
        db: PathBuf,
        /// The JSON-lines file to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Add the records of a JSON-lines file (records already present are skipped).
    Import {
        /// The JSON-lines file.
        input: PathBuf,
        /// The tuning database (created if missing).
        #[arg(long, default_value = "tuning.db")]
        db: PathBuf,
    },
}

/// Arguments of `kiln bench`.
/// Overrides of the `-O` level's eqsat search limits (`compile`, `plan`).
#[derive(clap::Args)]
struct EqsatArgs {
    /// Maximum eqsat saturation iterations (default: the -O level's, 4 / 8 / 16 at
    /// -O1 / -O2 / -O3).
    #[arg(long, value_name = "N")]
    eqsat_iters: Option<usize>,
    /// Maximum e-graph nodes (default 20000; 60000 at -O3).
    #[arg(long, value_name = "N")]
    eqsat_nodes: Option<usize>,
    /// Maximum saturation seconds (default 3; 8 at -O3).
    #[arg(long, value_name = "SECS")]
    eqsat_time: Option<f64>,
    /// Extractor: greedy, dag (DAG-aware local search, the -O2 default) or ilp (the -O3
    /// default); a time-out falls back to the greedy result.
    #[arg(long, value_name = "KIND")]
    extractor: Option<String>,
}

impl EqsatArgs {
    /// The limits, checked.
    fn limits(&self) -> Result<kiln::pipeline::EqsatLimits> {
        let time_limit = match self.eqsat_time {
            Some(s) => Some(
                std::time::Duration::try_from_secs_f64(s)
                    .map_err(|e| anyhow::anyhow!("--eqsat-time {s:?}: {e}"))?,
            ),
            None => None,
        };
        let extractor = match &self.extractor {
            Some(k) => Some(k.parse().map_err(|e| anyhow::anyhow!("--extractor: {e}"))?),
            None => None,
        };
        Ok(kiln::pipeline::EqsatLimits {
            iter_limit: self.eqsat_iters,
            node_limit: self.eqsat_nodes,
            time_limit,
            extractor,
        })
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The ONNX model (compiled in-process) or a compiled .kiln artifact.
    model: PathBuf,
    /// Fix an input's shape when compiling: NAME=1x3x224x224.
    #[arg(long = "shape", value_name = "NAME=DIMS")]
    shapes: Vec<String>,
    /// Thread counts, comma-separated: one table each.
    #[arg(long, default_value = "1", value_name = "N,N...")]
    threads: String,
    /// Timed runs per runtime and thread count.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Warm-up runs per runtime and thread count.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Interleaved rounds the timed runs are split into.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Runtime to compare with: onnxruntime, or none.
    #[arg(long, default_value = "onnxruntime")]
    compare: String,
    /// An input as NAME=FILE (.npy or .pb).
    #[arg(long = "input", value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Test data folder for inputs and expected outputs (default: test_data_set_0 next to
    /// the model, if its inputs fit).
    #[arg(long, value_name = "DIR")]
    check: Option<PathBuf>,
    /// Seed for random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Compile with the best schedules of this tuning database (written by `kiln tune`).
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// CPU target of an ONNX model: cpu:native (default: this machine's vector ISA, as
    /// onnxruntime uses), cpu (x86-64-v3), cpu:NAME.
    #[arg(long, default_value = "cpu:native")]
    target: String,
}

fn main() {
    // `kiln ... | head`: end quietly when the reader goes away, as other Unix tools do,
    // instead of panicking in `println!` on the broken pipe.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { model, dot, ir } => {
            let g = kiln::load_model(&model)?;
            print!("{}", kiln::inspect::summary(&g));
            if ir {
                print!("{}", kiln::ir::printer::to_text(&g));
            }
            if let Some(dot) = dot {
                kiln::io::write_atomic(&dot, kiln::inspect::to_dot(&g).as_bytes())?;
                println!("wrote {}", dot.display());
            }
            Ok(())
        }
        Cmd::Plan {
            model,
            shapes,
            print_after,
            opt_level,
            eqsat,
            cluster,
            batch,
            json,
            latency,
        } => {
            let mut opts = kiln::pipeline::Options {
                print_after,
                opt_level,
                eqsat_limits: eqsat.limits()?,
                ..Default::default()
            };
            for s in &shapes {
                let (name, dims) = kiln::pipeline::parse_shape(s)?;
                opts.shapes.insert(name, dims);
            }
            if let Some(c) = cluster {
                use kiln::passes::parallel::search::Objective;
                let objective = if latency {
                    Objective::Latency
                } else {
                    Objective::Throughput
                };
                return kiln::parallel_plan::plan_command(&model, &c, batch, opts, objective, json);
            }
            let t0 = std::time::Instant::now();
            let p = kiln::pipeline::plan(&model, &opts, |stage, text| {
                println!("// ----- IR after {stage} -----\n{text}");
            })?;
            println!("{}", p.partition.summary(&p.graph));
            println!("{}", p.memory.summary());
            println!("planned in {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
            Ok(())
        }
        Cmd::Eval {
            model,
            inputs,
            check,
            output,
            seed,
        } => eval(&model, &inputs, check.as_deref(), output.as_deref(), seed),
        Cmd::Compile {
            model,
            target,
            output,
            shapes,
            mut print_after,
            max_batch,
            explain,
            opt_level,
            eqsat,
            no_reference_kernels,
            db,
            precision,
            ranks,
            plan,
            cluster,
            mode,
        } => {
            let eqsat_limits = eqsat.limits()?;
            if ranks.is_some() || plan.is_some() || cluster.is_some() {
                if !eqsat_limits.is_empty() {
                    bail!("--eqsat-iters/--eqsat-nodes/--eqsat-time/--extractor are not supported with --ranks/--plan/--cluster yet (the plan search sets its own)");
                }
                return compile_sharded(
                    &model,
                    output,
                    &shapes,
                    (opt_level, &target, &precision),
                    (ranks, &mode),
                    (plan.as_deref(), cluster),
                );
            }
            let explain = match explain.as_deref() {
                None => false,
                Some("rewrites") => true,
                Some(w) => bail!("--explain {w}: expected 'rewrites'"),
            };
            if explain {
                print_after.push("eqsat".into());
            }
            let mut compiler = kiln::Compiler::new()
                .target(&target)
                .with_context(|| format!("--target '{target}'"))?
                .reference_kernels(!no_reference_kernels)
                .precision(&precision)?;
            if let Some(db) = &db {
                compiler = compiler.tuning_db(db)?;
            }
            if let Some(n) = max_batch {
                compiler = compiler.max_batch(n);
            }
            if let Some(o) = opt_level {
                compiler = compiler.opt_level(o);
            }
            compiler = compiler.eqsat_limits(eqsat_limits);
            for stage in print_after {
                compiler = compiler.print_after(stage);
            }
            for s in &shapes {
                compiler = compiler.shape_spec(s)?;
            }
            compile(&model, output, &compiler, explain)
        }
        Cmd::Run {
            artifact,
            shapes,
            inputs,
            check,
            output,
            repeat,
            seed,
            profile,
            threads,
            allow_sku_mismatch,
        } => {
            if artifact.extension().is_none_or(|e| e != "onnx") {
                let art = kiln::runtime::Artifact::load(&artifact)?;
                if art.plan.cluster.is_some() {
                    return run_sharded(
                        &artifact,
                        &art,
                        &inputs,
                        check.as_deref(),
                        output.as_deref(),
                        (repeat, seed),
                    );
                }
                if art.target.starts_with("cuda:") {
                    if output.is_some() || !inputs.is_empty() {
                        bail!("--output and --input are not supported for cuda artifacts yet");
                    }
                    return run_gpu(
                        &artifact,
                        &art,
                        check.as_deref(),
                        (repeat, seed, profile),
                        allow_sku_mismatch,
                    );
                }
            }
            run_artifact(
                &artifact,
                &shapes,
                &inputs,
                check.as_deref(),
                output.as_deref(),
                (repeat, profile),
                (seed, threads),
            )
        }
        Cmd::Bench(a) => bench(a),
        Cmd::Tune {
            model,
            target,
            trials,
            db,
            shapes,
            opt_level,
            threads,
            timeout,
            min_time,
            precision,
            export,
            candidates,
        } => {
            let mut compiler = kiln::Compiler::new()
                .target(&target)
                .with_context(|| format!("--target '{target}'"))?;
            if target.starts_with("cuda:") {
                compiler = compiler.precision(&precision)?;
                if let Some(o) = opt_level {
                    compiler = compiler.opt_level(o);
                }
                for s in &shapes {
                    compiler = compiler.shape_spec(s)?;
                }
                return tune_gpu(
                    &model,
                    kiln::gpu_tune::GpuTuneSettings {
                        compile: compiler.options().clone(),
                        target,
                        db,
                        export,
                        candidates,
                        trials,
                    },
                );
            }
            if export.is_some() || precision != "f32" {
                bail!("--export and --precision are for cuda targets (--target cuda:SKU)");
            }
            if let Some(o) = opt_level {
                compiler = compiler.opt_level(o);
            }
            for s in &shapes {
                compiler = compiler.shape_spec(s)?;
            }
            tune(
                &model,
                compiler.options().clone(),
                trials,
                db,
                threads,
                timeout,
                min_time,
            )
        }
        Cmd::Db { action } => match action {
            DbAction::Export { db, output } => {
                let d = kiln::tune::open_existing_db(&db)?;
                let mut buf = Vec::new();
                let n = d.export_jsonl(&mut buf, &output.display().to_string())?;
                kiln::io::write_atomic(&output, &buf)?;
                println!("exported {n} records to {}", output.display());
                Ok(())
            }
            DbAction::Import { input, db } => {
                let mut d = kiln_tune::TuningDb::open(&db)?;
                let f = std::fs::File::open(&input)
                    .with_context(|| format!("opening {}", input.display()))?;
                let (read, added) = d.import_jsonl(
                    &mut std::io::BufReader::new(f),
                    &input.display().to_string(),
                )?;
                println!(
                    "{}: {read} records read, {added} added to {} ({} already there)",
                    input.display(),
                    db.display(),
                    read - added
                );
                Ok(())
            }
        },
        Cmd::TuneWorker { args } => {
            let outcome = kiln::tune::worker_main(&args)?;
            println!("{}", serde_json::to_string(&outcome)?);
            Ok(())
        }
    }
}

fn tune(
    model: &Path,
    compile: kiln::compile::CompileOptions,
    trials: usize,
    db: PathBuf,
    threads: usize,
    timeout: f64,
    min_time: f64,
) -> Result<()> {
    if !(timeout > 0.0 && timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let settings = kiln::tune::TuneSettings {
        compile,
        db: db.clone(),
        trials,
        threads: threads.max(1),
        timeout: std::time::Duration::from_secs_f64(timeout),
        min_time,
        exe: std::env::current_exe().context("locating the kiln executable")?,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let t0 = std::time::Instant::now();
    let tasks = kiln::tune::tune_model(model, &settings)?;
    println!(
        "{:>10} {:>10} {:>8} {:>6}  kernel (x occurrences)",
        "default us", "tuned us", "speed-up", "trials"
    );
    let (mut before, mut after) = (0.0, 0.0);
    for t in &tasks {
        let d = t.default_seconds;
        let b = t.best.as_ref().map(|(_, s)| *s);
        if let (Some(d), Some(b)) = (d, b) {
            before += d * t.occurrences as f64;
            after += b.min(d) * t.occurrences as f64;
        }
        let us = |x: Option<f64>| x.map(|s| format!("{:.1}", s * 1e6)).unwrap_or("-".into());
        let desc: String = t.workload.chars().take(90).collect();
        println!(
            "{:>10} {:>10} {:>7.2}x {:>6}  {desc} (x{})",
            us(d),
            us(b),
            match (d, b) {
                (Some(d), Some(b)) => d / b,
                _ => f64::NAN,
            },
            t.measured,
            t.occurrences
        );
    }
    println!(
        "sum over kernels: default {:.1} us, tuned {:.1} us ({:.2}x); {} trials in {:.0} s; \
         database {}",
        before * 1e6,
        after * 1e6,
        if after > 0.0 {
            before / after
        } else {
            f64::NAN
        },
        tasks.iter().map(|t| t.measured).sum::<usize>(),
        t0.elapsed().as_secs_f64(),
        db.display()
    );
    Ok(())
}

fn tune_gpu(model: &Path, s: kiln::gpu_tune::GpuTuneSettings) -> Result<()> {
    let t0 = std::time::Instant::now();
    let tasks = kiln::gpu_tune::tune_gpu(model, &s)?;
    let us = |x: Option<f64>| x.map(|v| format!("{:.1}", v * 1e6)).unwrap_or("-".into());
    println!(
        "{:>10} {:>10} {:>10} {:>8}  kernel (x occurrences)",
        "default us", "tuned us", "candidates", "invalid"
    );
    for t in &tasks {
        println!(
            "{:>10} {:>10} {:>10} {:>8}  {} (x{})",
            us(t.default_seconds),
            us(t.best_seconds),
            t.candidates,
            t.invalid,
            t.workload,
            t.occurrences
        );
    }
    let n: usize = tasks.iter().map(|t| t.candidates).sum();
    match &s.export {
        Some(dir) => println!(
            "wrote a bundle of {n} candidates for {} kernels to {} in {:.0} s; measure it on \
             the GPU with `gpu_measure {}` (scripts/gpu_tune_check.sh), then `kiln db import \
             {}/results.jsonl --db {}`",
            tasks.len(),
            dir.display(),
            t0.elapsed().as_secs_f64(),
            dir.display(),
            dir.display(),
            s.db.display()
        ),
        None => println!(
            "{n} candidates measured in {:.0} s; database {}",
            t0.elapsed().as_secs_f64(),
            s.db.display()
        ),
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if !matches!(a.compare.as_str(), "onnxruntime" | "none") {
        bail!("--compare '{}': use onnxruntime or none", a.compare);
    }
    let report = kiln::bench::bench(&kiln::bench::Options {
        threads: kiln::bench::parse_threads(&a.threads)?,
        compare: a.compare == "onnxruntime",
        model: a.model,
        shapes: a.shapes,
        runs: a.runs,
        warmup: a.warmup,
        rounds: a.rounds,
        inputs: a.inputs,
        check: a.check,
        seed: a.seed,
        db: a.db,
        cpu: kiln::compile::cpu_of_target(&a.target).with_context(|| {
            format!(
                "--target '{}': kiln bench measures CPU targets (cpu, cpu:NAME)",
                a.target
            )
        })?,
    })?;
    // an error, not a panic, if stdout is closed (kiln bench ... | head)
    std::io::Write::write_all(&mut std::io::stdout(), report.to_string().as_bytes())?;
    if let Some(p) = a.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        kiln::io::write_atomic(&p, text.as_bytes())?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn compile(
    model: &Path,
    output: Option<PathBuf>,
    compiler: &kiln::Compiler,
    explain: bool,
) -> Result<()> {
    let artifact = compiler.compile_with_ir(model, |stage, text| {
        if explain && stage == "eqsat" {
            print!(
                "{}",
                text.split(kiln::pipeline::EQSAT_IR).next().unwrap_or(text)
            );
        } else {
            println!("// ----- IR after {stage} -----\n{text}");
        }
    })?;
    let out = output.unwrap_or_else(|| model.with_extension("kiln"));
    let t0 = std::time::Instant::now();
    artifact.save(&out)?;
    let mut report = artifact.report().cloned().unwrap_or_default();
    report.timings.push(("write", t0.elapsed()));
    println!("{report}");
    println!("wrote {} ({})", out.display(), artifact.target());
    Ok(())
}

fn load_check_dir(dir: &Path, n_inputs: usize) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let ins = kiln::io::read_test_set(dir, "input")?;
    if ins.len() != n_inputs {
        bail!(
            "{}: {} input files but the model has {} inputs",
            dir.display(),
            ins.len(),
            n_inputs
        );
    }
    Ok((ins, kiln::io::read_test_set(dir, "output")?))
}

/// Prints each output's dtype, shape and range.
fn print_outputs(named: &[(String, Tensor)]) {
    for (name, t) in named {
        let v = t.to_f64_vec();
        let (mn, mx) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        println!(
            "{name}: {}{:?}  min {mn:.6} max {mx:.6}",
            t.dtype(),
            t.shape()
        );
    }
}

/// Compares outputs with expected ones: fails if a shape differs or the largest absolute
/// error exceeds 1e-4 of the expected output's scale (its largest magnitude, at least 1).
fn check_outputs(named: &[(String, Tensor)], expected: &[Tensor]) -> Result<()> {
    if expected.len() != named.len() {
        bail!(
            "{} expected outputs but the model has {} outputs",
            expected.len(),
            named.len()
        );
    }
    let mut worst = 0.0f64;
    for ((name, t), e) in named.iter().zip(expected) {
        let scale = e.to_f64_vec().iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let err = t
            .to_f64_vec()
            .iter()
            .zip(e.to_f64_vec())
            .fold(0.0f64, |m, (a, b)| {
                // A NaN where the reference has a number (or the reverse) is a mismatch;
                // equal infinities are not.
                let d = if a.is_nan() || b.is_nan() {
                    if a.is_nan() && b.is_nan() {
                        0.0
                    } else {
                        f64::INFINITY
                    }
                } else if *a == b {
                    0.0
                } else {
                    (a - b).abs()
                };
                m.max(d)
            });
        let rel = err / scale;
        worst = worst.max(rel);
        println!("check {name}: max abs error {err:.3e} (relative to scale {scale:.3}: {rel:.3e})");
        if t.shape() != e.shape() {
            bail!(
                "output '{name}': shape {:?} but reference has {:?}",
                t.shape(),
                e.shape()
            );
        }
    }
    if worst > 1e-4 {
        bail!("outputs differ from the reference (relative error {worst:.3e} > 1e-4)");
    }
    println!("OK: matches the reference");
    Ok(())
}

/// `kiln run` of a `cuda:SKU` artifact: loads it on the GPU (SKU checked against the device),
/// runs random or `--check` inputs, compares with the expected outputs.
fn run_gpu(
    path: &Path,
    art: &kiln::runtime::Artifact,
    check: Option<&Path>,
    (repeat, seed, profile): (Option<usize>, u64, Option<usize>),
    allow_sku_mismatch: bool,
) -> Result<()> {
    use kiln::runtime::cuda_model::{profile_table, CudaModel};
    let mut m = CudaModel::load(art, allow_sku_mismatch)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Some(w) = &m.warning {
        eprintln!("{w}");
    }
    let plan = m.plan().clone();
    let steps = plan.gpu.as_ref().map_or(0, |g| g.steps.len());
    println!(
        "{}: {} ({}), {steps} launches, arena {} bytes",
        path.display(),
        art.target,
        art.compiler_version,
        plan.arena_bytes
    );
    let specs = plan.inputs.iter().map(|io| {
        let shape = io
            .shape
            .iter()
            .map(|d| match d {
                kiln::runtime::DimSpec::Fixed(n) => *n as usize,
                _ => 1,
            })
            .collect();
        (io.dtype, shape)
    });
    let mut inputs = kiln::random_tensors(specs, seed);
    let mut expected = None;
    if let Some(dir) = check {
        let (ins, outs) = load_check_dir(dir, plan.inputs.len())?;
        inputs = ins;
        expected = Some(outs);
    }
    let raw: Vec<Vec<u8>> = inputs
        .iter()
        .map(kiln::ir::onnx::tensor_proto::to_raw)
        .collect();
    let refs: Vec<&[u8]> = raw.iter().map(|r| r.as_slice()).collect();
    let t0 = std::time::Instant::now();
    let outs = m.run(&refs)?;
    println!(
        "first run (launches + graph capture): {:.3} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    if let Some(n) = repeat {
        let t = std::time::Instant::now();
        for _ in 0..n {
            m.run(&refs)?;
        }
        println!(
            "mean latency over {n} runs (CUDA graph): {:.3} ms",
            t.elapsed().as_secs_f64() * 1e3 / n.max(1) as f64
        );
    }
    if let Some(n) = profile.filter(|&n| n > 0) {
        let times = m.profile(&refs, n)?;
        println!("device time per kernel entry (CUDA events, median of {n} runs):");
        print!("{}", profile_table(&times, 20));
    }
    if let Some(want) = expected {
        let mut worst = 0.0f64;
        for ((io, bytes), w) in plan.outputs.iter().zip(&outs).zip(&want) {
            let got = kiln::ir::onnx::tensor_proto::from_raw(io.dtype, w.shape(), bytes)
                .map_err(|e| anyhow::anyhow!("output '{}': {e}", io.name))?;
            for (a, b) in got.to_f64_vec().iter().zip(w.to_f64_vec()) {
                worst = worst.max((a - b).abs() / b.abs().max(1.0));
            }
        }
        if worst > 1e-4 {
            bail!("MISMATCH: max relative error {worst:.3e} > 1e-4");
        }
        println!("OK: matches the reference (max relative error {worst:.3e})");
    }
    Ok(())
}

/// The inputs of a `kiln run`: random (seeded, symbolic dims taken as 1) or those of a
/// `--check` folder, with `--input NAME=FILE` replacing named ones; native-endian aligned
/// copies for the runtime; and the `--check` folder's expected outputs.
struct RunInputs {
    inputs: Vec<Tensor>,
    bufs: Vec<(kiln::runtime::DType, kiln::runtime::AlignedBuf)>,
    expected: Option<Vec<Tensor>>,
}

fn run_inputs(
    plan: &kiln::runtime::ExecPlan,
    seed: u64,
    check: Option<&Path>,
    given: &[String],
) -> Result<RunInputs> {
    use kiln::runtime::DimSpec;
    let specs = plan.inputs.iter().map(|io| {
        let shape = io
            .shape
            .iter()
            .map(|d| match d {
                DimSpec::Fixed(n) => *n as usize,
                DimSpec::Sym(_) | DimSpec::Dynamic => 1,
            })
            .collect();
        (io.dtype, shape)
    });
    let mut inputs = kiln::random_tensors(specs, seed);
    let mut expected = None;
    if let Some(dir) = check {
        let (ins, outs) = load_check_dir(dir, plan.inputs.len())?;
        inputs = ins;
        expected = Some(outs);
    }
    let names: Vec<String> = plan.inputs.iter().map(|io| io.name.clone()).collect();
    kiln::io::replace_named_inputs(&names, &mut inputs, given)?;
    let bufs = kiln::io::runtime_buffers(&inputs);
    Ok(RunInputs {
        inputs,
        bufs,
        expected,
    })
}

/// The runtime's outputs as named graph tensors, in plan order.
fn named_outputs(
    plan: &kiln::runtime::ExecPlan,
    outs: &[kiln::runtime::Tensor],
) -> Result<Vec<(String, Tensor)>> {
    plan.outputs
        .iter()
        .zip(outs)
        .map(|(io, t)| {
            let v = kiln::ir::onnx::tensor_proto::from_raw(t.dtype, &t.shape, t.data.as_slice())
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("output '{}'", io.name))?;
            Ok((io.name.clone(), v))
        })
        .collect()
}

/// Runtime views of `inputs` over their aligned copies.
fn views_of<'a>(
    inputs: &'a [Tensor],
    bufs: &'a [(kiln::runtime::DType, kiln::runtime::AlignedBuf)],
) -> Vec<kiln::runtime::TensorView<'a>> {
    inputs
        .iter()
        .zip(bufs)
        .map(|(t, (dt, b))| kiln::runtime::TensorView::new(*dt, t.shape(), b.as_slice()))
        .collect()
}

fn run_artifact(
    path: &Path,
    shapes: &[String],
    given: &[String],
    check: Option<&Path>,
    output: Option<&Path>,
    (repeat, profile): (Option<usize>, Option<usize>),
    (seed, threads): (u64, Option<usize>),
) -> Result<()> {
    use kiln::Session;
    let mut model = if path.extension().is_some_and(|e| e == "onnx") {
        // An ONNX model: compile it in-process (shapes from --shape, else the --check inputs).
        let mut c = kiln::Compiler::new();
        for s in shapes {
            c = c.shape_spec(s)?;
        }
        if let (Some(dir), true) = (check, shapes.is_empty()) {
            let g = kiln::load_model(path)?;
            let (ins, _) = load_check_dir(dir, g.inputs.len())?;
            for (&v, t) in g.inputs.iter().zip(&ins) {
                c = c.shape(g.values[v].name.clone(), t.shape().to_vec());
            }
        }
        let t0 = std::time::Instant::now();
        let art = c.compile(path)?;
        println!(
            "compiled {} in {:.0} ms",
            path.display(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        Session::new(&art)?
    } else {
        if !shapes.is_empty() {
            bail!("--shape applies to ONNX models; an artifact's shapes are fixed when compiling");
        }
        Session::load(path)?
    };
    model.set_threads(threads.unwrap_or_else(kiln::default_threads));
    let plan = model.plan().clone();
    println!(
        "{}: {} ({}), {} steps, arena {} bytes, {} thread(s)",
        path.display(),
        model.target(),
        model.compiler_version(),
        plan.steps.len(),
        plan.arena_bytes,
        model.threads()
    );
    let RunInputs {
        inputs,
        bufs,
        expected,
    } = run_inputs(&plan, seed, check, given)?;
    let views = views_of(&inputs, &bufs);
    let t0 = std::time::Instant::now();
    let outs = model.run(&views)?;
    let dt = t0.elapsed();
    let named = named_outputs(&plan, &outs)?;
    print_outputs(&named);
    println!("first run: {:.3} ms", dt.as_secs_f64() * 1e3);
    if let Some(n) = repeat.filter(|&n| n > 0) {
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            model.run(&views)?;
        }
        println!(
            "mean latency over {n} runs: {:.3} ms",
            t0.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    }
    if let Some(n) = profile.filter(|&n| n > 0) {
        let mut prof = model.profile(&views, n)?;
        let total: f64 = prof.iter().map(|(_, t)| t.as_secs_f64()).sum();
        prof.sort_by_key(|p| std::cmp::Reverse(p.1));
        println!(
            "per-kernel time over {n} runs (total {:.3} ms per run):",
            total * 1e3 / n as f64
        );
        for (name, t) in prof {
            let s = t.as_secs_f64();
            println!(
                "  {:>9.4} ms {:>5.1}%  {name}",
                s * 1e3 / n as f64,
                100.0 * s / total
            );
        }
    }
    if let Some(exp) = expected {
        check_outputs(&named, &exp)?;
    }
    if let Some(out) = output {
        kiln::io::write_tensors(out, &named)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn eval(
    model: &Path,
    given: &[String],
    check: Option<&Path>,
    output: Option<&Path>,
    seed: u64,
) -> Result<()> {
    let g = kiln::load_model(model)?;
    let mut inputs = kiln::random_inputs(&g, seed)?;
    let mut expected = None;
    if let Some(dir) = check {
        let (ins, outs) = load_check_dir(dir, g.inputs.len())?;
        inputs = ins;
        expected = Some(outs);
    }
    let names: Vec<String> = g.inputs.iter().map(|&i| g.values[i].name.clone()).collect();
    kiln::io::replace_named_inputs(&names, &mut inputs, given)?;
    let t0 = std::time::Instant::now();
    let outs = interp::run(&g, &inputs)?;
    let dt = t0.elapsed();
    let named: Vec<(String, Tensor)> = g
        .outputs
        .iter()
        .map(|&o| g.values[o].name.clone())
        .zip(outs)
        .collect();
    print_outputs(&named);
    println!("reference interpreter: {:.1} ms", dt.as_secs_f64() * 1e3);
    if let Some(exp) = expected {
        check_outputs(&named, &exp)?;
    }
    if let Some(out) = output {
        kiln::io::write_tensors(out, &named)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// `kiln compile --ranks N | --plan FILE`: a sharded artifact (see `kiln::cluster`).
fn compile_sharded(
    model: &Path,
    output: Option<PathBuf>,
    shapes: &[String],
    (opt_level, target, precision): (Option<u8>, &str, &str),
    (ranks, mode): (Option<usize>, &str),
    (plan, cluster): (Option<&Path>, Option<PathBuf>),
) -> Result<()> {
    let mut opts = kiln::compile::CompileOptions {
        opt_level,
        precision: kiln_codegen::gpu::lower::Precision::parse(precision)
            .map_err(|e| anyhow::anyhow!("--precision: {e}"))?,
        ..Default::default()
    };
    // --target cuda:SKU puts every rank on that GPU (with --cluster, each device's SKU)
    if target.starts_with("cuda:") {
        kiln::gpu_compile::resolve_sku(target).with_context(|| format!("--target '{target}'"))?;
        opts.gpu_target = Some(target.to_string());
    } else if let Some(cpu) = kiln::compile::cpu_of_target(target) {
        opts.cpu = cpu;
    }
    for s in shapes {
        let (name, dims) = kiln::pipeline::parse_shape(s)?;
        opts.shapes.insert(name, dims);
    }
    let source = match (plan, ranks) {
        _ if cluster.is_some() => {
            if plan.is_some() || ranks.is_some() {
                bail!("--cluster chooses the plan: give it without --plan or --ranks");
            }
            kiln::cluster::PlanSource::Cluster(cluster.unwrap())
        }
        (Some(p), r) => {
            let plan = kiln::cluster::read_plan(p)?;
            if let Some(r) = r.filter(|&r| r != plan.world) {
                bail!(
                    "--ranks {r} but the plan {} is for {} ranks",
                    p.display(),
                    plan.world
                );
            }
            kiln::cluster::PlanSource::Plan(plan)
        }
        (None, Some(r)) => match mode {
            "pipeline" => kiln::cluster::PlanSource::Ranks(r),
            "tensor" => kiln::cluster::PlanSource::Tensor(r),
            "data" => kiln::cluster::PlanSource::Data(r),
            m => bail!("--mode {m}: expected pipeline, tensor or data"),
        },
        (None, None) => unreachable!("called with --ranks or --plan"),
    };
    let (artifact, report) = kiln::cluster::compile_cluster(model, &opts, &source)?;
    let out = output.unwrap_or_else(|| model.with_extension("kiln"));
    artifact.save(&out)?;
    println!("{report}");
    println!("wrote {} ({}, sharded)", out.display(), artifact.target);
    Ok(())
}

/// `kiln run` of a sharded artifact: under `mpirun` one rank per process (rank 0 reads the
/// inputs and prints, checks or writes the outputs); otherwise every rank as a thread of
/// this process.
fn run_sharded(
    path: &Path,
    art: &kiln::runtime::Artifact,
    given: &[String],
    check: Option<&Path>,
    output: Option<&Path>,
    (repeat, seed): (Option<usize>, u64),
) -> Result<()> {
    use kiln::runtime::cluster::{ClusterModel, Transport};
    let world = art.plan.cluster.as_ref().map_or(1, |c| c.world);
    let origin = path.display().to_string();
    let under_mpi = std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
        || std::env::var_os("PMI_SIZE").is_some();
    // inputs (used by rank 0 only)
    let plan = &art.plan;
    let RunInputs {
        inputs,
        bufs,
        expected,
    } = run_inputs(plan, seed, check, given)?;
    let views = views_of(&inputs, &bufs);
    let report = |outs: Vec<kiln::runtime::Tensor>, first: std::time::Duration| -> Result<()> {
        let named = named_outputs(plan, &outs)?;
        print_outputs(&named);
        println!("first run: {:.3} ms", first.as_secs_f64() * 1e3);
        if let Some(exp) = &expected {
            check_outputs(&named, exp)?;
        }
        if let Some(out) = output {
            kiln::io::write_tensors(out, &named)?;
            println!("wrote {}", out.display());
        }
        Ok(())
    };
    if !under_mpi {
        println!("{origin}: sharded over {world} ranks; not under mpirun: running every rank as a thread");
        let t0 = std::time::Instant::now();
        let outs = kiln::runtime::cluster::run_threads(art, &origin, &views)
            .map_err(anyhow::Error::msg)?;
        return report(outs, t0.elapsed());
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (repeat, ClusterModel::new, report);
        bail!("this kiln was built without the `mpi` feature; rebuild with it to run under mpirun");
    }
    #[cfg(feature = "mpi")]
    {
        let mut tr = kiln::runtime::mpi_transport::MpiTransport::init()
            .context("MPI was already initialized")?;
        let (rank, size) = (tr.rank(), tr.size());
        if size != world {
            // every rank reaches this: exit cleanly with the reason (rank 0 prints it)
            if rank == 0 {
                eprintln!(
                    "error: {origin} is sharded over {world} ranks but mpirun started {size}; \
                     run `mpirun -n {world} kiln run {origin}`"
                );
            }
            drop(tr);
            std::process::exit(2);
        }
        let cp = art.plan.cluster.as_ref().expect("sharded");
        tr.create_groups(&cp.groups());
        let mut m = match ClusterModel::new(art, rank, &origin) {
            Ok(m) => m,
            Err(e) => tr.abort(&e),
        };
        // GPU ranks exchange tensors through NCCL (bootstrapped over MPI) when every segment
        // runs on a GPU and each rank of this node has a GPU of its own
        use kiln::runtime::nccl_transport::{wanted, NcclTransport};
        let local = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(world);
        let mut nccl = match wanted(art, local) {
            Ok(false) => None,
            Ok(true) => Some(
                NcclTransport::new(
                    &mut tr,
                    m.groups(),
                    kiln::runtime::cuda::rank_device(rank),
                    std::time::Duration::from_secs(300),
                )
                .unwrap_or_else(|e| tr.abort(&e)),
            ),
            Err(e) => tr.abort(&e),
        };
        let nccl_used = nccl.is_some();
        let mine: &[kiln::runtime::TensorView] = if rank == 0 { &views } else { &[] };
        let mut run = |m: &mut ClusterModel,
                       tr: &mut kiln::runtime::mpi_transport::MpiTransport| {
            match nccl.as_mut() {
                Some(n) => m.run(n, mine),
                None => m.run(tr, mine),
            }
            .unwrap_or_else(|e| tr.abort(&e))
        };
        let t0 = std::time::Instant::now();
        let outs = run(&mut m, &mut tr);
        let first = t0.elapsed();
        if rank == 0 {
            println!(
                "{origin}: rank 0 of {world}, {} compute segment(s); tensors between ranks through {}",
                m.segments(),
                if nccl_used { "NCCL (GPU to GPU)" } else { "MPI" }
            );
            if let Err(e) = report(outs, first) {
                tr.abort(&format!("{e:#}"));
            }
        }
        if let Some(n) = repeat.filter(|&n| n > 0) {
            let mut times = Vec::with_capacity(n);
            let mut comm = 0.0;
            for _ in 0..n {
                let t0 = std::time::Instant::now();
                run(&mut m, &mut tr);
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                comm += m.comm_time().as_secs_f64() * 1e3;
            }
            if rank == 0 {
                times.sort_by(f64::total_cmp);
                let mean = times.iter().sum::<f64>() / n as f64;
                println!(
                    "mean latency over {n} runs: {mean:.3} ms (p50 {:.3} ms, min {:.3} ms; rank 0 in communication {:.3} ms)",
                    times[n / 2],
                    times[0],
                    comm / n as f64
                );
            }
        }
        Ok(())
    }
}
