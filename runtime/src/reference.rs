//! Reference kernels: plan steps with no compiled code, run by Kiln's reference interpreter.
//!
//! When the compiler has no code generator yet for a kernel (an op such as `TopK`, or a dtype
//! such as `f16`), it can still produce a complete artifact: the step carries the kernel's
//! nodes as a small static-shape [`kiln_ir::Graph`] (JSON, [`crate::Step::reference`]) whose
//! inputs and outputs are the step's buffers in order. At run time the inputs are decoded from
//! their buffers, the graph is evaluated with [`kiln_ir::interp::run`] (the semantics every
//! compiled kernel is tested against), and the outputs are encoded into their buffers. This is
//! correct but slow; `kiln compile` reports every such step.
//!
//! The *dynamic tail* of a plan ([`crate::plan::DynamicTail`]: the nodes whose shapes depend
//! on input values) runs the same way after the steps ([`RefTail`]), except that its outputs
//! get their run-time shapes and are returned as new tensors.

use crate::plan::{BufRef, DimSpec, DynamicTail, ExecPlan, Step};
use kiln_ir::onnx::tensor_proto::{from_raw, to_raw};
use kiln_ir::{DType, Graph, Tensor};

/// A parsed reference step (see the module doc).
#[derive(Debug)]
pub(crate) struct RefKernel {
    graph: Graph,
    /// dtype, shape and byte size of each argument: inputs, then outputs.
    args: Vec<(DType, Vec<usize>, usize)>,
}

/// Byte size of a buffer of the plan (inputs and outputs at their fixed shapes).
fn buf_bytes(plan: &ExecPlan, b: &BufRef) -> Option<u64> {
    let io_bytes = |io: &crate::IoSpec| {
        io.shape
            .iter()
            .try_fold(io.dtype.size_of() as u64, |a, d| match d {
                crate::DimSpec::Fixed(n) => a.checked_mul(*n),
                crate::DimSpec::Sym(_) | crate::DimSpec::Dynamic => None,
            })
    };
    match b {
        BufRef::Arena { bytes, .. } => Some(*bytes),
        BufRef::Weight { index } => plan.weights.get(*index).map(|w| w.bytes),
        BufRef::Input { index } => plan.inputs.get(*index).and_then(io_bytes),
        BufRef::Output { index } => plan.outputs.get(*index).and_then(io_bytes),
    }
}

impl RefKernel {
    /// Parses and checks the reference graph of `step` (of `plan`): as many graph inputs as
    /// the step reads and outputs as it writes, static shapes, and buffers large enough.
    pub(crate) fn parse(plan: &ExecPlan, step: &Step, json: &str) -> Result<Self, String> {
        let graph: Graph =
            serde_json::from_str(json).map_err(|e| format!("reference graph: {e}"))?;
        let n_out = step.args.len() - step.num_inputs;
        if graph.inputs.len() != step.num_inputs || graph.outputs.len() != n_out {
            return Err(format!(
                "reference graph has {} inputs and {} outputs, the step {} and {}",
                graph.inputs.len(),
                graph.outputs.len(),
                step.num_inputs,
                n_out
            ));
        }
        if graph.nodes.is_empty() {
            return Err("reference graph has no nodes".into());
        }
        let mut args = Vec::new();
        for (i, &v) in graph.inputs.iter().chain(&graph.outputs).enumerate() {
            let val = graph
                .values
                .get(v)
                .ok_or_else(|| format!("reference graph: value {v} out of range"))?;
            let shape =
                val.fact.shape.as_known().ok_or_else(|| {
                    format!("reference graph: '{}' has a symbolic shape", val.name)
                })?;
            let dtype = val.fact.dtype;
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= 1 << 34)
                .ok_or("reference graph: buffer size overflows")?;
            // The exact encoded size (packed for 4- and 2-bit types).
            let bytes = to_raw(&Tensor::zeros(dtype, &[numel])).len();
            let have = buf_bytes(plan, &step.args[i]).unwrap_or(0);
            if (bytes as u64) > have {
                return Err(format!(
                    "reference graph: '{}' needs {bytes} bytes, its buffer has {have}",
                    val.name
                ));
            }
            args.push((dtype, shape, bytes));
        }
        kiln_ir::verify::verify(&graph).map_err(|e| format!("reference graph: {e}"))?;
        Ok(Self { graph, args })
    }

    /// Runs the step.
    ///
    /// # Safety
    /// `args[i]` points to a buffer of at least `self.args[i].2` bytes (checked against the
    /// plan at load), inputs readable and outputs writable; outputs may alias inputs.
    pub(crate) unsafe fn run(&self, args: &[*mut u8]) -> Result<(), String> {
        let n_in = self.graph.inputs.len();
        let mut inputs = Vec::with_capacity(n_in);
        for (p, (dtype, shape, bytes)) in args.iter().zip(&self.args[..n_in]) {
            // SAFETY: see the function's contract.
            let raw = unsafe { std::slice::from_raw_parts(*p as *const u8, *bytes) };
            inputs.push(from_raw(*dtype, shape, raw)?);
        }
        let outs = kiln_ir::interp::run(&self.graph, &inputs).map_err(|e| e.to_string())?;
        for ((t, p), (_, shape, bytes)) in outs.iter().zip(&args[n_in..]).zip(&self.args[n_in..]) {
            if t.shape() != shape.as_slice() {
                return Err(format!(
                    "reference kernel produced shape {:?}, the plan expects {shape:?}",
                    t.shape()
                ));
            }
            let raw = to_raw(t);
            if raw.len() != *bytes {
                return Err(format!(
                    "reference kernel produced {} bytes, the plan expects {bytes}",
                    raw.len()
                ));
            }
            // SAFETY: see the function's contract; `raw` is a fresh buffer.
            unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), *p, *bytes) };
        }
        Ok(())
    }
}

