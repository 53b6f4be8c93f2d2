//! Element types of tensors.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The element type of a tensor. Mirrors the subset of ONNX `TensorProto.DataType`
/// that Kiln supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE 754 binary64.
    F64,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 8-bit integer.
    U8,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// Boolean.
    Bool,
    /// 8-bit float, 4 exponent / 3 mantissa bits, bias 7, NaN but no infinities (`FLOAT8E4M3FN`).
    F8E4M3FN,
    /// 8-bit float, 4 exponent / 3 mantissa bits, bias 8, one NaN (0x80), no -0 or infinities
    /// (`FLOAT8E4M3FNUZ`).
    F8E4M3FNUZ,
    /// 8-bit float, 5 exponent / 2 mantissa bits, bias 15, IEEE-like with infinities
    /// (`FLOAT8E5M2`).
    F8E5M2,
    /// 8-bit float, 5 exponent / 2 mantissa bits, bias 16, one NaN (0x80), no -0 or
    /// infinities (`FLOAT8E5M2FNUZ`).
    F8E5M2FNUZ,
    /// 8-bit power of two `2^(code - 127)` (code 0xFF is NaN; no sign, no zero) (`FLOAT8E8M0`).
    F8E8M0,
    /// 4-bit float, 2 exponent / 1 mantissa bit, bias 1, no NaN or infinities (`FLOAT4E2M1`).
    F4E2M1,
    /// Signed 4-bit integer (`INT4`).
    I4,
    /// Unsigned 4-bit integer (`UINT4`).
    U4,
    /// Signed 2-bit integer (`INT2`).
    I2,
    /// Unsigned 2-bit integer (`UINT2`).
    U2,
}

