//! The executor, end to end without codegen: kernels compiled from C at test time, artifacts
//! built by hand, saved, loaded and run.

mod common;

use kiln_runtime::{Artifact, DType, LoadError, Model, RunError, TensorView};

fn saved_model(a: &Artifact) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("MODEL.kiln");
    a.save(&path).unwrap();
    (dir, path)
}

fn expected_add_relu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(common::BIAS)
        .map(|(a, b)| (a + b).max(0.0))
        .collect()
}

#[test]
fn add_relu_end_to_end() {
    let (_dir, path) = saved_model(&common::add_relu_artifact(common::kernel_library()));
    let mut model = Model::load(&path).unwrap();
    assert_eq!(model.compiler_version(), "kiln-test 0.0.0");
    let x = [-3.0f32, 0.5, -2.5, 3.0, 1.0, 1.0, -1.0, -20.0];
    let out = model.run(&[TensorView::from_f32(&[2, 4], &x)]).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].shape, vec![2, 4]);
    assert_eq!(out[0].as_f32().unwrap(), expected_add_relu(&x).as_slice());

    // Many runs reuse the arena; run_into writes into a caller buffer.
    let mut y = [0f32; 8];
    for k in 0..5 {
        let x: Vec<f32> = (0..8).map(|i| (i as f32 - 4.0) * k as f32).collect();
        let y_bytes: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(y.as_mut_ptr().cast(), 32) };
        model
            .run_into(&[TensorView::from_f32(&[2, 4], &x)], &mut [y_bytes])
            .unwrap();
        assert_eq!(y.as_slice(), expected_add_relu(&x).as_slice());
    }
}

#[test]
fn task_split_kernels_run_on_several_threads() {
    // `add_f32` declares 8 tasks (one per element): with 2, 3 and 5 threads each thread runs
    // a disjoint element range; the result must not depend on the split.
    let (_dir, path) = saved_model(&common::add_relu_artifact(common::kernel_library()));
    let mut model = Model::load(&path).unwrap();
    assert_eq!(model.threads(), 1);
    for threads in [2, 3, 5, 1] {
        model.set_threads(threads);
        assert_eq!(model.threads(), threads);
        for k in 0..50 {
            let x: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * k as f32).collect();
            let out = model.run(&[TensorView::from_f32(&[2, 4], &x)]).unwrap();
            assert_eq!(out[0].as_f32().unwrap(), expected_add_relu(&x).as_slice());
        }
    }
}

#[test]
fn kernels_get_a_private_aligned_scratch_per_thread() {
    // `add_via_scratch_f32` writes its whole declared scratch (4 KiB) with a pattern of its
    // task range and checks it after a pause: an unaligned, too small (out of bounds) or
    // shared slot gives NaNs. The pattern must survive on 1..5 threads, across runs and
    // after `set_threads` reallocates the slots.
    let mut a = common::add_relu_artifact(common::kernel_library());
    a.plan.steps[0].kernel = "add_via_scratch_f32".into();
    a.plan.steps[0].scratch_bytes = 4096;
    let (_dir, path) = saved_model(&a);
    let mut model = Model::load(&path).unwrap();
    for threads in [1, 2, 5, 3, 1] {
        model.set_threads(threads);
        for k in 0..20 {
            let x: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * k as f32).collect();
            let out = model.run(&[TensorView::from_f32(&[2, 4], &x)]).unwrap();
            assert_eq!(
                out[0].as_f32().unwrap(),
                expected_add_relu(&x).as_slice(),
                "{threads} threads"
            );
        }
    }
}

#[test]
fn huge_scratch_is_refused_at_load() {
    let mut a = common::add_relu_artifact(common::kernel_library());
    a.plan.steps[1].scratch_bytes = u64::MAX / 2;
    // `save` refuses the plan too; the model refuses it however it gets it.
    let dir = tempfile::tempdir().unwrap();
    assert!(a.save(&dir.path().join("MODEL.kiln")).is_err());
    let msg = Model::from_artifact(a, "MODEL.kiln")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("step 1") && msg.contains("scratch_bytes") && msg.contains("MODEL.kiln"),
        "{msg}"
    );
}

