//! Model precision on the GPU (`kiln compile --precision`): which tensor-core input type the
//! MatMul/Gemm contractions use, the cast launch that converts an f32 activation into a
//! 16-bit scratch copy, and the host rounding that emulates the hardware.
//!
//! Activations and every non-contraction op stay f32; only the GEMM inputs are rounded
//! (tf32: the tensor cores read the f32 buffers and ignore the low 13 mantissa bits;
//! f16/bf16: weights converted at compile time, activations by [`cast_kernel`] into the
//! per-launch scratch region, see [`super::Operand::Scratch`]); accumulation and outputs are
//! f32, so epilogues and the rest of the model are unchanged.

use crate::gpu::kernels::elementwise::grid_stride_func;
use crate::gpu::kernels::gemm_mma::MmaInput;
use crate::gpu::{Elem, GpuKernel, KernelParam};

/// Threads per block of the cast kernel.
pub const CAST_BLOCK: u32 = crate::gpu::kernels::elementwise::BLOCK;

/// What MatMul/Gemm compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 SIMT GEMM (exact f32 semantics).
    #[default]
    F32,
    /// Tensor cores reading f32 data rounded to tf32 (10-bit mantissa).
    TF32,
    /// Tensor cores on f16 copies of both operands.
    F16,
    /// Tensor cores on bf16 copies of both operands.
    BF16,
}

impl Precision {
    /// Every precision, f32 first.
    pub const ALL: [Precision; 4] = [
        Precision::F32,
        Precision::TF32,
        Precision::F16,
        Precision::BF16,
    ];

    /// Parses `f32`, `tf32`, `f16` or `bf16` (the error lists them).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::TF32),
            "f16" | "fp16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::BF16),
            _ => Err(format!(
                "unknown precision '{s}' (expected f32, tf32, f16 or bf16)"
            )),
        }
    }

    /// `f32`, `tf32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::TF32 => "tf32",
            Precision::F16 => "f16",
            Precision::BF16 => "bf16",
        }
    }

    /// The tensor-core input type, `None` for f32.
    pub fn mma_input(self) -> Option<MmaInput> {
        match self {
            Precision::F32 => None,
            Precision::TF32 => Some(MmaInput::TF32),
            Precision::F16 => Some(MmaInput::F16),
            Precision::BF16 => Some(MmaInput::BF16),
        }
    }
}

/// Entry name of the f32 → `to` cast kernel.
pub fn cast_name(to: MmaInput) -> String {
    format!("kiln_cast_f32_{}", to.mlir())
}

/// `y[i] = to(x[i])` for `i < n` (round to nearest even), grid-stride, [`CAST_BLOCK`]
/// threads per block. Parameters `x: memref<?xf32>, y: memref<?xTO>, n: index`.
pub fn cast_kernel(to: MmaInput) -> GpuKernel {
    let name = cast_name(to);
    let t = to.mlir();
    let mlir = grid_stride_func(
        &name,
        &format!("%x: memref<?xf32>, %y: memref<?x{t}>"),
        "",
        &format!(
            "      %v = memref.load %x[%i] : memref<?xf32>
      %r = arith.truncf %v : f32 to {t}
      memref.store %r, %y[%i] : memref<?x{t}>
"
        ),
    );
    GpuKernel {
        name,
        mlir,
        params: vec![
            KernelParam::Buffer {
                name: "x".into(),
                elem: Elem::F32,
            },
            KernelParam::Buffer {
                name: "y".into(),
                elem: to.elem(),
            },
            KernelParam::Index("n".into()),
        ],
        block: [CAST_BLOCK, 1, 1],
        shared_bytes: 0,
        requires: vec![],
    }
}

/// The launch of [`cast_kernel`] converting `len` f32 elements of `src` into the scratch
/// region at byte offset `at` (grid-stride, at most 8 blocks per SM), for partition kernel
/// `index`; the kernel is returned with it.
pub(crate) fn cast_launch(
    index: usize,
    src: super::Operand,
    len: u64,
    at: u64,
    to: MmaInput,
    sku: &crate::gpu::Sku,
) -> (super::Launch, GpuKernel) {
    use super::{LaunchArg, Operand};
    let k = cast_kernel(to);
    let args = vec![
        LaunchArg::Buf {
            operand: src,
            offset: 0,
            len,
            elem_bytes: 4,
        },
        LaunchArg::Buf {
            operand: Operand::Scratch(at),
            offset: 0,
            len,
            elem_bytes: u64::from(to.bytes()),
        },
        LaunchArg::Index(len as i64),
    ];
    (grid_stride_launch(index, &k, args, len, sku), k)
}

/// The launch of grid-stride kernel `k` ([`CAST_BLOCK`] threads per block) over `len`
/// elements, at most 8 blocks per SM, for partition kernel `index`.
fn grid_stride_launch(
    index: usize,
    k: &GpuKernel,
    args: Vec<super::LaunchArg>,
    len: u64,
    sku: &crate::gpu::Sku,
) -> super::Launch {
    super::Launch {
        index,
        kernel: k.name.clone(),
        args,
        grid: [
            crate::gpu::kernels::blocks_for(
                len,
                u64::from(CAST_BLOCK),
                u64::from(sku.sm_count) * 8,
            ),
            1,
            1,
        ],
        block: k.block,
        shared_bytes: 0,
        generic: false,
    }
}

/// Entry name of the f32 zero-fill kernel.
pub const ZERO_NAME: &str = "kiln_zero_f32";

