//! Last-axis reductions of a row-major `rows × n` matrix with warp shuffles: `ReduceSum`,
//! `ReduceMean`, `ReduceMax` (keepdims semantics: one value per row), and the row-group
//! machinery [`RowMode`] shared with [`norm`](super::norm).
//!
//! * [`RowMode::Warp`]: one warp per row (`rows_per_block` rows per block, block
//!   `(32, rows_per_block)`), lanes stride over the row, `gpu.shuffle xor` butterfly.
//! * [`RowMode::Block`]: one block per row (long rows), threads stride over the row; each
//!   warp reduces with shuffles, lane 0 writes its partial to shared memory, a barrier, and
//!   every thread sums the per-warp partials.

use super::emit::{dyn_memref, in_kernel, shared_memref, Emitter, WARP};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam};

/// How the threads of a block are assigned to rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowMode {
    /// One warp per row, this many rows per block.
    Warp {
        /// Rows (warps) per block.
        rows_per_block: u32,
    },
    /// One block of this many threads (a multiple of 32) per row.
    Block {
        /// Threads per block.
        threads: u32,
    },
}

impl RowMode {
    /// The default for rows of `n` elements: a warp per row up to 1024 elements (at most 32
    /// per lane), a block of 256 threads beyond.
    pub fn for_len(n: u64) -> Self {
        if n <= 1024 {
            RowMode::Warp { rows_per_block: 4 }
        } else {
            RowMode::Block { threads: 256 }
        }
    }

    /// Threads per block.
    pub fn block(&self) -> [u32; 3] {
        match *self {
            RowMode::Warp { rows_per_block } => [WARP, rows_per_block, 1],
            RowMode::Block { threads } => [threads, 1, 1],
        }
    }

    /// Grid for `rows` rows.
    pub fn grid(&self, rows: u64) -> [u32; 3] {
        let per = match *self {
            RowMode::Warp { rows_per_block } => u64::from(rows_per_block.max(1)),
            RowMode::Block { .. } => 1,
        };
        [
            u32::try_from(rows.div_ceil(per).max(1)).unwrap_or(u32::MAX),
            1,
            1,
        ]
    }

    /// Checks the thread counts.
    pub fn validate(&self) -> Result<(), GpuError> {
        let ok = match *self {
            RowMode::Warp { rows_per_block } => (1..=32).contains(&rows_per_block),
            RowMode::Block { threads } => {
                (WARP..=1024).contains(&threads) && threads.is_multiple_of(WARP)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(GpuError::Schedule(format!(
                "{self:?}: 1..=32 rows per block, or 32..=1024 threads (a multiple of 32)"
            )))
        }
    }

    fn warps(&self) -> u64 {
        match *self {
            RowMode::Warp { .. } => 1,
            RowMode::Block { threads } => u64::from(threads / WARP),
        }
    }

    /// Shared memory for `slots` block-wide reductions (0 in warp mode).
    pub fn shared_bytes(&self, slots: u64) -> u32 {
        match self {
            RowMode::Warp { .. } => 0,
            RowMode::Block { .. } => (4 * slots * self.warps()) as u32,
        }
    }

    /// The `workgroup(...)` attribution for `slots` reductions ("" in warp mode).
    pub(crate) fn workgroup(&self, slots: u64) -> String {
        match self {
            RowMode::Warp { .. } => String::new(),
            RowMode::Block { .. } => {
                format!(
                    " workgroup(%Red : {} {{llvm.align = 16 : i64}})",
                    shared_memref(slots * self.warps())
                )
            }
        }
    }

    /// Emits this thread's row (`%row`), the condition `row < %rows` and opens
    /// `scf.if` on it; returns `(row, first column, column stride)` of the thread's walk.
    pub(crate) fn open(&self, e: &mut Emitter) -> (String, String, String) {
        e.line("%tx = gpu.thread_id x");
        e.line("%bid = gpu.block_id x");
        let (row, step) = match *self {
            RowMode::Warp { rows_per_block } => {
                e.line("%ty = gpu.thread_id y");
                let r0 = e.ic("muli", "%bid", u64::from(rows_per_block));
                (e.ii("addi", &r0, "%ty"), e.idx(u64::from(WARP)))
            }
            RowMode::Block { threads } => ("%bid".to_string(), e.idx(u64::from(threads))),
        };
        let live = e.cmp("ult", &row, "%rows");
        e.line(&format!("scf.if {live} {{"));
        (row, "%tx".into(), step)
    }

    /// Reduces the f32 `v` over the row's threads with `arith.<op>` (`addf` or
    /// `maximumf`), using shared slot `slot` in block mode; every thread gets the result.
    pub(crate) fn reduce(&self, e: &mut Emitter, v: &str, op: &str, slot: u64) -> String {
        let r = e.warp_reduce(v, op);
        let RowMode::Block { .. } = *self else {
            return r;
        };
        let nw = self.warps();
        let warp = e.ic("divui", "%tx", u64::from(WARP));
        let lane = e.ic("remui", "%tx", u64::from(WARP));
        let first = e.cmpc("eq", &lane, 0);
        e.line(&format!("scf.if {first} {{"));
        let at = e.ic("addi", &warp, slot * nw);
        e.line(&format!("memref.store {r}, %Red[{at}] : {RED_TYPE}"));
        e.line("}");
        e.line("gpu.barrier");
        let mut acc: Option<String> = None;
        for w in 0..nw {
            let at = e.idx(slot * nw + w);
            let x = e.fresh("rw");
            e.line(&format!("{x} = memref.load %Red[{at}] : {RED_TYPE}"));
            acc = Some(match acc {
                None => x,
                Some(a) => e.ff(op, &a, &x),
            });
        }
        acc.unwrap_or(r)
    }
}

/// Placeholder for the type of the shared reduction buffer, fixed by [`fix_red_type`].
const RED_TYPE: &str = "__RED_TYPE__";

/// Replaces the shared reduction buffer's type placeholder once the slot count is known.
pub(crate) fn fix_red_type(mlir: String, mode: &RowMode, slots: u64) -> String {
    mlir.replace(RED_TYPE, &shared_memref(slots * mode.warps()))
}

/// A last-axis reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceKind {
    /// `ReduceSum`.
    Sum,
    /// `ReduceMean`.
    Mean,
    /// `ReduceMax`.
    Max,
}

