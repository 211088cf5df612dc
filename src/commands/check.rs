//! `pgferry check PLAN`: compile only.

use super::{EXIT_OK, load};
use crate::cli::PlanArgs;

pub fn run(args: &PlanArgs) -> u8 {
    match load(args) {
        Ok(plan) => {
            let kinds: Vec<String> = plan
                .dag
                .order()
                .iter()
                .map(|&i| plan.stages[i].id.clone())
                .collect();
            println!(
                "{}: plan `{}` is valid: {} database(s), {} stage(s): {}",
                args.plan,
                plan.name,
                plan.databases.len(),
                plan.stages.len(),
                kinds.join(" -> ")
            );
            EXIT_OK
        }
        Err(code) => code,
    }
}
