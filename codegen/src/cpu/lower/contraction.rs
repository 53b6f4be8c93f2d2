//! `Contraction` kernels whose contraction is a `MatMul` or `Gemm`: the packed matmul of
//! [`crate::cpu::matmul`] (a private helper function called from the kernel) writes the
//! product into the first `f32` output buffer, then one `linalg.generic` over the output
//! shape finishes Gemm (`alpha·P + beta·C`) and runs the fused elementwise epilogue in place.
//!
//! Supported: `MatMul` with a 2-D `B` and an `A` of rank ≥ 2 (its batch dims are folded
//! into `M`, which needs them static when `A` has rank > 2), batched `MatMul` with equal
//! static batch dims or an A broadcast over B's batch (one matmul per batch on row-block
//! subviews); `Gemm` with any
//! `transA`/`transB` (a transposed operand is copied to a temporary first), `alpha`, `beta`
//! and a broadcast `C`. Not yet: broadcast batch dims of `B`, 1-D
//! operands, `Conv`.

use super::elementwise::InputKind;
use super::elementwise::{classify_input, emit_generic, Body, GenericInput, GenericOutput};
use super::{DerivedConst, Lowered, SymDims, Ty};
use crate::cpu::abi::{Dim as PDim, Prologue};
use crate::cpu::matmul::{
    matmul_memref_func_prepacked, pack_b, packed_lens, MatmulLowering, MatmulSchedule, PACKED_1D,
    STRIDED_2D,
};
use crate::cpu::matmul_transform;
use crate::cpu::{Kernel, KernelSignature};
use kiln_ir::ops::linalg::LinalgOp;
use kiln_ir::{DType, Dim, Graph, Op, ValueId};
use kiln_passes::fusion;
use std::fmt::Write as _;

