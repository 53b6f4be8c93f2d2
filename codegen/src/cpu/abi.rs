//! The uniform kernel ABI and the MLIR prologue that implements it.
//!
//! Every CPU kernel Kiln emits is a C function
//!
//! ```c
//! void kernel_name(void *const *args, const int64_t *dims, void *scratch);
//! ```
//!
//! * `args[i]` is the base address of the i-th tensor buffer: inputs first, then outputs, in
//!   the order the kernel's [`KernelSignature`](super::KernelSignature) lists them. Buffers are
//!   dense, row-major (C order) and need no particular alignment beyond 4 bytes for `f32`.
//! * `dims[0]`, `dims[1]` are the task range `[begin, end)`: a kernel that splits into
//!   [`KernelSignature::tasks`](super::KernelSignature::tasks) `= T` independent work items
//!   processes items `begin..end` (clamped to `0..T`), so the runtime can run disjoint ranges
//!   on several threads at once; `[0, i64::MAX]` runs everything. Serial kernels (`T = 1`)
//!   ignore it.
//! * `dims[2 + j]` is the runtime value of the kernel's j-th symbolic dimension (see
//!   [`KernelSignature::dims`](super::KernelSignature::dims)), so one compiled kernel serves
//!   every size of a dynamic shape.
//! * `scratch` points to [`KernelSignature::scratch_bytes`](super::KernelSignature::scratch_bytes)
//!   bytes, 64-byte aligned, owned by the caller and private to this call (one buffer per
//!   thread: calls running at the same time get different ones). Its contents are garbage on
//!   entry. Kernels take their temporary buffers (packed panels, padded copies) from it
//!   ([`Scratch`]) instead of allocating, so a call allocates nothing.
//!
//! Inside MLIR the function is
//! `func.func @name(%args: !llvm.ptr, %dims: !llvm.ptr, %scratch: !llvm.ptr)`; its
//! prologue (built here) loads the pointers and dims and assembles ordinary dynamic memref
//! descriptors (`memref<?x?xf32>`) with `llvm.insertvalue` +
//! `builtin.unrealized_conversion_cast`, which `reconcile-unrealized-casts` removes after
//! lowering. The kernel body then works on memrefs like any MLIR code.

use std::fmt::Write as _;

/// Number of leading `dims` entries that hold the task range (`dims[0..2]`); symbolic dim
/// `j` is `dims[TASK_DIMS + j]`.
pub const TASK_DIMS: usize = 2;

/// The size of one memref dimension in a kernel prologue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// A compile-time constant.
    Const(i64),
    /// The runtime value `dims[i]`.
    Sym(usize),
}

/// Builds the body of an ABI-conforming `func.func`: a prologue turning `(args, dims)` into
/// memrefs, then arbitrary MLIR lines.
#[derive(Debug, Default)]
pub struct Prologue {
    text: String,
    next: usize,
    loaded_dims: Vec<Option<String>>,
    scratch: Scratch,
}

impl Prologue {
    /// A new, empty prologue.
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh(&mut self, stem: &str) -> String {
        self.next += 1;
        format!("%{stem}{}", self.next)
    }

    /// The `i64` SSA value of symbolic dim `i` (`dims[TASK_DIMS + i]`), loading it once.
    pub fn dim_i64(&mut self, i: usize) -> String {
        self.raw_dim_i64(TASK_DIMS + i)
    }

    /// The task range `[begin, end)` of this call as `index` SSA values, clamped to
    /// `0..tasks` (`tasks`: an `index` SSA value or constant literal defined before the
    /// prologue's end, e.g. from [`Prologue::const_index`]).
    pub fn task_range(&mut self, tasks: &str) -> (String, String) {
        let b = self.raw_dim_i64(0);
        let e = self.raw_dim_i64(1);
        let (bi, ei) = (self.fresh("tb"), self.fresh("te"));
        let zero = self.const_index(0);
        let (b1, e1, b2) = (self.fresh("tb"), self.fresh("te"), self.fresh("tb"));
        let _ = writeln!(
            self.text,
            "  {bi} = arith.index_cast {b} : i64 to index\n  {ei} = arith.index_cast {e} : i64 to index\n  {b1} = arith.maxsi {bi}, {zero} : index\n  {e1} = arith.minsi {ei}, {tasks} : index\n  {b2} = arith.minsi {b1}, {e1} : index"
        );
        (b2, e1)
    }

