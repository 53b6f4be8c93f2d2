//! MLIR → LLVM dialect → LLVM IR → object code.

use super::Kernel;
use crate::{llvm, mlir, CodegenError};
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{parse_pass_pipeline, register_all_passes};

/// Parses `text`, runs `pipeline` (which must end in the LLVM dialect) and translates the
/// result into an LLVM module in `llvm_ctx` with MLIR's C API (`mlirTranslateModuleToLLVMIR`).
///
/// MLIR and LLVM are linked into one image (both `mlir-sys` and `llvm-sys` link the same
/// LLVM 22 libraries), so the module can be handed to `inkwell` directly, with no text round
/// trip.
pub fn mlir_to_llvm_module<'l>(
    text: &str,
    pipeline: &str,
    llvm_ctx: &'l inkwell::context::Context,
) -> Result<inkwell::module::Module<'l>, CodegenError> {
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
    // SAFETY: the module is a valid, verified operation and the LLVM context outlives the
    // returned module (lifetime 'l); the translation returns null on failure, otherwise a
    // module owned by the caller, which inkwell's `Module` takes over (and disposes).
    unsafe {
        let raw = mlir_sys::mlirTranslateModuleToLLVMIR(
            module.as_operation().to_raw(),
            llvm_ctx.raw() as mlir_sys::LLVMContextRef,
        );
        if raw.is_null() {
            return Err(CodegenError::Translate(
                "mlirTranslateModuleToLLVMIR failed (ops left outside the LLVM dialect?)".into(),
            ));
        }
        Ok(inkwell::module::Module::new(raw as _))
    }
}

/// Like [`mlir_to_llvm_module`], returning LLVM IR text (for inspection and tests).
pub fn mlir_to_llvm_ir(text: &str, pipeline: &str) -> Result<String, CodegenError> {
    let llvm_ctx = inkwell::context::Context::create();
    let m = mlir_to_llvm_module(text, pipeline, &llvm_ctx)?;
    Ok(m.print_to_string().to_string())
}

/// The full MLIR module text of a kernel.
pub fn module_text(kernel: &Kernel) -> String {
    format!("module {{\n{}}}\n", kernel.mlir)
}

/// Lowers one kernel to LLVM IR text (before LLVM's optimisation).
pub fn kernel_llvm_ir(kernel: &Kernel) -> Result<String, CodegenError> {
    mlir_to_llvm_ir(&module_text(kernel), &kernel.pipeline)
}

/// Lowers one kernel to LLVM IR text after LLVM's O3 pipeline for `cpu` (to check what the
/// vectoriser did: look for `<8 x float>` with `x86-64-v3`).
pub fn kernel_optimized_llvm_ir(kernel: &Kernel, cpu: &str) -> Result<String, CodegenError> {
    let llvm_ctx = inkwell::context::Context::create();
    let m = mlir_to_llvm_module(&module_text(kernel), &kernel.pipeline, &llvm_ctx)?;
    llvm::optimize(&m, cpu)?;
    Ok(m.print_to_string().to_string())
}

/// Lowers one kernel to an O3-optimised ELF object for `cpu`.
pub fn kernel_object(kernel: &Kernel, cpu: &str) -> Result<Vec<u8>, CodegenError> {
    let llvm_ctx = inkwell::context::Context::create();
    let m = mlir_to_llvm_module(&module_text(kernel), &kernel.pipeline, &llvm_ctx)?;
    llvm::optimize_and_emit(&m, cpu)
}

#[cfg(test)]
mod tests {
    use crate::cpu::elementwise::mul_add_relu;
    use crate::cpu::matmul::{matmul, Epilogue, MatmulSchedule};

    #[test]
    fn matmul_llvm_ir_uses_fma_and_the_uniform_abi() {
        let k = matmul("mm", &MatmulSchedule::default(), Epilogue::BiasRelu);
        let ir = super::kernel_llvm_ir(&k).unwrap();
        assert!(
            ir.contains("define void @mm(ptr %0, ptr %1, ptr %2)"),
            "{ir}"
        );
        // The packed panels live in the caller's scratch memory (the third argument).
        assert!(!ir.contains("@malloc") && !ir.contains("@free"), "{ir}");
        assert!(k.signature.scratch_bytes > 0);
        // `vector.fma` lowers to `llvm.fmuladd`, which the x86 back end emits as `vfmadd`.
        assert!(ir.contains("@llvm.fmuladd.v8f32"), "{ir}");
    }

    #[test]
    fn elementwise_llvm_ir_allows_contraction() {
        let ir = super::kernel_llvm_ir(&mul_add_relu("ew")).unwrap();
        assert!(
            ir.contains("define void @ew(ptr %0, ptr %1, ptr %2)"),
            "{ir}"
        );
        assert!(ir.contains("fmul contract"), "{ir}");
    }

    #[test]
    fn bad_mlir_is_an_error() {
        assert!(super::mlir_to_llvm_ir("func.func @f(", "builtin.module()").is_err());
        // Not lowered to the LLVM dialect: translation must fail, not crash.
        let src = "func.func @f(%a: memref<?xf32>) { return }";
        assert!(super::mlir_to_llvm_ir(src, "builtin.module()").is_err());
    }
}
