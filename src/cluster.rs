//! Sharded compilation: `kiln compile MODEL.onnx --ranks N | --plan plan.json -o M.kiln`
//! writes ONE artifact holding every rank's program.
//!
//! 1. The model is prepared like the first pipeline stages (simplify, specialize, unroll,
//!    decompose, fold, pre-transpose, simplify): plans index the nodes of *this* graph ([`prepare`]).
//! 2. The plan is read from `--plan` (a serialized [`ParallelPlan`]) or, by default, a
//!    pipeline balanced by node FLOPs over the ranks
//!    ([`kiln_passes::parallel::pipeline_split::balanced_pipeline`]).
//! 3. [`kiln_passes::parallel::lower::lower`] turns it into per-rank programs; every
//!    compute segment is compiled by the normal pipeline ([`crate::compile::compile_graph`]:
//!    for the CPU, or for the rank's GPU SKU — its cluster device, or `--target cuda:…` for
//!    every rank) into a nested artifact (identical segments, e.g. of data-parallel ranks,
//!    once), stored
//!    in the outer artifact's weights section; the communication steps become
//!    [`kiln_runtime::cluster::ClusterStep`]s.

use crate::compile::{compile_graph, io_spec, CompileOptions};
use anyhow::{bail, Context, Result};
use kiln_ir::Graph;
use kiln_passes::parallel::lower::{lower, Step};
use kiln_passes::parallel::pipeline_split::{self, balanced_pipeline};
use kiln_passes::parallel::ParallelPlan;
use kiln_runtime::cluster::{AxisSlice, ClusterPlan, ClusterStep, RankPlan};
use kiln_runtime::plan::ALIGNMENT;
use kiln_runtime::{Artifact, ExecPlan};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the plan of a sharded compile comes from.
#[derive(Clone, Debug)]
pub enum PlanSource {
    /// The default plan over this many CPU ranks (`--ranks N`): a FLOP-balanced pipeline.
    Ranks(usize),
    /// One tensor-parallel stage over this many ranks, Megatron-style alternating
    /// Column/Row splits (`--ranks N --mode tensor`).
    Tensor(usize),
    /// One data-parallel stage over this many ranks, the batch (axis 0 of the first
    /// input) split evenly (`--ranks N --mode data`).
    Data(usize),
    /// A given plan (`--plan plan.json`).
    Plan(ParallelPlan),
    /// The plan search on a cluster file (`--cluster C.toml`), minimising the latency of
    /// one batch; the segments of a rank on a GPU compile for its SKU.
    Cluster(std::path::PathBuf),
}

