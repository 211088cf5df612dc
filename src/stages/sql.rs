//! The generic `sql` stage: templated SQL run on the source or the target, once per database (with
//! `database` in the template scope). By default in one transaction; `transaction = false` sends it as
//! it is (for VACUUM, CREATE INDEX CONCURRENTLY and the like). Each database is checkpointed when its
//! SQL has committed, so a resumed run skips databases already done. A run killed between the commit
//! and the checkpoint runs that database's SQL again: write SQL that can run twice (IF NOT EXISTS,
//! ANALYZE, upserts).

use std::sync::Arc;

use async_trait::async_trait;

use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::plan::StageOptions;

pub struct SqlStage {
    env: Arc<Env>,
    index: usize,
}

impl SqlStage {
    pub fn new(env: Arc<Env>, index: usize) -> SqlStage {
        SqlStage { env, index }
    }

    fn options(&self, db: usize) -> Option<&crate::plan::raw::SqlOptions> {
        match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::Sql(o)) => Some(o),
            _ => None,
        }
    }
}

#[async_trait]
impl Stage for SqlStage {
    fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, db) in self.env.plan.databases.iter().enumerate() {
            let Some(o) = self.options(i) else { continue };
            let (side, name) = if o.on == "source" {
                ("source", &db.name)
            } else {
                ("target", &db.target)
            };
            let first = o
                .sql
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("");
            let more = if o.sql.trim().lines().count() > 1 {
                " ..."
            } else {
                ""
            };
            let tx = if o.transaction() {
                "in one transaction"
            } else {
                "without a transaction"
            };
            out.push(format!("on {side} database {name}, {tx}: {first}{more}"));
        }
        out
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        // The databases the stage has SQL for (a database's rendering can leave it out).
        let with_sql: Vec<(usize, &crate::plan::Database)> = (self.env.plan.databases.iter())
            .enumerate()
            .filter(|(i, _)| self.options(*i).is_some())
            .collect();
        cx.for_each_database(with_sql, |i, db| async move {
            let Some(o) = self.options(i) else {
                return Ok(serde_json::Value::Null);
            };
            let (conn, label) = if o.on == "source" {
                (
                    self.env.source_for(db),
                    format!("source database `{}`", db.name),
                )
            } else {
                (
                    self.env.target_for(db),
                    format!("target database `{}`", db.target),
                )
            };
            let client = conn
                .connect(&format!("sql {}", cx.stage))
                .await
                .map_err(|e| e.context(label.clone()))?;
            let sql = if o.transaction() {
                format!("BEGIN;\n{}\n;COMMIT;", o.sql)
            } else {
                o.sql.clone()
            };
            let started = std::time::Instant::now();
            tokio::select! {
                r = client.batch_execute(&sql) => {
                    r.map_err(|e| Error::pg(&e, "running the stage's SQL").context(label.clone()))?;
                }
                _ = cx.cancel.cancelled() => {
                    // Ask the server to stop the statement; the transaction rolls back.
                    let _ = client.cancel_token().cancel_query(tokio_postgres::NoTls).await;
                    return Err(Error::interrupted());
                }
            }
            let ms = started.elapsed().as_millis() as u64;
            tracing::info!(stage = %cx.stage, database = %db.name, elapsed_ms = ms, "SQL done on {label}");
            Ok(serde_json::json!({ "elapsed_ms": ms }))
        })
        .await
    }
}
