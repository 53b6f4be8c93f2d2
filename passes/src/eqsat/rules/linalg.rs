//! MatMul algebra (tensat's set): associativity, distributivity over Add, scaling, the
//! transpose of a product, MatMul over Concat both ways, merging parallel MatMuls that share
//! an input into one over concatenated weights (and so splitting back), and Gemm as
//! MatMul + Add.

use super::{data, rank, rank_ge, rank_is, same_shape, scalar, v, Rw, EG};
use crate::eqsat::analysis::Kind;
use crate::eqsat::language::Kiln;
use egg::{rewrite, Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::{Op, Tensor};
use std::sync::Arc;

/// `p` swaps the last two axes and keeps the others; `a` and `b` have rank `len(p)` and the
/// same batch dims.
fn swap_last_two(p: &str, a: &str, b: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let (p, a, b) = (v(p), v(a), v(b));
    move |eg, _, s| {
        let Some(perm) = data(eg, s, p).ints.clone() else {
            return false;
        };
        let n = perm.len();
        let (Some(sa), Some(sb)) = (data(eg, s, a).shape(), data(eg, s, b).shape()) else {
            return false;
        };
        n >= 2
            && sa.len() == n
            && sb.len() == n
            && sa[..n - 2] == sb[..n - 2]
            && (0..n).all(|i| {
                let want = match i {
                    i if i == n - 2 => n - 1,
                    i if i == n - 1 => n - 2,
                    i => i,
                };
                perm[i] == want as i64
            })
    }
}

/// Matrices `x [m, a]`, `y [a, n]`, `z [m, b]`, `w [b, n]`: `x y + z w` is
/// `concat(x, z) concat(y, w)` over the inner dimension.
fn inner_parts() -> impl Fn(&mut EG, Id, &Subst) -> bool {
    move |eg, _, s| {
        let sh = |n: &str| data(eg, s, v(n)).shape();
        match (sh("?x"), sh("?y"), sh("?z"), sh("?w")) {
            (Some(x), Some(y), Some(z), Some(w)) => {
                [&x, &y, &z, &w].iter().all(|t| t.len() == 2)
                    && x[1] == y[0]
                    && z[1] == w[0]
                    && x[0] == z[0]
                    && y[1] == w[1]
            }
            _ => false,
        }
    }
}

/// The MatMul rules.
pub fn rules() -> Vec<Rw> {
    let mut r = vec![
        rewrite!("matmul-assoc"; "(matmul (matmul ?a ?b) ?c)" => "(matmul ?a (matmul ?b ?c))"
            if rank_ge("?a", 2) if rank_is("?b", 2) if rank_is("?c", 2)),
        rewrite!("matmul-assoc-rev"; "(matmul ?a (matmul ?b ?c))" => "(matmul (matmul ?a ?b) ?c)"
            if rank_ge("?a", 2) if rank_is("?b", 2) if rank_is("?c", 2)),
        rewrite!("matmul-distrib-r"; "(matmul ?a (add ?b ?c))"
            => "(add (matmul ?a ?b) (matmul ?a ?c))"
            if rank_ge("?a", 2) if rank_ge("?b", 2) if same_shape("?b", "?c")),
        rewrite!("matmul-factor-r"; "(add (matmul ?a ?b) (matmul ?a ?c))"
            => "(matmul ?a (add ?b ?c))"
            if rank_ge("?a", 2) if rank_ge("?b", 2) if same_shape("?b", "?c")),
        rewrite!("matmul-distrib-l"; "(matmul (add ?a ?b) ?c)"
            => "(add (matmul ?a ?c) (matmul ?b ?c))"
            if rank_ge("?c", 2) if rank_ge("?a", 2) if same_shape("?a", "?b")),
        rewrite!("matmul-factor-l"; "(add (matmul ?a ?c) (matmul ?b ?c))"
            => "(matmul (add ?a ?b) ?c)"
            if rank_ge("?c", 2) if rank_ge("?a", 2) if same_shape("?a", "?b")),
        rewrite!("matmul-scale-l"; "(matmul (mul ?a ?s) ?b)" => "(mul (matmul ?a ?b) ?s)"
            if scalar("?s") if rank_ge("?a", 2) if rank_ge("?b", 2)),
        rewrite!("matmul-scale-r"; "(matmul ?a (mul ?b ?s))" => "(mul (matmul ?a ?b) ?s)"
            if scalar("?s") if rank_ge("?a", 2) if rank_ge("?b", 2)),
        rewrite!("scale-into-matmul-r"; "(mul (matmul ?a ?b) ?s)" => "(matmul ?a (mul ?b ?s))"
            if scalar("?s") if rank_ge("?a", 2) if rank_ge("?b", 2)),
        rewrite!("scale-into-matmul-l"; "(mul (matmul ?a ?b) ?s)" => "(matmul (mul ?a ?s) ?b)"
            if scalar("?s") if rank_ge("?a", 2) if rank_ge("?b", 2)),
        rewrite!("matmul-neg"; "(matmul (neg ?a) ?b)" => "(neg (matmul ?a ?b))"
            if rank_ge("?a", 2) if rank_ge("?b", 2)),
        rewrite!("transpose-matmul"; "(transpose ?p (matmul ?a ?b))"
            => "(matmul (transpose ?p ?b) (transpose ?p ?a))" if swap_last_two("?p", "?a", "?b")),
        rewrite!("matmul-transpose"; "(matmul (transpose ?p ?b) (transpose ?p ?a))"
            => "(transpose ?p (matmul ?a ?b))" if swap_last_two("?p", "?a", "?b")),
        rewrite!("matmul-concat-split"; "(matmul ?a (concat -1 ?b ?c))"
            => "(concat -1 (matmul ?a ?b) (matmul ?a ?c))"
            if rank_ge("?a", 2) if rank_is("?b", 2) if rank_is("?c", 2)),
        rewrite!("matmul-concat-join"; "(concat -1 (matmul ?a ?b) (matmul ?a ?c))"
            => "(matmul ?a (concat -1 ?b ?c))"
            if rank_ge("?a", 2) if rank_is("?b", 2) if rank_is("?c", 2)),
        rewrite!("matmul-rows-split"; "(matmul (concat -2 ?a ?c) ?b)"
            => "(concat -2 (matmul ?a ?b) (matmul ?c ?b))"
            if rank_is("?a", 2) if rank_is("?c", 2) if rank_is("?b", 2)),
        rewrite!("matmul-rows-join"; "(concat -2 (matmul ?a ?b) (matmul ?c ?b))"
            => "(matmul (concat -2 ?a ?c) ?b)"
            if rank_is("?a", 2) if rank_is("?c", 2) if rank_is("?b", 2)),
        // concatenation-and-matrix-mul-1: a product over a split inner dimension
        rewrite!("matmul-concat-inner"; "(matmul (concat -1 ?x ?z) (concat -2 ?y ?w))"
            => "(add (matmul ?x ?y) (matmul ?z ?w))"
            if inner_parts()),
        rewrite!("matmul-add-join"; "(add (matmul ?x ?y) (matmul ?z ?w))"
            => "(matmul (concat -1 ?x ?z) (concat -2 ?y ?w))"
            if inner_parts()),
    ];
    r.push(
        Rewrite::new(
            "merge-parallel-matmul",
            "(matmul ?a ?b)".parse::<Pattern<Kiln>>().expect("pattern"),
            MergeParallelMatMul,
        )
        .expect("rule"),
    );
    r.push(
        Rewrite::new(
            "merge-stacked-matmul",
            "(matmul ?a ?b)".parse::<Pattern<Kiln>>().expect("pattern"),
            MergeStackedMatMul { biased: false },
        )
        .expect("rule"),
    );
    r.push(
        Rewrite::new(
            "merge-stacked-linear",
            "(add (matmul ?a ?b) ?c)"
                .parse::<Pattern<Kiln>>()
                .expect("pattern"),
            MergeStackedMatMul { biased: true },
        )
        .expect("rule"),
    );
    r.push(super::apply_fn(
        "merge-shared-weight",
        "(matmul ?a ?b)".parse::<Pattern<Kiln>>().expect("pattern"),
        merge_shared_weight,
    ));
    r.push(
        Rewrite::new(
            "gemm-to-matmul",
            "(op ?g ?a ?b ?c)"
                .parse::<Pattern<Kiln>>()
                .expect("pattern"),
            GemmToMatMul,
        )
        .expect("rule"),
    );
    r
}

/// Adds the int64 vector constant `vals` (shapes, slice bounds).
pub(crate) fn add_ints(eg: &mut EG, vals: &[i64]) -> Id {
    let k = eg.analysis.add_const(Arc::new(Tensor::vec_i64(vals)), None);
    eg.add(Kiln::Const(k))
}

/// Adds `(slice x [start] [end] [axis] none)` on one axis.
pub(crate) fn add_slice(eg: &mut EG, x: Id, axis: i64, start: usize, end: usize) -> Id {
    let st = add_ints(eg, &[start as i64]);
    let en = add_ints(eg, &[end as i64]);
    let ax = add_ints(eg, &[axis]);
    let none = eg.add(Kiln::NoneArg([]));
    eg.add(Kiln::Slice([x, st, en, ax, none]))
}

/// `x @ B` and `x @ C` (rank-2 `B`, `C` with the same rows) become slices of
/// `x @ concat(B, C)`: tensat's multi-pattern rule for Q/K/V and gate/up projections.
/// The searcher matches one product; the applier finds its siblings through the parents of
/// `x`.
struct MergeParallelMatMul;

impl Applier<Kiln, crate::eqsat::analysis::KilnAnalysis> for MergeParallelMatMul {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (a, b) = (subst[v("?a")], subst[v("?b")]);
        let (Some(ra), Some(sb)) = (rank(eg, subst, v("?a")), data(eg, subst, v("?b")).shape())
        else {
            return vec![];
        };
        if ra < 2 || sb.len() != 2 {
            return vec![];
        }
        let dt = eg[b].data.fact().map(|f| f.dtype);
        let a = eg.find(a);
        let b = eg.find(b);
        // merge original weights only (pairs): merging merged products again grows the
        // e-graph combinatorially
        if is_concat(eg, b) {
            return vec![];
        }
        // siblings: matmul(a, c) with c rank 2, same rows and dtype
        let mut sibs: Vec<(Id, Id, usize)> = Vec::new();
        for p in eg[a].parents() {
            if let Kiln::MatMul([x, c]) = eg.id_to_node(p) {
                let (x, c) = (eg.find(*x), eg.find(*c));
                if x != a || c == b || is_concat(eg, c) {
                    continue;
                }
                let d = &eg[c].data;
                if let (Some(sc), Some(f)) = (d.shape(), d.fact()) {
                    if sc.len() == 2 && sc[0] == sb[0] && Some(f.dtype) == dt {
                        sibs.push((eg.find(p), c, sc[1]));
                    }
                }
            }
        }
        sibs.sort();
        sibs.dedup();
        let mut changed = vec![];
        // only merge with siblings that come after b in id order: each pair once
        for (sib_class, c, nc) in sibs.into_iter().filter(|s| s.1 > b).take(4) {
            let ax = eg.add(Kiln::Int(-1));
            let cat = eg.add(Kiln::Concat(vec![ax, b, c].into()));
            let m = eg.add(Kiln::MatMul([a, cat]));
            let s1 = add_slice(eg, m, -1, 0, sb[1]);
            let s2 = add_slice(eg, m, -1, sb[1], sb[1] + nc);
            if eg.union(eclass, s1) {
                changed.push(eclass);
            }
            if eg.union(sib_class, s2) {
                changed.push(sib_class);
            }
        }
        changed
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?a"), v("?b")]
    }
}

