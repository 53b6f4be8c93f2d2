//! Split algebra (tensat): `Split` as channel/row `Slice`s and back, `Concat` of adjacent
//! slices (so `Concat(Split(x)) = x`), `Split(Concat(a, b)) = (a, b)` when the sizes match,
//! slices through elementwise ops (a Split of an elementwise op is the elementwise op of
//! the Splits), and a grouped Conv as the Concat of two Convs over halves of its groups
//! (and two equal Convs over concatenated inputs as one grouped Conv).

use super::linalg::{add_ints, add_slice};
use super::{data, rw_if, same_shape, union_checked, v, Rw, EG};
use crate::eqsat::analysis::{KilnAnalysis, Kind};
use crate::eqsat::language::{Kiln, BINARY, UNARY};
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use kiln_ir::ops::array::{ArrayOp, IntsArg};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::shape::norm_axis;
use kiln_ir::Op;

/// The Split rules.
pub fn rules() -> Vec<Rw> {
    let pat = |s: &str| s.parse::<Pattern<Kiln>>().expect("pattern");
    let mut r = vec![
        Rewrite::new("split-to-slices", pat("(out ?k ?t)"), SplitToSlices).expect("rule"),
        Rewrite::new(
            "slices-to-split",
            pat("(slice ?x ?st ?en ?ax ?sp)"),
            SlicesToSplit,
        )
        .expect("rule"),
        Rewrite::new("split-concat", pat("(out ?k ?t)"), SplitConcat).expect("rule"),
        Rewrite::new(
            "concat-slices",
            pat("(concat ?c (slice ?x ?s1 ?e1 ?a1 ?p1) (slice ?x ?s2 ?e2 ?a2 ?p2))"),
            ConcatSlices,
        )
        .expect("rule"),
        Rewrite::new("slice-full", pat("(slice ?x ?st ?en ?ax ?sp)"), SliceFull).expect("rule"),
        Rewrite::new("conv-group-split", pat("(conv ?at ?x ?w ?b)"), GroupSplit).expect("rule"),
        Rewrite::new(
            "conv-group-join",
            pat("(concat ?c (conv ?at ?x1 ?w1 ?b1) (conv ?at ?x2 ?w2 ?b2))"),
            GroupJoin,
        )
        .expect("rule"),
    ];
    let sl = |x: &str| format!("(slice {x} ?st ?en ?ax ?sp)");
    for (u, _, _) in UNARY {
        r.push(super::rw(
            &format!("slice-sink-{u}"),
            &sl(&format!("({u} ?x)")),
            &format!("({u} {})", sl("?x")),
        ));
        r.push(super::rw(
            &format!("slice-lift-{u}"),
            &format!("({u} {})", sl("?x")),
            &sl(&format!("({u} ?x)")),
        ));
    }
    for (b, _, _) in BINARY {
        r.push(rw_if(
            &format!("slice-sink-{b}"),
            &sl(&format!("({b} ?a ?b)")),
            &format!("({b} {} {})", sl("?a"), sl("?b")),
            same_shape("?a", "?b"),
        ));
        r.push(rw_if(
            &format!("slice-lift-{b}"),
            &format!("({b} {} {})", sl("?a"), sl("?b")),
            &sl(&format!("({b} ?a ?b)")),
            same_shape("?a", "?b"),
        ));
    }
    r
}

/// A constant int64 vector's values.
fn ints_of(eg: &EG, c: Id) -> Option<Vec<i64>> {
    let t = eg[c].data.value()?;
    (!t.dtype().is_float()).then(|| t.to_i64_vec())
}

/// The range a slice e-node `(slice x st en ax sp)` selects when it is one axis, step 1:
/// `(axis, start, end)` clamped to the axis of `x`.
pub(crate) fn slice_range(eg: &EG, c: &[Id; 5]) -> Option<(usize, usize, usize)> {
    let [x, st, en, ax, sp] = *c;
    let shape = eg[x].data.shape()?;
    let (st, en) = (ints_of(eg, st)?, ints_of(eg, en)?);
    if st.len() != 1 || en.len() != 1 {
        return None;
    }
    let axis = match eg[ax].data.kind {
        Kind::None => 0,
        _ => *ints_of(eg, ax)?.first()?,
    };
    match eg[sp].data.kind {
        Kind::None => {}
        _ if ints_of(eg, sp)? == [1] => {}
        _ => return None,
    }
    let axis = norm_axis(axis, shape.len()).ok()?;
    let d = shape[axis] as i64;
    let norm = |i: i64| (if i < 0 { i + d } else { i }).clamp(0, d) as usize;
    let (s, e) = (norm(st[0]), norm(en[0]));
    (s <= e).then_some((axis, s, e))
}

