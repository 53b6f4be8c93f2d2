//! Kiln: a deep learning compiler for ONNX models. This crate is the public library API and
//! the `kiln` command line (which uses only this API).
//!
//! ```no_run
//! let graph = kiln::load_model("model.onnx")?;
//! let inputs = kiln::random_inputs(&graph, 0)?;
//! let outputs = kiln::ir::interp::run(&graph, &inputs)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod bench;
pub mod compile;
pub mod inspect;
pub mod io;
pub mod pipeline;

pub use kiln_ir as ir;
pub use kiln_passes as passes;
pub use kiln_runtime as runtime;

use anyhow::Result;
use kiln_ir::{DType, Dim, Graph, Tensor};
use rand::{Rng, SeedableRng};

/// Loads an ONNX model: import, shape inference, verification, then the IR clean-ups
/// (constant folding of shape sub-graphs, dead-code removal).
pub fn load_model(path: impl AsRef<std::path::Path>) -> Result<Graph> {
    let mut g = kiln_ir::onnx::load(path)?;
    kiln_ir::simplify::simplify(&mut g);
    kiln_ir::verify::verify(&g)?;
    Ok(g)
}

/// Random inputs for every graph input (seeded): floats uniform in [-1, 1), integers in
/// [0, 8), random bools. Symbolic dims are taken as 1.
pub fn random_inputs(g: &Graph, seed: u64) -> Result<Vec<Tensor>> {
    let specs = g.inputs.iter().map(|&id| {
        let f = &g.values[id].fact;
        let shape: Vec<usize> = f
            .shape
            .dims()
            .iter()
            .map(|d| match d {
                Dim::Known(n) => *n,
                Dim::Sym(_) => 1,
            })
            .collect();
        (f.dtype, shape)
    });
    Ok(random_tensors(specs, seed))
}

/// Random tensors of the given dtypes and shapes (seeded), drawn like [`random_inputs`]:
/// floats uniform in [-1, 1), integers in [0, 8), random bools.
pub fn random_tensors(
    specs: impl IntoIterator<Item = (DType, Vec<usize>)>,
    seed: u64,
) -> Vec<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    specs
        .into_iter()
        .map(|(dtype, shape)| {
            let n: usize = shape.iter().product();
            if dtype.is_float() {
                let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                Tensor::from_vec(&shape, v).cast(dtype)
            } else if dtype == DType::Bool {
                Tensor::from_vec(&shape, (0..n).map(|_| rng.random_bool(0.5)).collect())
            } else {
                let v: Vec<i64> = (0..n).map(|_| rng.random_range(0..8)).collect();
                Tensor::from_vec(&shape, v).cast(dtype)
            }
        })
        .collect()
}

/// The default thread count of `kiln run`: every core the OS gives this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
