//! The tuning database: records, best, export/import, concurrent writers, bad input.

use kiln_tune::{Config, Outcome, Record, TuningDb, Workload};

fn wl(n: i64) -> Workload {
    Workload::new(
        "matmul",
        &format!("matmul f32 m={n} n={n} k={n}"),
        vec![n as f32],
    )
}

fn rec(w: &Workload, target: &str, mr: i64, outcome: Outcome) -> Record {
    Record::new(
        w,
        target,
        "0.1.0",
        Config::from_pairs(&[("mr", mr)]),
        outcome,
    )
}

#[test]
fn records_best_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = TuningDb::open(dir.path().join("t.db")).unwrap();
    assert!(db.is_empty().unwrap());
    let (a, b) = (wl(64), wl(128));
    let fp = a.fingerprint();
    assert_eq!(fp.len(), 16);
    assert_ne!(fp, b.fingerprint());
    db.insert(&rec(&a, "cpu:x", 4, Outcome::Ok { seconds: 2.0 }))
        .unwrap();
    db.insert(&rec(&a, "cpu:x", 6, Outcome::Ok { seconds: 1.0 }))
        .unwrap();
    db.insert(&rec(&a, "cpu:x", 8, Outcome::Wrong { msg: "bad".into() }))
        .unwrap();
    db.insert(&rec(&a, "cpu:y", 2, Outcome::Ok { seconds: 0.5 }))
        .unwrap();
    db.insert(&rec(&b, "cpu:x", 1, Outcome::Ok { seconds: 0.1 }))
        .unwrap();
    let best = db.best(&fp, "cpu:x", "0.1.0").unwrap().unwrap();
    assert_eq!(best.config.get("mr"), Some(6));
    assert_eq!(best.outcome, Outcome::Ok { seconds: 1.0 });
    assert_eq!(best.workload_features, vec![64.0]);
    assert!(
        db.best(&fp, "cpu:x", "0.2.0").unwrap().is_none(),
        "other versions are not used"
    );
    assert_eq!(db.records(&fp, "cpu:x", "0.1.0").unwrap().len(), 3);
    assert_eq!(
        db.ok_elsewhere("matmul", "cpu:x", "0.1.0").unwrap().len(),
        1
    );
    // A record is stored once, however often it is inserted.
    let r = rec(&a, "cpu:x", 3, Outcome::Timeout { limit_s: 1.0 });
    assert!(db.insert(&r).unwrap());
    assert!(!db.insert(&r).unwrap());
    assert_eq!(db.len().unwrap(), 6);
    db.integrity_check().unwrap();
}

#[test]
fn export_import_round_trip_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let src = TuningDb::open(dir.path().join("a.db")).unwrap();
    for mr in 1..=5 {
        src.insert(&rec(
            &wl(32),
            "cuda:h100",
            mr,
            Outcome::Ok { seconds: mr as f64 },
        ))
        .unwrap();
    }
    src.insert(&rec(
        &wl(32),
        "cuda:h100",
        9,
        Outcome::Crash {
            msg: "SIGSEGV".into(),
        },
    ))
    .unwrap();
    let mut buf = Vec::new();
    assert_eq!(src.export_jsonl(&mut buf, "out.jsonl").unwrap(), 6);
    let mut dst = TuningDb::open(dir.path().join("b.db")).unwrap();
    assert_eq!(dst.import_jsonl(&mut &buf[..], "in.jsonl").unwrap(), (6, 6));
    assert_eq!(dst.import_jsonl(&mut &buf[..], "in.jsonl").unwrap(), (6, 0));
    let mut again = Vec::new();
    dst.export_jsonl(&mut again, "x").unwrap();
    assert_eq!(again, buf, "export after import gives the same lines");
}

#[test]
fn bad_import_names_the_line_and_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = TuningDb::open(dir.path().join("a.db")).unwrap();
    let good =
        serde_json::to_string(&rec(&wl(8), "cpu:x", 1, Outcome::Ok { seconds: 1.0 })).unwrap();
    let text = format!("{good}\n\n{{\"uid\": 3}}\n");
    let err = db
        .import_jsonl(&mut text.as_bytes(), "records.jsonl")
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("records.jsonl: line 3"), "{msg}");
    assert_eq!(db.len().unwrap(), 0, "all or nothing");
}

#[test]
fn not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk.db");
    std::fs::write(&p, vec![0x55u8; 8192]).unwrap();
    let err = TuningDb::open(&p)
        .err()
        .expect("junk is refused")
        .to_string();
    assert!(err.contains("junk.db"), "{err}");
}

#[test]
fn concurrent_writers_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    TuningDb::open(&path).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let db = TuningDb::open(&path).unwrap();
                for i in 0..50 {
                    let r = rec(&wl(t), "cpu:x", i, Outcome::Ok { seconds: i as f64 });
                    assert!(db.insert(&r).unwrap());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let db = TuningDb::open(&path).unwrap();
    assert_eq!(db.len().unwrap(), 200);
    db.integrity_check().unwrap();
}
