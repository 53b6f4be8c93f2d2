//! Elementwise kernels with grid-stride loops (any grid covers any `n`, so the runtime may
//! launch e.g. `4 × SMs` blocks of 256 threads): the fixed `y[i] = relu(x[i] * a + b)`
//! ([`mul_add_relu`]) and a generator of fused chains ([`chain`], [`EwChain`]): unary and
//! binary ops over full tensors, per-row and per-column vectors and scalars.

use super::emit::{dyn_memref, in_kernel, Emitter};
use crate::gpu::{Elem, GpuError, GpuKernel, KernelParam};

/// Threads per block of [`mul_add_relu`].
pub const BLOCK: u32 = 256;

/// A grid-stride `gpu.func` of [`BLOCK`] threads per block: parameters `params` then
/// `%n: index`, `setup` (MLIR lines before the loop), and `body` run for every `%i < %n`.
pub(crate) fn grid_stride_func(name: &str, params: &str, setup: &str, body: &str) -> String {
    format!(
        r#"  gpu.func @{name}({params}, %n: index) kernel attributes {{known_block_size = array<i32: {BLOCK}, 1, 1>}} {{
    %bid = gpu.block_id x
    %bdim = gpu.block_dim x
    %tid = gpu.thread_id x
    %gdim = gpu.grid_dim x
    %t0 = arith.muli %bid, %bdim : index
    %i0 = arith.addi %t0, %tid : index
    %step = arith.muli %gdim, %bdim : index
{setup}    scf.for %i = %i0 to %n step %step {{
{body}    }}
    gpu.return
  }}
"#
    )
}

/// `name(x: memref<?xf32>, y: memref<?xf32>, a: f32, b: f32, n: index)`:
/// `y[i] = max(x[i] * a + b, 0)` for `i < n`; launch with `BLOCK` threads per block.
pub fn mul_add_relu(name: &str) -> GpuKernel {
    let mlir = grid_stride_func(
        name,
        "%x: memref<?xf32>, %y: memref<?xf32>, %a: f32, %b: f32",
        "    %zero = arith.constant 0.0 : f32\n",
        r#"      %v = memref.load %x[%i] : memref<?xf32>
      %m = arith.mulf %v, %a fastmath<contract> : f32
      %s = arith.addf %m, %b fastmath<contract> : f32
      %r = arith.maximumf %s, %zero : f32
      memref.store %r, %y[%i] : memref<?xf32>
"#,
    );
    let buf = |n: &str| KernelParam::Buffer {
        name: n.into(),
        elem: Elem::F32,
    };
    GpuKernel {
        name: name.into(),
        mlir,
        params: vec![
            buf("x"),
            buf("y"),
            KernelParam::F32("a".into()),
            KernelParam::F32("b".into()),
            KernelParam::Index("n".into()),
        ],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        requires: vec![],
    }
}

/// An input of an elementwise chain over a row-major `rows × cols` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EwInput {
    /// A full `rows × cols` tensor (element `i`).
    Tensor,
    /// A per-row vector of `rows` values (`[rows, 1]`, broadcast along columns).
    RowVec,
    /// A per-column vector of `cols` values (`[cols]`, broadcast along rows).
    ColVec,
    /// An `f32` scalar parameter.
    Scalar,
}

/// A unary step of an elementwise chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EwUnary {
    /// `-x`.
    Neg,
    /// `|x|`.
    Abs,
    /// `max(x, 0)`.
    Relu,
    /// `exp(x)`.
    Exp,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// `sqrt(x)`.
    Sqrt,
    /// `1 / x`.
    Recip,
}

/// A binary step of an elementwise chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EwBinary {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
    /// `max(a, b)`.
    Max,
    /// `min(a, b)`.
    Min,
}

/// One step; operands are value indices: the chain's inputs first, then earlier steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EwStep {
    /// A unary op of a value.
    Unary(EwUnary, usize),
    /// A binary op of two values.
    Binary(EwBinary, usize, usize),
}

/// A fused elementwise chain: inputs with broadcasting, a list of steps, the last value is
/// the output (f32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EwChain {
    /// The inputs (kernel parameters in this order).
    pub inputs: Vec<EwInput>,
    /// The steps.
    pub steps: Vec<EwStep>,
}

