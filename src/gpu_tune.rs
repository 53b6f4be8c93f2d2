//! `kiln tune --target cuda:SKU`: tuning the GPU kernels of a model, built here and measured
//! on a GPU (this machine's, or a GPU machine without LLVM through a bundle).
//!
//! The model is planned and lowered as `kiln compile --target cuda:SKU --precision P` would;
//! every tunable kernel the lowering meets (f32 SIMT GEMM, `mma.sync` / `wgmma` GEMMs at the
//! precision, f32 implicit-GEMM conv: [`kiln_codegen::gpu::tuning`]) becomes a [`GpuTask`]
//! (identical workloads merged). For each task the tuner ([`kiln_tune::Tuner::candidates`])
//! picks candidates — the default schedule, the cost model's best (trained on this SKU's
//! records, or other SKUs' when it has none), a random share — which are generated to PTX in
//! parallel and assembled by `ptxas -v`: registers or shared memory over the SKU's limits (or
//! spills) are recorded invalid in the database at once. The valid ones go into a bundle
//! ([`kiln_runtime::tune_bundle`]) with the task's random (seeded) inputs and the expected
//! output computed by the reference ops ([`kiln_ir::Op::eval`]) on the inputs as the kernel
//! reads them (rounded to f16/bf16/tf32). `--export DIR` writes the bundle for the GPU
//! machine (`gpu_measure`, then `kiln db import`); without it, a present GPU measures each
//! batch in-process with the same measurer code and [`kiln_tune::Tuner::tune`] searches on.

use crate::compile::CompileOptions;
use crate::gpu_compile::{plan_for_gpu, resolve_sku};
use crate::tune::KILN_VERSION;
use anyhow::{bail, Context, Result};
use kiln_codegen::gpu::kernels::epilogue::Epilogue;
use kiln_codegen::gpu::kernels::gemm_mma::MmaInput;
use kiln_codegen::gpu::lower::attention::{RowAttention, ScoreStep};
use kiln_codegen::gpu::lower::{self, LowerOptions};
use kiln_codegen::gpu::tuning::{GpuSchedules, GpuTemplate, GpuTunable, TunedKernel};
use kiln_codegen::gpu::{compile_kernel, ptxas, Ptx, Sku};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::{AutoPad, ConvAttrs, NnOp, WindowAttrs};
use kiln_ir::{DType, Op, Tensor};
use kiln_runtime::tune_bundle::{
    BundleArg, BundleBuffer, BundleCandidate, BundleTask, Manifest, MeasureOutcome, BUNDLE_FORMAT,
};
use kiln_tune::{Config, Outcome, Record, Space, Task, TuneOptions, Tuner, TuningDb, Workload};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tunable GPU kernel of a model.
#[derive(Debug, Clone)]
pub struct GpuTask {
    /// Template, SKU, workload, space, default.
    pub tunable: GpuTunable,
    /// Kernels of the model with this workload.
    pub occurrences: usize,
}

impl Task for GpuTask {
    fn workload(&self) -> &Workload {
        &self.tunable.workload
    }
    fn space(&self) -> &Space {
        &self.tunable.space
    }
    fn check(&self, c: &Config) -> Result<(), String> {
        self.tunable.check(c)
    }
    fn default_config(&self) -> Config {
        self.tunable.default.clone()
    }
}

/// The tuning-database target of a SKU: `cuda:<name>`.
pub fn gpu_target(sku: &Sku) -> String {
    format!("cuda:{}", sku.name)
}

