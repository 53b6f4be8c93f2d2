//! Equality saturation on the graphs of tensat's evaluation, built with the graph API at
//! their published sizes (batch 1; weights are graph inputs, as in tensat): e-graph size,
//! saturation and extraction time, estimated cost reduction under the analytical model (a CPU
//! core, or a GPU with `--gpu`).
//!
//! `cargo run --release -p kiln-passes --example eqsat_bench [--o3] [--const] [--gpu v100|h100]
//! [MODEL...]`;
//! `--gpu` costs with the analytical model of that GPU; `--const` makes the weights
//! constants; `--o3` uses
//! the options of `kiln compile -O3` (longer search, ILP extraction).

use kiln_ir::ops::elementwise::{ElementwiseOp, GeluApprox, UnaryKind};
use kiln_ir::ops::{AttrValue, OnnxNode};
use kiln_ir::{DType, Fact, Graph, Node, Op, Shape, Tensor};
use kiln_passes::eqsat::{optimize, EqsatOptions, ExtractorKind};
use std::time::{Duration, Instant};

struct B {
    g: Graph,
    k: usize,
}

use AttrValue::{Int, Ints};

impl B {
    fn new(name: &str) -> B {
        B {
            g: Graph {
                name: name.into(),
                opset: 17,
                ..Default::default()
            },
            k: 0,
        }
    }
    fn fresh(&mut self, p: &str) -> String {
        self.k += 1;
        format!("{p}{}", self.k)
    }
    fn input(&mut self, dims: &[usize]) -> usize {
        let n = self.fresh("in");
        let v = self
            .g
            .add_value(n, Fact::new(DType::F32, Shape::known(dims)));
        self.g.inputs.push(v);
        v
    }
    fn scalar(&mut self, x: f32) -> usize {
        let n = self.fresh("c");
        self.g.add_const(n, Tensor::scalar(x))
    }
    fn ints(&mut self, v: &[i64]) -> usize {
        let n = self.fresh("c");
        self.g.add_const(n, Tensor::vec_i64(v))
    }
    fn op(&mut self, op: Op, ins: &[usize]) -> usize {
        let o = self.fresh("v");
        let o = self
            .g
            .add_value(o, Fact::new(DType::F32, Shape::unknown(0)));
        let name = self.fresh("n");
        self.g.nodes.push(Node {
            name,
            op,
            inputs: ins.iter().map(|&i| Some(i)).collect(),
            outputs: vec![o],
        });
        let f = self
            .g
            .infer_node(self.g.nodes.len() - 1)
            .unwrap_or_else(|e| panic!("{e}"));
        self.g.values[o].fact = f[0].clone();
        o
    }
    fn onnx(&mut self, ty: &str, attrs: &[(&str, AttrValue)], ins: &[usize]) -> usize {
        let node = OnnxNode::new(ty, 17, attrs, vec![true; ins.len()], 1);
        let op = Op::from_onnx(&node).unwrap().unwrap();
        self.op(op, ins)
    }
    fn dims(&self, v: usize) -> Vec<usize> {
        self.g.values[v].fact.shape.as_known().unwrap()
    }
    fn un(&mut self, k: UnaryKind, x: usize) -> usize {
        self.op(Op::Elementwise(ElementwiseOp::Unary(k)), &[x])
    }
    fn relu(&mut self, x: usize) -> usize {
        self.un(UnaryKind::Relu, x)
    }
    fn add(&mut self, a: usize, b: usize) -> usize {
        self.onnx("Add", &[], &[a, b])
    }
    fn mul(&mut self, a: usize, b: usize) -> usize {
        self.onnx("Mul", &[], &[a, b])
    }
    fn matmul(&mut self, a: usize, b: usize) -> usize {
        self.onnx("MatMul", &[], &[a, b])
    }
    fn linear(&mut self, x: usize, dout: usize) -> usize {
        let din = *self.dims(x).last().unwrap();
        let w = self.input(&[din, dout]);
        let b = self.input(&[dout]);
        let m = self.matmul(x, w);
        self.add(m, b)
    }
    /// Row `i` of a matrix, as a `[1, n]` matrix (an ONNX `Slice` on axis 0).
    fn row(&mut self, x: usize, i: usize) -> usize {
        let (st, en, ax) = (
            self.ints(&[i as i64]),
            self.ints(&[i as i64 + 1]),
            self.ints(&[0]),
        );
        self.onnx("Slice", &[], &[x, st, en, ax])
    }
    fn concat(&mut self, axis: i64, ins: &[usize]) -> usize {
        self.onnx("Concat", &[("axis", Int(axis))], ins)
    }
    fn transpose(&mut self, x: usize, perm: &[i64]) -> usize {
        self.onnx("Transpose", &[("perm", Ints(perm.to_vec()))], &[x])
    }
    fn reshape(&mut self, x: usize, shape: &[i64]) -> usize {
        let s = self.ints(shape);
        self.onnx("Reshape", &[], &[x, s])
    }
    /// Conv (with bias) + optional ReLU; `k`, `pad` as (h, w).
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        x: usize,
        cout: usize,
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
        group: usize,
        relu: bool,
    ) -> usize {
        let cin = self.dims(x)[1];
        let w = self.input(&[cout, cin / group, k.0, k.1]);
        let b = self.input(&[cout]);
        let (ph, pw) = (pad.0 as i64, pad.1 as i64);
        let y = self.onnx(
            "Conv",
            &[
                ("strides", Ints(vec![stride as i64; 2])),
                ("pads", Ints(vec![ph, pw, ph, pw])),
                ("group", Int(group as i64)),
            ],
            &[x, w, b],
        );
        if relu {
            self.relu(y)
        } else {
            y
        }
    }
    fn pool(&mut self, ty: &str, x: usize, k: usize, s: usize, p: usize) -> usize {
        let p = p as i64;
        self.onnx(
            ty,
            &[
                ("kernel_shape", Ints(vec![k as i64; 2])),
                ("strides", Ints(vec![s as i64; 2])),
                ("pads", Ints(vec![p; 4])),
            ],
            &[x],
        )
    }
    fn layernorm(&mut self, x: usize) -> usize {
        let d = *self.dims(x).last().unwrap();
        let s = self.input(&[d]);
        let b = self.input(&[d]);
        self.onnx("LayerNormalization", &[("axis", Int(-1))], &[x, s, b])
    }
    fn finish(mut self, outs: &[usize]) -> Graph {
        self.g.outputs = outs.to_vec();
        self.g
    }
}

