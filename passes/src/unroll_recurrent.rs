//! Unrolls `RNN`, `GRU` and `LSTM` layers with static shapes into their time steps: per step
//! the input projection `xₜ Wᵀ + b`, the recurrent product `hₜ₋₁ Rᵀ`, the gates (column
//! slices and their activations) and the state update, and the outputs as concatenations of
//! the steps' states. Every target then compiles them with its ordinary kernels, and
//! equality saturation sees the steps' input projections sharing one weight
//! (`merge-shared-weight` makes them one product over the sequence).
//!
//! A `sequence_lens` input (per-batch lengths, given at run time) becomes a mask per step:
//! where a batch entry's sequence has ended its state is held and its `Y` rows are zero.
//! Left as they are (the interpreter runs them on the CPU): layers whose shapes are not all
//! static.

use crate::graph_builder::Builder;
use kiln_ir::ops::nn::{Activation, Cell, Direction, NnOp, RecurrentAttrs};
use kiln_ir::ops::AttrValue;
use kiln_ir::{Graph, Node, Op, Tensor, ValueId};

/// Unrolls every recurrent layer that can be (see the module doc); returns how many.
pub fn unroll_all(g: &mut Graph) -> usize {
    let mut count = 0;
    let mut ni = 0;
    while ni < g.nodes.len() {
        let attrs = match &g.nodes[ni].op {
            Op::Nn(NnOp::Recurrent(a)) => a.clone(),
            _ => {
                ni += 1;
                continue;
            }
        };
        if !unrollable(g, ni) {
            ni += 1;
            continue;
        }
        let node = g.nodes.remove(ni);
        Unroller::new(g, &node).run(&attrs, &node);
        count += 1;
    }
    if count > 0 {
        g.toposort()
            .expect("unrolled steps only read earlier values");
    }
    count
}

/// Static shapes everywhere, and at least one step and one batch entry.
fn unrollable(g: &Graph, ni: usize) -> bool {
    let n = &g.nodes[ni];
    if !matches!(n.op, Op::Nn(NnOp::Recurrent(_))) {
        return false;
    }
    let known = |v: ValueId| g.values[v].fact.shape.as_known();
    let Some(x) = n.inputs[0].and_then(known) else {
        return false;
    };
    // (an empty sequence or batch stays with the op: there are no steps to build)
    if x.len() != 3 || x.contains(&0) || !g.values[n.inputs[0].unwrap()].fact.dtype.is_float() {
        return false;
    }
    !(n.inputs.iter().flatten().any(|&v| known(v).is_none())
        || n.outputs.iter().any(|&v| known(v).is_none()))
}

/// The unrolled nodes of one layer are added by a [`Builder`] named after the layer.
type Unroller<'g> = Builder<'g>;

