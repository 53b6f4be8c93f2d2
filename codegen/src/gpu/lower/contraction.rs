//! `Contraction` kernels: MatMul/Gemm and Conv with their fused epilogues.
//!
//! * MatMul/Gemm with f32 operands use the tiled GEMM
//!   ([`gemm_f32`](crate::gpu::kernels::gemm::gemm_f32)) when `A` is not transposed (a
//!   transposed constant `B` is stored transposed at compile time): a 2-D product, a batched
//!   product with a 2-D `B` folded into `M`, or one launch per batch with offset buffers
//!   (numpy batch broadcasting). The GEMM writes the contraction result into the kernel's
//!   output buffer; Gemm's `alpha`, `beta · C` and the fused elementwise nodes then run as a
//!   generic elementwise kernel over that buffer, in place.
//! * At `--precision tf32|f16|bf16` the same GEMMs run on tensor cores ([`tensor_core`]),
//!   with the whole fused epilogue in the kernel's [`Epilogue`] when it can express it
//!   (`fused_epilogue`: Gemm's `alpha`/`beta · C`, a constant scalar scale, a per-column
//!   bias, a residual before or after one Relu / Sigmoid / tanh-Gelu / SiLU; recorded in
//!   [`GpuLowering::fused_epilogues`]), otherwise the in-place epilogue kernel after it; shapes
//!   they cannot take keep the f32 GEMM and are recorded in
//!   [`GpuLowering::tensor_core_fallbacks`].
//! * Everything else (transposed `A`, the result not landing in an output buffer, the
//!   generic-only mode) is one generic kernel: one thread per output element, a dot product
//!   over `K` and the epilogue inline.
//! * f32 2-D Conv in NCHW with groups = 1 uses the implicit-GEMM
//!   [`conv2d`](crate::gpu::kernels::conv::conv2d) (schedule
//!   [`GpuConvSchedule::for_geom`]), depthwise Conv (groups = C = OC) the
//!   [`depthwise_conv2d`](crate::gpu::kernels::depthwise::depthwise_conv2d) kernel. When the
//!   fused nodes are exactly `[+ residual][relu]` (a residual of the output's shape read from
//!   a kernel input, only the last value an output) they run inside the conv kernel with the
//!   bias; any other epilogue runs as a generic elementwise kernel over the conv's result,
//!   in place (as for the GEMM). At `--precision f16|bf16` a groups = 1 conv runs on tensor
//!   cores instead ([`conv2d_mma`]: `X` cast into the scratch region, constant weights
//!   converted at compile time, same epilogue; [`GpuLowering::tensor_core_convs`]); tf32 and
//!   refusals keep the f32 kernel
//!   ([`GpuLowering::tensor_core_conv_fallbacks`]).
//! * Other Convs (any group, stride, dilation, padding; the generic-only mode) are one
//!   generic kernel: one thread per output element, a direct loop over input channels and
//!   taps, then bias and epilogue.

use super::elementwise::{emit_nodes, store_outputs};
use super::generic::{row_major, Gen, GenKernel};
use super::precision::{self, Precision};
use super::tensor_core::{self, GemmCall, GemmSpec};
use super::window::{open_acc, tap_offset};
use super::HostKernel;
use super::{node_input, shape_of, GpuLowering, Launch, LaunchArg, LowerOptions, Operand};
use crate::cpu::lower::conv::Window2;
use crate::cpu::lower::Ty;
use crate::gpu::kernels::conv::{
    self as kconv, conv2d, conv2d_split_k, ConvGeom, ConvLayout, GpuConvSchedule,
};
use crate::gpu::kernels::conv_mma::{conv2d_mma, ConvMmaSchedule};
use crate::gpu::kernels::depthwise;
use crate::gpu::kernels::epilogue::{Activation, Epilogue, Residual};
use crate::gpu::kernels::gemm::{gemm_f32, gemm_f32_batched, GpuGemmSchedule};
use crate::gpu::kernels::gemm_mma::MmaInput;
use crate::gpu::tuning::{gemm_f32_name, gemm_f32_schedule, GpuTemplate, GpuTunable};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, GeluApprox, UnaryKind};
use kiln_ir::ops::linalg::{Gemm, LinalgOp};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{DType, Graph, Op, Tensor, ValueId};
use kiln_passes::fusion;

/// Lowers a `Contraction` kernel (see the module doc).
pub(crate) fn lower(
    g: &Graph,
    k: &fusion::Kernel,
    index: usize,
    name: &str,
    opts: &LowerOptions,
    out: &mut GpuLowering,
) -> Result<(), String> {
    let ci = k
        .nodes
        .iter()
        .copied()
        .find(|&n| matches!(g.nodes[n].op, Op::Linalg(_) | Op::Nn(NnOp::Conv(_))))
        .ok_or("no MatMul, Gemm or Conv in the contraction")?;
    let epi: Vec<usize> = k.nodes.iter().copied().filter(|&n| n != ci).collect();
    let y = g.nodes[ci].outputs[0];
    let ys = shape_of(g, y)?;
    for &n in &epi {
        if !matches!(g.nodes[n].op, Op::Elementwise(_)) {
            return Err(format!(
                "epilogue node '{}' is not elementwise",
                g.nodes[n].name
            ));
        }
        for &o in &g.nodes[n].outputs {
            if shape_of(g, o)? != ys {
                return Err(format!(
                    "epilogue node '{}' has another shape than the contraction",
                    g.nodes[n].name
                ));
            }
        }
    }
    for &n in &[ci] {
        for v in g.nodes[n]
            .inputs
            .iter()
            .flatten()
            .chain(&g.nodes[n].outputs)
        {
            if g.values[*v].fact.dtype != DType::F32 {
                return Err(format!(
                    "contraction on {} (f32 only)",
                    g.values[*v].fact.dtype.name()
                ));
            }
        }
    }
    match &g.nodes[ci].op {
        Op::Nn(NnOp::Conv(_)) => {
            if opts.specialized && special_conv(g, k, (index, name, opts), ci, &epi, out)? {
                return Ok(());
            }
            let gk = conv(g, k, ci, &epi, name)?;
            out.push_generic(index, gk, opts.max_blocks)
        }
        Op::Linalg(op @ (LinalgOp::MatMul | LinalgOp::Gemm(_))) => {
            let gemm = match op {
                LinalgOp::Gemm(gm) => Some(gm.clone()),
                _ => None,
            };
            let mm = MatMul::new(g, ci, gemm)?;
            if opts.specialized && special(g, k, (index, name, opts), &mm, &epi, out)? {
                return Ok(());
            }
            if opts.specialized
                && opts.precision != Precision::F32
                && !out.tensor_core_fallbacks.iter().any(|f| f.0 == index)
            {
                out.tensor_core_fallbacks.push((
                    index,
                    "transposed A, a transposed non-constant B or a result not in an output \
                     buffer (generic f32 kernel)"
                        .into(),
                ));
            }
            let gk = generic_matmul(g, k, &mm, &epi, name)?;
            out.push_generic(index, gk, opts.max_blocks)
        }
        other => Err(format!(
            "{} contractions are not lowered for the GPU",
            other.op_type()
        )),
    }
}

