//! Algebraic rewrites by equality saturation ([`egg`]), after tensat.
//!
//! The graph becomes an e-graph over the [`language::Kiln`] language, whose e-class
//! analysis ([`analysis`]) carries the dtype, shape and (when known) constant value of each
//! e-class, computed by the ops' own inference. The [`rules`] (MatMul/Conv algebra, merging
//! of parallel MatMuls and Convs, layout, Concat/Slice, elementwise identities, Conv +
//! BatchNorm folding; constant folding happens in the analysis) grow it until saturation or
//! a limit; an extractor ([`extract`]) then picks the cheapest equivalent graph under a
//! [`cost::CostModel`], and [`convert`] turns it back into a graph that keeps the names of
//! the graph inputs and outputs. The result is only used when it verifies and is cheaper
//! than the input.
//!
//! ```
//! use kiln_ir::ops::elementwise::{ElementwiseOp, UnaryKind};
//! use kiln_ir::{DType, Fact, Graph, Node, Op, Shape};
//! use kiln_passes::eqsat::{optimize, EqsatOptions};
//!
//! // y = relu(relu(x))
//! let mut g = Graph { name: "g".into(), opset: 17, ..Default::default() };
//! let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[4, 8])));
//! let t = g.add_value("t", Fact::new(DType::F32, Shape::known(&[4, 8])));
//! let y = g.add_value("y", Fact::new(DType::F32, Shape::known(&[4, 8])));
//! let relu = Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu));
//! g.inputs.push(x);
//! g.outputs.push(y);
//! g.nodes.push(Node { name: "r1".into(), op: relu.clone(), inputs: vec![Some(x)], outputs: vec![t] });
//! g.nodes.push(Node { name: "r2".into(), op: relu, inputs: vec![Some(t)], outputs: vec![y] });
//!
//! let (opt, report) = optimize(&g, &EqsatOptions::default()).unwrap();
//! assert_eq!(opt.nodes.len(), 1);
//! assert_eq!(opt.values[opt.outputs[0]].name, "y");
//! assert!(report.cost_after < report.cost_before);
//! ```

pub mod analysis;
pub mod convert;
pub mod cost;
pub mod dist;
pub mod extract;
pub mod ilp;
pub mod language;
pub mod rules;

use cost::{graph_cost, Analytical, CostModel, Device, Measured};
use egg::Runner;
use kiln_ir::{Graph, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// Which extractor picks the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtractorKind {
    /// egg's greedy tree extractor only.
    Greedy,
    /// The greedy choice improved by DAG-aware local search (the better of the two is kept).
    Dag,
    /// [`Dag`](Self::Dag), then an ILP warm-started from its choice ([`ilp`], within
    /// `ilp_time_limit`); the cheapest of the three is kept.
    Ilp,
}

impl ExtractorKind {
    /// Every extractor, cheapest search first.
    pub const ALL: [ExtractorKind; 3] = [
        ExtractorKind::Greedy,
        ExtractorKind::Dag,
        ExtractorKind::Ilp,
    ];
}

impl std::str::FromStr for ExtractorKind {
    type Err = String;
    /// `greedy`, `dag` or `ilp`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "greedy" => Ok(ExtractorKind::Greedy),
            "dag" => Ok(ExtractorKind::Dag),
            "ilp" => Ok(ExtractorKind::Ilp),
            _ => Err(format!(
                "unknown extractor '{s}' (expected greedy, dag or ilp)"
            )),
        }
    }
}

/// Options of [`optimize`].
#[derive(Clone, Debug)]
pub struct EqsatOptions {
    /// Maximum saturation iterations.
    pub iter_limit: usize,
    /// Maximum e-nodes.
    pub node_limit: usize,
    /// Maximum saturation time.
    pub time_limit: Duration,
    /// Maximum time of the DAG-aware extraction.
    pub extract_time_limit: Duration,
    /// Maximum time of the ILP extraction ([`ExtractorKind::Ilp`]); on a time-out the
    /// DAG-aware / greedy result is used.
    pub ilp_time_limit: Duration,
    /// Constant values up to this many elements are folded.
    pub fold_limit: usize,
    /// The extractor.
    pub extractor: ExtractorKind,
    /// The target the analytical cost model describes.
    pub device: Device,
    /// Only rules whose name is in this list (all rules if `None`).
    pub rules: Option<Vec<String>>,
    /// Measured op times (µs by [`kiln_ir::ops::op_signature`], see
    /// [`cost::measured_table`]) that replace the analytical estimate where present.
    pub measured_us: std::sync::Arc<std::collections::HashMap<String, f64>>,
}

