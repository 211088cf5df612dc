//! An in-memory [`StateStore`]: the same contract as [`super::postgres::PgStore`] (forward-only
//! positions, a `running` state counting an attempt, `reset_stage` forgetting the stage's
//! checkpoints and progress, a second request of a name keeping the first), kept in a mutex. What
//! it holds is gone with the value: it is for tests of the executor and of code above the store
//! that need no server. Its runner lock is a flag shared by the values the store hands out, so a
//! second runner on the same store is refused while the first guard lives; `forget_migration`
//! keeps runs, reports and samples, and `kept_rows`/`restore_kept` carry them as JSON, as `reset`
//! does with the PostgreSQL store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    KeptReport, LagSample, LockHolder, MODE_KEY, RUN_STAGE, RunRecord, RunnerLock, STORE_STAGE,
    StageRecord, StageState, StateStore, TableProgress, Timestamp, hostname,
};
use crate::error::{Error, Result};
use crate::pg::lsn::Lsn;

#[derive(Default)]
struct Inner {
    /// The runs with their mode.
    runs: Vec<(RunRecord, String)>,
    run: i64,
    stages: BTreeMap<String, StageRecord>,
    checkpoints: BTreeMap<(String, String), (serde_json::Value, Timestamp)>,
    events: Vec<(Timestamp, Option<String>, String, String)>,
    positions: BTreeMap<String, Lsn>,
    artifacts: BTreeMap<String, Vec<u8>>,
    counters: BTreeMap<(String, String), i64>,
    tables: BTreeMap<(String, String, String), TableProgress>,
    samples: Vec<(i64, LagSample)>,
    requests: BTreeMap<String, (String, String)>,
    reports: Vec<KeptReport>,
}

/// The in-memory store.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// The runner lock's holder, shared with the guard that releases it when dropped.
    runner: Arc<Mutex<Option<LockHolder>>>,
}

/// What holds the in-memory runner lock: dropping it releases the lock.
struct Held(Arc<Mutex<Option<LockHolder>>>);

impl Drop for Held {
    fn drop(&mut self) {
        // A poisoned flag is released all the same.
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = None;
    }
}

/// What [`StateStore::kept_rows`] returns for this store.
#[derive(Default, Serialize, Deserialize)]
struct Kept {
    runs: Vec<KeptRun>,
    reports: Vec<KeptReportRow>,
    samples: Vec<KeptSample>,
}

#[derive(Serialize, Deserialize)]
struct KeptRun {
    id: i64,
    started_at: Option<f64>,
    ended_at: Option<f64>,
    host: Option<String>,
    pid: Option<i32>,
    outcome: Option<String>,
    args: Option<String>,
    mode: String,
}

