//! The search: evolutionary candidates ranked by the learned cost model, measured in batches.
//!
//! Per round (as in Ansor): a population is seeded with the best measured schedules and
//! random valid ones, evolved for a few generations (mutation of one parameter, crossover)
//! with parents picked by predicted score; the best-scored unmeasured candidates, plus a
//! random share for exploration, are measured; every outcome is committed to the database;
//! the model is retrained. Candidates already in the database (from an earlier, possibly
//! killed, run) are never measured again, so tuning resumes where it stopped.

use crate::cost_model::{CostModel, GbtModel, Sample};
use crate::db::{DbError, Outcome, Record, TuningDb};
use crate::space::Config;
use crate::Task;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};

/// Measures candidates of a task on the target, one at a time (compilation may be
/// parallel). Returns one outcome per config, in order; failures are outcomes, not errors.
pub trait Measurer {
    /// Measures `configs` (all valid for `task`).
    fn measure(&mut self, task: &dyn Task, configs: &[Config]) -> Vec<Outcome>;
}

impl<F: FnMut(&dyn Task, &[Config]) -> Vec<Outcome>> Measurer for F {
    fn measure(&mut self, task: &dyn Task, configs: &[Config]) -> Vec<Outcome> {
        self(task, configs)
    }
}

/// Search options.
#[derive(Debug, Clone)]
pub struct TuneOptions {
    /// New measurements to make for this task (already-measured configs do not count).
    pub trials: usize,
    /// Candidates measured per round (the model is retrained after each round).
    pub batch: usize,
    /// Candidates per generation of the evolutionary search.
    pub population: usize,
    /// Generations per round.
    pub generations: usize,
    /// Share of each batch picked at random rather than by the model.
    pub explore: f64,
    /// Random seed.
    pub seed: u64,
}

impl Default for TuneOptions {
    fn default() -> Self {
        Self {
            trials: 64,
            batch: 8,
            population: 64,
            generations: 4,
            explore: 0.2,
            seed: 0x6b696c6e,
        }
    }
}

/// Where a task's tuning stands (passed to the progress callback after each batch).
#[derive(Debug, Clone)]
pub struct Progress {
    /// The workload's description.
    pub workload: String,
    /// Measurements made so far in this run.
    pub done: usize,
    /// Measurements this run will make at most.
    pub total: usize,
    /// Best latency known (this run and earlier ones).
    pub best_seconds: Option<f64>,
    /// Latency of the default schedule, if measured.
    pub default_seconds: Option<f64>,
}

/// The result of tuning one task.
#[derive(Debug, Clone)]
pub struct TaskResult {
    /// The best schedule known and its latency.
    pub best: Option<(Config, f64)>,
    /// The default schedule's latency.
    pub default_seconds: Option<f64>,
    /// Measurements made in this run.
    pub measured: usize,
    /// Of those, how many failed (invalid, crash, timeout, wrong).
    pub failed: usize,
}

/// The tuner: a database, a target, and one cost model per template kind.
pub struct Tuner<'a> {
    db: &'a TuningDb,
    target: String,
    kiln_version: String,
    models: HashMap<String, (Box<dyn CostModel>, Vec<Sample>)>,
}

impl<'a> Tuner<'a> {
    /// A tuner recording into `db` for `target`, keyed by `kiln_version`.
    pub fn new(db: &'a TuningDb, target: &str, kiln_version: &str) -> Self {
        Self {
            db,
            target: target.to_string(),
            kiln_version: kiln_version.to_string(),
            models: HashMap::new(),
        }
    }

    fn features(task: &dyn Task, c: &Config) -> Vec<f32> {
        let mut f = task.workload().features.clone();
        f.extend(task.space().features(c));
        f
    }

    /// The model and samples of `task`'s kind; on first use, seeded with this kind's records
    /// from other targets (transfer across SKUs: relative throughput ranks transfer even where
    /// absolute times do not) and trained on them.
    fn model_for(
        &mut self,
        task: &dyn Task,
    ) -> Result<&mut (Box<dyn CostModel>, Vec<Sample>), DbError> {
        let kind = task.workload().kind.clone();
        if !self.models.contains_key(&kind) {
            let samples: Vec<Sample> = self
                .db
                .ok_elsewhere(&kind, &self.target, &self.kiln_version)?
                .into_iter()
                .filter(|r| task.space().contains(&r.config))
                .filter_map(|r| {
                    let mut features = r.workload_features.clone();
                    features.extend(task.space().features(&r.config));
                    Some(Sample {
                        features,
                        group: format!("{}@{}", r.workload, r.target),
                        seconds: r.outcome.seconds()?,
                    })
                })
                .collect();
            let mut m: Box<dyn CostModel> = Box::<GbtModel>::default();
            m.fit(&samples);
            self.models.insert(kind.clone(), (m, samples));
        }
        Ok(self.models.get_mut(&kind).expect("inserted above"))
    }

