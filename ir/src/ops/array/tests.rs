//! Unit tests of the array ops; expected values come from numpy / the ONNX reference.

use super::*;
use crate::ops::AttrValue;
use crate::shape::Dim;

/// An ONNX node with `n` present inputs and one output.
fn node(op: &str, opset: i64, n: usize, attrs: &[(&str, AttrValue)]) -> OnnxNode {
    OnnxNode::new(op, opset, attrs, vec![true; n], 1)
}

fn parse(op: &str, opset: i64, n: usize, attrs: &[(&str, AttrValue)]) -> ArrayOp {
    ArrayOp::from_onnx(&node(op, opset, n, attrs))
        .expect("valid node")
        .expect("array op")
}

fn ints(v: &[i64]) -> AttrValue {
    AttrValue::Ints(v.to_vec())
}

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape, v.to_vec())
}

fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(shape, (0..n as i64).collect())
}

/// Evaluates `op`, and checks that inference agrees with the result both with constant
/// inputs (where it must fold to the same value) and with the first input non-constant.
fn run(op: &ArrayOp, inputs: &[Tensor]) -> Vec<Tensor> {
    let refs: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
    let out = op.eval(&refs).expect("eval");
    let consts: Vec<Fact> = inputs.iter().cloned().map(Fact::constant).collect();
    let facts: Vec<Option<&Fact>> = consts.iter().map(Some).collect();
    let inferred = op.infer(&facts).expect("infer with constants");
    assert_eq!(inferred.len(), out.len());
    for (f, t) in inferred.iter().zip(&out) {
        assert_eq!(f.value(), Some(t), "folded value");
    }
    let mut open = consts.clone();
    open[0].value = None;
    let facts: Vec<Option<&Fact>> = open.iter().map(Some).collect();
    for (f, t) in op.infer(&facts).expect("infer").iter().zip(&out) {
        assert_eq!(f.dtype, t.dtype());
        assert_eq!(f.shape.rank(), t.rank(), "rank of {:?}", f.shape);
        for (d, &n) in f.shape.dims().iter().zip(t.shape()) {
            assert!(
                d.compatible(&Dim::Known(n)),
                "{} vs {:?}",
                f.shape,
                t.shape()
            );
        }
    }
    out
}

fn run1(op: &ArrayOp, inputs: &[Tensor]) -> Tensor {
    run(op, inputs).remove(0)
}

fn sym(dims: &[&str]) -> Shape {
    Shape(
        dims.iter()
            .map(|d| {
                d.parse()
                    .map_or_else(|_| Dim::Sym(d.to_string()), Dim::Known)
            })
            .collect(),
    )
}

fn eval_err(op: &ArrayOp, inputs: &[Tensor]) -> String {
    let refs: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
    op.eval(&refs).expect_err("should fail")
}

#[test]
fn reshape_zero_and_inferred() {
    let op = parse("Reshape", 14, 2, &[]);
    let y = run1(&op, &[iota(&[2, 3, 4]), Tensor::vec_i64(&[0, -1])]);
    assert_eq!(y.shape(), &[2, 12]);
    assert_eq!(y.to_i64_vec(), iota(&[24]).to_i64_vec());
    let z = parse("Reshape", 14, 2, &[("allowzero", AttrValue::Int(1))]);
    let y = run1(&z, &[iota(&[0, 3]), Tensor::vec_i64(&[3, 0])]);
    assert_eq!(y.shape(), &[3, 0]);
    assert!(eval_err(&op, &[iota(&[2, 3]), Tensor::vec_i64(&[4, -1])]).contains("cannot"));
    assert!(eval_err(&op, &[iota(&[2, 3]), Tensor::vec_i64(&[-1, -1])]).contains("-1"));
    let old = parse("Reshape", 1, 1, &[("shape", ints(&[3, 2]))]);
    assert_eq!(run1(&old, &[iota(&[2, 3])]).shape(), &[3, 2]);
}

