//! Loading compiled CPU kernel libraries (`.so` files produced by `kiln_codegen::cpu`) and
//! calling their kernels. Plain `dlopen` through `libloading`: no LLVM here.
//!
//! Every kernel has the uniform C signature
//!
//! ```c
//! void kernel_name(void *const *args, const int64_t *dims, void *scratch);
//! ```
//!
//! where `args` holds one base pointer per tensor buffer (inputs, then outputs; dense,
//! row-major), `dims` the task range and the runtime values of the kernel's symbolic
//! dimensions, and `scratch` a caller-owned, 64-byte-aligned buffer of the kernel's declared
//! scratch size ([`crate::Step::scratch_bytes`]), private to the call, with any contents.

use std::marker::PhantomData;
use std::path::Path;

/// The uniform kernel entry point.
pub type KernelFn = unsafe extern "C" fn(args: *const *mut u8, dims: *const i64, scratch: *mut u8);

/// Why a kernel library could not be loaded or a kernel not found.
#[derive(Debug, thiserror::Error)]
pub enum KernelLibError {
    /// Writing the library bytes to a temporary file failed.
    #[error("writing kernel library: {0}")]
    Io(#[from] std::io::Error),
    /// `dlopen` failed.
    #[error("loading kernel library: {0}")]
    Load(String),
    /// The library has no such symbol.
    #[error("kernel '{name}' not found: {msg}")]
    Missing {
        /// The requested kernel name.
        name: String,
        /// The loader's message.
        msg: String,
    },
}

/// A loaded kernel library. Kernels resolved from it borrow it, so it outlives them.
#[derive(Debug)]
pub struct KernelLibrary {
    lib: libloading::Library,
}

impl KernelLibrary {
    /// Loads a library from its bytes: they are written to a private temporary file, which is
    /// `dlopen`ed and then removed (the mapping stays valid).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KernelLibError> {
        let mut file = tempfile::Builder::new()
            .prefix("kiln-kernels-")
            .suffix(".so")
            .tempfile()?;
        std::io::Write::write_all(&mut file, bytes)?;
        std::io::Write::flush(&mut file)?;
        let lib = Self::open(file.path());
        drop(file);
        lib
    }

    /// Loads a library from a file.
    pub fn open(path: &Path) -> Result<Self, KernelLibError> {
        // SAFETY: Kiln kernel libraries have no initialisers with preconditions.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| KernelLibError::Load(e.to_string()))?;
        Ok(Self { lib })
    }

    /// Resolves the kernel exported as `name`.
    pub fn kernel(&self, name: &str) -> Result<KernelHandle<'_>, KernelLibError> {
        // SAFETY: every kernel in a Kiln library has the `KernelFn` signature.
        let sym: libloading::Symbol<'_, KernelFn> = unsafe { self.lib.get(name.as_bytes()) }
            .map_err(|e| KernelLibError::Missing {
                name: name.to_string(),
                msg: e.to_string(),
            })?;
        Ok(KernelHandle {
            f: *sym,
            _lib: PhantomData,
        })
    }
}

/// A kernel resolved from a [`KernelLibrary`].
#[derive(Debug, Clone, Copy)]
pub struct KernelHandle<'lib> {
    f: KernelFn,
    _lib: PhantomData<&'lib KernelLibrary>,
}

impl KernelHandle<'_> {
    /// The raw entry point.
    pub fn raw(&self) -> KernelFn {
        self.f
    }

    /// Calls the kernel on all its tasks; `dims` holds its symbolic dims (the task range
    /// `[0, i64::MAX]` is put in front, see the ABI in `kiln_codegen::cpu::abi`) and
    /// `scratch` is its scratch memory (see [`scratch_buffer`]).
    ///
    /// # Safety
    /// `args` must hold exactly the buffers the kernel expects, each valid for the sizes the
    /// kernel derives from `dims` (inputs readable, outputs writable, outputs not aliasing
    /// inputs unless the kernel allows it), `dims` must hold all its symbolic dims, and
    /// `scratch` must be at least the kernel's declared scratch size.
    pub unsafe fn call(&self, args: &[*mut u8], dims: &[i64], scratch: &mut [u8]) {
        // SAFETY: upheld by the caller.
        unsafe { self.call_tasks(args, 0, i64::MAX, dims, scratch) }
    }

    /// Calls the kernel on its tasks `begin..end` only.
    ///
    /// # Safety
    /// As [`KernelHandle::call`]; calls running at the same time must have disjoint ranges
    /// (and their own `scratch`).
    ///
    /// # Panics
    /// If `scratch` is not 64-byte aligned.
    pub unsafe fn call_tasks(
        &self,
        args: &[*mut u8],
        begin: i64,
        end: i64,
        dims: &[i64],
        scratch: &mut [u8],
    ) {
        assert!(
            (scratch.as_ptr() as usize).is_multiple_of(crate::plan::ALIGNMENT),
            "kernel scratch must be {}-byte aligned",
            crate::plan::ALIGNMENT
        );
        let mut all = Vec::with_capacity(dims.len() + 2);
        all.extend_from_slice(&[begin, end]);
        all.extend_from_slice(dims);
        // SAFETY: upheld by the caller.
        unsafe { (self.f)(args.as_ptr(), all.as_ptr(), scratch.as_mut_ptr()) }
    }
}

/// A zeroed, 64-byte-aligned scratch buffer of `bytes` bytes for [`KernelHandle::call`]
/// (the kernel's `KernelSignature::scratch_bytes`).
pub fn scratch_buffer(bytes: u64) -> crate::AlignedBuf {
    crate::AlignedBuf::zeroed(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bytes_that_are_not_a_library() {
        let err = KernelLibrary::from_bytes(b"not an ELF file").unwrap_err();
        assert!(matches!(err, KernelLibError::Load(_)), "{err}");
    }
}
