//! `pgferry cutover PLAN`: approves a manual cutover. It records the request in the checkpoint store,
//! so it works from any machine; the cutover stage picks it up when the lag allows.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, load, open_store, report};
use crate::cli::PlanArgs;
use crate::plan::StageOptions;
use crate::state::hostname;

pub async fn run(args: &PlanArgs) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let manual = plan.stages.iter().find_map(|s| match s.options.first() {
        Some(StageOptions::Cutover(o)) => Some((s.id.clone(), o.manual())),
        _ => None,
    });
    match manual {
        None => {
            eprintln!(
                "error: plan `{}` has no cutover stage\n  hint: add a stage with kind = \"cutover\" after the cdc stage",
                plan.name
            );
            return EXIT_USAGE;
        }
        Some((id, false)) => {
            eprintln!(
                "error: stage `{id}` has approval = \"auto\": it cuts over by itself when the lag allows\n  hint: set approval = \"manual\" to decide the moment yourself"
            );
            return EXIT_USAGE;
        }
        Some(_) => {}
    }
    let store = match open_store(&plan).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!(
                "error: migration `{}` has not started yet\n  hint: `pgferry run {}` first",
                plan.name, args.plan
            );
            return EXIT_FAILED;
        }
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    let by = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
        hostname()
    );
    match store.request("cutover", &by).await {
        Ok(()) => {}
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    }
    match store.requested("cutover").await {
        Ok(Some(at)) => println!(
            "cutover of `{}` approved (requested at {at}); the cutover stage proceeds once the lag is within max_lag",
            plan.name
        ),
        Ok(None) | Err(_) => println!("cutover of `{}` approved", plan.name),
    }
    EXIT_OK
}