/// The Split op of a tuple class: `(axis, part sizes, input class)`.
fn split_of(eg: &EG, t: Id) -> Option<(usize, Vec<usize>, Id)> {
    let d = &eg[t].data;
    if d.kind != Kind::Tuple {
        return None;
    }
    for n in eg[t].iter() {
        let Kiln::Op(c) = n else { continue };
        let Some(k) = c.first().and_then(|&a| eg[a].data.attr) else {
            continue;
        };
        let Some(Op::Array(ArrayOp::Split { axis, .. })) = eg.analysis.op(k).map(|e| &e.op) else {
            continue;
        };
        let x = *c.get(1)?;
        let shape = eg[x].data.shape()?;
        let ax = norm_axis(*axis, shape.len()).ok()?;
        let sizes: Option<Vec<usize>> = d
            .facts
            .iter()
            .map(|f| f.shape.as_known().map(|s| s[ax]))
            .collect();
        return Some((ax, sizes?, eg.find(x)));
    }
    None
}

/// Output `k` of `Split(x)` is `Slice(x, offset_k, offset_k + size_k)` on the split axis.
struct SplitToSlices;

impl Applier<Kiln, KilnAnalysis> for SplitToSlices {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (Some(k), Some((ax, sizes, x))) = (
            data(eg, subst, v("?k")).int,
            split_of(eg, eg.find(subst[v("?t")])),
        ) else {
            return vec![];
        };
        let Some(k) = usize::try_from(k).ok().filter(|&k| k < sizes.len()) else {
            return vec![];
        };
        let start: usize = sizes[..k].iter().sum();
        let s = add_slice(eg, x, ax as i64, start, start + sizes[k]);
        union_checked(eg, eclass, s)
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?k"), v("?t")]
    }
}

/// Slices of `x` (one axis, step 1) that tile the axis exactly become the outputs of one
/// `Split(x)` (one kernel instead of several).
struct SlicesToSplit;

impl Applier<Kiln, KilnAnalysis> for SlicesToSplit {
    fn apply_one(
        &self,
        eg: &mut EG,
        _eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let x = eg.find(subst[v("?x")]);
        let me = [
            x,
            subst[v("?st")],
            subst[v("?en")],
            subst[v("?ax")],
            subst[v("?sp")],
        ]
        .map(|i| eg.find(i));
        let Some((axis, s0, e0)) = slice_range(eg, &me) else {
            return vec![];
        };
        let Some(shape) = eg[x].data.shape() else {
            return vec![];
        };
        // the other slices of x on this axis: (start, end, class)
        let mut parts: Vec<(usize, usize, Id)> = vec![];
        for p in eg[x].parents() {
            if let Kiln::Slice(c) = eg.id_to_node(p) {
                let c = c.map(|i| eg.find(i));
                if c[0] != x {
                    continue;
                }
                if let Some((a, s, e)) = slice_range(eg, &c) {
                    if a == axis && s < e {
                        parts.push((s, e, eg.find(p)));
                    }
                }
            }
        }
        parts.sort();
        parts.dedup();
        // a chain 0 = s_0 < e_0 = s_1 < ... = dim through this slice
        let mut chain: Vec<(usize, usize, Id)> = vec![];
        let mut cur = 0;
        while cur < shape[axis] {
            let want = if s0 == cur && s0 < e0 {
                parts.iter().find(|p| p.0 == s0 && p.1 == e0)
            } else {
                parts
                    .iter()
                    .find(|p| p.0 == cur && (p.1 <= s0 || cur >= e0))
            };
            let Some(&p) = want else {
                return vec![];
            };
            chain.push(p);
            cur = p.1;
        }
        if chain.len() < 2 || !chain.iter().any(|p| p.0 == s0 && p.1 == e0) {
            return vec![];
        }
        let sizes: Vec<i64> = chain.iter().map(|p| (p.1 - p.0) as i64).collect();
        let op = Op::Array(ArrayOp::Split {
            axis: axis as i64,
            split: IntsArg::Input(1),
            outputs: chain.len(),
        });
        let key = eg.analysis.intern_op(&op, chain.len());
        let a = eg.add(Kiln::Attr(key));
        let sz = add_ints(eg, &sizes);
        let t = eg.add(Kiln::Op(vec![a, x, sz].into()));
        let mut changed = vec![];
        for (i, &(_, _, c)) in chain.iter().enumerate() {
            let k = eg.add(Kiln::Int(i as i64));
            let o = eg.add(Kiln::Out([k, t]));
            changed.extend(union_checked(eg, c, o));
        }
        changed
    }

