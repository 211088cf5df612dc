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
                crate::stages::fence::restore(&client, store, &db.name).await
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