/// Lowers a `Contraction` kernel; its product is computed as `sched` says (tile sizes and
/// [`MatmulLowering`](crate::cpu::matmul::MatmulLowering)); with `fit_rows` (a default,
/// not a tuned, schedule) a product with fewer rows than its register tile gets a tile of
/// its rows ([`small_m_schedule`]). The second result are the
/// kernel's derived constants: a constant, non-transposed 2-D `B` of an unbatched product
/// with the generator lowering is packed at compile time ([`pack_b`]) and passed instead of
/// `B` (which the kernel then does not read).
pub(crate) fn lower(
    g: &Graph,
    k: &fusion::Kernel,
    name: &str,
    sched: &MatmulSchedule,
    fit_rows: bool,
) -> Result<(Lowered, Vec<DerivedConst>), String> {
    let ci = k
        .nodes
        .iter()
        .copied()
        .find(|&n| matches!(g.nodes[n].op, Op::Linalg(_)))
        .ok_or_else(|| {
            let n = &g.nodes[k.nodes[0]];
            format!("{} contractions are not lowered yet", n.op.op_type())
        })?;
    let cn = &g.nodes[ci];
    let gemm = match &cn.op {
        Op::Linalg(LinalgOp::MatMul) => None,
        Op::Linalg(LinalgOp::Gemm(gm)) => Some(gm.clone()),
        other => return Err(format!("{} is not lowered yet", other.op_type())),
    };
    let (Some(a_v), Some(b_v)) = (cn.inputs[0], cn.inputs[1]) else {
        return Err("missing MatMul operand".into());
    };
    let c_v = cn.inputs.get(2).copied().flatten();
    let y_v = cn.outputs[0];
    for v in [a_v, b_v, y_v] {
        if g.values[v].fact.dtype != DType::F32 {
            return Err(format!(
                "contraction on {} (f32 only)",
                g.values[v].fact.dtype.name()
            ));
        }
    }
    let a_s = g.values[a_v].fact.shape.dims().to_vec();
    let b_s = g.values[b_v].fact.shape.dims().to_vec();
    let y_s = g.values[y_v].fact.shape.dims().to_vec();
    for &n in &k.nodes {
        if n != ci
            && g.nodes[n]
                .outputs
                .iter()
                .any(|&o| g.values[o].fact.shape.dims() != y_s)
        {
            return Err(format!(
                "epilogue node '{}' has another shape than the contraction",
                g.nodes[n].name
            ));
        }
    }
    // (rows, cols) of A and B as stored, and whether each is transposed.
    // Batched MatMul (equal, static batch dims): A, B and the product are viewed as stacks
    // of row blocks, one matmul per batch.
    let mut batch: Option<(usize, [usize; 3])> = None;
    // A broadcast over B's batch: a 2-D A, or one whose batch dims are all 1 (every
    // product of the batch reads the same A rows)
    let mut a_bcast = false;
    let (a_rows, ta, tb) = match &gemm {
        None if b_s.len() > 2 => {
            let known = |s: &[Dim]| s.iter().map(Dim::known).collect::<Option<Vec<usize>>>();
            let (Some(ak), Some(bk)) = (known(&a_s), known(&b_s)) else {
                return Err("batched MatMul with symbolic dims".into());
            };
            let r = bk.len();
            let ra = ak.len();
            a_bcast = ra == 2 || (ra == r && ak[..r - 2].iter().all(|&d| d == 1));
            if ra < 2 || !(a_bcast || (ra == r && ak[..r - 2] == bk[..r - 2])) {
                return Err(format!(
                    "batched MatMul of shapes {ak:?} x {bk:?} (equal batch dims, or A \
                     broadcast over B's, only)"
                ));
            }
            let nb: usize = bk[..r - 2].iter().product();
            batch = Some((nb, [ak[ra - 2], bk[r - 1], ak[ra - 1]]));
            let rows = if a_bcast { ak[ra - 2] } else { nb * ak[ra - 2] };
            (Dim::Known(rows), false, false)
        }
        None => {
            if a_s.len() < 2 {
                return Err("MatMul with a 1-D A".into());
            }
            if b_s.len() != 2 {
                return Err("MatMul with a 1-D B".into());
            }
            let rows = if a_s.len() == 2 {
                a_s[0].clone()
            } else {
                let known: Option<Vec<usize>> =
                    a_s[..a_s.len() - 1].iter().map(Dim::known).collect();
                Dim::Known(
                    known
                        .ok_or("MatMul with symbolic batch dims")?
                        .iter()
                        .product(),
                )
            };
            (rows, false, false)
        }
        Some(gm) => {
            if a_s.len() != 2 || b_s.len() != 2 {
                return Err("Gemm operands must be 2-D".into());
            }
            (a_s[0].clone(), gm.trans_a, gm.trans_b)
        }
    };
    let a_cols = a_s[a_s.len() - 1].clone();
    // Split into row tasks only when the product is big enough to pay for waking a thread
    // (a few microseconds of work).
    let macs = match (
        a_cols.known(),
        y_s.iter().map(Dim::known).product::<Option<usize>>(),
    ) {
        (Some(kd), Some(mn)) => kd * mn,
        _ => 0,
    };
    // Products with fewer rows than the register tile (a GEMV: NasRNN's and an RNN's
    // steps, a decoder's token) take a tile of that many rows, and with one or two rows a
    // wider one: the full tile's zero rows cost their FMAs (an 8-row tile on a one-row
    // product does 8 times its arithmetic and bounds it, not the reads of B).
    let small_sched;
    let sched = match a_rows.known() {
        Some(m) if fit_rows && batch.is_none() && !ta && m >= 1 && m < sched.mr => {
            small_sched = small_m_schedule(sched, m);
            &small_sched
        }
        _ => sched,
    };
    let as_2d = row_split(g, k, batch.is_some() || ta, a_v, b_v, &y_s);
    let split = as_2d.filter(|&(m, _)| m >= 2 && macs >= MIN_SPLIT_MACS);
    // One-row products (a GEMV: NasRNN's steps, a decoder's token, a classifier's FC) split
    // into column tasks instead, when B is packed at compile time: each task then reads only
    // its columns' panels of B (see `col_split`).
    // A constant, non-transposed 2-D B of an unbatched product with the generator lowering
    // is packed at compile time (see `prepacked` below).
    let b_packed = match g.const_value(b_v) {
        Some(kiln_ir::Tensor::F32(w))
            if w.ndim() == 2
                && batch.is_none()
                && !tb
                && sched.lowering == MatmulLowering::Generator =>
        {
            Some(w)
        }
        _ => None,
    };
    let cols = as_2d
        .filter(|&(m, _)| m == 1 && macs >= MIN_SPLIT_MACS && b_packed.is_some())
        .and_then(|(_, n)| col_split(n, a_cols.known()?, sched));
    // the column-split kernel packs B in blocks of its task width
    let col_sched;
    let sched = match cols {
        Some(c) => {
            col_sched = MatmulSchedule {
                nc: c.width,
                ..*sched
            };
            &col_sched
        }
        None => sched,
    };

    // A batched product with no epilogue splits into tasks over its batch (each task's
    // products with their own packing scratch); an epilogue runs over the whole output, so
    // it keeps the kernel serial.
    let batch_split = batch.filter(|&(nb, [m, n, kk])| {
        nb >= 2 && k.nodes.len() == 1 && k.outputs.len() == 1 && nb * m * n * kk >= MIN_SPLIT_MACS
    });
    let mut syms = SymDims::default();
    let mut p = Prologue::new();
    let batch_range = batch_split.map(|(nb, _)| {
        let tasks = p.const_index(nb as i64);
        p.task_range(&tasks)
    });
    // Row-split kernels (see `row_split`): the task range is a range of product rows, and
    // A, the outputs and the full-size epilogue inputs are declared as those rows only.
    let rows = split.map(|(m, _)| {
        let tasks = p.const_index(m as i64);
        let (b, e) = p.task_range(&tasks);
        p.push(&format!("  %rows_n = arith.subi {e}, {b} : index"));
        (b, "%rows_n".to_string())
    });
    // Column-split kernels: the task range is a range of `width`-column blocks; the product,
    // the outputs and the epilogue inputs are declared as those columns only.
    let col_range = cols.map(|c| {
        let tasks = p.const_index(c.tasks as i64);
        let (b, e) = p.task_range(&tasks);
        let (w, n) = (p.const_index(c.width as i64), p.const_index(c.n as i64));
        p.push(&format!(
            "  %cols_b0 = arith.muli {b}, {w} : index\n  %cols_e0 = arith.muli {e}, {w} : index\n  %cols_b = arith.minui %cols_b0, {n} : index\n  %cols_e = arith.minui %cols_e0, {n} : index\n  %cols_n = arith.subi %cols_e, %cols_b : index"
        ));
        (c.n, "%cols_b".to_string(), "%cols_n".to_string())
    });
    let rows_view =
        |p: &mut Prologue, arg: usize, shape: &[PDim], elem: &str| match (&rows, &col_range) {
            (Some((b, n)), _) => p.memref_rows(arg, shape, elem, b, n),
            (None, Some((n, b, c))) => p.memref_cols(arg, *n, elem, b, c),
            (None, None) => p.memref(arg, shape, elem),
        };
    let mut body = Body::default();
    let mut args = Vec::new();
    let mut ins = Vec::new();
    let epi_nodes: Vec<usize> = k.nodes.iter().copied().filter(|&n| n != ci).collect();
    // A and B.
    let a_dims = [syms.dim(&a_rows)?, syms.dim(&a_cols)?];
    let a_mem = if cols.is_some() {
        // every column task reads all of A's one row
        p.memref(0, &a_dims, "f32")
    } else {
        rows_view(&mut p, 0, &a_dims, "f32")
    };
    let b_dims = match batch {
        Some((nb, [_, n, k])) => vec![PDim::Const((nb * k) as i64), PDim::Const(n as i64)],
        None => syms.dims(&b_s)?,
    };
    // B packed at compile time (see the doc), with its dims [K, N].
    let prepacked = b_packed.map(|w| {
        let (kk, nn) = (w.shape()[0], w.shape()[1]);
        let data: Vec<f32> = w.iter().copied().collect();
        let s = sched.normalized();
        DerivedConst {
            name: format!("{}.packed{}x{}x{}", g.values[b_v].name, s.nr, s.kc, s.nc),
            tensor: {
                let packed = pack_b(&data, kk, nn, sched);
                kiln_ir::Tensor::from_vec(&[packed.len()], packed)
            },
        }
    });
    args.push(a_v);
    // B itself, when it is not packed at compile time
    let b_mem = prepacked.is_none().then(|| {
        args.push(b_v);
        p.memref_f32(1, &b_dims)
    });
    // The other inputs feed the epilogue (Gemm's C included).
    for &v in &k.inputs {
        if v == a_v || v == b_v {
            let used = epi_nodes
                .iter()
                .any(|&n| g.nodes[n].inputs.contains(&Some(v)));
            if used || c_v == Some(v) {
                return Err("a MatMul operand is also used by the epilogue".into());
            }
            continue;
        }
        let ty = Ty::of(g.values[v].fact.dtype)?;
        match classify_input(g, v, &y_s)? {
            InputKind::Scalar(x) => body.bind_const(v, x, ty),
            InputKind::Buffer(_) if cols.is_some() => {
                // one row: a row vector and a full-shape buffer are the same `n` elements
                let memref = rows_view(&mut p, args.len(), &[], ty.storage());
                args.push(v);
                ins.push(GenericInput {
                    value: v,
                    memref,
                    dims: vec![0, 1],
                    ty,
                });
            }
            InputKind::Buffer(dims) if split.is_some() => {
                let (m, n) = split.unwrap_or_default();
                let (memref, dims) = if row_vector(&dims, &y_s) {
                    (
                        p.memref(args.len(), &[PDim::Const(n as i64)], ty.storage()),
                        vec![1],
                    )
                } else {
                    let shape = [PDim::Const(m as i64), PDim::Const(n as i64)];
                    (
                        rows_view(&mut p, args.len(), &shape, ty.storage()),
                        vec![0, 1],
                    )
                };
                args.push(v);
                ins.push(GenericInput {
                    value: v,
                    memref,
                    dims,
                    ty,
                });
            }
            InputKind::Buffer(dims) => {
                let sd: Vec<Dim> = dims.iter().map(|&d| y_s[d].clone()).collect();
                let memref = p.memref(args.len(), &syms.dims(&sd)?, ty.storage());
                args.push(v);
                ins.push(GenericInput {
                    value: v,
                    memref,
                    dims,
                    ty,
                });
            }
        }
    }
    // The packed B comes after the inputs, then the outputs.
    let bk_mem = prepacked.as_ref().map(|c| {
        let len = PDim::Const(c.tensor.len() as i64);
        match (&col_range, a_cols.known()) {
            // the panels of this task's columns onwards (blocks of `width` columns, each
            // `width · K` floats)
            (Some((_, b, _)), Some(kd)) => {
                let (kd, total) = (p.const_index(kd as i64), p.const_index(c.tensor.len() as i64));
                p.push(&format!(
                    "  %cols_pb = arith.muli {b}, {kd} : index\n  %cols_pn = arith.subi {total}, %cols_pb : index"
                ));
                p.memref_rows(args.len(), &[len], "f32", "%cols_pb", "%cols_pn")
            }
            _ => p.memref_f32(args.len(), &[len]),
        }
    });
    let nconst = usize::from(prepacked.is_some());
    let full = match (split, cols) {
        (Some((m, n)), _) => vec![PDim::Const(m as i64), PDim::Const(n as i64)],
        (None, Some(c)) => vec![PDim::Const(1), PDim::Const(c.n as i64)],
        (None, None) => syms.dims(&y_s)?,
    };
    let rank = full.len();
    let mut outs = Vec::new();
    for (i, &v) in k.outputs.iter().enumerate() {
        let ty = Ty::of(g.values[v].fact.dtype)?;
        let memref = rows_view(&mut p, args.len() + nconst + i, &full, ty.storage());
        outs.push(GenericOutput {
            value: v,
            memref,
            ty,
        });
    }
    // The product goes to the first f32 output, viewed as [M, N].
    let pi = outs
        .iter()
        .position(|o| o.ty == Ty::F32)
        .ok_or("no f32 output to hold the product")?;
    let (m_d, n_d) = (
        if ta { a_dims[1] } else { a_dims[0] },
        if tb { b_dims[0] } else { b_dims[1] },
    );
    // the product as [rows, N]: a batched product has `nb · M` rows whatever A's are
    let p_rows = match batch {
        Some((nb, [m, _, _])) => PDim::Const((nb * m) as i64),
        None => m_d,
    };
    let p2 = rows_view(&mut p, args.len() + nconst + pi, &[p_rows, n_d], "f32");
    let mut t = String::new();
    let operand = |p: &mut Prologue,
                   t: &mut String,
                   heap: &mut Vec<String>,
                   mem: &str,
                   trans: bool,
                   d: [PDim; 2]| {
        if !trans {
            return mem.to_string();
        }
        let idx = |p: &mut Prologue, t: &mut String, d: PDim| match d {
            PDim::Sym(i) => p.dim_index(i),
            PDim::Const(c) => {
                let v = format!("%tc{}_{c}", t.len());
                let _ = writeln!(t, "  {v} = arith.constant {c} : index");
                v
            }
        };
        let tv = if let [PDim::Const(r), PDim::Const(c)] = [d[1], d[0]] {
            // Static: the transposed copy lives in the kernel's scratch memory.
            p.scratch(&[r as usize, c as usize], "f32", 4)
        } else {
            // A symbolic size has no bound here: this copy stays a heap allocation per call.
            let r = idx(p, t, d[1]);
            let c = idx(p, t, d[0]);
            let tv = format!("%tr{}", t.len());
            let _ = writeln!(
                t,
                "  {tv} = memref.alloc({r}, {c}) {{alignment = 64 : i64}} : memref<?x?xf32>"
            );
            heap.push(tv.clone());
            tv
        };
        let _ = writeln!(
            t,
            "  linalg.transpose ins({mem} : memref<?x?xf32>) outs({tv} : memref<?x?xf32>) permutation = [1, 0]"
        );
        tv
    };
    let mut heap = Vec::new();
    let a2 = operand(&mut p, &mut t, &mut heap, &a_mem, ta, a_dims);
    let b_pair = [b_dims[0], b_dims[1]];
    let b2 = b_mem
        .as_ref()
        .map(|b| operand(&mut p, &mut t, &mut heap, b, tb, b_pair));
    // The packed panels of the matmul, in scratch memory (sized for the per-call product).
    let known = |d: PDim| match d {
        PDim::Const(c) => Some(c as usize),
        PDim::Sym(_) => None,
    };
    let k_d = if ta { a_dims[0] } else { a_dims[1] };
    let (ap_len, bp_len) = match batch {
        Some((_, [m, n, k])) => packed_lens(sched, Some(m), Some(n), Some(k)),
        None => packed_lens(sched, known(m_d), known(n_d), known(k_d)),
    };
    let ap = p.scratch(&[ap_len], "f32", 4);
    let bp = b_mem.as_ref().map(|_| p.scratch(&[bp_len], "f32", 4));
    let mm = format!("{name}_mm");
    let st = STRIDED_2D;
    let call = |t: &mut String, a: &str, b: &str, c: &str| {
        let _ = match (&bk_mem, &bp) {
            (Some(bk), _) => writeln!(
                t,
                "  func.call @{mm}({a}, {bk}, {c}, {ap}) : ({st}, {PACKED_1D}, {st}, {PACKED_1D}) -> ()"
            ),
            (None, Some(bp)) => writeln!(
                t,
                "  func.call @{mm}({a}, {b}, {c}, {ap}, {bp}) : ({st}, {st}, {st}, {PACKED_1D}, {PACKED_1D}) -> ()"
            ),
            (None, None) => unreachable!("B is either packed at compile time or packed per call"),
        };
    };
    // A, B (unless packed at compile time: its `%mmop1` is then unused) and the product
    let mut casts = Vec::new();
    for (i, v) in [Some(&a2), b2.as_ref(), Some(&p2)].into_iter().enumerate() {
        let c = format!("%mmop{i}");
        if let Some(v) = v {
            let _ = writeln!(t, "  {c} = memref.cast {v} : memref<?x?xf32> to {st}");
        }
        casts.push(c);
    }
    match batch {
        None => call(&mut t, &casts[0], &casts[1], &casts[2]),
        Some((nb, [m, n, k])) => {
            // a batched product is never packed at compile time
            let b2 = b2.as_deref().expect("B packed per call");
            // a broadcast A is read from row 0 by every product of the batch
            let a_row = if a_bcast { "%bz" } else { "%ra" };
            // this task's products (all of them in a serial kernel)
            let (b0, b1) = batch_range
                .clone()
                .unwrap_or_else(|| ("%bz".to_string(), "%bn".to_string()));
            let _ = writeln!(
                t,
                "  %bz = arith.constant 0 : index\n  %b1 = arith.constant 1 : index\n  %bn = arith.constant {nb} : index\n  %bm = arith.constant {m} : index\n  %bk = arith.constant {k} : index\n  %bnn = arith.constant {n} : index\n  scf.for %bi = {b0} to {b1} step %b1 {{\n    %ra = arith.muli %bi, %bm : index\n    %rb = arith.muli %bi, %bk : index\n    %sa = memref.subview {a2}[{a_row}, 0] [%bm, %bk] [1, 1] : memref<?x?xf32> to {st}\n    %sb = memref.subview {b2}[%rb, 0] [%bk, %bnn] [1, 1] : memref<?x?xf32> to {st}\n    %sc = memref.subview {p2}[%ra, 0] [%bm, %bnn] [1, 1] : memref<?x?xf32> to {st}"
            );
            call(&mut t, "%sa", "%sb", "%sc");
            let _ = writeln!(t, "  }}");
        }
    }
    // Gemm finishing: Y = alpha P + beta C.
    let (alpha, beta) = gemm.as_ref().map_or((1.0, 0.0), |gm| (gm.alpha, gm.beta));
    let c_used = c_v.is_some() && beta != 0.0;
    let need_generic = !epi_nodes.is_empty() || alpha != 1.0 || c_used || outs.len() > 1;
    if need_generic {
        ins.insert(
            0,
            GenericInput {
                value: y_v,
                memref: outs[pi].memref.clone(),
                dims: (0..rank).collect(),
                ty: Ty::F32,
            },
        );
        let text = emit_generic(g, rank, &ins, &outs, body, &epi_nodes, |b| {
            let (mut y, _) = b.get(y_v, g)?;
            if alpha != 1.0 {
                let a = b.fc(alpha);
                y = b.f2("mulf", &a, &y);
            }
            if let Some(c) = c_v.filter(|_| c_used) {
                let (c, cty) = b.get(c, g)?;
                if cty != Ty::F32 {
                    return Err("Gemm C must be f32".into());
                }
                let c = if beta != 1.0 {
                    let be = b.fc(beta);
                    b.f2("mulf", &be, &c)
                } else {
                    c
                };
                y = b.f2("addf", &y, &c);
            }
            b.vals.insert(y_v, (y, Ty::F32));
            Ok(())
        })?;
        t.push_str(&text);
    } else if k.outputs != [y_v] {
        return Err("contraction output is not the kernel output".into());
    }
    // Transform lowerings free every buffer with MLIR's deallocation pipeline, which wants
    // no explicit deallocs.
    let explicit_dealloc = sched.lowering == MatmulLowering::Generator;
    for v in heap.iter().filter(|_| explicit_dealloc) {
        let _ = writeln!(t, "  memref.dealloc {v} : memref<?x?xf32>");
    }
    p.push(&t);
    let p_scratch = p.scratch_bytes();
    let mut mlir = p.finish(name);
    if prepacked.is_some() {
        mlir.push_str(&matmul_memref_func_prepacked(&mm, sched));
    } else {
        mlir.push_str(&matmul_transform::matmul_memref_func(&mm, sched));
    }
    let kernel = Kernel {
        signature: KernelSignature {
            name: name.to_string(),
            inputs: args.len() + nconst,
            outputs: outs.len(),
            dims: syms.0,
            tasks: match (split, cols, batch_split) {
                (Some((m, _)), _, _) => m as u64,
                (None, Some(c), _) => c.tasks as u64,
                (None, None, Some((nb, _))) => nb as u64,
                (None, None, None) => 1,
            },
            scratch_bytes: p_scratch,
        },
        mlir,
        pipeline: matmul_transform::pipeline(sched.lowering),
    };
    Ok((
        (kernel, args, k.outputs.clone()),
        prepacked.into_iter().collect(),
    ))
}

