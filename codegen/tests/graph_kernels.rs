//! Graph kernels lowered by `cpu::lower::lower_partition`, compiled into one library and
//! checked kernel by kernel against the reference interpreter on the same inputs.

use kiln_codegen::cpu::lower::{lower_partition, Lowering};
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_ir::onnx::tensor_proto::{from_raw, to_raw};
use kiln_ir::ops::elementwise::{
    BinaryKind, ClipBounds, CompareKind, ElementwiseOp, GeluApprox, UnaryKind, VariadicKind,
};
use kiln_ir::ops::linalg::{Gemm, LinalgOp};
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

#[test]
fn elementwise_chain_with_broadcasting_and_constants() {
    let mut b = Builder::new("ew");
    let x = b.input("x", DType::F32, &[3, 5, 17]);
    let bias = b.input("bias", DType::F32, &[17]);
    let col = b.input("col", DType::F32, &[3, 1, 1]);
    let w = b.konst(
        "w",
        Tensor::from_vec(&[5, 1], vec![0.5f32, -1.0, 2.0, 0.25, 3.0]),
    );
    let two = b.konst("two", Tensor::scalar(2.0f32));
    let a = b.binary(BinaryKind::Add, x, bias);
    let m = b.binary(BinaryKind::Mul, a, w);
    let s = b.binary(BinaryKind::Sub, m, col);
    let d = b.binary(BinaryKind::Div, s, two);
    let p = b.binary(BinaryKind::Pow, d, two);
    let mx = b.ew(ElementwiseOp::Variadic(VariadicKind::Max), &[p, d, a]);
    let r = b.unary(UnaryKind::Relu, s);
    let out = b.binary(BinaryKind::Add, mx, r);
    let g = b.finish(&[out, r]);
    let rep = check(&g, &random_inputs(&g, 1));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
    assert_eq!(count(&rep, KernelKind::Elementwise), (1, 1));
}

#[test]
fn unary_math_ops() {
    use UnaryKind::*;
    let kinds = [
        Neg,
        Abs,
        Sign,
        Relu,
        Sqrt,
        Exp,
        Log,
        Reciprocal,
        Floor,
        Ceil,
        Round,
        Erf,
        Tanh,
        Sigmoid,
        LeakyRelu { alpha: 0.1 },
        Elu { alpha: 1.5 },
        Selu {
            alpha: 1.673_263_2,
            gamma: 1.050_701,
        },
        Celu { alpha: 0.7 },
        ThresholdedRelu { alpha: 0.3 },
        HardSigmoid {
            alpha: 0.2,
            beta: 0.5,
        },
        HardSwish,
        Gelu {
            approximate: GeluApprox::None,
        },
        Gelu {
            approximate: GeluApprox::Tanh,
        },
        Softplus,
        Softsign,
        Mish,
        Sin,
        Cos,
        Tan,
        Atan,
        Sinh,
        Cosh,
        Asinh,
    ];
    let mut b = Builder::new("unary");
    let x = b.input("x", DType::F32, &[4, 33]);
    // |x| + 0.5 keeps Sqrt/Log finite; Asin/Acos/Atanh/Acosh get inputs in their domain.
    let ax = b.unary(Abs, x);
    let half = b.konst("half", Tensor::scalar(0.5f32));
    let pos = b.binary(BinaryKind::Add, ax, half);
    let mut outs = Vec::new();
    for k in kinds {
        let arg = if matches!(k, Sqrt | Log) { pos } else { x };
        outs.push(b.unary(k, arg));
    }
    let small = b.konst("small", Tensor::scalar(0.4f32));
    let xs = b.binary(BinaryKind::Mul, x, small);
    for k in [Asin, Acos, Atanh] {
        outs.push(b.unary(k, xs));
    }
    let one = b.konst("one", Tensor::scalar(1.0f32));
    let big = b.binary(BinaryKind::Add, pos, one);
    outs.push(b.unary(Acosh, big));
    let g = b.finish(&outs);
    let rep = check(&g, &random_inputs(&g, 2));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
}

