//! Whole-model compilation for NVIDIA GPUs (`--target cuda:SKU`): the same graph passes as
//! the CPU path ([`crate::pipeline::plan_graph`]: fold, eqsat, fusion, memory plan) →
//! [`kiln_codegen::gpu::lower::lower_partition`] (specialized GEMM / row-softmax / conv /
//! depthwise / LayerNorm / row-reduction kernels,
//! the generic one-thread-per-element path for the rest) → one `gpu.module` → one PTX text
//! for the SKU → an [`Artifact`] whose target is `cuda:<sku>`, whose kernel section is the
//! PTX and whose plan holds a [`GpuPlan`]: per launch the entry name, buffer views
//! (input / output / weight / arena slot + byte offset), scalars, grid, block and dynamic
//! shared memory. `kiln_runtime::cuda_model` runs it.
//!
//! Graph outputs that are graph inputs or constants get a copy launch. Not supported yet on
//! this path (clear errors): `--max-batch`, models with a dynamic tail, kernels with no GPU
//! lowering (listed by name and op).
//!
//! [`emulate`] runs the same plan built with the generic path only on the CPU (each generic
//! kernel body compiled as a CPU kernel), which checks the lowering and the plan's buffer
//! wiring against the reference interpreter on machines without a GPU.

use crate::compile::{io_spec, CompileOptions, CompileReport, PlanBuilder};
use crate::pipeline;
use anyhow::{bail, Context, Result};
use kiln_codegen::gpu::kernels::epilogue::Epilogue;
use kiln_codegen::gpu::kernels::gemm_mma::MmaInput;
use kiln_codegen::gpu::kernels::reduce::ReduceKind;
use kiln_codegen::gpu::lower::{
    self, precision, GpuLowering, HostKernel, LaunchArg, LowerOptions, Operand,
};
use kiln_codegen::gpu::{DeviceDb, Sku};
use kiln_passes::fusion::KernelKind;
use kiln_runtime::plan::WeightsBuilder;
use kiln_runtime::{Artifact, BufRef, ExecPlan, GpuArg, GpuPlan, GpuStep};
use std::path::Path;
use std::time::Instant;

/// Resolves a `cuda:...` target.
pub fn resolve_sku(target: &str) -> Result<&'static Sku> {
    Ok(DeviceDb::builtin()?.parse_target(target)?)
}

/// The eqsat cost model's description of `sku` at `precision`: the f32 peak and the f32
/// GEMM's split-K for f32; the tensor cores' peak, and no split (the untuned tensor-core
/// GEMMs do not split K), for tf32 / f16 / bf16.
pub fn eqsat_device(
    sku: &Sku,
    precision: precision::Precision,
) -> kiln_passes::eqsat::cost::Device {
    let p = &sku.peak_tflops;
    use precision::Precision as P;
    let peak = match precision {
        P::F32 => p.f32,
        P::TF32 => p.tf32,
        P::F16 => p.f16,
        P::BF16 => p.bf16,
    };
    let mut d = kiln_passes::eqsat::cost::Device::gpu(
        &sku.name,
        sku.sm_count,
        peak * 1e3,
        sku.mem_bandwidth_gbs,
    );
    if precision != P::F32 {
        // the tensor-core GEMMs neither split K nor wait on each K step's loads (their
        // copies are pipelined `stages` deep)
        d.max_split_k = 1;
        d.k_step_us = 0.0;
    }
    d
}

/// The planned graph of `graph` for a GPU compile (no `--max-batch`, no dynamic tail).
pub(crate) fn plan_for_gpu(
    graph: &kiln_ir::Graph,
    name: &str,
    sku: &Sku,
    opts: &CompileOptions,
    print: &mut dyn FnMut(&str, &str),
) -> Result<pipeline::Planned> {
    if opts.max_batch.is_some() {
        bail!("{name}: --max-batch is not supported for cuda targets yet");
    }
    let popts = pipeline::Options {
        shapes: opts.shapes.clone(),
        print_after: opts.print_after.clone(),
        opt_level: opts.opt_level,
        measured_us: opts.measured_us.clone(),
        device: Some(eqsat_device(sku, opts.precision)),
        eqsat_limits: opts.eqsat_limits.clone(),
    };
    let planned = pipeline::plan_graph(graph.clone(), &popts, print)?;
    if planned.tail.is_some() {
        bail!(
            "{name}: shapes depend on input values (a dynamic tail), which the cuda targets \
             do not support; make such inputs initializers of the model"
        );
    }
    Ok(planned)
}

