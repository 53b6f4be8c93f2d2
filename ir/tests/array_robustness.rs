//! Robustness of the array ops: random (mostly invalid) attributes and inputs must give
//! errors, never panics, and whenever `eval` succeeds, `infer` must agree with it on dtype and
//! shape (for constant, known-shape and symbolic-shape input facts alike).

use kiln_ir::ops::array::ArrayOp;
use kiln_ir::ops::{AttrValue, Fact, OnnxNode, OpFamily};
use kiln_ir::{DType, Dim, Shape, Tensor};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

const OPS: [&str; 27] = [
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "GatherElements",
    "GatherND",
    "ScatterElements",
    "Scatter",
    "ScatterND",
    "Expand",
    "Tile",
    "Pad",
    "Shape",
    "Size",
    "ConstantOfShape",
    "Range",
    "Trilu",
    "OneHot",
    "DepthToSpace",
    "SpaceToDepth",
    "NonZero",
    "EyeLike",
];

/// A small deterministic PRNG (LCG).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    /// Mostly small ints, sometimes extreme ones.
    fn int(&mut self) -> i64 {
        match self.below(6) {
            0 => i64::MIN,
            1 => i64::MAX,
            2 => -(self.below(6) as i64),
            _ => self.below(6) as i64,
        }
    }

    fn tensor(&mut self) -> Tensor {
        let shape: Vec<usize> = (0..self.below(4)).map(|_| self.below(4) as usize).collect();
        let n: usize = shape.iter().product();
        let data: Vec<i64> = (0..n).map(|_| self.int()).collect();
        let dtypes = [
            DType::I64,
            DType::I64,
            DType::I32,
            DType::F32,
            DType::Bool,
            DType::U8,
            DType::F16,
        ];
        Tensor::from_vec(&shape, data).cast(dtypes[self.below(dtypes.len() as u64) as usize])
    }

    /// A fact for `t`: the constant, its known shape, or a partly symbolic shape.
    fn fact(&mut self, t: &Tensor) -> Fact {
        match self.below(3) {
            0 => Fact::constant(t.clone()),
            1 => Fact::new(t.dtype(), Shape::known(t.shape())),
            _ => {
                let dims = t.shape().iter().map(|&d| match self.below(3) {
                    0 => Dim::Sym("N".into()),
                    1 => Dim::unknown(),
                    _ => Dim::Known(d),
                });
                Fact::new(t.dtype(), Shape(dims.collect()))
            }
        }
    }

    fn node(&mut self, op: &str) -> OnnxNode {
        let mut attrs = BTreeMap::new();
        for name in [
            "axis",
            "batch_dims",
            "blocksize",
            "start",
            "end",
            "k",
            "num_outputs",
            "upper",
        ] {
            if self.below(3) == 0 {
                attrs.insert(name.to_string(), AttrValue::Int(self.int()));
            }
        }
        for name in ["perm", "axes", "split", "pads", "starts", "ends", "shape"] {
            if self.below(3) == 0 {
                let v = (0..self.below(4)).map(|_| self.int()).collect();
                attrs.insert(name.to_string(), AttrValue::Ints(v));
            }
        }
        let n = 1 + self.below(5) as usize;
        OnnxNode {
            name: "n".into(),
            op_type: op.into(),
            opset: [1, 9, 11, 13, 18][self.below(5) as usize],
            attrs,
            inputs_present: (0..n).map(|i| i == 0 || self.below(5) != 0).collect(),
            num_outputs: 1 + self.below(3) as usize,
        }
    }
}

/// Checks that the inferred facts describe the evaluated tensors.
fn agree(op: &ArrayOp, outs: &[Tensor], facts: &[Fact]) {
    // Squeeze without axes assumes symbolic dims are not 1.
    if matches!(op, ArrayOp::Squeeze { .. }) {
        return;
    }
    assert!(facts.len() >= outs.len(), "{op:?}");
    for (t, f) in outs.iter().zip(facts) {
        assert_eq!(t.dtype(), f.dtype, "{op:?}");
        assert_eq!(
            t.rank(),
            f.shape.rank(),
            "{op:?}: {:?} vs {}",
            t.shape(),
            f.shape
        );
        for (d, &n) in f.shape.dims().iter().zip(t.shape()) {
            assert!(
                d.compatible(&Dim::Known(n)),
                "{op:?}: {:?} vs {}",
                t.shape(),
                f.shape
            );
        }
        if let Some(v) = f.value() {
            assert_eq!(v, t, "{op:?}: folded value");
        }
    }
}

#[test]
fn random_inputs_never_panic() {
    let mut r = Rng(17);
    let mut evaluated = 0;
    for it in 0..300_000 {
        let node = r.node(OPS[it % OPS.len()]);
        let Ok(Some(op)) = ArrayOp::from_onnx(&node) else {
            continue;
        };
        let inputs: Vec<Option<Tensor>> = node
            .inputs_present
            .iter()
            .map(|&p| p.then(|| r.tensor()))
            .collect();
        let facts: Vec<Option<Fact>> = inputs
            .iter()
            .map(|t| t.as_ref().map(|t| r.fact(t)))
            .collect();
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
        let frefs: Vec<Option<&Fact>> = facts.iter().map(Option::as_ref).collect();
        let evaluated_now = catch_unwind(AssertUnwindSafe(|| op.eval(&refs)))
            .unwrap_or_else(|_| panic!("eval panicked: {op:?} {inputs:?}"));
        let inferred = catch_unwind(AssertUnwindSafe(|| op.infer(&frefs)))
            .unwrap_or_else(|_| panic!("infer panicked: {op:?} {facts:?}"));
        let Ok(outs) = evaluated_now else { continue };
        evaluated += 1;
        match inferred {
            Ok(f) => agree(&op, &outs, &f),
            // ranks that depend on unknown values cannot be represented.
            Err(m) if m.contains("statically") => {}
            Err(m) => panic!("infer rejects what eval accepts: {op:?} {facts:?}: {m}"),
        }
    }
    assert!(evaluated > 1000, "only {evaluated} successful evaluations");
}
