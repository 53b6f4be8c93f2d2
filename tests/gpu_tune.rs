//! GPU autotuning workflow (`kiln tune --target cuda:SKU`): tasks extracted from zoo models,
//! the validity check, bundle export (manifest, PTX through ptxas, expected outputs vs the
//! reference interpreter), results in the measurer's format imported into a database and
//! used by `compile --db`, and the measurer's refusal without a GPU.

use crate::common;

use common::{kiln, tmp};
use kiln::compile::CompileOptions;
use kiln::gpu_tune::{gpu_model_tasks, tune_gpu, GpuTask, GpuTuneSettings};
use kiln_codegen::gpu::kernels::conv_mma::ConvMmaSchedule;
use kiln_codegen::gpu::kernels::gemm::GpuGemmSchedule;
use kiln_codegen::gpu::kernels::gemm_mma::MmaSchedule;
use kiln_codegen::gpu::kernels::gemm_wgmma::WgmmaSchedule;
use kiln_codegen::gpu::lower::attention::{RowAttentionSchedule, ScoreStep};
use kiln_codegen::gpu::lower::Precision;
use kiln_codegen::gpu::ptxas;
use kiln_codegen::gpu::tuning::{gemm_f32_config, gemm_f32_schedule, mma_config, wgmma_config};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, UnaryKind};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::{AutoPad, ConvAttrs, NnOp, WindowAttrs};
use kiln_ir::{DType, Fact, Graph, Node, Op, Shape, Tensor, ValueId};
use kiln_runtime::tune_bundle::{read_f32, read_u16, result_line, Manifest, MeasureOutcome};
use kiln_tune::{Config, Task};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/zoo")
        .join(name)
        .join("model.onnx")
}

fn opts(name: &str, precision: Precision) -> CompileOptions {
    let mut o = CompileOptions {
        precision,
        ..Default::default()
    };
    if matches!(name, "bert" | "gpt") {
        for i in ["input_ids", "attention_mask"] {
            o.shapes.insert(i.into(), vec![1, 16]);
        }
    }
    o
}

fn tasks(name: &str, p: Precision, target: &str) -> Vec<GpuTask> {
    gpu_model_tasks(&zoo(name), &opts(name, p), target).unwrap()
}

#[test]
fn tasks_from_zoo_models_at_f32_and_f16() {
    // f32: SIMT GEMMs and the fused row attention (bert), implicit-GEMM convs (resnet).
    let bert = tasks("bert", Precision::F32, "cuda:h100");
    assert!(!bert.is_empty());
    assert!(bert.iter().all(|t| matches!(
        t.tunable.workload.kind.as_str(),
        "gpu_gemm_f32" | "gpu_row_attention"
    )));
    let attn = bert
        .iter()
        .find(|t| t.tunable.workload.kind == "gpu_row_attention")
        .expect("an attention task");
    // its description parses back to the same task (constants as f32 bits)
    let again = kiln_codegen::gpu::tuning::GpuTunable::from_description(
        attn.tunable.label(),
        &attn.tunable.sku,
    )
    .unwrap();
    assert_eq!(
        again.template,
        attn.tunable.template,
        "{}",
        attn.tunable.label()
    );
    let resnet = tasks("resnet", Precision::F32, "cuda:h100");
    assert!(resnet
        .iter()
        .any(|t| t.tunable.workload.kind == "gpu_conv2d_f32"));
    // f16 on H100: the wgmma GEMM for bert's unbatched products.
    let bert16 = tasks("bert", Precision::F16, "cuda:h100");
    assert!(!bert16.is_empty());
    assert!(bert16
        .iter()
        .any(|t| t.tunable.workload.kind == "gpu_gemm_wgmma"));
    // f16 on A100 (no wgmma): mma.sync.
    let bert16a = tasks("bert", Precision::F16, "cuda:a100");
    assert!(bert16a
        .iter()
        .any(|t| t.tunable.workload.kind == "gpu_gemm_mma"));
    for ts in [&bert, &resnet, &bert16, &bert16a] {
        for t in ts.iter() {
            // Every task's default is today's schedule and is valid.
            assert!(
                t.check(&t.default_config()).is_ok(),
                "{}",
                t.tunable.label()
            );
            assert!(t.occurrences >= 1);
        }
    }
    // Fingerprints are stable: the same on a second extraction, and the hash of the
    // canonical description.
    let again = tasks("bert", Precision::F16, "cuda:h100");
    let fps = |ts: &[GpuTask]| -> Vec<String> {
        ts.iter()
            .map(|t| t.tunable.workload.fingerprint())
            .collect()
    };
    assert_eq!(fps(&bert16), fps(&again));
    let t = bert16
        .iter()
        .find(|t| t.tunable.label() == "gpu_gemm_wgmma f16 m=16 n=64 k=64 bias=1")
        .unwrap_or_else(|| {
            panic!(
                "{:?}",
                bert16.iter().map(|t| t.tunable.label()).collect::<Vec<_>>()
            )
        });
    assert_eq!(t.tunable.workload.fingerprint(), "cc83b02553fae6d0");
    assert_eq!(
        kiln_tune::Workload::new("x", t.tunable.label(), vec![]).fingerprint(),
        "cc83b02553fae6d0"
    );
    // Precision is part of the GEMM workloads: bf16 GEMM tasks have other fingerprints (the
    // f32 row attention is the same kernel at every precision).
    let bf = tasks("bert", Precision::BF16, "cuda:h100");
    let gemms = |ts: &[GpuTask]| -> Vec<GpuTask> {
        ts.iter()
            .filter(|t| t.tunable.workload.kind != "gpu_row_attention")
            .cloned()
            .collect()
    };
    assert!(fps(&gemms(&bf)).iter().all(|f| !fps(&bert16).contains(f)));
}

