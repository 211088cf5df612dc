//! The checkpoint store: what the executor and the stages remember between runs. Stage states (a
//! serde enum) with fingerprints and timestamps, per-stage checkpoints, per-table progress, counters,
//! positions (LSNs, forward only), artifacts and a run log. The executor sees only the [`StateStore`]
//! trait; [`postgres::PgStore`] keeps it all in a PostgreSQL schema so any machine can resume or
//! report a migration.

mod lock;
pub mod memory;
pub mod postgres;

pub use lock::{LockHolder, RunnerLock, hostname};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::pg::lsn::Lsn;

/// The pseudo-stage of the store's own records: which database it created for itself.
pub(crate) const STORE_STAGE: &str = "(store)";
pub(crate) const CREATED_DATABASE_KEY: &str = "created_database";
/// The pseudo-stage of what the migration's checkpoints belong to (`run` or `rehearsal`).
pub(crate) const RUN_STAGE: &str = "(run)";
pub(crate) const MODE_KEY: &str = "mode";

/// A stage's lifecycle: `pending -> running -> done | failed`; a continuous stage (cdc) is also
/// `ready` once it has caught up, which satisfies its dependents while it keeps running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Pending,
    Running,
    Ready,
    Done,
    Failed,
}

impl StageState {
    pub fn as_str(self) -> &'static str {
        match self {
            StageState::Pending => "pending",
            StageState::Running => "running",
            StageState::Ready => "ready",
            StageState::Done => "done",
            StageState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<StageState> {
        Some(match s {
            "pending" => StageState::Pending,
            "running" => StageState::Running,
            "ready" => StageState::Ready,
            "done" => StageState::Done,
            "failed" => StageState::Failed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for StageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the store remembers of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageRecord {
    pub stage: String,
    pub kind: String,
    pub state: StageState,
    pub fingerprint: Option<String>,
    pub attempts: i32,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub error: Option<String>,
    pub detail: serde_json::Value,
}

/// A point in time, kept as seconds since the epoch, shown as RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Timestamp(pub f64);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        )
    }

    pub fn rfc3339(&self) -> String {
        let t = UNIX_EPOCH + Duration::from_secs_f64(self.0.max(0.0));
        humantime::format_rfc3339_seconds(t).to_string()
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

/// The store as the executor and stages use it.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Records the start of a run; returns its id.
    async fn begin_run(&self, args: &str) -> Result<i64>;
    /// Records the end of a run: `done`, `failed`, `interrupted`.
    async fn end_run(&self, run: i64, outcome: &str) -> Result<()>;
    /// Every stage the store knows of.
    async fn stages(&self) -> Result<Vec<StageRecord>>;
    /// Moves a stage to `state`. `running` stamps the start and counts an attempt; `done` and
    /// `failed` stamp the end. The fingerprint is recorded with every change.
    async fn set_stage(
        &self,
        stage: &str,
        kind: &str,
        state: StageState,
        fingerprint: &str,
        error: Option<&str>,
    ) -> Result<()>;
    /// Forgets a stage's state and its checkpoints, so it runs again from the start.
    async fn reset_stage(&self, stage: &str) -> Result<()>;
    /// Replaces a stage's detail (findings, summaries) shown by `status`.
    async fn set_stage_detail(&self, stage: &str, detail: &serde_json::Value) -> Result<()>;
    /// A stage's own checkpoint under `key` (for example one per database).
    async fn checkpoint(&self, stage: &str, key: &str) -> Result<Option<serde_json::Value>>;
    async fn put_checkpoint(&self, stage: &str, key: &str, value: &serde_json::Value)
    -> Result<()>;
    /// Appends to the run log.
    async fn event(&self, stage: Option<&str>, level: &str, message: &str) -> Result<()>;
    /// Moves a named position (an LSN such as `0/16B3748`) forward; a lower one is ignored. Returns
    /// the stored position.
    async fn advance_position(&self, name: &str, lsn: Lsn) -> Result<Lsn>;
    async fn position(&self, name: &str) -> Result<Option<Lsn>>;
    /// Stores an artifact (a schema dump section, a report), replacing an older one of that name.
    async fn put_artifact(&self, name: &str, content: &[u8]) -> Result<()>;
    async fn artifact(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Adds to a counter (scope: "" for the migration, or a database or table name).
    async fn add_counter(&self, scope: &str, name: &str, delta: i64) -> Result<i64>;
    /// Adds to several counters at once: `(scope, name, delta)`.
    async fn add_counters(&self, deltas: &[(String, String, i64)]) -> Result<()>;
    /// A counter's or gauge's value; `None` when it was never written.
    async fn counter(&self, scope: &str, name: &str) -> Result<Option<i64>>;
    /// Sets gauges (counters that hold a current value, such as a latency): `(scope, name, value)`.
    async fn set_counters(&self, values: &[(String, String, i64)]) -> Result<()>;
    /// Records the progress of one table (or one range or object) of a stage.
    async fn upsert_table(&self, progress: &TableProgress) -> Result<()>;
    /// Records the progress of many tables at once (one round trip, not one per table).
    async fn upsert_tables(&self, progress: &[TableProgress]) -> Result<()>;
    /// The recorded progress of a stage's tables (all stages when `None`).
    async fn tables(&self, stage: Option<&str>) -> Result<Vec<TableProgress>>;
    /// Records one point of the cdc lag profile of the current run (for `pgferry report`).
    async fn add_sample(&self, sample: &LagSample) -> Result<()>;

    // What commands, `status` and reports read back.

    /// Records an operator request (such as `cutover`) for the running stage to pick up; a second
    /// request of the same name keeps the first.
    async fn request(&self, name: &str, by: &str) -> Result<()>;
    /// When `name` was requested (RFC 3339, UTC), if it was.
    async fn requested(&self, name: &str) -> Result<Option<String>>;
    /// Every position: `(name, lsn)`, by name.
    async fn positions(&self) -> Result<Vec<(String, Lsn)>>;
    /// Every counter and gauge: `(scope, name, value)`, by scope and name.
    async fn counters(&self) -> Result<Vec<(String, String, i64)>>;
    /// The last `limit` entries of the run log, oldest first: `(at, stage, level, message)`.
    async fn events(&self, limit: i64) -> Result<Vec<(Timestamp, Option<String>, String, String)>>;
    /// Every checkpoint of a stage: `(key, value, updated at)`, by key.
    async fn checkpoints(&self, stage: &str)
    -> Result<Vec<(String, serde_json::Value, Timestamp)>>;
    /// The latest runs, newest first.
    async fn runs(&self, limit: i64) -> Result<Vec<RunRecord>>;
    /// One run with its mode (`run` or `rehearsal`).
    async fn run_with_mode(&self, id: i64) -> Result<Option<(RunRecord, String)>>;
    /// The cdc lag samples of a run, oldest first.
    async fn samples(&self, run: i64) -> Result<Vec<LagSample>>;
    /// Keeps a run's report (replacing an earlier one of the same run).
    async fn put_report(&self, run: i64, mode: &str, report: &serde_json::Value) -> Result<()>;
    /// Kept reports, newest first; only run `run` and runs of `mode` when given.
    async fn reports(
        &self,
        run: Option<i64>,
        mode: Option<&str>,
        limit: i64,
    ) -> Result<Vec<KeptReport>>;

    // The runner lock, the mode of the checkpoints, and what `reset` needs.

    /// Where the store lives, for messages.
    fn describe(&self) -> String;
    /// The server and database the store lives in (`(server key, database)`), when it lives in a
    /// database: `reset` must know whether a target database it drops holds the store.
    fn home(&self) -> Option<(String, String)>;
    /// Takes the runner lock (one runner per migration), held for as long as the returned guard
    /// lives, or says who holds it.
    async fn acquire_runner_lock(&self) -> Result<std::result::Result<RunnerLock, LockHolder>>;
    /// Who holds the runner lock right now, if anyone.
    async fn runner(&self) -> Result<Option<LockHolder>>;
    /// Records the mode of a run (`run` or `rehearsal`): in the run's record and as the mode of the
    /// checkpoints ([`StateStore::checkpoints_mode`]).
    async fn set_run_mode(&self, run: i64, mode: &str) -> Result<()>;
    /// Brings an existing store up to the current version (opening it does not).
    async fn upgrade(&self) -> Result<()>;
    /// Removes this migration's stage states, checkpoints, progress, counters, positions,
    /// artifacts, run log and requests: everything but its runs, reports and cdc lag samples (kept
    /// so rehearsals can be compared) and the record of the database the store created.
    async fn forget_migration(&self) -> Result<()>;
    /// Other migrations kept in the same store.
    async fn other_migrations(&self) -> Result<Vec<String>>;
    /// What `reset` keeps of this migration (runs, reports, cdc lag samples), as JSON: written to a
    /// file while the store's database is dropped, and given to [`StateStore::restore_kept`].
    async fn kept_rows(&self) -> Result<serde_json::Value>;
    /// Puts back what [`StateStore::kept_rows`] read (into a store created again by `reset`).
    async fn restore_kept(&self, kept: &serde_json::Value) -> Result<()>;

    /// What the stage states and checkpoints of this migration belong to: `run` or `rehearsal`
    /// (`None`: nothing recorded; a store from before rehearsals holding stages counts as `run`).
    async fn checkpoints_mode(&self) -> Result<Option<String>> {
        let v = self.checkpoint(RUN_STAGE, MODE_KEY).await?;
        if let Some(m) = v
            .as_ref()
            .and_then(|v| v.get("mode"))
            .and_then(serde_json::Value::as_str)
        {
            return Ok(Some(m.to_string()));
        }
        Ok((!self.stages().await?.is_empty()).then(|| "run".to_string()))
    }

    /// The database this store created on first use (its own), as `(server, database)`.
    async fn created_database(&self) -> Result<Option<(String, String)>> {
        let v = self.checkpoint(STORE_STAGE, CREATED_DATABASE_KEY).await?;
        let field = |k: &str| {
            v.as_ref()
                .and_then(|v| v.get(k))
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        };
        Ok(field("server").zip(field("database")))
    }

    /// The latest kept report of a run of `mode`: run id, when, report.
    async fn latest_report(
        &self,
        mode: &str,
    ) -> Result<Option<(i64, Timestamp, serde_json::Value)>> {
        Ok(self
            .reports(None, Some(mode), 1)
            .await?
            .into_iter()
            .next()
            .map(|r| (r.run_id, r.created_at, r.report)))
    }
}

/// A run report kept in the store.
#[derive(Debug, Clone)]
pub struct KeptReport {
    pub run_id: i64,
    pub mode: String,
    pub created_at: Timestamp,
    pub report: serde_json::Value,
}

/// One run of a migration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub host: Option<String>,
    pub pid: Option<i32>,
    pub outcome: Option<String>,
    pub args: Option<String>,
}

/// One point of a database's cdc lag profile, written every few seconds while cdc runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LagSample {
    pub stage: String,
    pub database: String,
    /// Seconds since the epoch (the store's clock when read back).
    pub at: f64,
    /// Source WAL insert position minus the applied position; `None` when the source could not be
    /// asked.
    pub lag_bytes: Option<i64>,
    /// The lag in seconds (as milliseconds) at `at`: the age of the oldest source commit not yet
    /// applied ([`crate::lag`]).
    pub latency_ms: Option<i64>,
    /// Changes sent to the target and not yet committed there.
    pub incoming: Option<i64>,
    /// Changes applied by this stream so far.
    pub applied: Option<i64>,
}

/// Where one table (or range, or object) of a stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableState {
    Queued,
    Copying,
    Copied,
    Failed,
}

impl TableState {
    pub fn as_str(self) -> &'static str {
        match self {
            TableState::Queued => "queued",
            TableState::Copying => "copying",
            TableState::Copied => "copied",
            TableState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> TableState {
        match s {
            "copying" => TableState::Copying,
            "copied" => TableState::Copied,
            "failed" => TableState::Failed,
            _ => TableState::Queued,
        }
    }
}

/// The progress of one table of a stage, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TableProgress {
    pub stage: String,
    pub database: String,
    /// `schema.table`, or `schema.table#range` for a part of a split table.
    pub table: String,
    pub state: TableState,
    pub rows: i64,
    pub bytes: i64,
    /// The source position the copy is consistent with.
    pub lsn: Option<Lsn>,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub error: Option<String>,
}
