//! Fusion: the partitions of the zoo models (after BN folding) verify, are snapshot-tested,
//! and running them kernel by kernel gives the graph's outputs; hand-made graphs check the
//! cycle rule and the one-kernel decomposed LayerNorm.

mod common;

use common::{assert_close, load_zoo, random_f32, ZOO};
use kiln_ir::ops::array::ArrayOp;
use kiln_ir::ops::elementwise::{ElementwiseOp, UnaryKind};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::{interp, DType, Fact, Graph, Node, Op, Shape};
use kiln_passes::fold_batchnorm::fold_all;
use kiln_passes::fusion::{partition, run_kernels, KernelKind};
use rand::SeedableRng;

#[test]
fn zoo_partitions() {
    for name in ZOO {
        let (mut g, inputs) = load_zoo(name, 11);
        fold_all(&mut g);
        let p = partition(&g);
        p.verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
        println!("fusion summary: {}", p.summary(&g));
        insta::assert_snapshot!(
            format!("partition_{name}"),
            format!("{}\n{}", p.summary(&g), p.display(&g))
        );
        let want = interp::run(&g, &inputs).unwrap();
        let got = run_kernels(&g, &p, &inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_close(name, &got, &want, 1e-6);
        // the plan is stored in the artifact
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            serde_json::from_str::<kiln_passes::Partition>(&json).unwrap(),
            p
        );
    }
}

#[test]
fn decomposed_layernorm_is_one_reduction_kernel() {
    let (mut g, _) = load_zoo("bert", 1);
    fold_all(&mut g);
    let p = partition(&g);
    let want = [
        "ReduceMean",
        "Sub",
        "Pow",
        "ReduceMean",
        "Add",
        "Sqrt",
        "Div",
        "Mul",
        "Add",
    ];
    let found = p.kernels.iter().any(|k| {
        let ops: Vec<&str> = k.nodes.iter().map(|&n| g.nodes[n].op.op_type()).collect();
        k.kind == KernelKind::Reduction && ops.windows(want.len()).any(|w| w == want)
    });
    assert!(
        found,
        "no kernel holds the decomposed LayerNorm:\n{}",
        p.display(&g)
    );
}

fn node(name: &str, op: Op, inputs: &[usize], outputs: &[usize]) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|&i| Some(i)).collect(),
        outputs: outputs.to_vec(),
    }
}

/// a = Relu(x); t = Transpose(a); b = Add(a, t): fusing `a` and `b` would make a cycle
/// through the Transpose kernel, so they stay apart; `c = Exp(b)` joins `b`.
#[test]
fn fusion_never_creates_a_cycle() {
    let mut g = Graph {
        name: "cycle".into(),
        opset: 17,
        ..Default::default()
    };
    let f = || Fact::new(DType::F32, Shape::unknown(2));
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[4, 4])));
    let (a, t, b, c) = (
        g.add_value("a", f()),
        g.add_value("t", f()),
        g.add_value("b", f()),
        g.add_value("c", f()),
    );
    g.inputs.push(x);
    g.nodes = vec![
        node(
            "relu",
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)),
            &[x],
            &[a],
        ),
        node(
            "tr",
            Op::Array(ArrayOp::Transpose { perm: None }),
            &[a],
            &[t],
        ),
        node(
            "add",
            Op::Elementwise(ElementwiseOp::Binary(
                kiln_ir::ops::elementwise::BinaryKind::Add,
            )),
            &[a, t],
            &[b],
        ),
        node(
            "exp",
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Exp)),
            &[b],
            &[c],
        ),
    ];
    g.outputs.push(c);
    g.infer().unwrap();
    let p = partition(&g);
    p.verify(&g).unwrap();
    let text = p.display(&g).to_string();
    assert_eq!(
        text,
        "k0 Elementwise [Relu] (%x) -> (%a)\n\
         k1 DataMovement [Transpose] (%a) -> (%t)\n\
         k2 Elementwise [Add, Exp] (%a, %t) -> (%c)\n"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let x = random_f32(&[4, 4], &mut rng);
    assert_close(
        "cycle",
        &run_kernels(&g, &p, std::slice::from_ref(&x)).unwrap(),
        &interp::run(&g, &[x]).unwrap(),
        0.0,
    );
}

/// MatMul + bias Add + residual Add + Relu is one Contraction kernel; an intermediate used
/// later (the residual sum) becomes a kernel output.
#[test]
fn contraction_epilogue_and_intermediate_outputs() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut g = Graph {
        name: "epi".into(),
        opset: 17,
        ..Default::default()
    };
    let f = || Fact::new(DType::F32, Shape::unknown(2));
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(&[3, 5])));
    g.inputs.push(x);
    let w = g.add_const("w", random_f32(&[5, 5], &mut rng));
    let bias = g.add_const("bias", random_f32(&[5], &mut rng));
    let (y, z, r, o, o2) = (
        g.add_value("y", f()),
        g.add_value("z", f()),
        g.add_value("r", f()),
        g.add_value("o", f()),
        g.add_value("o2", f()),
    );
    use kiln_ir::ops::elementwise::BinaryKind::{Add, Mul};
    let bin = |k| Op::Elementwise(ElementwiseOp::Binary(k));
    g.nodes = vec![
        node("mm", Op::Linalg(LinalgOp::MatMul), &[x, w], &[y]),
        node("bias", bin(Add), &[bias, y], &[z]),
        node("res", bin(Add), &[z, x], &[r]),
        node(
            "relu",
            Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)),
            &[r],
            &[o],
        ),
        node("mm2", Op::Linalg(LinalgOp::MatMul), &[o, w], &[o2]),
    ];
    // r is also used by a later kernel
    let out = g.add_value("out", f());
    g.nodes.push(node("mul", bin(Mul), &[o2, r], &[out]));
    g.outputs.push(out);
    g.infer().unwrap();
    let p = partition(&g);
    p.verify(&g).unwrap();
    assert_eq!(
        p.display(&g).to_string(),
        "k0 Contraction [MatMul, Add, Add, Relu] (%x, %w, %bias) -> (%r, %o)\n\
         k1 Contraction [MatMul, Mul] (%o, %w, %r) -> (%out)\n"
    );
}
