//! The `post_data` stage: builds what `provision` left out (indexes, constraints, foreign keys,
//! triggers, rules, policies, comments, privileges, materialized view data) on each target
//! database, from the post-data script `schema_dump` stored as an artifact.
//!
//! The script is parsed into objects ([`crate::pg::post_data_script`]) and built in five phases:
//! 1. indexes and constraints (primary key, unique, exclusion, check), `jobs` at a time, the largest
//!    tables first;
//! 2. the index attachments of partitions, in file order;
//! 3. foreign keys, `jobs` at a time;
//! 4. everything else (triggers, rules, policies, comments, privileges, ...) in file order;
//! 5. materialized view refreshes, in file order.
//!
//! When the stage runs beside a full_load that is still copying (the executor's overlap contract,
//! see `executor.rs`), phase 1 does not wait for the load: an object starts as soon as the load has
//! checkpointed its table copied, and every ordinary table under it (inheritance children and
//! partitions, which a constraint recurses into and a partitioned index covers); an object whose
//! table cannot be read waits for the whole load. The builds use their `jobs` sessions while the
//! load uses its own (measured: a share of them was slower). Phases 2-5 start once the load of the
//! database is over.
//!
//! In the parallel phases two objects never run at the same time when their locks would make one
//! wait for (or deadlock with) the other: index builds on one table share it, but a constraint or a
//! foreign key has its tables to itself. Each session gets the script's session settings (the
//! preamble and later `SET`s such as `default_tablespace`, as in effect at the object), then
//! `maintenance_work_mem`, `synchronous_commit = off` and `statement_timeout = 0`.
//!
//! Every object is checkpointed when it has committed (key `database:DB:item:TYPE:SCHEMA.NAME`), so
//! a resumed run skips what is built. A run killed between an object's commit and its checkpoint
//! meets "already exists" the next time: for CREATE INDEX, ADD CONSTRAINT, CREATE TRIGGER, CREATE RULE
//! and CREATE POLICY objects, an object of that name on that table found in the target's catalog
//! counts as built (an index must also be valid). Deadlocks and lock timeouts are retried in place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{Env, Stage, StageContext, Upstream, UpstreamState, post_data_artifact};
use crate::error::{Error, ErrorKind, Result};
use crate::pg::ident::QualifiedName;
use crate::pg::post_data_script::{self, Item, ObjectKind, Phase, TableObject};
use crate::plan::raw::PostDataOptions;
use crate::plan::units::{ByteSize, human_bytes};
use crate::plan::{Database, StageKind, StageOptions};
use crate::state::{TableProgress, TableState};

const MAX_JOBS: u32 = 256;
/// PostgreSQL's minimum.
const MIN_MAINTENANCE_WORK_MEM: u64 = 1 << 20;
/// More than this per session is almost certainly a mistake (the target may use `jobs` times it).
const MAX_MAINTENANCE_WORK_MEM: u64 = 64 << 30;
/// Deadlocks and lock timeouts are retried in place this many times before the stage gives up.
const LOCK_RETRIES: u32 = 3;
/// At most this many objects of a serial phase run in one transaction.
const MAX_GROUP: usize = 50;

pub struct PostData {
    env: Arc<Env>,
    index: usize,
}

/// How an object ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Built,
    /// Found on the target already (an earlier run that was killed before its checkpoint, or by
    /// hand).
    Existed,
}

/// What one database's run needs while it builds objects.
struct DbRun<'a> {
    cx: &'a StageContext,
    db: &'a Database,
    clients: Vec<Client>,
    /// Per session: the script's settings last applied on it, when known (an object with the same
    /// settings does not send them again).
    applied: Vec<std::sync::Mutex<Option<Vec<String>>>>,
}

impl PostData {
    pub fn new(env: Arc<Env>, index: usize) -> PostData {
        PostData { env, index }
    }