/// Transformer layers (BERT-base: post-LN, GELU; `causal`: GPT-2 style pre-LN with a mask).
pub fn transformer(
    name: &str,
    layers: usize,
    seq: usize,
    d: usize,
    heads: usize,
    causal: bool,
) -> Graph {
    let mut b = B::new(name);
    let mut x = b.input(&[seq, d]);
    let hd = (d / heads) as i64;
    let mask = causal.then(|| b.input(&[seq, seq]));
    for _ in 0..layers {
        let h = if causal { b.layernorm(x) } else { x };
        let split = |b: &mut B, t: usize| {
            let r = b.reshape(t, &[seq as i64, heads as i64, hd]);
            b.transpose(r, &[1, 0, 2])
        };
        let q = b.linear(h, d);
        let k = b.linear(h, d);
        let v = b.linear(h, d);
        let (q, k, v) = (split(&mut b, q), split(&mut b, k), split(&mut b, v));
        let kt = b.transpose(k, &[0, 2, 1]);
        let s = b.matmul(q, kt);
        let sc = b.scalar(1.0 / (hd as f32).sqrt());
        let mut s = b.mul(s, sc);
        if let Some(m) = mask {
            s = b.add(s, m);
        }
        let p = b.onnx("Softmax", &[("axis", Int(-1))], &[s]);
        let c = b.matmul(p, v);
        let c = b.transpose(c, &[1, 0, 2]);
        let c = b.reshape(c, &[seq as i64, d as i64]);
        let o = b.linear(c, d);
        let r = b.add(o, x);
        let r = if causal { r } else { b.layernorm(r) };
        let h2 = if causal { b.layernorm(r) } else { r };
        let f = b.linear(h2, 4 * d);
        let f = b.un(
            UnaryKind::Gelu {
                approximate: if causal {
                    GeluApprox::Tanh
                } else {
                    GeluApprox::None
                },
            },
            f,
        );
        let f = b.linear(f, d);
        let r2 = b.add(f, r);
        x = if causal { r2 } else { b.layernorm(r2) };
    }
    b.finish(&[x])
}

