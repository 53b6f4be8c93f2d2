//! Whole-model compilation for the CPU: ONNX file → graph passes ([`crate::pipeline::plan`]) →
//! kernel lowering ([`kiln_codegen::cpu::lower::lower_partition`]) → one kernel library
//! ([`kiln_codegen::cpu::compile_library`]) → an [`Artifact`] holding the execution plan,
//! the weights and the library, which `kiln_runtime::Model` loads and runs.
//!
//! A kernel whose kind or dtype has no code generator yet becomes a *reference step*: its
//! nodes travel in the plan as a small graph that the runtime evaluates with the reference
//! interpreter (correct, slow, reported by `kiln compile`); `--no-reference-kernels` makes
//! such kernels a compile error instead. `Alias` kernels (zero-copy
//! views) need no code: their output shares the storage of the value they view (the memory
//! plan's `alias_of`).
//!
//! A model whose shapes depend on input *values* (e.g. a `Reshape` whose shape is a graph
//! input, `NonZero`, `TopK` with a `k` input) is split after specialisation
//! ([`crate::dynamic_tail`]): its static-shape prefix is compiled as above, the rest becomes
//! the plan's *dynamic tail* ([`kiln_runtime::DynamicTail`]), a small graph the runtime runs
//! with the reference interpreter at run-time shapes. `kiln compile` reports it like reference
//! steps; `--no-reference-kernels` refuses it. Its outputs' unknown dims are
//! [`DimSpec::Dynamic`].
//!
//! The execution plan is built from the compiler's own types:
//! - graph inputs and outputs → [`IoSpec`]s with the static shapes after specialisation;
//! - every constant read by a lowered kernel → one weight (raw little-endian bytes),
//!   deduplicated by value;
//! - every lowered kernel → one [`Step`] whose args are the kernel's input then output values,
//!   each resolved (through views) to a graph input, graph output, weight, or the arena slot
//!   of the memory plan.

use crate::pipeline;
use anyhow::{bail, Context, Result};
use kiln_codegen::cpu::lower::conv::ConvSchedule;
use kiln_codegen::cpu::lower::{lower_partition_tuned, tuning};
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_ir::{Graph, ValueId};
use kiln_passes::fusion::KernelKind;
use kiln_passes::MemoryPlan;
use kiln_runtime::plan::WeightsBuilder;
use kiln_runtime::plan::ALIGNMENT;
use kiln_runtime::{Artifact, BufRef, DimSpec, ExecPlan, IoSpec, Step};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

/// The LLVM CPU of a CPU target: `cpu` → the default (`x86-64-v3`), `cpu:NAME` → `NAME`;
/// `None` for anything else (a GPU target, an empty name).
pub fn cpu_of_target(target: &str) -> Option<String> {
    match target.split_once(':') {
        None if target == "cpu" => Some(CompileOptions::default().cpu),
        Some(("cpu", cpu)) if !cpu.is_empty() => Some(cpu.to_string()),
        _ => None,
    }
}

/// Options of [`compile`].
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// Concrete shapes for named inputs (`--shape name=1x3x224x224`); symbolic dims not
    /// given default to 1.
    pub shapes: HashMap<String, Vec<usize>>,
    /// LLVM CPU name: `x86-64-v3` (default), `x86-64-v4`, `native`, ...
    pub cpu: String,
    /// Graph stages after which to print the IR (see [`pipeline::STAGES`]; `all` for every
    /// stage).
    pub print_after: Vec<String>,
    /// `--max-batch N`: the inputs whose first dim is symbolic accept any size `1..=N` at run
    /// time. Kiln compiles one static specialisation per size into the same artifact (one
    /// kernel library, one weights blob; see [`kiln_runtime::ExecPlan::variants`]) and the
    /// runtime picks the one matching the inputs.
    pub max_batch: Option<usize>,
    /// Optimisation level (`-O0` no equality saturation, `-O1`, `-O2` default); see
    /// [`pipeline::eqsat_options`].
    pub opt_level: Option<u8>,
    /// Overrides of the level's eqsat search limits.
    pub eqsat_limits: pipeline::EqsatLimits,
    /// Kernels with no code generator yet run on the runtime's reference interpreter
    /// (default); off (`--no-reference-kernels`), such kernels fail the compile.
    pub reference_kernels: bool,
    /// Tuned schedules by workload fingerprint (`kiln compile --db`, see [`crate::tune`]);
    /// tunable kernels not in the map keep their default schedule.
    pub schedules: std::sync::Arc<HashMap<String, kiln_tune::Config>>,
    /// Measured op times from the same database, for the eqsat cost model (µs by op
    /// signature, see [`kiln_passes::eqsat::cost::measured_table`]).
    pub measured_us: std::sync::Arc<HashMap<String, f64>>,
    /// The tuning database `schedules` came from (`--db`), named in the report even when it
    /// selects no schedule.
    pub tuning_db: Option<std::path::PathBuf>,
    /// A `cuda:SKU` target (`--target cuda:h100`): compile for that GPU instead of the CPU
    /// (see [`crate::gpu_compile`]).
    pub gpu_target: Option<String>,
    /// What MatMul/Gemm compute on for a cuda target (`--precision f32|tf32|f16|bf16`, see
    /// [`kiln_codegen::gpu::lower::precision`]); CPU targets take f32 only.
    pub precision: kiln_codegen::gpu::lower::Precision,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            shapes: HashMap::new(),
            cpu: CpuOptions::default().cpu,
            print_after: Vec::new(),
            max_batch: None,
            opt_level: None,
            eqsat_limits: Default::default(),
            reference_kernels: true,
            schedules: Default::default(),
            measured_us: Default::default(),
            tuning_db: None,
            gpu_target: None,
            precision: Default::default(),
        }
    }
}

