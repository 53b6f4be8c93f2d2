//! LayerNormalization over the last axis of a row-major `rows × n` matrix (ONNX
//! `LayerNormalization` with `axis = -1`):
//! `y = (x - mean) / sqrt(var + eps) · scale + bias`, population variance, computed in two
//! passes over the row (mean, then the sum of squared deviations) with warp-shuffle
//! reductions; one warp or one block per row ([`RowMode`]).

use super::emit::{dyn_memref, in_kernel, Emitter};
use super::reduce::{fix_red_type, n_as_f32, RowMode};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam};

/// `name(X, Scale, Bias, Y: memref<?xf32>, rows: index, n: index, eps: f32)`; `Scale` and
/// `Bias` hold `n` values; launch with `mode.grid(rows)` × `mode.block()`.
pub fn layer_norm(name: &str, mode: RowMode) -> Result<GpuKernel, GpuError> {
    mode.validate().map_err(in_kernel(name))?;
    let ty = dyn_memref("f32");
    let mut e = Emitter::new();
    let (row, j0, js) = mode.open(&mut e);
    let base = e.ii("muli", &row, "%n");
    let zero = e.f32c(0.0);
    let walk = |e: &mut Emitter, res: &str| {
        e.line(&format!(
            "{res} = scf.for %j = {j0} to %n step {js} iter_args(%acc = {zero}) -> f32 {{"
        ));
        let i = e.ii("addi", &base, "%j");
        e.load("%X", &i, &ty, "f32")
    };
    let x = walk(&mut e, "%psum");
    let a = e.ff("addf", "%acc", &x);
    e.line(&format!("scf.yield {a} : f32"));
    e.line("}");
    let sum = mode.reduce(&mut e, "%psum", "addf", 0);
    let nf = n_as_f32(&mut e);
    let mean = e.ff("divf", &sum, &nf);
    let x = walk(&mut e, "%psq");
    let d = e.ff("subf", &x, &mean);
    let d2 = e.ff("mulf", &d, &d);
    let a = e.ff("addf", "%acc", &d2);
    e.line(&format!("scf.yield {a} : f32"));
    e.line("}");
    let sq = mode.reduce(&mut e, "%psq", "addf", 1);
    let var = e.ff("divf", &sq, &nf);
    let ve = e.ff("addf", &var, "%eps");
    e.line(&format!("%rstd = math.rsqrt {ve} : f32"));
    e.line(&format!("scf.for %j = {j0} to %n step {js} {{"));
    let i = e.ii("addi", &base, "%j");
    let x = e.load("%X", &i, &ty, "f32");
    let g = e.load("%Scale", "%j", &ty, "f32");
    let b = e.load("%Bias", "%j", &ty, "f32");
    let d = e.ff("subf", &x, &mean);
    let nrm = e.ff("mulf", &d, "%rstd");
    let y = e.ff("mulf", &nrm, &g);
    let y = e.ff("addf", &y, &b);
    e.store(&y, "%Y", &i, &ty, "f32");
    e.line("}");
    e.line("}");
    let [bx, by, bz] = mode.block();
    let header = format!(
        "gpu.func @{name}(%X: memref<?xf32>, %Scale: memref<?xf32>, %Bias: memref<?xf32>, %Y: memref<?xf32>, %rows: index, %n: index, %eps: f32){} kernel attributes {{known_block_size = array<i32: {bx}, {by}, {bz}>}} {{",
        mode.workgroup(2)
    );
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    Ok(GpuKernel {
        name: name.into(),
        mlir: fix_red_type(e.finish(&header), &mode, 2),
        params: vec![
            buf("X"),
            buf("Scale"),
            buf("Bias"),
            buf("Y"),
            KernelParam::Index("rows".into()),
            KernelParam::Index("n".into()),
            KernelParam::F32("eps".into()),
        ],
        block: mode.block(),
        shared_bytes: mode.shared_bytes(2),
        requires: vec![],
    })
}
