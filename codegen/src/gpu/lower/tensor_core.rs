//! MatMul/Gemm on tensor cores at a [`Precision`] other than f32: the GEMM of
//! [`gemm_select::select`] with f32 accumulation and an f32 output. The contraction's fusion
//! group runs in the kernel's [`Epilogue`] when it can express it ([`GemmSpec::epi`]: `alpha`,
//! bias, residual before / after one activation, matched by
//! [`super::contraction`]); otherwise the kernel writes the product and the f32 path's
//! in-place epilogue kernel follows.
//!
//! * tf32: the kernel reads the f32 activations directly (the tensor cores drop their low
//!   13 mantissa bits); a constant `B` is rounded to nearest tf32 at compile time (and stored
//!   transposed for Gemm `transB`), which halves the error of truncating both operands.
//! * f16 / bf16: a constant `B` is converted (and transposed) at compile time into a derived
//!   constant; `A` and a non-constant `B` are converted by a cast launch
//!   ([`precision::cast_kernel`]) into the scratch region ([`Operand::Scratch`]) first.
//!
//! Batched products are one launch (`grid.z`) when the batch strides are uniform, else one
//! launch per matrix with offset views. The warpgroup (`wgmma`) kernel takes TMA
//! descriptors, which the GPU plan cannot express yet: on sm_90 the `mma.sync` kernel is
//! used instead. Any shape the kernels cannot take (alignment of `N`, `K`, strides or
//! offsets to the `cp.async` width, a SKU without the instruction) is an `Err` with the
//! reason; the caller then keeps the f32 GEMM.

use super::precision::{self, Precision};
use super::{shape_of, GpuLowering, HostKernel, Launch, LaunchArg, Operand};
use crate::gpu::kernels::epilogue::Epilogue;
use crate::gpu::kernels::gemm_mma::MmaGemm;
use crate::gpu::kernels::gemm_mma::{gemm_mma, kernel_name, MmaInput, MmaOutput, MmaSchedule};
use crate::gpu::kernels::gemm_select::{GemmProblem, TensorCoreGemm};
use crate::gpu::kernels::gemm_wgmma::{gemm_wgmma, TensorMapSpec, WgmmaGemm};
use crate::gpu::Sku;
use kiln_ir::{DType, Graph, Tensor, ValueId};

/// One GEMM of a contraction: views in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GemmCall {
    /// Offset of the first `A` matrix.
    pub a_off: u64,
    /// Offset of the first `B` matrix.
    pub b_off: u64,
    /// Offset of the first output matrix.
    pub y_off: u64,
    /// Rows of each matrix.
    pub rows: usize,
}

/// The contraction as [`super::contraction`] resolved it.
pub(crate) struct GemmSpec<'a> {
    /// Left operand (f32 value).
    pub a: ValueId,
    /// Right operand (f32 value).
    pub b: ValueId,
    /// Whether `B` is a constant stored `[N, K]` (Gemm `transB`).
    pub b_transposed: bool,
    /// Columns of the output.
    pub n: usize,
    /// Contraction depth.
    pub k: usize,
    /// The f32 buffer the GEMM writes.
    pub target: ValueId,
    /// The launches of the f32 path, one per matrix (or one with the batch folded into M).
    pub calls: &'a [GemmCall],
    /// The fused epilogue (applied in the kernel, see [`Epilogue`]).
    pub epi: Epilogue,
    /// `alpha` of the epilogue.
    pub alpha: f32,
    /// `beta` of the epilogue (scales the residual).
    pub beta: f32,
    /// The per-column f32 bias `[N]` (when `epi.bias`).
    pub bias: Option<ValueId>,
    /// The f32 residual of the output's shape (when `epi` has one), read at the output's
    /// offsets.
    pub residual: Option<ValueId>,
    /// Tuned schedules ([`crate::gpu::tuning`]).
    pub schedules: Option<&'a crate::gpu::tuning::GpuSchedules>,
}

fn align64(v: u64) -> u64 {
    v.div_ceil(64) * 64
}

fn numel(g: &Graph, v: ValueId) -> Result<u64, String> {
    Ok(shape_of(g, v)?.iter().product::<usize>() as u64)
}

