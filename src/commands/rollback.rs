//! `pgferry rollback PLAN` and `pgferry fallback-stop PLAN`: operator requests for the `fallback`
//! stage (see [`crate::stages::fallback`]), recorded in the checkpoint store like `pgferry
//! cutover`'s, so they work from any machine. `rollback` then waits (unless `--no-wait`) until the
//! running stage has rolled every database back, and prints the write downtime.

use std::time::Duration;

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, load, open_store, report};
use crate::cli::PlanArgs;
use crate::plan::Plan;
use crate::stages::cdc::drain_key;
use crate::stages::fallback::{ROLLBACK_REQUEST, STOP_REQUEST};
use crate::state::{StageState, StateStore, hostname};

/// The plan's fallback stage, or the usage error that says it has none.
fn fallback_stage(plan: &Plan) -> Result<String, u8> {
    match plan
        .stages
        .iter()
        .find(|s| s.kind == crate::plan::StageKind::Fallback)
    {
        Some(s) => Ok(s.id.clone()),
        None => {
            eprintln!(
                "error: plan `{}` has no fallback stage, so its cutover armed no reverse stream\n  hint: `pgferry unfence {}` makes the source writable again, without the writes made on the target since the cutover; add a stage with kind = \"fallback\" after the cutover for the next migration",
                plan.name, plan.path
            );
            Err(EXIT_USAGE)
        }
    }
}

async fn store_of(plan: &Plan, path: &str) -> Result<Box<dyn StateStore>, u8> {
    match open_store(plan).await {
        Ok(Some(s)) => Ok(s),
        Ok(None) => {
            eprintln!(
                "error: migration `{}` has not started yet\n  hint: `pgferry run {path}` first",
                plan.name
            );
            Err(EXIT_FAILED)
        }
        Err(e) => {
            report(&e);
            Err(EXIT_FAILED)
        }
    }
}

fn requester() -> String {
    format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
        hostname()
    )
}

/// The outcome the fallback stage recorded for each database (`rolled_back`, `stopped`), with
/// its detail; `None` for a database not finished yet.
async fn outcomes(
    plan: &Plan,
    store: &dyn StateStore,
    stage: &str,
) -> crate::error::Result<Vec<(String, Option<serde_json::Value>)>> {
    let mut out = Vec::new();
    for db in &plan.databases {
        let v = store
            .checkpoint(stage, &format!("database:{}", db.name))
            .await?
            .filter(|v| v.get("done").and_then(serde_json::Value::as_bool) == Some(true));
        out.push((db.name.clone(), v));
    }
    Ok(out)
}

fn outcome(v: &serde_json::Value) -> &str {
    v.get("outcome")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
}

