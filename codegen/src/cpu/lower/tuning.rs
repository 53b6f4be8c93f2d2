//! What the autotuner may change in the CPU kernels: the tunable kernels of a partition,
//! their workloads, search spaces and defaults, and the schedules they are lowered with.
//!
//! Two templates are tunable: `matmul` (MatMul/Gemm contractions: the packed matmul's
//! register tile `mr × nr` and cache blocks `mc`, `kc`, `nc` of [`MatmulSchedule`]) and
//! `conv2d` (the algorithm form — direct, Winograd, channel-vector, dot-product, im2col — and
//! the direct form's register tile of [`ConvSchedule`]). A [`ScheduleSource`] (the tuning
//! database, or a single candidate while tuning) gives the schedule per workload; kernels it
//! has nothing for keep the defaults.

use super::conv::{ConvAlgo, ConvSchedule};
use crate::cpu::matmul::MatmulSchedule;
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::ops::op_signature;
use kiln_ir::{Graph, Op};
use kiln_passes::fusion::{self, KernelKind};
use kiln_tune::{Config, Param, Space, Workload};

/// AVX2 vector registers (the register-tile validity bound).
pub const VECTOR_REGISTERS: i64 = 16;

/// Largest output grid (positions per channel) the tuner tries the channel-vector form on
/// (the default schedule uses it up to 64).
pub const CHAN_MAX_POSITIONS: i64 = 256;

/// Largest output grid the tuner tries the dot-product form on (the default: 8).
pub const DOT_MAX_POSITIONS: i64 = 64;

/// Where lowering gets a tuned schedule for a workload.
pub trait ScheduleSource {
    /// The schedule for `workload`, if one is known.
    fn schedule(&self, workload: &Workload) -> Option<Config>;
}

/// No tuned schedules: every kernel keeps its default.
pub struct Defaults;

impl ScheduleSource for Defaults {
    fn schedule(&self, _: &Workload) -> Option<Config> {
        None
    }
}

impl ScheduleSource for std::collections::HashMap<String, Config> {
    /// Looks the workload up by fingerprint.
    fn schedule(&self, workload: &Workload) -> Option<Config> {
        self.get(&workload.fingerprint()).cloned()
    }
}

/// A kernel of a partition that the tuner can schedule.
#[derive(Debug, Clone)]
pub struct Tunable {
    /// The workload (template kind, canonical description, features).
    pub workload: Workload,
    /// Its schedule parameters.
    pub space: Space,
    /// The schedule used without tuning.
    pub default: Config,
    /// A short human-readable name (`conv 3x3/s1 16->16 @16x16`, `matmul 1x64x32`).
    pub label: String,
    /// Multiply-accumulates of one call (to weigh tasks).
    pub macs: u64,
}