/// Shapes of a MatMul/Gemm.
struct MatMul {
    a: ValueId,
    b: ValueId,
    c: Option<ValueId>,
    y: ValueId,
    a_s: Vec<usize>,
    b_s: Vec<usize>,
    ys: Vec<usize>,
    m: usize,
    n: usize,
    kk: usize,
    gemm: Option<Gemm>,
}

impl MatMul {
    fn new(g: &Graph, ci: usize, gemm: Option<Gemm>) -> Result<MatMul, String> {
        let a = node_input(g, ci, 0)?;
        let b = node_input(g, ci, 1)?;
        let c = g.nodes[ci].inputs.get(2).copied().flatten();
        let y = g.nodes[ci].outputs[0];
        let (a_s, b_s, ys) = (shape_of(g, a)?, shape_of(g, b)?, shape_of(g, y)?);
        if a_s.len() < 2 || b_s.len() < 2 {
            return Err("MatMul with a 1-D operand".into());
        }
        let (ta, tb) = gemm
            .as_ref()
            .map_or((false, false), |gm| (gm.trans_a, gm.trans_b));
        if gemm.is_some() && (a_s.len() != 2 || b_s.len() != 2) {
            return Err("Gemm operands must be 2-D".into());
        }
        let (ra, rb) = (a_s.len(), b_s.len());
        let (m, kk) = if ta {
            (a_s[ra - 1], a_s[ra - 2])
        } else {
            (a_s[ra - 2], a_s[ra - 1])
        };
        let (kb, n) = if tb {
            (b_s[rb - 1], b_s[rb - 2])
        } else {
            (b_s[rb - 2], b_s[rb - 1])
        };
        let r = ys.len();
        if kb != kk || r < 2 || ys[r - 2] != m || ys[r - 1] != n {
            return Err(format!(
                "MatMul shapes {a_s:?} x {b_s:?} -> {ys:?} do not match"
            ));
        }
        Ok(MatMul {
            a,
            b,
            c,
            y,
            a_s,
            b_s,
            ys,
            m,
            n,
            kk,
            gemm,
        })
    }
}

/// Binds the contraction result `y` to `x` after Gemm's `alpha`/`beta · C`, at output
/// multi-index `idx`.
fn gemm_scale(
    g: &Graph,
    gen: &mut Gen,
    mm: &MatMul,
    x: String,
    idx: &[String],
) -> Result<String, String> {
    let Some(gm) = &mm.gemm else { return Ok(x) };
    let mut v = x;
    if gm.alpha != 1.0 {
        let a = gen.b.fc(gm.alpha);
        v = gen.b.f2("mulf", &v, &a);
    }
    if let (Some(c), true) = (mm.c, gm.beta != 0.0) {
        gen.bind_inputs(g, &[c], idx, &mm.ys)?;
        let (cv, _) = gen.b.get(c, g)?;
        let cv = if gm.beta != 1.0 {
            let bt = gen.b.fc(gm.beta);
            gen.b.f2("mulf", &cv, &bt)
        } else {
            cv
        };
        v = gen.b.f2("addf", &v, &cv);
    }
    Ok(v)
}

/// Kernel inputs the epilogue reads (not the contraction operands).
fn epi_inputs(k: &fusion::Kernel, mm_operands: &[ValueId]) -> Vec<ValueId> {
    k.inputs
        .iter()
        .copied()
        .filter(|v| !mm_operands.contains(v))
        .collect()
}

/// The whole contraction as one generic kernel (dot product per output element).
fn generic_matmul(
    g: &Graph,
    k: &fusion::Kernel,
    mm: &MatMul,
    epi: &[usize],
    name: &str,
) -> Result<GenKernel, String> {
    let mut gen = Gen::default();
    let (ab, _) = gen.value_buf(g, mm.a)?;
    let (bb, _) = gen.value_buf(g, mm.b)?;
    let idx = gen.unravel("%i", &mm.ys);
    let r = mm.ys.len();
    let (ta, tb) = mm
        .gemm
        .as_ref()
        .map_or((false, false), |gm| (gm.trans_a, gm.trans_b));
    // Strides of A along (batch dims of y, m, k) and of B along (batch, k, n).
    let bstrides = |s: &[usize], t: bool| -> (Vec<i64>, i64, i64) {
        let st = row_major(s);
        let rs = s.len();
        let mut bs = vec![0i64; r - 2];
        let off = (r - 2) - (rs - 2).min(r - 2);
        for j in 0..rs - 2 {
            if s[j] != 1 {
                bs[j + off] = st[j];
            }
        }
        // (outer, inner) = strides of (row, col) as stored.
        let (s_row, s_col) = (st[rs - 2], st[rs - 1]);
        let (first, second) = if t { (s_col, s_row) } else { (s_row, s_col) };
        (bs, first, second)
    };
    let (abs, a_m, a_k) = bstrides(&mm.a_s, ta);
    let (bbs, b_k, b_n) = bstrides(&mm.b_s, tb);
    let a0 = gen.lin(&idx[..r - 2], &abs, 0);
    let b0 = gen.lin(&idx[..r - 2], &bbs, 0);
    let am = gen.lin(&idx[r - 2..r - 1], &[a_m], 0);
    let a_base = gen.ix("addi", &a0, &am);
    let bn = gen.lin(&idx[r - 1..], &[b_n], 0);
    let b_base = gen.ix("addi", &b0, &bn);
    let zero = gen.b.fc(0.0);
    let saved = gen.consts.clone();
    let (kv, acc, res) = open_acc(&mut gen, mm.kk, &zero);
    let ak = gen.lin(std::slice::from_ref(&kv), &[a_k], 0);
    let ai = gen.ix("addi", &a_base, &ak);
    let bk = gen.lin(&[kv], &[b_k], 0);
    let bi = gen.ix("addi", &b_base, &bk);
    let x = gen.load(ab, &ai, Ty::F32);
    let w = gen.load(bb, &bi, Ty::F32);
    let p = gen.b.f2("mulf", &x, &w);
    let s = gen.b.f2("addf", &acc, &p);
    gen.b.raw(&format!("scf.yield {s} : f32"));
    gen.b.raw("}");
    gen.consts = saved;
    let v = gemm_scale(g, &mut gen, mm, res, &idx)?;
    gen.b.vals.insert(mm.y, (v, Ty::F32));
    let ins = epi_inputs(k, &[mm.a, mm.b]);
    gen.bind_inputs(g, &ins, &idx, &mm.ys)?;
    emit_nodes(g, &mut gen, epi, &idx, &mm.ys)?;
    store_outputs(g, &mut gen, &k.outputs, "%i")?;
    Ok(gen.finish(name, mm.ys.iter().product::<usize>() as u64))
}

