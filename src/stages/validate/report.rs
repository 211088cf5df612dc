//! The validation report: every difference found (database, table, key, kind, columns), a summary
//! per table, and how the two sides were synchronized. Stored as the artifact
//! `validation/<stage>.json`, shown by `status`, written by `pgferry verify --report FILE`.

use serde::{Deserialize, Serialize};

/// At most this many differences are kept per table; the summary still counts them all.
pub const MAX_PER_TABLE: usize = 1000;

/// What kind of difference a row shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    /// On the source, not on the target.
    Missing,
    /// On the target, not on the source.
    Extra,
    /// On both sides with the same key, with different values in `columns`.
    Different,
}

impl MismatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MismatchKind::Missing => "missing",
            MismatchKind::Extra => "extra",
            MismatchKind::Different => "different",
        }
    }
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    /// The source database.
    pub database: String,
    /// `schema.table` (or `schema.sequence` for a sequence).
    pub table: String,
    /// The row's key as a JSON object (`{"id": 7}`); for a table without a key, the whole row;
    /// `null` when the difference is not about one row (a count, a missing table, a sequence).
    pub key: Option<serde_json::Value>,
    pub kind: MismatchKind,
    /// For `different`: the columns whose values differ.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// How many rows this entry stands for, when more than one (identical rows of a table without
    /// a key; a count difference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    /// Anything else worth saying (sequence values, a missing table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}.{}", self.kind.as_str(), self.database, self.table)?;
        if let Some(k) = &self.key {
            write!(f, " {k}")?;
        }
        if !self.columns.is_empty() {
            write!(f, " columns {}", self.columns.join(", "))?;
        }
        if let Some(n) = self.count {
            write!(f, " ({n} rows)")?;
        }
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

/// What was compared in one table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableSummary {
    pub database: String,
    pub table: String,
    /// The key the chunks follow (empty: no primary key or unique not-null key; the table was
    /// compared as a whole, order-independently).
    pub key: Vec<String>,
    pub chunks: usize,
    pub mismatched_chunks: usize,
    pub source_rows: i64,
    pub target_rows: i64,
    /// Differences found (all of them, even beyond the ones kept in the report).
    pub mismatches: usize,
}

/// A whole validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The stage, or `verify` for the command.
    pub stage: String,
    pub mode: String,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
    /// Per database: how both sides were made to show the same moment.
    pub snapshots: Vec<SnapshotInfo>,
    pub tables: Vec<TableSummary>,
    pub sequences_compared: usize,
    /// Differences found in all; `mismatches` keeps at most [`MAX_PER_TABLE`] per table.
    pub mismatch_count: usize,
    pub mismatches: Vec<Mismatch>,
}

/// How one database's two snapshots were taken.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub database: String,
    /// `offline` (plain snapshots: nothing writes to the target) or `online` (the source snapshot
    /// of a temporary slot, the target's taken while cdc held its apply at the same position).
    pub method: String,
    /// The source position both snapshots show (online), or the source's WAL position (offline).
    pub lsn: Option<crate::pg::lsn::Lsn>,
    /// Why sequences were not compared, if they were not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.mismatch_count == 0
    }

    /// Differences per `schema.table` of a database.
    pub fn count_for(&self, database: &str, table: &str) -> usize {
        self.tables
            .iter()
            .filter(|t| t.database == database && t.table == table)
            .map(|t| t.mismatches)
            .sum::<usize>()
            + self
                .mismatches
                .iter()
                .filter(|m| {
                    m.database == database
                        && m.table == table
                        && !self
                            .tables
                            .iter()
                            .any(|t| t.database == database && t.table == table)
                })
                .count()
    }

    /// A few lines for people: the verdict and the first differences.
    pub fn summary(&self, limit: usize) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let rows: i64 = self.tables.iter().map(|t| t.source_rows).sum();
        if self.is_clean() {
            let _ = write!(
                out,
                "no differences: {} table(s), {rows} source rows, {} sequence(s) compared ({} mode, {:.1} s)",
                self.tables.len(),
                self.sequences_compared,
                self.mode,
                self.seconds
            );
        } else {
            let tables = self
                .tables
                .iter()
                .filter(|t| t.mismatches > 0)
                .count()
                .max(1);
            let _ = write!(
                out,
                "{} difference(s) in {tables} table(s) or sequence(s) ({} mode, {} table(s) compared, {:.1} s)",
                self.mismatch_count,
                self.mode,
                self.tables.len(),
                self.seconds
            );
            for m in self.mismatches.iter().take(limit) {
                let _ = write!(out, "\n  {m}");
            }
            if self.mismatches.len() > limit {
                let _ = write!(
                    out,
                    "\n  ... and {} more (see the full report)",
                    self.mismatch_count - limit
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_round_trips() {
        let m = Mismatch {
            database: "shop".into(),
            table: "public.items".into(),
            key: Some(serde_json::json!({"id": 7})),
            kind: MismatchKind::Different,
            columns: vec!["name".into()],
            count: None,
            detail: None,
        };
        assert_eq!(
            m.to_string(),
            "different shop.public.items {\"id\":7} columns name"
        );
        let text = serde_json::to_string(&m).unwrap_or_default();
        assert_eq!(
            text,
            r#"{"database":"shop","table":"public.items","key":{"id":7},"kind":"different","columns":["name"]}"#
        );
        let back: Mismatch = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, m);
    }
}
