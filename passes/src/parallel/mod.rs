//! Parallel execution over several devices: the plan data model ([`plan`]), sharding
//! propagation through a stage ([`propagate`]), the cluster description ([`cluster`]),
//! the simulator ([`sim`]), the plan search ([`search`]), the lowering of a plan to
//! per-rank programs ([`lower`]), their in-process execution ([`inprocess`]) and simple
//! default plans ([`pipeline_split`]).
//!
//! A [`plan::ParallelPlan`] says which ranks (one process per device) run which nodes of a
//! graph and how tensors are sharded between them: a pipeline of stages, each data
//! parallel or tensor parallel over its device group. The search that finds plans and the
//! lowering of a plan to per-rank programs build on these types.

pub mod cluster;
pub mod inprocess;
pub mod joint;
pub mod lower;
pub mod models;
pub mod pipeline_split;
pub mod plan;
pub mod propagate;
pub mod search;
pub mod sim;

pub use plan::{NodeSplit, ParallelPlan, Sharding, SplitKind, Stage, StageMode};
pub use propagate::{local_shape, propagate, Collective, Propagation};
