//! Which GPU kernels are tunable, their schedule spaces and how a tuning record's config
//! becomes a kernel: the GPU side of `kiln tune --target cuda:SKU`.
//!
//! A [`GpuTunable`] is one kernel template at fixed shapes ([`GpuTemplate`]: the f32 SIMT
//! GEMM, the `mma.sync` and `wgmma` tensor-core GEMMs at an input precision, the f32
//! implicit-GEMM conv) on one SKU: its workload (fingerprinted description: template,
//! shapes, precision, fused epilogue — not the SKU, which the tuning database keys
//! separately), the schedule [`Space`] of the kernel module, a validity
//! [`check`](GpuTunable::check) against the SKU (threads, shared memory, registers estimate,
//! divisibility, grid limits; nothing is compiled) and the default config (the schedule the
//! lowering uses without tuning). [`GpuTunable::build`] generates the kernel of a config with
//! its launch geometry — the same code the model lowering uses, so a measured record
//! reproduces the kernel `kiln compile --db` emits.
//!
//! The lowering ([`super::lower`]) asks a [`GpuSchedules`] (in
//! [`LowerOptions::schedules`](super::lower::LowerOptions::schedules)) for each tunable
//! kernel's config: it answers the record's config where one exists and passes the check,
//! else the default, and notes every tunable kernel it saw (how `kiln tune` extracts a
//! model's tasks, and how `kiln compile --db` reports how many kernels had a record).

use super::kernels::conv::{
    conv2d, ConvGeom, ConvLayout, Epilogue as ConvEpilogue, GpuConvSchedule,
};
use super::kernels::conv_mma::{conv2d_mma, ConvMmaSchedule};
use super::kernels::epilogue::{Activation, Epilogue, Residual};
use super::kernels::gemm::{gemm_f32, GpuGemmSchedule};
use super::kernels::gemm_mma::{gemm_mma, kernel_name, MmaInput, MmaOutput, MmaSchedule};
use super::kernels::gemm_select::{select, GemmProblem, TensorCoreGemm};
use super::kernels::gemm_wgmma::{gemm_wgmma, TensorMapSpec, WgmmaGemm, WgmmaSchedule};
use super::lower::attention::{row_attention, RowAttention, RowAttentionSchedule, ScoreStep};
use super::{GpuError, GpuKernel, Sku};
use kiln_tune::{Config, Param, Space, Workload};
use std::collections::HashMap;
use std::sync::Mutex;

/// A tunable GPU kernel template at fixed shapes.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuTemplate {
    /// [`gemm_f32`]: `C[m,n] = A[m,k]·B[k,n]`, f32 SIMT, shared-memory tiled.
    GemmF32 {
        /// Rows.
        m: u64,
        /// Columns.
        n: u64,
        /// Depth.
        k: u64,
    },
    /// [`gemm_mma`] (f32 output) with its fused epilogue: `batch` matrices at element
    /// strides `stride_a`, `stride_b` (`p.output` is f32).
    Mma {
        /// The problem.
        p: GemmProblem,
        /// The fused epilogue (bias, activation, residual).
        epi: Epilogue,
    },
    /// [`gemm_wgmma`] (f32 output) with its fused epilogue, one matrix.
    Wgmma {
        /// Rows.
        m: u64,
        /// Columns.
        n: u64,
        /// Depth.
        k: u64,
        /// f16 or bf16.
        input: MmaInput,
        /// The fused epilogue (bias, activation, residual).
        epi: Epilogue,
    },
    /// [`conv2d`] in NCHW with its fused epilogue.
    Conv {
        /// The geometry.
        geom: ConvGeom,
        /// The fused epilogue.
        epi: ConvEpilogue,
    },
    /// [`conv2d_mma`] (tensor cores, f16 or bf16 `X` and `W`, f32 output) in NCHW with its
    /// fused epilogue.
    ConvMma {
        /// The geometry.
        geom: ConvGeom,
        /// The fused epilogue.
        epi: ConvEpilogue,
        /// f16 or bf16.
        input: MmaInput,
    },
    /// [`row_attention`]: fused `softmax(steps(Q·Kᵀ)) · V` (f32) at fixed shapes.
    RowAttention(RowAttention),
}

/// The shape and epilogue part of a conv workload description.
fn conv_desc(g: &ConvGeom, epi: &ConvEpilogue) -> String {
    format!(
        "n={} c={} h={} w={} oc={} k={}x{} stride={}x{} pads={},{},{},{} dilation={}x{} \
         bias={} residual={} relu={}",
        g.n,
        g.c,
        g.h,
        g.w,
        g.oc,
        g.kh,
        g.kw,
        g.stride[0],
        g.stride[1],
        g.pads[0],
        g.pads[1],
        g.pads[2],
        g.pads[3],
        g.dilation[0],
        g.dilation[1],
        u8::from(epi.bias),
        u8::from(epi.residual),
        u8::from(epi.relu)
    )
}

