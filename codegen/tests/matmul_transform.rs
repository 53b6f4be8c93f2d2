//! The transform-dialect MatMul variants ([`MatmulLowering::Transform`],
//! [`MatmulLowering::TransformUkernel`]) end to end: MLIR → `.so` → `kernel_lib`, checked
//! against a naive f64-accumulated matmul and `kiln_ir`'s reference `MatMul` on shapes that
//! cross every tile boundary (including K = 0 and sizes below one register tile).

use kiln_codegen::cpu::matmul::{Epilogue, MatmulLowering, MatmulSchedule};
use kiln_codegen::cpu::matmul_transform::matmul_kernel;
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_runtime::kernel_lib::{scratch_buffer, KernelLibrary};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;

/// Scratch for every kernel here (the generator's standalone matmul declares its full
/// packed blocks, about 1.1 MB at the default tiles).
const SCRATCH: u64 = 4 << 20;

const LOWERINGS: [(MatmulLowering, &str); 3] = [
    (MatmulLowering::TransformNoPack, "np"),
    (MatmulLowering::Transform, "xf"),
    (MatmulLowering::TransformUkernel, "uk"),
];

/// Small cache tiles so that small shapes cross every block boundary.
fn small(lowering: MatmulLowering) -> MatmulSchedule {
    MatmulSchedule {
        mr: 6,
        nr: 16,
        mc: 12,
        kc: 7,
        nc: 32,
        vector_width: 8,
        lowering,
    }
}

fn library() -> &'static KernelLibrary {
    static LIB: OnceLock<KernelLibrary> = OnceLock::new();
    LIB.get_or_init(|| {
        let mut kernels = Vec::new();
        for (l, tag) in LOWERINGS {
            let default = MatmulSchedule {
                lowering: l,
                ..MatmulSchedule::default()
            };
            kernels.push(matmul_kernel(
                &format!("{tag}_default"),
                &default,
                Epilogue::None,
            ));
            kernels.push(matmul_kernel(
                &format!("{tag}_small"),
                &small(l),
                Epilogue::None,
            ));
            kernels.push(matmul_kernel(
                &format!("{tag}_small_bias_relu"),
                &small(l),
                Epilogue::BiasRelu,
            ));
            // A 4×8 register tile: another vector count per row.
            let narrow = MatmulSchedule {
                mr: 4,
                nr: 8,
                ..small(l)
            };
            kernels.push(matmul_kernel(
                &format!("{tag}_narrow"),
                &narrow,
                Epilogue::None,
            ));
        }
        let so = compile_library(&kernels, &CpuOptions::default()).expect("compile");
        KernelLibrary::from_bytes(&so).expect("load")
    })
}

fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn reference(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let x = a[i * k + p] as f64;
            for j in 0..n {
                c[i * n + j] += x * b[p * n + j] as f64;
            }
        }
    }
    c.into_iter().map(|x| x as f32).collect()
}

/// Runs kernel `name` on random data and returns `(got, want)`.
fn run(name: &str, m: usize, n: usize, k: usize, bias: bool, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = random(m * k, &mut rng);
    let b = random(k * n, &mut rng);
    let bv = random(n, &mut rng);
    // Poison C: the kernel must overwrite it.
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
            scratch_buffer(SCRATCH).as_mut_slice(),
        )
    };
    let mut want = reference(&a, &b, m, n, k);
    if bias {
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (want[i * n + j] + bv[j]).max(0.0);
            }
        }
    }
    (c, want)
}

fn check(name: &str, m: usize, n: usize, k: usize, bias: bool, seed: u64) {
    let (got, want) = run(name, m, n, k, bias, seed);
    let tol = 1e-4 * (1.0 + (k as f32).sqrt());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{name} {m}x{n}x{k}: element {i} (row {}, col {}): got {g}, want {w}",
            i / n,
            i % n
        );
    }
}

fn check_all(m: usize, n: usize, k: usize, seed: u64) {
    for (_, tag) in LOWERINGS {
        check(&format!("{tag}_small"), m, n, k, false, seed);
        check(&format!("{tag}_small_bias_relu"), m, n, k, true, seed);
        check(&format!("{tag}_narrow"), m, n, k, false, seed);
        check(&format!("{tag}_default"), m, n, k, false, seed);
    }
}

