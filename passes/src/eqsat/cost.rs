//! Cost models: the estimated run time of one op on a target, in microseconds.
//!
//! [`Analytical`] is a roofline over a [`Device`] description (peak FLOP rate, memory
//! bandwidth, per-kernel launch overhead, and for GPUs the utilisation of a contraction
//! too small to give every SM an output tile) with fusion awareness: an elementwise op that
//! follows a contraction or another elementwise op is fused into its kernel, so it costs
//! its arithmetic only. Other models (e.g. measured kernel times from a tuning database)
//! plug in through [`CostModel`].

use kiln_ir::ops::array::ArrayOp;
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{Fact, Graph, Op};

/// A target description for the analytical model.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    /// Name (for reports).
    pub name: String,
    /// Peak arithmetic rate, GFLOP/s.
    pub peak_gflops: f64,
    /// Memory bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// Fixed cost of launching one kernel, microseconds.
    pub launch_us: f64,
    /// Units that work on output tiles in parallel (GPU: SMs; 1 for a CPU core).
    pub parallel_units: f64,
    /// Output elements of one tile of a contraction (GPU: a thread block's tile). A
    /// contraction with fewer tiles than [`Device::parallel_units`] runs at the fraction
    /// `tiles / parallel_units` of the peak rate.
    pub tile_elems: f64,
    /// Most slices a product's reduction (`K`) is split into when its output tiles do
    /// not fill the units (the GPU f32 GEMM's split-K; 1: no splitting).
    pub max_split_k: u32,
    /// Microseconds of one 16-deep step of a contraction's reduction loop in a block that
    /// cannot hide it (its tile loads' latency; 0 for a CPU). A contraction whose blocks
    /// all run at once takes at least its steps one after another: what bounds a small
    /// product on the GPU (session 11, H200: about 2 µs a step in NasRNN's 1×512×512
    /// products and 2.3 µs in a 7×7 3×3 512→512 conv, before the tile loads overlapped).
    pub k_step_us: f64,
}

impl Device {
    /// A generic x86-64 CPU core with AVX2 FMA (about 100 GFLOP/s f32, 20 GB/s, 1 µs per
    /// kernel call).
    pub fn cpu() -> Device {
        Device {
            name: "cpu".into(),
            peak_gflops: 100.0,
            bandwidth_gbs: 20.0,
            launch_us: 1.0,
            parallel_units: 1.0,
            tile_elems: 1.0,
            max_split_k: 1,
            k_step_us: 0.0,
        }
    }

    /// A CPU core whose vector registers hold `lanes` f32: 8 (AVX2) is [`Device::cpu`];
    /// 16 (AVX-512, the kernels' 8×32 register tile) doubles the peak rate — measured 236
    /// against 129 GFLOP/s for the AVX2 tile at 1024³ on a Zen 5 core. Bandwidth and call
    /// overhead stay.
    pub fn cpu_with_lanes(lanes: usize) -> Device {
        let base = Device::cpu();
        if lanes < 16 {
            return base;
        }
        Device {
            name: "cpu-avx512".into(),
            peak_gflops: base.peak_gflops * 2.0,
            ..base
        }
    }

    /// A GPU with `sms` streaming multiprocessors, `peak_gflops` (the dtype the model
    /// computes in), `bandwidth_gbs` of DRAM bandwidth; 4 µs per kernel launch (a stream
    /// launch without graphs, as tensat measured), 64×64 output tiles per block, `K` split
    /// up to 8 ways as the f32 GEMM does (`GpuGemmSchedule::for_problem` in codegen), 1 µs
    /// per step of a reduction loop (the SIMT kernels' tile loads; a guess between the
    /// session-11 measurements and what overlapping the loads should give, to calibrate).
    pub fn gpu(name: &str, sms: u32, peak_gflops: f64, bandwidth_gbs: f64) -> Device {
        Device {
            name: name.into(),
            peak_gflops,
            bandwidth_gbs,
            launch_us: 4.0,
            parallel_units: sms.max(1) as f64,
            tile_elems: 64.0 * 64.0,
            max_split_k: 8,
            k_step_us: 1.0,
        }
    }

    /// The fraction of the peak rate a contraction with `out_elems` output elements reaches:
    /// one tile per unit at most.
    pub fn utilisation(&self, out_elems: f64) -> f64 {
        self.product_utilisation(out_elems, 0.0)
    }

