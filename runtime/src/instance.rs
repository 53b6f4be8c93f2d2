//! One specialised execution plan, prepared for running: kernel pointers resolved, the
//! arena allocated, each step's `args` and `dims` arrays pre-built (only input/output
//! pointers and symbolic dims are patched per call). A [`crate::Model`] holds one instance per
//! shape variant of its artifact and runs the one whose input shapes match.

use crate::executor::{AlignedBuf, LoadError, RunError, TensorView};
use crate::kernel_lib::{KernelFn, KernelLibrary};
use crate::plan::{BufRef, DimExpr, DimSpec, ExecPlan, ALIGNMENT};
use crate::pool::Pool;
use crate::reference::{RefKernel, RefTail};
use std::collections::HashMap;

/// A dim of a declared shape, with symbols resolved to indices.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Dim {
    Fixed(usize),
    Sym(usize),
    /// Known only after running (an output of the dynamic tail).
    Dynamic,
}

/// A per-call pointer patch of a step's `args`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum IoPatch {
    Input(usize),
    Output(usize),
}

/// The calls of one step on several threads: chunk `c` (of `chunks`) is a contiguous
/// range of the step's tasks; whichever thread runs it passes its own scratch slot.
struct Split<'a> {
    f: KernelFn,
    args: &'a [*mut u8],
    dims: &'a [i64],
    tasks: i64,
    chunks: i64,
    /// Thread `t` of the pool uses scratch slot `t` (the pool's threads <= the slots).
    scratch: &'a ScratchSlots,
}

// SAFETY: the pointers are only passed on to the kernel, which writes disjoint task ranges.
unsafe impl Sync for Split<'_> {}

impl Split<'_> {
    fn run(&self, c: usize, thread: usize) {
        let (begin, end) = chunk_range(self.tasks, self.chunks, c as i64);
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
        // SAFETY: as in `Model::execute`; the ranges of different chunks are disjoint, and
        // threads running at the same time use different scratch slots.
        unsafe { (self.f)(self.args.as_ptr(), d.as_ptr(), self.scratch.slot(thread)) };
    }
}

/// Chunks a step of `tasks` tasks is split into on `threads` threads: one per thread, at
/// most one per task. (Finer chunks, so that a late or slow thread would take fewer, measured
/// slower on the zoo: every call of a conv kernel repeats its input copy or transform.)
fn chunk_count(tasks: i64, threads: i64) -> i64 {
    tasks.min(threads)
}

/// Task range `[begin, end)` of chunk `c` when `tasks` tasks are cut into `chunks` nearly
/// equal contiguous chunks.
fn chunk_range(tasks: i64, chunks: i64, c: i64) -> (i64, i64) {
    (tasks * c / chunks, tasks * (c + 1) / chunks)
}

/// Kernel scratch memory (see the ABI in `kiln_codegen::cpu::abi`): `slots` zeroed,
/// 64-byte-aligned buffers of `slot_bytes` each in one allocation, made at load or by
/// `Model::set_threads`, never per call. A call on one thread, or chunk `c` of a split step,
/// passes slot 0, or slot `c`, to the kernel.
pub(crate) struct ScratchSlots {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    slot_bytes: usize,
    slots: usize,
}

impl ScratchSlots {
    /// `slots` (at least 1) buffers of at least `bytes` bytes each; an error (not an abort)
    /// if the memory cannot be had.
    pub(crate) fn new(bytes: u64, slots: usize) -> Result<Self, String> {
        let slots = slots.max(1);
        let too_big =
            || format!("{slots} kernel scratch buffers of {bytes} bytes do not fit in memory");
        let a = ALIGNMENT as u64;
        // At least one aligned block, so every slot pointer is distinct and dereferenceable.
        let slot_bytes = usize::try_from(bytes.div_ceil(a).max(1) * a).map_err(|_| too_big())?;
        let total = slot_bytes.checked_mul(slots).ok_or_else(too_big)?;
        let layout =
            std::alloc::Layout::from_size_align(total, ALIGNMENT).map_err(|_| too_big())?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(too_big)?;
        Ok(Self {
            ptr,
            layout,
            slot_bytes,
            slots,
        })
    }

    /// Number of slots.
    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes per slot.
    pub(crate) fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Slot `i` (`i < slots`).
    pub(crate) fn slot(&self, i: usize) -> *mut u8 {
        assert!(i < self.slots, "scratch slot {i} of {}", self.slots);
        // SAFETY: in bounds of the allocation.
        unsafe { self.ptr.as_ptr().add(i * self.slot_bytes) }
    }
}

