//! The `full_load` stage: copies every selected table from one consistent snapshot of each source
//! database, `jobs` tables at a time, largest first, streaming `COPY TO` into `COPY FROM`.
//!
//! - The snapshot: for an online plan (one with a `cdc` stage), the one exported by creating the
//!   database's logical replication slot, so CDC starts exactly where the copy ends. When a load
//!   resumes after a crash the slot already exists and its snapshot died with the crash: the rest is
//!   copied from the snapshot of a *temporary* slot, whose consistent point is recorded per table;
//!   CDC skips a table's changes up to the LSN its copy was taken at. Offline, an exported snapshot
//!   of an ordinary repeatable-read transaction.
//! - A table copied whole is loaded with `TRUNCATE` + `COPY ... FREEZE` in one transaction: atomic,
//!   idempotent, and no anti-wraparound vacuum needed later.
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
struct Job {
    table: usize,
    /// `None`: the whole table (TRUNCATE + COPY FREEZE). `Some((n, filter))`: range `n`.
    range: Option<(usize, String)>,
}

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

    // Split big tables into ranges.
    let mut jobs_list = Vec::new();
    let mut remaining = HashMap::new();
    for (i, t) in tables.iter().enumerate() {
        let ranges = if (t.bytes.max(0) as u64) > split && jobs > 1 {
            split_ranges(&snap_client, t, split, server.version_num).await?
        } else {
            Vec::new()
        };
        if ranges.len() > 1 {
            remaining.insert(i, (ranges.len(), 0, 0));
            for (n, f) in ranges.into_iter().enumerate() {
                jobs_list.push(Job {
                    table: i,
                    range: Some((n, f)),
                });
            }
        } else {
            jobs_list.push(Job {
                table: i,
                range: None,
            });
        }
    }
    drop(snap_client);
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
        tables_done: AtomicU64::new(0),
        lsn,
        snapshot,
        stage: cx.stage.clone(),
        database: db.name.clone(),
    });
    let queued: Vec<_> = (0..load.tables.len())
        .map(|t| load.progress(load.display(t), TableState::Queued, 0, 0, None))
        .collect();
    cx.store.upsert_tables(&queued).await?;

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
        let t = &load.tables[job.table];
        let name = match &job.range {
            None => t.name.to_string(),
            Some((n, _)) => format!("{}#{}", t.name, n + 1),
        };
        if job.range.is_none() {
            store
                .upsert_table(&load.progress(name.clone(), TableState::Copying, 0, 0, None))
                .await?;
        }
        let started = Instant::now();
        // Live progress (terminal bars, the periodic log line): this job's bytes as they stream.
        let expected = if job.range.is_none() {
            t.bytes.max(0) as u64
        } else {
            0
        };
        let live = crate::progress::begin(&load.stage, &load.database, &name, expected);
        let work = copy_job(&mut source, &mut target, t, &job, &live.bytes);
        let result = tokio::select! {
            r = work => r,
            _ = stop.cancelled() => {
                // Abandon both sessions: the target transaction rolls back when they close.
                return Err(Error::interrupted());
            }
        };
        load.bytes
            .fetch_add(live.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        drop(live);
        let (rows, bytes) = match result {
            Ok(x) => x,
            Err(e) => {
                let e = e.context(format!("table `{}`", t.name));
                let _ = store
                    .upsert_table(&load.progress(
                        name,
                        TableState::Failed,
                        0,
                        0,
                        Some(e.to_string()),
                    ))
                    .await;
                return Err(e);
            }
        };
        load.rows.fetch_add(rows, Ordering::Relaxed);
        tracing::debug!(table = %name, rows, bytes, elapsed = ?started.elapsed(), "copied");
        match &job.range {
            None => {
                store
                    .upsert_table(&load.progress(name, TableState::Copied, rows, bytes, None))
                    .await?;
                load.tables_done.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                store
                    .upsert_table(&load.progress(name, TableState::Copied, rows, bytes, None))
                    .await?;
                let finished = {
                    let mut rem = load.remaining.lock().await;
                    let entry = rem.entry(job.table).or_insert((1, 0, 0));
                    entry.0 -= 1;
                    entry.1 += rows;
                    entry.2 += bytes;
                    (entry.0 == 0).then_some((entry.1, entry.2))
                };
                if let Some((r, b)) = finished {
                    store
                        .upsert_table(&load.progress(
                            t.name.to_string(),
                            TableState::Copied,
                            r,
                            b,
                            None,
                        ))
                        .await?;
                    load.tables_done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn copy_job(
    source: &mut WireClient,
    target: &mut WireClient,
    t: &CopyTable,
    job: &Job,
    progress: &AtomicU64,
) -> Result<(u64, u64)> {
    match &job.range {
        None => {
            // TRUNCATE and COPY FREEZE in one transaction: atomic, idempotent, rows frozen.
            target
                .simple_query(&format!("BEGIN; TRUNCATE ONLY {}", t.name.quoted()))
                .await
                .map_err(|e| e.context("emptying the target table"))?;
            let copied = source
                .copy_into(
                    &t.copy_out_sql(None),
                    target,
                    &t.copy_in_sql(true),
                    progress,
                )
                .await?;
            target
                .simple_query("COMMIT")
                .await
                .map_err(|e| e.context("committing the copy"))?;
            Ok(copied)
        }
        Some((_, filter)) => {
            source
                .copy_into(
                    &t.copy_out_sql(Some(filter)),
                    target,
                    &t.copy_in_sql(false),
                    progress,
                )
                .await
        }
    }
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
