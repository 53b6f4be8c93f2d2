//! Memory planning: zoo models and random DAGs get plans that verify, and executing the
//! kernels with every intermediate value read from and written to its arena slot (views
//! reading their root's bytes, in-place outputs overwriting their input, elided concats not
//! run at all) reproduces the reference interpreter's outputs.

mod common;

use common::{assert_close, load_zoo, random_f32, ZOO};
use kiln_ir::ops::array::{ArrayOp, IntsArg};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, UnaryKind};
use kiln_ir::{interp, DType, Fact, Graph, Node, Op, Shape, Tensor};
use kiln_passes::fold_batchnorm::fold_all;
use kiln_passes::fusion::{partition, KernelKind, Partition};
use kiln_passes::memory::{plan_memory, MemoryPlan, ALIGNMENT};
use proptest::prelude::*;
use rand::SeedableRng;

/// Little-endian bytes of a tensor (the dtypes the tests use).
fn encode(t: &Tensor) -> Vec<u8> {
    match t.dtype() {
        DType::F32 => t
            .to_f64_vec()
            .iter()
            .flat_map(|&x| (x as f32).to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_f64_vec()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_i64_vec()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I32 => t
            .to_i64_vec()
            .iter()
            .flat_map(|&x| (x as i32).to_le_bytes())
            .collect(),
        DType::Bool => t.to_i64_vec().iter().map(|&x| x as u8).collect(),
        d => panic!("encode: unsupported dtype {d}"),
    }
}

/// The tensor stored in `b`.
fn decode(dtype: DType, shape: &[usize], b: &[u8]) -> Tensor {
    match dtype {
        DType::F32 => Tensor::from_vec(
            shape,
            b.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        DType::F64 => Tensor::from_vec(
            shape,
            b.chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        DType::I64 => Tensor::from_vec(
            shape,
            b.chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        DType::I32 => Tensor::from_vec(
            shape,
            b.chunks(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        DType::Bool => Tensor::from_vec(shape, b.iter().map(|&x| x != 0).collect::<Vec<bool>>()),
        d => panic!("decode: unsupported dtype {d}"),
    }
}

/// Runs the partitioned graph with the plan's arena as the only storage of intermediates.
fn run_in_arena(g: &Graph, p: &Partition, plan: &MemoryPlan, inputs: &[Tensor]) -> Vec<Tensor> {
    let prod = g.producers();
    let mut arena = vec![0xAAu8; plan.arena_bytes];
    let mut env: Vec<Option<Tensor>> = g.values.iter().map(|v| v.fact.value().cloned()).collect();
    for (v, e) in env.iter_mut().enumerate() {
        if prod[v].is_some() {
            *e = None;
        }
    }
    for (&id, t) in g.inputs.iter().zip(inputs) {
        env[id] = Some(t.clone());
    }
    let read = |v: usize, arena: &[u8], env: &[Option<Tensor>]| -> Tensor {
        let f = &g.values[v].fact;
        let shape = f.shape.as_known().unwrap();
        if let Some(s) = plan.slots[v] {
            return decode(f.dtype, &shape, &arena[s.offset..s.offset + s.size]);
        }
        if let Some(r) = plan.alias_of[v] {
            return env[r]
                .as_ref()
                .expect("root computed")
                .reshape(&shape)
                .unwrap();
        }
        env[v]
            .clone()
            .unwrap_or_else(|| panic!("'{}' not computed", g.values[v].name))
    };
    for (ki, k) in p.kernels.iter().enumerate() {
        // views need no work; an elided concat's parts were written in place by their
        // producers
        if k.kind == KernelKind::Alias || plan.elided.contains(&ki) {
            continue;
        }
        let mut sub = Graph {
            name: k.name.clone(),
            opset: g.opset,
            values: g.values.clone(),
            nodes: k.nodes.iter().map(|&n| g.nodes[n].clone()).collect(),
            inputs: vec![],
            outputs: k.outputs.clone(),
        };
        let mut args = vec![];
        for &v in &k.inputs {
            if prod[v].is_none() && g.values[v].fact.value.is_some() {
                continue;
            }
            sub.values[v].fact.value = None;
            sub.inputs.push(v);
            args.push(read(v, &arena, &env));
        }
        let outs = interp::run(&sub, &args).unwrap();
        for (&v, t) in k.outputs.iter().zip(outs) {
            match plan.slots[v] {
                Some(s) => arena[s.offset..s.offset + s.size].copy_from_slice(&encode(&t)),
                None => env[v] = Some(t),
            }
        }
    }
    g.outputs.iter().map(|&o| read(o, &arena, &env)).collect()
}

/// Sum of the aligned sizes of the buffers: what planning without reuse would need.
fn aligned_total(plan: &MemoryPlan) -> usize {
    plan.buffers
        .iter()
        .map(|b| b.size.div_ceil(ALIGNMENT) * ALIGNMENT)
        .sum()
}

#[test]
fn zoo_memory_plans() {
    for name in ZOO {
        let (mut g, inputs) = load_zoo(name, 5);
        fold_all(&mut g);
        let p = partition(&g);
        let plan = plan_memory(&g, &p).unwrap();
        plan.verify(&g, &p)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        println!("memory {name}: {}", plan.summary());
        assert!(plan.arena_bytes >= plan.largest_bytes, "{name}");
        assert!(plan.arena_bytes <= aligned_total(&plan), "{name}");
        let want = interp::run(&g, &inputs).unwrap();
        let got = run_in_arena(&g, &p, &plan, &inputs);
        assert_close(name, &got, &want, 0.0);
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<MemoryPlan>(&json).unwrap(), plan);
    }
}

#[test]
fn symbolic_shapes_are_rejected() {
    let g = kiln_ir::onnx::load(common::zoo_dir("bert").join("model.onnx")).unwrap();
    let p = partition(&g);
    let err = plan_memory(&g, &p).unwrap_err();
    assert!(err.contains("specialise"), "{err}");
}

/// A random DAG of rank-1 f32 values: Relu, Neg, Add (same sizes), Concat, Reshape (view),
/// Slice.
fn random_graph(sizes: &[usize], ops: &[(u8, u16, u16)], extra_outputs: &[u16]) -> Graph {
    let mut g = Graph {
        name: "random".into(),
        opset: 17,
        ..Default::default()
    };
    let mut vals: Vec<(usize, usize)> = Vec::new(); // (value id, size)
    for (i, &s) in sizes.iter().enumerate() {
        let v = g.add_value(format!("in{i}"), Fact::new(DType::F32, Shape::known(&[s])));
        g.inputs.push(v);
        vals.push((v, s));
    }
    let flat = g.add_const("flat", Tensor::vec_i64(&[-1]));
    let mut used = vec![false; 0];
    for (i, &(op, a, b)) in ops.iter().enumerate() {
        let (va, sa) = vals[a as usize % vals.len()];
        let (vb, sb) = vals[b as usize % vals.len()];
        let (op, inputs, size) = match op % 6 {
            // a slice at offset 0, 4 or 16 elements (64-byte aligned or not), to the end or
            // 4 elements short of it
            5 if sa > 4 => {
                let start = [0, 4, 16][b as usize % 3].min(sa - 4);
                let end = if b & 4 != 0 { sa - 4 } else { sa }.max(start + 1);
                let st = g.add_const(format!("s{i}"), Tensor::vec_i64(&[start as i64]));
                let en = g.add_const(format!("e{i}"), Tensor::vec_i64(&[end as i64]));
                (
                    Op::Array(ArrayOp::Slice {
                        starts: IntsArg::Input(1),
                        ends: IntsArg::Input(2),
                        axes: IntsArg::Default,
                        steps: IntsArg::Default,
                    }),
                    vec![va, st, en],
                    end - start,
                )
            }
            0 => (
                Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)),
                vec![va],
                sa,
            ),
            1 => (
                Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Neg)),
                vec![va],
                sa,
            ),
            2 if sa == sb => (
                Op::Elementwise(ElementwiseOp::Binary(BinaryKind::Add)),
                vec![va, vb],
                sa,
            ),
            4 => (
                Op::Array(ArrayOp::Reshape {
                    shape: IntsArg::Input(1),
                    allowzero: false,
                }),
                vec![va, flat],
                sa,
            ),
            _ if sa + sb <= 256 => (
                Op::Array(ArrayOp::Concat { axis: 0 }),
                vec![va, vb],
                sa + sb,
            ),
            _ => (
                Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu)),
                vec![vb],
                sb,
            ),
        };
        let out = g.add_value(format!("v{i}"), Fact::new(DType::F32, Shape::unknown(1)));
        used.resize(g.values.len(), false);
        for &x in &inputs {
            used[x] = true;
        }
        g.nodes.push(Node {
            name: format!("n{i}"),
            op,
            inputs: inputs.into_iter().map(Some).collect(),
            outputs: vec![out],
        });
        vals.push((out, size));
    }
    used.resize(g.values.len(), false);
    for n in &g.nodes {
        if !used[n.outputs[0]] {
            g.outputs.push(n.outputs[0]);
        }
    }
    for &e in extra_outputs {
        let n = &g.nodes[e as usize % g.nodes.len()];
        if !g.outputs.contains(&n.outputs[0]) {
            g.outputs.push(n.outputs[0]);
        }
    }
    g.infer().unwrap();
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_dags_plan_without_overlap(
        sizes in prop::collection::vec(prop::sample::select(vec![4usize, 8, 16, 20]), 1..3),
        ops in prop::collection::vec((0u8..6, any::<u16>(), any::<u16>()), 1..30),
        extra in prop::collection::vec(any::<u16>(), 0..3),
        seed in any::<u64>(),
    ) {
        let g = random_graph(&sizes, &ops, &extra);
        kiln_ir::verify::verify(&g).unwrap();
        let p = partition(&g);
        p.verify(&g).map_err(TestCaseError::fail)?;
        let plan = plan_memory(&g, &p).map_err(TestCaseError::fail)?;
        plan.verify(&g, &p).map_err(TestCaseError::fail)?;
        prop_assert!(plan.arena_bytes <= aligned_total(&plan));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let inputs: Vec<Tensor> = sizes.iter().map(|&s| random_f32(&[s], &mut rng)).collect();
        let want = interp::run(&g, &inputs).unwrap();
        let got = run_in_arena(&g, &p, &plan, &inputs);
        prop_assert_eq!(got, want);
    }
}