/// The GEMM path (see the module doc); `Ok(false)` if it does not apply.
fn special(
    g: &Graph,
    k: &fusion::Kernel,
    (index, name, opts): (usize, &str, &LowerOptions),
    mm: &MatMul,
    epi: &[usize],
    out: &mut GpuLowering,
) -> Result<bool, String> {
    let (ta, tb) = mm
        .gemm
        .as_ref()
        .map_or((false, false), |gm| (gm.trans_a, gm.trans_b));
    if ta || (tb && g.const_value(mm.b).is_none()) {
        return Ok(false);
    }
    // The buffer the GEMM writes: the contraction's own output, or the kernel's only output.
    let target = if k.outputs.contains(&mm.y) {
        mm.y
    } else if let [o] = k.outputs[..] {
        if shape_of(g, o)? != mm.ys || g.values[o].fact.dtype != DType::F32 {
            return Ok(false);
        }
        o
    } else {
        return Ok(false);
    };
    let max_blocks = opts.max_blocks;
    let r = mm.ys.len();
    let (m, n, kk) = (mm.m, mm.n, mm.kk);
    // (a offset, b offset, y offset, rows) per launch, in elements.
    let mut calls: Vec<(u64, u64, u64, usize)> = Vec::new();
    if mm.b_s.len() == 2 {
        // Batch dims of A folded into M (A's batch dims equal y's).
        let rows: usize = mm.ys[..r - 1].iter().product();
        if mm.a_s[..mm.a_s.len() - 2].iter().product::<usize>() * m != rows {
            return Ok(false);
        }
        calls.push((0, 0, 0, rows));
    } else {
        let batch = &mm.ys[..r - 2];
        let nb: usize = batch.iter().product();
        let off_of = |s: &[usize], bi: &[usize], mat: usize| -> u64 {
            let rs = s.len() - 2;
            let off = batch.len() - rs.min(batch.len());
            let st = row_major(&s[..rs]);
            let mut o = 0u64;
            for j in 0..rs {
                if s[j] != 1 {
                    o += (bi[j + off] as u64) * (st[j] as u64);
                }
            }
            o * mat as u64
        };
        for b in 0..nb {
            let mut bi = vec![0usize; batch.len()];
            let mut rest = b;
            for d in (0..batch.len()).rev() {
                bi[d] = rest % batch[d];
                rest /= batch[d];
            }
            calls.push((
                off_of(&mm.a_s, &bi, m * kk),
                off_of(&mm.b_s, &bi, kk * n),
                (b * m * n) as u64,
                m,
            ));
        }
    }
    let mut tensor_core = false;
    // The epilogue the tensor-core kernel runs (with `fuse_epilogues` off: a lone bias only).
    let fused = fused_epilogue(g, k, mm, epi).filter(|f| opts.fuse_epilogues || f.bias_only());
    if opts.precision != Precision::F32 {
        match &opts.sku {
            None => out
                .tensor_core_fallbacks
                .push((index, "no SKU to schedule for".into())),
            Some(sku) => {
                let gc: Vec<GemmCall> = calls
                    .iter()
                    .map(|&(a_off, b_off, y_off, rows)| GemmCall {
                        a_off,
                        b_off,
                        y_off,
                        rows,
                    })
                    .collect();
                let spec = GemmSpec {
                    a: mm.a,
                    b: mm.b,
                    b_transposed: tb,
                    n,
                    k: kk,
                    target: fused.map_or(target, |f| f.output),
                    calls: &gc,
                    epi: fused.map_or(Epilogue::none(), |f| f.epi),
                    alpha: fused.map_or(1.0, |f| f.alpha),
                    beta: fused.map_or(1.0, |f| f.beta),
                    bias: fused.and_then(|f| f.bias),
                    residual: fused.and_then(|f| f.residual),
                    schedules: opts.schedules.as_deref(),
                };
                match tensor_core::lower(g, index, &spec, opts.precision, sku, out) {
                    Ok(()) => tensor_core = true,
                    Err(e) => out.tensor_core_fallbacks.push((index, e)),
                }
                if let (true, Some(f)) = (tensor_core, fused) {
                    if !f.bias_only() {
                        out.fused_epilogues.push((index, f.epi.tag()));
                    }
                    return Ok(true);
                }
            }
        }
    }
    // A batch whose matrices are evenly spaced in every operand (the usual case, and any
    // broadcast of one operand: stride 0) runs as one launch over grid.z.
    let strides = batch_strides(&calls).filter(|_| !tensor_core);
    let nb = strides.map_or(1, |_| calls.len() as u64);
    // Untuned: the default tiles, K split when they do not fill the SMs; a tuning record
    // of the problem replaces it.
    let mut sched = match (&opts.sku, calls.first()) {
        (Some(sku), Some(c)) => {
            GpuGemmSchedule::for_batched(nb, c.3 as u64, n as u64, kk as u64, sku.sm_count)
        }
        _ => GpuGemmSchedule::default(),
    };
    if let (false, Some(sku), Some(src), Some(c)) =
        (tensor_core, &opts.sku, &opts.schedules, calls.first())
    {
        let t = GpuTemplate::GemmF32 {
            m: c.3 as u64,
            n: n as u64,
            k: kk as u64,
        };
        if let Some(t) = GpuTunable::new(t, sku) {
            sched = gemm_f32_schedule(&src.choose(&t).0);
        }
    }
    if !tensor_core
        && calls.iter().any(|c| {
            let [_, y, z] = sched.grid_batched(nb, c.3 as u64, n as u64);
            y > 65535 || z > 65535
        })
    {
        return Ok(false);
    }
    let kern = match strides {
        Some(_) => gemm_f32_batched(&format!("{}_batched", gemm_f32_name(&sched)), &sched),
        None => gemm_f32(&gemm_f32_name(&sched), &sched),
    }
    .map_err(|e| e.to_string())?;
    if !tensor_core {
        let split_k = sched.split_k;
        out.note_host(&kern.name, HostKernel::GemmF32 { split_k });
    }
    // B as [K, N] (transposed constants stored transposed).
    let b_op = if tb && !tensor_core {
        let t = g.const_value(mm.b).ok_or("transposed B")?;
        let v = t.to_f64_vec();
        let (n, kk) = (mm.n, mm.kk);
        let mut tr = vec![0f32; n * kk];
        for i in 0..n {
            for j in 0..kk {
                tr[j * n + i] = v[i * kk + j] as f32;
            }
        }
        out.consts.push((
            format!("{}_transposed", g.values[mm.b].name),
            Tensor::from_vec(&[kk, n], tr),
        ));
        Operand::Const(out.consts.len() - 1)
    } else {
        Operand::Value(mm.b)
    };
    // (a offset, b offset, y offset, rows, matrices) per launch.
    let launches: Vec<(u64, u64, u64, usize, u64)> = match (tensor_core, strides) {
        (true, _) => Vec::new(),
        (false, Some(_)) => vec![(0, 0, 0, calls[0].3, nb)],
        (false, None) => calls.iter().map(|&(a, b, y, r)| (a, b, y, r, 1)).collect(),
    };
    for (ao, bo, yo, rows, mats) in launches {
        // Elements a view spans: `mats` matrices of `per` elements `stride` apart.
        let span = |per: usize, stride: u64| (mats - 1) * stride + per as u64;
        let (sa, sb, sc) = strides.unwrap_or((0, 0, 0));
        let c_len = span(rows * n, sc);
        if sched.split_k > 1 {
            // The K slices add their partial products into the output: zero it first.
            let sku = opts.sku.as_ref().ok_or("split-K without a SKU")?;
            out.push_zero(index, Operand::Value(target), yo, c_len, sku)?;
        }
        let buf = |operand: Operand, offset: u64, len: u64| LaunchArg::Buf {
            operand,
            offset,
            len,
            elem_bytes: 4,
        };
        let mut args = vec![
            buf(Operand::Value(mm.a), ao, span(rows * kk, sa)),
            buf(b_op.clone(), bo, span(kk * n, sb)),
            buf(Operand::Value(target), yo, c_len),
            LaunchArg::Index(rows as i64),
            LaunchArg::Index(n as i64),
            LaunchArg::Index(kk as i64),
        ];
        if strides.is_some() {
            args.extend([sa, sb, sc].map(|s| LaunchArg::Index(s as i64)));
        }
        let launch = Launch {
            index,
            kernel: String::new(),
            args,
            grid: sched.grid_batched(mats, rows as u64, n as u64),
            block: kern.block,
            shared_bytes: 0,
            generic: false,
        };
        out.push_special(launch, kern.clone())?;
    }
    // The epilogue over the result, in place.
    let scaled = mm
        .gemm
        .as_ref()
        .is_some_and(|gm| gm.alpha != 1.0 || (mm.c.is_some() && gm.beta != 0.0));
    if !epi.is_empty() || scaled {
        let mut gen = Gen::default();
        let idx = gen.unravel("%i", &mm.ys);
        let (tb_, _) = gen.value_buf(g, target)?;
        let x = gen.load(tb_, "%i", Ty::F32);
        let v = gemm_scale(g, &mut gen, mm, x, &idx)?;
        gen.b.vals.insert(mm.y, (v, Ty::F32));
        let ins = epi_inputs(k, &[mm.a, mm.b]);
        gen.bind_inputs(g, &ins, &idx, &mm.ys)?;
        emit_nodes(g, &mut gen, epi, &idx, &mm.ys)?;
        store_outputs(g, &mut gen, &k.outputs, "%i")?;
        let gk = gen.finish(
            &format!("{name}_epilogue"),
            mm.ys.iter().product::<usize>() as u64,
        );
        out.push_generic(index, gk, max_blocks)?;
    }
    Ok(true)
}

