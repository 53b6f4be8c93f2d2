//! Data movement on the generic path, one thread per output element: every op is a
//! *strided copy* (`dst[Σ i_d · ds_d] = src[base + Σ i_d · ss_d]` over the output shape:
//! Transpose, Split, Slice, Concat (one launch per input), Expand, reshape-like copies), a
//! Pad (every mode) or a Gather (`out[.., j.., ..] = data[.., idx[j..], ..]`, negative indices wrapped, out-of-range
//! indices clamped).

use super::generic::{row_major, Gen, GenKernel};
use super::{node_input, shape_of, Operand};
use crate::cpu::lower::movement::{ints, norm_axis, pad_fill, pad_params, pad_sources};
use crate::cpu::lower::Ty;
use kiln_ir::ops::array::{ArrayOp, PadMode};
use kiln_ir::{Graph, Op, ValueId};
use kiln_passes::fusion;

/// A strided copy from `src` to `dst` over the shape `shape` (see the module doc).
fn strided(
    g: &Graph,
    name: &str,
    (src, base, ss): (ValueId, i64, &[i64]),
    (dst, dbase, ds): (ValueId, i64, &[i64]),
    shape: &[usize],
) -> Result<GenKernel, String> {
    let mut gen = Gen::default();
    let (sb, ty) = gen.value_buf(g, src)?;
    let (db, dty) = gen.value_buf(g, dst)?;
    if ty != dty {
        return Err("source and destination types differ".into());
    }
    let idx = gen.unravel("%i", shape);
    let s = gen.lin(&idx, ss, base);
    let x = gen.load(sb, &s, ty);
    let d = gen.lin(&idx, ds, dbase);
    gen.store(db, &d, &x, ty);
    Ok(gen.finish(name, shape.iter().product::<usize>() as u64))
}

/// `Pad` (see [`pad_sources`]): one thread per output element.
fn pad(
    g: &Graph,
    name: &str,
    (src, in_s): (ValueId, &[usize]),
    (dst, os): (ValueId, &[usize]),
    edges: &[(i64, i64)],
    mode: PadMode,
    fill: f64,
) -> Result<GenKernel, String> {
    let mut gen = Gen::default();
    let (sb, ty) = gen.value_buf(g, src)?;
    let (db, _) = gen.value_buf(g, dst)?;
    let idx = gen.unravel("%i", os);
    let (src_idx, inside) = pad_sources(&mut gen.b, &idx, edges, in_s, mode)?;
    let at = gen.lin(&src_idx, &row_major(in_s), 0);
    let mut x = gen.load(sb, &at, ty);
    if let Some(ok) = inside {
        let f = pad_fill(&mut gen.b, fill, ty);
        x = gen
            .b
            .op(&format!("arith.select {ok}, {x}, {f} : {}", ty.mlir()));
    }
    gen.store(db, "%i", &x, ty);
    Ok(gen.finish(name, os.iter().product::<usize>() as u64))
}

