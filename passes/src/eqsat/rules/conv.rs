//! Convolution rules: kernel enlargement and merging parallel Convs that share an input,
//! also with different kernel sizes (tensat), folding an
//! inference BatchNormalization into the Conv before it, and moving a scalar scale into the
//! weights and bias.

use super::linalg::{add_slice, is_concat};
use super::{data, present, rank_ge, rw_if, same_shape, scalar, union_checked, v, Rw, EG};
use crate::eqsat::analysis::{KilnAnalysis, Kind};
use crate::eqsat::language::Kiln;
use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use kiln_ir::ops::array::{ArrayOp, IntsArg, PadMode};
use kiln_ir::ops::nn::{AutoPad, ConvAttrs, NnOp, WindowAttrs};
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
        Rewrite::new("conv-enlarge", pat("(conv ?at ?x ?w ?b)"), EnlargeConv).expect("rule"),
        // A 1×1 Conv (stride 1, no padding) mixes channels at each position; an average
        // pool averages each channel over a window with a divisor that depends on the
        // position only: the two commute. The bias commutes too unless padded taps count
        // as zeros (`count_include_pad` with pads). Targeted, against e-graph growth:
        // the Conv moves before the pool when the pool's input has another 1×1 Conv it
        // can merge with (Inception's pool branch), and the pool moves before the Conv
        // when the Conv widens the channels (the pool then averages fewer of them).
        rw_if(
            "avgpool-conv1x1-swap",
            "(conv ?at (op ?p ?x) ?w ?b)",
            "(op ?p (conv ?at ?x ?w ?b))",
            all_of(vec![
                Box::new(pool_commutes_with_conv("?p", "?at", "?w", "?b")),
                Box::new(has_1x1_conv_sibling("?x")),
            ]),
        ),
        rw_if(
            "conv1x1-avgpool-swap",
            "(op ?p (conv ?at ?x ?w ?b))",
            "(conv ?at (op ?p ?x) ?w ?b)",
            all_of(vec![
                Box::new(pool_commutes_with_conv("?p", "?at", "?w", "?b")),
                Box::new(widens("?w", "?x")),
            ]),
        ),
        Rewrite::new(
            "merge-parallel-conv",
            pat("(conv ?at ?x ?w ?b)"),
            MergeParallelConv,
        )
        .expect("rule"),
        // tensat's conv-is-bilinear rules: a scalar on the input moves to the weights;
        // Convs of one input add up over summed weights, Convs with one weight over
        // summed inputs (zero padding keeps both linear)
        rw_if(
            "conv-input-scale",
            "(conv ?at (mul ?x ?s) ?w ?b)",
            "(conv ?at ?x (mul ?w ?s) ?b)",
            scalar("?s"),
        ),
        rw_if(
            "conv-factor-w",
            "(add (conv ?at ?x ?w1 ?b1) (conv ?at ?x ?w2 ?b2))",
            "(conv ?at ?x (add ?w1 ?w2) (add ?b1 ?b2))",
            all_of(vec![
                Box::new(same_shape("?w1", "?w2")),
                Box::new(same_shape("?b1", "?b2")),
            ]),
        ),
        rw_if(
            "conv-factor-w-nobias",
            "(add (conv ?at ?x ?w1 none) (conv ?at ?x ?w2 none))",
            "(conv ?at ?x (add ?w1 ?w2) none)",
            same_shape("?w1", "?w2"),
        ),
        rw_if(
            "conv-factor-x",
            "(add (conv ?at ?x1 ?w ?b1) (conv ?at ?x2 ?w ?b2))",
            "(conv ?at (add ?x1 ?x2) ?w (add ?b1 ?b2))",
            all_of(vec![
                Box::new(same_shape("?x1", "?x2")),
                Box::new(same_shape("?b1", "?b2")),
            ]),
        ),
        rw_if(
            "conv-factor-x-nobias",
            "(add (conv ?at ?x1 ?w none) (conv ?at ?x2 ?w none))",
            "(conv ?at (add ?x1 ?x2) ?w none)",
            same_shape("?x1", "?x2"),
        ),
        // concatenation-and-conv: along the batch, and along input channels (a sum)
        rw_if(
            "conv-batch-join",
            "(concat 0 (conv ?at ?x ?w ?b) (conv ?at ?y ?w ?b))",
            "(conv ?at (concat 0 ?x ?y) ?w ?b)",
            rank_ge("?x", 3),
        ),
        rw_if(
            "conv-batch-split",
            "(conv ?at (concat 0 ?x ?y) ?w ?b)",
            "(concat 0 (conv ?at ?x ?w ?b) (conv ?at ?y ?w ?b))",
            rank_ge("?x", 3),
        ),
        rw_if(
            "conv-add-join",
            "(add (conv ?at ?x ?y none) (conv ?at ?z ?w none))",
            "(conv ?at (concat 1 ?x ?z) (concat 1 ?y ?w) none)",
            channel_parts(),
        ),
        rw_if(
            "conv-channel-split",
            "(conv ?at (concat 1 ?x ?z) (concat 1 ?y ?w) none)",
            "(add (conv ?at ?x ?y none) (conv ?at ?z ?w none))",
            channel_parts(),
        ),
        Rewrite::new(
            "conv-bn-fold",
            pat("(op ?bn (conv ?at ?x ?w ?b) ?sc ?be ?mu ?var)"),
            FoldBatchNorm,
        )
        .expect("rule"),
    ]
}