/// `x @ W₀`, `x @ W₁`, … `x @ Wₙ₋₁` (rank-2 `x`, rank-2 weights of one shape `[K, N]`, all
/// the products of `x` with such weights: Q/K/V, gate/up) become the `n` planes of one
/// batched product `x @ stack(W)` (`[n, M, N]`, `x` broadcast over the stack): plane `i` is
/// `reshape(slice(P, i, i + 1, axis 0), [M, N])`, a contiguous range of `P` — a view, unlike
/// the column slices of [`MergeParallelMatMul`]'s product, so the merged product costs no
/// split. One e-node group per sibling set (applied from its lowest-id weight only).
///
/// `biased` (rule `merge-stacked-linear`): projections with a bias, `x @ Wᵢ + bᵢ` (`bᵢ` of
/// shape `[N]`, either operand order), when every product of the group has one: the
/// biases are stacked too, `x @ stack(W) + stack(b)` with `stack(b)` of shape `[n, 1, N]`,
/// so the bias runs in the batched product's epilogue instead of as one kernel per plane
/// after the split.
struct MergeStackedMatMul {
    biased: bool,
}

impl Applier<Kiln, crate::eqsat::analysis::KilnAnalysis> for MergeStackedMatMul {
    fn apply_one(
        &self,
        eg: &mut EG,
        _eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (a, b) = (eg.find(subst[v("?a")]), eg.find(subst[v("?b")]));
        let Some(s) = stacked_group(eg, a, b) else {
            return vec![];
        };
        let mut classes: Vec<Id> = s.group.iter().map(|g| g.1).collect();
        let mut biases = Vec::new();
        if self.biased {
            for c in &mut classes {
                let Some((bias, add)) = bias_add_of(eg, *c, s.n, s.dtype) else {
                    return vec![];
                };
                biases.push(bias);
                *c = add;
            }
        }
        let mut prod = stacked_product(eg, a, &s);
        if self.biased {
            let stacked_bias = stack_planes(eg, &biases, &[1, 1, s.n]);
            prod = eg.add(Kiln::Add([prod, stacked_bias]));
        }
        union_planes(eg, prod, &classes, s.m, s.n)
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?a"), v("?b")]
    }
}

