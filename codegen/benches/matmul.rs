//! Criterion benchmark of the generated f32 matmul (default schedule) at a few sizes, single
//! thread. Throughput is reported in FLOPs (2·M·N·K per call).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln_codegen::cpu::matmul::{matmul, Epilogue, MatmulSchedule};
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_runtime::kernel_lib::{scratch_buffer, KernelLibrary};

fn bench_matmul(c: &mut Criterion) {
    let kernels = [
        matmul("mm", &MatmulSchedule::default(), Epilogue::None),
        matmul(
            "mm_bias_relu",
            &MatmulSchedule::default(),
            Epilogue::BiasRelu,
        ),
    ];
    let so = compile_library(&kernels, &CpuOptions::default()).expect("compile");
    let scratch_bytes = kernels.iter().map(|k| k.signature.scratch_bytes).max();
    let mut scratch = scratch_buffer(scratch_bytes.unwrap_or(0));
    let lib = KernelLibrary::from_bytes(&so).expect("load");
    let mut group = c.benchmark_group("matmul_f32");
    group.sample_size(10);
    for &n in &[256usize, 512, 1024] {
        let a = vec![0.5f32; n * n];
        let b = vec![0.25f32; n * n];
        let bias = vec![0.1f32; n];
        let mut out = vec![0f32; n * n];
        let dims = [n as i64; 3];
        group.throughput(Throughput::Elements((2 * n * n * n) as u64));
        let k = lib.kernel("mm").expect("kernel");
        group.bench_function(format!("{n}x{n}x{n}"), |bch| {
            let args = [
                a.as_ptr() as *mut u8,
                b.as_ptr() as *mut u8,
                out.as_mut_ptr() as *mut u8,
            ];
            // SAFETY: all buffers are n×n.
            bch.iter(|| unsafe { k.call(&args, &dims, scratch.as_mut_slice()) })
        });
        let k = lib.kernel("mm_bias_relu").expect("kernel");
        group.bench_function(format!("{n}x{n}x{n}_bias_relu"), |bch| {
            let args = [
                a.as_ptr() as *mut u8,
                b.as_ptr() as *mut u8,
                bias.as_ptr() as *mut u8,
                out.as_mut_ptr() as *mut u8,
            ];
            // SAFETY: a, b, out are n×n, bias has n elements.
            bch.iter(|| unsafe { k.call(&args, &dims, scratch.as_mut_slice()) })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
