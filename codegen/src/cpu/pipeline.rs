//! MLIR → LLVM dialect → LLVM IR → object code.

use super::Kernel;
use crate::{llvm, mlir, CodegenError};
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{parse_pass_pipeline, register_all_passes};

extern "C" {
    fn free(p: *mut std::ffi::c_void);
}

/// Parses `text`, runs `pipeline` (which must end in the LLVM dialect) and translates the
/// result to LLVM IR text with MLIR's C API (`mlirTranslateModuleToLLVMIRToString`).
pub fn mlir_to_llvm_ir(text: &str, pipeline: &str) -> Result<String, CodegenError> {
    register_all_passes();
    let ctx = mlir::context();
    let mut module = Module::parse(&ctx, text).ok_or_else(|| CodegenError::MlirParse {
        what: "kernel module".into(),
    })?;
    let fail = |msg: String| CodegenError::MlirPass {
        pipeline: pipeline.to_string(),
        msg,
    };
    let pm = PassManager::new(&ctx);
    parse_pass_pipeline(pm.as_operation_pass_manager(), pipeline)
        .map_err(|e| fail(e.to_string()))?;
    pm.run(&mut module).map_err(|e| fail(e.to_string()))?;
    // SAFETY: the module is a valid, verified operation; the returned C string is malloc'd
    // by MLIR and owned by us.
    unsafe {
        let raw = mlir_sys::mlirTranslateModuleToLLVMIRToString(module.as_operation().to_raw());
        if raw.is_null() {
            return Err(CodegenError::Translate(
                "mlirTranslateModuleToLLVMIR failed (ops outside the LLVM dialect?)".into(),
            ));
        }
        let s = std::ffi::CStr::from_ptr(raw).to_string_lossy().into_owned();
        free(raw.cast());
        Ok(s)
    }
}

/// The full MLIR module text of a kernel.
pub fn module_text(kernel: &Kernel) -> String {
    format!("module {{\n{}}}\n", kernel.mlir)
}

/// Lowers one kernel to LLVM IR text.
pub fn kernel_llvm_ir(kernel: &Kernel) -> Result<String, CodegenError> {
    mlir_to_llvm_ir(&module_text(kernel), &kernel.pipeline)
}

/// Lowers one kernel to an O3-optimised ELF object for `cpu`.
pub fn kernel_object(kernel: &Kernel, cpu: &str) -> Result<Vec<u8>, CodegenError> {
    llvm::emit_object(&kernel_llvm_ir(kernel)?, cpu)
}
