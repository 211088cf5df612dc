//! The source's planner statistics carried over to the target, where the versions allow it
//! ([`version::statistics_carry_over`]: source and target PostgreSQL 18 or newer, pg_dump 18):
//! once post_data has built the indexes (an index build resets the table's page and row counts),
//! pg_dump `--statistics-only` writes the source's statistics as calls of
//! `pg_restore_relation_stats` and `pg_restore_attribute_stats`, and those of the relations that
//! exist on the target (tables, partitions, materialized views, indexes) are applied there in one
//! transaction. The target has statistics from the end of post_data on, without ANALYZE; the
//! cutover's ANALYZE ([`super::analyze`]) then covers only the tables not carried over. Recorded in
//! post_data's checkpoint `statistics:<db>`.

use std::collections::HashSet;
use std::time::Instant;

use tokio::process::Command;

use super::{Env, StageContext};
use crate::error::{Error, Result};
use crate::pg::dump;
use crate::pg::ident::quote_ident;
use crate::pg::tools::{self, PrivateTempDir};
use crate::pg::version;
use crate::plan::Database;
use crate::plan::StageKind;
use crate::state::Timestamp;

/// The checkpoint key (of the post_data stage) recording the statistics carried over for `db`.
pub fn checkpoint_key(db: &str) -> String {
    format!("statistics:{db}")
}

/// The tables (`schema.name`, as pg_restore lists them) whose statistics a post_data stage of the
/// plan carried over to the target for `db`, and when that finished (Unix seconds).
pub async fn carried_tables(
    env: &Env,
    cx: &StageContext,
    db: &Database,
) -> Result<(HashSet<String>, Option<f64>)> {
    let mut out = HashSet::new();
    let mut finished = None;
    for stage in env
        .plan
        .stages
        .iter()
        .filter(|s| s.kind == StageKind::PostData)
    {
        if let Some(v) = cx
            .store
            .checkpoint(&stage.id, &checkpoint_key(&db.name))
            .await?
            && let Some(tables) = v.get("tables").and_then(serde_json::Value::as_array)
        {
            out.extend(tables.iter().filter_map(|t| t.as_str().map(str::to_string)));
            finished = v
                .get("finished_at")
                .and_then(serde_json::Value::as_f64)
                .or(finished);
        }
    }
    Ok((out, finished))
}

