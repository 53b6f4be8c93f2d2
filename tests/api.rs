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
