//! Concrete tensors: an `ndarray` array per element type.
//!
//! [`Tensor`] is the value type of the reference interpreter. Code that works on any element
//! type uses the [`Elem`] trait and the [`with_tensor!`](crate::with_tensor) /
//! [`map_tensor!`](crate::map_tensor) macros, which expand a generic body once per dtype.

use crate::dtype::DType;
use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use std::fmt;

/// An element type that a [`Tensor`] can hold.
pub trait Elem: Copy + Default + PartialOrd + fmt::Debug + Send + Sync + 'static {
    /// The dtype tag of this element type.
    const DTYPE: DType;
    /// Value as f64 (bool: 0/1; large 64-bit integers lose precision).
    fn to_f64(self) -> f64;
    /// Conversion from f64 with ONNX `Cast` semantics: floats round to nearest, integers
    /// truncate toward zero (saturating), bool is `v != 0`.
    fn from_f64(v: f64) -> Self;
    /// Value as i64 (floats truncate, unsigned 64-bit wraps).
    fn to_i64(self) -> i64;
    /// Conversion from i64, wrapping like a C cast for narrower integers.
    fn from_i64(v: i64) -> Self;
    /// Wraps an array of this type into a [`Tensor`].
    fn wrap(a: ArrayD<Self>) -> Tensor;
    /// Borrows the array if `t` holds this element type.
    fn view(t: &Tensor) -> Option<&ArrayD<Self>>;
}

macro_rules! impl_elem_int {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_i64(self) -> i64 {
                self as i64
            }
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            fn wrap(a: ArrayD<Self>) -> Tensor {
                Tensor::$variant(a)
            }
            fn view(t: &Tensor) -> Option<&ArrayD<Self>> {
                match t {
                    Tensor::$variant(a) => Some(a),
                    _ => None,
                }
            }
        }
    };
}

impl_elem_int!(i8, I8);
impl_elem_int!(i16, I16);
impl_elem_int!(i32, I32);
impl_elem_int!(i64, I64);
impl_elem_int!(u8, U8);
impl_elem_int!(u16, U16);
impl_elem_int!(u32, U32);
impl_elem_int!(u64, U64);

macro_rules! impl_elem_float {
    ($t:ty, $variant:ident, $from:expr, $to:expr) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn to_f64(self) -> f64 {
                #[allow(clippy::redundant_closure_call)]
                ($to)(self)
            }
            fn from_f64(v: f64) -> Self {
                #[allow(clippy::redundant_closure_call)]
                ($from)(v)
            }
            fn to_i64(self) -> i64 {
                self.to_f64() as i64
            }
            fn from_i64(v: i64) -> Self {
                Self::from_f64(v as f64)
            }
            fn wrap(a: ArrayD<Self>) -> Tensor {
                Tensor::$variant(a)
            }
            fn view(t: &Tensor) -> Option<&ArrayD<Self>> {
                match t {
                    Tensor::$variant(a) => Some(a),
                    _ => None,
                }
            }
        }
    };
}

impl_elem_float!(f32, F32, |v: f64| v as f32, |x: f32| x as f64);
impl_elem_float!(f64, F64, |v: f64| v, |x: f64| x);
impl_elem_float!(f16, F16, f16::from_f64, |x: f16| x.to_f64());
impl_elem_float!(bf16, BF16, bf16::from_f64, |x: bf16| x.to_f64());

