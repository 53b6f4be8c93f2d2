//! `ptxas` helpers for the PTX validation tests (`gpu_ptx.rs`, `gpu_ops_ptx.rs`): finding
//! `ptxas`, assembling PTX with `-v`, parsing the resource usage it reports and checking it
//! against a SKU's limits, and keeping the CUDA runtime test's PTX fixtures current.
//!
//! `ptxas` is found at `$KILN_PTXAS`, else `.venv/lib/python3*/site-packages/nvidia/*/bin/ptxas`
//! in the repository, else on `PATH`.

#![allow(dead_code)]

use kiln_codegen::gpu::pipeline::venv_nvidia_dirs;
use kiln_codegen::gpu::{GpuKernel, Sku};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `ptxas`, if one is available.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PTXAS") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = venv_nvidia_dirs(&repo())
        .into_iter()
        .map(|d| d.join("bin/ptxas"))
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    let ok = Command::new("ptxas")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| PathBuf::from("ptxas"))
}

/// What `ptxas -v` says about one entry.
#[derive(Debug, Default)]
pub struct Usage {
    pub registers: u32,
    pub smem: u32,
    pub spill_bytes: u32,
    pub stack: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Parses the `ptxas -v` report of `entry`.
pub fn parse_ptxas_v(out: &str, entry: &str) -> Option<Usage> {
    let mut u = Usage::default();
    let mut seen = false;
    let mut inside = false;
    for line in out.lines() {
        if line.contains("Compiling entry function") || line.contains("Function properties for") {
            inside = line.contains(&format!("'{entry}'")) || line.ends_with(&format!(" {entry}"));
        }
        if !inside {
            continue;
        }
        if line.contains("bytes stack frame") {
            u.stack = number_before(line, "bytes stack frame")?;
            u.spill_bytes = number_before(line, "bytes spill stores")?
                + number_before(line, "bytes spill loads")?;
        }
        if line.contains("Used ") && line.contains(" registers") {
            u.registers = number_before(line, "registers")?;
            u.smem = number_before(line, "bytes smem").unwrap_or(0);
            seen = true;
        }
    }
    seen.then_some(u)
}

/// Assembles `ptx` for `arch` with `ptxas -v` (files in `dir`) and parses the usage of
/// `entry`; the error holds ptxas' output.
pub fn assemble(
    ptxas: &Path,
    dir: &Path,
    ptx: &str,
    arch: &str,
    entry: &str,
) -> Result<Usage, String> {
    let file = dir.join(format!("{entry}_{arch}.ptx"));
    std::fs::write(&file, ptx).map_err(|e| e.to_string())?;
    let out = Command::new(ptxas)
        .args(["-v", &format!("-arch={arch}"), "-o"])
        .arg(dir.join("out.cubin"))
        .arg(&file)
        .output()
        .map_err(|e| format!("run ptxas: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("ptxas failed on {entry} for {arch}:\n{text}"));
    }
    parse_ptxas_v(&text, entry).ok_or_else(|| format!("cannot parse ptxas -v:\n{text}"))
}

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
