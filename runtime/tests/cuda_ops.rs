//! The GPU op kernels on a real GPU (feature `cuda`): implicit-GEMM conv (f32, and f16 on
//! tensor cores), depthwise conv,
//! LayerNorm, last-axis reductions, the fused elementwise chain and flash attention (f32,
//! f16, and f16 on tensor cores), each on random inputs against the CPU references of
//! `codegen/tests/common/gpu_ref.rs` (checked there against the reference interpreter).
//! Normwise relative error ≤ 1e-4 for f32 and ≤ 1e-2 for f16 buffers.
//!
//! The PTX comes from fixtures (`tests/ptx/kiln_t_*.sm_80.ptx`, kept current by
//! `codegen/tests/gpu_ops_ptx.rs`), so this test needs no code generator. Without a GPU every
//! test prints `SKIPPED: no CUDA device` and passes.

use kiln_runtime::cuda::{device_count, CudaDevice, DeviceBuffer, KernelArg};

#[path = "../../codegen/tests/common/gpu_ref.rs"]
mod gpu_ref;
use gpu_ref::*;

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

fn sm_version(dev: &CudaDevice) -> u32 {
    dev.arch()
        .ok()
        .and_then(|a| a.trim_start_matches("sm_").parse().ok())
        .unwrap_or(0)
}

