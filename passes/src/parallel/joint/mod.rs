//! Joint algebraic and tensor-parallel search in one e-graph (Unity's idea, for one
//! tensor-parallel group of `k` equal devices).
//!
//! The parallel ops are e-nodes like any other ([`crate::eqsat::dist`]): `(shard axis k x)`
//! (Partition), `(gather axis k x)` (Combine: all-gather) and `(allreduce k x)` (Reduction),
//! and every e-class knows its layout. The search:
//!
//! 1. builds the e-graph of the graph and saturates it with the algebraic rules (eqsat);
//! 2. grows it with the **parallel rules** of this module, which add, for a replicated
//!    value, an equal value computed on parts: `tp-column` (`x·W` = gather of `x·W[:, part]`),
//!    `tp-row` (`gather(y)·W` = all-reduce of `y·W[part, :]`), and `tp-sink-*`, which move a
//!    gather or an all-reduce past the op that consumes it (elementwise ops with broadcast
//!    operands — a full-size operand is sharded too —, MatMul over batch/row axes,
//!    Transpose, Reshape, Softmax/LayerNorm over another axis, sums of partial sums); every
//!    e-node made on parts is checked by the layout analysis before its class is joined;
//! 3. extracts with a cost that is the time of the group in lockstep: replicated e-nodes at
//!    their full cost, e-nodes on parts at the cost of one part, gathers and all-reduces by
//!    the α-β model of the group's link, sharding a constant weight free (done at compile
//!    time). So whether to merge the Q/K/V projections (an algebraic rewrite) and whether
//!    to split them (a parallel one) are decided together, by one extraction;
//! 4. reads the plan off the extraction: the graph (the algebraic choices, with the parallel
//!    ops removed) and, for each MatMul whose weight was sharded, a Column (weight axis 1)
//!    or Row (axis 0) split: a one-stage tensor-parallel [`ParallelPlan`] that the lowering
//!    and the simulator take as they are.

pub mod check;
mod globalize;
mod parts;

use super::cluster::Link;
use super::plan::{NodeSplit, ParallelPlan, SplitKind, Stage, StageMode};
use crate::eqsat::analysis::{Data, KilnEGraph, Kind};
use crate::eqsat::cost::{Analytical, CostModel, Device};
use crate::eqsat::language::Kiln;
use crate::eqsat::{convert, extract, rules, EqsatOptions};
use egg::{Id, Language, Runner};
use globalize::Globalize;
use kiln_ir::Graph;
use parts::{is_weight, parallel_rules};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Options of [`optimize`].
#[derive(Clone, Debug)]
pub struct JointOptions {
    /// Ranks of the tensor-parallel group (equal devices).
    pub k: usize,
    /// The device of every rank (cost of the e-nodes).
    pub device: Device,
    /// The link joining the group (cost of the collectives).
    pub link: Link,
    /// Options of the algebraic phase (limits, fold limit; `rules: None` runs the rules
    /// [`joint_rule`] accepts); the parallel phase uses the same node and time limits.
    pub eqsat: EqsatOptions,
}

/// What [`optimize`] found.
#[derive(Clone, Debug)]
pub struct JointResult {
    /// The extracted graph (algebraic rewrites applied, parallel ops removed).
    pub graph: Graph,
    /// The MatMuls whose weight is split over the group, by node of [`JointResult::graph`].
    pub splits: Vec<NodeSplit>,
    /// Predicted time of the extracted parallel program (lockstep cost), µs.
    pub cost_us: f64,
    /// Predicted time of the best single-device choice in the same e-graph, µs.
    pub single_us: f64,
    /// Collectives in the extracted program: (all-gathers, all-reduces).
    pub collectives: (usize, usize),
    /// Each collective of the extracted program: kind and (global) shape, e.g.
    /// `all-reduce [2,32,256]`.
    pub collective_list: Vec<String>,
    /// Applications per parallel rule.
    pub rules_applied: Vec<(String, usize)>,
    /// E-nodes at the end of the parallel phase.
    pub egraph_nodes: usize,
    /// Why each phase stopped (algebraic, parallel).
    pub stop_reasons: (String, String),
    /// Seconds of both phases and the extraction.
    pub seconds: f64,
}

impl JointResult {
    /// The one-stage tensor-parallel plan of the result over ranks `0..k`.
    pub fn plan(&self, k: usize) -> ParallelPlan {
        ParallelPlan {
            world: k,
            stages: vec![Stage {
                nodes: 0..self.graph.nodes.len(),
                ranks: (0..k).collect(),
                mode: StageMode::TensorParallel {
                    splits: self.splits.clone(),
                },
            }],
            micro_batches: 1,
        }
    }
}

/// Rule families left out of the joint search by default: re-association, commutation,
/// distribution and the moving of layout ops through elementwise ops. They do not change
/// which products can be split, and every one of their variants would get sharded twins
/// (the e-graph grows by an order of magnitude); the single-device eqsat pass that
/// compiles each rank's program still applies them.
const NOT_JOINT: [&str; 12] = [
    "add-assoc",
    "add-comm",
    "mul-assoc",
    "mul-comm",
    "mul-distrib",
    "mul-factor",
    "matmul-distrib",
    "matmul-factor",
    "matmul-assoc",
    "matmul-scale",
    "scale-into-matmul",
    "-lift-",
];

