//! Extraction: choosing one e-node per e-class.
//!
//! Every e-node first gets its own cost from a [`CostModel`] (infinite for e-nodes whose
//! inferred type differs from their e-class: they come from no sound rule and are never
//! chosen). [`greedy`] is egg's tree extractor (a shared sub-term is paid for once per
//! use); [`dag`] starts from it and improves the exact DAG cost (every chosen e-class paid
//! once) by local search: single switches, and group switches that move the siblings of a
//! newly shared e-class onto it (how the slices of a merged MatMul pay off). Cycles are
//! rejected.

use super::analysis::{node_facts, KilnEGraph, Kind};
use super::cost::CostModel;
use super::language::{Kiln, Lowered};
use egg::{CostFunction, Extractor, Id, Language};
use kiln_ir::ops::elementwise::ElementwiseOp;
use kiln_ir::{Fact, Op};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The own cost of each canonical e-node (microseconds; `f64::INFINITY` if ill-typed).
pub type NodeCosts = FxHashMap<Kiln, f64>;

/// Costs every e-node of the e-graph with `model`.
pub fn node_costs(eg: &KilnEGraph, model: &dyn CostModel) -> NodeCosts {
    let mut out = NodeCosts::default();
    for class in eg.classes() {
        let cd = &class.data;
        for n in class.iter() {
            out.insert(n.clone(), own_cost(eg, model, cd, n));
        }
    }
    out
}

/// The own cost of one e-node of class data `cd` (see [`node_costs`]).
pub fn own_cost(
    eg: &KilnEGraph,
    model: &dyn CostModel,
    cd: &super::analysis::Data,
    n: &Kiln,
) -> f64 {
    const INF: f64 = f64::INFINITY;
    let Ok((kind, facts)) = node_facts(&eg.analysis, n, |i| &eg[i].data, false) else {
        return INF;
    };
    let same = kind == cd.kind
        && facts.len() == cd.facts.len()
        && facts
            .iter()
            .zip(&cd.facts)
            .all(|(a, b)| a.dtype == b.dtype && a.shape == b.shape);
    if !same || cd.kind == Kind::Invalid {
        return INF;
    }
    let lowered = n.lower(
        |i| eg[i].data.int,
        |i| eg[i].data.ints.clone(),
        |i| eg[i].data.attr,
    );
    let (op, ins) = match lowered {
        Some(Lowered::Op(op, ins)) => (op, ins),
        Some(Lowered::Table(k, ins)) => match eg.analysis.op(k) {
            Some(e) => (e.op.clone(), ins.to_vec()),
            None => return INF,
        },
        Some(Lowered::Leaf) | Some(Lowered::Out(..)) => return 0.0,
        None => return INF,
    };
    let inputs: Vec<Option<&Fact>> = ins.iter().map(|&i| eg[i].data.fact()).collect();
    let fused = matches!(op, Op::Elementwise(ref e) if !matches!(e, ElementwiseOp::Identity))
        && ins
            .iter()
            .any(|&i| eg[i].nodes.iter().any(|m| m.is_contraction()));
    // strictly positive, so that a cheapest choice never forms a cycle
    model.op_cost(&op, &inputs, &facts, fused).max(0.0) + 1e-3
}

struct TableCost<'a>(&'a NodeCosts);

impl CostFunction<Kiln> for TableCost<'_> {
    type Cost = f64;
    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &Kiln, mut costs: C) -> f64 {
        let own = self.0.get(enode).copied().unwrap_or(f64::INFINITY);
        enode.fold(own, |s, id| s + costs(id))
    }
}

/// egg's greedy tree extractor over the node costs: the cheapest e-node of every e-class.
pub fn greedy(eg: &KilnEGraph, costs: &NodeCosts) -> HashMap<Id, Kiln> {
    let ex = Extractor::new(eg, TableCost(costs));
    eg.classes()
        .map(|c| (c.id, ex.find_best_node(c.id).clone()))
        .collect()
}

/// The DAG cost of a choice: the own cost of every e-class reachable from the roots, once.
pub fn dag_cost(
    eg: &KilnEGraph,
    costs: &NodeCosts,
    choice: &HashMap<Id, Kiln>,
    roots: &[Id],
) -> f64 {
    let mut seen = HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    let mut total = 0.0;
    while let Some(c) = stack.pop() {
        if !seen.insert(c) {
            continue;
        }
        let Some(n) = choice.get(&c) else {
            return f64::INFINITY;
        };
        total += costs.get(n).copied().unwrap_or(f64::INFINITY);
        stack.extend(n.children().iter().map(|&i| eg.find(i)));
    }
    total
}

/// The DAG-aware search's state (Fx hash maps: the search is mostly map look-ups).
struct Sel<'a> {
    eg: &'a KilnEGraph,
    costs: &'a NodeCosts,
    choice: FxHashMap<Id, Kiln>,
    rc: FxHashMap<Id, usize>,
    total: f64,
}

