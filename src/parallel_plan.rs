//! Parallel plans for a cluster (`kiln plan MODEL.onnx --cluster C.toml`): resolves the
//! cluster file's SKU names through codegen's GPU database (`cpu`: this machine's cores),
//! runs the graph pipeline up to the eqsat stage, and searches a plan with
//! [`kiln_passes::parallel::search::find_plan`] on the graph before and after eqsat.

use anyhow::{anyhow, Context, Result};
use kiln_ir::Graph;
use kiln_passes::parallel::cluster::{Cluster, DeviceSpec};
use kiln_passes::parallel::search::{self, Objective, PlanReport, SearchOptions};
use std::path::Path;

/// Largest constant (elements) the eqsat variant of the plan search folds.
pub const PLAN_FOLD_LIMIT: usize = 1 << 16;

/// Kernel launch overhead assumed for a GPU, µs (as [`kiln_passes::eqsat::cost::Device::gpu`]).
pub const GPU_LAUNCH_US: f64 = 4.0;

/// Output tile of a GPU contraction, elements (as `Device::gpu`).
pub const GPU_TILE_ELEMS: f64 = 64.0 * 64.0;

/// The figures of a SKU: `cpu` (one core of this machine, with an equal share of its
/// memory) or a GPU of the database (`h100`, `a100`, ...: its f32 and f16 tensor-core
/// peaks, DRAM bandwidth, memory and SM count).
pub fn resolve_sku(name: &str) -> Result<DeviceSpec, String> {
    if name.eq_ignore_ascii_case("cpu") {
        let cores = crate::default_threads().max(1) as f64;
        return Ok(DeviceSpec::cpu(total_memory_gb() / cores));
    }
    let db = kiln_codegen::gpu::DeviceDb::builtin().map_err(|e| e.to_string())?;
    let sku = db.get(name).ok_or_else(|| {
        let known: Vec<&str> = db.skus().iter().map(|s| s.name.as_str()).collect();
        format!(
            "unknown SKU '{name}' (known: cpu, {}, and their aliases)",
            known.join(", ")
        )
    })?;
    Ok(DeviceSpec {
        name: sku.name.clone(),
        peak_gflops_f32: sku.peak_tflops.f32 * 1e3,
        peak_gflops_f16: sku.peak_tflops.f16 * 1e3,
        bandwidth_gbs: sku.mem_bandwidth_gbs,
        launch_us: GPU_LAUNCH_US,
        memory_bytes: sku.memory_gb * 1e9,
        is_cpu: false,
        parallel_units: sku.sm_count as f64,
        tile_elems: GPU_TILE_ELEMS,
    })
}

/// This machine's memory in GB (`/proc/meminfo`; 16 if unknown).
fn total_memory_gb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(16.0, |kb| kb * 1024.0 / 1e9)
}

/// Reads a cluster file (format in docs/parallel.md).
pub fn load_cluster(path: &Path) -> Result<Cluster> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading cluster file {}", path.display()))?;
    Cluster::from_toml(&text, &resolve_sku).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Searches a parallel plan for `graph` (already specialized to batch `batch`, e.g. the
/// result of [`crate::pipeline::plan_graph`] at `-O0`) on `cluster`; `opt_level` ≥ 1 also
/// searches the eqsat-rewritten graph (then [`PlanReport::graph`] holds the graph the
/// plan refers to).
pub fn find_plan(
    graph: &Graph,
    cluster: &Cluster,
    batch: usize,
    opt_level: u8,
    objective: Objective,
) -> Result<PlanReport> {
    let eqsat = crate::pipeline::eqsat_options(opt_level).map(|mut e| {
        e.fold_limit = e.fold_limit.min(PLAN_FOLD_LIMIT);
        e
    });
    let opts = SearchOptions {
        objective,
        // Constants above 64K elements are not folded inside the e-graph here: on
        // BERT-base sized graphs folding the weights (concatenated, transposed) takes
        // minutes; rewrites that need them stay as ops on the constants.
        eqsat: eqsat.clone(),
        // the joint algebraic + tensor-parallel e-graph search, at the same level
        joint: eqsat,
        ..Default::default()
    };
    search::find_plan(graph, cluster, batch, &opts).map_err(|e| anyhow!("plan search: {e}"))
}

/// `kiln plan MODEL --cluster C [--batch N] [--latency]`: the graph pipeline to the fold stage with
/// every input's axis 0 set to the batch, then the plan search; prints the report (or
/// JSON).
pub fn plan_command(
    model: &Path,
    cluster_file: &Path,
    batch: Option<usize>,
    mut opts: crate::pipeline::Options,
    objective: Objective,
    json: bool,
) -> Result<()> {
    let cluster = load_cluster(cluster_file)?;
    let g = kiln_ir::onnx::load(model)?;
    let batch = match batch {
        Some(b) => {
            for &i in &g.inputs {
                let v = &g.values[i];
                if v.fact.value.is_some() || opts.shapes.contains_key(&v.name) {
                    continue;
                }
                let mut dims: Vec<usize> = v
                    .fact
                    .shape
                    .dims()
                    .iter()
                    .map(|d| d.known().unwrap_or(1))
                    .collect();
                if let Some(d) = dims.first_mut() {
                    if let Some(Some(k)) = v.fact.shape.dims().first().map(|d| d.known()) {
                        if k != b {
                            anyhow::bail!(
                                "--batch {b}: input '{}' has a fixed batch of {k} (axis 0 is not symbolic in the model)",
                                v.name
                            );
                        }
                    }
                    *d = b;
                }
                opts.shapes.insert(v.name.clone(), dims);
            }
            b
        }
        None => 0,
    };
    let opt_level = opts.opt_level.unwrap_or(2);
    opts.opt_level = Some(0);
    let planned = crate::pipeline::plan_graph(g, &opts, |stage, text| {
        println!("// ----- IR after {stage} -----\n{text}");
    })?;
    if planned.tail.is_some() {
        anyhow::bail!(
            "{}: the model has data-dependent shapes; parallel plans need static shapes",
            model.display()
        );
    }
    let g = planned.graph;
    let batch = if batch > 0 {
        batch
    } else {
        g.inputs
            .iter()
            .find_map(|&i| {
                g.values[i]
                    .fact
                    .shape
                    .dims()
                    .first()
                    .and_then(|d| d.known())
            })
            .context("the model has no input with a batch axis")?
    };
    let report = find_plan(&g, &cluster, batch, opt_level, objective)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("writing the report as JSON")?
        );
    } else {
        println!(
            "model {} at batch {batch}, maximising {:?}",
            model.display(),
            objective
        );
        println!("cluster: {}", cluster.summary());
        print!("{}", search::report_text(&g, &cluster, &report));
    }
    Ok(())
}
