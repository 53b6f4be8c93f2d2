//! `Contraction` kernels whose contraction is a 2-D `Conv` (NCHW, f32, static shapes, any
//! stride/padding/dilation/group), with a bias and a fused elementwise epilogue. The
//! algorithm and its tile sizes are a [`ConvSchedule`] (the default picks them from the
//! shape).
//!
//! * Direct convolution ([`ConvAlgo::Direct`], every group count, depthwise included): per
//!   image, the input is copied once into a zero-padded buffer split by stride phase
//!   (`Xp[c][row % s][col % s][hq][wq]`, see [`Grid`]; strided rows are deinterleaved with
//!   vector shuffles), so that every tap `(ki, kj)` of a run of output positions is a
//!   unit-stride vector load at a constant offset. The positions of an output channel are
//!   the flattened `OH × wq` grid (`wq` = `OW` + the taps' reach); a register tile holds
//!   `mr` output channels × `nv` vectors of 8 positions (16 on AVX-512 targets, with the
//!   taller tiles 32 registers allow: [`ConvSchedule::tile_lanes`]) and accumulates
//!   `Σ_{c, ki, kj} w[o, c, ki, kj] · Xp[...]` with broadcast weights and `vector.fma`. Bias
//!   and epilogue (Relu, Clip, HardSwish, `+`/`·` a scalar or a same-shape buffer) are applied
//!   to the accumulators before the store (the filter is read packed by
//!   [`pack_direct_filter`] when the kernel is fully fused); when grid rows are wider than
//!   output rows, tiles are parked in an L1-sized block buffer and written out (pad columns
//!   dropped) once the channel block is done. A 1×1 unit-stride unpadded conv whose positions fill whole tiles
//!   reads its input in place.
//! * Channel-vector form (`group = 1`, few output positions whose direct tiles would leave
//!   lanes idle: 2×2, 4×4 outputs, see [`ConvSchedule::chan_max_positions`]): lanes over 8
//!   output channels, positions in registers, padding taps skipped at compile time (see
//!   [`emit_chan`]); the filter is packed at compile time ([`pack_chan_filter`]).
//! * Winograd F(2×2, 3×3) (`group = 1`, 3×3 stride 1, enough channels and positions, see
//!   [`ConvSchedule::winograd_min_channels`]; 16-lane vectors on AVX-512 targets, like the
//!   direct form): filter transformed at compile time
//!   ([`pack_winograd_filter`]), input/output transforms on 8-tile vectors, the 16 products
//!   with the direct form's register tile (see [`emit_winograd`]).
//! * Dot-product form (`group = 1`, at most [`ConvSchedule::dot_max_positions`] output
//!   positions, grid lanes mostly idle, where the channel-vector form does not apply): patches gathered into `cols[P][K]`, lanes over the
//!   reduction `K = C·kh·kw` (see [`emit_dot`]).
//! * [`ConvAlgo::Im2colGemm`] (`group = 1`): im2col into `cols[Cin·kh·kw, OH·OW]` + the packed
//!   matmul of [`crate::cpu::matmul`]; a 1×1 unit-stride unpadded conv skips the unfolding.
//!
//! Filters repacked or transformed at compile time are the kernel's derived constants
//! ([`super::DerivedConst`], passed after its inputs; the graph filter is then not an input).
//!
//! Epilogues made of other nodes, or kernels with more than one output, run the conv (+ bias)
//! first and then the epilogue as one `linalg.generic` over the output, in place, like
//! [`super::contraction`] does for `MatMul`; those kernels are serial. Fused kernels split
//! into tasks (`KernelSignature::tasks`): one per (image, group, block of `mr` output
//! channels); each call copies the input channels it needs.

use super::elementwise::InputKind;
use super::elementwise::{classify_input, emit_generic, Body, GenericInput, GenericOutput};
use super::{DerivedConst, Lowered, SymDims, Ty, GRAPH_KERNEL_PIPELINE};
use crate::cpu::abi::{Dim as PDim, Prologue, Scratch};
use crate::cpu::matmul::{matmul_memref_func, packed_lens, MatmulSchedule, PACKED_1D, STRIDED_2D};
use crate::cpu::{Kernel, KernelSignature};
use kiln_ir::ops::elementwise::{BinaryKind, ClipBounds, ElementwiseOp, UnaryKind};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{DType, Dim, Graph, Op, ValueId};
use kiln_passes::fusion;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Loop-nest text with fresh SSA names and index constants hoisted to the function body.
#[derive(Debug, Default)]
pub(crate) struct Loops {
    /// Constant definitions (emitted before [`Loops::text`]).
    consts: String,
    cache: HashMap<String, String>,
    /// The loop nest.
    pub(crate) text: String,
    next: usize,
    /// The kernel's scratch buffers (views defined with the constants).
    scratch: Scratch,
    /// f32 lanes of the vectors of [`emit_direct`], [`emit_chan`], [`emit_winograd`] and the
    /// helpers they call ([`Loops::vt`]); 0 means [`VW`]. The dot form keeps 8-lane vectors.
    vw: usize,
}

impl Loops {
    /// f32 lanes of the direct form's vectors (see [`Loops::vw`]).
    pub(crate) fn lanes(&self) -> usize {
        if self.vw == 0 {
            VW
        } else {
            self.vw
        }
    }

    /// The vector type of [`Loops::lanes`] f32.
    pub(crate) fn vt(&self) -> String {
        format!("vector<{}xf32>", self.lanes())
    }

    /// The mask type of [`Loops::vt`].
    pub(crate) fn mt(&self) -> String {
        format!("vector<{}xi1>", self.lanes())
    }

    /// A fresh SSA name `%<stem>N`.
    pub(crate) fn fresh(&mut self, stem: &str) -> String {
        self.next += 1;
        format!("%lp_{stem}{}", self.next)
    }

    /// Emits `%xN = rhs` and returns `%xN`.
    pub(crate) fn op(&mut self, rhs: &str) -> String {
        let v = self.fresh("x");
        let _ = writeln!(self.text, "  {v} = {rhs}");
        v
    }

    /// Emits a line as is.
    pub(crate) fn line(&mut self, l: &str) {
        let _ = writeln!(self.text, "  {l}");
    }

    /// A hoisted constant of type `ty` with literal `lit`.
    fn konst(&mut self, lit: &str, ty: &str) -> String {
        let key = format!("{lit}:{ty}");
        if let Some(v) = self.cache.get(&key) {
            return v.clone();
        }
        self.next += 1;
        let v = format!("%lp_k{}", self.next);
        let _ = writeln!(self.consts, "  {v} = arith.constant {lit} : {ty}");
        self.cache.insert(key, v.clone());
        v
    }

    /// An `index` constant.
    pub(crate) fn c(&mut self, x: i64) -> String {
        self.konst(&x.to_string(), "index")
    }

    /// An `f32` constant (bit-exact).
    pub(crate) fn f(&mut self, x: f32) -> String {
        self.konst(&format!("0x{:08X}", x.to_bits()), "f32")
    }

    /// Opens `scf.for %i = 0 to n step 1` and returns `%i`.
    pub(crate) fn open(&mut self, n: usize) -> String {
        let (z, one, hi) = (self.c(0), self.c(1), self.c(n as i64));
        let i = self.fresh("i");
        self.line(&format!("scf.for {i} = {z} to {hi} step {one} {{"));
        i
    }

    /// Opens `scf.for %i = lo to hi step step` with `index` SSA bounds and returns `%i`.
    pub(crate) fn open_dyn(&mut self, lo: &str, hi: &str, step: usize) -> String {
        let st = self.c(step as i64);
        let i = self.fresh("i");
        self.line(&format!("scf.for {i} = {lo} to {hi} step {st} {{"));
        i
    }

    /// `min(a, b)` on `index` values (signed).
    pub(crate) fn min(&mut self, a: &str, b: &str) -> String {
        self.op(&format!("arith.minsi {a}, {b} : index"))
    }

    /// `max(a, b)` on `index` values (signed).
    pub(crate) fn max(&mut self, a: &str, b: &str) -> String {
        self.op(&format!("arith.maxsi {a}, {b} : index"))
    }

    /// Opens `scf.for %i = 0 to n step 1 iter_args(%a = init) -> f32`; returns `(%i, %a,
    /// %r)`, `%r` being the loop's result once [`Loops::close_acc`] closes it.
    pub(crate) fn open_acc(&mut self, n: usize, init: &str) -> (String, String, String) {
        let (z, one, hi) = (self.c(0), self.c(1), self.c(n as i64));
        let i = self.fresh("i");
        let a = self.fresh("a");
        let r = self.fresh("r");
        self.line(&format!(
            "{r} = scf.for {i} = {z} to {hi} step {one} iter_args({a} = {init}) -> (f32) {{"
        ));
        (i, a, r)
    }

    /// Closes an accumulating loop (see [`Loops::open_acc`]) yielding `v`.
    pub(crate) fn close_acc(&mut self, v: &str) {
        self.line(&format!("scf.yield {v} : f32\n  }}"));
    }

    /// Closes a loop.
    pub(crate) fn close(&mut self) {
        self.line("}");
    }

    /// `a * x + b` on `index` values with constants `x`, `b`.
    pub(crate) fn affine(&mut self, a: &str, x: i64, b: i64) -> String {
        let mut v = a.to_string();
        if x != 1 {
            let c = self.c(x);
            v = self.op(&format!("arith.muli {v}, {c} : index"));
        }
        if b != 0 {
            let c = self.c(b);
            v = self.op(&format!("arith.addi {v}, {c} : index"));
        }
        v
    }

    /// `a + b` on `index` values.
    pub(crate) fn add(&mut self, a: &str, b: &str) -> String {
        self.op(&format!("arith.addi {a}, {b} : index"))
    }

    /// `0 <= v < n` (signed) as an `i1`.
    pub(crate) fn in_range(&mut self, v: &str, n: usize) -> String {
        let (z, hi) = (self.c(0), self.c(n as i64));
        let lo = self.op(&format!("arith.cmpi sge, {v}, {z} : index"));
        let up = self.op(&format!("arith.cmpi slt, {v}, {hi} : index"));
        self.op(&format!("arith.andi {lo}, {up} : i1"))
    }

    /// A `memref<?xf32>` of `len` elements in the kernel's scratch memory (see
    /// [`crate::cpu::abi`]), defined with the hoisted constants; its contents are garbage on
    /// entry. Kernels built with `Loops` take every temporary buffer from here.
    pub(crate) fn scratch(&mut self, len: usize) -> String {
        let (text, m) = self.scratch.view(&[len], "f32", 4);
        self.consts.push_str(&text);
        m
    }

    /// Scratch bytes one call needs for the buffers of [`Loops::scratch`].
    pub(crate) fn scratch_bytes(&self) -> u64 {
        self.scratch.bytes()
    }

    /// The constants followed by the loop nest.
    pub(crate) fn finish(self) -> String {
        self.consts + &self.text
    }
}

/// Geometry of a 2-D sliding window over a static NCHW input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window2 {
    /// Batch, channels, height, width of the input.
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    /// Output height and width.
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    /// Kernel, strides, dilations, begin pads (height, width).
    pub(crate) k: [usize; 2],
    pub(crate) s: [usize; 2],
    pub(crate) d: [usize; 2],
    pub(crate) p: [i64; 2],
}

impl Window2 {
    /// The window of `attrs` over input `x` with kernel `k`.
    pub(crate) fn new(
        attrs: &kiln_ir::ops::nn::WindowAttrs,
        x: &[usize],
        k: [usize; 2],
        ceil_mode: bool,
    ) -> Result<Window2, String> {
        if x.len() != 4 {
            return Err(format!("input of rank {} (2-D NCHW only)", x.len()));
        }
        let ah = attrs.axis(0, 2, x[2], k[0], ceil_mode)?;
        let aw = attrs.axis(1, 2, x[3], k[1], ceil_mode)?;
        Ok(Window2 {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            oh: ah.output,
            ow: aw.output,
            k,
            s: [ah.stride, aw.stride],
            d: [ah.dilation, aw.dilation],
            p: [ah.pad_begin, aw.pad_begin],
        })
    }

    /// AveragePool's divisor per axis: the range of input positions whose taps count — the
    /// input, or with `count_include_pad` the padded input (`attrs`, `ceil_mode` as given
    /// to [`Window2::new`]).
    pub(crate) fn divisor_ranges(
        &self,
        attrs: &kiln_ir::ops::nn::WindowAttrs,
        ceil_mode: bool,
        count_include_pad: bool,
    ) -> Result<[(i64, i64); 2], String> {
        let mut r = [(0i64, self.h as i64), (0i64, self.w as i64)];
        if count_include_pad {
            for (ax, (size, rr)) in [self.h, self.w].into_iter().zip(r.iter_mut()).enumerate() {
                let e = attrs.axis(ax, 2, size, self.k[ax], ceil_mode)?;
                *rr = (-e.pad_begin, size as i64 + e.pad_end);
            }
        }
        Ok(r)
    }

    /// The input row (or column, `axis` 1) read by output `o` and tap `t`, and whether it is
    /// inside the input.
    pub(crate) fn tap(&self, l: &mut Loops, axis: usize, o: &str, t: &str) -> (String, String) {
        let a = l.affine(o, self.s[axis] as i64, -self.p[axis]);
        let b = l.affine(t, self.d[axis] as i64, 0);
        let v = l.add(&a, &b);
        let size = if axis == 0 { self.h } else { self.w };
        let ok = l.in_range(&v, size);
        (v, ok)
    }
}