/// Carries the source's statistics of `db` over to the target when the versions allow it; returns
/// what the checkpoint records (`carried`, and the reason when not).
pub async fn carry_over(env: &Env, cx: &StageContext, db: &Database) -> Result<serde_json::Value> {
    let started = Instant::now();
    let purpose = format!("post_data {} statistics", cx.stage);
    let source_conn = env.source_for(db);
    let (_, source_version) = source_conn.connect_versioned(&purpose).await?;
    let (target, target_version) = env.target_for(db).connect_versioned(&purpose).await?;
    let tools = tokio::task::spawn_blocking(tools::find)
        .await
        .map_err(|e| Error::permanent(format!("internal: {e}")))??;
    if let Err(reason) =
        version::statistics_carry_over(source_version, target_version, tools.version_num)
    {
        tracing::info!(stage = %cx.stage, database = %db.name, "planner statistics not carried over ({reason}): the cutover gathers them with ANALYZE");
        return Ok(serde_json::json!({ "carried": false, "reason": reason }));
    }

    let dir = PrivateTempDir::new("pgferry-statistics")?;
    let archive = dir.path().join("statistics.dump");
    let mut cmd = Command::new(tools.pg_dump());
    cmd.arg("--statistics-only")
        .arg("--format=custom")
        .arg("--no-password")
        .arg("--no-sync")
        .arg(format!(
            "--exclude-schema={}",
            quote_ident(&env.plan.state.schema)
        ))
        .arg(format!("--file={}", archive.display()));
    source_conn.configure_child(&mut cmd, &purpose);
    let out = tools::run_tool(cmd, None, &cx.cancel).await?;
    if !out.status.success() {
        return Err(tools::tool_failure(
            "pg_dump",
            &out,
            &format!(
                "dumping the planner statistics of source database `{}`",
                db.name
            ),
        ));
    }
    let mut cmd = Command::new(tools.pg_restore());
    cmd.arg("--list").arg(&archive);
    let out = tools::run_tool(cmd, None, &cx.cancel).await?;
    if !out.status.success() {
        return Err(tools::tool_failure(
            "pg_restore",
            &out,
            &format!(
                "listing the statistics dump of source database `{}`",
                db.name
            ),
        ));
    }
    let toc = String::from_utf8_lossy(&out.stdout).into_owned();

    // The relations of the target, `schema name` as pg_restore lists them, and which are tables.
    let rows = target
        .query(
            "SELECT n.nspname || ' ' || c.relname, c.relkind IN ('r', 'p', 'm') \
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind IN ('r', 'p', 'm', 'i', 'I') AND n.nspname <> $1",
            &[&env.plan.state.schema],
        )
        .await
        .map_err(|e| {
            Error::pg(
                &e,
                format!("listing the relations of target database `{}`", db.target),
            )
        })?;
    let relations: std::collections::HashMap<String, bool> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut list = String::new();
    let mut tables: Vec<String> = Vec::new();
    let mut relations_carried = 0usize;
    for line in toc.lines() {
        let Some(entry) = dump::TocEntry::parse(line) else {
            continue;
        };
        let Some(name) = entry.rest.strip_prefix("STATISTICS DATA ") else {
            continue;
        };
        let name = name.trim_end();
        if let Some(&is_table) = relations.get(name) {
            list.push_str(line);
            list.push('\n');
            relations_carried += 1;
            if is_table {
                tables.push(name.replacen(' ', ".", 1));
            }
        }
    }
    let list_file = dir.path().join("statistics.list");
    std::fs::write(&list_file, &list)
        .map_err(|e| Error::permanent(format!("writing {}: {e}", list_file.display())))?;
    let script = dir.path().join("statistics.sql");
    let mut cmd = Command::new(tools.pg_restore());
    cmd.arg(format!("--use-list={}", list_file.display()))
        .arg(format!("--file={}", script.display()))
        .arg(&archive);
    let out = tools::run_tool(cmd, None, &cx.cancel).await?;
    if !out.status.success() {
        return Err(tools::tool_failure(
            "pg_restore",
            &out,
            &format!("writing the statistics of source database `{}`", db.name),
        ));
    }
    let sql = std::fs::read_to_string(&script)
        .map_err(|e| Error::permanent(format!("reading {}: {e}", script.display())))?;
    // psql's `\restrict KEY` / `\unrestrict KEY` lines are for psql; the rest is SQL.
    let sql: String = sql
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .map(|l| format!("{l}\n"))
        .collect();
    let apply = format!("BEGIN;\nSET LOCAL statement_timeout = 0;\n{sql}\nCOMMIT;");
    tokio::select! {
        r = target.batch_execute(&apply) => {
            r.map_err(|e| {
                Error::pg(&e, format!("restoring the source's planner statistics on target database `{}`", db.target))
                    .hint("the statistics come from pg_dump --statistics-only of the source; fix the cause and run again (the cutover's ANALYZE gathers them otherwise)")
            })?;
        }
        _ = cx.cancel.cancelled() => {
            let _ = target.cancel_token().cancel_query(tokio_postgres::NoTls).await;
            return Err(Error::interrupted());
        }
    }
    // A table the source had never analyzed has its row count carried over but no column
    // statistics: it counts as carried only with `pg_stats` rows on the target (an empty table has
    // none either way; the cutover's ANALYZE of it costs nothing).
    let with_stats: HashSet<String> = target
        .query(
            "SELECT DISTINCT schemaname || '.' || tablename FROM pg_catalog.pg_stats WHERE schemaname <> $1",
            &[&env.plan.state.schema],
        )
        .await
        .map_err(|e| {
            Error::pg(&e, format!("reading the statistics of target database `{}`", db.target))
        })?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tables.retain(|t| with_stats.contains(t));
    let seconds = started.elapsed().as_secs_f64();
    let msg = format!(
        "database `{}`: the source's planner statistics carried over to the target ({} tables, {} relations in all) in {seconds:.1}s, without ANALYZE",
        db.name,
        tables.len(),
        relations_carried
    );
    tracing::info!(stage = %cx.stage, "{msg}");
    cx.store.event(Some(&cx.stage), "info", &msg).await?;
    tables.sort();
    Ok(serde_json::json!({
        "carried": true,
        "relations": relations_carried,
        "tables": tables,
        "seconds": seconds,
        "finished_at": Timestamp::now().0,
    }))
}
