//! Recognition of the attention pattern across partition kernels: a contraction
//! `S = epilogue(Q · Kᵀ)` (scale by a constant scalar, then an additive mask or a `Where`
//! with a constant condition), a lone last-axis `Softmax` over `S`, and a contraction
//! `O = P · V` without epilogue, where `S` and `P` are used by nothing else.
//!
//! Each match says whether the flash-attention kernels
//! ([`attention`](crate::gpu::kernels::attention::attention),
//! [`attention_f16_mma`](crate::gpu::kernels::attention_mma::attention_f16_mma)) could take
//! it, and if not, why. Fusion itself is not done yet: every pattern of the zoo models has
//! at least one reason (see [`AttentionPattern::unfused`]), so the three kernels keep their
//! own launches and the compile summary lists the reasons.

use super::shape_of;
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::ops::nn::NnOp;
use kiln_ir::{Graph, Op, ValueId};
use kiln_passes::fusion::{KernelKind, Partition};

/// One attention pattern of a partition.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPattern {
    /// The partition kernels `[scores, softmax, output]`.
    pub kernels: [usize; 3],
    /// Head dimension `D`.
    pub head_dim: usize,
    /// The mask: `none`, `causal` (a constant lower triangle) or what it is.
    pub mask: String,
    /// Why the flash-attention kernels cannot take it (empty: they could).
    pub unfused: Vec<String>,
    /// The fused launch replacing the three kernels ([`row_attention`]), when the pattern
    /// allows it; `None` with the reason in [`AttentionPattern::not_fused`].
    pub fused: Option<Fused>,
    /// Why [`row_attention`] does not take it either.
    pub not_fused: Option<String>,
}

/// The operands of a fused attention launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    /// Shapes and score epilogue.
    pub spec: RowAttention,
    /// `Q [.., sq, d]`.
    pub q: ValueId,
    /// `Kᵀ [.., d, skv]`.
    pub kt: ValueId,
    /// `V [.., skv, d]`.
    pub v: ValueId,
    /// The additive mask, if any.
    pub mask: Option<ValueId>,
    /// `O [.., sq, d]` (the P·V kernel's output).
    pub out: ValueId,
}

/// Kernels that read `v`.
fn users(p: &Partition, v: ValueId) -> Vec<usize> {
    p.kernels
        .iter()
        .enumerate()
        .filter(|(_, k)| k.inputs.contains(&v))
        .map(|(i, _)| i)
        .collect()
}

/// The lone MatMul of a contraction kernel and its epilogue nodes.
fn matmul_of(g: &Graph, p: &Partition, k: usize) -> Option<(usize, Vec<usize>)> {
    let kn = &p.kernels[k];
    if kn.kind != KernelKind::Contraction {
        return None;
    }
    let mm = *kn.nodes.first()?;
    matches!(g.nodes[mm].op, Op::Linalg(LinalgOp::MatMul)).then(|| (mm, kn.nodes[1..].to_vec()))
}

/// Whether constant `c` (bool, `[.., S, S]`) is the lower triangle `j <= i`.
fn lower_triangle(g: &Graph, c: ValueId) -> bool {
    let (Some(t), Ok(s)) = (g.const_value(c), shape_of(g, c)) else {
        return false;
    };
    if s.len() < 2 {
        return false;
    }
    let (r, cols) = (s[s.len() - 2], s[s.len() - 1]);
    let v = t.to_f64_vec();
    v.iter().enumerate().all(|(i, &x)| {
        let (row, col) = ((i / cols) % r, i % cols);
        (x != 0.0) == (col <= row)
    })
}

/// Whether constant `c` (`[.., S, S]`) is 0 on and below the diagonal and at most -1e30
/// above it (a causal mask added to the scores, as equality saturation rewrites `Where`).
fn causal_additive(g: &Graph, c: ValueId) -> bool {
    let (Some(t), Ok(s)) = (g.const_value(c), shape_of(g, c)) else {
        return false;
    };
    if s.len() < 2 {
        return false;
    }
    let (r, cols) = (s[s.len() - 2], s[s.len() - 1]);
    t.to_f64_vec().iter().enumerate().all(|(i, &x)| {
        let (row, col) = ((i / cols) % r, i % cols);
        if col <= row {
            x == 0.0
        } else {
            x <= -1e30
        }
    })
}