impl Elem for bool {
    const DTYPE: DType = DType::Bool;
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    fn from_f64(v: f64) -> Self {
        v != 0.0
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn from_i64(v: i64) -> Self {
        v != 0
    }
    fn wrap(a: ArrayD<Self>) -> Tensor {
        Tensor::Bool(a)
    }
    fn view(t: &Tensor) -> Option<&ArrayD<Self>> {
        match t {
            Tensor::Bool(a) => Some(a),
            _ => None,
        }
    }
}

/// A dense tensor value, one variant per [`DType`].
#[derive(Clone, PartialEq)]
pub enum Tensor {
    /// f32 data.
    F32(ArrayD<f32>),
    /// f16 data.
    F16(ArrayD<f16>),
    /// bf16 data.
    BF16(ArrayD<bf16>),
    /// f64 data.
    F64(ArrayD<f64>),
    /// i8 data.
    I8(ArrayD<i8>),
    /// i16 data.
    I16(ArrayD<i16>),
    /// i32 data.
    I32(ArrayD<i32>),
    /// i64 data.
    I64(ArrayD<i64>),
    /// u8 data.
    U8(ArrayD<u8>),
    /// u16 data.
    U16(ArrayD<u16>),
    /// u32 data.
    U32(ArrayD<u32>),
    /// u64 data.
    U64(ArrayD<u64>),
    /// bool data.
    Bool(ArrayD<bool>),
    /// Data of a low-precision dtype ([`DType::is_low_precision`]: float8, float4, 4-bit and
    /// 2-bit integers), held as the exactly representable decoded values. Build it with
    /// [`Tensor::low`], which rounds to the dtype. Data movement works on it through
    /// [`with_tensor!`](crate::with_tensor) / [`map_tensor!`](crate::map_tensor) (which keep the
    /// dtype and re-round results); arithmetic ops reject these dtypes.
    Low(DType, ArrayD<f32>),
}

/// Runs `$body` with `$a` bound to the tensor's `&ArrayD<T>`, for whichever `T` it holds.
/// The body is expanded once per dtype, so it may call generic functions over [`Elem`].
/// A [`Tensor::Low`] binds its decoded values as `&ArrayD<f32>`: a body that builds a tensor
/// from them gets an f32 tensor, so callers must not use it for low-precision dtypes unless
/// that is intended.
#[macro_export]
macro_rules! with_tensor {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::Tensor::F32($a) => $body,
            $crate::Tensor::F16($a) => $body,
            $crate::Tensor::BF16($a) => $body,
            $crate::Tensor::F64($a) => $body,
            $crate::Tensor::I8($a) => $body,
            $crate::Tensor::I16($a) => $body,
            $crate::Tensor::I32($a) => $body,
            $crate::Tensor::I64($a) => $body,
            $crate::Tensor::U8($a) => $body,
            $crate::Tensor::U16($a) => $body,
            $crate::Tensor::U32($a) => $body,
            $crate::Tensor::U64($a) => $body,
            $crate::Tensor::Bool($a) => $body,
            $crate::Tensor::Low(_, $a) => $body,
        }
    };
}

/// Like [`with_tensor!`], but `$body` returns an `ArrayD` of the same element type, which is
/// wrapped back into a [`Tensor`] of the same dtype. For [`Tensor::Low`] the result is
/// rounded to the dtype again (a no-op for data movement).
#[macro_export]
macro_rules! map_tensor {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::Tensor::F32($a) => $crate::Tensor::F32($body),
            $crate::Tensor::F16($a) => $crate::Tensor::F16($body),
            $crate::Tensor::BF16($a) => $crate::Tensor::BF16($body),
            $crate::Tensor::F64($a) => $crate::Tensor::F64($body),
            $crate::Tensor::I8($a) => $crate::Tensor::I8($body),
            $crate::Tensor::I16($a) => $crate::Tensor::I16($body),
            $crate::Tensor::I32($a) => $crate::Tensor::I32($body),
            $crate::Tensor::I64($a) => $crate::Tensor::I64($body),
            $crate::Tensor::U8($a) => $crate::Tensor::U8($body),
            $crate::Tensor::U16($a) => $crate::Tensor::U16($body),
            $crate::Tensor::U32($a) => $crate::Tensor::U32($body),
            $crate::Tensor::U64($a) => $crate::Tensor::U64($body),
            $crate::Tensor::Bool($a) => $crate::Tensor::Bool($body),
            $crate::Tensor::Low(d, $a) => $crate::Tensor::low(*d, $body),
        }
    };
}

/// Like [`map_tensor!`] but only for the float dtypes (f32, f16, bf16, f64); other dtypes
/// evaluate `$else`.
#[macro_export]
macro_rules! map_float_tensor {
    ($t:expr, $a:ident => $body:expr, else $other:expr) => {
        match $t {
            $crate::Tensor::F32($a) => $crate::Tensor::F32($body),
            $crate::Tensor::F16($a) => $crate::Tensor::F16($body),
            $crate::Tensor::BF16($a) => $crate::Tensor::BF16($body),
            $crate::Tensor::F64($a) => $crate::Tensor::F64($body),
            _ => $other,
        }
    };
}

/// Builds the zero tensor of a dtype; used by [`Tensor::zeros`].
fn zeros_of<T: Elem>(shape: &[usize]) -> Tensor {
    T::wrap(ArrayD::from_elem(IxDyn(shape), T::default()))
}

