//! The checkpoint store in PostgreSQL: a schema (default `pgferry`) in the first target database or
//! wherever `[state]` says, created on first use together with its database. The schema is versioned:
//! each release appends migration steps, applied once under an advisory lock. Every row is keyed by
//! the migration's name, so one store can hold several migrations.
//!
//! This file has the connection and the [`StateStore`] implementation; `lock.rs` the runner lock,
//! `runs.rs` the run history, kept reports and lag samples, `migrations.rs` the schema's steps.

use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::{
    CREATED_DATABASE_KEY, LagSample, LockHolder, MODE_KEY, RUN_STAGE, RunnerLock, STORE_STAGE,
    StageRecord, StageState, StateStore, TableProgress, TableState, Timestamp, hostname,
};
use crate::error::{Error, Result};
use crate::pg::connect::ConnInfo;
use crate::pg::ident::{quote_ident, quote_literal};
use crate::pg::lsn::Lsn;

mod lock;
mod migrations;
mod runs;

pub use crate::state::{KeptReport, RunRecord};
use lock::runner_application;
use migrations::{ensure_database, migrate};

/// What `reset` keeps of a migration.
const KEPT_TABLES: &[&str] = &["runs", "reports", "samples"];

/// The store of one migration.
pub struct PgStore {
    conn: ConnInfo,
    schema: String,
    migration: String,
    client: Mutex<Arc<Client>>,
    run: std::sync::atomic::AtomicI64,
    /// The session opened for the runner lock with the store ([`PgStore::open_or_create_for_run`]),
    /// until the lock is taken on it.
    lock_session: Mutex<Option<Client>>,
}

