//! The `full_load` stage: copies every selected table from one consistent snapshot of each source
//! database, `jobs` tables at a time, largest first, streaming `COPY TO` into `COPY FROM`.
//!
//! - The snapshot: for an online plan (one with a `cdc` stage), the one exported by creating the
//!   database's logical replication slot, so CDC starts exactly where the copy ends. When a load
//!   resumes after a crash the slot already exists and its snapshot died with the crash: the rest is
//!   copied from the snapshot of a *temporary* slot, whose consistent point is recorded per table;
//!   CDC skips a table's changes up to the LSN its copy was taken at. Offline, an exported snapshot
//!   of an ordinary repeatable-read transaction.
//! - A table copied whole (1 MB or more) is loaded with `TRUNCATE` + `COPY ... FREEZE` in one
//!   transaction: atomic, idempotent, and no anti-wraparound vacuum needed later. Smaller tables are
//!   loaded in groups (up to 50 tables or 8 MB), each group in one transaction with `DELETE` +
//!   `COPY` per table and one checkpoint write: a database of hundreds of small tables pays neither
//!   a `TRUNCATE` (new files for the table and its TOAST) nor a commit and two checkpoint writes per
//!   table. A crash reloads the whole group.
//! - Tables the snapshot sees empty (asked in one query per 100 tables) are not copied: their
//!   target tables are emptied where they hold rows, and all are checkpointed in one write.
//! - A table larger than `split_tables_larger_than` is split into ranges (by its integer primary key,
//!   else by ctid block ranges on PostgreSQL 14+) copied in parallel from the same snapshot, after one
//!   `TRUNCATE`. A split table that was interrupted is copied again whole (one LSN per table).
//! - Generated columns are not copied; identity columns keep their values. Large objects are copied
//!   after the tables, from the same snapshot.
//! - Per-table checkpoints (`pgferry.tables`): finished tables are kept, unfinished ones reloaded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::pg::catalog;
use crate::pg::connect::ConnInfo;
use crate::pg::copy::{self, CopyTable};
use crate::pg::ident::quote_literal;
use crate::pg::lsn::Lsn;
use crate::pg::names::slot_name;
use crate::pg::replication::ReplicationClient;
use crate::pg::wire::WireClient;
use crate::plan::StageKind;
use crate::plan::units::human_bytes;
use crate::plan::{Database, StageOptions};
use crate::select::Selection;
use crate::state::{TableProgress, TableState};

const MAX_RANGES: u64 = 64;

pub struct FullLoad {
    env: Arc<Env>,
    index: usize,
}

impl FullLoad {
    pub fn new(env: Arc<Env>, index: usize) -> FullLoad {
        FullLoad { env, index }
    }

    fn options(&self, db: usize) -> (u32, u64) {
        match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::FullLoad(o)) => {
                (o.jobs().max(1), o.split_tables_larger_than().max(1 << 20))
            }
            _ => {
                let o = crate::plan::raw::FullLoadOptions::default();
                (o.jobs(), o.split_tables_larger_than())
            }
        }
    }
}

#[async_trait]
impl Stage for FullLoad {
    fn describe(&self) -> Vec<String> {
        let online = self.env.plan.has_kind(StageKind::Cdc);
        let mut out = Vec::new();
        for (i, db) in self.env.plan.databases.iter().enumerate() {
            let (jobs, split) = self.options(i);
            out.push(format!(
                "copy the selected tables of {} into {} from one {} snapshot, {jobs} at a time, largest first; tables over {} split into ranges",
                db.name,
                db.target,
                if online { "replication-slot" } else { "exported" },
                human_bytes(split)
            ));
        }
        out
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        cx.for_each_database(
            self.env.plan.databases.iter().enumerate(),
            |i, db| async move {
                let (jobs, split) = self.options(i);
                load_database(&self.env, cx, db, jobs, split)
                    .await
                    .map_err(|e| e.context(format!("database `{}`", db.name)))
            },
        )
        .await
    }
}

/// One unit of copy work.
#[derive(Debug, Clone)]
enum Job {
    /// Whole tables (indices into [`Load::tables`]), loaded in one target transaction: `TRUNCATE`
    /// of all of them, then `COPY ... FREEZE` of each, then one commit and one checkpoint write. A
    /// big table is a group of its own; small ones share a group, so a database of many small
    /// tables does not pay a transaction and two checkpoint writes per table. A crash reloads the
    /// whole group.
    Tables(Vec<usize>),
    /// Range `n` of a split table: the rows matching `filter`.
    Range {
        table: usize,
        n: usize,
        filter: String,
    },
}