#[test]
fn fixed_shapes() {
    for (m, n, k) in [
        (1, 1, 1),
        (6, 16, 7),
        (5, 15, 3),
        (7, 17, 8),
        (13, 33, 15),
        (12, 32, 14),
        (64, 64, 64),
        (100, 70, 300),
        (3, 2, 0),
    ] {
        check_all(m, n, k, (m * 7 + n * 3 + k) as u64);
    }
}

/// Larger than the default cache tiles (mc = 96, kc = 256) with ragged edges.
#[test]
fn default_tiles_with_edges() {
    for (_, tag) in LOWERINGS {
        check(&format!("{tag}_default"), 197, 1043, 517, false, 11);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn random_shapes(m in 1usize..80, n in 1usize..80, k in 0usize..40, seed in 0u64..1000) {
        check_all(m, n, k, seed);
    }
}

/// Both variants agree with `kiln_ir`'s reference `MatMul` (the interpreter's oracle).
#[test]
fn matches_ir_reference() {
    use kiln_ir::ops::linalg::LinalgOp;
    use kiln_ir::ops::OpFamily;
    use kiln_ir::Tensor;
    let (m, n, k) = (37, 45, 129);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let a = random(m * k, &mut rng);
    let b = random(k * n, &mut rng);
    let ta = Tensor::from_vec(&[m, k], a.clone());
    let tb = Tensor::from_vec(&[k, n], b.clone());
    let want = LinalgOp::MatMul.eval(&[Some(&ta), Some(&tb)]).unwrap();
    for (_, tag) in LOWERINGS {
        let mut c = vec![0f32; m * n];
        let kern = library().kernel(&format!("{tag}_default")).unwrap();
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
                scratch_buffer(SCRATCH).as_mut_slice(),
            )
        };
        Tensor::from_vec(&[m, n], c)
            .check_close(&want[0], 1e-4, 1e-4)
            .unwrap();
    }
}

use crate::common;

/// MatMul/Gemm contraction kernels (fused epilogues, transposed Gemm operands, a row-split
/// kernel, a batched MatMul) lowered with each transform lowering agree with the reference
/// interpreter.
#[test]
fn graph_contractions_with_each_lowering() {
    use common::*;
    use kiln_codegen::cpu::lower::conv::ConvSchedule;
    use kiln_ir::ops::elementwise::{BinaryKind, UnaryKind};
    use kiln_ir::ops::linalg::{Gemm, LinalgOp};
    use kiln_ir::{DType, Op};
    use kiln_passes::fusion::KernelKind;
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut b = Builder::new("mm");
    // Large enough to be split into row tasks.
    let x = b.input("x", DType::F32, &[2, 70, 96]);
    let w = b.konst("w", random_tensor(DType::F32, &[96, 45], &mut rng));
    let bias = b.konst("bias", random_tensor(DType::F32, &[45], &mut rng));
    let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
    let a = b.binary(BinaryKind::Add, mm, bias);
    let r = b.unary(UnaryKind::Relu, a);
    let x2 = b.input("x2", DType::F32, &[13, 9]);
    let w2 = b.konst("w2", random_tensor(DType::F32, &[21, 13], &mut rng));
    let c2 = b.konst("c2", random_tensor(DType::F32, &[21], &mut rng));
    let gm = b.node(
        Op::Linalg(LinalgOp::Gemm(Gemm {
            alpha: 0.5,
            beta: 2.0,
            trans_a: true,
            trans_b: true,
        })),
        &[Some(x2), Some(w2), Some(c2)],
    );
    let q = b.input("q", DType::F32, &[3, 7, 16]);
    let k = b.input("k", DType::F32, &[3, 16, 11]);
    let bmm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(q), Some(k)]);
    let g = b.finish(&[r, gm, bmm]);
    for (lowering, _) in LOWERINGS {
        let mut sched = ConvSchedule::default();
        sched.matmul.lowering = lowering;
        let rep = check_with(&g, &random_inputs(&g, 5), &sched);
        assert!(
            rep.lowering.unsupported.is_empty(),
            "{lowering:?}: {:?}",
            rep.lowering.unsupported
        );
        assert_eq!(count(&rep, KernelKind::Contraction), (3, 3), "{lowering:?}");
        // The transform script ran: the kernels are not the generator's.
        assert!(rep
            .lowering
            .kernels
            .iter()
            .all(|k| k.kernel.pipeline.contains("transform-interpreter")));
    }
}
