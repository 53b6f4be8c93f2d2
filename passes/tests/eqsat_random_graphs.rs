//! Whole random graphs through `eqsat::optimize`: the per-rule property tests
//! (`eqsat_rules.rs`) check each rewrite alone; here many rules interact in one e-graph,
//! and the extracted graph (greedy, DAG-aware and ILP extractors, under cost models that
//! favour different rewrites) must compute what the input graph computes on random inputs
//! (reference interpreter), keep its input/output names, and never cost more.
//!
//! Two families: products of matrices (MatMul chains, shared inputs, parallel projections,
//! transposes, concat/slice/split, reshapes, elementwise ops with broadcasting) and
//! convolution cells (1×1/3×3/grouped Convs sharing inputs, pools, BatchNorm, channel
//! concat/slice). Weights are graph inputs in some cases, constants in others (then
//! weight-only sub-graphs fold).

mod common;

use common::{assert_close, random_f32};
use kiln_ir::ops::{AttrValue, OnnxNode};
use kiln_ir::{interp, DType, Fact, Graph, Node, Op, Shape, Tensor};
use kiln_passes::eqsat::cost::Device;
use kiln_passes::eqsat::{optimize, EqsatOptions, ExtractorKind};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

/// One step of a random graph: what to add, which earlier values it reads, a parameter.
#[derive(Clone, Debug)]
struct Step {
    kind: u8,
    a: u8,
    b: u8,
    p: u8,
}

fn steps(kinds: u8) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (0..kinds, 0u8..6, 0u8..16, any::<u8>()).prop_map(|(kind, a, b, p)| Step { kind, a, b, p }),
        2..12,
    )
}

/// Builds a graph value by value; weights are inputs (fed random data) or random constants.
struct Builder {
    g: Graph,
    const_weights: bool,
    rng: rand::rngs::StdRng,
    /// Values steps may read (not weights).
    pool: Vec<usize>,
}

impl Builder {
    fn new(const_weights: bool, seed: u64) -> Builder {
        Builder {
            g: Graph {
                name: "random".into(),
                opset: 17,
                ..Default::default()
            },
            const_weights,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            pool: Vec::new(),
        }
    }

    fn name(&self, p: &str) -> String {
        format!("{p}{}", self.g.values.len())
    }

    fn input(&mut self, dims: &[usize]) -> usize {
        let n = self.name("x");
        let v = self
            .g
            .add_value(n, Fact::new(DType::F32, Shape::known(dims)));
        self.g.inputs.push(v);
        v
    }

    /// A weight: a graph input, or a constant (positive values if `positive`).
    fn weight(&mut self, dims: &[usize], positive: bool) -> usize {
        if self.const_weights {
            let mut t = random_f32(dims, &mut self.rng);
            if positive {
                t = Tensor::from_vec(
                    dims,
                    t.to_f64_vec()
                        .iter()
                        .map(|x| 0.5 + x.abs() as f32)
                        .collect(),
                );
            }
            let n = self.name("k");
            self.g.add_const(n, t)
        } else if positive {
            // a positive weight computed from an input, so that the interpreter sees it
            let x = self.input(dims);
            let a = self.onnx("Abs", &[], &[x]);
            let h = self.g.add_const(self.name("k"), Tensor::scalar(0.5f32));
            self.onnx("Add", &[], &[a, h])
        } else {
            self.input(dims)
        }
    }

    fn ints(&mut self, v: &[i64]) -> usize {
        let n = self.name("k");
        self.g.add_const(n, Tensor::vec_i64(v))
    }

