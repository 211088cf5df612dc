//! The status model of a migration and its renderings: a compact table for people, and JSON with the
//! field names of Azure DMS's task output (`output[]` of `MigrationLevelOutput` and
//! `DatabaseLevelOutput` objects) so scripts written for it keep working.

use serde::Serialize;
use serde_json::{Value, json};

use crate::plan::Plan;
use crate::stages::validate::report::Report;
use crate::state::postgres::{LockHolder, RunRecord};
use crate::state::{StageRecord, StageState, TableProgress, TableState, Timestamp};

/// The progress entry full_load keeps for a database's large objects (not a table).
pub const LARGE_OBJECTS: &str = "large objects";

/// Whether a full_load progress entry is a whole table: not a range of a split table (`name#n`),
/// not the large objects.
fn is_table_entry(name: &str) -> bool {
    !name.contains('#') && name != LARGE_OBJECTS
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
    pub positions: Vec<(String, String)>,
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
    pub source_lsn: Option<String>,
    /// The slot is missing (None with an error), or the source was unreachable.
    pub exists: bool,
    pub active: bool,
    pub confirmed_flush: Option<String>,
    /// WAL the slot keeps on the source (current position minus restart_lsn), bytes.
    pub retained_bytes: Option<i64>,
    /// Bytes of WAL between the slot's confirmed position and the source's position.
    pub lag_bytes: Option<i64>,
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

    fn position(&self, name: &str) -> Option<&str> {
        self.positions
            .iter()
            .find(|(n, _)| n == name)
            .map(|p| p.1.as_str())
    }

    fn has_cdc(&self) -> bool {
        self.plan.stages.iter().any(|s| s.kind == "cdc")
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
        m
    }

    /// The live cdc fields of a database: positions, lag, latency, retained WAL.
    fn cdc_live(&self, db: &str) -> serde_json::Map<String, Value> {
        let mut m = self.cdc_fields(db);
        m.insert(
            "incomingChanges".into(),
            json!(self.counter(db, "incomingChanges")),
        );
        m.insert(
            "latency".into(),
            json!(self.counter(db, "cdcLatencyMs") as f64 / 1000.0),
        );
        m.insert(
            "appliedLsn".into(),
            json!(self.position(&format!("cdc_applied:{db}"))),
        );
        if let Some(slot) = self.slots.iter().find(|s| s.database == db) {
            m.insert("sourceLsn".into(), json!(slot.source_lsn));
            m.insert("slotActive".into(), json!(slot.active));
            m.insert("slotConfirmedLsn".into(), json!(slot.confirmed_flush));
            m.insert("lagBytes".into(), json!(slot.lag_bytes));
            m.insert("retainedWalBytes".into(), json!(slot.retained_bytes));
            m.insert("walStatus".into(), json!(slot.wal_status));
            m.insert("slotError".into(), json!(slot.error));
        }
        m
    }

    fn record(&self, kind: &str) -> Option<&StageRecord> {
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

    /// `PENDING`, `FULL_LOAD`, `CATCHING_UP`, `READY_TO_COMPLETE`, `CUTTING_OVER`, `COMPLETED`, `FAILED`.
    pub fn migration_state(&self) -> &'static str {
        let planned: Vec<&str> = self.plan.stages.iter().map(|s| s.id.as_str()).collect();
        let records: Vec<&StageRecord> = self
            .records
            .iter()
            .filter(|r| planned.contains(&r.stage.as_str()))
            .collect();
        if records.iter().any(|r| r.state == StageState::Failed) {
            return "FAILED";
        }
        if !self.plan.stages.is_empty()
            && self.plan.stages.iter().all(|s| {
                records
                    .iter()
                    .any(|r| r.stage == s.id && r.state == StageState::Done)
            })
        {
            return "COMPLETED";
        }
        let is = |kind: &str, st: StageState| self.record(kind).is_some_and(|r| r.state == st);
        if is("cutover", StageState::Running) {
            return "CUTTING_OVER";
        }
        if is("cdc", StageState::Ready) {
            return "READY_TO_COMPLETE";
        }
        if is("cdc", StageState::Running) {
            return "CATCHING_UP";
        }
        if self.record("full_load").is_some() {
            return "FULL_LOAD";
        }
        "PENDING"
    }

    fn overall(&self) -> &'static str {
        match self.migration_state() {
            "FAILED" => "FAILED",
            "COMPLETED" => "SUCCEEDED",
            _ if self.runner.is_some() => "RUNNING",
            _ if self.records.is_empty() => "PENDING",
            _ => "STOPPED",
        }
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
        let ended = if self.migration_state() == "COMPLETED" {
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
            .filter(|s| s.kind == "full_load")
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
                "migrationState": self.migration_state(),
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
            applied.unwrap_or("-"),
            slot.and_then(|s| s.source_lsn.as_deref()).unwrap_or("?")
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
                    "  slot      {}, {} behind, retains {} of WAL{}",
                    if s.active {
                        "streaming"
                    } else {
                        "idle (no consumer)"
                    },
                    human(s.lag_bytes),
                    human(s.retained_bytes),
                    s.wal_status
                        .as_deref()
                        .filter(|w| *w != "reserved")
                        .map(|w| format!(" (wal_status {w})"))
                        .unwrap_or_default()
                );
            }
        }
        let _ = writeln!(
            out,
            "  changes   {} applied: {} inserts, {} updates, {} deletes; {} in flight; latency {:.1}s",
            self.counter(db, "totalChangesApplied"),
            self.counter(db, "cdcInsertCounter"),
            self.counter(db, "cdcUpdateCounter"),
            self.counter(db, "cdcDeleteCounter"),
            self.counter(db, "incomingChanges"),
            self.counter(db, "cdcLatencyMs") as f64 / 1000.0
        );
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
                .filter(|s| s.kind == "full_load")
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
