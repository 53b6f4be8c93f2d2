//! Sharded execution end to end: every zoo model compiled with a 2-rank and a 4-rank plan
//! (pipeline for the CNNs, Megatron tensor parallel for bert/gpt/mlp, data parallel for mlp
//! at batch 4), run under `mpirun -n 2/4` (and as threads in one process), outputs compared
//! with the single-device artifact's on the same inputs (rel. ≤ 1e-4). Also: a rank that dies
//! makes `mpirun` fail fast, and a wrong rank count is refused. The MPI cases are skipped,
//! saying so, when `mpirun` is not installed.

use crate::common;

use common::{kiln, tmp};
use kiln::passes::parallel::pipeline_split::{balanced_pipeline, data_parallel, tensor_parallel};
use kiln::passes::parallel::ParallelPlan;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn zoo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/zoo")
        .join(name)
        .join("model.onnx")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn have_mpirun() -> bool {
    Command::new("mpirun").arg("--version").output().is_ok()
}

/// `mpirun -n N kiln ARGS` (as root, oversubscribed: CI has 2 cores); success and output.
fn mpirun(n: usize, args: &[&str], env: &[(&str, &str)]) -> (bool, String, Duration) {
    let t = Instant::now();
    let out = Command::new("timeout")
        .args([
            "120",
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
        ])
        .arg(n.to_string())
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run mpirun");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, t.elapsed())
}

/// The f32 outputs in an .npz file, by name.
fn read_npz(p: &Path) -> Vec<(String, Vec<f32>)> {
    let mut z = ndarray_npy::NpzReader::new(std::fs::File::open(p).unwrap()).unwrap();
    let mut names = z.names().unwrap();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let a: ndarray::ArrayD<f32> = z.by_name(&n).unwrap();
            (n, a.iter().copied().collect())
        })
        .collect()
}

/// `max|a - e| <= 1e-4 * max(1, max|e|)` for every output.
fn assert_close(what: &str, got: &Path, expected: &Path) {
    let (g, e) = (read_npz(got), read_npz(expected));
    assert_eq!(g.len(), e.len(), "{what}: outputs");
    for ((gn, gv), (en, ev)) in g.iter().zip(&e) {
        assert_eq!(gn, en, "{what}");
        assert_eq!(gv.len(), ev.len(), "{what}: {gn} size");
        assert!(
            ev.iter().chain(gv).all(|x| x.is_finite()),
            "{what}: {gn}: non-finite values"
        );
        let scale = ev.iter().fold(1.0f32, |m, x| m.max(x.abs()));
        let err = gv
            .iter()
            .zip(ev)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            err <= 1e-4 * scale,
            "{what}: {gn}: max error {err:e} (scale {scale})"
        );
    }
}

/// One model at fixed shapes: its single-device reference outputs (on the test data inputs
/// when `check`, else random inputs of seed 0).
struct Case {
    name: &'static str,
    shapes: Vec<String>,
    dir: PathBuf,
    reference: PathBuf,
    /// `--check DIR` arguments (the zoo test data: valid token ids and masks).
    check: Vec<String>,
}

impl Case {
    fn new(name: &'static str, shapes: &[&str], check: bool, dir: &Path) -> Case {
        let check: Vec<String> = if check {
            let d = zoo(name).parent().unwrap().join("test_data_set_0");
            vec!["--check".into(), s(&d).into()]
        } else {
            Vec::new()
        };
        let tag = format!("{name}{}", shapes.join("_").replace(['=', 'x'], ""));
        let single = dir.join(format!("{tag}.kiln"));
        let mut a: Vec<String> = vec![
            "compile".into(),
            s(&zoo(name)).into(),
            "-o".into(),
            s(&single).into(),
        ];
        for sh in shapes {
            a.push("--shape".into());
            a.push(sh.to_string());
        }
        let av: Vec<&str> = a.iter().map(String::as_str).collect();
        let (ok, out) = kiln(&av);
        assert!(ok, "{name}: {out}");
        let reference = dir.join(format!("{tag}_ref.npz"));
        let mut a = vec!["run", s(&single), "--output", s(&reference)];
        a.extend(check.iter().map(String::as_str));
        let (ok, out) = kiln(&a);
        assert!(ok, "{name}: {out}");
        Case {
            check,
            name,
            shapes: shapes.iter().map(|x| x.to_string()).collect(),
            dir: dir.to_path_buf(),
            reference,
        }
    }