#[test]
fn reshape_symbolic() {
    let op = parse("Reshape", 14, 2, &[]);
    let x = Fact::new(DType::F32, sym(&["N", "3", "4"]));
    let s = Fact::constant(Tensor::vec_i64(&[0, -1]));
    let out = op.infer(&[Some(&x), Some(&s)]).unwrap();
    assert_eq!(out[0].shape.to_string(), "[N,12]");
    let s = Fact::constant(Tensor::vec_i64(&[-1, 4]));
    let out = op.infer(&[Some(&x), Some(&s)]).unwrap();
    assert_eq!(out[0].shape.to_string(), "[?,4]");
    let s = Fact::new(DType::I64, Shape::known(&[3]));
    let out = op.infer(&[Some(&x), Some(&s)]).unwrap();
    assert_eq!(out[0].shape.to_string(), "[?,?,?]");
    let bad = Fact::constant(Tensor::vec_i64(&[5, -1]));
    let known = Fact::new(DType::F32, Shape::known(&[2, 3, 4]));
    assert!(op.infer(&[Some(&known), Some(&bad)]).is_err());
}

/// Exporter shape chain `Shape → Gather → Unsqueeze → Concat → Reshape` folds to a static
/// shape when the input shape is known.
#[test]
fn shape_chain_folds() {
    let x = Fact::new(DType::F32, Shape::known(&[2, 3, 4]));
    let shape = parse("Shape", 15, 1, &[])
        .infer(&[Some(&x)])
        .unwrap()
        .remove(0);
    assert_eq!(shape.value().unwrap().to_i64_vec(), vec![2, 3, 4]);
    let idx = Fact::constant(Tensor::scalar(0i64));
    let g = parse("Gather", 13, 2, &[])
        .infer(&[Some(&shape), Some(&idx)])
        .unwrap()
        .remove(0);
    assert_eq!(g.value().unwrap().to_i64_vec(), vec![2]);
    assert_eq!(g.shape.rank(), 0);
    let axes = Fact::constant(Tensor::vec_i64(&[0]));
    let u = parse("Unsqueeze", 13, 2, &[])
        .infer(&[Some(&g), Some(&axes)])
        .unwrap()
        .remove(0);
    let minus1 = Fact::constant(Tensor::vec_i64(&[-1]));
    let c = parse("Concat", 13, 2, &[("axis", AttrValue::Int(0))])
        .infer(&[Some(&u), Some(&minus1)])
        .unwrap()
        .remove(0);
    assert_eq!(c.value().unwrap().to_i64_vec(), vec![2, -1]);
    let r = parse("Reshape", 14, 2, &[])
        .infer(&[Some(&x), Some(&c)])
        .unwrap()
        .remove(0);
    assert_eq!(r.shape, Shape::known(&[2, 12]));
    assert!(r.value.is_none());
}

#[test]
fn shape_and_size() {
    let x = Fact::new(DType::F32, sym(&["N", "3", "4"]));
    let s = parse("Shape", 15, 1, &[])
        .infer(&[Some(&x)])
        .unwrap()
        .remove(0);
    assert_eq!(
        (s.shape.to_string(), s.value.is_none()),
        ("[3]".into(), true)
    );
    let tail = parse("Shape", 15, 1, &[("start", AttrValue::Int(1))]);
    let s = tail.infer(&[Some(&x)]).unwrap().remove(0);
    assert_eq!(s.value().unwrap().to_i64_vec(), vec![3, 4]);
    let clip = parse(
        "Shape",
        15,
        1,
        &[("start", AttrValue::Int(-10)), ("end", AttrValue::Int(-1))],
    );
    assert_eq!(run1(&clip, &[iota(&[2, 3, 4])]).to_i64_vec(), vec![2, 3]);
    let empty = parse(
        "Shape",
        15,
        1,
        &[("start", AttrValue::Int(2)), ("end", AttrValue::Int(1))],
    );
    assert_eq!(run1(&empty, &[iota(&[2, 3, 4])]).shape(), &[0]);
    let size = parse("Size", 13, 1, &[]);
    assert_eq!(run1(&size, &[iota(&[2, 3, 4])]).to_i64_vec(), vec![24]);
    let s = size.infer(&[Some(&x)]).unwrap().remove(0);
    assert_eq!((s.shape.rank(), s.value.is_none()), (0, true));
}