pub fn nasrnn(steps: usize, hidden: usize) -> Graph {
    let mut b = B::new("nasrnn");
    // One data input: the initial state and the step inputs as rows (a per-step graph
    // input would become a constant under `--const` and fold every input projection away).
    let seq = b.input(&[steps + 1, hidden]);
    let mut h = b.row(seq, 0);
    for t in 1..=steps {
        let x = b.row(seq, t);
        let mut a = vec![];
        for i in 0..8 {
            let xi = b.linear(x, hidden);
            let wh = b.input(&[hidden, hidden]);
            let hi = b.matmul(h, wh);
            let s = b.add(xi, hi);
            a.push(match i % 3 {
                0 => b.un(UnaryKind::Sigmoid, s),
                1 => b.relu(s),
                _ => b.un(UnaryKind::Tanh, s),
            });
        }
        let m1 = b.mul(a[0], a[1]);
        let m2 = b.add(a[2], a[3]);
        let m3 = b.mul(a[4], a[5]);
        let m4 = b.add(a[6], a[7]);
        let n1 = b.mul(m1, m2);
        let n1 = b.un(UnaryKind::Tanh, n1);
        let n2 = b.add(m3, m4);
        let n2 = b.un(UnaryKind::Sigmoid, n2);
        let t = b.mul(n1, n2);
        h = b.un(UnaryKind::Tanh, t);
    }
    b.finish(&[h])
}

/// An LSTM unrolled over `steps` (as a traced `nn.LSTMCell` loop exports it): one data input
/// `[steps + 1, hidden]` (the initial state and the step inputs as rows), the weights shared
/// by every step (`W_ih`, `W_hh` of shape `[hidden, 4 hidden]`, two biases), the four gates
/// as column slices of one product, and every step's hidden state concatenated as the output.
/// Not one of tensat's graphs (its NasRNN has a fresh weight per step): with shared weights the
/// steps' input projections share their weight, which is where `merge-shared-weight` applies.
pub fn lstm(steps: usize, hidden: usize) -> Graph {
    let mut b = B::new("lstm");
    let seq = b.input(&[steps + 1, hidden]);
    let w_ih = b.input(&[hidden, 4 * hidden]);
    let b_ih = b.input(&[4 * hidden]);
    let w_hh = b.input(&[hidden, 4 * hidden]);
    let b_hh = b.input(&[4 * hidden]);
    let mut h = b.row(seq, 0);
    let mut c = h;
    let mut hs = vec![];
    for t in 1..=steps {
        let x = b.row(seq, t);
        let xi = b.matmul(x, w_ih);
        let xi = b.add(xi, b_ih);
        let hh = b.matmul(h, w_hh);
        let hh = b.add(hh, b_hh);
        let g = b.add(xi, hh);
        let gate = |b: &mut B, i: usize| {
            let (st, en, ax) = (
                b.ints(&[(i * hidden) as i64]),
                b.ints(&[((i + 1) * hidden) as i64]),
                b.ints(&[1]),
            );
            b.onnx("Slice", &[], &[g, st, en, ax])
        };
        let (gi, gf, gg, go) = (
            gate(&mut b, 0),
            gate(&mut b, 1),
            gate(&mut b, 2),
            gate(&mut b, 3),
        );
        let i = b.un(UnaryKind::Sigmoid, gi);
        let f = b.un(UnaryKind::Sigmoid, gf);
        let gg = b.un(UnaryKind::Tanh, gg);
        let o = b.un(UnaryKind::Sigmoid, go);
        let fc = b.mul(f, c);
        let ig = b.mul(i, gg);
        c = b.add(fc, ig);
        let tc = b.un(UnaryKind::Tanh, c);
        h = b.mul(o, tc);
        hs.push(h);
    }
    let out = b.concat(0, &hs);
    b.finish(&[out])
}