impl Builder<'_> {
    /// `[dirs, rows, cols]` (or `[dirs, n]`) input plane `d` as a matrix `[rows, cols]`.
    fn plane(&mut self, x: ValueId, d: usize, dims: &[i64]) -> ValueId {
        let s = self.slice(x, 0, d, d + 1);
        self.reshape(s, dims)
    }

    fn activate(&mut self, f: Activation, x: ValueId) -> ValueId {
        use AttrValue::Float;
        match f {
            Activation::Sigmoid => self.op("Sigmoid", &[], &[x]),
            Activation::Tanh => self.op("Tanh", &[], &[x]),
            Activation::Relu => self.op("Relu", &[], &[x]),
            Activation::LeakyRelu(a) => self.op("LeakyRelu", &[("alpha", Float(a))], &[x]),
            Activation::ThresholdedRelu(a) => {
                self.op("ThresholdedRelu", &[("alpha", Float(a))], &[x])
            }
            Activation::HardSigmoid(a, b) => self.op(
                "HardSigmoid",
                &[("alpha", Float(a)), ("beta", Float(b))],
                &[x],
            ),
            Activation::Elu(a) => self.op("Elu", &[("alpha", Float(a))], &[x]),
            Activation::Softsign => self.op("Softsign", &[], &[x]),
            Activation::Softplus => self.op("Softplus", &[], &[x]),
            Activation::ScaledTanh(a, b) => {
                let (ka, kb) = (self.scalar(a), self.scalar(b));
                let bx = self.bin("Mul", x, kb);
                let t = self.op("Tanh", &[], &[bx]);
                self.bin("Mul", t, ka)
            }
            Activation::Affine(a, b) => {
                let (ka, kb) = (self.scalar(a), self.scalar(b));
                let ax = self.bin("Mul", x, ka);
                self.bin("Add", ax, kb)
            }
        }
    }

    /// `f(clip(x))`.
    fn gate(&mut self, f: Activation, x: ValueId, clip: Option<f32>) -> ValueId {
        let x = match clip {
            Some(c) => {
                let (lo, hi) = (self.scalar(-c), self.scalar(c));
                self.op("Clip", &[], &[x, lo, hi])
            }
            None => x,
        };
        self.activate(f, x)
    }

    fn run(mut self, a: &RecurrentAttrs, node: &Node) {
        let input = |i: usize| node.inputs.get(i).copied().flatten();
        let x = input(0).expect("X");
        let xs = self.g.values[x].fact.shape.as_known().expect("static");
        let (seq, batch, isz) = if a.batch_first {
            (xs[1], xs[0], xs[2])
        } else {
            (xs[0], xs[1], xs[2])
        };
        let (nd, h, ng) = (a.direction.count(), a.hidden, a.cell.gates());
        let (hi, gh) = (h as i64, (ng * h) as i64);
        // time-major [seq, batch, input]
        let x = if a.batch_first {
            self.transpose(x, &[1, 0, 2])
        } else {
            x
        };
        let na = a.cell.activations();
        // per-step masks `[batch, 1]` (1 while the step is within the entry's length), unless
        // the lengths are a constant equal to the sequence length
        let masks: Option<Vec<ValueId>> = input(4)
            .filter(|&l| {
                !self
                    .g
                    .const_value(l)
                    .is_some_and(|t| t.to_i64_vec().iter().all(|&n| n == seq as i64))
            })
            .map(|lens| {
                (0..seq)
                    .map(|t| {
                        let n = self.name("k");
                        let tv = self.g.add_const(n, Tensor::from_vec(&[1], vec![t as i32]));
                        let lt = self.bin("Less", tv, lens);
                        let to = AttrValue::Int(self.dtype.to_onnx() as i64);
                        let m = self.op("Cast", &[("to", to)], &[lt]);
                        self.reshape(m, &[batch as i64, 1])
                    })
                    .collect()
            });
        // per direction: the state after each step in time order, and the final state
        let mut ys: Vec<Vec<ValueId>> = Vec::new();
        let mut finals = Vec::new();
        for d in 0..nd {
            let acts = &a.activations[d * na..(d + 1) * na];
            let w = self.plane(input(1).expect("W"), d, &[gh, isz as i64]);
            let wt = self.transpose(w, &[1, 0]);
            let r = self.plane(input(2).expect("R"), d, &[gh, hi]);
            let rt = self.transpose(r, &[1, 0]);
            // biases: Wb + Rb (GRU with linear_before_reset: Rb of the h gate apart)
            let (bias, rbh) = match input(3) {
                Some(b) => {
                    let bd = self.plane(b, d, &[2 * gh]);
                    let wb = self.slice(bd, 0, 0, ng * h);
                    let rb = self.slice(bd, 0, ng * h, 2 * ng * h);
                    if a.cell == Cell::Gru {
                        // Wb for every gate, Rb for z and r; Rbh goes inside the h gate
                        let rb_zr = self.slice(rb, 0, 0, 2 * h);
                        let zeros = self.zeros(&[h]);
                        let rb_pad =
                            self.op("Concat", &[("axis", AttrValue::Int(0))], &[rb_zr, zeros]);
                        let rbh = self.slice(rb, 0, 2 * h, 3 * h);
                        (Some(self.bin("Add", wb, rb_pad)), Some(rbh))
                    } else {
                        (Some(self.bin("Add", wb, rb)), None)
                    }
                }
                None => (None, None),
            };
            let state0 = |s: &mut Self, i: usize| -> ValueId {
                match input(i) {
                    Some(v) => {
                        // direction d of [dirs, batch, h] (batch first: [batch, dirs, h])
                        let p = s.slice(v, a.batch_first as i64, d, d + 1);
                        s.reshape(p, &[batch as i64, hi])
                    }
                    None => s.zeros(&[batch, h]),
                }
            };
            let mut hs = state0(&mut self, 5);
            let mut cs = if a.cell == Cell::Lstm {
                Some(state0(&mut self, 6))
            } else {
                None
            };
            let peep = match (a.cell, input(7)) {
                (Cell::Lstm, Some(p)) => {
                    let pd = self.plane(p, d, &[3 * hi]);
                    Some([0, 1, 2].map(|k| self.slice(pd, 0, k * h, (k + 1) * h)))
                }
                _ => None,
            };
            // the R columns of GRU's z/r gates and of its h gate
            let (rt_zr, rt_h) = if a.cell == Cell::Gru {
                (
                    Some(self.slice(rt, 1, 0, 2 * h)),
                    Some(self.slice(rt, 1, 2 * h, 3 * h)),
                )
            } else {
                (None, None)
            };
            let reverse = a.direction == Direction::Reverse || d == 1;
            let mut steps = vec![hs; seq];
            for step in 0..seq {
                let t = if reverse { seq - 1 - step } else { step };
                let xt = self.slice(x, 0, t, t + 1);
                let xt = self.reshape(xt, &[batch as i64, isz as i64]);
                let mut xp = self.bin("MatMul", xt, wt);
                if let Some(b) = bias {
                    xp = self.bin("Add", xp, b);
                }
                let (h_prev, c_prev) = (hs, cs);
                hs = match a.cell {
                    Cell::Rnn => {
                        let hp = self.bin("MatMul", hs, rt);
                        let pre = self.bin("Add", xp, hp);
                        self.gate(acts[0], pre, a.clip)
                    }
                    Cell::Lstm => {
                        let hp = self.bin("MatMul", hs, rt);
                        let pre = self.bin("Add", xp, hp);
                        let c_prev = cs.expect("LSTM state");
                        let part = |s: &mut Self, k: usize| s.slice(pre, 1, k * h, (k + 1) * h);
                        let with_peep = |s: &mut Self, v: ValueId, k: usize, c: ValueId| match peep
                        {
                            Some(p) => {
                                let pc = s.bin("Mul", p[k], c);
                                s.bin("Add", v, pc)
                            }
                            None => v,
                        };
                        let (pi, po, pf, pc) = (
                            part(&mut self, 0),
                            part(&mut self, 1),
                            part(&mut self, 2),
                            part(&mut self, 3),
                        );
                        let pi = with_peep(&mut self, pi, 0, c_prev);
                        let i = self.gate(acts[0], pi, a.clip);
                        let f = if a.input_forget {
                            let one = self.scalar(1.0);
                            self.bin("Sub", one, i)
                        } else {
                            let pf = with_peep(&mut self, pf, 2, c_prev);
                            self.gate(acts[0], pf, a.clip)
                        };
                        let c = self.gate(acts[1], pc, a.clip);
                        let fc = self.bin("Mul", f, c_prev);
                        let ic = self.bin("Mul", i, c);
                        let c_new = self.bin("Add", fc, ic);
                        let po = with_peep(&mut self, po, 1, c_new);
                        let o = self.gate(acts[0], po, a.clip);
                        let hc = self.activate(acts[2], c_new);
                        cs = Some(c_new);
                        self.bin("Mul", o, hc)
                    }
                    Cell::Gru => {
                        let hzr = self.bin("MatMul", hs, rt_zr.expect("GRU"));
                        let xzr = self.slice(xp, 1, 0, 2 * h);
                        let pre = self.bin("Add", xzr, hzr);
                        let zp = self.slice(pre, 1, 0, h);
                        let rp = self.slice(pre, 1, h, 2 * h);
                        let z = self.gate(acts[0], zp, a.clip);
                        let r = self.gate(acts[0], rp, a.clip);
                        let xh = self.slice(xp, 1, 2 * h, 3 * h);
                        let rec = if a.linear_before_reset {
                            let mut hr = self.bin("MatMul", hs, rt_h.expect("GRU"));
                            if let Some(b) = rbh {
                                hr = self.bin("Add", hr, b);
                            }
                            self.bin("Mul", r, hr)
                        } else {
                            let rh = self.bin("Mul", r, hs);
                            let mut m = self.bin("MatMul", rh, rt_h.expect("GRU"));
                            if let Some(b) = rbh {
                                m = self.bin("Add", m, b);
                            }
                            m
                        };
                        let hp = self.bin("Add", xh, rec);
                        let hh = self.gate(acts[1], hp, a.clip);
                        // (1 − z)·h̃ + z·h = h̃ + z·(h − h̃)
                        let diff = self.bin("Sub", hs, hh);
                        let zd = self.bin("Mul", z, diff);
                        self.bin("Add", hh, zd)
                    }
                };
                steps[t] = match &masks {
                    Some(m) => {
                        // past the entry's length: the state is held, Y is zero
                        let m = m[t];
                        hs = self.blend(m, hs, h_prev);
                        if let (Some(c), Some(cp)) = (cs, c_prev) {
                            cs = Some(self.blend(m, c, cp));
                        }
                        self.bin("Mul", m, hs)
                    }
                    None => hs,
                };
            }
            ys.push(steps);
            finals.push((hs, cs));
        }
        // Y: [seq, dirs, batch, h] (batch first: [batch, seq, dirs, h])
        let four = [1, 1, batch as i64, hi];
        let per_t: Vec<ValueId> = (0..seq)
            .map(|t| {
                let parts: Vec<ValueId> = (0..nd).map(|d| self.reshape(ys[d][t], &four)).collect();
                if nd == 1 {
                    parts[0]
                } else {
                    self.op("Concat", &[("axis", AttrValue::Int(1))], &parts)
                }
            })
            .collect();
        let outs = &node.outputs;
        let y_out = outs[0];
        if a.batch_first {
            let y = self.op("Concat", &[("axis", AttrValue::Int(0))], &per_t);
            self.op_into(
                "Transpose",
                &[("perm", AttrValue::Ints(vec![2, 0, 1, 3]))],
                &[y],
                Some(y_out),
            );
        } else {
            self.op_into(
                "Concat",
                &[("axis", AttrValue::Int(0))],
                &per_t,
                Some(y_out),
            );
        }
        // Y_h, Y_c: [dirs, batch, h] (batch first: [batch, dirs, h])
        let three = [1, batch as i64, hi];
        for (k, &out) in outs.iter().enumerate().skip(1).take(2) {
            let parts: Vec<ValueId> = finals
                .iter()
                .map(|&(hs, cs)| {
                    let v = if k == 1 { hs } else { cs.expect("LSTM Y_c") };
                    self.reshape(v, &three)
                })
                .collect();
            if a.batch_first {
                let s = self.op("Concat", &[("axis", AttrValue::Int(0))], &parts);
                self.op_into(
                    "Transpose",
                    &[("perm", AttrValue::Ints(vec![1, 0, 2]))],
                    &[s],
                    Some(out),
                );
            } else {
                self.op_into("Concat", &[("axis", AttrValue::Int(0))], &parts, Some(out));
            }
        }
    }

    /// `old + m·(new − old)`: `new` where the mask `m` is 1, `old` where it is 0.
    fn blend(&mut self, m: ValueId, new: ValueId, old: ValueId) -> ValueId {
        let d = self.bin("Sub", new, old);
        let md = self.bin("Mul", m, d);
        self.bin("Add", old, md)
    }
}
