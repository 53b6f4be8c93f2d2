//! The compile pipeline as a list of named stages, each with a one-line doc. Any stage's IR can
//! be printed with `--print-after=STAGE` (`all` prints every stage).

use anyhow::{bail, Context, Result};
use kiln_ir::{Dim, Graph};
use kiln_passes::{MemoryPlan, Partition};
use std::collections::HashMap;
use std::path::Path;

/// The stages, in order: name and what it does.
pub const STAGES: &[(&str, &str)] = &[
    (
        "import",
        "decode ONNX, build the typed graph, infer dtypes and shapes, verify",
    ),
    (
        "simplify",
        "fold constant sub-graphs (exporter shape chains) and remove dead nodes",
    ),
    (
        "specialize",
        "fix symbolic input dims to concrete sizes and re-infer; split off the nodes whose shapes depend on input values (dynamic tail)",
    ),
    (
        "unroll",
        "unroll RNN/GRU/LSTM layers with static shapes into their time steps (MatMuls, gates, state updates)",
    ),
    (
        "decompose",
        "expand Attention nodes with static shapes into MatMul, Softmax and mask ops",
    ),
    (
        "fold",
        "fold BatchNormalization, constant scales and biases into Conv/Gemm; pre-transpose constant Gemm weights",
    ),
    (
        "eqsat",
        "algebraic rewrites by equality saturation, cheapest graph by the cost model (-O2)",
    ),
    ("fusion", "partition the graph into kernels"),
    ("memory", "plan one arena for all intermediate buffers"),
];

/// Options of the graph-level pipeline.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Concrete shapes for named inputs (`--shape name=1x3x224x224`).
    pub shapes: HashMap<String, Vec<usize>>,
    /// Stages after which to print the IR (`all` for every stage).
    pub print_after: Vec<String>,
    /// Optimisation level (`-O0` ... `-O3`; `None` is the default, `-O2`).
    pub opt_level: Option<u8>,
    /// Measured op times for the eqsat cost model (µs by op signature; from the tuning
    /// database, see [`kiln_passes::eqsat::cost::measured_table`]).
    pub measured_us: std::sync::Arc<HashMap<String, f64>>,
    /// The device the eqsat cost model describes (`None`: a CPU core).
    pub device: Option<kiln_passes::eqsat::cost::Device>,
    /// Overrides of the `-O` level's eqsat search limits.
    pub eqsat_limits: EqsatLimits,
}

/// Overrides of the eqsat search limits that an optimisation level sets
/// ([`eqsat_options`]): `kiln compile --eqsat-iters N --eqsat-nodes N --eqsat-time SECS
/// --extractor greedy|dag|ilp`. `None` keeps the level's value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EqsatLimits {
    /// Maximum saturation iterations.
    pub iter_limit: Option<usize>,
    /// Maximum e-nodes.
    pub node_limit: Option<usize>,
    /// Maximum saturation time (extraction has its own limits, and a time-out there
    /// falls back to the greedy result).
    pub time_limit: Option<std::time::Duration>,
    /// The extractor.
    pub extractor: Option<kiln_passes::eqsat::ExtractorKind>,
}

impl EqsatLimits {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        *self == EqsatLimits::default()
    }

    /// Applies the overrides to `o`.
    pub fn apply(&self, o: &mut kiln_passes::eqsat::EqsatOptions) {
        if let Some(n) = self.iter_limit {
            o.iter_limit = n;
        }
        if let Some(n) = self.node_limit {
            o.node_limit = n;
        }
        if let Some(t) = self.time_limit {
            o.time_limit = t;
        }
        if let Some(x) = self.extractor {
            o.extractor = x;
        }
    }
}

/// Separates the eqsat report from the IR in the text printed after the `eqsat` stage.
pub const EQSAT_IR: &str = "// eqsat result IR:\n";

/// The eqsat options of an optimisation level: `None` (no eqsat) at `-O0`, greedy
/// extraction with few iterations at `-O1`, the default options (DAG-aware extraction) at
/// `-O2`, a longer search (more iterations, e-nodes and time) with ILP extraction at `-O3`
/// and above.
pub fn eqsat_options(opt_level: u8) -> Option<kiln_passes::eqsat::EqsatOptions> {
    use kiln_passes::eqsat::{EqsatOptions, ExtractorKind};
    match opt_level {
        0 => None,
        1 => Some(EqsatOptions {
            iter_limit: 4,
            extractor: ExtractorKind::Greedy,
            ..Default::default()
        }),
        2 => Some(EqsatOptions::default()),
        // -O3: a longer search (more iterations, nodes and time), ILP extraction
        _ => Some(EqsatOptions {
            iter_limit: 16,
            node_limit: 60_000,
            time_limit: std::time::Duration::from_secs(8),
            extract_time_limit: std::time::Duration::from_secs(3),
            extractor: ExtractorKind::Ilp,
            ilp_time_limit: std::time::Duration::from_secs(4),
            ..Default::default()
        }),
    }
}

/// The result of the graph-level pipeline: the optimised graph, its kernels and memory plan
/// (and, for a model with data-dependent shapes, its dynamic tail).
#[derive(Debug)]
pub struct Planned {
    /// The graph after all graph passes.
    pub graph: Graph,
    /// The kernel partition.
    pub partition: Partition,
    /// The arena plan.
    pub memory: MemoryPlan,
    /// What the eqsat stage did (`None` at `-O0`).
    pub eqsat: Option<kiln_passes::eqsat::EqsatReport>,
    /// The nodes whose shapes depend on input values, split off after `specialize`; `graph`
    /// is then only the static prefix (see [`crate::dynamic_tail`]).
    pub tail: Option<crate::dynamic_tail::DynamicSplit>,
}

