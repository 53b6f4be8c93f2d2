//! The joint algebraic + tensor-parallel e-graph search (`parallel::joint`): the plans it
//! reads off its extraction are Megatron's where that pays, none where the link is too
//! slow, and every plan runs (lowered to per-rank programs, exchanged in memory) to the
//! interpreter's output on random weights.

mod common;

use common::{assert_close, random_f32};
use kiln_ir::{DType, Fact, Graph, Node, Op, Shape, Tensor, ValueId};
use kiln_passes::eqsat::cost::Device;
use kiln_passes::eqsat::EqsatOptions;
use kiln_passes::parallel::cluster::{Link, LinkKind};
use kiln_passes::parallel::inprocess::run_in_process;
use kiln_passes::parallel::joint::check::check_egraph;
use kiln_passes::parallel::joint::{optimize, JointOptions, JointResult};
use kiln_passes::parallel::lower::lower;
use kiln_passes::parallel::models::{transformer, TransformerConfig};
use kiln_passes::parallel::SplitKind;
use rand::rngs::StdRng;
use rand::SeedableRng;

fn opts(k: usize, device: Device, link: LinkKind) -> JointOptions {
    JointOptions {
        k,
        device,
        link: Link::of(link),
        eqsat: EqsatOptions::default(),
    }
}

/// Replaces every float constant by random values (the synthetic models have zeros).
fn randomize(g: &mut Graph, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for v in &mut g.values {
        if let Some(t) = &v.fact.value {
            if t.dtype() == DType::F32 && t.len() > 1 {
                let r = random_f32(t.shape(), &mut rng);
                let scaled: Vec<f32> = r.to_f64_vec().iter().map(|x| *x as f32 * 0.2).collect();
                v.fact.value = Some(std::sync::Arc::new(Tensor::from_vec(t.shape(), scaled)));
            }
        }
    }
}

fn mlp(rows: usize, hidden: usize, inner: usize) -> Graph {
    let mut g = Graph {
        name: "mlp".into(),
        opset: 17,
        ..Default::default()
    };
    let f = |d: &[usize]| Fact::new(DType::F32, Shape::known(d));
    let x = g.add_value("x", f(&[rows, hidden]));
    g.inputs.push(x);
    let w1 = g.add_const("w1", Tensor::zeros(DType::F32, &[hidden, inner]));
    let b1 = g.add_const("b1", Tensor::zeros(DType::F32, &[inner]));
    let w2 = g.add_const("w2", Tensor::zeros(DType::F32, &[inner, hidden]));
    let b2 = g.add_const("b2", Tensor::zeros(DType::F32, &[hidden]));
    let node = |g: &mut Graph, name: &str, ty: &str, ins: &[ValueId], d: &[usize]| {
        let o = g.add_value(format!("{name}_out"), f(d));
        let op = Op::from_onnx(&kiln_ir::ops::OnnxNode::new(
            ty,
            17,
            &[],
            vec![true; ins.len()],
            1,
        ))
        .unwrap()
        .unwrap();
        g.nodes.push(Node {
            name: name.into(),
            op,
            inputs: ins.iter().map(|&i| Some(i)).collect(),
            outputs: vec![o],
        });
        o
    };
    let h = node(&mut g, "mm1", "MatMul", &[x, w1], &[rows, inner]);
    let h = node(&mut g, "add1", "Add", &[h, b1], &[rows, inner]);
    let h = node(&mut g, "relu", "Relu", &[h], &[rows, inner]);
    let h = node(&mut g, "mm2", "MatMul", &[h, w2], &[rows, hidden]);
    let y = node(&mut g, "add2", "Add", &[h, b2], &[rows, hidden]);
    g.outputs.push(y);
    randomize(&mut g, 1);
    g
}

