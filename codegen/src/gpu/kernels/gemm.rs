//! Tiled f32 GEMM `C[M,N] = A[M,K] · B[K,N]` (row-major, flat buffers) staged through shared
//! memory, with a parametric [`GpuGemmSchedule`] for the autotuner:
//!
//! ```text
//! block (bx, by) computes the bm×bn tile C[by*bm.., bx*bn..] with (bm/tm)·(bn/tn) threads
//! registers r ← this thread's elements of the tiles A[m0.., 0..] and B[0.., n0..]
//! for k0 in 0..K step bk
//!   store r into shared memory: A's bm×bk tile transposed (As[k][m], rows padded by 4
//!   floats), B's bk×bn tile as is (Bs[k][n]); zero-padded at the matrix edges
//!   gpu.barrier
//!   r ← the elements of the next tiles (k0 + bk): global loads in flight during the math
//!   for kk in 0..bk: each thread updates its tm×tn register tile
//!     (tm accumulators of vector<tn x f32>; a = As[kk][rows], b = Bs[kk][cols], vector.fma)
//!   gpu.barrier
//! masked store of the tm×tn tile
//! ```
//!
//! All of a thread's tile loads are issued before any of them is stored (see `TileLoads`):
//! the session-11 H200 profile had each 128×768×768 product at ~0.8 TFLOP/s, about 4 µs per
//! `bk` step, which is the latency of eight global loads one after another.
//!
//! With `split_k > 1` the grid has `split_k` blocks along z, each summing its own range of
//! whole `bk` tiles of `K`, and the tile is added into `C` with atomic adds (the caller
//! zeroes `C` first): a problem with few output tiles (BERT's projections at one sequence,
//! `M = 128`: 24 blocks of 64×64 on 132 SMs) then still fills the GPU.
//!
//! Every `M, N, K` is correct (edges are zero-padded on load and masked on store); all sizes
//! are runtime parameters, so one PTX serves every shape.

use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam};
use std::fmt::Write as _;

/// Tile sizes of [`gemm_f32`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuGemmSchedule {
    /// Rows of the block tile (C rows per block).
    pub bm: u32,
    /// Columns of the block tile.
    pub bn: u32,
    /// Depth of one shared-memory stage.
    pub bk: u32,
    /// Rows of the per-thread register tile.
    pub tm: u32,
    /// Columns of the per-thread register tile (the accumulator vector width).
    pub tn: u32,
    /// Blocks along z splitting `K` (partial tiles added atomically into a zeroed `C`).
    pub split_k: u32,
}

impl Default for GpuGemmSchedule {
    /// 64×64 block tile, bk = 16, 4×4 per thread: 256 threads, 8 KiB of shared memory.
    fn default() -> Self {
        Self {
            bm: 64,
            bn: 64,
            bk: 16,
            tm: 4,
            tn: 4,
            split_k: 1,
        }
    }
}

/// The K slices of the untuned f32 SIMT GEMM and conv: while `blocks` output tiles do not
/// fill `sms` multiprocessors, `K` split in two (up to 8 slices) as long as each slice keeps
/// at least 8 of the `k_steps` `bk` steps; 1 for no split.
pub fn split_k_for(blocks: u64, k_steps: u64, sms: u32) -> u32 {
    let mut split = 1u32;
    while split < 8
        && blocks * u64::from(split) < u64::from(sms)
        && k_steps >= 16 * u64::from(split)
    {
        split *= 2;
    }
    split
}

