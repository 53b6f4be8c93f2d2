//! Running PTX kernels on an NVIDIA GPU through the CUDA driver API (`cudarc`, loaded at
//! run time: the crate builds and its tests run on machines without CUDA).
//!
//! The PTX comes from `kiln_codegen::gpu` as text; this module does not link LLVM or MLIR.
//! Kernel parameters follow the code generator's ABI: a buffer is passed as MLIR's memref
//! descriptor `(allocated ptr, aligned ptr, offset, size, stride)`, an `index` as `i64`, an
//! `f32` as `f32` (see [`KernelArg`]).
//!
//! ```no_run
//! # fn main() -> Result<(), kiln_runtime::cuda::CudaError> {
//! use kiln_runtime::cuda::{CudaDevice, KernelArg};
//! let dev = CudaDevice::new(0)?;
//! # let ptx = String::new();
//! let f = dev.load_ptx(&ptx, "kiln_ew_mul_add_relu")?;
//! let x = dev.upload(&[1.0f32, -2.0])?;
//! let y = dev.zeros::<f32>(2)?;
//! let args = [KernelArg::Buffer(x.raw()), KernelArg::Buffer(y.raw()),
//!             KernelArg::F32(2.0), KernelArg::F32(0.5), KernelArg::Index(2)];
//! // SAFETY: the arguments match the kernel's parameters.
//! unsafe { dev.launch(&f, [1, 1, 1], [256, 1, 1], 0, &args)? };
//! assert_eq!(dev.download(&y)?, vec![2.5, 0.0]);
//! # Ok(()) }
//! ```

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use std::sync::Arc;

/// An error of the CUDA runtime path.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No CUDA driver library (`libcuda.so`) could be loaded, or it reports no device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// The PTX is malformed or has no entry of the requested name.
    #[error("PTX: {0}")]
    Ptx(String),
    /// Launch arguments do not make sense (zero-sized grid, too large values, ...).
    #[error("launch: {0}")]
    Launch(String),
}

fn driver(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(e.to_string())
}

/// Whether the CUDA driver library can be loaded and reports at least one device. Never
/// panics (unlike a bare `cudarc` call without a driver).
pub fn device_count() -> usize {
    // SAFETY: `is_culib_present` only tries to open the library with `libloading`.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    if cudarc::driver::result::init().is_err() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| usize::try_from(n).unwrap_or(0))
}

/// The node-local rank of this process under a launcher (`OMPI_COMM_WORLD_LOCAL_RANK`,
/// `MPI_LOCALRANKID`, `SLURM_LOCALID`), or `rank` when there is none (ranks as threads).
pub fn local_rank(rank: usize) -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(rank)
}

/// The GPU that rank `rank` runs on: its [`local_rank`] modulo the GPUs visible.
pub fn rank_device(rank: usize) -> usize {
    local_rank(rank) % device_count().max(1)
}

/// A device buffer of `T`.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    slice: CudaSlice<T>,
}

impl<T> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
}

