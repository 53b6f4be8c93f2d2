//! `--target cuda:SKU` without a GPU: every zoo model is compiled for A100 (sm_80), L4
//! (sm_89) and H100 (sm_90) at every `--precision` (f32, tf32, f16, bf16); the PTX must assemble with `ptxas -arch=sm_XX -v` and every
//! entry's registers and shared memory must fit the SKU (skips visibly without `ptxas`). The
//! generic-path lowering and the plan's buffer wiring are checked against the reference
//! interpreter by running the generic-only plan on the CPU (`kiln::gpu_compile::emulate`).

use crate::common;

use common::{kiln, tmp};
use kiln::compile::CompileOptions;
use kiln::gpu_compile::{emulate, emulate_graph, resolve_sku};
use kiln_codegen::gpu::lower::Precision;
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, GeluApprox, UnaryKind};
use kiln_ir::ops::linalg::{Gemm, LinalgOp};
use kiln_ir::ops::nn::{AutoPad, ConvAttrs, NnOp, WindowAttrs};
use std::path::{Path, PathBuf};
use std::process::Command;

const ZOO: [&str; 5] = ["mlp", "resnet", "mobilenet", "bert", "gpt"];

fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/zoo")
        .join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

use kiln_codegen::gpu::ptxas::find_ptxas;

/// The test inputs of a zoo model and the shapes to compile it with.
fn test_inputs(name: &str) -> (Vec<kiln_ir::Tensor>, CompileOptions) {
    let dir = zoo(name).join("test_data_set_0");
    let ins = kiln::io::read_test_set(&dir, "input").unwrap();
    let g = kiln::load_model(zoo(name).join("model.onnx")).unwrap();
    let mut opts = CompileOptions::default();
    for (&v, t) in g.inputs.iter().zip(&ins) {
        opts.shapes
            .insert(g.values[v].name.clone(), t.shape().to_vec());
    }
    (ins, opts)
}

/// `(registers, shared bytes)` per entry from `ptxas -v` output.
fn ptxas_usage(out: &str) -> Vec<(String, u32, u32)> {
    let mut v = Vec::new();
    let mut cur = String::new();
    for line in out.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            cur = rest.split('\'').next().unwrap_or("").to_string();
        }
        if line.contains("Used ") && line.contains(" registers") {
            let num = |unit: &str| -> u32 {
                line.find(unit)
                    .and_then(|i| line[..i].split_whitespace().last()?.parse().ok())
                    .unwrap_or(0)
            };
            v.push((cur.clone(), num("registers"), num("bytes smem")));
        }
    }
    v
}

#[test]
fn zoo_models_compile_to_ptx_that_ptxas_accepts() {
    let Some(ptxas) = find_ptxas() else {
        println!("SKIPPED: no ptxas (set KILN_PTXAS or run scripts/setup.sh)");
        return;
    };
    let dir = tmp("gpu_compile");
    for name in ZOO {
        let (_, opts) = test_inputs(name);
        for (target, prec) in ["cuda:a100", "cuda:l4", "cuda:h100"]
            .into_iter()
            .flat_map(|t| Precision::ALL.map(|p| (t, p)))
        {
            let sku = resolve_sku(target).unwrap();
            let mut c = kiln::Compiler::new()
                .target(target)
                .unwrap()
                .precision(prec.name())
                .unwrap();
            for (k, v) in &opts.shapes {
                c = c.shape(k.clone(), v.clone());
            }
            let model = zoo(name).join("model.onnx");
            let art = c
                .compile(model.as_path())
                .unwrap_or_else(|e| panic!("{name} {target} {prec:?}: {e}"));
            assert_eq!(art.target(), format!("cuda:{}", sku.name));
            let report = art.report().unwrap().to_string();
            assert!(report.contains("generic-path kernels"), "{report}");
            // Every zoo MatMul/Gemm runs on tensor cores at a tensor-core precision.
            let tc_line = report
                .lines()
                .find(|l| l.contains(&format!("precision {}:", prec.name())))
                .unwrap_or_else(|| panic!("{name}: no precision line in {report}"));
            if let Some(input) = prec.mma_input() {
                assert!(tc_line.contains(" 0 not: -"), "{name} {target}: {tc_line}");
                let fused = if matches!(name, "bert" | "gpt") { 4 } else { 0 };
                assert!(
                    tc_line.contains(&format!(" {fused} in fused attention")),
                    "{name} {target}: {tc_line}"
                );
                let ptx = String::from_utf8_lossy(&art.inner().kernels).to_string();
                assert!(
                    ptx.contains(input.ptx_mma()) || ptx.contains("wgmma.mma_async"),
                    "{name} {target} {prec:?}: no {}",
                    input.ptx_mma()
                );
            }
            if target == "cuda:h100" {
                println!("{name} {prec:?}: {tc_line}");
            }
            // Every Conv of the zoo (groups 1 or depthwise) takes a specialized conv kernel.
            let generic_line = report
                .lines()
                .find(|l| l.contains("generic-path kernels"))
                .unwrap();
            assert!(!generic_line.contains("Conv"), "{name}: {generic_line}");
            if target == "cuda:h100" && prec == Precision::F32 {
                println!("{name}: {generic_line}");
            }
            // The fusion groups the tensor-core GEMMs run in their epilogue (mlp: bias + relu,
            // bert: bias + residual, the pooler's bias + tanh), each saving a launch.
            if prec.mma_input().is_some() {
                let fused = match name {
                    "mlp" => 2,
                    "bert" => 5,
                    _ => 0,
                };
                let line = report
                    .lines()
                    .find(|l| l.contains("tensor-core epilogues:"))
                    .unwrap_or_else(|| panic!("{name}: no epilogue line in {report}"));
                assert!(
                    line.contains(&format!(
                        ": {fused} kernels with a fused epilogue, {fused} launches saved"
                    )),
                    "{name} {target}: {line}"
                );
            }
            // At f16 / bf16 every groups-1 zoo Conv runs on tensor cores.
            if matches!(prec, Precision::F16 | Precision::BF16) {
                let conv_line = report
                    .lines()
                    .find(|l| l.contains("convs on tensor cores:"))
                    .unwrap_or_else(|| panic!("{name}: no conv line in {report}"));
                let n = conv_line
                    .split_whitespace()
                    .nth(4)
                    .and_then(|w| w.parse::<usize>().ok())
                    .unwrap();
                assert!(
                    conv_line.contains(&format!(": {n} of {n} "))
                        && conv_line.ends_with("0 not: -"),
                    "{name} {target}: {conv_line}"
                );
                assert_eq!(n > 0, matches!(name, "resnet" | "mobilenet"), "{conv_line}");
                if target == "cuda:h100" {
                    println!("{name} {prec:?}: {conv_line}");
                }
            }
            check_ptx(&ptxas, &dir, name, target, prec, &art);
        }
    }
}

