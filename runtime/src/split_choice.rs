//! Whether a model's task-split steps run on the thread pool at all, decided by timing whole
//! runs both ways.
//!
//! Splitting a step over cores pays only when the compute it shares outweighs the fork-join
//! and, above all, the cache lines that then cross between the cores (each thread reads the
//! step's whole input, half of it written by the other core; the next steps read the other
//! half of its output). That crossing cost is a property of the machine at run time: on the
//! 2-core development VM the same pair of vCPUs measured a 64 ns and a 360 ns cache-line round
//! trip an hour apart, and MobileNet at 2 threads ran 0.12 ms (split) or 0.27 ms (split, slow
//! crossing) against 0.155 ms on one thread. No compile-time threshold is right for both, so
//! every [`PERIOD`] runs the model times [`SAMPLES`] runs with the pool and as many without,
//! in four blocks ordered pool, serial, serial, pool (each after [`SKIP`] untimed runs, so
//! that data the other way left in the other core's cache does not count against this one), and keeps the way whose median run was
//! faster (the pool unless slower by more than [`MARGIN`]) until the next calibration, which also starts
//! [`SETTLE`] runs after an idle gap of [`IDLE_RECALIBRATE`].

use std::time::{Duration, Instant};

/// Runs per calibration period (the calibration's runs included).
pub const PERIOD: u32 = 512;

/// Timed runs per way (pool, no pool) in each calibration; the median of each is compared.
pub const SAMPLES: usize = 8;

/// The pool is kept unless its median run is slower than this factor times the serial one.
pub const MARGIN: f64 = 1.10;

/// Untimed runs before each way's timed block.
pub const SKIP: u32 = 2;

/// An idle gap between runs after which the next run starts a new calibration: the machine
/// may have changed meanwhile (and the worker has parked).
pub const IDLE_RECALIBRATE: Duration = Duration::from_millis(20);

/// Runs after an idle gap before the new calibration starts (they use the last choice).
pub const SETTLE: u32 = 10;

/// After an idle gap, calibrations repeat this many runs apart, [`RECHECKS`] times, before
/// going back to every [`PERIOD`]: a choice made while the machine is still waking up (the
/// worker parked, caches cold — slow for a few milliseconds) must not stick for a period.
pub const RECHECK_AFTER: u32 = 48;

/// See [`RECHECK_AFTER`].
pub const RECHECKS: u8 = 3;

/// The choice and its calibration state (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct SplitChoice {
    /// Runs into the current period.
    run: u32,
    /// Run times with and without the pool in this period's calibration.
    times: [[Duration; SAMPLES]; 2],
    /// Use the pool outside calibration.
    pool: bool,
    /// When the last recorded run ended.
    last_end: Option<Instant>,
    /// Early calibrations still due after an idle gap (see [`RECHECK_AFTER`]).
    rechecks: u8,
}

impl Default for SplitChoice {
    fn default() -> Self {
        Self {
            run: 0,
            times: [[Duration::ZERO; SAMPLES]; 2],
            pool: true,
            last_end: None,
            rechecks: 0,
        }
    }
}

impl SplitChoice {
    /// Whether the run starting `now` uses the pool.
    pub(crate) fn begin(&mut self, now: Instant) -> bool {
        if self
            .last_end
            .is_some_and(|e| now.saturating_duration_since(e) >= IDLE_RECALIBRATE)
        {
            // Recalibrate once the caches and the worker's core are warm again.
            self.run = PERIOD - SETTLE;
            self.rechecks = RECHECKS;
        }
        match self.slot() {
            Some((way, _)) => way == 0,
            None => self.pool,
        }
    }

    /// Records the run that [`SplitChoice::begin`] started at `start`, ended at `end`.
    pub(crate) fn record(&mut self, start: Instant, end: Instant) {
        if let Some((way, Some(i))) = self.slot() {
            self.times[way][i] = end.saturating_duration_since(start);
            if self.run as usize == 4 * Self::BLOCK - 1 {
                let [mut with, mut without] = self.times;
                with.sort_unstable();
                without.sort_unstable();
                self.pool =
                    with[SAMPLES / 2].as_secs_f64() <= without[SAMPLES / 2].as_secs_f64() * MARGIN;
                if self.rechecks > 0 {
                    self.rechecks -= 1;
                    self.run = PERIOD - RECHECK_AFTER - 1;
                }
            }
        }
        self.run = (self.run + 1) % PERIOD;
        self.last_end = Some(end);
    }

