//! The executor: loads a `MODEL.kiln` artifact once and runs it many times.
//!
//! [`Model::load`] checks the artifact, maps its kernel library, resolves every step's kernel
//! symbol, allocates the arena (64-byte aligned) and copies the weights into an aligned buffer,
//! and pre-builds each step's `args` pointer array (arena and weight pointers are fixed; only
//! input and output pointers are patched per call) and `dims` array (only symbolic entries
//! are patched). [`Model::run`] allocates the outputs; [`Model::run_into`] writes into caller
//! buffers and allocates nothing.

use crate::artifact::{Artifact, ArtifactError};
use crate::kernel_lib::{KernelFn, KernelLibError, KernelLibrary};
use crate::plan::{BufRef, DType, DimExpr, DimSpec, ExecPlan, ALIGNMENT};
use crate::pool::Pool;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; ALIGNMENT]);

/// A zero-initialised byte buffer whose start is aligned to 64 bytes.
#[derive(Clone)]
pub struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self {
            blocks: vec![Block([0; ALIGNMENT]); len.div_ceil(ALIGNMENT)],
            len,
        }
    }

    /// A copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `blocks` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `blocks` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast(), self.len) }
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.blocks.as_mut_ptr().cast()
    }
}

/// Views a slice of plain numbers as bytes.
fn bytes_of<T: Copy>(data: &[T]) -> &[u8] {
    // SAFETY: only used with primitive numeric types (no padding, any bit pattern valid).
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), std::mem::size_of_val(data)) }
}

/// A borrowed input tensor: dense, row-major, native-endian elements.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first.
    pub shape: &'a [usize],
    /// The elements' bytes; must be aligned to the element size.
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// A view of raw bytes.
    pub fn new(dtype: DType, shape: &'a [usize], data: &'a [u8]) -> Self {
        Self { dtype, shape, data }
    }

    /// A view of `f32` elements.
    pub fn from_f32(shape: &'a [usize], data: &'a [f32]) -> Self {
        Self::new(DType::F32, shape, bytes_of(data))
    }

    /// A view of `i64` elements.
    pub fn from_i64(shape: &'a [usize], data: &'a [i64]) -> Self {
        Self::new(DType::I64, shape, bytes_of(data))
    }
}

/// An owned tensor (the result of [`Model::run`]), 64-byte aligned.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// The elements' bytes.
    pub data: AlignedBuf,
}