    /// Tunes one task: measures up to `opts.trials` new candidates (the default schedule
    /// first if never measured), commits every outcome, and returns the best known schedule.
    pub fn tune(
        &mut self,
        task: &dyn Task,
        measurer: &mut dyn Measurer,
        opts: &TuneOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<TaskResult, DbError> {
        let w = task.workload();
        let fp = w.fingerprint();
        let group = format!("{fp}@{}", self.target);
        let mut rng = StdRng::seed_from_u64(opts.seed ^ crate::fnv1a(&fp));
        let earlier = self.db.records(&fp, &self.target, &self.kiln_version)?;
        let mut measured: HashSet<Config> = earlier.iter().map(|r| r.config.clone()).collect();
        let mut ok: Vec<(Config, f64)> = earlier
            .iter()
            .filter_map(|r| r.outcome.seconds().map(|s| (r.config.clone(), s)))
            .collect();
        let default = task.default_config();
        let mut default_seconds = ok.iter().find(|(c, _)| *c == default).map(|(_, s)| *s);
        {
            let new: Vec<Sample> = ok
                .iter()
                .map(|(c, s)| Sample {
                    features: Self::features(task, c),
                    group: group.clone(),
                    seconds: *s,
                })
                .collect();
            let (m, samples) = self.model_for(task)?;
            if !new.is_empty() {
                samples.extend(new);
                m.fit(samples);
            }
        }
        let mut done = 0;
        let mut failed = 0;
        let report =
            |ok: &[(Config, f64)], done, default_seconds, progress: &mut dyn FnMut(&Progress)| {
                progress(&Progress {
                    workload: w.description.clone(),
                    done,
                    total: opts.trials,
                    best_seconds: ok.iter().map(|(_, s)| *s).min_by(f64::total_cmp),
                    default_seconds,
                })
            };
        report(&ok, 0, default_seconds, progress);
        let mut stale_rounds = 0;
        while done < opts.trials {
            let want = opts.batch.min(opts.trials - done).max(1);
            let mut batch: Vec<Config> = Vec::new();
            if !measured.contains(&default) && task.check(&default).is_ok() {
                batch.push(default.clone());
            }
            let picked = self.propose(
                task,
                &ok,
                &measured,
                want - batch.len().min(want),
                opts,
                &mut rng,
            )?;
            batch.extend(picked);
            batch.truncate(want);
            if batch.is_empty() {
                stale_rounds += 1;
                if stale_rounds >= 3 {
                    break; // the valid space is exhausted (or nearly)
                }
                continue;
            }
            stale_rounds = 0;
            let outcomes = measurer.measure(task, &batch);
            let mut new = Vec::new();
            for (c, o) in batch.into_iter().zip(outcomes) {
                let rec = Record::new(w, &self.target, &self.kiln_version, c.clone(), o.clone());
                self.db.insert(&rec)?;
                measured.insert(c.clone());
                done += 1;
                match o.seconds() {
                    Some(s) => {
                        if c == default {
                            default_seconds = Some(s);
                        }
                        new.push(Sample {
                            features: Self::features(task, &c),
                            group: group.clone(),
                            seconds: s,
                        });
                        ok.push((c, s));
                    }
                    None => failed += 1,
                }
            }
            let (m, samples) = self.model_for(task)?;
            samples.extend(new);
            m.fit(samples);
            report(&ok, done, default_seconds, progress);
        }
        let best = ok
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(c, s)| (c.clone(), *s));
        Ok(TaskResult {
            best,
            default_seconds,
            measured: done,
            failed,
        })
    }

