//! `Reduction` kernels over the last axis. A kernel that is exactly one last-axis `Softmax`
//! uses the specialized warp-per-row kernel
//! ([`row_softmax`](crate::gpu::kernels::softmax::row_softmax)), one last-axis
//! `LayerNormalization` with scale and bias [`norm::layer_norm`], one last-axis
//! `ReduceSum`/`Mean`/`Max` [`rk::reduce_rows`]; every other one (LayerNorm with neighbours,
//! decomposed LayerNorm chains, `Reduce*` with prologue/epilogue, LogSoftmax) takes the
//! generic path with **one thread per row**, mirroring the CPU lowering
//! ([`crate::cpu::lower::reduction`]): each reduction is an `scf.for` over the row with an
//! `iter_args` accumulator, full-shape elementwise values are recomputed inside each pass that
//! needs them, row values are computed once, and a final pass stores full-shape outputs.

use super::elementwise::{emit_nodes, store_outputs};
use super::generic::Gen;
use super::{
    kernels, node_input, shape_of, GpuLowering, HostKernel, Launch, LaunchArg, LowerOptions,
    Operand,
};
use crate::cpu::lower::elementwise::emit_node;
use crate::cpu::lower::{fastmath, Ty};
use crate::gpu::kernels::norm;
use crate::gpu::kernels::reduce::{self as rk, RowMode};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::ops::reduce::ReduceKind;
use kiln_ir::{DType, Graph, Op, ValueId};
use kiln_passes::fusion;
use std::collections::HashMap;

/// Rows per block of the specialized softmax.
const SOFTMAX_ROWS_PER_BLOCK: u32 = 4;

/// Whether node `n` reduces over the last axis only (returns its kind): the CPU
/// lowering's test.
fn last_axis_reduce(g: &Graph, n: usize) -> Result<Option<ReduceKind>, String> {
    Ok(crate::cpu::lower::reduction::last_axis_reduce(g, n)?.map(|(kind, _)| kind))
}

fn check_last_axis(g: &Graph, n: usize, axis: i64) -> Result<(), String> {
    let rank = shape_of(g, node_input(g, n, 0)?)?.len() as i64;
    let a = if axis < 0 { axis + rank } else { axis };
    if a != rank - 1 {
        return Err(format!("axis {axis} (last axis only)"));
    }
    Ok(())
}

/// Lowers a `Reduction` kernel (see the module doc).
pub(crate) fn lower(
    g: &Graph,
    k: &fusion::Kernel,
    index: usize,
    name: &str,
    opts: &LowerOptions,
    out: &mut GpuLowering,
) -> Result<(), String> {
    if opts.specialized {
        if let [n] = k.nodes[..] {
            if let Op::Nn(NnOp::Softmax(a)) = &g.nodes[n].op {
                let x = node_input(g, n, 0)?;
                let s = shape_of(g, x)?;
                let y = g.nodes[n].outputs[0];
                if check_last_axis(g, n, a.axis).is_ok()
                    && !s.is_empty()
                    && g.values[x].fact.dtype == kiln_ir::DType::F32
                    && k.outputs == [y]
                {
                    let cols = s[s.len() - 1];
                    let rows: usize = s[..s.len() - 1].iter().product();
                    let kern =
                        kernels::softmax::row_softmax("kiln_softmax_rows", SOFTMAX_ROWS_PER_BLOCK);
                    let numel = (rows * cols) as u64;
                    let buf = |v| LaunchArg::Buf {
                        operand: Operand::Value(v),
                        offset: 0,
                        len: numel,
                        elem_bytes: 4,
                    };
                    let launch = Launch {
                        index,
                        kernel: String::new(),
                        args: vec![
                            buf(x),
                            buf(y),
                            LaunchArg::Index(rows as i64),
                            LaunchArg::Index(cols as i64),
                        ],
                        grid: [
                            kernels::blocks_for(rows as u64, SOFTMAX_ROWS_PER_BLOCK as u64, 65535),
                            1,
                            1,
                        ],
                        block: kern.block,
                        shared_bytes: 0,
                        generic: false,
                    };
                    if rows.div_ceil(SOFTMAX_ROWS_PER_BLOCK as usize) <= 65535 {
                        return out.push_special(launch, kern);
                    }
                }
            }
        }
    }
    if opts.specialized && special_rows(g, k, (index, name, opts), out)? {
        return Ok(());
    }
    let gk = lower_generic(g, k, name)?;
    out.push_generic(index, gk, opts.max_blocks)
}

