//! No allocation per call: every zoo model is compiled, loaded and run; once warm, a
//! `run_into` performs no Rust heap allocation (counted by this binary's global allocator),
//! on one thread and on several, and the kernel library imports no C allocator
//! (`malloc`, `free`, ...: kernels take their temporaries from the runtime's scratch).
//!
//! One test function only: the allocation counter is process-wide.

use kiln::runtime::{AlignedBuf, Model, TensorView};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting allocations (and reallocations).
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System`; the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// C allocator entry points a kernel library must not import.
const C_ALLOCATORS: [&str; 7] = [
    "malloc",
    "free",
    "calloc",
    "realloc",
    "aligned_alloc",
    "posix_memalign",
    "memalign",
];

fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/zoo")
        .join(name)
}

/// The undefined dynamic symbols of the shared library `so` (`nm -D --undefined-only`),
/// without version suffixes.
fn undefined_symbols(so: &[u8], dir: &Path) -> Vec<String> {
    let path = dir.join("kernels.so");
    std::fs::write(&path, so).unwrap();
    let out = Command::new("nm")
        .args(["-D", "--undefined-only"])
        .arg(&path)
        .output()
        .expect("running nm (binutils) to read the kernel library's symbols");
    assert!(out.status.success(), "nm failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|s| s.split('@').next().unwrap_or(s).to_string())
        .collect()
}

/// Compiles the zoo model `name` for its `test_data_set_0` shapes and checks the library's
/// imports and the allocations of warm `run_into` calls on 1 and 3 threads.
fn check(name: &str) {
    let model = zoo(name).join("model.onnx");
    let data = zoo(name).join("test_data_set_0");
    let g = kiln::load_model(&model).unwrap();
    let inputs = kiln::io::read_test_set(&data, "input").unwrap();
    assert_eq!(inputs.len(), g.inputs.len(), "{name}: test inputs");
    let mut compiler = kiln::Compiler::new();
    for (&id, t) in g.inputs.iter().zip(&inputs) {
        compiler = compiler.shape(g.values[id].name.clone(), t.shape().to_vec());
    }
    let art = compiler.compile(&model).unwrap();
    let rt = art.as_runtime();
    let dir = std::env::temp_dir().join(format!("kiln-no-alloc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let undefined = undefined_symbols(&rt.kernels, &dir);
    for s in &undefined {
        assert!(
            !C_ALLOCATORS.contains(&s.as_str()),
            "{name}: the kernel library imports '{s}' (all imports: {undefined:?})"
        );
    }
    let scratch = rt.plan.steps.iter().map(|s| s.scratch_bytes).max();
    assert!(
        rt.plan.steps.iter().all(|s| s.reference.is_none()),
        "{name}: reference steps (interpreted) allocate per call"
    );

    let path = dir.join("MODEL.kiln");
    art.save(&path).unwrap();
    let mut m = Model::load(&path).unwrap();
    let bufs: Vec<AlignedBuf> = inputs
        .iter()
        .map(|t| AlignedBuf::from_bytes(&kiln::ir::onnx::tensor_proto::to_raw(t)))
        .collect();
    let views: Vec<TensorView> = inputs
        .iter()
        .zip(&bufs)
        .map(|(t, b)| {
            let dt = t.dtype();
            TensorView::new(dt, t.shape(), b.as_slice())
        })
        .collect();
    let want = m.run(&views).unwrap();
    let mut outs: Vec<AlignedBuf> = want
        .iter()
        .map(|t| AlignedBuf::zeroed(t.data.len()))
        .collect();
    for threads in [1, 3] {
        m.set_threads(threads);
        let mut slices: Vec<&mut [u8]> = outs.iter_mut().map(|b| b.as_mut_slice()).collect();
        m.run_into(&views, &mut slices).unwrap();
        // New worker threads allocate while they start (thread handle, thread-locals), in
        // parallel with this thread: let them start, and take the quietest of a few windows
        // (an allocation per call would show in every window).
        std::thread::sleep(std::time::Duration::from_millis(200));
        let n = (0..3)
            .map(|_| {
                let before = ALLOCATIONS.load(Ordering::SeqCst);
                m.run_into(&views, &mut slices).unwrap();
                m.run_into(&views, &mut slices).unwrap();
                ALLOCATIONS.load(Ordering::SeqCst) - before
            })
            .min()
            .unwrap();
        assert_eq!(
            n, 0,
            "{name}: {n} allocations in two warm run_into calls on {threads} threads"
        );
        drop(slices);
        for (o, w) in outs.iter().zip(&want) {
            assert_eq!(o.as_slice(), w.data.as_slice(), "{name}: {threads} threads");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    eprintln!(
        "{name}: {} steps, largest kernel scratch {} bytes, 0 allocations per warm call",
        rt.plan.steps.len(),
        scratch.unwrap_or(0)
    );
}

#[test]
fn zoo_models_run_without_allocating() {
    for name in ["mlp", "resnet", "mobilenet", "bert", "gpt"] {
        check(name);
    }
}