fn sep(b: &mut B, x: usize, k: usize) -> usize {
    let c = b.dims(x)[1];
    let r = b.relu(x);
    let d = b.conv(r, c, (k, k), 1, (k / 2, k / 2), c, false);
    b.conv(d, c, (1, 1), 1, (0, 0), 1, false)
}

pub fn nasnet(cells: usize, c: usize, hw: usize) -> Graph {
    let mut b = B::new("nasnet-a");
    let img = b.input(&[1, 3, 224, 224]);
    let s = b.conv(img, c, (3, 3), 2, (1, 1), 1, true);
    let s = b.pool("MaxPool", s, 3, 2, 1);
    let s = b.pool("MaxPool", s, 3, 224 / 4 / hw, 1);
    let (mut prev, mut cur) = (s, s);
    for _ in 0..cells {
        let hp = b.conv(prev, c, (1, 1), 1, (0, 0), 1, false);
        let h = b.conv(cur, c, (1, 1), 1, (0, 0), 1, false);
        let s1 = sep(&mut b, h, 3);
        let b1 = b.add(s1, h);
        let s2 = sep(&mut b, hp, 3);
        let s3 = sep(&mut b, h, 5);
        let b2 = b.add(s2, s3);
        let p1 = b.pool("AveragePool", h, 3, 1, 1);
        let b3 = b.add(p1, hp);
        let p2 = b.pool("AveragePool", hp, 3, 1, 1);
        let p3 = b.pool("AveragePool", hp, 3, 1, 1);
        let b4 = b.add(p2, p3);
        let s4 = sep(&mut b, hp, 5);
        let s5 = sep(&mut b, hp, 3);
        let b5 = b.add(s4, s5);
        let out = b.concat(1, &[hp, b1, b2, b3, b4, b5]);
        prev = cur;
        cur = out;
    }
    b.finish(&[cur])
}