pub async fn rollback(args: &PlanArgs, wait: bool) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let stage = match fallback_stage(&plan) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let store = match store_of(&plan, &args.plan).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = async {
        let records = store.stages().await?;
        let cut = records
            .iter()
            .any(|r| r.kind == "cutover" && r.state == StageState::Done);
        if !cut {
            eprintln!(
                "error: the cutover of `{}` has not finished: the source is still the primary, there is nothing to take back\n  hint: stop the run (Ctrl-C) to stay on the source; `pgferry unfence {}` lifts a fence the cutover left",
                plan.name, args.plan
            );
            return Ok(EXIT_FAILED);
        }
        let done = outcomes(&plan, store.as_ref(), &stage).await?;
        if let Some((db, _)) = done
            .iter()
            .find(|(_, v)| v.as_ref().is_some_and(|v| outcome(v) == "stopped"))
        {
            eprintln!(
                "error: the fallback stream of database `{db}` was stopped (`pgferry fallback-stop`): the writes made on the target since cannot go back to the source\n  hint: `pgferry unfence {}` makes the source writable again without them",
                args.plan
            );
            return Ok(EXIT_FAILED);
        }
        if store.requested(STOP_REQUEST).await?.is_some() && done.iter().any(|(_, v)| v.is_none()) {
            eprintln!(
                "error: `pgferry fallback-stop` was requested for `{}`: the fallback stream is ending\n  hint: `pgferry unfence {}` makes the source writable again, without the target's writes",
                plan.name, args.plan
            );
            return Ok(EXIT_FAILED);
        }
        store.request(ROLLBACK_REQUEST, &requester()).await?;
        println!(
            "rollback of `{}` requested: the fallback stage fences the target, applies its last changes to the source, sets the source's sequences and makes the source writable again",
            plan.name
        );
        if !wait {
            return Ok(EXIT_OK);
        }
        let mut said_fence = std::collections::BTreeSet::new();
        let mut said_no_runner = false;
        loop {
            let done = outcomes(&plan, store.as_ref(), &stage).await?;
            for db in &plan.databases {
                if said_fence.contains(&db.name) {
                    continue;
                }
                if let Some(v) = store.checkpoint(&stage, &drain_key(&db.name)).await?
                    && let Some(lsn) = v.get("lsn").and_then(serde_json::Value::as_str)
                {
                    println!(
                        "  {}: target database {} fenced (read-only); draining the fallback stream to {lsn}",
                        db.name, db.target
                    );
                    said_fence.insert(db.name.clone());
                }
            }
            if done.iter().all(|(_, v)| v.is_some()) {
                for (db, v) in &done {
                    let v = v.as_ref().cloned().unwrap_or_default();
                    println!(
                        "  {db}: {} at {}; write downtime {:.1}s; {} sequence(s) set from the target ({} changed)",
                        if outcome(&v) == "rolled_back" { "rolled back" } else { outcome(&v) },
                        v.get("lsn").and_then(serde_json::Value::as_str).unwrap_or("?"),
                        v.get("downtime_seconds").and_then(serde_json::Value::as_f64).unwrap_or(0.0),
                        v.get("sequences").and_then(serde_json::Value::as_u64).unwrap_or(0),
                        v.get("sequences_changed").and_then(serde_json::Value::as_u64).unwrap_or(0),
                    );
                }
                println!(
                    "rollback of `{}` done: point the application at the source again; the target stays read-only",
                    plan.name
                );
                return Ok(EXIT_OK);
            }
            let records = store.stages().await?;
            if let Some(r) = records
                .iter()
                .find(|r| r.stage == stage && r.state == StageState::Failed)
            {
                eprintln!(
                    "error: the fallback stage failed: {}\n  hint: fix the cause, then `pgferry run {}` resumes the rollback (the request stays recorded)",
                    r.error.as_deref().unwrap_or("(no message)"),
                    args.plan
                );
                return Ok(EXIT_FAILED);
            }
            if store.runner().await?.is_none() {
                if !said_no_runner {
                    println!(
                        "  no runner is running `{}` right now: `pgferry run {}` carries out the rollback (the request is recorded); waiting",
                        plan.name, args.plan
                    );
                    said_no_runner = true;
                }
            } else {
                said_no_runner = false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    .await;
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            EXIT_FAILED
        }
    }
}

pub async fn stop(args: &PlanArgs) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Err(code) = fallback_stage(&plan) {
        return code;
    }
    let store = match store_of(&plan, &args.plan).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = async {
        if let Some(at) = store.requested(ROLLBACK_REQUEST).await? {
            eprintln!(
                "error: a rollback of `{}` was requested at {at}; it cannot be stopped half-way\n  hint: let `pgferry run {}` finish it",
                plan.name, args.plan
            );
            return Ok(EXIT_FAILED);
        }
        store.request(STOP_REQUEST, &requester()).await?;
        println!(
            "fallback-stop of `{}` requested: the fallback stage ends the reverse stream and drops its slot and publication on the target; the cutover can no longer be taken back without losing writes",
            plan.name
        );
        Ok::<_, crate::error::Error>(EXIT_OK)
    }
    .await;
    match result {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            EXIT_FAILED
        }
    }
}
