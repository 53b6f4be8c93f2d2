//! The inline `f32` math of `cpu::lower::fastmath` (exp, log, tanh, erf, sigmoid, softplus,
//! GELU) and constant-exponent `Pow`, compiled as real kernels and compared with `f64`
//! references on dense sweeps (edge values, every 2^12-th bit pattern, fine grids around the
//! clamps); plus checks on the O3 LLVM IR that the loops vectorise (`<8 x float>`, no libm
//! calls), reductions included.

use kiln_codegen::cpu::pipeline::kernel_optimized_llvm_ir;
use kiln_codegen::cpu::{compile_library, CpuOptions, Kernel};
use kiln_ir::ops::elementwise::{BinaryKind, GeluApprox, UnaryKind};
use kiln_ir::ops::nn::{LayerNormAttrs, NnOp, SoftmaxAttrs};
use kiln_ir::ops::reduce::{ReduceAxes, ReduceKind, ReduceOp};
use kiln_ir::{DType, Graph, Op, Tensor};
use kiln_passes::fusion::KernelKind;
use kiln_runtime::kernel_lib::{scratch_buffer, KernelLibrary};

use crate::common;
use common::*;

/// The single lowered kernel of `g` (which must lower completely).
fn only_kernel(g: &Graph) -> Kernel {
    let p = kiln_passes::partition(g);
    let l = kiln_codegen::cpu::lower::lower_partition(g, &p).unwrap();
    assert!(l.unsupported.is_empty(), "{:?}", l.unsupported);
    assert_eq!(l.kernels.len(), 1);
    l.kernels[0].kernel.clone()
}

/// Compiles `g` (one kernel, one f32 input and output of `n` elements) and runs it on `xs`.
fn run_unary(g: &Graph, xs: &[f32]) -> Vec<f32> {
    let k = only_kernel(g);
    let so = compile_library(std::slice::from_ref(&k), &CpuOptions::default()).unwrap();
    let lib = KernelLibrary::from_bytes(&so).unwrap();
    let kern = lib.kernel(&k.signature.name).unwrap();
    let mut x = xs.to_vec();
    let mut y = vec![0f32; xs.len()];
    let ptrs = [x.as_mut_ptr() as *mut u8, y.as_mut_ptr() as *mut u8];
    // SAFETY: both buffers hold `xs.len()` f32s, the kernel's static shape.
    unsafe {
        kern.call(
            &ptrs,
            &[],
            scratch_buffer(k.signature.scratch_bytes).as_mut_slice(),
        )
    };
    y
}

/// A graph `y = f(x)` with `x: f32[n]`.
fn unary_graph(
    n: usize,
    f: impl FnOnce(&mut Builder, kiln_ir::ValueId) -> kiln_ir::ValueId,
) -> Graph {
    let mut b = Builder::new("fm");
    let x = b.input("x", DType::F32, &[n]);
    let y = f(&mut b, x);
    b.finish(&[y])
}

/// Inputs: special values, every 4096th bit pattern (all magnitudes and both signs), a fine
/// grid over [-20, 20] and fine grids around the clamp and overflow points.
fn sweep() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
        1e-30,
        -1e-30,
        f32::MAX,
        f32::MIN,
        1.0,
        -1.0,
    ];
    v.extend((0..1u32 << 20).map(|i| f32::from_bits(i << 12 | 0x5A5)));
    v.extend((0..=4_000_000).map(|i| -20.0 + i as f32 * 1e-5));
    for c in [4.0f32, 7.905_311, 9.0, 87.3, 88.72, 89.0, 103.9, 104.0] {
        for s in [c, -c] {
            v.extend((-2000..=2000).map(|i| s + i as f32 * 1e-4 * s.abs().max(1.0) / 8.0));
        }
    }
    v.retain(|x| !x.is_nan());
    v.push(f32::NAN);
    v
}