    /// Appends an ONNX node; returns its outputs.
    fn node(
        &mut self,
        ty: &str,
        attrs: &[(&str, AttrValue)],
        ins: &[usize],
        outs: usize,
    ) -> Vec<usize> {
        let onnx = OnnxNode::new(ty, 17, attrs, vec![true; ins.len()], outs);
        let op = Op::from_onnx(&onnx).unwrap().unwrap();
        let outputs: Vec<usize> = (0..outs)
            .map(|_| {
                let n = self.name("v");
                self.g
                    .add_value(n, Fact::new(DType::F32, Shape::unknown(0)))
            })
            .collect();
        self.g.nodes.push(Node {
            name: format!("n{}", self.g.nodes.len()),
            op,
            inputs: ins.iter().map(|&i| Some(i)).collect(),
            outputs: outputs.clone(),
        });
        let facts = self
            .g
            .infer_node(self.g.nodes.len() - 1)
            .unwrap_or_else(|e| panic!("{ty}: {e}"));
        for (&o, f) in outputs.iter().zip(facts) {
            self.g.values[o].fact = f;
        }
        outputs
    }

    fn onnx(&mut self, ty: &str, attrs: &[(&str, AttrValue)], ins: &[usize]) -> usize {
        self.node(ty, attrs, ins, 1)[0]
    }

    fn dims(&self, v: usize) -> Vec<usize> {
        self.g.values[v].fact.shape.as_known().unwrap()
    }

    /// A recent pool value (`a` back from the newest).
    fn pick(&self, a: u8) -> usize {
        self.pool[self.pool.len() - 1 - a as usize % self.pool.len()]
    }

    /// A pool value other than `x` with `dims` at `axes` (searching back from `b`), if any.
    fn find(&self, b: u8, x: usize, want: impl Fn(&[usize]) -> bool) -> Option<usize> {
        let n = self.pool.len();
        (0..n)
            .map(|i| self.pool[(n - 1 + 2 * n - b as usize % n - i) % n])
            .find(|&v| v != x && want(&self.dims(v)))
    }

    /// Graph outputs: the newest value and up to two earlier ones; dead nodes stay.
    fn finish(mut self, extra: &[u8]) -> (Graph, Vec<Tensor>) {
        let mut outs = vec![*self.pool.last().unwrap()];
        for &e in extra {
            let v = self.pick(e);
            if !outs.contains(&v) && !self.g.inputs.contains(&v) {
                outs.push(v);
            }
        }
        self.g.outputs = outs;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let inputs = self
            .g
            .inputs
            .iter()
            .map(|&v| random_f32(&self.g.values[v].fact.shape.as_known().unwrap(), &mut rng))
            .collect();
        (self.g, inputs)
    }
}

const SIZES: [usize; 5] = [2, 3, 4, 5, 8];

use AttrValue::{Int, Ints};