impl PgStore {
    /// Connects to an existing store. Fails with a clear message when it has never been created.
    pub async fn open(conn: ConnInfo, schema: &str, migration: &str) -> Result<Option<PgStore>> {
        let client = conn
            .connect("state")
            .await
            .map_err(|e| e.context("checkpoint store"))?;
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = 'schema_version')",
                &[&schema],
            )
            .await
            .map_err(|e| Error::pg(&e, "reading the checkpoint store"))?
            .get(0);
        if !exists {
            return Ok(None);
        }
        // A first run creates `schema_version` and then, in a second transaction, the tables: a
        // store with no version applied yet is not there for a reader (`status` polling a run
        // that is starting).
        let version: i32 = client
            .query_one(
                &format!(
                    "SELECT coalesce(max(version), 0) FROM {}.schema_version",
                    quote_ident(schema)
                ),
                &[],
            )
            .await
            .map_err(|e| Error::pg(&e, "reading the checkpoint store's version"))?
            .get(0);
        if version == 0 {
            return Ok(None);
        }
        Ok(Some(PgStore::with_client(conn, schema, migration, client)))
    }

    /// Connects to the store, creating its database and schema (and upgrading it) as needed.
    pub async fn open_or_create(conn: ConnInfo, schema: &str, migration: &str) -> Result<PgStore> {
        PgStore::open_or_create_with(conn, schema, migration, false).await
    }

    /// [`PgStore::open_or_create`] for a runner: the session the runner lock will be taken on
    /// ([`StateStore::acquire_runner_lock`]) is opened at the same time as the store's own,
    /// instead of after it (a connection's authentication and backend start, ~5 ms, less before
    /// a run's first stage).
    pub async fn open_or_create_for_run(
        conn: ConnInfo,
        schema: &str,
        migration: &str,
    ) -> Result<PgStore> {
        PgStore::open_or_create_with(conn, schema, migration, true).await
    }

    async fn open_or_create_with(
        conn: ConnInfo,
        schema: &str,
        migration: &str,
        lock_session: bool,
    ) -> Result<PgStore> {
        // Not a direct connection to the store's database first: when it does not exist yet (a
        // first run, a run after `reset`) the server logs a FATAL for the attempt, which a DBA's
        // log monitoring sees. The maintenance database says whether it exists.
        let created = ensure_database(&conn).await?;
        let open = async {
            let client = conn
                .connect("state")
                .await
                .map_err(|e| e.context("checkpoint store"))?;
            migrate(&client, schema)
                .await
                .map_err(|e| e.context("checkpoint store"))?;
            Ok::<_, crate::error::Error>(client)
        };
        let lock = async {
            if lock_session {
                // A failure here is reported by the lock itself, which connects again.
                conn.connect(&runner_application(migration)).await.ok()
            } else {
                None
            }
        };
        let (client, lock) = tokio::join!(open, lock);
        let store = PgStore::with_client(conn.clone(), schema, migration, client?);
        *store.lock_session.lock().await = lock;
        if created {
            // `reset` drops only target databases pgferry created: remember this one.
            let record = serde_json::json!({
                "server": store.conn.server_key(),
                "database": store.conn.dbname(),
            });
            store
                .put_checkpoint(STORE_STAGE, CREATED_DATABASE_KEY, &record)
                .await?;
        }
        Ok(store)
    }

    pub fn conn_info(&self) -> &ConnInfo {
        &self.conn
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    fn with_client(conn: ConnInfo, schema: &str, migration: &str, client: Client) -> PgStore {
        PgStore {
            conn,
            schema: schema.to_string(),
            migration: migration.to_string(),
            client: Mutex::new(Arc::new(client)),
            run: std::sync::atomic::AtomicI64::new(0),
            lock_session: Mutex::new(None),
        }
    }

    /// A live client, reconnecting when the previous session was lost.
    async fn client(&self) -> Result<Arc<Client>> {
        let mut guard = self.client.lock().await;
        if guard.is_closed() {
            let c = self
                .conn
                .connect("state")
                .await
                .map_err(|e| e.context("checkpoint store"))?;
            *guard = Arc::new(c);
        }
        Ok(guard.clone())
    }

    fn t(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    /// Upserts counters in one statement; rows naming the same counter are combined with
    /// `combine` (an aggregate); `update` is the new value in terms of `c` (stored) and `excluded`.
    async fn write_counters(
        &self,
        rows: &[(String, String, i64)],
        combine: &str,
        update: &str,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {t} AS c (migration, scope, name, value) \
             SELECT $1, s, n, {combine}(v)::int8 FROM unnest($2::text[], $3::text[], $4::int8[]) AS u(s, n, v) GROUP BY s, n \
             ON CONFLICT (migration, scope, name) DO UPDATE SET value = {update}",
            t = self.t("counters")
        );
        let scopes: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        let names: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        let values: Vec<i64> = rows.iter().map(|r| r.2).collect();
        client
            .execute(&sql, &[&self.migration, &scopes, &names, &values])
            .await
            .map_err(|e| Error::pg(&e, "updating counters"))?;
        Ok(())
    }
}