/// Every attention pattern of `p` (see the module doc).
pub fn find_patterns(g: &Graph, p: &Partition) -> Vec<AttentionPattern> {
    let mut found = Vec::new();
    for a in 0..p.kernels.len() {
        let Some((mm, epi)) = matmul_of(g, p, a) else {
            continue;
        };
        let ka = &p.kernels[a];
        let [scores] = ka.outputs[..] else { continue };
        let [s] = users(p, scores)[..] else { continue };
        let ks = &p.kernels[s];
        let is_softmax = ks.nodes.len() == 1
            && matches!(g.nodes[ks.nodes[0]].op, Op::Nn(NnOp::Softmax(_)))
            && ks.inputs == [scores];
        let [probs] = ks.outputs[..] else { continue };
        if !is_softmax || g.outputs.contains(&scores) || g.outputs.contains(&probs) {
            continue;
        }
        let [b] = users(p, probs)[..] else { continue };
        let Some((mm2, epi2)) = matmul_of(g, p, b) else {
            continue;
        };
        if g.nodes[mm2].inputs.first().copied().flatten() != Some(probs) {
            continue;
        }
        let (Some(Some(q)), Some(Some(kt))) = (
            g.nodes[mm].inputs.first().copied(),
            g.nodes[mm].inputs.get(1).copied(),
        ) else {
            continue;
        };
        let (Ok(qs), Ok(kts)) = (shape_of(g, q), shape_of(g, kt)) else {
            continue;
        };
        let d = qs.last().copied().unwrap_or(0);
        let mut unfused = Vec::new();
        if d % 32 != 0 {
            unfused.push(format!(
                "head dim {d} (the f32 flash kernel takes multiples of 32)"
            ));
        }
        if kts.len() >= 2 {
            unfused.push(format!(
                "K enters as Kᵀ {kts:?} (the kernels read K as [.., Skv, D])"
            ));
        }
        // The scores epilogue: scale, then mask.
        let mut mask = "none".to_string();
        let mut cur = g.nodes[mm].outputs[0];
        let mut steps: Vec<ScoreStep> = Vec::new();
        let mut mask_v = None;
        let mut steps_ok = true;
        let scalar = |v: ValueId| -> Option<f32> {
            let t = g.const_value(v)?;
            let x = t.to_f64_vec();
            (x.len() == 1).then(|| x[0] as f32)
        };
        for &n in &epi {
            let node = &g.nodes[n];
            let ins: Vec<ValueId> = node.inputs.iter().flatten().copied().collect();
            match &node.op {
                Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Div | BinaryKind::Mul))
                    if ins.iter().any(|&v| {
                        g.const_value(v).is_some()
                            && shape_of(g, v).is_ok_and(|s| s.iter().product::<usize>() == 1)
                    }) =>
                {
                    let other = ins.iter().copied().find(|&v| v != cur);
                    let c = other.and_then(scalar);
                    match (&node.op, c, ins.first() == Some(&cur)) {
                        (
                            Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Div)),
                            Some(c),
                            true,
                        ) => steps.push(ScoreStep::Div(c)),
                        (Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Mul)), Some(c), _) => {
                            steps.push(ScoreStep::Mul(c))
                        }
                        _ => steps_ok = false,
                    }
                }
                Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add))
                    if ins
                        .iter()
                        .find(|&&v| v != cur)
                        .is_some_and(|&m| causal_additive(g, m)) =>
                {
                    mask = "causal".into();
                    mask_v = ins.iter().copied().find(|&v| v != cur);
                    steps.push(ScoreStep::AddMask);
                }
                Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add)) => {
                    let m = ins.iter().find(|&&v| v != cur);
                    mask_v = m.copied();
                    steps.push(ScoreStep::AddMask);
                    let sh = m.and_then(|&v| shape_of(g, v).ok()).unwrap_or_default();
                    mask = format!("additive {sh:?}");
                    unfused.push(format!(
                        "additive mask {sh:?} (the kernels take none or causal)"
                    ));
                }
                Op::Elementwise(ElementwiseOp::Where)
                    if ins.len() == 3
                        && lower_triangle(g, ins[0])
                        && g.const_value(ins[2])
                            .is_some_and(|t| t.to_f64_vec().iter().all(|&x| x <= -1e30)) =>
                {
                    mask = "causal".into();
                    match (ins[1] == cur, scalar(ins[2])) {
                        (true, Some(fill)) => steps.push(ScoreStep::Causal(fill)),
                        _ => steps_ok = false,
                    }
                }
                other => {
                    mask = other.op_type().to_string();
                    unfused.push(format!("score epilogue op {}", other.op_type()));
                    steps_ok = false;
                }
            }
            cur = node.outputs[0];
        }
        if !epi2.is_empty() {
            unfused.push("P·V has an epilogue".into());
        }
        if b != s + 1 || s != a + 1 {
            unfused.push("the three kernels are not consecutive".into());
        }
        let v = g.nodes[mm2].inputs.get(1).copied().flatten();
        let o = g.nodes[mm2].outputs[0];
        let plan = fuse_plan(g, (q, kt, v, mask_v, o), steps, steps_ok && epi2.is_empty())
            .and_then(|f| {
                if b == s + 1 && s == a + 1 {
                    Ok(f)
                } else {
                    Err("the three kernels are not consecutive".into())
                }
            });
        let (fused, not_fused) = match plan {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(e)),
        };
        found.push(AttentionPattern {
            kernels: [a, s, b],
            head_dim: d,
            mask,
            unfused,
            fused,
            not_fused,
        });
    }
    found
}