/// A graph of matrices: `x` is `[r, c]`, each step adds one op over earlier values.
fn matrix_graph(
    r: u8,
    c: u8,
    two_inputs: bool,
    ops: &[Step],
    const_w: bool,
    seed: u64,
) -> (Graph, Vec<Tensor>) {
    let mut b = Builder::new(const_w, seed);
    let (r, c) = (1 + r as usize % 3, SIZES[c as usize % 5]);
    let x = b.input(&[r, c]);
    b.pool.push(x);
    if two_inputs {
        let y = b.input(&[r, c]);
        b.pool.push(y);
    }
    for s in ops {
        let x = b.pick(s.a);
        let d = b.dims(x);
        let n = SIZES[s.p as usize % 5];
        let unary = ["Relu", "Tanh", "Neg", "Sigmoid", "Abs"];
        let y = match s.kind {
            // x W (+ bias)
            0 => {
                let w = b.weight(&[d[1], n], false);
                let m = b.onnx("MatMul", &[], &[x, w]);
                if s.p % 2 == 1 {
                    let bias = b.weight(&[n], false);
                    b.onnx("Add", &[], &[m, bias])
                } else {
                    m
                }
            }
            // x y with an earlier value y of d[1] rows, else x xᵀ
            1 => match b.find(s.b, x, |e| e[0] == d[1]) {
                Some(y) => b.onnx("MatMul", &[], &[x, y]),
                None => {
                    let t = b.onnx("Transpose", &[("perm", Ints(vec![1, 0]))], &[x]);
                    b.onnx("MatMul", &[], &[x, t])
                }
            },
            // x + y (same shape), else x + row bias
            2 => match b.find(s.b, x, |e| e == d.as_slice()) {
                Some(y) => b.onnx("Add", &[], &[x, y]),
                None => {
                    let bias = b.weight(&[1, d[1]], false);
                    b.onnx("Add", &[], &[bias, x])
                }
            },
            // x * y (same shape), else x * constant scalar (positive for odd p)
            3 => match b
                .find(s.b, x, |e| e == d.as_slice())
                .filter(|_| s.p % 3 == 0)
            {
                Some(y) => b.onnx("Mul", &[], &[x, y]),
                None => {
                    let k = if s.p % 2 == 1 {
                        0.5 + s.p as f32 / 256.0
                    } else {
                        -1.5
                    };
                    let k = b.g.add_const(b.name("k"), Tensor::scalar(k));
                    b.onnx("Mul", &[], &[k, x])
                }
            },
            4 => b.onnx(unary[s.p as usize % unary.len()], &[], &[x]),
            5 => b.onnx("Transpose", &[("perm", Ints(vec![1, 0]))], &[x]),
            // concat with an earlier value along an axis where the other dim matches
            6 => {
                let axis = (s.p % 2) as usize;
                let y = b.find(s.b, x, |e| e[1 - axis] == d[1 - axis]).unwrap_or(x);
                b.onnx("Concat", &[("axis", Int(axis as i64))], &[x, y])
            }
            // a slice along an axis of size >= 2, else the whole of it through Identity
            7 => {
                let axis = (s.p % 2) as usize;
                if d[axis] < 2 {
                    b.onnx("Relu", &[], &[x])
                } else {
                    let start = (s.b as usize) % (d[axis] - 1);
                    let end = start + 1 + (s.p as usize / 2) % (d[axis] - start);
                    let (st, en, ax) = (
                        b.ints(&[start as i64]),
                        b.ints(&[end as i64]),
                        b.ints(&[axis as i64]),
                    );
                    b.onnx("Slice", &[], &[x, st, en, ax])
                }
            }
            // split in two along an axis of size >= 2; both halves join the pool
            8 => {
                let axis = (s.p % 2) as usize;
                if d[axis] < 2 {
                    b.onnx("Neg", &[], &[x])
                } else {
                    let k = 1 + s.b as usize % (d[axis] - 1);
                    let sp = b.ints(&[k as i64, (d[axis] - k) as i64]);
                    let o = b.node("Split", &[("axis", Int(axis as i64))], &[x, sp], 2);
                    b.pool.push(o[0]);
                    o[1]
                }
            }
            // reshape to the transposed shape or to one row
            9 => {
                let shape = if s.p % 2 == 0 {
                    vec![d[1] as i64, d[0] as i64]
                } else {
                    vec![1, (d[0] * d[1]) as i64]
                };
                let sh = b.ints(&shape);
                b.onnx("Reshape", &[], &[x, sh])
            }
            // parallel projections of x: two or three, added or concatenated
            10 => {
                let k = 2 + s.b as usize % 2;
                let ys: Vec<usize> = (0..k)
                    .map(|_| {
                        let w = b.weight(&[d[1], n], false);
                        let m = b.onnx("MatMul", &[], &[x, w]);
                        b.onnx(unary[s.b as usize % 2], &[], &[m])
                    })
                    .collect();
                if s.p % 2 == 0 {
                    b.onnx("Concat", &[("axis", Int(1))], &ys)
                } else {
                    let t = b.onnx("Add", &[], &[ys[0], ys[1]]);
                    b.onnx("Add", &[], &[t, ys[k - 1]])
                }
            }
            // x - y or y / positive weight
            _ => match b.find(s.b, x, |e| e == d.as_slice()) {
                Some(y) if s.p % 2 == 0 => b.onnx("Sub", &[], &[x, y]),
                _ => {
                    let w = b.weight(&[d[1]], true);
                    b.onnx("Div", &[], &[x, w])
                }
            },
        };
        b.pool.push(y);
    }
    b.finish(&[ops[0].b, ops[ops.len() - 1].a + 1])
}

