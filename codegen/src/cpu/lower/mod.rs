//! Lowering of fusion kernels ([`kiln_passes::fusion`]) of a graph to CPU kernels.
//!
//! [`lower_partition`] lowers every kernel of a partition it supports and reports the others
//! with a reason, so the compiler can fall back (for instance to the reference interpreter)
//! for those:
//!
//! * `Elementwise` kernels become one `linalg.generic` over the output shape
//!   ([`elementwise`]): each input gets a broadcasting indexing map (ONNX numpy broadcasting:
//!   size-1 dims are dropped from its memref), scalar constants are inlined as
//!   `arith.constant`, and the nodes become `arith`/`math` ops in the body (f32 with fastmath
//!   `contract`, plus i64 and bool values).
//! * `Contraction` kernels whose contraction is a `MatMul` (2-D, or with the batch dims of
//!   `A` folded into `M` when `B` is 2-D) or a `Gemm` ([`contraction`]) call the packed
//!   matmul of [`super::matmul`] and then run their epilogue (Gemm's `alpha`/`beta·C` and
//!   the fused elementwise nodes) as one `linalg.generic` over the result, in place.
//! * `Contraction` kernels whose contraction is a 2-D `Conv` ([`conv`]): im2col + the packed
//!   matmul (`group = 1`) or a direct loop nest (grouped/depthwise), then bias + epilogue.
//! * Single-node `MaxPool` and global pooling kernels ([`pool`]): `scf.for` loop nests.
//!
//! Every lowered kernel has the uniform ABI ([`super::abi`]): `args` are the kernel's
//! non-inlined inputs ([`LoweredKernel::inputs`], graph constants included: the caller passes
//! their data) followed by its outputs ([`LoweredKernel::outputs`]), dense and row-major;
//! `dims` are the values of the symbolic dims named in the signature (none once the graph is
//! specialised to static shapes).
//!
//! A kernel may also read *derived constants* ([`LoweredKernel::consts`]): buffers computed at
//! compile time from graph constants (for instance a Conv filter repacked in the order its
//! micro-kernel reads it). They are passed between the inputs and the outputs
//! (`args = inputs ++ consts ++ outputs`); the compiler stores them as weights.
//!
//! `exp`, `log`, `log1p`, `tanh`, `erf` and `sigmoid` are emitted as `arith` polynomial /
//! rational approximations ([`fastmath`]) that LLVM vectorises; the remaining math functions
//! lower through `convert-math-to-llvm` (LLVM intrinsics) and `convert-math-to-libm`
//! (`asinhf`, `expm1f`, ... from the C library) — exact, not vectorized.

/// Fewest elements of an elementwise or row-wise kernel split into tasks (about 256 KiB of
/// f32: a few µs of one core's memory traffic).
const MIN_SPLIT_ELEMS: usize = 1 << 16;

pub mod contraction;
pub mod conv;
pub mod elementwise;
pub mod fastmath;
pub mod movement;
pub mod pool;
pub mod reduction;
pub mod tuning;

use super::Kernel;
use crate::CodegenError;
use kiln_ir::{DType, Dim, Graph, ValueId};
use kiln_passes::fusion::{KernelKind, Partition};

/// The pass pipeline of lowered graph kernels: `linalg` to loops, `vector`/`scf`/`memref`/
/// `math` to the LLVM dialect.
pub const GRAPH_KERNEL_PIPELINE: &str = "builtin.module(func.func(convert-linalg-to-loops),convert-vector-to-scf,convert-scf-to-cf,expand-strided-metadata,lower-affine,convert-math-to-llvm,convert-math-to-libm,convert-vector-to-llvm,finalize-memref-to-llvm,convert-to-llvm,reconcile-unrealized-casts)";

