//! Which CPU each pool worker runs on.
//!
//! Measured on the 2-vCPU development VM (`runtime/examples/smt_probe.rs`): after the process
//! has been idle for ~100 ms, Linux wakes a parked worker on the *caller's* CPU (wake-affine
//! placement: the other vCPU is in a deep idle state), where it waits behind the caller, which
//! spins on the job; the worker then took part in 0–2% of the jobs for the next tens of
//! milliseconds, so every split step ran serially plus the fork-join cost (a two-chunk job of
//! 2 × 30 µs took 60 µs). With each worker pinned to a CPU other than the caller's, it took part
//! in 98–100% of them (30–33 µs) in the same conditions. So workers are pinned: worker `k` to
//! the `k`-th CPU of the process's allowed set that is not the CPU the pool's creator runs on.
//! The caller (the user's thread) is not pinned; but should the OS have moved it onto a
//! worker's CPU (measured: MobileNet at 2 threads then ran 300 µs instead of 120 µs, the
//! caller spinning on the worker's core while the other one idled), a job moves it off for
//! its duration ([`Placement::caller_guard`]) and restores its affinity after. Nothing is pinned when there are not enough allowed CPUs for one per
//! thread, off Linux, or when the environment sets `KILN_PIN_THREADS=0`.

/// Where a pool's threads run (see the module doc).
#[derive(Debug, Clone, Default)]
pub(crate) struct Placement {
    /// The CPU of worker `k` (`k` from 0), empty when unpinned.
    workers: Vec<usize>,
    /// The allowed CPUs that no worker is pinned to.
    caller: Vec<usize>,
}

impl Placement {
    /// The placement of `workers` workers created from the calling thread.
    pub(crate) fn new(workers: usize) -> Self {
        if workers == 0 || std::env::var("KILN_PIN_THREADS").is_ok_and(|v| v == "0") {
            return Self::default();
        }
        let (allowed, current) = match (allowed_cpus(), current_cpu()) {
            (Some(a), Some(c)) => (a, c),
            _ => return Self::default(),
        };
        let workers = pick(&allowed, current, workers);
        let caller = allowed
            .into_iter()
            .filter(|c| !workers.contains(c))
            .collect();
        Self { workers, caller }
    }

    /// The CPU worker `k` (from 0) is pinned to, if any.
    pub(crate) fn worker(&self, k: usize) -> Option<usize> {
        self.workers.get(k).copied()
    }

    /// If the calling thread runs on a worker's CPU, restricts it to the other CPUs until
    /// the guard is dropped (which restores its previous affinity).
    pub(crate) fn caller_guard(&self) -> Option<CallerGuard> {
        if self.workers.is_empty() || !self.workers.contains(&current_cpu()?) {
            return None;
        }
        CallerGuard::restrict(&self.caller)
    }
}

/// `workers` CPUs of `allowed` other than `current`, in order; empty if there are too few.
fn pick(allowed: &[usize], current: usize, workers: usize) -> Vec<usize> {
    let others: Vec<usize> = allowed.iter().copied().filter(|&c| c != current).collect();
    if others.len() < workers || !allowed.contains(&current) {
        return Vec::new();
    }
    others[..workers].to_vec()
}

#[cfg(target_os = "linux")]
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: `set` is a plain bit set written by the kernel; its size is passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some(
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect(),
        )
    }
}

#[cfg(target_os = "linux")]
fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments; returns -1 on failure.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// Pins the calling thread to `cpu`.
#[cfg(target_os = "linux")]
pub(crate) fn pin_current_thread(cpu: usize) -> Result<(), std::io::Error> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: `set` is a zeroed bit set with one CPU below CPU_SETSIZE; its size is passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Restores the calling thread's affinity when dropped (see [`Placement::caller_guard`]).
#[cfg(target_os = "linux")]
pub(crate) struct CallerGuard {
    saved: libc::cpu_set_t,
}

#[cfg(target_os = "linux")]
impl CallerGuard {
    fn restrict(cpus: &[usize]) -> Option<Self> {
        // SAFETY: plain bit sets, sizes passed; CPUs come from the allowed set (< SETSIZE).
        unsafe {
            let mut saved: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(0, size, &mut saved) != 0 {
                return None;
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            (libc::sched_setaffinity(0, size, &set) == 0).then_some(Self { saved })
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for CallerGuard {
    fn drop(&mut self) {
        // SAFETY: restores the set read in `restrict`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.saved);
        }
    }
}

/// Off Linux, nothing is pinned and there is no guard.
#[cfg(not(target_os = "linux"))]
pub(crate) struct CallerGuard;

#[cfg(not(target_os = "linux"))]
impl CallerGuard {
    fn restrict(_cpus: &[usize]) -> Option<Self> {
        None
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Option<Vec<usize>> {
    None
}

#[cfg(not(target_os = "linux"))]
fn current_cpu() -> Option<usize> {
    None
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn pin_current_thread(_cpu: usize) -> Result<(), std::io::Error> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_avoid_the_callers_cpu() {
        assert_eq!(pick(&[0, 1], 0, 1), vec![1]);
        assert_eq!(pick(&[0, 1], 1, 1), vec![0]);
        assert_eq!(pick(&[0, 1, 2, 3], 2, 3), vec![0, 1, 3]);
        // Too few CPUs for one per thread, or a caller outside the set: unpinned.
        assert!(pick(&[0, 1], 0, 2).is_empty());
        assert!(pick(&[2, 3], 0, 1).is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pinned_worker_runs_on_its_cpu() {
        let allowed = allowed_cpus().unwrap();
        let cpu = *allowed.last().unwrap();
        let on = std::thread::spawn(move || {
            pin_current_thread(cpu).unwrap();
            current_cpu()
        })
        .join()
        .unwrap();
        assert_eq!(on, Some(cpu));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_guard_moves_the_caller_off_a_worker_cpu_and_restores_it() {
        let allowed = allowed_cpus().unwrap();
        if allowed.len() < 2 {
            eprintln!("SKIPPED: one CPU");
            return;
        }
        std::thread::spawn(move || {
            let p = Placement::new(1);
            let w = p.worker(0).unwrap();
            // Put the caller on the worker's CPU, as the OS may.
            pin_current_thread(w).unwrap();
            let g = p.caller_guard().expect("on a worker CPU");
            assert_ne!(current_cpu(), Some(w));
            drop(g);
            assert_eq!(current_cpu(), Some(w));
            assert_eq!(allowed_cpus().unwrap(), vec![w]);
        })
        .join()
        .unwrap();
    }
}
