//! `pgferry plan PLAN`: the dry run. Connects read-only, shows the stages in order with what each
//! would do, the selected tables with row estimates and sizes, and the preflight findings. Changes
//! nothing anywhere (no checkpoint store is created).

use std::fmt::Write as _;
use std::sync::Arc;

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, load, open_store, report};
use crate::cli::PlanArgs;
use crate::plan::StageKind;
use crate::plan::units::human_bytes;
use crate::stages::preflight::{Level, inspect};
use crate::stages::{self, Env};

/// Which way the target gets its planner statistics (see `stages::statistics`), for `plan`.
async fn statistics_path(
    source: &crate::pg::catalog::ServerInfo,
    target: &crate::pg::catalog::ServerInfo,
) -> String {
    use crate::pg::version::{ServerVersion, statistics_carry_over};
    let tools = tokio::task::spawn_blocking(crate::pg::tools::find).await;
    let (num, tool) = match tools {
        Ok(Ok(t)) => (t.version_num, format!("pg_dump {}", t.version)),
        _ => (0, "no pg_dump found".to_string()),
    };
    let version = |n: i32| ServerVersion::from_num(u32::try_from(n).unwrap_or(0));
    match statistics_carry_over(
        version(source.version_num),
        version(target.version_num),
        num,
    ) {
        Ok(()) => format!(
            "planner statistics: carried over from the source by post_data ({tool}, pg_restore_relation_stats on the target); the cutover's ANALYZE covers only the tables left without"
        ),
        Err(reason) => format!(
            "planner statistics: gathered by the cutover's ANALYZE before the fence, not carried over ({reason})"
        ),
    }
}

