//! `Elementwise` kernels (and contraction epilogues) as one `linalg.generic`.
//!
//! The iteration space is the kernel's output shape. Each buffer input is declared with its
//! size-1 broadcast dims dropped, so its indexing map is a projection of the iteration space
//! (numpy broadcasting: dims aligned on the right). Scalar constants become `arith.constant`s
//! in the body. Values in the body are `f32`, `i64` or `i1` (bools are bytes in buffers).

use super::{fastmath, Lowered, SymDims, Ty, GRAPH_KERNEL_PIPELINE};
use crate::cpu::abi::Prologue;
use crate::cpu::{Kernel, KernelSignature};
use kiln_ir::ops::elementwise::{
    BinaryKind, ClipBounds, CompareKind, ElementwiseOp, GeluApprox, LogicalKind, PredicateKind,
    UnaryKind, VariadicKind,
};
use kiln_ir::{Dim, Graph, Op, ValueId};
use kiln_passes::fusion;
use std::collections::HashMap;
use std::fmt::Write as _;

/// A buffer input of a `linalg.generic`.
#[derive(Debug, Clone)]
pub(crate) struct GenericInput {
    /// The graph value it holds.
    pub value: ValueId,
    /// SSA name of its memref.
    pub memref: String,
    /// For each memref dim, the iteration dim it follows.
    pub dims: Vec<usize>,
    /// Element type.
    pub ty: Ty,
}

/// A buffer output of a `linalg.generic` (full iteration shape).
#[derive(Debug, Clone)]
pub(crate) struct GenericOutput {
    /// The graph value written.
    pub value: ValueId,
    /// SSA name of its memref.
    pub memref: String,
    /// Element type.
    pub ty: Ty,
}

/// How a kernel input enters the body.
pub(crate) enum InputKind {
    /// A scalar constant, inlined.
    Scalar(f64),
    /// A buffer whose memref dims follow these iteration dims.
    Buffer(Vec<usize>),
}

/// Classifies kernel input `v` for an iteration space `shape`.
pub(crate) fn classify_input(g: &Graph, v: ValueId, shape: &[Dim]) -> Result<InputKind, String> {
    let val = &g.values[v];
    Ty::of(val.fact.dtype).map_err(|e| format!("input '{}': {e}", val.name))?;
    if let Some(t) = g.const_value(v) {
        if t.len() == 1 {
            return Ok(InputKind::Scalar(t.to_f64_vec()[0]));
        }
    }
    broadcast_dims(val.fact.shape.dims(), shape)
        .map(InputKind::Buffer)
        .map_err(|e| format!("input '{}': {e}", val.name))
}

/// The iteration dims followed by the kept dims of an input of shape `input` broadcast to
/// `out` (size-1 dims that broadcast are dropped).
pub(crate) fn broadcast_dims(input: &[Dim], out: &[Dim]) -> Result<Vec<usize>, String> {
    if input.len() > out.len() {
        return Err(format!(
            "rank {} does not broadcast to rank {}",
            input.len(),
            out.len()
        ));
    }
    let off = out.len() - input.len();
    let mut kept = Vec::new();
    for (j, d) in input.iter().enumerate() {
        let o = &out[j + off];
        if d.is_anonymous() || o.is_anonymous() {
            return Err("anonymous dims".into());
        }
        if d == o {
            kept.push(j + off);
        } else if *d != Dim::Known(1) {
            return Err(format!("dim {d} does not broadcast to {o}"));
        }
    }
    Ok(kept)
}