#[test]
fn transpose_flatten_squeeze_unsqueeze() {
    let t = parse("Transpose", 13, 1, &[]);
    let y = run1(&t, &[iota(&[2, 3])]);
    assert_eq!(
        (y.shape(), y.to_i64_vec()),
        (&[3, 2][..], vec![0, 3, 1, 4, 2, 5])
    );
    let t = parse("Transpose", 13, 1, &[("perm", ints(&[1, 2, 0]))]);
    assert_eq!(run1(&t, &[iota(&[2, 3, 4])]).shape(), &[3, 4, 2]);
    assert!(eval_err(&t, &[iota(&[2, 3])]).contains("perm"));
    let f = parse("Flatten", 13, 1, &[("axis", AttrValue::Int(-1))]);
    assert_eq!(run1(&f, &[iota(&[2, 3, 4])]).shape(), &[6, 4]);
    let f0 = parse("Flatten", 13, 1, &[("axis", AttrValue::Int(0))]);
    assert_eq!(run1(&f0, &[iota(&[2, 3, 4])]).shape(), &[1, 24]);
    let sq = parse("Squeeze", 13, 1, &[]);
    assert_eq!(run1(&sq, &[iota(&[1, 3, 1])]).shape(), &[3]);
    let sq = parse("Squeeze", 13, 2, &[]);
    assert_eq!(
        run1(&sq, &[iota(&[1, 3, 1]), Tensor::vec_i64(&[-1])]).shape(),
        &[1, 3]
    );
    assert!(eval_err(&sq, &[iota(&[1, 3]), Tensor::vec_i64(&[1])]).contains("squeeze"));
    let old = parse("Squeeze", 11, 1, &[("axes", ints(&[0]))]);
    assert_eq!(run1(&old, &[iota(&[1, 3, 1])]).shape(), &[3, 1]);
    let un = parse("Unsqueeze", 13, 2, &[]);
    assert_eq!(
        run1(&un, &[iota(&[3, 4]), Tensor::vec_i64(&[3, 0])]).shape(),
        &[1, 3, 4, 1]
    );
    let old = parse("Unsqueeze", 11, 1, &[("axes", ints(&[-1]))]);
    assert_eq!(run1(&old, &[iota(&[3])]).shape(), &[3, 1]);
    assert!(ArrayOp::from_onnx(&node("Unsqueeze", 11, 1, &[])).is_err());
    assert!(eval_err(&un, &[iota(&[3]), Tensor::vec_i64(&[0, 0])]).contains("twice"));
}

#[test]
fn concat_split() {
    let c = parse("Concat", 13, 2, &[("axis", AttrValue::Int(-1))]);
    let y = run1(&c, &[iota(&[2, 1]), iota(&[2, 2])]);
    assert_eq!(y.to_i64_vec(), vec![0, 0, 1, 1, 2, 3]);
    assert!(eval_err(&c, &[iota(&[2, 1]), iota(&[3, 2])]).contains("concatenate"));
    assert!(eval_err(&c, &[iota(&[2, 1]), f32s(&[2, 1], &[0., 1.])]).contains("dtype"));
    let mut n = node("Split", 18, 1, &[("num_outputs", AttrValue::Int(3))]);
    n.num_outputs = 3;
    let s = ArrayOp::from_onnx(&n).unwrap().unwrap();
    let parts = run(&s, &[iota(&[7])]);
    let lens: Vec<_> = parts.iter().map(|p| p.len()).collect();
    assert_eq!(lens, vec![3, 3, 1]);
    assert_eq!(parts[2].to_i64_vec(), vec![6]);
    let mut n = node("Split", 13, 2, &[("axis", AttrValue::Int(1))]);
    n.num_outputs = 2;
    let s = ArrayOp::from_onnx(&n).unwrap().unwrap();
    let parts = run(&s, &[iota(&[2, 5]), Tensor::vec_i64(&[1, 4])]);
    assert_eq!(parts[0].to_i64_vec(), vec![0, 5]);
    assert!(eval_err(&s, &[iota(&[2, 5]), Tensor::vec_i64(&[1, 3])]).contains("add up"));
    let mut n = node("Split", 11, 1, &[("split", ints(&[2, 0, 1]))]);
    n.num_outputs = 3;
    let s = ArrayOp::from_onnx(&n).unwrap().unwrap();
    assert_eq!(run(&s, &[iota(&[3])])[1].shape(), &[0]);
}