    /// An `index` constant.
    pub fn const_index(&mut self, c: i64) -> String {
        let v = self.fresh("ci");
        let _ = writeln!(self.text, "  {v} = arith.constant {c} : index");
        v
    }

    /// The `i64` SSA value of `dims[i]` (raw position), loading it once.
    fn raw_dim_i64(&mut self, i: usize) -> String {
        if self.loaded_dims.len() <= i {
            self.loaded_dims.resize(i + 1, None);
        }
        if let Some(v) = &self.loaded_dims[i] {
            return v.clone();
        }
        let g = self.fresh("dg");
        let v = self.fresh("d");
        let _ = writeln!(
            self.text,
            "  {g} = llvm.getelementptr %dims[{i}] : (!llvm.ptr) -> !llvm.ptr, i64\n  {v} = llvm.load {g} : !llvm.ptr -> i64"
        );
        self.loaded_dims[i] = Some(v.clone());
        v
    }

    /// The `index` SSA value of `dims[i]`.
    pub fn dim_index(&mut self, i: usize) -> String {
        let v = self.dim_i64(i);
        let x = self.fresh("di");
        let _ = writeln!(self.text, "  {x} = arith.index_cast {v} : i64 to index");
        x
    }

    fn dim_value(&mut self, d: Dim) -> String {
        match d {
            Dim::Sym(i) => self.dim_i64(i),
            Dim::Const(c) => {
                let v = self.fresh("k");
                let _ = writeln!(self.text, "  {v} = llvm.mlir.constant({c} : i64) : i64");
                v
            }
        }
    }

    /// Declares `args[arg]` as a dense row-major `f32` memref of the given shape and returns
    /// the SSA name of the memref (type [`memref_type`] of `shape.len()`).
    pub fn memref_f32(&mut self, arg: usize, shape: &[Dim]) -> String {
        self.memref(arg, shape, "f32")
    }

    /// Declares `args[arg]` as a dense row-major memref of element type `elem` (an MLIR type
    /// such as `f32`, `i64`, `i8`) and returns the SSA name of the memref (type
    /// [`memref_type_of`]`(shape.len(), elem)`).
    pub fn memref(&mut self, arg: usize, shape: &[Dim], elem: &str) -> String {
        self.memref_impl(arg, shape, elem, None)
    }

    /// Declares rows `[begin, begin + count)` (along axis 0) of `args[arg]`, a dense
    /// row-major buffer of shape `shape` and element type `elem`, as a memref of shape
    /// `[count, shape[1..]]` (`begin`, `count`: `index` SSA values). Used by kernels that
    /// split their work into row ranges ([`Prologue::task_range`]).
    pub fn memref_rows(
        &mut self,
        arg: usize,
        shape: &[Dim],
        elem: &str,
        begin: &str,
        count: &str,
    ) -> String {
        self.memref_impl(arg, shape, elem, Some((begin, count, 0)))
    }

    /// Declares indices `[begin, begin + count)` along `axis` of `args[arg]`, a dense
    /// row-major buffer of shape `shape` whose axes before `axis` all have size 1 (so the
    /// range is contiguous), as a memref of `shape` with `axis` of size `count`.
    pub fn memref_range(
        &mut self,
        arg: usize,
        shape: &[Dim],
        elem: &str,
        axis: usize,
        begin: &str,
        count: &str,
    ) -> String {
        self.memref_impl(arg, shape, elem, Some((begin, count, axis)))
    }

    /// Declares columns `[begin, begin + count)` of `args[arg]`, a dense buffer of shape
    /// `[1, n]` (one row), as a memref of shape `[1, count]`: the column range of kernels
    /// that split a one-row product into column tasks.
    pub fn memref_cols(
        &mut self,
        arg: usize,
        n: usize,
        elem: &str,
        begin: &str,
        count: &str,
    ) -> String {
        let shape = [Dim::Const(1), Dim::Const(n as i64)];
        self.memref_impl(arg, &shape, elem, Some((begin, count, 1)))
    }