/// An opset-17 graph with one f32 input `x` of `shape`.
fn one_input_graph(name: &str, shape: &[usize]) -> (Graph, usize) {
    let mut g = Graph {
        name: name.into(),
        opset: 17,
        ..Default::default()
    };
    let x = g.add_value("x", Fact::new(DType::F32, Shape::known(shape)));
    g.inputs.push(x);
    (g, x)
}

/// Appends a one-output node of rank-2 f32 result named `name`; returns its output.
fn node(g: &mut Graph, op: Op, ins: Vec<usize>, name: &str) -> usize {
    let v = g.add_value(name, Fact::new(DType::F32, Shape::unknown(2)));
    g.nodes.push(Node {
        name: name.into(),
        op,
        inputs: ins.into_iter().map(Some).collect(),
        outputs: vec![v],
    });
    v
}

/// A batch-1 channel concat of two kernels' outputs is elided: both parts sit inside the
/// output's buffer (the second 64-byte aligned at the first's size), the concat runs no
/// step, and the result equals the interpreter's. A concat along an axis after a dimension
/// of size > 1 (parts not contiguous) and one with a misaligned part are not elided.
#[test]
fn contiguous_concats_are_elided() {
    let build = |shape: [usize; 2], axis: i64| {
        let (mut g, x) = one_input_graph("cat", &shape);
        let relu = Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu));
        let neg = Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Neg));
        let a = node(&mut g, relu.clone(), vec![x], "a");
        let b = node(&mut g, neg, vec![x], "b");
        let c = node(&mut g, Op::Array(ArrayOp::Concat { axis }), vec![a, b], "c");
        let y = node(&mut g, relu, vec![c], "y");
        g.outputs.push(y);
        g.infer().unwrap();
        g
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for (shape, axis, elide) in [
        ([1usize, 48], 1i64, true), // 192-byte parts: aligned
        ([1, 20], 1, false),        // 80-byte first part: misaligned second part
        ([4, 16], 1, false),        // rows > 1 before the axis: parts interleave
        ([4, 16], 0, true),         // axis 0: contiguous
    ] {
        let g = build(shape, axis);
        let p = partition(&g);
        let plan = plan_memory(&g, &p).unwrap();
        plan.verify(&g, &p).unwrap();
        let concat = p
            .kernels
            .iter()
            .position(|k| g.nodes[k.nodes[0]].op.op_type() == "Concat")
            .unwrap();
        assert_eq!(
            plan.elided.contains(&concat),
            elide,
            "{shape:?} axis {axis}"
        );
        if elide {
            let c = p.kernels[concat].outputs[0];
            let out = plan.slots[c].unwrap();
            let parts: Vec<_> = g.nodes[p.kernels[concat].nodes[0]]
                .inputs
                .iter()
                .map(|v| plan.slots[v.unwrap()].unwrap())
                .collect();
            assert_eq!(parts[0].offset, out.offset);
            assert_eq!(parts[1].offset, out.offset + parts[0].size);
            assert!(parts.iter().all(|s| s.buffer == out.buffer));
        }
        let x = random_f32(&shape, &mut rng);
        let want = interp::run(&g, std::slice::from_ref(&x)).unwrap();
        let got = run_in_arena(&g, &p, &plan, &[x]);
        assert_eq!(got, want, "{shape:?} axis {axis}");
    }
}

