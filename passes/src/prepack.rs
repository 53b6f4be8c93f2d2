//! Weight layout changes done once at compile time instead of on every run.
//!
//! [`pretranspose_gemm_weights`]: a `Gemm` with `transB = 1` (PyTorch's `Linear` export) and
//! a constant `B` gets `Bᵀ` stored as a new constant and `transB = 0`, so the kernel never
//! transposes the weight at run time. Same for a constant `A` with `transA = 1`.

use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::{Graph, Op, Tensor};

/// Replaces constant transposed `Gemm` operands by their transposes (see the module doc);
/// returns how many operands were rewritten.
pub fn pretranspose_gemm_weights(g: &mut Graph) -> usize {
    let mut done = 0;
    for ni in 0..g.nodes.len() {
        let Op::Linalg(LinalgOp::Gemm(gm)) = &g.nodes[ni].op else {
            continue;
        };
        let gm = gm.clone();
        for (slot, trans) in [(0, gm.trans_a), (1, gm.trans_b)] {
            let Some(v) = g.nodes[ni].inputs.get(slot).copied().flatten() else {
                continue;
            };
            let Some(Tensor::F32(w)) = g.const_value(v) else {
                continue;
            };
            if !trans || w.ndim() != 2 {
                continue;
            }
            let t = Tensor::F32(w.t().as_standard_layout().into_owned().into_dyn());
            let name = format!("{}.T", g.values[v].name);
            let nv = g.add_const(name, t);
            let node = &mut g.nodes[ni];
            node.inputs[slot] = Some(nv);
            if let Op::Linalg(LinalgOp::Gemm(gm)) = &mut node.op {
                if slot == 0 {
                    gm.trans_a = false;
                } else {
                    gm.trans_b = false;
                }
            }
            done += 1;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::ops::linalg::Gemm;
    use kiln_ir::{interp, DType, Fact, Node, Shape};

    #[test]
    fn transposed_constant_b_is_stored_transposed_and_results_agree() {
        let mut g = Graph {
            name: "gemm".into(),
            opset: 17,
            ..Default::default()
        };
        let a = g.add_value("a", Fact::new(DType::F32, Shape::known(&[3, 4])));
        g.inputs.push(a);
        let w: Vec<f32> = (0..20).map(|i| i as f32 * 0.25 - 2.0).collect();
        let b = g.add_const(
            "w",
            Tensor::F32(ndarray::ArrayD::from_shape_vec(vec![5, 4], w).unwrap()),
        );
        let y = g.add_value("y", Fact::new(DType::F32, Shape::known(&[3, 5])));
        let gemm = Gemm {
            alpha: 0.5,
            beta: 1.0,
            trans_a: false,
            trans_b: true,
        };
        g.nodes.push(Node {
            name: "gemm".into(),
            op: Op::Linalg(LinalgOp::Gemm(gemm)),
            inputs: vec![Some(a), Some(b)],
            outputs: vec![y],
        });
        g.outputs.push(y);
        let x: Vec<f32> = (0..12).map(|i| (i as f32).sin()).collect();
        let input = Tensor::F32(ndarray::ArrayD::from_shape_vec(vec![3, 4], x).unwrap());
        let before = interp::run(&g, std::slice::from_ref(&input)).unwrap();
        assert_eq!(pretranspose_gemm_weights(&mut g), 1);
        let Op::Linalg(LinalgOp::Gemm(gm)) = &g.nodes[0].op else {
            panic!("not a Gemm")
        };
        assert!(!gm.trans_b);
        let wt = g.const_value(g.nodes[0].inputs[1].unwrap()).unwrap();
        assert_eq!(wt.shape(), &[4, 5]);
        kiln_ir::verify::verify(&g).unwrap();
        let after = interp::run(&g, &[input]).unwrap();
        assert_eq!(after, before);
    }
}