/// The fused launch for Q, Kᵀ, V, mask, O, if [`row_attention`] takes them: f32, the same
/// batch dims everywhere (no broadcasting but the mask's), D ≤ 64.
fn fuse_plan(
    g: &Graph,
    (q, kt, v, mask, o): (ValueId, ValueId, Option<ValueId>, Option<ValueId>, ValueId),
    steps: Vec<ScoreStep>,
    ok: bool,
) -> Result<Fused, String> {
    if !ok {
        return Err("a score epilogue other than scale, mask, causal Where".into());
    }
    let v = v.ok_or("P·V without V")?;
    for x in [Some(q), Some(kt), Some(v), mask, Some(o)]
        .into_iter()
        .flatten()
    {
        if g.values[x].fact.dtype != kiln_ir::DType::F32 {
            return Err("not f32".into());
        }
    }
    let (qs, ks, vs, os) = (
        shape_of(g, q)?,
        shape_of(g, kt)?,
        shape_of(g, v)?,
        shape_of(g, o)?,
    );
    let r = qs.len();
    if r < 3 || ks.len() != r || vs.len() != r || os.len() != r {
        return Err("Q, Kᵀ, V, O of different ranks".into());
    }
    let batch = qs[..r - 2].to_vec();
    let (sq, d, skv) = (qs[r - 2], qs[r - 1], ks[r - 1]);
    if ks[..r - 2] != batch[..] || vs[..r - 2] != batch[..] || os[..r - 2] != batch[..] {
        return Err("broadcast batch dims".into());
    }
    if ks[r - 2] != d || vs[r - 2] != skv || vs[r - 1] != d || os[r - 1] != d || os[r - 2] != sq {
        return Err("shapes do not match".into());
    }
    if d == 0 || d > 64 || skv == 0 || sq == 0 {
        return Err(format!(
            "head dim {d} (the row kernel keeps ≤ 64 in registers)"
        ));
    }
    let mut mask_strides = Vec::new();
    if let Some(m) = mask {
        // Right-aligned to the scores [batch.., sq, skv]; broadcast dims stride 0.
        let ms = shape_of(g, m)?;
        if ms.len() > r {
            return Err("mask of higher rank".into());
        }
        let full: Vec<usize> = batch.iter().copied().chain([sq, skv]).collect();
        let st = super::generic::row_major(&ms);
        let off = r - ms.len();
        mask_strides = vec![0i64; r];
        for (j, &dim) in ms.iter().enumerate() {
            if dim == full[j + off] && dim != 1 {
                mask_strides[j + off] = st[j];
            } else if dim != 1 {
                return Err(format!("mask {ms:?} does not broadcast"));
            }
        }
    }
    Ok(Fused {
        spec: RowAttention {
            bh: batch.iter().product(),
            sq,
            skv,
            d,
            steps,
            batch,
            mask_strides,
        },
        q,
        kt,
        v,
        mask,
        out: o,
    })
}

