//! f16 GEMM benchmark: Kiln's tensor-core kernels (`gemm_mma`, a few schedules, and on
//! sm_90 the TMA + `wgmma` kernel `gemm_wgmma`; PTX fixtures listed in
//! `tests/ptx/gemm_bench.manifest` and the `bench_` lines of `gemm_wgmma.manifest`, written
//! by `codegen/tests/gpu_gemm_ptx.rs`) against cuBLAS (`cublasGemmEx`, f16 in/out, f32
//! compute) on the same inputs, timed with CUDA events (warm-up, then the median of the
//! timed runs). Prints TFLOP/s, the ratio to cuBLAS and the largest difference between
//! each kernel's output and cuBLAS's.
//!
//! ```sh
//! cargo run --release -p kiln-runtime --features cuda --example gemm_bench [-- M N K [RUNS]]
//! ```
//!
//! Row-major `C[M,N] = A[M,K] · B[K,N]`; cuBLAS (column-major) computes `Cᵀ = Bᵀ · Aᵀ`.
//! Without a GPU (or without libcublas) it says so and exits with status 2.

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{sys::CUevent_flags, DevicePtr};
use kiln_runtime::cuda::{device_count, CudaDevice, KernelArg};
use std::path::Path;
use std::process::exit;

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

/// Times `launch` (queued on the device's stream): `warm` untimed runs, then the median of
/// `runs` event-timed runs, in milliseconds.
fn time(
    dev: &CudaDevice,
    warm: usize,
    runs: usize,
    mut launch: impl FnMut(),
) -> Result<f32, String> {
    let err = |e: cudarc::driver::DriverError| e.to_string();
    for _ in 0..warm {
        launch();
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = dev.stream().record_event(flags).map_err(err)?;
        launch();
        let end = dev.stream().record_event(flags).map_err(err)?;
        end.synchronize().map_err(err)?;
        ms.push(start.elapsed_ms(&end).map_err(err)?);
    }
    Ok(median(ms))
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse().unwrap_or_else(|_| {
                eprintln!("usage: gemm_bench [M N K [RUNS]] (got '{a}')");
                exit(1)
            })
        })
        .collect();
    let (m, n, k) = match args[..] {
        [] => (4096, 4096, 4096),
        [m, n, k, ..] => (m, n, k),
        _ => {
            eprintln!("usage: gemm_bench [M N K [RUNS]]");
            exit(1)
        }
    };
    let runs = args.get(3).copied().unwrap_or(20).max(1);
    if device_count() == 0 {
        eprintln!("gemm_bench: no CUDA device (no libcuda or no GPU); nothing to measure");
        exit(2);
    }
    if let Err(e) = run(m, n, k, runs) {
        eprintln!("gemm_bench: {e}");
        exit(2);
    }
}