/// Average time of `kernel` over 20 launches after a warm-up (µs), printed with the
/// achieved GFLOP/s for `flops` per launch.
///
/// # Safety
/// As [`CudaDevice::launch`].
unsafe fn time_kernel(
    dev: &CudaDevice,
    k: &kiln_runtime::cuda::Kernel,
    (grid, block): ([u32; 3], [u32; 3]),
    args: &[KernelArg<'_>],
    what: &str,
    flops: f64,
) {
    const N: u32 = 20;
    // SAFETY: forwarded to the caller.
    unsafe { dev.launch(k, grid, block, 0, args).unwrap() };
    dev.synchronize().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..N {
        // SAFETY: forwarded to the caller.
        unsafe { dev.launch(k, grid, block, 0, args).unwrap() };
    }
    dev.synchronize().unwrap();
    let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(N);
    println!("  {what}: {us:.1} µs, {:.1} GFLOP/s", flops / us * 1e-3);
}

fn ptx(name: &str) -> String {
    let path = format!("{}/tests/ptx/{name}.sm_80.ptx", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn up(dev: &CudaDevice, v: &[f32]) -> DeviceBuffer<f32> {
    dev.upload(v).unwrap()
}

/// f16 values packed two per f32 word (bit patterns), so that an f16 buffer can be passed
/// through `KernelArg::Buffer`: the kernel only uses the descriptor's pointer (the size
/// field then counts words, which the kernels never read).
fn pack_f16(v: &[f32]) -> Vec<f32> {
    v.chunks(2)
        .map(|p| {
            let lo = u32::from(f32_to_f16(p[0]));
            let hi = u32::from(f32_to_f16(*p.get(1).unwrap_or(&0.0)));
            f32::from_bits(lo | (hi << 16))
        })
        .collect()
}

fn unpack_f16(w: &[f32], n: usize) -> Vec<f32> {
    w.iter()
        .flat_map(|x| {
            let b = x.to_bits();
            [f16_to_f32(b as u16), f16_to_f32((b >> 16) as u16)]
        })
        .take(n)
        .collect()
}

#[test]
fn conv_kernels_match_cpu() {
    let Some(dev) = device("conv") else { return };
    for (ci, c) in CONV_CASES.iter().enumerate() {
        if c.mma && sm_version(&dev) < 80 {
            println!("SKIPPED: {} needs mma.sync (sm_80+)", c.name);
            continue;
        }
        let k = dev.load_ptx(&ptx(c.name), c.name).unwrap();
        let (xl, wl, yl) = c.lens();
        let mut x = values(xl, 100 + ci as u64);
        let mut w = values(wl, 200 + ci as u64);
        let bias = values(c.dims[4], 300 + ci as u64);
        let res = values(yl, 400 + ci as u64);
        let (xd, wd) = if c.mma {
            // f16 X and W; the reference sees the rounded values.
            x = round_f16(&x);
            w = round_f16(&w);
            (up(&dev, &pack_f16(&x)), up(&dev, &pack_f16(&w)))
        } else {
            (up(&dev, &x), up(&dev, &w))
        };
        let (bd, rd) = (up(&dev, &bias), up(&dev, &res));
        let yd = dev.zeros::<f32>(yl).unwrap();
        let mut args = vec![KernelArg::Buffer(xd.raw()), KernelArg::Buffer(wd.raw())];
        if c.epilogue[0] {
            args.push(KernelArg::Buffer(bd.raw()));
        }
        if c.epilogue[1] {
            args.push(KernelArg::Buffer(rd.raw()));
        }
        args.push(KernelArg::Buffer(yd.raw()));
        let (grid, block) = c.launch();
        // SAFETY: the arguments match the kernel generated for this case (static shapes).
        unsafe { dev.launch(&k, grid, block, 0, &args).unwrap() };
        let y = dev.download(&yd).unwrap();
        let want = conv_cpu(
            c,
            &x,
            &w,
            c.epilogue[0].then_some(&bias[..]),
            c.epilogue[1].then_some(&res[..]),
        );
        let e = rel_err(&y, &want);
        let tol = if c.mma { 1e-2 } else { 1e-4 };
        println!("{}: rel err {e:.2e} (tolerance {tol:.0e})", c.name);
        assert!(e <= tol, "{}: relative error {e}", c.name);
        let [_, ch, _, _, _, kh, kw] = c.dims;
        let taps = if c.depthwise { kh * kw } else { ch * kh * kw };
        // SAFETY: the same launch as above.
        unsafe {
            time_kernel(
                &dev,
                &k,
                (grid, block),
                &args,
                c.name,
                2.0 * (yl * taps) as f64,
            )
        };
    }
}

#[test]
fn row_kernels_match_cpu() {
    let Some(dev) = device("rows") else { return };
    for c in ROW_CASES {
        let k = dev.load_ptx(&ptx(c.name), c.name).unwrap();
        for (si, &(rows, n)) in c.shapes.iter().enumerate() {
            let x: Vec<f32> = values(rows * n, 500 + si as u64)
                .iter()
                .map(|v| v * 4.0 + 1.0)
                .collect();
            let xd = up(&dev, &x);
            let (grid, block) = c.launch(rows);
            let (got, want) = if c.op == "layernorm" {
                let (s, b) = (values(n, 600), values(n, 700));
                let (sd, bd) = (up(&dev, &s), up(&dev, &b));
                let yd = dev.zeros::<f32>(rows * n).unwrap();
                let eps = 1e-5;
                let args = [
                    KernelArg::Buffer(xd.raw()),
                    KernelArg::Buffer(sd.raw()),
                    KernelArg::Buffer(bd.raw()),
                    KernelArg::Buffer(yd.raw()),
                    KernelArg::Index(rows as i64),
                    KernelArg::Index(n as i64),
                    KernelArg::F32(eps),
                ];
                // SAFETY: `layer_norm`'s parameters; buffers of rows·n and n values.
                unsafe { dev.launch(&k, grid, block, 0, &args).unwrap() };
                (
                    dev.download(&yd).unwrap(),
                    layer_norm_cpu(&x, &s, &b, n, eps),
                )
            } else {
                let yd = dev.zeros::<f32>(rows).unwrap();
                let args = [
                    KernelArg::Buffer(xd.raw()),
                    KernelArg::Buffer(yd.raw()),
                    KernelArg::Index(rows as i64),
                    KernelArg::Index(n as i64),
                ];
                // SAFETY: `reduce_rows`' parameters; buffers of rows·n and rows values.
                unsafe { dev.launch(&k, grid, block, 0, &args).unwrap() };
                (dev.download(&yd).unwrap(), reduce_cpu(c.op, &x, n))
            };
            let e = rel_err(&got, &want);
            println!("{} {rows}x{n}: rel err {e:.2e}", c.name);
            assert!(e <= 1e-4, "{} {rows}x{n}: relative error {e}", c.name);
        }
    }
}

#[test]
fn elementwise_chain_matches_cpu() {
    let Some(dev) = device("elementwise chain") else {
        return;
    };
    let k = dev.load_ptx(&ptx(EW_NAME), EW_NAME).unwrap();
    for &(rows, cols) in EW_SHAPES {
        let x: Vec<f32> = values(rows * cols, 800).iter().map(|v| v * 3.0).collect();
        let (col, row, s) = (values(cols, 801), values(rows, 802), 0.75f32);
        let (xd, cd, rd) = (up(&dev, &x), up(&dev, &col), up(&dev, &row));
        let yd = dev.zeros::<f32>(rows * cols).unwrap();
        let args = [
            KernelArg::Buffer(xd.raw()),
            KernelArg::Buffer(cd.raw()),
            KernelArg::Buffer(rd.raw()),
            KernelArg::F32(s),
            KernelArg::Buffer(yd.raw()),
            KernelArg::Index(rows as i64),
            KernelArg::Index(cols as i64),
        ];
        // Few blocks: the grid-stride loop covers the rest.
        let grid = [((rows * cols) as u32).div_ceil(256).min(64), 1, 1];
        // SAFETY: the chain's parameters; buffers of rows·cols, cols, rows values.
        unsafe { dev.launch(&k, grid, [256, 1, 1], 0, &args).unwrap() };
        let y = dev.download(&yd).unwrap();
        let e = rel_err(&y, &ew_case_cpu(&x, &col, &row, s, cols));
        println!("{EW_NAME} {rows}x{cols}: rel err {e:.2e}");
        assert!(e <= 1e-4, "{rows}x{cols}: relative error {e}");
    }
}

#[test]
fn attention_kernels_match_cpu() {
    let Some(dev) = device("attention") else {
        return;
    };
    for (ci, c) in ATTN_CASES.iter().enumerate() {
        if c.mma && sm_version(&dev) < 80 {
            println!("SKIPPED: {} needs mma.sync (sm_80+)", c.name);
            continue;
        }
        let k = dev.load_ptx(&ptx(c.name), c.name).unwrap();
        let [bh, sq, skv, d] = c.dims;
        let seed = 900 + 10 * ci as u64;
        let scale2 = |v: Vec<f32>| v.into_iter().map(|x| x * 2.0).collect::<Vec<f32>>();
        let (mut q, mut kk, mut v) = (
            scale2(values(bh * sq * d, seed)),
            scale2(values(bh * skv * d, seed + 1)),
            values(bh * skv * d, seed + 2),
        );
        let out_len = bh * sq * d;
        let (qd, kd, vd, od) = if c.f16 {
            // The reference sees the values the f16 buffers hold.
            q = round_f16(&q);
            kk = round_f16(&kk);
            v = round_f16(&v);
            (
                up(&dev, &pack_f16(&q)),
                up(&dev, &pack_f16(&kk)),
                up(&dev, &pack_f16(&v)),
                dev.zeros::<f32>(out_len.div_ceil(2)).unwrap(),
            )
        } else {
            (
                up(&dev, &q),
                up(&dev, &kk),
                up(&dev, &v),
                dev.zeros::<f32>(out_len).unwrap(),
            )
        };
        let args = [
            KernelArg::Buffer(qd.raw()),
            KernelArg::Buffer(kd.raw()),
            KernelArg::Buffer(vd.raw()),
            KernelArg::Buffer(od.raw()),
            KernelArg::Index(bh as i64),
            KernelArg::Index(sq as i64),
            KernelArg::Index(skv as i64),
        ];
        let (grid, block) = c.launch();
        // SAFETY: `attention`'s parameters; Q, O hold bh·sq·d and K, V bh·skv·d elements.
        unsafe { dev.launch(&k, grid, block, 0, &args).unwrap() };
        let raw = dev.download(&od).unwrap();
        let got = if c.f16 {
            unpack_f16(&raw, out_len)
        } else {
            raw
        };
        let want = attention_cpu(&q, &kk, &v, c.dims, c.scale(), c.causal);
        let e = rel_err(&got, &want);
        let tol = if c.f16 { 1e-2 } else { 1e-4 };
        println!("{}: rel err {e:.2e} (tolerance {tol:.0e})", c.name);
        assert!(e <= tol, "{}: relative error {e}", c.name);
        let pairs = if c.causal {
            (0..sq).map(|i| skv.min(i + 1)).sum::<usize>()
        } else {
            sq * skv
        };
        // SAFETY: the same launch as above.
        unsafe {
            time_kernel(
                &dev,
                &k,
                (grid, block),
                &args,
                c.name,
                (4 * bh * pairs * d) as f64,
            )
        };
    }
}

/// The f16 packing used above round-trips (checked without a GPU).
#[test]
fn f16_packing_round_trips() {
    let v = round_f16(&values(7, 1));
    assert_eq!(unpack_f16(&pack_f16(&v), 7), v);
    for x in [0.0f32, 1.0, -2.5, 65504.0, 6.1e-5, 3.0e-7, 1e-3] {
        let h = f16_to_f32(f32_to_f16(x));
        assert!((h - x).abs() <= x.abs() * 1e-3 + 6e-8, "{x} -> {h}");
    }
    assert_eq!(f32_to_f16(1.0), 0x3c00);
    assert_eq!(f32_to_f16(-2.0), 0xc000);
    assert!(f16_to_f32(f32_to_f16(1e6)).is_infinite());
}
