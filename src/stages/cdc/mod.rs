//! The `cdc` stage (continuous): streams each source database's changes from its replication slot
//! (pgoutput, the plan's publication) and applies them to the target in commit order.
//!
//! - Start: the applied position stored in the target database (`<state schema>.cdc_applied`, see
//!   [`apply`]), else the slot's consistent point recorded by `full_load` (`slot:<db>`).
//!   Transactions whose commit LSN is below the applied position are skipped.
//! - Per table, changes committed at or before the LSN the table was copied at are skipped (the
//!   copy already has them). A partitioned table streamed by its root (`publish_via_partition_root`)
//!   uses the highest LSN of its copied leaves.
//! - Small source transactions are grouped into one target transaction of at most `batch_changes`
//!   changes (default 10000) or `batch_delay` (default 100ms) of waiting; a large source transaction
//!   is applied as it streams, in one target transaction (never buffered in memory).
//! - The applied position (the last applied commit's end LSN) is written in the same target
//!   transaction as the changes: exactly once across crashes. A target transaction is sent whole
//!   without waiting (`BEGIN`, statements, position, `COMMIT`, pipelined); it counts once the
//!   target has answered its `COMMIT` (and every statement before it). Transactions may be
//!   sent behind `COMMIT`s still in flight (at most [`apply::COMMITS_IN_FLIGHT`]): each one's
//!   position update fails unless the one before it is on record, so when one rolls back, every
//!   one behind it rolls back too (see [`apply::Applier::may_commit`]). The apply session
//!   commits with `synchronous_commit = off`, like native's apply worker, and the slot is told
//!   (standby status update) only what the target has *flushed* ([`apply::Applier::flushed`]:
//!   WAL probes, and a synchronous position write at drains, holds, stops and after
//!   [`apply::FLUSH_WAIT`] of waiting), on keepalives, on the 500 ms tick, when a probe moves it
//!   and at least every 10 s: a target crash that loses its last commits loses their positions
//!   too, and the slot still has them.
//! - A batch is committed at a source commit as soon as the target has answered everything sent,
//!   or once it holds as many changes as the target still works on (see [`DbStream::commit_now`]),
//!   and then holds what arrived while the target worked: under a live stream the applied
//!   position moves as the walsender decodes (the first transaction of a stretch of WAL the
//!   source flushed is committed alone), not only at its keepalive after the stretch; in a
//!   backlog the target is always busy and batches grow to what arrives during one commit, up to
//!   `batch_changes`. When nothing is pending, a keepalive's position counts as
//!   applied (nothing before it is still to come), so the slot advances while idle too.
//! - The store's copy of the position, the counters, the lag gauge, the progress sample and the
//!   reading of drain and hold requests are done by a task beside the apply ([`book`]): the apply
//!   loop never waits on the store while it streams.
//! - Ready once the stream has passed the source's WAL position of the moment it started and
//!   nothing is pending. Then it keeps running until cancelled (parked) or drained for a cutover:
//!   when a cutover stage has the checkpoint `drain:<db>` (`{"lsn": ...}`), it applies every
//!   transaction committed before that position (none committed at or after it) and returns (the
//!   stage is done). A rehearsal's cutover (the source still written) takes the target while cdc
//!   is held (`validate_hold`), and cdc reads it again when a hold is released.
//! - Validation can hold the apply at an LSN (`validate_hold:<db>`): cdc applies every
//!   transaction committed before it, commits, answers `validate_held:<db>` and applies nothing
//!   more until `validate_release:<db>` reaches it (at most [`HOLD_MAX`]); the protocol's positions
//!   and both of its sides live in [`crate::stages::hold`]. A validation uses two
//!   holds: (1) hold at the source's current WAL position H0 and wait for `held` >= H0 (cdc is now
//!   paused, having applied only transactions committed before the next step); (2) create the
//!   source snapshot (temporary slot, consistent point L), write hold = L and *then* release = H0:
//!   cdc applies exactly up to L and answers held = L; (3) take the target snapshot, release = L.
//!   Without step (1) cdc could already have applied past L when it reads the request.
//! - The store keeps `cdc_applied:<db>` (position) and counters per database and per
//!   `db.schema.table`: cdcInsertCounter, cdcUpdateCounter, cdcDeleteCounter, totalChangesApplied;
//!   and per database the gauges `cdcOldestUnappliedCommitMs` (the commit time of the oldest source
//!   transaction received and not yet applied, 0 when none: the lag in seconds is its age, see
//!   [`crate::lag`]) and incomingChanges (changes sent to the target and not yet committed there,
//!   sampled every 500 ms). [`sample`] logs the progress every 10 s.

pub mod apply;
mod book;
pub mod changeset;
pub mod ddl;
pub mod identity;
pub mod managed;
mod sample;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::hold::{self, Hold};
use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::pg::connect::ConnInfo;
use crate::pg::lsn::Lsn;
use crate::pg::names::{publication_name, slot_name};
use crate::pg::pgoutput::{PgOutputMessage, pg_time_to_system};
use crate::pg::replication::StreamOptions;
use crate::pg::replication::{ReplicationClient, ReplicationMessage};
use crate::plan::StageKind;
use crate::plan::{Database, StageOptions};
use crate::state::TableState;
use apply::Applier;

/// Awaits an apply step (`$fut`, which may borrow `$st`) while answering the walsender: a
/// statement that waits on the target (a lock, a slow trigger, a large commit) must not leave the
/// walsender without a status update for `wal_sender_timeout`, or it ends the stream.
macro_rules! alive {
    ($self:ident, $repl:ident, $st:ident, $fut:expr) => {{
        let (since, applied) = ($st.last_status, $st.flushed);
        let (result, sent) = keep_alive(
            &mut $repl,
            &$self.route.key,
            $self.status_every,
            since,
            applied,
            $fut,
        )
        .await;
        if let Some(t) = sent {
            $st.last_status = $st.last_status.max(t);
        }
        result
    }};
}

