//! Key-range chunks. The boundaries are values of the table's first key column, computed once on
//! the source (inside its snapshot) from a block sample and applied identically to both sides:
//! boundaries `b1 < b2 < ... < bn` make `n + 1` chunks — `k < b1`, `b1 <= k < b2`, ..., `k >= bn`.
//! A chunk is what one digest covers and what a mismatch is narrowed within.
//!
//! A unit is one query per side. When the key follows the physical order of the rows
//! (`pg_stats.correlation` of at least [`CORRELATED`] in absolute value, as for a table loaded in
//! key order), a unit is one chunk: an index range scan reads its rows from consecutive pages, and
//! a plain aggregate digests them. Otherwise an index range scan would visit pages all over the
//! table for every chunk, so consecutive chunks are grouped ([`CHUNKS_PER_UNIT`]): one scan of the
//! unit's key range returns every chunk's digest (`GROUP BY` the chunk number, found with
//! `width_bucket` over the unit's inner boundaries).
//!
//! Boundaries travel as text (both sessions print and parse values with the same settings). A range
//! condition casts its parameter in place, so the planner sees the value (an unnamed statement is
//! planned with its parameters) and estimates the range — an index scan for one chunk; the array
//! of a unit's inner boundaries is cast inside an uncorrelated subquery, evaluated once per query
//! even for types whose input function is only stable.

use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::tables::ValTable;
use crate::error::{Error, Result};
use crate::pg::ident::quote_ident;

/// Chunks per unit (per query) when the key does not follow the physical order.
pub const CHUNKS_PER_UNIT: usize = 32;
/// The key correlation above which a unit is one chunk.
pub const CORRELATED: f32 = 0.9;
/// Sampled blocks per chunk. `TABLESAMPLE SYSTEM` picks whole blocks, whose keys are often
/// consecutive: several blocks per chunk keep the chunks even.
const BLOCKS_PER_CHUNK: f64 = 8.0;
/// Below this many main-fork pages a table is one chunk.
const SMALL_PAGES: i64 = 16;

/// The chunk boundaries of a table (empty: one chunk, the whole table).
pub async fn boundaries(client: &Client, t: &ValTable, chunk_rows: u64) -> Result<Vec<String>> {
    let (Some(first), Some(_)) = (t.key.first(), &t.key_type) else {
        return Ok(Vec::new());
    };
    let pages = t.bytes / 8192;
    if pages <= SMALL_PAGES {
        return Ok(Vec::new());
    }
    // The sample size follows a guess of the row count (never analyzed: reltuples is -1, so assume
    // small rows); the chunk count follows the sample itself.
    let guess = if t.estimated_rows > 0 {
        t.estimated_rows as f64
    } else {
        (pages * 200) as f64
    };
    let chunks_guess = (guess / chunk_rows.max(1) as f64).ceil().max(1.0);
    let percent = (BLOCKS_PER_CHUNK * chunks_guess / pages as f64 * 100.0).clamp(0.001, 100.0);
    let k = quote_ident(first);
    // Sorted by the key's own order (a bare `ORDER BY` name would pick the text output column).
    let sql = format!(
        "SELECT s.k::text FROM (SELECT {k} AS k FROM ONLY {} TABLESAMPLE SYSTEM ({percent}) REPEATABLE (7)) s ORDER BY s.k",
        t.name.quoted()
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| Error::pg(&e, format!("sampling the keys of {}", t.name)))?;
    let sample: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let estimated = sample.len() as f64 * 100.0 / percent;
    let chunks = (estimated / chunk_rows.max(1) as f64).ceil();
    if chunks <= 1.0 {
        return Ok(Vec::new());
    }
    Ok(pick(&sample, chunks as usize))
}

