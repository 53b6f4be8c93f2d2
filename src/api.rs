//! The stable library API: [`Compiler`] → [`Artifact`] → [`Session`], with one error type,
//! [`Error`].
//!
//! ```
//! use kiln::{Compiler, Session, TensorView};
//!
//! // Compile an ONNX model (a path, ONNX bytes, or an `ir::Graph`) for this CPU.
//! let artifact = Compiler::new()
//!     .target("cpu")?
//!     .shape("input", [2, 32]) // the batch dim is symbolic; fix it to 2
//!     .compile("tests/zoo/mlp/model.onnx")?;
//! let dir = std::env::temp_dir().join(format!("kiln-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! artifact.save(dir.join("mlp.kiln"))?;
//!
//! // Load it and run it; `Session::run` takes `&self` and may be called from many threads.
//! let session = Session::load(dir.join("mlp.kiln"))?;
//! let shape = [2, 32];
//! let x = vec![0.5f32; 64];
//! let outputs = session.run(&[TensorView::from_f32(&shape, &x)])?;
//! assert_eq!(outputs[0].shape, vec![2, 10]);
//!
//! // Zero-copy variant: write into caller-owned buffers.
//! let mut y = vec![0f32; 20];
//! session.run_into(&[TensorView::from_f32(&shape, &x)], &mut [kiln::bytes_of_mut(&mut y)])?;
//! assert_eq!(outputs[0].as_f32().unwrap(), &y[..]);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::compile::{CompileOptions, CompileReport};
use kiln_runtime::{ArtifactError, ExecPlan, IoSpec, LoadError, Model, RunError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use kiln_runtime::{DType, Tensor, TensorView};

/// Every error of the library API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was refused (an unknown target, a malformed shape, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Compilation failed (import, graph passes, lowering, LLVM); the message holds the
    /// whole cause chain.
    #[error("{0}")]
    Compile(String),
    /// An artifact could not be read, written or decoded.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// An artifact could not be prepared for running (target, kernel library).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A run was refused (input count, dtype or shape, output buffers).
    #[error(transparent)]
    Run(#[from] RunError),
}

impl Error {
    fn compile(e: anyhow::Error) -> Self {
        Error::Compile(format!("{e:#}"))
    }
}

/// Shorthand for results of the library API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What [`Compiler::compile`] compiles: an ONNX file, ONNX bytes, or an imported graph.
#[derive(Clone, Debug)]
pub enum ModelSource<'a> {
    /// An ONNX file (external data is resolved next to it).
    Path(&'a Path),
    /// An ONNX model in memory.
    Bytes(&'a [u8]),
    /// An imported (or hand-built) typed graph.
    Graph(&'a crate::ir::Graph),
}

impl<'a> From<&'a Path> for ModelSource<'a> {
    fn from(p: &'a Path) -> Self {
        ModelSource::Path(p)
    }
}

impl<'a> From<&'a PathBuf> for ModelSource<'a> {
    fn from(p: &'a PathBuf) -> Self {
        ModelSource::Path(p)
    }
}

impl<'a> From<&'a str> for ModelSource<'a> {
    fn from(p: &'a str) -> Self {
        ModelSource::Path(Path::new(p))
    }
}

impl<'a> From<&'a [u8]> for ModelSource<'a> {
    fn from(b: &'a [u8]) -> Self {
        ModelSource::Bytes(b)
    }
}

impl<'a> From<&'a Vec<u8>> for ModelSource<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        ModelSource::Bytes(b)
    }
}

impl<'a> From<&'a crate::ir::Graph> for ModelSource<'a> {
    fn from(g: &'a crate::ir::Graph) -> Self {
        ModelSource::Graph(g)
    }
}

/// Compiles models to [`Artifact`]s. A builder: every setting has a default (CPU target
/// `x86-64-v3`, `-O2`, symbolic dims as 1, reference kernels allowed).
///
/// ```no_run
/// let artifact = kiln::Compiler::new()
///     .target("cpu:native")?
///     .opt_level(2)
///     .shape("x", [4, 32])
///     .max_batch(8)
///     .compile("model.onnx")?;
/// println!("{}", artifact.report().unwrap());
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    opts: CompileOptions,
}