/// Runs `fut` to completion, sending a standby status update with `applied` (what is durably
/// applied; the slot is never told more) every `every` since `since` until it completes. Returns
/// its result and when the last update went, if one did. A wait of more than [`STATUS_EVERY`]
/// is logged every [`STATUS_EVERY`], so a stalled apply says so.
async fn keep_alive<T>(
    repl: &mut ReplicationClient,
    database: &str,
    every: Duration,
    since: Instant,
    applied: Lsn,
    fut: impl std::future::Future<Output = Result<T>>,
) -> (Result<T>, Option<Instant>) {
    tokio::pin!(fut);
    // Most apply steps finish without waiting (statements are buffered): no timer for those, as
    // a timer per stream message costs the runtime a wake-up each.
    if let std::task::Poll::Ready(r) = futures_util::poll!(&mut fut) {
        return (r, None);
    }
    let mut last = since;
    let mut sent = None;
    let started = Instant::now();
    let mut said = started;
    loop {
        let next = tokio::time::Instant::from_std(last + every);
        tokio::select! {
            biased;
            r = &mut fut => return (r, sent),
            _ = tokio::time::sleep_until(next) => {
                if let Err(e) = repl.send_status(applied, applied, applied, false).await {
                    return (Err(e), sent);
                }
                last = Instant::now();
                sent = Some(last);
                if said.elapsed() >= STATUS_EVERY {
                    said = Instant::now();
                    tracing::warn!(
                        database = %database,
                        "cdc: applying on the target has been waiting for {:.0}s (a lock held on the target? see pg_stat_activity for application_name 'pgferry cdc apply'); nothing is lost, the apply goes on once the target answers",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
}

const STATUS_EVERY: Duration = Duration::from_secs(10);
/// The most stream messages taken from the read buffer in a row without looking at the stream
/// loop's other events (see the loop in [`DbStream::stream`]).
const FAST_MESSAGES: usize = 256;
const DRAIN_CHECK_EVERY: Duration = Duration::from_millis(500);
/// The longest cdc stays held for a validation that does not release it (crashed).
pub const HOLD_MAX: Duration = Duration::from_secs(600);

pub struct Cdc {
    env: Arc<Env>,
    index: usize,
}

impl Cdc {
    pub fn new(env: Arc<Env>, index: usize) -> Cdc {
        Cdc { env, index }
    }

    fn options(&self, db: usize) -> (u64, Duration) {
        match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::Cdc(o)) => (u64::from(o.batch_changes().max(1)), o.batch_delay()),
            _ => {
                let o = crate::plan::raw::CdcOptions::default();
                (u64::from(o.batch_changes()), o.batch_delay())
            }
        }
    }
}

/// Which way a stream goes and what it is called: the forward cdc (source to target, this stage)
/// or the fallback stream the cutover arms (target to the old source, [`super::fallback`]). The
/// engine is the same; only the endpoints, the slot, the publication and the names of its records
/// differ.
#[derive(Clone)]
pub struct Route {
    /// Where the changes come from (a replication session), and where they are applied.
    pub from: ConnInfo,
    pub to: ConnInfo,
    pub slot: String,
    pub publication: String,
    /// The database's name in the store's positions, counters, samples and events: `db.name`
    /// forward, `fallback:<db>` (see [`super::fallback::store_key`]) backward.
    pub key: String,
    /// The stages whose checkpoint `drain:<db>` ends the stream (the cutover stages forward, the
    /// fallback stage backward).
    pub drain_stages: Vec<String>,
    /// Forward only: changes of a table up to the LSN its copy was taken at are skipped.
    pub forward: bool,
    /// The replication origin the apply session tags its transactions with, if any: the forward
    /// apply of a plan with a fallback stage (a stream from a 16+ target leaves them out).
    pub apply_origin: Option<String>,
}

impl Route {
    /// The forward route of `db`: the plan's slot and publication on the source, applied to the
    /// target.
    pub fn forward(env: &Env, db: &Database) -> Route {
        let plan = &env.plan;
        let has_fallback = plan.stages.iter().any(|s| s.kind == StageKind::Fallback);
        Route {
            from: env.source_for(db),
            to: env.target_for(db),
            slot: slot_name(&plan.name, &db.name),
            publication: publication_name(&plan.name),
            key: db.name.clone(),
            drain_stages: plan
                .stages
                .iter()
                .filter(|s| s.kind == StageKind::Cutover)
                .map(|s| s.id.clone())
                .collect(),
            forward: true,
            apply_origin: has_fallback.then(|| super::fallback::origin_name(&plan.name, &db.name)),
        }
    }
}

/// The checkpoint key (of the cutover stage) that asks cdc to drain `db` up to an LSN and stop:
/// `{"lsn": "..."}`. A checkpoint, not a position, so that `--rerun` of the cutover forgets it.
pub fn drain_key(db: &str) -> String {
    format!("drain:{db}")
}

/// The drain target a cutover recorded in its [`drain_key`] checkpoint (`{"lsn": "X/Y", ...}`).
pub fn drain_lsn(checkpoint: Option<&serde_json::Value>) -> Result<Option<Lsn>> {
    match checkpoint.and_then(|v| v.get("lsn")) {
        None => Ok(None),
        Some(l) => serde_json::from_value(l.clone())
            .map(Some)
            .map_err(|e| Error::permanent(format!("the recorded drain target: {e}"))),
    }
}

/// The store position of what cdc has applied for `db` (a copy of the target's own record).
/// The store position up to which cdc applies change by change (a grouped statement failed there).
pub fn strict_position(db: &str) -> String {
    format!("cdc_strict:{db}")
}

pub fn applied_position(db: &str) -> String {
    format!("cdc_applied:{db}")
}

#[async_trait]
impl Stage for Cdc {
    fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, db) in self.env.plan.databases.iter().enumerate() {
            let (n, d) = self.options(i);
            out.push(format!(
                "stream the changes of {} from slot {} (publication {}) and apply them to {} in commit order, up to {n} changes or {} per target transaction; {}; keep running until the cutover",
                db.name,
                slot_name(&self.env.plan.name, &db.name),
                publication_name(&self.env.plan.name),
                db.target,
                humantime::format_duration(d),
                if ddl::replicates(&self.env.plan, i) {
                    "replay the source's DDL in place (ddl = \"replicate\")"
                } else {
                    "stop when a table's columns change (ddl = \"stop\")"
                }
            ));
        }
        out
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        let ready = Arc::new(AtomicUsize::new(0));
        let total = self.env.plan.databases.len();
        let futures = self.env.plan.databases.iter().enumerate().map(|(i, db)| {
            let ready = ready.clone();
            let (n, d) = self.options(i);
            async move {
                let mut stream =
                    DbStream::new(&self.env, cx, db, Route::forward(&self.env, db), n, d);
                stream
                    .run(|| {
                        if ready.fetch_add(1, Ordering::SeqCst) + 1 == total {
                            cx.mark_ready();
                        }
                    })
                    .await
                    .map_err(|e| e.context(format!("database `{}`", db.name)))
            }
        });
        futures_util::future::try_join_all(futures).await?;
        Ok(())
    }
}

use book::Counts;

pub(crate) struct DbStream<'a> {
    env: &'a Env,
    cx: &'a StageContext,
    db: &'a Database,
    route: Route,
    batch_changes: u64,
    batch_delay: Duration,
    /// How often the source hears from us at least: a quarter of its `wal_sender_timeout`, at
    /// most [`STATUS_EVERY`].
    status_every: Duration,
    /// What the apply hands to the bookkeeping task (see [`book`]): the lag gauge's oldest
    /// unapplied commit, the counts, the answered position, and the requests read for it.
    book: Arc<book::Book>,
}