impl GpuGemmSchedule {
    /// Threads per block: `(bm / tm) · (bn / tn)`.
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm.max(1)) * (self.bn / self.tn.max(1))
    }

    /// Static shared memory in bytes: `4 · bk · (bm + 4 + bn)` (the A tile's rows are padded
    /// by 4 floats against bank conflicts on its transposing stores).
    pub fn shared_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + A_PAD + self.bn)
    }

    /// Checks that all sizes are positive, the thread tile divides the block tile and the
    /// block has at most 1024 threads.
    pub fn validate(&self) -> Result<(), GpuError> {
        let bad = |why: &str| Err(GpuError::Schedule(format!("{self:?}: {why}")));
        if [self.bm, self.bn, self.bk, self.tm, self.tn].contains(&0) {
            return bad("tile sizes must be positive");
        }
        if !self.bm.is_multiple_of(self.tm) || !self.bn.is_multiple_of(self.tn) {
            return bad("tm must divide bm and tn must divide bn");
        }
        if self.threads() > 1024 {
            return bad("more than 1024 threads per block");
        }
        if self.tm * self.tn > 128 {
            return bad("more than 128 accumulators per thread");
        }
        if !(1..=16).contains(&self.split_k) {
            return bad("split_k must be 1 to 16");
        }
        Ok(())
    }

    /// The untuned choice for an `m × n × k` product on a GPU with `sms` multiprocessors:
    /// the default tiles (16 rows of one per thread when `m ≤ 16`: a matrix-vector-like
    /// product would leave 48 of 64 rows empty), and when they give fewer blocks than SMs,
    /// `K` split (a power of two, up to 8) until the blocks fill the SMs, keeping at least 8
    /// `bk` tiles (128 of `K`) per split so each block still amortises its start and its
    /// atomic stores. Small products split too: a block's K steps run one after another,
    /// each at least a global load's latency (the session-11 H200 run of NasRNN spent about
    /// 66 µs in each 1×512×512 product, 32 steps of a 16-deep K on 8 blocks, against 3 to
    /// 5 µs for a launch), so a split shortens them by far more than its zeroing launch
    /// costs.
    pub fn for_problem(m: u64, n: u64, k: u64, sms: u32) -> Self {
        Self::for_batched(1, m, n, k, sms)
    }

    /// [`GpuGemmSchedule::for_problem`] for `batch` products of `m × n × k` in one launch.
    pub fn for_batched(batch: u64, m: u64, n: u64, k: u64, sms: u32) -> Self {
        let mut d = Self::default();
        if m <= 16 {
            (d.bm, d.tm) = (16, 1);
        }
        let [gx, gy, _] = d.grid(m, n);
        let blocks = u64::from(gx) * u64::from(gy) * batch.max(1);
        Self {
            split_k: split_k_for(blocks, k.div_ceil(u64::from(d.bk)), sms),
            ..d
        }
    }

    /// Grid for an `m × n` output: `(ceil(n / bn), ceil(m / bm), split_k)`.
    pub fn grid(&self, m: u64, n: u64) -> [u32; 3] {
        self.grid_batched(1, m, n)
    }

    /// Grid of [`gemm_f32_batched`] for `batch` products of `m × n`:
    /// `(ceil(n / bn), ceil(m / bm), batch · split_k)`.
    pub fn grid_batched(&self, batch: u64, m: u64, n: u64) -> [u32; 3] {
        let c = |a: u64, b: u32| u32::try_from(a.div_ceil(u64::from(b.max(1)))).unwrap_or(u32::MAX);
        let z = batch.max(1).saturating_mul(u64::from(self.split_k.max(1)));
        [
            c(n, self.bn).max(1),
            c(m, self.bm).max(1),
            u32::try_from(z).unwrap_or(u32::MAX),
        ]
    }
}

/// `name(A, B, C: memref<?xf32>, M, N, K: index)`; launch with `s.threads()` threads per
/// block and grid [`GpuGemmSchedule::grid`].
pub fn gemm_f32(name: &str, s: &GpuGemmSchedule) -> Result<GpuKernel, GpuError> {
    generate(name, s, false)
}

/// [`gemm_f32`] over a batch of matrices in one launch:
/// `name(A, B, C: memref<?xf32>, M, N, K, sA, sB, sC: index)`, matrix `b` of each operand at
/// element offset `b · s` (a stride of 0 broadcasts one matrix to every product); grid
/// [`GpuGemmSchedule::grid_batched`] (z = batch · split_k).
pub fn gemm_f32_batched(name: &str, s: &GpuGemmSchedule) -> Result<GpuKernel, GpuError> {
    generate(name, s, true)
}

