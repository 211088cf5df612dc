//! `pgferry reset PLAN`: tears down what the plan created, so that a rehearsal can be repeated:
//!
//! - each source database's replication slot and publication (and, for a plan with a fallback
//!   stage, the fallback slot and publication on each target database);
//! - the target databases pgferry created (the provision stage's record, or the checkpoint store's
//!   record of creating its own database), unless `--keep-target`. A target database pgferry has no
//!   record of creating is never dropped: reset refuses before changing anything;
//! - the migration's checkpoints (stage states, positions, artifacts, run log). Its runs, run
//!   reports and cdc lag samples are kept, so rehearsals can be compared afterwards. When the store
//!   lives in a target database being dropped, those rows are read first (and written to a file in
//!   the temporary directory while the database is dropped and the store created again), then put
//!   back.
//!
//! Asks first unless `--yes`.

use std::io::{BufRead, IsTerminal, Write};

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, create_store, load, open_store, report};
use crate::cli::PlanArgs;
use crate::error::{Error, Result};
use crate::pg::ident::quote_ident;
use crate::plan::Plan;
use crate::plan::StageKind;
use crate::stages::Env;
use crate::state::StateStore;

/// A target database reset will drop.
struct TargetDrop {
    database: String,
    /// The checkpoint store lives in it.
    hosts_store: bool,
}

pub async fn run(args: &PlanArgs, yes: bool, keep_target: bool) -> u8 {
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
                "error: reset drops replication slots, publications, checkpoints{}, and needs confirmation\n  hint: pass --yes to confirm without a terminal",
                if keep_target {
                    ""
                } else {
                    " and the target databases pgferry created"
                }
            );
            return EXIT_USAGE;
        }
        let targets: Vec<&str> = plan.databases.iter().map(|d| d.target.as_str()).collect();
        eprint!(
            "This drops the replication slots and publications of migration `{}` on the source, and its checkpoints (runs and reports are kept){}.\nType the migration name to confirm: ",
            plan.name,
            if keep_target {
                String::new()
            } else {
                format!(
                    ", and the target database(s) {} if pgferry created them",
                    targets.join(", ")
                )
            }
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
        // Older stores have no reports table yet; the kept rows are read from the current layout.
        if let Err(e) = store.upgrade().await {
            report(&e);
            return EXIT_FAILED;
        }
    }

    // Decide about every target database before changing anything.
    let drops = if keep_target {
        Vec::new()
    } else {
        match target_drops(&plan, &env, store.as_deref()).await {
            Ok(d) => d,
            Err(e) => {
                report(&e);
                return EXIT_FAILED;
            }
        }
    };

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
    // The fallback stream's slot and publication on the target (a cutover of a plan with a
    // fallback stage armed them); a target database that does not exist has none.
    if crate::stages::fallback::planned(&env) {
        for db in &plan.databases {
            match crate::stages::fallback::drop_objects(&env, db).await {
                Ok(()) => println!(
                    "dropped the fallback slot and publication (if any) on target database {}",
                    db.target
                ),
                Err(e) if e.sqlstate.as_deref() == Some("3D000") => {}
                Err(e) => {
                    report(&e.context(format!("target database `{}`", db.target)));
                    failed = true;
                }
            }
        }
    }
    // With the publication gone, the source tables provision gave a replica identity get their
    // own back (recorded in the store, which is forgotten below).
    if !failed && let Some(store) = &store {
        for db in &plan.databases {
            match restore_fence(&env, db, store.as_ref()).await {
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
            match crate::stages::cleanup::restore_source_identities(&env, db, store.as_ref()).await
            {
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
    }
    // A failure on the source side leaves everything else as it was: running reset again retries.
    if failed {
        return EXIT_FAILED;
    }

    // Target databases that stay: what cdc changed there for its apply is put back.
    for db in &plan.databases {
        if drops
            .iter()
            .any(|d| d.database == db.target && !d.hosts_store)
        {
            continue;
        }
        match crate::stages::cleanup::restore_target_objects(&env, db).await {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
            }
            Err(e) => {
                report(&e.context(format!("target database `{}`", db.target)));
                failed = true;
            }
        }
    }
    if failed {
        return EXIT_FAILED;
    }

    let admin = env.target.with_dbname("postgres");
    for d in drops.iter().filter(|d| !d.hosts_store) {
        match drop_database(&admin, &d.database).await {
            Ok(()) => println!("dropped target database {}", d.database),
            Err(e) => {
                report(&e.context(format!("target database `{}`", d.database)));
                failed = true;
            }
        }
    }
    if failed {
        return EXIT_FAILED;
    }

    let Some(store) = store else {
        println!("no checkpoint store to reset");
        return EXIT_OK;
    };
    let store_db = drops.iter().find(|d| d.hosts_store);
    let result = match store_db {
        None => store.forget_migration().await.map(|()| {
            vec![format!(
                "removed the checkpoints of `{}` from {} (kept: its runs and reports)",
                plan.name,
                store.describe()
            )]
        }),
        Some(d) => recreate_store_database(&plan, store, &admin, &d.database).await,
    };
    match result {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            EXIT_OK
        }
        Err(e) => {
            report(&e);
            EXIT_FAILED
        }
    }
}

