//! Shared helpers of the integration tests: zoo models specialised to their test data shapes,
//! random inputs, and an output comparison scaled to the output's magnitude.
#![allow(dead_code)]

pub mod one_node;

use kiln_ir::onnx::{load, load_tensor_pb};
use kiln_ir::{DType, Graph, Tensor};
use kiln_passes::specialize::specialize_inputs;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// The zoo models, by folder name.
pub const ZOO: [&str; 5] = ["bert", "gpt", "mlp", "mobilenet", "resnet"];

/// `<repo>/tests/zoo/<name>`.
pub fn zoo_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("zoo")
        .join(name)
}

/// Loads a zoo model, specialises its inputs to the shapes of `test_data_set_0`, and returns
/// it with inputs: the test data for integer inputs (token ids, masks), seeded random values
/// in [-1, 1) for float inputs.
pub fn load_zoo(name: &str, seed: u64) -> (Graph, Vec<Tensor>) {
    let dir = zoo_dir(name);
    let mut g = load(dir.join("model.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut inputs = Vec::new();
    loop {
        let p = dir
            .join("test_data_set_0")
            .join(format!("input_{}.pb", inputs.len()));
        if !p.exists() {
            break;
        }
        inputs.push(load_tensor_pb(&p).unwrap().1);
    }
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
    specialize_inputs(&mut g, &shapes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let inputs = inputs
        .into_iter()
        .map(|t| {
            if t.dtype().is_float() {
                let v: Vec<f64> = (0..t.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
                Tensor::from_vec(t.shape(), v).cast(t.dtype())
            } else {
                t
            }
        })
        .collect();
    (g, inputs)
}

/// `max|a - e| <= rel * max(1, max|e|)`, same dtype and shape.
pub fn assert_close(what: &str, actual: &[Tensor], expected: &[Tensor], rel: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: output count");
    for (k, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.dtype(), e.dtype(), "{what}: output {k} dtype");
        assert_eq!(a.shape(), e.shape(), "{what}: output {k} shape");
        let (av, ev) = (a.to_f64_vec(), e.to_f64_vec());
        let scale = ev.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let err = av
            .iter()
            .zip(&ev)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f64, f64::max);
        assert!(
            err <= rel * scale,
            "{what}: output {k}: max abs error {err:.3e} > {:.3e}",
            rel * scale
        );
    }
}

/// A random f32 tensor of the given shape.
pub fn random_f32(shape: &[usize], rng: &mut impl Rng) -> Tensor {
    let v: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_vec(shape, v).cast(DType::F32)
}