/// Whole tables smaller than this are loaded in groups; larger ones one per transaction.
const GROUP_TABLES_BELOW: u64 = 1 << 20;
/// A group closes once its tables reach this size ...
const GROUP_MAX_BYTES: u64 = 8 << 20;
/// ... or this many tables.
const GROUP_MAX_TABLES: usize = 50;
/// Tables up to this size are asked (in one query per [`EMPTY_CHECK_CHUNK`]) whether the snapshot
/// sees any row in them: an empty one is not copied, only made empty on the target.
const EMPTY_CHECK_BELOW: u64 = 1 << 20;
const EMPTY_CHECK_CHUNK: usize = 100;

/// Shared state of one database's load.
struct Load {
    tables: Vec<CopyTable>,
    queue: Mutex<VecDeque<Job>>,
    /// Ranges still to finish, per split table.
    remaining: Mutex<HashMap<usize, (usize, u64, u64)>>,
    bytes: AtomicU64,
    rows: AtomicU64,
    tables_done: AtomicU64,
    lsn: Option<Lsn>,
    snapshot: String,
    stage: String,
    database: String,
    /// Tells a post_data running beside the load that tables were checkpointed `copied`.
    signal: super::Progress,
}

impl Load {
    fn display(&self, t: usize) -> String {
        self.tables[t].name.to_string()
    }

    fn progress(
        &self,
        name: String,
        state: TableState,
        rows: u64,
        bytes: u64,
        error: Option<String>,
    ) -> TableProgress {
        TableProgress {
            stage: self.stage.clone(),
            database: self.database.clone(),
            table: name,
            state,
            rows: rows as i64,
            bytes: bytes as i64,
            lsn: self.lsn,
            started_at: None,
            ended_at: None,
            error,
        }
    }
}

/// Something that keeps the snapshot alive until the load is over.
enum SnapshotHolder {
    Replication(ReplicationClient),
    Transaction(Client),
}

