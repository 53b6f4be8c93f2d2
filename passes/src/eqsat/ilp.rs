//! ILP extraction (tensat): one binary variable per e-node, minimise the sum of the chosen
//! e-nodes' own costs (every chosen e-class paid once, so shared sub-terms are paid once)
//! subject to: every root e-class chooses an e-node, every chosen e-node's child e-classes
//! choose one, at most one e-node per e-class. Solved with the pure-Rust `microlp`
//! branch and bound, warm-started from the DAG-aware choice, under a time limit.
//!
//! E-classes with a leaf (graph input, constant, attribute) take it and stay out of the
//! ILP. Acyclicity: an e-node whose child can only be computed from the e-node's own class
//! (within three levels) is left out; a child constraint only counts the child's e-nodes
//! that do not need the parent's class (within two levels), so the LP relaxation cannot run
//! those short cycles fractionally; the short cycles (up to four e-classes) of each
//! strongly connected component of the class graph get a cut up front (at most `k - 1` of
//! the `k` classes of a cycle choose an e-node that uses the next one), and the longer
//! ones by reject-and-resolve: when a solution still chooses a cycle, its cut is added and
//! the problem solved again, until the choice is acyclic or the time is up. On a time-out
//! without a solution, or an infeasible or failed solve, [`ilp`] returns `None` and the
//! caller keeps the DAG-aware / greedy result.
//!
//! `microlp`'s branch and bound rarely proves optimality on the benchmark e-graphs within
//! a few seconds (the LP relaxation of extraction is weak where cycles are possible), so
//! the result is often the best feasible solution found from the warm start.

use super::analysis::KilnEGraph;
use super::extract::NodeCosts;
use super::language::Kiln;
use egg::{Id, Language};
use microlp::{ComparisonOp, OptimizationDirection, Problem, SolveOptions, Variable};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// What the ILP extraction did.
#[derive(Clone, Debug, Default)]
pub struct IlpStats {
    /// Binary variables (e-nodes considered).
    pub vars: usize,
    /// Constraints of the first solve.
    pub constraints: usize,
    /// Solves (1 + the rounds of reject-and-resolve).
    pub solves: usize,
    /// Cycle cuts: up front, and added after solves that chose a cycle.
    pub cycle_cuts: usize,
    /// Whether the last solve proved optimality.
    pub optimal: bool,
    /// Why no choice was returned, if none was.
    pub failure: Option<String>,
}

struct Model {
    /// Per e-class: its candidate e-nodes and their variables.
    nodes: HashMap<Id, Vec<(Kiln, Variable)>>,
    /// E-classes with a leaf (input, constant, attribute): they choose it, outside the ILP.
    leaves: HashMap<Id, Kiln>,
    problem: Problem,
    constraints: usize,
    /// Cycle cuts added up front.
    cuts: usize,
}

/// Whether every way to compute e-class `d` (every finite-cost e-node, up to `depth`
/// levels down) uses e-class `c`: an e-node of `c` with such a child can never be part of
/// an acyclic choice (e.g. `x = concat(slice(x, 0..a), slice(x, a..n))`).
fn must_use(
    eg: &KilnEGraph,
    costs: &NodeCosts,
    d: Id,
    c: Id,
    depth: usize,
    memo: &mut HashMap<(Id, usize), bool>,
) -> bool {
    if d == c {
        return true;
    }
    if depth == 0 {
        return false;
    }
    if let Some(&m) = memo.get(&(d, depth)) {
        return m;
    }
    memo.insert((d, depth), false);
    let mut all = true;
    let mut any_node = false;
    for n in eg[d].iter() {
        if !costs.get(n).is_some_and(|x| x.is_finite()) {
            continue;
        }
        any_node = true;
        if n.is_leaf()
            || !n
                .children()
                .iter()
                .any(|&k| must_use(eg, costs, eg.find(k), c, depth - 1, memo))
        {
            all = false;
            break;
        }
    }
    let r = all && any_node;
    memo.insert((d, depth), r);
    r
}