#[test]
fn slice_steps_and_clamping() {
    let s = parse("Slice", 13, 5, &[]);
    let v = |x: &[i64]| Tensor::vec_i64(x);
    // x[::-1] on axis 1 of a 2x4
    let y = run1(
        &s,
        &[iota(&[2, 4]), v(&[-1]), v(&[i64::MIN]), v(&[1]), v(&[-1])],
    );
    assert_eq!(y.to_i64_vec(), vec![3, 2, 1, 0, 7, 6, 5, 4]);
    // x[1:1000, 0:3:2]
    let y = run1(
        &s,
        &[
            iota(&[2, 4]),
            v(&[1, 0]),
            v(&[1000, 3]),
            v(&[0, 1]),
            v(&[1, 2]),
        ],
    );
    assert_eq!(y.to_i64_vec(), vec![4, 6]);
    // start out of bounds gives an empty result
    let y = run1(&s, &[iota(&[2, 4]), v(&[10]), v(&[20]), v(&[1]), v(&[1])]);
    assert_eq!(y.shape(), &[2, 0]);
    // x[5:-6:-2] on a length 4 axis → [3, 1]
    let y = run1(&s, &[iota(&[4]), v(&[5]), v(&[-6]), v(&[0]), v(&[-2])]);
    assert_eq!(y.to_i64_vec(), vec![3, 1]);
    assert!(eval_err(&s, &[iota(&[4]), v(&[0]), v(&[1]), v(&[0]), v(&[0])]).contains("step"));
    assert!(eval_err(&s, &[iota(&[4]), v(&[0]), v(&[1]), v(&[1]), v(&[1])]).contains("axis"));
    let s3 = parse("Slice", 13, 3, &[]);
    assert_eq!(
        run1(&s3, &[iota(&[3, 4]), v(&[1, 1]), v(&[2, -1])]).to_i64_vec(),
        vec![5, 6]
    );
    let old = parse(
        "Slice",
        1,
        1,
        &[
            ("starts", ints(&[1])),
            ("ends", ints(&[3])),
            ("axes", ints(&[1])),
        ],
    );
    assert_eq!(run1(&old, &[iota(&[2, 4])]).to_i64_vec(), vec![1, 2, 5, 6]);
    // a symbolic dim sliced [0:INT_MAX] stays symbolic
    let x = Fact::new(DType::F32, sym(&["N", "4"]));
    let facts = [v(&[0, 1]), v(&[i64::MAX, 3]), v(&[0, 1])].map(Fact::constant);
    let out = s3.infer(&[Some(&x), Some(&facts[0]), Some(&facts[1]), Some(&facts[2])]);
    assert_eq!(out.unwrap()[0].shape.to_string(), "[N,2]");
}

#[test]
fn gather_family() {
    let g = parse("Gather", 13, 2, &[("axis", AttrValue::Int(1))]);
    let idx = Tensor::from_vec(&[2, 1], vec![-1i32, 0]);
    let y = run1(&g, &[iota(&[2, 3]), idx]);
    assert_eq!(
        (y.shape(), y.to_i64_vec()),
        (&[2, 2, 1][..], vec![2, 0, 5, 3])
    );
    assert!(eval_err(&g, &[iota(&[2, 3]), Tensor::vec_i64(&[3])]).contains("out of range"));
    assert!(eval_err(&g, &[iota(&[2, 3]), f32s(&[1], &[0.])]).contains("int"));
    let ge = parse("GatherElements", 13, 2, &[("axis", AttrValue::Int(1))]);
    let idx = Tensor::from_vec(&[2, 2], vec![0i64, 0, 1, -3]);
    let y = run1(&ge, &[iota(&[2, 3]), idx]);
    assert_eq!(y.to_i64_vec(), vec![0, 0, 4, 3]);
    let nd = parse("GatherND", 13, 2, &[("batch_dims", AttrValue::Int(1))]);
    let idx = Tensor::from_vec(&[2, 1], vec![1i64, 0]);
    let y = run1(&nd, &[iota(&[2, 2, 2]), idx]);
    assert_eq!((y.shape(), y.to_i64_vec()), (&[2, 2][..], vec![2, 3, 4, 5]));
    let nd0 = parse("GatherND", 13, 2, &[]);
    let idx = Tensor::from_vec(&[2, 2], vec![0i64, 1, 1, 0]);
    assert_eq!(run1(&nd0, &[iota(&[2, 2]), idx]).to_i64_vec(), vec![1, 2]);
    let idx = Tensor::from_vec(&[1, 3], vec![0i64, 1, 1]);
    assert!(eval_err(&nd0, &[iota(&[2, 2]), idx]).contains("tuples"));
}

