//! `Elementwise` kernels and contraction epilogues on the generic path: one thread per
//! output element computes the kernel's node DAG (the CPU lowering's body emitter,
//! [`crate::cpu::lower::elementwise::emit_node`]) with each input loaded through its
//! broadcasting index.

use super::generic::{Gen, GenKernel};
use super::{shape_of, Operand};
use crate::cpu::lower::elementwise::emit_node;
use crate::cpu::lower::Ty;
use kiln_ir::{Graph, ValueId};
use kiln_passes::fusion;

/// Lowers an `Elementwise` kernel: iteration space = the shape of its first output; every
/// output must have that shape.
pub(crate) fn lower(g: &Graph, k: &fusion::Kernel, name: &str) -> Result<GenKernel, String> {
    let shape = shape_of(g, k.outputs[0])?;
    epilogue(g, name, &shape, &k.nodes, &k.inputs, None, &k.outputs)
}

/// A generic kernel over `shape` computing `nodes` (elementwise) from `inputs` and storing
/// `outputs`. `pre`, if given, is a value `(v, o)` read from the buffer of value `o` at
/// the same element (a contraction result written there before; the kernel then runs in
/// place over `o`).
pub(crate) fn epilogue(
    g: &Graph,
    name: &str,
    shape: &[usize],
    nodes: &[usize],
    inputs: &[ValueId],
    pre: Option<(ValueId, ValueId)>,
    outputs: &[ValueId],
) -> Result<GenKernel, String> {
    for &o in outputs {
        if shape_of(g, o)? != shape {
            return Err(format!(
                "output '{}' has another shape than the kernel ({shape:?})",
                g.values[o].name
            ));
        }
    }
    let mut gen = Gen::default();
    let idx = gen.unravel("%i", shape);
    if let Some((v, o)) = pre {
        let (buf, ty) = gen.value_buf(g, o)?;
        let x = gen.load(buf, "%i", ty);
        gen.b.vals.insert(v, (x, ty));
    }
    gen.bind_inputs(g, inputs, &idx, shape)?;
    emit_nodes(g, &mut gen, nodes, &idx, shape)?;
    store_outputs(g, &mut gen, outputs, "%i")?;
    Ok(gen.finish(name, shape.iter().product::<usize>() as u64))
}

/// Emits elementwise `nodes` in order, binding (loading) any input not bound yet.
pub(crate) fn emit_nodes(
    g: &Graph,
    gen: &mut Gen,
    nodes: &[usize],
    idx: &[String],
    shape: &[usize],
) -> Result<(), String> {
    for &n in nodes {
        let ins: Vec<ValueId> = g.nodes[n].inputs.iter().flatten().copied().collect();
        gen.bind_inputs(g, &ins, idx, shape)?;
        emit_node(g, n, &mut gen.b)?;
    }
    Ok(())
}

/// Stores each of `outputs` at flat element `at` of its own buffer.
pub(crate) fn store_outputs(
    g: &Graph,
    gen: &mut Gen,
    outputs: &[ValueId],
    at: &str,
) -> Result<(), String> {
    for &o in outputs {
        let (x, ty) = gen.b.get(o, g)?;
        let (buf, oty) = gen.value_buf(g, o)?;
        if ty != oty {
            return Err(format!("output '{}': type mismatch", g.values[o].name));
        }
        gen.store(buf, at, &x, ty);
    }
    Ok(())
}

/// A flat copy of `n` elements of type `ty` from `src` to `dst` (offsets in elements).
pub(crate) fn copy(
    name: &str,
    (src, src_len): (Operand, u64),
    (dst, dst_len): (Operand, u64),
    ty: Ty,
    n: u64,
) -> GenKernel {
    let mut gen = Gen::default();
    let e = super::generic::elem_of(ty);
    let s = gen.buf(src, e, src_len);
    let d = gen.buf(dst, e, dst_len);
    let x = gen.load(s, "%i", ty);
    gen.store(d, "%i", &x, ty);
    gen.finish(name, n)
}
