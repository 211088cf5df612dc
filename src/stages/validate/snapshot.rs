//! Making both sides show the same moment.
//!
//! - Offline (no cdc running: an offline plan, or cdc done, or after the cutover): a repeatable-read
//!   transaction on each side exports its snapshot; nothing writes to the target, and the source's
//!   snapshot is whatever it is when validation starts.
//! - Online (cdc running or ready): a *temporary* logical slot on the source exports a snapshot
//!   together with its consistent point `L` (the snapshot shows exactly the transactions committed
//!   before `L`). The hold protocol with the running cdc stage goes through the checkpoint store's
//!   forward-only positions (see `crate::stages::cdc`): (1) hold at the source's current WAL
//!   insert position H0 (`validate_hold:<db>`) and wait for cdc to answer `validate_held:<db>` >=
//!   H0 — it is paused, so it cannot apply past `L` before it reads the next request; (2) create
//!   the temporary slot (snapshot, `L`), hold at `L`, release H0 (`validate_release:<db>`) and
//!   wait for held >= L: the target now shows exactly the source transactions committed before
//!   `L`; (3) export the target's repeatable-read snapshot and release `L`. Each wait is bounded
//!   by `hold_timeout`; whatever fails after the first request, the latest hold is released, so
//!   cdc is never left holding.
//!
//! The protocol's positions and both of its sides live in [`crate::stages::hold`].
//!
//! Validations of one database take turns through this protocol (a session advisory lock on the
//! target database from the first request to the release): two at once would move each other's
//! holds.
//!
//! Every worker session imports its side's snapshot (`SET TRANSACTION SNAPSHOT`), so all chunks
//! of one side see one snapshot. The holders stay open and idle until the comparison is over.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::report::SnapshotInfo;
use crate::error::{Error, Result};
use crate::pg::connect::ConnInfo;
use crate::pg::ident::quote_literal;
use crate::pg::lsn::{self, Lsn};
use crate::pg::replication::{ReplicationClient, SlotSnapshot};
use crate::stages::hold::{self, Hold};
use crate::state::StateStore;

/// Session settings that make both servers print every value the same way.
pub const SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 1; SET bytea_output = 'hex'; \
     SET lc_monetary = 'C'; SET search_path = ''; SET statement_timeout = 0; \
     SET idle_in_transaction_session_timeout = 0; SET lock_timeout = 0;";

/// What keeps a snapshot alive.
pub enum Holder {
    Replication(ReplicationClient),
    Transaction(Client),
}

/// Both sides' exported snapshots, held open.
pub struct Snapshots {
    pub source: String,
    pub target: String,
    pub info: SnapshotInfo,
    _source_holder: Holder,
    _target_holder: Client,
}

/// Takes the two snapshots of one database.
#[allow(clippy::too_many_arguments)]
pub async fn take(
    source_conn: &ConnInfo,
    target_conn: &ConnInfo,
    migration: &str,
    database: &str,
    online: Option<&Arc<dyn StateStore>>,
    cdc_stage: Option<&str>,
    hold_timeout: Duration,
    cancel: &CancellationToken,
    purpose: &str,
) -> Result<Snapshots> {
    match online {
        None => {
            let (source_holder, source, lsn) = exported(source_conn, purpose, true)
                .await
                .map_err(|e| e.context("source"))?;
            let (target_holder, target, _) = exported(target_conn, purpose, false)
                .await
                .map_err(|e| e.context("target"))?;
            Ok(Snapshots {
                source,
                target,
                info: SnapshotInfo {
                    database: database.to_string(),
                    method: "offline".into(),
                    lsn,
                    note: None,
                },
                _source_holder: Holder::Transaction(source_holder),
                _target_holder: target_holder,
            })
        }
        Some(store) => {
            // One validation at a time goes through the hold protocol of a database: two would
            // move each other's holds (positions only move forward). A session advisory lock on
            // the target database, held from the first request to the release.
            let guard = target_conn
                .connect(purpose)
                .await
                .map_err(|e| e.context("target"))?;
            guard
                .batch_execute(&format!(
                    "SET lock_timeout = {}",
                    hold_timeout.as_millis().min(i32::MAX as u128)
                ))
                .await
                .map_err(|e| {
                    Error::pg(&e, "configuring the hold lock session").context("target")
                })?;
            guard
                .execute(
                    "SELECT pg_catalog.pg_advisory_lock($1)",
                    &[&hold::lock_key(migration, database)],
                )
                .await
                .map_err(|e| {
                    Error::pg(
                        &e,
                        "waiting for another validation of this database to take its snapshots",
                    )
                    .context("target")
                })?;
            // Step 1: pause the apply at the source's current WAL position H0.
            let control = source_conn
                .connect(purpose)
                .await
                .map_err(|e| e.context("source"))?;
            let h0 = lsn::current_insert_lsn(&control)
                .await
                .map_err(|e| e.context("source"))?;
            drop(control);
            let hold = Hold::new(store.as_ref(), database);
            hold.request(h0).await?;
            let mut requested = h0;
            let result = online_steps(
                source_conn,
                target_conn,
                database,
                hold,
                cdc_stage,
                hold_timeout,
                cancel,
                purpose,
                h0,
                &mut requested,
            )
            .await;
            // Always let cdc go on, whatever happened.
            let released = hold.release(requested).await;
            drop(guard);
            let (repl, snap, target_holder, target) = result?;
            released?;
            let l = snap.consistent_point;
            tracing::info!(database, lsn = %l, "target snapshot taken at the source snapshot's position; cdc released");
            Ok(Snapshots {
                source: snap.snapshot_name,
                target,
                info: SnapshotInfo {
                    database: database.to_string(),
                    method: "online".into(),
                    lsn: Some(l),
                    note: Some(
                        "sequences not compared while cdc runs (logical replication does not carry them; compare them after sequence_reset)".into(),
                    ),
                },
                _source_holder: Holder::Replication(repl),
                _target_holder: target_holder,
            })
        }
    }
}