    /// The graph plans index (prepared at the case's shapes).
    fn graph(&self) -> kiln::ir::Graph {
        let mut opts = kiln::compile::CompileOptions::default();
        for sh in &self.shapes {
            let (n, d) = kiln::pipeline::parse_shape(sh).unwrap();
            opts.shapes.insert(n, d);
        }
        kiln::cluster::prepare(&kiln::load_model(zoo(self.name)).unwrap(), &opts).unwrap()
    }

    /// Compiles the model with `plan`; returns the sharded artifact.
    fn compile(&self, tag: &str, plan: &ParallelPlan) -> PathBuf {
        let pj = self.dir.join(format!("{}_{tag}.json", self.name));
        std::fs::write(&pj, serde_json::to_string(plan).unwrap()).unwrap();
        let art = self.dir.join(format!("{}_{tag}.kiln", self.name));
        let mut a: Vec<String> = vec![
            "compile".into(),
            s(&zoo(self.name)).into(),
            "--plan".into(),
            s(&pj).into(),
            "-o".into(),
            s(&art).into(),
        ];
        for sh in &self.shapes {
            a.push("--shape".into());
            a.push(sh.clone());
        }
        let av: Vec<&str> = a.iter().map(String::as_str).collect();
        let (ok, out) = kiln(&av);
        assert!(ok, "{} {tag}: {out}", self.name);
        art
    }

    /// Runs a sharded artifact under mpirun (and, for 2 ranks, as threads) and compares.
    fn check(&self, tag: &str, art: &Path, world: usize, mpi: bool) {
        let what = format!("{} {tag}", self.name);
        if world == 2 {
            let out = self.dir.join(format!("{}_{tag}_threads.npz", self.name));
            let mut a = vec!["run", s(art), "--output", s(&out)];
            a.extend(self.check.iter().map(String::as_str));
            let (ok, text) = kiln(&a);
            assert!(
                ok && text.contains("as a thread"),
                "{what} (threads): {text}"
            );
            assert_close(&format!("{what} (threads)"), &out, &self.reference);
        }
        if mpi {
            let out = self.dir.join(format!("{}_{tag}_mpi.npz", self.name));
            let mut a = vec!["run", s(art), "--output", s(&out)];
            a.extend(self.check.iter().map(String::as_str));
            let (ok, text, dt) = mpirun(world, &a, &[]);
            assert!(ok, "{what} (mpirun -n {world}): {text}");
            assert!(
                text.contains(&format!("rank 0 of {world}")),
                "{what}: {text}"
            );
            assert_close(
                &format!("{what} (mpirun -n {world})"),
                &out,
                &self.reference,
            );
            eprintln!("{what}: mpirun -n {world} ok in {:.1} s", dt.as_secs_f64());
        }
    }
}

