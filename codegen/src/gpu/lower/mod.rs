//! Lowering of fusion kernels ([`kiln_passes::fusion`]) to GPU kernels plus their launches.
//!
//! [`lower_partition`] turns every kernel of a partition into one or more [`Launch`]es of
//! [`GpuKernel`]s, with launch geometry computed from the static shapes:
//!
//! * **specialized kernels** where they exist (the dispatch table in [`lower_kernel`]):
//!   `MatMul`/`Gemm` → [`kernels::gemm::gemm_f32`](crate::gpu::kernels::gemm::gemm_f32)
//!   (2-D; batched MatMuls as one launch per batch with offset buffers, or with the batch
//!   folded into `M` when `B` is 2-D) followed by the fused epilogue (bias, `alpha`/`beta`,
//!   activations) as a generic elementwise kernel over the result, in place; a last-axis
//!   `Softmax` → [`kernels::softmax::row_softmax`](crate::gpu::kernels::softmax::row_softmax);
//!   f32 NCHW `Conv` with groups = 1 → [`kernels::conv::conv2d`], depthwise `Conv` →
//!   [`kernels::depthwise::depthwise_conv2d`] (bias, residual add and relu fused, other
//!   epilogues in place after it, [`contraction`]); a lone last-axis `LayerNormalization` →
//!   [`kernels::norm::layer_norm`], a lone last-axis `ReduceSum`/`Mean`/`Max` →
//!   [`kernels::reduce::reduce_rows`] ([`reduction`]); at a tensor-core [`Precision`]
//!   MatMul/Gemm on the tensor-core GEMMs with their epilogue fused where the kernel can
//!   express it ([`tensor_core`]), and at f16/bf16 groups = 1 convs on
//!   [`kernels::conv_mma::conv2d_mma`];
//! * the **generic path** ([`generic`]: one thread per output element, grid-stride loop,
//!   index arithmetic on static shapes) for everything else: `Elementwise` kernels
//!   ([`elementwise`]), data movement (Transpose/Split/Slice/Concat/Gather/copies,
//!   [`movement`]), last-axis reductions with prologue/epilogue such as LayerNorm (one thread
//!   per row, [`reduction`]), global pooling and `MaxPool` ([`window`]), grouped `Conv` and
//!   the MatMul/Gemm shapes the GEMM kernel does not take ([`contraction`]), each with its
//!   epilogue inline.
//!
//! Attention patterns (Q·Kᵀ → Softmax → ·V across three kernels) are recognised
//! ([`attention`]) and reported with the reason they stay unfused.
//!
//! Anything else is an error naming the kernel and its ops: there is no fallback. All kernels
//! of a model go into one `gpu.module` ([`GpuLowering::module_text`]) and one PTX text per
//! SKU ([`compile_module`]).
//!
//! With [`LowerOptions::specialized`] off every kernel takes the generic path; the generic
//! bodies also compile for the CPU ([`generic::GenKernel::cpu_kernel`]), which is how the
//! lowering is checked against the reference interpreter without a GPU.

pub mod attention;
pub mod contraction;
pub mod elementwise;
pub mod generic;
pub mod movement;
pub mod precision;
pub mod reduction;
pub mod tensor_core;
pub mod window;

use super::{kernels, GpuError, GpuKernel, Sku};
use kiln_ir::{Graph, Tensor, ValueId};
use kiln_passes::fusion::{Kernel, KernelKind, Partition};

pub use generic::GenKernel;
pub use precision::Precision;

/// A buffer a launch reads or writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// The buffer of a graph value (input, output, constant, or arena slot).
    Value(ValueId),
    /// A constant derived at compile time ([`GpuLowering::consts`]).
    Const(usize),
    /// The buffer of graph output `i` (for copies into outputs that are graph inputs or
    /// constants, whose value's own buffer is the input or the weight).
    GraphOutput(usize),
    /// The per-launch scratch region ([`GpuLowering::scratch_bytes`], placed after the
    /// memory plan's arena) starting at this byte offset (a multiple of 64). Launches run in
    /// order on one stream, so every partition kernel may reuse it from offset 0; its content
    /// does not survive to the next partition kernel.
    Scratch(u64),
}