/// Lowers `spec` on tensor cores at `prec` (see the module doc). Pushes nothing on `Err`.
pub(crate) fn lower(
    g: &Graph,
    index: usize,
    spec: &GemmSpec,
    prec: Precision,
    sku: &Sku,
    out: &mut GpuLowering,
) -> Result<(), String> {
    let input = prec.mma_input().ok_or("f32 precision")?;
    if !sku.has(input.feature()) {
        return Err(format!("{} has no {}", sku.name, input.feature()));
    }
    let (n, kk) = (spec.n as u64, spec.k as u64);
    // One launch with uniform batch strides, or one per matrix.
    let c0 = spec.calls[0];
    let uniform = spec.calls.len() > 1 && {
        let sa = spec.calls[1].a_off.wrapping_sub(c0.a_off);
        let sb = spec.calls[1].b_off.wrapping_sub(c0.b_off);
        spec.calls.iter().enumerate().all(|(i, c)| {
            let i = i as u64;
            c.a_off == c0.a_off + i * sa
                && c.b_off == c0.b_off + i * sb
                && c.y_off == c0.y_off + i * (c0.rows as u64) * n
                && c.rows == c0.rows
        })
    };
    // (call, batch, stride A, stride B)
    let launches: Vec<(GemmCall, u64, u64, u64)> = if uniform {
        let nb = spec.calls.len() as u64;
        let sa = spec.calls[1].a_off - c0.a_off;
        let sb = spec.calls[1].b_off - c0.b_off;
        vec![(c0, nb, sa, sb)]
    } else {
        spec.calls.iter().map(|&c| (c, 1, 0, 0)).collect()
    };
    // One kernel for every launch: the copy width must suit all strides and offsets.
    let (mut sa_all, mut sb_all) = (0u64, 0u64);
    let mut offs = Vec::new();
    for &(c, _, sa, sb) in &launches {
        sa_all = gcd(sa_all, sa);
        sb_all = gcd(sb_all, sb);
        offs.extend([c.a_off, c.b_off]);
    }
    let off_gcd = offs.iter().fold(0u64, |a, &b| gcd(a, b));
    let batch = launches.iter().map(|l| l.1).max().unwrap_or(1);
    let p = GemmProblem {
        m: c0.rows as u64,
        n,
        k: kk,
        batch,
        stride_a: gcd(sa_all, off_gcd),
        stride_b: gcd(sb_all, off_gcd),
        input,
        output: MmaOutput::F32,
    };
    let epi = spec.epi;
    if epi.bias != spec.bias.is_some() || epi.has_residual() != spec.residual.is_some() {
        return Err("epilogue buffers do not match the epilogue".into());
    }
    // `select`'s choice; where its default tile does not fit the SKU (tf32 on sm_89: 104
    // KiB of shared memory) the 64×64 tile. The wgmma kernel's TMA boxes need 16-byte
    // aligned matrix starts.
    let eb_ = u64::from(input.bytes());
    let tma_aligned = launches
        .iter()
        .all(|(c, nb, _, _)| *nb == 1 && (c.a_off * eb_) % 16 == 0 && (c.b_off * eb_) % 16 == 0);
    let tuned = crate::gpu::tuning::select_tuned(
        "kiln_gemm_tc",
        &p,
        &epi,
        sku,
        tma_aligned,
        spec.schedules,
    );
    let kern = match tuned {
        Ok(TensorCoreGemm::Wgmma(w)) if tma_aligned => {
            let s = w.schedule;
            // every schedule parameter in the name: two GEMMs of one model with different
            // schedules must not share an entry
            let name = crate::gpu::tuning::wgmma_name(input, &s, &epi);
            Chosen::Wgmma(
                gemm_wgmma(&name, input, MmaOutput::F32, &epi, &s).map_err(|e| e.to_string())?,
            )
        }
        Ok(TensorCoreGemm::Mma(m)) => Chosen::Mma(m),
        Ok(TensorCoreGemm::Wgmma(_)) => Chosen::Mma(mma_for(&p, sku, MmaSchedule::default())?),
        Err(e) => {
            Chosen::Mma(mma_for(&p, sku, MmaSchedule::small()).map_err(|e2| format!("{e}; {e2}"))?)
        }
    };
    let kern = match kern {
        Chosen::Mma(g) => {
            let s = g.schedule;
            Chosen::Mma(
                gemm_mma(
                    &kernel_name(input, MmaOutput::F32, &s, &epi),
                    input,
                    MmaOutput::F32,
                    &epi,
                    &s,
                )
                .map_err(|e| e.to_string())?,
            )
        }
        w => w,
    };
    for &(c, nb, _, _) in &launches {
        let g_ = kern.grid(c.rows as u64, n, nb);
        if g_[1] > 65535 || g_[2] > 65535 {
            return Err(format!("grid {g_:?} too large"));
        }
    }
    let eb = u64::from(input.bytes());
    // Operands as the kernel reads them.
    let mut pre: Vec<(Launch, crate::gpu::GpuKernel)> = Vec::new();
    let mut consts: Vec<(String, Tensor)> = Vec::new();
    let mut scratch = 0u64;
    let cast = |src: ValueId, at: u64| -> Result<(Launch, crate::gpu::GpuKernel), String> {
        let len = numel(g, src)?;
        Ok(precision::cast_launch(
            index,
            Operand::Value(src),
            len,
            at,
            input,
            sku,
        ))
    };
    let a_op = if input == MmaInput::TF32 {
        Operand::Value(spec.a)
    } else {
        pre.push(cast(spec.a, 0)?);
        scratch = align64(numel(g, spec.a)? * eb);
        Operand::Scratch(0)
    };
    let b_const = g.const_value(spec.b);
    let b_op = match (b_const, input) {
        (Some(t), _) => {
            let v: Vec<f32> = t.to_f64_vec().iter().map(|&x| x as f32).collect();
            let (nn, k) = (spec.n, spec.k);
            let mut data = v.clone();
            let shape = if spec.b_transposed {
                for i in 0..nn {
                    for j in 0..k {
                        data[j * nn + i] = v[i * k + j];
                    }
                }
                vec![k, nn]
            } else {
                shape_of(g, spec.b)?
            };
            if input == MmaInput::TF32 {
                data.iter_mut().for_each(|x| *x = precision::round_tf32(*x));
            }
            let t = Tensor::from_vec(&shape, data);
            let (t, suffix) = match input {
                MmaInput::F16 => (t.cast(DType::F16), "f16"),
                MmaInput::BF16 => (t.cast(DType::BF16), "bf16"),
                MmaInput::TF32 => (t, "tf32"),
            };
            let tr = if spec.b_transposed { "_transposed" } else { "" };
            consts.push((format!("{}{tr}_{suffix}", g.values[spec.b].name), t));
            Operand::Const(out.consts.len())
        }
        (_, MmaInput::TF32) => Operand::Value(spec.b),
        (_, _) if spec.b_transposed => return Err("transposed non-constant B".into()),
        (_, _) => {
            pre.push(cast(spec.b, scratch)?);
            let at = scratch;
            scratch += align64(numel(g, spec.b)? * eb);
            Operand::Scratch(at)
        }
    };
    // Everything is known to work: push.
    out.consts.extend(consts);
    out.scratch_bytes = out.scratch_bytes.max(scratch);
    for (l, k) in pre {
        out.note_host(&k.name, HostKernel::Cast(input));
        out.push_special(l, k)?;
    }
    let (m, nn) = (c0.rows as u64, n);
    let (gk, host_name, split_k) = match &kern {
        Chosen::Mma(g) => (g.kernel.clone(), g.kernel.name.clone(), g.schedule.split_k),
        Chosen::Wgmma(g) => (g.kernel.clone(), g.kernel.name.clone(), 1),
    };
    out.note_host(&host_name, HostKernel::Gemm(input, epi, split_k.max(1)));
    for (c, nb, sa, sb) in launches {
        let buf = |operand: Operand, offset: u64, len: u64, elem_bytes: u64| LaunchArg::Buf {
            operand,
            offset,
            len,
            elem_bytes,
        };
        let rows = c.rows as u64;
        if let Chosen::Wgmma(w) = &kern {
            let [ta, tb] = w.tensor_maps(rows, nn, kk);
            let tm =
                |operand: Operand, offset: u64, len: u64, t: TensorMapSpec| LaunchArg::TensorMap {
                    operand,
                    offset,
                    len,
                    dims: t.dims,
                    row_bytes: t.row_bytes,
                    box_dims: t.box_dims,
                    bf16: input == MmaInput::BF16,
                };
            let launch = Launch {
                index,
                kernel: String::new(),
                args: vec![
                    tm(a_op.clone(), c.a_off, rows * kk, ta),
                    tm(b_op.clone(), c.b_off, kk * nn, tb),
                    buf(Operand::Value(spec.target), c.y_off, rows * nn, 4),
                ]
                .into_iter()
                .chain(spec.bias.map(|b| buf(Operand::Value(b), 0, nn, 4)))
                .chain(
                    spec.residual
                        .map(|r| buf(Operand::Value(r), c.y_off, rows * nn, 4)),
                )
                .chain([
                    LaunchArg::Index(rows as i64),
                    LaunchArg::Index(nn as i64),
                    LaunchArg::Index(kk as i64),
                    LaunchArg::F32(spec.alpha),
                ])
                .chain(spec.residual.map(|_| LaunchArg::F32(spec.beta)))
                .collect(),
                grid: w.schedule.grid(rows, nn),
                block: gk.block,
                shared_bytes: w.dynamic_shared,
                generic: false,
            };
            out.push_special(launch, gk.clone())?;
            continue;
        }
        let Chosen::Mma(kern) = &kern else {
            unreachable!()
        };
        if kern.schedule.split_k > 1 {
            // Split-K adds its partial sums into the output: zero it first.
            out.push_zero(
                index,
                Operand::Value(spec.target),
                c.y_off,
                nb * m * nn,
                sku,
            )?;
        }
        let launch = Launch {
            index,
            kernel: String::new(),
            args: vec![
                buf(a_op.clone(), c.a_off, (nb - 1) * sa + rows * kk, eb),
                buf(b_op.clone(), c.b_off, (nb - 1) * sb + kk * nn, eb),
                buf(Operand::Value(spec.target), c.y_off, nb * m * nn, 4),
            ]
            .into_iter()
            .chain(spec.bias.map(|b| buf(Operand::Value(b), 0, nn, 4)))
            .chain(
                spec.residual
                    .map(|r| buf(Operand::Value(r), c.y_off, nb * m * nn, 4)),
            )
            .chain([
                LaunchArg::Index(rows as i64),
                LaunchArg::Index(nn as i64),
                LaunchArg::Index(kk as i64),
                LaunchArg::Index(sa as i64),
                LaunchArg::Index(sb as i64),
                LaunchArg::Index((m * nn) as i64),
                LaunchArg::F32(spec.alpha),
            ])
            .chain(spec.residual.map(|_| LaunchArg::F32(spec.beta)))
            .collect(),
            grid: kern.grid(rows, nn, nb),
            block: kern.kernel.block,
            shared_bytes: kern.dynamic_shared,
            generic: false,
        };
        out.push_special(launch, gk.clone())?;
    }
    out.tensor_core.push(index);
    Ok(())
}

