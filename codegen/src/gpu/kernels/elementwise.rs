//! Fused elementwise kernel `y[i] = relu(x[i] * a + b)` with a grid-stride loop: any grid
//! covers any `n`, so the runtime may launch e.g. `4 × SMs` blocks of 256 threads.

use crate::gpu::{Elem, GpuKernel, KernelParam};

/// Threads per block of [`mul_add_relu`].
pub const BLOCK: u32 = 256;

/// `name(x: memref<?xf32>, y: memref<?xf32>, a: f32, b: f32, n: index)`:
/// `y[i] = max(x[i] * a + b, 0)` for `i < n`; launch with `BLOCK` threads per block.
pub fn mul_add_relu(name: &str) -> GpuKernel {
    let mlir = format!(
        r#"  gpu.func @{name}(%x: memref<?xf32>, %y: memref<?xf32>, %a: f32, %b: f32, %n: index) kernel attributes {{known_block_size = array<i32: {BLOCK}, 1, 1>}} {{
    %bid = gpu.block_id x
    %bdim = gpu.block_dim x
    %tid = gpu.thread_id x
    %gdim = gpu.grid_dim x
    %t0 = arith.muli %bid, %bdim : index
    %i0 = arith.addi %t0, %tid : index
    %step = arith.muli %gdim, %bdim : index
    %zero = arith.constant 0.0 : f32
    scf.for %i = %i0 to %n step %step {{
      %v = memref.load %x[%i] : memref<?xf32>
      %m = arith.mulf %v, %a fastmath<contract> : f32
      %s = arith.addf %m, %b fastmath<contract> : f32
      %r = arith.maximumf %s, %zero : f32
      memref.store %r, %y[%i] : memref<?xf32>
    }}
    gpu.return
  }}
"#
    );
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    GpuKernel {
        name: name.into(),
        mlir,
        params: vec![
            buf("x"),
            buf("y"),
            KernelParam::F32("a".into()),
            KernelParam::F32("b".into()),
            KernelParam::Index("n".into()),
        ],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        requires: vec![],
    }
}
