//! Linear algebra: `MatMul` (numpy semantics: 1-D operands, batch broadcasting), `Gemm`,
//! `Einsum` (general equations: implicit/explicit output, repeated indices, ellipsis) and
//! `MatMulInteger`.
//!
//! Numerics: float products accumulate in f64 and round once to the element type; integer
//! products are exact with wrapping (see [`Acc`]).

use super::reduce::Acc;
use super::{opt, req, Fact, OnnxNode, OpFamily, OpResult};
use crate::dtype::DType;
use crate::shape::{broadcast_dims, broadcast_shapes, Dim, Shape};
use crate::tensor::{Elem, Tensor};
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;

/// `Gemm` attributes: `Y = alpha * op(A) * op(B) + beta * C`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gemm {
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of `C`.
    pub beta: f32,
    /// Transpose `A` first.
    pub trans_a: bool,
    /// Transpose `B` first.
    pub trans_b: bool,
}

/// One symbol of an einsum term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EinsumSym {
    /// A letter index (`a-z`, `A-Z`).
    Label(char),
    /// `...`: the broadcast dims.
    Ellipsis,
}

/// A parsed einsum equation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Einsum {
    /// The equation as written.
    pub equation: String,
    /// One term per input.
    pub inputs: Vec<Vec<EinsumSym>>,
    /// The explicit output term (`None`: implicit output).
    pub output: Option<Vec<EinsumSym>>,
}

/// Ops of the linear algebra family.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LinalgOp {
    /// `MatMul` with numpy semantics.
    MatMul,
    /// `Gemm`.
    Gemm(Gemm),
    /// `Einsum`.
    Einsum(Einsum),
    /// `MatMulInteger`: (u)int8 product with zero points, output int32.
    MatMulInteger,
}

fn check_inputs(node: &OnnxNode, min: usize, max: usize) -> OpResult<()> {
    let n = node.num_inputs();
    if n < min || n > max || (0..min).any(|i| !node.has_input(i)) {
        return Err(format!(
            "expected {min} to {max} inputs (the first {min} present), found {n}"
        ));
    }
    if node.num_outputs > 1 {
        return Err(format!("expected 1 output, found {}", node.num_outputs));
    }
    Ok(())
}

fn flag(node: &OnnxNode, name: &str) -> OpResult<bool> {
    match node.int_or(name, 0)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(format!("attribute '{name}': expected 0 or 1, found {v}")),
    }
}

impl OpFamily for LinalgOp {
    fn from_onnx(node: &OnnxNode) -> OpResult<Option<Self>> {
        Ok(Some(match node.op_type.as_str() {
            "MatMul" => {
                check_inputs(node, 2, 2)?;
                LinalgOp::MatMul
            }
            "Gemm" => {
                check_inputs(node, 2, 3)?;
                LinalgOp::Gemm(Gemm {
                    alpha: node.float_or("alpha", 1.0)?,
                    beta: node.float_or("beta", 1.0)?,
                    trans_a: flag(node, "transA")?,
                    trans_b: flag(node, "transB")?,
                })
            }
            "Einsum" => {
                if node.num_inputs() == 0 || (0..node.num_inputs()).any(|i| !node.has_input(i)) {
                    return Err("Einsum expects at least one input, all present".into());
                }
                let eq = node
                    .string("equation")?
                    .ok_or("required attribute 'equation' is missing")?;
                let e = Einsum::parse(&eq).map_err(|m| format!("attribute 'equation': {m}"))?;
                if e.inputs.len() != node.num_inputs() {
                    return Err(format!(
                        "attribute 'equation': {} terms for {} inputs",
                        e.inputs.len(),
                        node.num_inputs()
                    ));
                }
                LinalgOp::Einsum(e)
            }
            "MatMulInteger" => {
                check_inputs(node, 2, 4)?;
                LinalgOp::MatMulInteger
            }
            _ => return Ok(None),
        }))
    }