/// Parses `name=1x3x224x224`.
pub fn parse_shape(spec: &str) -> Result<(String, Vec<usize>)> {
    let (name, dims) = spec
        .split_once('=')
        .with_context(|| format!("--shape '{spec}': expected NAME=DIMxDIM..."))?;
    let dims = dims
        .split('x')
        .map(|d| {
            d.parse::<usize>()
                .with_context(|| format!("--shape '{spec}': '{d}' is not a size"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((name.to_string(), dims))
}

fn check_stage_names(names: &[String]) -> Result<()> {
    for n in names {
        if n != "all" && !STAGES.iter().any(|(s, _)| s == n) {
            let known: Vec<&str> = STAGES.iter().map(|(s, _)| *s).collect();
            bail!(
                "--print-after={n}: unknown stage (stages: {}, or all)",
                known.join(", ")
            );
        }
    }
    Ok(())
}

/// Runs the graph-level stages on a model file, calling `print(stage, text)` after each stage
/// named in `opts.print_after`.
pub fn plan(model: &Path, opts: &Options, print: impl FnMut(&str, &str)) -> Result<Planned> {
    check_stage_names(&opts.print_after)?;
    plan_graph(kiln_ir::onnx::load(model)?, opts, print)
}

/// Runs the graph-level stages on an imported graph (the result of the `import` stage, e.g.
/// [`kiln_ir::onnx::load`] or a graph built in code), like [`plan`].
pub fn plan_graph(
    mut g: Graph,
    opts: &Options,
    mut print: impl FnMut(&str, &str),
) -> Result<Planned> {
    check_stage_names(&opts.print_after)?;
    let want = |s: &str| opts.print_after.iter().any(|p| p == s || p == "all");
    if want("import") {
        print("import", &kiln_ir::printer::to_text(&g));
    }
    kiln_ir::simplify::simplify(&mut g);
    if want("simplify") {
        print("simplify", &kiln_ir::printer::to_text(&g));
    }
    let mut shapes = Vec::new();
    for &i in &g.inputs {
        let v = &g.values[i];
        let s = match opts.shapes.get(&v.name) {
            Some(s) => s.clone(),
            // symbolic dims default to 1
            None => v
                .fact
                .shape
                .dims()
                .iter()
                .map(|d| d.known().unwrap_or(1))
                .collect(),
        };
        shapes.push(s);
    }
    for name in opts.shapes.keys() {
        if !g.inputs.iter().any(|&i| &g.values[i].name == name) {
            bail!("--shape {name}=...: the model has no input named '{name}'");
        }
    }
    kiln_passes::specialize::specialize_inputs(&mut g, &shapes)?;
    if want("specialize") {
        print("specialize", &kiln_ir::printer::to_text(&g));
    }
    // Shapes that still depend on input values: compile the static prefix, keep the rest
    // as a dynamic tail (see `crate::dynamic_tail`).
    let tail = match crate::dynamic_tail::split(&g)? {
        Some((prefix, split)) => {
            g = prefix;
            Some(split)
        }
        None => None,
    };
    if kiln_passes::unroll_recurrent::unroll_all(&mut g) > 0 {
        // the weights' per-direction slices and transposes fold now
        kiln_ir::simplify::simplify(&mut g);
    }
    if want("unroll") {
        print("unroll", &kiln_ir::printer::to_text(&g));
    }
    if kiln_passes::decompose_attention::decompose_all(&mut g) > 0 {
        // constant masks and cache-free heads fold now
        kiln_ir::simplify::simplify(&mut g);
    }
    if want("decompose") {
        print("decompose", &kiln_ir::printer::to_text(&g));
    }
    kiln_passes::fold_batchnorm::fold_all(&mut g);
    kiln_passes::prepack::pretranspose_gemm_weights(&mut g);
    kiln_ir::simplify::simplify(&mut g);
    kiln_ir::verify::verify(&g)?;
    if want("fold") {
        print("fold", &kiln_ir::printer::to_text(&g));
    }
    let mut eqsat = None;
    let level = opts.opt_level.unwrap_or(2);
    if level == 0 && !opts.eqsat_limits.is_empty() {
        bail!("eqsat limits (--eqsat-iters/--eqsat-nodes/--eqsat-time/--extractor) were given at -O0, where equality saturation is off");
    }
    if let Some(mut eo) = eqsat_options(level) {
        opts.eqsat_limits.apply(&mut eo);
        eo.measured_us = opts.measured_us.clone();
        if let Some(d) = &opts.device {
            eo.device = d.clone();
        }
        let (g2, report) = kiln_passes::eqsat::optimize(&g, &eo).context("eqsat")?;
        g = g2;
        if want("eqsat") {
            print(
                "eqsat",
                &format!("{report}{EQSAT_IR}{}", kiln_ir::printer::to_text(&g)),
            );
        }
        eqsat = Some(report);
    } else if want("eqsat") {
        print("eqsat", "eqsat: off (-O0)\n");
    }
    let partition = kiln_passes::partition(&g);
    partition.verify(&g).map_err(anyhow::Error::msg)?;
    if want("fusion") {
        print("fusion", &partition.display(&g).to_string());
    }
    let memory = kiln_passes::plan_memory(&g, &partition).map_err(anyhow::Error::msg)?;
    memory.verify(&g, &partition).map_err(anyhow::Error::msg)?;
    if want("memory") {
        print("memory", &memory.summary());
    }
    debug_assert!(g.inputs.iter().all(|&i| g.values[i]
        .fact
        .shape
        .dims()
        .iter()
        .all(|d| matches!(d, Dim::Known(_)))));
    Ok(Planned {
        graph: g,
        partition,
        memory,
        eqsat,
        tail,
    })
}