/// A slice that is one contiguous, 64-byte aligned range of a kernel's output is elided: its
/// output is placed inside the input's buffer at the range's offset, the input's buffer
/// lives until the slice's last reader, and the results equal the interpreter's. A
/// misaligned range, a column range of a matrix with several rows and a strided slice are
/// copied as before.
#[test]
fn contiguous_slices_are_elided() {
    let build = |shape: [usize; 2], axis: i64, start: i64, end: i64, step: i64| {
        let (mut g, x) = one_input_graph("slice", &shape);
        let relu = Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Relu));
        let neg = Op::Elementwise(ElementwiseOp::Unary(UnaryKind::Neg));
        let a = node(&mut g, relu.clone(), vec![x], "a");
        let lists = [start, end, axis, step].map(|v| Tensor::vec_i64(&[v]));
        let [st, en, ax, sp] = ["st", "en", "ax", "sp"];
        let ins: Vec<usize> = [st, en, ax, sp]
            .iter()
            .zip(lists)
            .map(|(n, t)| g.add_const(*n, t))
            .collect();
        let slice = Op::Array(ArrayOp::Slice {
            starts: IntsArg::Input(1),
            ends: IntsArg::Input(2),
            axes: IntsArg::Input(3),
            steps: IntsArg::Input(4),
        });
        let s = node(&mut g, slice, [vec![a], ins].concat(), "s");
        // `a` is read again after the slice's reader, by a kernel that could work in place
        let y = node(&mut g, neg, vec![s], "y");
        let z = node(&mut g, relu, vec![a], "z");
        g.outputs.extend([y, z]);
        g.infer().unwrap();
        g
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (shape, axis, start, end, step, elide) in [
        ([1usize, 64], 1i64, 16i64, 48i64, 1i64, true), // bytes 64..192 of the row
        ([1, 64], -1, -16, 64, 1, true),                // negative start: the last 16
        ([1, 64], 1, 4, 20, 1, false),                  // 16-byte offset: misaligned
        ([4, 16], 1, 0, 8, 1, false),                   // columns of 4 rows: interleaved
        ([4, 16], 0, 1, 3, 1, true),                    // rows 1..3: contiguous
        ([1, 64], 1, 0, 64, 2, false),                  // strided
    ] {
        let g = build(shape, axis, start, end, step);
        let p = partition(&g);
        let plan = plan_memory(&g, &p).unwrap();
        plan.verify(&g, &p).unwrap();
        let k = p
            .kernels
            .iter()
            .position(|k| g.nodes[k.nodes[0]].op.op_type() == "Slice")
            .unwrap();
        let case = format!("{shape:?} axis {axis} {start}..{end} step {step}");
        assert_eq!(plan.elided.contains(&k), elide, "{case}");
        let a = g.nodes[p.kernels[k].nodes[0]].inputs[0].unwrap();
        let (sa, ss) = (
            plan.slots[a].unwrap(),
            plan.slots[p.kernels[k].outputs[0]].unwrap(),
        );
        assert_eq!(sa.buffer == ss.buffer, elide, "{case}");
        if elide {
            assert!(ss.offset > sa.offset && ss.offset + ss.size <= sa.offset + sa.size);
            assert!(plan.in_place.is_empty(), "{case}: {:?}", plan.in_place);
        }
        let x = random_f32(&shape, &mut rng);
        let want = interp::run(&g, std::slice::from_ref(&x)).unwrap();
        let got = run_in_arena(&g, &p, &plan, &[x]);
        assert_eq!(got, want, "{case}");
    }
}
