//! CPU references for the GPU op kernels (`kiln_codegen::gpu::kernels::{conv, depthwise,
//! norm, reduce, elementwise, attention}`): exactly the layouts and semantics the kernels
//! implement, plus the test cases whose PTX the CUDA runtime test loads. Plain `std` Rust,
//! shared by `codegen/tests/gpu_ops_ptx.rs` (which checks these references against
//! `kiln_ir::interp`) and `runtime/tests/cuda_ops.rs` (which runs the kernels against them,
//! `#[path]`-included so that the runtime's tests need no code generator).

#![allow(dead_code)]

/// One convolution test case (f32).
#[derive(Debug, Clone, Copy)]
pub struct ConvCase {
    /// Kernel entry name (and fixture file stem).
    pub name: &'static str,
    /// `[n, c, h, w, oc, kh, kw]`.
    pub dims: [usize; 7],
    /// Strides `(h, w)`.
    pub stride: [usize; 2],
    /// Pads `(top, left, bottom, right)`.
    pub pads: [usize; 4],
    /// Dilations `(h, w)`.
    pub dilation: [usize; 2],
    /// NHWC activations and `[OC, KH, KW, C]` weights (else NCHW, `[OC, C, KH, KW]`).
    pub nhwc: bool,
    /// Depthwise (groups = C = OC, weights `[C, 1, KH, KW]`, NCHW only).
    pub depthwise: bool,
    /// Epilogue: `+ bias[oc]`, `+ residual`, relu.
    pub epilogue: [bool; 3],
    /// Schedule `[bm, bn, bk, tm, tn]` (ignored for depthwise; `[warps, n_tiles, ..]` for
    /// the tensor-core kernel).
    pub tile: [u32; 5],
    /// f16 X and W on tensor cores (`conv_mma`; f32 bias, residual and Y).
    pub mma: bool,
}

impl ConvCase {
    /// Output height.
    pub fn oh(&self) -> usize {
        let [_, _, h, _, _, kh, _] = self.dims;
        (h + self.pads[0] + self.pads[2] - self.dilation[0] * (kh - 1) - 1) / self.stride[0] + 1
    }

    /// Output width.
    pub fn ow(&self) -> usize {
        let [_, _, _, w, _, _, kw] = self.dims;
        (w + self.pads[1] + self.pads[3] - self.dilation[1] * (kw - 1) - 1) / self.stride[1] + 1
    }

    /// Elements of X, W, Y.
    pub fn lens(&self) -> (usize, usize, usize) {
        let [n, c, h, w, oc, kh, kw] = self.dims;
        let wl = if self.depthwise {
            c * kh * kw
        } else {
            oc * c * kh * kw
        };
        (n * c * h * w, wl, n * oc * self.oh() * self.ow())
    }

    /// Launch geometry: implicit GEMM `(ceil(M / bm), ceil(OC / bn))` blocks of
    /// `(bm/tm)·(bn/tn)` threads; depthwise one thread per output in blocks of 256.
    pub fn launch(&self) -> ([u32; 3], [u32; 3]) {
        let [n, _, _, _, oc, _, _] = self.dims;
        if self.depthwise {
            let total = self.lens().2 as u32;
            return ([total.div_ceil(256).min(4096), 1, 1], [256, 1, 1]);
        }
        if self.mma {
            // 16 pixels per warp, 8 channels per mma tile, 32 threads per warp.
            let (bm, bn) = (16 * self.tile[0], 8 * self.tile[1]);
            let m = (n * self.oh() * self.ow()) as u32;
            return (
                [m.div_ceil(bm), (oc as u32).div_ceil(bn), 1],
                [32 * self.tile[0], 1, 1],
            );
        }
        let [bm, bn, _, tm, tn] = self.tile;
        let m = (n * self.oh() * self.ow()) as u32;
        (
            [m.div_ceil(bm), (oc as u32).div_ceil(bn), 1],
            [(bm / tm) * (bn / tn), 1, 1],
        )
    }
}

