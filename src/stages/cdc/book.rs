//! The bookkeeping beside the apply: what cdc tells the store while it streams, and what it reads
//! from it, done by a task of its own so that the apply loop never waits on the store.
//!
//! Measured under the soak's 800 tx/s Pagila writer: with the position copy (every 100 ms), the
//! counters (every second), the lag gauge, the 10 s progress sample (a source session) and the
//! drain and hold requests (every 500 ms) awaited inside the apply loop, each of those round trips
//! held back the next source transaction: a transaction waited 4 ms (median) between the
//! walsender sending it and cdc reading it, and pgferry's applied position trailed native's by
//! 14-18 kB on average. Without them in the loop: 4.4 kB.
//!
//! The apply loop only updates [`Book`] (atomics and a mutex, no I/O). The [`Bookkeeper`] task:
//! - copies the answered position to the store (`cdc_applied:<db>`, monotonic) at most every
//!   [`POSITION_EVERY`];
//! - writes the lag gauge ([`crate::lag::OLDEST_UNAPPLIED_GAUGE`]) when it changed, within
//!   [`POSITION_EVERY`] (also while the apply is blocked on the target: `status` sees it behind);
//! - adds the per-table change counters every [`COUNTERS_EVERY`]; writes the gauge of changes in
//!   flight when it changed, and runs the lag sample and 10 s progress log ([`super::sample`]),
//!   every [`GAUGES_EVERY`];
//! - reads the cutover's drain request and validation's hold request every [`REQUESTS_EVERY`] and
//!   wakes the apply loop when either changed ([`Book::changed`]); the cutover's write downtime
//!   includes that wait.
//!
//! A store error ends the task; the apply loop takes it ([`Book::take_failure`]) and fails the
//! stage with it, as when it wrote itself. Where the store must be up to date before the next
//! step (a drain's end, a hold, a stop), the apply loop still writes synchronously, and
//! [`Bookkeeper::finish`] writes what is left after the task stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Route, applied_position, drain_key, drain_lsn, sample};
use crate::error::{Error, Result};
use crate::pg::lsn::Lsn;
use crate::stages::hold::Hold;
use crate::state::StateStore;

/// How often at most the store's copy of the applied position and the lag gauge are written.
pub const POSITION_EVERY: Duration = Duration::from_millis(100);
/// How often the change counters go to the store (kept in memory between: a write per applied
/// batch cost the target more CPU than the apply itself under a live stream).
pub const COUNTERS_EVERY: Duration = Duration::from_secs(1);
/// How often the drain and hold requests are read from the store (the cutover's write downtime
/// waits for the drain request to be seen; 100 ms measured no shorter a downtime than 250 ms).
pub const REQUESTS_EVERY: Duration = Duration::from_millis(250);
/// How often the `incomingChanges` gauge is written (when it changed) and the progress sample is
/// considered.
pub const GAUGES_EVERY: Duration = Duration::from_millis(500);

/// Per-table change counts: inserts, updates, deletes.
pub type Counts = HashMap<String, [i64; 3]>;

const COUNTER_NAMES: [&str; 3] = ["cdcInsertCounter", "cdcUpdateCounter", "cdcDeleteCounter"];

/// What the apply loop hands to the bookkeeping, and what the bookkeeping read for it.
pub struct Book {
    /// The commit time (Unix epoch ms) of the oldest transaction received and not yet applied; 0
    /// when none (see [`crate::lag`]).
    pub oldest_unapplied_ms: AtomicI64,
    /// The value of `oldest_unapplied_ms` last written to the store (-1: none yet).
    oldest_published: AtomicI64,
    /// Changes applied by this stream (for the progress sample).
    pub applied_changes: AtomicI64,
    /// Counts of committed batches not yet written to the store.
    unwritten: Mutex<Counts>,
    /// The answered applied position, and the highest one written to the store.
    answered: AtomicU64,
    stored: AtomicU64,
    /// Changes sent to the target and not yet committed there; the value last written (-1: none).
    incoming: AtomicI64,
    incoming_published: AtomicI64,
    /// The cutover asked for a drain (the sampler opens no new source session then).
    draining: AtomicBool,
    /// The requests last read from the store.
    drain: Mutex<Option<Lsn>>,
    hold: Mutex<Option<Lsn>>,
    /// Request reads started and finished (the number of the last finished), so that the apply
    /// loop takes only values read after one of its own (see [`Book::read_after`]).
    reads_started: AtomicU64,
    reads_done: AtomicU64,
    /// Set when a request read differs from the one before.
    pub changed: Notify,
    failure: Mutex<Option<Error>>,
    failed: AtomicBool,
}