/// [`Launch::index`] of launches that belong to no partition kernel (output copies).
pub const NO_KERNEL: usize = usize::MAX;

/// One launch argument, at the MLIR parameter level.
#[derive(Debug, Clone, PartialEq)]
pub enum LaunchArg {
    /// A `memref<?xT>` parameter: `len` elements of `operand` starting at element `offset`.
    Buf {
        /// The buffer.
        operand: Operand,
        /// First element.
        offset: u64,
        /// Elements.
        len: u64,
        /// Element size in bytes.
        elem_bytes: u64,
    },
    /// An `index` scalar.
    Index(i64),
    /// An `f32` scalar.
    F32(f32),
    /// A TMA descriptor of a 16-bit row-major matrix (the `wgmma` GEMM's operands): `len`
    /// elements of `operand` from element `offset`, encoded by the runtime at load.
    TensorMap {
        /// The buffer.
        operand: Operand,
        /// First element (its byte offset a multiple of 16).
        offset: u64,
        /// Elements the matrix covers.
        len: u64,
        /// Global extent, innermost first.
        dims: [u64; 2],
        /// Byte stride of the outer dimension.
        row_bytes: u64,
        /// Box extent, innermost first.
        box_dims: [u32; 2],
        /// bf16 (else f16) elements.
        bf16: bool,
    },
}

/// One kernel launch of a lowered partition kernel.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Index of the partition kernel.
    pub index: usize,
    /// Entry name of the kernel (in [`GpuLowering::kernels`]).
    pub kernel: String,
    /// Arguments, in parameter order.
    pub args: Vec<LaunchArg>,
    /// Blocks per grid.
    pub grid: [u32; 3],
    /// Threads per block.
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    /// Whether it is a generic-path kernel.
    pub generic: bool,
}

/// Options of [`lower_partition`].
#[derive(Debug, Clone)]
pub struct LowerOptions {
    /// Use the specialized kernels (GEMM, row softmax) where they apply; off, everything
    /// takes the generic path (whose bodies also run on the CPU, for testing).
    pub specialized: bool,
    /// Upper bound on the blocks of a generic (grid-stride) launch.
    pub max_blocks: u32,
    /// The SKU the specialized kernels are scheduled for (conv tiles, shared memory); `None`
    /// keeps the kernels that need it (conv, tensor-core GEMMs) on the generic path.
    pub sku: Option<Sku>,
    /// What MatMul/Gemm compute on (tensor cores for everything but f32, see [`precision`]).
    pub precision: Precision,
    /// Fuse a contraction's epilogue (activation, residual, scale) into its tensor-core GEMM
    /// where the kernel's epilogue can express it; off, only a lone bias is fused and the
    /// rest runs as an in-place launch (for comparisons).
    pub fuse_epilogues: bool,
    /// Tuned schedules of the tunable kernels (f32 GEMM, tensor-core GEMMs, f32 conv) and
    /// the record of which kernels were met ([`crate::gpu::tuning`]); `None`: defaults.
    pub schedules: Option<std::sync::Arc<crate::gpu::tuning::GpuSchedules>>,
}

impl LowerOptions {
    /// Defaults for `sku`: specialized kernels on, at most 32 blocks per SM.
    pub fn for_sku(sku: &Sku) -> Self {
        Self {
            specialized: true,
            max_blocks: sku.sm_count.saturating_mul(32).max(1),
            sku: Some(sku.clone()),
            precision: Precision::F32,
            fuse_epilogues: true,
            schedules: None,
        }
    }
}