/// What [`compile`] did: sizes and time per stage.
#[derive(Clone, Debug, Default)]
pub struct CompileReport {
    /// Number of kernels compiled into the library (one step each).
    pub kernels: usize,
    /// Number of partition kernels that needed no code (`Alias` views), per variant.
    pub views: usize,
    /// Number of shape variants (1 without `--max-batch`).
    pub variants: usize,
    /// Tunable kernels (MatMul/Gemm/Conv), over all variants.
    pub tunable: usize,
    /// Of those, how many were lowered with a tuned schedule (`--db`).
    pub tuned: usize,
    /// Tuned schedules the compiler was given (`--db`), for any workload.
    pub schedules_given: usize,
    /// The tuning database the schedules came from (`--db`), if any.
    pub tuning_db: Option<std::path::PathBuf>,
    /// Kernels without compiled code, run by the reference interpreter (one line each:
    /// kernel, kind, ops, why), over all variants.
    pub reference: Vec<String>,
    /// The dynamic tail (nodes whose shapes depend on input values, run by the reference
    /// interpreter at run-time shapes): one line (nodes, ops, outputs); `None` if the model
    /// has static shapes.
    pub dynamic_tail: Option<String>,
    /// Arena size in bytes.
    pub arena_bytes: u64,
    /// Weights blob size in bytes (64-byte aligned weights).
    pub weights_bytes: u64,
    /// Size of the kernel library in bytes.
    pub library_bytes: u64,
    /// Wall time per stage, in order (`plan`, `lower`, `llvm+link`; the caller may append
    /// `write`).
    pub timings: Vec<(&'static str, Duration)>,
    /// GPU targets: summary lines (SKU, launches, generic-path kernels).
    pub gpu: Vec<String>,
}

impl fmt::Display for CompileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernels: {} compiled ({} zero-copy views)",
            self.kernels, self.views
        )?;
        if !self.reference.is_empty() {
            writeln!(
                f,
                "warning: {} kernel(s) have no compiled code yet and run on the reference \
                 interpreter (slow):",
                self.reference.len()
            )?;
            for r in &self.reference {
                writeln!(f, "{r}")?;
            }
        }
        if let Some(t) = &self.dynamic_tail {
            writeln!(
                f,
                "warning: shapes depend on input values; a dynamic tail runs on the reference \
                 interpreter (slow):\n  {t}"
            )?;
        }
        if self.variants > 1 {
            writeln!(
                f,
                "shape variants: {} (batch 1..={})",
                self.variants, self.variants
            )?;
        }
        if self.schedules_given > 0 || self.tuning_db.is_some() {
            write!(
                f,
                "tuned schedules: {} of {} tunable kernels",
                self.tuned, self.tunable
            )?;
            match &self.tuning_db {
                Some(db) if self.schedules_given == 0 => writeln!(
                    f,
                    " ({} has no schedule faster than the defaults for this target)",
                    db.display()
                )?,
                _ => writeln!(f)?,
            }
        }
        for l in &self.gpu {
            writeln!(f, "{l}")?;
        }
        writeln!(f, "arena: {} bytes (largest variant)", self.arena_bytes)?;
        writeln!(f, "weights: {} bytes", self.weights_bytes)?;
        writeln!(f, "kernel library: {} bytes", self.library_bytes)?;
        let parts: Vec<String> = self
            .timings
            .iter()
            .map(|(s, d)| format!("{s} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect();
        let total: Duration = self.timings.iter().map(|(_, d)| *d).sum();
        write!(
            f,
            "time: {} (total {:.1} ms)",
            parts.join(", "),
            total.as_secs_f64() * 1e3
        )
    }
}