    fn op_type(&self) -> &'static str {
        match self {
            LinalgOp::MatMul => "MatMul",
            LinalgOp::Gemm(_) => "Gemm",
            LinalgOp::Einsum(_) => "Einsum",
            LinalgOp::MatMulInteger => "MatMulInteger",
        }
    }

    fn infer(&self, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
        let a = req(inputs, 0)?;
        match self {
            LinalgOp::MatMul => {
                let b = req(inputs, 1)?;
                same_numeric(&[a, b])?;
                Ok(vec![Fact::new(a.dtype, matmul_shape(&a.shape, &b.shape)?)])
            }
            LinalgOp::Gemm(g) => {
                let b = req(inputs, 1)?;
                let c = opt(inputs, 2);
                same_numeric(&[a, b])?;
                let (m, n) = gemm_dims(g, &a.shape, &b.shape)?;
                if let Some(c) = c {
                    same_numeric(&[a, c])?;
                    let out = Shape(vec![m.clone(), n.clone()]);
                    let bc = broadcast_dims(&[&out, &c.shape])
                        .map_err(|e| format!("input 2 (C): {e}"))?;
                    if c.shape.rank() > 2 || !bc.0.iter().zip(&out.0).all(|(x, y)| x.compatible(y))
                    {
                        return Err(format!(
                            "input 2 (C): shape {} does not broadcast to {out}",
                            c.shape
                        ));
                    }
                }
                Ok(vec![Fact::new(a.dtype, Shape(vec![m, n]))])
            }
            LinalgOp::Einsum(e) => {
                let facts: Vec<&Fact> = (0..inputs.len())
                    .map(|i| req(inputs, i))
                    .collect::<OpResult<_>>()?;
                same_numeric(&facts)?;
                let shapes: Vec<Vec<Dim>> = facts.iter().map(|f| f.shape.0.clone()).collect();
                let plan = e.plan(&shapes)?;
                let dims = plan.out.iter().map(|id| plan.sizes[id].clone()).collect();
                Ok(vec![Fact::new(a.dtype, Shape(dims))])
            }
            LinalgOp::MatMulInteger => {
                let b = req(inputs, 1)?;
                check_mmi_dtypes([
                    Some(a.dtype),
                    Some(b.dtype),
                    opt(inputs, 2).map(|f| f.dtype),
                    opt(inputs, 3).map(|f| f.dtype),
                ])?;
                Ok(vec![Fact::new(
                    DType::I32,
                    matmul_shape(&a.shape, &b.shape)?,
                )])
            }
        }
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> OpResult<Vec<Tensor>> {
        let a = req(inputs, 0)?;
        let out = match self {
            LinalgOp::MatMul => {
                let b = req(inputs, 1)?;
                same_numeric_t(&[a, b])?;
                run_acc(&MatMulKernel, &[a, b], a.dtype(), false)?
            }
            LinalgOp::Gemm(g) => {
                let b = req(inputs, 1)?;
                same_numeric_t(&[a, b])?;
                if let Some(c) = opt(inputs, 2) {
                    same_numeric_t(&[a, c])?;
                }
                gemm(g, a, b, opt(inputs, 2))?
            }
            LinalgOp::Einsum(e) => {
                let ts: Vec<&Tensor> = (0..inputs.len())
                    .map(|i| req(inputs, i))
                    .collect::<OpResult<_>>()?;
                same_numeric_t(&ts)?;
                e.eval(&ts)?
            }
            LinalgOp::MatMulInteger => {
                matmul_integer(a, req(inputs, 1)?, opt(inputs, 2), opt(inputs, 3))?
            }
        };
        Ok(vec![out])
    }
}

/// Checks that all facts share one non-bool dtype.
fn same_numeric(fs: &[&Fact]) -> OpResult<()> {
    let d = fs[0].dtype;
    if d == DType::Bool {
        return Err("input 0: bool is not supported".into());
    }
    match fs.iter().position(|f| f.dtype != d) {
        Some(i) => Err(format!(
            "input {i}: dtype {} differs from input 0 ({d})",
            fs[i].dtype
        )),
        None => Ok(()),
    }
}

fn same_numeric_t(ts: &[&Tensor]) -> OpResult<()> {
    let fs: Vec<Fact> = ts
        .iter()
        .map(|t| Fact::new(t.dtype(), Shape::known(t.shape())))
        .collect();
    same_numeric(&fs.iter().collect::<Vec<_>>())
}

/// The numpy matmul output shape.
fn matmul_shape(a: &Shape, b: &Shape) -> OpResult<Shape> {
    let (ra, rb) = (a.rank(), b.rank());
    if ra == 0 || rb == 0 {
        return Err("MatMul operands must have rank >= 1".into());
    }
    let ka = &a.0[ra - 1];
    let kb = &b.0[if rb == 1 { 0 } else { rb - 2 }];
    if !ka.compatible(kb) {
        return Err(format!("inner dims differ: {a} x {b}"));
    }
    let ba = Shape(a.0[..ra.saturating_sub(2)].to_vec());
    let bb = Shape(b.0[..rb.saturating_sub(2)].to_vec());
    let mut dims = broadcast_dims(&[&ba, &bb])?.0;
    if ra > 1 {
        dims.push(a.0[ra - 2].clone());
    }
    if rb > 1 {
        dims.push(b.0[rb - 1].clone());
    }
    Ok(Shape(dims))
}

