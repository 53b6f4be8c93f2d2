//! The cubin cache on the GPU present: a fresh cache directory makes the first load of an
//! artifact JIT-compile its PTX and store the cubin, the second load reads it back, and both
//! modules compute the same outputs. Without a CUDA driver or device the test prints
//! `SKIPPED: no CUDA device (...)` and passes.

use kiln_runtime::cubin_cache::Source;
use kiln_runtime::cuda::{device_count, CudaDevice};
use kiln_runtime::cuda_model::CudaModel;
use std::path::Path;

#[test]
fn second_load_reads_the_cached_cubin() {
    if device_count() == 0 {
        println!("SKIPPED: no CUDA device (no libcuda or no GPU)");
        return;
    }
    let dev = CudaDevice::new(0).unwrap();
    let arch = dev.arch().unwrap();
    drop(dev);
    let cache = tempfile::tempdir().unwrap();
    // SAFETY: this test binary runs this single test; nothing reads the environment meanwhile.
    unsafe { std::env::set_var("KILN_CUBIN_CACHE", cache.path()) };
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/zoo/mlp/model.onnx");
    let art = kiln::Compiler::new()
        .target(&format!("cuda:{arch}"))
        .unwrap()
        .shape("input", vec![2, 32])
        .compile(model.as_path())
        .unwrap();
    let x: Vec<u8> = (0..64)
        .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
        .collect();
    let mut outs = vec![];
    for want in [Source::Compiled, Source::Cached] {
        let mut m = CudaModel::load(art.inner(), true).unwrap();
        assert_eq!(m.cubin, want);
        outs.push(m.run(&[x.as_slice()]).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
    let entries = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(entries, 1, "one cubin in the cache");
}
