//! The ledger: a durable record of every decision about a GPU-memory holder and of every
//! action's outcome.
//!
//! The invariant the rest of the daemon relies on: a decision is committed here *before* its
//! action is taken, and the outcome after. A daemon killed in between leaves the row
//! "pending", and the next start marks it "interrupted" — so no action ever goes unrecorded.
//! That is why the database runs in WAL mode with `synchronous=FULL` and every write is its
//! own committed transaction.

use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use crate::{config::MatchKind, model::Matched};

pub use crate::{
    config::DEFAULT_LEDGER_PATH,
    record::{ALL_OUTCOMES, Action, Decision, Lineage, Outcome, Record, Resolution},
};

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many have been.
/// Append only: never edit an entry once released. No `IF NOT EXISTS`, so an accidental
/// re-run fails loudly instead of silently papering over a version mix-up.
const MIGRATIONS: &[&str] = &[
    // 1: decisions with their outcomes, and holder lineage.
    "CREATE TABLE decisions (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,
        time_ms            INTEGER NOT NULL,
        service            TEXT    NOT NULL,
        session_kind       TEXT    NOT NULL,
        session_key        TEXT    NOT NULL,
        death_cause        TEXT    NOT NULL,
        death_time_ms      INTEGER,
        pid                INTEGER NOT NULL,
        start_time         INTEGER NOT NULL,
        comm               TEXT    NOT NULL,
        cgroup             TEXT    NOT NULL,
        gpu_uuid           TEXT    NOT NULL,
        bytes              INTEGER,
        action             TEXT    NOT NULL,
        reason             TEXT    NOT NULL,
        outcome            TEXT    NOT NULL DEFAULT 'pending',
        bytes_freed        INTEGER,
        time_to_reclaim_ms INTEGER,
        detail             TEXT,
        resolved_time_ms   INTEGER
    );
    CREATE INDEX decisions_time_ms ON decisions (time_ms);
    CREATE INDEX decisions_service ON decisions (service);
    CREATE INDEX decisions_outcome ON decisions (outcome);
    CREATE INDEX decisions_pid ON decisions (pid);
    CREATE TABLE lineage (
        pid             INTEGER NOT NULL,
        start_time      INTEGER NOT NULL,
        service         TEXT    NOT NULL,
        root_pid        INTEGER NOT NULL,
        root_start_time INTEGER NOT NULL,
        PRIMARY KEY (pid, start_time)
    );",
    // 2: what made a holder its service's (the matcher, and the process it recognised).
    "ALTER TABLE lineage ADD COLUMN matched_pid INTEGER;
    ALTER TABLE lineage ADD COLUMN matched_by TEXT;",
];

const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const LINEAGE_COLUMNS: &str =
    "pid, start_time, service, root_pid, root_start_time, matched_pid, matched_by";

const DEFAULT_QUERY_LIMIT: u32 = 100;
/// One more than the API's largest page: it asks for a row beyond the page to know that a
/// next page exists.
pub const MAX_QUERY_LIMIT: u32 = 1001;

const RECORD_COLUMNS: &str = "id, time_ms, service, session_kind, session_key, death_cause, \
    death_time_ms, pid, start_time, comm, cgroup, gpu_uuid, bytes, action, reason, outcome, \
    bytes_freed, time_to_reclaim_ms, detail, resolved_time_ms";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot create the ledger directory {path}: {source}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the ledger at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "ledger at {path} has schema version {found}, newer than this reclaimd understands ({supported}); refusing to touch it"
    )]
    TooNew {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("ledger write failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl ToSql for Action {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for Action {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        Action::parse(s).ok_or_else(|| FromSqlError::Other(format!("unknown action {s:?}").into()))
    }
}

impl FromSql for MatchKind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        s.parse()
            .map_err(|_| FromSqlError::Other(format!("unknown matcher {s:?}").into()))
    }
}

impl ToSql for Outcome {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for Outcome {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        Outcome::parse(s)
            .ok_or_else(|| FromSqlError::Other(format!("unknown outcome {s:?}").into()))
    }
}

/// Filters for [`Ledger::query`]; all optional. Times filter on the decision time, as the
/// half-open range `[since_ms, until_ms)` so adjacent windows neither overlap nor leave gaps.
/// Results come newest first (by id); `before_id` is the paging cursor (rows with
/// `id < before_id`); `limit` defaults to 100 and is capped at [`MAX_QUERY_LIMIT`].
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub service: Option<String>,
    pub outcome: Option<Outcome>,
    pub pid: Option<u32>,
    pub before_id: Option<i64>,
    pub limit: Option<u32>,
}