/// Smallest product (multiply-adds) split into row tasks: a few µs of one core's work.
pub(crate) const MIN_SPLIT_MACS: usize = 1 << 18;

/// Most column tasks of a one-row product (enough for 8 threads).
const MAX_COL_TASKS: usize = 8;

/// Fewest multiply-adds of one column task (`K · width`: 128 KiB of B).
const MIN_COL_TASK_MACS: usize = 1 << 15;

/// The column tasks of a one-row product (see [`col_split`]).
#[derive(Debug, Clone, Copy)]
struct ColSplit {
    /// Columns of the product.
    n: usize,
    /// Columns per task: a multiple of the schedule's `nr`, and the `nc` B is packed with.
    width: usize,
    /// Number of tasks, at least 2.
    tasks: usize,
}

/// How a one-row product `[1, K] × [K, n]` splits into column tasks: up to
/// [`MAX_COL_TASKS`], each at least [`MIN_COL_TASK_MACS`] and a whole number of `nr`
/// panels; `None` when fewer than two such tasks fit. A one-row product is bound by reading
/// B, which the column tasks share out between cores.
/// The schedule of a product with `m` rows, fewer than `sched`'s register tile: `mr = m`,
/// and for one or two rows at least four vectors of columns (independent accumulator
/// chains enough to cover the FMA latency).
pub(crate) fn small_m_schedule(sched: &MatmulSchedule, m: usize) -> MatmulSchedule {
    let nr = if m <= 2 {
        sched.nr.max(4 * sched.vector_width)
    } else {
        sched.nr
    };
    MatmulSchedule {
        mr: m.clamp(1, sched.mr),
        nr,
        ..*sched
    }
}

