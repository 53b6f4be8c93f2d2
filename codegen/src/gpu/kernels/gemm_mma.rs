//! Tensor-core GEMM for sm_80+ with `mma.sync`, a `cp.async` multi-stage shared-memory
//! pipeline and `ldmatrix` fragment loads, batched, with a fused [`Epilogue`]:
//!
//! ```text
//! C[b][M,N] = epilogue(A[b][M,K] · B[b][K,N])     row-major, flat buffers,
//!                                                  A at b·sA, B at b·sB, C (and R) at b·sC
//! grid (ceil(N/bn), ceil(M/bm), batch · split_k), 32·wm·wn threads, dynamic shared memory
//! block: bm×bn tile; warp (wy, wx): (bm/wm)×(bn/wn), i.e. MT×NT mma tiles of 16×8
//! shared: stages × (A bm×(bk+pad), B bk×(bn+pad)) — the padding shifts consecutive rows
//!         by 16 bytes so the 8 row addresses of an ldmatrix hit different banks
//! prologue: tiles 0..stages-1 issued with cp.async (vec_bytes each, zero-filled past M/N/K)
//! for kt: cp.async.wait_group(stages-2); barrier; issue tile kt+stages-1; compute tile kt
//!   per 16 (tf32: 8) deep step: A fragments by ldmatrix.x4, B by ldmatrix.x4.trans
//!   (tf32: scalar shared loads), MT·NT mma.sync m16n8k16 (tf32: m16n8k8)
//! epilogue on the accumulator fragments, masked stores (split_k > 1: atomic adds)
//! ```
//!
//! Inputs: f16 and tf32 use `nvgpu.mma.sync`; bf16 uses `nvvm.mma.sync` because MLIR 22's
//! `convert-nvgpu-to-nvvm` rejects bf16 operands of `nvgpu.mma.sync` ("failed to deduce
//! operand PTX types"). tf32 kernels read f32 buffers (the tensor cores ignore the low 13
//! mantissa bits). Accumulation is f32; the output is f32, f16 or bf16.
//!
//! Shape requirements (checked on the host by [`MmaGemm::supports`]): `K`, `N` and the
//! batch strides `sA`, `sB` multiples of the copy width (`vec_bytes / element size`), so
//! every 16-byte (8-, 4-byte) `cp.async` source is aligned; `M`, `N`, `K` otherwise
//! arbitrary (edges are zero-filled on load and masked on store). With `split_k > 1` the
//! output must be f32, zeroed before the launch, and the epilogue activation-free.

use super::epilogue::{emit_activation, Epilogue, Residual};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam, Sku};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The input element type (and tensor-core instruction) of a [`MmaGemm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MmaInput {
    /// f16 inputs, `mma.sync.m16n8k16.f32.f16.f16.f32`.
    F16,
    /// bf16 inputs, `mma.sync.m16n8k16.f32.bf16.bf16.f32`.
    BF16,
    /// f32 inputs rounded to tf32 by the tensor cores, `mma.sync.m16n8k8.f32.tf32.tf32.f32`.
    TF32,
}

impl MmaInput {
    /// Bytes per input element.
    pub fn bytes(self) -> u32 {
        match self {
            MmaInput::F16 | MmaInput::BF16 => 2,
            MmaInput::TF32 => 4,
        }
    }

    /// The MLIR element type of the input buffers.
    pub fn mlir(self) -> &'static str {
        match self {
            MmaInput::F16 => "f16",
            MmaInput::BF16 => "bf16",
            MmaInput::TF32 => "f32",
        }
    }

    /// The buffer element type.
    pub fn elem(self) -> Elem {
        match self {
            MmaInput::F16 => Elem::F16,
            MmaInput::BF16 => Elem::BF16,
            MmaInput::TF32 => Elem::F32,
        }
    }

    /// Depth of one `mma.sync` (16, tf32: 8).
    pub fn mma_k(self) -> u32 {
        match self {
            MmaInput::TF32 => 8,
            _ => 16,
        }
    }

    /// The database feature the instruction needs.
    pub fn feature(self) -> &'static str {
        match self {
            MmaInput::F16 => "mma.sync.f16",
            MmaInput::BF16 => "mma.sync.bf16",
            MmaInput::TF32 => "mma.sync.tf32",
        }
    }

    /// The PTX instruction the kernel must contain.
    pub fn ptx_mma(self) -> &'static str {
        match self {
            MmaInput::F16 => "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            MmaInput::BF16 => "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            MmaInput::TF32 => "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
        }
    }
}

/// Output element type of a [`MmaGemm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MmaOutput {
    /// f32.
    F32,
    /// f16 (rounded to nearest).
    F16,
    /// bf16 (rounded to nearest).
    BF16,
}

impl MmaOutput {
    /// The MLIR element type.
    pub fn mlir(self) -> &'static str {
        match self {
            MmaOutput::F32 => "f32",
            MmaOutput::F16 => "f16",
            MmaOutput::BF16 => "bf16",
        }
    }

    /// The buffer element type.
    pub fn elem(self) -> Elem {
        match self {
            MmaOutput::F32 => Elem::F32,
            MmaOutput::F16 => Elem::F16,
            MmaOutput::BF16 => Elem::BF16,
        }
    }
}

/// The schedule of a [`MmaGemm`]: every field is a tunable parameter ([`MmaSchedule::space`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaSchedule {
    /// Rows of the block tile.
    pub bm: u32,
    /// Columns of the block tile.
    pub bn: u32,
    /// Depth of one pipeline stage.
    pub bk: u32,
    /// Warps along M.
    pub wm: u32,
    /// Warps along N.
    pub wn: u32,
    /// Shared-memory buffers of the `cp.async` pipeline (≥ 2).
    pub stages: u32,
    /// Bytes per `cp.async` (4, 8 or 16).
    pub vec_bytes: u32,
    /// Blocks splitting K (partial sums added atomically into an f32 output).
    pub split_k: u32,
    /// Padding of each shared-memory row, in bytes (0 or 16).
    pub pad_bytes: u32,
}

impl Default for MmaSchedule {
    /// 128×128×32 block tile, 2×4 warps (64×32 each: 4×4 mma tiles), 3 stages, 16-byte
    /// copies, 16-byte row padding: 256 threads, 57 KiB of shared memory (f16).
    fn default() -> Self {
        Self {
            bm: 128,
            bn: 128,
            bk: 32,
            wm: 2,
            wn: 4,
            stages: 3,
            vec_bytes: 16,
            split_k: 1,
            pad_bytes: 16,
        }
    }
}

