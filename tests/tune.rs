//! `kiln tune` / `kiln compile --db` / `kiln db` end to end: records are written, resumed
//! without re-measuring, used by the compiler (and the compiled model stays correct), moved
//! between databases; crashing and hanging candidates are recorded and tuning goes on.

use crate::common;
use common::{kiln, tmp};
use kiln_tune::{Outcome, TuningDb};
use std::collections::HashSet;
use std::process::Command;

const MLP: &str = "tests/zoo/mlp/model.onnx";

fn records(db: &std::path::Path) -> Vec<kiln_tune::Record> {
    let d = TuningDb::open(db).unwrap();
    let mut buf = Vec::new();
    d.export_jsonl(&mut buf, "x").unwrap();
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn tune_resume_compile_and_move_records() {
    let dir = tmp("tune");
    let db = dir.join("t.db");
    let dbs = db.to_str().unwrap();
    let tune = [
        "tune",
        MLP,
        "--shape",
        "input=2x32",
        "--trials",
        "12",
        "--min-time",
        "0.01",
    ];
    let (ok, out) = kiln(&[&tune[..], &["--db", dbs]].concat());
    assert!(ok, "{out}");
    assert!(out.contains("speed-up"), "{out}");
    let first = records(&db);
    assert!(first.len() >= 12, "{}", first.len());
    assert!(
        first
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Ok { .. })),
        "{first:?}"
    );
    // Resume: more records, no schedule measured twice for a workload.
    let (ok, out) = kiln(&[&tune[..], &["--db", dbs]].concat());
    assert!(ok, "{out}");
    let all = records(&db);
    assert!(all.len() >= first.len() + 12);
    let keys: HashSet<(String, String)> = all
        .iter()
        .map(|r| (r.workload.clone(), r.config.to_string()))
        .collect();
    assert_eq!(keys.len(), all.len(), "a schedule was measured twice");
    // The compiler uses them, and the model still matches the reference.
    let art = dir.join("mlp.kiln");
    let (ok, out) = kiln(&[
        "compile",
        MLP,
        "--shape",
        "input=2x32",
        "--db",
        dbs,
        "-o",
        art.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    // every schedule the database selects (those at least `MIN_GAIN` faster than the
    // default: which ones is up to the timing of these sub-microsecond kernels) is used
    let selected = kiln::tune::load_schedules(&db, &kiln::tune::cpu_target("x86-64-v3"))
        .unwrap()
        .schedules
        .len();
    assert!(
        out.contains(&format!("tuned schedules: {selected} of 3 tunable kernels")),
        "{selected} selected: {out}"
    );
    let (ok, out) = kiln(&[
        "run",
        art.to_str().unwrap(),
        "--check",
        "tests/zoo/mlp/test_data_set_0",
    ]);
    assert!(ok, "{out}");
    // Export / import.
    let jl = dir.join("t.jsonl");
    let (ok, out) = kiln(&["db", "export", "--db", dbs, "-o", jl.to_str().unwrap()]);
    assert!(ok, "{out}");
    let db2 = dir.join("t2.db");
    let (ok, out) = kiln(&[
        "db",
        "import",
        jl.to_str().unwrap(),
        "--db",
        db2.to_str().unwrap(),
    ]);
    assert!(ok && out.contains(&format!("{} added", all.len())), "{out}");
    let (ok, out) = kiln(&[
        "db",
        "import",
        jl.to_str().unwrap(),
        "--db",
        db2.to_str().unwrap(),
    ]);
    assert!(ok && out.contains(" 0 added"), "{out}");
    let (ok, out) = kiln(&["db", "export", "--db", "/nonexistent/x.db", "-o", "/tmp/x"]);
    assert!(!ok && out.contains("does not exist"), "{out}");
    let (ok, out) = kiln(&["compile", MLP, "--db", "/nonexistent/x.db"]);
    assert!(!ok && out.contains("does not exist"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn crashing_and_hanging_candidates_are_recorded() {
    // Candidates with mr = 1 crash (hang); mr = 6 is the default schedule, measured first.
    for (fault, status, trials) in [("crash", "crash", "30"), ("hang", "timeout", "12")] {
        let dir = tmp(&format!("tune-{fault}"));
        let db = dir.join("f.db");
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "tune",
                MLP,
                "--trials",
                trials,
                "--min-time",
                "0.005",
                "--timeout",
                "2",
            ])
            .args(["--db", db.to_str().unwrap()])
            .env("KILN_TUNE_INJECT", format!("{fault}:mr=6"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        let recs = records(&db);
        let bad: Vec<_> = recs
            .iter()
            .filter(|r| r.config.get("mr") == Some(6))
            .collect();
        let good = recs
            .iter()
            .filter(|r| r.config.get("mr") != Some(6))
            .count();
        assert!(
            !bad.is_empty(),
            "no mr=6 candidate was tried: {} records",
            recs.len()
        );
        for r in &bad {
            let json = serde_json::to_value(&r.outcome).unwrap();
            assert_eq!(json["status"], status, "{r:?}");
        }
        assert!(good > bad.len(), "tuning went on after the {fault}s");
        std::fs::remove_dir_all(&dir).ok();
    }
}
