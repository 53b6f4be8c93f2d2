//! Fast `f32` math as plain `arith` ops, for the bodies of generated CPU kernels.
//!
//! `math.exp`, `math.tanh`, `math.erf`, ... lower to scalar libm calls (`convert-math-to-libm`),
//! which are slow and stop LLVM's loop vectoriser. The functions here emit polynomial and
//! rational approximations instead: only `arith` ops (`mulf`/`addf` with `contract`, so that
//! LLVM fuses them into FMAs; compares, selects, `bitcast` and `i32` integer ops), which the
//! loop vectoriser turns into AVX2/FMA code.
//!
//! Accuracy (measured against `f64` references by `codegen/tests/fastmath.rs` on dense sweeps):
//!
//! | function | method | max relative error |
//! |---|---|---|
//! | [`exp`] | Cody-Waite range reduction `x = n·ln2 + r`, Cephes degree-6 polynomial, `2^n` by exponent-bit arithmetic (two factors, so over/underflow are exact) | ≈ 2 ulp |
//! | [`log`] | `frexp` by bit masking (denormals prescaled), Cephes degree-8 polynomial | ≈ 2 ulp |
//! | [`tanh`] | Eigen's odd/even rational approximation, clamped to ±7.9053 | ≈ 4 ulp |
//! | [`erf`] | Eigen's odd/even rational approximation, clamped to ±4 | ≈ 4 ulp |
//! | [`sigmoid`] | `1 / (1 + exp(-x))` | ≈ 3 ulp |
//! | [`log1p`] | `log(1 + x) · x / ((1 + x) - 1)` (Goldberg's correction) | ≈ 3 ulp |
//!
//! Special values follow the C library: `exp(±inf) = inf / 0`, `exp` overflows to `inf` above
//! ≈ 88.72 and underflows through denormals to `0`; `log(0) = -inf`, `log(x < 0) = NaN`,
//! `log(inf) = inf`; `tanh(±inf) = ±1`, `erf(±inf) = ±1`; NaN inputs give NaN; signed zeros
//! are kept by `tanh` and `erf`.

use super::elementwise::Body;

/// `a * b` (`contract`).
fn mul(b: &mut Body, x: &str, y: &str) -> String {
    b.f2("mulf", x, y)
}

/// `x * m + c` as `mulf` + `addf` with `contract` (one FMA after LLVM).
fn fma(b: &mut Body, x: &str, m: &str, c: &str) -> String {
    let p = b.f2("mulf", x, m);
    b.f2("addf", &p, c)
}

/// Horner evaluation of `cs[0]·x^(n-1) + ... + cs[n-1]` (highest degree first).
fn horner(b: &mut Body, x: &str, cs: &[f64]) -> String {
    let mut p = b.fc(cs[0] as f32);
    for &c in &cs[1..] {
        let c = b.fc(c as f32);
        p = fma(b, &p, x, &c);
    }
    p
}

/// `arith.cmpf <pred>, x, y : f32`.
fn cmp(b: &mut Body, pred: &str, x: &str, y: &str) -> String {
    b.op(&format!("arith.cmpf {pred}, {x}, {y} : f32"))
}

/// `arith.select c, x, y : f32`.
fn sel(b: &mut Body, c: &str, x: &str, y: &str) -> String {
    b.op(&format!("arith.select {c}, {x}, {y} : f32"))
}

/// Clamps `x` to `[lo, hi]` with compares and selects (one `vcmpps` + `vblendvps` per bound);
/// NaN stays NaN.
fn clamp(b: &mut Body, x: &str, lo: f32, hi: f32) -> String {
    let l = b.fc(lo);
    let h = b.fc(hi);
    let below = cmp(b, "olt", x, &l);
    let x = sel(b, &below, &l, x);
    let above = cmp(b, "ogt", &x, &h);
    sel(b, &above, &h, &x)
}

/// An `i32` constant.
fn ic(b: &mut Body, v: i32) -> String {
    b.op(&format!("arith.constant {v} : i32"))
}

/// `arith.<op> x, y : i32`.
fn i2(b: &mut Body, op: &str, x: &str, y: &str) -> String {
    b.op(&format!("arith.{op} {x}, {y} : i32"))
}

/// The bits of an `f32`.
fn to_bits(b: &mut Body, x: &str) -> String {
    b.op(&format!("arith.bitcast {x} : f32 to i32"))
}

/// The `f32` with these bits.
fn from_bits(b: &mut Body, x: &str) -> String {
    b.op(&format!("arith.bitcast {x} : i32 to f32"))
}