/// `y[i] = 0` for `i < n`, grid-stride, [`CAST_BLOCK`] threads per block (the output of a
/// split-K GEMM, whose partial sums are added atomically). Parameters
/// `y: memref<?xf32>, n: index`.
pub fn zero_kernel() -> GpuKernel {
    let mlir = grid_stride_func(
        ZERO_NAME,
        "%y: memref<?xf32>",
        "    %z = arith.constant 0.0 : f32\n",
        "      memref.store %z, %y[%i] : memref<?xf32>\n",
    );
    GpuKernel {
        name: ZERO_NAME.into(),
        mlir,
        params: vec![
            KernelParam::Buffer {
                name: "y".into(),
                elem: Elem::F32,
            },
            KernelParam::Index("n".into()),
        ],
        block: [CAST_BLOCK, 1, 1],
        shared_bytes: 0,
        requires: vec![],
    }
}

/// The launch of [`zero_kernel`] over `len` f32 elements of `dst` from element `offset`,
/// for partition kernel `index`; the kernel is returned with it.
pub(crate) fn zero_launch(
    index: usize,
    dst: super::Operand,
    offset: u64,
    len: u64,
    sku: &crate::gpu::Sku,
) -> (super::Launch, GpuKernel) {
    use super::LaunchArg;
    let k = zero_kernel();
    let args = vec![
        LaunchArg::Buf {
            operand: dst,
            offset,
            len,
            elem_bytes: 4,
        },
        LaunchArg::Index(len as i64),
    ];
    (grid_stride_launch(index, &k, args, len, sku), k)
}

/// An f32 value as the tensor cores see an input of type `input` (tf32: the low 13 mantissa
/// bits dropped; f16/bf16: rounded to nearest even, as the cast kernel and the compile-time
/// weight conversion do).
pub fn round_input(x: f32, input: MmaInput) -> f32 {
    match input {
        MmaInput::TF32 => f32::from_bits(x.to_bits() & !0x1fff),
        MmaInput::F16 => f16_bits_to_f32(f32_to_f16_bits(x)),
        MmaInput::BF16 => f32::from_bits(u32::from(f32_to_bf16_bits(x)) << 16),
    }
}

/// `x` rounded to the nearest tf32 value (10 mantissa bits, ties away from zero, as
/// `cvt.rna.tf32.f32`); used for weights converted at compile time.
pub fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits(x.to_bits().wrapping_add(0x1000) & !0x1fff)
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// f32 → IEEE half bits, round to nearest even (overflow to infinity, subnormals kept).
pub fn f32_to_f16_bits(x: f32) -> u16 {
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
        // Subnormal (or zero): shift the mantissa with its implicit bit.
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1u32 << shift) - 1);
        let mut v = m >> shift;
        if rest > half || (rest == half && v & 1 == 1) {
            v += 1;
        }
        return sign | v as u16;
    }
    let mut v = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && v & 1 == 1) {
        v += 1; // may carry into the exponent (up to infinity), which is correct
    }
    sign | v as u16
}

/// IEEE half bits → f32 (exact).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = (u32::from(h) & 0x8000) << 16;
    let exp = (u32::from(h) >> 10) & 0x1f;
    let man = u32::from(h) & 0x3ff;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24.
            let v = m as f32 * (2f32).powi(-24);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names() {
        for p in Precision::ALL {
            assert_eq!(Precision::parse(p.name()), Ok(p));
        }
        let e = Precision::parse("f8").unwrap_err();
        assert!(e.contains("expected f32, tf32, f16 or bf16"), "{e}");
        assert_eq!(Precision::F32.mma_input(), None);
    }

    #[test]
    fn rounding_matches_ieee() {
        // Exact f16 values, ties to even, overflow, subnormals.
        assert_eq!(round_input(1.0, MmaInput::F16), 1.0);
        assert_eq!(round_input(1.0 + 1.0 / 2048.0, MmaInput::F16), 1.0);
        assert_eq!(
            round_input(1.0 + 3.0 / 2048.0, MmaInput::F16),
            1.0 + 2.0 / 1024.0
        );
        assert_eq!(round_input(70000.0, MmaInput::F16), f32::INFINITY);
        assert_eq!(round_input(-65504.0, MmaInput::F16), -65504.0);
        let sub = 3.0 * (2f32).powi(-24);
        assert_eq!(round_input(sub, MmaInput::F16), sub);
        assert_eq!(round_input(-sub, MmaInput::F16), -sub);
        assert_eq!(round_input(0.1, MmaInput::F16), 0.099975586);
        // bf16: 8 mantissa bits, ties to even; tf32: truncation to 10 bits.
        assert_eq!(round_input(1.0 + 1.0 / 256.0, MmaInput::BF16), 1.0);
        assert_eq!(
            round_input(1.0 + 3.0 / 256.0, MmaInput::BF16),
            1.0 + 4.0 / 256.0
        );
        assert_eq!(
            round_input(1.0 + 1.0 / 1024.0 + 1.0 / 4096.0, MmaInput::TF32),
            1.0 + 1.0 / 1024.0
        );
        assert!(round_input(f32::NAN, MmaInput::BF16).is_nan());
        assert_eq!(round_tf32(1.0 + 1.0 / 2048.0), 1.0 + 1.0 / 1024.0);
        assert_eq!(round_tf32(-(1.0 + 1.0 / 4096.0)), -1.0);
        assert!(cast_kernel(MmaInput::BF16)
            .mlir
            .contains("arith.truncf %v : f32 to bf16"));
    }
}
