//! The `validate` stage (and `pgferry verify`): an exact comparison of the source and the target as
//! of the same moment, narrowed down to rows.
//!
//! Per database: take the two snapshots ([`snapshot`]: plain exported snapshots offline; a
//! temporary slot's snapshot plus the cdc hold protocol while cdc runs), open `jobs` pairs of
//! worker sessions inside them, list the selected tables on the source ([`tables`]), and compare:
//!
//! - `count`: row counts per table.
//! - `checksum` (default): per key-range chunk ([`chunk`]) a digest computed inside each server
//!   ([`digest`]), both sides at once, `jobs` units at a time; each mismatched chunk is narrowed
//!   to rows ([`rows`]) by key and row hash, then the differing rows' columns.
//! - `full`: as checksum, but mismatched chunks are fetched and compared column by column.
//!
//! Tables without a key are compared as a whole with an order-independent digest and diffed as
//! multisets. Sequences are compared when nothing replicates into the target (target value at
//! least the source's). The [`report::Report`] goes to the store (`validation/<stage>.json` and
//! `validation/latest.json`), the `dataErrorsCount` counters (per `db.schema.table`) follow the
//! latest report, and any difference fails the stage with exit code 3.

pub mod chunk;
pub mod digest;
pub mod report;
pub mod rows;
pub mod snapshot;
pub mod tables;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::plan::StageKind;
use crate::plan::raw::ValidateOptions;
use crate::plan::{Database, StageOptions};
use crate::select::Selection;
use crate::state::{StageState, StateStore, Timestamp};
use report::{Mismatch, MismatchKind, Report, TableSummary};
use tables::ValTable;

/// The artifact the latest validation (stage or `verify`) is kept in.
pub const LATEST_ARTIFACT: &str = "validation/latest.json";

/// The artifact of one stage's (or `verify`'s) latest validation.
pub fn artifact_name(stage: &str) -> String {
    format!("validation/{stage}.json")
}

/// How to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Count,
    Checksum,
    Full,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "count" => Mode::Count,
            "checksum" => Mode::Checksum,
            "full" => Mode::Full,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Count => "count",
            Mode::Checksum => "checksum",
            Mode::Full => "full",
        }
    }
}

/// The options of one validation.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub jobs: usize,
    pub chunk_rows: u64,
    pub exclude_generated: bool,
    pub hold_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options::from_raw(&ValidateOptions::default())
    }
}

impl Options {
    fn from_raw(v: &ValidateOptions) -> Options {
        Options {
            mode: Mode::parse(v.mode()).unwrap_or(Mode::Checksum),
            jobs: v.jobs().max(1) as usize,
            chunk_rows: u64::from(v.chunk_rows().max(1)),
            exclude_generated: v.exclude_generated(),
            hold_timeout: v.hold_timeout(),
        }
    }

    /// The options of stage `index` for database number `db`.
    pub fn of_stage(env: &Env, index: usize, db: usize) -> Options {
        match env.plan.stages[index].options.get(db) {
            Some(StageOptions::Validate(v)) => Options::from_raw(v),
            _ => Options::default(),
        }
    }
}

/// How the cdc stage of the plan stands, which decides how snapshots are taken.
pub struct SnapshotSync {
    /// The store, when cdc runs (online): the hold protocol goes through it.
    pub online: Option<Arc<dyn StateStore>>,
    pub cdc_stage: Option<String>,
    /// Why the two sides cannot be compared as of one moment: a rehearsal's cutover drained cdc
    /// to its simulated fence while the source kept being written, and no snapshot of the source
    /// as of that position can be taken any more.
    pub not_comparable: Option<String>,
    /// After a cutover that armed a fallback stream, while that stream runs: the comparison goes
    /// the other way (the target, where the application writes, against the source the fallback
    /// stream keeps in step), holding the fallback stream as of one target LSN.
    pub reverse: bool,
}

