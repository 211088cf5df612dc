//! `pgferry unfence PLAN`: lifts the cutover fence, making every source database of the plan
//! writable again (`ALTER DATABASE ... RESET default_transaction_read_only`, and the write
//! privileges a `revoke_writes` fence took given back, [`crate::stages::fence`]). Used to roll back a
//! cutover, or once the old primary is to be reused. Sessions opened before it keep the setting they
//! started with; new sessions can write.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, load, report};
use crate::cli::PlanArgs;
use crate::error::Error;
use crate::pg::ident::quote_ident;
use crate::stages::Env;

pub async fn run(args: &PlanArgs) -> u8 {
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
    // With a fallback stream armed and not ended, the source is being written by it: making it
    // writable for the application would mix both. `rollback` or `fallback-stop` first.
    if plan
        .stages
        .iter()
        .any(|s| s.kind == crate::plan::StageKind::Fallback)
        && let Ok(Some(store)) = super::open_store(&plan).await
        && let Some(reason) = fallback_active(&plan, store.as_ref()).await
    {
        eprintln!(
            "error: {reason}\n  hint: `pgferry rollback {path}` goes back to the source keeping the target's writes; `pgferry fallback-stop {path}` ends the stream, after which `pgferry unfence {path}` makes the source writable without them",
            path = args.plan
        );
        return EXIT_FAILED;
    }
    // The revoke_writes fence's record lives in the store.
    let store = match super::open_store(&plan).await {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    let mut failed = false;
    for db in &plan.databases {
        if let Some(store) = &store {
            let given = async {
                let client = env.source_for(db).past_fence().connect("unfence").await?;
                crate::stages::fence::restore(&client, store.as_ref(), &db.name).await
            }
            .await;
            match given {
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
        let result = async {
            let client = env
                .source_for(db)
                .with_dbname("postgres")
                .connect("unfence")
                .await?;
            // Only a read_only fence sets it (and only the database's owner may reset it).
            let fenced: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s                        JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase AND s.setrole = 0                       WHERE d.datname = $1 AND EXISTS (SELECT 1 FROM unnest(s.setconfig) c WHERE c LIKE 'default_transaction_read_only=%'))",
                    &[&db.name],
                )
                .await
                .map_err(|e| Error::pg(&e, "reading the database's settings"))?
                .get(0);
            if fenced {
                client
                    .batch_execute(&format!(
                        "ALTER DATABASE {} RESET default_transaction_read_only",
                        quote_ident(&db.name)
                    ))
                    .await
                    .map_err(|e| Error::pg(&e, "lifting the fence"))?;
            }
            Ok::<_, Error>(())
        }
        .await;
        match result {
            Ok(()) => println!(
                "source database {} is writable again for new sessions",
                db.name
            ),
            Err(e) => {
                report(&e.context(format!("source database `{}`", db.name)));
                failed = true;
            }
        }
    }
    if failed { EXIT_FAILED } else { EXIT_OK }
}

/// Why the source must not be unfenced: a database whose cutover armed a fallback stream that no
/// rollback or stop has ended yet.
async fn fallback_active(
    plan: &crate::plan::Plan,
    store: &dyn crate::state::StateStore,
) -> Option<String> {
    let stage = plan
        .stages
        .iter()
        .find(|s| s.kind == crate::plan::StageKind::Fallback)?;
    for db in &plan.databases {
        let armed = store
            .position(&crate::stages::fallback::start_position(&db.name))
            .await
            .ok()
            .flatten()
            .is_some();
        let ended = store
            .checkpoint(&stage.id, &format!("database:{}", db.name))
            .await
            .ok()
            .flatten()
            .is_some_and(|v| v.get("done").and_then(serde_json::Value::as_bool) == Some(true));
        if armed && !ended {
            return Some(format!(
                "the fallback stream of database `{}` is armed: it writes the target's changes to the source, which must stay fenced for the application until a rollback or a stop ends it",
                db.name
            ));
        }
    }
    None
}
