//! sm_90 GEMM on warpgroup tensor cores: `nvgpu.warpgroup.mma` (PTX `wgmma.mma_async`)
//! with both operands in shared memory, loaded by TMA (`nvgpu.tma.async.load`, PTX
//! `cp.async.bulk.tensor`) into a ring of `stages` buffers guarded by one mbarrier each.
//!
//! ```text
//! C[M,N] = epilogue(A[M,K] · B[K,N])        row-major; f16 or bf16 in, f32 accumulation
//! rows = 128 · warpgroups; grid (ceil(N/bn), ceil(M/rows)), 128 threads per warpgroup,
//! dynamic shared memory; with raster g > 1 a block's linear id is mapped to the tiles in
//! bands of g tile rows, column by column (L2 reuse)
//! shared: stages × (A rows×64 | B 64×bn as bn/64 boxes of 64×64), 128-byte swizzled by TMA
//! thread 0: init the mbarriers; issue tiles 0..stages-1 (expect_tx + TMA loads)
//! for kt: wait on mbarrier kt % stages (parity (kt / stages) % 2)
//!         each warpgroup: wgmma on its 128 rows, 128×bn×64 (8 m64nBNk16
//!         instructions), then wgmma.wait_group 1: the
//!         previous tile's wgmmas are done while this tile's run; barrier; thread 0
//!         refills the previous tile's buffer with tile kt - 1 + stages
//! accumulators → shared memory (nvgpu.warpgroup.mma.store with one warpgroup, an explicit
//! fragment store with two; reusing the stage buffers),
//! then a masked, coalesced copy to C applying the epilogue
//! ```
//!
//! The TMA boxes zero-fill everything outside `[0, K) × [0, M)` (A) and `[0, N) × [0, K)`
//! (B), so every `M`, `N`, `K` works, given TMA's 16-byte global stride rule: `K` and `N`
//! multiples of 8. Not batched (a 3-D tensor map would be).
//!
//! Kernel parameters: `tmA, tmB` ([`KernelParam::TensorMap`]: device addresses of
//! `CUtensorMap`s the host encodes with `cuTensorMapEncodeTiled` as [`WgmmaGemm::tensor_maps`]
//! describes), `C: memref<?xOUT>`, `bias: memref<?xf32>` (if any), `R: memref<?xOUT>` (if a
//! residual), `M, N, K: index`, `alpha: f32`, `beta: f32` (if a residual).
//!
//! Lowering notes (MLIR 22): a `gpu.func` argument of type `!nvgpu.tensormap.descriptor`
//! makes `convert-gpu-to-nvvm` fail ("failed to legalize operation 'gpu.func'"): the
//! signature conversion does not know nvgpu types. The kernel therefore takes `!llvm.ptr`
//! and casts it with `builtin.unrealized_conversion_cast` (folded away after lowering).
//! `wgmma` needs the architecture-specific target `sm_90a` ([`GpuKernel::chip`]).

use super::epilogue::{emit_activation, Epilogue, Residual};
use super::gemm_mma::{MmaInput, MmaOutput};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam, Sku};
use std::fmt::Write as _;

/// Rows of the block tile per warpgroup (two `m64` wgmma rows), except with `bn = 256` (one).
pub const BM: u32 = 128;
/// Depth of one stage: 64 16-bit elements = the 128-byte swizzle span.
pub const BK: u32 = 64;

/// The tunable parameters of [`gemm_wgmma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WgmmaSchedule {
    /// Columns of the block tile: 64 or 128 (`bn` f32 accumulator registers per thread,
    /// 128 rows per warpgroup), or 256 (64 rows per warpgroup, 128 registers: with two
    /// warpgroups a 128×256 tile).
    pub bn: u32,
    /// Shared-memory buffers of the TMA ring (2..=6).
    pub stages: u32,
    /// Output columns each thread stores at once in the epilogue (1, 4 or 8, at most 16
    /// bytes of output): vectors where `N` is a multiple of it, element by element at the
    /// edges.
    pub vector: u32,
    /// Consumer warpgroups per block (1 or 2): the block tile has `128 · warpgroups` rows,
    /// each warpgroup multiplies its own 128 rows of A by the B tile they share, so one TMA
    /// load of B feeds twice the tensor-core work.
    pub warpgroups: u32,
    /// Block rasterization (1..=32): 1 walks the output tiles row by row (`blockIdx.x`
    /// over `N`); `g > 1` walks them in bands of `g` tile rows, column by column inside a
    /// band, so the blocks running at once share A and B panels in L2.
    pub raster: u32,
    /// 1: a dedicated producer warpgroup issues the TMA loads (one thread of it), gated by
    /// per-stage "empty" mbarriers the consumers arrive on once their wgmmas of a stage are
    /// done — no block-wide barrier in the main loop (warp specialization). 0: thread 0 of
    /// the consumers refills a stage after a block barrier.
    pub producer: u32,
}

impl Default for WgmmaSchedule {
    /// 128×128×64 tiles, 4 stages (128 KiB of shared memory), an element-wise epilogue,
    /// one warpgroup, tiles in row order.
    fn default() -> Self {
        Self {
            bn: 128,
            stages: 4,
            vector: 1,
            warpgroups: 1,
            raster: 1,
            producer: 0,
        }
    }
}

impl WgmmaSchedule {
    /// The untuned schedule for an `m × n` output of type `output` on a GPU with `sms`
    /// multiprocessors. Every problem gets the vectorized epilogue (16 bytes per store: 8
    /// halves or 4 floats); then by the number of output tiles (measured on an H200 in
    /// session 11 against cuBLAS, f16):
    /// - at least one 128×256 tile per multiprocessor: the two-warpgroup 128×256 tile
    ///   (`bn = 256`), 4 stages, bands of 8 tile rows — 0.96–1.00× cuBLAS at 4096³ where
    ///   [`WgmmaSchedule::default`] reached 0.75× and its vectorized form 0.85–0.88×;
    /// - at least one 128×128 tile per multiprocessor: the 128×128 tile (0.99× at 2048³);
    /// - fewer: 128×64 tiles, twice as many blocks (BERT-base projections at sequence 128:
    ///   1.03–1.17× cuBLAS where 128×128 tiles gave 0.65–0.81×).
    pub fn for_problem(m: u64, n: u64, output: MmaOutput, sms: u32) -> Self {
        let vector = if output == MmaOutput::F32 { 4 } else { 8 };
        let base = Self {
            vector,
            ..Self::default()
        };
        let wide = Self {
            bn: 256,
            warpgroups: 2,
            raster: 8,
            ..base
        };
        let tiles = |s: &Self| (m / u64::from(s.rows())) * (n / u64::from(s.bn));
        if tiles(&wide) >= u64::from(sms) {
            wide
        } else if tiles(&base) >= u64::from(sms) {
            base
        } else {
            Self { bn: 64, ..base }
        }
    }

    /// The parameters and their legal values.
    pub fn space() -> Vec<super::gemm_mma::ParamValues> {
        vec![
            ("bn", vec![64, 128, 256]),
            ("stages", vec![2, 3, 4, 5, 6]),
            ("vector", vec![1, 4]),
            ("warpgroups", vec![1, 2]),
            ("raster", vec![1, 8]),
            ("producer", vec![0, 1]),
        ]
    }

    /// Rows of the block tile: 128 per warpgroup (64 with bn = 256).
    pub fn rows(&self) -> u32 {
        let per_warpgroup = if self.bn == 256 { BM / 2 } else { BM };
        per_warpgroup * self.warpgroups
    }

    /// Threads per block: a warpgroup of 128 per consumer, plus the producer's.
    pub fn threads(&self) -> u32 {
        128 * (self.warpgroups + self.producer)
    }

    /// Bytes one stage receives (the mbarrier transaction count).
    pub fn stage_bytes(&self) -> u32 {
        (self.rows() * BK + BK * self.bn) * 2
    }

    /// Dynamic shared memory: the stages, at least the f32 accumulator tile (which reuses
    /// them after the main loop).
    pub fn shared_bytes(&self) -> u32 {
        (self.stages * self.stage_bytes()).max(self.rows() * self.bn * 4)
    }

