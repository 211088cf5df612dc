//! Stages: one module per kind, each behind the [`Stage`] trait, built from the compiled plan by
//! [`build`]. The executor runs them without knowing what they do; what they need of PostgreSQL they
//! get from [`Env`].

pub mod analyze;
pub mod cdc;
pub mod cleanup;
pub mod cutover;
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
        }
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

    /// Records that this stage finished its work for `key`.
    pub async fn mark_done(&self, key: &str, detail: serde_json::Value) -> Result<()> {
        let mut value = serde_json::json!({ "done": true });
        if let (Some(obj), serde_json::Value::Object(extra)) = (value.as_object_mut(), detail) {
            obj.extend(extra);
        }
        self.store.put_checkpoint(&self.stage, key, &value).await
    }
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
    }
}
