//! `Reduction` and `DataMovement` kernels lowered by `cpu::lower::lower_partition`, compiled
//! into one library and checked kernel by kernel against the reference interpreter on random
//! inputs, plus the transformer zoo models (every such kernel lowers and matches).

use kiln_codegen::cpu::lower::{lower_partition, Lowering};
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_ir::onnx::tensor_proto::{from_raw, to_raw};
use kiln_ir::ops::array::{ArrayOp, IntsArg};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, UnaryKind};
use kiln_ir::ops::nn::{LayerNormAttrs, NnOp, SoftmaxAttrs};
use kiln_ir::ops::reduce::{ReduceAxes, ReduceKind, ReduceOp};
use kiln_ir::{DType, Fact, Graph, IrError, Node, Op, Shape, Tensor, ValueId};
use kiln_passes::fusion::{KernelKind, Partition};
use kiln_runtime::kernel_lib::KernelLibrary;
use rand::{Rng, SeedableRng};

/// A graph under construction.
struct Builder {
    g: Graph,
}

impl Builder {
    fn new(name: &str) -> Self {
        Self {
            g: Graph {
                name: name.into(),
                opset: 17,
                ..Graph::default()
            },
        }
    }

    fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> ValueId {
        let v = self
            .g
            .add_value(name, Fact::new(dtype, Shape::known(shape)));
        self.g.inputs.push(v);
        v
    }

    fn konst(&mut self, name: &str, t: Tensor) -> ValueId {
        self.g.add_const(name, t)
    }

    fn node(&mut self, op: Op, inputs: &[Option<ValueId>]) -> ValueId {
        let n = self.g.nodes.len();
        let out = self
            .g
            .add_value(format!("v{n}"), Fact::new(DType::F32, Shape(vec![])));
        self.g.nodes.push(Node {
            name: format!("n{n}"),
            op,
            inputs: inputs.to_vec(),
            outputs: vec![out],
        });
        out
    }

    fn ew(&mut self, op: ElementwiseOp, inputs: &[ValueId]) -> ValueId {
        let ins: Vec<Option<ValueId>> = inputs.iter().map(|&v| Some(v)).collect();
        self.node(Op::Elementwise(op), &ins)
    }

    fn unary(&mut self, k: UnaryKind, x: ValueId) -> ValueId {
        self.ew(ElementwiseOp::Unary(k), &[x])
    }

    fn binary(&mut self, k: BinaryKind, x: ValueId, y: ValueId) -> ValueId {
        self.ew(ElementwiseOp::Binary(k), &[x, y])
    }

    fn finish(mut self, outputs: &[ValueId]) -> Graph {
        self.g.outputs = outputs.to_vec();
        self.g.infer().expect("infer");
        self.g
    }
}

fn random_tensor(dtype: DType, shape: &[usize], rng: &mut impl Rng) -> Tensor {
    let n: usize = shape.iter().product();
    match dtype {
        DType::Bool => Tensor::from_vec(shape, (0..n).map(|_| rng.random_bool(0.5)).collect()),
        DType::I64 => Tensor::from_vec(
            shape,
            (0..n)
                .map(|_| rng.random_range(0..8i64))
                .collect::<Vec<i64>>(),
        ),
        _ => Tensor::from_vec(
            shape,
            (0..n)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect::<Vec<f32>>(),
        )
        .cast(dtype),
    }
}

fn random_inputs(g: &Graph, seed: u64) -> Vec<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    g.inputs
        .iter()
        .map(|&v| {
            let f = &g.values[v].fact;
            random_tensor(f.dtype, &f.shape.as_known().unwrap(), &mut rng)
        })
        .collect()
}

/// An 8-byte aligned copy of a tensor's raw bytes.
fn buffer(bytes: &[u8]) -> Vec<u64> {
    let mut b = vec![0u64; bytes.len().div_ceil(8).max(1)];
    // SAFETY: `b` holds at least `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.as_mut_ptr() as *mut u8, bytes.len())
    };
    b
}

/// What `check` found.
struct Report {
    lowering: Lowering,
    partition: Partition,
}

