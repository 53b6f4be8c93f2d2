//! Checks every kernel of one ONNX model against the interpreter: `KILN_DEBUG_MODEL=path
//! cargo test -p kiln-codegen --test debug_node -- --ignored --nocapture`.
mod common;

#[test]
#[ignore]
fn debug_model_kernels() {
    let Ok(path) = std::env::var("KILN_DEBUG_MODEL") else {
        return;
    };
    let dir = std::path::Path::new(&path).parent().unwrap().to_path_buf();
    let g = kiln_ir::onnx::load(&path).unwrap();
    let mut inputs = Vec::new();
    for k in 0.. {
        let p = dir.join(format!("test_data_set_0/input_{k}.pb"));
        if !p.exists() {
            break;
        }
        inputs.push(kiln_ir::onnx::load_tensor_pb(&p).unwrap().1);
    }
    let mut g = g;
    kiln_passes::specialize::specialize_inputs(
        &mut g,
        &inputs
            .iter()
            .map(|t| t.shape().to_vec())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    kiln_passes::fold_batchnorm::fold_all(&mut g);
    let _ = common::check(&g, &inputs);
    println!("all kernels match");
}
