//! Stages: one module per kind, each behind the [`Stage`] trait, built from the compiled plan by
//! [`build`]. The executor runs them without knowing what they do; what they need of PostgreSQL they
//! get from [`Env`].

pub mod analyze;
pub mod cdc;
pub mod cleanup;
pub mod cutover;
pub mod fallback;
pub mod fence;
pub mod full_load;
pub mod hold;
pub mod post_data;
pub mod preflight;
pub mod provision;
pub mod replica_identity;
pub mod schema_dump;
pub mod sequence_reset;
pub mod sql;
pub mod statistics;
pub mod unreplicated;
pub mod validate;

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pg::catalog;
use crate::pg::connect::ConnInfo;
use crate::plan::{Database, Plan, StageKind};
use crate::state::StateStore;

/// What a running stage gets from the executor.
pub struct StageContext {
    pub stage: String,
    /// 1 for the first try of this run, then 2, 3 ... after transient failures.
    pub attempt: u32,
    pub store: Arc<dyn StateStore>,
    pub cancel: CancellationToken,
    ready: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// Tells the stages that run beside this one (see [`Upstream`]) that it recorded progress.
    progress: Progress,
    /// The dependencies this stage was started beside, while they were still running.
    upstreams: Vec<Upstream>,
}

/// Where a dependency that a stage runs beside stands (see [`Upstream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    Running,
    /// Recorded `done` by the executor: every checkpoint it will ever write is written.
    Done,
    /// Ended without finishing (failed, interrupted): the dependent stops at its next checkpoint.
    Stopped,
}

/// What the executor tells a stage about a dependency it runs beside: its state, and a counter the
/// dependency bumps each time it records progress in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSignal {
    pub state: UpstreamState,
    pub progress: u64,
}

/// A dependency that this stage was started beside (the executor's overlap contract, see
/// `executor.rs`): the dependency's checkpoints in the store say *what* it has finished; this says
/// *when* to look again and whether it is done.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub stage: String,
    rx: tokio::sync::watch::Receiver<UpstreamSignal>,
}

impl Upstream {
    pub fn new(stage: &str, rx: tokio::sync::watch::Receiver<UpstreamSignal>) -> Upstream {
        Upstream {
            stage: stage.to_string(),
            rx,
        }
    }

    pub fn state(&self) -> UpstreamState {
        self.rx.borrow().state
    }

    /// Waits until the dependency records progress or ends, and returns its state then; the
    /// dependency stopping without finishing (or the executor going away) is `Interrupted`.
    pub async fn changed(&mut self) -> Result<UpstreamState> {
        let state = if self.rx.changed().await.is_err() {
            UpstreamState::Stopped
        } else {
            self.rx.borrow_and_update().state
        };
        match state {
            UpstreamState::Stopped => Err(Error::interrupted()),
            s => Ok(s),
        }
    }

    /// Waits until the dependency is done; `Interrupted` when it stops without finishing.
    pub async fn done(&mut self) -> Result<()> {
        loop {
            match self.state() {
                UpstreamState::Done => return Ok(()),
                UpstreamState::Stopped => return Err(Error::interrupted()),
                UpstreamState::Running => {
                    self.changed().await?;
                }
            }
        }
    }
}

/// A stage's side of [`Upstream`]: bumps the progress counter its dependents watch. Cheap to
/// clone into worker tasks; does nothing when no stage runs beside this one.
#[derive(Debug, Clone, Default)]
pub struct Progress(Option<Arc<tokio::sync::watch::Sender<UpstreamSignal>>>);

impl Progress {
    pub fn new(tx: Arc<tokio::sync::watch::Sender<UpstreamSignal>>) -> Progress {
        Progress(Some(tx))
    }

    /// Call after a checkpoint write that stages running beside this one may want to see.
    pub fn notify(&self) {
        if let Some(tx) = &self.0 {
            tx.send_modify(|s| s.progress += 1);
        }
    }
}

impl StageContext {
    pub fn new(
        stage: &str,
        attempt: u32,
        store: Arc<dyn StateStore>,
        cancel: CancellationToken,
        ready: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) -> StageContext {
        StageContext {
            stage: stage.to_string(),
            attempt,
            store,
            cancel,
            ready,
            progress: Progress::default(),
            upstreams: Vec::new(),
        }
    }

