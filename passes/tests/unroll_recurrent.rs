//! `unroll_recurrent`: random `RNN` / `GRU` / `LSTM` layers (every direction, both layouts,
//! with and without biases, initial states, peepholes, `clip`, `input_forget`,
//! `linear_before_reset`, non-default activations with their alpha/beta; weights as inputs
//! or constants) unrolled into their time steps compute what the reference op computes.

mod common;

use common::one_node::push_node;
use common::{assert_close, random_f32};
use kiln_ir::ops::{AttrValue, OnnxNode};
use kiln_ir::{interp, DType, Fact, Graph, Node, Op, Shape, Tensor};
use kiln_passes::unroll_recurrent::unroll_all;
use rand::{Rng, SeedableRng};

/// A graph of one recurrent layer and its random inputs.
fn layer(seed: u64) -> (Graph, Vec<Tensor>, String) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cell = ["RNN", "GRU", "LSTM"][seed as usize % 3];
    let gates = match cell {
        "RNN" => 1,
        "GRU" => 3,
        _ => 4,
    };
    let nact = match cell {
        "RNN" => 1,
        "GRU" => 2,
        _ => 3,
    };
    let dir = ["forward", "reverse", "bidirectional"][rng.random_range(0..3)];
    let nd = if dir == "bidirectional" { 2 } else { 1 };
    let (seq, batch, input, h) = (
        rng.random_range(1..5),
        rng.random_range(1..4),
        rng.random_range(1..6),
        rng.random_range(1..6),
    );
    let batch_first = rng.random_bool(0.3);
    let const_w = rng.random_bool(0.5);
    let mut attrs: Vec<(&str, AttrValue)> = vec![
        ("hidden_size", AttrValue::Int(h as i64)),
        ("direction", AttrValue::String(dir.into())),
        ("layout", AttrValue::Int(batch_first as i64)),
    ];
    if rng.random_bool(0.3) {
        attrs.push(("clip", AttrValue::Float(rng.random_range(0.3..2.0))));
    }
    if cell == "LSTM" && rng.random_bool(0.3) {
        attrs.push(("input_forget", AttrValue::Int(1)));
    }
    if cell == "GRU" && rng.random_bool(0.5) {
        attrs.push(("linear_before_reset", AttrValue::Int(1)));
    }
    if rng.random_bool(0.3) {
        let pool = [
            "Sigmoid",
            "Tanh",
            "Relu",
            "HardSigmoid",
            "LeakyRelu",
            "Elu",
            "Softsign",
            "Softplus",
            "ScaledTanh",
            "Affine",
            "ThresholdedRelu",
        ];
        let names: Vec<String> = (0..nact * nd)
            .map(|_| pool[rng.random_range(0..pool.len())].to_string())
            .collect();
        attrs.push(("activations", AttrValue::Strings(names)));
        let alphas: Vec<f32> = (0..nact * nd).map(|_| rng.random_range(0.1..1.0)).collect();
        let betas: Vec<f32> = (0..nact * nd).map(|_| rng.random_range(0.0..0.5)).collect();
        attrs.push(("activation_alpha", AttrValue::Floats(alphas)));
        attrs.push(("activation_beta", AttrValue::Floats(betas)));
    }
    let x_shape = if batch_first {
        vec![batch, seq, input]
    } else {
        vec![seq, batch, input]
    };
    let state = if batch_first {
        vec![batch, nd, h]
    } else {
        vec![nd, batch, h]
    };
    let mut specs: Vec<(usize, Vec<usize>)> = vec![
        (0, x_shape),
        (1, vec![nd, gates * h, input]),
        (2, vec![nd, gates * h, h]),
    ];
    if rng.random_bool(0.7) {
        specs.push((3, vec![nd, 2 * gates * h]));
    }
    if rng.random_bool(0.5) {
        specs.push((5, state.clone()));
    }
    if cell == "LSTM" {
        if rng.random_bool(0.5) {
            specs.push((6, state.clone()));
        }
        if rng.random_bool(0.5) {
            specs.push((7, vec![nd, 3 * h]));
        }
    }
    let mut g = Graph {
        name: "rnn".into(),
        opset: 17,
        ..Default::default()
    };
    let mut ins = vec![None; 8];
    let mut inputs = vec![];
    for (slot, dims) in &specs {
        let t = random_f32(dims, &mut rng);
        let name = format!("in{slot}");
        let v = if *slot > 0 && const_w {
            g.add_const(name, t)
        } else {
            let v = g.add_value(name, Fact::new(DType::F32, Shape::known(dims)));
            g.inputs.push(v);
            inputs.push(t);
            v
        };
        ins[*slot] = Some(v);
    }
    // a constant sequence_lens equal to the sequence length is unrolled as well
    if rng.random_bool(0.2) {
        let l = g.add_const("lens", Tensor::from_vec(&[batch], vec![seq as i32; batch]));
        ins[4] = Some(l);
    }
    let last = ins.iter().rposition(Option::is_some).unwrap();
    ins.truncate(last + 1);
    let nout = if cell == "LSTM" { 3 } else { 2 };
    push_node(&mut g, (cell, 17, "rnn"), &attrs, ins, nout);
    let what = format!("{cell} {dir} seq {seq} batch {batch} in {input} h {h} {attrs:?}");
    (g, inputs, what)
}

