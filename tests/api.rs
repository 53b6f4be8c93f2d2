//! The library API: `Compiler` from a path, bytes and a graph, `Artifact` save/load,
//! `Session::run` / `run_into`, typed errors, and concurrent runs from many threads.

use kiln::{Artifact, Compiler, Error, Session, TensorView};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn mlp() -> PathBuf {
    root().join("tests/zoo/mlp/model.onnx")
}

/// An ONNX tensor file's shape and f32 elements.
fn read_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let (_, t) = kiln::ir::onnx::load_tensor_pb(path).unwrap();
    let v: Vec<f32> = t.to_f64_vec().into_iter().map(|x| x as f32).collect();
    (t.shape().to_vec(), v)
}

#[test]
fn compile_save_load_run_mlp() {
    let dir = root().join("tests/zoo/mlp/test_data_set_0");
    let (shape, x) = read_f32(&dir.join("input_0.pb"));
    let (oshape, expected) = read_f32(&dir.join("output_0.pb"));

    let art = Compiler::new()
        .target("cpu")
        .unwrap()
        .shape("input", shape.clone())
        .compile(&mlp())
        .unwrap();
    assert!(art.report().unwrap().kernels > 0);
    assert_eq!(art.inputs().len(), 1);
    let tmp = std::env::temp_dir().join(format!("kiln-api-{}.kiln", std::process::id()));
    art.save(&tmp).unwrap();
    let loaded = Artifact::load(&tmp).unwrap();
    std::fs::remove_file(&tmp).ok();
    assert_eq!(loaded.to_bytes().unwrap(), art.to_bytes().unwrap());

    let s =
        Session::from_artifact(Artifact::from_bytes(&art.to_bytes().unwrap()).unwrap()).unwrap();
    let outs = s.run(&[TensorView::from_f32(&shape, &x)]).unwrap();
    assert_eq!(outs[0].shape, oshape);
    let got = outs[0].as_f32().unwrap();
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // run_into writes the same bits into a caller buffer.
    let mut y = vec![0f32; got.len()];
    s.run_into(
        &[TensorView::from_f32(&shape, &x)],
        &mut [kiln::bytes_of_mut(&mut y)],
    )
    .unwrap();
    assert_eq!(kiln::bytes_of(&y), outs[0].data.as_slice());
    // A session of the reloaded artifact gives the same bits.
    let s2 = Session::new(&loaded).unwrap();
    let outs2 = s2.run(&[TensorView::from_f32(&shape, &x)]).unwrap();
    assert_eq!(outs2[0].data.as_slice(), outs[0].data.as_slice());
}

/// Compiling from ONNX bytes and from an imported graph gives the same artifact as from the
/// file.
#[test]
fn compile_from_bytes_and_graph() {
    let bytes = std::fs::read(mlp()).unwrap();
    let c = Compiler::new().opt_level(1);
    let a = c.compile(&bytes).unwrap();
    let g = kiln::ir::onnx::load(mlp()).unwrap();
    let b = c.compile(&g).unwrap();
    assert_eq!(a.as_runtime().plan, b.as_runtime().plan);
    assert_eq!(a.as_runtime().weights, b.as_runtime().weights);
}

#[test]
fn typed_errors() {
    let e = Compiler::new().target("gpu").unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let e = Compiler::new()
        .compile(Path::new("/nonexistent.onnx"))
        .unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("/nonexistent.onnx"),
        "{e}"
    );
    let e = Compiler::new().compile(&b"garbage"[..]).unwrap_err();
    assert!(matches!(e, Error::Compile(_)), "{e}");
    let e = Artifact::from_bytes(b"not an artifact").unwrap_err();
    assert!(matches!(e, Error::Artifact(_)), "{e}");
    let s = add16();
    let e = s.run(&[]).unwrap_err();
    assert!(matches!(e, Error::Run(_)), "{e}");
}

fn add16() -> Session {
    Compiler::new()
        .compile(&root().join("tests/data/add16.onnx"))
        .unwrap()
        .session()
        .unwrap()
}

/// 8 threads × 1,000 runs on one session, each with its own inputs: every output is right.
#[test]
fn concurrent_runs_from_eight_threads() {
    let s = Arc::new(add16());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut y = [0f32; 16];
                for i in 0..1000 {
                    let a: Vec<f32> = (0..16).map(|k| (t * 1000 + i + k) as f32).collect();
                    let b: Vec<f32> = (0..16).map(|k| k as f32 * 0.5).collect();
                    let ins = [
                        TensorView::from_f32(&[16], &a),
                        TensorView::from_f32(&[16], &b),
                    ];
                    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
                    if i % 2 == 0 {
                        let outs = s.run(&ins).unwrap();
                        assert_eq!(outs[0].as_f32().unwrap(), &want[..]);
                    } else {
                        s.run_into(&ins, &mut [kiln::bytes_of_mut(&mut y)]).unwrap();
                        assert_eq!(&y[..], &want[..]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!((1..=8).contains(&s.instances()), "{}", s.instances());
}

/// A graph with a static prefix compiled to code (MatMul, Relu, Sigmoid) feeding a dynamic
/// tail: a Reshape whose shape is a graph input, and a NonZero of a model output. Outputs:
/// `z` (static, from the prefix), `y` and `nz` (data-dependent shapes).
fn dynamic_graph() -> kiln::ir::Graph {
    use kiln::ir::ops::array::{ArrayOp, IntsArg};
    use kiln::ir::ops::elementwise::{ElementwiseOp, UnaryKind};
    use kiln::ir::ops::linalg::LinalgOp;
    use kiln::ir::{DType, Fact, Graph, Node, Op, Shape, Tensor};
    let mut g = Graph {
        name: "dyn".into(),
        opset: 17,
        ..Default::default()
    };
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[2, 4])));
    let s = g.add_value("s", Fact::new(DType::I64, Shape::known(&[2])));
    g.inputs = vec![x, s];
    let wv: Vec<f32> = (0..12).map(|i| (i as f32 - 5.0) * 0.25).collect();
    let w = g.add_const("w", Tensor::from_vec(&[4, 3], wv));
    let f = || Fact::new(DType::F32, Shape::unknown(0));
    let (m, r, z, y) = (
        g.add_value("m", f()),
        g.add_value("r", f()),
        g.add_value("z", f()),
        g.add_value("y", f()),
    );
    let nz = g.add_value("nz", Fact::new(DType::I64, Shape::unknown(0)));
    let node = |name: &str, op: Op, inputs: Vec<usize>, out: usize| Node {
        name: name.into(),
        op,
        inputs: inputs.into_iter().map(Some).collect(),
        outputs: vec![out],
    };
    g.nodes = vec![
        node("mm", Op::Linalg(LinalgOp::MatMul), vec![x, w], m),
        node(
            "relu",
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)),
            vec![m],
            r,
        ),
        node(
            "sig",
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Sigmoid)),
            vec![m],
            z,
        ),
        node(
            "reshape",
            Op::Array(ArrayOp::Reshape {
                shape: IntsArg::Input(1),
                allowzero: false,
            }),
            vec![r, s],
            y,
        ),
        node("nonzero", Op::Array(ArrayOp::NonZero), vec![z], nz),
    ];
    g.outputs = vec![z, y, nz];
    g.infer().unwrap();
    g
}