pub async fn run(args: &PlanArgs, json: bool) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let env = match Env::new(plan.clone()) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            report(&e);
            return EXIT_USAGE;
        }
    };
    let mut out = String::new();
    // The objects an online plan creates on the source, named from the migration's name.
    let online = plan.has_kind(StageKind::Cdc);
    let _ = writeln!(out, "migration {} ({})", plan.name, plan.path);
    let _ = writeln!(out, "  source: {}", plan.source.display());
    let _ = writeln!(out, "  target: {}", plan.target.display());
    let _ = writeln!(
        out,
        "  checkpoints: {} schema {}",
        plan.state
            .database
            .as_deref()
            .map(|d| format!("target database {d},"))
            .unwrap_or_else(|| plan.state.endpoint.display()),
        plan.state.schema
    );
    for db in &plan.databases {
        let sel = if db.tables.is_empty() {
            "all tables".to_string()
        } else {
            db.tables.join(", ")
        };
        let ex = if db.exclude.is_empty() {
            String::new()
        } else {
            format!(" except {}", db.exclude.join(", "))
        };
        let _ = writeln!(out, "  database {} -> {}: {sel}{ex}", db.name, db.target);
        if online {
            let _ = writeln!(
                out,
                "    replication slot on the source: {}",
                crate::pg::names::slot_name(&plan.name, &db.name)
            );
        }
    }
    if online {
        let _ = writeln!(
            out,
            "  publication on the source: {}",
            crate::pg::names::publication_name(&plan.name)
        );
    }

    // States, if the migration has run before (read-only: the store is not created).
    let (records, rehearsal) = match open_store(&plan).await {
        Ok(Some(store)) => (
            store.stages().await.unwrap_or_default(),
            store.latest_report("rehearsal").await,
        ),
        Ok(None) => (Vec::new(), Ok(None)),
        Err(e) => {
            let _ = writeln!(out, "  (checkpoint store not readable: {})", e.message);
            (Vec::new(), Ok(None))
        }
    };

    let _ = writeln!(out, "\nstages, in order:");
    for (n, i) in plan.dag.order().into_iter().enumerate() {
        let s = &plan.stages[i];
        let overlaps = plan.overlaps(i);
        let after: Vec<String> = s
            .after
            .iter()
            .map(|&d| {
                if overlaps.contains(&d) {
                    format!("{} (starts while it runs)", plan.stages[d].id)
                } else {
                    plan.stages[d].id.clone()
                }
            })
            .collect();
        let state = records
            .iter()
            .find(|r| r.stage == s.id)
            .map(|r| r.state.to_string())
            .unwrap_or_else(|| "pending".into());
        let _ = writeln!(
            out,
            "  {}. {} ({}) [{}]{}",
            n + 1,
            s.id,
            s.kind,
            state,
            if after.is_empty() {
                String::new()
            } else {
                format!(" after {}", after.join(", "))
            }
        );
        if let Some(d) = &s.description {
            let _ = writeln!(out, "       {d}");
        }
        for line in stages::build(&env, i).describe() {
            let _ = writeln!(out, "       {line}");
        }
    }

    match rehearsal {
        Ok(Some((run, at, report))) => {
            let _ = write!(out, "{}", estimates(&plan, run, at, &report));
        }
        Ok(None) => {
            let _ = writeln!(
                out,
                "\nestimates: no rehearsal yet (`pgferry run {} --rehearsal` records one)",
                plan.path
            );
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "\nestimates: the rehearsal reports are not readable: {}",
                e.message
            );
        }
    }

    let online = plan.has_kind(StageKind::Cdc);
    let mut errors = 0;
    let mut reports = Vec::new();
    for db in &plan.databases {
        let r = inspect(&env, db, online).await;
        errors += r
            .findings
            .iter()
            .filter(|f| f.level == Level::Error)
            .count();
        if json {
            reports.push(r);
            continue;
        }
        let _ = writeln!(out, "\ndatabase {} -> {}:", r.database, r.target);
        if let (Some(s), Some(t)) = (&r.source_server, &r.target_server) {
            let _ = writeln!(out, "  PostgreSQL {} -> {}", s.version, t.version);
            if plan.has_kind(StageKind::PostData) {
                let _ = writeln!(out, "  {}", statistics_path(s, t).await);
            }
        }
        if !r.tables.is_empty() {
            // A partitioned table's estimate is the sum of its partitions': count the leaves only.
            let rows: i64 = r
                .tables
                .iter()
                .filter(|t| t.kind != "p")
                .map(|t| t.estimated_rows)
                .sum();
            let bytes: i64 = r.tables.iter().map(|t| t.total_bytes.unwrap_or(0)).sum();
            let _ = writeln!(
                out,
                "  {} table(s) selected, ~{rows} rows, {}",
                r.tables.len(),
                human_bytes(bytes.max(0) as u64)
            );
            let mut by_size: Vec<_> = r.tables.iter().collect();
            by_size.sort_by_key(|t| std::cmp::Reverse(t.total_bytes.unwrap_or(0)));
            let width = by_size
                .iter()
                .take(25)
                .map(|t| t.name.to_string().chars().count())
                .max()
                .unwrap_or(5);
            for t in by_size.iter().take(25) {
                let kind = if t.kind == "p" { " (partitioned)" } else { "" };
                let _ = writeln!(
                    out,
                    "    {:width$}  ~{:>10} rows  {:>9}{kind}",
                    t.name.to_string(),
                    t.estimated_rows,
                    human_bytes(t.total_bytes.unwrap_or(0).max(0) as u64)
                );
            }
            if by_size.len() > 25 {
                let _ = writeln!(out, "    ... and {} more", by_size.len() - 25);
            }
        }
        if r.findings.is_empty() {
            let _ = writeln!(out, "  preflight: no findings");
        } else {
            let _ = writeln!(out, "  preflight:");
            for f in &r.findings {
                for line in f.to_string().lines() {
                    let _ = writeln!(out, "    {line}");
                }
                // The message names ten at most: the plan lists them all.
                if f.tables.len() > 10 {
                    let _ = writeln!(out, "    all {} table(s):", f.tables.len());
                    for t in &f.tables {
                        let _ = writeln!(out, "      - {t}");
                    }
                }
            }
        }
    }
    if json {
        let doc = serde_json::json!({ "migration": plan.name, "databases": reports });
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: internal: the plan's report cannot be written as JSON: {e}");
                return EXIT_FAILED;
            }
        }
    } else {
        print!("{out}");
    }
    if errors > 0 {
        eprintln!("preflight would fail with {errors} error(s); fix them before `pgferry run`");
        return EXIT_FAILED;
    }
    EXIT_OK
}

