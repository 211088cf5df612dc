//! `pgferry graph PLAN`: the DAG as DOT or Mermaid, optionally coloured with the stages' states.

use std::collections::HashMap;

use super::{EXIT_FAILED, EXIT_OK, load, open_store, report};
use crate::cli::{GraphFormat, PlanArgs};
use crate::state::StateStore;

pub async fn run(args: &PlanArgs, format: GraphFormat, with_state: bool) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut states: HashMap<String, String> = HashMap::new();
    if with_state {
        match open_store(&plan).await {
            Ok(Some(store)) => match store.stages().await {
                Ok(records) => {
                    for r in records {
                        states.insert(r.stage, r.state.to_string());
                    }
                }
                Err(e) => {
                    report(&e);
                    return EXIT_FAILED;
                }
            },
            Ok(None) => {}
            Err(e) => {
                report(&e);
                return EXIT_FAILED;
            }
        }
    }
    let label = |i: usize| format!("{}\n{}", plan.stages[i].id, plan.stages[i].kind);
    let state = |i: usize| {
        if with_state {
            Some(
                states
                    .get(&plan.stages[i].id)
                    .cloned()
                    .unwrap_or_else(|| "pending".into()),
            )
        } else {
            None
        }
    };
    let out = match format {
        GraphFormat::Dot => plan.dag.to_dot(&label, &state),
        GraphFormat::Mermaid => plan.dag.to_mermaid(&label, &state),
    };
    print!("{out}");
    EXIT_OK
}
