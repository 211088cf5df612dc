//! `pgferry status PLAN [--json]`.

use super::{EXIT_FAILED, EXIT_OK, load, open_store, report};
use std::time::Duration;

use crate::cli::PlanArgs;
use crate::pg::connect::ConnInfo;
use crate::pg::lsn::Lsn;
use crate::pg::names::slot_name;
use crate::plan::Plan;
use crate::plan::StageKind;
use crate::state::StateStore;
use crate::status::{SlotInfo, Status};

/// How long `status` waits for the source before it shows the slot as unknown.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the source about `db`'s replication slot. Never fails: what went wrong goes in `error`.
async fn slot_info(plan: &Plan, db: &crate::plan::Database) -> SlotInfo {
    let conn = ConnInfo::new(&plan.source, Some(&db.name));
    slot_info_on(conn, &slot_name(&plan.name, &db.name), &db.name, "source").await
}

/// The fallback stream's slot of `db`, on the target (see [`crate::stages::fallback`]).
async fn fallback_slot_info(plan: &Plan, db: &crate::plan::Database) -> SlotInfo {
    let conn = ConnInfo::new(&plan.target, Some(&db.target));
    slot_info_on(
        conn,
        &crate::pg::names::fallback_slot_name(&plan.name, &db.name),
        &crate::stages::fallback::store_key(&db.name),
        "target",
    )
    .await
}

async fn slot_info_on(
    conn: crate::error::Result<ConnInfo>,
    slot: &str,
    key: &str,
    side: &str,
) -> SlotInfo {
    let mut info = SlotInfo {
        database: key.to_string(),
        ..Default::default()
    };
    let ask = async {
        let conn = conn?;
        let (client, version) = conn.connect_versioned("status").await?;
        let sql = format!(
            "SELECT pg_catalog.pg_current_wal_insert_lsn()::text, s.slot_name IS NOT NULL, coalesce(s.active, false), \
                    s.confirmed_flush_lsn::text, \
                    pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_insert_lsn(), s.restart_lsn)::int8, \
                    {} \
               FROM (SELECT 1) one LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = $1",
            version.slot_wal_status_column("s")
        );
        let row = client
            .query_one(&sql, &[&slot.to_string()])
            .await
            .map_err(|e| crate::error::Error::pg(&e, "reading the replication slot"))?;
        Ok::<_, crate::error::Error>(row)
    };
    match tokio::time::timeout(SOURCE_TIMEOUT, ask).await {
        Ok(Ok(row)) => {
            let lsn = |i: usize| row.get::<_, Option<String>>(i).and_then(|s| s.parse().ok());
            info.source_lsn = lsn(0);
            info.exists = row.get(1);
            info.active = row.get(2);
            info.confirmed_flush = lsn(3);
            info.retained_bytes = row.get(4);
            info.wal_status = row.get(5);
            if !info.exists {
                info.error = Some(format!(
                    "replication slot {slot} does not exist on the {side}"
                ));
            }
        }
        Ok(Err(e)) => {
            info.error = Some(format!(
                "{side} not reachable: {}",
                e.to_string().lines().next().unwrap_or("")
            ))
        }
        Err(_) => {
            info.error = Some(format!(
                "{side} did not answer within {}",
                humantime::format_duration(SOURCE_TIMEOUT)
            ))
        }
    }
    info
}

