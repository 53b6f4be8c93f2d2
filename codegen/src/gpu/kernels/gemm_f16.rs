//! f16 GEMM on tensor cores, `C[M,N] (f32) = A[M,K] (f16) · B[K,N] (f16)`, with
//! `nvgpu.mma.sync` (PTX `mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`, sm_80+).
//!
//! A first, unstaged version: each warp owns one 16×8 tile of C and, per 16-deep step of K,
//! loads its A (16×16) and B (16×8) fragments straight from global memory in the register
//! layout `mma.sync` expects (lane = 4·group + t: A rows `group`, `group + 8`, columns
//! `2t, 2t+1, 2t+8, 2t+9`; B rows `2t, 2t+1, 2t+8, 2t+9`, column `group`), with masked
//! loads at the edges. Shared-memory staging (`ldmatrix`, `cp.async`) is future work.

use crate::gpu::{Elem, GpuKernel, KernelParam};
use std::fmt::Write as _;

/// Warps per block (along N); the block tile is 16 × (8 · WARPS).
pub const WARPS: u32 = 4;

/// Emits a masked f16 load of `buf[r * ld + c]` (0 outside `r < rows`, `c < cols`) named
/// `%{out}`.
fn masked_load(
    w: &mut String,
    out: &str,
    buf: &str,
    (r, c): (&str, &str),
    (rows, cols): (&str, &str),
    ld: &str,
) {
    let _ = write!(
        w,
        r#"        %{out}_okr = arith.cmpi ult, %{r}, %{rows} : index
        %{out}_okc = arith.cmpi ult, %{c}, %{cols} : index
        %{out}_ok = arith.andi %{out}_okr, %{out}_okc : i1
        %{out} = scf.if %{out}_ok -> f16 {{
          %{out}_i0 = arith.muli %{r}, %{ld} : index
          %{out}_i = arith.addi %{out}_i0, %{c} : index
          %{out}_v = memref.load %{buf}[%{out}_i] : memref<?xf16>
          scf.yield %{out}_v : f16
        }} else {{
          scf.yield %h0 : f16
        }}
"#
    );
}

