//! `pgferry unfence PLAN`: lifts the cutover fence, making every source database of the plan
//! writable again (`ALTER DATABASE ... RESET default_transaction_read_only`). Used to roll back a
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
    let mut failed = false;
    for db in &plan.databases {
        let result = async {
            let client = env
                .source_for(db)
                .with_dbname("postgres")
                .connect("unfence")
                .await?;
            client
                .batch_execute(&format!(
                    "ALTER DATABASE {} RESET default_transaction_read_only",
                    quote_ident(&db.name)
                ))
                .await
                .map_err(|e| Error::pg(&e, "lifting the fence"))?;
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
