//! Soundness check of the joint e-graph: every e-node of every e-class, evaluated on real
//! inputs rank by rank, must give its class's value.
//!
//! The saturated e-graph of [`super`] (algebraic and parallel rules) is evaluated
//! with the reference ops: a replicated class has one value, a split or partial class one
//! value per rank (`shard` slices the rank's part, `gather` concatenates the parts,
//! `allreduce` sums them, any other e-node runs its op on each rank's inputs). Each class
//! gets the value of the first e-node that can be evaluated; then every other well-typed
//! e-node of the class is evaluated and compared. A rule that joined two different values
//! — or a layout the analysis got wrong — shows up as a mismatch naming the e-node.

use super::{saturate, JointOptions};
use crate::eqsat::analysis::{KilnEGraph, Kind};
use crate::eqsat::cost::Analytical;
use crate::eqsat::dist::Dist;
use crate::eqsat::extract::own_cost;
use crate::eqsat::language::{Kiln, Lowered};
use crate::parallel::inprocess::{concat, sum};
use crate::parallel::lower::slice_tensor;
use egg::{Id, Language};
use kiln_ir::{Graph, Op, Tensor};
use std::collections::HashMap;

/// What [`check_egraph`] checked.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Value classes evaluated.
    pub classes: usize,
    /// E-nodes evaluated and compared with their class's value.
    pub nodes: usize,
    /// Of those, e-nodes on parts (classes split or partial).
    pub part_nodes: usize,
    /// Parallel rules that applied, with their counts.
    pub rules_applied: Vec<(String, usize)>,
}

/// Per rank (one entry for a replicated class), per output (several for a tuple).
type Val = Vec<Vec<Tensor>>;

fn close(a: &Tensor, b: &Tensor) -> bool {
    if a.shape() != b.shape() {
        return false;
    }
    let (x, y) = (a.to_f64_vec(), b.to_f64_vec());
    let scale = y.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    x.iter()
        .zip(&y)
        .all(|(p, q)| (p - q).abs() <= 1e-4 * scale || (p.is_nan() && q.is_nan()))
}

struct Eval<'a> {
    eg: &'a KilnEGraph,
    inputs: HashMap<String, Tensor>,
    vals: HashMap<Id, Val>,
}

impl Eval<'_> {
    fn ranks(&self, c: Id) -> usize {
        match self.eg[c].data.dist {
            Dist::Rep => 1,
            Dist::Split { k, .. } | Dist::Partial { k } => k,
        }
    }

    /// The value of one e-node of class `c`; `None` while a child has none.
    fn node(&self, c: Id, n: &Kiln) -> Option<Result<Val, String>> {
        let eg = self.eg;
        let get = |i: Id| self.vals.get(&eg.find(i));
        let int = |i: Id| eg[i].data.int.and_then(|v| usize::try_from(v).ok());
        let one = |t: Tensor| Some(Ok(vec![vec![t]]));
        match n {
            Kiln::Input(s) => return self.inputs.get(s.as_str()).cloned().and_then(one),
            Kiln::Const(k) => {
                return eg
                    .analysis
                    .consts
                    .get(k.0 as usize)
                    .and_then(|e| one((*e.tensor).clone()))
            }
            Kiln::Shard([a, k, x]) => {
                let (a, k, x) = (int(*a)?, int(*k)?, &get(*x)?[0][0]);
                let len = x.shape().get(a)? / k;
                return Some(
                    (0..k)
                        .map(|r| slice_tensor(x, a, r * len, len).map(|t| vec![t]))
                        .collect(),
                );
            }
            Kiln::Gather([a, _, x]) => {
                let parts: Vec<Tensor> = get(*x)?.iter().map(|p| p[0].clone()).collect();
                return Some(concat(&parts, int(*a)?).map(|t| vec![vec![t]]));
            }
            Kiln::AllReduce([_, x]) => {
                let parts: Vec<Tensor> = get(*x)?.iter().map(|p| p[0].clone()).collect();
                let dt = parts[0].dtype();
                return Some(sum(&parts).map(|t| vec![vec![t.cast(dt)]]));
            }
            _ => {}
        }
        let lowered = n.lower(
            |i| eg[i].data.int,
            |i| eg[i].data.ints.clone(),
            |i| eg[i].data.attr,
        )?;
        let (op, ins): (Op, Vec<Id>) = match lowered {
            Lowered::Leaf => return None,
            Lowered::Out(k, t) => {
                let k = usize::try_from(eg[k].data.int?).ok()?;
                let tv = get(t)?;
                return Some(
                    tv.iter()
                        .map(|outs| {
                            outs.get(k)
                                .cloned()
                                .map(|t| vec![t])
                                .ok_or_else(|| format!("tuple has no output {k}"))
                        })
                        .collect(),
                );
            }
            Lowered::Op(op, ins) => (op, ins),
            Lowered::Table(key, ins) => (eg.analysis.op(key)?.op.clone(), ins.to_vec()),
        };
        let mut per_rank = Vec::new();
        for r in 0..self.ranks(c) {
            let mut args: Vec<Option<&Tensor>> = Vec::with_capacity(ins.len());
            for &i in &ins {
                if eg[i].data.kind == Kind::None {
                    args.push(None);
                    continue;
                }
                let v = get(i)?;
                let rv = if v.len() == 1 { &v[0] } else { v.get(r)? };
                args.push(Some(rv.first()?));
            }
            match op.eval(&args) {
                Ok(outs) => per_rank.push(outs),
                Err(e) => return Some(Err(format!("{}: {e}", op.op_type()))),
            }
        }
        Some(Ok(per_rank))
    }
}