/// The element strides `(sA, sB, sC)` between consecutive matrices of a batch of GEMM calls
/// `(a offset, b offset, y offset, rows)`, when every call sits at `b · stride` in each
/// operand (0: one matrix broadcast to all) with the same rows; `None` for a single call or
/// an uneven batch (numpy broadcasting over several batch dimensions).
fn batch_strides(calls: &[(u64, u64, u64, usize)]) -> Option<(u64, u64, u64)> {
    let (&(a0, b0, y0, r0), rest) = calls.split_first()?;
    let &(a1, b1, y1, _) = rest.first()?;
    if (a0, b0, y0) != (0, 0, 0) {
        return None;
    }
    let s = (a1, b1, y1);
    let even = calls.iter().enumerate().all(|(i, &(a, b, y, r))| {
        let i = i as u64;
        r == r0 && (a, b, y) == (i * s.0, i * s.1, i * s.2)
    });
    even.then_some(s)
}

/// A contraction epilogue the tensor-core GEMMs run in their kernel (see [`Epilogue`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct FusedEpilogue {
    /// What the kernel applies.
    epi: Epilogue,
    /// `alpha` (Gemm's `alpha` times constant scalar factors).
    alpha: f32,
    /// `beta` (Gemm's `beta` for a full-shape `C`, else 1).
    beta: f32,
    /// The per-column bias `[N]`.
    bias: Option<ValueId>,
    /// The residual of the output's shape.
    residual: Option<ValueId>,
    /// The value the kernel writes (the kernel's only output).
    output: ValueId,
    /// Fused nodes it covers.
    nodes: usize,
}

impl FusedEpilogue {
    /// Whether it is at most a lone per-column bias (Gemm's `C` or one `Add`), which the
    /// tensor-core path fused before the other epilogues (no launch saved over that).
    fn bias_only(&self) -> bool {
        self.alpha == 1.0
            && self.epi.activation == Activation::None
            && !self.epi.has_residual()
            && self.nodes <= 1
    }
}

