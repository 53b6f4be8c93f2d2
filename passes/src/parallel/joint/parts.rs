//! The parallel rules of the joint search (see the parent module's doc): each adds, for a
//! replicated value, an equal value computed on parts, and records the part e-node's
//! replicated twin.

use super::Twins;
use crate::eqsat::analysis::{Data, KilnAnalysis, KilnEGraph, Kind};
use crate::eqsat::dist::{self, Dist};
use crate::eqsat::language::Kiln;
use crate::eqsat::rules::apply_fn;
use egg::{ENodeOrVar, Id, Language, Pattern, Rewrite, Subst, Var};
use kiln_ir::Tensor;
use std::sync::Arc;

type EG = KilnEGraph;

/// The classes of pattern variables `names` in a match.
fn ids<const N: usize>(subst: &Subst, names: [&str; N]) -> [Id; N] {
    names.map(|n| subst[var(n)])
}

fn var(s: &str) -> Var {
    s.parse().expect("pattern variable")
}

fn int_leaf(eg: &mut EG, v: usize) -> Id {
    eg.add(Kiln::Int(v as i64))
}

pub(super) fn is_weight(eg: &EG, c: Id) -> bool {
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
pub(super) fn column(eg: &mut EG, eclass: Id, subst: &Subst, k: usize, twins: &Twins) -> Vec<Id> {
    let [x, w] = ids(subst, ["?x", "?w"]);
    let ok = eg[eclass].data.dist == Dist::Rep
        && eg[x].data.dist == Dist::Rep
        && eg[x].data.shape().is_some_and(|s| s.len() >= 2)
        && is_weight(eg, w)
        && eg[w]
            .data
            .shape()
            .is_some_and(|s| s.len() == 2 && s[1] % k == 0 && s[1] >= k);
    if !ok {
        return vec![];
    }
    let (one, k) = (int_leaf(eg, 1), int_leaf(eg, k));
    let sw = eg.add(Kiln::Shard([one, k, w]));
    match add_local(eg, twins, Kiln::MatMul([x, sw]), Kiln::MatMul([x, w])) {
        Some(new) => union_same(eg, eclass, new),
        None => vec![],
    }
}

/// `tp-row`: `(matmul (gather last k y) W)` = `(allreduce k (matmul y (shard 0 k W)))` for
/// a constant 2-D `W`.
pub(super) fn row(eg: &mut EG, eclass: Id, subst: &Subst, k: usize, twins: &Twins) -> Vec<Id> {
    let [a, kk, y, w] = ids(subst, ["?a", "?k", "?y", "?w"]);
    let ok = eg[eclass].data.dist == Dist::Rep
        && eg[y].data.dist
            == (Dist::Split {
                axis: eg[y].data.shape().map_or(usize::MAX, |s| s.len() - 1),
                k,
            })
        && is_weight(eg, w)
        && eg[w]
            .data
            .shape()
            .is_some_and(|s| s.len() == 2 && s[0] % k == 0);
    if !ok {
        return vec![];
    }
    let gy = eg.add(Kiln::Gather([a, kk, y]));
    let (zero, k) = (int_leaf(eg, 0), int_leaf(eg, k));
    let sw = eg.add(Kiln::Shard([zero, k, w]));
    match add_local(eg, twins, Kiln::MatMul([y, sw]), Kiln::MatMul([gy, w])) {
        Some(new) => union_same(eg, eclass, new),
        None => vec![],
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
pub(super) fn column_conv(
    eg: &mut EG,
    eclass: Id,
    subst: &Subst,
    k: usize,
    twins: &Twins,
) -> Vec<Id> {
    let [o, x, w, b] = ids(subst, ["?o", "?x", "?w", "?b"]);
    let no_bias = eg[b].data.kind == Kind::None;
    let ok = eg[eclass].data.dist == Dist::Rep
        && eg[x].data.dist == Dist::Rep
        && conv_group(eg, o) == Some(1)
        && is_weight(eg, w)
        && (no_bias || is_weight(eg, b))
        && eg[w]
            .data
            .shape()
            .is_some_and(|s| s.len() == 4 && s[0] % k == 0 && s[0] >= k);
    if !ok {
        return vec![];
    }
    let (zero, k) = (int_leaf(eg, 0), int_leaf(eg, k));
    let sw = eg.add(Kiln::Shard([zero, k, w]));
    let sb = if no_bias {
        b
    } else {
        eg.add(Kiln::Shard([zero, k, b]))
    };
    let local = Kiln::Conv([o, x, sw, sb]);
    match add_local(eg, twins, local, Kiln::Conv([o, x, w, b])) {
        Some(new) => union_same(eg, eclass, new),
        None => vec![],
    }
}

/// `tp-row-conv`: `(conv o (gather 1 k y) W b)` = `(allreduce k (conv o y (shard 1 k W)
/// none))` + `b` as `[C, 1, 1]` (the bias added once, after the sum).
pub(super) fn row_conv(eg: &mut EG, eclass: Id, subst: &Subst, k: usize, twins: &Twins) -> Vec<Id> {
    let [o, a, kk, y, w, b] = ids(subst, ["?o", "?a", "?k", "?y", "?w", "?b"]);
    let ok = eg[eclass].data.dist == Dist::Rep
        && eg[y].data.dist == (Dist::Split { axis: 1, k })
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
    let (one, k) = (int_leaf(eg, 1), int_leaf(eg, k));
    let sw = eg.add(Kiln::Shard([one, k, w]));
    let global = Kiln::Conv([o, gy, w, none]);
    eg.add(global.clone());
    let Some(sum) = add_local(eg, twins, Kiln::Conv([o, y, sw, none]), global) else {
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

/// `tp-sink-*`: an op applied to gathered / all-reduced inputs = the gather / all-reduce of
/// the op applied to the parts (for any op the layout analysis accepts on parts). A
/// replicated full-size operand of a binary op is sharded along the split axis.
/// The class of a child sub-pattern (existing: the pattern matched), and the part it
/// stands for when it is a `gather` / `allreduce`.
fn child(lhs: &Pattern<Kiln>, eg: &mut EG, subst: &Subst, at: Id) -> Option<(Id, Option<Id>)> {
    let ast = lhs.ast.as_ref();
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

pub(super) fn sink(
    eg: &mut EG,
    eclass: Id,
    subst: &Subst,
    lhs: &Pattern<Kiln>,
    twins: &Twins,
) -> Vec<Id> {
    if eg[eclass].data.dist != Dist::Rep {
        return vec![];
    }
    let ast = lhs.ast.as_ref();
    let ENodeOrVar::ENode(root) = &ast[ast.len() - 1] else {
        return vec![];
    };
    let mut globals = Vec::new();
    let mut locals = Vec::new();
    for &c in root.children() {
        let Some((g, part)) = child(lhs, eg, subst, c) else {
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
    if let Some(new) = add_local(eg, twins, build(&plain), global.clone()) {
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
    match add_local(eg, twins, build(&ids), global) {
        Some(new) => union_same(eg, eclass, new),
        None => vec![],
    }
}

/// `tp-sink-reshape`: `(reshape (gather a k y) s)` = `(gather b k (reshape y s'))` where the
/// split axis stays a block of whole chunks (`s'`: the output shape with axis `b` / k).
pub(super) fn sink_reshape(
    eg: &mut EG,
    eclass: Id,
    subst: &Subst,
    k: usize,
    twins: &Twins,
) -> Vec<Id> {
    let [a, kk, y, s] = ids(subst, ["?a", "?k", "?y", "?s"]);
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
    let Some((b, sizes)) =
        crate::parallel::propagate::map_reshape(&is, &os, ax, &vec![is[ax] / k; k])
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
    match add_local(eg, twins, Kiln::Reshape([y, sl]), Kiln::Reshape([gy, s])) {
        Some(new)
            if dist::reshape_axis(&eg[y].data.shape().unwrap_or_default(), &local, ax)
                == Some(b) =>
        {
            union_same(eg, eclass, new)
        }
        _ => vec![],
    }
}

/// A rule whose right-hand side is a function of `(e-graph, matched class, substitution, k,
/// twins)`.
type RuleFn = fn(&mut EG, Id, &Subst, usize, &Twins) -> Vec<Id>;

/// The parallel rules for a group of `k` (see the module doc), recording local e-nodes'
/// twins in `twins`.
pub(super) fn parallel_rules(k: usize, twins: &Twins) -> Vec<Rewrite<Kiln, KilnAnalysis>> {
    let pat = |s: &str| -> Pattern<Kiln> { s.parse().expect("pattern") };
    let fixed: [(&str, &str, RuleFn); 5] = [
        ("tp-column", "(matmul ?x ?w)", column),
        ("tp-row", "(matmul (gather ?a ?k ?y) ?w)", row),
        ("tp-column-conv", "(conv ?o ?x ?w ?b)", column_conv),
        ("tp-row-conv", "(conv ?o (gather ?a ?k ?y) ?w ?b)", row_conv),
        (
            "tp-sink-reshape",
            "(reshape (gather ?a ?k ?y) ?s)",
            sink_reshape,
        ),
    ];
    let mut r: Vec<Rewrite<Kiln, KilnAnalysis>> = fixed
        .into_iter()
        .map(|(name, lhs, f)| {
            let t = twins.clone();
            apply_fn(name, pat(lhs), move |eg, c, s| f(eg, c, s, k, &t))
        })
        .collect();
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
        let t = twins.clone();
        let lhs = p.clone();
        r.push(apply_fn(&name, p, move |eg, c, s| sink(eg, c, s, &lhs, &t)));
    }
    r
}
