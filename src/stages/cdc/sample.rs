//! The cdc lag profile: every [`SAMPLE_EVERY`] one row per database in the store's `samples`
//! (`pgferry report` draws it). The lag in bytes is the source's WAL insert position minus the
//! applied position, asked of the source on a small session of its own. Sampling never stops the
//! apply: a failure is logged and the next sample tried later; the session is not reopened for
//! [`RECONNECT_AFTER`] (the cutover's fence terminates it, and a session reopened at once would
//! keep the fence waiting), and never once the cutover drains.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::pg::connect::ConnInfo;
use crate::pg::pgoutput::Lsn;
use crate::state::{LagSample, StateStore, Timestamp};

pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const RECONNECT_AFTER: Duration = Duration::from_secs(30);
/// One sample (source query and store insert) never holds the apply longer than this.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the apply loop knows at the moment of a sample.
pub struct Gauges {
    pub applied: Lsn,
    pub latency_ms: i64,
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
        let sample = LagSample {
            stage: self.stage.clone(),
            database: self.database.clone(),
            at: Timestamp::now().0,
            lag_bytes,
            latency_ms: Some(g.latency_ms),
            incoming: Some(g.incoming),
            applied: Some(g.applied_changes),
        };
        match tokio::time::timeout(SAMPLE_TIMEOUT, store.add_sample(&sample)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failed(&format!("writing it: {e}")),
            Err(_) => self.failed("writing it timed out"),
        }
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
