//! `pgferry verify PLAN [--report FILE] [--mode count|checksum|full] [--jobs N]`: validates now,
//! outside the DAG, with the plan's connections and its validate stage's options. While the plan's
//! cdc stage runs (in a `pgferry run` elsewhere), both snapshots are synchronized through the hold
//! protocol; otherwise plain snapshots are compared. Exit code 3 when the data differs.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::run::spawn_signal_handler;
use super::{
    EXIT_DATA_DIFFERS, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, load, open_store, report,
};
use crate::cli::{PlanArgs, VerifyMode};
use crate::error::ErrorKind;
use crate::plan::StageKind;
use crate::stages::Env;
use crate::stages::validate::{self, Mode, Options, SnapshotSync};
use crate::state::StateStore;

pub async fn run(
    args: &PlanArgs,
    report_file: Option<&str>,
    mode: Option<VerifyMode>,
    jobs: Option<u32>,
) -> u8 {
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
    let pg_store = match open_store(&plan).await {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    let runner = match &pg_store {
        Some(s) => match s.runner().await {
            Ok(r) => r,
            Err(e) => {
                report(&e);
                return EXIT_FAILED;
            }
        },
        None => None,
    };
    let store: Option<Arc<dyn StateStore>> = pg_store.map(Arc::from);
    let sync = match SnapshotSync::detect(&env, store.as_ref()).await {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    if let Some(why) = &sync.not_comparable {
        eprintln!(
            "error: cannot compare: {why}\n  hint: `pgferry reset {}` and rehearse again with a validate stage that runs while cdc runs (after cdc, before the cutover)",
            args.plan
        );
        return EXIT_FAILED;
    }
    // cdc is recorded as running, but no runner holds the lock: nobody would answer the hold.
    if sync.online.is_some() && runner.is_none() {
        eprintln!(
            "error: stage `{}` is running or ready in the checkpoint store but no `pgferry run` is running: nothing applies the source's changes, so the two sides cannot be compared as of one moment\n  hint: start `pgferry run {}` (cdc resumes and catches up), then verify again; or, once the source takes no more writes and the cutover is done, verify compares plain snapshots",
            sync.cdc_stage.as_deref().unwrap_or("cdc"),
            args.plan
        );
        return EXIT_FAILED;
    }
    let stage = plan
        .stages
        .iter()
        .position(|s| s.kind == StageKind::Validate);
    let options = {
        let env = env.clone();
        move |db: usize| {
            let mut o = match stage {
                Some(i) => Options::of_stage(&env, i, db),
                None => Options::default(),
            };
            if let Some(m) = mode {
                o.mode = match m {
                    VerifyMode::Count => Mode::Count,
                    VerifyMode::Checksum => Mode::Checksum,
                    VerifyMode::Full => Mode::Full,
                };
            }
            if let Some(j) = jobs {
                o.jobs = j.max(1) as usize;
            }
            o
        }
    };
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());
    let result = validate::validate(&env, "verify", &options, &sync, &cancel).await;
    let rep = match result {
        Ok(r) => r,
        Err(e) if e.kind == ErrorKind::Interrupted => {
            eprintln!("interrupted; nothing was recorded");
            return EXIT_INTERRUPTED;
        }
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    if let Some(store) = &store
        && let Err(e) = validate::store_report(store.as_ref(), &rep).await
    {
        report(&e.context("recording the report in the checkpoint store"));
        return EXIT_FAILED;
    }
    if let Some(path) = report_file {
        let text = match serde_json::to_string_pretty(&rep) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: serializing the report: {e}");
                return EXIT_FAILED;
            }
        };
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("error: writing the report to {path}: {e}");
            return EXIT_FAILED;
        }
    }
    for s in &rep.snapshots {
        eprintln!(
            "database {}: {} snapshots{}{}",
            s.database,
            s.method,
            s.lsn.map(|l| format!(" at {l}")).unwrap_or_default(),
            s.note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    eprintln!("{}", rep.summary(20));
    if rep.is_clean() {
        EXIT_OK
    } else {
        EXIT_DATA_DIFFERS
    }
}