/// Builds the ILP over the e-classes reachable from `roots` through finite-cost e-nodes,
/// with the cuts of the cycles of at most `short_cycle` e-classes.
fn build(eg: &KilnEGraph, costs: &NodeCosts, roots: &[Id], short_cycle: usize) -> Model {
    let mut problem = Problem::new(OptimizationDirection::Minimize);
    let mut nodes: HashMap<Id, Vec<(Kiln, Variable)>> = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    let mut seen: HashSet<Id> = stack.iter().copied().collect();
    let mut order = vec![];
    let mut leaves: HashMap<Id, Kiln> = HashMap::new();
    while let Some(c) = stack.pop() {
        // a leaf costs next to nothing and needs nothing: its class takes it
        if let Some(l) = eg[c]
            .iter()
            .find(|n| n.is_leaf() && costs.get(*n).is_some_and(|c| c.is_finite()))
        {
            leaves.insert(c, l.clone());
            continue;
        }
        order.push(c);
        let mut list = vec![];
        let mut memo = HashMap::new();
        for n in eg[c].iter() {
            let n = n.clone().map_children(|i| eg.find(i));
            let cost = costs.get(&n).copied().unwrap_or(f64::INFINITY);
            if !cost.is_finite()
                || n.children()
                    .iter()
                    .any(|&k| must_use(eg, costs, k, c, 3, &mut memo))
            {
                continue;
            }
            for &ch in n.children() {
                if seen.insert(ch) {
                    stack.push(ch);
                }
            }
            list.push((n, problem.add_binary_var(cost)));
        }
        nodes.insert(c, list);
    }
    let mut constraints = 0;
    // Cycles can only run inside a strongly connected component of the class graph
    // (class -> child classes of its candidate e-nodes). The short ones (up to
    // `SHORT_CYCLE` classes, e.g. x = concat(slice(x, ..), ..)) get their cut up front.
    let mut cg: petgraph::graphmap::DiGraphMap<Id, ()> = petgraph::graphmap::DiGraphMap::new();
    for (c, list) in &nodes {
        cg.add_node(*c);
        for (n, _) in list {
            for &ch in n.children() {
                if nodes.contains_key(&ch) {
                    cg.add_edge(*c, ch, ());
                }
            }
        }
    }
    let mut cycles = vec![];
    for scc in petgraph::algo::tarjan_scc(&cg) {
        if scc.len() < 2 {
            continue;
        }
        let inside: HashSet<Id> = scc.iter().copied().collect();
        for &start in &scc {
            // paths start -> ... over classes greater than start, back to start
            let mut path = vec![start];
            short_cycles(&cg, &inside, start, short_cycle, &mut path, &mut cycles);
            if cycles.len() > MAX_CUTS {
                break;
            }
        }
    }
    for &r in roots {
        let r = eg.find(r);
        if leaves.contains_key(&r) {
            continue;
        }
        let terms: Vec<(Variable, f64)> = nodes[&r].iter().map(|(_, x)| (*x, 1.0)).collect();
        problem.add_constraint(terms, ComparisonOp::Ge, 1.0);
        constraints += 1;
    }
    for c in &order {
        let list = &nodes[c];
        if list.len() > 1 {
            let terms: Vec<(Variable, f64)> = list.iter().map(|(_, x)| (*x, 1.0)).collect();
            problem.add_constraint(terms, ComparisonOp::Le, 1.0);
            constraints += 1;
        }
        let mut memo = HashMap::new();
        for (n, x) in list {
            let mut kids: Vec<Id> = n.children().to_vec();
            kids.sort();
            kids.dedup();
            for ch in kids.into_iter().filter(|k| !leaves.contains_key(k)) {
                // x_n <= sum of the child's e-nodes, leaving out those with a child that
                // can only be computed from c (choosing one with n closes a cycle): this
                // keeps the LP relaxation from running short cycles fractionally
                let mut terms: Vec<(Variable, f64)> = vec![(*x, 1.0)];
                for (m, y) in &nodes[&ch] {
                    let closes = short_cycle > 0
                        && m.children()
                            .iter()
                            .any(|&k| must_use(eg, costs, k, *c, 2, &mut memo));
                    if !closes {
                        terms.push((*y, -1.0));
                    }
                }
                problem.add_constraint(terms, ComparisonOp::Le, 0.0);
                constraints += 1;
            }
        }
    }
    let mut m = Model {
        nodes,
        leaves,
        problem,
        constraints,
        cuts: 0,
    };
    for c in &cycles {
        add_cut(&mut m, c);
    }
    m.cuts = cycles.len();
    m
}