/// Partitions `g`, lowers, compiles, and runs every lowered kernel on the values the
/// interpreter computes for its inputs (running the graph kernel by kernel), comparing its
/// outputs with the interpreter's.
fn check(g: &Graph, inputs: &[Tensor]) -> Report {
    let p = kiln_passes::partition(g);
    p.verify(g).unwrap();
    let lowering = lower_partition(g, &p).unwrap();
    let lib = if lowering.kernels.is_empty() {
        None
    } else {
        let so =
            compile_library(&lowering.cpu_kernels(), &CpuOptions::default()).unwrap_or_else(|e| {
                for k in &lowering.kernels {
                    eprintln!("{}", k.kernel.mlir);
                }
                panic!("compile: {e}")
            });
        Some(KernelLibrary::from_bytes(&so).expect("load"))
    };
    let prod = g.producers();
    let mut env: Vec<Option<Tensor>> = vec![None; g.values.len()];
    for (&id, t) in g.inputs.iter().zip(inputs) {
        env[id] = Some(t.clone());
    }
    let value = |env: &[Option<Tensor>], v: ValueId| -> Tensor {
        if prod[v].is_none() {
            if let Some(t) = g.const_value(v) {
                return t.clone();
            }
        }
        env[v].clone().expect("value computed")
    };
    for (ki, k) in p.kernels.iter().enumerate() {
        // Reference: the kernel's nodes as a sub-graph.
        let mut sub = Graph {
            name: k.name.clone(),
            opset: g.opset,
            values: g.values.clone(),
            nodes: k.nodes.iter().map(|&n| g.nodes[n].clone()).collect(),
            inputs: vec![],
            outputs: k.outputs.clone(),
        };
        let mut args = Vec::new();
        for &v in &k.inputs {
            if prod[v].is_none() && g.values[v].fact.value.is_some() {
                continue;
            }
            sub.values[v].fact.value = None;
            sub.inputs.push(v);
            args.push(value(&env, v));
        }
        let want = kiln_ir::interp::run(&sub, &args)
            .map_err(|e: IrError| e.to_string())
            .unwrap();
        for (&v, t) in k.outputs.iter().zip(&want) {
            env[v] = Some(t.clone());
        }
        let Some(lk) = lowering.kernels.iter().find(|l| l.index == ki) else {
            continue;
        };
        let mut bufs: Vec<Vec<u64>> = lk
            .inputs
            .iter()
            .map(|&v| buffer(&to_raw(&value(&env, v))))
            .collect();
        for t in &want {
            bufs.push(buffer(&vec![0xA5u8; t.byte_size()]));
        }
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr() as *mut u8).collect();
        let kern = lib
            .as_ref()
            .unwrap()
            .kernel(&lk.kernel.signature.name)
            .unwrap();
        assert!(lk.kernel.signature.dims.is_empty(), "static shapes");
        // SAFETY: buffers hold the kernel's inputs and outputs at their static shapes.
        unsafe { kern.call(&ptrs, &[]) };
        for (i, (&v, w)) in lk.outputs.iter().zip(&want).enumerate() {
            let b = &bufs[lk.inputs.len() + i];
            // SAFETY: the buffer holds at least `byte_size` bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u8, w.byte_size()) };
            let got = from_raw(w.dtype(), w.shape(), bytes).unwrap();
            got.check_close(w, 1e-4, 1e-5).unwrap_or_else(|e| {
                panic!(
                    "{} kernel {} ({:?}) output '{}': {e}\n{}",
                    g.name, k.name, k.kind, g.values[v].name, lk.kernel.mlir
                )
            });
        }
    }
    Report {
        lowering,
        partition: p,
    }
}

fn count(r: &Report, kind: KernelKind) -> (usize, usize) {
    let total = r
        .partition
        .kernels
        .iter()
        .filter(|k| k.kind == kind)
        .count();
    let lowered = r
        .lowering
        .kernels
        .iter()
        .filter(|l| r.partition.kernels[l.index].kind == kind)
        .count();
    (lowered, total)
}

/// Loads a zoo model with its first test inputs, specialised to their shapes.
fn zoo(name: &str) -> (Graph, Vec<Tensor>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/zoo");
    let mut g = kiln_ir::onnx::load(dir.join(name).join("model.onnx")).unwrap();
    let mut inputs = Vec::new();
    for i in 0.. {
        let f = dir.join(name).join(format!("test_data_set_0/input_{i}.pb"));
        if !f.exists() {
            break;
        }
        inputs.push(kiln_ir::onnx::load_tensor_pb(f).unwrap().1);
    }
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
    kiln_passes::specialize::specialize_inputs(&mut g, &shapes).unwrap();
    (g, inputs)
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::from_vec(&[v.len()], v.to_vec())
}