#[test]
fn unrolled_layers_match_the_reference_op() {
    let mut unrolled = 0;
    for seed in 0..240 {
        let (g, inputs, what) = layer(seed);
        let want = interp::run(&g, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut u = g.clone();
        unrolled += unroll_all(&mut u);
        kiln_ir::verify::verify(&u).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            !u.nodes
                .iter()
                .any(|n| matches!(n.op, Op::Nn(kiln_ir::ops::nn::NnOp::Recurrent(_)))),
            "{what}: not unrolled"
        );
        let names = |h: &Graph| -> Vec<String> {
            h.outputs
                .iter()
                .map(|&v| h.values[v].name.clone())
                .collect()
        };
        assert_eq!(names(&u), names(&g), "{what}");
        let got = interp::run(&u, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(&what, &got, &want, 1e-4);
    }
    assert_eq!(unrolled, 240);
}

/// Per-batch `sequence_lens` given at run time (every length from 0 to the sequence's):
/// the unrolled steps hold the state and zero `Y` past each entry's length, as the op does.
#[test]
fn runtime_sequence_lengths_mask_the_steps() {
    for seed in 0..60 {
        let (mut g, mut inputs, what) = layer(seed);
        let x = g.nodes[0].inputs[0].unwrap();
        let xs = g.values[x].fact.shape.as_known().unwrap();
        let batch_first = matches!(&g.nodes[0].op,
            Op::Nn(kiln_ir::ops::nn::NnOp::Recurrent(a)) if a.batch_first);
        let (seq, batch) = if batch_first {
            (xs[1], xs[0])
        } else {
            (xs[0], xs[1])
        };
        let lens = g.add_value("lens_in", Fact::new(DType::I32, Shape::known(&[batch])));
        g.inputs.push(lens);
        let n_in = g.nodes[0].inputs.len().max(5);
        g.nodes[0].inputs.resize(n_in, None);
        g.nodes[0].inputs[4] = Some(lens);
        let l: Vec<i32> = (0..batch)
            .map(|b| ((seed as usize + 2 * b) % (seq + 1)) as i32)
            .collect();
        inputs.push(Tensor::from_vec(&[batch], l.clone()));
        let want = interp::run(&g, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut u = g.clone();
        assert_eq!(unroll_all(&mut u), 1, "{what}");
        kiln_ir::verify::verify(&u).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = interp::run(&u, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(&format!("{what} lens {l:?}"), &got, &want, 1e-4);
    }
}

/// An empty sequence has no steps to build: the layer stays with the reference op.
#[test]
fn empty_sequences_keep_the_op() {
    let mut g = Graph {
        name: "empty".into(),
        opset: 17,
        ..Default::default()
    };
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[0, 2, 3])));
    g.inputs.push(x);
    let w = g.add_const("w", Tensor::from_vec(&[1, 4, 3], vec![0.1f32; 12]));
    let r = g.add_const("r", Tensor::from_vec(&[1, 4, 4], vec![0.1f32; 16]));
    let node = OnnxNode::new(
        "RNN",
        17,
        &[("hidden_size", AttrValue::Int(4))],
        vec![true; 3],
        2,
    );
    let outs: Vec<usize> = (0..2)
        .map(|k| g.add_value(format!("y{k}"), Fact::new(DType::F32, Shape::unknown(0))))
        .collect();
    g.nodes.push(Node {
        name: "rnn".into(),
        op: Op::from_onnx(&node).unwrap().unwrap(),
        inputs: vec![Some(x), Some(w), Some(r)],
        outputs: outs.clone(),
    });
    g.outputs = outs;
    g.infer().unwrap();
    assert_eq!(unroll_all(&mut g), 0);
    let y = interp::run(&g, &[Tensor::from_vec(&[0, 2, 3], Vec::<f32>::new())]).unwrap();
    assert_eq!(y[0].shape(), &[0, 1, 2, 4]);
    assert_eq!(y[1].to_f64_vec(), vec![0.0; 8]);
}
