//! `fold_batchnorm`: zoo models keep their outputs with BatchNormalization folded away, and
//! hand-made graphs check the Add/Mul folds into Conv and Gemm.

mod common;

use common::{assert_close, load_zoo, random_f32, ZOO};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp};
use kiln_ir::ops::linalg::{Gemm, LinalgOp};
use kiln_ir::{interp, verify::verify, DType, Fact, Graph, Node, Op, Shape, Tensor};
use kiln_passes::fold_batchnorm::{fold_all, FoldStats};
use rand::SeedableRng;

#[test]
fn zoo_models_fold_batchnorm_and_keep_outputs() {
    for name in ZOO {
        let (g0, inputs) = load_zoo(name, 7);
        let mut g = g0.clone();
        let stats = fold_all(&mut g);
        verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
        let bn = g
            .nodes
            .iter()
            .filter(|n| n.op.op_type() == "BatchNormalization")
            .count();
        assert_eq!(bn, 0, "{name}: BatchNormalization left");
        let had_bn = g0
            .nodes
            .iter()
            .any(|n| n.op.op_type() == "BatchNormalization");
        assert_eq!(had_bn, stats.batchnorm > 0, "{name}");
        println!(
            "{name}: {} -> {} nodes, folded {stats:?}",
            g0.nodes.len(),
            g.nodes.len()
        );
        let want = interp::run(&g0, &inputs).unwrap();
        let got = interp::run(&g, &inputs).unwrap();
        assert_close(name, &got, &want, 1e-5);
    }
}

fn binary(kind: BinaryKind) -> Op {
    Op::Elementwise(ElementwiseOp::Binary(kind))
}

/// Gemm(x, W, C) * 0.5 + c, and Conv(x, W) * s[c] + b[c]: both fold into one node.
#[test]
fn add_and_mul_fold_into_gemm_and_conv() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // Gemm
    let mut g = Graph {
        name: "gemm".into(),
        opset: 17,
        ..Default::default()
    };
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[4, 8])));
    g.inputs.push(x);
    let w = g.add_const("w", random_f32(&[8, 6], &mut rng));
    let c = g.add_const("c", random_f32(&[6], &mut rng));
    let s = g.add_const("s", Tensor::scalar(0.5f32));
    let b = g.add_const("b", random_f32(&[1, 6], &mut rng));
    let y = g.add_value("y", Fact::new(DType::F32, Shape::unknown(2)));
    let z = g.add_value("z", Fact::new(DType::F32, Shape::unknown(2)));
    let out = g.add_value("out", Fact::new(DType::F32, Shape::unknown(2)));
    let gemm = Gemm {
        alpha: 1.0,
        beta: 1.0,
        trans_a: false,
        trans_b: false,
    };
    g.nodes = vec![
        Node {
            name: "gemm".into(),
            op: Op::Linalg(LinalgOp::Gemm(gemm)),
            inputs: vec![Some(x), Some(w), Some(c)],
            outputs: vec![y],
        },
        Node {
            name: "mul".into(),
            op: binary(BinaryKind::Mul),
            inputs: vec![Some(s), Some(y)],
            outputs: vec![z],
        },
        Node {
            name: "add".into(),
            op: binary(BinaryKind::Add),
            inputs: vec![Some(z), Some(b)],
            outputs: vec![out],
        },
    ];
    g.outputs.push(out);
    g.infer().unwrap();
    check_fold(
        &g,
        &[random_f32(&[4, 8], &mut rng)],
        1,
        FoldStats {
            batchnorm: 0,
            add: 1,
            mul: 1,
            batchnorm_affine: 0,
        },
    );

    // Conv with a per-channel Mul and Add (and the Add's constant first)
    let mut g = Graph {
        name: "conv".into(),
        opset: 17,
        ..Default::default()
    };
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[1, 3, 5, 5])));
    g.inputs.push(x);
    let w = g.add_const("w", random_f32(&[4, 3, 3, 3], &mut rng));
    let s = g.add_const("s", random_f32(&[4, 1, 1], &mut rng));
    let b = g.add_const("b", random_f32(&[1, 4, 1, 1], &mut rng));
    let y = g.add_value("y", Fact::new(DType::F32, Shape::unknown(4)));
    let z = g.add_value("z", Fact::new(DType::F32, Shape::unknown(4)));
    let out = g.add_value("out", Fact::new(DType::F32, Shape::unknown(4)));
    let conv_op = conv_op();
    g.nodes = vec![
        Node {
            name: "conv".into(),
            op: conv_op,
            inputs: vec![Some(x), Some(w)],
            outputs: vec![y],
        },
        Node {
            name: "mul".into(),
            op: binary(BinaryKind::Mul),
            inputs: vec![Some(y), Some(s)],
            outputs: vec![z],
        },
        Node {
            name: "add".into(),
            op: binary(BinaryKind::Add),
            inputs: vec![Some(b), Some(z)],
            outputs: vec![out],
        },
    ];
    g.outputs.push(out);
    g.infer().unwrap();
    check_fold(
        &g,
        &[random_f32(&[1, 3, 5, 5], &mut rng)],
        1,
        FoldStats {
            batchnorm: 0,
            add: 1,
            mul: 1,
            batchnorm_affine: 0,
        },
    );
}

