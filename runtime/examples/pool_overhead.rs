//! Fork-join cost of [`kiln_runtime::pool::Pool`] on two threads: the latency of a job of
//! two chunks of `w` µs busy work each (ideal: `w`; one thread alone: `2w`), back to back
//! (the worker spinning) and after an idle gap (the worker yielding or parked), and how many
//! chunks the worker ran. The runtime's per-step split threshold follows from the overhead.
//!
//! `cargo run --release -p kiln-runtime --example pool_overhead [ROUNDS]`

use kiln_runtime::pool::Pool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[0]), us(v[v.len() / 2]), us(v[v.len() * 9 / 10]))
}

/// Busy work of about `us` microseconds.
fn spin_for(us: f64) {
    let t = Instant::now();
    while t.elapsed().as_secs_f64() * 1e6 < us {
        std::hint::spin_loop();
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let pool = Pool::new(2);
    let main_id = std::thread::current().id();
    for work in [0.0, 1.0, 2.0, 5.0, 10.0] {
        // Two chunks of `work` µs each: ideal `work` on two threads, `2 × work` on one.
        let by_worker = AtomicUsize::new(0);
        let job = |_i: usize, _t: usize| {
            spin_for(work);
            if std::thread::current().id() != main_id {
                by_worker.fetch_add(1, Ordering::Relaxed);
            }
        };
        for gap_us in [0u64, 20, 200, 2_000] {
            let n = if gap_us == 0 {
                rounds
            } else {
                (rounds / 20).clamp(20, 1000)
            };
            for _ in 0..100 {
                pool.run(2, &job);
            }
            by_worker.store(0, Ordering::Relaxed);
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                spin_for(gap_us as f64);
                let t = Instant::now();
                pool.run(2, &job);
                v.push(t.elapsed());
            }
            let (min, p50, p90) = percentiles(v);
            let share = by_worker.load(Ordering::Relaxed) as f64 / n as f64;
            println!(
                "2 chunks x {work:>4.1} us, idle {gap_us:>4} us before: min {min:6.2} p50 {p50:6.2} p90 {p90:6.2} us (overhead at p50 {:5.2} us); worker ran {share:.2} chunks/job",
                p50 - work
            );
        }
    }
}