impl SnapshotSync {
    /// Online when the plan's cdc stage is running or ready and no cutover has finished.
    pub async fn detect(env: &Env, store: Option<&Arc<dyn StateStore>>) -> Result<SnapshotSync> {
        let cdc_stage = env
            .plan
            .stages
            .iter()
            .find(|s| s.kind == StageKind::Cdc)
            .map(|s| s.id.clone());
        let (Some(store), Some(cdc_id)) = (store, &cdc_stage) else {
            return Ok(SnapshotSync {
                online: None,
                cdc_stage,
                not_comparable: None,
                reverse: false,
            });
        };
        let mut not_comparable = None;
        for s in env
            .plan
            .stages
            .iter()
            .filter(|s| s.kind == StageKind::Cutover)
        {
            for db in &env.plan.databases {
                let drain = store
                    .checkpoint(&s.id, &crate::stages::cdc::drain_key(&db.name))
                    .await?;
                let rehearsed = drain
                    .as_ref()
                    .and_then(|v| v.get("rehearsal"))
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                if rehearsed && not_comparable.is_none() {
                    not_comparable = Some(format!(
                        "the rehearsal's cutover (stage `{}`) drained cdc to its simulated fence at {} while the source kept being written: the source cannot be read as of that position any more, so a comparison would report the later writes as differences",
                        s.id,
                        drain
                            .as_ref()
                            .and_then(|v| v.get("lsn"))
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("?")
                    ));
                }
            }
        }
        let records = store.stages().await?;
        let state = |id: &str| records.iter().find(|r| r.stage == id).map(|r| r.state);
        let cdc_running = matches!(
            state(cdc_id),
            Some(StageState::Running) | Some(StageState::Ready)
        );
        let cutover_done = env
            .plan
            .stages
            .iter()
            .filter(|s| s.kind == StageKind::Cutover)
            .any(|s| state(&s.id) == Some(StageState::Done));
        // The fallback stream runs (a cutover armed it, no rollback or stop has ended it).
        let fallback_running = env
            .plan
            .stages
            .iter()
            .filter(|s| s.kind == StageKind::Fallback)
            .any(|s| state(&s.id) == Some(StageState::Running));
        let reverse = cutover_done && fallback_running;
        Ok(SnapshotSync {
            online: ((cdc_running && !cutover_done) || reverse).then(|| store.clone()),
            cdc_stage: if reverse {
                env.plan
                    .stages
                    .iter()
                    .find(|s| s.kind == StageKind::Fallback)
                    .map(|s| s.id.clone())
            } else {
                cdc_stage
            },
            not_comparable,
            reverse,
        })
    }
}

/// Validates every database of the plan; `options(i)` gives database `i`'s options.
pub async fn validate(
    env: &Env,
    label: &str,
    options: &(dyn Fn(usize) -> Options + Send + Sync),
    sync: &SnapshotSync,
    cancel: &CancellationToken,
) -> Result<Report> {
    let started = Instant::now();
    let started_at = Timestamp::now();
    let mut report = Report {
        stage: label.to_string(),
        mode: options(0).mode.as_str().to_string(),
        started_at: started_at.rfc3339(),
        ..Report::default()
    };
    for (i, db) in env.plan.databases.iter().enumerate() {
        let opts = options(i);
        let result = if sync.reverse {
            // The sides swapped: the target is read as "the source", the old source as "the
            // target", and the fallback stream is held under its own name.
            let (back_env, back) = crate::stages::fallback::swapped(env, db);
            validate_database(
                &back_env,
                &back,
                &crate::stages::fallback::store_key(&db.name),
                &opts,
                sync,
                cancel,
                &mut report,
            )
            .await
        } else {
            validate_database(env, db, &db.name, &opts, sync, cancel, &mut report).await
        };
        result.map_err(|e| e.context(format!("database `{}`", db.name)))?;
    }
    report.finished_at = Timestamp::now().rfc3339();
    report.seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    report.mismatch_count = report.tables.iter().map(|t| t.mismatches).sum::<usize>()
        + report
            .mismatches
            .iter()
            .filter(|m| {
                !report
                    .tables
                    .iter()
                    .any(|t| t.database == m.database && t.table == m.table)
            })
            .count();
    Ok(report)
}

/// One unit of comparison work.
#[derive(Debug, Clone, Copy)]
struct Unit {
    table: usize,
    span: chunk::Span,
}

/// The shared state of one database's comparison.
struct Work {
    database: String,
    tables: Vec<ValTable>,
    bounds: Vec<Vec<String>>,
    queue: Mutex<VecDeque<Unit>>,
    summaries: Mutex<Vec<TableSummary>>,
    mismatches: Mutex<Vec<Vec<Mismatch>>>,
    opts: Options,
}