/// Lowers an `Elementwise` kernel.
pub(crate) fn lower(g: &Graph, k: &fusion::Kernel, name: &str) -> Result<Lowered, String> {
    let shape = g.values[k.outputs[0]].fact.shape.dims().to_vec();
    for &n in &k.nodes {
        for &o in &g.nodes[n].outputs {
            if g.values[o].fact.shape.dims() != shape.as_slice() {
                return Err(format!(
                    "node '{}' has another shape than the kernel",
                    g.nodes[n].name
                ));
            }
        }
    }
    let mut syms = SymDims::default();
    let mut p = Prologue::new();
    // A big static kernel splits into tasks along its first axis of size >= 2 (the axes
    // before it have size 1, so each task's part of every buffer is contiguous).
    let split = shape
        .iter()
        .map(Dim::known)
        .collect::<Option<Vec<usize>>>()
        .filter(|s| s.iter().product::<usize>() >= super::MIN_SPLIT_ELEMS)
        .and_then(|s| s.iter().position(|&d| d >= 2).map(|a| (a, s[a])));
    let range = split.map(|(a, n)| {
        let t = p.const_index(n as i64);
        let (b, e) = p.task_range(&t);
        p.push(&format!("  %ew_n = arith.subi {e}, {b} : index"));
        (a, b, "%ew_n".to_string())
    });
    let mut scalars = Vec::new();
    let mut ins = Vec::new();
    let mut arg_vals = Vec::new();
    for &v in &k.inputs {
        let ty = Ty::of(g.values[v].fact.dtype)?;
        match classify_input(g, v, &shape)? {
            InputKind::Scalar(x) => scalars.push((v, x, ty)),
            InputKind::Buffer(dims) => {
                let sd = syms.dims(&dims.iter().map(|&d| shape[d].clone()).collect::<Vec<_>>())?;
                // this task's part, unless the input is broadcast along the split axis
                let memref = match &range {
                    Some((a, b, n)) if dims.contains(a) => {
                        let j = dims.iter().position(|d| d == a).expect("contained");
                        p.memref_range(arg_vals.len(), &sd, ty.storage(), j, b, n)
                    }
                    _ => p.memref(arg_vals.len(), &sd, ty.storage()),
                };
                arg_vals.push(v);
                ins.push(GenericInput {
                    value: v,
                    memref,
                    dims,
                    ty,
                });
            }
        }
    }
    let full = syms.dims(&shape)?;
    let mut outs = Vec::new();
    for (i, &v) in k.outputs.iter().enumerate() {
        let ty = Ty::of(g.values[v].fact.dtype)?;
        let memref = match &range {
            Some((a, b, n)) => p.memref_range(arg_vals.len() + i, &full, ty.storage(), *a, b, n),
            None => p.memref(arg_vals.len() + i, &full, ty.storage()),
        };
        outs.push(GenericOutput {
            value: v,
            memref,
            ty,
        });
    }
    let generic = |ins: &[GenericInput]| {
        let mut body = Body::default();
        for &(v, x, ty) in &scalars {
            body.bind_const(v, x, ty);
        }
        emit_generic(g, shape.len(), ins, &outs, body, &k.nodes, |_| Ok(()))
    };
    // The memory plan may run the kernel in place (output 0 in the buffer of a full-shape
    // input). LLVM's vectoriser then sees two pointers closer than a vector and falls back to
    // its scalar loop; so each such input gets a version of the loop that reads it through
    // the output's memref (same pointer: no dependence check), chosen at run time.
    let rank = shape.len();
    let candidates: Vec<usize> = (0..ins.len())
        .filter(|&i| {
            ins[i].dims.len() == rank && ins[i].dims.iter().enumerate().all(|(a, &d)| a == d)
        })
        .filter(|&i| ins[i].ty == outs[0].ty)
        .take(MAX_IN_PLACE_VERSIONS)
        .collect();
    let mut text = String::new();
    if !candidates.is_empty() {
        let mt = crate::cpu::abi::memref_type_of(rank, outs[0].ty.storage());
        let _ = writeln!(
            text,
            "  %ip_out = memref.extract_aligned_pointer_as_index {} : {mt} -> index",
            outs[0].memref
        );
        for (ci, &c) in candidates.iter().enumerate() {
            let _ = writeln!(
                text,
                "  %ip_in{ci} = memref.extract_aligned_pointer_as_index {} : {mt} -> index\n  %ip_eq{ci} = arith.cmpi eq, %ip_in{ci}, %ip_out : index\n  scf.if %ip_eq{ci} {{",
                ins[c].memref
            );
            let mut aliased = ins.clone();
            aliased[c].memref = outs[0].memref.clone();
            text.push_str(&generic(&aliased)?);
            let _ = writeln!(text, "  }} else {{");
        }
    }
    text.push_str(&generic(&ins)?);
    for _ in &candidates {
        let _ = writeln!(text, "  }}");
    }
    p.push(&text);
    let kernel = Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: arg_vals.len(),
            outputs: outs.len(),
            dims: syms.0,
            tasks: split.map_or(1, |(_, n)| n as u64),
            scratch_bytes: 0,
        },
        mlir: p.finish(name),
        pipeline: GRAPH_KERNEL_PIPELINE.to_string(),
    };
    Ok((kernel, arg_vals, k.outputs.clone()))
}