/// One partition kernel lowered to a CPU kernel.
#[derive(Debug, Clone)]
pub struct LoweredKernel {
    /// Index of the kernel in [`Partition::kernels`].
    pub index: usize,
    /// The CPU kernel (its signature name is `kiln_<partition kernel name>`).
    pub kernel: Kernel,
    /// The graph values passed as input buffers, in `args` order (a subset of the partition
    /// kernel's inputs: scalar constants are inlined).
    pub inputs: Vec<ValueId>,
    /// Constants derived at compile time (name, data), passed after the inputs in `args`.
    pub consts: Vec<DerivedConst>,
    /// The graph values written as output buffers, after the inputs and the derived constants
    /// in `args`.
    pub outputs: Vec<ValueId>,
}

/// A constant buffer a kernel derives at compile time from graph constants (see the module
/// doc): the compiler stores it as a weight and passes it in `args` after the inputs.
#[derive(Debug, Clone)]
pub struct DerivedConst {
    /// A name for the weight (unique per content: equal names are stored once).
    pub name: String,
    /// The data, dense and row-major.
    pub tensor: kiln_ir::Tensor,
}

/// A partition kernel that was not lowered, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// Index of the kernel in [`Partition::kernels`].
    pub index: usize,
    /// Why it was not lowered.
    pub reason: String,
}

/// The result of [`lower_partition`].
#[derive(Debug, Clone, Default)]
pub struct Lowering {
    /// The kernels that were lowered, in partition order.
    pub kernels: Vec<LoweredKernel>,
    /// The kernels that were not, in partition order.
    pub unsupported: Vec<Unsupported>,
    /// How many kernels were lowered with a tuned schedule.
    pub tuned: usize,
}

impl Lowering {
    /// The CPU kernels, ready for [`super::compile_library`].
    pub fn cpu_kernels(&self) -> Vec<Kernel> {
        self.kernels.iter().map(|k| k.kernel.clone()).collect()
    }
}

/// Lowers every kernel of `p` that this module supports (see the module doc); the others are
/// listed in [`Lowering::unsupported`] with a reason. Errors are reserved for failures that
/// are not a matter of support (none so far: lowering only produces MLIR text, which
/// [`super::compile_library`] compiles).
pub fn lower_partition(g: &Graph, p: &Partition) -> Result<Lowering, CodegenError> {
    lower_partition_with(g, p, &conv::ConvSchedule::default())
}

/// [`lower_partition`] with the schedule `conv_sched` for every Conv kernel; MatMul/Gemm
/// kernels use its `matmul` schedule (tile sizes and
/// [`MatmulLowering`](crate::cpu::matmul::MatmulLowering), so a tuner can pick them).
pub fn lower_partition_with(
    g: &Graph,
    p: &Partition,
    conv_sched: &conv::ConvSchedule,
) -> Result<Lowering, CodegenError> {
    lower_partition_tuned(g, p, conv_sched, &tuning::Defaults)
}