/// Compiles a model to a CPU artifact, printing the IR of the stages named in
/// `opts.print_after` to stdout. See [`compile_with`].
pub fn compile(model: &Path, opts: &CompileOptions) -> Result<(Artifact, CompileReport)> {
    compile_with(model, opts, |stage, text| {
        println!("// ----- IR after {stage} -----\n{text}");
    })
}

/// Compiles a model to a CPU artifact (see the module doc), calling `print(stage, text)`
/// after each stage named in `opts.print_after`. Fails, listing them, if some kernels are of
/// a kind that is not compiled yet.
pub fn compile_with(
    model: &Path,
    opts: &CompileOptions,
    print: impl FnMut(&str, &str),
) -> Result<(Artifact, CompileReport)> {
    let g = kiln_ir::onnx::load(model)?;
    compile_graph(&g, &model.display().to_string(), opts, print)
}

/// Compiles an imported graph (see [`kiln_ir::onnx::load`], [`kiln_ir::onnx::load_bytes`])
/// to a CPU artifact, like [`compile_with`]; `name` names the model in errors.
pub fn compile_graph(
    graph: &Graph,
    name: &str,
    opts: &CompileOptions,
    mut print: impl FnMut(&str, &str),
) -> Result<(Artifact, CompileReport)> {
    if let Some(t) = &opts.gpu_target {
        return crate::gpu_compile::compile_graph_gpu(graph, name, t, opts, print);
    }
    if opts.precision != kiln_codegen::gpu::lower::Precision::F32 {
        bail!(
            "{name}: --precision {}: CPU targets compute in f32 only (tensor-core precisions \
             need a cuda target)",
            opts.precision.name()
        );
    }
    let model = Path::new(name);
    let mut report = CompileReport::default();
    // One static specialisation per batch size with --max-batch, else one.
    let batches: Vec<Option<usize>> = match opts.max_batch {
        None => vec![None],
        Some(0) => bail!("--max-batch must be at least 1"),
        Some(n) => (1..=n).map(Some).collect(),
    };
    let batch_inputs = match opts.max_batch {
        Some(_) => symbolic_batch_inputs(graph, model)?,
        None => Vec::new(),
    };
    let mut variants = Vec::new();
    let mut kernels = Vec::new();
    let (mut t_plan, mut t_lower) = (Duration::ZERO, Duration::ZERO);
    for (vi, batch) in batches.iter().enumerate() {
        let mut shapes = opts.shapes.clone();
        if let Some(b) = batch {
            for (name, dims) in &batch_inputs {
                let mut d = shapes.get(name).cloned().unwrap_or_else(|| dims.clone());
                d[0] = *b;
                shapes.insert(name.clone(), d);
            }
        }
        let t = Instant::now();
        let popts = pipeline::Options {
            shapes,
            print_after: if vi == 0 {
                opts.print_after.clone()
            } else {
                Vec::new()
            },
            opt_level: opts.opt_level,
            measured_us: opts.measured_us.clone(),
            // the cost model of this target's vector width (AVX2 or AVX-512)
            device: Some(kiln_passes::eqsat::cost::Device::cpu_with_lanes(
                kiln_codegen::cpu::cpu_lanes(&opts.cpu),
            )),
            eqsat_limits: opts.eqsat_limits.clone(),
        };
        let planned = pipeline::plan_graph(graph.clone(), &popts, &mut print)?;
        t_plan += t.elapsed();
        let t = Instant::now();
        let (mut lowering, refs) = lower_variant(model, &planned, opts, &mut report)?;
        let tail = tail_step(model, &planned, opts, &mut report)?;
        if let Some(b) = batch {
            // Kernel symbols are unique per variant: `kiln_...` becomes `kiln_b<N>_...`.
            for lk in &mut lowering.kernels {
                let old = lk.kernel.signature.name.clone();
                let new = old.replacen("kiln_", &format!("kiln_b{b}_"), 1);
                lk.kernel.mlir = lk
                    .kernel
                    .mlir
                    .replace(&format!("@{old}"), &format!("@{new}"));
                lk.kernel.signature.name = new;
            }
        }
        t_lower += t.elapsed();
        kernels.extend(lowering.cpu_kernels());
        variants.push((planned, lowering, refs, tail));
    }
    report.timings.push(("plan", t_plan));
    report.timings.push(("lower", t_lower));

    let t = Instant::now();
    let cpu = CpuOptions {
        cpu: opts.cpu.clone(),
        ..CpuOptions::default()
    };
    let library = compile_library(&kernels, &cpu)
        .with_context(|| format!("{}: compiling the kernel library", model.display()))?;
    report.timings.push(("llvm+link", t.elapsed()));

    let mut weights = WeightsBuilder::new();
    let mut plans = Vec::new();
    for (planned, lowering, refs, tail) in &variants {
        plans.push(exec_plan(
            planned,
            lowering,
            refs,
            tail.as_ref(),
            &mut weights,
        )?);
    }
    let (weights, specs) = weights.finish();
    for p in &mut plans {
        p.weights = specs.clone();
    }
    let mut plan = plans.remove(0);
    plan.variants = plans;
    plan.validate(weights.len() as u64)
        .map_err(|e| anyhow::anyhow!("{}: invalid execution plan: {e}", model.display()))?;
    report.kernels = kernels.len();
    report.variants = plan.variants.len() + 1;
    report.arena_bytes = std::iter::once(&plan)
        .chain(&plan.variants)
        .map(|p| p.arena_bytes)
        .max()
        .unwrap_or(0);
    report.weights_bytes = weights.len() as u64;
    report.library_bytes = library.len() as u64;
    let artifact = Artifact {
        compiler_version: format!("kiln {}", env!("CARGO_PKG_VERSION")),
        target: format!("cpu:{}", opts.cpu),
        plan,
        weights,
        kernels: library,
    };
    Ok((artifact, report))
}

