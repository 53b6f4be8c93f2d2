//! Reading and writing tensors: `.npy` / `.npz` (numpy) and `.pb` (ONNX `TensorProto`).
//! Every write goes to a temporary file that is then renamed over the target.

use anyhow::{bail, Context, Result};
use kiln_ir::{DType, Tensor};
use ndarray::ArrayD;
use ndarray_npy::{NpzWriter, ReadNpyExt, WriteNpyExt};
use std::io::{Cursor, Write};
use std::path::Path;

/// Reads a tensor from `.npy` or `.pb`.
pub fn read_tensor(path: &Path) -> Result<Tensor> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "pb" => Ok(kiln_ir::onnx::load_tensor_pb(path)?.1),
        "npy" => {
            let bytes =
                std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
            read_npy(&bytes)
                .with_context(|| format!("{}: not a supported .npy file", path.display()))
        }
        _ => bail!(
            "{}: unknown tensor file type (use .npy or .pb)",
            path.display()
        ),
    }
}

fn read_npy(bytes: &[u8]) -> Result<Tensor> {
    macro_rules! try_types {
        ($($t:ty),*) => {
            $(if let Ok(a) = ArrayD::<$t>::read_npy(Cursor::new(bytes)) {
                return Ok(Tensor::from(a));
            })*
        };
    }
    try_types!(f32, f64, i64, i32, i16, i8, u8, u16, u32, u64, bool);
    bail!("unsupported dtype or layout (supported: f32 f64 i8..i64 u8..u64 bool, C order)")
}

fn npy_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    match t {
        Tensor::F32(a) => a.write_npy(&mut buf)?,
        Tensor::F64(a) => a.write_npy(&mut buf)?,
        Tensor::I8(a) => a.write_npy(&mut buf)?,
        Tensor::I16(a) => a.write_npy(&mut buf)?,
        Tensor::I32(a) => a.write_npy(&mut buf)?,
        Tensor::I64(a) => a.write_npy(&mut buf)?,
        Tensor::U8(a) => a.write_npy(&mut buf)?,
        Tensor::U16(a) => a.write_npy(&mut buf)?,
        Tensor::U32(a) => a.write_npy(&mut buf)?,
        Tensor::U64(a) => a.write_npy(&mut buf)?,
        Tensor::Bool(a) => a.write_npy(&mut buf)?,
        // numpy has f16 but ndarray-npy does not: write as f32; bf16 has no numpy type.
        Tensor::F16(_) | Tensor::BF16(_) | Tensor::Low(..) => {
            return npy_bytes(&t.cast(DType::F32))
        }
    }
    Ok(buf)
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{}: write failed", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// Writes named tensors: `.npz` (one array per name), or `.npy` for a single tensor.
pub fn write_tensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let bytes = match ext {
        "npz" => {
            let mut w = NpzWriter::new(Cursor::new(Vec::new()));
            for (name, t) in named {
                match t {
                    Tensor::F32(a) => w.add_array(name.as_str(), a)?,
                    Tensor::F64(a) => w.add_array(name.as_str(), a)?,
                    Tensor::I64(a) => w.add_array(name.as_str(), a)?,
                    Tensor::I32(a) => w.add_array(name.as_str(), a)?,
                    Tensor::Bool(a) => w.add_array(name.as_str(), a)?,
                    Tensor::U8(a) => w.add_array(name.as_str(), a)?,
                    Tensor::I8(a) => w.add_array(name.as_str(), a)?,
                    other => w.add_array(
                        name.as_str(),
                        other.cast(DType::F64).as_array::<f64>().expect("f64"),
                    )?,
                }
            }
            w.finish()?.into_inner()
        }
        "npy" if named.len() == 1 => npy_bytes(&named[0].1)?,
        "npy" => bail!(
            "{}: .npy holds one tensor but the model has {} outputs; use .npz",
            path.display(),
            named.len()
        ),
        _ => bail!("{}: unknown output type (use .npz or .npy)", path.display()),
    };
    write_atomic(path, &bytes)
}

/// The tensors `DIR/PREFIX_0.pb`, `DIR/PREFIX_1.pb`, ... of an ONNX test data folder, in
/// order, up to the first missing index.
pub fn read_test_set(dir: &Path, prefix: &str) -> Result<Vec<Tensor>> {
    let mut v = Vec::new();
    for k in 0.. {
        let p = dir.join(format!("{prefix}_{k}.pb"));
        if !p.exists() {
            break;
        }
        v.push(read_tensor(&p)?);
    }
    Ok(v)
}

/// Replaces, in `inputs` (named `names`, in order), the inputs given as `NAME=FILE` specs
/// (`.npy` or `.pb` files); returns the `(name, file)` pairs replaced, in spec order.
pub fn replace_named_inputs<'s>(
    names: &[String],
    inputs: &mut [Tensor],
    specs: &'s [String],
) -> Result<Vec<(&'s str, &'s str)>> {
    let mut done = Vec::new();
    for spec in specs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input '{spec}': expected NAME=FILE"))?;
        let pos = names
            .iter()
            .position(|n| n == name)
            .with_context(|| format!("--input '{spec}': the model has no input named '{name}'"))?;
        inputs[pos] = read_tensor(Path::new(file))?;
        done.push((name, file));
    }
    Ok(done)
}

/// Native-endian, aligned runtime copies of `tensors` (graph tensors) with their dtypes.
pub fn runtime_buffers(tensors: &[Tensor]) -> Vec<(kiln_runtime::DType, kiln_runtime::AlignedBuf)> {
    tensors
        .iter()
        .map(|t| {
            let raw = kiln_ir::onnx::tensor_proto::to_raw(t);
            (t.dtype(), kiln_runtime::AlignedBuf::from_bytes(&raw))
        })
        .collect()
}

/// Runtime views of `tensors` over their [`runtime_buffers`].
pub fn tensor_views<'a>(
    tensors: &'a [Tensor],
    bufs: &'a [(kiln_runtime::DType, kiln_runtime::AlignedBuf)],
) -> Vec<kiln_runtime::TensorView<'a>> {
    tensors
        .iter()
        .zip(bufs)
        .map(|(t, (dt, b))| kiln_runtime::TensorView::new(*dt, t.shape(), b.as_slice()))
        .collect()
}

/// A runtime output as a graph tensor (for comparisons and `.npz` files).
pub fn graph_tensor(t: &kiln_runtime::Tensor) -> Result<Tensor> {
    kiln_ir::onnx::tensor_proto::from_raw(t.dtype, &t.shape, t.data.as_slice())
        .map_err(anyhow::Error::msg)
}