#[test]
fn scatter_family() {
    let data = f32s(&[1, 5], &[1., 2., 3., 4., 5.]);
    let idx = Tensor::from_vec(&[1, 2], vec![1i64, 1]);
    let upd = f32s(&[1, 2], &[1.1, 2.1]);
    let expect = |r: &str, v: &[f32]| {
        let op = parse(
            "ScatterElements",
            18,
            3,
            &[
                ("axis", AttrValue::Int(1)),
                ("reduction", AttrValue::String(r.into())),
            ],
        );
        let y = run1(&op, &[data.clone(), idx.clone(), upd.clone()]);
        y.check_close(&f32s(&[1, 5], v), 1e-6, 0.0).unwrap();
    };
    expect("none", &[1., 2.1, 3., 4., 5.]);
    expect("add", &[1., 5.2, 3., 4., 5.]);
    expect("mul", &[1., 2. * 1.1 * 2.1, 3., 4., 5.]);
    expect("max", &[1., 2.1, 3., 4., 5.]);
    expect("min", &[1., 1.1, 3., 4., 5.]);
    let op = parse("ScatterElements", 18, 3, &[]);
    let bad = Tensor::from_vec(&[1, 2], vec![1i64, 1]);
    assert!(eval_err(&op, &[data.clone(), bad, upd.clone()]).contains("out of range"));
    let old = parse("Scatter", 10, 3, &[("axis", AttrValue::Int(1))]);
    assert_eq!(old.op_type(), "ScatterElements");
    let nd = parse(
        "ScatterND",
        18,
        3,
        &[("reduction", AttrValue::String("add".into()))],
    );
    let idx = Tensor::from_vec(&[2, 1], vec![0i64, 0]);
    let upd = Tensor::from_vec(&[2, 2], vec![1i64, 2, 3, 4]);
    let y = run1(&nd, &[iota(&[2, 2]), idx, upd]);
    assert_eq!(y.to_i64_vec(), vec![4, 7, 2, 3]);
    let idx = Tensor::from_vec(&[1, 2], vec![1i64, 1]);
    let y = run1(
        &parse("ScatterND", 18, 3, &[]),
        &[iota(&[2, 2]), idx, Tensor::vec_i64(&[9])],
    );
    assert_eq!(y.to_i64_vec(), vec![0, 1, 2, 9]);
}

#[test]
fn expand_tile() {
    let e = parse("Expand", 13, 2, &[]);
    let y = run1(&e, &[iota(&[3, 1]), Tensor::vec_i64(&[2, 1, 2])]);
    assert_eq!(y.shape(), &[2, 3, 2]);
    assert_eq!(y.to_i64_vec()[..6], [0, 0, 1, 1, 2, 2]);
    assert!(eval_err(&e, &[iota(&[3]), Tensor::vec_i64(&[2])]).contains("broadcast"));
    let t = parse("Tile", 13, 2, &[]);
    let y = run1(&t, &[iota(&[2, 2]), Tensor::vec_i64(&[1, 2])]);
    assert_eq!(y.to_i64_vec(), vec![0, 1, 0, 1, 2, 3, 2, 3]);
    assert!(eval_err(&t, &[iota(&[2, 2]), Tensor::vec_i64(&[2])]).contains("repeats"));
}

#[test]
fn pad_modes() {
    let pads = Tensor::vec_i64(&[1, 2, 2, 1]);
    let p = |mode: &str| parse("Pad", 18, 2, &[("mode", AttrValue::String(mode.into()))]);
    let y = run1(&p("reflect"), &[iota(&[3, 4]), pads.clone()]);
    assert_eq!(y.shape(), &[6, 7]);
    assert_eq!(
        y.to_i64_vec()[..14],
        [6, 5, 4, 5, 6, 7, 6, 2, 1, 0, 1, 2, 3, 2]
    );
    let edge = run1(&p("edge"), &[iota(&[3, 4]), Tensor::vec_i64(&[1, 0, 0, 1])]);
    assert_eq!(edge.to_i64_vec()[..10], [0, 1, 2, 3, 3, 0, 1, 2, 3, 3]);
    // negative begin pad crops, then wraps around the cropped data
    let wrap = run1(
        &p("wrap"),
        &[iota(&[3, 4]), Tensor::vec_i64(&[0, -1, 0, 2])],
    );
    assert_eq!(wrap.to_i64_vec()[..5], [1, 2, 3, 1, 2]);
    let c = parse("Pad", 18, 4, &[]);
    let y = run1(
        &c,
        &[
            iota(&[2, 2]),
            Tensor::vec_i64(&[1, 0]),
            Tensor::scalar(7i64),
            Tensor::vec_i64(&[-1]),
        ],
    );
    assert_eq!(y.to_i64_vec(), vec![7, 0, 1, 7, 2, 3]);
    let old = parse(
        "Pad",
        2,
        1,
        &[
            ("pads", ints(&[0, 1, 0, 0])),
            ("value", AttrValue::Float(1.5)),
        ],
    );
    let y = run1(&old, &[f32s(&[1, 1], &[3.])]);
    assert_eq!(y.to_f64_vec(), vec![1.5, 3.]);
    assert!(eval_err(&c, &[iota(&[2]), Tensor::vec_i64(&[-3, 0])]).contains("crop"));
    assert!(eval_err(&p("edge"), &[iota(&[0]), Tensor::vec_i64(&[1, 0])]).contains("empty"));
}

