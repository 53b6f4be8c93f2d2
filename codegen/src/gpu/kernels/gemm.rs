//! Tiled f32 GEMM `C[M,N] = A[M,K] · B[K,N]` (row-major, flat buffers) staged through shared
//! memory, with a parametric [`GpuGemmSchedule`] for the autotuner:
//!
//! ```text
//! block (bx, by) computes the bm×bn tile C[by*bm.., bx*bn..] with (bm/tm)·(bn/tn) threads
//! for k0 in 0..K step bk
//!   all threads copy A[m0.., k0..] (bm×bk, stored transposed: As[k][m]) and
//!   B[k0.., n0..] (bk×bn: Bs[k][n]) into shared memory, zero-padded at the edges
//!   gpu.barrier
//!   for kk in 0..bk: each thread updates its tm×tn register tile
//!     (tm accumulators of vector<tn x f32>; a = As[kk][rows], b = Bs[kk][cols], vector.fma)
//!   gpu.barrier
//! masked store of the tm×tn tile
//! ```
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

/// The FLOPs from which [`GpuGemmSchedule::for_problem`] may split K.
pub const SPLIT_MIN_FLOPS: u64 = 1 << 25;

impl GpuGemmSchedule {
    /// Threads per block: `(bm / tm) · (bn / tn)`.
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm.max(1)) * (self.bn / self.tn.max(1))
    }

    /// Static shared memory in bytes: `4 · bk · (bm + bn)`.
    pub fn shared_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + self.bn)
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
    /// atomic stores. Products under 2²⁵ FLOPs (NasRNN's 1×512×512) are not split: they
    /// are bound by their launch, which the split's zeroing launch would double.
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
        let ktiles = k.div_ceil(u64::from(d.bk));
        let mut split = 1u32;
        let big = 2 * batch.max(1) * m * n * k >= SPLIT_MIN_FLOPS;
        while big
            && split < 8
            && blocks * u64::from(split) < u64::from(sms)
            && ktiles >= 16 * u64::from(split)
        {
            split *= 2;
        }
        Self {
            split_k: split,
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
        format!("memref<{}xf32, {ws}>", bk * bm),
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
{k_range}    %acc:{tm} = scf.for %k0 = {k_lo} to {k_hi} step %cBK iter_args({iter0}) -> ({acc_types}) {{
      scf.for %e = %tid to %cAel step %cT {{
        %r = arith.divui %e, %cBK : index
        %c = arith.remui %e, %cBK : index
        %gr = arith.addi %m0, %r : index
        %gc = arith.addi %k0, %c : index
        %okr = arith.cmpi ult, %gr, %M : index
        %okc = arith.cmpi ult, %gc, %K : index
        %ok = arith.andi %okr, %okc : i1
        %v = scf.if %ok -> f32 {{
          {a_row}
          %gi = arith.addi %gi0, %gc : index
          %l = memref.load %A[%gi] : memref<?xf32>
          scf.yield %l : f32
        }} else {{
          scf.yield %zero : f32
        }}
        %si0 = arith.muli %c, %cBM : index
        %si = arith.addi %si0, %r : index
        memref.store %v, %As[%si] : {a_sh}
      }}
      scf.for %e = %tid to %cBel step %cT {{
        %r = arith.divui %e, %cBN : index
        %c = arith.remui %e, %cBN : index
        %gr = arith.addi %k0, %r : index
        %gc = arith.addi %n0, %c : index
        %okr = arith.cmpi ult, %gr, %K : index
        %okc = arith.cmpi ult, %gc, %N : index
        %ok = arith.andi %okr, %okc : i1
        %v = scf.if %ok -> f32 {{
          {b_row}
          %gi = arith.addi %gi0, %gc : index
          %l = memref.load %B[%gi] : memref<?xf32>
          scf.yield %l : f32
        }} else {{
          scf.yield %zero : f32
        }}
        memref.store %v, %Bs[%e] : {b_sh}
      }}
      gpu.barrier
      %inner:{tm} = scf.for %kk = %c0 to %cBK step %c1 iter_args({iter1}) -> ({acc_types}) {{
        %bo0 = arith.muli %kk, %cBN : index
        %bo = arith.addi %bo0, %colT : index
        %bv = vector.load %Bs[%bo] : {b_sh}, {vt}
        %ao0 = arith.muli %kk, %cBM : index
        %ao = arith.addi %ao0, %rowT : index
        %av = vector.load %As[%ao] : {a_sh}, {va}
"#,
        tx = bn / tn,
        k_range = z_prologue(bk, split_k, batched),
        a_row = row_start("%K", "%offA", batched),
        b_row = row_start("%N", "%offB", batched),
        k_lo = if split_k > 1 { "%kbeg" } else { "%c0" },
        k_hi = if split_k > 1 { "%kend" } else { "%K" },
        a_el = bm * bk,
        b_el = bk * bn,
        iter0 = (0..tm)
            .map(|i| format!("%a{i} = %zv"))
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
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(w, "      scf.yield {inner} : {acc_types}\n    }}");
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
        assert_eq!((d.threads(), d.shared_bytes()), (256, 8192));
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
        assert_eq!(s(1, 512, 512), 1); // launch-bound: no zeroing launch added
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