/// Cast to a low-precision dtype (see [`DType::encode_low`]).
fn cast_low(t: &Tensor, dtype: DType, saturate: bool) -> Tensor {
    if t.dtype() == dtype {
        return t.clone();
    }
    let out = if t.dtype().is_int() && dtype.is_int() {
        // integer to 4/2-bit integer: wrap exactly through i64
        with_tensor!(t, a => a.mapv(|x| dtype.wrap_low_int(x.to_i64()).expect("low int")))
    } else {
        with_tensor!(t, a => a.mapv(|x| dtype.quantize(x.to_f64(), saturate)))
    };
    Tensor::Low(dtype, out)
}

fn cast_to<T: Elem>(t: &Tensor) -> Tensor {
    if let Some(a) = T::view(t) {
        return T::wrap(a.clone());
    }
    let out = if T::DTYPE.is_float() || !t.dtype().is_int() {
        // float targets, or float/bool sources: go through f64.
        with_tensor!(t, a => a.mapv(|x| T::from_f64(x.to_f64())))
    } else {
        // integer (or bool) target from integer source: go through i64 (wrapping).
        with_tensor!(t, a => a.mapv(|x| T::from_i64(x.to_i64())))
    };
    T::wrap(out)
}

impl Tensor {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::F64(_) => DType::F64,
            Tensor::I8(_) => DType::I8,
            Tensor::I16(_) => DType::I16,
            Tensor::I32(_) => DType::I32,
            Tensor::I64(_) => DType::I64,
            Tensor::U8(_) => DType::U8,
            Tensor::U16(_) => DType::U16,
            Tensor::U32(_) => DType::U32,
            Tensor::U64(_) => DType::U64,
            Tensor::Bool(_) => DType::Bool,
            Tensor::Low(d, _) => *d,
        }
    }

    /// The concrete shape.
    pub fn shape(&self) -> &[usize] {
        with_tensor!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_tensor!(self, a => a.len())
    }

    /// True if the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape().len()
    }

    /// A tensor of zeros (false for bool).
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        match dtype {
            DType::F32 => zeros_of::<f32>(shape),
            DType::F16 => zeros_of::<f16>(shape),
            DType::BF16 => zeros_of::<bf16>(shape),
            DType::F64 => zeros_of::<f64>(shape),
            DType::I8 => zeros_of::<i8>(shape),
            DType::I16 => zeros_of::<i16>(shape),
            DType::I32 => zeros_of::<i32>(shape),
            DType::I64 => zeros_of::<i64>(shape),
            DType::U8 => zeros_of::<u8>(shape),
            DType::U16 => zeros_of::<u16>(shape),
            DType::U32 => zeros_of::<u32>(shape),
            DType::U64 => zeros_of::<u64>(shape),
            DType::Bool => zeros_of::<bool>(shape),
            d => Tensor::low(d, ArrayD::zeros(IxDyn(shape))),
        }
    }

    /// A tensor of the low-precision dtype `dtype` from f32 values, each rounded to the dtype
    /// (saturating; see [`DType::quantize`]). Panics if `dtype` is not low-precision.
    pub fn low(dtype: DType, values: ArrayD<f32>) -> Tensor {
        assert!(
            dtype.is_low_precision(),
            "Tensor::low: {dtype} is not low-precision"
        );
        Tensor::Low(dtype, values.mapv(|x| dtype.quantize(x as f64, true)))
    }

    /// Builds a tensor from a flat vector in row-major order. Panics if the length does not
    /// match the shape (callers check first; see [`Tensor::try_from_vec`]).
    pub fn from_vec<T: Elem>(shape: &[usize], data: Vec<T>) -> Tensor {
        Self::try_from_vec(shape, data).expect("data length matches shape")
    }

    /// Builds a tensor from a flat vector, checking the length.
    pub fn try_from_vec<T: Elem>(shape: &[usize], data: Vec<T>) -> Result<Tensor, String> {
        let n = data.len();
        ArrayD::from_shape_vec(IxDyn(shape), data)
            .map(T::wrap)
            .map_err(|_| format!("{n} elements do not fill shape {shape:?}"))
    }

    /// A scalar (rank 0) tensor.
    pub fn scalar<T: Elem>(v: T) -> Tensor {
        T::wrap(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// A 1-D i64 tensor.
    pub fn vec_i64(v: &[i64]) -> Tensor {
        Tensor::from_vec(&[v.len()], v.to_vec())
    }

    /// Borrows the array as element type `T`, if it is.
    pub fn as_array<T: Elem>(&self) -> Option<&ArrayD<T>> {
        T::view(self)
    }

    /// A view of the array as element type `T`, if it is.
    pub fn view<T: Elem>(&self) -> Option<ArrayViewD<'_, T>> {
        T::view(self).map(|a| a.view())
    }

    /// Converts to another dtype with ONNX `Cast` semantics (saturating for float8 targets,
    /// the default of `Cast`'s `saturate` attribute).
    pub fn cast(&self, dtype: DType) -> Tensor {
        self.cast_saturate(dtype, true)
    }

    /// Like [`Tensor::cast`], with `Cast`'s `saturate` attribute: it only matters for float8
    /// targets, where out-of-range values become ±max if set and ±inf / NaN if not
    /// (see [`DType::encode_low`]).
    pub fn cast_saturate(&self, dtype: DType, saturate: bool) -> Tensor {
        match dtype {
            DType::F32 => cast_to::<f32>(self),
            DType::F16 => cast_to::<f16>(self),
            DType::BF16 => cast_to::<bf16>(self),
            DType::F64 => cast_to::<f64>(self),
            DType::I8 => cast_to::<i8>(self),
            DType::I16 => cast_to::<i16>(self),
            DType::I32 => cast_to::<i32>(self),
            DType::I64 => cast_to::<i64>(self),
            DType::U8 => cast_to::<u8>(self),
            DType::U16 => cast_to::<u16>(self),
            DType::U32 => cast_to::<u32>(self),
            DType::U64 => cast_to::<u64>(self),
            DType::Bool => cast_to::<bool>(self),
            d => cast_low(self, d, saturate),
        }
    }

    /// All elements as f64, same shape.
    pub fn to_f64_array(&self) -> ArrayD<f64> {
        with_tensor!(self, a => a.mapv(|x| x.to_f64()))
    }

    /// Builds a tensor of `dtype` from f64 values (with `Cast` semantics).
    pub fn from_f64_array(dtype: DType, a: ArrayD<f64>) -> Tensor {
        Tensor::F64(a).cast(dtype)
    }

    /// All elements as i64 in row-major order (for index / shape inputs).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        with_tensor!(self, a => a.iter().map(|x| x.to_i64()).collect())
    }

    /// All elements as f64 in row-major order.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        with_tensor!(self, a => a.iter().map(|x| x.to_f64()).collect())
    }

    /// The single element of a one-element tensor, as f64.
    pub fn scalar_f64(&self) -> Option<f64> {
        (self.len() == 1).then(|| self.to_f64_vec()[0])
    }

    /// Same data with a new shape (same number of elements).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor, String> {
        let n: usize = shape.iter().product();
        if n != self.len() {
            return Err(format!(
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape(),
                self.len()
            ));
        }
        Ok(map_tensor!(self, a => {
            let v: Vec<_> = a.iter().copied().collect();
            ArrayD::from_shape_vec(IxDyn(shape), v).expect("size checked")
        }))
    }

    /// Size in bytes of the data.
    pub fn byte_size(&self) -> usize {
        self.len() * self.dtype().size_of()
    }

    /// Compares with `expected` elementwise: `|a - e| <= atol + rtol * |e|` (NaNs must match,
    /// infinities must be equal). Returns the worst violation as an error message.
    pub fn check_close(&self, expected: &Tensor, rtol: f64, atol: f64) -> Result<(), String> {
        if self.dtype() != expected.dtype() {
            return Err(format!(
                "dtype {} != expected {}",
                self.dtype(),
                expected.dtype()
            ));
        }
        if self.shape() != expected.shape() {
            return Err(format!(
                "shape {:?} != expected {:?}",
                self.shape(),
                expected.shape()
            ));
        }
        let a = self.to_f64_vec();
        let e = expected.to_f64_vec();
        if !self.dtype().is_float() {
            // integers compare exactly (through i64 to keep 64-bit precision)
            let ai = self.to_i64_vec();
            let ei = expected.to_i64_vec();
            if let Some(i) = (0..ai.len()).find(|&i| ai[i] != ei[i]) {
                return Err(format!("element {i}: {} != expected {}", ai[i], ei[i]));
            }
            return Ok(());
        }
        let mut worst: Option<(usize, f64)> = None;
        for i in 0..a.len() {
            let (x, y) = (a[i], e[i]);
            let bad = if x.is_nan() || y.is_nan() {
                if x.is_nan() && y.is_nan() {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else if x.is_infinite() || y.is_infinite() {
                if x == y {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (x - y).abs() - (atol + rtol * y.abs())
            };
            if bad > 0.0 && worst.is_none_or(|(_, w)| bad > w) {
                worst = Some((i, bad));
            }
        }
        match worst {
            None => Ok(()),
            Some((i, _)) => Err(format!(
                "element {i}: {} != expected {} (rtol {rtol}, atol {atol})",
                a[i], e[i]
            )),
        }
    }
}

impl<T: Elem> From<ArrayD<T>> for Tensor {
    fn from(a: ArrayD<T>) -> Tensor {
        T::wrap(a)
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype(), self.shape())?;
        if self.len() <= 16 {
            write!(
                f,
                " {:?}",
                with_tensor!(self, a => a.iter().map(|x| x.to_f64()).collect::<Vec<_>>())
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_semantics() {
        let t = Tensor::from_vec(&[4], vec![1.7f32, -1.7, 0.0, 300.0]);
        assert_eq!(t.cast(DType::I64).to_i64_vec(), vec![1, -1, 0, 300]);
        assert_eq!(t.cast(DType::Bool).to_i64_vec(), vec![1, 1, 0, 1]);
        let i = Tensor::from_vec(&[2], vec![-1i64, 256]);
        assert_eq!(i.cast(DType::U8).to_i64_vec(), vec![255, 0]);
        assert_eq!(t.cast(DType::F16).dtype(), DType::F16);
    }

    #[test]
    fn low_precision_tensors() {
        let t = Tensor::from_vec(&[2, 2], vec![0.3f32, -9.0, 15.7, 2.0]);
        let i4 = t.cast(DType::I4);
        assert_eq!(i4.dtype(), DType::I4);
        assert_eq!(i4.to_i64_vec(), vec![0, 7, -1, 2]);
        assert_eq!(i4.cast(DType::I8).to_i64_vec(), vec![0, 7, -1, 2]);
        let wide = Tensor::from_vec(&[2], vec![-9i64, 300]);
        assert_eq!(wide.cast(DType::U4).to_i64_vec(), vec![7, 12]);
        // data movement keeps the dtype
        let r = i4.reshape(&[4]).unwrap();
        assert_eq!((r.dtype(), r.shape()), (DType::I4, &[4usize][..]));
        let f8 = t.cast(DType::F8E5M2);
        assert_eq!(f8.to_f64_vec(), vec![0.3125, -8.0, 16.0, 2.0]);
        assert!(f8.check_close(&f8.clone(), 0.0, 0.0).is_ok());
        assert!(f8.check_close(&t.cast(DType::F8E4M3FN), 0.0, 0.0).is_err());
        let nan = Tensor::from_vec(&[1], vec![f32::NAN]).cast(DType::F8E4M3FN);
        assert!(nan.check_close(&nan, 0.0, 0.0).is_ok());
        assert_eq!(
            Tensor::zeros(DType::F4E2M1, &[2]).to_f64_vec(),
            vec![0.0, 0.0]
        );
    }

    #[test]
    fn close() {
        let a = Tensor::from_vec(&[2], vec![1.0f32, f32::NAN]);
        let b = Tensor::from_vec(&[2], vec![1.00001f32, f32::NAN]);
        assert!(a.check_close(&b, 1e-4, 0.0).is_ok());
        let c = Tensor::from_vec(&[2], vec![1.1f32, f32::NAN]);
        assert!(a.check_close(&c, 1e-4, 0.0).is_err());
    }
}

/// The serialized form of a [`Tensor`]: dtype, shape and raw little-endian bytes (the ONNX
/// `raw_data` layout of [`crate::onnx::tensor_proto::to_raw`]).
#[derive(serde::Serialize, serde::Deserialize)]
struct TensorRepr {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl serde::Serialize for Tensor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        TensorRepr {
            dtype: self.dtype(),
            shape: self.shape().to_vec(),
            data: crate::onnx::tensor_proto::to_raw(self),
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Tensor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let r = TensorRepr::deserialize(d)?;
        crate::onnx::tensor_proto::from_raw(r.dtype, &r.shape, &r.data)
            .map_err(serde::de::Error::custom)
    }
}