/// The static shape of a value.
pub(crate) fn known(g: &Graph, v: ValueId) -> Result<Vec<usize>, String> {
    g.values[v]
        .fact
        .shape
        .dims()
        .iter()
        .map(Dim::known)
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| format!("value '{}' has symbolic dims", g.values[v].name))
}

/// Whether `k` is a contraction whose main node is a `Conv`.
pub(crate) fn is_conv(g: &Graph, k: &fusion::Kernel) -> bool {
    k.nodes
        .iter()
        .any(|&n| matches!(g.nodes[n].op, Op::Nn(NnOp::Conv(_))))
}

/// Static dims as prologue dims.
fn cdims(d: &[usize]) -> Vec<PDim> {
    d.iter().map(|&x| PDim::Const(x as i64)).collect()
}

/// f32 lanes per vector (AVX2).
pub(crate) const VW: usize = 8;
/// The vector type of one register of output positions.
pub(crate) const VT: &str = "vector<8xf32>";
/// The mask type of [`VT`].
pub(crate) const MT: &str = "vector<8xi1>";
/// A flat f32 buffer.
pub(crate) const M1: &str = "memref<?xf32>";
/// A 4-D f32 buffer.
pub(crate) const M4: &str = "memref<?x?x?x?xf32>";

/// How a `group = 1` convolution is computed (grouped ones always use [`ConvAlgo::Direct`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvAlgo {
    /// Register-tiled direct convolution on a zero-padded, stride-phase-split copy of the
    /// input, with bias and epilogue applied to the accumulators (see the module doc).
    Direct,
    /// im2col into a scratch buffer, then the packed matmul of [`crate::cpu::matmul`]; bias
    /// and epilogue run as a separate pass over the output.
    Im2colGemm,
}

/// The schedule of a Conv kernel; the default picks everything from the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSchedule {
    /// The algorithm of `group = 1` convolutions.
    pub algo: ConvAlgo,
    /// Output channels per register tile of [`ConvAlgo::Direct`] (0: chosen by
    /// [`ConvSchedule::tile`]).
    pub mr: usize,
    /// 8-float vectors of output positions per register tile (0: chosen by
    /// [`ConvSchedule::tile`]); `mr·nv + nv + 1` should not exceed the 16 AVX2 registers.
    pub nv: usize,
    /// The matmul schedule of [`ConvAlgo::Im2colGemm`].
    pub matmul: MatmulSchedule,
    /// `group = 1` convs with a fused epilogue and at most this many output positions per
    /// channel, whose position grid would leave ≥ 30% of the vector lanes idle, use the
    /// dot-product form ([`ConvAlgo::Direct`] only; 0 disables it).
    pub dot_max_positions: usize,
    /// `group = 1` convs with a fused epilogue, at least 8 output channels and at most this
    /// many output positions per channel use the channel-vector form ([`emit_chan`]; lanes
    /// over output channels, filter packed at compile time; [`ConvAlgo::Direct`] only; 0
    /// disables it).
    pub chan_max_positions: usize,
    /// ... and whose direct register tiles would use fewer than this percentage of their
    /// lanes (padding columns, partial vectors); 101 forces the channel-vector form.
    ///
    /// Measured (resnet zoo model, 1 thread, AMD EPYC, best of 6 profiles, µs direct or dot
    /// → channel form): 3×3 128→128 at 2×2 18.8 → 7.5, 3×3 64→128 s2 at 2×2 10.5 → 5.3,
    /// 3×3 64→64 at 4×4 17.8 → 9.4, 3×3 32→64 s2 at 4×4 9.5 → 5.3, 1×1 64→128 s2 at 2×2
    /// 2.1 → 0.9; but with every lane used the direct form wins: 3×3 32→32 at 8×8 13 vs 25,
    /// 1×1 16→32 s2 at 8×8 0.8 vs 1.6, 1×1 32→64 s2 at 4×4 0.8 vs 1.2.
    pub chan_below_lane_use_pct: usize,
    /// `group = 1` 3×3 stride-1 convs with a fused epilogue, at least this many input and
    /// output channels and at least [`ConvSchedule::winograd_min_positions`] output positions
    /// use Winograd F(2×2, 3×3) ([`emit_winograd`]; 0 disables it).
    pub winograd_min_channels: usize,
    /// See [`ConvSchedule::winograd_min_channels`].
    ///
    /// Measured (resnet zoo model, 1 thread, AMD EPYC, µs direct → Winograd): 3×3 16→16 at
    /// 16×16 11.4 → 8.5 (twice), 3×3 32→32 at 8×8 13.0 → 9.2. At 4×4 outputs the 2×2 tile
    /// grid leaves half the lanes idle and the channel-vector form is used instead.
    pub winograd_min_positions: usize,
}

impl ConvSchedule {
    /// The default schedule, with the matmul of [`MatmulSchedule::for_lanes`] (`lanes` f32
    /// per vector register of the target; the direct forms keep 8-lane vectors).
    pub fn for_lanes(lanes: usize) -> Self {
        Self {
            matmul: MatmulSchedule::for_lanes(lanes),
            ..Self::default()
        }
    }
}

impl Default for ConvSchedule {
    /// Direct convolution, register tile chosen from the shape.
    fn default() -> Self {
        Self {
            algo: ConvAlgo::Direct,
            mr: 0,
            nv: 0,
            matmul: MatmulSchedule::default(),
            dot_max_positions: 8,
            chan_max_positions: 64,
            chan_below_lane_use_pct: 80,
            winograd_min_channels: 16,
            winograd_min_positions: 64,
        }
    }
}

impl ConvSchedule {
    /// The register tile `(mr, nv)` for `mg` output channels per group and `grid` output
    /// positions per channel: the explicit sizes if both are set, otherwise the candidate
    /// minimising `tiles · (mr·nv FMAs + mr + nv loads)` per tap (padding waste included),
    /// 10% less for a `pointwise` conv whose positions fill whole tiles (it reads its input
    /// in place, without the padded copy).
    ///
    /// `rows × (cols + pad)` is the position grid (`pad`: the taps' reach); the third result
    /// says whether tiling each output row on its own (no lanes on pad columns) needs fewer
    /// tiles than tiling the flattened grid.
    pub fn tile(&self, mg: usize, grid: [usize; 3], pointwise: bool) -> (usize, usize, bool) {
        self.tile_lanes(mg, grid, pointwise, VW)
    }

    /// [`ConvSchedule::tile`] for vectors of `lanes` f32: 8 (16 AVX2 registers) or 16
    /// (AVX-512: 32 registers, taller tiles; `nv` counts 16-lane vectors).
    pub fn tile_lanes(
        &self,
        mg: usize,
        [rows, cols, pad]: [usize; 3],
        pointwise: bool,
        lanes: usize,
    ) -> (usize, usize, bool) {
        let grid = rows * (cols + pad);
        let tiles = |nv: usize| {
            let (g, r) = (grid.div_ceil(lanes * nv), rows * cols.div_ceil(lanes * nv));
            (g.min(r), r < g)
        };
        if self.mr > 0 && self.nv > 0 {
            return (self.mr, self.nv, tiles(self.nv).1);
        }
        let candidates: &[(usize, usize)] = if lanes == 16 {
            &[
                (16, 1),
                (14, 2),
                (12, 2),
                (8, 3),
                (6, 4),
                (4, 4),
                (2, 6),
                (1, 8),
            ]
        } else {
            &[(8, 1), (6, 2), (4, 3), (4, 2), (2, 4), (1, 4)]
        };
        let (mr, nv) = candidates
            .iter()
            .copied()
            .min_by_key(|&(mr, nv)| {
                let in_place = pointwise && grid.is_multiple_of(lanes * nv);
                mg.div_ceil(mr) * tiles(nv).0 * (mr * nv + mr + nv) * if in_place { 9 } else { 10 }
            })
            .expect("candidates");
        (mr, nv, tiles(nv).1)
    }
}

/// One elementwise step of a fused Conv epilogue, applied to 8-lane vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Epi {
    Relu,
    Clip(Option<f32>, Option<f32>),
    HardSwish,
    /// `+ buffer` (index into the epilogue buffers, each of the output's shape).
    AddBuf(usize),
    /// `· buffer`.
    MulBuf(usize),
    AddConst(f32),
    MulConst(f32),
    /// Store the value so far into a kernel output that is read outside the kernel too
    /// (index into the tap buffers, each of the output's shape).
    Store(usize),
    /// Go on from an earlier value: 0 the convolution (+ bias), `j` the result of the `j`-th
    /// computing step (every step but `Store` and `From` computes one), for an epilogue
    /// that is a tree (`h` read by a `Relu` and by an `Add`).
    From(usize),
}

/// A fused Conv epilogue (see [`fused_epilogue`]): its steps, the full-shape buffers they
/// read, the outputs its [`Epi::Store`] steps write, and the output the last value goes to.
struct FusedEpilogue {
    ops: Vec<Epi>,
    bufs: Vec<ValueId>,
    taps: Vec<ValueId>,
    out: ValueId,
}

/// The epilogue of a Conv kernel as [`Epi`] steps and the full-shape buffers they read, when
/// every node is such a step applied to one earlier value of the kernel (the epilogue is a
/// tree rooted at the Conv) and every kernel output is one of those values (the last one, or
/// one stored on the way: a Conv whose output also feeds another kernel, as `h` in NasNet's
/// `relu(h)`, `h + …`); `None` otherwise (the generic epilogue pass then runs).
fn fused_epilogue(
    g: &Graph,
    k: &fusion::Kernel,
    ci: usize,
    y_v: ValueId,
    y_s: &[usize],
) -> Option<FusedEpilogue> {
    let scalar = |v: ValueId| -> Option<f32> {
        g.const_value(v)
            .filter(|t| t.len() == 1)
            .map(|t| t.to_f64_vec()[0] as f32)
    };
    let mut cur = y_v;
    let mut ops = Vec::new();
    let mut bufs: Vec<ValueId> = Vec::new();
    let mut taps: Vec<ValueId> = Vec::new();
    // the values computed so far, in [`Epi::From`] order
    let mut vals = vec![y_v];
    let mut store = |v: ValueId, ops: &mut Vec<Epi>| {
        if k.outputs.contains(&v) {
            ops.push(Epi::Store(taps.len()));
            taps.push(v);
        }
    };
    store(y_v, &mut ops);
    for &n in k.nodes.iter().filter(|&&n| n != ci) {
        let node = &g.nodes[n];
        if node.outputs.len() != 1 || g.values[node.outputs[0]].fact.dtype != DType::F32 {
            return None;
        }
        // the one operand computed in this kernel
        let mut chain = node
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, i)| i.is_some_and(|i| vals.contains(&i)));
        let (pos, from) = chain.next()?;
        if chain.next().is_some() {
            return None;
        }
        let from = from.expect("filtered");
        if from != cur {
            ops.push(Epi::From(vals.iter().position(|&v| v == from)?));
        }
        let others: Vec<Option<ValueId>> = node
            .inputs
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != pos)
            .map(|(_, &v)| v)
            .collect();
        let Op::Elementwise(e) = &node.op else {
            return None;
        };
        let op = match e {
            ElementwiseOp::Unary(UnaryKind::Relu) if others.is_empty() => Epi::Relu,
            ElementwiseOp::Unary(UnaryKind::HardSwish) if others.is_empty() => Epi::HardSwish,
            ElementwiseOp::Clip(ClipBounds::Attrs { min, max }) if others.is_empty() => {
                Epi::Clip(*min, *max)
            }
            ElementwiseOp::Clip(ClipBounds::Inputs) if pos == 0 => {
                let b = |i: usize| -> Option<Option<f32>> {
                    match node.inputs.get(i).copied().flatten() {
                        None => Some(None),
                        Some(v) => scalar(v).map(Some),
                    }
                };
                Epi::Clip(b(1)?, b(2)?)
            }
            ElementwiseOp::Binary(kind @ (BinaryKind::Add | BinaryKind::Mul)) => {
                let [Some(o)] = others[..] else {
                    return None;
                };
                if k.nodes.iter().any(|&n| g.nodes[n].outputs.contains(&o)) {
                    // a value of this kernel, not a buffer it reads
                    return None;
                }
                let add = *kind == BinaryKind::Add;
                if let Some(x) = scalar(o) {
                    if add {
                        Epi::AddConst(x)
                    } else {
                        Epi::MulConst(x)
                    }
                } else {
                    let f = &g.values[o].fact;
                    if f.dtype != DType::F32 || f.shape.as_known().as_deref() != Some(y_s) {
                        return None;
                    }
                    let i = bufs.iter().position(|&b| b == o).unwrap_or_else(|| {
                        bufs.push(o);
                        bufs.len() - 1
                    });
                    if add {
                        Epi::AddBuf(i)
                    } else {
                        Epi::MulBuf(i)
                    }
                }
            }
            _ => return None,
        };
        ops.push(op);
        cur = node.outputs[0];
        vals.push(cur);
        store(cur, &mut ops);
    }
    // the last value goes to the output the caller stores
    if ops.last() == Some(&Epi::Store(taps.len().wrapping_sub(1))) {
        ops.pop();
        taps.pop();
    }
    let every_output =
        k.outputs.contains(&cur) && k.outputs.len() == taps.len() + 1 && !taps.contains(&cur);
    every_output.then_some(FusedEpilogue {
        ops,
        bufs,
        taps,
        out: cur,
    })
}