impl Tensor {
    /// A zero-filled tensor.
    pub fn zeroed(dtype: DType, shape: Vec<usize>) -> Self {
        let n: usize = shape.iter().product();
        Self {
            dtype,
            data: AlignedBuf::zeroed(n * dtype.size_of()),
            shape,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A borrowed view.
    pub fn view(&self) -> TensorView<'_> {
        TensorView::new(self.dtype, &self.shape, self.data.as_slice())
    }

    /// The elements as `f32`, if that is the dtype.
    pub fn as_f32(&self) -> Option<&[f32]> {
        (self.dtype == DType::F32).then(|| {
            // SAFETY: the buffer is 64-byte aligned and holds `numel` f32 values.
            unsafe {
                std::slice::from_raw_parts(self.data.as_slice().as_ptr().cast(), self.numel())
            }
        })
    }

    /// The elements as `i64`, if that is the dtype.
    pub fn as_i64(&self) -> Option<&[i64]> {
        (self.dtype == DType::I64).then(|| {
            // SAFETY: the buffer is 64-byte aligned and holds `numel` i64 values.
            unsafe {
                std::slice::from_raw_parts(self.data.as_slice().as_ptr().cast(), self.numel())
            }
        })
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The artifact is unreadable or invalid.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The artifact targets something this runtime or this CPU cannot run.
    #[error("{path}: field `target`: {msg}")]
    Target {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The kernel library could not be loaded.
    #[error("{path}: kernel library: {source}")]
    Library {
        /// The file.
        path: String,
        /// The loader's error.
        source: KernelLibError,
    },
    /// A step's kernel is not exported by the kernel library.
    #[error("{path}: step {step}: kernel symbol '{kernel}' is missing from the kernel library")]
    MissingKernel {
        /// The file.
        path: String,
        /// The step index.
        step: usize,
        /// The symbol.
        kernel: String,
    },
}

/// Why a call to [`Model::run`] or [`Model::run_into`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// Wrong number of inputs.
    #[error("the model takes {expected} inputs, got {got}")]
    InputCount {
        /// Declared inputs.
        expected: usize,
        /// Given inputs.
        got: usize,
    },
    /// An input does not match its declaration.
    #[error("input {index} '{name}': {msg}")]
    Input {
        /// Its position.
        index: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// Wrong number of output buffers.
    #[error("the model has {expected} outputs, got {got} buffers")]
    OutputCount {
        /// Declared outputs.
        expected: usize,
        /// Given buffers.
        got: usize,
    },
    /// An output buffer does not fit its output.
    #[error("output {index} '{name}': {msg}")]
    Output {
        /// Its position.
        index: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        msg: String,
    },
}

/// A dim of a declared shape, with symbols resolved to indices.
#[derive(Clone, Copy, Debug)]
enum Dim {
    Fixed(usize),
    Sym(usize),
}

/// A per-call pointer patch of a step's `args`.
#[derive(Clone, Copy, Debug)]
enum IoPatch {
    Input(usize),
    Output(usize),
}

/// A loaded model, ready to run. Running needs `&mut self` (the arena is reused across
/// calls); use one `Model` per thread.
pub struct Model {
    path: String,
    artifact_info: (String, String),
    plan: ExecPlan,
    // Order matters for drop: the kernels (plain pointers) are unused after the library.
    kernels: Vec<KernelFn>,
    _library: KernelLibrary,
    _weights: AlignedBuf,
    _arena: AlignedBuf,
    inputs: Vec<Vec<Dim>>,
    outputs: Vec<Vec<Dim>>,
    sym_names: Vec<String>,
    sym_max: Vec<Option<u64>>,
    sym_values: Vec<i64>,
    sym_set: Vec<bool>,
    args: Vec<Vec<*mut u8>>,
    arg_patches: Vec<(usize, usize, IoPatch)>,
    dims: Vec<Vec<i64>>,
    dim_patches: Vec<(usize, usize, usize)>,
    pool: Option<Pool>,
}

/// The calls of one step on several threads: chunk `c` (of `threads`) is a contiguous
/// range of the step's tasks.
struct Split<'a> {
    f: KernelFn,
    args: &'a [*mut u8],
    dims: &'a [i64],
    tasks: i64,
    threads: i64,
}

// SAFETY: the pointers are only passed on to the kernel, which writes disjoint task ranges.
unsafe impl Sync for Split<'_> {}

impl Split<'_> {
    fn run(&self, c: usize) {
        let t = c;
        let per = (self.tasks + self.threads - 1) / self.threads;
        let begin = (t as i64 * per).min(self.tasks);
        let end = (begin + per).min(self.tasks);
        if begin >= end {
            return;
        }
        let mut buf = [0i64; 16];
        let mut heap = Vec::new();
        let d: &mut [i64] = if self.dims.len() <= buf.len() {
            &mut buf[..self.dims.len()]
        } else {
            heap.extend_from_slice(self.dims);
            &mut heap
        };
        d.copy_from_slice(self.dims);
        d[0] = begin;
        d[1] = end;
        // SAFETY: as in `Model::execute`; ranges of different threads are disjoint.
        unsafe { (self.f)(self.args.as_ptr(), d.as_ptr()) };
    }
}

// SAFETY: the raw pointers in `args` point into `_weights` and `_arena`, heap buffers owned
// by the model that never move or reallocate; kernels are plain functions. Nothing is shared
// between models, and running takes `&mut self`.
unsafe impl Send for Model {}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("compiler_version", &self.artifact_info.0)
            .field("target", &self.artifact_info.1)
            .field("steps", &self.plan.steps.len())
            .field("arena_bytes", &self.plan.arena_bytes)
            .finish_non_exhaustive()
    }
}