/// A convolution cell: `x` is `[1, c, h, w]`; spatial size is kept by every step.
fn conv_graph(c: u8, hw: u8, ops: &[Step], const_w: bool, seed: u64) -> (Graph, Vec<Tensor>) {
    let mut b = Builder::new(const_w, seed);
    let (c, hw) = (2 + c as usize % 3, 3 + hw as usize % 3);
    let x = b.input(&[1, c, hw, hw]);
    b.pool.push(x);
    let conv = |b: &mut Builder, x: usize, cout: usize, k: usize, group: usize, bias: bool| {
        let cin = b.dims(x)[1];
        let w = b.weight(&[cout, cin / group, k, k], false);
        let mut ins = vec![x, w];
        if bias {
            ins.push(b.weight(&[cout], false));
        }
        let p = (k / 2) as i64;
        b.onnx(
            "Conv",
            &[("pads", Ints(vec![p; 4])), ("group", Int(group as i64))],
            &ins,
        )
    };
    for s in ops {
        let x = b.pick(s.a);
        let d = b.dims(x);
        let cout = [2, 3, 4, 6][s.p as usize % 4];
        let y = match s.kind {
            0 => conv(&mut b, x, cout, 1, 1, s.p % 2 == 1),
            1 => conv(&mut b, x, cout, 3, 1, s.p % 2 == 1),
            2 => b.onnx("Relu", &[], &[x]),
            // x + y (same shape), else x + per-channel bias
            3 => match b.find(s.b, x, |e| e == d.as_slice()) {
                Some(y) => b.onnx("Add", &[], &[x, y]),
                None => {
                    let bias = b.weight(&[d[1], 1, 1], false);
                    b.onnx("Add", &[], &[x, bias])
                }
            },
            // per-channel scale
            4 => {
                let k = b.weight(&[1, d[1], 1, 1], s.p % 2 == 1);
                b.onnx("Mul", &[], &[x, k])
            }
            // channel concat with an earlier value of the same spatial size
            5 => {
                let y = b.find(s.b, x, |e| e[2..] == d[2..]).unwrap_or(x);
                b.onnx("Concat", &[("axis", Int(1))], &[x, y])
            }
            6 => {
                let ty = ["MaxPool", "AveragePool"][s.p as usize % 2];
                b.onnx(
                    ty,
                    &[
                        ("kernel_shape", Ints(vec![3, 3])),
                        ("pads", Ints(vec![1; 4])),
                    ],
                    &[x],
                )
            }
            // BatchNormalization (inference) with positive variance
            7 => {
                let ch = d[1];
                let scale = b.weight(&[ch], false);
                let bias = b.weight(&[ch], false);
                let mean = b.weight(&[ch], false);
                let var = b.weight(&[ch], true);
                b.onnx("BatchNormalization", &[], &[x, scale, bias, mean, var])
            }
            // grouped 3×3 (or 1×1) Conv over an even channel count
            8 if d[1].is_multiple_of(2) => conv(
                &mut b,
                x,
                2 * (1 + s.p as usize % 2),
                1 + 2 * (s.b as usize % 2),
                2,
                true,
            ),
            // a channel slice
            9 if d[1] >= 2 => {
                let start = s.b as usize % (d[1] - 1);
                let (st, en, ax) = (
                    b.ints(&[start as i64]),
                    b.ints(&[d[1] as i64]),
                    b.ints(&[1]),
                );
                b.onnx("Slice", &[], &[x, st, en, ax])
            }
            // a fire module: 1×1 and 3×3 Convs of the same input, ReLU, concatenated
            _ => {
                let e1 = conv(&mut b, x, cout, 1, 1, true);
                let e3 = conv(&mut b, x, cout, 3, 1, true);
                let (r1, r3) = (b.onnx("Relu", &[], &[e1]), b.onnx("Relu", &[], &[e3]));
                b.onnx("Concat", &[("axis", Int(1))], &[r1, r3])
            }
        };
        b.pool.push(y);
    }
    b.finish(&[ops[0].b, ops[ops.len() - 1].a + 1])
}