pub async fn run(args: &PlanArgs, json: bool) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let store = match open_store(&plan).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            let st = Status {
                plan: &plan,
                store: "not created yet".into(),
                records: Vec::new(),
                runner: None,
                last_run: None,
                events: Vec::new(),
                tables: Vec::new(),
                validation: None,
                counters: Vec::new(),
                positions: Vec::new(),
                slots: Vec::new(),
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&st.to_json()).unwrap_or_default()
                );
            } else {
                print!("{}", st.to_text());
                println!(
                    "\nmigration `{}` has not run yet: `pgferry run {}` starts it",
                    plan.name, args.plan
                );
            }
            return EXIT_OK;
        }
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    let gathered = async {
        let records = store.stages().await?;
        let runner = store.runner().await?;
        let last_run = store.runs(1).await?.into_iter().next();
        let events = store.events(8).await?;
        let tables = store.tables(None).await?;
        let validation = store
            .artifact(crate::stages::validate::LATEST_ARTIFACT)
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok());
        let counters = store.counters().await?;
        let positions = store.positions().await?;
        Ok::<_, crate::error::Error>((
            records, runner, last_run, events, tables, counters, positions, validation,
        ))
    }
    .await;
    let (records, runner, last_run, events, tables, counters, positions, validation) =
        match gathered {
            Ok(x) => x,
            Err(e) => {
                report(&e);
                return EXIT_FAILED;
            }
        };
    // The slots matter while cdc may stream: a plan with a cdc stage.
    let mut slots = if plan.stages.iter().any(|s| s.kind == StageKind::Cdc) {
        futures_util::future::join_all(plan.databases.iter().map(|db| slot_info(&plan, db))).await
    } else {
        Vec::new()
    };
    // The fallback stream's slots on the target, where the cutover armed one.
    let armed: Vec<&crate::plan::Database> = plan
        .databases
        .iter()
        .filter(|db| {
            let p = crate::stages::fallback::start_position(&db.name);
            positions.iter().any(|(n, _)| *n == p)
        })
        .collect();
    slots.extend(
        futures_util::future::join_all(armed.into_iter().map(|db| fallback_slot_info(&plan, db)))
            .await,
    );
    let st = Status {
        plan: &plan,
        store: store.describe(),
        records,
        runner,
        last_run,
        events,
        tables,
        validation,
        counters,
        positions,
        slots,
    };
    if json {
        match serde_json::to_string_pretty(&st.to_json()) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_FAILED;
            }
        }
    } else {
        print!("{}", st.to_text());
    }
    EXIT_OK
}

