//! Prints single-thread GFLOP/s of Kiln's generated f32 matmul (1024³ by default) for a few
//! schedules, next to this core's measured FMA peak (a register-resident AVX2 FMA loop run in
//! the same process, before and after).
//!
//! Then compares the three MatMul lowerings ([`MatmulLowering`]: Kiln's generator, the
//! transform-dialect schedule, transform dialect + micro-kernel) with the default tile sizes
//! at 256³, 1024³ and a BERT-base FFN shape (M = 512 tokens, K = 768, N = 3072).
//!
//! `cargo run --release -p kiln-codegen --example matmul_gflops [-- SIZE [CPU]]`

use kiln_codegen::cpu::matmul::{matmul, Epilogue, MatmulLowering, MatmulSchedule};
use kiln_codegen::cpu::matmul_transform::matmul_kernel;
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_runtime::kernel_lib::{scratch_buffer, KernelLibrary};
use std::time::Instant;

// The peak loop is shared with `kiln bench` (the `kiln` crate depends on this one, so the
// example includes the file rather than the crate).
#[path = "../../src/bench/peak.rs"]
mod peak;
use peak::CHAINS;

/// Best-of-2 measured peak in GFLOP/s.
fn measure_peak() -> f64 {
    peak::fma_peak_gflops(5_000_000, 2).expect("AVX2 + FMA (checked in main)")
}

fn main() {
    assert!(
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        "this benchmark needs AVX2 + FMA"
    );
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(1024, |s| s.parse().expect("size"));
    let cpu = args.get(2).cloned().unwrap_or_else(|| "x86-64-v3".into());
    let base = MatmulSchedule::default();
    let mut schedules = vec![
        ("6x16 mc96 kc256 nc1024 (default)", base),
        (
            "6x16 mc48 kc512 nc1024",
            MatmulSchedule {
                mc: 48,
                kc: 512,
                ..base
            },
        ),
        (
            "6x16 mc144 kc128 nc2048",
            MatmulSchedule {
                mc: 144,
                kc: 128,
                nc: 2048,
                ..base
            },
        ),
        (
            "4x24 mc96 kc256 nc1024",
            MatmulSchedule {
                mr: 4,
                nr: 24,
                ..base
            },
        ),
        (
            "8x8 mc96 kc256 nc1024",
            MatmulSchedule {
                mr: 8,
                nr: 8,
                ..base
            },
        ),
    ];
    // 16-lane (AVX-512) register tiles, when the target CPU has them
    let avx512 = match cpu.as_str() {
        "native" => is_x86_feature_detected!("avx512f"),
        c => kiln_codegen::cpu::cpu_has_avx512(c),
    };
    if avx512 {
        for (label, mr, nr) in [
            ("12x32 vw16 (AVX-512)", 12, 32),
            ("14x32 vw16 (AVX-512)", 14, 32),
            ("8x32 vw16 (AVX-512)", 8, 32),
            ("6x64 vw16 (AVX-512)", 6, 64),
        ] {
            schedules.push((
                label,
                MatmulSchedule {
                    mr,
                    nr,
                    vector_width: 16,
                    ..base
                },
            ));
        }
    }
    let kernels: Vec<_> = schedules
        .iter()
        .enumerate()
        .map(|(i, (_, s))| matmul(&format!("mm{i}"), s, Epilogue::None))
        .collect();
    let t = Instant::now();
    let opts = CpuOptions {
        cpu: cpu.clone(),
        ..CpuOptions::default()
    };
    let so = compile_library(&kernels, &opts).expect("compile");
    println!(
        "compiled {} kernels for {cpu} in {:.2}s",
        kernels.len(),
        t.elapsed().as_secs_f64()
    );
    let lib = KernelLibrary::from_bytes(&so).expect("load");
    let scratch_bytes = kernels.iter().map(|k| k.signature.scratch_bytes).max();
    let mut scratch = scratch_buffer(scratch_bytes.unwrap_or(0));

    let a: Vec<f32> = (0..n * n).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i % 5) as f32 - 2.0) * 0.2).collect();
    let mut c = vec![0f32; n * n];
    let flops = 2.0 * (n as f64).powi(3);

    // The machines are shared and noisy: interleave the schedules and the peak loop over
    // several rounds and keep each one's best.
    let handles: Vec<_> = (0..schedules.len())
        .map(|i| lib.kernel(&format!("mm{i}")).expect("kernel"))
        .collect();
    let args = [
        a.as_ptr() as *mut u8,
        b.as_ptr() as *mut u8,
        c.as_mut_ptr() as *mut u8,
    ];
    let dims = [n as i64; 3];
    let mut best = vec![f64::INFINITY; schedules.len()];
    let mut peak = 0f64;
    for _ in 0..10 {
        for (k, t_best) in handles.iter().zip(best.iter_mut()) {
            peak = peak.max(measure_peak());
            let t = Instant::now();
            // SAFETY: a, b, c are n×n.
            unsafe { k.call(&args, &dims, scratch.as_mut_slice()) };
            *t_best = t_best.min(t.elapsed().as_secs_f64());
        }
    }
    println!(
        "peak ({} loop, {CHAINS} chains, 1 thread): {peak:.1} GFLOP/s",
        peak::peak_isa()
    );
    for ((label, _), t) in schedules.iter().zip(best) {
        let gf = flops / t * 1e-9;
        println!(
            "f32 {n}^3 {label:<34} {:>7.2} ms  {gf:>6.1} GFLOP/s  {:>5.1}% of peak",
            t * 1e3,
            100.0 * gf / peak
        );
    }
    // Spot check one element against a dot product.
    let want: f32 = (0..n).map(|p| a[p] * b[p * n]).sum();
    assert!(
        (c[0] - want).abs() <= 1e-3 * (1.0 + want.abs()),
        "{} vs {want}",
        c[0]
    );
    compare_lowerings(&opts);
}

