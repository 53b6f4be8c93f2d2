//! `eqsat::optimize` end to end: zoo models keep their outputs (reference interpreter),
//! input and output names survive, bad graphs are errors, and parallel projections merge.

mod common;

use common::{assert_close, load_zoo, random_f32, ZOO};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::{interp, DType, Fact, Graph, Node, Op, Shape};
use kiln_passes::eqsat::{optimize, EqsatOptions, ExtractorKind};
use rand::SeedableRng;

#[test]
fn zoo_models_keep_their_outputs() {
    for name in ZOO {
        let (mut g, inputs) = load_zoo(name, 5);
        kiln_passes::fold_batchnorm::fold_all(&mut g);
        kiln_ir::simplify::simplify(&mut g);
        for extractor in ExtractorKind::ALL {
            let opts = EqsatOptions {
                extractor,
                ilp_time_limit: std::time::Duration::from_secs(1),
                ..Default::default()
            };
            let (out, rep) = optimize(&g, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
            println!("{name} ({extractor:?}):\n{rep}");
            for (a, b) in out.inputs.iter().zip(&g.inputs) {
                assert_eq!(out.values[*a].name, g.values[*b].name);
            }
            for (a, b) in out.outputs.iter().zip(&g.outputs) {
                assert_eq!(out.values[*a].name, g.values[*b].name);
            }
            assert!(rep.cost_after <= rep.cost_before);
            let want = interp::run(&g, &inputs).unwrap();
            let got = interp::run(&out, &inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_close(name, &got, &want, 1e-4);
        }
    }
}

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

/// q = x Wq, k = x Wk, v = x Wv, y = q + k + v: the three projections merge into one
/// MatMul over concatenated weights when the extractor accounts for sharing.
#[test]
fn parallel_projections_stay_correct() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut g = Graph {
        name: "qkv".into(),
        opset: 17,
        ..Default::default()
    };
    let x = value(&mut g, "x", &[2, 16, 32]);
    g.inputs.push(x);
    let mut outs = vec![];
    for (i, n) in ["q", "k", "v"].iter().enumerate() {
        let w = g.add_const(format!("w{n}"), random_f32(&[32, 32], &mut rng));
        let o = value(&mut g, n, &[2, 16, 32]);
        node(&mut g, Op::Linalg(LinalgOp::MatMul), &[x, w], o);
        outs.push(o);
        let _ = i;
    }
    let s = value(&mut g, "s", &[2, 16, 32]);
    let y = value(&mut g, "y", &[2, 16, 32]);
    let add = Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add));
    node(&mut g, add.clone(), &[outs[0], outs[1]], s);
    node(&mut g, add, &[s, outs[2]], y);
    g.outputs.push(y);
    let (out, rep) = optimize(&g, &EqsatOptions::default()).unwrap();
    println!("{rep}");
    let inputs = vec![random_f32(&[2, 16, 32], &mut rng)];
    let want = interp::run(&g, &inputs).unwrap();
    let got = interp::run(&out, &inputs).unwrap();
    assert_close("qkv", &got, &want, 1e-4);
    assert!(rep.rules_applied.contains_key("merge-parallel-matmul"));
}

#[test]
fn bad_graphs_are_errors() {
    let mut g = Graph {
        name: "bad".into(),
        opset: 17,
        ..Default::default()
    };
    let x = value(&mut g, "x", &[2, 3]);
    let t = value(&mut g, "t", &[2, 3]);
    let y = value(&mut g, "y", &[2, 3]);
    g.inputs.push(x);
    // y uses t, which nothing defines
    node(
        &mut g,
        Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add)),
        &[x, t],
        y,
    );
    g.outputs.push(y);
    assert!(optimize(&g, &EqsatOptions::default()).is_err());
    // an output that does not exist
    let mut g2 = g.clone();
    g2.nodes.clear();
    g2.outputs = vec![t];
    assert!(optimize(&g2, &EqsatOptions::default()).is_err());
}

