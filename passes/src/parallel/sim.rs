//! The simulator: predicted latency, throughput and memory of a [`ParallelPlan`] on a
//! [`Cluster`] for a batch.
//!
//! What it models (and what it does not):
//!
//! * **Compute.** Each stage's sharding comes from [`propagate`] (a data-parallel stage:
//!   every stage input with the batch axis split on axis 0 into the ranks' rows; a
//!   tensor-parallel stage: its splits). Every node costs, on every rank, the
//!   [`CostModel`] of that rank's device evaluated on the rank's *local* shapes (an
//!   [`Analytical`] roofline with the SKU's peak for the graph's float type, bandwidth and
//!   launch overhead, or measured times). Elementwise nodes fused into a producer cost
//!   their arithmetic only ([`crate::eqsat::cost::graph_cost`]'s rule).
//! * **Collectives** inside a stage (all-reduce of Row partial sums, all-gathers where a
//!   sharding cannot be followed) use α-β formulas on the slowest link of the group: ring
//!   all-reduce `2(n-1)/n · bytes / bw + 2(n-1) α`, ring all-gather `(n-1) · max shard
//!   bytes / bw + (n-1) α`, each plus one launch overhead of the device (a collective is
//!   a kernel or a library call). They do **not** overlap compute: the nodes between two
//!   collectives run on every rank, each collective waits for the slowest rank, so a
//!   stage's time is `Σ_segments max_rank compute + Σ collectives`.
//! * **Stage boundaries.** Values crossing to a later stage (and graph outputs going to
//!   rank 0) are made replicated by the producing stage (counted in it as collectives) and
//!   sent point to point (`α + bytes / bw`, plus `α` per doubling of the receiving group
//!   for a pipelined broadcast). Sends are asynchronous: they **overlap** the next
//!   micro-batch's compute on both sides, so a link behaves as its own pipeline stage.
//! * **Pipeline.** With `m` micro-batches of `B / m` rows, each stage and each boundary
//!   link is a server with time `t_i` per micro-batch: latency `= Σ t_i + (m - 1) · max
//!   t_i` (fill + steady state), throughput `= B / (m · max t_i)` samples per second for a
//!   stream of batches.
//! * **Memory** per rank: its weight shards (split weights, locally sliced constants) plus
//!   the peak of live activations of one micro-batch (local shapes, freed after their last
//!   use in the stage) plus the stage inputs of the micro-batches in flight. A plan whose
//!   memory exceeds a device's capacity is infeasible.
//!
//! Micro-batch shapes: a value's axis 0 is "the batch" when the value is not a constant
//! and its axis 0 has the batch size `B`, or when a data-parallel stage splits it on
//! axis 0 (after the split, its local part); such axes are divided by `m`. A [`StageMode::DataParallel`] stage's `batch` are the rows of
//! one micro-batch per rank (they sum to `B / m`).

use super::cluster::{Cluster, DeviceSpec, Link};
use super::plan::{NodeSplit, ParallelPlan, Sharding, SplitKind, Stage, StageMode};
use super::propagate::{local_shape, propagate, Collective, Propagation};
use crate::eqsat::cost::{is_contraction, Analytical, CostModel, Device, Measured};
use kiln_ir::{DType, Fact, Graph, Op, Shape, ValueId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::Arc;

/// Options of the simulator.
#[derive(Clone, Debug, Default)]
pub struct SimOptions {
    /// Measured op times (µs by op signature, from the tuning database) for CPU ranks.
    pub measured_cpu_us: Arc<HashMap<String, f64>>,
}

/// Predicted time of a run of consecutive nodes of one stage.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpGroupTime {
    /// The nodes.
    pub nodes: Range<usize>,
    /// Slowest rank's compute, µs per micro-batch.
    pub compute_us: f64,
    /// Collectives run before the group's first node, µs per micro-batch.
    pub comm_us: f64,
}

/// Prediction of one stage, per micro-batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StagePrediction {
    /// Stage time (compute of the slowest rank per segment + collectives), µs.
    pub time_us: f64,
    /// Compute per rank of the stage (no waiting), µs.
    pub rank_compute_us: Vec<f64>,
    /// Collectives inside the stage (incl. the gathers at its end), µs.
    pub comm_us: f64,
    /// Sending the stage's results to later stages / rank 0, µs.
    pub send_us: f64,
    /// Runs of nodes split at each split contraction and each collective.
    pub groups: Vec<OpGroupTime>,
}

