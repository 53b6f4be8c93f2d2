//! The tuning database: every measurement, and the best schedule per workload and target.
//!
//! One SQLite file (`rusqlite`, SQLite bundled), in WAL mode so that several tuners and
//! compilers can use it at once (a writer waits up to [`BUSY_TIMEOUT`] for another's
//! transaction). Each measurement is committed on its own the moment it is taken, so a tuner
//! killed at any instant (even by `SIGKILL`) loses nothing it had reported: SQLite's journal
//! makes every commit atomic and durable against process death.
//!
//! Records are keyed by (workload fingerprint, target, Kiln version): a schedule measured by
//! another version of the code generator may not produce the same kernel, so it is kept but
//! not used. [`TuningDb::export_jsonl`] / [`TuningDb::import_jsonl`] move records between
//! machines as JSON lines; importing the same records twice adds nothing (each record has a
//! unique id).

use crate::space::Config;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a writer waits for another connection's transaction before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The schema version written in the `meta` table; a database with another one is refused.
pub const SCHEMA_VERSION: u32 = 1;

/// Errors of the tuning database; each names the database file.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed (cannot open, not a database, disk full, locked too long...).
    #[error("tuning database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file is a SQLite database but not a Kiln tuning database of this schema.
    #[error("tuning database {path}: {msg}")]
    Schema {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A line of a JSON-lines import is not a record.
    #[error("{path}: line {line}: not a tuning record: {msg}")]
    Import {
        /// The file being imported.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// Reading or writing a JSON-lines stream failed.
    #[error("{path}: {source}")]
    Io {
        /// The stream's file name.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What became of one measured candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Outcome {
    /// It ran and matched the reference; `seconds` is the median latency of one call.
    Ok {
        /// Median latency in seconds.
        seconds: f64,
    },
    /// It was rejected before running (failed validity check or compilation).
    Invalid {
        /// Why.
        msg: String,
    },
    /// The measuring process died (signal or abnormal exit).
    Crash {
        /// What the parent saw.
        msg: String,
    },
    /// It did not finish within the measurement time limit.
    Timeout {
        /// The limit in seconds.
        limit_s: f64,
    },
    /// It ran but its output differs from the reference.
    Wrong {
        /// The first mismatch.
        msg: String,
    },
}

impl Outcome {
    /// The latency if the candidate ran correctly.
    pub fn seconds(&self) -> Option<f64> {
        match self {
            Outcome::Ok { seconds } => Some(*seconds),
            _ => None,
        }
    }

    fn status(&self) -> &'static str {
        match self {
            Outcome::Ok { .. } => "ok",
            Outcome::Invalid { .. } => "invalid",
            Outcome::Crash { .. } => "crash",
            Outcome::Timeout { .. } => "timeout",
            Outcome::Wrong { .. } => "wrong",
        }
    }
}

/// One measurement as stored (and as exported, one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Globally unique id (random, 128 bits hex), so imports never duplicate a record.
    pub uid: String,
    /// The workload fingerprint ([`crate::Workload::fingerprint`]).
    pub workload: String,
    /// The workload's template kind ([`crate::Workload::kind`]).
    pub kind: String,
    /// Human-readable workload (`matmul f32 m=128 n=768 k=3072 epilogue=none`).
    pub description: String,
    /// The workload's cost-model features ([`crate::Workload::features`]), so records of
    /// other workloads and targets can train a model (transfer).
    pub workload_features: Vec<f32>,
    /// The target the kernel ran on (`cpu:znver4`, `cuda:h100`).
    pub target: String,
    /// The Kiln version that generated the kernel.
    pub kiln_version: String,
    /// The schedule measured.
    pub config: Config,
    /// What happened.
    pub outcome: Outcome,
    /// When, in seconds since the Unix epoch.
    pub measured_at: f64,
}

impl Record {
    /// A new record with a fresh uid, measured now.
    pub fn new(
        workload: &crate::Workload,
        target: &str,
        kiln_version: &str,
        config: Config,
        outcome: Outcome,
    ) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Self {
            uid: format!("{:032x}", rand::random::<u128>()),
            workload: workload.fingerprint(),
            kind: workload.kind.clone(),
            description: workload.description.clone(),
            workload_features: workload.features.clone(),
            target: target.to_string(),
            kiln_version: kiln_version.to_string(),
            config,
            outcome,
            measured_at: now,
        }
    }
}

