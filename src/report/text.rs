//! The report for a terminal: one run in detail, then, when several reports are kept, the
//! comparison table.

use std::fmt::Write as _;

use super::compare;
use super::model::RunReport;
use crate::plan::units::human_bytes;
use crate::state::Timestamp;

/// Control characters of names (a table may be called anything) shown as `?`.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn time(t: Option<f64>) -> String {
    t.map_or("-".into(), |t| Timestamp(t).rfc3339())
}

fn secs(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.1}"))
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let _ = write!(l, " {c:<w$} ");
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(
        out,
        "{}",
        line(header.iter().map(|h| h.to_string()).collect())
    );
    for r in rows {
        let _ = writeln!(out, "{}", line(r.clone()));
    }
}

/// One run in detail.
pub fn render(r: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {} ({}) of migration `{}`: {}, {} -> {}, {} s",
        r.run_id,
        r.mode,
        clean(&r.migration),
        r.outcome.as_deref().unwrap_or("running"),
        time(r.started_at),
        time(r.ended_at),
        secs(r.seconds)
    );

    let _ = writeln!(out, "\nstages");
    let rows: Vec<Vec<String>> = r
        .stages
        .iter()
        .map(|s| {
            vec![
                clean(&s.id),
                s.kind.clone(),
                if s.this_run || s.state == "not_run" {
                    s.state.clone()
                } else {
                    format!("{} (earlier run)", s.state)
                },
                s.attempts.to_string(),
                time(s.started_at),
                secs(s.seconds),
            ]
        })
        .collect();
    table(
        &mut out,
        &["STAGE", "KIND", "STATE", "ATTEMPTS", "STARTED", "SECONDS"],
        &rows,
    );
    for s in r.stages.iter().filter(|s| s.error.is_some()) {
        let _ = writeln!(
            out,
            "  {} failed: {}",
            clean(&s.id),
            clean(s.error.as_deref().unwrap_or_default())
        );
    }

    if !r.tables.is_empty() {
        let (rows_total, bytes, mbps) = r.copy_totals();
        let _ = writeln!(
            out,
            "\ntables copied: {} table(s), {rows_total} rows, {}{}",
            r.tables.len(),
            human_bytes(bytes.max(0) as u64),
            mbps.map_or(String::new(), |m| format!(", {m:.1} MB/s overall"))
        );
        let rows: Vec<Vec<String>> = r
            .tables
            .iter()
            .map(|t| {
                vec![
                    clean(&t.database),
                    clean(&t.table),
                    t.state.clone(),
                    t.rows.to_string(),
                    human_bytes(t.bytes.max(0) as u64),
                    secs(t.seconds),
                    t.rows_per_second.map_or("-".into(), |v| format!("{v:.0}")),
                    t.mb_per_second.map_or("-".into(), |v| format!("{v:.1}")),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "DATABASE", "TABLE", "STATE", "ROWS", "SIZE", "SECONDS", "ROWS/S", "MB/S",
            ],
            &rows,
        );
    }

    if !r.builds.is_empty() {
        let total: f64 = r.builds.iter().map(|b| b.seconds).sum();
        let _ = writeln!(
            out,
            "\nindexes, constraints and other post-data objects: {} ({total:.1} s of build time)",
            r.builds.len()
        );
        let mut builds: Vec<_> = r.builds.iter().collect();
        builds.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        let rows: Vec<Vec<String>> = builds
            .iter()
            .take(15)
            .map(|b| {
                vec![
                    clean(&b.database),
                    clean(&b.kind),
                    clean(&b.object),
                    format!("{:.2}", b.seconds),
                    if b.already_existed { "existed" } else { "" }.into(),
                ]
            })
            .collect();
        table(
            &mut out,
            &["DATABASE", "TYPE", "OBJECT", "SECONDS", ""],
            &rows,
        );
        if builds.len() > 15 {
            let _ = writeln!(
                out,
                "  ... and {} more (the 15 longest shown)",
                builds.len() - 15
            );
        }
    }

    if let Some(c) = &r.cdc {
        let _ = writeln!(
            out,
            "\ncdc ({}): {} change(s) applied",
            clean(&c.stage),
            c.applied_changes
        );
        for (db, counters) in &c.counters {
            let get = |n: &str| counters.get(n).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "  {}: {} inserts, {} updates, {} deletes",
                clean(db),
                get("cdcInsertCounter"),
                get("cdcUpdateCounter"),
                get("cdcDeleteCounter")
            );
            if get("managedApply") != 0 {
                let _ = writeln!(
                    out,
                    "    apply mode managed (the target role may not set session_replication_role): {} trigger(s)/rule(s) and {} foreign key(s) still held, {} foreign key(s) not validated yet",
                    get("heldTriggers"),
                    get("heldForeignKeys"),
                    get("unvalidatedForeignKeys")
                );
            }
        }
        for (db, list) in &c.ddl {
            let _ = writeln!(out, "  {}: {} DDL statement(s)", clean(db), list.len());
            for d in list {
                let one_line = d.statement.split_whitespace().collect::<Vec<_>>().join(" ");
                let _ = writeln!(
                    out,
                    "    at {} (commit {}) {}: {}",
                    clean(&d.lsn),
                    clean(&d.commit_lsn),
                    clean(&d.status),
                    clean(&one_line)
                );
            }
        }
        let bytes = |v: Option<i64>| v.map_or("-".into(), |v| human_bytes(v.max(0) as u64));
        let secs = |v: Option<i64>| v.map_or("-".into(), |v| format!("{:.1}s", v as f64 / 1000.0));
        let _ = writeln!(
            out,
            "  lag profile: {} sample(s); lag in seconds (oldest unapplied commit) max {}, p95 {}; in bytes (source WAL minus applied) max {}, p95 {}",
            c.samples.len(),
            secs(c.max_latency_ms),
            secs(c.p95_latency_ms),
            bytes(c.max_lag_bytes),
            bytes(c.p95_lag_bytes)
        );
    }

    for c in &r.cutover {
        let what = match (c.downtime_seconds, c.simulated_downtime_seconds) {
            (Some(d), _) => format!("write downtime {d:.2} s"),
            (None, Some(d)) => format!("simulated write downtime {d:.2} s (rehearsal)"),
            _ => "no downtime recorded".into(),
        };
        let _ = writeln!(
            out,
            "\ncutover ({}) of {}: {what}{}{}",
            clean(&c.stage),
            clean(&c.database),
            c.lsn.map_or(String::new(), |l| format!(", at {l}")),
            match c.fenced {
                Some(true) => ", source fenced",
                Some(false) => ", no fence",
                None => "",
            }
        );
        if !c.statistics.is_null() {
            let _ = writeln!(
                out,
                "  planner statistics before the fence: {}",
                clean(&c.statistics_words())
            );
        }
        if !c.resync.is_null() {
            let w = c.resync_words();
            let _ = writeln!(
                out,
                "  after the fence: unlogged tables copied again {}; large objects made equal {}; materialized views refreshed {}",
                clean(&w.unlogged_tables),
                clean(&w.large_objects),
                clean(&w.materialized_views)
            );
        }
    }

    for f in &r.fallback {
        let bytes = |b: Option<i64>| {
            b.map(|b| crate::plan::units::human_bytes(b.max(0) as u64))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            out,
            "\nfallback ({}) of {}: {}; {} change(s) applied back to the source; reverse lag max {}, p95 {}{}",
            clean(&f.stage),
            clean(&f.database),
            clean(&f.state.replace('_', " ")),
            f.applied_changes,
            bytes(f.max_lag_bytes),
            bytes(f.p95_lag_bytes),
            match (f.downtime_seconds, &f.lsn) {
                (Some(d), Some(l)) =>
                    format!("; rollback at {}, write downtime {d:.2} s", clean(l)),
                (Some(d), None) => format!("; rollback write downtime {d:.2} s"),
                _ => String::new(),
            }
        );
    }

    match &r.validation {
        Some(v) => {
            let _ = writeln!(
                out,
                "\nvalidation ({}, {} mode, finished {}): {}",
                clean(&v.stage),
                v.mode,
                v.finished_at,
                if v.clean { "CLEAN" } else { "DIFFERENCES" }
            );
            for l in v.summary.lines() {
                let _ = writeln!(out, "  {}", clean(l));
            }
        }
        None => {
            let _ = writeln!(out, "\nvalidation: none recorded");
        }
    }
    out
}

/// The comparison of several reports (oldest first), with the change of the newest.
pub fn render_comparison(reports: &[RunReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "comparison of the last {} runs (change: newest minus the one before)",
        reports.len()
    );
    let mut header: Vec<String> = vec!["MEASURE".into()];
    for r in reports {
        header.push(format!("RUN {} ({})", r.run_id, r.mode));
    }
    header.push("CHANGE".into());
    let rows: Vec<Vec<String>> = compare::rows(reports)
        .iter()
        .map(|row| {
            let mut cells = vec![clean(&row.label)];
            cells.extend(row.values.iter().map(|v| compare::format(row.unit, *v)));
            cells.push(compare::format_delta(row.unit, row.delta()));
            cells
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&mut out, &header, &rows);
    out
}