    /// Checks the values and the SKU (`wgmma` and `tma` features, opt-in shared memory).
    pub fn validate(&self, sku: &Sku) -> Result<(), GpuError> {
        let bad = |why: String| Err(GpuError::Schedule(format!("{self:?}: {why}")));
        if let Some(why) = self.range_error() {
            return bad(why.into());
        }
        for f in ["wgmma", "tma"] {
            if !sku.has(f) {
                return Err(GpuError::Unsupported {
                    kernel: "gemm_wgmma".into(),
                    feature: f.into(),
                    sku: sku.name.clone(),
                    arch: sku.arch.clone(),
                });
            }
        }
        if self.shared_bytes() > sku.shared_mem_per_block_optin {
            return bad(format!(
                "{} B of shared memory on {} (opt-in limit {})",
                self.shared_bytes(),
                sku.name,
                sku.shared_mem_per_block_optin
            ));
        }
        Ok(())
    }

    /// Which parameter is out of its range, if any.
    fn range_error(&self) -> Option<&'static str> {
        if !matches!(self.bn, 64 | 128 | 256) {
            Some("bn must be 64, 128 or 256")
        } else if !(2..=6).contains(&self.stages) {
            Some("stages must be in 2..=6")
        } else if !matches!(self.vector, 1 | 4 | 8) {
            Some("vector must be 1, 4 or 8")
        } else if !matches!(self.warpgroups, 1 | 2) {
            Some("warpgroups must be 1 or 2")
        } else if !(1..=32).contains(&self.raster) {
            Some("raster must be in 1..=32")
        } else if self.producer > 1 {
            Some("producer must be 0 or 1")
        } else {
            None
        }
    }

    /// Grid `(ceil(n / bn), ceil(m / rows), 1)` (the kernel renumbers the blocks when
    /// `raster > 1`; the grid is the same).
    pub fn grid(&self, m: u64, n: u64) -> [u32; 3] {
        let c = |a: u64, b: u32| u32::try_from(a.div_ceil(u64::from(b)).max(1)).unwrap_or(u32::MAX);
        [c(n, self.bn), c(m, self.rows()), 1]
    }
}

/// How the host must encode one TMA descriptor (`cuTensorMapEncodeTiled`, rank 2, 16-bit
/// elements, no interleave, 128-byte swizzle, no L2 promotion, zero fill out of bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorMapSpec {
    /// Global extent, innermost first (`[K, M]` for A, `[N, K]` for B).
    pub dims: [u64; 2],
    /// Byte stride of the outer dimension (the row pitch).
    pub row_bytes: u64,
    /// Box extent, innermost first.
    pub box_dims: [u32; 2],
}

/// A generated warpgroup GEMM and how to launch it.
#[derive(Debug, Clone)]
pub struct WgmmaGemm {
    /// The kernel (all shared memory dynamic; requires `wgmma` and `tma`).
    pub kernel: GpuKernel,
    /// Its schedule.
    pub schedule: WgmmaSchedule,
    /// Input element type (f16 or bf16).
    pub input: MmaInput,
    /// Output element type.
    pub output: MmaOutput,
    /// The fused epilogue.
    pub epilogue: Epilogue,
    /// Dynamic shared memory to pass at launch.
    pub dynamic_shared: u32,
}

impl WgmmaGemm {
    /// The descriptors `tmA`, `tmB` for an `m × n × k` problem.
    pub fn tensor_maps(&self, m: u64, n: u64, k: u64) -> [TensorMapSpec; 2] {
        [
            TensorMapSpec {
                dims: [k, m],
                row_bytes: 2 * k,
                box_dims: [BK, self.schedule.rows()],
            },
            TensorMapSpec {
                dims: [n, k],
                row_bytes: 2 * n,
                box_dims: [64, BK],
            },
        ]
    }

    /// Whether TMA can describe the operands: `K` and `N` multiples of 8 (16-byte rows).
    pub fn supports(&self, n: u64, k: u64) -> bool {
        n.is_multiple_of(8) && k.is_multiple_of(8) && n > 0 && k > 0
    }
}

/// The schedule checks that need no SKU: every parameter in range, and output vectors of
/// at most 16 bytes.
fn check_shape(name: &str, output: MmaOutput, s: &WgmmaSchedule) -> Result<(), GpuError> {
    if let Some(why) = s.range_error() {
        return Err(GpuError::Schedule(format!("{name}: {s:?}: {why}")));
    }
    if u64::from(s.vector) * output.elem().bytes() > 16 {
        return Err(GpuError::Schedule(format!(
            "{name}: {s:?}: {} output vectors of {} elements exceed 16 bytes",
            output.mlir(),
            s.vector
        )));
    }
    Ok(())
}

