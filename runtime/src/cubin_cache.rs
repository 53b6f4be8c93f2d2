//! A disk cache of the cubins the CUDA driver JIT-compiles from an artifact's PTX.
//!
//! The first load of a GPU artifact on a machine JIT-compiles its PTX for the GPU present
//! (seconds for a large module); the result is written to the cache, keyed by a hash of the
//! PTX text, the device name, its compute capability and the driver version, and later
//! loads read the cubin back instead. The cache directory is `$KILN_CUBIN_CACHE`, else
//! `$XDG_CACHE_HOME/kiln/cubin`, else `~/.cache/kiln/cubin`; `KILN_CUBIN_CACHE=off`
//! disables it. Entries are written to a temporary file and renamed, so a reader never sees
//! half a cubin; an unreadable or empty entry is treated as a miss. Modules for an
//! arch-specific target (`sm_90a`: wgmma/TMA kernels) bypass it and are loaded by the driver
//! from PTX (measured on an H200: linked by `cuLink*` their wgmma kernels fault), relying on
//! the driver's own JIT cache (`CUDA_CACHE_PATH`), which made a second load take 1–2 ms.

use std::path::{Path, PathBuf};

/// The cache directory (see the module doc), or `None` when disabled or no home is known.
pub fn cache_dir() -> Option<PathBuf> {
    dir_from(
        std::env::var_os("KILN_CUBIN_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn dir_from(
    explicit: Option<std::ffi::OsString>,
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    if let Some(e) = explicit {
        if e.is_empty() || e == "off" || e == "0" {
            return None;
        }
        return Some(PathBuf::from(e));
    }
    if let Some(x) = xdg.filter(|x| !x.is_empty()) {
        return Some(Path::new(&x).join("kiln").join("cubin"));
    }
    home.filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".cache").join("kiln").join("cubin"))
}

/// 64-bit FNV-1a over several byte strings (each followed by a separator byte).
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The cache key of `ptx` JIT-compiled on a device (file name, without directory).
pub fn cache_key(ptx: &str, device: &str, arch: &str, driver_version: i32) -> String {
    let h = fnv64(&[
        ptx.as_bytes(),
        device.as_bytes(),
        arch.as_bytes(),
        &driver_version.to_le_bytes(),
    ]);
    format!("{arch}-{h:016x}-{}.cubin", ptx.len())
}

/// The cached cubin `key` in `dir`, if present and non-empty.
pub fn lookup(dir: &Path, key: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(key)).ok().filter(|b| !b.is_empty())
}

/// Writes `cubin` as entry `key` of `dir` (temporary file, then rename).
pub fn store(dir: &Path, key: &str, cubin: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, cubin)?;
    std::fs::rename(&tmp, dir.join(key)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Where a module came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Read from the cache.
    Cached,
    /// JIT-compiled now (and stored, if the cache is enabled and writable).
    Compiled,
    /// Loaded from PTX by the driver directly (the cache is disabled).
    Uncached,
}

/// Loads `ptx` into `ctx`, through the cache (see the module doc).
#[cfg(feature = "cuda")]
pub fn load(
    ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
    ptx: &str,
    device: &str,
    arch: &str,
) -> Result<(std::sync::Arc<cudarc::driver::CudaModule>, Source), cudarc::driver::DriverError> {
    use cudarc::nvrtc::Ptx;
    // Arch-specific (`sm_90a`) modules are loaded by the driver directly (its own JIT cache
    // still applies): linked through `cuLink*`, their wgmma kernels failed on an H200 with
    // a misaligned address, even with the matching `CU_JIT_TARGET`.
    let arch_specific = jit_target(ptx).is_some_and(|t| t >= 0x10000);
    let Some(dir) = cache_dir().filter(|_| !arch_specific) else {
        return Ok((ctx.load_module(Ptx::from_src(ptx))?, Source::Uncached));
    };
    let key = cache_key(ptx, device, arch, driver_version()?);
    if let Some(cubin) = lookup(&dir, &key) {
        // A stale or corrupt entry fails to load: compile afresh below.
        if let Ok(m) = ctx.load_module(Ptx::from_binary(cubin)) {
            return Ok((m, Source::Cached));
        }
    }
    ctx.bind_to_thread()?;
    let cubin = jit_cubin(ptx)?;
    let m = ctx.load_module(Ptx::from_binary(cubin.clone()))?;
    // The cache is an optimisation: a read-only or full disk only costs the next JIT.
    let _ = store(&dir, &key, &cubin);
    Ok((m, Source::Compiled))
}

/// The driver's version number (`12080` for 12.8).
#[cfg(feature = "cuda")]
fn driver_version() -> Result<i32, cudarc::driver::DriverError> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: a plain out-parameter call.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }.result()?;
    Ok(v)
}

