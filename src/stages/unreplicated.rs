//! What logical decoding cannot follow, brought over once the source is fenced (by the cutover,
//! after cdc has drained): unlogged tables are copied again, large objects are made equal, and
//! materialized views are refreshed on the target. Everything here reads the source as it is now,
//! which is final because no one writes to it any more.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

use tokio_util::sync::CancellationToken;

use super::Env;
use crate::error::{Error, Result};
use crate::pg::replication::ReplicationClient;
use crate::pg::{catalog, copy, large_objects};
use crate::plan::Database;
use crate::select::Selection;

/// What was brought over, for the cutover's record.
#[derive(Debug, Default, serde::Serialize)]
pub struct Resync {
    pub unlogged_tables: Vec<String>,
    pub unlogged_rows: u64,
    pub large_objects: u64,
    pub large_object_bytes: u64,
    pub materialized_views: Vec<String>,
}

/// Copies the unlogged tables and large objects of `db` again and refreshes its materialized views.
pub async fn resync(env: &Env, db: &Database, cancel: &CancellationToken) -> Result<Resync> {
    let mut out = Resync::default();
    let source_conn = env.source_for(db);
    let target_conn = env.target_for(db);
    let source = source_conn.connect("cutover resync").await?;
    let target = target_conn.connect("cutover resync").await?;
    let selection = Selection::new(&db.tables, &db.exclude);
    let skip = &env.plan.state.schema;

    // Unlogged tables (leaves), selected by their own or their root's name.
    let unlogged: HashSet<String> = catalog::tables(&source, skip)
        .await?
        .iter()
        .filter(|t| {
            t.unlogged && selection.selects(&t.selection_name().schema, &t.selection_name().name)
        })
        .map(|t| t.name.to_string())
        .collect();
    if !unlogged.is_empty() {
        let tables: Vec<copy::CopyTable> = copy::copy_tables(&source, skip)
            .await?
            .into_iter()
            .filter(|t| unlogged.contains(&t.name.to_string()))
            .collect();
        let mut from = ReplicationClient::connect_plain(&source_conn, "cutover resync").await?;
        let mut to = ReplicationClient::connect_plain(&target_conn, "cutover resync").await?;
        for t in &tables {
            if cancel.is_cancelled() {
                return Err(Error::interrupted());
            }
            let name = t.name.quoted();
            // Replica role: no triggers, no foreign-key checks (DELETE, not TRUNCATE, so tables that
            // reference it do not block). A role that may not set it deletes with checks on.
            let role = to
                .simple_query("SET session_replication_role = replica")
                .await
                .is_ok();
            to.simple_query(&format!("BEGIN; DELETE FROM ONLY {name}"))
                .await
                .map_err(|e| {
                    e.context(format!("emptying unlogged table {} on the target", t.name))
                })?;
            let progress = AtomicU64::new(0);
            let (rows, _bytes) = from
                .copy_into(
                    &t.copy_out_sql(None),
                    &mut to,
                    &t.copy_in_sql(false),
                    &progress,
                )
                .await
                .map_err(|e| e.context(format!("copying unlogged table {}", t.name)))?;
            to.simple_query("COMMIT")
                .await
                .map_err(|e| e.context(format!("committing unlogged table {}", t.name)))?;
            if role {
                let _ = to.simple_query("RESET session_replication_role").await;
            }
            tracing::info!(database = %db.name, table = %t.name, rows, "unlogged table copied again after the fence");
            out.unlogged_rows += rows;
            out.unlogged_tables.push(t.name.to_string());
        }
        from.close().await;
        to.close().await;
    }

    // Large objects, when either side has some.
    let any: i64 =
        catalog::large_object_count(&source).await? + catalog::large_object_count(&target).await?;
    if any > 0 {
        let (n, bytes) = large_objects::copy_all(&source, &target, cancel)
            .await
            .map_err(|e| e.context("copying large objects again after the fence"))?;
        out.large_objects = n;
        out.large_object_bytes = bytes;
    }

    // Materialized views that hold data, in creation order (a view built on another comes later).
    let views = target
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind = 'm' AND c.relispopulated ORDER BY c.oid",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing materialized views on the target"))?;
    for v in views {
        let (schema, name): (String, String) = (v.get(0), v.get(1));
        if !selection.selects(&schema, &name) {
            continue;
        }
        if cancel.is_cancelled() {
            return Err(Error::interrupted());
        }
        let q = crate::pg::ident::QualifiedName::new(schema, name);
        target
            .batch_execute(&format!("REFRESH MATERIALIZED VIEW {}", q.quoted()))
            .await
            .map_err(|e| {
                Error::pg(
                    &e,
                    format!("refreshing materialized view {q} on the target"),
                )
            })?;
        out.materialized_views.push(q.to_string());
    }
    Ok(out)
}
