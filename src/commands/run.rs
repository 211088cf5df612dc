//! `pgferry run PLAN`: runs every stage not yet done, resuming from checkpoints, under the runner lock.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::{
    EXIT_DATA_DIFFERS, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, create_store_for_run,
    load, report, stage_arg, store_conn,
};
use crate::cli::PlanArgs;
use crate::error::ErrorKind;
use crate::executor::{Executor, Node, Outcome, Selection};
use crate::plan::Plan;
use crate::stages::{self, Env};
use crate::state::StateStore;

pub async fn run(
    args: &PlanArgs,
    until: Option<String>,
    rerun: Vec<String>,
    rehearsal: bool,
) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut sel = Selection::default();
    if let Some(u) = &until {
        match stage_arg(&plan, u, "--until") {
            Ok(i) => sel.until = Some(i),
            Err(code) => return code,
        }
    }
    for r in &rerun {
        match stage_arg(&plan, r, "--rerun") {
            Ok(i) => sel.rerun.push(i),
            Err(code) => return code,
        }
    }
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());
    let argv: Vec<String> = std::env::args().skip(1).collect();
    execute(
        plan,
        &args.plan,
        sel,
        cancel,
        &redact_args(&argv),
        rehearsal,
    )
    .await
}

/// Runs a compiled plan under the runner lock, as `pgferry run` does; `pgferry demo` calls it too.
/// `cancel` stops the run at the next checkpoint; `recorded_args` is what the run log records;
/// `rehearsal`: `run --rehearsal` (the cutover does not fence the source).
pub(crate) async fn execute(
    plan: Arc<Plan>,
    plan_path: &str,
    sel: Selection,
    cancel: CancellationToken,
    recorded_args: &str,
    rehearsal: bool,
) -> u8 {
    let env = match Env::new(plan.clone()) {
        Ok(mut e) => {
            e.rehearsal = rehearsal;
            Arc::new(e)
        }
        Err(e) => {
            report(&e);
            return EXIT_USAGE;
        }
    };
    let selected = crate::executor::selection(&plan.dag, &sel);
    let mut built = vec![None; plan.stages.len()];
    for &i in &selected {
        built[i] = Some(stages::build(&env, i));
    }

    // An unusable `[state]` endpoint is a usage error, as before the store is reached.
    if let Err(e) = store_conn(&plan) {
        report(&e);
        return EXIT_USAGE;
    }
    let store: Arc<dyn StateStore> = match create_store_for_run(&plan).await {
        Ok(s) => Arc::from(s),
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    let _lock = match store.acquire_runner_lock().await {
        Ok(Ok(lock)) => lock,
        Ok(Err(holder)) => {
            eprintln!(
                "error: migration `{}` is already being run by {holder}\n  hint: wait for that run to finish, or stop it (Ctrl-C or SIGTERM: it stops at the next checkpoint); `pgferry status {}` shows its progress",
                plan.name, plan_path
            );
            return EXIT_FAILED;
        }
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };

    // A rehearsal's stage states (a cutover that did not fence) must never count for a real run,
    // nor a real run's progress be finished by a rehearsal.
    let mode = if rehearsal { "rehearsal" } else { "run" };
    match store.checkpoints_mode().await {
        Ok(Some(held)) if held != mode => {
            let (what, hint) = if held == "rehearsal" {
                (
                    format!(
                        "the checkpoint store holds a rehearsal of migration `{}` that was not reset: its stages (a cutover that never fenced the source) must not count for a real run",
                        plan.name
                    ),
                    format!(
                        "`pgferry reset {plan_path}` tears the rehearsal down (the slot, publication, checkpoints and the target databases pgferry created; run reports are kept), then `pgferry run {plan_path}`; or continue rehearsing with `--rehearsal`"
                    ),
                )
            } else {
                (
                    format!(
                        "the checkpoint store holds the progress of a real run of migration `{}`; a rehearsal cannot continue it",
                        plan.name
                    ),
                    format!(
                        "finish the real run with `pgferry run {plan_path}`, or start over with `pgferry reset {plan_path}` before rehearsing"
                    ),
                )
            };
            eprintln!("error: {what}\n  hint: {hint}");
            return EXIT_USAGE;
        }
        Ok(_) => {}
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    }
    let run_id = match store.begin_run(recorded_args).await {
        Ok(id) => id,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    if let Err(e) = store.set_run_mode(run_id, mode).await {
        report(&e);
        return EXIT_FAILED;
    }
    if rehearsal {
        let msg = "rehearsal: the cutover will not fence the source; it drains cdc to the source's position at the simulated fence and records the simulated write downtime";
        tracing::info!("{msg}");
        if let Err(e) = store.event(None, "info", msg).await {
            report(&e);
            return EXIT_FAILED;
        }
    }
    let mut nodes = nodes(&plan);
    for (i, n) in nodes.iter_mut().enumerate() {
        n.stage = built[i].take();
    }
    let executor = Executor::new(nodes, store.clone(), cancel.clone());
    let started = Instant::now();
    tracing::info!(migration = %plan.name, run = run_id, "run started; checkpoints in {}", store.describe());
    let bars = spawn_bars(&plan, store.clone());
    let result = executor.run(&sel).await;
    if let Some((stop, task)) = bars {
        stop.cancel();
        let _ = task.await;
    }
    let elapsed =
        humantime::format_duration(std::time::Duration::from_secs(started.elapsed().as_secs()));
    let (outcome, code) = match &result {
        Ok(Outcome::Done { ran, skipped }) => {
            if ran.is_empty() {
                eprintln!(
                    "nothing to do: every selected stage is already done ({})",
                    skipped.join(", ")
                );
            } else {
                eprintln!(
                    "done in {elapsed}: ran {}{}",
                    ran.join(", "),
                    if skipped.is_empty() {
                        String::new()
                    } else {
                        format!("; already done: {}", skipped.join(", "))
                    }
                );
            }
            ("done", EXIT_OK)
        }
        Ok(Outcome::Interrupted) => {
            eprintln!("interrupted after {elapsed}; run the same command again to resume");
            ("interrupted", EXIT_INTERRUPTED)
        }
        Ok(Outcome::Failed {
            error,
            data_differs,
            ..
        }) => {
            eprintln!("error: {error}");
            (
                "failed",
                if *data_differs {
                    EXIT_DATA_DIFFERS
                } else {
                    EXIT_FAILED
                },
            )
        }
        Err(e) => {
            report(e);
            let code = error_exit_code(e);
            ("failed", code)
        }
    };
    if let Err(e) = store.end_run(run_id, outcome).await {
        tracing::warn!("could not record the end of the run: {e}");
    }
    keep_report(&plan, store.as_ref(), run_id).await;
    code
}

/// The exit code of a run the executor refused or could not carry on (an error, not an outcome):
/// chosen by the error's kind, never by its text.
fn error_exit_code(e: &crate::error::Error) -> u8 {
    match e.kind {
        ErrorKind::ConfigChanged => EXIT_USAGE,
        // The executor reports a stage's failure as an outcome; an error here is the store's (or
        // an internal one).
        ErrorKind::Transient
        | ErrorKind::Permanent
        | ErrorKind::Interrupted
        | ErrorKind::DataDiffers => EXIT_FAILED,
    }
}

/// Snapshots the run's report into the store (`pgferry report`). Never fails the run: a report
/// that cannot be written is a warning.
async fn keep_report(plan: &Plan, store: &dyn StateStore, run_id: i64) {
    let kept = async {
        let report = crate::report::collect::collect(plan, store, run_id).await?;
        let value = serde_json::to_value(&report)
            .map_err(|e| crate::error::Error::permanent(format!("serializing the report: {e}")))?;
        store.put_report(run_id, &report.mode, &value).await
    };
    if let Err(e) = kept.await {
        tracing::warn!(
            "could not keep the report of run {run_id} (`pgferry report` will assemble it from the store): {e}"
        );
    }
}

/// On a terminal, live bars (`crate::progress`) redrawn from the store's stage states and the
/// in-process registry of tables being copied, until the returned token is cancelled.
fn spawn_bars(
    plan: &Arc<Plan>,
    store: Arc<dyn StateStore>,
) -> Option<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let mut bars = crate::progress::Bars::new()?;
    let stop = CancellationToken::new();
    let kinds: Vec<(String, String)> = plan
        .stages
        .iter()
        .map(|s| (s.id.clone(), s.kind.to_string()))
        .collect();
    let done = stop.clone();
    let task = tokio::spawn(async move {
        let mut views: Vec<crate::progress::StageView> = Vec::new();
        let mut tick = 0u32;
        loop {
            // The stages' states every second; the tables' bytes every 250 ms.
            if tick.is_multiple_of(4)
                && let Ok(records) = store.stages().await
            {
                let now = crate::state::Timestamp::now().0;
                views = kinds
                    .iter()
                    .filter_map(|(id, kind)| {
                        let r = records.iter().find(|r| &r.stage == id)?;
                        let seconds = match (r.started_at, r.ended_at) {
                            (Some(a), Some(b)) if r.state.as_str() != "running" => Some(b.0 - a.0),
                            (Some(a), _) => Some(now - a.0),
                            _ => None,
                        };
                        Some(crate::progress::StageView {
                            id: id.clone(),
                            kind: kind.clone(),
                            state: r.state.to_string(),
                            seconds: seconds.map(|s| s.max(0.0)),
                        })
                    })
                    .collect();
            }
            bars.update(&views);
            tick = tick.wrapping_add(1);
            tokio::select! {
                _ = done.cancelled() => break,
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            }
        }
        bars.clear();
    });
    Some((stop, task))
}

/// The executor's view of the plan's stages.
fn nodes(plan: &crate::plan::Plan) -> Vec<Node> {
    plan.stages
        .iter()
        .enumerate()
        .map(|(i, s)| Node {
            id: s.id.clone(),
            kind: s.kind.to_string(),
            fingerprint: s.fingerprint.clone(),
            deps: s.after.clone(),
            retries: s.retries,
            continuous: s.is_continuous(),
            overlaps: plan.overlaps(i),
            stage: None,
        })
        .collect()
}

/// The command line as recorded in the store: `--var` values may be secrets, so only their keys.
fn redact_args(argv: &[String]) -> String {
    let mut out = Vec::new();
    let mut next_is_var = false;
    for a in argv {
        if next_is_var {
            out.push(format!("{}=***", a.split('=').next().unwrap_or("")));
            next_is_var = false;
        } else if a == "--var" {
            out.push(a.clone());
            next_is_var = true;
        } else if let Some(v) = a.strip_prefix("--var=") {
            out.push(format!("--var={}=***", v.split('=').next().unwrap_or("")));
        } else {
            out.push(a.clone());
        }
    }
    out.join(" ")
}

/// Ctrl-C or SIGTERM: stop at the next checkpoint. A second one exits at once.
pub(super) fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    return;
                }
            };
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                eprintln!("stopping at the next checkpoint (press Ctrl-C again to exit at once)");
                cancel.cancel();
            } else {
                eprintln!("exiting now; the next run resumes from the last checkpoint");
                std::process::exit(i32::from(EXIT_INTERRUPTED));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{EXIT_FAILED, EXIT_USAGE, error_exit_code, redact_args};
    use crate::error::Error;

    #[test]
    fn the_exit_code_follows_the_error_kind_not_its_text() {
        assert_eq!(
            error_exit_code(&Error::config_changed("reworded")),
            EXIT_USAGE
        );
        assert_eq!(
            error_exit_code(&Error::permanent(
                "the configuration of stage `x` changed since it ran"
            )),
            EXIT_FAILED
        );
    }

    #[test]
    fn var_values_are_not_recorded() {
        let argv: Vec<String> = ["run", "p.toml", "--var", "pw=hunter2", "--var=x=y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = redact_args(&argv);
        assert_eq!(r, "run p.toml --var pw=*** --var=x=***");
        assert!(!r.contains("hunter2"));
    }
}
