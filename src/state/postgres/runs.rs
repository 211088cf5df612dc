//! Run history and what is kept of it: the runs, their reports and the cdc lag samples (what
//! `reset` keeps, so rehearsals can be compared), and reading a stage's checkpoints back for reports.

use super::PgStore;
use crate::error::{Error, Result};
use crate::state::{KeptReport, LagSample, RunRecord, Timestamp};

impl PgStore {
    /// The latest runs, newest first: (id, started, ended, host, pid, outcome).
    pub(super) async fn select_runs(&self, limit: i64) -> Result<Vec<RunRecord>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT id, extract(epoch FROM started_at)::float8, extract(epoch FROM ended_at)::float8, host, pid, outcome, args \
             FROM {} WHERE migration = $1 ORDER BY id DESC LIMIT $2",
            self.t("runs")
        );
        let rows = client
            .query(&sql, &[&self.migration, &limit])
            .await
            .map_err(|e| Error::pg(&e, "reading runs"))?;
        Ok(rows
            .iter()
            .map(|r| RunRecord {
                id: r.get(0),
                started_at: r.get::<_, Option<f64>>(1).map(Timestamp),
                ended_at: r.get::<_, Option<f64>>(2).map(Timestamp),
                host: r.get(3),
                pid: r.get(4),
                outcome: r.get(5),
                args: r.get(6),
            })
            .collect())
    }

    /// One run with its mode (`run` or `rehearsal`).
    pub(super) async fn select_run_with_mode(
        &self,
        id: i64,
    ) -> Result<Option<(RunRecord, String)>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT id, extract(epoch FROM started_at)::float8, extract(epoch FROM ended_at)::float8, host, pid, outcome, args, mode \
             FROM {} WHERE migration = $1 AND id = $2",
            self.t("runs")
        );
        let row = client
            .query_opt(&sql, &[&self.migration, &id])
            .await
            .map_err(|e| Error::pg(&e, "reading a run"))?;
        Ok(row.map(|r| {
            (
                RunRecord {
                    id: r.get(0),
                    started_at: r.get::<_, Option<f64>>(1).map(Timestamp),
                    ended_at: r.get::<_, Option<f64>>(2).map(Timestamp),
                    host: r.get(3),
                    pid: r.get(4),
                    outcome: r.get(5),
                    args: r.get(6),
                },
                r.get(7),
            )
        }))
    }

    /// The cdc lag samples of a run, oldest first.
    pub(super) async fn select_samples(&self, run: i64) -> Result<Vec<LagSample>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT stage, database, extract(epoch FROM at)::float8, lag_bytes, latency_ms, incoming, applied \
             FROM {} WHERE migration = $1 AND run_id = $2 ORDER BY at, database",
            self.t("samples")
        );
        let rows = client
            .query(&sql, &[&self.migration, &run])
            .await
            .map_err(|e| Error::pg(&e, "reading the cdc lag samples"))?;
        Ok(rows
            .iter()
            .map(|r| LagSample {
                stage: r.get(0),
                database: r.get(1),
                at: r.get(2),
                lag_bytes: r.get(3),
                latency_ms: r.get(4),
                incoming: r.get(5),
                applied: r.get(6),
            })
            .collect())
    }

    /// Every checkpoint of a stage: `(key, value, updated at)`, by key.
    pub(super) async fn select_checkpoints(
        &self,
        stage: &str,
    ) -> Result<Vec<(String, serde_json::Value, Timestamp)>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT key, value, extract(epoch FROM updated_at)::float8 FROM {} \
             WHERE migration = $1 AND stage = $2 ORDER BY key",
            self.t("checkpoints")
        );
        let rows = client
            .query(&sql, &[&self.migration, &stage])
            .await
            .map_err(|e| Error::pg(&e, format!("reading the checkpoints of stage `{stage}`")))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), Timestamp(r.get(2))))
            .collect())
    }

    /// Keeps a run's report (replacing an earlier one of the same run).
    pub(super) async fn insert_report(
        &self,
        run: i64,
        mode: &str,
        report: &serde_json::Value,
    ) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "INSERT INTO {} (migration, run_id, mode, report) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (migration, run_id) DO UPDATE SET mode = excluded.mode, report = excluded.report, created_at = now()",
            self.t("reports")
        );
        client
            .execute(&sql, &[&self.migration, &run, &mode, report])
            .await
            .map_err(|e| Error::pg(&e, "keeping the run report"))?;
        Ok(())
    }

    /// Kept reports, newest first; only run `run` and runs of `mode` when given. None from a
    /// store older than the reports table (read-only commands do not upgrade it).
    pub(super) async fn select_reports(
        &self,
        run: Option<i64>,
        mode: Option<&str>,
        limit: i64,
    ) -> Result<Vec<KeptReport>> {
        let client = self.client().await?;
        let present: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.t("reports")])
            .await
            .map_err(|e| Error::pg(&e, "reading the checkpoint store"))?
            .get(0);
        if !present {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT run_id, mode, extract(epoch FROM created_at)::float8, report FROM {} \
              WHERE migration = $1 AND ($2::int8 IS NULL OR run_id = $2) AND ($3::text IS NULL OR mode = $3) \
              ORDER BY created_at DESC, run_id DESC LIMIT $4",
            self.t("reports")
        );
        let rows = client
            .query(&sql, &[&self.migration, &run, &mode, &limit])
            .await
            .map_err(|e| Error::pg(&e, "reading the kept run reports"))?;
        Ok(rows
            .iter()
            .map(|r| KeptReport {
                run_id: r.get(0),
                mode: r.get(1),
                created_at: Timestamp(r.get(2)),
                report: r.get(3),
            })
            .collect())
    }
}
