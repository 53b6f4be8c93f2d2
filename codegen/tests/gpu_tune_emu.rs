//! Tuned GPU schedules compute the same result as the default: random valid configs of the
//! f32 GEMM and f32 conv tuning tasks ([`kiln_codegen::gpu::tuning`]) are generated as the
//! autotuner's bundles generate them (`GpuTunable::build`) and run on the SIMT emulator
//! (`common/gpu_emu.rs`) against CPU loops, with edge tiles (sizes not multiples of the
//! tiles). A tuned record can therefore only change speed, not results.

use crate::gpu_emu;

use gpu_emu::EArg;
use kiln_codegen::gpu::kernels::conv::{ConvGeom, Epilogue};
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
    let cs = configs(&t, 6, 128, &mut rng);
    assert!(cs.len() >= 4, "{cs:?}");
    for c in cs {
        let tk = t.build("kiln_gemm_f32_t", &c).unwrap();
        let mut args = vec![
            EArg::Buf(a.clone()),
            EArg::Buf(b.clone()),
            EArg::Buf(vec![f32::NAN; m * n]),
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

#[test]
fn tuned_conv_schedules_match_cpu() {
    let sku = DeviceDb::builtin()
        .unwrap()
        .parse_target("cuda:h100")
        .unwrap();
    let g = ConvGeom {
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
    };
    let epi = Epilogue {
        bias: true,
        residual: true,
        relu: true,
    };
    let t = GpuTunable::new(GpuTemplate::Conv { geom: g, epi }, sku).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let u = |v: u64| v as usize;
    let (oh, ow) = (u(g.oh()), u(g.ow()));
    let x = values(u(g.n * g.c * g.h * g.w), &mut rng);
    let w = values(u(g.oc * g.c * g.kh * g.kw), &mut rng);
    let bias = values(u(g.oc), &mut rng);
    let yl = u(g.n * g.oc) * oh * ow;
    let res = values(yl, &mut rng);
    let mut want = vec![0f32; yl];
    for o in 0..u(g.oc) {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = bias[o];
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
                let i = (o * oh + oy) * ow + ox;
                want[i] = (acc + res[i]).max(0.0);
            }
        }
    }
    let cs = configs(&t, 6, 128, &mut rng);
    assert!(cs.len() >= 4, "{cs:?}");
    for c in cs {
        let tk = t.build("kiln_conv_t", &c).unwrap();
        let mut args = vec![
            EArg::Buf(x.clone()),
            EArg::Buf(w.clone()),
            EArg::Buf(bias.clone()),
            EArg::Buf(res.clone()),
            EArg::Buf(vec![f32::NAN; yl]),
        ];
        gpu_emu::run(&tk.kernel.mlir, tk.grid, tk.block, &mut args);
        let EArg::Buf(y) = &args[4] else {
            unreachable!()
        };
        let e = rel_err(y, &want);
        println!(
            "conv {c}: grid {:?} block {:?}: rel err {e:.1e}",
            tk.grid, tk.block
        );
        assert!(e <= 1e-5, "{c}: relative error {e}");
    }
}
