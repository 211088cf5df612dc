//! Narrowing a mismatched chunk down to rows, inside the same two snapshots.
//!
//! - A table with a key: each side lists the chunk's keys (as JSON text) with a row hash (checksum
//!   mode) or with every compared column's text (full mode). Keys only on the source are
//!   `missing`, only on the target `extra`; keys whose hashes differ are fetched with their columns
//!   from both sides to name the `different` columns.
//! - A table without a key: both sides' rows as JSON text with their multiplicity, diffed as
//!   multisets (rows the source has more of are `missing`, the target more of `extra`).

use std::collections::BTreeMap;

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::chunk::{self, Span};
use super::report::{Mismatch, MismatchKind};
use super::tables::ValTable;
use crate::error::{Error, Result};
use crate::pg::ident::quote_ident;

/// What one side holds of a chunk, by key JSON text.
type Rows<T> = BTreeMap<String, T>;

/// The mismatches of chunk `c` of a keyed table.
#[allow(clippy::too_many_arguments)]
pub async fn narrow_chunk(
    source: &Client,
    target: &Client,
    database: &str,
    t: &ValTable,
    bounds: &[String],
    c: usize,
    full: bool,
    exclude_generated: bool,
) -> Result<Vec<Mismatch>> {
    let columns: Vec<String> = t
        .compared(exclude_generated)
        .into_iter()
        .map(str::to_string)
        .collect();
    let span = Span { first: c, last: c };
    let (s, g) = if full {
        let (s, g) = tokio::join!(
            fetch_columns(source, t, bounds, span, &columns, None),
            fetch_columns(target, t, bounds, span, &columns, None)
        );
        (
            s.map_err(|e| e.context("source"))?,
            g.map_err(|e| e.context("target"))?,
        )
    } else {
        let (sh, gh) = tokio::join!(
            fetch_hashes(source, t, bounds, span, exclude_generated),
            fetch_hashes(target, t, bounds, span, exclude_generated)
        );
        let (sh, gh) = (
            sh.map_err(|e| e.context("source"))?,
            gh.map_err(|e| e.context("target"))?,
        );
        let differing: Vec<String> = sh
            .iter()
            .filter(|(k, h)| gh.get(*k).is_some_and(|x| x != *h))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in sh.keys().filter(|k| !gh.contains_key(*k)) {
            out.push(row_mismatch(
                database,
                t,
                k,
                MismatchKind::Missing,
                Vec::new(),
            ));
        }
        for k in gh.keys().filter(|k| !sh.contains_key(*k)) {
            out.push(row_mismatch(
                database,
                t,
                k,
                MismatchKind::Extra,
                Vec::new(),
            ));
        }
        if !differing.is_empty() {
            let (s, g) = tokio::join!(
                fetch_columns(source, t, bounds, span, &columns, Some(&differing)),
                fetch_columns(target, t, bounds, span, &columns, Some(&differing))
            );
            let (s, g) = (
                s.map_err(|e| e.context("source"))?,
                g.map_err(|e| e.context("target"))?,
            );
            out.extend(compare_columns(database, t, &columns, &s, &g));
        }
        out.sort_by(|a, b| {
            a.key
                .as_ref()
                .map(|k| k.to_string())
                .cmp(&b.key.as_ref().map(|k| k.to_string()))
        });
        return Ok(out);
    };
    let mut out = Vec::new();
    for k in s.keys().filter(|k| !g.contains_key(*k)) {
        out.push(row_mismatch(
            database,
            t,
            k,
            MismatchKind::Missing,
            Vec::new(),
        ));
    }
    for k in g.keys().filter(|k| !s.contains_key(*k)) {
        out.push(row_mismatch(
            database,
            t,
            k,
            MismatchKind::Extra,
            Vec::new(),
        ));
    }
    out.extend(compare_columns(database, t, &columns, &s, &g));
    Ok(out)
}

fn compare_columns(
    database: &str,
    t: &ValTable,
    columns: &[String],
    s: &Rows<Vec<Option<String>>>,
    g: &Rows<Vec<Option<String>>>,
) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for (k, sv) in s {
        let Some(gv) = g.get(k) else { continue };
        let differing: Vec<String> = columns
            .iter()
            .enumerate()
            .filter(|(i, _)| sv.get(*i) != gv.get(*i))
            .map(|(_, c)| c.clone())
            .collect();
        if !differing.is_empty() {
            out.push(row_mismatch(
                database,
                t,
                k,
                MismatchKind::Different,
                differing,
            ));
        }
    }
    out
}

