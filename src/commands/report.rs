//! `pgferry report PLAN [--run N] [--json] [--html FILE]`: the kept run reports (see
//! `crate::report`). Without `--run`, the latest run (assembled now when it has no kept report yet,
//! such as a run still going on) and, when several reports are kept, the comparison of the latest.

use super::{EXIT_FAILED, EXIT_OK, load, open_store, report as print_error};
use crate::cli::PlanArgs;
use crate::error::Error;
use crate::report::{RunReport, collect, html, text};
use crate::state::StateStore;

pub async fn run(
    args: &PlanArgs,
    run: Option<i64>,
    json: bool,
    html_file: Option<&str>,
    compare: u32,
) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let store = match open_store(&plan).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!(
                "error: migration `{}` has not run yet: there is no checkpoint store\n  hint: `pgferry run {}` (or `run --rehearsal`) first",
                plan.name, args.plan
            );
            return EXIT_FAILED;
        }
        Err(e) => {
            print_error(&e);
            return EXIT_FAILED;
        }
    };
    let reports = match gather(&plan, store.as_ref(), run, compare).await {
        Ok(r) => r,
        Err(e) => {
            print_error(&e.context("pgferry report"));
            return EXIT_FAILED;
        }
    };
    let Some(latest) = reports.first() else {
        eprintln!(
            "error: migration `{}` has no run yet\n  hint: `pgferry run {}` first",
            plan.name, args.plan
        );
        return EXIT_FAILED;
    };
    if let Some(path) = html_file {
        let page = html::render(&reports);
        if let Err(e) = std::fs::write(path, page) {
            eprintln!(
                "error: writing the HTML report to {path}: {e}\n  hint: check that the directory exists and is writable"
            );
            return EXIT_FAILED;
        }
        eprintln!("wrote the HTML report of run {} to {path}", latest.run_id);
    }
    if json {
        match serde_json::to_string_pretty(latest) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: serializing the report: {e}");
                return EXIT_FAILED;
            }
        }
    } else {
        print!("{}", text::render(latest));
        if reports.len() > 1 {
            let oldest_first: Vec<RunReport> = reports.iter().rev().cloned().collect();
            println!();
            print!("{}", text::render_comparison(&oldest_first));
        }
    }
    EXIT_OK
}

/// The reports to show, newest first: the chosen (or latest) run's, then up to `compare - 1` kept
/// ones before it.
async fn gather(
    plan: &crate::plan::Plan,
    store: &dyn StateStore,
    run: Option<i64>,
    compare: u32,
) -> Result<Vec<RunReport>, Error> {
    let kept = store.reports(None, None, 200).await?;
    let mut parsed: Vec<RunReport> = Vec::new();
    for k in kept {
        let id = k.run_id;
        match serde_json::from_value::<RunReport>(k.report) {
            Ok(r) => parsed.push(r),
            Err(e) => tracing::warn!(
                "the kept report of run {id} cannot be read by this version, left out: {e}"
            ),
        }
    }
    let head_id = match run {
        Some(n) => n,
        None => match store.runs(1).await?.first() {
            Some(r) => r.id,
            None => match parsed.first() {
                // The runs were forgotten by `reset`; their reports are kept.
                Some(r) => r.run_id,
                None => return Ok(Vec::new()),
            },
        },
    };
    let head = match parsed.iter().find(|r| r.run_id == head_id) {
        Some(r) => r.clone(),
        None => collect::collect(plan, store, head_id).await?,
    };
    let mut out = vec![head];
    out.extend(
        parsed
            .into_iter()
            .filter(|r| r.run_id < head_id)
            .take(compare.saturating_sub(1) as usize),
    );
    Ok(out)
}