pub fn inception_v3() -> Graph {
    let mut b = B::new("inception-v3");
    let x = b.input(&[1, 3, 299, 299]);
    let cv =
        |b: &mut B, x, c, k: (usize, usize), s, p: (usize, usize)| b.conv(x, c, k, s, p, 1, true);
    let mut x = cv(&mut b, x, 32, (3, 3), 2, (0, 0));
    x = cv(&mut b, x, 32, (3, 3), 1, (0, 0));
    x = cv(&mut b, x, 64, (3, 3), 1, (1, 1));
    x = b.pool("MaxPool", x, 3, 2, 0);
    x = cv(&mut b, x, 80, (1, 1), 1, (0, 0));
    x = cv(&mut b, x, 192, (3, 3), 1, (0, 0));
    x = b.pool("MaxPool", x, 3, 2, 0);
    for pc in [32, 64, 64] {
        let a = cv(&mut b, x, 64, (1, 1), 1, (0, 0));
        let c5 = cv(&mut b, x, 48, (1, 1), 1, (0, 0));
        let c5 = cv(&mut b, c5, 64, (5, 5), 1, (2, 2));
        let d = cv(&mut b, x, 64, (1, 1), 1, (0, 0));
        let d = cv(&mut b, d, 96, (3, 3), 1, (1, 1));
        let d = cv(&mut b, d, 96, (3, 3), 1, (1, 1));
        let p = b.pool("AveragePool", x, 3, 1, 1);
        let p = cv(&mut b, p, pc, (1, 1), 1, (0, 0));
        x = b.concat(1, &[a, c5, d, p]);
    }
    {
        let a = cv(&mut b, x, 384, (3, 3), 2, (0, 0));
        let d = cv(&mut b, x, 64, (1, 1), 1, (0, 0));
        let d = cv(&mut b, d, 96, (3, 3), 1, (1, 1));
        let d = cv(&mut b, d, 96, (3, 3), 2, (0, 0));
        let p = b.pool("MaxPool", x, 3, 2, 0);
        x = b.concat(1, &[a, d, p]);
    }
    for c7 in [128, 160, 160, 192] {
        let a = cv(&mut b, x, 192, (1, 1), 1, (0, 0));
        let s = cv(&mut b, x, c7, (1, 1), 1, (0, 0));
        let s = cv(&mut b, s, c7, (1, 7), 1, (0, 3));
        let s = cv(&mut b, s, 192, (7, 1), 1, (3, 0));
        let mut d = cv(&mut b, x, c7, (1, 1), 1, (0, 0));
        for (i, (k, p)) in [
            ((7, 1), (3, 0)),
            ((1, 7), (0, 3)),
            ((7, 1), (3, 0)),
            ((1, 7), (0, 3)),
        ]
        .into_iter()
        .enumerate()
        {
            d = cv(&mut b, d, if i == 3 { 192 } else { c7 }, k, 1, p);
        }
        let p = b.pool("AveragePool", x, 3, 1, 1);
        let p = cv(&mut b, p, 192, (1, 1), 1, (0, 0));
        x = b.concat(1, &[a, s, d, p]);
    }
    {
        let a = cv(&mut b, x, 192, (1, 1), 1, (0, 0));
        let a = cv(&mut b, a, 320, (3, 3), 2, (0, 0));
        let d = cv(&mut b, x, 192, (1, 1), 1, (0, 0));
        let d = cv(&mut b, d, 192, (1, 7), 1, (0, 3));
        let d = cv(&mut b, d, 192, (7, 1), 1, (3, 0));
        let d = cv(&mut b, d, 192, (3, 3), 2, (0, 0));
        let p = b.pool("MaxPool", x, 3, 2, 0);
        x = b.concat(1, &[a, d, p]);
    }
    for _ in 0..2 {
        let a = cv(&mut b, x, 320, (1, 1), 1, (0, 0));
        let s = cv(&mut b, x, 384, (1, 1), 1, (0, 0));
        let s1 = cv(&mut b, s, 384, (1, 3), 1, (0, 1));
        let s2 = cv(&mut b, s, 384, (3, 1), 1, (1, 0));
        let d = cv(&mut b, x, 448, (1, 1), 1, (0, 0));
        let d = cv(&mut b, d, 384, (3, 3), 1, (1, 1));
        let d1 = cv(&mut b, d, 384, (1, 3), 1, (0, 1));
        let d2 = cv(&mut b, d, 384, (3, 1), 1, (1, 0));
        let p = b.pool("AveragePool", x, 3, 1, 1);
        let p = cv(&mut b, p, 192, (1, 1), 1, (0, 0));
        x = b.concat(1, &[a, s1, s2, d1, d2, p]);
    }
    let x = b.onnx("GlobalAveragePool", &[], &[x]);
    let x = b.onnx("Flatten", &[("axis", Int(1))], &[x]);
    let y = b.linear(x, 1000);
    b.finish(&[y])
}

pub fn squeezenet() -> Graph {
    let mut b = B::new("squeezenet");
    let x = b.input(&[1, 3, 224, 224]);
    let mut x = b.conv(x, 64, (3, 3), 2, (0, 0), 1, true);
    x = b.pool("MaxPool", x, 3, 2, 0);
    for (i, (s, e)) in [
        (16, 64),
        (16, 64),
        (32, 128),
        (32, 128),
        (48, 192),
        (48, 192),
        (64, 256),
        (64, 256),
    ]
    .into_iter()
    .enumerate()
    {
        let q = b.conv(x, s, (1, 1), 1, (0, 0), 1, true);
        let e1 = b.conv(q, e, (1, 1), 1, (0, 0), 1, true);
        let e3 = b.conv(q, e, (3, 3), 1, (1, 1), 1, true);
        x = b.concat(1, &[e1, e3]);
        if i == 1 || i == 3 {
            x = b.pool("MaxPool", x, 3, 2, 0);
        }
    }
    let x = b.conv(x, 1000, (1, 1), 1, (0, 0), 1, true);
    let y = b.onnx("GlobalAveragePool", &[], &[x]);
    b.finish(&[y])
}