/// Checks that this CPU can run code compiled for `target` (`cpu:NAME`).
fn check_target(target: &str) -> Result<(), String> {
    let Some(cpu) = target.strip_prefix("cpu:") else {
        return Err(format!(
            "target '{target}' is not a CPU target; this runtime runs only 'cpu:*' artifacts"
        ));
    };
    #[cfg(target_arch = "x86_64")]
    {
        let needs: &[(&str, bool)] = match cpu {
            "x86-64-v2" => &[
                ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
                ("popcnt", std::arch::is_x86_feature_detected!("popcnt")),
            ],
            "x86-64-v3" => &[
                ("avx2", std::arch::is_x86_feature_detected!("avx2")),
                ("fma", std::arch::is_x86_feature_detected!("fma")),
                ("bmi2", std::arch::is_x86_feature_detected!("bmi2")),
            ],
            "x86-64-v4" => &[
                ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
                ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
                ("avx512dq", std::arch::is_x86_feature_detected!("avx512dq")),
                ("avx512vl", std::arch::is_x86_feature_detected!("avx512vl")),
            ],
            _ => &[],
        };
        if let Some((f, _)) = needs.iter().find(|(_, ok)| !ok) {
            return Err(format!(
                "compiled for {cpu}, but this CPU lacks the '{f}' feature; recompile for this CPU"
            ));
        }
    }
    let _ = cpu;
    Ok(())
}