impl Default for EqsatOptions {
    fn default() -> Self {
        EqsatOptions {
            iter_limit: 8,
            node_limit: 20_000,
            time_limit: Duration::from_secs(3),
            extract_time_limit: Duration::from_secs(1),
            ilp_time_limit: Duration::from_secs(3),
            fold_limit: 1 << 21,
            extractor: ExtractorKind::Dag,
            device: Device::cpu(),
            rules: None,
            measured_us: Default::default(),
        }
    }
}

/// What [`optimize`] did.
#[derive(Clone, Debug, Default)]
pub struct EqsatReport {
    /// Applications per rule (rules that applied at least once), by name.
    pub rules_applied: BTreeMap<String, usize>,
    /// Number of rules in the rule set.
    pub rules_total: usize,
    /// Saturation iterations run.
    pub iterations: usize,
    /// Why saturation stopped (`saturated`, `iteration limit`, `e-node limit, at N
    /// e-nodes`, `time limit, at S s`).
    pub stop_reason: String,
    /// E-nodes and e-classes at the end of saturation.
    pub egraph_nodes: usize,
    /// E-classes at the end of saturation.
    pub egraph_classes: usize,
    /// Seconds building the e-graph and saturating.
    pub saturate_s: f64,
    /// Seconds extracting and converting back.
    pub extract_s: f64,
    /// Estimated cost of the input graph, microseconds.
    pub cost_before: f64,
    /// Estimated cost of the result, microseconds.
    pub cost_after: f64,
    /// Node counts before and after.
    pub nodes_before: usize,
    /// Node count of the result.
    pub nodes_after: usize,
    /// Which candidate was kept: `greedy`, `dag`, `ilp` or `input`.
    pub chosen: String,
    /// The cost model's description.
    pub cost_model: String,
    /// Candidates that were rejected, and why.
    pub notes: Vec<String>,
}