/// What [`compile_cluster`] did.
#[derive(Clone, Debug, Default)]
pub struct ClusterReport {
    /// The plan used.
    pub plan: Option<ParallelPlan>,
    /// Per rank: steps and compute segments.
    pub ranks: Vec<(usize, usize)>,
    /// Distinct segments compiled.
    pub compiled: usize,
    /// Wall time: prepare + lower, segment compilation.
    pub timings: Vec<(&'static str, Duration)>,
    /// Reference-interpreter kernels over all segments.
    pub reference: usize,
    /// The graph the plan shards: `as given` (prepared), or the eqsat / joint e-graph
    /// rewrite whose plan the `--cluster` search found faster.
    pub graph_variant: String,
}

impl fmt::Display for ClusterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.plan {
            writeln!(
                f,
                "cluster: {} ranks, {} stage(s), graph {}:",
                p.world,
                p.stages.len(),
                if self.graph_variant.is_empty() {
                    "as given"
                } else {
                    &self.graph_variant
                }
            )?;
            for (i, s) in p.stages.iter().enumerate() {
                let mode = match &s.mode {
                    kiln_passes::parallel::StageMode::DataParallel { batch } => {
                        format!("data parallel, batch {batch:?}")
                    }
                    kiln_passes::parallel::StageMode::TensorParallel { splits } => {
                        format!("tensor parallel, {} split contraction(s)", splits.len())
                    }
                };
                writeln!(
                    f,
                    "  stage {i}: nodes {:?} on ranks {:?}, {mode}",
                    s.nodes, s.ranks
                )?;
            }
        }
        for (r, (steps, segs)) in self.ranks.iter().enumerate() {
            writeln!(f, "  rank {r}: {steps} steps, {segs} compute segment(s)")?;
        }
        if self.reference > 0 {
            writeln!(
                f,
                "warning: {} kernel(s) run on the reference interpreter (slow)",
                self.reference
            )?;
        }
        let parts: Vec<String> = self
            .timings
            .iter()
            .map(|(s, d)| format!("{s} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect();
        write!(
            f,
            "segments compiled: {}; time: {}",
            self.compiled,
            parts.join(", ")
        )
    }
}

/// The graph plans refer to: the graph pipeline up to the `fold` stage at `-O0` (imported,
/// simplified, inputs specialised to `opts.shapes` with symbolic dims as 1, normalisations
/// folded, constant Gemm weights pre-transposed) — the graph `kiln plan` searches at `-O0`.
pub fn prepare(graph: &Graph, opts: &CompileOptions) -> Result<Graph> {
    let popts = crate::pipeline::Options {
        shapes: opts.shapes.clone(),
        opt_level: Some(0),
        ..Default::default()
    };
    let planned = crate::pipeline::plan_graph(graph.clone(), &popts, |_, _| {})?;
    if planned.tail.is_some() {
        bail!(
            "shapes depend on input values (dynamic tail): sharded compilation needs static shapes"
        );
    }
    Ok(planned.graph)
}

/// Reads a parallel plan (JSON): a serialized [`ParallelPlan`], or the report of
/// `kiln plan --cluster C.toml --json` (its `best.plan`, which must refer to the graph as
/// given, not the eqsat-rewritten one).
pub fn read_plan(path: &Path) -> Result<ParallelPlan> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a parallel plan (invalid JSON)", path.display()))?;
    let plan = match v.get("best").and_then(|b| b.get("plan")) {
        Some(p) => {
            if let Some(variant) = v.get("graph_variant").and_then(|g| g.as_str()) {
                if variant != "as given" {
                    bail!(
                        "{}: the plan refers to the graph {variant}; search it with \
                         `kiln plan -O0 --cluster ... --json` to shard the graph as compiled",
                        path.display()
                    );
                }
            }
            p.clone()
        }
        None => v,
    };
    serde_json::from_value(plan).with_context(|| format!("{}: not a parallel plan", path.display()))
}

/// Compiles a model to a sharded artifact (see the module doc).
pub fn compile_cluster(
    model: &Path,
    opts: &CompileOptions,
    source: &PlanSource,
) -> Result<(Artifact, ClusterReport)> {
    if opts.max_batch.is_some() {
        bail!("--max-batch is not supported with --ranks/--plan/--cluster yet");
    }
    let g = kiln_ir::onnx::load(model)?;
    let name = model.display().to_string();
    compile_cluster_graph(&g, &name, opts, source)
}