/// The conv cases the CUDA test runs (and whose PTX `gpu_ops_ptx.rs` keeps current).
pub const CONV_CASES: &[ConvCase] = &[
    // Odd sizes, asymmetric pads, stride and dilation; default schedule.
    ConvCase {
        name: "kiln_t_conv_nchw_odd",
        dims: [2, 3, 17, 15, 10, 3, 3],
        stride: [2, 1],
        pads: [1, 2, 0, 1],
        dilation: [1, 2],
        nhwc: false,
        depthwise: false,
        epilogue: [true, false, true],
        tile: [64, 64, 16, 4, 4],
        mma: false,
    },
    // A ResNet-like 3×3 layer in NHWC with bias + residual + relu, smaller tiles.
    ConvCase {
        name: "kiln_t_conv_nhwc_res",
        dims: [1, 32, 14, 14, 48, 3, 3],
        stride: [1, 1],
        pads: [1, 1, 1, 1],
        dilation: [1, 1],
        nhwc: true,
        depthwise: false,
        epilogue: [true, true, true],
        tile: [32, 64, 8, 2, 4],
        mma: false,
    },
    // 1×1 projection, NCHW, no epilogue, tall tiles.
    ConvCase {
        name: "kiln_t_conv_nchw_1x1",
        dims: [2, 64, 8, 8, 96, 1, 1],
        stride: [1, 1],
        pads: [0, 0, 0, 0],
        dilation: [1, 1],
        nhwc: false,
        depthwise: false,
        epilogue: [false, false, false],
        tile: [128, 32, 16, 8, 2],
        mma: false,
    },
    // Strided 7×7 stem in NHWC with 3 channels (K = 147, not a multiple of bk).
    ConvCase {
        name: "kiln_t_conv_nhwc_stem",
        dims: [1, 3, 32, 32, 16, 7, 7],
        stride: [2, 2],
        pads: [3, 3, 3, 3],
        dilation: [1, 1],
        nhwc: true,
        depthwise: false,
        epilogue: [true, false, false],
        tile: [64, 16, 8, 4, 1],
        mma: false,
    },
    // Depthwise 3×3, stride 2, pads, bias + relu.
    ConvCase {
        name: "kiln_t_dwconv_s2",
        dims: [2, 16, 13, 11, 16, 3, 3],
        stride: [2, 2],
        pads: [1, 1, 1, 1],
        dilation: [1, 1],
        nhwc: false,
        depthwise: true,
        epilogue: [true, false, true],
        tile: [0; 5],
        mma: false,
    },
    // Depthwise 5×5, dilation 2, unpadded, residual.
    ConvCase {
        name: "kiln_t_dwconv_d2",
        dims: [1, 8, 20, 18, 8, 5, 5],
        stride: [1, 1],
        pads: [0, 0, 0, 0],
        dilation: [2, 2],
        nhwc: false,
        depthwise: true,
        epilogue: [false, true, false],
        tile: [0; 5],
        mma: false,
    },
    // Tensor cores, NHWC, odd channel counts (K = 45, not a multiple of 16), residual.
    ConvCase {
        name: "kiln_t_conv_f16_mma_nhwc",
        dims: [2, 5, 11, 9, 20, 3, 3],
        stride: [1, 2],
        pads: [1, 1, 1, 1],
        dilation: [1, 1],
        nhwc: true,
        depthwise: false,
        epilogue: [true, true, true],
        tile: [4, 2, 0, 0, 0],
        mma: true,
    },
    // Tensor cores, NCHW, 64 → 48 channels 3×3, default tiling.
    ConvCase {
        name: "kiln_t_conv_f16_mma_nchw",
        dims: [1, 64, 10, 10, 48, 3, 3],
        stride: [1, 1],
        pads: [1, 1, 1, 1],
        dilation: [1, 1],
        nhwc: false,
        depthwise: false,
        epilogue: [true, false, false],
        tile: [4, 4, 0, 0, 0],
        mma: true,
    },
];

/// `Y = epi(conv(X, W))` for `case`, in the case's layout (`x`, `w`, `y` as the kernel
/// reads and writes them).
pub fn conv_cpu(
    case: &ConvCase,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
) -> Vec<f32> {
    let [n, c, h, wd, oc, kh, kw] = case.dims;
    let (oh, ow) = (case.oh(), case.ow());
    let mut y = vec![0.0f32; n * oc * oh * ow];
    let xi = |b: usize, ch: usize, i: usize, j: usize| {
        if case.nhwc {
            ((b * h + i) * wd + j) * c + ch
        } else {
            ((b * c + ch) * h + i) * wd + j
        }
    };
    let yi = |b: usize, o: usize, i: usize, j: usize| {
        if case.nhwc {
            ((b * oh + i) * ow + j) * oc + o
        } else {
            ((b * oc + o) * oh + i) * ow + j
        }
    };
    for b in 0..n {
        for o in 0..oc {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = 0.0f64;
                    let chans = if case.depthwise { o..o + 1 } else { 0..c };
                    for ch in chans {
                        for p in 0..kh {
                            for q in 0..kw {
                                let iy = (i * case.stride[0] + p * case.dilation[0]) as isize
                                    - case.pads[0] as isize;
                                let ix = (j * case.stride[1] + q * case.dilation[1]) as isize
                                    - case.pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let wv = if case.depthwise {
                                    w[(o * kh + p) * kw + q]
                                } else if case.nhwc {
                                    w[((o * kh + p) * kw + q) * c + ch]
                                } else {
                                    w[((o * c + ch) * kh + p) * kw + q]
                                };
                                let xv = x[xi(b, ch, iy as usize, ix as usize)];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    let at = yi(b, o, i, j);
                    let mut v = acc as f32;
                    if case.epilogue[0] {
                        v += bias.expect("bias")[o];
                    }
                    if case.epilogue[1] {
                        v += res.expect("residual")[at];
                    }
                    if case.epilogue[2] {
                        v = v.max(0.0);
                    }
                    y[at] = v;
                }
            }
        }
    }
    y
}

/// `[n, c, h, w]` → `[n, h, w, c]` (also `[OC, C, KH, KW]` → `[OC, KH, KW, C]`).
pub fn nchw_to_nhwc(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    y[((b * h + i) * w + j) * c + ch] = x[((b * c + ch) * h + i) * w + j];
                }
            }
        }
    }
    y
}

