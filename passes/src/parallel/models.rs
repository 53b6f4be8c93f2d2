//! Synthetic model graphs of real sizes for plan-search tests and benchmarks: a transformer
//! encoder/decoder stack (BERT-base, GPT-2-medium shapes) and a small CNN. Weights are
//! zero tensors (allocated lazily by the OS, so a 350M-parameter graph costs no memory
//! until read); only shapes matter to the planner.

use kiln_ir::ops::{AttrValue, OnnxNode};
use kiln_ir::{DType, Fact, Graph, Node, Op, Shape, Tensor, ValueId};

/// The shape of a transformer stack.
#[derive(Clone, Debug, PartialEq)]
pub struct TransformerConfig {
    /// Name of the graph.
    pub name: String,
    /// Batch size (axis 0 of the input).
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Attention heads (`hidden` must be a multiple).
    pub heads: usize,
    /// MLP inner size.
    pub ffn: usize,
    /// Number of blocks.
    pub layers: usize,
    /// GPT-2 style (pre-LayerNorm, causal mask added to the scores, tanh GELU) instead of
    /// BERT style (post-LayerNorm, erf GELU).
    pub causal: bool,
}

impl TransformerConfig {
    /// BERT-base: 12 layers, hidden 768, 12 heads, MLP 3072, sequence 128.
    pub fn bert_base(batch: usize) -> Self {
        TransformerConfig {
            name: "bert-base".into(),
            batch,
            seq: 128,
            hidden: 768,
            heads: 12,
            ffn: 3072,
            layers: 12,
            causal: false,
        }
    }

    /// GPT-2-medium: 24 layers, hidden 1024, 16 heads, MLP 4096, sequence 128.
    pub fn gpt2_medium(batch: usize) -> Self {
        TransformerConfig {
            name: "gpt2-medium".into(),
            batch,
            seq: 128,
            hidden: 1024,
            heads: 16,
            ffn: 4096,
            layers: 24,
            causal: true,
        }
    }
}

/// Builds a graph node by node through the ONNX op constructors and shape inference.
struct Builder {
    g: Graph,
}

impl Builder {
    fn new(name: &str) -> Builder {
        Builder {
            g: Graph {
                name: name.into(),
                opset: 17,
                ..Default::default()
            },
        }
    }

    fn input(&mut self, name: &str, dims: &[usize]) -> ValueId {
        let v = self
            .g
            .add_value(name, Fact::new(DType::F32, Shape::known(dims)));
        self.g.inputs.push(v);
        v
    }

    fn weight(&mut self, name: &str, dims: &[usize]) -> ValueId {
        self.g.add_const(name, Tensor::zeros(DType::F32, dims))
    }

    fn ints(&mut self, name: &str, v: &[i64]) -> ValueId {
        self.g
            .add_const(name, Tensor::from_vec(&[v.len()], v.to_vec()))
    }

    fn scalar(&mut self, name: &str, v: f32) -> ValueId {
        self.g.add_const(name, Tensor::from_vec(&[], vec![v]))
    }

    fn op(&mut self, ty: &str, attrs: &[(&str, AttrValue)], ins: &[ValueId]) -> ValueId {
        let on = OnnxNode::new(ty, 17, attrs, vec![true; ins.len()], 1);
        let op: Op = Op::from_onnx(&on)
            .unwrap_or_else(|e| panic!("{ty}: {e}"))
            .unwrap_or_else(|| panic!("{ty}: unknown op"));
        let name = format!("{ty}_{}", self.g.nodes.len());
        let out = self.g.add_value(
            format!("{name}_out"),
            Fact::new(DType::F32, Shape::known(&[])),
        );
        self.g.nodes.push(Node {
            name,
            op,
            inputs: ins.iter().map(|&i| Some(i)).collect(),
            outputs: vec![out],
        });
        let f = self
            .g
            .infer_node(self.g.nodes.len() - 1)
            .unwrap_or_else(|e| panic!("{ty}: {e}"));
        self.g.values[out].fact = f.into_iter().next().expect("one output");
        out
    }