/// Lowers a fused pattern at the position of its P·V kernel (`index`): the scores and
/// softmax kernels (just before it) were skipped, so nothing has overwritten Q, Kᵀ and the
/// mask since they were produced, but the memory plan may have placed O over them (they
/// are dead after the scores kernel): the row kernel writes O into the scratch region and a
/// copy moves it into O's buffer.
pub(crate) fn lower_fused(
    g: &Graph,
    f: &Fused,
    index: usize,
    name: &str,
    opts: &super::LowerOptions,
    out: &mut super::GpuLowering,
) -> Result<(), String> {
    use super::{HostKernel, Launch, LaunchArg, Operand};
    let numel = |v: ValueId| -> Result<u64, String> {
        Ok(shape_of(g, v)?.iter().product::<usize>() as u64)
    };
    let buf = |operand: Operand, len: u64| LaunchArg::Buf {
        operand,
        offset: 0,
        len,
        elem_bytes: 4,
    };
    let kname = format!("{name}_attention");
    let mut sched = RowAttentionSchedule::default();
    if let (Some(sku), Some(src)) = (&opts.sku, &opts.schedules) {
        let t = crate::gpu::tuning::GpuTemplate::RowAttention(f.spec.clone());
        if let Some(t) = crate::gpu::tuning::GpuTunable::new(t, sku) {
            sched = crate::gpu::tuning::row_attention_schedule(&src.choose(&t).0);
        }
    }
    let kern = row_attention(&kname, &f.spec, &sched);
    let n_out = numel(f.out)?;
    let mut args = vec![
        buf(Operand::Value(f.q), numel(f.q)?),
        buf(Operand::Value(f.kt), numel(f.kt)?),
        buf(Operand::Value(f.v), numel(f.v)?),
    ];
    if let Some(m) = f.mask {
        args.push(buf(Operand::Value(m), numel(m)?));
    }
    args.push(buf(Operand::Scratch(0), n_out));
    let rows = (f.spec.bh * f.spec.sq) as u64;
    let launch = Launch {
        index,
        kernel: String::new(),
        args,
        grid: sched.grid(rows),
        block: kern.block,
        shared_bytes: 0,
        generic: false,
    };
    out.host
        .push((kname.clone(), HostKernel::Attention(f.spec.clone())));
    out.push_special(launch, kern)?;
    let copy = copy_kernel();
    let launch = Launch {
        index,
        kernel: String::new(),
        args: vec![
            buf(Operand::Scratch(0), n_out),
            buf(Operand::Value(f.out), n_out),
            LaunchArg::Index(n_out as i64),
        ],
        grid: [
            crate::gpu::kernels::blocks_for(n_out, 256, u64::from(opts.max_blocks)),
            1,
            1,
        ],
        block: copy.block,
        shared_bytes: 0,
        generic: false,
    };
    out.note_host(&copy.name, HostKernel::Copy);
    out.push_special(launch, copy)?;
    out.scratch_bytes = out.scratch_bytes.max(n_out.div_ceil(16) * 64);
    Ok(())
}

/// `kiln_copy_f32(x, y: memref<?xf32>, n: index)`: `y[i] = x[i]`, grid-stride, 256 threads.
pub fn copy_kernel() -> crate::gpu::GpuKernel {
    let mut k = super::precision::cast_kernel(crate::gpu::kernels::gemm_mma::MmaInput::F16);
    k.name = "kiln_copy_f32".into();
    k.mlir = k
        .mlir
        .replace("@kiln_cast_f32_f16", "@kiln_copy_f32")
        .replace("memref<?xf16>", "memref<?xf32>")
        .replace("      %r = arith.truncf %v : f32 to f16\n", "")
        .replace("memref.store %r,", "memref.store %v,");
    k.params[1] = crate::gpu::KernelParam::Buffer {
        name: "y".into(),
        elem: crate::gpu::Elem::F32,
    };
    k
}

/// What the scores epilogue does to `s = Q·Kᵀ`, in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreStep {
    /// `s / c`.
    Div(f32),
    /// `s · c`.
    Mul(f32),
    /// `s + mask[...]` (the mask buffer, broadcast to the scores).
    AddMask,
    /// `s` where key `j ≤` query `i`, else `fill` (`Where` with a constant lower triangle).
    Causal(f32),
}