/// The epilogue of the contraction as the tensor-core GEMMs' [`Epilogue`], when the kernel
/// can express all of it: Gemm's `alpha` and `beta · C` (`C` an `[N]` bias with `beta = 1`,
/// or of the output's shape as a residual), then the fused nodes as one chain over the
/// contraction result: `· s` / `/ s` by a constant scalar (before anything else, into
/// `alpha`), `+ b` with `b` an f32 `[N]` (before the activation), `+ R` with `R` an f32 kernel
/// input of the output's shape (before or after the activation), one activation (Relu,
/// Sigmoid, Tanh, tanh-approximated Gelu, or `x · Sigmoid(x)` = SiLU), the chain's last value the
/// kernel's only output. `None` otherwise (the epilogue then runs as an in-place launch).
fn fused_epilogue(
    g: &Graph,
    k: &fusion::Kernel,
    mm: &MatMul,
    epi: &[usize],
) -> Option<FusedEpilogue> {
    let n = mm.n;
    let is_f32 = |v: ValueId, shape: &[usize]| {
        g.values[v].fact.dtype == DType::F32 && shape_of(g, v).is_ok_and(|s| s == shape)
    };
    let operand = |v: ValueId| v == mm.a || v == mm.b;
    let mut f = FusedEpilogue {
        epi: Epilogue::none(),
        alpha: 1.0,
        beta: 1.0,
        bias: None,
        residual: None,
        output: mm.y,
        nodes: epi.len(),
    };
    if let Some(gm) = &mm.gemm {
        f.alpha = gm.alpha;
        if let (Some(c), true) = (mm.c, gm.beta != 0.0) {
            if is_f32(c, &[n]) && gm.beta == 1.0 {
                (f.epi.bias, f.bias) = (true, Some(c));
            } else if is_f32(c, &mm.ys) && !operand(c) {
                (f.epi.residual, f.residual, f.beta) =
                    (Residual::BeforeActivation, Some(c), gm.beta);
            } else {
                return None;
            }
        }
    }
    let scalar = |v: ValueId| -> Option<f32> {
        let t = g.const_value(v)?;
        (g.values[v].fact.dtype == DType::F32 && t.len() == 1).then(|| t.to_f64_vec()[0] as f32)
    };
    let mut cur = mm.y;
    let mut i = 0;
    while i < epi.len() {
        let node = &g.nodes[epi[i]];
        let ins: Vec<ValueId> = node.inputs.iter().flatten().copied().collect();
        // The other operand of a binary node over `cur`.
        let other = match ins[..] {
            [x, o] | [o, x] if x == cur && o != cur => Some(o),
            _ => None,
        };
        let plain = !f.epi.bias && !f.epi.has_residual();
        let no_act = f.epi.activation == Activation::None;
        let mut next = node.outputs[0];
        match (&node.op, other) {
            (Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add)), Some(o)) if !operand(o) => {
                if !f.epi.bias && no_act && is_f32(o, &[n]) {
                    (f.epi.bias, f.bias) = (true, Some(o));
                } else if !f.epi.has_residual() && is_f32(o, &mm.ys) && k.inputs.contains(&o) {
                    f.epi.residual = if no_act {
                        Residual::BeforeActivation
                    } else {
                        Residual::AfterActivation
                    };
                    f.residual = Some(o);
                } else {
                    return None;
                }
            }
            (Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Mul)), Some(o))
                if plain && no_act =>
            {
                f.alpha *= scalar(o)?;
            }
            (Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Div)), Some(o))
                if plain && no_act && ins[0] == cur =>
            {
                f.alpha /= scalar(o)?;
            }
            (Op::Elementwise(ElementwiseOp::Unary(u)), None) if no_act && ins == [cur] => {
                f.epi.activation = match u {
                    UnaryKind::Relu => Activation::Relu,
                    UnaryKind::Tanh => Activation::Tanh,
                    UnaryKind::Gelu {
                        approximate: GeluApprox::Tanh,
                    } => Activation::GeluTanh,
                    UnaryKind::Sigmoid => {
                        // `x · Sigmoid(x)`: SiLU.
                        let silu = epi.get(i + 1).and_then(|&m| {
                            let mn = &g.nodes[m];
                            let mi: Vec<ValueId> = mn.inputs.iter().flatten().copied().collect();
                            let s = node.outputs[0];
                            (matches!(
                                mn.op,
                                Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Mul))
                            ) && (mi == [cur, s] || mi == [s, cur]))
                            .then_some(mn.outputs[0])
                        });
                        match silu {
                            Some(o) => {
                                next = o;
                                i += 1;
                                Activation::Silu
                            }
                            None => Activation::Sigmoid,
                        }
                    }
                    _ => return None,
                };
            }
            _ => return None,
        }
        cur = next;
        i += 1;
    }
    f.output = cur;
    (k.outputs == [cur] && is_f32(cur, &mm.ys)).then_some(f)
}

