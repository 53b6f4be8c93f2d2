//! Random graphs for whole-pipeline property tests: products of matrices (MatMul chains,
//! shared inputs, parallel projections, transposes, concat/slice/split, reshapes,
//! elementwise ops with broadcasting) and convolution cells (1×1/3×3/grouped Convs sharing
//! inputs, pools, BatchNorm, channel concat/slice), built from a list of [`Step`]s. Used by
//! `passes/tests/eqsat_random_graphs.rs` (the e-graph alone) and by the root crate's
//! `tests/eqsat_random.rs` (compiled and run on the CPU).
#![allow(dead_code)]

use kiln_ir::ops::{AttrValue, OnnxNode};
use kiln_ir::{DType, Fact, Graph, Node, Op, Shape, Tensor};
use rand::{Rng, SeedableRng};

/// A random f32 tensor with values in [-1, 1).
fn random_tensor(dims: &[usize], rng: &mut impl Rng) -> Tensor {
    let v: Vec<f32> = (0..dims.iter().product::<usize>())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_vec(dims, v)
}

/// One step of a random graph: what to add, which earlier values it reads, a parameter.
#[derive(Clone, Debug)]
pub struct Step {
    /// What to add (`% kinds`).
    pub kind: u8,
    /// Which recent value it reads (0: the newest).
    pub a: u8,
    /// Which earlier value a binary step pairs it with.
    pub b: u8,
    /// Sizes and variants.
    pub p: u8,
}

impl Step {
    /// A random step of one of `kinds` kinds.
    pub fn random(kinds: u8, rng: &mut impl Rng) -> Step {
        Step {
            kind: rng.random_range(0..kinds),
            a: rng.random_range(0..6),
            b: rng.random_range(0..16),
            p: rng.random(),
        }
    }
}

/// Builds a graph value by value; weights are inputs (fed random data) or random constants.
struct Builder {
    g: Graph,
    const_weights: bool,
    rng: rand::rngs::StdRng,
    /// Values steps may read (not weights).
    pool: Vec<usize>,
    /// The weights of `x W` steps (a later step may share one).
    proj: Vec<usize>,
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
            proj: Vec::new(),
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
            let mut t = random_tensor(dims, &mut self.rng);
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

    /// Rows `start..end` of a matrix (an ONNX `Slice` on axis 0).
    fn rows(&mut self, x: usize, start: usize, end: usize) -> usize {
        let (st, en, ax) = (
            self.ints(&[start as i64]),
            self.ints(&[end as i64]),
            self.ints(&[0]),
        );
        self.onnx("Slice", &[], &[x, st, en, ax])
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
            .map(|&v| random_tensor(&self.g.values[v].fact.shape.as_known().unwrap(), &mut rng))
            .collect();
        (self.g, inputs)
    }
}

const SIZES: [usize; 5] = [2, 3, 4, 5, 8];

use AttrValue::{Int, Ints};

/// Kinds of [`matrix_graph`] steps.
pub const MATRIX_KINDS: u8 = 13;
/// Kinds of [`conv_graph`] steps.
pub const CONV_KINDS: u8 = 11;

