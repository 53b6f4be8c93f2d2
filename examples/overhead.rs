//! Per-call overhead of `Session::run` / `Session::run_into` on a tiny model (one Add of 16
//! floats, `tests/data/add16.onnx`), beside the runtime's own `Model::run_into`.
//!
//! `cargo run --release --example overhead [-- ITERS]`

use kiln::{Compiler, Session, TensorView};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iters: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/add16.onnx");
    let art = Compiler::new().compile(&model)?;
    let session = Session::new(&art)?;
    let a = [1.0f32; 16];
    let b = [2.0f32; 16];
    let shape = [16];
    let ins = [
        TensorView::from_f32(&shape, &a),
        TensorView::from_f32(&shape, &b),
    ];
    let mut y = [0f32; 16];
    // Best of 5 rounds, mean per call within a round.
    let time = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e9 / iters as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    let run = time(&mut || {
        std::hint::black_box(session.run(&ins).unwrap());
    });
    let run_into = time(&mut || {
        session
            .run_into(&ins, &mut [kiln::bytes_of_mut(&mut y)])
            .unwrap();
    });
    let mut model = kiln::runtime::Model::from_artifact(art.as_runtime().clone(), "add16")?;
    let raw = time(&mut || {
        model
            .run_into(&ins, &mut [kiln::bytes_of_mut(&mut y)])
            .unwrap();
    });
    assert_eq!(y, [3.0f32; 16]);
    println!("add16 per-call time, best of 5 x {iters} calls:");
    println!("  Session::run          {run:8.0} ns");
    println!("  Session::run_into     {run_into:8.0} ns");
    println!("  runtime Model::run_into {raw:6.0} ns (no session pool)");
    Ok(())
}
