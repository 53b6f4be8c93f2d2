//! Zoo models on the GPU present: each is compiled for that GPU's SKU (found by matching the
//! driver's device name against the device database) at `--precision f32` and `f16` (MatMul/
//! Gemm on tensor cores) and run by the CUDA executor; the outputs must match the reference
//! interpreter (relative error ≤ 1e-4 at f32, ≤ 1e-2 at f16). Without a
//! CUDA driver or device the test prints `SKIPPED: no CUDA device (...)` and passes.

use kiln_codegen::gpu::DeviceDb;
use kiln_runtime::cuda::{device_count, CudaDevice};
use kiln_runtime::cuda_model::CudaModel;
use kiln_runtime::GpuPlan;
use std::path::{Path, PathBuf};

fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/zoo")
        .join(name)
}

/// The database SKU of the GPU present, if it has one.
fn sku_of(name: &str, arch: &str) -> Option<String> {
    let db = DeviceDb::builtin().ok()?;
    db.skus()
        .iter()
        .find(|s| {
            let p = GpuPlan {
                sku: s.name.clone(),
                sku_display: s.display_name.clone(),
                arch: s.arch.clone(),
                steps: vec![],
            };
            p.check_device(name, arch).is_ok()
        })
        .map(|s| s.name.clone())
}

#[test]
fn zoo_models_on_the_gpu_match_the_reference_interpreter() {
    if device_count() == 0 {
        println!("SKIPPED: no CUDA device (no libcuda or no GPU)");
        return;
    }
    let dev = CudaDevice::new(0).unwrap();
    let (name, arch) = (dev.name().unwrap(), dev.arch().unwrap());
    drop(dev);
    let Some(sku) = sku_of(&name, &arch) else {
        println!("SKIPPED: the GPU present ({name}, {arch}) is not in the device database");
        return;
    };
    println!("GPU: {name} ({arch}) = cuda:{sku}");
    for (model, prec, tol) in ["mlp", "resnet", "mobilenet", "bert", "gpt"]
        .into_iter()
        .flat_map(|m| [(m, "f32", 1e-4), (m, "f16", 1e-2)])
    {
        let dir = zoo(model).join("test_data_set_0");
        let ins = kiln::io::read_test_set(&dir, "input").unwrap();
        let path = zoo(model).join("model.onnx");
        let g = kiln::load_model(&path).unwrap();
        let mut c = kiln::Compiler::new()
            .target(&format!("cuda:{sku}"))
            .unwrap()
            .precision(prec)
            .unwrap();
        for (&v, t) in g.inputs.iter().zip(&ins) {
            c = c.shape(g.values[v].name.clone(), t.shape().to_vec());
        }
        let art = c.compile(path.as_path()).unwrap();
        let mut m = CudaModel::load(art.inner(), false).unwrap();
        let raw: Vec<Vec<u8>> = ins
            .iter()
            .map(kiln_ir::onnx::tensor_proto::to_raw)
            .collect();
        let refs: Vec<&[u8]> = raw.iter().map(|r| r.as_slice()).collect();
        let want = kiln_ir::interp::run(&g, &ins).unwrap();
        // Twice: the first run launches directly, the second replays the CUDA graph.
        for run in 0..2 {
            let outs = m.run(&refs).unwrap();
            for ((io, bytes), w) in m.plan().outputs.iter().zip(&outs).zip(&want) {
                let got =
                    kiln_ir::onnx::tensor_proto::from_raw(io.dtype, w.shape(), bytes).unwrap();
                let err = got
                    .to_f64_vec()
                    .iter()
                    .zip(w.to_f64_vec())
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                    .fold(0.0, f64::max);
                println!(
                    "{model} {prec} run {run} output '{}': max rel error {err:.2e}",
                    io.name
                );
                assert!(
                    err <= tol,
                    "{model} {prec} output '{}': rel error {err}",
                    io.name
                );
            }
        }
        // the per-launch profile: one positive time per launch, in plan order
        let times = m.profile(&refs, 3).unwrap();
        let steps = m.plan().gpu.as_ref().map_or(0, |g| g.steps.len());
        assert_eq!(times.len(), steps, "{model} {prec}");
        assert!(times.iter().all(|t| t.median_us > 0.0), "{model} {prec}");
    }
}
