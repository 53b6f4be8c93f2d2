//! Recurrent layers: `RNN`, `GRU` and `LSTM` (ONNX semantics: gate orders `iofc` for LSTM
//! and `zrh` for GRU, forward / reverse / bidirectional, per-batch `sequence_lens`, initial
//! states, LSTM peepholes and coupled input-forget gate, GRU `linear_before_reset`, `clip`,
//! any of ONNX's activation functions, `layout` 0 or 1).
//!
//! The reference computes in f64, one time step after another, and rounds the outputs to the
//! input dtype. Past a batch entry's sequence length its `Y` rows are zero and its state is
//! held (`Y_h` / `Y_c` are the last valid step's).

use super::{float_input, from_f64, same_dtype, size_attr};
use crate::ops::{opt, req, Fact, OnnxNode, OpResult};
use crate::shape::{Dim, Shape};
use crate::tensor::Tensor;

/// Which recurrent cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Cell {
    /// `RNN`: `Hₜ = f(Xₜ Wᵀ + Hₜ₋₁ Rᵀ + Wb + Rb)`.
    Rnn,
    /// `GRU`: update `z`, reset `r` and hidden `h` gates.
    Gru,
    /// `LSTM`: input `i`, output `o`, forget `f` and cell `c` gates.
    Lstm,
}

impl Cell {
    /// Gates per direction (rows of `W` per hidden unit).
    pub fn gates(self) -> usize {
        match self {
            Cell::Rnn => 1,
            Cell::Gru => 3,
            Cell::Lstm => 4,
        }
    }

    /// Activation functions per direction.
    pub fn activations(self) -> usize {
        match self {
            Cell::Rnn => 1,
            Cell::Gru => 2,
            Cell::Lstm => 3,
        }
    }

    fn op_type(self) -> &'static str {
        match self {
            Cell::Rnn => "RNN",
            Cell::Gru => "GRU",
            Cell::Lstm => "LSTM",
        }
    }
}

/// Direction of a recurrent layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    /// First step to last.
    Forward,
    /// Last step to first.
    Reverse,
    /// Both, as two directions of the outputs.
    Bidirectional,
}

impl Direction {
    /// Number of directions (1 or 2).
    pub fn count(self) -> usize {
        if self == Direction::Bidirectional {
            2
        } else {
            1
        }
    }
}

/// An activation function of a recurrent cell, with its `alpha` / `beta` where it has them.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// `1 / (1 + e⁻ˣ)`.
    Sigmoid,
    /// `tanh x`.
    Tanh,
    /// `max(x, 0)`.
    Relu,
    /// `alpha·x` below 0, else `x`.
    LeakyRelu(f32),
    /// `x` above `alpha`, else 0.
    ThresholdedRelu(f32),
    /// `alpha·tanh(beta·x)`.
    ScaledTanh(f32, f32),
    /// `max(0, min(1, alpha·x + beta))`.
    HardSigmoid(f32, f32),
    /// `x` above 0, else `alpha·(eˣ − 1)`.
    Elu(f32),
    /// `x / (1 + |x|)`.
    Softsign,
    /// `ln(1 + eˣ)`.
    Softplus,
    /// `alpha·x + beta`.
    Affine(f32, f32),
}

impl Activation {
    /// Parses an activation name (case-insensitive, as ONNX runtimes accept it), taking
    /// `alpha` / `beta` from the attribute lists where it uses them.
    fn parse(
        name: &str,
        alphas: &mut impl Iterator<Item = f32>,
        betas: &mut impl Iterator<Item = f32>,
    ) -> OpResult<Activation> {
        let mut a = |d: f32| alphas.next().unwrap_or(d);
        Ok(match name.to_ascii_lowercase().as_str() {
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            "relu" => Activation::Relu,
            "leakyrelu" => Activation::LeakyRelu(a(0.01)),
            "thresholdedrelu" => Activation::ThresholdedRelu(a(1.0)),
            "scaledtanh" => Activation::ScaledTanh(a(1.0), betas.next().unwrap_or(1.0)),
            "hardsigmoid" => Activation::HardSigmoid(a(0.2), betas.next().unwrap_or(0.5)),
            "elu" => Activation::Elu(a(1.0)),
            "softsign" => Activation::Softsign,
            "softplus" => Activation::Softplus,
            "affine" => Activation::Affine(a(1.0), betas.next().unwrap_or(0.0)),
            other => {
                return Err(format!(
                    "attribute 'activations': unknown function '{other}'"
                ))
            }
        })
    }

