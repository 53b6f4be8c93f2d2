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

use super::cluster::Link;
use super::plan::{NodeSplit, ParallelPlan, SplitKind, Stage, StageMode};
use crate::eqsat::analysis::{Data, KilnAnalysis, KilnEGraph, Kind};
use crate::eqsat::cost::{Analytical, CostModel, Device};
use crate::eqsat::dist::{self, Dist};
use crate::eqsat::language::Kiln;
use crate::eqsat::{convert, extract, rules, EqsatOptions};
use egg::{
    Applier, ENodeOrVar, Id, Language, Pattern, PatternAst, Rewrite, Runner, Subst, Symbol, Var,
};
use kiln_ir::{Graph, Tensor};
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

fn var(s: &str) -> Var {
    s.parse().expect("pattern variable")
}

fn int_leaf(eg: &mut EG, v: usize) -> Id {
    eg.add(Kiln::Int(v as i64))
}

fn is_weight(eg: &EG, c: Id) -> bool {
    eg[c].nodes.iter().any(|n| matches!(n, Kiln::Const(_)))
}

/// Joins `eclass` and `new` when both are values of the same layout and (global) type.
fn union_same(eg: &mut EG, eclass: Id, new: Id) -> Vec<Id> {
    let ok = {
        let (a, b) = (&eg[eclass].data, &eg[new].data);
        b.kind == Kind::Value
            && a.kind == Kind::Value
            && a.dist == b.dist
            && a.fact().map(|f| (&f.shape, f.dtype)) == b.fact().map(|f| (&f.shape, f.dtype))
    };
    if ok && eg.union(eclass, new) {
        vec![eclass]
    } else {
        vec![]
    }
}

/// Adds a local e-node, records its twin, and returns the replicated value it gives
/// (`gather` of a split part, `allreduce` of a partial sum) — `None` if the layout
/// analysis refuses it.
fn add_local(eg: &mut EG, twins: &Twins, local: Kiln, global: Kiln) -> Option<Id> {
    let l = eg.add(local.clone());
    let d: &Data = &eg[l].data;
    if d.kind != Kind::Value {
        return None;
    }
    let wrapped = match d.dist {
        Dist::Rep => return None,
        Dist::Split { axis, k } => {
            let (a, k) = (int_leaf(eg, axis), int_leaf(eg, k));
            Kiln::Gather([a, k, l])
        }
        Dist::Partial { k } => {
            let k = int_leaf(eg, k);
            Kiln::AllReduce([k, l])
        }
    };
    twins.lock().expect("twins").push((local, global));
    Some(eg.add(wrapped))
}

/// `tp-column`: `(matmul x W)` = `(gather -1 k (matmul x (shard 1 k W)))` for a constant
/// 2-D `W` whose columns divide by `k`.
struct Column {
    k: usize,
    twins: Twins,
}

impl Applier<Kiln, KilnAnalysis> for Column {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (x, w) = (subst[var("?x")], subst[var("?w")]);
        let ok = eg[eclass].data.dist == Dist::Rep
            && eg[x].data.dist == Dist::Rep
            && eg[x].data.shape().is_some_and(|s| s.len() >= 2)
            && is_weight(eg, w)
            && eg[w]
                .data
                .shape()
                .is_some_and(|s| s.len() == 2 && s[1] % self.k == 0 && s[1] >= self.k);
        if !ok {
            return vec![];
        }
        let (one, k) = (int_leaf(eg, 1), int_leaf(eg, self.k));
        let sw = eg.add(Kiln::Shard([one, k, w]));
        match add_local(eg, &self.twins, Kiln::MatMul([x, sw]), Kiln::MatMul([x, w])) {
            Some(new) => union_same(eg, eclass, new),
            None => vec![],
        }
    }

    fn vars(&self) -> Vec<Var> {
        vec![var("?x"), var("?w")]
    }
}

/// `tp-row`: `(matmul (gather last k y) W)` = `(allreduce k (matmul y (shard 0 k W)))` for
/// a constant 2-D `W`.
struct Row {
    k: usize,
    twins: Twins,
}