/// A computation over inputs converted to an accumulator type (see [`run_acc`]).
trait AccKernel {
    /// Computes the output from the converted inputs.
    fn run<A: Acc + Elem>(&self, xs: &[ArrayD<A>]) -> OpResult<ArrayD<A>>;
}

/// Runs a kernel on the inputs converted to f64 (float inputs, or `float` forced) or to
/// wrapping i64 (integers), and converts the result to `out`.
fn run_acc<K: AccKernel>(k: &K, ts: &[&Tensor], out: DType, float: bool) -> OpResult<Tensor> {
    if float || ts.iter().any(|t| t.dtype().is_float()) {
        let xs: Vec<ArrayD<f64>> = ts.iter().map(|t| t.to_f64_array()).collect();
        Ok(Tensor::from_f64_array(out, k.run(&xs)?))
    } else {
        let xs: Vec<ArrayD<i64>> = ts.iter().map(|t| to_i64_array(t)).collect();
        Ok(Tensor::I64(k.run(&xs)?).cast(out))
    }
}

fn to_i64_array(t: &Tensor) -> ArrayD<i64> {
    crate::with_tensor!(t, a => a.mapv(|x| x.to_i64()))
}

/// The [`AccKernel`] of `MatMul`.
struct MatMulKernel;

impl AccKernel for MatMulKernel {
    fn run<A: Acc + Elem>(&self, xs: &[ArrayD<A>]) -> OpResult<ArrayD<A>> {
        matmul(&xs[0], &xs[1])
    }
}

/// numpy matmul over accumulator arrays.
fn matmul<A: Acc + Elem>(a: &ArrayD<A>, b: &ArrayD<A>) -> OpResult<ArrayD<A>> {
    let (ra, rb) = (a.ndim(), b.ndim());
    if ra == 0 || rb == 0 {
        return Err("MatMul operands must have rank >= 1".into());
    }
    let ash: Vec<usize> = if ra == 1 {
        vec![1, a.len()]
    } else {
        a.shape().to_vec()
    };
    let bsh: Vec<usize> = if rb == 1 {
        vec![b.len(), 1]
    } else {
        b.shape().to_vec()
    };
    let (m, k) = (ash[ash.len() - 2], ash[ash.len() - 1]);
    let (k2, n) = (bsh[bsh.len() - 2], bsh[bsh.len() - 1]);
    if k != k2 {
        return Err(format!(
            "inner dims differ: {:?} x {:?}",
            a.shape(),
            b.shape()
        ));
    }
    let batch = broadcast_shapes(&[&ash[..ash.len() - 2], &bsh[..bsh.len() - 2]])?;
    let av = flat_broadcast(a, &ash, &batch, [m, k])?;
    let bv = flat_broadcast(b, &bsh, &batch, [k, n])?;
    let nb: usize = batch.iter().product();
    let mut out = vec![A::ZERO; nb * m * n];
    for bi in 0..nb {
        let (ao, bo, oo) = (bi * m * k, bi * k * n, bi * m * n);
        for i in 0..m {
            for j in 0..n {
                let mut s = A::ZERO;
                for p in 0..k {
                    s = s.add(av[ao + i * k + p].mul(bv[bo + p * n + j]));
                }
                out[oo + i * n + j] = s;
            }
        }
    }
    let mut shape = batch;
    if ra > 1 {
        shape.push(m);
    }
    if rb > 1 {
        shape.push(n);
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
}

/// Row-major data of `a` (viewed with shape `sh`) broadcast to `batch ++ mat`.
fn flat_broadcast<A: Elem>(
    a: &ArrayD<A>,
    sh: &[usize],
    batch: &[usize],
    mat: [usize; 2],
) -> OpResult<Vec<A>> {
    let std = a.as_standard_layout();
    let v = std
        .view()
        .into_shape_with_order(IxDyn(sh))
        .map_err(|e| e.to_string())?;
    let full: Vec<usize> = batch.iter().chain(&mat).copied().collect();
    let b = v
        .broadcast(IxDyn(&full))
        .ok_or_else(|| format!("cannot broadcast {sh:?} to {full:?}"))?;
    Ok(b.iter().copied().collect())
}

/// The (M, N) output dims of a Gemm.
fn gemm_dims(g: &Gemm, a: &Shape, b: &Shape) -> OpResult<(Dim, Dim)> {
    if a.rank() != 2 || b.rank() != 2 {
        return Err(format!("Gemm operands must be 2-D, found {a} and {b}"));
    }
    let pick = |s: &Shape, t: bool| {
        if t {
            (s.0[1].clone(), s.0[0].clone())
        } else {
            (s.0[0].clone(), s.0[1].clone())
        }
    };
    let (m, ka) = pick(a, g.trans_a);
    let (kb, n) = pick(b, g.trans_b);
    if !ka.compatible(&kb) {
        return Err(format!("inner dims differ: {ka} vs {kb} (A {a}, B {b})"));
    }
    Ok((m, n))
}

/// The [`AccKernel`] of `Gemm`: inputs A, B and optionally C.
struct GemmKernel<'a>(&'a Gemm);