/// GFLOP/s of each [`MatmulLowering`] (default tile sizes) on a few shapes, best of 10
/// interleaved rounds.
fn compare_lowerings(opts: &CpuOptions) {
    let lowerings = [
        ("generator", MatmulLowering::Generator),
        ("transform (no pack)", MatmulLowering::TransformNoPack),
        ("transform", MatmulLowering::Transform),
        ("transform+ukernel", MatmulLowering::TransformUkernel),
    ];
    let kernels: Vec<_> = lowerings
        .iter()
        .enumerate()
        .map(|(i, &(_, lowering))| {
            let s = MatmulSchedule {
                lowering,
                ..MatmulSchedule::default()
            };
            matmul_kernel(&format!("low{i}"), &s, Epilogue::None)
        })
        .collect();
    let t = Instant::now();
    let so = compile_library(&kernels, opts).expect("compile");
    println!(
        "compiled the {} lowerings in {:.2}s",
        kernels.len(),
        t.elapsed().as_secs_f64()
    );
    let lib = KernelLibrary::from_bytes(&so).expect("load");
    let handles: Vec<_> = (0..lowerings.len())
        .map(|i| lib.kernel(&format!("low{i}")).expect("kernel"))
        .collect();
    println!("lowering comparison (6x16 mc96 kc256 nc1024, 1 thread):");
    for (m, n, k) in [(256, 256, 256), (1024, 1024, 1024), (512, 3072, 768)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 5) as f32 - 2.0) * 0.2).collect();
        let mut c = vec![0f32; m * n];
        let args = [
            a.as_ptr() as *mut u8,
            b.as_ptr() as *mut u8,
            c.as_mut_ptr() as *mut u8,
        ];
        let dims = [m as i64, n as i64, k as i64];
        let flops = 2.0 * (m * n * k) as f64;
        let mut best = vec![f64::INFINITY; lowerings.len()];
        let mut scratch = scratch_buffer(
            kernels
                .iter()
                .map(|k| k.signature.scratch_bytes)
                .max()
                .unwrap_or(0),
        );
        for _ in 0..10 {
            for (h, t_best) in handles.iter().zip(best.iter_mut()) {
                let t = Instant::now();
                // SAFETY: a is m×k, b k×n, c m×n.
                unsafe { h.call(&args, &dims, scratch.as_mut_slice()) };
                *t_best = t_best.min(t.elapsed().as_secs_f64());
            }
        }
        let base = flops / best[0] * 1e-9;
        for ((label, _), t) in lowerings.iter().zip(&best) {
            let gf = flops / t * 1e-9;
            println!(
                "  {m}x{n}x{k} {label:<19} {:>8.2} ms  {gf:>6.1} GFLOP/s  {:>5.1}% of generator",
                t * 1e3,
                100.0 * gf / base
            );
        }
        let want: f32 = (0..k).map(|p| a[p] * b[p * n]).sum();
        assert!((c[0] - want).abs() <= 1e-3 * (1.0 + want.abs()));
    }
}
