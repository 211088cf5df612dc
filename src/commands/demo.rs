//! `pgferry demo [--scale N] [--keep] [--port-base P]`: an online migration end to end on two
//! throwaway clusters, with no configuration. Starts the clusters (`demo::cluster`), generates the
//! source database (`demo::generator`), starts the writer (`demo::writer`), runs the bundled plan
//! (`demo::plan`) through the same code path as `pgferry run`, prints a summary, and stops the
//! clusters (unless `--keep`). Ctrl-C stops the run and removes the clusters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, open_store, report};
use crate::demo::cluster::{self, Cluster};
use crate::demo::{generator, plan as demo_plan, writer};
use crate::error::{Error, Result};
use crate::executor::Selection;
use crate::plan::Plan;
use crate::plan::StageKind;
use crate::stages::Env;

pub async fn run(scale: u32, keep: bool, port_base: Option<u16>) -> u8 {
    let scale = scale.max(1);
    let started = Instant::now();
    let bindir = match cluster::find_bindir() {
        Ok(b) => b,
        Err(e) => {
            report(&e);
            return EXIT_USAGE;
        }
    };
    let password = match cluster::random_password() {
        Ok(p) => p,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone());

    eprintln!(
        "starting two throwaway PostgreSQL clusters ({})",
        bindir.display()
    );
    let pw = password.clone();
    let pair = tokio::task::spawn_blocking(move || cluster::start_pair(&bindir, port_base, &pw))
        .await
        .unwrap_or_else(|e| Err(Error::permanent(format!("internal: {e}"))));
    let (mut source, mut target) = match pair {
        Ok(p) => p,
        Err(e) => {
            report(&e);
            return EXIT_FAILED;
        }
    };
    eprintln!(
        "source on 127.0.0.1:{}, target on 127.0.0.1:{} (in {} and {})",
        source.port,
        target.port,
        source.dir.display(),
        target.dir.display()
    );

    let code = match body(&source, &target, scale, &password, &cancel, started).await {
        Ok(code) => code,
        Err(e) => {
            if cancel.is_cancelled() {
                eprintln!("demo interrupted");
                EXIT_INTERRUPTED
            } else {
                report(&e);
                EXIT_FAILED
            }
        }
    };

    if keep && !cancel.is_cancelled() {
        source.keep();
        target.keep();
        println!("\nThe clusters keep running (--keep). Connect with:");
        println!(
            "  source: {}",
            cluster::psql_command(&source, demo_plan::DATABASE)
        );
        println!(
            "  target: {}",
            cluster::psql_command(&target, demo_plan::DATABASE)
        );
        let pw = source.dir.join(demo_plan::PASSWORD_FILE);
        println!(
            "  status: {}=$(cat {pw}) {}=$(cat {pw}) pgferry status {}",
            demo_plan::PASSWORD_VARS[0],
            demo_plan::PASSWORD_VARS[1],
            source.dir.join("demo.toml").display(),
            pw = pw.display()
        );
        println!(
            "Stop them with: pg_ctl -D {} stop; pg_ctl -D {} stop; then remove both directories",
            source.data_dir.display(),
            target.data_dir.display()
        );
        return code;
    }
    eprintln!("stopping the clusters and removing their directories");
    let stopped = tokio::task::spawn_blocking(move || {
        let a = source.stop();
        let b = target.stop();
        a.and(b)
    })
    .await
    .unwrap_or_else(|e| Err(Error::permanent(format!("internal: {e}"))));
    if let Err(e) = stopped {
        report(&e);
        if code == EXIT_OK {
            return EXIT_FAILED;
        }
    }
    code
}

