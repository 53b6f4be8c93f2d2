//! `kiln bench`: Kiln's and onnxruntime's latency, side by side, from one run.
//!
//! [`bench()`] compiles an ONNX model in-process (or takes an already compiled `.kiln`), loads
//! it with [`kiln_runtime::Model`] and times it; for the comparison it starts the Python
//! onnxruntime worker `scripts/ort_bench.py` (embedded in this crate, written to a scratch
//! folder) once per thread count and alternates rounds: Kiln runs K times, then onnxruntime
//! runs K times, and so on, so that noise on a shared machine hits both alike. Every run is
//! timed on its own (Kiln: `Instant` around `Model::run`, which allocates the outputs;
//! onnxruntime: `time.perf_counter` around `sess.run`, which includes the Python binding
//! overhead, a few microseconds).
//!
//! It also reports:
//! - whether the two runtimes agree (largest absolute error per output, and relative to the
//!   onnxruntime output's scale, its largest magnitude but at least 1);
//! - a roofline line: the model's FLOPs ([`count_flops`]), the achieved GFLOP/s at the p50
//!   latency and this core's f32 peak, measured in-process with an FMA loop (AVX-512 or AVX2)
//!   ([`peak::fma_peak_gflops`]);
//! - peak memory: the growth of the peak resident set size (VmHWM) over the load of the
//!   model plus all runs, for Kiln and for onnxruntime (see [`RssProbe`]).
//!
//! Python is `$KILN_PYTHON`, else the first `.venv/bin/python` found in the current folder
//! or one of its parents or next to the executable, else `python3`. Without onnxruntime the
//! bench says why and reports Kiln alone.

pub mod peak;

use anyhow::{bail, Context, Result};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{Graph, Op, Tensor, ValueId};
use kiln_runtime::{DimSpec, Model, TensorView};
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

/// Pause before each runtime's round (see `run_bench`), so that spinning threads of the
/// previous round have parked.
const ROUND_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The onnxruntime worker, written next to the inputs at run time.
const ORT_WORKER: &str = include_str!("../scripts/ort_bench.py");

/// Options of [`bench()`].
#[derive(Clone, Debug)]
pub struct Options {
    /// The model: an ONNX file (compiled in-process) or a compiled `.kiln` artifact.
    pub model: PathBuf,
    /// Concrete input shapes for compiling an ONNX model (`NAME=1x3x64x64`).
    pub shapes: Vec<String>,
    /// Thread counts to measure, one table each.
    pub threads: Vec<usize>,
    /// Timed runs per runtime and thread count (at least 50 recommended).
    pub runs: usize,
    /// Untimed warm-up runs per runtime and thread count.
    pub warmup: usize,
    /// Number of interleaved rounds the timed runs are split into.
    pub rounds: usize,
    /// Inputs as `NAME=FILE` (.npy or .pb), replacing the random or test-data ones.
    pub inputs: Vec<String>,
    /// Test data folder (`input_K.pb`, `output_K.pb`): inputs from it, Kiln's outputs checked
    /// against its outputs. Default: `test_data_set_0` next to the model, if its inputs fit.
    pub check: Option<PathBuf>,
    /// Seed of the random inputs.
    pub seed: u64,
    /// Compare with onnxruntime (needs the ONNX model: the model itself, or `MODEL.onnx`
    /// next to a `.kiln`).
    pub compare: bool,
    /// Compile with the best schedules of this tuning database (`kiln tune`).
    pub db: Option<PathBuf>,
    /// LLVM CPU the ONNX model is compiled for: `native` (default: the machine measured,
    /// whose vector ISA onnxruntime also dispatches to at run time), `x86-64-v3`, ...
    pub cpu: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            shapes: Vec::new(),
            threads: vec![1],
            runs: 200,
            warmup: 20,
            rounds: 10,
            inputs: Vec::new(),
            check: None,
            seed: 0,
            compare: true,
            db: None,
            cpu: "native".into(),
        }
    }
}

/// Latency statistics of one runtime, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Number of timed runs.
    pub runs: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Fastest run.
    pub min: f64,
    /// Mean.
    pub mean: f64,
}