#[derive(Serialize, Deserialize)]
struct KeptReportRow {
    run_id: i64,
    mode: String,
    created_at: f64,
    report: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct KeptSample {
    run_id: i64,
    sample: LagSample,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> Result<T> {
        let mut guard = self
            .inner
            .lock()
            .map_err(|_| Error::permanent("internal: the in-memory store was poisoned"))?;
        Ok(f(&mut guard))
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn begin_run(&self, args: &str) -> Result<i64> {
        self.with(|s| {
            // After the highest id, as the PostgreSQL store's sequence (set past restored runs).
            let id = s.runs.iter().map(|(r, _)| r.id).max().unwrap_or(0) + 1;
            s.runs.push((
                RunRecord {
                    id,
                    started_at: Some(Timestamp::now()),
                    ended_at: None,
                    host: Some(hostname()),
                    pid: Some(std::process::id() as i32),
                    outcome: None,
                    args: Some(args.to_string()),
                },
                "run".into(),
            ));
            s.run = id;
            id
        })
    }

    async fn end_run(&self, run: i64, outcome: &str) -> Result<()> {
        self.with(|s| {
            if let Some((r, _)) = s.runs.iter_mut().find(|(r, _)| r.id == run) {
                r.ended_at = Some(Timestamp::now());
                r.outcome = Some(outcome.to_string());
            }
        })
    }

    async fn stages(&self) -> Result<Vec<StageRecord>> {
        self.with(|s| s.stages.values().cloned().collect())
    }

    async fn set_stage(
        &self,
        stage: &str,
        kind: &str,
        state: StageState,
        fingerprint: &str,
        error: Option<&str>,
    ) -> Result<()> {
        self.with(|s| {
            let now = Timestamp::now();
            let r = s
                .stages
                .entry(stage.to_string())
                .or_insert_with(|| StageRecord {
                    stage: stage.to_string(),
                    kind: kind.to_string(),
                    state,
                    fingerprint: None,
                    attempts: 0,
                    started_at: None,
                    ended_at: None,
                    error: None,
                    detail: serde_json::json!({}),
                });
            r.kind = kind.to_string();
            r.state = state;
            r.fingerprint = Some(fingerprint.to_string());
            r.error = error.map(str::to_string);
            match state {
                StageState::Running => {
                    r.attempts += 1;
                    r.started_at = Some(now);
                    r.ended_at = None;
                }
                StageState::Done | StageState::Failed => r.ended_at = Some(now),
                StageState::Pending | StageState::Ready => {}
            }
        })
    }

    async fn reset_stage(&self, stage: &str) -> Result<()> {
        self.with(|s| {
            s.stages.remove(stage);
            s.checkpoints.retain(|(st, _), _| st != stage);
            s.tables.retain(|(st, _, _), _| st != stage);
        })
    }

    async fn set_stage_detail(&self, stage: &str, detail: &serde_json::Value) -> Result<()> {
        self.with(|s| {
            if let Some(r) = s.stages.get_mut(stage) {
                r.detail = detail.clone();
            }
        })
    }

    async fn checkpoint(&self, stage: &str, key: &str) -> Result<Option<serde_json::Value>> {
        self.with(|s| {
            s.checkpoints
                .get(&(stage.to_string(), key.to_string()))
                .map(|(v, _)| v.clone())
        })
    }

    async fn put_checkpoint(
        &self,
        stage: &str,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<()> {
        self.with(|s| {
            s.checkpoints.insert(
                (stage.to_string(), key.to_string()),
                (value.clone(), Timestamp::now()),
            );
        })
    }

    async fn event(&self, stage: Option<&str>, level: &str, message: &str) -> Result<()> {
        self.with(|s| {
            s.events.push((
                Timestamp::now(),
                stage.map(str::to_string),
                level.to_string(),
                message.to_string(),
            ))
        })
    }

    async fn advance_position(&self, name: &str, lsn: Lsn) -> Result<Lsn> {
        self.with(|s| {
            let p = s.positions.entry(name.to_string()).or_insert(lsn);
            *p = (*p).max(lsn);
            *p
        })
    }

    async fn position(&self, name: &str) -> Result<Option<Lsn>> {
        self.with(|s| s.positions.get(name).copied())
    }

    async fn put_artifact(&self, name: &str, content: &[u8]) -> Result<()> {
        self.with(|s| {
            s.artifacts.insert(name.to_string(), content.to_vec());
        })
    }

    async fn artifact(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.with(|s| s.artifacts.get(name).cloned())
    }

    async fn add_counter(&self, scope: &str, name: &str, delta: i64) -> Result<i64> {
        self.with(|s| {
            let c = s
                .counters
                .entry((scope.to_string(), name.to_string()))
                .or_insert(0);
            *c += delta;
            *c
        })
    }

    async fn add_counters(&self, deltas: &[(String, String, i64)]) -> Result<()> {
        self.with(|s| {
            for (scope, name, delta) in deltas {
                *s.counters.entry((scope.clone(), name.clone())).or_insert(0) += delta;
            }
        })
    }

    async fn counter(&self, scope: &str, name: &str) -> Result<Option<i64>> {
        self.with(|s| {
            s.counters
                .get(&(scope.to_string(), name.to_string()))
                .copied()
        })
    }

    async fn set_counters(&self, values: &[(String, String, i64)]) -> Result<()> {
        // As the PostgreSQL store: rows naming the same gauge keep the largest value.
        let mut combined: BTreeMap<(String, String), i64> = BTreeMap::new();
        for (scope, name, value) in values {
            let v = combined
                .entry((scope.clone(), name.clone()))
                .or_insert(*value);
            *v = (*v).max(*value);
        }
        self.with(|s| s.counters.extend(combined))
    }

    async fn upsert_table(&self, progress: &TableProgress) -> Result<()> {
        self.upsert_tables(std::slice::from_ref(progress)).await
    }

    async fn upsert_tables(&self, progress: &[TableProgress]) -> Result<()> {
        use super::TableState;
        self.with(|s| {
            let now = Timestamp::now();
            for t in progress {
                let key = (t.stage.clone(), t.database.clone(), t.table.clone());
                let earlier = s.tables.get(&key).cloned();
                let mut t = t.clone();
                let starts = t.state != TableState::Queued;
                t.started_at = match &earlier {
                    Some(e) if e.state != TableState::Queued && e.started_at.is_some() => {
                        e.started_at
                    }
                    _ => starts.then_some(now),
                };
                t.ended_at =
                    matches!(t.state, TableState::Copied | TableState::Failed).then_some(now);
                s.tables.insert(key, t);
            }
        })
    }

    async fn tables(&self, stage: Option<&str>) -> Result<Vec<TableProgress>> {
        self.with(|s| {
            s.tables
                .values()
                .filter(|t| stage.is_none_or(|st| st == t.stage))
                .cloned()
                .collect()
        })
    }

    async fn add_sample(&self, sample: &LagSample) -> Result<()> {
        self.with(|s| {
            let run = s.run;
            s.samples.push((run, sample.clone()));
        })
    }

    async fn request(&self, name: &str, by: &str) -> Result<()> {
        self.with(|s| {
            s.requests
                .entry(name.to_string())
                .or_insert_with(|| (Timestamp::now().rfc3339(), by.to_string()));
        })
    }

    async fn requested(&self, name: &str) -> Result<Option<String>> {
        self.with(|s| s.requests.get(name).map(|(at, _)| at.clone()))
    }

    async fn positions(&self) -> Result<Vec<(String, Lsn)>> {
        self.with(|s| s.positions.iter().map(|(n, l)| (n.clone(), *l)).collect())
    }

    async fn counters(&self) -> Result<Vec<(String, String, i64)>> {
        self.with(|s| {
            s.counters
                .iter()
                .map(|((scope, name), v)| (scope.clone(), name.clone(), *v))
                .collect()
        })
    }

    async fn events(&self, limit: i64) -> Result<Vec<(Timestamp, Option<String>, String, String)>> {
        self.with(|s| {
            let skip = s.events.len().saturating_sub(limit.max(0) as usize);
            s.events[skip..].to_vec()
        })
    }

    async fn checkpoints(
        &self,
        stage: &str,
    ) -> Result<Vec<(String, serde_json::Value, Timestamp)>> {
        self.with(|s| {
            s.checkpoints
                .iter()
                .filter(|((st, _), _)| st == stage)
                .map(|((_, key), (v, at))| (key.clone(), v.clone(), *at))
                .collect()
        })
    }

    async fn runs(&self, limit: i64) -> Result<Vec<RunRecord>> {
        self.with(|s| {
            s.runs
                .iter()
                .rev()
                .take(limit.max(0) as usize)
                .map(|(r, _)| r.clone())
                .collect()
        })
    }

    async fn run_with_mode(&self, id: i64) -> Result<Option<(RunRecord, String)>> {
        self.with(|s| s.runs.iter().find(|(r, _)| r.id == id).cloned())
    }

    async fn samples(&self, run: i64) -> Result<Vec<LagSample>> {
        self.with(|s| {
            s.samples
                .iter()
                .filter(|(r, _)| *r == run)
                .map(|(_, x)| x.clone())
                .collect()
        })
    }

    async fn put_report(&self, run: i64, mode: &str, report: &serde_json::Value) -> Result<()> {
        self.with(|s| {
            s.reports.retain(|r| r.run_id != run);
            s.reports.push(KeptReport {
                run_id: run,
                mode: mode.to_string(),
                created_at: Timestamp::now(),
                report: report.clone(),
            });
        })
    }

    async fn reports(
        &self,
        run: Option<i64>,
        mode: Option<&str>,
        limit: i64,
    ) -> Result<Vec<KeptReport>> {
        self.with(|s| {
            s.reports
                .iter()
                .rev()
                .filter(|r| run.is_none_or(|id| r.run_id == id))
                .filter(|r| mode.is_none_or(|m| r.mode == m))
                .take(limit.max(0) as usize)
                .cloned()
                .collect()
        })
    }

    fn describe(&self) -> String {
        "an in-memory store".into()
    }

    fn home(&self) -> Option<(String, String)> {
        None
    }

    async fn acquire_runner_lock(&self) -> Result<std::result::Result<RunnerLock, LockHolder>> {
        let mut held = self
            .runner
            .lock()
            .map_err(|_| Error::permanent("internal: the in-memory runner lock was poisoned"))?;
        if let Some(holder) = held.as_ref() {
            return Ok(Err(holder.clone()));
        }
        let pid = std::process::id();
        *held = Some(LockHolder {
            host: Some(hostname()),
            pid: i32::try_from(pid).ok(),
            since: Some(Timestamp::now().rfc3339()),
            backend_pid: 0,
            application: format!("runner (in memory) host={} pid={pid}", hostname()),
        });
        Ok(Ok(RunnerLock::new(Held(self.runner.clone()))))
    }

    async fn runner(&self) -> Result<Option<LockHolder>> {
        self.runner
            .lock()
            .map(|h| h.clone())
            .map_err(|_| Error::permanent("internal: the in-memory runner lock was poisoned"))
    }

    async fn set_run_mode(&self, run: i64, mode: &str) -> Result<()> {
        self.with(|s| {
            if let Some((_, m)) = s.runs.iter_mut().find(|(r, _)| r.id == run) {
                *m = mode.to_string();
            }
        })?;
        self.put_checkpoint(
            RUN_STAGE,
            MODE_KEY,
            &serde_json::json!({ "mode": mode, "run_id": run }),
        )
        .await
    }

    /// Nothing to upgrade: the layout is this build's.
    async fn upgrade(&self) -> Result<()> {
        Ok(())
    }

    async fn forget_migration(&self) -> Result<()> {
        self.with(|s| {
            s.stages.clear();
            s.tables.clear();
            s.counters.clear();
            s.positions.clear();
            s.artifacts.clear();
            s.events.clear();
            s.requests.clear();
            s.checkpoints.retain(|(stage, _), _| stage == STORE_STAGE);
        })
    }

    /// None: an in-memory store holds one migration.
    async fn other_migrations(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn kept_rows(&self) -> Result<serde_json::Value> {
        let kept = self.with(|s| Kept {
            runs: s
                .runs
                .iter()
                .map(|(r, mode)| KeptRun {
                    id: r.id,
                    started_at: r.started_at.map(|t| t.0),
                    ended_at: r.ended_at.map(|t| t.0),
                    host: r.host.clone(),
                    pid: r.pid,
                    outcome: r.outcome.clone(),
                    args: r.args.clone(),
                    mode: mode.clone(),
                })
                .collect(),
            reports: s
                .reports
                .iter()
                .map(|r| KeptReportRow {
                    run_id: r.run_id,
                    mode: r.mode.clone(),
                    created_at: r.created_at.0,
                    report: r.report.clone(),
                })
                .collect(),
            samples: s
                .samples
                .iter()
                .map(|(run_id, sample)| KeptSample {
                    run_id: *run_id,
                    sample: sample.clone(),
                })
                .collect(),
        })?;
        serde_json::to_value(kept)
            .map_err(|e| Error::permanent(format!("serializing the kept runs and reports: {e}")))
    }

    /// As the PostgreSQL store: a run or report already there is kept as it is.
    async fn restore_kept(&self, kept: &serde_json::Value) -> Result<()> {
        let kept: Kept = serde_json::from_value(kept.clone())
            .map_err(|e| Error::permanent(format!("reading the kept runs and reports: {e}")))?;
        self.with(|s| {
            for r in kept.runs {
                if s.runs.iter().any(|(x, _)| x.id == r.id) {
                    continue;
                }
                s.runs.push((
                    RunRecord {
                        id: r.id,
                        started_at: r.started_at.map(Timestamp),
                        ended_at: r.ended_at.map(Timestamp),
                        host: r.host,
                        pid: r.pid,
                        outcome: r.outcome,
                        args: r.args,
                    },
                    r.mode,
                ));
            }
            s.runs.sort_by_key(|(r, _)| r.id);
            for r in kept.reports {
                if s.reports.iter().any(|x| x.run_id == r.run_id) {
                    continue;
                }
                s.reports.push(KeptReport {
                    run_id: r.run_id,
                    mode: r.mode,
                    created_at: Timestamp(r.created_at),
                    report: r.report,
                });
            }
            for x in kept.samples {
                if !s
                    .samples
                    .iter()
                    .any(|(run, y)| *run == x.run_id && *y == x.sample)
                {
                    s.samples.push((x.run_id, x.sample));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn positions_only_move_forward_and_reset_forgets_a_stage() {
        let store = MemoryStore::new();
        let lsn = |s: &str| s.parse::<Lsn>().unwrap();
        assert_eq!(
            store.advance_position("a", lsn("0/10")).await.unwrap(),
            lsn("0/10")
        );
        assert_eq!(
            store.advance_position("a", lsn("0/5")).await.unwrap(),
            lsn("0/10")
        );
        assert_eq!(store.position("a").await.unwrap(), Some(lsn("0/10")));
        store
            .set_stage("s", "sql", StageState::Running, "f", None)
            .await
            .unwrap();
        store
            .set_stage("s", "sql", StageState::Running, "f", None)
            .await
            .unwrap();
        store
            .put_checkpoint("s", "k", &serde_json::json!({"done": true}))
            .await
            .unwrap();
        assert_eq!(store.stages().await.unwrap()[0].attempts, 2);
        store.reset_stage("s").await.unwrap();
        assert!(store.stages().await.unwrap().is_empty());
        assert_eq!(store.checkpoint("s", "k").await.unwrap(), None);
        store.request("cutover", "me").await.unwrap();
        let first = store.requested("cutover").await.unwrap();
        store.request("cutover", "you").await.unwrap();
        assert_eq!(store.requested("cutover").await.unwrap(), first);
    }

    #[tokio::test]
    async fn a_second_runner_is_refused_until_the_first_lets_go() {
        let store = MemoryStore::new();
        assert!(store.runner().await.unwrap().is_none());
        let first = store.acquire_runner_lock().await.unwrap();
        let Ok(first) = first else {
            panic!("the first runner must get the lock")
        };
        let holder = store.runner().await.unwrap().expect("a holder while held");
        assert_eq!(holder.pid, i32::try_from(std::process::id()).ok());
        match store.acquire_runner_lock().await.unwrap() {
            Ok(_) => panic!("a second runner must be refused while the first holds the lock"),
            Err(h) => assert_eq!(h.pid, holder.pid),
        }
        drop(first);
        assert!(store.runner().await.unwrap().is_none());
        assert!(store.acquire_runner_lock().await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn the_checkpoints_take_the_mode_of_the_run() {
        let store = MemoryStore::new();
        assert_eq!(store.checkpoints_mode().await.unwrap(), None);
        // Stages recorded before modes existed count as a real run.
        store
            .set_stage("s", "sql", StageState::Done, "f", None)
            .await
            .unwrap();
        assert_eq!(
            store.checkpoints_mode().await.unwrap().as_deref(),
            Some("run")
        );
        let run = store.begin_run("run --rehearsal").await.unwrap();
        store.set_run_mode(run, "rehearsal").await.unwrap();
        assert_eq!(
            store.checkpoints_mode().await.unwrap().as_deref(),
            Some("rehearsal")
        );
        assert_eq!(
            store.run_with_mode(run).await.unwrap().map(|(_, m)| m),
            Some("rehearsal".to_string())
        );
    }

    #[tokio::test]
    async fn forgetting_a_migration_keeps_its_runs_reports_and_samples() {
        let store = MemoryStore::new();
        let run = store.begin_run("run").await.unwrap();
        store.set_run_mode(run, "rehearsal").await.unwrap();
        store
            .set_stage("load", "full_load", StageState::Done, "f", None)
            .await
            .unwrap();
        store
            .put_checkpoint("load", "database:app", &serde_json::json!({"done": true}))
            .await
            .unwrap();
        store
            .put_checkpoint(
                STORE_STAGE,
                super::super::CREATED_DATABASE_KEY,
                &serde_json::json!({"server": "h:5432", "database": "app"}),
            )
            .await
            .unwrap();
        store
            .advance_position("cdc:app", "0/10".parse().unwrap())
            .await
            .unwrap();
        store.add_counter("app", "applied", 3).await.unwrap();
        store.put_artifact("dump", b"x").await.unwrap();
        store.event(None, "info", "hello").await.unwrap();
        store.request("cutover", "me").await.unwrap();
        let sample = LagSample {
            stage: "cdc".into(),
            database: "app".into(),
            at: 1.0,
            lag_bytes: Some(8),
            latency_ms: None,
            incoming: None,
            applied: Some(3),
        };
        store.add_sample(&sample).await.unwrap();
        store
            .put_report(run, "rehearsal", &serde_json::json!({"version": 1}))
            .await
            .unwrap();
        store.end_run(run, "done").await.unwrap();

        store.forget_migration().await.unwrap();
        assert!(store.stages().await.unwrap().is_empty());
        assert_eq!(
            store.checkpoint("load", "database:app").await.unwrap(),
            None
        );
        assert_eq!(store.checkpoints_mode().await.unwrap(), None);
        assert!(store.positions().await.unwrap().is_empty());
        assert!(store.counters().await.unwrap().is_empty());
        assert_eq!(store.artifact("dump").await.unwrap(), None);
        assert!(store.events(10).await.unwrap().is_empty());
        assert_eq!(store.requested("cutover").await.unwrap(), None);
        // Kept: the store's own record, the run, its report and its samples.
        assert_eq!(
            store.created_database().await.unwrap(),
            Some(("h:5432".to_string(), "app".to_string()))
        );
        assert_eq!(store.runs(10).await.unwrap().len(), 1);
        assert_eq!(store.samples(run).await.unwrap(), vec![sample.clone()]);
        assert_eq!(
            store.latest_report("rehearsal").await.unwrap().map(|r| r.0),
            Some(run)
        );

        // What reset carries across a store created again: the same runs, reports and samples,
        // and the next run numbered after them.
        let kept = store.kept_rows().await.unwrap();
        let again = MemoryStore::new();
        again.restore_kept(&kept).await.unwrap();
        again.restore_kept(&kept).await.unwrap();
        let runs = again.runs(10).await.unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].outcome.as_deref(), Some("done"));
        assert_eq!(
            again.run_with_mode(run).await.unwrap().map(|(_, m)| m),
            Some("rehearsal".to_string())
        );
        assert_eq!(again.samples(run).await.unwrap(), vec![sample]);
        assert_eq!(again.reports(None, None, 10).await.unwrap().len(), 1);
        assert_eq!(again.begin_run("run").await.unwrap(), run + 1);
        assert!(again.other_migrations().await.unwrap().is_empty());
        assert!(again.home().is_none());
    }
}