    fn options(&self, db: usize) -> PostDataOptions {
        match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::PostData(o)) => o.clone(),
            _ => PostDataOptions::default(),
        }
    }

    fn jobs(o: &PostDataOptions) -> usize {
        o.jobs().clamp(1, MAX_JOBS) as usize
    }

    /// `maintenance_work_mem` in bytes, within [1 MB, 64 GB].
    fn maintenance_work_mem(o: &PostDataOptions) -> u64 {
        o.maintenance_work_mem()
            .clamp(MIN_MAINTENANCE_WORK_MEM, MAX_MAINTENANCE_WORK_MEM)
    }

    /// Builds one database's post-data objects; returns the summary kept in its checkpoint.
    async fn run_database(
        &self,
        cx: &StageContext,
        i: usize,
        db: &Database,
    ) -> Result<serde_json::Value> {
        let started = Instant::now();
        let name = post_data_artifact(db);
        let Some(bytes) = cx.store.artifact(&name).await? else {
            return Err(Error::permanent(format!(
                "the post-data schema of database `{}` (artifact `{name}`) is not in the checkpoint store: run the schema_dump stage first",
                db.name
            ))
            .hint("add a `schema_dump` stage to this stage's `after` list, or run it first with `pgferry run PLAN --until STAGE`"));
        };
        let text = String::from_utf8(bytes).map_err(|_| {
            Error::permanent(format!("artifact `{name}` is not UTF-8 text"))
                .hint("the schema dump must be written in UTF-8 (pg_dump/pg_restore --encoding=UTF8); run schema_dump again")
        })?;
        let script =
            post_data_script::parse(&text).map_err(|e| e.context(format!("artifact `{name}`")))?;
        let keys = item_keys(&db.name, &script.items);

        // What earlier runs or attempts finished: asked all at once (the store's session pipelines
        // the reads; one round trip each, in sequence, is most of a second on hundreds of objects).
        let done =
            futures_util::future::try_join_all(keys.iter().map(|key| cx.is_done(key))).await?;
        let pending: Vec<usize> = (0..keys.len()).filter(|&n| !done[n]).collect();
        let total = script.items.len();
        let skipped = total - pending.len();
        if skipped > 0 {
            tracing::info!(stage = %cx.stage, database = %db.name, "{skipped} of {total} post-data objects already built, resuming");
        }
        if pending.is_empty() {
            // Built in an earlier run beside a load that is not over: what follows this database
            // (its statistics, the next database) still waits for the load.
            if let Some(mut upstream) = self.load_feed(cx, db).await? {
                wait_load_finished(cx, &mut upstream, db).await?;
            }
            return Ok(
                json!({ "objects": total, "built": 0, "already_existed": 0, "skipped": skipped }),
            );
        }

        let o = self.options(i);
        let jobs = Self::jobs(&o);
        let mwm = Self::maintenance_work_mem(&o);
        if let Some(ByteSize(asked)) = o.maintenance_work_mem
            && asked != mwm
        {
            tracing::warn!(stage = %cx.stage, database = %db.name,
                "maintenance_work_mem {} is outside [1 MB, 64 GB]; using {}", human_bytes(asked), human_bytes(mwm));
        }
        let widest = [Phase::Indexes, Phase::ForeignKeys]
            .iter()
            .map(|p| {
                pending
                    .iter()
                    .filter(|&&n| script.items[n].phase() == *p)
                    .count()
            })
            .max()
            .unwrap_or(0);
        let sessions = jobs.min(widest).max(1);
        let conn = self.env.target_for(db);
        let label = format!("target database `{}`", db.target);
        let opened = futures_util::future::try_join_all((0..sessions).map(|s| {
            let conn = conn.clone();
            let purpose = format!("post_data {} #{}", cx.stage, s + 1);
            async move {
                let client = conn.connect(&purpose).await?;
                client
                    .batch_execute(&format!(
                        "SET maintenance_work_mem = '{}kB'; SET synchronous_commit = off; SET statement_timeout = 0",
                        mwm / 1024
                    ))
                    .await
                    .map_err(|e| Error::pg(&e, "configuring a session"))?;
                Ok::<_, Error>(client)
            }
        }));
        let clients = tokio::select! {
            r = opened => r.map_err(|e| e.context(label.clone()))?,
            _ = cx.cancel.cancelled() => return Err(Error::interrupted()),
        };
        let sizes = table_sizes(&clients[0])
            .await
            .map_err(|e| e.context(label.clone()))?;
        let applied = clients
            .iter()
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        let run = DbRun {
            cx,
            db,
            clients,
            applied,
        };

        // A load still running beside this stage: phase 1 builds each table's objects once the
        // load has checkpointed the table (and its inheritance children) copied; the later phases
        // wait for the whole load.
        let mut feed = match self.load_feed(cx, db).await? {
            Some(upstream) => {
                let tables = data_tables(&run.clients[0])
                    .await
                    .map_err(|e| e.context(label.clone()))?;
                Some(LoadFeed::new(upstream, &tables, &script.items, &pending))
            }
            None => None,
        };

        let mut built = 0;
        let mut existed = 0;
        for phase in Phase::ALL {
            if phase != Phase::Indexes
                && let Some(f) = feed.as_mut()
            {
                f.wait_loaded(cx, db).await?;
                feed = None;
            }
            let mut items: Vec<usize> = pending
                .iter()
                .copied()
                .filter(|&n| script.items[n].phase() == phase)
                .collect();
            if items.is_empty() {
                continue;
            }
            if phase.parallel() {
                // The longest builds first, so the short ones fill in around them: the table's size
                // weighted by how costly the index method is to build (GIN and GiST far more than
                // B-tree; BRIN far less).
                longest_first(&mut items, &script.items, |item| {
                    item.locks()
                        .and_then(|l| l.first().and_then(|(t, _)| sizes.get(t).copied()))
                        .unwrap_or(0)
                });
            }
            let limit = if phase.parallel() {
                run.clients.len()
            } else {
                1
            };
            tracing::info!(stage = %cx.stage, database = %db.name,
                "building {} {} ({} at a time)", items.len(), phase.describe(), limit);
            let gate = if phase == Phase::Indexes {
                feed.as_mut()
            } else {
                None
            };
            let (b, e) = if matches!(phase, Phase::Attach | Phase::Other) {
                self.run_grouped(&run, &script.items, &keys, &items).await?
            } else {
                self.run_phase(&run, &script.items, &keys, &items, limit, gate, &sizes)
                    .await?
            };
            built += b;
            existed += e;
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let msg = format!(
            "database `{}`: {built} post-data objects built{} in {:.1}s{}",
            db.name,
            if existed > 0 {
                format!(", {existed} found already built")
            } else {
                String::new()
            },
            elapsed_ms as f64 / 1000.0,
            if skipped > 0 {
                format!(" ({skipped} built earlier)")
            } else {
                String::new()
            },
        );
        tracing::info!(stage = %cx.stage, "{msg}");
        cx.store.event(Some(&cx.stage), "info", &msg).await?;
        Ok(json!({
            "objects": total,
            "built": built,
            "already_existed": existed,
            "skipped": skipped,
            "elapsed_ms": elapsed_ms,
        }))
    }

    /// Builds `order` (indices into `items`) at most `limit` at a time, never two whose locks
    /// conflict. Stops starting new objects at the first failure or on cancellation, cancels what is
    /// running, and returns the first real error. Returns (built, found already built).
    ///
    /// With `gate` (a load running beside this stage), only the objects whose tables the load has
    /// copied are started, `limit` at a time as always (the load keeps its own `jobs`: giving the
    /// builds only half the sessions while it runs was slower, see benches/README.md); the others
    /// wait in the gate until a checkpoint of the load lets them in.
    #[allow(clippy::too_many_arguments)]
    async fn run_phase(
        &self,
        run: &DbRun<'_>,
        items: &[Item],
        keys: &[String],
        order: &[usize],
        limit: usize,
        mut gate: Option<&mut LoadFeed>,
        sizes: &HashMap<QualifiedName, i64>,
    ) -> Result<(usize, usize)> {
        let stop = run.cx.cancel.child_token();
        let locks: HashMap<usize, _> = order.iter().map(|&n| (n, items[n].locks())).collect();
        let mut queue: Vec<usize> = order.to_vec();
        if let Some(g) = gate.as_deref_mut() {
            g.waiting = std::mem::take(&mut queue);
            queue = g.admit(run.cx, run.db, items, sizes).await?;
        }
        let mut free: Vec<usize> = (0..limit.min(run.clients.len())).rev().collect();
        let mut busy: Vec<(usize, usize)> = Vec::new(); // (slot, item)
        let mut running = FuturesUnordered::new();
        let mut first_err: Option<Error> = None;
        let (mut built, mut existed) = (0, 0);
        loop {
            if !stop.is_cancelled() {
                while let Some(&slot) = free.last() {
                    let next = queue.iter().position(|&n| {
                        busy.iter()
                            .all(|&(_, m)| post_data_script::compatible(&locks[&n], &locks[&m]))
                    });
                    let Some(pos) = next else { break };
                    let n = queue.remove(pos);
                    free.pop();
                    busy.push((slot, n));
                    let stop = &stop;
                    running.push(async move {
                        let r = self.build_item(run, slot, &items[n], &keys[n], stop).await;
                        (slot, n, r)
                    });
                }
            }
            let waiting = gate.as_deref().is_some_and(|g| !g.waiting.is_empty());
            let next = tokio::select! {
                r = running.next(), if !running.is_empty() => r,
                changed = async {
                    match gate.as_deref_mut() {
                        Some(g) => g.upstream.changed().await,
                        None => std::future::pending().await,
                    }
                }, if waiting && !stop.is_cancelled() => {
                    let admitted = match changed {
                        Ok(_) => match gate.as_deref_mut() {
                            Some(g) => g.admit(run.cx, run.db, items, sizes).await,
                            None => Ok(Vec::new()),
                        },
                        Err(e) => Err(e),
                    };
                    match admitted {
                        Ok(more) => {
                            queue.extend(more);
                        }
                        Err(e) => {
                            stop.cancel();
                            if first_err.as_ref().is_none_or(|f| f.kind == ErrorKind::Interrupted) {
                                first_err = Some(e);
                            }
                        }
                    }
                    continue;
                }
                _ = stop.cancelled(), if waiting && running.is_empty() && !stop.is_cancelled() => continue,
                else => None,
            };
            let Some((slot, n, r)) = next else {
                break;
            };
            busy.retain(|&(s, _)| s != slot);
            free.push(slot);
            match r {
                Ok(Outcome::Built) => built += 1,
                Ok(Outcome::Existed) => existed += 1,
                Err(e) => {
                    stop.cancel();
                    let replace = match &first_err {
                        None => true,
                        Some(f) => {
                            f.kind == ErrorKind::Interrupted && e.kind != ErrorKind::Interrupted
                        }
                    };
                    if replace {
                        first_err = Some(e);
                    } else if e.kind != ErrorKind::Interrupted {
                        // Only the first failure is returned; do not lose the others.
                        tracing::error!(stage = %run.cx.stage, database = %run.db.name, "{}: {e}", items[n].label());
                    }
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if !queue.is_empty() || gate.is_some_and(|g| !g.waiting.is_empty()) {
            return Err(Error::interrupted());
        }
        Ok((built, existed))
    }

    /// The full_load this stage runs beside for `db`: a dependency still running that has not
    /// finished `db`. `None`: the load of `db` is over (or this stage does not overlap one).
    async fn load_feed(&self, cx: &StageContext, db: &Database) -> Result<Option<Upstream>> {
        let plan = &self.env.plan;
        for &d in &plan.stages[self.index].after {
            let dep = &plan.stages[d];
            if dep.kind != StageKind::FullLoad {
                continue;
            }
            let Some(upstream) = cx.upstream(&dep.id) else {
                continue;
            };
            if !load_finished(cx, &upstream, db).await? {
                return Ok(Some(upstream));
            }
        }
        Ok(None)
    }

    /// Builds the objects of a serial phase (in `order`) in groups: consecutive objects with the
    /// same session settings run in one transaction, followed by one pipelined checkpoint write. A
    /// group that fails is rolled back and its objects built one by one, which tolerates what
    /// already exists, retries under the database's search_path and names the object that fails.
    /// A run killed between a group's commit and its checkpoints builds the group again the same
    /// way. Returns (built, found already built).
    async fn run_grouped(
        &self,
        run: &DbRun<'_>,
        items: &[Item],
        keys: &[String],
        order: &[usize],
    ) -> Result<(usize, usize)> {
        let stop = run.cx.cancel.child_token();
        let (mut built, mut existed) = (0, 0);
        let mut start = 0;
        while start < order.len() {
            run.cx.check_cancelled()?;
            let settings = &items[order[start]].settings;
            let mut end = start + 1;
            while end < order.len()
                && end - start < MAX_GROUP
                && items[order[end]].settings == *settings
            {
                end += 1;
            }
            let group = &order[start..end];
            start = end;
            if group.len() > 1 && self.build_group(run, items, keys, group, &stop).await? {
                built += group.len();
                continue;
            }
            for &n in group {
                match self.build_item(run, 0, &items[n], &keys[n], &stop).await? {
                    Outcome::Built => built += 1,
                    Outcome::Existed => existed += 1,
                }
            }
        }
        Ok((built, existed))
    }

    /// Runs `group` in one transaction on the first session and checkpoints each object; `false`
    /// (nothing changed) when the transaction failed.
    async fn build_group(
        &self,
        run: &DbRun<'_>,
        items: &[Item],
        keys: &[String],
        group: &[usize],
        stop: &CancellationToken,
    ) -> Result<bool> {
        let cx = run.cx;
        let client = &run.clients[0];
        let applied = &run.applied[0];
        let first = &items[group[0]];
        let started = Instant::now();
        let started_at = crate::state::Timestamp::now().0;
        let wanted = apply_settings(client, applied, first, stop).await?;
        let mut sql = String::from("BEGIN;\n");
        for &n in group {
            sql.push_str(&items[n].sql());
            sql.push('\n');
        }
        sql.push_str("COMMIT;");
        if let Err(e) = execute(client, &sql, stop).await? {
            tracing::debug!(stage = %cx.stage, database = %run.db.name,
                "{} objects from {} on in one transaction: {e}; building them one by one", group.len(), first.label());
            execute(client, "ROLLBACK", stop)
                .await?
                .map_err(|e| Error::pg(&e, "rolling back a group of post-data objects"))?;
            return Ok(false);
        }
        set_applied(applied, Some(wanted));
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let marks = group.iter().map(|&n| {
            cx.mark_done(
                &keys[n],
                json!({
                    "type": items[n].kind,
                    "object": items[n].label(),
                    "elapsed_ms": elapsed_ms,
                    "started_at": started_at,
                    "already_existed": false,
                    "group": group.len(),
                }),
            )
        });
        tokio::try_join!(
            futures_util::future::try_join_all(marks),
            cx.store
                .add_counter(&run.db.name, "post_data_items_done", group.len() as i64),
        )?;
        tracing::debug!(stage = %cx.stage, database = %run.db.name,
            "ran {} objects from {} on in one transaction", group.len(), first.label());
        Ok(true)
    }

    /// Builds one object on `client` and checkpoints it.
    async fn build_item(
        &self,
        run: &DbRun<'_>,
        slot: usize,
        item: &Item,
        key: &str,
        stop: &CancellationToken,
    ) -> Result<Outcome> {
        let cx = run.cx;
        let started = Instant::now();
        let started_at = crate::state::Timestamp::now().0;
        let tracked = item.phase() != Phase::Other && item.phase() != Phase::Attach;
        let progress = |state: TableState, error: Option<String>| TableProgress {
            stage: cx.stage.clone(),
            database: run.db.name.clone(),
            table: item.label(),
            state,
            rows: 0,
            bytes: 0,
            lsn: None,
            started_at: None,
            ended_at: None,
            error,
        };
        // The progress write goes to the store while the object builds on the target.
        let copying = async {
            if tracked {
                cx.store
                    .upsert_table(&progress(TableState::Copying, None))
                    .await
            } else {
                Ok(())
            }
        };
        let (copying, result) = tokio::join!(
            copying,
            self.execute_item(&run.clients[slot], &run.applied[slot], item, stop)
        );
        copying?;
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                if tracked {
                    let (state, error) = if e.kind == ErrorKind::Interrupted {
                        (TableState::Queued, None)
                    } else {
                        (TableState::Failed, Some(e.to_string()))
                    };
                    let _ = cx.store.upsert_table(&progress(state, error)).await;
                }
                return Err(e);
            }
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        // The checkpoint, the counter and the progress, pipelined on the store's session.
        let copied = async {
            if tracked {
                cx.store
                    .upsert_table(&progress(TableState::Copied, None))
                    .await
            } else {
                Ok(())
            }
        };
        tokio::try_join!(
            cx.mark_done(
                key,
                json!({
                    "type": item.kind,
                    "object": item.label(),
                    "elapsed_ms": elapsed_ms,
                    "started_at": started_at,
                    "already_existed": outcome == Outcome::Existed,
                }),
            ),
            cx.store
                .add_counter(&run.db.name, "post_data_items_done", 1),
            copied,
        )?;
        match outcome {
            Outcome::Built if tracked => tracing::info!(stage = %cx.stage, database = %run.db.name,
                "built {} in {:.1}s", item.label(), elapsed_ms as f64 / 1000.0),
            Outcome::Built => {
                tracing::debug!(stage = %cx.stage, database = %run.db.name, "ran {}", item.label())
            }
            Outcome::Existed => tracing::warn!(stage = %cx.stage, database = %run.db.name,
                "{} already exists on the target; counted as built", item.label()),
        }
        Ok(outcome)
    }

    /// Runs one object's SQL with its session settings; "already exists" of an object found in the
    /// catalog counts as built; deadlocks and lock timeouts are retried.
    async fn execute_item(
        &self,
        client: &Client,
        applied: &std::sync::Mutex<Option<Vec<String>>>,
        item: &Item,
        stop: &CancellationToken,
    ) -> Result<Outcome> {
        let doing = || {
            format!(
                "{} (line {} of the post-data script) `{}`",
                item.label(),
                item.line,
                item.first_line()
            )
        };
        let wanted = apply_settings(client, applied, item, stop).await?;
        let mut attempt = 0;
        let mut retried_with_path = false;
        loop {
            let err = match execute(client, &item.sql(), stop).await? {
                Ok(()) if attempt == 0 && !retried_with_path => {
                    set_applied(applied, Some(wanted));
                    return Ok(Outcome::Built);
                }
                Ok(()) => return Ok(Outcome::Built),
                Err(e) => e,
            };
            let code = err.code().map(|c| c.code().to_string()).unwrap_or_default();
            if item.tolerates_existing()
                && matches!(code.as_str(), "42P07" | "42710" | "42P16")
                && self.already_built(client, item, &code).await?
            {
                // The object is there; what else the object's script does (CLUSTER ON, REPLICA
                // IDENTITY, SET STATISTICS) is idempotent: run it again.
                if item.statements.len() > 1 {
                    let rest = item.statements[1..].join("\n");
                    execute(client, &rest, stop)
                        .await?
                        .map_err(|e| Error::pg(&e, doing()))?;
                }
                return Ok(Outcome::Existed);
            }
            // Rows that break a foreign key (the application wrote them with triggers off, or
            // with session_replication_role = replica): the source has them too, so the
            // constraint is added as it holds there in effect, NOT VALID, and said loudly.
            if code == "23503"
                && item.kind == "FK CONSTRAINT"
                && let Some(not_valid) = not_valid_variant(item)
            {
                execute(client, &not_valid, stop)
                    .await?
                    .map_err(|e| Error::pg(&e, format!("{} (added NOT VALID)", doing())))?;
                tracing::warn!(
                    "{}: existing rows violate it ({}); added NOT VALID, as the source's rows are: fix the rows, then ALTER TABLE ... VALIDATE CONSTRAINT on the target",
                    item.label(),
                    err.as_db_error()
                        .map_or(String::new(), |d| d.message().to_string())
                );
                return Ok(Outcome::Built);
            }
            // An expression (an index's, a constraint's) that calls a function whose body names
            // things unqualified fails under pg_dump's empty search_path, as it does in pg_restore.
            // The source built it under its database's search_path, which provision gave the
            // target database too: build it once more under that one.
            if matches!(code.as_str(), "42883" | "42P01" | "42704")
                && !retried_with_path
                && let Some(path) = database_search_path(client).await?
            {
                retried_with_path = true;
                client
                    .execute(
                        "SELECT pg_catalog.set_config('search_path', $1, false)",
                        &[&path],
                    )
                    .await
                    .map_err(|e| {
                        Error::pg(&e, format!("setting search_path = {path} for {}", doing()))
                    })?;
                let again = execute(client, &item.sql(), stop).await?;
                client
                    .batch_execute("SELECT pg_catalog.set_config('search_path', '', false)")
                    .await
                    .map_err(|e| Error::pg(&e, "resetting search_path"))?;
                if again.is_ok() {
                    tracing::warn!(
                        "{}: failed under pg_dump's empty search_path ({}); built under the database's search_path ({path}), as on the source. Qualify the names in the functions it calls (or give them SET search_path) to make the schema restorable anywhere",
                        item.label(),
                        err.as_db_error()
                            .map_or(String::new(), |d| d.message().to_string())
                    );
                    return Ok(Outcome::Built);
                }
            }
            if matches!(code.as_str(), "40P01" | "55P03") && attempt < LOCK_RETRIES {
                attempt += 1;
                let pause = Duration::from_millis(250 << attempt);
                tracing::warn!(
                    "{}: {}; retrying in {pause:?}",
                    item.label(),
                    err.as_db_error()
                        .map_or(String::new(), |d| d.message().to_string())
                );
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = stop.cancelled() => return Err(Error::interrupted()),
                }
            }
            let mut e = Error::pg(&err, doing());
            if e.hint.is_none() {
                e.hint = match code.as_str() {
                    "23505" => Some("the target has duplicate keys for this unique index or constraint: compare the table with the source (a `validate` stage) and fix the rows, then run again".into()),
                    "23503" => Some("rows of the target violate this foreign key: compare both tables with the source, fix the rows, then run again".into()),
                    "42883" => Some("a function it needs is missing, or one its expression calls names things without their schema (pg_dump builds under an empty search_path): qualify the names in that function (or give it SET search_path), or give the source database the search_path it relies on (ALTER DATABASE ... SET search_path), which provision carries to the target; then run again".into()),
                    "42P01" | "42704" | "3F000" => Some("an object this one needs is missing on the target: check that provision (pre-data) and the table selection include it".into()),
                    "42P16" => Some("the table already has a primary key of another name on the target: drop it, then run again".into()),
                    "42P07" | "42710" if item.tolerates_existing() => Some("an object of that name already exists on the target but is not this one: drop or rename it, then run again".into()),
                    "42P07" | "42710" => Some("it already exists on the target (created by hand, or by a run killed right after building it): drop it, then run again".into()),
                    _ => None,
                };
            }
            return Err(e);
        }
    }

    /// Whether the object an "already exists" error is about is the one this item builds: found by
    /// name on its table in the target's catalog (an index must also be valid).
    async fn already_built(&self, client: &Client, item: &Item, code: &str) -> Result<bool> {
        let Some(TableObject { kind, table, name }) = item.table_object() else {
            // A statement we cannot read: trust the SQLSTATE, but not "multiple primary keys".
            return Ok(code != "42P16");
        };
        let sql = match kind {
            ObjectKind::Index => {
                "SELECT CASE WHEN ic.relkind = 'I' THEN true ELSE i.indisvalid END \
                 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
                 JOIN pg_catalog.pg_class t ON t.oid = i.indrelid JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace \
                 WHERE n.nspname = $1 AND t.relname = $2 AND ic.relname = $3"
            }
            ObjectKind::Constraint => {
                "SELECT true FROM pg_catalog.pg_constraint c JOIN pg_catalog.pg_class t ON t.oid = c.conrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace \
                 WHERE n.nspname = $1 AND t.relname = $2 AND c.conname = $3"
            }
            ObjectKind::Trigger => {
                "SELECT true FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_class t ON t.oid = g.tgrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace \
                 WHERE n.nspname = $1 AND t.relname = $2 AND g.tgname = $3 AND NOT g.tgisinternal"
            }
            ObjectKind::Rule => {
                "SELECT true FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class t ON t.oid = r.ev_class \
                 JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace \
                 WHERE n.nspname = $1 AND t.relname = $2 AND r.rulename = $3"
            }
            ObjectKind::Policy => {
                "SELECT true FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_class t ON t.oid = p.polrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace \
                 WHERE n.nspname = $1 AND t.relname = $2 AND p.polname = $3"
            }
        };
        let row = client
            .query_opt(sql, &[&table.schema, &table.name, &name])
            .await
            .map_err(|e| Error::pg(&e, format!("looking up {} on the target", item.label())))?;
        match row.map(|r| r.get::<_, bool>(0)) {
            Some(true) => Ok(true),
            Some(false) => Err(Error::permanent(format!(
                "{}: index {} exists on the target but is invalid (an interrupted CREATE INDEX CONCURRENTLY?)",
                item.label(),
                QualifiedName::new(table.schema.clone(), name.clone())
            ))
            .hint(format!(
                "drop it (DROP INDEX {}) and run again",
                QualifiedName::new(table.schema, name).quoted()
            ))),
            None => Ok(false),
        }
    }
}

/// Gives the session the state pg_restore's session would have at `item` (never the client
/// encoding: this connection speaks UTF-8), unless it has exactly those settings already. Returns
/// them; the session's settings count as unknown until the caller records them after success (a
/// failure may leave them changed).
async fn apply_settings(
    client: &Client,
    applied: &std::sync::Mutex<Option<Vec<String>>>,
    item: &Item,
    stop: &CancellationToken,
) -> Result<Vec<String>> {
    let wanted: Vec<String> = item
        .settings
        .iter()
        .filter(|s| post_data_script::setting_key(s).as_deref() != Some("client_encoding"))
        .cloned()
        .collect();
    let known = applied
        .lock()
        .map(|a| a.as_ref() == Some(&wanted))
        .unwrap_or(false);
    set_applied(applied, None);
    if !wanted.is_empty() && !known {
        execute(client, &wanted.join("\n"), stop)
            .await?
            .map_err(|e| {
                Error::pg(
                    &e,
                    format!(
                        "applying the session settings for {} (line {} of the post-data script)",
                        item.label(),
                        item.line
                    ),
                )
            })?;
    }
    Ok(wanted)
}

/// Records the settings a session has (`None`: unknown).
fn set_applied(applied: &std::sync::Mutex<Option<Vec<String>>>, settings: Option<Vec<String>>) {
    if let Ok(mut a) = applied.lock() {
        *a = settings;
    }
}

/// Runs `sql` (one or more statements, as one implicit transaction); on cancellation asks the
/// server to cancel it and returns `Interrupted`. The inner result is the statement's own error.
/// The `search_path` the current database sets for every role (`ALTER DATABASE ... SET`), when it
/// sets one.
async fn database_search_path(client: &Client) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT pg_catalog.substr(c, 13) FROM pg_catalog.pg_db_role_setting s \
               JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase, pg_catalog.unnest(s.setconfig) c \
              WHERE s.setrole = 0 AND d.datname = pg_catalog.current_database() AND c LIKE 'search\\_path=%'",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading the database's search_path (pg_db_role_setting)"))?;
    Ok(row.map(|r| r.get::<_, String>(0)).filter(|p| !p.is_empty()))
}