/// Longest cycle (in e-classes) cut before the first solve by [`ilp`].
pub const SHORT_CYCLE: usize = 4;
/// Most cycle cuts added before the first solve.
const MAX_CUTS: usize = 20_000;

/// The cycles through `start` of at most `max_len` classes whose other classes are
/// greater than `start` (each cycle found once), extending `path`.
fn short_cycles(
    cg: &petgraph::graphmap::DiGraphMap<Id, ()>,
    inside: &HashSet<Id>,
    start: Id,
    max_len: usize,
    path: &mut Vec<Id>,
    out: &mut Vec<Vec<Id>>,
) {
    let last = *path.last().expect("path");
    for next in cg.neighbors(last) {
        if next == start && path.len() > 1 {
            out.push(path.clone());
        } else if next > start
            && inside.contains(&next)
            && path.len() < max_len
            && !path.contains(&next)
        {
            path.push(next);
            short_cycles(cg, inside, start, max_len, path, out);
            path.pop();
        }
    }
}

/// The cut of a cycle of classes `c_0 -> c_1 -> ... -> c_0`: at most `k - 1` of them may
/// choose an e-node that uses the next one.
fn add_cut(m: &mut Model, cut: &[Id]) {
    let k = cut.len();
    let mut terms: Vec<(Variable, f64)> = vec![];
    for (i, c) in cut.iter().enumerate() {
        let next = cut[(i + 1) % k];
        if let Some(list) = m.nodes.get(c) {
            terms.extend(
                list.iter()
                    .filter(|(n, _)| n.children().contains(&next))
                    .map(|(_, x)| (*x, 1.0)),
            );
        }
    }
    if !terms.is_empty() {
        m.problem
            .add_constraint(terms, ComparisonOp::Le, k as f64 - 1.0);
        m.constraints += 1;
    }
}

/// Cycles of chosen e-nodes reachable from the roots (one per back edge of a depth-first
/// search), each as `(class, node)` pairs.
fn find_cycles(eg: &KilnEGraph, choice: &HashMap<Id, Kiln>, roots: &[Id]) -> Vec<Vec<(Id, Kiln)>> {
    // iterative DFS with colours: 1 = on the stack, 2 = done
    let mut colour: HashMap<Id, u8> = HashMap::new();
    let mut cycles = vec![];
    for &r in roots {
        let r = eg.find(r);
        if colour.contains_key(&r) {
            continue;
        }
        let mut path: Vec<(Id, usize)> = vec![(r, 0)];
        colour.insert(r, 1);
        while let Some(&(c, i)) = path.last() {
            let kids = choice.get(&c).map(|n| n.children()).unwrap_or(&[]);
            if i < kids.len() {
                let ch = eg.find(kids[i]);
                if let Some(top) = path.last_mut() {
                    top.1 += 1;
                }
                match colour.get(&ch) {
                    Some(1) => {
                        let start = path.iter().position(|p| p.0 == ch).unwrap_or(0);
                        cycles.push(
                            path[start..]
                                .iter()
                                .map(|p| (p.0, choice[&p.0].clone()))
                                .collect(),
                        );
                    }
                    Some(_) => {}
                    None => {
                        colour.insert(ch, 1);
                        path.push((ch, 0));
                    }
                }
            } else {
                colour.insert(c, 2);
                path.pop();
            }
        }
    }
    cycles
}

