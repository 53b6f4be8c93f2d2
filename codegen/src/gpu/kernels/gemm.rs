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
        }
    }
}

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
        Ok(())
    }

    /// Grid `(x, y)` for an `m × n` output: `(ceil(n / bn), ceil(m / bm))`.
    pub fn grid(&self, m: u64, n: u64) -> [u32; 3] {
        let c = |a: u64, b: u32| u32::try_from(a.div_ceil(u64::from(b.max(1)))).unwrap_or(u32::MAX);
        [c(n, self.bn).max(1), c(m, self.bm).max(1), 1]
    }
}

/// `name(A, B, C: memref<?xf32>, M, N, K: index)`; launch with `s.threads()` threads per
/// block and grid [`GpuGemmSchedule::grid`].
pub fn gemm_f32(name: &str, s: &GpuGemmSchedule) -> Result<GpuKernel, GpuError> {
    s.validate()?;
    let GpuGemmSchedule { bm, bn, bk, tm, tn } = *s;
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
    let _ = writeln!(
        w,
        "  gpu.func @{name}(%A: memref<?xf32>, %B: memref<?xf32>, %C: memref<?xf32>, %M: index, %N: index, %K: index) workgroup(%As : {a_sh} {{llvm.align = 16 : i64}}, %Bs : {b_sh} {{llvm.align = 16 : i64}}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>}} {{"
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
    %acc:{tm} = scf.for %k0 = %c0 to %K step %cBK iter_args({iter0}) -> ({acc_types}) {{
      scf.for %e = %tid to %cAel step %cT {{
        %r = arith.divui %e, %cBK : index
        %c = arith.remui %e, %cBK : index
        %gr = arith.addi %m0, %r : index
        %gc = arith.addi %k0, %c : index
        %okr = arith.cmpi ult, %gr, %M : index
        %okc = arith.cmpi ult, %gc, %K : index
        %ok = arith.andi %okr, %okc : i1
        %v = scf.if %ok -> f32 {{
          %gi0 = arith.muli %gr, %K : index
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
          %gi0 = arith.muli %gr, %N : index
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
      %rb{i} = arith.muli %row{i}, %N : index
"#
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
        memref.store %v{i}_{j}, %C[%ix{i}_{j}] : memref<?xf32>
      }}
"#
            );
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "    gpu.return\n  }}");
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    Ok(GpuKernel {
        name: name.into(),
        mlir: b,
        params: vec![
            buf("A"),
            buf("B"),
            buf("C"),
            KernelParam::Index("M".into()),
            KernelParam::Index("N".into()),
            KernelParam::Index("K".into()),
        ],
        block: [threads, 1, 1],
        shared_bytes: s.shared_bytes(),
        requires: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_validated() {
        let d = GpuGemmSchedule::default();
        assert_eq!((d.threads(), d.shared_bytes()), (256, 8192));
        assert_eq!(d.grid(100, 130), [3, 2, 1]);
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
        ] {
            assert!(gemm_f32("g", &bad).is_err(), "{bad:?}");
        }
    }
}