/// At most this many inputs of an elementwise kernel get an in-place version of its loop.
const MAX_IN_PLACE_VERSIONS: usize = 3;

/// An affine map from `rank` iteration dims to `dims`.
fn affine_map(rank: usize, dims: &[usize]) -> String {
    let all: Vec<String> = (0..rank).map(|d| format!("d{d}")).collect();
    let res: Vec<String> = dims.iter().map(|d| format!("d{d}")).collect();
    format!("affine_map<({}) -> ({})>", all.join(", "), res.join(", "))
}

/// Emits a `linalg.generic` over an iteration space of rank `rank`: block arguments for
/// `ins` (bound to their values in `body`), then `pre` (which may bind more values), then
/// `nodes` in order, yielding the values of `outs`.
pub(crate) fn emit_generic(
    g: &Graph,
    rank: usize,
    ins: &[GenericInput],
    outs: &[GenericOutput],
    mut body: Body,
    nodes: &[usize],
    pre: impl FnOnce(&mut Body) -> Result<(), String>,
) -> Result<String, String> {
    let mut maps: Vec<String> = ins.iter().map(|i| affine_map(rank, &i.dims)).collect();
    let ident: Vec<usize> = (0..rank).collect();
    maps.extend(outs.iter().map(|_| affine_map(rank, &ident)));
    let iters = vec!["\"parallel\""; rank].join(", ");
    let mut args = Vec::new();
    for (i, inp) in ins.iter().enumerate() {
        args.push(format!("%in{i}: {}", inp.ty.storage()));
        let a = format!("%in{i}");
        let v = if inp.ty == Ty::I1 {
            body.op(&format!("arith.trunci {a} : i8 to i1"))
        } else {
            a
        };
        body.vals.insert(inp.value, (v, inp.ty));
    }
    for (i, o) in outs.iter().enumerate() {
        args.push(format!("%out{i}: {}", o.ty.storage()));
    }
    pre(&mut body)?;
    for &n in nodes {
        emit_node(g, n, &mut body)?;
    }
    let mut yields = Vec::new();
    for o in outs {
        let (v, ty) = body.get(o.value, g)?;
        if ty != o.ty {
            return Err(format!(
                "output '{}': type mismatch",
                g.values[o.value].name
            ));
        }
        let v = if ty == Ty::I1 {
            body.op(&format!("arith.extui {v} : i1 to i8"))
        } else {
            v
        };
        yields.push(v);
    }
    let mut t = String::new();
    let _ = writeln!(
        t,
        "  linalg.generic {{indexing_maps = [{}], iterator_types = [{iters}]}}",
        maps.join(", ")
    );
    if !ins.is_empty() {
        let _ = write!(
            t,
            "      ins({} : {})",
            ins.iter()
                .map(|i| i.memref.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            ins.iter()
                .map(|i| crate::cpu::abi::memref_type_of(i.dims.len(), i.ty.storage()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        t,
        " outs({} : {}) {{",
        outs.iter()
            .map(|o| o.memref.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        outs.iter()
            .map(|o| crate::cpu::abi::memref_type_of(rank, o.ty.storage()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(t, "  ^bb0({}):", args.join(", "));
    t.push_str(&body.text);
    let _ = writeln!(
        t,
        "    linalg.yield {} : {}\n  }}",
        yields.join(", "),
        outs.iter()
            .map(|o| o.ty.storage())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(t)
}

/// The body of a `linalg.generic` being built: its text and the SSA value of each graph value.
#[derive(Debug, Default)]
pub(crate) struct Body {
    text: String,
    next: usize,
    /// SSA name and type of each graph value available in the body.
    pub vals: HashMap<ValueId, (String, Ty)>,
}

impl Body {
    /// Emits `%vN = rhs` and returns `%vN`.
    pub(crate) fn op(&mut self, rhs: &str) -> String {
        self.next += 1;
        let v = format!("%v{}", self.next);
        let _ = writeln!(self.text, "    {v} = {rhs}");
        v
    }

    /// A fresh SSA name (`%vN`), for values defined by raw text such as loop results.
    pub(crate) fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next)
    }

    /// Appends a raw line (a loop header, `scf.yield`, a store...).
    pub(crate) fn raw(&mut self, line: &str) {
        let _ = writeln!(self.text, "    {line}");
    }

    /// The body text emitted so far.
    pub(crate) fn into_text(self) -> String {
        self.text
    }

    /// An `f32` constant (bit-exact hexadecimal form).
    pub(crate) fn fc(&mut self, x: f32) -> String {
        self.op(&format!("arith.constant 0x{:08X} : f32", x.to_bits()))
    }

    /// Binds `v` to a constant of type `ty`.
    pub(crate) fn bind_const(&mut self, v: ValueId, x: f64, ty: Ty) {
        let s = match ty {
            Ty::F32 => self.fc(x as f32),
            Ty::I64 => self.op(&format!("arith.constant {} : i64", x as i64)),
            Ty::I1 => self.op(&format!("arith.constant {} : i1", (x != 0.0) as i64)),
        };
        self.vals.insert(v, (s, ty));
    }

    /// The SSA value of graph value `v`.
    pub(crate) fn get(&self, v: ValueId, g: &Graph) -> Result<(String, Ty), String> {
        self.vals
            .get(&v)
            .cloned()
            .ok_or_else(|| format!("value '{}' is not available", g.values[v].name))
    }

    /// `arith.<op> a, b fastmath<contract> : f32` (`addf`, `subf`, `mulf`, `divf`).
    pub(crate) fn f2(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(&format!("arith.{op} {a}, {b} fastmath<contract> : f32"))
    }

    /// `<op> a, b : ty` without fastmath flags (`arith.maximumf`, `arith.addi`, ...).
    fn b2(&mut self, op: &str, a: &str, b: &str, ty: Ty) -> String {
        self.op(&format!("{op} {a}, {b} : {}", ty.mlir()))
    }

    /// `math.<f> a : f32`.
    fn m1(&mut self, f: &str, a: &str) -> String {
        self.op(&format!("math.{f} {a} : f32"))
    }

    /// `arith.cmpf <pred>, a, b : f32`.
    fn cmpf(&mut self, pred: &str, a: &str, b: &str) -> String {
        self.op(&format!("arith.cmpf {pred}, {a}, {b} : f32"))
    }

    /// `arith.select c, a, b : ty`.
    fn sel(&mut self, c: &str, a: &str, b: &str, ty: Ty) -> String {
        self.op(&format!("arith.select {c}, {a}, {b} : {}", ty.mlir()))
    }

    /// `lo <= x <= hi` clamping with NaN propagation.
    fn clampf(&mut self, x: &str, lo: f32, hi: f32) -> String {
        let l = self.fc(lo);
        let h = self.fc(hi);
        let a = self.b2("arith.maximumf", x, &l, Ty::F32);
        self.b2("arith.minimumf", &a, &h, Ty::F32)
    }

    /// `ln(1 + e^x)`, stable for large `|x|`.
    fn softplus(&mut self, x: &str) -> String {
        let z = self.fc(0.0);
        let pos = self.b2("arith.maximumf", x, &z, Ty::F32);
        let ax = self.m1("absf", x);
        let n = self.op(&format!("arith.negf {ax} : f32"));
        let e = fastmath::exp(self, &n);
        let l = fastmath::log1p(self, &e);
        self.f2("addf", &pos, &l)
    }
}

/// Emits node `ni` of `g` into `b`, binding its outputs.
pub(crate) fn emit_node(g: &Graph, ni: usize, b: &mut Body) -> Result<(), String> {
    let n = &g.nodes[ni];
    let Op::Elementwise(op) = &n.op else {
        return Err(format!(
            "node '{}' ({}) is not elementwise",
            n.name,
            n.op.op_type()
        ));
    };
    let input = |b: &Body, i: usize| -> Result<Option<(String, Ty)>, String> {
        match n.inputs.get(i).copied().flatten() {
            Some(v) => b.get(v, g).map(Some),
            None => Ok(None),
        }
    };
    let req = |b: &Body, i: usize| -> Result<(String, Ty), String> {
        input(b, i)?.ok_or_else(|| format!("node '{}': input {i} is missing", n.name))
    };
    let out_ty = Ty::of(g.values[n.outputs[0]].fact.dtype)?;
    let unsupported = || format!("node '{}': {} on {out_ty:?}", n.name, n.op.op_type());
    let r = match op {
        ElementwiseOp::Identity | ElementwiseOp::Dropout(_) => req(b, 0)?.0,
        ElementwiseOp::Unary(kind) => {
            let (x, ty) = req(b, 0)?;
            match ty {
                Ty::F32 => unary_f32(b, *kind, &x).ok_or_else(unsupported)?,
                Ty::I64 => match kind {
                    UnaryKind::Neg => {
                        let z = b.op("arith.constant 0 : i64");
                        b.b2("arith.subi", &z, &x, Ty::I64)
                    }
                    UnaryKind::Abs => b.op(&format!("math.absi {x} : i64")),
                    UnaryKind::Relu => {
                        let z = b.op("arith.constant 0 : i64");
                        b.b2("arith.maxsi", &x, &z, Ty::I64)
                    }
                    _ => return Err(unsupported()),
                },
                Ty::I1 => return Err(unsupported()),
            }
        }
        ElementwiseOp::Binary(kind) => {
            let (x, tx) = req(b, 0)?;
            let (y, ty) = req(b, 1)?;
            match (tx, kind) {
                (Ty::F32, BinaryKind::Pow) => pow_f32(b, g, n.inputs[1], &x, &y, ty)?,
                (Ty::F32, _) if ty != Ty::F32 => return Err(unsupported()),
                (Ty::F32, BinaryKind::Add) => b.f2("addf", &x, &y),
                (Ty::F32, BinaryKind::Sub) => b.f2("subf", &x, &y),
                (Ty::F32, BinaryKind::Mul) => b.f2("mulf", &x, &y),
                (Ty::F32, BinaryKind::Div) => b.f2("divf", &x, &y),
                (Ty::F32, BinaryKind::Mod { fmod: true }) => b.b2("arith.remf", &x, &y, Ty::F32),
                (Ty::F32, BinaryKind::PRelu) => {
                    let z = b.fc(0.0);
                    let neg = b.cmpf("olt", &x, &z);
                    let s = b.f2("mulf", &y, &x);
                    b.sel(&neg, &s, &x, Ty::F32)
                }
                (Ty::I64, _) if ty != Ty::I64 => return Err(unsupported()),
                (Ty::I64, BinaryKind::Add) => b.b2("arith.addi", &x, &y, Ty::I64),
                (Ty::I64, BinaryKind::Sub) => b.b2("arith.subi", &x, &y, Ty::I64),
                (Ty::I64, BinaryKind::Mul) => b.b2("arith.muli", &x, &y, Ty::I64),
                _ => return Err(unsupported()),
            }
        }
        ElementwiseOp::Variadic(kind) => {
            let xs: Vec<(String, Ty)> = (0..n.inputs.len())
                .map(|i| req(b, i))
                .collect::<Result<_, _>>()?;
            if xs.iter().any(|x| x.1 != out_ty) || out_ty == Ty::I1 {
                return Err(unsupported());
            }
            let f = out_ty == Ty::F32;
            let mut acc = xs[0].0.clone();
            for (x, _) in &xs[1..] {
                acc = match (kind, f) {
                    (VariadicKind::Max, true) => b.b2("arith.maximumf", &acc, x, out_ty),
                    (VariadicKind::Min, true) => b.b2("arith.minimumf", &acc, x, out_ty),
                    (VariadicKind::Sum | VariadicKind::Mean, true) => b.f2("addf", &acc, x),
                    (VariadicKind::Max, false) => b.b2("arith.maxsi", &acc, x, out_ty),
                    (VariadicKind::Min, false) => b.b2("arith.minsi", &acc, x, out_ty),
                    (VariadicKind::Sum, false) => b.b2("arith.addi", &acc, x, out_ty),
                    (VariadicKind::Mean, false) => return Err(unsupported()),
                };
            }
            if *kind == VariadicKind::Mean {
                if !f {
                    return Err(unsupported());
                }
                let c = b.fc(xs.len() as f32);
                acc = b.f2("divf", &acc, &c);
            }
            acc
        }
        ElementwiseOp::Compare(kind) => {
            let (x, tx) = req(b, 0)?;
            let (y, ty) = req(b, 1)?;
            if tx != ty {
                return Err(unsupported());
            }
            let (fp, ip) = match kind {
                CompareKind::Equal => ("oeq", "eq"),
                CompareKind::Less => ("olt", "slt"),
                CompareKind::Greater => ("ogt", "sgt"),
                CompareKind::LessOrEqual => ("ole", "sle"),
                CompareKind::GreaterOrEqual => ("oge", "sge"),
            };
            match tx {
                Ty::F32 => b.cmpf(fp, &x, &y),
                Ty::I64 => b.op(&format!("arith.cmpi {ip}, {x}, {y} : i64")),
                Ty::I1 if *kind == CompareKind::Equal => {
                    b.op(&format!("arith.cmpi eq, {x}, {y} : i1"))
                }
                Ty::I1 => return Err(unsupported()),
            }
        }
        ElementwiseOp::Logical(kind) => {
            let (x, _) = req(b, 0)?;
            let (y, _) = req(b, 1)?;
            let op = match kind {
                LogicalKind::And => "arith.andi",
                LogicalKind::Or => "arith.ori",
                LogicalKind::Xor => "arith.xori",
            };
            b.b2(op, &x, &y, Ty::I1)
        }
        ElementwiseOp::Not => {
            let (x, _) = req(b, 0)?;
            let t = b.op("arith.constant true");
            b.b2("arith.xori", &x, &t, Ty::I1)
        }
        ElementwiseOp::Predicate(kind) => {
            let (x, tx) = req(b, 0)?;
            if tx != Ty::F32 {
                return Err(unsupported());
            }
            match *kind {
                PredicateKind::IsNaN => b.cmpf("uno", &x, &x),
                PredicateKind::IsInf {
                    detect_negative,
                    detect_positive,
                } => match (detect_negative, detect_positive) {
                    (true, true) => {
                        let a = b.m1("absf", &x);
                        let inf = b.fc(f32::INFINITY);
                        b.cmpf("oeq", &a, &inf)
                    }
                    (false, true) => {
                        let inf = b.fc(f32::INFINITY);
                        b.cmpf("oeq", &x, &inf)
                    }
                    (true, false) => {
                        let inf = b.fc(f32::NEG_INFINITY);
                        b.cmpf("oeq", &x, &inf)
                    }
                    (false, false) => b.op("arith.constant false"),
                },
            }
        }
        ElementwiseOp::Clip(bounds) => {
            let (x, tx) = req(b, 0)?;
            let (lo, hi) = match *bounds {
                ClipBounds::Attrs { min, max } => {
                    if tx != Ty::F32 {
                        return Err(unsupported());
                    }
                    (min.map(|m| b.fc(m)), max.map(|m| b.fc(m)))
                }
                ClipBounds::Inputs => (input(b, 1)?.map(|v| v.0), input(b, 2)?.map(|v| v.0)),
            };
            let (mx, mn) = match tx {
                Ty::F32 => ("arith.maximumf", "arith.minimumf"),
                Ty::I64 => ("arith.maxsi", "arith.minsi"),
                Ty::I1 => return Err(unsupported()),
            };
            let mut v = x;
            if let Some(l) = lo {
                v = b.b2(mx, &v, &l, tx);
            }
            if let Some(h) = hi {
                v = b.b2(mn, &v, &h, tx);
            }
            v
        }
        ElementwiseOp::Where => {
            let (c, _) = req(b, 0)?;
            let (x, tx) = req(b, 1)?;
            let (y, _) = req(b, 2)?;
            b.sel(&c, &x, &y, tx)
        }
        ElementwiseOp::Cast { .. } | ElementwiseOp::CastLike { .. } => {
            let (x, tx) = req(b, 0)?;
            cast(b, &x, tx, out_ty)
        }
    };
    if n.outputs.len() != 1 {
        return Err(format!("node '{}' has several outputs", n.name));
    }
    b.vals.insert(n.outputs[0], (r, out_ty));
    Ok(())
}

/// Conversion between body types.
fn cast(b: &mut Body, x: &str, from: Ty, to: Ty) -> String {
    match (from, to) {
        (f, t) if f == t => x.to_string(),
        (Ty::I64, Ty::F32) => b.op(&format!("arith.sitofp {x} : i64 to f32")),
        (Ty::I1, Ty::F32) => b.op(&format!("arith.uitofp {x} : i1 to f32")),
        (Ty::F32, Ty::I64) => b.op(&format!("arith.fptosi {x} : f32 to i64")),
        (Ty::I1, Ty::I64) => b.op(&format!("arith.extui {x} : i1 to i64")),
        (Ty::F32, Ty::I1) => {
            let z = b.fc(0.0);
            b.cmpf("une", x, &z)
        }
        (Ty::I64, _) => {
            let z = b.op("arith.constant 0 : i64");
            b.op(&format!("arith.cmpi ne, {x}, {z} : i64"))
        }
        _ => unreachable!("all pairs covered"),
    }
}

/// The largest `|exponent|` of a constant integer `Pow` expanded into multiplications.
const POW_MAX_INT: f64 = 16.0;

/// `x ^ y` on f32. A scalar constant exponent that is an integer with `|y| <= 16` becomes
/// multiplications (square and multiply; `1 / x^|y|` for negative `y`, `1` for `y = 0`, as
/// `powf` gives even for NaN `x`), `0.5` becomes `sqrt` (with `powf`'s `-inf` case); other
/// exponents call `math.powf`, which keeps `powf`'s semantics (negative bases, zeros).
fn pow_f32(
    b: &mut Body,
    g: &Graph,
    exp: Option<ValueId>,
    x: &str,
    y: &str,
    ty: Ty,
) -> Result<String, String> {
    if let Some(e) = exp.and_then(|e| g.const_value(e)).filter(|t| t.len() == 1) {
        let e = e.to_f64_vec()[0];
        if e == 0.5 {
            // powf(-inf, 0.5) = inf, where sqrt gives NaN.
            let s = b.m1("sqrt", x);
            let ninf = b.fc(f32::NEG_INFINITY);
            let is_ninf = b.cmpf("oeq", x, &ninf);
            let inf = b.fc(f32::INFINITY);
            return Ok(b.sel(&is_ninf, &inf, &s, Ty::F32));
        }
        if e.fract() == 0.0 && e.abs() <= POW_MAX_INT {
            if e == 0.0 {
                return Ok(b.fc(1.0));
            }
            let p = pow_int(b, x, e.abs() as u32);
            return Ok(if e < 0.0 {
                let one = b.fc(1.0);
                b.f2("divf", &one, &p)
            } else {
                p
            });
        }
    }
    let y = cast(b, y, ty, Ty::F32);
    Ok(b.op(&format!("math.powf {x}, {y} : f32")))
}

/// `x^n` for `n >= 1` by square and multiply (`x·x·x` for 3: two roundings, like the
/// obvious product).
fn pow_int(b: &mut Body, x: &str, n: u32) -> String {
    let mut acc: Option<String> = None;
    let mut sq = x.to_string();
    let mut n = n;
    loop {
        if n & 1 == 1 {
            acc = Some(match acc {
                None => sq.clone(),
                Some(a) => b.f2("mulf", &a, &sq),
            });
        }
        n >>= 1;
        if n == 0 {
            break;
        }
        sq = b.f2("mulf", &sq, &sq);
    }
    acc.expect("n >= 1")
}

/// A unary kind on f32, or `None` if not supported.
fn unary_f32(b: &mut Body, kind: UnaryKind, x: &str) -> Option<String> {
    use UnaryKind::*;
    let math = |b: &mut Body, f: &str| Some(b.m1(f, x));
    match kind {
        Neg => Some(b.op(&format!("arith.negf {x} : f32"))),
        Abs => math(b, "absf"),
        Sign => {
            let z = b.fc(0.0);
            let one = b.fc(1.0);
            let mone = b.fc(-1.0);
            let gt = b.cmpf("ogt", x, &z);
            let lt = b.cmpf("olt", x, &z);
            let s = b.sel(&lt, &mone, x, Ty::F32);
            Some(b.sel(&gt, &one, &s, Ty::F32))
        }
        Relu => {
            let z = b.fc(0.0);
            let lt = b.cmpf("olt", x, &z);
            Some(b.sel(&lt, &z, x, Ty::F32))
        }
        Sqrt => math(b, "sqrt"),
        Exp => Some(fastmath::exp(b, x)),
        Log => Some(fastmath::log(b, x)),
        Reciprocal => {
            let one = b.fc(1.0);
            Some(b.f2("divf", &one, x))
        }
        Floor => math(b, "floor"),
        Ceil => math(b, "ceil"),
        Round => math(b, "roundeven"),
        Erf => Some(fastmath::erf(b, x)),
        Tanh => Some(fastmath::tanh(b, x)),
        Sigmoid => Some(fastmath::sigmoid(b, x)),
        LeakyRelu { alpha } => {
            let z = b.fc(0.0);
            let a = b.fc(alpha);
            let lt = b.cmpf("olt", x, &z);
            let s = b.f2("mulf", &a, x);
            Some(b.sel(&lt, &s, x, Ty::F32))
        }
        Elu { alpha } => {
            let z = b.fc(0.0);
            let a = b.fc(alpha);
            let lt = b.cmpf("olt", x, &z);
            let e = b.m1("expm1", x);
            let s = b.f2("mulf", &a, &e);
            Some(b.sel(&lt, &s, x, Ty::F32))
        }
        Selu { alpha, gamma } => {
            let z = b.fc(0.0);
            let a = b.fc(alpha);
            let gm = b.fc(gamma);
            let le = b.cmpf("ole", x, &z);
            let e = fastmath::exp(b, x);
            let ae = b.f2("mulf", &a, &e);
            let neg = b.f2("subf", &ae, &a);
            let sel = b.sel(&le, &neg, x, Ty::F32);
            Some(b.f2("mulf", &gm, &sel))
        }
        Celu { alpha } => {
            let z = b.fc(0.0);
            let a = b.fc(alpha);
            let gt = b.cmpf("ogt", x, &z);
            let q = b.f2("divf", x, &a);
            let e = b.m1("expm1", &q);
            let s = b.f2("mulf", &a, &e);
            Some(b.sel(&gt, x, &s, Ty::F32))
        }
        ThresholdedRelu { alpha } => {
            let z = b.fc(0.0);
            let a = b.fc(alpha);
            let gt = b.cmpf("ogt", x, &a);
            Some(b.sel(&gt, x, &z, Ty::F32))
        }
        HardSigmoid { alpha, beta } => {
            let a = b.fc(alpha);
            let be = b.fc(beta);
            let m = b.f2("mulf", &a, x);
            let s = b.f2("addf", &m, &be);
            Some(b.clampf(&s, 0.0, 1.0))
        }
        HardSwish => {
            let six = b.fc(6.0);
            let half = b.fc(0.5);
            let q = b.f2("divf", x, &six);
            let s = b.f2("addf", &q, &half);
            let c = b.clampf(&s, 0.0, 1.0);
            Some(b.f2("mulf", x, &c))
        }
        Gelu { approximate } => {
            let half = b.fc(0.5);
            let one = b.fc(1.0);
            let t = match approximate {
                GeluApprox::None => {
                    let r = b.fc(std::f32::consts::FRAC_1_SQRT_2);
                    let s = b.f2("mulf", x, &r);
                    fastmath::erf(b, &s)
                }
                GeluApprox::Tanh => {
                    let k = b.fc((2.0 / std::f64::consts::PI).sqrt() as f32);
                    let c = b.fc(0.044715);
                    let x2 = b.f2("mulf", x, x);
                    let x3 = b.f2("mulf", &x2, x);
                    let cx3 = b.f2("mulf", &c, &x3);
                    let inner = b.f2("addf", x, &cx3);
                    let ki = b.f2("mulf", &k, &inner);
                    fastmath::tanh(b, &ki)
                }
            };
            let p = b.f2("addf", &one, &t);
            let hx = b.f2("mulf", &half, x);
            Some(b.f2("mulf", &hx, &p))
        }
        Softplus => Some(b.softplus(x)),
        Softsign => {
            let one = b.fc(1.0);
            let a = b.m1("absf", x);
            let d = b.f2("addf", &one, &a);
            Some(b.f2("divf", x, &d))
        }
        Mish => {
            let sp = b.softplus(x);
            let t = fastmath::tanh(b, &sp);
            Some(b.f2("mulf", x, &t))
        }
        Sin => math(b, "sin"),
        Cos => math(b, "cos"),
        Tan => math(b, "tan"),
        Asin => math(b, "asin"),
        Acos => math(b, "acos"),
        Atan => math(b, "atan"),
        Sinh => math(b, "sinh"),
        Cosh => math(b, "cosh"),
        Asinh => math(b, "asinh"),
        Acosh => math(b, "acosh"),
        Atanh => math(b, "atanh"),
        BitwiseNot => None,
    }
}