impl Work {
    async fn record(&self, t: usize, found: Vec<Mismatch>) {
        if found.is_empty() {
            return;
        }
        let n = found.len();
        {
            let mut s = self.summaries.lock().await;
            s[t].mismatches += n;
        }
        let mut all = self.mismatches.lock().await;
        let room = report::MAX_PER_TABLE.saturating_sub(all[t].len());
        all[t].extend(found.into_iter().take(room));
    }
}

async fn validate_database(
    env: &Env,
    db: &Database,
    hold_key: &str,
    opts: &Options,
    sync: &SnapshotSync,
    cancel: &CancellationToken,
    report: &mut Report,
) -> Result<()> {
    let source_conn = env.source_for(db);
    let target_conn = env.target_for(db);
    let purpose = "validate";
    let snaps = snapshot::take(
        &source_conn,
        &target_conn,
        &env.plan.name,
        hold_key,
        sync.online.as_ref(),
        sync.cdc_stage.as_deref(),
        opts.hold_timeout,
        cancel,
        purpose,
    )
    .await?;
    let mut info = snaps.info.clone();
    if sync.reverse {
        info.note = Some(format!(
            "compared in reverse, as of target LSN {}: target database {} (read as the source) against source database {}, which the fallback stream keeps in step; sequences not compared while it runs",
            info.lsn.map_or_else(|| "?".to_string(), |l| l.to_string()),
            db.name,
            db.target
        ));
    }

    // The worker session pairs.
    let mut pairs = Vec::with_capacity(opts.jobs);
    for _ in 0..opts.jobs {
        let (s, t) = tokio::join!(
            snapshot::open_worker(&source_conn, &snaps.source, purpose),
            snapshot::open_worker(&target_conn, &snaps.target, purpose)
        );
        pairs.push((
            s.map_err(|e| e.context("source"))?,
            t.map_err(|e| e.context("target"))?,
        ));
    }
    let (src0, tgt0) = &pairs[0];
    let selection = Selection::new(&db.tables, &db.exclude);
    let listed = tables::list(src0, &env.plan.state.schema, &selection)
        .await
        .map_err(|e| e.context("source"))?;

    // Tables the target lacks (or lacks columns of) are differences on their own.
    let mut tables = Vec::new();
    for t in listed {
        cancel_check(cancel)?;
        let present = tables::target_columns(tgt0, &t.name)
            .await
            .map_err(|e| e.context("target"))?;
        let problem = match present {
            None => Some("the table does not exist on the target".to_string()),
            Some(cols) => {
                let lacking: Vec<&str> = t
                    .compared(opts.exclude_generated)
                    .into_iter()
                    .filter(|c| !cols.iter().any(|x| x == c))
                    .collect();
                (!lacking.is_empty())
                    .then(|| format!("the target table lacks column(s) {}", lacking.join(", ")))
            }
        };
        match problem {
            Some(p) => {
                report.tables.push(TableSummary {
                    database: db.name.clone(),
                    table: t.name.to_string(),
                    key: t.key.clone(),
                    mismatches: 1,
                    ..TableSummary::default()
                });
                report.mismatches.push(Mismatch {
                    database: db.name.clone(),
                    table: t.name.to_string(),
                    key: None,
                    kind: MismatchKind::Missing,
                    columns: Vec::new(),
                    count: None,
                    detail: Some(p),
                });
            }
            None => tables.push(t),
        }
    }

    // Chunk boundaries, once, on the source.
    let mut bounds = Vec::with_capacity(tables.len());
    for t in &tables {
        cancel_check(cancel)?;
        bounds.push(match opts.mode {
            Mode::Count => Vec::new(),
            _ => chunk::boundaries(src0, t, opts.chunk_rows)
                .await
                .map_err(|e| e.context(format!("table `{}`", t.name)))?,
        });
    }
    let mut queue = VecDeque::new();
    for (i, (t, b)) in tables.iter().zip(&bounds).enumerate() {
        for span in chunk::units(t, b.len()) {
            queue.push_back(Unit { table: i, span });
        }
    }
    let summaries = tables
        .iter()
        .zip(&bounds)
        .map(|(t, b)| TableSummary {
            database: db.name.clone(),
            table: t.name.to_string(),
            key: t.key.clone(),
            chunks: if opts.mode == Mode::Count {
                0
            } else {
                b.len() + 1
            },
            ..TableSummary::default()
        })
        .collect();
    let n_tables = tables.len();
    let n_units = queue.len();
    tracing::info!(
        database = %db.name,
        "comparing {n_tables} table(s) in {n_units} unit(s), {} mode, {} job(s), snapshots {}{}",
        opts.mode.as_str(),
        opts.jobs,
        info.method,
        info.lsn.map(|l| format!(" at {l}")).unwrap_or_default()
    );
    let work = Arc::new(Work {
        database: db.name.clone(),
        tables,
        bounds,
        queue: Mutex::new(queue),
        summaries: Mutex::new(summaries),
        mismatches: Mutex::new(vec![Vec::new(); n_tables]),
        opts: opts.clone(),
    });

    let mut set = tokio::task::JoinSet::new();
    for (n, (s, t)) in pairs.into_iter().enumerate() {
        let work = work.clone();
        let cancel = cancel.clone();
        set.spawn(async move { worker(n, work, s, t, cancel).await });
    }
    let mut failure: Option<Error> = None;
    while let Some(joined) = set.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(Error::permanent(format!(
                "internal: a validation worker failed: {e}"
            )))
        });
        if let Err(e) = result
            && failure.is_none()
        {
            // Stop the others: the queue is emptied, they finish their current unit.
            work.queue.lock().await.clear();
            failure = Some(e);
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }

    let summaries = std::mem::take(&mut *work.summaries.lock().await);
    let mut found = std::mem::take(&mut *work.mismatches.lock().await);
    for (summary, m) in summaries.into_iter().zip(found.iter_mut()) {
        m.sort_by_key(|x| (x.kind.as_str(), x.key.as_ref().map(|k| k.to_string())));
        report.tables.push(summary);
        report.mismatches.append(m);
    }

    // Sequences, unless cdc still replicates into the target (it does not carry them).
    if sync.online.is_none() {
        let (n, seq) = compare_sequences(env, db)
            .await
            .map_err(|e| e.context("comparing sequences"))?;
        report.sequences_compared += n;
        report.mismatches.extend(seq);
    } else {
        info.note
            .get_or_insert_with(|| "sequences not compared while cdc runs".into());
    }
    report.snapshots.push(info);
    drop(snaps);
    Ok(())
}