/// The products of one rank-2 `a` with rank-2 weights of one shape and dtype (see
/// [`MergeStackedMatMul`]), when `b` is the lowest-id weight of 2 to 16 of them.
struct StackedGroup {
    /// `(weight, product class)`, by weight id.
    group: Vec<(Id, Id)>,
    m: i64,
    k: i64,
    n: i64,
    dtype: kiln_ir::DType,
}

fn stacked_group(eg: &EG, a: Id, b: Id) -> Option<StackedGroup> {
    let (sa, sb) = (eg[a].data.shape()?, eg[b].data.shape()?);
    let dtype = eg[b].data.fact().map(|f| f.dtype)?;
    if sa.len() != 2 || sb.len() != 2 || is_concat(eg, b) {
        return None;
    }
    // every product of `a` with a weight of b's shape and dtype, by weight id
    let mut group: Vec<(Id, Id)> = Vec::new();
    for p in eg[a].parents() {
        if let Kiln::MatMul([x, c]) = eg.id_to_node(p) {
            let (x, c) = (eg.find(*x), eg.find(*c));
            let d = &eg[c].data;
            if x == a
                && !is_concat(eg, c)
                && d.shape() == Some(sb.clone())
                && d.fact().map(|f| f.dtype) == Some(dtype)
            {
                group.push((c, eg.find(p)));
            }
        }
    }
    group.sort();
    group.dedup_by_key(|g| g.0);
    if group.len() < 2 || group[0].0 != b || group.len() > 16 {
        return None;
    }
    Some(StackedGroup {
        group,
        m: sa[0] as i64,
        k: sb[0] as i64,
        n: sb[1] as i64,
        dtype,
    })
}