/// The f32 value of the runtime `index` `%n` (emitted as `%nf`).
pub(crate) fn n_as_f32(e: &mut Emitter) -> String {
    e.line("%ni = arith.index_cast %n : index to i64");
    e.line("%nf = arith.uitofp %ni : i64 to f32");
    "%nf".into()
}

/// `name(X: memref<?xf32>, Y: memref<?xf32>, rows: index, n: index)`:
/// `Y[r] = reduce(X[r, 0..n])`; launch with `mode.grid(rows)` × `mode.block()`.
pub fn reduce_rows(name: &str, kind: ReduceKind, mode: RowMode) -> Result<GpuKernel, GpuError> {
    mode.validate().map_err(in_kernel(name))?;
    let ty = dyn_memref("f32");
    let (op, init) = match kind {
        ReduceKind::Sum | ReduceKind::Mean => ("addf", 0.0f32),
        ReduceKind::Max => ("maximumf", f32::NEG_INFINITY),
    };
    let mut e = Emitter::new();
    let (row, j0, js) = mode.open(&mut e);
    let base = e.ii("muli", &row, "%n");
    let init = e.f32c(init);
    e.line(&format!(
        "%part = scf.for %j = {j0} to %n step {js} iter_args(%acc = {init}) -> f32 {{"
    ));
    let i = e.ii("addi", &base, "%j");
    let x = e.load("%X", &i, &ty, "f32");
    let a = e.ff(op, "%acc", &x);
    e.line(&format!("scf.yield {a} : f32"));
    e.line("}");
    let mut r = mode.reduce(&mut e, "%part", op, 0);
    if kind == ReduceKind::Mean {
        let nf = n_as_f32(&mut e);
        r = e.ff("divf", &r, &nf);
    }
    let first = e.cmpc("eq", "%tx", 0);
    e.line(&format!("scf.if {first} {{"));
    e.store(&r, "%Y", &row, &ty, "f32");
    e.line("}");
    e.line("}");
    let [bx, by, bz] = mode.block();
    let header = format!(
        "gpu.func @{name}(%X: memref<?xf32>, %Y: memref<?xf32>, %rows: index, %n: index){} kernel attributes {{known_block_size = array<i32: {bx}, {by}, {bz}>}} {{",
        mode.workgroup(1)
    );
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    Ok(GpuKernel {
        name: name.into(),
        mlir: fix_red_type(e.finish(&header), &mode, 1),
        params: vec![
            buf("X"),
            buf("Y"),
            KernelParam::Index("rows".into()),
            KernelParam::Index("n".into()),
        ],
        block: mode.block(),
        shared_bytes: mode.shared_bytes(1),
        requires: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(RowMode::for_len(768), RowMode::Warp { rows_per_block: 4 });
        let b = RowMode::for_len(4096);
        assert_eq!(
            (b.block(), b.grid(10), b.shared_bytes(2)),
            ([256, 1, 1], [10, 1, 1], 64)
        );
        assert_eq!(RowMode::Warp { rows_per_block: 4 }.grid(10), [3, 1, 1]);
        assert!(RowMode::Block { threads: 100 }.validate().is_err());
        assert!(reduce_rows("r", ReduceKind::Sum, RowMode::Warp { rows_per_block: 0 }).is_err());
    }
}
