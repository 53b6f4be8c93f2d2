//! MLIR through `melior`: a context with every dialect, pass and translation registered, and
//! a runner for textual pass pipelines.

use crate::CodegenError;
use melior::dialect::DialectRegistry;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{
    parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
};
use melior::Context;

/// A new MLIR context with all upstream dialects loaded and LLVM translations registered.
pub fn context() -> Context {
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let ctx = Context::new();
    ctx.append_dialect_registry(&registry);
    ctx.load_all_available_dialects();
    register_all_llvm_translations(&ctx);
    ctx
}

/// Parses `text` as an MLIR module, runs `pipeline` (e.g. `builtin.module(convert-to-llvm)`)
/// on it and returns the resulting module as text.
pub fn run_pipeline(text: &str, pipeline: &str) -> Result<String, CodegenError> {
    register_all_passes();
    let ctx = context();
    let mut module = Module::parse(&ctx, text).ok_or_else(|| CodegenError::MlirParse {
        what: "input module".into(),
    })?;
    let pm = PassManager::new(&ctx);
    let fail = |msg: String| CodegenError::MlirPass {
        pipeline: pipeline.to_string(),
        msg,
    };
    parse_pass_pipeline(pm.as_operation_pass_manager(), pipeline)
        .map_err(|e| fail(e.to_string()))?;
    pm.run(&mut module).map_err(|e| fail(e.to_string()))?;
    Ok(module.as_operation().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_arith_to_llvm_dialect() {
        let src = r#"
            func.func @add(%a: f32, %b: f32) -> f32 {
              %c = arith.addf %a, %b : f32
              return %c : f32
            }"#;
        let out = run_pipeline(src, "builtin.module(convert-to-llvm)").unwrap();
        assert!(out.contains("llvm.fadd"), "{out}");
        assert!(run_pipeline("not mlir", "builtin.module()").is_err());
    }
}