fn generate(name: &str, s: &GpuGemmSchedule, batched: bool) -> Result<GpuKernel, GpuError> {
    s.validate()?;
    let GpuGemmSchedule {
        bm,
        bn,
        bk,
        tm,
        tn,
        split_k,
    } = *s;
    let threads = s.threads();
    let ws = "#gpu.address_space<workgroup>";
    let (a_sh, b_sh) = (
        format!("memref<{}xf32, {ws}>", bk * (bm + A_PAD)),
        format!("memref<{}xf32, {ws}>", bk * bn),
    );
    let vt = format!("vector<{tn}xf32>");
    let va = format!("vector<{tm}xf32>");
    let accs = |p: &str| {
        (0..tm)
            .map(|i| format!("%{p}{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let acc_types = vec![vt.clone(); tm as usize].join(", ");
    let tiles = TileLoads {
        threads,
        bm,
        bn,
        bk,
        batched,
    };
    let k_lo = if split_k > 1 { "%kbeg" } else { "%c0" };
    let iter_types = format!("{acc_types}{}", ", f32".repeat(tiles.len()));
    let mut b = String::new();
    let w = &mut b;
    let strides = if batched {
        ", %sA: index, %sB: index, %sC: index"
    } else {
        ""
    };
    let _ = writeln!(
        w,
        "  gpu.func @{name}(%A: memref<?xf32>, %B: memref<?xf32>, %C: memref<?xf32>, %M: index, %N: index, %K: index{strides}) workgroup(%As : {a_sh} {{llvm.align = 16 : i64}}, %Bs : {b_sh} {{llvm.align = 16 : i64}}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>}} {{"
    );
    let _ = write!(
        w,
        r#"    %c0 = arith.constant 0 : index
    %c1 = arith.constant 1 : index
    %cT = arith.constant {threads} : index
    %cBM = arith.constant {bm} : index
    %cBMP = arith.constant {bmp} : index
    %cBN = arith.constant {bn} : index
    %cBK = arith.constant {bk} : index
    %cTM = arith.constant {tm} : index
    %cTN = arith.constant {tn} : index
    %cTX = arith.constant {tx} : index
    %cAel = arith.constant {a_el} : index
    %cBel = arith.constant {b_el} : index
    %zero = arith.constant 0.0 : f32
    %zv = arith.constant dense<0.0> : {vt}
    %tid = gpu.thread_id x
    %bx = gpu.block_id x
    %by = gpu.block_id y
    %m0 = arith.muli %by, %cBM : index
    %n0 = arith.muli %bx, %cBN : index
    %tx = arith.remui %tid, %cTX : index
    %ty = arith.divui %tid, %cTX : index
    %rowT = arith.muli %ty, %cTM : index
    %colT = arith.muli %tx, %cTN : index
{k_range}{loads}    %acc:{n_iter} = scf.for %k0 = {k_lo} to {k_hi} step %cBK iter_args({iter0}) -> ({iter_types}) {{
{stores}      gpu.barrier
      %kn = arith.addi %k0, %cBK : index
{prefetch}      %inner:{tm} = scf.for %kk = %c0 to %cBK step %c1 iter_args({iter1}) -> ({acc_types}) {{
        %bo0 = arith.muli %kk, %cBN : index
        %bo = arith.addi %bo0, %colT : index
        %bv = vector.load %Bs[%bo] : {b_sh}, {vt}
        %ao0 = arith.muli %kk, %cBMP : index
        %ao = arith.addi %ao0, %rowT : index
        %av = vector.load %As[%ao] : {a_sh}, {va}
"#,
        tx = bn / tn,
        bmp = bm + A_PAD,
        a_el = bm * bk,
        b_el = bk * bn,
        k_range = z_prologue(bk, split_k, batched),
        k_hi = if split_k > 1 { "%kend" } else { "%K" },
        loads = tiles.setup() + &tiles.load("f", k_lo),
        n_iter = tm as usize + tiles.len(),
        stores = tiles.stores(),
        prefetch = tiles.load("n", "%kn"),
        iter0 = (0..tm)
            .map(|i| format!("%a{i} = %zv"))
            .chain(
                tiles
                    .names("f")
                    .iter()
                    .zip(tiles.names("p"))
                    .map(|(f, p)| format!("{p} = {f}"))
            )
            .collect::<Vec<_>>()
            .join(", "),
        iter1 = (0..tm)
            .map(|i| format!("%b{i} = %a{i}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    for i in 0..tm {
        let _ = writeln!(
            w,
            "        %ae{i} = vector.extract %av[{i}] : f32 from {va}"
        );
        let _ = writeln!(w, "        %ab{i} = vector.broadcast %ae{i} : f32 to {vt}");
        let _ = writeln!(w, "        %f{i} = vector.fma %ab{i}, %bv, %b{i} : {vt}");
    }
    let _ = writeln!(w, "        scf.yield {} : {acc_types}", accs("f"));
    let _ = writeln!(w, "      }}\n      gpu.barrier");
    let inner = (0..tm)
        .map(|i| format!("%inner#{i}"))
        .chain(tiles.names("n"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        w,
        "      scf.yield {inner} : {acc_types}{}\n    }}",
        ", f32".repeat(tiles.len())
    );
    for i in 0..tm {
        let _ = write!(
            w,
            r#"    %ci{i} = arith.constant {i} : index
    %row{i}0 = arith.addi %m0, %rowT : index
    %row{i} = arith.addi %row{i}0, %ci{i} : index
    %rok{i} = arith.cmpi ult, %row{i}, %M : index
    scf.if %rok{i} {{
      {c_row}
"#,
            c_row = row_start("%N", "%offC", batched)
                .replace("%gi0", &format!("%rb{i}"))
                .replace("%gr", &format!("%row{i}")),
        );
        for j in 0..tn {
            let _ = write!(
                w,
                r#"      %cj{i}_{j} = arith.constant {j} : index
      %col{i}_{j}0 = arith.addi %n0, %colT : index
      %col{i}_{j} = arith.addi %col{i}_{j}0, %cj{i}_{j} : index
      %cok{i}_{j} = arith.cmpi ult, %col{i}_{j}, %N : index
      scf.if %cok{i}_{j} {{
        %v{i}_{j} = vector.extract %acc#{i}[{j}] : f32 from {vt}
        %ix{i}_{j} = arith.addi %rb{i}, %col{i}_{j} : index
        {store}
      }}
"#,
                store = if split_k > 1 {
                    format!("memref.atomic_rmw addf %v{i}_{j}, %C[%ix{i}_{j}] : (f32, memref<?xf32>) -> f32")
                } else {
                    format!("memref.store %v{i}_{j}, %C[%ix{i}_{j}] : memref<?xf32>")
                }
            );
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "    gpu.return\n  }}");
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    let scalars: &[&str] = if batched {
        &["M", "N", "K", "sA", "sB", "sC"]
    } else {
        &["M", "N", "K"]
    };
    Ok(GpuKernel {
        name: name.into(),
        mlir: b,
        params: [buf("A"), buf("B"), buf("C")]
            .into_iter()
            .chain(scalars.iter().map(|n| KernelParam::Index((*n).into())))
            .collect(),
        block: [threads, 1, 1],
        shared_bytes: s.shared_bytes(),
        requires: vec![],
    })
}

/// Floats of padding after each `bm`-long row of the transposed A tile in shared memory:
/// the threads of a warp store a row of A (consecutive `k`) into consecutive rows of the
/// tile, 16 of them on one bank without padding; with 4 (which keeps every row 16-byte
/// aligned for the vector reads), two.
const A_PAD: u32 = 4;

/// The tile copies of one thread: element `e = tid + j · threads` of the A tile (`bm × bk`,
/// row `e / bk`, column `e % bk`) and of the B tile (`bk × bn`), for every `j` that has
/// such an element. The index arithmetic that does not depend on the K offset is done
/// once (`setup`); `load` reads a whole tile's elements into registers before anything
/// uses them, so their latencies overlap (one load and its dependent store per loop
/// iteration serialised them), and the main loop loads the next tile (`%kn`) before it
/// computes on the current one.
struct TileLoads {
    threads: u32,
    bm: u32,
    bn: u32,
    bk: u32,
    batched: bool,
}

impl TileLoads {
    fn a_elems(&self) -> u32 {
        self.bm * self.bk
    }
    fn b_elems(&self) -> u32 {
        self.bk * self.bn
    }
    /// Copies of A per thread, then of B.
    fn counts(&self) -> (u32, u32) {
        (
            self.a_elems().div_ceil(self.threads),
            self.b_elems().div_ceil(self.threads),
        )
    }
    /// Registers carried by the main loop: one per copy.
    fn len(&self) -> usize {
        let (na, nb) = self.counts();
        (na + nb) as usize
    }
    /// Whether copy `j` of a tile of `elems` elements may fall outside it.
    fn partial(&self, elems: u32, j: u32) -> bool {
        (j + 1) * self.threads > elems
    }
    /// The SSA names of one tile's registers, A copies first (`tag`: which load).
    fn names(&self, tag: &str) -> Vec<String> {
        let (na, nb) = self.counts();
        (0..na)
            .map(|j| format!("%ld{tag}a{j}"))
            .chain((0..nb).map(|j| format!("%ld{tag}b{j}")))
            .collect()
    }
    /// Index arithmetic independent of the K offset.
    fn setup(&self) -> String {
        let (na, nb) = self.counts();
        let mut t = String::new();
        for j in 0..na.max(nb) {
            let _ = writeln!(
                t,
                "    %ldoff{j} = arith.constant {} : index",
                j * self.threads
            );
        }
        for j in 0..na {
            let _ = write!(
                t,
                r#"    %ldea{j} = arith.addi %tid, %ldoff{j} : index
    %ldra{j} = arith.divui %ldea{j}, %cBK : index
    %ldca{j} = arith.remui %ldea{j}, %cBK : index
    %ldgra{j} = arith.addi %m0, %ldra{j} : index
    %ldoka{j}0 = arith.cmpi ult, %ldgra{j}, %M : index
    %ldrowa{j}0 = arith.muli %ldgra{j}, %K : index
    %ldsa{j}0 = arith.muli %ldca{j}, %cBMP : index
    %ldsa{j} = arith.addi %ldsa{j}0, %ldra{j} : index
"#
            );
            let _ = writeln!(
                t,
                "    %ldrowa{j} = arith.addi %ldrowa{j}0, {} : index",
                if self.batched { "%offA" } else { "%c0" }
            );
            t.push_str(&self.in_tile("a", j, self.a_elems(), "%cAel"));
        }
        for j in 0..nb {
            let _ = write!(
                t,
                r#"    %ldeb{j} = arith.addi %tid, %ldoff{j} : index
    %ldrb{j} = arith.divui %ldeb{j}, %cBN : index
    %ldcb{j} = arith.remui %ldeb{j}, %cBN : index
    %ldgcb{j} = arith.addi %n0, %ldcb{j} : index
    %ldokb{j}0 = arith.cmpi ult, %ldgcb{j}, %N : index
"#
            );
            let _ = writeln!(
                t,
                "    %ldcolb{j} = arith.addi %ldgcb{j}, {} : index",
                if self.batched { "%offB" } else { "%c0" }
            );
            t.push_str(&self.in_tile("b", j, self.b_elems(), "%cBel"));
        }
        t
    }
    /// `%ldok{x}{j}`: the copy's row (A) or column (B) is inside the matrix and, for a copy
    /// that may fall past the tile's end, the element is inside the tile (`%ldin{x}{j}`).
    fn in_tile(&self, x: &str, j: u32, elems: u32, c_el: &str) -> String {
        if self.partial(elems, j) {
            format!(
                "    %ldin{x}{j} = arith.cmpi ult, %lde{x}{j}, {c_el} : index\n    %ldok{x}{j} = arith.andi %ldok{x}{j}0, %ldin{x}{j} : i1\n"
            )
        } else {
            format!("    %ldok{x}{j} = arith.andi %ldok{x}{j}0, %ldok{x}{j}0 : i1\n")
        }
    }
    /// Reads the tiles at K offset `k` into the registers `names(tag)` (zero outside the
    /// matrices).
    fn load(&self, tag: &str, k: &str) -> String {
        let (na, nb) = self.counts();
        let mut t = String::new();
        for j in 0..na {
            let _ = write!(
                t,
                r#"    %ld{tag}gca{j} = arith.addi {k}, %ldca{j} : index
    %ld{tag}kka{j} = arith.cmpi ult, %ld{tag}gca{j}, %K : index
    %ld{tag}oka{j} = arith.andi %ldoka{j}, %ld{tag}kka{j} : i1
    %ld{tag}a{j} = scf.if %ld{tag}oka{j} -> f32 {{
      %ld{tag}ia{j} = arith.addi %ldrowa{j}, %ld{tag}gca{j} : index
      %ld{tag}va{j} = memref.load %A[%ld{tag}ia{j}] : memref<?xf32>
      scf.yield %ld{tag}va{j} : f32
    }} else {{
      scf.yield %zero : f32
    }}
"#
            );
        }
        for j in 0..nb {
            let _ = write!(
                t,
                r#"    %ld{tag}grb{j} = arith.addi {k}, %ldrb{j} : index
    %ld{tag}kkb{j} = arith.cmpi ult, %ld{tag}grb{j}, %K : index
    %ld{tag}okb{j} = arith.andi %ldokb{j}, %ld{tag}kkb{j} : i1
    %ld{tag}b{j} = scf.if %ld{tag}okb{j} -> f32 {{
      %ld{tag}ib0{j} = arith.muli %ld{tag}grb{j}, %N : index
      %ld{tag}ib{j} = arith.addi %ld{tag}ib0{j}, %ldcolb{j} : index
      %ld{tag}vb{j} = memref.load %B[%ld{tag}ib{j}] : memref<?xf32>
      scf.yield %ld{tag}vb{j} : f32
    }} else {{
      scf.yield %zero : f32
    }}
"#
            );
        }
        t
    }
    /// Stores the loop's registers (`names("p")`) into the shared tiles.
    fn stores(&self) -> String {
        let (na, nb) = self.counts();
        let ws = "#gpu.address_space<workgroup>";
        let (a_sh, b_sh) = (
            format!("memref<{}xf32, {ws}>", self.bk * (self.bm + A_PAD)),
            format!("memref<{}xf32, {ws}>", self.b_elems()),
        );
        let mut t = String::new();
        let mut put = |x: &str, j: u32, partial: bool, store: String| {
            if partial {
                let _ = writeln!(t, "      scf.if %ldin{x}{j} {{\n  {store}\n      }}");
            } else {
                let _ = writeln!(t, "{store}");
            }
        };
        for j in 0..na {
            put(
                "a",
                j,
                self.partial(self.a_elems(), j),
                format!("      memref.store %ldpa{j}, %As[%ldsa{j}] : {a_sh}"),
            );
        }
        for j in 0..nb {
            put(
                "b",
                j,
                self.partial(self.b_elems(), j),
                format!("      memref.store %ldpb{j}, %Bs[%ldeb{j}] : {b_sh}"),
            );
        }
        t
    }
}

/// The row start `%gi0 = row · ld` of an operand (`ld`: its row length), plus the matrix's
/// offset `off` when `batched`.
fn row_start(ld: &str, off: &str, batched: bool) -> String {
    if batched {
        format!(
            "%gi00 = arith.muli %gr, {ld} : index\n          %gi0 = arith.addi %gi00, {off} : index"
        )
    } else {
        format!("%gi0 = arith.muli %gr, {ld} : index")
    }
}

/// What `gpu.block_id z` selects: the matrix (`batched`: offsets `%offA/B/C`) and the K
/// slice of `split_k` (`[%kbeg, %kend)`: whole `bk` tiles, `ceil(ceil(K / bk) / split_k)`
/// of them per slice). Empty for one matrix, one slice.
fn z_prologue(bk: u32, split_k: u32, batched: bool) -> String {
    if !batched && split_k == 1 {
        return String::new();
    }
    let mut t = format!("    %bz = gpu.block_id z\n    %cS = arith.constant {split_k} : index\n");
    let slice = if batched {
        t.push_str(
            "    %bat = arith.divui %bz, %cS : index
    %slice = arith.remui %bz, %cS : index
    %offA = arith.muli %bat, %sA : index
    %offB = arith.muli %bat, %sB : index
    %offC = arith.muli %bat, %sC : index
",
        );
        "%slice"
    } else {
        "%bz"
    };
    if split_k > 1 {
        let _ = write!(
            t,
            r#"    %cBKm1 = arith.constant {bkm1} : index
    %cSm1 = arith.constant {sm1} : index
    %kt0 = arith.addi %K, %cBKm1 : index
    %kt = arith.divui %kt0, %cBK : index
    %per0 = arith.addi %kt, %cSm1 : index
    %per = arith.divui %per0, %cS : index
    %span = arith.muli %per, %cBK : index
    %kbeg = arith.muli {slice}, %span : index
    %kend0 = arith.addi %kbeg, %span : index
    %kend = arith.minui %kend0, %K : index
"#,
            bkm1 = bk - 1,
            sm1 = split_k - 1,
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_validated() {
        let d = GpuGemmSchedule::default();
        assert_eq!((d.threads(), d.shared_bytes()), (256, 8448));
        assert_eq!(d.grid(100, 130), [3, 2, 1]);
        assert_eq!(
            GpuGemmSchedule { split_k: 4, ..d }.grid(100, 130),
            [3, 2, 4]
        );
        for bad in [
            GpuGemmSchedule { bk: 0, ..d },
            GpuGemmSchedule { tm: 3, ..d },
            GpuGemmSchedule {
                bm: 256,
                bn: 256,
                tm: 2,
                tn: 2,
                ..d
            },
            GpuGemmSchedule { split_k: 0, ..d },
            GpuGemmSchedule { split_k: 17, ..d },
        ] {
            assert!(gemm_f32("g", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn small_problems_split_k_to_fill_the_sms() {
        // BERT-base at sequence 128 on an H100 (132 SMs): 24 blocks of 64×64.
        let s = |m, n, k| GpuGemmSchedule::for_problem(m, n, k, 132).split_k;
        assert_eq!(s(128, 768, 768), 4); // 96 blocks, 12 tiles of K each (8 at least)
        assert_eq!(s(128, 768, 3072), 8); // 192 blocks
        assert_eq!(s(128, 3072, 768), 2); // 96 blocks -> 192
        assert_eq!(s(4096, 4096, 4096), 1); // enough tiles already
        assert_eq!(s(128, 768, 64), 1); // too little K to split
                                        // NasRNN's steps: 8 blocks of 16 rows, 32 steps of K -> 4 slices of 8
        assert_eq!(s(1, 512, 512), 4);
        // One row (VGG's classifier): 16-row tiles, 64 blocks, K split 4 ways.
        let v = GpuGemmSchedule::for_problem(1, 4096, 25088, 132);
        assert_eq!((v.bm, v.tm, v.split_k, v.threads()), (16, 1, 4, 256));
        assert!(v.validate().is_ok());
        let k = gemm_f32("g", &GpuGemmSchedule::for_problem(128, 768, 768, 132)).unwrap();
        assert!(k.mlir.contains("memref.atomic_rmw addf"), "{}", k.mlir);
        assert!(k.mlir.contains("gpu.block_id z"));
        let d = gemm_f32("g", &GpuGemmSchedule::default()).unwrap();
        assert!(!d.mlir.contains("atomic_rmw") && !d.mlir.contains("block_id z"));
    }
}
