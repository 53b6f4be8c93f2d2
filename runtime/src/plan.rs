//! The execution plan: everything the executor needs to run a compiled model, as plain data.
//!
//! The compiler fills an [`ExecPlan`] from its own types (graph, fusion partition, memory
//! plan, kernel signatures); this module deliberately depends on none of them, so the
//! runtime stays free of `passes` and `codegen`. The plan is stored in the artifact as JSON
//! (see [`crate::artifact`]).
//!
//! Execution model:
//! - Graph inputs and outputs are caller buffers, weights live in one read-only blob, every
//!   intermediate value lives at a fixed byte range of one 64-byte-aligned arena
//!   ([`BufRef::Arena`], offsets from the memory plan).
//! - The [`Step`]s run in order. Each calls one kernel through the uniform ABI
//!   `void k(void *const *args, const int64_t *dims, void *scratch)`: `args` are the step's
//!   [`BufRef`]s resolved to pointers (the first [`Step::num_inputs`] are read, the rest
//!   written), `dims` the step's [`DimExpr`]s evaluated for this call, `scratch` a private
//!   buffer of at least [`Step::scratch_bytes`] bytes per thread, allocated once at load.
//! - Symbolic input dims ([`DimSpec::Sym`]) are bound from the shapes of the actual inputs;
//!   the same name must have the same value everywhere. Output shapes and step dims may use
//!   only names that some input binds. Because the arena is sized once, a symbol on which an
//!   arena buffer's size depends must have a bound in [`ExecPlan::sym_bounds`] (the planned
//!   maximum); larger inputs are refused.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Alignment, in bytes, of the arena, of the weights blob and of every weight in it.
pub const ALIGNMENT: usize = 64;

/// The largest [`Step::scratch_bytes`] a plan may ask for (1 GiB; the runtime allocates it
/// once per thread).
pub const MAX_SCRATCH_BYTES: u64 = 1 << 30;

/// Element type of a tensor crossing the runtime boundary: the graph's own
/// ([`kiln_ir::DType`]), written by its lowercase name in plans.
pub use kiln_ir::DType;

/// One dimension of a declared input or output shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DimSpec {
    /// A size known at compile time.
    Fixed(u64),
    /// A size known at run time, named (e.g. `batch`); bound from the inputs' shapes.
    Sym(String),
    /// A size known only after running: it depends on the *values* of the inputs (an output
    /// of the [`ExecPlan::tail`], e.g. of `NonZero` or of a `Reshape` whose shape is an
    /// input). Only outputs have such dims; `Model::run` returns them with their run-time
    /// shapes, `Model::run_into` and `Model::output_shapes` refuse them.
    Dynamic,
}

impl fmt::Display for DimSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DimSpec::Fixed(n) => write!(f, "{n}"),
            DimSpec::Sym(s) => f.write_str(s),
            DimSpec::Dynamic => f.write_str("?"),
        }
    }
}

/// A graph input or output: name, element type and shape (dense, row-major).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoSpec {
    /// The ONNX name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first.
    pub shape: Vec<DimSpec>,
}

/// One weight (constant tensor) in the weights blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightSpec {
    /// The ONNX initializer name (diagnostics only).
    pub name: String,
    /// Byte offset in the weights blob, a multiple of [`ALIGNMENT`].
    pub offset: u64,
    /// Size in bytes.
    pub bytes: u64,
}

/// A buffer passed to a kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufRef {
    /// A byte range of the arena (an intermediate value).
    Arena {
        /// Byte offset in the arena.
        offset: u64,
        /// Size in bytes (checked against [`ExecPlan::arena_bytes`]).
        bytes: u64,
    },
    /// A weight, by index in [`ExecPlan::weights`]. Read-only.
    Weight {
        /// Index in [`ExecPlan::weights`].
        index: usize,
    },
    /// A graph input, by index in [`ExecPlan::inputs`]. Read-only.
    Input {
        /// Index in [`ExecPlan::inputs`].
        index: usize,
    },
    /// A graph output, by index in [`ExecPlan::outputs`].
    Output {
        /// Index in [`ExecPlan::outputs`].
        index: usize,
    },
}

/// A value of the `dims` array passed to a kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DimExpr {
    /// A constant.
    Const(i64),
    /// The run-time value of a symbolic input dim ([`DimSpec::Sym`]), by name.
    Sym(String),
}

