//! What a table copy needs: the `COPY ... TO STDOUT` and `COPY ... FROM STDIN` statements (binary
//! format when every column's type can be sent and received in binary, text otherwise), and the
//! catalog facts — the leaf tables to copy, their columns (generated columns excluded), sizes and an
//! integer primary key to split by. The data itself is forwarded by
//! [`crate::pg::wire::WireClient::copy_into`].

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::ident::{QualifiedName, quote_ident};

/// One table with rows to copy (an ordinary table or a leaf partition).
#[derive(Debug, Clone)]
pub struct CopyTable {
    pub name: QualifiedName,
    /// The partitioned table at the top of its tree, for partitions.
    pub root: Option<QualifiedName>,
    /// Columns to copy, in order: generated columns are left to the target to compute.
    pub columns: Vec<String>,
    /// Every copied column's type has binary send/receive functions.
    pub binary: bool,
    /// Size of the main fork, in bytes.
    pub bytes: i64,
    pub estimated_rows: i64,
    /// A single-column integer primary key, usable to split the table into ranges.
    pub int_key: Option<String>,
}

impl CopyTable {
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// ` (a, b)` after the table name in a COPY, or nothing for a table with no column to copy
    /// (no columns at all, or only generated ones): `COPY t () ...` is a syntax error, while
    /// `COPY t ...` of such a table carries one empty tuple per row, so the row count survives.
    fn copy_columns(&self) -> String {
        if self.columns.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.column_list())
        }
    }

    fn format(&self) -> &'static str {
        if self.binary { "binary" } else { "text" }
    }

    /// `COPY (SELECT ...) TO STDOUT` for the rows matching `filter` (a SQL condition built by the
    /// caller from quoted names and numbers only), or the whole table.
    pub fn copy_out_sql(&self, filter: Option<&str>) -> String {
        match filter {
            None => format!(
                "COPY {}{} TO STDOUT (FORMAT {})",
                self.name.quoted(),
                self.copy_columns(),
                self.format()
            ),
            Some(f) => format!(
                "COPY (SELECT {} FROM ONLY {} WHERE {f}) TO STDOUT (FORMAT {})",
                self.column_list(),
                self.name.quoted(),
                self.format()
            ),
        }
    }

    pub fn copy_in_sql(&self, freeze: bool) -> String {
        format!(
            "COPY {}{} FROM STDIN (FORMAT {}{})",
            self.name.quoted(),
            self.copy_columns(),
            self.format(),
            if freeze { ", FREEZE" } else { "" }
        )
    }
}

/// The leaf tables of a database with their copy facts (every schema but the system ones and
/// `skip_schema`). Call inside the snapshot the copy uses, so sizes and columns match it.
pub async fn copy_tables(client: &Client, skip_schema: &str) -> Result<Vec<CopyTable>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, rn.nspname::text, rc.relname::text, \
                    coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attgenerated = ''), '{}'), \
                    coalesce(bool_and(t.typsend <> 0 AND t.typreceive <> 0) FILTER (WHERE a.attgenerated = ''), true), \
                    pg_catalog.pg_relation_size(c.oid), greatest(c.reltuples, 0)::bigint, \
                    (SELECT ka.attname::text FROM pg_catalog.pg_index i \
                       JOIN pg_catalog.pg_attribute ka ON ka.attrelid = i.indrelid AND ka.attnum = i.indkey[0] \
                      WHERE i.indrelid = c.oid AND i.indisprimary AND i.indnatts = 1 \
                        AND ka.atttypid IN ('pg_catalog.int2'::regtype, 'pg_catalog.int4'::regtype, 'pg_catalog.int8'::regtype)) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_class rc ON c.relispartition AND rc.oid = pg_catalog.pg_partition_root(c.oid) \
             LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace \
             WHERE c.relkind = 'r' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
               AND n.nspname <> $1 \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                               WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
             GROUP BY c.oid, n.nspname, c.relname, rn.nspname, rc.relname, c.reltuples \
             ORDER BY 1, 2",
            &[&skip_schema],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing the tables to copy"))?;
    Ok(rows
        .iter()
        .map(|r| CopyTable {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            root: match (r.get::<_, Option<String>>(2), r.get::<_, Option<String>>(3)) {
                (Some(s), Some(n)) => Some(QualifiedName::new(s, n)),
                _ => None,
            },
            columns: r.get(4),
            binary: r.get(5),
            bytes: r.get(6),
            estimated_rows: r.get(7),
            int_key: r.get(8),
        })
        .collect())
}

/// The tables of `tables` whose copied columns (by name; generated ones left out) differ in
/// the target database, or that it lacks: one line each, at most `limit` lines. For a target made
/// from the source's dump, a difference is DDL that ran on the source after the dump.
pub async fn columns_differ(
    target: &Client,
    tables: &[CopyTable],
    limit: usize,
) -> Result<Vec<String>> {
    let (schemas, names): (Vec<String>, Vec<String>) = tables
        .iter()
        .map(|t| (t.name.schema.clone(), t.name.name.clone()))
        .unzip();
    let rows = target
        .query(
            "SELECT u.s, u.t, coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attgenerated = ''), '{}'), \
                    bool_or(c.oid IS NOT NULL) \
               FROM unnest($1::text[], $2::text[]) AS u(s, t) \
               LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = u.s \
               LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.t AND c.relkind IN ('r', 'p') \
               LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
              GROUP BY u.s, u.t",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading the target's columns of the tables to copy"))?;
    let on_target: std::collections::HashMap<(String, String), (Vec<String>, bool)> = rows
        .iter()
        .map(|r| {
            (
                (r.get(0), r.get(1)),
                (r.get(2), r.get::<_, Option<bool>>(3) == Some(true)),
            )
        })
        .collect();
    let mut out = Vec::new();
    for t in tables {
        let key = (t.name.schema.clone(), t.name.name.clone());
        let line = match on_target.get(&key) {
            Some((_, false)) | None => format!("{}: not in the target database", t.name),
            Some((cols, true)) => {
                // COPY names its columns: their order may differ (inheritance children and
                // partitions are dumped in their parent's order).
                let only = |a: &[String], b: &[String]| -> Vec<String> {
                    a.iter().filter(|c| !b.contains(c)).cloned().collect()
                };
                let (source_only, target_only) = (only(&t.columns, cols), only(cols, &t.columns));
                if source_only.is_empty() && target_only.is_empty() {
                    continue;
                }
                let mut line = format!("{}:", t.name);
                if !source_only.is_empty() {
                    line.push_str(&format!(
                        " only the source has ({})",
                        source_only.join(", ")
                    ));
                }
                if !target_only.is_empty() {
                    line.push_str(&format!(
                        " only the target has ({})",
                        target_only.join(", ")
                    ));
                }
                line
            }
        };
        if out.len() < limit {
            out.push(line);
        } else {
            out.push("...".into());
            break;
        }
    }
    Ok(out)
}
