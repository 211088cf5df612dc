//! The run report as persisted in `reports.report` (JSON). Field order is fixed by the structs and
//! maps are ordered, so the same run always serializes to the same text. Times are seconds since
//! the epoch; durations seconds. Bump [`VERSION`] when a field changes meaning.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunReport {
    pub version: u32,
    pub migration: String,
    pub run_id: i64,
    /// `run` or `rehearsal`.
    pub mode: String,
    pub started_at: Option<f64>,
    pub ended_at: Option<f64>,
    pub seconds: Option<f64>,
    /// `done`, `failed`, `interrupted`; `None` while the run is going on.
    pub outcome: Option<String>,
    /// In the plan's topological order.
    pub stages: Vec<StageReport>,
    /// `[from, to]`: `to` runs after `from`.
    pub edges: Vec<[String; 2]>,
    pub tables: Vec<TableCopy>,
    pub builds: Vec<Build>,
    pub cdc: Option<CdcReport>,
    pub cutover: Vec<CutoverReport>,
    /// The fallback stream of each database whose cutover armed one (reverse replication after
    /// the switch, `pgferry rollback`).
    pub fallback: Vec<FallbackReport>,
    pub validation: Option<ValidationSummary>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FallbackReport {
    pub stage: String,
    pub database: String,
    /// `streaming`, `rolling_back`, `rolled_back` or `stopped`.
    pub state: String,
    /// Changes applied back to the source.
    pub applied_changes: i64,
    /// The reverse lag over this run's samples (target WAL minus applied), bytes.
    pub max_lag_bytes: Option<i64>,
    pub p95_lag_bytes: Option<i64>,
    /// A rollback: where the target was fenced, and the write downtime (fence to unfence).
    pub lsn: Option<String>,
    pub downtime_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    /// `pending`, `running`, `ready`, `done`, `failed`, or `not_run` (no record).
    pub state: String,
    pub attempts: i32,
    pub started_at: Option<f64>,
    pub ended_at: Option<f64>,
    pub seconds: Option<f64>,
    /// Topological level (0: no dependencies), for drawing the DAG.
    pub level: usize,
    /// Whether this run started the stage (false: done by an earlier run, or not run).
    pub this_run: bool,
    pub error: Option<String>,
}

/// One table's copy by a full_load stage (the parts of a split table added up).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TableCopy {
    pub stage: String,
    pub database: String,
    pub table: String,
    pub state: String,
    pub parts: u32,
    pub rows: i64,
    pub bytes: i64,
    pub started_at: Option<f64>,
    pub ended_at: Option<f64>,
    pub seconds: Option<f64>,
    pub rows_per_second: Option<f64>,
    pub mb_per_second: Option<f64>,
}

/// One object a post_data stage built (an index, a constraint, a refresh...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Build {
    pub stage: String,
    pub database: String,
    pub object: String,
    pub kind: String,
    pub started_at: Option<f64>,
    pub seconds: f64,
    pub already_existed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CdcReport {
    pub stage: String,
    /// Changes applied, all databases (migration-wide counter).
    pub applied_changes: i64,
    /// Migration-wide cdc counters per database: `database -> name -> value`.
    pub counters: BTreeMap<String, BTreeMap<String, i64>>,
    pub samples: Vec<Sample>,
    pub max_lag_bytes: Option<i64>,
    pub p95_lag_bytes: Option<i64>,
    pub max_latency_ms: Option<i64>,
    pub p95_latency_ms: Option<i64>,
    /// Schema changes cdc met in the stream (`ddl = "replicate"`), per database, in stream order.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ddl: BTreeMap<String, Vec<DdlStatement>>,
}