/// A kernel that is exactly one `LayerNormalization` over the last axis with `[n]` scale
/// and bias (one output; possibly after an elementwise prologue of the same shape, which
/// then runs first as a generic kernel into the buffer of LayerNorm's input if that is a
/// kernel output, else of its output, read in place) → [`norm::layer_norm`], or exactly one last-axis
/// `ReduceSum`/`ReduceMean`/`ReduceMax` → [`rk::reduce_rows`], with a warp per row up to
/// 1024 columns, else a block per row ([`RowMode::for_len`]); `Ok(false)` otherwise.
fn special_rows(
    g: &Graph,
    k: &fusion::Kernel,
    (index, name, opts): (usize, &str, &LowerOptions),
    out: &mut GpuLowering,
) -> Result<bool, String> {
    let Some((&n, prologue)) = k.nodes.split_last() else {
        return Ok(false);
    };
    let node = &g.nodes[n];
    let x = node_input(g, n, 0)?;
    let y = node.outputs[0];
    let xs = shape_of(g, x)?;
    let f32 = |v: ValueId| g.values[v].fact.dtype == DType::F32;
    // LayerNorm's input may come from an elementwise prologue (a residual add), computed
    // first by a generic kernel into the buffer of `x` (if an output) or of `y`.
    let produced: Vec<ValueId> = prologue
        .iter()
        .flat_map(|&p| g.nodes[p].outputs.iter().copied())
        .collect();
    let outputs_ok = if prologue.is_empty() {
        k.outputs == [y]
    } else {
        k.outputs.contains(&y) && k.outputs.iter().all(|&o| o == y || o == x)
    };
    if xs.is_empty() || !f32(x) || !f32(y) || !outputs_ok {
        return Ok(false);
    }
    if !prologue.is_empty() {
        if !matches!(node.op, Op::Nn(NnOp::LayerNormalization(_))) || !produced.contains(&x) {
            return Ok(false);
        }
        for &p in prologue {
            if !matches!(g.nodes[p].op, Op::Elementwise(_)) {
                return Ok(false);
            }
        }
        for &v in &produced {
            if shape_of(g, v)? != xs {
                return Ok(false);
            }
        }
        if node
            .inputs
            .iter()
            .skip(1)
            .flatten()
            .any(|v| produced.contains(v))
        {
            return Ok(false);
        }
    }
    let cols = xs[xs.len() - 1];
    let rows: usize = xs[..xs.len() - 1].iter().product();
    if cols == 0 || rows == 0 {
        return Ok(false);
    }
    let mode = RowMode::for_len(cols as u64);
    let tag = match mode {
        RowMode::Warp { rows_per_block } => format!("warp{rows_per_block}"),
        RowMode::Block { threads } => format!("block{threads}"),
    };
    let buf = |v: ValueId, len: usize| LaunchArg::Buf {
        operand: Operand::Value(v),
        offset: 0,
        len: len as u64,
        elem_bytes: 4,
    };
    let (kern, args, host) = match &node.op {
        Op::Nn(NnOp::LayerNormalization(a)) => {
            let (Some(sc), Some(bi)) = (
                node.inputs.get(1).copied().flatten(),
                node.inputs.get(2).copied().flatten(),
            ) else {
                return Ok(false);
            };
            if check_last_axis(g, n, a.axis).is_err()
                || node.outputs.len() != 1
                || shape_of(g, y)? != xs
                || shape_of(g, sc)? != [cols]
                || shape_of(g, bi)? != [cols]
                || !f32(sc)
                || !f32(bi)
            {
                return Ok(false);
            }
            let kern = norm::layer_norm(&format!("kiln_layer_norm_{tag}"), mode)
                .map_err(|e| e.to_string())?;
            let args = vec![
                buf(x, rows * cols),
                buf(sc, cols),
                buf(bi, cols),
                buf(y, rows * cols),
                LaunchArg::Index(rows as i64),
                LaunchArg::Index(cols as i64),
                LaunchArg::F32(a.epsilon),
            ];
            (kern, args, HostKernel::LayerNorm)
        }
        Op::Reduce(_) => {
            let kind = match last_axis_reduce(g, n) {
                Ok(Some(ReduceKind::Sum)) => rk::ReduceKind::Sum,
                Ok(Some(ReduceKind::Mean)) => rk::ReduceKind::Mean,
                Ok(Some(ReduceKind::Max)) => rk::ReduceKind::Max,
                _ => return Ok(false),
            };
            if shape_of(g, y)?.iter().product::<usize>() != rows {
                return Ok(false);
            }
            let kn = format!("{kind:?}").to_ascii_lowercase();
            let kern = rk::reduce_rows(&format!("kiln_reduce_{kn}_{tag}"), kind, mode)
                .map_err(|e| e.to_string())?;
            let args = vec![
                buf(x, rows * cols),
                buf(y, rows),
                LaunchArg::Index(rows as i64),
                LaunchArg::Index(cols as i64),
            ];
            (kern, args, HostKernel::Reduce(kind))
        }
        _ => return Ok(false),
    };
    let launch = Launch {
        index,
        kernel: String::new(),
        args,
        grid: mode.grid(rows as u64),
        block: mode.block(),
        shared_bytes: 0,
        generic: false,
    };
    let mut launch = launch;
    if !prologue.is_empty() {
        let target = if k.outputs.contains(&x) { x } else { y };
        let mut gen = Gen::default();
        let idx = gen.unravel("%i", &xs);
        emit_nodes(g, &mut gen, prologue, &idx, &xs)?;
        if target == y {
            let xv = gen.b.get(x, g)?;
            gen.b.vals.insert(y, xv);
        }
        store_outputs(g, &mut gen, &[target], "%i")?;
        let gk = gen.finish(&format!("{name}_prologue"), (rows * cols) as u64);
        out.push_generic(index, gk, opts.max_blocks)?;
        if let LaunchArg::Buf { operand, .. } = &mut launch.args[0] {
            *operand = Operand::Value(target);
        }
    }
    out.note_host(&kern.name, host);
    out.push_special(launch, kern)?;
    Ok(true)
}

