//! 2-D convolution with f16 (or bf16) inputs and weights, f32 accumulation on tensor cores
//! (`nvgpu.mma.sync` m16n8k16; bf16: `nvvm.mma.sync`, sm_80+), as an implicit GEMM like
//! [`conv`](super::conv):
//!
//! ```text
//! block: `warps` warps, tile of 16·warps output pixels × 8·n_tiles output channels
//! for k0 in 0..K step 16
//!   the block gathers the im2col tile A[m0.., k0..k0+16] (f16, row-major As[m][k]) and the
//!   weights Wt[n0.., k0..k0+16] (f16, Bs[n][k]: the "col" operand of mma.sync) into shared
//!   memory, zero outside the padded image and past the edges; barrier
//!   warp w: A fragment of rows 16·w.. (lane = 4·g + t: rows g, g+8; columns 2t, 2t+1,
//!   2t+8, 2t+9), for each n tile j a B fragment (k = 2t, 2t+1, 2t+8, 2t+9; n = 8·j + g),
//!   mma.sync into the tile's vector<2x2xf32> accumulator; barrier
//! epilogue per accumulator (rows g, g+8; columns 2t, 2t+1): + bias, + residual, relu (f32)
//! ```
//!
//! X and W are `memref<?xf16>` in the same layouts as the f32 kernel (NCHW with weights
//! `[OC, C, KH, KW]`, NHWC with `[OC, KH, KW, C]`); bias, residual and Y are f32. With
//! [`ConvMmaSchedule::x_f32`] X is f32 instead, rounded (`arith.truncf`, to nearest even) as
//! the block gathers it.

use super::conv::{emit_gather, ConvGeom, ConvLayout, Epilogue};
use super::emit::{dyn_memref, in_kernel, Emitter, WARP};
use super::gemm_mma::MmaInput;
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam, Sku};
use kiln_tune::{Config, Param, Space};

/// Tiling of [`conv2d_f16_mma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvMmaSchedule {
    /// Warps per block; each owns 16 output pixels.
    pub warps: u32,
    /// 8-channel mma tiles per warp (the block covers `8 · n_tiles` output channels).
    pub n_tiles: u32,
    /// `X` is f32 in global memory, rounded to the input type as the block gathers it (no
    /// separate cast launch; each element is read as many times as the taps that use it).
    pub x_f32: bool,
}

impl Default for ConvMmaSchedule {
    /// 4 warps × 4 tiles: 64 pixels × 32 channels per block, 128 threads; 16-bit `X`.
    fn default() -> Self {
        Self {
            warps: 4,
            n_tiles: 4,
            x_f32: false,
        }
    }
}

impl ConvMmaSchedule {
    /// The lowering's untuned choice for `g`: the default tiling; an f32 `X` rounded in the
    /// kernel for 1×1 convs (each element is gathered once, so a cast launch would only add
    /// a pass over `X`), a cast launch for the others.
    pub fn for_geom(g: &ConvGeom) -> Self {
        Self {
            x_f32: g.kh * g.kw == 1,
            ..Self::default()
        }
    }

    /// Output pixels per block.
    pub fn bm(&self) -> u32 {
        16 * self.warps
    }

    /// Output channels per block.
    pub fn bn(&self) -> u32 {
        8 * self.n_tiles
    }

    /// Static shared memory: `2 · 16 · (bm + bn)` bytes.
    pub fn shared_bytes(&self) -> u32 {
        2 * 16 * (self.bm() + self.bn())
    }

    /// Checks the tiling against `sku` (which must have `mma.sync.f16`).
    pub fn validate(&self, sku: &Sku) -> Result<(), GpuError> {
        if !(1..=8).contains(&self.warps) || !(1..=8).contains(&self.n_tiles) {
            return Err(GpuError::Schedule(format!(
                "{self:?}: 1..=8 warps and 1..=8 n tiles"
            )));
        }
        if self.shared_bytes() > sku.shared_mem_per_block {
            return Err(GpuError::Schedule(format!(
                "{self:?}: {} B of shared memory (limit {} on {})",
                self.shared_bytes(),
                sku.shared_mem_per_block,
                sku.name
            )));
        }
        Ok(())
    }

    /// The autotuner's search space (`warps`, `n_tiles`, `x_f32` 0/1).
    pub fn space() -> Space {
        Space::new(vec![
            Param::new("warps", &[1, 2, 4, 8]),
            Param::new("n_tiles", &[1, 2, 4, 8]),
            Param::new("x_f32", &[0, 1]),
        ])
    }

