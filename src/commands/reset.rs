//! `pgferry reset PLAN`: tears down what the plan created on the servers: each source database's
//! replication slot and publication, and the migration's checkpoints (the whole checkpoint schema when
//! no other migration uses it). Target data is left alone. Asks first unless `--yes`.

use std::io::{BufRead, IsTerminal, Write};

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, load, open_store, report};
use crate::cli::PlanArgs;
use crate::error::Result;
use crate::stages::Env;

pub async fn run(args: &PlanArgs, yes: bool) -> u8 {
    let plan = match load(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let env = match Env::new(plan.clone()) {
        Ok(e) => e,
        Err(e) => {
            report(&e);
            return EXIT_USAGE;
        }
    };
    if !yes {
        if !std::io::stdin().is_terminal() {
            eprintln!(
                "error: reset drops replication slots, publications and checkpoints, and needs confirmation\n  hint: pass --yes to confirm without a terminal"
            );
            return EXIT_USAGE;
        }
        eprint!(
            "This drops the replication slots and publications of migration `{}` on the source, and its checkpoints.\nType the migration name to confirm: ",
            plan.name
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        if std::io::stdin().lock().read_line(&mut answer).is_err() || answer.trim() != plan.name {
            eprintln!("not confirmed; nothing changed");
            return EXIT_USAGE;
        }
    }
    let store = match open_store(&plan).await {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    if let Some(store) = &store {
        match store.runner().await {
            Ok(Some(holder)) => {
                eprintln!(
                    "error: migration `{}` is running ({holder})\n  hint: stop that run first (Ctrl-C or SIGTERM), then reset",
                    plan.name
                );
                return EXIT_FAILED;
            }
            Ok(None) => {}
            Err(e) => {
                report(&e);
                return EXIT_FAILED;
            }
        }
    }
    let mut failed = false;
    for db in &plan.databases {
        match crate::stages::cleanup::drop_source_objects(&env, db, true, true).await {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
            }
            Err(e) => {
                report(&e.context(format!("source database `{}`", db.name)));
                failed = true;
            }
        }
    }
    if let Some(store) = store {
        let result: Result<String> = async {
            let others = store.other_migrations().await?;
            if others.is_empty() {
                store.drop_schema().await?;
                Ok(format!(
                    "dropped the checkpoint schema {}",
                    store.describe()
                ))
            } else {
                store.forget_migration().await?;
                Ok(format!(
                    "removed the checkpoints of `{}` from {} (kept: it also holds {})",
                    plan.name,
                    store.describe(),
                    others.join(", ")
                ))
            }
        }
        .await;
        match result {
            Ok(line) => println!("{line}"),
            Err(e) => {
                report(&e);
                failed = true;
            }
        }
    } else {
        println!("no checkpoint store to drop");
    }
    if failed { EXIT_FAILED } else { EXIT_OK }
}
