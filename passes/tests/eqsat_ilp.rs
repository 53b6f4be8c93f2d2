//! ILP extraction: it beats the greedy tree extractor where shared sub-terms matter, cuts
//! the cycles an unconstrained solution chooses (the result is acyclic and runs), and a
//! time-out falls back to the DAG-aware / greedy result without failing.

mod common;

use common::{assert_close, random_f32};
use egg::{Id, Runner};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::{interp, verify::verify, DType, Fact, Graph, Node, Op, Shape};
use kiln_passes::eqsat::analysis::{KilnAnalysis, KilnEGraph};
use kiln_passes::eqsat::cost::Analytical;
use kiln_passes::eqsat::language::Kiln;
use kiln_passes::eqsat::{convert, extract, ilp, optimize, rules, EqsatOptions, ExtractorKind};
use rand::SeedableRng;
use std::collections::HashMap;
use std::time::Duration;

fn value(g: &mut Graph, name: &str, dims: &[usize]) -> usize {
    g.add_value(name, Fact::new(DType::F32, Shape::known(dims)))
}

fn node(g: &mut Graph, op: Op, ins: &[usize], out: usize) {
    let n = g.nodes.len();
    g.nodes.push(Node {
        name: format!("n{n}"),
        op,
        inputs: ins.iter().map(|&i| Some(i)).collect(),
        outputs: vec![out],
    });
}

fn graph(name: &str) -> Graph {
    Graph {
        name: name.into(),
        opset: 17,
        ..Default::default()
    }
}

/// Saturates the e-graph of `g` with every rule (8 iterations).
fn saturate(g: &Graph) -> (KilnEGraph, Vec<Id>) {
    let (eg, roots) = convert::to_egraph(g, 1 << 21).unwrap();
    let runner: Runner<Kiln, KilnAnalysis, ()> = Runner::default()
        .with_egraph(eg)
        .with_iter_limit(8)
        .run(&rules::all());
    let eg = runner.egraph;
    let roots = roots.iter().map(|&r| eg.find(r)).collect();
    (eg, roots)
}

/// The graph of a choice: it verifies, is in topological order and equals `g`.
fn check_choice(g: &Graph, eg: &KilnEGraph, roots: &[Id], choice: &HashMap<Id, Kiln>) {
    let out = convert::to_graph(eg, roots, choice, g).unwrap();
    verify(&out).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let inputs: Vec<_> = g
        .inputs
        .iter()
        .map(|&i| random_f32(&g.values[i].fact.shape.as_known().unwrap(), &mut rng))
        .collect();
    let want = interp::run(g, &inputs).unwrap();
    let got = interp::run(&out, &inputs).unwrap();
    assert_close(&g.name, &got, &want, 1e-4);
}

/// s = x W1 (an output) and a = s W2 (constant weights): `matmul-assoc` adds
/// a = x (W1 W2) with the product folded, which costs less than s W2 plus s as a tree, so
/// the greedy tree extractor picks it; but s is computed anyway, and s W2 is the cheaper
/// MatMul (80 < 128 inner dims). The ILP pays s once and keeps s W2.
#[test]
fn ilp_beats_greedy_when_shared_subterms_matter() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut g = graph("shared");
    let x = value(&mut g, "x", &[64, 128]);
    g.inputs.push(x);
    let w1 = g.add_const("w1", random_f32(&[128, 80], &mut rng));
    let w2 = g.add_const("w2", random_f32(&[80, 128], &mut rng));
    let s = value(&mut g, "s", &[64, 80]);
    let a = value(&mut g, "a", &[64, 128]);
    node(&mut g, Op::Linalg(LinalgOp::MatMul), &[x, w1], s);
    node(&mut g, Op::Linalg(LinalgOp::MatMul), &[s, w2], a);
    g.outputs.extend([s, a]);

    let (eg, roots) = saturate(&g);
    let costs = extract::node_costs(&eg, &Analytical::default());
    let tree = extract::greedy(&eg, &costs);
    let greedy_cost = extract::dag_cost(&eg, &costs, &tree, &roots);
    // warm-started from the greedy choice, not the DAG-aware one
    let (choice, st) = ilp::ilp(&eg, &costs, &roots, &tree, Duration::from_secs(20));
    println!("{st:?}");
    let choice = choice.expect("the ILP solves this small problem");
    let ilp_cost = extract::dag_cost(&eg, &costs, &choice, &roots);
    println!("greedy {greedy_cost:.2} us, ilp {ilp_cost:.2} us");
    assert!(
        ilp_cost < greedy_cost - 1.0,
        "ilp {ilp_cost} vs greedy {greedy_cost}"
    );
    assert!(st.optimal, "{st:?}");
    check_choice(&g, &eg, &roots, &choice);
    // and the ILP is never worse than the DAG-aware search it starts from
    let (d, _) = extract::dag(&eg, &costs, &roots, tree, Duration::from_secs(5));
    let (c2, _) = ilp::ilp(&eg, &costs, &roots, &d, Duration::from_secs(20));
    let c2 = c2.unwrap();
    assert!(
        extract::dag_cost(&eg, &costs, &c2, &roots)
            <= extract::dag_cost(&eg, &costs, &d, &roots) + 1e-9
    );
}