/// One kernel call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The symbol exported by the kernel library.
    pub kernel: String,
    /// The kernel's buffers, in ABI order: inputs, then outputs.
    pub args: Vec<BufRef>,
    /// How many of `args` are inputs (read); the rest are written and must be
    /// [`BufRef::Arena`] or [`BufRef::Output`].
    pub num_inputs: usize,
    /// The kernel's symbolic dims (`dims[2..]` of the kernel ABI; the runtime puts the task
    /// range in `dims[0..2]`).
    pub dims: Vec<DimExpr>,
    /// Number of independent work items of the kernel (1: serial); with several threads the
    /// runtime splits `0..tasks` into contiguous ranges, one per thread.
    #[serde(default = "one")]
    pub tasks: u64,
    /// Bytes of scratch memory one call of the kernel needs (its temporary buffers; the
    /// runtime passes each thread its own 64-byte-aligned buffer, at most
    /// [`MAX_SCRATCH_BYTES`]).
    #[serde(default)]
    pub scratch_bytes: u64,
    /// A step with no compiled kernel: its nodes as a static-shape `kiln_ir::Graph` (JSON)
    /// run by the reference interpreter (the runtime's `reference` module); `kernel` is then
    /// only a label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

fn one() -> u64 {
    1
}

/// The nodes of a model whose shapes depend on input values (the *dynamic tail*), run after
/// the steps by the reference interpreter with run-time shapes (see `crate::reference`).
///
/// The compiler compiles the largest static-shape prefix of the model to steps; the tail
/// reads graph inputs, weights, model outputs and arena values written by the steps, and
/// computes the model outputs listed in `outputs` (which no step writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DynamicTail {
    /// The tail as a `kiln_ir::Graph` (JSON): static-shape inputs, outputs of any shape.
    pub graph: String,
    /// The buffer of each graph input, in order (read-only; [`BufRef::Output`] only for
    /// outputs the steps write).
    pub inputs: Vec<BufRef>,
    /// For each graph output, in order, the index in [`ExecPlan::outputs`] it is.
    pub outputs: Vec<usize>,
}

/// The largest value a symbolic dim may take at run time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymBound {
    /// The symbol name.
    pub name: String,
    /// Its largest allowed value (inclusive).
    pub max: u64,
}

/// A compiled model's execution plan. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecPlan {
    /// Graph inputs, in call order.
    pub inputs: Vec<IoSpec>,
    /// Graph outputs, in result order.
    pub outputs: Vec<IoSpec>,
    /// Size of the arena in bytes.
    pub arena_bytes: u64,
    /// Weights, located in the weights blob.
    pub weights: Vec<WeightSpec>,
    /// Kernel calls, in execution order.
    pub steps: Vec<Step>,
    /// Upper bounds of symbolic dims (see the module documentation).
    #[serde(default)]
    pub sym_bounds: Vec<SymBound>,
    /// Other shape variants of the same model (e.g. one specialisation per batch size up to
    /// `--max-batch`), each a complete plan over the same weights blob and kernel library;
    /// the runtime runs the first plan (this one, then these in order) whose input shapes
    /// accept the inputs. Variants have no variants of their own.
    #[serde(default)]
    pub variants: Vec<ExecPlan>,
    /// The part of the model whose shapes depend on input values, run after the steps (see
    /// [`DynamicTail`]); `None` for a model with static shapes. Plans written before this
    /// field existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<DynamicTail>,
    /// The GPU program of a `cuda:...` artifact (then [`ExecPlan::steps`] is empty and the
    /// artifact's kernel section holds PTX); `None` for CPU plans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuPlan>,
    /// The per-rank programs of a sharded (cluster) artifact (then [`ExecPlan::steps`] is
    /// empty and the weights section holds each rank's compute segments as nested
    /// artifacts; see [`crate::cluster`]); `None` for single-device plans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterPlan>,
}

/// The GPU program of a plan: kernel launches in order on one stream, over one device arena
/// (the memory plan's, [`ExecPlan::arena_bytes`]), the weights (uploaded once) and the
/// caller's inputs and outputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuPlan {
    /// The SKU of the device database the PTX was generated for (`h100-sxm`).
    pub sku: String,
    /// Its product name in the database (`NVIDIA H100 SXM5 80GB`), matched against the
    /// driver's device name at load ([`GpuPlan::check_device`]).
    pub sku_display: String,
    /// Its architecture (`sm_90`).
    pub arch: String,
    /// Launches, in order.
    pub steps: Vec<GpuStep>,
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStep {
    /// The PTX entry name.
    pub kernel: String,
    /// Arguments in parameter order.
    pub args: Vec<GpuArg>,
    /// Blocks per grid `(x, y, z)`.
    pub grid: [u32; 3],
    /// Threads per block `(x, y, z)`.
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    /// The partition kernel it belongs to (for profiles and reports).
    pub label: String,
    /// Whether the kernel comes from the generic (one thread per element) path.
    #[serde(default)]
    pub generic: bool,
}

