//! Whether the pool's worker takes part in jobs right after the process was idle: rounds of
//! 50 two-chunk jobs (FMA work, ~30 µs a chunk) after 100 ms of sleep, or of busy work, with
//! the per-round median job time, one chunk alone, and the share of chunks the worker ran.
//! Unpinned (`KILN_PIN_THREADS=0`) on the 2-vCPU VM, after sleeping the worker ran ~0% of the
//! chunks (jobs took 2 × 30 µs): the OS had woken it on the caller's CPU (see
//! `runtime/src/affinity.rs`).
//!
//! `cargo run --release -p kiln-runtime --example pool_after_idle`
use kiln_runtime::pool::Pool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
#[inline(never)]
fn fma_work(n: usize) -> f32 {
    let mut a = [1.0f32; 64];
    for _ in 0..n {
        for x in a.iter_mut() {
            *x = x.mul_add(0.999, 0.001);
        }
    }
    a.iter().sum()
}
fn main() {
    let pool = Pool::new(2);
    let sink = AtomicUsize::new(0);
    let by_worker = AtomicUsize::new(0);
    let job = |_c: usize, t: usize| {
        let v = fma_work(200);
        sink.fetch_add(v as usize, Ordering::Relaxed);
        if t != 0 {
            by_worker.fetch_add(1, Ordering::Relaxed);
        }
    };
    let single = || {
        let t = Instant::now();
        let v = fma_work(200);
        sink.fetch_add(v as usize, Ordering::Relaxed);
        t.elapsed().as_secs_f64() * 1e6
    };
    for mode in ["sleep", "busy"] {
        let mut meds = vec![];
        let mut singles = vec![];
        let mut shares = vec![];
        for _ in 0..20 {
            if mode == "sleep" {
                std::thread::sleep(Duration::from_millis(100));
            } else {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(100) {
                    std::hint::black_box(fma_work(10));
                }
            }
            by_worker.store(0, Ordering::Relaxed);
            let mut v = vec![];
            for _ in 0..50 {
                let t = Instant::now();
                pool.run(2, &job);
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let mut s: Vec<f64> = (0..20).map(|_| single()).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            meds.push(v[25]);
            singles.push(s[10]);
            shares.push(by_worker.load(Ordering::Relaxed) as f64 / 50.0);
        }
        println!(
            "{mode}: job(2 chunks) p50 per round: {}",
            meds.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "{mode}: one chunk alone p50:       {}",
            singles
                .iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "{mode}: worker share: {}",
            shares
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}