impl Applier<Kiln, KilnAnalysis> for Row {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (a, kk, y, w) = (
            subst[var("?a")],
            subst[var("?k")],
            subst[var("?y")],
            subst[var("?w")],
        );
        let ok = eg[eclass].data.dist == Dist::Rep
            && eg[y].data.dist
                == (Dist::Split {
                    axis: eg[y].data.shape().map_or(usize::MAX, |s| s.len() - 1),
                    k: self.k,
                })
            && is_weight(eg, w)
            && eg[w]
                .data
                .shape()
                .is_some_and(|s| s.len() == 2 && s[0] % self.k == 0);
        if !ok {
            return vec![];
        }
        let gy = eg.add(Kiln::Gather([a, kk, y]));
        let (zero, k) = (int_leaf(eg, 0), int_leaf(eg, self.k));
        let sw = eg.add(Kiln::Shard([zero, k, w]));
        match add_local(
            eg,
            &self.twins,
            Kiln::MatMul([y, sw]),
            Kiln::MatMul([gy, w]),
        ) {
            Some(new) => union_same(eg, eclass, new),
            None => vec![],
        }
    }

    fn vars(&self) -> Vec<Var> {
        ["?a", "?k", "?y", "?w"].iter().map(|v| var(v)).collect()
    }
}

/// The `group` of the Conv whose attribute leaf is class `o` (`None` if not a Conv).
fn conv_group(eg: &EG, o: Id) -> Option<usize> {
    let key = eg[o].data.attr?;
    match &eg.analysis.op(key)?.op {
        kiln_ir::Op::Nn(kiln_ir::ops::nn::NnOp::Conv(c)) => Some(c.group),
        _ => None,
    }
}

/// `tp-column-conv`: `(conv o x W b)` = `(gather 1 k (conv o x (shard 0 k W) (shard 0 k b)))`
/// for a constant `W` (group 1) whose output channels divide by `k`.
struct ColumnConv {
    k: usize,
    twins: Twins,
}

impl Applier<Kiln, KilnAnalysis> for ColumnConv {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (o, x, w, b) = (
            subst[var("?o")],
            subst[var("?x")],
            subst[var("?w")],
            subst[var("?b")],
        );
        let no_bias = eg[b].data.kind == Kind::None;
        let ok = eg[eclass].data.dist == Dist::Rep
            && eg[x].data.dist == Dist::Rep
            && conv_group(eg, o) == Some(1)
            && is_weight(eg, w)
            && (no_bias || is_weight(eg, b))
            && eg[w]
                .data
                .shape()
                .is_some_and(|s| s.len() == 4 && s[0] % self.k == 0 && s[0] >= self.k);
        if !ok {
            return vec![];
        }
        let (zero, k) = (int_leaf(eg, 0), int_leaf(eg, self.k));
        let sw = eg.add(Kiln::Shard([zero, k, w]));
        let sb = if no_bias {
            b
        } else {
            eg.add(Kiln::Shard([zero, k, b]))
        };
        let local = Kiln::Conv([o, x, sw, sb]);
        match add_local(eg, &self.twins, local, Kiln::Conv([o, x, w, b])) {
            Some(new) => union_same(eg, eclass, new),
            None => vec![],
        }
    }

    fn vars(&self) -> Vec<Var> {
        ["?o", "?x", "?w", "?b"].iter().map(|v| var(v)).collect()
    }
}

/// `tp-row-conv`: `(conv o (gather 1 k y) W b)` = `(allreduce k (conv o y (shard 1 k W)
/// none))` + `b` as `[C, 1, 1]` (the bias added once, after the sum).
struct RowConv {
    k: usize,
    twins: Twins,
}

impl Applier<Kiln, KilnAnalysis> for RowConv {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (o, a, kk, y, w, b) = (
            subst[var("?o")],
            subst[var("?a")],
            subst[var("?k")],
            subst[var("?y")],
            subst[var("?w")],
            subst[var("?b")],
        );
        let ok = eg[eclass].data.dist == Dist::Rep
            && eg[y].data.dist == (Dist::Split { axis: 1, k: self.k })
            && conv_group(eg, o) == Some(1)
            && is_weight(eg, w)
            && eg[w].data.shape().is_some_and(|s| s.len() == 4);
        if !ok {
            return vec![];
        }
        let bias = match eg[b].data.kind {
            Kind::None => None,
            _ => match eg[b].data.value() {
                Some(t) if t.rank() == 1 => Some(t.clone()),
                _ => return vec![],
            },
        };
        let gy = eg.add(Kiln::Gather([a, kk, y]));
        let none = eg.add(Kiln::NoneArg([]));
        let (one, k) = (int_leaf(eg, 1), int_leaf(eg, self.k));
        let sw = eg.add(Kiln::Shard([one, k, w]));
        let global = Kiln::Conv([o, gy, w, none]);
        eg.add(global.clone());
        let Some(sum) = add_local(eg, &self.twins, Kiln::Conv([o, y, sw, none]), global) else {
            return vec![];
        };
        let new = match bias {
            None => sum,
            Some(t) => {
                let c = t.shape()[0];
                let Ok(t3) = t.reshape(&[c, 1, 1]) else {
                    return vec![];
                };
                let key = eg.analysis.add_const(Arc::new(t3), None);
                let b3 = eg.add(Kiln::Const(key));
                eg.add(Kiln::Add([sum, b3]))
            }
        };
        union_same(eg, eclass, new)
    }

    fn vars(&self) -> Vec<Var> {
        ["?o", "?a", "?k", "?y", "?w", "?b"]
            .iter()
            .map(|v| var(v))
            .collect()
    }
}

