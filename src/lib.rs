//! Kiln: a deep learning compiler for ONNX models. This crate is the public library API and
//! the `kiln` command line (which uses only this API).
//!
//! The stable API is [`Compiler`] (ONNX file, bytes or graph → [`Artifact`]), [`Artifact`]
//! (save / load the `MODEL.kiln` file) and [`Session`] (runs an artifact, from any number of
//! threads at once), with one error type, [`Error`]; see [`api`] for a complete example.
//! The modules below it ([`pipeline`], [`compile`], the re-exported crates) are the
//! lower-level building blocks.
//!
//! ```no_run
//! let artifact = kiln::Compiler::new().compile("model.onnx")?;
//! let session = kiln::Session::new(&artifact)?;
//! let x = vec![0f32; 64];
//! let outputs = session.run(&[kiln::TensorView::from_f32(&[2, 32], &x)])?;
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! The reference interpreter:
//!
//! ```no_run
//! let graph = kiln::load_model("model.onnx")?;
//! let inputs = kiln::random_inputs(&graph, 0)?;
//! let outputs = kiln::ir::interp::run(&graph, &inputs)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod api;
pub mod bench;
pub mod cluster;
pub mod compile;
pub mod dynamic_tail;
pub mod gpu_compile;
pub mod gpu_tune;
pub mod inspect;
pub mod io;
pub mod parallel_plan;
pub mod pipeline;
pub mod tune;

pub use api::{
    bytes_of, bytes_of_mut, Artifact, Compiler, DType, Error, ModelSource, Pod, Session, Tensor,
    TensorView,
};
pub use kiln_ir as ir;
pub use kiln_passes as passes;
pub use kiln_runtime as runtime;

use anyhow::Result;
use kiln_ir::{Dim, Graph};
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
pub fn random_inputs(g: &Graph, seed: u64) -> Result<Vec<kiln_ir::Tensor>> {
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
    specs: impl IntoIterator<Item = (kiln_ir::DType, Vec<usize>)>,
    seed: u64,
) -> Vec<kiln_ir::Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    specs
        .into_iter()
        .map(|(dtype, shape)| {
            let n: usize = shape.iter().product();
            if dtype.is_float() {
                let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                kiln_ir::Tensor::from_vec(&shape, v).cast(dtype)
            } else if dtype == kiln_ir::DType::Bool {
                kiln_ir::Tensor::from_vec(&shape, (0..n).map(|_| rng.random_bool(0.5)).collect())
            } else {
                let v: Vec<i64> = (0..n).map(|_| rng.random_range(0..8)).collect();
                kiln_ir::Tensor::from_vec(&shape, v).cast(dtype)
            }
        })
        .collect()
}

/// The default thread count of `kiln run`: every core the OS gives this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