async fn load_database(
    env: &Env,
    cx: &StageContext,
    db: &Database,
    jobs: u32,
    split: u64,
) -> Result<serde_json::Value> {
    let source_conn = env.source_for(db);
    let target_conn = env.target_for(db);
    let online = env.plan.has_kind(StageKind::Cdc);
    let started = Instant::now();

    // What is already done.
    let done: HashSet<String> = cx
        .store
        .tables(Some(&cx.stage))
        .await?
        .into_iter()
        .filter(|t| t.database == db.name && t.state == TableState::Copied)
        .map(|t| t.table)
        .collect();

    // The snapshot (and its LSN).
    let control = source_conn.connect("load control").await?;
    let server = catalog::server_info(&control).await?;
    let (holder, snapshot, lsn) = if online {
        let slot = slot_name(&env.plan.name, &db.name);
        let exists: bool = control
            .query_one("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1)", &[&slot])
            .await
            .map_err(|e| Error::pg(&e, "looking for the replication slot"))?
            .get(0);
        let mut repl = ReplicationClient::connect(&source_conn, "load snapshot").await?;
        let snap = if exists {
            // Resuming: the slot's own snapshot is gone; a temporary slot gives a new one with its LSN.
            let tmp = format!("pgferry_tmp_{}_{}", std::process::id(), cx.attempt);
            let s = repl.create_slot(&tmp, true).await?;
            tracing::info!(database = %db.name, lsn = %s.consistent_point, "resuming the load from a new snapshot (temporary slot)");
            s
        } else {
            let s = repl
                .create_slot(&slot, false)
                .await
                .map_err(|e| e.context(format!("creating replication slot {slot}")))?;
            cx.store
                .advance_position(&format!("slot:{}", db.name), s.consistent_point)
                .await?;
            cx.store
                .event(
                    Some(&cx.stage),
                    "info",
                    &format!("created replication slot {slot} at {}", s.consistent_point),
                )
                .await?;
            tracing::info!(database = %db.name, slot = %slot, lsn = %s.consistent_point, "created the replication slot; copying from its snapshot");
            s
        };
        (
            SnapshotHolder::Replication(repl),
            snap.snapshot_name,
            Some(snap.consistent_point),
        )
    } else {
        let holder = source_conn.connect("load snapshot").await?;
        holder
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(|e| Error::pg(&e, "opening the snapshot transaction"))?;
        let row = holder
            .query_one(
                "SELECT pg_catalog.pg_export_snapshot(), \
                        CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() ELSE pg_catalog.pg_current_wal_insert_lsn() END::text",
                &[],
            )
            .await
            .map_err(|e| Error::pg(&e, "exporting a snapshot"))?;
        (
            SnapshotHolder::Transaction(holder),
            row.get::<_, String>(0),
            crate::pg::lsn::parse_opt(row.get(1))?,
        )
    };

    // The tables, as of the snapshot.
    let snap_client = open_snapshot(&source_conn, &snapshot, "load catalog").await?;
    let all = copy::copy_tables(&snap_client, &env.plan.state.schema).await?;
    let selection = Selection::new(&db.tables, &db.exclude);
    let mut tables: Vec<CopyTable> = all
        .into_iter()
        .filter(|t| {
            let n = t.root.as_ref().unwrap_or(&t.name);
            selection.selects(&n.schema, &n.name)
        })
        .collect();
    tables.sort_by_key(|t| std::cmp::Reverse(t.bytes));
    let total = tables.len();
    tables.retain(|t| !done.contains(&t.name.to_string()));
    // A target made from the source's dump must have the same columns: DDL that ran on the source
    // after schema_dump and before this snapshot is in neither the dump nor the stream.
    if env.plan.has_kind(StageKind::SchemaDump) && !tables.is_empty() {
        let target = target_conn.connect("load schema check").await?;
        let differ = copy::columns_differ(&target, &tables, 10).await?;
        if !differ.is_empty() {
            return Err(Error::permanent(format!(
                "database {}: the source's tables changed after schema_dump (DDL ran between the schema dump and the load's snapshot, so it is in neither): {}",
                db.name,
                differ.join("; ")
            ))
            .hint("start the migration over so the schema is dumped again: `pgferry reset PLAN --yes` (it drops a target database pgferry created; for one it did not, empty it yourself and use `--keep-target`), then `pgferry run PLAN`; or make the target's tables match the source's by hand and run the plan again"));
        }
    }
    let lo_count: i64 = snap_client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "counting large objects"))?
        .get(0);
    tracing::info!(
        database = %db.name,
        "{} of {total} table(s) to copy ({}), {} already copied{}",
        tables.len(),
        human_bytes(tables.iter().map(|t| t.bytes.max(0) as u64).sum()),
        done.len(),
        if lo_count > 0 { format!(", {lo_count} large object(s)") } else { String::new() }
    );

    // Tables the snapshot sees empty are not copied: their target tables only have to be empty.
    let small: Vec<usize> = (0..tables.len())
        .filter(|&i| (tables[i].bytes.max(0) as u64) <= EMPTY_CHECK_BELOW)
        .collect();
    let mut empty: Vec<usize> = match tables_with_rows(&snap_client, &tables, &small, true).await? {
        Some(with_rows) => small
            .into_iter()
            .filter(|i| !with_rows.contains(i))
            .collect(),
        None => Vec::new(),
    };

    // Split big tables into ranges.
    let mut ranges: HashMap<usize, Vec<String>> = HashMap::new();
    if jobs > 1 {
        for (i, t) in tables.iter().enumerate() {
            if (t.bytes.max(0) as u64) > split {
                let r = split_ranges(&snap_client, t, split, server.version_num).await?;
                if r.len() > 1 {
                    ranges.insert(i, r);
                }
            }
        }
    }
    drop(snap_client);

    // The empty tables' target tables: emptied where they hold rows (a load killed between its
    // commit and its checkpoint, or rows put there by hand). When that cannot be asked, they are
    // copied like the others, and the copy says what is wrong.
    if !empty.is_empty() {
        let target = open_target(&target_conn, "load").await?;
        match tables_with_rows(&target, &tables, &empty, false).await? {
            Some(stale) if !stale.is_empty() => {
                let mut stale: Vec<usize> = stale.into_iter().collect();
                stale.sort_unstable();
                let sql = truncate_only(stale.iter().map(|&i| &tables[i].name));
                target
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| Error::pg(&e, format!("emptying the target tables: {sql}")))?;
            }
            Some(_) => {}
            None => empty.clear(),
        }
    }
    let is_empty: HashSet<usize> = empty.iter().copied().collect();

    // The jobs, largest first: split tables by range, big tables alone, small ones in groups.
    let mut jobs_list = Vec::new();
    let mut remaining = HashMap::new();
    let n_small = (0..tables.len())
        .filter(|i| {
            !is_empty.contains(i)
                && !ranges.contains_key(i)
                && (tables[*i].bytes.max(0) as u64) < GROUP_TABLES_BELOW
        })
        .count();
    // Enough groups to keep every worker busy.
    let per_group = GROUP_MAX_TABLES
        .min(n_small.div_ceil(jobs.max(1) as usize))
        .max(1);
    let mut group: Vec<usize> = Vec::new();
    let mut group_bytes = 0u64;
    for (i, table) in tables.iter().enumerate() {
        if is_empty.contains(&i) {
            continue;
        }
        if let Some(r) = ranges.remove(&i) {
            remaining.insert(i, (r.len(), 0, 0));
            for (n, filter) in r.into_iter().enumerate() {
                jobs_list.push(Job::Range {
                    table: i,
                    n,
                    filter,
                });
            }
            continue;
        }
        let bytes = table.bytes.max(0) as u64;
        if bytes >= GROUP_TABLES_BELOW {
            jobs_list.push(Job::Tables(vec![i]));
            continue;
        }
        group.push(i);
        group_bytes += bytes;
        if group.len() >= per_group || group_bytes >= GROUP_MAX_BYTES {
            jobs_list.push(Job::Tables(std::mem::take(&mut group)));
            group_bytes = 0;
        }
    }
    if !group.is_empty() {
        jobs_list.push(Job::Tables(group));
    }
    // Split tables start empty: truncate them once, before their ranges.
    if !remaining.is_empty() {
        let target = target_conn.connect("load truncate").await?;
        for &i in remaining.keys() {
            target
                .batch_execute(&format!("TRUNCATE ONLY {}", tables[i].name.quoted()))
                .await
                .map_err(|e| {
                    Error::pg(&e, format!("emptying target table {}", tables[i].name))
                        .context(format!("table `{}`", tables[i].name))
                })?;
        }
    }

    let load = Arc::new(Load {
        tables,
        queue: Mutex::new(jobs_list.into()),
        remaining: Mutex::new(remaining),
        bytes: AtomicU64::new(0),
        rows: AtomicU64::new(0),
        tables_done: AtomicU64::new(empty.len() as u64),
        lsn,
        snapshot,
        stage: cx.stage.clone(),
        database: db.name.clone(),
        signal: cx.progress(),
    });
    // Every table queued, the empty ones copied already: one pipelined write.
    let marks: Vec<_> = (0..load.tables.len())
        .map(|t| {
            let state = if is_empty.contains(&t) {
                TableState::Copied
            } else {
                TableState::Queued
            };
            load.progress(load.display(t), state, 0, 0, None)
        })
        .collect();
    cx.store.upsert_tables(&marks).await?;
    load.signal.notify();
    if !empty.is_empty() {
        tracing::debug!(database = %db.name, "{} table(s) empty in the snapshot: nothing to copy", empty.len());
    }

    // Workers.
    let stop = cx.cancel.child_token();
    let mut workers = tokio::task::JoinSet::new();
    let n_workers = (jobs as usize).min(load.queue.lock().await.len()).max(1);
    for w in 0..n_workers {
        let load = load.clone();
        let (src, tgt) = (source_conn.clone(), target_conn.clone());
        let store = cx.store.clone();
        let stop = stop.clone();
        workers.spawn(async move { worker(w, load, src, tgt, store, stop).await });
    }
    let ticker = {
        let load = load.clone();
        let total_tables = load.tables.len();
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let b = load.bytes.load(Ordering::Relaxed)
                    + crate::progress::in_flight_bytes(&load.stage, &load.database);
                let rate = b as f64 / start.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    database = %load.database,
                    "copied {}/{} tables, {} ({}/s)",
                    load.tables_done.load(Ordering::Relaxed),
                    total_tables,
                    human_bytes(b),
                    human_bytes(rate as u64)
                );
            }
        })
    };
    let mut first_error: Option<Error> = None;
    while let Some(joined) = workers.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(Error::permanent(format!(
                "internal: a copy worker failed: {e}"
            )))
        });
        if let Err(e) = result
            && first_error.is_none()
        {
            stop.cancel();
            first_error = Some(e);
        }
    }
    ticker.abort();
    if let Some(e) = first_error {
        if cx.cancel.is_cancelled() {
            return Err(Error::interrupted());
        }
        return Err(e);
    }
    cx.check_cancelled()?;

    // Large objects, from the same snapshot.
    let lo_key = crate::status::LARGE_OBJECTS.to_string();
    if lo_count > 0 && !done.contains(&lo_key) {
        let (n, bytes) = copy_large_objects(&load, &source_conn, &target_conn, &cx.cancel).await?;
        cx.store
            .upsert_table(&load.progress(lo_key, TableState::Copied, n, bytes, None))
            .await?;
    }
    match holder {
        SnapshotHolder::Replication(r) => r.close().await,
        SnapshotHolder::Transaction(c) => drop(c),
    }
    let rows = load.rows.load(Ordering::Relaxed);
    let bytes = load.bytes.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    cx.store
        .add_counter(&db.name, "full_load_rows", rows as i64)
        .await?;
    cx.store
        .add_counter(&db.name, "full_load_bytes", bytes as i64)
        .await?;
    tracing::info!(database = %db.name, "copied {} table(s), {rows} rows, {} in {secs:.1}s", load.tables.len(), human_bytes(bytes));
    Ok(serde_json::json!({
        "tables": total,
        "rows": rows,
        "bytes": bytes,
        "seconds": (secs * 10.0).round() / 10.0,
        "lsn": lsn,
    }))
}

