//! The CPU code-generation path: kernels written in MLIR (`linalg`, `scf`, `vector`), lowered
//! to the LLVM dialect, translated to LLVM IR, optimised at O3 for a named CPU, and linked
//! into one shared library (`.so`) that `kiln_runtime::kernel_lib` loads without LLVM.
//!
//! * [`abi`]: the uniform `void kernel(void *const *args, const int64_t *dims, void *scratch)`
//!   ABI.
//! * [`elementwise`]: elementwise kernels (`linalg.generic`).
//! * [`matmul`]: f32 matmul with a parametric [`matmul::MatmulSchedule`].
//! * [`matmul_transform`]: the same matmul scheduled by MLIR's transform dialect (optionally
//!   calling a micro-kernel), chosen by [`matmul::MatmulSchedule::lowering`].
//! * [`pipeline`]: MLIR → LLVM IR → object code.
//! * [`link`]: objects → shared library.
//! * [`lower`]: fusion kernels of a graph → kernels (`lower_partition`).

pub mod abi;
pub mod elementwise;
pub mod link;
pub mod lower;
pub mod matmul;
pub mod matmul_transform;
pub mod pipeline;

use crate::CodegenError;

/// What the runtime needs to know to call a kernel through the uniform ABI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSignature {
    /// The exported symbol name.
    pub name: String,
    /// Number of input buffers (`args[0..inputs]`).
    pub inputs: usize,
    /// Number of output buffers (`args[inputs..inputs + outputs]`).
    pub outputs: usize,
    /// Names of the symbolic dimensions, in `dims[]` order (after the task range, see
    /// [`abi`]).
    pub dims: Vec<String>,
    /// Number of independent work items the kernel splits into (1: serial). A call
    /// processes the items `[dims[0], dims[1])` (clamped to `0..tasks`), so the runtime may
    /// run disjoint ranges on different threads at the same time.
    pub tasks: u64,
    /// Bytes of scratch memory one call (one task range, on one thread) needs, known at
    /// compile time (see [`abi`]): the caller passes a private, 64-byte-aligned buffer of at
    /// least this size.
    pub scratch_bytes: u64,
}

/// One kernel: its signature, its MLIR module text and the pass pipeline that lowers that
/// text to the LLVM dialect.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The ABI description.
    pub signature: KernelSignature,
    /// One `func.func` (plus any private helpers), without the enclosing `module`.
    pub mlir: String,
    /// A `builtin.module(...)` pass pipeline ending in the LLVM dialect.
    pub pipeline: String,
}

/// Target options for CPU code generation.
#[derive(Debug, Clone)]
pub struct CpuOptions {
    /// LLVM CPU name: `x86-64-v3` (default: AVX2 + FMA), `x86-64-v4`, `znver1`, or `native`.
    pub cpu: String,
    /// The C compiler driver used to link the shared library (default `cc`).
    pub linker: String,
}

impl Default for CpuOptions {
    fn default() -> Self {
        Self {
            cpu: "x86-64-v3".into(),
            linker: "cc".into(),
        }
    }
}

/// Whether LLVM CPU `cpu` has AVX-512F (32 registers of 16 f32 lanes): `x86-64-v4`, the
/// AVX-512 Intel server/client cores, Zen 4 and Zen 5, and `native` on such a host.
pub fn cpu_has_avx512(cpu: &str) -> bool {
    const AVX512: &[&str] = &[
        "x86-64-v4",
        "knl",
        "knm",
        "skylake-avx512",
        "skx",
        "cascadelake",
        "cooperlake",
        "cannonlake",
        "icelake-client",
        "icelake-server",
        "rocketlake",
        "tigerlake",
        "sapphirerapids",
        "emeraldrapids",
        "graniterapids",
        "graniterapids-d",
        "diamondrapids",
        "znver4",
        "znver5",
    ];
    if cpu == "native" {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }
    AVX512.contains(&cpu)
}

/// f32 lanes of the widest vector registers of LLVM CPU `cpu`: 16 with AVX-512
/// ([`cpu_has_avx512`]), else 8 (AVX2).
pub fn cpu_lanes(cpu: &str) -> usize {
    if cpu_has_avx512(cpu) {
        16
    } else {
        8
    }
}

/// Compiles `kernels` into the bytes of one ELF shared library exporting each kernel under
/// its signature's name.
pub fn compile_library(kernels: &[Kernel], opts: &CpuOptions) -> Result<Vec<u8>, CodegenError> {
    let objects = kernels
        .iter()
        .map(|k| pipeline::kernel_object(k, &opts.cpu))
        .collect::<Result<Vec<_>, _>>()?;
    link::shared_library(&objects, &opts.linker)
}