/// Parses a `SHOW wal_sender_timeout` value (`60s`, `1min`, `500ms`, `0` = disabled).
fn parse_pg_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    let ms = match unit.trim() {
        "" | "ms" => n,
        "s" => n * 1000,
        "min" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Where the apply loop is.
struct Loop {
    /// The position of the last target commit sent (its answer may still be due).
    applied: Lsn,
    /// The position of the last target commit answered: what the store is told, and what counts
    /// for `ready` (the changes are visible on the target).
    answered: Lsn,
    /// The position of the last target commit flushed on the target ([`Applier::flushed`]): the
    /// only one the slot is told, so that a target crash that loses asynchronous commits never
    /// leaves the slot past them.
    flushed: Lsn,
    /// In a source transaction (between Begin and Commit).
    in_source_tx: bool,
    skip_tx: bool,
    commit_lsn: Lsn,
    /// A target transaction holds applied changes not yet committed.
    batch_open: bool,
    batch_count: u64,
    batch_deadline: Instant,
    batch_end: Lsn,
    batch_commit_time: i64,
    counts: Counts,
    /// The counts of committed batches whose commit is not answered yet, with its position.
    uncounted: std::collections::VecDeque<(Lsn, Counts)>,
    last_status: Instant,
    /// The applied position the source was last told in a status update from the keepalive path.
    reported: Lsn,
    /// The answered position at which a keepalive was last asked for (see the end of the loop).
    asked: Lsn,
    /// When a keepalive last moved the applied position with nothing pending.
    idle_at: Instant,
    ready: bool,
    /// Transactions committed at or before this LSN are applied change by change.
    strict_until: Option<Lsn>,
    /// DDL is replayed (`ddl = "replicate"`, see [`ddl`]).
    replicate_ddl: bool,
    /// The client query string whose DDL was last handled in this source transaction.
    ddl_key: Option<String>,
    /// The source transaction holds DDL: its target transaction ends at its commit.
    ddl_in_tx: bool,
    /// Statements to run once the target transaction commits, and the DDL it holds (for the store).
    deferred: Vec<ddl::Deferred>,
    ddl_log: Vec<serde_json::Value>,
}

impl<'a> DbStream<'a> {
    pub(crate) fn new(
        env: &'a Env,
        cx: &'a StageContext,
        db: &'a Database,
        route: Route,
        batch_changes: u64,
        batch_delay: Duration,
    ) -> DbStream<'a> {
        DbStream {
            env,
            cx,
            db,
            route,
            batch_changes,
            batch_delay,
            status_every: STATUS_EVERY,
            book: Arc::new(book::Book::new()),
        }
    }

    /// Whether this database's DDL is replayed (`ddl = "replicate"` on this stage).
    fn replicates_ddl(&self) -> bool {
        let i = self
            .env
            .plan
            .databases
            .iter()
            .position(|d| d.name == self.db.name);
        let stage = self.env.plan.stages.iter().find(|s| s.id == self.cx.stage);
        matches!((i, stage), (Some(i), Some(s)) if matches!(s.options.get(i), Some(StageOptions::Cdc(o)) if o.replicates_ddl()))
    }

    /// The LSN each table was copied at, from the full_load stage's records.
    async fn copied_lsns(&self) -> Result<HashMap<String, Lsn>> {
        let mut out: HashMap<String, Lsn> = HashMap::new();
        if !self.route.forward {
            return Ok(out);
        }
        for s in self
            .env
            .plan
            .stages
            .iter()
            .filter(|s| s.kind == StageKind::FullLoad)
        {
            for t in self.cx.store.tables(Some(&s.id)).await? {
                if t.database != self.db.name || t.state != TableState::Copied {
                    continue;
                }
                let Some(lsn) = t.lsn else {
                    continue;
                };
                // `schema.table#range` rows belong to their table.
                let name = t.table.split('#').next().unwrap_or(&t.table).to_string();
                let e = out.entry(name).or_insert(lsn);
                *e = (*e).max(lsn);
            }
        }
        Ok(out)
    }

    /// Streams and applies until drained (or an error). When a grouped statement fails, the
    /// target transaction is rolled back; the stretch up to the highest commit LSN it held is
    /// recorded (`cdc_strict:<db>`, so a crash keeps it too) and streamed again, applied change by
    /// change in source order.
    pub(crate) async fn run(&mut self, mut on_ready: impl FnMut()) -> Result<()> {
        let mut ready_sent = false;
        let mut once = || {
            if !ready_sent {
                ready_sent = true;
                on_ready();
            }
        };
        loop {
            match self.stream(&mut once).await? {
                None => return Ok(()),
                Some((until, cause)) => {
                    let msg = format!(
                        "database {}: a grouped apply failed ({}); applying again, change by change in source order, up to {until}",
                        self.route.key, cause.message
                    );
                    tracing::warn!("{msg}");
                    self.cx
                        .store
                        .advance_position(&strict_position(&self.route.key), until)
                        .await?;
                    self.cx
                        .store
                        .event(Some(&self.cx.stage), "warn", &msg)
                        .await?;
                }
            }
        }
    }

    /// Records the managed apply mode in the store: counters for `status` and `report`, and an
    /// event the first time the objects are held.
    async fn record_held(&self, held: managed::Held) -> Result<()> {
        let db = &self.db.name;
        self.cx
            .store
            .set_counters(&[
                (db.clone(), "managedApply".into(), 1),
                (
                    db.clone(),
                    "heldTriggers".into(),
                    held.triggers + held.rules,
                ),
                (db.clone(), "heldForeignKeys".into(), held.foreign_keys),
            ])
            .await?;
        if held.new > 0 {
            let msg = format!(
                "the target role may not set session_replication_role: cdc applies to {} in managed mode, with {} user trigger(s), {} rule(s) disabled and {} foreign key(s) dropped until the cutover puts them back (recorded in {})",
                self.db.target,
                held.triggers,
                held.rules,
                held.foreign_keys,
                managed::record_table(&self.env.plan.state.schema)
            );
            tracing::warn!(database = %db, "{msg}");
            self.cx
                .store
                .event(Some(&self.cx.stage), "warn", &msg)
                .await?;
        }
        Ok(())
    }

    /// One streaming session: `None` when drained, `Some((lsn, error))` when a grouped statement
    /// failed and the stream must be applied again change by change up to `lsn`.
    async fn stream(&mut self, on_ready: &mut impl FnMut()) -> Result<Option<(Lsn, Error)>> {
        let plan = &self.env.plan;
        let slot = self.route.slot.clone();
        let publication = self.route.publication.clone();
        let copied = self.copied_lsns().await?;
        // The managed mode (no session_replication_role) holds the target's triggers and foreign
        // keys until the cutover puts them back: forward only (nothing puts them back on the
        // source after a fallback stream).
        // The target's apply session and the source's replication connection are opened
        // together: each costs a few round trips of authentication, and neither needs the other.
        let (opened, repl) = tokio::join!(
            Applier::open(
                &self.route.to,
                &plan.state.schema,
                &slot,
                copied,
                self.route.forward,
            ),
            ReplicationClient::connect(
                &self.route.from,
                if self.route.forward {
                    "cdc"
                } else {
                    "fallback"
                }
            ),
        );
        let (mut ap, applied) = opened?;
        let mut repl = repl?;
        if let Some(held) = ap.held {
            self.record_held(held).await?;
        }
        if let Some(origin) = &self.route.apply_origin
            && let Err(e) = ap.use_origin(origin).await
        {
            // The fallback stream leaves out the forward apply's writes by position anyway (its
            // slot is created after the drain): the origin is a second guard, not a requirement.
            tracing::warn!(database = %self.route.key, error = %e, "cdc: the apply runs without replication origin {origin}; the fallback stream filters by position only");
        }
        // DDL is replayed forward only (the capture is on the source).
        let replicate_ddl = self.route.forward && self.replicates_ddl();
        if replicate_ddl {
            self.deferred_left(&mut ap).await?;
        }
        let start = match applied {
            Some(l) => l,
            None => match self
                .cx
                .store
                .position(&format!("slot:{}", self.route.key))
                .await?
            {
                Some(p) => p,
                None => {
                    return Err(Error::permanent(format!(
                        "no start position for database `{}`: neither an applied position on the target nor the slot's consistent point",
                        self.route.key
                    ))
                    .hint("run the full_load stage (with this plan, which has a cdc stage) first: it creates the slot"));
                }
            },
        };
        let strict_until: Option<Lsn> = self
            .cx
            .store
            .position(&strict_position(&self.route.key))
            .await?;
        // The position on record is applied (the target's, or the slot's consistent point that
        // the copy covers): the lag samples and the store count from it before the first commit
        // of this session is answered (the first sample read the source's whole WAL as lag).
        self.book.answered(start);
        let bookkeeper = book::Bookkeeper::start(
            self.book.clone(),
            self.cx.store.clone(),
            self.route.clone(),
            self.db.name.clone(),
            sample::Sampler::new(self.route.from.clone(), &self.cx.stage, &self.route.key),
        );
        let result: Result<()> = async {
            // A walsender that hears nothing for wal_sender_timeout ends the stream: answer well
            // within it, also while a long apply keeps the loop busy.
            if let Ok(rows) = repl.simple_query("SHOW wal_sender_timeout").await
                && let Some(t) = rows
                    .first()
                    .and_then(|r| r.get("wal_sender_timeout"))
                    .and_then(parse_pg_duration)
                && !t.is_zero()
            {
                self.status_every = (t / 4).clamp(Duration::from_millis(500), STATUS_EVERY);
            }
            // Caught up once past every commit made before the stream starts: the WAL *insert*
            // position (on a standby, what it has replayed). Not IDENTIFY_SYSTEM's flush position,
            // which trails commits made with `synchronous_commit = off` by up to the WAL writer's
            // delay: cdc reported ready (and a run ended) before applying them.
            let sys = repl
                .simple_query(
                    "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                            ELSE pg_catalog.pg_current_wal_insert_lsn() END::text AS at",
                )
                .await?;
            let ready_at: Lsn = sys
                .first()
                .and_then(|r| r.get("at"))
                .ok_or_else(|| Error::permanent("the source returned no WAL position"))?
                .parse()?;
            let mut options = StreamOptions::new(&publication);
            // Backward, on a 16+ target: nothing written under a replication origin (the forward
            // apply's) is sent back.
            options.origin_none = !self.route.forward
                && repl
                    .server_version()
                    .is_some_and(crate::pg::version::ServerVersion::pgoutput_origin_filter);
            options.messages = replicate_ddl;
            repl.start_replication_with(&slot, start, &options)
                .await
                .map_err(|e| explain_missing(e.context(format!("streaming from slot {slot}"))))?;
            tracing::info!(database = %self.route.key, slot = %slot, from = %start, "cdc streaming");
            self.cx
                .store
                .event(
                    Some(&self.cx.stage),
                    "info",
                    &format!(
                        "database {}: streaming from {start}, ready once past {ready_at}",
                        self.route.key
                    ),
                )
                .await?;
            // Everything before the start is on the target already (the load's snapshot, or an
            // earlier stream): the lag in bytes counts from here until the first commit.
            if start != Lsn::INVALID {
                self.cx
                    .store
                    .advance_position(&applied_position(&self.route.key), start)
                    .await?;
            }

            let mut st = Loop {
                applied: start,
                answered: start,
                flushed: start,
                in_source_tx: false,
                skip_tx: false,
                commit_lsn: Lsn::INVALID,
                batch_open: false,
                batch_count: 0,
                batch_deadline: Instant::now(),
                batch_end: start,
                batch_commit_time: 0,
                counts: HashMap::new(),
                uncounted: std::collections::VecDeque::new(),
                last_status: Instant::now(),
                reported: start,
                asked: start,
                idle_at: Instant::now(),
                ready: false,
                strict_until,
                replicate_ddl,
                ddl_key: None,
                ddl_in_tx: false,
                deferred: Vec::new(),
                ddl_log: Vec::new(),
            };
            // The requests at the start, read here: nothing is applied before they are known.
            let mut fresh_from = self.book.next_read();
            let mut drain: Option<Lsn> = self.drain_target().await?;
            let mut hold: Option<Lsn> = self.pending_hold().await?;
            if let Some(target) = drain {
                tracing::info!(database = %self.route.key, to = %target, "cdc draining for the cutover");
            }
            if let Some(at) = hold {
                tracing::info!(database = %self.route.key, at = %at, "cdc asked to hold for validation");
            }
            let mut last_drain_check = Instant::now() - DRAIN_CHECK_EVERY;
            let sleep = tokio::time::sleep(DRAIN_CHECK_EVERY);
            tokio::pin!(sleep);
            let mut fast_run = 0usize;
            loop {
                if last_drain_check.elapsed() >= DRAIN_CHECK_EVERY {
                    last_drain_check = Instant::now();
                    if let Some(e) = self.book.take_failure() {
                        return Err(e);
                    }
                    // The requests as the bookkeeping last read them, once it has read after the
                    // loop's own read (a hold served since may still show in an older one).
                    if self.book.read_done(fresh_from) {
                        if let Some(target) = self.book.drain() {
                            if drain != Some(target) {
                                tracing::info!(database = %self.route.key, to = %target, "cdc draining for the cutover");
                            }
                            drain = Some(target);
                        }
                        let was = hold;
                        hold = self.book.hold();
                        if hold.is_some() && hold != was {
                            tracing::info!(database = %self.route.key, at = %hold.unwrap_or_default(), "cdc asked to hold for validation");
                            ask_keepalive(&mut repl, &mut st).await?;
                        }
                    }
                    if drain.is_some() {
                        // Ask for a keepalive: it lets an idle stream reach the target.
                        ask_keepalive(&mut repl, &mut st).await?;
                    }
                    self.book.set_draining(drain.is_some());
                    self.book.set_incoming(if st.batch_open || st.in_source_tx {
                        st.batch_count as i64
                    } else {
                        0
                    });
                }
                if let Some(target) = drain
                    && !st.in_source_tx
                    && !st.batch_open
                    && st.applied >= target
                {
                    alive!(self, repl, st, self.settle(&mut ap, &mut st))?;
                    // The cutover hands the target over: what was applied is flushed there first.
                    alive!(self, repl, st, self.make_durable(&mut ap, &mut st))?;
                    repl.send_status(st.flushed, st.flushed, st.flushed, false)
                        .await?;
                    self.store_position(&st).await?;
                    self.cx
                        .store
                        .event(
                            Some(&self.cx.stage),
                            "info",
                            &format!(
                                "database {}: drained to {} (cutover target {target})",
                                self.route.key, st.applied
                            ),
                        )
                        .await?;
                    let _ = repl.stop_replication().await;
                    repl.close().await;
                    return Ok(());
                }
                let tick = if st.batch_open && !st.in_source_tx {
                    st.batch_deadline
                } else {
                    Instant::now() + DRAIN_CHECK_EVERY
                };
                // A large source transaction streams without a pause: the status update must not wait
                // for one, or the walsender hears nothing for wal_sender_timeout and ends the stream.
                let tick = tokio::time::Instant::from_std(tick.min(st.last_status + self.status_every));
                // One timer for the whole loop, moved only when the deadline changes: a new timer
                // per message costs the runtime a wake-up (a syscall) per message.
                if sleep.deadline() != tick {
                    sleep.as_mut().reset(tick);
                }
                // Inside a source transaction, a message already read waits in the buffer: take
                // it without polling the other branches (each poll registers a waiter, and a
                // backlog is ~6 messages per small transaction), at most FAST_MESSAGES in a row so
                // a request, a cancel or the tick is still looked at within a long transaction.
                // The target's answers are not read inside a source transaction anyway.
                let fast = st.in_source_tx && fast_run < FAST_MESSAGES && repl.has_buffered_message();
                fast_run = if fast { fast_run + 1 } else { 0 };
                tokio::select! {
                    biased;
                    _ = self.book.changed.notified(), if !fast => {
                        // A request changed (or the bookkeeping failed): look at once.
                        last_drain_check = Instant::now() - DRAIN_CHECK_EVERY;
                    }
                    _ = self.cx.cancel.cancelled(), if !fast => {
                        if st.batch_open && !st.in_source_tx {
                            alive!(self, repl, st, self.flush(&mut ap, &mut st))?;
                        }
                        alive!(self, repl, st, self.settle(&mut ap, &mut st))?;
                        alive!(self, repl, st, self.make_durable(&mut ap, &mut st))?;
                        repl.send_status(st.flushed, st.flushed, st.flushed, false).await?;
                        self.store_position(&st).await?;
                        // An unfinished source transaction is rolled back with the session.
                        return Err(Error::interrupted());
                    }
                    _ = &mut sleep, if !fast => {
                        if st.batch_open && !st.in_source_tx && Instant::now() >= st.batch_deadline {
                            alive!(self, repl, st, self.flush(&mut ap, &mut st))?;
                            report_flushed(&mut repl, &mut st).await?;
                            let at = st.applied;
                            self.mark_ready(&mut st, at, ready_at, on_ready);
                        }
                        // A commit sent at the last keepalive has been answered by now: the slot
                        // follows it also when the source has gone quiet, once the target has
                        // flushed it (a probe asks; after FLUSH_WAIT the apply flushes itself).
                        self.confirm(&mut ap, &mut st)?;
                        self.flush_or_probe(&mut ap, &mut repl, &mut st).await?;
                        if !st.batch_open && !st.in_source_tx {
                            let at = st.applied;
                            self.mark_ready(&mut st, at, ready_at, on_ready);
                        }
                        if st.flushed > st.reported || st.last_status.elapsed() >= self.status_every {
                            report_flushed(&mut repl, &mut st).await?;
                        }
                    }
                    r = ap.next_answer(), if !st.in_source_tx && !ap.idle() => {
                        r?;
                        self.confirm(&mut ap, &mut st)?;
                        if st.batch_open && Self::commit_now(&ap, &st) {
                            alive!(self, repl, st, self.flush(&mut ap, &mut st))?;
                        }
                        if !st.batch_open {
                            let at = st.applied;
                            self.mark_ready(&mut st, at, ready_at, on_ready);
                        }
                        // A probe's answer moved what the target has flushed: the slot follows.
                        if st.flushed > st.reported {
                            report_flushed(&mut repl, &mut st).await?;
                        }
                    }
                    m = repl.next_message() => {
                        match m.map_err(explain_missing)? {
                            ReplicationMessage::Keepalive(k) => {
                                // The walsender has sent everything: commit what is batched now
                                // (the lowest lag). Under a live stream that is about once per
                                // source transaction, so a commit carries no bookkeeping of its
                                // own: counters and the store's copy of the position are written
                                // at most every second and every 100 ms.
                                // The commit is pipelined (its answer comes with a later poll): the
                                // next position is recorded by the next commit, not here.
                                // While the target still works on more than the batch holds, the
                                // batch grows and is committed at a later answer (see the branch
                                // above) or behind the commits in flight once large enough.
                                let flushed = !st.in_source_tx && st.batch_open && {
                                    self.confirm(&mut ap, &mut st)?;
                                    Self::commit_now(&ap, &st)
                                };
                                if flushed {
                                    alive!(self, repl, st, self.flush(&mut ap, &mut st))?;
                                }
                                if !st.in_source_tx && !st.batch_open {
                                    // Everything committed before the hold has been sent.
                                    if self.holds_before(&mut ap, &mut repl, &mut st, &mut hold, &mut drain, k.wal_end).await? {
                                        fresh_from = self.book.next_read();
                                    }
                                    // Nothing pending: everything up to the server's position is
                                    // applied. Recorded at most every 100 ms under a live stream
                                    // (a keepalive follows nearly every transaction), at once while
                                    // a cutover drains or before cdc is ready.
                                    // Not while a commit just sent is pending: it moves the
                                    // position anyway.
                                    self.confirm(&mut ap, &mut st)?;
                                    if k.wal_end > st.applied
                                        && (drain.is_some()
                                            || !st.ready
                                            || (!flushed && ap.idle() && st.idle_at.elapsed() >= book::POSITION_EVERY))
                                    {
                                        if drain.is_none() && st.ready && ap.idle() {
                                            // Answered later, like a commit: the loop reads on.
                                            ap.advance_idle_pipelined(k.wal_end)?;
                                        } else {
                                            alive!(self, repl, st, ap.advance_idle(k.wal_end))?;
                                        }
                                        st.applied = k.wal_end;
                                        self.confirmed(&ap, &mut st);
                                        st.idle_at = Instant::now();
                                        if drain.is_some() {
                                            self.store_position(&st).await?;
                                        }
                                        // Caught up with nothing to apply: no lag.
                                        self.book.oldest_unapplied_ms.store(0, Ordering::Relaxed);
                                    }
                                    self.mark_ready(&mut st, k.wal_end, ready_at, on_ready);
                                }
                                // The slot follows the apply: a position applied since the last
                                // report goes to the source now, so it retains no more WAL than
                                // needed, also once the source is idle. Flushed positions only:
                                // asked for here too, as keepalives may come faster than the
                                // tick (a stopping walsender asks for a reply after each one and
                                // waits until the slot is told everything it sent).
                                self.confirm(&mut ap, &mut st)?;
                                self.flush_or_probe(&mut ap, &mut repl, &mut st).await?;
                                if k.reply_requested || st.flushed > st.reported || st.last_status.elapsed() >= self.status_every {
                                    report_flushed(&mut repl, &mut st).await?;
                                }
                            }
                            ReplicationMessage::XLogData(x) => {
                                if let PgOutputMessage::Begin(b) = &x.data {
                                    if self.holds_before(&mut ap, &mut repl, &mut st, &mut hold, &mut drain, b.final_lsn).await? {
                                        fresh_from = self.book.next_read();
                                    }
                                    // Drained: everything committed before the target is applied. In a
                                    // rehearsal the source keeps writing: stop before what came later.
                                    if let Some(target) = drain && b.final_lsn >= target {
                                        self.stop_at(&mut ap, &mut st, target).await?;
                                        continue;
                                    }
                                }
                                let x_commit = matches!(x.data, PgOutputMessage::Commit(_));
                                alive!(self, repl, st, self.handle(&mut ap, &mut st, x.data))?;
                                if !st.in_source_tx && st.batch_open
                                    && (st.batch_count >= self.batch_changes || Instant::now() >= st.batch_deadline)
                                {
                                    alive!(self, repl, st, self.flush(&mut ap, &mut st))?;
                                    report_flushed(&mut repl, &mut st).await?;
                                } else if !st.in_source_tx && st.batch_open && x_commit {
                                    self.confirm(&mut ap, &mut st)?;
                                    if Self::commit_now(&ap, &st) {
                                        alive!(self, repl, st, self.flush(&mut ap, &mut st))?;
                                    }
                                }
                                // Under a steady stream the batch may be open at every keepalive:
                                // caught up is also when a commit past the start is applied.
                                if !st.batch_open {
                                    let at = st.applied;
                                    self.mark_ready(&mut st, at, ready_at, on_ready);
                                }
                            }
                        }
                    }
                }
                // Everything received is applied and answered, and the run waits for a position
                // only a keepalive can carry (ready, or a cutover's drain target past the last
                // commit): ask the walsender for one now rather than at its next own one, which
                // comes only after our next status update (0.2-0.5 s later at the end of a drain).
                if (!st.ready || drain.is_some())
                    && !st.in_source_tx
                    && !st.batch_open
                    && ap.idle()
                    && st.asked < st.answered
                {
                    st.asked = st.answered;
                    ask_keepalive(&mut repl, &mut st).await?;
                }
            }
        }
        .await;
        // What was applied is counted, whatever ended the stream (best effort on a failure: the
        // stage's own error is the one to report).
        bookkeeper
            .finish(&self.book, self.cx.store.as_ref(), &self.route.key)
            .await;
        match result {
            Ok(()) => Ok(None),
            Err(e) if e.kind != crate::error::ErrorKind::Interrupted => {
                match ap.grouped_failure() {
                    Some(until) => Ok(Some((until, e))),
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Holds for every validation hold at or before `pos` (see [`DbStream::hold`]). After a hold
    /// the drain target is read again: a rehearsal's cutover sets it while cdc holds. Whether it
    /// held (and so read the requests itself).
    #[allow(clippy::too_many_arguments)]
    async fn holds_before(
        &self,
        ap: &mut Applier,
        repl: &mut ReplicationClient,
        st: &mut Loop,
        hold: &mut Option<Lsn>,
        drain: &mut Option<Lsn>,
        pos: Lsn,
    ) -> Result<bool> {
        let mut held = false;
        while let Some(at) = *hold
            && pos >= at
        {
            *hold = self.hold(ap, repl, st, at).await?;
            held = true;
        }
        if held {
            *drain = self.drain_target().await?.or(*drain);
        }
        Ok(held)
    }

    /// Ends the apply at a drain target, before a transaction committed at or after it: what is
    /// batched is committed and the applied position moves to the target.
    async fn stop_at(&self, ap: &mut Applier, st: &mut Loop, target: Lsn) -> Result<()> {
        if st.batch_open {
            self.flush(ap, st).await?;
        }
        self.settle(ap, st).await?;
        if target > st.applied {
            ap.advance_idle(target).await?;
            st.applied = target;
            self.confirmed(ap, st);
            self.store_position(st).await?;
        }
        Ok(())
    }

    /// The LSN a running cutover asked this database to drain to.
    async fn drain_target(&self) -> Result<Option<Lsn>> {
        book::read_drain(self.cx.store.as_ref(), &self.route, &self.db.name).await
    }

    /// The hold validation (or a rehearsal's cutover) asked for and has not released yet.
    async fn pending_hold(&self) -> Result<Option<Lsn>> {
        Hold::new(self.cx.store.as_ref(), &self.route.key)
            .pending()
            .await
    }

    /// Stops applying at `at` (no transaction in flight, everything committed before `at` applied)
    /// until validation has taken its target snapshot and releases the hold, at most [`HOLD_MAX`].
    async fn hold(
        &self,
        ap: &mut Applier,
        repl: &mut ReplicationClient,
        st: &mut Loop,
        at: Lsn,
    ) -> Result<Option<Lsn>> {
        if st.batch_open {
            self.flush(ap, st).await?;
        }
        // The target snapshot validation takes next must hold every commit sent.
        self.settle(ap, st).await?;
        self.make_durable(ap, st).await?;
        repl.send_status(st.flushed, st.flushed, st.flushed, false)
            .await?;
        st.last_status = Instant::now();
        let store = &self.cx.store;
        let db = &self.route.key;
        Hold::new(store.as_ref(), db).answer(at).await?;
        tracing::info!(database = %db, at = %at, applied = %st.applied, "cdc holding for validation");
        let since = Instant::now();
        loop {
            let pending = self.pending_hold().await?;
            if pending != Some(at) {
                tracing::info!(database = %db, at = %at, held_for = ?since.elapsed(), "cdc hold released");
                // A hold further on (the second step of a validation) applies from here.
                return Ok(pending);
            }
            if since.elapsed() >= HOLD_MAX {
                let msg = format!(
                    "database {db}: validation held the apply at {at} for {} without releasing it; applying again",
                    humantime::format_duration(HOLD_MAX)
                );
                tracing::warn!("{msg}");
                store.event(Some(&self.cx.stage), "warn", &msg).await?;
                return Ok(None);
            }
            if st.last_status.elapsed() >= self.status_every {
                repl.send_status(st.flushed, st.flushed, st.flushed, false)
                    .await?;
                st.last_status = Instant::now();
            }
            tokio::select! {
                _ = self.cx.cancel.cancelled() => return Err(Error::interrupted()),
                _ = tokio::time::sleep(hold::POLL) => {}
            }
        }
    }

    async fn handle(&self, ap: &mut Applier, st: &mut Loop, msg: PgOutputMessage) -> Result<()> {
        match msg {
            PgOutputMessage::Begin(b) => {
                st.in_source_tx = true;
                st.ddl_key = None;
                st.ddl_in_tx = false;
                st.commit_lsn = b.final_lsn;
                st.skip_tx = b.final_lsn < st.applied;
                if !st.skip_tx {
                    let strict = st.strict_until.is_some_and(|u| b.final_lsn <= u);
                    ap.begin_source_tx(b.final_lsn, strict).await?;
                }
                if !st.skip_tx && self.book.oldest_unapplied_ms.load(Ordering::Relaxed) == 0 {
                    let at = pg_time_to_system(b.commit_time)
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(1)
                        .max(1);
                    self.book.oldest_unapplied_ms.store(at, Ordering::Relaxed);
                }
                if !st.skip_tx && !st.batch_open {
                    st.batch_open = true;
                    st.batch_count = 0;
                    st.batch_deadline = Instant::now() + self.batch_delay;
                }
            }
            PgOutputMessage::Commit(c) => {
                st.in_source_tx = false;
                if !st.skip_tx {
                    st.batch_end = c.end_lsn;
                    st.batch_commit_time = c.commit_time;
                    if st.ddl_in_tx {
                        // Later changes see the committed schema (see [`ddl`]).
                        st.batch_deadline = Instant::now();
                    }
                }
            }
            PgOutputMessage::Relation(r) => ap.relation(&r).await?,
            PgOutputMessage::Insert(m) => {
                if self.applies(ap, st, m.relation)? {
                    ap.insert(m.relation, &m.new, st.commit_lsn).await?;
                    self.count(ap, st, m.relation, 0)?;
                }
            }
            PgOutputMessage::Update(m) => {
                if self.applies(ap, st, m.relation)? {
                    ap.update(m.relation, m.old.as_ref(), &m.new, st.commit_lsn)
                        .await?;
                    self.count(ap, st, m.relation, 1)?;
                }
            }
            PgOutputMessage::Delete(m) => {
                if self.applies(ap, st, m.relation)? {
                    ap.delete(m.relation, &m.old, st.commit_lsn).await?;
                    self.count(ap, st, m.relation, 2)?;
                }
            }
            PgOutputMessage::Truncate(t) => {
                let mut oids = Vec::new();
                for oid in &t.relations {
                    if self.applies(ap, st, *oid)? {
                        oids.push(*oid);
                    }
                }
                if !oids.is_empty() {
                    ap.truncate(&oids, t.options.cascade(), t.options.restart_identity())
                        .await
                        .map_err(|e| self.at(e, st))?;
                    st.batch_count += 1;
                }
            }
            PgOutputMessage::Message(m) => self.message(ap, st, m).await?,
            PgOutputMessage::Origin(_) | PgOutputMessage::Type(_) => {}
            other => {
                return Err(Error::permanent(format!(
                    "unexpected `{}` message in the replication stream",
                    other.kind()
                )));
            }
        }
        Ok(())
    }

    /// Whether a change to `oid` in the current transaction is to be applied.
    fn applies(&self, ap: &Applier, st: &Loop, oid: u32) -> Result<bool> {
        if st.skip_tx {
            return Ok(false);
        }
        let rel = ap.rel(oid)?;
        Ok(rel.copied_lsn.is_none_or(|l| st.commit_lsn > l))
    }

    fn count(&self, ap: &Applier, st: &mut Loop, oid: u32, what: usize) -> Result<()> {
        let name = &ap.rel(oid)?.name;
        match st.counts.get_mut(name) {
            Some(c) => c[what] += 1,
            None => {
                let mut c = [0; 3];
                c[what] = 1;
                st.counts.insert(name.clone(), c);
            }
        }
        st.batch_count += 1;
        Ok(())
    }

    fn at(&self, e: Error, st: &Loop) -> Error {
        e.context(format!("source transaction committed at {}", st.commit_lsn))
    }

    /// Commits the open batch with its position, then records counters and the position in the
    /// store.
    async fn flush(&self, ap: &mut Applier, st: &mut Loop) -> Result<()> {
        // The lag gauge, the counts and the store's copy of the position go with the bookkeeping
        // (see [`book`]), which writes them also while this commit is blocked on the target.
        let commits = st.batch_end.max(st.applied);
        if st.batch_end > st.applied || ap.in_tx() {
            ap.commit(commits).await?;
        }
        // Replayed DDL: what runs after the commit (and the record of it) waits for its answer.
        if st.ddl_in_tx || !st.deferred.is_empty() || !st.ddl_log.is_empty() {
            self.settle(ap, st).await?;
        }
        self.after_commit(ap, st).await?;
        st.applied = st.applied.max(st.batch_end);
        st.batch_open = false;
        st.batch_count = 0;
        // Counted once its commit is answered: a batch that fails is applied (and counted) again.
        st.uncounted
            .push_back((commits, std::mem::take(&mut st.counts)));
        // Everything received applied and answered: the lag in seconds is 0 (else once answered).
        self.confirmed(ap, st);
        Ok(())
    }

    /// Whether to commit the open batch now, at a source commit, instead of at the next keepalive:
    /// when the target has answered everything sent (it would otherwise sit idle), or when the
    /// batch is as large as what the target still works on (it follows the commits in flight
    /// without a round trip between them, see [`Applier::may_commit`]). Under a live stream this
    /// commits as the walsender decodes, like native's apply worker; while the target
    /// works, the next batch gathers what arrives, so in a backlog batches grow by themselves.
    /// (Waiting also for the stream to pause, as before, left the first transactions of each
    /// stretch the source flushed waiting for its last: 18 kB behind native on average at 800
    /// tx/s against 14 kB, and no faster in the drains.)
    fn commit_now(ap: &Applier, st: &Loop) -> bool {
        ap.may_commit(st.batch_count as usize)
    }

    /// Takes the answers of the target that are in (pipelined commits) without waiting.
    fn confirm(&self, ap: &mut Applier, st: &mut Loop) -> Result<()> {
        ap.poll_ready()?;
        self.confirmed(ap, st);
        Ok(())
    }

    /// Waits for every answer of the target: what was committed is answered (visible there).
    async fn settle(&self, ap: &mut Applier, st: &mut Loop) -> Result<()> {
        ap.settle().await?;
        self.confirmed(ap, st);
        Ok(())
    }

    /// Between batches, commits that have waited [`apply::FLUSH_WAIT`] to be flushed are flushed
    /// now ([`DbStream::make_durable`]); otherwise a WAL probe is sent when one is due.
    async fn flush_or_probe(
        &self,
        ap: &mut Applier,
        mut repl: &mut ReplicationClient,
        st: &mut Loop,
    ) -> Result<()> {
        if !st.batch_open && !st.in_source_tx && ap.flush_overdue() {
            alive!(self, repl, st, self.make_durable(ap, st))?;
        } else if !ap.in_tx() {
            ap.probe_if_due();
        }
        Ok(())
    }

    /// Waits until every answered commit is flushed on the target ([`Applier::make_durable`]).
    async fn make_durable(&self, ap: &mut Applier, st: &mut Loop) -> Result<()> {
        ap.make_durable().await?;
        self.confirmed(ap, st);
        Ok(())
    }

    /// Takes the applier's answered position; once everything received is committed and
    /// answered, nothing is waiting: the lag in seconds is 0.
    fn confirmed(&self, ap: &Applier, st: &mut Loop) {
        st.answered = st.answered.max(ap.confirmed());
        self.book.answered(st.answered);
        while st
            .uncounted
            .front()
            .is_some_and(|(at, _)| *at <= st.answered)
        {
            if let Some((_, counts)) = st.uncounted.pop_front() {
                self.book.count(counts);
            }
        }
        st.flushed = st.flushed.max(ap.flushed());
        if st.answered >= st.applied && !st.in_source_tx && !st.batch_open {
            self.book.oldest_unapplied_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Reports cdc ready once, when everything up to `at` is applied and `at` has reached the
    /// position the source was at when streaming started.
    /// Only what the target has answered counts (a pipelined commit may still be waiting there).
    fn mark_ready(&self, st: &mut Loop, at: Lsn, ready_at: Lsn, on_ready: &mut impl FnMut()) {
        if !st.ready && at >= ready_at && st.answered >= st.applied {
            st.ready = true;
            tracing::info!(database = %self.route.key, applied = %st.applied, "cdc caught up");
            on_ready();
        }
    }

    /// Copies the answered position to the store now (a drain, a stop): the bookkeeping copies it
    /// at most every [`book::POSITION_EVERY`] otherwise.
    async fn store_position(&self, st: &Loop) -> Result<()> {
        if self.book.is_stored(st.answered) {
            return Ok(());
        }
        self.cx
            .store
            .advance_position(&applied_position(&self.route.key), st.answered)
            .await?;
        self.book.stored(st.answered);
        Ok(())
    }
}

/// Tells the slot the flushed position (a standby status update) and notes when and what.
async fn report_flushed(repl: &mut ReplicationClient, st: &mut Loop) -> Result<()> {
    repl.send_status(st.flushed, st.flushed, st.flushed, false)
        .await?;
    st.last_status = Instant::now();
    st.reported = st.flushed;
    Ok(())
}

/// Tells the slot the flushed position and asks the walsender to answer with a keepalive at once
/// (its position lets an idle stream reach a target: ready, a drain, a hold).
async fn ask_keepalive(repl: &mut ReplicationClient, st: &mut Loop) -> Result<()> {
    repl.send_status(st.flushed, st.flushed, st.flushed, true)
        .await?;
    st.last_status = Instant::now();
    Ok(())
}

/// The hint for a slot or publication that no longer exists on the source (SQLSTATE 42704): it was
/// dropped outside pgferry, and the changes the slot held cannot be streamed any more.
fn explain_missing(e: Error) -> Error {
    if e.sqlstate.as_deref() != Some("42704") || e.hint.is_some() {
        return e;
    }
    let what = if e.message.contains("replication slot") {
        "the replication slot was dropped outside pgferry, and with it the changes made since the load"
    } else if e.message.contains("publication") {
        "the publication was dropped outside pgferry, and the slot's changes cannot be decoded without it"
    } else {
        return e;
    };
    e.hint(format!(
        "{what}: the target cannot be brought up to date from here. Start this migration over: `pgferry reset PLAN --yes --keep-target` (drops the slot, publication and checkpoints; target data is left alone), then `pgferry run PLAN` (recreates them and copies every table again)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_sender_timeout_values_parse() {
        assert_eq!(parse_pg_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_pg_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_pg_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_pg_duration("12"), Some(Duration::from_millis(12)));
        assert_eq!(parse_pg_duration("soon"), None);
    }
}