impl Compiler {
    /// A compiler with the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// The target: `cpu` (the default CPU, `x86-64-v3`), `cpu:NAME` with an LLVM CPU name
    /// (`x86-64-v4`, `native`, ...), or `cuda:SKU` (`cuda:h100`, `cuda:a100`, `cuda:sm_80`,
    /// see `kiln_codegen::gpu::device`). Other targets are refused.
    pub fn target(mut self, target: &str) -> Result<Self> {
        if target.starts_with("cuda:") {
            kiln_codegen::gpu::DeviceDb::builtin()
                .and_then(|db| db.parse_target(target).map(|_| ()))
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            self.opts.gpu_target = Some(target.to_string());
            return Ok(self);
        }
        self.opts.gpu_target = None;
        self.opts.cpu = crate::compile::cpu_of_target(target).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "target '{target}': only CPU targets compile so far (cpu or cpu:NAME)"
            ))
        })?;
        Ok(self)
    }

    /// Optimisation level: 0 (no equality saturation), 1, 2 (default), 3 (longer search).
    pub fn opt_level(mut self, level: u8) -> Self {
        self.opts.opt_level = Some(level);
        self
    }

    /// Overrides of the optimisation level's eqsat search limits (iterations, e-nodes,
    /// saturation time, extractor); compiling at level 0 with any of them set is an error.
    pub fn eqsat_limits(mut self, limits: crate::pipeline::EqsatLimits) -> Self {
        self.opts.eqsat_limits = limits;
        self
    }

    /// A concrete shape for the input `name` (symbolic dims not given default to 1).
    pub fn shape(mut self, name: impl Into<String>, dims: impl Into<Vec<usize>>) -> Self {
        self.opts.shapes.insert(name.into(), dims.into());
        self
    }

    /// A concrete input shape written `NAME=D0xD1x...` (as `kiln compile --shape`).
    pub fn shape_spec(self, spec: &str) -> Result<Self> {
        let (name, dims) = crate::pipeline::parse_shape(spec)
            .map_err(|e| Error::InvalidArgument(format!("{e:#}")))?;
        Ok(self.shape(name, dims))
    }

    /// Inputs whose first dim is symbolic accept any batch size `1..=n` at run time (one
    /// static specialisation per size in the same artifact).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.opts.max_batch = Some(n);
        self
    }

    /// What MatMul/Gemm compute on for a cuda target: `f32` (default), `tf32`, `f16` or
    /// `bf16` (tensor cores, f32 accumulation; activations and other ops stay f32). A CPU
    /// target refuses anything but `f32` when compiling.
    pub fn precision(mut self, precision: &str) -> Result<Self> {
        self.opts.precision = kiln_codegen::gpu::lower::Precision::parse(precision)
            .map_err(|e| Error::InvalidArgument(format!("--precision: {e}")))?;
        Ok(self)
    }

    /// Whether kernels with no code generator yet may run on the runtime's reference
    /// interpreter (default `true`); `false` makes them a compile error.
    pub fn reference_kernels(mut self, on: bool) -> Self {
        self.opts.reference_kernels = on;
        self
    }

    /// Passes the IR after `stage` (see [`crate::pipeline::STAGES`], or `all`) to the
    /// printer of [`Compiler::compile_with_ir`].
    pub fn print_after(mut self, stage: impl Into<String>) -> Self {
        self.opts.print_after.push(stage.into());
        self
    }

    /// Uses the best schedules recorded in the tuning database at `path` (written by
    /// `kiln tune`) for this compiler's target; call after [`Compiler::target`]. Kernels with
    /// no record keep their default schedule; the report says how many had one.
    pub fn tuning_db(mut self, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::InvalidArgument(format!(
                "tuning database {} does not exist (kiln tune writes it)",
                path.display()
            )));
        }
        let target = match &self.opts.gpu_target {
            Some(t) => crate::gpu_tune::gpu_target(
                crate::gpu_compile::resolve_sku(t)
                    .map_err(|e| Error::InvalidArgument(format!("{e:#}")))?,
            ),
            None => crate::tune::cpu_target(&self.opts.cpu),
        };
        crate::tune::load_schedules(path, &target)
            .map_err(|e| Error::InvalidArgument(format!("{e:#}")))?
            .apply(&mut self.opts);
        self.opts.tuning_db = Some(path.to_path_buf());
        Ok(self)
    }

    /// The settings as the lower-level [`CompileOptions`].
    pub fn options(&self) -> &CompileOptions {
        &self.opts
    }

    /// Compiles a model (a path, ONNX bytes, or a graph; see [`ModelSource`]).
    pub fn compile<'a>(&self, model: impl Into<ModelSource<'a>>) -> Result<Artifact> {
        self.compile_with_ir(model, |_, _| {})
    }

    /// Compiles a model like [`Compiler::compile`], calling `print(stage, text)` with the
    /// IR after each stage named by [`Compiler::print_after`].
    pub fn compile_with_ir<'a>(
        &self,
        model: impl Into<ModelSource<'a>>,
        print: impl FnMut(&str, &str),
    ) -> Result<Artifact> {
        let (graph, name);
        let g = match model.into() {
            ModelSource::Path(p) => {
                if !p.exists() {
                    return Err(Error::Io {
                        path: p.display().to_string(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "no such model file",
                        ),
                    });
                }
                name = p.display().to_string();
                graph = kiln_ir::onnx::load(p).map_err(|e| Error::compile(e.into()))?;
                &graph
            }
            ModelSource::Bytes(b) => {
                name = "<memory>".to_string();
                graph = kiln_ir::onnx::load_bytes(b, &name, None)
                    .map_err(|e| Error::compile(e.into()))?;
                &graph
            }
            ModelSource::Graph(g) => {
                name = if g.name.is_empty() {
                    "<graph>".to_string()
                } else {
                    g.name.clone()
                };
                g
            }
        };
        let (inner, report) =
            crate::compile::compile_graph(g, &name, &self.opts, print).map_err(Error::compile)?;
        Ok(Artifact {
            inner,
            report: Some(report),
        })
    }
}

