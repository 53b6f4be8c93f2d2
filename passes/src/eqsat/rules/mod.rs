//! The rewrite rules, one module per family, as data (`egg::rewrite!` with conditions on the
//! analysis, or small custom appliers where a rule computes new attributes or constants).
//!
//! Every rule is sound for all inputs it matches: conditions check shapes and dtypes where
//! broadcasting or ranks would otherwise change the meaning (see `passes/tests/eqsat_rules.rs`
//! for the property test of each rule).

pub mod concat;
pub mod conv;
pub mod elementwise;
pub mod layout;
pub mod linalg;
pub mod split;

use super::analysis::{Data, KilnAnalysis, Kind};
use super::language::Kiln;
use egg::{EGraph, Id, Rewrite, Subst, Var};
use kiln_ir::shape::broadcast_shapes;

/// A rewrite rule over the Kiln language.
pub type Rw = Rewrite<Kiln, KilnAnalysis>;

type EG = EGraph<Kiln, KilnAnalysis>;

/// Every rule, all families.
pub fn all() -> Vec<Rw> {
    let mut r = elementwise::rules();
    r.extend(linalg::rules());
    r.extend(layout::rules());
    r.extend(concat::rules());
    r.extend(conv::rules());
    r.extend(split::rules());
    r
}

/// The rule names, in the order of [`all`].
pub fn names() -> Vec<String> {
    all().iter().map(|r| r.name.to_string()).collect()
}

/// A pattern variable.
pub(crate) fn v(name: &str) -> Var {
    name.parse().expect("pattern variable")
}

pub(crate) fn data<'a>(eg: &'a EG, s: &Subst, x: Var) -> &'a Data {
    &eg[s[x]].data
}

pub(crate) fn rank(eg: &EG, s: &Subst, x: Var) -> Option<usize> {
    data(eg, s, x).fact().map(|f| f.shape.rank())
}

/// `x` and `y` have the same known shape and the same dtype.
pub(crate) fn same_shape(x: &str, y: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let (x, y) = (v(x), v(y));
    move |eg, _, s| {
        let (a, b) = (data(eg, s, x), data(eg, s, y));
        a.shape().is_some()
            && a.shape() == b.shape()
            && a.fact().map(|f| f.dtype) == b.fact().map(|f| f.dtype)
    }
}

/// `x` is a value of rank at least `r`.
pub(crate) fn rank_ge(x: &str, r: usize) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let x = v(x);
    move |eg, _, s| rank(eg, s, x).is_some_and(|k| k >= r)
}

/// `x` is a value of rank `r`.
pub(crate) fn rank_is(x: &str, r: usize) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let x = v(x);
    move |eg, _, s| rank(eg, s, x) == Some(r)
}

/// `c` is a one-element value of rank at most 1 (a scalar that broadcasts into anything).
pub(crate) fn scalar(c: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let c = v(c);
    move |eg, _, s| {
        data(eg, s, c).fact().is_some_and(|f| {
            f.shape.rank() <= 1 && f.shape.numel() == Some(1) && f.dtype.is_float()
        })
    }
}

/// `c` is a constant whose elements all equal `val`, of the dtype of `x`, and broadcasting
/// it against `x` keeps the shape of `x`.
pub(crate) fn fill_into(c: &str, val: f64, x: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let (c, x) = (v(c), v(x));
    move |eg, _, s| {
        let (cd, xd) = (data(eg, s, c), data(eg, s, x));
        let (Some(t), Some(xs), Some(xf)) = (cd.value(), xd.shape(), xd.fact()) else {
            return false;
        };
        t.dtype() == xf.dtype
            && broadcast_shapes(&[&xs, t.shape()]).is_ok_and(|b| b == xs)
            && t.to_f64_vec().iter().all(|&e| e == val)
    }
}

/// `c` is a float constant with all elements > 0.
pub(crate) fn positive(c: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let c = v(c);
    move |eg, _, s| {
        data(eg, s, c).value().is_some_and(|t| {
            t.dtype().is_float() && !t.is_empty() && t.to_f64_vec().iter().all(|&e| e > 0.0)
        })
    }
}

/// `x` is a present value (not `none`).
pub(crate) fn present(x: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let x = v(x);
    move |eg, _, s| data(eg, s, x).kind == Kind::Value
}

/// `x` is a value with known constant contents.
pub(crate) fn constant(x: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let x = v(x);
    move |eg, _, s| data(eg, s, x).value().is_some()
}

/// `x` has a float dtype.
pub(crate) fn float(x: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let x = v(x);
    move |eg, _, s| data(eg, s, x).fact().is_some_and(|f| f.dtype.is_float())
}

/// A rule from two pattern strings.
pub(crate) fn rw(name: &str, lhs: &str, rhs: &str) -> Rw {
    let l: egg::Pattern<Kiln> = lhs.parse().expect("lhs pattern");
    let r: egg::Pattern<Kiln> = rhs.parse().expect("rhs pattern");
    Rewrite::new(name, l, r).expect("rule")
}

/// A conditional rule from two pattern strings.
pub(crate) fn rw_if(
    name: &str,
    lhs: &str,
    rhs: &str,
    cond: impl egg::Condition<Kiln, KilnAnalysis> + Send + Sync + 'static,
) -> Rw {
    let l: egg::Pattern<Kiln> = lhs.parse().expect("lhs pattern");
    let r: egg::Pattern<Kiln> = rhs.parse().expect("rhs pattern");
    let applier = egg::ConditionalApplier {
        condition: cond,
        applier: r,
    };
    Rewrite::new(name, l, applier).expect("rule")
}

/// Unions `eclass` with `new` if `new` is a well-typed value of the same dtype and shape.
pub(crate) fn union_checked(eg: &mut EG, eclass: Id, new: Id) -> Vec<Id> {
    let same = {
        let (a, b) = (&eg[eclass].data, &eg[new].data);
        b.kind == Kind::Value
            && a.fact().map(|f| (&f.shape, f.dtype)) == b.fact().map(|f| (&f.shape, f.dtype))
    };
    if same && eg.union(eclass, new) {
        vec![eclass]
    } else {
        vec![]
    }
}

/// A rule whose right-hand side is a function of the match: `f(e-graph, matched class,
/// substitution)` adds e-nodes and returns the classes it changed.
pub(crate) fn apply_fn(
    name: &str,
    lhs: egg::Pattern<Kiln>,
    f: impl Fn(&mut EG, Id, &Subst) -> Vec<Id> + Send + Sync + 'static,
) -> Rw {
    let vars = <egg::Pattern<Kiln> as egg::Searcher<Kiln, KilnAnalysis>>::vars(&lhs);
    Rewrite::new(name, lhs, ApplyFn { vars, f }).expect("rule")
}

struct ApplyFn<F> {
    vars: Vec<Var>,
    f: F,
}

impl<F> egg::Applier<Kiln, KilnAnalysis> for ApplyFn<F>
where
    F: Fn(&mut EG, Id, &Subst) -> Vec<Id> + Send + Sync + 'static,
{
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&egg::PatternAst<Kiln>>,
        _rule: egg::Symbol,
    ) -> Vec<Id> {
        (self.f)(eg, eclass, subst)
    }

    fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }
}