/// The estimates drawn from a rehearsal's report: each stage's duration (and when it ran, from the
/// first stage's start, with the whole run's span: overlapping stages do not add up) and the write
/// downtime of the real run. The report is read defensively (`stages[].id` or `name`,
/// `stages[].seconds`, `started_at` and `ended_at` in epoch seconds;
/// `cutover[].simulated_downtime_seconds` per database, or a top-level `downtime_seconds`): fields
/// it lacks are left out.
fn estimates(
    plan: &crate::plan::Plan,
    run: i64,
    at: crate::state::Timestamp,
    report: &serde_json::Value,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nestimates from the latest rehearsal (run {run}, {}):",
        at.rfc3339()
    );
    let num = |s: &serde_json::Value, k: &str| s.get(k).and_then(serde_json::Value::as_f64);
    let stages: Vec<RehearsedStage> = report
        .get("stages")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    let name = s
                        .get("name")
                        .or_else(|| s.get("id"))
                        .and_then(serde_json::Value::as_str)?;
                    let seconds = num(s, "seconds")?;
                    // A stage an earlier run did has times of its own: no place on this one's.
                    let this_run = s.get("this_run").and_then(serde_json::Value::as_bool);
                    let span = num(s, "started_at")
                        .zip(num(s, "ended_at"))
                        .filter(|_| this_run != Some(false));
                    Some(RehearsedStage {
                        id: name.to_string(),
                        seconds,
                        span,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let width = plan.stages.iter().map(|s| s.id.len()).max().unwrap_or(5);
    let shown: Vec<&RehearsedStage> = plan
        .dag
        .order()
        .into_iter()
        .filter_map(|i| stages.iter().find(|s| s.id == plan.stages[i].id))
        .collect();
    // Where each stage ran in the rehearsal, from its first stage's start: stages that overlap
    // (post_data beside the load) do not add up.
    let first = shown
        .iter()
        .filter_map(|s| s.span.map(|(start, _)| start))
        .reduce(f64::min);
    for RehearsedStage { id, seconds, span } in shown.iter().copied() {
        let when = match (first, span) {
            (Some(first), Some((start, end))) => format!(
                "  (+{} to +{})",
                seconds_text(start - first),
                seconds_text(end - first)
            ),
            _ => String::new(),
        };
        let _ = writeln!(out, "  {id:width$}  ~{}{when}", seconds_text(*seconds));
    }
    if shown.is_empty() {
        let _ = writeln!(out, "  (the report has no stage durations)");
    }
    // The whole run's span, when every stage shown has its place on this run's clock.
    let end = shown
        .iter()
        .map(|s| s.span.map(|(_, end)| end))
        .collect::<Option<Vec<f64>>>()
        .and_then(|ends| ends.into_iter().reduce(f64::max));
    if let (Some(start), Some(end), true) = (first, end, shown.len() > 1) {
        let whole = end - start;
        let added: f64 = shown.iter().map(|s| s.seconds).sum();
        let overlap = if added > whole + 0.05 {
            format!(
                " (their durations add up to {}: some ran beside others)",
                seconds_text(added)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:width$}  ~{} from the first stage's start to the last one's end{overlap}",
            "whole run",
            seconds_text(whole)
        );
    }
    let downtime_of = |v: &serde_json::Value| {
        ["downtime_seconds", "simulated_downtime_seconds"]
            .iter()
            .find_map(|k| v.get(*k).and_then(serde_json::Value::as_f64))
    };
    // Per database (`cutover[]`: database, simulated_downtime_seconds), else one figure.
    let per_database: Vec<(String, f64)> = report
        .get("cutover")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| {
                    let d = downtime_of(c)?;
                    let db = c
                        .get("database")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("?");
                    Some((db.to_string(), d))
                })
                .collect()
        })
        .unwrap_or_default();
    const HOW: &str = "simulated in the rehearsal: fence to cdc drained and the rest copied";
    let single = match per_database.as_slice() {
        [(_, d)] => Some(*d),
        [] => downtime_of(report),
        _ => None,
    };
    if let Some(d) = single {
        let _ = writeln!(
            out,
            "  write downtime of the real run: ~{} ({HOW})",
            seconds_text(d)
        );
    } else if per_database.len() > 1 {
        let _ = writeln!(out, "  write downtime of the real run ({HOW}):");
        for (db, d) in &per_database {
            let _ = writeln!(out, "    {db}: ~{}", seconds_text(*d));
        }
    } else if plan.has_kind(StageKind::Cutover) {
        let _ = writeln!(out, "  write downtime: not in the report");
    }
    out
}

/// A stage of a rehearsal's report, as [`estimates`] reads it.
struct RehearsedStage {
    id: String,
    seconds: f64,
    /// When it started and ended (epoch seconds), if the rehearsal ran it.
    span: Option<(f64, f64)>,
}

fn seconds_text(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        humantime::format_duration(std::time::Duration::from_secs(s.round() as u64)).to_string()
    }
}