/// A condition that holds when all of `conds` hold.
pub(crate) type Cond = Box<dyn Fn(&mut EG, Id, &Subst) -> bool + Send + Sync>;

/// All of `conds`.
pub(crate) fn all_of(conds: Vec<Cond>) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    move |eg, id, s| conds.iter().all(|c| c(eg, id, s))
}

/// `conv(x, y) + conv(z, w)` = `conv(concat(x, z), concat(y, w))` on channels: a Conv of
/// group 1, `x`/`z` with the same batch and spatial dims, `y`/`w` with the same output
/// channels and kernel, and each weight's input channels those of its input.
fn channel_parts() -> impl Fn(&mut EG, Id, &Subst) -> bool {
    move |eg, _, s| {
        let sh = |n: &str| data(eg, s, v(n)).shape();
        let group_one = data(eg, s, v("?at"))
            .attr
            .and_then(|k| eg.analysis.op(k))
            .is_some_and(|e| matches!(&e.op, Op::Nn(NnOp::Conv(c)) if c.group == 1));
        let (Some(x), Some(y), Some(z), Some(w)) = (sh("?x"), sh("?y"), sh("?z"), sh("?w")) else {
            return false;
        };
        group_one
            && x.len() >= 3
            && [&y, &z, &w].iter().all(|t| t.len() == x.len())
            && x[0] == z[0]
            && x[2..] == z[2..]
            && y[0] == w[0]
            && y[2..] == w[2..]
            && x[1] == y[1]
            && z[1] == w[1]
    }
}

