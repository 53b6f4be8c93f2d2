//! Test harness shared by the graph-lowering tests: a graph builder, random inputs, and a
//! checker that lowers, compiles and runs every kernel against the reference interpreter.

#![allow(dead_code)]

use kiln_codegen::cpu::lower::Lowering;
use kiln_codegen::cpu::{compile_library, CpuOptions};
use kiln_ir::onnx::tensor_proto::{from_raw, to_raw};
use kiln_ir::ops::elementwise::{BinaryKind, ElementwiseOp, UnaryKind};
use kiln_ir::{DType, Fact, Graph, IrError, Node, Op, Shape, Tensor, ValueId};
use kiln_passes::fusion::{KernelKind, Partition};
use kiln_runtime::kernel_lib::{scratch_buffer, KernelLibrary};
use rand::{Rng, SeedableRng};

/// A graph under construction.
pub struct Builder {
    /// The graph built so far.
    pub g: Graph,
}

impl Builder {
    pub fn new(name: &str) -> Self {
        Self {
            g: Graph {
                name: name.into(),
                opset: 17,
                ..Graph::default()
            },
        }
    }

    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> ValueId {
        let v = self
            .g
            .add_value(name, Fact::new(dtype, Shape::known(shape)));
        self.g.inputs.push(v);
        v
    }

    pub fn konst(&mut self, name: &str, t: Tensor) -> ValueId {
        self.g.add_const(name, t)
    }

    pub fn node(&mut self, op: Op, inputs: &[Option<ValueId>]) -> ValueId {
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

    pub fn ew(&mut self, op: ElementwiseOp, inputs: &[ValueId]) -> ValueId {
        let ins: Vec<Option<ValueId>> = inputs.iter().map(|&v| Some(v)).collect();
        self.node(Op::Elementwise(op), &ins)
    }

    pub fn unary(&mut self, k: UnaryKind, x: ValueId) -> ValueId {
        self.ew(ElementwiseOp::Unary(k), &[x])
    }

    pub fn binary(&mut self, k: BinaryKind, x: ValueId, y: ValueId) -> ValueId {
        self.ew(ElementwiseOp::Binary(k), &[x, y])
    }

    pub fn finish(mut self, outputs: &[ValueId]) -> Graph {
        self.g.outputs = outputs.to_vec();
        self.g.infer().expect("infer");
        self.g
    }
}

pub fn random_tensor(dtype: DType, shape: &[usize], rng: &mut impl Rng) -> Tensor {
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

pub fn random_inputs(g: &Graph, seed: u64) -> Vec<Tensor> {
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
pub fn buffer(bytes: &[u8]) -> Vec<u64> {
    let mut b = vec![0u64; bytes.len().div_ceil(8).max(1)];
    // SAFETY: `b` holds at least `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.as_mut_ptr() as *mut u8, bytes.len())
    };
    b
}

/// What `check` found.
pub struct Report {
    /// What was lowered.
    pub lowering: Lowering,
    /// The partition it came from.
    pub partition: Partition,
}

/// Partitions `g`, lowers, compiles, and runs every lowered kernel on the values the
/// interpreter computes for its inputs (running the graph kernel by kernel), comparing its
/// outputs with the interpreter's.
pub fn check(g: &Graph, inputs: &[Tensor]) -> Report {
    check_with(g, inputs, &Default::default())
}

/// [`check`] with the Conv schedule `conv`.
pub fn check_with(
    g: &Graph,
    inputs: &[Tensor],
    conv: &kiln_codegen::cpu::lower::conv::ConvSchedule,
) -> Report {
    let p = kiln_passes::partition(g);
    p.verify(g).unwrap();
    let lowering = kiln_codegen::cpu::lower::lower_partition_with(g, &p, conv).unwrap();
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
            .chain(lk.consts.iter().map(|c| buffer(&to_raw(&c.tensor))))
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
        // A kernel split into tasks runs as three consecutive task ranges (the last one
        // past the end), as the runtime's threads would: the result must not change.
        let tasks = lk.kernel.signature.tasks as i64;
        let cuts = [0, tasks / 3, 2 * tasks / 3, tasks + 5];
        // Scratch full of garbage (NaN bit patterns; the kernel must not rely on its
        // contents) followed by a guard block the kernel must not touch.
        let sb = lk.kernel.signature.scratch_bytes as usize;
        let mut scratch = scratch_buffer((sb + 64) as u64);
        for w in cuts.windows(2) {
            scratch.as_mut_slice().fill(0xFF);
            // SAFETY: buffers hold the kernel's inputs and outputs at their static shapes;
            // the ranges are disjoint; the scratch has the declared size.
            unsafe { kern.call_tasks(&ptrs, w[0], w[1], &[], scratch.as_mut_slice()) };
            assert!(
                scratch.as_slice()[sb..].iter().all(|&b| b == 0xFF),
                "kernel {} wrote past its {sb} scratch bytes",
                lk.kernel.signature.name
            );
        }
        for (i, (&v, w)) in lk.outputs.iter().zip(&want).enumerate() {
            let b = &bufs[lk.inputs.len() + lk.consts.len() + i];
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

pub fn count(r: &Report, kind: KernelKind) -> (usize, usize) {
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
pub fn zoo(name: &str) -> (Graph, Vec<Tensor>) {
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