/// The result of [`lower_partition`].
#[derive(Debug, Clone, Default)]
pub struct GpuLowering {
    /// Every kernel, once (launches refer to them by name).
    pub kernels: Vec<GpuKernel>,
    /// The generic kernels' bodies, by name (for CPU emulation).
    pub generic: Vec<GenKernel>,
    /// Launches in execution order.
    pub launches: Vec<Launch>,
    /// Constants derived at compile time (name, data), read through [`Operand::Const`].
    pub consts: Vec<(String, Tensor)>,
    /// Partition kernels that need no launch (zero-copy views).
    pub views: usize,
    /// Host semantics of the specialized op kernels (conv, LayerNorm, reductions), by entry
    /// name (for CPU emulation of the plan).
    pub host: Vec<(String, HostKernel)>,
    /// Bytes of the per-launch scratch region ([`Operand::Scratch`]; 0 if none).
    pub scratch_bytes: u64,
    /// Partition kernels whose MatMul/Gemm runs on tensor cores.
    pub tensor_core: Vec<usize>,
    /// Partition kernels whose MatMul/Gemm stays off the tensor cores at a tensor-core
    /// precision, with the reason.
    pub tensor_core_fallbacks: Vec<(usize, String)>,
    /// The attention patterns of the partition ([`attention::find_patterns`]).
    pub attention: Vec<attention::AttentionPattern>,
    /// Partition kernels whose whole epilogue (more than a lone bias) runs inside their
    /// tensor-core GEMM, with the epilogue's tag: each saves the in-place epilogue launch.
    pub fused_epilogues: Vec<(usize, String)>,
    /// Partition kernels whose Conv runs on tensor cores ([`LowerOptions::precision`] f16 or
    /// bf16).
    pub tensor_core_convs: Vec<usize>,
    /// Partition kernels whose (non-depthwise) Conv stays on the f32 kernel at a tensor-core
    /// precision, with the reason.
    pub tensor_core_conv_fallbacks: Vec<(usize, String)>,
}

/// What a specialized op kernel computes, for running a plan on the host (conv buffer
/// parameters in launch order: `X, W[, bias][, residual], Y`).
#[derive(Debug, Clone, PartialEq)]
pub enum HostKernel {
    /// [`kernels::conv::conv2d`] in NCHW (groups = 1).
    Conv {
        /// The geometry.
        geom: kernels::conv::ConvGeom,
        /// The fused epilogue.
        epi: kernels::conv::Epilogue,
    },
    /// [`kernels::conv::conv2d_split_k`]: `X, W, Y`; the K slices add the convolution's
    /// sums (no bias, no epilogue) into a zeroed `Y`.
    ConvSplitK {
        /// The geometry.
        geom: kernels::conv::ConvGeom,
    },
    /// [`kernels::depthwise::depthwise_conv2d`] (groups = C = OC, NCHW).
    Depthwise {
        /// The geometry.
        geom: kernels::conv::ConvGeom,
        /// The fused epilogue.
        epi: kernels::conv::Epilogue,
    },
    /// [`kernels::norm::layer_norm`]: `X, Scale, Bias, Y`, scalars `rows, n, eps`.
    LayerNorm,
    /// [`kernels::reduce::reduce_rows`]: `X, Y`, scalars `rows, n`.
    Reduce(kernels::reduce::ReduceKind),
    /// [`precision::cast_kernel`]: `X (f32), Y`, scalar `n`.
    Cast(kernels::gemm_mma::MmaInput),
    /// [`attention::row_attention`]: `Q, Kt, V[, mask], O`.
    Attention(attention::RowAttention),
    /// [`attention::copy_kernel`]: `X, Y`, scalar `n`.
    Copy,
    /// [`precision::zero_kernel`]: `Y (f32)`, scalar `n`.
    Zero,
    /// The SIMT f32 GEMM ([`kernels::gemm::gemm_f32`]): `A, B, C`, scalars `M, N, K`, or
    /// `M, N, K, sA, sB, sC` for [`kernels::gemm::gemm_f32_batched`] (`grid.z / split_k`
    /// matrices); with `split_k > 1` the K slices add into a zeroed `C`.
    GemmF32 {
        /// K slices per matrix.
        split_k: u32,
    },
    /// A tensor-core GEMM ([`tensor_core`]): `A, B, C (f32)[, bias][, R]`, scalars `M, N, K,
    /// sA, sB, sC` (wgmma: `M, N, K`), `alpha[, beta]`; `grid.z / split_k` matrices (the
    /// third field: K slices adding into a zeroed `C`, 1 for none);
    /// `C = epilogue(A·B)` ([`kernels::epilogue::Epilogue::apply`]).
    Gemm(
        kernels::gemm_mma::MmaInput,
        kernels::epilogue::Epilogue,
        u32,
    ),
    /// [`kernels::conv_mma::conv2d_mma`] in NCHW: `X, W` (f16 or bf16; `X` f32 with
    /// `x_f32`, rounded to the input type as it is read)`[, bias][, residual], Y (f32)`, f32
    /// accumulation.
    ConvMma {
        /// The geometry.
        geom: kernels::conv::ConvGeom,
        /// The fused epilogue.
        epi: kernels::conv::Epilogue,
        /// The input type of `X` and `W`.
        input: kernels::gemm_mma::MmaInput,
        /// `X` is f32 in memory ([`kernels::conv_mma::ConvMmaSchedule::x_f32`]).
        x_f32: bool,
    },
}