/// The tunable GPU kernels of `model` compiled for `target` (`cuda:SKU`) with `opts`
/// (shapes, opt level, precision), identical workloads merged, in lowering order.
pub fn gpu_model_tasks(model: &Path, opts: &CompileOptions, target: &str) -> Result<Vec<GpuTask>> {
    let sku = resolve_sku(target)?;
    let graph = kiln_ir::onnx::load(model)?;
    let name = model.display().to_string();
    let planned = plan_for_gpu(&graph, &name, sku, opts, &mut |_, _| {})?;
    let schedules = Arc::new(GpuSchedules::default());
    let lopts = LowerOptions {
        precision: opts.precision,
        schedules: Some(schedules.clone()),
        ..LowerOptions::for_sku(sku)
    };
    lower::lower_partition(&planned.graph, &planned.partition, &lopts)
        .with_context(|| format!("{name}: lowering for {}", sku.name))?;
    let mut tasks: Vec<GpuTask> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (t, _) in schedules.seen() {
        let fp = t.workload.fingerprint();
        match seen.get(&fp) {
            Some(&i) => tasks[i].occurrences += 1,
            None => {
                seen.insert(fp, tasks.len());
                tasks.push(GpuTask {
                    tunable: t,
                    occurrences: 1,
                });
            }
        }
    }
    Ok(tasks)
}

/// A candidate generated to PTX and accepted by `ptxas`.
#[derive(Debug, Clone)]
pub struct BuiltCandidate {
    /// The schedule.
    pub config: Config,
    /// The PTX (one entry).
    pub ptx: Ptx,
    /// The kernel and its launch.
    pub kernel: TunedKernel,
    /// What `ptxas -v` reported (none without ptxas).
    pub usage: Option<ptxas::Usage>,
}

/// Generates candidate `c` of `t` to PTX and, with `ptxas`, assembles it and checks its
/// registers, shared memory and spills against the SKU: `Err` is why it is invalid.
pub fn build_candidate(
    t: &GpuTunable,
    c: &Config,
    ptxas_bin: Option<&Path>,
) -> Result<BuiltCandidate, String> {
    let kernel = t.build("kiln_tune_kernel", c)?;
    let ptx = compile_kernel(&kernel.kernel, &t.sku).map_err(|e| format!("PTX: {e}"))?;
    let usage = match ptxas_bin {
        Some(p) => {
            let dir = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
            let u = ptxas::assemble(p, dir.path(), &ptx.text, &ptx.arch, &ptx.entry)?;
            ptxas::check_limits(&u, &kernel.kernel, kernel.dynamic_shared, &t.sku)?;
            Some(u)
        }
        None => None,
    };
    Ok(BuiltCandidate {
        config: c.clone(),
        ptx,
        kernel,
        usage,
    })
}

/// Builds candidates in parallel (rayon), in order.
pub fn build_candidates(
    t: &GpuTunable,
    configs: &[Config],
    ptxas_bin: Option<&Path>,
) -> Vec<Result<BuiltCandidate, String>> {
    configs
        .par_iter()
        .map(|c| build_candidate(t, c, ptxas_bin))
        .collect()
}

/// A small seeded generator of values in `[-1, 1)` (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// One kernel buffer of a task's data.
struct DataBuf {
    name: &'static str,
    /// Initial content (raw little-endian), or zero-filled.
    bytes: Option<Vec<u8>>,
    elem_bytes: u32,
    len: u64,
}