#[test]
fn compare_where_clip_cast() {
    let mut b = Builder::new("select");
    let x = b.input("x", DType::F32, &[6, 10]);
    let y = b.input("y", DType::F32, &[10]);
    let c = b.input("c", DType::Bool, &[6, 1]);
    let i = b.input("i", DType::I64, &[6, 10]);
    let lt = b.ew(ElementwiseOp::Compare(CompareKind::Less), &[x, y]);
    let both = b.ew(
        ElementwiseOp::Logical(kiln_ir::ops::elementwise::LogicalKind::And),
        &[lt, c],
    );
    let w = b.ew(ElementwiseOp::Where, &[both, x, y]);
    let lo = b.konst("lo", Tensor::scalar(-0.5f32));
    let hi = b.konst("hi", Tensor::scalar(0.75f32));
    let cl = b.node(
        Op::Elementwise(ElementwiseOp::Clip(ClipBounds::Inputs)),
        &[Some(w), Some(lo), Some(hi)],
    );
    let fi = b.ew(
        ElementwiseOp::Cast {
            to: DType::F32,
            saturate: true,
        },
        &[i],
    );
    let sum = b.binary(BinaryKind::Add, cl, fi);
    let three = b.konst("three", Tensor::scalar(3i64));
    let ii = b.binary(BinaryKind::Mul, i, three);
    let back = b.ew(
        ElementwiseOp::Cast {
            to: DType::I64,
            saturate: true,
        },
        &[sum],
    );
    let g = b.finish(&[sum, both, ii, back]);
    let rep = check(&g, &random_inputs(&g, 3));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
}

#[test]
fn matmul_and_gemm_with_epilogues() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut b = Builder::new("mm");
    let x = b.input("x", DType::F32, &[2, 7, 20]);
    let w = b.konst("w", random_tensor(DType::F32, &[20, 33], &mut rng));
    let bias = b.konst("bias", random_tensor(DType::F32, &[33], &mut rng));
    let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(x), Some(w)]);
    let a = b.binary(BinaryKind::Add, mm, bias);
    let gl = b.unary(
        UnaryKind::Gelu {
            approximate: GeluApprox::None,
        },
        a,
    );
    // Gemm with transposed operands, alpha, beta and a row-broadcast C.
    let x2 = b.input("x2", DType::F32, &[13, 9]);
    let w2 = b.konst("w2", random_tensor(DType::F32, &[21, 13], &mut rng));
    let c2 = b.konst("c2", random_tensor(DType::F32, &[21], &mut rng));
    let gm = b.node(
        Op::Linalg(LinalgOp::Gemm(Gemm {
            alpha: 0.5,
            beta: 2.0,
            trans_a: true,
            trans_b: true,
        })),
        &[Some(x2), Some(w2), Some(c2)],
    );
    let t = b.unary(UnaryKind::Tanh, gm);
    // Plain Gemm, no epilogue.
    let w3 = b.konst("w3", random_tensor(DType::F32, &[9, 40], &mut rng));
    let plain = b.node(
        Op::Linalg(LinalgOp::Gemm(Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: false,
        })),
        &[Some(x2), Some(w3)],
    );
    let g = b.finish(&[gl, t, gm, plain]);
    let rep = check(&g, &random_inputs(&g, 5));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
    assert_eq!(count(&rep, KernelKind::Contraction), (3, 3));
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

#[test]
fn zoo_models() {
    for name in ["mlp", "bert", "gpt"] {
        let (g, inputs) = zoo(name);
        let rep = check(&g, &inputs);
        let (ew, ew_total) = count(&rep, KernelKind::Elementwise);
        let (c, c_total) = count(&rep, KernelKind::Contraction);
        eprintln!(
            "{name}: elementwise {ew}/{ew_total}, contraction {c}/{c_total}, {} kernels not lowered",
            rep.lowering.unsupported.len()
        );
        for u in &rep.lowering.unsupported {
            let k = &rep.partition.kernels[u.index];
            if matches!(k.kind, KernelKind::Elementwise | KernelKind::Contraction) {
                eprintln!("  {} {:?}: {}", k.name, k.kind, u.reason);
            }
        }
        // Every elementwise and contraction kernel of these models lowers.
        assert_eq!((c, ew), (c_total, ew_total), "{name}");
    }
}

#[test]
fn batched_matmul_with_epilogue() {
    let mut b = Builder::new("bmm");
    let q = b.input("q", DType::F32, &[2, 3, 7, 16]);
    let k = b.input("k", DType::F32, &[2, 3, 16, 9]);
    let mm = b.node(Op::Linalg(LinalgOp::MatMul), &[Some(q), Some(k)]);
    let s = b.konst("s", Tensor::scalar(0.25f32));
    let y = b.binary(BinaryKind::Mul, mm, s);
    let g = b.finish(&[y]);
    let rep = check(&g, &random_inputs(&g, 6));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
}