/// Steps 1 (wait for the pause at `h0`) to 3 (the target snapshot) of the online protocol;
/// `requested` follows the latest hold written, for the release.
#[allow(clippy::too_many_arguments)]
async fn online_steps(
    source_conn: &ConnInfo,
    target_conn: &ConnInfo,
    database: &str,
    hold: Hold<'_>,
    cdc_stage: Option<&str>,
    hold_timeout: Duration,
    cancel: &CancellationToken,
    purpose: &str,
    h0: Lsn,
    requested: &mut Lsn,
) -> Result<(ReplicationClient, SlotSnapshot, Client, String)> {
    wait_held(hold, h0, hold_timeout, cancel, cdc_stage).await?;
    tracing::debug!(database, at = %h0, "cdc paused");
    // Step 2: the source snapshot (temporary slot: snapshot and consistent point L), hold at L,
    // then release the pause: cdc applies exactly the transactions committed before L.
    let mut repl = ReplicationClient::connect(source_conn, purpose)
        .await
        .map_err(|e| e.context("source"))?;
    let slot = format!(
        "pgferry_val_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let snap = repl
        .create_slot(&slot, true)
        .await
        .map_err(|e| e.context("creating a temporary slot for the validation snapshot"))?;
    let l = snap.consistent_point;
    tracing::info!(database, lsn = %l, "source snapshot taken (temporary slot); asking cdc to hold its apply there");
    hold.request(l).await?;
    *requested = l;
    hold.release(h0).await?;
    wait_held(hold, l, hold_timeout, cancel, cdc_stage).await?;
    // Step 3: the target snapshot, showing exactly the source's transactions before L.
    let (target_holder, target, _) = exported(target_conn, purpose, false)
        .await
        .map_err(|e| e.context("target"))?;
    Ok((repl, snap, target_holder, target))
}

/// Waits until cdc reports holding at `lsn` or beyond.
async fn wait_held(
    hold: Hold<'_>,
    lsn: Lsn,
    timeout: Duration,
    cancel: &CancellationToken,
    cdc_stage: Option<&str>,
) -> Result<()> {
    if hold.wait_held(lsn, timeout, cancel).await? {
        return Ok(());
    }
    let stage = cdc_stage.unwrap_or("cdc");
    Err(Error::permanent(format!(
        "the cdc stage `{stage}` did not hold its apply at {lsn} within {} (store position `{}`)",
        humantime::format_duration(timeout),
        hold::held_position(hold.database())
    ))
    .hint(format!(
        "validation of a running migration needs stage `{stage}` running (`pgferry run` in progress) and caught up; check `pgferry status`, or raise `hold_timeout`"
    )))
}

/// A repeatable-read transaction that exported its snapshot: (session, snapshot, WAL position).
async fn exported(
    conn: &ConnInfo,
    purpose: &str,
    source: bool,
) -> Result<(Client, String, Option<Lsn>)> {
    let client = conn.connect(purpose).await?;
    client
        .batch_execute(&format!(
            "{SETTINGS} BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
        ))
        .await
        .map_err(|e| Error::pg(&e, "opening the snapshot transaction"))?;
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_export_snapshot(), \
                    CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                         ELSE pg_catalog.pg_current_wal_insert_lsn() END::text",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "exporting a snapshot"))?;
    // The insert position, not pg_current_wal_lsn() (the write position): a commit made with
    // `synchronous_commit = off` is visible to the snapshot before the WAL writer writes it, and
    // cdc held at the write position would not have applied it yet.
    let lsn = if source {
        lsn::parse_opt(row.get(1))?
    } else {
        None
    };
    Ok((client, row.get(0), lsn))
}

/// A worker session on one side, inside that side's snapshot, with the comparable settings.
pub async fn open_worker(conn: &ConnInfo, snapshot: &str, purpose: &str) -> Result<Client> {
    let client = conn.connect(purpose).await?;
    client
        .batch_execute(&format!(
            "{SETTINGS} BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(|e| Error::pg(&e, "importing the validation snapshot"))?;
    Ok(client)
}