/// x -> Conv 1x1 (a) and Conv 3x3 pads 1 (b), y = concat(a, b): kernel enlargement and
/// merging give one 3x3 Conv over the concatenated weights, whose enlarged (zero-padded)
/// and concatenated constant weights fold at compile time. It is kept only where the cost
/// model says it is cheaper: with a large per-kernel overhead (one kernel instead of three)
/// but not on the CPU roofline for a compute-bound size (the 1x1 filters would cost 9x).
fn mixed_kernel_graph(c: usize, hw: usize, seed: u64) -> (Graph, Vec<kiln_ir::Tensor>) {
    use kiln_ir::ops::array::ArrayOp;
    use kiln_ir::ops::nn::{AutoPad, ConvAttrs, NnOp, WindowAttrs};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut g = Graph {
        name: "mixed".into(),
        opset: 17,
        ..Default::default()
    };
    let x = value(&mut g, "x", &[1, c, hw, hw]);
    g.inputs.push(x);
    let conv = |k: usize, p: usize| {
        Op::Nn(NnOp::Conv(ConvAttrs {
            window: WindowAttrs {
                auto_pad: AutoPad::NotSet,
                kernel_shape: Some(vec![k, k]),
                strides: None,
                dilations: None,
                pads: Some(vec![p; 4]),
            },
            group: 1,
        }))
    };
    let mut parts = vec![];
    for (n, k) in [("a", 1), ("b", 3)] {
        let w = g.add_const(format!("w{n}"), random_f32(&[c, c, k, k], &mut rng));
        let b = g.add_const(format!("b{n}"), random_f32(&[c], &mut rng));
        let o = value(&mut g, n, &[1, c, hw, hw]);
        node(&mut g, conv(k, k / 2), &[x, w, b], o);
        parts.push(o);
    }
    let y = value(&mut g, "y", &[1, 2 * c, hw, hw]);
    node(&mut g, Op::Array(ArrayOp::Concat { axis: 1 }), &parts, y);
    g.outputs.push(y);
    let inputs = vec![random_f32(&[1, c, hw, hw], &mut rng)];
    (g, inputs)
}

#[test]
fn mixed_kernel_convs_merge_only_when_cheaper() {
    use kiln_passes::eqsat::cost::Device;
    // launch-bound: one Conv over folded constant weights
    let (g, inputs) = mixed_kernel_graph(8, 6, 11);
    let opts = EqsatOptions {
        device: Device {
            name: "launch-bound".into(),
            launch_us: 1000.0,
            ..Device::cpu()
        },
        ..Default::default()
    };
    let (out, rep) = optimize(&g, &opts).unwrap();
    println!("{rep}");
    assert!(
        rep.rules_applied.contains_key("merge-parallel-conv"),
        "{rep}"
    );
    assert_eq!(out.nodes.len(), 1, "{rep}");
    assert!(
        matches!(out.nodes[0].op, Op::Nn(_)),
        "{:?}",
        out.nodes[0].op
    );
    for &w in out.nodes[0].inputs[1..].iter().flatten() {
        assert!(
            out.values[w].fact.value.is_some(),
            "weights fold to constants"
        );
    }
    let want = interp::run(&g, &inputs).unwrap();
    assert_close("mixed", &interp::run(&out, &inputs).unwrap(), &want, 1e-4);

    // compute-bound on the CPU roofline: the two Convs stay
    let (g, inputs) = mixed_kernel_graph(32, 28, 12);
    let (out, rep) = optimize(&g, &EqsatOptions::default()).unwrap();
    println!("{rep}");
    assert!(rep.rules_applied.contains_key("conv-enlarge"), "{rep}");
    let convs = out
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Nn(_)))
        .count();
    assert_eq!(convs, 2, "{rep}");
    assert!(rep.cost_after <= rep.cost_before);
    let want = interp::run(&g, &inputs).unwrap();
    assert_close("mixed", &interp::run(&out, &inputs).unwrap(), &want, 1e-4);
}
