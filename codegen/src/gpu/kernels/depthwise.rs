//! Depthwise 2-D convolution (groups = C, one filter per channel, NCHW, f32): one thread per
//! output element with a grid-stride loop; the thread's `KH·KW` filter taps are loaded into
//! registers first, then the taps are unrolled (padding checks only where the geometry is
//! padded). Weights are ONNX's `[C, 1, KH, KW]`; epilogue as for [`conv`](super::conv).

use super::blocks_for;
use super::conv::{ConvGeom, Epilogue};
use super::emit::{dyn_memref, in_kernel, Emitter};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam, Sku};

/// Threads per block of [`depthwise_conv2d`].
pub const BLOCK: u32 = 256;

/// Launch geometry of [`depthwise_conv2d`] for `g` on `sku`: enough blocks of [`BLOCK`]
/// threads for one output each, capped at 32 blocks per SM (the grid-stride loop covers
/// the rest).
pub fn launch(g: &ConvGeom, sku: &Sku) -> ([u32; 3], [u32; 3]) {
    let n = g.m() * g.oc;
    let max_blocks = 32 * u64::from(sku.sm_count);
    (
        [blocks_for(n, u64::from(BLOCK), max_blocks), 1, 1],
        [BLOCK, 1, 1],
    )
}

/// `name(X, W[, bias][, residual], Y: memref<?xf32>)`: depthwise convolution of the NCHW
/// input (`g.oc` must equal `g.c`; `g.k()` counts `C·KH·KW` but each output reads only its
/// channel's `KH·KW` taps).
pub fn depthwise_conv2d(name: &str, g: &ConvGeom, epi: Epilogue) -> Result<GpuKernel, GpuError> {
    g.validate().map_err(in_kernel(name))?;
    if g.oc != g.c {
        return Err(GpuError::Schedule(format!(
            "depthwise conv '{name}': {} output channels for {} input channels (groups = C \
             needs OC = C)",
            g.oc, g.c
        )));
    }
    let taps = g.kh * g.kw;
    if taps > 256 {
        return Err(GpuError::Schedule(format!(
            "depthwise conv '{name}': {taps} filter taps (at most 256 are kept in registers)"
        )));
    }
    let (oh, ow) = (g.oh(), g.ow());
    let total = g.n * g.c * oh * ow;
    let padded = g.pads.iter().any(|&p| p > 0);
    let ty = dyn_memref("f32");
    let mut e = Emitter::new();
    e.line("%tid = gpu.thread_id x");
    e.line("%bid = gpu.block_id x");
    e.line("%gdim = gpu.grid_dim x");
    let i0 = e.ic("muli", "%bid", u64::from(BLOCK));
    let i0 = e.ii("addi", &i0, "%tid");
    let step = e.ic("muli", "%gdim", u64::from(BLOCK));
    let n_out = e.idx(total);
    e.line(&format!("scf.for %i = {i0} to {n_out} step {step} {{"));
    let ox = e.ic("remui", "%i", ow);
    let t = e.ic("divui", "%i", ow);
    let oy = e.ic("remui", &t, oh);
    let nc = e.ic("divui", &t, oh); // n·C + c
    let ch = e.ic("remui", &nc, g.c);
    // Filter taps in registers.
    let wbase = e.ic("muli", &ch, taps);
    let mut w = Vec::new();
    for q in 0..taps {
        let wi = e.ic("addi", &wbase, q);
        w.push(e.load("%W", &wi, &ty, "f32"));
    }
    let plane = e.ic("muli", &nc, g.h * g.w);
    let ys = e.ic("muli", &oy, g.stride[0]);
    let xs = e.ic("muli", &ox, g.stride[1]);
    let mut acc = e.f32c(0.0);
    for kh in 0..g.kh {
        let yp = e.ic("addi", &ys, kh * g.dilation[0]);
        for kw in 0..g.kw {
            let xp = e.ic("addi", &xs, kw * g.dilation[1]);
            let wq = &w[(kh * g.kw + kw) as usize];
            let load = |e: &mut Emitter| {
                let iy = e.ic("subi", &yp, g.pads[0]);
                let ix = e.ic("subi", &xp, g.pads[1]);
                let r = e.ic("muli", &iy, g.w);
                let a = e.ii("addi", &plane, &r);
                let a = e.ii("addi", &a, &ix);
                e.load("%X", &a, &ty, "f32")
            };
            let x = if padded {
                let mut ok: Option<String> = None;
                for (v, lo, len) in [(&yp, g.pads[0], g.h), (&xp, g.pads[1], g.w)] {
                    let a = e.cmpc("uge", v, lo);
                    let b = e.cmpc("ult", v, lo + len);
                    let ab = e.and(&a, &b);
                    ok = Some(match ok {
                        None => ab,
                        Some(o) => e.and(&o, &ab),
                    });
                }
                let r = e.fresh("xv");
                e.line(&format!(
                    "{r} = scf.if {} -> f32 {{",
                    ok.unwrap_or_default()
                ));
                let v = load(&mut e);
                e.line(&format!("scf.yield {v} : f32"));
                e.line("} else {");
                let z = e.f32c(0.0);
                e.line(&format!("scf.yield {z} : f32"));
                e.line("}");
                r
            } else {
                load(&mut e)
            };
            let pr = e.fresh("pr");
            e.line(&format!(
                "{pr} = arith.mulf {x}, {wq} fastmath<contract> : f32"
            ));
            let r = e.fresh("acc");
            e.line(&format!(
                "{r} = arith.addf {acc}, {pr} fastmath<contract> : f32"
            ));
            acc = r;
        }
    }
    let v = epi.emit(&mut e, &acc, &ch, "%i");
    e.store(&v, "%Y", "%i", &ty, "f32");
    e.line("}");
    let mut decls = String::new();
    if epi.bias {
        decls.push_str(", %Bias: memref<?xf32>");
    }
    if epi.residual {
        decls.push_str(", %Res: memref<?xf32>");
    }
    let header = format!(
        "gpu.func @{name}(%X: memref<?xf32>, %W: memref<?xf32>{decls}, %Y: memref<?xf32>) kernel attributes {{known_block_size = array<i32: {BLOCK}, 1, 1>}} {{"
    );
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    let mut params = vec![buf("X"), buf("W")];
    params.extend(epi.params());
    params.push(buf("Y"));
    Ok(GpuKernel {
        name: name.into(),
        mlir: e.finish(&header),
        params,
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        requires: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depthwise_needs_oc_equal_c() {
        let g = ConvGeom {
            n: 1,
            c: 8,
            h: 10,
            w: 10,
            oc: 8,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pads: [1, 1, 1, 1],
            dilation: [1, 1],
        };
        assert!(depthwise_conv2d("d", &g, Epilogue::default()).is_ok());
        let e = depthwise_conv2d("d", &ConvGeom { oc: 16, ..g }, Epilogue::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'d'") && e.contains("OC = C"), "{e}");
    }
}