    /// The schedule of a config (missing parameters keep the default; not validated).
    pub fn from_config(c: &Config) -> Self {
        let d = Self::default();
        let get = |k: &str, v: u32| c.get_u32_or(k, v);
        Self {
            warps: get("warps", d.warps),
            n_tiles: get("n_tiles", d.n_tiles),
            x_f32: get("x_f32", u32::from(d.x_f32)) == 1,
        }
    }

    /// The config of this schedule.
    pub fn to_config(&self) -> Config {
        Config::from_pairs(&[
            ("warps", i64::from(self.warps)),
            ("n_tiles", i64::from(self.n_tiles)),
            ("x_f32", i64::from(self.x_f32)),
        ])
    }

    /// Grid `(ceil(M / bm), ceil(OC / bn), 1)` and block `(32 · warps, 1, 1)`.
    pub fn launch(&self, g: &ConvGeom) -> Result<([u32; 3], [u32; 3]), GpuError> {
        let gx = g.m().div_ceil(u64::from(self.bm()));
        let gy = g.oc.div_ceil(u64::from(self.bn()));
        if gx > u64::from(i32::MAX as u32) || gy > 65535 {
            return Err(GpuError::Schedule(format!(
                "conv grid ({gx}, {gy}) exceeds CUDA's limits"
            )));
        }
        Ok(([gx as u32, gy as u32, 1], [WARP * self.warps, 1, 1]))
    }
}

/// `name(X: f16, W: f16[, bias: f32][, residual: f32], Y: f32)`; launch with
/// [`ConvMmaSchedule::launch`]. Needs `mma.sync.f16` (sm_80+).
pub fn conv2d_f16_mma(
    name: &str,
    g: &ConvGeom,
    layout: ConvLayout,
    epi: Epilogue,
    s: &ConvMmaSchedule,
    sku: &Sku,
) -> Result<GpuKernel, GpuError> {
    conv2d_mma(name, g, layout, epi, s, sku, MmaInput::F16)
}

