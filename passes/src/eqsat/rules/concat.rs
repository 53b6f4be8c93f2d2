//! Concat/Slice algebra: single-input and nested concats, elementwise ops, scalings,
//! transposes and pooling over concats (tensat's batching rules), the geometry of nested
//! concatenation, and slices that select exactly one input of a concat.

use super::{data, rank_is, rw, rw_if, same_shape, scalar, v, Rw, EG};
use crate::eqsat::analysis::Kind;
use crate::eqsat::language::UNARY;
use egg::{Id, Subst};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::shape::norm_axis;
use kiln_ir::Op;

/// `(slice (concat ?ax ?a ?b) ?st ?en ?axes ?steps)` selects exactly `?a` (`first`) or `?b`.
fn slice_selects(first: bool) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    move |eg, _, s| {
        let one = |name: &str| -> Option<i64> {
            let t = data(eg, s, v(name)).value()?;
            (t.len() == 1 && !t.dtype().is_float()).then(|| t.to_i64_vec()[0])
        };
        let (Some(sa), Some(sb)) = (data(eg, s, v("?a")).shape(), data(eg, s, v("?b")).shape())
        else {
            return false;
        };
        let Some(ax) = data(eg, s, v("?ax")).int else {
            return false;
        };
        let r = sa.len();
        let (Ok(ax), Some(st), Some(en), Some(axes)) =
            (norm_axis(ax, r), one("?st"), one("?en"), one("?axes"))
        else {
            return false;
        };
        if norm_axis(axes, r) != Ok(ax) || sb.len() != r {
            return false;
        }
        let steps_ok = match data(eg, s, v("?steps")).kind {
            Kind::None => true,
            _ => one("?steps") == Some(1),
        };
        let (la, lb) = (sa[ax] as i64, sb[ax] as i64);
        steps_ok
            && if first {
                st == 0 && en == la
            } else {
                st == la && en >= la + lb
            }
    }
}

/// `?x`/`?z` and `?y`/`?w` have the same size on `axis` (and equal ranks of at least 2):
/// `concat 0 (concat 1 x y) (concat 1 z w)` is then `concat 1 (concat 0 x z) (concat 0 y w)`.
fn same_dim(axis: usize) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    move |eg, _, s| {
        let sh = |n: &str| data(eg, s, v(n)).shape();
        match (sh("?x"), sh("?y"), sh("?z"), sh("?w")) {
            (Some(x), Some(y), Some(z), Some(w)) => {
                x.len() >= 2
                    && [&y, &z, &w].iter().all(|t| t.len() == x.len())
                    && x[axis] == z[axis]
                    && y[axis] == w[axis]
            }
            _ => false,
        }
    }
}

/// The reverse: `?x`/`?y` and `?z`/`?w` have the same size on `axis`.
fn same_dim_rev(axis: usize) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    move |eg, _, s| {
        let sh = |n: &str| data(eg, s, v(n)).shape();
        match (sh("?x"), sh("?y"), sh("?z"), sh("?w")) {
            (Some(x), Some(y), Some(z), Some(w)) => {
                x.len() >= 2
                    && [&y, &z, &w].iter().all(|t| t.len() == x.len())
                    && x[axis] == y[axis]
                    && z[axis] == w[axis]
            }
            _ => false,
        }
    }
}

/// `?p` is a single-output pooling op (MaxPool, AveragePool/LpPool, global pooling).
fn pool(p: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let p = v(p);
    move |eg, _, s| {
        data(eg, s, p)
            .attr
            .and_then(|k| eg.analysis.op(k))
            .is_some_and(|e| {
                e.outputs == 1
                    && matches!(
                        e.op,
                        Op::Nn(NnOp::MaxPool(_) | NnOp::Pool(_) | NnOp::GlobalPool(_))
                    )
            })
    }
}

/// The Concat/Slice rules.
pub fn rules() -> Vec<Rw> {
    let mut r = vec![
        rw("concat-single", "(concat ?ax ?a)", "?a"),
        rw(
            "concat-flatten-l",
            "(concat ?ax (concat ?ax ?a ?b) ?c)",
            "(concat ?ax ?a ?b ?c)",
        ),
        rw(
            "concat-flatten-r",
            "(concat ?ax ?a (concat ?ax ?b ?c))",
            "(concat ?ax ?a ?b ?c)",
        ),
        rw_if(
            "slice-concat-first",
            "(slice (concat ?ax ?a ?b) ?st ?en ?axes ?steps)",
            "?a",
            slice_selects(true),
        ),
        rw_if(
            "slice-concat-second",
            "(slice (concat ?ax ?a ?b) ?st ?en ?axes ?steps)",
            "?b",
            slice_selects(false),
        ),
    ];
    // tensat's geometry-of-concatenation, both ways
    r.push(rw_if(
        "concat-geometry",
        "(concat 0 (concat 1 ?x ?y) (concat 1 ?z ?w))",
        "(concat 1 (concat 0 ?x ?z) (concat 0 ?y ?w))",
        same_dim(1),
    ));
    r.push(rw_if(
        "concat-geometry-rev",
        "(concat 1 (concat 0 ?x ?z) (concat 0 ?y ?w))",
        "(concat 0 (concat 1 ?x ?y) (concat 1 ?z ?w))",
        same_dim_rev(0),
    ));
    r.push(rw_if(
        "concat-scale",
        "(concat ?ax (mul ?x ?s) (mul ?y ?s))",
        "(mul (concat ?ax ?x ?y) ?s)",
        scalar("?s"),
    ));
    // concatenation-and-transpose (matrices)
    for (a, b) in [(1, 0), (0, 1)] {
        r.push(rw_if(
            &format!("concat-transpose-{a}"),
            &format!("(concat {a} (transpose [1,0] ?x) (transpose [1,0] ?y))"),
            &format!("(transpose [1,0] (concat {b} ?x ?y))"),
            rank_is("?x", 2),
        ));
    }
    // concatenation-and-pooling: pooling acts per batch item and channel
    for a in [0, 1] {
        r.push(rw_if(
            &format!("concat-pool-{a}"),
            &format!("(concat {a} (op ?p ?x) (op ?p ?y))"),
            &format!("(op ?p (concat {a} ?x ?y))"),
            pool("?p"),
        ));
    }
    for b in ["add", "mul"] {
        let cond = {
            let ab = same_shape("?a", "?b");
            let cd = same_shape("?c", "?d");
            move |eg: &mut EG, id: Id, s: &Subst| ab(eg, id, s) && cd(eg, id, s)
        };
        r.push(rw_if(
            &format!("concat-{b}"),
            &format!("(concat ?ax ({b} ?a ?b) ({b} ?c ?d))"),
            &format!("({b} (concat ?ax ?a ?c) (concat ?ax ?b ?d))"),
            cond,
        ));
    }
    for (u, _, _) in UNARY {
        r.push(rw(
            &format!("concat-{u}"),
            &format!("(concat ?ax ({u} ?a) ({u} ?b))"),
            &format!("({u} (concat ?ax ?a ?b))"),
        ));
    }
    r
}
