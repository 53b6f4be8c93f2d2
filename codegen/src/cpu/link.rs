//! Linking object files into a shared library with the system C compiler driver.
//!
//! Kiln links with `cc -shared` (the platform's own linker through its usual driver) rather
//! than LLVM's `lld`: it is present wherever a C toolchain is, it knows the platform's libc
//! and default flags, and the runtime machine needs neither (it only `dlopen`s the result).
//! Kernels may call `malloc`/`free` (packing buffers); those resolve against the loading
//! process's libc.

use crate::CodegenError;
use std::process::Command;

/// Links ELF `objects` into a shared library and returns its bytes.
pub fn shared_library(objects: &[Vec<u8>], linker: &str) -> Result<Vec<u8>, CodegenError> {
    let err = |m: String| CodegenError::Link(m);
    let dir = tempfile::tempdir().map_err(|e| err(format!("temp dir: {e}")))?;
    let mut cmd = Command::new(linker);
    cmd.arg("-shared")
        .arg("-o")
        .arg(dir.path().join("kernels.so"));
    for (i, obj) in objects.iter().enumerate() {
        let path = dir.path().join(format!("k{i}.o"));
        std::fs::write(&path, obj).map_err(|e| err(format!("writing {}: {e}", path.display())))?;
        cmd.arg(path);
    }
    cmd.arg("-lm");
    let out = cmd
        .output()
        .map_err(|e| err(format!("cannot run '{linker}': {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "'{linker}' failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    std::fs::read(dir.path().join("kernels.so")).map_err(|e| err(format!("reading library: {e}")))
}