/// The target databases to drop: those that exist and that pgferry created. Refuses (before
/// anything is changed) when one exists that pgferry has no record of creating, or when the store
/// would go with a database it shares with other migrations.
async fn target_drops(
    plan: &Plan,
    env: &Env,
    store: Option<&dyn StateStore>,
) -> Result<Vec<TargetDrop>> {
    let admin = env
        .target
        .with_dbname("postgres")
        .connect("reset")
        .await
        .map_err(|e| e.context("target server"))?;
    let target_server = env.target.server_key();
    let store_created = match store {
        Some(s) => s.created_database().await?,
        None => None,
    };
    let store_home = store.and_then(|s| s.home());
    let provision = plan
        .stages
        .iter()
        .filter(|s| s.kind == StageKind::Provision);
    let cutovers = plan.stages.iter().filter(|s| s.kind == StageKind::Cutover);
    let mut out = Vec::new();
    let mut refused = Vec::new();
    let mut cut_over = Vec::new();
    for db in &plan.databases {
        let exists: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1)",
                &[&db.target],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking up the target databases"))?
            .get(0);
        if !exists {
            println!("target database {}: not there", db.target);
            continue;
        }
        let mut created = store_created
            .as_ref()
            .is_some_and(|(server, name)| *server == target_server && *name == db.target);
        if let Some(store) = store {
            for stage in provision.clone() {
                let detail = store
                    .checkpoint(&stage.id, &crate::stages::database_key(&db.name))
                    .await?;
                created |= detail
                    .as_ref()
                    .and_then(|v| v.get("database_created"))
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
            }
        }
        if !created {
            refused.push(db.target.clone());
            continue;
        }
        // A real cutover (started or done) made this database the migrated one: never dropped.
        if let Some(store) = store {
            let mut real = false;
            for stage in cutovers.clone() {
                for key in [
                    crate::stages::database_key(&db.name),
                    crate::stages::cdc::drain_key(&db.name),
                ] {
                    if let Some(v) = store.checkpoint(&stage.id, &key).await? {
                        real |=
                            v.get("rehearsal").and_then(serde_json::Value::as_bool) != Some(true);
                    }
                }
            }
            if real {
                cut_over.push(db.target.clone());
                continue;
            }
        }
        let hosts_store = store_home
            .as_ref()
            .is_some_and(|(server, name)| *server == target_server && *name == db.target);
        out.push(TargetDrop {
            database: db.target.clone(),
            hosts_store,
        });
    }
    if !cut_over.is_empty() {
        return Err(Error::permanent(format!(
            "target database(s) {} went through a real cutover (not a rehearsal): they are the migrated databases now, and reset does not drop them; nothing was changed",
            cut_over.join(", ")
        ))
        .hint(format!(
            "`pgferry reset {} --keep-target` drops only the slot, publication and checkpoints; drop a target database by hand if you really mean to",
            plan.path
        )));
    }
    if !refused.is_empty() {
        return Err(Error::permanent(format!(
            "reset drops only the target databases pgferry created, and the checkpoint store has no record of creating {} (it existed before the first run, or its records are gone); nothing was changed",
            refused.join(", ")
        ))
        .hint(format!(
            "drop {} yourself if it is disposable, or keep it: `pgferry reset {} --keep-target` drops only the slot, publication and checkpoints",
            if refused.len() == 1 { "it" } else { "them" },
            plan.path
        )));
    }
    if let (Some(store), Some(d)) = (store, out.iter().find(|d| d.hosts_store)) {
        let others = store.other_migrations().await?;
        if !others.is_empty() {
            return Err(Error::permanent(format!(
                "the checkpoint store in target database {} also holds migration(s) {}; dropping the database would lose them; nothing was changed",
                d.database,
                others.join(", ")
            ))
            .hint(format!(
                "`pgferry reset {} --keep-target`, or reset those migrations first",
                plan.path
            )));
        }
    }
    Ok(out)
}

