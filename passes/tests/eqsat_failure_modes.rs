//! The failure modes of equality saturation the issue names, one test each: e-graph blow-up
//! from associativity/commutativity (bounded by egg's default `BackoffScheduler` and the
//! node/time limits), cycles (the extracted graph is acyclic and verifies, for all three
//! extractors; see also `eqsat_ilp.rs`), and extraction
//! time-outs (the result falls back to the greedy choice; the compile never fails).

mod common;

use common::{assert_close, random_f32};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, UnaryKind};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::{interp, verify::verify, DType, Fact, Graph, Node, Op, Shape};
use kiln_passes::eqsat::{optimize, EqsatOptions, ExtractorKind};
use rand::SeedableRng;
use std::time::{Duration, Instant};

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

fn add() -> Op {
    Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add))
}

/// A sum of 24 MatMul products and a long chain of Adds: the associativity and
/// commutativity rules could grow the e-graph without bound; saturation must stop within its
/// limits and the result must still equal the input graph.
fn blowup_graph() -> (Graph, Vec<kiln_ir::Tensor>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut g = Graph {
        name: "blowup".into(),
        opset: 17,
        ..Default::default()
    };
    let x = value(&mut g, "x", &[4, 16]);
    g.inputs.push(x);
    let mut acc = None;
    for i in 0..24 {
        let w = g.add_const(format!("w{i}"), random_f32(&[16, 16], &mut rng));
        let p = value(&mut g, &format!("p{i}"), &[4, 16]);
        node(&mut g, Op::Linalg(LinalgOp::MatMul), &[x, w], p);
        acc = Some(match acc {
            None => p,
            Some(a) => {
                let s = value(&mut g, &format!("s{i}"), &[4, 16]);
                node(&mut g, add(), &[a, p], s);
                s
            }
        });
    }
    let y = acc.unwrap();
    g.outputs.push(y);
    let inputs = vec![random_f32(&[4, 16], &mut rng)];
    (g, inputs)
}

#[test]
fn associativity_blowup_stays_within_limits() {
    let (g, inputs) = blowup_graph();
    let opts = EqsatOptions {
        node_limit: 5_000,
        time_limit: Duration::from_secs(2),
        ..Default::default()
    };
    let t0 = Instant::now();
    let (out, rep) = optimize(&g, &opts).expect("eqsat never fails on a valid graph");
    let took = t0.elapsed();
    println!("{rep}");
    assert!(
        rep.egraph_nodes <= opts.node_limit + 5_000,
        "e-graph of {} nodes",
        rep.egraph_nodes
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    verify(&out).unwrap();
    let want = interp::run(&g, &inputs).unwrap();
    let got = interp::run(&out, &inputs).unwrap();
    assert_close("blowup", &got, &want, 1e-4);
}

#[test]
fn rewrites_that_could_loop_extract_an_acyclic_graph() {
    // relu(relu(x)) = relu(x) and -(-x) = x put a class inside its own sub-terms (e-graph
    // cycles); the extracted graph must be acyclic (it verifies, toposorts and runs).
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut g = Graph {
        name: "cycles".into(),
        opset: 17,
        ..Default::default()
    };
    let x = value(&mut g, "x", &[3, 5]);
    g.inputs.push(x);
    let mut cur = x;
    for i in 0..6 {
        let kind = if i % 2 == 0 {
            UnaryKind::Relu
        } else {
            UnaryKind::Neg
        };
        let o = value(&mut g, &format!("u{i}"), &[3, 5]);
        node(
            &mut g,
            Op::Elementwise(ElementwiseOp::Unary(kind)),
            &[cur],
            o,
        );
        let o2 = value(&mut g, &format!("v{i}"), &[3, 5]);
        node(
            &mut g,
            Op::Elementwise(ElementwiseOp::Unary(kind)),
            &[o],
            o2,
        );
        cur = o2;
    }
    g.outputs.push(cur);
    let inputs = vec![random_f32(&[3, 5], &mut rng)];
    for extractor in ExtractorKind::ALL {
        let opts = EqsatOptions {
            extractor,
            ..Default::default()
        };
        let (out, rep) = optimize(&g, &opts).unwrap();
        verify(&out).unwrap();
        assert_topological(&out);
        assert!(rep.nodes_after < g.nodes.len(), "{rep}");
        let want = interp::run(&g, &inputs).unwrap();
        let got = interp::run(&out, &inputs).unwrap();
        assert_close("cycles", &got, &want, 1e-6);
    }
}

/// The graph's nodes are in topological order (every input defined before its use).
fn assert_topological(out: &Graph) {
    let mut defined = vec![false; out.values.len()];
    for (i, v) in out.values.iter().enumerate() {
        if v.fact.value.is_some() || out.inputs.contains(&i) {
            defined[i] = true;
        }
    }
    for n in &out.nodes {
        for &i in n.inputs.iter().flatten() {
            assert!(defined[i], "node '{}' reads a value defined later", n.name);
        }
        for &o in &n.outputs {
            defined[o] = true;
        }
    }
}

#[test]
fn extraction_timeout_falls_back_to_greedy() {
    let (g, inputs) = blowup_graph();
    let opts = EqsatOptions {
        extract_time_limit: Duration::ZERO,
        node_limit: 5_000,
        ..Default::default()
    };
    let (out, rep) = optimize(&g, &opts).expect("a time-out never fails the compile");
    println!("{rep}");
    assert!(rep.cost_after <= rep.cost_before, "{rep}");
    let want = interp::run(&g, &inputs).unwrap();
    let got = interp::run(&out, &inputs).unwrap();
    assert_close("timeout", &got, &want, 1e-4);
}