/// Every kernel of `kind` in `r` lowered.
fn all_lowered(r: &Report, kind: KernelKind) {
    let (l, t) = count(r, kind);
    for u in &r.lowering.unsupported {
        eprintln!("{}: {}", r.partition.kernels[u.index].name, u.reason);
    }
    assert!(t > 0, "no {kind:?} kernel");
    assert_eq!(l, t, "{kind:?}");
}

fn reduce(kind: ReduceKind, keepdims: bool) -> Op {
    Op::Reduce(ReduceOp::Reduce {
        kind,
        axes: ReduceAxes::Attr(Some(vec![-1])),
        keepdims,
        noop_with_empty_axes: false,
    })
}

#[test]
fn softmax_with_scale_and_mask_prologue() {
    for log in [false, true] {
        let mut b = Builder::new("softmax");
        let x = b.input("x", DType::F32, &[2, 3, 5, 7]);
        let m = b.input("m", DType::F32, &[2, 1, 1, 7]);
        let s = b.konst("s", Tensor::from_vec(&[], vec![0.125f32]));
        let xs = b.binary(BinaryKind::Mul, x, s);
        let xm = b.binary(BinaryKind::Add, xs, m);
        let a = SoftmaxAttrs {
            axis: -1,
            coerce_2d: false,
        };
        let op = if log {
            Op::Nn(NnOp::LogSoftmax(a))
        } else {
            Op::Nn(NnOp::Softmax(a))
        };
        let y = b.node(op, &[Some(xm)]);
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, 1));
        all_lowered(&r, KernelKind::Reduction);
    }
}

#[test]
fn layer_norm_with_residual_add() {
    let mut b = Builder::new("ln");
    let x = b.input("x", DType::F32, &[2, 5, 16]);
    let res = b.input("res", DType::F32, &[2, 5, 16]);
    let scale = b.input("scale", DType::F32, &[16]);
    let bias = b.input("bias", DType::F32, &[16]);
    let h = b.binary(BinaryKind::Add, x, res);
    let y = b.node(
        Op::Nn(NnOp::LayerNormalization(LayerNormAttrs {
            axis: -1,
            epsilon: 1e-5,
            stash_type: DType::F32,
            num_outputs: 1,
        })),
        &[Some(h), Some(scale), Some(bias)],
    );
    let g = b.finish(&[y, h]);
    let r = check(&g, &random_inputs(&g, 2));
    all_lowered(&r, KernelKind::Reduction);
}

#[test]
fn decomposed_layer_norm_chain() {
    let mut b = Builder::new("dln");
    let x = b.input("x", DType::F32, &[3, 4, 32]);
    let gamma = b.input("gamma", DType::F32, &[32]);
    let beta = b.input("beta", DType::F32, &[32]);
    let two = b.konst("two", Tensor::from_vec(&[], vec![2.0f32]));
    let eps = b.konst("eps", Tensor::from_vec(&[], vec![1e-12f32]));
    let mean = b.node(reduce(ReduceKind::Mean, true), &[Some(x)]);
    let d = b.binary(BinaryKind::Sub, x, mean);
    let sq = b.binary(BinaryKind::Pow, d, two);
    let var = b.node(reduce(ReduceKind::Mean, true), &[Some(sq)]);
    let ve = b.binary(BinaryKind::Add, var, eps);
    let sd = b.unary(UnaryKind::Sqrt, ve);
    let n = b.binary(BinaryKind::Div, d, sd);
    let m = b.binary(BinaryKind::Mul, n, gamma);
    let y = b.binary(BinaryKind::Add, m, beta);
    let g = b.finish(&[y]);
    let r = check(&g, &random_inputs(&g, 3));
    all_lowered(&r, KernelKind::Reduction);
}

