//! `pgferry graph PLAN`: the DAG as DOT or Mermaid, optionally coloured with the stages' states.

use std::collections::HashMap;

use super::{EXIT_FAILED, EXIT_OK, load, open_store, report};
use crate::cli::{GraphFormat, PlanArgs};

pub async fn run(args: &PlanArgs, format: GraphFormat, with_state: bool) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // The stages' states when a run exists. With `--state` the store must be reachable; without,
    // it is tried briefly and the plain graph drawn when it cannot be read.
    let mut states: HashMap<String, String> = HashMap::new();
    let found = if with_state {
        match open_store(&plan).await {
            Ok(Some(store)) => store.stages().await.map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        }
    } else {
        let attempt = async {
            match open_store(&plan).await {
                Ok(Some(store)) => store.stages().await.ok(),
                _ => None,
            }
        };
        Ok(
            tokio::time::timeout(std::time::Duration::from_secs(3), attempt)
                .await
                .ok()
                .flatten(),
        )
    };
    let records = match found {
        Ok(r) => r,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    let with_state = with_state || records.as_ref().is_some_and(|r| !r.is_empty());
    for r in records.into_iter().flatten() {
        states.insert(r.stage, r.state.to_string());
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
    // post_data starts while full_load still runs (the executor's overlap contract).
    let overlaps = |d: usize, i: usize| plan.overlaps(i).contains(&d);
    let out = match format {
        GraphFormat::Dot => plan.dag.to_dot(&label, &state, &overlaps),
        GraphFormat::Mermaid => plan.dag.to_mermaid(&label, &state, &overlaps),
    };
    print!("{out}");
    EXIT_OK
}