/// The graph inputs whose first dim is symbolic, with their declared shapes (symbolic dims
/// as 1), for `--max-batch`.
fn symbolic_batch_inputs(g: &Graph, model: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let found: Vec<(String, Vec<usize>)> = g
        .inputs
        .iter()
        .map(|&i| &g.values[i])
        .filter(|v| matches!(v.fact.shape.dims().first(), Some(kiln_ir::Dim::Sym(_))))
        .map(|v| {
            let dims = v
                .fact
                .shape
                .dims()
                .iter()
                .map(|d| d.known().unwrap_or(1))
                .collect();
            (v.name.clone(), dims)
        })
        .collect();
    if found.is_empty() {
        bail!(
            "{}: --max-batch: no graph input has a symbolic first (batch) dimension",
            model.display()
        );
    }
    Ok(found)
}

/// A kernel with no compiled code: its nodes as a small graph for the runtime's reference
/// interpreter (see `kiln_runtime::Step::reference`).
struct RefStep {
    /// Index of the kernel in the partition.
    index: usize,
    /// Step label, `ref_<kernel>_<ops>`.
    name: String,
    /// Buffers read (graph values), in the reference graph's input order.
    inputs: Vec<ValueId>,
    /// Buffers written.
    outputs: Vec<ValueId>,
    /// The reference graph, as JSON.
    json: String,
}

/// Constants up to this size are embedded in a reference graph; larger ones are passed as
/// weight buffers.
const EMBED_CONST_BYTES: usize = 4096;

/// The reference step of partition kernel `index` (see [`RefStep`]).
fn reference_step(g: &Graph, k: &kiln_passes::Kernel, index: usize) -> Result<RefStep> {
    let (mg, inputs, ops) = kernel_graph(g, k, EMBED_CONST_BYTES)?;
    Ok(RefStep {
        index,
        name: format!("ref_{}_{}", k.name, ops.join("_")),
        inputs,
        outputs: k.outputs.clone(),
        json: serde_json::to_string(&mg)?,
    })
}