    /// [`Device::utilisation`] of a product with reduction length `k`: while the tiles do
    /// not fill the units, `K` is split in two (up to [`Device::max_split_k`] slices) as
    /// long as each slice keeps at least 128 of it, every slice a tile of its own (as the
    /// GPU f32 GEMM's `GpuGemmSchedule::for_problem`).
    pub fn product_utilisation(&self, out_elems: f64, k: f64) -> f64 {
        let tiles = (out_elems / self.tile_elems.max(1.0)).ceil().max(1.0);
        let units = self.parallel_units.max(1.0);
        (tiles * self.product_split(out_elems, k) / units).min(1.0)
    }

    /// The latency bound of a contraction: `steps` reduction steps per block, one after
    /// another, times the waves of `blocks` over the units (two resident blocks each).
    pub fn step_latency_us(&self, blocks: f64, steps: f64) -> f64 {
        let waves = (blocks / (2.0 * self.parallel_units.max(1.0)))
            .ceil()
            .max(1.0);
        waves * steps * self.k_step_us
    }

    /// The K slices of a product (see [`Device::product_utilisation`]); more than one costs
    /// a launch that zeroes the output.
    pub fn product_split(&self, out_elems: f64, k: f64) -> f64 {
        let tiles = (out_elems / self.tile_elems.max(1.0)).ceil().max(1.0);
        let units = self.parallel_units.max(1.0);
        let mut split = 1.0;
        while split < f64::from(self.max_split_k)
            && tiles * split < units
            && (k / 16.0).ceil() >= 16.0 * split
        {
            split *= 2.0;
        }
        split
    }
}

/// Estimates the run time of one op, in microseconds.
pub trait CostModel {
    /// Cost of `op` with these input and output facts. `fused`: the op is an elementwise
    /// epilogue/prologue of a neighbouring kernel (no launch, no memory traffic of its own).
    fn op_cost(&self, op: &Op, inputs: &[Option<&Fact>], outputs: &[Fact], fused: bool) -> f64;
    /// Name (for reports).
    fn name(&self) -> String;
}

/// Roofline cost over a [`Device`].
#[derive(Clone, Debug)]
pub struct Analytical {
    /// The target.
    pub device: Device,
}

impl Default for Analytical {
    fn default() -> Self {
        Analytical {
            device: Device::cpu(),
        }
    }
}

/// Number of elements, with unknown dims counted as 1.
fn numel(f: &Fact) -> f64 {
    f.shape
        .dims()
        .iter()
        .map(|d| d.known().unwrap_or(1) as f64)
        .product()
}

fn bytes(f: &Fact) -> f64 {
    numel(f) * f.dtype.size_of().max(1) as f64
}

/// Floating-point operations of an op (multiply-adds count 2).
pub fn flops(op: &Op, inputs: &[Option<&Fact>], outputs: &[Fact]) -> f64 {
    let out: f64 = outputs.iter().map(numel).sum();
    let dim = |i: usize, d: usize| -> f64 {
        inputs
            .get(i)
            .copied()
            .flatten()
            .and_then(|f| f.shape.dims().get(d).and_then(|d| d.known()))
            .unwrap_or(1) as f64
    };
    let rank = |i: usize| {
        inputs
            .get(i)
            .copied()
            .flatten()
            .map_or(0, |f| f.shape.rank())
    };
    match op {
        Op::Linalg(LinalgOp::MatMul) => 2.0 * out * dim(0, rank(0).saturating_sub(1)),
        Op::Linalg(LinalgOp::Gemm(g)) => 2.0 * out * dim(0, if g.trans_a { 0 } else { 1 }),
        Op::Nn(NnOp::Conv(_)) | Op::Nn(NnOp::ConvTranspose(_)) => {
            let w = inputs.get(1).copied().flatten();
            let per: f64 = w.map_or(1.0, |w| {
                w.shape.dims()[1..]
                    .iter()
                    .map(|d| d.known().unwrap_or(1) as f64)
                    .product()
            });
            2.0 * out * per
        }
        Op::Elementwise(_) => out,
        _ => {
            let inp: f64 = inputs.iter().flatten().map(|f| numel(f)).sum();
            inp.max(out) * 2.0
        }
    }
}

/// Ops that only reinterpret their input (zero-copy views).
pub fn is_alias(op: &Op) -> bool {
    matches!(
        op,
        Op::Array(
            ArrayOp::Reshape { .. }
                | ArrayOp::Flatten { .. }
                | ArrayOp::Squeeze { .. }
                | ArrayOp::Unsqueeze { .. }
        ) | Op::Elementwise(kiln_ir::ops::elementwise::ElementwiseOp::Identity)
    )
}