/// `2^n` for an `i32` `n` in `[-126, 127]`, built in the exponent field.
fn pow2i(b: &mut Body, n: &str) -> String {
    let bias = ic(b, 127);
    let e = i2(b, "addi", n, &bias);
    let s = ic(b, 23);
    let bits = i2(b, "shli", &e, &s);
    from_bits(b, &bits)
}

/// `e^x` on `f32` (see the module doc for accuracy and special values).
pub(crate) fn exp(b: &mut Body, x: &str) -> String {
    // Below -104, e^x is under half the smallest denormal; above 89 it overflows. Clamping
    // keeps `n` in [-150, 128] (and passes NaN through).
    let xc = clamp(b, x, -104.0, 89.0);
    // n = round(x·log2 e) with the 1.5·2^23 trick: the addition rounds to an integer, which
    // sits in the low mantissa bits (no float-to-int conversion, no poison for NaN).
    let log2e = b.fc(std::f32::consts::LOG2_E);
    let magic = b.fc(12_582_912.0);
    let k = fma(b, &xc, &log2e, &magic);
    let n = b.f2("subf", &k, &magic);
    // r = x - n·ln2 in two parts (Cody-Waite): C1 = 355/512 has 9 bits, so n·C1 is exact.
    let c1 = b.fc(-355.0 / 512.0);
    let c2 = b.fc(2.121_944_4e-4_f64 as f32);
    let r = fma(b, &n, &c1, &xc);
    let r = fma(b, &n, &c2, &r);
    // e^r on |r| <= ln2/2 (Cephes expf).
    let p = horner(
        b,
        &r,
        &[
            1.9875691500e-4,
            1.3981999507e-3,
            8.3334519073e-3,
            4.1665795894e-2,
            1.6666665459e-1,
            5.0000001201e-1,
        ],
    );
    let r2 = mul(b, &r, &r);
    let one = b.fc(1.0);
    let r1 = b.f2("addf", &r, &one);
    let y = fma(b, &p, &r2, &r1);
    // 2^n as 2^n1 · 2^n2 with both halves in the normal range, so that results near the
    // overflow threshold and in the denormal range come out right.
    let kb = to_bits(b, &k);
    let mb = ic(b, 0x4B40_0000);
    let ni = i2(b, "subi", &kb, &mb);
    let one_i = ic(b, 1);
    let n1 = i2(b, "shrsi", &ni, &one_i);
    let n2 = i2(b, "subi", &ni, &n1);
    let s1 = pow2i(b, &n1);
    let s2 = pow2i(b, &n2);
    let y = mul(b, &y, &s1);
    mul(b, &y, &s2)
}

/// `ln x` on `f32` (see the module doc for accuracy and special values).
pub(crate) fn log(b: &mut Body, x: &str) -> String {
    // Denormals: scale by 2^23 first.
    let fmin = b.fc(f32::MIN_POSITIVE);
    let tiny = cmp(b, "olt", x, &fmin);
    let scale = b.fc(8_388_608.0);
    let xs0 = mul(b, x, &scale);
    let xs = sel(b, &tiny, &xs0, x);
    let m23 = b.fc(-23.0);
    let z0 = b.fc(0.0);
    let ebias = sel(b, &tiny, &m23, &z0);
    // frexp: x = m · 2^e with m in [0.5, 1).
    let bits = to_bits(b, &xs);
    let s23 = ic(b, 23);
    let eb = i2(b, "shrui", &bits, &s23);
    let c126 = ic(b, 126);
    let ei = i2(b, "subi", &eb, &c126);
    let mask = ic(b, 0x007F_FFFF);
    let mant = i2(b, "andi", &bits, &mask);
    let half = ic(b, 0x3F00_0000);
    let mbits = i2(b, "ori", &mant, &half);
    let m = from_bits(b, &mbits);
    let ef = b.op(&format!("arith.sitofp {ei} : i32 to f32"));
    let e = b.f2("addf", &ef, &ebias);
    // m < sqrt(1/2): use 2m - 1 and e - 1, so the polynomial argument is in [-0.29, 0.41].
    let sqrthf = b.fc(std::f32::consts::FRAC_1_SQRT_2);
    let small = cmp(b, "olt", &m, &sqrthf);
    let one = b.fc(1.0);
    let em1 = b.f2("subf", &e, &one);
    let e = sel(b, &small, &em1, &e);
    let m2 = b.f2("addf", &m, &m);
    let mm = sel(b, &small, &m2, &m);
    let f = b.f2("subf", &mm, &one);
    // ln(1 + f) (Cephes logf).
    let z = mul(b, &f, &f);
    let p = horner(
        b,
        &f,
        &[
            7.0376836292e-2,
            -1.1514610310e-1,
            1.1676998740e-1,
            -1.2420140846e-1,
            1.4249322787e-1,
            -1.6668057665e-1,
            2.0000714765e-1,
            -2.4999993993e-1,
            3.3333331174e-1,
        ],
    );
    let pf = mul(b, &p, &f);
    let y = mul(b, &pf, &z);
    let c2 = b.fc(-2.121_944_40e-4_f64 as f32);
    let y = fma(b, &e, &c2, &y);
    let mhalf = b.fc(-0.5);
    let y = fma(b, &z, &mhalf, &y);
    let r = b.f2("addf", &f, &y);
    let c1 = b.fc(355.0 / 512.0);
    let r = fma(b, &e, &c1, &r);
    // Special values.
    let inf = b.fc(f32::INFINITY);
    let is_inf = cmp(b, "oeq", x, &inf);
    let r = sel(b, &is_inf, &inf, &r);
    let is_zero = cmp(b, "oeq", x, &z0);
    let ninf = b.fc(f32::NEG_INFINITY);
    let r = sel(b, &is_zero, &ninf, &r);
    let bad = cmp(b, "ult", x, &z0);
    let nan = b.fc(f32::NAN);
    sel(b, &bad, &nan, &r)
}