/// Lowers a planned graph and builds its execution plan (weights blob included).
pub fn gpu_plan(
    planned: &pipeline::Planned,
    sku: &Sku,
    lopts: &LowerOptions,
) -> Result<(ExecPlan, GpuLowering, Vec<u8>)> {
    let (g, p, mem) = (&planned.graph, &planned.partition, &planned.memory);
    let mut lowering = lower::lower_partition(g, p, lopts)?;
    // Graph outputs that are graph inputs or constants: a copy each.
    for (oi, &o) in g.outputs.iter().enumerate() {
        if g.inputs.contains(&o) || g.const_value(o).is_some() {
            lowering.add_output_copy(g, o, oi, lopts.max_blocks)?;
        }
    }
    let mut weights = WeightsBuilder::new();
    let mut b = PlanBuilder::new(g, mem, &mut weights);
    let mut const_refs: Vec<Option<BufRef>> = vec![None; lowering.consts.len()];
    // The per-launch scratch region (tensor-core operand casts) follows the arena.
    let scratch_base = (mem.arena_bytes as u64).div_ceil(64) * 64;
    let arena_bytes = if lowering.scratch_bytes > 0 {
        scratch_base + lowering.scratch_bytes
    } else {
        mem.arena_bytes as u64
    };
    let mut steps = Vec::new();
    for l in &lowering.launches {
        // a concat whose parts the memory plan placed inside its output: nothing to copy
        if mem.elided.contains(&l.index) {
            continue;
        }
        let (label, k_outputs): (String, &[kiln_ir::ValueId]) = match p.kernels.get(l.index) {
            Some(k) => (k.name.clone(), &k.outputs),
            None => (l.kernel.clone(), &[]),
        };
        let mut args = Vec::new();
        for a in &l.args {
            args.push(match a {
                LaunchArg::Buf { .. } | LaunchArg::TensorMap { .. } => {
                    let (operand, offset, len, elem_bytes) = match a {
                        LaunchArg::Buf {
                            operand,
                            offset,
                            len,
                            elem_bytes,
                        } => (operand, offset, len, elem_bytes),
                        LaunchArg::TensorMap {
                            operand,
                            offset,
                            len,
                            ..
                        } => (operand, offset, len, &2u64),
                        _ => unreachable!(),
                    };
                    let (buf, written) = match operand {
                        // The source of an output copy: the graph input or the constant
                        // itself (`buf` would answer the output's own buffer).
                        Operand::Value(v) if l.index == lower::NO_KERNEL => {
                            let r = match g.inputs.iter().position(|i| i == v) {
                                Some(index) => BufRef::Input { index },
                                None => {
                                    let t = g.const_value(*v).context("output copy source")?;
                                    let bytes = kiln_ir::onnx::tensor_proto::to_raw(t);
                                    BufRef::Weight {
                                        index: b.weights.push(&g.values[*v].name, &bytes),
                                    }
                                }
                            };
                            (r, false)
                        }
                        Operand::Value(v) => (
                            b.buf(*v).with_context(|| format!("kernel {label}"))?,
                            k_outputs.contains(v),
                        ),
                        Operand::GraphOutput(index) => (BufRef::Output { index: *index }, true),
                        Operand::Scratch(at) => (
                            BufRef::Arena {
                                offset: scratch_base + at,
                                bytes: lowering.scratch_bytes.saturating_sub(*at),
                            },
                            true,
                        ),
                        Operand::Const(i) => {
                            let r = match &const_refs[*i] {
                                Some(r) => r.clone(),
                                None => {
                                    let (name, t) = &lowering.consts[*i];
                                    let bytes = kiln_ir::onnx::tensor_proto::to_raw(t);
                                    let r = BufRef::Weight {
                                        index: b.weights.push(name, &bytes),
                                    };
                                    const_refs[*i] = Some(r.clone());
                                    r
                                }
                            };
                            (r, false)
                        }
                    };
                    match a {
                        LaunchArg::TensorMap {
                            dims,
                            row_bytes,
                            box_dims,
                            bf16,
                            ..
                        } => GpuArg::TensorMap {
                            buf,
                            offset: offset * 2,
                            len: *len,
                            dims: *dims,
                            row_bytes: *row_bytes,
                            box_dims: *box_dims,
                            bf16: *bf16,
                        },
                        _ => GpuArg::Buf {
                            buf,
                            offset: offset * elem_bytes,
                            len: *len,
                            elem_bytes: *elem_bytes,
                            written,
                        },
                    }
                }
                LaunchArg::Index(v) => GpuArg::Index(*v),
                LaunchArg::F32(v) => GpuArg::F32(v.to_bits()),
            });
        }
        steps.push(GpuStep {
            kernel: l.kernel.clone(),
            args,
            grid: l.grid,
            block: l.block,
            shared_bytes: l.shared_bytes,
            label,
            generic: l.generic,
        });
    }
    let plan = ExecPlan {
        inputs: g
            .inputs
            .iter()
            .map(|&v| io_spec(g, v))
            .collect::<Result<_>>()?,
        outputs: g
            .outputs
            .iter()
            .map(|&v| io_spec(g, v))
            .collect::<Result<_>>()?,
        arena_bytes,
        gpu: Some(GpuPlan {
            sku: sku.name.clone(),
            sku_display: sku.display_name.clone(),
            arch: sku.arch.clone(),
            steps,
        }),
        ..ExecPlan::default()
    };
    let (blob, specs) = weights.finish();
    let mut plan = plan;
    plan.weights = specs;
    plan.validate(blob.len() as u64)
        .map_err(|e| anyhow::anyhow!("invalid GPU execution plan: {e}"))?;
    Ok((plan, lowering, blob))
}