impl DType {
    /// All supported dtypes.
    pub const ALL: [DType; 23] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::Bool,
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
        DType::F8E8M0,
        DType::F4E2M1,
        DType::I4,
        DType::U4,
        DType::I2,
        DType::U2,
    ];

    /// The low-precision dtypes (8-, 4- and 2-bit), held by [`Tensor::Low`](crate::Tensor::Low).
    pub const LOW: [DType; 10] = [
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
        DType::F8E8M0,
        DType::F4E2M1,
        DType::I4,
        DType::U4,
        DType::I2,
        DType::U2,
    ];

    /// Converts an ONNX `TensorProto.DataType` code. Returns `None` for unsupported types.
    pub fn from_onnx(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            4 => DType::U16,
            5 => DType::I16,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            10 => DType::F16,
            11 => DType::F64,
            12 => DType::U32,
            13 => DType::U64,
            16 => DType::BF16,
            17 => DType::F8E4M3FN,
            18 => DType::F8E4M3FNUZ,
            19 => DType::F8E5M2,
            20 => DType::F8E5M2FNUZ,
            21 => DType::U4,
            22 => DType::I4,
            23 => DType::F4E2M1,
            24 => DType::F8E8M0,
            25 => DType::U2,
            26 => DType::I2,
            _ => return None,
        })
    }

    /// The ONNX `TensorProto.DataType` code.
    pub fn to_onnx(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
            DType::F8E4M3FN => 17,
            DType::F8E4M3FNUZ => 18,
            DType::F8E5M2 => 19,
            DType::F8E5M2FNUZ => 20,
            DType::U4 => 21,
            DType::I4 => 22,
            DType::F4E2M1 => 23,
            DType::F8E8M0 => 24,
            DType::U2 => 25,
            DType::I2 => 26,
        }
    }

    /// Name of an ONNX data type code, for error messages (also for unsupported ones).
    pub fn onnx_name(code: i32) -> &'static str {
        match code {
            0 => "UNDEFINED",
            1 => "FLOAT",
            2 => "UINT8",
            3 => "INT8",
            4 => "UINT16",
            5 => "INT16",
            6 => "INT32",
            7 => "INT64",
            8 => "STRING",
            9 => "BOOL",
            10 => "FLOAT16",
            11 => "DOUBLE",
            12 => "UINT32",
            13 => "UINT64",
            14 => "COMPLEX64",
            15 => "COMPLEX128",
            16 => "BFLOAT16",
            17 => "FLOAT8E4M3FN",
            18 => "FLOAT8E4M3FNUZ",
            19 => "FLOAT8E5M2",
            20 => "FLOAT8E5M2FNUZ",
            21 => "UINT4",
            22 => "INT4",
            23 => "FLOAT4E2M1",
            24 => "FLOAT8E8M0",
            25 => "UINT2",
            26 => "INT2",
            _ => "UNKNOWN",
        }
    }

    /// Size of one element in bytes. For the 4-bit and 2-bit types this is a storage
    /// estimate of 1: in memory Kiln holds them unpacked, while ONNX files pack two (4-bit) or
    /// four (2-bit) elements per byte (see [`DType::bits`]).
    pub fn size_of(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F8E4M3FN
            | DType::F8E4M3FNUZ
            | DType::F8E5M2
            | DType::F8E5M2FNUZ
            | DType::F8E8M0
            | DType::F4E2M1
            | DType::I4
            | DType::U4
            | DType::I2
            | DType::U2 => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// Width of one element in bits as stored in ONNX files (packed for 4-bit and 2-bit
    /// types).
    pub fn bits(self) -> usize {
        match self {
            DType::F4E2M1 | DType::I4 | DType::U4 => 4,
            DType::I2 | DType::U2 => 2,
            d => 8 * d.size_of(),
        }
    }

    /// Bytes of a dense buffer of `numel` elements (sub-byte types packed, as in ONNX's
    /// `raw_data`); `None` on overflow.
    pub fn bytes_for(self, numel: usize) -> Option<usize> {
        numel.checked_mul(self.bits()).map(|b| b.div_ceil(8))
    }

    /// True for floating-point types (including the 8-bit and 4-bit float formats).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32
                | DType::F16
                | DType::BF16
                | DType::F64
                | DType::F8E4M3FN
                | DType::F8E4M3FNUZ
                | DType::F8E5M2
                | DType::F8E5M2FNUZ
                | DType::F8E8M0
                | DType::F4E2M1
        )
    }

    /// True for the low-precision (8-, 4- and 2-bit) types of [`DType::LOW`]. Kiln only
    /// stores, moves and casts these; arithmetic ops reject them.
    pub fn is_low_precision(self) -> bool {
        DType::LOW.contains(&self)
    }

    /// True for integer types (signed or unsigned, not bool).
    pub fn is_int(self) -> bool {
        !self.is_float() && self != DType::Bool
    }

    /// True for signed integer types.
    pub fn is_signed_int(self) -> bool {
        matches!(
            self,
            DType::I8 | DType::I16 | DType::I32 | DType::I64 | DType::I4 | DType::I2
        )
    }

    /// Short lower-case name used by the text printer (`f32`, `i64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::Bool => "bool",
            DType::F8E4M3FN => "f8e4m3fn",
            DType::F8E4M3FNUZ => "f8e4m3fnuz",
            DType::F8E5M2 => "f8e5m2",
            DType::F8E5M2FNUZ => "f8e5m2fnuz",
            DType::F8E8M0 => "f8e8m0",
            DType::F4E2M1 => "f4e2m1",
            DType::I4 => "i4",
            DType::U4 => "u4",
            DType::I2 => "i2",
            DType::U2 => "u2",
        }
    }

    /// Parses the short name written by [`DType::name`].
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.name() == s)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Low-precision codecs
// ---------------------------------------------------------------------------------------------

/// How a small float format spends its special codes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Specials {
    /// `S.1111.111` is NaN, no infinities (`E4M3FN`).
    Fn,
    /// `1.0000.000` is the only NaN; no -0, no infinities (`*FNUZ`).
    FnUz,
    /// IEEE 754 style: all-ones exponent holds infinities and NaNs (`E5M2`).
    Ieee,
    /// No NaN or infinities: out-of-range values always saturate (`E2M1`).
    Finite,
}

/// Layout of a sign / exponent / mantissa float format of at most 8 bits.
#[derive(Clone, Copy)]
struct MiniFloat {
    ebits: u32,
    mbits: u32,
    bias: i32,
    specials: Specials,
}

impl MiniFloat {
    fn of(d: DType) -> Option<MiniFloat> {
        let (ebits, mbits, bias, specials) = match d {
            DType::F8E4M3FN => (4, 3, 7, Specials::Fn),
            DType::F8E4M3FNUZ => (4, 3, 8, Specials::FnUz),
            DType::F8E5M2 => (5, 2, 15, Specials::Ieee),
            DType::F8E5M2FNUZ => (5, 2, 16, Specials::FnUz),
            DType::F4E2M1 => (2, 1, 1, Specials::Finite),
            _ => return None,
        };
        Some(MiniFloat {
            ebits,
            mbits,
            bias,
            specials,
        })
    }