impl AccKernel for GemmKernel<'_> {
    fn run<A: Acc + Elem>(&self, xs: &[ArrayD<A>]) -> OpResult<ArrayD<A>> {
        let g = self.0;
        let oriented = |x: &ArrayD<A>, t: bool| -> OpResult<ArrayD<A>> {
            if x.ndim() != 2 {
                return Err(format!("Gemm operands must be 2-D, found {:?}", x.shape()));
            }
            let v = if t {
                x.view().reversed_axes()
            } else {
                x.view()
            };
            Ok(v.as_standard_layout().into_owned())
        };
        let mut y = matmul(&oriented(&xs[0], g.trans_a)?, &oriented(&xs[1], g.trans_b)?)?;
        let (alpha, beta) = (A::of(f64::from(g.alpha)), A::of(f64::from(g.beta)));
        if g.alpha != 1.0 {
            y.mapv_inplace(|v| v.mul(alpha));
        }
        if let Some(c) = xs.get(2).filter(|_| g.beta != 0.0) {
            let cb = c.broadcast(y.raw_dim()).ok_or_else(|| {
                format!(
                    "input 2 (C): shape {:?} does not broadcast to {:?}",
                    c.shape(),
                    y.shape()
                )
            })?;
            ndarray::Zip::from(&mut y)
                .and(&cb)
                .for_each(|v, &c| *v = v.add(c.mul(beta)));
        }
        Ok(y)
    }
}

fn gemm(g: &Gemm, a: &Tensor, b: &Tensor, c: Option<&Tensor>) -> OpResult<Tensor> {
    let mut ts = vec![a, b];
    ts.extend(c);
    // integer Gemm with non-unit scales rounds once, at the end, like the reference
    let float = g.alpha != 1.0 || g.beta != 1.0;
    run_acc(&GemmKernel(g), &ts, a.dtype(), float)
}

/// Checks MatMulInteger input dtypes: (u)int8, zero points of their operand's dtype.
fn check_mmi_dtypes(d: [Option<DType>; 4]) -> OpResult<()> {
    for (i, dt) in d.iter().enumerate() {
        match dt {
            Some(DType::I8 | DType::U8) | None => {}
            Some(t) => return Err(format!("input {i}: expected int8/uint8, found {t}")),
        }
    }
    for (z, x) in [(2, 0), (3, 1)] {
        if d[z].is_some() && d[z] != d[x] {
            return Err(format!(
                "input {z}: zero point dtype differs from input {x}"
            ));
        }
    }
    Ok(())
}

/// `x - zero_point` in i64; a 1-D zero point of A is per row (length M).
fn sub_zero_point(x: &Tensor, zp: Option<&Tensor>, rows: bool) -> OpResult<ArrayD<i64>> {
    let x = to_i64_array(x);
    let Some(zp) = zp else { return Ok(x) };
    let mut z = to_i64_array(zp);
    let r = x.ndim();
    if rows && z.ndim() == 1 && r >= 2 && z.len() > 1 && z.len() == x.shape()[r - 2] {
        z = z
            .into_shape_with_order(IxDyn(&[x.shape()[r - 2], 1]))
            .map_err(|e| e.to_string())?;
    }
    let zb = z.broadcast(x.raw_dim()).ok_or_else(|| {
        format!(
            "zero point of shape {:?} does not fit input of shape {:?}",
            zp.shape(),
            x.shape()
        )
    })?;
    Ok(&x - &zb)
}