#[test]
fn validity_check_rejects_oversized_shared_memory_without_compiling() {
    let ts = tasks("bert", Precision::F16, "cuda:a100");
    let t = ts
        .iter()
        .find(|t| t.tunable.workload.kind == "gpu_gemm_mma")
        .unwrap();
    let big = mma_config(&MmaSchedule {
        bm: 256,
        bn: 256,
        bk: 64,
        wm: 4,
        wn: 4,
        stages: 5,
        ..MmaSchedule::default()
    });
    assert!(t.space().contains(&big));
    let e = t.check(&big).unwrap_err();
    assert!(e.contains("shared memory"), "{e}");
    // The f32 GEMM: 128×128 tiles with bk = 32 need 32 KiB... fine; threads > 1024 are not.
    let f = tasks("mlp", Precision::F32, "cuda:l4");
    let g = &f[0];
    let many = gemm_f32_config(&GpuGemmSchedule {
        bm: 128,
        bn: 128,
        bk: 8,
        tm: 1,
        tn: 1,
        split_k: 1,
    });
    assert!(g.check(&many).unwrap_err().contains("threads"));
    // build() runs the same check first: nothing is generated for an invalid config.
    assert!(t.tunable.build("k", &big).is_err());
}

/// A graph of `nodes` (op, inputs) over inputs of `shapes`; the last node's output is the
/// graph output.
fn graph(shapes: &[&[usize]], nodes: Vec<(Op, Vec<usize>)>) -> Graph {
    let mut g = Graph {
        name: "t".into(),
        opset: 17,
        ..Graph::default()
    };
    let mut vals: Vec<ValueId> = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let v = g.add_value(format!("in{i}"), Fact::new(DType::F32, Shape::known(s)));
        g.inputs.push(v);
        vals.push(v);
    }
    for (n, (op, ins)) in nodes.into_iter().enumerate() {
        let out = g.add_value(format!("v{n}"), Fact::new(DType::F32, Shape(vec![])));
        g.nodes.push(Node {
            name: format!("n{n}"),
            op,
            inputs: ins.iter().map(|&i| Some(vals[i])).collect(),
            outputs: vec![out],
        });
        vals.push(out);
    }
    g.outputs = vec![*vals.last().unwrap()];
    g.infer().unwrap();
    g
}