impl Stats {
    /// Statistics of per-run times (seconds); all zero for no samples.
    pub fn from_samples(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        Self {
            runs: s.len(),
            p50: percentile(&s, 50.0),
            p90: percentile(&s, 90.0),
            p99: percentile(&s, 99.0),
            min: s[0],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }

    fn columns(&self) -> [f64; 5] {
        [self.p50, self.p90, self.p99, self.min, self.mean]
    }
}

/// The `q`-th percentile (0–100) of ascending `sorted` samples, interpolating linearly
/// between the closest ranks (numpy's default): `q = 0` is the minimum, `q = 100` the
/// maximum. NaN for no samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let pos = (q.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// FLOPs of one inference (see [`count_flops`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlopCount {
    /// MatMul, Gemm, Conv, ConvTranspose: 2 per multiply-accumulate.
    pub contraction: u64,
    /// Everything else counted: elementwise ops and biases (1 per output element),
    /// reductions, pooling, normalizations and softmax (1 per input element).
    pub other: u64,
}

impl FlopCount {
    /// All counted FLOPs.
    pub fn total(&self) -> u64 {
        self.contraction + self.other
    }
}

fn known_dims(g: &Graph, v: Option<ValueId>) -> Option<Vec<usize>> {
    g.values.get(v?)?.fact.shape.as_known()
}

fn numel(g: &Graph, v: Option<ValueId>) -> u64 {
    known_dims(g, v).map_or(0, |d| d.iter().product::<usize>() as u64)
}

/// Counts the FLOPs of one run of a graph with static shapes (e.g. after the `specialize`
/// stage): MatMul / Gemm / Conv / ConvTranspose count 2 per multiply-accumulate, elementwise
/// ops and contraction biases 1 per output element, reductions, pooling, normalizations and
/// softmax 1 per input element (a lower bound), data movement, Resize and Einsum nothing.
/// Values with unknown dims count 0.
pub fn count_flops(g: &Graph) -> FlopCount {
    let mut c = FlopCount::default();
    for n in &g.nodes {
        let input = |i: usize| n.inputs.get(i).copied().flatten();
        let out = numel(g, n.outputs.first().copied());
        match &n.op {
            Op::Linalg(LinalgOp::MatMul | LinalgOp::MatMulInteger) => {
                let k = known_dims(g, input(0)).and_then(|a| a.last().copied());
                c.contraction += 2 * out * k.unwrap_or(0) as u64;
            }
            Op::Linalg(LinalgOp::Gemm(gemm)) => {
                let k = known_dims(g, input(0))
                    .filter(|a| a.len() == 2)
                    .map_or(0, |a| if gemm.trans_a { a[0] } else { a[1] });
                c.contraction += 2 * out * k as u64;
                if input(2).is_some() {
                    c.other += out;
                }
            }
            Op::Nn(NnOp::Conv(_)) => {
                // weight [M, C/group, k...]: MACs per output element = C/group · Πk
                let k: usize = known_dims(g, input(1)).map_or(0, |w| w[1..].iter().product());
                c.contraction += 2 * out * k as u64;
                if input(2).is_some() {
                    c.other += out;
                }
            }
            Op::Nn(NnOp::ConvTranspose(_)) => {
                // weight [C, M/group, k...]: every input element feeds M/group · Πk outputs
                let k: usize = known_dims(g, input(1)).map_or(0, |w| w[1..].iter().product());
                c.contraction += 2 * numel(g, input(0)) * k as u64;
                if input(2).is_some() {
                    c.other += out;
                }
            }
            Op::Elementwise(_) => c.other += out,
            Op::Nn(_) | Op::Reduce(_) => c.other += numel(g, input(0)),
            Op::Linalg(_) | Op::Array(_) | Op::Resize(_) => {}
        }
    }
    c
}

