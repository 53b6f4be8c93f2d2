//! `Reduction` kernels over the last axis, as `scf` loops that LLVM vectorises.
//!
//! The iteration space is the input shape of the kernel's first reduction node (static).
//! A loop nest runs over the leading dims (one *row* per iteration); inside it, each
//! reduction (`ReduceSum`/`ReduceMean`/`ReduceMax`/`ReduceMin` over the last axis,
//! `Softmax`/`LogSoftmax` over the last axis, `LayerNormalization` over the last axis) is an
//! `scf.for` over the row accumulating in `iter_args`; elementwise nodes producing full-shape
//! values are recomputed lazily inside every pass that needs them (prologues such as
//! attention's scale and mask), and nodes producing row values (`Add eps`, `Sqrt` of the
//! decomposed LayerNorm chain) are computed once per row. A final pass over the row stores the
//! full-shape outputs; row-shape outputs are stored once per row. Softmax is numerically
//! stable (max, sum of `exp(x - max)`, scale by `1 / sum`); LayerNorm uses two passes (mean,
//! then variance). `exp`/`log` are the inline approximations of [`super::fastmath`], and row
//! sums are `reassoc` adds, so LLVM vectorises every pass (8 lanes of partial sums/maxima).

use super::elementwise::{classify_input, emit_node, Body, InputKind};
use super::fastmath;
use super::{Lowered, Ty, GRAPH_KERNEL_PIPELINE};
use crate::cpu::abi::{Dim as PDim, Prologue};
use crate::cpu::{Kernel, KernelSignature};
use kiln_ir::ops::nn::NnOp;
use kiln_ir::ops::reduce::{ReduceAxes, ReduceKind, ReduceOp};
use kiln_ir::{Dim, Graph, Op, ValueId};
use kiln_passes::fusion;
use std::collections::HashMap;

/// State of the loop-nest emission.
struct Ctx<'a> {
    g: &'a Graph,
    b: Body,
    /// The full iteration shape.
    shape: Vec<usize>,
    /// Induction variable of each iteration dim, where in scope.
    ivs: Vec<Option<String>>,
    /// Buffer inputs: memref, the iteration dims its dims follow, element type.
    inputs: HashMap<ValueId, (String, Vec<usize>, Ty)>,
    /// The kernel node producing each value.
    producer: HashMap<ValueId, usize>,
    /// Per-row statistics of Softmax (`max`, `1 / sum`), LogSoftmax (`max`, `ln sum`) and
    /// LayerNorm (`mean`, `rstd`) nodes.
    stats: HashMap<usize, (String, String)>,
    /// The kernel's only full-shape output, when it is `f32`: the sum pass of a Softmax
    /// stores `exp(x - max)` there, and the final pass scales it instead of recomputing it.
    scratch: Option<String>,
    /// The Softmax node whose `exp(x - max)` row is in `scratch`.
    exp_in_scratch: Option<usize>,
    /// Index constants `0`, `1` and the row length.
    c0: String,
    c1: String,
    cn: String,
}

