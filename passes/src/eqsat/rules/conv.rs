//! Convolution rules: merging parallel Convs that share an input (tensat), folding an
//! inference BatchNormalization into the Conv before it, and moving a scalar scale into the
//! weights and bias.

use super::linalg::{add_slice, is_concat};
use super::{data, present, rw_if, scalar, union_checked, v, Rw, EG};
use crate::eqsat::analysis::{KilnAnalysis, Kind};
use crate::eqsat::language::Kiln;
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{Op, Tensor};
use std::sync::Arc;

/// The Conv rules.
pub fn rules() -> Vec<Rw> {
    let pat = |s: &str| s.parse::<Pattern<Kiln>>().expect("pattern");
    let bias_and_scale = {
        let (sc, pr) = (scalar("?s"), present("?b"));
        move |eg: &mut EG, id: Id, s: &Subst| sc(eg, id, s) && pr(eg, id, s)
    };
    vec![
        rw_if(
            "conv-scale",
            "(mul (conv ?at ?x ?w ?b) ?s)",
            "(conv ?at ?x (mul ?w ?s) (mul ?b ?s))",
            bias_and_scale,
        ),
        rw_if(
            "conv-scale-nobias",
            "(mul (conv ?at ?x ?w none) ?s)",
            "(conv ?at ?x (mul ?w ?s) none)",
            scalar("?s"),
        ),
        Rewrite::new(
            "merge-parallel-conv",
            pat("(conv ?at ?x ?w ?b)"),
            MergeParallelConv,
        )
        .expect("rule"),
        Rewrite::new(
            "conv-bn-fold",
            pat("(op ?bn (conv ?at ?x ?w ?b) ?sc ?be ?mu ?var)"),
            FoldBatchNorm,
        )
        .expect("rule"),
    ]
}

/// `conv(x, W1, b1)` and `conv(x, W2, b2)` with the same attributes (group 1) become slices
/// of `conv(x, concat(W1, W2), concat(b1, b2))` along the channel axis.
struct MergeParallelConv;

impl Applier<Kiln, KilnAnalysis> for MergeParallelConv {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let at = eg.find(subst[v("?at")]);
        let x = eg.find(subst[v("?x")]);
        let w = eg.find(subst[v("?w")]);
        let b = eg.find(subst[v("?b")]);
        let Some(k) = eg[at].data.attr else {
            return vec![];
        };
        if !matches!(eg.analysis.op(k).map(|e| &e.op), Some(Op::Nn(NnOp::Conv(c))) if c.group == 1)
        {
            return vec![];
        }
        let Some(sw) = eg[w].data.shape() else {
            return vec![];
        };
        if is_concat(eg, w) {
            return vec![];
        }
        let b_none = eg[b].data.kind == Kind::None;
        let mut sibs = vec![];
        for p in eg[x].parents() {
            if let Kiln::Conv([at2, x2, w2, b2]) = eg.id_to_node(p) {
                let (at2, x2, w2, b2) = (eg.find(*at2), eg.find(*x2), eg.find(*w2), eg.find(*b2));
                if at2 != at || x2 != x || w2 <= w || is_concat(eg, w2) {
                    continue;
                }
                let Some(sw2) = eg[w2].data.shape() else {
                    continue;
                };
                if sw2.len() == sw.len()
                    && sw2[1..] == sw[1..]
                    && (eg[b2].data.kind == Kind::None) == b_none
                {
                    sibs.push((eg.find(p), w2, b2, sw2[0]));
                }
            }
        }
        sibs.sort();
        sibs.dedup();
        let mut changed = vec![];
        for (sib, w2, b2, m2) in sibs.into_iter().take(4) {
            let ax = eg.add(Kiln::Int(0));
            let cw = eg.add(Kiln::Concat(vec![ax, w, w2].into()));
            let cb = if b_none {
                eg.add(Kiln::NoneArg([]))
            } else {
                eg.add(Kiln::Concat(vec![ax, b, b2].into()))
            };
            let y = eg.add(Kiln::Conv([at, x, cw, cb]));
            let s1 = add_slice(eg, y, 1, 0, sw[0]);
            let s2 = add_slice(eg, y, 1, sw[0], sw[0] + m2);
            changed.extend(union_checked(eg, eclass, s1));
            changed.extend(union_checked(eg, sib, s2));
        }
        changed
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?at"), v("?x"), v("?w"), v("?b")]
    }
}

/// Inference `BatchNormalization(conv(x, W, b), scale, beta, mean, var)` with constant
/// parameters: `conv(x, W * f, (b - mean) * f + beta)` with `f = scale / sqrt(var + eps)`.
struct FoldBatchNorm;

impl Applier<Kiln, KilnAnalysis> for FoldBatchNorm {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let Some(k) = data(eg, subst, v("?bn")).attr else {
            return vec![];
        };
        let eps = match eg.analysis.op(k) {
            Some(e) => match &e.op {
                Op::Nn(NnOp::BatchNormalization(a))
                    if !a.training && !a.per_activation && e.outputs == 1 =>
                {
                    a.epsilon as f64
                }
                _ => return vec![],
            },
            None => return vec![],
        };
        let val = |n: &str| data(eg, subst, v(n)).value().cloned();
        let (Some(w), Some(sc), Some(be), Some(mu), Some(var)) =
            (val("?w"), val("?sc"), val("?be"), val("?mu"), val("?var"))
        else {
            return vec![];
        };
        let b = val("?b");
        if b.is_none() && data(eg, subst, v("?b")).kind != Kind::None {
            return vec![];
        }
        let m = w.shape().first().copied().unwrap_or(0);
        let vec_ok = |t: &Tensor| t.len() == m && t.dtype().is_float();
        if m == 0 || ![&sc, &be, &mu, &var].iter().all(|t| vec_ok(t)) || !w.dtype().is_float() {
            return vec![];
        }
        if b.as_ref().is_some_and(|b| !vec_ok(b)) {
            return vec![];
        }
        let (sc, be, mu, var) = (
            sc.to_f64_vec(),
            be.to_f64_vec(),
            mu.to_f64_vec(),
            var.to_f64_vec(),
        );
        let f: Vec<f64> = (0..m).map(|i| sc[i] / (var[i] + eps).sqrt()).collect();
        let per = w.len() / m;
        let wv: Vec<f64> = w
            .to_f64_vec()
            .iter()
            .enumerate()
            .map(|(i, x)| x * f[i / per])
            .collect();
        let bv0 = b.map(|b| b.to_f64_vec()).unwrap_or_else(|| vec![0.0; m]);
        let bv: Vec<f64> = (0..m).map(|i| (bv0[i] - mu[i]) * f[i] + be[i]).collect();
        let dt = w.dtype();
        let wt = Tensor::from_vec(w.shape(), wv).cast(dt);
        let bt = Tensor::from_vec(&[m], bv).cast(dt);
        let wk = eg.analysis.add_const(Arc::new(wt), None);
        let bk = eg.analysis.add_const(Arc::new(bt), None);
        let (wn, bn) = (eg.add(Kiln::Const(wk)), eg.add(Kiln::Const(bk)));
        let y = eg.add(Kiln::Conv([subst[v("?at")], subst[v("?x")], wn, bn]));
        union_checked(eg, eclass, y)
    }

    fn vars(&self) -> Vec<Var> {
        ["?bn", "?at", "?x", "?w", "?b", "?sc", "?be", "?mu", "?var"]
            .iter()
            .map(|n| v(n))
            .collect()
    }
}
