//! The hold protocol: how a stage pauses the running cdc stage of one database at a source LSN,
//! so that the target shows exactly the source transactions committed before it. Validation uses it
//! to take its two snapshots at the same moment ([`crate::stages::validate::snapshot`]), and a
//! rehearsal's cutover to take its simulated fence ([`crate::stages::cutover`]); cdc answers it
//! ([`crate::stages::cdc`]).
//!
//! Three forward-only positions of the checkpoint store carry it, per database:
//!
//! - the **request** (`validate_hold:<db>`): apply every transaction committed before this LSN,
//!   then none;
//! - the **answer** (`validate_held:<db>`): cdc has done so and is paused there;
//! - the **release** (`validate_release:<db>`): the requester is done with the hold at this LSN.
//!
//! A hold is pending while the request is beyond the release. Positions only move forward, so two
//! requesters would move each other's holds: they take turns with a session advisory lock on the
//! target database ([`lock_key`]), held from the first request to the release. Whatever fails after
//! a request, the requester releases it, so cdc is never left holding (and cdc itself stops holding
//! after [`crate::stages::cdc::HOLD_MAX`]).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pg::lsn::Lsn;
use crate::state::StateStore;

/// How often a side polls the other's position.
pub const POLL: Duration = Duration::from_millis(100);

/// The store position of a hold request for `db`.
pub fn request_position(db: &str) -> String {
    format!("validate_hold:{db}")
}

/// The store position where cdc answers that it holds.
pub fn held_position(db: &str) -> String {
    format!("validate_held:{db}")
}

/// The store position of the requester's release.
pub fn release_position(db: &str) -> String {
    format!("validate_release:{db}")
}

/// The advisory lock key (on the target database) by which requesters of one database of one
/// migration take turns.
pub fn lock_key(migration: &str, database: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let digest =
        Sha256::digest(format!("pgferry validation hold: {migration}/{database}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// The hold of one database, through the store.
#[derive(Clone, Copy)]
pub struct Hold<'a> {
    store: &'a dyn StateStore,
    database: &'a str,
}

impl<'a> Hold<'a> {
    pub fn new(store: &'a dyn StateStore, database: &'a str) -> Hold<'a> {
        Hold { store, database }
    }

    pub fn database(&self) -> &'a str {
        self.database
    }

    /// Requester: asks cdc to hold at `at`.
    pub async fn request(&self, at: Lsn) -> Result<()> {
        self.store
            .advance_position(&request_position(self.database), at)
            .await
            .map(drop)
    }

    /// Requester: done with the hold at `at` (cdc goes on, or on to a later request).
    pub async fn release(&self, at: Lsn) -> Result<()> {
        self.store
            .advance_position(&release_position(self.database), at)
            .await
            .map(drop)
    }

    /// Requester: waits until cdc holds at `at` or beyond. `Ok(false)` when it has not within
    /// `timeout`; `Interrupted` when `cancel` fires.
    pub async fn wait_held(
        &self,
        at: Lsn,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<bool> {
        let started = Instant::now();
        let name = held_position(self.database);
        loop {
            if self.store.position(&name).await?.is_some_and(|h| h >= at) {
                return Ok(true);
            }
            if started.elapsed() > timeout {
                return Ok(false);
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = cancel.cancelled() => return Err(Error::interrupted()),
            }
        }
    }

    /// cdc: the hold requested and not released yet.
    pub async fn pending(&self) -> Result<Option<Lsn>> {
        // The release first: a requester moves the request forward before it releases the
        // previous hold, so a release read here is never newer than the request read after it.
        let released = self
            .store
            .position(&release_position(self.database))
            .await?
            .unwrap_or(Lsn::INVALID);
        let Some(request) = self
            .store
            .position(&request_position(self.database))
            .await?
        else {
            return Ok(None);
        };
        Ok((request > released).then_some(request))
    }

    /// cdc: answers that it holds at `at`.
    pub async fn answer(&self, at: Lsn) -> Result<()> {
        self.store
            .advance_position(&held_position(self.database), at)
            .await
            .map(drop)
    }
}
