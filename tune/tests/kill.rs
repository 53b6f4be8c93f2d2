//! A tuner killed (SIGKILL) at random moments leaves a database that opens, passes
//! `PRAGMA integrity_check`, and holds every measurement committed before each kill.
//!
//! The test re-runs its own binary as the writer (`KILN_TUNE_KILL_WRITER=path`): the child
//! inserts records in a loop and prints each uid after `insert` returns (i.e. after the
//! commit); the parent kills it after a random delay and checks every printed uid is stored.

use kiln_tune::{Config, Outcome, Record, TuningDb, Workload};
use rand::Rng;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn writer_child() {
    let Ok(path) = std::env::var("KILN_TUNE_KILL_WRITER") else {
        return; // only does something when started by `killed_twenty_times_loses_nothing`
    };
    let db = TuningDb::open(&path).unwrap();
    let w = Workload::new("matmul", "matmul f32 m=1 n=2 k=3", vec![1.0]);
    let mut out = std::io::stdout().lock();
    for i in 0.. {
        let r = Record::new(
            &w,
            "cpu:kill",
            "0.1.0",
            Config::from_pairs(&[("i", i)]),
            Outcome::Ok {
                seconds: 1.0 / (1 + i) as f64,
            },
        );
        db.insert(&r).unwrap();
        use std::io::Write;
        writeln!(out, "{}", r.uid).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn killed_twenty_times_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kill.db");
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    let mut committed = Vec::new();
    for _ in 0..20 {
        let mut child = Command::new(&exe)
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env("KILN_TUNE_KILL_WRITER", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.len() == 32 && l.bytes().all(|b| b.is_ascii_hexdigit()))
                .collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(20..300)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        committed.extend(reader.join().unwrap());
    }
    assert!(
        committed.len() > 20,
        "the writer made progress: {}",
        committed.len()
    );
    let db = TuningDb::open(&path).unwrap();
    db.integrity_check().unwrap();
    for uid in &committed {
        assert!(
            db.contains(uid).unwrap(),
            "record {uid} was committed but is lost"
        );
    }
    assert!(db.len().unwrap() >= committed.len() as u64);
}