/// `name(A: memref<?xf16>, B: memref<?xf16>, C: memref<?xf32>, M, N, K: index)`; launch
/// with `32 · WARPS` threads per block and grid `(ceil(N / (8 · WARPS)), ceil(M / 16))`.
pub fn gemm_f16_mma(name: &str) -> GpuKernel {
    let threads = 32 * WARPS;
    let mut b = String::new();
    let w = &mut b;
    let _ = writeln!(
        w,
        "  gpu.func @{name}(%A: memref<?xf16>, %B: memref<?xf16>, %C: memref<?xf32>, %M: index, %N: index, %K: index) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>}} {{"
    );
    let _ = write!(
        w,
        r#"    %c0 = arith.constant 0 : index
    %c1 = arith.constant 1 : index
    %c2 = arith.constant 2 : index
    %c4 = arith.constant 4 : index
    %c8 = arith.constant 8 : index
    %c16 = arith.constant 16 : index
    %c32 = arith.constant 32 : index
    %cBN = arith.constant {bn} : index
    %h0 = arith.constant 0.0 : f16
    %acc0 = arith.constant dense<0.0> : vector<2x2xf32>
    %fa0 = arith.constant dense<0.0> : vector<4x2xf16>
    %fb0 = arith.constant dense<0.0> : vector<2x2xf16>
    %tid = gpu.thread_id x
    %bx = gpu.block_id x
    %by = gpu.block_id y
    %warp = arith.divui %tid, %c32 : index
    %lane = arith.remui %tid, %c32 : index
    %g = arith.divui %lane, %c4 : index
    %t = arith.remui %lane, %c4 : index
    %m0 = arith.muli %by, %c16 : index
    %nb = arith.muli %bx, %cBN : index
    %nw = arith.muli %warp, %c8 : index
    %n0 = arith.addi %nb, %nw : index
    %ra = arith.addi %m0, %g : index
    %rb = arith.addi %ra, %c8 : index
    %t2 = arith.muli %t, %c2 : index
    %t21 = arith.addi %t2, %c1 : index
    %t28 = arith.addi %t2, %c8 : index
    %t289 = arith.addi %t28, %c1 : index
    %cn = arith.addi %n0, %g : index
    %acc = scf.for %k0 = %c0 to %K step %c16 iter_args(%cacc = %acc0) -> (vector<2x2xf32>) {{
        %ka = arith.addi %k0, %t2 : index
        %kb = arith.addi %k0, %t21 : index
        %kc = arith.addi %k0, %t28 : index
        %kd = arith.addi %k0, %t289 : index
"#,
        bn = 8 * WARPS
    );
    // A fragment: [0] = (ra; ka, kb), [1] = (rb; ka, kb), [2] = (ra; kc, kd), [3] = (rb; kc, kd).
    let a_rows = ["ra", "rb", "ra", "rb"];
    let a_cols = [("ka", "kb"), ("ka", "kb"), ("kc", "kd"), ("kc", "kd")];
    let mut prev = "fa0".to_string();
    for (i, (r, (c0, c1))) in a_rows.iter().zip(a_cols).enumerate() {
        masked_load(w, &format!("a{i}x"), "A", (r, c0), ("M", "K"), "K");
        masked_load(w, &format!("a{i}y"), "A", (r, c1), ("M", "K"), "K");
        let _ = writeln!(
            w,
            "        %fa{i}_1 = vector.insert %a{i}x, %{prev} [{i}, 0] : f16 into vector<4x2xf16>"
        );
        let _ = writeln!(
            w,
            "        %fa{i}_2 = vector.insert %a{i}y, %fa{i}_1 [{i}, 1] : f16 into vector<4x2xf16>"
        );
        prev = format!("fa{i}_2");
    }
    let fa = prev;
    // B fragment: [0] = (ka, kb; cn), [1] = (kc, kd; cn).
    let mut prev = "fb0".to_string();
    for (i, (k0, k1)) in [("ka", "kb"), ("kc", "kd")].into_iter().enumerate() {
        masked_load(w, &format!("b{i}x"), "B", (k0, "cn"), ("K", "N"), "N");
        masked_load(w, &format!("b{i}y"), "B", (k1, "cn"), ("K", "N"), "N");
        let _ = writeln!(
            w,
            "        %fb{i}_1 = vector.insert %b{i}x, %{prev} [{i}, 0] : f16 into vector<2x2xf16>"
        );
        let _ = writeln!(
            w,
            "        %fb{i}_2 = vector.insert %b{i}y, %fb{i}_1 [{i}, 1] : f16 into vector<2x2xf16>"
        );
        prev = format!("fb{i}_2");
    }
    let fb = prev;
    let _ = write!(
        w,
        r#"        %d = nvgpu.mma.sync(%{fa}, %{fb}, %cacc) {{mmaShape = [16, 8, 16]}} : (vector<4x2xf16>, vector<2x2xf16>, vector<2x2xf32>) -> vector<2x2xf32>
        scf.yield %d : vector<2x2xf32>
    }}
"#
    );
    // C: [0] = (ra; n0 + 2t, +1), [1] = (rb; same).
    for (i, r) in ["ra", "rb"].iter().enumerate() {
        for j in 0..2 {
            let _ = write!(
                w,
                r#"    %cc{i}{j}0 = arith.addi %n0, %t2 : index
    %cc{i}{j} = arith.addi %cc{i}{j}0, %c{j} : index
    %ok{i}{j}r = arith.cmpi ult, %{r}, %M : index
    %ok{i}{j}c = arith.cmpi ult, %cc{i}{j}, %N : index
    %ok{i}{j} = arith.andi %ok{i}{j}r, %ok{i}{j}c : i1
    scf.if %ok{i}{j} {{
      %v{i}{j} = vector.extract %acc[{i}, {j}] : f32 from vector<2x2xf32>
      %ix{i}{j}0 = arith.muli %{r}, %N : index
      %ix{i}{j} = arith.addi %ix{i}{j}0, %cc{i}{j} : index
      memref.store %v{i}{j}, %C[%ix{i}{j}] : memref<?xf32>
    }}
"#
            );
        }
    }
    let _ = writeln!(w, "    gpu.return\n  }}");
    GpuKernel {
        name: name.into(),
        mlir: b,
        params: vec![
            KernelParam::Buffer {
                name: "A".into(),
                elem: Elem::F16,
            },
            KernelParam::Buffer {
                name: "B".into(),
                elem: Elem::F16,
            },
            KernelParam::Buffer {
                name: "C".into(),
                elem: Elem::F32,
            },
            KernelParam::Index("M".into()),
            KernelParam::Index("N".into()),
            KernelParam::Index("K".into()),
        ],
        block: [threads, 1, 1],
        shared_bytes: 0,
        requires: vec!["mma.sync.f16".into()],
    }
}
