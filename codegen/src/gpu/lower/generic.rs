//! The generic GPU kernel: one thread per output element, grid-stride loop.
//!
//! A [`GenKernel`] is a loop body over a flat item index `%i` in `0..n` that reads and
//! writes 1-D buffers (`memref<?xT>` parameters `%p0_`, `%p1_`, ...) with index arithmetic
//! on static shapes. [`GenKernel::gpu_func`] wraps it in a `gpu.func` whose threads stride
//! over the items (`i = block_id * block_dim + thread_id`, step `grid_dim * block_dim`);
//! [`GenKernel::cpu_func`] wraps the same body in a CPU kernel with the uniform ABI that
//! runs every item in one thread, so the bodies can be checked against the reference
//! interpreter on machines without a GPU.

use crate::cpu::abi::{Dim as PDim, Prologue};
use crate::cpu::lower::elementwise::Body;
use crate::cpu::lower::Ty;
use crate::gpu::{Elem, GpuKernel, KernelParam};
use kiln_ir::{Graph, ValueId};
use std::collections::HashMap;

use super::Operand;

/// Threads per block of generic kernels.
pub const BLOCK: u32 = 256;

/// A generic kernel being built (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Gen {
    /// The body (SSA names `%vN`).
    pub b: Body,
    /// Buffer parameters: operand, element type, length in elements.
    pub bufs: Vec<(Operand, Elem, u64)>,
    pub consts: HashMap<i64, String>,
}

/// The element type of a body type in buffers.
pub(crate) fn elem_of(ty: Ty) -> Elem {
    match ty {
        Ty::F32 => Elem::F32,
        Ty::I64 => Elem::I64,
        Ty::I1 => Elem::I8,
    }
}

impl Gen {
    /// The `index` constant `c` (emitted once).
    pub fn c(&mut self, c: i64) -> String {
        if let Some(v) = self.consts.get(&c) {
            return v.clone();
        }
        let v = self.b.op(&format!("arith.constant {c} : index"));
        self.consts.insert(c, v.clone());
        v
    }

    /// The parameter index of buffer `op` (added on first use).
    pub fn buf(&mut self, op: Operand, elem: Elem, len: u64) -> usize {
        if let Some(i) = self.bufs.iter().position(|b| b.0 == op) {
            return i;
        }
        self.bufs.push((op, elem, len));
        self.bufs.len() - 1
    }

    /// The buffer of graph value `v` (element type from its dtype).
    pub fn value_buf(&mut self, g: &Graph, v: ValueId) -> Result<(usize, Ty), String> {
        let val = &g.values[v];
        let ty = Ty::of(val.fact.dtype).map_err(|e| format!("value '{}': {e}", val.name))?;
        let n = val
            .fact
            .shape
            .numel()
            .ok_or_else(|| format!("value '{}' has a symbolic shape", val.name))?;
        Ok((self.buf(Operand::Value(v), elem_of(ty), n as u64), ty))
    }

    /// `a <op> b` on `index` values (`addi`, `muli`, `divui`, `remui`, ...).
    pub fn ix(&mut self, op: &str, a: &str, b: &str) -> String {
        self.b.op(&format!("arith.{op} {a}, {b} : index"))
    }

    /// The multi-index of flat index `i` in a row-major `shape`.
    pub fn unravel(&mut self, i: &str, shape: &[usize]) -> Vec<String> {
        let mut idx = vec![String::new(); shape.len()];
        let mut rest = i.to_string();
        for d in (0..shape.len()).rev() {
            if d == 0 {
                idx[0] = rest.clone();
                break;
            }
            let s = self.c(shape[d] as i64);
            idx[d] = self.ix("remui", &rest, &s);
            rest = self.ix("divui", &rest, &s);
        }
        idx
    }

    /// `base + Σ idx[d] * strides[d]` (terms with stride 0 skipped).
    pub fn lin(&mut self, idx: &[String], strides: &[i64], base: i64) -> String {
        let mut acc = self.c(base);
        for (x, &s) in idx.iter().zip(strides) {
            if s == 0 {
                continue;
            }
            let t = if s == 1 {
                x.clone()
            } else {
                let c = self.c(s);
                self.ix("muli", x, &c)
            };
            acc = self.ix("addi", &acc, &t);
        }
        acc
    }

    /// The flat index, in an input of shape `input` broadcast (numpy rules) to `out`, of the
    /// element at multi-index `idx` of `out`.
    pub fn broadcast_lin(&mut self, idx: &[String], input: &[usize], out: &[usize]) -> String {
        let off = out.len() - input.len();
        let strides = row_major(input);
        let mut st = vec![0i64; out.len()];
        for (j, &d) in input.iter().enumerate() {
            if d != 1 {
                st[j + off] = strides[j];
            }
        }
        self.lin(idx, &st, 0)
    }

    /// Loads element `at` of buffer `buf` as body type `ty` (bytes become `i1`).
    pub fn load(&mut self, buf: usize, at: &str, ty: Ty) -> String {
        let x = self.b.op(&format!(
            "memref.load %p{buf}_[{at}] : memref<?x{}>",
            ty.storage()
        ));
        if ty == Ty::I1 {
            self.b.op(&format!("arith.trunci {x} : i8 to i1"))
        } else {
            x
        }
    }