/// A 3x3 Conv with padding 1.
fn conv_op() -> Op {
    use kiln_ir::ops::nn::{AutoPad, ConvAttrs, NnOp, WindowAttrs};
    Op::Nn(NnOp::Conv(ConvAttrs {
        window: WindowAttrs {
            auto_pad: AutoPad::NotSet,
            kernel_shape: None,
            strides: None,
            dilations: None,
            pads: Some(vec![1, 1, 1, 1]),
        },
        group: 1,
    }))
}

fn check_fold(g0: &Graph, inputs: &[Tensor], nodes: usize, want: FoldStats) {
    let mut g = g0.clone();
    let stats = fold_all(&mut g);
    assert_eq!(stats, want, "{}", g.name);
    assert_eq!(g.nodes.len(), nodes, "{}", g.name);
    verify(&g).unwrap();
    let a = interp::run(g0, inputs).unwrap();
    let b = interp::run(&g, inputs).unwrap();
    assert_close(&g.name, &b, &a, 1e-5);
}

/// A Conv output with a second user is not folded.
#[test]
fn shared_conv_output_is_not_folded() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut g = Graph {
        name: "shared".into(),
        opset: 17,
        ..Default::default()
    };
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[1, 3, 5, 5])));
    g.inputs.push(x);
    let w = g.add_const("w", random_f32(&[4, 3, 3, 3], &mut rng));
    let b = g.add_const("b", random_f32(&[4, 1, 1], &mut rng));
    let y = g.add_value("y", Fact::new(DType::F32, Shape::unknown(4)));
    let out = g.add_value("out", Fact::new(DType::F32, Shape::unknown(4)));
    g.nodes = vec![
        Node {
            name: "conv".into(),
            op: conv_op(),
            inputs: vec![Some(x), Some(w)],
            outputs: vec![y],
        },
        Node {
            name: "add".into(),
            op: binary(BinaryKind::Add),
            inputs: vec![Some(y), Some(b)],
            outputs: vec![out],
        },
    ];
    g.outputs = vec![out, y];
    g.infer().unwrap();
    check_fold(
        &g,
        &[random_f32(&[1, 3, 5, 5], &mut rng)],
        2,
        FoldStats::default(),
    );
}

/// A BatchNormalization after a ReLU (pre-activation order) cannot fold into a Conv: it
/// becomes a per-channel `x * s + t` (no BatchNormalization is left for the kernels), for
/// per-channel and per-activation (`spatial = 0`) parameters.
#[test]
fn batchnorm_after_a_relu_becomes_a_per_channel_affine() {
    use kiln_ir::ops::elementwise::UnaryKind;
    use kiln_ir::ops::nn::{BatchNormAttrs, NnOp};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for per_activation in [false, true] {
        let mut g = Graph {
            name: format!("pre-activation (per activation: {per_activation})"),
            opset: 17,
            ..Default::default()
        };
        let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[2, 3, 4, 5])));
        g.inputs.push(x);
        let pshape: &[usize] = if per_activation { &[3, 4, 5] } else { &[3] };
        let mut params: Vec<usize> = ["scale", "bias", "mean"]
            .iter()
            .map(|n| g.add_const(*n, random_f32(pshape, &mut rng)))
            .collect();
        let var = random_f32(pshape, &mut rng).to_f64_vec();
        let var: Vec<f32> = var.iter().map(|v| 0.1 + v.abs() as f32).collect();
        params.push(g.add_const("var", Tensor::from_vec(pshape, var)));
        let r = g.add_value("r", Fact::new(DType::F32, Shape::unknown(4)));
        let out = g.add_value("out", Fact::new(DType::F32, Shape::unknown(4)));
        let bn = Op::Nn(NnOp::BatchNormalization(BatchNormAttrs {
            epsilon: 1e-3,
            momentum: 0.9,
            training: false,
            per_activation,
            num_outputs: 1,
        }));
        let mut bn_inputs = vec![Some(r)];
        bn_inputs.extend(params.iter().map(|&p| Some(p)));
        g.nodes = vec![
            Node {
                name: "relu".into(),
                op: Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)),
                inputs: vec![Some(x)],
                outputs: vec![r],
            },
            Node {
                name: "bn".into(),
                op: bn,
                inputs: bn_inputs,
                outputs: vec![out],
            },
        ];
        g.outputs.push(out);
        g.infer().unwrap();
        check_fold(
            &g,
            &[random_f32(&[2, 3, 4, 5], &mut rng)],
            3,
            FoldStats {
                batchnorm_affine: 1,
                ..Default::default()
            },
        );
    }
}
