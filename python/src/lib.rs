//! The native part of the `kiln` Python package (`kiln._native`); the Python-facing API is
//! `python/kiln/__init__.py`.

use kiln::{Compiler, DType, TensorView};
use numpy::{PyArrayDescrMethods, PyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::collections::HashMap;

pyo3::create_exception!(_native, KilnError, PyRuntimeError, "An error from Kiln.");

fn err(e: kiln::Error) -> PyErr {
    match e {
        kiln::Error::InvalidArgument(m) => PyValueError::new_err(m),
        e => KilnError::new_err(e.to_string()),
    }
}

/// A compiled model.
#[pyclass(module = "kiln._native", frozen)]
struct Artifact(kiln::Artifact);

#[pymethods]
impl Artifact {
    /// Writes the artifact file.
    fn save(&self, path: std::path::PathBuf) -> PyResult<()> {
        self.0.save(path).map_err(err)
    }

    /// Reads an artifact file.
    #[staticmethod]
    fn load(path: std::path::PathBuf) -> PyResult<Self> {
        Ok(Self(kiln::Artifact::load(path).map_err(err)?))
    }

    /// The artifact file's bytes.
    fn to_bytes(&self) -> PyResult<Vec<u8>> {
        self.0.to_bytes().map_err(err)
    }

    /// The compile report (text), or None for a loaded artifact.
    fn report(&self) -> Option<String> {
        self.0.report().map(|r| r.to_string())
    }

    /// The target it was compiled for.
    #[getter]
    fn target(&self) -> String {
        self.0.target().to_string()
    }
}

/// Compiles an ONNX model (a path or bytes).
#[pyfunction]
#[pyo3(signature = (model, target="cpu", shapes=None, opt_level=None, max_batch=None))]
fn compile(
    py: Python<'_>,
    model: &Bound<'_, PyAny>,
    target: &str,
    shapes: Option<HashMap<String, Vec<usize>>>,
    opt_level: Option<u8>,
    max_batch: Option<usize>,
) -> PyResult<Artifact> {
    let mut c = Compiler::new().target(target).map_err(err)?;
    for (k, v) in shapes.unwrap_or_default() {
        c = c.shape(k, v);
    }
    if let Some(o) = opt_level {
        c = c.opt_level(o);
    }
    if let Some(n) = max_batch {
        c = c.max_batch(n);
    }
    let a = if let Ok(bytes) = model.extract::<Vec<u8>>() {
        py.allow_threads(|| c.compile(&bytes))
    } else {
        let p: std::path::PathBuf = model.extract()?;
        py.allow_threads(|| c.compile(&p))
    };
    Ok(Artifact(a.map_err(err)?))
}

fn dtype_of(name: &str) -> PyResult<DType> {
    Ok(match name {
        "float32" => DType::F32,
        "float16" => DType::F16,
        "float64" => DType::F64,
        "int8" => DType::I8,
        "int16" => DType::I16,
        "int32" => DType::I32,
        "int64" => DType::I64,
        "uint8" => DType::U8,
        "uint16" => DType::U16,
        "uint32" => DType::U32,
        "uint64" => DType::U64,
        "bool" => DType::Bool,
        other => return Err(PyValueError::new_err(format!("unsupported dtype {other}"))),
    })
}

fn alloc<'py>(py: Python<'py>, d: DType, shape: &[usize]) -> PyResult<Bound<'py, PyUntypedArray>> {
    macro_rules! z {
        ($t:ty) => {
            PyArrayDyn::<$t>::zeros(py, shape, false)
                .into_any()
                .downcast_into::<PyUntypedArray>()?
        };
    }
    Ok(match d {
        DType::F32 => z!(f32),
        DType::F64 => z!(f64),
        DType::F16 => z!(half::f16),
        DType::I8 => z!(i8),
        DType::I16 => z!(i16),
        DType::I32 => z!(i32),
        DType::I64 => z!(i64),
        DType::U8 => z!(u8),
        DType::U16 => z!(u16),
        DType::U32 => z!(u32),
        DType::U64 => z!(u64),
        DType::Bool => z!(bool),
        other => {
            return Err(PyValueError::new_err(format!(
                "unsupported output dtype {other}"
            )))
        }
    })
}

/// The bytes of a C-contiguous array (checked by the caller), without copying.
fn raw(a: &Bound<'_, PyUntypedArray>) -> (usize, usize) {
    let n: usize = a.shape().iter().product();
    let nbytes = n * a.dtype().itemsize();
    // SAFETY: a valid ndarray object.
    let ptr = unsafe { (*a.as_array_ptr()).data } as usize;
    (ptr, nbytes)
}