/// A compiled model: execution plan, weights and kernel library (the `MODEL.kiln` file).
#[derive(Clone, Debug)]
pub struct Artifact {
    inner: kiln_runtime::Artifact,
    report: Option<CompileReport>,
}

impl Artifact {
    /// The runtime artifact (plan, weights, kernels) inside.
    pub fn inner(&self) -> &kiln_runtime::Artifact {
        &self.inner
    }

    /// Reads an artifact file (checked: magic, version, CRC, plan).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::from(kiln_runtime::Artifact::load(path.as_ref())?))
    }

    /// Decodes an artifact from bytes (as written by [`Artifact::to_bytes`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Ok(Self::from(kiln_runtime::Artifact::from_bytes(
            bytes, "<memory>",
        )?))
    }

    /// Writes the artifact to `path` (atomically).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        Ok(self.inner.save(path.as_ref())?)
    }

    /// The artifact file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.inner.to_bytes()?)
    }

    /// What the compiler did (kernels, sizes, stage times); `None` for a loaded artifact.
    pub fn report(&self) -> Option<&CompileReport> {
        self.report.as_ref()
    }

    /// The target it was compiled for (`cpu:x86-64-v3`, ...).
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The compiler version that produced it.
    pub fn compiler_version(&self) -> &str {
        &self.inner.compiler_version
    }

    /// The model inputs (names, dtypes, shapes of the first shape variant).
    pub fn inputs(&self) -> &[IoSpec] {
        &self.inner.plan.inputs
    }

    /// The model outputs.
    pub fn outputs(&self) -> &[IoSpec] {
        &self.inner.plan.outputs
    }

    /// The runtime's artifact.
    pub fn as_runtime(&self) -> &kiln_runtime::Artifact {
        &self.inner
    }

    /// A session running this artifact (see [`Session::new`]).
    pub fn session(&self) -> Result<Session> {
        Session::new(self)
    }
}

impl From<kiln_runtime::Artifact> for Artifact {
    fn from(inner: kiln_runtime::Artifact) -> Self {
        Self {
            inner,
            report: None,
        }
    }
}

/// A loaded model that runs on any number of threads at once.
///
/// A session keeps a pool of runtime instances ([`kiln_runtime::Model`]: kernels resolved,
/// arena and weights allocated) behind a mutex. Each call takes an idle instance (or
/// prepares a new one from the same artifact when all are busy), runs on it without holding
/// the lock, and puts it back; so `N` concurrent callers end up with `N` instances, each with
/// its own arena (and, for now, its own copy of the weights), and a single caller allocates
/// nothing beyond the outputs of [`Session::run`].
pub struct Session {
    artifact: Arc<kiln_runtime::Artifact>,
    origin: String,
    threads: usize,
    idle: Mutex<Vec<Model>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("origin", &self.origin)
            .field("target", &self.artifact.target)
            .field("threads", &self.threads)
            .field("instances", &self.idle().len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Loads the artifact file at `path` and prepares one instance.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let artifact = kiln_runtime::Artifact::load(path)?;
        Self::build(artifact, path.display().to_string())
    }

    /// A session running `artifact` (copied) and prepares one instance.
    pub fn new(artifact: &Artifact) -> Result<Self> {
        Self::build(artifact.inner.clone(), "<memory>".into())
    }

    /// A session that takes ownership of `artifact`.
    pub fn from_artifact(artifact: Artifact) -> Result<Self> {
        Self::build(artifact.inner, "<memory>".into())
    }

