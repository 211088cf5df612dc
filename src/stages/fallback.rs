//! Fallback after the switch: a reverse stream that keeps the old source in step with the target,
//! so that `pgferry rollback` can go back without losing a write made on the target.
//!
//! - **Arming** ([`arm`], called by the cutover of a plan that has a `fallback` stage): after the
//!   drain and the resync, while the source is fenced and before the cutover reports done (the
//!   application has not been switched yet), it creates on each target database a publication of
//!   the selected tables ([`fallback_publication_name`]) and a logical slot with pgoutput
//!   ([`fallback_slot_name`]). Every write of pgferry's forward apply was committed before the
//!   slot's consistent point, which is recorded as the stream's start (`slot:fallback:<db>`) with
//!   the forward slot's final position: that is the position filter. On a PostgreSQL 16+ target
//!   the forward apply also tags its transactions with a replication origin
//!   ([`origin_name`], when its role may) and the reverse stream asks for `origin = 'none'`, a
//!   second guard. Before the fence the cutover checks ([`check_target`]) that every selected
//!   target table has a replica identity, since a published table without one refuses UPDATE and
//!   DELETE.
//! - **The stream** (this stage, after `cutover`): the cdc engine ([`super::cdc`]) with the
//!   endpoints swapped ([`super::cdc::Route`]): target to old source, in commit order, the applied
//!   position in the source database (`<state schema>.cdc_applied`, keyed by the fallback slot) in
//!   the same transaction as the changes, so a killed runner resumes without applying anything
//!   twice. The source stays fenced for the application: the apply session overrides the fence
//!   at startup ([`crate::pg::connect::ConnInfo::past_fence`]). Its records in the store are under `fallback:<db>`
//!   (`cdc_applied:fallback:<db>`, counters, samples), which `status` and `report` show.
//! - **`pgferry rollback PLAN`** records the request `rollback`; the stage then, per database:
//!   fences the target (`default_transaction_read_only`, ends its client sessions except
//!   pgferry's own), records the target's WAL insert position in its checkpoint `drain:<db>` with
//!   the time of the fence, lets the stream apply up to it and stop, brings over what logical
//!   decoding does not carry ([`super::unreplicated`] with the sides swapped: identity columns
//!   the reverse apply relaxed, unlogged tables, large objects, materialized views), sets the
//!   source's sequences from the target's ([`super::sequence_reset`] swapped), drops the slot and
//!   publication, unfences the source and records the write downtime (the fence to the unfence).
//!   A runner killed at any point resumes from the checkpoint; the target stays fenced until the
//!   rollback is done.
//! - **`pgferry fallback-stop PLAN`** ends the stream and drops its slot and publication, so the
//!   target keeps no WAL for it; the source is left as it is (fenced).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_postgres::Client;

use super::cdc::{DbStream, Route, applied_position, drain_key};
use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::pg::catalog;
use crate::pg::ident::quote_ident;
use crate::pg::names::{fallback_publication_name, fallback_slot_name, slot_name};
use crate::pg::pgoutput::Lsn;
use crate::plan::{Database, StageKind, StageOptions};
use crate::state::Timestamp;

/// The operator requests the stage answers (`pgferry rollback`, `pgferry fallback-stop`).
pub const ROLLBACK_REQUEST: &str = "rollback";
pub const STOP_REQUEST: &str = "fallback-stop";

const POLL: Duration = Duration::from_millis(250);

/// The key of the fallback stage's detail holding each database's phase (`streaming`,
/// `rolling_back`, `rolled_back`, `stopped`), which `status` shows.
pub const DETAIL_KEY: &str = "fallback";

/// Records the phase of `db` in the stage's detail.
async fn record_phase(cx: &StageContext, db: &Database, phase: &str) -> Result<()> {
    let mut detail = cx
        .store
        .stages()
        .await?
        .into_iter()
        .find(|r| r.stage == cx.stage)
        .map(|r| r.detail)
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(obj) = detail.as_object_mut() {
        let dbs = obj
            .entry(DETAIL_KEY)
            .or_insert_with(|| serde_json::json!({}));
        if !dbs.is_object() {
            *dbs = serde_json::json!({});
        }
        if let Some(dbs) = dbs.as_object_mut() {
            dbs.insert(db.name.clone(), serde_json::json!(phase));
        }
    }
    cx.store.set_stage_detail(&cx.stage, &detail).await
}