#[test]
fn constant_of_shape_range_eye() {
    let c = parse(
        "ConstantOfShape",
        20,
        1,
        &[(
            "value",
            AttrValue::Tensor(Tensor::from_vec(&[1], vec![3i32])),
        )],
    );
    let y = run1(&c, &[Tensor::vec_i64(&[])]);
    assert_eq!((y.shape(), y.dtype()), (&[][..], DType::I32));
    let y = run1(&c, &[Tensor::vec_i64(&[2, 0])]);
    assert_eq!(y.shape(), &[2, 0]);
    let d = parse("ConstantOfShape", 20, 1, &[]);
    assert_eq!(run1(&d, &[Tensor::vec_i64(&[2])]).dtype(), DType::F32);
    assert!(eval_err(&d, &[Tensor::vec_i64(&[-2])]).contains("non-negative"));
    let r = parse("Range", 13, 3, &[]);
    let y = run1(
        &r,
        &[
            Tensor::scalar(10i32),
            Tensor::scalar(6i32),
            Tensor::scalar(-3i32),
        ],
    );
    assert_eq!(y.to_i64_vec(), vec![10, 7]);
    let y = run1(
        &r,
        &[
            Tensor::scalar(1f32),
            Tensor::scalar(2f32),
            Tensor::scalar(0.3f32),
        ],
    );
    assert_eq!(y.shape(), &[4]);
    assert!(eval_err(
        &r,
        &[
            Tensor::scalar(1i64),
            Tensor::scalar(2i64),
            Tensor::scalar(0i64)
        ]
    )
    .contains("0"));
    assert!(eval_err(
        &r,
        &[
            Tensor::scalar(1i64),
            Tensor::scalar(2i32),
            Tensor::scalar(1i64)
        ]
    )
    .contains("dtype"));
    let e = parse(
        "EyeLike",
        22,
        1,
        &[("k", AttrValue::Int(1)), ("dtype", AttrValue::Int(7))],
    );
    let y = run1(&e, &[f32s(&[2, 3], &[0.; 6])]);
    assert_eq!(
        (y.dtype(), y.to_i64_vec()),
        (DType::I64, vec![0, 1, 0, 0, 0, 1])
    );
}

