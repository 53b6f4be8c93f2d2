//! Kiln's autotuner: per-target schedule search with a learned cost model, and the
//! persistent tuning database.
//!
//! The pieces, as in TVM's Ansor / MetaSchedule:
//! - [`Space`] / [`Config`]: the schedule parameters a kernel template exposes, and one
//!   choice of them;
//! - [`Task`]: one workload (a kernel template at fixed shapes, [`Workload`]) with its space,
//!   its validity check (registers, shared memory, divisibility — before anything is compiled)
//!   and its default schedule;
//! - [`Measurer`]: compiles and times candidates on the target (the CPU measurer lives in the
//!   `kiln` crate, which can compile and run kernels; GPU measurers time with CUDA events);
//! - [`CostModel`] ([`GbtModel`]: gradient-boosted trees) trained online on the measurements,
//!   and on other SKUs' records when the target has none (transfer);
//! - [`Tuner`]: evolutionary search ranked by the model, plus a random share for exploration,
//!   measuring in batches and committing every measurement to the [`TuningDb`] at once, so a
//!   tuning run can be stopped (even killed) and resumed.
//!
//! ```
//! use kiln_tune::{Config, Outcome, Param, Space, Task, TuneOptions, Tuner, TuningDb, Workload};
//!
//! /// A toy template whose best schedule is `tile = 32`.
//! struct Toy { w: Workload, s: Space }
//! impl Task for Toy {
//!     fn workload(&self) -> &Workload { &self.w }
//!     fn space(&self) -> &Space { &self.s }
//!     fn check(&self, _: &Config) -> Result<(), String> { Ok(()) }
//!     fn default_config(&self) -> Config { Config::from_pairs(&[("tile", 1)]) }
//! }
//! let toy = Toy {
//!     w: Workload::new("toy", "toy n=1024", vec![10.0]),
//!     s: Space::new(vec![Param::new("tile", &[1, 2, 4, 8, 16, 32, 64, 128])]),
//! };
//! let dir = tempfile::tempdir().unwrap();
//! let db = TuningDb::open(dir.path().join("tuning.db")).unwrap();
//! let mut tuner = Tuner::new(&db, "cpu:test", "0.1.0");
//! let mut measure = |_: &dyn Task, cs: &[Config]| -> Vec<Outcome> {
//!     cs.iter()
//!         .map(|c| Outcome::Ok { seconds: 1.0 + (c.get_or("tile", 1) as f64 / 32.0).log2().abs() })
//!         .collect()
//! };
//! let r = tuner.tune(&toy, &mut measure, &TuneOptions { trials: 8, ..Default::default() }, &mut |_| {}).unwrap();
//! assert_eq!(r.best.unwrap().0.get("tile"), Some(32));
//! ```

pub mod cost_model;
pub mod db;
pub mod search;
pub mod space;

pub use cost_model::{CostModel, GbtModel, Sample};
pub use db::{DbError, Outcome, Record, TuningDb};
pub use search::{Measurer, Progress, TaskResult, TuneOptions, Tuner};
pub use space::{Config, Param, Space};

/// A kernel template at fixed shapes: what a tuning record is keyed by (with the target and
/// the Kiln version).
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The template (`matmul`, `conv2d`, `gemm_f16`): samples of one kind share a cost model.
    pub kind: String,
    /// Canonical text naming everything that changes the kernel except the schedule
    /// (`matmul f32 m=1 n=1000 k=2048 epilogue=bias`); the fingerprint is its hash.
    pub description: String,
    /// Numeric features of the workload for the cost model (log sizes, FLOPs...); the same
    /// length for every workload of one kind.
    pub features: Vec<f32>,
}

impl Workload {
    /// A workload of template `kind`.
    pub fn new(kind: &str, description: &str, features: Vec<f32>) -> Self {
        Self {
            kind: kind.to_string(),
            description: description.to_string(),
            features,
        }
    }

    /// A stable 64-bit FNV-1a hash of the description, as 16 hex digits.
    pub fn fingerprint(&self) -> String {
        format!("{:016x}", fnv1a(&self.description))
    }
}

/// 64-bit FNV-1a: a stable hash (unlike `std`'s, the same on every machine and version).
pub(crate) fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One tuning task: a workload with its schedule space.
pub trait Task {
    /// The workload.
    fn workload(&self) -> &Workload;
    /// The schedule parameters and their choices.
    fn space(&self) -> &Space;
    /// Whether a config can be compiled and run (`Err` says why not), checked before
    /// anything is compiled.
    fn check(&self, config: &Config) -> Result<(), String>;
    /// The schedule used without tuning (measured first, as the baseline).
    fn default_config(&self) -> Config;
}
