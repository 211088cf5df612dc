//! The `cleanup` stage: drops what the migration created on the source — each database's logical
//! replication slot (which otherwise retains WAL forever) and the publication — once the target has
//! taken over. The checkpoint store stays as the audit record of the migration until `pgferry reset`.
//! It puts back the original replica identity of the source tables provision gave one
//! ([`super::replica_identity`]). On the target it makes the identity columns cdc relaxed `GENERATED ALWAYS` again
//! ([`super::cdc::identity`]; the cutover does it too, so this finds nothing after one).
//! `reset` uses the same teardown.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::pg::ident::quote_ident;
use crate::pg::names::{publication_name, slot_name};
use crate::plan::{Database, StageOptions};

pub struct Cleanup {
    env: Arc<Env>,
    index: usize,
}

impl Cleanup {
    pub fn new(env: Arc<Env>, index: usize) -> Cleanup {
        Cleanup { env, index }
    }

    fn options(&self, db: usize) -> (bool, bool) {
        match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::Cleanup(o)) => (o.drop_slot(), o.drop_publication()),
            _ => {
                let o = crate::plan::raw::CleanupOptions::default();
                (o.drop_slot(), o.drop_publication())
            }
        }
    }
}

#[async_trait]
impl Stage for Cleanup {
    fn describe(&self) -> Vec<String> {
        self.env
            .plan
            .databases
            .iter()
            .enumerate()
            .map(|(i, db)| {
                let (slot, publication) = self.options(i);
                let mut what = Vec::new();
                if slot {
                    what.push(format!(
                        "replication slot {}",
                        slot_name(&self.env.plan.name, &db.name)
                    ));
                }
                if publication {
                    what.push(format!(
                        "publication {}",
                        publication_name(&self.env.plan.name)
                    ));
                }
                if what.is_empty() {
                    format!(
                        "on source database {}: nothing (drop_slot and drop_publication are off)",
                        db.name
                    )
                } else {
                    format!(
                        "on source database {}: drop {}",
                        db.name,
                        what.join(" and ")
                    )
                }
            })
            .collect()
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        for (i, db) in self.env.plan.databases.iter().enumerate() {
            cx.check_cancelled()?;
            let (slot, publication) = self.options(i);
            let lines = drop_source_objects(&self.env, db, slot, publication)
                .await
                .map_err(|e| e.context(format!("source database `{}`", db.name)))?;
            for l in &lines {
                tracing::info!(stage = %cx.stage, "{l}");
                cx.store.event(Some(&cx.stage), "info", l).await?;
            }
            let dropped = lines.len();
            let mut lines = lines;
            lines.extend(
                restore_source_identities(&self.env, db, cx.store.as_ref())
                    .await
                    .map_err(|e| e.context(format!("source database `{}`", db.name)))?,
            );
            for l in lines.iter().skip(dropped) {
                tracing::info!(stage = %cx.stage, "{l}");
                cx.store.event(Some(&cx.stage), "info", l).await?;
            }
            let restored = restore_target_objects(&self.env, db)
                .await
                .map_err(|e| e.context(format!("target database `{}`", db.target)))?;
            for l in &restored {
                tracing::info!(stage = %cx.stage, "{l}");
                cx.store.event(Some(&cx.stage), "info", l).await?;
            }
            if cx.store.counter(&db.name, "managedApply").await?.is_some() {
                cx.store
                    .set_counters(&[
                        (db.name.clone(), "heldTriggers".into(), 0),
                        (db.name.clone(), "heldForeignKeys".into(), 0),
                        (db.name.clone(), "unvalidatedForeignKeys".into(), 0),
                    ])
                    .await?;
            }
            if lines.is_empty() && restored.is_empty() {
                tracing::info!(stage = %cx.stage, database = %db.name, "nothing left to drop");
            }
        }
        Ok(())
    }
}

