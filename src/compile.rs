//! Whole-model compilation for the CPU: ONNX file → graph passes ([`crate::pipeline::plan`]) →
//! kernel lowering ([`kiln_codegen::cpu::lower::lower_partition`]) → one kernel library
//! ([`kiln_codegen::cpu::compile_library`]) → an [`Artifact`] holding the execution plan,
//! the weights and the library, which `kiln_runtime::Model` loads and runs.
//!
//! Only models whose kernels can all be lowered compile today: a kernel kind that is not
//! lowered yet fails the compile with a list of those kernels. `Alias` kernels (zero-copy
//! views) need no code: their output shares the storage of the value they view (the memory
//! plan's `alias_of`).
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
use kiln_codegen::cpu::lower::lower_partition;
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_ir::{Graph, ValueId};
use kiln_passes::fusion::KernelKind;
use kiln_passes::MemoryPlan;
use kiln_runtime::plan::WeightsBuilder;
use kiln_runtime::{Artifact, BufRef, DType, DimSpec, ExecPlan, IoSpec, Step};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

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
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            shapes: HashMap::new(),
            cpu: CpuOptions::default().cpu,
            print_after: Vec::new(),
        }
    }
}

/// What [`compile`] did: sizes and time per stage.
#[derive(Clone, Debug, Default)]
pub struct CompileReport {
    /// Number of kernels compiled into the library (one step each).
    pub kernels: usize,
    /// Number of partition kernels that needed no code (`Alias` views).
    pub views: usize,
    /// Arena size in bytes.
    pub arena_bytes: u64,
    /// Weights blob size in bytes (64-byte aligned weights).
    pub weights_bytes: u64,
    /// Size of the kernel library in bytes.
    pub library_bytes: u64,
    /// Wall time per stage, in order (`plan`, `lower`, `llvm+link`; the caller may append
    /// `write`).
    pub timings: Vec<(&'static str, Duration)>,
}

impl fmt::Display for CompileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernels: {} compiled ({} zero-copy views)",
            self.kernels, self.views
        )?;
        writeln!(f, "arena: {} bytes", self.arena_bytes)?;
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
    let mut report = CompileReport::default();
    let t = Instant::now();
    let popts = pipeline::Options {
        shapes: opts.shapes.clone(),
        print_after: opts.print_after.clone(),
        ..Default::default()
    };
    let planned = pipeline::plan(model, &popts, print)?;
    report.timings.push(("plan", t.elapsed()));
    let (g, p, mem) = (&planned.graph, &planned.partition, &planned.memory);

    let t = Instant::now();
    let lowering = lower_partition(g, p).context("lowering kernels")?;
    let mut missing = Vec::new();
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
        missing.push(format!(
            "  {} ({:?}: {}): {reason}",
            k.name,
            k.kind,
            ops.join(", ")
        ));
    }
    if !missing.is_empty() {
        bail!(
            "{}: {} of {} kernels cannot be compiled yet (these kernel kinds are not lowered to \
             code yet; `kiln eval` runs the model with the reference interpreter):\n{}",
            model.display(),
            missing.len(),
            p.kernels.len(),
            missing.join("\n")
        );
    }
    report.timings.push(("lower", t.elapsed()));

    let t = Instant::now();
    let cpu = CpuOptions {
        cpu: opts.cpu.clone(),
        ..CpuOptions::default()
    };
    let library = compile_library(&lowering.cpu_kernels(), &cpu)
        .with_context(|| format!("{}: compiling the kernel library", model.display()))?;
    report.timings.push(("llvm+link", t.elapsed()));

    let mut b = PlanBuilder::new(g, mem);
    let mut plan = ExecPlan {
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
        arena_bytes: mem.arena_bytes as u64,
        ..ExecPlan::default()
    };
    for lk in &lowering.kernels {
        let sig = &lk.kernel.signature;
        if !sig.dims.is_empty() {
            bail!(
                "kernel '{}' has symbolic dims {:?} after specialisation",
                sig.name,
                sig.dims
            );
        }
        let args = lk
            .inputs
            .iter()
            .chain(&lk.outputs)
            .map(|&v| b.buf(v))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("kernel '{}'", sig.name))?;
        plan.steps.push(Step {
            kernel: sig.name.clone(),
            args,
            num_inputs: lk.inputs.len(),
            dims: Vec::new(),
        });
    }
    let (weights, specs) = b.weights.finish();
    plan.weights = specs;
    plan.validate(weights.len() as u64)
        .map_err(|e| anyhow::anyhow!("{}: invalid execution plan: {e}", model.display()))?;
    report.kernels = plan.steps.len();
    report.arena_bytes = plan.arena_bytes;
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

/// The runtime dtype of a graph dtype.
pub fn runtime_dtype(d: kiln_ir::DType) -> Result<DType> {
    use kiln_ir::DType as I;
    Ok(match d {
        I::F32 => DType::F32,
        I::F16 => DType::F16,
        I::BF16 => DType::BF16,
        I::F64 => DType::F64,
        I::I8 => DType::I8,
        I::I16 => DType::I16,
        I::I32 => DType::I32,
        I::I64 => DType::I64,
        I::U8 => DType::U8,
        I::U16 => DType::U16,
        I::U32 => DType::U32,
        I::U64 => DType::U64,
        I::Bool => DType::Bool,
        other => bail!("dtype {other} cannot cross the runtime boundary"),
    })
}

/// The graph dtype of a runtime dtype.
pub fn graph_dtype(d: DType) -> kiln_ir::DType {
    use kiln_ir::DType as I;
    match d {
        DType::F32 => I::F32,
        DType::F16 => I::F16,
        DType::BF16 => I::BF16,
        DType::F64 => I::F64,
        DType::I8 => I::I8,
        DType::I16 => I::I16,
        DType::I32 => I::I32,
        DType::I64 => I::I64,
        DType::U8 => I::U8,
        DType::U16 => I::U16,
        DType::U32 => I::U32,
        DType::U64 => I::U64,
        DType::Bool => I::Bool,
    }
}

/// The static I/O spec of a graph input or output.
fn io_spec(g: &Graph, v: ValueId) -> Result<IoSpec> {
    let val = &g.values[v];
    let shape = val.fact.shape.as_known().with_context(|| {
        format!(
            "'{}' has shape {} after specialisation; give it with --shape",
            val.name, val.fact.shape
        )
    })?;
    Ok(IoSpec {
        name: val.name.clone(),
        dtype: runtime_dtype(val.fact.dtype)
            .with_context(|| format!("graph input/output '{}'", val.name))?,
        shape: shape.iter().map(|&d| DimSpec::Fixed(d as u64)).collect(),
    })
}

/// Resolves graph values to buffers, collecting the weights they use.
struct PlanBuilder<'a> {
    g: &'a Graph,
    mem: &'a MemoryPlan,
    weights: WeightsBuilder,
    weight_of: HashMap<ValueId, usize>,
}

impl<'a> PlanBuilder<'a> {
    fn new(g: &'a Graph, mem: &'a MemoryPlan) -> Self {
        Self {
            g,
            mem,
            weights: WeightsBuilder::new(),
            weight_of: HashMap::new(),
        }
    }

    /// The buffer holding value `v` (a view is resolved to the storage it views).
    fn buf(&mut self, v: ValueId) -> Result<BufRef> {
        let g = self.g;
        let root = self.mem.alias_of[v].unwrap_or(v);
        if let Some(index) = g.inputs.iter().position(|&i| i == root) {
            return Ok(BufRef::Input { index });
        }
        if let Some(index) = g.outputs.iter().position(|&o| o == root) {
            return Ok(BufRef::Output { index });
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