/// A named schedule parameter and its legal values (see [`MmaSchedule::space`]).
pub type ParamValues = (&'static str, Vec<u32>);

impl MmaSchedule {
    /// The tunable parameters and the values each may take (the product contains invalid
    /// combinations; [`MmaSchedule::validate`] rejects them).
    pub fn space() -> Vec<ParamValues> {
        vec![
            ("bm", vec![32, 64, 128, 256]),
            ("bn", vec![32, 64, 128, 256]),
            ("bk", vec![16, 32, 64]),
            ("wm", vec![1, 2, 4]),
            ("wn", vec![1, 2, 4]),
            ("stages", vec![2, 3, 4, 5]),
            ("vec_bytes", vec![4, 8, 16]),
            ("split_k", vec![1, 2, 4, 8]),
            ("pad_bytes", vec![0, 16]),
        ]
    }

    /// The value of the parameter `name` (one of [`MmaSchedule::space`]'s names).
    pub fn get(&self, name: &str) -> Option<u32> {
        Some(match name {
            "bm" => self.bm,
            "bn" => self.bn,
            "bk" => self.bk,
            "wm" => self.wm,
            "wn" => self.wn,
            "stages" => self.stages,
            "vec_bytes" => self.vec_bytes,
            "split_k" => self.split_k,
            "pad_bytes" => self.pad_bytes,
            _ => return None,
        })
    }

    /// A copy with parameter `name` set to `value`; unknown names are an error.
    pub fn with(mut self, name: &str, value: u32) -> Result<Self, GpuError> {
        let f = match name {
            "bm" => &mut self.bm,
            "bn" => &mut self.bn,
            "bk" => &mut self.bk,
            "wm" => &mut self.wm,
            "wn" => &mut self.wn,
            "stages" => &mut self.stages,
            "vec_bytes" => &mut self.vec_bytes,
            "split_k" => &mut self.split_k,
            "pad_bytes" => &mut self.pad_bytes,
            _ => {
                return Err(GpuError::Schedule(format!(
                    "unknown mma GEMM schedule parameter '{name}'"
                )))
            }
        };
        *f = value;
        Ok(self)
    }

    /// 64×64×32 block tile, 2×2 warps (32×32 each), 4 stages: 128 threads, 38 KiB of f16
    /// (70 KiB of tf32) shared memory; for small problems and the smaller SKUs.
    pub fn small() -> Self {
        Self {
            bm: 64,
            bn: 64,
            bk: 32,
            wm: 2,
            wn: 2,
            stages: 4,
            ..Self::default()
        }
    }

    /// Threads per block: `32 · wm · wn`.
    pub fn threads(&self) -> u32 {
        32 * self.wm * self.wn
    }

    /// Rows of one warp's tile.
    pub fn warp_m(&self) -> u32 {
        self.bm / self.wm.max(1)
    }

    /// Columns of one warp's tile.
    pub fn warp_n(&self) -> u32 {
        self.bn / self.wn.max(1)
    }

    /// mma tiles per warp `(MT, NT)` (16×8 each).
    pub fn mma_tiles(&self) -> (u32, u32) {
        (self.warp_m() / 16, self.warp_n() / 8)
    }

    /// Shared-memory row lengths in elements `(A: bk + pad, B: bn + pad)`.
    pub fn lds(&self, input: MmaInput) -> (u32, u32) {
        let p = self.pad_bytes / input.bytes();
        (self.bk + p, self.bn + p)
    }

    /// Dynamic shared memory of the kernel in bytes.
    pub fn shared_bytes(&self, input: MmaInput) -> u32 {
        let (lda, ldb) = self.lds(input);
        self.stages * (self.bm * lda + self.bk * ldb) * input.bytes()
    }

    /// A rough per-thread register estimate: accumulators (4 per mma tile), one k-step of
    /// A and B fragments, ~40 for addresses and loop state, and 4 per `cp.async` of a stage
    /// (its precomputed shared and global coordinates). Within about ±25% of what `ptxas`
    /// allocates for the schedules `codegen/tests/gpu_gemm_ptx.rs` assembles.
    pub fn registers_estimate(&self, input: MmaInput) -> u32 {
        let (mt, nt) = self.mma_tiles();
        4 * mt * nt + 4 * mt + 2 * nt + 40 + 4 * self.copies_per_thread(input)
    }

    /// `cp.async` copies one thread issues per stage (A and B together).
    pub fn copies_per_thread(&self, input: MmaInput) -> u32 {
        let ve = (self.vec_bytes / input.bytes()).max(1);
        (self.bm * self.bk + self.bk * self.bn) / ve / self.threads().max(1)
    }

    /// Checks the schedule's structure (independent of the GPU): positive sizes, warp tiles
    /// made of whole mma tiles (bn/wn a multiple of 16 for the paired B `ldmatrix`), bk a
    /// multiple of the mma depth and of the copy width, copies evenly spread over the
    /// threads, 16-byte aligned shared rows, 2..=8 stages, 1..=16 K splits.
    pub fn validate_shape(&self, input: MmaInput) -> Result<(), GpuError> {
        let bad = |why: String| Err(GpuError::Schedule(format!("{self:?}: {why}")));
        let all = [
            self.bm,
            self.bn,
            self.bk,
            self.wm,
            self.wn,
            self.stages,
            self.vec_bytes,
            self.split_k,
        ];
        if all.contains(&0) {
            return bad("sizes must be positive".into());
        }
        if !self.bm.is_multiple_of(16 * self.wm) {
            return bad(format!("bm must be a multiple of 16·wm = {}", 16 * self.wm));
        }
        if !self.bn.is_multiple_of(16 * self.wn) {
            return bad(format!("bn must be a multiple of 16·wn = {}", 16 * self.wn));
        }
        if !matches!(self.vec_bytes, 4 | 8 | 16) || self.vec_bytes < input.bytes() {
            return bad("vec_bytes must be 4, 8 or 16 (at least one element)".into());
        }
        let ve = self.vec_bytes / input.bytes();
        if !self.bk.is_multiple_of(input.mma_k()) || !self.bk.is_multiple_of(ve) {
            return bad(format!(
                "bk must be a multiple of the mma depth {} and of the copy width {ve}",
                input.mma_k()
            ));
        }
        if !self.bn.is_multiple_of(ve) {
            return bad(format!("bn must be a multiple of the copy width {ve}"));
        }
        let t = self.threads();
        if t > 1024 {
            return bad(format!("{t} threads per block (at most 1024)"));
        }
        if !(self.bm * self.bk / ve).is_multiple_of(t)
            || !(self.bk * self.bn / ve).is_multiple_of(t)
        {
            return bad(format!(
                "the A ({}) and B ({}) copies of a stage must be multiples of the {t} threads",
                self.bm * self.bk / ve,
                self.bk * self.bn / ve
            ));
        }
        if !matches!(self.pad_bytes, 0 | 16) {
            return bad("pad_bytes must be 0 or 16".into());
        }
        let (lda, ldb) = self.lds(input);
        if !(lda * input.bytes()).is_multiple_of(16) || !(ldb * input.bytes()).is_multiple_of(16) {
            return bad("shared rows must be multiples of 16 bytes (ldmatrix)".into());
        }
        if !(2..=8).contains(&self.stages) {
            return bad("stages must be in 2..=8".into());
        }
        if self.split_k > 16 {
            return bad("split_k must be at most 16".into());
        }
        Ok(())
    }

    /// Checks the schedule against a SKU: [`MmaSchedule::validate_shape`], the instruction
    /// features, threads per block, shared memory (up to the opt-in limit) and the register
    /// estimate (per thread and per block).
    pub fn validate(&self, input: MmaInput, sku: &Sku) -> Result<(), GpuError> {
        self.validate_shape(input)?;
        for f in [input.feature(), "ldmatrix", "cp.async"] {
            if !sku.has(f) {
                return Err(GpuError::Unsupported {
                    kernel: "gemm_mma".into(),
                    feature: f.into(),
                    sku: sku.name.clone(),
                    arch: sku.arch.clone(),
                });
            }
        }
        let bad = |why: String| {
            Err(GpuError::Schedule(format!(
                "{self:?} on {}: {why}",
                sku.name
            )))
        };
        if self.threads() > sku.max_threads_per_block {
            return bad(format!("{} threads per block", self.threads()));
        }
        let smem = self.shared_bytes(input);
        if smem > sku.shared_mem_per_block_optin {
            return bad(format!(
                "{smem} B of shared memory (opt-in limit {})",
                sku.shared_mem_per_block_optin
            ));
        }
        let regs = self.registers_estimate(input);
        if regs > sku.max_registers_per_thread || regs * self.threads() > sku.registers_per_block {
            return bad(format!("~{regs} registers per thread"));
        }
        Ok(())
    }

    /// Grid `(ceil(n / bn), ceil(m / bm), batch · split_k)`.
    pub fn grid(&self, m: u64, n: u64, batch: u64) -> [u32; 3] {
        let c = |a: u64, b: u32| u32::try_from(a.div_ceil(u64::from(b.max(1)))).unwrap_or(u32::MAX);
        let z = batch.max(1) * u64::from(self.split_k.max(1));
        [
            c(n, self.bn).max(1),
            c(m, self.bm).max(1),
            u32::try_from(z).unwrap_or(u32::MAX),
        ]
    }
}

/// A generated tensor-core GEMM and how to launch it.
///
/// Parameters, in order: `A, B: memref<?xIN>`, `C: memref<?xOUT>`, `bias: memref<?xf32>`
/// (if [`Epilogue::bias`]), `R: memref<?xOUT>` (if it has a residual), `M, N, K, sA, sB, sC:
/// index`, `alpha: f32`, `beta: f32` (if it has a residual).
#[derive(Debug, Clone)]
pub struct MmaGemm {
    /// The kernel (`shared_bytes` is 0: all shared memory is dynamic).
    pub kernel: GpuKernel,
    /// The schedule it was generated with.
    pub schedule: MmaSchedule,
    /// Input element type.
    pub input: MmaInput,
    /// Output element type.
    pub output: MmaOutput,
    /// The fused epilogue.
    pub epilogue: Epilogue,
    /// Dynamic shared memory to pass at launch (set the function's
    /// `MAX_DYNAMIC_SHARED_SIZE_BYTES` when above 48 KiB).
    pub dynamic_shared: u32,
}

impl MmaGemm {
    /// Grid for an `m × n` output and `batch` matrices.
    pub fn grid(&self, m: u64, n: u64, batch: u64) -> [u32; 3] {
        self.schedule.grid(m, n, batch)
    }

    /// Whether the kernel computes this problem: `K`, `N` and the strides `sA`, `sB`
    /// multiples of the copy width (aligned `cp.async` sources), `sC` even for 16-bit
    /// outputs is not needed (scalar stores).
    pub fn supports(&self, n: u64, k: u64, stride_a: u64, stride_b: u64) -> bool {
        let ve = u64::from(self.schedule.vec_bytes / self.input.bytes());
        [n, k, stride_a, stride_b].iter().all(|v| v % ve == 0)
    }
}

/// Names the kernel for its configuration (`kiln_gemm_mma_f16_f32_128x128x32_w2x4_s3_v16_k1_p16_plain`).
pub fn kernel_name(input: MmaInput, output: MmaOutput, s: &MmaSchedule, e: &Epilogue) -> String {
    format!(
        "kiln_gemm_mma_{}_{}_{}x{}x{}_w{}x{}_s{}_v{}_k{}_p{}_{}",
        input.mlir(),
        output.mlir(),
        s.bm,
        s.bn,
        s.bk,
        s.wm,
        s.wn,
        s.stages,
        s.vec_bytes,
        s.split_k,
        s.pad_bytes,
        e.tag()
    )
}

/// The `gpu.module`-level declaration of the dynamic shared memory the kernels view as
/// their stage buffers: an external, zero-sized `workgroup` global, which the NVPTX back
/// end emits as `.extern .shared .align 1024 .b8 kiln_dynamic_smem[];` (PTX's dynamic shared
/// memory; 1024-byte aligned, as TMA's 128-byte swizzle requires: with 16 the region began
/// right after the wgmma kernel's mbarriers and the H200 reported a misaligned address). (`gpu.dynamic_shared_memory` lowers to an *internal* global that LLVM 22
/// demotes to a 1-byte static `.shared` variable, whose address need not be the start of
/// the dynamic region once the kernel has other static shared memory, e.g. mbarriers.)
pub fn dynamic_smem_decl() -> String {
    "  memref.global @kiln_dynamic_smem : memref<0xi8, #gpu.address_space<workgroup>> \
     {alignment = 1024 : i64}\n"
        .to_string()
}

/// MLIR text builder: fresh `%tN` names, index constants hoisted to the function entry.
struct Gen {
    body: String,
    consts: BTreeSet<u64>,
    n: usize,
}

impl Gen {
    fn c(&mut self, v: u64) -> String {
        self.consts.insert(v);
        format!("%c{v}")
    }

    fn line(&mut self, s: &str) {
        self.body.push_str("    ");
        self.body.push_str(s);
        self.body.push('\n');
    }

    /// `%tN = rhs`, returns `%tN`.
    fn op(&mut self, rhs: &str) -> String {
        self.n += 1;
        let t = format!("%t{}", self.n);
        self.line(&format!("{t} = {rhs}"));
        t
    }

    /// An index binary op (`addi`, `muli`, `divui`, `remui`, `minsi`, `maxsi`, ...).
    fn ix(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(&format!("arith.{op} {a}, {b} : index"))
    }

    fn ixc(&mut self, op: &str, a: &str, b: u64) -> String {
        let c = self.c(b);
        self.ix(op, a, &c)
    }

    fn cmp(&mut self, pred: &str, a: &str, b: &str) -> String {
        self.op(&format!("arith.cmpi {pred}, {a}, {b} : index"))
    }

    fn select(&mut self, c: &str, a: &str, b: &str, ty: &str) -> String {
        self.op(&format!("arith.select {c}, {a}, {b} : {ty}"))
    }
}

/// Per-thread `cp.async` coordinates of one chunk of a stage (loop-invariant parts).
struct Chunk {
    /// Row in the shared tile.
    row: String,
    /// Column in the shared tile.
    col: String,
    /// A: `offA + (m0 + row) · K`; B: `offB + n0 + col`.
    base: String,
    /// A: whether `m0 + row < M`; B: the elements left in the row (`clamp(N - n0 - col, 0, ve)`).
    limit: String,
}

/// Generates the tensor-core GEMM `name` (see the module docs); fails on invalid schedules
/// ([`MmaSchedule::validate_shape`]) and unsupported combinations (split-K with an
/// activation or a non-f32 output).
pub fn gemm_mma(
    name: &str,
    input: MmaInput,
    output: MmaOutput,
    epilogue: &Epilogue,
    s: &MmaSchedule,
) -> Result<MmaGemm, GpuError> {
    s.validate_shape(input)?;
    if s.split_k > 1
        && (output != MmaOutput::F32 || epilogue.activation != super::epilogue::Activation::None)
    {
        return Err(GpuError::Schedule(format!(
            "{name}: split_k = {} needs an f32 output and no activation (partial sums are \
             added atomically)",
            s.split_k
        )));
    }
    let eb = input.bytes();
    let ve = s.vec_bytes / eb;
    let (lda, ldb) = s.lds(input);
    let (mt_n, nt_n) = s.mma_tiles();
    let threads = s.threads();
    let ti = input.mlir();
    let to = output.mlir();
    let ws = "#gpu.address_space<workgroup>";
    let a_sh = format!("memref<{}x{}x{}x{ti}, {ws}>", s.stages, s.bm, lda);
    let b_sh = format!("memref<{}x{}x{}x{ti}, {ws}>", s.stages, s.bk, ldb);
    let a_bytes = s.stages * s.bm * lda * eb;
    let has_res = epilogue.has_residual();

    let mut g = Gen {
        body: String::new(),
        consts: BTreeSet::new(),
        n: 0,
    };
    g.line("%tid = gpu.thread_id x");
    g.line("%bx = gpu.block_id x");
    g.line("%by = gpu.block_id y");
    g.line("%bz = gpu.block_id z");
    let batch = g.ixc("divui", "%bz", u64::from(s.split_k));
    let split = g.ixc("remui", "%bz", u64::from(s.split_k));
    let m0 = g.ixc("muli", "%by", u64::from(s.bm));
    let n0 = g.ixc("muli", "%bx", u64::from(s.bn));
    let off_a = g.ix("muli", &batch, "%sA");
    let off_b = g.ix("muli", &batch, "%sB");
    let off_c = g.ix("muli", &batch, "%sC");
    // This split's range of k tiles [ktb, kte) and the K it may read up to.
    let kp = g.ixc("addi", "%K", u64::from(s.bk - 1));
    let ktiles = g.ixc("divui", &kp, u64::from(s.bk));
    let kq = g.ixc("addi", &ktiles, u64::from(s.split_k - 1));
    let per = g.ixc("divui", &kq, u64::from(s.split_k));
    let ktb = g.ix("muli", &split, &per);
    let kte0 = g.ix("addi", &ktb, &per);
    let kte = g.ix("minui", &kte0, &ktiles);
    let has = g.cmp("ugt", &kte, &ktb);
    let nkt0 = g.ix("subi", &kte, &ktb);
    let c0 = g.c(0);
    let nkt = g.select(&has, &nkt0, &c0, "index");
    let kend0 = g.ixc("muli", &kte, u64::from(s.bk));
    let kend = g.ix("minui", &kend0, "%K");
    g.line(&format!(
        "%smem = memref.get_global @kiln_dynamic_smem : memref<0xi8, {ws}>"
    ));
    let cab = g.c(u64::from(a_bytes));
    g.line(&format!(
        "%As = memref.view %smem[%c0][] : memref<0xi8, {ws}> to {a_sh}"
    ));
    g.line(&format!(
        "%Bs = memref.view %smem[{cab}][] : memref<0xi8, {ws}> to {b_sh}"
    ));
    let warp = g.ixc("divui", "%tid", 32);
    let lane = g.ixc("remui", "%tid", 32);
    let wy = g.ixc("divui", &warp, u64::from(s.wn));
    let wx = g.ixc("remui", &warp, u64::from(s.wn));
    let gq = g.ixc("divui", &lane, 4);
    let tq = g.ixc("remui", &lane, 4);
    let lrow = g.ixc("remui", &lane, 16);
    let lhalf = g.ixc("divui", &lane, 16);
    // ldmatrix column offset: 8 16-bit elements (tf32: 4 f32) for lanes 16..31.
    let lcol = g.ixc("muli", &lhalf, u64::from(16 / eb));
    let wm0 = g.ixc("muli", &wy, u64::from(s.warp_m()));
    let wn0 = g.ixc("muli", &wx, u64::from(s.warp_n()));

    // Copy coordinates.
    let cpr_a = s.bk / ve;
    let cpr_b = s.bn / ve;
    let chunks_a = s.bm * s.bk / ve / threads;
    let chunks_b = s.bk * s.bn / ve / threads;
    let cve = g.c(u64::from(ve));
    let mut a_chunks = Vec::new();
    for i in 0..chunks_a {
        let c = g.ixc("addi", "%tid", u64::from(i * threads));
        let row = g.ixc("divui", &c, u64::from(cpr_a));
        let cc = g.ixc("remui", &c, u64::from(cpr_a));
        let col = g.ixc("muli", &cc, u64::from(ve));
        let gr = g.ix("addi", &m0, &row);
        let ok = g.cmp("ult", &gr, "%M");
        let rb = g.ix("muli", &gr, "%K");
        let base = g.ix("addi", &off_a, &rb);
        a_chunks.push(Chunk {
            row,
            col,
            base,
            limit: ok,
        });
    }
    let mut b_chunks = Vec::new();
    for i in 0..chunks_b {
        let c = g.ixc("addi", "%tid", u64::from(i * threads));
        let row = g.ixc("divui", &c, u64::from(cpr_b));
        let cc = g.ixc("remui", &c, u64::from(cpr_b));
        let col = g.ixc("muli", &cc, u64::from(ve));
        let gc = g.ix("addi", &n0, &col);
        let left = g.ix("subi", "%N", &gc);
        let l0 = g.ix("maxsi", &left, &c0);
        let lim = g.ix("minsi", &l0, &cve);
        let base = g.ix("addi", &off_b, &gc);
        b_chunks.push(Chunk {
            row,
            col,
            base,
            limit: lim,
        });
    }
    let bypass = if s.vec_bytes == 16 { " {bypassL1}" } else { "" };
    // Issues the copies of k tile `kt` into stage `st` and commits them as one group.
    let load = |g: &mut Gen, kt: &str, st: &str| {
        let k0 = g.ixc("muli", kt, u64::from(s.bk));
        let mut toks = Vec::new();
        for ch in &a_chunks {
            let gk = g.ix("addi", &k0, &ch.col);
            let left = g.ix("subi", &kend, &gk);
            let l0 = g.ix("maxsi", &left, &c0);
            let l1 = g.ix("minsi", &l0, &cve);
            let n = g.select(&ch.limit, &l1, &c0, "index");
            let any = g.cmp("ugt", &n, &c0);
            let src0 = g.ix("addi", &ch.base, &gk);
            let src = g.select(&any, &src0, &c0, "index");
            toks.push(g.op(&format!(
                "nvgpu.device_async_copy %A[{src}], %As[{st}, {}, {}], {ve}, {n}{bypass} : memref<?x{ti}> to {a_sh}",
                ch.row, ch.col
            )));
        }
        for ch in &b_chunks {
            let gk = g.ix("addi", &k0, &ch.row);
            let ok = g.cmp("ult", &gk, &kend);
            let n = g.select(&ok, &ch.limit, &c0, "index");
            let any = g.cmp("ugt", &n, &c0);
            let r = g.ix("muli", &gk, "%N");
            let src0 = g.ix("addi", &ch.base, &r);
            let src = g.select(&any, &src0, &c0, "index");
            toks.push(g.op(&format!(
                "nvgpu.device_async_copy %B[{src}], %Bs[{st}, {}, {}], {ve}, {n}{bypass} : memref<?x{ti}> to {b_sh}",
                ch.row, ch.col
            )));
        }
        g.op(&format!(
            "nvgpu.device_async_create_group {}",
            toks.join(", ")
        ))
    };

    // Prologue: stages - 1 tiles in flight, then wait for the first one. (Each wait sits
    // after the copies of the group it follows: `nvgpu.device_async_wait` takes a token.)
    let c1 = g.c(1);
    let mut group = String::new();
    for ps in 0..s.stages - 1 {
        let kt = g.ixc("addi", &ktb, u64::from(ps));
        let st = g.c(u64::from(ps));
        group = load(&mut g, &kt, &st);
    }
    g.line(&format!(
        "nvgpu.device_async_wait {group} {{numGroups = {} : i32}}",
        s.stages - 2
    ));
    // Main loop.
    let acc_ty = "vector<2x2xf32>";
    let n_acc = (mt_n * nt_n) as usize;
    g.line(&format!("%zacc = arith.constant dense<0.0> : {acc_ty}"));
    let inits: Vec<String> = (0..n_acc).map(|i| format!("%ai{i} = %zacc")).collect();
    let tys = vec![acc_ty; n_acc].join(", ");
    g.line(&format!(
        "%acc:{n_acc} = scf.for %it = {c0} to {nkt} step {c1} iter_args({}) -> ({tys}) {{",
        inits.join(", ")
    ));
    g.line("gpu.barrier");
    let ln = g.ixc("addi", "%it", u64::from(s.stages - 1));
    let kt = g.ix("addi", &ktb, &ln);
    let st = g.ixc("remui", &ln, u64::from(s.stages));
    let group = load(&mut g, &kt, &st);
    let cs = g.ixc("remui", "%it", u64::from(s.stages));
    let mut accs: Vec<String> = (0..n_acc).map(|i| format!("%ai{i}")).collect();
    let km = input.mma_k();
    for kk in 0..s.bk / km {
        let kbase = u64::from(kk * km);
        // A fragments: one ldmatrix.x4 per 16-row mma tile.
        let mut fa = Vec::new();
        for mt in 0..mt_n {
            let r0 = g.ixc("addi", &wm0, u64::from(mt * 16));
            let r = g.ix("addi", &r0, &lrow);
            let c = g.ixc("addi", &lcol, kbase);
            let ty = if input == MmaInput::TF32 {
                "vector<4x1xf32>".to_string()
            } else {
                format!("vector<4x2x{ti}>")
            };
            let v = g.op(&format!(
                "nvgpu.ldmatrix %As[{cs}, {r}, {c}] {{numTiles = 4 : i32, transpose = false}} : {a_sh} -> {ty}"
            ));
            fa.push(v);
        }
        // B fragments per 8-column mma tile.
        let mut fb: Vec<Vec<String>> = Vec::new();
        if input == MmaInput::TF32 {
            for nt in 0..nt_n {
                let c0n = g.ixc("addi", &wn0, u64::from(nt * 8));
                let col = g.ix("addi", &c0n, &gq);
                let k0r = g.ixc("addi", &tq, kbase);
                let k1r = g.ixc("addi", &k0r, 4);
                let b0 = g.op(&format!("memref.load %Bs[{cs}, {k0r}, {col}] : {b_sh}"));
                let b1 = g.op(&format!("memref.load %Bs[{cs}, {k1r}, {col}] : {b_sh}"));
                fb.push(vec![b0, b1]);
            }
        } else {
            for np in 0..nt_n / 2 {
                let r = g.ixc("addi", &lrow, kbase);
                let c0n = g.ixc("addi", &wn0, u64::from(np * 16));
                let c = g.ix("addi", &c0n, &lcol);
                let v = g.op(&format!(
                    "nvgpu.ldmatrix %Bs[{cs}, {r}, {c}] {{numTiles = 4 : i32, transpose = true}} : {b_sh} -> vector<4x2x{ti}>"
                ));
                for half in 0..2 {
                    let rows: Vec<String> = (0..2)
                        .map(|j| {
                            g.op(&format!(
                                "vector.extract {v}[{}] : vector<2x{ti}> from vector<4x2x{ti}>",
                                2 * half + j
                            ))
                        })
                        .collect();
                    fb.push(rows);
                }
            }
        }
        // Operands in the form each mma op takes.
        let a_ops: Vec<Vec<String>> = fa
            .iter()
            .map(|v| match input {
                MmaInput::F16 | MmaInput::TF32 => vec![v.clone()],
                MmaInput::BF16 => (0..4)
                    .map(|i| {
                        let r = g.op(&format!(
                            "vector.extract {v}[{i}] : vector<2xbf16> from vector<4x2xbf16>"
                        ));
                        let b = g.op(&format!(
                            "vector.bitcast {r} : vector<2xbf16> to vector<1xi32>"
                        ));
                        g.op(&format!("vector.extract {b}[0] : i32 from vector<1xi32>"))
                    })
                    .collect(),
            })
            .collect();
        let b_ops: Vec<String> = fb
            .iter()
            .map(|rows| match input {
                MmaInput::F16 => {
                    let z = g.op("arith.constant dense<0.0> : vector<2x2xf16>");
                    let v0 = g.op(&format!(
                        "vector.insert {}, {z} [0] : vector<2xf16> into vector<2x2xf16>",
                        rows[0]
                    ));
                    g.op(&format!(
                        "vector.insert {}, {v0} [1] : vector<2xf16> into vector<2x2xf16>",
                        rows[1]
                    ))
                }
                MmaInput::TF32 => {
                    let z = g.op("arith.constant dense<0.0> : vector<2x1xf32>");
                    let v0 = g.op(&format!(
                        "vector.insert {}, {z} [0, 0] : f32 into vector<2x1xf32>",
                        rows[0]
                    ));
                    g.op(&format!(
                        "vector.insert {}, {v0} [1, 0] : f32 into vector<2x1xf32>",
                        rows[1]
                    ))
                }
                MmaInput::BF16 => {
                    let w: Vec<String> = rows
                        .iter()
                        .map(|r| {
                            let b = g.op(&format!(
                                "vector.bitcast {r} : vector<2xbf16> to vector<1xi32>"
                            ));
                            g.op(&format!("vector.extract {b}[0] : i32 from vector<1xi32>"))
                        })
                        .collect();
                    w.join(", ")
                }
            })
            .collect();
        for (mt, a_op) in a_ops.iter().enumerate() {
            for (nt, b_op) in b_ops.iter().enumerate() {
                let ai = mt * nt_n as usize + nt;
                let acc = accs[ai].clone();
                let d = match input {
                    MmaInput::F16 => g.op(&format!(
                        "nvgpu.mma.sync({}, {}, {acc}) {{mmaShape = [16, 8, 16]}} : (vector<4x2xf16>, vector<2x2xf16>, {acc_ty}) -> {acc_ty}",
                        a_op[0], b_op
                    )),
                    MmaInput::TF32 => g.op(&format!(
                        "nvgpu.mma.sync({}, {}, {acc}) {{mmaShape = [16, 8, 8], tf32Enabled}} : (vector<4x1xf32>, vector<2x1xf32>, {acc_ty}) -> {acc_ty}",
                        a_op[0], b_op
                    )),
                    MmaInput::BF16 => {
                        let cs: Vec<String> = (0..4)
                            .map(|e| {
                                g.op(&format!(
                                    "vector.extract {acc}[{}, {}] : f32 from {acc_ty}",
                                    e / 2,
                                    e % 2
                                ))
                            })
                            .collect();
                        let st = "!llvm.struct<(f32, f32, f32, f32)>";
                        let r = g.op(&format!(
                            "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, multiplicandAPtxType = #nvvm.mma_type<bf16>, multiplicandBPtxType = #nvvm.mma_type<bf16>, shape = #nvvm.shape<m = 16, n = 8, k = 16>}} : (i32, i32, f32) -> {st}",
                            a_op.join(", "),
                            b_op,
                            cs.join(", ")
                        ));
                        let mut v = "%zacc".to_string();
                        for e in 0..4 {
                            let x = g.op(&format!("llvm.extractvalue {r}[{e}] : {st}"));
                            v = g.op(&format!(
                                "vector.insert {x}, {v} [{}, {}] : f32 into {acc_ty}",
                                e / 2,
                                e % 2
                            ));
                        }
                        v
                    }
                };
                accs[ai] = d;
            }
        }
    }
    // Tile it + 1 complete (the wait is at the end of the iteration, after the commit).
    g.line(&format!(
        "nvgpu.device_async_wait {group} {{numGroups = {} : i32}}",
        s.stages - 2
    ));
    g.line(&format!("scf.yield {} : {tys}", accs.join(", ")));
    g.line("}");

    // Epilogue.
    let first = g.cmp("eq", &split, &c0);
    let one_if_first = g.op("arith.constant 1.0 : f32");
    let zero_f = g.op("arith.constant 0.0 : f32");
    let once = g.select(&first, &one_if_first, &zero_f, "f32");
    let beta = if has_res {
        g.op(&format!("arith.mulf %beta, {once} : f32"))
    } else {
        String::new()
    };
    for mt in 0..mt_n {
        for nt in 0..nt_n {
            let ai = (mt * nt_n + nt) as usize;
            for i in 0..2u32 {
                let r0 = g.ix("addi", &m0, &wm0);
                let r1 = g.ixc("addi", &r0, u64::from(mt * 16 + 8 * i));
                let row = g.ix("addi", &r1, &gq);
                let rok = g.cmp("ult", &row, "%M");
                for j in 0..2u32 {
                    let c0n = g.ix("addi", &n0, &wn0);
                    let t2 = g.ixc("muli", &tq, 2);
                    let c1n = g.ixc("addi", &c0n, u64::from(nt * 8 + j));
                    let col = g.ix("addi", &c1n, &t2);
                    let cok = g.cmp("ult", &col, "%N");
                    let ok = g.op(&format!("arith.andi {rok}, {cok} : i1"));
                    g.line(&format!("scf.if {ok} {{"));
                    let acc = format!("%acc#{ai}");
                    let v = g.op(&format!(
                        "vector.extract {acc}[{i}, {j}] : f32 from {acc_ty}"
                    ));
                    let mut y = g.op(&format!("arith.mulf {v}, %alpha : f32"));
                    if epilogue.bias {
                        let b = g.op(&format!("memref.load %bias[{col}] : memref<?xf32>"));
                        let b1 = g.op(&format!("arith.mulf {b}, {once} : f32"));
                        y = g.op(&format!("arith.addf {y}, {b1} : f32"));
                    }
                    let rn = g.ix("muli", &row, "%N");
                    let ix0 = g.ix("addi", &off_c, &rn);
                    let ix = g.ix("addi", &ix0, &col);
                    let res = |g: &mut Gen, y: &str| -> String {
                        let r = g.op(&format!("memref.load %R[{ix}] : memref<?x{to}>"));
                        let rf = if output == MmaOutput::F32 {
                            r
                        } else {
                            g.op(&format!("arith.extf {r} : {to} to f32"))
                        };
                        let br = g.op(&format!("arith.mulf {rf}, {beta} : f32"));
                        g.op(&format!("arith.addf {y}, {br} : f32"))
                    };
                    if epilogue.residual == Residual::BeforeActivation {
                        y = res(&mut g, &y);
                    }
                    g.n += 1;
                    let p = format!("e{}", g.n);
                    let mut w = std::mem::take(&mut g.body);
                    y = emit_activation(&mut w, epilogue.activation, &y, &p);
                    g.body = w;
                    if epilogue.residual == Residual::AfterActivation {
                        y = res(&mut g, &y);
                    }
                    if s.split_k > 1 {
                        g.op(&format!(
                            "memref.atomic_rmw addf {y}, %C[{ix}] : (f32, memref<?xf32>) -> f32"
                        ));
                    } else {
                        let yo = if output == MmaOutput::F32 {
                            y
                        } else {
                            g.op(&format!("arith.truncf {y} : f32 to {to}"))
                        };
                        g.line(&format!("memref.store {yo}, %C[{ix}] : memref<?x{to}>"));
                    }
                    g.line("}");
                }
            }
        }
    }
    g.line("gpu.return");

    // Assemble: signature, hoisted constants, body.
    let mut params = vec![
        KernelParam::Buffer {
            name: "A".into(),
            elem: input.elem(),
        },
        KernelParam::Buffer {
            name: "B".into(),
            elem: input.elem(),
        },
        KernelParam::Buffer {
            name: "C".into(),
            elem: output.elem(),
        },
    ];
    let mut sig = format!("%A: memref<?x{ti}>, %B: memref<?x{ti}>, %C: memref<?x{to}>");
    if epilogue.bias {
        params.push(KernelParam::Buffer {
            name: "bias".into(),
            elem: Elem::F32,
        });
        sig.push_str(", %bias: memref<?xf32>");
    }
    if has_res {
        params.push(KernelParam::Buffer {
            name: "R".into(),
            elem: output.elem(),
        });
        let _ = write!(sig, ", %R: memref<?x{to}>");
    }
    for p in ["M", "N", "K", "sA", "sB", "sC"] {
        params.push(KernelParam::Index(p.into()));
        let _ = write!(sig, ", %{p}: index");
    }
    params.push(KernelParam::F32("alpha".into()));
    sig.push_str(", %alpha: f32");
    if has_res {
        params.push(KernelParam::F32("beta".into()));
        sig.push_str(", %beta: f32");
    }
    let mut text = format!(
        "{}  gpu.func @{name}({sig}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>}} {{\n",
        dynamic_smem_decl()
    );
    for c in &g.consts {
        let _ = writeln!(text, "    %c{c} = arith.constant {c} : index");
    }
    text.push_str(&g.body);
    text.push_str("  }\n");
    let mut requires = vec![input.feature().to_string()];
    requires.extend(["ldmatrix".to_string(), "cp.async".to_string()]);
    Ok(MmaGemm {
        kernel: GpuKernel {
            name: name.into(),
            mlir: text,
            params,
            block: [threads, 1, 1],
            shared_bytes: 0,
            requires,
        },
        schedule: *s,
        input,
        output,
        epilogue: *epilogue,
        dynamic_shared: s.shared_bytes(input),
    })
}

/// The kernels `all_default()` validates: f16 → f32 plain and bf16 → bf16 with bias, GELU
/// and residual with the default schedule; tf32 → f32 with bias and relu with
/// [`MmaSchedule::small`] (the default's 104 KiB of f32 stages exceed the 99 KiB opt-in of
/// sm_86/sm_89). Every one is valid on every SKU of the database.
pub fn default_kernels() -> Result<Vec<MmaGemm>, GpuError> {
    use super::epilogue::Activation;
    let d = MmaSchedule::default();
    let cases = [
        (MmaInput::F16, MmaOutput::F32, Epilogue::none(), d),
        (
            MmaInput::BF16,
            MmaOutput::BF16,
            Epilogue {
                bias: true,
                activation: Activation::GeluTanh,
                residual: Residual::AfterActivation,
            },
            d,
        ),
        (
            MmaInput::TF32,
            MmaOutput::F32,
            Epilogue {
                bias: true,
                activation: Activation::Relu,
                residual: Residual::None,
            },
            MmaSchedule::small(),
        ),
    ];
    cases
        .iter()
        .map(|(i, o, e, s)| gemm_mma(&kernel_name(*i, *o, s, e), *i, *o, e, s))
        .collect()
}

/// The CPU definition of what [`gemm_mma`] computes, on f32 values (inputs already rounded
/// to the input type): `C[b][r, c] = epilogue(Σ_k A[b][r, k] · B[b][k, c])` with the
/// module's layout and strides. `bias` has `n` values, `residual` is laid out like `C`.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    (m, n, k): (usize, usize, usize),
    batch: usize,
    (a, sa): (&[f32], usize),
    (b, sb): (&[f32], usize),
    sc: usize,
    epilogue: &Epilogue,
    (alpha, beta): (f32, f32),
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let mut c = vec![0.0f32; sc * batch.saturating_sub(1) + m * n];
    for z in 0..batch {
        for r in 0..m {
            for col in 0..n {
                let acc: f32 = (0..k)
                    .map(|p| a[z * sa + r * k + p] * b[z * sb + p * n + col])
                    .sum();
                let ix = z * sc + r * n + col;
                let bv = bias.map_or(0.0, |bb| bb[col]);
                let rv = residual.map_or(0.0, |rr| rr[ix]);
                c[ix] = epilogue.apply(acc, alpha, beta, bv, rv);
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::epilogue::Activation;
    use crate::gpu::DeviceDb;

    #[test]
    fn default_schedule_is_valid_everywhere() {
        let db = DeviceDb::builtin().unwrap();
        let s = MmaSchedule::default();
        assert_eq!(s.threads(), 256);
        assert_eq!(s.mma_tiles(), (4, 4));
        // 3 · (128·40 + 32·136) · 2 bytes.
        assert_eq!(s.shared_bytes(MmaInput::F16), 56_832);
        for sku in db.skus() {
            for input in [MmaInput::F16, MmaInput::BF16] {
                s.validate(input, sku).unwrap();
            }
        }
    }

    #[test]
    fn invalid_schedules_are_rejected() {
        let d = MmaSchedule::default();
        let db = DeviceDb::builtin().unwrap();
        let a100 = db.parse_target("cuda:a100").unwrap();
        for (bad, why) in [
            (MmaSchedule { bk: 0, ..d }, "positive"),
            (MmaSchedule { bm: 48, ..d }, "16·wm"),
            (MmaSchedule { bn: 64, wn: 8, ..d }, "16·wn"),
            (MmaSchedule { bk: 24, ..d }, "mma depth"),
            (MmaSchedule { vec_bytes: 12, ..d }, "vec_bytes"),
            (MmaSchedule { stages: 1, ..d }, "stages"),
            (MmaSchedule { pad_bytes: 8, ..d }, "pad_bytes"),
            (MmaSchedule { split_k: 32, ..d }, "split_k"),
            (
                MmaSchedule {
                    bm: 32,
                    bn: 32,
                    bk: 16,
                    wm: 2,
                    wn: 2,
                    ..d
                },
                "multiples of the",
            ),
        ] {
            let e = bad.validate(MmaInput::F16, a100).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        // Shared memory beyond the opt-in limit (A100: 163 KiB).
        let big = MmaSchedule {
            bm: 256,
            bn: 256,
            bk: 64,
            stages: 5,
            wm: 4,
            wn: 4,
            ..d
        };
        let e = big.validate(MmaInput::F16, a100).unwrap_err().to_string();
        assert!(e.contains("shared memory"), "{e}");
        // Too many accumulators for the register file.
        let fat = MmaSchedule {
            bm: 256,
            bn: 256,
            bk: 16,
            stages: 2,
            wm: 1,
            wn: 1,
            ..d
        };
        let e = fat.validate(MmaInput::F16, a100).unwrap_err().to_string();
        assert!(e.contains("registers"), "{e}");
        // Split-K needs an f32 output and no activation.
        let sk = MmaSchedule { split_k: 2, ..d };
        let relu = Epilogue {
            activation: Activation::Relu,
            ..Epilogue::none()
        };
        assert!(gemm_mma("g", MmaInput::F16, MmaOutput::F32, &relu, &sk).is_err());
        assert!(gemm_mma("g", MmaInput::F16, MmaOutput::F16, &Epilogue::none(), &sk).is_err());
        assert!(gemm_mma("g", MmaInput::F16, MmaOutput::F32, &Epilogue::none(), &sk).is_ok());
    }

    #[test]
    fn default_kernels_fit_every_sku() {
        let db = DeviceDb::builtin().unwrap();
        for g in default_kernels().unwrap() {
            for sku in db.skus() {
                g.schedule.validate(g.input, sku).unwrap();
                g.kernel.check_fits(sku).unwrap();
            }
        }
        assert_eq!(MmaSchedule::small().shared_bytes(MmaInput::TF32), 71_680);
    }

    #[test]
    fn space_and_setters_agree() {
        let d = MmaSchedule::default();
        let mut valid = 0;
        for (name, values) in MmaSchedule::space() {
            assert_eq!(d.with(name, d.get(name).unwrap()).unwrap(), d);
            for v in values {
                let s = d.with(name, v).unwrap();
                assert_eq!(s.get(name), Some(v));
                valid += usize::from(s.validate_shape(MmaInput::F16).is_ok());
            }
        }
        assert!(valid > 20, "{valid}");
        assert!(d.with("nope", 1).is_err());
        assert!(d.get("nope").is_none());
    }

    /// `KILN_DUMP_GPU_MLIR=DIR` writes the default kernels' MLIR modules there (to debug
    /// them with `mlir-opt`).
    #[test]
    fn dump_mlir_when_asked() {
        let Some(dir) = std::env::var_os("KILN_DUMP_GPU_MLIR") else {
            return;
        };
        for g in default_kernels().unwrap() {
            let path = std::path::Path::new(&dir).join(format!("{}.mlir", g.kernel.name));
            std::fs::write(path, crate::gpu::pipeline::module_text(&g.kernel)).unwrap();
        }
    }

    #[test]
    fn launch_geometry() {
        let s = MmaSchedule {
            split_k: 4,
            ..MmaSchedule::default()
        };
        assert_eq!(s.grid(4096, 4096, 1), [32, 32, 4]);
        assert_eq!(s.grid(129, 1, 3), [1, 2, 12]);
        assert_eq!(s.grid(0, 0, 0), [1, 1, 4]);
        let g = gemm_mma(
            "g",
            MmaInput::F16,
            MmaOutput::F32,
            &Epilogue::none(),
            &MmaSchedule::default(),
        )
        .unwrap();
        assert_eq!(g.kernel.block, [256, 1, 1]);
        assert_eq!(g.dynamic_shared, 56_832);
        assert!(g.supports(4096, 4096, 0, 0));
        assert!(!g.supports(4096, 4095, 0, 0));
        assert!(!g.supports(4096, 4096, 12, 0));
        let t = gemm_mma(
            "t",
            MmaInput::TF32,
            MmaOutput::F32,
            &Epilogue::none(),
            &MmaSchedule::default(),
        )
        .unwrap();
        assert!(t.supports(4, 4, 4, 8) && !t.supports(6, 4, 0, 0));
    }

    #[test]
    fn parameters_follow_the_epilogue() {
        let e = Epilogue {
            bias: true,
            activation: Activation::Silu,
            residual: Residual::AfterActivation,
        };
        let g = gemm_mma(
            "g",
            MmaInput::BF16,
            MmaOutput::BF16,
            &e,
            &MmaSchedule::default(),
        )
        .unwrap();
        let names: Vec<String> = g
            .kernel
            .params
            .iter()
            .map(|p| match p {
                KernelParam::Buffer { name, .. }
                | KernelParam::F32(name)
                | KernelParam::Index(name)
                | KernelParam::TensorMap(name) => name.clone(),
            })
            .collect();
        assert_eq!(
            names,
            ["A", "B", "C", "bias", "R", "M", "N", "K", "sA", "sB", "sC", "alpha", "beta"]
        );
        assert!(g.kernel.mlir.contains("nvvm.mma.sync"));
        assert!(g.kernel.mlir.contains("math.exp"));
    }

    #[test]
    fn reference_applies_strides_and_epilogue() {
        // Two batches of 1×2 · 2×1 with a residual after relu.
        let a = [1.0, 2.0, -1.0, -2.0];
        let b = [3.0, 4.0];
        let e = Epilogue {
            bias: true,
            activation: Activation::Relu,
            residual: Residual::AfterActivation,
        };
        let c = reference(
            (1, 1, 2),
            2,
            (&a, 2),
            (&b, 0),
            1,
            &e,
            (1.0, 2.0),
            Some(&[0.5]),
            Some(&[1.0, 1.0]),
        );
        assert_eq!(c, vec![11.5 + 2.0, 2.0]);
    }
}
