//! Shared test helpers: a tiny kernel library compiled from C at test time, and artifacts
//! built by hand around it.
#![allow(dead_code)]

use kiln_runtime::plan::WeightsBuilder;
use kiln_runtime::{Artifact, BufRef, DType, DimExpr, DimSpec, ExecPlan, IoSpec, Step, SymBound};
use std::process::Command;

/// Kernels following the uniform ABI
/// `void k(void *const *args, const int64_t *dims, void *scratch)`: `dims[0..2]` is the task
/// range, the kernel's own dims follow (`d = dims + 2`); `scratch` is per-call memory.
const KERNELS_C: &str = r#"
#include <stdint.h>
#include <stddef.h>
/* out = a + b, d[0] = length; one task per element: runs elements [dims[0], dims[1]) */
void add_f32(void *const *args, const int64_t *dims, void *scratch) {
    const int64_t *d = dims + 2;
    const float *a = args[0], *b = args[1]; float *o = args[2];
    int64_t end = dims[1] < d[0] ? dims[1] : d[0];
    for (int64_t i = dims[0] < 0 ? 0 : dims[0]; i < end; i++) o[i] = a[i] + b[i];
}
/* out = a + b like add_f32, through its scratch memory (SCRATCH_FLOATS floats, 64-byte
   aligned): fills it with its task range, waits, and checks nobody else wrote it; a
   misaligned or shared scratch makes the outputs NaN. */
#define SCRATCH_FLOATS 1024
void add_via_scratch_f32(void *const *args, const int64_t *dims, void *scratch) {
    const int64_t *d = dims + 2;
    const float *a = args[0], *b = args[1]; float *o = args[2];
    volatile float *s = scratch;
    int ok = ((uintptr_t)scratch % 64) == 0;
    int64_t begin = dims[0] < 0 ? 0 : dims[0];
    int64_t end = dims[1] < d[0] ? dims[1] : d[0];
    for (int r = 0; r < 50; r++) {
        for (int i = 0; i < SCRATCH_FLOATS; i++) s[i] = (float)(begin * 1000 + i + r);
        for (volatile int spin = 0; spin < 2000; spin++) {}
        for (int i = 0; i < SCRATCH_FLOATS; i++) ok &= s[i] == (float)(begin * 1000 + i + r);
    }
    for (int64_t i = begin; i < end; i++) o[i] = ok ? a[i] + b[i] : 0.0f / 0.0f;
}
/* out = max(x, 0), dims[0] = length */
void relu_f32(void *const *args, const int64_t *dims, void *scratch) {
    dims += 2;
    const float *x = args[0]; float *o = args[1];
    for (int64_t i = 0; i < dims[0]; i++) o[i] = x[i] > 0.0f ? x[i] : 0.0f;
}
/* out = max(x, 0) on [rows, cols], dims = [rows, cols] */
void relu2d_f32(void *const *args, const int64_t *dims, void *scratch) {
    dims += 2;
    const float *x = args[0]; float *o = args[1];
    for (int64_t i = 0; i < dims[0] * dims[1]; i++) o[i] = x[i] > 0.0f ? x[i] : 0.0f;
}
/* out[r][c] = x[r][c] + b[c], dims = [rows, cols] */
void add_row_bias_f32(void *const *args, const int64_t *dims, void *scratch) {
    dims += 2;
    const float *x = args[0], *b = args[1]; float *o = args[2];
    for (int64_t r = 0; r < dims[0]; r++)
        for (int64_t c = 0; c < dims[1]; c++) o[r * dims[1] + c] = x[r * dims[1] + c] + b[c];
}
/* out[r] = number of x[r][c] > 0 (i64), dims = [rows, cols] */
void count_pos_f32_i64(void *const *args, const int64_t *dims, void *scratch) {
    dims += 2;
    const float *x = args[0]; int64_t *o = args[1];
    for (int64_t r = 0; r < dims[0]; r++) {
        int64_t n = 0;
        for (int64_t c = 0; c < dims[1]; c++) n += x[r * dims[1] + c] > 0.0f;
        o[r] = n;
    }
}
"#;

/// Compiles [`KERNELS_C`] with `cc -shared -fPIC` and returns the library bytes.
pub fn kernel_library() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("kernels.c");
    let lib = dir.path().join("libkernels.so");
    std::fs::write(&src, KERNELS_C).unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("running cc");
    assert!(status.success(), "cc failed");
    std::fs::read(&lib).unwrap()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

pub const BIAS: [f32; 8] = [1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0, 10.0];