    /// Applies the function.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            Activation::Relu => x.max(0.0),
            Activation::LeakyRelu(a) => {
                if x < 0.0 {
                    a as f64 * x
                } else {
                    x
                }
            }
            Activation::ThresholdedRelu(a) => {
                if x > a as f64 {
                    x
                } else {
                    0.0
                }
            }
            Activation::ScaledTanh(a, b) => a as f64 * (b as f64 * x).tanh(),
            Activation::HardSigmoid(a, b) => (a as f64 * x + b as f64).clamp(0.0, 1.0),
            Activation::Elu(a) => {
                if x > 0.0 {
                    x
                } else {
                    a as f64 * (x.exp() - 1.0)
                }
            }
            Activation::Softsign => x / (1.0 + x.abs()),
            Activation::Softplus => x.exp().ln_1p(),
            Activation::Affine(a, b) => a as f64 * x + b as f64,
        }
    }
}

/// Attributes of `RNN`, `GRU` and `LSTM`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecurrentAttrs {
    /// Which cell.
    pub cell: Cell,
    /// `hidden_size`.
    pub hidden: usize,
    /// `direction`.
    pub direction: Direction,
    /// The cell's activation functions, per direction (forward first).
    pub activations: Vec<Activation>,
    /// `clip`: gate pre-activations are clipped to `[-clip, clip]`.
    pub clip: Option<f32>,
    /// `layout` = 1: `X`, `Y` and the states are batch-first.
    pub batch_first: bool,
    /// LSTM `input_forget`: the forget gate is `1 − i`.
    pub input_forget: bool,
    /// GRU `linear_before_reset`: the reset gate multiplies `Hₜ₋₁ Rₕᵀ + Rbₕ`.
    pub linear_before_reset: bool,
    /// Outputs the node declares.
    pub num_outputs: usize,
}

impl RecurrentAttrs {
    /// Parses the attributes of an `RNN`, `GRU` or `LSTM` node.
    pub fn parse(cell: Cell, node: &OnnxNode) -> OpResult<RecurrentAttrs> {
        let hidden = size_attr("hidden_size", node.req_int("hidden_size")?, 1)?;
        let direction = match node.string_or("direction", "forward")?.as_str() {
            "forward" => Direction::Forward,
            "reverse" => Direction::Reverse,
            "bidirectional" => Direction::Bidirectional,
            d => return Err(format!("attribute 'direction': unknown direction '{d}'")),
        };
        let defaults: &[&str] = match cell {
            Cell::Rnn => &["Tanh"],
            Cell::Gru => &["Sigmoid", "Tanh"],
            Cell::Lstm => &["Sigmoid", "Tanh", "Tanh"],
        };
        let want = cell.activations() * direction.count();
        let names: Vec<String> = match node.attrs.get("activations") {
            Some(crate::ops::AttrValue::Strings(v)) => v.clone(),
            Some(_) => return Err("attribute 'activations': expected a list of strings".into()),
            None => (0..direction.count())
                .flat_map(|_| defaults.iter().map(|s| s.to_string()))
                .collect(),
        };
        if names.len() != want {
            return Err(format!(
                "attribute 'activations': {} needs {want} functions ({} per direction), found {}",
                cell.op_type(),
                cell.activations(),
                names.len()
            ));
        }
        let alphas = node.floats("activation_alpha")?.unwrap_or_default();
        let betas = node.floats("activation_beta")?.unwrap_or_default();
        let (mut al, mut be) = (alphas.into_iter(), betas.into_iter());
        let activations = names
            .iter()
            .map(|n| Activation::parse(n, &mut al, &mut be))
            .collect::<OpResult<Vec<_>>>()?;
        let clip = node.float("clip")?;
        if clip.is_some_and(|c| c.is_nan() || c < 0.0) {
            return Err("attribute 'clip': expected a non-negative threshold".into());
        }
        let batch_first = match node.int_or("layout", 0)? {
            0 => false,
            1 => true,
            l => return Err(format!("attribute 'layout': expected 0 or 1, found {l}")),
        };
        Ok(RecurrentAttrs {
            cell,
            hidden,
            direction,
            activations,
            clip,
            batch_first,
            input_forget: node.int_or("input_forget", 0)? != 0,
            linear_before_reset: node.int_or("linear_before_reset", 0)? != 0,
            num_outputs: node.num_outputs,
        })
    }