/// [`lower_partition_with`], where each tunable kernel ([`tuning::tunable`]) for which
/// `tuned` has a schedule is lowered with it (counted in [`Lowering::tuned`]).
pub fn lower_partition_tuned(
    g: &Graph,
    p: &Partition,
    conv_sched: &conv::ConvSchedule,
    tuned: &dyn tuning::ScheduleSource,
) -> Result<Lowering, CodegenError> {
    let mut out = Lowering::default();
    for (index, k) in p.kernels.iter().enumerate() {
        let lanes = conv_sched.matmul.vector_width;
        let tunable = tuning::tunable_for(g, k, lanes);
        let config = tunable.as_ref().and_then(|t| tuned.schedule(&t.workload));
        out.tuned += config.is_some() as usize;
        // the default schedule (none tuned, or the tuner measuring the default) adapts to
        // small products; a tuned one is used as it is
        let is_default = match (&config, &tunable) {
            (None, _) => true,
            (Some(c), Some(t)) => *c == t.default,
            _ => false,
        };
        let conv_sched = &match &config {
            Some(c) => tuning::conv_schedule(c, conv_sched),
            None => *conv_sched,
        };
        let mm_sched = config
            .as_ref()
            .map(tuning::matmul_schedule)
            .unwrap_or(conv_sched.matmul);
        // `kiln_<kernel>_<op>_<op>...`: readable in profiles and `nm` (at most 4 op names).
        let mut ops: Vec<String> = Vec::new();
        for &n in &k.nodes {
            let op = g.nodes[n].op.op_type().to_ascii_lowercase();
            if ops.last() != Some(&op) && ops.len() < 4 {
                ops.push(op);
            }
        }
        let name = format!("kiln_{}_{}", k.name, ops.join("_"));
        // (kernel, inputs, outputs) and the derived constants (contractions only)
        let plain = |r: Result<Lowered, String>| r.map(|l| (l, Vec::new()));
        let r = match k.kind {
            KernelKind::Elementwise => plain(elementwise::lower(g, k, &name)),
            KernelKind::Contraction if conv::is_conv(g, k) => {
                conv::lower_with(g, k, &name, conv_sched)
            }
            KernelKind::Contraction => contraction::lower(g, k, &name, &mm_sched, is_default),
            KernelKind::Opaque | KernelKind::Reduction if pool::handles(g, k) => {
                plain(pool::lower(g, k, &name))
            }
            KernelKind::Reduction => plain(reduction::lower(g, k, &name)),
            KernelKind::DataMovement => plain(movement::lower(g, k, &name)),
            other => Err(format!("{other:?} kernels are not lowered yet")),
        };
        match r {
            Ok(((kernel, inputs, outputs), consts)) => out.kernels.push(LoweredKernel {
                index,
                kernel,
                inputs,
                consts,
                outputs,
            }),
            Err(reason) => out.unsupported.push(Unsupported { index, reason }),
        }
    }
    Ok(out)
}

/// A lowered kernel: the CPU kernel, its input values and its output values.
type Lowered = (Kernel, Vec<ValueId>, Vec<ValueId>);

/// The element type of a value inside a kernel body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    /// `f32`.
    F32,
    /// `i64`.
    I64,
    /// `i1` (stored as one byte, `i8`, in buffers).
    I1,
}

impl Ty {
    /// The body type of a graph dtype, if supported.
    pub(crate) fn of(d: DType) -> Result<Ty, String> {
        match d {
            DType::F32 => Ok(Ty::F32),
            DType::I64 => Ok(Ty::I64),
            DType::Bool => Ok(Ty::I1),
            other => Err(format!("dtype {} is not supported", other.name())),
        }
    }

    /// The MLIR type in the body.
    pub(crate) fn mlir(self) -> &'static str {
        match self {
            Ty::F32 => "f32",
            Ty::I64 => "i64",
            Ty::I1 => "i1",
        }
    }

    /// The MLIR element type in buffers.
    pub(crate) fn storage(self) -> &'static str {
        match self {
            Ty::I1 => "i8",
            t => t.mlir(),
        }
    }
}

/// The symbolic dims of a kernel, in `dims[]` order.
#[derive(Debug, Default)]
pub(crate) struct SymDims(pub Vec<String>);

impl SymDims {
    /// The prologue dim of a graph dim, registering symbols; anonymous dims are unsupported.
    pub(crate) fn dim(&mut self, d: &Dim) -> Result<super::abi::Dim, String> {
        match d {
            Dim::Known(n) => Ok(super::abi::Dim::Const(*n as i64)),
            Dim::Sym(s) if d.is_anonymous() => Err(format!("anonymous dim '{s}'")),
            Dim::Sym(s) => {
                let i = match self.0.iter().position(|x| x == s) {
                    Some(i) => i,
                    None => {
                        self.0.push(s.clone());
                        self.0.len() - 1
                    }
                };
                Ok(super::abi::Dim::Sym(i))
            }
        }
    }

    /// The prologue dims of a shape.
    pub(crate) fn dims(&mut self, s: &[Dim]) -> Result<Vec<super::abi::Dim>, String> {
        s.iter().map(|d| self.dim(d)).collect()
    }
}