/// State of the per-row emission.
struct Ctx<'a> {
    g: &'a Graph,
    gen: Gen,
    shape: Vec<usize>,
    /// Index of each iteration dim, where in scope.
    ivs: Vec<Option<String>>,
    producer: HashMap<ValueId, usize>,
    stats: HashMap<usize, (String, String)>,
    /// Kernel inputs (loaded on demand).
    inputs: Vec<ValueId>,
}

impl Ctx<'_> {
    /// The value of `v` at the current iteration point (emitting what is needed).
    fn elem(&mut self, v: ValueId) -> Result<(String, Ty), String> {
        if let Some(x) = self.gen.b.vals.get(&v) {
            return Ok(x.clone());
        }
        let g = self.g;
        if self.inputs.contains(&v) {
            let s = shape_of(g, v)?;
            let r = self.shape.len();
            let off = r - s.len().min(r);
            let mut idx = Vec::new();
            for d in 0..r {
                match &self.ivs[d] {
                    Some(x) => idx.push(x.clone()),
                    None => {
                        if d >= off && s[d - off] != 1 {
                            return Err(format!(
                                "value '{}' is read per row but varies along the row",
                                g.values[v].name
                            ));
                        }
                        let c = self.gen.c(0);
                        idx.push(c);
                    }
                }
            }
            self.gen.bind_inputs(g, &[v], &idx, &self.shape)?;
            return self.gen.b.get(v, g);
        }
        let n = *self
            .producer
            .get(&v)
            .ok_or_else(|| format!("value '{}' is not available", g.values[v].name))?;
        let node = &g.nodes[n];
        let r = match &node.op {
            Op::Elementwise(_) => {
                for i in node.inputs.iter().flatten() {
                    self.elem(*i)?;
                }
                emit_node(g, n, &mut self.gen.b)?;
                return self.gen.b.get(v, g);
            }
            Op::Nn(NnOp::Softmax(_) | NnOp::LogSoftmax(_)) => {
                let x = self.elem(node_input(g, n, 0)?)?.0;
                let (mx, s) = self.stats.get(&n).cloned().ok_or("softmax stats")?;
                let d = self.gen.b.f2("subf", &x, &mx);
                if matches!(node.op, Op::Nn(NnOp::Softmax(_))) {
                    let e = fastmath::exp(&mut self.gen.b, &d);
                    self.gen.b.f2("mulf", &e, &s)
                } else {
                    self.gen.b.f2("subf", &d, &s)
                }
            }
            Op::Nn(NnOp::LayerNormalization(_)) => {
                let x = self.elem(node_input(g, n, 0)?)?.0;
                let (mean, rstd) = self.stats.get(&n).cloned().ok_or("layernorm stats")?;
                let d = self.gen.b.f2("subf", &x, &mean);
                let mut y = self.gen.b.f2("mulf", &d, &rstd);
                let s = self.elem(node_input(g, n, 1)?)?.0;
                y = self.gen.b.f2("mulf", &y, &s);
                if let Some(bv) = node.inputs.get(2).copied().flatten() {
                    let bb = self.elem(bv)?.0;
                    y = self.gen.b.f2("addf", &y, &bb);
                }
                y
            }
            other => return Err(format!("{} is not computed per element", other.op_type())),
        };
        self.gen.b.vals.insert(v, (r.clone(), Ty::F32));
        Ok((r, Ty::F32))
    }

    /// One pass over the row folding `f(acc, x)` from `init`; returns the result.
    fn pass(
        &mut self,
        x: ValueId,
        init: &str,
        f: impl FnOnce(&mut Gen, &str, &str) -> String,
    ) -> Result<String, String> {
        let saved = (self.gen.b.vals.clone(), self.gen.consts.clone());
        let c0 = self.gen.c(0);
        let c1 = self.gen.c(1);
        let cn = self.gen.c(self.shape[self.shape.len() - 1] as i64);
        let (j, acc, res) = (self.gen.b.fresh(), self.gen.b.fresh(), self.gen.b.fresh());
        self.gen.b.raw(&format!(
            "{res} = scf.for {j} = {c0} to {cn} step {c1} iter_args({acc} = {init}) -> (f32) {{"
        ));
        let last = self.shape.len() - 1;
        self.ivs[last] = Some(j);
        let (xv, ty) = self.elem(x)?;
        if ty != Ty::F32 {
            return Err("reduction of a non-f32 value".into());
        }
        let new = f(&mut self.gen, &acc, &xv);
        self.gen.b.raw(&format!("scf.yield {new} : f32"));
        self.gen.b.raw("}");
        self.ivs[last] = None;
        (self.gen.b.vals, self.gen.consts) = saved;
        Ok(res)
    }
}

