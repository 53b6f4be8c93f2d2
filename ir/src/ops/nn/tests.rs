//! Unit tests of the nn op family against values computed with numpy / the ONNX reference.

use super::*;
use crate::ops::AttrValue;

/// A node of `op` at `opset` with the given attributes, `n_in` present inputs and
/// `n_out` outputs.
fn node(op: &str, opset: i64, attrs: &[(&str, AttrValue)], n_in: usize, n_out: usize) -> OnnxNode {
    OnnxNode::new(op, opset, attrs, vec![true; n_in], n_out)
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

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    const AUTO_PADS: [&str; 4] = ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"];

    /// Window attributes for `r` spatial dims from the generated numbers.
    fn window_attrs(
        r: usize,
        k: &[i64],
        s: &[i64],
        d: &[i64],
        p: &[i64],
        ap: usize,
    ) -> Vec<(&'static str, AttrValue)> {
        vec![
            ("kernel_shape", AttrValue::Ints(k[..r].to_vec())),
            ("strides", AttrValue::Ints(s[..r].to_vec())),
            ("dilations", AttrValue::Ints(d[..r].to_vec())),
            ("pads", AttrValue::Ints([&p[..r], &p[3..3 + r]].concat())),
            ("auto_pad", AttrValue::String(AUTO_PADS[ap].into())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Sliding-window ops either evaluate to the inferred shapes or return an error.
        #[test]
        fn sliding_window_ops_never_panic(
            r in 1usize..=3,
            n in 0usize..=2,
            c in 1usize..=4,
            dims in proptest::collection::vec(0usize..=6, 3),
            k in proptest::collection::vec(1i64..=4, 3),
            s in proptest::collection::vec(1i64..=3, 3),
            d in proptest::collection::vec(1i64..=2, 3),
            p in proptest::collection::vec(0i64..=3, 6),
            ap in 0usize..4,
            ceil in 0i64..=1,
            group in 1i64..=2,
            m in 1usize..=4,
            op_pad in 0i64..=1,
        ) {
            let mut xs = vec![n, c];
            xs.extend(&dims[..r]);
            let x = iota(&xs);
            let mut ws = vec![m, c / group as usize];
            ws.extend(k[..r].iter().map(|&k| k as usize));
            let w = iota(&ws);
            let wa = window_attrs(r, &k, &s, &d, &p, ap);
            let mut cases: Vec<(OnnxNode, Vec<&Tensor>)> = Vec::new();
            let mut conv_attrs = wa.clone();
            conv_attrs.push(("group", AttrValue::Int(group)));
            cases.push((node("Conv", 22, &conv_attrs, 2, 1), vec![&x, &w]));
            let mut ct = conv_attrs.clone();
            ct.push(("output_padding", AttrValue::Ints(vec![op_pad; r])));
            let mut wt_shape = vec![c, m];
            wt_shape.extend(k[..r].iter().map(|&k| k as usize));
            let wt = iota(&wt_shape);
            cases.push((node("ConvTranspose", 22, &ct, 2, 1), vec![&x, &wt]));
            let mut pool = wa.clone();
            pool.push(("ceil_mode", AttrValue::Int(ceil)));
            cases.push((node("MaxPool", 22, &pool, 1, 2), vec![&x]));
            cases.push((node("LpPool", 22, &pool, 1, 1), vec![&x]));
            pool.push(("count_include_pad", AttrValue::Int(1)));
            cases.push((node("AveragePool", 22, &pool, 1, 1), vec![&x]));
            for (nd, ins) in cases {
                let Ok(Some(op)) = NnOp::from_onnx(&nd) else { continue };
                let ins: Vec<Option<&Tensor>> = ins.into_iter().map(Some).collect();
                if let Ok(outs) = op.eval(&ins) {
                    let facts: Vec<Fact> = ins
                        .iter()
                        .map(|t| Fact::new(t.unwrap().dtype(), Shape::known(t.unwrap().shape())))
                        .collect();
                    let refs: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
                    let inferred = op.infer(&refs).unwrap();
                    for (o, f) in outs.iter().zip(&inferred) {
                        prop_assert_eq!(Shape::known(o.shape()), f.shape.clone());
                        prop_assert_eq!(o.dtype(), f.dtype);
                    }
                }
            }
        }

        /// Normalizations and softmax reject bad axes / shapes without panicking.
        #[test]
        fn other_ops_never_panic(
            dims in proptest::collection::vec(0usize..=4, 0..=4),
            axis in -5i64..=5,
            opset in prop_oneof![Just(11i64), Just(13), Just(18), Just(21)],
            pshape in proptest::collection::vec(0usize..=4, 0..=2),
        ) {
            let x = iota(&dims);
            let param = iota(&pshape);
            let ax = [("axis", AttrValue::Int(axis))];
            let ng = [("num_groups", AttrValue::Int(2))];
            let size = [("size", AttrValue::Int(3))];
            let cases: Vec<(OnnxNode, Vec<&Tensor>)> = vec![
                (node("Softmax", opset, &ax, 1, 1), vec![&x]),
                (node("LogSoftmax", opset, &ax, 1, 1), vec![&x]),
                (node("Hardmax", opset, &ax, 1, 1), vec![&x]),
                (node("LpNormalization", opset, &ax, 1, 1), vec![&x]),
                (node("LayerNormalization", 17, &ax, 3, 3), vec![&x, &param, &param]),
                (node("GroupNormalization", opset, &ng, 3, 1), vec![&x, &param, &param]),
                (node("InstanceNormalization", opset, &[], 3, 1), vec![&x, &param, &param]),
                (node("BatchNormalization", 15, &[], 5, 1), vec![&x, &param, &param, &param, &param]),
                (node("LRN", 13, &size, 1, 1), vec![&x]),
                (node("GlobalAveragePool", 1, &[], 1, 1), vec![&x]),
                (node("GlobalMaxPool", 1, &[], 1, 1), vec![&x]),
            ];
            for (nd, ins) in cases {
                let Ok(Some(op)) = NnOp::from_onnx(&nd) else { continue };
                let ins: Vec<Option<&Tensor>> = ins.into_iter().map(Some).collect();
                let _ = op.eval(&ins);
            }
        }
    }
}

#[test]
fn huge_attributes_are_rejected() {
    let big = AttrValue::Ints(vec![i64::MAX, 1]);
    for name in ["strides", "dilations", "kernel_shape", "pads"] {
        let n = node("Conv", 22, &[(name, big.clone())], 2, 1);
        assert!(NnOp::from_onnx(&n).is_err(), "{name}");
    }
    let op = parse(&node(
        "ConvTranspose",
        22,
        &[("strides", AttrValue::Ints(vec![1 << 30]))],
        2,
        1,
    ));
    let x = Fact::new(DType::F32, Shape::known(&[1, 1, usize::MAX / 2]));
    let w = Fact::new(DType::F32, Shape::known(&[1, 1, 3]));
    assert!(op.infer(&[Some(&x), Some(&w)]).is_err());
}

#[test]
fn global_lp_pool_and_old_opsets() {
    let x = f32s(&[1, 1, 2], &[3.0, 4.0]);
    let op = parse(&node("GlobalLpPool", 2, &[("p", AttrValue::Int(2))], 1, 1));
    close(&run(&op, &[&x])[0], &[1, 1, 1], &[5.0]);
    // BatchNormalization training outputs before opset 14 are refused at parse time.
    assert!(NnOp::from_onnx(&node("BatchNormalization", 9, &[], 5, 5)).is_err());
    // opset 7, spatial = 0: parameters per activation.
    let bn = parse(&node(
        "BatchNormalization",
        7,
        &[
            ("spatial", AttrValue::Int(0)),
            ("epsilon", AttrValue::Float(0.0)),
        ],
        5,
        1,
    ));
    let x = f32s(&[2, 1, 2], &[1., 2., 3., 4.]);
    let p = |v: [f32; 2]| f32s(&[1, 2], &v);
    let y = run(
        &bn,
        &[&x, &p([1., 2.]), &p([0., 1.]), &p([1., 2.]), &p([1., 4.])],
    );
    close(&y[0], &[2, 1, 2], &[0., 1., 2., 3.]);
    // GroupNormalization opset 18: scale/bias per group.
    let gn = parse(&node(
        "GroupNormalization",
        18,
        &[
            ("num_groups", AttrValue::Int(2)),
            ("epsilon", AttrValue::Float(0.0)),
        ],
        3,
        1,
    ));
    let x = f32s(&[1, 2, 2], &[0., 2., 5., 7.]);
    let y = run(&gn, &[&x, &f32s(&[2], &[1., 2.]), &f32s(&[2], &[0., 10.])]);
    close(&y[0], &[1, 2, 2], &[-1., 1., 8., 12.]);
}

#[test]
fn rms_normalization() {
    let op = parse(&node(
        "RMSNormalization",
        23,
        &[("epsilon", AttrValue::Float(0.0))],
        2,
        1,
    ));
    let y = run(
        &op,
        &[&f32s(&[1, 2], &[3.0, 4.0]), &f32s(&[2], &[1.0, 2.0])],
    );
    let rms = (12.5f32).sqrt();
    close(&y[0], &[1, 2], &[3.0 / rms, 8.0 / rms]);
    assert!(NnOp::from_onnx(&node("RMSNormalization", 23, &[], 3, 1)).is_err());
}
