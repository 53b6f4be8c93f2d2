//! Row softmax `y[r, :] = exp(x[r, :] - max) / sum(exp(x[r, :] - max))` over a row-major
//! `rows × n` matrix: one warp per row, `rows_per_block` warps per block (block
//! `(32, rows_per_block)`), max and sum reduced across the warp with `gpu.shuffle xor`.
//! `exp` is `math.exp`, lowered through libdevice (`__nv_expf`).

use crate::gpu::{Elem, GpuKernel, KernelParam};
use std::fmt::Write as _;

/// Warp width the kernel is written for.
pub const WARP: u32 = 32;

/// Butterfly reduction of `%{v}` over a warp with `op` (`maximumf`, `addf`); returns the
/// name of the reduced value (the same in every lane).
fn warp_reduce(out: &mut String, v: &str, op: &str, tag: &str) -> String {
    let mut cur = v.to_string();
    let mut off = WARP / 2;
    while off > 0 {
        let _ = writeln!(out, "      %{tag}_o{off} = arith.constant {off} : i32");
        let _ = writeln!(
            out,
            "      %{tag}_s{off}, %{tag}_v{off} = gpu.shuffle xor %{cur}, %{tag}_o{off}, %w32 : f32"
        );
        let _ = writeln!(
            out,
            "      %{tag}_r{off} = arith.{op} %{cur}, %{tag}_s{off} : f32"
        );
        cur = format!("{tag}_r{off}");
        off /= 2;
    }
    cur
}

/// `name(x: memref<?xf32>, y: memref<?xf32>, rows: index, n: index)`; launch with block
/// `(32, rows_per_block, 1)` and `ceil(rows / rows_per_block)` blocks.
pub fn row_softmax(name: &str, rows_per_block: u32) -> GpuKernel {
    let rpb = rows_per_block.max(1);
    let mut b = String::new();
    let _ = writeln!(
        b,
        "  gpu.func @{name}(%x: memref<?xf32>, %y: memref<?xf32>, %rows: index, %n: index) kernel attributes {{known_block_size = array<i32: {WARP}, {rpb}, 1>}} {{"
    );
    b.push_str(&format!(
        r#"    %c32 = arith.constant {WARP} : index
    %w32 = arith.constant {WARP} : i32
    %bid = gpu.block_id x
    %bdy = gpu.block_dim y
    %ty = gpu.thread_id y
    %lane = gpu.thread_id x
    %r0 = arith.muli %bid, %bdy : index
    %row = arith.addi %r0, %ty : index
    %inb = arith.cmpi ult, %row, %rows : index
    scf.if %inb {{
      %base = arith.muli %row, %n : index
      %ninf = arith.constant 0xFF800000 : f32
      %zero = arith.constant 0.0 : f32
      %pmax = scf.for %j = %lane to %n step %c32 iter_args(%acc = %ninf) -> f32 {{
        %i = arith.addi %base, %j : index
        %v = memref.load %x[%i] : memref<?xf32>
        %a = arith.maximumf %acc, %v : f32
        scf.yield %a : f32
      }}
"#
    ));
    let mx = warp_reduce(&mut b, "pmax", "maximumf", "mx");
    b.push_str(&format!(
        r#"      %psum = scf.for %j = %lane to %n step %c32 iter_args(%acc = %zero) -> f32 {{
        %i = arith.addi %base, %j : index
        %v = memref.load %x[%i] : memref<?xf32>
        %d = arith.subf %v, %{mx} : f32
        %e = math.exp %d fastmath<afn> : f32
        %a = arith.addf %acc, %e : f32
        scf.yield %a : f32
      }}
"#
    ));
    let sm = warp_reduce(&mut b, "psum", "addf", "sm");
    b.push_str(&format!(
        r#"      %one = arith.constant 1.0 : f32
      %inv = arith.divf %one, %{sm} : f32
      scf.for %j = %lane to %n step %c32 {{
        %i = arith.addi %base, %j : index
        %v = memref.load %x[%i] : memref<?xf32>
        %d = arith.subf %v, %{mx} : f32
        %e = math.exp %d fastmath<afn> : f32
        %o = arith.mulf %e, %inv : f32
        memref.store %o, %y[%i] : memref<?xf32>
      }}
    }}
    gpu.return
  }}
"#
    ));
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    GpuKernel {
        name: name.into(),
        mlir: b,
        params: vec![
            buf("x"),
            buf("y"),
            KernelParam::Index("rows".into()),
            KernelParam::Index("n".into()),
        ],
        block: [WARP, rpb, 1],
        shared_bytes: 0,
        requires: vec![],
    }
}