/// Maximum relative error of `got` against `want` over inputs `xs`, where `want` is a normal
/// number; denormal and zero references must match to within `abs` absolutely; infinite and
/// NaN references must match exactly. Panics with the first mismatch of special values.
fn max_rel_err(name: &str, xs: &[f32], got: &[f32], want: impl Fn(f64) -> f64, abs: f64) -> f64 {
    let mut worst = (0.0f64, 0.0f32);
    for (&x, &g) in xs.iter().zip(got) {
        let w = want(x as f64);
        let g = g as f64;
        if w.is_nan() {
            assert!(g.is_nan(), "{name}({x:e}) = {g:e}, want NaN");
        } else if w.is_infinite() || w.abs() > f32::MAX as f64 {
            // Overflow: inf (or FLT_MAX where the exact value rounds down to it).
            let ok = g == w.signum() * f64::INFINITY || (w.is_finite() && g == w as f32 as f64);
            assert!(ok, "{name}({x:e}) = {g:e}, want {w:e}");
        } else if w.abs() < f32::MIN_POSITIVE as f64 {
            assert!((g - w).abs() <= abs, "{name}({x:e}) = {g:e}, want {w:e}");
        } else {
            let e = (g - w).abs() / w.abs();
            if e > worst.0 || e.is_nan() {
                worst = (e, x);
            }
        }
    }
    eprintln!(
        "{name}: max relative error {:.3e} at x = {:e}",
        worst.0, worst.1
    );
    worst.0
}

/// Runs unary `kind` over the sweep and checks it against `want` with relative bound `bound`.
fn check_unary(name: &str, kind: UnaryKind, want: impl Fn(f64) -> f64, bound: f64) {
    let xs = sweep();
    let g = unary_graph(xs.len(), |b, x| b.unary(kind, x));
    let got = run_unary(&g, &xs);
    // Results below FLT_MIN (denormals) are only checked absolutely.
    let e = max_rel_err(name, &xs, &got, want, f32::MIN_POSITIVE as f64);
    assert!(e <= bound, "{name}: max relative error {e:e} > {bound:e}");
}

#[test]
fn exp_matches_f64() {
    check_unary("exp", UnaryKind::Exp, f64::exp, 3e-7);
}

#[test]
fn log_matches_f64() {
    check_unary("log", UnaryKind::Log, f64::ln, 3e-7);
}

#[test]
fn tanh_matches_f64() {
    check_unary("tanh", UnaryKind::Tanh, f64::tanh, 5e-7);
}

#[test]
fn erf_matches_f64() {
    check_unary("erf", UnaryKind::Erf, libm::erf, 5e-7);
}

#[test]
fn sigmoid_matches_f64() {
    check_unary(
        "sigmoid",
        UnaryKind::Sigmoid,
        |x| 1.0 / (1.0 + (-x).exp()),
        5e-7,
    );
}

#[test]
fn softplus_matches_f64() {
    check_unary(
        "softplus",
        UnaryKind::Softplus,
        |x| x.max(0.0) + (-x.abs()).exp().ln_1p(),
        5e-7,
    );
}

#[test]
fn gelu_matches_f64() {
    // GELU cancels in 1 + erf(x) for negative x, in f32 as in any implementation: compare
    // the error against the input scale.
    let xs: Vec<f32> = (0..=2_000_000).map(|i| -10.0 + i as f32 * 1e-5).collect();
    for (approx, want) in [
        (
            GeluApprox::None,
            (|x: f64| 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as fn(f64) -> f64,
        ),
        (GeluApprox::Tanh, |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }),
    ] {
        let g = unary_graph(xs.len(), |b, x| {
            b.unary(
                UnaryKind::Gelu {
                    approximate: approx,
                },
                x,
            )
        });
        let got = run_unary(&g, &xs);
        let worst = xs
            .iter()
            .zip(&got)
            .map(|(&x, &y)| (y as f64 - want(x as f64)).abs() / (x as f64).abs().max(1e-30))
            .fold(0.0, f64::max);
        eprintln!("gelu {approx:?}: max error / |x| = {worst:.3e}");
        assert!(worst <= 1e-6, "gelu {approx:?}: {worst:e}");
    }
}