impl Model {
    /// Loads the artifact at `path` (see [`Model::from_artifact`]).
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let artifact = Artifact::load(path)?;
        Self::from_artifact(artifact, &path.display().to_string())
    }

    /// Prepares an artifact for running; `origin` names it in errors. The artifact's plan
    /// must be valid ([`ExecPlan::validate`]; [`Artifact::load`] already checked it).
    pub fn from_artifact(artifact: Artifact, origin: &str) -> Result<Self, LoadError> {
        let path = origin.to_string();
        let Artifact {
            compiler_version,
            target,
            plan,
            weights,
            kernels,
        } = artifact;
        plan.validate(weights.len() as u64)
            .map_err(|msg| ArtifactError::Malformed {
                path: path.clone(),
                field: "plan".into(),
                msg,
            })?;
        check_target(&target).map_err(|msg| LoadError::Target {
            path: path.clone(),
            msg,
        })?;
        let library = KernelLibrary::from_bytes(&kernels).map_err(|source| LoadError::Library {
            path: path.clone(),
            source,
        })?;
        drop(kernels);
        // Resolve each distinct symbol once.
        let mut resolved: HashMap<&str, KernelFn> = HashMap::new();
        let mut fns = Vec::with_capacity(plan.steps.len());
        for (step, s) in plan.steps.iter().enumerate() {
            let f = match resolved.get(s.kernel.as_str()) {
                Some(f) => *f,
                None => {
                    let f = library
                        .kernel(&s.kernel)
                        .map_err(|_| LoadError::MissingKernel {
                            path: path.clone(),
                            step,
                            kernel: s.kernel.clone(),
                        })?
                        .raw();
                    resolved.insert(&s.kernel, f);
                    f
                }
            };
            fns.push(f);
        }

        // Symbols, in order of first appearance among the inputs.
        let mut sym_names: Vec<String> = Vec::new();
        let sym_index =
            |name: &str, names: &mut Vec<String>| match names.iter().position(|n| n == name) {
                Some(i) => i,
                None => {
                    names.push(name.to_string());
                    names.len() - 1
                }
            };
        let resolve_shape = |shape: &[DimSpec], names: &mut Vec<String>| -> Vec<Dim> {
            shape
                .iter()
                .map(|d| match d {
                    DimSpec::Fixed(n) => Dim::Fixed(*n as usize),
                    DimSpec::Sym(s) => Dim::Sym(sym_index(s, names)),
                })
                .collect()
        };
        let inputs: Vec<Vec<Dim>> = plan
            .inputs
            .iter()
            .map(|io| resolve_shape(&io.shape, &mut sym_names))
            .collect();
        // `validate` guarantees outputs and steps use only symbols bound by inputs.
        let outputs: Vec<Vec<Dim>> = plan
            .outputs
            .iter()
            .map(|io| resolve_shape(&io.shape, &mut sym_names))
            .collect();
        let sym_max: Vec<Option<u64>> = sym_names
            .iter()
            .map(|n| plan.sym_bounds.iter().find(|b| &b.name == n).map(|b| b.max))
            .collect();

        let mut weights_buf = AlignedBuf::from_bytes(&weights);
        drop(weights);
        let mut arena = AlignedBuf::zeroed(plan.arena_bytes as usize);
        let wbase = weights_buf.as_mut_ptr();
        let abase = arena.as_mut_ptr();
        let mut args = Vec::with_capacity(plan.steps.len());
        let mut arg_patches = Vec::new();
        let mut dims = Vec::with_capacity(plan.steps.len());
        let mut dim_patches = Vec::new();
        for (si, s) in plan.steps.iter().enumerate() {
            let a = s
                .args
                .iter()
                .enumerate()
                .map(|(ai, b)| match b {
                    // SAFETY (both): `validate` checked the ranges lie inside the buffers.
                    BufRef::Arena { offset, .. } => unsafe { abase.add(*offset as usize) },
                    BufRef::Weight { index } => unsafe {
                        wbase.add(plan.weights[*index].offset as usize)
                    },
                    BufRef::Input { index } => {
                        arg_patches.push((si, ai, IoPatch::Input(*index)));
                        std::ptr::null_mut()
                    }
                    BufRef::Output { index } => {
                        arg_patches.push((si, ai, IoPatch::Output(*index)));
                        std::ptr::null_mut()
                    }
                })
                .collect();
            args.push(a);
            // ABI: dims[0..2] is the task range, then the symbolic dims.
            let d = [0, s.tasks as i64]
                .into_iter()
                .chain(s.dims.iter().enumerate().map(|(di, d)| match d {
                    DimExpr::Const(c) => *c,
                    DimExpr::Sym(name) => {
                        let k = sym_index(name, &mut sym_names);
                        dim_patches.push((si, 2 + di, k));
                        0
                    }
                }))
                .collect();
            dims.push(d);
        }
        let n_syms = sym_names.len();
        Ok(Self {
            path,
            artifact_info: (compiler_version, target),
            plan,
            kernels: fns,
            _library: library,
            _weights: weights_buf,
            _arena: arena,
            inputs,
            outputs,
            sym_names,
            sym_max,
            sym_values: vec![0; n_syms],
            sym_set: vec![false; n_syms],
            args,
            arg_patches,
            dims,
            dim_patches,
            pool: None,
        })
    }

    /// Runs the kernels that split into tasks on `threads` threads (the caller's included);
    /// 1 runs everything on the calling thread. Models start single-threaded.
    pub fn set_threads(&mut self, threads: usize) {
        let threads = threads.max(1);
        if threads == self.threads() {
            return;
        }
        self.pool = (threads > 1).then(|| Pool::new(threads));
    }

    /// Number of threads the model runs on (see [`Model::set_threads`]).
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, Pool::threads)
    }

    /// The execution plan.
    pub fn plan(&self) -> &ExecPlan {
        &self.plan
    }

    /// The compiler version recorded in the artifact.
    pub fn compiler_version(&self) -> &str {
        &self.artifact_info.0
    }

    /// The target recorded in the artifact.
    pub fn target(&self) -> &str {
        &self.artifact_info.1
    }

    /// Checks `inputs` against the plan and binds the symbolic dims.
    fn bind(&mut self, inputs: &[TensorView<'_>]) -> Result<(), RunError> {
        if inputs.len() != self.plan.inputs.len() {
            return Err(RunError::InputCount {
                expected: self.plan.inputs.len(),
                got: inputs.len(),
            });
        }
        self.sym_set.iter_mut().for_each(|s| *s = false);
        for (i, (t, spec)) in inputs.iter().zip(&self.plan.inputs).enumerate() {
            let err = |msg: String| RunError::Input {
                index: i,
                name: spec.name.clone(),
                msg,
            };
            let shape_str = || {
                let dims: Vec<String> = spec.shape.iter().map(|d| d.to_string()).collect();
                format!("[{}]", dims.join(", "))
            };
            if t.dtype != spec.dtype {
                return Err(err(format!(
                    "dtype {} but the model expects {}",
                    t.dtype, spec.dtype
                )));
            }
            let decl = &self.inputs[i];
            if t.shape.len() != decl.len() {
                return Err(err(format!(
                    "shape {:?} has rank {} but the model expects {} (rank {})",
                    t.shape,
                    t.shape.len(),
                    shape_str(),
                    decl.len()
                )));
            }
            for (axis, (&n, d)) in t.shape.iter().zip(decl).enumerate() {
                match *d {
                    Dim::Fixed(m) if m != n => {
                        return Err(err(format!(
                            "shape {:?}: axis {axis} is {n} but the model expects {} ({})",
                            t.shape,
                            m,
                            shape_str()
                        )))
                    }
                    Dim::Fixed(_) => {}
                    Dim::Sym(k) => {
                        let name = &self.sym_names[k];
                        let v = i64::try_from(n)
                            .map_err(|_| err(format!("axis {axis}: size {n} too large")))?;
                        if self.sym_set[k] {
                            if self.sym_values[k] != v {
                                return Err(err(format!(
                                    "shape {:?}: axis {axis} ('{name}') is {n}, but '{name}' is \
                                     {} from an earlier dimension",
                                    t.shape, self.sym_values[k]
                                )));
                            }
                        } else {
                            if let Some(max) = self.sym_max[k] {
                                if n as u64 > max {
                                    return Err(err(format!(
                                        "shape {:?}: axis {axis} ('{name}') is {n}, more than the \
                                         {max} the model was compiled for",
                                        t.shape
                                    )));
                                }
                            }
                            self.sym_values[k] = v;
                            self.sym_set[k] = true;
                        }
                    }
                }
            }
            let bytes = t
                .shape
                .iter()
                .try_fold(t.dtype.size_of(), |a, &n| a.checked_mul(n));
            if bytes != Some(t.data.len()) {
                return Err(err(format!(
                    "shape {:?} of {} needs {} bytes, the data has {}",
                    t.shape,
                    t.dtype,
                    bytes.map_or("too many".to_string(), |b| b.to_string()),
                    t.data.len()
                )));
            }
            // Element sizes are powers of two.
            if (t.data.as_ptr() as usize) & (t.dtype.size_of() - 1) != 0 {
                return Err(err(format!(
                    "data is not aligned to {} bytes",
                    t.dtype.size_of()
                )));
            }
        }
        // Output sizes follow from the bound symbols; refuse ones that overflow `usize`.
        for (o, (dims, spec)) in self.outputs.iter().zip(&self.plan.outputs).enumerate() {
            let bytes = dims.iter().try_fold(spec.dtype.size_of(), |a, d| match *d {
                Dim::Fixed(n) => a.checked_mul(n),
                Dim::Sym(k) => a.checked_mul(self.sym_values[k] as usize),
            });
            if bytes.is_none() {
                return Err(RunError::Output {
                    index: o,
                    name: spec.name.clone(),
                    msg: "its size overflows for these input shapes".into(),
                });
            }
        }
        Ok(())
    }

    /// The shape of output `index` for the bound symbols.
    fn output_shape(&self, index: usize) -> Vec<usize> {
        self.outputs[index]
            .iter()
            .map(|d| match *d {
                Dim::Fixed(n) => n,
                Dim::Sym(k) => self.sym_values[k] as usize,
            })
            .collect()
    }

    fn output_bytes(&self, index: usize) -> usize {
        let n: usize = self.outputs[index]
            .iter()
            .map(|d| match *d {
                Dim::Fixed(n) => n,
                Dim::Sym(k) => self.sym_values[k] as usize,
            })
            .product();
        n * self.plan.outputs[index].dtype.size_of()
    }

    /// The output shapes `inputs` would produce (checks the inputs like [`Model::run`]).
    pub fn output_shapes(
        &mut self,
        inputs: &[TensorView<'_>],
    ) -> Result<Vec<Vec<usize>>, RunError> {
        self.bind(inputs)?;
        Ok((0..self.outputs.len())
            .map(|o| self.output_shape(o))
            .collect())
    }

    /// Runs the kernels with the bound symbols; `out(o)` is output `o`'s buffer.
    ///
    /// # Safety
    /// `bind` succeeded for `inputs`, and each `out(o)` is valid for `output_bytes(o)` bytes
    /// of writes, aligned to the element size and disjoint from the inputs.
    unsafe fn execute(
        &mut self,
        inputs: &[TensorView<'_>],
        out: impl Fn(usize) -> *mut u8,
        mut times: Option<&mut [std::time::Duration]>,
    ) {
        for &(s, a, p) in &self.arg_patches {
            self.args[s][a] = match p {
                IoPatch::Input(i) => inputs[i].data.as_ptr().cast_mut(),
                IoPatch::Output(o) => out(o),
            };
        }
        for &(s, d, k) in &self.dim_patches {
            self.dims[s][d] = self.sym_values[k];
        }
        for (i, ((f, args), dims)) in self
            .kernels
            .iter()
            .zip(&self.args)
            .zip(&self.dims)
            .enumerate()
        {
            let t = times.is_some().then(std::time::Instant::now);
            let tasks = dims[1];
            match &self.pool {
                Some(pool) if tasks > 1 => {
                    let split = Split {
                        f: *f,
                        args,
                        dims,
                        tasks,
                        threads: pool.threads() as i64,
                    };
                    pool.run(pool.threads(), &|c| split.run(c));
                }
                // SAFETY: the plan was validated at load (buffers in range, inputs and
                // weights only read), the inputs and outputs were checked by the caller; the
                // kernels follow the uniform ABI the compiler promised for these args and
                // dims (`dims[0..2]` = all tasks).
                _ => unsafe { f(args.as_ptr(), dims.as_ptr()) },
            }
            if let (Some(times), Some(t)) = (times.as_deref_mut(), t) {
                times[i] += t.elapsed();
            }
        }
    }

    /// Runs the model, returning freshly allocated outputs.
    pub fn run(&mut self, inputs: &[TensorView<'_>]) -> Result<Vec<Tensor>, RunError> {
        self.bind(inputs)?;
        let mut outs: Vec<Tensor> = (0..self.outputs.len())
            .map(|o| Tensor::zeroed(self.plan.outputs[o].dtype, self.output_shape(o)))
            .collect();
        let ptrs: Vec<*mut u8> = outs
            .iter_mut()
            .map(|t| t.data.as_mut_slice().as_mut_ptr())
            .collect();
        // SAFETY: bound above; the outputs are fresh, aligned and of the right size.
        unsafe { self.execute(inputs, |o| ptrs[o], None) };
        Ok(outs)
    }

    /// Runs the model `repeat` times and returns each step's kernel name with its total time
    /// over the runs, in plan order (a per-kernel profile, as `kiln run --profile` prints).
    pub fn profile(
        &mut self,
        inputs: &[TensorView<'_>],
        repeat: usize,
    ) -> Result<Vec<(String, std::time::Duration)>, RunError> {
        self.bind(inputs)?;
        let mut outs: Vec<Tensor> = (0..self.outputs.len())
            .map(|o| Tensor::zeroed(self.plan.outputs[o].dtype, self.output_shape(o)))
            .collect();
        let ptrs: Vec<*mut u8> = outs
            .iter_mut()
            .map(|t| t.data.as_mut_slice().as_mut_ptr())
            .collect();
        let mut times = vec![std::time::Duration::ZERO; self.kernels.len()];
        for _ in 0..repeat {
            // SAFETY: as in `run`.
            unsafe { self.execute(inputs, |o| ptrs[o], Some(&mut times)) };
        }
        Ok(self
            .plan
            .steps
            .iter()
            .zip(times)
            .map(|(s, t)| (s.kernel.clone(), t))
            .collect())
    }

    /// Runs the model, writing output `o` into `outputs[o]`, which must have exactly its size
    /// in bytes (see [`Model::output_shapes`]) and be aligned to its element size. Allocates
    /// nothing.
    pub fn run_into(
        &mut self,
        inputs: &[TensorView<'_>],
        outputs: &mut [&mut [u8]],
    ) -> Result<(), RunError> {
        self.bind(inputs)?;
        if outputs.len() != self.outputs.len() {
            return Err(RunError::OutputCount {
                expected: self.outputs.len(),
                got: outputs.len(),
            });
        }
        for (o, buf) in outputs.iter().enumerate() {
            let spec = &self.plan.outputs[o];
            let err = |msg: String| RunError::Output {
                index: o,
                name: spec.name.clone(),
                msg,
            };
            let need = self.output_bytes(o);
            if buf.len() != need {
                return Err(err(format!(
                    "buffer has {} bytes, the output (shape {:?}, {}) needs {need}",
                    buf.len(),
                    self.output_shape(o),
                    spec.dtype
                )));
            }
            if (buf.as_ptr() as usize) & (spec.dtype.size_of() - 1) != 0 {
                return Err(err(format!(
                    "buffer is not aligned to {} bytes",
                    spec.dtype.size_of()
                )));
            }
        }
        let base = outputs.as_mut_ptr();
        // SAFETY: bound above; buffer sizes and alignment checked; `&mut` buffers cannot alias
        // the shared input slices. `base.add(o)` stays within `outputs` (o < len).
        unsafe { self.execute(inputs, |o| (*base.add(o)).as_mut_ptr(), None) };
        Ok(())
    }
}
