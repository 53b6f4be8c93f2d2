//! This core's measured f32 peak: a register-resident loop of [`CHAINS`] independent FMA
//! chains (`std::arch`) on the widest vectors the core has — 512-bit AVX-512 where
//! available, else 256-bit AVX2 ([`peak_isa`]) — timed in the calling process.
//!
//! Self-contained (std only) so that `codegen/examples/matmul_gflops.rs`, which cannot
//! depend on the `kiln` crate, includes this same file with `#[path]`.

use std::time::Instant;

/// Number of independent FMA chains: enough to hide 4–5 cycles of latency at 2 FMAs/cycle.
pub const CHAINS: usize = 12;

/// `CHAINS` independent chains of 256-bit FMAs in registers: the f32 FLOP/s one core can
/// reach with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn fma_peak_kernel(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let x = _mm256_set1_ps(std::hint::black_box(0.999_9));
    let y = _mm256_set1_ps(std::hint::black_box(0.000_1));
    let mut a = [_mm256_setzero_ps(); CHAINS];
    for (i, v) in a.iter_mut().enumerate() {
        *v = _mm256_set1_ps(i as f32);
    }
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm256_fmadd_ps(*v, x, y);
        }
    }
    let mut s = 0.0;
    for v in a {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        s += out[0];
    }
    s
}

/// [`fma_peak_kernel`] on 512-bit vectors (AVX-512F).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn fma512_peak_kernel(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let x = _mm512_set1_ps(std::hint::black_box(0.999_9));
    let y = _mm512_set1_ps(std::hint::black_box(0.000_1));
    let mut a = [_mm512_setzero_ps(); CHAINS];
    for (i, v) in a.iter_mut().enumerate() {
        *v = _mm512_set1_ps(i as f32);
    }
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm512_fmadd_ps(*v, x, y);
        }
    }
    a.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

/// Which loop [`fma_peak_gflops`] runs here: `"AVX-512 FMA"`, `"AVX2 FMA"` or `"none"`.
pub fn peak_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return "AVX-512 FMA";
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return "AVX2 FMA";
        }
    }
    "none"
}

/// The best of `reps` timings of `iters` iterations of the FMA loop on the widest vectors
/// ([`peak_isa`]), in GFLOP/s of one thread (16 FLOP per 256-bit FMA, 32 per 512-bit one).
/// `None` if this CPU lacks AVX2 or FMA (or is not x86-64). 5 000 000 iterations take
/// about 15 ms at 4 GHz.
pub fn fma_peak_gflops(iters: u64, reps: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let wide = match peak_isa() {
            "AVX-512 FMA" => true,
            "AVX2 FMA" => false,
            _ => return None,
        };
        let iters = std::hint::black_box(iters.max(1));
        let mut best = 0f64;
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            // SAFETY: the loop's features are available (checked by `peak_isa`).
            let s = unsafe {
                if wide {
                    fma512_peak_kernel(iters)
                } else {
                    fma_peak_kernel(iters)
                }
            };
            let dt = t.elapsed().as_secs_f64();
            std::hint::black_box(s);
            let flop = if wide { 32 } else { 16 };
            best = best.max((iters * CHAINS as u64 * flop) as f64 / dt * 1e-9);
        }
        Some(best)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (iters, reps, Instant::now());
        None
    }
}