impl Sel<'_> {
    fn own(&self, n: &Kiln) -> f64 {
        self.costs.get(n).copied().unwrap_or(f64::INFINITY)
    }

    fn add_ref(&mut self, c: Id) {
        let mut stack = vec![c];
        while let Some(c) = stack.pop() {
            let c = self.eg.find(c);
            let r = self.rc.entry(c).or_insert(0);
            *r += 1;
            if *r == 1 {
                let n = self.choice[&c].clone();
                self.total += self.own(&n);
                stack.extend(n.children().iter().copied());
            }
        }
    }

    fn del_ref(&mut self, c: Id) {
        let mut stack = vec![c];
        while let Some(c) = stack.pop() {
            let c = self.eg.find(c);
            let r = self.rc.get_mut(&c).expect("referenced");
            *r -= 1;
            if *r == 0 {
                let n = self.choice[&c].clone();
                self.total -= self.own(&n);
                stack.extend(n.children().iter().copied());
            }
        }
    }

    /// Chooses `n` for the reachable class `c`; returns the previous choice.
    fn switch(&mut self, c: Id, n: Kiln) -> Kiln {
        let old = self.choice.insert(c, n.clone()).expect("chosen");
        self.total += self.own(&n) - self.own(&old);
        for &ch in n.children() {
            self.add_ref(ch);
        }
        for &ch in old.children() {
            self.del_ref(ch);
        }
        old
    }

    /// Whether `c` reaches itself through the chosen e-nodes.
    fn cyclic(&self, c: Id) -> bool {
        let mut seen = FxHashSet::default();
        let mut stack: Vec<Id> = self.choice[&c].children().to_vec();
        while let Some(x) = stack.pop() {
            let x = self.eg.find(x);
            if x == c {
                return true;
            }
            if seen.insert(x) {
                stack.extend(self.choice[&x].children().iter().copied());
            }
        }
        false
    }

    /// Tries `n` for `c`; keeps it if the DAG cost drops by more than `eps`.
    fn try_switch(&mut self, c: Id, n: Kiln, eps: f64) -> Option<Kiln> {
        let before = self.total;
        let old = self.switch(c, n);
        if self.total < before - eps && !self.cyclic(c) {
            Some(old)
        } else {
            self.switch(c, old);
            None
        }
    }
}

/// DAG-aware extraction: local search from `start` (normally [`greedy`]'s choice) on the
/// exact DAG cost, within `time_limit`. Returns the improved choice and the number of
/// accepted moves.
pub fn dag(
    eg: &KilnEGraph,
    costs: &NodeCosts,
    roots: &[Id],
    start: HashMap<Id, Kiln>,
    time_limit: Duration,
) -> (HashMap<Id, Kiln>, usize) {
    let t0 = Instant::now();
    let mut s = Sel {
        eg,
        costs,
        choice: start.into_iter().collect(),
        rc: FxHashMap::default(),
        total: 0.0,
    };
    for &r in roots {
        s.add_ref(r);
    }
    let eps = 1e-6;
    let mut moves = 0;
    for _round in 0..8 {
        let mut improved = false;
        let mut classes: Vec<Id> =
            s.rc.iter()
                .filter(|(_, &r)| r > 0)
                .map(|(&c, _)| c)
                .collect();
        classes.sort();
        for c in classes {
            if t0.elapsed() > time_limit {
                return (s.choice.into_iter().collect(), moves);
            }
            if s.rc.get(&c).copied().unwrap_or(0) == 0 {
                continue;
            }
            let alts: Vec<Kiln> = eg[c]
                .iter()
                .filter(|n| **n != s.choice[&c] && s.own(n).is_finite())
                .cloned()
                .collect();
            for n in alts {
                let before = s.total;
                let old = s.switch(c, n.clone());
                if s.cyclic(c) {
                    s.switch(c, old);
                    continue;
                }
                let mut done = vec![(c, old)];
                if s.total >= before - eps {
                    // group move: siblings that can share the children of n
                    let mut sibs = vec![];
                    for &ch in n.children() {
                        for p in eg[eg.find(ch)].parents() {
                            let pc = eg.find(p);
                            if pc == c || s.rc.get(&pc).copied().unwrap_or(0) == 0 {
                                continue;
                            }
                            let pn = eg.id_to_node(p).clone().map_children(|i| eg.find(i));
                            if pn != s.choice[&pc] && s.own(&pn).is_finite() {
                                sibs.push((pc, pn));
                            }
                        }
                    }
                    for (pc, pn) in sibs.into_iter().take(16) {
                        if s.rc.get(&pc).copied().unwrap_or(0) == 0 || pn == s.choice[&pc] {
                            continue;
                        }
                        if let Some(o) = s.try_switch(pc, pn, eps) {
                            done.push((pc, o));
                        }
                    }
                }
                if s.total < before - eps {
                    moves += done.len();
                    improved = true;
                    break;
                }
                for (pc, o) in done.into_iter().rev() {
                    s.switch(pc, o);
                }
            }
        }
        if !improved {
            break;
        }
    }
    (s.choice.into_iter().collect(), moves)
}