/// The kernel a GEMM runs on.
enum Chosen {
    Mma(MmaGemm),
    Wgmma(WgmmaGemm),
}

impl Chosen {
    fn grid(&self, m: u64, n: u64, batch: u64) -> [u32; 3] {
        match self {
            Chosen::Mma(g) => g.grid(m, n, batch),
            Chosen::Wgmma(g) => g.schedule.grid(m, n),
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The `mma.sync` kernel for `p` with schedule `base` and the widest copy its shapes allow
/// (as [`select`] chooses it off sm_90).
fn mma_for(p: &GemmProblem, sku: &Sku, base: MmaSchedule) -> Result<MmaGemm, String> {
    let eb = u64::from(p.input.bytes());
    let vec_bytes = [16u32, 8, 4]
        .into_iter()
        .filter(|&v| u64::from(v) >= eb)
        .find(|&v| {
            let ve = u64::from(v) / eb;
            [p.n, p.k, p.stride_a, p.stride_b]
                .iter()
                .all(|x| x.is_multiple_of(ve))
        })
        .ok_or("N, K and the strides are not multiples of the cp.async width")?;
    let s = MmaSchedule { vec_bytes, ..base };
    s.validate(p.input, sku).map_err(|e| e.to_string())?;
    gemm_mma("kiln_gemm_tc", p.input, p.output, &Epilogue::none(), &s).map_err(|e| e.to_string())
}
