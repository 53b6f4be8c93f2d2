//! PTX validation of the tensor-core GEMMs (`gpu::kernels::gemm_mma`) without a GPU: a
//! representative set of (input, output, epilogue, schedule) combinations × every SKU of
//! the device database, lowered through MLIR and assembled with `ptxas -arch=sm_XX -v`.
//! Checks: the PTX contains `mma.sync` (of the right type), `cp.async`, `ldmatrix` and the
//! `cp.async.wait_group` of the pipeline and declares `.extern .shared` dynamic shared
//! memory; `ptxas` reports no spills, registers within the SKU's limits and no static
//! shared memory (the stages live in dynamic shared memory, checked against the opt-in
//! limit; the wgmma kernels have only their mbarriers, 8 bytes per stage, static).
//!
//! Also keeps the GEMM PTX fixtures of `runtime/tests/cuda.rs` current (`KILN_UPDATE_PTX=1`
//! rewrites them). Skips (visibly) without `ptxas` (same lookup as `gpu_ptx.rs`).

use kiln_codegen::gpu::kernels::epilogue::{Activation, Epilogue, Residual};
use kiln_codegen::gpu::kernels::gemm_mma::{
    gemm_mma, kernel_name, MmaGemm, MmaInput, MmaOutput, MmaSchedule,
};
use kiln_codegen::gpu::kernels::gemm_wgmma::{gemm_wgmma, WgmmaSchedule};
use kiln_codegen::gpu::{compile_kernel, DeviceDb};
use std::process::Command;

use crate::ptxas;
use ptxas::{find_ptxas, repo};

/// `(registers, static smem bytes, spill bytes + stack bytes)` from `ptxas -v`.
fn usage(out: &str) -> Option<(u32, u32, u32)> {
    let before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let mut spill = 0;
    let mut regs = None;
    for line in out.lines() {
        if line.contains("bytes stack frame") {
            spill = before(line, "bytes stack frame")?
                + before(line, "bytes spill stores")?
                + before(line, "bytes spill loads")?;
        }
        if line.contains("Used ") && line.contains(" registers") {
            regs = Some((
                before(line, "registers")?,
                before(line, "bytes smem").unwrap_or(0),
            ));
        }
    }
    regs.map(|(r, s)| (r, s, spill))
}

fn ep(bias: bool, activation: Activation, residual: Residual) -> Epilogue {
    Epilogue {
        bias,
        activation,
        residual,
    }
}

/// The combinations validated for every SKU.
fn representative() -> Vec<MmaGemm> {
    let d = MmaSchedule::default();
    let small = MmaSchedule {
        bm: 64,
        bn: 64,
        bk: 32,
        wm: 2,
        wn: 2,
        stages: 4,
        ..d
    };
    let wide = MmaSchedule {
        bm: 128,
        bn: 256,
        bk: 32,
        wm: 2,
        wn: 4,
        stages: 3,
        ..d
    };
    let deep = MmaSchedule {
        bm: 64,
        bn: 128,
        bk: 64,
        wm: 2,
        wn: 2,
        stages: 5,
        vec_bytes: 8,
        pad_bytes: 0,
        ..d
    };
    let split = MmaSchedule {
        split_k: 4,
        vec_bytes: 8,
        ..small
    };
    use Activation::*;
    use MmaInput::*;
    use MmaOutput as O;
    let cases = [
        (F16, O::F32, Epilogue::none(), d),
        (F16, O::F16, ep(true, Relu, Residual::None), d),
        (
            F16,
            O::F32,
            ep(true, GeluTanh, Residual::AfterActivation),
            wide,
        ),
        (
            F16,
            O::F16,
            ep(true, Silu, Residual::BeforeActivation),
            small,
        ),
        (F16, O::F32, ep(false, Sigmoid, Residual::None), deep),
        (
            F16,
            O::F32,
            ep(true, None, Residual::AfterActivation),
            split,
        ),
        (
            BF16,
            O::BF16,
            ep(true, GeluTanh, Residual::AfterActivation),
            d,
        ),
        (BF16, O::F32, Epilogue::none(), small),
        (TF32, O::F32, ep(true, Relu, Residual::None), d),
        (TF32, O::F32, Epilogue::none(), split),
    ];
    cases
        .iter()
        .map(|(i, o, e, s)| gemm_mma(&kernel_name(*i, *o, s, e), *i, *o, e, s).unwrap())
        .collect()
}

