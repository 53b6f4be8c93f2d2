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

// ---------------------------------------------------------------------------------------
// Tensor-core GEMMs (`kiln_codegen::gpu::kernels::gemm_mma`), fixtures and launch geometry
// from `tests/ptx/gemm_mma.manifest` (written by `codegen/tests/gpu_gemm_ptx.rs`).

/// One manifest line: `file entry bm bn threads dyn_smem split_k`.
struct MmaFixture {
    entry: String,
    bm: u32,
    bn: u32,
    threads: u32,
    smem: u32,
    split_k: u32,
}

const MMA_MANIFEST: &str = include_str!("ptx/gemm_mma.manifest");

fn mma_fixture(entry: &str) -> MmaFixture {
    let line = MMA_MANIFEST
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(entry))
        .unwrap_or_else(|| panic!("{entry} not in gemm_mma.manifest"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let n = |i: usize| f[i].parse::<u32>().unwrap();
    MmaFixture {
        entry: f[1].to_string(),
        bm: n(2),
        bn: n(3),
        threads: n(4),
        smem: n(5),
        split_k: n(6),
    }
}

/// Input / output element types of the mma fixtures.
#[derive(Clone, Copy, PartialEq)]
enum Ty {
    F32,
    F16,
    BF16,
}

impl Ty {
    /// Rounds to the type (the values the GPU sees).
    fn round(self, v: f32) -> f32 {
        match self {
            Ty::F32 => v,
            Ty::F16 => half::f16::from_f32(v).to_f32(),
            Ty::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }

    fn bits(self, v: &[f32]) -> Vec<u16> {
        match self {
            Ty::F16 => v
                .iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect(),
            Ty::BF16 => v
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect(),
            Ty::F32 => unreachable!("f32 has no 16-bit form"),
        }
    }

    fn decode(self, v: &[u16]) -> Vec<f32> {
        match self {
            Ty::F16 => v
                .iter()
                .map(|&x| half::f16::from_bits(x).to_f32())
                .collect(),
            Ty::BF16 => v
                .iter()
                .map(|&x| half::bf16::from_bits(x).to_f32())
                .collect(),
            Ty::F32 => unreachable!("f32 has no 16-bit form"),
        }
    }
}

/// A device buffer of either width.
enum Buf {
    F32(kiln_runtime::cuda::DeviceBuffer<f32>),
    Half(kiln_runtime::cuda::DeviceBuffer<u16>),
}

impl Buf {
    fn new(dev: &CudaDevice, ty: Ty, v: &[f32]) -> Buf {
        match ty {
            Ty::F32 => Buf::F32(dev.upload(v).unwrap()),
            _ => Buf::Half(dev.upload(&ty.bits(v)).unwrap()),
        }
    }

    fn arg(&self) -> KernelArg<'_> {
        match self {
            Buf::F32(b) => KernelArg::Buffer(b.raw()),
            Buf::Half(b) => KernelArg::Half(b.raw16()),
        }
    }

    fn get(&self, dev: &CudaDevice, ty: Ty) -> Vec<f32> {
        match self {
            Buf::F32(b) => dev.download(b).unwrap(),
            Buf::Half(b) => ty.decode(&dev.download(b).unwrap()),
        }
    }
}

/// The epilogue of a fixture (mirrors `kernels::epilogue::Epilogue::apply`: alpha·acc,
/// + bias, + beta·R before or after the activation).
#[derive(Clone, Copy)]
struct Epi {
    bias: bool,
    act: fn(f32) -> f32,
    /// 0: no residual, 1: before the activation, 2: after.
    residual: u8,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

/// Runs one fixture on `(m, n, k)` × `batch` against the CPU reference.
#[allow(clippy::too_many_arguments)]
fn run_mma(
    dev: &CudaDevice,
    entry: &str,
    tin: Ty,
    tout: Ty,
    epi: Epi,
    dims: (usize, usize, usize),
    batch: usize,
) {
    let fx = mma_fixture(entry);
    let ptx = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(
        format!(
            "tests/ptx/{}",
            MMA_MANIFEST
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(entry))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
        ),
    ))
    .unwrap();
    let kern = dev.load_ptx(&ptx, &fx.entry).unwrap();
    let (m, n, k) = dims;
    // Batch strides: A and C packed, B shared by all batches (stride 0) when batch > 1.
    let (sa, sb, sc) = (m * k, if batch > 1 { 0 } else { k * n }, m * n);
    let a: Vec<f32> = values(batch * sa, 11)
        .iter()
        .map(|&v| tin.round(v))
        .collect();
    let b: Vec<f32> = values(k * n, 12).iter().map(|&v| tin.round(v)).collect();
    let bias: Vec<f32> = values(n, 13);
    let r: Vec<f32> = values(batch * sc, 14)
        .iter()
        .map(|&v| tout.round(v))
        .collect();
    let (alpha, beta) = (0.75f32, 0.5f32);
    let ad = Buf::new(dev, tin, &a);
    let bd = Buf::new(dev, tin, &b);
    let cd = Buf::new(dev, tout, &vec![0.0; batch * sc]);
    let biasd = dev.upload(&bias).unwrap();
    let rd = Buf::new(dev, tout, &r);
    let mut args = vec![ad.arg(), bd.arg(), cd.arg()];
    if epi.bias {
        args.push(KernelArg::Buffer(biasd.raw()));
    }
    if epi.residual > 0 {
        args.push(rd.arg());
    }
    for v in [m, n, k, sa, sb, sc] {
        args.push(KernelArg::Index(v as i64));
    }
    args.push(KernelArg::F32(alpha));
    if epi.residual > 0 {
        args.push(KernelArg::F32(beta));
    }
    let grid = [
        (n as u32).div_ceil(fx.bn),
        (m as u32).div_ceil(fx.bm),
        batch as u32 * fx.split_k,
    ];
    // SAFETY: the arguments follow `gemm_mma`'s parameter list for this fixture's
    // epilogue; the buffers hold batch·M·K, K·N, batch·M·N elements (C zeroed: split-K adds).
    unsafe {
        dev.launch(&kern, grid, [fx.threads, 1, 1], fx.smem, &args)
            .unwrap()
    };
    let c = cd.get(dev, tout);
    let mut worst = 0.0f32;
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let acc: f32 = (0..k)
                    .map(|p| a[z * sa + i * k + p] * b[z * sb + p * n + j])
                    .sum();
                let ix = z * sc + i * n + j;
                let mut y = alpha * acc;
                if epi.bias {
                    y += bias[j];
                }
                if epi.residual == 1 {
                    y += beta * r[ix];
                }
                y = (epi.act)(y);
                if epi.residual == 2 {
                    y += beta * r[ix];
                }
                let err = (c[ix] - y).abs() / y.abs().max(1.0);
                worst = worst.max(err);
                assert!(
                    err <= 1e-2,
                    "{entry} {m}x{n}x{k} batch {z}: C[{i},{j}] = {}, want {y}",
                    c[ix]
                );
            }
        }
    }
    println!("{entry} {m}x{n}x{k} x{batch}: ok (max rel. error {worst:.2e})");
}

