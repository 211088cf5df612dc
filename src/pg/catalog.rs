//! What pgferry reads from a server's catalog: version and settings, tables with their sizes, keys,
//! replica identity and persistence, extensions, large objects, replication capacity. Read-only.

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::ident::QualifiedName;
use crate::pg::version::ServerVersion;
use crate::select::Selection;

/// One table (ordinary or partitioned; partitions are listed under their root).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableInfo {
    pub name: QualifiedName,
    /// `r` ordinary, `p` partitioned.
    pub kind: String,
    /// For a partition, the partitioned table at the top of its tree.
    pub root: Option<QualifiedName>,
    pub estimated_rows: i64,
    /// `pg_total_relation_size` (0 for a partitioned table); `None` when read by
    /// [`tables_unsized`].
    pub total_bytes: Option<i64>,
    pub has_primary_key: bool,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: String,
    pub unlogged: bool,
    pub can_select: bool,
    /// The key of its replica identity (primary key or `USING INDEX`) has a stored generated column:
    /// logical replication does not send generated columns (pgferry's publication never asks
    /// PostgreSQL 18 to), so cdc would get no key to find rows by.
    pub identity_generated: bool,
}

impl TableInfo {
    /// The name selection patterns are matched against: the partition root's for partitions.
    pub fn selection_name(&self) -> &QualifiedName {
        self.root.as_ref().unwrap_or(&self.name)
    }

    /// Can logical replication carry UPDATE and DELETE for this table?
    pub fn has_usable_identity(&self) -> bool {
        match self.replica_identity.as_str() {
            _ if self.identity_generated => false,
            "f" | "i" => true,
            "d" => self.has_primary_key,
            _ => false,
        }
    }
}

/// Server facts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerInfo {
    pub version_num: i32,
    pub version: String,
    pub is_superuser: bool,
    pub can_replicate: bool,
    pub can_create_db: bool,
    pub current_user: String,
}

impl ServerInfo {
    pub fn major(&self) -> i32 {
        self.version_num / 10000
    }

    /// The version with what it can do ([`ServerVersion`]).
    pub fn server_version(&self) -> ServerVersion {
        ServerVersion::from_num(u32::try_from(self.version_num).unwrap_or(0))
    }
}

pub async fn server_info(client: &Client) -> Result<ServerInfo> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
                    r.rolsuper, r.rolreplication, r.rolcreatedb, current_user::text \
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading server version and role"))?;
    Ok(ServerInfo {
        version_num: row.get(0),
        version: row.get(1),
        is_superuser: row.get(2),
        can_replicate: row.get(3),
        can_create_db: row.get(4),
        current_user: row.get(5),
    })
}

pub async fn setting(client: &Client, name: &str) -> Result<String> {
    let row = client
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .map_err(|e| Error::pg(&e, format!("reading setting {name}")))?;
    Ok(row.get(0))
}

/// Every user table of the database, partitions included, extension-owned tables and `skip_schema`
/// (the checkpoint store) excluded, with their sizes.
pub async fn tables(client: &Client, skip_schema: &str) -> Result<Vec<TableInfo>> {
    tables_where(client, skip_schema, true).await
}

/// [`tables`] without their sizes (`total_bytes` is `None`), for the stages that only need names,
/// kinds and keys: `pg_total_relation_size` opens every table, its TOAST table and its indexes, which
/// costs a fresh session ~60 ms on a database of 600 small tables (PostgreSQL's regression
/// database) against ~2 ms without it.
pub async fn tables_unsized(client: &Client, skip_schema: &str) -> Result<Vec<TableInfo>> {
    tables_where(client, skip_schema, false).await
}

async fn tables_where(client: &Client, skip_schema: &str, sizes: bool) -> Result<Vec<TableInfo>> {
    let size = if sizes {
        "CASE WHEN c.relkind = 'p' THEN 0 ELSE pg_catalog.pg_total_relation_size(c.oid) END"
    } else {
        "NULL::bigint"
    };
    let rows = client
        .query(
            &format!("SELECT n.nspname::text, c.relname::text, c.relkind::text, rn.nspname::text, rc.relname::text, \
                    greatest(c.reltuples, 0)::bigint, \
                    {size}, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    c.relreplident::text, c.relpersistence = 'u', \
                    pg_catalog.has_table_privilege(c.oid, 'SELECT'), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                              JOIN pg_catalog.pg_attribute ga ON ga.attrelid = i.indrelid AND ga.attnum = ANY (i.indkey) \
                             WHERE i.indrelid = c.oid AND ga.attgenerated <> '' \
                               AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_class rc ON c.relispartition AND rc.oid = pg_catalog.pg_partition_root(c.oid) \
             LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace \
             WHERE c.relkind IN ('r', 'p') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
               AND n.nspname <> $1 \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                               WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY 1, 2"),
            &[&skip_schema],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing tables"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let root = match (r.get::<_, Option<String>>(3), r.get::<_, Option<String>>(4)) {
                (Some(s), Some(n)) => Some(QualifiedName::new(s, n)),
                _ => None,
            };
            TableInfo {
                name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                kind: r.get(2),
                root,
                estimated_rows: r.get(5),
                total_bytes: r.get(6),
                has_primary_key: r.get(7),
                replica_identity: r.get(8),
                unlogged: r.get(9),
                can_select: r.get(10),
                identity_generated: r.get(11),
            }
        })
        .collect())
}

/// The tables a database entry selects.
pub fn select<'a>(all: &'a [TableInfo], selection: &Selection) -> Vec<&'a TableInfo> {
    all.iter()
        .filter(|t| {
            let n = t.selection_name();
            selection.selects(&n.schema, &n.name)
        })
        .collect()
}

/// Installed extensions (name, version), plpgsql excluded.
pub async fn extensions(client: &Client) -> Result<Vec<(String, String)>> {
    let rows = client
        .query(
            "SELECT extname::text, extversion FROM pg_catalog.pg_extension WHERE extname <> 'plpgsql' ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing extensions"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Extensions the server could install.
pub async fn available_extensions(client: &Client) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT name::text FROM pg_catalog.pg_available_extensions",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing available extensions"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn large_object_count(client: &Client) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_largeobject_metadata",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "counting large objects"))?;
    Ok(row.get(0))
}

/// Replication capacity: (max_replication_slots, slots in use, max_wal_senders, senders in use).
pub async fn replication_capacity(client: &Client) -> Result<(i64, i64, i64, i64)> {
    let row = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::bigint, \
                    (SELECT count(*) FROM pg_catalog.pg_replication_slots), \
                    current_setting('max_wal_senders')::bigint, \
                    (SELECT count(*) FROM pg_catalog.pg_stat_replication)",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading replication capacity"))?;
    Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
}

pub async fn database_exists(client: &Client, name: &str) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1)",
            &[&name],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking up a database"))?;
    Ok(row.get(0))
}

/// The system identifier and database name, which tell whether two connections reach the same
/// database.
pub async fn identity(client: &Client) -> Result<(String, String)> {
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_catalog.pg_control_system()), current_database()::text",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading the server's identity"))?;
    Ok((row.get(0), row.get(1)))
}