/// The fallback stage's checkpoint saying that the rollback of `db` has brought everything over
/// and dropped the slot: only the unfence is left.
fn synced_key(db: &str) -> String {
    format!("rollback_synced:{db}")
}

/// The name of `db` in the store's records of the fallback stream.
pub fn store_key(db: &str) -> String {
    format!("fallback:{db}")
}

/// The store position holding the fallback slot's consistent point (the stream's start).
pub fn start_position(db: &str) -> String {
    format!("slot:{}", store_key(db))
}

/// The replication origin the forward apply of `db` uses on a 16+ target: the forward slot's name.
pub fn origin_name(migration: &str, db: &str) -> String {
    slot_name(migration, db)
}

/// The reverse route of `db`: the fallback slot on the target, applied to the (fenced) source.
pub fn route(env: &Env, db: &Database, stage: &str) -> Route {
    Route {
        from: env.target_for(db),
        to: env.source_for(db).past_fence(),
        slot: fallback_slot_name(&env.plan.name, &db.name),
        publication: fallback_publication_name(&env.plan.name),
        key: store_key(&db.name),
        drain_stages: vec![stage.to_string()],
        forward: false,
        apply_origin: None,
    }
}

/// The plan with its sides swapped for `db`: what reads "the source" reads the target, what
/// writes "the target" writes the source (past its fence). Used to run the resync and the
/// sequence reset backward.
pub(crate) fn swapped(env: &Env, db: &Database) -> (Env, Database) {
    (
        Env {
            plan: env.plan.clone(),
            source: env.target.clone(),
            target: env.source.past_fence(),
            rehearsal: false,
        },
        Database {
            name: db.target.clone(),
            target: db.name.clone(),
            tables: db.tables.clone(),
            exclude: db.exclude.clone(),
        },
    )
}

/// Whether the plan has a fallback stage (the cutover then arms the reverse stream).
pub fn planned(env: &Env) -> bool {
    env.plan
        .stages
        .iter()
        .any(|s| s.kind == StageKind::Fallback)
}

/// The selected tables of `db` as the target has them.
async fn target_tables(
    env: &Env,
    db: &Database,
    target: &Client,
) -> Result<Vec<catalog::TableInfo>> {
    env.selected_tables(target, db).await
}

/// Refuses a fallback the target cannot carry: a selected table without a replica identity would
/// refuse the application's UPDATE and DELETE once published. Called before the fence.
pub async fn check_target(env: &Env, db: &Database) -> Result<()> {
    let target = env.target_for(db).connect("fallback check").await?;
    let tables = target_tables(env, db, &target).await?;
    let lacking: Vec<String> = tables
        .iter()
        .filter(|t| !t.unlogged && t.kind == "r" && !t.has_usable_identity())
        .map(|t| t.name.to_string())
        .collect();
    if !lacking.is_empty() {
        return Err(Error::permanent(format!(
            "the fallback stream would publish target table(s) without a replica identity, whose UPDATE and DELETE the target would then refuse: {}",
            lacking.join(", ")
        ))
        .hint("give them a primary key or `ALTER TABLE ... REPLICA IDENTITY FULL` on the target, or remove the fallback stage, then run the plan again (the source is not fenced yet)"));
    }
    Ok(())
}