/// Peak resident memory probe for this process: [`RssProbe::start`] resets the peak
/// (`/proc/self/clear_refs` ← `5`, which sets VmHWM to the current VmRSS) after returning
/// freed heap memory to the system (`malloc_trim`, glibc), and records VmRSS;
/// [`RssProbe::growth_kib`] is then VmHWM minus that baseline: how far the resident set
/// grew at its highest since the start. If the reset is not permitted the baseline is the
/// earlier VmHWM and the growth a lower bound (`exact == false`).
#[derive(Clone, Copy, Debug)]
pub struct RssProbe {
    base_kib: Option<u64>,
    /// Whether the peak could be reset (the growth is exact, not a lower bound).
    pub exact: bool,
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    line[key.len() + 1..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: glibc's malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

impl RssProbe {
    /// Starts measuring (see the type's doc).
    pub fn start() -> Self {
        trim_heap();
        let exact = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let base_kib = proc_status_kib(if exact { "VmRSS" } else { "VmHWM" });
        Self { base_kib, exact }
    }

    /// Peak RSS growth since [`RssProbe::start`], in KiB; `None` without `/proc`.
    pub fn growth_kib(&self) -> Option<u64> {
        Some(proc_status_kib("VmHWM")?.saturating_sub(self.base_kib?))
    }
}

/// How far one output of Kiln differs from a reference.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputError {
    /// Output name.
    pub name: String,
    /// Largest absolute error.
    pub max_abs: f64,
    /// The reference's largest magnitude, at least 1.
    pub scale: f64,
}

impl OutputError {
    /// `max_abs / scale`.
    pub fn rel(&self) -> f64 {
        self.max_abs / self.scale
    }
}

/// Compares named outputs with reference tensors (same order); fails on a count or shape
/// mismatch.
fn compare(got: &[(String, Tensor)], want: &[Tensor]) -> Result<Vec<OutputError>> {
    if got.len() != want.len() {
        bail!(
            "{} reference outputs but Kiln has {}",
            want.len(),
            got.len()
        );
    }
    got.iter()
        .zip(want)
        .map(|((name, t), r)| {
            if t.shape() != r.shape() {
                bail!(
                    "output '{name}': Kiln shape {:?}, reference {:?}",
                    t.shape(),
                    r.shape()
                );
            }
            let rv = r.to_f64_vec();
            let scale = rv.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let max_abs = t
                .to_f64_vec()
                .iter()
                .zip(&rv)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            Ok(OutputError {
                name: name.clone(),
                max_abs,
                scale,
            })
        })
        .collect()
}

/// Results for one thread count.
#[derive(Clone, Debug)]
pub struct ThreadResult {
    /// The requested thread count (onnxruntime's intra-op threads).
    pub threads: usize,
    /// The threads Kiln ran with.
    pub kiln_threads: usize,
    /// Kiln's latency.
    pub kiln: Stats,
    /// onnxruntime's latency, if it ran.
    pub ort: Option<Stats>,
    /// Kiln's peak RSS growth over load + warm-up + timed runs, KiB.
    pub kiln_mem_kib: Option<u64>,
    /// onnxruntime's peak RSS growth over session creation + all runs, KiB.
    pub ort_mem_kib: Option<u64>,
    /// Whether both memory figures are exact (peak reset worked), not lower bounds.
    pub mem_exact: bool,
}

/// Everything [`bench()`] measured; `Display` prints the tables, [`Report::to_json`] the
/// same as JSON.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The model as given.
    pub model: String,
    /// The CPU's name as `/proc/cpuinfo` reports it.
    pub cpu: String,
    /// Compile time in ms, when an ONNX model was compiled.
    pub compile_ms: Option<f64>,
    /// Number of kernels (steps) in the plan.
    pub steps: usize,
    /// Where the inputs came from.
    pub inputs_from: String,
    /// Kiln's outputs against the test data's expected outputs, if there were any.
    pub check: Option<Vec<OutputError>>,
    /// onnxruntime's version, if it ran.
    pub ort_version: Option<String>,
    /// Kiln's outputs against onnxruntime's.
    pub agreement: Option<Vec<OutputError>>,
    /// Things worth knowing (onnxruntime unavailable, Kiln single-threaded, ...).
    pub notes: Vec<String>,
    /// The model's FLOPs per run, if the ONNX graph was at hand.
    pub flops: Option<FlopCount>,
    /// This core's measured f32 FMA peak (AVX-512 or AVX2, [`peak::peak_isa`]), GFLOP/s (one
    /// thread): the best of a sample
    /// before the runs and one per round.
    pub peak_gflops: Option<f64>,
    /// Warm-up runs per runtime and thread count.
    pub warmup: usize,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Per thread count.
    pub results: Vec<ThreadResult>,
}

