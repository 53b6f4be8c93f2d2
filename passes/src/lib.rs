//! Graph-to-graph passes over the Kiln IR: folding of inference-time normalizations into
//! convolution weights ([`fold_batchnorm`]), partitioning into kernels ([`fusion`]), memory
//! planning over the kernel order ([`memory`]), compile-time weight layout changes
//! ([`prepack`]), specialisation of symbolic input dims ([`specialize`]) and unrolling of
//! recurrent layers into their time steps ([`unroll_recurrent`]). Every pass is checked against the reference interpreter.
#![warn(missing_docs)]

pub mod decompose_attention;
pub mod eqsat;
pub mod fold_batchnorm;
pub mod fusion;
mod graph_builder;
pub mod memory;
pub mod parallel;
pub mod prepack;
pub mod specialize;
pub mod unroll_recurrent;

pub use fusion::{partition, Kernel, KernelKind, Partition};
pub use memory::{plan_memory, MemoryPlan, Slot};