/// Generates the warpgroup GEMM `name` (see the module docs).
pub fn gemm_wgmma(
    name: &str,
    input: MmaInput,
    output: MmaOutput,
    epilogue: &Epilogue,
    s: &WgmmaSchedule,
) -> Result<WgmmaGemm, GpuError> {
    if input == MmaInput::TF32 {
        return Err(GpuError::Schedule(format!(
            "{name}: the wgmma kernel takes f16 or bf16 inputs"
        )));
    }
    check_shape(name, output, s)?;
    let (bn, st, rows, wgs) = (s.bn, s.stages, s.rows(), s.warpgroups);
    let prod = s.producer == 1;
    let ti = input.mlir();
    let to = output.mlir();
    let ws = "#gpu.address_space<workgroup>";
    let tm = |rows: u32| {
        format!(
            "!nvgpu.tensormap.descriptor<tensor = memref<{rows}x64x{ti}, 3>, swizzle = swizzle_128b, l2promo = none, oob = zero, interleave = none>"
        )
    };
    let (tma, tmb) = (tm(rows), tm(BK));
    let bar = format!("!nvgpu.mbarrier.group<memorySpace = {ws}, num_barriers = {st}>");
    let a_sh = format!("memref<{st}x{rows}x{BK}x{ti}, {ws}>");
    let b_sh = format!("memref<{st}x{BK}x{bn}x{ti}, {ws}>");
    let a_bytes = st * rows * BK * 2;
    // MLIR 22's `nvgpu.warpgroup.mma.store` offsets the i-th m64 fragment of an
    // accumulator by i × (registers per thread) = i × bn/2 rows, which is 64 only for
    // bn = 128: a 128×64 accumulator's second half would land on rows 32..95. Other widths
    // keep two 64-row accumulators (two wgmma groups per k-tile over the two row halves of
    // the A tile), each stored on its own.
    // bn = 256: 64 rows per warpgroup (m64n256, 128 registers), one accumulator.
    let (halves, mr): (u32, u32) = match bn {
        128 => (1, 128),
        64 => (2, 64),
        _ => (1, 64),
    };
    let acc = format!("!nvgpu.warpgroup.accumulator<fragmented = vector<{mr}x{bn}xf32>>");
    let has_res = epilogue.has_residual();

    let mut w = String::new();
    let mut sig = format!("%pA: !llvm.ptr, %pB: !llvm.ptr, %C: memref<?x{to}>");
    let mut params = vec![
        KernelParam::TensorMap("tmA".into()),
        KernelParam::TensorMap("tmB".into()),
        KernelParam::Buffer {
            name: "C".into(),
            elem: output.elem(),
        },
    ];
    if epilogue.bias {
        sig.push_str(", %bias: memref<?xf32>");
        params.push(KernelParam::Buffer {
            name: "bias".into(),
            elem: Elem::F32,
        });
    }
    if has_res {
        let _ = write!(sig, ", %R: memref<?x{to}>");
        params.push(KernelParam::Buffer {
            name: "R".into(),
            elem: output.elem(),
        });
    }
    sig.push_str(", %M: index, %N: index, %K: index, %alpha: f32");
    params.extend(["M", "N", "K"].map(|p| KernelParam::Index(p.into())));
    params.push(KernelParam::F32("alpha".into()));
    if has_res {
        sig.push_str(", %beta: f32");
        params.push(KernelParam::F32("beta".into()));
    }
    w.push_str(&super::gemm_mma::dynamic_smem_decl());
    let _ = writeln!(
        w,
        "  gpu.func @{name}({sig}) kernel attributes {{known_block_size = array<i32: {}, 1, 1>}} {{",
        s.threads()
    );
    let _ = write!(
        w,
        r#"    %tmA = builtin.unrealized_conversion_cast %pA : !llvm.ptr to {tma}
    %tmB = builtin.unrealized_conversion_cast %pB : !llvm.ptr to {tmb}
    %c0 = arith.constant 0 : index
    %c1 = arith.constant 1 : index
    %c2 = arith.constant 2 : index
    %c64 = arith.constant 64 : index
    %c128 = arith.constant 128 : index
    %cBN = arith.constant {bn} : index
    %cST = arith.constant {st} : index
    %cAB = arith.constant {a_bytes} : index
    %cTX = arith.constant {tx} : index
    %cTILE = arith.constant {tile} : index
    %ticks = arith.constant 10000000 : index
    %tid = gpu.thread_id x
    %bx = gpu.block_id x
    %by = gpu.block_id y
{origin}    %smem = memref.get_global @kiln_dynamic_smem : memref<0xi8, {ws}>
    %As = memref.view %smem[%c0][] : memref<0xi8, {ws}> to {a_sh}
    %Bs = memref.view %smem[%cAB][] : memref<0xi8, {ws}> to {b_sh}
    %bar = nvgpu.mbarrier.create -> {bar}
{ebar}    %is0 = arith.cmpi eq, %tid, %c0 : index
    %kp = arith.addi %K, %c64 : index
    %kp1 = arith.subi %kp, %c1 : index
    %ktiles = arith.divui %kp1, %c64 : index
    scf.if %is0 {{
"#,
        tx = s.stage_bytes(),
        tile = rows * bn,
        origin = block_origin(s),
        ebar = if prod {
            format!("    %ebar = nvgpu.mbarrier.create -> {bar}\n    %cCONS = arith.constant {} : index\n", 128 * wgs)
        } else {
            String::new()
        },
    );
    for i in 0..st {
        let _ = writeln!(
            w,
            "      %ci{i} = arith.constant {i} : index\n      nvgpu.mbarrier.init %bar[%ci{i}], %c1 : {bar}"
        );
        if prod {
            let _ = writeln!(w, "      nvgpu.mbarrier.init %ebar[%ci{i}], %cCONS : {bar}");
        }
    }
    let _ = writeln!(
        w,
        "      nvgpu.tma.prefetch.descriptor %tmA : {tma}\n      nvgpu.tma.prefetch.descriptor %tmB : {tmb}\n    }}\n    gpu.barrier"
    );
    // Issues tile `kt` into stage `s` (thread 0 only; the caller guards).
    let load = |w: &mut String, p: &str, kt: &str, s: &str| {
        let _ = write!(
            w,
            r#"      %{p}k0 = arith.muli {kt}, %c64 : index
      %{p}a = memref.subview %As[{s}, 0, 0][1, {rows}, {BK}][1, 1, 1] : {a_sh} to memref<{rows}x{BK}x{ti}, strided<[{BK}, 1], offset: ?>, {ws}>
      nvgpu.mbarrier.arrive.expect_tx %bar[{s}], %cTX : {bar}
      nvgpu.tma.async.load %tmA[%{p}k0, %m0], %bar[{s}] to %{p}a : {tma}, {bar} -> memref<{rows}x{BK}x{ti}, strided<[{BK}, 1], offset: ?>, {ws}>
"#
        );
        // B: bn/64 boxes of 64×64 one after the other (what the wgmma descriptor of the
        // transposed, 128-byte-swizzled B operand expects).
        for h in 0..bn / 64 {
            let _ = write!(
                w,
                r#"      %{p}bo{h}0 = arith.muli {s}, %c{b_stage} : index
      %{p}bo{h}1 = arith.addi %{p}bo{h}0, %cAB : index
      %{p}bo{h}c = arith.constant {hoff} : index
      %{p}bo{h} = arith.addi %{p}bo{h}1, %{p}bo{h}c : index
      %{p}b{h} = memref.view %smem[%{p}bo{h}][] : memref<0xi8, {ws}> to memref<{BK}x64x{ti}, {ws}>
      %{p}n{h}c = arith.constant {noff} : index
      %{p}n{h} = arith.addi %n0, %{p}n{h}c : index
      nvgpu.tma.async.load %tmB[%{p}n{h}, %{p}k0], %bar[{s}] to %{p}b{h} : {tmb}, {bar} -> memref<{BK}x64x{ti}, {ws}>
"#,
                b_stage = BK * bn * 2,
                hoff = h * BK * 64 * 2,
                noff = h * 64,
            );
        }
    };
    let _ = writeln!(
        w,
        "    %c{} = arith.constant {} : index",
        BK * bn * 2,
        BK * bn * 2
    );
    for i in (0..st).filter(|_| !prod) {
        let _ = writeln!(
            w,
            "    %pk{i} = arith.constant {i} : index\n    %pin{i} = arith.cmpi ult, %pk{i}, %ktiles : index\n    %pgo{i} = arith.andi %is0, %pin{i} : i1\n    scf.if %pgo{i} {{"
        );
        load(
            &mut w,
            &format!("p{i}_"),
            &format!("%pk{i}"),
            &format!("%pk{i}"),
        );
        let _ = writeln!(w, "    }}");
    }
    let frag = format!("<fragmented = vector<{mr}x{bn}xf32>>");
    let a_half = format!("memref<{mr}x{BK}x{ti}, strided<[{BK}, 1], offset: ?>, {ws}>");
    let da_half = format!("!nvgpu.warpgroup.descriptor<tensor = memref<{mr}x{BK}x{ti}, 3>>");
    // Rows of A this thread's warpgroup multiplies: its slice of `halves · mr` rows of the
    // block tile (two 64-row halves for bn = 64).
    let arows: Vec<String> = if wgs == 1 && !prod {
        (0..halves).map(|h| (h * mr).to_string()).collect()
    } else {
        let _ = writeln!(
            w,
            "    %wg = arith.divui %tid, %c128 : index\n    %arow0 = arith.muli %wg, %c{} : index",
            halves * mr
        );
        if halves == 2 {
            w.push_str("    %arow1 = arith.addi %arow0, %c64 : index\n");
        }
        (0..halves).map(|h| format!("%arow{h}")).collect()
    };
    let arow = &arows[0];
    // the consumers' loop over k-tiles, its results named `res`
    let loop_head = |res: &str| {
        if halves == 1 {
            format!(
                "    %acc0 = nvgpu.warpgroup.mma.init.accumulator -> {frag}\n    {res} = scf.for %it = %c0 to %ktiles step %c1 iter_args(%mc = %acc0) -> ({acc}) {{\n"
            )
        } else {
            format!(
                "    %acc00 = nvgpu.warpgroup.mma.init.accumulator -> {frag}\n    %acc01 = nvgpu.warpgroup.mma.init.accumulator -> {frag}\n    {res}:2 = scf.for %it = %c0 to %ktiles step %c1 iter_args(%mc0 = %acc00, %mc1 = %acc01) -> ({acc}, {acc}) {{\n"
            )
        }
    };
    // The wgmma group(s) of one k-tile; the previous tile's groups are done after them.
    let mma = if halves == 1 {
        format!(
            r#"      %as = memref.subview %As[%st, {arow}, 0][1, {mr}, {BK}][1, 1, 1] : {a_sh} to memref<{mr}x{BK}x{ti}, strided<[{BK}, 1], offset: ?>, {ws}>
      %bs = memref.subview %Bs[%st, 0, 0][1, {BK}, {bn}][1, 1, 1] : {b_sh} to memref<{BK}x{bn}x{ti}, strided<[{bn}, 1], offset: ?>, {ws}>
      %dA = nvgpu.warpgroup.generate.descriptor %as, %tmA : memref<{mr}x{BK}x{ti}, strided<[{BK}, 1], offset: ?>, {ws}>, {tma} -> !nvgpu.warpgroup.descriptor<tensor = memref<{mr}x{BK}x{ti}, 3>>
      %dB = nvgpu.warpgroup.generate.descriptor %bs, %tmB : memref<{BK}x{bn}x{ti}, strided<[{bn}, 1], offset: ?>, {ws}>, {tmb} -> !nvgpu.warpgroup.descriptor<tensor = memref<{BK}x{bn}x{ti}, 3>>
      %md = nvgpu.warpgroup.mma %dA, %dB, %mc {{transposeB, waitGroup = 1 : i64}} : <tensor = memref<{mr}x{BK}x{ti}, 3>>, <tensor = memref<{BK}x{bn}x{ti}, 3>>, <fragmented = vector<{mr}x{bn}xf32>> -> <fragmented = vector<{mr}x{bn}xf32>>
"#
        )
    } else {
        let mut m = format!(
            r#"      %bs = memref.subview %Bs[%st, 0, 0][1, {BK}, {bn}][1, 1, 1] : {b_sh} to memref<{BK}x{bn}x{ti}, strided<[{bn}, 1], offset: ?>, {ws}>
      %dB = nvgpu.warpgroup.generate.descriptor %bs, %tmB : memref<{BK}x{bn}x{ti}, strided<[{bn}, 1], offset: ?>, {ws}>, {tmb} -> !nvgpu.warpgroup.descriptor<tensor = memref<{BK}x{bn}x{ti}, 3>>
"#
        );
        for h in 0..halves {
            // the second group waits until at most the two groups of this tile are
            // pending: the previous tile's are done
            let wait = if h + 1 == halves {
                format!(", waitGroup = {halves} : i64")
            } else {
                String::new()
            };
            let _ = write!(
                m,
                r#"      %as{h} = memref.subview %As[%st, {row}, 0][1, {mr}, {BK}][1, 1, 1] : {a_sh} to {a_half}
      %dA{h} = nvgpu.warpgroup.generate.descriptor %as{h}, %tmA : {a_half}, {tma} -> {da_half}
      %md{h} = nvgpu.warpgroup.mma %dA{h}, %dB, %mc{h} {{transposeB{wait}}} : <tensor = memref<{mr}x{BK}x{ti}, 3>>, <tensor = memref<{BK}x{bn}x{ti}, 3>>, {frag} -> {frag}
"#,
                row = arows[h as usize],
            );
        }
        m
    };
    let yielded = if halves == 1 {
        format!("%md : {acc}")
    } else {
        format!("%md0, %md1 : {acc}, {acc}")
    };
    let wait_full = format!(
        r#"      %st = arith.remui %it, %cST : index
      %ph0 = arith.divui %it, %cST : index
      %ph1 = arith.remui %ph0, %c2 : index
      %ph = arith.cmpi ne, %ph1, %c0 : index
      nvgpu.mbarrier.try_wait.parity %bar[%st], %ph, %ticks : {bar}
"#
    );
    if prod {
        // Warp specialization: the last warpgroup's first thread streams every k-tile into
        // the ring, waiting on the stage's "empty" barrier (round r of a stage waits for the
        // consumers' (r-1)-th release, parity (r+1) mod 2); the consumers wait on "full",
        // run their wgmmas and release the previous tile's stage once `wait_group 1` says its
        // wgmmas are done. No block barrier in the loop.
        let (res_ty, zeros, yz, yl) = if halves == 1 {
            (
                format!("({acc})"),
                format!("      %z0 = nvgpu.warpgroup.mma.init.accumulator -> {frag}\n"),
                format!("%z0 : {acc}"),
                format!("%lacc : {acc}"),
            )
        } else {
            (
                format!("({acc}, {acc})"),
                format!("      %z0 = nvgpu.warpgroup.mma.init.accumulator -> {frag}\n      %z1 = nvgpu.warpgroup.mma.init.accumulator -> {frag}\n"),
                format!("%z0, %z1 : {acc}, {acc}"),
                format!("%lacc#0, %lacc#1 : {acc}, {acc}"),
            )
        };
        let res = if halves == 1 { "%acc" } else { "%acc:2" };
        let _ = write!(
            w,
            r#"    %cWGS = arith.constant {wgs} : index
    %isprod = arith.cmpi eq, %wg, %cWGS : index
    %cPT = arith.constant {pt} : index
    %isp0 = arith.cmpi eq, %tid, %cPT : index
    {res} = scf.if %isprod -> {res_ty} {{
      scf.if %isp0 {{
      scf.for %pk = %c0 to %ktiles step %c1 {{
      %ps = arith.remui %pk, %cST : index
      %pr = arith.divui %pk, %cST : index
      %pfull = arith.cmpi uge, %pk, %cST : index
      scf.if %pfull {{
        %pr1 = arith.addi %pr, %c1 : index
        %pr2 = arith.remui %pr1, %c2 : index
        %pph = arith.cmpi ne, %pr2, %c0 : index
        nvgpu.mbarrier.try_wait.parity %ebar[%ps], %pph, %ticks : {bar}
      }}
"#,
            pt = 128 * wgs,
        );
        load(&mut w, "q_", "%pk", "%ps");
        let _ = write!(
            w,
            r#"      }}
      }}
{zeros}      scf.yield {yz}
    }} else {{
{head}{wait_full}{mma}      %started = arith.cmpi uge, %it, %c1 : index
      scf.if %started {{
        %pit = arith.subi %it, %c1 : index
        %pst = arith.remui %pit, %cST : index
        %etok = nvgpu.mbarrier.arrive %ebar[%pst] : {bar} -> !nvgpu.mbarrier.token
      }}
      scf.yield {yielded}
    }}
      scf.yield {yl}
    }}
"#,
            head = loop_head("%lacc"),
        );
    } else {
        w.push_str(&loop_head("%acc"));
        let _ = write!(
            w,
            r#"      %st = arith.remui %it, %cST : index
      %ph0 = arith.divui %it, %cST : index
      %ph1 = arith.remui %ph0, %c2 : index
      %ph = arith.cmpi ne, %ph1, %c0 : index
      nvgpu.mbarrier.try_wait.parity %bar[%st], %ph, %ticks : {bar}
{mma}      gpu.barrier
      %pit = arith.subi %it, %c1 : index
      %nk = arith.addi %pit, %cST : index
      %pst = arith.remui %pit, %cST : index
      %started = arith.cmpi uge, %it, %c1 : index
      %nin = arith.cmpi ult, %nk, %ktiles : index
      %ngo0 = arith.andi %is0, %nin : i1
      %ngo = arith.andi %ngo0, %started : i1
      scf.if %ngo {{
"#
        );
        load(&mut w, "l_", "%nk", "%pst");
        let _ = write!(
            w,
            r#"      }}
      scf.yield {yielded}
    }}
"#
        );
    }
    let store = if wgs > 1 || prod {
        // MLIR 22's `nvgpu.warpgroup.mma.store` takes the warp index as `tid / 32` (not
        // modulo 4), which puts a second warpgroup's rows 64 rows too low; the fragments are
        // stored here instead, with the wgmma register layout written out (see
        // `warpgroup_fragment_store`).
        let mut st = String::new();
        for h in 0..halves {
            let a = if halves == 1 {
                "%acc".to_string()
            } else {
                format!("%acc#{h}")
            };
            warpgroup_fragment_store(&mut st, &a, &format!("s{h}_"), mr, bn, h * mr, rows);
        }
        if prod {
            // the producer warpgroup holds no accumulators
            format!("    %iscons = arith.cmpi ult, %wg, %cWGS : index\n    scf.if %iscons {{\n{st}    }}\n")
        } else {
            st
        }
    } else if halves == 1 {
        format!("    nvgpu.warpgroup.mma.store %acc, %Cs : {frag} to memref<{mr}x{bn}xf32, {ws}>\n")
    } else {
        let mut st = String::new();
        for h in 0..halves {
            let _ = write!(
                st,
                "    %cH{h} = arith.constant {off} : index\n    %Cs{h} = memref.view %smem[%cH{h}][] : memref<0xi8, {ws}> to memref<{mr}x{bn}xf32, {ws}>\n    nvgpu.warpgroup.mma.store %acc#{h}, %Cs{h} : {frag} to memref<{mr}x{bn}xf32, {ws}>\n",
                off = h * mr * bn * 4,
            );
        }
        st
    };
    let _ = write!(
        w,
        r#"    nvvm.wgmma.wait.group.sync.aligned 0
    gpu.barrier
    %Cs = memref.view %smem[%c0][] : memref<0xi8, {ws}> to memref<{rows}x{bn}xf32, {ws}>
{store}    gpu.barrier
"#
    );
    // the vectorized epilogue reads the tile through a flat view of the same bytes
    if s.vector > 1 {
        let _ = writeln!(
            w,
            "    %Cf = memref.view %smem[%c0][] : memref<0xi8, {ws}> to memref<{}xf32, {ws}>",
            rows * bn
        );
    }
    let flat_ty = format!("memref<{}xf32, {ws}>", rows * bn);
    let tile = TileSource {
        flat: "%Cf",
        ty: &flat_ty,
        base: "%c0",
    };
    emit_epilogue(&mut w, &tile, s, output, epilogue);
    w.push_str("    gpu.return\n  }\n");
    Ok(WgmmaGemm {
        kernel: GpuKernel {
            name: name.into(),
            mlir: w,
            params,
            block: [s.threads(), 1, 1],
            shared_bytes: 0,
            requires: vec!["wgmma".into(), "tma".into()],
        },
        schedule: *s,
        input,
        output,
        epilogue: *epilogue,
        dynamic_shared: s.shared_bytes(),
    })
}

/// Stores the `mr × bn` warpgroup accumulator `acc` (`mr` a multiple of 64) of this
/// thread's warpgroup `%wg` into rows `128 · %wg + row0 ..` of the `rows × bn` f32 tile `%Cs`.
/// The accumulator is read as the LLVM struct it lowers to (one struct of `bn / 2` f32 per
/// m64 fragment) through an unrealized cast that the lowering folds away. wgmma's D layout:
/// in fragment `f`, register `r` of lane `l` of warp `w` (of the warpgroup) holds row
/// `64f + 16w + l/4 + 8·((r/2) mod 2)`, column `8·(r/4) + 2·(l mod 4) + r mod 2`; the pairs
/// `(2p, 2p+1)` are stored as one `vector<2xf32>`. Names take prefix `p`; needs `%tid`,
/// `%arow0` (= 128 · %wg) and `%Cs` in scope.
fn warpgroup_fragment_store(
    w: &mut String,
    acc: &str,
    p: &str,
    mr: u32,
    bn: u32,
    row0: u32,
    rows: u32,
) {
    let ws = "#gpu.address_space<workgroup>";
    let frags = mr / 64;
    let inner = format!("struct<({})>", vec!["f32"; (bn / 2) as usize].join(", "));
    let st_ty = format!("!llvm.struct<({})>", vec![inner; frags as usize].join(", "));
    let _ = write!(
        w,
        r#"    %{p}s = builtin.unrealized_conversion_cast {acc} : !nvgpu.warpgroup.accumulator<fragmented = vector<{mr}x{bn}xf32>> to {st_ty}
    %{p}c4 = arith.constant 4 : index
    %{p}c16 = arith.constant 16 : index
    %{p}c32 = arith.constant 32 : index
    %{p}t = arith.remui %tid, %c128 : index
    %{p}w = arith.divui %{p}t, %{p}c32 : index
    %{p}l = arith.remui %tid, %{p}c32 : index
    %{p}lq = arith.divui %{p}l, %{p}c4 : index
    %{p}lr = arith.remui %{p}l, %{p}c4 : index
    %{p}cb = arith.muli %{p}lr, %c2 : index
    %{p}w16 = arith.muli %{p}w, %{p}c16 : index
    %{p}rw = arith.addi %{p}w16, %{p}lq : index
    %{p}rb = arith.addi %{p}rw, %arow0 : index
"#
    );
    for f in 0..frags {
        for q in 0..bn / 4 {
            let (ro, co) = (row0 + 64 * f + 8 * (q % 2), 8 * (q / 2));
            let n = format!("{p}{f}_{q}");
            let _ = write!(
                w,
                r#"    %{n}a = llvm.extractvalue %{p}s[{f}, {i0}] : {st_ty}
    %{n}b = llvm.extractvalue %{p}s[{f}, {i1}] : {st_ty}
    %{n}v = vector.from_elements %{n}a, %{n}b : vector<2xf32>
    %{n}ro = arith.constant {ro} : index
    %{n}r = arith.addi %{p}rb, %{n}ro : index
    %{n}co = arith.constant {co} : index
    %{n}c = arith.addi %{p}cb, %{n}co : index
    vector.store %{n}v, %Cs[%{n}r, %{n}c] : memref<{rows}x{bn}xf32, {ws}>, vector<2xf32>
"#,
                i0 = 2 * q,
                i1 = 2 * q + 1,
            );
        }
    }
}

/// Defines `%m0`, `%n0`, the first row and column of the block's output tile, from
/// `%bx`, `%by` (and the grid size when `s.raster > 1`: bands of `raster` tile rows, walked
/// column by column). Needs `%c128` and `%cBN` in scope.
fn block_origin(s: &WgmmaSchedule) -> String {
    let rows = if s.rows() == 128 {
        String::new()
    } else {
        format!("    %cROWS = arith.constant {} : index\n", s.rows())
    };
    let crows = if s.rows() == 128 { "%c128" } else { "%cROWS" };
    if s.raster == 1 {
        return format!(
            "{rows}    %m0 = arith.muli %by, {crows} : index\n    %n0 = arith.muli %bx, %cBN : index\n"
        );
    }
    format!(
        r#"{rows}    %rgx = gpu.grid_dim x
    %rgy = gpu.grid_dim y
    %rp0 = arith.muli %by, %rgx : index
    %rpid = arith.addi %rp0, %bx : index
    %cRG = arith.constant {g} : index
    %rgs = arith.muli %cRG, %rgx : index
    %rband = arith.divui %rpid, %rgs : index
    %rfm = arith.muli %rband, %cRG : index
    %rleft = arith.subi %rgy, %rfm : index
    %rgm = arith.minui %rleft, %cRG : index
    %rin = arith.remui %rpid, %rgs : index
    %rim = arith.remui %rin, %rgm : index
    %rtm = arith.addi %rfm, %rim : index
    %rtn = arith.divui %rin, %rgm : index
    %m0 = arith.muli %rtm, {crows} : index
    %n0 = arith.muli %rtn, %cBN : index
"#,
        g = s.raster
    )
}

/// Where the epilogue reads the f32 accumulator tile of its block when it is vectorized: a
/// flat `f32` memref (`flat`, of type `ty`) and the index of the block's `rows × bn`
/// row-major tile in it (`base`). The element-wise epilogue reads the 2-D `%Cs` view.
struct TileSource<'a> {
    flat: &'a str,
    ty: &'a str,
    base: &'a str,
}

/// Emits the epilogue loop of [`gemm_wgmma`] with schedule `s`: each of the block's threads
/// takes `s.vector` consecutive columns of the block's tile per step, scales by `alpha`,
/// applies `epilogue` and stores to `C`. Needs in scope `%tid`, `%m0`, `%n0`, `%M`, `%N`, `%alpha`, `%C`,
/// `%c0`, `%c1`, `%cTILE`, `%cBN` (and `%bias`, `%R`, `%beta` as the epilogue uses them).
fn emit_epilogue(
    w: &mut String,
    tile: &TileSource,
    s: &WgmmaSchedule,
    output: MmaOutput,
    epilogue: &Epilogue,
) {
    let (bn, vw, rows) = (s.bn, s.vector, s.rows());
    let ws = "#gpu.address_space<workgroup>";
    let to = output.mlir();
    // The epilogue of one element: `v` (an f32 accumulator) at flat index `ix` of C and
    // column `col`; returns the value to store (of the output type). Names take prefix `p`.
    let elem = |w: &mut String, p: &str, v: &str, ix: &str, col: &str| -> String {
        let _ = writeln!(w, "      %{p}y0 = arith.mulf {v}, %alpha : f32");
        let mut y = format!("%{p}y0");
        if epilogue.bias {
            let _ = writeln!(
                w,
                "      %{p}bv = memref.load %bias[{col}] : memref<?xf32>\n      %{p}yb = arith.addf {y}, %{p}bv : f32"
            );
            y = format!("%{p}yb");
        }
        let res = |w: &mut String, y: &str, q: &str| -> String {
            let _ = writeln!(w, "      %{q}r = memref.load %R[{ix}] : memref<?x{to}>");
            let rf = if output == MmaOutput::F32 {
                format!("%{q}r")
            } else {
                let _ = writeln!(w, "      %{q}rf = arith.extf %{q}r : {to} to f32");
                format!("%{q}rf")
            };
            let _ = writeln!(
                w,
                "      %{q}br = arith.mulf {rf}, %beta : f32\n      %{q}y = arith.addf {y}, %{q}br : f32"
            );
            format!("%{q}y")
        };
        if epilogue.residual == Residual::BeforeActivation {
            y = res(w, &y, &format!("{p}rb"));
        }
        y = emit_activation(w, epilogue.activation, &y, &format!("{p}act"));
        if epilogue.residual == Residual::AfterActivation {
            y = res(w, &y, &format!("{p}ra"));
        }
        if output != MmaOutput::F32 {
            let _ = writeln!(w, "      %{p}yo = arith.truncf {y} : f32 to {to}");
            y = format!("%{p}yo");
        }
        y
    };
    // each thread takes `vw` consecutive columns of the tile per step
    let _ = write!(
        w,
        r#"    %cVW = arith.constant {vw} : index
    %cESTEP = arith.constant {estep} : index
    %e0 = arith.muli %tid, %cVW : index
    %nrem = arith.remui %N, %cVW : index
    %nvec = arith.cmpi eq, %nrem, %c0 : index
    scf.for %e = %e0 to %cTILE step %cESTEP {{
      %r = arith.divui %e, %cBN : index
      %c = arith.remui %e, %cBN : index
      %row = arith.addi %m0, %r : index
      %col = arith.addi %n0, %c : index
      %rok = arith.cmpi ult, %row, %M : index
      %rn = arith.muli %row, %N : index
      %ix = arith.addi %rn, %col : index
"#,
        estep = s.threads() * vw,
    );
    if vw == 1 {
        let _ = write!(
            w,
            r#"      %cok = arith.cmpi ult, %col, %N : index
      %ok = arith.andi %rok, %cok : i1
      scf.if %ok {{
      %v = memref.load %Cs[%r, %c] : memref<{rows}x{bn}xf32, {ws}>
"#
        );
        let y = elem(w, "", "%v", "%ix", "%col");
        let _ = writeln!(
            w,
            "      memref.store {y}, %C[%ix] : memref<?x{to}>\n      }}"
        );
    } else {
        // whole vectors where the row is in range, N is a multiple of vw (16-byte aligned
        // rows) and the vector fits; lane by lane elsewhere
        let vt = format!("vector<{vw}x{to}>");
        let _ = write!(
            w,
            r#"      %fi = arith.addi {base}, %e : index
      %cend = arith.addi %col, %cVW : index
      %cfit = arith.cmpi ule, %cend, %N : index
      %vok0 = arith.andi %rok, %cfit : i1
      %vok = arith.andi %vok0, %nvec : i1
      scf.if %vok {{
      %vv = vector.load {flat}[%fi] {{alignment = {sa} : i64}} : {fty}, vector<{vw}xf32>
"#,
            sa = (vw * 4).min(16),
            base = tile.base,
            flat = tile.flat,
            fty = tile.ty,
        );
        let mut lanes = Vec::new();
        for l in 0..vw {
            let _ = writeln!(
                w,
                "      %l{l}v = vector.extract %vv[{l}] : f32 from vector<{vw}xf32>\n      %l{l}c = arith.constant {l} : index\n      %l{l}col = arith.addi %col, %l{l}c : index\n      %l{l}ix = arith.addi %ix, %l{l}c : index"
            );
            lanes.push(elem(
                w,
                &format!("l{l}"),
                &format!("%l{l}v"),
                &format!("%l{l}ix"),
                &format!("%l{l}col"),
            ));
        }
        let _ = write!(
            w,
            r#"      %yv = vector.from_elements {lanes} : {vt}
      vector.store %yv, %C[%ix] {{alignment = {ga} : i64}} : memref<?x{to}>, {vt}
      }} else {{
      scf.for %q = %c0 to %cVW step %c1 {{
      %qcol = arith.addi %col, %q : index
      %qix = arith.addi %ix, %q : index
      %qfi = arith.addi %fi, %q : index
      %qcok = arith.cmpi ult, %qcol, %N : index
      %qok = arith.andi %rok, %qcok : i1
      scf.if %qok {{
      %qv = memref.load {flat}[%qfi] : {fty}
"#,
            lanes = lanes.join(", "),
            flat = tile.flat,
            fty = tile.ty,
            ga = u64::from(vw) * output.elem().bytes(),
        );
        let y = elem(w, "q", "%qv", "%qix", "%qcol");
        let _ = writeln!(
            w,
            "      memref.store {y}, %C[%qix] : memref<?x{to}>\n      }}\n      }}\n      }}"
        );
    }
    w.push_str("    }\n");
}

/// A kernel that runs only the vectorized epilogue of [`gemm_wgmma`] with schedule `s`
/// (`s.vector > 1`), so that it can be checked where no wgmma runs (the SIMT emulator of the
/// tests): each block of the GEMM's grid ([`WgmmaSchedule::grid`], `s.threads()` threads)
/// takes the output tile the GEMM's block would (rasterization included), reads that tile
/// `(tm, tn)`'s f32 accumulators, row-major `rows × bn`, from `T` at `(tm · gridDim.x + tn)
/// · rows · bn`, then scales, applies `epilogue` and stores to `C` with the very code of the
/// GEMM.
/// Parameters: `T: memref<?xf32>`, `C`, `bias` (if any), `R` (if a residual), `M`, `N`,
/// `alpha`, `beta` (if a residual).
pub fn epilogue_probe(
    name: &str,
    output: MmaOutput,
    epilogue: &Epilogue,
    s: &WgmmaSchedule,
) -> Result<GpuKernel, GpuError> {
    if s.vector == 1 {
        return Err(GpuError::Schedule(format!(
            "{name}: the probe runs the vectorized epilogue (vector > 1)"
        )));
    }
    check_shape(name, output, s)?;
    let to = output.mlir();
    let mut sig = format!("%T: memref<?xf32>, %C: memref<?x{to}>");
    if epilogue.bias {
        sig.push_str(", %bias: memref<?xf32>");
    }
    if epilogue.has_residual() {
        let _ = write!(sig, ", %R: memref<?x{to}>");
    }
    sig.push_str(", %M: index, %N: index, %alpha: f32");
    if epilogue.has_residual() {
        sig.push_str(", %beta: f32");
    }
    let bn = s.bn;
    let mut w = String::new();
    let _ = write!(
        w,
        r#"  gpu.func @{name}({sig}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>}} {{
    %c0 = arith.constant 0 : index
    %c1 = arith.constant 1 : index
    %c128 = arith.constant 128 : index
    %cBN = arith.constant {bn} : index
    %cTILE = arith.constant {tile} : index
    %cPR = arith.constant {rows} : index
    %tid = gpu.thread_id x
    %bx = gpu.block_id x
    %by = gpu.block_id y
    %gx = gpu.grid_dim x
{origin}    %tm = arith.divui %m0, %cPR : index
    %tn = arith.divui %n0, %cBN : index
    %tb0 = arith.muli %tm, %gx : index
    %tb1 = arith.addi %tb0, %tn : index
    %tb = arith.muli %tb1, %cTILE : index
"#,
        tile = s.rows() * bn,
        rows = s.rows(),
        threads = s.threads(),
        origin = block_origin(s),
    );
    let tile = TileSource {
        flat: "%T",
        ty: "memref<?xf32>",
        base: "%tb",
    };
    emit_epilogue(&mut w, &tile, s, output, epilogue);
    w.push_str("    gpu.return\n  }\n");
    Ok(GpuKernel {
        name: name.into(),
        mlir: w,
        params: Vec::new(),
        block: [s.threads(), 1, 1],
        shared_bytes: 0,
        requires: Vec::new(),
    })
}

/// The default sm_90 kernel: f16 → f32, no epilogue, [`WgmmaSchedule::default`].
pub fn default_kernel() -> Result<WgmmaGemm, GpuError> {
    gemm_wgmma(
        "kiln_gemm_wgmma_f16_f32",
        MmaInput::F16,
        MmaOutput::F32,
        &Epilogue::none(),
        &WgmmaSchedule::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::DeviceDb;

    #[test]
    fn large_problems_get_the_schedule_measured_fastest() {
        // On an H200 (132 SMs) the f16 4096³ kernel `bench_wgmma_f16_f16_bn256_s4_v8_w2_r8`
        // ran at 0.96× cuBLAS, the default 128×128 tile at 0.75× (docs/gpu.md, session 11).
        let big = WgmmaSchedule::for_problem(4096, 4096, MmaOutput::F16, 132);
        let measured = WgmmaSchedule {
            bn: 256,
            stages: 4,
            vector: 8,
            warpgroups: 2,
            raster: 8,
            producer: 0,
        };
        assert_eq!(big, measured);
        assert_eq!(
            (big.rows(), big.threads(), big.shared_bytes()),
            (128, 256, 196608)
        );
        // f32 output: 16-byte stores are 4 floats
        assert_eq!(
            WgmmaSchedule::for_problem(4096, 4096, MmaOutput::F32, 132).vector,
            4
        );
        // fewer 128×256 tiles than SMs, enough 128×128 ones: the 128×128 tile, vectorized
        for (m, n) in [(2048, 2048), (1024, 4096)] {
            let s = WgmmaSchedule::for_problem(m, n, MmaOutput::F32, 132);
            assert_eq!(
                s,
                WgmmaSchedule {
                    vector: 4,
                    ..WgmmaSchedule::default()
                },
                "{m}x{n}"
            );
        }
        // fewer 128×128 tiles than SMs: 128×64 tiles
        for (m, n) in [(128, 768), (128, 3072), (16, 64), (512, 768)] {
            let s = WgmmaSchedule::for_problem(m, n, MmaOutput::F16, 132);
            assert_eq!(
                s,
                WgmmaSchedule {
                    bn: 64,
                    vector: 8,
                    ..WgmmaSchedule::default()
                },
                "{m}x{n}"
            );
        }
    }

    #[test]
    fn schedules_and_geometry() {
        let db = DeviceDb::builtin().unwrap();
        let h100 = db.parse_target("cuda:h100").unwrap();
        let a100 = db.parse_target("cuda:a100").unwrap();
        let d = WgmmaSchedule::default();
        assert_eq!(d.stage_bytes(), 32768);
        assert_eq!(d.shared_bytes(), 131072);
        d.validate(h100).unwrap();
        assert!(d.validate(a100).unwrap_err().to_string().contains("wgmma"));
        let two = WgmmaSchedule {
            bn: 64,
            stages: 2,
            vector: 1,
            ..WgmmaSchedule::default()
        };
        // The accumulator tile (32 KiB) fits in the 2 stages (48 KiB).
        assert_eq!(two.shared_bytes(), 49152);
        for bad in [
            WgmmaSchedule { bn: 96, ..d },
            WgmmaSchedule { bn: 512, ..d },
            WgmmaSchedule { stages: 1, ..d },
            WgmmaSchedule { stages: 7, ..d },
        ] {
            assert!(bad.validate(h100).is_err(), "{bad:?}");
        }
        assert_eq!(d.grid(4096, 4096), [32, 32, 1]);
        assert_eq!(d.grid(129, 1), [1, 2, 1]);
        let g = default_kernel().unwrap();
        assert_eq!(g.kernel.block, [128, 1, 1]);
        assert_eq!(g.kernel.chip(h100), "sm_90a");
        let [a, b] = g.tensor_maps(100, 200, 72);
        assert_eq!(
            (a.dims, a.row_bytes, a.box_dims),
            ([72, 100], 144, [64, 128])
        );
        assert_eq!(
            (b.dims, b.row_bytes, b.box_dims),
            ([200, 72], 400, [64, 64])
        );
        assert!(g.supports(200, 72) && !g.supports(200, 70));
        assert!(gemm_wgmma("t", MmaInput::TF32, MmaOutput::F32, &Epilogue::none(), &d).is_err());
    }

    #[test]
    fn lowers_to_wgmma_and_tma_for_sm_90a() {
        let db = DeviceDb::builtin().unwrap();
        let h100 = db.parse_target("cuda:h100").unwrap();
        let g = default_kernel().unwrap();
        let ptx = crate::gpu::compile_kernel(&g.kernel, h100).unwrap();
        assert_eq!(ptx.arch, "sm_90a");
        assert!(ptx.text.contains(".target sm_90a"));
        for needle in [
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16",
            "cp.async.bulk.tensor.2d.shared::cluster.global",
            "mbarrier.try_wait.parity",
            "mbarrier.arrive.expect_tx",
        ] {
            assert!(ptx.text.contains(needle), "no {needle}");
        }
        let a100 = db.parse_target("cuda:a100").unwrap();
        assert!(crate::gpu::compile_kernel(&g.kernel, a100).is_err());
    }

    /// A vectorized epilogue stores 16 bytes per instruction where a whole vector fits
    /// (`st.global.v4.b32`: 8 halves or 4 floats), keeps a scalar
    /// path for the edges, reads shared memory as vectors, and rejects vectors over 16 bytes.
    #[test]
    fn vectorized_epilogue_stores_16_bytes() {
        let db = DeviceDb::builtin().unwrap();
        let h100 = db.parse_target("cuda:h100").unwrap();
        let ep = Epilogue {
            bias: true,
            ..Epilogue::none()
        };
        for (out, vector, needle) in [
            (MmaOutput::F16, 8, "st.global.v4.b32"),
            (MmaOutput::F32, 4, "st.global.v4.b32"),
        ] {
            let s = WgmmaSchedule {
                vector,
                ..WgmmaSchedule::default()
            };
            s.validate(h100).unwrap();
            let g = gemm_wgmma("t", MmaInput::F16, out, &ep, &s).unwrap();
            let ptx = crate::gpu::compile_kernel(&g.kernel, h100).unwrap();
            assert!(ptx.text.contains(needle), "{out:?}: no {needle}");
            assert!(
                ptx.text.contains("ld.shared.v4."),
                "{out:?}: no vector smem load"
            );
            // the edge path stores single elements
            let scalar = if out == MmaOutput::F16 {
                "st.global.b16"
            } else {
                "st.global.b32"
            };
            assert!(ptx.text.contains(scalar), "{out:?}: no {scalar}");
        }
        let wide = WgmmaSchedule {
            vector: 8,
            ..WgmmaSchedule::default()
        };
        let e = gemm_wgmma("t", MmaInput::F16, MmaOutput::F32, &Epilogue::none(), &wide);
        assert!(e.unwrap_err().to_string().contains("16 bytes"));
        let bad = WgmmaSchedule {
            vector: 2,
            ..WgmmaSchedule::default()
        };
        assert!(bad.validate(h100).is_err());
    }

    /// Two consumer warpgroups: a 256-row tile, 256 threads, one 256-row TMA box of A per
    /// stage (48 KiB stages), each warpgroup's wgmma on its own 128 rows; the raster
    /// renumbering keeps the grid. Both assemble for sm_90a, and the names say so.
    #[test]
    fn two_warpgroups_and_raster_bands() {
        let db = DeviceDb::builtin().unwrap();
        let h100 = db.parse_target("cuda:h100").unwrap();
        let s = WgmmaSchedule {
            warpgroups: 2,
            raster: 8,
            vector: 8,
            ..WgmmaSchedule::default()
        };
        s.validate(h100).unwrap();
        assert_eq!((s.rows(), s.threads(), s.stage_bytes()), (256, 256, 49152));
        assert_eq!(s.shared_bytes(), 196608);
        assert_eq!(s.grid(4096, 4096), [32, 16, 1]);
        assert_eq!(s.grid(257, 100), [1, 2, 1]);
        let six = WgmmaSchedule { stages: 6, ..s };
        assert!(six
            .validate(h100)
            .unwrap_err()
            .to_string()
            .contains("opt-in"));
        for bad in [
            WgmmaSchedule { warpgroups: 3, ..s },
            WgmmaSchedule { raster: 0, ..s },
            WgmmaSchedule { raster: 33, ..s },
        ] {
            assert!(bad.validate(h100).is_err(), "{bad:?}");
        }
        // bn = 256: 64 rows per warpgroup, a 128×256 tile, four 64-column B boxes
        let wide = WgmmaSchedule { bn: 256, ..s };
        wide.validate(h100).unwrap();
        assert_eq!((wide.rows(), wide.stage_bytes()), (128, 49152));
        assert_eq!(wide.grid(4096, 4096), [16, 32, 1]);
        for bn in [128, 64, 256] {
            let s = WgmmaSchedule { bn, ..s };
            let g = gemm_wgmma("t", MmaInput::F16, MmaOutput::F16, &Epilogue::none(), &s).unwrap();
            assert_eq!(g.kernel.block, [256, 1, 1]);
            assert_eq!(g.tensor_maps(1000, 512, 64)[0].box_dims, [64, s.rows()]);
            assert!(g.kernel.mlir.contains("%wg = arith.divui %tid, %c128"));
            assert!(g.kernel.mlir.contains("gpu.grid_dim y"));
            let ptx = crate::gpu::compile_kernel(&g.kernel, h100).unwrap();
            assert!(ptx.text.contains(".maxntid 256, 1, 1"), "bn {bn}");
            let mma = format!("wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.f16.f16");
            assert!(ptx.text.contains(&mma), "bn {bn}: no {mma}");
            // the fragments reach shared memory as float pairs: 2 fragments × bn/4 pairs
            // (bn = 128), 2 halves × 1 fragment × bn/4 (bn = 64) or 1 fragment × bn/4
            // (bn = 256), no nvgpu store
            let pairs = ptx.text.matches("st.shared.v2.f32").count()
                + ptx.text.matches("st.shared.v2.b32").count();
            let want = if bn == 256 { 64 } else { 2 * bn / 4 };
            assert_eq!(pairs as u32, want, "bn {bn}");
        }
        let name = crate::gpu::tuning::wgmma_name(MmaInput::F16, &s, &Epilogue::none());
        assert!(name.contains("_bn128_s4_v8_w2_r8_"), "{name}");
        let plain = crate::gpu::tuning::wgmma_name(
            MmaInput::F16,
            &WgmmaSchedule::default(),
            &Epilogue::none(),
        );
        assert!(plain.contains("_bn128_s4_plain"), "{plain}");
    }

    /// Warp specialization: one more warpgroup (the last) whose first thread streams the
    /// k-tiles, "empty" mbarriers the consumers arrive on, no block barrier between the
    /// prologue and the end of the main loop; every width and one or two consumers lower.
    #[test]
    fn producer_warpgroup_streams_the_tiles() {
        let db = DeviceDb::builtin().unwrap();
        let h100 = db.parse_target("cuda:h100").unwrap();
        for (bn, warpgroups) in [(128, 1), (128, 2), (64, 2), (256, 2)] {
            let s = WgmmaSchedule {
                bn,
                warpgroups,
                producer: 1,
                stages: 4,
                vector: 8,
                raster: 1,
            };
            s.validate(h100).unwrap();
            assert_eq!(s.threads(), 128 * (warpgroups + 1));
            let g = gemm_wgmma("t", MmaInput::F16, MmaOutput::F16, &Epilogue::none(), &s).unwrap();
            assert_eq!(g.kernel.block, [s.threads(), 1, 1]);
            let m = &g.kernel.mlir;
            assert!(m.contains("%ebar = nvgpu.mbarrier.create"));
            assert!(m.contains("nvgpu.mbarrier.arrive %ebar"));
            // the only block barriers: after the init, before and after the accumulator store
            assert_eq!(m.matches("gpu.barrier").count(), 3, "bn {bn} w{warpgroups}");
            let ptx = crate::gpu::compile_kernel(&g.kernel, h100).unwrap();
            let ntid = format!(".maxntid {}, 1, 1", s.threads());
            assert!(ptx.text.contains(&ntid), "bn {bn} w{warpgroups}: no {ntid}");
            assert!(ptx.text.contains("mbarrier.arrive"), "no release");
            let mma = format!("wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.f16.f16");
            assert!(ptx.text.contains(&mma), "bn {bn}: no {mma}");
        }
        let name = crate::gpu::tuning::wgmma_name(
            MmaInput::F16,
            &WgmmaSchedule {
                producer: 1,
                ..WgmmaSchedule::default()
            },
            &Epilogue::none(),
        );
        assert!(name.contains("_bn128_s4_p1_"), "{name}");
        let bad = WgmmaSchedule {
            producer: 2,
            ..WgmmaSchedule::default()
        };
        assert!(bad.validate(h100).is_err());
    }

    /// Why the two-warpgroup kernel stores its accumulators itself: MLIR 22 lowers
    /// `nvgpu.warpgroup.mma.store` with the warp index `tid / 32` taken whole (no `% 4`), so
    /// a second warpgroup's rows would come out 64 rows down. If a later MLIR takes the
    /// index modulo 4, this fails, and the nvgpu store could serve both kernels again.
    #[test]
    fn warpgroup_store_takes_the_whole_warp_index() {
        let ws = "#gpu.address_space<workgroup>";
        let text = format!(
            r#"module attributes {{gpu.container_module}} {{
gpu.module @k {{
  gpu.func @st(%out: memref<128x128xf32, {ws}>) kernel {{
    %acc = nvgpu.warpgroup.mma.init.accumulator -> <fragmented = vector<128x128xf32>>
    nvgpu.warpgroup.mma.store %acc, %out : <fragmented = vector<128x128xf32>> to memref<128x128xf32, {ws}>
    gpu.return
  }}
}}
}}"#
        );
        let out =
            crate::mlir::run_pipeline(&text, "builtin.module(convert-nvgpu-to-nvvm)").unwrap();
        let lines: Vec<&str> = out.lines().collect();
        let tid = lines
            .iter()
            .find_map(|l| l.trim().strip_suffix(" = nvvm.read.ptx.sreg.tid.x : i32"))
            .expect("a thread index");
        let warp = lines
            .iter()
            .find_map(|l| {
                let (lhs, rhs) = l.trim().split_once(" = ")?;
                rhs.starts_with(&format!("llvm.udiv {tid}, "))
                    .then_some(lhs)
            })
            .expect("tid / 32");
        let uses: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains(&format!("{warp} ")) || l.contains(&format!("{warp},")))
            .filter(|l| !l.trim().starts_with(&format!("{warp} =")))
            .collect();
        assert!(!uses.is_empty());
        for u in uses {
            assert!(u.contains("llvm.mul"), "the warp index is used as {u}");
        }
    }

    /// The accumulator reaches shared memory at the right rows for both widths: the
    /// row-`r` fragment registers of the second 64-row half are stored `64 · bn · 4` bytes
    /// after the first's (MLIR's `warpgroup.mma.store` alone puts a 128×64 accumulator's
    /// second half 32 rows down, over the first).
    #[test]
    fn accumulator_halves_are_stored_64_rows_apart() {
        let db = DeviceDb::builtin().unwrap();
        let h100 = db.parse_target("cuda:h100").unwrap();
        for bn in [64u32, 128] {
            let s = WgmmaSchedule {
                bn,
                stages: 3,
                vector: 1,
                ..WgmmaSchedule::default()
            };
            let g = gemm_wgmma("t", MmaInput::BF16, MmaOutput::F32, &Epilogue::none(), &s).unwrap();
            let ptx = crate::gpu::compile_kernel(&g.kernel, h100).unwrap();
            let offsets: Vec<u32> = ptx
                .text
                .lines()
                .filter(|l| l.contains("st.shared.v2.b32"))
                .map(|l| {
                    l.split_once('+')
                        .and_then(|(_, r)| r.split(']').next()?.parse().ok())
                        .unwrap_or(0)
                })
                .collect();
            // 2 halves × 2 row groups (+8 rows) × bn/8 column groups
            assert_eq!(offsets.len() as u32, 2 * 2 * bn / 8, "bn {bn}");
            let half = 64 * bn * 4;
            for o in &offsets {
                let (h, rest) = (o / half, o % half);
                assert!(h < 2, "bn {bn}: store at +{o}");
                // within a half: row offset 0 or 8, column groups of 8 floats
                assert!(rest < 16 * bn * 4 && rest % 32 == 0, "bn {bn}: +{o}");
            }
            assert!(
                offsets.iter().any(|&o| o >= half),
                "bn {bn}: no second half"
            );
        }
    }
}