#[async_trait]
impl StateStore for PgStore {
    async fn counter(&self, scope: &str, name: &str) -> Result<Option<i64>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT value FROM {} WHERE migration = $1 AND scope = $2 AND name = $3",
            self.t("counters")
        );
        let row = client
            .query_opt(&sql, &[&self.migration, &scope, &name])
            .await
            .map_err(|e| Error::pg(&e, format!("reading counter {name} of {scope}")))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn upsert_table(&self, t: &TableProgress) -> Result<()> {
        self.upsert_tables(std::slice::from_ref(t)).await
    }

    async fn upsert_tables(&self, progress: &[TableProgress]) -> Result<()> {
        if progress.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {} (migration, stage, database, table_name, state, rows, bytes, lsn, started_at, ended_at, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::pg_lsn, \
                     CASE WHEN $5 <> 'queued' THEN now() END, CASE WHEN $5 IN ('copied', 'failed') THEN now() END, $9) \
             ON CONFLICT (migration, stage, database, table_name) DO UPDATE SET \
                state = excluded.state, rows = excluded.rows, bytes = excluded.bytes, lsn = excluded.lsn, \
                started_at = CASE WHEN {t}.state = 'queued' OR {t}.started_at IS NULL THEN excluded.started_at ELSE {t}.started_at END, \
                ended_at = excluded.ended_at, error = excluded.error",
            self.t("tables"),
            t = self.t("tables"),
        );
        // One table: an unnamed statement (one round trip). Many: prepared once.
        let statement = if progress.len() == 1 {
            None
        } else {
            Some(
                client
                    .prepare(&sql)
                    .await
                    .map_err(|e| Error::pg(&e, "preparing the table progress statement"))?,
            )
        };
        // All at once on the one session: tokio-postgres pipelines them (one round trip, not one
        // per table: a database of many small tables records hundreds before its first copy).
        let states: Vec<&str> = progress.iter().map(|t| t.state.as_str()).collect();
        futures_util::future::try_join_all(progress.iter().zip(&states).map(|(t, state)| {
            let (statement, sql, client) = (&statement, &sql, &client);
            async move {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                    &self.migration,
                    &t.stage,
                    &t.database,
                    &t.table,
                    state,
                    &t.rows,
                    &t.bytes,
                    &t.lsn,
                    &t.error,
                ];
                match statement {
                    Some(st) => client.execute(st, &params).await,
                    None => client.execute(sql.as_str(), &params).await,
                }
                .map_err(|e| Error::pg(&e, format!("recording the progress of table {}", t.table)))
            }
        }))
        .await?;
        Ok(())
    }

    async fn tables(&self, stage: Option<&str>) -> Result<Vec<TableProgress>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT stage, database, table_name, state, rows, bytes, lsn::text, \
                    extract(epoch FROM started_at)::float8, extract(epoch FROM ended_at)::float8, error \
             FROM {} WHERE migration = $1 AND ($2::text IS NULL OR stage = $2) ORDER BY stage, database, table_name",
            self.t("tables")
        );
        let rows = client
            .query(&sql, &[&self.migration, &stage])
            .await
            .map_err(|e| Error::pg(&e, "reading table progress"))?;
        rows.iter()
            .map(|r| {
                Ok(TableProgress {
                    stage: r.get(0),
                    database: r.get(1),
                    table: r.get(2),
                    state: TableState::parse(r.get(3)),
                    rows: r.get(4),
                    bytes: r.get(5),
                    lsn: crate::pg::lsn::parse_opt(r.get(6))?,
                    started_at: r.get::<_, Option<f64>>(7).map(Timestamp),
                    ended_at: r.get::<_, Option<f64>>(8).map(Timestamp),
                    error: r.get(9),
                })
            })
            .collect()
    }

    /// Moves a position forward; a lower LSN than the stored one is ignored. Returns the stored LSN.
    async fn advance_position(&self, name: &str, lsn: Lsn) -> Result<Lsn> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {t} AS p (migration, name, lsn) VALUES ($1, $2, $3::text::pg_lsn) \
             ON CONFLICT (migration, name) DO UPDATE SET lsn = greatest(p.lsn, excluded.lsn), \
                updated_at = CASE WHEN excluded.lsn > p.lsn THEN now() ELSE p.updated_at END \
             RETURNING lsn::text",
            t = self.t("positions")
        );
        let row = client
            .query_one(&sql, &[&self.migration, &name, &lsn.to_string()])
            .await
            .map_err(|e| Error::pg(&e, format!("recording position {name}")))?;
        row.get::<_, String>(0).parse()
    }

    async fn position(&self, name: &str) -> Result<Option<Lsn>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT lsn::text FROM {} WHERE migration = $1 AND name = $2",
            self.t("positions")
        );
        let row = client
            .query_opt(&sql, &[&self.migration, &name])
            .await
            .map_err(|e| Error::pg(&e, "reading a position"))?;
        row.map(|r| r.get::<_, String>(0).parse()).transpose()
    }

    /// Stores an artifact (for example a schema dump section), replacing an older one.
    async fn put_artifact(&self, name: &str, content: &[u8]) -> Result<()> {
        let client = self.client().await?;
        let sha = hex::encode(Sha256::digest(content));
        let sql = format!(
            "INSERT INTO {} (migration, name, content, sha256) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (migration, name) DO UPDATE SET content = excluded.content, sha256 = excluded.sha256, created_at = now()",
            self.t("artifacts")
        );
        client
            .execute(&sql, &[&self.migration, &name, &content, &sha])
            .await
            .map_err(|e| Error::pg(&e, format!("storing artifact {name}")))?;
        Ok(())
    }

    async fn artifact(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT content FROM {} WHERE migration = $1 AND name = $2",
            self.t("artifacts")
        );
        let row = client
            .query_opt(&sql, &[&self.migration, &name])
            .await
            .map_err(|e| Error::pg(&e, format!("reading artifact {name}")))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Adds to a counter (scope: a database or table name, or "" for the migration).
    async fn add_counter(&self, scope: &str, name: &str, delta: i64) -> Result<i64> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {t} AS c (migration, scope, name, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (migration, scope, name) DO UPDATE SET value = c.value + excluded.value RETURNING value",
            t = self.t("counters")
        );
        let row = client
            .query_one(&sql, &[&self.migration, &scope, &name, &delta])
            .await
            .map_err(|e| Error::pg(&e, "updating a counter"))?;
        Ok(row.get(0))
    }

    async fn add_counters(&self, deltas: &[(String, String, i64)]) -> Result<()> {
        self.write_counters(deltas, "sum", "c.value + excluded.value")
            .await
    }

    async fn set_counters(&self, values: &[(String, String, i64)]) -> Result<()> {
        self.write_counters(values, "max", "excluded.value").await
    }

    async fn begin_run(&self, args: &str) -> Result<i64> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {} (migration, host, pid, version, args) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            self.t("runs")
        );
        let pid = std::process::id() as i32;
        let row = client
            .query_one(
                &sql,
                &[
                    &self.migration,
                    &hostname(),
                    &pid,
                    &env!("CARGO_PKG_VERSION"),
                    &args,
                ],
            )
            .await
            .map_err(|e| Error::pg(&e, "recording the run"))?;
        let id: i64 = row.get(0);
        self.run.store(id, std::sync::atomic::Ordering::Relaxed);
        Ok(id)
    }

    async fn end_run(&self, run: i64, outcome: &str) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "UPDATE {} SET ended_at = now(), outcome = $2 WHERE id = $1",
            self.t("runs")
        );
        client
            .execute(&sql, &[&run, &outcome])
            .await
            .map_err(|e| Error::pg(&e, "recording the end of the run"))?;
        Ok(())
    }

    async fn stages(&self) -> Result<Vec<StageRecord>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT stage, kind, state, fingerprint, attempts, extract(epoch FROM started_at)::float8, \
                    extract(epoch FROM ended_at)::float8, error, detail \
             FROM {} WHERE migration = $1 ORDER BY stage",
            self.t("stages")
        );
        let rows = client
            .query(&sql, &[&self.migration])
            .await
            .map_err(|e| Error::pg(&e, "reading stage states"))?;
        Ok(rows
            .iter()
            .map(|r| StageRecord {
                stage: r.get(0),
                kind: r.get(1),
                state: StageState::parse(r.get(2)).unwrap_or(StageState::Pending),
                fingerprint: r.get(3),
                attempts: r.get(4),
                started_at: r.get::<_, Option<f64>>(5).map(Timestamp),
                ended_at: r.get::<_, Option<f64>>(6).map(Timestamp),
                error: r.get(7),
                detail: r.get(8),
            })
            .collect())
    }

    async fn set_stage(
        &self,
        stage: &str,
        kind: &str,
        state: StageState,
        fingerprint: &str,
        error: Option<&str>,
    ) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {t} AS s (migration, stage, kind, state, fingerprint, attempts, started_at, ended_at, error) \
             VALUES ($1, $2, $3, $4, $5, CASE WHEN $4 = 'running' THEN 1 ELSE 0 END, \
                     CASE WHEN $4 = 'running' THEN now() END, CASE WHEN $4 IN ('done','failed') THEN now() END, $6) \
             ON CONFLICT (migration, stage) DO UPDATE SET \
                kind = excluded.kind, state = excluded.state, fingerprint = excluded.fingerprint, \
                attempts = s.attempts + CASE WHEN excluded.state = 'running' THEN 1 ELSE 0 END, \
                started_at = CASE WHEN excluded.state = 'running' THEN now() ELSE s.started_at END, \
                ended_at = CASE WHEN excluded.state IN ('done','failed') THEN now() WHEN excluded.state = 'running' THEN NULL ELSE s.ended_at END, \
                error = excluded.error, updated_at = now()",
            t = self.t("stages")
        );
        client
            .execute(
                &sql,
                &[
                    &self.migration,
                    &stage,
                    &kind,
                    &state.as_str(),
                    &fingerprint,
                    &error,
                ],
            )
            .await
            .map_err(|e| Error::pg(&e, format!("recording the state of stage `{stage}`")))?;
        Ok(())
    }

    async fn reset_stage(&self, stage: &str) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "BEGIN; DELETE FROM {st} WHERE migration = {m} AND stage = {s}; \
             DELETE FROM {cp} WHERE migration = {m} AND stage = {s}; \
             DELETE FROM {tb} WHERE migration = {m} AND stage = {s}; COMMIT;",
            st = self.t("stages"),
            cp = self.t("checkpoints"),
            tb = self.t("tables"),
            m = quote_literal(&self.migration),
            s = quote_literal(stage)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::pg(&e, format!("resetting stage `{stage}`")))?;
        Ok(())
    }

    async fn set_stage_detail(&self, stage: &str, detail: &serde_json::Value) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "UPDATE {} SET detail = $3, updated_at = now() WHERE migration = $1 AND stage = $2",
            self.t("stages")
        );
        client
            .execute(&sql, &[&self.migration, &stage, detail])
            .await
            .map_err(|e| Error::pg(&e, format!("recording the detail of stage `{stage}`")))?;
        Ok(())
    }

    async fn checkpoint(&self, stage: &str, key: &str) -> Result<Option<serde_json::Value>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT value FROM {} WHERE migration = $1 AND stage = $2 AND key = $3",
            self.t("checkpoints")
        );
        let row = client
            .query_opt(&sql, &[&self.migration, &stage, &key])
            .await
            .map_err(|e| Error::pg(&e, format!("reading a checkpoint of stage `{stage}`")))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn put_checkpoint(
        &self,
        stage: &str,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {} (migration, stage, key, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (migration, stage, key) DO UPDATE SET value = excluded.value, updated_at = now()",
            self.t("checkpoints")
        );
        client
            .execute(&sql, &[&self.migration, &stage, &key, value])
            .await
            .map_err(|e| Error::pg(&e, format!("writing a checkpoint of stage `{stage}`")))?;
        Ok(())
    }

    async fn event(&self, stage: Option<&str>, level: &str, message: &str) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {} (migration, run_id, stage, level, message) VALUES ($1, nullif($2::bigint, 0), $3, $4, $5)",
            self.t("events")
        );
        let run = self.run.load(std::sync::atomic::Ordering::Relaxed);
        client
            .execute(&sql, &[&self.migration, &run, &stage, &level, &message])
            .await
            .map_err(|e| Error::pg(&e, "writing the run log"))?;
        Ok(())
    }

    async fn add_sample(&self, x: &LagSample) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {} (migration, run_id, stage, database, at, lag_bytes, latency_ms, incoming, applied) \
             VALUES ($1, $2, $3, $4, to_timestamp($5), $6, $7, $8, $9)",
            self.t("samples")
        );
        let run = self.run.load(std::sync::atomic::Ordering::Relaxed);
        client
            .execute(
                &sql,
                &[
                    &self.migration,
                    &run,
                    &x.stage,
                    &x.database,
                    &x.at,
                    &x.lag_bytes,
                    &x.latency_ms,
                    &x.incoming,
                    &x.applied,
                ],
            )
            .await
            .map_err(|e| Error::pg(&e, "recording a cdc lag sample"))?;
        Ok(())
    }

    /// Records an operator request (such as `cutover`) for the running stage to pick up.
    async fn request(&self, name: &str, by: &str) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {} (migration, name, requested_by) VALUES ($1, $2, $3) ON CONFLICT (migration, name) DO NOTHING",
            self.t("requests")
        );
        client
            .execute(&sql, &[&self.migration, &name, &by])
            .await
            .map_err(|e| Error::pg(&e, format!("recording the {name} request")))?;
        Ok(())
    }

    async fn requested(&self, name: &str) -> Result<Option<String>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT to_char(requested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM {} WHERE migration = $1 AND name = $2",
            self.t("requests")
        );
        let row = client
            .query_opt(&sql, &[&self.migration, &name])
            .await
            .map_err(|e| Error::pg(&e, "reading requests"))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Every position of this migration: `(name, lsn)`.
    async fn positions(&self) -> Result<Vec<(String, Lsn)>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT name, lsn::text FROM {} WHERE migration = $1 ORDER BY 1",
            self.t("positions")
        );
        let rows = client
            .query(&sql, &[&self.migration])
            .await
            .map_err(|e| Error::pg(&e, "reading positions"))?;
        rows.iter()
            .map(|r| Ok((r.get(0), r.get::<_, String>(1).parse()?)))
            .collect()
    }

    async fn counters(&self) -> Result<Vec<(String, String, i64)>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT scope, name, value FROM {} WHERE migration = $1 ORDER BY 1, 2",
            self.t("counters")
        );
        let rows = client
            .query(&sql, &[&self.migration])
            .await
            .map_err(|e| Error::pg(&e, "reading counters"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// The run log, oldest first.
    async fn events(&self, limit: i64) -> Result<Vec<(Timestamp, Option<String>, String, String)>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT extract(epoch FROM at)::float8, stage, level, message FROM \
               (SELECT * FROM {} WHERE migration = $1 ORDER BY id DESC LIMIT $2) e ORDER BY id",
            self.t("events")
        );
        let rows = client
            .query(&sql, &[&self.migration, &limit])
            .await
            .map_err(|e| Error::pg(&e, "reading the run log"))?;
        Ok(rows
            .iter()
            .map(|r| (Timestamp(r.get(0)), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    async fn checkpoints(
        &self,
        stage: &str,
    ) -> Result<Vec<(String, serde_json::Value, Timestamp)>> {
        self.select_checkpoints(stage).await
    }

    async fn runs(&self, limit: i64) -> Result<Vec<RunRecord>> {
        self.select_runs(limit).await
    }

    async fn run_with_mode(&self, id: i64) -> Result<Option<(RunRecord, String)>> {
        self.select_run_with_mode(id).await
    }

    async fn samples(&self, run: i64) -> Result<Vec<LagSample>> {
        self.select_samples(run).await
    }

    async fn put_report(&self, run: i64, mode: &str, report: &serde_json::Value) -> Result<()> {
        self.insert_report(run, mode, report).await
    }

    async fn reports(
        &self,
        run: Option<i64>,
        mode: Option<&str>,
        limit: i64,
    ) -> Result<Vec<KeptReport>> {
        self.select_reports(run, mode, limit).await
    }

    fn describe(&self) -> String {
        format!("{} (schema {})", self.conn.describe(), self.schema)
    }

    fn home(&self) -> Option<(String, String)> {
        Some((self.conn.server_key(), self.conn.dbname().to_string()))
    }

    async fn acquire_runner_lock(&self) -> Result<std::result::Result<RunnerLock, LockHolder>> {
        self.try_runner_lock().await
    }

    async fn runner(&self) -> Result<Option<LockHolder>> {
        self.runner_holder().await
    }

    /// Brings an existing store up to the current version (`open` does not).
    async fn upgrade(&self) -> Result<()> {
        let client = self.client().await?;
        migrate(&client, &self.schema)
            .await
            .map_err(|e| e.context("checkpoint store"))
    }

    /// Records the mode of a run: in the run log (`runs.mode`) and as the mode of the checkpoints.
    async fn set_run_mode(&self, run: i64, mode: &str) -> Result<()> {
        let client = self.client().await?;
        let sql = format!("UPDATE {} SET mode = $2 WHERE id = $1", self.t("runs"));
        client
            .execute(&sql, &[&run, &mode])
            .await
            .map_err(|e| Error::pg(&e, "recording the mode of the run"))?;
        self.put_checkpoint(
            RUN_STAGE,
            MODE_KEY,
            &serde_json::json!({ "mode": mode, "run_id": run }),
        )
        .await
    }

    /// What `reset` keeps of this migration (runs, reports, cdc lag samples), as JSON rows.
    async fn kept_rows(&self) -> Result<serde_json::Value> {
        let client = self.client().await?;
        let mut out = serde_json::Map::new();
        for t in KEPT_TABLES {
            let sql = format!(
                "SELECT coalesce(jsonb_agg(to_jsonb(r)), '[]'::jsonb) FROM {} r WHERE migration = $1",
                self.t(t)
            );
            let rows: serde_json::Value = client
                .query_one(&sql, &[&self.migration])
                .await
                .map_err(|e| Error::pg(&e, format!("reading the {t} to keep")))?
                .get(0);
            out.insert(t.to_string(), rows);
        }
        Ok(serde_json::Value::Object(out))
    }

    /// Puts back what [`PgStore::kept_rows`] read (into a store created again by `reset`).
    async fn restore_kept(&self, kept: &serde_json::Value) -> Result<()> {
        let client = self.client().await?;
        for t in KEPT_TABLES {
            let Some(rows) = kept.get(*t) else { continue };
            let sql = format!(
                "INSERT INTO {t} SELECT * FROM jsonb_populate_recordset(NULL::{t}, $1) ON CONFLICT DO NOTHING",
                t = self.t(t)
            );
            client
                .execute(&sql, &[rows])
                .await
                .map_err(|e| Error::pg(&e, format!("restoring the kept {t}")))?;
        }
        let sql = format!(
            "SELECT setval(pg_get_serial_sequence($1, 'id'), greatest((SELECT max(id) FROM {}), 1))",
            self.t("runs")
        );
        client
            .execute(&sql, &[&self.t("runs")])
            .await
            .map_err(|e| Error::pg(&e, "restoring the run ids"))?;
        Ok(())
    }

    /// Removes this migration's stage states, checkpoints, progress, counters, positions,
    /// artifacts, run log and requests: everything but its runs, reports and cdc lag samples (kept
    /// so rehearsals can be compared) and the record of the database the store created.
    async fn forget_migration(&self) -> Result<()> {
        let client = self.client().await?;
        let m = quote_literal(&self.migration);
        let mut sql = String::from("BEGIN;");
        for t in [
            "stages",
            "tables",
            "counters",
            "positions",
            "artifacts",
            "events",
            "requests",
        ] {
            sql.push_str(&format!("DELETE FROM {} WHERE migration = {m};", self.t(t)));
        }
        sql.push_str(&format!(
            "DELETE FROM {} WHERE migration = {m} AND stage <> {};",
            self.t("checkpoints"),
            quote_literal(STORE_STAGE)
        ));
        sql.push_str("COMMIT;");
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::pg(&e, "removing the migration's checkpoints"))?;
        Ok(())
    }

    /// Other migrations kept in the same store.
    async fn other_migrations(&self) -> Result<Vec<String>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT DISTINCT migration FROM {} WHERE migration <> $1 ORDER BY 1",
            self.t("runs")
        );
        let rows = client
            .query(&sql, &[&self.migration])
            .await
            .map_err(|e| Error::pg(&e, "reading the checkpoint store"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}