    /// Up to `n` candidates for `task` to be measured elsewhere (a GPU bundle), without
    /// measuring anything: the default schedule first if never measured, then the model's
    /// best (trained on this target's records of the task's kind, or on other targets' when
    /// it has none) and a random share, as [`Tuner::tune`] picks a batch. Configs already in
    /// the database or in `exclude` are skipped; `round` varies the random choices.
    pub fn candidates(
        &mut self,
        task: &dyn Task,
        n: usize,
        opts: &TuneOptions,
        exclude: &[Config],
        round: u64,
    ) -> Result<Vec<Config>, DbError> {
        let fp = task.workload().fingerprint();
        let group = format!("{fp}@{}", self.target);
        let mut rng = StdRng::seed_from_u64(opts.seed ^ crate::fnv1a(&fp) ^ round);
        let earlier = self.db.records(&fp, &self.target, &self.kiln_version)?;
        let mut measured: HashSet<Config> = earlier.iter().map(|r| r.config.clone()).collect();
        measured.extend(exclude.iter().cloned());
        let ok: Vec<(Config, f64)> = earlier
            .iter()
            .filter_map(|r| r.outcome.seconds().map(|s| (r.config.clone(), s)))
            .collect();
        {
            let new: Vec<Sample> = ok
                .iter()
                .map(|(c, s)| Sample {
                    features: Self::features(task, c),
                    group: group.clone(),
                    seconds: *s,
                })
                .collect();
            let (m, samples) = self.model_for(task)?;
            if !new.is_empty() {
                let known: HashSet<String> = samples.iter().map(|x| x.group.clone()).collect();
                if !known.contains(&group) {
                    samples.extend(new);
                    m.fit(samples);
                }
            }
        }
        let mut out = Vec::new();
        let default = task.default_config();
        if n > 0 && !measured.contains(&default) && task.check(&default).is_ok() {
            measured.insert(default.clone());
            out.push(default);
        }
        let more = self.propose(task, &ok, &measured, n - out.len(), opts, &mut rng)?;
        out.extend(more);
        out.truncate(n);
        Ok(out)
    }

    /// Up to `want` valid unmeasured candidates: the model's best from an evolutionary search
    /// plus a random share (all random while the model is untrained).
    fn propose(
        &mut self,
        task: &dyn Task,
        ok: &[(Config, f64)],
        measured: &HashSet<Config>,
        want: usize,
        opts: &TuneOptions,
        rng: &mut StdRng,
    ) -> Result<Vec<Config>, DbError> {
        if want == 0 {
            return Ok(Vec::new());
        }
        let space = task.space();
        let valid = |c: &Config| task.check(c).is_ok();
        // Seed: the best measured schedules and random valid ones.
        let mut best: Vec<&(Config, f64)> = ok.iter().collect();
        best.sort_by(|a, b| a.1.total_cmp(&b.1));
        let mut pop: Vec<Config> = best
            .iter()
            .take(opts.population / 4)
            .map(|(c, _)| c.clone())
            .collect();
        let mut tries = 0;
        while pop.len() < opts.population && tries < opts.population * 20 {
            tries += 1;
            let c = space.sample(rng);
            if valid(&c) {
                pop.push(c);
            }
        }
        let mut seen: HashSet<Config> = pop.iter().cloned().collect();
        let (model, _) = self.model_for(task)?;
        let trained = model.is_trained();
        if trained {
            for _ in 0..opts.generations {
                let scores = model.predict(
                    &pop.iter()
                        .map(|c| Self::features(task, c))
                        .collect::<Vec<_>>(),
                );
                let pick = |rng: &mut StdRng| {
                    // Tournament of two by predicted score.
                    let a = rng.random_range(0..pop.len());
                    let b = rng.random_range(0..pop.len());
                    if scores[a] >= scores[b] {
                        a
                    } else {
                        b
                    }
                };
                let mut children = Vec::new();
                let mut tries = 0;
                while children.len() < opts.population && tries < opts.population * 20 {
                    tries += 1;
                    let child = if rng.random_bool(0.7) {
                        let p = pick(rng);
                        space.mutate(&pop[p], rng)
                    } else {
                        let (p, q) = (pick(rng), pick(rng));
                        space.crossover(&pop[p], &pop[q], rng)
                    };
                    if valid(&child) && seen.insert(child.clone()) {
                        children.push(child);
                    }
                }
                pop.extend(children);
            }
        }
        let mut fresh: Vec<Config> = pop.into_iter().filter(|c| !measured.contains(c)).collect();
        fresh.sort();
        fresh.dedup();
        let n_explore = if trained {
            ((want as f64 * opts.explore).round() as usize).min(want)
        } else {
            want
        };
        let mut out = Vec::new();
        if trained {
            let scores = model.predict(
                &fresh
                    .iter()
                    .map(|c| Self::features(task, c))
                    .collect::<Vec<_>>(),
            );
            let mut idx: Vec<usize> = (0..fresh.len()).collect();
            idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            for i in idx.into_iter().take(want - n_explore) {
                out.push(fresh[i].clone());
            }
        }
        let rest: Vec<&Config> = fresh.iter().filter(|c| !out.contains(c)).collect();
        for c in rest.choose_multiple(rng, want - out.len()) {
            out.push((*c).clone());
        }
        Ok(out)
    }
}