/// A source session inside `snapshot`, with settings that make text output exact.
async fn open_snapshot(conn: &ConnInfo, snapshot: &str, purpose: &str) -> Result<Client> {
    let client = conn.connect(purpose).await?;
    client
        .batch_execute(&format!(
            "{SOURCE_SETTINGS} {}",
            import_snapshot_sql(snapshot)
        ))
        .await
        .map_err(|e| Error::pg(&e, "importing the load snapshot"))?;
    Ok(client)
}

async fn open_target(conn: &ConnInfo, purpose: &str) -> Result<Client> {
    let client = conn.connect(purpose).await?;
    client
        .batch_execute(TARGET_SETTINGS)
        .await
        .map_err(|e| Error::pg(&e, "configuring the target session"))?;
    let _ = client
        .batch_execute("SET session_replication_role = replica")
        .await;
    Ok(client)
}

async fn worker(
    id: usize,
    load: Arc<Load>,
    source_conn: ConnInfo,
    target_conn: ConnInfo,
    store: Arc<dyn crate::state::StateStore>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    // Raw protocol sessions: COPY data is forwarded frame by frame, never decoded row by row.
    let purpose = format!("load worker {id}");
    let mut source = WireClient::connect_plain(&source_conn, &purpose).await?;
    source
        .simple_query(&format!(
            "{SOURCE_SETTINGS} {}",
            import_snapshot_sql(&load.snapshot)
        ))
        .await
        .map_err(|e| e.context("importing the load snapshot"))?;
    let mut target = WireClient::connect_plain(&target_conn, &purpose).await?;
    target
        .simple_query(TARGET_SETTINGS)
        .await
        .map_err(|e| e.context("configuring the target session"))?;
    // Loaded rows must not fire target triggers; only possible for superusers (others have none
    // yet: triggers come with post_data).
    let _ = target
        .simple_query("SET session_replication_role = replica")
        .await;
    // Let the servers notice a killed runner mid-copy (where the version has the setting).
    source.set_up_session().await?;
    target.set_up_session().await?;
    loop {
        if stop.is_cancelled() {
            return Err(Error::interrupted());
        }
        let Some(job) = load.queue.lock().await.pop_front() else {
            return Ok(());
        };
        match job {
            Job::Tables(group) => {
                load_tables(&load, &mut source, &mut target, &*store, &stop, &group).await?
            }
            Job::Range { table, n, filter } => {
                load_range(
                    &load,
                    &mut source,
                    &mut target,
                    &*store,
                    &stop,
                    table,
                    n,
                    &filter,
                )
                .await?
            }
        }
    }
}

