//! Sharded models on GPU ranks, checked without a GPU: every rank's segments compile for
//! its SKU (`kiln compile --cluster` with GPU devices, or `--ranks N --target cuda:SKU`),
//! and the per-rank programs of pipeline and tensor-parallel plans, each GPU segment run by
//! the host emulation of its GPU plan, give the interpreter's output.

use crate::common;

use kiln::compile::CompileOptions;
use kiln::runtime::Artifact;
use kiln_passes::parallel::inprocess::run_in_process;
use kiln_passes::parallel::lower::lower;
use kiln_passes::parallel::pipeline_split::{balanced_pipeline, tensor_parallel};
use std::path::{Path, PathBuf};

fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/zoo")
        .join(name)
}

/// The zoo model's test inputs and the compile options at their shapes.
fn case(name: &str) -> (kiln::ir::Graph, Vec<kiln_ir::Tensor>, CompileOptions) {
    let ins = kiln::io::read_test_set(&zoo(name).join("test_data_set_0"), "input").unwrap();
    let g = kiln::load_model(zoo(name).join("model.onnx")).unwrap();
    let mut opts = CompileOptions::default();
    for (&v, t) in g.inputs.iter().zip(&ins) {
        opts.shapes
            .insert(g.values[v].name.clone(), t.shape().to_vec());
    }
    (g, ins, opts)
}

fn max_rel(a: &[kiln_ir::Tensor], b: &[kiln_ir::Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let (x, y) = (x.to_f64_vec(), y.to_f64_vec());
            let scale = y.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
            x.iter()
                .zip(&y)
                .fold(0.0f64, |m, (p, q)| m.max((p - q).abs() / scale))
        })
        .fold(0.0, f64::max)
}

#[test]
fn gpu_rank_programs_emulate_to_the_interpreter() {
    for name in ["mlp", "bert", "gpt", "resnet"] {
        let (g0, ins, opts) = case(name);
        let g = kiln::cluster::prepare(&g0, &opts).unwrap();
        let expected = kiln_ir::interp::run(&g, &ins).unwrap();
        let mut plans = vec![("pipeline", balanced_pipeline(&g, 2).unwrap())];
        if name != "resnet" {
            plans.push(("tensor", tensor_parallel(&g, 2)));
        }
        for (mode, plan) in plans {
            let progs = lower(&g, &plan).unwrap();
            let seg_opts = CompileOptions::default(); // segments have their shapes
            let mut segments = 0;
            let got = run_in_process(&progs, &ins, |rank, seg, sg, xs| {
                segments += 1;
                let what = format!("{name} {mode} rank {rank} segment {seg}");
                kiln::gpu_compile::emulate_graph(sg, &what, "cuda:h100", &seg_opts, xs, |_| {})
                    .map(|e| e.outputs)
                    .map_err(|e| format!("{what}: {e:#}"))
            })
            .unwrap_or_else(|e| panic!("{name} {mode}: {e}"));
            assert!(segments >= 2, "{name} {mode}");
            let err = max_rel(&got, &expected);
            assert!(err <= 1e-4, "{name} {mode}: max rel error {err:.2e}");
        }
    }
}

/// Every compute segment of a `--cluster` compile over two H100s is a GPU artifact for
/// the H100; `--ranks 2 --target cuda:a100` puts both ranks on the A100.
#[test]
fn gpu_cluster_segments_compile_for_their_sku() {
    let dir = std::env::temp_dir().join(format!("kiln-gpu-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("2xh100.toml");
    std::fs::write(&toml, "[[group]]\nsku = \"h100\"\ncount = 2\n").unwrap();
    let (g, _, opts) = case("bert");
    let sources = [
        (
            kiln::cluster::PlanSource::Cluster(toml.clone()),
            opts.clone(),
            "H100",
        ),
        (
            kiln::cluster::PlanSource::Ranks(2),
            CompileOptions {
                gpu_target: Some("cuda:a100".into()),
                ..opts.clone()
            },
            "A100",
        ),
    ];
    for (source, o, sku) in sources {
        let (art, report) = kiln::cluster::compile_cluster_graph(&g, "bert", &o, &source).unwrap();
        assert!(report.compiled >= 2, "{report}");
        let cp = art.plan.cluster.as_ref().unwrap();
        assert_eq!(cp.world, 2);
        let mut gpu_segments = 0;
        for r in &cp.ranks {
            for s in &r.steps {
                if let kiln::runtime::cluster::ClusterStep::Compute { offset, len } = s {
                    let bytes = &art.weights[*offset as usize..(*offset + *len) as usize];
                    let seg = Artifact::from_bytes(bytes, "segment").unwrap();
                    let gp = seg.plan.gpu.as_ref().expect("a GPU plan");
                    assert!(
                        gp.sku.to_uppercase().contains(sku),
                        "{} is not for {sku}",
                        gp.sku
                    );
                    assert!(std::str::from_utf8(&seg.kernels)
                        .unwrap()
                        .contains(".entry"));
                    gpu_segments += 1;
                }
            }
        }
        assert!(gpu_segments >= 2);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The CLI: `kiln compile --ranks 2 --target cuda:h100` writes a sharded artifact of GPU
/// segments; `kiln run` of it runs every rank on a GPU, or (no GPU here) says why not.
#[test]
fn cli_shards_onto_gpu_ranks() {
    let dir = common::tmp("gpu-ranks");
    let art = dir.join("mlp.kiln");
    let model = zoo("mlp").join("model.onnx");
    let (ok, out) = common::kiln(&[
        "compile",
        model.to_str().unwrap(),
        "--ranks",
        "2",
        "--target",
        "cuda:h100",
        "-o",
        art.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("sharded"), "{out}");
    let check = zoo("mlp").join("test_data_set_0");
    let (ok, out) = common::kiln(&[
        "run",
        art.to_str().unwrap(),
        "--check",
        check.to_str().unwrap(),
    ]);
    if kiln_runtime::cuda::device_count() == 0 {
        assert!(!ok && out.contains("CUDA"), "{out}");
        eprintln!("no GPU: the GPU ranks were not run ({})", out.trim());
    } else {
        assert!(ok, "{out}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
