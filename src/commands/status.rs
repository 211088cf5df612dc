//! `pgferry status PLAN [--json]`.

use super::{EXIT_FAILED, EXIT_OK, load, open_store, report};
use std::time::Duration;

use crate::cli::PlanArgs;
use crate::pg::connect::ConnInfo;
use crate::pg::names::slot_name;
use crate::plan::Plan;
use crate::state::StateStore;
use crate::status::{SlotInfo, Status};

/// How long `status` waits for the source before it shows the slot as unknown.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the source about `db`'s replication slot. Never fails: what went wrong goes in `error`.
async fn slot_info(plan: &Plan, db: &crate::plan::Database) -> SlotInfo {
    let mut info = SlotInfo {
        database: db.name.clone(),
        ..Default::default()
    };
    let slot = slot_name(&plan.name, &db.name);
    let ask = async {
        let conn = ConnInfo::new(&plan.source, Some(&db.name))?;
        let client = conn.connect("status").await?;
        let row = client
            .query_one(
                "SELECT pg_catalog.pg_current_wal_insert_lsn()::text, s.slot_name IS NOT NULL, coalesce(s.active, false), \
                        s.confirmed_flush_lsn::text, \
                        pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_insert_lsn(), s.restart_lsn)::int8, \
                        pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_insert_lsn(), s.confirmed_flush_lsn)::int8, \
                        s.wal_status \
                   FROM (SELECT 1) one LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| crate::error::Error::pg(&e, "reading the replication slot"))?;
        Ok::<_, crate::error::Error>(row)
    };
    match tokio::time::timeout(SOURCE_TIMEOUT, ask).await {
        Ok(Ok(row)) => {
            info.source_lsn = row.get(0);
            info.exists = row.get(1);
            info.active = row.get(2);
            info.confirmed_flush = row.get(3);
            info.retained_bytes = row.get(4);
            info.lag_bytes = row.get(5);
            info.wal_status = row.get(6);
            if !info.exists {
                info.error = Some(format!(
                    "replication slot {slot} does not exist on the source"
                ));
            }
        }
        Ok(Err(e)) => {
            info.error = Some(format!(
                "source not reachable: {}",
                e.to_string().lines().next().unwrap_or("")
            ))
        }
        Err(_) => {
            info.error = Some(format!(
                "source did not answer within {}",
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
    let slots = if plan.stages.iter().any(|s| s.kind == "cdc") {
        futures_util::future::join_all(plan.databases.iter().map(|db| slot_info(&plan, db))).await
    } else {
        Vec::new()
    };
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
