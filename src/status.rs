//! The status model of a migration and its renderings: a compact table for people, and JSON with the
//! field names of Azure DMS's task output (`output[]` of `MigrationLevelOutput` and
//! `DatabaseLevelOutput` objects) so scripts written for it keep working.

use serde::Serialize;
use serde_json::{Value, json};

use crate::plan::Plan;
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

    pub fn overall(&self) -> &'static str {
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
            output.push(json!({
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
            }));
            for t in &tables {
                output.push(json!({
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
                    "dataErrorsCount": 0,
                    "lastError": t.error,
                }));
            }
        }
        json!({
            "migration": self.plan.name,
            "checkpointStore": self.store,
            "output": output,
            "stages": rows,
            "lastRun": self.last_run,
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