/// One launch argument: a buffer (passed as the memref descriptor `(p, p, 0, len, 1)` with
/// `p` = the buffer's device address + `offset` bytes), an `index` (i64) or an `f32`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuArg {
    /// A buffer view.
    Buf {
        /// The buffer.
        buf: BufRef,
        /// Byte offset into it.
        offset: u64,
        /// Length in elements (the descriptor's size).
        len: u64,
        /// Bytes per element.
        elem_bytes: u64,
        /// Whether the launch writes it.
        #[serde(default)]
        written: bool,
    },
    /// An `index` scalar.
    Index(i64),
    /// An `f32` scalar, as its IEEE bits.
    F32(u32),
    /// A TMA descriptor (the sm_90 `wgmma` GEMM's operands): the runtime encodes a rank-2,
    /// 16-bit, tiled descriptor of the view with `cuTensorMapEncodeTiled` at load (128-byte
    /// swizzle, no interleave, no L2 promotion, zero fill out of bounds), stores it in device
    /// memory and passes its address (one `u64` parameter). Read-only.
    #[serde(rename = "tensormap")]
    TensorMap {
        /// The buffer.
        buf: BufRef,
        /// Byte offset of the matrix in it (a multiple of 16).
        offset: u64,
        /// Elements the view covers (`dims[1] · row_bytes / 2`, checked like a buffer view).
        len: u64,
        /// Global extent, innermost first.
        dims: [u64; 2],
        /// Byte stride of the outer dimension (a multiple of 16).
        row_bytes: u64,
        /// Box extent, innermost first.
        box_dims: [u32; 2],
        /// bf16 elements (else f16).
        bf16: bool,
    },
}

/// Lowercase alphanumeric tokens of a device or product name (`NVIDIA A100-SXM4-80GB` →
/// `nvidia a100 sxm4 80gb`).
fn name_tokens(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(|t| t.to_ascii_lowercase())
        .collect()
}

impl GpuPlan {
    /// Whether the GPU the driver reports (`device_name`, compute capability `device_arch`
    /// as `sm_XY`) is the SKU this plan was compiled for: same architecture, the product's
    /// model token (`h100`, `a100`, `l4`, `4090`: the first token of
    /// [`GpuPlan::sku_display`] with a digit) among the device name's tokens, and `pcie` in
    /// both names or in neither. The error names both.
    pub fn check_device(&self, device_name: &str, device_arch: &str) -> Result<(), String> {
        let sku = name_tokens(&self.sku_display);
        let dev = name_tokens(device_name);
        let model = sku.iter().find(|t| t.chars().any(|c| c.is_ascii_digit()));
        let same_model = model.is_some_and(|m| dev.contains(m));
        let pcie = |t: &[String]| t.iter().any(|x| x == "pcie");
        if device_arch.eq_ignore_ascii_case(&self.arch) && same_model && pcie(&sku) == pcie(&dev) {
            return Ok(());
        }
        Err(format!(
            "the artifact was compiled for {} ({}, {}) but the GPU present is {device_name}              ({device_arch}); recompile with --target cuda:<this GPU> or pass              --allow-sku-mismatch",
            self.sku, self.sku_display, self.arch
        ))
    }