/// a = x W1, b = x W2, y = concat(a, b) (all three outputs, constant weights): the rules
/// put y = x concat(W1, W2) and a, b = slices of y in the same e-classes, so an
/// unconstrained ILP would compute y as concat(a, b) and a, b as slices of y (a cycle
/// much cheaper than any MatMul). The cycle is cut (up front, or after a cyclic solve).
#[test]
fn ilp_cuts_cycles_and_returns_an_acyclic_graph() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut g = graph("cycle");
    let x = value(&mut g, "x", &[64, 64]);
    g.inputs.push(x);
    let mut parts = vec![];
    for n in ["a", "b"] {
        let w = g.add_const(format!("w{n}"), random_f32(&[64, 64], &mut rng));
        let o = value(&mut g, n, &[64, 64]);
        node(&mut g, Op::Linalg(LinalgOp::MatMul), &[x, w], o);
        parts.push(o);
    }
    let y = value(&mut g, "y", &[64, 128]);
    g.nodes.push(Node {
        name: "cat".into(),
        op: Op::Array(kiln_ir::ops::array::ArrayOp::Concat { axis: 1 }),
        inputs: parts.iter().map(|&p| Some(p)).collect(),
        outputs: vec![y],
    });
    g.outputs.extend([parts[0], parts[1], y]);

    let (eg, roots) = saturate(&g);
    let costs = extract::node_costs(&eg, &Analytical::default());
    let tree = extract::greedy(&eg, &costs);
    // the short cycle is cut up front: one solve
    let (choice, st) = ilp::ilp(&eg, &costs, &roots, &tree, Duration::from_secs(20));
    println!("{st:?}");
    assert!(st.cycle_cuts >= 1 && st.solves == 1, "{st:?}");
    check_choice(&g, &eg, &roots, &choice.expect("an acyclic solution"));
    // reject-and-resolve alone: the first solution is cyclic, its cut is added
    let (choice, st) = ilp::ilp_with_cuts(&eg, &costs, &roots, &tree, Duration::from_secs(20), 0);
    println!("{st:?}");
    assert!(
        st.solves >= 2 && st.cycle_cuts >= 1,
        "no cycle was cut: {st:?}"
    );
    check_choice(
        &g,
        &eg,
        &roots,
        &choice.expect("an acyclic solution after the cut"),
    );

    // end to end at the ILP level
    let opts = EqsatOptions {
        extractor: ExtractorKind::Ilp,
        ..Default::default()
    };
    let (out, rep) = optimize(&g, &opts).unwrap();
    println!("{rep}");
    verify(&out).unwrap();
    assert!(rep.notes.iter().any(|n| n.starts_with("ilp:")), "{rep}");
    let inputs = vec![random_f32(&[64, 64], &mut rng)];
    assert_close(
        "cycle",
        &interp::run(&out, &inputs).unwrap(),
        &interp::run(&g, &inputs).unwrap(),
        1e-4,
    );
}

/// With no time for the ILP, the DAG-aware / greedy result is used and the compile
/// succeeds.
#[test]
fn ilp_timeout_falls_back() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut g = graph("fallback");
    let x = value(&mut g, "x", &[4, 32]);
    g.inputs.push(x);
    let mut outs = vec![];
    for n in ["p", "q"] {
        let w = g.add_const(format!("w{n}"), random_f32(&[32, 32], &mut rng));
        let o = value(&mut g, n, &[4, 32]);
        node(&mut g, Op::Linalg(LinalgOp::MatMul), &[x, w], o);
        outs.push(o);
    }
    let y = value(&mut g, "y", &[4, 32]);
    node(
        &mut g,
        Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Mul)),
        &outs,
        y,
    );
    g.outputs.push(y);
    let opts = EqsatOptions {
        extractor: ExtractorKind::Ilp,
        ilp_time_limit: Duration::ZERO,
        ..Default::default()
    };
    let (out, rep) = optimize(&g, &opts).expect("a time-out never fails the compile");
    println!("{rep}");
    assert_ne!(rep.chosen, "ilp");
    assert!(rep.notes.iter().any(|n| n.contains("no result")), "{rep}");
    let inputs = vec![random_f32(&[4, 32], &mut rng)];
    assert_close(
        "fallback",
        &interp::run(&out, &inputs).unwrap(),
        &interp::run(&g, &inputs).unwrap(),
        1e-4,
    );
}