impl Book {
    pub fn new() -> Book {
        Book {
            oldest_unapplied_ms: AtomicI64::new(0),
            oldest_published: AtomicI64::new(-1),
            applied_changes: AtomicI64::new(0),
            unwritten: Mutex::new(Counts::new()),
            answered: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            incoming: AtomicI64::new(0),
            incoming_published: AtomicI64::new(-1),
            draining: AtomicBool::new(false),
            drain: Mutex::new(None),
            hold: Mutex::new(None),
            reads_started: AtomicU64::new(0),
            reads_done: AtomicU64::new(0),
            changed: Notify::new(),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
        }
    }

    /// A committed batch's counts, added to what goes to the store with the next write.
    pub fn count(&self, counts: Counts) {
        let mut sum = 0;
        {
            let mut unwritten = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
            for (table, c) in counts {
                sum += c.iter().sum::<i64>();
                let e = unwritten.entry(table).or_insert([0; 3]);
                for i in 0..3 {
                    e[i] += c[i];
                }
            }
        }
        self.applied_changes.fetch_add(sum, Ordering::Relaxed);
    }

    /// The applied position the target has answered (copied to the store by the task).
    pub fn answered(&self, at: Lsn) {
        self.answered.fetch_max(at.0, Ordering::Relaxed);
    }

    /// The position was written to the store by the apply loop itself.
    pub fn stored(&self, at: Lsn) {
        self.stored.fetch_max(at.0, Ordering::Relaxed);
    }

    /// Whether the store has `at` already (written by the task or the loop).
    pub fn is_stored(&self, at: Lsn) -> bool {
        self.stored.load(Ordering::Relaxed) >= at.0
    }

    pub fn set_incoming(&self, n: i64) {
        self.incoming.store(n, Ordering::Relaxed);
    }

    pub fn set_draining(&self, yes: bool) {
        self.draining.store(yes, Ordering::Relaxed);
    }