fn matmul_integer(
    a: &Tensor,
    b: &Tensor,
    azp: Option<&Tensor>,
    bzp: Option<&Tensor>,
) -> OpResult<Tensor> {
    check_mmi_dtypes([
        Some(a.dtype()),
        Some(b.dtype()),
        azp.map(Tensor::dtype),
        bzp.map(Tensor::dtype),
    ])?;
    let a = sub_zero_point(a, azp, true)?;
    let b = sub_zero_point(b, bzp, false)?;
    Ok(Tensor::I64(matmul(&a, &b)?).cast(DType::I32))
}

/// First id of the ellipsis (broadcast) dims in an einsum plan; letters use their code.
const ELLIPSIS_ID: usize = 1000;

/// An einsum equation resolved against input shapes.
struct EinsumPlan {
    /// Label id of each dim of each input.
    ins: Vec<Vec<usize>>,
    /// Label ids of the output dims.
    out: Vec<usize>,
    /// Size of each label id.
    sizes: BTreeMap<usize, Dim>,
}

impl Einsum {
    /// Parses an equation such as `"bij,bjk->bik"`, `"...ii->...i"` or `"ij"`.
    pub fn parse(equation: &str) -> Result<Einsum, String> {
        let eq: String = equation.chars().filter(|c| !c.is_whitespace()).collect();
        let (lhs, rhs) = match eq.split_once("->") {
            Some((l, r)) => (l, Some(r)),
            None => (eq.as_str(), None),
        };
        let inputs = lhs
            .split(',')
            .map(parse_term)
            .collect::<Result<Vec<_>, _>>()?;
        let output = rhs.map(parse_term).transpose()?;
        if let Some(out) = &output {
            let mut seen = Vec::new();
            for s in out {
                if seen.contains(s) {
                    return Err(format!("'{equation}': output repeats {s:?}"));
                }
                seen.push(*s);
            }
        }
        Ok(Einsum {
            equation: equation.to_string(),
            inputs,
            output,
        })
    }

    /// Resolves the equation against input shapes: label ids and sizes.
    fn plan(&self, shapes: &[Vec<Dim>]) -> OpResult<EinsumPlan> {
        if shapes.len() != self.inputs.len() {
            return Err(format!(
                "equation '{}' has {} terms for {} inputs",
                self.equation,
                self.inputs.len(),
                shapes.len()
            ));
        }
        let mut ells = Vec::new();
        for (i, (term, sh)) in self.inputs.iter().zip(shapes).enumerate() {
            let letters = term.iter().filter(|s| **s != EinsumSym::Ellipsis).count();
            let has_ell = term.contains(&EinsumSym::Ellipsis);
            if sh.len() < letters || (!has_ell && sh.len() != letters) {
                return Err(format!(
                    "input {i}: rank {} does not match term {} of '{}'",
                    sh.len(),
                    i,
                    self.equation
                ));
            }
            ells.push(sh.len() - letters);
        }
        let e_max = ells.iter().copied().max().unwrap_or(0);
        let mut ins = Vec::new();
        let mut sizes: BTreeMap<usize, Dim> = BTreeMap::new();
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for (i, (term, sh)) in self.inputs.iter().zip(shapes).enumerate() {
            let mut ids = Vec::new();
            for s in term {
                match s {
                    EinsumSym::Label(c) => ids.push(*c as usize),
                    EinsumSym::Ellipsis => {
                        ids.extend((e_max - ells[i]..e_max).map(|q| ELLIPSIS_ID + q))
                    }
                }
            }
            for (&id, d) in ids.iter().zip(sh) {
                *counts.entry(id).or_default() += 1;
                merge_size(&mut sizes, id, d).map_err(|m| format!("input {i}: {m}"))?;
            }
            ins.push(ids);
        }
        let out = match &self.output {
            Some(term) => {
                let mut out = Vec::new();
                for s in term {
                    match s {
                        EinsumSym::Label(c) if sizes.contains_key(&(*c as usize)) => {
                            out.push(*c as usize)
                        }
                        EinsumSym::Label(c) => {
                            return Err(format!("output label '{c}' does not occur in the inputs"))
                        }
                        EinsumSym::Ellipsis => out.extend((0..e_max).map(|q| ELLIPSIS_ID + q)),
                    }
                }
                if e_max > 0 && !term.contains(&EinsumSym::Ellipsis) {
                    return Err("inputs have '...' dims but the output has no '...'".into());
                }
                out
            }
            None => (0..e_max)
                .map(|q| ELLIPSIS_ID + q)
                .chain(
                    counts
                        .iter()
                        .filter(|(&id, &n)| id < ELLIPSIS_ID && n == 1)
                        .map(|(&id, _)| id),
                )
                .collect(),
        };
        Ok(EinsumPlan { ins, out, sizes })
    }