/// Input metadata: dtype, shape, data address, size in bytes.
type Meta = (DType, Vec<usize>, usize, usize);

/// Views of the inputs described by `meta`.
fn views(meta: &[Meta]) -> Vec<TensorView<'_>> {
    meta.iter()
        .map(|(d, s, p, n)| {
            // SAFETY: the arrays are alive (held by the caller's `inputs`) and contiguous.
            let data = if *n == 0 {
                &[][..]
            } else {
                unsafe { std::slice::from_raw_parts(*p as *const u8, *n) }
            };
            TensorView::new(*d, s, data)
        })
        .collect()
}

/// A loaded model; `run` may be called from several threads at once (the GIL is released
/// while the model runs).
#[pyclass(module = "kiln._native", frozen)]
struct Session(kiln::Session);

#[pymethods]
impl Session {
    /// Loads an artifact file or an `Artifact`.
    #[new]
    #[pyo3(signature = (artifact, threads=1))]
    fn new(artifact: &Bound<'_, PyAny>, threads: usize) -> PyResult<Self> {
        let mut s = if let Ok(a) = artifact.downcast::<Artifact>() {
            kiln::Session::new(&a.get().0)
        } else {
            let p: std::path::PathBuf = artifact.extract()?;
            kiln::Session::load(p)
        }
        .map_err(err)?;
        s.set_threads(threads);
        Ok(Self(s))
    }

    /// Input names, in call order.
    #[getter]
    fn input_names(&self) -> Vec<String> {
        self.0.inputs().iter().map(|io| io.name.clone()).collect()
    }

    /// Output names, in result order.
    #[getter]
    fn output_names(&self) -> Vec<String> {
        self.0.outputs().iter().map(|io| io.name.clone()).collect()
    }

    /// Runs on C-contiguous arrays in input order (the Python wrapper arranges that) and
    /// returns new arrays in output order; inputs are read in place.
    fn run_arrays<'py>(
        &self,
        py: Python<'py>,
        inputs: Vec<Bound<'py, PyUntypedArray>>,
    ) -> PyResult<Vec<Bound<'py, PyUntypedArray>>> {
        let mut meta = Vec::with_capacity(inputs.len());
        for (i, a) in inputs.iter().enumerate() {
            if !a.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "input {i} is not C-contiguous"
                )));
            }
            let d = dtype_of(&a.dtype().str()?.to_cow()?)?;
            let (ptr, nbytes) = raw(a);
            meta.push((d, a.shape().to_vec(), ptr, nbytes));
        }
        let dynamic = self
            .0
            .outputs()
            .iter()
            .any(|io| io.shape.contains(&kiln::runtime::DimSpec::Dynamic));
        if dynamic {
            // Output shapes depend on the input values: run, then copy into new arrays.
            let r = py.allow_threads(|| self.0.run(&views(&meta)));
            return r
                .map_err(err)?
                .iter()
                .map(|t| {
                    let a = alloc(py, t.dtype, &t.shape)?;
                    let (p, n) = raw(&a);
                    if n != t.data.len() {
                        return Err(KilnError::new_err(format!(
                            "output of shape {:?}: {} bytes, the array has {n}",
                            t.shape,
                            t.data.len()
                        )));
                    }
                    if n > 0 {
                        // SAFETY: a fresh array of exactly `n` bytes, not shared yet.
                        unsafe { std::slice::from_raw_parts_mut(p as *mut u8, n) }
                            .copy_from_slice(t.data.as_slice());
                    }
                    Ok(a)
                })
                .collect();
        }
        let shapes = self.0.output_shapes(&views(&meta)).map_err(err)?;
        let outs: Vec<Bound<'py, PyUntypedArray>> = shapes
            .iter()
            .zip(self.0.outputs())
            .map(|(s, io)| alloc(py, io.dtype, s))
            .collect::<PyResult<_>>()?;
        let out_raw: Vec<(usize, usize)> = outs.iter().map(raw).collect();
        let r = py.allow_threads(|| {
            let mut bufs: Vec<&mut [u8]> = out_raw
                .iter()
                // SAFETY: fresh arrays owned by `outs`, not shared with anyone yet.
                .map(|&(p, n)| unsafe { std::slice::from_raw_parts_mut(p as *mut u8, n) })
                .collect();
            self.0.run_into(&views(&meta), &mut bufs)
        });
        r.map_err(err)?;
        Ok(outs)
    }
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Artifact>()?;
    m.add_class::<Session>()?;
    m.add_function(wrap_pyfunction!(compile, m)?)?;
    m.add("KilnError", m.py().get_type::<KilnError>())?;
    Ok(())
}