    /// Checks every launch against `plan`: non-empty grids and blocks, buffer views inside
    /// their buffers (arena, weights of `weights_len` bytes, inputs, outputs), inputs and
    /// weights never written. Returns which outputs some launch writes.
    pub fn validate(&self, plan: &ExecPlan) -> Result<Vec<bool>, String> {
        let mut written = vec![false; plan.outputs.len()];
        let numel = |io: &IoSpec| -> Option<u64> {
            io.shape.iter().try_fold(1u64, |a, d| match d {
                DimSpec::Fixed(n) => a.checked_mul(*n),
                _ => None,
            })
        };
        for (si, s) in self.steps.iter().enumerate() {
            let at = || format!("GPU step {si} ('{}')", s.kernel);
            if s.grid.contains(&0) || s.block.contains(&0) {
                return Err(format!(
                    "{}: empty grid {:?} or block {:?}",
                    at(),
                    s.grid,
                    s.block
                ));
            }
            for (ai, a) in s.args.iter().enumerate() {
                let (buf, offset, len, elem_bytes, w) = match a {
                    GpuArg::Buf {
                        buf,
                        offset,
                        len,
                        elem_bytes,
                        written,
                    } => (buf, offset, len, elem_bytes, written),
                    GpuArg::TensorMap {
                        buf,
                        offset,
                        len,
                        dims,
                        row_bytes,
                        ..
                    } => {
                        if !offset.is_multiple_of(16)
                            || !row_bytes.is_multiple_of(16)
                            || dims[0].saturating_mul(2) > *row_bytes
                            || dims[1].saturating_mul(*row_bytes) > len.saturating_mul(2)
                        {
                            return Err(format!("{}: arg {ai}: bad tensor map", at()));
                        }
                        (buf, offset, len, &2u64, &false)
                    }
                    _ => continue,
                };
                let bytes = len
                    .checked_mul(*elem_bytes)
                    .and_then(|b| b.checked_add(*offset))
                    .ok_or_else(|| format!("{}: arg {ai}: size overflows", at()))?;
                let (cap, what) = match buf {
                    BufRef::Arena {
                        offset: o,
                        bytes: b,
                    } => {
                        if o.checked_add(*b).is_none_or(|e| e > plan.arena_bytes) {
                            return Err(format!("{}: arg {ai}: outside the arena", at()));
                        }
                        (*b, "arena slot")
                    }
                    BufRef::Weight { index } => {
                        let wt = plan.weights.get(*index).ok_or_else(|| {
                            format!("{}: arg {ai}: weight {index} out of range", at())
                        })?;
                        if *w {
                            return Err(format!("{}: arg {ai}: writes a weight", at()));
                        }
                        (wt.bytes, "weight")
                    }
                    BufRef::Input { index } => {
                        let io = plan.inputs.get(*index).ok_or_else(|| {
                            format!("{}: arg {ai}: input {index} out of range", at())
                        })?;
                        if *w {
                            return Err(format!("{}: arg {ai}: writes input '{}'", at(), io.name));
                        }
                        let n = numel(io).ok_or_else(|| {
                            format!("{}: input '{}' is not static", at(), io.name)
                        })?;
                        (io.dtype.bytes_for(n as usize).unwrap_or(0) as u64, "input")
                    }
                    BufRef::Output { index } => {
                        let io = plan.outputs.get(*index).ok_or_else(|| {
                            format!("{}: arg {ai}: output {index} out of range", at())
                        })?;
                        if *w {
                            written[*index] = true;
                        }
                        let n = numel(io).ok_or_else(|| {
                            format!("{}: output '{}' is not static", at(), io.name)
                        })?;
                        (io.dtype.bytes_for(n as usize).unwrap_or(0) as u64, "output")
                    }
                };
                if bytes > cap {
                    return Err(format!(
                        "{}: arg {ai}: bytes {offset}..{bytes} outside its {cap}-byte {what}",
                        at()
                    ));
                }
            }
        }
        Ok(written)
    }
}

