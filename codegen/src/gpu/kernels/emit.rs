//! A small MLIR text builder for the GPU kernel generators: fresh SSA names, `index` and
//! `f32` constants hoisted to the top of the kernel, one-line arithmetic helpers and the
//! warp-shuffle butterfly reduction shared by the reduction kernels.

use crate::gpu::GpuError;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The warp width every kernel is written for.
pub const WARP: u32 = 32;

/// An MLIR kernel body under construction.
#[derive(Debug, Default)]
pub struct Emitter {
    body: String,
    index_consts: BTreeSet<u64>,
    f32_consts: BTreeSet<u32>,
    next: usize,
}

impl Emitter {
    /// An empty body.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh SSA name `%{prefix}{n}`.
    pub fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("%{prefix}{}", self.next)
    }

    /// Appends one line of MLIR (indented by four spaces).
    pub fn line(&mut self, s: &str) {
        let _ = writeln!(self.body, "    {s}");
    }

    /// The `index` constant `v` (declared once at the top of the kernel).
    pub fn idx(&mut self, v: u64) -> String {
        self.index_consts.insert(v);
        format!("%ci{v}")
    }

    /// The `f32` constant `v` (declared once at the top of the kernel, bit-exact).
    pub fn f32c(&mut self, v: f32) -> String {
        self.f32_consts.insert(v.to_bits());
        format!("%cf{:08x}", v.to_bits())
    }

    /// `%r = <op> a, b : ty`, returning `%r`.
    pub fn op2(&mut self, op: &str, a: &str, b: &str, ty: &str) -> String {
        let r = self.fresh("t");
        self.line(&format!("{r} = {op} {a}, {b} : {ty}"));
        r
    }

    /// Index arithmetic `arith.<op> a, b` (`addi`, `subi`, `muli`, `divui`, `remui`, `minui`).
    pub fn ii(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op2(&format!("arith.{op}"), a, b, "index")
    }

    /// Index arithmetic with a constant right operand.
    pub fn ic(&mut self, op: &str, a: &str, v: u64) -> String {
        let c = self.idx(v);
        self.ii(op, a, &c)
    }

    /// `arith.cmpi pred, a, b : index` (an `i1`).
    pub fn cmp(&mut self, pred: &str, a: &str, b: &str) -> String {
        let r = self.fresh("p");
        self.line(&format!("{r} = arith.cmpi {pred}, {a}, {b} : index"));
        r
    }

    /// `arith.cmpi pred, a, <constant v>`.
    pub fn cmpc(&mut self, pred: &str, a: &str, v: u64) -> String {
        let c = self.idx(v);
        self.cmp(pred, a, &c)
    }

    /// `arith.andi a, b : i1`.
    pub fn and(&mut self, a: &str, b: &str) -> String {
        self.op2("arith.andi", a, b, "i1")
    }

    /// f32 arithmetic `arith.<op> a, b : f32` (`addf`, `mulf`, `maximumf`, ...).
    pub fn ff(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op2(&format!("arith.{op}"), a, b, "f32")
    }

    /// `arith.select c, a, b : ty`.
    pub fn select(&mut self, c: &str, a: &str, b: &str, ty: &str) -> String {
        let r = self.fresh("s");
        self.line(&format!("{r} = arith.select {c}, {a}, {b} : {ty}"));
        r
    }

    /// A load `buf[i]` of element type `elem` from a `memref<?xelem>` (or the given memref
    /// type), widened to `f32` when `elem` is `f16`.
    pub fn load(&mut self, buf: &str, i: &str, ty: &str, elem: &str) -> String {
        let r = self.fresh("l");
        self.line(&format!("{r} = memref.load {buf}[{i}] : {ty}"));
        if elem == "f16" {
            let x = self.fresh("x");
            self.line(&format!("{x} = arith.extf {r} : f16 to f32"));
            x
        } else {
            r
        }
    }

    /// A store of the f32 value `v` to `buf[i]`, narrowed to `f16` when `elem` is `f16`.
    pub fn store(&mut self, v: &str, buf: &str, i: &str, ty: &str, elem: &str) {
        let v = if elem == "f16" {
            let x = self.fresh("n");
            self.line(&format!("{x} = arith.truncf {v} : f32 to f16"));
            x
        } else {
            v.to_string()
        };
        self.line(&format!("memref.store {v}, {buf}[{i}] : {ty}"));
    }

    /// Butterfly reduction of the f32 `v` over a warp with `arith.<op>` (`addf`,
    /// `maximumf`) using `gpu.shuffle xor`; every lane gets the result.
    pub fn warp_reduce(&mut self, v: &str, op: &str) -> String {
        let width = self.fresh("w");
        self.line(&format!("{width} = arith.constant {WARP} : i32"));
        let mut cur = v.to_string();
        let mut off = WARP / 2;
        while off > 0 {
            let o = self.fresh("o");
            self.line(&format!("{o} = arith.constant {off} : i32"));
            let (s, ok) = (self.fresh("sh"), self.fresh("ok"));
            self.line(&format!(
                "{s}, {ok} = gpu.shuffle xor {cur}, {o}, {width} : f32"
            ));
            cur = self.ff(op, &cur, &s);
            off /= 2;
        }
        cur
    }

    /// `gpu.shuffle idx` of the f32 `v` from lane `lane` (an `i32` constant).
    pub fn shuffle_idx(&mut self, v: &str, lane: u32) -> String {
        let (w, l) = (self.fresh("w"), self.fresh("o"));
        self.line(&format!("{w} = arith.constant {WARP} : i32"));
        self.line(&format!("{l} = arith.constant {lane} : i32"));
        let (s, ok) = (self.fresh("sh"), self.fresh("ok"));
        self.line(&format!("{s}, {ok} = gpu.shuffle idx {v}, {l}, {w} : f32"));
        s
    }

    /// The finished kernel: `header` (the `gpu.func ... {` line), the constants, the body
    /// and `gpu.return }`.
    pub fn finish(self, header: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "  {header}");
        for v in &self.index_consts {
            let _ = writeln!(out, "    %ci{v} = arith.constant {v} : index");
        }
        for b in &self.f32_consts {
            let _ = writeln!(out, "    %cf{b:08x} = arith.constant 0x{b:08X} : f32");
        }
        out.push_str(&self.body);
        out.push_str("    gpu.return\n  }\n");
        out
    }
}

/// Prefixes a schedule/shape error with the kernel it is about (`kernel 'name': ...`).
pub fn in_kernel(name: &str) -> impl Fn(GpuError) -> GpuError + '_ {
    move |e| match e {
        GpuError::Schedule(m) => GpuError::Schedule(format!("kernel '{name}': {m}")),
        other => other,
    }
}

/// `memref<?x{elem}>`.
pub fn dyn_memref(elem: &str) -> String {
    format!("memref<?x{elem}>")
}

/// A workgroup (shared-memory) `memref<{n}xf32, #gpu.address_space<workgroup>>`. The
/// kernels declare their attributions with `{llvm.align = 16 : i64}`: vector loads from
/// shared memory become `ld.shared.v4`, which needs 16-byte alignment (MLIR's default
/// for the arrays is the element's 4).
pub fn shared_memref(n: u64) -> String {
    format!("memref<{n}xf32, #gpu.address_space<workgroup>>")
}