/// The canonical attributes two Convs over the same input get when both kernels are
/// zero-padded to their per-axis maximum: `(attrs, pads of W1, pads of W2)`, the pads as a
/// `Pad` list over the weight (`[0, 0, e.., 0, 0, e..]`). `None` when the Convs differ in
/// group, stride or dilation, use `auto_pad`, have weights of other ranks or input
/// channels, a kernel difference that is odd, or pads that do not line up after enlarging
/// (so the outputs would not be the same windows).
pub(crate) fn enlarge_pair(
    a1: &ConvAttrs,
    s1: &[usize],
    a2: &ConvAttrs,
    s2: &[usize],
) -> Option<(ConvAttrs, Vec<i64>, Vec<i64>)> {
    let (w1, w2) = (&a1.window, &a2.window);
    let r = s1.len().checked_sub(2)?;
    if r == 0
        || s2.len() != s1.len()
        || s1[1] != s2[1]
        || a1.group != a2.group
        || w1.auto_pad != AutoPad::NotSet
        || w2.auto_pad != AutoPad::NotSet
        || w1.check_rank(r).is_err()
        || w2.check_rank(r).is_err()
    {
        return None;
    }
    let (mut kernel, mut strides, mut dils, mut pb, mut pe) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut e1, mut e2) = (vec![], vec![]);
    for i in 0..r {
        let (k1, k2) = (s1[2 + i], s2[2 + i]);
        let kernel_ok =
            |w: &WindowAttrs, k: usize| w.kernel_shape.as_ref().is_none_or(|ks| ks[i] == k);
        if w1.stride(i) != w2.stride(i)
            || w1.dilation(i) != w2.dilation(i)
            || !kernel_ok(w1, k1)
            || !kernel_ok(w2, k2)
            || k1.abs_diff(k2) % 2 != 0
        {
            return None;
        }
        let k = k1.max(k2);
        let d = w1.dilation(i);
        let (x1, x2) = ((k - k1) / 2, (k - k2) / 2);
        let (b1, n1) = w1.pad(i, r);
        let (b2, n2) = w2.pad(i, r);
        if b1 + x1 * d != b2 + x2 * d || n1 + x1 * d != n2 + x2 * d {
            return None;
        }
        kernel.push(k);
        strides.push(w1.stride(i));
        dils.push(d);
        pb.push(b1 + x1 * d);
        pe.push(n1 + x1 * d);
        e1.push(x1 as i64);
        e2.push(x2 as i64);
    }
    pb.extend(pe);
    let attrs = ConvAttrs {
        window: WindowAttrs {
            auto_pad: AutoPad::NotSet,
            kernel_shape: Some(kernel),
            strides: Some(strides),
            dilations: Some(dils),
            pads: Some(pb),
        },
        group: a1.group,
    };
    let pads = |e: Vec<i64>| {
        let mut p = vec![0, 0];
        p.extend(&e);
        p.extend([0, 0]);
        p.extend(&e);
        p
    };
    Some((attrs, pads(e1), pads(e2)))
}

/// `?p` is an AveragePool and `?at`/`?w` a 1×1 Conv with stride 1 and no padding (any
/// group), and the bias `?b` is absent or the pool does not count padded taps (see the
/// `avgpool-conv1x1-swap` rule).
fn pool_commutes_with_conv(
    p: &str,
    at: &str,
    w: &str,
    b: &str,
) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let (p, at, w, b) = (v(p), v(at), v(w), v(b));
    move |eg, _, s| {
        let pool = match data(eg, s, p).attr.and_then(|k| eg.analysis.op(k)) {
            Some(e) if e.outputs == 1 => match &e.op {
                Op::Nn(NnOp::Pool(pa)) => pa.clone(),
                _ => return false,
            },
            _ => return false,
        };
        let kiln_ir::ops::nn::PoolKind::Average { count_include_pad } = pool.kind else {
            return false;
        };
        let padded = pool.window.auto_pad != AutoPad::NotSet
            && pool.window.auto_pad != AutoPad::Valid
            || pool
                .window
                .pads
                .as_ref()
                .is_some_and(|q| q.iter().any(|&x| x > 0));
        if count_include_pad && padded && data(eg, s, b).kind == Kind::Value {
            return false;
        }
        let Some(c) = conv_attrs(eg, s[at]) else {
            return false;
        };
        let ones = |x: &Option<Vec<usize>>| x.as_ref().is_none_or(|d| d.iter().all(|&e| e == 1));
        let zeros = |x: &Option<Vec<usize>>| x.as_ref().is_none_or(|d| d.iter().all(|&e| e == 0));
        let w_1x1 = data(eg, s, w)
            .shape()
            .is_some_and(|d| d.len() >= 3 && d[2..].iter().all(|&e| e == 1));
        w_1x1
            && ones(&c.window.kernel_shape)
            && ones(&c.window.strides)
            && zeros(&c.window.pads)
            && matches!(c.window.auto_pad, AutoPad::NotSet | AutoPad::Valid)
    }
}