/// `tp-sink-*`: an op applied to gathered / all-reduced inputs = the gather / all-reduce of
/// the op applied to the parts (for any op the layout analysis accepts on parts). A
/// replicated full-size operand of a binary op is sharded along the split axis.
struct Sink {
    lhs: Pattern<Kiln>,
    twins: Twins,
}

impl Sink {
    /// The class of a child sub-pattern (existing: the pattern matched), and the part it
    /// stands for when it is a `gather` / `allreduce`.
    fn child(&self, eg: &mut EG, subst: &Subst, at: Id) -> Option<(Id, Option<Id>)> {
        let ast = self.lhs.ast.as_ref();
        Some(match &ast[usize::from(at)] {
            ENodeOrVar::Var(v) => (subst[*v], None),
            ENodeOrVar::ENode(n) => {
                let vars: Vec<Id> = n
                    .children()
                    .iter()
                    .map(|&c| match &ast[usize::from(c)] {
                        ENodeOrVar::Var(v) => Some(subst[*v]),
                        ENodeOrVar::ENode(_) => None,
                    })
                    .collect::<Option<_>>()?;
                let part = *vars.last()?;
                let mut i = 0;
                let g = n.clone().map_children(|_| {
                    i += 1;
                    vars[i - 1]
                });
                (eg.add(g), Some(part))
            }
        })
    }
}

impl Applier<Kiln, KilnAnalysis> for Sink {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        if eg[eclass].data.dist != Dist::Rep {
            return vec![];
        }
        let ast = self.lhs.ast.as_ref();
        let ENodeOrVar::ENode(root) = &ast[ast.len() - 1] else {
            return vec![];
        };
        let mut globals = Vec::new();
        let mut locals = Vec::new();
        for &c in root.children() {
            let Some((g, part)) = self.child(eg, subst, c) else {
                return vec![];
            };
            globals.push(g);
            locals.push(part);
        }
        let build = |ids: &[Id]| {
            let mut i = 0;
            root.clone().map_children(|_| {
                i += 1;
                ids[i - 1]
            })
        };
        let global = build(&globals);
        let plain: Vec<Id> = globals
            .iter()
            .zip(&locals)
            .map(|(g, l)| l.unwrap_or(*g))
            .collect();
        if let Some(new) = add_local(eg, &self.twins, build(&plain), global.clone()) {
            return union_same(eg, eclass, new);
        }
        // A binary op with one split operand and a full-size replicated one: shard it too.
        let is_binary = matches!(
            root,
            Kiln::Add(_) | Kiln::Sub(_) | Kiln::Mul(_) | Kiln::Div(_)
        );
        if !is_binary {
            return vec![];
        }
        let Some(p) = locals.iter().position(|l| l.is_some()) else {
            return vec![];
        };
        let q = 1 - p;
        if locals[q].is_some() {
            return vec![];
        }
        let (Dist::Split { axis, k }, Some(ps), Some(qs), Some(os)) = (
            eg[plain[p]].data.dist,
            eg[plain[p]].data.shape(),
            eg[plain[q]].data.shape(),
            eg[eclass].data.shape(),
        ) else {
            return vec![];
        };
        let oa = axis + os.len() - ps.len();
        let Some(qa) = (oa + qs.len()).checked_sub(os.len()) else {
            return vec![];
        };
        if qs[qa] != os[oa] {
            return vec![];
        }
        let (a, kk) = (int_leaf(eg, qa), int_leaf(eg, k));
        let sq = eg.add(Kiln::Shard([a, kk, plain[q]]));
        let mut ids = plain.clone();
        ids[q] = sq;
        match add_local(eg, &self.twins, build(&ids), global) {
            Some(new) => union_same(eg, eclass, new),
            None => vec![],
        }
    }

    fn vars(&self) -> Vec<Var> {
        self.lhs.vars()
    }
}

