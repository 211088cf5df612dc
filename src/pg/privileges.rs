//! What the connected role may do, for roles that are not superusers (managed services): which
//! sessions of a database it may end, and how the cutover's fence ends them.
//!
//! `pg_stat_activity` hides most columns of other roles' sessions from a role without
//! `pg_read_all_stats` (a managed service's admin usually lacks it): `backend_type` is NULL there,
//! while `datname`, `pid` and `usesysid` stay visible. So a client session is one whose
//! `backend_type` is `client backend`, or, hidden, one that has a role (background processes
//! have none). A role may end a session of a role whose privileges it has, or, as a member of
//! `pg_signal_backend`, of any role but a superuser; a superuser may end any.

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The other client sessions of database `$1`, whether visible to this role or not.
const OTHER_SESSIONS: &str = "FROM pg_catalog.pg_stat_activity a LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid \
     WHERE a.datname = $1 AND a.pid <> pg_catalog.pg_backend_pid() \
       AND (a.backend_type = 'client backend' OR (a.backend_type IS NULL AND a.usesysid IS NOT NULL))";

/// Whether this role may end the session of `a`/`r` (a SQL expression).
const MAY_END: &str = "(SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) \
     OR (r.oid IS NOT NULL AND pg_catalog.pg_has_role(current_user, r.oid, 'USAGE')) \
     OR (NOT coalesce(r.rolsuper, true) AND pg_catalog.pg_has_role(current_user, 'pg_signal_backend', 'USAGE'))";

/// The roles of the other client sessions of `db` this role may not end, with their count.
pub async fn sessions_it_cannot_end(client: &Client, db: &str) -> Result<Vec<(String, i64)>> {
    let rows = client
        .query(
            &format!(
                "SELECT coalesce(r.rolname::text, a.usesysid::text), count(*) {OTHER_SESSIONS} AND NOT ({MAY_END}) GROUP BY 1 ORDER BY 1"
            ),
            &[&db],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("listing the sessions of database {db}")))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Ends every other client session of `db` this role may end. Returns how many it signalled.
pub async fn end_sessions(client: &Client, db: &str) -> Result<i64> {
    Ok(client
        .query_one(
            &format!(
                "SELECT count(pg_catalog.pg_terminate_backend(a.pid)) {OTHER_SESSIONS} AND ({MAY_END})"
            ),
            &[&db],
        )
        .await
        .map_err(|e| Error::pg(&e, "terminating the source database's sessions"))?
        .get(0))
}

/// How many other client sessions `db` still has.
pub async fn other_sessions(client: &Client, db: &str) -> Result<i64> {
    Ok(client
        .query_one(&format!("SELECT count(*) {OTHER_SESSIONS}"), &[&db])
        .await
        .map_err(|e| Error::pg(&e, "waiting for the source's sessions to end"))?
        .get(0))
}