/// Compiles a graph for the GPU SKU named by `target` (see the module doc).
pub fn compile_graph_gpu(
    graph: &kiln_ir::Graph,
    name: &str,
    target: &str,
    opts: &CompileOptions,
    mut print: impl FnMut(&str, &str),
) -> Result<(Artifact, CompileReport)> {
    let sku = resolve_sku(target)?;
    let mut report = CompileReport::default();
    let t = Instant::now();
    let planned = plan_for_gpu(graph, name, sku, opts, &mut print)?;
    report.timings.push(("plan", t.elapsed()));
    let t = Instant::now();
    // Tuned schedules (`--db`): the lowering takes each tunable kernel's from its record.
    let schedules = (!opts.schedules.is_empty() || opts.tuning_db.is_some()).then(|| {
        std::sync::Arc::new(kiln_codegen::gpu::tuning::GpuSchedules::new(
            (*opts.schedules).clone(),
        ))
    });
    let lopts = LowerOptions {
        precision: opts.precision,
        schedules: schedules.clone(),
        ..LowerOptions::for_sku(sku)
    };
    let (plan, lowering, weights) = gpu_plan(&planned, sku, &lopts)
        .with_context(|| format!("{name}: lowering for {}", sku.name))?;
    if let Some(s) = &schedules {
        let seen = s.seen();
        report.tuned = seen.iter().filter(|(_, used)| *used).count();
        report.tunable = seen.len();
        report.schedules_given = opts.schedules.len();
        report.tuning_db = opts.tuning_db.clone();
    }
    report.timings.push(("lower", t.elapsed()));
    let t = Instant::now();
    let ptx = lower::compile_module(&lowering, sku)
        .with_context(|| format!("{name}: generating PTX for {} ({})", sku.name, sku.arch))?;
    report.timings.push(("mlir+ptx", t.elapsed()));
    let (g, p) = (&planned.graph, &planned.partition);
    let describe = |idx: Vec<usize>| -> Vec<String> {
        idx.iter()
            .map(|&i| {
                let k = &p.kernels[i];
                let ops: Vec<&str> = k.nodes.iter().map(|&n| g.nodes[n].op.op_type()).collect();
                format!("{} ({})", k.name, ops.join(", "))
            })
            .collect()
    };
    let generic = describe(lowering.generic_kernels());
    let epilogues = describe(lowering.generic_epilogues());
    let steps = plan.gpu.as_ref().map_or(0, |gp| gp.steps.len());
    report.gpu.push(format!(
        "target: cuda:{} ({}, {}), {} launches of {} kernels, PTX {} bytes",
        sku.name,
        sku.display_name,
        sku.arch,
        steps,
        lowering.kernels.len(),
        ptx.len()
    ));
    report.gpu.push(format!(
        "generic-path kernels: {} of {}: {}",
        generic.len(),
        p.kernels
            .iter()
            .filter(|k| k.kind != KernelKind::Alias)
            .count(),
        generic.join(", ")
    ));
    report.gpu.push(format!(
        "specialized kernels with a generic epilogue: {}: {}",
        epilogues.len(),
        epilogues.join(", ")
    ));
    report
        .gpu
        .push(tensor_core_summary(&planned, &lowering, opts.precision));
    report.gpu.extend(tensor_core_fusion_summary(
        &planned,
        &lowering,
        opts.precision,
    ));
    report.gpu.push(attention_summary(&planned, &lowering));
    report.kernels = lowering.kernels.len();
    report.views = lowering.views;
    report.variants = 1;
    report.arena_bytes = plan.arena_bytes;
    report.weights_bytes = weights.len() as u64;
    report.library_bytes = ptx.len() as u64;
    let artifact = Artifact {
        compiler_version: format!("kiln {}", env!("CARGO_PKG_VERSION")),
        target: format!("cuda:{}", sku.name),
        plan,
        weights,
        kernels: ptx.into_bytes(),
    };
    Ok((artifact, report))
}

/// Compiles `model` for `target` and runs the plan on the CPU: each generic kernel's body as
/// a CPU kernel, launches in order over a host arena; with `specialized`, the GEMM and row
/// softmax launches run as plain Rust loops over the same buffer views and scalars (so
/// their offsets, batching, transposed constants and epilogues are checked), otherwise the
/// model is lowered with the generic path only. Returns the outputs (plan order) for the
/// given inputs. See the module doc.
pub fn emulate(
    model: &Path,
    target: &str,
    opts: &CompileOptions,
    inputs: &[kiln_ir::Tensor],
    specialized: bool,
) -> Result<Vec<kiln_ir::Tensor>> {
    let graph = kiln_ir::onnx::load(model)?;
    let name = model.display().to_string();
    let e = emulate_graph(&graph, &name, target, opts, inputs, |l| {
        l.specialized = specialized
    })?;
    Ok(e.outputs)
}

/// What [`emulate_graph`] ran.
#[derive(Debug)]
pub struct Emulation {
    /// The outputs, in plan order.
    pub outputs: Vec<kiln_ir::Tensor>,
    /// The lowering the plan was built from (launches, kernels, fused epilogues, ...).
    pub lowering: GpuLowering,
    /// The plan's launches (steps).
    pub steps: usize,
}

