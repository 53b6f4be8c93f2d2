//! Fuzzes the ONNX loader and verifier (and the interpreter on models small enough): any
//! byte string must give a graph or an error, never a panic, a hang or an abort.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut g) = kiln_ir::onnx::load_bytes(data, "fuzz.onnx", None) {
        let _ = kiln_ir::verify::verify(&g);
        kiln_ir::simplify::simplify(&mut g);
        let _ = kiln_ir::printer::to_text(&g);
    }
});