/// `y = relu(x + w)` on f32[2, 4]: input → add_f32(weight) → arena → relu_f32 → output.
pub fn add_relu_artifact(kernels: Vec<u8>) -> Artifact {
    let mut wb = WeightsBuilder::new();
    // A dummy first weight so the bias does not sit at offset 0.
    wb.push("unused", &[7; 3]);
    let w = wb.push("bias", &f32_bytes(&BIAS));
    let (weights, specs) = wb.finish();
    let shape = vec![DimSpec::Fixed(2), DimSpec::Fixed(4)];
    let plan = ExecPlan {
        inputs: vec![IoSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: shape.clone(),
        }],
        outputs: vec![IoSpec {
            name: "y".into(),
            dtype: DType::F32,
            shape,
        }],
        arena_bytes: 128,
        weights: specs,
        steps: vec![
            Step {
                kernel: "add_f32".into(),
                args: vec![
                    BufRef::Input { index: 0 },
                    BufRef::Weight { index: w },
                    BufRef::Arena {
                        offset: 64,
                        bytes: 32,
                    },
                ],
                num_inputs: 2,
                dims: vec![DimExpr::Const(8)],
                tasks: 8,
                scratch_bytes: 0,
                reference: None,
            },
            Step {
                kernel: "relu_f32".into(),
                args: vec![
                    BufRef::Arena {
                        offset: 64,
                        bytes: 32,
                    },
                    BufRef::Output { index: 0 },
                ],
                num_inputs: 1,
                dims: vec![DimExpr::Const(8)],
                tasks: 1,
                scratch_bytes: 0,
                reference: None,
            },
        ],
        sym_bounds: vec![],
        variants: vec![],
        tail: None,
        gpu: None,
        cluster: None,
    };
    Artifact {
        compiler_version: "kiln-test 0.0.0".into(),
        target: "cpu:x86-64".into(),
        plan,
        weights,
        kernels,
    }
}

/// A dynamic-batch model on x: f32[batch, 3] (batch ≤ 4):
/// `h = relu(x + b)` (arena), outputs `h` (f32[batch, 3]) and `count_pos(h)` (i64[batch]).
pub fn dynamic_artifact(kernels: Vec<u8>) -> Artifact {
    let mut wb = WeightsBuilder::new();
    let b = wb.push("b", &f32_bytes(&[1.0, -1.0, 0.0]));
    let (weights, specs) = wb.finish();
    let sym = || DimSpec::Sym("batch".into());
    let h = BufRef::Arena {
        offset: 0,
        bytes: 4 * 3 * 4,
    };
    let plan = ExecPlan {
        inputs: vec![IoSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![sym(), DimSpec::Fixed(3)],
        }],
        outputs: vec![
            IoSpec {
                name: "h".into(),
                dtype: DType::F32,
                shape: vec![sym(), DimSpec::Fixed(3)],
            },
            IoSpec {
                name: "count".into(),
                dtype: DType::I64,
                shape: vec![sym()],
            },
        ],
        arena_bytes: 64,
        weights: specs,
        steps: vec![
            Step {
                kernel: "add_row_bias_f32".into(),
                args: vec![
                    BufRef::Input { index: 0 },
                    BufRef::Weight { index: b },
                    h.clone(),
                ],
                num_inputs: 2,
                dims: vec![DimExpr::Sym("batch".into()), DimExpr::Const(3)],
                tasks: 1,
                scratch_bytes: 0,
                reference: None,
            },
            Step {
                kernel: "relu2d_f32".into(),
                args: vec![h.clone(), BufRef::Output { index: 0 }],
                num_inputs: 1,
                dims: vec![DimExpr::Sym("batch".into()), DimExpr::Const(3)],
                tasks: 1,
                scratch_bytes: 0,
                reference: None,
            },
            Step {
                kernel: "count_pos_f32_i64".into(),
                args: vec![h, BufRef::Output { index: 1 }],
                num_inputs: 1,
                dims: vec![DimExpr::Sym("batch".into()), DimExpr::Const(3)],
                tasks: 1,
                scratch_bytes: 0,
                reference: None,
            },
        ],
        sym_bounds: vec![SymBound {
            name: "batch".into(),
            max: 4,
        }],
        variants: vec![],
        tail: None,
        gpu: None,
        cluster: None,
    };
    Artifact {
        compiler_version: "kiln-test 0.0.0".into(),
        target: "cpu:x86-64".into(),
        plan,
        weights,
        kernels,
    }
}