/// Shapes with edges in M, N and K (N and K multiples of 8 for the 16-byte copies).
const MMA_SHAPES: [(usize, usize, usize); 4] =
    [(67, 136, 72), (256, 256, 256), (1, 8, 8), (130, 200, 520)];

#[test]
fn mma_f16_gemm_matches_cpu() {
    let Some(dev) = device("mma f16") else { return };
    let plain = Epi {
        bias: false,
        act: |x| x,
        residual: 0,
    };
    for dims in MMA_SHAPES {
        run_mma(&dev, "kiln_mma_f16_f32", Ty::F16, Ty::F32, plain, dims, 1);
    }
    run_mma(
        &dev,
        "kiln_mma_f16_f32",
        Ty::F16,
        Ty::F32,
        plain,
        (96, 64, 40),
        3,
    );
}

#[test]
fn mma_f16_gemm_with_epilogue_matches_cpu() {
    let Some(dev) = device("mma f16 epilogue") else {
        return;
    };
    let epi = Epi {
        bias: true,
        act: |x| x * sigmoid(x),
        residual: 1,
    };
    for dims in MMA_SHAPES {
        run_mma(&dev, "kiln_mma_f16_f16_epi", Ty::F16, Ty::F16, epi, dims, 1);
    }
    run_mma(
        &dev,
        "kiln_mma_f16_f16_epi",
        Ty::F16,
        Ty::F16,
        epi,
        (70, 72, 64),
        2,
    );
}

