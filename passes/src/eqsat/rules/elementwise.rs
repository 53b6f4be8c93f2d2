//! Elementwise algebra: commutativity, associativity, distributivity, identities (`x*1`,
//! `x+0`, `relu(relu x)`, `-(-x)`), sign and absolute value.

use super::{constant, fill_into, float, positive, same_shape, Rw};
use egg::rewrite;

/// The elementwise rules.
pub fn rules() -> Vec<Rw> {
    vec![
        rewrite!("add-comm"; "(add ?a ?b)" => "(add ?b ?a)"),
        rewrite!("mul-comm"; "(mul ?a ?b)" => "(mul ?b ?a)"),
        // reassociation only towards constants that then fold (unrestricted associativity
        // with commutativity blows the e-graph up exponentially on sums)
        rewrite!("add-assoc"; "(add (add ?a ?b) ?c)" => "(add ?a (add ?b ?c))"
            if float("?a") if constant("?b") if constant("?c")),
        rewrite!("add-assoc-rev"; "(add ?a (add ?b ?c))" => "(add (add ?a ?b) ?c)"
            if float("?a") if constant("?a") if constant("?b")),
        rewrite!("mul-assoc"; "(mul (mul ?a ?b) ?c)" => "(mul ?a (mul ?b ?c))"
            if float("?a") if constant("?b") if constant("?c")),
        rewrite!("mul-assoc-rev"; "(mul ?a (mul ?b ?c))" => "(mul (mul ?a ?b) ?c)"
            if float("?a") if constant("?a") if constant("?b")),
        rewrite!("add-zero"; "(add ?x ?z)" => "?x" if fill_into("?z", 0.0, "?x")),
        rewrite!("sub-zero"; "(sub ?x ?z)" => "?x" if fill_into("?z", 0.0, "?x")),
        rewrite!("mul-one"; "(mul ?x ?o)" => "?x" if fill_into("?o", 1.0, "?x")),
        rewrite!("div-one"; "(div ?x ?o)" => "?x" if fill_into("?o", 1.0, "?x")),
        rewrite!("neg-neg"; "(neg (neg ?x))" => "?x"),
        rewrite!("relu-relu"; "(relu (relu ?x))" => "(relu ?x)"),
        rewrite!("abs-abs"; "(abs (abs ?x))" => "(abs ?x)"),
        rewrite!("abs-neg"; "(abs (neg ?x))" => "(abs ?x)"),
        rewrite!("relu-abs"; "(relu (abs ?x))" => "(abs ?x)"),
        rewrite!("sub-to-add-neg"; "(sub ?a ?b)" => "(add ?a (neg ?b))" if float("?a")),
        rewrite!("add-neg-to-sub"; "(add ?a (neg ?b))" => "(sub ?a ?b)" if float("?a")),
        rewrite!("neg-sub"; "(neg (sub ?a ?b))" => "(sub ?b ?a)" if float("?a")),
        rewrite!("mul-distrib"; "(mul ?a (add ?b ?c))" => "(add (mul ?a ?b) (mul ?a ?c))"
            if float("?a")),
        rewrite!("mul-factor"; "(add (mul ?a ?b) (mul ?a ?c))" => "(mul ?a (add ?b ?c))"
            if float("?a")),
        rewrite!("neg-mul"; "(neg (mul ?a ?b))" => "(mul (neg ?a) ?b)"),
        rewrite!("mul-neg"; "(mul (neg ?a) ?b)" => "(neg (mul ?a ?b))"),
        rewrite!("relu-pos-scale"; "(relu (mul ?x ?s))" => "(mul (relu ?x) ?s)"
            if positive("?s") if float("?x")),
        rewrite!("add-same-scale"; "(add (mul ?a ?s) (mul ?b ?s))" => "(mul (add ?a ?b) ?s)"
            if same_shape("?a", "?b") if float("?a")),
    ]
}