/// A `Slice` the memory plan places inside its input (one contiguous range at an offset
/// that is a multiple of the arena alignment): it runs no step.
pub fn is_view_slice(op: &Op, inputs: &[Option<&Fact>]) -> bool {
    let Op::Array(a) = op else { return false };
    a.contiguous_slice(inputs)
        .is_some_and(|(off, len)| len > 0 && off.is_multiple_of(crate::memory::ALIGNMENT))
}

/// MatMul, Gemm and Conv: kernels that absorb elementwise epilogues.
pub fn is_contraction(op: &Op) -> bool {
    matches!(
        op,
        Op::Linalg(LinalgOp::MatMul | LinalgOp::Gemm(_)) | Op::Nn(NnOp::Conv(_))
    )
}

impl CostModel for Analytical {
    fn op_cost(&self, op: &Op, inputs: &[Option<&Fact>], outputs: &[Fact], fused: bool) -> f64 {
        let d = &self.device;
        let mut fl = flops(op, inputs, outputs) / (d.peak_gflops * 1e3);
        let (mut zeroing, mut latency) = (0.0, 0.0);
        if is_contraction(op) {
            let out: f64 = outputs.iter().map(numel).sum();
            let tiles = (out / d.tile_elems.max(1.0)).ceil().max(1.0);
            // the reduction length: K of a product, C/group·KH·KW of a conv
            let k = match op {
                Op::Linalg(_) => reduction_len(op, inputs),
                _ => flops(op, inputs, outputs) / (2.0 * out.max(1.0)),
            };
            // K split as the GPU f32 GEMM and implicit-GEMM conv do (`split_for`), after
            // a launch that zeroes the output
            let split = d.product_split(out, k);
            if split > 1.0 {
                zeroing = d.launch_us;
            }
            latency = d.step_latency_us(tiles * split, ((k / 16.0).ceil() / split).ceil());
            fl /= d.product_utilisation(out, k);
        }
        if is_alias(op) || is_view_slice(op, inputs) {
            return 0.01;
        }
        if fused && matches!(op, Op::Elementwise(_)) {
            return fl + 0.02;
        }
        let by: f64 = inputs.iter().flatten().map(|f| bytes(f)).sum::<f64>()
            + outputs.iter().map(bytes).sum::<f64>();
        zeroing + d.launch_us + fl.max(by / (d.bandwidth_gbs * 1e3)).max(latency)
    }

    fn name(&self) -> String {
        let d = &self.device;
        let units = if d.parallel_units > 1.0 {
            format!(", {} units × {} elems/tile", d.parallel_units, d.tile_elems)
        } else {
            String::new()
        };
        format!(
            "analytical({}: {} GFLOP/s, {} GB/s, {} us/kernel{units})",
            d.name, d.peak_gflops, d.bandwidth_gbs, d.launch_us
        )
    }
}

/// The reduction length `K` of a MatMul/Gemm: A's last dimension (its first for a Gemm
/// with `transA`); 0 when unknown.
fn reduction_len(op: &Op, inputs: &[Option<&Fact>]) -> f64 {
    let dims = match inputs.first() {
        Some(Some(a)) => a.shape.as_known(),
        _ => None,
    };
    let Some(dims) = dims.filter(|d| !d.is_empty()) else {
        return 0.0;
    };
    let k = match op {
        Op::Linalg(LinalgOp::Gemm(g)) if g.trans_a => dims[0],
        _ => dims[dims.len() - 1],
    };
    k as f64
}

/// The estimated run time of a whole graph, in microseconds. An elementwise node is fused
/// when one of its inputs comes from a contraction or elementwise node used only by it.
pub fn graph_cost(g: &Graph, model: &dyn CostModel) -> f64 {
    node_costs(g, model).iter().sum()
}

/// The cost of each node of `g` under `model`, in node order (the terms of [`graph_cost`]).
pub fn node_costs(g: &Graph, model: &dyn CostModel) -> Vec<f64> {
    let prod = g.producers();
    let uses = g.use_counts();
    g.nodes
        .iter()
        .map(|n| {
            let fused = matches!(n.op, Op::Elementwise(_))
                && n.inputs.iter().flatten().any(|&i| {
                    prod[i].is_some_and(|p| {
                        let po = &g.nodes[p].op;
                        uses[i] == 1 && (is_contraction(po) || matches!(po, Op::Elementwise(_)))
                    })
                });
            let ins: Vec<Option<&Fact>> = n
                .inputs
                .iter()
                .map(|i| i.map(|i| &g.values[i].fact))
                .collect();
            let outs: Vec<Fact> = n
                .outputs
                .iter()
                .map(|&o| g.values[o].fact.clone())
                .collect();
            model.op_cost(&n.op, &ins, &outs, fused)
        })
        .collect()
}

