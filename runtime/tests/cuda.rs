//! The CUDA runtime path (feature `cuda`): runs the code generator's elementwise and f32 GEMM
//! kernels (PTX fixtures in `tests/ptx/`, kept current by `codegen/tests/gpu_ptx.rs`)
//! against CPU references. Without a GPU the tests print `SKIPPED: no CUDA device` and pass.

use kiln_runtime::cuda::{device_count, CudaDevice, CudaError, KernelArg};

const EW_PTX: &str = include_str!("ptx/elementwise.sm_80.ptx");
const GEMM_PTX: &str = include_str!("ptx/gemm_f32.sm_80.ptx");
/// The fixture's schedule: `GpuGemmSchedule::default()` (64×64 block tile, 256 threads).
const GEMM_BM: u32 = 64;
const GEMM_BN: u32 = 64;
const GEMM_THREADS: u32 = 256;

fn device(test: &str) -> Option<CudaDevice> {
    if device_count() == 0 {
        println!("SKIPPED: no CUDA device ({test})");
        return None;
    }
    let dev = CudaDevice::new(0).expect("open device 0");
    println!(
        "{test}: {} ({})",
        dev.name().unwrap_or_default(),
        dev.arch().unwrap_or_default()
    );
    Some(dev)
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn no_device_is_an_error_not_a_panic() {
    if device_count() == 0 {
        assert!(matches!(CudaDevice::new(0), Err(CudaError::NoDevice(_))));
        println!("SKIPPED: no CUDA device (checked that opening one fails cleanly)");
        return;
    }
    let dev = CudaDevice::new(0).unwrap();
    assert!(dev.load_ptx(EW_PTX, "not_there").is_err());
    assert!(dev.load_ptx("garbage", "k").is_err());
}

#[test]
fn elementwise_kernel_matches_cpu() {
    let Some(dev) = device("elementwise") else {
        return;
    };
    let n = 100_003usize;
    let x = values(n, 1);
    let (a, b) = (1.5f32, -0.25f32);
    let k = dev.load_ptx(EW_PTX, "kiln_ew_mul_add_relu").unwrap();
    let xd = dev.upload(&x).unwrap();
    let yd = dev.zeros::<f32>(n).unwrap();
    let args = [
        KernelArg::Buffer(xd.raw()),
        KernelArg::Buffer(yd.raw()),
        KernelArg::F32(a),
        KernelArg::F32(b),
        KernelArg::Index(n as i64),
    ];
    // Fewer blocks than needed: the grid-stride loop covers the rest.
    // SAFETY: arguments match `mul_add_relu`'s parameters; n is the buffers' length.
    unsafe { dev.launch(&k, [64, 1, 1], [256, 1, 1], 0, &args).unwrap() };
    let y = dev.download(&yd).unwrap();
    for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
        let want = (xi * a + b).max(0.0);
        assert!(
            (yi - want).abs() <= 1e-6 * want.abs().max(1.0),
            "y[{i}] = {yi}, want {want}"
        );
    }
}

#[test]
fn gemm_kernel_matches_cpu() {
    let Some(dev) = device("gemm") else { return };
    let k = dev.load_ptx(GEMM_PTX, "kiln_gemm_f32").unwrap();
    // Edge sizes (not multiples of the tiles) and one square size.
    for (m, n, kk) in [(67usize, 130usize, 45usize), (256, 256, 256), (1, 7, 3)] {
        let a = values(m * kk, 2);
        let b = values(kk * n, 3);
        let ad = dev.upload(&a).unwrap();
        let bd = dev.upload(&b).unwrap();
        let cd = dev.zeros::<f32>(m * n).unwrap();
        let args = [
            KernelArg::Buffer(ad.raw()),
            KernelArg::Buffer(bd.raw()),
            KernelArg::Buffer(cd.raw()),
            KernelArg::Index(m as i64),
            KernelArg::Index(n as i64),
            KernelArg::Index(kk as i64),
        ];
        let grid = [
            (n as u32).div_ceil(GEMM_BN),
            (m as u32).div_ceil(GEMM_BM),
            1,
        ];
        // SAFETY: arguments match `gemm_f32`'s parameters and the buffers hold M·K, K·N, M·N.
        unsafe {
            dev.launch(&k, grid, [GEMM_THREADS, 1, 1], 0, &args)
                .unwrap()
        };
        let c = dev.download(&cd).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..kk).map(|p| a[i * kk + p] * b[p * n + j]).sum();
                let got = c[i * n + j];
                assert!(
                    (got - want).abs() <= 1e-4 * (kk as f32),
                    "{m}x{n}x{kk} C[{i},{j}] = {got}, want {want}"
                );
            }
        }
        println!("gemm {m}x{n}x{kk}: ok");
    }
}