/// The specialized conv path (see the module doc); `Ok(false)` if it does not apply.
fn special_conv(
    g: &Graph,
    k: &fusion::Kernel,
    (index, name, opts): (usize, &str, &LowerOptions),
    ci: usize,
    epi: &[usize],
    out: &mut GpuLowering,
) -> Result<bool, String> {
    let Some(sku) = &opts.sku else {
        return Ok(false);
    };
    let cn = &g.nodes[ci];
    let Op::Nn(NnOp::Conv(attrs)) = &cn.op else {
        return Ok(false);
    };
    let x = node_input(g, ci, 0)?;
    let w = node_input(g, ci, 1)?;
    let bias = cn.inputs.get(2).copied().flatten();
    let y = cn.outputs[0];
    let (xs, ws, ys) = (shape_of(g, x)?, shape_of(g, w)?, shape_of(g, y)?);
    if ws.len() != 4 || xs.len() != 4 {
        return Ok(false);
    }
    let win = Window2::new(&attrs.window, &xs, [ws[2], ws[3]], false)?;
    let (group, m) = (attrs.group.max(1), ws[0]);
    if ys != [win.n, m, win.oh, win.ow] || win.p.iter().any(|&p| p < 0) {
        return Ok(false);
    }
    if let Some(b) = bias {
        if shape_of(g, b)? != [m] {
            return Ok(false);
        }
    }
    let depthwise = if group == 1 && ws[1] == win.c {
        false
    } else if group == win.c && m == win.c && ws[1] == 1 {
        true
    } else {
        return Ok(false);
    };
    // End pads: just enough for the output size (the kernel zero-fills outside the input).
    let u = |v: usize| v as u64;
    let end = |ax: usize, o: usize, size: usize| -> u64 {
        let span = win.d[ax] * (win.k[ax] - 1) + 1;
        u(((o - 1) * win.s[ax] + span).saturating_sub(size + win.p[ax] as usize))
    };
    let geom = ConvGeom {
        n: u(win.n),
        c: u(win.c),
        h: u(win.h),
        w: u(win.w),
        oc: u(m),
        kh: u(win.k[0]),
        kw: u(win.k[1]),
        stride: [u(win.s[0]), u(win.s[1])],
        pads: [
            win.p[0] as u64,
            win.p[1] as u64,
            end(0, win.oh, win.h),
            end(1, win.ow, win.w),
        ],
        dilation: [u(win.d[0]), u(win.d[1])],
    };
    if geom.validate().is_err() || geom.oh() != u(win.oh) || geom.ow() != u(win.ow) {
        return Ok(false);
    }
    // The fused epilogue: `[+ residual][relu]`, only its last value an output.
    let mut cur = y;
    let mut residual = None;
    let mut relu = false;
    let mut fused = true;
    for &n in epi {
        let node = &g.nodes[n];
        let ins: Vec<ValueId> = node.inputs.iter().flatten().copied().collect();
        match &node.op {
            Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add))
                if residual.is_none() && !relu && ins.len() == 2 && ins.contains(&cur) =>
            {
                let r = if ins[0] == cur { ins[1] } else { ins[0] };
                if r == cur
                    || !k.inputs.contains(&r)
                    || Some(r) == bias
                    || r == x
                    || r == w
                    || shape_of(g, r)? != ys
                    || g.values[r].fact.dtype != DType::F32
                {
                    fused = false;
                    break;
                }
                residual = Some(r);
            }
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)) if !relu && ins == [cur] => {}
            _ => {
                fused = false;
                break;
            }
        }
        if matches!(
            node.op,
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu))
        ) {
            relu = true;
        }
        cur = node.outputs[0];
    }
    let fused = fused && k.outputs == [cur];
    // The buffer the conv writes and its epilogue.
    let (target, ep) = if fused {
        (
            cur,
            kconv::Epilogue {
                bias: bias.is_some(),
                residual: residual.is_some(),
                relu,
            },
        )
    } else {
        let target = if k.outputs.contains(&y) {
            y
        } else if let [o] = k.outputs[..] {
            if shape_of(g, o)? != ys || g.values[o].fact.dtype != DType::F32 {
                return Ok(false);
            }
            o
        } else {
            return Ok(false);
        };
        let ep = kconv::Epilogue {
            bias: bias.is_some(),
            ..kconv::Epilogue::default()
        };
        (target, ep)
    };
    let kname = if fused {
        name.to_string()
    } else {
        format!("{name}_conv")
    };
    // At f16 / bf16 a groups = 1 conv on tensor cores (inputs converted first).
    let tc = match opts.precision.mma_input() {
        _ if depthwise => None,
        None => None,
        Some(MmaInput::TF32) => {
            out.tensor_core_conv_fallbacks.push((
                index,
                "the tensor-core conv takes f16 or bf16, not tf32".into(),
            ));
            None
        }
        Some(input) => match conv_tc(
            g,
            index,
            &kname,
            (x, w),
            &geom,
            ep,
            sku,
            input,
            opts.schedules.as_deref(),
        ) {
            Ok(tc) => Some(tc),
            Err(e) => {
                out.tensor_core_conv_fallbacks.push((index, e));
                None
            }
        },
    };
    let (kern, grid, block, host) = if let Some(tc) = &tc {
        (
            tc.kernel.clone(),
            tc.grid,
            tc.block,
            HostKernel::ConvMma {
                geom,
                epi: ep,
                input: tc.input,
                x_f32: tc.x_f32,
            },
        )
    } else if depthwise {
        let Ok(kern) = depthwise::depthwise_conv2d(&kname, &geom, ep) else {
            return Ok(false);
        };
        let (grid, block) = depthwise::launch(&geom, sku);
        (kern, grid, block, HostKernel::Depthwise { geom, epi: ep })
    } else {
        let mut sched = GpuConvSchedule::for_geom(&geom, sku);
        if let Some(src) = &opts.schedules {
            if let Some(t) = GpuTunable::new(GpuTemplate::Conv { geom, epi: ep }, sku) {
                sched = GpuConvSchedule::from_config(&src.choose(&t).0);
            }
        } else {
            let split = sched.split_for(&geom, sku.sm_count);
            if split > 1 {
                let conv = SplitConv {
                    geom,
                    sched,
                    split,
                    conv: ConvOut { x, w, bias, y },
                };
                return conv.lower(g, k, (index, name, opts), epi, out);
            }
        }
        let Ok(kern) = conv2d(&kname, &geom, ConvLayout::Nchw, ep, &sched, sku) else {
            return Ok(false);
        };
        let Ok((grid, block)) = sched.launch(&geom) else {
            return Ok(false);
        };
        (kern, grid, block, HostKernel::Conv { geom, epi: ep })
    };
    let len = |v: ValueId| -> Result<u64, String> {
        Ok(shape_of(g, v)?.iter().product::<usize>() as u64)
    };
    let buf = |v: ValueId| -> Result<LaunchArg, String> {
        Ok(LaunchArg::Buf {
            operand: Operand::Value(v),
            offset: 0,
            len: len(v)?,
            elem_bytes: 4,
        })
    };
    let mut args = match &tc {
        Some(tc) => tc
            .operands
            .iter()
            .map(|a| match a {
                LaunchArg::Buf {
                    operand: Operand::Const(usize::MAX),
                    offset,
                    len,
                    elem_bytes,
                } => LaunchArg::Buf {
                    operand: Operand::Const(out.consts.len()),
                    offset: *offset,
                    len: *len,
                    elem_bytes: *elem_bytes,
                },
                a => a.clone(),
            })
            .collect(),
        None => vec![buf(x)?, buf(w)?],
    };
    if let Some(tc) = tc {
        out.consts.extend(tc.consts);
        out.scratch_bytes = out.scratch_bytes.max(tc.scratch);
        for (l, k) in tc.casts {
            out.note_host(&k.name, HostKernel::Cast(tc.input));
            out.push_special(l, k)?;
        }
        out.tensor_core_convs.push(index);
    }
    if let Some(b) = bias {
        args.push(buf(b)?);
    }
    if let Some(r) = residual.filter(|_| fused) {
        args.push(buf(r)?);
    }
    args.push(buf(target)?);
    let launch = Launch {
        index,
        kernel: String::new(),
        args,
        grid,
        block,
        shared_bytes: 0,
        generic: false,
    };
    out.push_special(launch, kern)?;
    out.note_host(&kname, host);
    if !fused {
        let conv = ConvOut { x, w, bias, y };
        conv.push_epilogue(g, k, (index, name, opts), target, false, epi, out)?;
    }
    Ok(true)
}

/// The values of a conv node: input, weights, bias, output.
struct ConvOut {
    x: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
    y: ValueId,
}