/// Partition kernel `k` of `g` as a standalone graph: its nodes, its outputs as graph
/// outputs, constants up to `embed_limit` bytes embedded, every other input a graph input.
/// Also returns the original values of those graph inputs and the kernel's first (at most
/// 4) op names.
pub(crate) fn kernel_graph(
    g: &Graph,
    k: &kiln_passes::Kernel,
    embed_limit: usize,
) -> Result<(Graph, Vec<ValueId>, Vec<String>)> {
    use kiln_ir::{Fact, Node};
    let mut mg = Graph {
        name: k.name.clone(),
        opset: g.opset,
        ..Default::default()
    };
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let produced: std::collections::HashSet<ValueId> = k
        .nodes
        .iter()
        .flat_map(|&n| g.nodes[n].outputs.iter().copied())
        .collect();
    let mut inputs = Vec::new();
    let mut ops: Vec<String> = Vec::new();
    for &n in &k.nodes {
        let node = &g.nodes[n];
        let op = node.op.op_type().to_ascii_lowercase();
        if ops.last() != Some(&op) && ops.len() < 4 {
            ops.push(op);
        }
        for &v in node.inputs.iter().flatten() {
            if produced.contains(&v) || map.contains_key(&v) {
                continue;
            }
            let val = &g.values[v];
            let id = match g.const_value(v).filter(|t| t.byte_size() <= embed_limit) {
                Some(t) => mg.add_const(val.name.clone(), t.clone()),
                None => {
                    let id = mg.add_value(
                        val.name.clone(),
                        Fact::new(val.fact.dtype, val.fact.shape.clone()),
                    );
                    mg.inputs.push(id);
                    inputs.push(v);
                    id
                }
            };
            map.insert(v, id);
        }
        for &o in &node.outputs {
            let val = &g.values[o];
            let id = mg.add_value(
                val.name.clone(),
                Fact::new(val.fact.dtype, val.fact.shape.clone()),
            );
            map.insert(o, id);
        }
        mg.nodes.push(Node {
            name: node.name.clone(),
            op: node.op.clone(),
            inputs: node.inputs.iter().map(|i| i.map(|v| map[&v])).collect(),
            outputs: node.outputs.iter().map(|o| map[o]).collect(),
        });
    }
    mg.outputs = k.outputs.iter().map(|o| map[o]).collect();
    kiln_ir::verify::verify(&mg).with_context(|| format!("kernel {} as a graph", k.name))?;
    Ok((mg, inputs, ops))
}

/// The dynamic tail of one planned variant as a reference graph (see
/// [`crate::dynamic_tail`]); refused with `--no-reference-kernels`.
fn tail_step(
    model: &Path,
    planned: &pipeline::Planned,
    opts: &CompileOptions,
    report: &mut CompileReport,
) -> Result<Option<RefStep>> {
    let Some(split) = &planned.tail else {
        return Ok(None);
    };
    let line = format!(
        "{} node(s) ({}) computing output(s) {}",
        split.tail_nodes.len(),
        split.ops().join(", "),
        split.output_names().join(", ")
    );
    if !opts.reference_kernels {
        bail!(
            "{}: shapes depend on the values of inputs (e.g. a shape, axes or k input), so a \
             dynamic tail of {line} would run on the reference interpreter, which \
             --no-reference-kernels forbids; make such inputs initializers of the model",
            model.display()
        );
    }
    let full = &split.full;
    let k = kiln_passes::Kernel {
        name: "tail".into(),
        kind: KernelKind::Opaque,
        nodes: split.tail_nodes.clone(),
        inputs: Vec::new(),
        outputs: split
            .tail_outputs
            .iter()
            .map(|&i| full.outputs[i])
            .collect(),
    };
    let step = reference_step(full, &k, 0).context("dynamic tail")?;
    report.dynamic_tail = Some(line);
    Ok(Some(step))
}

/// Lowers the kernels of one planned variant. Kernels of a kind or dtype that is not
/// compiled yet become reference steps when `opts.reference_kernels` is on; otherwise the
/// compile fails, listing them.
fn lower_variant(
    model: &Path,
    planned: &pipeline::Planned,
    opts: &CompileOptions,
    report: &mut CompileReport,
) -> Result<(kiln_codegen::cpu::lower::Lowering, Vec<RefStep>)> {
    let (g, p) = (&planned.graph, &planned.partition);
    // the matmul's register tile follows the target's vector registers (AVX2 or AVX-512)
    let lanes = kiln_codegen::cpu::cpu_lanes(&opts.cpu);
    let lowering = lower_partition_tuned(g, p, &ConvSchedule::for_lanes(lanes), &*opts.schedules)
        .context("lowering kernels")?;
    report.tuned += lowering.tuned;
    report.schedules_given = opts.schedules.len();
    report.tuning_db = opts.tuning_db.clone();
    report.tunable += p
        .kernels
        .iter()
        .filter(|k| tuning::tunable_for(g, k, lanes).is_some())
        .count();
    let mut missing = Vec::new();
    let mut refs = Vec::new();
    report.views = 0;
    for u in &lowering.unsupported {
        let k = &p.kernels[u.index];
        let ops: Vec<&str> = k.nodes.iter().map(|&n| g.nodes[n].op.op_type()).collect();
        // A view needs no code unless a graph output must be copied out of it.
        if k.kind == KernelKind::Alias && !k.outputs.iter().any(|o| g.outputs.contains(o)) {
            report.views += 1;
            continue;
        }
        let reason = if k.kind == KernelKind::Alias {
            "a graph output that is a view needs a copy kernel".to_string()
        } else {
            u.reason.clone()
        };
        let line = format!("  {} ({:?}: {}): {reason}", k.name, k.kind, ops.join(", "));
        if opts.reference_kernels {
            refs.push(reference_step(g, k, u.index)?);
            report.reference.push(line);
        } else {
            missing.push(line);
        }
    }
    if !missing.is_empty() {
        bail!(
            "{}: {} of {} kernels cannot be compiled yet (these kernel kinds are not lowered to \
             code yet; without --no-reference-kernels they run on the reference interpreter):\n{}",
            model.display(),
            missing.len(),
            p.kernels.len(),
            missing.join("\n")
        );
    }
    Ok((lowering, refs))
}