/// An open tuning database (see the module doc). One per thread; open it once per process
/// or thread, it is cheap to keep.
pub struct TuningDb {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS measurements(
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    workload TEXT NOT NULL,
    kind TEXT NOT NULL,
    description TEXT NOT NULL,
    workload_features TEXT NOT NULL,
    target TEXT NOT NULL,
    kiln_version TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    seconds REAL,
    outcome TEXT NOT NULL,
    measured_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS measurements_key
    ON measurements(workload, target, kiln_version, status, seconds);
CREATE VIEW IF NOT EXISTS best AS
    SELECT workload, target, kiln_version, description, config, MIN(seconds) AS seconds
    FROM measurements WHERE status = 'ok'
    GROUP BY workload, target, kiln_version;
"#;

impl TuningDb {
    /// Opens (creating if needed) the database at `path`, in WAL mode.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DbError> {
        let path = path.as_ref().to_path_buf();
        let sql = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        // WAL: readers never block the writer; NORMAL sync is durable against process death
        // (the risk it leaves is an OS crash or power loss, where the last commits may roll
        // back, never corrupt).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let version: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        match version {
            None => {
                conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?1)",
                    [SCHEMA_VERSION.to_string()],
                )
                .map_err(sql)?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) => {
                return Err(DbError::Schema {
                    path,
                    msg: format!("schema version {v}, this Kiln reads {SCHEMA_VERSION}"),
                })
            }
        }
        Ok(Self { conn, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> DbError {
        DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Stores one record, committed before returning. A record whose uid is already present
    /// is ignored (returns `false`).
    pub fn insert(&self, r: &Record) -> Result<bool, DbError> {
        insert_on(&self.conn, r).map_err(|e| self.sql(e))
    }

    fn query(&self, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Record>, DbError> {
        let mut st = self.conn.prepare(sql).map_err(|e| self.sql(e))?;
        let rows = st
            .query_map(args, |row| {
                let features: String = row.get(4)?;
                let config: String = row.get(7)?;
                let outcome: String = row.get(8)?;
                Ok((
                    Record {
                        uid: row.get(0)?,
                        workload: row.get(1)?,
                        kind: row.get(2)?,
                        description: row.get(3)?,
                        workload_features: Vec::new(),
                        target: row.get(5)?,
                        kiln_version: row.get(6)?,
                        config: Config::default(),
                        outcome: Outcome::Invalid { msg: String::new() },
                        measured_at: row.get(9)?,
                    },
                    features,
                    config,
                    outcome,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (mut r, features, config, outcome) = row.map_err(|e| self.sql(e))?;
            let bad = |what: &str, e: serde_json::Error| DbError::Schema {
                path: self.path.clone(),
                msg: format!("record {}: bad {what}: {e}", r.uid),
            };
            r.workload_features =
                serde_json::from_str(&features).map_err(|e| bad("workload features", e))?;
            r.config = serde_json::from_str(&config).map_err(|e| bad("config", e))?;
            r.outcome = serde_json::from_str(&outcome).map_err(|e| bad("outcome", e))?;
            out.push(r);
        }
        Ok(out)
    }

    const COLUMNS: &'static str =
        "uid, workload, kind, description, workload_features, target, kiln_version, config, \
         outcome, measured_at";

    /// Every record of `workload` on `target` made by `kiln_version`, oldest first.
    pub fn records(
        &self,
        workload: &str,
        target: &str,
        kiln_version: &str,
    ) -> Result<Vec<Record>, DbError> {
        self.query(
            &format!(
                "SELECT {} FROM measurements WHERE workload = ?1 AND target = ?2 \
                 AND kiln_version = ?3 ORDER BY id",
                Self::COLUMNS
            ),
            &[&workload, &target, &kiln_version],
        )
    }

    /// Every successful record of template `kind` on targets other than `target` made by
    /// `kiln_version`, any workload (training data for the cost model of a new SKU).
    pub fn ok_elsewhere(
        &self,
        kind: &str,
        target: &str,
        kiln_version: &str,
    ) -> Result<Vec<Record>, DbError> {
        self.query(
            &format!(
                "SELECT {} FROM measurements WHERE kind = ?1 AND target <> ?2 \
                 AND kiln_version = ?3 AND status = 'ok' ORDER BY id",
                Self::COLUMNS
            ),
            &[&kind, &target, &kiln_version],
        )
    }

    /// The fastest correct record of `workload` on `target` by `kiln_version`.
    pub fn best(
        &self,
        workload: &str,
        target: &str,
        kiln_version: &str,
    ) -> Result<Option<Record>, DbError> {
        Ok(self
            .query(
                &format!(
                    "SELECT {} FROM measurements WHERE workload = ?1 AND target = ?2 \
                     AND kiln_version = ?3 AND status = 'ok' ORDER BY seconds, id LIMIT 1",
                    Self::COLUMNS
                ),
                &[&workload, &target, &kiln_version],
            )?
            .pop())
    }

    /// Every correct record of `target` by `kiln_version` (for callers that choose among
    /// them themselves, e.g. with a margin over the default schedule).
    pub fn ok_records(&self, target: &str, kiln_version: &str) -> Result<Vec<Record>, DbError> {
        self.query(
            &format!(
                "SELECT {} FROM measurements WHERE target = ?1 AND kiln_version = ?2 \
                 AND status = 'ok' ORDER BY id",
                Self::COLUMNS
            ),
            &[&target, &kiln_version],
        )
    }

    /// Number of records.
    pub fn len(&self) -> Result<u64, DbError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM measurements", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| self.sql(e))
    }

    /// Whether the database holds no record.
    pub fn is_empty(&self) -> Result<bool, DbError> {
        Ok(self.len()? == 0)
    }

    /// Whether a record with this uid is stored.
    pub fn contains(&self, uid: &str) -> Result<bool, DbError> {
        self.conn
            .query_row("SELECT 1 FROM measurements WHERE uid = ?1", [uid], |_| {
                Ok(())
            })
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.sql(e))
    }

    /// SQLite's `PRAGMA integrity_check`: `Ok(())` or the problems it lists.
    pub fn integrity_check(&self) -> Result<(), DbError> {
        let mut st = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(|e| self.sql(e))?;
        let lines: Vec<String> = st
            .query_map([], |r| r.get(0))
            .map_err(|e| self.sql(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.sql(e))?;
        if lines == ["ok"] {
            Ok(())
        } else {
            Err(DbError::Schema {
                path: self.path.clone(),
                msg: format!("integrity check failed: {}", lines.join("; ")),
            })
        }
    }

    /// Writes every record (oldest first) as one JSON object per line; returns the count.
    pub fn export_jsonl(&self, out: &mut dyn Write, name: &str) -> Result<usize, DbError> {
        let all = self.query(
            &format!("SELECT {} FROM measurements ORDER BY id", Self::COLUMNS),
            &[],
        )?;
        let io = |source| DbError::Io {
            path: name.to_string(),
            source,
        };
        for r in &all {
            serde_json::to_writer(&mut *out, r).map_err(|e| io(e.into()))?;
            out.write_all(b"\n").map_err(io)?;
        }
        out.flush().map_err(io)?;
        Ok(all.len())
    }

    /// Reads JSON-lines records (as written by [`TuningDb::export_jsonl`]) and stores those
    /// not present yet, in one transaction (all or nothing); returns `(read, added)`. Blank
    /// lines are skipped; any other line that is not a record fails the whole import,
    /// naming its line.
    pub fn import_jsonl(
        &mut self,
        input: &mut dyn BufRead,
        name: &str,
    ) -> Result<(usize, usize), DbError> {
        let mut records = Vec::new();
        for (i, line) in input.lines().enumerate() {
            let line = line.map_err(|source| DbError::Io {
                path: name.to_string(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let r: Record = serde_json::from_str(&line).map_err(|e| DbError::Import {
                path: name.to_string(),
                line: i + 1,
                msg: e.to_string(),
            })?;
            records.push(r);
        }
        let path = self.path.clone();
        let sql = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let mut added = 0;
        for r in &records {
            if insert_on(&tx, r).map_err(sql)? {
                added += 1;
            }
        }
        tx.commit().map_err(sql)?;
        Ok((records.len(), added))
    }
}

/// Inserts `r` unless its uid is present (on a connection or inside a transaction, which
/// dereferences to one); `Ok(true)` if it was added.
fn insert_on(conn: &Connection, r: &Record) -> Result<bool, rusqlite::Error> {
    let config = serde_json::to_string(&r.config).expect("a config serializes");
    let outcome = serde_json::to_string(&r.outcome).expect("an outcome serializes");
    let n = conn.execute(
        "INSERT OR IGNORE INTO measurements(uid, workload, kind, description, workload_features, \
         target, kiln_version, config, status, seconds, outcome, measured_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            r.uid,
            r.workload,
            r.kind,
            r.description,
            serde_json::to_string(&r.workload_features).expect("features serialize"),
            r.target,
            r.kiln_version,
            config,
            r.outcome.status(),
            r.outcome.seconds(),
            outcome,
            r.measured_at
        ],
    )?;
    Ok(n == 1)
}