impl ExecPlan {
    /// Checks the plan's internal consistency against a weights blob of `weights_len` bytes:
    /// weights aligned and inside the blob, arena ranges inside the arena, every buffer index
    /// in range, kernels writing only arena or outputs, every output written, symbolic names
    /// bound by some input. The error names the offending item.
    pub fn validate(&self, weights_len: u64) -> Result<(), String> {
        if let Some(c) = &self.cluster {
            // a sharded plan: the ranks' programs write the outputs, not steps
            if !self.steps.is_empty() || self.gpu.is_some() || !self.variants.is_empty() {
                return Err("a cluster plan has no steps, GPU plan or variants of its own".into());
            }
            return c.validate(weights_len);
        }
        for (k, v) in self.variants.iter().enumerate() {
            if !v.variants.is_empty() {
                return Err(format!("variant {k}: nested variants"));
            }
            v.validate(weights_len)
                .map_err(|e| format!("variant {}: {e}", k + 1))?;
            if v.inputs.len() != self.inputs.len() || v.outputs.len() != self.outputs.len() {
                return Err(format!(
                    "variant {}: {} inputs and {} outputs, the main plan has {} and {}",
                    k + 1,
                    v.inputs.len(),
                    v.outputs.len(),
                    self.inputs.len(),
                    self.outputs.len()
                ));
            }
        }
        for (i, w) in self.weights.iter().enumerate() {
            if w.offset % ALIGNMENT as u64 != 0 {
                return Err(format!(
                    "weight {i} '{}': offset {} is not a multiple of {ALIGNMENT}",
                    w.name, w.offset
                ));
            }
            if w.offset
                .checked_add(w.bytes)
                .is_none_or(|end| end > weights_len)
            {
                return Err(format!(
                    "weight {i} '{}': bytes {}..+{} outside the {weights_len}-byte weights blob",
                    w.name, w.offset, w.bytes
                ));
            }
        }
        let mut bound = BTreeMap::new();
        for io in &self.inputs {
            for d in &io.shape {
                if let DimSpec::Sym(s) = d {
                    bound.insert(s.as_str(), ());
                }
            }
        }
        for o in &self.outputs {
            for d in &o.shape {
                if let DimSpec::Sym(s) = d {
                    if !bound.contains_key(s.as_str()) {
                        return Err(format!(
                            "output '{}': symbolic dim '{s}' is not bound by any input",
                            o.name
                        ));
                    }
                }
            }
        }
        for io in &self.inputs {
            if io.shape.contains(&DimSpec::Dynamic) {
                return Err(format!(
                    "input '{}': a data-dependent dim is only allowed in outputs",
                    io.name
                ));
            }
        }
        for b in &self.sym_bounds {
            if !bound.contains_key(b.name.as_str()) {
                return Err(format!(
                    "sym_bounds: symbol '{}' is not bound by any input",
                    b.name
                ));
            }
        }
        let mut written = vec![false; self.outputs.len()];
        for (si, step) in self.steps.iter().enumerate() {
            let at = || format!("step {si} ('{}')", step.kernel);
            if step.tasks == 0 || step.tasks > i64::MAX as u64 {
                return Err(format!("{}: tasks {} out of range", at(), step.tasks));
            }
            if step.scratch_bytes > MAX_SCRATCH_BYTES {
                return Err(format!(
                    "{}: scratch_bytes {} exceeds the {MAX_SCRATCH_BYTES}-byte limit",
                    at(),
                    step.scratch_bytes
                ));
            }
            if step.reference.is_some() && (step.tasks != 1 || !step.dims.is_empty()) {
                return Err(format!("{}: a reference step has no tasks or dims", at()));
            }
            if step.num_inputs > step.args.len() {
                return Err(format!(
                    "{}: num_inputs {} exceeds its {} args",
                    at(),
                    step.num_inputs,
                    step.args.len()
                ));
            }
            for (ai, a) in step.args.iter().enumerate() {
                let is_output = ai >= step.num_inputs;
                match a {
                    BufRef::Arena { offset, bytes } => {
                        if offset
                            .checked_add(*bytes)
                            .is_none_or(|end| end > self.arena_bytes)
                        {
                            return Err(format!(
                                "{}: arg {ai}: arena bytes {offset}..+{bytes} outside the \
                                 {}-byte arena",
                                at(),
                                self.arena_bytes
                            ));
                        }
                    }
                    BufRef::Weight { index } => {
                        if *index >= self.weights.len() {
                            return Err(format!(
                                "{}: arg {ai}: weight {index} out of range ({} weights)",
                                at(),
                                self.weights.len()
                            ));
                        }
                        if is_output {
                            return Err(format!(
                                "{}: arg {ai}: writes weight {index}, which is read-only",
                                at()
                            ));
                        }
                    }
                    BufRef::Input { index } => {
                        if *index >= self.inputs.len() {
                            return Err(format!(
                                "{}: arg {ai}: input {index} out of range ({} inputs)",
                                at(),
                                self.inputs.len()
                            ));
                        }
                        if is_output {
                            return Err(format!(
                                "{}: arg {ai}: writes input '{}', which is read-only",
                                at(),
                                self.inputs[*index].name
                            ));
                        }
                    }
                    BufRef::Output { index } => {
                        if *index >= self.outputs.len() {
                            return Err(format!(
                                "{}: arg {ai}: output {index} out of range ({} outputs)",
                                at(),
                                self.outputs.len()
                            ));
                        }
                        if is_output {
                            written[*index] = true;
                        }
                    }
                }
            }
            for (di, d) in step.dims.iter().enumerate() {
                if let DimExpr::Sym(s) = d {
                    if !bound.contains_key(s.as_str()) {
                        return Err(format!(
                            "{}: dims[{di}]: symbol '{s}' is not bound by any input",
                            at()
                        ));
                    }
                }
            }
        }
        if let Some(gp) = &self.gpu {
            if !self.steps.is_empty() || self.tail.is_some() {
                return Err("a GPU plan has no CPU steps and no dynamic tail".into());
            }
            for (o, w) in gp.validate(self)?.into_iter().enumerate() {
                written[o] |= w;
            }
        }
        if let Some(t) = &self.tail {
            self.validate_tail(t, &mut written)?;
        }
        for (o, io) in self.outputs.iter().enumerate() {
            let tail_out = self.tail.as_ref().is_some_and(|t| t.outputs.contains(&o));
            if io.shape.contains(&DimSpec::Dynamic) && !tail_out {
                return Err(format!(
                    "output '{}' has a data-dependent dim but the dynamic tail does not \
                     compute it",
                    io.name
                ));
            }
        }
        if let Some(i) = written.iter().position(|w| !w) {
            return Err(format!(
                "output '{}' is never written by any step",
                self.outputs[i].name
            ));
        }
        Ok(())
    }
}