impl Ctx<'_> {
    /// The value of `v` at the current iteration point (emitting what is needed).
    fn elem(&mut self, v: ValueId) -> Result<(String, Ty), String> {
        if let Some(x) = self.b.vals.get(&v) {
            return Ok(x.clone());
        }
        let g = self.g;
        if let Some((m, dims, ty)) = self.inputs.get(&v).cloned() {
            let idx: Vec<String> = dims
                .iter()
                .map(|&d| self.ivs[d].clone().ok_or("index out of scope"))
                .collect::<Result<_, _>>()?;
            let x = self.b.op(&format!(
                "memref.load {m}[{}] : {}",
                idx.join(", "),
                crate::cpu::abi::memref_type_of(dims.len(), ty.storage())
            ));
            let x = if ty == Ty::I1 {
                self.b.op(&format!("arith.trunci {x} : i8 to i1"))
            } else {
                x
            };
            self.b.vals.insert(v, (x.clone(), ty));
            return Ok((x, ty));
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
                emit_node(g, n, &mut self.b)?;
                return self.b.get(v, g);
            }
            Op::Nn(NnOp::Softmax(_) | NnOp::LogSoftmax(_)) => {
                let x = self.elem(input(g, n, 0)?)?.0;
                let (mx, s) = self.stats.get(&n).cloned().ok_or("softmax stats")?;
                if let (Some(m), Some(_)) = (&self.scratch, self.exp_in_scratch.filter(|&k| k == n))
                {
                    let idx = self.full_index()?;
                    let e = self.b.op(&format!(
                        "memref.load {m}[{}] : {}",
                        idx.join(", "),
                        crate::cpu::abi::memref_type_of(idx.len(), Ty::F32.storage())
                    ));
                    let r = self.b.f2("mulf", &e, &s);
                    self.b.vals.insert(v, (r.clone(), Ty::F32));
                    return Ok((r, Ty::F32));
                }
                let d = self.b.f2("subf", &x, &mx);
                if matches!(node.op, Op::Nn(NnOp::Softmax(_))) {
                    let e = fastmath::exp(&mut self.b, &d);
                    self.b.f2("mulf", &e, &s)
                } else {
                    self.b.f2("subf", &d, &s)
                }
            }
            Op::Nn(NnOp::LayerNormalization(_)) => {
                let x = self.elem(input(g, n, 0)?)?.0;
                let (mean, rstd) = self.stats.get(&n).cloned().ok_or("layernorm stats")?;
                let d = self.b.f2("subf", &x, &mean);
                let mut y = self.b.f2("mulf", &d, &rstd);
                let s = self.elem(input(g, n, 1)?)?.0;
                y = self.b.f2("mulf", &y, &s);
                if let Some(bv) = node.inputs.get(2).copied().flatten() {
                    let bb = self.elem(bv)?.0;
                    y = self.b.f2("addf", &y, &bb);
                }
                y
            }
            other => return Err(format!("{} is not computed per element", other.op_type())),
        };
        self.b.vals.insert(v, (r.clone(), Ty::F32));
        Ok((r, Ty::F32))
    }

    /// The indices of the current element (every iteration dim in scope).
    fn full_index(&self) -> Result<Vec<String>, String> {
        self.ivs
            .iter()
            .map(|i| i.clone().ok_or_else(|| "index out of scope".to_string()))
            .collect()
    }

    /// Emits one pass over the row folding `f(x)` into an `f32` accumulator starting at
    /// `init`, and returns the final accumulator. `f` also gets the element's indices.
    fn pass(
        &mut self,
        x: ValueId,
        init: &str,
        f: impl FnOnce(&mut Body, &str, &str, &[String]) -> String,
    ) -> Result<String, String> {
        let saved = self.b.vals.clone();
        let (j, acc, res) = (self.b.fresh(), self.b.fresh(), self.b.fresh());
        let last = self.shape.len() - 1;
        self.b.raw(&format!(
            "{res} = scf.for {j} = {} to {} step {} iter_args({acc} = {init}) -> (f32) {{",
            self.c0, self.cn, self.c1
        ));
        self.ivs[last] = Some(j);
        let (xv, ty) = self.elem(x)?;
        if ty != Ty::F32 {
            return Err("reduction of a non-f32 value".into());
        }
        let idx = self.full_index()?;
        let new = f(&mut self.b, &acc, &xv, &idx);
        self.b.raw(&format!("scf.yield {new} : f32"));
        self.b.raw("}");
        self.ivs[last] = None;
        self.b.vals = saved;
        Ok(res)
    }
}

/// Input `i` of node `n`.
fn input(g: &Graph, n: usize, i: usize) -> Result<ValueId, String> {
    g.nodes[n]
        .inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("node '{}': input {i} is missing", g.nodes[n].name))
}

/// Whether node `n` reduces over the last axis only (returns its kind and keepdims).
pub(crate) fn last_axis_reduce(g: &Graph, n: usize) -> Result<Option<(ReduceKind, bool)>, String> {
    let node = &g.nodes[n];
    let Op::Reduce(ReduceOp::Reduce {
        kind,
        axes,
        keepdims,
        ..
    }) = &node.op
    else {
        return Ok(None);
    };
    let rank = g.values[input(g, n, 0)?].fact.shape.dims().len() as i64;
    let ax: Vec<i64> = match axes {
        ReduceAxes::Attr(Some(a)) => a.clone(),
        ReduceAxes::Input => match node.inputs.get(1).copied().flatten() {
            Some(a) => g
                .const_value(a)
                .ok_or("non-constant reduction axes")?
                .to_f64_vec()
                .iter()
                .map(|&x| x as i64)
                .collect(),
            None => return Err("reduction over all axes".into()),
        },
        ReduceAxes::Attr(None) => return Err("reduction over all axes".into()),
    };
    let ax: Vec<i64> = ax
        .iter()
        .map(|&a| if a < 0 { a + rank } else { a })
        .collect();
    if ax != [rank - 1] {
        return Err(format!("reduction over axes {ax:?} (last axis only)"));
    }
    if !matches!(
        kind,
        ReduceKind::Sum | ReduceKind::Mean | ReduceKind::Max | ReduceKind::Min
    ) {
        return Err(format!("reduction {kind:?}"));
    }
    Ok(Some((*kind, *keepdims)))
}