/// Assembles the artifact's PTX with `ptxas -arch=sm_XX -v` (`sm_90a` when it holds a wgmma
/// GEMM) and checks every launch against the SKU: threads per block, grid limits (generic
/// grid-stride launches at most 32 blocks per SM), registers per thread and per block, static
/// shared memory within the default limit and static + dynamic within the opt-in limit.
fn check_ptx(
    ptxas: &Path,
    dir: &Path,
    name: &str,
    target: &str,
    prec: Precision,
    art: &kiln::Artifact,
) {
    let sku = resolve_sku(target).unwrap();
    let inner = art.inner();
    let gp = inner.plan.gpu.as_ref().unwrap();
    assert_eq!(gp.arch, sku.arch);
    let ptx_path = dir.join(format!("{name}.{}.ptx", sku.arch));
    std::fs::write(&ptx_path, &inner.kernels).unwrap();
    // sm_90a when the module holds a wgmma GEMM.
    let ptx_text = String::from_utf8_lossy(&inner.kernels).to_string();
    let chip = ptx_text
        .lines()
        .find_map(|l| l.trim().strip_prefix(".target "))
        .map(|t| {
            t.split(|c: char| c == ',' || c.is_whitespace())
                .next()
                .unwrap()
        })
        .unwrap_or(&sku.arch)
        .to_string();
    assert!(chip.starts_with(&sku.arch), "{name}: .target {chip}");
    let wgmma = ptx_text.contains("wgmma.mma_async");
    assert_eq!(wgmma, chip.ends_with('a'), "{name} {target}");
    if wgmma {
        println!("{name} {target} {prec:?}: wgmma (sm_90a)");
    }
    let out = Command::new(ptxas)
        .args(["-arch", &chip, "-v", "-o", "/dev/null", s(&ptx_path)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} {target}: ptxas failed:\n{text}"
    );
    let usage = ptxas_usage(&text);
    for st in &gp.steps {
        let threads: u32 = st.block.iter().product();
        assert!(
            threads <= sku.max_threads_per_block,
            "{name} {}: block",
            st.kernel
        );
        assert!(st.grid[0] >= 1 && st.grid[1] <= 65535 && st.grid[2] <= 65535);
        if st.generic {
            // Grid-stride: at most 32 blocks per SM, at least one thread per item.
            assert!(
                st.grid[0] <= 32 * sku.sm_count,
                "{name} {}: grid",
                st.kernel
            );
        }
        let (_, regs, smem) = usage
            .iter()
            .find(|u| u.0 == st.kernel)
            .unwrap_or_else(|| panic!("{name}: no ptxas report for {}", st.kernel));
        assert!(
            *regs <= sku.max_registers_per_thread,
            "{name} {}: {regs} registers",
            st.kernel
        );
        assert!(
            regs * threads <= sku.registers_per_block,
            "{name} {}: {regs} x {threads} registers",
            st.kernel
        );
        // Static shared memory within the default limit, dynamic (tensor-core
        // GEMMs, opted into at load) within the opt-in limit.
        assert!(
            *smem <= sku.shared_mem_per_block
                && smem + st.shared_bytes <= sku.shared_mem_per_block_optin,
            "{name} {}: {smem} + {} B shared",
            st.kernel,
            st.shared_bytes
        );
    }
    let max_regs = usage.iter().map(|u| u.1).max().unwrap_or(0);
    println!(
        "{name:10} {target:10} {:5} {:3} launches {:3} entries, max {max_regs} regs, PTX {} B",
        prec.name(),
        gp.steps.len(),
        usage.len(),
        inner.kernels.len()
    );
}

/// Every launch's arguments match its kernel's parameters: count, kind, and element size of
/// each buffer (what the emulation cannot see: it reads the arguments as the lowering wrote
/// them).
fn check_launch_signatures(name: &str, l: &kiln_codegen::gpu::lower::GpuLowering) {
    use kiln_codegen::gpu::lower::LaunchArg;
    use kiln_codegen::gpu::KernelParam;
    for la in &l.launches {
        let k = l
            .kernels
            .iter()
            .find(|k| k.name == la.kernel)
            .unwrap_or_else(|| panic!("{name}: no kernel {}", la.kernel));
        let ok = k.params.len() == la.args.len()
            && k.params.iter().zip(&la.args).all(|(p, a)| match (p, a) {
                (KernelParam::Buffer { elem, .. }, LaunchArg::Buf { elem_bytes, .. }) => {
                    elem.bytes() == *elem_bytes
                }
                (KernelParam::Index(_), LaunchArg::Index(_))
                | (KernelParam::F32(_), LaunchArg::F32(_))
                | (KernelParam::TensorMap(_), LaunchArg::TensorMap { .. }) => true,
                _ => false,
            });
        assert!(
            ok,
            "{name} {}: parameters {:?} but arguments {:?}",
            la.kernel, k.params, la.args
        );
    }
}

/// Max relative error `|a - b| / max(1, |b|)`.
fn rel_err(a: &kiln_ir::Tensor, b: &kiln_ir::Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.to_f64_vec()
        .iter()
        .zip(b.to_f64_vec())
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f64::max)
}

/// Normwise relative error `|a - b|_2 / |b|_2`.
fn norm_err(a: &kiln_ir::Tensor, b: &kiln_ir::Tensor) -> f64 {
    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
    let d: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n.max(1e-30)).sqrt()
}

#[test]
fn generic_gpu_plans_match_the_reference_interpreter_on_the_cpu() {
    emulated_plans_match(false);
}

#[test]
fn specialized_gpu_plans_match_the_reference_interpreter_on_the_cpu() {
    emulated_plans_match(true);
}

fn emulated_plans_match(specialized: bool) {
    for name in ZOO {
        emulated_plan_matches(name, "cuda:h100", Precision::F32, specialized, 1e-4);
    }
}

/// Emulates `name` compiled for `target` at `prec` and compares with the interpreter;
/// returns the largest error.
fn emulated_plan_matches(
    name: &str,
    target: &str,
    prec: Precision,
    specialized: bool,
    tol: f64,
) -> f64 {
    let (ins, mut opts) = test_inputs(name);
    opts.precision = prec;
    let model = zoo(name).join("model.onnx");
    let g = kiln::load_model(&model).unwrap();
    let e = emulate_graph(&g, name, target, &opts, &ins, |l| {
        l.specialized = specialized
    })
    .unwrap_or_else(|e| panic!("{name} {prec:?}: {e:#}"));
    check_launch_signatures(name, &e.lowering);
    let got = e.outputs;
    let want = kiln_ir::interp::run(&g, &ins).unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        let (e, nw) = (rel_err(a, b), norm_err(a, b));
        println!("{name} {target} {prec:?} output {i}: max rel error {e:.2e}, normwise {nw:.2e}");
        // bf16 keeps 8 mantissa bits (f16: 11) and tf32 truncates the activations (the
        // tensor cores drop 13 bits, a biased error; weights are rounded at compile time):
        // their normwise error stays within `tol`, single elements drift further (measured
        // up to 6.5e-2 for gpt's logits in bf16); 10 x `tol` bounds them.
        if matches!(prec, Precision::BF16 | Precision::TF32) {
            assert!(
                nw <= tol && e <= 10.0 * tol,
                "{name} {prec:?} output {i}: {e} / {nw}"
            );
        } else {
            assert!(e <= tol, "{name} {prec:?} output {i}: rel error {e}");
        }
        worst = worst.max(e);
    }
    worst
}

/// Every zoo model at each tensor-core precision (MatMul/Gemm on tf32 / f16 / bf16 inputs
/// with f32 accumulation, emulated as the hardware rounds): within 1e-2 of the interpreter
/// (f16 elementwise; tf32 and bf16 normwise, elementwise 1e-1), and actually rounded (the
/// error is not the f32 path's).
#[test]
fn tensor_core_precisions_emulate_within_1e_2() {
    for name in ZOO {
        for prec in [Precision::TF32, Precision::F16, Precision::BF16] {
            let e = emulated_plan_matches(name, "cuda:h100", prec, true, 1e-2);
            assert!(e > 1e-6, "{name} {prec:?}: error {e}: inputs not rounded?");
        }
    }
    // sm_80 too (the same kernels; a different SKU must not change the plan's semantics).
    emulated_plan_matches("gpt", "cuda:a100", Precision::F16, true, 1e-2);
}