/// `tp-sink-reshape`: `(reshape (gather a k y) s)` = `(gather b k (reshape y s'))` where the
/// split axis stays a block of whole chunks (`s'`: the output shape with axis `b` / k).
struct SinkReshape {
    k: usize,
    twins: Twins,
}

impl Applier<Kiln, KilnAnalysis> for SinkReshape {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (a, kk, y, s) = (
            subst[var("?a")],
            subst[var("?k")],
            subst[var("?y")],
            subst[var("?s")],
        );
        let k = self.k;
        let (Some(ax), Some(mut is), Some(os)) = (
            eg[a].data.int.and_then(|v| usize::try_from(v).ok()),
            eg[y].data.shape(),
            eg[eclass].data.shape(),
        ) else {
            return vec![];
        };
        if eg[eclass].data.dist != Dist::Rep || ax >= is.len() {
            return vec![];
        }
        is[ax] *= k;
        let Some((b, sizes)) = super::propagate::map_reshape(&is, &os, ax, &vec![is[ax] / k; k])
        else {
            return vec![];
        };
        if sizes.iter().any(|&z| z * k != os[b]) || sizes[0] < 2 || is[ax] / k < 2 {
            return vec![];
        }
        let mut local = os.clone();
        local[b] /= k;
        let t = Tensor::from_vec(
            &[local.len()],
            local.iter().map(|&d| d as i64).collect::<Vec<_>>(),
        );
        let key = eg.analysis.add_const(Arc::new(t), None);
        let sl = eg.add(Kiln::Const(key));
        let gy = eg.add(Kiln::Gather([a, kk, y]));
        match add_local(
            eg,
            &self.twins,
            Kiln::Reshape([y, sl]),
            Kiln::Reshape([gy, s]),
        ) {
            Some(new)
                if dist::reshape_axis(&eg[y].data.shape().unwrap_or_default(), &local, ax)
                    == Some(b) =>
            {
                union_same(eg, eclass, new)
            }
            _ => vec![],
        }
    }

    fn vars(&self) -> Vec<Var> {
        ["?a", "?k", "?y", "?s"].iter().map(|v| var(v)).collect()
    }
}

/// The parallel rules for a group of `k` (see the module doc), recording local e-nodes'
/// twins in `twins`.
fn parallel_rules(k: usize, twins: &Twins) -> Vec<Rewrite<Kiln, KilnAnalysis>> {
    let pat = |s: &str| -> Pattern<Kiln> { s.parse().expect("pattern") };
    let mut r = vec![
        Rewrite::new(
            "tp-column",
            pat("(matmul ?x ?w)"),
            Column {
                k,
                twins: twins.clone(),
            },
        )
        .expect("rule"),
        Rewrite::new(
            "tp-row",
            pat("(matmul (gather ?a ?k ?y) ?w)"),
            Row {
                k,
                twins: twins.clone(),
            },
        )
        .expect("rule"),
        Rewrite::new(
            "tp-column-conv",
            pat("(conv ?o ?x ?w ?b)"),
            ColumnConv {
                k,
                twins: twins.clone(),
            },
        )
        .expect("rule"),
        Rewrite::new(
            "tp-row-conv",
            pat("(conv ?o (gather ?a ?k ?y) ?w ?b)"),
            RowConv {
                k,
                twins: twins.clone(),
            },
        )
        .expect("rule"),
        Rewrite::new(
            "tp-sink-reshape",
            pat("(reshape (gather ?a ?k ?y) ?s)"),
            SinkReshape {
                k,
                twins: twins.clone(),
            },
        )
        .expect("rule"),
    ];
    let g = "(gather ?a ?k ?p)";
    let g2 = "(gather ?b ?k ?q)";
    let ar = "(allreduce ?k ?p)";
    let ar2 = "(allreduce ?k ?q)";
    let mut sinks: Vec<(String, String)> = Vec::new();
    for u in [
        "neg", "relu", "sigmoid", "tanh", "exp", "erf", "sqrt", "abs",
    ] {
        sinks.push((format!("tp-sink-{u}"), format!("({u} {g})")));
    }
    sinks.push(("tp-sink-op".into(), format!("(op ?o {g})")));
    sinks.push(("tp-sink-op3".into(), format!("(op ?o {g} ?c ?d)")));
    sinks.push(("tp-sink-transpose".into(), format!("(transpose ?t {g})")));
    for b in ["add", "sub", "mul", "div", "matmul"] {
        sinks.push((format!("tp-sink-{b}-l"), format!("({b} {g} ?c)")));
        sinks.push((format!("tp-sink-{b}-r"), format!("({b} ?c {g})")));
        sinks.push((format!("tp-sink-{b}-2"), format!("({b} {g} {g2})")));
    }
    for b in ["add", "sub"] {
        sinks.push((format!("tp-partial-{b}"), format!("({b} {ar} {ar2})")));
    }
    for (name, lhs) in sinks {
        let p = pat(&lhs);
        r.push(
            Rewrite::new(
                name.as_str(),
                p.clone(),
                Sink {
                    lhs: p,
                    twins: twins.clone(),
                },
            )
            .expect("rule"),
        );
    }
    r
}

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
    let mut out = HashMap::new();
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