    fn linear(&mut self, x: ValueId, name: &str, cin: usize, cout: usize) -> ValueId {
        let w = self.weight(&format!("{name}.weight"), &[cin, cout]);
        let b = self.weight(&format!("{name}.bias"), &[cout]);
        let y = self.op("MatMul", &[], &[x, w]);
        self.op("Add", &[], &[y, b])
    }

    fn layer_norm(&mut self, x: ValueId, name: &str, c: usize) -> ValueId {
        let gamma = self.weight(&format!("{name}.weight"), &[c]);
        let beta = self.weight(&format!("{name}.bias"), &[c]);
        self.op(
            "LayerNormalization",
            &[("axis", AttrValue::Int(-1))],
            &[x, gamma, beta],
        )
    }
}

/// A transformer stack: input `hidden_states` `[batch, seq, hidden]` (the embeddings), per
/// block Q/K/V projections (three MatMuls), heads split by Reshape + Transpose, scaled
/// dot-product attention with Softmax, output projection, residual, LayerNorm, MLP
/// (up, GELU, down), residual, LayerNorm; output `last_hidden_state`.
pub fn transformer(c: &TransformerConfig) -> Graph {
    let (h, nh) = (c.hidden as i64, c.heads as i64);
    let hd = h / nh;
    let mut g = Builder::new(&c.name);
    let mut x = g.input("hidden_states", &[c.batch, c.seq, c.hidden]);
    let split_shape = g.ints("split_heads_shape", &[0, 0, nh, hd]);
    let merge_shape = g.ints("merge_heads_shape", &[0, 0, h]);
    let scale = g.scalar("attention_scale", (hd as f32).sqrt());
    let mask = c.causal.then(|| {
        let mut m = vec![0f32; c.seq * c.seq];
        for i in 0..c.seq {
            for j in i + 1..c.seq {
                m[i * c.seq + j] = f32::MIN;
            }
        }
        g.g.add_const("causal_mask", Tensor::from_vec(&[c.seq, c.seq], m))
    });
    let perm = |p: &[i64]| [("perm", AttrValue::Ints(p.to_vec()))];
    for l in 0..c.layers {
        let p = format!("layer.{l}");
        let a_in = if c.causal {
            g.layer_norm(x, &format!("{p}.ln_1"), c.hidden)
        } else {
            x
        };
        let heads = |g: &mut Builder, name: &str, p2: &[i64]| {
            let y = g.linear(a_in, &format!("{p}.attention.{name}"), c.hidden, c.hidden);
            let y = g.op("Reshape", &[], &[y, split_shape]);
            g.op("Transpose", &perm(p2), &[y])
        };
        let q = heads(&mut g, "query", &[0, 2, 1, 3]);
        let k = heads(&mut g, "key", &[0, 2, 3, 1]);
        let v = heads(&mut g, "value", &[0, 2, 1, 3]);
        let s = g.op("MatMul", &[], &[q, k]);
        let mut s = g.op("Div", &[], &[s, scale]);
        if let Some(m) = mask {
            s = g.op("Add", &[], &[s, m]);
        }
        let pr = g.op("Softmax", &[("axis", AttrValue::Int(-1))], &[s]);
        let ctx = g.op("MatMul", &[], &[pr, v]);
        let ctx = g.op("Transpose", &perm(&[0, 2, 1, 3]), &[ctx]);
        let ctx = g.op("Reshape", &[], &[ctx, merge_shape]);
        let o = g.linear(ctx, &format!("{p}.attention.output"), c.hidden, c.hidden);
        let r = g.op("Add", &[], &[o, x]);
        let (r, m_in) = if c.causal {
            (r, g.layer_norm(r, &format!("{p}.ln_2"), c.hidden))
        } else {
            let n = g.layer_norm(r, &format!("{p}.attention.ln"), c.hidden);
            (n, n)
        };
        let f = g.linear(m_in, &format!("{p}.mlp.up"), c.hidden, c.ffn);
        let f = if c.causal {
            // tanh GELU: 0.5 f (1 + tanh(0.79788 (f + 0.044715 f^3)))
            let k3 = g.scalar(&format!("{p}.gelu.c3"), 0.044715);
            let k1 = g.scalar(&format!("{p}.gelu.c1"), 0.797_884_6);
            let half = g.scalar(&format!("{p}.gelu.half"), 0.5);
            let one = g.scalar(&format!("{p}.gelu.one"), 1.0);
            let f2 = g.op("Mul", &[], &[f, f]);
            let f3 = g.op("Mul", &[], &[f2, f]);
            let a = g.op("Mul", &[], &[f3, k3]);
            let a = g.op("Add", &[], &[f, a]);
            let a = g.op("Mul", &[], &[a, k1]);
            let a = g.op("Tanh", &[], &[a]);
            let a = g.op("Add", &[], &[a, one]);
            let a = g.op("Mul", &[], &[f, a]);
            g.op("Mul", &[], &[a, half])
        } else {
            // erf GELU: 0.5 f (1 + erf(f / sqrt 2))
            let s2 = g.scalar(&format!("{p}.gelu.sqrt2"), std::f32::consts::SQRT_2);
            let half = g.scalar(&format!("{p}.gelu.half"), 0.5);
            let one = g.scalar(&format!("{p}.gelu.one"), 1.0);
            let a = g.op("Div", &[], &[f, s2]);
            let a = g.op("Erf", &[], &[a]);
            let a = g.op("Add", &[], &[a, one]);
            let a = g.op("Mul", &[], &[f, a]);
            g.op("Mul", &[], &[a, half])
        };
        let d = g.linear(f, &format!("{p}.mlp.down"), c.ffn, c.hidden);
        let r2 = g.op("Add", &[], &[d, r]);
        x = if c.causal {
            r2
        } else {
            g.layer_norm(r2, &format!("{p}.output.ln"), c.hidden)
        };
    }
    if c.causal {
        x = g.layer_norm(x, "ln_f", c.hidden);
    }
    g.g.values[x].name = "last_hidden_state".into();
    g.g.outputs.push(x);
    g.g
}