fn run(m: usize, n: usize, k: usize, runs: usize) -> Result<(), String> {
    let dev = CudaDevice::new(0).map_err(|e| e.to_string())?;
    println!(
        "device: {} ({}); f16 GEMM {m}x{n}x{k}, f32 accumulation, f16 output; median of {runs}",
        dev.name().unwrap_or_default(),
        dev.arch().unwrap_or_default()
    );
    let to16 = |v: Vec<f32>| -> Vec<u16> {
        v.into_iter()
            .map(|x| half::f16::from_f32(x).to_bits())
            .collect()
    };
    let e = |x: kiln_runtime::cuda::CudaError| x.to_string();
    let a = dev.upload(&to16(values(m * k, 1))).map_err(e)?;
    let b = dev.upload(&to16(values(k * n, 2))).map_err(e)?;
    let c_ref = dev.zeros::<u16>(m * n).map_err(e)?;
    let mut c = dev.zeros::<u16>(m * n).map_err(e)?;
    let flop = 2.0 * m as f64 * n as f64 * k as f64;
    let tflops = |ms: f32| flop / (f64::from(ms) * 1e-3) / 1e12;

    // cuBLAS.
    let blas = CudaBlas::new(dev.stream().clone())
        .map_err(|e| format!("cuBLAS unavailable (libcublas not found?): {e}"))?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let stream = dev.stream().clone();
    let cublas_gemm = |out: &kiln_runtime::cuda::DeviceBuffer<u16>| {
        let (ap, _ga) = a.slice().device_ptr(&stream);
        let (bp, _gb) = b.slice().device_ptr(&stream);
        // The output is only written by this call, on this stream (a shared borrow suffices
        // to get the address).
        let (cp, _gc) = out.slice().device_ptr(&stream);
        let i = |v: usize| i32::try_from(v).expect("size fits cuBLAS");
        // SAFETY: the pointers are live device allocations of K·N, M·K and M·N f16 values
        // on `stream`; column-major Cᵀ[N,M] = Bᵀ[N,K] · Aᵀ[K,M].
        unsafe {
            blas::gemm_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                i(n),
                i(m),
                i(k),
                (&alpha as *const f32).cast(),
                bp as *const _,
                blas_sys::cudaDataType::CUDA_R_16F,
                i(n),
                ap as *const _,
                blas_sys::cudaDataType::CUDA_R_16F,
                i(k),
                (&beta as *const f32).cast(),
                cp as *mut _,
                blas_sys::cudaDataType::CUDA_R_16F,
                i(n),
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
            .expect("cublasGemmEx");
        }
    };
    let t_blas = time(&dev, 5, runs, || cublas_gemm(&c_ref))?;
    let reference = dev.download(&c_ref).map_err(e)?;
    println!(
        "{:<58} {:>9} {:>8} {:>7} {:>10}",
        "kernel", "ms", "TFLOP/s", "ratio", "max |diff|"
    );
    println!(
        "{:<58} {:>9.3} {:>8.1} {:>7.2} {:>10}",
        "cuBLAS (GemmEx f16, COMPUTE_32F)",
        t_blas,
        tflops(t_blas),
        1.0,
        "-"
    );

    // Kiln's kernels.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ptx");
    let manifest = std::fs::read_to_string(dir.join("gemm_bench.manifest"))
        .map_err(|e| format!("tests/ptx/gemm_bench.manifest: {e}"))?;
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [file, entry, bm, bn, threads, smem, split] = f[..] else {
            return Err(format!("bad manifest line '{line}'"));
        };
        let num = |s: &str| -> Result<u32, String> {
            s.parse()
                .map_err(|_| format!("bad number '{s}' in manifest line '{line}'"))
        };
        let (bm, bn, threads, smem, split) =
            (num(bm)?, num(bn)?, num(threads)?, num(smem)?, num(split)?);
        let ptx = std::fs::read_to_string(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
        let kern = match dev.load_ptx(&ptx, entry) {
            Ok(kern) => kern,
            Err(err) => {
                println!("{entry:<58} load failed: {err}");
                continue;
            }
        };
        // a kernel that writes nothing must not inherit the previous kernel's output
        dev.memset_zeros(&mut c).map_err(e)?;
        let args = [
            KernelArg::Half(a.raw16()),
            KernelArg::Half(b.raw16()),
            KernelArg::Half(c.raw16()),
            KernelArg::Index(m as i64),
            KernelArg::Index(n as i64),
            KernelArg::Index(k as i64),
            KernelArg::Index(0),
            KernelArg::Index(0),
            KernelArg::Index(0),
            KernelArg::F32(1.0),
        ];
        let grid = [
            (n as u32).div_ceil(bn),
            (m as u32).div_ceil(bm),
            split.max(1),
        ];
        let mut failed = None;
        let ms = time(&dev, 3, runs, || {
            // SAFETY: the arguments follow `gemm_mma`'s parameters (no bias, no residual);
            // A, B, C hold M·K, K·N, M·N f16 values.
            if let Err(err) = unsafe { dev.launch(&kern, grid, [threads, 1, 1], smem, &args) } {
                failed = Some(err.to_string());
            }
        })?;
        if let Some(err) = failed {
            println!("{entry:<58} launch failed: {err}");
            continue;
        }
        let out = dev.download(&c).map_err(e)?;
        let diff = max_diff(&out, &reference);
        let name = entry.trim_start_matches("kiln_gemm_mma_");
        println!(
            "{:<58} {:>9.3} {:>8.1} {:>7.2} {:>10.2e}",
            name,
            ms,
            tflops(ms),
            t_blas / ms,
            diff
        );
    }
    // sm_90a warpgroup kernels (TMA + wgmma), only on sm_90.
    let arch = dev.arch().unwrap_or_default();
    let manifest = std::fs::read_to_string(dir.join("gemm_wgmma.manifest"))
        .map_err(|e| format!("tests/ptx/gemm_wgmma.manifest: {e}"))?;
    for line in manifest.lines().filter(|l| l.starts_with("bench_")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [file, entry, bn, rows, threads, smem] = f[..] else {
            return Err(format!("bad manifest line '{line}'"));
        };
        if arch != "sm_90" {
            println!("{entry:<58} skipped: needs sm_90 (this is {arch})");
            continue;
        }
        let num = |s: &str| -> Result<u32, String> {
            s.parse()
                .map_err(|_| format!("bad number '{s}' in manifest line '{line}'"))
        };
        let (bn, rows, threads, smem) = (num(bn)?, num(rows)?, num(threads)?, num(smem)?);
        let ptx = std::fs::read_to_string(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
        let kern = dev.load_ptx(&ptx, entry).map_err(e)?;
        let (m6, n6, k6) = (m as u64, n as u64, k as u64);
        let f16 = kiln_runtime::cuda::Elem16::F16;
        let tma = dev
            .tensor_map_2d(&a, f16, [k6, m6], 2 * k6, [64, rows])
            .map_err(e)?;
        let tmb = dev
            .tensor_map_2d(&b, f16, [n6, k6], 2 * n6, [64, 64])
            .map_err(e)?;
        // a kernel that writes nothing must not inherit the previous kernel's output
        dev.memset_zeros(&mut c).map_err(e)?;
        let args = [
            KernelArg::TensorMap(tma.slice()),
            KernelArg::TensorMap(tmb.slice()),
            KernelArg::Half(c.raw16()),
            KernelArg::Index(m as i64),
            KernelArg::Index(n as i64),
            KernelArg::Index(k as i64),
            KernelArg::F32(1.0),
        ];
        let grid = [(n as u32).div_ceil(bn), (m as u32).div_ceil(rows), 1];
        let mut failed = None;
        let ms = time(&dev, 3, runs, || {
            // SAFETY: the arguments follow `gemm_wgmma`'s parameters (no bias, no
            // residual); the tensor maps describe A and B; C holds M·N f16 values.
            if let Err(err) = unsafe { dev.launch(&kern, grid, [threads, 1, 1], smem, &args) } {
                failed = Some(err.to_string());
            }
        })?;
        if let Some(err) = failed {
            println!("{entry:<58} launch failed: {err}");
            continue;
        }
        let out = dev.download(&c).map_err(e)?;
        let diff = max_diff(&out, &reference);
        println!(
            "{:<58} {:>9.3} {:>8.1} {:>7.2} {:>10.2e}",
            entry.trim_start_matches("kiln_bench_"),
            ms,
            tflops(ms),
            t_blas / ms,
            diff
        );
    }
    Ok(())
}

/// Largest absolute difference between two f16 tensors.
fn max_diff(x: &[u16], y: &[u16]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(&p, &q)| (half::f16::from_bits(p).to_f32() - half::f16::from_bits(q).to_f32()).abs())
        .fold(0.0f32, f32::max)
}
