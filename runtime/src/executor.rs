//! The executor: loads a `MODEL.kiln` artifact once and runs it many times.
//!
//! [`Model::load`] checks the artifact, maps its kernel library, resolves every step's kernel
//! symbol, allocates the arena (64-byte aligned) and copies the weights into an aligned buffer,
//! and pre-builds each step's `args` pointer array (arena and weight pointers are fixed; only
//! input and output pointers are patched per call) and `dims` array (only symbolic entries
//! are patched). [`Model::run`] allocates the outputs; [`Model::run_into`] writes into caller
//! buffers and allocates nothing.

use crate::artifact::{Artifact, ArtifactError};
use crate::instance::{max_scratch_bytes, Instance, ScratchSlots};
use crate::kernel_lib::{KernelLibError, KernelLibrary};
use crate::plan::{DType, ExecPlan, ALIGNMENT};
use crate::pool::Pool;
use crate::split_choice::SplitChoice;
use kiln_ir::onnx::tensor_proto::to_raw;
use std::path::Path;
use std::time::Instant;

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

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
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
            data: AlignedBuf::zeroed(dtype.bytes_for(n).expect("tensor size overflows")),
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
    /// A step without compiled code (run by the reference interpreter) failed.
    #[error("step {step} ('{kernel}', reference kernel): {msg}")]
    Step {
        /// The step index.
        step: usize,
        /// Its label.
        kernel: String,
        /// What went wrong.
        msg: String,
    },
    /// The dynamic tail (the nodes whose shapes depend on input values, run by the
    /// reference interpreter) failed.
    #[error("dynamic tail (reference interpreter): {msg}")]
    Tail {
        /// What went wrong.
        msg: String,
    },
    /// The shape of an output depends on the input values, so it is known only after
    /// running: [`Model::run_into`] and [`Model::output_shapes`] cannot serve it.
    #[error("output {index} '{name}' has a data-dependent shape; use run")]
    DynamicShape {
        /// Its position.
        index: usize,
        /// Its name.
        name: String,
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

/// A loaded model, ready to run. Running needs `&mut self` (the arena is reused across
/// calls); use one `Model` per thread.
///
/// An artifact may hold several shape variants of the model (specialisations for each
/// allowed batch size, see [`ExecPlan::variants`]); each call runs the first variant whose
/// input shapes match the inputs.
pub struct Model {
    path: String,
    artifact_info: (String, String),
    // Order matters for drop: the instances (kernel pointers, weight pointers) go first.
    variants: Vec<Instance>,
    pool: Option<Pool>,
    /// Kernel scratch, one slot per thread, shared by the variants (they never run at once).
    scratch: ScratchSlots,
    /// Whether runs use `pool` (timed both ways every so often).
    split: SplitChoice,
    _library: KernelLibrary,
    _weights: AlignedBuf,
}

// SAFETY: the raw pointers in the instances point into `_weights` and their own arenas, heap
// buffers owned by the model that never move or reallocate (so does `scratch`, replaced only
// by `set_threads(&mut self)`); kernels are plain functions. Nothing is shared between
// models, and running takes `&mut self`.
unsafe impl Send for Model {}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plan = self.plan();
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("compiler_version", &self.artifact_info.0)
            .field("target", &self.artifact_info.1)
            .field("variants", &self.variants.len())
            .field("steps", &plan.steps.len())
            .field("arena_bytes", &plan.arena_bytes)
            .finish_non_exhaustive()
    }
}

