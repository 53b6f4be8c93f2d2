//! Tuned GPU schedules compute the same result as the default: random valid configs of the
//! f32 GEMM and f32 conv tuning tasks ([`kiln_codegen::gpu::tuning`]) are generated as the
//! autotuner's bundles generate them (`GpuTunable::build`) and run on the SIMT emulator
//! (`common/gpu_emu.rs`) against CPU loops, with edge tiles (sizes not multiples of the
//! tiles). A tuned record can therefore only change speed, not results.

use crate::{gpu_emu, gpu_ref};

use gpu_emu::EArg;
use kiln_codegen::gpu::kernels::conv::{ConvGeom, Epilogue};
use kiln_codegen::gpu::kernels::gemm_mma::MmaInput;
use kiln_codegen::gpu::tuning::{GpuTemplate, GpuTunable};
use kiln_codegen::gpu::DeviceDb;
use kiln_tune::Config;
use rand::{Rng, SeedableRng};

fn values(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1f32, |m, w| m.max(w.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_nan() {
                f32::INFINITY
            } else {
                (a - b).abs() / scale
            }
        })
        .fold(0.0, f32::max)
}

/// Up to `n` distinct valid configs of `t`, the default first, the rest random (seeded).
fn configs(
    t: &GpuTunable,
    n: usize,
    max_threads: u32,
    rng: &mut rand::rngs::StdRng,
) -> Vec<Config> {
    let mut out = vec![t.default.clone()];
    let mut tries = 0;
    while out.len() < n && tries < 10_000 {
        tries += 1;
        let c = t.space.sample(rng);
        // Few threads per block keep the emulator (one OS thread per GPU thread) quick.
        let threads = |c: &Config| {
            (c.get_or("bm", 1) / c.get_or("tm", 1)) * (c.get_or("bn", 1) / c.get_or("tn", 1))
        };
        if t.check(&c).is_ok() && threads(&c) <= i64::from(max_threads) && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

#[test]
fn tuned_gemm_f32_schedules_match_cpu() {
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:h100")
        .unwrap();
    let (m, n, k) = (37usize, 45usize, 23usize);
    let t = GpuTunable::new(
        GpuTemplate::GemmF32 {
            m: m as u64,
            n: n as u64,
            k: k as u64,
        },
        sku,
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let a = values(m * k, &mut rng);
    let b = values(k * n, &mut rng);
    let mut want = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    let mut cs = configs(&t, 6, 128, &mut rng);
    assert!(cs.len() >= 4, "{cs:?}");
    // Split-K (partial tiles added into a zeroed C), more slices than tiles of K.
    for split in [2, 4, 8] {
        let mut c = cs[0].clone();
        c.0.insert("split_k".into(), split);
        cs.push(c);
    }
    for c in cs {
        let tk = t.build("kiln_gemm_f32_t", &c).unwrap();
        // Unwritten elements stay NaN; split-K adds into the zeroed output (as lowered).
        let init = if c.get_or("split_k", 1) > 1 {
            0.0
        } else {
            f32::NAN
        };
        let mut args = vec![
            EArg::Buf(a.clone()),
            EArg::Buf(b.clone()),
            EArg::Buf(vec![init; m * n]),
            EArg::Index(m as i64),
            EArg::Index(n as i64),
            EArg::Index(k as i64),
        ];
        gpu_emu::run(&tk.kernel.mlir, tk.grid, tk.block, &mut args);
        let EArg::Buf(y) = &args[2] else {
            unreachable!()
        };
        let e = rel_err(y, &want);
        println!(
            "gemm_f32 {c}: grid {:?} block {:?}: rel err {e:.1e}",
            tk.grid, tk.block
        );
        assert!(e <= 1e-5, "{c}: relative error {e}");
    }
}

/// The geometry of the conv tests: channels, sizes and stride that are not multiples of
/// any tile.
fn conv_geom() -> ConvGeom {
    ConvGeom {
        n: 1,
        c: 5,
        h: 9,
        w: 7,
        oc: 11,
        kh: 3,
        kw: 3,
        stride: [2, 1],
        pads: [1, 1, 1, 0],
        dilation: [1, 1],
    }
}

/// `relu(conv(x, w) + bias + res)` on the CPU (NCHW, batch 1).
fn conv_want(g: &ConvGeom, x: &[f32], w: &[f32], bias: &[f32], res: &[f32]) -> Vec<f32> {
    let plane = (g.oh() * g.ow()) as usize;
    conv_sum(g, x, w)
        .iter()
        .enumerate()
        .map(|(i, acc)| (bias[i / plane] + acc + res[i]).max(0.0))
        .collect()
}

/// The convolution sums alone (batch 1, NCHW), no bias or activation.
fn conv_sum(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
    let u = |v: u64| v as usize;
    let (oh, ow) = (u(g.oh()), u(g.ow()));
    let mut want = vec![0f32; u(g.n * g.oc) * oh * ow];
    for o in 0..u(g.oc) {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0f32;
                for ci in 0..u(g.c) {
                    for ty in 0..u(g.kh) {
                        for tx in 0..u(g.kw) {
                            let iy = (oy * u(g.stride[0]) + ty) as i64 - g.pads[0] as i64;
                            let ix = (ox * u(g.stride[1]) + tx) as i64 - g.pads[1] as i64;
                            if iy < 0 || ix < 0 || iy >= g.h as i64 || ix >= g.w as i64 {
                                continue;
                            }
                            acc += x[(ci * u(g.h) + iy as usize) * u(g.w) + ix as usize]
                                * w[((o * u(g.c) + ci) * u(g.kh) + ty) * u(g.kw) + tx];
                        }
                    }
                }
                want[(o * oh + oy) * ow + ox] = acc;
            }
        }
    }
    want
}

/// Runs every config of `cs` of the conv task `t` on the emulator against `want`; `x` gives
/// the config's `X` buffer.
fn check_conv_configs(
    t: &GpuTunable,
    cs: Vec<Config>,
    x: &dyn Fn(&Config) -> Vec<f32>,
    w: &[f32],
    bias: &[f32],
    res: &[f32],
    want: &[f32],
) {
    assert!(cs.len() >= 4, "{cs:?}");
    for c in cs {
        let tk = t.build("kiln_conv_t", &c).unwrap();
        let mut args = vec![
            EArg::Buf(x(&c)),
            EArg::Buf(w.to_vec()),
            EArg::Buf(bias.to_vec()),
            EArg::Buf(res.to_vec()),
            EArg::Buf(vec![f32::NAN; want.len()]),
        ];
        gpu_emu::run(&tk.kernel.mlir, tk.grid, tk.block, &mut args);
        let EArg::Buf(y) = &args[4] else {
            unreachable!()
        };
        let e = rel_err(y, want);
        println!(
            "{} {c}: grid {:?} block {:?}: rel err {e:.1e}",
            t.workload.kind, tk.grid, tk.block
        );
        assert!(e <= 1e-5, "{c}: relative error {e}");
    }
}

const RELU_RES_BIAS: Epilogue = Epilogue {
    bias: true,
    residual: true,
    relu: true,
};

#[test]
fn tuned_conv_schedules_match_cpu() {
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:h100")
        .unwrap();
    let g = conv_geom();
    let t = GpuTunable::new(
        GpuTemplate::Conv {
            geom: g,
            epi: RELU_RES_BIAS,
        },
        sku,
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let u = |v: u64| v as usize;
    let x = values(u(g.n * g.c * g.h * g.w), &mut rng);
    let w = values(u(g.oc * g.c * g.kh * g.kw), &mut rng);
    let bias = values(u(g.oc), &mut rng);
    let res = values(u(g.n * g.oc * g.oh() * g.ow()), &mut rng);
    let want = conv_want(&g, &x, &w, &bias, &res);
    let mut cs = configs(&t, 6, 128, &mut rng);
    // Tiles with fewer elements than threads (the last copy of a thread may fall past the
    // tile; see `gemm_f32_with_partial_tile_copies_matches_cpu`).
    for (bm, bn, bk, tm, tn) in [(16, 128, 16, 1, 2), (32, 64, 4, 1, 2)] {
        cs.push(Config::from_pairs(&[
            ("bm", bm),
            ("bn", bn),
            ("bk", bk),
            ("tm", tm),
            ("tn", tn),
        ]));
    }
    check_conv_configs(&t, cs, &|_| x.clone(), &w, &bias, &res, &want);
}

/// The tensor-core conv's tuning task (`gpu_conv2d_mma`): every tiling (warps × 8-channel
/// tiles) of f16 and bf16 inputs, with `X` in 16 bits or in f32 (rounded by the kernel as it
/// is gathered), computes the CPU conv of the rounded values.
#[test]
fn tuned_conv_mma_schedules_match_cpu() {
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:a100")
        .unwrap();
    let g = conv_geom();
    let u = |v: u64| v as usize;
    for (input, round) in [
        (MmaInput::F16, gpu_ref::round_f16 as fn(&[f32]) -> Vec<f32>),
        (MmaInput::BF16, gpu_ref::round_bf16),
    ] {
        let t = GpuTunable::new(
            GpuTemplate::ConvMma {
                geom: g,
                epi: RELU_RES_BIAS,
                input,
            },
            sku,
        )
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let x_raw = values(u(g.n * g.c * g.h * g.w), &mut rng);
        let x = round(&x_raw);
        let w = round(&values(u(g.oc * g.c * g.kh * g.kw), &mut rng));
        let bias = values(u(g.oc), &mut rng);
        let res = values(u(g.n * g.oc * g.oh() * g.ow()), &mut rng);
        let want = conv_want(&g, &x, &w, &bias, &res);
        // The default first, then every other valid tiling of at most 4 warps.
        let mut cs = vec![t.default.clone()];
        for warps in [1, 2, 4] {
            for n_tiles in [1, 2, 4, 8] {
                for x_f32 in [0, 1] {
                    let c = Config::from_pairs(&[
                        ("warps", warps),
                        ("n_tiles", n_tiles),
                        ("x_f32", x_f32),
                    ]);
                    if t.check(&c).is_ok() && !cs.contains(&c) {
                        cs.push(c);
                    }
                }
            }
        }
        assert!(cs.len() >= 20, "{}", cs.len());
        let x_of = |c: &Config| {
            if c.get_or("x_f32", 0) == 1 {
                x_raw.clone()
            } else {
                x.clone()
            }
        };
        check_conv_configs(&t, cs, &x_of, &w, &bias, &res, &want);
    }
}

/// Split-K slices of whole `bk` tiles cover `K` exactly once, the last one ragged
/// (`K = 200`: 13 tiles of 16 in 1, 2, 3, 4 or 8 slices), and add up to the product.
#[test]
fn split_k_gemm_f32_slices_sum_to_the_product() {
    use kiln_codegen::gpu::kernels::gemm::GpuGemmSchedule;
    let (m, n, k) = (33usize, 20usize, 200usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let a = values(m * k, &mut rng);
    let b = values(k * n, &mut rng);
    let want: Vec<f32> = (0..m * n)
        .map(|ij| (0..k).map(|p| a[ij / n * k + p] * b[p * n + ij % n]).sum())
        .collect();
    for split_k in [1, 2, 3, 4, 8] {
        let s = GpuGemmSchedule {
            bm: 32,
            bn: 16,
            bk: 16,
            tm: 4,
            tn: 2,
            split_k,
        };
        let y = run_gemm_f32(&s, &a, &b, (m, n, k), 0.0);
        let e = rel_err(&y, &want);
        assert!(e <= 1e-5, "split_k {split_k}: relative error {e}");
    }
}

/// The batched f32 GEMM: matrix `b` of each operand at `b · stride` (A broadcast with
/// stride 0, as in eqsat's stacked projections), with and without split-K.
#[test]
fn batched_gemm_f32_matches_per_matrix_products() {
    use kiln_codegen::gpu::kernels::gemm::{gemm_f32_batched, GpuGemmSchedule};
    let (batch, m, n, k) = (3usize, 21usize, 18usize, 70usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for broadcast_a in [false, true] {
        let sa = if broadcast_a { 0 } else { m * k };
        let a = values(if broadcast_a { m * k } else { batch * m * k }, &mut rng);
        let b = values(batch * k * n, &mut rng);
        let want: Vec<f32> = (0..batch * m * n)
            .map(|e| {
                let (bi, ij) = (e / (m * n), e % (m * n));
                (0..k)
                    .map(|p| a[bi * sa + ij / n * k + p] * b[bi * k * n + p * n + ij % n])
                    .sum()
            })
            .collect();
        for split_k in [1, 2, 4] {
            let s = GpuGemmSchedule {
                bm: 16,
                bn: 16,
                bk: 16,
                tm: 2,
                tn: 2,
                split_k,
            };
            let kern = gemm_f32_batched("g", &s).unwrap();
            let mut args = vec![
                EArg::Buf(a.clone()),
                EArg::Buf(b.clone()),
                EArg::Buf(vec![
                    if split_k > 1 { 0.0 } else { f32::NAN };
                    batch * m * n
                ]),
                EArg::Index(m as i64),
                EArg::Index(n as i64),
                EArg::Index(k as i64),
                EArg::Index(sa as i64),
                EArg::Index((k * n) as i64),
                EArg::Index((m * n) as i64),
            ];
            let grid = s.grid_batched(batch as u64, m as u64, n as u64);
            gpu_emu::run(&kern.mlir, grid, kern.block, &mut args);
            let EArg::Buf(y) = &args[2] else {
                unreachable!()
            };
            let e = rel_err(y, &want);
            assert!(
                e <= 1e-5,
                "broadcast {broadcast_a}, split_k {split_k}: relative error {e}"
            );
        }
    }
}

/// Schedules whose tile copies do not divide evenly among the threads (the last copy of a
/// thread may fall past the tile: it must neither load nor store), against the CPU
/// product: an A tile smaller than the block (16×16 over 1024 threads), and a B tile of
/// one and a half copies per thread (8×48 over 256); `M, N, K` ragged, K over several tiles.
#[test]
fn gemm_f32_with_partial_tile_copies_matches_cpu() {
    use kiln_codegen::gpu::kernels::gemm::GpuGemmSchedule;
    let (m, n, k) = (21usize, 70usize, 45usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let a = values(m * k, &mut rng);
    let b = values(k * n, &mut rng);
    let want: Vec<f32> = (0..m * n)
        .map(|ij| (0..k).map(|p| a[ij / n * k + p] * b[p * n + ij % n]).sum())
        .collect();
    for (bm, bn, bk, tm, tn) in [(16, 128, 16, 1, 2), (32, 48, 8, 2, 3)] {
        let s = GpuGemmSchedule {
            bm,
            bn,
            bk,
            tm,
            tn,
            split_k: 1,
        };
        let y = run_gemm_f32(&s, &a, &b, (m, n, k), f32::NAN);
        let e = rel_err(&y, &want);
        assert!(e <= 1e-5, "{s:?}: relative error {e}");
    }
}

/// The split-K conv (`conv2d_split_k`): 2, 3, 4 and 8 slices of a ragged reduction
/// (`C·KH·KW = 45`, 6 steps of 8; with 8 slices two are empty) add up, into a zeroed output,
/// to the convolution.
#[test]
fn split_k_conv_slices_sum_to_the_convolution() {
    use kiln_codegen::gpu::kernels::conv::{conv2d_split_k, GpuConvSchedule};
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:h100")
        .unwrap();
    let g = conv_geom();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let u = |v: u64| v as usize;
    let x = values(u(g.n * g.c * g.h * g.w), &mut rng);
    let w = values(u(g.oc * g.c * g.kh * g.kw), &mut rng);
    let want = conv_sum(&g, &x, &w);
    let s = GpuConvSchedule {
        bm: 32,
        bn: 16,
        bk: 8,
        tm: 2,
        tn: 2,
    };
    for split in [2, 3, 4, 8] {
        let k = conv2d_split_k("c", &g, &s, split, sku).unwrap();
        let (grid, block) = s.launch_split(&g, split).unwrap();
        assert_eq!(grid[2], split);
        let mut args = vec![
            EArg::Buf(x.clone()),
            EArg::Buf(w.clone()),
            EArg::Buf(vec![0.0; want.len()]),
        ];
        gpu_emu::run(&k.mlir, grid, block, &mut args);
        let EArg::Buf(y) = &args[2] else {
            unreachable!()
        };
        let e = rel_err(y, &want);
        assert!(e <= 1e-5, "split {split}: relative error {e}");
    }
}

/// `gemm_f32` with schedule `s` on the emulator: `A[m,k] · B[k,n]` into a C that starts as
/// `init` everywhere.
fn run_gemm_f32(
    s: &kiln_codegen::gpu::kernels::gemm::GpuGemmSchedule,
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    init: f32,
) -> Vec<f32> {
    let kern = kiln_codegen::gpu::kernels::gemm::gemm_f32("g", s).unwrap();
    let mut args = vec![
        EArg::Buf(a.to_vec()),
        EArg::Buf(b.to_vec()),
        EArg::Buf(vec![init; m * n]),
        EArg::Index(m as i64),
        EArg::Index(n as i64),
        EArg::Index(k as i64),
    ];
    gpu_emu::run(
        &kern.mlir,
        s.grid(m as u64, n as u64),
        kern.block,
        &mut args,
    );
    let EArg::Buf(y) = args.swap_remove(2) else {
        unreachable!()
    };
    y
}