fn col_split(n: usize, k: usize, sched: &MatmulSchedule) -> Option<ColSplit> {
    let nr = sched.normalized().nr;
    let by_tasks = n.div_ceil(MAX_COL_TASKS);
    let by_work = MIN_COL_TASK_MACS.div_ceil(k.max(1));
    let width = by_tasks.max(by_work).div_ceil(nr) * nr;
    let tasks = n.div_ceil(width);
    (tasks >= 2).then_some(ColSplit { n, width, tasks })
}

/// Whether a contraction kernel can split its product rows (or, with one row, its columns)
/// into tasks, and then its `(rows, cols)` as a 2-D problem: a static, non-batched, non-transposed-A product whose
/// output (all of them) and every epilogue buffer either has the output's full shape (its
/// elements then are the same `[rows, cols]` matrix) or is a row vector over the last axis
/// (`row_vector`). Every task is one row, so threads get balanced, contiguous row blocks.
fn row_split(
    g: &Graph,
    k: &fusion::Kernel,
    batched_or_transposed: bool,
    a: ValueId,
    b: ValueId,
    y_s: &[Dim],
) -> Option<(usize, usize)> {
    if batched_or_transposed || y_s.len() < 2 {
        return None;
    }
    let known: Vec<usize> = y_s.iter().map(Dim::known).collect::<Option<_>>()?;
    let n = *known.last()?;
    let m: usize = known[..known.len() - 1].iter().product();
    for &v in &k.inputs {
        if v == a || v == b {
            continue;
        }
        match classify_input(g, v, y_s).ok()? {
            InputKind::Scalar(_) => {}
            InputKind::Buffer(dims) => {
                if !row_vector(&dims, y_s) && !full_shape(&dims, y_s) {
                    return None;
                }
            }
        }
    }
    k.outputs
        .iter()
        .all(|&o| g.values[o].fact.shape.dims() == y_s)
        .then_some((m, n))
}

/// Whether an input whose kept dims (see `classify_input`) are `dims` covers every
/// non-unit axis of the iteration shape `y_s`.
fn full_shape(dims: &[usize], y_s: &[Dim]) -> bool {
    (0..y_s.len()).all(|a| y_s[a] == Dim::Known(1) || dims.contains(&a))
}

/// Whether an input whose kept dims are `dims` varies along the last axis of `y_s` only.
fn row_vector(dims: &[usize], y_s: &[Dim]) -> bool {
    let last = y_s.len() - 1;
    y_s[last] != Dim::Known(1)
        && dims.contains(&last)
        && dims.iter().all(|&a| a == last || y_s[a] == Dim::Known(1))
}
