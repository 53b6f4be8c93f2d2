//! 2-D convolution (groups = 1, f32) as an implicit GEMM, NCHW or NHWC:
//!
//! ```text
//! GEMM view: M = N·OH·OW output pixels, N' = OC output channels, K = C·KH·KW
//!   A[m, k] = X at (pixel m, tap k), gathered on the fly (zero outside the padded image)
//!   B[k, oc] = Wt[oc, k]   (weights [OC, C, KH, KW] for NCHW, [OC, KH, KW, C] for NHWC)
//! block (bx, by) computes the bm×bn tile of (pixels m0.., channels n0..) with
//! (bm/tm)·(bn/tn) threads, each a tm×tn register tile (vector<tn x f32> accumulators)
//! registers r ← this thread's elements of the first A and B tiles (k0 = 0)
//! for k0 in 0..K step bk
//!   store r: A[m0.., k0..] (im2col of bm pixels × bk taps) into shared As[k][m],
//!   Wt[n0.., k0..] into shared Bs[k][n], zero-padded at the edges; barrier
//!   r ← the elements of the next tiles (k0 + bk), in flight during the math
//!   for kk in 0..bk: rank-1 update of the register tile from As[kk][..], Bs[kk][..]
//!   barrier
//! epilogue per output: + bias[oc], + residual (same layout as Y), relu; masked store
//! ```
//!
//! The geometry ([`ConvGeom`]) is compiled in (divisions by constants), the schedule
//! ([`GpuConvSchedule`]) is a parameter of the generator with a [`GpuConvSchedule::space`]
//! for the autotuner. The gather order of `k` follows the layout: `k = (c·KH + kh)·KW + kw`
//! for NCHW (consecutive threads gather consecutive pixels), `k = (kh·KW + kw)·C + c` for
//! NHWC (consecutive threads gather consecutive channels), so both read X coalesced.

use super::emit::{dyn_memref, in_kernel, shared_memref, Emitter};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam, Sku};
use kiln_tune::{Config, Space};

/// Activation layout of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvLayout {
    /// `X[n, c, h, w]`, `Y[n, oc, oh, ow]`, weights `[OC, C, KH, KW]` (ONNX's layout).
    Nchw,
    /// `X[n, h, w, c]`, `Y[n, oh, ow, oc]`, weights `[OC, KH, KW, C]`.
    Nhwc,
}

/// Static shape and attributes of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch.
    pub n: u64,
    /// Input channels.
    pub c: u64,
    /// Input height.
    pub h: u64,
    /// Input width.
    pub w: u64,
    /// Output channels.
    pub oc: u64,
    /// Kernel height.
    pub kh: u64,
    /// Kernel width.
    pub kw: u64,
    /// Strides `(h, w)`.
    pub stride: [u64; 2],
    /// Padding `(top, left, bottom, right)` (ONNX `pads` order).
    pub pads: [u64; 4],
    /// Dilations `(h, w)`.
    pub dilation: [u64; 2],
}

impl ConvGeom {
    /// Output height.
    pub fn oh(&self) -> u64 {
        let span = self.dilation[0] * (self.kh.max(1) - 1) + 1;
        (self.h + self.pads[0] + self.pads[2]).saturating_sub(span) / self.stride[0].max(1) + 1
    }

    /// Output width.
    pub fn ow(&self) -> u64 {
        let span = self.dilation[1] * (self.kw.max(1) - 1) + 1;
        (self.w + self.pads[1] + self.pads[3]).saturating_sub(span) / self.stride[1].max(1) + 1
    }

    /// GEMM rows: output pixels `N·OH·OW`.
    pub fn m(&self) -> u64 {
        self.n * self.oh() * self.ow()
    }

    /// GEMM depth: `C·KH·KW`.
    pub fn k(&self) -> u64 {
        self.c * self.kh * self.kw
    }

    /// Elements of X, W and Y.
    pub fn sizes(&self) -> (u64, u64, u64) {
        (
            self.n * self.c * self.h * self.w,
            self.oc * self.k(),
            self.m() * self.oc,
        )
    }

    /// Checks that every size is positive and the (dilated) kernel fits the padded input.
    pub fn validate(&self) -> Result<(), GpuError> {
        let bad = |why: &str| Err(GpuError::Schedule(format!("conv {self:?}: {why}")));
        let dims = [self.n, self.c, self.h, self.w, self.oc, self.kh, self.kw];
        if dims.contains(&0) || self.stride.contains(&0) || self.dilation.contains(&0) {
            return bad("sizes, strides and dilations must be positive");
        }
        let span_h = self.dilation[0] * (self.kh - 1) + 1;
        let span_w = self.dilation[1] * (self.kw - 1) + 1;
        if span_h > self.h + self.pads[0] + self.pads[2]
            || span_w > self.w + self.pads[1] + self.pads[3]
        {
            return bad("the dilated kernel is larger than the padded input");
        }
        if self.sizes().0.max(self.sizes().2) >= 1 << 40 {
            return bad("tensor too large");
        }
        Ok(())
    }
}

