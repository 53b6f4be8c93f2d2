//! A small builder of ONNX-typed nodes, shared by the passes that expand one op into many
//! (`unroll_recurrent`, `decompose_attention`).

use kiln_ir::ops::{AttrValue, OnnxNode};
use kiln_ir::{DType, Fact, Graph, Node, Op, Shape, Tensor, ValueId};
use std::collections::HashSet;

/// Appends ONNX-typed nodes to a graph, naming their values after one node (the op being
/// expanded); constant inputs are evaluated at once into constants.
pub(crate) struct Builder<'g> {
    /// The graph nodes are appended to.
    pub g: &'g mut Graph,
    prefix: String,
    taken: HashSet<String>,
    /// The dtype of new float constants (the expanded node's first output's).
    pub dtype: DType,
}

impl<'g> Builder<'g> {
    /// A builder naming its values after `node`.
    pub fn new(g: &'g mut Graph, node: &Node) -> Self {
        let taken = g.values.iter().map(|v| v.name.clone()).collect();
        let dtype = g.values[node.outputs[0]].fact.dtype;
        Builder {
            g,
            prefix: node.name.clone(),
            taken,
            dtype,
        }
    }

    /// A fresh value or node name: the prefix, `what` and a number.
    pub fn name(&mut self, what: &str) -> String {
        let mut k = self.taken.len();
        loop {
            let n = format!("{}.{what}{k}", self.prefix);
            if self.taken.insert(n.clone()) {
                return n;
            }
            k += 1;
        }
    }

    /// Appends `ty(ins)` writing into `out` (a new value if `None`); returns the output.
    pub fn op_into(
        &mut self,
        ty: &str,
        attrs: &[(&str, AttrValue)],
        ins: &[ValueId],
        out: Option<ValueId>,
    ) -> ValueId {
        let onnx = OnnxNode::new(ty, 17, attrs, vec![true; ins.len()], 1);
        let op = Op::from_onnx(&onnx)
            .expect("expanded op attributes")
            .expect("expanded op type");
        let fresh = out.is_none();
        let out = out.unwrap_or_else(|| {
            let n = self.name(&ty.to_ascii_lowercase());
            self.g
                .add_value(n, Fact::new(self.dtype, Shape::unknown(0)))
        });
        let name = self.name("n");
        self.g.nodes.push(Node {
            name,
            op,
            inputs: ins.iter().map(|&v| Some(v)).collect(),
            outputs: vec![out],
        });
        let facts = self
            .g
            .infer_node(self.g.nodes.len() - 1)
            .expect("expanded ops infer");
        self.g.values[out].fact = facts[0].clone();
        // constant preparation (weight planes, transposes, bias sums, masks) is done here,
        // whatever its size (inference folds small values only)
        let consts: Option<Vec<&Tensor>> = ins.iter().map(|&v| self.g.const_value(v)).collect();
        if let (Some(c), true) = (consts, fresh) {
            if self.g.values[out].fact.value.is_none() {
                let n = self.g.nodes.last().expect("just pushed");
                let c: Vec<Option<&Tensor>> = c.into_iter().map(Some).collect();
                let t = n.op.eval(&c).expect("constant preparation");
                let t = t.into_iter().next().expect("one output");
                self.g.nodes.pop();
                self.g.set_const(out, t);
            } else {
                self.g.nodes.pop();
            }
        }
        out
    }

    /// Appends `ty(ins)` into a new value.
    pub fn op(&mut self, ty: &str, attrs: &[(&str, AttrValue)], ins: &[ValueId]) -> ValueId {
        self.op_into(ty, attrs, ins, None)
    }

    /// An int64 vector constant.
    pub fn ints(&mut self, v: &[i64]) -> ValueId {
        let n = self.name("k");
        self.g.add_const(n, Tensor::vec_i64(v))
    }

    /// A scalar constant in the builder's dtype.
    pub fn scalar(&mut self, x: f32) -> ValueId {
        let n = self.name("k");
        let t = Tensor::scalar(x).cast(self.dtype);
        self.g.add_const(n, t)
    }

    /// `x[start..end]` on `axis`.
    pub fn slice(&mut self, x: ValueId, axis: i64, start: usize, end: usize) -> ValueId {
        let (s, e, a) = (
            self.ints(&[start as i64]),
            self.ints(&[end as i64]),
            self.ints(&[axis]),
        );
        self.op("Slice", &[], &[x, s, e, a])
    }

    /// `x` reshaped to `shape`.
    pub fn reshape(&mut self, x: ValueId, shape: &[i64]) -> ValueId {
        let s = self.ints(shape);
        self.op("Reshape", &[], &[x, s])
    }

    /// `x` with its axes permuted.
    pub fn transpose(&mut self, x: ValueId, perm: &[i64]) -> ValueId {
        self.op(
            "Transpose",
            &[("perm", AttrValue::Ints(perm.to_vec()))],
            &[x],
        )
    }

    /// The binary op `ty(a, b)`.
    pub fn bin(&mut self, ty: &str, a: ValueId, b: ValueId) -> ValueId {
        self.op(ty, &[], &[a, b])
    }

    /// A zero constant of `dims` in the builder's dtype.
    pub fn zeros(&mut self, dims: &[usize]) -> ValueId {
        let n = self.name("k");
        let t = Tensor::from_vec(dims, vec![0f32; dims.iter().product()]).cast(self.dtype);
        self.g.add_const(n, t)
    }
}