/// The execution plan of one lowered variant; its weights go to the shared `weights`.
///
/// With a dynamic tail (`tail`, see [`crate::dynamic_tail`]) the planned graph is the static
/// prefix: its first outputs are model outputs (plan outputs by
/// [`DynamicSplit::prefix_outputs`](crate::dynamic_tail::DynamicSplit::prefix_outputs)), the
/// others boundary values the tail reads, stored after the memory plan's arena.
fn exec_plan(
    planned: &pipeline::Planned,
    lowering: &kiln_codegen::cpu::lower::Lowering,
    refs: &[RefStep],
    tail: Option<&RefStep>,
    weights: &mut WeightsBuilder,
) -> Result<ExecPlan> {
    let (g, mem) = (&planned.graph, &planned.memory);
    let split = planned.tail.as_ref().filter(|_| tail.is_some());
    let mut b = PlanBuilder::new(g, mem, weights);
    let mut arena_bytes = mem.arena_bytes as u64;
    let outputs = match split {
        None => g
            .outputs
            .iter()
            .map(|&v| io_spec(g, v))
            .collect::<Result<_>>()?,
        Some(split) => {
            let full = &split.full;
            b.n_model = split.prefix_outputs.len();
            b.out_refs = split
                .prefix_outputs
                .iter()
                .map(|&index| BufRef::Output { index })
                .collect();
            for &w in &g.outputs[b.n_model..] {
                let r = if let Some(index) = g.inputs.iter().position(|&i| i == w) {
                    BufRef::Input { index }
                } else if let Some(t) = g.const_value(w) {
                    let bytes = kiln_ir::onnx::tensor_proto::to_raw(t);
                    BufRef::Weight {
                        index: b.weights.push(&g.values[w].name, &bytes),
                    }
                } else {
                    let val = &g.values[w];
                    let bytes = val
                        .fact
                        .shape
                        .numel()
                        .and_then(|n| val.fact.dtype.bytes_for(n))
                        .with_context(|| format!("boundary value '{}': size", val.name))?
                        as u64;
                    let offset = arena_bytes.next_multiple_of(ALIGNMENT as u64);
                    arena_bytes = offset + bytes;
                    BufRef::Arena { offset, bytes }
                };
                b.out_refs.push(r);
            }
            full.outputs
                .iter()
                .enumerate()
                .map(|(i, &v)| match split.tail_outputs.contains(&i) {
                    true => dynamic_io_spec(full, v),
                    false => io_spec(full, v),
                })
                .collect::<Result<_>>()?
        }
    };
    let mut plan = ExecPlan {
        inputs: g
            .inputs
            .iter()
            .map(|&v| io_spec(g, v))
            .collect::<Result<_>>()?,
        outputs,
        arena_bytes,
        ..ExecPlan::default()
    };
    // Compiled and reference steps, in partition order.
    let mut order: Vec<(usize, Option<usize>, Option<usize>)> = lowering
        .kernels
        .iter()
        .enumerate()
        .map(|(i, lk)| (lk.index, Some(i), None))
        .chain(
            refs.iter()
                .enumerate()
                .map(|(i, r)| (r.index, None, Some(i))),
        )
        .collect();
    order.sort_by_key(|o| o.0);
    for (index, lk, r) in order {
        // a concat whose parts the memory plan placed inside its output: nothing to copy
        if b.mem.elided.contains(&index) {
            continue;
        }
        if let Some(r) = r.map(|r| &refs[r]) {
            let args = r
                .inputs
                .iter()
                .chain(&r.outputs)
                .map(|&v| b.buf(v))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("reference step '{}'", r.name))?;
            plan.steps.push(Step {
                kernel: r.name.clone(),
                args,
                num_inputs: r.inputs.len(),
                dims: Vec::new(),
                tasks: 1,
                scratch_bytes: 0,
                reference: Some(r.json.clone()),
            });
            continue;
        }
        let Some(lk) = lk.map(|i| &lowering.kernels[i]) else {
            continue;
        };
        let sig = &lk.kernel.signature;
        if !sig.dims.is_empty() {
            bail!(
                "kernel '{}' has symbolic dims {:?} after specialisation",
                sig.name,
                sig.dims
            );
        }
        // args = inputs ++ derived constants ++ outputs (see `kiln_codegen::cpu::lower`).
        let mut args = lk
            .inputs
            .iter()
            .map(|&v| b.buf(v))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("kernel '{}'", sig.name))?;
        args.extend(lk.consts.iter().map(|c| b.derived(c)));
        for &v in &lk.outputs {
            args.push(b.buf(v).with_context(|| format!("kernel '{}'", sig.name))?);
        }
        plan.steps.push(Step {
            kernel: sig.name.clone(),
            args,
            num_inputs: lk.inputs.len() + lk.consts.len(),
            dims: Vec::new(),
            tasks: sig.tasks,
            scratch_bytes: sig.scratch_bytes,
            reference: None,
        });
    }
    // Graph outputs no step writes (a constant, or an input passed through): a copy step.
    for (pos, &o) in g.outputs[..b.n_model].iter().enumerate() {
        let BufRef::Output { index: oi } = b.out_refs[pos] else {
            continue;
        };
        let written = plan.steps.iter().any(|s| {
            s.args[s.num_inputs..]
                .iter()
                .any(|a| matches!(a, BufRef::Output { index } if *index == oi))
        });
        if written {
            continue;
        }
        let src = match (g.const_value(o), g.inputs.iter().position(|&i| i == o)) {
            (Some(t), _) => {
                let bytes = kiln_ir::onnx::tensor_proto::to_raw(t);
                BufRef::Weight {
                    index: b.weights.push(&g.values[o].name, &bytes),
                }
            }
            (None, Some(index)) => BufRef::Input { index },
            (None, None) => continue, // `validate` reports it
        };
        plan.steps.push(Step {
            kernel: format!("ref_copy_output_{oi}"),
            args: vec![src, BufRef::Output { index: oi }],
            num_inputs: 1,
            dims: Vec::new(),
            tasks: 1,
            scratch_bytes: 0,
            reference: Some(copy_graph_json(g, o)?),
        });
    }
    if let (Some(split), Some(t)) = (split, tail) {
        plan.tail = Some(tail_buffers(&mut b, split, t)?);
    }
    Ok(plan)
}

