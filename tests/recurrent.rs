//! ONNX `RNN` / `GRU` / `LSTM` layers through the whole compiler: unrolled into their time
//! steps (`unroll` stage), compiled for the CPU at `-O0` and `-O2` (where the steps' input
//! projections merge into one product) and planned for `cuda:h100` (the plan emulated on
//! the CPU), every result equal to the reference op's.

use crate::one_node::push_node;
use kiln::ir::ops::AttrValue;
use kiln::ir::{interp, DType, Fact, Graph, Shape, Tensor};
use kiln::{Compiler, Session, TensorView};
use rand::{Rng, SeedableRng};

/// One bidirectional layer over `[seq, batch, 16]` with hidden 8 and constant weights.
fn layer(cell: &str, seed: u64) -> (Graph, Vec<Tensor>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (seq, batch, inp, h) = (6, 2, 16, 8);
    let gates = match cell {
        "RNN" => 1,
        "GRU" => 3,
        _ => 4,
    };
    let mut t = |dims: &[usize]| {
        let n = dims.iter().product();
        Tensor::from_vec(
            dims,
            (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect(),
        )
    };
    let x_t = t(&[seq, batch, inp]);
    let (w, r, b) = (
        t(&[2, gates * h, inp]),
        t(&[2, gates * h, h]),
        t(&[2, 2 * gates * h]),
    );
    let h0 = t(&[2, batch, h]);
    let mut g = Graph {
        name: cell.to_lowercase(),
        opset: 17,
        ..Default::default()
    };
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[seq, batch, inp])));
    g.inputs.push(x);
    let ins = vec![
        Some(x),
        Some(g.add_const("w", w)),
        Some(g.add_const("r", r)),
        Some(g.add_const("b", b)),
        None,
        Some(g.add_const("h0", h0)),
    ];
    let nout = if cell == "LSTM" { 3 } else { 2 };
    push_node(
        &mut g,
        (cell, 17, cell),
        &[
            ("hidden_size", AttrValue::Int(h as i64)),
            ("direction", AttrValue::String("bidirectional".into())),
        ],
        ins,
        nout,
    );
    (g, vec![x_t])
}

fn assert_close(case: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len(), "{case}");
    for (a, b) in got.iter().zip(want) {
        assert_eq!(a.shape(), b.shape(), "{case}");
        let err = a
            .to_f64_vec()
            .iter()
            .zip(b.to_f64_vec())
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max);
        assert!(err < 1e-4, "{case}: error {err:.2e}");
    }
}

#[test]
fn recurrent_layers_compile_for_cpu_and_gpu() {
    for (i, cell) in ["RNN", "GRU", "LSTM"].into_iter().enumerate() {
        let (g, inputs) = layer(cell, i as u64);
        let want = interp::run(&g, &inputs).unwrap();
        let data: Vec<f32> = inputs[0].to_f64_vec().iter().map(|&v| v as f32).collect();
        let view = [TensorView::from_f32(inputs[0].shape(), &data)];
        for level in [0u8, 2] {
            let case = format!("{cell} -O{level}");
            let art = Compiler::new().opt_level(level).compile(&g).unwrap();
            let outs = Session::new(&art).and_then(|s| s.run(&view)).unwrap();
            let outs: Vec<Tensor> = outs
                .iter()
                .map(|o| Tensor::from_vec(&o.shape, o.as_f32().unwrap().to_vec()))
                .collect();
            assert_close(&case, &outs, &want);
            let opts = kiln::compile::CompileOptions {
                opt_level: Some(level),
                ..Default::default()
            };
            let e =
                kiln::gpu_compile::emulate_graph(&g, "rnn", "cuda:h100", &opts, &inputs, |_| {})
                    .unwrap_or_else(|e| panic!("{case} cuda:h100: {e:#}"));
            assert_close(&format!("{case} cuda:h100"), &e.outputs, &want);
        }
    }
}