#[test]
fn mma_gemms_assemble_and_fit_every_sku() {
    let Some(ptxas) = find_ptxas() else {
        println!("SKIPPED: no ptxas (set KILN_PTXAS or run scripts/setup.sh)");
        return;
    };
    let db = DeviceDb::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kernels = representative();
    println!(
        "{:<62} {:<10} {:>5} {:>7} {:>7} {:>5}",
        "kernel", "sku", "regs", "dyn smem", "threads", "spill"
    );
    let mut refused = 0;
    for sku in db.skus() {
        for g in &kernels {
            let k = &g.kernel;
            if let Err(e) = g.schedule.validate(g.input, sku) {
                // E.g. 104 KiB of tf32 stages on sm_86 (99 KiB opt-in): refused, not built.
                println!("{:<62} {:<10} refused: {e}", k.name, sku.name);
                refused += 1;
                continue;
            }
            let ptx = compile_kernel(k, sku)
                .unwrap_or_else(|e| panic!("{} for {}: {e}", k.name, sku.name));
            for needle in [
                g.input.ptx_mma(),
                "cp.async.cg.shared.global",
                "cp.async.commit_group",
                "cp.async.wait_group",
                "ldmatrix.sync.aligned.m8n8.x4",
            ] {
                let needle = if g.schedule.vec_bytes != 16 && needle.starts_with("cp.async.cg") {
                    "cp.async.ca.shared.global"
                } else {
                    needle
                };
                assert!(ptx.text.contains(needle), "{}: no {needle}", k.name);
            }
            if g.input != MmaInput::TF32 {
                assert!(ptx.text.contains("ldmatrix.sync.aligned.m8n8.x4.trans"));
            }
            if g.schedule.split_k > 1 {
                assert!(ptx.text.contains("atom.global.add.f32"), "{}", k.name);
            }
            let file = dir.path().join(format!("{}_{}.ptx", k.name, sku.name));
            std::fs::write(&file, &ptx.text).unwrap();
            let out = Command::new(&ptxas)
                .args(["-v", &format!("-arch={}", sku.arch), "-o"])
                .arg(dir.path().join("out.cubin"))
                .arg(&file)
                .output()
                .expect("run ptxas");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "ptxas: {} on {}:\n{text}",
                k.name,
                sku.name
            );
            let (regs, smem, spill) =
                usage(&text).unwrap_or_else(|| panic!("cannot parse ptxas -v:\n{text}"));
            println!(
                "{:<62} {:<10} {:>5} {:>7} {:>7} {:>5}",
                k.name,
                sku.name,
                regs,
                g.dynamic_shared,
                k.threads(),
                spill
            );
            let ctx = format!("{} on {}", k.name, sku.name);
            assert!(
                regs <= sku.max_registers_per_thread,
                "{ctx}: {regs} registers"
            );
            assert!(
                regs * k.threads() <= sku.registers_per_block,
                "{ctx}: registers"
            );
            assert_eq!(smem, 0, "{ctx}: static shared memory");
            assert!(ptx
                .text
                .contains(".extern .shared .align 1024 .b8 kiln_dynamic_smem[]"));
            assert!(
                g.dynamic_shared + smem <= sku.shared_mem_per_block_optin,
                "{ctx}: shared memory"
            );
            assert_eq!(spill, 0, "{ctx}: spills");
            // The schedule's estimate (what `validate` checks) tracks ptxas.
            let est = g.schedule.registers_estimate(g.input);
            assert!(
                regs * 4 <= est * 5 + 64 && regs * 5 + 64 >= est * 4,
                "{ctx}: {regs} registers, estimated {est}"
            );
        }
    }
    // Only the two > 99 KiB schedules, on the four sm_86/sm_89 SKUs.
    assert_eq!(refused, 8, "combinations refused");
}