impl Loops {
    /// Opens `scf.for %i = lo to hi step step` and returns `%i`.
    pub(crate) fn open_range(&mut self, lo: usize, hi: usize, step: usize) -> String {
        let (a, b, s) = (self.c(lo as i64), self.c(hi as i64), self.c(step as i64));
        let i = self.fresh("i");
        self.line(&format!("scf.for {i} = {a} to {b} step {s} {{"));
        i
    }

    /// A hoisted splat of `x` over [`Loops::lanes`] lanes.
    pub(crate) fn vsplat(&mut self, x: f32) -> String {
        self.vsplat_w(x, self.lanes())
    }

    /// A hoisted `lanes`-lane splat of `x`.
    pub(crate) fn vsplat_w(&mut self, x: f32, lanes: usize) -> String {
        let key = format!("splat{lanes}:{:08X}", x.to_bits());
        if let Some(v) = self.cache.get(&key) {
            return v.clone();
        }
        let s = self.f(x);
        self.next += 1;
        let v = format!("%lp_k{}", self.next);
        let _ = writeln!(
            self.consts,
            "  {v} = vector.broadcast {s} : f32 to vector<{lanes}xf32>"
        );
        self.cache.insert(key, v.clone());
        v
    }

    /// `a + b` for an `index` value `a` and a constant `b`.
    pub(crate) fn addc(&mut self, a: &str, b: usize) -> String {
        self.affine(a, 1, b as i64)
    }
}

/// Operands of [`emit_direct`].
struct Direct<'a> {
    win: Window2,
    group: usize,
    /// Output channels.
    m: usize,
    /// Register tile (see [`ConvSchedule::tile`]).
    mr: usize,
    nv: usize,
    /// The input: `memref<?xf32>` when read in place (pointwise), else 4-D.
    x: &'a str,
    /// The filter as `memref<?x?xf32>` `[M, C/group·kh·kw]`.
    w: &'a str,
    bias: Option<&'a str>,
    /// The output, flat.
    y: &'a str,
    epi: &'a [Epi],
    /// The epilogue buffers, flat.
    bufs: &'a [String],
    /// The outputs the epilogue's [`Epi::Store`] steps write, flat.
    taps: &'a [String],
    /// The task range `[begin, end)` (`index` values) of `tasks(..)` tasks.
    tasks: (String, String),
    /// Tile each output row on its own (no lanes on the grid's pad columns) instead of the
    /// flattened grid.
    rows: bool,
    /// `w` is the flat filter packed by [`pack_direct_filter`] (else `[M, C/group·kh·kw]`).
    packed: bool,
    /// [`emit_direct`]: output rows per spatial block (see [`row_block`]); `win.oh` for one.
    row_block: usize,
}

/// The direct form's filter packed at compile time in the order [`emit_direct`] reads it:
/// `Wp[g][ob][c][ki][kj][mr]` (group, block of `mr` output channels of the group, the last
/// one zero-padded), so the `mr` broadcasts of a tap read `mr` consecutive floats.
pub fn pack_direct_filter(w: &[f32], m: usize, group: usize, ck: usize, mr: usize) -> Vec<f32> {
    let mg = m / group;
    let nob = mg.div_ceil(mr);
    let mut out = vec![0f32; group * nob * ck * mr];
    for o in 0..m {
        let (g, og) = (o / mg, o % mg);
        let blk = g * nob + og / mr;
        for k in 0..ck {
            out[(blk * ck + k) * mr + og % mr] = w[o * ck + k];
        }
    }
    out
}

/// The number of tasks of the direct convolution: one per (image, block of `row_block`
/// output rows, group, block of `mr` output channels).
fn direct_tasks(win: &Window2, group: usize, m: usize, mr: usize, row_block: usize) -> usize {
    win.n * win.oh.div_ceil(row_block) * group * (m / group).div_ceil(mr)
}

