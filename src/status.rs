//! The status model of a migration and its renderings: a compact table for people, and JSON with the
//! field names of Azure DMS's task output (`output[]` of `MigrationLevelOutput` and
//! `DatabaseLevelOutput` objects) so scripts written for it keep working.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::pg::lsn::Lsn;
use crate::plan::Plan;
use crate::plan::StageKind;
use crate::stages::validate::report::Report;
use crate::state::LockHolder;
use crate::state::RunRecord;
use crate::state::{StageRecord, StageState, TableProgress, TableState, Timestamp};

/// The progress entry full_load keeps for a database's large objects (not a table).
pub const LARGE_OBJECTS: &str = "large objects";

/// Whether a full_load progress entry is a whole table: not a range of a split table (`name#n`),
/// not the large objects.
fn is_table_entry(name: &str) -> bool {
    !name.contains('#') && name != LARGE_OBJECTS
}

/// Where the cutover stage records, per database, how far it got (its stage detail).
pub const CUTOVER_DETAIL_KEY: &str = "databases";

/// How far the cutover of one database got, recorded in the cutover stage's detail under
/// [`CUTOVER_DETAIL_KEY`]: `{"databases": {"<db>": {"phase": "cutting_over", "since": ...}}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutoverPhase {
    /// Waiting for `pgferry cutover` (manual) or for the lag condition (auto).
    ReadyToComplete,
    /// Approved, or the lag condition was met: waiting for the lag, fencing, draining, resyncing.
    CuttingOver,
}

/// A migration's state, with Azure DMS's names (`migrationState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MigrationState {
    Pending,
    FullLoad,
    CatchingUp,
    ReadyToComplete,
    CuttingOver,
    Completed,
    Failed,
}

impl MigrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Pending => "PENDING",
            MigrationState::FullLoad => "FULL_LOAD",
            MigrationState::CatchingUp => "CATCHING_UP",
            MigrationState::ReadyToComplete => "READY_TO_COMPLETE",
            MigrationState::CuttingOver => "CUTTING_OVER",
            MigrationState::Completed => "COMPLETED",
            MigrationState::Failed => "FAILED",
        }
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether anything works on the migration (`state` of the migration-level output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OverallState {
    /// Never run.
    Pending,
    /// A runner holds the migration's lock.
    Running,
    /// Every stage is done.
    Succeeded,
    /// A stage failed.
    Failed,
    /// Started, not finished, and no runner holds it (stopped, interrupted or killed): run again
    /// to resume.
    Stopped,
}

impl OverallState {
    pub fn as_str(self) -> &'static str {
        match self {
            OverallState::Pending => "PENDING",
            OverallState::Running => "RUNNING",
            OverallState::Succeeded => "SUCCEEDED",
            OverallState::Failed => "FAILED",
            OverallState::Stopped => "STOPPED",
        }
    }
}

impl std::fmt::Display for OverallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything `status` shows.
pub struct Status<'a> {
    pub plan: &'a Plan,
    pub store: String,
    pub records: Vec<StageRecord>,
    pub runner: Option<LockHolder>,
    pub last_run: Option<RunRecord>,
    pub events: Vec<(Timestamp, Option<String>, String, String)>,
    /// Per-table progress of every stage that records it (full_load).
    pub tables: Vec<TableProgress>,
    /// Counters of the store: `(scope, name, value)`.
    pub counters: Vec<(String, String, i64)>,
    /// Positions of the store: `(name, lsn)`.
    pub positions: Vec<(String, Lsn)>,
    /// What the source says of each database's replication slot, when it could be asked.
    pub slots: Vec<SlotInfo>,
    /// The latest validation (validate stage or `pgferry verify`), if any.
    pub validation: Option<Report>,
}

/// A replication slot as the source reports it, read by `status` (a short connection).
#[derive(Debug, Clone, Default)]
pub struct SlotInfo {
    pub database: String,
    /// The source's WAL insert position now.
    pub source_lsn: Option<Lsn>,
    /// The slot is missing (None with an error), or the source was unreachable.
    pub exists: bool,
    pub active: bool,
    pub confirmed_flush: Option<Lsn>,
    /// WAL the slot keeps on the source (current position minus restart_lsn), bytes.
    pub retained_bytes: Option<i64>,
    pub wal_status: Option<String>,
    pub error: Option<String>,
}

/// One stage row, in plan order.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub stage: String,
    pub kind: String,
    pub state: String,
    pub attempts: i32,
    #[serde(rename = "startedOn")]
    pub started_on: Option<String>,
    #[serde(rename = "endedOn")]
    pub ended_on: Option<String>,
    #[serde(rename = "durationSeconds")]
    pub duration_seconds: Option<f64>,
    pub error: Option<String>,
    pub detail: Value,
}