/// Data-dependent output shapes go through the artifact path: compiled, saved, loaded, run
/// with two different shape inputs, each output equal to the reference interpreter's;
/// `run_into` and `output_shapes` refuse the dynamic outputs with a clear error.
#[test]
fn dynamic_tail_runs_with_run_time_shapes() {
    use kiln::ir::Tensor;
    use kiln::runtime::{BufRef, DimSpec};
    let g = dynamic_graph();
    let art = Compiler::new().compile(&g).unwrap();
    let report = art.report().unwrap();
    let tail = report.dynamic_tail.as_deref().unwrap();
    assert!(
        tail.contains("Reshape") && tail.contains("NonZero"),
        "{tail}"
    );
    assert!(report.kernels >= 1, "the prefix is compiled: {report}");
    assert!(report.to_string().contains("dynamic tail"), "{report}");
    let plan = &art.as_runtime().plan;
    // The tail reads `r` (computed by the prefix, placed after the arena) and output `z`.
    let t = plan.tail.as_ref().unwrap();
    assert!(
        t.inputs.iter().any(|b| matches!(b, BufRef::Arena { .. })),
        "{t:?}"
    );
    assert!(t.inputs.contains(&BufRef::Output { index: 0 }), "{t:?}");
    assert_eq!(t.outputs, vec![1, 2]);
    assert_eq!(plan.outputs[1].shape, vec![DimSpec::Dynamic; 2]);
    assert_eq!(
        plan.outputs[2].shape,
        vec![DimSpec::Fixed(2), DimSpec::Dynamic]
    );
    // Through the file format.
    let path = std::env::temp_dir().join(format!("kiln-dyn-{}.kiln", std::process::id()));
    art.save(&path).unwrap();
    let loaded = Artifact::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let session = Session::new(&loaded).unwrap();
    let x: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 0.5).collect();
    for shape in [[3i64, 2], [1, -1]] {
        let want = kiln::ir::interp::run(
            &g,
            &[
                Tensor::from_vec(&[2, 4], x.clone()),
                Tensor::from_vec(&[2], shape.to_vec()),
            ],
        )
        .unwrap();
        let ins = [
            TensorView::from_f32(&[2, 4], &x),
            TensorView::from_i64(&[2], &shape),
        ];
        let outs = session.run(&ins).unwrap();
        assert_eq!(outs.len(), 3);
        for (o, w) in outs.iter().zip(&want) {
            assert_eq!(o.shape, w.shape(), "shape {shape:?}");
            let got = kiln::ir::onnx::tensor_proto::from_raw(o.dtype, &o.shape, o.data.as_slice())
                .unwrap();
            got.check_close(w, 1e-5, 1e-6).unwrap();
        }
        // `run_into` and `output_shapes` cannot serve a data-dependent shape.
        let (mut a, mut b, mut c) = ([0f32; 6], [0f32; 6], [0i64; 12]);
        let e = session
            .run_into(
                &ins,
                &mut [
                    kiln::bytes_of_mut(&mut a),
                    kiln::bytes_of_mut(&mut b),
                    kiln::bytes_of_mut(&mut c),
                ],
            )
            .unwrap_err();
        assert!(matches!(e, Error::Run(_)), "{e}");
        assert!(
            e.to_string()
                .contains("output 1 'y' has a data-dependent shape; use run"),
            "{e}"
        );
        let e = session.output_shapes(&ins).unwrap_err();
        assert!(e.to_string().contains("data-dependent shape"), "{e}");
    }
    // A shape that does not fit the data is the interpreter's error, not a panic.
    let bad = [4i64, 4];
    let e = session
        .run(&[
            TensorView::from_f32(&[2, 4], &x),
            TensorView::from_i64(&[2], &bad),
        ])
        .unwrap_err();
    assert!(e.to_string().contains("dynamic tail"), "{e}");
    // Without reference kernels the tail is refused, naming it.
    let e = Compiler::new()
        .reference_kernels(false)
        .compile(&g)
        .unwrap_err();
    assert!(
        e.to_string().contains("dynamic tail") && e.to_string().contains("Reshape"),
        "{e}"
    );
}