#[test]
fn last_axis_reductions_with_and_without_keepdims() {
    for (kind, keep) in [
        (ReduceKind::Sum, true),
        (ReduceKind::Max, false),
        (ReduceKind::Mean, false),
        (ReduceKind::Min, true),
    ] {
        let mut b = Builder::new("red");
        let x = b.input("x", DType::F32, &[4, 6, 9]);
        let e = b.unary(UnaryKind::Exp, x);
        let y = b.node(reduce(kind, keep), &[Some(e)]);
        let g = b.finish(&[y]);
        let r = check(&g, &random_inputs(&g, 4));
        all_lowered(&r, KernelKind::Reduction);
    }
    // ReduceSum with its axes as an input.
    let mut b = Builder::new("red_in");
    let x = b.input("x", DType::F32, &[5, 8]);
    let axes = b.konst("axes", i64s(&[1]));
    let y = b.node(
        Op::Reduce(ReduceOp::Reduce {
            kind: ReduceKind::Sum,
            axes: ReduceAxes::Input,
            keepdims: true,
            noop_with_empty_axes: false,
        }),
        &[Some(x), Some(axes)],
    );
    let g = b.finish(&[y]);
    let r = check(&g, &random_inputs(&g, 5));
    all_lowered(&r, KernelKind::Reduction);
}

#[test]
fn transpose_gather_concat_slice_expand() {
    let mut b = Builder::new("mv");
    let x = b.input("x", DType::F32, &[2, 3, 4, 5]);
    let t = b.node(
        Op::Array(ArrayOp::Transpose {
            perm: Some(vec![0, 2, 1, 3]),
        }),
        &[Some(x)],
    );
    let t2 = b.node(Op::Array(ArrayOp::Transpose { perm: None }), &[Some(x)]);
    let emb = b.input("emb", DType::F32, &[8, 6]);
    let ids = b.input("ids", DType::I64, &[2, 3]);
    let ga = b.node(
        Op::Array(ArrayOp::Gather { axis: 0 }),
        &[Some(emb), Some(ids)],
    );
    let d3 = b.input("d3", DType::F32, &[3, 9, 4]);
    let ids1 = b.input("ids1", DType::I64, &[5]);
    let g1 = b.node(
        Op::Array(ArrayOp::Gather { axis: 1 }),
        &[Some(d3), Some(ids1)],
    );
    let c1 = b.input("c1", DType::F32, &[2, 3, 5]);
    let c2 = b.input("c2", DType::F32, &[2, 4, 5]);
    let cc = b.node(
        Op::Array(ArrayOp::Concat { axis: 1 }),
        &[Some(c1), Some(c2)],
    );
    let sl = b.node(
        Op::Array(ArrayOp::Slice {
            starts: IntsArg::Attr(vec![-1, 1]),
            ends: IntsArg::Attr(vec![-100, 5]),
            axes: IntsArg::Attr(vec![1, 2]),
            steps: IntsArg::Attr(vec![-2, 2]),
        }),
        &[Some(cc)],
    );
    let e = b.input("e", DType::F32, &[3, 1]);
    let shape = b.konst("shape", i64s(&[2, 3, 4]));
    let ex = b.node(Op::Array(ArrayOp::Expand), &[Some(e), Some(shape)]);
    let g = b.finish(&[t, t2, ga, g1, sl, ex]);
    let r = check(&g, &random_inputs(&g, 6));
    all_lowered(&r, KernelKind::DataMovement);
}

#[test]
fn split_into_parts() {
    let mut b = Builder::new("split");
    let x = b.input("x", DType::F32, &[2, 7, 3]);
    let n = b.g.nodes.len();
    let o0 = b.g.add_value("s0", Fact::new(DType::F32, Shape(vec![])));
    let o1 = b.g.add_value("s1", Fact::new(DType::F32, Shape(vec![])));
    b.g.nodes.push(Node {
        name: format!("n{n}"),
        op: Op::Array(ArrayOp::Split {
            axis: 1,
            split: IntsArg::Attr(vec![3, 4]),
            outputs: 2,
        }),
        inputs: vec![Some(x)],
        outputs: vec![o0, o1],
    });
    let g = b.finish(&[o0, o1]);
    let r = check(&g, &random_inputs(&g, 7));
    all_lowered(&r, KernelKind::DataMovement);
}

#[test]
fn zoo_transformers_lower_fully() {
    for name in ["bert", "gpt"] {
        let (g, inputs) = zoo(name);
        let rep = check(&g, &inputs);
        for kind in [KernelKind::Reduction, KernelKind::DataMovement] {
            let (l, t) = count(&rep, kind);
            eprintln!("{name}: {kind:?} {l}/{t}");
        }
        for u in &rep.lowering.unsupported {
            let k = &rep.partition.kernels[u.index];
            eprintln!("  {} {:?}: {}", k.name, k.kind, u.reason);
            assert_eq!(k.kind, KernelKind::Alias, "{name} {}: {}", k.name, u.reason);
        }
    }
}