#[test]
fn dynamic_batch_binds_symbols() {
    let (_dir, path) = saved_model(&common::dynamic_artifact(common::kernel_library()));
    let mut model = Model::load(&path).unwrap();
    for batch in 1..=4usize {
        let x: Vec<f32> = (0..batch * 3).map(|i| i as f32 - 5.0).collect();
        let shape = [batch, 3];
        let inputs = [TensorView::from_f32(&shape, &x)];
        assert_eq!(
            model.output_shapes(&inputs).unwrap(),
            vec![vec![batch, 3], vec![batch]]
        );
        let out = model.run(&inputs).unwrap();
        let h: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| (v + [1.0, -1.0, 0.0][i % 3]).max(0.0))
            .collect();
        let count: Vec<i64> = h
            .chunks(3)
            .map(|r| r.iter().filter(|v| **v > 0.0).count() as i64)
            .collect();
        assert_eq!(out[0].shape, vec![batch, 3]);
        assert_eq!(out[0].as_f32().unwrap(), h.as_slice());
        assert_eq!(out[1].dtype, DType::I64);
        assert_eq!(out[1].as_i64().unwrap(), count.as_slice());
    }
    let x = vec![0f32; 15];
    let err = model.run(&[TensorView::from_f32(&[5, 3], &x)]).unwrap_err();
    assert!(
        err.to_string().contains("input 0 'x'") && err.to_string().contains("more than the 4"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let (_dir, path) = saved_model(&common::add_relu_artifact(common::kernel_library()));
    let mut model = Model::load(&path).unwrap();
    let x = [0f32; 8];
    let check = |r: Result<Vec<kiln_runtime::Tensor>, RunError>, want: &[&str]| {
        let msg = r.unwrap_err().to_string();
        for w in want {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
    };
    check(
        model.run(&[TensorView::from_f32(&[4, 2], &x)]),
        &["input 0 'x'", "axis 0 is 4", "[2, 4]"],
    );
    check(
        model.run(&[TensorView::from_f32(&[8], &x)]),
        &["input 0 'x'", "rank 1"],
    );
    check(
        model.run(&[TensorView::from_f32(&[2, 4], &x[..7])]),
        &["input 0 'x'", "needs 32 bytes", "has 28"],
    );
    let xi = [0i64; 8];
    check(
        model.run(&[TensorView::from_i64(&[2, 4], &xi)]),
        &["input 0 'x'", "dtype i64", "expects f32"],
    );
    check(model.run(&[]), &["takes 1 inputs, got 0"]);
    let raw = [0u64; 5];
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>().add(1), 32) };
    check(
        model.run(&[TensorView::new(DType::F32, &[2, 4], bytes)]),
        &["input 0 'x'", "not aligned to 4 bytes"],
    );
    let mut small = [0u8; 16];
    let err = model
        .run_into(&[TensorView::from_f32(&[2, 4], &x)], &mut [&mut small])
        .unwrap_err();
    assert!(matches!(err, RunError::Output { .. }), "{err}");
    assert!(err.to_string().contains("output 0 'y'"), "{err}");
}