/// The sm_90 warpgroup GEMMs: assembled for `sm_90a` on every SKU with `wgmma`, refused
/// on the others; the PTX must hold `wgmma.mma_async`, TMA loads and mbarrier waits.
#[test]
fn wgmma_gemms_assemble_for_sm_90a() {
    let Some(ptxas) = find_ptxas() else {
        println!("SKIPPED: no ptxas");
        return;
    };
    let db = DeviceDb::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    use Activation::*;
    let cases = [
        (
            MmaInput::F16,
            MmaOutput::F32,
            Epilogue::none(),
            WgmmaSchedule::default(),
        ),
        (
            MmaInput::BF16,
            MmaOutput::BF16,
            ep(true, GeluTanh, Residual::AfterActivation),
            WgmmaSchedule {
                bn: 64,
                stages: 3,
                vector: 1,
                ..WgmmaSchedule::default()
            },
        ),
        (
            MmaInput::F16,
            MmaOutput::F16,
            ep(true, Relu, Residual::BeforeActivation),
            WgmmaSchedule {
                bn: 128,
                stages: 6,
                vector: 1,
                ..WgmmaSchedule::default()
            },
        ),
        (
            MmaInput::F16,
            MmaOutput::F16,
            ep(true, Relu, Residual::None),
            WgmmaSchedule {
                bn: 128,
                stages: 4,
                vector: 8,
                warpgroups: 2,
                raster: 8,
                producer: 0,
            },
        ),
        (
            MmaInput::BF16,
            MmaOutput::F32,
            ep(false, GeluTanh, Residual::AfterActivation),
            WgmmaSchedule {
                bn: 64,
                stages: 3,
                vector: 1,
                warpgroups: 2,
                raster: 1,
                producer: 0,
            },
        ),
        (
            MmaInput::F16,
            MmaOutput::F16,
            Epilogue::none(),
            WgmmaSchedule {
                bn: 256,
                stages: 4,
                vector: 8,
                warpgroups: 2,
                raster: 8,
                producer: 0,
            },
        ),
        (
            MmaInput::BF16,
            MmaOutput::BF16,
            ep(true, GeluTanh, Residual::AfterActivation),
            WgmmaSchedule {
                bn: 128,
                stages: 4,
                vector: 8,
                warpgroups: 2,
                raster: 8,
                producer: 1,
            },
        ),
    ];
    let mut built = 0;
    for sku in db.skus() {
        for (i, (input, output, e, s)) in cases.iter().enumerate() {
            let g = gemm_wgmma(&format!("kiln_wgmma_{i}"), *input, *output, e, s).unwrap();
            if !sku.has("wgmma") {
                assert!(s.validate(sku).is_err() && compile_kernel(&g.kernel, sku).is_err());
                continue;
            }
            s.validate(sku).unwrap();
            let ptx = compile_kernel(&g.kernel, sku).unwrap();
            let mma = format!(
                "wgmma.mma_async.sync.aligned.m64n{}k16.f32.{}.{}",
                s.bn,
                input.mlir(),
                input.mlir()
            );
            for needle in [
                mma.as_str(),
                "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes",
                "mbarrier.try_wait.parity.shared.b64",
                "wgmma.wait_group.sync.aligned",
            ] {
                assert!(ptx.text.contains(needle), "{}: no {needle}", g.kernel.name);
            }
            let file = dir.path().join(format!("w{i}_{}.ptx", sku.name));
            std::fs::write(&file, &ptx.text).unwrap();
            let out = Command::new(&ptxas)
                .args(["-v", &format!("-arch={}", ptx.arch), "-o"])
                .arg(dir.path().join("w.cubin"))
                .arg(&file)
                .output()
                .expect("run ptxas");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "ptxas: {}:\n{text}", g.kernel.name);
            let (regs, smem, spill) = usage(&text).unwrap();
            println!(
                "{:<16} {:<10} {:<7} regs {regs:>3} smem {:>6}+{smem} spill {spill} ({s:?})",
                g.kernel.name, sku.name, ptx.arch, g.dynamic_shared
            );
            assert!(regs <= sku.max_registers_per_thread && spill == 0);
            // Static shared memory: only the mbarriers (8 bytes each), padded to the
            // 1024-byte alignment of the dynamic region (TMA's 128-byte swizzle needs it;
            // without the padding the H200 reported a misaligned address).
            assert!((8 * s.stages..=1024).contains(&smem), "{smem} B static");
            assert!(regs * s.threads() <= sku.registers_per_block);
            built += 1;
        }
    }
    assert_eq!(built, 21, "seven kernels on the three sm_90 SKUs");
}