/// [`emulate`] for a graph in memory (`name` names it in errors), with the lowering options
/// (specialized kernels on, the SKU's defaults and `opts.precision`) adjusted by `adjust`.
pub fn emulate_graph(
    graph: &kiln_ir::Graph,
    name: &str,
    target: &str,
    opts: &CompileOptions,
    inputs: &[kiln_ir::Tensor],
    adjust: impl FnOnce(&mut LowerOptions),
) -> Result<Emulation> {
    let sku = resolve_sku(target)?;
    let planned = plan_for_gpu(graph, name, sku, opts, &mut |_, _| {})?;
    let mut lopts = LowerOptions {
        precision: opts.precision,
        ..LowerOptions::for_sku(sku)
    };
    adjust(&mut lopts);
    let (plan, lowering, weights) = gpu_plan(&planned, sku, &lopts)?;
    let cpu: Vec<_> = lowering.generic.iter().map(|k| k.cpu_kernel()).collect();
    let lib_bytes = kiln_codegen::cpu::compile_library(&cpu, &Default::default())?;
    let lib = kiln_runtime::kernel_lib::KernelLibrary::from_bytes(&lib_bytes)?;
    let gp = plan.gpu.as_ref().context("no GPU plan")?;
    // The device arena holds whatever earlier runs left: start from all-ones bytes (NaN as
    // f32/f16) so a launch that reads a buffer before anything wrote it shows.
    let mut arena = kiln_runtime::AlignedBuf::zeroed(plan.arena_bytes as usize);
    arena.as_mut_slice().fill(0xff);
    let mut weights_buf = kiln_runtime::AlignedBuf::zeroed(weights.len());
    weights_buf.as_mut_slice().copy_from_slice(&weights);
    if inputs.len() != plan.inputs.len() {
        bail!(
            "{} inputs given, the model has {}",
            inputs.len(),
            plan.inputs.len()
        );
    }
    let mut ins: Vec<kiln_runtime::AlignedBuf> = inputs
        .iter()
        .map(|t| {
            let raw = kiln_ir::onnx::tensor_proto::to_raw(t);
            let mut b = kiln_runtime::AlignedBuf::zeroed(raw.len());
            b.as_mut_slice().copy_from_slice(&raw);
            b
        })
        .collect();
    let mut outs: Vec<kiln_runtime::AlignedBuf> = plan
        .outputs
        .iter()
        .map(|io| {
            let n: u64 = io
                .shape
                .iter()
                .map(|d| match d {
                    kiln_runtime::DimSpec::Fixed(x) => *x,
                    _ => 1,
                })
                .product();
            kiln_runtime::AlignedBuf::zeroed(io.dtype.bytes_for(n as usize).unwrap_or(0))
        })
        .collect();
    let mut scratch = kiln_runtime::kernel_lib::scratch_buffer(64);
    for s in &gp.steps {
        let mut ptrs = Vec::new();
        let mut scalars = Vec::new();
        let mut floats = Vec::new();
        for a in &s.args {
            let (buf, offset) = match a {
                GpuArg::Buf { buf, offset, .. } | GpuArg::TensorMap { buf, offset, .. } => {
                    (buf, offset)
                }
                GpuArg::Index(v) => {
                    scalars.push(*v as usize);
                    continue;
                }
                GpuArg::F32(bits) => {
                    floats.push(f32::from_bits(*bits));
                    continue;
                }
            };
            let base = match buf {
                BufRef::Arena { offset: o, .. } => arena.as_mut_slice()[*o as usize..].as_mut_ptr(),
                BufRef::Weight { index } => {
                    let w = &plan.weights[*index];
                    weights_buf.as_mut_slice()[w.offset as usize..].as_mut_ptr()
                }
                BufRef::Input { index } => ins[*index].as_mut_slice().as_mut_ptr(),
                BufRef::Output { index } => outs[*index].as_mut_slice().as_mut_ptr(),
            };
            // SAFETY: `validate` checked that the view lies inside its buffer.
            ptrs.push(unsafe { base.add(*offset as usize) });
        }
        if !s.generic {
            // SAFETY: `validate` checked each view (len elements) against its buffer.
            unsafe {
                match lowering.host_kernel(&s.kernel) {
                    Some(h) => emulate_host(&s.kernel, h, &ptrs, &scalars, &floats, s.grid[2])?,
                    None => emulate_special(&s.kernel, &ptrs, &scalars)?,
                }
            }
            continue;
        }
        let h = lib.kernel(&s.kernel)?;
        // SAFETY: the generic kernel reads and writes exactly the views it was lowered
        // with, which `validate` checked against the buffers.
        unsafe { h.call(&ptrs, &[], scratch.as_mut_slice()) };
    }
    let outputs = plan
        .outputs
        .iter()
        .zip(&outs)
        .map(|(io, b)| {
            let shape: Vec<usize> = io
                .shape
                .iter()
                .map(|d| match d {
                    kiln_runtime::DimSpec::Fixed(x) => *x as usize,
                    _ => 1,
                })
                .collect();
            kiln_ir::onnx::tensor_proto::from_raw(io.dtype, &shape, b.as_slice())
                .map_err(|e| anyhow::anyhow!("output '{}': {e}", io.name))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Emulation {
        outputs,
        steps: gp.steps.len(),
        lowering,
    })
}

/// The semantics of a specialized op kernel on the host (see [`emulate`]), as the kernels
/// define them: direct NCHW convolution (groups 1 or C), then `+ bias[oc]`, `+ residual`,
/// relu; LayerNorm over rows (two passes, population variance, `1/sqrt(var + eps)`); row
/// sum / mean / max.
///
/// # Safety
/// `ptrs` must be the kernel's buffer views (`X, W[, bias][, residual], Y` for convs), valid
/// for the sizes its geometry or scalars imply.
unsafe fn emulate_host(
    kernel: &str,
    h: &HostKernel,
    ptrs: &[*mut u8],
    scalars: &[usize],
    floats: &[f32],
    grid_z: u32,
) -> Result<()> {
    /// Which conv: f32 groups = 1, tensor-core (16-bit inputs) groups = 1, or depthwise.
    const NO_EPILOGUE: kiln_codegen::gpu::kernels::conv::Epilogue =
        kiln_codegen::gpu::kernels::conv::Epilogue {
            bias: false,
            residual: false,
            relu: false,
        };
    #[derive(PartialEq)]
    enum Taps {
        Full,
        /// Tensor-core conv: the input type, and whether `X` is f32 (rounded as read).
        Mma(MmaInput, bool),
        Depthwise,
    }
    let (geom, epi, taps) = match (h, ptrs, scalars, floats) {
        (HostKernel::GemmF32 { split_k }, [a, b, c], dims, []) if matches!(dims.len(), 3 | 6) => {
            let (m, n, k) = (dims[0], dims[1], dims[2]);
            let (sa, sb, sc) = match dims {
                [.., sa, sb, sc] if dims.len() == 6 => (*sa, *sb, *sc),
                _ => (0, 0, 0),
            };
            let batch = grid_z as usize / (*split_k).max(1) as usize;
            // SAFETY: by the caller; f32 views of the `batch` matrices at the given strides
            // (unaligned reads: offsets are element multiples of 4-byte-aligned buffers).
            unsafe {
                let (a, b, c) = (*a as *const f32, *b as *const f32, *c as *mut f32);
                for bi in 0..batch {
                    let (a, b, c) = (a.add(bi * sa), b.add(bi * sb), c.add(bi * sc));
                    for i in 0..m {
                        for j in 0..n {
                            let mut acc = 0f32;
                            for p in 0..k {
                                acc += a.add(i * k + p).read_unaligned()
                                    * b.add(p * n + j).read_unaligned();
                            }
                            // K slices add into C (which the plan must have zeroed).
                            let prev = if *split_k > 1 {
                                c.add(i * n + j).read_unaligned()
                            } else {
                                0.0
                            };
                            c.add(i * n + j).write_unaligned(prev + acc);
                        }
                    }
                }
            }
            return Ok(());
        }
        (HostKernel::Cast(to), [x, y], [n], []) => {
            // SAFETY: by the caller; an f32 view and a 16-bit view of n elements.
            unsafe {
                let (x, y) = (*x as *const f32, *y as *mut u16);
                for i in 0..*n {
                    let v = x.add(i).read_unaligned();
                    let bits = match to {
                        MmaInput::F16 => precision::f32_to_f16_bits(v),
                        MmaInput::BF16 => precision::f32_to_bf16_bits(v),
                        MmaInput::TF32 => bail!("emulation: '{kernel}' casts to tf32"),
                    };
                    y.add(i).write_unaligned(bits);
                }
            }
            return Ok(());
        }
        (HostKernel::Zero, [y], [n], []) => {
            // SAFETY: by the caller; an f32 view of n elements.
            unsafe { std::ptr::write_bytes(*y, 0, n * 4) };
            return Ok(());
        }
        (HostKernel::Copy, [x, y], [n], []) => {
            // SAFETY: by the caller; f32 views of n elements (distinct buffers).
            unsafe { std::ptr::copy(*x as *const u8, *y, n * 4) };
            return Ok(());
        }
        (HostKernel::Attention(a), [q, kt, v, rest @ ..], [], []) => {
            let (mask, o) = match rest {
                [m, o] => (Some(*m), *o),
                [o] => (None, *o),
                _ => bail!("emulation: kernel '{kernel}' has unexpected arguments"),
            };
            let read = |p: *mut u8, n: usize| -> Vec<f32> {
                // SAFETY: by the caller; an f32 view of at least n elements.
                (0..n)
                    .map(|i| unsafe { (p as *const f32).add(i).read_unaligned() })
                    .collect()
            };
            let (bh, sq, skv, d) = (a.bh, a.sq, a.skv, a.d);
            let m = mask.map_or(Vec::new(), |p| {
                read(p, a.mask_offset(bh - 1, sq - 1, skv - 1) + 1)
            });
            let mut out = vec![0f32; bh * sq * d];
            a.eval(
                &read(*q, bh * sq * d),
                &read(*kt, bh * d * skv),
                &read(*v, bh * skv * d),
                &m,
                &mut out,
            );
            for (i, x) in out.iter().enumerate() {
                // SAFETY: by the caller; an f32 view of bh·sq·d elements.
                unsafe { (o as *mut f32).add(i).write_unaligned(*x) };
            }
            return Ok(());
        }
        (HostKernel::Gemm(input, epi, split_k), [a, b, c, rest @ ..], dims, [alpha, beta @ ..])
            if rest.len() == usize::from(epi.bias) + usize::from(epi.has_residual())
                && beta.len() == usize::from(epi.has_residual())
                && matches!(dims.len(), 3 | 6) =>
        {
            // The wgmma kernel takes `M, N, K` (TMA descriptors of A and B, one matrix), the
            // mma.sync kernel `M, N, K, sA, sB, sC` (grid.z = matrices × K slices; the
            // slices' sum, into a zeroed C, is the whole product computed here).
            let (d, batch) = match dims {
                [m, n, k] => ([*m, *n, *k, 0, 0, 0], 1),
                [m, n, k, sa, sb, sc] => (
                    [*m, *n, *k, *sa, *sb, *sc],
                    grid_z as usize / (*split_k).max(1) as usize,
                ),
                _ => unreachable!(),
            };
            let bias = epi.bias.then(|| rest[0]);
            let res = epi.has_residual().then(|| rest[rest.len() - 1]);
            // SAFETY: by the caller; views of `batch` matrices at the given strides (N
            // biases, a residual laid out like C).
            unsafe {
                emulate_tc_gemm(
                    *input,
                    epi,
                    [*a, *b, *c],
                    [bias, res],
                    d,
                    [*alpha, beta.first().copied().unwrap_or(0.0)],
                    batch,
                )
            };
            return Ok(());
        }
        (HostKernel::Conv { geom, epi }, ..) => (geom, epi, Taps::Full),
        (HostKernel::ConvSplitK { geom }, ..) => (geom, &NO_EPILOGUE, Taps::Full),
        (
            HostKernel::ConvMma {
                geom,
                epi,
                input,
                x_f32,
            },
            ..,
        ) => (geom, epi, Taps::Mma(*input, *x_f32)),
        (HostKernel::Depthwise { geom, epi }, ..) => (geom, epi, Taps::Depthwise),
        (HostKernel::LayerNorm, [x, sc, bi, y], [rows, n], [eps]) => {
            // SAFETY: by the caller; f32 views of rows*n, n, n and rows*n elements.
            unsafe {
                let (x, sc, bi, y) = (
                    *x as *const f32,
                    *sc as *const f32,
                    *bi as *const f32,
                    *y as *mut f32,
                );
                for r in 0..*rows {
                    let row: Vec<f32> =
                        (0..*n).map(|j| x.add(r * n + j).read_unaligned()).collect();
                    let mean = row.iter().sum::<f32>() / *n as f32;
                    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / *n as f32;
                    let rstd = 1.0 / (var + eps).sqrt();
                    for (j, v) in row.iter().enumerate() {
                        let o = (v - mean) * rstd * sc.add(j).read_unaligned()
                            + bi.add(j).read_unaligned();
                        y.add(r * n + j).write_unaligned(o);
                    }
                }
            }
            return Ok(());
        }
        (HostKernel::Reduce(kind), [x, y], [rows, n], []) => {
            // SAFETY: by the caller; f32 views of rows*n and rows elements.
            unsafe {
                let (x, y) = (*x as *const f32, *y as *mut f32);
                for r in 0..*rows {
                    let row = (0..*n).map(|j| x.add(r * n + j).read_unaligned());
                    let v = match kind {
                        ReduceKind::Sum => row.sum::<f32>(),
                        ReduceKind::Mean => row.sum::<f32>() / *n as f32,
                        ReduceKind::Max => row.fold(f32::NEG_INFINITY, f32::max),
                    };
                    y.add(r).write_unaligned(v);
                }
            }
            return Ok(());
        }
        _ => bail!("emulation: kernel '{kernel}' has unexpected arguments for {h:?}"),
    };
    // K slices add into an output the plan must have zeroed
    let accumulate = matches!(h, HostKernel::ConvSplitK { .. });
    let want = 3 + usize::from(epi.bias) + usize::from(epi.residual);
    if ptrs.len() != want {
        bail!(
            "emulation: kernel '{kernel}' has {} buffers, expected {want}",
            ptrs.len()
        );
    }
    let u = |v: u64| v as usize;
    let (n, c, hh, ww, oc, kh, kw) = (
        u(geom.n),
        u(geom.c),
        u(geom.h),
        u(geom.w),
        u(geom.oc),
        u(geom.kh),
        u(geom.kw),
    );
    let (oh, ow) = (u(geom.oh()), u(geom.ow()));
    let (s, d, p) = (geom.stride, geom.dilation, geom.pads);
    let depthwise = taps == Taps::Depthwise;
    let cg = if depthwise { 1 } else { c };
    let mut next = 2;
    let bias = epi.bias.then(|| {
        next += 1;
        ptrs[next - 1] as *const f32
    });
    let res = epi.residual.then(|| {
        next += 1;
        ptrs[next - 1] as *const f32
    });
    let y = ptrs[next] as *mut f32;
    // X and W as f32 (the tensor-core conv's 16-bit inputs widened exactly; an f32 `X` of
    // the tensor-core conv rounded to its input type, as the kernel does).
    let widen = |p: *mut u8, len: usize, is_x: bool| -> Vec<f32> {
        (0..len)
            .map(|i| {
                // SAFETY: by the caller; a view of `len` f32 or 16-bit elements.
                unsafe {
                    match taps {
                        Taps::Mma(input, true) if is_x => {
                            precision::round_input((p as *const f32).add(i).read_unaligned(), input)
                        }
                        Taps::Mma(MmaInput::F16, _) => {
                            precision::f16_bits_to_f32((p as *const u16).add(i).read_unaligned())
                        }
                        Taps::Mma(..) => f32::from_bits(
                            u32::from((p as *const u16).add(i).read_unaligned()) << 16,
                        ),
                        _ => (p as *const f32).add(i).read_unaligned(),
                    }
                }
            })
            .collect()
    };
    let xv = widen(ptrs[0], n * c * hh * ww, true);
    let wv = widen(ptrs[1], oc * cg * kh * kw, false);
    let (x, w) = (xv.as_ptr(), wv.as_ptr());
    // SAFETY: by the caller; unaligned f32 views of the geometry's sizes.
    unsafe {
        for b in 0..n {
            for o in 0..oc {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0f32;
                        for ci in 0..cg {
                            let ch = if depthwise { o } else { ci };
                            for ty in 0..kh {
                                let iy = (oy as u64 * s[0] + ty as u64 * d[0]) as i64 - p[0] as i64;
                                if iy < 0 || iy >= hh as i64 {
                                    continue;
                                }
                                for tx in 0..kw {
                                    let ix =
                                        (ox as u64 * s[1] + tx as u64 * d[1]) as i64 - p[1] as i64;
                                    if ix < 0 || ix >= ww as i64 {
                                        continue;
                                    }
                                    let xi = ((b * c + ch) * hh + iy as usize) * ww + ix as usize;
                                    let wi = ((o * cg + ci) * kh + ty) * kw + tx;
                                    acc += x.add(xi).read_unaligned() * w.add(wi).read_unaligned();
                                }
                            }
                        }
                        let yi = ((b * oc + o) * oh + oy) * ow + ox;
                        if let Some(bp) = bias {
                            acc += bp.add(o).read_unaligned();
                        }
                        if let Some(rp) = res {
                            acc += rp.add(yi).read_unaligned();
                        }
                        if epi.relu {
                            acc = acc.max(0.0);
                        }
                        if accumulate {
                            acc += y.add(yi).read_unaligned();
                        }
                        y.add(yi).write_unaligned(acc);
                    }
                }
            }
        }
    }
    Ok(())
}