#[test]
fn missing_kernel_symbol_is_named() {
    let mut a = common::add_relu_artifact(common::kernel_library());
    a.plan.steps[1].kernel = "gelu_f32".into();
    let (_dir, path) = saved_model(&a);
    let err = Model::load(&path).unwrap_err();
    assert!(
        matches!(err, LoadError::MissingKernel { step: 1, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("'gelu_f32'") && msg.contains("MODEL.kiln"),
        "{msg}"
    );
}

#[test]
fn bad_kernel_library_and_target_are_refused() {
    let (_dir, path) = saved_model(&common::add_relu_artifact(b"garbage".to_vec()));
    let msg = Model::load(&path).unwrap_err().to_string();
    assert!(msg.contains("kernel library"), "{msg}");

    let mut a = common::add_relu_artifact(common::kernel_library());
    a.target = "cuda:sm_90".into();
    let (_dir, path) = saved_model(&a);
    let msg = Model::load(&path).unwrap_err().to_string();
    assert!(
        msg.contains("target") && msg.contains("cuda:sm_90"),
        "{msg}"
    );
}

#[test]
fn model_is_send() {
    fn is_send<T: Send>() {}
    is_send::<Model>();
}

#[test]
fn shape_variants_are_chosen_by_input_shape() {
    // The main plan takes x: f32[2, 4]; a variant built from the same steps takes f32[1, 4].
    let mut a = common::add_relu_artifact(common::kernel_library());
    let mut v = a.plan.clone();
    for io in v.inputs.iter_mut().chain(v.outputs.iter_mut()) {
        io.shape[0] = kiln_runtime::DimSpec::Fixed(1);
    }
    for s in &mut v.steps {
        s.dims = vec![kiln_runtime::DimExpr::Const(4)];
        s.tasks = s.tasks.min(4);
    }
    a.plan.variants.push(v);
    let (_dir, path) = saved_model(&a);
    let mut model = Model::load(&path).unwrap();
    assert_eq!(model.plans().count(), 2);
    let x2 = [-3.0f32, 0.5, -2.5, 3.0, 1.0, 1.0, -1.0, -20.0];
    let out = model.run(&[TensorView::from_f32(&[2, 4], &x2)]).unwrap();
    assert_eq!(out[0].as_f32().unwrap(), expected_add_relu(&x2).as_slice());
    let x1 = [4.0f32, -0.5, -2.5, 3.0];
    let out = model.run(&[TensorView::from_f32(&[1, 4], &x1)]).unwrap();
    assert_eq!(out[0].shape, vec![1, 4]);
    assert_eq!(out[0].as_f32().unwrap(), &expected_add_relu(&x1)[..4]);
    let x3 = [0f32; 12];
    let err = model
        .run(&[TensorView::from_f32(&[3, 4], &x3)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("compiled for these input shapes only: [2, 4], [1, 4]"),
        "{err}"
    );
}

/// `add_relu_artifact` plus a dynamic tail `nz = NonZero(y)` (a graph run by the reference
/// interpreter after the steps) reading the model output `y`.
fn add_relu_nonzero_artifact() -> Artifact {
    use kiln_ir::ops::array::ArrayOp;
    use kiln_ir::{Fact, Graph, Node, Op, Shape};
    let mut a = common::add_relu_artifact(common::kernel_library());
    let mut g = Graph {
        name: "tail".into(),
        opset: 17,
        ..Default::default()
    };
    let y = g.add_value("y", Fact::new(kiln_ir::DType::F32, Shape::known(&[2, 4])));
    let nz = g.add_value("nz", Fact::new(kiln_ir::DType::I64, Shape::unknown(2)));
    g.inputs = vec![y];
    g.outputs = vec![nz];
    g.nodes.push(Node {
        name: "nonzero".into(),
        op: Op::Array(ArrayOp::NonZero),
        inputs: vec![Some(y)],
        outputs: vec![nz],
    });
    g.infer().unwrap();
    a.plan.outputs.push(kiln_runtime::IoSpec {
        name: "nz".into(),
        dtype: DType::I64,
        shape: vec![
            kiln_runtime::DimSpec::Fixed(2),
            kiln_runtime::DimSpec::Dynamic,
        ],
    });
    a.plan.tail = Some(kiln_runtime::DynamicTail {
        graph: serde_json::to_string(&g).unwrap(),
        inputs: vec![kiln_runtime::BufRef::Output { index: 0 }],
        outputs: vec![1],
    });
    a
}

#[test]
fn dynamic_tail_outputs_have_run_time_shapes() {
    let a = add_relu_nonzero_artifact();
    let (_dir, path) = saved_model(&a);
    let mut model = Model::load(&path).unwrap();
    for x in [
        [-3.0f32, 0.5, -2.5, 3.0, 1.0, 1.0, -1.0, -20.0],
        [9.0f32, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
    ] {
        let out = model.run(&[TensorView::from_f32(&[2, 4], &x)]).unwrap();
        let y = expected_add_relu(&x);
        assert_eq!(out[0].as_f32().unwrap(), y.as_slice());
        let (rows, cols): (Vec<i64>, Vec<i64>) = (0..8)
            .filter(|&i| y[i] != 0.0)
            .map(|i| (i as i64 / 4, i as i64 % 4))
            .unzip();
        assert_eq!(out[1].shape, vec![2, rows.len()]);
        let want: Vec<i64> = rows.into_iter().chain(cols).collect();
        assert_eq!(out[1].as_i64().unwrap(), want.as_slice());
        let mut y_buf = [0f32; 8];
        let mut nz_buf = [0i64; 16];
        let bytes = |p: *mut u8, n: usize| unsafe { std::slice::from_raw_parts_mut(p, n) };
        let err = model
            .run_into(
                &[TensorView::from_f32(&[2, 4], &x)],
                &mut [
                    bytes(y_buf.as_mut_ptr().cast(), 32),
                    bytes(nz_buf.as_mut_ptr().cast(), 128),
                ],
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "output 1 'nz' has a data-dependent shape; use run"
        );
        assert!(matches!(err, RunError::DynamicShape { index: 1, .. }));
        let err = model
            .output_shapes(&[TensorView::from_f32(&[2, 4], &x)])
            .unwrap_err();
        assert!(matches!(err, RunError::DynamicShape { .. }), "{err}");
    }
    let prof = model
        .profile(&[TensorView::from_f32(&[2, 4], &[1.0; 8])], 2)
        .unwrap();
    assert_eq!(prof.last().unwrap().0, "dynamic_tail");
}

#[test]
fn invalid_dynamic_tails_are_refused() {
    use kiln_runtime::{BufRef, DimSpec};
    let base = add_relu_nonzero_artifact();
    assert_eq!(base.plan.validate(base.weights.len() as u64), Ok(()));
    // Plans written before the field existed load without a tail.
    let mut json: serde_json::Value = serde_json::to_value(&base.plan).unwrap();
    json.as_object_mut().unwrap().remove("tail");
    let old: kiln_runtime::ExecPlan = serde_json::from_value(json).unwrap();
    assert!(old.tail.is_none());
    let check = |f: &dyn Fn(&mut kiln_runtime::ExecPlan), want: &str| {
        let mut p = base.plan.clone();
        f(&mut p);
        let e = p.validate(base.weights.len() as u64).unwrap_err();
        assert!(e.contains(want), "{e}");
    };
    // The tail writes an output a step writes too.
    check(
        &|p| p.tail.as_mut().unwrap().outputs = vec![0],
        "written twice",
    );
    check(
        &|p| p.tail.as_mut().unwrap().outputs = vec![5],
        "out of range",
    );
    // The tail reads its own output.
    check(
        &|p| p.tail.as_mut().unwrap().inputs = vec![BufRef::Output { index: 1 }],
        "not written by a step",
    );
    // A data-dependent dim on an output no tail computes, or on an input.
    check(&|p| p.tail = None, "does not compute it");
    check(
        &|p| p.inputs[0].shape[0] = DimSpec::Dynamic,
        "only allowed in outputs",
    );
    // A tail graph whose output does not match the plan is refused at load.
    let mut a = add_relu_nonzero_artifact();
    a.plan.outputs[1].dtype = DType::F32;
    let err = Model::from_artifact(a, "bad").unwrap_err();
    assert!(err.to_string().contains("plan.tail"), "{err}");
}