impl Tunable {
    /// Whether `c` can be compiled: in the space, and its register tile fits the
    /// [`VECTOR_REGISTERS`] (accumulators + one row of B vectors + one broadcast).
    pub fn check(&self, c: &Config) -> Result<(), String> {
        if !self.space.contains(c) {
            return Err(format!("{c} is not in the space of {}", self.workload.kind));
        }
        match self.workload.kind.as_str() {
            "matmul" => {
                let lanes = c.get_or("vw", 8);
                let nr = c.get_or("nr", 16);
                if lanes <= 0 || nr % lanes != 0 {
                    return Err(format!("nr {nr} is not a multiple of {lanes} lanes"));
                }
                let (mr, nv) = (c.get_or("mr", 6), nr / lanes);
                let regs = mr * nv + nv + 1;
                let avail = vector_registers(lanes);
                if regs > avail {
                    return Err(format!("register tile needs {regs} of {avail} registers"));
                }
            }
            "conv2d" => {
                let (mr, nv) = (c.get_or("mr", 0), c.get_or("nv", 0));
                if (mr == 0) != (nv == 0) {
                    return Err("mr and nv are both automatic or both set".into());
                }
                if mr * nv + nv + 1 > VECTOR_REGISTERS {
                    return Err(format!("register tile {mr}x{nv} exceeds the registers"));
                }
                let f = self.workload.features.as_slice();
                // features: [n, c, h, w, m, kh, kw, stride, group, positions] as log2(1+x)
                let raw = |i: usize| (f[i].exp2() - 1.0).round() as i64;
                let (kh, kw, stride, group) = (raw(5), raw(6), raw(7), raw(8));
                let form = c.get_or("form", 0);
                if group != 1 && form != 0 && form != 1 {
                    return Err("grouped convs have the direct form only".into());
                }
                if form == 2 && !(kh == 3 && kw == 3 && stride == 1) {
                    return Err("Winograd needs a 3x3 stride-1 conv".into());
                }
                if form == 3 && raw(4) < 8 {
                    return Err("the channel-vector form needs 8 output channels".into());
                }
                // The channel-vector and dot-product forms unroll over output positions:
                // beyond these sizes their code (and compile time) explodes.
                let positions = raw(9);
                if form == 3 && positions > CHAN_MAX_POSITIONS {
                    return Err(format!(
                        "the channel-vector form is for at most {CHAN_MAX_POSITIONS} output positions"
                    ));
                }
                if form == 4 && positions > DOT_MAX_POSITIONS {
                    return Err(format!(
                        "the dot-product form is for at most {DOT_MAX_POSITIONS} output positions"
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn lg(x: usize) -> f32 {
    (1.0 + x as f32).log2()
}

/// A canonical description of a kernel's nodes ([`kiln_ir::ops::op_signature`] of each,
/// joined by `;`): everything that changes the generated code except the schedule. The
/// first segment is the contraction's own signature, which the measured eqsat cost model
/// looks up.
fn describe(g: &Graph, k: &fusion::Kernel) -> String {
    k.nodes
        .iter()
        .map(|&n| {
            let node = &g.nodes[n];
            let ins: Vec<Option<&kiln_ir::Fact>> = node
                .inputs
                .iter()
                .map(|v| v.map(|v| &g.values[v].fact))
                .collect();
            op_signature(&node.op, &ins)
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The tunable kernel `k` of `g`, if its template is tunable (f32 MatMul/Gemm/Conv with
/// static shapes), for an AVX2 target (8 f32 lanes; see [`tunable_for`]).
pub fn tunable(g: &Graph, k: &fusion::Kernel) -> Option<Tunable> {
    tunable_for(g, k, 8)
}

/// Vector registers of a target whose vectors hold `lanes` f32: 32 with AVX-512 (16
/// lanes), 16 with AVX2.
pub fn vector_registers(lanes: i64) -> i64 {
    if lanes == 16 {
        32
    } else {
        VECTOR_REGISTERS
    }
}

/// [`tunable`] for a target with `lanes` f32 per vector register (8 or 16): the matmul
/// template's space and default follow the register file ([`matmul_space_for`],
/// [`default_config_for`]).
pub fn tunable_for(g: &Graph, k: &fusion::Kernel, lanes: usize) -> Option<Tunable> {
    if k.kind != KernelKind::Contraction {
        return None;
    }
    let known = |v: usize| g.values[v].fact.shape.as_known();
    for &n in &k.nodes {
        let node = &g.nodes[n];
        match &node.op {
            Op::Nn(NnOp::Conv(attrs)) => {
                let x = known(node.inputs[0]?)?;
                let w = known(node.inputs[1]?)?;
                let y = known(node.outputs[0])?;
                if x.len() != 4 || w.len() != 4 || y.len() != 4 {
                    return None;
                }
                let stride = attrs
                    .window
                    .strides
                    .as_ref()
                    .and_then(|s| s.first().copied())
                    .unwrap_or(1);
                let features = vec![
                    lg(x[0]),
                    lg(x[1]),
                    lg(x[2]),
                    lg(x[3]),
                    lg(w[0]),
                    lg(w[2]),
                    lg(w[3]),
                    lg(stride),
                    lg(attrs.group),
                    lg(y[2] * y[3]),
                ];
                let macs = (y.iter().product::<usize>() * w[1] * w[2] * w[3]) as u64;
                let label = format!(
                    "conv {}x{}/s{stride} {}->{} @{}x{}{}{}",
                    w[2],
                    w[3],
                    x[1],
                    w[0],
                    y[2],
                    y[3],
                    if attrs.group > 1 {
                        format!(" g{}", attrs.group)
                    } else {
                        String::new()
                    },
                    epilogue(g, k, n)
                );
                return Some(Tunable {
                    workload: Workload::new(
                        "conv2d",
                        &format!("conv2d {}", describe(g, k)),
                        features,
                    ),
                    space: conv_space(),
                    default: default_config("conv2d").expect("a known template"),
                    label,
                    macs,
                });
            }
            Op::Linalg(LinalgOp::MatMul | LinalgOp::Gemm(_)) => {
                let a = known(node.inputs[0]?)?;
                let b = known(node.inputs[1]?)?;
                let y = known(node.outputs[0])?;
                // Only what the packed matmul computes: 2-D (or batched) operands.
                if a.len() < 2 || b.len() < 2 || y.len() < 2 {
                    return None;
                }
                let (m, nn) = (y[..y.len() - 1].iter().product::<usize>(), *y.last()?);
                let kk = match &node.op {
                    Op::Linalg(LinalgOp::Gemm(gm)) if gm.trans_a => a[0],
                    _ => *a.last()?,
                };
                let features = vec![lg(m), lg(nn), lg(kk)];
                return Some(Tunable {
                    workload: Workload::new(
                        "matmul",
                        &format!("matmul {}", describe(g, k)),
                        features,
                    ),
                    space: matmul_space_for(lanes),
                    default: default_config_for("matmul", lanes).expect("a known template"),
                    label: format!("{} {m}x{nn}x{kk}{}", node.op.op_type(), epilogue(g, k, n)),
                    macs: (m * nn * kk) as u64,
                });
            }
            _ => {}
        }
    }
    None
}

/// ` +op+op` for the epilogue nodes of `k` (all but the contraction node `main`).
fn epilogue(g: &Graph, k: &fusion::Kernel, main: usize) -> String {
    k.nodes
        .iter()
        .filter(|&&n| n != main)
        .map(|&n| format!("+{}", g.nodes[n].op.op_type()))
        .collect()
}

/// The schedule a template's kernels get without tuning on an AVX2 target, as a config.
pub fn default_config(kind: &str) -> Option<Config> {
    default_config_for(kind, 8)
}

/// [`default_config`] for a target with `lanes` f32 per vector register; a 16-lane matmul
/// config carries `vw = 16` (configs without `vw` are 8-lane).
pub fn default_config_for(kind: &str, lanes: usize) -> Option<Config> {
    let d = MatmulSchedule::for_lanes(lanes);
    let mut pairs = vec![
        ("mr", d.mr as i64),
        ("nr", d.nr as i64),
        ("mc", d.mc as i64),
        ("kc", d.kc as i64),
        ("nc", d.nc as i64),
    ];
    if d.vector_width != 8 {
        pairs.push(("vw", d.vector_width as i64));
    }
    match kind {
        "matmul" => Some(Config::from_pairs(&pairs)),
        "conv2d" => Some(Config::from_pairs(&[("form", 0), ("mr", 0), ("nv", 0)])),
        _ => None,
    }
}

/// The `matmul` template's space for a target with `lanes` f32 per vector register: the
/// AVX2 space ([`matmul_space`]), or with 16 lanes taller tiles of 16-lane columns (`vw`).
pub fn matmul_space_for(lanes: usize) -> Space {
    if lanes != 16 {
        return matmul_space();
    }
    Space::new(vec![
        Param::new("mr", &[1, 2, 4, 6, 8, 10, 12, 14]),
        Param::new("nr", &[16, 32, 48, 64]),
        Param::new("mc", &[24, 48, 96, 192, 384]),
        Param::new("kc", &[64, 128, 256, 512]),
        Param::new("nc", &[256, 512, 1024, 2048, 4096]),
        Param::new("vw", &[16]),
    ])
}

/// The `matmul` template's space (AVX2).
pub fn matmul_space() -> Space {
    Space::new(vec![
        Param::new("mr", &[1, 2, 3, 4, 5, 6, 7, 8]),
        Param::new("nr", &[8, 16, 24, 32]),
        Param::new("mc", &[24, 48, 96, 192, 384]),
        Param::new("kc", &[64, 128, 256, 512]),
        Param::new("nc", &[256, 512, 1024, 2048, 4096]),
    ])
}

/// The `conv2d` template's space (`form`: 0 automatic, 1 direct, 2 Winograd, 3
/// channel-vector, 4 dot-product, 5 im2col + matmul; `mr`/`nv` 0: automatic).
pub fn conv_space() -> Space {
    Space::new(vec![
        Param::new("form", &[0, 1, 2, 3, 4, 5]),
        Param::new("mr", &[0, 1, 2, 4, 6, 8]),
        Param::new("nv", &[0, 1, 2, 3, 4]),
    ])
}

/// The matmul schedule of a `matmul` config (missing parameters keep the default).
pub fn matmul_schedule(c: &Config) -> MatmulSchedule {
    let d = MatmulSchedule::default();
    let get = |k: &str, v: usize| c.get(k).map(|x| x.max(1) as usize).unwrap_or(v);
    MatmulSchedule {
        mr: get("mr", d.mr),
        nr: get("nr", d.nr),
        mc: get("mc", d.mc),
        kc: get("kc", d.kc),
        nc: get("nc", d.nc),
        vector_width: get("vw", d.vector_width),
        lowering: d.lowering,
    }
}

/// The conv schedule of a `conv2d` config, starting from `base` (the partition's default).
pub fn conv_schedule(c: &Config, base: &ConvSchedule) -> ConvSchedule {
    let mut s = *base;
    s.mr = c.get_or("mr", 0).max(0) as usize;
    s.nv = c.get_or("nv", 0).max(0) as usize;
    let off = |s: &mut ConvSchedule| {
        s.winograd_min_channels = 0;
        s.chan_max_positions = 0;
        s.dot_max_positions = 0;
        s.algo = ConvAlgo::Direct;
    };
    match c.get_or("form", 0) {
        1 => off(&mut s),
        2 => {
            off(&mut s);
            s.winograd_min_channels = 1;
            s.winograd_min_positions = 1;
        }
        3 => {
            off(&mut s);
            s.chan_max_positions = usize::MAX;
            s.chan_below_lane_use_pct = 101;
        }
        4 => {
            off(&mut s);
            s.dot_max_positions = usize::MAX;
        }
        5 => {
            off(&mut s);
            s.algo = ConvAlgo::Im2colGemm;
        }
        _ => {}
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{DType, Fact, Node, Shape};

    fn matmul_graph(a: &[usize], b: &[usize], y: &[usize]) -> (Graph, fusion::Kernel) {
        let mut g = Graph::default();
        let f = |s: &[usize]| Fact::new(DType::F32, Shape::known(s));
        let (va, vb, vy) = (
            g.add_value("a", f(a)),
            g.add_value("b", f(b)),
            g.add_value("y", f(y)),
        );
        g.inputs = vec![va, vb];
        g.outputs = vec![vy];
        g.nodes.push(Node {
            name: "mm".into(),
            op: Op::Linalg(LinalgOp::MatMul),
            inputs: vec![Some(va), Some(vb)],
            outputs: vec![vy],
        });
        let k = fusion::Kernel {
            name: "k0".into(),
            kind: KernelKind::Contraction,
            nodes: vec![0],
            inputs: vec![va, vb],
            outputs: vec![vy],
        };
        (g, k)
    }

    #[test]
    fn matmul_workloads_spaces_and_validity() {
        let (g, k) = matmul_graph(&[4, 8], &[8, 16], &[4, 16]);
        let t = tunable(&g, &k).expect("a 2-D MatMul is tunable");
        assert_eq!(t.workload.kind, "matmul");
        assert_eq!(t.label, "MatMul 4x16x8");
        assert_eq!(t.macs, 4 * 16 * 8);
        assert!(t.check(&t.default).is_ok());
        let spill =
            Config::from_pairs(&[("mr", 8), ("nr", 32), ("mc", 96), ("kc", 256), ("nc", 1024)]);
        assert!(t.check(&spill).unwrap_err().contains("registers"));
        let s = matmul_schedule(&Config::from_pairs(&[("mr", 4), ("kc", 128)]));
        assert_eq!((s.mr, s.nr, s.kc), (4, 16, 128));
        // 1-D operands (vector products) are not the packed matmul's: not tunable, no panic.
        let (g, k) = matmul_graph(&[8], &[8], &[]);
        assert!(tunable(&g, &k).is_none());
        let (g, k) = matmul_graph(&[4, 8], &[8], &[4]);
        assert!(tunable(&g, &k).is_none());
    }

    /// With 16-lane vectors (AVX-512) the default is the 8×32 tile with `vw = 16`, the same
    /// 8×32 tile that spills 8-lane registers fits the 32 registers, and a config without
    /// `vw` is 8-lane.
    #[test]
    fn avx512_matmul_space_and_default() {
        let (g, k) = matmul_graph(&[64, 128], &[128, 256], &[64, 256]);
        let t = tunable_for(&g, &k, 16).expect("tunable");
        assert!(t.space.contains(&t.default) && t.check(&t.default).is_ok());
        assert_eq!(matmul_schedule(&t.default), MatmulSchedule::for_lanes(16));
        assert_eq!(t.workload, tunable(&g, &k).unwrap().workload);
        let big = Config::from_pairs(&[
            ("mr", 14),
            ("nr", 32),
            ("mc", 96),
            ("kc", 256),
            ("nc", 1024),
            ("vw", 16),
        ]);
        assert!(t.check(&big).is_ok(), "14x2 + 2 + 1 = 31 of 32 registers");
        let spill = Config::from_pairs(&[
            ("mr", 14),
            ("nr", 48),
            ("mc", 96),
            ("kc", 256),
            ("nc", 1024),
            ("vw", 16),
        ]);
        assert!(t.check(&spill).unwrap_err().contains("registers"));
        assert_eq!(
            matmul_schedule(&default_config("matmul").unwrap()),
            MatmulSchedule::default()
        );
    }
}