    fn eval(&self, ts: &[&Tensor]) -> OpResult<Tensor> {
        let shapes: Vec<Vec<Dim>> = ts.iter().map(|t| Shape::known(t.shape()).0).collect();
        let plan = self.plan(&shapes)?;
        run_acc(&plan, ts, ts[0].dtype(), false)
    }
}

/// Records the size of label `id`; `...` dims broadcast against size 1.
fn merge_size(sizes: &mut BTreeMap<usize, Dim>, id: usize, d: &Dim) -> Result<(), String> {
    let Some(old) = sizes.get(&id) else {
        sizes.insert(id, d.clone());
        return Ok(());
    };
    let new = match (old, d) {
        (Dim::Known(a), Dim::Known(b)) if a == b => return Ok(()),
        (Dim::Known(1), _) if id >= ELLIPSIS_ID => d.clone(),
        (_, Dim::Known(1)) if id >= ELLIPSIS_ID => return Ok(()),
        (Dim::Known(a), Dim::Known(b)) => {
            let what = match char::from_u32(id as u32).filter(|_| id < ELLIPSIS_ID) {
                Some(c) => format!("label '{c}'"),
                None => "'...' dim".to_string(),
            };
            return Err(format!("{what} has sizes {a} and {b}"));
        }
        (Dim::Sym(_), Dim::Known(_)) => d.clone(),
        _ => return Ok(()),
    };
    sizes.insert(id, new);
    Ok(())
}

/// Parses one term: letters and at most one `...`.
fn parse_term(t: &str) -> Result<Vec<EinsumSym>, String> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("...") {
            if out.contains(&EinsumSym::Ellipsis) {
                return Err(format!("term '{t}' has more than one '...'"));
            }
            out.push(EinsumSym::Ellipsis);
            rest = r;
        } else if c.is_ascii_alphabetic() {
            out.push(EinsumSym::Label(c));
            rest = &rest[1..];
        } else {
            return Err(format!("term '{t}': unexpected character '{c}'"));
        }
    }
    Ok(out)
}