    /// Stores `x` (body type `ty`) at element `at` of buffer `buf`.
    pub fn store(&mut self, buf: usize, at: &str, x: &str, ty: Ty) {
        let x = if ty == Ty::I1 {
            self.b.op(&format!("arith.extui {x} : i1 to i8"))
        } else {
            x.to_string()
        };
        self.b.raw(&format!(
            "memref.store {x}, %p{buf}_[{at}] : memref<?x{}>",
            ty.storage()
        ));
    }

    /// Binds every value of `vals` not bound yet, read at output multi-index `idx` of the
    /// iteration shape `out`: scalar constants inline, others loaded with broadcasting.
    pub fn bind_inputs(
        &mut self,
        g: &Graph,
        vals: &[ValueId],
        idx: &[String],
        out: &[usize],
    ) -> Result<(), String> {
        for &v in vals {
            if self.b.vals.contains_key(&v) {
                continue;
            }
            let val = &g.values[v];
            let ty = Ty::of(val.fact.dtype).map_err(|e| format!("input '{}': {e}", val.name))?;
            if let Some(t) = g.const_value(v).filter(|t| t.len() == 1) {
                self.b.bind_const(v, t.to_f64_vec()[0], ty);
                continue;
            }
            let s = val
                .fact
                .shape
                .as_known()
                .ok_or_else(|| format!("input '{}' has a symbolic shape", val.name))?;
            if s.len() > out.len()
                || s.iter()
                    .zip(&out[out.len() - s.len()..])
                    .any(|(&a, &b)| a != b && a != 1)
            {
                return Err(format!(
                    "input '{}' of shape {s:?} does not broadcast to {out:?}",
                    val.name
                ));
            }
            let (buf, _) = self.value_buf(g, v)?;
            let at = self.broadcast_lin(idx, &s, out);
            let x = self.load(buf, &at, ty);
            self.b.vals.insert(v, (x, ty));
        }
        Ok(())
    }

    /// Finishes the kernel `name` over `n` items.
    pub fn finish(self, name: &str, n: u64) -> GenKernel {
        GenKernel {
            name: name.to_string(),
            bufs: self.bufs,
            n,
            body: self.b.into_text(),
        }
    }
}

/// Row-major strides of `shape`.
pub fn row_major(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1] as i64;
    }
    s
}

/// A finished generic kernel (see the module doc).
#[derive(Debug, Clone)]
pub struct GenKernel {
    /// Entry name.
    pub name: String,
    /// Buffer parameters `%p{k}_`: operand, element type, length in elements.
    pub bufs: Vec<(Operand, Elem, u64)>,
    /// Number of items (`%i` runs over `0..n`).
    pub n: u64,
    /// The loop body.
    pub body: String,
}

impl GenKernel {
    /// The kernel as a `gpu.func` with a grid-stride loop ([`BLOCK`] threads per block).
    pub fn gpu_kernel(&self) -> GpuKernel {
        let params: Vec<String> = self
            .bufs
            .iter()
            .enumerate()
            .map(|(k, b)| format!("%p{k}_: memref<?x{}>", b.1.mlir()))
            .collect();
        let mlir = format!(
            "  gpu.func @{name}({params}) kernel attributes {{known_block_size = array<i32: {BLOCK}, 1, 1>}} {{\n    %g_t = gpu.thread_id x\n    %g_b = gpu.block_id x\n    %g_bd = gpu.block_dim x\n    %g_gd = gpu.grid_dim x\n    %g_s0 = arith.muli %g_b, %g_bd : index\n    %g_start = arith.addi %g_s0, %g_t : index\n    %g_step = arith.muli %g_gd, %g_bd : index\n    %g_n = arith.constant {n} : index\n    scf.for %i = %g_start to %g_n step %g_step {{\n{body}    }}\n    gpu.return\n  }}\n",
            name = self.name,
            params = params.join(", "),
            n = self.n,
            body = self.body,
        );
        GpuKernel {
            name: self.name.clone(),
            mlir,
            params: self
                .bufs
                .iter()
                .enumerate()
                .map(|(k, b)| KernelParam::Buffer {
                    name: format!("p{k}"),
                    elem: b.1,
                })
                .collect(),
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            requires: vec![],
        }
    }

    /// The same body as a CPU kernel (`func.func` with the uniform ABI, `args` = the buffers
    /// in parameter order) running all items in order.
    pub fn cpu_kernel(&self) -> crate::cpu::Kernel {
        let mut p = Prologue::new();
        let mut body = self.body.clone();
        // Replace the highest indices first (`%p1_` is not a prefix of `%p10_`, but keep the
        // order deterministic anyway).
        for (k, b) in self.bufs.iter().enumerate().rev() {
            let m = p.memref(k, &[PDim::Const(b.2 as i64)], b.1.mlir());
            body = body.replace(&format!("%p{k}_["), &format!("{m}["));
        }
        p.push(&format!(
            "  %g_c0 = arith.constant 0 : index\n  %g_c1 = arith.constant 1 : index\n  %g_n = arith.constant {} : index\n  scf.for %i = %g_c0 to %g_n step %g_c1 {{\n{body}  }}",
            self.n
        ));
        crate::cpu::Kernel {
            signature: crate::cpu::KernelSignature {
                name: self.name.clone(),
                inputs: self.bufs.len(),
                outputs: 0,
                dims: vec![],
                tasks: 1,
                scratch_bytes: 0,
            },
            mlir: p.finish(&self.name),
            pipeline: crate::cpu::lower::GRAPH_KERNEL_PIPELINE.to_string(),
        }
    }
}