/// What preflight says of a plan with a fallback stage, for `db`: the target must allow logical
/// replication (`wal_level`, a free slot and WAL sender, the REPLICATION privilege), the source
/// must let the reverse apply silence its triggers, and a newer target is named with what the
/// reverse direction means for it. `source`/`target`: what preflight read of each server.
pub async fn preflight_findings(
    env: &Env,
    db: &Database,
    source: &catalog::ServerInfo,
    target: &catalog::ServerInfo,
    target_client: &Client,
) -> Result<Vec<super::preflight::Finding>> {
    use super::preflight::{Finding, Level};
    let mut out = Vec::new();
    let mut add = |level, check, message: String, hint: &str| {
        out.push(Finding {
            level,
            database: db.name.clone(),
            check,
            message,
            hint: (!hint.is_empty()).then(|| hint.to_string()),
            tables: Vec::new(),
        });
    };
    let wal_level = catalog::setting(target_client, "wal_level").await?;
    if wal_level != "logical" {
        add(
            Level::Error,
            "fallback_wal_level",
            format!(
                "target wal_level is `{wal_level}`; the fallback stream (reverse replication after the cutover) needs `logical` on the target"
            ),
            "ALTER SYSTEM SET wal_level = logical on the target, then restart it (on managed services: the logical replication parameter); or remove the fallback stage",
        );
    }
    let (max_slots, used_slots, max_senders, used_senders) =
        catalog::replication_capacity(target_client).await?;
    let need = env.plan.databases.len() as i64;
    if max_slots - used_slots < need {
        add(
            Level::Error,
            "fallback_replication_slots",
            format!(
                "the target has {} free replication slot(s) of {max_slots}; the fallback stream needs {need}",
                max_slots - used_slots
            ),
            "raise max_replication_slots on the target (restart needed)",
        );
    }
    if max_senders - used_senders < need {
        add(
            Level::Error,
            "fallback_wal_senders",
            format!(
                "the target has {} free WAL sender(s) of {max_senders}; the fallback stream needs {need}",
                max_senders - used_senders
            ),
            "raise max_wal_senders on the target (restart needed)",
        );
    }
    if !target.is_superuser && !target.can_replicate {
        add(
            Level::Error,
            "fallback_replication_privilege",
            format!(
                "target role {} may not replicate, so the fallback stream cannot read the target",
                target.current_user
            ),
            "ALTER ROLE ... REPLICATION on the target (on managed services: the provider's replication role)",
        );
    }
    if !source.is_superuser {
        add(
            Level::Warning,
            "fallback_apply_role",
            format!(
                "source role {} is not a superuser: the fallback stream applies to the source with session_replication_role = replica, which needs a superuser or (PostgreSQL 15+) GRANT SET ON PARAMETER session_replication_role",
                source.current_user
            ),
            "grant it before the cutover, or the fallback stage fails at its first change",
        );
    }
    let (sv, tv) = (source.server_version(), target.server_version());
    if tv.pgoutput_origin_filter() && !target.is_superuser {
        add(
            Level::Info,
            "fallback_origin",
            format!(
                "target role {} is not a superuser: the forward apply may not be able to tag its writes with a replication origin; the fallback stream then leaves them out by position only (its slot is created after the last of them)",
                target.current_user
            ),
            "",
        );
    }
    if tv.major() > sv.major() {
        add(
            Level::Info,
            "fallback_versions",
            format!(
                "a rollback goes from PostgreSQL {} back to {}: the target's schema came from the source, so every type and table the stream carries exists there; what {} has that {} lacks must not be added on the target after the cutover (new column types or options, virtual generated columns on 18, ...): a schema change on the target stops the fallback stream with the difference named, and the source must be given the same change by hand",
                target.version,
                source.version,
                tv.major(),
                sv.major()
            ),
            "",
        );
    }
    Ok(out)
}