    fn vars(&self) -> Vec<Var> {
        ["?x", "?st", "?en", "?ax", "?sp"]
            .iter()
            .map(|n| v(n))
            .collect()
    }
}

/// Output `k` of `Split(Concat(a_0, .., a_n))` on the concat axis is `a_k` when the part
/// sizes are the sizes of the concat inputs.
struct SplitConcat;

impl Applier<Kiln, KilnAnalysis> for SplitConcat {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (Some(k), Some((ax, sizes, x))) = (
            data(eg, subst, v("?k")).int,
            split_of(eg, eg.find(subst[v("?t")])),
        ) else {
            return vec![];
        };
        let Some(rank) = eg[x].data.shape().map(|s| s.len()) else {
            return vec![];
        };
        let cats: Vec<Vec<Id>> = eg[x]
            .iter()
            .filter_map(|n| match n {
                Kiln::Concat(c) => Some(c.to_vec()),
                _ => None,
            })
            .collect();
        for c in cats {
            let Some(cax) = eg[c[0]].data.int.and_then(|a| norm_axis(a, rank).ok()) else {
                continue;
            };
            let parts = &c[1..];
            let psizes: Option<Vec<usize>> = parts
                .iter()
                .map(|&p| eg[p].data.shape().map(|s| s[ax]))
                .collect();
            if cax == ax && psizes.as_deref() == Some(&sizes[..]) {
                if let Some(&p) = usize::try_from(k).ok().and_then(|k| parts.get(k)) {
                    return union_checked(eg, eclass, p);
                }
            }
        }
        vec![]
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?k"), v("?t")]
    }
}

/// `Concat(Slice(x, a..b), Slice(x, b..c))` on the sliced axis is `Slice(x, a..c)`.
struct ConcatSlices;

impl Applier<Kiln, KilnAnalysis> for ConcatSlices {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let x = eg.find(subst[v("?x")]);
        let g = |n: [&str; 4]| {
            [
                x,
                subst[v(n[0])],
                subst[v(n[1])],
                subst[v(n[2])],
                subst[v(n[3])],
            ]
        };
        let (Some((a1, s1, e1)), Some((a2, s2, e2)), Some(rank)) = (
            slice_range(eg, &g(["?s1", "?e1", "?a1", "?p1"])),
            slice_range(eg, &g(["?s2", "?e2", "?a2", "?p2"])),
            eg[x].data.shape().map(|s| s.len()),
        ) else {
            return vec![];
        };
        let cax = data(eg, subst, v("?c"))
            .int
            .and_then(|a| norm_axis(a, rank).ok());
        if cax != Some(a1) || a1 != a2 || e1 != s2 || s1 >= e1 || s2 >= e2 {
            return vec![];
        }
        let s = add_slice(eg, x, a1 as i64, s1, e2);
        union_checked(eg, eclass, s)
    }

    fn vars(&self) -> Vec<Var> {
        [
            "?c", "?x", "?s1", "?e1", "?a1", "?p1", "?s2", "?e2", "?a2", "?p2",
        ]
        .iter()
        .map(|n| v(n))
        .collect()
    }
}

/// A slice of the whole axis is its input.
struct SliceFull;

impl Applier<Kiln, KilnAnalysis> for SliceFull {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let x = eg.find(subst[v("?x")]);
        let c = [
            x,
            subst[v("?st")],
            subst[v("?en")],
            subst[v("?ax")],
            subst[v("?sp")],
        ]
        .map(|i| eg.find(i));
        match (slice_range(eg, &c), eg[x].data.shape()) {
            (Some((a, 0, e)), Some(s)) if e == s[a] => union_checked(eg, eclass, x),
            _ => vec![],
        }
    }

    fn vars(&self) -> Vec<Var> {
        ["?x", "?st", "?en", "?ax", "?sp"]
            .iter()
            .map(|n| v(n))
            .collect()
    }
}

/// The Conv op with `group` replaced.
fn with_group(eg: &mut EG, at: Id, group: usize) -> Option<Id> {
    let k = eg[at].data.attr?;
    let Some(Op::Nn(NnOp::Conv(mut c))) = eg.analysis.op(k).map(|e| e.op.clone()) else {
        return None;
    };
    c.group = group;
    let k = eg.analysis.intern_op(&Op::Nn(NnOp::Conv(c)), 1);
    Some(eg.add(Kiln::Attr(k)))
}