/// A task's buffers, expected output and how a candidate's arguments refer to them.
struct TaskData {
    bufs: Vec<DataBuf>,
    output: usize,
    expected: Vec<f32>,
    tolerance: f64,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn eval(op: Op, ins: &[&Tensor]) -> Result<Tensor> {
    let ins: Vec<Option<&Tensor>> = ins.iter().map(|t| Some(*t)).collect();
    Ok(op
        .eval(&ins)
        .map_err(|e| anyhow::anyhow!("reference {e}"))?
        .remove(0))
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_f64_vec().iter().map(|&x| x as f32).collect()
}

/// `len` random values as the tensor-core kernel of `input` reads them: the raw buffer
/// (16-bit bits or tf32-rounded f32) and the same values as f32.
fn operand(rng: &mut Rng, len: usize, input: MmaInput) -> (Vec<u8>, u32, Vec<f32>) {
    let v = rng.vec(len);
    match input {
        MmaInput::TF32 => {
            let r: Vec<f32> = v
                .iter()
                .map(|&x| kiln_codegen::gpu::lower::precision::round_tf32(x))
                .collect();
            (f32_bytes(&r), 4, r)
        }
        MmaInput::F16 | MmaInput::BF16 => {
            let dt = if input == MmaInput::F16 {
                DType::F16
            } else {
                DType::BF16
            };
            let t = Tensor::from_vec(&[len], v).cast(dt);
            let raw = kiln_ir::onnx::tensor_proto::to_raw(&t);
            (raw, 2, f32s(&t.cast(DType::F32)))
        }
    }
}

/// `batch` products `A[z]·B[z]` (at element strides `sa`, `sb`) by the reference MatMul, plus
/// a per-column bias.
#[allow(clippy::too_many_arguments)]
fn gemm_expected(
    (m, n, k): (usize, usize, usize),
    batch: usize,
    (a, sa): (&[f32], usize),
    (b, sb): (&[f32], usize),
    epi: &Epilogue,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(batch * m * n);
    for z in 0..batch {
        let at = Tensor::from_vec(&[m, k], a[z * sa..z * sa + m * k].to_vec());
        let bt = Tensor::from_vec(&[k, n], b[z * sb..z * sb + k * n].to_vec());
        let y = f32s(&eval(Op::Linalg(LinalgOp::MatMul), &[&at, &bt])?);
        out.extend(y.iter().enumerate().map(|(i, v)| {
            let bv = bias.map_or(0.0, |bb| bb[i % n]);
            let rv = residual.map_or(0.0, |r| r[z * m * n + i]);
            epi.apply(*v, 1.0, 1.0, bv, rv)
        }));
    }
    Ok(out)
}

/// The bias and residual buffers of a GEMM epilogue over `batch` `m×n` outputs (random,
/// where the epilogue has them), appended after the output buffer.
fn epilogue_bufs(
    rng: &mut Rng,
    epi: &Epilogue,
    n: usize,
    outputs: usize,
    bufs: &mut Vec<DataBuf>,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let bias = epi.bias.then(|| rng.vec(n));
    let res = epi.has_residual().then(|| rng.vec(outputs));
    for (name, v) in [("bias", &bias), ("residual", &res)] {
        if let Some(v) = v {
            bufs.push(DataBuf {
                name,
                bytes: Some(f32_bytes(v)),
                elem_bytes: 4,
                len: v.len() as u64,
            });
        }
    }
    (bias, res)
}

/// The data of task `t` (seeded by its fingerprint): inputs, the zeroed output, the
/// expected output (reference ops) and the tolerance.
fn task_data(t: &GpuTunable) -> Result<TaskData> {
    let fp = t.workload.fingerprint();
    let mut rng = Rng(u64::from_str_radix(&fp, 16).unwrap_or(1) | 1);
    let f32buf = |name, v: &[f32]| DataBuf {
        name,
        bytes: Some(f32_bytes(v)),
        elem_bytes: 4,
        len: v.len() as u64,
    };
    let out = |len: usize| DataBuf {
        name: "C",
        bytes: None,
        elem_bytes: 4,
        len: len as u64,
    };
    Ok(match &t.template {
        GpuTemplate::GemmF32 { m, n, k } => {
            let (m, n, k) = (*m as usize, *n as usize, *k as usize);
            let (a, b) = (rng.vec(m * k), rng.vec(k * n));
            let expected = gemm_expected(
                (m, n, k),
                1,
                (&a, 0),
                (&b, 0),
                &Epilogue::none(),
                None,
                None,
            )?;
            TaskData {
                bufs: vec![f32buf("A", &a), f32buf("B", &b), out(m * n)],
                output: 2,
                expected,
                tolerance: 1e-4,
            }
        }
        GpuTemplate::Mma { .. } | GpuTemplate::Wgmma { .. } => {
            // The wgmma GEMM is one matrix: batch 1, no strides.
            let (m, n, k, nb, sa, sb, input, epi) = match &t.template {
                GpuTemplate::Mma { p, epi } => (
                    p.m,
                    p.n,
                    p.k,
                    p.batch.max(1),
                    p.stride_a,
                    p.stride_b,
                    p.input,
                    epi,
                ),
                GpuTemplate::Wgmma {
                    m,
                    n,
                    k,
                    input,
                    epi,
                } => (*m, *n, *k, 1, 0, 0, *input, epi),
                _ => unreachable!("a tensor-core GEMM"),
            };
            let u = |v: u64| v as usize;
            let (m, n, k, nb, sa, sb) = (u(m), u(n), u(k), u(nb), u(sa), u(sb));
            let (a_raw, eb, a) = operand(&mut rng, (nb - 1) * sa + m * k, input);
            let (b_raw, _, b) = operand(&mut rng, (nb - 1) * sb + k * n, input);
            let mut bufs = vec![
                DataBuf {
                    name: "A",
                    len: (a_raw.len() / eb as usize) as u64,
                    bytes: Some(a_raw),
                    elem_bytes: eb,
                },
                DataBuf {
                    name: "B",
                    len: (b_raw.len() / eb as usize) as u64,
                    bytes: Some(b_raw),
                    elem_bytes: eb,
                },
                out(nb * m * n),
            ];
            let (bias_v, res_v) = epilogue_bufs(&mut rng, epi, n, nb * m * n, &mut bufs);
            let expected = gemm_expected(
                (m, n, k),
                nb,
                (&a, sa),
                (&b, sb),
                epi,
                bias_v.as_deref(),
                res_v.as_deref(),
            )?;
            TaskData {
                bufs,
                output: 2,
                expected,
                tolerance: 1e-3,
            }
        }
        GpuTemplate::Conv { geom: g, epi } | GpuTemplate::ConvMma { geom: g, epi, .. } => {
            let u = |v: u64| v as usize;
            let xs = [u(g.n), u(g.c), u(g.h), u(g.w)];
            let ws = [u(g.oc), u(g.c), u(g.kh), u(g.kw)];
            let ys = [u(g.n), u(g.oc), u(g.oh()), u(g.ow())];
            // The tensor-core conv reads f16/bf16 `X` and `W` (the expected output is
            // computed from the rounded values).
            let input = match &t.template {
                GpuTemplate::ConvMma { input, .. } => Some(*input),
                _ => None,
            };
            let mut operand_buf = |name: &'static str, len: usize| -> (DataBuf, Vec<f32>) {
                match input {
                    Some(i) => {
                        let (raw, eb, v) = operand(&mut rng, len, i);
                        let buf = DataBuf {
                            name,
                            len: len as u64,
                            bytes: Some(raw),
                            elem_bytes: eb,
                        };
                        (buf, v)
                    }
                    None => {
                        let v = rng.vec(len);
                        (f32buf(name, &v), v)
                    }
                }
            };
            let (xbuf, x) = operand_buf("X", xs.iter().product());
            let (wbuf, w) = operand_buf("W", ws.iter().product());
            let bias_v = epi.bias.then(|| rng.vec(u(g.oc)));
            let res_v = epi.residual.then(|| rng.vec(ys.iter().product()));
            let attrs = ConvAttrs {
                window: WindowAttrs {
                    kernel_shape: Some(vec![ws[2], ws[3]]),
                    strides: Some(vec![u(g.stride[0]), u(g.stride[1])]),
                    dilations: Some(vec![u(g.dilation[0]), u(g.dilation[1])]),
                    pads: Some(g.pads.iter().map(|&p| p as usize).collect()),
                    auto_pad: AutoPad::NotSet,
                },
                group: 1,
            };
            let xt = Tensor::from_vec(&xs, x.clone());
            let wt = Tensor::from_vec(&ws, w.clone());
            let mut ins = vec![&xt, &wt];
            let bt = bias_v
                .as_ref()
                .map(|b| Tensor::from_vec(&[u(g.oc)], b.clone()));
            if let Some(b) = &bt {
                ins.push(b);
            }
            let y = eval(Op::Nn(NnOp::Conv(attrs)), &ins)?;
            if y.shape() != ys {
                bail!("reference conv: shape {:?}, expected {ys:?}", y.shape());
            }
            let mut expected = f32s(&y);
            if let Some(r) = &res_v {
                expected.iter_mut().zip(r).for_each(|(e, r)| *e += r);
            }
            if epi.relu {
                expected.iter_mut().for_each(|e| *e = e.max(0.0));
            }
            let mut bufs = vec![xbuf, wbuf];
            if let Some(b) = &bias_v {
                bufs.push(f32buf("bias", b));
            }
            if let Some(r) = &res_v {
                bufs.push(f32buf("residual", r));
            }
            bufs.push(DataBuf {
                name: "Y",
                bytes: None,
                elem_bytes: 4,
                len: expected.len() as u64,
            });
            let output = bufs.len() - 1;
            if input.is_some() {
                // The same (rounded) X as f32, for the candidates that read an f32 X.
                bufs.push(f32buf("X32", &x));
            }
            TaskData {
                output,
                bufs,
                expected,
                tolerance: if input.is_some() { 1e-3 } else { 1e-4 },
            }
        }
        GpuTemplate::RowAttention(a) => attention_data(&mut rng, a),
    })
}

