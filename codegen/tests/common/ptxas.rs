//! `ptxas` helpers for the PTX validation tests (`gpu_ptx.rs`, `gpu_ops_ptx.rs`): finding
//! `ptxas`, assembling PTX with `-v`, parsing the resource usage it reports and checking it
//! against a SKU's limits, and keeping the CUDA runtime test's PTX fixtures current.
//!
//! `ptxas` is found at `$KILN_PTXAS`, else `.venv/lib/python3*/site-packages/nvidia/*/bin/ptxas`
//! in the repository, else on `PATH`.

#![allow(dead_code, unused_imports)]

use kiln_codegen::gpu::{GpuKernel, Sku};
use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub use kiln_codegen::gpu::ptxas::{assemble, find_ptxas, parse_usage as parse_ptxas_v, Usage};

/// Asserts that `u` (for kernel `k`) fits `sku`: registers per thread and per block, the
/// declared static shared memory, no spills.
pub fn check_limits(u: &Usage, k: &GpuKernel, sku: &Sku) {
    let ctx = format!("{} on {}: {u:?}", k.name, sku.name);
    assert!(
        u.registers > 0 && u.registers <= sku.max_registers_per_thread,
        "{ctx}"
    );
    assert!(
        u.registers * k.threads() <= sku.registers_per_block,
        "{ctx}: registers per block"
    );
    assert!(
        u.smem <= sku.shared_mem_per_block,
        "{ctx}: shared memory per block"
    );
    assert_eq!(
        u.smem, k.shared_bytes,
        "{ctx}: declared static shared memory"
    );
    assert_eq!((u.spill_bytes, u.stack), (0, 0), "{ctx}: spills");
}

/// Compares the fixture `runtime/tests/ptx/{name}` with `text`, or rewrites it when
/// `KILN_UPDATE_PTX` is set.
pub fn check_fixture(name: &str, text: &str) {
    let dir = repo().join("runtime/tests/ptx");
    let path = dir.join(name);
    if std::env::var_os("KILN_UPDATE_PTX").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        old == text,
        "{} is stale: rerun with KILN_UPDATE_PTX=1",
        path.display()
    );
}