pub fn resnext50() -> Graph {
    resnet_like("resnext-50", [128, 256, 512, 1024], 32)
}

/// ResNet-50 (not in tensat's set; the compile-time budget names it).
pub fn resnet50() -> Graph {
    resnet_like("resnet-50", [64, 128, 256, 512], 1)
}

/// A ResNet-50-shaped bottleneck network: inner widths per stage, grouped 3x3 convs.
fn resnet_like(name: &str, widths: [usize; 4], groups: usize) -> Graph {
    let mut b = B::new(name);
    let x = b.input(&[1, 3, 224, 224]);
    let mut x = b.conv(x, 64, (7, 7), 2, (3, 3), 1, true);
    x = b.pool("MaxPool", x, 3, 2, 1);
    for (stage, (n, w, out)) in [
        (3, widths[0], 256),
        (4, widths[1], 512),
        (6, widths[2], 1024),
        (3, widths[3], 2048),
    ]
    .into_iter()
    .enumerate()
    {
        for i in 0..n {
            let s = if i == 0 && stage > 0 { 2 } else { 1 };
            let h = b.conv(x, w, (1, 1), 1, (0, 0), 1, true);
            let h = b.conv(h, w, (3, 3), s, (1, 1), groups, true);
            let h = b.conv(h, out, (1, 1), 1, (0, 0), 1, false);
            let sc = if i == 0 {
                b.conv(x, out, (1, 1), s, (0, 0), 1, false)
            } else {
                x
            };
            let r = b.add(h, sc);
            x = b.relu(r);
        }
    }
    let x = b.onnx("GlobalAveragePool", &[], &[x]);
    let x = b.onnx("Flatten", &[("axis", Int(1))], &[x]);
    let y = b.linear(x, 1000);
    b.finish(&[y])
}

pub fn vgg19() -> Graph {
    let mut b = B::new("vgg-19");
    let mut x = b.input(&[1, 3, 224, 224]);
    for (n, c) in [(2, 64), (2, 128), (4, 256), (4, 512), (4, 512)] {
        for _ in 0..n {
            x = b.conv(x, c, (3, 3), 1, (1, 1), 1, true);
        }
        x = b.pool("MaxPool", x, 2, 2, 0);
    }
    let mut x = b.onnx("Flatten", &[("axis", Int(1))], &[x]);
    for d in [4096, 4096] {
        x = b.linear(x, d);
        x = b.relu(x);
    }
    let y = b.linear(x, 1000);
    b.finish(&[y])
}