    fn sign_bit(self) -> u8 {
        1 << (self.ebits + self.mbits)
    }

    /// The largest finite magnitude code.
    fn max_code(self) -> u8 {
        let all = self.sign_bit() - 1;
        match self.specials {
            Specials::Fn => all - 1,
            Specials::Ieee => all - (1 << self.mbits) as u8,
            Specials::FnUz | Specials::Finite => all,
        }
    }

    fn nan_code(self) -> u8 {
        match self.specials {
            Specials::Fn | Specials::Ieee => self.sign_bit() - 1,
            Specials::FnUz => self.sign_bit(),
            // no NaN: like ml_dtypes, NaN becomes -0
            Specials::Finite => self.sign_bit(),
        }
    }

    /// Value of a finite, non-negative magnitude code.
    fn magnitude(self, mag: u8) -> f64 {
        let e = (mag >> self.mbits) as i32;
        let m = (mag & ((1 << self.mbits) - 1)) as f64;
        let mbits = self.mbits as i32;
        if e == 0 {
            m * 2f64.powi(1 - self.bias - mbits)
        } else {
            (m + (1 << mbits) as f64) * 2f64.powi(e - self.bias - mbits)
        }
    }

    fn decode(self, code: u8) -> f64 {
        let sign = self.sign_bit();
        let mag = code & (sign - 1);
        let neg = code & sign != 0;
        let special = match self.specials {
            Specials::FnUz if code == sign => Some(f64::NAN),
            Specials::Fn if mag == sign - 1 => Some(f64::NAN),
            Specials::Ieee if mag > self.max_code() => Some(if mag == self.max_code() + 1 {
                f64::INFINITY
            } else {
                f64::NAN
            }),
            _ => None,
        };
        let v = special.unwrap_or_else(|| self.magnitude(mag));
        if neg && !v.is_nan() {
            -v
        } else {
            v
        }
    }

    /// Rounds to nearest, ties to even. Out-of-range values (and infinities) become the
    /// largest finite value if `saturate` (always for formats without specials), else
    /// infinity or NaN (whichever the format has).
    fn encode(self, x: f64, saturate: bool) -> u8 {
        if x.is_nan() {
            return self.nan_code();
        }
        let saturate = saturate || self.specials == Specials::Finite;
        let max = self.max_code();
        let overflow = || match self.specials {
            Specials::Ieee => Some(max + 1),
            Specials::Fn | Specials::FnUz => None,
            Specials::Finite => unreachable!("always saturates"),
        };
        let a = x.abs();
        let mag = if a.is_infinite() {
            if saturate {
                Some(max)
            } else {
                overflow()
            }
        } else {
            // largest code whose value is <= a (values grow with the code)
            let (mut lo, mut hi) = (0u8, max);
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if self.magnitude(mid) <= a {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            let (c, v) = (lo, self.magnitude(lo));
            let next = if c == max {
                // the value one step past the largest, as if the exponent went on
                v + (v - self.magnitude(max - 1))
            } else {
                self.magnitude(c + 1)
            };
            let half = (v + next) / 2.0;
            let up = a > half || (a == half && c % 2 == 1);
            if a == v || !up {
                Some(c)
            } else if c < max {
                Some(c + 1)
            } else if saturate {
                Some(max)
            } else {
                overflow()
            }
        };
        match mag {
            None => self.nan_code(),
            Some(0) if self.specials == Specials::FnUz => 0,
            Some(m) if x.is_sign_negative() => m | self.sign_bit(),
            Some(m) => m,
        }
    }
}

/// `FLOAT8E8M0` from an f32 bit pattern, rounding up (the ONNX `Cast` default
/// `round_mode="up"`): the code is the biased exponent, +1 if any mantissa bit is set.
fn encode_e8m0(x: f32, saturate: bool) -> u8 {
    let bits = x.to_bits();
    let exp = (bits >> 23) & 0xFF;
    if exp == 0xFF {
        return 0xFF;
    }
    let up = bits & 0x7F_FFFF != 0 && !(saturate && exp == 0xFE);
    (exp + up as u32) as u8
}

/// Range of a low-precision integer type: (bits, signed).
fn low_int(d: DType) -> Option<(u32, bool)> {
    match d {
        DType::I4 => Some((4, true)),
        DType::U4 => Some((4, false)),
        DType::I2 => Some((2, true)),
        DType::U2 => Some((2, false)),
        _ => None,
    }
}

impl DType {
    /// Decodes the bit pattern `code` (in the low [`DType::bits`] bits) of a low-precision
    /// type to its exact value. Panics for other dtypes.
    pub fn decode_low(self, code: u8) -> f32 {
        if let Some(f) = MiniFloat::of(self) {
            let mask = (f.sign_bit() << 1).wrapping_sub(1);
            return f.decode(code & mask) as f32;
        }
        if let Some((bits, signed)) = low_int(self) {
            let v = (code & ((1u8 << bits) - 1)) as i32;
            let v = if signed && v >= 1 << (bits - 1) {
                v - (1 << bits)
            } else {
                v
            };
            return v as f32;
        }
        assert_eq!(
            self,
            DType::F8E8M0,
            "decode_low: {self} is not low-precision"
        );
        if code == 0xFF {
            f32::NAN
        } else {
            2f32.powi(code as i32 - 127)
        }
    }