/// Lowers a single-node `DataMovement` kernel (or an `Alias` whose output is a graph output:
/// a flat copy) to one or more generic kernels.
pub(crate) fn lower(g: &Graph, k: &fusion::Kernel, name: &str) -> Result<Vec<GenKernel>, String> {
    let [ni] = k.nodes[..] else {
        return Err("data movement kernels of several nodes".into());
    };
    let node = &g.nodes[ni];
    let data = node_input(g, ni, 0)?;
    let in_s = shape_of(g, data)?;
    let rank = in_s.len();
    let in_st = row_major(&in_s);
    let Op::Array(op) = &node.op else {
        return Err(format!("{} is not a data movement op", node.op.op_type()));
    };
    let out0 = node.outputs[0];
    let os = shape_of(g, out0)?;
    let ident = row_major(&os);
    match op {
        ArrayOp::Reshape { .. }
        | ArrayOp::Flatten { .. }
        | ArrayOp::Squeeze { .. }
        | ArrayOp::Unsqueeze { .. } => {
            let n = os.iter().product::<usize>();
            let flat = [n];
            Ok(vec![strided(
                g,
                name,
                (data, 0, &[1]),
                (out0, 0, &[1]),
                &flat,
            )?])
        }
        ArrayOp::Transpose { perm } => {
            let perm: Vec<usize> = match perm {
                Some(pm) => pm.iter().map(|&a| norm_axis(a, rank)).collect(),
                None => (0..rank).rev().collect(),
            };
            if perm.len() != rank {
                return Err("permutation of the wrong length".into());
            }
            // Output dim i follows input dim perm[i].
            let ss: Vec<i64> = perm.iter().map(|&p| in_st[p]).collect();
            Ok(vec![strided(
                g,
                name,
                (data, 0, &ss),
                (out0, 0, &ident),
                &os,
            )?])
        }
        ArrayOp::Expand => {
            if os.len() < rank {
                return Err("Expand to a lower rank".into());
            }
            let off = os.len() - rank;
            let mut ss = vec![0i64; os.len()];
            for j in 0..rank {
                if in_s[j] != 1 {
                    ss[j + off] = in_st[j];
                }
            }
            Ok(vec![strided(
                g,
                name,
                (data, 0, &ss),
                (out0, 0, &ident),
                &os,
            )?])
        }
        ArrayOp::Split { axis, .. } => {
            let a = norm_axis(*axis, rank);
            let mut start = 0i64;
            let mut v = Vec::new();
            for (j, &o) in node.outputs.iter().enumerate() {
                let s = shape_of(g, o)?;
                if k.outputs.contains(&o) {
                    let ds = row_major(&s);
                    v.push(strided(
                        g,
                        &format!("{name}_{j}"),
                        (data, start * in_st[a], &in_st),
                        (o, 0, &ds),
                        &s,
                    )?);
                }
                start += s[a] as i64;
            }
            Ok(v)
        }
        ArrayOp::Concat { axis } => {
            let a = norm_axis(*axis, rank);
            let mut start = 0i64;
            let mut v = Vec::new();
            for (j, x) in node.inputs.iter().enumerate() {
                let Some(x) = *x else { continue };
                let s = shape_of(g, x)?;
                let xs = row_major(&s);
                v.push(strided(
                    g,
                    &format!("{name}_{j}"),
                    (x, 0, &xs),
                    (out0, start * ident[a], &ident),
                    &s,
                )?);
                start += s[a] as i64;
            }
            Ok(v)
        }
        ArrayOp::Slice {
            starts,
            ends: _,
            axes,
            steps,
        } => {
            let starts = ints(g, node, starts)?.ok_or("Slice without starts")?;
            let axes: Vec<usize> = match ints(g, node, axes)? {
                Some(a) => a.iter().map(|&x| norm_axis(x, rank)).collect(),
                None => (0..starts.len()).collect(),
            };
            let steps = ints(g, node, steps)?.unwrap_or_else(|| vec![1; axes.len()]);
            let mut base = 0i64;
            let mut ss = in_st.clone();
            for (j, &ax) in axes.iter().enumerate() {
                let dim = in_s[ax] as i64;
                let step = steps.get(j).copied().unwrap_or(1);
                if step == 0 {
                    return Err("Slice step 0".into());
                }
                let mut st = starts[j];
                if st < 0 {
                    st += dim;
                }
                st = if step > 0 {
                    st.clamp(0, dim)
                } else {
                    st.clamp(0, dim - 1)
                };
                base += st * in_st[ax];
                ss[ax] = in_st[ax] * step;
            }
            Ok(vec![strided(
                g,
                name,
                (data, base, &ss),
                (out0, 0, &ident),
                &os,
            )?])
        }
        ArrayOp::Gather { axis } => {
            let a = norm_axis(*axis, rank);
            let ind = node_input(g, ni, 1)?;
            let is = shape_of(g, ind)?;
            let ity = Ty::of(g.values[ind].fact.dtype)?;
            if ity != Ty::I64 {
                return Err("Gather indices must be i64".into());
            }
            let mut gen = Gen::default();
            let (db, ty) = gen.value_buf(g, data)?;
            let (ib, _) = gen.value_buf(g, ind)?;
            let (ob, _) = gen.value_buf(g, out0)?;
            let idx = gen.unravel("%i", &os);
            let q = is.len();
            // Index into `indices`: output dims a..a+q.
            let ii = gen.lin(&idx[a..a + q], &row_major(&is), 0);
            let raw = gen.load(ib, &ii, Ty::I64);
            let dim = in_s[a] as i64;
            let zero = gen.b.op("arith.constant 0 : i64");
            let dimc = gen.b.op(&format!("arith.constant {dim} : i64"));
            let dm1 = gen
                .b
                .op(&format!("arith.constant {} : i64", (dim - 1).max(0)));
            let neg = gen.b.op(&format!("arith.cmpi slt, {raw}, {zero} : i64"));
            let wrapped = gen.b.op(&format!("arith.addi {raw}, {dimc} : i64"));
            let j0 = gen
                .b
                .op(&format!("arith.select {neg}, {wrapped}, {raw} : i64"));
            let j1 = gen.b.op(&format!("arith.maxsi {j0}, {zero} : i64"));
            let j2 = gen.b.op(&format!("arith.minsi {j1}, {dm1} : i64"));
            let j = gen.b.op(&format!("arith.index_cast {j2} : i64 to index"));
            let mut src_idx: Vec<String> = idx[..a].to_vec();
            src_idx.push(j);
            src_idx.extend_from_slice(&idx[a + q..]);
            let s = gen.lin(&src_idx, &in_st, 0);
            let x = gen.load(db, &s, ty);
            gen.store(ob, "%i", &x, ty);
            Ok(vec![gen.finish(name, os.iter().product::<usize>() as u64)])
        }
        ArrayOp::Pad { mode, .. } => {
            let (edges, fill) = pad_params(g, node, rank)?;
            Ok(vec![pad(
                g,
                name,
                (data, &in_s),
                (out0, &os),
                &edges,
                *mode,
                fill,
            )?])
        }
        other => Err(format!("{other:?} is not lowered for the GPU yet")),
    }
}

/// The generic flat copy of value `v` (its dtype and size) from `src` to `dst`.
pub fn copy_value(
    g: &Graph,
    name: &str,
    src: Operand,
    dst: Operand,
    v: ValueId,
) -> Result<GenKernel, String> {
    let val = &g.values[v];
    let ty = Ty::of(val.fact.dtype)?;
    let n = val.fact.shape.numel().ok_or("symbolic shape")? as u64;
    Ok(super::elementwise::copy(name, (src, n), (dst, n), ty, n))
}