fn fields(desc: &str) -> HashMap<String, String> {
    desc.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The expected output of task `ti` recomputed by the reference interpreter from the
/// bundle's input files.
fn interpreted(dir: &Path, m: &Manifest, ti: usize) -> Vec<f32> {
    let t = &m.tasks[ti];
    let f = fields(&t.description);
    let num = |k: &str| -> usize { f[k].parse().unwrap() };
    let pair = |k: &str, sep: char| -> Vec<usize> {
        f[k].split(sep).map(|x| x.parse().unwrap()).collect()
    };
    let load = |i: usize| -> Vec<f32> {
        let b = &t.buffers[i];
        let p = dir.join(b.file.as_ref().unwrap());
        match b.elem_bytes {
            4 => read_f32(&p).unwrap(),
            _ => {
                let bits = read_u16(&p).unwrap();
                let bytes: Vec<u8> = bits.iter().flat_map(|x| x.to_le_bytes()).collect();
                let dt = if t.description.contains(" bf16 ") {
                    DType::BF16
                } else {
                    DType::F16
                };
                kiln_ir::onnx::tensor_proto::from_raw(dt, &[bits.len()], &bytes)
                    .unwrap()
                    .cast(DType::F32)
                    .to_f64_vec()
                    .iter()
                    .map(|&x| x as f32)
                    .collect()
            }
        }
    };
    let run = |g: &Graph, ins: Vec<Tensor>| -> Vec<f32> {
        let out = kiln_ir::interp::run(g, &ins).unwrap();
        out[0].to_f64_vec().iter().map(|&x| x as f32).collect()
    };
    match t.kind.as_str() {
        "gpu_gemm_f32" | "gpu_gemm_wgmma" | "gpu_gemm_mma" => {
            let (m_, n, k) = (num("m"), num("n"), num("k"));
            assert!(!t.description.contains("batch=") || num("batch") == 1);
            let a = Tensor::from_vec(&[m_, k], load(0)[..m_ * k].to_vec());
            let b = Tensor::from_vec(&[k, n], load(1)[..k * n].to_vec());
            // The epilogue (bias, residual, activation) as graph nodes after the MatMul.
            let epi = f.get("epi").map_or("", String::as_str);
            let parts: Vec<&str> = epi.split('_').collect();
            let bias = f.get("bias").is_some_and(|v| v == "1");
            let res_at = parts.iter().position(|p| *p == "res");
            let act = parts
                .iter()
                .find(|p| !matches!(**p, "bias" | "res" | "" | "plain"));
            let mut shapes: Vec<Vec<usize>> = vec![vec![m_, k], vec![k, n]];
            let mut ins = vec![a, b];
            let mut next_buf = 3;
            let mut extra = |shape: Vec<usize>, shapes: &mut Vec<Vec<usize>>| -> usize {
                shapes.push(shape.clone());
                ins.push(Tensor::from_vec(&shape, load(next_buf)));
                next_buf += 1;
                shapes.len() - 1
            };
            let bias_in = bias.then(|| extra(vec![n], &mut shapes));
            let res_in = res_at.map(|_| extra(vec![m_, n], &mut shapes));
            let n_in = shapes.len();
            let add = Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add));
            let mut nodes = vec![(Op::Linalg(LinalgOp::MatMul), vec![0, 1])];
            let last = |nodes: &Vec<(Op, Vec<usize>)>| n_in + nodes.len() - 1;
            if let Some(bi) = bias_in {
                nodes.push((add.clone(), vec![last(&nodes), bi]));
            }
            // `res` before the activation's name: added before it.
            let res_before = res_at.is_some_and(|i| act.is_none_or(|a| parts[i + 1..].contains(a)));
            if let (Some(ri), true) = (res_in, res_before) {
                nodes.push((add.clone(), vec![last(&nodes), ri]));
            }
            let unary = |u: UnaryKind| Op::Elementwise(ElementwiseOp::Unary(u));
            match act.copied() {
                None => {}
                Some("relu") => nodes.push((unary(UnaryKind::Relu), vec![last(&nodes)])),
                Some("sigmoid") => nodes.push((unary(UnaryKind::Sigmoid), vec![last(&nodes)])),
                Some("tanh") => nodes.push((unary(UnaryKind::Tanh), vec![last(&nodes)])),
                Some("gelu") => nodes.push((
                    unary(UnaryKind::Gelu {
                        approximate: kiln_ir::ops::elementwise::GeluApprox::Tanh,
                    }),
                    vec![last(&nodes)],
                )),
                Some("silu") => {
                    let x = last(&nodes);
                    nodes.push((unary(UnaryKind::Sigmoid), vec![x]));
                    nodes.push((
                        Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Mul)),
                        vec![x, last(&nodes)],
                    ));
                }
                Some(a) => panic!("unknown activation {a} in {}", t.description),
            }
            if let (Some(ri), false) = (res_in, res_before) {
                nodes.push((add, vec![last(&nodes), ri]));
            }
            let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
            run(&graph(&refs, nodes), ins)
        }
        "gpu_conv2d_f32" | "gpu_conv2d_mma" => {
            let (n, c, h, w, oc) = (num("n"), num("c"), num("h"), num("w"), num("oc"));
            let kk = pair("k", 'x');
            let attrs = ConvAttrs {
                window: WindowAttrs {
                    auto_pad: AutoPad::NotSet,
                    kernel_shape: Some(kk.clone()),
                    strides: Some(pair("stride", 'x')),
                    dilations: Some(pair("dilation", 'x')),
                    pads: Some(pair("pads", ',')),
                },
                group: 1,
            };
            let (bias, res, relu) = (f["bias"] == "1", f["residual"] == "1", f["relu"] == "1");
            let xs = [n, c, h, w];
            let ws = [oc, c, kk[0], kk[1]];
            let mut shapes: Vec<Vec<usize>> = vec![xs.to_vec(), ws.to_vec()];
            let mut ins = vec![
                Tensor::from_vec(&xs, load(0)),
                Tensor::from_vec(&ws, load(1)),
            ];
            let mut conv_in = vec![0, 1];
            let mut next = 2;
            if bias {
                shapes.push(vec![oc]);
                ins.push(Tensor::from_vec(&[oc], load(next)));
                conv_in.push(next);
                next += 1;
            }
            let out_len = t.buffers[t.output].len as usize;
            let mut res_input = None;
            if res {
                let r = load(next);
                assert_eq!(r.len(), out_len);
                // The residual has the output's shape: [n, oc, oh, ow].
                let hw = out_len / (n * oc);
                let side = (hw as f64).sqrt() as usize;
                shapes.push(vec![n, oc, side, hw / side]);
                ins.push(Tensor::from_vec(&[n, oc, side, hw / side], r));
                res_input = Some(next);
            }
            let n_in = shapes.len();
            let mut nodes = vec![(Op::Nn(NnOp::Conv(attrs)), conv_in)];
            let mut last = n_in;
            if let Some(r) = res_input {
                nodes.push((
                    Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add)),
                    vec![last, r],
                ));
                last += 1;
            }
            if relu {
                nodes.push((
                    Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)),
                    vec![last],
                ));
            }
            let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
            run(&graph(&refs, nodes), ins)
        }
        "gpu_row_attention" => {
            // Q·Kᵀ, the score steps, Softmax over the keys, ·V as graph nodes; the mask
            // expanded to the scores' shape, the causal mask as `s·keep + fill·(1 - keep)`
            let sku = kiln::gpu_compile::resolve_sku(&m.target).unwrap();
            let tpl = kiln_codegen::gpu::tuning::GpuTunable::from_description(&t.description, sku)
                .unwrap()
                .template;
            let kiln_codegen::gpu::tuning::GpuTemplate::RowAttention(a) = tpl else {
                unreachable!()
            };
            let (bh, sq, skv, d) = (a.bh, a.sq, a.skv, a.d);
            let scores = vec![bh, sq, skv];
            let mut shapes = vec![vec![bh, sq, d], vec![bh, d, skv], vec![bh, skv, d]];
            let mut ins: Vec<Tensor> = (0..3)
                .map(|i| Tensor::from_vec(&shapes[i], load(i)))
                .collect();
            let mut input = |shape: Vec<usize>, v: Vec<f32>, shapes: &mut Vec<Vec<usize>>| {
                ins.push(Tensor::from_vec(&shape, v));
                shapes.push(shape);
                shapes.len() - 1
            };
            let bin = |k: BinaryKind| Op::Elementwise(ElementwiseOp::Binary(k));
            let mut steps: Vec<(Op, usize)> = Vec::new(); // (op, its other operand)
            for st in &a.steps {
                match *st {
                    ScoreStep::Div(c) => {
                        steps.push((bin(BinaryKind::Div), input(vec![1], vec![c], &mut shapes)))
                    }
                    ScoreStep::Mul(c) => {
                        steps.push((bin(BinaryKind::Mul), input(vec![1], vec![c], &mut shapes)))
                    }
                    ScoreStep::AddMask => {
                        let raw = load(3);
                        let full: Vec<f32> = (0..bh * sq * skv)
                            .map(|e| raw[a.mask_offset(e / (sq * skv), e / skv % sq, e % skv)])
                            .collect();
                        steps.push((
                            bin(BinaryKind::Add),
                            input(scores.clone(), full, &mut shapes),
                        ));
                    }
                    ScoreStep::Causal(fill) => {
                        let keep: Vec<f32> = (0..bh * sq * skv)
                            .map(|e| f32::from(u8::from(e % skv <= e / skv % sq)))
                            .collect();
                        let add: Vec<f32> = keep
                            .iter()
                            .map(|k| if *k == 1.0 { 0.0 } else { fill })
                            .collect();
                        steps.push((
                            bin(BinaryKind::Mul),
                            input(scores.clone(), keep, &mut shapes),
                        ));
                        steps.push((
                            bin(BinaryKind::Add),
                            input(scores.clone(), add, &mut shapes),
                        ));
                    }
                }
            }
            let n_in = shapes.len();
            let mut nodes = vec![(Op::Linalg(LinalgOp::MatMul), vec![0, 1])];
            for (op, other) in steps {
                let last = n_in + nodes.len() - 1;
                nodes.push((op, vec![last, other]));
            }
            let last = n_in + nodes.len() - 1;
            nodes.push((
                Op::Nn(NnOp::Softmax(kiln_ir::ops::nn::SoftmaxAttrs {
                    axis: -1,
                    coerce_2d: false,
                })),
                vec![last],
            ));
            nodes.push((Op::Linalg(LinalgOp::MatMul), vec![last + 1, 2]));
            let refs: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
            run(&graph(&refs, nodes), ins)
        }
        k => panic!("unexpected kind {k}"),
    }
}