/// ILP extraction within `time_limit`, warm-started from `start` (a complete acyclic
/// choice, e.g. the DAG-aware one). Returns the choice (the chosen e-classes' e-nodes,
/// completed by `start` for the others) or `None`, with statistics.
pub fn ilp(
    eg: &KilnEGraph,
    costs: &NodeCosts,
    roots: &[Id],
    start: &HashMap<Id, Kiln>,
    time_limit: Duration,
) -> (Option<HashMap<Id, Kiln>>, IlpStats) {
    ilp_with_cuts(eg, costs, roots, start, time_limit, SHORT_CYCLE)
}

/// [`ilp`] with the cycles of at most `short_cycle` e-classes cut up front (`0`: no cuts
/// and no tightened child constraints up front, every cycle is left to
/// reject-and-resolve).
pub fn ilp_with_cuts(
    eg: &KilnEGraph,
    costs: &NodeCosts,
    roots: &[Id],
    start: &HashMap<Id, Kiln>,
    time_limit: Duration,
    short_cycle: usize,
) -> (Option<HashMap<Id, Kiln>>, IlpStats) {
    let t0 = Instant::now();
    let mut st = IlpStats::default();
    let mut cuts: Vec<Vec<Id>> = vec![];
    let mut reached: HashSet<Id> = HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    while let Some(c) = stack.pop() {
        if reached.insert(c) {
            if let Some(n) = start.get(&c) {
                stack.extend(n.children().iter().map(|&k| eg.find(k)));
            }
        }
    }
    loop {
        let left = time_limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            st.failure = Some("time limit".into());
            return (None, st);
        }
        let mut m = build(eg, costs, roots, short_cycle);
        st.vars = m.nodes.values().map(Vec::len).sum();
        if st.constraints == 0 {
            st.constraints = m.constraints;
        }
        st.cycle_cuts = m.cuts + cuts.len();
        for cut in &cuts {
            add_cut(&mut m, cut);
        }
        // warm start: the start choice on the classes it reaches from the roots
        let mut hint: Vec<(Variable, f64)> = vec![];
        let mut ok = true;
        for (c, list) in &m.nodes {
            let chosen = start.get(c).filter(|_| reached.contains(c));
            for (n, x) in list {
                hint.push((*x, if Some(n) == chosen { 1.0 } else { 0.0 }));
            }
            if chosen.is_some_and(|n| !list.iter().any(|(k, _)| k == n)) {
                ok = false;
            }
        }
        let mut opts = SolveOptions::default();
        opts.time_limit = Some(left);
        opts.warm_start = ok.then_some(hint);
        st.solves += 1;
        let res = m.problem.solve_with(opts);
        let sol = match res {
            Ok(o) => match o.into_solution() {
                Ok(s) => s,
                Err(_) => {
                    st.failure = Some("time limit before a solution".into());
                    return (None, st);
                }
            },
            Err(e) => {
                st.failure = Some(format!("solver: {e}"));
                return (None, st);
            }
        };
        st.optimal = sol.status() == microlp::SolutionStatus::Optimal;
        let mut choice = start.clone();
        for (c, l) in &m.leaves {
            choice.insert(*c, l.clone());
        }
        for (c, list) in &m.nodes {
            if let Some((n, _)) = list.iter().find(|(_, x)| sol.var_value(*x) > 0.5) {
                choice.insert(*c, n.clone());
            }
        }
        // every reachable class must have a chosen node of the solution
        let roots_c: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
        let cycles = find_cycles(eg, &choice, &roots_c);
        if cycles.is_empty() {
            return (Some(choice), st);
        }
        cuts.extend(
            cycles
                .into_iter()
                .map(|c| c.into_iter().map(|(id, _)| id).collect::<Vec<Id>>()),
        );
    }
}