/// `pgferry status PLAN --watch [--interval 2s]`: redraws a compact view until Ctrl-C. On a
/// terminal the screen is cleared for each refresh; otherwise refreshes follow each other.
pub async fn watch(args: &PlanArgs, interval: std::time::Duration) -> u8 {
    use std::io::IsTerminal;
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let env = crate::stages::Env::new(plan.clone()).ok();
    let terminal = std::io::stdout().is_terminal();
    // Streams, not `ctrl_c()` futures made per refresh: a signal arriving during a refresh is
    // kept until the next wait instead of being lost.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: cannot listen for Ctrl-C: {e}");
            return EXIT_FAILED;
        }
    };
    loop {
        let body = match open_store(&plan).await {
            Ok(Some(store)) => match compact(&plan, store.as_ref(), env.as_ref()).await {
                Ok(text) => text,
                Err(e) => format!("error: {e}\n"),
            },
            Ok(None) => format!(
                "migration `{}` has not run yet: `pgferry run {}` starts it\n",
                plan.name, args.plan
            ),
            Err(e) => format!("checkpoint store unreachable: {e}\n"),
        };
        let now = crate::state::Timestamp::now().rfc3339();
        let header = format!(
            "pgferry status {} — every {} — {now} — Ctrl-C to stop",
            args.plan,
            humantime::format_duration(interval)
        );
        if terminal {
            print!("\x1b[2J\x1b[H{header}\n\n{body}");
        } else {
            print!("\n{header}\n\n{body}");
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::select! {
            _ = int.recv() => return EXIT_OK,
            _ = term.recv() => return EXIT_OK,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Stages, table counts, cdc lag per database and counters, in a few lines.
async fn compact(
    plan: &crate::plan::Plan,
    store: &dyn StateStore,
    env: Option<&crate::stages::Env>,
) -> crate::error::Result<String> {
    use std::fmt::Write as _;
    let st = Status {
        plan,
        store: store.describe(),
        records: store.stages().await?,
        runner: store.runner().await?,
        last_run: None,
        events: Vec::new(),
        tables: store.tables(None).await?,
        counters: Vec::new(),
        positions: Vec::new(),
        slots: Vec::new(),
        validation: None,
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} — {} / {} — runner: {}",
        plan.name,
        st.overall(),
        st.migration_state(),
        st.runner
            .as_ref()
            .map(|h| h.to_string())
            .unwrap_or_else(|| "none".into())
    );
    let _ = writeln!(
        out,
        "\n{:<16} {:<16} {:<9} {:>9}",
        "STAGE", "KIND", "STATE", "TIME"
    );
    for r in st.rows() {
        let time = r
            .duration_seconds
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:<9} {time:>9}",
            r.stage, r.kind, r.state
        );
        if let Some(e) = &r.error {
            let _ = writeln!(out, "    {}", e.lines().next().unwrap_or(""));
        }
    }
    let loads: Vec<&str> = plan
        .stages
        .iter()
        .filter(|s| s.kind == StageKind::FullLoad)
        .map(|s| s.id.as_str())
        .collect();
    let tables: Vec<&crate::state::TableProgress> = st
        .tables
        .iter()
        .filter(|t| loads.contains(&t.stage.as_str()) && !t.table.contains('#'))
        .collect();
    let copied = tables
        .iter()
        .filter(|t| t.state == crate::state::TableState::Copied)
        .count();
    let copying: Vec<&str> = tables
        .iter()
        .filter(|t| t.state == crate::state::TableState::Copying)
        .map(|t| t.table.as_str())
        .collect();
    if !tables.is_empty() {
        let _ = writeln!(
            out,
            "\ntables: {copied}/{} copied{}",
            tables.len(),
            if copying.is_empty() {
                String::new()
            } else {
                format!(", copying {}", copying.join(", "))
            }
        );
    }
    let counters = store.counters().await?;
    if plan.has_kind(StageKind::Cdc) {
        for db in &plan.databases {
            let applied = store
                .position(&crate::stages::cdc::applied_position(&db.name))
                .await?;
            let source_now = match env {
                Some(env) => source_position(env, db).await,
                None => None,
            };
            let gauge = counters
                .iter()
                .find(|(s, n, _)| s == &db.name && n == crate::lag::OLDEST_UNAPPLIED_GAUGE)
                .map(|c| c.2);
            let lag = crate::lag::Lag::new(gauge, crate::lag::now_ms(), source_now, applied);
            let _ = writeln!(
                out,
                "cdc {}: applied {}, source at {}, {lag} the source",
                db.name,
                applied.map_or("-".into(), |l| l.to_string()),
                source_now.map_or("unreachable".into(), |l| l.to_string())
            );
        }
    }
    if !counters.is_empty() {
        let _ = writeln!(out, "\ncounters:");
        // Per-migration and per-database counters; per-table ones would not fit a screen.
        for (scope, name, value) in counters.iter().filter(|(scope, _, _)| {
            scope.is_empty() || plan.databases.iter().any(|d| &d.name == scope)
        }) {
            let scope = if scope.is_empty() { "-" } else { scope };
            let _ = writeln!(out, "  {scope:<16} {name:<28} {value}");
        }
    }
    Ok(out)
}

/// The source's current WAL position, or `None` when it cannot be read within a few seconds.
async fn source_position(env: &crate::stages::Env, db: &crate::plan::Database) -> Option<Lsn> {
    let read = async {
        let client = env.source_for(db).connect("status").await.ok()?;
        client
            .query_one(
                "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                 ELSE pg_catalog.pg_current_wal_insert_lsn() END::text",
                &[],
            )
            .await
            .ok()?
            .get::<_, Option<String>>(0)?
            .parse()
            .ok()
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), read)
        .await
        .ok()
        .flatten()
}