fn export(name: &str, p: Precision, target: &str, dir: &Path, db: &Path, n: usize) -> Manifest {
    tune_gpu(
        &zoo(name),
        &GpuTuneSettings {
            compile: opts(name, p),
            target: target.into(),
            db: db.to_path_buf(),
            export: Some(dir.to_path_buf()),
            candidates: n,
            trials: 0,
        },
    )
    .unwrap();
    Manifest::load(dir).unwrap()
}

#[test]
fn exported_bundle_round_trips() {
    let root = tmp("gpu_tune_bundle");
    let db = root.join("t.db");
    let ptxas_bin = ptxas::find_ptxas();
    if ptxas_bin.is_none() {
        println!("SKIPPED (ptxas part): no ptxas");
    }
    let (mut fused_epilogues, mut tc_convs, mut attentions) = (0, 0, 0);
    for (name, p, target, n) in [
        ("bert", Precision::F16, "cuda:h100", 3),
        ("resnet", Precision::F32, "cuda:h100", 2),
        ("mlp", Precision::TF32, "cuda:a100", 2),
        ("mlp", Precision::F16, "cuda:a100", 2),
        ("resnet", Precision::BF16, "cuda:a100", 2),
    ] {
        let dir = root.join(format!("{name}_{}", p.name()));
        let m = export(name, p, target, &dir, &db, n);
        let sku = kiln::gpu_compile::resolve_sku(target).unwrap();
        assert_eq!(m.target, format!("cuda:{}", sku.name));
        assert_eq!(m.arch, sku.arch);
        assert!(!m.tasks.is_empty());
        // The manifest is JSON that parses back to the same value.
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        let again: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(again, m);
        for (ti, t) in m.tasks.iter().enumerate() {
            assert!(!t.candidates.is_empty() && t.candidates.len() <= n);
            fused_epilogues += usize::from(t.description.contains(" epi="));
            tc_convs += usize::from(t.kind == "gpu_conv2d_mma");
            attentions += usize::from(t.kind == "gpu_row_attention");
            let fps: Vec<String> = gpu_model_tasks(&zoo(name), &opts(name, p), target)
                .unwrap()
                .iter()
                .map(|x| x.tunable.workload.fingerprint())
                .collect();
            assert!(fps.contains(&t.workload));
            // Inputs are shared: one set of files per task.
            for b in &t.buffers {
                if let Some(f) = &b.file {
                    assert!(f.starts_with(&format!("t{ti}_")));
                }
            }
            // The expected output is the reference interpreter's.
            let want = read_f32(&dir.join(&t.expected)).unwrap();
            let got = interpreted(&dir, &m, ti);
            let err = kiln_runtime::tune_bundle::compare(&got, &want, 1e-5);
            assert!(err.is_ok(), "{}: {err:?}", t.description);
            let Some(px) = &ptxas_bin else { continue };
            for c in &t.candidates {
                let ptx = std::fs::read_to_string(dir.join(&c.ptx)).unwrap();
                let arch = ptx
                    .lines()
                    .find_map(|l| l.strip_prefix(".target "))
                    .unwrap()
                    .trim()
                    .to_string();
                let scratch = tempfile::tempdir().unwrap();
                let u = ptxas::assemble(px, scratch.path(), &ptx, &arch, &c.entry)
                    .unwrap_or_else(|e| panic!("{}: {e}", t.description));
                assert!(u.registers > 0);
            }
        }
        // The default schedule is the first candidate of every task whose default had not
        // been measured.
        println!(
            "{name} {}: {} tasks, {} candidates",
            p.name(),
            m.tasks.len(),
            m.tasks.iter().map(|t| t.candidates.len()).sum::<usize>()
        );
    }
    // Tensor-core GEMMs with a fused activation/residual are tasks too (mlp's Gemm+Relu).
    assert!(fused_epilogues > 0);
    // Convs on tensor cores (resnet at bf16) are tasks with 16-bit X and W.
    assert!(tc_convs > 0);
    // bert's fused attention is a task (the expected output recomputed above from Q·Kᵀ,
    // the score steps, Softmax and ·V).
    assert!(attentions > 0);
    std::fs::remove_dir_all(&root).ok();
}

