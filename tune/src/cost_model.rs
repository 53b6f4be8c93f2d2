//! Learned cost models that rank schedule candidates before they are measured.
//!
//! As in Ansor, the model does not predict seconds: it predicts a candidate's throughput
//! relative to the best measured candidate of the same workload (`best_seconds / seconds`,
//! in `(0, 1]`), which makes samples from different workloads and targets comparable, so one
//! model trained on everything (other SKUs included) ranks candidates of a new workload or a
//! new SKU. Features are the workload's ([`crate::Task::features`]), the target's and the
//! schedule's ([`crate::Space::features`]), concatenated.

use gbdt::config::Config as GbtConfig;
use gbdt::decision_tree::{Data, DataVec};
use gbdt::gradient_boost::GBDT;
use std::collections::HashMap;

/// One measured sample: features, the workload it belongs to, its latency.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Feature vector (same length for every sample of one model).
    pub features: Vec<f32>,
    /// Workload (and target) the sample belongs to: labels are normalised per group.
    pub group: String,
    /// Measured latency in seconds.
    pub seconds: f64,
}

/// A model that ranks candidates: higher scores are expected to be faster.
pub trait CostModel {
    /// Retrains on all samples seen so far.
    fn fit(&mut self, samples: &[Sample]);
    /// Scores of the feature vectors (higher = faster); all equal if not trained.
    fn predict(&self, features: &[Vec<f32>]) -> Vec<f32>;
    /// Whether the model has been trained on enough data to be used.
    fn is_trained(&self) -> bool;
}

/// Relative throughput labels: `best / seconds` within each group.
pub fn relative_throughput(samples: &[Sample]) -> Vec<f32> {
    let mut best: HashMap<&str, f64> = HashMap::new();
    for s in samples {
        let b = best.entry(s.group.as_str()).or_insert(f64::INFINITY);
        *b = b.min(s.seconds);
    }
    samples
        .iter()
        .map(|s| (best[s.group.as_str()] / s.seconds.max(1e-12)) as f32)
        .collect()
}

/// Gradient-boosted regression trees (`gbdt` crate) on relative throughput.
pub struct GbtModel {
    model: Option<GBDT>,
    /// Minimum number of samples before the model is trained.
    pub min_samples: usize,
    /// Number of boosting rounds.
    pub iterations: usize,
    /// Maximum tree depth.
    pub max_depth: u32,
}

impl Default for GbtModel {
    fn default() -> Self {
        Self {
            model: None,
            min_samples: 8,
            iterations: 60,
            max_depth: 5,
        }
    }
}

impl CostModel for GbtModel {
    fn fit(&mut self, samples: &[Sample]) {
        if samples.len() < self.min_samples {
            return;
        }
        let n = samples[0].features.len();
        if n == 0 || samples.iter().any(|s| s.features.len() != n) {
            return;
        }
        let labels = relative_throughput(samples);
        let mut data: DataVec = samples
            .iter()
            .zip(labels)
            .map(|(s, y)| Data::new_training_data(s.features.clone(), 1.0, y, None))
            .collect();
        let mut cfg = GbtConfig::new();
        cfg.set_feature_size(n);
        cfg.set_max_depth(self.max_depth);
        cfg.set_iterations(self.iterations);
        cfg.set_shrinkage(0.2);
        cfg.set_min_leaf_size(2);
        cfg.set_loss("SquaredError");
        cfg.set_training_optimization_level(2);
        let mut m = GBDT::new(&cfg);
        m.fit(&mut data);
        self.model = Some(m);
    }

    fn predict(&self, features: &[Vec<f32>]) -> Vec<f32> {
        match &self.model {
            Some(m) if !features.is_empty() => {
                let data: DataVec = features
                    .iter()
                    .map(|f| Data::new_test_data(f.clone(), None))
                    .collect();
                m.predict(&data)
            }
            _ => vec![0.0; features.len()],
        }
    }

    fn is_trained(&self) -> bool {
        self.model.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_relative_to_the_best_of_each_group() {
        let s = |g: &str, t: f64| Sample {
            features: vec![0.0],
            group: g.into(),
            seconds: t,
        };
        let y = relative_throughput(&[s("a", 1.0), s("a", 2.0), s("b", 10.0), s("b", 40.0)]);
        assert_eq!(y, vec![1.0, 0.5, 1.0, 0.25]);
    }

    #[test]
    fn gbt_learns_a_ranking() {
        // latency = (x - 5)^2 + 1 + y/10: the model must rank x = 5 first.
        let mut samples = Vec::new();
        for x in 0..10 {
            for y in 0..4 {
                let t = ((x as f64 - 5.0).powi(2) + 1.0) * (1.0 + y as f64 / 10.0);
                samples.push(Sample {
                    features: vec![x as f32, y as f32],
                    group: "g".into(),
                    seconds: t,
                });
            }
        }
        let mut m = GbtModel::default();
        assert!(!m.is_trained());
        m.fit(&samples);
        assert!(m.is_trained());
        let p = m.predict(&[vec![5.0, 0.0], vec![0.0, 3.0], vec![9.0, 3.0]]);
        assert!(p[0] > p[1] && p[0] > p[2], "{p:?}");
    }
}
