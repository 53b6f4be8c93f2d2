//! MLIR → NVVM → PTX for one SKU.
//!
//! A kernel's `gpu.func` is wrapped in `module attributes {gpu.container_module} {
//! gpu.module @kiln_<name> { ... } }` and lowered with MLIR's own passes only:
//!
//! ```text
//! nvvm-attach-target{chip=sm_XX features=+ptxNN O=3}   // #nvvm.target on the gpu.module
//! gpu.module(convert-nvgpu-to-nvvm, convert-vector-to-scf, convert-scf-to-cf,
//!            expand-strided-metadata, lower-affine, convert-gpu-to-nvvm,
//!            convert-nvvm-to-llvm, canonicalize, cse)
//! reconcile-unrealized-casts
//! gpu-module-to-binary{format=isa}                     // NVPTX back end → gpu.binary
//! ```
//!
//! The PTX text is read out of the `#gpu.object` of the resulting `gpu.binary` op with
//! MLIR's C API (`mlirGPUObjectAttrGetObject`). Serialization to `isa` only needs LLVM's
//! NVPTX back end (part of the LLVM 22 libraries), not the CUDA toolkit.

use super::{GpuError, GpuKernel, Ptx, Sku};
use crate::{mlir, CodegenError};
use melior::ir::attribute::{ArrayAttribute, AttributeLike};
use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{parse_pass_pipeline, register_all_passes};
use std::path::{Path, PathBuf};

/// The PTX ISA version requested from the NVPTX back end (`+ptx80`: PTX 8.0, CUDA 12.0, the
/// first to cover `sm_90`; every SKU of the database accepts it and `ptxas` ≥ 12.0 reads it).
pub const PTX_FEATURES: &str = "+ptx80";

/// The textual pass pipeline lowering a `gpu.container_module` to a `gpu.binary` holding
/// PTX for `arch` (`sm_90`), linking `libdevice` (needed by `math` ops) when given.
pub fn pass_pipeline(arch: &str, libdevice: Option<&Path>) -> String {
    let link = libdevice.map_or(String::new(), |p| format!(" l={}", p.display()));
    format!(
        "builtin.module(nvvm-attach-target{{chip={arch} features={PTX_FEATURES} O=3{link}}}, \
         gpu.module(convert-nvgpu-to-nvvm, convert-vector-to-scf, convert-scf-to-cf, \
         expand-strided-metadata, lower-affine, convert-gpu-to-nvvm, convert-nvvm-to-llvm, \
         canonicalize, cse), reconcile-unrealized-casts, gpu-module-to-binary{{format=isa}})"
    )
}

/// The MLIR module text of a kernel: its `gpu.func` in a `gpu.module` in a container module.
pub fn module_text(kernel: &GpuKernel) -> String {
    format!(
        "module attributes {{gpu.container_module}} {{\ngpu.module @kiln_{} {{\n{}}}\n}}\n",
        kernel.name, kernel.mlir
    )
}

/// Compiles one kernel to PTX for `sku`: checks that the SKU can run it
/// ([`GpuKernel::check_fits`]), lowers it with [`pass_pipeline`] and extracts the PTX.
pub fn compile_kernel(kernel: &GpuKernel, sku: &Sku) -> Result<Ptx, GpuError> {
    kernel.check_fits(sku)?;
    let chip = kernel.chip(sku);
    let text = mlir_to_ptx(&module_text(kernel), &chip)?;
    if !text.contains(&format!(".entry {}(", kernel.name)) {
        return Err(CodegenError::Translate(format!(
            "PTX for '{}' has no .entry of that name",
            kernel.name
        ))
        .into());
    }
    Ok(Ptx {
        text,
        entry: kernel.name.clone(),
        arch: chip,
    })
}