/// Measured kernel times where known, a base model elsewhere: an op whose
/// [`kiln_ir::ops::op_signature`] has a measured time (from the tuning database: the best
/// time of a tuned kernel whose contraction is this op, epilogue included) costs that time;
/// every other op, and fused ops, cost what `base` says.
#[derive(Clone, Debug)]
pub struct Measured<M> {
    /// The model for ops without a measurement.
    pub base: M,
    /// Measured microseconds by op signature.
    pub times_us: std::sync::Arc<std::collections::HashMap<String, f64>>,
}

impl<M: CostModel> CostModel for Measured<M> {
    fn op_cost(&self, op: &Op, inputs: &[Option<&Fact>], outputs: &[Fact], fused: bool) -> f64 {
        if !fused && !self.times_us.is_empty() {
            if let Some(t) = self.times_us.get(&kiln_ir::ops::op_signature(op, inputs)) {
                return *t;
            }
        }
        self.base.op_cost(op, inputs, outputs, fused)
    }

    fn name(&self) -> String {
        format!(
            "{} + {} measured op times",
            self.base.name(),
            self.times_us.len()
        )
    }
}

/// The measured-time table of [`Measured`] from tuning records: `(kernel description,
/// seconds)` pairs, where a description is `KIND SIG;SIG;...` (the node signatures of a
/// tuned kernel); each contraction signature (`Linalg(...)`, `Nn(Conv(...))`) gets the best
/// time of the kernels containing it.
pub fn measured_table<'a>(
    records: impl IntoIterator<Item = (&'a str, f64)>,
) -> std::collections::HashMap<String, f64> {
    let mut out: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    for (desc, seconds) in records {
        let body = desc.split_once(' ').map(|(_, b)| b).unwrap_or(desc);
        for sig in body.split(';') {
            if sig.starts_with("Linalg(") || sig.starts_with("Nn(Conv(") {
                let us = seconds * 1e6;
                let e = out.entry(sig.to_string()).or_insert(us);
                *e = e.min(us);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::ops::op_signature;
    use kiln_ir::{DType, Shape};

    /// An AVX-512 core computes a compute-bound product in half the time of an AVX2 one; a
    /// memory-bound op costs the same on both.
    #[test]
    fn avx512_cores_compute_twice_as_fast() {
        let f = |d: &[usize]| Fact::new(DType::F32, Shape::known(d));
        let cost = |dev: Device, op: Op, ins: &[&[usize]], out: &[usize]| {
            let ins: Vec<Fact> = ins.iter().map(|d| f(d)).collect();
            let ins: Vec<Option<&Fact>> = ins.iter().map(Some).collect();
            let launch = dev.launch_us;
            Analytical { device: dev }.op_cost(&op, &ins, &[f(out)], false) - launch
        };
        assert_eq!(Device::cpu_with_lanes(8), Device::cpu());
        let mm = || Op::Linalg(LinalgOp::MatMul);
        let big = |dev| cost(dev, mm(), &[&[512, 512], &[512, 512]], &[512, 512]);
        let ratio = big(Device::cpu()) / big(Device::cpu_with_lanes(16));
        assert!((ratio - 2.0).abs() < 1e-9, "{ratio}");
        let relu = |dev| {
            let op = Op::Elementwise(kiln_ir::ops::elementwise::ElementwiseOp::Unary(
                kiln_ir::ops::elementwise::UnaryKind::Relu,
            ));
            cost(dev, op, &[&[1 << 20]], &[1 << 20])
        };
        assert_eq!(relu(Device::cpu()), relu(Device::cpu_with_lanes(16)));
    }

    /// On a GPU a small product leaves SMs idle, so one product over concatenated weights
    /// costs less than two (tensat's merge of parallel MatMuls); on a CPU core the
    /// arithmetic is the same and only a launch is saved.
    #[test]
    fn gpu_utilisation_rewards_merged_products() {
        let f = |d: &[usize]| Fact::new(DType::F32, Shape::known(d));
        let mm = Op::Linalg(LinalgOp::MatMul);
        let cost = |dev: Device, n: usize| {
            Analytical { device: dev }.op_cost(
                &mm,
                &[Some(&f(&[16, 512])), Some(&f(&[512, n]))],
                &[f(&[16, n])],
                false,
            )
        };
        let v100 = || Device::gpu("v100", 80, 15_700.0, 900.0);
        assert!(cost(v100(), 2048) < 0.6 * 2.0 * cost(v100(), 1024));
        let cpu = 2.0 * cost(Device::cpu(), 1024) - cost(Device::cpu(), 2048);
        assert!((cpu - Device::cpu().launch_us).abs() < 1e-6, "{cpu}");
        assert_eq!(v100().utilisation(16.0 * 1024.0), 4.0 / 80.0);
        assert_eq!(v100().utilisation(1e9), 1.0);
        assert_eq!(Device::cpu().utilisation(3.0), 1.0);
        // K = 4096 splits 8 ways as the GPU f32 GEMM does, K = 512 (32 steps) 4 ways;
        // K = 64 does not split.
        assert_eq!(
            v100().product_utilisation(16.0 * 1024.0, 4096.0),
            32.0 / 80.0
        );
        assert_eq!(
            v100().product_utilisation(16.0 * 1024.0, 512.0),
            16.0 / 80.0
        );
        assert_eq!(v100().product_utilisation(16.0 * 1024.0, 64.0), 4.0 / 80.0);
        assert_eq!(Device::cpu().product_utilisation(3.0, 4096.0), 1.0);
    }

    /// On a GPU a small product costs its serial K steps (split K ways, with a zeroing
    /// launch), whatever its width: eight side by side cost what one does.
    #[test]
    fn gpu_products_are_bound_by_their_serial_k_steps() {
        let f = |d: &[usize]| Fact::new(DType::F32, Shape::known(d));
        let mm = |dev: &Device, m: usize, k: usize, n: usize| {
            Analytical {
                device: dev.clone(),
            }
            .op_cost(
                &Op::Linalg(LinalgOp::MatMul),
                &[Some(&f(&[m, k])), Some(&f(&[k, n]))],
                &[f(&[m, n])],
                false,
            )
        };
        let h100 = Device::gpu("h100", 132, 67_000.0, 3_350.0);
        // 1×512×512: one tile, 32 steps in 4 slices of 8: launch + zeroing + 8 steps
        assert!((mm(&h100, 1, 512, 512) - 16.0).abs() < 0.5);
        assert!((mm(&h100, 1, 512, 4096) - mm(&h100, 1, 512, 512)).abs() < 0.5);
        // too short a K to split (4 and 8 steps): the steps add up; a K twice as long as
        // 512 takes twice the slices instead
        assert!((mm(&h100, 1, 64, 512) - 8.0).abs() < 0.5);
        assert!((mm(&h100, 1, 128, 512) - 12.0).abs() < 0.5);
        assert!((mm(&h100, 1, 1024, 512) - 16.0).abs() < 0.5);
        let roofline = Device {
            k_step_us: 0.0,
            ..h100.clone()
        };
        assert!(mm(&roofline, 1, 512, 512) < 9.0);
        assert_eq!(Device::cpu().k_step_us, 0.0);
    }

    #[test]
    fn measured_times_replace_the_estimate_of_matching_ops_only() {
        let a = Fact::new(DType::F32, Shape::known(&[4, 8]));
        let b = Fact::new(DType::F32, Shape::known(&[8, 16]));
        let y = Fact::new(DType::F32, Shape::known(&[4, 16]));
        let mm = Op::Linalg(LinalgOp::MatMul);
        let sig = op_signature(&mm, &[Some(&a), Some(&b)]);
        assert_eq!(sig, "Linalg(MatMul)(f32[4,8],f32[8,16])");
        let table = measured_table([
            (
                format!("matmul {sig};Elementwise(Unary(Relu))(f32[4,16])").as_str(),
                3e-6,
            ),
            (format!("matmul {sig}").as_str(), 5e-6),
        ]);
        assert_eq!(table.len(), 1);
        assert!(
            (table[&sig] - 3.0).abs() < 1e-9,
            "the best time wins: {table:?}"
        );
        let m = Measured {
            base: Analytical::default(),
            times_us: std::sync::Arc::new(table),
        };
        let base = Analytical::default();
        assert_eq!(
            m.op_cost(&mm, &[Some(&a), Some(&b)], std::slice::from_ref(&y), false),
            3.0
        );
        // Other shapes, and fused ops, keep the analytical estimate.
        let b2 = Fact::new(DType::F32, Shape::known(&[8, 32]));
        let y2 = Fact::new(DType::F32, Shape::known(&[4, 32]));
        assert_eq!(
            m.op_cost(
                &mm,
                &[Some(&a), Some(&b2)],
                std::slice::from_ref(&y2),
                false
            ),
            base.op_cost(&mm, &[Some(&a), Some(&b2)], &[y2], false)
        );
        assert!(m.name().contains("1 measured"), "{}", m.name());
    }
}
