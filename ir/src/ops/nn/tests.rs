//! Unit tests of the nn op family against values computed with numpy / the ONNX reference.

use super::*;
use crate::ops::AttrValue;

/// A node of `op` at `opset` with the given attributes, `n_in` present inputs and
/// `n_out` outputs.
fn node(op: &str, opset: i64, attrs: &[(&str, AttrValue)], n_in: usize, n_out: usize) -> OnnxNode {
    OnnxNode {
        name: "n".into(),
        op_type: op.into(),
        opset,
        attrs: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        inputs_present: vec![true; n_in],
        num_outputs: n_out,
    }
}

fn parse(n: &OnnxNode) -> NnOp {
    NnOp::from_onnx(n).unwrap().unwrap()
}

fn run(op: &NnOp, inputs: &[&Tensor]) -> Vec<Tensor> {
    let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
    op.eval(&ins).unwrap()
}

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape, v.to_vec())
}

fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|i| i as f32).collect())
}

fn close(t: &Tensor, shape: &[usize], want: &[f32]) {
    t.check_close(&f32s(shape, want), 1e-5, 1e-6).unwrap();
}

#[test]
fn not_ours() {
    assert!(NnOp::from_onnx(&node("Add", 13, &[], 2, 1))
        .unwrap()
        .is_none());
}

#[test]
fn conv_basic_padding() {
    let op = parse(&node(
        "Conv",
        11,
        &[("pads", AttrValue::Ints(vec![1; 4]))],
        2,
        1,
    ));
    let x = iota(&[1, 1, 5, 5]);
    let w = f32s(&[1, 1, 3, 3], &[1.0; 9]);
    let y = run(&op, &[&x, &w]);
    close(
        &y[0],
        &[1, 1, 5, 5],
        &[
            12., 21., 27., 33., 24., 33., 54., 63., 72., 51., 63., 99., 108., 117., 81., 93., 144.,
            153., 162., 111., 72., 111., 117., 123., 84.,
        ],
    );
}

#[test]
fn conv_groups_bias_dilation_strides() {
    // values from onnx.reference (onnxruntime rejects dilations with SAME padding)
    let op = parse(&node(
        "Conv",
        22,
        &[
            ("group", AttrValue::Int(2)),
            ("dilations", AttrValue::Ints(vec![2, 1])),
            ("strides", AttrValue::Ints(vec![1, 2])),
            ("auto_pad", AttrValue::String("SAME_LOWER".into())),
        ],
        3,
        1,
    ));
    let x = iota(&[1, 4, 3, 4]);
    let w = Tensor::from_vec(&[2, 2, 2, 2], (0..16).map(|i| i as f32 / 10.0).collect());
    let b = f32s(&[2], &[1.0, -1.0]);
    let y = run(&op, &[&x, &w, &b]);
    assert_eq!(y[0].shape(), &[1, 2, 3, 2]);
    close(
        &y[0],
        &[1, 2, 3, 2],
        &[
            24.8, 28.4, 43.4, 49.0, 16.4, 18.4, 176.4, 186.4, 329.4, 347.8, 148.8, 157.2,
        ],
    );
}

#[test]
fn conv_infer_symbolic_and_errors() {
    let op = parse(&node(
        "Conv",
        22,
        &[("strides", AttrValue::Ints(vec![2, 2]))],
        2,
        1,
    ));
    let x = Fact::new(
        DType::F32,
        Shape(vec![
            Dim::Sym("N".into()),
            3.into(),
            224.into(),
            Dim::unknown(),
        ]),
    );
    let w = Fact::new(DType::F32, Shape::known(&[64, 3, 7, 7]));
    let out = op.infer(&[Some(&x), Some(&w)]).unwrap();
    assert_eq!(out[0].shape.to_string(), "[N,64,109,?]");
    let bad = Fact::new(DType::F32, Shape::known(&[64, 4, 7, 7]));
    assert!(op.infer(&[Some(&x), Some(&bad)]).is_err());
    let wi = Fact::new(DType::I64, Shape::known(&[64, 3, 7, 7]));
    assert!(op.infer(&[Some(&x), Some(&wi)]).is_err());
    assert!(NnOp::from_onnx(&node(
        "Conv",
        22,
        &[("strides", AttrValue::Ints(vec![0]))],
        2,
        1
    ))
    .is_err());
    assert!(NnOp::from_onnx(&node("Conv", 22, &[], 1, 1)).is_err());
    // eval rejects inconsistent shapes instead of panicking
    let xs = iota(&[1, 3, 4, 4]);
    let ws = iota(&[2, 2, 3, 3]);
    assert!(op.eval(&[Some(&xs), Some(&ws)]).is_err());
    let big = iota(&[1, 3, 9, 9]);
    assert!(op.eval(&[Some(&xs), Some(&big)]).is_err());
}

