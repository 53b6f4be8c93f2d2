//! The small kernels the model lowering adds, run as MLIR on the SIMT emulator
//! (`common/gpu_emu.rs`): the fused row-attention kernel (online softmax, additive or causal
//! mask, Kᵀ input) against a naive f64 softmax-attention and against its own host semantics
//! ([`RowAttention::eval`], what plan emulation runs), the f32 → f16 cast against the host
//! rounding, and the copy.

use crate::gpu_emu;

use gpu_emu::{run, EArg};
use kiln_codegen::gpu::kernels::gemm_mma::MmaInput;
use kiln_codegen::gpu::lower::attention::{
    copy_kernel, row_attention, RowAttention, RowAttentionSchedule, ScoreStep,
};
use kiln_codegen::gpu::lower::precision::{cast_kernel, round_input};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// softmax(steps(Q·Kᵀ)) · V in f64, scores materialised.
fn naive(a: &RowAttention, q: &[f32], kt: &[f32], v: &[f32], mask: &[f32]) -> Vec<f32> {
    let (sq, skv, d) = (a.sq, a.skv, a.d);
    let mut o = vec![0f32; a.bh * sq * d];
    for bh in 0..a.bh {
        for i in 0..sq {
            let mut s: Vec<f64> = (0..skv)
                .map(|j| {
                    let mut x: f64 = (0..d)
                        .map(|dd| {
                            f64::from(q[(bh * sq + i) * d + dd])
                                * f64::from(kt[bh * d * skv + dd * skv + j])
                        })
                        .sum();
                    for st in &a.steps {
                        x = match *st {
                            ScoreStep::Div(c) => x / f64::from(c),
                            ScoreStep::Mul(c) => x * f64::from(c),
                            ScoreStep::AddMask => x + f64::from(mask[a.mask_offset(bh, i, j)]),
                            ScoreStep::Causal(f) if j > i => f64::from(f),
                            ScoreStep::Causal(_) => x,
                        };
                    }
                    x
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            s.iter_mut().for_each(|x| *x = (*x - m).exp());
            let sum: f64 = s.iter().sum();
            for dd in 0..d {
                let acc: f64 = (0..skv)
                    .map(|j| s[j] * f64::from(v[bh * skv * d + j * d + dd]))
                    .sum();
                o[(bh * sq + i) * d + dd] = (acc / sum) as f32;
            }
        }
    }
    o
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// (batch dims, sq, skv, d, steps, mask strides).
type Case = (Vec<usize>, usize, usize, usize, Vec<ScoreStep>, Vec<i64>);

#[test]
fn row_attention_matches_a_naive_softmax_attention_on_the_emulator() {
    // (batch dims, sq, skv, d, steps, mask shape right-aligned to [batch.., sq, skv])
    let cases: Vec<Case> = vec![
        // bert-like: [B, H] batch, scale, additive [B, 1, 1, Skv] mask.
        (
            vec![2, 3],
            5,
            7,
            16,
            vec![ScoreStep::Div(4.0), ScoreStep::AddMask],
            vec![7, 0, 0, 1],
        ),
        // gpt-like: causal Where with -FLT_MAX, 130 rows (two blocks, a partial one).
        (
            vec![2, 5],
            13,
            13,
            8,
            vec![ScoreStep::Mul(0.35), ScoreStep::Causal(f32::MIN)],
            vec![],
        ),
        // A full [Sq, Skv] additive mask broadcast over the batch.
        (
            vec![3],
            4,
            9,
            32,
            vec![ScoreStep::AddMask, ScoreStep::Div(5.657)],
            vec![0, 9, 1],
        ),
    ];
    for (ci, (batch, sq, skv, d, steps, mask_strides)) in cases.into_iter().enumerate() {
        let bh: usize = batch.iter().product();
        let a = RowAttention {
            bh,
            sq,
            skv,
            d,
            steps,
            batch,
            mask_strides,
        };
        let q = data(bh * sq * d, 1 + ci as u64);
        let kt = data(bh * d * skv, 2 + ci as u64);
        let v = data(bh * skv * d, 3 + ci as u64);
        let has_mask = a.steps.contains(&ScoreStep::AddMask);
        let mask: Vec<f32> = if has_mask {
            let n = a.mask_offset(bh - 1, sq - 1, skv - 1) + 1;
            // Some keys masked off with -10000 as BERT does.
            data(n, 9)
                .iter()
                .map(|x| if *x > 1.0 { -10000.0 } else { *x })
                .collect()
        } else {
            vec![]
        };
        let want = naive(&a, &q, &kt, &v, &mask);
        let mut host = vec![0f32; bh * sq * d];
        a.eval(&q, &kt, &v, &mask, &mut host);
        assert!(max_diff(&host, &want) < 1e-5, "case {ci}: host");
        // every schedule of the tuning space: threads per block × threads per row
        let space = RowAttentionSchedule::space();
        let mut worst = 0f32;
        for &block in &space[0].1 {
            for &kv_split in &space[1].1 {
                let sch = RowAttentionSchedule { block, kv_split };
                let k = row_attention("attn", &a, &sch);
                let mut args = vec![
                    EArg::Buf(q.clone()),
                    EArg::Buf(kt.clone()),
                    EArg::Buf(v.clone()),
                ];
                if has_mask {
                    args.push(EArg::Buf(mask.clone()));
                }
                args.push(EArg::Buf(vec![f32::NAN; bh * sq * d]));
                run(&k.mlir, sch.grid((bh * sq) as u64), k.block, &mut args);
                let EArg::Buf(got) = args.last().unwrap() else {
                    unreachable!()
                };
                let e = max_diff(got, &want);
                assert!(e < 1e-5, "case {ci} {sch:?}: {e}");
                worst = worst.max(e);
            }
        }
        println!(
            "case {ci}: row attention on the emulator, all 16 schedules, max |diff| {worst:.2e}"
        );
    }
}

#[test]
fn row_attention_schedules_pass_ptxas() {
    use kiln_codegen::gpu::{compile_kernel, DeviceDb};
    let db = DeviceDb::builtin().unwrap();
    let sku = db.parse_target("cuda:h100").unwrap();
    let a = RowAttention {
        bh: 8,
        sq: 64,
        skv: 64,
        d: 64,
        steps: vec![ScoreStep::Div(8.0), ScoreStep::AddMask],
        batch: vec![2, 4],
        mask_strides: vec![64, 0, 0, 1],
    };
    let ptxas = crate::ptxas::find_ptxas();
    let dir = tempfile::tempdir().unwrap();
    for kv_split in [1, 2, 8] {
        let sch = RowAttentionSchedule {
            block: 256,
            kv_split,
        };
        sch.validate(sku).unwrap();
        let k = row_attention(&format!("attn_s{kv_split}"), &a, &sch);
        let ptx = compile_kernel(&k, sku).unwrap();
        if kv_split > 1 {
            assert!(ptx.text.contains("shfl.sync.bfly"), "no butterfly shuffle");
        }
        match &ptxas {
            Some(p) => {
                let u = crate::ptxas::assemble(p, dir.path(), &ptx.text, &ptx.arch, &k.name)
                    .unwrap_or_else(|e| panic!("{e}"));
                crate::ptxas::check_limits(&u, &k, sku);
                println!("{sch:?}: {} registers", u.registers);
            }
            None => println!("ptxas not found: {sch:?} lowered to PTX only"),
        }
    }
    let bad = RowAttentionSchedule {
        block: 48,
        kv_split: 3,
    };
    assert!(bad.validate(sku).is_err());
}

#[test]
fn cast_and_copy_kernels_on_the_emulator() {
    let x: Vec<f32> = data(300, 5).iter().map(|v| v * 1000.0 + 0.1).collect();
    let k = cast_kernel(MmaInput::F16);
    let mut args = vec![
        EArg::Buf(x.clone()),
        EArg::Buf(vec![f32::NAN; 300]),
        EArg::Index(300),
    ];
    run(&k.mlir, [2, 1, 1], k.block, &mut args);
    let EArg::Buf(y) = &args[1] else {
        unreachable!()
    };
    for (a, b) in x.iter().zip(y) {
        assert_eq!(round_input(*a, MmaInput::F16), *b, "{a}");
    }
    let k = copy_kernel();
    let mut args = vec![
        EArg::Buf(x.clone()),
        EArg::Buf(vec![f32::NAN; 300]),
        EArg::Index(300),
    ];
    run(&k.mlir, [1, 1, 1], k.block, &mut args);
    let EArg::Buf(y) = &args[1] else {
        unreachable!()
    };
    assert_eq!(&x, y);
}

/// The wgmma GEMM's vectorized epilogue (`WgmmaSchedule::vector` 4 and 8) on the emulator,
/// through `epilogue_probe` (the very epilogue code, reading random accumulator tiles): every
/// element of C is `Epilogue::apply` of its accumulator — whole vectors where N is a multiple
/// of the width, the element-wise edge elsewhere (N not a multiple of it, partial blocks at
/// the right and the bottom) — with bias, activations and residuals, f32 and f16 outputs,
/// one or two warpgroups (128- or 256-row tiles), tiles in row order or in bands
/// (`raster`; a wrong renumbering leaves tiles unwritten or written twice), with and without
/// a producer warpgroup (whose threads join the epilogue: its step grows to 384 threads).
#[test]
fn wgmma_vectorized_epilogue_on_the_emulator() {
    use kiln_codegen::gpu::kernels::epilogue::{Activation, Epilogue, Residual};
    use kiln_codegen::gpu::kernels::gemm_mma::MmaOutput;
    use kiln_codegen::gpu::kernels::gemm_wgmma::{epilogue_probe, WgmmaSchedule};
    let ep = |bias: bool, activation: Activation, residual: Residual| Epilogue {
        bias,
        activation,
        residual,
    };
    // (output, vector, bn, M, N, epilogue, warpgroups, raster)
    let cases = [
        (
            MmaOutput::F32,
            4u32,
            128u32,
            200usize,
            136usize,
            Epilogue::none(),
            1u32,
            1u32,
        ),
        (
            MmaOutput::F32,
            4,
            64,
            130,
            70,
            ep(true, Activation::Relu, Residual::None),
            1,
            1,
        ),
        (
            MmaOutput::F16,
            8,
            128,
            150,
            264,
            ep(true, Activation::GeluTanh, Residual::AfterActivation),
            1,
            1,
        ),
        (
            MmaOutput::F16,
            8,
            64,
            129,
            100,
            ep(false, Activation::Sigmoid, Residual::BeforeActivation),
            1,
            1,
        ),
        (
            MmaOutput::F16,
            8,
            128,
            300,
            264,
            ep(true, Activation::Relu, Residual::None),
            2,
            1,
        ),
        (
            MmaOutput::F32,
            4,
            64,
            700,
            200,
            ep(false, Activation::None, Residual::AfterActivation),
            1,
            4,
        ),
        (
            MmaOutput::F16,
            8,
            128,
            600,
            392,
            ep(true, Activation::None, Residual::None),
            2,
            2,
        ),
        (
            MmaOutput::F32,
            4,
            256,
            200,
            520,
            ep(true, Activation::Relu, Residual::BeforeActivation),
            2,
            1,
        ),
    ];
    for (ci, (out, vector, bn, m, n, e, warpgroups, raster)) in cases.into_iter().enumerate() {
        let s = WgmmaSchedule {
            bn,
            stages: 4,
            vector,
            warpgroups,
            raster,
            // the last two cases with the producer warpgroup
            producer: u32::from(ci + 2 >= cases.len()),
        };
        let k = epilogue_probe("probe", out, &e, &s).unwrap();
        let rows = s.rows() as usize;
        let [gx, gy, _] = s.grid(m as u64, n as u64).map(|g| g as usize);
        let tile = rows * bn as usize;
        let p = data(m * n, 11 + ci as u64);
        let mut t = vec![0f32; gx * gy * tile];
        for i in 0..m {
            for j in 0..n {
                let (by, r, bx, c) = (i / rows, i % rows, j / bn as usize, j % bn as usize);
                t[(by * gx + bx) * tile + r * bn as usize + c] = p[i * n + j];
            }
        }
        let round = |v: f32| match out {
            MmaOutput::F32 => v,
            _ => round_input(v, MmaInput::F16),
        };
        let bias = data(n, 3);
        let res: Vec<f32> = data(m * n, 4).into_iter().map(round).collect();
        let (alpha, beta) = (0.75f32, 1.5f32);
        let mut args = vec![EArg::Buf(t), EArg::Buf(vec![f32::NAN; m * n])];
        if e.bias {
            args.push(EArg::Buf(bias.clone()));
        }
        if e.has_residual() {
            args.push(EArg::Buf(res.clone()));
        }
        args.extend([
            EArg::Index(m as i64),
            EArg::Index(n as i64),
            EArg::F32(alpha),
        ]);
        if e.has_residual() {
            args.push(EArg::F32(beta));
        }
        run(&k.mlir, [gx as u32, gy as u32, 1], k.block, &mut args);
        let EArg::Buf(c) = &args[1] else {
            unreachable!()
        };
        let mut worst = 0f32;
        for i in 0..m {
            for j in 0..n {
                let want = round(e.apply(p[i * n + j], alpha, beta, bias[j], res[i * n + j]));
                let got = c[i * n + j];
                let err = (got - want).abs() / want.abs().max(1.0);
                assert!(
                    err <= 1e-3,
                    "case {ci} ({out:?}, {s:?}, {m}x{n}): C[{i}][{j}] = {got}, want {want}"
                );
                worst = worst.max(err);
            }
        }
        println!("case {ci}: {out:?} {s:?} {m}x{n}: max rel. error {worst:.1e}");
    }
}