/// Prediction of a whole plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// Time of one batch, µs.
    pub latency_us: f64,
    /// Samples per second for a stream of batches.
    pub throughput: f64,
    /// Per micro-batch time of the slowest pipeline server (stage or link), µs.
    pub bottleneck_us: f64,
    /// Per stage.
    pub stages: Vec<StagePrediction>,
    /// Bytes each rank needs (weights + activations).
    pub memory_bytes: Vec<f64>,
    /// Bytes each rank has.
    pub capacity_bytes: Vec<f64>,
    /// Whether every rank's memory fits.
    pub feasible: bool,
}

/// The sharding of a split contraction's weight (input 1) on its ranks.
pub fn weight_sharding(g: &Graph, sp: &NodeSplit) -> Sharding {
    use kiln_ir::ops::linalg::LinalgOp;
    let trans_b = matches!(&g.nodes[sp.node].op, Op::Linalg(LinalgOp::Gemm(gm)) if gm.trans_b);
    let conv = !matches!(&g.nodes[sp.node].op, Op::Linalg(_));
    let axis = match (sp.kind, trans_b || conv) {
        (SplitKind::Column, false) | (SplitKind::Row, true) => 1,
        _ => 0,
    };
    Sharding::Split {
        axis,
        sizes: sp.sizes.clone(),
    }
}

/// Simulates plans of one graph on one cluster for one batch size (costs are cached
/// across calls, so a search reuses one simulator).
pub struct Simulator<'a> {
    g: &'a Graph,
    cluster: &'a Cluster,
    batch: usize,
    /// Distinct device specs and their cost models.
    models: Vec<Box<dyn CostModel + 'a>>,
    /// Index into `models` per rank.
    model_of_rank: Vec<usize>,
    /// Elementwise nodes fused into a neighbour.
    fused: Vec<bool>,
    /// Values whose axis 0 is the batch.
    batch_value: Vec<bool>,
    /// Last node using each value (`usize::MAX`: a graph output).
    last_use: Vec<usize>,
    producers: Vec<Option<usize>>,
    cache: RefCell<HashMap<u64, f64>>,
}

/// The arithmetic peak to use for a graph: f16 peak when most weight bytes are 16-bit.
/// The analytical cost model's description of a device running `g` (its f16 peak when
/// most constant bytes are f16/bf16).
pub fn device_of(spec: &DeviceSpec, g: &Graph) -> Device {
    let peak = peak_for(spec, g);
    // The f32 GEMM of a GPU splits K when its tiles do not fill the SMs; the tensor-core
    // kernels (the f16 peak) do not by default.
    let simt_f32 = spec.parallel_units > 1.0 && peak == spec.peak_gflops_f32;
    Device {
        name: spec.name.clone(),
        peak_gflops: peak,
        bandwidth_gbs: spec.bandwidth_gbs,
        launch_us: spec.launch_us,
        parallel_units: spec.parallel_units,
        tile_elems: spec.tile_elems,
        max_split_k: if simt_f32 { 8 } else { 1 },
        // the parallel plans' throughput model: no per-step latency bound (its relative
        // device speeds are what the shares follow)
        k_step_us: 0.0,
    }
}

fn peak_for(spec: &DeviceSpec, g: &Graph) -> f64 {
    let mut half = 0usize;
    let mut all = 0usize;
    for v in &g.values {
        if let Some(t) = v.fact.value() {
            all += t.byte_size();
            if matches!(v.fact.dtype, DType::F16 | DType::BF16) {
                half += t.byte_size();
            }
        }
    }
    if half * 2 > all {
        spec.peak_gflops_f16
    } else {
        spec.peak_gflops_f32
    }
}

fn known(f: &Fact) -> Vec<usize> {
    f.shape
        .dims()
        .iter()
        .map(|d| d.known().unwrap_or(1))
        .collect()
}

fn bytes_of(f: &Fact, shape: &[usize]) -> f64 {
    shape.iter().product::<usize>() as f64 * f.dtype.size_of().max(1) as f64
}