    fn memref_impl(
        &mut self,
        arg: usize,
        shape: &[Dim],
        elem: &str,
        range: Option<(&str, &str, usize)>,
    ) -> String {
        let rank = shape.len();
        assert!(
            range.is_none_or(|(_, _, axis)| axis < rank),
            "a range needs its axis"
        );
        let g = self.fresh("ag");
        let mut p = self.fresh("p");
        let _ = writeln!(
            self.text,
            "  {g} = llvm.getelementptr %args[{arg}] : (!llvm.ptr) -> !llvm.ptr, !llvm.ptr\n  {p} = llvm.load {g} : !llvm.ptr -> !llvm.ptr"
        );
        let mut sizes: Vec<String> = shape.iter().map(|&d| self.dim_value(d)).collect();
        if let Some((begin, count, axis)) = range {
            // Advance the base pointer by begin * (elements per index of `axis`); `axis`
            // becomes `count` (contiguous when every axis before it has size 1, or it is 0).
            let mut row = self.dim_value(Dim::Const(1));
            for s in &sizes[axis + 1..] {
                let m = self.fresh("s");
                let _ = writeln!(self.text, "  {m} = llvm.mul {row}, {s} : i64");
                row = m;
            }
            let (b, off, q, c) = (
                self.fresh("rb"),
                self.fresh("ro"),
                self.fresh("p"),
                self.fresh("rc"),
            );
            let _ = writeln!(
                self.text,
                "  {b} = arith.index_cast {begin} : index to i64\n  {off} = llvm.mul {b}, {row} : i64\n  {q} = llvm.getelementptr {p}[{off}] : (!llvm.ptr, i64) -> !llvm.ptr, {elem}\n  {c} = arith.index_cast {count} : index to i64"
            );
            p = q;
            sizes[axis] = c;
        }
        // Row-major strides, innermost first.
        let mut strides = vec![String::new(); rank];
        let mut acc = self.dim_value(Dim::Const(1));
        for i in (0..rank).rev() {
            strides[i] = acc.clone();
            if i > 0 {
                let m = self.fresh("s");
                let _ = writeln!(self.text, "  {m} = llvm.mul {acc}, {} : i64", sizes[i]);
                acc = m;
            }
        }
        let st = descriptor_type(rank);
        let zero = self.dim_value(Dim::Const(0));
        let mut cur = self.fresh("desc");
        let _ = writeln!(self.text, "  {cur} = llvm.mlir.poison : {st}");
        let mut insert = |this: &mut Self, val: &str, pos: &str| {
            let n = this.fresh("desc");
            let _ = writeln!(
                this.text,
                "  {n} = llvm.insertvalue {val}, {cur}[{pos}] : {st}"
            );
            cur = n;
        };
        insert(self, &p, "0");
        insert(self, &p, "1");
        insert(self, &zero, "2");
        if rank > 0 {
            for (i, s) in sizes.iter().enumerate() {
                insert(self, s, &format!("3, {i}"));
            }
            for (i, s) in strides.iter().enumerate() {
                insert(self, s, &format!("4, {i}"));
            }
        }
        let m = self.fresh("m");
        let _ = writeln!(
            self.text,
            "  {m} = builtin.unrealized_conversion_cast {cur} : {st} to {}",
            memref_type_of(rank, elem)
        );
        m
    }

    /// Appends raw MLIR lines to the body.
    pub fn push(&mut self, lines: &str) {
        self.text.push_str(lines);
        if !lines.ends_with('\n') {
            self.text.push('\n');
        }
    }

    /// A dense row-major buffer of static `shape` and element type `elem` (`elem_bytes`
    /// bytes each) in the kernel's scratch memory (see [`Scratch`]), defined in the
    /// prologue; returns the SSA name of the memref (type [`memref_type_of`]).
    pub fn scratch(&mut self, shape: &[usize], elem: &str, elem_bytes: usize) -> String {
        let (text, m) = self.scratch.view(shape, elem, elem_bytes);
        self.text.push_str(&text);
        m
    }

