//! The search on synthetic tasks with known optimum: it finds it, resumes without
//! re-measuring, records failures and goes on, and transfers a model across targets.

use kiln_tune::{Config, Outcome, Param, Space, Task, TuneOptions, Tuner, TuningDb, Workload};
use std::cell::RefCell;
use std::collections::HashSet;

/// A 4-parameter template (7·7·5·4 = 980 configs) whose latency has one optimum at
/// `a = 16·s, b = 8, c = 2` (s = the workload's scale) and is invalid when `a·b > 512`.
struct Synthetic {
    w: Workload,
    s: Space,
    scale: i64,
}

impl Synthetic {
    fn new(scale: i64) -> Self {
        Self {
            w: Workload::new(
                "synthetic",
                &format!("synthetic s={scale}"),
                vec![scale as f32],
            ),
            s: Space::new(vec![
                Param::new("a", &[1, 2, 4, 8, 16, 32, 64]),
                Param::new("b", &[1, 2, 4, 8, 16, 32, 64]),
                Param::new("c", &[0, 1, 2, 3, 4]),
                Param::new("d", &[1, 2, 3, 4]),
            ]),
            scale,
        }
    }

    fn latency(&self, c: &Config) -> f64 {
        let l = |v: i64, best: i64| ((v as f64).log2() - (best as f64).log2()).abs();
        1.0 + 0.5 * l(c.get_or("a", 1), 16 * self.scale)
            + 0.3 * l(c.get_or("b", 1), 8)
            + 0.2 * (c.get_or("c", 0) - 2).abs() as f64
            + 0.01 * c.get_or("d", 1) as f64
    }
}

impl Task for Synthetic {
    fn workload(&self) -> &Workload {
        &self.w
    }
    fn space(&self) -> &Space {
        &self.s
    }
    fn check(&self, c: &Config) -> Result<(), String> {
        if c.get_or("a", 1) * c.get_or("b", 1) > 512 {
            return Err("a·b > 512".into());
        }
        Ok(())
    }
    fn default_config(&self) -> Config {
        Config::from_pairs(&[("a", 1), ("b", 1), ("c", 0), ("d", 1)])
    }
}

fn optimum(t: &Synthetic) -> f64 {
    let mut best = f64::INFINITY;
    for a in &t.s.params[0].choices {
        for b in &t.s.params[1].choices {
            for c in &t.s.params[2].choices {
                for d in &t.s.params[3].choices {
                    let cfg = Config::from_pairs(&[("a", *a), ("b", *b), ("c", *c), ("d", *d)]);
                    if t.check(&cfg).is_ok() {
                        best = best.min(t.latency(&cfg));
                    }
                }
            }
        }
    }
    best
}

#[test]
fn finds_the_optimum_and_beats_random_search() {
    let t = Synthetic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let db = TuningDb::open(dir.path().join("s.db")).unwrap();
    let mut tuner = Tuner::new(&db, "cpu:test", "v");
    let seen = RefCell::new(HashSet::new());
    let mut measure = |task: &dyn Task, cs: &[Config]| -> Vec<Outcome> {
        cs.iter()
            .map(|c| {
                assert!(
                    task.check(c).is_ok(),
                    "invalid configs are never measured: {c}"
                );
                assert!(seen.borrow_mut().insert(c.clone()), "measured twice: {c}");
                Outcome::Ok {
                    seconds: t.latency(c),
                }
            })
            .collect()
    };
    let opts = TuneOptions {
        trials: 64,
        ..Default::default()
    };
    let mut last = None;
    let r = tuner
        .tune(&t, &mut measure, &opts, &mut |p| last = Some(p.clone()))
        .unwrap();
    let (best_cfg, best) = r.best.unwrap();
    let opt = optimum(&t);
    assert!(
        best <= opt * 1.03,
        "tuned {best} ({best_cfg}) vs optimum {opt}"
    );
    assert_eq!(r.measured, 64);
    assert_eq!(r.default_seconds, Some(t.latency(&t.default_config())));
    assert_eq!(last.unwrap().done, 64);
    // Random search with the same budget, averaged over seeds, is worse.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let mut random_best = 0.0;
    for _ in 0..20 {
        let mut b = f64::INFINITY;
        let mut n = 0;
        while n < 64 {
            let c = t.s.sample(&mut rng);
            if t.check(&c).is_ok() {
                b = f64::min(b, t.latency(&c));
                n += 1;
            }
        }
        random_best += b / 20.0;
    }
    assert!(
        best < random_best,
        "model-guided {best} vs random {random_best}"
    );
}