/// The buffers of a row-attention task: Q, Kᵀ, V, the mask (if any; some keys masked off
/// with -10000 as BERT does) and O, with the expected O of [`RowAttention::eval`].
fn attention_data(rng: &mut Rng, a: &RowAttention) -> TaskData {
    let f32buf = |name, v: &[f32]| DataBuf {
        name,
        bytes: Some(f32_bytes(v)),
        elem_bytes: 4,
        len: v.len() as u64,
    };
    let (rows, d) = (a.bh * a.sq, a.d);
    let q = rng.vec(rows * d);
    let kt = rng.vec(a.bh * d * a.skv);
    let v = rng.vec(a.bh * a.skv * d);
    let mask: Vec<f32> = if a.steps.contains(&ScoreStep::AddMask) {
        let n = a.mask_offset(a.bh - 1, a.sq - 1, a.skv - 1) + 1;
        rng.vec(n)
            .into_iter()
            .map(|x| if x > 0.8 { -10000.0 } else { x })
            .collect()
    } else {
        Vec::new()
    };
    let mut expected = vec![0f32; rows * d];
    a.eval(&q, &kt, &v, &mask, &mut expected);
    let mut bufs = vec![f32buf("Q", &q), f32buf("Kt", &kt), f32buf("V", &v)];
    if !mask.is_empty() {
        bufs.push(f32buf("mask", &mask));
    }
    bufs.push(DataBuf {
        name: "O",
        bytes: None,
        elem_bytes: 4,
        len: expected.len() as u64,
    });
    TaskData {
        output: bufs.len() - 1,
        bufs,
        expected,
        tolerance: 1e-4,
    }
}