async fn execute(
    client: &Client,
    sql: &str,
    stop: &CancellationToken,
) -> Result<std::result::Result<(), tokio_postgres::Error>> {
    tokio::select! {
        biased;
        r = client.batch_execute(sql) => Ok(r),
        _ = stop.cancelled() => {
            // The server stops the statement; its transaction rolls back.
            let _ = client.cancel_token().cancel_query(tokio_postgres::NoTls).await;
            Err(Error::interrupted())
        }
    }
}

/// The checkpoint key of each object: `database:DB:item:TYPE:SCHEMA.NAME`, with `#2`, `#3` ... for
/// repeated headers. Derived from the header, so it stays the same when the script is dumped again.
fn item_keys(db: &str, items: &[Item]) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    items
        .iter()
        .map(|item| {
            let base = format!(
                "database:{db}:item:{}:{}.{}",
                item.kind,
                item.schema.as_deref().unwrap_or("-"),
                item.name
            );
            let n = seen.entry(base.clone()).or_insert(0);
            *n += 1;
            if *n == 1 { base } else { format!("{base}#{n}") }
        })
        .collect()
}

/// Orders `order` (indices into `items`) with the longest builds first, so the short ones fill in
/// around them: the bytes of the object's table (`table_bytes`) weighted by how costly the index
/// method is to build ([`build_weight`]).
fn longest_first(order: &mut [usize], items: &[Item], table_bytes: impl Fn(&Item) -> i64) {
    let cost = |n: usize| {
        let item = &items[n];
        table_bytes(item).max(0) as u128 * build_weight(&item.statements) / 4
    };
    order.sort_by_key(|&n| (std::cmp::Reverse(cost(n)), n));
}