    /// The executor's overlap contract: `progress` is this stage's own signal to the stages that
    /// run beside it, `upstreams` the dependencies it was started beside.
    pub fn with_overlap(mut self, progress: Progress, upstreams: Vec<Upstream>) -> StageContext {
        self.progress = progress;
        self.upstreams = upstreams;
        self
    }

    /// The dependency `stage`, when this stage was started beside it (it was still running).
    pub fn upstream(&self, stage: &str) -> Option<Upstream> {
        self.upstreams.iter().find(|u| u.stage == stage).cloned()
    }

    /// The handle that tells stages running beside this one that it recorded progress.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Returns `Interrupted` when the run is stopping; call it at every checkpoint.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Error::interrupted())
        } else {
            Ok(())
        }
    }

    /// A continuous stage reports that it has caught up: its dependents may start.
    pub fn mark_ready(&self) {
        if let Some(tx) = &self.ready {
            let _ = tx.send(self.stage.clone());
        }
    }

    /// Whether this stage has finished its work for `key` (a database name, an object) in an
    /// earlier attempt or run.
    pub async fn is_done(&self, key: &str) -> Result<bool> {
        Ok(self
            .store
            .checkpoint(&self.stage, key)
            .await?
            .and_then(|v| v.get("done").and_then(serde_json::Value::as_bool))
            .unwrap_or(false))
    }

    /// Runs `work` for each of `databases` (index in the plan, database) that this stage has not
    /// finished yet, in order: checks for cancellation before each, skips a database whose
    /// [`database_key`] checkpoint is done, and records it done, with the detail `work` returns,
    /// when `work` succeeds. The one loop of the stages that work database by database.
    pub async fn for_each_database<'a, I, F, Fut>(&self, databases: I, mut work: F) -> Result<()>
    where
        I: IntoIterator<Item = (usize, &'a Database)>,
        F: FnMut(usize, &'a Database) -> Fut,
        Fut: std::future::Future<Output = Result<serde_json::Value>>,
    {
        for (i, db) in databases {
            self.check_cancelled()?;
            let key = database_key(&db.name);
            if self.is_done(&key).await? {
                tracing::info!(stage = %self.stage, database = %db.name, "already done, skipping");
                continue;
            }
            let detail = work(i, db).await?;
            self.mark_done(&key, detail).await?;
        }
        Ok(())
    }

    /// Records that this stage finished its work for `key`.
    pub async fn mark_done(&self, key: &str, detail: serde_json::Value) -> Result<()> {
        let mut value = serde_json::json!({ "done": true });
        if let (Some(obj), serde_json::Value::Object(extra)) = (value.as_object_mut(), detail) {
            obj.extend(extra);
        }
        self.store.put_checkpoint(&self.stage, key, &value).await?;
        self.progress.notify();
        Ok(())
    }
}

/// The checkpoint key of a stage's work on one database: `database:<name>`.
pub fn database_key(name: &str) -> String {
    format!("database:{name}")
}

/// A unit of work in the DAG.
#[async_trait]
pub trait Stage: Send + Sync {
    /// What `pgferry plan` says this stage would do, one line each.
    fn describe(&self) -> Vec<String>;

    /// Does the work, resuming from the stage's own checkpoints. Must return `Interrupted` promptly
    /// once `cx.cancel` fires, and be safe to call again after any failure.
    async fn run(&self, cx: &StageContext) -> Result<()>;
}

/// What stages need from the outside world: the plan and how to reach the servers.
pub struct Env {
    pub plan: Arc<Plan>,
    pub source: ConnInfo,
    pub target: ConnInfo,
    /// `run --rehearsal`: the cutover does not fence the source (see [`cutover`]).
    pub rehearsal: bool,
}

impl Env {
    pub fn new(plan: Arc<Plan>) -> Result<Env> {
        let source = ConnInfo::new(&plan.source, None).map_err(|e| e.context("[source]"))?;
        let target = ConnInfo::new(&plan.target, None).map_err(|e| e.context("[target]"))?;
        Ok(Env {
            plan,
            source,
            target,
            rehearsal: false,
        })
    }

    pub fn source_for(&self, db: &Database) -> ConnInfo {
        self.source.with_dbname(&db.name)
    }

    pub fn target_for(&self, db: &Database) -> ConnInfo {
        self.target.with_dbname(&db.target)
    }

    /// The tables `db` selects as `client`'s database has them (source or target; the checkpoint
    /// store's schema left out): the catalog read ([`catalog::tables`]) with the plan's selection
    /// applied ([`catalog::select`]), as every stage that works on the selection reads it.
    pub async fn selected_tables(
        &self,
        client: &tokio_postgres::Client,
        db: &Database,
    ) -> Result<Vec<catalog::TableInfo>> {
        // Without sizes: `pg_total_relation_size` per table costs ~70 ms on a database of 600.
        let all = catalog::tables_unsized(client, &self.plan.state.schema).await?;
        let selection = crate::select::Selection::new(&db.tables, &db.exclude);
        Ok(catalog::select(&all, &selection)
            .into_iter()
            .cloned()
            .collect())
    }
}

/// The artifact holding a database's pre-data schema section (SQL, as pg_restore writes it).
pub fn pre_data_artifact(db: &Database) -> String {
    format!("schema/{}/pre-data.sql", db.name)
}

/// The artifact holding a database's post-data schema section.
pub fn post_data_artifact(db: &Database) -> String {
    format!("schema/{}/post-data.sql", db.name)
}

/// Builds the stage at `index` of the plan.
pub fn build(env: &Arc<Env>, index: usize) -> Arc<dyn Stage> {
    let env = env.clone();
    match env.plan.stages[index].kind {
        StageKind::Preflight => Arc::new(preflight::Preflight::new(env, index)),
        StageKind::Sql => Arc::new(sql::SqlStage::new(env, index)),
        StageKind::Cleanup => Arc::new(cleanup::Cleanup::new(env, index)),
        StageKind::SchemaDump => Arc::new(schema_dump::SchemaDump::new(env, index)),
        StageKind::Provision => Arc::new(provision::Provision::new(env, index)),
        StageKind::FullLoad => Arc::new(full_load::FullLoad::new(env, index)),
        StageKind::PostData => Arc::new(post_data::PostData::new(env, index)),
        StageKind::SequenceReset => Arc::new(sequence_reset::SequenceReset::new(env, index)),
        StageKind::Cdc => Arc::new(cdc::Cdc::new(env, index)),
        StageKind::Cutover => Arc::new(cutover::Cutover::new(env, index)),
        StageKind::Validate => Arc::new(validate::Validate::new(env, index)),
        StageKind::Fallback => Arc::new(fallback::Fallback::new(env, index)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio_util::sync::CancellationToken;

    use super::{StageContext, database_key};
    use crate::error::{Error, ErrorKind};
    use crate::plan::Database;
    use crate::state::memory::MemoryStore;

    fn db(name: &str) -> Database {
        Database {
            name: name.into(),
            target: name.into(),
            tables: Vec::new(),
            exclude: Vec::new(),
        }
    }

    #[tokio::test]
    async fn each_database_runs_once_and_a_failure_resumes_where_it_stopped() {
        let store = Arc::new(MemoryStore::new());
        let dbs = [db("a"), db("b")];
        let ran = Mutex::new(Vec::new());
        let cx = StageContext::new("s", 1, store.clone(), CancellationToken::new(), None);
        let fail_b = |i: usize, d: &Database| {
            ran.lock().expect("ran").push(d.name.clone());
            let r = if i == 1 {
                Err(Error::permanent("b broke"))
            } else {
                Ok(serde_json::json!({ "rows": 1 }))
            };
            async move { r }
        };
        let err = cx
            .for_each_database(dbs.iter().enumerate(), fail_b)
            .await
            .expect_err("b fails");
        assert_eq!(err.message, "b broke");
        assert!(cx.is_done(&database_key("a")).await.expect("a"));
        assert!(!cx.is_done(&database_key("b")).await.expect("b"));

        // The next attempt skips `a`.
        let again = |_: usize, d: &Database| {
            ran.lock().expect("ran").push(d.name.clone());
            async { Ok(serde_json::Value::Null) }
        };
        cx.for_each_database(dbs.iter().enumerate(), again)
            .await
            .expect("second attempt");
        assert_eq!(*ran.lock().expect("ran"), ["a", "b", "b"]);
        assert!(cx.is_done(&database_key("b")).await.expect("b"));

        // A stopping run does no work.
        let cancel = CancellationToken::new();
        cancel.cancel();
        let cx = StageContext::new("t", 1, store, cancel, None);
        let err = cx
            .for_each_database(dbs.iter().enumerate(), again)
            .await
            .expect_err("interrupted");
        assert_eq!(err.kind, ErrorKind::Interrupted);
        assert_eq!(ran.lock().expect("ran").len(), 3);
    }
}