impl AccKernel for EinsumPlan {
    fn run<A: Acc + Elem>(&self, xs: &[ArrayD<A>]) -> OpResult<ArrayD<A>> {
        let summed: Vec<usize> = self
            .sizes
            .keys()
            .copied()
            .filter(|id| !self.out.contains(id))
            .collect();
        let order: Vec<usize> = self.out.iter().chain(&summed).copied().collect();
        let size = |id: &usize| self.sizes.get(id).and_then(Dim::known).unwrap_or(0);
        let dims: Vec<usize> = order.iter().map(size).collect();
        // for each input: (position in `order`, row-major stride) per dim
        let access: Vec<Vec<(usize, usize)>> = self
            .ins
            .iter()
            .zip(xs)
            .map(|(ids, x)| {
                let mut stride = 1;
                let mut acc: Vec<(usize, usize)> = ids
                    .iter()
                    .zip(x.shape())
                    .rev()
                    .map(|(id, &n)| {
                        let pos = order.iter().position(|o| o == id).unwrap_or(0);
                        let s = if n == 1 { 0 } else { stride };
                        stride *= n;
                        (pos, s)
                    })
                    .collect();
                acc.reverse();
                acc
            })
            .collect();
        let data: Vec<Vec<A>> = xs.iter().map(|x| x.iter().copied().collect()).collect();
        let out_dims: Vec<usize> = self.out.iter().map(size).collect();
        let n_out: usize = out_dims.iter().product();
        let n_sum: usize = summed.iter().map(size).product();
        let mut out = vec![A::ZERO; n_out];
        let mut idx = vec![0usize; order.len()];
        for t in 0..n_out * n_sum {
            let mut p = A::ONE;
            for (acc, d) in access.iter().zip(&data) {
                let off: usize = acc.iter().map(|&(pos, s)| idx[pos] * s).sum();
                p = p.mul(d[off]);
            }
            out[t / n_sum] = out[t / n_sum].add(p);
            for (i, n) in idx.iter_mut().zip(&dims).rev() {
                *i += 1;
                if *i < *n {
                    break;
                }
                *i = 0;
            }
        }
        ArrayD::from_shape_vec(IxDyn(&out_dims), out).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::AttrValue;

    fn node(op: &str, n_in: usize, attrs: &[(&str, AttrValue)]) -> OnnxNode {
        OnnxNode {
            name: "n".into(),
            op_type: op.into(),
            opset: 13,
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            inputs_present: vec![true; n_in],
            num_outputs: 1,
        }
    }

    fn parse(op: &str, n_in: usize, attrs: &[(&str, AttrValue)]) -> LinalgOp {
        LinalgOp::from_onnx(&node(op, n_in, attrs))
            .unwrap()
            .unwrap()
    }

    /// Evaluates and checks that inference agrees with the result.
    fn run(op: &LinalgOp, inputs: &[&Tensor]) -> Tensor {
        let ins: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        let out = op.eval(&ins).unwrap().remove(0);
        let facts: Vec<Fact> = inputs
            .iter()
            .map(|t| Fact::new(t.dtype(), Shape::known(t.shape())))
            .collect();
        let refs: Vec<Option<&Fact>> = facts.iter().map(Some).collect();
        let f = op.infer(&refs).unwrap().remove(0);
        assert_eq!((f.dtype, f.shape), (out.dtype(), Shape::known(out.shape())));
        out
    }

    fn f64s(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::from_vec(shape, (0..n).map(|i| i as f64).collect())
    }

    fn einsum(eq: &str, inputs: &[&Tensor]) -> Tensor {
        let op = parse(
            "Einsum",
            inputs.len(),
            &[("equation", AttrValue::String(eq.into()))],
        );
        run(&op, inputs)
    }

    #[test]
    fn matmul_integers_and_vectors() {
        let a = Tensor::from_vec(&[2, 2], vec![1i32, 2, 3, 4]);
        let b = Tensor::from_vec(&[2, 2], vec![5i32, 6, 7, 8]);
        let y = run(&LinalgOp::MatMul, &[&a, &b]);
        assert_eq!(y.dtype(), DType::I32);
        assert_eq!(y.to_i64_vec(), vec![19, 22, 43, 50]);
        let v = Tensor::from_vec(&[3], vec![1.0f32, 2., 3.]);
        let w = Tensor::from_vec(&[3], vec![4.0f32, 5., 6.]);
        let dot = run(&LinalgOp::MatMul, &[&v, &w]);
        assert_eq!(dot.shape(), &[] as &[usize]);
        assert_eq!(dot.to_f64_vec(), vec![32.0]);
    }

    #[test]
    fn matmul_accepts_non_standard_layout() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1f32, 3., 2., 4.]).unwrap();
        let at = Tensor::F32(a.reversed_axes());
        let b = Tensor::from_vec(&[2, 1], vec![1f32, 1.]);
        assert_eq!(
            run(&LinalgOp::MatMul, &[&at, &b]).to_f64_vec(),
            vec![3.0, 7.0]
        );
    }

    #[test]
    fn matmul_errors_and_symbolic_inference() {
        let a = Tensor::from_vec(&[2, 3], vec![0f32; 6]);
        assert!(LinalgOp::MatMul.eval(&[Some(&a), Some(&a)]).is_err());
        let s = Tensor::scalar(1f32);
        assert!(LinalgOp::MatMul.eval(&[Some(&s), Some(&a)]).is_err());
        let i = Tensor::from_vec(&[3, 2], vec![0i64; 6]);
        assert!(LinalgOp::MatMul.eval(&[Some(&a), Some(&i)]).is_err());
        let x = Fact::new(
            DType::F32,
            Shape(vec![Dim::Sym("N".into()), Dim::Known(3), Dim::Known(4)]),
        );
        let w = Fact::new(DType::F32, Shape::known(&[4, 5]));
        let out = LinalgOp::MatMul.infer(&[Some(&x), Some(&w)]).unwrap();
        assert_eq!(out[0].shape.to_string(), "[N,3,5]");
        assert!(LinalgOp::MatMul.infer(&[Some(&w), Some(&x)]).is_err());
    }

    #[test]
    fn gemm_transposes_and_broadcasts_c() {
        let op = parse("Gemm", 3, &[("transA", AttrValue::Int(1))]);
        let a = Tensor::from_vec(&[3, 2], vec![1i32, 2, 3, 4, 5, 6]);
        let b = Tensor::from_vec(&[3, 2], vec![1i32, 0, 0, 1, 1, 1]);
        let c = Tensor::from_vec(&[2, 1], vec![10i32, 20]);
        assert_eq!(run(&op, &[&a, &b, &c]).to_i64_vec(), vec![16, 18, 28, 30]);
        let op = parse(
            "Gemm",
            3,
            &[
                ("alpha", AttrValue::Float(0.5)),
                ("beta", AttrValue::Float(2.0)),
                ("transB", AttrValue::Int(1)),
            ],
        );
        let a = Tensor::from_vec(&[1, 2], vec![2f32, 4.]);
        let b = Tensor::from_vec(&[2, 2], vec![1f32, 1., 0., 1.]);
        let c = Tensor::scalar(1f32);
        assert_eq!(run(&op, &[&a, &b, &c]).to_f64_vec(), vec![5.0, 4.0]);
        let bad_c = Tensor::from_vec(&[3], vec![0f32; 3]);
        assert!(op.eval(&[Some(&a), Some(&b), Some(&bad_c)]).is_err());
    }

    #[test]
    fn matmul_integer_zero_points() {
        let a = Tensor::from_vec(&[2, 2], vec![10u8, 20, 30, 40]);
        let b = Tensor::from_vec(&[2, 2], vec![1u8, 2, 3, 4]);
        let azp = Tensor::from_vec(&[2], vec![10u8, 30]);
        let bzp = Tensor::scalar(1u8);
        let y = run(&LinalgOp::MatMulInteger, &[&a, &b, &azp, &bzp]);
        assert_eq!(y.dtype(), DType::I32);
        assert_eq!(y.to_i64_vec(), vec![20, 30, 20, 30]);
        let f = Tensor::from_vec(&[2, 2], vec![0f32; 4]);
        assert!(LinalgOp::MatMulInteger.eval(&[Some(&f), Some(&b)]).is_err());
    }

    #[test]
    fn einsum_general_equations() {
        let m = f64s(&[3, 3]);
        assert_eq!(einsum("ii", &[&m]).to_f64_vec(), vec![12.0]);
        assert_eq!(einsum("ii->i", &[&m]).to_f64_vec(), vec![0.0, 4.0, 8.0]);
        let u = Tensor::from_vec(&[2], vec![1.0f64, 2.]);
        let v = Tensor::from_vec(&[3], vec![3.0f64, 4., 5.]);
        assert_eq!(
            einsum("i,j", &[&u, &v]).to_f64_vec(),
            vec![3., 4., 5., 6., 8., 10.]
        );
        let a = f64s(&[2, 1, 2, 3]);
        let b = f64s(&[3, 2]);
        let y = einsum("...ij,...jk->...ik", &[&a, &b]);
        assert_eq!(y.shape(), &[2, 1, 2, 2]);
        assert_eq!(y.to_f64_vec(), vec![10., 13., 28., 40., 46., 67., 64., 94.]);
        // implicit output: labels in ASCII order (upper case first)
        let p = f64s(&[2, 3]);
        let q = f64s(&[3, 2]);
        assert_eq!(einsum("Ba,aB", &[&p, &q]).to_f64_vec(), vec![50.0]);
        assert_eq!(einsum("bA", &[&p]).shape(), &[3, 2]);
        let i = Tensor::from_vec(&[2, 2], vec![1i64, 2, 3, 4]);
        assert_eq!(einsum("ij->", &[&i]).to_i64_vec(), vec![10]);
    }

    #[test]
    fn einsum_errors() {
        for bad in ["ij->k", "i.j", "ij->ii", "a...b...", "i1"] {
            let n = node("Einsum", 1, &[("equation", AttrValue::String(bad.into()))]);
            let r = LinalgOp::from_onnx(&n).and_then(|op| {
                let op = op.ok_or("none")?;
                op.eval(&[Some(&f64s(&[2, 2]))])
            });
            assert!(r.is_err(), "{bad}");
        }
        let two = node(
            "Einsum",
            1,
            &[("equation", AttrValue::String("ij,jk".into()))],
        );
        assert!(LinalgOp::from_onnx(&two).is_err());
        let op = parse(
            "Einsum",
            2,
            &[("equation", AttrValue::String("ij,jk->ik".into()))],
        );
        let (a, b) = (f64s(&[2, 3]), f64s(&[4, 2]));
        assert!(op.eval(&[Some(&a), Some(&b)]).is_err());
        assert!(op.eval(&[Some(&a), Some(&f64s(&[3]))]).is_err());
        let e = parse(
            "Einsum",
            1,
            &[("equation", AttrValue::String("...i->i".into()))],
        );
        assert!(e.eval(&[Some(&f64s(&[2, 3]))]).is_err());
    }
}