/// The launch arguments of candidate `k` of `t` over the task's buffers (indices as
/// [`task_data`] lays them out).
fn candidate_args(t: &GpuTunable, k: &TunedKernel) -> Vec<BundleArg> {
    let buf = |i: usize| BundleArg::Buf { buffer: i };
    let idx = |v: u64| BundleArg::Index { value: v as i64 };
    match &t.template {
        GpuTemplate::GemmF32 { m, n, k } => {
            vec![buf(0), buf(1), buf(2), idx(*m), idx(*n), idx(*k)]
        }
        GpuTemplate::Mma { p, epi } => {
            let mut a = epilogue_args(epi, vec![buf(0), buf(1), buf(2)]);
            a.extend([
                idx(p.m),
                idx(p.n),
                idx(p.k),
                idx(p.stride_a),
                idx(p.stride_b),
                idx(p.m * p.n),
            ]);
            scale_args(epi, a)
        }
        GpuTemplate::Wgmma {
            m,
            n,
            k: kk,
            input,
            epi,
        } => {
            // wgmma candidates always carry their descriptors ([0; 2]: not reached).
            let none = kiln_codegen::gpu::kernels::gemm_wgmma::TensorMapSpec {
                dims: [0, 0],
                row_bytes: 0,
                box_dims: [0, 0],
            };
            let maps = k.tensor_maps.unwrap_or([none; 2]);
            let tm = |i: usize, s: kiln_codegen::gpu::kernels::gemm_wgmma::TensorMapSpec| {
                BundleArg::TensorMap {
                    buffer: i,
                    dims: s.dims,
                    row_bytes: s.row_bytes,
                    box_dims: s.box_dims,
                    bf16: *input == MmaInput::BF16,
                }
            };
            let mut a = epilogue_args(epi, vec![tm(0, maps[0]), tm(1, maps[1]), buf(2)]);
            a.extend([idx(*m), idx(*n), idx(*kk)]);
            scale_args(epi, a)
        }
        GpuTemplate::Conv { epi, .. } | GpuTemplate::ConvMma { epi, .. } => {
            let n = 3 + usize::from(epi.bias) + usize::from(epi.residual);
            let mut args: Vec<BundleArg> = (0..n).map(buf).collect();
            // A tensor-core conv reading an f32 X takes the task's last buffer (X32).
            let x_f32 = matches!(t.template, GpuTemplate::ConvMma { .. })
                && matches!(
                    k.kernel.params.first(),
                    Some(kiln_codegen::gpu::KernelParam::Buffer {
                        elem: kiln_codegen::gpu::Elem::F32,
                        ..
                    })
                );
            if x_f32 {
                args[0] = buf(n);
            }
            args
        }
        // Q, Kᵀ, V[, mask], O
        GpuTemplate::RowAttention(a) => {
            let n = 4 + usize::from(a.steps.contains(&ScoreStep::AddMask));
            (0..n).map(buf).collect()
        }
    }
}