/// Adds `a @ concat(reshape(Wᵢ, [1, K, N]))`: the stacked product `[n, M, N]`.
fn stacked_product(eg: &mut EG, a: Id, s: &StackedGroup) -> Id {
    let ws: Vec<Id> = s.group.iter().map(|g| g.0).collect();
    let stack = stack_planes(eg, &ws, &[1, s.k, s.n]);
    eg.add(Kiln::MatMul([a, stack]))
}

/// Adds `concat(0, reshape(xᵢ, plane))`.
fn stack_planes(eg: &mut EG, xs: &[Id], plane: &[i64]) -> Id {
    let plane = add_ints(eg, plane);
    let ax = eg.add(Kiln::Int(0));
    let mut parts = vec![ax];
    for &x in xs {
        parts.push(eg.add(Kiln::Reshape([x, plane])));
    }
    eg.add(Kiln::Concat(parts.into()))
}

/// Unions `classes[i]` with plane `i` of `prod` (`reshape(slice(prod, i, i + 1, axis 0),
/// [m, n])`) where type and shape agree; returns the classes that changed.
fn union_planes(eg: &mut EG, prod: Id, classes: &[Id], m: i64, n: i64) -> Vec<Id> {
    let out_shape = add_ints(eg, &[m, n]);
    let mut changed = vec![];
    for (i, &class) in classes.iter().enumerate() {
        let s = add_slice(eg, prod, 0, i, i + 1);
        let r = eg.add(Kiln::Reshape([s, out_shape]));
        let same = eg[r].data.fact().map(|f| (&f.shape, f.dtype))
            == eg[class].data.fact().map(|f| (&f.shape, f.dtype));
        if same && eg.union(class, r) {
            changed.push(class);
        }
    }
    changed
}