impl ConvOut {
    /// The conv's epilogue nodes `epi` over its result in `target`, in place (one generic
    /// launch), adding the bias first when `add_bias` (the conv kernel did not).
    #[allow(clippy::too_many_arguments)]
    fn push_epilogue(
        &self,
        g: &Graph,
        k: &fusion::Kernel,
        (index, name, opts): (usize, &str, &LowerOptions),
        target: ValueId,
        add_bias: bool,
        epi: &[usize],
        out: &mut GpuLowering,
    ) -> Result<(), String> {
        let ys = shape_of(g, self.y)?;
        let mut gen = Gen::default();
        let idx = gen.unravel("%i", &ys);
        let (tb, _) = gen.value_buf(g, target)?;
        let mut v = gen.load(tb, "%i", Ty::F32);
        if let Some(b) = self.bias.filter(|_| add_bias) {
            let (bb, _) = gen.value_buf(g, b)?;
            let bv = gen.load(bb, &idx[1], Ty::F32);
            v = gen.b.f2("addf", &v, &bv);
        }
        gen.b.vals.insert(self.y, (v, Ty::F32));
        let mut operands = vec![self.x, self.w];
        operands.extend(self.bias);
        let ins = epi_inputs(k, &operands);
        gen.bind_inputs(g, &ins, &idx, &ys)?;
        emit_nodes(g, &mut gen, epi, &idx, &ys)?;
        store_outputs(g, &mut gen, &k.outputs, "%i")?;
        let gk = gen.finish(
            &format!("{name}_epilogue"),
            ys.iter().product::<usize>() as u64,
        );
        out.push_generic(index, gk, opts.max_blocks)
    }
}

/// An f32 conv whose output tiles do not fill the SMs, as three launches: zero the output,
/// [`conv2d_split_k`] (K slices over grid.z adding into it), then bias and the fused
/// epilogue in place (one generic kernel; none when there is neither).
struct SplitConv {
    geom: ConvGeom,
    sched: GpuConvSchedule,
    split: u32,
    conv: ConvOut,
}

impl SplitConv {
    fn lower(
        &self,
        g: &Graph,
        k: &fusion::Kernel,
        (index, name, opts): (usize, &str, &LowerOptions),
        epi: &[usize],
        out: &mut GpuLowering,
    ) -> Result<bool, String> {
        let Some(sku) = &opts.sku else {
            return Ok(false);
        };
        let ys = shape_of(g, self.conv.y)?;
        // The buffer the conv sums into: its own output, or the kernel's only output.
        let target = if k.outputs.contains(&self.conv.y) {
            self.conv.y
        } else if let [o] = k.outputs[..] {
            if shape_of(g, o)? != ys || g.values[o].fact.dtype != DType::F32 {
                return Ok(false);
            }
            o
        } else {
            return Ok(false);
        };
        let kname = format!("{name}_conv_s{}", self.split);
        let Ok(kern) = conv2d_split_k(&kname, &self.geom, &self.sched, self.split, sku) else {
            return Ok(false);
        };
        let Ok((grid, block)) = self.sched.launch_split(&self.geom, self.split) else {
            return Ok(false);
        };
        let n = |v: ValueId| -> Result<u64, String> {
            Ok(shape_of(g, v)?.iter().product::<usize>() as u64)
        };
        let buf = |v: ValueId| -> Result<LaunchArg, String> {
            Ok(LaunchArg::Buf {
                operand: Operand::Value(v),
                offset: 0,
                len: n(v)?,
                elem_bytes: 4,
            })
        };
        out.push_zero(index, Operand::Value(target), 0, n(target)?, sku)?;
        let launch = Launch {
            index,
            kernel: String::new(),
            args: vec![buf(self.conv.x)?, buf(self.conv.w)?, buf(target)?],
            grid,
            block,
            shared_bytes: 0,
            generic: false,
        };
        out.push_special(launch, kern)?;
        out.note_host(&kname, HostKernel::ConvSplitK { geom: self.geom });
        if self.conv.bias.is_none() && epi.is_empty() && target == self.conv.y {
            return Ok(true);
        }
        // Bias and the epilogue over the sums, in place.
        self.conv
            .push_epilogue(g, k, (index, name, opts), target, true, epi, out)?;
        Ok(true)
    }
}

/// A conv on tensor cores ([`conv2d_mma`]) and what it needs first.
struct TcConv {
    /// The input type.
    input: MmaInput,
    /// `X` is read as f32 (rounded in the kernel; no cast launch).
    x_f32: bool,
    kernel: crate::gpu::GpuKernel,
    grid: [u32; 3],
    block: [u32; 3],
    /// The 16-bit `X` and `W` arguments.
    operands: Vec<LaunchArg>,
    /// Cast launches of `X` (and a non-constant `W`) into the scratch region.
    casts: Vec<(Launch, crate::gpu::GpuKernel)>,
    /// Scratch bytes the casts use.
    scratch: u64,
    /// The 16-bit weights when they are a constant (to append to [`GpuLowering::consts`]; the
    /// operand refers to the next free index).
    consts: Vec<(String, Tensor)>,
}