fn fmt_mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn fmt_errors(errs: &[OutputError]) -> String {
    errs.iter()
        .map(|e| {
            format!(
                "{}: max abs error {:.2e} (rel {:.2e})",
                e.name,
                e.max_abs,
                e.rel()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model: {} ({} kernels", self.model, self.steps)?;
        if let Some(ms) = self.compile_ms {
            write!(f, ", compiled in {ms:.0} ms")?;
        }
        writeln!(f, ")\ncpu: {}", self.cpu)?;
        writeln!(f, "inputs: {}", self.inputs_from)?;
        if let Some(c) = &self.check {
            writeln!(f, "kiln vs expected outputs: {}", fmt_errors(c))?;
        }
        if let Some(v) = &self.ort_version {
            write!(f, "onnxruntime {v}")?;
            match &self.agreement {
                Some(a) => writeln!(f, " vs kiln: {}", fmt_errors(a))?,
                None => writeln!(f)?,
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        for r in &self.results {
            let kr = r.kiln;
            writeln!(
                f,
                "\nthreads {} (kiln {}): {} timed runs each, in {} interleaved rounds, after {} warm-up runs",
                r.threads, r.kiln_threads, kr.runs, self.rounds, self.warmup
            )?;
            writeln!(
                f,
                "{:<12}{:>10}{:>10}{:>10}{:>10}{:>10}",
                "", "p50 ms", "p90 ms", "p99 ms", "min ms", "mean ms"
            )?;
            let row = |f: &mut fmt::Formatter<'_>, name: &str, s: &Stats| {
                write!(f, "{name:<12}")?;
                for v in s.columns() {
                    write!(f, "{:>10.4}", v * 1e3)?;
                }
                writeln!(f)
            };
            row(f, "kiln", &kr)?;
            if let Some(o) = &r.ort {
                row(f, "onnxruntime", o)?;
                write!(f, "{:<12}", "kiln/ort")?;
                for (k, o) in kr.columns().iter().zip(o.columns()) {
                    write!(f, "{:>9.2}x", k / o)?;
                }
                writeln!(f)?;
            }
            if let Some(fl) = self.flops {
                let gf = |s: &Stats| fl.total() as f64 / s.p50 * 1e-9;
                write!(
                    f,
                    "roofline: {:.3} MFLOP per run ({:.0}% MatMul/Gemm/Conv); kiln {:.2} GFLOP/s at p50",
                    fl.total() as f64 * 1e-6,
                    100.0 * fl.contraction as f64 / fl.total().max(1) as f64,
                    gf(&kr)
                )?;
                if let Some(p) = self.peak_gflops {
                    let cores = r.kiln_threads as f64;
                    write!(f, " = {:.1}% of", 100.0 * gf(&kr) / (p * cores))?;
                    if r.kiln_threads > 1 {
                        write!(f, " {} x", r.kiln_threads)?;
                    }
                    write!(
                        f,
                        " peak {p:.1} GFLOP/s (1 core, {}, best sampled in this run)",
                        peak::peak_isa()
                    )?;
                }
                if let Some(o) = &r.ort {
                    write!(f, "; onnxruntime {:.2} GFLOP/s at p50", gf(o))?;
                }
                writeln!(f)?;
            }
            write!(
                f,
                "memory (peak RSS growth, load + runs): kiln {}",
                fmt_mib(r.kiln_mem_kib)
            )?;
            if r.ort.is_some() {
                write!(f, ", onnxruntime {}", fmt_mib(r.ort_mem_kib))?;
                if let (Some(k), Some(o)) = (r.kiln_mem_kib, r.ort_mem_kib) {
                    write!(f, ", kiln/ort {:.2}x", k as f64 / o.max(1) as f64)?;
                }
            }
            if !r.mem_exact {
                write!(f, " (lower bounds: the peak could not be reset)")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

impl Report {
    /// The report as JSON (times in milliseconds, memory in KiB).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let stats = |s: &Stats| {
            json!({"runs": s.runs, "p50_ms": s.p50 * 1e3, "p90_ms": s.p90 * 1e3,
                   "p99_ms": s.p99 * 1e3, "min_ms": s.min * 1e3, "mean_ms": s.mean * 1e3})
        };
        let errs = |e: &Option<Vec<OutputError>>| {
            e.as_ref().map(|v| {
                v.iter()
                    .map(|e| json!({"name": e.name, "max_abs": e.max_abs, "rel": e.rel()}))
                    .collect::<Vec<_>>()
            })
        };
        json!({
            "model": self.model,
            "cpu": self.cpu,
            "compile_ms": self.compile_ms,
            "kernels": self.steps,
            "inputs": self.inputs_from,
            "check": errs(&self.check),
            "onnxruntime": self.ort_version,
            "agreement": errs(&self.agreement),
            "notes": self.notes,
            "flops": self.flops.map(|f| json!({"total": f.total(), "contraction": f.contraction, "other": f.other})),
            "peak_gflops_1core": self.peak_gflops,
            "warmup": self.warmup,
            "rounds": self.rounds,
            "results": self.results.iter().map(|r| json!({
                "threads": r.threads,
                "kiln_threads": r.kiln_threads,
                "kiln": stats(&r.kiln),
                "onnxruntime": r.ort.as_ref().map(stats),
                "ratio_p50": r.ort.map(|o| r.kiln.p50 / o.p50),
                "ratio_min": r.ort.map(|o| r.kiln.min / o.min),
                "kiln_peak_rss_growth_kib": r.kiln_mem_kib,
                "ort_peak_rss_growth_kib": r.ort_mem_kib,
                "memory_exact": r.mem_exact,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The threads Kiln runs with for a requested count (the runtime may run fewer; the bench
/// reports what [`Model::threads`] says).
fn kiln_threads(requested: usize) -> usize {
    requested
}

/// Loads the artifact to run with `threads` threads ([`Model::set_threads`]).
fn load_kiln(path: &Path, threads: usize) -> Result<Model> {
    let mut m = Model::load(path)?;
    m.set_threads(threads);
    Ok(m)
}

fn cpu_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{}, family {}, model {} ({cores} cores available)",
        field("model name").unwrap_or_else(|| "unknown".into()),
        field("cpu family").unwrap_or_else(|| "?".into()),
        field("model").unwrap_or_else(|| "?".into()),
    )
}

/// Python for the onnxruntime worker: `$KILN_PYTHON`, else the first `.venv/bin/python` in
/// the current folder or its parents, or next to the executable or its parents, or in this
/// source tree, else `python3`.
pub fn find_python() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_PYTHON") {
        return p.into();
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    roots
        .into_iter()
        .map(|r| r.join(".venv/bin/python"))
        .find(|p| p.exists())
        .unwrap_or_else(|| "python3".into())
}

/// A running `ort_bench.py` worker.
struct OrtWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr_file: PathBuf,
}

impl OrtWorker {
    /// Starts the worker and waits for its first line; returns it with that line's JSON.
    fn start(
        python: &Path,
        scratch: &Path,
        onnx: &Path,
        threads: usize,
    ) -> Result<(Self, serde_json::Value)> {
        let script = scratch.join("ort_bench.py");
        let outdir = scratch.join(format!("ort_out_{threads}"));
        std::fs::create_dir_all(&outdir)?;
        let stderr_file = scratch.join(format!("ort_stderr_{threads}.txt"));
        let mut child = Command::new(python)
            .arg(&script)
            .arg(onnx)
            .arg(scratch.join("inputs.npz"))
            .arg(threads.to_string())
            .arg(&outdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_file)?)
            .spawn()
            .with_context(|| format!("cannot start {}", python.display()))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        let mut w = Self {
            child,
            stdin,
            stdout,
            stderr_file,
        };
        let first = w.read()?;
        Ok((w, first))
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap_or(0);
        if n == 0 {
            let err = std::fs::read_to_string(&self.stderr_file).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("the onnxruntime worker stopped: {}", tail.join(" | "));
        }
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("bad line from the onnxruntime worker: {line}"))?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            bail!("{e}");
        }
        Ok(v)
    }

    fn request(&mut self, req: &str) -> Result<serde_json::Value> {
        writeln!(self.stdin, "{req}")
            .and_then(|_| self.stdin.flush())
            .context("the onnxruntime worker stopped")?;
        self.read()
    }

    /// `run K`: K per-run times in seconds.
    fn run(&mut self, k: usize) -> Result<Vec<f64>> {
        let v = self.request(&format!("run {k}"))?;
        let times = v["times"]
            .as_array()
            .context("onnxruntime worker: no times")?
            .iter()
            .filter_map(|t| t.as_f64())
            .collect::<Vec<_>>();
        if times.len() != k {
            bail!("onnxruntime worker: {} times for {k} runs", times.len());
        }
        Ok(times)
    }

    /// Peak RSS growth in KiB, and whether it is exact.
    fn mem(&mut self) -> Result<(Option<u64>, bool)> {
        let v = self.request("mem")?;
        Ok((
            v["peak_rss_growth_kib"].as_u64(),
            v["exact"].as_bool().unwrap_or(false),
        ))
    }
}

impl Drop for OrtWorker {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit").and_then(|_| self.stdin.flush());
        let _ = self.child.wait();
    }
}

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark described in the module doc and returns what it measured. Fails
/// (never panics) on a missing or uncompilable model or bad inputs; an unavailable
/// onnxruntime only adds a note.
pub fn bench(opts: &Options) -> Result<Report> {
    let model_path = &opts.model;
    if !model_path.is_file() {
        bail!("{}: no such model file", model_path.display());
    }
    if opts.threads.is_empty() || opts.threads.contains(&0) {
        bail!("--threads: give thread counts of at least 1, e.g. 1,2");
    }
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut report = Report {
        model: model_path.display().to_string(),
        cpu: cpu_name(),
        warmup: opts.warmup,
        ..Default::default()
    };
    let scratch =
        Scratch(
            std::env::temp_dir().join(format!("kiln-bench-{}-{}", std::process::id(), {
                use std::time::{SystemTime, UNIX_EPOCH};
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            })),
        );
    std::fs::create_dir_all(&scratch.0)
        .with_context(|| format!("{}: cannot create", scratch.0.display()))?;

    // test data: --check DIR, else test_data_set_0 next to the model
    let default_dir = model_path.parent().map(|p| p.join("test_data_set_0"));
    let data_dir = opts
        .check
        .clone()
        .or(default_dir.filter(|d| d.join("input_0.pb").is_file()));
    let data_inputs = match &data_dir {
        Some(d) => Some(crate::io::read_test_set(d, "input")?),
        None => None,
    };

    // 1. the artifact
    let is_kiln = model_path.extension().and_then(|e| e.to_str()) == Some("kiln");
    let (artifact_path, onnx) = if is_kiln {
        if !opts.shapes.is_empty() {
            report
                .notes
                .push("--shape is ignored for a compiled .kiln (its shapes are fixed)".into());
        }
        let onnx = model_path.with_extension("onnx");
        (model_path.clone(), onnx.is_file().then_some(onnx))
    } else {
        let mut copts = crate::compile::CompileOptions {
            cpu: opts.cpu.clone(),
            ..Default::default()
        };
        report.notes.push(format!("compiled for cpu:{}", opts.cpu));
        for s in &opts.shapes {
            let (name, dims) = crate::pipeline::parse_shape(s)?;
            copts.shapes.insert(name, dims);
        }
        // inputs with symbolic dims and no --shape take the test data's shapes if they fit
        if let Some(ins) = &data_inputs {
            let g = crate::load_model(model_path)?;
            let fits = ins.len() == g.inputs.len()
                && g.inputs.iter().zip(ins).all(|(&id, t)| {
                    let dims = g.values[id].fact.shape.dims();
                    dims.len() == t.shape().len()
                        && dims
                            .iter()
                            .zip(t.shape())
                            .all(|(d, &n)| d.known().is_none_or(|k| k == n))
                });
            if fits {
                for (&id, t) in g.inputs.iter().zip(ins) {
                    let name = g.values[id].name.clone();
                    copts
                        .shapes
                        .entry(name)
                        .or_insert_with(|| t.shape().to_vec());
                }
            }
        }
        if let Some(db) = &opts.db {
            let target = crate::tune::cpu_target(&copts.cpu);
            crate::tune::load_schedules(db, &target)?.apply(&mut copts);
        }
        let t0 = Instant::now();
        let (artifact, _) = crate::compile::compile_with(model_path, &copts, |_, _| {})
            .with_context(|| format!("{}: cannot compile", model_path.display()))?;
        report.compile_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        let p = scratch.0.join("model.kiln");
        artifact.save(&p)?;
        (p, Some(model_path.clone()))
    };
    let plan = load_kiln(&artifact_path, 1)
        .with_context(|| format!("{}: cannot load", artifact_path.display()))?
        .plan()
        .clone();
    report.steps = plan.steps.len();
    let names: Vec<String> = plan.inputs.iter().map(|io| io.name.clone()).collect();
    let shapes: Vec<Vec<usize>> = plan
        .inputs
        .iter()
        .map(|io| {
            io.shape
                .iter()
                .map(|d| match d {
                    DimSpec::Fixed(n) => *n as usize,
                    DimSpec::Sym(_) | DimSpec::Dynamic => 1,
                })
                .collect()
        })
        .collect();

    // 2. inputs: --check DIR, else test_data_set_0 next to the model if it fits, else random
    let specs = plan
        .inputs
        .iter()
        .zip(&shapes)
        .map(|(io, s)| (io.dtype, s.clone()));
    let mut inputs = crate::random_tensors(specs, opts.seed);
    report.inputs_from = format!("random (seed {})", opts.seed);
    let mut expected = None;
    if let (Some(dir), Some(ins)) = (data_dir, data_inputs) {
        let fits = ins.len() == inputs.len()
            && ins
                .iter()
                .zip(&shapes)
                .all(|(t, s)| t.shape() == s.as_slice());
        if fits {
            inputs = ins;
            expected = Some(crate::io::read_test_set(&dir, "output")?);
            report.inputs_from = dir.display().to_string();
        } else if opts.check.is_some() {
            bail!(
                "{}: its inputs do not match the model's inputs {:?}",
                dir.display(),
                shapes
            );
        } else {
            report.inputs_from +=
                &format!(" ({} does not match the compiled shapes)", dir.display());
        }
    }
    for (name, file) in crate::io::replace_named_inputs(&names, &mut inputs, &opts.inputs)? {
        report.inputs_from += &format!(", {name} from {file}");
        expected = None;
    }
    let bufs = crate::io::runtime_buffers(&inputs);
    let views: Vec<TensorView> = inputs
        .iter()
        .zip(&bufs)
        .map(|(t, (dt, b))| TensorView::new(*dt, t.shape(), b.as_slice()))
        .collect();

    // 3. Kiln's outputs once, checked against the test data
    let kiln_outputs: Vec<(String, Tensor)> = {
        let mut m = load_kiln(&artifact_path, 1)?;
        let outs = m.run(&views)?;
        plan.outputs
            .iter()
            .zip(&outs)
            .map(|(io, t)| {
                let v = kiln_ir::onnx::tensor_proto::from_raw(t.dtype, &t.shape, t.data.as_slice())
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("output '{}'", io.name))?;
                Ok((io.name.clone(), v))
            })
            .collect::<Result<_>>()?
    };
    if let Some(exp) = &expected {
        match compare(&kiln_outputs, exp) {
            Ok(e) => report.check = Some(e),
            Err(e) => report.notes.push(format!("test data check: {e:#}")),
        }
    }

    // 4. FLOPs and peak
    if let Some(onnx) = &onnx {
        let popts = crate::pipeline::Options {
            shapes: names.iter().cloned().zip(shapes.iter().cloned()).collect(),
            ..Default::default()
        };
        match crate::pipeline::plan(onnx, &popts, |_, _| {}) {
            Ok(p) => report.flops = Some(count_flops(&p.graph)),
            Err(e) => report.notes.push(format!("no FLOP count: {e:#}")),
        }
    }
    report.peak_gflops = peak::fma_peak_gflops(5_000_000, 3);

    // 5. onnxruntime set-up
    let python = find_python();
    let mut ort_onnx = None;
    if !opts.compare {
        report.notes.push("onnxruntime comparison off".into());
    } else if let Some(onnx) = &onnx {
        let named: Vec<(String, Tensor)> = names.iter().cloned().zip(inputs.clone()).collect();
        crate::io::write_tensors(&scratch.0.join("inputs.npz"), &named)?;
        crate::io::write_atomic(&scratch.0.join("ort_bench.py"), ORT_WORKER.as_bytes())?;
        ort_onnx = Some(onnx.clone());
    } else {
        report.notes.push(format!(
            "no onnxruntime comparison: no ONNX model next to {}",
            model_path.display()
        ));
    }

    // 6. per thread count: interleaved rounds
    let rounds = opts.rounds.clamp(1, opts.runs);
    let per_round = opts.runs.div_ceil(rounds);
    report.rounds = rounds;
    for &threads in &opts.threads {
        let mut worker = None;
        if let Some(onnx) = &ort_onnx {
            match OrtWorker::start(&python, &scratch.0, onnx, threads) {
                Ok((w, first)) => {
                    if report.ort_version.is_none() {
                        report.ort_version = first["version"].as_str().map(str::to_string);
                        let outdir = scratch.0.join(format!("ort_out_{threads}"));
                        let ort_outs = (0..kiln_outputs.len())
                            .map(|k| {
                                crate::io::read_tensor(&outdir.join(format!("output_{k}.npy")))
                            })
                            .collect::<Result<Vec<_>>>()
                            .and_then(|o| compare(&kiln_outputs, &o));
                        match ort_outs {
                            Ok(e) => report.agreement = Some(e),
                            Err(e) => report
                                .notes
                                .push(format!("cannot compare with onnxruntime: {e:#}")),
                        }
                    }
                    worker = Some(w);
                }
                Err(e) => {
                    report.notes.push(format!(
                        "onnxruntime unavailable ({e:#}; python: {}, set KILN_PYTHON to choose one); Kiln only",
                        python.display()
                    ));
                    ort_onnx = None;
                }
            }
        }
        let probe = RssProbe::start();
        let mut model = load_kiln(&artifact_path, kiln_threads(threads))?;
        let kt = model.threads();
        for _ in 0..opts.warmup {
            model.run(&views)?;
        }
        let mut ort_err = None;
        if let Some(w) = worker.as_mut() {
            if let Err(e) = w.run(opts.warmup) {
                ort_err = Some(e);
            }
        }
        let mut kiln_times = Vec::with_capacity(per_round * rounds);
        let mut ort_times = Vec::with_capacity(per_round * rounds);
        for _ in 0..rounds {
            // the peak too is sampled every round and the best kept: a single early
            // measurement on a loaded machine can read low
            if let Some(p) = peak::fma_peak_gflops(2_000_000, 1) {
                report.peak_gflops = Some(report.peak_gflops.unwrap_or(0.0).max(p));
            }
            // Let the other runtime's spinning threads go idle first (both runtimes' thread
            // pools spin for a while after their last job; on a 2-core machine a spinning
            // worker of one would steal the core the other's second thread needs).
            std::thread::sleep(ROUND_PAUSE);
            for _ in 0..per_round {
                let t = Instant::now();
                let outs = model.run(&views)?;
                kiln_times.push(t.elapsed().as_secs_f64());
                drop(outs);
            }
            if let (Some(w), None) = (worker.as_mut(), &ort_err) {
                std::thread::sleep(ROUND_PAUSE);
                match w.run(per_round) {
                    Ok(t) => ort_times.extend(t),
                    Err(e) => ort_err = Some(e),
                }
            }
        }
        let kiln_mem = probe.growth_kib();
        drop(model);
        let (mut ort, mut ort_mem, mut exact) = (None, None, probe.exact);
        if let Some(mut w) = worker {
            match ort_err {
                Some(e) => report
                    .notes
                    .push(format!("onnxruntime failed with {threads} threads: {e:#}")),
                None => {
                    ort = Some(Stats::from_samples(&ort_times));
                    match w.mem() {
                        Ok((m, ex)) => {
                            ort_mem = m;
                            exact &= ex;
                        }
                        Err(e) => report.notes.push(format!("onnxruntime memory: {e:#}")),
                    }
                }
            }
        }
        report.results.push(ThreadResult {
            threads,
            kiln_threads: kt,
            kiln: Stats::from_samples(&kiln_times),
            ort,
            kiln_mem_kib: kiln_mem,
            ort_mem_kib: ort_mem,
            mem_exact: exact,
        });
    }
    Ok(report)
}

/// Parses `--threads 1,2`.
pub fn parse_threads(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("--threads '{s}': '{t}' is not a thread count >= 1"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_between_ranks() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 100.0), 100.0);
        assert!((percentile(&s, 50.0) - 50.5).abs() < 1e-12);
        assert!((percentile(&s, 90.0) - 90.1).abs() < 1e-12);
        assert!((percentile(&s, 99.0) - 99.01).abs() < 1e-12);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(percentile(&[1.0, 2.0], 50.0), 1.5);
    }

    #[test]
    fn stats_of_unsorted_samples() {
        let s = Stats::from_samples(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.runs, s.min, s.mean, s.p50), (4, 1.0, 2.5, 2.5));
        assert_eq!(Stats::from_samples(&[]), Stats::default());
    }

    #[test]
    fn threads_parse() {
        assert_eq!(parse_threads("1,2").unwrap(), vec![1, 2]);
        assert!(parse_threads("0").is_err());
        assert!(parse_threads("a").is_err());
    }
}
