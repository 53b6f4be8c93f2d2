//! PTX validation without a GPU: every GPU kernel is generated for every SKU of the device
//! database and assembled with `ptxas -arch=sm_XX -v`; the registers and shared memory
//! `ptxas` reports must fit the SKU's limits.
//!
//! `ptxas` is found at `$KILN_PTXAS`, else `.venv/lib/python3*/site-packages/nvidia/*/bin/ptxas`
//! in the repository, else on `PATH`; without one the test prints `SKIPPED` and passes.
//!
//! Also keeps the PTX fixtures the CUDA runtime test loads (`runtime/tests/ptx/`) in sync
//! with the code generator (`KILN_UPDATE_PTX=1` rewrites them).

use kiln_codegen::gpu::compile_kernel;
use kiln_codegen::gpu::kernels::{all_default, elementwise, gemm};
use kiln_codegen::gpu::DeviceDb;
use std::process::Command;

use crate::ptxas;
use ptxas::{check_fixture, check_limits, find_ptxas, parse_ptxas_v};

#[test]
fn every_kernel_assembles_and_fits_every_sku() {
    let Some(ptxas) = find_ptxas() else {
        println!("SKIPPED: no ptxas (set KILN_PTXAS or run scripts/setup.sh)");
        return;
    };
    let db = DeviceDb::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kernels = all_default().unwrap();
    println!("ptxas: {}", ptxas.display());
    println!(
        "{:<22} {:<10} {:<6} {:>5} {:>8} {:>7} {:>6}",
        "kernel", "sku", "arch", "regs", "smem B", "threads", "spill"
    );
    for sku in db.skus() {
        for k in &kernels {
            let ptx = compile_kernel(k, sku)
                .unwrap_or_else(|e| panic!("{} for {}: {e}", k.name, sku.name));
            let file = dir.path().join(format!("{}_{}.ptx", k.name, sku.name));
            std::fs::write(&file, &ptx.text).unwrap();
            if k.requires.iter().any(|r| r == "mma.sync.f16") {
                let mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32";
                assert!(ptx.text.contains(mma), "{}: no {mma}", k.name);
            }
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
                "ptxas failed on {} for {}:\n{text}",
                k.name,
                sku.name
            );
            let u = parse_ptxas_v(&text, &k.name)
                .unwrap_or_else(|| panic!("cannot parse ptxas -v:\n{text}"));
            println!(
                "{:<22} {:<10} {:<6} {:>5} {:>8} {:>7} {:>6}",
                k.name,
                sku.name,
                sku.arch,
                u.registers,
                u.smem,
                k.threads(),
                u.spill_bytes
            );
            check_limits(&u, k, sku);
        }
    }
}

#[test]
fn larger_gemm_schedules_fit_too() {
    let Some(ptxas) = find_ptxas() else {
        println!("SKIPPED: no ptxas");
        return;
    };
    let db = DeviceDb::builtin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = gemm::GpuGemmSchedule {
        bm: 128,
        bn: 128,
        bk: 8,
        tm: 8,
        tn: 8,
        split_k: 1,
    };
    let k = gemm::gemm_f32("kiln_gemm_f32_128", &s).unwrap();
    // Split-K: slices of K from gpu.block_id z, atomic adds into C.
    let ks = gemm::gemm_f32(
        "kiln_gemm_f32_s4",
        &gemm::GpuGemmSchedule::for_problem(128, 768, 768, 132),
    )
    .unwrap();
    for arch in ["sm_80", "sm_90"] {
        let sku = db.parse_target(&format!("cuda:{arch}")).unwrap();
        let ptxs = compile_kernel(&ks, sku).unwrap();
        assert!(
            ptxs.text.contains("atom.global.add.f32") || ptxs.text.contains("red.global.add.f32"),
            "{}",
            ptxs.text
        );
        let sfile = dir.path().join("s.ptx");
        std::fs::write(&sfile, &ptxs.text).unwrap();
        let out = Command::new(&ptxas)
            .args([&format!("-arch={arch}"), "-o", "/dev/null"])
            .arg(&sfile)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ptx = compile_kernel(&k, sku).unwrap();
        let file = dir.path().join("g.ptx");
        std::fs::write(&file, &ptx.text).unwrap();
        let out = Command::new(&ptxas)
            .args(["-v", &format!("-arch={arch}"), "-o", "/dev/null"])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{text}");
        let u = parse_ptxas_v(&text, &k.name).unwrap();
        println!("{} {arch}: {u:?}", k.name);
        assert!(u.registers * k.threads() <= sku.registers_per_block && u.smem == s.shared_bytes());
    }
}

/// The PTX the CUDA runtime test (`runtime/tests/cuda.rs`) loads, for sm_80 (which the
/// driver JIT-compiles for any newer GPU).
fn runtime_fixtures() -> Vec<(&'static str, String)> {
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:sm_80")
        .unwrap();
    let ew = elementwise::mul_add_relu("kiln_ew_mul_add_relu");
    let gm = gemm::gemm_f32("kiln_gemm_f32", &gemm::GpuGemmSchedule::default()).unwrap();
    vec![
        (
            "elementwise.sm_80.ptx",
            compile_kernel(&ew, sku).unwrap().text,
        ),
        ("gemm_f32.sm_80.ptx", compile_kernel(&gm, sku).unwrap().text),
    ]
}

#[test]
fn runtime_ptx_fixtures_are_current() {
    for (name, text) in runtime_fixtures() {
        check_fixture(name, &text);
    }
}

#[test]
fn ptxas_output_parser() {
    let out = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'k' for 'sm_90'\n\
               ptxas info    : Function properties for k\n    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
               ptxas info    : Used 40 registers, used 1 barriers, 8192 bytes smem, 400 bytes cmem[0]\n";
    let u = parse_ptxas_v(out, "k").unwrap();
    assert_eq!((u.registers, u.smem, u.spill_bytes), (40, 8192, 0));
    assert!(parse_ptxas_v(out, "other").is_none());
}

/// Every kernel of `all_default` declares its shared arrays at least 16-byte aligned (they
/// are read with `ld.shared.v4`, which faults on a smaller alignment; MLIR's default is 4;
/// the dynamic region of the tensor-core GEMMs is 1024-aligned for TMA's swizzle).
#[test]
fn all_shared_arrays_are_16_byte_aligned() {
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:sm_80")
        .unwrap();
    for k in all_default().unwrap() {
        let ptx = compile_kernel(&k, sku).unwrap().text;
        for line in ptx.lines().filter(|l| l.contains(".shared .align")) {
            let align: u32 = line
                .split(".align ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            assert!(
                align >= 16 && align.is_multiple_of(16),
                "{}: {line}",
                k.name
            );
        }
    }
}