/// [`conv2d_f16_mma`] with `X` and `W` of type `input`: f16 (`nvgpu.mma.sync`) or bf16
/// (`nvvm.mma.sync` on the same fragment layout, as the bf16 GEMM: MLIR 22 cannot lower
/// bf16 operands of `nvgpu.mma.sync`). Needs `mma.sync.f16` / `mma.sync.bf16`.
pub fn conv2d_mma(
    name: &str,
    g: &ConvGeom,
    layout: ConvLayout,
    epi: Epilogue,
    s: &ConvMmaSchedule,
    sku: &Sku,
    input: MmaInput,
) -> Result<GpuKernel, GpuError> {
    if input == MmaInput::TF32 {
        return Err(GpuError::Schedule(format!(
            "{name}: the tensor-core conv takes f16 or bf16 inputs"
        )));
    }
    let ti = input.mlir();
    g.validate().map_err(in_kernel(name))?;
    s.validate(sku).map_err(in_kernel(name))?;
    let (bm, bn) = (u64::from(s.bm()), u64::from(s.bn()));
    let threads = u64::from(WARP * s.warps);
    let (oh, ow) = (g.oh(), g.ow());
    let ohw = oh * ow;
    let (m_total, k_total) = (g.m(), g.k());
    let ws = "#gpu.address_space<workgroup>";
    let (a_sh, b_sh) = (
        format!("memref<{}x{ti}, {ws}>", bm * 16),
        format!("memref<{}x{ti}, {ws}>", bn * 16),
    );
    let (h16, f32t) = (dyn_memref(ti), dyn_memref("f32"));
    // The type of `X` in global memory.
    let xt = if s.x_f32 { f32t.clone() } else { h16.clone() };
    let nt = s.n_tiles as usize;

    let mut e = Emitter::new();
    e.line(&format!("%h0 = arith.constant 0.0 : {ti}"));
    e.line("%zacc = arith.constant dense<0.0> : vector<2x2xf32>");
    e.line("%tid = gpu.thread_id x");
    e.line("%bx = gpu.block_id x");
    e.line("%by = gpu.block_id y");
    let m0 = e.ic("muli", "%bx", bm);
    let n0 = e.ic("muli", "%by", bn);
    let warp = e.ic("divui", "%tid", u64::from(WARP));
    let lane = e.ic("remui", "%tid", u64::from(WARP));
    let gq = e.ic("divui", &lane, 4);
    let tq = e.ic("remui", &lane, 4);
    let t2 = e.ic("muli", &tq, 2);
    // Fragment coordinates inside the block tile.
    let wr = e.ic("muli", &warp, 16);
    let ra = e.ii("addi", &wr, &gq);
    let rb = e.ic("addi", &ra, 8);
    let kcols = [
        t2.clone(),
        e.ic("addi", &t2, 1),
        e.ic("addi", &t2, 8),
        e.ic("addi", &t2, 9),
    ];
    let (c0, ck, c16, ct) = (e.idx(0), e.idx(k_total), e.idx(16), e.idx(threads));
    let iter0: Vec<String> = (0..nt).map(|j| format!("%a{j} = %zacc")).collect();
    let acc_types = vec!["vector<2x2xf32>"; nt].join(", ");
    e.line(&format!(
        "%acc:{nt} = scf.for %k0 = {c0} to {ck} step {c16} iter_args({}) -> ({acc_types}) {{",
        iter0.join(", ")
    ));
    // A tile: im2col gather of bm pixels × 16 taps.
    let ca = e.idx(bm * 16);
    e.line(&format!("scf.for %ea = %tid to {ca} step {ct} {{"));
    let (r, c) = match layout {
        ConvLayout::Nchw => (e.ic("remui", "%ea", bm), e.ic("divui", "%ea", bm)),
        ConvLayout::Nhwc => (e.ic("divui", "%ea", 16), e.ic("remui", "%ea", 16)),
    };
    let (ok, addr) = emit_gather(&mut e, g, layout, &m0, &r, &c, "%k0");
    e.line(&format!("%va = scf.if {ok} -> {ti} {{"));
    let v = e.fresh("xl");
    e.line(&format!("{v} = memref.load %X[{addr}] : {xt}"));
    let v = if s.x_f32 {
        let r = e.fresh("xr");
        e.line(&format!("{r} = arith.truncf {v} : f32 to {ti}"));
        r
    } else {
        v
    };
    e.line(&format!("scf.yield {v} : {ti}"));
    e.line("} else {");
    e.line(&format!("scf.yield %h0 : {ti}"));
    e.line("}");
    let si = e.ic("muli", &r, 16);
    let si = e.ii("addi", &si, &c);
    e.line(&format!("memref.store %va, %As[{si}] : {a_sh}"));
    e.line("}");
    // B tile: bn channels × 16 taps of the weights.
    let cb = e.idx(bn * 16);
    e.line(&format!("scf.for %eb = %tid to {cb} step {ct} {{"));
    let c = e.ic("remui", "%eb", 16);
    let r = e.ic("divui", "%eb", 16);
    let gn = e.ii("addi", &n0, &r);
    let gk = e.ii("addi", "%k0", &c);
    let okn = e.cmpc("ult", &gn, g.oc);
    let okk = e.cmpc("ult", &gk, k_total);
    let ok = e.and(&okn, &okk);
    e.line(&format!("%vb = scf.if {ok} -> {ti} {{"));
    let wi = e.ic("muli", &gn, k_total);
    let wi = e.ii("addi", &wi, &gk);
    let v = e.fresh("wl");
    e.line(&format!("{v} = memref.load %W[{wi}] : {h16}"));
    e.line(&format!("scf.yield {v} : {ti}"));
    e.line("} else {");
    e.line(&format!("scf.yield %h0 : {ti}"));
    e.line("}");
    e.line(&format!("memref.store %vb, %Bs[%eb] : {b_sh}"));
    e.line("}");
    e.line("gpu.barrier");
    // A fragment: [0] = (ra; 2t, 2t+1), [1] = (rb; 2t, 2t+1), [2] = (ra; 2t+8, 2t+9),
    // [3] = (rb; 2t+8, 2t+9).
    let mut fa = Vec::new();
    for (row, kk) in [(&ra, 0), (&rb, 0), (&ra, 2), (&rb, 2)] {
        let base = e.ic("muli", row, 16);
        for col in &kcols[kk..kk + 2] {
            let i = e.ii("addi", &base, col);
            let v = e.fresh("fa");
            e.line(&format!("{v} = memref.load %As[{i}] : {a_sh}"));
            fa.push(v);
        }
    }
    // f16: one vector<4x2xf16>; bf16: four i32 registers of two packed values each.
    let a = if input == MmaInput::F16 {
        let a = e.fresh("afrag");
        e.line(&format!(
            "{a} = vector.from_elements {} : vector<4x2xf16>",
            fa.join(", ")
        ));
        a
    } else {
        pack_i32(&mut e, &fa).join(", ")
    };
    let mut out = Vec::new();
    for j in 0..nt {
        // B fragment: [0] = (k 2t, 2t+1; n), [1] = (k 2t+8, 2t+9; n), n = 8j + g.
        let n = e.ic("addi", &gq, 8 * j as u64);
        let base = e.ic("muli", &n, 16);
        let mut fb = Vec::new();
        for col in &kcols {
            let i = e.ii("addi", &base, col);
            let v = e.fresh("fb");
            e.line(&format!("{v} = memref.load %Bs[{i}] : {b_sh}"));
            fb.push(v);
        }
        let d = if input == MmaInput::F16 {
            let b = e.fresh("bfrag");
            e.line(&format!(
                "{b} = vector.from_elements {} : vector<2x2xf16>",
                fb.join(", ")
            ));
            let d = e.fresh("mma");
            e.line(&format!(
                "{d} = nvgpu.mma.sync({a}, {b}, %a{j}) {{mmaShape = [16, 8, 16]}} : (vector<4x2xf16>, vector<2x2xf16>, vector<2x2xf32>) -> vector<2x2xf32>"
            ));
            d
        } else {
            let b = pack_i32(&mut e, &fb).join(", ");
            let cs: Vec<String> = (0..4)
                .map(|q| {
                    let c = e.fresh("c");
                    e.line(&format!(
                        "{c} = vector.extract %a{j}[{}, {}] : f32 from vector<2x2xf32>",
                        q / 2,
                        q % 2
                    ));
                    c
                })
                .collect();
            let st = "!llvm.struct<(f32, f32, f32, f32)>";
            let r = e.fresh("mma");
            e.line(&format!(
                "{r} = nvvm.mma.sync A[{a}] B[{b}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, multiplicandAPtxType = #nvvm.mma_type<bf16>, multiplicandBPtxType = #nvvm.mma_type<bf16>, shape = #nvvm.shape<m = 16, n = 8, k = 16>}} : (i32, i32, f32) -> {st}",
                cs.join(", ")
            ));
            let mut v = "%zacc".to_string();
            for q in 0..4 {
                let x = e.fresh("cx");
                e.line(&format!("{x} = llvm.extractvalue {r}[{q}] : {st}"));
                let nv = e.fresh("cv");
                e.line(&format!(
                    "{nv} = vector.insert {x}, {v} [{}, {}] : f32 into vector<2x2xf32>",
                    q / 2,
                    q % 2
                ));
                v = nv;
            }
            v
        };
        out.push(d);
    }
    e.line("gpu.barrier");
    e.line(&format!("scf.yield {} : {acc_types}", out.join(", ")));
    e.line("}");
    // Epilogue: accumulator [i][c] = (row g + 8i, column 2t + c) of n tile j.
    for (i, row) in [&ra, &rb].into_iter().enumerate() {
        let m = e.ii("addi", &m0, row);
        let okm = e.cmpc("ult", &m, m_total);
        e.line(&format!("scf.if {okm} {{"));
        let base = match layout {
            ConvLayout::Nchw => {
                let nb = e.ic("divui", &m, ohw);
                let p = e.ic("remui", &m, ohw);
                let t = e.ic("muli", &nb, g.oc * ohw);
                e.ii("addi", &t, &p)
            }
            ConvLayout::Nhwc => e.ic("muli", &m, g.oc),
        };
        for j in 0..nt {
            for cc in 0..2u64 {
                let col = e.ic("addi", &t2, 8 * j as u64 + cc);
                let oc = e.ii("addi", &n0, &col);
                let okn = e.cmpc("ult", &oc, g.oc);
                e.line(&format!("scf.if {okn} {{"));
                let at = match layout {
                    ConvLayout::Nchw => {
                        let t = e.ic("muli", &oc, ohw);
                        e.ii("addi", &base, &t)
                    }
                    ConvLayout::Nhwc => e.ii("addi", &base, &oc),
                };
                let v = e.fresh("y");
                e.line(&format!(
                    "{v} = vector.extract %acc#{j}[{i}, {cc}] : f32 from vector<2x2xf32>"
                ));
                let v = epi.emit(&mut e, &v, &oc, &at);
                e.store(&v, "%Y", &at, &f32t, "f32");
                e.line("}");
            }
        }
        e.line("}");
    }
    let mut decls = String::new();
    let mut params = vec![
        KernelParam::Buffer {
            name: "X".into(),
            elem: if s.x_f32 { Elem::F32 } else { input.elem() },
        },
        KernelParam::Buffer {
            name: "W".into(),
            elem: input.elem(),
        },
    ];
    if epi.bias {
        decls.push_str(", %Bias: memref<?xf32>");
    }
    if epi.residual {
        decls.push_str(", %Res: memref<?xf32>");
    }
    params.extend(epi.params());
    params.push(KernelParam::Buffer {
        name: "Y".into(),
        elem: Elem::F32,
    });
    let header = format!(
        "gpu.func @{name}(%X: {xt}, %W: {h16}{decls}, %Y: {f32t}) workgroup(%As : {a_sh} {{llvm.align = 16 : i64}}, %Bs : {b_sh} {{llvm.align = 16 : i64}}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>}} {{"
    );
    Ok(GpuKernel {
        name: name.into(),
        mlir: e.finish(&header),
        params,
        block: [threads as u32, 1, 1],
        shared_bytes: s.shared_bytes(),
        requires: vec![input.feature().into()],
    })
}