/// `args` (A, B, C) followed by the epilogue's buffers (bias, residual: buffers 3, 4 as
/// [`epilogue_bufs`] lays them out).
fn epilogue_args(epi: &Epilogue, mut args: Vec<BundleArg>) -> Vec<BundleArg> {
    let mut next = 3;
    for has in [epi.bias, epi.has_residual()] {
        if has {
            args.push(BundleArg::Buf { buffer: next });
            next += 1;
        }
    }
    args
}

/// `args` followed by the GEMM's `alpha` (1) and, with a residual, `beta` (1).
fn scale_args(epi: &Epilogue, mut args: Vec<BundleArg>) -> Vec<BundleArg> {
    args.push(BundleArg::F32 { value: 1.0 });
    if epi.has_residual() {
        args.push(BundleArg::F32 { value: 1.0 });
    }
    args
}

/// Writes the bundle of `tasks` (each with its built candidates, the default first where
/// it is valid) into `dir` (created; files of an earlier bundle there are replaced) and
/// returns its manifest.
pub fn write_bundle(
    dir: &Path,
    sku: &Sku,
    tasks: &[(&GpuTunable, Vec<BuiltCandidate>)],
) -> Result<Manifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    let mut out = Vec::new();
    for (ti, (t, cands)) in tasks.iter().enumerate() {
        if cands.is_empty() {
            continue;
        }
        let data = task_data(t).with_context(|| format!("task {}", t.label()))?;
        let mut buffers = Vec::new();
        for b in &data.bufs {
            let file = match &b.bytes {
                Some(bytes) => {
                    let f = format!("t{ti}_{}.bin", b.name);
                    write(&f, bytes)?;
                    Some(f)
                }
                None => None,
            };
            buffers.push(BundleBuffer {
                name: b.name.to_string(),
                file,
                elem_bytes: b.elem_bytes,
                len: b.len,
            });
        }
        let expected = format!("t{ti}_expected.bin");
        write(&expected, &f32_bytes(&data.expected))?;
        let mut candidates = Vec::new();
        for (ci, c) in cands.iter().enumerate() {
            let ptx = format!("t{ti}_c{ci}.ptx");
            write(&ptx, c.ptx.text.as_bytes())?;
            candidates.push(BundleCandidate {
                config: c.config.0.clone(),
                ptx,
                entry: c.ptx.entry.clone(),
                args: candidate_args(t, &c.kernel),
                grid: c.kernel.grid,
                block: c.kernel.block,
                shared_bytes: c.kernel.dynamic_shared,
            });
        }
        out.push(BundleTask {
            workload: t.workload.fingerprint(),
            kind: t.workload.kind.clone(),
            description: t.workload.description.clone(),
            workload_features: t.workload.features.clone(),
            buffers,
            output: data.output,
            expected,
            tolerance: data.tolerance,
            candidates,
        });
    }
    let m = Manifest {
        format: BUNDLE_FORMAT,
        target: gpu_target(sku),
        sku: sku.name.clone(),
        arch: sku.arch.clone(),
        kiln_version: KILN_VERSION.to_string(),
        l2_bytes: sku.l2_bytes,
        tasks: out,
    };
    write(
        "manifest.json",
        serde_json::to_string_pretty(&m)?.as_bytes(),
    )?;
    Ok(m)
}