impl EwChain {
    /// Checks that there is an input and every operand refers to an earlier value.
    pub fn validate(&self) -> Result<(), GpuError> {
        if self.inputs.is_empty() {
            return Err(GpuError::Schedule(
                "elementwise chain without inputs".into(),
            ));
        }
        for (i, s) in self.steps.iter().enumerate() {
            let avail = self.inputs.len() + i;
            let ok = match *s {
                EwStep::Unary(_, a) => a < avail,
                EwStep::Binary(_, a, b) => a < avail && b < avail,
            };
            if !ok {
                return Err(GpuError::Schedule(format!(
                    "elementwise chain step {i} ({s:?}) refers to a value not yet computed \
                     ({avail} available)"
                )));
            }
        }
        Ok(())
    }

    /// The CPU semantics: `inputs` holds the buffers of the non-scalar inputs in order,
    /// `scalars` the scalar ones.
    pub fn eval(
        &self,
        inputs: &[&[f32]],
        scalars: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>, GpuError> {
        self.validate()?;
        let (mut bi, mut si) = (0, 0);
        let mut srcs = Vec::new();
        for k in &self.inputs {
            if *k == EwInput::Scalar {
                srcs.push((
                    k,
                    &[][..],
                    *scalars.get(si).ok_or_else(|| missing("scalar"))?,
                ));
                si += 1;
            } else {
                let b = *inputs.get(bi).ok_or_else(|| missing("buffer"))?;
                let need = match k {
                    EwInput::Tensor => rows * cols,
                    EwInput::RowVec => rows,
                    _ => cols,
                };
                if b.len() < need {
                    return Err(missing("long enough buffer"));
                }
                srcs.push((k, b, 0.0));
                bi += 1;
            }
        }
        let mut out = vec![0.0f32; rows * cols];
        let mut vals = Vec::with_capacity(self.inputs.len() + self.steps.len());
        for (i, o) in out.iter_mut().enumerate() {
            vals.clear();
            for &(k, b, s) in &srcs {
                vals.push(match k {
                    EwInput::Tensor => b[i],
                    EwInput::RowVec => b[i / cols],
                    EwInput::ColVec => b[i % cols],
                    EwInput::Scalar => s,
                });
            }
            for s in &self.steps {
                let v = match *s {
                    EwStep::Unary(u, a) => {
                        let x = vals[a];
                        match u {
                            EwUnary::Neg => -x,
                            EwUnary::Abs => x.abs(),
                            EwUnary::Relu => x.max(0.0),
                            EwUnary::Exp => x.exp(),
                            EwUnary::Tanh => x.tanh(),
                            EwUnary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                            EwUnary::Sqrt => x.sqrt(),
                            EwUnary::Recip => 1.0 / x,
                        }
                    }
                    EwStep::Binary(op, a, b) => {
                        let (x, y) = (vals[a], vals[b]);
                        match op {
                            EwBinary::Add => x + y,
                            EwBinary::Sub => x - y,
                            EwBinary::Mul => x * y,
                            EwBinary::Div => x / y,
                            EwBinary::Max => x.max(y),
                            EwBinary::Min => x.min(y),
                        }
                    }
                };
                vals.push(v);
            }
            *o = *vals.last().unwrap_or(&0.0);
        }
        Ok(out)
    }
}

fn missing(what: &str) -> GpuError {
    GpuError::Schedule(format!(
        "elementwise chain evaluation: missing {what} input"
    ))
}

/// `name(<inputs in order: memref<?xf32> or f32>, y: memref<?xf32>, rows: index, cols:
/// index)`: `y[i] = chain(inputs at i)` with a grid-stride loop; launch with [`BLOCK`]
/// threads per block and any grid (e.g. [`blocks_for`](super::blocks_for)).
pub fn chain(name: &str, ch: &EwChain) -> Result<GpuKernel, GpuError> {
    ch.validate().map_err(in_kernel(name))?;
    let ty = dyn_memref("f32");
    let mut e = Emitter::new();
    e.line("%tid = gpu.thread_id x");
    e.line("%bid = gpu.block_id x");
    e.line("%gdim = gpu.grid_dim x");
    let i0 = e.ic("muli", "%bid", u64::from(BLOCK));
    let i0 = e.ii("addi", &i0, "%tid");
    let step = e.ic("muli", "%gdim", u64::from(BLOCK));
    let total = e.ii("muli", "%rows", "%cols");
    e.line(&format!("scf.for %i = {i0} to {total} step {step} {{"));
    let needs = |k| ch.inputs.contains(&k);
    let r = needs(EwInput::RowVec).then(|| e.ii("divui", "%i", "%cols"));
    let c = needs(EwInput::ColVec).then(|| e.ii("remui", "%i", "%cols"));
    let mut vals = Vec::new();
    let mut decls = Vec::new();
    let mut params = Vec::new();
    for (j, k) in ch.inputs.iter().enumerate() {
        let p = format!("%in{j}");
        let v = match k {
            EwInput::Scalar => {
                decls.push(format!("{p}: f32"));
                params.push(KernelParam::F32(format!("in{j}")));
                p
            }
            _ => {
                decls.push(format!("{p}: {ty}"));
                params.push(KernelParam::Buffer {
                    name: format!("in{j}"),
                    elem: Elem::F32,
                });
                let at = match k {
                    EwInput::RowVec => r.clone().unwrap_or_default(),
                    EwInput::ColVec => c.clone().unwrap_or_default(),
                    _ => "%i".to_string(),
                };
                e.load(&p, &at, &ty, "f32")
            }
        };
        vals.push(v);
    }
    for s in &ch.steps {
        let v = match *s {
            EwStep::Unary(u, a) => {
                let x = vals[a].clone();
                let math = |e: &mut Emitter, op: &str, x: &str| {
                    let r = e.fresh("u");
                    e.line(&format!("{r} = {op} {x} fastmath<afn> : f32"));
                    r
                };
                match u {
                    EwUnary::Neg => {
                        let r = e.fresh("u");
                        e.line(&format!("{r} = arith.negf {x} : f32"));
                        r
                    }
                    EwUnary::Abs => math(&mut e, "math.absf", &x),
                    EwUnary::Relu => {
                        let z = e.f32c(0.0);
                        e.ff("maximumf", &x, &z)
                    }
                    EwUnary::Exp => math(&mut e, "math.exp", &x),
                    EwUnary::Tanh => math(&mut e, "math.tanh", &x),
                    EwUnary::Sigmoid => {
                        let n = e.fresh("u");
                        e.line(&format!("{n} = arith.negf {x} : f32"));
                        let ex = math(&mut e, "math.exp", &n);
                        let one = e.f32c(1.0);
                        let d = e.ff("addf", &one, &ex);
                        e.ff("divf", &one, &d)
                    }
                    EwUnary::Sqrt => math(&mut e, "math.sqrt", &x),
                    EwUnary::Recip => {
                        let one = e.f32c(1.0);
                        e.ff("divf", &one, &x)
                    }
                }
            }
            EwStep::Binary(op, a, b) => {
                let op = match op {
                    EwBinary::Add => "addf",
                    EwBinary::Sub => "subf",
                    EwBinary::Mul => "mulf",
                    EwBinary::Div => "divf",
                    EwBinary::Max => "maximumf",
                    EwBinary::Min => "minimumf",
                };
                let (x, y) = (vals[a].clone(), vals[b].clone());
                e.ff(op, &x, &y)
            }
        };
        vals.push(v);
    }
    let out = vals.last().cloned().unwrap_or_default();
    e.store(&out, "%Y", "%i", &ty, "f32");
    e.line("}");
    params.extend([
        KernelParam::Buffer {
            name: "y".into(),
            elem: Elem::F32,
        },
        KernelParam::Index("rows".into()),
        KernelParam::Index("cols".into()),
    ]);
    let header = format!(
        "gpu.func @{name}({}, %Y: {ty}, %rows: index, %cols: index) kernel attributes {{known_block_size = array<i32: {BLOCK}, 1, 1>}} {{",
        decls.join(", ")
    );
    Ok(GpuKernel {
        name: name.into(),
        mlir: e.finish(&header),
        params,
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        requires: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_are_validated_and_evaluated() {
        let ch = EwChain {
            inputs: vec![EwInput::Tensor, EwInput::RowVec, EwInput::Scalar],
            steps: vec![
                EwStep::Binary(EwBinary::Sub, 0, 1),
                EwStep::Binary(EwBinary::Mul, 3, 2),
                EwStep::Unary(EwUnary::Relu, 4),
            ],
        };
        let y = ch
            .eval(&[&[1.0, 2.0, 3.0, 4.0], &[2.0, 1.0]], &[2.0], 2, 2)
            .unwrap();
        assert_eq!(y, vec![0.0, 0.0, 4.0, 6.0]);
        assert!(chain("c", &ch).is_ok());
        let bad = EwChain {
            steps: vec![EwStep::Unary(EwUnary::Exp, 3)],
            ..ch.clone()
        };
        let e = chain("c", &bad).unwrap_err().to_string();
        assert!(e.contains("step 0"), "{e}");
        assert!(ch.eval(&[&[1.0]], &[2.0], 2, 2).is_err());
    }
}