impl GpuLowering {
    /// The host semantics of specialized op kernel `name` (see [`HostKernel`]).
    pub fn host_kernel(&self, name: &str) -> Option<&HostKernel> {
        self.host.iter().find(|(n, _)| n == name).map(|(_, h)| h)
    }

    /// The MLIR module holding every kernel in one `gpu.module @kiln_model`.
    pub fn module_text(&self) -> String {
        let mut s =
            String::from("module attributes {gpu.container_module} {\ngpu.module @kiln_model {\n");
        // The tensor-core kernels each carry the dynamic shared memory declaration: once
        // per module.
        let decl = kernels::gemm_mma::dynamic_smem_decl();
        if self.kernels.iter().any(|k| k.mlir.contains(&decl)) {
            s.push_str(&decl);
        }
        for k in &self.kernels {
            s.push_str(&k.mlir.replace(&decl, ""));
        }
        s.push_str("}\n}\n");
        s
    }

    /// The partition kernels computed entirely on the generic path (no specialized
    /// launch), in order.
    pub fn generic_kernels(&self) -> Vec<usize> {
        self.kernel_indices(|ls| ls.iter().all(|l| l.generic))
    }

    /// The partition kernels computed by a specialized kernel followed by a generic
    /// epilogue launch, in order.
    pub fn generic_epilogues(&self) -> Vec<usize> {
        self.kernel_indices(|ls| ls.iter().any(|l| l.generic) && ls.iter().any(|l| !l.generic))
    }

    fn kernel_indices(&self, pred: impl Fn(&[&Launch]) -> bool) -> Vec<usize> {
        let mut idx: Vec<usize> = self
            .launches
            .iter()
            .map(|l| l.index)
            .filter(|&i| i != NO_KERNEL)
            .collect();
        idx.dedup();
        idx.into_iter()
            .filter(|&i| {
                let ls: Vec<&Launch> = self.launches.iter().filter(|l| l.index == i).collect();
                pred(&ls)
            })
            .collect()
    }

    fn add_kernel(&mut self, k: GpuKernel) -> Result<(), String> {
        match self.kernels.iter().find(|x| x.name == k.name) {
            Some(x) if x.mlir == k.mlir => Ok(()),
            Some(_) => Err(format!("two different kernels named '{}'", k.name)),
            None => {
                self.kernels.push(k);
                Ok(())
            }
        }
    }

