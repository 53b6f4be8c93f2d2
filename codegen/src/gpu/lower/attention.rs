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
        for &n in &epi {
            let node = &g.nodes[n];
            let ins: Vec<ValueId> = node.inputs.iter().flatten().copied().collect();
            match &node.op {
                Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Div | BinaryKind::Mul))
                    if ins.iter().any(|&v| {
                        g.const_value(v).is_some()
                            && shape_of(g, v).is_ok_and(|s| s.iter().product::<usize>() == 1)
                    }) => {}
                Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add))
                    if ins
                        .iter()
                        .find(|&&v| v != cur)
                        .is_some_and(|&m| causal_additive(g, m)) =>
                {
                    mask = "causal".into();
                }
                Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add)) => {
                    let m = ins.iter().find(|&&v| v != cur);
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
                }
                other => {
                    mask = other.op_type().to_string();
                    unfused.push(format!("score epilogue op {}", other.op_type()));
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
        found.push(AttentionPattern {
            kernels: [a, s, b],
            head_dim: d,
            mask,
            unfused,
        });
    }
    found
}