/// Creates the fallback publication and slot on the target of `db` (or finds them from an earlier
/// attempt) and records the slot's consistent point as the reverse stream's start. `forward` is
/// the forward stream's final position (the drain target). Returns what the cutover records.
pub async fn arm(
    env: &Env,
    cx: &StageContext,
    db: &Database,
    forward: Lsn,
) -> Result<serde_json::Value> {
    let (target, version) = env.target_for(db).connect_versioned("fallback arm").await?;
    let publication = fallback_publication_name(&env.plan.name);
    let slot = fallback_slot_name(&env.plan.name, &db.name);
    let by_root = version.publishes_partitioned_tables();
    let tables =
        crate::pg::publication::tables_to_publish(&target_tables(env, db, &target).await?, by_root);
    if !crate::pg::publication::exists(&target, &publication, "the fallback publication").await? {
        let sql = crate::pg::publication::create_sql(&publication, &tables, by_root);
        target.batch_execute(&sql).await.map_err(|e| {
            Error::pg(
                &e,
                format!("creating publication {publication} on the target"),
            )
        })?;
    }
    let existing: Option<String> = target
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking up the fallback slot"))?
        .and_then(|r| r.get(0));
    let start: Lsn = match existing {
        // An earlier attempt created it; nothing has consumed it since (the cutover is not done).
        Some(l) => l.parse()?,
        None => {
            let l: String = target
                .query_one(
                    "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
                .map_err(|e| {
                    Error::pg(&e, format!("creating the fallback slot {slot} on the target"))
                        .hint("the target needs wal_level = logical, a free replication slot (max_replication_slots) and a role with REPLICATION; `pgferry plan PLAN` lists what preflight found")
                })?
                .get(0);
            l.parse()?
        }
    };
    cx.store
        .advance_position(&start_position(&db.name), start)
        .await?;
    let origin_filter = version.pgoutput_origin_filter();
    let msg = format!(
        "fallback armed for {} <- {}: slot {slot} on the target from {start} (forward stream ended at {forward}); changes made on the target from now on go back to the source{}",
        db.name,
        db.target,
        if origin_filter {
            ", leaving out those written under pgferry's replication origin"
        } else {
            ""
        }
    );
    tracing::info!("{msg}");
    cx.store.event(Some(&cx.stage), "info", &msg).await?;
    Ok(serde_json::json!({
        "slot": slot,
        "publication": publication,
        "start_lsn": start.to_string(),
        "forward_lsn": forward.to_string(),
        "origin_filter": origin_filter,
        "tables": tables.len(),
    }))
}

/// Drops the fallback slot and publication of `db` on the target, and the forward apply's
/// replication origin. Missing ones are fine.
pub async fn drop_objects(env: &Env, db: &Database) -> Result<()> {
    let target = env
        .target_for(db)
        .past_fence()
        .connect("fallback cleanup")
        .await?;
    let slot = fallback_slot_name(&env.plan.name, &db.name);
    let publication = fallback_publication_name(&env.plan.name);
    // The walsender of a stream that just ended may hold the slot a moment longer.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = target
            .execute(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() < until && e.code().map(|c| c.code()) == Some("55006") => {
                tokio::time::sleep(POLL).await;
            }
            Err(e) => return Err(Error::pg(&e, format!("dropping the fallback slot {slot}"))),
        }
    }
    target
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            quote_ident(&publication)
        ))
        .await
        .map_err(|e| Error::pg(&e, format!("dropping publication {publication}")))?;
    {
        let origin = origin_name(&env.plan.name, &db.name);
        // Only pgferry's forward apply uses it, and it has finished; a role that may not drop it
        // leaves a harmless name behind.
        if let Err(e) = target
            .execute(
                "SELECT pg_catalog.pg_replication_origin_drop(roname) FROM pg_catalog.pg_replication_origin WHERE roname = $1",
                &[&origin],
            )
            .await
        {
            tracing::warn!(database = %db.target, error = %e, "could not drop replication origin {origin}");
        }
    }
    Ok(())
}

struct Options {
    timeout: Duration,
}

pub struct Fallback {
    env: Arc<Env>,
    index: usize,
}

/// What ended the stream.
enum Ending {
    Rollback,
    Stop(String),
}

impl Fallback {
    pub fn new(env: Arc<Env>, index: usize) -> Fallback {
        Fallback { env, index }
    }