    /// Adds a generic kernel and its launch.
    pub(crate) fn push_generic(
        &mut self,
        index: usize,
        gk: GenKernel,
        max_blocks: u32,
    ) -> Result<(), String> {
        let gpu = gk.gpu_kernel();
        self.add_kernel(gpu)?;
        let args = gk
            .bufs
            .iter()
            .map(|(op, elem, len)| LaunchArg::Buf {
                operand: op.clone(),
                offset: 0,
                len: *len,
                elem_bytes: elem.bytes(),
            })
            .collect();
        self.launches.push(Launch {
            index,
            kernel: gk.name.clone(),
            args,
            grid: [
                kernels::blocks_for(gk.n, generic::BLOCK as u64, max_blocks as u64),
                1,
                1,
            ],
            block: [generic::BLOCK, 1, 1],
            shared_bytes: 0,
            generic: true,
        });
        self.generic.push(gk);
        Ok(())
    }

    /// Adds a generic copy of value `v` (a graph input or constant) into graph output `out`
    /// (launch index [`NO_KERNEL`]).
    pub fn add_output_copy(
        &mut self,
        g: &Graph,
        v: ValueId,
        out: usize,
        max_blocks: u32,
    ) -> Result<(), GpuError> {
        let name = format!("kiln_copy_output_{out}");
        let gk = movement::copy_value(g, &name, Operand::Value(v), Operand::GraphOutput(out), v)
            .map_err(|e| GpuError::Lowering(format!("copy into graph output {out}: {e}")))?;
        self.push_generic(NO_KERNEL, gk, max_blocks)
            .map_err(GpuError::Lowering)
    }

    /// Adds a specialized kernel launch.
    /// Records what op kernel `name` computes (for the plan emulation), once per name.
    pub(crate) fn note_host(&mut self, name: &str, h: HostKernel) {
        if !self.host.iter().any(|(n, _)| n == name) {
            self.host.push((name.to_string(), h));
        }
    }

    /// Pushes a launch zeroing `len` f32 elements of `dst` from `offset` (before a split-K
    /// GEMM adds its K slices into them).
    pub(crate) fn push_zero(
        &mut self,
        index: usize,
        dst: Operand,
        offset: u64,
        len: u64,
        sku: &crate::gpu::Sku,
    ) -> Result<(), String> {
        let (l, k) = precision::zero_launch(index, dst, offset, len, sku);
        self.note_host(&k.name, HostKernel::Zero);
        self.push_special(l, k)
    }

    pub(crate) fn push_special(&mut self, mut launch: Launch, k: GpuKernel) -> Result<(), String> {
        launch.generic = false;
        launch.kernel = k.name.clone();
        self.add_kernel(k)?;
        self.launches.push(launch);
        Ok(())
    }
}

/// An error lowering one partition kernel: names the kernel and its ops.
fn kernel_error(g: &Graph, k: &Kernel, why: &str) -> GpuError {
    let ops: Vec<&str> = k.nodes.iter().map(|&n| g.nodes[n].op.op_type()).collect();
    GpuError::Lowering(format!(
        "kernel {} ({:?}: {}) cannot be lowered to the GPU: {why}",
        k.name,
        k.kind,
        ops.join(", ")
    ))
}

/// The entry name of partition kernel `k`: `kiln_<kernel>_<op>_<op>...` (at most 4 ops).
pub fn kernel_name(g: &Graph, k: &Kernel) -> String {
    let mut ops: Vec<String> = Vec::new();
    for &n in &k.nodes {
        let op = g.nodes[n].op.op_type().to_ascii_lowercase();
        if ops.last() != Some(&op) && ops.len() < 4 {
            ops.push(op);
        }
    }
    format!("kiln_{}_{}", k.name, ops.join("_"))
}