/// One DDL statement cdc met: where it was in the stream and what became of it (`applied`,
/// `applied after its transaction`, `ignored`, `skipped` by the operator).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdlStatement {
    pub lsn: String,
    pub commit_lsn: String,
    pub tag: String,
    pub status: String,
    pub statement: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sample {
    pub database: String,
    pub at: f64,
    pub lag_bytes: Option<i64>,
    pub latency_ms: Option<i64>,
    pub incoming: Option<i64>,
    pub applied: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CutoverReport {
    pub stage: String,
    pub database: String,
    pub lsn: Option<crate::pg::lsn::Lsn>,
    pub fenced: Option<bool>,
    pub downtime_seconds: Option<f64>,
    /// A rehearsal's downtime: what the fence would have cost.
    pub simulated_downtime_seconds: Option<f64>,
    /// What was copied again after the fence (unlogged tables, large objects, refreshes).
    pub resync: serde_json::Value,
    /// The target's planner statistics gathered before the fence (`tables`, `seconds`,
    /// `finished_at`), or `{"analyze": false}`.
    pub statistics: serde_json::Value,
}

impl CutoverReport {
    /// The real downtime, else the simulated one.
    pub fn downtime(&self) -> Option<f64> {
        self.downtime_seconds.or(self.simulated_downtime_seconds)
    }

    /// The planner statistics in words: `12 table(s) analyzed in 0.4s, done 2026-12-04T21:40:01Z`.
    pub fn statistics_words(&self) -> String {
        let s = &self.statistics;
        if s.get("analyze").and_then(serde_json::Value::as_bool) == Some(false) {
            return "not gathered (analyze = false)".into();
        }
        match (
            s.get("tables").and_then(serde_json::Value::as_u64),
            s.get("finished_at").and_then(serde_json::Value::as_f64),
        ) {
            (Some(n), Some(at)) => {
                let carried = match (
                    s.get("carried_over").and_then(serde_json::Value::as_u64),
                    s.get("carried_over_at").and_then(serde_json::Value::as_f64),
                ) {
                    (Some(c), Some(t)) if c > 0 => format!(
                        "; {c} table(s) carried over from the source by post_data, done {}",
                        crate::state::Timestamp(t).rfc3339()
                    ),
                    _ => String::new(),
                };
                format!(
                    "{n} table(s) analyzed in {:.1}s, done {}{carried}",
                    s.get("seconds")
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0),
                    crate::state::Timestamp(at).rfc3339()
                )
            }
            _ => "-".into(),
        }
    }

    /// What the cutover copied again after the fence, in words: unlogged tables (with their rows),
    /// large objects (with their size) and materialized views refreshed; `-` for none.
    pub fn resync_words(&self) -> ResyncWords {
        let r = &self.resync;
        let names = |key: &str| -> Vec<String> {
            r.get(key)
                .and_then(serde_json::Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let number = |key: &str| r.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let list = |names: &[String]| {
            const SHOWN: usize = 5;
            let mut s = names
                .iter()
                .take(SHOWN)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if names.len() > SHOWN {
                s.push_str(&format!(" and {} more", names.len() - SHOWN));
            }
            s
        };
        let unlogged = names("unlogged_tables");
        let views = names("materialized_views");
        let large_objects = number("large_objects");
        ResyncWords {
            unlogged_tables: if unlogged.is_empty() {
                "-".into()
            } else {
                format!(
                    "{} ({} rows): {}",
                    unlogged.len(),
                    number("unlogged_rows"),
                    list(&unlogged)
                )
            },
            large_objects: if large_objects == 0 {
                "-".into()
            } else {
                format!(
                    "{large_objects} ({})",
                    crate::plan::units::human_bytes(number("large_object_bytes"))
                )
            },
            materialized_views: if views.is_empty() {
                "-".into()
            } else {
                format!("{}: {}", views.len(), list(&views))
            },
        }
    }
}

/// [`CutoverReport::resync_words`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncWords {
    pub unlogged_tables: String,
    pub large_objects: String,
    pub materialized_views: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ValidationSummary {
    pub stage: String,
    pub mode: String,
    pub clean: bool,
    pub tables: usize,
    pub source_rows: i64,
    pub target_rows: i64,
    pub mismatch_count: usize,
    pub seconds: f64,
    pub finished_at: String,
    /// The validation's own summary lines (verdict and first differences).
    pub summary: String,
}

impl RunReport {
    /// Seconds of one stage, when it ran.
    pub fn stage_seconds(&self, id: &str) -> Option<f64> {
        self.stages
            .iter()
            .find(|s| s.id == id)
            .and_then(|s| s.seconds)
    }

    /// Downtime over all databases (the longest), real or simulated.
    pub fn downtime(&self) -> Option<f64> {
        self.cutover
            .iter()
            .filter_map(CutoverReport::downtime)
            .reduce(f64::max)
    }

    /// Rows and bytes copied by full_load, and the copy's throughput over its wall-clock span.
    pub fn copy_totals(&self) -> (i64, i64, Option<f64>) {
        let rows = self.tables.iter().map(|t| t.rows).sum();
        let bytes = self.tables.iter().map(|t| t.bytes).sum();
        let start = self
            .tables
            .iter()
            .filter_map(|t| t.started_at)
            .reduce(f64::min);
        let end = self
            .tables
            .iter()
            .filter_map(|t| t.ended_at)
            .reduce(f64::max);
        let mbps = match (start, end) {
            (Some(a), Some(b)) if b > a => Some(bytes as f64 / 1_048_576.0 / (b - a)),
            _ => None,
        };
        (rows, bytes, mbps)
    }
}

/// The `q`-quantile (0..=1) of `values` by the nearest-rank method; `None` when empty.
pub fn quantile(values: &[i64], q: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.saturating_sub(1).min(v.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        assert_eq!(quantile(&[], 0.95), None);
        assert_eq!(quantile(&[5], 0.95), Some(5));
        let v: Vec<i64> = (1..=100).rev().collect();
        assert_eq!(quantile(&v, 0.95), Some(95));
        assert_eq!(quantile(&v, 1.0), Some(100));
        assert_eq!(quantile(&v, 0.0), Some(1));
    }

    #[test]
    fn serializes_stably_with_a_version() {
        let r = RunReport {
            version: VERSION,
            migration: "m".into(),
            run_id: 3,
            mode: "rehearsal".into(),
            ..Default::default()
        };
        let a = serde_json::to_string(&r).expect("json");
        assert!(a.starts_with("{\"version\":1,"), "{a}");
        let back: RunReport = serde_json::from_str(&a).expect("parse");
        assert_eq!(back, r);
        assert_eq!(serde_json::to_string(&back).expect("json"), a);
    }
}