fn row_mismatch(
    database: &str,
    t: &ValTable,
    key: &str,
    kind: MismatchKind,
    columns: Vec<String>,
) -> Mismatch {
    Mismatch {
        database: database.to_string(),
        table: t.name.to_string(),
        key: Some(
            serde_json::from_str(key).unwrap_or_else(|_| serde_json::Value::String(key.into())),
        ),
        kind,
        columns,
        count: None,
        detail: None,
    }
}

/// Key JSON text and row hash of every row of a span.
async fn fetch_hashes(
    client: &Client,
    t: &ValTable,
    bounds: &[String],
    span: Span,
    exclude_generated: bool,
) -> Result<Rows<i64>> {
    let range = chunk::range(t, bounds, span, 1);
    let sql = format!(
        "SELECT {}, pg_catalog.hashtextextended({}, 0) FROM ONLY {}{}",
        t.key_json(),
        t.row_text(exclude_generated),
        t.name.quoted(),
        range.filter
    );
    let rows = client
        .query(&sql, &range.params())
        .await
        .map_err(|e| Error::pg(&e, format!("listing the rows of a chunk of {}", t.name)))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Key JSON text and every compared column's text, for a span (or only the given keys of it).
async fn fetch_columns(
    client: &Client,
    t: &ValTable,
    bounds: &[String],
    span: Span,
    columns: &[String],
    keys: Option<&Vec<String>>,
) -> Result<Rows<Vec<Option<String>>>> {
    let range = chunk::range(t, bounds, span, 1);
    let cols = if columns.is_empty() {
        "'{}'::text[]".to_string()
    } else {
        format!(
            "ARRAY[{}]::text[]",
            columns
                .iter()
                .map(|c| format!("{}::text", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut filter = range.filter.clone();
    let mut params = range.params();
    if let Some(k) = keys {
        filter.push_str(if filter.is_empty() {
            " WHERE "
        } else {
            " AND "
        });
        filter.push_str(&format!(
            "{} = ANY(${}::text[])",
            t.key_json(),
            params.len() + 1
        ));
        params.push(k as &(dyn ToSql + Sync));
    }
    let sql = format!(
        "SELECT {}, {cols} FROM ONLY {}{filter}",
        t.key_json(),
        t.name.quoted()
    );
    let rows = client
        .query(&sql, &params)
        .await
        .map_err(|e| Error::pg(&e, format!("fetching the rows of a chunk of {}", t.name)))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The multiset difference of a table without a key.
pub async fn narrow_keyless(
    source: &Client,
    target: &Client,
    database: &str,
    t: &ValTable,
    exclude_generated: bool,
) -> Result<Vec<Mismatch>> {
    let cols: Vec<String> = t
        .compared(exclude_generated)
        .iter()
        .map(|c| quote_ident(c))
        .collect();
    let sql = if cols.is_empty() {
        format!(
            "SELECT '{{}}'::text, count(*) FROM ONLY {} GROUP BY 1",
            t.name.quoted()
        )
    } else {
        format!(
            "SELECT pg_catalog.to_json(s)::text, count(*) FROM (SELECT {} FROM ONLY {}) s GROUP BY 1",
            cols.join(", "),
            t.name.quoted()
        )
    };
    let (s, g) = tokio::join!(
        fetch_multiset(source, &sql, t),
        fetch_multiset(target, &sql, t)
    );
    let (s, g) = (
        s.map_err(|e| e.context("source"))?,
        g.map_err(|e| e.context("target"))?,
    );
    let mut out = Vec::new();
    let mut push = |row: &str, kind, n: i64| {
        let mut m = row_mismatch(database, t, row, kind, Vec::new());
        if n > 1 {
            m.count = Some(n);
        }
        out.push(m);
    };
    for (row, n) in &s {
        let other = g.get(row).copied().unwrap_or(0);
        if *n > other {
            push(row, MismatchKind::Missing, n - other);
        }
    }
    for (row, n) in &g {
        let other = s.get(row).copied().unwrap_or(0);
        if *n > other {
            push(row, MismatchKind::Extra, n - other);
        }
    }
    Ok(out)
}

async fn fetch_multiset(client: &Client, sql: &str, t: &ValTable) -> Result<Rows<i64>> {
    let rows = client
        .query(sql, &[])
        .await
        .map_err(|e| Error::pg(&e, format!("listing the rows of {}", t.name)))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