/// The plan's [`kiln_runtime::DynamicTail`]: the tail graph with each of its inputs resolved to
/// the buffer holding it (graph input, weight, model output, or boundary buffer).
fn tail_buffers(
    b: &mut PlanBuilder<'_>,
    split: &crate::dynamic_tail::DynamicSplit,
    tail: &RefStep,
) -> Result<kiln_runtime::DynamicTail> {
    let (full, g) = (&split.full, b.g);
    let mut inputs = Vec::new();
    for &v in &tail.inputs {
        let name = &full.values[v].name;
        let r = if let Some(index) = full.inputs.iter().position(|&i| i == v) {
            BufRef::Input { index }
        } else if let Some(t) = full.const_value(v) {
            let bytes = kiln_ir::onnx::tensor_proto::to_raw(t);
            BufRef::Weight {
                index: b.weights.push(name, &bytes),
            }
        } else if let Some(p) = split
            .prefix_outputs
            .iter()
            .position(|&i| full.outputs[i] == v)
        {
            b.buf(g.outputs[p])?
        } else if let Some(k) = split.boundary.iter().position(|&x| x == v) {
            b.buf(g.outputs[b.n_model + k])?
        } else {
            bail!("dynamic tail: input '{name}' is not computed by the static prefix");
        };
        inputs.push(r);
    }
    Ok(kiln_runtime::DynamicTail {
        graph: tail.json.clone(),
        inputs,
        outputs: split.tail_outputs.clone(),
    })
}

/// A reference graph copying value `v` (its dtype and shape, no constant value) to its
/// output: `Identity`.
fn copy_graph_json(g: &Graph, v: ValueId) -> Result<String> {
    use kiln_ir::ops::elementwise::ElementwiseOp;
    use kiln_ir::{Fact, Node, Op};
    let val = &g.values[v];
    let mut mg = Graph {
        name: format!("copy_{}", val.name),
        opset: g.opset,
        ..Default::default()
    };
    let fact = || Fact::new(val.fact.dtype, val.fact.shape.clone());
    let x = mg.add_value(format!("{}_in", val.name), fact());
    let y = mg.add_value(val.name.clone(), fact());
    mg.inputs.push(x);
    mg.outputs.push(y);
    mg.nodes.push(Node {
        name: "copy".into(),
        op: Op::Elementwise(ElementwiseOp::Identity),
        inputs: vec![Some(x)],
        outputs: vec![y],
    });
    Ok(serde_json::to_string(&mg)?)
}

