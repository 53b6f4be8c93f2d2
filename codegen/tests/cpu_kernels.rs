//! End-to-end tests of the CPU path: MLIR kernels → `.so` → `kiln_runtime::kernel_lib`.

use kiln_codegen::cpu::matmul::{matmul, Epilogue, MatmulSchedule};
use kiln_codegen::cpu::{compile_library, elementwise, CpuOptions};
use kiln_runtime::kernel_lib::{scratch_buffer, KernelLibrary};
use kiln_runtime::AlignedBuf;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;

fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Small schedule so that tests cross every block boundary with small shapes.
fn small_schedule() -> MatmulSchedule {
    MatmulSchedule {
        mr: 6,
        nr: 16,
        mc: 12,
        kc: 7,
        nc: 32,
        vector_width: 8,
        ..MatmulSchedule::default()
    }
}

/// The test kernels and the largest scratch size any of them declares.
fn library_and_scratch() -> &'static (KernelLibrary, u64) {
    static LIB: OnceLock<(KernelLibrary, u64)> = OnceLock::new();
    LIB.get_or_init(|| {
        let kernels = [
            elementwise::mul_add_relu("ew_mul_add_relu"),
            matmul("mm_default", &MatmulSchedule::default(), Epilogue::None),
            matmul("mm_small", &small_schedule(), Epilogue::None),
            matmul("mm_small_bias_relu", &small_schedule(), Epilogue::BiasRelu),
        ];
        let so = compile_library(&kernels, &CpuOptions::default()).expect("compile");
        let scratch = kernels.iter().map(|k| k.signature.scratch_bytes).max();
        (
            KernelLibrary::from_bytes(&so).expect("load"),
            scratch.unwrap_or(0),
        )
    })
}

fn library() -> &'static KernelLibrary {
    &library_and_scratch().0
}

/// A scratch buffer for any test kernel, full of garbage (NaN bit patterns): kernels must not
/// rely on its contents.
fn scratch() -> AlignedBuf {
    let mut s = scratch_buffer(library_and_scratch().1);
    s.as_mut_slice().fill(0xFF);
    s
}

fn reference_matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for p in 0..k {
            let x = a[i * k + p] as f64;
            for j in 0..n {
                c[i * n + j] = (c[i * n + j] as f64 + x * b[p * n + j] as f64) as f32;
            }
        }
    }
    c
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

fn run_matmul(name: &str, m: usize, n: usize, k: usize, bias: bool, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = random(m * k, &mut rng);
    let b = random(k * n, &mut rng);
    let bv = random(n, &mut rng);
    // Poison C: the kernel must overwrite it (no accumulation into garbage).
    let mut c = vec![f32::NAN; m * n];
    let kern = library().kernel(name).unwrap();
    let mut args: Vec<*mut u8> = vec![a.as_ptr() as *mut u8, b.as_ptr() as *mut u8];
    if bias {
        args.push(bv.as_ptr() as *mut u8);
    }
    args.push(c.as_mut_ptr() as *mut u8);
    // SAFETY: buffers sized for dims [m, n, k].
    unsafe {
        kern.call(
            &args,
            &[m as i64, n as i64, k as i64],
            scratch().as_mut_slice(),
        )
    };
    let mut want = reference_matmul(&a, &b, m, n, k);
    if bias {
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (want[i * n + j] + bv[j]).max(0.0);
            }
        }
    }
    assert_close(&c, &want, 1e-4 * (1.0 + (k as f32).sqrt()), name);
}

#[test]
fn elementwise_mul_add_relu() {
    let kern = library().kernel("ew_mul_add_relu").unwrap();
    for (m, n) in [(1, 1), (3, 17), (64, 33), (5, 1000)] {
        let mut rng = rand::rngs::StdRng::seed_from_u64((m * 1000 + n) as u64);
        let a = random(m * n, &mut rng);
        let b = random(m * n, &mut rng);
        let c = random(n, &mut rng);
        let mut y = vec![f32::NAN; m * n];
        let args = [
            a.as_ptr() as *mut u8,
            b.as_ptr() as *mut u8,
            c.as_ptr() as *mut u8,
            y.as_mut_ptr() as *mut u8,
        ];
        // SAFETY: buffers sized for dims [m, n].
        unsafe { kern.call(&args, &[m as i64, n as i64], scratch().as_mut_slice()) };
        let want: Vec<f32> = (0..m * n)
            .map(|i| a[i].mul_add(b[i], c[i % n]).max(0.0))
            .collect();
        assert_close(&y, &want, 1e-6, "elementwise");
    }
}

#[test]
fn missing_kernel_is_an_error() {
    assert!(library().kernel("no_such_kernel").is_err());
}

#[test]
fn matmul_fixed_shapes() {
    for (m, n, k) in [
        (1, 1, 1),
        (6, 16, 7),
        (13, 33, 15),
        (64, 64, 64),
        (100, 70, 300),
    ] {
        run_matmul("mm_default", m, n, k, false, 1);
        run_matmul("mm_small", m, n, k, false, 2);
        run_matmul("mm_small_bias_relu", m, n, k, true, 3);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn matmul_random_shapes(m in 1usize..80, n in 1usize..80, k in 0usize..40, seed in 0u64..1000) {
        run_matmul("mm_small", m, n, k, false, seed);
        run_matmul("mm_small_bias_relu", m, n, k, true, seed);
        run_matmul("mm_default", m, n, k, false, seed);
    }
}

/// The generated kernel agrees with `kiln_ir`'s reference `MatMul` (the interpreter's oracle).
#[test]
fn matmul_matches_ir_reference() {
    use kiln_ir::ops::linalg::LinalgOp;
    use kiln_ir::ops::OpFamily;
    use kiln_ir::Tensor;
    let (m, n, k) = (37, 45, 129);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let a = random(m * k, &mut rng);
    let b = random(k * n, &mut rng);
    let mut c = vec![0f32; m * n];
    let kern = library().kernel("mm_default").unwrap();
    let args = [
        a.as_ptr() as *mut u8,
        b.as_ptr() as *mut u8,
        c.as_mut_ptr() as *mut u8,
    ];
    // SAFETY: buffers sized for dims [m, n, k].
    unsafe {
        kern.call(
            &args,
            &[m as i64, n as i64, k as i64],
            scratch().as_mut_slice(),
        )
    };
    let ta = Tensor::from_vec(&[m, k], a);
    let tb = Tensor::from_vec(&[k, n], b);
    let want = LinalgOp::MatMul.eval(&[Some(&ta), Some(&tb)]).unwrap();
    Tensor::from_vec(&[m, n], c)
        .check_close(&want[0], 1e-4, 1e-4)
        .unwrap();
}
