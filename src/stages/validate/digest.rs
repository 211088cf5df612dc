//! Digests computed inside each server, so no row travels to pgferry unless it differs.
//!
//! A chunk's digest is its row count and the sum (as `numeric`, no overflow) of a 64-bit hash of
//! every row's text: `count(*), sum(hashtextextended(ROW(cols)::text, 0))`. A sum is
//! order-independent, so neither side sorts anything, and a table without a key gets the same
//! digest over the whole table (a multiset digest). Any single changed, missing or added row
//! changes the digest unless two 64-bit hashes collide (about 2^-64 per row); the hash is the same
//! function as the `hashtext` of the usual whole-table baseline, on 64 bits.

use std::collections::BTreeMap;

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::chunk::{self, Span};
use super::tables::ValTable;
use crate::error::{Error, Result};

/// One chunk's digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Digest {
    pub rows: i64,
    /// The hash sum, as text (a numeric).
    pub sum: String,
}

/// The digests of the chunks of `span` on one side (chunks without rows are absent).
pub async fn span_digests(
    client: &Client,
    t: &ValTable,
    bounds: &[String],
    span: Span,
    exclude_generated: bool,
) -> Result<BTreeMap<usize, Digest>> {
    let inner = chunk::inner(bounds, span);
    let multi = !inner.is_empty() && t.key_type.is_some();
    let first_param = if multi { 2 } else { 1 };
    let range = chunk::range(t, bounds, span, first_param);
    // One chunk: a plain aggregate (one row, counting 0 when the range is empty).
    let sql = if multi {
        format!(
            "SELECT ({})::int AS chunk, count(*), coalesce(sum(pg_catalog.hashtextextended({}, 0)), 0)::text \
             FROM ONLY {}{} GROUP BY 1",
            chunk::bucket_expr(t, span, 1),
            t.row_text(exclude_generated),
            t.name.quoted(),
            range.filter
        )
    } else {
        format!(
            "SELECT {}::int AS chunk, count(*), coalesce(sum(pg_catalog.hashtextextended({}, 0)), 0)::text \
             FROM ONLY {}{}",
            span.first,
            t.row_text(exclude_generated),
            t.name.quoted(),
            range.filter
        )
    };
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if multi {
        params.push(&inner);
    }
    params.extend(range.params());
    let rows = client
        .query(&sql, &params)
        .await
        .map_err(|e| Error::pg(&e, format!("computing the digests of {}", t.name)))?;
    let mut out = BTreeMap::new();
    for r in &rows {
        let c: i32 = r.get(0);
        if r.get::<_, i64>(1) == 0 {
            continue;
        }
        out.insert(
            c.max(0) as usize,
            Digest {
                rows: r.get(1),
                sum: r.get(2),
            },
        );
    }
    Ok(out)
}

/// The row count of a table (count mode).
pub async fn count(client: &Client, t: &ValTable) -> Result<i64> {
    let row = client
        .query_one(
            &format!("SELECT count(*) FROM ONLY {}", t.name.quoted()),
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("counting the rows of {}", t.name)))?;
    Ok(row.get(0))
}