/// `[n, h, w, c]` → `[n, c, h, w]`.
pub fn nhwc_to_nchw(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    y[((b * c + ch) * h + i) * w + j] = x[((b * h + i) * w + j) * c + ch];
                }
            }
        }
    }
    y
}

/// LayerNorm over rows of `n`: `(x - mean) / sqrt(var + eps) · scale + bias` (population
/// variance, f64 accumulation).
pub fn layer_norm_cpu(x: &[f32], scale: &[f32], bias: &[f32], n: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks(n).zip(y.chunks_mut(n)) {
        let mean = xr.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = xr
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let rstd = 1.0 / (var + f64::from(eps)).sqrt();
        for j in 0..n {
            yr[j] = ((f64::from(xr[j]) - mean) * rstd * f64::from(scale[j]) + f64::from(bias[j]))
                as f32;
        }
    }
    y
}

/// Last-axis reduction of rows of `n` (`"sum"`, `"mean"`, `"max"`), one value per row.
pub fn reduce_cpu(kind: &str, x: &[f32], n: usize) -> Vec<f32> {
    x.chunks(n)
        .map(|r| match kind {
            "sum" => r.iter().map(|&v| f64::from(v)).sum::<f64>() as f32,
            "mean" => (r.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64) as f32,
            "max" => r.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            _ => panic!("unknown reduction {kind}"),
        })
        .collect()
}

/// One attention test case.
#[derive(Debug, Clone, Copy)]
pub struct AttnCase {
    /// Kernel entry name (and fixture file stem).
    pub name: &'static str,
    /// `[bh, sq, skv, d]`.
    pub dims: [usize; 4],
    /// Causal (top-left aligned) mask.
    pub causal: bool,
    /// f16 buffers (else f32).
    pub f16: bool,
    /// The tensor-core kernel (`attention_mma`, f16): 16 query rows per warp.
    pub mma: bool,
}

impl AttnCase {
    /// Grid `(ceil(sq / rows), bh)` of blocks `(32, 4)`: 4 warps, one query row each
    /// (`rows` = 4), or 16 each on tensor cores (`rows` = 64).
    pub fn launch(&self) -> ([u32; 3], [u32; 3]) {
        let [bh, sq, _, _] = self.dims;
        let rows = if self.mma { 64 } else { 4 };
        (
            [(sq as u32).div_ceil(rows).max(1), bh as u32, 1],
            [32, 4, 1],
        )
    }

    /// `1 / sqrt(d)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.dims[3] as f32).sqrt()
    }
}

/// The attention cases the CUDA test runs.
pub const ATTN_CASES: &[AttnCase] = &[
    AttnCase {
        name: "kiln_t_attn_f32",
        dims: [3, 50, 77, 64],
        causal: false,
        f16: false,
        mma: false,
    },
    AttnCase {
        name: "kiln_t_attn_f32_causal_d32",
        dims: [2, 70, 70, 32],
        causal: true,
        f16: false,
        mma: false,
    },
    AttnCase {
        name: "kiln_t_attn_f32_d128",
        dims: [2, 9, 130, 128],
        causal: false,
        f16: false,
        mma: false,
    },
    AttnCase {
        name: "kiln_t_attn_f16_causal",
        dims: [4, 65, 65, 64],
        causal: true,
        f16: true,
        mma: false,
    },
    AttnCase {
        name: "kiln_t_attn_f16_mma",
        dims: [3, 50, 77, 64],
        causal: false,
        f16: true,
        mma: true,
    },
    AttnCase {
        name: "kiln_t_attn_f16_mma_causal",
        dims: [2, 130, 130, 32],
        causal: true,
        f16: true,
        mma: true,
    },
];