/// The first (by id) `add(p, bias)` or `add(bias, p)` parent of product class `p` with a
/// bias of shape `[n]` and type `dtype`: `(bias, add class)`.
fn bias_add_of(eg: &EG, p: Id, n: i64, dtype: kiln_ir::DType) -> Option<(Id, Id)> {
    let p = eg.find(p);
    let mut found: Vec<(Id, Id)> = eg[p]
        .parents()
        .filter_map(|q| match eg.id_to_node(q) {
            Kiln::Add([x, y]) => {
                let (x, y) = (eg.find(*x), eg.find(*y));
                let bias = if x == p { y } else { x };
                let ok = (x == p || y == p)
                    && bias != p
                    && eg[bias].data.shape() == Some(vec![n as usize])
                    && eg[bias].data.fact().map(|f| f.dtype) == Some(dtype);
                ok.then(|| (bias, eg.find(q)))
            }
            _ => None,
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// `x₀ @ W`, `x₁ @ W`, … (rank-2 `xᵢ` of shape `[mᵢ, K]`, one weight `W` of shape `[…, K,
/// N]`, rank ≥ 2) become row slices of one product `concat(x₀, x₁, …; axis 0) @ W`, which
/// reads `W` once for all of them: an unrolled RNN's input projections over its time
/// steps. When the `xᵢ` are adjacent row ranges of one tensor (the steps' rows of a
/// sequence), their concatenation is also that one range (a view). One group per weight
/// (2 to 16 products), applied from its lowest-id left operand; left operands made by a
/// merge (concats) are not merged again.
fn merge_shared_weight(eg: &mut EG, _eclass: Id, subst: &Subst) -> Vec<Id> {
    let (a, b) = (eg.find(subst[v("?a")]), eg.find(subst[v("?b")]));
    let (Some(sb), Some(dtype)) = (eg[b].data.shape(), eg[b].data.fact().map(|f| f.dtype)) else {
        return vec![];
    };
    if sb.len() < 2 {
        return vec![];
    }
    let k = sb[sb.len() - 2];
    let mut group: Vec<(Id, Id, usize)> = Vec::new();
    for p in eg[b].parents() {
        let Kiln::MatMul([x, c]) = eg.id_to_node(p) else {
            continue;
        };
        let (x, c) = (eg.find(*x), eg.find(*c));
        let d = &eg[x].data;
        if c != b || x == b || is_concat(eg, x) || d.fact().map(|f| f.dtype) != Some(dtype) {
            continue;
        }
        if let Some(sx) = d.shape().filter(|s| s.len() == 2 && s[1] == k) {
            group.push((x, eg.find(p), sx[0]));
        }
    }
    group.sort();
    group.dedup_by_key(|g| g.0);
    if group.len() < 2 || group.len() > 16 || group[0].0 != a {
        return vec![];
    }
    // adjacent row ranges of one tensor: ordered by start, and `range` is the whole range
    let rows: Option<Vec<(Id, usize, usize)>> = group
        .iter()
        .map(|g| {
            eg[g.0].nodes.iter().find_map(|n| match n {
                Kiln::Slice(c) => match super::split::slice_range(eg, c) {
                    Some((0, s, e)) => Some((eg.find(c[0]), s, e)),
                    _ => None,
                },
                _ => None,
            })
        })
        .collect();
    let mut range = None;
    if let Some(rows) = rows {
        let mut order: Vec<usize> = (0..group.len()).collect();
        order.sort_by_key(|&i| rows[i].1);
        let adjacent = order.windows(2).all(|w| {
            let (p, q) = (rows[w[0]], rows[w[1]]);
            p.0 == q.0 && p.2 == q.1
        });
        if adjacent {
            range = Some((
                rows[order[0]].0,
                rows[order[0]].1,
                rows[order[order.len() - 1]].2,
            ));
            group = order.into_iter().map(|i| group[i]).collect();
        }
    }
    let ax = eg.add(Kiln::Int(0));
    let mut parts = vec![ax];
    parts.extend(group.iter().map(|g| g.0));
    let cat = eg.add(Kiln::Concat(parts.into()));
    if let Some((x, s, e)) = range {
        let whole = add_slice(eg, x, 0, s, e);
        super::union_checked(eg, cat, whole);
    }
    let m = eg.add(Kiln::MatMul([cat, b]));
    let mut changed = vec![];
    let mut off = 0;
    for &(_, class, rows) in &group {
        let s = add_slice(eg, m, -2, off, off + rows);
        off += rows;
        changed.extend(super::union_checked(eg, class, s));
    }
    changed
}

/// Whether the e-class holds a Concat (a weight made by a merge).
pub(crate) fn is_concat(eg: &EG, c: Id) -> bool {
    eg[c].nodes.iter().any(|n| matches!(n, Kiln::Concat(_)))
}

/// `Gemm(A, B, C)` with `alpha = beta = 1`, `transA = 0`: `A @ op(B) + C`.
struct GemmToMatMul;

impl Applier<Kiln, crate::eqsat::analysis::KilnAnalysis> for GemmToMatMul {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let Some(k) = data(eg, subst, v("?g")).attr else {
            return vec![];
        };
        let Some(Op::Linalg(LinalgOp::Gemm(g))) = eg.analysis.op(k).map(|e| e.op.clone()) else {
            return vec![];
        };
        if g.alpha != 1.0 || g.beta != 1.0 || g.trans_a {
            return vec![];
        }
        let (a, b, c) = (subst[v("?a")], subst[v("?b")], subst[v("?c")]);
        let b = if g.trans_b {
            let p = eg.add(Kiln::Ints(crate::eqsat::language::Ints(vec![1, 0])));
            eg.add(Kiln::Transpose([p, b]))
        } else {
            b
        };
        let m = eg.add(Kiln::MatMul([a, b]));
        let out = if eg[c].data.kind == Kind::None {
            m
        } else {
            eg.add(Kiln::Add([m, c]))
        };
        // only sound when the result has the Gemm's shape (C broadcasts into it)
        let same = eg[out].data.fact().map(|f| (&f.shape, f.dtype))
            == eg[eclass].data.fact().map(|f| (&f.shape, f.dtype));
        if same && eg[out].data.kind == Kind::Value && eg.union(eclass, out) {
            vec![eclass]
        } else {
            vec![]
        }
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?g"), v("?a"), v("?b"), v("?c")]
    }
}