impl<T> DeviceBuffer<T> {
    /// The underlying `cudarc` slice (for libraries such as cuBLAS).
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl DeviceBuffer<f32> {
    /// The buffer as a kernel argument.
    pub fn raw(&self) -> &CudaSlice<f32> {
        &self.slice
    }
}

impl DeviceBuffer<u16> {
    /// A buffer of 16-bit floats (f16 or bf16 bit patterns) as a kernel argument
    /// ([`KernelArg::Half`]).
    pub fn raw16(&self) -> &CudaSlice<u16> {
        &self.slice
    }
}

/// One kernel argument at the MLIR level.
#[derive(Debug, Clone, Copy)]
pub enum KernelArg<'a> {
    /// A `memref<?xf32>` parameter: passed as `(ptr, ptr, 0, len, 1)`.
    Buffer(&'a CudaSlice<f32>),
    /// An `f32` scalar.
    F32(f32),
    /// An `index` scalar (`i64`).
    Index(i64),
    /// A `memref<?xf16>` or `memref<?xbf16>` parameter (the bit patterns as `u16`): passed
    /// as `(ptr, ptr, 0, len, 1)`.
    Half(&'a CudaSlice<u16>),
    /// A TMA descriptor parameter: the device address of a `CUtensorMap`
    /// ([`CudaDevice::tensor_map_2d`]), one 64-bit value.
    TensorMap(&'a CudaSlice<u8>),
}

/// The element type of a 16-bit tensor described by a TMA descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem16 {
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

/// A kernel loaded from PTX.
#[derive(Debug, Clone)]
pub struct Kernel {
    func: CudaFunction,
    name: String,
}

impl Kernel {
    /// The entry name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One GPU with its primary context and default stream.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl CudaDevice {
    /// Opens device `ordinal`; [`CudaError::NoDevice`] when there is no driver or device.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let n = device_count();
        if ordinal >= n {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, {n} present (no libcuda or no GPU?)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let stream = ctx.default_stream();
        Ok(Self { ctx, stream })
    }

    /// The device's name (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> Result<String, CudaError> {
        self.ctx.name().map_err(driver)
    }

    /// Compute capability as `sm_XY`.
    pub fn arch(&self) -> Result<String, CudaError> {
        let (ma, mi) = self.ctx.compute_capability().map_err(driver)?;
        Ok(format!("sm_{ma}{mi}"))
    }

    /// Loads PTX text (JIT-compiled by the driver for this device) and resolves `entry`.
    pub fn load_ptx(&self, ptx: &str, entry: &str) -> Result<Kernel, CudaError> {
        if ptx.contains('\0') || entry.contains('\0') {
            return Err(CudaError::Ptx("text contains a NUL byte".into()));
        }
        if !ptx.contains(&format!(".entry {entry}(")) {
            return Err(CudaError::Ptx(format!("no .entry {entry} in the module")));
        }
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| CudaError::Ptx(e.to_string()))?;
        let func = module
            .load_function(entry)
            .map_err(|e| CudaError::Ptx(e.to_string()))?;
        Ok(Kernel {
            func,
            name: entry.to_string(),
        })
    }

    /// Copies `data` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<DeviceBuffer<T>, CudaError> {
        let slice = self.stream.clone_htod(data).map_err(driver)?;
        Ok(DeviceBuffer { slice })
    }