/// `softmax(q·kᵀ·scale [causal: j ≤ i]) · v` for `q: [bh, sq, d]`, `k, v: [bh, skv, d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [bh, sq, skv, d]: [usize; 4],
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    let mut o = vec![0.0f32; bh * sq * d];
    for b in 0..bh {
        for i in 0..sq {
            let qi = &q[(b * sq + i) * d..][..d];
            let n = if causal { skv.min(i + 1) } else { skv };
            let s: Vec<f64> = (0..n)
                .map(|j| {
                    let kj = &k[(b * skv + j) * d..][..d];
                    qi.iter()
                        .zip(kj)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
            let l: f64 = p.iter().sum();
            for c in 0..d {
                let acc: f64 = (0..n)
                    .map(|j| p[j] * f64::from(v[(b * skv + j) * d + c]))
                    .sum();
                o[(b * sq + i) * d + c] = if l > 0.0 { (acc / l) as f32 } else { 0.0 };
            }
        }
    }
    o
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
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

/// Normwise relative error `max |got - want| / max(max |want|, 1e-30)`.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths");
    let scale = want.iter().fold(0.0f32, |a, &w| a.max(w.abs())).max(1e-30);
    let err = got.iter().zip(want).fold(0.0f32, |a, (&g, &w)| {
        if (g - w).is_nan() {
            f32::INFINITY
        } else {
            a.max((g - w).abs())
        }
    });
    err / scale
}

/// IEEE binary16 bits of `x` (round to nearest even; overflow to ±inf).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal: shift the implicit-one mantissa into place, round to nearest even.
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rest = m & ((1 << shift) - 1);
        if rest > half || (rest == half && (r & 1) == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && (r & 1) == 1) {
        r += 1; // may carry into the exponent (and up to inf), which is correct
    }
    sign | r as u16
}

/// The f32 value of IEEE binary16 bits.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value = m · 2^-24.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Rounds every value through f16 (what an f16 buffer holds).
pub fn round_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f16_to_f32(f32_to_f16(v))).collect()
}

/// Rounds every value to bf16, to nearest even (what a bf16 buffer holds).
pub fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|v| {
            let b = v.to_bits();
            f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
        })
        .collect()
}

/// One last-axis row kernel case (LayerNorm or a reduction) and the shapes it runs on.
#[derive(Debug, Clone, Copy)]
pub struct RowCase {
    /// Kernel entry name (and fixture file stem).
    pub name: &'static str,
    /// `"layernorm"`, `"sum"`, `"mean"` or `"max"`.
    pub op: &'static str,
    /// One block of 256 threads per row (else one warp per row, 4 rows per block).
    pub block: bool,
    /// `(rows, n)` shapes the runtime test runs (the kernel takes both at run time).
    pub shapes: &'static [(usize, usize)],
}

impl RowCase {
    /// Grid and block for `rows` rows.
    pub fn launch(&self, rows: usize) -> ([u32; 3], [u32; 3]) {
        if self.block {
            ([rows as u32, 1, 1], [256, 1, 1])
        } else {
            ([(rows as u32).div_ceil(4), 1, 1], [32, 4, 1])
        }
    }
}

/// The row cases the CUDA test runs.
pub const ROW_CASES: &[RowCase] = &[
    RowCase {
        name: "kiln_t_layernorm_warp",
        op: "layernorm",
        block: false,
        shapes: &[(37, 200), (8, 768), (5, 1), (3, 33)],
    },
    RowCase {
        name: "kiln_t_layernorm_block",
        op: "layernorm",
        block: true,
        shapes: &[(5, 3000), (2, 4096), (3, 100)],
    },
    RowCase {
        name: "kiln_t_reduce_mean_warp",
        op: "mean",
        block: false,
        shapes: &[(37, 200), (6, 31)],
    },
    RowCase {
        name: "kiln_t_reduce_sum_block",
        op: "sum",
        block: true,
        shapes: &[(5, 3000), (4, 257)],
    },
    RowCase {
        name: "kiln_t_reduce_max_warp",
        op: "max",
        block: false,
        shapes: &[(9, 100)],
    },
];

/// The elementwise-chain kernel of the runtime test:
/// `y = sigmoid(tanh(x · col + row) - relu(x) · s)` over `rows × cols`, `col: [cols]`,
/// `row: [rows, 1]`, parameters `(x, col, row, s, y, rows, cols)`.
pub const EW_NAME: &str = "kiln_t_ew_chain";

/// `(rows, cols)` shapes the runtime test runs the chain on.
pub const EW_SHAPES: &[(usize, usize)] = &[(7, 13), (300, 1001), (1, 1)];

/// The CPU semantics of the [`EW_NAME`] chain.
pub fn ew_case_cpu(x: &[f32], col: &[f32], row: &[f32], s: f32, cols: usize) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let t = (v * col[i % cols] + row[i / cols]).tanh();
            let d = t - v.max(0.0) * s;
            1.0 / (1.0 + (-d).exp())
        })
        .collect()
}