/// [`compile_cluster`] of an imported graph; `name` names it in errors.
pub fn compile_cluster_graph(
    graph: &Graph,
    name: &str,
    opts: &CompileOptions,
    source: &PlanSource,
) -> Result<(Artifact, ClusterReport)> {
    let t = Instant::now();
    let mut g = prepare(graph, opts).with_context(|| name.to_string())?;
    let full = g.clone();
    let mut chosen_variant = "as given".to_string();
    // Per rank: the GPU target its segments compile for (`None`: a CPU rank). With
    // --cluster, each device's SKU; otherwise every rank on `--target`.
    let mut rank_targets: Option<Vec<Option<String>>> = None;
    let plan = match source {
        PlanSource::Ranks(n) => balanced_pipeline(&g, *n).map_err(anyhow::Error::msg)?,
        PlanSource::Tensor(n) => pipeline_split::tensor_parallel(&g, *n),
        PlanSource::Data(n) => {
            let batch = g
                .inputs
                .first()
                .and_then(|&v| g.values[v].fact.shape.as_known())
                .and_then(|s| s.first().copied())
                .context("data parallel: the model has no input with a batch axis")?;
            if batch < *n {
                bail!("data parallel over {n} ranks needs a batch of at least {n}, not {batch} (--shape)");
            }
            pipeline_split::data_parallel(&g, *n, batch)
        }
        PlanSource::Plan(p) => p.clone(),
        PlanSource::Cluster(path) => {
            let cluster = crate::parallel_plan::load_cluster(path)?;
            let mut targets = Vec::new();
            for (d, dev) in cluster.devices.iter().enumerate() {
                targets.push(if dev.spec.is_cpu {
                    None
                } else {
                    let t = format!("cuda:{}", dev.spec.name);
                    crate::gpu_compile::resolve_sku(&t).with_context(|| {
                        format!("{}: device {d} ({})", path.display(), dev.spec.name)
                    })?;
                    Some(t)
                });
            }
            rank_targets = Some(targets);
            let batch = g
                .inputs
                .iter()
                .find_map(|&v| g.values[v].fact.shape.as_known()?.first().copied())
                .context("the model has no input with a batch axis")?;
            let objective = kiln_passes::parallel::search::Objective::Latency;
            let plain = crate::parallel_plan::find_plan(&g, &cluster, batch, 0, objective)?;
            // At -O1+ also the eqsat and joint e-graph variants: their graph is used when
            // its plan is faster (one micro-batch: micro-batching re-prepares the graph).
            let level = opts.opt_level.unwrap_or(2);
            let rewritten = if level > 0 {
                let r = crate::parallel_plan::find_plan(&g, &cluster, batch, level, objective)?;
                let faster = r.best.prediction.latency_us < plain.best.prediction.latency_us;
                match r.graph {
                    Some(rg) if faster && r.best.plan.micro_batches <= 1 => {
                        chosen_variant = r.graph_variant.clone();
                        Some((rg, r.best.plan))
                    }
                    _ => None,
                }
            } else {
                None
            };
            match rewritten {
                Some((rg, plan)) => {
                    g = rg;
                    plan
                }
                None => plain.best.plan,
            }
        }
    };
    // micro-batches: lower over the graph at the micro-batch size
    let g = match plan.micro_batches {
        0 | 1 => g,
        m => micro_graph(graph, &g, opts, m).with_context(|| name.to_string())?,
    };
    let progs = lower(&g, &plan)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{name}: lowering the parallel plan"))?;
    let mut report = ClusterReport {
        plan: Some(plan.clone()),
        graph_variant: chosen_variant,
        ..Default::default()
    };
    report.timings.push(("prepare+lower", t.elapsed()));
    let t = Instant::now();
    let seg_opts = CompileOptions {
        shapes: HashMap::new(),
        print_after: Vec::new(),
        max_batch: None,
        ..opts.clone()
    };
    let target_of = |rank: usize| -> Option<String> {
        match &rank_targets {
            Some(t) => t.get(rank).cloned().flatten(),
            None => opts.gpu_target.clone(),
        }
    };
    let mut blob: Vec<u8> = Vec::new();
    let mut cache: HashMap<String, (u64, u64)> = HashMap::new();
    let mut ranks = Vec::new();
    for p in &progs.ranks {
        let mut steps = Vec::new();
        for (i, s) in p.steps.iter().enumerate() {
            steps.push(match s {
                Step::Compute(sg) => {
                    let target = target_of(p.rank);
                    let key = format!("{target:?} {}", serde_json::to_string(sg)?);
                    let (offset, len) = match cache.get(&key) {
                        Some(&r) => r,
                        None => {
                            let what = format!("{name} (rank {} segment {i})", p.rank);
                            let rank_opts = CompileOptions {
                                gpu_target: target.clone(),
                                ..seg_opts.clone()
                            };
                            let (art, rep) = compile_graph(sg, &what, &rank_opts, |_, _| {})
                                .with_context(|| what.clone())?;
                            report.reference += rep.reference.len();
                            let bytes = art.to_bytes()?;
                            let offset = blob.len().next_multiple_of(ALIGNMENT);
                            blob.resize(offset, 0);
                            blob.extend_from_slice(&bytes);
                            let r = (offset as u64, bytes.len() as u64);
                            cache.insert(key, r);
                            report.compiled += 1;
                            r
                        }
                    };
                    ClusterStep::Compute { offset, len }
                }
                Step::Send { key, to, slice } => ClusterStep::Send {
                    key: key.clone(),
                    to: *to,
                    slice: slice.as_ref().map(|s| AxisSlice {
                        axis: s.axis,
                        start: s.start,
                        len: s.len,
                    }),
                },
                Step::Recv {
                    key,
                    from,
                    dtype,
                    shape,
                } => ClusterStep::Recv {
                    key: key.clone(),
                    from: *from,
                    dtype: *dtype,
                    shape: shape.clone(),
                },
                Step::AllReduce { key, out, group } => ClusterStep::AllReduce {
                    key: key.clone(),
                    out: out.clone(),
                    group: group.clone(),
                },
                Step::AllGather {
                    key,
                    out,
                    axis,
                    sizes,
                    group,
                } => ClusterStep::AllGather {
                    key: key.clone(),
                    out: out.clone(),
                    axis: *axis,
                    sizes: sizes.clone(),
                    group: group.clone(),
                },
            });
        }
        let segs = steps
            .iter()
            .filter(|s| matches!(s, ClusterStep::Compute { .. }))
            .count();
        report.ranks.push((steps.len(), segs));
        ranks.push(RankPlan {
            inputs: p.inputs.clone(),
            steps,
            outputs: p.outputs.clone(),
        });
    }
    report.timings.push(("segments", t.elapsed()));
    let exec = ExecPlan {
        inputs: io_specs(&full, &full.inputs)?,
        outputs: io_specs(&full, &full.outputs)?,
        cluster: Some(ClusterPlan {
            world: progs.world,
            ranks,
            micro_batches: progs.micro_batches,
        }),
        ..ExecPlan::default()
    };
    exec.validate(blob.len() as u64)
        .map_err(|e| anyhow::anyhow!("{name}: invalid cluster plan: {e}"))?;
    let artifact = Artifact {
        compiler_version: format!("kiln {}", env!("CARGO_PKG_VERSION")),
        target: format!("cpu:{}", opts.cpu),
        plan: exec,
        weights: blob,
        kernels: Vec::new(),
    };
    Ok((artifact, report))
}