/// Packs pairs of 16-bit values (`vals[2i]`, `vals[2i+1]`) into `i32` registers (the low
/// half first, as `mma.sync` reads them).
fn pack_i32(e: &mut Emitter, vals: &[String]) -> Vec<String> {
    vals.chunks(2)
        .map(|p| {
            let v = e.fresh("pk");
            e.line(&format!(
                "{v} = vector.from_elements {}, {} : vector<2xbf16>",
                p[0], p[1]
            ));
            let b = e.fresh("pb");
            e.line(&format!(
                "{b} = vector.bitcast {v} : vector<2xbf16> to vector<1xi32>"
            ));
            let r = e.fresh("pr");
            e.line(&format!(
                "{r} = vector.extract {b}[0] : i32 from vector<1xi32>"
            ));
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::DeviceDb;

    #[test]
    fn mma_conv_schedule_and_ptx() {
        let sku = DeviceDb::builtin()
            .unwrap()
            .parse_target("cuda:sm_80")
            .unwrap();
        let s = ConvMmaSchedule::default();
        assert_eq!((s.bm(), s.bn(), s.shared_bytes()), (64, 32, 3072));
        assert!(ConvMmaSchedule { warps: 0, ..s }.validate(sku).is_err());
        assert_eq!(ConvMmaSchedule::from_config(&s.to_config()), s);
        assert_eq!(ConvMmaSchedule::space().size(), 32);
        let x32 = ConvMmaSchedule { x_f32: true, ..s };
        assert_eq!(ConvMmaSchedule::from_config(&x32.to_config()), x32);
        let g = ConvGeom {
            n: 1,
            c: 5,
            h: 9,
            w: 9,
            oc: 12,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pads: [1, 1, 1, 1],
            dilation: [1, 1],
        };
        assert_eq!(s.launch(&g).unwrap(), ([2, 1, 1], [128, 1, 1]));
        let k = conv2d_f16_mma("cm", &g, ConvLayout::Nhwc, Epilogue::default(), &s, sku).unwrap();
        let ptx = crate::gpu::compile_kernel(&k, sku).unwrap();
        assert!(ptx
            .text
            .contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"));
        let k = conv2d_mma(
            "cmb",
            &g,
            ConvLayout::Nchw,
            Epilogue {
                bias: true,
                residual: true,
                relu: true,
            },
            &s,
            sku,
            MmaInput::BF16,
        )
        .unwrap();
        assert_eq!(k.requires, ["mma.sync.bf16"]);
        let ptx = crate::gpu::compile_kernel(&k, sku).unwrap();
        assert!(ptx
            .text
            .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
        // An f32 X, rounded to bf16 in the kernel (`cvt.rn.bf16.f32`).
        for (input, cvt) in [
            (MmaInput::BF16, "cvt.rn.bf16.f32"),
            (MmaInput::F16, "cvt.rn.f16.f32"),
        ] {
            let k = conv2d_mma(
                "cmx",
                &g,
                ConvLayout::Nchw,
                Epilogue::default(),
                &x32,
                sku,
                input,
            )
            .unwrap();
            assert!(matches!(
                k.params[0],
                KernelParam::Buffer {
                    elem: Elem::F32,
                    ..
                }
            ));
            let ptx = crate::gpu::compile_kernel(&k, sku).unwrap();
            assert!(ptx.text.contains(cvt), "{input:?}: no {cvt}");
        }
        assert!(conv2d_mma(
            "t",
            &g,
            ConvLayout::Nchw,
            Epilogue::default(),
            &s,
            sku,
            MmaInput::TF32
        )
        .is_err());
    }
}
