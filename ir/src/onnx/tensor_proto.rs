//! Decoding ONNX `TensorProto`s (raw data, typed fields, external data) into [`Tensor`]s,
//! and encoding tensors back (for writing `.pb` test data).

use super::proto;
use crate::dtype::DType;
use crate::tensor::{Elem, Tensor};
use half::{bf16, f16};
use std::path::Path;

/// Decodes a `TensorProto`. `base_dir` resolves external data files; errors are messages
/// naming the field at fault.
pub fn decode(t: &proto::TensorProto, base_dir: Option<&Path>) -> Result<Tensor, String> {
    let code = t.data_type();
    let dtype = DType::from_onnx(code).ok_or_else(|| {
        format!(
            "data_type {} ({}) is not supported",
            code,
            DType::onnx_name(code)
        )
    })?;
    if t.segment.is_some() {
        return Err("segmented tensors are not supported".into());
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("dims: negative dimension {d}"));
        }
        shape.push(d as usize);
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= (1usize << 40))
        .ok_or_else(|| format!("dims {:?}: element count overflows", t.dims))?;
    let external = t.data_location() == proto::tensor_proto::DataLocation::External;
    if external {
        let bytes = read_external(t, base_dir, raw_len(dtype, numel))?;
        return from_raw(dtype, &shape, &bytes);
    }
    if let Some(raw) = &t.raw_data {
        return from_raw(dtype, &shape, raw);
    }
    let check = |n: usize, field: &str| {
        if n == numel {
            Ok(())
        } else {
            Err(format!(
                "{field}: has {n} elements but dims {:?} need {numel}",
                t.dims
            ))
        }
    };
    match dtype {
        d if d.is_low_precision() => {
            // one code (8-bit types) or one packed byte (4-bit, 2-bit types) per int32
            let bytes: Vec<u8> = t.int32_data.iter().map(|&x| x as u8).collect();
            let want = raw_len(dtype, numel);
            if bytes.len() != want {
                return Err(format!(
                    "int32_data: has {} entries but dims {:?} of {dtype} need {want}",
                    bytes.len(),
                    t.dims
                ));
            }
            from_raw(dtype, &shape, &bytes)
        }
        DType::F32 => {
            check(t.float_data.len(), "float_data")?;
            Tensor::try_from_vec(&shape, t.float_data.clone())
        }
        DType::F64 => {
            check(t.double_data.len(), "double_data")?;
            Tensor::try_from_vec(&shape, t.double_data.clone())
        }
        DType::I64 => {
            check(t.int64_data.len(), "int64_data")?;
            Tensor::try_from_vec(&shape, t.int64_data.clone())
        }
        DType::U32 | DType::U64 => {
            check(t.uint64_data.len(), "uint64_data")?;
            let v: Vec<u64> = t.uint64_data.clone();
            Ok(Tensor::try_from_vec(&shape, v)?.cast(dtype))
        }
        DType::F16 => {
            check(t.int32_data.len(), "int32_data")?;
            let v = t
                .int32_data
                .iter()
                .map(|&b| f16::from_bits(b as u16))
                .collect();
            Tensor::try_from_vec(&shape, v)
        }
        DType::BF16 => {
            check(t.int32_data.len(), "int32_data")?;
            let v = t
                .int32_data
                .iter()
                .map(|&b| bf16::from_bits(b as u16))
                .collect();
            Tensor::try_from_vec(&shape, v)
        }
        _ => {
            // int32, int16, int8, uint16, uint8, bool are stored in int32_data.
            check(t.int32_data.len(), "int32_data")?;
            let v: Vec<i64> = t.int32_data.iter().map(|&x| x as i64).collect();
            Ok(Tensor::try_from_vec(&shape, v)?.cast(dtype))
        }
    }
}

fn read_external(
    t: &proto::TensorProto,
    base_dir: Option<&Path>,
    want: usize,
) -> Result<Vec<u8>, String> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        let v = kv.value();
        match kv.key() {
            "location" => location = Some(v.to_string()),
            "offset" => {
                offset = v
                    .parse()
                    .map_err(|_| format!("external_data offset '{v}'"))?
            }
            "length" => {
                length = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("external_data length '{v}'"))?,
                )
            }
            _ => {}
        }
    }
    let loc = location.ok_or("external_data: no 'location' key")?;
    let rel = Path::new(&loc);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "external_data location '{loc}' must be a relative path inside the model's folder"
        ));
    }
    let dir = base_dir.ok_or("external data needs the model's folder (load from a file)")?;
    let path = dir.join(rel);
    let data =
        std::fs::read(&path).map_err(|e| format!("external data file {}: {e}", path.display()))?;
    let len = length.unwrap_or(want as u64);
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= data.len() as u64)
        .ok_or_else(|| {
            format!(
                "external data file {}: offset {offset} + length {len} is past its end ({} bytes)",
                path.display(),
                data.len()
            )
        })?;
    Ok(data[offset as usize..end as usize].to_vec())
}

fn le_vec<T: Elem, const N: usize>(raw: &[u8], conv: fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| conv(c.try_into().expect("chunk size")))
        .collect()
}