/// The graph prepared with every input's axis 0 divided by `m` (the micro-batch size); it
/// must have the nodes of `g` (the plan's graph) in the same order.
fn micro_graph(graph: &Graph, g: &Graph, opts: &CompileOptions, m: usize) -> Result<Graph> {
    let mut mopts = opts.clone();
    for &v in &g.inputs {
        let val = &g.values[v];
        let mut s = val.fact.shape.as_known().unwrap_or_default();
        match s.first_mut() {
            Some(b) if *b % m == 0 => *b /= m,
            _ => bail!(
                "micro_batches = {m}: input '{}' of shape {s:?} has no axis 0 divisible by {m}",
                val.name
            ),
        }
        mopts.shapes.insert(val.name.clone(), s);
    }
    let mg = prepare(graph, &mopts)?;
    let same = mg.nodes.len() == g.nodes.len()
        && mg
            .nodes
            .iter()
            .zip(&g.nodes)
            .all(|(a, b)| a.op.op_type() == b.op.op_type());
    if !same {
        bail!("micro_batches = {m}: the graph at the micro-batch size has other nodes than the plan's graph");
    }
    Ok(mg)
}

/// The runtime I/O specs of values of `g`.
fn io_specs(g: &Graph, vs: &[kiln_ir::ValueId]) -> Result<Vec<kiln_runtime::IoSpec>> {
    vs.iter().map(|&v| io_spec(g, v)).collect()
}
