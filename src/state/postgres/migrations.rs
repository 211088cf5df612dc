//! The store's schema: its versioned steps, applied once each under an advisory lock, and the
//! database it lives in (created on first use).

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::connect::ConnInfo;
use crate::pg::ident::quote_ident;

/// The store's schema, step by step. `{s}` is the quoted schema name. Never edit a released step;
/// append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the first layout
    r#"
    CREATE TABLE {s}.runs (
        id bigserial PRIMARY KEY,
        migration text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        ended_at timestamptz,
        host text, pid integer, version text, args text,
        outcome text
    );
    CREATE TABLE {s}.stages (
        migration text NOT NULL,
        stage text NOT NULL,
        kind text NOT NULL,
        state text NOT NULL CHECK (state IN ('pending','running','ready','done','failed')),
        fingerprint text,
        attempts integer NOT NULL DEFAULT 0,
        started_at timestamptz,
        ended_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        error text,
        detail jsonb NOT NULL DEFAULT '{}',
        PRIMARY KEY (migration, stage)
    );
    CREATE TABLE {s}.checkpoints (
        migration text NOT NULL,
        stage text NOT NULL,
        key text NOT NULL,
        value jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration, stage, key)
    );
    CREATE TABLE {s}.tables (
        migration text NOT NULL,
        stage text NOT NULL,
        database text NOT NULL,
        table_name text NOT NULL,
        state text NOT NULL,
        rows bigint NOT NULL DEFAULT 0,
        bytes bigint NOT NULL DEFAULT 0,
        lsn pg_lsn,
        started_at timestamptz,
        ended_at timestamptz,
        error text,
        PRIMARY KEY (migration, stage, database, table_name)
    );
    CREATE TABLE {s}.counters (
        migration text NOT NULL,
        scope text NOT NULL,
        name text NOT NULL,
        value bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (migration, scope, name)
    );
    CREATE TABLE {s}.positions (
        migration text NOT NULL,
        name text NOT NULL,
        lsn pg_lsn NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration, name)
    );
    CREATE TABLE {s}.artifacts (
        migration text NOT NULL,
        name text NOT NULL,
        content bytea NOT NULL,
        sha256 text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (migration, name)
    );
    CREATE TABLE {s}.events (
        id bigserial PRIMARY KEY,
        migration text NOT NULL,
        run_id bigint,
        at timestamptz NOT NULL DEFAULT now(),
        stage text,
        level text NOT NULL,
        message text NOT NULL
    );
    CREATE TABLE {s}.requests (
        migration text NOT NULL,
        name text NOT NULL,
        requested_at timestamptz NOT NULL DEFAULT now(),
        requested_by text,
        PRIMARY KEY (migration, name)
    );
    "#,
    // 2: rehearsals and reports. `runs.mode` tells a rehearsal from a real run; `samples` keeps the
    // cdc lag profile of each run; `reports` keeps each finished run's report (a JSON snapshot),
    // which `reset` leaves in place so rehearsals can be compared after the target is torn down.
    r#"
    ALTER TABLE {s}.runs ADD COLUMN mode text NOT NULL DEFAULT 'run'
        CHECK (mode IN ('run', 'rehearsal'));
    CREATE TABLE {s}.samples (
        migration text NOT NULL,
        run_id bigint NOT NULL,
        stage text NOT NULL,
        database text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        lag_bytes bigint,
        latency_ms bigint,
        incoming bigint,
        applied bigint
    );
    CREATE INDEX ON {s}.samples (migration, run_id, at);
    CREATE TABLE {s}.reports (
        migration text NOT NULL,
        run_id bigint NOT NULL,
        mode text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        report jsonb NOT NULL,
        PRIMARY KEY (migration, run_id)
    );
    "#,
];

/// The pseudo-stage (no plan stage can be named so) of the store's own checkpoints.
/// Creates the store's schema or brings it up to the current version, under a transaction-level
/// advisory lock so two first runs cannot race.
pub(super) async fn migrate(client: &Client, schema: &str) -> Result<()> {
    let s = quote_ident(schema);
    let lock_key: i64 = 0x7067_6665_7272_7901; // "pgferry" + 1
    let mut sql = format!(
        "BEGIN; SELECT pg_advisory_xact_lock({lock_key}); \
         CREATE SCHEMA IF NOT EXISTS {s}; REVOKE ALL ON SCHEMA {s} FROM PUBLIC; \
         CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());"
    );
    sql.push_str("COMMIT;");
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| Error::pg(&e, format!("creating schema {schema}")))?;
    let current: i32 = client
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {s}.schema_version"),
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading the store version"))?
        .get(0);
    let latest = MIGRATIONS.len() as i32;
    if current > latest {
        return Err(Error::permanent(format!(
            "the checkpoint store {schema} has version {current}, newer than this pgferry understands ({latest})"
        ))
        .hint("use the pgferry version that created it, or a newer one"));
    }
    if current == latest {
        return Ok(());
    }
    let mut sql = format!("BEGIN; SELECT pg_advisory_xact_lock({lock_key});");
    // Re-check under the lock: another runner may have migrated meanwhile.
    sql.push_str(&format!(
        "DO $$ BEGIN IF (SELECT coalesce(max(version), 0) FROM {s}.schema_version) <> {current} THEN \
           RAISE EXCEPTION 'checkpoint store changed concurrently' USING ERRCODE = '40001'; END IF; END $$;"
    ));
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        sql.push_str(&step.replace("{s}", &s));
        sql.push_str(&format!(
            "INSERT INTO {s}.schema_version (version) VALUES ({});",
            i + 1
        ));
    }
    sql.push_str("COMMIT;");
    client.batch_execute(&sql).await.map_err(|e| {
        Error::pg(
            &e,
            format!("upgrading the checkpoint store {schema} from version {current}"),
        )
    })?;
    Ok(())
}

/// Creates the store's database when it does not exist, from the server's maintenance database.
pub(super) async fn ensure_database(conn: &ConnInfo) -> Result<bool> {
    let db = conn.dbname().to_string();
    if db.is_empty() {
        return Ok(false);
    }
    let mut last_err = None;
    for maintenance in ["postgres", "template1"] {
        if maintenance == db {
            return Ok(false);
        }
        let client = match conn.with_dbname(maintenance).connect("state setup").await {
            Ok(c) => c,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1)",
                &[&db],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking for the checkpoint database"))?
            .get(0);
        if !exists {
            tracing::info!(database = %db, "creating the database for the checkpoint store");
            match client.batch_execute(&format!("CREATE DATABASE {}", quote_ident(&db))).await {
                Ok(()) => return Ok(true),
                // Created by someone else meanwhile.
                Err(e) if e.code().map(|c| c.code()) == Some("42P04") => {}
                Err(e) => {
                    return Err(Error::pg(&e, format!("creating database {db} for the checkpoint store"))
                        .hint("grant CREATEDB to the migration role, create the database by hand, or point [state] url elsewhere"))
                }
            }
        }
        return Ok(false);
    }
    match last_err {
        Some(e) => Err(e.context(format!("checking that database {db} exists"))),
        None => Ok(false),
    }
}