/// How much costlier an index is to build than a B-tree over the same table, in quarters: measured
/// on 1M-row tables, a GIN (jsonb_path_ops) build took about 8x a B-tree's, GiST several times.
fn build_weight(statements: &[String]) -> u128 {
    let text = statements.join(" ").to_ascii_lowercase();
    if text.contains(" using gin ") || text.contains(" using gin(") {
        32
    } else if text.contains(" using gist ")
        || text.contains(" using spgist ")
        || text.contains(" using gist(")
    {
        24
    } else if text.contains(" using brin ") {
        1
    } else {
        4
    }
}

/// The size of every table and materialized view of the target, for largest-first ordering.
async fn table_sizes(client: &Client) -> Result<HashMap<QualifiedName, i64>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, pg_catalog.pg_table_size(c.oid) \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'm', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading table sizes"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect())
}

#[async_trait]
impl Stage for PostData {
    fn describe(&self) -> Vec<String> {
        self.env
            .plan
            .databases
            .iter()
            .enumerate()
            .map(|(i, db)| {
                let o = self.options(i);
                let jobs = Self::jobs(&o);
                let overlap = if self.env.plan.overlaps(self.index).is_empty() {
                    String::new()
                } else {
                    ", each table's as soon as full_load has copied it".to_string()
                };
                format!(
                    "on target database {}: builds the post-data schema dumped by schema_dump: indexes and constraints {jobs} at a time{overlap} \
                     (maintenance_work_mem {}), partition index attachments, foreign keys {jobs} at a time, then triggers, rules, \
                     policies, comments and privileges, and refreshes materialized views last",
                    db.target,
                    human_bytes(Self::maintenance_work_mem(&o)),
                )
            })
            .collect()
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        cx.for_each_database(
            self.env.plan.databases.iter().enumerate(),
            |i, db| async move {
                let summary = self
                    .run_database(cx, i, db)
                    .await
                    .map_err(|e| e.context(format!("database `{}`", db.name)))?;
                // The source's planner statistics, once the indexes exist (where the versions allow).
                let stats_key = super::statistics::checkpoint_key(&db.name);
                if cx.store.checkpoint(&cx.stage, &stats_key).await?.is_none() {
                    let stats = super::statistics::carry_over(&self.env, cx, db)
                        .await
                        .map_err(|e| e.context(format!("database `{}`", db.name)))?;
                    cx.store
                        .put_checkpoint(&cx.stage, &stats_key, &stats)
                        .await?;
                }
                Ok(summary)
            },
        )
        .await
    }
}