fn cancel_check(cancel: &CancellationToken) -> Result<()> {
    if cancel.is_cancelled() {
        Err(Error::interrupted())
    } else {
        Ok(())
    }
}

async fn worker(
    id: usize,
    work: Arc<Work>,
    source: Client,
    target: Client,
    cancel: CancellationToken,
) -> Result<()> {
    // A digest query groups by chunk number; not knowing there are only a few dozen chunks, the
    // planner would sort every row (spilling to disk) rather than hash them into a few groups.
    // Only the workers' queries run from here on, and none of them needs a sort.
    for (c, side) in [(&source, "source"), (&target, "target")] {
        c.batch_execute("SET enable_sort = off")
            .await
            .map_err(|e| Error::pg(&e, "configuring a worker session").context(side))?;
    }
    loop {
        cancel_check(&cancel)?;
        let Some(unit) = work.queue.lock().await.pop_front() else {
            return Ok(());
        };
        let t = &work.tables[unit.table];
        tracing::debug!(worker = id, table = %t.name, "chunks {}..={}", unit.span.first, unit.span.last);
        compare_unit(&work, unit, &source, &target)
            .await
            .map_err(|e| e.context(format!("table `{}`", t.name)))?;
    }
}

async fn compare_unit(work: &Work, unit: Unit, source: &Client, target: &Client) -> Result<()> {
    let t = &work.tables[unit.table];
    let bounds = &work.bounds[unit.table];
    let opts = &work.opts;
    if opts.mode == Mode::Count {
        let (s, g) = tokio::join!(digest::count(source, t), digest::count(target, t));
        let (s, g) = (
            s.map_err(|e| e.context("source"))?,
            g.map_err(|e| e.context("target"))?,
        );
        {
            let mut sums = work.summaries.lock().await;
            sums[unit.table].source_rows = s;
            sums[unit.table].target_rows = g;
        }
        if s != g {
            work.record(
                unit.table,
                vec![Mismatch {
                    database: work.database.clone(),
                    table: t.name.to_string(),
                    key: None,
                    kind: if g < s {
                        MismatchKind::Missing
                    } else {
                        MismatchKind::Extra
                    },
                    columns: Vec::new(),
                    count: Some((s - g).abs()),
                    detail: Some(format!("source has {s} rows, target {g}")),
                }],
            )
            .await;
        }
        return Ok(());
    }
    let (s, g) = tokio::join!(
        digest::span_digests(source, t, bounds, unit.span, opts.exclude_generated),
        digest::span_digests(target, t, bounds, unit.span, opts.exclude_generated)
    );
    let (s, g) = (
        s.map_err(|e| e.context("source"))?,
        g.map_err(|e| e.context("target"))?,
    );
    let (src_rows, tgt_rows) = (
        s.values().map(|d| d.rows).sum::<i64>(),
        g.values().map(|d| d.rows).sum::<i64>(),
    );
    let empty = digest::Digest {
        rows: 0,
        sum: "0".into(),
    };
    let mut chunks: Vec<usize> = s.keys().chain(g.keys()).copied().collect();
    chunks.sort_unstable();
    chunks.dedup();
    let mismatched: Vec<usize> = chunks
        .into_iter()
        .filter(|c| s.get(c).unwrap_or(&empty) != g.get(c).unwrap_or(&empty))
        .collect();
    {
        let mut sums = work.summaries.lock().await;
        let sum = &mut sums[unit.table];
        sum.source_rows += src_rows;
        sum.target_rows += tgt_rows;
        sum.mismatched_chunks += mismatched.len();
    }
    for c in mismatched {
        let found = if t.key.is_empty() {
            rows::narrow_keyless(source, target, &work.database, t, opts.exclude_generated).await?
        } else {
            rows::narrow_chunk(
                source,
                target,
                &work.database,
                t,
                bounds,
                c,
                opts.mode == Mode::Full,
                opts.exclude_generated,
            )
            .await?
        };
        if found.is_empty() {
            // The digests differ but no row does: only possible if the row texts differ in a way
            // the column comparison cannot see. Report the chunk itself.
            work.record(
                unit.table,
                vec![Mismatch {
                    database: work.database.clone(),
                    table: t.name.to_string(),
                    key: None,
                    kind: MismatchKind::Different,
                    columns: Vec::new(),
                    count: None,
                    detail: Some(format!("chunk {c}: digests differ")),
                }],
            )
            .await;
        }
        work.record(unit.table, found).await;
    }
    Ok(())
}