/// What is applied to each accumulator before the store, in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Epilogue {
    /// `+ bias[oc]` (a `[OC]` buffer parameter).
    pub bias: bool,
    /// `+ residual[same index as Y]` (a buffer parameter of Y's shape and layout).
    pub residual: bool,
    /// `max(·, 0)`.
    pub relu: bool,
}

impl Epilogue {
    /// The buffer parameters the epilogue adds after the weights, in order.
    pub fn params(&self) -> Vec<KernelParam> {
        let mut p = Vec::new();
        if self.bias {
            p.push(buf("bias"));
        }
        if self.residual {
            p.push(buf("residual"));
        }
        p
    }

    /// MLIR parameter declarations matching [`Epilogue::params`].
    fn decls(&self) -> String {
        let mut s = String::new();
        if self.bias {
            s.push_str(", %Bias: memref<?xf32>");
        }
        if self.residual {
            s.push_str(", %Res: memref<?xf32>");
        }
        s
    }

    /// Emits the epilogue of accumulator `v` for output channel `oc` at flat output index
    /// `out`; returns the final value.
    pub(crate) fn emit(&self, e: &mut Emitter, v: &str, oc: &str, out: &str) -> String {
        let mut v = v.to_string();
        let ty = dyn_memref("f32");
        if self.bias {
            let b = e.load("%Bias", oc, &ty, "f32");
            v = e.ff("addf", &v, &b);
        }
        if self.residual {
            let r = e.load("%Res", out, &ty, "f32");
            v = e.ff("addf", &v, &r);
        }
        if self.relu {
            let z = e.f32c(0.0);
            v = e.ff("maximumf", &v, &z);
        }
        v
    }
}

fn buf(name: &str) -> KernelParam {
    KernelParam::Buffer {
        name: name.into(),
        elem: Elem::F32,
    }
}

/// Tile sizes of [`conv2d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuConvSchedule {
    /// Output pixels per block.
    pub bm: u32,
    /// Output channels per block.
    pub bn: u32,
    /// Taps (`C·KH·KW`) per shared-memory stage.
    pub bk: u32,
    /// Pixels per thread.
    pub tm: u32,
    /// Output channels per thread: the accumulator vector width.
    pub tn: u32,
}

impl Default for GpuConvSchedule {
    /// 64 pixels × 64 channels per block, bk = 16, 4×4 per thread: 256 threads, 8 KiB.
    fn default() -> Self {
        Self {
            bm: 64,
            bn: 64,
            bk: 16,
            tm: 4,
            tn: 4,
        }
    }
}

