//! Layout rewrites: Transpose/Reshape cancellation and composition, sinking Transpose and
//! Reshape through unary and same-shape binary elementwise ops (both directions, so the
//! extractor can move layout changes to where they cancel or fold into constants).

use super::{data, rw, rw_if, same_shape, union_checked, v, Rw, EG};
use crate::eqsat::analysis::KilnAnalysis;
use crate::eqsat::language::{Ints, Kiln, UNARY};
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};

/// `p` is the identity permutation.
fn identity_perm(p: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let p = v(p);
    move |eg, _, s| {
        data(eg, s, p)
            .ints
            .as_ref()
            .is_some_and(|p| p.iter().enumerate().all(|(i, &q)| q == i as i64))
    }
}

/// `s` is a constant shape without `0` entries (so it does not copy input dims).
fn no_copy_dims(s: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let s = v(s);
    move |eg, _, sb| {
        data(eg, sb, s)
            .value()
            .is_some_and(|t| t.to_i64_vec().iter().all(|&d| d != 0))
    }
}

/// The Reshape of `x` leaves its shape unchanged.
fn reshape_noop(x: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let x = v(x);
    move |eg, id, s| {
        let xs = data(eg, s, x).shape();
        xs.is_some() && eg[id].data.shape() == xs
    }
}

/// The layout rules.
pub fn rules() -> Vec<Rw> {
    let mut r = vec![
        rw_if(
            "transpose-identity",
            "(transpose ?p ?x)",
            "?x",
            identity_perm("?p"),
        ),
        rw_if(
            "reshape-reshape",
            "(reshape (reshape ?x ?s1) ?s2)",
            "(reshape ?x ?s2)",
            no_copy_dims("?s2"),
        ),
        rw_if(
            "reshape-identity",
            "(reshape ?x ?s)",
            "?x",
            reshape_noop("?x"),
        ),
        Rewrite::new(
            "transpose-transpose",
            "(transpose ?p (transpose ?q ?x))"
                .parse::<Pattern<Kiln>>()
                .expect("pattern"),
            ComposeTransposes,
        )
        .expect("rule"),
    ];
    for (u, _, _) in UNARY {
        r.push(rw(
            &format!("transpose-sink-{u}"),
            &format!("(transpose ?p ({u} ?x))"),
            &format!("({u} (transpose ?p ?x))"),
        ));
        r.push(rw(
            &format!("transpose-lift-{u}"),
            &format!("({u} (transpose ?p ?x))"),
            &format!("(transpose ?p ({u} ?x))"),
        ));
        r.push(rw(
            &format!("reshape-sink-{u}"),
            &format!("(reshape ({u} ?x) ?s)"),
            &format!("({u} (reshape ?x ?s))"),
        ));
        r.push(rw(
            &format!("reshape-lift-{u}"),
            &format!("({u} (reshape ?x ?s))"),
            &format!("(reshape ({u} ?x) ?s)"),
        ));
    }
    for b in ["add", "mul", "sub", "div"] {
        r.push(rw_if(
            &format!("transpose-sink-{b}"),
            &format!("(transpose ?p ({b} ?a ?c))"),
            &format!("({b} (transpose ?p ?a) (transpose ?p ?c))"),
            same_shape("?a", "?c"),
        ));
        r.push(rw_if(
            &format!("transpose-lift-{b}"),
            &format!("({b} (transpose ?p ?a) (transpose ?p ?c))"),
            &format!("(transpose ?p ({b} ?a ?c))"),
            same_shape("?a", "?c"),
        ));
        r.push(rw_if(
            &format!("reshape-lift-{b}"),
            &format!("({b} (reshape ?a ?s) (reshape ?c ?s))"),
            &format!("(reshape ({b} ?a ?c) ?s)"),
            same_shape("?a", "?c"),
        ));
    }
    r
}

/// `transpose(p, transpose(q, x)) = transpose(q∘p, x)` (or `x` when that is the identity).
struct ComposeTransposes;

impl Applier<Kiln, KilnAnalysis> for ComposeTransposes {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (Some(p), Some(q)) = (
            data(eg, subst, v("?p")).ints.clone(),
            data(eg, subst, v("?q")).ints.clone(),
        ) else {
            return vec![];
        };
        if p.len() != q.len() {
            return vec![];
        }
        let mut r = Vec::with_capacity(p.len());
        for &i in &p {
            match usize::try_from(i).ok().and_then(|i| q.get(i)) {
                Some(&j) => r.push(j),
                None => return vec![],
            }
        }
        let x = subst[v("?x")];
        let new = if r.iter().enumerate().all(|(i, &j)| j == i as i64) {
            x
        } else {
            let perm = eg.add(Kiln::Ints(Ints(r)));
            eg.add(Kiln::Transpose([perm, x]))
        };
        union_checked(eg, eclass, new)
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?p"), v("?q"), v("?x")]
    }
}