/// Whether the joint search runs algebraic rule `name` by default.
pub fn joint_rule(name: &str) -> bool {
    let left_out = NOT_JOINT
        .iter()
        .any(|p| name.starts_with(p) || (p.starts_with('-') && name.contains(p)));
    let moves_layout = name.contains("-sink-") && !name.starts_with("tp-");
    !left_out && !moves_layout
}

/// Local e-node → the replicated e-node it computes a part of (recorded by every rule that
/// makes an e-node on parts; read back when the plan is extracted).
type Twins = Arc<Mutex<Vec<(Kiln, Kiln)>>>;

type EG = KilnEGraph;

/// Own costs of every e-node for a group of `k` ranks: the model's cost on the (local)
/// facts; collectives by the α-β model of `link`; a sharded constant free.
fn joint_costs(eg: &EG, model: &dyn CostModel, k: usize, link: &Link) -> extract::NodeCosts {
    let launch = model.op_cost(
        &kiln_ir::Op::Elementwise(kiln_ir::ops::elementwise::ElementwiseOp::Identity),
        &[],
        &[],
        false,
    );
    let bw = link.bandwidth_gbs * 1e3; // bytes per µs
    let n = k as f64;
    let bytes = |d: &Data| {
        d.fact().map_or(0.0, |f| {
            f.shape.numel().unwrap_or(0) as f64 * f.dtype.size_of().max(1) as f64
        })
    };
    let mut out = extract::NodeCosts::default();
    for class in eg.classes() {
        for node in class.iter() {
            let c = match node {
                Kiln::Shard([_, _, x]) => {
                    if is_weight(eg, *x) {
                        1e-3
                    } else {
                        launch + 1e-3
                    }
                }
                Kiln::Gather(_) => {
                    // all-gather of the full value (class facts are global)
                    launch + (n - 1.0) / n * bytes(&class.data) / bw + (n - 1.0) * link.latency_us
                }
                Kiln::AllReduce(_) => {
                    launch
                        + 2.0 * (n - 1.0) / n * bytes(&class.data) / bw
                        + 2.0 * (n - 1.0) * link.latency_us
                }
                _ => extract::own_cost(eg, model, &class.data, node),
            };
            let c = if class.data.kind == Kind::Invalid {
                f64::INFINITY
            } else {
                c
            };
            out.insert(node.clone(), c);
        }
    }
    out
}

/// The e-graph after both phases of the joint search.
pub(crate) struct Saturated {
    /// The e-graph.
    pub eg: KilnEGraph,
    /// The classes of the graph outputs.
    pub roots: Vec<Id>,
    /// Part e-node → the replicated e-node it is a part of.
    pub twins: Vec<(Kiln, Kiln)>,
    /// The best single-device cost (DAG-aware extraction after the algebraic phase), µs.
    pub single_us: f64,
    /// Applications per parallel rule.
    pub rules_applied: HashMap<String, usize>,
    /// Why each phase stopped.
    pub stop_reasons: (String, String),
}

/// Phases 1 and 2 of the module doc: the algebraic rules, then the parallel rules.
pub(crate) fn saturate(g: &Graph, opts: &JointOptions) -> Result<Saturated, String> {
    let k = opts.k.max(1);
    kiln_ir::verify::verify(g).map_err(|e| e.to_string())?;
    let eo = &opts.eqsat;
    let (eg, roots) = convert::to_egraph(g, eo.fold_limit).map_err(|e| e.to_string())?;
    let mut alg = rules::all();
    match &eo.rules {
        Some(keep) => alg.retain(|r| keep.iter().any(|k| k == r.name.as_str())),
        None => alg.retain(|r| joint_rule(r.name.as_str())),
    }
    let runner: Runner<_, _, ()> = Runner::default()
        .with_egraph(eg)
        .with_iter_limit(eo.iter_limit)
        .with_node_limit(eo.node_limit)
        .with_time_limit(eo.time_limit)
        .run(&alg);
    let model = Analytical {
        device: opts.device.clone(),
    };
    let stop_alg = format!("{:?}", runner.stop_reason);
    let eg = runner.egraph;
    let roots: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    // the best single-device choice, for the report
    let single_costs = extract::node_costs(&eg, &model);
    let single_tree = extract::greedy(&eg, &single_costs);
    let (single_choice, _) = extract::dag(
        &eg,
        &single_costs,
        &roots,
        single_tree,
        eo.extract_time_limit,
    );
    let single_us = extract::dag_cost(&eg, &single_costs, &single_choice, &roots);

    let twins: Twins = Arc::new(Mutex::new(Vec::new()));
    let prules = parallel_rules(k, &twins);
    let node_limit = eg.total_number_of_nodes() + eo.node_limit;
    let runner: Runner<_, _, ()> = Runner::default()
        .with_egraph(eg)
        .with_iter_limit(eo.iter_limit.max(24))
        .with_node_limit(node_limit)
        .with_time_limit(eo.time_limit)
        .run(&prules);
    let mut rules_applied: HashMap<String, usize> = HashMap::new();
    for it in &runner.iterations {
        for (r, n) in &it.applied {
            if *n > 0 {
                *rules_applied.entry(r.to_string()).or_default() += n;
            }
        }
    }
    let stop_par = format!("{:?}", runner.stop_reason);
    let eg = runner.egraph;
    let roots: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    drop(prules);
    let twins = Arc::try_unwrap(twins)
        .map(|m| m.into_inner().unwrap_or_default())
        .unwrap_or_default();
    Ok(Saturated {
        eg,
        roots,
        twins,
        single_us,
        rules_applied,
        stop_reasons: (stop_alg, stop_par),
    })
}