/// Cost models that favour different rewrites: a CPU core, an H100, and a device where
/// only the number of kernels counts (every merge pays).
fn devices() -> Vec<Device> {
    let launch_bound = Device {
        name: "launch-bound".into(),
        launch_us: 1000.0,
        ..Device::cpu()
    };
    vec![
        Device::cpu(),
        Device::gpu("h100", 132, 51_000.0, 3350.0),
        launch_bound,
    ]
}

/// Optimizes `g` with every extractor under every device model and checks the result.
fn check(what: &str, g: &Graph, inputs: &[Tensor]) {
    let want = interp::run(g, inputs).unwrap_or_else(|e| panic!("{what}: input graph: {e}"));
    for device in devices() {
        for extractor in [
            ExtractorKind::Greedy,
            ExtractorKind::Dag,
            ExtractorKind::Ilp,
        ] {
            let opts = EqsatOptions {
                extractor,
                device: device.clone(),
                ilp_time_limit: std::time::Duration::from_millis(300),
                ..Default::default()
            };
            let case = format!("{what} ({}, {extractor:?})", device.name);
            let (out, rep) = optimize(g, &opts).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(
                rep.cost_after <= rep.cost_before * (1.0 + 1e-9),
                "{case}: cost {} -> {}",
                rep.cost_before,
                rep.cost_after
            );
            let names = |h: &Graph, vs: &[usize]| -> Vec<String> {
                vs.iter().map(|&v| h.values[v].name.clone()).collect()
            };
            assert_eq!(
                names(&out, &out.inputs),
                names(g, &g.inputs),
                "{case}: inputs"
            );
            assert_eq!(
                names(&out, &out.outputs),
                names(g, &g.outputs),
                "{case}: outputs"
            );
            let got =
                interp::run(&out, inputs).unwrap_or_else(|e| panic!("{case}: result: {e}\n{rep}"));
            assert_close(&format!("{case}\n{rep}"), &got, &want, 1e-4);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_matrix_graphs_keep_their_values(
        r in 0u8..3, c in 0u8..5, two in any::<bool>(), const_w in any::<bool>(),
        ops in steps(12), seed in any::<u64>(),
    ) {
        let (g, inputs) = matrix_graph(r, c, two, &ops, const_w, seed);
        check(&format!("matrix graph {ops:?} const {const_w}"), &g, &inputs);
    }

    #[test]
    fn random_conv_cells_keep_their_values(
        c in 0u8..3, hw in 0u8..3, const_w in any::<bool>(), ops in steps(11), seed in any::<u64>(),
    ) {
        let (g, inputs) = conv_graph(c, hw, &ops, const_w, seed);
        check(&format!("conv cell {ops:?} const {const_w}"), &g, &inputs);
    }
}

/// The generators reach what they are meant to exercise: the multi-pattern merges,
/// reassociation and the Concat/Slice algebra apply in their graphs.
#[test]
fn random_graphs_reach_the_merge_rules() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut applied = std::collections::BTreeSet::new();
    for i in 0..40u64 {
        let ops: Vec<Step> = (0..8)
            .map(|_| Step {
                kind: rng.random_range(0..12),
                a: rng.random_range(0..6),
                b: rng.random_range(0..16),
                p: rng.random(),
            })
            .collect();
        let (g, _) = if i % 2 == 0 {
            matrix_graph(1, 2, true, &ops, i % 4 == 0, i)
        } else {
            conv_graph(1, 1, &ops, i % 4 == 1, i)
        };
        let opts = EqsatOptions {
            device: devices().pop().unwrap(),
            ..Default::default()
        };
        let (_, rep) = optimize(&g, &opts).unwrap();
        applied.extend(rep.rules_applied.into_keys());
    }
    for rule in [
        "merge-parallel-matmul",
        "merge-parallel-conv",
        "matmul-assoc",
        "concat-slices",
    ] {
        assert!(applied.contains(rule), "{rule} never applied: {applied:?}");
    }
}
