//! The runner lock: one runner per migration, a session advisory lock on a connection of its own
//! (a killed runner loses it with its session), and who holds it, read back from
//! `pg_stat_activity`.

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::PgStore;
use crate::error::{Error, Result};
use crate::state::lock::{LockHolder, RunnerLock, hostname};

/// The `application_name` of the session holding the runner lock of `migration`: who holds it is
/// read back from it. The stem, not the name itself: `application_name` keeps ASCII only (and 63
/// bytes), and the holder is read back from it word by word.
pub(super) fn runner_application(migration: &str) -> String {
    format!(
        "runner {} host={} pid={}",
        crate::pg::names::name_stem(migration),
        hostname(),
        std::process::id()
    )
}

impl PgStore {
    /// The advisory lock key of a migration.
    fn lock_key(&self) -> i64 {
        let digest = Sha256::digest(format!("pgferry runner lock: {}", self.migration).as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(b)
    }

    /// Takes the runner lock on a session of its own, or says who holds it.
    pub(super) async fn try_runner_lock(
        &self,
    ) -> Result<std::result::Result<RunnerLock, LockHolder>> {
        let opened = self.lock_session.lock().await.take();
        let client = match opened {
            Some(client) if !client.is_closed() => client,
            _ => self
                .conn
                .connect(&runner_application(&self.migration))
                .await
                .map_err(|e| e.context("runner lock"))?,
        };
        let key = self.lock_key();
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(|e| Error::pg(&e, "taking the runner lock"))?
            .get(0);
        if got {
            return Ok(Ok(RunnerLock::new(client)));
        }
        Ok(Err(self.lock_holder(&client, key).await?.unwrap_or(
            LockHolder {
                host: None,
                pid: None,
                since: None,
                backend_pid: 0,
                application: "unknown (the lock was released meanwhile; try again)".into(),
            },
        )))
    }

    /// Who holds the runner lock right now, if anyone.
    pub(super) async fn runner_holder(&self) -> Result<Option<LockHolder>> {
        let client = self.client().await?;
        self.lock_holder(&client, self.lock_key()).await
    }

    async fn lock_holder(&self, client: &Client, key: i64) -> Result<Option<LockHolder>> {
        let hi = ((key as u64) >> 32) as u32;
        let lo = (key as u64 & 0xffff_ffff) as u32;
        let row = client
            .query_opt(
                "SELECT a.pid, coalesce(a.application_name, ''), \
                        to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                 FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                   AND l.classid::text::bigint = $1 AND l.objid::text::bigint = $2 \
                   AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())",
                &[&i64::from(hi), &i64::from(lo)],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking up the runner lock's holder"))?;
        let Some(row) = row else { return Ok(None) };
        let application: String = row.get(1);
        // application_name is "pgferry runner NAME host=H pid=P"
        let field = |k: &str| {
            application
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k).map(str::to_string))
        };
        Ok(Some(LockHolder {
            host: field("host="),
            pid: field("pid=").and_then(|p| p.parse().ok()),
            since: row.get(2),
            backend_pid: row.get(0),
            application,
        }))
    }
}