impl Drop for ScratchSlots {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The largest [`crate::Step::scratch_bytes`] of the compiled steps of `plan`.
pub(crate) fn max_scratch_bytes(plan: &ExecPlan) -> u64 {
    plan.steps
        .iter()
        .filter(|s| s.reference.is_none())
        .map(|s| s.scratch_bytes)
        .max()
        .unwrap_or(0)
}

/// What a step runs.
pub(crate) enum StepFn {
    /// A compiled kernel of the library.
    Native(KernelFn),
    /// A reference step (no compiled code).
    Reference(Box<RefKernel>),
}

/// A plan ready to run (see the module doc).
pub(crate) struct Instance {
    pub(crate) plan: ExecPlan,
    pub(crate) kernels: Vec<StepFn>,
    _arena: AlignedBuf,
    pub(crate) inputs: Vec<Vec<Dim>>,
    pub(crate) outputs: Vec<Vec<Dim>>,
    sym_names: Vec<String>,
    sym_max: Vec<Option<u64>>,
    sym_values: Vec<i64>,
    sym_set: Vec<bool>,
    args: Vec<Vec<*mut u8>>,
    arg_patches: Vec<(usize, usize, IoPatch)>,
    dims: Vec<Vec<i64>>,
    dim_patches: Vec<(usize, usize, usize)>,
    /// The dynamic tail, run after the steps ([`Instance::run_tail`]).
    tail: Option<RefTail>,
    /// Arena and weights base addresses (for the tail's buffers).
    arena_base: *mut u8,
    weights_base: *mut u8,
}

impl Instance {
    /// Prepares `plan` (already validated against the weights) with kernels from `library`
    /// and weights at `wbase`; `path` names the artifact in errors.
    pub(crate) fn new(
        plan: ExecPlan,
        library: &KernelLibrary,
        wbase: *mut u8,
        path: &str,
    ) -> Result<Self, LoadError> {
        // Resolve each distinct symbol once; parse reference steps.
        let mut resolved: HashMap<&str, KernelFn> = HashMap::new();
        let mut fns = Vec::with_capacity(plan.steps.len());
        for (step, s) in plan.steps.iter().enumerate() {
            if let Some(json) = &s.reference {
                let r = RefKernel::parse(&plan, s, json).map_err(|msg| {
                    LoadError::Artifact(crate::ArtifactError::Malformed {
                        path: path.to_string(),
                        field: format!("plan.steps[{step}].reference"),
                        msg,
                    })
                })?;
                fns.push(StepFn::Reference(Box::new(r)));
                continue;
            }
            let f = match resolved.get(s.kernel.as_str()) {
                Some(f) => *f,
                None => {
                    let f = library
                        .kernel(&s.kernel)
                        .map_err(|_| LoadError::MissingKernel {
                            path: path.to_string(),
                            step,
                            kernel: s.kernel.clone(),
                        })?
                        .raw();
                    resolved.insert(&s.kernel, f);
                    f
                }
            };
            fns.push(StepFn::Native(f));
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
                    DimSpec::Dynamic => Dim::Dynamic,
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

        let mut arena = AlignedBuf::zeroed(plan.arena_bytes as usize);
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
        let tail = match &plan.tail {
            Some(t) => Some(RefTail::parse(&plan, t).map_err(|msg| {
                LoadError::Artifact(crate::ArtifactError::Malformed {
                    path: path.to_string(),
                    field: "plan.tail".into(),
                    msg,
                })
            })?),
            None => None,
        };
        Ok(Self {
            plan,
            kernels: fns,
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
            tail,
            arena_base: abase,
            weights_base: wbase,
        })
    }

    /// Checks `inputs` against the plan and binds the symbolic dims.
    pub(crate) fn bind(&mut self, inputs: &[TensorView<'_>]) -> Result<(), RunError> {
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
                    // `validate` refuses data-dependent dims in inputs.
                    Dim::Dynamic => return Err(err("declares a data-dependent dim".into())),
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
                .try_fold(1usize, |a, &n| a.checked_mul(n))
                .and_then(|n| t.dtype.bytes_for(n));
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
            if dims.iter().any(|d| matches!(d, Dim::Dynamic)) {
                continue; // sized by the tail at run time
            }
            let bytes = dims
                .iter()
                .try_fold(1usize, |a, d| match *d {
                    Dim::Fixed(n) => a.checked_mul(n),
                    Dim::Sym(k) => a.checked_mul(self.sym_values[k] as usize),
                    Dim::Dynamic => None,
                })
                .and_then(|n| spec.dtype.bytes_for(n));
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

    /// Whether output `index` has a data-dependent dim (known only after running).
    pub(crate) fn output_is_dynamic(&self, index: usize) -> bool {
        self.outputs[index]
            .iter()
            .any(|d| matches!(d, Dim::Dynamic))
    }

    /// Whether output `index` is computed by the dynamic tail (no step writes it).
    pub(crate) fn output_from_tail(&self, index: usize) -> bool {
        self.plan
            .tail
            .as_ref()
            .is_some_and(|t| t.outputs.contains(&index))
    }

    /// The shape of output `index` for the bound symbols; a data-dependent dim
    /// ([`Dim::Dynamic`]) counts as 0 (see [`Instance::output_is_dynamic`]).
    pub(crate) fn output_shape(&self, index: usize) -> Vec<usize> {
        self.output_dims(index).collect()
    }

    /// The dims of output `index` for the bound symbols (0 for data-dependent dims).
    fn output_dims(&self, index: usize) -> impl Iterator<Item = usize> + '_ {
        self.outputs[index].iter().map(|d| match *d {
            Dim::Fixed(n) => n,
            Dim::Sym(k) => self.sym_values[k] as usize,
            Dim::Dynamic => 0,
        })
    }

    /// Byte size of output `index` for the bound symbols (no allocation: `run_into` calls it).
    pub(crate) fn output_bytes(&self, index: usize) -> usize {
        let n: usize = self.output_dims(index).product();
        self.plan.outputs[index]
            .dtype
            .bytes_for(n)
            .expect("checked by bind")
    }

    /// Runs the dynamic tail (if any) after [`Instance::execute`] and returns the outputs it
    /// computes (plan output index, tensor with its run-time shape).
    ///
    /// # Safety
    /// `execute` succeeded with the same `inputs` and `out`.
    pub(crate) unsafe fn run_tail(
        &self,
        inputs: &[TensorView<'_>],
        out: impl Fn(usize) -> *mut u8,
    ) -> Result<Vec<(usize, kiln_ir::Tensor)>, RunError> {
        let Some(tail) = &self.tail else {
            return Ok(Vec::new());
        };
        let buf = |b: &BufRef| -> *const u8 {
            match b {
                BufRef::Input { index } => inputs[*index].data.as_ptr(),
                BufRef::Output { index } => out(*index),
                // SAFETY (both): `validate` checked the ranges lie inside the buffers.
                BufRef::Arena { offset, .. } => unsafe { self.arena_base.add(*offset as usize) },
                BufRef::Weight { index } => unsafe {
                    self.weights_base
                        .add(self.plan.weights[*index].offset as usize)
                },
            }
        };
        // SAFETY: buffer sizes were checked against the plan at load; the steps ran.
        unsafe { tail.run(buf) }.map_err(|msg| RunError::Tail { msg })
    }

    /// Runs the kernels with the bound symbols; `out(o)` is output `o`'s buffer.
    ///
    /// Fails only if a reference step fails (a compiled kernel cannot report errors).
    ///
    /// # Safety
    /// `bind` succeeded for `inputs`, and each `out(o)` is valid for `output_bytes(o)` bytes
    /// of writes, aligned to the element size and disjoint from the inputs.
    pub(crate) unsafe fn execute(
        &mut self,
        inputs: &[TensorView<'_>],
        out: impl Fn(usize) -> *mut u8,
        mut times: Option<&mut [std::time::Duration]>,
        pool: Option<&Pool>,
        scratch: &ScratchSlots,
    ) -> Result<(), RunError> {
        debug_assert!(
            (self.plan.steps.iter())
                .all(|s| s.reference.is_some() || s.scratch_bytes as usize <= scratch.slot_bytes()),
            "scratch slots smaller than a step's scratch"
        );
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
            let f = match f {
                StepFn::Native(f) => f,
                StepFn::Reference(r) => {
                    // SAFETY: buffer sizes were checked against the plan at load.
                    unsafe { r.run(args) }.map_err(|msg| RunError::Step {
                        step: i,
                        kernel: self.plan.steps[i].kernel.clone(),
                        msg,
                    })?;
                    if let (Some(times), Some(t)) = (times.as_deref_mut(), t) {
                        times[i] += t.elapsed();
                    }
                    continue;
                }
            };
            let threads = pool.map_or(1, |p| p.threads());
            match pool {
                // Every thread of the pool needs its own scratch slot (`Model::set_threads`
                // makes one per thread; should that have failed, steps run unsplit).
                Some(pool) if tasks > 1 && threads > 1 && scratch.slots() >= threads => {
                    let chunks = chunk_count(tasks, threads as i64);
                    let split = Split {
                        f: *f,
                        args,
                        dims,
                        tasks,
                        chunks,
                        scratch,
                    };
                    pool.run(chunks as usize, &|c, t| split.run(c, t));
                }
                // SAFETY: the plan was validated at load (buffers in range, inputs and
                // weights only read), the inputs and outputs were checked by the caller; the
                // kernels follow the uniform ABI the compiler promised for these args and
                // dims (`dims[0..2]` = all tasks), with a scratch slot of at least the
                // step's `scratch_bytes` (the model sizes its slots for every step).
                _ => unsafe { f(args.as_ptr(), dims.as_ptr(), scratch.slot(0)) },
            }
            if let (Some(times), Some(t)) = (times.as_deref_mut(), t) {
                times[i] += t.elapsed();
            }
        }
        Ok(())
    }
}