/// The I/O spec of a graph output computed by the dynamic tail: unknown dims are
/// [`DimSpec::Dynamic`].
fn dynamic_io_spec(g: &Graph, v: ValueId) -> Result<IoSpec> {
    let val = &g.values[v];
    Ok(IoSpec {
        name: val.name.clone(),
        dtype: val.fact.dtype,
        shape: val
            .fact
            .shape
            .dims()
            .iter()
            .map(|d| {
                d.known()
                    .map_or(DimSpec::Dynamic, |n| DimSpec::Fixed(n as u64))
            })
            .collect(),
    })
}

/// The static I/O spec of a graph input or output.
pub(crate) fn io_spec(g: &Graph, v: ValueId) -> Result<IoSpec> {
    let val = &g.values[v];
    let shape = val.fact.shape.as_known().with_context(|| {
        if g.inputs.contains(&v) {
            format!(
                "input '{}' has shape {} after specialisation; give it with --shape",
                val.name, val.fact.shape
            )
        } else {
            format!(
                "output '{}' has shape {}: it depends on the values of inputs (e.g. a shape, \
                 axes or k input), which a static-shape compile cannot handle yet; make such \
                 inputs initializers of the model",
                val.name, val.fact.shape
            )
        }
    })?;
    Ok(IoSpec {
        name: val.name.clone(),
        dtype: val.fact.dtype,
        shape: shape.iter().map(|&d| DimSpec::Fixed(d as u64)).collect(),
    })
}

/// Resolves graph values to buffers, collecting the weights they use.
pub(crate) struct PlanBuilder<'a> {
    g: &'a Graph,
    mem: &'a MemoryPlan,
    pub(crate) weights: &'a mut WeightsBuilder,
    weight_of: HashMap<ValueId, usize>,
    /// Derived constants already stored, by name.
    derived_of: HashMap<String, usize>,
    /// How many of the graph's outputs are model outputs (the others are boundary values of
    /// a static prefix, see [`exec_plan`]).
    n_model: usize,
    /// The buffer of each graph output.
    out_refs: Vec<BufRef>,
}

impl<'a> PlanBuilder<'a> {
    pub(crate) fn new(g: &'a Graph, mem: &'a MemoryPlan, weights: &'a mut WeightsBuilder) -> Self {
        Self {
            g,
            mem,
            weights,
            weight_of: HashMap::new(),
            derived_of: HashMap::new(),
            n_model: g.outputs.len(),
            out_refs: (0..g.outputs.len())
                .map(|index| BufRef::Output { index })
                .collect(),
        }
    }

    /// The weight holding a kernel's derived constant (stored once per name).
    fn derived(&mut self, c: &kiln_codegen::cpu::lower::DerivedConst) -> BufRef {
        let index = match self.derived_of.get(&c.name) {
            Some(&i) => i,
            None => {
                let bytes = kiln_ir::onnx::tensor_proto::to_raw(&c.tensor);
                let i = self.weights.push(&c.name, &bytes);
                self.derived_of.insert(c.name.clone(), i);
                i
            }
        };
        BufRef::Weight { index }
    }

    /// The buffer holding value `v` (a view is resolved to the storage it views).
    pub(crate) fn buf(&mut self, v: ValueId) -> Result<BufRef> {
        let g = self.g;
        // A boundary value has its own buffer, even when it is a view.
        if let Some(pos) = g.outputs.iter().position(|&o| o == v) {
            if pos >= self.n_model {
                return Ok(self.out_refs[pos].clone());
            }
        }
        let root = self.mem.alias_of[v].unwrap_or(v);
        if let Some(index) = g.inputs.iter().position(|&i| i == root) {
            return Ok(BufRef::Input { index });
        }
        if let Some(pos) = g.outputs.iter().position(|&o| o == root) {
            return Ok(self.out_refs[pos].clone());
        }
        if let Some(t) = g.const_value(root) {
            let index = match self.weight_of.get(&root) {
                Some(&i) => i,
                None => {
                    let bytes = kiln_ir::onnx::tensor_proto::to_raw(t);
                    let i = self.weights.push(&g.values[root].name, &bytes);
                    self.weight_of.insert(root, i);
                    i
                }
            };
            return Ok(BufRef::Weight { index });
        }
        let slot = self.mem.slots[v]
            .or(self.mem.slots[root])
            .with_context(|| format!("value '{}' has no arena slot", g.values[v].name))?;
        Ok(BufRef::Arena {
            offset: slot.offset as u64,
            bytes: slot.size as u64,
        })
    }
}