/// Compares the sequences of the selected tables: the target's value must be at least the
/// source's. Returns (sequences compared, mismatches).
async fn compare_sequences(env: &Env, db: &Database) -> Result<(usize, Vec<Mismatch>)> {
    use super::sequence_reset::{read_values, sequences_of, target_sequences};
    let source = env
        .source_for(db)
        .connect("validate sequences")
        .await
        .map_err(|e| e.context("source"))?;
    let selected = env.selected_tables(&source, db).await?;
    let sequences = sequences_of(&source, &selected).await?;
    if sequences.is_empty() {
        return Ok((0, Vec::new()));
    }
    let target = env
        .target_for(db)
        .connect("validate sequences")
        .await
        .map_err(|e| e.context("target"))?;
    let present = target_sequences(&target).await?;
    let mut out = Vec::new();
    let here: Vec<_> = sequences
        .iter()
        .filter(|s| present.contains(*s))
        .cloned()
        .collect();
    for s in sequences.iter().filter(|s| !present.contains(*s)) {
        out.push(Mismatch {
            database: db.name.clone(),
            table: s.to_string(),
            key: None,
            kind: MismatchKind::Missing,
            columns: Vec::new(),
            count: None,
            detail: Some("the sequence does not exist on the target".into()),
        });
    }
    let wanted = read_values(&source, &here).await?;
    let current = read_values(&target, &here).await?;
    for ((seq, s), g) in here.iter().zip(&wanted).zip(&current) {
        // The next value the target hands out must not be one the source already gave.
        let behind = g.last_value < s.last_value
            || (g.last_value == s.last_value && s.is_called && !g.is_called);
        if behind {
            out.push(Mismatch {
                database: db.name.clone(),
                table: seq.to_string(),
                key: None,
                kind: MismatchKind::Different,
                columns: vec!["last_value".into()],
                count: None,
                detail: Some(format!(
                    "target sequence at {} is behind the source's {} (is_called {} / {})",
                    g.last_value, s.last_value, g.is_called, s.is_called
                )),
            });
        }
    }
    Ok((sequences.len(), out))
}

