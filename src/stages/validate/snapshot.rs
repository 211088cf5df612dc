//! Making both sides show the same moment.
//!
//! - Offline (no cdc running: an offline plan, or cdc done, or after the cutover): a repeatable-read
//!   transaction on each side exports its snapshot; nothing writes to the target, and the source's
//!   snapshot is whatever it is when validation starts.
//! - Online (cdc running or ready): a *temporary* logical slot on the source exports a snapshot
//!   together with its consistent point `L` (the snapshot shows exactly the transactions committed
//!   before `L`). Then the hold protocol with the running cdc stage, through the checkpoint store's
//!   forward-only positions: validation writes `validate_hold:<db>` = L; cdc applies every source
//!   transaction that commits before `L`, commits, writes `validate_held:<db>` = L and stops
//!   applying; validation waits for that (at most `hold_timeout`), takes and exports the target's
//!   repeatable-read snapshot and writes `validate_release:<db>` = L; cdc resumes. Whatever fails
//!   after the hold request, the release is written, so cdc is never left holding.
//!
//! Every worker session imports its side's snapshot (`SET TRANSACTION SNAPSHOT`), so all chunks
//! of one side see one snapshot. The holders stay open and idle until the comparison is over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::report::SnapshotInfo;
use crate::error::{Error, Result};
use crate::pg::connect::ConnInfo;
use crate::pg::ident::quote_literal;
use crate::pg::pgoutput::Lsn;
use crate::pg::replication::ReplicationClient;
use crate::state::StateStore;

/// Session settings that make both servers print every value the same way.
pub const SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 1; SET bytea_output = 'hex'; \
     SET lc_monetary = 'C'; SET search_path = ''; SET statement_timeout = 0; \
     SET idle_in_transaction_session_timeout = 0; SET lock_timeout = 0;";

/// How often the hold is polled.
const POLL: Duration = Duration::from_millis(100);

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
            let l = snap.consistent_point.clone();
            let target_lsn: Lsn = snap.consistent_lsn()?;
            tracing::info!(database, lsn = %l, "source snapshot taken (temporary slot); asking cdc to hold its apply there");
            store
                .advance_position(&hold_request_position(database), &l)
                .await?;
            let held = wait_held(
                store.as_ref(),
                database,
                target_lsn,
                hold_timeout,
                cancel,
                cdc_stage,
            )
            .await;
            let target = match held {
                Ok(()) => exported(target_conn, purpose, false)
                    .await
                    .map_err(|e| e.context("target")),
                Err(e) => Err(e),
            };
            // Always let cdc go on, whatever happened.
            let released = store
                .advance_position(&hold_release_position(database), &l)
                .await;
            let (target_holder, target, _) = target?;
            released?;
            tracing::info!(database, lsn = %l, "target snapshot taken at the same position; cdc released");
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

/// Waits until cdc reports holding at `lsn` or beyond.
async fn wait_held(
    store: &dyn StateStore,
    database: &str,
    lsn: Lsn,
    timeout: Duration,
    cancel: &CancellationToken,
    cdc_stage: Option<&str>,
) -> Result<()> {
    let started = Instant::now();
    let name = held_position(database);
    loop {
        if let Some(p) = store.position(&name).await?
            && p.parse::<Lsn>().is_ok_and(|h| h >= lsn)
        {
            return Ok(());
        }
        if started.elapsed() > timeout {
            let stage = cdc_stage.unwrap_or("cdc");
            return Err(Error::permanent(format!(
                "the cdc stage `{stage}` did not hold its apply at {lsn} within {} (store position `{name}`)",
                humantime::format_duration(timeout)
            ))
            .hint(format!(
                "validation of a running migration needs stage `{stage}` running (`pgferry run` in progress) and caught up; check `pgferry status`, or raise `hold_timeout`"
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.cancelled() => return Err(Error::interrupted()),
        }
    }
}

/// A repeatable-read transaction that exported its snapshot: (session, snapshot, WAL position).
async fn exported(
    conn: &ConnInfo,
    purpose: &str,
    source: bool,
) -> Result<(Client, String, Option<String>)> {
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
                         ELSE pg_catalog.pg_current_wal_lsn() END::text",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "exporting a snapshot"))?;
    let lsn = if source { row.get(1) } else { None };
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

// The cdc side's position names (the same as `crate::stages::cdc`'s helpers on main).
fn hold_request_position(db: &str) -> String {
    format!("validate_hold:{db}")
}

fn held_position(db: &str) -> String {
    format!("validate_held:{db}")
}

fn hold_release_position(db: &str) -> String {
    format!("validate_release:{db}")
}