/// Searches algebraic rewrites and the tensor parallelism of a group of `opts.k` ranks
/// together (see the module doc).
pub fn optimize(g: &Graph, opts: &JointOptions) -> Result<JointResult, String> {
    let t0 = Instant::now();
    let k = opts.k.max(1);
    let Saturated {
        eg,
        roots,
        twins,
        single_us,
        rules_applied,
        stop_reasons,
    } = saturate(g, opts)?;
    let eo = &opts.eqsat;
    let model = Analytical {
        device: opts.device.clone(),
    };
    let costs = joint_costs(&eg, &model, k, &opts.link);
    let tree = extract::greedy(&eg, &costs);
    let (dag, _) = extract::dag(&eg, &costs, &roots, tree.clone(), eo.extract_time_limit);
    let (choice, cost_us) = [tree, dag]
        .into_iter()
        .map(|c| {
            let v = extract::dag_cost(&eg, &costs, &c, &roots);
            (c, v)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("two candidates");
    if !cost_us.is_finite() {
        return Err("no well-typed extraction".into());
    }
    let twin_map: HashMap<Kiln, Kiln> = twins
        .iter()
        .map(|(l, g)| (l.clone().map_children(|c| eg.find(c)), g.clone()))
        .collect();
    let mut gl = Globalize {
        eg: &eg,
        choice: &choice,
        twins: twin_map,
        out: HashMap::new(),
        splits: Vec::new(),
    };
    for &r in &roots {
        gl.walk(r)?;
    }
    let (collectives, collective_list) = count_collectives(&eg, &choice, &roots);
    let (graph, values) =
        convert::to_graph_traced(&eg, &roots, &gl.out, g).map_err(|e| e.to_string())?;
    let prod = graph.producers();
    let mut splits = Vec::new();
    let mut seen = HashSet::new();
    for (c, kind) in gl.splits {
        let Some(&v) = values.get(&eg.find(c)) else {
            continue;
        };
        let Some(node) = prod[v] else { continue };
        if !seen.insert(node) {
            continue;
        }
        let w = graph.nodes[node].inputs.get(1).copied().flatten();
        let dims = w.and_then(|w| graph.values[w].fact.shape.as_known());
        // MatMul weight [K, N]; Conv weight [OC, C, kh, kw]
        let len = match (dims.as_deref(), kind) {
            (Some([_, n]), SplitKind::Column) | (Some([_, n, _, _]), SplitKind::Row) => *n,
            (Some([kk, _]), SplitKind::Row) | (Some([kk, _, _, _]), SplitKind::Column) => *kk,
            _ => continue,
        };
        splits.push(NodeSplit {
            node,
            kind,
            sizes: vec![len / k; k],
        });
    }
    splits.sort_by_key(|s| s.node);
    let mut rules_applied: Vec<(String, usize)> = rules_applied.into_iter().collect();
    rules_applied.sort();
    Ok(JointResult {
        graph,
        splits,
        cost_us,
        single_us,
        collectives,
        collective_list,
        rules_applied,
        egraph_nodes: eg.total_number_of_nodes(),
        stop_reasons,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn count_collectives(
    eg: &EG,
    choice: &HashMap<Id, Kiln>,
    roots: &[Id],
) -> ((usize, usize), Vec<String>) {
    let mut seen = HashSet::new();
    let mut stack: Vec<Id> = roots.to_vec();
    let (mut gathers, mut reduces) = (0, 0);
    let mut list = Vec::new();
    while let Some(c) = stack.pop() {
        let c = eg.find(c);
        if !seen.insert(c) {
            continue;
        }
        let Some(n) = choice.get(&c) else { continue };
        let shape = || {
            eg[c]
                .data
                .fact()
                .map_or(String::new(), |f| f.shape.to_string())
        };
        match n {
            Kiln::Gather(_) => {
                gathers += 1;
                list.push(format!("all-gather {}", shape()));
            }
            Kiln::AllReduce(_) => {
                reduces += 1;
                list.push(format!("all-reduce {}", shape()));
            }
            _ => {}
        }
        stack.extend(n.children().iter().copied());
    }
    list.sort();
    ((gathers, reduces), list)
}