fn add(gen: &mut Gen, acc: &str, x: &str) -> String {
    gen.b.f2("addf", acc, x)
}

/// The generic (thread per row) lowering of a `Reduction` kernel.
pub(crate) fn lower_generic(
    g: &Graph,
    k: &fusion::Kernel,
    name: &str,
) -> Result<super::GenKernel, String> {
    let first = k
        .nodes
        .iter()
        .copied()
        .find(|&n| !matches!(g.nodes[n].op, Op::Elementwise(_)))
        .ok_or("no reduction node")?;
    let shape = shape_of(g, node_input(g, first, 0)?)?;
    if shape.is_empty() || shape[shape.len() - 1] == 0 {
        return Err("empty or scalar reduction".into());
    }
    let r = shape.len();
    let mut row_shape = shape.clone();
    row_shape[r - 1] = 1;
    let is_row = |s: &[usize]| s == row_shape.as_slice() || s == &shape[..r - 1];
    for &n in &k.nodes {
        let node = &g.nodes[n];
        match &node.op {
            Op::Elementwise(_) => {}
            Op::Reduce(_) => {
                last_axis_reduce(g, n)?.ok_or("not a reduction")?;
            }
            Op::Nn(NnOp::Softmax(a) | NnOp::LogSoftmax(a)) => check_last_axis(g, n, a.axis)?,
            Op::Nn(NnOp::LayerNormalization(a)) => {
                check_last_axis(g, n, a.axis)?;
                if node.outputs.len() > 1 {
                    return Err("LayerNormalization with Mean/InvStdDev outputs".into());
                }
            }
            other => return Err(format!("{} in a reduction kernel", other.op_type())),
        }
        for &o in &node.outputs {
            let s = shape_of(g, o)?;
            if s != shape && !is_row(&s) {
                return Err(format!(
                    "node '{}' output shape {s:?} is neither the row space {shape:?} nor a row",
                    node.name
                ));
            }
        }
    }
    let producer: HashMap<ValueId, usize> = k
        .nodes
        .iter()
        .flat_map(|&n| g.nodes[n].outputs.iter().map(move |&o| (o, n)))
        .collect();
    let rows: usize = shape[..r - 1].iter().product();
    let mut gen = Gen::default();
    let row_idx = gen.unravel("%i", &shape[..r - 1]);
    let mut ivs: Vec<Option<String>> = row_idx.into_iter().map(Some).collect();
    ivs.push(None);
    let mut cx = Ctx {
        g,
        gen,
        shape: shape.clone(),
        ivs,
        producer,
        stats: HashMap::new(),
        inputs: k.inputs.clone(),
    };
    let len = shape[r - 1] as f32;
    for &n in &k.nodes {
        let node = &g.nodes[n];
        match &node.op {
            Op::Elementwise(_) => {
                if shape_of(g, node.outputs[0])? != shape {
                    for &i in node.inputs.iter().flatten() {
                        cx.elem(i)?;
                    }
                    emit_node(g, n, &mut cx.gen.b)?;
                }
            }
            Op::Reduce(_) => {
                let kind = last_axis_reduce(g, n)?.ok_or("not a reduction")?;
                let x = node_input(g, n, 0)?;
                let (init, op) = match kind {
                    ReduceKind::Max => (f32::NEG_INFINITY, "arith.maximumf"),
                    ReduceKind::Min => (f32::INFINITY, "arith.minimumf"),
                    _ => (0.0, "arith.addf"),
                };
                let i0 = cx.gen.b.fc(init);
                let mut res = cx.pass(x, &i0, |gen, acc, x| {
                    if op == "arith.addf" {
                        add(gen, acc, x)
                    } else {
                        gen.b.op(&format!("{op} {acc}, {x} : f32"))
                    }
                })?;
                if kind == ReduceKind::Mean {
                    let c = cx.gen.b.fc(len);
                    res = cx.gen.b.f2("divf", &res, &c);
                }
                cx.gen.b.vals.insert(node.outputs[0], (res, Ty::F32));
            }
            Op::Nn(NnOp::Softmax(_) | NnOp::LogSoftmax(_)) => {
                let x = node_input(g, n, 0)?;
                let i0 = cx.gen.b.fc(f32::NEG_INFINITY);
                let mx = cx.pass(x, &i0, |gen, acc, x| {
                    gen.b.op(&format!("arith.maximumf {acc}, {x} : f32"))
                })?;
                let z = cx.gen.b.fc(0.0);
                let m2 = mx.clone();
                let sum = cx.pass(x, &z, move |gen, acc, x| {
                    let d = gen.b.f2("subf", x, &m2);
                    let e = fastmath::exp(&mut gen.b, &d);
                    add(gen, acc, &e)
                })?;
                let s = if matches!(node.op, Op::Nn(NnOp::Softmax(_))) {
                    let one = cx.gen.b.fc(1.0);
                    cx.gen.b.f2("divf", &one, &sum)
                } else {
                    fastmath::log(&mut cx.gen.b, &sum)
                };
                cx.stats.insert(n, (mx, s));
            }
            Op::Nn(NnOp::LayerNormalization(a)) => {
                let x = node_input(g, n, 0)?;
                let z = cx.gen.b.fc(0.0);
                let s = cx.pass(x, &z, add)?;
                let c = cx.gen.b.fc(len);
                let mean = cx.gen.b.f2("divf", &s, &c);
                let m2 = mean.clone();
                let z = cx.gen.b.fc(0.0);
                let ss = cx.pass(x, &z, move |gen, acc, x| {
                    let d = gen.b.f2("subf", x, &m2);
                    let q = gen.b.f2("mulf", &d, &d);
                    add(gen, acc, &q)
                })?;
                let var = cx.gen.b.f2("divf", &ss, &c);
                let eps = cx.gen.b.fc(a.epsilon);
                let ve = cx.gen.b.f2("addf", &var, &eps);
                let rstd = cx.gen.b.op(&format!("math.rsqrt {ve} : f32"));
                cx.stats.insert(n, (mean, rstd));
            }
            _ => return Err("unexpected node".into()),
        }
    }
    // Row outputs (flat index = the row), then full outputs in a final pass.
    for &v in &k.outputs {
        let s = shape_of(g, v)?;
        if s != shape {
            let (x, ty) = cx.elem(v)?;
            let (buf, oty) = cx.gen.value_buf(g, v)?;
            if ty != oty {
                return Err("output type mismatch".into());
            }
            cx.gen.store(buf, "%i", &x, ty);
        }
    }
    let full: Vec<ValueId> = k
        .outputs
        .iter()
        .copied()
        .filter(|&v| shape_of(g, v).is_ok_and(|s| s == shape))
        .collect();
    if !full.is_empty() {
        let saved = (cx.gen.b.vals.clone(), cx.gen.consts.clone());
        let c0 = cx.gen.c(0);
        let c1 = cx.gen.c(1);
        let cn = cx.gen.c(shape[r - 1] as i64);
        let j = cx.gen.b.fresh();
        cx.gen
            .b
            .raw(&format!("scf.for {j} = {c0} to {cn} step {c1} {{"));
        cx.ivs[r - 1] = Some(j.clone());
        let base = cx.gen.ix("muli", "%i", &cn);
        let at = cx.gen.ix("addi", &base, &j);
        for &v in &full {
            let (x, ty) = cx.elem(v)?;
            let (buf, oty) = cx.gen.value_buf(g, v)?;
            if ty != oty {
                return Err("output type mismatch".into());
            }
            cx.gen.store(buf, &at, &x, ty);
        }
        cx.gen.b.raw("}");
        (cx.gen.b.vals, cx.gen.consts) = saved;
    }
    Ok(cx.gen.finish(name, rows as u64))
}