/// Whether the load `upstream` is over for `db`: the stage done, or its checkpoint for `db`.
async fn load_finished(cx: &StageContext, upstream: &Upstream, db: &Database) -> Result<bool> {
    if upstream.state() == UpstreamState::Done {
        return Ok(true);
    }
    Ok(cx
        .store
        .checkpoint(&upstream.stage, &super::database_key(&db.name))
        .await?
        .and_then(|v| v.get("done").and_then(serde_json::Value::as_bool))
        .unwrap_or(false))
}

/// The target's tables: each one's kind (`r`, `p`, `m`, `f`) and inheritance children (partitions
/// included), to tell which copied tables an object needs.
struct DataTables {
    kinds: HashMap<QualifiedName, String>,
    children: HashMap<QualifiedName, Vec<QualifiedName>>,
}

impl DataTables {
    /// The tables with rows of their own that must be copied before an object on `table` is
    /// built: the table itself when it is an ordinary one, and every ordinary table under it (a
    /// constraint recurses into inheritance children; an index on a partitioned table needs its
    /// partitions). `None` when the table is not in the catalog.
    fn needs(&self, table: &QualifiedName) -> Option<Vec<String>> {
        self.kinds.get(table)?;
        let mut out = Vec::new();
        let mut stack = vec![table.clone()];
        let mut seen = std::collections::HashSet::new();
        while let Some(t) = stack.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            if self.kinds.get(&t).map(String::as_str) == Some("r") {
                out.push(t.to_string());
            }
            if let Some(c) = self.children.get(&t) {
                stack.extend(c.iter().cloned());
            }
        }
        Some(out)
    }
}

