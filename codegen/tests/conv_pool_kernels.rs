//! Conv contractions and pooling kernels lowered by `cpu::lower::lower_partition`
//! (`conv.rs`, `pool.rs`), checked kernel by kernel against the reference interpreter, and
//! the CNN zoo models (resnet, mobilenet) lowered completely.

#![allow(dead_code)]

use kiln_codegen::cpu::lower::{lower_partition, Lowering};
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_ir::onnx::tensor_proto::{from_raw, to_raw};
use kiln_ir::ops::elementwise::{BinaryKind, ClipBounds, ElementwiseOp, UnaryKind};
use kiln_ir::ops::nn::{AutoPad, ConvAttrs, MaxPoolAttrs, NnOp, PoolKind, WindowAttrs};
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

/// Window attributes: strides, pads (begin = end), dilations.
fn window(kernel: Option<[usize; 2]>, s: usize, p: usize, d: usize) -> WindowAttrs {
    WindowAttrs {
        auto_pad: AutoPad::NotSet,
        kernel_shape: kernel.map(|k| k.to_vec()),
        strides: Some(vec![s, s]),
        dilations: Some(vec![d, d]),
        pads: Some(vec![p; 4]),
    }
}

/// A random f32 constant.
fn rand_const(b: &mut Builder, name: &str, shape: &[usize], seed: u64) -> ValueId {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = random_tensor(DType::F32, shape, &mut rng);
    b.konst(name, t)
}

/// Conv geometry of one test case.
struct Case {
    n: usize,
    c: usize,
    hw: [usize; 2],
    m: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    group: usize,
    bias: bool,
}

/// A graph `Conv` (+ residual `Add`) + `Relu` for `case`, checked against the interpreter.
fn conv_case(case: &Case, residual: bool, seed: u64) {
    let mut b = Builder::new("conv");
    let x = b.input("x", DType::F32, &[case.n, case.c, case.hw[0], case.hw[1]]);
    let w = rand_const(
        &mut b,
        "w",
        &[case.m, case.c / case.group, case.k, case.k],
        seed,
    );
    let mut ins = vec![Some(x), Some(w)];
    if case.bias {
        ins.push(Some(rand_const(&mut b, "b", &[case.m], seed + 1)));
    }
    let conv = b.node(
        Op::Nn(NnOp::Conv(ConvAttrs {
            window: window(None, case.s, case.p, case.d),
            group: case.group,
        })),
        &ins,
    );
    let mut y = conv;
    if residual {
        b.g.infer().expect("infer");
        let shape = b.g.values[conv].fact.shape.as_known().unwrap();
        let r = b.input("r", DType::F32, &shape);
        y = b.binary(BinaryKind::Add, y, r);
    }
    y = b.unary(UnaryKind::Relu, y);
    let g = b.finish(&[y]);
    let rep = check(&g, &random_inputs(&g, seed));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
    assert_eq!(count(&rep, KernelKind::Contraction), (1, 1));
}

#[test]
fn conv_im2col_shapes() {
    let base = Case {
        n: 2,
        c: 3,
        hw: [9, 11],
        m: 5,
        k: 3,
        s: 1,
        p: 1,
        d: 1,
        group: 1,
        bias: true,
    };
    let cases = [
        Case { ..base },
        Case { s: 2, ..base },
        Case { k: 1, p: 0, ..base },
        Case {
            k: 1,
            p: 0,
            s: 2,
            bias: false,
            ..base
        },
        Case {
            k: 7,
            p: 3,
            s: 2,
            hw: [16, 16],
            m: 8,
            ..base
        },
        Case { d: 2, p: 2, ..base },
        Case {
            p: 0,
            c: 17,
            m: 20,
            ..base
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        conv_case(c, i % 2 == 0, 10 + i as u64);
    }
}

#[test]
fn conv_grouped_and_depthwise() {
    let base = Case {
        n: 1,
        c: 8,
        hw: [10, 7],
        m: 8,
        k: 3,
        s: 1,
        p: 1,
        d: 1,
        group: 8,
        bias: true,
    };
    let cases = [
        Case { ..base },
        Case { s: 2, ..base },
        Case {
            k: 5,
            p: 2,
            bias: false,
            ..base
        },
        Case {
            group: 2,
            m: 6,
            ..base
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        conv_case(c, i % 2 == 1, 30 + i as u64);
    }
}

#[test]
fn conv_with_clip_epilogue() {
    let mut b = Builder::new("convclip");
    let x = b.input("x", DType::F32, &[1, 4, 8, 8]);
    let w = rand_const(&mut b, "w", &[6, 4, 3, 3], 3);
    let conv = b.node(
        Op::Nn(NnOp::Conv(ConvAttrs {
            window: window(None, 2, 1, 1),
            group: 1,
        })),
        &[Some(x), Some(w)],
    );
    let lo = b.konst("lo", Tensor::scalar(0.0f32));
    let hi = b.konst("hi", Tensor::scalar(6.0f32));
    let y = b.node(
        Op::Elementwise(ElementwiseOp::Clip(ClipBounds::Inputs)),
        &[Some(conv), Some(lo), Some(hi)],
    );
    let g = b.finish(&[y]);
    let rep = check(&g, &random_inputs(&g, 4));
    assert!(
        rep.lowering.unsupported.is_empty(),
        "{:?}",
        rep.lowering.unsupported
    );
}

#[test]
fn pools() {
    for (i, (k, s, p, ceil)) in [
        (3, 2, 1, false),
        (2, 2, 0, false),
        (3, 1, 0, true),
        (3, 2, 0, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = Builder::new("pool");
        let x = b.input("x", DType::F32, &[2, 3, 11, 9]);
        let mp = b.node(
            Op::Nn(NnOp::MaxPool(MaxPoolAttrs {
                window: window(Some([k, k]), s, p, 1),
                ceil_mode: ceil,
                column_major_indices: false,
                with_indices: false,
            })),
            &[Some(x)],
        );
        let avg = b.node(
            Op::Nn(NnOp::GlobalPool(PoolKind::Average {
                count_include_pad: false,
            })),
            &[Some(mp)],
        );
        let mx = b.node(Op::Nn(NnOp::GlobalPool(PoolKind::Max)), &[Some(x)]);
        let g = b.finish(&[mp, avg, mx]);
        let rep = check(&g, &random_inputs(&g, 50 + i as u64));
        assert!(
            rep.lowering.unsupported.is_empty(),
            "{:?}",
            rep.lowering.unsupported
        );
    }
}

#[test]
fn cnn_zoo_models_lower_completely() {
    for name in ["resnet", "mobilenet"] {
        let (mut g, inputs) = zoo(name);
        kiln_passes::fold_batchnorm::fold_all(&mut g);
        kiln_ir::simplify::simplify(&mut g);
        let rep = check(&g, &inputs);
        // `Alias` kernels are zero-copy views: they need no code.
        let missing: Vec<String> = rep
            .lowering
            .unsupported
            .iter()
            .filter(|u| rep.partition.kernels[u.index].kind != KernelKind::Alias)
            .map(|u| format!("{}: {}", rep.partition.kernels[u.index].name, u.reason))
            .collect();
        assert!(missing.is_empty(), "{name}: {missing:?}");
        assert_eq!(
            count(&rep, KernelKind::Contraction).0,
            count(&rep, KernelKind::Contraction).1
        );
    }
}