impl<'a> Simulator<'a> {
    /// A simulator of `g` (axis 0 of its non-constant inputs is the batch `batch`) on
    /// `cluster`.
    pub fn new(
        g: &'a Graph,
        cluster: &'a Cluster,
        batch: usize,
        opts: &SimOptions,
    ) -> Result<Simulator<'a>, String> {
        if batch == 0 {
            return Err("batch must be at least 1".into());
        }
        if cluster.is_empty() {
            return Err("the cluster has no device".into());
        }
        for &i in &g.inputs {
            let f = &g.values[i].fact;
            if f.value.is_none() && f.shape.rank() > 0 {
                let d0 = f.shape.dims()[0].known();
                if d0 != Some(batch) {
                    return Err(format!(
                        "graph input '{}': axis 0 is {d0:?}, not the batch {batch} (specialize the graph to the batch first)",
                        g.values[i].name
                    ));
                }
            }
        }
        let mut models: Vec<Box<dyn CostModel + 'a>> = Vec::new();
        let mut specs: Vec<&Arc<DeviceSpec>> = Vec::new();
        let mut model_of_rank = Vec::new();
        for d in &cluster.devices {
            let k = match specs
                .iter()
                .position(|s| Arc::ptr_eq(s, &d.spec) || **s == d.spec)
            {
                Some(k) => k,
                None => {
                    let dev = device_of(&d.spec, g);
                    let a = Analytical { device: dev };
                    if d.spec.is_cpu && !opts.measured_cpu_us.is_empty() {
                        models.push(Box::new(Measured {
                            base: a,
                            times_us: opts.measured_cpu_us.clone(),
                        }));
                    } else {
                        models.push(Box::new(a));
                    }
                    specs.push(&d.spec);
                    specs.len() - 1
                }
            };
            model_of_rank.push(k);
        }
        let producers = g.producers();
        let uses = g.use_counts();
        let fused = g
            .nodes
            .iter()
            .map(|n| {
                matches!(n.op, Op::Elementwise(_))
                    && n.inputs.iter().flatten().any(|&i| {
                        producers[i].is_some_and(|p| {
                            let po = &g.nodes[p].op;
                            uses[i] == 1 && (is_contraction(po) || matches!(po, Op::Elementwise(_)))
                        })
                    })
            })
            .collect();
        let batch_value = g
            .values
            .iter()
            .map(|v| {
                v.fact.value.is_none()
                    && v.fact.shape.dims().first().and_then(|d| d.known()) == Some(batch)
            })
            .collect();
        let mut last_use = vec![0usize; g.values.len()];
        for (ni, n) in g.nodes.iter().enumerate() {
            for &i in n.inputs.iter().flatten() {
                last_use[i] = ni;
            }
        }
        for &o in &g.outputs {
            last_use[o] = usize::MAX;
        }
        Ok(Simulator {
            g,
            cluster,
            batch,
            models,
            model_of_rank,
            fused,
            batch_value,
            last_use,
            producers,
            cache: RefCell::new(HashMap::new()),
        })
    }

    /// The last node reading each value (`usize::MAX` for graph outputs).
    pub fn last_use(&self) -> &[usize] {
        &self.last_use
    }

    /// Whether axis 0 of value `v` is the batch.
    pub fn is_batch_value(&self, v: ValueId) -> bool {
        self.batch_value[v]
    }

    /// Per-node cost of the whole graph on rank `rank` alone with `micro` micro-batches, µs.
    pub fn single_node_costs(&self, rank: usize, micro: usize) -> Vec<f64> {
        let p = Propagation {
            sharding: vec![None; self.g.values.len()],
            ..Default::default()
        };
        let none = HashMap::new();
        (0..self.g.nodes.len())
            .map(|ni| self.node_cost(ni, &p, &none, rank, 0, micro))
            .collect()
    }

    /// The graph.
    pub fn graph(&self) -> &'a Graph {
        self.g
    }

    /// The cluster.
    pub fn cluster(&self) -> &'a Cluster {
        self.cluster
    }

    /// The batch size.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The sharding propagation of a stage (see the module doc for data-parallel stages).
    /// `micro`: the number of micro-batches.
    pub fn propagation(&self, stage: &Stage, micro: usize) -> Result<Propagation, String> {
        match &stage.mode {
            StageMode::DataParallel { batch } => {
                let rows: usize = batch.iter().sum();
                if rows * micro != self.batch {
                    return Err(format!(
                        "data-parallel slices {batch:?} add up to {rows} rows, the micro-batch has {}",
                        self.batch / micro
                    ));
                }
                let sizes: Vec<usize> = batch.iter().map(|b| b * micro).collect();
                let inputs: Vec<(ValueId, Sharding)> = self
                    .stage_inputs(&stage.nodes)
                    .into_iter()
                    .filter(|&v| self.batch_value[v])
                    .map(|v| {
                        (
                            v,
                            Sharding::Split {
                                axis: 0,
                                sizes: sizes.clone(),
                            },
                        )
                    })
                    .collect();
                propagate(self.g, stage.nodes.clone(), &inputs, &[])
            }
            StageMode::TensorParallel { splits } => {
                propagate(self.g, stage.nodes.clone(), &[], splits)
            }
        }
    }

    /// Non-constant values read by `nodes` and produced before them (or graph inputs).
    pub fn stage_inputs(&self, nodes: &Range<usize>) -> Vec<ValueId> {
        let mut out = Vec::new();
        for n in &self.g.nodes[nodes.clone()] {
            for &i in n.inputs.iter().flatten() {
                let from_before = match self.producers[i] {
                    Some(p) => p < nodes.start,
                    None => self.g.values[i].fact.value.is_none(),
                };
                if from_before && !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        out
    }

    /// Local shape of value `v` on group rank `i` under sharding `s`, per micro-batch.
    fn local(&self, v: ValueId, s: Option<&Sharding>, i: usize, micro: usize) -> Vec<usize> {
        let f = &self.g.values[v].fact;
        let mut sh = match s {
            Some(s) => local_shape(&known(f), s, i),
            None => known(f),
        };
        // Axis 0 carries the batch: a value whose axis 0 is the batch, or one split on
        // axis 0 (only data-parallel stages split axis 0; the split follows reshapes that
        // merge the batch with other axes, e.g. [B, T, C] → [B·T, C]).
        let split0 = matches!(s, Some(Sharding::Split { axis: 0, .. }));
        if micro > 1 && (self.batch_value[v] || split0) {
            if let Some(d) = sh.first_mut() {
                *d = d.div_ceil(micro);
            }
        }
        sh
    }

    /// Cost of node `ni` on rank `rank` (group index `gi`) under `p`, per micro-batch.
    fn node_cost(
        &self,
        ni: usize,
        p: &Propagation,
        wsplit: &HashMap<usize, Sharding>,
        rank: usize,
        gi: usize,
        micro: usize,
    ) -> f64 {
        let n = &self.g.nodes[ni];
        let ins: Vec<Option<(ValueId, Vec<usize>)>> = n
            .inputs
            .iter()
            .enumerate()
            .map(|(k, v)| {
                v.map(|v| {
                    let s = if k == 1 && wsplit.contains_key(&ni) {
                        wsplit[&ni].clone()
                    } else if p.reads_gathered(ni, k) {
                        p.slice_of(ni, k).cloned().unwrap_or(Sharding::Replicated)
                    } else {
                        p.slice_of(ni, k)
                            .cloned()
                            .or_else(|| p.sharding[v].clone())
                            .unwrap_or(Sharding::Replicated)
                    };
                    (v, self.local(v, Some(&s), gi, micro))
                })
            })
            .collect();
        let outs: Vec<Vec<usize>> = n
            .outputs
            .iter()
            .map(|&o| self.local(o, p.sharding[o].as_ref(), gi, micro))
            .collect();
        let model = self.model_of_rank[rank];
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (ni, model, &ins, &outs).hash(&mut h);
        let key = h.finish();
        if let Some(&c) = self.cache.borrow().get(&key) {
            return c;
        }
        let in_facts: Vec<Option<Fact>> = ins
            .iter()
            .map(|x| {
                x.as_ref().map(|(v, s)| {
                    let f = &self.g.values[*v].fact;
                    Fact::new(f.dtype, Shape::known(s))
                })
            })
            .collect();
        let in_refs: Vec<Option<&Fact>> = in_facts.iter().map(|f| f.as_ref()).collect();
        let out_facts: Vec<Fact> = n
            .outputs
            .iter()
            .zip(&outs)
            .map(|(&o, s)| Fact::new(self.g.values[o].fact.dtype, Shape::known(s)))
            .collect();
        let c = self.models[model].op_cost(&n.op, &in_refs, &out_facts, self.fused[ni]);
        self.cache.borrow_mut().insert(key, c);
        c
    }

    /// The weight sharding of each split node of a stage.
    fn weight_splits(&self, stage: &Stage) -> HashMap<usize, Sharding> {
        match &stage.mode {
            StageMode::TensorParallel { splits } => splits
                .iter()
                .map(|s| (s.node, weight_sharding(self.g, s)))
                .collect(),
            _ => HashMap::new(),
        }
    }

    /// Time of a collective over `ranks`, per micro-batch, µs.
    pub fn collective_us(&self, c: &Collective, ranks: &[usize], micro: usize) -> f64 {
        let n = ranks.len() as f64;
        if ranks.len() < 2 {
            return 0.0;
        }
        let link = self.cluster.group_link(ranks);
        let v = c.value();
        let f = &self.g.values[v].fact;
        let full = bytes_of(f, &self.local(v, None, 0, micro));
        let bw = link.bandwidth_gbs * 1e3; // bytes per µs
                                           // A collective is a kernel (NCCL) or a library call (MPI): one launch overhead.
        let launch = ranks
            .iter()
            .map(|&r| self.cluster.devices[r].spec.launch_us)
            .fold(0.0, f64::max);
        launch
            + match c {
                Collective::AllReduce { .. } => {
                    2.0 * (n - 1.0) / n * full / bw + 2.0 * (n - 1.0) * link.latency_us
                }
                Collective::AllGather { sizes, .. } => {
                    let len: usize = sizes.iter().sum::<usize>().max(1);
                    let max = *sizes.iter().max().unwrap_or(&0) as f64 / len as f64;
                    (n - 1.0) * max * full / bw + (n - 1.0) * link.latency_us
                }
            }
    }

    /// Simulates the nodes `window` of a stage (a part of its nodes, for the search; the
    /// whole stage in [`Simulator::stage`]) under the propagation `p`: per-rank compute,
    /// collectives placed before nodes in the window (and those after its last node when
    /// `count_end`), op groups.
    pub fn stage_window(
        &self,
        stage: &Stage,
        p: &Propagation,
        window: Range<usize>,
        micro: usize,
        with_groups: bool,
        count_end: bool,
    ) -> StagePrediction {
        let mut colls: Vec<(usize, f64)> = p
            .collectives
            .iter()
            .filter(|(at, _)| window.contains(at) || *at == window.end && count_end)
            .map(|(at, c)| (*at, self.collective_us(c, &stage.ranks, micro)))
            .collect();
        colls.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let wsplit = self.weight_splits(stage);
        let nr = stage.ranks.len();
        let mut rank_total = vec![0.0; nr];
        let mut seg = vec![0.0f64; nr];
        let mut grp = vec![0.0f64; nr];
        let mut time = 0.0;
        let mut comm = 0.0;
        let mut groups: Vec<OpGroupTime> = Vec::new();
        let mut gstart = window.start;
        let mut gcomm = 0.0;
        let mut ci = 0;
        let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        let g = self.g;
        for ni in window.clone() {
            let has_coll = ci < colls.len() && colls[ci].0 == ni;
            // Op groups (for reports) start at collectives, split nodes and contractions
            // with a constant weight; only collectives synchronise the ranks.
            let group_start = has_coll
                || wsplit.contains_key(&ni)
                || is_contraction(&g.nodes[ni].op)
                    && g.nodes[ni]
                        .inputs
                        .get(1)
                        .copied()
                        .flatten()
                        .is_some_and(|w| g.const_value(w).is_some());
            if with_groups && group_start && ni > gstart {
                groups.push(OpGroupTime {
                    nodes: gstart..ni,
                    compute_us: max(&grp),
                    comm_us: gcomm,
                });
                grp.iter_mut().for_each(|s| *s = 0.0);
                gstart = ni;
                gcomm = 0.0;
            }
            if has_coll {
                time += max(&seg);
                seg.iter_mut().for_each(|s| *s = 0.0);
                while ci < colls.len() && colls[ci].0 == ni {
                    time += colls[ci].1;
                    comm += colls[ci].1;
                    gcomm += colls[ci].1;
                    ci += 1;
                }
            }
            for (gi, &r) in stage.ranks.iter().enumerate() {
                let c = self.node_cost(ni, p, &wsplit, r, gi, micro);
                seg[gi] += c;
                grp[gi] += c;
                rank_total[gi] += c;
            }
        }
        time += max(&seg);
        if with_groups && window.end > gstart {
            groups.push(OpGroupTime {
                nodes: gstart..window.end,
                compute_us: max(&grp),
                comm_us: gcomm,
            });
        }
        for (_, c) in &colls[ci..] {
            time += c;
            comm += c;
        }
        StagePrediction {
            time_us: time,
            rank_compute_us: rank_total,
            comm_us: comm,
            send_us: 0.0,
            groups,
        }
    }

    /// Time to send a stage's boundary values to the ranks `to`, µs per micro-batch.
    fn send_us(&self, values: &[ValueId], from: &[usize], to: &[usize], micro: usize) -> f64 {
        if values.is_empty()
            || to.is_empty()
            || from.iter().any(|r| to.contains(r)) && to.len() == 1
        {
            return 0.0;
        }
        let link: Link = self.cluster.link(from[0], to[0]);
        let bytes: f64 = values
            .iter()
            .map(|&v| bytes_of(&self.g.values[v].fact, &self.local(v, None, 0, micro)))
            .sum();
        let hops = (to.len() as f64).log2().ceil();
        link.transfer_us(bytes) + hops * link.latency_us
    }

    /// Peak bytes of one rank of a stage: weights (shards) + live activations.
    fn stage_memory(
        &self,
        stage: &Stage,
        p: &Propagation,
        gi: usize,
        micro: usize,
        in_flight: usize,
    ) -> f64 {
        let g = self.g;
        let mut weights: HashMap<ValueId, f64> = HashMap::new();
        let wsplit = self.weight_splits(stage);
        let mut live: HashMap<ValueId, f64> = HashMap::new();
        let mut cur = 0.0;
        for v in self.stage_inputs(&stage.nodes) {
            let b = bytes_of(
                &g.values[v].fact,
                &self.local(v, p.sharding[v].as_ref(), gi, micro),
            );
            cur += b * (1 + in_flight) as f64;
            live.insert(v, b * (1 + in_flight) as f64);
        }
        let mut peak = cur;
        for ni in stage.nodes.clone() {
            let n = &g.nodes[ni];
            for (k, v) in n.inputs.iter().enumerate() {
                let Some(v) = *v else { continue };
                let f = &g.values[v].fact;
                if f.value.is_some() && self.producers[v].is_none() {
                    let full = bytes_of(f, &known(f));
                    let b = match (wsplit.get(&ni), p.slice_of(ni, k)) {
                        (Some(s), _) if k == 1 => bytes_of(f, &local_shape(&known(f), s, gi)),
                        (_, Some(s)) => bytes_of(f, &local_shape(&known(f), s, gi)),
                        _ => full,
                    };
                    let e = weights.entry(v).or_insert(0.0);
                    *e = e.max(b);
                }
            }
            for &o in &n.outputs {
                let b = bytes_of(
                    &g.values[o].fact,
                    &self.local(o, p.sharding[o].as_ref(), gi, micro),
                );
                cur += b;
                live.insert(o, b);
            }
            peak = peak.max(cur);
            for v in n.inputs.iter().flatten() {
                if self.last_use[*v] == ni {
                    if let Some(b) = live.remove(v) {
                        cur -= b;
                    }
                }
            }
        }
        weights.values().sum::<f64>() + peak
    }

    /// Values produced by `nodes` that are read after them, or graph outputs.
    fn boundary_values(&self, nodes: &Range<usize>) -> (Vec<ValueId>, Vec<ValueId>) {
        let mut later = Vec::new();
        let mut outs = Vec::new();
        for n in &self.g.nodes[nodes.clone()] {
            for &o in &n.outputs {
                if self.g.outputs.contains(&o) {
                    outs.push(o);
                }
                let lu = self.last_use[o];
                if lu != usize::MAX && lu >= nodes.end {
                    later.push(o);
                }
            }
        }
        (later, outs)
    }

    /// Simulates stage `si` of a plan (times per micro-batch, and each rank's memory).
    pub fn stage(
        &self,
        plan: &ParallelPlan,
        si: usize,
        with_groups: bool,
    ) -> Result<(StagePrediction, Vec<f64>), String> {
        let stage = &plan.stages[si];
        let micro = plan.micro_batches;
        let p = self
            .propagation(stage, micro)
            .map_err(|e| format!("stage {si}: {e}"))?;
        let mut sp = self.stage_window(stage, &p, stage.nodes.clone(), micro, with_groups, true);
        let (later, outs) = self.boundary_values(&stage.nodes);
        let mut send = 0.0;
        for next in plan.stages.iter().skip(si + 1) {
            let vals: Vec<ValueId> = later
                .iter()
                .copied()
                .filter(|&v| {
                    self.g.nodes[next.nodes.clone()]
                        .iter()
                        .any(|n| n.inputs.contains(&Some(v)))
                })
                .collect();
            send += self.send_us(&vals, &stage.ranks, &next.ranks, micro);
        }
        if !stage.ranks.contains(&0) {
            send += self.send_us(&outs, &stage.ranks, &[0], micro);
        }
        sp.send_us = send;
        let in_flight = micro.min(plan.stages.len() - si) - 1;
        let mem = (0..stage.ranks.len())
            .map(|gi| self.stage_memory(stage, &p, gi, micro, in_flight))
            .collect();
        Ok((sp, mem))
    }

    /// Simulates a whole plan (see the module doc).
    pub fn simulate(&self, plan: &ParallelPlan, with_groups: bool) -> Result<Prediction, String> {
        plan.validate(self.g.nodes.len())?;
        if plan.world != self.cluster.len() {
            return Err(format!(
                "the plan has {} ranks, the cluster {} devices",
                plan.world,
                self.cluster.len()
            ));
        }
        if !self.batch.is_multiple_of(plan.micro_batches) {
            return Err(format!(
                "{} micro-batches do not divide the batch {}",
                plan.micro_batches, self.batch
            ));
        }
        let mut stages = Vec::new();
        let mut memory = vec![0.0; plan.world];
        let mut servers = Vec::new();
        for si in 0..plan.stages.len() {
            let (sp, mem) = self.stage(plan, si, with_groups)?;
            for (gi, &r) in plan.stages[si].ranks.iter().enumerate() {
                memory[r] = mem[gi];
            }
            servers.push(sp.time_us);
            if sp.send_us > 0.0 {
                servers.push(sp.send_us);
            }
            stages.push(sp);
        }
        let m = plan.micro_batches as f64;
        let bottleneck = servers.iter().cloned().fold(0.0, f64::max);
        let latency = servers.iter().sum::<f64>() + (m - 1.0) * bottleneck;
        let capacity: Vec<f64> = self
            .cluster
            .devices
            .iter()
            .map(|d| d.spec.memory_bytes)
            .collect();
        let feasible = memory.iter().zip(&capacity).all(|(m, c)| m <= c);
        Ok(Prediction {
            latency_us: latency,
            throughput: self.batch as f64 / (m * bottleneck) * 1e6,
            bottleneck_us: bottleneck,
            stages,
            memory_bytes: memory,
            capacity_bytes: capacity,
            feasible,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::cluster::{Link, LinkKind};
    use crate::parallel::plan::{NodeSplit, SplitKind};
    use kiln_ir::ops::linalg::LinalgOp;
    use kiln_ir::{Node, Tensor};

    /// x[B,K] · W[K,N] → y: one MatMul.
    fn matmul(b: usize, k: usize, n: usize) -> Graph {
        let mut g = Graph {
            name: "mm".into(),
            opset: 17,
            ..Default::default()
        };
        let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[b, k])));
        g.inputs.push(x);
        let w = g.add_const("w", Tensor::zeros(DType::F32, &[k, n]));
        let y = g.add_value("y", Fact::new(DType::F32, Shape::known(&[b, n])));
        g.nodes.push(Node {
            name: "mm".into(),
            op: Op::Linalg(LinalgOp::MatMul),
            inputs: vec![Some(x), Some(w)],
            outputs: vec![y],
        });
        g.outputs.push(y);
        g
    }

    /// A device with round numbers: 1 GFLOP/s = 1000 flop/µs, 1 GB/s = 1000 B/µs, no launch.
    fn dev(gflops: f64, gbs: f64) -> DeviceSpec {
        DeviceSpec {
            name: format!("d{gflops}"),
            peak_gflops_f32: gflops,
            peak_gflops_f16: gflops,
            bandwidth_gbs: gbs,
            launch_us: 0.0,
            memory_bytes: 1e9,
            is_cpu: false,
            parallel_units: 1.0,
            tile_elems: 1.0,
        }
    }

    fn cluster(specs: &[DeviceSpec], link: Link) -> Cluster {
        Cluster {
            devices: specs
                .iter()
                .map(|s| super::super::cluster::ClusterDevice {
                    spec: Arc::new(s.clone()),
                    node: 0,
                    group: 0,
                })
                .collect(),
            intra_node: link,
            inter_node: link,
        }
    }

    const LINK: Link = Link {
        kind: LinkKind::Nvlink,
        bandwidth_gbs: 1.0,
        latency_us: 10.0,
    };

    #[test]
    fn single_device_time_is_the_roofline() {
        // 2·8·100·50 = 80000 flop at 1000 flop/µs = 80 µs; bytes (800+5000+400)·4 = 24800
        // at 1e6 B/µs ≈ 0.0248 µs: compute bound.
        let g = matmul(8, 100, 50);
        let c = cluster(&[dev(1.0, 1000.0)], LINK);
        let s = Simulator::new(&g, &c, 8, &SimOptions::default()).unwrap();
        let p = s.simulate(&ParallelPlan::single(1), true).unwrap();
        assert!((p.latency_us - 80.0).abs() < 1e-9, "{p:?}");
        assert!((p.throughput - 8.0 / 80e-6).abs() < 1e-3);
        // Memory: weights 100·50·4 = 20000 B + activations (x 3200 + y 1600).
        assert_eq!(p.memory_bytes, vec![20000.0 + 3200.0 + 1600.0]);
        assert!(p.feasible);
    }

    #[test]
    fn data_parallel_splits_rows_and_gathers_the_output() {
        let g = matmul(8, 100, 50);
        let c = cluster(&[dev(1.0, 1000.0), dev(1.0, 1000.0)], LINK);
        let s = Simulator::new(&g, &c, 8, &SimOptions::default()).unwrap();
        let plan = ParallelPlan {
            world: 2,
            stages: vec![Stage {
                nodes: 0..1,
                ranks: vec![0, 1],
                mode: StageMode::DataParallel { batch: vec![4, 4] },
            }],
            micro_batches: 1,
        };
        let p = s.simulate(&plan, false).unwrap();
        // 40 µs compute per rank; all-gather of y (8·50·4 = 1600 B): (n-1)·max shard
        // (800 B) / 1000 B/µs + (n-1)·10 µs = 0.8 + 10.
        assert!((p.latency_us - (40.0 + 10.8)).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn row_split_costs_an_all_reduce_and_halves_the_weight() {
        let g = matmul(8, 100, 50);
        let c = cluster(&[dev(1.0, 1000.0), dev(1.0, 1000.0)], LINK);
        let s = Simulator::new(&g, &c, 8, &SimOptions::default()).unwrap();
        let plan = ParallelPlan {
            world: 2,
            stages: vec![Stage {
                nodes: 0..1,
                ranks: vec![0, 1],
                mode: StageMode::TensorParallel {
                    splits: vec![NodeSplit {
                        node: 0,
                        kind: SplitKind::Row,
                        sizes: vec![60, 40],
                    }],
                },
            }],
            micro_batches: 1,
        };
        let p = s.simulate(&plan, true).unwrap();
        // The slower rank does 60% of 80 µs = 48 µs; all-reduce of 1600 B:
        // 2·(1/2)·1600/1000 + 2·10 = 21.6 µs.
        assert!((p.latency_us - (48.0 + 21.6)).abs() < 1e-9, "{p:?}");
        assert!((p.stages[0].comm_us - 21.6).abs() < 1e-9);
        // Rank 0 holds 60 of 100 weight rows.
        assert!(
            (p.memory_bytes[0] - (12000.0 + 3200.0 + 1600.0)).abs() < 1e-9,
            "{p:?}"
        );
    }

    #[test]
    fn pipeline_latency_is_fill_plus_steady_state() {
        // Two MatMuls on two single-device stages, 4 micro-batches.
        let mut g = matmul(8, 100, 100);
        let w2 = g.add_const("w2", Tensor::zeros(DType::F32, &[100, 100]));
        let z = g.add_value("z", Fact::new(DType::F32, Shape::known(&[8, 100])));
        let y = g.outputs[0];
        g.nodes.push(Node {
            name: "mm2".into(),
            op: Op::Linalg(LinalgOp::MatMul),
            inputs: vec![Some(y), Some(w2)],
            outputs: vec![z],
        });
        g.outputs = vec![z];
        let c = cluster(&[dev(1.0, 1e6), dev(1.0, 1e6)], LINK);
        let s = Simulator::new(&g, &c, 8, &SimOptions::default()).unwrap();
        let one = |r: usize, n: Range<usize>| Stage {
            nodes: n,
            ranks: vec![r],
            mode: StageMode::TensorParallel { splits: vec![] },
        };
        let plan = ParallelPlan {
            world: 2,
            stages: vec![one(0, 0..1), one(1, 1..2)],
            micro_batches: 4,
        };
        let p = s.simulate(&plan, false).unwrap();
        // Per micro-batch (2 rows): each stage 2·2·100·100/1000 = 40 µs (+ a tiny memory
        // term); send of y (2·100·4 = 800 B) = 10 + 0.8 µs; rank 1 sends z to rank 0:
        // 10.8 µs. Servers 40, 10.8, 40, 10.8 → latency 101.6 + 3·40.
        let t = p.stages[0].time_us;
        assert!((t - 40.0).abs() < 0.01, "{t}");
        assert!((p.stages[0].send_us - 10.8).abs() < 1e-9);
        assert!((p.stages[1].send_us - 10.8).abs() < 1e-9);
        let want = 2.0 * t + 2.0 * 10.8 + 3.0 * t;
        assert!(
            (p.latency_us - want).abs() < 0.05,
            "{} vs {want}",
            p.latency_us
        );
        assert!((p.throughput - 8.0 / (4.0 * t) * 1e6).abs() < 1.0);
    }

    #[test]
    fn plans_that_do_not_fit_are_infeasible() {
        let g = matmul(8, 1000, 1000);
        let mut small = dev(1.0, 1.0);
        small.memory_bytes = 3e6; // the 4 MB weight does not fit
        let c = cluster(&[small], LINK);
        let s = Simulator::new(&g, &c, 8, &SimOptions::default()).unwrap();
        let p = s.simulate(&ParallelPlan::single(1), false).unwrap();
        assert!(!p.feasible);
        // Wrong batch, wrong world: errors.
        assert!(Simulator::new(&g, &c, 4, &SimOptions::default()).is_err());
        let mut two = ParallelPlan::single(1);
        two.world = 2;
        assert!(s.simulate(&two, false).is_err());
    }
}
