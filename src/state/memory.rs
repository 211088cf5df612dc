//! An in-memory [`StateStore`]: the same contract as [`super::postgres::PgStore`] (forward-only
//! positions, a `running` state counting an attempt, `reset_stage` forgetting the stage's
//! checkpoints and progress, a second request of a name keeping the first), kept in a mutex. What
//! it holds is gone with the value: it is for tests of the executor and of code above the store
//! that need no server.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    KeptReport, LagSample, RunRecord, StageRecord, StageState, StateStore, TableProgress, Timestamp,
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
            let id = s.runs.len() as i64 + 1;
            s.runs.push((
                RunRecord {
                    id,
                    started_at: Some(Timestamp::now()),
                    ended_at: None,
                    host: Some("memory".into()),
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
}