#[test]
fn mma_bf16_gemm_matches_cpu() {
    let Some(dev) = device("mma bf16") else {
        return;
    };
    let epi = Epi {
        bias: true,
        act: gelu_tanh,
        residual: 2,
    };
    for dims in MMA_SHAPES {
        run_mma(
            &dev,
            "kiln_mma_bf16_bf16_epi",
            Ty::BF16,
            Ty::BF16,
            epi,
            dims,
            1,
        );
    }
}

#[test]
fn mma_tf32_gemm_matches_cpu() {
    let Some(dev) = device("mma tf32") else {
        return;
    };
    let epi = Epi {
        bias: true,
        act: |x| x.max(0.0),
        residual: 0,
    };
    for dims in MMA_SHAPES {
        run_mma(
            &dev,
            "kiln_mma_tf32_f32_relu",
            Ty::F32,
            Ty::F32,
            epi,
            dims,
            1,
        );
    }
}

#[test]
fn mma_split_k_gemm_matches_cpu() {
    let Some(dev) = device("mma split-K") else {
        return;
    };
    let epi = Epi {
        bias: true,
        act: |x| x,
        residual: 2,
    };
    // K = 36: fewer k tiles than splits for some blocks' ranges; K = 1000: uneven splits.
    for dims in [(67, 136, 36), (128, 64, 1000), (1, 4, 4)] {
        run_mma(
            &dev,
            "kiln_mma_f16_f32_splitk",
            Ty::F16,
            Ty::F32,
            epi,
            dims,
            2,
        );
    }
}

// ---------------------------------------------------------------------------------------
// sm_90a warpgroup GEMMs (`gemm_wgmma`): TMA descriptors encoded here the way
// `WgmmaGemm::tensor_maps` describes (A: dims [K, M], box [64, rows]; B: dims [N, K],
// box [64, 64]); fixtures and geometry (`file entry bn rows threads dynamic_shared`) from
// `tests/ptx/gemm_wgmma.manifest`.

const WGMMA_MANIFEST: &str = include_str!("ptx/gemm_wgmma.manifest");