/// The precision option: the tensor-core plan casts activations into a scratch region after
/// the arena, converts weights at compile time, reports the kernels on tensor cores; a CPU
/// target and an unknown precision are clear errors.
#[test]
fn precision_option_plans_casts_and_reports() {
    let (_, opts) = test_inputs("mlp");
    let mut c = kiln::Compiler::new()
        .target("cuda:a100")
        .unwrap()
        .precision("f16")
        .unwrap();
    for (k, v) in &opts.shapes {
        c = c.shape(k.clone(), v.clone());
    }
    let art = c.compile(zoo("mlp").join("model.onnx").as_path()).unwrap();
    let report = art.report().unwrap().to_string();
    assert!(
        report.contains("precision f16: 3 of 3 MatMul/Gemm kernels on tensor cores, 0 in fused attention (f32), 0 not"),
        "{report}"
    );
    let gp = art.inner().plan.gpu.as_ref().unwrap();
    let casts = gp
        .steps
        .iter()
        .filter(|s| s.kernel == "kiln_cast_f32_f16")
        .count();
    assert_eq!(casts, 3, "{:#?}", gp.steps);
    assert!(gp
        .steps
        .iter()
        .any(|s| s.kernel.starts_with("kiln_gemm_mma_f16_f32")));
    // The Gemms' bias runs in the tensor-core kernel's epilogue (no epilogue launch).
    assert!(
        gp.steps
            .iter()
            .any(|s| s.kernel.starts_with("kiln_gemm_mma_f16_f32") && s.kernel.ends_with("_bias")),
        "{:#?}",
        gp.steps
    );
    assert!(art
        .inner()
        .plan
        .weights
        .iter()
        .any(|w| w.name.ends_with("_f16")));
    // On H100 the f16 GEMMs with N, K multiples of 8 take the wgmma kernel: TMA descriptor
    // arguments, which the plan validates (16-byte aligned rows and starts, inside the view).
    let mut c = kiln::Compiler::new()
        .target("cuda:h100")
        .unwrap()
        .precision("f16")
        .unwrap();
    for (k, v) in &opts.shapes {
        c = c.shape(k.clone(), v.clone());
    }
    let art = c.compile(zoo("mlp").join("model.onnx").as_path()).unwrap();
    let mut plan = art.inner().plan.clone();
    let gp = plan.gpu.as_mut().unwrap();
    let step = gp
        .steps
        .iter_mut()
        .find(|s| s.kernel.starts_with("kiln_gemm_wgmma_f16"))
        .expect("a wgmma GEMM on H100");
    let kiln_runtime::GpuArg::TensorMap { row_bytes, .. } = &mut step.args[0] else {
        panic!("{:?}", step.args[0]);
    };
    *row_bytes += 8;
    let e = plan.validate(art.inner().weights.len() as u64).unwrap_err();
    assert!(e.contains("bad tensor map"), "{e}");
    let err = kiln::Compiler::new()
        .precision("f16")
        .unwrap()
        .compile(zoo("mlp").join("model.onnx").as_path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("CPU targets compute in f32 only"), "{err}");
    let err = kiln::Compiler::new()
        .precision("f8")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("expected f32, tf32, f16 or bf16"), "{err}");
    let (ok, text) = kiln(&[
        "compile",
        s(&zoo("mlp").join("model.onnx")),
        "--target",
        "cuda:h100",
        "--precision",
        "bf16",
        "-o",
        s(&tmp("gpu_prec").join("mlp.kiln")),
    ]);
    assert!(ok && text.contains("precision bf16: 3 of 3"), "{text}");
}

