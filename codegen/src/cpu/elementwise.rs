//! Elementwise kernels as `linalg.generic`: the first kernel family through the CPU path.

use super::abi::{Dim, Prologue};
use super::{Kernel, KernelSignature};

/// `y[m, n] = relu(a[m, n] * b[m, n] + c[n])` on `f32`, with `c` broadcast over rows.
///
/// Arguments `[a, b, c, y]`, dims `[m, n]`. The multiply-add carries fastmath `contract` so
/// LLVM fuses it into an FMA.
pub fn mul_add_relu(name: &str) -> Kernel {
    let mut p = Prologue::new();
    let md = [Dim::Sym(0), Dim::Sym(1)];
    let a = p.memref_f32(0, &md);
    let b = p.memref_f32(1, &md);
    let c = p.memref_f32(2, &[Dim::Sym(1)]);
    let y = p.memref_f32(3, &md);
    p.push(&format!(
        r#"  %zero = arith.constant 0.0 : f32
  linalg.generic {{indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]}}
      ins({a}, {b}, {c} : memref<?x?xf32>, memref<?x?xf32>, memref<?xf32>) outs({y} : memref<?x?xf32>) {{
  ^bb0(%ea: f32, %eb: f32, %ec: f32, %ey: f32):
    %em = arith.mulf %ea, %eb fastmath<contract> : f32
    %es = arith.addf %em, %ec fastmath<contract> : f32
    %er = arith.maximumf %es, %zero : f32
    linalg.yield %er : f32
  }}"#
    ));
    Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: 3,
            outputs: 1,
            dims: vec!["m".into(), "n".into()],
            tasks: 1,
            scratch_bytes: 0,
        },
        mlir: p.finish(name),
        pipeline: LINALG_LOOPS_PIPELINE.to_string(),
    }
}

/// Lowers `linalg` on memrefs to loops and then to the LLVM dialect; LLVM's loop
/// vectorizer vectorizes the resulting innermost loops.
pub const LINALG_LOOPS_PIPELINE: &str = "builtin.module(func.func(convert-linalg-to-loops),convert-scf-to-cf,expand-strided-metadata,lower-affine,finalize-memref-to-llvm,convert-to-llvm,reconcile-unrealized-casts)";