/// Runs one wgmma fixture on `m × n × k` against the CPU reference (sm_90 only).
fn run_wgmma(
    dev: &CudaDevice,
    entry: &str,
    tin: Ty,
    tout: Ty,
    epi: Epi,
    dims: (usize, usize, usize),
) {
    use kiln_runtime::cuda::Elem16;
    let line = WGMMA_MANIFEST
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(entry))
        .unwrap_or_else(|| panic!("{entry} not in gemm_wgmma.manifest"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let [bn, rows, threads, smem]: [u32; 4] = [2, 3, 4, 5].map(|i| f[i].parse().unwrap());
    let ptx = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/ptx")
            .join(f[0]),
    )
    .unwrap();
    let kern = dev.load_ptx(&ptx, entry).unwrap();
    let (m, n, k) = dims;
    let a: Vec<f32> = values(m * k, 21).iter().map(|&v| tin.round(v)).collect();
    let b: Vec<f32> = values(k * n, 22).iter().map(|&v| tin.round(v)).collect();
    let bias = values(n, 23);
    let r: Vec<f32> = values(m * n, 24).iter().map(|&v| tout.round(v)).collect();
    let (alpha, beta) = (1.25f32, -0.5f32);
    let e16 = if tin == Ty::BF16 {
        Elem16::BF16
    } else {
        Elem16::F16
    };
    let ad = dev.upload(&tin.bits(&a)).unwrap();
    let bd = dev.upload(&tin.bits(&b)).unwrap();
    let (m6, n6, k6) = (m as u64, n as u64, k as u64);
    let tma = dev
        .tensor_map_2d(&ad, e16, [k6, m6], 2 * k6, [64, rows])
        .unwrap();
    let tmb = dev
        .tensor_map_2d(&bd, e16, [n6, k6], 2 * n6, [64, 64])
        .unwrap();
    let cd = Buf::new(dev, tout, &vec![0.0; m * n]);
    let biasd = dev.upload(&bias).unwrap();
    let rd = Buf::new(dev, tout, &r);
    let mut args = vec![
        KernelArg::TensorMap(tma.slice()),
        KernelArg::TensorMap(tmb.slice()),
        cd.arg(),
    ];
    if epi.bias {
        args.push(KernelArg::Buffer(biasd.raw()));
    }
    if epi.residual > 0 {
        args.push(rd.arg());
    }
    for v in [m, n, k] {
        args.push(KernelArg::Index(v as i64));
    }
    args.push(KernelArg::F32(alpha));
    if epi.residual > 0 {
        args.push(KernelArg::F32(beta));
    }
    let grid = [(n as u32).div_ceil(bn), (m as u32).div_ceil(rows), 1];
    // SAFETY: the arguments follow `gemm_wgmma`'s parameter list for this fixture; the
    // tensor maps describe A (M·K) and B (K·N) exactly; C and R hold M·N values.
    unsafe {
        dev.launch(&kern, grid, [threads, 1, 1], smem, &args)
            .unwrap()
    };
    let c = cd.get(dev, tout);
    for i in 0..m {
        for j in 0..n {
            let acc: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            let ix = i * n + j;
            let mut y = alpha * acc;
            if epi.bias {
                y += bias[j];
            }
            if epi.residual == 1 {
                y += beta * r[ix];
            }
            y = (epi.act)(y);
            if epi.residual == 2 {
                y += beta * r[ix];
            }
            let err = (c[ix] - y).abs() / y.abs().max(1.0);
            assert!(
                err <= 1e-2,
                "{entry} {m}x{n}x{k}: C[{i},{j}] = {}, want {y}",
                c[ix]
            );
        }
    }
    println!("{entry} {m}x{n}x{k}: ok");
}

#[test]
fn wgmma_gemms_match_cpu_on_sm_90() {
    let Some(dev) = device("wgmma") else { return };
    if dev.arch().unwrap_or_default() != "sm_90" {
        println!("SKIPPED: wgmma needs sm_90 (this is {:?})", dev.arch());
        return;
    }
    let plain = Epi {
        bias: false,
        act: |x| x,
        residual: 0,
    };
    let epi = Epi {
        bias: true,
        act: gelu_tanh,
        residual: 2,
    };
    // Model-sized problems first (M below one tile, as in the zoo's f16 GEMMs), then larger.
    let shapes = [
        (2, 64, 32),
        (16, 96, 32),
        (128, 128, 64),
        (67, 136, 72),
        (256, 256, 512),
        (300, 200, 1000),
    ];
    for dims in shapes {
        run_wgmma(
            &dev,
            "kiln_gemm_wgmma_f16_f32",
            Ty::F16,
            Ty::F32,
            plain,
            dims,
        );
    }
    for dims in shapes {
        run_wgmma(
            &dev,
            "kiln_gemm_wgmma_bf16_bf16_epi",
            Ty::BF16,
            Ty::BF16,
            epi,
            dims,
        );
    }
    // every benchmark schedule (two warpgroups, 256-column tiles, raster bands, vector
    // epilogues) on edge shapes: partial tiles at the bottom and the right, a partial
    // last band, K not a multiple of the 64-deep stage
    let bench: Vec<&str> = WGMMA_MANIFEST
        .lines()
        .filter(|l| l.starts_with("bench_"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    for entry in bench {
        for dims in [(300, 264, 200), (1100, 520, 136), (64, 1032, 64)] {
            run_wgmma(&dev, entry, Ty::F16, Ty::F16, plain, dims);
        }
    }
}
