//! LLVM through `inkwell`: textual LLVM IR → O3-optimised object code for a named x86-64 CPU.

use crate::CodegenError;
use inkwell::context::Context;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple,
};
use inkwell::OptimizationLevel;

/// The target triple Kiln emits CPU code for.
pub const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// A target machine for `cpu` (`x86-64-v3`, `x86-64-v4`, `native`, or any LLVM CPU name).
pub fn target_machine(cpu: &str) -> Result<TargetMachine, CodegenError> {
    Target::initialize_x86(&InitializationConfig::default());
    let triple = TargetTriple::create(TRIPLE);
    let target = Target::from_triple(&triple).map_err(|e| CodegenError::Llvm(e.to_string()))?;
    let (cpu, features) = if cpu == "native" {
        (
            TargetMachine::get_host_cpu_name().to_string(),
            TargetMachine::get_host_cpu_features().to_string(),
        )
    } else {
        (cpu.to_string(), String::new())
    };
    target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| {
            CodegenError::Llvm(format!("cannot create a target machine for CPU '{cpu}'"))
        })
}

/// Parses LLVM IR text, runs the O3 pipeline for `cpu` and returns ELF object code.
pub fn emit_object(ir: &str, cpu: &str) -> Result<Vec<u8>, CodegenError> {
    let ctx = Context::create();
    let buf = MemoryBuffer::create_from_memory_range_copy(ir.as_bytes(), "kernel.ll");
    let module = ctx
        .create_module_from_ir(buf)
        .map_err(|e| CodegenError::Llvm(format!("invalid LLVM IR: {e}")))?;
    optimize_and_emit(&module, cpu)
}

/// Verifies `module` and runs the O3 pipeline for `cpu` on it (in place); returns the target
/// machine used.
pub fn optimize(module: &Module<'_>, cpu: &str) -> Result<TargetMachine, CodegenError> {
    module
        .verify()
        .map_err(|e| CodegenError::Llvm(format!("invalid LLVM module: {e}")))?;
    let tm = target_machine(cpu)?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(|e| CodegenError::Llvm(e.to_string()))?;
    Ok(tm)
}

/// Runs the O3 pipeline for `cpu` on `module` (in place) and returns ELF object code.
pub fn optimize_and_emit(module: &Module<'_>, cpu: &str) -> Result<Vec<u8>, CodegenError> {
    let tm = optimize(module, cpu)?;
    let obj = tm
        .write_to_memory_buffer(module, FileType::Object)
        .map_err(|e| CodegenError::Llvm(e.to_string()))?;
    Ok(obj.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_x86_object_with_fma() {
        let ir = r#"
            define float @fma3(float %a, float %b, float %c) {
              %m = fmul contract float %a, %b
              %s = fadd contract float %m, %c
              ret float %s
            }"#;
        let obj = emit_object(ir, "x86-64-v3").unwrap();
        assert_eq!(&obj[..4], b"\x7fELF");
        assert!(emit_object("garbage", "x86-64-v3").is_err());
    }
}