#[test]
fn trilu_onehot_nonzero_depth() {
    let up = parse("Trilu", 14, 2, &[]);
    let y = run1(&up, &[iota(&[3, 3]), Tensor::scalar(1i64)]);
    assert_eq!(y.to_i64_vec(), vec![0, 1, 2, 0, 0, 5, 0, 0, 0]);
    let lo = parse("Trilu", 14, 1, &[("upper", AttrValue::Int(0))]);
    assert_eq!(run1(&lo, &[iota(&[2, 2])]).to_i64_vec(), vec![0, 0, 2, 3]);
    let oh = parse("OneHot", 11, 3, &[("axis", AttrValue::Int(0))]);
    let y = run1(
        &oh,
        &[
            Tensor::vec_i64(&[1, -1, 5]),
            Tensor::scalar(3f32),
            f32s(&[2], &[0., 2.]),
        ],
    );
    assert_eq!(y.shape(), &[3, 3]);
    assert_eq!(y.to_f64_vec(), vec![0., 0., 0., 2., 0., 0., 0., 2., 0.]);
    let nz = parse("NonZero", 13, 1, &[]);
    let y = run1(
        &nz,
        &[Tensor::from_vec(&[2, 2], vec![true, false, false, true])],
    );
    assert_eq!((y.shape(), y.to_i64_vec()), (&[2, 2][..], vec![0, 1, 0, 1]));
    let d2s = parse(
        "DepthToSpace",
        13,
        1,
        &[
            ("blocksize", AttrValue::Int(2)),
            ("mode", AttrValue::String("CRD".into())),
        ],
    );
    let y = run1(&d2s, &[iota(&[1, 4, 1, 1])]);
    assert_eq!(
        (y.shape(), y.to_i64_vec()),
        (&[1, 1, 2, 2][..], vec![0, 1, 2, 3])
    );
    let dcr = parse("DepthToSpace", 13, 1, &[("blocksize", AttrValue::Int(2))]);
    let y = run1(&dcr, &[iota(&[1, 8, 1, 1])]);
    assert_eq!(y.to_i64_vec(), vec![0, 2, 4, 6, 1, 3, 5, 7]);
    let s2d = parse("SpaceToDepth", 13, 1, &[("blocksize", AttrValue::Int(2))]);
    assert_eq!(run1(&s2d, &[y]).to_i64_vec(), iota(&[8]).to_i64_vec());
    assert!(eval_err(&s2d, &[iota(&[1, 1, 3, 2])]).contains("divisible"));
}

#[test]
fn bad_attributes() {
    let bad = |op: &str, attrs: &[(&str, AttrValue)], n: usize| {
        ArrayOp::from_onnx(&node(op, 18, n, attrs)).expect_err(op)
    };
    assert!(bad("Pad", &[("mode", AttrValue::String("mirror".into()))], 2).contains("mode"));
    assert!(bad("DepthToSpace", &[("blocksize", AttrValue::Int(0))], 1).contains("blocksize"));
    assert!(bad(
        "ScatterND",
        &[("reduction", AttrValue::String("sub".into()))],
        3
    )
    .contains("reduction"));
    assert!(bad("Concat", &[], 2).contains("axis"));
    assert!(bad("Gather", &[], 1).contains("inputs"));
    assert!(ArrayOp::from_onnx(&node("Conv", 18, 2, &[]))
        .unwrap()
        .is_none());
}

/// `Concat`'s contiguous fast path against ndarray's general concatenation, on every axis
/// of shapes of rank 1 to 4 (empty dims included), with a transposed (non-contiguous)
/// input that takes the general path.
#[test]
fn concat_matches_ndarray() {
    use ndarray::{concatenate, Axis, IxDyn};
    let mut seed = 7u64;
    let mut next = |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    for rank in 1..=4 {
        for axis in 0..rank {
            for case in 0..6 {
                let base: Vec<usize> = (0..rank).map(|_| next(4) + usize::from(case < 5)).collect();
                let parts: Vec<ndarray::ArrayD<f32>> = (0..1 + next(3))
                    .map(|_| {
                        let mut d = base.clone();
                        d[axis] = next(4);
                        let n: usize = d.iter().product();
                        ndarray::ArrayD::from_shape_vec(
                            IxDyn(&d),
                            (0..n).map(|i| i as f32 + 0.5).collect(),
                        )
                        .unwrap()
                    })
                    .collect();
                let want = concatenate(
                    Axis(axis),
                    &parts.iter().map(|p| p.view()).collect::<Vec<_>>(),
                )
                .unwrap();
                let c = parse(
                    "Concat",
                    13,
                    parts.len(),
                    &[("axis", AttrValue::Int(axis as i64))],
                );
                let ins: Vec<Tensor> = parts.iter().cloned().map(Tensor::from).collect();
                let got = run1(&c, &ins);
                assert_eq!(
                    got.as_array::<f32>(),
                    Some(&want),
                    "rank {rank} axis {axis}"
                );
            }
        }
    }
    // a transposed input is not contiguous: the general path
    let t = ndarray::Array2::from_shape_vec((3, 2), (0..6).map(|i| i as f32).collect())
        .unwrap()
        .reversed_axes()
        .into_dyn();
    let c = parse("Concat", 13, 2, &[("axis", AttrValue::Int(1))]);
    let got = run1(&c, &[Tensor::from(t.clone()), Tensor::from(t.clone())]);
    assert_eq!(
        got.to_f64_vec(),
        vec![0., 2., 4., 0., 2., 4., 1., 3., 5., 1., 3., 5.]
    );
}