/// Settings of [`tune_gpu`].
#[derive(Debug, Clone)]
pub struct GpuTuneSettings {
    /// Shapes, opt level and precision, as for `kiln compile`.
    pub compile: CompileOptions,
    /// `cuda:SKU`.
    pub target: String,
    /// The tuning database (invalid candidates are recorded in it; in-process measurements
    /// too).
    pub db: PathBuf,
    /// Write a bundle here instead of measuring.
    pub export: Option<PathBuf>,
    /// Candidates per task in a bundle (and per round in-process).
    pub candidates: usize,
    /// In-process: measurements over all tasks.
    pub trials: usize,
}

/// What [`tune_gpu`] did for one task.
#[derive(Debug, Clone)]
pub struct GpuTaskSummary {
    /// The workload description.
    pub workload: String,
    /// Kernels with this workload.
    pub occurrences: usize,
    /// Candidates written to the bundle (export) or measured (in-process).
    pub candidates: usize,
    /// Candidates found invalid here (check, PTX or ptxas).
    pub invalid: usize,
    /// In-process: the default's and the best latency.
    pub default_seconds: Option<f64>,
    /// In-process: the best latency.
    pub best_seconds: Option<f64>,
}

/// Up to `n` valid built candidates of `task` chosen by `tuner`; the invalid ones are
/// recorded in `db` (and not proposed again). Returns them and the number found invalid.
fn choose_candidates(
    tuner: &mut Tuner,
    db: &TuningDb,
    target: &str,
    task: &GpuTask,
    n: usize,
    ptxas_bin: Option<&Path>,
) -> Result<(Vec<BuiltCandidate>, usize)> {
    let mut built: Vec<BuiltCandidate> = Vec::new();
    let mut tried: Vec<Config> = Vec::new();
    let mut invalid = 0;
    for round in 0..4u64 {
        if built.len() >= n {
            break;
        }
        let cs = tuner.candidates(
            task,
            n - built.len(),
            &TuneOptions::default(),
            &tried,
            round,
        )?;
        if cs.is_empty() {
            break;
        }
        tried.extend(cs.iter().cloned());
        for (c, r) in cs
            .iter()
            .zip(build_candidates(&task.tunable, &cs, ptxas_bin))
        {
            match r {
                Ok(b) => built.push(b),
                Err(msg) => {
                    invalid += 1;
                    db.insert(&Record::new(
                        &task.tunable.workload,
                        target,
                        KILN_VERSION,
                        c.clone(),
                        Outcome::Invalid { msg },
                    ))?;
                }
            }
        }
    }
    Ok((built, invalid))
}

/// The message when no GPU can measure here.
pub fn no_gpu_message(target: &str, db: &Path) -> String {
    format!(
        "no CUDA device on this machine (no libcuda or no GPU), so the {target} kernels \
         cannot be measured here. Write a bundle with `--export DIR`, measure it on the GPU \
         machine with the runtime-only `gpu_measure DIR` (scripts/gpu_tune_check.sh), then \
         `kiln db import DIR/results.jsonl --db {}`",
        db.display()
    )
}

fn to_outcome(o: &MeasureOutcome) -> Outcome {
    match o.clone() {
        MeasureOutcome::Ok { seconds } => Outcome::Ok { seconds },
        MeasureOutcome::Invalid { msg } => Outcome::Invalid { msg },
        MeasureOutcome::Crash { msg } => Outcome::Crash { msg },
        MeasureOutcome::Timeout { limit_s } => Outcome::Timeout { limit_s },
        MeasureOutcome::Wrong { msg } => Outcome::Wrong { msg },
    }
}