pub struct Ledger {
    conn: Connection,
    path: PathBuf,
}

impl Ledger {
    /// Opens or creates the ledger (parent directories get mode 0750: the ledger names
    /// processes and services, which is not for every local user), sets WAL +
    /// `synchronous=FULL`, and migrates the schema. A ledger written by a newer reclaimd is
    /// refused with [`LedgerError::TooNew`] before anything is written to it.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let shown = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|source| LedgerError::CreateDir {
                    path: dir.display().to_string(),
                    source,
                })?;
        }
        let open_err = |source| LedgerError::Open {
            path: shown.clone(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        // Another reclaimd (or `reclaimd ledger` reading it) may hold the lock briefly.
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;

        let found = user_version(&conn).map_err(open_err)?;
        if found > SCHEMA_VERSION {
            return Err(LedgerError::TooNew {
                path: shown.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }

        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %shown, mode, "ledger is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;

        migrate(&mut conn, &shown)?;
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the decision and returns its id. A Reclaim starts "pending" (the action comes
    /// next); a Skip has no action to wait for, so it is stored already "skipped", resolved
    /// at the decision time with the reason as its detail.
    pub fn record_decision(&self, d: &Decision) -> Result<i64, LedgerError> {
        let (outcome, detail, resolved) = match d.action {
            Action::Reclaim => (Outcome::Pending, None, None),
            Action::Skip => (Outcome::Skipped, Some(d.reason.as_str()), Some(d.time_ms)),
            Action::None => (Outcome::Released, Some(d.reason.as_str()), Some(d.time_ms)),
        };
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO decisions (time_ms, service, session_kind, session_key, death_cause,
                death_time_ms, pid, start_time, comm, cgroup, gpu_uuid, bytes, action, reason,
                outcome, detail, resolved_time_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?;
        stmt.execute(params![
            d.time_ms,
            d.service,
            d.session_kind,
            d.session_key,
            d.death_cause,
            d.death_time_ms,
            d.pid,
            u64_to_sql(d.start_time),
            d.comm,
            d.cgroup,
            d.gpu_uuid,
            d.bytes.map(u64_to_sql),
            d.action,
            d.reason,
            outcome,
            detail,
            resolved,
        ])?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Writes the outcome of decision `id`. Only a "pending" row is written, so a late or
    /// repeated resolution can never overwrite the first: it returns Ok(false) and changes
    /// nothing (as does an unknown id, or a resolution whose outcome is itself "pending").
    pub fn resolve(&self, id: i64, r: &Resolution) -> Result<bool, LedgerError> {
        if r.outcome == Outcome::Pending {
            tracing::warn!(id, "ignoring a resolution to \"pending\"");
            return Ok(false);
        }
        let mut stmt = self.conn.prepare_cached(
            "UPDATE decisions SET outcome = ?1, bytes_freed = ?2, time_to_reclaim_ms = ?3,
                detail = ?4, resolved_time_ms = ?5
             WHERE id = ?6 AND outcome = 'pending'",
        )?;
        let changed = stmt.execute(params![
            r.outcome,
            r.bytes_freed.map(u64_to_sql),
            r.time_to_reclaim_ms,
            r.detail,
            r.time_ms,
            id,
        ])?;
        Ok(changed == 1)
    }

    pub fn get(&self, id: i64) -> Result<Option<Record>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM decisions WHERE id = ?1"
        ))?;
        Ok(stmt.query_row([id], record_from_row).optional()?)
    }

    pub fn query(&self, q: &Query) -> Result<Vec<Record>, LedgerError> {
        let mut sql = format!("SELECT {RECORD_COLUMNS} FROM decisions WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::new();
        let mut filter = |clause: &str, value: Value| {
            sql.push_str(clause);
            args.push(value);
        };
        if let Some(t) = q.since_ms {
            filter(" AND time_ms >= ?", Value::Integer(t));
        }
        if let Some(t) = q.until_ms {
            filter(" AND time_ms < ?", Value::Integer(t));
        }
        if let Some(s) = &q.service {
            filter(" AND service = ?", Value::Text(s.clone()));
        }
        if let Some(o) = q.outcome {
            filter(" AND outcome = ?", Value::Text(o.as_str().to_owned()));
        }
        if let Some(p) = q.pid {
            filter(" AND pid = ?", Value::Integer(p.into()));
        }
        if let Some(id) = q.before_id {
            filter(" AND id < ?", Value::Integer(id));
        }
        let limit = q.limit.unwrap_or(DEFAULT_QUERY_LIMIT).min(MAX_QUERY_LIMIT);
        filter(" ORDER BY id DESC LIMIT ?", Value::Integer(limit.into()));

        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), record_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Rows still "pending" — the daemon died mid-action — oldest first.
    pub fn pending(&self) -> Result<Vec<Record>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RECORD_COLUMNS} FROM decisions WHERE outcome = 'pending' ORDER BY id ASC"
        ))?;
        let rows = stmt.query_map([], record_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks every pending row "interrupted" with `detail` at `now_ms`, in one transaction;
    /// returns how many. Meant for startup, after the caller has looked at [`Ledger::pending`]
    /// (whether the action took effect is unknown, so nothing is claimed about it).
    pub fn recover_interrupted(&self, now_ms: i64, detail: &str) -> Result<usize, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE decisions SET outcome = 'interrupted', detail = ?1, resolved_time_ms = ?2
             WHERE outcome = 'pending'",
        )?;
        let n = stmt.execute(params![detail, now_ms])?;
        if n > 0 {
            tracing::warn!(
                count = n,
                "marked decisions interrupted by a daemon restart"
            );
        }
        Ok(n)
    }

    /// Row counts by outcome, every outcome present (0 included) so metrics series never
    /// vanish.
    pub fn counts(&self) -> Result<Vec<(Outcome, u64)>, LedgerError> {
        let mut counts: Vec<(Outcome, u64)> = ALL_OUTCOMES.iter().map(|&o| (o, 0)).collect();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT outcome, COUNT(*) FROM decisions GROUP BY outcome")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let text: String = row.get(0)?;
            let n: i64 = row.get(1)?;
            match Outcome::parse(&text) {
                Some(o) => {
                    if let Some(slot) = counts.iter_mut().find(|(k, _)| *k == o) {
                        slot.1 = sql_to_u64(n);
                    }
                }
                None => tracing::warn!(outcome = text, "unknown outcome in the ledger"),
            }
        }
        Ok(counts)
    }

    /// Inserts or replaces the lineage of (pid, start_time).
    pub fn remember_lineage(&self, l: &Lineage) -> Result<(), LedgerError> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR REPLACE INTO lineage (pid, start_time, service, root_pid, root_start_time,
                 matched_pid, matched_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        stmt.execute(params![
            l.pid,
            u64_to_sql(l.start_time),
            l.service,
            l.root_pid,
            u64_to_sql(l.root_start_time),
            l.matched.map(|m| m.pid),
            l.matched.map(|m| m.by.as_str()),
        ])?;
        Ok(())
    }

    pub fn lineage(&self, pid: u32, start_time: u64) -> Result<Option<Lineage>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {LINEAGE_COLUMNS} FROM lineage WHERE pid = ?1 AND start_time = ?2"
        ))?;
        Ok(stmt
            .query_row(params![pid, u64_to_sql(start_time)], lineage_from_row)
            .optional()?)
    }

    /// Every lineage remembered: what a starting daemon restores its bindings from.
    pub fn lineages(&self) -> Result<Vec<Lineage>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {LINEAGE_COLUMNS} FROM lineage"))?;
        let rows = stmt.query_map([], lineage_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn forget_lineage(&self, pid: u32, start_time: u64) -> Result<(), LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM lineage WHERE pid = ?1 AND start_time = ?2")?;
        stmt.execute(params![pid, u64_to_sql(start_time)])?;
        Ok(())
    }

    /// Removes lineage of processes not in `alive`, in one transaction; returns how many.
    pub fn prune_lineage(&self, alive: &[(u32, u64)]) -> Result<usize, LedgerError> {
        let alive: HashSet<(i64, i64)> = alive
            .iter()
            .map(|&(pid, start)| (i64::from(pid), u64_to_sql(start)))
            .collect();
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let dead: Vec<(i64, i64)> = {
            let mut stmt = tx.prepare_cached("SELECT pid, start_time FROM lineage")?;
            let keys = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            keys.filter(|k| !matches!(k, Ok(k) if alive.contains(k)))
                .collect::<Result<_, _>>()?
        };
        {
            let mut stmt =
                tx.prepare_cached("DELETE FROM lineage WHERE pid = ?1 AND start_time = ?2")?;
            for (pid, start) in &dead {
                stmt.execute(params![pid, start])?;
            }
        }
        tx.commit()?;
        Ok(dead.len())
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// Applies each pending migration in its own IMMEDIATE transaction, re-reading the version
/// inside it, so two daemons starting at once cannot both apply the same step.
fn migrate(conn: &mut Connection, path: &str) -> Result<(), LedgerError> {
    let open_err = |source| LedgerError::Open {
        path: path.to_owned(),
        source,
    };
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(open_err)?;
        let version = user_version(&tx).map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(LedgerError::TooNew {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let Some(sql) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            return Ok(());
        };
        tracing::info!(
            path,
            from = version,
            to = version + 1,
            "migrating the ledger schema"
        );
        tx.execute_batch(sql).map_err(open_err)?;
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(open_err)?;
        tx.commit().map_err(open_err)?;
    }
}

/// SQLite integers are i64; u64 values beyond that cannot occur in practice, so clamp
/// rather than fail.
fn u64_to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn sql_to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn sql_to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<Record> {
    let outcome: Outcome = row.get("outcome")?;
    let resolved: Option<i64> = row.get("resolved_time_ms")?;
    let resolution = match (outcome, resolved) {
        (Outcome::Pending, _) | (_, None) => None,
        (_, Some(time_ms)) => Some(Resolution {
            outcome,
            bytes_freed: row.get::<_, Option<i64>>("bytes_freed")?.map(sql_to_u64),
            time_to_reclaim_ms: row.get("time_to_reclaim_ms")?,
            detail: row.get::<_, Option<String>>("detail")?.unwrap_or_default(),
            time_ms,
        }),
    };
    Ok(Record {
        id: row.get("id")?,
        decision: Decision {
            time_ms: row.get("time_ms")?,
            service: row.get("service")?,
            session_kind: row.get("session_kind")?,
            session_key: row.get("session_key")?,
            death_cause: row.get("death_cause")?,
            death_time_ms: row.get("death_time_ms")?,
            pid: sql_to_u32(row.get("pid")?),
            start_time: sql_to_u64(row.get("start_time")?),
            comm: row.get("comm")?,
            cgroup: row.get("cgroup")?,
            gpu_uuid: row.get("gpu_uuid")?,
            bytes: row.get::<_, Option<i64>>("bytes")?.map(sql_to_u64),
            action: row.get("action")?,
            reason: row.get("reason")?,
        },
        outcome,
        resolution,
    })
}

fn lineage_from_row(row: &Row<'_>) -> rusqlite::Result<Lineage> {
    Ok(Lineage {
        pid: sql_to_u32(row.get("pid")?),
        start_time: sql_to_u64(row.get("start_time")?),
        service: row.get("service")?,
        root_pid: sql_to_u32(row.get("root_pid")?),
        root_start_time: sql_to_u64(row.get("root_start_time")?),
        matched: matched_from_row(row)?,
    })
}

/// The lineage's matcher; `None` in rows written before schema version 2.
fn matched_from_row(row: &Row<'_>) -> rusqlite::Result<Option<Matched>> {
    let pid: Option<i64> = row.get("matched_pid")?;
    let by: Option<MatchKind> = row.get("matched_by")?;
    Ok(pid.zip(by).map(|(pid, by)| Matched {
        pid: sql_to_u32(pid),
        by,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "reclaimd-ledger-{tag}-{}-{}-{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn db(&self) -> PathBuf {
            self.0.join("ledger.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn decision(time_ms: i64, service: &str, pid: u32, action: Action) -> Decision {
        Decision {
            time_ms,
            service: service.to_owned(),
            session_kind: "connection".to_owned(),
            session_key: format!("sock:0xffff8881:10.0.0.1:8000->10.0.0.2:{pid}"),
            death_cause: "peer closed (CLOSE_WAIT)".to_owned(),
            death_time_ms: Some(time_ms - 10_500),
            pid,
            start_time: 987_654_321,
            comm: "python3".to_owned(),
            cgroup: "/system.slice/vllm.service".to_owned(),
            gpu_uuid: "GPU-aaaa,GPU-bbbb".to_owned(),
            bytes: Some(20 << 30),
            action,
            reason: "orphaned past grace 10s".to_owned(),
        }
    }

    fn resolution(outcome: Outcome, time_ms: i64) -> Resolution {
        Resolution {
            outcome,
            bytes_freed: Some(20 << 30),
            time_to_reclaim_ms: Some(10_620),
            detail: "SIGTERM; exited after 120 ms; NVML no longer lists it".to_owned(),
            time_ms,
        }
    }

    fn raw_user_version(path: &Path) -> i64 {
        user_version(&Connection::open(path).unwrap()).unwrap()
    }

    #[test]
    fn decision_then_resolution_round_trips() {
        let dir = TempDir::new("roundtrip");
        let ledger = Ledger::open(&dir.db()).unwrap();
        assert_eq!(ledger.path(), dir.db());

        let mut d = decision(1_700_000_000_000, "vllm", 4242, Action::Reclaim);
        d.start_time = u64::MAX; // clamped, not a panic
        let id = ledger.record_decision(&d).unwrap();
        let stored = ledger.get(id).unwrap().unwrap();
        let mut expected_d = d.clone();
        expected_d.start_time = i64::MAX as u64;
        assert_eq!(
            stored,
            Record {
                id,
                decision: expected_d.clone(),
                outcome: Outcome::Pending,
                resolution: None,
            }
        );

        let r = resolution(Outcome::Reclaimed, 1_700_000_000_150);
        assert!(ledger.resolve(id, &r).unwrap());
        let want = Record {
            id,
            decision: expected_d,
            outcome: Outcome::Reclaimed,
            resolution: Some(r),
        };
        assert_eq!(ledger.get(id).unwrap().unwrap(), want);
        assert_eq!(ledger.query(&Query::default()).unwrap(), vec![want]);
        assert_eq!(ledger.get(id + 1).unwrap(), None);

        // Optional fields absent round-trip as None.
        let mut bare = decision(1_700_000_001_000, "vllm", 4243, Action::Reclaim);
        bare.death_time_ms = None;
        bare.bytes = None;
        let bare_id = ledger.record_decision(&bare).unwrap();
        let r = Resolution {
            outcome: Outcome::Failed,
            bytes_freed: None,
            time_to_reclaim_ms: None,
            detail: "EPERM".to_owned(),
            time_ms: 1_700_000_001_500,
        };
        assert!(ledger.resolve(bare_id, &r).unwrap());
        let got = ledger.get(bare_id).unwrap().unwrap();
        assert_eq!(got.decision, bare);
        assert_eq!(got.resolution, Some(r));
    }

    #[test]
    fn skip_is_stored_as_skipped() {
        let dir = TempDir::new("skip");
        let ledger = Ledger::open(&dir.db()).unwrap();
        let mut d = decision(1_000, "vllm", 7, Action::Skip);
        d.reason = "report mode".to_owned();
        let id = ledger.record_decision(&d).unwrap();
        let got = ledger.get(id).unwrap().unwrap();
        assert_eq!(got.outcome, Outcome::Skipped);
        assert_eq!(
            got.resolution,
            Some(Resolution {
                outcome: Outcome::Skipped,
                bytes_freed: None,
                time_to_reclaim_ms: None,
                detail: "report mode".to_owned(),
                time_ms: 1_000,
            })
        );
        assert!(ledger.pending().unwrap().is_empty());
        // Already resolved: a later resolution changes nothing.
        assert!(
            !ledger
                .resolve(id, &resolution(Outcome::Reclaimed, 2_000))
                .unwrap()
        );
        assert_eq!(ledger.get(id).unwrap().unwrap(), got);
    }

    #[test]
    fn resolving_twice_is_a_no_op() {
        let dir = TempDir::new("twice");
        let ledger = Ledger::open(&dir.db()).unwrap();
        let id = ledger
            .record_decision(&decision(1_000, "vllm", 7, Action::Reclaim))
            .unwrap();
        assert!(
            ledger
                .resolve(id, &resolution(Outcome::Released, 2_000))
                .unwrap()
        );
        let first = ledger.get(id).unwrap().unwrap();
        assert!(
            !ledger
                .resolve(id, &resolution(Outcome::Failed, 3_000))
                .unwrap()
        );
        assert_eq!(ledger.get(id).unwrap().unwrap(), first);
        // Unknown ids and "pending" resolutions write nothing either.
        assert!(
            !ledger
                .resolve(id + 100, &resolution(Outcome::Failed, 3_000))
                .unwrap()
        );
        let other = ledger
            .record_decision(&decision(1_000, "vllm", 8, Action::Reclaim))
            .unwrap();
        assert!(
            !ledger
                .resolve(other, &resolution(Outcome::Pending, 3_000))
                .unwrap()
        );
        assert_eq!(
            ledger.get(other).unwrap().unwrap().outcome,
            Outcome::Pending
        );
    }

    /// A ledger of 30 decisions, one a second: even ones "vllm", odd ones "triton", pids
    /// 100 to 102 in turn, every fifth reclaimed and the rest pending. Returns their ids.
    fn thirty_decisions(dir: &TempDir) -> (Ledger, Vec<i64>) {
        let ledger = Ledger::open(&dir.db()).unwrap();
        let mut ids = Vec::new();
        for i in 0..30i64 {
            let service = if i % 2 == 0 { "vllm" } else { "triton" };
            let pid = 100 + (i % 3) as u32;
            let id = ledger
                .record_decision(&decision(i * 1_000, service, pid, Action::Reclaim))
                .unwrap();
            if i % 5 == 0 {
                ledger
                    .resolve(id, &resolution(Outcome::Reclaimed, i * 1_000 + 1))
                    .unwrap();
            }
            ids.push(id);
        }
        (ledger, ids)
    }

    fn ids_of(ledger: &Ledger, q: Query) -> Vec<i64> {
        ledger.query(&q).unwrap().iter().map(|r| r.id).collect()
    }

    #[test]
    fn query_orders_newest_first_within_a_window() {
        let dir = TempDir::new("query-order");
        let (ledger, ids) = thirty_decisions(&dir);

        let all = ids_of(&ledger, Query::default());
        let mut newest_first = ids.clone();
        newest_first.reverse();
        assert_eq!(all, newest_first);

        // [since, until)
        let window = ids_of(
            &ledger,
            Query {
                since_ms: Some(5_000),
                until_ms: Some(10_000),
                ..Query::default()
            },
        );
        assert_eq!(window, (5..10).rev().map(|i| ids[i]).collect::<Vec<_>>());
    }

    #[test]
    fn query_filters() {
        let dir = TempDir::new("query-filters");
        let (ledger, ids) = thirty_decisions(&dir);

        let vllm = ledger
            .query(&Query {
                service: Some("vllm".to_owned()),
                ..Query::default()
            })
            .unwrap();
        assert_eq!(vllm.len(), 15);
        assert!(vllm.iter().all(|r| r.decision.service == "vllm"));

        let reclaimed = ledger
            .query(&Query {
                outcome: Some(Outcome::Reclaimed),
                ..Query::default()
            })
            .unwrap();
        assert_eq!(reclaimed.len(), 6);
        assert!(reclaimed.iter().all(|r| r.outcome == Outcome::Reclaimed));

        let by_pid = ledger
            .query(&Query {
                pid: Some(101),
                ..Query::default()
            })
            .unwrap();
        assert_eq!(by_pid.len(), 10);
        assert!(by_pid.iter().all(|r| r.decision.pid == 101));

        let combined = ids_of(
            &ledger,
            Query {
                service: Some("vllm".to_owned()),
                outcome: Some(Outcome::Pending),
                pid: Some(100),
                since_ms: Some(1_000),
                ..Query::default()
            },
        );
        // vllm = even i, pid 100 = i%3==0, pending = i%5!=0, i >= 1: 6, 12, 18, 24.
        assert_eq!(combined, vec![ids[24], ids[18], ids[12], ids[6]]);
    }

    #[test]
    fn query_pages_cover_everything_once() {
        let dir = TempDir::new("query-paging");
        let (ledger, ids) = thirty_decisions(&dir);
        let mut newest_first = ids.clone();
        newest_first.reverse();

        // Paging: disjoint pages that together are everything, newest first.
        let mut paged = Vec::new();
        let mut cursor = None;
        loop {
            let page = ids_of(
                &ledger,
                Query {
                    before_id: cursor,
                    limit: Some(7),
                    ..Query::default()
                },
            );
            assert!(page.len() <= 7);
            let Some(&last) = page.last() else { break };
            paged.extend(page);
            cursor = Some(last);
        }
        assert_eq!(paged, newest_first);
    }

    #[test]
    fn query_limits() {
        let dir = TempDir::new("query-limits");
        let (ledger, _) = thirty_decisions(&dir);

        // Limit 0 means none; the cap is MAX_QUERY_LIMIT.
        assert!(
            ids_of(
                &ledger,
                Query {
                    limit: Some(0),
                    ..Query::default()
                }
            )
            .is_empty()
        );
        for i in 0..1_100 {
            ledger
                .record_decision(&decision(100_000 + i, "bulk", 1, Action::Skip))
                .unwrap();
        }
        assert_eq!(ids_of(&ledger, Query::default()).len(), 100);
        assert_eq!(
            ids_of(
                &ledger,
                Query {
                    limit: Some(u32::MAX),
                    ..Query::default()
                }
            )
            .len(),
            MAX_QUERY_LIMIT as usize
        );
    }

    const CHILD_PATH_ENV: &str = "RECLAIMD_LEDGER_TEST_CHILD_PATH";
    const CHILD_COUNT_ENV: &str = "RECLAIMD_LEDGER_TEST_CHILD_COUNT";

    /// Not a test on its own: the child process of `survives_sigkill_after_record_decision`.
    /// Without its environment variables it does nothing.
    #[test]
    #[ignore]
    fn durability_child() {
        let (Ok(path), Ok(count)) = (
            std::env::var(CHILD_PATH_ENV),
            std::env::var(CHILD_COUNT_ENV),
        ) else {
            return;
        };
        let count: i64 = count.parse().unwrap();
        let ledger = Ledger::open(Path::new(&path)).unwrap();
        for i in 0..count {
            ledger
                .record_decision(&decision(i, "vllm", 5_000 + i as u32, Action::Reclaim))
                .unwrap();
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "written {count}").unwrap();
        out.flush().unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    #[test]
    fn survives_sigkill_after_record_decision() {
        const N: usize = 25;
        let dir = TempDir::new("sigkill");
        let module = module_path!();
        let module = module.split_once("::").map_or(module, |(_, rest)| rest);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("{module}::durability_child"),
                "--nocapture",
                "--ignored",
            ])
            .env(CHILD_PATH_ENV, dir.db())
            .env(CHILD_COUNT_ENV, N.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let want = format!("written {N}");
        loop {
            match lines.next() {
                Some(Ok(line)) if line.trim() == want => break,
                Some(Ok(_)) => continue,
                end => {
                    let _ = child.kill();
                    panic!("child stopped before writing ({end:?}): {:?}", child.wait());
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let ledger = Ledger::open(&dir.db()).unwrap();
        let pending = ledger.pending().unwrap();
        assert_eq!(pending.len(), N);
        assert!(
            pending.windows(2).all(|w| w[0].id < w[1].id),
            "oldest first"
        );
        assert!(pending.iter().all(|r| r.outcome == Outcome::Pending));

        assert_eq!(
            ledger
                .recover_interrupted(99_000, "daemon restarted")
                .unwrap(),
            N
        );
        assert!(ledger.pending().unwrap().is_empty());
        let rows = ledger.query(&Query::default()).unwrap();
        assert_eq!(rows.len(), N);
        for r in rows {
            assert_eq!(r.outcome, Outcome::Interrupted);
            let res = r.resolution.unwrap();
            assert_eq!(res.detail, "daemon restarted");
            assert_eq!(res.time_ms, 99_000);
            assert_eq!(res.bytes_freed, None);
        }
        assert_eq!(ledger.recover_interrupted(100_000, "again").unwrap(), 0);
    }

    #[test]
    fn reopen_keeps_rows_and_schema() {
        let dir = TempDir::new("reopen");
        let id = {
            let ledger = Ledger::open(&dir.db()).unwrap();
            ledger
                .record_decision(&decision(1_000, "vllm", 7, Action::Reclaim))
                .unwrap()
        };
        assert_eq!(raw_user_version(&dir.db()), SCHEMA_VERSION);
        let journal: String = Connection::open(dir.db())
            .unwrap()
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");

        // The migrations have no IF NOT EXISTS: re-running them would fail this open.
        let ledger = Ledger::open(&dir.db()).unwrap();
        assert_eq!(ledger.get(id).unwrap().unwrap().outcome, Outcome::Pending);
        drop(ledger);
        assert_eq!(raw_user_version(&dir.db()), SCHEMA_VERSION);
    }

    #[test]
    fn a_version_1_ledger_keeps_its_lineage_without_a_matcher() {
        let dir = TempDir::new("v1");
        {
            let conn = Connection::open(dir.db()).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute("INSERT INTO lineage VALUES (10, 500, 'vllm', 1, 1000)", [])
                .unwrap();
        }
        let ledger = Ledger::open(&dir.db()).unwrap();
        assert_eq!(raw_user_version(&dir.db()), SCHEMA_VERSION);
        let old = Lineage {
            pid: 10,
            start_time: 500,
            service: "vllm".to_owned(),
            root_pid: 1,
            root_start_time: 1_000,
            matched: None,
        };
        assert_eq!(ledger.lineages().unwrap(), vec![old]);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = TempDir::new("toonew");
        drop(Ledger::open(&dir.db()).unwrap());
        Connection::open(dir.db())
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        match Ledger::open(&dir.db()) {
            Err(LedgerError::TooNew {
                found, supported, ..
            }) => {
                assert_eq!(found, SCHEMA_VERSION + 1);
                assert_eq!(supported, SCHEMA_VERSION);
            }
            other => panic!("expected TooNew, got {:?}", other.err()),
        }
        assert_eq!(raw_user_version(&dir.db()), SCHEMA_VERSION + 1);
    }

    #[test]
    fn open_creates_parent_directories() {
        let dir = TempDir::new("mkdir");
        let path = dir.0.join("var/lib/reclaimd/ledger.db");
        let ledger = Ledger::open(&path).unwrap();
        ledger
            .record_decision(&decision(1, "vllm", 7, Action::Skip))
            .unwrap();
        assert!(path.exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.0.join("var/lib/reclaimd"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7027, 0, "at most 0750, got {mode:o}");
    }

    #[test]
    fn unwritable_path_is_an_error() {
        match Ledger::open(Path::new("/proc/reclaimd-no-such-dir/ledger.db")) {
            Err(LedgerError::CreateDir { .. } | LedgerError::Open { .. }) => {}
            other => panic!("expected CreateDir or Open, got {:?}", other.err()),
        }
        match Ledger::open(Path::new("/proc/reclaimd-ledger.db")) {
            Err(LedgerError::CreateDir { .. } | LedgerError::Open { .. }) => {}
            other => panic!("expected CreateDir or Open, got {:?}", other.err()),
        }
    }

    #[test]
    fn lineage_remember_get_forget_prune() {
        let dir = TempDir::new("lineage");
        let ledger = Ledger::open(&dir.db()).unwrap();
        let l = |pid: u32, start_time: u64, root_pid: u32| Lineage {
            pid,
            start_time,
            service: "vllm".to_owned(),
            root_pid,
            root_start_time: 1_000,
            matched: Some(Matched {
                pid: root_pid,
                by: MatchKind::Cmdline,
            }),
        };
        assert_eq!(ledger.lineage(10, 500).unwrap(), None);
        ledger.remember_lineage(&l(10, 500, 1)).unwrap();
        assert_eq!(ledger.lineage(10, 500).unwrap(), Some(l(10, 500, 1)));
        // Same pid, other start time: another process.
        assert_eq!(ledger.lineage(10, 501).unwrap(), None);
        // Replace.
        ledger.remember_lineage(&l(10, 500, 2)).unwrap();
        assert_eq!(ledger.lineage(10, 500).unwrap(), Some(l(10, 500, 2)));

        ledger.forget_lineage(10, 500).unwrap();
        assert_eq!(ledger.lineage(10, 500).unwrap(), None);
        ledger.forget_lineage(10, 500).unwrap(); // forgetting the unknown is fine

        for (pid, start) in [(20, 1), (21, 2), (22, 3), (22, 4)] {
            ledger.remember_lineage(&l(pid, start, 1)).unwrap();
        }
        assert_eq!(
            ledger.prune_lineage(&[(20, 1), (22, 4), (99, 9)]).unwrap(),
            2
        );
        assert!(ledger.lineage(20, 1).unwrap().is_some());
        assert!(ledger.lineage(21, 2).unwrap().is_none());
        assert!(ledger.lineage(22, 3).unwrap().is_none());
        assert!(ledger.lineage(22, 4).unwrap().is_some());
        assert_eq!(ledger.prune_lineage(&[]).unwrap(), 2);
        assert_eq!(ledger.prune_lineage(&[]).unwrap(), 0);
    }

    #[test]
    fn counts_cover_every_outcome() {
        let dir = TempDir::new("counts");
        let ledger = Ledger::open(&dir.db()).unwrap();
        let empty = ledger.counts().unwrap();
        assert_eq!(
            empty,
            ALL_OUTCOMES.iter().map(|&o| (o, 0)).collect::<Vec<_>>()
        );

        let reclaim = || {
            ledger
                .record_decision(&decision(1, "vllm", 7, Action::Reclaim))
                .unwrap()
        };
        reclaim();
        let a = reclaim();
        ledger
            .resolve(a, &resolution(Outcome::Reclaimed, 2))
            .unwrap();
        let b = reclaim();
        ledger.resolve(b, &resolution(Outcome::Failed, 2)).unwrap();
        ledger
            .record_decision(&decision(1, "vllm", 7, Action::Skip))
            .unwrap();
        ledger
            .record_decision(&decision(1, "vllm", 7, Action::Skip))
            .unwrap();

        let counts = ledger.counts().unwrap();
        assert_eq!(
            counts,
            vec![
                (Outcome::Pending, 1),
                (Outcome::Reclaimed, 1),
                (Outcome::Released, 0),
                (Outcome::Failed, 1),
                (Outcome::Skipped, 2),
                (Outcome::Interrupted, 0),
            ]
        );
    }

    #[test]
    fn outcome_text_matches_serde() {
        for o in ALL_OUTCOMES {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
            assert_eq!(
                serde_json::to_string(&o).unwrap(),
                format!("\"{}\"", o.as_str())
            );
        }
        assert_eq!(Outcome::parse("nope"), None);
        for a in [Action::Reclaim, Action::Skip] {
            assert_eq!(Action::parse(a.as_str()), Some(a));
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                format!("\"{}\"", a.as_str())
            );
        }
    }
}