fn conv_group(eg: &EG, at: Id) -> Option<usize> {
    let k = eg[at].data.attr?;
    match eg.analysis.op(k).map(|e| &e.op) {
        Some(Op::Nn(NnOp::Conv(c))) => Some(c.group),
        _ => None,
    }
}

/// A Conv with an even number `g` of groups is the channel Concat of two Convs with `g/2`
/// groups, over the two halves of the input channels, weights and bias (one level: a Conv
/// over a slice is not split again, which bounds the e-graph growth).
struct GroupSplit;

impl Applier<Kiln, KilnAnalysis> for GroupSplit {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (at, x, w, b) = (
            eg.find(subst[v("?at")]),
            eg.find(subst[v("?x")]),
            eg.find(subst[v("?w")]),
            eg.find(subst[v("?b")]),
        );
        let (Some(g), Some(sx), Some(sw)) =
            (conv_group(eg, at), eg[x].data.shape(), eg[w].data.shape())
        else {
            return vec![];
        };
        if g < 2 || g % 2 != 0 || sx.len() < 3 || sw[0] % 2 != 0 || sx[1] % 2 != 0 {
            return vec![];
        }
        // one level only: the halves (over slices of x) are not split again
        if eg[x].nodes.iter().any(|n| matches!(n, Kiln::Slice(_))) {
            return vec![];
        }
        let Some(half) = with_group(eg, at, g / 2) else {
            return vec![];
        };
        let (c, m) = (sx[1] / 2, sw[0] / 2);
        let none = eg[b].data.kind == Kind::None;
        let branch = |eg: &mut EG, i: usize| {
            let xs = add_slice(eg, x, 1, i * c, (i + 1) * c);
            let ws = add_slice(eg, w, 0, i * m, (i + 1) * m);
            let bs = if none {
                b
            } else {
                add_slice(eg, b, 0, i * m, (i + 1) * m)
            };
            eg.add(Kiln::Conv([half, xs, ws, bs]))
        };
        let (y0, y1) = (branch(eg, 0), branch(eg, 1));
        let ax = eg.add(Kiln::Int(1));
        let y = eg.add(Kiln::Concat(vec![ax, y0, y1].into()));
        union_checked(eg, eclass, y)
    }

    fn vars(&self) -> Vec<Var> {
        ["?at", "?x", "?w", "?b"].iter().map(|n| v(n)).collect()
    }
}

/// Two Convs with the same attributes and shapes over different inputs, concatenated on
/// channels, are one Conv with twice the groups over the concatenated inputs, weights and
/// biases (TASO's grouped-conv merge).
struct GroupJoin;

impl Applier<Kiln, KilnAnalysis> for GroupJoin {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let f = |n: &str| eg.find(subst[v(n)]);
        let (at, x1, x2, w1, w2, b1, b2) = (
            f("?at"),
            f("?x1"),
            f("?x2"),
            f("?w1"),
            f("?w2"),
            f("?b1"),
            f("?b2"),
        );
        let sh = |i: Id| eg[i].data.shape();
        let (Some(g), Some(sx)) = (conv_group(eg, at), sh(x1)) else {
            return vec![];
        };
        let cax = data(eg, subst, v("?c"))
            .int
            .and_then(|a| norm_axis(a, sx.len()).ok());
        let (n1, n2) = (
            eg[b1].data.kind == Kind::None,
            eg[b2].data.kind == Kind::None,
        );
        if cax != Some(1)
            || sx.len() < 3
            || sh(x2).as_ref() != Some(&sx)
            || sh(w1).is_none()
            || sh(w1) != sh(w2)
            || n1 != n2
            || (!n1 && sh(b1) != sh(b2))
        {
            return vec![];
        }
        let Some(dbl) = with_group(eg, at, 2 * g) else {
            return vec![];
        };
        let (a1, a0) = (eg.add(Kiln::Int(1)), eg.add(Kiln::Int(0)));
        let x = eg.add(Kiln::Concat(vec![a1, x1, x2].into()));
        let w = eg.add(Kiln::Concat(vec![a0, w1, w2].into()));
        let b = if n1 {
            b1
        } else {
            eg.add(Kiln::Concat(vec![a0, b1, b2].into()))
        };
        let y = eg.add(Kiln::Conv([dbl, x, w, b]));
        union_checked(eg, eclass, y)
    }

    fn vars(&self) -> Vec<Var> {
        ["?c", "?at", "?x1", "?x2", "?w1", "?w2", "?b1", "?b2"]
            .iter()
            .map(|n| v(n))
            .collect()
    }
}