/// Saturates `g` as [`super::optimize`] would and checks every e-node against its
/// class's value on `inputs` (one per graph input, in order). Errors name the first
/// e-node whose value differs.
pub fn check_egraph(
    g: &Graph,
    opts: &JointOptions,
    inputs: &[Tensor],
) -> Result<CheckReport, String> {
    let sat = saturate(g, opts)?;
    let eg = &sat.eg;
    let mut ev = Eval {
        eg,
        inputs: g
            .inputs
            .iter()
            .zip(inputs)
            .map(|(&v, t)| (g.values[v].name.clone(), t.clone()))
            .collect(),
        vals: HashMap::new(),
    };
    let wanted = |c: Id| matches!(eg[c].data.kind, Kind::Value | Kind::Tuple);
    loop {
        let mut changed = false;
        for class in eg.classes() {
            if ev.vals.contains_key(&class.id) || !wanted(class.id) {
                continue;
            }
            for n in class.iter() {
                match ev.node(class.id, n) {
                    Some(Ok(v)) => {
                        ev.vals.insert(class.id, v);
                        changed = true;
                        break;
                    }
                    Some(Err(e)) => return Err(format!("{n:?} in class {}: {e}", class.id)),
                    None => {}
                }
            }
        }
        if !changed {
            break;
        }
    }
    let model = Analytical {
        device: opts.device.clone(),
    };
    let mut rep = CheckReport::default();
    for class in eg.classes() {
        let Some(want) = ev.vals.get(&class.id) else {
            continue;
        };
        rep.classes += 1;
        for n in class.iter() {
            if !own_cost(eg, &model, &class.data, n).is_finite()
                && !matches!(n, Kiln::Shard(_) | Kiln::Gather(_) | Kiln::AllReduce(_))
            {
                continue; // ill-typed here: never extracted
            }
            let Some(got) = ev.node(class.id, n) else {
                continue;
            };
            let got = got.map_err(|e| format!("{n:?} in class {}: {e}", class.id))?;
            let same = got.len() == want.len()
                && got
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| close(x, y)));
            if !same {
                let kids: Vec<String> = n
                    .children()
                    .iter()
                    .map(|&c| format!("{c}: {:?}", eg[c].data.dist))
                    .collect();
                return Err(format!(
                    "e-node {n:?} ({kids:?}) of class {} ({:?}) computes another value",
                    class.id, class.data.dist
                ));
            }
            rep.nodes += 1;
            if class.data.dist != Dist::Rep {
                rep.part_nodes += 1;
            }
        }
    }
    let mut applied: Vec<(String, usize)> = sat.rules_applied.into_iter().collect();
    applied.sort();
    rep.rules_applied = applied;
    Ok(rep)
}
