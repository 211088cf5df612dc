//! `pgferry status PLAN [--json]`.

use super::{EXIT_FAILED, EXIT_OK, load, open_store, report};
use crate::cli::PlanArgs;
use crate::state::StateStore;
use crate::status::Status;

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
        Ok::<_, crate::error::Error>((records, runner, last_run, events, tables, validation))
    }
    .await;
    let (records, runner, last_run, events, tables, validation) = match gathered {
        Ok(x) => x,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
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
