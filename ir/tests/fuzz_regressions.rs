//! Inputs found by `cargo fuzz` (fuzz/fuzz_targets/load_model.rs) that once crashed the
//! loader: each must now load or fail with an error, never panic or abort.

#[test]
fn fuzz_crash_inputs_are_handled() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("regression dir").flatten() {
        let bytes = std::fs::read(e.path()).unwrap();
        if let Ok(mut g) = kiln_ir::onnx::load_bytes(&bytes, "fuzz.onnx", None) {
            let _ = kiln_ir::verify::verify(&g);
            kiln_ir::simplify::simplify(&mut g);
            let _ = kiln_ir::printer::to_text(&g);
        }
        n += 1;
    }
    assert!(n > 0, "no regression inputs in {}", dir.display());
}