/// Finds NVIDIA's `libdevice.10.bc` (the bitcode `__nv_*` math library that
/// `convert-gpu-to-nvvm` lowers `math` ops to): `$KILN_LIBDEVICE`, then
/// `$CUDA_HOME`/`$CUDA_PATH`/`/usr/local/cuda` `nvvm/libdevice/`, then the repository's
/// `.venv/lib/python3*/site-packages/nvidia/*/nvvm/libdevice/` (pip `nvidia-cuda-nvcc`).
pub fn find_libdevice() -> Option<PathBuf> {
    const FILE: &str = "nvvm/libdevice/libdevice.10.bc";
    if let Some(p) = std::env::var_os("KILN_LIBDEVICE").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let homes = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .chain([PathBuf::from("/usr/local/cuda")]);
    if let Some(p) = homes.map(|h| h.join(FILE)).find(|p| p.is_file()) {
        return Some(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    venv_nvidia_dirs(repo)
        .into_iter()
        .map(|d| d.join(FILE))
        .find(|p| p.is_file())
}

/// `<repo>/.venv/lib/python3*/site-packages/nvidia/*`, sorted.
pub fn venv_nvidia_dirs(repo: &Path) -> Vec<PathBuf> {
    let list = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut out = Vec::new();
    for py in list(&repo.join(".venv/lib")) {
        let is_py = py
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("python3"));
        if is_py {
            out.extend(list(&py.join("site-packages/nvidia")));
        }
    }
    out
}

/// Lowers a `gpu.container_module` holding exactly one `gpu.module` to PTX text for `arch`.
/// Modules using `math` ops are linked with libdevice ([`find_libdevice`]); without it they
/// fail with an error saying so.
pub fn mlir_to_ptx(module_text: &str, arch: &str) -> Result<String, CodegenError> {
    let libdevice = if module_text.contains("math.") {
        Some(find_libdevice().ok_or_else(|| {
            CodegenError::Translate(
                "the kernel uses math ops, which need libdevice.10.bc; none found \
                 (set KILN_LIBDEVICE or CUDA_HOME, or run scripts/setup.sh)"
                    .into(),
            )
        })?)
    } else {
        None
    };
    let pipeline = pass_pipeline(arch, libdevice.as_deref());
    register_all_passes();
    let ctx = mlir::context();
    let mut module = Module::parse(&ctx, module_text).ok_or_else(|| CodegenError::MlirParse {
        what: "GPU kernel module".into(),
    })?;
    let fail = |msg: String| CodegenError::MlirPass {
        pipeline: pipeline.clone(),
        msg,
    };
    let pm = PassManager::new(&ctx);
    parse_pass_pipeline(pm.as_operation_pass_manager(), &pipeline)
        .map_err(|e| fail(e.to_string()))?;
    pm.run(&mut module).map_err(|e| fail(e.to_string()))?;

    let no_ptx =
        |why: &str| CodegenError::Translate(format!("no PTX in the lowered module: {why}"));
    let mut op = module.body().first_operation();
    let mut binaries = Vec::new();
    while let Some(o) = op {
        if o.name().as_string_ref().as_str() == Ok("gpu.binary") {
            binaries.push(o);
        }
        op = o.next_in_block();
    }
    let [binary] = binaries[..] else {
        return Err(no_ptx(&format!(
            "expected one gpu.binary, found {}",
            binaries.len()
        )));
    };
    let objects = binary
        .attribute("objects")
        .map_err(|e| no_ptx(&e.to_string()))?;
    let objects = ArrayAttribute::try_from(objects).map_err(|e| no_ptx(&e.to_string()))?;
    if objects.len() != 1 {
        return Err(no_ptx(&format!(
            "expected one #gpu.object, found {}",
            objects.len()
        )));
    }
    let object = objects.element(0).map_err(|e| no_ptx(&e.to_string()))?;
    // SAFETY: `object` is an element of the `objects` array of a `gpu.binary`, which the
    // verifier guarantees to be a `#gpu.object` attribute; the returned string reference
    // points into the attribute's storage, owned by `ctx`, and is copied before `ctx` drops.
    let bytes = unsafe {
        let s = mlir_sys::mlirGPUObjectAttrGetObject(object.to_raw());
        if s.data.is_null() {
            return Err(no_ptx("empty #gpu.object"));
        }
        std::slice::from_raw_parts(s.data as *const u8, s.length).to_vec()
    };
    let text = String::from_utf8(bytes).map_err(|_| no_ptx("object is not UTF-8 text"))?;
    if !text.contains(".target") {
        return Err(no_ptx("object is not PTX assembly"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_kernel_lowers_to_ptx() {
        let src = r#"
module attributes {gpu.container_module} {
  gpu.module @m {
    gpu.func @k(%x: memref<?xf32>) kernel {
      %i = gpu.thread_id x
      %v = memref.load %x[%i] : memref<?xf32>
      %w = arith.addf %v, %v : f32
      memref.store %w, %x[%i] : memref<?xf32>
      gpu.return
    }
  }
}"#;
        let ptx = mlir_to_ptx(src, "sm_86").unwrap();
        assert!(
            ptx.contains(".target sm_86") && ptx.contains(".entry k("),
            "{ptx}"
        );
        assert!(ptx.contains(".version 8.0"), "{ptx}");
    }

    #[test]
    fn every_kernel_compiles_for_every_sku() {
        let db = crate::gpu::DeviceDb::builtin().unwrap();
        for k in crate::gpu::kernels::all_default().unwrap() {
            for sku in db.skus() {
                let ptx = compile_kernel(&k, sku)
                    .unwrap_or_else(|e| panic!("{} {}: {e}", k.name, sku.name));
                assert!(ptx.text.contains(&format!(".target {}", sku.arch)));
                // No libdevice calls left unresolved.
                assert!(!ptx.text.contains(".extern .func"), "{}", ptx.text);
            }
        }
    }

    #[test]
    fn errors_are_reported_not_panics() {
        assert!(mlir_to_ptx("gpu.module @m {", "sm_90").is_err());
        // No gpu.module: no gpu.binary.
        let e = mlir_to_ptx("module {}", "sm_90").unwrap_err().to_string();
        assert!(e.contains("gpu.binary"), "{e}");
        // Not MLIR the GPU lowering accepts (host code inside the gpu.module).
        let src = "module attributes {gpu.container_module} { gpu.module @m { \
                   func.func @f(%a: tensor<4xf32>) { return } } }";
        assert!(mlir_to_ptx(src, "sm_90").is_err());
    }
}