#[test]
fn conv_transpose_basic() {
    let op = parse(&node(
        "ConvTranspose",
        22,
        &[("strides", AttrValue::Ints(vec![2]))],
        2,
        1,
    ));
    let x = f32s(&[1, 1, 3], &[1.0, 2.0, 3.0]);
    let w = f32s(&[1, 2, 2], &[1.0, 10.0, 100.0, 1000.0]);
    let y = run(&op, &[&x, &w]);
    close(
        &y[0],
        &[1, 2, 6],
        &[
            1., 10., 2., 20., 3., 30., 100., 1000., 200., 2000., 300., 3000.,
        ],
    );
}

#[test]
fn softmax_opsets() {
    let x = iota(&[2, 3]);
    let new = parse(&node("Softmax", 13, &[("axis", AttrValue::Int(0))], 1, 1));
    let y = run(&new, &[&x]);
    let a = 1.0 / (1.0 + (3.0f32).exp());
    close(&y[0], &[2, 3], &[a, a, a, 1.0 - a, 1.0 - a, 1.0 - a]);
    // opset 11, axis 0: the whole tensor is one row.
    let old = parse(&node("Softmax", 11, &[("axis", AttrValue::Int(0))], 1, 1));
    let y = run(&old, &[&x]);
    let s: f32 = (0..6).map(|i| (i as f32).exp()).sum();
    let want: Vec<f32> = (0..6).map(|i| (i as f32).exp() / s).collect();
    close(&y[0], &[2, 3], &want);
    let hm = parse(&node("Hardmax", 11, &[], 1, 1));
    close(&run(&hm, &[&x])[0], &[2, 3], &[0., 0., 1., 0., 0., 1.]);
    let ls = parse(&node("LogSoftmax", 13, &[], 1, 1));
    let y = run(&ls, &[&f32s(&[2], &[1000.0, 1000.0])]);
    close(&y[0], &[2], &[-(2.0f32.ln()), -(2.0f32.ln())]);
    assert!(new
        .infer(&[Some(&Fact::new(DType::F32, Shape::known(&[])))])
        .is_err());
}

#[test]
fn maxpool_indices_and_u8() {
    let op = parse(&node(
        "MaxPool",
        12,
        &[
            ("kernel_shape", AttrValue::Ints(vec![2, 2])),
            ("strides", AttrValue::Ints(vec![2, 2])),
            ("storage_order", AttrValue::Int(1)),
        ],
        1,
        2,
    ));
    let x = iota(&[1, 1, 4, 4]);
    let y = run(&op, &[&x]);
    close(&y[0], &[1, 1, 2, 2], &[5., 7., 13., 15.]);
    assert_eq!(y[1].to_i64_vec(), vec![5, 13, 7, 15]);
    let xu = x.cast(DType::U8);
    let y = run(&op, &[&xu]);
    assert_eq!(y[0].dtype(), DType::U8);
    assert_eq!(y[0].to_i64_vec(), vec![5, 7, 13, 15]);
}

#[test]
fn avgpool_ceil_and_pads() {
    let op = parse(&node(
        "AveragePool",
        19,
        &[
            ("kernel_shape", AttrValue::Ints(vec![3, 3])),
            ("strides", AttrValue::Ints(vec![2, 2])),
            ("ceil_mode", AttrValue::Int(1)),
        ],
        1,
        1,
    ));
    let x = Tensor::from_vec(&[1, 1, 4, 4], (1..=16).map(|i| i as f32).collect());
    close(&run(&op, &[&x])[0], &[1, 1, 2, 2], &[6., 7.5, 12., 13.5]);
    let op = parse(&node(
        "AveragePool",
        19,
        &[
            ("kernel_shape", AttrValue::Ints(vec![3])),
            ("pads", AttrValue::Ints(vec![1, 1])),
            ("count_include_pad", AttrValue::Int(1)),
        ],
        1,
        1,
    ));
    let x = f32s(&[1, 1, 3], &[3., 6., 9.]);
    close(&run(&op, &[&x])[0], &[1, 1, 3], &[3., 6., 5.]);
}