/// `ln(1 + x)` on `f32`, accurate for small `x` (Goldberg: `log(w) · x / (w - 1)` with
/// `w = 1 + x`).
pub(crate) fn log1p(b: &mut Body, x: &str) -> String {
    let one = b.fc(1.0);
    let w = b.f2("addf", x, &one);
    let l = log(b, &w);
    let wm1 = b.f2("subf", &w, &one);
    let q = b.f2("divf", x, &wm1);
    let lq = mul(b, &l, &q);
    // w == 1: log1p(x) = x (to within rounding); x = inf: inf (not inf/inf).
    let exact = cmp(b, "oeq", &w, &one);
    let r = sel(b, &exact, x, &lq);
    let inf = b.fc(f32::INFINITY);
    let is_inf = cmp(b, "oeq", x, &inf);
    sel(b, &is_inf, &inf, &r)
}

/// `tanh x` on `f32` (Eigen's rational approximation; see the module doc).
pub(crate) fn tanh(b: &mut Body, x: &str) -> String {
    let c = 7.905_311_107_635_498_f64 as f32;
    let xc = clamp(b, x, -c, c);
    let x2 = mul(b, &xc, &xc);
    let p = horner(
        b,
        &x2,
        &[
            -2.76076847742355e-16,
            2.00018790482477e-13,
            -8.60467152213735e-11,
            5.12229709037114e-08,
            1.48572235717979e-05,
            6.37261928875436e-04,
            4.89352455891786e-03,
        ],
    );
    let q = horner(
        b,
        &x2,
        &[
            1.19825839466702e-06,
            1.18534705686654e-04,
            2.26843463243900e-03,
            4.89352518554385e-03,
        ],
    );
    // x · (P(x²) / Q(x²)): multiplying by x last avoids denormal intermediates for tiny x.
    let pq = b.f2("divf", &p, &q);
    let r = mul(b, &pq, &xc);
    // Tiny |x|: tanh x = x (keeps -0 and denormals exact).
    let ax = b.op(&format!("math.absf {x} : f32"));
    let t = b.fc(4e-4);
    let tiny = cmp(b, "olt", &ax, &t);
    sel(b, &tiny, x, &r)
}

/// `erf x` on `f32` (Eigen's rational approximation; see the module doc).
pub(crate) fn erf(b: &mut Body, x: &str) -> String {
    let xc = clamp(b, x, -4.0, 4.0);
    let x2 = mul(b, &xc, &xc);
    let p = horner(
        b,
        &x2,
        &[
            -2.72614225801306e-10,
            2.77068142495902e-08,
            -2.10102402082508e-06,
            -5.69250639462346e-05,
            -7.34990630326855e-04,
            -2.95459980854025e-03,
            -1.60960333262415e-02,
        ],
    );
    let q = horner(
        b,
        &x2,
        &[
            -1.45660718464996e-05,
            -2.13374055278905e-04,
            -1.68282697438203e-03,
            -7.37332916720468e-03,
            -1.42647390514189e-02,
        ],
    );
    let pq = b.f2("divf", &p, &q);
    mul(b, &pq, &xc)
}

/// The logistic function `1 / (1 + e^-x)` on `f32`.
pub(crate) fn sigmoid(b: &mut Body, x: &str) -> String {
    let n = b.op(&format!("arith.negf {x} : f32"));
    let e = exp(b, &n);
    let one = b.fc(1.0);
    let d = b.f2("addf", &one, &e);
    b.f2("divf", &one, &d)
}