/// Checks that this CPU can run code compiled for `target` (`cpu:NAME`).
fn check_target(target: &str) -> Result<(), String> {
    let Some(cpu) = target.strip_prefix("cpu:") else {
        if target.starts_with("cuda:") {
            return Err(format!(
                "target '{target}' is a GPU artifact; run it with the CUDA executor \
                 (`kiln run`, `kiln_runtime::cuda_model::CudaModel`, feature `cuda`)"
            ));
        }
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
        if let Some(c) = &artifact.plan.cluster {
            return Err(LoadError::Target {
                path,
                msg: format!(
                    "a sharded artifact for {} ranks: run it under MPI (`mpirun -n {} kiln run                      MODEL.kiln`) or with kiln_runtime::cluster",
                    c.world, c.world
                ),
            });
        }
        let Artifact {
            compiler_version,
            target,
            mut plan,
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
        let mut weights_buf = AlignedBuf::from_bytes(&weights);
        drop(weights);
        let wbase = weights_buf.as_mut_ptr();
        let others = std::mem::take(&mut plan.variants);
        let mut variants = Vec::with_capacity(1 + others.len());
        for p in std::iter::once(plan).chain(others) {
            variants.push(Instance::new(p, &library, wbase, &path)?);
        }
        let scratch_bytes = variants
            .iter()
            .map(|v| max_scratch_bytes(&v.plan))
            .max()
            .unwrap_or(0);
        let scratch =
            ScratchSlots::new(scratch_bytes, 1).map_err(|msg| ArtifactError::Malformed {
                path: path.clone(),
                field: "plan.steps[].scratch_bytes".into(),
                msg,
            })?;
        Ok(Self {
            path,
            artifact_info: (compiler_version, target),
            variants,
            pool: None,
            scratch,
            split: SplitChoice::default(),
            _library: library,
            _weights: weights_buf,
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
        // One scratch slot per thread, allocated here, not per call. Should that fail, the
        // old slots stay and split steps run on as many chunks as there are slots.
        if self.scratch.slots() < threads {
            let bytes = self.scratch.slot_bytes() as u64;
            if let Ok(s) = ScratchSlots::new(bytes, threads) {
                self.scratch = s;
            }
        }
        self.split = SplitChoice::default();
    }

    /// Whether runs currently split steps over the threads of [`Model::set_threads`]: with
    /// several threads the model times runs with and without splitting every
    /// [`crate::split_choice::PERIOD`] runs and keeps the faster way.
    pub fn splits_steps(&self) -> bool {
        self.pool.is_some() && self.split.pool_chosen()
    }

    /// Number of threads the model runs on (see [`Model::set_threads`]).
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, Pool::threads)
    }

    /// The execution plan (of the first shape variant).
    pub fn plan(&self) -> &ExecPlan {
        &self.variants[0].plan
    }

    /// The execution plans of all shape variants, in the order they are tried.
    pub fn plans(&self) -> impl Iterator<Item = &ExecPlan> {
        self.variants.iter().map(|v| &v.plan)
    }

    /// The compiler version recorded in the artifact.
    pub fn compiler_version(&self) -> &str {
        &self.artifact_info.0
    }

    /// The target recorded in the artifact.
    pub fn target(&self) -> &str {
        &self.artifact_info.1
    }

    /// Binds `inputs` to the first variant that accepts them and returns its index; with
    /// several variants, an input no variant accepts gets an error listing the accepted
    /// shapes.
    fn select(&mut self, inputs: &[TensorView<'_>]) -> Result<usize, RunError> {
        let mut first_err = None;
        for (i, v) in self.variants.iter_mut().enumerate() {
            match v.bind(inputs) {
                Ok(()) => return Ok(i),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let err = first_err.expect("a model has at least one variant");
        if self.variants.len() == 1 {
            return Err(err);
        }
        let accepted: Vec<String> = self
            .variants
            .iter()
            .map(|v| {
                let shapes: Vec<String> = v
                    .plan
                    .inputs
                    .iter()
                    .map(|io| {
                        let d: Vec<String> = io.shape.iter().map(|d| d.to_string()).collect();
                        format!("[{}]", d.join(", "))
                    })
                    .collect();
                shapes.join(" ")
            })
            .collect();
        Err(match err {
            RunError::Input { index, name, msg } => RunError::Input {
                index,
                name,
                msg: format!(
                    "{msg}; this artifact was compiled for these input shapes only: {}",
                    accepted.join(", ")
                ),
            },
            other => other,
        })
    }

    /// The output shapes `inputs` would produce (checks the inputs like [`Model::run`]).
    /// Fails with [`RunError::DynamicShape`] if an output's shape depends on the input values
    /// (a [`crate::DimSpec::Dynamic`] dim): only [`Model::run`] can tell it.
    pub fn output_shapes(
        &mut self,
        inputs: &[TensorView<'_>],
    ) -> Result<Vec<Vec<usize>>, RunError> {
        let i = self.select(inputs)?;
        let v = &self.variants[i];
        Self::refuse_dynamic(v)?;
        Ok((0..v.outputs.len()).map(|o| v.output_shape(o)).collect())
    }

    /// The first output of `v` with a data-dependent shape, as an error.
    fn refuse_dynamic(v: &Instance) -> Result<(), RunError> {
        match (0..v.outputs.len()).find(|&o| v.output_is_dynamic(o)) {
            Some(index) => Err(RunError::DynamicShape {
                index,
                name: v.plan.outputs[index].name.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Runs the model, returning freshly allocated outputs (with their run-time shapes, also
    /// for outputs whose shape depends on the input values).
    pub fn run(&mut self, inputs: &[TensorView<'_>]) -> Result<Vec<Tensor>, RunError> {
        let i = self.select(inputs)?;
        let v = &mut self.variants[i];
        // Outputs of the dynamic tail are allocated once their shape is known.
        let mut outs: Vec<Tensor> = (0..v.outputs.len())
            .map(|o| {
                let dtype = v.plan.outputs[o].dtype;
                match v.output_from_tail(o) {
                    true => Tensor::zeroed(dtype, vec![0]),
                    false => Tensor::zeroed(dtype, v.output_shape(o)),
                }
            })
            .collect();
        let ptrs: Vec<*mut u8> = outs
            .iter_mut()
            .map(|t| t.data.as_mut_slice().as_mut_ptr())
            .collect();
        let t = Instant::now();
        let pool = self.pool.as_ref().filter(|_| self.split.begin(t));
        // SAFETY: bound by `select`; the outputs are fresh, aligned and of the right size
        // (no step writes a tail output).
        unsafe { v.execute(inputs, |o| ptrs[o], None, pool, &self.scratch) }?;
        if self.pool.is_some() {
            self.split.record(t, Instant::now());
        }
        // SAFETY: `execute` succeeded with these inputs and outputs.
        for (o, t) in unsafe { v.run_tail(inputs, |o| ptrs[o]) }? {
            outs[o] = Tensor {
                dtype: v.plan.outputs[o].dtype,
                shape: t.shape().to_vec(),
                data: AlignedBuf::from_bytes(&to_raw(&t)),
            };
        }
        Ok(outs)
    }

    /// Runs the model `repeat` times and returns each step's kernel name with its total time
    /// over the runs, in plan order (a per-kernel profile, as `kiln run --profile` prints).
    pub fn profile(
        &mut self,
        inputs: &[TensorView<'_>],
        repeat: usize,
    ) -> Result<Vec<(String, std::time::Duration)>, RunError> {
        let i = self.select(inputs)?;
        let v = &mut self.variants[i];
        // Tail outputs (output_shape 0 where data-dependent) are not written by the steps.
        let mut outs: Vec<Tensor> = (0..v.outputs.len())
            .map(|o| Tensor::zeroed(v.plan.outputs[o].dtype, v.output_shape(o)))
            .collect();
        let ptrs: Vec<*mut u8> = outs
            .iter_mut()
            .map(|t| t.data.as_mut_slice().as_mut_ptr())
            .collect();
        let mut times = vec![std::time::Duration::ZERO; v.kernels.len()];
        let mut tail_time = std::time::Duration::ZERO;
        for _ in 0..repeat {
            // SAFETY: as in `run`.
            unsafe {
                v.execute(
                    inputs,
                    |o| ptrs[o],
                    Some(&mut times),
                    self.pool.as_ref(),
                    &self.scratch,
                )
            }?;
            let t = std::time::Instant::now();
            // SAFETY: as in `run`.
            unsafe { v.run_tail(inputs, |o| ptrs[o]) }?;
            tail_time += t.elapsed();
        }
        let mut prof: Vec<(String, std::time::Duration)> = v
            .plan
            .steps
            .iter()
            .zip(times)
            .map(|(s, t)| (s.kernel.clone(), t))
            .collect();
        if v.plan.tail.is_some() {
            prof.push(("dynamic_tail".into(), tail_time));
        }
        Ok(prof)
    }

    /// Runs the model, writing output `o` into `outputs[o]`, which must have exactly its size
    /// in bytes (see [`Model::output_shapes`]) and be aligned to its element size. Allocates
    /// nothing (except in a dynamic tail). Fails with [`RunError::DynamicShape`] if an
    /// output's shape depends on the input values: use [`Model::run`].
    pub fn run_into(
        &mut self,
        inputs: &[TensorView<'_>],
        outputs: &mut [&mut [u8]],
    ) -> Result<(), RunError> {
        let i = self.select(inputs)?;
        let v = &mut self.variants[i];
        if outputs.len() != v.outputs.len() {
            return Err(RunError::OutputCount {
                expected: v.outputs.len(),
                got: outputs.len(),
            });
        }
        Self::refuse_dynamic(v)?;
        for (o, buf) in outputs.iter().enumerate() {
            let spec = &v.plan.outputs[o];
            let err = |msg: String| RunError::Output {
                index: o,
                name: spec.name.clone(),
                msg,
            };
            let need = v.output_bytes(o);
            if buf.len() != need {
                return Err(err(format!(
                    "buffer has {} bytes, the output (shape {:?}, {}) needs {need}",
                    buf.len(),
                    v.output_shape(o),
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
        let t = Instant::now();
        let pool = self.pool.as_ref().filter(|_| self.split.begin(t));
        // SAFETY: bound by `select`; buffer sizes and alignment checked; `&mut` buffers cannot
        // alias the shared input slices. `base.add(o)` stays within `outputs` (o < len).
        unsafe {
            v.execute(
                inputs,
                |o| (*base.add(o)).as_mut_ptr(),
                None,
                pool,
                &self.scratch,
            )
        }?;
        if self.pool.is_some() {
            self.split.record(t, Instant::now());
        }
        // Tail outputs of static shape: computed by the interpreter, copied in.
        // SAFETY: as for `execute`.
        let tail = unsafe { v.run_tail(inputs, |o| (*base.add(o)).as_mut_ptr()) }?;
        for (o, t) in tail {
            let raw = to_raw(&t);
            if t.shape() != v.output_shape(o).as_slice() || raw.len() != outputs[o].len() {
                return Err(RunError::Output {
                    index: o,
                    name: v.plan.outputs[o].name.clone(),
                    msg: format!(
                        "the dynamic tail computed shape {:?}, the plan declares {:?}",
                        t.shape(),
                        v.output_shape(o)
                    ),
                });
            }
            outputs[o].copy_from_slice(&raw);
        }
        Ok(())
    }
}
