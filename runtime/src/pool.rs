//! A small fork-join thread pool for running one kernel's task ranges on several cores.
//!
//! [`Pool::run`]`(chunks, f)` calls `f(i)` exactly once for every chunk `i` in `0..chunks`;
//! the caller and the workers claim chunks from a shared counter, so when the machine is
//! busy and a worker is not scheduled in time, the caller simply runs its chunks too and
//! only ever waits for workers that have actually started on this job (a worker joins a job
//! atomically, and the caller closes the job to latecomers before waiting). Kernels are
//! short (microseconds), so workers spin on the job word for a while after each job
//! ([`SPIN`] spins, then [`YIELDS`] yields) before parking on a condition variable.
//! Running a job allocates nothing. Workers are pinned to CPUs other than the creating
//! thread's (see `affinity.rs` for the measurement behind it), so that after an idle period
//! the OS does not wake a worker on the caller's CPU, behind the caller.

use crate::affinity::{self, Placement};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spin iterations (`spin_loop` hints) a waiting thread makes before it starts yielding its
/// core to the OS scheduler between checks (the machine may have fewer free cores than
/// threads: a waiter must not burn the core the thread it waits for needs).
pub const SPIN: u32 = 2_000;

/// Yields a worker makes (after spinning) before it parks until the next job.
pub const YIELDS: u32 = 2_000;

type Job = *const (dyn Fn(usize, usize) + Sync);

/// `state` layout: job epoch in the high bits, a "closed" bit, and the count of workers that
/// joined the job in the low bits.
const JOINED_BITS: u32 = 23;
const CLOSED: u64 = 1 << JOINED_BITS;
const EPOCH_SHIFT: u32 = JOINED_BITS + 1;

fn epoch_of(state: u64) -> u64 {
    state >> EPOCH_SHIFT
}

struct Shared {
    state: AtomicU64,
    next: AtomicUsize,
    chunks: AtomicUsize,
    done: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread calling `Pool::run` before it publishes a new
// epoch (release), while no worker can be using it (every worker that joined the previous
// job has finished); a worker reads it only after joining the published epoch (acquire), and
// `run` does not return before every worker that joined is done.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of worker threads (see the module doc).
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    placement: Placement,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads())
    }
}

impl Pool {
    /// A pool running jobs on `threads` threads in all: the caller plus `threads - 1`
    /// workers (`threads` is at least 1), each worker pinned to its own CPU other than the
    /// creator's when there are enough (see `affinity.rs`).
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(CLOSED),
            next: AtomicUsize::new(0),
            chunks: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let placement = Placement::new(threads.max(1) - 1);
        let workers = (1..threads.max(1))
            .map(|tid| {
                let s = Arc::clone(&shared);
                let cpu = placement.worker(tid - 1);
                std::thread::Builder::new()
                    .name(format!("kiln-worker-{tid}"))
                    .spawn(move || worker(&s, tid, cpu))
                    .expect("spawning a kiln worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            placement,
        }
    }

    /// Number of threads a job may run on (workers + the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(i, thread)` once for every chunk `i` in `0..chunks`, on the calling thread
    /// (`thread` 0) and on the workers that join in time (`thread` 1.., each its own), and
    /// returns when all calls have returned.
    pub fn run(&self, chunks: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let s = &*self.shared;
        if self.workers.is_empty() || chunks <= 1 {
            (0..chunks).for_each(|i| f(i, 0));
            return;
        }
        let _off_worker_cpus = self.placement.caller_guard();
        // SAFETY: the previous job is closed and every worker that joined it is done, so no
        // worker reads `job`; the pointer stays valid until this function returns, after
        // every worker that joins this job is done with it.
        unsafe {
            let erased: Job = std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), Job>(f);
            *s.job.get() = Some(erased);
        }
        s.chunks.store(chunks, Ordering::Relaxed);
        s.next.store(0, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        let epoch = epoch_of(s.state.load(Ordering::Relaxed)) + 1;
        s.state.store(epoch << EPOCH_SHIFT, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        claim_all(s, f, 0);
        // Close the job to latecomers, then wait for those who joined.
        let joined = s.state.fetch_or(CLOSED, Ordering::AcqRel) & (CLOSED - 1);
        let mut spins = 0u32;
        while (s.done.load(Ordering::Acquire) as u64) < joined {
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs chunks claimed from the shared counter until none is left.
fn claim_all(s: &Shared, f: &(dyn Fn(usize, usize) + Sync), thread: usize) {
    let n = s.chunks.load(Ordering::Relaxed);
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        f(i, thread);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        let epoch = epoch_of(s.state.load(Ordering::Relaxed)) + 1;
        s.state
            .store((epoch << EPOCH_SHIFT) | CLOSED, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, thread: usize, cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        // Best effort: if the CPU cannot be set, the worker runs unpinned.
        let _ = affinity::pin_current_thread(cpu);
    }
    let mut seen = 0u64;
    loop {
        // Wait for a new epoch: spin, yield, then park.
        let mut spins = 0u32;
        let mut state = s.state.load(Ordering::Acquire);
        while epoch_of(state) == seen {
            if spins < SPIN + YIELDS {
                spins += 1;
                if spins < SPIN {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            } else {
                let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                let g = if epoch_of(s.state.load(Ordering::SeqCst)) == seen {
                    s.wake.wait(g).unwrap_or_else(|e| e.into_inner())
                } else {
                    g
                };
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
                spins = 0;
            }
            state = s.state.load(Ordering::Acquire);
        }
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        seen = epoch_of(state);
        // Join the job unless it is already closed (or replaced).
        let joined = loop {
            if state & CLOSED != 0 || epoch_of(state) != seen {
                break false;
            }
            match s.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break true,
                Err(now) => state = now,
            }
        };
        if !joined {
            continue;
        }
        // SAFETY: joined an open job: `job` was stored before its epoch was published and
        // stays valid until `run` sees our `done` increment.
        if let Some(job) = unsafe { *s.job.get() } {
            claim_all(s, unsafe { &*job }, thread);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_exactly_once() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            for chunks in [0, 1, 2, 7] {
                let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
                for _ in 0..1000 {
                    pool.run(chunks, &|i, _| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                }
                for h in &hits {
                    assert_eq!(h.load(Ordering::Relaxed), 1000);
                }
            }
        }
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = Pool::new(2);
        let n = AtomicUsize::new(0);
        let seen = Mutex::new(std::collections::HashSet::new());
        let job = |_, t: usize| {
            assert!(t < 2);
            n.fetch_add(1, Ordering::Relaxed);
            seen.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        pool.run(2, &job);
        std::thread::sleep(std::time::Duration::from_millis(300));
        pool.run(2, &job);
        assert_eq!(n.load(Ordering::Relaxed), 4);
        // A 20 ms chunk leaves the worker time to join at least once.
        assert_eq!(seen.lock().unwrap().len(), 2);
    }
}
