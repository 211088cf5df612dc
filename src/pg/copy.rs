//! Streaming table data from one server to another with COPY: `COPY ... TO STDOUT` on the source
//! piped into `COPY ... FROM STDIN` on the target, chunk by chunk, with no intermediate file. Binary
//! format when every column's type can be sent and received in binary, text otherwise. Also the
//! catalog facts a copy needs: the leaf tables to copy, their columns (generated columns excluded),
//! sizes and an integer primary key to split by.

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
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

    fn format(&self) -> &'static str {
        if self.binary { "binary" } else { "text" }
    }

    /// `COPY (SELECT ...) TO STDOUT` for the rows matching `filter` (a SQL condition built by the
    /// caller from quoted names and numbers only), or the whole table.
    pub fn copy_out_sql(&self, filter: Option<&str>) -> String {
        match filter {
            None => format!(
                "COPY {} ({}) TO STDOUT (FORMAT {})",
                self.name.quoted(),
                self.column_list(),
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
            "COPY {} ({}) FROM STDIN (FORMAT {}{})",
            self.name.quoted(),
            self.column_list(),
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

/// Streams one COPY from `source` into `target`. Both sessions must already be in the transactions
/// the caller wants. Adds the bytes moved to `progress` as they go; returns (rows, bytes).
pub async fn pipe(
    source: &Client,
    target: &Client,
    copy_out: &str,
    copy_in: &str,
    progress: &AtomicU64,
) -> Result<(u64, u64)> {
    let stream = source
        .copy_out(copy_out)
        .await
        .map_err(|e| Error::pg(&e, "starting COPY TO on the source"))?;
    let sink = target
        .copy_in::<_, bytes::Bytes>(copy_in)
        .await
        .map_err(|e| Error::pg(&e, "starting COPY FROM on the target"))?;
    futures_util::pin_mut!(stream);
    futures_util::pin_mut!(sink);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::pg(&e, "reading COPY data from the source"))?;
        let n = chunk.len() as u64;
        bytes += n;
        progress.fetch_add(n, Ordering::Relaxed);
        sink.feed(chunk)
            .await
            .map_err(|e| Error::pg(&e, "writing COPY data to the target"))?;
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(|e| Error::pg(&e, "finishing COPY on the target"))?;
    Ok((rows, bytes))
}