/// Loads whole tables in one target transaction (`TRUNCATE` of all, `COPY ... FREEZE` of each,
/// one commit) with one checkpoint write before and one after.
async fn load_tables(
    load: &Load,
    source: &mut WireClient,
    target: &mut WireClient,
    store: &dyn crate::state::StateStore,
    stop: &tokio_util::sync::CancellationToken,
    group: &[usize],
) -> Result<()> {
    let mark = |state: TableState| -> Vec<TableProgress> {
        group
            .iter()
            .map(|&t| load.progress(load.display(t), state, 0, 0, None))
            .collect()
    };
    store.upsert_tables(&mark(TableState::Copying)).await?;
    let started = Instant::now();
    let result = tokio::select! {
        r = copy_tables(load, source, target, group) => r,
        _ = stop.cancelled() => {
            // Abandon both sessions: the target transaction rolls back when they close.
            return Err(Error::interrupted());
        }
    };
    let copied = match result {
        Ok(x) => x,
        Err((failed, e)) => {
            // Nothing of the group was committed: the table that failed is `failed`, the others
            // are queued again (all failed when the group's own statements did).
            let e = match failed {
                Some(k) => e.context(format!("table `{}`", load.display(group[k]))),
                None if group.len() == 1 => {
                    e.context(format!("table `{}`", load.display(group[0])))
                }
                None => e.context(format!(
                    "tables {}",
                    group
                        .iter()
                        .map(|&t| format!("`{}`", load.display(t)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            };
            let marks: Vec<TableProgress> = group
                .iter()
                .enumerate()
                .map(|(k, &t)| {
                    if failed.is_none() || failed == Some(k) {
                        load.progress(
                            load.display(t),
                            TableState::Failed,
                            0,
                            0,
                            Some(e.to_string()),
                        )
                    } else {
                        load.progress(load.display(t), TableState::Queued, 0, 0, None)
                    }
                })
                .collect();
            let _ = store.upsert_tables(&marks).await;
            return Err(e);
        }
    };
    let done: Vec<TableProgress> = group
        .iter()
        .zip(&copied)
        .map(|(&t, &(rows, bytes))| {
            load.progress(load.display(t), TableState::Copied, rows, bytes, None)
        })
        .collect();
    let rows: u64 = copied.iter().map(|c| c.0).sum();
    load.rows.fetch_add(rows, Ordering::Relaxed);
    tracing::debug!(tables = group.len(), first = %load.display(group[0]), rows, elapsed = ?started.elapsed(), "copied");
    store.upsert_tables(&done).await?;
    load.signal.notify();
    load.tables_done
        .fetch_add(group.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Copies one range of a split table (its own transaction: the table was emptied before).
#[allow(clippy::too_many_arguments)]
async fn load_range(
    load: &Load,
    source: &mut WireClient,
    target: &mut WireClient,
    store: &dyn crate::state::StateStore,
    stop: &tokio_util::sync::CancellationToken,
    table: usize,
    n: usize,
    filter: &str,
) -> Result<()> {
    let t = &load.tables[table];
    let name = format!("{}#{}", t.name, n + 1);
    let started = Instant::now();
    let live = crate::progress::begin(&load.stage, &load.database, &name, 0);
    let (copy_out, copy_in) = (t.copy_out_sql(Some(filter)), t.copy_in_sql(false));
    let work = source.copy_into(&copy_out, target, &copy_in, &live.bytes);
    let result = tokio::select! {
        r = work => r,
        _ = stop.cancelled() => return Err(Error::interrupted()),
    };
    load.bytes
        .fetch_add(live.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    drop(live);
    let (rows, bytes) = match result {
        Ok(x) => x,
        Err(e) => {
            let e = e.context(format!("table `{}`", t.name));
            let _ = store
                .upsert_table(&load.progress(name, TableState::Failed, 0, 0, Some(e.to_string())))
                .await;
            return Err(e);
        }
    };
    load.rows.fetch_add(rows, Ordering::Relaxed);
    tracing::debug!(table = %name, rows, bytes, elapsed = ?started.elapsed(), "copied");
    store
        .upsert_table(&load.progress(name, TableState::Copied, rows, bytes, None))
        .await?;
    let finished = {
        let mut rem = load.remaining.lock().await;
        let entry = rem.entry(table).or_insert((1, 0, 0));
        entry.0 -= 1;
        entry.1 += rows;
        entry.2 += bytes;
        (entry.0 == 0).then_some((entry.1, entry.2))
    };
    if let Some((r, b)) = finished {
        store
            .upsert_table(&load.progress(t.name.to_string(), TableState::Copied, r, b, None))
            .await?;
        load.signal.notify();
        load.tables_done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Every table of `group` emptied and copied in one transaction: atomic and idempotent. A big table
/// is emptied with `TRUNCATE` and copied with `COPY ... FREEZE` (no anti-wraparound vacuum later);
/// small ones with `DELETE`, which costs nothing on an empty table, where `TRUNCATE` makes new
/// files for the table, its TOAST table and index and drops the old ones (about 4 ms per table,
/// most of the time of a small table's copy). Returns each table's (rows, bytes), or the error
/// with the position in `group` of the table it is about (`None`: the group's own statements).
async fn copy_tables(
    load: &Load,
    source: &mut WireClient,
    target: &mut WireClient,
    group: &[usize],
) -> std::result::Result<Vec<(u64, u64)>, (Option<usize>, Error)> {
    let freeze = group
        .iter()
        .any(|&t| (load.tables[t].bytes.max(0) as u64) >= GROUP_TABLES_BELOW);
    let empty = if freeze {
        format!(
            "BEGIN; {}",
            truncate_only(group.iter().map(|&t| &load.tables[t].name))
        )
    } else {
        let mut sql = String::from("BEGIN;");
        for &t in group {
            sql.push_str(&format!(
                " DELETE FROM ONLY {};",
                load.tables[t].name.quoted()
            ));
        }
        sql
    };
    target
        .simple_query(&empty)
        .await
        .map_err(|e| (None, e.context("emptying the target table(s)")))?;
    let mut copied = Vec::with_capacity(group.len());
    for (k, &t) in group.iter().enumerate() {
        let table = &load.tables[t];
        // Live progress (terminal bars, the periodic log line): this table's bytes as they stream.
        let live = crate::progress::begin(
            &load.stage,
            &load.database,
            &load.display(t),
            table.bytes.max(0) as u64,
        );
        let result = source
            .copy_into(
                &table.copy_out_sql(None),
                target,
                &table.copy_in_sql(freeze),
                &live.bytes,
            )
            .await;
        load.bytes
            .fetch_add(live.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        drop(live);
        copied.push(result.map_err(|e| (Some(k), e))?);
    }
    target
        .simple_query("COMMIT")
        .await
        .map_err(|e| (None, e.context("committing the copy")))?;
    Ok(copied)
}

/// Source session settings that make text output exact and keep long copies alive.
const SOURCE_SETTINGS: &str = "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
     SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3; SET bytea_output = hex;";

/// Target session settings for loading.
const TARGET_SETTINGS: &str = "SET statement_timeout = 0; SET synchronous_commit = off; \
     SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3";

fn import_snapshot_sql(snapshot: &str) -> String {
    format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    )
}

/// Range filters covering the whole table: by integer primary key, else by ctid blocks (14+).
async fn split_ranges(
    client: &Client,
    t: &CopyTable,
    split: u64,
    version: i32,
) -> Result<Vec<String>> {
    let n = ((t.bytes.max(0) as u64).div_ceil(split)).clamp(2, MAX_RANGES);
    if let Some(key) = &t.int_key {
        let k = crate::pg::ident::quote_ident(key);
        let row = client
            .query_one(
                &format!(
                    "SELECT min({k})::int8, max({k})::int8 FROM ONLY {}",
                    t.name.quoted()
                ),
                &[],
            )
            .await
            .map_err(|e| Error::pg(&e, format!("finding the key range of {}", t.name)))?;
        let (Some(lo), Some(hi)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
        else {
            return Ok(Vec::new());
        };
        let span = (hi as i128 - lo as i128 + 1).max(1);
        let step = (span / n as i128).max(1);
        let mut out = Vec::new();
        let mut start = lo as i128;
        while start <= hi as i128 {
            let end = start + step;
            if end > hi as i128 || out.len() as u64 + 1 == n {
                out.push(format!("{k} >= {start}"));
                break;
            }
            out.push(format!("{k} >= {start} AND {k} < {end}"));
            start = end;
        }
        return Ok(out);
    }
    if version < 140000 {
        return Ok(Vec::new());
    }
    let blocks: i64 = client
        .query_one(
            "SELECT (pg_catalog.pg_relation_size($1::text::regclass) / current_setting('block_size')::int8)",
            &[&t.name.quoted()],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("measuring {}", t.name)))?
        .get(0);
    if blocks < 2 {
        return Ok(Vec::new());
    }
    let step = (blocks as u64).div_ceil(n).max(1);
    let mut out = Vec::new();
    let mut start = 0u64;
    while start < blocks as u64 {
        let end = start + step;
        if end >= blocks as u64 {
            // The last range is open-ended: rows may sit past the size measured.
            out.push(format!("ctid >= '({start},0)'::tid"));
            break;
        }
        out.push(format!(
            "ctid >= '({start},0)'::tid AND ctid < '({end},0)'::tid"
        ));
        start = end;
    }
    Ok(out)
}

/// Copies every large object from the load's snapshot.
async fn copy_large_objects(
    load: &Load,
    source_conn: &ConnInfo,
    target_conn: &ConnInfo,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(u64, u64)> {
    let source = open_snapshot(source_conn, &load.snapshot, "load large objects").await?;
    let target = open_target(target_conn, "load large objects").await?;
    let (n, bytes) = crate::pg::large_objects::copy_all(&source, &target, cancel).await?;
    load.bytes.fetch_add(bytes, Ordering::Relaxed);
    Ok((n, bytes))
}

/// Which of `candidates` (indices into `tables`) hold at least one row as `client` sees them (in
/// its snapshot), asked `EMPTY_CHECK_CHUNK` tables per query. `None` when a query fails (a table
/// the session may not read, or one missing): the caller copies those tables the ordinary way,
/// whose error says which. `in_transaction`: `client` is in a transaction that must stay usable.
async fn tables_with_rows(
    client: &Client,
    tables: &[CopyTable],
    candidates: &[usize],
    in_transaction: bool,
) -> Result<Option<HashSet<usize>>> {
    let mut with_rows = HashSet::new();
    if candidates.is_empty() {
        return Ok(Some(with_rows));
    }
    if in_transaction {
        client
            .batch_execute("SAVEPOINT pgferry_rows")
            .await
            .map_err(|e| Error::pg(&e, "setting a savepoint"))?;
    }
    for chunk in candidates.chunks(EMPTY_CHECK_CHUNK) {
        let sql = chunk
            .iter()
            .map(|&i| {
                format!(
                    "SELECT {i} WHERE EXISTS (SELECT FROM ONLY {})",
                    tables[i].name.quoted()
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        match client.simple_query(&sql).await {
            Ok(messages) => {
                for m in messages {
                    if let tokio_postgres::SimpleQueryMessage::Row(row) = m
                        && let Some(i) = row.get(0).and_then(|v| v.parse::<usize>().ok())
                    {
                        with_rows.insert(i);
                    }
                }
            }
            Err(e) => {
                tracing::debug!("could not ask which tables hold rows ({e}); copying them all");
                if in_transaction {
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT pgferry_rows")
                        .await
                        .map_err(|e| Error::pg(&e, "rolling back to a savepoint"))?;
                }
                return Ok(None);
            }
        }
    }
    if in_transaction {
        client
            .batch_execute("RELEASE SAVEPOINT pgferry_rows")
            .await
            .map_err(|e| Error::pg(&e, "releasing a savepoint"))?;
    }
    Ok(Some(with_rows))
}

/// `TRUNCATE ONLY a, ONLY b, ...`: ONLY before every name, since in `TRUNCATE ONLY a, b` it covers
/// `a` alone and `b` would take its inheritance children (copied by other jobs) with it.
fn truncate_only<'a>(names: impl Iterator<Item = &'a crate::pg::ident::QualifiedName>) -> String {
    let list = names
        .map(|n| format!("ONLY {}", n.quoted()))
        .collect::<Vec<_>>()
        .join(", ");
    format!("TRUNCATE {list}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::ident::QualifiedName;

    #[test]
    fn truncate_spares_every_tables_children() {
        let names = [
            QualifiedName::new("public".to_string(), "a".to_string()),
            QualifiedName::new("public".to_string(), "Person".to_string()),
        ];
        assert_eq!(
            truncate_only(names.iter()),
            r#"TRUNCATE ONLY "public"."a", ONLY "public"."Person""#
        );
    }
}