/// A fused attention launch: [`row_attention`]'s static shapes and epilogue.
#[derive(Debug, Clone, PartialEq)]
pub struct RowAttention {
    /// Batch·heads.
    pub bh: usize,
    /// Query rows.
    pub sq: usize,
    /// Keys.
    pub skv: usize,
    /// Head dimension.
    pub d: usize,
    /// The scores epilogue.
    pub steps: Vec<ScoreStep>,
    /// Batch dims of the scores (their product is `bh`).
    pub batch: Vec<usize>,
    /// Mask strides (elements) along the batch dims, the query and the key axis (0 where
    /// the mask broadcasts); empty without a mask.
    pub mask_strides: Vec<i64>,
}

impl RowAttention {
    /// Element offset of `mask[bh, i, j]`.
    pub fn mask_offset(&self, bh: usize, i: usize, j: usize) -> usize {
        let nb = self.batch.len();
        let (mut rest, mut off) = (bh, 0i64);
        for a in (0..nb).rev() {
            off += (rest % self.batch[a]) as i64 * self.mask_strides[a];
            rest /= self.batch[a];
        }
        (off + i as i64 * self.mask_strides[nb] + j as i64 * self.mask_strides[nb + 1]) as usize
    }

    /// The kernel's semantics on the host (the same online softmax in f32): `q [bh·sq·d]`,
    /// `kt [bh·d·skv]`, `v [bh·skv·d]`, `mask`, `o [bh·sq·d]`.
    pub fn eval(&self, q: &[f32], kt: &[f32], v: &[f32], mask: &[f32], o: &mut [f32]) {
        let (sq, skv, d) = (self.sq, self.skv, self.d);
        for t in 0..self.bh * sq {
            let (bh, i) = (t / sq, t % sq);
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            let mut acc = vec![0f32; d];
            for j in 0..skv {
                let mut s = 0f32;
                for dd in 0..d {
                    s += q[t * d + dd] * kt[bh * d * skv + dd * skv + j];
                }
                for st in &self.steps {
                    s = match *st {
                        ScoreStep::Div(c) => s / c,
                        ScoreStep::Mul(c) => s * c,
                        ScoreStep::AddMask => s + mask[self.mask_offset(bh, i, j)],
                        ScoreStep::Causal(fill) => {
                            if j <= i {
                                s
                            } else {
                                fill
                            }
                        }
                    };
                }
                let mn = m.max(s);
                let c = (m - mn).exp();
                let p = (s - mn).exp();
                l = l * c + p;
                for (dd, a) in acc.iter_mut().enumerate() {
                    *a = *a * c + p * v[bh * skv * d + j * d + dd];
                }
                m = mn;
            }
            for (dd, a) in acc.iter().enumerate() {
                o[t * d + dd] = a / l;
            }
        }
    }
}

/// Threads per block of [`row_attention`]'s default schedule.
pub const ROW_BLOCK: u32 = 128;

/// The tunable parameters of [`row_attention`] (task `gpu_row_attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowAttentionSchedule {
    /// Threads per block: 32, 64, 128 or 256.
    pub block: u32,
    /// Threads per query row: 1, 2, 4 or 8. Each takes every `kv_split`-th key; the lanes
    /// of a row then combine their running max, sum and output by `gpu.shuffle xor`. More
    /// threads for the same work: what fills the GPU when `bh · sq` rows are few.
    pub kv_split: u32,
}

impl Default for RowAttentionSchedule {
    /// 128 threads, one per row (the kernel before tuning).
    fn default() -> Self {
        Self {
            block: ROW_BLOCK,
            kv_split: 1,
        }
    }
}

impl RowAttentionSchedule {
    /// The parameters and their legal values.
    pub fn space() -> Vec<(&'static str, Vec<u32>)> {
        vec![
            ("block", vec![32, 64, 128, 256]),
            ("kv_split", vec![1, 2, 4, 8]),
        ]
    }

    /// Checks the values against the SKU's threads per block.
    pub fn validate(&self, sku: &crate::gpu::Sku) -> Result<(), crate::gpu::GpuError> {
        let bad = |why: String| Err(crate::gpu::GpuError::Schedule(format!("{self:?}: {why}")));
        if ![32, 64, 128, 256].contains(&self.block) {
            return bad("block must be 32, 64, 128 or 256".into());
        }
        if ![1, 2, 4, 8].contains(&self.kv_split) {
            return bad("kv_split must be 1, 2, 4 or 8".into());
        }
        if self.block > sku.max_threads_per_block {
            return bad(format!("{} threads per block on {}", self.block, sku.name));
        }
        Ok(())
    }