#[test]
fn pow_with_constant_exponents() {
    let mut xs: Vec<f32> = (0..=200_000).map(|i| -4.0 + i as f32 * 4e-5).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-20,
        -1e-20,
        1e20,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    for e in [
        0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 16.0, -1.0, -2.0, -3.0, 0.5, 2.5, -1.5, 17.0,
    ] {
        let g = unary_graph(xs.len(), |b, x| {
            let c = b.konst("e", Tensor::from_vec(&[], vec![e]));
            b.binary(BinaryKind::Pow, x, c)
        });
        let mlir = only_kernel(&g).mlir;
        let int = e.fract() == 0.0 && e.abs() <= 16.0;
        assert_eq!(
            mlir.contains("math.powf"),
            !int && e != 0.5,
            "pow {e}: {mlir}"
        );
        let got = run_unary(&g, &xs);
        let mut worst = 0.0f64;
        for (&x, &y) in xs.iter().zip(&got) {
            let w = (x as f64).powf(e as f64) as f32 as f64;
            let y = y as f64;
            if w.is_nan() {
                assert!(y.is_nan(), "pow({x}, {e}) = {y}, want NaN");
            } else if w == 0.0 || w.is_infinite() {
                assert_eq!(y, w, "pow({x}, {e})");
            } else if w.abs() >= f32::MIN_POSITIVE as f64 {
                worst = worst.max((y - w).abs() / w.abs());
            }
        }
        eprintln!("pow {e}: max relative error {worst:.3e}");
        assert!(worst <= 1.2e-6, "pow {e}: {worst:e}");
    }
}

/// Whether LLVM IR has f32 vectors of at least 8 lanes (wider ones, such as a fully unrolled
/// row as `<64 x float>`, are split into 8-lane AVX2 registers by the back end).
fn has_vectors(ir: &str) -> bool {
    [8, 16, 32, 64, 128, 256]
        .iter()
        .any(|n| ir.contains(&format!("<{n} x float>")))
}

/// Whether the O3 IR of `k` is vectorised (8-wide) and calls no libm function.
fn assert_vectorised(what: &str, k: &Kernel) {
    let ir = kernel_optimized_llvm_ir(k, "x86-64-v3").unwrap();
    assert!(has_vectors(&ir), "{what} is not vectorised:\n{ir}");
    for f in ["@expf", "@logf", "@tanhf", "@erff", "@log1pf", "@powf"] {
        assert!(!ir.contains(f), "{what} calls {f}:\n{ir}");
    }
}

#[test]
fn math_kernels_vectorise() {
    for kind in [
        UnaryKind::Exp,
        UnaryKind::Log,
        UnaryKind::Tanh,
        UnaryKind::Erf,
        UnaryKind::Sigmoid,
        UnaryKind::Softplus,
        UnaryKind::Gelu {
            approximate: GeluApprox::Tanh,
        },
        UnaryKind::Gelu {
            approximate: GeluApprox::None,
        },
    ] {
        let g = unary_graph(1024, |b, x| b.unary(kind, x));
        assert_vectorised(&format!("{kind:?}"), &only_kernel(&g));
    }
}

/// A row-reduction graph over `x: f32[4, 64]`.
fn row_graph(op: Op) -> Graph {
    let mut b = Builder::new("rows");
    let x = b.input("x", DType::F32, &[4, 64]);
    let y = b.node(op, &[Some(x)]);
    b.finish(&[y])
}

#[test]
fn reductions_vectorise_and_match() {
    let sm = SoftmaxAttrs {
        axis: -1,
        coerce_2d: false,
    };
    let ops = [
        ("softmax", Op::Nn(NnOp::Softmax(sm.clone()))),
        ("logsoftmax", Op::Nn(NnOp::LogSoftmax(sm))),
        (
            "reducesum",
            Op::Reduce(ReduceOp::Reduce {
                kind: ReduceKind::Sum,
                axes: ReduceAxes::Attr(Some(vec![-1])),
                keepdims: true,
                noop_with_empty_axes: false,
            }),
        ),
        (
            "reducemax",
            Op::Reduce(ReduceOp::Reduce {
                kind: ReduceKind::Max,
                axes: ReduceAxes::Attr(Some(vec![-1])),
                keepdims: true,
                noop_with_empty_axes: false,
            }),
        ),
    ];
    for (name, op) in ops {
        let g = row_graph(op);
        let k = only_kernel(&g);
        let ir = kernel_optimized_llvm_ir(&k, "x86-64-v3").unwrap();
        assert!(has_vectors(&ir), "{name} is not vectorised:\n{ir}");
        assert!(
            !ir.contains("@expf") && !ir.contains("@logf"),
            "{name}:\n{ir}"
        );
        let r = check(&g, &random_inputs(&g, 7));
        assert_eq!(count(&r, KernelKind::Reduction), (1, 1));
    }
    // LayerNorm: the mean and variance passes.
    let mut b = Builder::new("ln");
    let x = b.input("x", DType::F32, &[4, 64]);
    let s = b.input("s", DType::F32, &[64]);
    let y = b.node(
        Op::Nn(NnOp::LayerNormalization(LayerNormAttrs {
            axis: -1,
            epsilon: 1e-5,
            stash_type: DType::F32,
            num_outputs: 1,
        })),
        &[Some(x), Some(s)],
    );
    let g = b.finish(&[y]);
    let ir = kernel_optimized_llvm_ir(&only_kernel(&g), "x86-64-v3").unwrap();
    assert!(has_vectors(&ir), "layernorm is not vectorised:\n{ir}");
    check(&g, &random_inputs(&g, 8));
}