/// A small CNN (0.4M parameters) for `[batch, 3, 128, 128]` images: four 3×3 Conv+Relu
/// (32, 64, 128, 256 channels, the last three with stride 2), global average pooling, a
/// 10-way Gemm classifier.
pub fn small_cnn(batch: usize) -> Graph {
    let mut g = Builder::new("small-cnn");
    let mut x = g.input("image", &[batch, 3, 128, 128]);
    let mut cin = 3;
    for (i, (cout, stride)) in [(32usize, 1i64), (64, 2), (128, 2), (256, 2)]
        .into_iter()
        .enumerate()
    {
        let w = g.weight(&format!("conv{i}.weight"), &[cout, cin, 3, 3]);
        let b = g.weight(&format!("conv{i}.bias"), &[cout]);
        let y = g.op(
            "Conv",
            &[
                ("kernel_shape", AttrValue::Ints(vec![3, 3])),
                ("pads", AttrValue::Ints(vec![1, 1, 1, 1])),
                ("strides", AttrValue::Ints(vec![stride, stride])),
            ],
            &[x, w, b],
        );
        x = g.op("Relu", &[], &[y]);
        cin = cout;
    }
    let p = g.op("GlobalAveragePool", &[], &[x]);
    let f = g.op("Flatten", &[("axis", AttrValue::Int(1))], &[p]);
    let w = g.weight("fc.weight", &[10, 256]);
    let b = g.weight("fc.bias", &[10]);
    let y = g.op("Gemm", &[("transB", AttrValue::Int(1))], &[f, w, b]);
    g.g.values[y].name = "logits".into();
    g.g.outputs.push(y);
    g.g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphs_have_the_expected_shapes_and_sizes() {
        let g = transformer(&TransformerConfig::bert_base(2));
        kiln_ir::verify::verify(&g).unwrap();
        let out = &g.values[g.outputs[0]].fact;
        assert_eq!(out.shape, Shape::known(&[2, 128, 768]));
        // 12 × (4·768² + 2·768·3072 + biases and norms) ≈ 85M parameters.
        let (params, _) = g.param_stats();
        assert!((84_000_000..86_000_000).contains(&params), "{params}");
        let cnn = small_cnn(4);
        kiln_ir::verify::verify(&cnn).unwrap();
        assert_eq!(
            cnn.values[cnn.outputs[0]].fact.shape,
            Shape::known(&[4, 10])
        );
    }
}