    pub(crate) fn pool_chosen(&self) -> bool {
        self.pool
    }

    /// During calibration: (way: 0 = pool, 1 = no pool, sample index or `None` for an
    /// untimed run) of the current run.
    /// Runs per calibration block: [`SKIP`] untimed, then half the [`SAMPLES`] of one way.
    const BLOCK: usize = SKIP as usize + SAMPLES / 2;

    /// During a calibration, the way of this run (0 pool, 1 no pool) and its sample index
    /// (`None` for the untimed runs). The blocks go pool, serial, serial, pool (ABBA), so a
    /// transient that fades or grows over the calibration (after an idle gap the worker is
    /// parked and the caches are cold) weighs on both ways alike.
    fn slot(&self) -> Option<(usize, Option<usize>)> {
        let r = self.run as usize;
        let b = r / Self::BLOCK;
        if b >= 4 {
            return None;
        }
        let (way, half) = [(0, 0), (1, 0), (1, 1), (0, 1)][b];
        let i = (r % Self::BLOCK).checked_sub(SKIP as usize);
        Some((way, i.map(|i| half * (SAMPLES / 2) + i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` back-to-back runs where a run with the pool takes `with` µs and one without
    /// `without`, from `*t` on; returns (runs with, runs without).
    fn feed(c: &mut SplitChoice, t: &mut Instant, n: u32, with: u64, without: u64) -> (u32, u32) {
        let (mut pooled, mut serial) = (0, 0);
        for _ in 0..n {
            let p = c.begin(*t);
            if p {
                pooled += 1;
            } else {
                serial += 1;
            }
            let end = *t + Duration::from_micros(if p { with } else { without });
            c.record(*t, end);
            *t = end;
        }
        (pooled, serial)
    }

    #[test]
    fn picks_the_faster_way_and_recalibrates() {
        let mut c = SplitChoice::default();
        let mut t = Instant::now();
        // Pool slower: after the calibration, only the period's calibration runs use it.
        let (pooled, serial) = feed(&mut c, &mut t, PERIOD, 270, 155);
        assert!(!c.pool_chosen());
        assert_eq!(pooled, 2 * SKIP + SAMPLES as u32);
        assert_eq!(serial, PERIOD - pooled);
        // The machine changes: the next period's calibration switches back to the pool.
        let (pooled, serial) = feed(&mut c, &mut t, PERIOD, 120, 155);
        assert!(c.pool_chosen());
        assert_eq!(serial, 2 * SKIP + SAMPLES as u32);
        assert_eq!(pooled, PERIOD - serial);
        // Half a period on, after an idle gap, the machine is slow again: recalibrated at once.
        feed(&mut c, &mut t, PERIOD / 2, 120, 155);
        t += IDLE_RECALIBRATE;
        let n = SETTLE + 3 * SAMPLES as u32;
        let (pooled, serial) = feed(&mut c, &mut t, n, 270, 155);
        assert!(!c.pool_chosen());
        assert_eq!(pooled, SETTLE + 2 * SKIP + SAMPLES as u32);
        assert_eq!(serial, n - pooled);
    }

    #[test]
    fn a_few_outliers_do_not_decide() {
        let mut c = SplitChoice::default();
        let mut t = Instant::now();
        let mut k = 0u64;
        for _ in 0..PERIOD {
            let p = c.begin(t);
            k += 1;
            // Every fourth run, if pooled, is descheduled (10 ms); the median is still faster.
            let us = match (p, k % 4) {
                (true, 0) => 10_000,
                (true, _) => 100,
                (false, _) => 150,
            };
            let end = t + Duration::from_micros(us);
            c.record(t, end);
            t = end;
        }
        assert!(c.pool_chosen());
    }

    #[test]
    fn a_slow_start_after_an_idle_gap_is_rechecked_soon() {
        let mut c = SplitChoice::default();
        let mut t = Instant::now();
        feed(&mut c, &mut t, PERIOD, 100, 150);
        assert!(c.pool_chosen());
        // After a pause the pool is slow for a while (worker parked, caches cold)...
        t += IDLE_RECALIBRATE;
        let calib = 4 * SplitChoice::BLOCK as u32;
        feed(&mut c, &mut t, SETTLE + calib, 300, 150);
        assert!(!c.pool_chosen());
        // ... then fast again: a recheck RECHECK_AFTER runs later picks the pool back up,
        // long before the next period.
        feed(&mut c, &mut t, RECHECK_AFTER + calib, 100, 150);
        assert!(c.pool_chosen());
    }
}