    /// The drain target the cutover asked for, as last read.
    pub fn drain(&self) -> Option<Lsn> {
        *self.drain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hold validation asked for and has not released, as last read.
    pub fn hold(&self) -> Option<Lsn> {
        *self.hold.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number the next request read will have: the apply loop, having read the requests
    /// itself (at its start, after a hold), takes the task's values only once this read is done
    /// ([`Book::read_done`]); an earlier read may have seen a hold since released.
    pub fn next_read(&self) -> u64 {
        self.reads_started.load(Ordering::Acquire) + 1
    }

    /// Whether the request read numbered `n` (or a later one) is done.
    pub fn read_done(&self, n: u64) -> bool {
        self.reads_done.load(Ordering::Acquire) >= n
    }

    /// The store error that ended the bookkeeping, once.
    pub fn take_failure(&self) -> Option<Error> {
        if !self.failed.load(Ordering::Relaxed) {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn fail(&self, e: Error) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
        self.failed.store(true, Ordering::Relaxed);
        // The apply loop is woken to take it.
        self.changed.notify_one();
    }

    /// Writes the lag gauge when it changed since it was last written.
    pub async fn publish_oldest(&self, store: &dyn StateStore, db: &str) -> Result<()> {
        let oldest = self.oldest_unapplied_ms.load(Ordering::Relaxed);
        if self.oldest_published.load(Ordering::Relaxed) == oldest {
            return Ok(());
        }
        store
            .set_counters(&[(
                db.to_string(),
                crate::lag::OLDEST_UNAPPLIED_GAUGE.into(),
                oldest,
            )])
            .await?;
        self.oldest_published.store(oldest, Ordering::Relaxed);
        Ok(())
    }

    /// Adds the counts not yet written to the store's counters, per table and per database.
    pub async fn write_counters(&self, store: &dyn StateStore, db: &str) -> Result<()> {
        let counts = std::mem::take(&mut *self.unwritten.lock().unwrap_or_else(|e| e.into_inner()));
        let mut deltas: Vec<(String, String, i64)> = Vec::new();
        let mut totals = [0i64; 3];
        for (table, c) in counts {
            let scope = format!("{db}.{table}");
            for (i, name) in COUNTER_NAMES.iter().enumerate() {
                if c[i] != 0 {
                    deltas.push((scope.clone(), name.to_string(), c[i]));
                    totals[i] += c[i];
                }
            }
            deltas.push((scope, "totalChangesApplied".into(), c.iter().sum()));
        }
        let sum: i64 = totals.iter().sum();
        if sum > 0 {
            for (i, name) in COUNTER_NAMES.iter().enumerate() {
                if totals[i] != 0 {
                    deltas.push((db.to_string(), name.to_string(), totals[i]));
                }
            }
            deltas.push((db.to_string(), "totalChangesApplied".into(), sum));
        }
        if !deltas.is_empty() {
            store.add_counters(&deltas).await?;
        }
        Ok(())
    }

    /// Copies the answered position to the store when it moved past the stored one.
    async fn write_position(&self, store: &dyn StateStore, db: &str) -> Result<()> {
        let answered = self.answered.load(Ordering::Relaxed);
        if self.is_stored(Lsn(answered)) {
            return Ok(());
        }
        store
            .advance_position(&applied_position(db), Lsn(answered))
            .await?;
        self.stored.fetch_max(answered, Ordering::Relaxed);
        Ok(())
    }

    async fn write_incoming(&self, store: &dyn StateStore, db: &str) -> Result<()> {
        let incoming = self.incoming.load(Ordering::Relaxed);
        if incoming == self.incoming_published.load(Ordering::Relaxed) {
            return Ok(());
        }
        store
            .set_counters(&[(db.to_string(), "incomingChanges".into(), incoming)])
            .await?;
        self.incoming_published.store(incoming, Ordering::Relaxed);
        Ok(())
    }
}

/// The task that does [`Book`]'s writes and reads.
pub struct Bookkeeper {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The store's drain request for this database, from any of the route's drain stages.
pub async fn read_drain(store: &dyn StateStore, route: &Route, db: &str) -> Result<Option<Lsn>> {
    for s in &route.drain_stages {
        let checkpoint = store.checkpoint(s, &drain_key(db)).await?;
        if let Some(l) = drain_lsn(checkpoint.as_ref())? {
            return Ok(Some(l));
        }
    }
    Ok(None)
}

impl Bookkeeper {
    /// Starts the task for one database's stream (`db`: the plan's database name, for the drain
    /// request; the route's key names everything else).
    pub fn start(
        book: Arc<Book>,
        store: Arc<dyn StateStore>,
        route: Route,
        db: String,
        mut sampler: sample::Sampler,
    ) -> Bookkeeper {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let key = route.key.clone();
            let mut counters_at = Instant::now();
            let mut gauges_at = Instant::now() - GAUGES_EVERY;
            let mut requests_at = Instant::now() - REQUESTS_EVERY;
            let mut tick = tokio::time::interval(POSITION_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = stopped.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let round = async {
                    book.write_position(store.as_ref(), &key).await?;
                    book.publish_oldest(store.as_ref(), &key).await?;
                    if counters_at.elapsed() >= COUNTERS_EVERY {
                        counters_at = Instant::now();
                        book.write_counters(store.as_ref(), &key).await?;
                    }
                    if requests_at.elapsed() >= REQUESTS_EVERY {
                        requests_at = Instant::now();
                        let n = book.reads_started.fetch_add(1, Ordering::AcqRel) + 1;
                        let drain = read_drain(store.as_ref(), &route, &db).await?;
                        let hold = Hold::new(store.as_ref(), &key).pending().await?;
                        let mut changed = false;
                        for (slot, now) in [(&book.drain, drain), (&book.hold, hold)] {
                            let mut was = slot.lock().unwrap_or_else(|e| e.into_inner());
                            if *was != now {
                                *was = now;
                                changed = true;
                            }
                        }
                        book.reads_done.store(n, Ordering::Release);
                        if changed {
                            book.changed.notify_one();
                        }
                    }
                    if gauges_at.elapsed() >= GAUGES_EVERY {
                        gauges_at = Instant::now();
                        book.write_incoming(store.as_ref(), &key).await?;
                        let gauges = sample::Gauges {
                            applied: Lsn(book.answered.load(Ordering::Relaxed)),
                            oldest_unapplied_ms: book.oldest_unapplied_ms.load(Ordering::Relaxed),
                            incoming: book.incoming.load(Ordering::Relaxed),
                            applied_changes: book.applied_changes.load(Ordering::Relaxed),
                            // The drain just read counts: no new source session once it is asked.
                            draining: book.drain().is_some()
                                || book.draining.load(Ordering::Relaxed),
                        };
                        sampler.tick(store.as_ref(), &gauges).await;
                    }
                    Ok::<(), Error>(())
                };
                // A stop waits for the round in progress (no write is cut off half-way).
                if let Err(e) = round.await {
                    book.fail(e);
                    return;
                }
            }
        });
        Bookkeeper { stop, task }
    }

    /// Stops the task (after the round in progress) and writes what is left: the counters and
    /// the lag gauge (best effort: the stage's own error, if any, is the one to report).
    pub async fn finish(self, book: &Book, store: &dyn StateStore, db: &str) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Err(e) = book.write_counters(store, db).await {
            tracing::warn!(database = %db, error = %e, "could not record the cdc counters");
        }
        if let Err(e) = book.publish_oldest(store, db).await {
            tracing::warn!(database = %db, error = %e, "could not record the cdc lag");
        }
    }
}