/// Launch geometry of a fixture, one manifest line: `file entry bm bn threads dyn_smem
/// split_k`.
fn manifest_line(file: &str, g: &MmaGemm) -> String {
    let s = &g.schedule;
    format!(
        "{file} {} {} {} {} {} {}\n",
        g.kernel.name,
        s.bm,
        s.bn,
        s.threads(),
        g.dynamic_shared,
        s.split_k
    )
}

/// The GEMMs `runtime/tests/cuda.rs` runs (`gemm_mma.manifest`) and the ones
/// `runtime/examples/gemm_bench.rs` times (`gemm_bench.manifest`, f16 → f16), as PTX for
/// sm_80 (JIT-compiled by the driver for newer GPUs). The entry names there must match.
fn runtime_fixtures() -> Vec<(String, String)> {
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:sm_80")
        .unwrap();
    let d = MmaSchedule::default();
    let small = MmaSchedule {
        bm: 64,
        bn: 64,
        bk: 32,
        wm: 2,
        wn: 2,
        stages: 4,
        ..d
    };
    let split = MmaSchedule {
        split_k: 3,
        vec_bytes: 8,
        ..small
    };
    use Activation::*;
    use MmaInput::*;
    use MmaOutput as O;
    let tests = [
        ("mma_f16_f32", F16, O::F32, Epilogue::none(), d),
        (
            "mma_f16_f16_epi",
            F16,
            O::F16,
            ep(true, Silu, Residual::BeforeActivation),
            small,
        ),
        (
            "mma_bf16_bf16_epi",
            BF16,
            O::BF16,
            ep(true, GeluTanh, Residual::AfterActivation),
            d,
        ),
        (
            "mma_tf32_f32_relu",
            TF32,
            O::F32,
            ep(true, Relu, Residual::None),
            small,
        ),
        (
            "mma_f16_f32_splitk",
            F16,
            O::F32,
            ep(true, None, Residual::AfterActivation),
            split,
        ),
    ];
    let bench = [
        d,
        MmaSchedule { bn: 256, ..d },
        MmaSchedule {
            bm: 256,
            wm: 4,
            wn: 2,
            ..d
        },
        MmaSchedule { stages: 4, ..d },
    ];
    let mut out = Vec::new();
    let mut manifest = String::new();
    for (file, i, o, e, s) in tests {
        let g = gemm_mma(&format!("kiln_{file}"), i, o, &e, &s).unwrap();
        let file = format!("gemm_{file}.sm_80.ptx");
        manifest.push_str(&manifest_line(&file, &g));
        out.push((file, compile_kernel(&g.kernel, sku).unwrap().text));
    }
    out.push(("gemm_mma.manifest".into(), manifest));
    let mut manifest = String::new();
    for s in bench {
        let e = Epilogue::none();
        let name = kernel_name(F16, O::F16, &s, &e);
        let g = gemm_mma(&name, F16, O::F16, &e, &s).unwrap();
        let file = format!(
            "bench_{}.sm_80.ptx",
            name.trim_start_matches("kiln_gemm_mma_")
        );
        manifest.push_str(&manifest_line(&file, &g));
        out.push((file, compile_kernel(&g.kernel, sku).unwrap().text));
    }
    out.push(("gemm_bench.manifest".into(), manifest));
    // sm_90a warpgroup GEMMs: `file entry bn threads dyn_smem`; `bench_` ones are timed.
    let h100 = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:sm_90")
        .unwrap()
        .clone();
    let mut manifest = String::new();
    let wg = [
        (
            "gemm_wgmma_f16_f32",
            F16,
            O::F32,
            Epilogue::none(),
            WgmmaSchedule::default(),
        ),
        (
            "gemm_wgmma_bf16_bf16_epi",
            BF16,
            O::BF16,
            ep(true, GeluTanh, Residual::AfterActivation),
            WgmmaSchedule {
                bn: 64,
                stages: 3,
                vector: 1,
                ..WgmmaSchedule::default()
            },
        ),
    ];
    // timed f16 → f16 variants, `(bn, stages, vector, warpgroups, raster, producer)`: the
    // default; 6 stages; 3 stages = 96 KiB, so two blocks fit on an SM and one's epilogue
    // overlaps the other's main loop; bn = 64 with its two 64-row accumulators at 4 stages
    // (96 KiB, two blocks per SM); 16-byte epilogue stores (8 halves per thread and step)
    // instead of 2-byte ones; two consumer warpgroups on a 256×128 tile (one B load feeds
    // twice the wgmma work; 3 and 4 stages of 48 KiB) or on a 128×256 tile (64 rows each,
    // m64n256); bands of 8 tile rows for L2 reuse; last, a producer warpgroup streaming the
    // tiles (warp specialization: a protocol error would hang, so they come after the rest)
    let bench = [
        (128, 4, 1, 1, 1, 0),
        (128, 6, 1, 1, 1, 0),
        (128, 3, 1, 1, 1, 0),
        (64, 4, 1, 1, 1, 0),
        (128, 4, 8, 1, 1, 0),
        (128, 3, 8, 1, 1, 0),
        (128, 4, 8, 1, 8, 0),
        (128, 3, 8, 2, 1, 0),
        (128, 4, 8, 2, 1, 0),
        (128, 4, 8, 2, 8, 0),
        (128, 4, 1, 2, 8, 0),
        (256, 4, 8, 2, 1, 0),
        (256, 3, 8, 2, 1, 0),
        (256, 4, 8, 2, 8, 0),
        (128, 4, 8, 1, 1, 1),
        (128, 4, 8, 2, 1, 1),
        (128, 4, 8, 2, 8, 1),
        (256, 4, 8, 2, 8, 1),
    ]
    .map(
        |(bn, stages, vector, warpgroups, raster, producer)| WgmmaSchedule {
            bn,
            stages,
            vector,
            warpgroups,
            raster,
            producer,
        },
    );
    let names: Vec<String> = bench
        .iter()
        .map(|s| {
            format!(
                "bench_wgmma_f16_f16_bn{}_s{}{}",
                s.bn,
                s.stages,
                kiln_codegen::gpu::tuning::wgmma_tags(s)
            )
        })
        .collect();
    let wg = wg.into_iter().chain(
        bench
            .iter()
            .zip(&names)
            .map(|(s, n)| (n.as_str(), F16, O::F16, Epilogue::none(), *s)),
    );
    for (file, i, o, e, s) in wg {
        let g = gemm_wgmma(&format!("kiln_{file}"), i, o, &e, &s).unwrap();
        let ptx = compile_kernel(&g.kernel, &h100).unwrap();
        let file = format!("{file}.{}.ptx", ptx.arch);
        // launch geometry: `file entry bn rows threads dynamic_shared`
        manifest.push_str(&format!(
            "{file} {} {} {} {} {}\n",
            g.kernel.name,
            s.bn,
            s.rows(),
            s.threads(),
            g.dynamic_shared
        ));
        out.push((file, ptx.text));
    }
    out.push(("gemm_wgmma.manifest".into(), manifest));
    out
}

#[test]
fn runtime_gemm_ptx_fixtures_are_current() {
    let dir = repo().join("runtime/tests/ptx");
    let update = std::env::var_os("KILN_UPDATE_PTX").is_some();
    for (name, text) in runtime_fixtures() {
        let path = dir.join(&name);
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            old == text,
            "{} is stale: rerun with KILN_UPDATE_PTX=1",
            path.display()
        );
    }
}
