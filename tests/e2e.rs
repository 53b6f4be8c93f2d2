//! Kiln's end-to-end tests, one module per file, in ONE test binary: every test binary links
//! LLVM and MLIR statically (about 300 MB each), so one binary instead of a dozen keeps the
//! build small and fast. `no_alloc` (its own global allocator) and `gpu_cubin_cache` (sets
//! an environment variable) stay separate binaries. Run one file's tests with e.g.
//! `cargo test --release -p kiln --test e2e parallel_plan::`.

mod common;
/// One-node graphs, shared with `kiln-passes`' tests.
#[path = "../passes/tests/common/one_node.rs"]
mod one_node;
/// Random graph builders shared with `kiln-passes`' e-graph tests.
#[path = "../passes/tests/common/random_graphs.rs"]
mod random_graphs;

mod api;
mod attention;
mod bench;
mod cli;
mod compile;
mod conformance_artifact;
mod eqsat_random;
mod gpu_cluster;
mod gpu_compile;
mod gpu_run;
mod gpu_tune;
mod mpi;
mod parallel_plan;
mod recurrent;
mod tune;