    fn options(&self, db: usize) -> Options {
        let o = match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::Fallback(o)) => o.clone(),
            _ => Default::default(),
        };
        Options {
            timeout: o.timeout(),
        }
    }

    async fn sleep(&self, cx: &StageContext, d: Duration) -> Result<()> {
        tokio::select! {
            _ = cx.cancel.cancelled() => Err(Error::interrupted()),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }

    /// The rollback's drain checkpoint of `db`, if an earlier attempt fenced the target:
    /// (LSN, fence time in Unix ms).
    async fn drain(&self, cx: &StageContext, db: &Database) -> Result<Option<(Lsn, i64)>> {
        let v = cx.store.checkpoint(&cx.stage, &drain_key(&db.name)).await?;
        let Some(v) = v else { return Ok(None) };
        let lsn = v
            .get("lsn")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| Error::permanent("the rollback's drain checkpoint has no lsn"))?;
        let at = v
            .get("fenced_at_ms")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or_else(crate::lag::now_ms);
        Ok(Some((lsn.parse()?, at)))
    }

    /// Waits for `pgferry rollback` or `pgferry fallback-stop`.
    async fn watch(&self, cx: &StageContext) -> Result<Ending> {
        let store = &cx.store;
        loop {
            if store.requested(ROLLBACK_REQUEST).await?.is_some() {
                return Ok(Ending::Rollback);
            }
            if let Some(at) = store.requested(STOP_REQUEST).await? {
                return Ok(Ending::Stop(format!("`pgferry fallback-stop` at {at}")));
            }
            self.sleep(cx, Duration::from_secs(1)).await?;
        }
    }

    /// Fences the target database of `db` and records the drain target: the target's WAL insert
    /// position once no session of the application is left.
    async fn fence_target(&self, cx: &StageContext, db: &Database) -> Result<(Lsn, i64)> {
        let fenced_at = crate::lag::now_ms();
        let target = self
            .env
            .target_for(db)
            .past_fence()
            .connect("rollback")
            .await?;
        target
            .batch_execute(&format!(
                "ALTER DATABASE {} SET default_transaction_read_only = on",
                quote_ident(&db.target)
            ))
            .await
            .map_err(|e| Error::pg(&e, "fencing the target database (read only)"))?;
        let warn = format!(
            "rollback: target database {} is now read-only; the source takes the writes again once the fallback stream has drained",
            db.target
        );
        tracing::warn!("{warn}");
        cx.store.event(Some(&cx.stage), "warn", &warn).await?;
        // The application's sessions end; pgferry's own (the checkpoint store may live here) stay.
        let others = "FROM pg_catalog.pg_stat_activity WHERE datname = $1 AND pid <> pg_catalog.pg_backend_pid() \
                      AND backend_type = 'client backend' AND coalesce(application_name, '') NOT LIKE 'pgferry %'";
        target
            .execute(
                &format!("SELECT pg_catalog.pg_terminate_backend(pid) {others}"),
                &[&db.target],
            )
            .await
            .map_err(|e| Error::pg(&e, "terminating the target database's sessions"))?;
        let gone_by = Instant::now() + Duration::from_secs(10);
        loop {
            let left: i64 = target
                .query_one(&format!("SELECT count(*) {others}"), &[&db.target])
                .await
                .map_err(|e| Error::pg(&e, "waiting for the target's sessions to end"))?
                .get(0);
            if left == 0 || Instant::now() > gone_by {
                break;
            }
            self.sleep(cx, Duration::from_millis(50)).await?;
        }
        let lsn: String = target
            .query_one("SELECT pg_catalog.pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(|e| Error::pg(&e, "reading the target's WAL position"))?
            .get(0);
        let lsn: Lsn = lsn.parse()?;
        cx.store
            .put_checkpoint(
                &cx.stage,
                &drain_key(&db.name),
                &serde_json::json!({ "lsn": lsn.to_string(), "fenced_at_ms": fenced_at }),
            )
            .await?;
        Ok((lsn, fenced_at))
    }

    /// After the drain: what logical decoding does not carry, the sequences, the cleanup and the
    /// unfence. Every step is idempotent, so a resumed rollback repeats them safely.
    async fn finish_rollback(
        &self,
        cx: &StageContext,
        db: &Database,
        lsn: Lsn,
        fenced_at_ms: i64,
    ) -> Result<serde_json::Value> {
        // Once the source holds everything (resync, sequences) and the slot is gone, a checkpoint
        // says so: a resumed rollback must not set the sequences again after the unfence (the
        // application may have moved them on) nor stream from the dropped slot.
        let synced_key = synced_key(&db.name);
        let synced = match cx.store.checkpoint(&cx.stage, &synced_key).await? {
            Some(v) => v,
            None => {
                let (env, back) = swapped(&self.env, db);
                let env = Arc::new(env);
                let resync = super::unreplicated::resync(&env, &back, &cx.cancel)
                    .await
                    .map_err(|e| {
                        e.context(
                            "copying what logical replication does not carry back to the source",
                        )
                    })?;
                let (sequences, changed) =
                    super::sequence_reset::SequenceReset::new(env.clone(), self.index)
                        .reset(cx, &back)
                        .await
                        .map_err(|e| {
                            e.context("setting the source's sequences from the target's")
                        })?;
                drop_objects(&self.env, db).await?;
                let v = serde_json::json!({
                    "sequences": sequences,
                    "sequences_changed": changed,
                    "resync": resync,
                });
                cx.store.put_checkpoint(&cx.stage, &synced_key, &v).await?;
                v
            }
        };
        let field = |k: &str| synced.get(k).cloned().unwrap_or(serde_json::Value::Null);
        let source = self
            .env
            .source_for(db)
            .past_fence()
            .with_dbname("postgres")
            .connect("rollback")
            .await?;
        source
            .batch_execute(&format!(
                "ALTER DATABASE {} RESET default_transaction_read_only",
                quote_ident(&db.name)
            ))
            .await
            .map_err(|e| Error::pg(&e, "unfencing the source database"))?;
        let downtime = (crate::lag::now_ms() - fenced_at_ms).max(0) as f64 / 1000.0;
        let msg = format!(
            "rollback of {} <- {} done at {lsn}: the source is writable again and has every write made on the target; write downtime {downtime:.1}s; the target stays read-only",
            db.name, db.target
        );
        tracing::info!("{msg}");
        cx.store.event(Some(&cx.stage), "info", &msg).await?;
        Ok(serde_json::json!({
            "outcome": "rolled_back",
            "lsn": lsn.to_string(),
            "downtime_seconds": downtime,
            "sequences": field("sequences"),
            "sequences_changed": field("sequences_changed"),
            "resync": field("resync"),
            "finished_at": Timestamp::now(),
        }))
    }

    /// Ends the fallback of `db` without a rollback: drops the slot and publication, puts back
    /// the source's identity columns the reverse apply relaxed. Idempotent.
    async fn stop(&self, cx: &StageContext, db: &Database, why: &str) -> Result<()> {
        drop_objects(&self.env, db).await?;
        let (env, back) = swapped(&self.env, db);
        let source = env.target_for(&back).connect("fallback stop").await?;
        super::cdc::identity::restore(&source, &self.env.plan.state.schema).await?;
        let msg = format!(
            "fallback of {} stopped ({why}): slot and publication dropped on the target; the source stays fenced and is no longer kept in step",
            db.name
        );
        tracing::info!("{msg}");
        cx.store.event(Some(&cx.stage), "info", &msg).await?;
        record_phase(cx, db, "stopped").await?;
        cx.mark_done(
            &format!("database:{}", db.name),
            serde_json::json!({ "outcome": "stopped", "reason": why, "finished_at": Timestamp::now() }),
        )
        .await
    }

    async fn database(&self, cx: &StageContext, db: &Database, o: &Options) -> Result<()> {
        let key = format!("database:{}", db.name);
        if cx.is_done(&key).await? {
            return Ok(());
        }
        if cx
            .store
            .position(&start_position(&db.name))
            .await?
            .is_none()
        {
            return Err(Error::permanent(format!(
                "the cutover did not arm a fallback stream for database `{}` (no slot position recorded)",
                db.name
            ))
            .hint("the cutover arms it when the plan has a fallback stage; a cutover that finished before the stage was added cannot be taken back without losing the target's writes (`pgferry unfence`)"));
        }
        let mut drain = self.drain(cx, db).await?;
        if let Some((lsn, fenced_at)) = drain
            && cx
                .store
                .checkpoint(&cx.stage, &synced_key(&db.name))
                .await?
                .is_some()
        {
            // Killed after the slot was dropped: only the unfence is left.
            let detail = self.finish_rollback(cx, db, lsn, fenced_at).await?;
            record_phase(cx, db, "rolled_back").await?;
            return cx.mark_done(&key, detail).await;
        }
        // A request recorded while no runner streamed (or before a crash): acted on before the
        // stream starts (a stopped fallback's slot may be gone already).
        if drain.is_none() {
            if cx.store.requested(ROLLBACK_REQUEST).await?.is_some() {
                record_phase(cx, db, "rolling_back").await?;
                drain = Some(self.fence_target(cx, db).await?);
            } else if let Some(at) = cx.store.requested(STOP_REQUEST).await? {
                return self
                    .stop(cx, db, &format!("`pgferry fallback-stop` at {at}"))
                    .await;
            }
        }
        let sub_cancel = cx.cancel.child_token();
        let sub = StageContext::new(
            &cx.stage,
            cx.attempt,
            cx.store.clone(),
            sub_cancel.clone(),
            None,
        );
        let batch = crate::plan::raw::CdcOptions::default();
        let mut stream = DbStream::new(
            &self.env,
            &sub,
            db,
            route(&self.env, db, &cx.stage),
            u64::from(batch.batch_changes()),
            batch.batch_delay(),
        );
        let name = db.name.clone();
        let caught_up = move || {
            tracing::info!(database = %name, "fallback stream caught up: the source holds every write committed on the target");
        };
        record_phase(
            cx,
            db,
            if drain.is_some() {
                "rolling_back"
            } else {
                "streaming"
            },
        )
        .await?;
        let streamed = stream.run(caught_up);
        tokio::pin!(streamed);
        let mut stopped: Option<String> = None;
        if drain.is_none() {
            tokio::select! {
                r = &mut streamed => {
                    // Without a drain target the stream only ends on an error.
                    r?;
                    return Err(Error::permanent("internal: the fallback stream ended without a drain target"));
                }
                w = self.watch(cx) => match w? {
                    Ending::Rollback => {
                        record_phase(cx, db, "rolling_back").await?;
                        drain = Some(self.fence_target(cx, db).await?);
                    }
                    Ending::Stop(why) => stopped = Some(why),
                },
            }
        }
        if let Some(why) = stopped {
            sub_cancel.cancel();
            match streamed.await {
                Err(e) if e.kind == crate::error::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            return self.stop(cx, db, &why).await;
        }
        let Some((lsn, fenced_at)) = drain else {
            return Err(Error::permanent(
                "internal: rollback without a drain target",
            ));
        };
        let msg = format!(
            "rollback of {}: target fenced, the fallback stream drains to {lsn}",
            db.name
        );
        tracing::info!("{msg}");
        cx.store.event(Some(&cx.stage), "info", &msg).await?;
        let deadline = tokio::time::sleep(o.timeout);
        tokio::select! {
            r = &mut streamed => r?,
            _ = deadline => {
                let applied = cx.store.position(&applied_position(&store_key(&db.name))).await?;
                return Err(Error::permanent(format!(
                    "the fallback stream did not drain to {lsn} within {} (applied: {})",
                    humantime::format_duration(o.timeout),
                    applied.map_or_else(|| "none".into(), |a| a.to_string())
                ))
                .hint("the target stays read-only and the source fenced, so nothing is lost; look at the errors (`pgferry status PLAN`), then `pgferry run PLAN` resumes the rollback"));
            }
        }
        let detail = self.finish_rollback(cx, db, lsn, fenced_at).await?;
        record_phase(cx, db, "rolled_back").await?;
        cx.mark_done(&key, detail).await
    }
}

#[async_trait]
impl Stage for Fallback {
    fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, db) in self.env.plan.databases.iter().enumerate() {
            let o = self.options(i);
            out.push(format!(
                "keep the source {} in step with the target {} after the cutover: stream slot {} (publication {}, armed by the cutover) back to the fenced source until `pgferry rollback` (fence the target, drain within {}, sequences, unfence the source) or `pgferry fallback-stop`",
                db.name,
                db.target,
                fallback_slot_name(&self.env.plan.name, &db.name),
                fallback_publication_name(&self.env.plan.name),
                humantime::format_duration(o.timeout),
            ));
        }
        out
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        if self.env.rehearsal {
            // A rehearsal's cutover fences nothing and arms nothing: the source keeps being
            // written, so there is no way back to keep in step.
            for db in &self.env.plan.databases {
                let msg = format!(
                    "rehearsal: no fallback stream for {} (the rehearsal's cutover did not fence the source, so it arms none)",
                    db.name
                );
                tracing::info!("{msg}");
                cx.store.event(Some(&cx.stage), "info", &msg).await?;
                cx.mark_done(
                    &format!("database:{}", db.name),
                    serde_json::json!({ "outcome": "rehearsal" }),
                )
                .await?;
            }
            return Ok(());
        }
        let futures = self
            .env
            .plan
            .databases
            .iter()
            .enumerate()
            .map(|(i, db)| async move {
                let o = self.options(i);
                self.database(cx, db, &o)
                    .await
                    .map_err(|e| e.context(format!("database `{}`", db.name)))
            });
        futures_util::future::try_join_all(futures).await?;
        Ok(())
    }
}