/// Output rows per spatial block of the direct form, so that its tasks go (image, block of
/// rows, group, channel block): the threads of a split step then each take a band of rows
/// of every channel, the same band in consecutive convolutions, and read mostly what they
/// wrote themselves one step before (split by channels, each thread of a pointwise conv read
/// the whole input, half of it from the other core's cache: MobileNet's 16→64 pointwise conv
/// took 21.7 µs on 2 threads in the model vs 13.7 µs alone). Up to 4 blocks of ≥ 2 rows;
/// tiles over the flattened grid that store straight to the output (`aligned`) need blocks
/// that are whole tiles (`R·wq` a multiple of `nr`); the others compute every tile that
/// overlaps their band (the one straddling two bands twice), so their bands are kept only
/// when that adds at most 10% tiles (12.5% measured slower on MobileNet). Returns `win.oh` (one block) when no such block exists.
fn row_block(win: &Window2, wq: usize, nr: usize, aligned: bool) -> usize {
    let whole = (win.oh * wq).div_ceil(nr);
    for target in [4, 2] {
        if win.oh < 2 * target {
            continue;
        }
        let mut r = win.oh.div_ceil(target);
        if aligned {
            let step = nr / gcd(wq, nr);
            r = r.div_ceil(step) * step;
        }
        if r >= win.oh {
            continue;
        }
        // The tiles each band computes (those that overlap it): at most 10% more in all.
        let banded: usize = (0..win.oh.div_ceil(r))
            .map(|b| {
                let (lo, hi) = (b * r * wq, ((b + 1) * r).min(win.oh) * wq);
                hi.div_ceil(nr) - lo / nr
            })
            .sum();
        if banded * 10 <= whole * 11 {
            return r;
        }
    }
    win.oh
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Geometry of the direct algorithm's input copy: `Xp[c][slot][hq][wq]`, one slot per stride
/// phase `(row % s, col % s)` that a tap reads, so every tap reads unit-stride runs.
pub(crate) struct Grid {
    /// The row phases read (`ki·d % s`), one slot row each.
    pub(crate) rph: Vec<usize>,
    /// The column phases read.
    pub(crate) cph: Vec<usize>,
    /// Rows and columns of one phase plane (output size + the taps' reach).
    pub(crate) hq: usize,
    /// Columns of one phase plane.
    pub(crate) wq: usize,
}

impl Grid {
    /// The grid of `win`.
    pub(crate) fn new(win: &Window2) -> Grid {
        let ph = |k: usize, d: usize, s: usize| {
            let mut v: Vec<usize> = (0..k).map(|i| i * d % s).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        Grid {
            rph: ph(win.k[0], win.d[0], win.s[0]),
            cph: ph(win.k[1], win.d[1], win.s[1]),
            hq: win.oh + (win.k[0] - 1) * win.d[0] / win.s[0],
            wq: win.ow + (win.k[1] - 1) * win.d[1] / win.s[1],
        }
    }
    /// Phase planes per channel.
    pub(crate) fn slots(&self) -> usize {
        self.rph.len() * self.cph.len()
    }
    /// Floats per phase plane.
    pub(crate) fn plane(&self) -> usize {
        self.hq * self.wq
    }
    /// The offset of tap `(ki, kj)` from the output position in its channel's `Xp` block.
    pub(crate) fn tap(&self, win: &Window2, ki: usize, kj: usize) -> usize {
        let (r, c) = (ki * win.d[0], kj * win.d[1]);
        let sr = self.rph.iter().position(|&p| p == r % win.s[0]).unwrap();
        let sc = self.cph.iter().position(|&p| p == c % win.s[1]).unwrap();
        (sr * self.cph.len() + sc) * self.plane() + r / win.s[0] * self.wq + c / win.s[1]
    }
}

/// Whether a 1×1, unit-stride, unpadded Conv whose positions fill whole register tiles can
/// read its input in place.
fn reads_in_place(win: &Window2, nr: usize) -> bool {
    win.k == [1, 1]
        && win.s == [1, 1]
        && win.p == [0, 0]
        && (win.oh, win.ow) == (win.h, win.w)
        && (win.oh * win.ow).is_multiple_of(nr)
}

/// The index range `[lo, hi)` of `q < n` with `0 <= q·s + off < size`.
fn valid_range(n: usize, s: usize, off: i64, size: usize) -> (usize, usize) {
    let s = s as i64;
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let hi = ((size as i64 - 1 - off).div_euclid(s) + 1).clamp(0, n as i64);
    (lo as usize, hi.max(lo) as usize)
}

/// Applies the epilogue steps to `val` at flat output index `idx` (`mask`: the valid lanes).
fn emit_epi(l: &mut Loops, d: &Direct, val: String, idx: &str, mask: Option<&str>) -> String {
    let z = l.vsplat(0.0);
    let (vt, mt) = (l.vt(), l.mt());
    emit_epi_with(
        l,
        d,
        val,
        &mut |l: &mut Loops, b: &str, store: Option<&str>| match (store, mask) {
            (Some(v), _) => {
                emit_store(l, b, v, idx, mask);
                String::new()
            }
            (None, None) => l.op(&format!("vector.load {b}[{idx}] : {M1}, {vt}")),
            (None, Some(mk)) => l.op(&format!(
                "vector.maskedload {b}[{idx}], {mk}, {z} : {M1}, {mt}, {vt} into {vt}"
            )),
        },
    )
}

/// Applies the epilogue steps to `val`; `lanes(l, buf, None)` loads the lanes of an epilogue
/// buffer that `val` holds, `lanes(l, buf, Some(v))` stores `v` to them (and returns nothing).
fn emit_epi_with(
    l: &mut Loops,
    d: &Direct,
    mut val: String,
    lanes: &mut dyn FnMut(&mut Loops, &str, Option<&str>) -> String,
) -> String {
    let z = l.vsplat(0.0);
    let vt = l.vt();
    let mut vals = vec![val.clone()];
    for op in d.epi {
        let computes = !matches!(op, Epi::Store(_) | Epi::From(_));
        val = match *op {
            Epi::Relu => l.op(&format!("arith.maximumf {val}, {z} : {vt}")),
            Epi::Clip(lo, hi) => {
                if let Some(lo) = lo {
                    let c = l.vsplat(lo);
                    val = l.op(&format!("arith.maximumf {val}, {c} : {vt}"));
                }
                if let Some(hi) = hi {
                    let c = l.vsplat(hi);
                    val = l.op(&format!("arith.minimumf {val}, {c} : {vt}"));
                }
                val
            }
            Epi::HardSwish => {
                let (s, h, one) = (l.vsplat(1.0 / 6.0), l.vsplat(0.5), l.vsplat(1.0));
                let t = l.op(&format!("math.fma {val}, {s}, {h} : {vt}"));
                let t = l.op(&format!("arith.maximumf {t}, {z} : {vt}"));
                let t = l.op(&format!("arith.minimumf {t}, {one} : {vt}"));
                l.op(&format!("arith.mulf {val}, {t} : {vt}"))
            }
            Epi::AddConst(x) | Epi::MulConst(x) => {
                let c = l.vsplat(x);
                let f = if matches!(op, Epi::AddConst(_)) {
                    "addf"
                } else {
                    "mulf"
                };
                l.op(&format!("arith.{f} {val}, {c} : {vt}"))
            }
            Epi::AddBuf(i) | Epi::MulBuf(i) => {
                let r = lanes(l, &d.bufs[i], None);
                let f = if matches!(op, Epi::AddBuf(_)) {
                    "addf"
                } else {
                    "mulf"
                };
                l.op(&format!("arith.{f} {val}, {r} : {vt}"))
            }
            Epi::Store(i) => {
                lanes(l, &d.taps[i], Some(&val));
                val
            }
            Epi::From(j) => vals[j].clone(),
        };
        if computes {
            vals.push(val.clone());
        }
    }
    val
}

/// Stores `val` at flat index `idx` of `mem` (masked when `mask` is set).
pub(crate) fn emit_store(l: &mut Loops, mem: &str, val: &str, idx: &str, mask: Option<&str>) {
    let lanes = l.lanes();
    emit_store_w(l, mem, val, idx, mask, lanes);
}

/// [`emit_store`] of a `lanes`-lane vector.
fn emit_store_w(l: &mut Loops, mem: &str, val: &str, idx: &str, mask: Option<&str>, lanes: usize) {
    let (vt, mt) = (
        format!("vector<{lanes}xf32>"),
        format!("vector<{lanes}xi1>"),
    );
    match mask {
        None => l.line(&format!("vector.store {val}, {mem}[{idx}] : {M1}, {vt}")),
        Some(mk) => l.line(&format!(
            "vector.maskedstore {mem}[{idx}], {mk}, {val} : {M1}, {mt}, {vt}"
        )),
    }
}

/// Copies channels `ch0..ch0 + nch` of image `n` of the 4-D input `x` into the interior of
/// its padded, phase-split copy `xp` (laid out as [`Grid`] says; the padding is filled
/// beforehand): at channel `ch` of `xp`, or at `ch - ch0` when `local` (a copy that holds only
/// those channels, so a call fills the padding of only that many planes). With `rows`, only
/// grid rows `[lo, hi)` (`index` values) are copied.
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_copy(
    l: &mut Loops,
    win: &Window2,
    grid: &Grid,
    x: &str,
    xp: &str,
    n: &str,
    ch0: &str,
    nch: usize,
    local: bool,
    rows: Option<(&str, &str)>,
) {
    let (wq, plane, slots) = (grid.wq, grid.plane(), grid.slots());
    let zv = l.vsplat_w(0.0, VW);
    let xp = xp.to_string();
    let i = l.open(nch);
    let ch = l.add(ch0, &i);
    for (sr, &ph) in grid.rph.iter().enumerate() {
        for (sc, &pw) in grid.cph.iter().enumerate() {
            let slot = sr * grid.cph.len() + sc;
            let (iq_lo, iq_hi) = valid_range(grid.hq, win.s[0], ph as i64 - win.p[0], win.h);
            let (jq_lo, jq_hi) = valid_range(grid.wq, win.s[1], pw as i64 - win.p[1], win.w);
            if iq_lo >= iq_hi || jq_lo >= jq_hi {
                continue;
            }
            let iq = match rows {
                None => l.open_range(iq_lo, iq_hi, 1),
                Some((lo, hi)) => {
                    let (a, b) = (l.c(iq_lo as i64), l.c(iq_hi as i64));
                    let lo = l.max(lo, &a);
                    let hi = l.min(hi, &b);
                    l.open_dyn(&lo, &hi, 1)
                }
            };
            let ih = l.affine(&iq, win.s[0] as i64, ph as i64 - win.p[0]);
            let dch = if local { &i } else { &ch };
            let cb = l.affine(dch, (slots * plane) as i64, (slot * plane) as i64);
            let rb = l.affine(&iq, wq as i64, 0);
            let dst = l.add(&cb, &rb);
            if win.s[1] == 1 {
                let iw0 = jq_lo as i64 + pw as i64 - win.p[1];
                let len = jq_hi - jq_lo;
                let n8 = len / VW * VW;
                if n8 > 0 {
                    let t = l.open_range(0, n8, VW);
                    let iw = l.affine(&t, 1, iw0);
                    let dj = l.add(&dst, &t);
                    let di = l.addc(&dj, jq_lo);
                    let v = l.op(&format!(
                        "vector.load {}[{n}, {ch}, {ih}, {iw}] : {M4}, {VT}",
                        x
                    ));
                    emit_store_w(l, &xp, &v, &di, None, VW);
                    l.close();
                }
                if len > n8 {
                    let mk = l.op(&format!("vector.constant_mask [{}] : {MT}", len - n8));
                    let iw = l.c(iw0 + n8 as i64);
                    let di = l.addc(&dst, jq_lo + n8);
                    let v = l.op(&format!(
                        "vector.maskedload {}[{n}, {ch}, {ih}, {iw}], {mk}, {zv} : {M4}, {MT}, {VT} into {VT}",
                        x
                    ));
                    emit_store_w(l, &xp, &v, &di, Some(&mk), VW);
                }
            } else {
                // Stride 2: 16 contiguous input floats → 8 of this phase (deinterleave);
                // the rest, and other strides, element by element.
                let mut jq_v = jq_lo;
                if win.s[1] == 2 {
                    let iw0 = jq_lo as i64 * 2 + pw as i64 - win.p[1];
                    let len = jq_hi - jq_lo;
                    let nch = (0..len / VW)
                        .take_while(|&j| iw0 + 16 * j as i64 + 16 <= win.w as i64)
                        .count();
                    if nch > 0 {
                        let t = l.open_range(0, nch * VW, VW);
                        let iw = l.affine(&t, 2, iw0);
                        let iw8 = l.addc(&iw, VW);
                        let a = l.op(&format!(
                            "vector.load {}[{n}, {ch}, {ih}, {iw}] : {M4}, {VT}",
                            x
                        ));
                        let b = l.op(&format!(
                            "vector.load {}[{n}, {ch}, {ih}, {iw8}] : {M4}, {VT}",
                            x
                        ));
                        let e = l.op(&format!(
                            "vector.shuffle {a}, {b} [0, 2, 4, 6, 8, 10, 12, 14] : {VT}, {VT}"
                        ));
                        let dj = l.add(&dst, &t);
                        let di = l.addc(&dj, jq_lo);
                        emit_store_w(l, &xp, &e, &di, None, VW);
                        l.close();
                    }
                    jq_v = jq_lo + nch * VW;
                }
                if jq_v < jq_hi {
                    let jq = l.open_range(jq_v, jq_hi, 1);
                    let iw = l.affine(&jq, win.s[1] as i64, pw as i64 - win.p[1]);
                    let di = l.add(&dst, &jq);
                    let v = l.op(&format!("memref.load {}[{n}, {ch}, {ih}, {iw}] : {M4}", x));
                    l.line(&format!("memref.store {v}, {xp}[{di}] : {M1}"));
                    l.close();
                }
            }
            l.close();
        }
    }
    l.close();
}

/// Emits the dot-product form of a `group = 1` convolution with few output positions `P`:
/// per image, the patches are gathered into `cols[P][K8]` (`K = C·kh·kw` rounded up to 8,
/// zero padded), then each output is `Σ_k W[o, k] · cols[p, k]` with the lanes over `k` (no
/// idle lanes however small `P` is): register tiles of `d.mr` channels × `d.nv` positions,
/// horizontal sums at the end, bias + epilogue on the `nv` results of a channel.
fn emit_dot(l: &mut Loops, d: &Direct) {
    let win = &d.win;
    let (mr, pb) = (d.mr, d.nv);
    let kk = win.k[0] * win.k[1];
    let kt = win.c * kk;
    let k8 = kt.div_ceil(VW) * VW;
    let np = win.oh * win.ow;
    let zv = l.vsplat(0.0);
    let cols = l.scratch(np * k8);
    let i = l.open_range(0, np * k8, VW);
    emit_store(l, &cols, &zv, &i, None);
    l.close();
    let nob = d.m.div_ceil(mr);
    let t = l.fresh("t");
    let one = l.c(1);
    l.line(&format!(
        "scf.for {t} = {} to {} step {one} {{",
        d.tasks.0, d.tasks.1
    ));
    let nob_c = l.c(nob as i64);
    let n = l.op(&format!("arith.divui {t}, {nob_c} : index"));
    let obi = l.op(&format!("arith.remui {t}, {nob_c} : index"));
    let o0 = l.affine(&obi, mr as i64, 0);
    // Gather the patches of image n (first task of the image in this call).
    let z = l.c(0);
    let f1 = l.op(&format!("arith.cmpi eq, {t}, {} : index", d.tasks.0));
    let f2 = l.op(&format!("arith.cmpi eq, {obi}, {z} : index"));
    let first = l.op(&format!("arith.ori {f1}, {f2} : i1"));
    l.line(&format!("scf.if {first} {{"));
    let ch = l.open(win.c);
    let cb = l.affine(&ch, kk as i64, 0);
    for oh in 0..win.oh {
        for ow in 0..win.ow {
            for ki in 0..win.k[0] {
                let ih = (oh * win.s[0] + ki * win.d[0]) as i64 - win.p[0];
                if ih < 0 || ih >= win.h as i64 {
                    continue;
                }
                for kj in 0..win.k[1] {
                    let iw = (ow * win.s[1] + kj * win.d[1]) as i64 - win.p[1];
                    if iw < 0 || iw >= win.w as i64 {
                        continue;
                    }
                    let (ihc, iwc) = (l.c(ih), l.c(iw));
                    let v = l.op(&format!(
                        "memref.load {}[{n}, {ch}, {ihc}, {iwc}] : {M4}",
                        d.x
                    ));
                    let di = l.addc(&cb, (oh * win.ow + ow) * k8 + ki * win.k[1] + kj);
                    l.line(&format!("memref.store {v}, {cols}[{di}] : {M1}"));
                }
            }
        }
    }
    l.close();
    l.close();
    let ragged = !d.m.is_multiple_of(mr);
    let mut rows = Vec::new();
    let mut valid = Vec::new();
    for r in 0..mr {
        let orow = l.addc(&o0, r);
        rows.push(if ragged {
            let mc = l.c(d.m as i64);
            let ok = l.op(&format!("arith.cmpi slt, {orow}, {mc} : index"));
            valid.push(ok.clone());
            l.op(&format!("arith.select {ok}, {orow}, {o0} : index"))
        } else {
            orow
        });
    }
    let kfull = kt / VW * VW;
    for p0 in (0..np).step_by(pb) {
        let pc = pb.min(np - p0);
        let nacc = mr * pc;
        let mut accs: Vec<String> = vec![zv.clone(); nacc];
        // One k chunk of 8: `kv` the chunk start, `mask` for the ragged last chunk of W.
        let chunk = |l: &mut Loops, kv: &str, mask: Option<&str>, accs: &mut Vec<String>| {
            let xs: Vec<String> = (0..pc)
                .map(|q| {
                    let i = l.addc(kv, (p0 + q) * k8);
                    l.op(&format!("vector.load {cols}[{i}] : {M1}, {VT}"))
                })
                .collect();
            for r in 0..mr {
                let w = match mask {
                    None => l.op(&format!(
                        "vector.load {}[{}, {kv}] : memref<?x?xf32>, {VT}",
                        d.w, rows[r]
                    )),
                    Some(mk) => l.op(&format!(
                        "vector.maskedload {}[{}, {kv}], {mk}, {zv} : memref<?x?xf32>, {MT}, {VT} into {VT}",
                        d.w, rows[r]
                    )),
                };
                for q in 0..pc {
                    let a = &accs[r * pc + q];
                    accs[r * pc + q] = l.op(&format!("vector.fma {w}, {}, {a} : {VT}", xs[q]));
                }
            }
        };
        if kfull > 0 {
            let res = l.fresh("res");
            let kv = l.fresh("k");
            let it: Vec<String> = (0..nacc).map(|_| l.fresh("acc")).collect();
            let (z, hi, st) = (l.c(0), l.c(kfull as i64), l.c(VW as i64));
            l.line(&format!(
                "{res}:{nacc} = scf.for {kv} = {z} to {hi} step {st} iter_args({}) -> ({}) {{",
                it.iter()
                    .zip(&accs)
                    .map(|(a, b)| format!("{a} = {b}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                vec![VT; nacc].join(", ")
            ));
            let mut cur = it.clone();
            chunk(l, &kv, None, &mut cur);
            l.line(&format!(
                "scf.yield {} : {}\n  }}",
                cur.join(", "),
                vec![VT; nacc].join(", ")
            ));
            accs = (0..nacc).map(|i| format!("{res}#{i}")).collect();
        }
        if kt > kfull {
            let kv = l.c(kfull as i64);
            let mk = l.op(&format!("vector.constant_mask [{}] : {MT}", kt - kfull));
            chunk(l, &kv, Some(&mk), &mut accs);
        }
        let mk = l.op(&format!("vector.constant_mask [{pc}] : {MT}"));
        for r in 0..mr {
            if ragged {
                l.line(&format!("scf.if {} {{", valid[r]));
            }
            let mut v = zv.clone();
            for q in 0..pc {
                let s = l.op(&format!(
                    "vector.reduction <add>, {} : {VT} into f32",
                    accs[r * pc + q]
                ));
                v = l.op(&format!("vector.insert {s}, {v} [{q}] : f32 into {VT}"));
            }
            if let Some(b) = d.bias {
                let s = l.op(&format!("memref.load {b}[{}] : {M1}", rows[r]));
                let bv = l.op(&format!("vector.broadcast {s} : f32 to {VT}"));
                v = l.op(&format!("arith.addf {v}, {bv} : {VT}"));
            }
            let nm = l.affine(&n, d.m as i64, 0);
            let nmo = l.add(&nm, &rows[r]);
            let idx = l.affine(&nmo, np as i64, p0 as i64);
            let v = emit_epi(l, d, v, &idx, Some(&mk));
            emit_store(l, d.y, &v, &idx, Some(&mk));
            if ragged {
                l.close();
            }
        }
    }
    l.close();
}

/// The channel-vector form's filter, packed at compile time in the order [`emit_chan`] reads
/// it: `Wp[ob][c][ki][kj][mb]` for blocks of `mb = lanes·mo` output channels (the last block
/// zero-padded), so the `mo` vectors of one tap are one sequential `4·lanes·mo`-byte read.
pub fn pack_chan_filter(
    w: &[f32],
    m: usize,
    c: usize,
    kk: usize,
    mo: usize,
    lanes: usize,
) -> Vec<f32> {
    let mb = lanes * mo;
    let nob = m.div_ceil(mb);
    let mut out = vec![0f32; nob * c * kk * mb];
    for o in 0..m {
        let (ob, lane) = (o / mb, o % mb);
        for ci in 0..c {
            for t in 0..kk {
                out[((ob * c + ci) * kk + t) * mb + lane] = w[(o * c + ci) * kk + t];
            }
        }
    }
    out
}

/// The channel-vector form's register tile `(mo, pr)` for `m` output channels over the
/// window `win`: `mo` vectors of `lanes` (8, or 16 on AVX-512 with its 32 registers) output
/// channels × `pr` positions, the candidate with the
/// fewest estimated cycles, `blocks · Σ_tiles Σ_taps max(mo·v FMAs, mo + v loads)` (`v`: the
/// tile's positions whose tap is inside the input; two FMAs and two loads per cycle; idle
/// channels of a ragged last block included).
pub(crate) fn chan_tile(win: &Window2, m: usize, lanes: usize) -> (usize, usize) {
    let np = win.oh * win.ow;
    let inside = |p: usize, ki: usize, kj: usize| {
        let (oh, ow) = (p / win.ow, p % win.ow);
        let ih = (oh * win.s[0] + ki * win.d[0]) as i64 - win.p[0];
        let iw = (ow * win.s[1] + kj * win.d[1]) as i64 - win.p[1];
        ih >= 0 && ih < win.h as i64 && iw >= 0 && iw < win.w as i64
    };
    let candidates: &[(usize, usize)] = if lanes == 16 {
        &[(4, 6), (3, 8), (2, 12), (6, 4), (1, 24), (2, 8), (4, 4)]
    } else {
        &[(3, 4), (2, 6), (1, 12), (4, 2), (2, 4)]
    };
    candidates
        .iter()
        .copied()
        .min_by_key(|&(mo, pr)| {
            let mut per_block = 0;
            for p0 in (0..np).step_by(pr) {
                for ki in 0..win.k[0] {
                    for kj in 0..win.k[1] {
                        let v = (p0..np.min(p0 + pr)).filter(|&p| inside(p, ki, kj)).count();
                        if v > 0 {
                            per_block += (mo * v).max(mo + v);
                        }
                    }
                }
            }
            m.div_ceil(lanes * mo) * per_block
        })
        .expect("candidates")
}

/// Emits the channel-vector form of a `group = 1` convolution with few output positions
/// (4×4, 8×8 outputs, where a grid of 8-position vectors leaves lanes idle): the lanes run
/// over output channels instead. A register tile holds `d.mr` vectors of [`Loops::lanes`]
/// output channels ×
/// `d.nv` output positions; per input channel and tap it loads the `mr` filter vectors
/// (`d.w` is packed by [`pack_chan_filter`], one sequential read) and, for every position of
/// the tile whose tap falls inside the input (known at compile time: padding taps cost
/// nothing), broadcasts one input element from the unpadded NCHW input `d.x` (flat) and
/// issues `mr` FMAs. Bias (a vector load), the epilogue (buffers gathered) and the store
/// (a scatter over channels, stride `OH·OW`) run on the accumulators. One task per (image,
/// block of `lanes·mr` channels).
fn emit_chan(l: &mut Loops, d: &Direct) {
    let win = &d.win;
    let (mo, pr) = (d.mr, d.nv);
    let vw = l.lanes();
    let (vt, mt) = (l.vt(), l.mt());
    let (vt, mt) = (vt.as_str(), mt.as_str());
    let mb = vw * mo;
    let kk = win.k[0] * win.k[1];
    let np = win.oh * win.ow;
    let hw = win.h * win.w;
    let nob = d.m.div_ceil(mb);
    let ragged = !d.m.is_multiple_of(mb);
    let zv = l.vsplat(0.0);
    let vi = format!("vector<{vw}xi32>");
    let vi = vi.as_str();
    let t = l.fresh("t");
    let one = l.c(1);
    l.line(&format!(
        "scf.for {t} = {} to {} step {one} {{",
        d.tasks.0, d.tasks.1
    ));
    let nob_c = l.c(nob as i64);
    let n = l.op(&format!("arith.divui {t}, {nob_c} : index"));
    let obi = l.op(&format!("arith.remui {t}, {nob_c} : index"));
    let o0 = l.affine(&obi, mb as i64, 0);
    let full = l.op(&format!("vector.constant_mask [{vw}] : {mt}"));
    let lanes = l.konst(
        &format!(
            "dense<[{}]>",
            (0..vw)
                .map(|i| (i * np).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        vi,
    );
    let (mut masks, mut biases, mut yidx) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..mo {
        let o = l.addc(&o0, j * vw);
        let mask = if ragged {
            let (mc, z) = (l.c(d.m as i64), l.c(0));
            let left = l.op(&format!("arith.subi {mc}, {o} : index"));
            let left = l.op(&format!("arith.maxsi {left}, {z} : index"));
            l.op(&format!("vector.create_mask {left} : {mt}"))
        } else {
            full.clone()
        };
        biases.push(d.bias.map(|b| {
            l.op(&format!(
                "vector.maskedload {b}[{o}], {mask}, {zv} : {M1}, {mt}, {vt} into {vt}"
            ))
        }));
        // Flat output index of (n, o + lane, 0) as `vw` × i32.
        let nm = l.affine(&n, d.m as i64, 0);
        let no = l.add(&nm, &o);
        let base = l.affine(&no, np as i64, 0);
        let b32 = l.op(&format!("arith.index_cast {base} : index to i32"));
        let bv = l.op(&format!("vector.broadcast {b32} : i32 to {vi}"));
        yidx.push(l.op(&format!("arith.addi {bv}, {lanes} : {vi}")));
        masks.push(mask);
    }
    let nc = l.affine(&n, (win.c * hw) as i64, 0);
    let wob = l.affine(&obi, (win.c * kk * mb) as i64, 0);
    for p0 in (0..np).step_by(pr) {
        let pc = pr.min(np - p0);
        let nacc = mo * pc;
        let res = l.fresh("res");
        let c = l.fresh("c");
        let accs: Vec<String> = (0..nacc).map(|_| l.fresh("acc")).collect();
        let (z, one, cc) = (l.c(0), l.c(1), l.c(win.c as i64));
        l.line(&format!(
            "{res}:{nacc} = scf.for {c} = {z} to {cc} step {one} iter_args({}) -> ({}) {{",
            accs.iter()
                .map(|a| format!("{a} = {zv}"))
                .collect::<Vec<_>>()
                .join(", "),
            vec![vt; nacc].join(", ")
        ));
        let xc = l.affine(&c, hw as i64, 0);
        let xb = l.add(&nc, &xc);
        let wc = l.affine(&c, (kk * mb) as i64, 0);
        let wb = l.add(&wob, &wc);
        let mut cur = accs.clone();
        for ki in 0..win.k[0] {
            for kj in 0..win.k[1] {
                // (tile position, input offset) of the positions whose tap is inside.
                let valid: Vec<(usize, usize)> = (0..pc)
                    .filter_map(|q| {
                        let p = p0 + q;
                        let (oh, ow) = (p / win.ow, p % win.ow);
                        let ih = (oh * win.s[0] + ki * win.d[0]) as i64 - win.p[0];
                        let iw = (ow * win.s[1] + kj * win.d[1]) as i64 - win.p[1];
                        (ih >= 0 && ih < win.h as i64 && iw >= 0 && iw < win.w as i64)
                            .then_some((q, ih as usize * win.w + iw as usize))
                    })
                    .collect();
                if valid.is_empty() {
                    continue;
                }
                let tap = ki * win.k[1] + kj;
                let ws: Vec<String> = (0..mo)
                    .map(|j| {
                        let i = l.addc(&wb, tap * mb + j * vw);
                        l.op(&format!("vector.load {}[{i}] : {M1}, {vt}", d.w))
                    })
                    .collect();
                for (q, off) in valid {
                    let i = l.addc(&xb, off);
                    let s = l.op(&format!("memref.load {}[{i}] : {M1}", d.x));
                    let b = l.op(&format!("vector.broadcast {s} : f32 to {vt}"));
                    for j in 0..mo {
                        let a = &cur[j * pc + q];
                        cur[j * pc + q] = l.op(&format!("vector.fma {}, {b}, {a} : {vt}", ws[j]));
                    }
                }
            }
        }
        l.line(&format!(
            "scf.yield {} : {}\n  }}",
            cur.join(", "),
            vec![vt; nacc].join(", ")
        ));
        let z = l.c(0);
        for j in 0..mo {
            for q in 0..pc {
                let mut val = format!("{res}#{}", j * pc + q);
                if let Some(b) = &biases[j] {
                    val = l.op(&format!("arith.addf {val}, {b} : {vt}"));
                }
                let pv = l.konst(&format!("dense<{}>", p0 + q), vi);
                let idx = l.op(&format!("arith.addi {}, {pv} : {vi}", yidx[j]));
                let mk = masks[j].clone();
                let val = emit_epi_with(
                    l,
                    d,
                    val,
                    &mut |l: &mut Loops, b: &str, store: Option<&str>| {
                        match store {
                        Some(v) => {
                            l.line(&format!(
                                "vector.scatter {b}[{z}][{idx}], {mk}, {v} : {M1}, {vi}, {mt}, {vt}"
                            ));
                            String::new()
                        }
                        None => l.op(&format!(
                            "vector.gather {b}[{z}][{idx}], {mk}, {zv} : {M1}, {vi}, {mt}, {vt} into {vt}"
                        )),
                    }
                    },
                );
                l.line(&format!(
                    "vector.scatter {}[{z}][{idx}], {}, {val} : {M1}, {vi}, {mt}, {vt}",
                    d.y, masks[j]
                ));
            }
        }
    }
    l.close();
}

/// The Winograd F(2×2, 3×3) filter `U = G·g·Gᵀ`, computed at compile time and packed in the
/// order [`emit_winograd`] reads it: `U[ξ][ob][c][mr]` (`ξ` the 16 points of the 4×4
/// transform, blocks of `mr` output channels, the last one zero-padded).
pub fn pack_winograd_filter(w: &[f32], m: usize, c: usize, mr: usize) -> Vec<f32> {
    let nob = m.div_ceil(mr);
    let gm = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let mut out = vec![0f32; 16 * nob * c * mr];
    for o in 0..m {
        for ci in 0..c {
            let g = |i: usize, j: usize| w[(o * c + ci) * 9 + i * 3 + j] as f64;
            let mut t = [[0f64; 3]; 4];
            for (i, row) in t.iter_mut().enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = (0..3).map(|k| gm[i][k] * g(k, j)).sum();
                }
            }
            for i in 0..4 {
                for j in 0..4 {
                    let u: f64 = (0..3).map(|k| t[i][k] * gm[j][k]).sum();
                    out[(((i * 4 + j) * nob + o / mr) * c + ci) * mr + o % mr] = u as f32;
                }
            }
        }
    }
    out
}

/// Whether a Conv can use Winograd F(2×2, 3×3): `group = 1`, 3×3, stride 1, dilation 1.
fn winograd_fits(win: &Window2, group: usize) -> bool {
    group == 1 && win.k == [3, 3] && win.s == [1, 1] && win.d == [1, 1]
}

/// Emits Winograd F(2×2, 3×3) (3×3, stride 1): per image, the input goes into the padded,
/// phase-split copy of [`Grid`] for the 4×4 input tiles seen as a stride-2 window (so the 16
/// elements of the tiles of a run of 8 tile positions are 16 unit-stride vector loads), the
/// input transform `V = Bᵀ·d·B` runs on those vectors into `V[ξ][c][tiles]`, the 16 products
/// `M[ξ] = U[ξ]·V[ξ]` use the direct form's register tile (`d.mr` channels × `d.nv` vectors
/// of tiles, `U` packed by [`pack_winograd_filter`], broadcasts sequential), and the output
/// transform `Y = Aᵀ·m·A` per channel parks the four 2×2 phases, which are interleaved into
/// output rows with bias + epilogue on the way out. 2.25× fewer FMAs than direct, plus the
/// transforms; one task per (image, block of `mr` output channels), the first of an image in
/// a call transforming its input.
fn emit_winograd(l: &mut Loops, d: &Direct) {
    let win = &d.win;
    let (mr, nv) = (d.mr, d.nv);
    // the vectors' lanes: 8, or 16 on AVX-512 targets (`Loops::vw`)
    let vw = l.lanes();
    let (vt, mt) = (l.vt(), l.mt());
    let nr = vw * nv;
    let (th, tw) = (win.oh.div_ceil(2), win.ow.div_ceil(2));
    let twin = Window2 {
        oh: th,
        ow: tw,
        k: [4, 4],
        s: [2, 2],
        d: [1, 1],
        ..*win
    };
    let grid = Grid::new(&twin);
    let (wq, plane, slots) = (grid.wq, grid.plane(), grid.slots());
    let gp = (th * wq).div_ceil(nr) * nr;
    let (c, m) = (win.c, d.m);
    let nob = m.div_ceil(mr);
    let np = win.oh * win.ow;
    let zv = l.vsplat(0.0);
    let alloc = |l: &mut Loops, len: usize| l.scratch(len);
    let xlen = (c * slots * plane + gp + 2 * wq + 2 * vw).div_ceil(vw) * vw;
    let xp = alloc(l, xlen);
    let i = l.open_range(0, xlen, vw);
    emit_store(l, &xp, &zv, &i, None);
    l.close();
    let vb = alloc(l, 16 * c * gp);
    let mb = alloc(l, 16 * mr * gp);
    let yg = alloc(l, 4 * gp + 2 * vw);
    // Tasks: (image, block of mr output channels); the first task of an image in a call
    // copies and transforms its input.
    let t = l.fresh("t");
    let one = l.c(1);
    l.line(&format!(
        "scf.for {t} = {} to {} step {one} {{",
        d.tasks.0, d.tasks.1
    ));
    let nob_c = l.c(nob as i64);
    let n = l.op(&format!("arith.divui {t}, {nob_c} : index"));
    let ob = l.op(&format!("arith.remui {t}, {nob_c} : index"));
    let c0 = l.c(0);
    let f1 = l.op(&format!("arith.cmpi eq, {t}, {} : index", d.tasks.0));
    let f2 = l.op(&format!("arith.cmpi eq, {ob}, {c0} : index"));
    let first = l.op(&format!("arith.ori {f1}, {f2} : i1"));
    l.line(&format!("scf.if {first} {{"));
    emit_copy(l, &twin, &grid, d.x, &xp, &n, &c0, c, false, None);
    // Input transform.
    let ci = l.open(c);
    let xb = l.affine(&ci, (slots * plane) as i64, 0);
    let g = l.open_range(0, gp, vw);
    let xg = l.add(&xb, &g);
    let mut dv = vec![vec![String::new(); 4]; 4];
    for (r, row) in dv.iter_mut().enumerate() {
        for (s, x) in row.iter_mut().enumerate() {
            let i = l.addc(&xg, grid.tap(&twin, r, s));
            *x = l.op(&format!("vector.load {xp}[{i}] : {M1}, {vt}"));
        }
    }
    let add = |l: &mut Loops, a: &str, b: &str| l.op(&format!("arith.addf {a}, {b} : {vt}"));
    let sub = |l: &mut Loops, a: &str, b: &str| l.op(&format!("arith.subf {a}, {b} : {vt}"));
    let mut t = vec![vec![String::new(); 4]; 4];
    for j in 0..4 {
        t[0][j] = sub(l, &dv[0][j], &dv[2][j]);
        t[1][j] = add(l, &dv[1][j], &dv[2][j]);
        t[2][j] = sub(l, &dv[2][j], &dv[1][j]);
        t[3][j] = sub(l, &dv[1][j], &dv[3][j]);
    }
    for (i, ti) in t.iter().enumerate() {
        let v = [
            sub(l, &ti[0], &ti[2]),
            add(l, &ti[1], &ti[2]),
            sub(l, &ti[2], &ti[1]),
            sub(l, &ti[1], &ti[3]),
        ];
        for (j, v) in v.iter().enumerate() {
            let base = l.affine(&ci, gp as i64, ((i * 4 + j) * c * gp) as i64);
            let idx = l.add(&base, &g);
            emit_store(l, &vb, v, &idx, None);
        }
    }
    l.close();
    l.close();
    l.close();
    // The 16 products M[ξ] = U[ξ] · V[ξ] for this block: `M[ξ][r][tiles]`.
    let xi = l.open(16);
    let g0 = l.open_range(0, gp, nr);
    let nacc = mr * nv;
    let res = l.fresh("res");
    let cc = l.fresh("c");
    let accs: Vec<String> = (0..nacc).map(|_| l.fresh("acc")).collect();
    let ch = l.c(c as i64);
    l.line(&format!(
        "{res}:{nacc} = scf.for {cc} = {c0} to {ch} step {one} iter_args({}) -> ({}) {{",
        accs.iter()
            .map(|a| format!("{a} = {zv}"))
            .collect::<Vec<_>>()
            .join(", "),
        vec![vt.as_str(); nacc].join(", ")
    ));
    let xc = l.affine(&xi, c as i64, 0);
    let xcc = l.add(&xc, &cc);
    let vrow = l.affine(&xcc, gp as i64, 0);
    let vbase = l.add(&vrow, &g0);
    let xs: Vec<String> = (0..nv)
        .map(|v| {
            let i = l.addc(&vbase, v * vw);
            l.op(&format!("vector.load {vb}[{i}] : {M1}, {vt}"))
        })
        .collect();
    let xo = l.affine(&xi, nob as i64, 0);
    let xob = l.add(&xo, &ob);
    let ub0 = l.affine(&xob, c as i64, 0);
    let ub1 = l.add(&ub0, &cc);
    let ub = l.affine(&ub1, mr as i64, 0);
    let mut cur = accs.clone();
    for r in 0..mr {
        let i = l.addc(&ub, r);
        let s = l.op(&format!("memref.load {}[{i}] : {M1}", d.w));
        let b = l.op(&format!("vector.broadcast {s} : f32 to {vt}"));
        for v in 0..nv {
            let a = &cur[r * nv + v];
            cur[r * nv + v] = l.op(&format!("vector.fma {b}, {}, {a} : {vt}", xs[v]));
        }
    }
    l.line(&format!(
        "scf.yield {} : {}\n  }}",
        cur.join(", "),
        vec![vt.as_str(); nacc].join(", ")
    ));
    let row0 = l.affine(&xi, mr as i64, 0);
    for r in 0..mr {
        let row = l.addc(&row0, r);
        let rb = l.affine(&row, gp as i64, 0);
        let base = l.add(&rb, &g0);
        for v in 0..nv {
            let i = l.addc(&base, v * vw);
            emit_store(l, &mb, &format!("{res}#{}", r * nv + v), &i, None);
        }
    }
    l.close();
    l.close();
    // Output transform per channel, then the 2×2 phases interleaved into output rows.
    let o0 = l.affine(&ob, mr as i64, 0);
    let (mc, mrc) = (l.c(m as i64), l.c(mr as i64));
    let oe = l.op(&format!("arith.addi {o0}, {mrc} : index"));
    let oe = l.op(&format!("arith.minui {oe}, {mc} : index"));
    let o = l.fresh("o");
    l.line(&format!("scf.for {o} = {o0} to {oe} step {one} {{"));
    let r = l.op(&format!("arith.subi {o}, {o0} : index"));
    let g = l.open_range(0, gp, vw);
    let mut mv = vec![vec![String::new(); 4]; 4];
    for (i, row) in mv.iter_mut().enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            let b = l.affine(&r, gp as i64, ((i * 4 + j) * mr * gp) as i64);
            let idx = l.add(&b, &g);
            *x = l.op(&format!("vector.load {mb}[{idx}] : {M1}, {vt}"));
        }
    }
    let mut sv = vec![vec![String::new(); 4]; 2];
    for j in 0..4 {
        let a = add(l, &mv[0][j], &mv[1][j]);
        sv[0][j] = add(l, &a, &mv[2][j]);
        let b = sub(l, &mv[1][j], &mv[2][j]);
        sv[1][j] = sub(l, &b, &mv[3][j]);
    }
    for (a, srow) in sv.iter().enumerate() {
        let y0 = add(l, &srow[0], &srow[1]);
        let y0 = add(l, &y0, &srow[2]);
        let y1 = sub(l, &srow[1], &srow[2]);
        let y1 = sub(l, &y1, &srow[3]);
        for (b, y) in [y0, y1].iter().enumerate() {
            let idx = l.addc(&g, (a * 2 + b) * gp);
            emit_store(l, &yg, y, &idx, None);
        }
    }
    l.close();
    let bias = d.bias.map(|b| {
        let s = l.op(&format!("memref.load {b}[{o}] : {M1}"));
        l.op(&format!("vector.broadcast {s} : f32 to {vt}"))
    });
    let nm = l.affine(&n, m as i64, 0);
    let nmo = l.add(&nm, &o);
    let ybase = l.affine(&nmo, np as i64, 0);
    // the first halves of the two column vectors, interleaved: 0, vw, 1, vw + 1, ...
    let interleave = (0..vw / 2)
        .flat_map(|i| [i, i + vw])
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for oy in 0..win.oh {
        let (ti, a) = (oy / 2, oy % 2);
        for j in 0..win.ow.div_ceil(vw) {
            // a block of vw output columns: vw/2 tiles of 2 columns
            let src = ti * wq + vw / 2 * j;
            let i0 = l.c(((a * 2) * gp + src) as i64);
            let i1 = l.c(((a * 2 + 1) * gp + src) as i64);
            let y0 = l.op(&format!("vector.load {yg}[{i0}] : {M1}, {vt}"));
            let y1 = l.op(&format!("vector.load {yg}[{i1}] : {M1}, {vt}"));
            let mut val = l.op(&format!(
                "vector.shuffle {y0}, {y1} [{interleave}] : {vt}, {vt}"
            ));
            if let Some(b) = &bias {
                val = l.op(&format!("arith.addf {val}, {b} : {vt}"));
            }
            let idx = l.addc(&ybase, oy * win.ow + j * vw);
            let left = win.ow - j * vw;
            let mask = (left < vw).then(|| l.op(&format!("vector.constant_mask [{left}] : {mt}")));
            let val = emit_epi(l, d, val, &idx, mask.as_deref());
            emit_store(l, d.y, &val, &idx, mask.as_deref());
        }
    }
    l.close();
    l.close();
}

/// Emits the direct convolution (see the module doc) into `l`.
fn emit_direct(l: &mut Loops, d: &Direct) {
    let win = &d.win;
    let (mr, nv) = (d.mr, d.nv);
    // the vectors' lanes: 8, or 16 on AVX-512 targets (`Loops::vw`)
    let vw = l.lanes();
    let (vt, mt) = (l.vt(), l.mt());
    let nr = vw * nv;
    let (cg, mg) = (win.c / d.group, d.m / d.group);
    let kk = win.k[0] * win.k[1];
    let in_place = reads_in_place(win, nr);
    let grid = if in_place {
        Grid {
            rph: vec![0],
            cph: vec![0],
            hq: win.h,
            wq: win.w,
        }
    } else {
        Grid::new(win)
    };
    let (wq, plane, slots) = (grid.wq, grid.plane(), grid.slots());
    let npos = win.oh * wq;
    let gp = npos.div_ceil(nr) * nr;
    let direct_store = wq == win.ow || d.rows;
    let p_out = win.oh * win.ow;
    let zv = l.vsplat(0.0);
    let nb = win.oh.div_ceil(d.row_block);
    // Scratch: the padded copy of one group's input channels (zeroed once per call: only its
    // interior is rewritten per (image, group)) and, when output rows are narrower than grid
    // rows, the block of raw tiles.
    let xp = if in_place {
        d.x.to_string()
    } else {
        let len = (cg * slots * plane + nr + wq + vw).div_ceil(vw) * vw;
        let xp = l.scratch(len);
        let i = l.open_range(0, len, vw);
        emit_store(l, &xp, &zv, &i, None);
        l.close();
        xp
    };
    let yb = (!direct_store).then(|| l.scratch(mr * gp + 2 * vw));
    // Tasks: (image, block of output rows, group, block of mr output channels), in that
    // order. A task that starts a new (image, row block, group), or a call, first copies that
    // group's input channels (the rows its output rows read).
    let nob = mg.div_ceil(mr);
    let nblk = d.group * nob;
    let t = l.fresh("t");
    let one = l.c(1);
    l.line(&format!(
        "scf.for {t} = {} to {} step {one} {{",
        d.tasks.0, d.tasks.1
    ));
    let nblk_c = l.c(nblk as i64);
    let per_img = l.c((nb * nblk) as i64);
    let n = l.op(&format!("arith.divui {t}, {per_img} : index"));
    let blk = l.op(&format!("arith.remui {t}, {nblk_c} : index"));
    // The row block `[r0, r1)` and whether it is the last one.
    let band = (nb > 1).then(|| {
        let tb = l.op(&format!("arith.divui {t}, {nblk_c} : index"));
        let nb_c = l.c(nb as i64);
        let b = l.op(&format!("arith.remui {tb}, {nb_c} : index"));
        let r0 = l.affine(&b, d.row_block as i64, 0);
        let r1raw = l.affine(&b, d.row_block as i64, d.row_block as i64);
        let oh_c = l.c(win.oh as i64);
        let r1 = l.min(&r1raw, &oh_c);
        let last = l.op(&format!("arith.cmpi sge, {r1raw}, {oh_c} : index"));
        (r0, r1, last)
    });
    let nob_c = l.c(nob as i64);
    let gi = l.op(&format!("arith.divui {blk}, {nob_c} : index"));
    let obi = l.op(&format!("arith.remui {blk}, {nob_c} : index"));
    let ob = l.affine(&obi, mr as i64, 0);
    // Flat tiling: the tiles of the band's positions `[r0·wq, r1·wq)` (whole tiles of the
    // grid: bands that store straight to the output are whole tiles; the others take the
    // tiles that overlap them, into their own buffer), the last band's up to the end.
    let flat_band = band.as_ref().filter(|_| !d.rows).map(|(r0, r1, last)| {
        let mut lo = l.affine(r0, wq as i64, 0);
        let mut hi = l.affine(r1, wq as i64, 0);
        if !direct_store {
            let nr_c = l.c(nr as i64);
            let q = l.op(&format!("arith.divui {lo}, {nr_c} : index"));
            lo = l.affine(&q, nr as i64, 0);
            let h = l.affine(&hi, 1, nr as i64 - 1);
            let q = l.op(&format!("arith.divui {h}, {nr_c} : index"));
            hi = l.affine(&q, nr as i64, 0);
        }
        (lo, hi, last.clone())
    });
    if !in_place {
        let z = l.c(0);
        let f1 = l.op(&format!("arith.cmpi eq, {t}, {} : index", d.tasks.0));
        let f2 = l.op(&format!("arith.cmpi eq, {obi}, {z} : index"));
        let first = l.op(&format!("arith.ori {f1}, {f2} : i1"));
        l.line(&format!("scf.if {first} {{"));
        let ch0 = l.affine(&gi, cg as i64, 0);
        // Grid rows read by the band's tiles: from the first tile's row to the last tile's
        // row plus the taps' reach.
        let rows = band.as_ref().map(|(r0, r1, _)| match &flat_band {
            None => {
                let hi = l.affine(r1, 1, (grid.hq - win.oh) as i64);
                (r0.clone(), hi)
            }
            Some((lo, hi, _)) => {
                let wq_c = l.c(wq as i64);
                let q0 = l.op(&format!("arith.divui {lo}, {wq_c} : index"));
                let h = l.affine(hi, 1, wq as i64 - 1);
                let q1 = l.op(&format!("arith.divui {h}, {wq_c} : index"));
                let q1 = l.affine(&q1, 1, (grid.hq - win.oh) as i64);
                let hq = l.c(grid.hq as i64);
                (q0, l.min(&q1, &hq))
            }
        });
        let rows = rows.as_ref().map(|(a, b)| (a.as_str(), b.as_str()));
        emit_copy(l, win, &grid, d.x, &xp, &n, &ch0, cg, true, rows);
        l.close();
    }
    let gm = l.affine(&gi, mg as i64, 0);
    let o0 = l.add(&gm, &ob);
    let ragged = !mg.is_multiple_of(mr);
    let mut rows = Vec::new();
    let mut valid = Vec::new();
    let mut bias = Vec::new();
    let mut ybase = Vec::new();
    for r in 0..mr {
        let orow = l.addc(&o0, r);
        let row = if ragged {
            let obr = l.addc(&ob, r);
            let mgc = l.c(mg as i64);
            let ok = l.op(&format!("arith.cmpi slt, {obr}, {mgc} : index"));
            valid.push(ok.clone());
            l.op(&format!("arith.select {ok}, {orow}, {o0} : index"))
        } else {
            orow
        };
        bias.push(d.bias.map(|b| {
            let s = l.op(&format!("memref.load {b}[{row}] : {M1}"));
            l.op(&format!("vector.broadcast {s} : f32 to {vt}"))
        }));
        let nm = l.affine(&n, d.m as i64, 0);
        let nmo = l.add(&nm, &row);
        ybase.push(l.affine(&nmo, p_out as i64, 0));
        rows.push(row);
    }
    // Tiles over the grid positions: for direct stores, the full ones first, then the last,
    // partial one with masked stores.
    // Row tiling: the tiles of each output row, skipping the grid's pad columns.
    let (span, end) = if d.rows {
        (win.ow, win.ow.div_ceil(nr) * nr)
    } else {
        (npos, gp)
    };
    let orow = d.rows.then(|| match &band {
        None => l.open(win.oh),
        Some((r0, r1, _)) => l.open_dyn(r0, r1, 1),
    });
    // Flat tiling: the band's positions `[r0·wq, r1·wq)`, the last band's up to the end.

    let full_end = if yb.is_some() { gp } else { span / nr * nr };
    let mut ranges = vec![(0, full_end, false)];
    if full_end < end {
        ranges.push((full_end, end, true));
    }
    for &(lo, hi, tail) in ranges.iter().filter(|r| r.0 < r.1) {
        // `t0`: the tile's first position in the row (row tiling) or the grid; `q0`: in the grid.
        let t0 = match &flat_band {
            None => l.open_range(lo, hi, nr),
            Some((blo, bhi, last)) => {
                let (lo, hi) = (l.c(lo as i64), l.c(hi as i64));
                let lo = l.max(&lo, blo);
                let cut = l.min(&hi, bhi);
                let hi = l.op(&format!("arith.select {last}, {hi}, {cut} : index"));
                l.open_dyn(&lo, &hi, nr)
            }
        };
        let (q0, p0) = match &orow {
            Some(oh) => {
                let a = l.affine(oh, wq as i64, 0);
                let b = l.affine(oh, win.ow as i64, 0);
                (l.add(&a, &t0), l.add(&b, &t0))
            }
            None => (t0.clone(), t0.clone()),
        };
        // The tile: Σ over channels of the group and taps.
        let nacc = mr * nv;
        let res = l.fresh("res");
        let c = l.fresh("c");
        let accs: Vec<String> = (0..nacc).map(|_| l.fresh("acc")).collect();
        let (z, one, cgc) = (l.c(0), l.c(1), l.c(cg as i64));
        l.line(&format!(
            "{res}:{nacc} = scf.for {c} = {z} to {cgc} step {one} iter_args({}) -> ({}) {{",
            accs.iter()
                .map(|a| format!("{a} = {zv}"))
                .collect::<Vec<_>>()
                .join(", "),
            vec![vt.as_str(); nacc].join(", ")
        ));
        let gcg = l.affine(&gi, cg as i64, 0);
        let chn = l.add(&gcg, &c);
        let xb = if in_place {
            let nc = l.affine(&n, win.c as i64, 0);
            let t = l.add(&nc, &chn);
            let t = l.affine(&t, plane as i64, 0);
            l.add(&t, &q0)
        } else {
            let t = l.affine(&c, (slots * plane) as i64, 0);
            l.add(&t, &q0)
        };
        let wc = l.affine(&c, kk as i64, 0);
        // Packed filter: the block's taps of channel `c` start at `((blk·cg + c)·kk)·mr`.
        let wpk = d.packed.then(|| {
            let b = l.affine(&blk, cg as i64, 0);
            let bc = l.add(&b, &c);
            l.affine(&bc, (kk * mr) as i64, 0)
        });
        let mut cur = accs.clone();
        for ki in 0..win.k[0] {
            for kj in 0..win.k[1] {
                let t = ki * win.k[1] + kj;
                let off = grid.tap(win, ki, kj);
                let xs: Vec<String> = (0..nv)
                    .map(|v| {
                        let i = l.addc(&xb, off + v * vw);
                        l.op(&format!("vector.load {xp}[{i}] : {M1}, {vt}"))
                    })
                    .collect();
                let wcol = l.addc(&wc, t);
                for r in 0..mr {
                    let s = match &wpk {
                        Some(wb) => {
                            let i = l.addc(wb, t * mr + r);
                            l.op(&format!("memref.load {}[{i}] : {M1}", d.w))
                        }
                        None => l.op(&format!(
                            "memref.load {}[{}, {wcol}] : memref<?x?xf32>",
                            d.w, rows[r]
                        )),
                    };
                    let b = l.op(&format!("vector.broadcast {s} : f32 to {vt}"));
                    for v in 0..nv {
                        let a = &cur[r * nv + v];
                        cur[r * nv + v] = l.op(&format!("vector.fma {b}, {}, {a} : {vt}", xs[v]));
                    }
                }
            }
        }
        l.line(&format!(
            "scf.yield {} : {}\n  }}",
            cur.join(", "),
            vec![vt.as_str(); nacc].join(", ")
        ));
        let acc = |r: usize, v: usize| format!("{res}#{}", r * nv + v);
        match &yb {
            None => {
                // Grid rows are output rows: bias + epilogue on the accumulators, then store.
                for r in 0..mr {
                    if ragged {
                        l.line(&format!("scf.if {} {{", valid[r]));
                    }
                    for v in 0..nv {
                        let pos = l.addc(&p0, v * vw);
                        let idx = l.add(&ybase[r], &pos);
                        let mask = tail.then(|| {
                            let np = l.c(span as i64);
                            let tv = l.addc(&t0, v * vw);
                            let left = l.op(&format!("arith.subi {np}, {tv} : index"));
                            l.op(&format!("vector.create_mask {left} : {mt}"))
                        });
                        let mut val = acc(r, v);
                        if let Some(b) = &bias[r] {
                            val = l.op(&format!("arith.addf {val}, {b} : {vt}"));
                        }
                        let val = emit_epi(l, d, val, &idx, mask.as_deref());
                        emit_store(l, d.y, &val, &idx, mask.as_deref());
                    }
                    if ragged {
                        l.close();
                    }
                }
                l.close();
            }
            Some(yb) => {
                // Park the tiles; once the block is done, drop the pad columns of each row while
                // applying bias + epilogue (the block is still in L1).
                for r in 0..mr {
                    for v in 0..nv {
                        let i = l.addc(&q0, r * gp + v * vw);
                        emit_store(l, yb, &acc(r, v), &i, None);
                    }
                }
                l.close();
            }
        }
    }
    if orow.is_some() {
        l.close();
    }
    if let Some(yb) = &yb {
        for r in 0..mr {
            if ragged {
                l.line(&format!("scf.if {} {{", valid[r]));
            }
            let oh = match &band {
                None => l.open(win.oh),
                Some((r0, r1, _)) => l.open_dyn(r0, r1, 1),
            };
            let src0 = l.affine(&oh, wq as i64, (r * gp) as i64);
            let dr = l.affine(&oh, win.ow as i64, 0);
            let dst0 = l.add(&ybase[r], &dr);
            for j in 0..win.ow.div_ceil(vw) {
                let si = l.addc(&src0, j * vw);
                let di = l.addc(&dst0, j * vw);
                let left = win.ow - j * vw;
                let mask =
                    (left < vw).then(|| l.op(&format!("vector.constant_mask [{left}] : {mt}")));
                let mut val = l.op(&format!("vector.load {yb}[{si}] : {M1}, {vt}"));
                if let Some(b) = &bias[r] {
                    val = l.op(&format!("arith.addf {val}, {b} : {vt}"));
                }
                let val = emit_epi(l, d, val, &di, mask.as_deref());
                emit_store(l, d.y, &val, &di, mask.as_deref());
            }
            l.close();
            if ragged {
                l.close();
            }
        }
    }
    l.close(); // t
}

/// Lowers a `Contraction` kernel whose contraction is a `Conv` with schedule `sched`; the
/// second result are the kernel's derived constants (passed after its inputs).
pub fn lower_with(
    g: &Graph,
    k: &fusion::Kernel,
    name: &str,
    sched: &ConvSchedule,
) -> Result<(Lowered, Vec<DerivedConst>), String> {
    let ci = k
        .nodes
        .iter()
        .copied()
        .find(|&n| matches!(g.nodes[n].op, Op::Nn(NnOp::Conv(_))))
        .ok_or("no Conv in the kernel")?;
    let cn = &g.nodes[ci];
    let Op::Nn(NnOp::Conv(attrs)) = &cn.op else {
        unreachable!()
    };
    let (Some(x_v), Some(w_v)) = (cn.inputs[0], cn.inputs[1]) else {
        return Err("missing Conv operand".into());
    };
    let b_v = cn.inputs.get(2).copied().flatten();
    let y_v = cn.outputs[0];
    for v in [x_v, w_v, y_v].into_iter().chain(b_v) {
        if g.values[v].fact.dtype != DType::F32 {
            return Err(format!(
                "Conv on {} (f32 only)",
                g.values[v].fact.dtype.name()
            ));
        }
    }
    let xs = known(g, x_v)?;
    let ws = known(g, w_v)?;
    let ys = known(g, y_v)?;
    if ws.len() != 4 || xs.len() != 4 {
        return Err("Conv of rank other than 2-D".into());
    }
    let win = Window2::new(&attrs.window, &xs, [ws[2], ws[3]], false)?;
    let group = attrs.group;
    let m = ws[0];
    if ys != [win.n, m, win.oh, win.ow] || win.c % group != 0 || m % group != 0 {
        return Err("Conv shapes do not match".into());
    }
    let y_s = g.values[y_v].fact.shape.dims().to_vec();
    for &n in &k.nodes {
        if n != ci
            && g.nodes[n]
                .outputs
                .iter()
                .any(|&o| g.values[o].fact.shape.dims() != y_s)
        {
            return Err(format!(
                "epilogue node '{}' has another shape than the Conv",
                g.nodes[n].name
            ));
        }
    }
    let epi_nodes: Vec<usize> = k.nodes.iter().copied().filter(|&n| n != ci).collect();
    for &n in &epi_nodes {
        let ins = &g.nodes[n].inputs;
        if [x_v, w_v]
            .into_iter()
            .chain(b_v)
            .any(|v| ins.contains(&Some(v)))
        {
            return Err("a Conv operand is also used by the epilogue".into());
        }
    }
    let direct = group > 1 || sched.algo == ConvAlgo::Direct;
    let (cg, mg) = (win.c / group, m / group);
    let (kk, pp) = (cg * win.k[0] * win.k[1], win.oh * win.ow);
    let total = win.n * m * pp;
    // Register tile and whether the input is read in place.
    let wq = if reads_in_place(&win, usize::MAX) {
        win.w
    } else {
        Grid::new(&win).wq
    };
    let (mr, nv, rows) = sched.tile(mg, [win.oh, win.ow, wq - win.ow], reads_in_place(&win, 1));
    // AVX-512 targets: the plain direct, channel-vector and Winograd forms use 16-lane
    // vectors (the dot form keeps 8).
    let wide = sched.matmul.vector_width == 16;
    // Lanes of the plain direct form's tiles that hold output positions, in percent, at the
    // vector width it would use.
    let lane_use = {
        let (dlanes, dnv, drows) = if wide {
            let (_, nv16, rows16) = sched.tile_lanes(
                mg,
                [win.oh, win.ow, wq - win.ow],
                reads_in_place(&win, 1),
                16,
            );
            (16, nv16, rows16)
        } else {
            (VW, nv, rows)
        };
        let nr = dlanes * dnv;
        let lanes = if drows {
            win.oh * win.ow.div_ceil(nr) * nr
        } else {
            (win.oh * wq).div_ceil(nr) * nr
        };
        pp * 100 / lanes.max(1)
    };
    // The channel-vector form's lanes run over output channels: 16 where there are as many.
    let chan_lanes = if wide && m >= 16 { 16 } else { VW };
    let fused = if direct {
        fused_epilogue(g, k, ci, y_v, &ys)
    } else {
        None
    };
    // The channel-vector form needs the filter's data to pack it.
    let w_data = g.const_value(w_v).map(|t| t.to_f64_vec());
    let use_chan = direct
        && group == 1
        && fused.is_some()
        && w_data.is_some()
        && m >= VW
        && pp <= sched.chan_max_positions
        && lane_use < sched.chan_below_lane_use_pct;
    let use_wino = direct
        && !use_chan
        && winograd_fits(&win, group)
        && fused.is_some()
        && w_data.is_some()
        && sched.winograd_min_channels > 0
        && win.c.min(m) >= sched.winograd_min_channels
        && pp >= sched.winograd_min_positions;
    let use_dot = direct
        && !use_chan
        && !use_wino
        && group == 1
        && pp <= sched.dot_max_positions
        && (win.oh * Grid::new(&win).wq).div_ceil(VW) * VW * 10 >= pp * 13;
    // The plain direct, channel-vector and Winograd forms take the target's vector width
    // (16 lanes on AVX-512, with their own register tiles); the dot form keeps 8.
    let plain_direct = direct && !use_dot && !use_chan && !use_wino;
    let dl = if use_chan {
        chan_lanes
    } else if (plain_direct || use_wino) && wide {
        16
    } else {
        VW
    };
    let (mr, nv, rows) = if dl == VW {
        (mr, nv, rows)
    } else {
        sched.tile_lanes(
            mg,
            [win.oh, win.ow, wq - win.ow],
            reads_in_place(&win, 1),
            dl,
        )
    };
    let in_place = plain_direct && reads_in_place(&win, dl * nv);
    // The fused direct form reads its filter packed (see `pack_direct_filter`).
    let pack_direct =
        direct && !use_dot && !use_chan && !use_wino && fused.is_some() && w_data.is_some();
    let mut syms = SymDims::default();
    let mut p = Prologue::new();
    let mut args = if use_chan || use_wino || pack_direct {
        vec![x_v]
    } else {
        vec![x_v, w_v]
    };
    let mut consts = Vec::new();
    let pointwise_gemm = !direct
        && win.k == [1, 1]
        && win.s == [1, 1]
        && win.p == [0, 0]
        && (win.oh, win.ow) == (win.h, win.w);
    let x_mem = if in_place || use_chan {
        p.memref_f32(0, &cdims(&[win.n * win.c * win.h * win.w]))
    } else if pointwise_gemm {
        p.memref_f32(0, &cdims(&[win.n * win.c, win.h * win.w]))
    } else {
        p.memref_f32(0, &cdims(&xs))
    };
    let w_mem = if use_chan || use_wino || pack_direct {
        String::new()
    } else {
        p.memref_f32(1, &cdims(&[m, kk]))
    };
    let b_mem = b_v.map(|b| {
        let memref = p.memref_f32(args.len(), &cdims(&[m]));
        args.push(b);
        memref
    });
    let mut l = Loops {
        vw: dl,
        ..Loops::default()
    };
    let scratch_bytes;
    let mm = format!("{name}_mm");
    // Only the fully fused direct kernel splits into tasks: a separate epilogue pass would
    // run over the whole output in every call.
    let mut ntasks = 1;
    if let Some(FusedEpilogue {
        ops: epi,
        bufs,
        taps,
        out,
    }) = &fused
    {
        // Everything in one pass: conv + bias + epilogue on the register tiles.
        let bufs: Vec<String> = bufs
            .iter()
            .map(|&v| {
                args.push(v);
                p.memref_f32(args.len() - 1, &cdims(&[total]))
            })
            .collect();
        let (mr, nv) = if use_wino {
            let (th, tw) = (win.oh.div_ceil(2), win.ow.div_ceil(2));
            let (mr, nv, _) = sched.tile_lanes(m, [th, tw, 1], false, dl);
            (mr, nv)
        } else if use_chan {
            chan_tile(&win, m, dl)
        } else if use_dot {
            let pb = pp.min(4);
            (if pb == 1 { 8 } else { 12 / pb }, pb)
        } else {
            (mr, nv)
        };
        let w_mem = match &w_data {
            Some(w) if use_chan => {
                let w: Vec<f32> = w.iter().map(|&x| x as f32).collect();
                let packed = pack_chan_filter(&w, m, win.c, win.k[0] * win.k[1], mr, dl);
                let len = packed.len();
                consts.push(DerivedConst {
                    name: format!("{}.chan{mr}", g.values[w_v].name),
                    tensor: kiln_ir::Tensor::from_vec(&[len], packed),
                });
                p.memref_f32(args.len(), &cdims(&[len]))
            }
            Some(w) if pack_direct => {
                let w: Vec<f32> = w.iter().map(|&x| x as f32).collect();
                let ck = win.c / group * win.k[0] * win.k[1];
                let packed = pack_direct_filter(&w, m, group, ck, mr);
                let len = packed.len();
                consts.push(DerivedConst {
                    name: format!("{}.direct{mr}", g.values[w_v].name),
                    tensor: kiln_ir::Tensor::from_vec(&[len], packed),
                });
                p.memref_f32(args.len(), &cdims(&[len]))
            }
            Some(w) if use_wino => {
                let w: Vec<f32> = w.iter().map(|&x| x as f32).collect();
                let packed = pack_winograd_filter(&w, m, win.c, mr);
                let len = packed.len();
                consts.push(DerivedConst {
                    name: format!("{}.wino{mr}", g.values[w_v].name),
                    tensor: kiln_ir::Tensor::from_vec(&[len], packed),
                });
                p.memref_f32(args.len(), &cdims(&[len]))
            }
            _ => w_mem,
        };
        // the kernel's outputs follow its inputs, in `k.outputs` order
        let out_mem = |p: &mut Prologue, v: ValueId| {
            let j = k
                .outputs
                .iter()
                .position(|&o| o == v)
                .expect("a kernel output");
            p.memref_f32(args.len() + consts.len() + j, &cdims(&[total]))
        };
        let y = out_mem(&mut p, *out);
        let taps: Vec<String> = taps.iter().map(|&v| out_mem(&mut p, v)).collect();
        let rb = if use_wino || use_chan || use_dot {
            win.oh
        } else {
            let gwq = if in_place { win.w } else { Grid::new(&win).wq };
            row_block(&win, gwq, dl * nv, !rows && gwq == win.ow)
        };
        ntasks = if use_wino {
            win.n * m.div_ceil(mr)
        } else if use_chan {
            win.n * m.div_ceil(dl * mr)
        } else {
            direct_tasks(&win, group, m, mr, rb)
        };
        let tc = p.const_index(ntasks as i64);
        let range = p.task_range(&tc);
        let emit = if use_wino {
            emit_winograd
        } else if use_chan {
            emit_chan
        } else if use_dot {
            emit_dot
        } else {
            emit_direct
        };
        emit(
            &mut l,
            &Direct {
                win,
                group,
                m,
                mr,
                nv,
                x: &x_mem,
                w: &w_mem,
                bias: b_mem.as_deref(),
                y: &y,
                epi,
                bufs: &bufs,
                taps: &taps,
                tasks: range,
                rows,
                packed: pack_direct,
                row_block: rb,
            },
        );
        scratch_bytes = l.scratch_bytes();
        p.push(&l.finish());
    } else {
        // The conv (+ bias when direct) into the output, then the epilogue as a generic pass.
        let mut body = Body::default();
        let mut ins = Vec::new();
        if let (Some(b), Some(memref), false) = (b_v, &b_mem, direct) {
            ins.push(GenericInput {
                value: b,
                memref: memref.clone(),
                dims: vec![1],
                ty: Ty::F32,
            });
        }
        for &v in &k.inputs {
            if v == x_v || v == w_v || Some(v) == b_v {
                continue;
            }
            let ty = Ty::of(g.values[v].fact.dtype)?;
            match classify_input(g, v, &y_s)? {
                InputKind::Scalar(x) => body.bind_const(v, x, ty),
                InputKind::Buffer(dims) => {
                    let sd: Vec<Dim> = dims.iter().map(|&d| y_s[d].clone()).collect();
                    let memref = p.memref(args.len(), &syms.dims(&sd)?, ty.storage());
                    args.push(v);
                    ins.push(GenericInput {
                        value: v,
                        memref,
                        dims,
                        ty,
                    });
                }
            }
        }
        let full = syms.dims(&y_s)?;
        let mut outs = Vec::new();
        for (i, &v) in k.outputs.iter().enumerate() {
            let ty = Ty::of(g.values[v].fact.dtype)?;
            let memref = p.memref(args.len() + i, &full, ty.storage());
            outs.push(GenericOutput {
                value: v,
                memref,
                ty,
            });
        }
        let pi = outs
            .iter()
            .position(|o| o.ty == Ty::F32)
            .ok_or("no f32 output to hold the convolution")?;
        let out_arg = args.len() + pi;
        if direct {
            let y = p.memref_f32(out_arg, &cdims(&[total]));
            let serial = (l.c(0), l.c(direct_tasks(&win, group, m, mr, win.oh) as i64));
            emit_direct(
                &mut l,
                &Direct {
                    win,
                    group,
                    m,
                    mr,
                    nv,
                    x: &x_mem,
                    w: &w_mem,
                    bias: b_mem.as_deref(),
                    y: &y,
                    epi: &[],
                    bufs: &[],
                    taps: &[],
                    tasks: serial,
                    rows,
                    packed: false,
                    row_block: win.oh,
                },
            );
        } else {
            let y2 = p.memref_f32(out_arg, &cdims(&[win.n * m, pp]));
            emit_im2col_gemm(
                &mut l,
                &win,
                m,
                &x_mem,
                &w_mem,
                &y2,
                pointwise_gemm,
                &mm,
                &sched.matmul,
            );
        }
        scratch_bytes = l.scratch_bytes();
        let mut t = l.finish();
        let need_generic = !epi_nodes.is_empty() || (b_v.is_some() && !direct) || outs.len() > 1;
        if need_generic {
            ins.insert(
                0,
                GenericInput {
                    value: y_v,
                    memref: outs[pi].memref.clone(),
                    dims: (0..y_s.len()).collect(),
                    ty: Ty::F32,
                },
            );
            let text = emit_generic(g, y_s.len(), &ins, &outs, body, &epi_nodes, |b| {
                let (mut y, _) = b.get(y_v, g)?;
                if let (Some(bv), false) = (b_v, direct) {
                    let (bias, _) = b.get(bv, g)?;
                    y = b.f2("addf", &y, &bias);
                }
                b.vals.insert(y_v, (y, Ty::F32));
                Ok(())
            })?;
            t.push_str(&text);
        } else if k.outputs != [y_v] {
            return Err("Conv output is not the kernel output".into());
        }
        p.push(&t);
    }
    let mut mlir = p.finish(name);
    if !direct {
        mlir.push_str(&matmul_memref_func(&mm, &sched.matmul));
    }
    let kernel = Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: args.len() + consts.len(),
            outputs: k.outputs.len(),
            dims: syms.0,
            tasks: ntasks as u64,
            // Every scratch buffer comes from `l` (the prologue takes none).
            scratch_bytes,
        },
        mlir,
        pipeline: GRAPH_KERNEL_PIPELINE.to_string(),
    };
    Ok(((kernel, args, k.outputs.clone()), consts))
}