#[test]
fn resumes_without_remeasuring_and_records_failures() {
    let t = Synthetic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let db = TuningDb::open(dir.path().join("r.db")).unwrap();
    let seen = RefCell::new(HashSet::new());
    let mut measure = |_: &dyn Task, cs: &[Config]| -> Vec<Outcome> {
        cs.iter()
            .map(|c| {
                assert!(seen.borrow_mut().insert(c.clone()), "measured twice: {c}");
                // Every config with d = 4 "crashes".
                if c.get("d") == Some(4) {
                    Outcome::Crash {
                        msg: "signal 11".into(),
                    }
                } else {
                    Outcome::Ok {
                        seconds: t.latency(c),
                    }
                }
            })
            .collect()
    };
    let opts = TuneOptions {
        trials: 20,
        ..Default::default()
    };
    let r1 = Tuner::new(&db, "cpu:test", "v")
        .tune(&t, &mut measure, &opts, &mut |_| {})
        .unwrap();
    // A second run (a fresh tuner, as after a restart) goes on from the records.
    let r2 = Tuner::new(&db, "cpu:test", "v")
        .tune(&t, &mut measure, &opts, &mut |_| {})
        .unwrap();
    assert_eq!(db.len().unwrap(), 40);
    assert!(r2.best.as_ref().unwrap().1 <= r1.best.as_ref().unwrap().1);
    assert!(r1.failed + r2.failed > 0, "some d = 4 configs were tried");
    let fp = t.w.fingerprint();
    let crashes = db
        .records(&fp, "cpu:test", "v")
        .unwrap()
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Crash { .. }))
        .count();
    assert_eq!(crashes, r1.failed + r2.failed);
}

#[test]
fn a_model_trained_on_other_targets_ranks_a_new_one() {
    // Records of three workloads on "sku:a"; then tune a fourth workload on "sku:b" with a
    // tiny budget: the transferred model must beat the untrained (random) first batch.
    let dir = tempfile::tempdir().unwrap();
    let db = TuningDb::open(dir.path().join("x.db")).unwrap();
    let opts = TuneOptions {
        trials: 48,
        ..Default::default()
    };
    for scale in [1, 2, 4] {
        let t = Synthetic::new(scale);
        let mut m = |_: &dyn Task, cs: &[Config]| -> Vec<Outcome> {
            cs.iter()
                .map(|c| Outcome::Ok {
                    seconds: t.latency(c),
                })
                .collect()
        };
        Tuner::new(&db, "sku:a", "v")
            .tune(&t, &mut m, &opts, &mut |_| {})
            .unwrap();
    }
    let t = Synthetic::new(2);
    let small = TuneOptions {
        trials: 8,
        batch: 8,
        ..Default::default()
    };
    let mut m = |_: &dyn Task, cs: &[Config]| -> Vec<Outcome> {
        cs.iter()
            .map(|c| Outcome::Ok {
                seconds: t.latency(c),
            })
            .collect()
    };
    let transfer = Tuner::new(&db, "sku:b", "v")
        .tune(&t, &mut m, &small, &mut |_| {})
        .unwrap();
    let cold_db = TuningDb::open(dir.path().join("cold.db")).unwrap();
    let cold = Tuner::new(&cold_db, "sku:b", "v")
        .tune(&t, &mut m, &small, &mut |_| {})
        .unwrap();
    let (tb, cb) = (transfer.best.unwrap().1, cold.best.unwrap().1);
    assert!(tb < cb, "transfer {tb} vs cold {cb}");
}

#[test]
fn candidates_for_a_remote_measurer_skip_measured_and_excluded_configs() {
    let dir = tempfile::tempdir().unwrap();
    let db = TuningDb::open(dir.path().join("t.db")).unwrap();
    let t = Synthetic::new(1);
    let opts = TuneOptions::default();
    let mut tuner = Tuner::new(&db, "cuda:test", "0");
    let first = tuner.candidates(&t, 6, &opts, &[], 0).unwrap();
    assert_eq!(first.len(), 6);
    assert_eq!(first[0], t.default_config(), "the default first");
    assert!(first
        .iter()
        .all(|c| t.check(c).is_ok() && t.space().contains(c)));
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 6);
    // Nothing was recorded; excluded configs are not proposed again.
    assert!(db
        .records(&t.workload().fingerprint(), "cuda:test", "0")
        .unwrap()
        .is_empty());
    let second = tuner.candidates(&t, 6, &opts, &first, 1).unwrap();
    assert!(second.iter().all(|c| !first.contains(c)), "{second:?}");
    // Measured elsewhere and imported: the default is not proposed again.
    for c in &first {
        db.insert(&kiln_tune::Record::new(
            t.workload(),
            "cuda:test",
            "0",
            c.clone(),
            Outcome::Ok {
                seconds: t.latency(c),
            },
        ))
        .unwrap();
    }
    let mut tuner = Tuner::new(&db, "cuda:test", "0");
    let third = tuner.candidates(&t, 6, &opts, &[], 2).unwrap();
    assert!(!third.is_empty());
    assert!(third.iter().all(|c| !first.contains(c)));
}