/// `x` feeds a Conv with a 1×1 weight directly (a merge partner for a 1×1 Conv moved onto
/// `x`).
fn has_1x1_conv_sibling(x: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let x = v(x);
    move |eg, _, s| {
        let x = eg.find(s[x]);
        eg[x].parents().any(|p| match eg.id_to_node(p) {
            Kiln::Conv([_, input, w, _]) => {
                eg.find(*input) == x
                    && eg[*w]
                        .data
                        .shape()
                        .is_some_and(|d| d.len() >= 3 && d[2..].iter().all(|&e| e == 1))
            }
            _ => false,
        })
    }
}

/// A Conv with weight `w` (`[O, ...]`) over `x` (`[N, C, ...]`) has more output channels
/// than input channels.
fn widens(w: &str, x: &str) -> impl Fn(&mut EG, Id, &Subst) -> bool {
    let (w, x) = (v(w), v(x));
    move |eg, _, s| match (data(eg, s, w).shape(), data(eg, s, x).shape()) {
        (Some(dw), Some(dx)) if !dw.is_empty() && dx.len() >= 2 => dw[0] > dx[1],
        _ => false,
    }
}

/// The Conv attributes of an `@K` attribute class.
fn conv_attrs(eg: &EG, at: Id) -> Option<ConvAttrs> {
    let k = eg[at].data.attr?;
    match eg.analysis.op(k).map(|e| &e.op) {
        Some(Op::Nn(NnOp::Conv(c))) => Some(c.clone()),
        _ => None,
    }
}

/// `w` zero-padded by `pads` (a weight list `[0, 0, e.., 0, 0, e..]`); `w` itself when all
/// pads are zero. With a constant `w` the analysis folds the Pad.
fn pad_weight(eg: &mut EG, w: Id, pads: &[i64]) -> Id {
    if pads.iter().all(|&p| p == 0) {
        return w;
    }
    let op = Op::Array(ArrayOp::Pad {
        mode: PadMode::Constant,
        pads: IntsArg::Attr(pads.to_vec()),
        value: 0.0,
        axes: IntsArg::Default,
    });
    let k = eg.analysis.intern_op(&op, 1);
    let a = eg.add(Kiln::Attr(k));
    eg.add(Kiln::Op(vec![a, w].into()))
}

/// Adds the Conv with canonical attributes `attrs` over the zero-padded weight.
fn enlarged_conv(eg: &mut EG, attrs: &ConvAttrs, x: Id, w: Id, b: Id, pads: &[i64]) -> Id {
    let k = eg.analysis.intern_op(&Op::Nn(NnOp::Conv(attrs.clone())), 1);
    let at = eg.add(Kiln::Attr(k));
    let w = pad_weight(eg, w, pads);
    eg.add(Kiln::Conv([at, x, w, b]))
}

/// The sibling Convs of `conv(at, x, w, b)`: other Convs over `x` whose weights are not
/// made by a merge, as `(class, attrs, attribute class, weight, bias)`.
fn sibling_convs(eg: &EG, x: Id, me: Id, w: Id) -> Vec<(Id, Id, Id, Id)> {
    let mut sibs = vec![];
    for p in eg[x].parents() {
        if let Kiln::Conv([at2, x2, w2, b2]) = eg.id_to_node(p) {
            let (at2, x2, w2, b2) = (eg.find(*at2), eg.find(*x2), eg.find(*w2), eg.find(*b2));
            let pc = eg.find(p);
            if x2 == x && pc != me && w2 != w && !is_concat(eg, w2) {
                sibs.push((pc, at2, w2, b2));
            }
        }
    }
    sibs.sort();
    sibs.dedup();
    sibs
}