#[test]
fn cli_compiles_for_a_cuda_target_and_reports_the_sku() {
    let dir = tmp("gpu_cli");
    let art = dir.join("mlp.kiln");
    let (ok, text) = kiln(&[
        "compile",
        s(&zoo("mlp").join("model.onnx")),
        "--target",
        "cuda:sm_80",
        "-o",
        s(&art),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("target: cuda:a100") && text.contains("arena:"),
        "{text}"
    );
    let (ok, text) = kiln(&[
        "compile",
        s(&zoo("mlp").join("model.onnx")),
        "--target",
        "cuda:v100",
    ]);
    assert!(
        !ok && text.contains("unknown GPU target 'cuda:v100'"),
        "{text}"
    );
    // An op with no GPU lowering: an error naming the kernel and the op.
    let cumsum = Path::new(env!("CARGO_MANIFEST_DIR")).join(".data/node/test_cumsum_1d/model.onnx");
    if cumsum.exists() {
        let (ok, text) = kiln(&[
            "compile",
            s(&cumsum),
            "--target",
            "cuda:h100",
            "-o",
            s(&dir.join("c.kiln")),
        ]);
        assert!(
            !ok && text.contains("kernel k0 (Opaque: CumSum) cannot be lowered to the GPU"),
            "{text}"
        );
    }
    // The CPU runtime refuses it, saying what it is.
    let a = kiln_runtime::Artifact::load(&art).unwrap();
    assert_eq!(a.target, "cuda:a100");
    let e = kiln_runtime::Model::from_artifact(a, "mlp.kiln")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is a GPU artifact"), "{e}");
    // Without a driver, running it is a clear error (or it runs where there is a GPU).
    let (ok, text) = kiln(&["run", s(&art)]);
    assert!(
        ok || text.contains("no CUDA device") || text.contains("compiled for"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn sku_mismatch_is_detected_from_the_device_name() {
    let plan = |sku: &str| {
        let s = resolve_sku(sku).unwrap();
        kiln_runtime::GpuPlan {
            sku: s.name.clone(),
            sku_display: s.display_name.clone(),
            arch: s.arch.clone(),
            steps: vec![],
        }
    };
    let h100 = plan("cuda:h100");
    assert!(h100.check_device("NVIDIA H100 80GB HBM3", "sm_90").is_ok());
    let e = h100
        .check_device("NVIDIA A100-SXM4-80GB", "sm_80")
        .unwrap_err();
    assert!(
        e.contains("h100-sxm") && e.contains("NVIDIA A100-SXM4-80GB"),
        "{e}"
    );
    assert!(h100.check_device("NVIDIA H100 PCIe", "sm_90").is_err());
    assert!(plan("cuda:h100pcie")
        .check_device("NVIDIA H100 PCIe", "sm_90")
        .is_ok());
    assert!(plan("cuda:a100")
        .check_device("NVIDIA A100-SXM4-40GB", "sm_80")
        .is_ok());
    assert!(plan("cuda:a10")
        .check_device("NVIDIA A100-SXM4-40GB", "sm_80")
        .is_err());
    assert!(plan("cuda:l4").check_device("NVIDIA L4", "sm_89").is_ok());
    assert!(plan("cuda:l4")
        .check_device("NVIDIA L40S", "sm_89")
        .is_err());
    assert!(plan("cuda:h200")
        .check_device("NVIDIA H200", "sm_90")
        .is_ok());
}

/// ONNX node tests covering the generic path's op families (broadcasting, Gemm attributes,
/// batched/broadcast MatMul, Slice/Split/Concat/Gather/Transpose/Expand/Pad, pooling, Conv
/// padding and strides, Softmax/LayerNorm axes), each emulated in both modes and compared
/// with the test's expected outputs. Cases the GPU path refuses (clear errors) are listed.
#[test]
fn onnx_node_tests_emulate_correctly_or_are_refused_clearly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(".data/node");
    if !root.is_dir() {
        println!("SKIPPED: no ONNX node tests in .data/node");
        return;
    }
    let prefixes = [
        "test_add_bcast",
        "test_averagepool_2d",
        "test_clip",
        "test_concat_",
        "test_constant_pad",
        "test_edge_pad",
        "test_reflect_pad",
        "test_wrap_pad",
        "test_conv_with",
        "test_erf",
        "test_expand_dim",
        "test_gather_0",
        "test_gather_1",
        "test_gather_2d",
        "test_gather_negative",
        "test_gelu",
        "test_gemm_",
        "test_globalaveragepool",
        "test_hardswish",
        "test_layer_normalization_",
        "test_matmul_2d",
        "test_matmul_3d",
        "test_matmul_4d",
        "test_matmul_bcast",
        "test_maxpool_2d",
        "test_reduce_mean",
        "test_relu",
        "test_sigmoid",
        "test_slice",
        "test_softmax",
        "test_split_",
        "test_tanh",
        "test_transpose",
        "test_where",
        "test_flatten",
        "test_identity",
        "test_constant",
        "test_shape",
        "test_squeeze",
        "test_unsqueeze",
    ];
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            prefixes.iter().any(|x| n.starts_with(x))
                && !n.contains("expanded")
                && !n.contains("sequence")
        })
        .collect();
    dirs.sort();
    let (mut passed, mut refused, mut failed) = (0, Vec::new(), Vec::new());
    let mut passed_f16 = 0;
    for d in &dirs {
        let name = d.file_name().unwrap().to_str().unwrap().to_string();
        let data = d.join("test_data_set_0");
        let (Ok(ins), Ok(want)) = (
            kiln::io::read_test_set(&data, "input"),
            kiln::io::read_test_set(&data, "output"),
        ) else {
            continue;
        };
        let Ok(g) = kiln::load_model(d.join("model.onnx")) else {
            continue;
        };
        let mut opts = CompileOptions::default();
        for (&v, t) in g.inputs.iter().zip(&ins) {
            opts.shapes
                .insert(g.values[v].name.clone(), t.shape().to_vec());
        }
        // MatMul/Gemm node tests also at f16 (odd shapes: tensor cores or a reported
        // fallback to the f32 GEMM, never a wrong result).
        if name.starts_with("test_matmul") || name.starts_with("test_gemm") {
            let mut o16 = opts.clone();
            o16.precision = Precision::F16;
            if let Ok(got) = emulate(&d.join("model.onnx"), "cuda:a100", &o16, &ins, true) {
                let bad = got.len() != want.len()
                    || got
                        .iter()
                        .zip(&want)
                        .any(|(a, b)| a.shape() != b.shape() || norm_err(a, b) > 1e-2);
                if bad {
                    failed.push(format!("{name} (f16)"));
                } else {
                    passed_f16 += 1;
                }
            }
        }
        for specialized in [false, true] {
            match emulate(&d.join("model.onnx"), "cuda:a100", &opts, &ins, specialized) {
                Err(e) => {
                    refused.push(format!("{name}: {e:#}"));
                    break;
                }
                Ok(got) => {
                    let bad = got.len() != want.len()
                        || got
                            .iter()
                            .zip(&want)
                            .any(|(a, b)| a.shape() != b.shape() || rel_err(a, b) > 1e-4);
                    if bad {
                        failed.push(format!("{name} (specialized: {specialized})"));
                    } else if specialized {
                        passed += 1;
                    }
                }
            }
        }
    }
    println!(
        "{passed} node tests match in both modes; {} refused:",
        refused.len()
    );
    for r in &refused {
        println!("  {}", r.lines().last().unwrap_or(r));
    }
    println!("{passed_f16} MatMul/Gemm node tests match at f16");
    assert!(failed.is_empty(), "wrong results: {failed:#?}");
    assert!(passed >= 60, "only {passed} node tests passed");
    assert!(passed_f16 >= 15, "only {passed_f16} f16 node tests passed");
}

/// The attention pattern (Q·Kᵀ scaled and masked → Softmax → ·V, three kernels) is found in
/// both transformers, with its mask (bert: additive `[1,1,1,16]`; gpt: a constant lower
/// triangle = causal), fused into one row-attention launch each, with the reasons the flash
/// kernels do not take them in the compile summary (the emulation tests check the results).
#[test]
fn attention_patterns_are_recognised_and_reported() {
    for (name, mask) in [
        ("bert", "mask additive [1, 1, 1, 16]"),
        ("gpt", "mask causal"),
    ] {
        let (_, opts) = test_inputs(name);
        let mut c = kiln::Compiler::new().target("cuda:h100").unwrap();
        for (k, v) in &opts.shapes {
            c = c.shape(k.clone(), v.clone());
        }
        let art = c.compile(zoo(name).join("model.onnx").as_path()).unwrap();
        let report = art.report().unwrap().to_string();
        let line = report
            .lines()
            .find(|l| l.contains("attention patterns:"))
            .unwrap_or_else(|| panic!("{report}"));
        println!("{name}: {line}");
        assert!(line.contains("2 found, 2 fused"), "{name}: {line}");
        assert_eq!(
            line.matches("one row-attention launch").count(),
            2,
            "{line}"
        );
        assert_eq!(line.matches(mask).count(), 2, "{name}: {line}");
        assert!(line.contains("head dim 16"), "{name}: {line}");
    }
    // No attention in the CNNs.
    let (_, opts) = test_inputs("mlp");
    let mut c = kiln::Compiler::new().target("cuda:h100").unwrap();
    for (k, v) in &opts.shapes {
        c = c.shape(k.clone(), v.clone());
    }
    let art = c.compile(zoo("mlp").join("model.onnx").as_path()).unwrap();
    let report = art.report().unwrap().to_string();
    assert!(report.contains("attention patterns: 0 found"), "{report}");
}

/// A hand-built graph for the tensor-core fusion tests.
struct Gb {
    g: kiln_ir::Graph,
    seed: u64,
}

impl Gb {
    fn new(name: &str) -> Self {
        Gb {
            g: kiln_ir::Graph {
                name: name.into(),
                opset: 17,
                ..kiln_ir::Graph::default()
            },
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Deterministic values in [-1, 1).
    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.seed = self
                    .seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((self.seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn input(&mut self, name: &str, shape: &[usize]) -> kiln_ir::ValueId {
        let v = self.g.add_value(
            name,
            kiln_ir::Fact::new(kiln_ir::DType::F32, kiln_ir::Shape::known(shape)),
        );
        self.g.inputs.push(v);
        v
    }

    fn konst(&mut self, name: &str, shape: &[usize]) -> kiln_ir::ValueId {
        let n = shape.iter().product();
        let t = kiln_ir::Tensor::from_vec(shape, self.values(n));
        self.g.add_const(name, t)
    }

    fn node(&mut self, op: kiln_ir::Op, inputs: &[kiln_ir::ValueId]) -> kiln_ir::ValueId {
        let n = self.g.nodes.len();
        let out = self.g.add_value(
            format!("v{n}"),
            kiln_ir::Fact::new(kiln_ir::DType::F32, kiln_ir::Shape(vec![])),
        );
        self.g.nodes.push(kiln_ir::Node {
            name: format!("n{n}"),
            op,
            inputs: inputs.iter().map(|&v| Some(v)).collect(),
            outputs: vec![out],
        });
        out
    }

    fn binary(
        &mut self,
        k: BinaryKind,
        a: kiln_ir::ValueId,
        b: kiln_ir::ValueId,
    ) -> kiln_ir::ValueId {
        self.node(kiln_ir::Op::Elementwise(ElementwiseOp::Binary(k)), &[a, b])
    }

    fn unary(&mut self, k: UnaryKind, a: kiln_ir::ValueId) -> kiln_ir::ValueId {
        self.node(kiln_ir::Op::Elementwise(ElementwiseOp::Unary(k)), &[a])
    }

    fn finish(mut self, outputs: &[kiln_ir::ValueId]) -> (kiln_ir::Graph, Vec<kiln_ir::Tensor>) {
        self.g.outputs = outputs.to_vec();
        self.g.infer().expect("infer");
        let shapes: Vec<Vec<usize>> = self
            .g
            .inputs
            .iter()
            .map(|&v| self.g.values[v].fact.shape.as_known().unwrap())
            .collect();
        let ins = shapes
            .iter()
            .map(|s| kiln_ir::Tensor::from_vec(s, self.values(s.iter().product())))
            .collect();
        (self.g, ins)
    }
}

fn gemm(alpha: f32, beta: f32, trans_b: bool) -> kiln_ir::Op {
    kiln_ir::Op::Linalg(LinalgOp::Gemm(Gemm {
        alpha,
        beta,
        trans_a: false,
        trans_b,
    }))
}

/// The targeted graphs: (name, graph, inputs, the fused epilogue's tag).
fn tc_epilogue_graphs() -> Vec<(
    &'static str,
    kiln_ir::Graph,
    Vec<kiln_ir::Tensor>,
    &'static str,
)> {
    let matmul = kiln_ir::Op::Linalg(LinalgOp::MatMul);
    let mut v = Vec::new();
    // MatMul + bias + Gelu (tanh), batch folded into M.
    let mut b = Gb::new("mm_bias_gelu");
    let x = b.input("x", &[3, 5, 64]);
    let w = b.konst("w", &[64, 48]);
    let bias = b.konst("b", &[48]);
    let y = b.node(matmul.clone(), &[x, w]);
    let y = b.binary(BinaryKind::Add, y, bias);
    let y = b.unary(
        UnaryKind::Gelu {
            approximate: GeluApprox::Tanh,
        },
        y,
    );
    let (g, ins) = b.finish(&[y]);
    v.push(("mm_bias_gelu", g, ins, "bias_gelu"));
    // Batched MatMul (one B per batch) + bias + residual Add.
    let mut b = Gb::new("bmm_bias_res");
    let x = b.input("x", &[2, 6, 64]);
    let r = b.input("r", &[2, 6, 40]);
    let w = b.konst("w", &[2, 64, 40]);
    let bias = b.konst("b", &[40]);
    let y = b.node(matmul.clone(), &[x, w]);
    let y = b.binary(BinaryKind::Add, bias, y);
    let y = b.binary(BinaryKind::Add, y, r);
    let (g, ins) = b.finish(&[y]);
    v.push(("bmm_bias_res", g, ins, "bias_res"));
    // Gemm (transB) with C as bias + Relu.
    let mut b = Gb::new("gemm_relu");
    let x = b.input("x", &[8, 64]);
    let w = b.konst("w", &[32, 64]);
    let c = b.konst("c", &[32]);
    let y = b.node(gemm(1.0, 1.0, true), &[x, w, c]);
    let y = b.unary(UnaryKind::Relu, y);
    let (g, ins) = b.finish(&[y]);
    v.push(("gemm_relu", g, ins, "bias_relu"));
    // Gemm + Tanh (bert's pooler).
    let mut b = Gb::new("gemm_tanh");
    let x = b.input("x", &[4, 48]);
    let w = b.konst("w", &[48, 24]);
    let c = b.konst("c", &[24]);
    let y = b.node(gemm(1.0, 1.0, false), &[x, w, c]);
    let y = b.unary(UnaryKind::Tanh, y);
    let (g, ins) = b.finish(&[y]);
    v.push(("gemm_tanh", g, ins, "bias_tanh"));
    // Gemm with alpha, beta and a full C (residual before the activation), then SiLU.
    let mut b = Gb::new("gemm_res_silu");
    let x = b.input("x", &[8, 64]);
    let c = b.input("c", &[8, 32]);
    let w = b.konst("w", &[64, 32]);
    let y = b.node(gemm(0.5, 2.0, false), &[x, w, c]);
    let s = b.unary(UnaryKind::Sigmoid, y);
    let y = b.binary(BinaryKind::Mul, y, s);
    let (g, ins) = b.finish(&[y]);
    v.push(("gemm_res_silu", g, ins, "res_silu"));
    v
}

/// Each targeted graph at every tensor-core precision, on H100 (wgmma where it fits) and
/// A100 (mma.sync): the epilogue runs inside the tensor-core GEMM (one launch fewer than
/// with the fusion off, which keeps only a lone bias in the kernel) and the emulated plan
/// matches the interpreter both ways; the PTX assembles for sm_80, sm_89 and sm_90 within the
/// SKUs' limits.
#[test]
fn tensor_core_gemm_epilogues_are_fused_and_match() {
    let ptxas = find_ptxas();
    let dir = tmp("gpu_tc_epilogue");
    for (name, g, ins, tag) in tc_epilogue_graphs() {
        let want = kiln_ir::interp::run(&g, &ins).unwrap();
        for prec in [Precision::F16, Precision::BF16, Precision::TF32] {
            let opts = CompileOptions {
                precision: prec,
                ..CompileOptions::default()
            };
            for target in ["cuda:h100", "cuda:a100"] {
                let run = |fuse: bool| {
                    emulate_graph(&g, name, target, &opts, &ins, |l| l.fuse_epilogues = fuse)
                        .unwrap_or_else(|e| panic!("{name} {prec:?} {target}: {e:#}"))
                };
                let (on, off) = (run(true), run(false));
                check_launch_signatures(name, &on.lowering);
                check_launch_signatures(name, &off.lowering);
                assert_eq!(
                    on.lowering.fused_epilogues.len(),
                    1,
                    "{name} {prec:?} {target}: {:#?}",
                    on.lowering.launches
                );
                assert_eq!(on.lowering.fused_epilogues[0].1, tag, "{name}");
                assert!(off.lowering.fused_epilogues.is_empty());
                assert_eq!(on.steps + 1, off.steps, "{name} {prec:?} {target}");
                assert!(on.lowering.launches.iter().all(|l| !l.generic), "{name}");
                assert!(
                    on.lowering
                        .launches
                        .iter()
                        .any(|l| l.kernel.starts_with("kiln_gemm_") && l.kernel.ends_with(tag)),
                    "{name}: {:?}",
                    on.lowering
                        .launches
                        .iter()
                        .map(|l| &l.kernel)
                        .collect::<Vec<_>>()
                );
                for (e, how) in [(&on, "fused"), (&off, "unfused")] {
                    let (a, b) = (&e.outputs[0], &want[0]);
                    let (re, nw) = (rel_err(a, b), norm_err(a, b));
                    println!(
                        "{name:14} {target:9} {:4} {how:7} {} launches: max rel {re:.2e}, normwise {nw:.2e}",
                        prec.name(),
                        e.steps
                    );
                    assert!(
                        nw <= 1e-2 && re <= if prec == Precision::F16 { 1e-2 } else { 1e-1 },
                        "{name} {prec:?} {target} {how}: {re} / {nw}"
                    );
                    assert!(re > 1e-7, "{name} {prec:?}: inputs not rounded?");
                }
            }
            if let Some(ptxas) = &ptxas {
                for target in ["cuda:a100", "cuda:l4", "cuda:h100"] {
                    let art = kiln::Compiler::new()
                        .target(target)
                        .unwrap()
                        .precision(prec.name())
                        .unwrap()
                        .compile(&g)
                        .unwrap();
                    check_ptx(ptxas, &dir, name, target, prec, &art);
                }
            }
        }
    }
    if ptxas.is_none() {
        println!("SKIPPED (PTX part): no ptxas");
    }
}

/// Conv + bias + Relu (+ residual) at f16 and bf16: the conv runs on tensor cores
/// (`conv2d_mma`) with the epilogue in the kernel, after one cast launch of its input
/// (constant weights converted at compile time); the emulated plan matches the interpreter;
/// tf32 keeps the f32 conv with the reason; the PTX assembles for every SKU.
#[test]
fn f16_and_bf16_convs_run_on_tensor_cores_with_their_epilogue() {
    let ptxas = find_ptxas();
    let dir = tmp("gpu_tc_conv");
    let conv = |pads: usize, stride: usize| {
        kiln_ir::Op::Nn(NnOp::Conv(ConvAttrs {
            window: WindowAttrs {
                auto_pad: AutoPad::NotSet,
                kernel_shape: None,
                strides: Some(vec![stride; 2]),
                dilations: None,
                pads: Some(vec![pads; 4]),
            },
            group: 1,
        }))
    };
    let mut cases = Vec::new();
    for residual in [false, true] {
        let mut b = Gb::new("conv");
        let x = b.input("x", &[2, 12, 9, 9]);
        let r = residual.then(|| b.input("r", &[2, 20, 9, 9]));
        let w = b.konst("w", &[20, 12, 3, 3]);
        let bias = b.konst("b", &[20]);
        let mut y = b.node(conv(1, 1), &[x, w, bias]);
        if let Some(r) = r {
            y = b.binary(BinaryKind::Add, y, r);
        }
        let y = b.unary(UnaryKind::Relu, y);
        cases.push((
            if residual {
                "conv_bias_res_relu"
            } else {
                "conv_bias_relu"
            },
            b.finish(&[y]),
        ));
    }
    // Weights as a graph input: cast into the scratch region like X.
    let mut b = Gb::new("conv_w_input");
    let x = b.input("x", &[1, 6, 7, 7]);
    let w = b.input("w", &[16, 6, 3, 3]);
    let y = b.node(conv(1, 1), &[x, w]);
    let y = b.unary(UnaryKind::Relu, y);
    cases.push(("conv_w_input_relu", b.finish(&[y])));
    // A strided conv with a non-fusable epilogue (Sigmoid runs in place after it).
    let mut b = Gb::new("conv_s2");
    let x = b.input("x", &[1, 5, 11, 11]);
    let w = b.konst("w", &[10, 5, 3, 3]);
    let y = b.node(conv(0, 2), &[x, w]);
    let y = b.unary(UnaryKind::Sigmoid, y);
    cases.push(("conv_s2_sigmoid", b.finish(&[y])));
    for (name, (g, ins)) in cases {
        let want = kiln_ir::interp::run(&g, &ins).unwrap();
        let opts = |prec| CompileOptions {
            precision: prec,
            ..CompileOptions::default()
        };
        for prec in [Precision::F16, Precision::BF16] {
            let input = prec.mma_input().unwrap();
            let e = emulate_graph(&g, name, "cuda:h100", &opts(prec), &ins, |_| {})
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let kernels: Vec<&str> = e
                .lowering
                .launches
                .iter()
                .map(|l| l.kernel.as_str())
                .collect();
            check_launch_signatures(name, &e.lowering);
            assert_eq!(e.lowering.tensor_core_convs, vec![0], "{name}: {kernels:?}");
            let fused = name != "conv_s2_sigmoid";
            let casts = if name == "conv_w_input_relu" { 2 } else { 1 };
            // Casts, conv (and the in-place epilogue when not fused).
            assert_eq!(
                e.steps,
                casts + 1 + usize::from(!fused),
                "{name}: {kernels:?}"
            );
            assert_eq!(kernels[0], format!("kiln_cast_f32_{}", input.mlir()));
            let (a, b) = (&e.outputs[0], &want[0]);
            let (re, nw) = (rel_err(a, b), norm_err(a, b));
            println!(
                "{name:18} {:4}: {} launches, max rel {re:.2e}, normwise {nw:.2e}",
                prec.name(),
                e.steps
            );
            // f16 elementwise within 1e-2; bf16 (8 mantissa bits) normwise.
            if prec == Precision::F16 {
                assert!(re <= 1e-2 && re > 1e-7, "{name}: {re}");
            } else {
                assert!(nw <= 1e-2 && re <= 1e-1 && re > 1e-7, "{name}: {re} / {nw}");
            }
            if let Some(ptxas) = &ptxas {
                for target in ["cuda:a100", "cuda:l4", "cuda:h100"] {
                    let art = kiln::Compiler::new()
                        .target(target)
                        .unwrap()
                        .precision(prec.name())
                        .unwrap()
                        .compile(&g)
                        .unwrap();
                    let ptx = String::from_utf8_lossy(&art.inner().kernels).to_string();
                    assert!(ptx.contains(input.ptx_mma()), "{name} {target} {prec:?}");
                    let report = art.report().unwrap().to_string();
                    assert!(report.contains("convs on tensor cores: 1 of 1"), "{report}");
                    check_ptx(ptxas, &dir, name, target, prec, &art);
                }
            }
        }
        // tf32: the f32 conv, with the reason.
        let e = emulate_graph(&g, name, "cuda:h100", &opts(Precision::TF32), &ins, |_| {}).unwrap();
        assert!(e.lowering.tensor_core_convs.is_empty());
        assert!(e.lowering.tensor_core_conv_fallbacks[0]
            .1
            .contains("not tf32"));
        assert!(rel_err(&e.outputs[0], &want[0]) <= 1e-4);
    }
}

/// Epilogues the tensor-core kernels cannot express keep the in-place launch after the GEMM
/// (and stay correct): exact (erf) Gelu, a per-column scale input, a residual that is not a
/// kernel input, two activations.
#[test]
fn unexpressible_tensor_core_epilogues_keep_the_in_place_launch() {
    let matmul = kiln_ir::Op::Linalg(LinalgOp::MatMul);
    let mut cases = Vec::new();
    let build = |name: &str, f: &dyn Fn(&mut Gb, kiln_ir::ValueId) -> kiln_ir::ValueId| {
        let mut b = Gb::new(name);
        let x = b.input("x", &[4, 32]);
        let w = b.konst("w", &[32, 16]);
        let bias = b.konst("b", &[16]);
        let y = b.node(matmul.clone(), &[x, w]);
        let y = b.binary(BinaryKind::Add, y, bias);
        let y = f(&mut b, y);
        b.finish(&[y])
    };
    cases.push((
        "gelu_erf",
        build("gelu_erf", &|b, y| {
            b.unary(
                UnaryKind::Gelu {
                    approximate: GeluApprox::None,
                },
                y,
            )
        }),
    ));
    cases.push((
        "column_scale",
        build("column_scale", &|b, y| {
            let sc = b.input("s", &[16]);
            b.binary(BinaryKind::Mul, y, sc)
        }),
    ));
    cases.push((
        "self_residual",
        build("self_residual", &|b, y| {
            let r = b.unary(UnaryKind::Relu, y);
            b.binary(BinaryKind::Add, r, y)
        }),
    ));
    cases.push((
        "two_activations",
        build("two_activations", &|b, y| {
            let r = b.unary(UnaryKind::Relu, y);
            b.unary(UnaryKind::Sigmoid, r)
        }),
    ));
    for (name, (g, ins)) in cases {
        let want = kiln_ir::interp::run(&g, &ins).unwrap();
        let opts = CompileOptions {
            precision: Precision::F16,
            ..CompileOptions::default()
        };
        let e = emulate_graph(&g, name, "cuda:a100", &opts, &ins, |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let kernels: Vec<&str> = e
            .lowering
            .launches
            .iter()
            .map(|l| l.kernel.as_str())
            .collect();
        assert!(e.lowering.fused_epilogues.is_empty(), "{name}: {kernels:?}");
        assert_eq!(e.lowering.tensor_core.len(), 1, "{name}: {kernels:?}");
        assert!(
            kernels.last().unwrap().ends_with("_epilogue"),
            "{name}: {kernels:?}"
        );
        let re = rel_err(&e.outputs[0], &want[0]);
        println!("{name:16} {} launches, max rel {re:.2e}", e.steps);
        assert!(re <= 1e-2, "{name}: {re}");
    }
}

/// `Slice(y, [lo], [hi], [1])` on the columns of a matrix.
fn column_slice(b: &mut Gb, y: kiln_ir::ValueId, lo: i64, hi: i64) -> kiln_ir::ValueId {
    let n = b.g.nodes.len();
    let [st, en, ax] = [lo, hi, 1].map(|v| {
        b.g.add_const(format!("c{n}_{v}"), kiln_ir::Tensor::vec_i64(&[v]))
    });
    let op = kiln_ir::Op::Array(kiln_ir::ops::array::ArrayOp::Slice {
        starts: kiln_ir::ops::array::IntsArg::Input(1),
        ends: kiln_ir::ops::array::IntsArg::Input(2),
        axes: kiln_ir::ops::array::IntsArg::Input(3),
        steps: kiln_ir::ops::array::IntsArg::Default,
    });
    b.node(op, &[y, st, en, ax])
}

/// Slices that split a 1-row product's columns back apart (what merging parallel MatMuls
/// leaves) run no step when they are contiguous and 64-byte aligned — in the CPU plan and
/// in the GPU plan (emulated) — and copy when misaligned; every output matches the
/// interpreter either way.
#[test]
fn contiguous_slices_run_no_step() {
    let build = |cut: i64| {
        let mut b = Gb::new("split_back");
        let x = b.input("x", &[1, 64]);
        let w = b.konst("w", &[64, 48]);
        let y = b.node(kiln_ir::Op::Linalg(LinalgOp::MatMul), &[x, w]);
        let y = b.unary(UnaryKind::Relu, y);
        let s0 = column_slice(&mut b, y, 0, cut);
        let s1 = column_slice(&mut b, y, cut, 48);
        let a = b.unary(UnaryKind::Neg, s0);
        let c = b.unary(UnaryKind::Sigmoid, s1);
        // the product is read again after the slices' readers
        let d = b.unary(UnaryKind::Tanh, y);
        b.finish(&[a, c, d])
    };
    let mut steps = Vec::new();
    for cut in [16i64, 4] {
        let (g, ins) = build(cut);
        let want = kiln_ir::interp::run(&g, &ins).unwrap();
        let gpu = emulate_graph(
            &g,
            "split_back",
            "cuda:h100",
            &CompileOptions::default(),
            &ins,
            |_| {},
        )
        .unwrap_or_else(|e| panic!("cut {cut}: {e:#}"));
        let art = kiln::Compiler::new().compile(&g).unwrap();
        let shape = [1usize, 64];
        let x = ins[0]
            .to_f64_vec()
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>();
        let cpu = art
            .session()
            .unwrap()
            .run(&[kiln::TensorView::from_f32(&shape, &x)])
            .unwrap();
        for (i, w) in want.iter().enumerate() {
            let w = w.to_f64_vec();
            let c = cpu[i].as_f32().unwrap();
            let err = |got: &[f64]| {
                got.iter()
                    .zip(&w)
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                    .fold(0f64, f64::max)
            };
            let e_gpu = err(&gpu.outputs[i].to_f64_vec());
            let e_cpu = err(&c.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
            assert!(
                e_gpu <= 1e-5 && e_cpu <= 1e-5,
                "cut {cut} output {i}: {e_gpu} {e_cpu}"
            );
        }
        steps.push((cut, art.as_runtime().plan.steps.len(), gpu.steps));
    }
    // the cut at 64 bytes elides both slices; at 16 bytes the second slice copies (the
    // first still starts at offset 0)
    let (aligned, misaligned) = (steps[0], steps[1]);
    assert_eq!(aligned.1 + 1, misaligned.1, "CPU steps {steps:?}");
    assert_eq!(aligned.2 + 1, misaligned.2, "GPU steps {steps:?}");
}

/// Three projections of one input (Q/K/V) become one batched product over the stacked
/// weights at `-O2` for a GPU (`merge-stacked-matmul`; its planes are views): one GEMM
/// launch instead of three, outputs equal to the interpreter's (emulated plan, and the CPU
/// artifact of the same graph).
#[test]
fn stacked_projections_are_one_gemm_on_the_gpu() {
    let build = || {
        let mut b = Gb::new("qkv");
        let x = b.input("x", &[16, 64]);
        let ws: Vec<_> = ["wq", "wk", "wv"]
            .iter()
            .map(|n| b.konst(n, &[64, 64]))
            .collect();
        let p: Vec<_> = ws
            .iter()
            .map(|&w| b.node(kiln_ir::Op::Linalg(LinalgOp::MatMul), &[x, w]))
            .collect();
        let s = b.binary(BinaryKind::Add, p[0], p[1]);
        let y = b.binary(BinaryKind::Mul, s, p[2]);
        b.finish(&[y])
    };
    let (g, ins) = build();
    let want = kiln_ir::interp::run(&g, &ins).unwrap();
    let mut steps = Vec::new();
    for level in [0u8, 2] {
        let opts = CompileOptions {
            opt_level: Some(level),
            ..CompileOptions::default()
        };
        let e = emulate_graph(&g, "qkv", "cuda:h100", &opts, &ins, |_| {})
            .unwrap_or_else(|e| panic!("-O{level}: {e:#}"));
        let re = rel_err(&e.outputs[0], &want[0]);
        assert!(re <= 1e-5, "-O{level}: {re}");
        steps.push(e.steps);
    }
    // -O2: one batched GEMM (+ the elementwise kernel) instead of three GEMMs
    assert!(steps[1] + 2 <= steps[0], "launches -O0 / -O2: {steps:?}");
    let art = kiln::Compiler::new().compile(&g).unwrap();
    let x: Vec<f32> = ins[0].to_f64_vec().iter().map(|&v| v as f32).collect();
    let cpu = art
        .session()
        .unwrap()
        .run(&[kiln::TensorView::from_f32(&[16, 64], &x)])
        .unwrap();
    let got: Vec<f64> = cpu[0].as_f32().unwrap().iter().map(|&v| v.into()).collect();
    let w = want[0].to_f64_vec();
    let err = got
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0f64, f64::max);
    assert!(err <= 1e-5, "CPU: {err}");
}

/// On a CPU target the stacked merge is not used (a batched product runs on one thread):
/// three projections of one input compile to compiled kernels only, with no step left to
/// the interpreter.
#[test]
fn stacked_projections_stay_compiled_on_the_cpu() {
    let mut b = Gb::new("qkv_cpu");
    let x = b.input("x", &[16, 64]);
    let outs: Vec<_> = ["wq", "wk", "wv"]
        .iter()
        .map(|n| {
            let w = b.konst(n, &[64, 64]);
            b.node(kiln_ir::Op::Linalg(LinalgOp::MatMul), &[x, w])
        })
        .collect();
    let (g, _) = b.finish(&outs);
    let art = kiln::Compiler::new().compile(&g).unwrap();
    let report = art.report().unwrap().to_string();
    assert!(!report.contains("reference interpreter"), "{report}");
}

/// An f32 product with few output tiles and a long K (BERT's projections: 128 rows) splits K
/// over grid.z: the plan zeroes the output, then the GEMM's slices add into it (the emulated
/// arena starts as NaN, so a missing zero launch shows), then the bias + GELU epilogue runs
/// in place; the result matches the interpreter. A short K keeps one slice and no zeroing.
#[test]
fn f32_gemm_with_few_tiles_splits_k_after_zeroing_the_output() {
    let matmul = kiln_ir::Op::Linalg(LinalgOp::MatMul);
    for (k, split) in [(512usize, 4u32), (64, 1)] {
        let mut b = Gb::new("split_k");
        let x = b.input("x", &[128, k]);
        let w = b.konst("w", &[k, 256]);
        let bias = b.konst("b", &[256]);
        let y = b.node(matmul.clone(), &[x, w]);
        let y = b.binary(BinaryKind::Add, y, bias);
        let y = b.unary(
            UnaryKind::Gelu {
                approximate: GeluApprox::None,
            },
            y,
        );
        let (g, ins) = b.finish(&[y]);
        let want = kiln_ir::interp::run(&g, &ins).unwrap();
        let e = emulate_graph(
            &g,
            "split_k",
            "cuda:h100",
            &CompileOptions::default(),
            &ins,
            |_| {},
        )
        .unwrap();
        let l = &e.lowering.launches;
        let gemm = l
            .iter()
            .position(|la| la.kernel.starts_with("kiln_gemm_f32"))
            .expect("an f32 GEMM launch");
        assert_eq!(l[gemm].grid[2], split, "K = {k}: {:?}", l[gemm]);
        let zeroed = gemm > 0 && l[gemm - 1].kernel.contains("zero");
        assert_eq!(
            zeroed,
            split > 1,
            "K = {k}: launches {:?}",
            l.iter().map(|la| &la.kernel).collect::<Vec<_>>()
        );
        let err = rel_err(&e.outputs[0], &want[0]);
        assert!(err <= 1e-4, "K = {k}: relative error {err}");
    }
}

/// eqsat's stacked projections (`x @ stack(W)`: one A broadcast to three B matrices) are one
/// launch of the batched f32 GEMM, K split across grid.z after a zero launch, and the
/// emulated plan matches the interpreter.
#[test]
fn stacked_projections_are_one_batched_split_k_launch() {
    let matmul = kiln_ir::Op::Linalg(LinalgOp::MatMul);
    let mut b = Gb::new("stacked");
    let x = b.input("x", &[128, 1024]);
    let w = b.konst("w", &[3, 1024, 64]);
    let y = b.node(matmul, &[x, w]);
    let y = b.unary(UnaryKind::Relu, y);
    let (g, ins) = b.finish(&[y]);
    let want = kiln_ir::interp::run(&g, &ins).unwrap();
    let e = emulate_graph(
        &g,
        "stacked",
        "cuda:h100",
        &CompileOptions::default(),
        &ins,
        |_| {},
    )
    .unwrap();
    let names: Vec<&str> = e
        .lowering
        .launches
        .iter()
        .map(|l| l.kernel.as_str())
        .collect();
    let gemms: Vec<_> = e
        .lowering
        .launches
        .iter()
        .filter(|l| l.kernel.starts_with("kiln_gemm_f32"))
        .collect();
    assert_eq!(gemms.len(), 1, "{names:?}");
    assert!(gemms[0].kernel.ends_with("_batched"), "{names:?}");
    // 3 matrices x 8 K slices (2 x 1 tiles of 64 x 64 each: 6 blocks, K = 1024 in 8 x 128)
    assert_eq!(gemms[0].grid, [1, 2, 24]);
    assert!(names[0].contains("zero"), "{names:?}");
    let err = rel_err(&e.outputs[0], &want[0]);
    assert!(err <= 1e-4, "relative error {err}");
}

/// Projections with biases (`x @ Wᵢ + bᵢ`, Q/K/V of a transformer layer) are stacked with
/// their biases at `-O2` for a GPU (`merge-stacked-linear`): one batched GEMM whose
/// epilogue adds the stacked bias, where `-O0` runs three GEMMs; the emulated plans match
/// the interpreter.
#[test]
fn stacked_linear_projections_are_one_gemm_with_the_biases() {
    let mut b = Gb::new("qkv_bias");
    let x = b.input("x", &[32, 128]);
    let mut p = Vec::new();
    for i in 0..3 {
        let w = b.konst(&format!("w{i}"), &[128, 64]);
        let bias = b.konst(&format!("b{i}"), &[64]);
        let y = b.node(kiln_ir::Op::Linalg(LinalgOp::MatMul), &[x, w]);
        p.push(b.binary(BinaryKind::Add, y, bias));
    }
    let s = b.binary(BinaryKind::Add, p[0], p[1]);
    let y = b.binary(BinaryKind::Mul, s, p[2]);
    let (g, ins) = b.finish(&[y]);
    let want = kiln_ir::interp::run(&g, &ins).unwrap();
    let mut gemms = Vec::new();
    for level in [0u8, 2] {
        let opts = CompileOptions {
            opt_level: Some(level),
            ..CompileOptions::default()
        };
        let e = emulate_graph(&g, "qkv_bias", "cuda:h100", &opts, &ins, |_| {})
            .unwrap_or_else(|e| panic!("-O{level}: {e:#}"));
        let re = rel_err(&e.outputs[0], &want[0]);
        assert!(re <= 1e-4, "-O{level}: {re}");
        gemms.push(
            e.lowering
                .launches
                .iter()
                .filter(|l| l.kernel.starts_with("kiln_gemm_f32"))
                .count(),
        );
    }
    assert_eq!(gemms, [3, 1], "f32 GEMM launches at -O0 / -O2");
}

/// The eqsat cost model of a GPU compile follows the precision: the f32 peak and the f32
/// GEMM's split-K for f32, the tensor cores' peak and no split for tf32 / f16 / bf16.
#[test]
fn eqsat_device_follows_the_precision() {
    let h100 = resolve_sku("cuda:h100").unwrap();
    let f32 = kiln::gpu_compile::eqsat_device(h100, Precision::F32);
    assert_eq!(f32.max_split_k, 8);
    assert_eq!(f32.peak_gflops, h100.peak_tflops.f32 * 1e3);
    for p in [Precision::TF32, Precision::F16, Precision::BF16] {
        let d = kiln::gpu_compile::eqsat_device(h100, p);
        assert_eq!(d.max_split_k, 1, "{p:?}");
        assert!(
            d.peak_gflops > 2.0 * f32.peak_gflops,
            "{p:?}: {}",
            d.peak_gflops
        );
    }
}

/// An f32 Conv whose output tiles do not fill the SMs (7×7 output, 128 channels: 4 blocks
/// on 132 SMs, 144 K steps) is three launches: the output zeroed (the plan emulation's
/// arena starts as NaN, so a missing zero launch shows), the split-K conv over grid.z, then
/// bias + residual + Relu in place; a conv with a short reduction keeps one fused launch.
/// Both match the interpreter.
#[test]
fn f32_conv_with_few_tiles_splits_k_after_zeroing_the_output() {
    let conv = kiln_ir::Op::Nn(NnOp::Conv(ConvAttrs {
        window: WindowAttrs {
            auto_pad: AutoPad::NotSet,
            kernel_shape: None,
            strides: None,
            dilations: None,
            pads: Some(vec![1; 4]),
        },
        group: 1,
    }));
    for (c, split) in [(256usize, 8u32), (8, 1)] {
        let mut b = Gb::new("split_conv");
        let x = b.input("x", &[1, c, 7, 7]);
        let r = b.input("r", &[1, 128, 7, 7]);
        let w = b.konst("w", &[128, c, 3, 3]);
        let bias = b.konst("b", &[128]);
        let y = b.node(conv.clone(), &[x, w, bias]);
        let y = b.binary(BinaryKind::Add, y, r);
        let y = b.unary(UnaryKind::Relu, y);
        let (g, ins) = b.finish(&[y]);
        let want = kiln_ir::interp::run(&g, &ins).unwrap();
        let e = emulate_graph(
            &g,
            "split_conv",
            "cuda:h100",
            &CompileOptions::default(),
            &ins,
            |_| {},
        )
        .unwrap();
        let l = &e.lowering.launches;
        let kinds: Vec<&str> = l.iter().map(|la| la.kernel.as_str()).collect();
        check_launch_signatures("split_conv", &e.lowering);
        if split > 1 {
            assert_eq!(kinds.len(), 3, "{kinds:?}");
            assert!(kinds[0].contains("zero"), "{kinds:?}");
            assert!(kinds[1].ends_with(&format!("_conv_s{split}")), "{kinds:?}");
            assert_eq!(l[1].grid[2], split);
            assert!(kinds[2].ends_with("_epilogue"), "{kinds:?}");
        } else {
            assert_eq!(kinds.len(), 1, "{kinds:?}");
        }
        let err = rel_err(&e.outputs[0], &want[0]);
        assert!(err <= 1e-4, "C = {c}: relative error {err}");
    }
}

/// `Pad` in every mode (constant with its fill value, edge, reflect, wrap), on every axis
/// or the ones `axes` names, with negative pads (a crop): compiled CPU kernels (no
/// reference-interpreter fallback) and emulated GPU plans match the interpreter, and the
/// GPU kernel's PTX assembles. Pads of a runtime weight appear when eqsat enlarges a 1×1
/// kernel to 3×3 (`conv-enlarge`) for the GPU cost model.
#[test]
fn pad_in_every_mode_compiles_for_cpu_and_gpu() {
    use kiln_ir::ops::array::{ArrayOp, IntsArg, PadMode};
    /// Mode, pads, axes.
    type Case<'a> = (PadMode, &'a [i64], Option<&'a [i64]>);
    let cases: &[Case] = &[
        (PadMode::Constant, &[0, 1, 2, 0, 2, 1], None),
        (PadMode::Constant, &[1, -1, 0, 2], Some(&[1, 2])),
        (PadMode::Edge, &[0, 2, 1, 0, 1, 3], None),
        (PadMode::Reflect, &[0, 2, 1, 0, 1, 2], None),
        (PadMode::Wrap, &[0, 3, 1, 0, 2, 4], None),
        // negative pads crop first, then the mode pads the cropped input
        (PadMode::Wrap, &[-1, 2], Some(&[-1])),
        (PadMode::Reflect, &[0, -1, 1, 0, 1, -1], None),
        (PadMode::Edge, &[0, 0, -2, 0, 2, 1], None),
    ];
    let ptxas = find_ptxas();
    let dir = tmp("gpu_pad");
    for (k, (mode, pads, axes)) in cases.iter().enumerate() {
        let mut b = Gb::new("pad");
        let x = b.input("x", &[2, 3, 4]);
        let y = b.unary(UnaryKind::Tanh, x);
        let p = b.g.add_const("pads", kiln_ir::Tensor::vec_i64(pads));
        let fill = b.g.add_const("fill", kiln_ir::Tensor::scalar(0.75f32));
        let mut ins = vec![y, p, fill];
        if let Some(a) = axes {
            ins.push(b.g.add_const("axes", kiln_ir::Tensor::vec_i64(a)));
        }
        let op = kiln_ir::Op::Array(ArrayOp::Pad {
            mode: *mode,
            pads: IntsArg::Input(1),
            value: 0.0,
            axes: if axes.is_some() {
                IntsArg::Input(3)
            } else {
                IntsArg::Default
            },
        });
        let z = b.node(op, &ins);
        let z = b.unary(UnaryKind::Neg, z);
        let (g, ins) = b.finish(&[z]);
        let want = kiln_ir::interp::run(&g, &ins).unwrap();
        let got = emulate_graph(
            &g,
            "pad",
            "cuda:h100",
            &CompileOptions::default(),
            &ins,
            |_| {},
        )
        .unwrap_or_else(|e| panic!("case {k} ({mode:?}): {e:#}"));
        // the CPU kernel, compiled
        let art = kiln::Compiler::new()
            .reference_kernels(false)
            .compile(&g)
            .unwrap_or_else(|e| panic!("case {k} ({mode:?}) on the CPU: {e:#}"));
        let x: Vec<f32> = ins[0].to_f64_vec().iter().map(|&v| v as f32).collect();
        let cpu = art
            .session()
            .unwrap()
            .run(&[kiln::TensorView::from_f32(&[2, 3, 4], &x)])
            .unwrap();
        let cpu = kiln_ir::Tensor::from_vec(&cpu[0].shape, cpu[0].as_f32().unwrap().to_vec());
        assert!(
            rel_err(&cpu, &want[0]) < 1e-6,
            "case {k} ({mode:?}) on the CPU"
        );
        // and the kernel's PTX assembles
        if let Some(ptxas) = &ptxas {
            let art = kiln::Compiler::new()
                .target("cuda:h100")
                .unwrap()
                .compile(&g)
                .unwrap_or_else(|e| panic!("case {k} ({mode:?}): {e:#}"));
            check_ptx(
                ptxas,
                &dir,
                &format!("pad{k}"),
                "cuda:h100",
                Precision::F32,
                &art,
            );
        }
        assert_eq!(got.outputs[0].shape(), want[0].shape(), "case {k}");
        assert!(
            rel_err(&got.outputs[0], &want[0]) < 1e-6,
            "case {k} ({mode:?}): {:?} vs {:?}",
            got.outputs[0].to_f64_vec(),
            want[0].to_f64_vec()
        );
    }
}