impl fmt::Display for EqsatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gain = if self.cost_before > 0.0 {
            100.0 * (1.0 - self.cost_after / self.cost_before)
        } else {
            0.0
        };
        writeln!(
            f,
            "eqsat: {} iterations ({}), e-graph {} nodes / {} classes, saturate {:.3}s, extract {:.3}s",
            self.iterations,
            self.stop_reason,
            self.egraph_nodes,
            self.egraph_classes,
            self.saturate_s,
            self.extract_s
        )?;
        writeln!(
            f,
            "cost ({}): {:.1} us -> {:.1} us ({gain:.1}% less), nodes {} -> {}, kept {}",
            self.cost_model,
            self.cost_before,
            self.cost_after,
            self.nodes_before,
            self.nodes_after,
            self.chosen
        )?;
        writeln!(
            f,
            "rules applied ({} of {}):",
            self.rules_applied.len(),
            self.rules_total
        )?;
        for (r, n) in &self.rules_applied {
            writeln!(f, "  {r:<28} {n}")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// Rewrites `g` by equality saturation and extraction; returns the cheapest equivalent
/// graph found (or `g` itself when nothing cheaper verifies) and a report. Errors on a
/// graph that does not verify.
pub fn optimize(g: &Graph, opts: &EqsatOptions) -> Result<(Graph, EqsatReport)> {
    kiln_ir::verify::verify(g)?;
    let model = Measured {
        base: Analytical {
            device: opts.device.clone(),
        },
        times_us: opts.measured_us.clone(),
    };
    let mut rep = EqsatReport {
        cost_before: graph_cost(g, &model),
        nodes_before: g.nodes.len(),
        cost_model: model.name(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let (eg, roots) = convert::to_egraph(g, opts.fold_limit)?;
    let mut rules = rules::all();
    if opts.device.parallel_units <= 1.0 {
        // A CPU target: more output tiles gain one core nothing, and the CPU code
        // generator runs a batched product on one thread (no row split), where the three
        // separate products split over the threads (2 threads: 1.9 vs 0.9 ms for BERT-base's
        // Q/K/V at sequence 128).
        rules.retain(|r| !r.name.as_str().starts_with("merge-stacked-"));
    }
    if let Some(keep) = &opts.rules {
        rules.retain(|r| keep.iter().any(|k| k == r.name.as_str()));
    }
    rep.rules_total = rules.len();
    let runner: Runner<_, _, ()> = Runner::default()
        .with_egraph(eg)
        .with_iter_limit(opts.iter_limit)
        .with_node_limit(opts.node_limit)
        .with_time_limit(opts.time_limit)
        .run(&rules);
    rep.iterations = runner.iterations.len();
    rep.stop_reason = match &runner.stop_reason {
        Some(egg::StopReason::Saturated) => "saturated".into(),
        Some(egg::StopReason::IterationLimit(_)) => "iteration limit".into(),
        Some(egg::StopReason::NodeLimit(n)) => format!("e-node limit, at {n} e-nodes"),
        Some(egg::StopReason::TimeLimit(s)) => format!("time limit, at {s:.2} s"),
        Some(egg::StopReason::Other(s)) => s.clone(),
        None => "not run".into(),
    };
    for it in &runner.iterations {
        for (r, n) in &it.applied {
            if *n > 0 {
                *rep.rules_applied.entry(r.to_string()).or_default() += n;
            }
        }
    }
    let eg = runner.egraph;
    rep.egraph_nodes = eg.total_number_of_nodes();
    rep.egraph_classes = eg.number_of_classes();
    let roots: Vec<_> = roots.iter().map(|&r| eg.find(r)).collect();
    rep.saturate_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let costs = extract::node_costs(&eg, &model);
    let tree = extract::greedy(&eg, &costs);
    let mut cands = vec![("greedy", tree.clone())];
    if opts.extractor != ExtractorKind::Greedy {
        let (d, moves) = extract::dag(&eg, &costs, &roots, tree.clone(), opts.extract_time_limit);
        if opts.extractor == ExtractorKind::Ilp {
            let (choice, st) = ilp::ilp(&eg, &costs, &roots, &d, opts.ilp_time_limit);
            rep.notes.push(format!(
                "ilp: {} variables, {} constraints, {} solve(s), {}",
                st.vars,
                st.constraints,
                st.solves,
                match (&st.failure, st.optimal) {
                    (Some(f), _) => format!("no result ({f}), DAG-aware/greedy kept"),
                    (None, true) => "optimal".to_string(),
                    (None, false) => "feasible (time limit)".to_string(),
                }
            ));
            if let Some(c) = choice {
                cands.push(("ilp", c));
            }
        }
        rep.notes.push(format!(
            "dag-aware search: {moves} moves, DAG cost {:.1} -> {:.1} us",
            extract::dag_cost(&eg, &costs, &tree, &roots),
            extract::dag_cost(&eg, &costs, &d, &roots)
        ));
        if moves > 0 {
            cands.push(("dag", d));
        }
    }
    let mut best: Option<(f64, Graph, &str)> = None;
    for (name, choice) in cands {
        match convert::to_graph(&eg, &roots, &choice, g) {
            Ok(out) => {
                let c = graph_cost(&out, &model);
                rep.notes.push(format!("{name}: {c:.1} us"));
                if best.as_ref().is_none_or(|b| c < b.0) {
                    best = Some((c, out, name));
                }
            }
            Err(e) => rep.notes.push(format!("{name} extraction rejected: {e}")),
        }
    }
    rep.extract_s = t1.elapsed().as_secs_f64();
    let out = match best {
        Some((c, out, name)) if c < rep.cost_before - 1e-9 => {
            rep.cost_after = c;
            rep.chosen = name.to_string();
            out
        }
        _ => {
            rep.cost_after = rep.cost_before;
            rep.chosen = "input".into();
            g.clone()
        }
    };
    rep.nodes_after = out.nodes.len();
    Ok((out, rep))
}