/// Prints the MLIR and O3 LLVM IR of zoo kernels: `KILN_DUMP=gpt:k24_ cargo test --release
/// -p kiln-codegen --test kernels fastmath::dump -- --ignored --nocapture`.
#[test]
#[ignore]
fn dump_zoo_kernel_ir() {
    let spec = std::env::var("KILN_DUMP").unwrap_or_else(|_| "gpt:softmax".into());
    let (model, pat) = spec.split_once(':').unwrap();
    let (mut g, _) = zoo(model);
    kiln_passes::fold_batchnorm::fold_all(&mut g);
    kiln_ir::simplify::simplify(&mut g);
    let p = kiln_passes::partition(&g);
    let l = kiln_codegen::cpu::lower::lower_partition(&g, &p).unwrap();
    for k in &l.kernels {
        if k.kernel.signature.name.contains(pat) {
            println!("{}", k.kernel.mlir);
            println!(
                "{}",
                kernel_optimized_llvm_ir(&k.kernel, "x86-64-v3").unwrap()
            );
        }
    }
}

#[test]
fn in_place_elementwise_kernels_match() {
    // y = tanh(x) * z + x run with y in x's buffer, then in z's buffer (the memory plan's
    // in-place reuse), against separate buffers.
    let n = [3, 5, 37];
    let mut b = Builder::new("inplace");
    let x = b.input("x", DType::F32, &n);
    let z = b.input("z", DType::F32, &n);
    let t = b.unary(UnaryKind::Tanh, x);
    let m = b.binary(BinaryKind::Mul, t, z);
    let y = b.binary(BinaryKind::Add, m, x);
    let g = b.finish(&[y]);
    let k = only_kernel(&g);
    assert!(k.mlir.contains("scf.if"), "{}", k.mlir);
    let so = compile_library(std::slice::from_ref(&k), &CpuOptions::default()).unwrap();
    let lib = KernelLibrary::from_bytes(&so).unwrap();
    let kern = lib.kernel(&k.signature.name).unwrap();
    let len = n.iter().product::<usize>();
    let xs: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let zs: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
    let (mut x0, mut z0, mut want) = (xs.clone(), zs.clone(), vec![0f32; len]);
    let ptrs = [
        x0.as_mut_ptr() as *mut u8,
        z0.as_mut_ptr() as *mut u8,
        want.as_mut_ptr() as *mut u8,
    ];
    // SAFETY: three buffers of the kernel's static shape.
    unsafe {
        kern.call(
            &ptrs,
            &[],
            scratch_buffer(k.signature.scratch_bytes).as_mut_slice(),
        )
    };
    for alias in [0, 1] {
        let (mut x1, mut z1) = (xs.clone(), zs.clone());
        let (px, pz) = (x1.as_mut_ptr() as *mut u8, z1.as_mut_ptr() as *mut u8);
        let out = if alias == 0 { px } else { pz };
        // SAFETY: as above; the output shares an input's buffer, read before written per element.
        unsafe {
            kern.call(
                &[px, pz, out],
                &[],
                scratch_buffer(k.signature.scratch_bytes).as_mut_slice(),
            )
        };
        let got = if alias == 0 { &x1 } else { &z1 };
        assert_eq!(got, &want, "output in input {alias}'s buffer");
    }
}
