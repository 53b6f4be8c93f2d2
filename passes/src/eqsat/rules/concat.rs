//! Concat/Slice algebra: single-input and nested concats, elementwise ops over concats
//! (tensat's batching rules), and slices that select exactly one input of a concat.

use super::{data, rw, rw_if, same_shape, v, Rw, EG};
use crate::eqsat::analysis::Kind;
use crate::eqsat::language::UNARY;
use egg::{Id, Subst};
use kiln_ir::shape::norm_axis;

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