/// A graph of matrices: `x` is `[r, c]` (a second input of that shape if `two_inputs`),
/// each step adds one op over earlier values; weights are constants if `const_w`, else
/// inputs; every size is multiplied by `scale`. Returns the graph and random inputs.
pub fn matrix_graph(
    (r, c, scale): (u8, u8, usize),
    two_inputs: bool,
    ops: &[Step],
    const_w: bool,
    seed: u64,
) -> (Graph, Vec<Tensor>) {
    let mut b = Builder::new(const_w, seed);
    let (r, c) = ((1 + r as usize % 3) * scale, SIZES[c as usize % 5] * scale);
    let x = b.input(&[r, c]);
    b.pool.push(x);
    if two_inputs {
        let y = b.input(&[r, c]);
        b.pool.push(y);
    }
    for s in ops {
        let x = b.pick(s.a);
        let d = b.dims(x);
        let n = SIZES[s.p as usize % 5] * scale;
        let unary = ["Relu", "Tanh", "Neg", "Sigmoid", "Abs"];
        let y = match s.kind {
            // x W (+ bias)
            0 => {
                let w = b.weight(&[d[1], n], false);
                b.proj.push(w);
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
            // a weight shared by several products: an earlier projection's weight applied to
            // x when its rows fit, else one new weight applied to two row ranges of x (the
            // steps of an RNN)
            12 => {
                let old = b.proj.iter().rev().copied().find(|&w| b.dims(w)[0] == d[1]);
                match old.filter(|_| s.p % 2 == 0) {
                    Some(w) => b.onnx("MatMul", &[], &[x, w]),
                    None => {
                        let w = b.weight(&[d[1], n], false);
                        b.proj.push(w);
                        if d[0] < 2 {
                            b.onnx("MatMul", &[], &[x, w])
                        } else {
                            let k = 1 + s.b as usize % (d[0] - 1);
                            let top = b.rows(x, 0, k);
                            let bottom = b.rows(x, k, d[0]);
                            let p = b.onnx("MatMul", &[], &[top, w]);
                            b.pool.push(p);
                            b.onnx("MatMul", &[], &[bottom, w])
                        }
                    }
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

/// A convolution cell: `x` is `[1, c, h, w]`; spatial size is kept by every step; channel
/// counts are multiplied by `scale`, the spatial size grows with it. Returns the graph and
/// random inputs.
pub fn conv_graph(
    (c, hw, scale): (u8, u8, usize),
    ops: &[Step],
    const_w: bool,
    seed: u64,
) -> (Graph, Vec<Tensor>) {
    let mut b = Builder::new(const_w, seed);
    let (c, hw) = (
        (2 + c as usize % 3) * scale,
        3 + hw as usize % 3 + 2 * (scale - 1),
    );
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
        let cout = [2, 3, 4, 6][s.p as usize % 4] * scale;
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
            // BatchNormalization (inference) with positive variance; its parameters are
            // constants, as in every exported model (a Conv before it folds it, anything
            // else makes it a per-channel `x * s + t`)
            7 => {
                let ch = d[1];
                let const_w = std::mem::replace(&mut b.const_weights, true);
                let scale = b.weight(&[ch], false);
                let bias = b.weight(&[ch], false);
                let mean = b.weight(&[ch], false);
                let var = b.weight(&[ch], true);
                b.const_weights = const_w;
                b.onnx("BatchNormalization", &[], &[x, scale, bias, mean, var])
            }
            // grouped 3×3 (or 1×1) Conv over an even channel count
            8 if d[1].is_multiple_of(2) => conv(
                &mut b,
                x,
                2 * (1 + s.p as usize % 2) * scale,
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

/// An RNN unrolled over `steps`, its weights shared by every step: the input is `[steps +
/// 1, h]` (the initial state, then one row per step). With `lstm`, each step is an LSTM cell
/// (`xₜ Wx + bx + hₜ₋₁ Wh + bh` cut into four gates by column slices, `c` and `h` updated);
/// else an Elman cell, `hₜ = tanh(xₜ Wx + hₜ₋₁ Wh + b)`. Outputs: every step's `h`
/// concatenated, and the last `c` for an LSTM. `h` is `SIZES[h % 5] * scale`.
pub fn rnn_graph(
    (steps, h, scale): (usize, u8, usize),
    lstm: bool,
    const_w: bool,
    seed: u64,
) -> (Graph, Vec<Tensor>) {
    let mut b = Builder::new(const_w, seed);
    let h = SIZES[h as usize % 5] * scale;
    let g = if lstm { 4 * h } else { h };
    let seq = b.input(&[steps + 1, h]);
    let (wx, wh) = (b.weight(&[h, g], false), b.weight(&[h, g], false));
    let (bx, bh) = (b.weight(&[g], false), b.weight(&[g], false));
    let mut state = b.rows(seq, 0, 1);
    let mut c = state;
    let mut hs = vec![];
    for t in 1..=steps {
        let x = b.rows(seq, t, t + 1);
        let xp = b.onnx("MatMul", &[], &[x, wx]);
        let xp = b.onnx("Add", &[], &[xp, bx]);
        let hp = b.onnx("MatMul", &[], &[state, wh]);
        let hp = b.onnx("Add", &[], &[bh, hp]);
        let pre = b.onnx("Add", &[], &[xp, hp]);
        if lstm {
            let gates: Vec<usize> = (0..4)
                .map(|i| {
                    let (st, en, ax) = (
                        b.ints(&[(i * h) as i64]),
                        b.ints(&[((i + 1) * h) as i64]),
                        b.ints(&[1]),
                    );
                    let s = b.onnx("Slice", &[], &[pre, st, en, ax]);
                    b.onnx(if i == 2 { "Tanh" } else { "Sigmoid" }, &[], &[s])
                })
                .collect();
            let fc = b.onnx("Mul", &[], &[gates[1], c]);
            let ig = b.onnx("Mul", &[], &[gates[0], gates[2]]);
            c = b.onnx("Add", &[], &[fc, ig]);
            let tc = b.onnx("Tanh", &[], &[c]);
            state = b.onnx("Mul", &[], &[gates[3], tc]);
        } else {
            state = b.onnx("Tanh", &[], &[pre]);
        }
        hs.push(state);
    }
    let out = b.onnx("Concat", &[("axis", Int(0))], &hs);
    b.pool.push(out);
    if lstm {
        b.pool.push(c);
        return b.finish(&[1]);
    }
    b.finish(&[])
}