/// The shape and score-epilogue part of a row-attention workload description (constants
/// as f32 bit patterns, so that the description parses back to the same kernel).
fn attention_desc(a: &RowAttention) -> String {
    let steps: Vec<String> = a
        .steps
        .iter()
        .map(|s| match s {
            ScoreStep::Div(c) => format!("div:{:08x}", c.to_bits()),
            ScoreStep::Mul(c) => format!("mul:{:08x}", c.to_bits()),
            ScoreStep::AddMask => "mask".into(),
            ScoreStep::Causal(f) => format!("causal:{:08x}", f.to_bits()),
        })
        .collect();
    let join = |v: Vec<String>, sep: &str| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(sep)
        }
    };
    format!(
        "bh={} sq={} skv={} d={} batch={} steps={} ms={}",
        a.bh,
        a.sq,
        a.skv,
        a.d,
        join(a.batch.iter().map(|b| b.to_string()).collect(), "x"),
        join(steps, ","),
        join(a.mask_strides.iter().map(|m| m.to_string()).collect(), ",")
    )
}

/// The inverse of [`attention_desc`] over its `key=value` fields.
fn attention_from(f: &HashMap<&str, &str>) -> Option<RowAttention> {
    let num = |k: &str| -> Option<usize> { f.get(k)?.parse().ok() };
    let list = |k: &str, sep: char| -> Option<Vec<&str>> {
        let v = *f.get(k)?;
        Some(if v == "none" {
            Vec::new()
        } else {
            v.split(sep).collect()
        })
    };
    let bits = |h: &str| u32::from_str_radix(h, 16).ok().map(f32::from_bits);
    let steps = list("steps", ',')?
        .into_iter()
        .map(|s| match s.split_once(':') {
            None if s == "mask" => Some(ScoreStep::AddMask),
            Some(("div", h)) => Some(ScoreStep::Div(bits(h)?)),
            Some(("mul", h)) => Some(ScoreStep::Mul(bits(h)?)),
            Some(("causal", h)) => Some(ScoreStep::Causal(bits(h)?)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(RowAttention {
        bh: num("bh")?,
        sq: num("sq")?,
        skv: num("skv")?,
        d: num("d")?,
        steps,
        batch: list("batch", 'x')?
            .into_iter()
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?,
        mask_strides: list("ms", ',')?
            .into_iter()
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?,
    })
}

/// The [`RowAttentionSchedule`] of a config (missing parameters keep the default).
pub fn row_attention_schedule(c: &Config) -> RowAttentionSchedule {
    let d = RowAttentionSchedule::default();
    let get = |k: &str, v: u32| c.get_u32_or(k, v);
    RowAttentionSchedule {
        block: get("block", d.block),
        kv_split: get("kv_split", d.kv_split),
    }
}

/// The config of a [`RowAttentionSchedule`].
pub fn row_attention_config(s: &RowAttentionSchedule) -> Config {
    Config::from_pairs(&[
        ("block", i64::from(s.block)),
        ("kv_split", i64::from(s.kv_split)),
    ])
}

/// Features of a conv workload.
fn conv_features(g: &ConvGeom) -> Vec<f32> {
    vec![log2p(g.m()), log2p(g.oc), log2p(g.k()), log2p(g.kh * g.kw)]
}

/// A generated candidate kernel and its launch.
#[derive(Debug, Clone)]
pub struct TunedKernel {
    /// The kernel.
    pub kernel: GpuKernel,
    /// Blocks per grid.
    pub grid: [u32; 3],
    /// Threads per block.
    pub block: [u32; 3],
    /// Dynamic shared memory to launch with.
    pub dynamic_shared: u32,
    /// TMA descriptors `[A, B]` of the wgmma kernel.
    pub tensor_maps: Option<[TensorMapSpec; 2]>,
}

/// One tunable kernel on one SKU (see the module doc).
#[derive(Debug, Clone)]
pub struct GpuTunable {
    /// The template and shapes.
    pub template: GpuTemplate,
    /// The SKU the check and the kernels are for.
    pub sku: Sku,
    /// Workload (kind, description, features).
    pub workload: Workload,
    /// The schedule parameters.
    pub space: Space,
    /// Today's schedule.
    pub default: Config,
    /// Floating-point operations of one launch (for trial allocation).
    pub flops: f64,
}

/// The precision's name in workload descriptions.
fn input_name(i: MmaInput) -> &'static str {
    match i {
        MmaInput::F16 => "f16",
        MmaInput::BF16 => "bf16",
        MmaInput::TF32 => "tf32",
    }
}

/// The epilogue's part of a workload description: `bias=0|1`, then ` epi=TAG` when it
/// has an activation or a residual (descriptions of bias-only GEMMs keep their old form).
fn epi_desc(e: &Epilogue) -> String {
    let plain = Epilogue {
        bias: e.bias,
        ..Epilogue::none()
    };
    if *e == plain {
        format!("bias={}", u8::from(e.bias))
    } else {
        format!("bias={} epi={}", u8::from(e.bias), e.tag())
    }
}

/// Features of an epilogue: activation index, residual (0 none, 1 before, 2 after).
fn epi_features(e: &Epilogue) -> [f32; 2] {
    let act = Activation::ALL
        .iter()
        .position(|a| *a == e.activation)
        .unwrap_or(0);
    let res = match e.residual {
        Residual::None => 0.0,
        Residual::BeforeActivation => 1.0,
        Residual::AfterActivation => 2.0,
    };
    [act as f32, res]
}

/// Whether a tensor-core GEMM with epilogue `e` may split K (see [`GpuTemplate::Mma`]).
pub fn split_k_allowed(e: &Epilogue) -> bool {
    e.activation == Activation::None && !e.has_residual()
}

fn log2p(x: u64) -> f32 {
    (1.0 + x as f32).log2()
}

/// The [`GpuGemmSchedule`] of a config (missing parameters keep the default).
pub fn gemm_f32_schedule(c: &Config) -> GpuGemmSchedule {
    let d = GpuGemmSchedule::default();
    let get = |k: &str, v: u32| c.get_u32_or(k, v);
    GpuGemmSchedule {
        bm: get("bm", d.bm),
        bn: get("bn", d.bn),
        bk: get("bk", d.bk),
        tm: get("tm", d.tm),
        tn: get("tn", d.tn),
        split_k: get("split_k", d.split_k),
    }
}

/// The f32 GEMM's tuning space: block tile `bm × bn`, stage depth `bk`, thread tile
/// `tm × tn`, and `split_k` (blocks along z summing slices of `K`).
pub fn gemm_f32_space() -> Space {
    let mut params = super::kernels::block_tile_space().params;
    params.push(kiln_tune::Param::new("split_k", &[1, 2, 4, 8]));
    Space::new(params)
}

/// The config of a [`GpuGemmSchedule`].
pub fn gemm_f32_config(s: &GpuGemmSchedule) -> Config {
    Config::from_pairs(&[
        ("bm", i64::from(s.bm)),
        ("bn", i64::from(s.bn)),
        ("bk", i64::from(s.bk)),
        ("tm", i64::from(s.tm)),
        ("tn", i64::from(s.tn)),
        ("split_k", i64::from(s.split_k)),
    ])
}

/// The [`MmaSchedule`] of a config (missing or unknown parameters keep the default).
pub fn mma_schedule(c: &Config) -> MmaSchedule {
    let mut s = MmaSchedule::default();
    for (k, v) in &c.0 {
        if let Ok(v) = u32::try_from(*v) {
            s = s.with(k, v).unwrap_or(s);
        }
    }
    s
}

/// The config of a [`MmaSchedule`] (every parameter of [`MmaSchedule::space`]).
pub fn mma_config(s: &MmaSchedule) -> Config {
    Config(
        MmaSchedule::space()
            .iter()
            .map(|(k, _)| (k.to_string(), i64::from(s.get(k).unwrap_or(0))))
            .collect(),
    )
}

/// The [`WgmmaSchedule`] of a config.
pub fn wgmma_schedule(c: &Config) -> WgmmaSchedule {
    let d = WgmmaSchedule::default();
    let get = |k: &str, v: u32| c.get_u32_or(k, v);
    WgmmaSchedule {
        bn: get("bn", d.bn),
        stages: get("stages", d.stages),
        vector: get("vector", d.vector),
        warpgroups: get("warpgroups", d.warpgroups),
        raster: get("raster", d.raster),
        producer: get("producer", d.producer),
    }
}

/// The config of a [`WgmmaSchedule`].
pub fn wgmma_config(s: &WgmmaSchedule) -> Config {
    Config::from_pairs(&[
        ("bn", i64::from(s.bn)),
        ("stages", i64::from(s.stages)),
        ("vector", i64::from(s.vector)),
        ("warpgroups", i64::from(s.warpgroups)),
        ("raster", i64::from(s.raster)),
        ("producer", i64::from(s.producer)),
    ])
}

/// The widest `cp.async` width (16, 8, 4 bytes) the mma kernel can use for `p`.
fn mma_vec_bytes(p: &GemmProblem) -> Option<u32> {
    let eb = u64::from(p.input.bytes());
    [16u32, 8, 4]
        .into_iter()
        .filter(|&v| u64::from(v) >= eb)
        .find(|&v| {
            let ve = u64::from(v) / eb;
            [p.n, p.k, p.stride_a, p.stride_b]
                .iter()
                .all(|x| x.is_multiple_of(ve))
        })
}

fn space_of(params: Vec<(&'static str, Vec<u32>)>) -> Space {
    Space::new(
        params
            .into_iter()
            .map(|(n, v)| {
                let v: Vec<i64> = v.into_iter().map(i64::from).collect();
                Param::new(n, &v)
            })
            .collect(),
    )
}

impl GpuTunable {
    /// The task of `template` on `sku` with its default schedule; `None` when the default
    /// is not valid there (the lowering then keeps its own choice, untuned).
    pub fn new(template: GpuTemplate, sku: &Sku) -> Option<Self> {
        let (kind, description, features, space, default, flops) = match &template {
            GpuTemplate::GemmF32 { m, n, k } => (
                "gpu_gemm_f32",
                format!("gpu_gemm_f32 m={m} n={n} k={k}"),
                vec![log2p(*m), log2p(*n), log2p(*k)],
                gemm_f32_space(),
                gemm_f32_config(&GpuGemmSchedule::for_problem(*m, *n, *k, sku.sm_count)),
                2.0 * (*m * *n * *k) as f64,
            ),
            GpuTemplate::Mma { p, epi } => {
                let vec = mma_vec_bytes(p)?;
                let eb = p.input.bytes();
                let mut params = MmaSchedule::space();
                for (name, vals) in &mut params {
                    match *name {
                        // Split-K adds partial sums into the output with atomics (the
                        // lowering zeroes it first): no activation, and no residual (which
                        // may be the output itself).
                        "split_k" if !split_k_allowed(epi) => *vals = vec![1],
                        "vec_bytes" => vals.retain(|&v| v >= eb && v <= vec),
                        _ => {}
                    }
                }
                (
                    "gpu_gemm_mma",
                    format!(
                        "gpu_gemm_mma {} m={} n={} k={} batch={} sa={} sb={} {}",
                        input_name(p.input),
                        p.m,
                        p.n,
                        p.k,
                        p.batch,
                        p.stride_a,
                        p.stride_b,
                        epi_desc(epi)
                    ),
                    [
                        log2p(p.m),
                        log2p(p.n),
                        log2p(p.k),
                        log2p(p.batch),
                        eb as f32,
                    ]
                    .into_iter()
                    .chain(epi_features(epi))
                    .collect(),
                    space_of(params),
                    mma_config(&MmaSchedule {
                        vec_bytes: vec,
                        ..MmaSchedule::default()
                    }),
                    2.0 * (p.m * p.n * p.k * p.batch.max(1)) as f64,
                )
            }
            GpuTemplate::Wgmma {
                m,
                n,
                k,
                input,
                epi,
            } => (
                "gpu_gemm_wgmma",
                format!(
                    "gpu_gemm_wgmma {} m={m} n={n} k={k} {}",
                    input_name(*input),
                    epi_desc(epi)
                ),
                [log2p(*m), log2p(*n), log2p(*k), input.bytes() as f32]
                    .into_iter()
                    .chain(epi_features(epi))
                    .collect(),
                space_of(WgmmaSchedule::space()),
                wgmma_config(&WgmmaSchedule::for_problem(
                    *m,
                    *n,
                    MmaOutput::F32,
                    sku.sm_count,
                )),
                2.0 * (*m * *n * *k) as f64,
            ),
            GpuTemplate::Conv { geom: g, epi } => (
                "gpu_conv2d_f32",
                format!("gpu_conv2d_f32 {}", conv_desc(g, epi)),
                conv_features(g),
                GpuConvSchedule::space(),
                GpuConvSchedule::for_geom(g, sku).to_config(),
                2.0 * (g.m() * g.oc * g.k()) as f64,
            ),
            GpuTemplate::ConvMma {
                geom: g,
                epi,
                input,
            } => (
                "gpu_conv2d_mma",
                format!(
                    "gpu_conv2d_mma {} {}",
                    input_name(*input),
                    conv_desc(g, epi)
                ),
                conv_features(g)
                    .into_iter()
                    .chain([input.bytes() as f32])
                    .collect(),
                ConvMmaSchedule::space(),
                ConvMmaSchedule::for_geom(g).to_config(),
                2.0 * (g.m() * g.oc * g.k()) as f64,
            ),
            GpuTemplate::RowAttention(a) => {
                let u = |v: usize| v as u64;
                (
                    "gpu_row_attention",
                    format!("gpu_row_attention {}", attention_desc(a)),
                    vec![
                        log2p(u(a.bh * a.sq)),
                        log2p(u(a.skv)),
                        log2p(u(a.d)),
                        f32::from(u8::from(a.steps.contains(&ScoreStep::AddMask))),
                    ],
                    space_of(RowAttentionSchedule::space()),
                    row_attention_config(&RowAttentionSchedule::default()),
                    4.0 * (a.bh * a.sq * a.skv * a.d) as f64,
                )
            }
        };
        let t = Self {
            template,
            sku: sku.clone(),
            workload: Workload::new(kind, &description, features),
            space,
            default,
            flops,
        };
        t.check(&t.default).ok()?;
        Some(t)
    }

    /// The task whose workload description is `desc` (as [`GpuTunable::new`] writes it) on
    /// `sku`; `None` if it is not one. How a tuning record's workload is turned back into its
    /// task (e.g. to know its default schedule).
    pub fn from_description(desc: &str, sku: &Sku) -> Option<Self> {
        let mut words = desc.split_whitespace();
        let kind = words.next()?;
        let mut input = None;
        let mut f: HashMap<&str, &str> = HashMap::new();
        for w in words {
            match w.split_once('=') {
                Some((k, v)) => {
                    f.insert(k, v);
                }
                None => {
                    input = [MmaInput::F16, MmaInput::BF16, MmaInput::TF32]
                        .into_iter()
                        .find(|i| input_name(*i) == w)
                }
            }
        }
        let num = |k: &str| -> Option<u64> { f.get(k)?.parse().ok() };
        let list = |k: &str, sep: char| -> Option<Vec<u64>> {
            f.get(k)?.split(sep).map(|x| x.parse().ok()).collect()
        };
        let flag = |k: &str| -> Option<bool> { Some(num(k)? == 1) };
        let epi = || -> Option<Epilogue> {
            let e = match f.get("epi") {
                Some(tag) => Epilogue::from_tag(tag)?,
                None => Epilogue::none(),
            };
            Some(Epilogue {
                bias: flag("bias")?,
                ..e
            })
        };
        let template = match kind {
            "gpu_gemm_f32" => GpuTemplate::GemmF32 {
                m: num("m")?,
                n: num("n")?,
                k: num("k")?,
            },
            "gpu_gemm_mma" => GpuTemplate::Mma {
                p: GemmProblem {
                    m: num("m")?,
                    n: num("n")?,
                    k: num("k")?,
                    batch: num("batch")?,
                    stride_a: num("sa")?,
                    stride_b: num("sb")?,
                    input: input?,
                    output: MmaOutput::F32,
                },
                epi: epi()?,
            },
            "gpu_gemm_wgmma" => GpuTemplate::Wgmma {
                m: num("m")?,
                n: num("n")?,
                k: num("k")?,
                input: input?,
                epi: epi()?,
            },
            "gpu_conv2d_f32" | "gpu_conv2d_mma" => {
                let (k, st, p, d) = (
                    list("k", 'x')?,
                    list("stride", 'x')?,
                    list("pads", ',')?,
                    list("dilation", 'x')?,
                );
                if k.len() != 2 || st.len() != 2 || p.len() != 4 || d.len() != 2 {
                    return None;
                }
                let geom = ConvGeom {
                    n: num("n")?,
                    c: num("c")?,
                    h: num("h")?,
                    w: num("w")?,
                    oc: num("oc")?,
                    kh: k[0],
                    kw: k[1],
                    stride: [st[0], st[1]],
                    pads: [p[0], p[1], p[2], p[3]],
                    dilation: [d[0], d[1]],
                };
                let epi = ConvEpilogue {
                    bias: flag("bias")?,
                    residual: flag("residual")?,
                    relu: flag("relu")?,
                };
                if kind == "gpu_conv2d_f32" {
                    GpuTemplate::Conv { geom, epi }
                } else {
                    GpuTemplate::ConvMma {
                        geom,
                        epi,
                        input: input?,
                    }
                }
            }
            "gpu_row_attention" => GpuTemplate::RowAttention(attention_from(&f)?),
            _ => return None,
        };
        let t = Self::new(template, sku)?;
        (t.workload.description == desc).then_some(t)
    }

    /// A short label (the workload description).
    pub fn label(&self) -> &str {
        &self.workload.description
    }

    /// Whether `c` can be generated and launched on the SKU (see the module doc); nothing
    /// is compiled.
    pub fn check(&self, c: &Config) -> Result<(), String> {
        let sku = &self.sku;
        if !self.space.contains(c) {
            return Err(format!("{c} is not in the space of {}", self.workload.kind));
        }
        let grid_ok = |g: [u32; 3]| -> Result<(), String> {
            if g[0] == u32::MAX || g[1] > 65535 || g[2] > 65535 {
                return Err(format!("grid {g:?} exceeds CUDA's limits"));
            }
            Ok(())
        };
        match &self.template {
            GpuTemplate::GemmF32 { m, n, .. } => {
                let s = gemm_f32_schedule(c);
                s.validate().map_err(|e| e.to_string())?;
                let t = s.threads();
                if t < sku.warp_size || t > sku.max_threads_per_block {
                    return Err(format!("{t} threads per block on {}", sku.name));
                }
                if s.shared_bytes() > sku.shared_mem_per_block {
                    return Err(format!(
                        "{} B of shared memory (limit {} on {})",
                        s.shared_bytes(),
                        sku.shared_mem_per_block,
                        sku.name
                    ));
                }
                let regs = s.tm * s.tn + s.tm + s.tn + 40;
                if regs > sku.max_registers_per_thread || regs * t > sku.registers_per_block {
                    return Err(format!(
                        "about {regs} registers × {t} threads on {}",
                        sku.name
                    ));
                }
                grid_ok(s.grid(*m, *n))
            }
            GpuTemplate::Mma { p, epi } => {
                let s = mma_schedule(c);
                s.validate(p.input, sku).map_err(|e| e.to_string())?;
                if s.split_k > 1 && !split_k_allowed(epi) {
                    return Err(format!(
                        "split_k = {} with the epilogue {}",
                        s.split_k,
                        epi.tag()
                    ));
                }
                let ve = u64::from(s.vec_bytes / p.input.bytes());
                if ![p.n, p.k, p.stride_a, p.stride_b]
                    .iter()
                    .all(|v| v.is_multiple_of(ve))
                {
                    return Err(format!(
                        "N, K and the strides are not multiples of the copy width {ve}"
                    ));
                }
                grid_ok(s.grid(p.m, p.n, p.batch))
            }
            GpuTemplate::Wgmma { m, n, .. } => {
                let s = wgmma_schedule(c);
                s.validate(sku).map_err(|e| e.to_string())?;
                grid_ok(s.grid(*m, *n))
            }
            GpuTemplate::Conv { geom, .. } => {
                let s = GpuConvSchedule::from_config(c);
                s.validate(sku).map_err(|e| e.to_string())?;
                s.launch(geom).map(|_| ()).map_err(|e| e.to_string())
            }
            GpuTemplate::ConvMma { geom, input, .. } => {
                if *input == MmaInput::TF32 || !sku.has(input.feature()) {
                    return Err(format!(
                        "no {} tensor-core conv on {}",
                        input.mlir(),
                        sku.name
                    ));
                }
                let s = ConvMmaSchedule::from_config(c);
                s.validate(sku).map_err(|e| e.to_string())?;
                s.launch(geom).map(|_| ()).map_err(|e| e.to_string())
            }
            GpuTemplate::RowAttention(a) => {
                let s = row_attention_schedule(c);
                s.validate(sku).map_err(|e| e.to_string())?;
                grid_ok(s.grid((a.bh * a.sq) as u64))
            }
        }
    }

    /// The kernel of config `c` named `name` (the tensor-core GEMMs name themselves after
    /// their schedule) with its launch geometry; `c` is checked first.
    pub fn build(&self, name: &str, c: &Config) -> Result<TunedKernel, String> {
        self.check(c)?;
        let e = |e: GpuError| e.to_string();
        Ok(match &self.template {
            GpuTemplate::GemmF32 { m, n, .. } => {
                let s = gemm_f32_schedule(c);
                let kernel = gemm_f32(name, &s).map_err(e)?;
                TunedKernel {
                    grid: s.grid(*m, *n),
                    block: kernel.block,
                    kernel,
                    dynamic_shared: 0,
                    tensor_maps: None,
                }
            }
            GpuTemplate::Mma { p, epi } => {
                let s = mma_schedule(c);
                let kname = kernel_name(p.input, MmaOutput::F32, &s, epi);
                let g = gemm_mma(&kname, p.input, MmaOutput::F32, epi, &s).map_err(e)?;
                TunedKernel {
                    grid: g.grid(p.m, p.n, p.batch),
                    block: g.kernel.block,
                    dynamic_shared: g.dynamic_shared,
                    kernel: g.kernel,
                    tensor_maps: None,
                }
            }
            GpuTemplate::Wgmma {
                m,
                n,
                k,
                input,
                epi,
            } => {
                let s = wgmma_schedule(c);
                let kname = wgmma_name(*input, &s, epi);
                let g: WgmmaGemm =
                    gemm_wgmma(&kname, *input, MmaOutput::F32, epi, &s).map_err(e)?;
                TunedKernel {
                    grid: s.grid(*m, *n),
                    block: g.kernel.block,
                    dynamic_shared: g.dynamic_shared,
                    tensor_maps: Some(g.tensor_maps(*m, *n, *k)),
                    kernel: g.kernel,
                }
            }
            GpuTemplate::Conv { geom, epi } => {
                let s = GpuConvSchedule::from_config(c);
                let kernel =
                    conv2d(name, geom, ConvLayout::Nchw, *epi, &s, &self.sku).map_err(e)?;
                let (grid, block) = s.launch(geom).map_err(e)?;
                TunedKernel {
                    kernel,
                    grid,
                    block,
                    dynamic_shared: 0,
                    tensor_maps: None,
                }
            }
            GpuTemplate::ConvMma { geom, epi, input } => {
                let s = ConvMmaSchedule::from_config(c);
                let kernel = conv2d_mma(name, geom, ConvLayout::Nchw, *epi, &s, &self.sku, *input)
                    .map_err(e)?;
                let (grid, block) = s.launch(geom).map_err(e)?;
                TunedKernel {
                    kernel,
                    grid,
                    block,
                    dynamic_shared: 0,
                    tensor_maps: None,
                }
            }
            GpuTemplate::RowAttention(a) => {
                let s = row_attention_schedule(c);
                let kernel = row_attention(name, a, &s);
                TunedKernel {
                    grid: s.grid((a.bh * a.sq) as u64),
                    block: kernel.block,
                    kernel,
                    dynamic_shared: 0,
                    tensor_maps: None,
                }
            }
        })
    }
}

/// The entry name of the wgmma GEMM with schedule `s` (f32 output), as the model lowering
/// names it.
pub fn wgmma_name(input: MmaInput, s: &WgmmaSchedule, epi: &Epilogue) -> String {
    let v = wgmma_tags(s);
    format!(
        "kiln_gemm_wgmma_{}_f32_bn{}_s{}{v}_{}",
        input.mlir(),
        s.bn,
        s.stages,
        epi.tag()
    )
}

/// The name suffix of the wgmma schedule parameters that differ from one warpgroup, scalar
/// stores, row-order tiles and no producer (`_v8_w2_r8_p1`; empty for those, so the
/// element-wise-epilogue names that records and fixtures already use stay).
pub fn wgmma_tags(s: &WgmmaSchedule) -> String {
    let mut v = String::new();
    for (tag, x) in [("v", s.vector), ("w", s.warpgroups), ("r", s.raster)] {
        if x != 1 {
            v.push_str(&format!("_{tag}{x}"));
        }
    }
    if s.producer == 1 {
        v.push_str("_p1");
    }
    v
}

/// The f32 GEMM's entry name for schedule `s`: `kiln_gemm_f32` for the default, else the
/// tiles appended (`kiln_gemm_f32_128x64x8_t8x4`, and `_s4` for `split_k = 4`).
pub fn gemm_f32_name(s: &GpuGemmSchedule) -> String {
    if *s == GpuGemmSchedule::default() {
        "kiln_gemm_f32".into()
    } else {
        let split = if s.split_k > 1 {
            format!("_s{}", s.split_k)
        } else {
            String::new()
        };
        format!(
            "kiln_gemm_f32_{}x{}x{}_t{}x{}{split}",
            s.bm, s.bn, s.bk, s.tm, s.tn
        )
    }
}

/// Tuned schedules for the lowering, by workload fingerprint, and the tunable kernels the
/// lowering met (see the module doc).
#[derive(Debug, Default)]
pub struct GpuSchedules {
    /// Config by workload fingerprint (the best record of each workload).
    pub records: HashMap<String, Config>,
    seen: Mutex<Vec<(GpuTunable, bool)>>,
}

impl GpuSchedules {
    /// Schedules from records (fingerprint → config).
    pub fn new(records: HashMap<String, Config>) -> Self {
        Self {
            records,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The config the lowering uses for `t` and whether it came from a record (a record
    /// whose config fails the check is ignored); notes `t`.
    pub fn choose(&self, t: &GpuTunable) -> (Config, bool) {
        let rec = self
            .records
            .get(&t.workload.fingerprint())
            .filter(|c| t.check(c).is_ok())
            .cloned();
        let used = rec.is_some();
        if let Ok(mut s) = self.seen.lock() {
            s.push((t.clone(), used));
        }
        (rec.unwrap_or_else(|| t.default.clone()), used)
    }

    /// Every tunable kernel met so far, in lowering order (repeats included), and whether it
    /// used a record.
    pub fn seen(&self) -> Vec<(GpuTunable, bool)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// [`select`] with the tuned schedule when `schedules` has a record for the problem (the
/// tensor-core lowering's choice; `tma_aligned`: the wgmma kernel's operand views are
/// 16-byte aligned single matrices). Without a record the result is `select`'s.
pub fn select_tuned(
    name: &str,
    p: &GemmProblem,
    epi: &Epilogue,
    sku: &Sku,
    tma_aligned: bool,
    schedules: Option<&GpuSchedules>,
) -> Result<TensorCoreGemm, GpuError> {
    let base = select(name, p, epi, sku);
    let Some(s) = schedules else { return base };
    if p.output != MmaOutput::F32 {
        return base;
    }
    let template = match &base {
        Ok(TensorCoreGemm::Wgmma(_)) if tma_aligned => GpuTemplate::Wgmma {
            m: p.m,
            n: p.n,
            k: p.k,
            input: p.input,
            epi: *epi,
        },
        Ok(_) => GpuTemplate::Mma { p: *p, epi: *epi },
        Err(_) => return base,
    };
    let Some(t) = GpuTunable::new(template, sku) else {
        return base;
    };
    let (c, used) = s.choose(&t);
    if !used {
        return base;
    }
    Ok(match t.template {
        GpuTemplate::Wgmma { input, .. } => TensorCoreGemm::Wgmma(gemm_wgmma(
            name,
            input,
            MmaOutput::F32,
            epi,
            &wgmma_schedule(&c),
        )?),
        _ => TensorCoreGemm::Mma(gemm_mma(
            name,
            p.input,
            MmaOutput::F32,
            epi,
            &mma_schedule(&c),
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::DeviceDb;

    #[test]
    fn defaults_are_todays_schedules_and_configs_round_trip() {
        let db = DeviceDb::builtin().unwrap();
        let h100 = db.parse_target("cuda:h100").unwrap();
        let t = GpuTunable::new(
            GpuTemplate::GemmF32 {
                m: 64,
                n: 96,
                k: 32,
            },
            h100,
        )
        .unwrap();
        assert_eq!(gemm_f32_schedule(&t.default), GpuGemmSchedule::default());
        assert!(t.space.contains(&t.default));
        let p = GemmProblem {
            m: 128,
            n: 768,
            k: 768,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            input: MmaInput::F16,
            output: MmaOutput::F32,
        };
        let bias = Epilogue {
            bias: true,
            ..Epilogue::none()
        };
        let t = GpuTunable::new(GpuTemplate::Mma { p, epi: bias }, h100).unwrap();
        // Bias-only descriptions keep their form (records written before epilogues count).
        assert!(t.label().ends_with(" bias=1"), "{}", t.label());
        assert_eq!(mma_schedule(&t.default), MmaSchedule::default());
        assert_eq!(mma_config(&mma_schedule(&t.default)), t.default);
        // An over-sized shared-memory schedule is refused by the check.
        let big = mma_config(&MmaSchedule {
            bm: 256,
            bn: 256,
            bk: 64,
            wm: 4,
            wn: 4,
            stages: 5,
            ..MmaSchedule::default()
        });
        let e = t.check(&big).unwrap_err();
        assert!(e.contains("shared memory"), "{e}");
        // Descriptions parse back to their task.
        let conv = GpuTemplate::Conv {
            geom: ConvGeom {
                n: 1,
                c: 3,
                h: 9,
                w: 7,
                oc: 8,
                kh: 3,
                kw: 3,
                stride: [2, 1],
                pads: [1, 1, 0, 1],
                dilation: [1, 1],
            },
            epi: ConvEpilogue {
                bias: true,
                residual: false,
                relu: true,
            },
        };
        let wg = GpuTemplate::Wgmma {
            m: 16,
            n: 64,
            k: 64,
            input: MmaInput::BF16,
            epi: Epilogue {
                bias: true,
                activation: Activation::GeluTanh,
                residual: Residual::AfterActivation,
            },
        };
        let tf = GpuTemplate::Mma {
            p: GemmProblem {
                input: MmaInput::TF32,
                batch: 4,
                stride_a: 128 * 768,
                ..p
            },
            epi: Epilogue::none(),
        };
        let relu_res = GpuTemplate::Mma {
            p,
            epi: Epilogue {
                bias: false,
                activation: Activation::Relu,
                residual: Residual::BeforeActivation,
            },
        };
        let conv_mma = match &conv {
            GpuTemplate::Conv { geom, epi } => GpuTemplate::ConvMma {
                geom: *geom,
                epi: *epi,
                input: MmaInput::BF16,
            },
            _ => unreachable!(),
        };
        for tpl in [
            GpuTemplate::GemmF32 { m: 3, n: 5, k: 7 },
            tf,
            wg,
            conv,
            relu_res,
            conv_mma,
        ] {
            let t = GpuTunable::new(tpl.clone(), h100).unwrap();
            let back = GpuTunable::from_description(t.label(), h100).unwrap();
            assert_eq!(back.template, tpl);
            assert_eq!(back.default, t.default);
        }
        assert!(GpuTunable::from_description("matmul f32 m=1", h100).is_none());
        assert!(GpuTunable::from_description("gpu_gemm_f32 m=1 n=2", h100).is_none());
    }
}