async fn data_tables(client: &Client) -> Result<DataTables> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relkind::text              FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace              WHERE c.relkind IN ('r', 'p', 'm', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing the target's tables"))?;
    let kinds = rows
        .iter()
        .map(|r| {
            (
                QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get::<_, String>(2),
            )
        })
        .collect();
    let rows = client
        .query(
            "SELECT pn.nspname::text, p.relname::text, cn.nspname::text, c.relname::text              FROM pg_catalog.pg_inherits i              JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace              JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace              WHERE c.relkind IN ('r', 'p', 'f')",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing the target's inheritance (pg_inherits)"))?;
    let mut children: HashMap<QualifiedName, Vec<QualifiedName>> = HashMap::new();
    for r in &rows {
        children
            .entry(QualifiedName::new(
                r.get::<_, String>(0),
                r.get::<_, String>(1),
            ))
            .or_default()
            .push(QualifiedName::new(
                r.get::<_, String>(2),
                r.get::<_, String>(3),
            ));
    }
    Ok(DataTables { kinds, children })
}

/// Phase 1 beside a running load: which objects still wait for tables to be copied.
struct LoadFeed {
    upstream: Upstream,
    /// Per waiting object (index into the script's items): the tables it needs copied, `None`
    /// for the whole load (its table could not be read or found).
    needs: HashMap<usize, Option<Vec<String>>>,
    /// Objects of phase 1 not started yet because their tables are not copied.
    waiting: Vec<usize>,
    /// The load of this database is over: everything may start.
    loaded: bool,
}

impl LoadFeed {
    fn new(upstream: Upstream, tables: &DataTables, items: &[Item], pending: &[usize]) -> LoadFeed {
        let needs = pending
            .iter()
            .filter(|&&n| items[n].phase() == Phase::Indexes)
            .map(|&n| {
                let needs = items[n].table_object().and_then(|o| tables.needs(&o.table));
                (n, needs)
            })
            .collect();
        LoadFeed {
            upstream,
            needs,
            waiting: Vec::new(),
            loaded: false,
        }
    }

    /// Takes out of `waiting` the objects whose tables the load has checkpointed copied (all of
    /// them once the load is over), the largest tables first.
    async fn admit(
        &mut self,
        cx: &StageContext,
        db: &Database,
        items: &[Item],
        sizes: &HashMap<QualifiedName, i64>,
    ) -> Result<Vec<usize>> {
        if !self.loaded && load_finished(cx, &self.upstream, db).await? {
            self.loaded = true;
        }
        let copied: HashMap<String, i64> = if self.loaded {
            HashMap::new()
        } else {
            cx.store
                .tables(Some(&self.upstream.stage))
                .await?
                .into_iter()
                .filter(|t| t.database == db.name && t.state == TableState::Copied)
                .map(|t| (t.table, t.bytes))
                .collect()
        };
        let ready = |n: &usize| {
            self.loaded
                || self
                    .needs
                    .get(n)
                    .and_then(|t| t.as_ref())
                    .is_some_and(|t| t.iter().all(|t| copied.contains_key(t)))
        };
        let (mut admitted, waiting): (Vec<usize>, Vec<usize>) =
            self.waiting.iter().copied().partition(ready);
        self.waiting = waiting;
        // The longest builds first: the table's size (the load's bytes while the target's size was
        // read before the copy) weighted by how costly the index method is to build.
        longest_first(&mut admitted, items, |item| {
            item.table_object()
                .map(|o| {
                    sizes
                        .get(&o.table)
                        .copied()
                        .unwrap_or(0)
                        .max(copied.get(&o.table.to_string()).copied().unwrap_or(0))
                })
                .unwrap_or(0)
        });
        if !admitted.is_empty() {
            tracing::debug!(stage = %cx.stage, database = %db.name,
                "{} object(s) of tables the load has copied may start, {} wait", admitted.len(), self.waiting.len());
        }
        Ok(admitted)
    }

    /// Waits until the load of `db` is over (before the phases that need every table).
    async fn wait_loaded(&mut self, cx: &StageContext, db: &Database) -> Result<()> {
        if !self.loaded {
            wait_load_finished(cx, &mut self.upstream, db).await?;
        }
        self.loaded = true;
        Ok(())
    }
}

/// Waits until the load `upstream` is over for `db`.
async fn wait_load_finished(
    cx: &StageContext,
    upstream: &mut Upstream,
    db: &Database,
) -> Result<()> {
    if load_finished(cx, upstream, db).await? {
        return Ok(());
    }
    tracing::info!(stage = %cx.stage, database = %db.name, "waiting for stage `{}` to finish loading the database", upstream.stage);
    while !load_finished(cx, upstream, db).await? {
        tokio::select! {
            r = upstream.changed() => { r?; }
            _ = cx.cancel.cancelled() => return Err(Error::interrupted()),
        }
    }
    Ok(())
}

/// The item's SQL with its first statement (`ALTER TABLE ... ADD CONSTRAINT ... FOREIGN KEY ...;`)
/// made `NOT VALID`, or `None` when it is not of that form or is NOT VALID already.
fn not_valid_variant(item: &Item) -> Option<String> {
    let first = item.statements.first()?;
    let body = first.trim_end().strip_suffix(';')?;
    if !body.contains("FOREIGN KEY") || body.trim_end().ends_with("NOT VALID") {
        return None;
    }
    let mut statements = item.statements.clone();
    statements[0] = format!("{body} NOT VALID;");
    Some(statements.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_unique() {
        let script = post_data_script::parse(
            "--\n-- Name: t t_pkey; Type: CONSTRAINT; Schema: public; Owner: me\n--\nALTER TABLE ONLY public.t ADD CONSTRAINT t_pkey PRIMARY KEY (id);\n\
             --\n-- Name: SCHEMA public; Type: ACL; Schema: -; Owner: me\n--\nGRANT ALL ON SCHEMA public TO PUBLIC;\n\
             --\n-- Name: SCHEMA public; Type: ACL; Schema: -; Owner: me\n--\nGRANT USAGE ON SCHEMA public TO PUBLIC;\n",
        )
        .unwrap();
        assert_eq!(
            item_keys("dvd", &script.items),
            [
                "database:dvd:item:CONSTRAINT:public.t t_pkey",
                "database:dvd:item:ACL:-.SCHEMA public",
                "database:dvd:item:ACL:-.SCHEMA public#2",
            ]
        );
    }

    #[test]
    fn maintenance_work_mem_is_bounded() {
        let o = |s: Option<u64>| PostDataOptions {
            jobs: None,
            maintenance_work_mem: s.map(ByteSize),
        };
        assert_eq!(PostData::maintenance_work_mem(&o(None)), 1 << 30);
        assert_eq!(PostData::maintenance_work_mem(&o(Some(10))), 1 << 20);
        assert_eq!(PostData::maintenance_work_mem(&o(Some(1 << 40))), 64 << 30);
        assert_eq!(PostData::jobs(&o(None)), 4);
    }
}