/// Makes every graph input but the first a constant (small deterministic values).
fn weights_to_constants(g: &mut Graph) {
    g.infer().expect("the benchmark graphs infer");
    let weights: Vec<usize> = g.inputs[1..].to_vec();
    for v in weights {
        let shape = g.values[v].fact.shape.as_known().expect("static weights");
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
        g.set_const(v, Tensor::from_vec(&shape, data));
    }
    g.inputs.truncate(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o3 = args.iter().any(|a| a == "--o3");
    // `--const`: weights are constants (as `kiln compile` sees them; weight-only sub-graphs
    // such as concatenated MatMul weights fold, as TASO/tensat precompute them)
    let consts = args.iter().any(|a| a == "--const");
    // `--gpu v100|h100`: the analytical model of that GPU instead of a CPU core (V100: the
    // card of tensat's measurements; figures from NVIDIA's data sheets / codegen/data/gpus.toml)
    let gpu = args
        .iter()
        .position(|a| a == "--gpu")
        .and_then(|i| args.get(i + 1).cloned());
    let device = match gpu.as_deref() {
        None => kiln_passes::eqsat::cost::Device::cpu(),
        Some("v100") => kiln_passes::eqsat::cost::Device::gpu("v100", 80, 15_700.0, 900.0),
        Some("h100") => kiln_passes::eqsat::cost::Device::gpu("h100", 132, 67_000.0, 3_350.0),
        Some(other) => panic!("--gpu {other}: expected v100 or h100"),
    };
    let only: Vec<String> = args
        .into_iter()
        .filter(|a| a != "--o3" && a != "--const" && a != "--gpu" && Some(a) != gpu.as_ref())
        .collect();
    let mut opts = if o3 {
        // the options of -O3 (src/pipeline.rs)
        EqsatOptions {
            iter_limit: 16,
            node_limit: 60_000,
            time_limit: Duration::from_secs(8),
            extract_time_limit: Duration::from_secs(3),
            extractor: ExtractorKind::Ilp,
            ilp_time_limit: Duration::from_secs(4),
            ..Default::default()
        }
    } else {
        EqsatOptions::default()
    };
    opts.device = device;
    if let Ok(n) = std::env::var("EQSAT_ITERS") {
        opts.iter_limit = n.parse().expect("EQSAT_ITERS: a number");
    }
    type Model = (&'static str, &'static str, fn() -> Graph);
    let models: Vec<Model> = vec![
        ("bert", "1.4 s / 9.2%", || {
            transformer("bert-base", 12, 128, 768, 12, false)
        }),
        ("gpt2", "-", || {
            transformer("gpt2-blocks", 12, 128, 768, 12, true)
        }),
        ("resnext50", "0.7 s / 8.8%", resnext50),
        ("resnet50", "-", resnet50),
        ("nasrnn", "0.5 s / 68.9%", || nasrnn(5, 512)),
        ("nasnet", "10.6 s / 7.3%", || nasnet(6, 128, 28)),
        ("lstm", "-", || lstm(16, 512)),
        ("inception", "5.1 s / 10.0%", inception_v3),
        ("squeezenet", "0.3 s / 24.5%", squeezenet),
        ("vgg19", "0.4 s / 8.9%", vgg19),
    ];
    println!("| model | nodes | e-nodes / e-classes | iters (stop) | saturate s | extract s | total s | cost us before -> after | reduction | rules applied | kept | tensat (search / speed-up) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, tensat, build) in models {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let mut g = build();
        if consts {
            weights_to_constants(&mut g);
        }
        let t = Instant::now();
        let (out, r) = optimize(&g, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let total = t.elapsed().as_secs_f64();
        let applied: usize = r.rules_applied.values().sum();
        println!(
            "| {} | {} -> {} | {} / {} | {} ({}) | {:.2} | {:.2} | {total:.2} | {:.0} -> {:.0} | {:.1}% | {} ({} rules) | {} | {} |",
            g.name,
            g.nodes.len(),
            out.nodes.len(),
            r.egraph_nodes,
            r.egraph_classes,
            r.iterations,
            r.stop_reason,
            r.saturate_s,
            r.extract_s,
            r.cost_before,
            r.cost_after,
            100.0 * (1.0 - r.cost_after / r.cost_before),
            applied,
            r.rules_applied.len(),
            r.chosen,
            tensat
        );
        if std::env::var("EQSAT_VERBOSE").is_ok() {
            eprintln!("{name} ({total:.2}s):\n{r}");
            if std::env::var("EQSAT_VERBOSE").as_deref() == Ok("2") {
                eprintln!("{}", kiln_ir::printer::to_text(&out));
            }
            if std::env::var("EQSAT_VERBOSE").as_deref() == Ok("3") {
                // the cost of each node of the extracted graph
                let model = kiln_passes::eqsat::cost::Analytical {
                    device: opts.device.clone(),
                };
                let costs = kiln_passes::eqsat::cost::node_costs(&out, &model);
                for (n, c) in out.nodes.iter().zip(costs) {
                    let shape = &out.values[n.outputs[0]].fact.shape;
                    eprintln!("{c:8.2} us  {} {shape:?}", n.op.op_type());
                }
            }
        }
    }
}