impl Status<'_> {
    pub fn rows(&self) -> Vec<StageRow> {
        self.plan
            .dag
            .order()
            .into_iter()
            .map(|i| {
                let s = &self.plan.stages[i];
                match self.records.iter().find(|r| r.stage == s.id) {
                    Some(r) => {
                        let mut state = r.state.to_string();
                        if matches!(r.state, StageState::Running | StageState::Ready)
                            && self.runner.is_none()
                        {
                            state = format!("{state} (no runner: run again to resume)");
                        }
                        let end = r.ended_at.or(
                            if matches!(r.state, StageState::Running | StageState::Ready) {
                                Some(Timestamp::now())
                            } else {
                                None
                            },
                        );
                        StageRow {
                            stage: s.id.clone(),
                            kind: s.kind.to_string(),
                            state,
                            attempts: r.attempts,
                            started_on: r.started_at.map(|t| t.rfc3339()),
                            ended_on: r.ended_at.map(|t| t.rfc3339()),
                            duration_seconds: match (r.started_at, end) {
                                (Some(a), Some(b)) => Some(((b.0 - a.0) * 10.0).round() / 10.0),
                                _ => None,
                            },
                            error: r.error.clone(),
                            detail: r.detail.clone(),
                        }
                    }
                    None => StageRow {
                        stage: s.id.clone(),
                        kind: s.kind.to_string(),
                        state: "pending".into(),
                        attempts: 0,
                        started_on: None,
                        ended_on: None,
                        duration_seconds: None,
                        error: None,
                        detail: Value::Null,
                    },
                }
            })
            .collect()
    }

    /// A counter's value (0 when never counted).
    pub fn counter(&self, scope: &str, name: &str) -> i64 {
        self.counters
            .iter()
            .find(|(s, n, _)| s == scope && n == name)
            .map(|c| c.2)
            .unwrap_or(0)
    }

    fn position(&self, name: &str) -> Option<Lsn> {
        self.positions.iter().find(|(n, _)| n == name).map(|p| p.1)
    }

    fn has_cdc(&self) -> bool {
        self.plan.stages.iter().any(|s| s.kind == StageKind::Cdc)
    }

    /// The Azure DMS change-data-capture fields of a database (or a `db.schema.table` scope).
    fn cdc_fields(&self, scope: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        let inserts = self.counter(scope, "cdcInsertCounter");
        let updates = self.counter(scope, "cdcUpdateCounter");
        let deletes = self.counter(scope, "cdcDeleteCounter");
        let total = self.counter(scope, "totalChangesApplied");
        m.insert("cdcInsertCounter".into(), json!(inserts));
        m.insert("cdcUpdateCounter".into(), json!(updates));
        m.insert("cdcDeleteCounter".into(), json!(deletes));
        m.insert("totalChangesApplied".into(), json!(total));
        m.insert("appliedChanges".into(), json!(total));
        if self.counter(scope, "managedApply") != 0 {
            m.insert(
                "applyMode".into(),
                json!({
                    "mode": "managed",
                    "heldTriggers": self.counter(scope, "heldTriggers"),
                    "heldForeignKeys": self.counter(scope, "heldForeignKeys"),
                    "unvalidatedForeignKeys": self.counter(scope, "unvalidatedForeignKeys"),
                }),
            );
        }
        m
    }

    /// cdc's lag for `db` now ([`crate::lag`]: seconds from cdc's gauge, bytes from the source's
    /// position and the applied one).
    pub fn lag(&self, db: &str) -> crate::lag::Lag {
        let source = self
            .slots
            .iter()
            .find(|s| s.database == db)
            .and_then(|s| s.source_lsn);
        let applied = self.position(&format!("cdc_applied:{db}"));
        let gauge = self
            .counters
            .iter()
            .any(|(s, n, _)| s == db && n == crate::lag::OLDEST_UNAPPLIED_GAUGE)
            .then(|| self.counter(db, crate::lag::OLDEST_UNAPPLIED_GAUGE));
        crate::lag::Lag::new(gauge, crate::lag::now_ms(), source, applied)
    }

    /// The live cdc fields of a database: positions, lag, retained WAL.
    fn cdc_live(&self, db: &str) -> serde_json::Map<String, Value> {
        let mut m = self.cdc_fields(db);
        m.insert(
            "incomingChanges".into(),
            json!(self.counter(db, "incomingChanges")),
        );
        let lag = self.lag(db);
        // Azure DMS's `latency` is the lag in seconds.
        m.insert("latency".into(), json!(lag.seconds));
        m.insert("lagSeconds".into(), json!(lag.seconds));
        m.insert("lagBytes".into(), json!(lag.bytes));
        m.insert("lag".into(), json!(lag.to_string()));
        m.insert(
            "appliedLsn".into(),
            json!(self.position(&format!("cdc_applied:{db}"))),
        );
        if let Some(slot) = self.slots.iter().find(|s| s.database == db) {
            m.insert("sourceLsn".into(), json!(slot.source_lsn));
            m.insert("slotActive".into(), json!(slot.active));
            m.insert("slotConfirmedLsn".into(), json!(slot.confirmed_flush));
            m.insert("retainedWalBytes".into(), json!(slot.retained_bytes));
            m.insert("walStatus".into(), json!(slot.wal_status));
            m.insert("slotError".into(), json!(slot.error));
        }
        m.insert("ddlStatements".into(), Value::Array(self.ddl(db)));
        m
    }

    /// The DDL cdc replayed (or ignored, or left to the operator) for `db`, in stream order, as
    /// its stage's detail lists it ([`crate::stages::cdc::ddl::DETAIL_KEY`]).
    pub fn ddl(&self, db: &str) -> Vec<Value> {
        self.plan
            .stages
            .iter()
            .filter(|s| s.kind == StageKind::Cdc)
            .filter_map(|s| self.records.iter().find(|r| r.stage == s.id))
            .filter_map(|r| {
                r.detail
                    .get(crate::stages::cdc::ddl::DETAIL_KEY)?
                    .get(db)?
                    .as_array()
                    .cloned()
            })
            .flatten()
            .collect()
    }

    fn record(&self, kind: StageKind) -> Option<&StageRecord> {
        let ids: Vec<&str> = self
            .plan
            .stages
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| s.id.as_str())
            .collect();
        self.records
            .iter()
            .find(|r| ids.contains(&r.stage.as_str()))
    }

    /// The cutover's phase for `db`, as the cutover stage records it in its detail.
    fn cutover_phase(&self, db: Option<&str>) -> Option<CutoverPhase> {
        let r = self.record(StageKind::Cutover)?;
        let dbs = r.detail.get(CUTOVER_DETAIL_KEY)?.as_object()?;
        let phases = dbs
            .iter()
            .filter(|(name, _)| db.is_none_or(|d| d == name.as_str()));
        phases
            .filter_map(|(_, v)| {
                v.get("phase")
                    .and_then(|p| serde_json::from_value::<CutoverPhase>(p.clone()).ok())
            })
            .max()
    }

    /// The migration's state in Azure DMS's vocabulary (for one database, or the whole migration).
    ///
    /// - `FAILED`: a stage failed (the run stopped there; fix and run again).
    /// - `COMPLETED`: every stage of the plan is done.
    /// - `CUTTING_OVER`: the cutover was approved (`pgferry cutover`, or an automatic cutover's lag
    ///   condition was met) or the source is fenced, until every stage is done.
    /// - `READY_TO_COMPLETE`: cdc has caught up; a manual cutover waits for `pgferry cutover`, an
    ///   automatic one for its lag condition.
    /// - `CATCHING_UP`: cdc is applying what was written since the load's snapshot.
    /// - `FULL_LOAD`: the load (or what follows it before cdc: indexes, constraints) is under way.
    /// - `PENDING`: nothing of the load has started (preflight, schema and provision count here).
    fn state_for(&self, db: Option<&str>) -> MigrationState {
        let planned: Vec<&str> = self.plan.stages.iter().map(|s| s.id.as_str()).collect();
        let records: Vec<&StageRecord> = self
            .records
            .iter()
            .filter(|r| planned.contains(&r.stage.as_str()))
            .collect();
        if records.iter().any(|r| r.state == StageState::Failed) {
            return MigrationState::Failed;
        }
        if !self.plan.stages.is_empty()
            && self.plan.stages.iter().all(|s| {
                records
                    .iter()
                    .any(|r| r.stage == s.id && r.state == StageState::Done)
            })
        {
            return MigrationState::Completed;
        }
        let is = |kind: StageKind, st: StageState| self.record(kind).is_some_and(|r| r.state == st);
        if is(StageKind::Cutover, StageState::Done)
            || (is(StageKind::Cutover, StageState::Running)
                && self.cutover_phase(db) == Some(CutoverPhase::CuttingOver))
        {
            return MigrationState::CuttingOver;
        }
        if is(StageKind::Cdc, StageState::Ready)
            || (is(StageKind::Cdc, StageState::Done) && self.has_cutover())
        {
            return MigrationState::ReadyToComplete;
        }
        if is(StageKind::Cdc, StageState::Running) {
            return MigrationState::CatchingUp;
        }
        if self.record(StageKind::FullLoad).is_some() {
            return MigrationState::FullLoad;
        }
        MigrationState::Pending
    }

    /// The migration's state (every database).
    pub fn migration_state(&self) -> MigrationState {
        self.state_for(None)
    }

    fn has_cutover(&self) -> bool {
        self.plan
            .stages
            .iter()
            .any(|s| s.kind == StageKind::Cutover)
    }

    /// Whether a runner works on the migration, or why none does.
    pub fn overall(&self) -> OverallState {
        match self.migration_state() {
            MigrationState::Failed => OverallState::Failed,
            MigrationState::Completed => OverallState::Succeeded,
            _ if self.runner.is_some() => OverallState::Running,
            _ if self.records.is_empty() => OverallState::Pending,
            _ => OverallState::Stopped,
        }
    }

    /// What to do next when no runner works on the migration (None while one does, or when done).
    pub fn next_step(&self) -> Option<String> {
        let path = &self.plan.path;
        match self.overall() {
            OverallState::Running | OverallState::Succeeded => None,
            OverallState::Pending => Some(format!("`pgferry run {path}` starts the migration")),
            OverallState::Stopped => {
                let how = match self.last_run.as_ref().and_then(|r| r.outcome.as_deref()) {
                    Some("interrupted") => "the last run was interrupted (SIGTERM or Ctrl-C)",
                    _ => "stopped or interrupted",
                };
                Some(format!(
                    "no runner works on it ({how}); `pgferry run {path}` resumes it from its checkpoints"
                ))
            }
            OverallState::Failed => {
                let failed: Vec<String> = self
                    .failed_stages()
                    .iter()
                    .map(|r| format!("`{}`", r.stage))
                    .collect();
                Some(format!(
                    "stage {} failed; fix the cause of its error (shown with it under `failed`), or the plan, then `pgferry run {path}` resumes from the checkpoints",
                    failed.join(", ")
                ))
            }
        }
    }

    /// The plan's stages that failed, in the records' order.
    fn failed_stages(&self) -> Vec<&StageRecord> {
        self.records
            .iter()
            .filter(|r| {
                r.state == StageState::Failed && self.plan.stages.iter().any(|s| s.id == r.stage)
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        let rows = self.rows();
        let started = self.records.iter().filter_map(|r| r.started_at).fold(
            None,
            |a: Option<Timestamp>, t| match a {
                Some(x) if x.0 <= t.0 => Some(x),
                _ => Some(t),
            },
        );
        let ended = if self.migration_state() == MigrationState::Completed {
            self.records
                .iter()
                .filter_map(|r| r.ended_at)
                .fold(None, |a: Option<Timestamp>, t| match a {
                    Some(x) if x.0 >= t.0 => Some(x),
                    _ => Some(t),
                })
        } else {
            None
        };
        let mut output = vec![json!({
            "resultType": "MigrationLevelOutput",
            "id": self.plan.name,
            "state": self.overall(),
            "migrationState": self.migration_state(),
            "nextStep": self.next_step(),
            "failedStages": self.failed_stages().iter().map(|r| json!({
                "stage": r.stage,
                "kind": self.plan.stages.iter().find(|s| s.id == r.stage).map(|s| s.kind.to_string()),
                "attempts": r.attempts,
                "endedOn": r.ended_at.map(|t| t.rfc3339()),
                "error": r.error,
            })).collect::<Vec<_>>(),
            "sourceServer": self.plan.source.display(),
            "targetServer": self.plan.target.display(),
            "startedOn": started.map(|t| t.rfc3339()),
            "endedOn": ended.map(|t| t.rfc3339()),
            "databaseCount": self.plan.databases.len(),
            "runner": self.runner.as_ref().map(|h| h.to_string()),
        })];
        let load_ids: Vec<&str> = self
            .plan
            .stages
            .iter()
            .filter(|s| s.kind == StageKind::FullLoad)
            .map(|s| s.id.as_str())
            .collect();
        for db in &self.plan.databases {
            // Whole tables only: ranges of split tables are progress detail.
            let tables: Vec<&TableProgress> = self
                .tables
                .iter()
                .filter(|t| {
                    t.database == db.name
                        && load_ids.contains(&t.stage.as_str())
                        && is_table_entry(&t.table)
                })
                .collect();
            let large_objects = self
                .tables
                .iter()
                .find(|t| {
                    t.database == db.name
                        && load_ids.contains(&t.stage.as_str())
                        && t.table == LARGE_OBJECTS
                })
                .map(|t| t.rows);
            let count = |st: TableState| tables.iter().filter(|t| t.state == st).count();
            let load_done = self
                .records
                .iter()
                .any(|r| load_ids.contains(&r.stage.as_str()) && r.state == StageState::Done);
            let mut database = json!({
                "resultType": "DatabaseLevelOutput",
                "databaseName": db.name,
                "targetDatabaseName": db.target,
                "migrationState": self.state_for(Some(&db.name)),
                "startedOn": started.map(|t| t.rfc3339()),
                "endedOn": ended.map(|t| t.rfc3339()),
                "fullLoadCompletedTables": count(TableState::Copied),
                "fullLoadLoadingTables": count(TableState::Copying),
                "fullLoadQueuedTables": count(TableState::Queued),
                "fullLoadErroredTables": count(TableState::Failed),
                "fullLoadTotalRows": tables.iter().map(|t| t.rows).sum::<i64>(),
                "fullLoadTotalVolumeBytes": tables.iter().map(|t| t.bytes).sum::<i64>(),
                "initializationCompleted": load_done,
                "largeObjects": large_objects,
            });
            if self.has_cdc()
                && let Some(obj) = database.as_object_mut()
            {
                obj.extend(self.cdc_live(&db.name));
                // The fallback stream (target back to the source), once the cutover armed it.
                let key = crate::stages::fallback::store_key(&db.name);
                if self.fallback_armed(&db.name) {
                    let mut fb = self.cdc_live(&key);
                    fb.insert("state".into(), json!(self.fallback_state(&db.name)));
                    obj.insert("fallback".into(), Value::Object(fb));
                }
            }
            output.push(database);
            for t in &tables {
                let mut table = json!({
                    "resultType": "TableLevelOutput",
                    "databaseName": db.name,
                    "tableName": t.table,
                    "state": match t.state {
                        TableState::Queued => "QUEUED",
                        TableState::Copying => "LOADING",
                        TableState::Copied => "COMPLETED",
                        TableState::Failed => "ERROR",
                    },
                    "fullLoadTotalRows": t.rows,
                    "fullLoadTotalVolumeBytes": t.bytes,
                    "fullLoadStartedOn": t.started_at.map(|x| x.rfc3339()),
                    "fullLoadEndedOn": t.ended_at.map(|x| x.rfc3339()),
                    "copiedAtLsn": t.lsn,
                    "dataErrorsCount": self.validation.as_ref().map(|v| v.count_for(&db.name, &t.table)).unwrap_or(0),
                    "lastError": t.error,
                });
                if self.has_cdc()
                    && let Some(obj) = table.as_object_mut()
                {
                    obj.extend(self.cdc_fields(&format!("{}.{}", db.name, t.table)));
                }
                output.push(table);
            }
        }
        json!({
            "migration": self.plan.name,
            "checkpointStore": self.store,
            "output": output,
            "stages": rows,
            "lastRun": self.last_run,
            "validation": self.validation.as_ref().map(|v| json!({
                "stage": v.stage,
                "mode": v.mode,
                "finishedOn": v.finished_at,
                "durationSeconds": v.seconds,
                "tablesCompared": v.tables.len(),
                "sequencesCompared": v.sequences_compared,
                "dataErrorsCount": v.mismatch_count,
                "snapshots": v.snapshots,
                "mismatches": v.mismatches.iter().take(100).collect::<Vec<_>>(),
            })),
        })
    }

    /// Whether the cutover armed a fallback stream for `db` (see [`crate::stages::fallback`]).
    fn fallback_armed(&self, db: &str) -> bool {
        self.position(&crate::stages::fallback::start_position(db))
            .is_some()
    }

    /// Where the fallback stream of `db` is: `streaming`, `rolling back` (target fenced,
    /// draining), `rolled back`, `stopped`, or the fallback stage's state.
    fn fallback_state(&self, db: &str) -> String {
        let Some(spec) = self
            .plan
            .stages
            .iter()
            .find(|s| s.kind == crate::plan::StageKind::Fallback)
        else {
            return "not planned".into();
        };
        let Some(r) = self.records.iter().find(|r| r.stage == spec.id) else {
            return "armed (the fallback stage has not started)".into();
        };
        let outcome = r
            .detail
            .get(crate::stages::fallback::DETAIL_KEY)
            .and_then(|d| d.get(db))
            .and_then(Value::as_str);
        match (r.state, outcome) {
            (_, Some(o)) => o.replace('_', " "),
            (crate::state::StageState::Running, None) => "streaming".into(),
            (state, None) => state.to_string(),
        }
    }

    fn fallback_text(&self, out: &mut String, db: &str) {
        use std::fmt::Write as _;
        let key = crate::stages::fallback::store_key(db);
        let slot = self.slots.iter().find(|s| s.database == key);
        let _ = writeln!(
            out,
            "
fallback {db} (target back to the source): {}",
            self.fallback_state(db)
        );
        let _ = writeln!(
            out,
            "  applied   {} (target at {})",
            self.position(&format!("cdc_applied:{key}"))
                .map_or_else(|| "-".to_string(), |l| l.to_string()),
            slot.and_then(|s| s.source_lsn)
                .map_or_else(|| "?".to_string(), |l| l.to_string())
        );
        if let Some(s) = slot {
            match (&s.error, s.retained_bytes) {
                (Some(e), _) => {
                    let _ = writeln!(out, "  slot      {e}");
                }
                (None, b) => {
                    let _ = writeln!(
                        out,
                        "  slot      {}, retains {} of WAL on the target",
                        if s.active {
                            "streaming"
                        } else {
                            "idle (no consumer)"
                        },
                        b.map(|b| crate::plan::units::human_bytes(b.max(0) as u64))
                            .unwrap_or_else(|| "?".into())
                    );
                }
            }
        }
        let _ = writeln!(out, "  lag       {} the target", self.lag(&key));
        let _ = writeln!(
            out,
            "  changes   {} applied to the source: {} inserts, {} updates, {} deletes",
            self.counter(&key, "totalChangesApplied"),
            self.counter(&key, "cdcInsertCounter"),
            self.counter(&key, "cdcUpdateCounter"),
            self.counter(&key, "cdcDeleteCounter"),
        );
    }

    fn cdc_text(&self, out: &mut String, db: &str) {
        use std::fmt::Write as _;
        let applied = self.position(&format!("cdc_applied:{db}"));
        let slot = self.slots.iter().find(|s| s.database == db);
        if applied.is_none() && slot.is_none_or(|s| !s.exists) {
            return;
        }
        let _ = writeln!(out, "\ncdc {db}:");
        let _ = writeln!(
            out,
            "  applied   {} (source at {})",
            applied.map_or("-".into(), |l| l.to_string()),
            slot.and_then(|s| s.source_lsn)
                .map_or("?".into(), |l| l.to_string())
        );
        if let Some(s) = slot {
            if let Some(e) = &s.error {
                let _ = writeln!(out, "  slot      {e}");
            } else {
                let human = |b: Option<i64>| {
                    b.map(|b| crate::plan::units::human_bytes(b.max(0) as u64))
                        .unwrap_or_else(|| "?".into())
                };
                let _ = writeln!(
                    out,
                    "  slot      {}, retains {} of WAL{}",
                    if s.active {
                        "streaming"
                    } else {
                        "idle (no consumer)"
                    },
                    human(s.retained_bytes),
                    s.wal_status
                        .as_deref()
                        .filter(|w| *w != "reserved")
                        .map(|w| format!(" (wal_status {w})"))
                        .unwrap_or_default()
                );
            }
        }
        let _ = writeln!(out, "  lag       {} the source", self.lag(db));
        let _ = writeln!(
            out,
            "  changes   {} applied: {} inserts, {} updates, {} deletes; {} in flight",
            self.counter(db, "totalChangesApplied"),
            self.counter(db, "cdcInsertCounter"),
            self.counter(db, "cdcUpdateCounter"),
            self.counter(db, "cdcDeleteCounter"),
            self.counter(db, "incomingChanges"),
        );
        let ddl = self.ddl(db);
        if !ddl.is_empty() {
            let _ = writeln!(out, "  ddl       {} statement(s):", ddl.len());
            let text = |e: &Value, k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            for e in &ddl {
                let _ = writeln!(
                    out,
                    "    at {} (commit {}) {}: {}",
                    text(e, "lsn"),
                    text(e, "commit_lsn"),
                    text(e, "status"),
                    text(e, "statement")
                );
            }
        }
        if let Some(line) = self.managed_apply_text(db) {
            let _ = writeln!(out, "  mode      {line}");
        }
    }

    /// The managed apply mode of `db` (cdc's counters, see `stages::cdc::managed`), when cdc used it.
    fn managed_apply_text(&self, db: &str) -> Option<String> {
        if self.counter(db, "managedApply") == 0 {
            return None;
        }
        let (triggers, fks, unvalidated) = (
            self.counter(db, "heldTriggers"),
            self.counter(db, "heldForeignKeys"),
            self.counter(db, "unvalidatedForeignKeys"),
        );
        Some(if triggers + fks + unvalidated == 0 {
            "managed (no session_replication_role): every trigger and foreign key it held is back and validated".into()
        } else {
            format!(
                "managed (no session_replication_role): {triggers} trigger(s)/rule(s) disabled and {fks} foreign key(s) dropped on the target until the cutover, {unvalidated} foreign key(s) back but not validated yet"
            )
        })
    }

    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "migration {} ({})", self.plan.name, self.plan.path);
        let _ = writeln!(
            out,
            "state:     {} / {}",
            self.overall(),
            self.migration_state()
        );
        if let Some(next) = self.next_step() {
            let _ = writeln!(out, "next:      {next}");
        }
        for r in self.failed_stages() {
            let _ = writeln!(
                out,
                "failed:    `{}`: {}",
                r.stage,
                r.error.as_deref().unwrap_or("(no error recorded)")
            );
        }
        let _ = writeln!(
            out,
            "runner:    {}",
            self.runner
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_else(|| "none".into())
        );
        let _ = writeln!(out, "store:     {}", self.store);
        if let Some(r) = &self.last_run {
            let _ = writeln!(
                out,
                "last run:  #{} started {}{}",
                r.id,
                r.started_at.map(|t| t.rfc3339()).unwrap_or_default(),
                match (&r.outcome, r.ended_at) {
                    (Some(o), Some(t)) => format!(", {o} at {}", t.rfc3339()),
                    _ => String::new(),
                }
            );
        }
        out.push('\n');
        let rows = self.rows();
        let headers = ["STAGE", "KIND", "STATE", "TRIES", "STARTED", "DURATION"];
        let cells: Vec<[String; 6]> = rows
            .iter()
            .map(|r| {
                [
                    r.stage.clone(),
                    r.kind.clone(),
                    r.state.clone(),
                    r.attempts.to_string(),
                    r.started_on.clone().unwrap_or_else(|| "-".into()),
                    r.duration_seconds
                        .map(|s| {
                            humantime::format_duration(std::time::Duration::from_secs(
                                s.round() as u64
                            ))
                            .to_string()
                        })
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for c in &cells {
            for (w, v) in widths.iter_mut().zip(c.iter()) {
                *w = (*w).max(v.chars().count());
            }
        }
        let line = |vals: [&str; 6]| {
            let mut s = String::new();
            for (i, v) in vals.iter().enumerate() {
                if i + 1 == vals.len() {
                    s.push_str(v);
                } else {
                    let _ = write!(s, "{:w$}  ", v, w = widths[i]);
                }
            }
            s.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(headers));
        for (c, r) in cells.iter().zip(rows.iter()) {
            let _ = writeln!(out, "{}", line([&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]]));
            if let Some(e) = &r.error {
                for l in e.lines().take(6) {
                    let _ = writeln!(out, "    {l}");
                }
            }
        }
        let copying: Vec<&TableProgress> = self
            .tables
            .iter()
            .filter(|t| t.state == TableState::Copying)
            .collect();
        if !self.tables.is_empty() {
            let load_ids: Vec<&str> = self
                .plan
                .stages
                .iter()
                .filter(|s| s.kind == StageKind::FullLoad)
                .map(|s| s.id.as_str())
                .collect();
            let whole: Vec<&TableProgress> = self
                .tables
                .iter()
                .filter(|t| load_ids.contains(&t.stage.as_str()) && is_table_entry(&t.table))
                .collect();
            let done = whole
                .iter()
                .filter(|t| t.state == TableState::Copied)
                .count();
            let rows: i64 = whole.iter().map(|t| t.rows).sum();
            let bytes: i64 = whole.iter().map(|t| t.bytes).sum();
            let _ = writeln!(
                out,
                "\ntables: {done}/{} copied, {rows} rows, {}",
                whole.len(),
                crate::plan::units::human_bytes(bytes.max(0) as u64)
            );
            for t in copying.iter().take(10) {
                let _ = writeln!(out, "  copying {} ({})", t.table, t.database);
            }
            for t in self
                .tables
                .iter()
                .filter(|t| t.state == TableState::Failed)
                .take(10)
            {
                let _ = writeln!(
                    out,
                    "  failed  {}: {}",
                    t.table,
                    t.error
                        .as_deref()
                        .unwrap_or("")
                        .lines()
                        .next()
                        .unwrap_or("")
                );
            }
        }
        if let Some(v) = &self.validation {
            let _ = writeln!(
                out,
                "\nvalidation ({} at {}): {}",
                v.stage,
                v.finished_at,
                v.summary(10).replace('\n', "\n ")
            );
        }
        if self.has_cdc() {
            for db in &self.plan.databases {
                self.cdc_text(&mut out, &db.name);
                if self.fallback_armed(&db.name) {
                    self.fallback_text(&mut out, &db.name);
                }
            }
        }
        if !self.events.is_empty() {
            let _ = writeln!(out, "\nrecent events:");
            for (t, stage, level, msg) in &self.events {
                let first = msg.lines().next().unwrap_or("");
                let _ = writeln!(
                    out,
                    "  {} {:5} {}: {first}",
                    t.rfc3339(),
                    level,
                    stage.as_deref().unwrap_or("-")
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::diagnostic::SourceFile;
    use crate::plan::{CompileOptions, compile};

    const ONLINE: &str = r#"version = 1
name = "states"
[source]
url = "postgres://u@127.0.0.1:5432/postgres"
[target]
url = "postgres://u@127.0.0.1:5433/postgres"
[[databases]]
name = "app"
[stages.pre]
kind = "preflight"
[stages.schema]
kind = "schema_dump"
after = ["pre"]
[stages.provision]
kind = "provision"
after = ["schema"]
[stages.load]
kind = "full_load"
after = ["provision"]
[stages.indexes]
kind = "post_data"
after = ["load"]
[stages.cdc]
kind = "cdc"
after = ["indexes"]
[stages.check]
kind = "validate"
after = ["cdc"]
[stages.cutover]
kind = "cutover"
after = ["check"]
[stages.sequences]
kind = "sequence_reset"
after = ["cutover"]
[stages.cleanup]
kind = "cleanup"
after = ["sequences"]
"#;

    fn plan() -> Plan {
        compile(
            &SourceFile::new("states.toml", ONLINE),
            &CompileOptions::default(),
        )
        .unwrap_or_else(|d| panic!("{d:?}"))
    }

    fn record(stage: &str, kind: &str, state: StageState) -> StageRecord {
        StageRecord {
            stage: stage.into(),
            kind: kind.into(),
            state,
            fingerprint: None,
            attempts: 1,
            started_at: Some(Timestamp(1.0)),
            ended_at: None,
            error: None,
            detail: Value::Null,
        }
    }

    fn status(plan: &Plan, records: Vec<StageRecord>, runner: bool) -> Status<'_> {
        Status {
            plan,
            store: String::new(),
            records,
            runner: runner.then(|| LockHolder {
                host: Some("test".into()),
                pid: Some(1),
                since: None,
                backend_pid: 2,
                application: "pgferry".into(),
            }),
            last_run: None,
            events: Vec::new(),
            tables: Vec::new(),
            counters: Vec::new(),
            positions: Vec::new(),
            slots: Vec::new(),
            validation: None,
        }
    }

    /// The records of a run that got as far as `stage` (which is in `state`), in plan order.
    fn up_to(plan: &Plan, stage: &str, state: StageState) -> Vec<StageRecord> {
        let mut out = Vec::new();
        for i in plan.dag.order() {
            let s = &plan.stages[i];
            if s.id == stage {
                out.push(record(&s.id, s.kind.as_str(), state));
                break;
            }
            // cdc keeps running (ready) while the stages after it work.
            let before = if s.kind == StageKind::Cdc {
                StageState::Ready
            } else {
                StageState::Done
            };
            out.push(record(&s.id, s.kind.as_str(), before));
        }
        out
    }

    fn phase(records: &mut [StageRecord], phase: CutoverPhase) {
        let r = records
            .iter_mut()
            .find(|r| r.stage == "cutover")
            .expect("a cutover record");
        r.detail = json!({ CUTOVER_DETAIL_KEY: { "app": { "phase": phase } } });
    }

    #[test]
    fn states_follow_the_stages_with_azure_dms_semantics() {
        let plan = plan();
        let st = |records| status(&plan, records, true).migration_state();
        use MigrationState::*;
        assert_eq!(st(Vec::new()), Pending);
        assert_eq!(st(up_to(&plan, "provision", StageState::Running)), Pending);
        assert_eq!(st(up_to(&plan, "load", StageState::Running)), FullLoad);
        assert_eq!(st(up_to(&plan, "indexes", StageState::Running)), FullLoad);
        assert_eq!(st(up_to(&plan, "cdc", StageState::Running)), CatchingUp);
        assert_eq!(st(up_to(&plan, "cdc", StageState::Ready)), ReadyToComplete);
        assert_eq!(
            st(up_to(&plan, "check", StageState::Running)),
            ReadyToComplete
        );
        // The cutover has started and waits for `pgferry cutover` (or its lag condition).
        assert_eq!(
            st(up_to(&plan, "cutover", StageState::Running)),
            ReadyToComplete
        );
        let mut waiting = up_to(&plan, "cutover", StageState::Running);
        phase(&mut waiting, CutoverPhase::ReadyToComplete);
        assert_eq!(st(waiting), ReadyToComplete);
        // Approved: cutting over, also while it still waits for the lag before the fence.
        let mut approved = up_to(&plan, "cutover", StageState::Running);
        phase(&mut approved, CutoverPhase::CuttingOver);
        assert_eq!(st(approved.clone()), CuttingOver);
        // cdc drained and finished, the cutover copies what replication does not carry.
        for r in approved
            .iter_mut()
            .filter(|r| r.kind == StageKind::Cdc.as_str())
        {
            r.state = StageState::Done;
        }
        assert_eq!(st(approved), CuttingOver);
        assert_eq!(
            st(up_to(&plan, "sequences", StageState::Running)),
            CuttingOver
        );
        let mut all = up_to(&plan, "cleanup", StageState::Done);
        for r in all.iter_mut() {
            r.state = StageState::Done;
        }
        assert_eq!(st(all), Completed);
    }

    #[test]
    fn any_stage_failing_is_failed_and_says_how_to_resume() {
        let plan = plan();
        for s in &plan.stages {
            let records = up_to(&plan, &s.id, StageState::Failed);
            let st = status(&plan, records.clone(), false);
            assert_eq!(
                st.migration_state(),
                MigrationState::Failed,
                "{} failed",
                s.id
            );
            assert_eq!(st.overall(), OverallState::Failed, "{} failed", s.id);
            let json = st.to_json();
            assert_eq!(
                json["output"][0]["migrationState"], "FAILED",
                "{} failed",
                s.id
            );
            assert_eq!(
                json["output"][1]["migrationState"], "FAILED",
                "{} failed",
                s.id
            );
            assert!(
                json["output"][0]["nextStep"]
                    .as_str()
                    .is_some_and(|n| n.contains("pgferry run states.toml")),
                "{json:#}"
            );
            // With a runner still at work on the other stages, too.
            assert_eq!(
                status(&plan, records, true).migration_state(),
                MigrationState::Failed
            );
        }
    }

    #[test]
    fn a_started_migration_without_a_runner_is_stopped_and_says_how_to_resume() {
        let plan = plan();
        let records = up_to(&plan, "cdc", StageState::Ready);
        let st = status(&plan, records.clone(), false);
        assert_eq!(st.overall(), OverallState::Stopped);
        assert_eq!(st.migration_state(), MigrationState::ReadyToComplete);
        let json = st.to_json();
        assert_eq!(json["output"][0]["state"], "STOPPED");
        let next = json["output"][0]["nextStep"].as_str().unwrap_or_default();
        assert!(
            next.contains("`pgferry run states.toml` resumes it"),
            "{next}"
        );
        assert!(st.to_text().contains("next:      no runner works on it"));
        let running = status(&plan, records, true);
        assert_eq!(running.overall(), OverallState::Running);
        assert_eq!(running.to_json()["output"][0]["nextStep"], Value::Null);
        let never = status(&plan, Vec::new(), false);
        assert_eq!(never.overall(), OverallState::Pending);
    }
}