    /// The ONNX op type.
    pub fn op_type(&self) -> &'static str {
        self.cell.op_type()
    }

    /// (min inputs, max inputs, max outputs).
    pub fn arity(&self) -> (usize, usize, usize) {
        match self.cell {
            Cell::Lstm => (3, 8, 3),
            _ => (3, 6, 2),
        }
    }

    /// `(seq, batch, input)` of `X`'s dims in its layout.
    fn x_dims<'a>(&self, x: &'a [Dim]) -> (&'a Dim, &'a Dim, &'a Dim) {
        if self.batch_first {
            (&x[1], &x[0], &x[2])
        } else {
            (&x[0], &x[1], &x[2])
        }
    }

    /// Output types: `Y` `[seq, dirs, batch, hidden]` (`[batch, seq, dirs, hidden]` batch
    /// first), `Y_h` (and LSTM `Y_c`) `[dirs, batch, hidden]` (`[batch, dirs, hidden]`).
    pub fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let x = req(inputs, 0)?;
        let dt = float_input(x, "X")?;
        if x.shape.rank() != 3 {
            return Err(format!("input 'X': expected rank 3, found {}", x.shape));
        }
        let (seq, batch, input) = self.x_dims(x.shape.dims());
        let (nd, h, g) = (self.direction.count(), self.hidden, self.cell.gates());
        let check = |i: usize, name: &str, want: Vec<Dim>| -> OpResult<()> {
            let Some(f) = opt(inputs, i) else {
                return Ok(());
            };
            same_dtype(f, name, dt, "X")?;
            let ok = f.shape.rank() == want.len()
                && f.shape
                    .dims()
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.compatible(b));
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "input '{name}': expected shape {}, found {}",
                    Shape(want),
                    f.shape
                ))
            }
        };
        let k = Dim::Known;
        check(1, "W", vec![k(nd), k(g * h), input.clone()])?;
        req(inputs, 1)?;
        check(2, "R", vec![k(nd), k(g * h), k(h)])?;
        req(inputs, 2)?;
        check(3, "B", vec![k(nd), k(2 * g * h)])?;
        let state = if self.batch_first {
            vec![batch.clone(), k(nd), k(h)]
        } else {
            vec![k(nd), batch.clone(), k(h)]
        };
        if let Some(l) = opt(inputs, 4) {
            if l.dtype != crate::dtype::DType::I32 || l.shape.rank() != 1 {
                return Err(format!(
                    "input 'sequence_lens': expected a 1-D int32 tensor, found {} {}",
                    l.dtype, l.shape
                ));
            }
        }
        check(5, "initial_h", state.clone())?;
        if self.cell == Cell::Lstm {
            check(6, "initial_c", state.clone())?;
            check(7, "P", vec![k(nd), k(3 * h)])?;
        }
        let y = if self.batch_first {
            vec![batch.clone(), seq.clone(), k(nd), k(h)]
        } else {
            vec![seq.clone(), k(nd), batch.clone(), k(h)]
        };
        let mut outs = vec![Fact::new(dt, Shape(y))];
        for _ in 1..self.num_outputs.max(1) {
            outs.push(Fact::new(dt, Shape(state.clone())));
        }
        Ok(outs)
    }

    /// The reference recurrence.
    pub fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let x = req(inputs, 0)?;
        let dt = x.dtype();
        let xs = x.shape();
        let (seq, batch, input) = if self.batch_first {
            (xs[1], xs[0], xs[2])
        } else {
            (xs[0], xs[1], xs[2])
        };
        let (nd, h, g) = (self.direction.count(), self.hidden, self.cell.gates());
        let w = req(inputs, 1)?.to_f64_vec();
        let r = req(inputs, 2)?.to_f64_vec();
        let b = opt(inputs, 3).map(|t| t.to_f64_vec());
        let lens: Vec<usize> = match opt(inputs, 4) {
            Some(l) => {
                let v = l.to_i64_vec();
                if v.len() != batch {
                    return Err(format!(
                        "input 'sequence_lens': {} entries for a batch of {batch}",
                        v.len()
                    ));
                }
                v.iter()
                    .map(|&n| {
                        usize::try_from(n)
                            .ok()
                            .filter(|&n| n <= seq)
                            .ok_or_else(|| {
                                format!("input 'sequence_lens': {n} is not in 0..={seq}")
                            })
                    })
                    .collect::<OpResult<_>>()?
            }
            None => vec![seq; batch],
        };
        // X and the states time-major / direction-major ([t][batch][in], [dir][batch][h])
        let major = |t: &Tensor| -> Vec<f64> {
            if self.batch_first {
                swap01(t.to_f64_vec(), t.shape())
            } else {
                t.to_f64_vec()
            }
        };
        let state_in = |i: usize| -> Vec<f64> {
            opt(inputs, i).map_or_else(|| vec![0.0; nd * batch * h], major)
        };
        let h0 = state_in(5);
        let c0 = if self.cell == Cell::Lstm {
            state_in(6)
        } else {
            vec![]
        };
        let p = if self.cell == Cell::Lstm {
            opt(inputs, 7).map(|t| t.to_f64_vec())
        } else {
            None
        };
        let xv = major(x);
        let x_at = |t: usize, bi: usize, k: usize| xv[(t * batch + bi) * input + k];
        let clip = |v: f64| match self.clip {
            Some(c) => v.clamp(-(c as f64), c as f64),
            None => v,
        };
        // Y in [t][dir][batch][h]; final states in [dir][batch][h]
        let mut y = vec![0.0; seq * nd * batch * h];
        let mut yh = h0.clone();
        let mut yc = c0.clone();
        let na = self.cell.activations();
        for d in 0..nd {
            let reverse = self.direction == Direction::Reverse || d == 1;
            let acts = &self.activations[d * na..(d + 1) * na];
            let wd = &w[d * g * h * input..(d + 1) * g * h * input];
            let rd = &r[d * g * h * h..(d + 1) * g * h * h];
            let bias = |gate: usize, j: usize, rec: bool| -> f64 {
                b.as_ref().map_or(0.0, |b| {
                    b[d * 2 * g * h + (rec as usize) * g * h + gate * h + j]
                })
            };
            for bi in 0..batch {
                let len = lens[bi];
                let mut hs: Vec<f64> = h0[(d * batch + bi) * h..][..h].to_vec();
                let mut cs: Vec<f64> = if self.cell == Cell::Lstm {
                    c0[(d * batch + bi) * h..][..h].to_vec()
                } else {
                    vec![]
                };
                for step in 0..len {
                    let t = if reverse { len - 1 - step } else { step };
                    // x·Wᵀ and h·Rᵀ per gate row
                    let xw = |row: usize| -> f64 {
                        (0..input)
                            .map(|k| x_at(t, bi, k) * wd[row * input + k])
                            .sum()
                    };
                    let hr = |row: usize, hv: &[f64]| -> f64 {
                        (0..h).map(|k| hv[k] * rd[row * h + k]).sum()
                    };
                    let new: Vec<f64> = match self.cell {
                        Cell::Rnn => (0..h)
                            .map(|j| {
                                let v = xw(j) + hr(j, &hs) + bias(0, j, false) + bias(0, j, true);
                                acts[0].apply(clip(v))
                            })
                            .collect(),
                        Cell::Gru => {
                            let gate = |gi: usize, j: usize| {
                                let row = gi * h + j;
                                clip(
                                    xw(row) + hr(row, &hs) + bias(gi, j, false) + bias(gi, j, true),
                                )
                            };
                            let z: Vec<f64> = (0..h).map(|j| acts[0].apply(gate(0, j))).collect();
                            let rg: Vec<f64> = (0..h).map(|j| acts[0].apply(gate(1, j))).collect();
                            let rh: Vec<f64> = (0..h).map(|k| rg[k] * hs[k]).collect();
                            (0..h)
                                .map(|j| {
                                    let row = 2 * h + j;
                                    let rec = if self.linear_before_reset {
                                        rg[j] * (hr(row, &hs) + bias(2, j, true))
                                    } else {
                                        hr(row, &rh) + bias(2, j, true)
                                    };
                                    let ht = acts[1].apply(clip(xw(row) + rec + bias(2, j, false)));
                                    (1.0 - z[j]) * ht + z[j] * hs[j]
                                })
                                .collect()
                        }
                        Cell::Lstm => {
                            let peep = |pi: usize, j: usize, c: f64| {
                                p.as_ref().map_or(0.0, |p| p[d * 3 * h + pi * h + j] * c)
                            };
                            let pre = |gi: usize, j: usize| {
                                let row = gi * h + j;
                                xw(row) + hr(row, &hs) + bias(gi, j, false) + bias(gi, j, true)
                            };
                            let mut hn = vec![0.0; h];
                            for j in 0..h {
                                let i = acts[0].apply(clip(pre(0, j) + peep(0, j, cs[j])));
                                let f = if self.input_forget {
                                    1.0 - i
                                } else {
                                    acts[0].apply(clip(pre(2, j) + peep(2, j, cs[j])))
                                };
                                let c = acts[1].apply(clip(pre(3, j)));
                                let cn = f * cs[j] + i * c;
                                let o = acts[0].apply(clip(pre(1, j) + peep(1, j, cn)));
                                hn[j] = o * acts[2].apply(cn);
                                cs[j] = cn;
                            }
                            hn
                        }
                    };
                    hs = new;
                    y[((t * nd + d) * batch + bi) * h..][..h].copy_from_slice(&hs);
                }
                yh[(d * batch + bi) * h..][..h].copy_from_slice(&hs);
                if self.cell == Cell::Lstm {
                    yc[(d * batch + bi) * h..][..h].copy_from_slice(&cs);
                }
            }
        }
        let (y_shape, state_shape) = if self.batch_first {
            (vec![batch, seq, nd, h], vec![batch, nd, h])
        } else {
            (vec![seq, nd, batch, h], vec![nd, batch, h])
        };
        // back to batch-first: Y [seq, dirs, batch, h] → [batch, seq, dirs, h] (the two
        // leading groups of axes swapped), states [dirs, batch, h] → [batch, dirs, h]
        let (y, yh, yc) = if self.batch_first {
            (
                swap01(y, &[seq * nd, batch, h]),
                swap01(yh, &[nd, batch, h]),
                swap01(yc, &[nd, batch, h]),
            )
        } else {
            (y, yh, yc)
        };
        let mut outs = vec![from_f64(dt, &y_shape, y)?];
        if self.num_outputs >= 2 {
            outs.push(from_f64(dt, &state_shape, yh)?);
        }
        if self.num_outputs >= 3 {
            outs.push(from_f64(dt, &state_shape, yc)?);
        }
        Ok(outs)
    }
}

/// The row-major `[a, b, rest...]` values `v` with their first two axes swapped.
fn swap01(v: Vec<f64>, shape: &[usize]) -> Vec<f64> {
    if v.is_empty() {
        return v;
    }
    let (a, b) = (shape[0], shape[1]);
    let rest = v.len() / (a * b);
    let m = ndarray::Array3::from_shape_vec((a, b, rest), v).expect("shape matches the values");
    m.permuted_axes([1, 0, 2]).iter().copied().collect()
}
