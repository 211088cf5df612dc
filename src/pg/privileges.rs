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

/// Ends every other client session of `db` this role may end. Returns the pids it signalled.
pub async fn end_sessions(client: &Client, db: &str) -> Result<Vec<i32>> {
    // The sessions are chosen first (MATERIALIZED, 12+: every supported version), then signalled.
    let rows = client
        .query(
            &format!(
                "WITH s AS MATERIALIZED (SELECT a.pid {OTHER_SESSIONS} AND ({MAY_END})) \
                 SELECT pid FROM s WHERE pg_catalog.pg_terminate_backend(pid)"
            ),
            &[&db],
        )
        .await
        .map_err(|e| Error::pg(&e, "terminating the source database's sessions"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// How many of the sessions `pids` are still there.
pub async fn sessions_left(client: &Client, pids: &[i32]) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = ANY($1)",
            &[&pids],
        )
        .await
        .map_err(|e| Error::pg(&e, "waiting for the source's sessions to end"))?
        .get(0))
}

/// What the source role may do that a migration needs, when it is not a superuser.
#[derive(Debug, Clone, Default)]
pub struct SourceCapabilities {
    /// Selected tables whose owner's privileges the role does not have (`schema.table`): the
    /// publication (`FOR TABLE`) and replica identity changes need them.
    pub not_owned: Vec<String>,
    /// May create a publication in the database (CREATE on it).
    pub may_create_publication: bool,
    /// Has the database owner's privileges: may `ALTER DATABASE ... SET` (the fence).
    pub owns_database: bool,
    /// Member of `pg_signal_backend`: may end any non-superuser's session.
    pub signal_backend: bool,
}

/// Reads [`SourceCapabilities`] for `db` and the selected tables `tables` (`(schema, name)`).
pub async fn source_capabilities(
    client: &Client,
    db: &str,
    tables: &[(String, String)],
) -> Result<SourceCapabilities> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, n)| (s.as_str(), n.as_str())).unzip();
    let not_owned = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM unnest($1::text[], $2::text[]) AS s(schema_name, table_name) \
               JOIN pg_catalog.pg_namespace n ON n.nspname = s.schema_name \
               JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = s.table_name \
              WHERE NOT pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE') ORDER BY 1, 2",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| Error::pg(&e, "checking the ownership of the selected tables"))?
        .iter()
        .map(|r| {
            crate::pg::ident::QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1))
                .to_string()
        })
        .collect();
    let row = client
        .query_one(
            "SELECT pg_catalog.has_database_privilege(current_user, d.oid, 'CREATE'), \
                    pg_catalog.pg_has_role(current_user, d.datdba, 'USAGE'), \
                    pg_catalog.pg_has_role(current_user, 'pg_signal_backend', 'USAGE') \
               FROM pg_catalog.pg_database d WHERE d.datname = $1",
            &[&db],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("checking the privileges on database {db}")))?;
    Ok(SourceCapabilities {
        not_owned,
        may_create_publication: row.get(0),
        owns_database: row.get(1),
        signal_backend: row.get(2),
    })
}

/// The tables of user schemas (not `pgferry`'s state schemas: any schema whose tables the role
/// created is its own) whose owner's privileges the connected role does not have, `schema.table`.
pub async fn tables_not_owned(client: &Client) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind IN ('r', 'p') AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' \
                AND NOT pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE') ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "checking the ownership of the target's tables"))?
        .iter()
        .map(|r| {
            crate::pg::ident::QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1))
                .to_string()
        })
        .collect())
}
