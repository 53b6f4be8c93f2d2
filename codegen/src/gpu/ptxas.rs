//! Assembling PTX with `ptxas -v` and checking the resources it reports against a SKU
//! (what the PTX tests do, for the autotuner: a candidate whose registers or shared memory
//! exceed the SKU's limits, or that spills, is recorded invalid before it is measured).
//!
//! `ptxas` is found at `$KILN_PTXAS`, else in the repository's `.venv`
//! (`site-packages/nvidia/*/bin/ptxas`), else on `PATH`.

use super::pipeline::venv_nvidia_dirs;
use super::{GpuKernel, Sku};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `ptxas`, if one is available.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    if let Some(p) = venv_nvidia_dirs(repo)
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

/// What `ptxas -v` reports for one entry.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory in bytes.
    pub smem: u32,
    /// Spill stores + loads in bytes.
    pub spill_bytes: u32,
    /// Stack frame in bytes.
    pub stack: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Parses the `ptxas -v` report of `entry`.
pub fn parse_usage(out: &str, entry: &str) -> Option<Usage> {
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

/// Assembles `ptx` for `arch` (`sm_90a`, ...) with `ptxas -v` in `dir` and returns the usage
/// of `entry`; the error holds ptxas' output.
pub fn assemble(
    ptxas: &Path,
    dir: &Path,
    ptx: &str,
    arch: &str,
    entry: &str,
) -> Result<Usage, String> {
    let file = dir.join(format!("{entry}_{arch}.ptx"));
    let cubin = dir.join(format!("{entry}_{arch}.cubin"));
    std::fs::write(&file, ptx).map_err(|e| format!("{}: {e}", file.display()))?;
    let out = Command::new(ptxas)
        .args(["-v", &format!("-arch={arch}"), "-o"])
        .arg(&cubin)
        .arg(&file)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let _ = std::fs::remove_file(&cubin);
    let _ = std::fs::remove_file(&file);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "ptxas failed on {entry} for {arch}: {}",
            text.trim()
        ));
    }
    parse_usage(&text, entry).ok_or_else(|| format!("cannot parse ptxas -v: {}", text.trim()))
}

/// Whether `u` (of kernel `k`, launched with `dynamic_shared` bytes) fits `sku`: registers
/// per thread and per block, static + dynamic shared memory (opt-in limit), no spills.
pub fn check_limits(
    u: &Usage,
    k: &GpuKernel,
    dynamic_shared: u32,
    sku: &Sku,
) -> Result<(), String> {
    let t = k.threads();
    if u.registers > sku.max_registers_per_thread || u.registers * t > sku.registers_per_block {
        return Err(format!(
            "{} registers per thread × {t} threads exceed {}'s limits ({} per thread, {} per block)",
            u.registers, sku.name, sku.max_registers_per_thread, sku.registers_per_block
        ));
    }
    if u.smem > sku.shared_mem_per_block || u.smem + dynamic_shared > sku.shared_mem_per_block_optin
    {
        return Err(format!(
            "{} B static + {dynamic_shared} B dynamic shared memory exceed {}'s limits",
            u.smem, sku.name
        ));
    }
    if u.spill_bytes > 0 || u.stack > 0 {
        return Err(format!(
            "spills ({} B spill traffic, {} B stack)",
            u.spill_bytes, u.stack
        ));
    }
    Ok(())
}