impl GpuConvSchedule {
    /// Threads per block: `(bm / tm) · (bn / tn)`.
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm.max(1)) * (self.bn / self.tn.max(1))
    }

    /// Static shared memory in bytes: `4 · bk · (bm + bn)`.
    pub fn shared_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + self.bn)
    }

    /// Checks the schedule against `sku`: positive sizes, thread tiles dividing block tiles,
    /// vector widths of 1, 2, 4 or 8, at most 64 accumulators per thread, the block's
    /// threads, shared memory and (estimated) registers within the SKU's limits.
    pub fn validate(&self, sku: &Sku) -> Result<(), GpuError> {
        let bad = |why: String| Err(GpuError::Schedule(format!("{self:?}: {why}")));
        if [self.bm, self.bn, self.bk, self.tm, self.tn].contains(&0) {
            return bad("tile sizes must be positive".into());
        }
        if !self.bm.is_multiple_of(self.tm) || !self.bn.is_multiple_of(self.tn) {
            return bad("tm must divide bm and tn must divide bn".into());
        }
        if ![1, 2, 4, 8].contains(&self.tn) || ![1, 2, 4, 8].contains(&self.tm) {
            return bad("tm and tn must be 1, 2, 4 or 8".into());
        }
        if self.tm * self.tn > 64 {
            return bad("more than 64 accumulators per thread".into());
        }
        if self.threads() < sku.warp_size || self.threads() > sku.max_threads_per_block {
            return bad(format!(
                "{} threads per block (allowed {}..={} on {})",
                self.threads(),
                sku.warp_size,
                sku.max_threads_per_block,
                sku.name
            ));
        }
        if self.shared_bytes() > sku.shared_mem_per_block {
            return bad(format!(
                "{} B of shared memory (limit {} on {})",
                self.shared_bytes(),
                sku.shared_mem_per_block,
                sku.name
            ));
        }
        // Accumulators + operand vectors + ~40 addressing registers per thread.
        let regs = self.tm * self.tn + self.tm + self.tn + 40;
        if regs * self.threads() > sku.registers_per_block {
            return bad(format!(
                "about {regs} registers × {} threads exceed {} on {}",
                self.threads(),
                sku.registers_per_block,
                sku.name
            ));
        }
        Ok(())
    }

    /// A starting schedule for `g` on `sku` (before tuning): the channel tile follows OC
    /// (16, 32 or 64 channels, so small convolutions do not waste threads), the pixel tile
    /// grows with M (32, 64, 128), 256 threads each with a 16×16 grid of register tiles;
    /// [`GpuConvSchedule::default`] if that is invalid on `sku`.
    pub fn for_geom(g: &ConvGeom, sku: &Sku) -> Self {
        let bn = g.oc.next_power_of_two().clamp(16, 64) as u32;
        let bm = match g.m() {
            m if m >= 8192 => 128,
            m if m >= 512 => 64,
            _ => 32,
        };
        let s = Self {
            bm,
            bn,
            bk: if g.k() >= 32 { 16 } else { 8 },
            tm: bm / 16,
            tn: bn / 16,
        };
        if s.validate(sku).is_ok() {
            s
        } else {
            Self::default()
        }
    }

    /// The autotuner's search space (`bm`, `bn`, `bk`, `tm`, `tn`).
    pub fn space() -> Space {
        super::block_tile_space()
    }

    /// The schedule of a config (missing parameters keep the default; not validated).
    pub fn from_config(c: &Config) -> Self {
        let d = Self::default();
        let get = |k: &str, v: u32| c.get_u32_or(k, v);
        Self {
            bm: get("bm", d.bm),
            bn: get("bn", d.bn),
            bk: get("bk", d.bk),
            tm: get("tm", d.tm),
            tn: get("tn", d.tn),
        }
    }

    /// The config of this schedule.
    pub fn to_config(&self) -> Config {
        Config::from_pairs(&[
            ("bm", i64::from(self.bm)),
            ("bn", i64::from(self.bn)),
            ("bk", i64::from(self.bk)),
            ("tm", i64::from(self.tm)),
            ("tn", i64::from(self.tn)),
        ])
    }

    /// The K slices of the untuned choice for `g` on a GPU with `sms` multiprocessors:
    /// the f32 GEMM's rule ([`super::gemm::split_k_for`]) over this schedule's tiles.
    pub fn split_for(&self, g: &ConvGeom, sms: u32) -> u32 {
        let blocks =
            g.m().div_ceil(u64::from(self.bm.max(1))) * g.oc.div_ceil(u64::from(self.bn.max(1)));
        super::gemm::split_k_for(blocks, g.k().div_ceil(u64::from(self.bk.max(1))), sms)
    }

    /// [`GpuConvSchedule::launch`] of [`conv2d_split_k`]: grid z = `split_k`.
    pub fn launch_split(
        &self,
        g: &ConvGeom,
        split_k: u32,
    ) -> Result<([u32; 3], [u32; 3]), GpuError> {
        let ([gx, gy, _], block) = self.launch(g)?;
        Ok(([gx, gy, split_k.max(1)], block))
    }

    /// Launch geometry for `g`: grid `(ceil(M / bm), ceil(OC / bn), 1)`, block
    /// `(threads, 1, 1)`; an error when the grid exceeds CUDA's limits.
    pub fn launch(&self, g: &ConvGeom) -> Result<([u32; 3], [u32; 3]), GpuError> {
        let gx = g.m().div_ceil(u64::from(self.bm.max(1)));
        let gy = g.oc.div_ceil(u64::from(self.bn.max(1)));
        if gx > u64::from(i32::MAX as u32) || gy > 65535 {
            return Err(GpuError::Schedule(format!(
                "conv grid ({gx}, {gy}) exceeds CUDA's limits"
            )));
        }
        Ok(([gx as u32, gy as u32, 1], [self.threads(), 1, 1]))
    }
}

/// `name(X, W[, bias][, residual], Y: memref<?xf32>)`: `Y = epi(conv(X, W))` for the static
/// geometry `g` in `layout`; launch with [`GpuConvSchedule::launch`].
pub fn conv2d(
    name: &str,
    g: &ConvGeom,
    layout: ConvLayout,
    epi: Epilogue,
    s: &GpuConvSchedule,
    sku: &Sku,
) -> Result<GpuKernel, GpuError> {
    generate(name, g, layout, epi, s, 1, sku)
}