/// A tensor-core GEMM on the host: inputs read as the hardware reads them (tf32: the f32
/// buffers with the low 13 mantissa bits dropped; f16/bf16: the 16-bit copies), products
/// accumulated in f32, then the kernel's epilogue (`Epilogue::apply`: `alpha`, bias,
/// `beta · R`, activation) for `batch` matrices.
///
/// # Safety
/// `p` = `A, B, C` views holding `batch` matrices at strides `sa, sb, sc` (elements); the
/// bias view holds `n` values, the residual view is laid out like `C`.
unsafe fn emulate_tc_gemm(
    input: MmaInput,
    epi: &Epilogue,
    p: [*mut u8; 3],
    [bias, res]: [Option<*mut u8>; 2],
    [m, n, k, sa, sb, sc]: [usize; 6],
    [alpha, beta]: [f32; 2],
    batch: usize,
) {
    let read = |base: *mut u8, i: usize| -> f32 {
        // SAFETY: by the caller, `i` lies inside the view.
        unsafe {
            match input {
                MmaInput::TF32 => {
                    precision::round_input((base as *const f32).add(i).read_unaligned(), input)
                }
                MmaInput::F16 => {
                    precision::f16_bits_to_f32((base as *const u16).add(i).read_unaligned())
                }
                MmaInput::BF16 => {
                    f32::from_bits(u32::from((base as *const u16).add(i).read_unaligned()) << 16)
                }
            }
        }
    };
    let f32_at = |base: Option<*mut u8>, i: usize| -> f32 {
        // SAFETY: by the caller (an f32 view holding index `i`).
        base.map_or(0.0, |b| unsafe {
            (b as *const f32).add(i).read_unaligned()
        })
    };
    let c = p[2] as *mut f32;
    for bi in 0..batch {
        let bt: Vec<f32> = (0..k * n).map(|i| read(p[1], bi * sb + i)).collect();
        for i in 0..m {
            let row: Vec<f32> = (0..k).map(|q| read(p[0], bi * sa + i * k + q)).collect();
            for j in 0..n {
                let mut acc = 0f32;
                for (q, x) in row.iter().enumerate() {
                    acc += x * bt[q * n + j];
                }
                let at = bi * sc + i * n + j;
                let y = epi.apply(acc, alpha, beta, f32_at(bias, j), f32_at(res, at));
                // SAFETY: by the caller.
                unsafe { c.add(at).write_unaligned(y) };
            }
        }
    }
}