    /// Scratch bytes one call needs for the buffers taken with [`Prologue::scratch`].
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch.bytes()
    }

    /// Wraps the body into
    /// `func.func @name(%args: !llvm.ptr, %dims: !llvm.ptr, %scratch: !llvm.ptr)`, adding the
    /// final `return`.
    pub fn finish(self, name: &str) -> String {
        format!(
            "func.func @{name}(%args: !llvm.ptr, %dims: !llvm.ptr, %scratch: !llvm.ptr) {{\n{}  return\n}}\n",
            self.text
        )
    }
}

/// Alignment of every scratch sub-buffer, in bytes (the runtime aligns the scratch base to
/// it too).
pub const SCRATCH_ALIGN: u64 = 64;

/// The layout of a kernel's scratch memory: sub-buffers at increasing 64-byte-aligned
/// offsets from the `%scratch` argument, live for the whole call. One allocator per kernel
/// (two would hand out overlapping offsets and clashing SSA names).
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    bytes: u64,
    next: usize,
}

impl Scratch {
    /// A new, empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserves a dense row-major buffer of static `shape` of `elem` (`elem_bytes` bytes
    /// each) and returns `(lines, memref)`: MLIR lines defining the memref view (valid
    /// anywhere in the kernel function, they only read `%scratch`) and its SSA name, of
    /// type [`memref_type_of`]`(shape.len(), elem)`.
    pub fn view(&mut self, shape: &[usize], elem: &str, elem_bytes: usize) -> (String, String) {
        let len = shape.iter().product::<usize>() as u64 * elem_bytes as u64;
        let offset = self.bytes;
        self.bytes = (offset + len).div_ceil(SCRATCH_ALIGN) * SCRATCH_ALIGN;
        self.next += 1;
        let v = format!("%scr{}", self.next);
        let mut t = String::new();
        let rank = shape.len();
        let st = descriptor_type(rank);
        let _ = writeln!(
            t,
            "  {v}_p = llvm.getelementptr %scratch[{offset}] : (!llvm.ptr) -> !llvm.ptr, i8\n  {v}_z = llvm.mlir.constant(0 : i64) : i64\n  {v}_d = llvm.mlir.poison : {st}\n  {v}_d0 = llvm.insertvalue {v}_p, {v}_d[0] : {st}\n  {v}_d1 = llvm.insertvalue {v}_p, {v}_d0[1] : {st}\n  {v}_d2 = llvm.insertvalue {v}_z, {v}_d1[2] : {st}"
        );
        let mut cur = format!("{v}_d2");
        let mut stride = 1usize;
        let mut strides = vec![0usize; rank];
        for i in (0..rank).rev() {
            strides[i] = stride;
            stride *= shape[i];
        }
        for (i, (&n, &s)) in shape.iter().zip(&strides).enumerate() {
            let _ = writeln!(
                t,
                "  {v}_n{i} = llvm.mlir.constant({n} : i64) : i64\n  {v}_s{i} = llvm.mlir.constant({s} : i64) : i64\n  {v}_e{i} = llvm.insertvalue {v}_n{i}, {cur}[3, {i}] : {st}\n  {v}_f{i} = llvm.insertvalue {v}_s{i}, {v}_e{i}[4, {i}] : {st}"
            );
            cur = format!("{v}_f{i}");
        }
        let _ = writeln!(
            t,
            "  {v} = builtin.unrealized_conversion_cast {cur} : {st} to {}",
            memref_type_of(rank, elem)
        );
        (t, v)
    }

    /// Bytes one call needs (a multiple of [`SCRATCH_ALIGN`]).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The LLVM struct type of a rank-`rank` memref descriptor.
pub fn descriptor_type(rank: usize) -> String {
    if rank == 0 {
        "!llvm.struct<(ptr, ptr, i64)>".into()
    } else {
        format!("!llvm.struct<(ptr, ptr, i64, array<{rank} x i64>, array<{rank} x i64>)>")
    }
}

/// The dynamic `f32` memref type of rank `rank` (`memref<?x?xf32>` for 2).
pub fn memref_type(rank: usize) -> String {
    memref_type_of(rank, "f32")
}

/// The dynamic memref type of rank `rank` and element type `elem` (`memref<?x?xi64>`).
pub fn memref_type_of(rank: usize, elem: &str) -> String {
    let mut s = String::from("memref<");
    for _ in 0..rank {
        s.push_str("?x");
    }
    s.push_str(elem);
    s.push('>');
    s
}