/// Bytes of `numel` elements of `dtype` in ONNX raw data (4-bit and 2-bit types packed).
fn raw_len(dtype: DType, numel: usize) -> usize {
    (numel * dtype.bits()).div_ceil(8)
}

/// Unpacks the codes of a low-precision tensor: one per byte, or packed low bits first
/// (two 4-bit or four 2-bit codes per byte).
fn unpack_low(dtype: DType, numel: usize, raw: &[u8]) -> Vec<f32> {
    let bits = dtype.bits();
    let per_byte = 8 / bits;
    let mask = ((1u16 << bits) - 1) as u8;
    (0..numel)
        .map(|i| {
            let code = (raw[i / per_byte] >> ((i % per_byte) * bits)) & mask;
            dtype.decode_low(code)
        })
        .collect()
}

/// Packs the codes of a low-precision tensor (the inverse of [`unpack_low`]).
fn pack_low(dtype: DType, values: &ndarray::ArrayD<f32>) -> Vec<u8> {
    let bits = dtype.bits();
    let per_byte = 8 / bits;
    let mut out = vec![0u8; raw_len(dtype, values.len())];
    for (i, &v) in values.iter().enumerate() {
        let code = dtype.encode_low(v as f64, false);
        out[i / per_byte] |= code << ((i % per_byte) * bits);
    }
    out
}

/// Builds a tensor from little-endian raw bytes.
pub fn from_raw(dtype: DType, shape: &[usize], raw: &[u8]) -> Result<Tensor, String> {
    let numel: usize = shape.iter().product();
    let want = raw_len(dtype, numel);
    if raw.len() != want {
        return Err(format!(
            "raw_data: {} bytes, but dims {shape:?} of {dtype} need {want}",
            raw.len(),
        ));
    }
    match dtype {
        d if d.is_low_precision() => Ok(Tensor::Low(
            d,
            ndarray::ArrayD::from_shape_vec(shape, unpack_low(d, numel, raw))
                .map_err(|e| e.to_string())?,
        )),
        DType::F32 => Tensor::try_from_vec(shape, le_vec(raw, f32::from_le_bytes)),
        DType::F64 => Tensor::try_from_vec(shape, le_vec(raw, f64::from_le_bytes)),
        DType::F16 => Tensor::try_from_vec(
            shape,
            le_vec(raw, |b| f16::from_bits(u16::from_le_bytes(b))),
        ),
        DType::BF16 => Tensor::try_from_vec(
            shape,
            le_vec(raw, |b| bf16::from_bits(u16::from_le_bytes(b))),
        ),
        DType::I8 => Tensor::try_from_vec(shape, le_vec(raw, i8::from_le_bytes)),
        DType::I16 => Tensor::try_from_vec(shape, le_vec(raw, i16::from_le_bytes)),
        DType::I32 => Tensor::try_from_vec(shape, le_vec(raw, i32::from_le_bytes)),
        DType::I64 => Tensor::try_from_vec(shape, le_vec(raw, i64::from_le_bytes)),
        DType::U8 => Tensor::try_from_vec(shape, raw.to_vec()),
        DType::U16 => Tensor::try_from_vec(shape, le_vec(raw, u16::from_le_bytes)),
        DType::U32 => Tensor::try_from_vec(shape, le_vec(raw, u32::from_le_bytes)),
        DType::U64 => Tensor::try_from_vec(shape, le_vec(raw, u64::from_le_bytes)),
        DType::Bool => Tensor::try_from_vec(shape, raw.iter().map(|&b| b != 0).collect()),
        _ => unreachable!("low-precision dtypes handled above"),
    }
}

/// The tensor's data as little-endian bytes.
pub fn to_raw(t: &Tensor) -> Vec<u8> {
    fn bytes<T: Elem, const N: usize>(a: &ndarray::ArrayD<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
        a.iter().flat_map(|&x| f(x)).collect()
    }
    match t {
        Tensor::F32(a) => bytes(a, f32::to_le_bytes),
        Tensor::F64(a) => bytes(a, f64::to_le_bytes),
        Tensor::F16(a) => bytes(a, |x| x.to_bits().to_le_bytes()),
        Tensor::BF16(a) => bytes(a, |x| x.to_bits().to_le_bytes()),
        Tensor::I8(a) => bytes(a, i8::to_le_bytes),
        Tensor::I16(a) => bytes(a, i16::to_le_bytes),
        Tensor::I32(a) => bytes(a, i32::to_le_bytes),
        Tensor::I64(a) => bytes(a, i64::to_le_bytes),
        Tensor::U8(a) => a.iter().copied().collect(),
        Tensor::U16(a) => bytes(a, u16::to_le_bytes),
        Tensor::U32(a) => bytes(a, u32::to_le_bytes),
        Tensor::U64(a) => bytes(a, u64::to_le_bytes),
        Tensor::Bool(a) => a.iter().map(|&b| b as u8).collect(),
        Tensor::Low(d, a) => pack_low(*d, a),
    }
}

/// Encodes a tensor as a `TensorProto` with raw data.
pub fn encode(name: &str, t: &Tensor) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.to_string()),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype().to_onnx()),
        raw_data: Some(to_raw(t)),
        ..Default::default()
    }
}