/// Emits im2col into a scratch buffer + a call of the packed matmul `@mm` per batch image,
/// writing `W · cols` into `y2` (`[N·M, OH·OW]`). `x` is `[N·C, H·W]` when `pointwise` (the
/// image is its own `cols`), else 4-D.
#[allow(clippy::too_many_arguments)]
fn emit_im2col_gemm(
    l: &mut Loops,
    win: &Window2,
    m: usize,
    x_mem: &str,
    w_mem: &str,
    y2: &str,
    pointwise: bool,
    mm: &str,
    sched: &MatmulSchedule,
) {
    let (kk, pp) = (win.c * win.k[0] * win.k[1], win.oh * win.ow);
    // The matmul's packed panels (W[m, kk] · cols[kk, pp] per image).
    let (ap_len, bp_len) = packed_lens(sched, Some(m), Some(pp), Some(kk));
    let (ap, bp) = (l.scratch(ap_len), l.scratch(bp_len));
    let st = STRIDED_2D;
    let dyn2 = "memref<?x?xf32>";
    let wc = l.op(&format!("memref.cast {w_mem} : {dyn2} to {st}"));
    let cols = if pointwise {
        None
    } else {
        let (text, c) = l.scratch.view(&[kk, pp], "f32", 4);
        l.consts.push_str(&text);
        let cc = l.op(&format!("memref.cast {c} : {dyn2} to {st}"));
        Some((c, cc))
    };
    let n = l.open(win.n);
    let xcols = match &cols {
        None => {
            let r = l.affine(&n, win.c as i64, 0);
            let (cc, cp) = (l.c(win.c as i64), l.c(pp as i64));
            l.op(&format!(
                "memref.subview {x_mem}[{r}, 0] [{cc}, {cp}] [1, 1] : {dyn2} to {st}"
            ))
        }
        Some((c, cc)) => {
            // im2col: cols[(ci·kh + ki)·kw + kj, oh·OW + ow] = x[n, ci, ih, iw] or 0.
            let ch = l.open(win.c);
            let ki = l.open(win.k[0]);
            let kj = l.open(win.k[1]);
            let r0 = l.affine(&ch, win.k[0] as i64, 0);
            let r1 = l.add(&r0, &ki);
            let r2 = l.affine(&r1, win.k[1] as i64, 0);
            let row = l.add(&r2, &kj);
            let oh = l.open(win.oh);
            let (ih, okh) = win.tap(l, 0, &oh, &ki);
            let cb = l.affine(&oh, win.ow as i64, 0);
            let ow = l.open(win.ow);
            let (iw, okw) = win.tap(l, 1, &ow, &kj);
            let ok = l.op(&format!("arith.andi {okh}, {okw} : i1"));
            let zero = l.f(0.0);
            let v = l.fresh("x");
            let ld = l.fresh("x");
            l.line(&format!(
                "{v} = scf.if {ok} -> (f32) {{\n    {ld} = memref.load {x_mem}[{n}, {ch}, {ih}, {iw}] : memref<?x?x?x?xf32>\n    scf.yield {ld} : f32\n  }} else {{\n    scf.yield {zero} : f32\n  }}"
            ));
            let col = l.add(&cb, &ow);
            l.line(&format!("memref.store {v}, {c}[{row}, {col}] : {dyn2}"));
            for _ in 0..5 {
                l.close();
            }
            cc.clone()
        }
    };
    let r = l.affine(&n, m as i64, 0);
    let (cm, cp) = (l.c(m as i64), l.c(pp as i64));
    let yv = l.op(&format!(
        "memref.subview {y2}[{r}, 0] [{cm}, {cp}] [1, 1] : {dyn2} to {st}"
    ));
    l.line(&format!(
        "func.call @{mm}({wc}, {xcols}, {yv}, {ap}, {bp}) : ({st}, {st}, {st}, {PACKED_1D}, {PACKED_1D}) -> ()"
    ));
    l.close();
}