    /// Encodes `x` as a bit pattern of a low-precision type with ONNX `Cast` semantics:
    ///
    /// * float8 / float4: round to nearest, ties to even; out-of-range values and infinities
    ///   become ±max if `saturate`, else ±inf (`E5M2`) or NaN. `E2M1` always saturates and
    ///   maps NaN to -0, like the ONNX reference (ml_dtypes).
    /// * `E8M0`: from the f32 value, rounding up (`round_mode="up"`); NaN and inf give NaN,
    ///   with `saturate` the largest exponent does not round up to NaN.
    /// * 4-bit and 2-bit integers: truncate toward zero and wrap (two's complement); NaN and
    ///   infinities give 0.
    ///
    /// Panics for dtypes that are not low-precision.
    pub fn encode_low(self, x: f64, saturate: bool) -> u8 {
        if let Some(f) = MiniFloat::of(self) {
            return f.encode(x, saturate);
        }
        if let Some((bits, _)) = low_int(self) {
            if !x.is_finite() {
                return 0;
            }
            return x.trunc().rem_euclid((1u32 << bits) as f64) as u8;
        }
        assert_eq!(
            self,
            DType::F8E8M0,
            "encode_low: {self} is not low-precision"
        );
        encode_e8m0(x as f32, saturate)
    }

    /// The value of `x` rounded to this low-precision type ([`DType::encode_low`] then
    /// [`DType::decode_low`]).
    pub fn quantize(self, x: f64, saturate: bool) -> f32 {
        self.decode_low(self.encode_low(x, saturate))
    }

    /// The integer `v` wrapped to a 4-bit or 2-bit integer type (like a C cast); `None` for
    /// other dtypes.
    pub fn wrap_low_int(self, v: i64) -> Option<f32> {
        low_int(self).map(|(bits, _)| self.decode_low((v & ((1 << bits) - 1)) as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOAT8: [DType; 5] = [
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
        DType::F8E8M0,
    ];

    #[test]
    fn onnx_codes_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_onnx(d.to_onnx()), Some(d));
            assert_eq!(DType::parse(d.name()), Some(d));
        }
    }