/// The tensor-core conv `name` for `geom` (NCHW) with epilogue `ep` on `input` (f16 or bf16):
/// `X` converted by a cast launch into the scratch region, constant weights converted at
/// compile time (a non-constant `W` cast like `X`). `Err` with the reason when the SKU or the
/// schedule does not allow it. Nothing is pushed to the lowering here (see the caller).
#[allow(clippy::too_many_arguments)]
fn conv_tc(
    g: &Graph,
    index: usize,
    name: &str,
    (x, w): (ValueId, ValueId),
    geom: &ConvGeom,
    ep: kconv::Epilogue,
    sku: &crate::gpu::Sku,
    input: MmaInput,
    schedules: Option<&crate::gpu::tuning::GpuSchedules>,
) -> Result<TcConv, String> {
    if !sku.has(input.feature()) {
        return Err(format!("{} has no {}", sku.name, input.feature()));
    }
    let mut sched = ConvMmaSchedule::for_geom(geom);
    if let Some(src) = schedules {
        let tpl = GpuTemplate::ConvMma {
            geom: *geom,
            epi: ep,
            input,
        };
        if let Some(t) = GpuTunable::new(tpl, sku) {
            sched = ConvMmaSchedule::from_config(&src.choose(&t).0);
        }
    }
    let kernel = conv2d_mma(name, geom, ConvLayout::Nchw, ep, &sched, sku, input)
        .map_err(|e| e.to_string())?;
    let (grid, block) = sched.launch(geom).map_err(|e| e.to_string())?;
    let numel = |v: ValueId| -> Result<u64, String> {
        Ok(shape_of(g, v)?.iter().product::<usize>() as u64)
    };
    let f16 = |operand: Operand, len: u64| LaunchArg::Buf {
        operand,
        offset: 0,
        len,
        elem_bytes: 2,
    };
    let (nx, nw) = (numel(x)?, numel(w)?);
    // `X` as the kernel reads it: f32 rounded in the kernel, or a 16-bit copy in scratch.
    let (x_arg, mut casts, mut scratch) = if sched.x_f32 {
        let arg = LaunchArg::Buf {
            operand: Operand::Value(x),
            offset: 0,
            len: nx,
            elem_bytes: 4,
        };
        (arg, Vec::new(), 0)
    } else {
        let cast = precision::cast_launch(index, Operand::Value(x), nx, 0, input, sku);
        (
            f16(Operand::Scratch(0), nx),
            vec![cast],
            (nx * 2).div_ceil(64) * 64,
        )
    };
    let mut consts = Vec::new();
    let w_op = match g.const_value(w) {
        Some(t) => {
            let v: Vec<f32> = t.to_f64_vec().iter().map(|&v| v as f32).collect();
            let dt = if input == MmaInput::BF16 {
                DType::BF16
            } else {
                DType::F16
            };
            let t = Tensor::from_vec(&shape_of(g, w)?, v).cast(dt);
            consts.push((format!("{}_{}", g.values[w].name, input.mlir()), t));
            Operand::Const(usize::MAX)
        }
        None => {
            casts.push(precision::cast_launch(
                index,
                Operand::Value(w),
                nw,
                scratch,
                input,
                sku,
            ));
            let at = scratch;
            scratch += (nw * 2).div_ceil(64) * 64;
            Operand::Scratch(at)
        }
    };
    Ok(TcConv {
        input,
        x_f32: sched.x_f32,
        kernel,
        grid,
        block,
        operands: vec![x_arg, f16(w_op, nw)],
        casts,
        scratch,
        consts,
    })
}

/// A 2-D Conv with bias and epilogue as one generic kernel.
fn conv(
    g: &Graph,
    k: &fusion::Kernel,
    ci: usize,
    epi: &[usize],
    name: &str,
) -> Result<GenKernel, String> {
    let cn = &g.nodes[ci];
    let Op::Nn(NnOp::Conv(attrs)) = &cn.op else {
        return Err("not a Conv".into());
    };
    let x = node_input(g, ci, 0)?;
    let w = node_input(g, ci, 1)?;
    let bias = cn.inputs.get(2).copied().flatten();
    let y = cn.outputs[0];
    let (xs, ws, ys) = (shape_of(g, x)?, shape_of(g, w)?, shape_of(g, y)?);
    if ws.len() != 4 || xs.len() != 4 {
        return Err("Conv of rank other than 2-D".into());
    }
    let win = Window2::new(&attrs.window, &xs, [ws[2], ws[3]], false)?;
    let group = attrs.group.max(1);
    let m = ws[0];
    if ys != [win.n, m, win.oh, win.ow]
        || win.c % group != 0
        || m % group != 0
        || ws[1] * group != win.c
    {
        return Err("Conv shapes do not match".into());
    }
    let (cg, mg) = (win.c / group, m / group);
    let mut gen = Gen::default();
    let (xb, _) = gen.value_buf(g, x)?;
    let (wb, _) = gen.value_buf(g, w)?;
    let idx = gen.unravel("%i", &ys);
    // Input channel base: (n * C + (m / mg) * cg) * H * W; weight base: m * cg * KH * KW.
    let mgc = gen.c(mg as i64);
    let grp = gen.ix("divui", &idx[1], &mgc);
    let cgc = gen.c(cg as i64);
    let c0 = gen.ix("muli", &grp, &cgc);
    let cc = gen.c(win.c as i64);
    let n0 = gen.ix("muli", &idx[0], &cc);
    let ch0 = gen.ix("addi", &n0, &c0);
    let plane = gen.c((win.h * win.w) as i64);
    let x_base = gen.ix("muli", &ch0, &plane);
    let wk = gen.c((cg * win.k[0] * win.k[1]) as i64);
    let w_base = gen.ix("muli", &idx[1], &wk);
    let zero = gen.b.fc(0.0);
    let saved = gen.consts.clone();
    let (cv, acc_c, res_c) = open_acc(&mut gen, cg, &zero);
    let (th, acc_h, res_h) = open_acc(&mut gen, win.k[0], &acc_c);
    let (tw, acc_w, res_w) = open_acc(&mut gen, win.k[1], &acc_h);
    let (ok, r1) = tap_offset(&mut gen, &win, [&idx[2], &idx[3]], [&th, &tw]);
    let pl = gen.ix("muli", &cv, &plane);
    let r2 = gen.ix("addi", &r1, &pl);
    let xa = gen.ix("addi", &x_base, &r2);
    let kw = gen.c(win.k[1] as i64);
    let kh = gen.c(win.k[0] as i64);
    let t0 = gen.ix("muli", &cv, &kh);
    let t1 = gen.ix("addi", &t0, &th);
    let t2 = gen.ix("muli", &t1, &kw);
    let t3 = gen.ix("addi", &t2, &tw);
    let wa = gen.ix("addi", &w_base, &t3);
    let xv = gen.load(xb, &xa, Ty::F32);
    let wv = gen.load(wb, &wa, Ty::F32);
    let p = gen.b.f2("mulf", &xv, &wv);
    let s = gen.b.f2("addf", &acc_w, &p);
    let nv = gen.b.op(&format!("arith.select {ok}, {s}, {acc_w} : f32"));
    gen.b.raw(&format!("scf.yield {nv} : f32"));
    gen.b.raw("}");
    gen.b.raw(&format!("scf.yield {res_w} : f32"));
    gen.b.raw("}");
    gen.b.raw(&format!("scf.yield {res_h} : f32"));
    gen.b.raw("}");
    gen.consts = saved;
    let mut v = res_c;
    if let Some(bv) = bias {
        let (bb, _) = gen.value_buf(g, bv)?;
        let bx = gen.load(bb, &idx[1], Ty::F32);
        v = gen.b.f2("addf", &v, &bx);
    }
    gen.b.vals.insert(y, (v, Ty::F32));
    let mut operands = vec![x, w];
    operands.extend(bias);
    let ins = epi_inputs(k, &operands);
    gen.bind_inputs(g, &ins, &idx, &ys)?;
    emit_nodes(g, &mut gen, epi, &idx, &ys)?;
    store_outputs(g, &mut gen, &k.outputs, "%i")?;
    Ok(gen.finish(name, ys.iter().product::<usize>() as u64))
}