    fn build(artifact: kiln_runtime::Artifact, origin: String) -> Result<Self> {
        let s = Self {
            artifact: Arc::new(artifact),
            origin,
            threads: 1,
            idle: Mutex::new(Vec::new()),
        };
        let m = s.instance()?;
        s.idle().push(m);
        Ok(s)
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Model>> {
        // A panic while the lock was held cannot leave the vector inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh instance of the artifact.
    fn instance(&self) -> Result<Model> {
        let mut m = Model::from_artifact((*self.artifact).clone(), &self.origin)?;
        m.set_threads(self.threads);
        Ok(m)
    }

    /// Calls `f` on an idle instance (a new one if none is idle) and puts it back.
    fn with_instance<R>(&self, f: impl FnOnce(&mut Model) -> R) -> Result<R> {
        let popped = self.idle().pop();
        let mut m = match popped {
            Some(m) => m,
            None => self.instance()?,
        };
        let r = f(&mut m);
        self.idle().push(m);
        Ok(r)
    }

    /// Runs the task-split kernels of each call on `threads` threads (the caller's
    /// included); sessions start with 1. Applies to every instance.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
        for m in self.idle().iter_mut() {
            m.set_threads(threads);
        }
    }

    /// Threads per call (see [`Session::set_threads`]).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Number of instances prepared so far (the most concurrent calls seen, at least 1).
    pub fn instances(&self) -> usize {
        self.idle().len()
    }

    /// The model inputs (names, dtypes, shapes of the first shape variant), in call order.
    pub fn inputs(&self) -> &[IoSpec] {
        &self.artifact.plan.inputs
    }

    /// The model outputs, in result order.
    pub fn outputs(&self) -> &[IoSpec] {
        &self.artifact.plan.outputs
    }

    /// The execution plan (the first shape variant; others in its `variants`).
    pub fn plan(&self) -> &ExecPlan {
        &self.artifact.plan
    }

    /// The target the artifact was compiled for.
    pub fn target(&self) -> &str {
        &self.artifact.target
    }

    /// The compiler version recorded in the artifact.
    pub fn compiler_version(&self) -> &str {
        &self.artifact.compiler_version
    }

    /// Runs the model on `inputs` (in [`Session::inputs`] order) and returns freshly
    /// allocated outputs.
    pub fn run(&self, inputs: &[TensorView<'_>]) -> Result<Vec<Tensor>> {
        Ok(self.with_instance(|m| m.run(inputs))??)
    }

    /// Runs the model writing output `o` into `outputs[o]`, which must have exactly its size
    /// in bytes (see [`Session::output_shapes`]) and be aligned to its element size. No
    /// allocation once an instance is idle.
    pub fn run_into(&self, inputs: &[TensorView<'_>], outputs: &mut [&mut [u8]]) -> Result<()> {
        Ok(self.with_instance(|m| m.run_into(inputs, outputs))??)
    }

    /// The output shapes `inputs` would produce (checks the inputs like [`Session::run`]).
    pub fn output_shapes(&self, inputs: &[TensorView<'_>]) -> Result<Vec<Vec<usize>>> {
        Ok(self.with_instance(|m| m.output_shapes(inputs))??)
    }

    /// Runs `repeat` times and returns each step's kernel with its total time, in plan order.
    pub fn profile(
        &self,
        inputs: &[TensorView<'_>],
        repeat: usize,
    ) -> Result<Vec<(String, std::time::Duration)>> {
        Ok(self.with_instance(|m| m.profile(inputs, repeat))??)
    }
}

/// Views a mutable slice of plain numbers (`f32`, `i64`, ...) as bytes, for
/// [`Session::run_into`].
pub fn bytes_of_mut<T: Pod>(data: &mut [T]) -> &mut [u8] {
    // SAFETY: `Pod` types have no padding and any bit pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast(), std::mem::size_of_val(data)) }
}

/// Views a slice of plain numbers as bytes, for [`TensorView::new`].
pub fn bytes_of<T: Pod>(data: &[T]) -> &[u8] {
    // SAFETY: as in `bytes_of_mut`.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), std::mem::size_of_val(data)) }
}

/// Plain numeric element types (no padding, every bit pattern valid), viewable as bytes.
pub trait Pod: Copy + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
}

macro_rules! pod {
    ($($t:ty),*) => {$(impl sealed::Sealed for $t {} impl Pod for $t {})*};
}
pod!(
    f32,
    f64,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
    half::f16,
    half::bf16
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Session>();
        check::<Artifact>();
        check::<Error>();
    }
}