#[test]
fn global_pools_and_lp() {
    let x = iota(&[1, 2, 2, 2]);
    let ga = parse(&node("GlobalAveragePool", 1, &[], 1, 1));
    close(&run(&ga, &[&x])[0], &[1, 2, 1, 1], &[1.5, 5.5]);
    let gm = parse(&node("GlobalMaxPool", 1, &[], 1, 1));
    close(&run(&gm, &[&x])[0], &[1, 2, 1, 1], &[3., 7.]);
    let lp = parse(&node(
        "LpPool",
        18,
        &[("kernel_shape", AttrValue::Ints(vec![2, 2]))],
        1,
        1,
    ));
    close(
        &run(&lp, &[&x])[0],
        &[1, 2, 1, 1],
        &[14f32.sqrt(), 126f32.sqrt()],
    );
}

#[test]
fn norms() {
    let x = f32s(&[1, 2, 1, 3], &[-1., 0., 1., 2., 4., 6.]);
    let ones = f32s(&[2], &[1., 1.]);
    let zeros = f32s(&[2], &[0., 0.]);
    let bn = parse(&node(
        "BatchNormalization",
        15,
        &[("epsilon", AttrValue::Float(0.0))],
        5,
        1,
    ));
    let var = f32s(&[2], &[4., 1.]);
    let mean = f32s(&[2], &[1., 2.]);
    close(
        &run(&bn, &[&x, &ones, &zeros, &mean, &var])[0],
        &[1, 2, 1, 3],
        &[-1., -0.5, 0., 0., 2., 4.],
    );
    let s = (2.0f32 / 3.0).sqrt();
    let inorm = parse(&node(
        "InstanceNormalization",
        6,
        &[("epsilon", AttrValue::Float(0.0))],
        3,
        1,
    ));
    let inv = 1.0 / s;
    close(
        &run(&inorm, &[&x, &ones, &zeros])[0],
        &[1, 2, 1, 3],
        &[-inv, 0., inv, -inv, 0., inv],
    );
    let ln = parse(&node(
        "LayerNormalization",
        17,
        &[("epsilon", AttrValue::Float(0.0))],
        2,
        3,
    ));
    let sc = f32s(&[3], &[1., 1., 2.]);
    let y = run(&ln, &[&x, &sc]);
    close(
        &y[0],
        &[1, 2, 1, 3],
        &[-inv, 0., 2. * inv, -inv, 0., 2. * inv],
    );
    close(&y[1], &[1, 2, 1, 1], &[0., 4.]);
    let gn = parse(&node(
        "GroupNormalization",
        21,
        &[
            ("num_groups", AttrValue::Int(1)),
            ("epsilon", AttrValue::Float(0.0)),
        ],
        3,
        1,
    ));
    let y = run(&gn, &[&x, &ones, &zeros]);
    let m = 2.0f32;
    let sd = ((9. + 4. + 1. + 0. + 4. + 16.) / 6.0f32).sqrt();
    let want: Vec<f32> = [-1., 0., 1., 2., 4., 6.]
        .iter()
        .map(|v| (v - m) / sd)
        .collect();
    close(&y[0], &[1, 2, 1, 3], &want);
    let lp = parse(&node(
        "LpNormalization",
        1,
        &[("axis", AttrValue::Int(1)), ("p", AttrValue::Int(1))],
        1,
        1,
    ));
    let y = run(&lp, &[&f32s(&[2, 2], &[3., -1., 0., 0.])]);
    close(&y[0], &[2, 2], &[0.75, -0.25, 0., 0.]);
}

#[test]
fn lrn_matches_reference() {
    // onnx reference: LRN(size=3, alpha=0.1, beta=0.5, bias=1) of arange(4).reshape(1,4,1,1)
    let op = parse(&node(
        "LRN",
        13,
        &[
            ("size", AttrValue::Int(3)),
            ("alpha", AttrValue::Float(0.3)),
            ("beta", AttrValue::Float(0.5)),
        ],
        1,
        1,
    ));
    let y = run(&op, &[&iota(&[1, 4, 1, 1])]);
    let want: Vec<f32> = [(0., 1.), (1., 5.), (2., 14.), (3., 13.)]
        .iter()
        .map(|&(v, sq): &(f32, f32)| v / (1.0 + 0.1 * sq).sqrt())
        .collect();
    close(&y[0], &[1, 4, 1, 1], &want);
}