/// [`conv2d`] with the reduction (`C·KH·KW`) split over `split_k` blocks along z, each
/// adding its partial sums into `Y` atomically (`name(X, W, Y)`, NCHW, no epilogue: the
/// caller zeroes `Y` first and applies bias and activation after); launch with
/// [`GpuConvSchedule::launch_split`]. For convolutions whose output tiles do not fill the
/// SMs (late CNN stages at batch 1), whose blocks otherwise run hundreds of K steps one
/// after another.
pub fn conv2d_split_k(
    name: &str,
    g: &ConvGeom,
    s: &GpuConvSchedule,
    split_k: u32,
    sku: &Sku,
) -> Result<GpuKernel, GpuError> {
    if !(2..=16).contains(&split_k) {
        return Err(GpuError::Schedule(format!(
            "{name}: split_k {split_k} (2 to 16)"
        )));
    }
    generate(
        name,
        g,
        ConvLayout::Nchw,
        Epilogue::default(),
        s,
        split_k,
        sku,
    )
}

fn generate(
    name: &str,
    g: &ConvGeom,
    layout: ConvLayout,
    epi: Epilogue,
    s: &GpuConvSchedule,
    split_k: u32,
    sku: &Sku,
) -> Result<GpuKernel, GpuError> {
    g.validate().map_err(in_kernel(name))?;
    s.validate(sku).map_err(in_kernel(name))?;
    let GpuConvSchedule { bm, bn, bk, tm, tn } = *s;
    let (bm, bn, bk, tm, tn) = (
        u64::from(bm),
        u64::from(bn),
        u64::from(bk),
        u64::from(tm),
        u64::from(tn),
    );
    let threads = s.threads();
    let (oh, ow) = (g.oh(), g.ow());
    let (m_total, k_total) = (g.m(), g.k());
    let ohw = oh * ow;
    let (a_sh, b_sh) = (shared_memref(bk * bm), shared_memref(bk * bn));
    let gty = dyn_memref("f32");
    let vt = format!("vector<{tn}xf32>");
    let va = format!("vector<{tm}xf32>");
    let acc_types = vec![vt.clone(); tm as usize].join(", ");

    let mut e = Emitter::new();
    let tid = "%tid";
    e.line("%tid = gpu.thread_id x");
    e.line("%bx = gpu.block_id x");
    e.line("%by = gpu.block_id y");
    let m0 = e.ic("muli", "%bx", bm);
    let n0 = e.ic("muli", "%by", bn);
    // NCHW stores are contiguous along pixels: make the pixel index the fast thread index.
    let (tx, ty) = match layout {
        ConvLayout::Nhwc => (e.ic("remui", tid, bn / tn), e.ic("divui", tid, bn / tn)),
        ConvLayout::Nchw => (e.ic("divui", tid, bm / tm), e.ic("remui", tid, bm / tm)),
    };
    let row_t = e.ic("muli", &ty, tm);
    let col_t = e.ic("muli", &tx, tn);
    let zv = e.fresh("zv");
    e.line(&format!("{zv} = arith.constant dense<0.0> : {vt}"));
    let zero = e.f32c(0.0);
    let (c0, ck, cbk) = (e.idx(0), e.idx(k_total), e.idx(bk));
    // This block's range of K: all of it, or with split_k its slice of whole bk tiles.
    let (k_lo, k_hi) = if split_k > 1 {
        let per = k_total.div_ceil(bk).div_ceil(u64::from(split_k)) * bk;
        e.line("%bz = gpu.block_id z");
        let lo = e.ic("muli", "%bz", per);
        let hi = e.ic("addi", &lo, per);
        let hi = e.ii("minui", &hi, &ck);
        (lo, hi)
    } else {
        (c0.clone(), ck.clone())
    };
    // The thread's tile copies: element `tid + j·threads` of the A tile (bm×bk, im2col)
    // and of the B tile (bk×bn, weights); index arithmetic independent of k here, once.
    let t = u64::from(threads);
    let mut a_cp = Vec::new();
    for j in 0..(bm * bk).div_ceil(t) {
        let ea = e.ic("addi", tid, j * t);
        let (r, c) = match layout {
            ConvLayout::Nchw => (e.ic("remui", &ea, bm), e.ic("divui", &ea, bm)),
            ConvLayout::Nhwc => (e.ic("divui", &ea, bk), e.ic("remui", &ea, bk)),
        };
        let inside = ((j + 1) * t > bm * bk).then(|| e.cmpc("ult", &ea, bm * bk));
        let si = e.ic("muli", &c, bm);
        let si = e.ii("addi", &si, &r);
        a_cp.push(TileCopy {
            r,
            c,
            inside,
            si,
            ok: String::new(),
            row: String::new(),
        });
    }
    let mut b_cp = Vec::new();
    for j in 0..(bn * bk).div_ceil(t) {
        let eb = e.ic("addi", tid, j * t);
        let c = e.ic("remui", &eb, bk);
        let r = e.ic("divui", &eb, bk);
        let gn = e.ii("addi", &n0, &r);
        let mut ok = e.cmpc("ult", &gn, g.oc);
        let inside = ((j + 1) * t > bn * bk).then(|| e.cmpc("ult", &eb, bn * bk));
        if let Some(i) = &inside {
            ok = e.and(&ok, i);
        }
        let row = e.ic("muli", &gn, k_total);
        let si = e.ic("muli", &c, bn);
        let si = e.ii("addi", &si, &r);
        b_cp.push(TileCopy {
            r,
            c,
            inside,
            si,
            ok,
            row,
        });
    }
    // Every copy of the tiles at k offset `kx` into registers: all loads are issued before
    // any is stored, and the loop loads the next tiles before its math (one load and its
    // dependent store per loop iteration serialised their latencies).
    let load_tiles = |e: &mut Emitter, kx: &str| -> Vec<String> {
        let mut vals = Vec::new();
        for cp in &a_cp {
            let (mut ok, addr) = emit_gather(e, g, layout, &m0, &cp.r, &cp.c, kx);
            if let Some(i) = &cp.inside {
                ok = e.and(&ok, i);
            }
            vals.push(load_or_zero(e, &ok, "%X", &addr, &gty, &zero));
        }
        for cp in &b_cp {
            let gk = e.ii("addi", kx, &cp.c);
            let okk = e.cmpc("ult", &gk, k_total);
            let ok = e.and(&cp.ok, &okk);
            let wi = e.ii("addi", &cp.row, &gk);
            vals.push(load_or_zero(e, &ok, "%W", &wi, &gty, &zero));
        }
        vals
    };
    let first = load_tiles(&mut e, &k_lo);
    let regs: Vec<String> = first.iter().map(|_| e.fresh("p")).collect();
    let iter0 = (0..tm)
        .map(|i| format!("%a{i} = {zv}"))
        .chain(regs.iter().zip(&first).map(|(p, f)| format!("{p} = {f}")))
        .collect::<Vec<_>>()
        .join(", ");
    let loop_types = format!("{acc_types}{}", ", f32".repeat(regs.len()));
    e.line(&format!(
        "%acc:{} = scf.for %k0 = {k_lo} to {k_hi} step {cbk} iter_args({iter0}) -> ({loop_types}) {{",
        tm as usize + regs.len()
    ));
    let shared = a_cp
        .iter()
        .map(|cp| (cp, "%As", &a_sh))
        .chain(b_cp.iter().map(|cp| (cp, "%Bs", &b_sh)));
    for ((cp, sh, ty), p) in shared.zip(&regs) {
        let store = format!("memref.store {p}, {sh}[{}] : {ty}", cp.si);
        match &cp.inside {
            Some(i) => {
                e.line(&format!("scf.if {i} {{"));
                e.line(&store);
                e.line("}");
            }
            None => e.line(&store),
        }
    }
    e.line("gpu.barrier");
    let kn = e.ii("addi", "%k0", &cbk);
    let next = load_tiles(&mut e, &kn);
    // Rank-1 updates from shared memory.
    let iter1 = (0..tm)
        .map(|i| format!("%b{i} = %a{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let c1 = e.idx(1);
    e.line(&format!(
        "%inner:{tm} = scf.for %kk = {c0} to {cbk} step {c1} iter_args({iter1}) -> ({acc_types}) {{"
    ));
    let bo = e.ic("muli", "%kk", bn);
    let bo = e.ii("addi", &bo, &col_t);
    let bv = e.fresh("bv");
    e.line(&format!("{bv} = vector.load %Bs[{bo}] : {b_sh}, {vt}"));
    let ao = e.ic("muli", "%kk", bm);
    let ao = e.ii("addi", &ao, &row_t);
    let av = e.fresh("av");
    e.line(&format!("{av} = vector.load %As[{ao}] : {a_sh}, {va}"));
    let mut f = Vec::new();
    for i in 0..tm {
        let (x, xb, fi) = (e.fresh("ae"), e.fresh("ab"), e.fresh("f"));
        e.line(&format!("{x} = vector.extract {av}[{i}] : f32 from {va}"));
        e.line(&format!("{xb} = vector.broadcast {x} : f32 to {vt}"));
        e.line(&format!("{fi} = vector.fma {xb}, {bv}, %b{i} : {vt}"));
        f.push(fi);
    }
    e.line(&format!("scf.yield {} : {acc_types}", f.join(", ")));
    e.line("}");
    e.line("gpu.barrier");
    let inner = (0..tm)
        .map(|i| format!("%inner#{i}"))
        .chain(next)
        .collect::<Vec<_>>()
        .join(", ");
    e.line(&format!("scf.yield {inner} : {loop_types}"));
    e.line("}");
    // Epilogue and masked stores.
    let mrow = e.ii("addi", &m0, &row_t);
    let ncol = e.ii("addi", &n0, &col_t);
    for i in 0..tm {
        let m = e.ic("addi", &mrow, i);
        let okm = e.cmpc("ult", &m, m_total);
        e.line(&format!("scf.if {okm} {{"));
        // NCHW: Y[(nb·OC + oc)·OHW + p]; NHWC: Y[m·OC + oc].
        let base = match layout {
            ConvLayout::Nchw => {
                let nb = e.ic("divui", &m, ohw);
                let p = e.ic("remui", &m, ohw);
                let t = e.ic("muli", &nb, g.oc * ohw);
                e.ii("addi", &t, &p)
            }
            ConvLayout::Nhwc => e.ic("muli", &m, g.oc),
        };
        for j in 0..tn {
            let oc = e.ic("addi", &ncol, j);
            let okn = e.cmpc("ult", &oc, g.oc);
            e.line(&format!("scf.if {okn} {{"));
            let out = match layout {
                ConvLayout::Nchw => {
                    let t = e.ic("muli", &oc, ohw);
                    e.ii("addi", &base, &t)
                }
                ConvLayout::Nhwc => e.ii("addi", &base, &oc),
            };
            let v = e.fresh("y");
            e.line(&format!(
                "{v} = vector.extract %acc#{i}[{j}] : f32 from {vt}"
            ));
            if split_k > 1 {
                let old = e.fresh("old");
                e.line(&format!(
                    "{old} = memref.atomic_rmw addf {v}, %Y[{out}] : (f32, {gty}) -> f32"
                ));
            } else {
                let v = epi.emit(&mut e, &v, &oc, &out);
                e.store(&v, "%Y", &out, &gty, "f32");
            }
            e.line("}");
        }
        e.line("}");
    }
    let header = format!(
        "gpu.func @{name}(%X: memref<?xf32>, %W: memref<?xf32>{}, %Y: memref<?xf32>) workgroup(%As : {a_sh} {{llvm.align = 16 : i64}}, %Bs : {b_sh} {{llvm.align = 16 : i64}}) kernel attributes {{known_block_size = array<i32: {threads}, 1, 1>, nvvm.maxnreg = {} : i32}} {{",
        epi.decls(),
        register_budget(threads, sku)
    );
    let mut params = vec![buf("X"), buf("W")];
    params.extend(epi.params());
    params.push(buf("Y"));
    Ok(GpuKernel {
        name: name.into(),
        mlir: e.finish(&header),
        params,
        block: [threads, 1, 1],
        shared_bytes: s.shared_bytes(),
        requires: vec![],
    })
}

/// One element a thread copies into a shared tile: tile row and column (`r`, `c`), the
/// shared index `si`, `inside` when the element may fall past the tile's end; for B, `ok`
/// (its output channel exists) and `row` (the weights' row start).
struct TileCopy {
    r: String,
    c: String,
    inside: Option<String>,
    si: String,
    ok: String,
    row: String,
}

/// The registers a thread of a `threads`-wide block may use (`nvvm.maxnreg`): what lets one
/// block fit the SKU's register file (at most 255, PTX's limit). Without it ptxas kept the
/// prefetching conv at 64 registers and spilled (it takes 96 when allowed).
fn register_budget(threads: u32, sku: &Sku) -> u32 {
    (sku.registers_per_block / threads.max(1)).min(255)
}

/// `buf[i]` when `ok`, else `zero` (an `scf.if` yielding f32).
fn load_or_zero(e: &mut Emitter, ok: &str, buf: &str, i: &str, ty: &str, zero: &str) -> String {
    let v = e.fresh("ld");
    e.line(&format!("{v} = scf.if {ok} -> f32 {{"));
    let l = e.load(buf, i, ty, "f32");
    e.line(&format!("scf.yield {l} : f32"));
    e.line("} else {");
    e.line(&format!("scf.yield {zero} : f32"));
    e.line("}");
    v
}

/// The im2col gather of the implicit-GEMM convs ([`conv2d`], `conv_mma`): for element
/// `(r, c)` of the A tile of the block whose first output pixel is `m0` (row `r` = pixel,
/// column `c` = reduction index past `k0`, an index value), whether it reads inside the (unpadded) input
/// (`i1`) and the flat index of the element it reads (meaningful only where it does).
pub(crate) fn emit_gather(
    e: &mut Emitter,
    g: &ConvGeom,
    layout: ConvLayout,
    m0: &str,
    r: &str,
    c: &str,
    k0: &str,
) -> (String, String) {
    let (ow, ohw) = (g.ow(), g.oh() * g.ow());
    let gm = e.ii("addi", m0, r);
    let gk = e.ii("addi", k0, c);
    let okm = e.cmpc("ult", &gm, g.m());
    let okk = e.cmpc("ult", &gk, g.k());
    let mut ok = e.and(&okm, &okk);
    let nb = e.ic("divui", &gm, ohw);
    let p = e.ic("remui", &gm, ohw);
    let oy = e.ic("divui", &p, ow);
    let ox = e.ic("remui", &p, ow);
    let (ch, khi, kwi) = match layout {
        ConvLayout::Nchw => {
            let ch = e.ic("divui", &gk, g.kh * g.kw);
            let q = e.ic("remui", &gk, g.kh * g.kw);
            (ch, e.ic("divui", &q, g.kw), e.ic("remui", &q, g.kw))
        }
        ConvLayout::Nhwc => {
            let ch = e.ic("remui", &gk, g.c);
            let q = e.ic("divui", &gk, g.c);
            (ch, e.ic("divui", &q, g.kw), e.ic("remui", &q, g.kw))
        }
    };
    // Padded coordinates: ih + pad_top = oy·sh + kh·dh (never negative).
    let ys = e.ic("muli", &oy, g.stride[0]);
    let yk = e.ic("muli", &khi, g.dilation[0]);
    let yp = e.ii("addi", &ys, &yk);
    let xs = e.ic("muli", &ox, g.stride[1]);
    let xk = e.ic("muli", &kwi, g.dilation[1]);
    let xp = e.ii("addi", &xs, &xk);
    if g.pads.iter().any(|&p| p > 0) {
        for (v, lo, len) in [(&yp, g.pads[0], g.h), (&xp, g.pads[1], g.w)] {
            let a = e.cmpc("uge", v, lo);
            let b = e.cmpc("ult", v, lo + len);
            let ab = e.and(&a, &b);
            ok = e.and(&ok, &ab);
        }
    }
    let iy = e.ic("subi", &yp, g.pads[0]);
    let ix = e.ic("subi", &xp, g.pads[1]);
    let addr = match layout {
        ConvLayout::Nchw => {
            let t = e.ic("muli", &nb, g.c);
            let t = e.ii("addi", &t, &ch);
            let t = e.ic("muli", &t, g.h);
            let t = e.ii("addi", &t, &iy);
            let t = e.ic("muli", &t, g.w);
            e.ii("addi", &t, &ix)
        }
        ConvLayout::Nhwc => {
            let t = e.ic("muli", &nb, g.h);
            let t = e.ii("addi", &t, &iy);
            let t = e.ic("muli", &t, g.w);
            let t = e.ii("addi", &t, &ix);
            let t = e.ic("muli", &t, g.c);
            e.ii("addi", &t, &ch)
        }
    };
    (ok, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_output_tiles_split_the_reduction() {
        let g = |c: u64, oc: u64, hw: u64| ConvGeom {
            n: 1,
            c,
            h: hw,
            w: hw,
            oc,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pads: [1, 1, 1, 1],
            dilation: [1, 1],
        };
        let sku = crate::gpu::DeviceDb::builtin()
            .unwrap()
            .parse_target("cuda:h100")
            .unwrap();
        let split = |g: &ConvGeom| GpuConvSchedule::for_geom(g, sku).split_for(g, 132);
        // VGG's 14×14 512→512: 56 blocks, 288 steps -> 4 slices (224 blocks)
        assert_eq!(split(&g(512, 512, 14)), 4);
        // ResNet's 7×7 512→512: 8 blocks -> 8 slices
        assert_eq!(split(&g(512, 512, 7)), 8);
        // ResNet's 56×56 64→64: 49 blocks, 36 steps -> 4 slices; 64→256 fills the SMs;
        // 16 input channels are too few steps
        assert_eq!(split(&g(64, 64, 56)), 4);
        assert_eq!(split(&g(64, 256, 56)), 1);
        assert_eq!(split(&g(16, 64, 7)), 1);
    }
    use crate::gpu::DeviceDb;

    fn geom() -> ConvGeom {
        ConvGeom {
            n: 2,
            c: 3,
            h: 9,
            w: 7,
            oc: 5,
            kh: 3,
            kw: 2,
            stride: [2, 1],
            pads: [1, 0, 1, 1],
            dilation: [1, 2],
        }
    }

    #[test]
    fn geometry_and_launch() {
        let g = geom();
        // (9 + 2 - 3) / 2 + 1 = 5; (7 + 1 - 3) / 1 + 1 = 6.
        assert_eq!((g.oh(), g.ow(), g.m(), g.k()), (5, 6, 60, 18));
        let s = GpuConvSchedule::default();
        assert_eq!(s.launch(&g).unwrap(), ([1, 1, 1], [256, 1, 1]));
        let bad = ConvGeom { kh: 20, ..g };
        assert!(bad.validate().is_err());
        let sku = DeviceDb::builtin()
            .unwrap()
            .parse_target("cuda:sm_80")
            .unwrap();
        let e = conv2d(
            "bad_conv",
            &bad,
            ConvLayout::Nchw,
            Epilogue::default(),
            &s,
            sku,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("kernel 'bad_conv'") && e.contains("larger than"),
            "{e}"
        );
        assert!(ConvGeom {
            stride: [0, 1],
            ..g
        }
        .validate()
        .is_err());
    }

    #[test]
    fn schedules_are_validated_per_sku() {
        let sku = DeviceDb::builtin()
            .unwrap()
            .parse_target("cuda:sm_80")
            .unwrap();
        let d = GpuConvSchedule::default();
        d.validate(sku).unwrap();
        for bad in [
            GpuConvSchedule { bk: 0, ..d },
            GpuConvSchedule { tm: 3, ..d },
            GpuConvSchedule {
                tn: 16,
                bn: 128,
                ..d
            },
            GpuConvSchedule {
                bm: 128,
                bn: 128,
                tm: 1,
                tn: 1,
                ..d
            },
            GpuConvSchedule {
                bm: 128,
                bn: 128,
                bk: 64,
                ..d
            },
        ] {
            assert!(bad.validate(sku).is_err(), "{bad:?}");
        }
        let space = GpuConvSchedule::space();
        let valid = space_configs(&space)
            .into_iter()
            .filter(|c| GpuConvSchedule::from_config(c).validate(sku).is_ok())
            .count();
        assert!(valid > 50, "{valid} valid schedules");
        assert_eq!(GpuConvSchedule::from_config(&d.to_config()), d);
    }

    #[test]
    fn schedule_for_geometry_is_valid_everywhere() {
        let db = DeviceDb::builtin().unwrap();
        let base = geom();
        for (oc, h, k) in [
            (5, 9, 3),
            (64, 56, 3),
            (256, 14, 1),
            (1000, 1, 1),
            (32, 224, 7),
        ] {
            let g = ConvGeom {
                oc,
                h,
                w: h,
                kh: k,
                kw: k,
                pads: [k / 2; 4],
                stride: [1, 1],
                dilation: [1, 1],
                ..base
            };
            for sku in db.skus() {
                let s = GpuConvSchedule::for_geom(&g, sku);
                s.validate(sku).unwrap();
                assert_eq!(s.threads(), 256, "{s:?}");
                if oc <= 16 {
                    assert_eq!(s.bn, 16);
                }
            }
        }
    }

    fn space_configs(space: &Space) -> Vec<Config> {
        let mut out = vec![Config::default()];
        for p in &space.params {
            out = out
                .into_iter()
                .flat_map(|c| {
                    p.choices.iter().map(move |&v| {
                        let mut c = c.clone();
                        c.0.insert(p.name.clone(), v);
                        c
                    })
                })
                .collect();
        }
        out
    }

    #[test]
    fn conv_lowers_to_ptx_both_layouts() {
        let sku = DeviceDb::builtin()
            .unwrap()
            .parse_target("cuda:sm_80")
            .unwrap();
        for layout in [ConvLayout::Nchw, ConvLayout::Nhwc] {
            let epi = Epilogue {
                bias: true,
                residual: true,
                relu: true,
            };
            let k = conv2d("c", &geom(), layout, epi, &GpuConvSchedule::default(), sku).unwrap();
            assert_eq!(k.params.len(), 5);
            let ptx =
                crate::gpu::compile_kernel(&k, sku).unwrap_or_else(|e| panic!("{e}\n{}", k.mlir));
            assert!(ptx.text.contains(".entry c("));
        }
    }
}
