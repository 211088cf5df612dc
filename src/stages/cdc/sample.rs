//! The cdc lag profile: every [`SAMPLE_EVERY`] one row per database in the store's `samples`
//! (`pgferry report` draws it). The lag in bytes is the source's WAL insert position minus the
//! applied position, asked of the source on a small session of its own. Sampling never stops the
//! apply: a failure is logged and the next sample tried later; the session is not reopened for
//! [`RECONNECT_AFTER`] (the cutover's fence terminates it, and a session reopened at once would
//! keep the fence waiting), and never once the cutover drains.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::pg::connect::ConnInfo;
use crate::pg::lsn::Lsn;
use crate::state::{LagSample, StateStore, Timestamp};

pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const RECONNECT_AFTER: Duration = Duration::from_secs(30);
/// How often cdc logs its progress (changes applied, rate, lag).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// One sample (source query and store insert) never holds the apply longer than this.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the apply loop knows at the moment of a sample.
pub struct Gauges {
    pub applied: Lsn,
    /// See [`crate::lag::OLDEST_UNAPPLIED_GAUGE`].
    pub oldest_unapplied_ms: i64,
    pub incoming: i64,
    pub applied_changes: i64,
    /// The cutover asked for a drain: no new session to the source from now on.
    pub draining: bool,
}

pub struct Sampler {
    source: ConnInfo,
    stage: String,
    database: String,
    client: Option<Client>,
    next: Instant,
    connect_after: Instant,
    warned: bool,
    /// When the last progress line was logged, and the changes applied by then.
    progress_from: Option<(Instant, i64)>,
}

impl Sampler {
    pub fn new(source: ConnInfo, stage: &str, database: &str) -> Sampler {
        Sampler {
            source,
            stage: stage.to_string(),
            database: database.to_string(),
            client: None,
            next: Instant::now(),
            connect_after: Instant::now(),
            warned: false,
            progress_from: None,
        }
    }

    /// Writes a sample when one is due; never fails.
    pub async fn tick(&mut self, store: &dyn StateStore, g: &Gauges) {
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + SAMPLE_EVERY;
        let lag_bytes = match tokio::time::timeout(
            SAMPLE_TIMEOUT,
            self.lag_bytes(g.applied, g.draining),
        )
        .await
        {
            Ok(Ok(lag)) => lag,
            Ok(Err(e)) => {
                if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                    // Ended by the server: the cutover's fence ends every session.
                    tracing::debug!(database = %self.database, "cdc lag sample: the source session ended: {e}");
                    self.client = None;
                    self.connect_after = Instant::now() + RECONNECT_AFTER;
                } else {
                    self.failed(&format!("reading the source's WAL position: {e}"));
                }
                None
            }
            Err(_) => {
                self.client = None;
                self.connect_after = Instant::now() + RECONNECT_AFTER;
                self.failed("reading the source's WAL position timed out");
                None
            }
        };
        let now = crate::lag::now_ms();
        let lag_seconds = crate::lag::seconds(g.oldest_unapplied_ms, now);
        self.progress(g, lag_bytes, lag_seconds);
        let sample = LagSample {
            stage: self.stage.clone(),
            database: self.database.clone(),
            at: Timestamp::now().0,
            lag_bytes,
            latency_ms: Some((lag_seconds * 1000.0) as i64),
            incoming: Some(g.incoming),
            applied: Some(g.applied_changes),
        };
        match tokio::time::timeout(SAMPLE_TIMEOUT, store.add_sample(&sample)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failed(&format!("writing it: {e}")),
            Err(_) => self.failed("writing it timed out"),
        }
    }

    /// Every [`PROGRESS_EVERY`]: changes applied, their rate, and the lag in seconds and bytes.
    fn progress(&mut self, g: &Gauges, lag_bytes: Option<i64>, lag_seconds: f64) {
        let now = Instant::now();
        let Some((at, applied)) = self.progress_from else {
            self.progress_from = Some((now, g.applied_changes));
            return;
        };
        let elapsed = now.duration_since(at);
        if elapsed < PROGRESS_EVERY {
            return;
        }
        self.progress_from = Some((now, g.applied_changes));
        let done = g.applied_changes - applied;
        let lag = crate::lag::Lag {
            seconds: Some(lag_seconds),
            bytes: lag_bytes,
        };
        tracing::info!(
            database = %self.database,
            "cdc: {} change(s) applied in the last {:.0}s ({:.0}/s, {} in total), {} the source",
            done,
            elapsed.as_secs_f64(),
            done as f64 / elapsed.as_secs_f64().max(0.001),
            g.applied_changes,
            lag
        );
    }

    fn failed(&mut self, what: &str) {
        if self.warned {
            tracing::debug!(database = %self.database, "cdc lag sample: {what}");
        } else {
            self.warned = true;
            tracing::warn!(database = %self.database, "cdc lag sample: {what} (the apply goes on; further sample failures are logged at debug level)");
        }
    }

    /// `None` when there is no session to ask and none may be opened now.
    async fn lag_bytes(
        &mut self,
        applied: Lsn,
        draining: bool,
    ) -> crate::error::Result<Option<i64>> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.connect_after = Instant::now() + RECONNECT_AFTER;
        }
        if self.client.is_none() {
            if draining || Instant::now() < self.connect_after {
                return Ok(None);
            }
            // Until it works, one attempt per RECONNECT_AFTER.
            self.connect_after = Instant::now() + RECONNECT_AFTER;
            self.client = Some(self.source.connect("cdc lag sample").await?);
        }
        let Some(client) = &self.client else {
            return Ok(None);
        };
        let row = client
            .query_one(
                "SELECT greatest(pg_catalog.pg_current_wal_insert_lsn() - $1::text::pg_lsn, 0)::int8",
                &[&applied.to_string()],
            )
            .await
            .map_err(|e| crate::error::Error::pg(&e, "reading the source's WAL insert position"))?;
        Ok(Some(row.get(0)))
    }
}