/// One summary line: how many MatMul/Gemm kernels run on tensor cores at `prec`, and why the
/// others do not.
fn tensor_core_summary(
    planned: &pipeline::Planned,
    l: &GpuLowering,
    prec: lower::Precision,
) -> String {
    let (g, p) = (&planned.graph, &planned.partition);
    let gemms = p
        .kernels
        .iter()
        .filter(|k| {
            k.kind == KernelKind::Contraction
                && k.nodes
                    .iter()
                    .any(|&n| matches!(g.nodes[n].op, kiln_ir::Op::Linalg(_)))
        })
        .count();
    let in_attention = 2 * l.attention.iter().filter(|a| a.fused.is_some()).count();
    if prec == lower::Precision::F32 {
        return format!(
            "precision f32: {gemms} MatMul/Gemm kernels, {in_attention} of them in fused \
             attention, the rest on the f32 GEMM (no tensor cores)"
        );
    }
    let off: Vec<String> = l
        .tensor_core_fallbacks
        .iter()
        .map(|(i, why)| format!("{} ({why})", p.kernels[*i].name))
        .collect();
    format!(
        "precision {}: {} of {gemms} MatMul/Gemm kernels on tensor cores, {in_attention} in \
         fused attention (f32), {} not: {}",
        prec.name(),
        l.tensor_core.len(),
        off.len(),
        if off.is_empty() {
            "-".to_string()
        } else {
            off.join("; ")
        }
    )
}