    /// A new zero-filled device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<DeviceBuffer<T>, CudaError> {
        let slice = self.stream.alloc_zeros(len).map_err(driver)?;
        Ok(DeviceBuffer { slice })
    }

    /// Copies a device buffer back (waits for the work queued before it).
    pub fn download<T: DeviceRepr>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>, CudaError> {
        self.stream.clone_dtoh(&buf.slice).map_err(driver)
    }

    /// Sets every element of `buf` to zero (queued on the device's stream).
    pub fn memset_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        buf: &mut DeviceBuffer<T>,
    ) -> Result<(), CudaError> {
        self.stream.memset_zeros(&mut buf.slice).map_err(driver)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver)
    }

    /// Encodes a rank-2 TMA descriptor for the 16-bit row-major tensor in `buf` (tiled,
    /// 128-byte swizzle, no interleave, no L2 promotion, zero fill out of bounds: what
    /// `kiln_codegen::gpu::kernels::gemm_wgmma` expects) and copies it to device memory.
    /// `dims` and `box_dims` are innermost first; `row_bytes` is the outer dimension's
    /// stride. Bad geometry (unaligned stride, box too large, ...) is an error.
    pub fn tensor_map_2d(
        &self,
        buf: &DeviceBuffer<u16>,
        elem: Elem16,
        dims: [u64; 2],
        row_bytes: u64,
        box_dims: [u32; 2],
    ) -> Result<DeviceBuffer<u8>, CudaError> {
        use cudarc::driver::DevicePtr;
        if dims[0] * dims[1] > buf.len() as u64 || !row_bytes.is_multiple_of(16) {
            return Err(CudaError::Launch(format!(
                "tensor map {dims:?} (row {row_bytes} B) does not fit a buffer of {} \
                 elements with 16-byte-aligned rows",
                buf.len()
            )));
        }
        let (ptr, _guard) = buf.slice.device_ptr(&self.stream);
        let bytes = encode_tensor_map_2d(ptr, elem, dims, row_bytes, box_dims)
            .map_err(CudaError::Launch)?;
        self.upload(&bytes)
    }

    /// The device's stream (for events and libraries such as cuBLAS).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Queues `kernel` on the device's stream with `grid` blocks of `block` threads and
    /// `dynamic_shared` bytes of dynamic shared memory (the function's
    /// `MAX_DYNAMIC_SHARED_SIZE_BYTES` attribute is set to it first).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type, and the sizes
    /// passed must not make the kernel access memory outside the buffers.
    pub unsafe fn launch(
        &self,
        kernel: &Kernel,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_shared: u32,
        args: &[KernelArg<'_>],
    ) -> Result<(), CudaError> {
        if grid.contains(&0) || block.contains(&0) {
            return Err(CudaError::Launch(format!(
                "empty grid {grid:?} or block {block:?}"
            )));
        }
        // Scalars must outlive the launch builder, which keeps references to them.
        let mut ints: Vec<i64> = Vec::new();
        let mut floats: Vec<f32> = Vec::new();
        for a in args {
            match *a {
                KernelArg::Buffer(s) => {
                    let len = i64::try_from(s.len())
                        .map_err(|_| CudaError::Launch("buffer too large".into()))?;
                    ints.extend([0, len, 1]);
                }
                KernelArg::Half(s) => {
                    let len = i64::try_from(s.len())
                        .map_err(|_| CudaError::Launch("buffer too large".into()))?;
                    ints.extend([0, len, 1]);
                }
                KernelArg::F32(v) => floats.push(v),
                KernelArg::Index(v) => ints.push(v),
                KernelArg::TensorMap(_) => {}
            }
        }
        if dynamic_shared > 0 {
            // Static and dynamic shared memory above 48 KiB together must be opted into per
            // function (48 KiB of dynamic plus static mbarriers failed to launch on an
            // H200): always say the dynamic size.
            let bytes = i32::try_from(dynamic_shared)
                .map_err(|_| CudaError::Launch(format!("{dynamic_shared} B of shared memory")))?;
            kernel
                .func
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
                .map_err(|e| {
                    CudaError::Launch(format!(
                        "'{}': {dynamic_shared} B of dynamic shared memory refused: {e}",
                        kernel.name
                    ))
                })?;
        }
        let mut b = self.stream.launch_builder(&kernel.func);
        let (mut ii, mut fi) = (ints.iter(), floats.iter());
        let missing = || CudaError::Launch("internal argument bookkeeping".into());
        for a in args {
            match a {
                KernelArg::Buffer(s) => {
                    b.arg(*s).arg(*s);
                    for _ in 0..3 {
                        b.arg(ii.next().ok_or_else(missing)?);
                    }
                }
                KernelArg::Half(s) => {
                    b.arg(*s).arg(*s);
                    for _ in 0..3 {
                        b.arg(ii.next().ok_or_else(missing)?);
                    }
                }
                KernelArg::F32(_) => {
                    b.arg(fi.next().ok_or_else(missing)?);
                }
                KernelArg::Index(_) => {
                    b.arg(ii.next().ok_or_else(missing)?);
                }
                KernelArg::TensorMap(s) => {
                    b.arg(*s);
                }
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (grid[0], grid[1], grid[2]),
            block_dim: (block[0], block[1], block[2]),
            shared_mem_bytes: dynamic_shared,
        };
        // SAFETY: forwarded to the caller (arguments match the kernel's parameters).
        unsafe { b.launch(cfg) }.map_err(driver)?;
        Ok(())
    }
}

/// A rank-2 TMA descriptor (128 bytes) of the 16-bit row-major tensor at device address
/// `ptr`: tiled, 128-byte swizzle, no interleave, no L2 promotion, zero fill out of bounds
/// (what `kiln_codegen::gpu::kernels::gemm_wgmma` expects); `dims` and `box_dims` innermost
/// first, `row_bytes` the outer dimension's stride. Bad geometry is an error naming it.
pub(crate) fn encode_tensor_map_2d(
    ptr: u64,
    elem: Elem16,
    dims: [u64; 2],
    row_bytes: u64,
    box_dims: [u32; 2],
) -> Result<Vec<u8>, String> {
    use cudarc::driver::sys;
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let dtype = match elem {
        Elem16::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        Elem16::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    };
    let strides = [row_bytes];
    let elem_strides = [1u32, 1];
    // SAFETY: `map` is a properly aligned CUtensorMap; the arrays have the lengths rank 2
    // requires (dims 2, strides 1, box 2, element strides 2) and outlive the call; the
    // address is only recorded, not dereferenced.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            box_dims.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_NONE,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result()
        .map_err(|e| format!("cuTensorMapEncodeTiled {dims:?} (row {row_bytes} B): {e}"))?;
    Ok(map.opaque.iter().flat_map(|w| w.to_le_bytes()).collect())
}
