//! ILP extraction (tensat): one binary variable per e-node, minimise the sum of the chosen
//! e-nodes' own costs (every chosen e-class paid once, so shared sub-terms are paid once)
//! subject to: every root e-class chooses an e-node, every chosen e-node's child e-classes
//! choose one, at most one e-node per e-class. Solved with the pure-Rust `microlp`
//! branch and bound, warm-started from the DAG-aware choice, under a time limit.
//!
//! Acyclicity by reject-and-resolve: e-nodes that are their own child are left out; when a
//! solution still chooses a cycle, a cut `sum(x on the cycle) <= len - 1` is added and the
//! problem solved again, until the choice is acyclic or the time is up. On a time-out
//! without a solution, an infeasible or failed solve, or a cyclic last solution, [`ilp`]
//! returns `None` and the caller keeps the DAG-aware / greedy result.

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
    /// Solves (1 + cycle cuts added).
    pub solves: usize,
    /// Whether the last solve proved optimality.
    pub optimal: bool,
    /// Why no choice was returned, if none was.
    pub failure: Option<String>,
}

struct Model {
    /// Per e-class: its candidate e-nodes and their variables.
    nodes: HashMap<Id, Vec<(Kiln, Variable)>>,
    problem: Problem,
    constraints: usize,
}

/// Builds the ILP over the e-classes reachable from `roots` through finite-cost e-nodes.
fn build(eg: &KilnEGraph, costs: &NodeCosts, roots: &[Id]) -> Model {
    let mut problem = Problem::new(OptimizationDirection::Minimize);
    let mut nodes: HashMap<Id, Vec<(Kiln, Variable)>> = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    let mut seen: HashSet<Id> = stack.iter().copied().collect();
    let mut order = vec![];
    while let Some(c) = stack.pop() {
        order.push(c);
        let mut list = vec![];
        for n in eg[c].iter() {
            let n = n.clone().map_children(|i| eg.find(i));
            let cost = costs.get(&n).copied().unwrap_or(f64::INFINITY);
            if !cost.is_finite() || n.children().contains(&c) {
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
    for &r in roots {
        let r = eg.find(r);
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
        for (n, x) in list {
            let mut kids: Vec<Id> = n.children().to_vec();
            kids.sort();
            kids.dedup();
            for ch in kids {
                // x_n <= sum of the child's e-nodes
                let mut terms: Vec<(Variable, f64)> = vec![(*x, 1.0)];
                terms.extend(nodes[&ch].iter().map(|(_, y)| (*y, -1.0)));
                problem.add_constraint(terms, ComparisonOp::Le, 0.0);
                constraints += 1;
            }
        }
    }
    Model {
        nodes,
        problem,
        constraints,
    }
}

/// A cycle of chosen e-nodes reachable from the roots, as `(class, node)` pairs.
fn find_cycle(
    eg: &KilnEGraph,
    choice: &HashMap<Id, Kiln>,
    roots: &[Id],
) -> Option<Vec<(Id, Kiln)>> {
    // iterative DFS with colours: 1 = on the stack, 2 = done
    let mut colour: HashMap<Id, u8> = HashMap::new();
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
                        return Some(
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
    None
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
    let t0 = Instant::now();
    let mut st = IlpStats::default();
    let mut cuts: Vec<Vec<(Id, Kiln)>> = vec![];
    loop {
        let left = time_limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            st.failure = Some("time limit".into());
            return (None, st);
        }
        let mut m = build(eg, costs, roots);
        st.vars = m.nodes.values().map(Vec::len).sum();
        if st.constraints == 0 {
            st.constraints = m.constraints;
        }
        let var_of = |m: &Model, c: Id, n: &Kiln| {
            m.nodes
                .get(&c)
                .and_then(|l| l.iter().find(|(k, _)| k == n).map(|(_, x)| *x))
        };
        for cut in &cuts {
            let terms: Option<Vec<(Variable, f64)>> = cut
                .iter()
                .map(|(c, n)| var_of(&m, *c, n).map(|x| (x, 1.0)))
                .collect();
            if let Some(t) = terms {
                m.problem
                    .add_constraint(t, ComparisonOp::Le, cut.len() as f64 - 1.0);
            }
        }
        // warm start: the start choice on the classes it reaches
        let mut hint: Vec<(Variable, f64)> = vec![];
        let mut ok = true;
        for (c, list) in &m.nodes {
            let chosen = start.get(c);
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
        let sol = match m.problem.solve_with(opts) {
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
        for (c, list) in &m.nodes {
            if let Some((n, _)) = list.iter().find(|(_, x)| sol.var_value(*x) > 0.5) {
                choice.insert(*c, n.clone());
            }
        }
        // every reachable class must have a chosen node of the solution
        let roots_c: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
        match find_cycle(eg, &choice, &roots_c) {
            None => return (Some(choice), st),
            Some(cycle) => cuts.push(cycle),
        }
    }
}