/// Everything between starting and stopping the clusters.
async fn body(
    source: &Cluster,
    target: &Cluster,
    scale: u32,
    password: &str,
    cancel: &CancellationToken,
    started: Instant,
) -> Result<u8> {
    let plan = demo_plan::compile(&source.dir, source.port, target.port, password)?;
    let env = Env::new(plan.clone())?;
    let db = &plan.databases[0];

    // The source database.
    let generated = Instant::now();
    eprintln!(
        "generating the source database `{}` at scale {scale}",
        db.name
    );
    let admin = env.source.connect("demo setup").await?;
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {}",
            crate::pg::ident::quote_ident(&db.name)
        ))
        .await
        .map_err(|e| Error::pg(&e, "creating the demo source database"))?;
    drop(admin);
    let src = env.source_for(db).connect("demo generator").await?;
    tokio::select! {
        r = generator::generate(&src, scale) => r?,
        _ = cancel.cancelled() => return Err(Error::interrupted()),
    }
    let size: i64 = src
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .map_err(|e| Error::pg(&e, "reading the demo database's size"))?
        .get(0);
    let before = generator::counts(&src).await?;
    eprintln!(
        "generated {} rows ({} MB) in {:.1}s",
        before.iter().map(|(_, n)| n).sum::<i64>(),
        size / 1_000_000,
        generated.elapsed().as_secs_f64()
    );

    // The application, writing all along, and the migration.
    let writer_stop = cancel.child_token();
    let writer = writer::spawn(env.source_for(db), scale, writer_stop.clone());
    eprintln!("a writer keeps changing rentals and payments on the source; running the plan");
    let migrated = Instant::now();
    let code = super::run::execute(
        plan.clone(),
        &plan.path,
        Selection::default(),
        cancel.clone(),
        &format!("demo --scale {scale}"),
        false,
    )
    .await;
    let migration_time = migrated.elapsed();
    writer_stop.cancel();
    let written = writer.await.unwrap_or_default();
    if code != EXIT_OK {
        return Ok(code);
    }

    // The summary.
    // The fence terminated the source sessions opened before the cutover.
    drop(src);
    let src = env.source_for(db).connect("demo summary").await?;
    let tgt = env.target_for(db).connect("demo summary").await?;
    let source_counts = generator::counts(&src).await?;
    let target_counts = generator::counts(&tgt).await?;
    let mut out = String::new();
    out.push_str(&format!(
        "\npgferry demo: online migration of `{}` (scale {scale}) done\n\n",
        db.name
    ));
    out.push_str(&format!(
        "{:<16} {:>12} {:>12}  {}\n",
        "table", "source rows", "target rows", ""
    ));
    let mut all_equal = true;
    for ((t, s), (_, n)) in source_counts.iter().zip(&target_counts) {
        let same = s == n;
        all_equal &= same;
        out.push_str(&format!(
            "{t:<16} {s:>12} {n:>12}  {}\n",
            if same { "ok" } else { "DIFFERS" }
        ));
    }
    out.push_str(&format!(
        "{:<16} {:>12} {:>12}\n",
        "total",
        source_counts.iter().map(|(_, n)| n).sum::<i64>(),
        target_counts.iter().map(|(_, n)| n).sum::<i64>()
    ));
    out.push_str(&stage_durations(&plan).await?);
    out.push_str(&format!(
        "\nwriter: {} transactions on the source during the migration ({} rows inserted, {} updated, {} deleted); {}\n",
        written.transactions, written.inserts, written.updates, written.deletes, written.stopped
    ));
    match downtime(&plan).await? {
        Some(d) => out.push_str(&format!(
            "write downtime (fence to last change applied): {d:.2}s\n"
        )),
        None => out.push_str("write downtime: not recorded\n"),
    }
    match validation(&plan).await? {
        Some(r) => out.push_str(&format!("validation: {}\n", r.summary(5))),
        None => out.push_str("validation: not recorded\n"),
    }
    out.push_str(&format!(
        "row counts: {}\n",
        if all_equal {
            "source and target equal in every table"
        } else {
            "DIFFER (see above)"
        }
    ));
    out.push_str(&format!(
        "migration {:.1}s, whole demo {:.1}s\n",
        migration_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    print!("{out}");
    Ok(if all_equal {
        EXIT_OK
    } else {
        super::EXIT_DATA_DIFFERS
    })
}

/// How long each stage took, from the checkpoint store.
async fn stage_durations(plan: &Arc<Plan>) -> Result<String> {
    let Some(store) = open_store(plan).await? else {
        return Ok(String::new());
    };
    let records = store.stages().await?;
    let mut out = String::from("\nstage            kind             duration\n");
    for s in &plan.stages {
        let Some(r) = records.iter().find(|r| r.stage == s.id) else {
            continue;
        };
        let secs = match (r.started_at, r.ended_at) {
            (Some(a), Some(b)) => format!("{:.1}s", (b.0 - a.0).max(0.0)),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<16} {:<16} {secs:>8}  {}\n",
            s.id, s.kind, r.state
        ));
    }
    Ok(out)
}

/// The report of the plan's validate stage.
async fn validation(plan: &Arc<Plan>) -> Result<Option<crate::stages::validate::report::Report>> {
    let Some(store) = open_store(plan).await? else {
        return Ok(None);
    };
    let Some(stage) = plan.stages.iter().find(|s| s.kind == StageKind::Validate) else {
        return Ok(None);
    };
    let Some(bytes) = store
        .artifact(&crate::stages::validate::artifact_name(&stage.id))
        .await?
    else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&bytes).ok())
}

/// The write downtime the cutover stage recorded.
async fn downtime(plan: &Arc<Plan>) -> Result<Option<f64>> {
    let Some(store) = open_store(plan).await? else {
        return Ok(None);
    };
    let Some(stage) = plan.stages.iter().find(|s| s.kind == StageKind::Cutover) else {
        return Ok(None);
    };
    let key = crate::stages::database_key(&plan.databases[0].name);
    Ok(store.checkpoint(&stage.id, &key).await?.and_then(|v| {
        v.get("downtime_seconds")
            .and_then(serde_json::Value::as_f64)
    }))
}

/// Ctrl-C or SIGTERM: stop the run at the next checkpoint, then remove the clusters. Later ones
/// only say that the demo is cleaning up (exiting now would leave the clusters behind).
fn spawn_signal_handler(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    return;
                }
            };
        // A closed terminal (SIGHUP) must not leave the clusters behind either.
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                Some(_) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            if cancel.is_cancelled() {
                eprintln!("still stopping: removing the demo clusters");
            } else {
                eprintln!("stopping the demo");
                cancel.cancel();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