impl ExecPlan {
    /// Checks the dynamic tail's buffers: indices in range, outputs distinct and written by
    /// no step (marked in `written`), inputs read only what exists before the tail runs.
    fn validate_tail(&self, t: &DynamicTail, written: &mut [bool]) -> Result<(), String> {
        let steps_wrote = written.to_vec();
        for &o in &t.outputs {
            let Some(w) = written.get_mut(o) else {
                return Err(format!(
                    "tail: output {o} out of range ({} outputs)",
                    self.outputs.len()
                ));
            };
            if *w {
                return Err(format!(
                    "tail: output '{}' is written twice (by a step or the tail)",
                    self.outputs[o].name
                ));
            }
            *w = true;
        }
        for (i, b) in t.inputs.iter().enumerate() {
            let ok = match b {
                BufRef::Arena { offset, bytes } => offset
                    .checked_add(*bytes)
                    .is_some_and(|end| end <= self.arena_bytes),
                BufRef::Weight { index } => *index < self.weights.len(),
                BufRef::Input { index } => *index < self.inputs.len(),
                BufRef::Output { index } => steps_wrote.get(*index).copied().unwrap_or(false),
            };
            if !ok {
                return Err(format!(
                    "tail: input {i}: {b:?} is out of range or not written by a step"
                ));
            }
        }
        Ok(())
    }
}

/// Builds a weights blob: appends each weight at the next multiple of [`ALIGNMENT`]; a weight
/// whose bytes equal an earlier one's is stored once.
#[derive(Debug, Default)]
pub struct WeightsBuilder {
    blob: Vec<u8>,
    specs: Vec<WeightSpec>,
    by_hash: std::collections::HashMap<u64, Vec<usize>>,
}

/// FNV-1a over the bytes (to find candidate duplicates; equality is checked in full).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl WeightsBuilder {
    /// An empty blob.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a weight and returns its index (for [`BufRef::Weight`]); the index of an
    /// earlier weight with the same bytes if there is one.
    pub fn push(&mut self, name: &str, data: &[u8]) -> usize {
        let h = fnv1a(data);
        let candidates = self.by_hash.entry(h).or_default();
        for &i in candidates.iter() {
            let w = &self.specs[i];
            let (o, n) = (w.offset as usize, w.bytes as usize);
            if self.blob[o..o + n] == *data {
                return i;
            }
        }
        candidates.push(self.specs.len());
        let offset = self.blob.len().next_multiple_of(ALIGNMENT);
        self.blob.resize(offset, 0);
        self.blob.extend_from_slice(data);
        self.specs.push(WeightSpec {
            name: name.to_string(),
            offset: offset as u64,
            bytes: data.len() as u64,
        });
        self.specs.len() - 1
    }

    /// The blob (padded to a multiple of [`ALIGNMENT`]) and the weight specs.
    pub fn finish(mut self) -> (Vec<u8>, Vec<WeightSpec>) {
        let len = self.blob.len().next_multiple_of(ALIGNMENT);
        self.blob.resize(len, 0);
        (self.blob, self.specs)
    }
}