/// The driver's `CUjit_target` value of the PTX's `.target` (`sm_90a` → the arch-specific
/// target `0x10000 + 90`, `sm_80` → 80), if it names one. Without it the linker compiles
/// for the context's plain `sm_XX`, and on an H200 the `wgmma` kernels of `sm_90a` modules
/// then failed with a misaligned address.
pub fn jit_target(ptx: &str) -> Option<u32> {
    let t = ptx
        .lines()
        .find_map(|l| l.trim().strip_prefix(".target "))?
        .split([',', ' '])
        .next()?
        .strip_prefix("sm_")?;
    let (digits, accel) = match t.strip_suffix('a') {
        Some(d) => (d, true),
        None => (t, false),
    };
    let cc: u32 = digits.parse().ok()?;
    Some(if accel { 0x10000 + cc } else { cc })
}

/// JIT-compiles `ptx` for the current context's device with the driver's linker (for the
/// PTX's own `.target`, see [`jit_target`]) and returns the cubin.
#[cfg(feature = "cuda")]
fn jit_cubin(ptx: &str) -> Result<Vec<u8>, cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    let src = std::ffi::CString::new(ptx)
        .map_err(|_| cudarc::driver::DriverError(sys::CUresult::CUDA_ERROR_INVALID_IMAGE))?;
    let name = c"kiln_model.ptx";
    let mut state: sys::CUlinkState = std::ptr::null_mut();
    // SAFETY: the link state is created, fed the NUL-terminated PTX (its size includes the
    // NUL, as the driver expects for PTX), completed, copied out and destroyed on every path.
    unsafe {
        sys::cuLinkCreate_v2(0, std::ptr::null_mut(), std::ptr::null_mut(), &mut state).result()?;
        let out = (|| {
            sys::cuLinkAddData_v2(
                state,
                sys::CUjitInputType::CU_JIT_INPUT_PTX,
                src.as_ptr() as *mut std::ffi::c_void,
                src.as_bytes_with_nul().len(),
                name.as_ptr(),
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .result()?;
            let mut cubin: *mut std::ffi::c_void = std::ptr::null_mut();
            let mut size = 0usize;
            sys::cuLinkComplete(state, &mut cubin, &mut size).result()?;
            Ok(std::slice::from_raw_parts(cubin as *const u8, size).to_vec())
        })();
        let _ = sys::cuLinkDestroy(state);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn jit_target_follows_the_ptx_target() {
        assert_eq!(
            jit_target(".version 8.0\n.target sm_90a\n"),
            Some(0x10000 + 90)
        );
        assert_eq!(jit_target(".target sm_80\n.address_size 64"), Some(80));
        assert_eq!(jit_target(".target sm_89, debug\n"), Some(89));
        assert_eq!(jit_target(".version 8.0\n"), None);
    }

    #[test]
    fn directory_choice() {
        let s = |x: &str| Some(OsString::from(x));
        assert_eq!(
            dir_from(s("/c"), s("/x"), s("/h")),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(dir_from(s("off"), s("/x"), s("/h")), None);
        assert_eq!(
            dir_from(None, s("/x"), s("/h")),
            Some(PathBuf::from("/x/kiln/cubin"))
        );
        assert_eq!(
            dir_from(None, s(""), s("/h")),
            Some(PathBuf::from("/h/.cache/kiln/cubin"))
        );
        assert_eq!(dir_from(None, None, None), None);
    }

    #[test]
    fn key_names_everything_that_changes_the_cubin() {
        let k = cache_key(".entry a", "NVIDIA H100", "sm_90", 12080);
        assert!(k.starts_with("sm_90-") && k.ends_with("-8.cubin"), "{k}");
        assert_eq!(k, cache_key(".entry a", "NVIDIA H100", "sm_90", 12080));
        for other in [
            cache_key(".entry b", "NVIDIA H100", "sm_90", 12080),
            cache_key(".entry a", "NVIDIA H200", "sm_90", 12080),
            cache_key(".entry a", "NVIDIA H100", "sm_89", 12080),
            cache_key(".entry a", "NVIDIA H100", "sm_90", 12090),
        ] {
            assert_ne!(k, other);
        }
    }

    #[test]
    fn store_then_lookup_and_misses() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("nested");
        assert_eq!(lookup(&d, "k.cubin"), None);
        store(&d, "k.cubin", b"\x7fELF-cubin").unwrap();
        assert_eq!(
            lookup(&d, "k.cubin").as_deref(),
            Some(&b"\x7fELF-cubin"[..])
        );
        // no temporary file is left behind
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("k.cubin")]);
        // an empty entry (e.g. a crash of an older writer) is a miss
        std::fs::write(d.join("e.cubin"), b"").unwrap();
        assert_eq!(lookup(&d, "e.cubin"), None);
    }
}