    /// Grid `(ceil(rows · kv_split / block), 1, 1)`.
    pub fn grid(&self, rows: u64) -> [u32; 3] {
        let threads = rows.saturating_mul(u64::from(self.kv_split));
        [
            crate::gpu::kernels::blocks_for(threads, u64::from(self.block), u64::from(u32::MAX)),
            1,
            1,
        ]
    }
}

fn f32c(x: f32) -> String {
    format!("0x{:08X}", x.to_bits())
}

/// `name(Q, Kt, V[, mask], O: memref<?xf32>)`: `kv_split` threads per query row
/// (`bh·sq·kv_split` threads, `block` per block, see [`RowAttentionSchedule`]) compute
/// `O[row] = softmax(steps(q·Kᵀ)) · V` with an online softmax (running max and sum, `exp`
/// rescale), never materialising the scores; with `kv_split > 1` each thread takes every
/// `kv_split`-th key and the row's lanes merge their `(max, sum, O)` by butterfly shuffles
/// (threads past the last row compute a clamped row so that every lane shuffles, and do not
/// store). Shapes are compiled in; `Kt` is `[bh, d, skv]` as the graph's MatMul reads it.
pub fn row_attention(
    name: &str,
    a: &RowAttention,
    sch: &RowAttentionSchedule,
) -> crate::gpu::GpuKernel {
    use crate::gpu::{Elem, GpuKernel, KernelParam};
    use std::fmt::Write as _;
    let (sq, skv, d) = (a.sq, a.skv, a.d);
    let (block, split) = (sch.block, sch.kv_split.max(1));
    let has_mask = a.steps.contains(&ScoreStep::AddMask);
    let mut w = String::new();
    let mut n = 0usize;
    let mut fresh = || {
        n += 1;
        format!("%a{n}")
    };
    let ty = "memref<?xf32>";
    let mask_param = if has_mask {
        format!(", %mask: {ty}")
    } else {
        String::new()
    };
    let _ = writeln!(
        w,
        "  gpu.func @{name}(%q: {ty}, %kt: {ty}, %v: {ty}{mask_param}, %o: {ty}) kernel attributes {{known_block_size = array<i32: {block}, 1, 1>}} {{"
    );
    let mut line = |s: String| {
        w.push_str("    ");
        w.push_str(&s);
        w.push('\n');
    };
    line("%bid = gpu.block_id x".into());
    line("%tid = gpu.thread_id x".into());
    line(format!("%cblk = arith.constant {block} : index"));
    line("%t0 = arith.muli %bid, %cblk : index".into());
    line(format!("%rows = arith.constant {} : index", a.bh * sq));
    if split == 1 {
        line("%t = arith.addi %t0, %tid : index".into());
        line("%in = arith.cmpi ult, %t, %rows : index".into());
        line("scf.if %in {".into());
    } else {
        // `%t`: this thread's row, clamped so that threads past the end still shuffle
        line("%g = arith.addi %t0, %tid : index".into());
        line(format!("%csplit = arith.constant {split} : index"));
        line("%tu = arith.divui %g, %csplit : index".into());
        line("%part = arith.remui %g, %csplit : index".into());
        line("%in = arith.cmpi ult, %tu, %rows : index".into());
        line(format!(
            "%rlast = arith.constant {} : index",
            (a.bh * sq).saturating_sub(1)
        ));
        line("%t = arith.minui %tu, %rlast : index".into());
    }
    line("%c0 = arith.constant 0 : index".into());
    line("%c1 = arith.constant 1 : index".into());
    line(format!("%csq = arith.constant {sq} : index"));
    line(format!("%cskv = arith.constant {skv} : index"));
    line(format!("%cd = arith.constant {d} : index"));
    line("%bh = arith.divui %t, %csq : index".into());
    line("%i = arith.remui %t, %csq : index".into());
    line("%qb = arith.muli %t, %cd : index".into());
    line(format!("%ckb = arith.constant {} : index", d * skv));
    line("%kb = arith.muli %bh, %ckb : index".into());
    line("%vb = arith.muli %bh, %ckb : index".into());
    line(format!(
        "%ninf = arith.constant {} : f32",
        f32c(f32::NEG_INFINITY)
    ));
    line(format!("%zero = arith.constant {} : f32", f32c(0.0)));
    // Mask row base: batch offsets + i · stride_q.
    if has_mask {
        let nb = a.batch.len();
        line("%mb0 = arith.constant 0 : index".into());
        let mut rest = "%bh".to_string();
        let mut acc = "%mb0".to_string();
        for ax in (0..nb).rev() {
            let (dim, st) = (a.batch[ax], a.mask_strides[ax]);
            line(format!("%mdim{ax} = arith.constant {dim} : index"));
            line(format!("%mi{ax} = arith.remui {rest}, %mdim{ax} : index"));
            line(format!("%mr{ax} = arith.divui {rest}, %mdim{ax} : index"));
            line(format!("%mst{ax} = arith.constant {st} : index"));
            line(format!("%mo{ax} = arith.muli %mi{ax}, %mst{ax} : index"));
            line(format!("%ma{ax} = arith.addi {acc}, %mo{ax} : index"));
            rest = format!("%mr{ax}");
            acc = format!("%ma{ax}");
        }
        line(format!(
            "%msq = arith.constant {} : index",
            a.mask_strides[nb]
        ));
        line("%mqi = arith.muli %i, %msq : index".into());
        line(format!("%mrow = arith.addi {acc}, %mqi : index"));
        line(format!(
            "%msk = arith.constant {} : index",
            a.mask_strides[nb + 1]
        ));
    }
    // The query row in registers.
    for dd in 0..d {
        line(format!("%cq{dd} = arith.constant {dd} : index"));
        line(format!("%qo{dd} = arith.addi %qb, %cq{dd} : index"));
    }
    for dd in 0..d {
        line(format!("%q{dd} = memref.load %q[%qo{dd}] : {ty}"));
    }
    let iters: Vec<String> = (0..d).map(|dd| format!("%o{dd} = %zero")).collect();
    let tys = vec!["f32"; d + 2].join(", ");
    let (first, step) = if split == 1 {
        ("%c0", "%c1")
    } else {
        ("%part", "%csplit")
    };
    line(format!(
        "%r:{} = scf.for %j = {first} to %cskv step {step} iter_args(%m = %ninf, %l = %zero, {}) -> ({tys}) {{",
        d + 2,
        iters.join(", ")
    ));
    // s = q · Kt[:, j]
    let mut s = "%zero".to_string();
    for dd in 0..d {
        let (ko, kd, kx, pr, sn) = (fresh(), fresh(), fresh(), fresh(), fresh());
        line(format!("{ko} = arith.constant {} : index", dd * skv));
        line(format!("{kd} = arith.addi %kb, {ko} : index"));
        line(format!("{kx} = arith.addi {kd}, %j : index"));
        let kv = fresh();
        line(format!("{kv} = memref.load %kt[{kx}] : {ty}"));
        line(format!("{pr} = arith.mulf %q{dd}, {kv} : f32"));
        line(format!("{sn} = arith.addf {s}, {pr} : f32"));
        s = sn;
    }
    for st in &a.steps {
        let r = fresh();
        match *st {
            ScoreStep::Div(c) => {
                let cc = fresh();
                line(format!("{cc} = arith.constant {} : f32", f32c(c)));
                line(format!("{r} = arith.divf {s}, {cc} : f32"));
            }
            ScoreStep::Mul(c) => {
                let cc = fresh();
                line(format!("{cc} = arith.constant {} : f32", f32c(c)));
                line(format!("{r} = arith.mulf {s}, {cc} : f32"));
            }
            ScoreStep::AddMask => {
                let (mj, mx, mv) = (fresh(), fresh(), fresh());
                line(format!("{mj} = arith.muli %j, %msk : index"));
                line(format!("{mx} = arith.addi %mrow, {mj} : index"));
                line(format!("{mv} = memref.load %mask[{mx}] : {ty}"));
                line(format!("{r} = arith.addf {s}, {mv} : f32"));
            }
            ScoreStep::Causal(fill) => {
                let (cf, ok) = (fresh(), fresh());
                line(format!("{cf} = arith.constant {} : f32", f32c(fill)));
                line(format!("{ok} = arith.cmpi ule, %j, %i : index"));
                line(format!("{r} = arith.select {ok}, {s}, {cf} : f32"));
            }
        }
        s = r;
    }
    let (mn, dm, c, ds, p, lc, l2) = (
        fresh(),
        fresh(),
        fresh(),
        fresh(),
        fresh(),
        fresh(),
        fresh(),
    );
    line(format!("{mn} = arith.maximumf %m, {s} : f32"));
    line(format!("{dm} = arith.subf %m, {mn} : f32"));
    line(format!("{c} = math.exp {dm} : f32"));
    line(format!("{ds} = arith.subf {s}, {mn} : f32"));
    line(format!("{p} = math.exp {ds} : f32"));
    line(format!("{lc} = arith.mulf %l, {c} : f32"));
    line(format!("{l2} = arith.addf {lc}, {p} : f32"));
    let (jd, vrow) = (fresh(), fresh());
    line(format!("{jd} = arith.muli %j, %cd : index"));
    line(format!("{vrow} = arith.addi %vb, {jd} : index"));
    let mut outs = vec![mn.clone(), l2.clone()];
    for dd in 0..d {
        let (vx, vv, oc, pv, on) = (fresh(), fresh(), fresh(), fresh(), fresh());
        line(format!("{vx} = arith.addi {vrow}, %cq{dd} : index"));
        line(format!("{vv} = memref.load %v[{vx}] : {ty}"));
        line(format!("{oc} = arith.mulf %o{dd}, {c} : f32"));
        line(format!("{pv} = arith.mulf {p}, {vv} : f32"));
        line(format!("{on} = arith.addf {oc}, {pv} : f32"));
        outs.push(on);
    }
    line(format!("scf.yield {} : {tys}", outs.join(", ")));
    line("}".into());
    let mut m = "%r#0".to_string();
    let mut l = "%r#1".to_string();
    let mut o: Vec<String> = (0..d).map(|dd| format!("%r#{}", dd + 2)).collect();
    if split > 1 {
        // merge the lanes of a row: (m, l, o) ⊕ (m', l', o') with the larger max
        line("%cw = arith.constant 32 : i32".into());
        let mut off = 1;
        while off < split {
            let co = fresh();
            line(format!("{co} = arith.constant {off} : i32"));
            let mut shuf = |v: &str| {
                let (x, ok) = (fresh(), fresh());
                line(format!("{x}, {ok} = gpu.shuffle xor {v}, {co}, %cw : f32"));
                x
            };
            let xm = shuf(&m);
            let xl = shuf(&l);
            let xo: Vec<String> = o.iter().map(|v| shuf(v)).collect();
            let mn = fresh();
            line(format!("{mn} = arith.maximumf {m}, {xm} : f32"));
            // exp(m - mn), or 0 for a lane that saw no key (m = -inf)
            let mut scale = |mv: &str| {
                let (df, e, inf, c) = (fresh(), fresh(), fresh(), fresh());
                line(format!("{df} = arith.subf {mv}, {mn} : f32"));
                line(format!("{e} = math.exp {df} : f32"));
                line(format!("{inf} = arith.cmpf oeq, {mv}, %ninf : f32"));
                line(format!("{c} = arith.select {inf}, %zero, {e} : f32"));
                c
            };
            let c1 = scale(&m);
            let c2 = scale(&xm);
            let mut merge = |a: &str, b: &str| {
                let (x, y, z) = (fresh(), fresh(), fresh());
                line(format!("{x} = arith.mulf {a}, {c1} : f32"));
                line(format!("{y} = arith.mulf {b}, {c2} : f32"));
                line(format!("{z} = arith.addf {x}, {y} : f32"));
                z
            };
            l = merge(&l, &xl);
            o = o.iter().zip(&xo).map(|(a, b)| merge(a, b)).collect();
            m = mn;
            off *= 2;
        }
        line("%p0 = arith.cmpi eq, %part, %c0 : index".into());
        line("%store = arith.andi %in, %p0 : i1".into());
        line("scf.if %store {".into());
    }
    for (dd, ov) in o.iter().enumerate() {
        let r = fresh();
        line(format!("{r} = arith.divf {ov}, {l} : f32"));
        line(format!("memref.store {r}, %o[%qo{dd}] : {ty}"));
    }
    line("}".into());
    line("gpu.return".into());
    w.push_str("  }\n");
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    let mut params = vec![buf("q"), buf("kt"), buf("v")];
    if has_mask {
        params.push(buf("mask"));
    }
    params.push(buf("o"));
    GpuKernel {
        name: name.to_string(),
        mlir: w,
        params,
        block: [block, 1, 1],
        shared_bytes: 0,
        requires: vec![],
    }
}