#[test]
fn zoo_models_sharded_over_2_and_4_ranks_match_the_single_device_run() {
    let mpi = have_mpirun();
    if !mpi {
        eprintln!("SKIPPED the mpirun runs: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev); running ranks as threads only");
    }
    let dir = tmp("mpi-zoo");
    // CNNs (batch 1): pipeline
    for name in ["resnet", "mobilenet"] {
        let c = Case::new(name, &[], false, &dir);
        let g = c.graph();
        for world in [2, 4] {
            let tag = format!("pipeline{world}");
            let art = c.compile(&tag, &balanced_pipeline(&g, world).unwrap());
            c.check(&tag, &art, world, mpi);
        }
    }
    // transformers and the MLP: Megatron tensor parallel
    for (name, shapes) in [
        ("bert", &["input_ids=1x16", "attention_mask=1x16"][..]),
        ("gpt", &["input_ids=2x16"][..]),
        ("mlp", &["input=2x32"][..]),
    ] {
        let c = Case::new(name, shapes, true, &dir);
        let g = c.graph();
        for world in [2, 4] {
            let tag = format!("tp{world}");
            let plan = tensor_parallel(&g, world);
            assert!(
                plan.stages.iter().all(|s| matches!(&s.mode,
                    kiln::passes::parallel::StageMode::TensorParallel { splits } if !splits.is_empty())),
                "{name}: no split contraction"
            );
            let art = c.compile(&tag, &plan);
            c.check(&tag, &art, world, mpi);
        }
    }
    // data parallel at batch 4
    let c = Case::new("mlp", &["input=4x32"], false, &dir);
    let g = c.graph();
    for world in [2, 4] {
        let tag = format!("dp{world}");
        let art = c.compile(&tag, &data_parallel(&g, world, 4));
        c.check(&tag, &art, world, mpi);
    }
    // a pipeline over 2 micro-batches of 2 rows
    let mut plan = balanced_pipeline(&g, 2).unwrap();
    plan.micro_batches = 2;
    let art = c.compile("micro2", &plan);
    c.check("micro2", &art, 2, mpi);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_dying_rank_fails_the_job_fast_and_a_wrong_world_is_refused() {
    if !have_mpirun() {
        eprintln!("SKIPPED: mpirun is not installed");
        return;
    }
    let dir = tmp("mpi-fail");
    let art = dir.join("mlp2.kiln");
    let (ok, out) = kiln(&["compile", s(&zoo("mlp")), "--ranks", "2", "-o", s(&art)]);
    assert!(ok, "{out}");
    let (ok, text, dt) = mpirun(
        2,
        &["run", s(&art), "--repeat", "5"],
        &[("KILN_TEST_DIE_RANK", "1")],
    );
    assert!(!ok, "the job succeeded though rank 1 died: {text}");
    assert!(text.contains("KILN_TEST_DIE_RANK"), "{text}");
    assert!(dt < Duration::from_secs(60), "took {dt:?}: {text}");
    let (ok, text, _) = mpirun(3, &["run", s(&art)], &[]);
    assert!(
        !ok && text.contains("sharded over 2 ranks but mpirun started 3"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_plans_and_cluster_artifacts_in_the_wrong_place_are_refused() {
    let dir = tmp("mpi-bad");
    let bad = dir.join("plan.json");
    std::fs::write(&bad, "{\"world\": 2}").unwrap();
    let (ok, out) = kiln(&["compile", s(&zoo("mlp")), "--plan", s(&bad)]);
    assert!(
        !ok && out.contains("plan.json") && out.contains("not a parallel plan"),
        "{out}"
    );
    // a plan for another graph: node ranges that do not cover it
    let plan = ParallelPlan::single(3);
    std::fs::write(&bad, serde_json::to_string(&plan).unwrap()).unwrap();
    let (ok, out) = kiln(&["compile", s(&zoo("mlp")), "--plan", s(&bad)]);
    assert!(!ok && out.contains("stages end at node 3"), "{out}");
    let (ok, out) = kiln(&[
        "compile",
        s(&zoo("mlp")),
        "--ranks",
        "2",
        "--mode",
        "diagonal",
    ]);
    assert!(!ok && out.contains("--mode diagonal"), "{out}");
    // the single-device API refuses a sharded artifact, naming the way to run it
    let art = dir.join("mlp2.kiln");
    let (ok, out) = kiln(&["compile", s(&zoo("mlp")), "--ranks", "2", "-o", s(&art)]);
    assert!(ok, "{out}");
    let e = match kiln::Session::load(&art) {
        Ok(_) => panic!("a sharded artifact loaded as a single-device session"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("mpirun -n 2"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cluster_files_choose_the_plan_by_search() {
    let dir = tmp("mpi-cluster");
    let clusters = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clusters");
    let data = zoo("mlp").parent().unwrap().join("test_data_set_0");
    let art = dir.join("mlp-cpu2.kiln");
    let (ok, out) = kiln(&[
        "compile",
        s(&zoo("mlp")),
        "--cluster",
        s(&clusters.join("cpu2.toml")),
        "--shape",
        "input=2x32",
        "-o",
        s(&art),
    ]);
    assert!(ok && out.contains("cluster: 2 ranks"), "{out}");
    let (ok, out) = kiln(&["run", s(&art), "--check", s(&data)]);
    assert!(ok && out.contains("matches the reference"), "{out}");
    if have_mpirun() {
        let (ok, out, _) = mpirun(2, &["run", s(&art), "--check", s(&data)], &[]);
        assert!(ok && out.contains("matches the reference"), "{out}");
    } else {
        eprintln!("SKIPPED the mpirun run: mpirun is not installed");
    }
    // GPU ranks: every segment compiles for the H100; without a GPU, running says so,
    // naming the rank and segment
    let gpu_art = dir.join("mlp-8xh100.kiln");
    let (ok, out) = kiln(&[
        "compile",
        s(&zoo("mlp")),
        "--cluster",
        s(&clusters.join("8xh100.toml")),
        "-o",
        s(&gpu_art),
    ]);
    assert!(ok && out.contains("cluster: 8 ranks"), "{out}");
    if kiln_runtime::cuda::device_count() == 0 {
        let (ok, out) = kiln(&["run", s(&gpu_art)]);
        assert!(!ok && out.contains("rank") && out.contains("CUDA"), "{out}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
