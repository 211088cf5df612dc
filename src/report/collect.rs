//! Assembles a [`RunReport`] for one run from the checkpoint store: stage records, full_load table
//! progress, post_data checkpoints, cdc counters and lag samples, cutover checkpoints and the latest
//! validation artifact. The store keeps one state per stage (the latest), so a stage done by an
//! earlier run is reported with `this_run = false`.

use std::collections::BTreeMap;

use super::model::{
    Build, CdcReport, CutoverReport, FallbackReport, RunReport, Sample, StageReport, TableCopy,
    VERSION, ValidationSummary, quantile,
};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::plan::StageKind;
use crate::stages::validate::LATEST_ARTIFACT;
use crate::stages::validate::report::Report as ValidationReport;
use crate::state::StateStore;

/// The counters of the cdc stage that the report keeps, per database.
const CDC_COUNTERS: [&str; 4] = [
    "cdcInsertCounter",
    "cdcUpdateCounter",
    "cdcDeleteCounter",
    "totalChangesApplied",
];

/// The report of run `run_id` as the store shows it now.
pub async fn collect(plan: &Plan, store: &dyn StateStore, run_id: i64) -> Result<RunReport> {
    let Some((run, mode)) = store.run_with_mode(run_id).await? else {
        return Err(Error::permanent(format!(
            "migration `{}` has no run {run_id} in its checkpoint store",
            plan.name
        ))
        .hint("`pgferry status PLAN` lists the recent runs"));
    };
    let run_start = run.started_at.map(|t| t.0);
    let mut report = RunReport {
        version: VERSION,
        migration: plan.name.clone(),
        run_id,
        mode,
        started_at: run_start,
        ended_at: run.ended_at.map(|t| t.0),
        seconds: match (run.started_at, run.ended_at) {
            (Some(a), Some(b)) => Some((b.0 - a.0).max(0.0)),
            _ => None,
        },
        outcome: run.outcome.clone(),
        ..Default::default()
    };

    // Stages, in topological order, with their level in the DAG.
    let records = store.stages().await?;
    let levels = plan.dag.levels();
    for i in plan.dag.order() {
        let s = &plan.stages[i];
        let r = records.iter().find(|r| r.stage == s.id);
        let started = r.and_then(|r| r.started_at).map(|t| t.0);
        let ended = r.and_then(|r| r.ended_at).map(|t| t.0);
        report.stages.push(StageReport {
            id: s.id.clone(),
            kind: s.kind.to_string(),
            state: r.map_or("not_run".to_string(), |r| r.state.to_string()),
            attempts: r.map_or(0, |r| r.attempts),
            started_at: started,
            ended_at: ended,
            seconds: match (started, ended) {
                (Some(a), Some(b)) if b >= a => Some(b - a),
                _ => None,
            },
            level: levels.get(i).copied().unwrap_or(0),
            // A second of slack: the run row and the stage row come from different statements.
            this_run: matches!((started, run_start), (Some(s), Some(r)) if s + 1.0 >= r),
            error: r.and_then(|r| r.error.clone()),
        });
        for &d in &s.after {
            report.edges.push([plan.stages[d].id.clone(), s.id.clone()]);
        }
    }

    // Table copies: the parts of a split table (`schema.table#range`) added up.
    let kind_of = |id: &str| plan.stages.iter().find(|s| s.id == id).map(|s| s.kind);
    let mut copies: BTreeMap<(String, String, String), TableCopy> = BTreeMap::new();
    for t in store.tables(None).await? {
        if kind_of(&t.stage) != Some(StageKind::FullLoad) {
            continue;
        }
        let table = t.table.split('#').next().unwrap_or(&t.table).to_string();
        let c = copies
            .entry((t.stage.clone(), t.database.clone(), table.clone()))
            .or_insert_with(|| TableCopy {
                stage: t.stage.clone(),
                database: t.database.clone(),
                table,
                state: t.state.as_str().to_string(),
                ..Default::default()
            });
        c.parts += 1;
        c.rows += t.rows;
        c.bytes += t.bytes;
        if t.state.as_str() != "copied" {
            c.state = t.state.as_str().to_string();
        }
        let (a, b) = (t.started_at.map(|x| x.0), t.ended_at.map(|x| x.0));
        c.started_at = min_opt(c.started_at, a);
        c.ended_at = max_opt(c.ended_at, b);
    }
    for mut c in copies.into_values() {
        if let (Some(a), Some(b)) = (c.started_at, c.ended_at) {
            let secs = (b - a).max(0.0);
            c.seconds = Some(secs);
            if secs > 0.0 {
                c.rows_per_second = Some(c.rows as f64 / secs);
                c.mb_per_second = Some(c.bytes as f64 / 1_048_576.0 / secs);
            }
        }
        report.tables.push(c);
    }

    // post_data objects, from their checkpoints (`database:<db>:item:<kind>:<name>`).
    for s in plan.stages.iter().filter(|s| s.kind == StageKind::PostData) {
        for (key, value, updated) in store.checkpoints(&s.id).await? {
            let Some(db) = plan
                .databases
                .iter()
                .find(|d| key.starts_with(&format!("database:{}:item:", d.name)))
            else {
                continue;
            };
            let seconds = value
                .get("elapsed_ms")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(0.0)
                / 1000.0;
            report.builds.push(Build {
                stage: s.id.clone(),
                database: db.name.clone(),
                object: str_field(&value, "object").unwrap_or_else(|| key.clone()),
                kind: str_field(&value, "type").unwrap_or_default(),
                // Older checkpoints have no start: their end (the checkpoint's time) minus the time.
                started_at: value
                    .get("started_at")
                    .and_then(serde_json::Value::as_f64)
                    .or(Some(updated.0 - seconds)),
                seconds,
                already_existed: value
                    .get("already_existed")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
            });
        }
    }
    report.builds.sort_by(|a, b| {
        a.started_at
            .partial_cmp(&b.started_at)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.object.cmp(&b.object))
    });

    // cdc: counters (migration-wide) and this run's lag samples.
    if let Some(s) = plan.stages.iter().find(|s| s.kind == StageKind::Cdc) {
        let mut cdc = CdcReport {
            stage: s.id.clone(),
            ..Default::default()
        };
        for (scope, name, value) in store.counters().await? {
            if CDC_COUNTERS.contains(&name.as_str())
                && plan.databases.iter().any(|d| d.name == scope)
            {
                if name == "totalChangesApplied" {
                    cdc.applied_changes += value;
                }
                cdc.counters.entry(scope).or_default().insert(name, value);
            }
        }
        cdc.samples = store
            .samples(run_id)
            .await?
            .into_iter()
            // The fallback stream's samples (`fallback:<db>`) go to its own report below.
            .filter(|x| plan.databases.iter().any(|d| d.name == x.database))
            .map(|x| Sample {
                database: x.database,
                at: x.at,
                lag_bytes: x.lag_bytes,
                latency_ms: x.latency_ms,
                incoming: x.incoming,
                applied: x.applied,
            })
            .collect();
        let lags: Vec<i64> = cdc.samples.iter().filter_map(|x| x.lag_bytes).collect();
        let lat: Vec<i64> = cdc.samples.iter().filter_map(|x| x.latency_ms).collect();
        cdc.max_lag_bytes = lags.iter().copied().max();
        cdc.p95_lag_bytes = quantile(&lags, 0.95);
        cdc.max_latency_ms = lat.iter().copied().max();
        cdc.p95_latency_ms = quantile(&lat, 0.95);
        if let Some(r) = records.iter().find(|r| r.stage == s.id)
            && let Some(dbs) = r
                .detail
                .get(crate::stages::cdc::ddl::DETAIL_KEY)
                .and_then(serde_json::Value::as_object)
        {
            for (db, list) in dbs {
                let list: Vec<super::model::DdlStatement> =
                    serde_json::from_value(list.clone()).unwrap_or_default();
                if !list.is_empty() {
                    cdc.ddl.insert(db.clone(), list);
                }
            }
        }
        report.cdc = Some(cdc);
    }

    // Cutover: one checkpoint per database.
    for s in plan.stages.iter().filter(|s| s.kind == StageKind::Cutover) {
        for db in &plan.databases {
            let Some(v) = store
                .checkpoint(&s.id, &crate::stages::database_key(&db.name))
                .await?
            else {
                continue;
            };
            report.cutover.push(CutoverReport {
                stage: s.id.clone(),
                database: db.name.clone(),
                lsn: v
                    .get("lsn")
                    .and_then(|l| serde_json::from_value(l.clone()).ok()),
                fenced: v.get("fenced").and_then(serde_json::Value::as_bool),
                downtime_seconds: v
                    .get("downtime_seconds")
                    .and_then(serde_json::Value::as_f64),
                simulated_downtime_seconds: v
                    .get("simulated_downtime_seconds")
                    .and_then(serde_json::Value::as_f64),
                resync: v.get("resync").cloned().unwrap_or(serde_json::Value::Null),
                statistics: v
                    .get("statistics")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null),
            });
        }
    }

    // The fallback stream: per database whose cutover armed it.
    if let Some(s) = plan
        .stages
        .iter()
        .find(|s| s.kind == crate::plan::StageKind::Fallback)
    {
        let samples = store.samples(run_id).await?;
        let detail = store
            .stages()
            .await?
            .into_iter()
            .find(|r| r.stage == s.id)
            .map(|r| r.detail);
        for db in &plan.databases {
            let key = crate::stages::fallback::store_key(&db.name);
            if store
                .position(&crate::stages::fallback::start_position(&db.name))
                .await?
                .is_none()
            {
                continue;
            }
            let done = store
                .checkpoint(&s.id, &format!("database:{}", db.name))
                .await?
                .unwrap_or(serde_json::Value::Null);
            let state = detail
                .as_ref()
                .and_then(|d| d.get(crate::stages::fallback::DETAIL_KEY))
                .and_then(|d| d.get(&db.name))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("armed")
                .to_string();
            let lags: Vec<i64> = samples
                .iter()
                .filter(|x| x.database == key)
                .filter_map(|x| x.lag_bytes)
                .collect();
            report.fallback.push(FallbackReport {
                stage: s.id.clone(),
                database: db.name.clone(),
                state,
                applied_changes: store
                    .counter(&key, "totalChangesApplied")
                    .await?
                    .unwrap_or(0),
                max_lag_bytes: lags.iter().copied().max(),
                p95_lag_bytes: quantile(&lags, 0.95),
                lsn: str_field(&done, "lsn"),
                downtime_seconds: done
                    .get("downtime_seconds")
                    .and_then(serde_json::Value::as_f64),
            });
        }
    }

    // Validation: the latest report, if any.
    if let Some(bytes) = store.artifact(LATEST_ARTIFACT).await? {
        match serde_json::from_slice::<ValidationReport>(&bytes) {
            Ok(v) => {
                report.validation = Some(ValidationSummary {
                    stage: v.stage.clone(),
                    mode: v.mode.clone(),
                    clean: v.is_clean(),
                    tables: v.tables.len(),
                    source_rows: v.tables.iter().map(|t| t.source_rows).sum(),
                    target_rows: v.tables.iter().map(|t| t.target_rows).sum(),
                    mismatch_count: v.mismatch_count,
                    seconds: v.seconds,
                    finished_at: v.finished_at.clone(),
                    summary: v.summary(10),
                })
            }
            Err(e) => tracing::warn!(
                "the validation report ({LATEST_ARTIFACT}) could not be read, left out of the run report: {e}"
            ),
        }
    }
    Ok(report)
}

fn str_field(v: &serde_json::Value, name: &str) -> Option<String> {
    v.get(name)
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) | (None, x) => x,
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) | (None, x) => x,
    }
}