/// Checks that the axis of a Softmax/LayerNorm node is the last one (where opset < 13
/// Softmax's coercion to 2-D changes nothing).
fn check_last_axis(g: &Graph, n: usize, axis: i64) -> Result<(), String> {
    let rank = g.values[input(g, n, 0)?].fact.shape.dims().len() as i64;
    let a = if axis < 0 { axis + rank } else { axis };
    if a != rank - 1 {
        return Err(format!("axis {axis} (last axis only)"));
    }
    Ok(())
}

/// Lowers a `Reduction` kernel.
pub(crate) fn lower(g: &Graph, k: &fusion::Kernel, name: &str) -> Result<Lowered, String> {
    // The iteration space: the input of the first reduction-like node.
    let first = k
        .nodes
        .iter()
        .copied()
        .find(|&n| !matches!(g.nodes[n].op, Op::Elementwise(_)))
        .ok_or("no reduction node")?;
    let known = |v: ValueId| -> Result<Vec<usize>, String> {
        g.values[v]
            .fact
            .shape
            .as_known()
            .ok_or_else(|| format!("value '{}' has a symbolic shape", g.values[v].name))
    };
    let shape = known(input(g, first, 0)?)?;
    if shape.is_empty() || shape[shape.len() - 1] == 0 {
        return Err("empty or scalar reduction".into());
    }
    let r = shape.len();
    let full_dims: Vec<Dim> = shape.iter().map(|&d| Dim::Known(d)).collect();
    let mut row_shape = shape.clone();
    row_shape[r - 1] = 1;
    let is_row = |s: &[usize]| s == row_shape.as_slice() || s == &shape[..r - 1];
    // Check node kinds and shapes.
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
            let s = known(o)?;
            if s != shape && !is_row(&s) {
                return Err(format!(
                    "node '{}' output shape {s:?} is neither the row space {shape:?} nor a row",
                    node.name
                ));
            }
        }
        if !matches!(node.op, Op::Reduce(_)) {
            let s = known(node.outputs[0])?;
            for &i in node.inputs.iter().flatten() {
                if is_row(&s) && s != shape && !is_row(&known(i)?) && g.const_value(i).is_none() {
                    return Err(format!("node '{}' broadcasts a row", node.name));
                }
            }
        }
    }
    let mut p = Prologue::new();
    // Rows are independent: a big enough kernel splits into row tasks (a task range of the
    // flattened rows), so several threads share a Softmax or LayerNorm.
    let rows: usize = shape[..r - 1].iter().product();
    let tasks = if rows >= 2 && rows * shape[r - 1] >= super::MIN_SPLIT_ELEMS {
        rows
    } else {
        1
    };
    let range = (tasks > 1).then(|| {
        let t = p.const_index(tasks as i64);
        p.task_range(&t)
    });
    let mut b = Body::default();
    let mut inputs = HashMap::new();
    let mut args = Vec::new();
    for &v in &k.inputs {
        let ty = Ty::of(g.values[v].fact.dtype)?;
        match classify_input(g, v, &full_dims)? {
            InputKind::Scalar(x) => b.bind_const(v, x, ty),
            InputKind::Buffer(dims) => {
                let sd: Vec<PDim> = dims.iter().map(|&d| PDim::Const(shape[d] as i64)).collect();
                let m = p.memref(args.len(), &sd, ty.storage());
                args.push(v);
                inputs.insert(v, (m, dims, ty));
            }
        }
    }
    let mut outs = Vec::new();
    for (i, &v) in k.outputs.iter().enumerate() {
        let ty = Ty::of(g.values[v].fact.dtype)?;
        let s = known(v)?;
        let sd: Vec<PDim> = s.iter().map(|&d| PDim::Const(d as i64)).collect();
        let m = p.memref(args.len() + i, &sd, ty.storage());
        outs.push((v, m, s, ty));
    }
    let full: Vec<_> = outs.iter().filter(|o| o.2 == shape).collect();
    let scratch = match full.as_slice() {
        [(_, m, _, Ty::F32)] => Some(m.clone()),
        _ => None,
    };
    let producer: HashMap<ValueId, usize> = k
        .nodes
        .iter()
        .flat_map(|&n| g.nodes[n].outputs.iter().map(move |&o| (o, n)))
        .collect();
    let c0 = b.op("arith.constant 0 : index");
    let c1 = b.op("arith.constant 1 : index");
    let cn = b.op(&format!("arith.constant {} : index", shape[r - 1]));
    let mut cx = Ctx {
        g,
        b,
        shape: shape.clone(),
        ivs: vec![None; r],
        inputs,
        producer,
        stats: HashMap::new(),
        scratch,
        exp_in_scratch: None,
        c0,
        c1,
        cn,
    };
    // The loop nest over rows: one loop over this task range's flattened rows, each row's
    // indices recovered by division, or (serial) a loop per row axis.
    let loops = match &range {
        Some((begin, end)) => {
            let t = cx.b.fresh();
            cx.b.raw(&format!("scf.for {t} = {begin} to {end} step {} {{", cx.c1));
            let mut rest = t;
            for d in (0..r - 1).rev() {
                let size = cx.b.op(&format!("arith.constant {} : index", shape[d]));
                cx.ivs[d] = Some(cx.b.op(&format!("arith.remui {rest}, {size} : index")));
                rest = cx.b.op(&format!("arith.divui {rest}, {size} : index"));
            }
            1
        }
        None => {
            for (d, &size) in shape[..r - 1].iter().enumerate() {
                let n = cx.b.op(&format!("arith.constant {size} : index"));
                let iv = cx.b.fresh();
                cx.b.raw(&format!(
                    "scf.for {iv} = {} to {n} step {} {{",
                    cx.c0, cx.c1
                ));
                cx.ivs[d] = Some(iv);
            }
            r - 1
        }
    };
    let len = shape[r - 1] as f32;
    for &n in &k.nodes {
        let node = &g.nodes[n];
        match &node.op {
            Op::Elementwise(_) => {
                if known(node.outputs[0])? != shape {
                    for &i in node.inputs.iter().flatten() {
                        cx.elem(i)?;
                    }
                    emit_node(g, n, &mut cx.b)?;
                }
            }
            Op::Reduce(_) => {
                let (kind, _) = last_axis_reduce(g, n)?.ok_or("not a reduction")?;
                let x = input(g, n, 0)?;
                let (init, op) = match kind {
                    ReduceKind::Max => (f32::NEG_INFINITY, "arith.maximumf"),
                    ReduceKind::Min => (f32::INFINITY, "arith.minimumf"),
                    _ => (0.0, "arith.addf"),
                };
                let i0 = cx.b.fc(init);
                let mut res = cx.pass(x, &i0, |b, acc, x, _| {
                    if op == "arith.addf" {
                        acc_add(b, acc, x)
                    } else {
                        b.op(&format!("{op} {acc}, {x} : f32"))
                    }
                })?;
                if kind == ReduceKind::Mean {
                    let c = cx.b.fc(len);
                    res = cx.b.f2("divf", &res, &c);
                }
                cx.b.vals.insert(node.outputs[0], (res, Ty::F32));
            }
            Op::Nn(NnOp::Softmax(_) | NnOp::LogSoftmax(_)) => {
                let x = input(g, n, 0)?;
                let i0 = cx.b.fc(f32::NEG_INFINITY);
                let mx = cx.pass(x, &i0, |b, acc, x, _| {
                    b.op(&format!("arith.maximumf {acc}, {x} : f32"))
                })?;
                let z = cx.b.fc(0.0);
                let m2 = mx.clone();
                // the first Softmax of a kernel with one f32 full-shape output keeps its
                // exponentials there for the final pass
                let keep = matches!(node.op, Op::Nn(NnOp::Softmax(_)))
                    && cx.exp_in_scratch.is_none()
                    && cx.scratch.is_some();
                let scratch = cx.scratch.clone().filter(|_| keep);
                let sum = cx.pass(x, &z, move |b, acc, x, idx| {
                    let d = b.f2("subf", x, &m2);
                    let e = fastmath::exp(b, &d);
                    if let Some(m) = &scratch {
                        store(b, &e, m, idx, Ty::F32);
                    }
                    acc_add(b, acc, &e)
                })?;
                if keep {
                    cx.exp_in_scratch = Some(n);
                }
                let s = if matches!(node.op, Op::Nn(NnOp::Softmax(_))) {
                    let one = cx.b.fc(1.0);
                    cx.b.f2("divf", &one, &sum)
                } else {
                    fastmath::log(&mut cx.b, &sum)
                };
                cx.stats.insert(n, (mx, s));
            }
            Op::Nn(NnOp::LayerNormalization(a)) => {
                let x = input(g, n, 0)?;
                let z = cx.b.fc(0.0);
                let s = cx.pass(x, &z, |b, acc, x, _| acc_add(b, acc, x))?;
                let c = cx.b.fc(len);
                let mean = cx.b.f2("divf", &s, &c);
                let m2 = mean.clone();
                let z = cx.b.fc(0.0);
                let ss = cx.pass(x, &z, move |b, acc, x, _| {
                    let d = b.f2("subf", x, &m2);
                    let q = b.f2("mulf", &d, &d);
                    acc_add(b, acc, &q)
                })?;
                let var = cx.b.f2("divf", &ss, &c);
                let eps = cx.b.fc(a.epsilon);
                let ve = cx.b.f2("addf", &var, &eps);
                let rstd = cx.b.op(&format!("math.rsqrt {ve} : f32"));
                cx.stats.insert(n, (mean, rstd));
            }
            _ => unreachable!("checked above"),
        }
    }
    // Row outputs, then full outputs in a final pass.
    for (v, m, s, ty) in &outs {
        if *s != shape {
            let (x, _) = cx.elem(*v)?;
            let mut idx: Vec<String> = cx.ivs[..r - 1].iter().flatten().cloned().collect();
            if s.len() == r {
                idx.push(cx.c0.clone());
            }
            store(&mut cx.b, &x, m, &idx, *ty);
        }
    }
    if outs.iter().any(|o| o.2 == shape) {
        let saved = cx.b.vals.clone();
        let j = cx.b.fresh();
        cx.b.raw(&format!(
            "scf.for {j} = {} to {} step {} {{",
            cx.c0, cx.cn, cx.c1
        ));
        cx.ivs[r - 1] = Some(j);
        let idx: Vec<String> = cx.ivs.iter().flatten().cloned().collect();
        for (v, m, s, ty) in &outs {
            if *s == shape {
                let (x, xt) = cx.elem(*v)?;
                if xt != *ty {
                    return Err("output type mismatch".into());
                }
                store(&mut cx.b, &x, m, &idx, *ty);
            }
        }
        cx.b.raw("}");
        cx.b.vals = saved;
    }
    for _ in 0..loops {
        cx.b.raw("}");
    }
    p.push(&cx.b.into_text());
    let kernel = Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: args.len(),
            outputs: outs.len(),
            dims: vec![],
            tasks: tasks as u64,
            scratch_bytes: 0,
        },
        mlir: p.finish(name),
        pipeline: GRAPH_KERNEL_PIPELINE.to_string(),
    };
    Ok((kernel, args, k.outputs.clone()))
}

/// `acc + x` for a sum over a row, with `reassoc` and `nsz` (what LLVM needs to treat it as
/// an associative reduction) so that LLVM may vectorise the loop, or the unrolled row (it
/// keeps partial sums per vector lane and adds them up at the end).
fn acc_add(b: &mut Body, acc: &str, x: &str) -> String {
    b.op(&format!(
        "arith.addf {acc}, {x} fastmath<reassoc,nsz,contract> : f32"
    ))
}

/// `memref.store x, m[idx]` (bools widened to bytes).
fn store(b: &mut Body, x: &str, m: &str, idx: &[String], ty: Ty) {
    let x = if ty == Ty::I1 {
        b.op(&format!("arith.extui {x} : i1 to i8"))
    } else {
        x.to_string()
    };
    b.raw(&format!(
        "memref.store {x}, {m}[{}] : {}",
        idx.join(", "),
        crate::cpu::abi::memref_type_of(idx.len(), ty.storage())
    ));
}