/// Runs the result's plan over `k` ranks in one process and compares with the
/// interpreter on the input graph.
fn check_runs(what: &str, g: &Graph, r: &JointResult, k: usize, seed: u64) {
    let plan = r.plan(k);
    plan.validate(r.graph.nodes.len()).unwrap();
    let progs = lower(&r.graph, &plan).unwrap_or_else(|e| panic!("{what}: lower: {e}"));
    let mut rng = StdRng::seed_from_u64(seed);
    let inputs: Vec<Tensor> = g
        .inputs
        .iter()
        .map(|&i| random_f32(&g.values[i].fact.shape.as_known().unwrap(), &mut rng))
        .collect();
    let expected = kiln_ir::interp::run(g, &inputs).unwrap();
    let got = run_in_process(&progs, &inputs, |_, _, sg, ins| {
        kiln_ir::interp::run(sg, ins).map_err(|e| e.to_string())
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_close(what, &got, &expected, 1e-4);
}

/// The plan predicts a lockstep time below `frac` of one device's.
fn assert_faster(r: &JointResult, frac: f64) {
    assert!(
        r.cost_us < frac * r.single_us,
        "{} vs {}",
        r.cost_us,
        r.single_us
    );
}

fn kinds(r: &JointResult) -> Vec<SplitKind> {
    r.splits.iter().map(|s| s.kind).collect()
}

#[test]
fn mlp_gets_column_then_row_with_one_all_reduce() {
    let g = mlp(64, 256, 1024);
    let r = optimize(&g, &opts(2, Device::cpu(), LinkKind::Shm)).unwrap();
    assert_eq!(kinds(&r), vec![SplitKind::Column, SplitKind::Row], "{r:?}");
    assert_eq!(r.collectives, (0, 1), "one all-reduce, no gather");
    assert_faster(&r, 0.7);
    check_runs("mlp k=2", &g, &r, 2, 3);
    let r4 = optimize(&g, &opts(4, Device::cpu(), LinkKind::Shm)).unwrap();
    assert_eq!(kinds(&r4), vec![SplitKind::Column, SplitKind::Row]);
    check_runs("mlp k=4", &g, &r4, 4, 4);
}

#[test]
fn slow_link_keeps_the_model_on_one_device() {
    let g = mlp(4, 64, 128);
    let r = optimize(&g, &opts(2, Device::cpu(), LinkKind::Ethernet)).unwrap();
    assert!(r.splits.is_empty(), "{:?}", r.splits);
    assert_eq!(r.collectives, (0, 0));
    assert!((r.cost_us - r.single_us).abs() < 1e-6 * r.single_us);
}

fn small_transformer(causal: bool) -> Graph {
    let mut g = transformer(&TransformerConfig {
        name: "t".into(),
        batch: 2,
        seq: 32,
        hidden: 256,
        heads: 4,
        ffn: 1024,
        layers: 1,
        causal,
    });
    randomize(&mut g, 7);
    g
}

#[test]
fn transformer_block_rediscovers_megatron_in_the_egraph() {
    for causal in [false, true] {
        let g = small_transformer(causal);
        let r = optimize(&g, &opts(2, Device::cpu(), LinkKind::Shm)).unwrap();
        // the weights each split reads, by name
        let split_of = |w: &str| {
            r.splits.iter().find_map(|s| {
                let wv = r.graph.nodes[s.node].inputs[1].unwrap();
                (r.graph.values[wv].name == w).then_some(s.kind)
            })
        };
        let l = "layer.0";
        for (w, want) in [
            (format!("{l}.attention.query.weight"), SplitKind::Column),
            (format!("{l}.attention.key.weight"), SplitKind::Column),
            (format!("{l}.attention.value.weight"), SplitKind::Column),
            (format!("{l}.mlp.up.weight"), SplitKind::Column),
            (format!("{l}.mlp.down.weight"), SplitKind::Row),
        ] {
            assert_eq!(
                split_of(&w),
                Some(want),
                "causal {causal}: {w}: {:?} {:?}",
                r.splits,
                r.collective_list
            );
        }
        // heads stay on their ranks through the attention: no collective over the scores
        assert!(
            r.collective_list.iter().all(|c| !c.ends_with(",32,32]")),
            "{:?}",
            r.collective_list
        );
        assert_faster(&r, 0.75);
        check_runs(&format!("transformer causal={causal}"), &g, &r, 2, 11);
    }
}

/// BERT-base on 8 H100s (NVLink): time of the joint search and what it finds
/// (`cargo test --release -p kiln-passes --test parallel_joint -- --ignored --nocapture`).
#[test]
#[ignore]
fn bench_joint_bert_base() {
    use kiln_passes::parallel::cluster::DeviceSpec;
    let g = transformer(&TransformerConfig::bert_base(1));
    let h100 = DeviceSpec {
        name: "h100".into(),
        peak_gflops_f32: 67_000.0,
        peak_gflops_f16: 989_000.0,
        bandwidth_gbs: 3350.0,
        launch_us: 4.0,
        memory_bytes: 80e9,
        is_cpu: false,
        parallel_units: 132.0,
        tile_elems: 4096.0,
    };
    for k in [2, 4, 8] {
        let mut o = opts(
            k,
            kiln_passes::parallel::sim::device_of(&h100, &g),
            LinkKind::Nvlink,
        );
        o.eqsat.fold_limit = 1 << 16;
        let r = optimize(&g, &o).unwrap();
        println!(
            "k={k}: {:.2}s, e-graph {} nodes {:?}, cost {:.1} us vs single {:.1} us, {} splits, collectives {:?}",
            r.seconds,
            r.egraph_nodes,
            r.stop_reasons,
            r.cost_us,
            r.single_us,
            r.splits.len(),
            r.collectives
        );
        println!("  rules {:?}", r.rules_applied);
    }
}

fn random_inputs(g: &Graph, seed: u64) -> Vec<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    g.inputs
        .iter()
        .map(|&i| random_f32(&g.values[i].fact.shape.as_known().unwrap(), &mut rng))
        .collect()
}

/// The soundness property of every parallel rule: in the saturated joint e-graph, each
/// e-node (replicated or on parts, evaluated rank by rank) gives its class's value.
#[test]
fn every_enode_of_the_joint_egraph_computes_its_class_value() {
    let mut used: std::collections::BTreeSet<String> = Default::default();
    let cases: Vec<(&str, Graph, usize)> = vec![
        ("mlp", mlp(8, 32, 64), 2),
        ("mlp", mlp(8, 48, 96), 3),
        ("bert block", small_transformer(false), 2),
        ("gpt block", small_transformer(true), 4),
    ];
    for (what, g, k) in cases {
        let r = check_egraph(
            &g,
            &opts(k, Device::cpu(), LinkKind::Shm),
            &random_inputs(&g, 5),
        )
        .unwrap_or_else(|e| panic!("{what} k={k}: {e}"));
        assert!(r.part_nodes > 10, "{what}: {r:?}");
        used.extend(r.rules_applied.into_iter().map(|(n, _)| n));
    }
    for rule in [
        "tp-column",
        "tp-row",
        "tp-sink-add-l",
        "tp-sink-reshape",
        "tp-sink-transpose",
        "tp-sink-matmul-2",
        "tp-sink-op",
        "tp-sink-relu",
        "tp-sink-div-l",
    ] {
        assert!(used.contains(rule), "{rule} never applied: {used:?}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(8))]
    /// Random MLP shapes and group sizes: the e-graph stays sound.
    #[test]
    fn joint_egraph_is_sound_on_random_mlps(
        k in 2usize..5,
        rows in 1usize..6,
        h in 1usize..4,
        f in 1usize..4,
        seed in 0u64..1000,
    ) {
        let g = mlp(rows, h * k * 4, f * k * 8);
        let r = check_egraph(&g, &opts(k, Device::cpu(), LinkKind::Shm), &random_inputs(&g, seed));
        proptest::prop_assert!(r.is_ok(), "{:?}", r.err());
    }
}

/// A CNN: the convolutions are split by output channels (Column) and input channels (Row)
/// in the e-graph; the plan runs; every e-node of the e-graph is sound.
#[test]
fn cnn_convs_are_split_by_channels() {
    let mut g = kiln_passes::parallel::models::small_cnn(1);
    randomize(&mut g, 9);
    let o = opts(2, Device::cpu(), LinkKind::Shm);
    let r = optimize(&g, &o).unwrap();
    let conv_splits: Vec<SplitKind> = r
        .splits
        .iter()
        .filter(|s| r.graph.nodes[s.node].op.op_type() == "Conv")
        .map(|s| s.kind)
        .collect();
    assert!(
        conv_splits.contains(&SplitKind::Column) && conv_splits.contains(&SplitKind::Row),
        "{:?} {:?}",
        r.splits,
        r.collective_list
    );
    println!(
        "small cnn: {conv_splits:?}, {:?}, cost {:.0} vs {:.0} us",
        r.collective_list, r.cost_us, r.single_us
    );
    assert_faster(&r, 0.7);
    check_runs("small cnn k=2", &g, &r, 2, 13);
    let c = check_egraph(&g, &o, &random_inputs(&g, 2)).unwrap();
    let used: Vec<&str> = c.rules_applied.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        used.contains(&"tp-column-conv") && used.contains(&"tp-row-conv"),
        "{used:?}"
    );
}