async fn drop_database(admin: &crate::pg::connect::ConnInfo, name: &str) -> Result<()> {
    let client = admin.connect("reset").await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote_ident(name)))
        .await
        .map_err(|e| {
            let hint = (e.code().map(|c| c.code()) == Some("55006")).then_some({
                "sessions are still connected to it (see pg_stat_activity): end them, then run reset again"
            });
            let err = Error::pg(&e, format!("dropping database {name}"));
            match hint {
                Some(h) => err.hint(h),
                None => err,
            }
        })
}

/// The store lives in a target database being dropped: read what is kept, drop the database,
/// create the store again (in a new, empty database of that name) and put the kept rows back.
async fn recreate_store_database(
    plan: &Plan,
    store: Box<dyn StateStore>,
    admin: &crate::pg::connect::ConnInfo,
    database: &str,
) -> Result<Vec<String>> {
    let kept = store.kept_rows().await?;
    let count = |t: &str| {
        kept.get(t)
            .and_then(serde_json::Value::as_array)
            .map(Vec::len)
            .unwrap_or(0)
    };
    let (runs, reports) = (count("runs"), count("reports"));
    let backup = std::env::temp_dir().join(format!(
        "pgferry-reset-{}-{}.json",
        plan.name,
        std::process::id()
    ));
    let text = serde_json::to_vec_pretty(&kept)
        .map_err(|e| Error::permanent(format!("serializing the kept runs and reports: {e}")))?;
    std::fs::write(&backup, text).map_err(|e| {
        Error::permanent(format!(
            "writing the kept runs and reports to {}: {e}",
            backup.display()
        ))
        .hint("set TMPDIR to a writable directory, or reset with --keep-target")
    })?;
    // Our own session must be gone before the database can be dropped.
    drop(store);
    let backup_note = || {
        format!(
            "the kept runs and reports are in {}; put them back with jsonb_populate_recordset into the store's runs, reports and samples tables",
            backup.display()
        )
    };
    drop_database(admin, database)
        .await
        .map_err(|e| e.context(backup_note()))?;
    let store = create_store(plan)
        .await
        .map_err(|e| e.context(backup_note()))?;
    store
        .restore_kept(&kept)
        .await
        .map_err(|e| e.context(backup_note()))?;
    let _ = std::fs::remove_file(&backup);
    Ok(vec![
        format!("dropped target database {database} (it held the checkpoint store)"),
        format!(
            "created the checkpoint store again in {} with the {runs} run(s) and {reports} report(s) of `{}`",
            store.describe(),
            plan.name
        ),
    ])
}

/// Gives back the write privileges a `revoke_writes` fence took (recorded in the store, which reset
/// forgets), so a reset never leaves the source without them.
async fn restore_fence(
    env: &Env,
    db: &crate::plan::Database,
    store: &dyn StateStore,
) -> Result<Vec<String>> {
    let client = match env.source_for(db).past_fence().connect("reset").await {
        Ok(c) => c,
        Err(e) if e.sqlstate.as_deref() == Some("3D000") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    crate::stages::fence::restore(&client, store, &db.name).await
}