/// Kernel enlargement (tensat): `conv(x, W)` with a smaller kernel than a sibling Conv over
/// the same input (same group, strides, dilations) equals a Conv with the sibling's kernel
/// size over `W` zero-padded on the spatial axes and pads grown by the same amount (times
/// the dilation). Both Convs get the same canonical attributes, so
/// `merge-parallel-conv` can then merge them. Only targeted at existing siblings, so it
/// adds at most a few e-nodes per Conv.
struct EnlargeConv;

impl Applier<Kiln, KilnAnalysis> for EnlargeConv {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Kiln>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let at = eg.find(subst[v("?at")]);
        let (x, w, b) = (
            eg.find(subst[v("?x")]),
            eg.find(subst[v("?w")]),
            eg.find(subst[v("?b")]),
        );
        let (Some(a1), Some(sw)) = (conv_attrs(eg, at), eg[w].data.shape()) else {
            return vec![];
        };
        if is_concat(eg, w) {
            return vec![];
        }
        let mut changed = vec![];
        for (_, at2, w2, _) in sibling_convs(eg, x, eclass, w).into_iter().take(4) {
            let (Some(a2), Some(sw2)) = (conv_attrs(eg, at2), eg[w2].data.shape()) else {
                continue;
            };
            let Some((attrs, p1, _)) = enlarge_pair(&a1, &sw, &a2, &sw2) else {
                continue;
            };
            if p1.iter().all(|&p| p == 0) {
                continue;
            }
            let y = enlarged_conv(eg, &attrs, x, w, b, &p1);
            changed.extend(union_checked(eg, eclass, y));
        }
        changed
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?at"), v("?x"), v("?w"), v("?b")]
    }
}

/// `conv(x, W1, b1)` and `conv(x, W2, b2)` (same group, strides, dilations; kernels that
/// line up after [kernel enlargement](enlarge_pair), e.g. a 1x1 and a padded 3x3, or a 1x3
/// and a 3x1) become channel slices of `conv(x, concat(W1', W2'), concat(b1, b2))` over the
/// enlarged weights. For grouped Convs the output channels of a group must stay together,
/// so only group 1 merges.
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
        let Some(a1) = conv_attrs(eg, at) else {
            return vec![];
        };
        let Some(sw) = eg[w].data.shape() else {
            return vec![];
        };
        if a1.group != 1 || is_concat(eg, w) {
            return vec![];
        }
        let b_none = eg[b].data.kind == Kind::None;
        let mut changed = vec![];
        let sibs: Vec<_> = sibling_convs(eg, x, eclass, w)
            .into_iter()
            .filter(|s| s.2 > w && (eg[s.3].data.kind == Kind::None) == b_none)
            .take(4)
            .collect();
        for (sib, at2, w2, b2) in sibs {
            let (Some(a2), Some(sw2)) = (conv_attrs(eg, at2), eg[w2].data.shape()) else {
                continue;
            };
            let Some((attrs, p1, p2)) = enlarge_pair(&a1, &sw, &a2, &sw2) else {
                continue;
            };
            let ax = eg.add(Kiln::Int(0));
            let (w1e, w2e) = (pad_weight(eg, w, &p1), pad_weight(eg, w2, &p2));
            let cw = eg.add(Kiln::Concat(vec![ax, w1e, w2e].into()));
            let cb = if b_none {
                eg.add(Kiln::NoneArg([]))
            } else {
                eg.add(Kiln::Concat(vec![ax, b, b2].into()))
            };
            let y = enlarged_conv(eg, &attrs, x, cw, cb, &[]);
            let s1 = add_slice(eg, y, 1, 0, sw[0]);
            let s2 = add_slice(eg, y, 1, sw[0], sw[0] + sw2[0]);
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
