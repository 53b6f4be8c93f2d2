//! tensat's evaluation graphs (built by `passes/examples/eqsat_bench.rs`) as the CPU
//! benchmarks of equality saturation use them (`examples/eqsat_speedup.rs`,
//! `benches/eqsat.rs`): weights made constants, one random input.

#![allow(dead_code)]

#[allow(dead_code, clippy::all)]
#[path = "../../passes/examples/eqsat_bench.rs"]
pub mod graphs;

use kiln::ir::{Graph, Tensor};
use rand::Rng;

/// A benchmark graph: its name, tensat's published GPU speed-up, its builder.
pub type Model = (&'static str, &'static str, fn() -> Graph);

/// tensat's graphs at their sizes, and a GPT-2-style decoder.
pub fn models() -> Vec<Model> {
    vec![
        ("squeezenet", "24.5%", graphs::squeezenet),
        ("vgg19", "8.9%", graphs::vgg19),
        ("resnext50", "8.8%", graphs::resnext50),
        ("nasrnn", "68.9%", || graphs::nasrnn(5, 512)),
        ("nasnet", "7.3%", || graphs::nasnet(6, 128, 28)),
        ("lstm", "-", || graphs::lstm(16, 512)),
        ("inception", "10.0%", graphs::inception_v3),
        ("bert", "9.2%", || {
            graphs::transformer("bert-base", 12, 128, 768, 12, false)
        }),
        ("gpt2", "-", || {
            graphs::transformer("gpt2-blocks", 12, 128, 768, 12, true)
        }),
    ]
}

/// Makes every graph input but the first a constant with random values (the weights).
pub fn weights_to_constants(g: &mut Graph, rng: &mut impl Rng) {
    g.infer().expect("the benchmark graphs infer");
    let weights: Vec<usize> = g.inputs[1..].to_vec();
    for v in weights {
        let shape = g.values[v].fact.shape.as_known().expect("static weights");
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05..0.05)).collect();
        g.set_const(v, Tensor::from_vec(&shape, data));
    }
    g.inputs.truncate(1);
}

/// The graph of `build` with its weights made constants by `weights`, its input shape and
/// a random input.
pub fn prepared(
    build: fn() -> Graph,
    weights: fn(&mut Graph, &mut rand::rngs::StdRng),
    rng: &mut rand::rngs::StdRng,
) -> (Graph, Vec<usize>, Vec<f32>) {
    let mut g = build();
    weights(&mut g, rng);
    let shape = g.values[g.inputs[0]].fact.shape.as_known().unwrap();
    let n: usize = shape.iter().product();
    let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    (g, shape, x)
}