/// Reads the replicated graph off a joint extraction: for every replicated class the e-node
/// to emit (a part's twin where the extraction computes it on parts) and the classes whose
/// MatMul has its weight sharded.
struct Globalize<'a> {
    eg: &'a EG,
    choice: &'a HashMap<Id, Kiln>,
    twins: HashMap<Kiln, Kiln>,
    out: HashMap<Id, Kiln>,
    splits: Vec<(Id, SplitKind)>,
}

impl Globalize<'_> {
    fn canon(&self, n: &Kiln) -> Kiln {
        n.clone().map_children(|c| self.eg.find(c))
    }

    fn chosen(&self, c: Id) -> Result<&Kiln, String> {
        self.choice
            .get(&self.eg.find(c))
            .ok_or_else(|| format!("no e-node chosen for class {c}"))
    }

    fn walk(&mut self, c: Id) -> Result<(), String> {
        let c = self.eg.find(c);
        if self.out.contains_key(&c) {
            return Ok(());
        }
        let n = self.chosen(c)?.clone();
        match n {
            Kiln::Gather([_, _, p]) | Kiln::AllReduce([_, p]) => self.of_part(c, p),
            Kiln::Shard(_) => Err("a shard chosen for a replicated class".into()),
            n => {
                self.out.insert(c, n.clone());
                for &ch in n.children() {
                    self.walk(ch)?;
                }
                Ok(())
            }
        }
    }

    /// Class `c` (replicated) is computed as the parts of class `p`.
    fn of_part(&mut self, c: Id, p: Id) -> Result<(), String> {
        let c = self.eg.find(c);
        if self.out.contains_key(&c) {
            return Ok(());
        }
        let m = self.canon(self.chosen(p)?);
        if let Kiln::Shard([_, _, x]) = m {
            if self.eg.find(x) != c {
                return Err("gather of a shard of another class".into());
            }
            return self.walk(x);
        }
        let g = self
            .twins
            .get(&m)
            .cloned()
            .ok_or_else(|| format!("no replicated twin for the part e-node {m:?}"))?;
        let g = self.canon(&g);
        self.out.insert(c, g.clone());
        for (pos, (&mc, &gc)) in m.children().iter().zip(g.children()).enumerate() {
            if self.eg[mc].data.dist == Dist::Rep {
                self.walk(gc)?;
                continue;
            }
            match self.chosen(mc)?.clone() {
                Kiln::Shard([a, _, x]) => {
                    // the weight of a MatMul (position 1) or Conv (position 2): the axis
                    // its parts are cut along says Column or Row
                    let axis = self.eg[a].data.int;
                    let kind = match (&g, pos, axis) {
                        (Kiln::MatMul(_), 1, Some(1)) | (Kiln::Conv(_), 2, Some(0)) => {
                            Some(SplitKind::Column)
                        }
                        (Kiln::MatMul(_), 1, Some(0)) | (Kiln::Conv(_), 2, Some(1)) => {
                            Some(SplitKind::Row)
                        }
                        _ => None,
                    };
                    if let Some(kind) = kind.filter(|_| is_weight(self.eg, x)) {
                        self.splits.push((c, kind));
                    }
                    self.walk(x)?;
                }
                _ => self.of_part(gc, mc)?,
            }
        }
        Ok(())
    }
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
