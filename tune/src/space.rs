//! Search spaces: the schedule parameters of a kernel template and their allowed values.
//!
//! A [`Space`] is a list of named [`Param`]s, each with a finite list of choices (tile sizes,
//! vector widths, stages, algorithm ids...). A [`Config`] gives one value per parameter, by
//! name, so records stay readable (`{"mr": 6, "nr": 16, ...}`) and survive the addition of
//! parameters. Validity (registers, shared memory, divisibility) is the template's business
//! ([`crate::Task::check`]) and is checked before anything is compiled.

use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One schedule parameter and its allowed values (in increasing order for sizes, so that
/// neighbouring choices are similar).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    /// Name, as it appears in configs (`mr`, `kc`, `stages`).
    pub name: String,
    /// Allowed values.
    pub choices: Vec<i64>,
}

impl Param {
    /// A parameter `name` with these choices.
    pub fn new(name: &str, choices: &[i64]) -> Self {
        Self {
            name: name.to_string(),
            choices: choices.to_vec(),
        }
    }
}

/// A schedule: one value per parameter, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Config(pub BTreeMap<String, i64>);

impl Config {
    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<i64> {
        self.0.get(name).copied()
    }

    /// The value of parameter `name` as a `u32`, or `default` when it is missing or out of
    /// range (how a kernel's schedule reads a config).
    pub fn get_u32_or(&self, name: &str, default: u32) -> u32 {
        self.get(name)
            .and_then(|x| u32::try_from(x).ok())
            .unwrap_or(default)
    }

    /// The value of `name`, or `default`.
    pub fn get_or(&self, name: &str, default: i64) -> i64 {
        self.get(name).unwrap_or(default)
    }

    /// Builds a config from `(name, value)` pairs.
    pub fn from_pairs(pairs: &[(&str, i64)]) -> Self {
        Self(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{}", parts.join(","))
    }
}

/// The parameters of a kernel template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// The parameters, in a fixed order (the order of cost-model features).
    pub params: Vec<Param>,
}

impl Space {
    /// A space over these parameters.
    pub fn new(params: Vec<Param>) -> Self {
        Self { params }
    }

    /// Number of configs in the space (before validity checks), saturating.
    pub fn size(&self) -> u64 {
        self.params
            .iter()
            .fold(1u64, |a, p| a.saturating_mul(p.choices.len() as u64))
    }

    /// A uniformly random config.
    pub fn sample(&self, rng: &mut impl Rng) -> Config {
        Config(
            self.params
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        *p.choices.choose(rng).expect("a param has choices"),
                    )
                })
                .collect(),
        )
    }

    /// `c` with one parameter changed: to a neighbouring choice (3 times in 4) or to any
    /// other choice.
    pub fn mutate(&self, c: &Config, rng: &mut impl Rng) -> Config {
        let movable: Vec<&Param> = self.params.iter().filter(|p| p.choices.len() > 1).collect();
        let Some(p) = movable.choose(rng) else {
            return c.clone();
        };
        let cur = c.get(&p.name);
        let i = p.choices.iter().position(|v| Some(*v) == cur);
        let j = match i {
            Some(i) if rng.random_bool(0.75) => {
                if i == 0 {
                    1
                } else if i + 1 == p.choices.len() || rng.random_bool(0.5) {
                    i - 1
                } else {
                    i + 1
                }
            }
            _ => rng.random_range(0..p.choices.len()),
        };
        let mut out = c.clone();
        out.0.insert(p.name.clone(), p.choices[j]);
        out
    }

    /// Each parameter taken from `a` or `b` at random.
    pub fn crossover(&self, a: &Config, b: &Config, rng: &mut impl Rng) -> Config {
        Config(
            self.params
                .iter()
                .map(|p| {
                    let from = if rng.random_bool(0.5) { a } else { b };
                    let v = from
                        .get(&p.name)
                        .or_else(|| a.get(&p.name))
                        .unwrap_or(p.choices[0]);
                    (p.name.clone(), v)
                })
                .collect(),
        )
    }

    /// Numeric features of `c` for the cost model: `log2(1 + value)` per parameter, in the
    /// space's order (a missing parameter is 0).
    pub fn features(&self, c: &Config) -> Vec<f32> {
        self.params
            .iter()
            .map(|p| (1.0 + c.get(&p.name).unwrap_or(0).max(0) as f32).log2())
            .collect()
    }

    /// Whether every parameter of `c` has one of its allowed values (and no others are set).
    pub fn contains(&self, c: &Config) -> bool {
        c.0.len() == self.params.len()
            && self
                .params
                .iter()
                .all(|p| c.get(&p.name).is_some_and(|v| p.choices.contains(&v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn space() -> Space {
        Space::new(vec![
            Param::new("mr", &[1, 2, 4, 6, 8]),
            Param::new("nr", &[8, 16, 24]),
            Param::new("fixed", &[3]),
        ])
    }

    #[test]
    fn sample_mutate_crossover_stay_in_the_space() {
        let s = space();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(s.size(), 15);
        for _ in 0..200 {
            let a = s.sample(&mut rng);
            let b = s.sample(&mut rng);
            assert!(s.contains(&a));
            let m = s.mutate(&a, &mut rng);
            assert!(s.contains(&m), "{m}");
            let diff = a.0.iter().filter(|(k, v)| m.get(k) != Some(**v)).count();
            assert!(diff <= 1, "mutation changes one parameter: {a} -> {m}");
            assert!(s.contains(&s.crossover(&a, &b, &mut rng)));
        }
    }

    #[test]
    fn config_json_is_a_readable_map() {
        let c = Config::from_pairs(&[("nr", 16), ("mr", 6)]);
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"mr":6,"nr":16}"#);
        assert_eq!(c.to_string(), "mr=6,nr=16");
        assert_eq!(space().features(&c)[0], 7f32.log2());
    }
}