/// Every `len / chunks`-th value of a sorted sample, without repeats.
fn pick(sorted: &[String], chunks: usize) -> Vec<String> {
    if sorted.is_empty() || chunks <= 1 {
        return Vec::new();
    }
    let step = (sorted.len() as f64 / chunks as f64).max(1.0);
    let mut out: Vec<String> = Vec::new();
    let mut i = step;
    while (i as usize) < sorted.len() {
        let v = &sorted[i as usize];
        if out.last() != Some(v) {
            out.push(v.clone());
        }
        i += step;
    }
    out
}

/// A range of consecutive chunks `first..=last` of a table with `n` boundaries.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub first: usize,
    pub last: usize,
}

/// Groups the `bounds.len() + 1` chunks of `t` into units.
pub fn units(t: &ValTable, bounds: usize) -> Vec<Span> {
    let per_unit = match t.key_correlation {
        Some(c) if c.abs() >= CORRELATED => 1,
        _ => CHUNKS_PER_UNIT,
    };
    spans(bounds, per_unit)
}

fn spans(bounds: usize, per_unit: usize) -> Vec<Span> {
    let chunks = bounds + 1;
    (0..chunks)
        .step_by(per_unit)
        .map(|first| Span {
            first,
            last: (first + per_unit - 1).min(chunks - 1),
        })
        .collect()
}

/// SQL conditions and parameters selecting a span's key range.
pub struct RangeSql {
    /// `WHERE ...` (or empty), with placeholders from `$first_param` on.
    pub filter: String,
    pub params: Vec<String>,
}

impl RangeSql {
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p as &(dyn ToSql + Sync))
            .collect()
    }
}

/// The `WHERE` clause selecting chunks `span` of `t`, parameters numbered from `first_param`.
pub fn range(t: &ValTable, bounds: &[String], span: Span, first_param: usize) -> RangeSql {
    let mut conds = Vec::new();
    let mut params = Vec::new();
    if let (Some(k), Some(ty)) = (t.key.first(), &t.key_type) {
        let k = quote_ident(k);
        if span.first > 0 {
            params.push(bounds[span.first - 1].clone());
            conds.push(format!(
                "{k} >= ${}::text::{ty}",
                first_param + params.len() - 1
            ));
        }
        if span.last < bounds.len() {
            params.push(bounds[span.last].clone());
            conds.push(format!(
                "{k} < ${}::text::{ty}",
                first_param + params.len() - 1
            ));
        }
    }
    RangeSql {
        filter: if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        },
        params,
    }
}

/// The expression giving a row's chunk number within `span` (the span's inner boundaries are
/// parameter `$param`, a text array), or the span's first chunk when it has one chunk.
pub fn bucket_expr(t: &ValTable, span: Span, param: usize) -> String {
    match (t.key.first(), &t.key_type) {
        (Some(k), Some(ty)) if span.last > span.first => format!(
            "{} + pg_catalog.width_bucket({}, (SELECT ${param}::text[]::{ty}[]))",
            span.first,
            quote_ident(k)
        ),
        _ => span.first.to_string(),
    }
}

/// The inner boundaries of a span (between its chunks).
pub fn inner(bounds: &[String], span: Span) -> Vec<String> {
    if span.last > span.first {
        bounds[span.first..span.last].to_vec()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_distinct_quantiles() {
        let s: Vec<String> = (0..100).map(|i| format!("{:03}", i / 3)).collect();
        let b = pick(&s, 4);
        assert_eq!(b, vec!["008", "016", "025"]);
        assert!(pick(&s, 1).is_empty());
        assert!(pick(&[], 10).is_empty());
    }

    #[test]
    fn units_cover_every_chunk_once() {
        let u = spans(70, 32);
        assert_eq!(u.len(), 3);
        assert_eq!((u[0].first, u[0].last), (0, 31));
        assert_eq!((u[2].first, u[2].last), (64, 70));
        let u = spans(0, 32);
        assert_eq!((u[0].first, u[0].last), (0, 0));
        let u = spans(3, 1);
        assert_eq!(u.len(), 4);
        assert_eq!((u[3].first, u[3].last), (3, 3));
    }
}