/// Stores a finished report: `validation/<label>.json`, `validation/latest.json`, and the
/// `dataErrorsCount` counters moved to the new report's counts.
pub async fn store_report(store: &dyn StateStore, report: &Report) -> Result<()> {
    let previous: Option<Report> = store
        .artifact(LATEST_ARTIFACT)
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut old: HashMap<String, i64> = HashMap::new();
    if let Some(p) = &previous {
        for (scope, n) in counts(p) {
            old.insert(scope, n);
        }
    }
    let new: BTreeMap<String, i64> = counts(report).into_iter().collect();
    for (scope, n) in &new {
        let delta = n - old.get(scope).copied().unwrap_or(0);
        if delta != 0 {
            store.add_counter(scope, "dataErrorsCount", delta).await?;
        }
    }
    for (scope, n) in &old {
        if !new.contains_key(scope) && *n != 0 {
            store.add_counter(scope, "dataErrorsCount", -n).await?;
        }
    }
    let text = serde_json::to_vec_pretty(report)
        .map_err(|e| Error::permanent(format!("serializing the validation report: {e}")))?;
    store
        .put_artifact(&artifact_name(&report.stage), &text)
        .await?;
    store.put_artifact(LATEST_ARTIFACT, &text).await?;
    Ok(())
}

/// Differences per `db.schema.table` scope.
fn counts(r: &Report) -> Vec<(String, i64)> {
    let mut m: BTreeMap<String, i64> = BTreeMap::new();
    for t in &r.tables {
        *m.entry(format!("{}.{}", t.database, t.table)).or_default() += t.mismatches as i64;
    }
    for x in &r.mismatches {
        if !r
            .tables
            .iter()
            .any(|t| t.database == x.database && t.table == x.table)
        {
            *m.entry(format!("{}.{}", x.database, x.table)).or_default() += 1;
        }
    }
    m.into_iter().collect()
}

pub struct Validate {
    env: Arc<Env>,
    index: usize,
}

impl Validate {
    pub fn new(env: Arc<Env>, index: usize) -> Validate {
        Validate { env, index }
    }
}

#[async_trait]
impl Stage for Validate {
    fn describe(&self) -> Vec<String> {
        self.env
            .plan
            .databases
            .iter()
            .enumerate()
            .map(|(i, db)| {
                let o = Options::of_stage(&self.env, self.index, i);
                format!(
                    "compare {} with {} as of one snapshot per side ({} mode, {} job(s){}); fails with exit code 3 on any difference",
                    db.name,
                    db.target,
                    o.mode.as_str(),
                    o.jobs,
                    if o.mode == Mode::Count {
                        String::new()
                    } else {
                        format!(", chunks of about {} rows", o.chunk_rows)
                    }
                )
            })
            .collect()
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        let sync = SnapshotSync::detect(&self.env, Some(&cx.store)).await?;
        if let Some(why) = &sync.not_comparable {
            let msg = format!(
                "validation skipped: {why}; in a rehearsal, validate while cdc runs (a validate stage after cdc, before the cutover)"
            );
            tracing::warn!(stage = %cx.stage, "{msg}");
            cx.store.event(Some(&cx.stage), "warn", &msg).await?;
            cx.store
                .set_stage_detail(
                    &cx.stage,
                    &serde_json::json!({ "skipped": "rehearsal", "reason": why }),
                )
                .await?;
            return Ok(());
        }
        let index = self.index;
        let env = self.env.clone();
        let report = validate(
            &self.env,
            &cx.stage,
            &move |db| Options::of_stage(&env, index, db),
            &sync,
            &cx.cancel,
        )
        .await?;
        store_report(cx.store.as_ref(), &report).await?;
        let summary = report.summary(20);
        cx.store
            .set_stage_detail(
                &cx.stage,
                &serde_json::json!({
                    "mode": report.mode,
                    "tables": report.tables.len(),
                    "sequences": report.sequences_compared,
                    "mismatches": report.mismatch_count,
                    "snapshots": report.snapshots,
                    "seconds": report.seconds,
                }),
            )
            .await?;
        if report.is_clean() {
            tracing::info!(stage = %cx.stage, "{summary}");
            cx.store.event(Some(&cx.stage), "info", &summary).await?;
            Ok(())
        } else {
            cx.store.event(Some(&cx.stage), "error", &summary).await?;
            Err(Error::data_differs(summary).hint(format!(
                "the full report is in the checkpoint store (artifact `{}`; `pgferry status` summarizes it, `pgferry verify PLAN --report FILE` writes a fresh one); fix the target and run again",
                artifact_name(&cx.stage)
            )))
        }
    }
}