/// A parsed dynamic tail (see the module doc).
#[derive(Debug)]
pub(crate) struct RefTail {
    graph: Graph,
    /// Buffer, dtype, shape and byte size of each graph input.
    inputs: Vec<(BufRef, DType, Vec<usize>, usize)>,
    /// The plan output each graph output is.
    outputs: Vec<usize>,
}

impl RefTail {
    /// Parses and checks `tail` against `plan`: as many graph inputs as buffers, static input
    /// shapes that fit their buffers, outputs of the plan outputs' dtypes and ranks, with
    /// every statically known dim of the plan matching the graph.
    pub(crate) fn parse(plan: &ExecPlan, tail: &DynamicTail) -> Result<Self, String> {
        let graph: Graph =
            serde_json::from_str(&tail.graph).map_err(|e| format!("tail graph: {e}"))?;
        if graph.inputs.len() != tail.inputs.len() || graph.outputs.len() != tail.outputs.len() {
            return Err(format!(
                "tail graph has {} inputs and {} outputs, the plan gives {} and {}",
                graph.inputs.len(),
                graph.outputs.len(),
                tail.inputs.len(),
                tail.outputs.len()
            ));
        }
        let value = |v: usize| {
            graph
                .values
                .get(v)
                .ok_or_else(|| format!("tail graph: value {v} out of range"))
        };
        let mut inputs = Vec::new();
        for (&v, b) in graph.inputs.iter().zip(&tail.inputs) {
            let val = value(v)?;
            let shape =
                val.fact.shape.as_known().ok_or_else(|| {
                    format!("tail graph: input '{}' has a symbolic shape", val.name)
                })?;
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= 1 << 34)
                .ok_or("tail graph: buffer size overflows")?;
            let bytes = to_raw(&Tensor::zeros(val.fact.dtype, &[numel])).len();
            let have = buf_bytes(plan, b).unwrap_or(0);
            if (bytes as u64) > have {
                return Err(format!(
                    "tail graph: input '{}' needs {bytes} bytes, its buffer has {have}",
                    val.name
                ));
            }
            inputs.push((b.clone(), val.fact.dtype, shape, bytes));
        }
        for (&v, &o) in graph.outputs.iter().zip(&tail.outputs) {
            let (val, spec) = (value(v)?, &plan.outputs[o]);
            let dims = val.fact.shape.dims();
            let agree = val.fact.dtype == spec.dtype
                && dims.len() == spec.shape.len()
                && dims.iter().zip(&spec.shape).all(|(d, s)| match s {
                    DimSpec::Fixed(n) => d.known().is_none_or(|k| k as u64 == *n),
                    DimSpec::Sym(_) | DimSpec::Dynamic => true,
                });
            if !agree {
                return Err(format!(
                    "tail graph: output '{}' ({} {}) does not match plan output '{}'",
                    val.name, val.fact.dtype, val.fact.shape, spec.name
                ));
            }
        }
        kiln_ir::verify::verify(&graph).map_err(|e| format!("tail graph: {e}"))?;
        Ok(Self {
            graph,
            inputs,
            outputs: tail.outputs.clone(),
        })
    }

    /// Runs the tail and returns each computed plan output (index, tensor). `buf(b)` is the
    /// address of buffer `b`.
    ///
    /// # Safety
    /// `buf(b)` is valid for reads of the input's byte size (checked against the plan at
    /// load) and the steps have written it.
    pub(crate) unsafe fn run(
        &self,
        buf: impl Fn(&BufRef) -> *const u8,
    ) -> Result<Vec<(usize, Tensor)>, String> {
        let mut inputs = Vec::with_capacity(self.inputs.len());
        for (b, dtype, shape, bytes) in &self.inputs {
            // SAFETY: see the function's contract.
            let raw = unsafe { std::slice::from_raw_parts(buf(b), *bytes) };
            inputs.push(from_raw(*dtype, shape, raw)?);
        }
        let outs = kiln_ir::interp::run(&self.graph, &inputs).map_err(|e| e.to_string())?;
        Ok(self.outputs.iter().copied().zip(outs).collect())
    }
}