/// Summary lines at a tensor-core precision: the GEMMs whose epilogue runs in the kernel
/// (each saves its in-place epilogue launch) and the convs on tensor cores (f16 / bf16) with the
/// reasons the others are not.
fn tensor_core_fusion_summary(
    planned: &pipeline::Planned,
    l: &GpuLowering,
    prec: lower::Precision,
) -> Vec<String> {
    if prec == lower::Precision::F32 {
        return Vec::new();
    }
    let p = &planned.partition;
    let name = |i: usize| p.kernels[i].name.clone();
    let fused: Vec<String> = l
        .fused_epilogues
        .iter()
        .map(|(i, tag)| format!("{} ({tag})", name(*i)))
        .collect();
    let convs = l.tensor_core_convs.len() + l.tensor_core_conv_fallbacks.len();
    // Kernels grouped by reason.
    let mut off: Vec<(String, Vec<String>)> = Vec::new();
    for (i, why) in &l.tensor_core_conv_fallbacks {
        match off.iter_mut().find(|(w, _)| w == why) {
            Some((_, ks)) => ks.push(name(*i)),
            None => off.push((why.clone(), vec![name(*i)])),
        }
    }
    let off: Vec<String> = off
        .into_iter()
        .map(|(why, ks)| format!("{} ({why})", ks.join(", ")))
        .collect();
    vec![
        format!(
            "tensor-core epilogues: {} kernels with a fused epilogue, {} launches saved{}{}",
            fused.len(),
            fused.len(),
            if fused.is_empty() { "" } else { ": " },
            fused.join(", ")
        ),
        format!(
            "convs on tensor cores: {} of {convs} (groups 1, f16 / bf16; depthwise stay f32), {} \
             not: {}",
            l.tensor_core_convs.len(),
            l.tensor_core_conv_fallbacks.len(),
            if off.is_empty() {
                "-".to_string()
            } else {
                off.join("; ")
            }
        ),
    ]
}