/// Results in the measurer's format making `config` the fastest of task `ti` (the default
/// measured slower).
fn results(m: &Manifest, picks: &[(usize, Config)]) -> String {
    let mut out = String::new();
    for (ti, config) in picks {
        let t = &m.tasks[*ti];
        let mut c = t.candidates[0].clone();
        out += &result_line(m, t, &c, &MeasureOutcome::Ok { seconds: 2e-5 });
        out.push('\n');
        c.config = config.0.clone();
        out += &result_line(m, t, &c, &MeasureOutcome::Ok { seconds: 1e-5 });
        out.push('\n');
    }
    out
}

/// `kiln db import` of the measurer's `lines` (written to `root/results.jsonl`) into `db`;
/// returns its output.
fn import(root: &Path, db: &Path, lines: &str) -> String {
    let file = root.join("results.jsonl");
    std::fs::write(&file, lines).unwrap();
    let (ok, out) = kiln(&[
        "db",
        "import",
        file.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    out
}

fn compile_with(name: &str, target: &str, p: &str, db: Option<&Path>) -> kiln::Artifact {
    let mut c = kiln::Compiler::new()
        .target(target)
        .unwrap()
        .precision(p)
        .unwrap();
    for (k, v) in opts(name, Precision::F32).shapes {
        c = c.shape(k, v);
    }
    if let Some(db) = db {
        c = c.tuning_db(db).unwrap();
    }
    c.compile(zoo(name).as_path()).unwrap()
}

#[test]
fn imported_results_select_the_recorded_schedules() {
    let root = tmp("gpu_tune_import");
    let db = root.join("tuning.db");
    // f32 SIMT GEMMs of mlp on H100: record 32×16 tiles as the fastest.
    let m = export(
        "mlp",
        Precision::F32,
        "cuda:h100",
        &root.join("mlp"),
        &root.join("x.db"),
        2,
    );
    let tuned = GpuGemmSchedule {
        bm: 32,
        bn: 16,
        bk: 8,
        tm: 2,
        tn: 2,
        split_k: 1,
    };
    let picks: Vec<(usize, Config)> = (0..m.tasks.len())
        .map(|i| (i, gemm_f32_config(&tuned)))
        .collect();
    // wgmma GEMMs of bert at f16: bn = 128, 2 stages (the untuned choice for these small
    // problems is bn = 64, 4 stages, vectorized stores: `WgmmaSchedule::for_problem`).
    let mb = export(
        "bert",
        Precision::F16,
        "cuda:h100",
        &root.join("bert"),
        &root.join("x.db"),
        1,
    );
    let wg = WgmmaSchedule {
        bn: 128,
        stages: 2,
        vector: 1,
        ..WgmmaSchedule::default()
    };
    let picks_b: Vec<(usize, Config)> = (0..mb.tasks.len())
        .filter(|&i| mb.tasks[i].kind == "gpu_gemm_wgmma")
        .map(|i| (i, wgmma_config(&wg)))
        .collect();
    assert!(!picks_b.is_empty());
    let out = import(&root, &db, &(results(&m, &picks) + &results(&mb, &picks_b)));
    let n = 2 * (picks.len() + picks_b.len());
    assert!(
        out.contains(&format!("{n} records read, {n} added")),
        "{out}"
    );

    // mlp f32: every GEMM launch uses the tuned kernel and its grid.
    let plain = compile_with("mlp", "cuda:h100", "f32", None);
    let art = compile_with("mlp", "cuda:h100", "f32", Some(&db));
    let report = art.report().unwrap().to_string();
    let k = m.tasks.len();
    assert!(
        report.contains(&format!("tuned schedules: {k} of {k} tunable kernels")),
        "{report}"
    );
    let name = kiln_codegen::gpu::tuning::gemm_f32_name(&tuned);
    let steps = |a: &kiln::Artifact| a.inner().plan.gpu.clone().unwrap().steps;
    let ptx = String::from_utf8_lossy(&art.inner().kernels).to_string();
    assert!(
        ptx.contains(&format!(".entry {name}(")),
        "no {name} in the PTX"
    );
    let gemms: Vec<_> = steps(&art)
        .into_iter()
        .filter(|s| s.kernel.starts_with("kiln_gemm_f32"))
        .collect();
    let base: Vec<_> = steps(&plain)
        .into_iter()
        .filter(|s| s.kernel.starts_with("kiln_gemm_f32"))
        .collect();
    assert_eq!(gemms.len(), base.len());
    let mut differ = 0;
    for (s, b) in gemms.iter().zip(&base) {
        assert_eq!(s.kernel, name);
        assert!(
            b.kernel.starts_with("kiln_gemm_f32") && b.kernel != name,
            "{}",
            b.kernel
        );
        assert_eq!(s.block, [tuned.threads(), 1, 1]);
        let t = m
            .tasks
            .iter()
            .find(|t| {
                let f = fields(&t.description);
                f["n"]
                    == format!(
                        "{}",
                        match s.args[4] {
                            kiln_runtime::GpuArg::Index(v) => v,
                            _ => panic!(),
                        }
                    )
            })
            .unwrap();
        let f = fields(&t.description);
        let (mm, nn): (u64, u64) = (f["m"].parse().unwrap(), f["n"].parse().unwrap());
        assert_eq!(s.grid, tuned.grid(mm, nn));
        assert_eq!(b.grid, GpuGemmSchedule::default().grid(mm, nn));
        differ += usize::from(s.grid != b.grid);
    }
    assert!(differ > 0, "the tuned tiles change some grid");
    assert_eq!(gemm_f32_schedule(&gemm_f32_config(&tuned)), tuned);

    // bert f16: the wgmma launches use bn = 128, 2 stages (half the blocks along N).
    let art = compile_with("bert", "cuda:h100", "f16", Some(&db));
    let plain = compile_with("bert", "cuda:h100", "f16", None);
    let wg_steps = |a: &kiln::Artifact| -> Vec<kiln_runtime::GpuStep> {
        steps(a)
            .into_iter()
            .filter(|s| s.kernel.starts_with("kiln_gemm_wgmma"))
            .collect()
    };
    let (t_steps, p_steps) = (wg_steps(&art), wg_steps(&plain));
    assert_eq!(t_steps.len(), p_steps.len());
    // Every wgmma GEMM is tuned, those with a fused residual or activation too.
    assert!(
        p_steps
            .iter()
            .any(|p| !(p.kernel.ends_with("_bias") || p.kernel.ends_with("_plain"))),
        "bert f16 has fused-epilogue GEMMs"
    );
    let pairs: Vec<_> = t_steps.iter().zip(&p_steps).collect();
    assert!(!pairs.is_empty());
    let mut differ = 0;
    for (s, p) in pairs {
        assert!(s.kernel.contains("_bn128_s2_"), "{}", s.kernel);
        assert!(p.kernel.contains("_bn64_s4_v4_"), "{}", p.kernel);
        let kiln_runtime::GpuArg::TensorMap { dims, .. } = &s.args[1] else {
            panic!("wgmma B is a tensor map")
        };
        let n = dims[0];
        assert_eq!(u64::from(s.grid[0]), n.div_ceil(128));
        assert_eq!(u64::from(p.grid[0]), n.div_ceil(64));
        differ += usize::from(s.grid != p.grid);
        assert!(s.shared_bytes < p.shared_bytes);
    }
    assert!(differ > 0, "some launch grid changes (N > 64)");
    let report = art.report().unwrap().to_string();
    assert!(report.contains("tuned schedules:"), "{report}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn measurer_without_gpu_says_so() {
    if kiln_runtime::cuda::device_count() > 0 {
        println!("SKIPPED: a CUDA device is present");
        return;
    }
    let root = tmp("gpu_tune_nogpu");
    let m = export(
        "mlp",
        Precision::F32,
        "cuda:h100",
        &root.join("b"),
        &root.join("t.db"),
        1,
    );
    assert!(!m.tasks.is_empty());
    let e = kiln_runtime::tune_measure::measure_bundle(
        &root.join("b"),
        Default::default(),
        None,
        |_, _, _| {},
    )
    .unwrap_err();
    assert!(e.contains("no CUDA device"), "{e}");
    // The CLI writes the same bundle with --export.
    let cli = root.join("cli");
    let (ok, out) = kiln(&[
        "tune",
        zoo("mlp").to_str().unwrap(),
        "--target",
        "cuda:h100",
        "--export",
        cli.to_str().unwrap(),
        "--candidates",
        "2",
        "--db",
        root.join("t.db").to_str().unwrap(),
    ]);
    assert!(ok && out.contains("wrote a bundle of"), "{out}");
    let mc = Manifest::load(&cli).unwrap();
    assert_eq!(mc.tasks.len(), m.tasks.len());
    // Bad bundles are refused naming the file.
    let first = &mc.tasks[0].candidates[0].ptx;
    std::fs::remove_file(cli.join(first)).unwrap();
    let e = Manifest::load(&cli).unwrap_err().to_string();
    assert!(e.contains(first.as_str()) && e.contains("missing"), "{e}");
    let text = std::fs::read_to_string(cli.join("manifest.json")).unwrap();
    std::fs::write(
        cli.join("manifest.json"),
        text.replace("\"format\": 1", "\"format\": 99"),
    )
    .unwrap();
    let e = Manifest::load(&cli).unwrap_err().to_string();
    assert!(
        e.contains("manifest.json") && e.contains("format 99"),
        "{e}"
    );
    // `kiln tune --target cuda:...` without --export: no GPU here, suggest --export.
    let (ok, out) = kiln(&[
        "tune",
        zoo("mlp").to_str().unwrap(),
        "--target",
        "cuda:h100",
        "--db",
        root.join("t.db").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        out.contains("no CUDA device") && out.contains("--export"),
        "{out}"
    );
    // The runtime-only measurer binary, if built (cargo build --release -p kiln-runtime
    // --features cuda --example gpu_measure): exit status 2 and a clear message.
    let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/examples/gpu_measure");
    if exe.is_file() {
        let o = std::process::Command::new(&exe)
            .arg(root.join("b"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("no CUDA device"), "{err}");
    } else {
        println!("SKIPPED (binary part): {} not built", exe.display());
    }
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn a_sku_without_records_ranks_candidates_by_other_skus_records() {
    use rand::SeedableRng;
    let root = tmp("gpu_tune_transfer");
    let db = kiln_tune::TuningDb::open(root.join("t.db")).unwrap();
    // A100 records of mlp's f32 GEMMs: the fastest have bn = 16.
    let a100 = tasks("mlp", Precision::F32, "cuda:a100");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let time = |c: &Config| 1e-5 * (1.0 + ((c.get_or("bn", 64) as f64).log2() - 4.0).abs());
    for t in &a100 {
        let mut n = 0;
        while n < 40 {
            let c = t.space().sample(&mut rng);
            if t.check(&c).is_ok() {
                let o = kiln_tune::Outcome::Ok { seconds: time(&c) };
                db.insert(&kiln_tune::Record::new(
                    t.workload(),
                    "cuda:a100",
                    kiln::tune::KILN_VERSION,
                    c,
                    o,
                ))
                .unwrap();
                n += 1;
            }
        }
    }
    // H100 has none: its candidates after the default are ranked by the A100 model.
    let h100 = tasks("mlp", Precision::F32, "cuda:h100");
    let mut tuner = kiln_tune::Tuner::new(&db, "cuda:h100", kiln::tune::KILN_VERSION);
    let cs = tuner
        .candidates(&h100[0], 6, &kiln_tune::TuneOptions::default(), &[], 0)
        .unwrap();
    assert_eq!(cs[0], h100[0].default_config());
    let bn16 = cs[1..].iter().filter(|c| c.get("bn") == Some(16)).count();
    assert!(
        bn16 >= 3,
        "{bn16} of {} model-ranked candidates have bn = 16: {cs:?}",
        cs.len() - 1
    );
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn a_record_within_the_noise_of_the_default_is_not_used() {
    let root = tmp("gpu_tune_margin");
    let db = root.join("t.db");
    let m = export(
        "mlp",
        Precision::F32,
        "cuda:h100",
        &root.join("b"),
        &root.join("x.db"),
        1,
    );
    let t = &m.tasks[0];
    let f = fields(&t.description);
    let dim = |k: &str| f[k].parse::<u64>().unwrap();
    let untuned = GpuGemmSchedule::for_problem(dim("m"), dim("n"), dim("k"), 132);
    assert_eq!(
        t.candidates[0].config,
        gemm_f32_config(&untuned).0,
        "the untuned default is exported first"
    );
    let other = gemm_f32_config(&GpuGemmSchedule {
        bm: 32,
        bn: 32,
        bk: 8,
        tm: 2,
        tn: 2,
        split_k: 1,
    });
    let mut c = t.candidates[0].clone();
    let mut lines = result_line(&m, t, &c, &MeasureOutcome::Ok { seconds: 1.00e-5 }) + "\n";
    c.config = other.0.clone();
    lines += &result_line(&m, t, &c, &MeasureOutcome::Ok { seconds: 0.99e-5 });
    import(&root, &db, &lines);
    // 1% faster: within MIN_GAIN (3%), the default stays.
    let s = kiln::tune::load_schedules(&db, &m.target).unwrap();
    assert!(s.schedules.is_empty(), "{:?}", s.schedules);
    // 10% faster: used.
    c.config = gemm_f32_config(&GpuGemmSchedule {
        bm: 16,
        ..gemm_f32_schedule(&other)
    })
    .0;
    import(
        &root,
        &db,
        &result_line(&m, t, &c, &MeasureOutcome::Ok { seconds: 0.9e-5 }),
    );
    let s = kiln::tune::load_schedules(&db, &m.target).unwrap();
    assert_eq!(
        s.schedules.get(&t.workload).map(|c| c.0.clone()),
        Some(c.config)
    );
    std::fs::remove_dir_all(&root).ok();
}

/// Exports `model`'s tasks at `precision` for `target`, records `config` as the fastest of
/// every task of `kind`, and returns the GPU steps that `keep` selects of the model
/// compiled with those records and without: `(tuned, plain)`.
fn recorded_steps(
    model: &str,
    precision: Precision,
    target: &str,
    kind: &str,
    config: Config,
    keep: impl Fn(&kiln_runtime::GpuStep) -> bool,
) -> (Vec<kiln_runtime::GpuStep>, Vec<kiln_runtime::GpuStep>) {
    let root = tmp(&format!("gpu_tune_{kind}"));
    let db = root.join("tuning.db");
    let m = export(
        model,
        precision,
        target,
        &root.join(model),
        &root.join("x.db"),
        1,
    );
    let picks: Vec<(usize, Config)> = (0..m.tasks.len())
        .filter(|&i| m.tasks[i].kind == kind)
        .map(|i| (i, config.clone()))
        .collect();
    assert!(!picks.is_empty(), "no {kind} task in {model}");
    import(&root, &db, &results(&m, &picks));
    let steps = |a: &kiln::Artifact| -> Vec<kiln_runtime::GpuStep> {
        a.inner()
            .plan
            .gpu
            .clone()
            .unwrap()
            .steps
            .into_iter()
            .filter(|s| keep(s))
            .collect()
    };
    let p = precision.name();
    let plain = compile_with(model, target, p, None);
    let art = compile_with(model, target, p, Some(&db));
    let report = art.report().unwrap().to_string();
    assert!(report.contains("tuned schedules: "), "{report}");
    std::fs::remove_dir_all(&root).ok();
    (steps(&art), steps(&plain))
}

/// Tensor-core convs (resnet at bf16 on A100) are tuned like the others: a record making
/// 2 warps × 8 channel tiles the fastest turns every `conv2d_mma` launch into 64-thread
/// blocks over 32 pixels × 64 channels.
#[test]
fn tensor_core_conv_records_are_used() {
    let tuned = ConvMmaSchedule {
        warps: 2,
        n_tiles: 8,
        x_f32: false,
    };
    let (t, p) = recorded_steps(
        "resnet",
        Precision::BF16,
        "cuda:a100",
        "gpu_conv2d_mma",
        tuned.to_config(),
        |s| s.kernel.contains("conv") && s.block[0] % 32 == 0 && s.block[1] == 1,
    );
    assert_eq!(t.len(), p.len());
    let tc: Vec<_> = t
        .iter()
        .zip(&p)
        .filter(|(_, p)| p.block == [128, 1, 1])
        .collect();
    assert!(!tc.is_empty(), "{p:?}");
    for (s, _) in &tc {
        assert_eq!(s.block, [64, 1, 1], "{}", s.kernel);
    }
}

/// The fused row attention is a tuning task (threads per block × threads per row): bert's
/// attentions with a `64 × 4` record launch 64-thread blocks and 4 threads per query row.
#[test]
fn attention_records_are_used() {
    let tuned = RowAttentionSchedule {
        block: 64,
        kv_split: 4,
    };
    let (t, p) = recorded_steps(
        "bert",
        Precision::F32,
        "cuda:h100",
        "gpu_row_attention",
        kiln_codegen::gpu::tuning::row_attention_config(&tuned),
        |s| s.kernel.ends_with("_attention"),
    );
    assert!(!p.is_empty() && t.len() == p.len());
    for (s, d) in t.iter().zip(&p) {
        assert_eq!(d.block, [128, 1, 1], "{}", d.kernel);
        assert_eq!(s.block, [64, 1, 1], "{}", s.kernel);
        // 4 threads per row in blocks of 64 instead of 1 in blocks of 128: 8× the blocks
        // (up to the last partial block)
        assert!(
            s.grid[0] >= 8 * d.grid[0] - 7,
            "{:?} vs {:?}",
            s.grid,
            d.grid
        );
    }
}

/// Split-K is tuned where the epilogue allows it (no activation, no residual): a record with
/// `split_k = 4` makes the lowering zero the output (`kiln_zero_f32`) and launch 4 K-slices
/// adding into it; the emulated model computes what the default schedule does and what the
/// interpreter does. A GEMM with a fused Relu refuses split-K.
#[test]
fn split_k_records_zero_the_output_first() {
    use kiln_codegen::gpu::tuning::{mma_schedule, GpuSchedules};
    let graph = kiln_ir::onnx::load(zoo("mlp")).unwrap();
    let data = zoo("mlp").with_file_name("test_data_set_0");
    let (_, x) = kiln_ir::onnx::load_tensor_pb(data.join("input_0.pb")).unwrap();
    let mut o = opts("mlp", Precision::F16);
    o.shapes.insert(
        graph.values[graph.inputs[0]].name.clone(),
        x.shape().to_vec(),
    );
    let ts = gpu_model_tasks(&zoo("mlp"), &o, "cuda:a100").unwrap();
    let t = ts
        .iter()
        .find(|t| t.tunable.workload.kind == "gpu_gemm_mma" && !t.tunable.label().contains(" epi="))
        .expect("mlp's last Gemm (bias only)");
    let relu = ts
        .iter()
        .find(|t| t.tunable.label().contains(" epi="))
        .expect("mlp's Gemm + Relu");
    let with_split = |t: &GpuTask, k: u32| {
        mma_config(&MmaSchedule {
            split_k: k,
            ..mma_schedule(&t.default_config())
        })
    };
    assert!(t.space().contains(&with_split(t, 4)));
    assert!(t.check(&with_split(t, 4)).is_ok());
    assert!(relu.check(&with_split(relu, 2)).is_err());
    let emulate = |records: HashMap<String, Config>| {
        kiln::gpu_compile::emulate_graph(
            &graph,
            "mlp",
            "cuda:a100",
            &o,
            std::slice::from_ref(&x),
            |l| l.schedules = Some(std::sync::Arc::new(GpuSchedules::new(records))),
        )
        .unwrap()
    };
    let split = emulate(HashMap::from([(
        t.tunable.workload.fingerprint(),
        with_split(t, 4),
    )]));
    let plain = emulate(HashMap::new());
    let launches = &split.lowering.launches;
    let z = launches
        .iter()
        .position(|l| l.kernel == "kiln_zero_f32")
        .expect("a zero-fill launch");
    let gemm = &launches[z + 1];
    assert!(gemm.kernel.starts_with("kiln_gemm_mma"), "{}", gemm.kernel);
    assert_eq!(gemm.grid[2], 4, "{gemm:?}");
    assert!(!plain
        .lowering
        .launches
        .iter()
        .any(|l| l.kernel == "kiln_zero_f32"));
    assert_eq!(split.steps, plain.steps + 1);
    let v = |t: &Tensor| -> Vec<f32> { t.to_f64_vec().iter().map(|&v| v as f32).collect() };
    let want = kiln_ir::interp::run(&graph, std::slice::from_ref(&x)).unwrap();
    let (a, b, w) = (v(&split.outputs[0]), v(&plain.outputs[0]), v(&want[0]));
    kiln_runtime::tune_bundle::compare(&a, &b, 1e-6).unwrap();
    kiln_runtime::tune_bundle::compare(&a, &w, 1e-2).unwrap();
    // The zero-fill kernel assembles for the SKU.
    let Some(px) = ptxas::find_ptxas() else {
        println!("SKIPPED (ptxas part): no ptxas");
        return;
    };
    let sku = kiln::gpu_compile::resolve_sku("cuda:a100").unwrap();
    let zk = kiln_codegen::gpu::lower::precision::zero_kernel();
    let ptx = kiln_codegen::gpu::compile_kernel(&zk, sku).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    ptxas::assemble(&px, scratch.path(), &ptx.text, &ptx.arch, &ptx.entry).unwrap();
}