/// Puts back the original replica identity of the source tables provision gave one
/// (`replica_identity = "index"` / `"full"`), once the publication is gone. Idempotent; a source
/// database that does not exist has nothing to restore.
pub async fn restore_source_identities(
    env: &Env,
    db: &Database,
    store: &dyn crate::state::StateStore,
) -> Result<Vec<String>> {
    let client = match env.source_for(db).past_fence().connect("cleanup").await {
        Ok(c) => c,
        Err(e) if e.sqlstate.as_deref() == Some("3D000") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(|e| Error::pg(&e, "making the cleanup session read-write"))?;
    super::replica_identity::restore(&client, store, &env.plan.name, &db.name).await
}

/// Puts back on one target database what cdc changed there for its apply: identity columns it made
/// `GENERATED BY DEFAULT` are `GENERATED ALWAYS` again; triggers, rules and foreign keys the
/// managed apply held are back, the foreign keys validated ([`super::cdc::managed`]). Returns one line per change. Idempotent; a
/// target database that does not exist has nothing to restore.
pub async fn restore_target_objects(env: &Env, db: &Database) -> Result<Vec<String>> {
    let client = match env.target_for(db).connect("cleanup").await {
        Ok(c) => c,
        Err(e) if e.sqlstate.as_deref() == Some("3D000") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut lines = super::cdc::identity::restore(&client, &env.plan.state.schema).await?;
    lines.extend(super::cdc::managed::restore_and_validate(&client, &env.plan.state.schema).await?);
    Ok(lines
        .into_iter()
        .map(|l| format!("{l} (target database {})", db.target))
        .collect())
}

/// Drops the migration's slot and publication in one source database, if they exist. Returns what
/// was done, one line each. Idempotent.
pub async fn drop_source_objects(
    env: &Env,
    db: &Database,
    drop_slot: bool,
    drop_publication: bool,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let client = match env.source_for(db).past_fence().connect("cleanup").await {
        Ok(c) => c,
        // The source database is gone: nothing of ours can be left in it.
        Err(e) if e.sqlstate.as_deref() == Some("3D000") => return Ok(out),
        Err(e) => return Err(e),
    };
    // After the cutover the source database is fenced (`default_transaction_read_only`); our
    // own session may still drop what we created there.
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(|e| Error::pg(&e, "making the cleanup session read-write"))?;
    let migration = &env.plan.name;
    if drop_slot {
        let slot = slot_name(migration, &db.name);
        let row = client
            .query_opt(
                "SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking for the replication slot"))?;
        if let Some(row) = row {
            if let Some(pid) = row.get::<_, Option<i32>>(0) {
                // A leftover session of a killed runner may still hold it.
                client
                    .execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid])
                    .await
                    .map_err(|e| {
                        Error::pg(
                            &e,
                            format!("ending the session (pid {pid}) that holds slot {slot}"),
                        )
                    })?;
                for _ in 0..50 {
                    let active: Option<bool> = client
                        .query_opt("SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = $1", &[&slot])
                        .await
                        .map_err(|e| Error::pg(&e, "looking for the replication slot"))?
                        .map(|r| r.get(0));
                    if active != Some(true) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
            client
                .execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&slot])
                .await
                .map_err(|e| Error::pg(&e, format!("dropping replication slot {slot}")))?;
            out.push(format!(
                "dropped replication slot {slot} on source database {}",
                db.name
            ));
        }
    }
    // The DDL capture (`ddl = "replicate"`) has no use once cdc is over, whatever is kept.
    if crate::pg::event_trigger::remove(&client, migration).await? {
        out.push(format!(
            "removed the DDL capture (event triggers) from source database {}",
            db.name
        ));
    }
    if drop_publication {
        let publication = publication_name(migration);
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
                &[&publication],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking for the publication"))?
            .get(0);
        if exists {
            client
                .batch_execute(&format!(
                    "DROP PUBLICATION IF EXISTS {}",
                    quote_ident(&publication)
                ))
                .await
                .map_err(|e| Error::pg(&e, format!("dropping publication {publication}")))?;
            out.push(format!(
                "dropped publication {publication} on source database {}",
                db.name
            ));
        }
    }
    Ok(out)
}