/// One summary line: the attention patterns found and why they stay unfused.
fn attention_summary(planned: &pipeline::Planned, l: &GpuLowering) -> String {
    let p = &planned.partition;
    let items: Vec<String> = l
        .attention
        .iter()
        .map(|a| {
            let [x, y, z] = a.kernels.map(|i| p.kernels[i].name.clone());
            let how = match &a.not_fused {
                None => "one row-attention launch".to_string(),
                Some(why) => format!("unfused: {why}"),
            };
            format!(
                "{x}-{y}-{z} (D {}, mask {}): {how}; flash kernels: {}",
                a.head_dim,
                a.mask,
                a.unfused.join(", ")
            )
        })
        .collect();
    let fused = l.attention.iter().filter(|a| a.fused.is_some()).count();
    format!(
        "attention patterns: {} found, {fused} fused{}{}",
        items.len(),
        if items.is_empty() { "" } else { ": " },
        items.join("; ")
    )
}

/// The specialized kernels' semantics on the host (see [`emulate`]).
///
/// # Safety
/// `ptrs` must be the kernel's buffer views, valid for the sizes its scalars imply.
unsafe fn emulate_special(kernel: &str, ptrs: &[*mut u8], scalars: &[usize]) -> Result<()> {
    match (kernel, ptrs, scalars) {
        ("kiln_softmax_rows", [x, y], [rows, n]) => {
            // SAFETY: by the caller; f32 views of rows*n elements.
            unsafe {
                let (x, y) = (*x as *const f32, *y as *mut f32);
                for r in 0..*rows {
                    let row: Vec<f32> =
                        (0..*n).map(|j| x.add(r * n + j).read_unaligned()).collect();
                    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = row.iter().map(|v| (v - mx).exp()).sum();
                    for (j, v) in row.iter().enumerate() {
                        y.add(r * n + j).write_unaligned((v - mx).exp() / sum);
                    }
                }
            }
        }
        _ => bail!("emulation: no host version of the specialized kernel '{kernel}'"),
    }
    Ok(())
}