/// Lowers every kernel of `p` (see the module doc). `Alias` kernels need no launch unless a
/// graph output is a view, which gets a copy.
pub fn lower_partition(
    g: &Graph,
    p: &Partition,
    opts: &LowerOptions,
) -> Result<GpuLowering, GpuError> {
    let mut out = GpuLowering {
        attention: attention::find_patterns(g, p),
        ..GpuLowering::default()
    };
    let fused: Vec<attention::AttentionPattern> = if opts.specialized {
        out.attention
            .iter()
            .filter(|a| a.fused.is_some())
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    for (index, k) in p.kernels.iter().enumerate() {
        if fused.iter().any(|a| a.kernels[..2].contains(&index)) {
            continue;
        }
        if let Some(f) = fused
            .iter()
            .find(|a| a.kernels[2] == index)
            .and_then(|a| a.fused.as_ref())
        {
            attention::lower_fused(g, f, index, &kernel_name(g, k), opts, &mut out)
                .map_err(|e| kernel_error(g, k, &e))?;
            continue;
        }
        if k.kind == KernelKind::Alias && !k.outputs.iter().any(|o| g.outputs.contains(o)) {
            out.views += 1;
            continue;
        }
        lower_kernel(g, k, index, opts, &mut out).map_err(|e| kernel_error(g, k, &e))?;
    }
    Ok(out)
}

/// The dispatch table: kernel kind (and main op) → lowering.
fn lower_kernel(
    g: &Graph,
    k: &Kernel,
    index: usize,
    opts: &LowerOptions,
    out: &mut GpuLowering,
) -> Result<(), String> {
    let name = kernel_name(g, k);
    match k.kind {
        KernelKind::Elementwise => {
            let gk = elementwise::lower(g, k, &name)?;
            out.push_generic(index, gk, opts.max_blocks)
        }
        KernelKind::Contraction => contraction::lower(g, k, index, &name, opts, out),
        KernelKind::Reduction | KernelKind::Opaque if window::handles(g, k) => {
            let gk = window::lower(g, k, &name)?;
            out.push_generic(index, gk, opts.max_blocks)
        }
        KernelKind::Reduction => reduction::lower(g, k, index, &name, opts, out),
        KernelKind::DataMovement | KernelKind::Alias => {
            for gk in movement::lower(g, k, &name)? {
                out.push_generic(index, gk, opts.max_blocks)?;
            }
            Ok(())
        }
        KernelKind::Opaque => Err("opaque kernels have no GPU lowering".into()),
    }
}

/// Compiles every kernel of `l` for `sku` into one PTX text (one `gpu.module`): checks that
/// each kernel fits the SKU, then lowers the module with
/// [`pipeline::pass_pipeline`](super::pipeline::pass_pipeline).
pub fn compile_module(l: &GpuLowering, sku: &Sku) -> Result<String, GpuError> {
    for k in &l.kernels {
        k.check_fits(sku)?;
    }
    // The architecture-specific target (`sm_90a`) when a kernel needs it (wgmma).
    let chip = l
        .kernels
        .iter()
        .map(|k| k.chip(sku))
        .find(|c| *c != sku.arch)
        .unwrap_or_else(|| sku.arch.clone());
    let text = super::pipeline::mlir_to_ptx(&l.module_text(), &chip)?;
    for k in &l.kernels {
        if !text.contains(&format!(".entry {}(", k.name)) {
            return Err(crate::CodegenError::Translate(format!(
                "PTX has no .entry for kernel '{}'",
                k.name
            ))
            .into());
        }
    }
    Ok(text)
}

/// A graph value's static shape.
pub(crate) fn shape_of(g: &Graph, v: ValueId) -> Result<Vec<usize>, String> {
    g.values[v]
        .fact
        .shape
        .as_known()
        .ok_or_else(|| format!("value '{}' has a symbolic shape", g.values[v].name))
}

/// Input `i` of node `n`.
pub(crate) fn node_input(g: &Graph, n: usize, i: usize) -> Result<ValueId, String> {
    g.nodes[n]
        .inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("node '{}': input {i} is missing", g.nodes[n].name))
}
