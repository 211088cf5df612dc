//! Planner statistics on the target before the cutover fences the source: `ANALYZE` of every
//! selected table (a partitioned table's root, which also analyzes its partitions), on a session
//! of its own, while the cutover waits for its approval or its lag condition. pg_dump carries no
//! statistics before PostgreSQL 18, so without this the application's first queries after the
//! switch would run on default estimates. The cutover runs it whatever stages the plan lists
//! (`analyze = false` on the cutover turns it off), records it in its checkpoint `analyze:<db>`
//! (a re-run does not analyze again) and fences only once it is done.

use std::collections::HashSet;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::Env;
use crate::error::{Error, Result};
use crate::plan::Database;
use crate::state::Timestamp;

/// The checkpoint key of the cutover stage recording the statistics of `db`.
pub fn checkpoint_key(db: &str) -> String {
    format!("analyze:{db}")
}

/// Analyzes every selected table of `db` on the target; returns what the checkpoint records.
/// Tables in `carried` (`schema.name`: their statistics were carried over from the source by
/// post_data, see [`super::statistics`]) are left out.
pub async fn analyze(
    env: &Env,
    db: &Database,
    carried: &HashSet<String>,
    cancel: &CancellationToken,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let target = env.target_for(db).connect("cutover analyze").await?;
    // Roots and plain tables: ANALYZE of a partitioned table also analyzes its partitions.
    let tables: Vec<_> = env
        .selected_tables(&target, db)
        .await?
        .into_iter()
        .filter(|t| t.root.is_none())
        .collect();
    let (skipped, tables): (Vec<_>, Vec<_>) = tables
        .into_iter()
        .partition(|t| carried.contains(&format!("{}.{}", t.name.schema, t.name.name)));
    for t in &tables {
        let sql = format!("ANALYZE {}", t.name.quoted());
        tokio::select! {
            r = target.batch_execute(&sql) => {
                r.map_err(|e| {
                    Error::pg(&e, format!("gathering planner statistics (ANALYZE) of table {} on target database `{}`", t.name, db.target))
                        .hint("the cutover waits for the statistics before it fences the source; fix the cause and run again, or set `analyze = false` on the cutover stage to go without them")
                })?;
            }
            _ = cancel.cancelled() => {
                let _ = target.cancel_token().cancel_query(tokio_postgres::NoTls).await;
                return Err(Error::interrupted());
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(database = %db.name, tables = tables.len(), carried_over = skipped.len(), "planner statistics gathered on the target (ANALYZE) in {seconds:.1}s");
    Ok(serde_json::json!({
        "tables": tables.len(),
        "carried_over": skipped.len(),
        "seconds": seconds,
        "finished_at": Timestamp::now().0,
    }))
}
