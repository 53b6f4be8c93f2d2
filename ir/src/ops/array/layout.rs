//! Block rearrangements between channels and space: `DepthToSpace`, `SpaceToDepth`.

use super::BlockMode;
use crate::map_tensor;
use crate::ops::{req, Fact, OpResult};
use crate::shape::{Dim, Shape};
use crate::tensor::{Elem, Tensor};
use ndarray::{ArrayD, IxDyn};

/// A reshape to `tmp`, a transpose by `perm`, and a reshape to `out`.
struct Plan {
    tmp: Vec<usize>,
    perm: [usize; 6],
    out: Vec<usize>,
}

fn nchw(shape: &[usize]) -> OpResult<[usize; 4]> {
    shape
        .try_into()
        .map_err(|_| format!("input 0: expected a 4-D (NCHW) tensor, found shape {shape:?}"))
}

fn depth_to_space_plan(shape: &[usize], bs: usize, mode: BlockMode) -> OpResult<Plan> {
    let [n, c, h, w] = nchw(shape)?;
    if c % (bs * bs) != 0 {
        return Err(format!(
            "input 0: {c} channels are not divisible by blocksize² = {}",
            bs * bs
        ));
    }
    let c2 = c / (bs * bs);
    let (tmp, perm) = match mode {
        BlockMode::Dcr => (vec![n, bs, bs, c2, h, w], [0, 3, 4, 1, 5, 2]),
        BlockMode::Crd => (vec![n, c2, bs, bs, h, w], [0, 1, 4, 2, 5, 3]),
    };
    Ok(Plan {
        tmp,
        perm,
        out: vec![n, c2, h * bs, w * bs],
    })
}

fn space_to_depth_plan(shape: &[usize], bs: usize, mode: BlockMode) -> OpResult<Plan> {
    let [n, c, h, w] = nchw(shape)?;
    if h % bs != 0 || w % bs != 0 {
        return Err(format!(
            "input 0: spatial dims {h}x{w} are not divisible by blocksize {bs}"
        ));
    }
    let perm = match mode {
        BlockMode::Dcr => [0, 3, 5, 1, 2, 4],
        BlockMode::Crd => [0, 1, 3, 5, 2, 4],
    };
    Ok(Plan {
        tmp: vec![n, c, h / bs, bs, w / bs, bs],
        perm,
        out: vec![n, c * bs * bs, h / bs, w / bs],
    })
}

fn rearrange<T: Elem>(a: &ArrayD<T>, plan: &Plan) -> OpResult<ArrayD<T>> {
    let std = a.as_standard_layout();
    let v = std
        .view()
        .into_shape_with_order(IxDyn(&plan.tmp))
        .map_err(|e| format!("internal: {e}"))?
        .permuted_axes(IxDyn(&plan.perm));
    ArrayD::from_shape_vec(IxDyn(&plan.out), v.iter().copied().collect())
        .map_err(|e| format!("internal: {e}"))
}

/// Symbolic output shape: `f` maps `(c, h, w)` known sizes; unknown dims stay unknown.
fn infer_block(
    inputs: &[Option<&Fact>],
    f: impl Fn(&[usize]) -> OpResult<Plan>,
) -> OpResult<Vec<Fact>> {
    let x = req(inputs, 0)?;
    if x.shape.rank() != 4 {
        return Err(format!(
            "input 0: expected a 4-D (NCHW) tensor, found shape {}",
            x.shape
        ));
    }
    // run the plan on the known dims (unknown ones replaced by a placeholder), then keep
    // only the dims that depend on known inputs.
    let dims = x.shape.dims();
    let probe: Vec<usize> = dims.iter().map(|d| d.known().unwrap_or(0)).collect();
    let out = match x.shape.as_known() {
        Some(k) => Shape::known(&f(&k)?.out),
        None if dims[1..].iter().all(|d| d.known().is_some()) => {
            let mut s = Shape::known(&f(&probe)?.out);
            s.0[0] = dims[0].clone();
            s
        }
        None => Shape(vec![
            dims[0].clone(),
            Dim::unknown(),
            Dim::unknown(),
            Dim::unknown(),
        ]),
    };
    Ok(vec![Fact::new(x.dtype, out)])
}

/// Shape inference of `DepthToSpace`.
pub(super) fn infer_depth_to_space(bs: usize, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    infer_block(inputs, |s| depth_to_space_plan(s, bs, BlockMode::Dcr))
}

/// Shape inference of `SpaceToDepth`.
pub(super) fn infer_space_to_depth(bs: usize, inputs: &[Option<&Fact>]) -> OpResult<Vec<Fact>> {
    infer_block(inputs, |s| space_to_depth_plan(s, bs, BlockMode::Dcr))
}

/// `DepthToSpace`.
pub(super) fn depth_to_space(
    bs: usize,
    mode: BlockMode,
    inputs: &[Option<&Tensor>],
) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let plan = depth_to_space_plan(x.shape(), bs, mode)?;
    Ok(map_tensor!(x, a => rearrange(a, &plan)?))
}

/// `SpaceToDepth`.
pub(super) fn space_to_depth(
    bs: usize,
    mode: BlockMode,
    inputs: &[Option<&Tensor>],
) -> OpResult<Tensor> {
    let x = req(inputs, 0)?;
    let plan = space_to_depth_plan(x.shape(), bs, mode)?;
    Ok(map_tensor!(x, a => rearrange(a, &plan)?))
}