    #[test]
    fn every_8bit_code_round_trips() {
        for d in FLOAT8 {
            for code in 0..=255u8 {
                if d == DType::F8E8M0 && code == 0 {
                    // 2^-127 is an f32 subnormal with a mantissa bit set: rounds up to 2^-126
                    assert_eq!(d.encode_low(d.decode_low(0) as f64, true), 1);
                    continue;
                }
                let v = d.decode_low(code);
                let back = d.encode_low(v as f64, false);
                if v.is_nan() {
                    assert!(d.decode_low(back).is_nan(), "{d} {code:#x}");
                } else {
                    assert_eq!(back, code, "{d} {code:#x} = {v}");
                }
            }
        }
        for d in [DType::F4E2M1, DType::I4, DType::U4] {
            for code in 0..16u8 {
                let back = d.encode_low(d.decode_low(code) as f64, true);
                assert_eq!(back, code, "{d} {code:#x}");
            }
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(DType::F8E4M3FN.decode_low(0x7E), 448.0);
        assert_eq!(DType::F8E4M3FN.decode_low(0x01), 2f32.powi(-9));
        assert_eq!(DType::F8E4M3FNUZ.decode_low(0x7F), 240.0);
        assert_eq!(DType::F8E5M2.decode_low(0x7B), 57344.0);
        assert_eq!(DType::F8E5M2.decode_low(0x7C), f32::INFINITY);
        assert_eq!(DType::F8E5M2FNUZ.decode_low(0x7F), 57344.0);
        assert!(DType::F8E5M2FNUZ.decode_low(0x80).is_nan());
        assert_eq!(DType::F8E8M0.decode_low(127), 1.0);
        assert_eq!(DType::F4E2M1.decode_low(0x7), 6.0);
        assert_eq!(DType::F4E2M1.decode_low(0xB), -1.5);
        assert_eq!(DType::I4.decode_low(0xF), -1.0);
        assert_eq!(DType::I2.decode_low(0x2), -2.0);
        assert_eq!(DType::U2.decode_low(0x3), 3.0);
    }

    #[test]
    fn ties_round_to_even() {
        let q = |d: DType, x: f64| d.quantize(x, true);
        // E4M3FN around 1: step 1/8
        assert_eq!(q(DType::F8E4M3FN, 1.0625), 1.0);
        assert_eq!(q(DType::F8E4M3FN, 1.1875), 1.25);
        assert_eq!(q(DType::F8E4M3FN, 1.0626), 1.125);
        // E5M2 around 1: step 1/4
        assert_eq!(q(DType::F8E5M2, 1.125), 1.0);
        assert_eq!(q(DType::F8E5M2, 1.375), 1.5);
        // subnormals and zero
        assert_eq!(q(DType::F8E4M3FN, 2f64.powi(-10)), 0.0);
        assert_eq!(q(DType::F8E4M3FN, 3.0 * 2f64.powi(-10)), 2f32.powi(-8));
        // E2M1: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4
        assert_eq!(q(DType::F4E2M1, 0.25), 0.0);
        assert_eq!(q(DType::F4E2M1, 0.75), 1.0);
        assert_eq!(q(DType::F4E2M1, 2.5), 2.0);
        assert_eq!(q(DType::F4E2M1, 5.0), 4.0);
        // FNUZ has no -0
        assert_eq!(DType::F8E4M3FNUZ.encode_low(-1e-9, true), 0);
        assert_eq!(DType::F8E4M3FN.encode_low(-1e-9, true), 0x80);
    }

    #[test]
    fn saturate_rules() {
        let inf = f64::INFINITY;
        for (d, max) in [
            (DType::F8E4M3FN, 448.0),
            (DType::F8E4M3FNUZ, 240.0),
            (DType::F8E5M2, 57344.0),
            (DType::F8E5M2FNUZ, 57344.0),
        ] {
            assert_eq!(d.quantize(1e6, true), max, "{d}");
            assert_eq!(d.quantize(-inf, true), -max, "{d}");
            assert!(d.quantize(f64::NAN, true).is_nan(), "{d}");
            let big = d.quantize(1e6, false);
            let minf = d.quantize(-inf, false);
            if d == DType::F8E5M2 {
                assert_eq!(big, f32::INFINITY);
                assert_eq!(minf, f32::NEG_INFINITY);
            } else {
                assert!(big.is_nan() && minf.is_nan(), "{d}");
            }
        }
        // E4M3FN: 464 is the tie between 448 and (nonexistent) 480: even 448 wins
        assert_eq!(DType::F8E4M3FN.quantize(464.0, false), 448.0);
        assert!(DType::F8E4M3FN.quantize(465.0, false).is_nan());
        // E5M2: the tie past 57344 goes to inf (even code)
        assert_eq!(DType::F8E5M2.quantize(61440.0, false), f32::INFINITY);
        assert_eq!(DType::F8E5M2.quantize(61439.0, false), 57344.0);
        // E2M1 always saturates
        assert_eq!(DType::F4E2M1.quantize(inf, false), 6.0);
        // E8M0 rounds up, saturating at the largest exponent
        assert_eq!(DType::F8E8M0.quantize(1.1, true), 2.0);
        assert_eq!(DType::F8E8M0.quantize(0.25, true), 0.25);
        assert_eq!(DType::F8E8M0.encode_low(f32::MAX as f64, true), 0xFE);
        assert_eq!(DType::F8E8M0.encode_low(f32::MAX as f64, false), 0xFF);
        // integers truncate and wrap
        assert_eq!(DType::I4.quantize(9.0, true), -7.0);
        assert_eq!(DType::I4.quantize(-8.6, true), -8.0);
        assert_eq!(DType::U4.quantize(-1.0, true), 15.0);
        assert_eq!(DType::I2.quantize(3.0, true), -1.0);
        assert_eq!(DType::I4.wrap_low_int(-9), Some(7.0));
    }
}