/// Tunes (or exports) the GPU kernels of `model` (see the module doc).
pub fn tune_gpu(model: &Path, s: &GpuTuneSettings) -> Result<Vec<GpuTaskSummary>> {
    let sku = resolve_sku(&s.target)?;
    let target = gpu_target(sku);
    if s.export.is_none() && kiln_runtime::cuda::device_count() == 0 {
        bail!("{}", no_gpu_message(&s.target, &s.db));
    }
    let tasks = gpu_model_tasks(model, &s.compile, &s.target)?;
    if tasks.is_empty() {
        bail!(
            "{}: no tunable GPU kernels for {target} at precision {} (f32 GEMM, tensor-core \
             GEMM, f32 conv)",
            model.display(),
            s.compile.precision.name()
        );
    }
    let ptxas_bin = ptxas::find_ptxas();
    if ptxas_bin.is_none() {
        eprintln!(
            "warning: no ptxas (set KILN_PTXAS or install the .venv's nvidia-cuda-nvcc): \
             candidates are not checked for registers and spills"
        );
    }
    let db = TuningDb::open(&s.db)?;
    let mut tuner = Tuner::new(&db, &target, KILN_VERSION);
    let n = s.candidates.max(1);
    let mut out = Vec::new();
    if let Some(dir) = &s.export {
        let mut chosen = Vec::new();
        for t in &tasks {
            let (built, invalid) =
                choose_candidates(&mut tuner, &db, &target, t, n, ptxas_bin.as_deref())?;
            out.push(GpuTaskSummary {
                workload: t.tunable.label().to_string(),
                occurrences: t.occurrences,
                candidates: built.len(),
                invalid,
                default_seconds: None,
                best_seconds: None,
            });
            chosen.push((&t.tunable, built));
        }
        write_bundle(dir, sku, &chosen)?;
        return Ok(out);
    }
    // In-process: the tuner measures batches through a one-task bundle each.
    let scratch = tempfile::tempdir().context("creating a scratch folder for bundles")?;
    let per_task = (s.trials / tasks.len()).max(n.min(s.trials.max(1)));
    for t in &tasks {
        let mut invalid = 0;
        let mut measure = |task: &dyn Task, cs: &[Config]| -> Vec<Outcome> {
            let _ = task;
            let built = build_candidates(&t.tunable, cs, ptxas_bin.as_deref());
            let mut outcomes: Vec<Option<Outcome>> = vec![None; cs.len()];
            let mut ok = Vec::new();
            let mut pos = Vec::new();
            for (i, b) in built.into_iter().enumerate() {
                match b {
                    Ok(b) => {
                        ok.push(b);
                        pos.push(i);
                    }
                    Err(msg) => {
                        invalid += 1;
                        outcomes[i] = Some(Outcome::Invalid { msg });
                    }
                }
            }
            if !ok.is_empty() {
                let dir = scratch.path().join("bundle");
                let _ = std::fs::remove_dir_all(&dir);
                let r = write_bundle(&dir, sku, &[(&t.tunable, ok)])
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|_| {
                        let mut got = Vec::new();
                        kiln_runtime::tune_measure::measure_bundle(
                            &dir,
                            Default::default(),
                            None,
                            |_, ci, o| got.push((ci, to_outcome(o))),
                        )?;
                        Ok(got)
                    });
                match r {
                    Ok(got) => {
                        for (ci, o) in got {
                            outcomes[pos[ci]] = Some(o);
                        }
                    }
                    Err(msg) => {
                        for &p in &pos {
                            outcomes[p] = Some(Outcome::Crash { msg: msg.clone() });
                        }
                    }
                }
            }
            outcomes
                .into_iter()
                .map(|o| {
                    o.unwrap_or(Outcome::Crash {
                        msg: "not measured".into(),
                    })
                })
                .collect()
        };
        let opts = TuneOptions {
            trials: per_task,
            batch: n,
            ..Default::default()
        };
        let r = tuner.tune(t, &mut measure, &opts, &mut |_| {})?;
        out.push(GpuTaskSummary {
            workload: t.tunable.label().to_string(),
            occurrences: t.occurrences,
            candidates: r.measured,
            invalid,
            default_seconds: r.default_seconds,
            best_seconds: r.best.map(|b| b.1),
        });
    }
    Ok(out)
}
