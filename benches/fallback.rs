//! Fallback benchmark (issue 18) on the test harness's source/target pair: Pagila plus pgbench's
//! tables, migrated online with a writer on the source and an automatic cutover that arms the
//! fallback stream, then:
//!
//! - reverse drain: a pgbench backlog written on the target while nothing applies it back, drained
//!   to the old source by pgferry's fallback stream (`pgferry run` resumed, start-up included)
//!   and, separately, by PostgreSQL's native logical replication in the same direction (a
//!   subscription in a copy of the source database on the source server, `copy_data = false`,
//!   disabled during the backlog); prints both times and native / pgferry;
//! - rollback: a writer on the target (Pagila rentals, payments, customer updates), then
//!   `pgferry rollback`: the write downtime pgferry records (target fence to source unfence) and
//!   the one the writer sees (its last write on the target to the rollback done); target < 5 s.
//!   Every table of the target then equals the source's.
//!
//! ```sh
//! cargo bench --bench fallback -- --scale 5 --tx 20000 --rate 100
//! ```

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Db, expect_exit, fresh_target, hash_digest, pgferry_cmd, poll, run_pg_dump, sh};
use support::{Cluster, PASSWORD, TestPlan, load_pagila, pair};

const POLL: Duration = Duration::from_millis(50);
const PGBENCH_TABLES: &str = "public.pgbench_accounts, public.pgbench_branches, public.pgbench_tellers, public.pgbench_history";

struct Args {
    scale: u32,
    tx: u32,
    rate: u32,
}

fn args() -> Args {
    let mut a = Args {
        scale: 5,
        tx: 20_000,
        rate: 100,
    };
    let mut it = std::env::args().skip(1).filter(|x| x != "--bench");
    while let Some(x) = it.next() {
        let mut num = |d: u32| it.next().and_then(|v| v.parse().ok()).unwrap_or(d);
        match x.as_str() {
            "--scale" => a.scale = num(a.scale),
            "--tx" => a.tx = num(a.tx),
            "--rate" => a.rate = num(a.rate).max(1),
            _ => {}
        }
    }
    a
}

fn pgbench(c: &Cluster, db: &str, args: &[&str]) -> Duration {
    sh(
        Command::new(c.tools_bindir.join("pgbench"))
            .args(args)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &c.port.to_string(),
                "-U",
                "postgres",
                db,
            ])
            .env("PGPASSWORD", PASSWORD)
            .stdout(Stdio::null()),
        "pgbench",
    )
}

fn stage_state(db: &Db, migration: &str, stage: &str) -> String {
    if !db.is("SELECT to_regclass('pgferry.stages') IS NOT NULL") {
        return String::new();
    }
    db.one(&format!(
        "SELECT state FROM pgferry.stages WHERE migration = '{migration}' AND stage = '{stage}'"
    ))
}

#[derive(Default, Debug)]
struct WriterStats {
    ok: u64,
    refused: u64,
    other_errors: u64,
    last_error: String,
    last_ok: Option<Instant>,
}

/// Small Pagila transactions at `rate` per second against `port` until `stop` or a fence.
fn writer(port: u16, db: String, rate: u32, stop: Arc<AtomicBool>) -> WriterStats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut st = WriterStats::default();
        let mut config = support::cluster::config_as(port, support::cluster::SUPERUSER, &db);
        config.application_name("bench writer");
        let Ok((client, conn)) = config.connect(tokio_postgres::NoTls).await else {
            st.last_error = "cannot connect".into();
            return st;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let every = Duration::from_secs_f64(1.0 / f64::from(rate));
        let mut due = tokio::time::Instant::now();
        let mut i: u64 = 0;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            due = (due + every).max(tokio::time::Instant::now());
            tokio::time::sleep_until(due).await;
            let sql = match i % 4 {
                0 | 1 => format!(
                    "WITH r AS (INSERT INTO public.rental (rental_date, inventory_id, customer_id, staff_id) \
                     VALUES (now(), {}, {}, 1) RETURNING rental_id, customer_id) \
                     INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date) \
                     SELECT customer_id, 1, rental_id, 7.77, timestamptz '2022-07-20 00:00+00' FROM r",
                    i % 4581 + 1,
                    i % 599 + 1
                ),
                2 => format!(
                    "UPDATE public.customer SET email = 'writer{i}@example.org' WHERE customer_id = {}",
                    i % 599 + 1
                ),
                _ => "WITH d AS (DELETE FROM public.payment WHERE payment_id = \
                      (SELECT min(payment_id) FROM public.payment_p2022_07 WHERE amount = 7.77) RETURNING rental_id) \
                      DELETE FROM public.rental WHERE rental_id IN (SELECT rental_id FROM d)"
                    .to_string(),
            };
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    st.ok += 1;
                    st.last_ok = Some(Instant::now());
                }
                Err(e) => {
                    let code = e.code().map(|c| c.code().to_string());
                    if matches!(code.as_deref(), Some("25006") | Some("57P01")) || client.is_closed()
                    {
                        st.refused += 1;
                        return st;
                    }
                    st.other_errors += 1;
                    st.last_error = e.to_string();
                }
            }
        }
        st
    })
}

fn main() {
    let a = args();
    let p = pair();
    let (src, tgt, native, migration) =
        ("fb_bench_src", "fb_bench_tgt", "fb_bench_native", "fbbench");
    for (c, db) in [(&p.source, src), (&p.source, native)] {
        c.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        );
    }
    p.source.psql("postgres", &format!("CREATE DATABASE {src}"));
    if !load_pagila(&p.source, src) {
        println!("\nfallback: SKIPPED (Pagila not found)");
        return;
    }
    pgbench(&p.source, src, &["-i", "-q", "-s", &a.scale.to_string()]);
    // pgbench_history has no key: REPLICA IDENTITY FULL (it only gets inserts; the WAL of an
    // INSERT is the same).
    p.source.psql(
        src,
        "ALTER TABLE public.pgbench_history REPLICA IDENTITY FULL",
    );
    p.source.psql(src, "VACUUM ANALYZE");
    fresh_target(&p.target, tgt);
    let plan = TestPlan::new(
        p,
        migration,
        src,
        tgt,
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\n\n\
         [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
         [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"sequences\"]\n\n\
         [stages.fallback]\nkind = \"fallback\"\nafter = [\"cutover\"]\n",
    );

    // The online migration under a writer on the source, up to the cutover.
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (stop, port, rate) = (stop.clone(), p.source.port, a.rate);
        std::thread::spawn(move || writer(port, src.to_string(), rate, stop))
    };
    let (mut cmd, log) = pgferry_cmd(&plan, &["run"], "run1.log");
    let t = Instant::now();
    let mut child = cmd.spawn().expect("spawn pgferry");
    let tdb = Db::connect_when_created(&p.target, tgt, &mut child, &log);
    poll(
        "the cutover and sequences",
        Duration::from_secs(900),
        POLL,
        || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("pgferry stopped ({status:?})\n{}", common::tail(&log, 60));
            }
            stage_state(&tdb, migration, "sequences") == "done"
                && stage_state(&tdb, migration, "fallback") == "running"
        },
    );
    stop.store(true, Ordering::SeqCst);
    let ws = w.join().expect("writer");
    eprintln!(
        "[bench] migration with a writer on the source ({} writes): cutover and sequences done after {:.1}s",
        ws.ok,
        t.elapsed().as_secs_f64()
    );

    // The native side: a copy of the source as it is now (equal to the target), subscribed to a
    // publication on the target, without copy; disabled while the backlog is built.
    let d = run_pg_dump(&p.target, tgt, &p.source, native);
    eprintln!(
        "[bench] native copy by pg_dump | psql: {:.1}s",
        d.as_secs_f64()
    );
    p.source
        .psql(native, "DROP SCHEMA IF EXISTS pgferry CASCADE");
    p.target.psql(
        tgt,
        &format!("CREATE PUBLICATION bench_back FOR TABLE {PGBENCH_TABLES}"),
    );
    // The launcher starts an apply worker at most once per `wal_retrieve_retry_interval` (5 s by
    // default): the timed ENABLE must not wait for it (see `benches/cdc.rs`).
    p.source.psql(
        "postgres",
        "ALTER SYSTEM SET wal_retrieve_retry_interval = '50ms'",
    );
    p.source.psql("postgres", "SELECT pg_reload_conf()");
    p.source.psql(
        native,
        &format!(
            "CREATE SUBSCRIPTION bench_back CONNECTION 'host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname={tgt}' \
             PUBLICATION bench_back WITH (copy_data = false)",
            p.target.port
        ),
    );
    poll(
        "the native subscription to stream",
        Duration::from_secs(60),
        POLL,
        || {
            tdb.is("SELECT count(*) = 1 FROM pg_stat_replication WHERE application_name = 'bench_back' AND state = 'streaming'")
        },
    );
    p.source
        .psql(native, "ALTER SUBSCRIPTION bench_back DISABLE");
    poll(
        "the native slot to be released",
        Duration::from_secs(60),
        POLL,
        || tdb.is("SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'bench_back'"),
    );
    // pgferry's side: the runner stops (SIGINT: at its next checkpoint); the fallback slot keeps
    // the backlog.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let _ = child.wait();

    // One backlog for both, written on the target.
    let d = pgbench(
        &p.target,
        tgt,
        &[
            "-n",
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            &(a.tx / 4).max(1).to_string(),
        ],
    );
    // The end of the backlog for both followers: a marker transaction whose WAL insert position
    // is read before its COMMIT; applied positions (commit ends) past it include it (as in
    // `benches/cdc.rs`'s drain).
    tdb.one("BEGIN");
    tdb.one("UPDATE public.pgbench_branches SET bbalance = bbalance WHERE bid = 1");
    let l = tdb.one("SELECT pg_current_wal_insert_lsn()");
    tdb.one("COMMIT");
    eprintln!(
        "[bench] backlog on the target: {} pgbench transactions in {:.1}s, target at {l}",
        a.tx,
        d.as_secs_f64()
    );
    let sdb = Db::connect(&p.source, src);
    let ndb = Db::connect(&p.source, native);

    // pgferry: the runner resumes the fallback stage, which drains the backlog.
    let (mut cmd, log) = pgferry_cmd(&plan, &["run"], "run2.log");
    let t = Instant::now();
    let mut child = cmd.spawn().expect("spawn pgferry");
    poll(
        "pgferry's fallback stream to drain",
        Duration::from_secs(3600),
        POLL,
        || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("pgferry stopped ({status:?})\n{}", common::tail(&log, 60));
            }
            sdb.is("SELECT to_regclass('pgferry.cdc_applied') IS NOT NULL")
            && sdb.is(&format!(
                "SELECT coalesce(bool_and(lsn > '{l}'::pg_lsn), false) FROM pgferry.cdc_applied WHERE slot LIKE '%\\_fb'"
            ))
        },
    );
    let ferry = t.elapsed().as_secs_f64();
    eprintln!("[bench] pgferry fallback drain: {ferry:.1}s (start-up included)");

    // Native, the same backlog in the same direction.
    let t = Instant::now();
    ndb.one("ALTER SUBSCRIPTION bench_back ENABLE");
    // Timed to its applied position (the origin's remote_lsn), as pgferry is; the slot's
    // confirmed position waits for the subscriber's WAL flush.
    poll(
        "the native subscription to drain",
        Duration::from_secs(3600),
        POLL,
        || {
            ndb.is(&format!(
                "SELECT coalesce(remote_lsn > '{l}'::pg_lsn, false) FROM pg_replication_origin_status \
                 WHERE external_id = (SELECT 'pg_' || oid FROM pg_subscription WHERE subname = 'bench_back')"
            ))
        },
    );
    let native_secs = t.elapsed().as_secs_f64();
    eprintln!("[bench] native drain: {native_secs:.1}s (to its applied position)");
    for table in PGBENCH_TABLES.split(", ") {
        let t_ = hash_digest(&p.target, tgt, table);
        assert_eq!(
            t_,
            hash_digest(&p.source, src, table),
            "pgferry's source differs in {table}"
        );
        assert_eq!(
            t_,
            hash_digest(&p.source, native, table),
            "native's copy differs in {table}"
        );
    }
    p.source.psql(native, "ALTER SUBSCRIPTION bench_back DISABLE; ALTER SUBSCRIPTION bench_back SET (slot_name = NONE); DROP SUBSCRIPTION bench_back");
    p.target.psql(
        tgt,
        "SELECT pg_drop_replication_slot('bench_back'); DROP PUBLICATION bench_back",
    );

    // The rollback under a writer on the target.
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (stop, port, rate) = (stop.clone(), p.target.port, a.rate);
        std::thread::spawn(move || writer(port, tgt.to_string(), rate, stop))
    };
    std::thread::sleep(Duration::from_secs(5));
    let (mut cmd, rlog) = pgferry_cmd(&plan, &["rollback"], "rollback.log");
    let t = Instant::now();
    let mut rb = cmd.spawn().expect("spawn pgferry rollback");
    expect_exit(&mut rb, 0, &rlog, "pgferry rollback");
    let done = Instant::now();
    let took = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let ws = w.join().expect("writer");
    expect_exit(&mut child, 0, &log, "pgferry run (fallback)");
    // The rollback's fence ended the polling session too (it is not pgferry's).
    let recorded: f64 = p
        .target
        .psql(tgt, &format!(
            "SELECT value->>'downtime_seconds' FROM pgferry.checkpoints WHERE migration = '{migration}' AND stage = 'fallback' AND key = 'database:{src}'"
        ))
        .parse()
        .expect("the rollback recorded its downtime");
    let writer_side = ws
        .last_ok
        .map(|l| done.saturating_duration_since(l).as_secs_f64())
        .unwrap_or(f64::NAN);
    let tables = common::user_tables(&p.source, src);
    let differing: Vec<&String> = tables
        .iter()
        .filter(|t| {
            support::row_digest(&p.source, src, t) != support::row_digest(&p.target, tgt, t)
        })
        .collect();

    println!(
        "\nfallback: Pagila + pgbench scale {}, writer at {} tx/s; reverse backlog of {} pgbench transactions written on the target",
        a.scale, a.rate, a.tx
    );
    println!(
        "{:<60} {:>8.1}",
        "pgferry fallback stream drain, start-up included (s)", ferry
    );
    println!(
        "{:<60} {:>8.1}",
        "native subscription drain, same direction (s)", native_secs
    );
    println!("{:<60} {:>8.2}", "native / pgferry", native_secs / ferry);
    println!(
        "{:<60} {:>8.1}",
        "`pgferry rollback` command (request to done, s)", took
    );
    println!(
        "{:<60} {:>8.2}",
        "rollback write downtime recorded (target fence to source unfence, s)", recorded
    );
    println!(
        "{:<60} {:>8.2}",
        "writer: last write on the target to rollback done (s)", writer_side
    );
    println!(
        "writer on the target: {} writes ok, {} refused by the fence, {} other errors ({})",
        ws.ok,
        ws.refused,
        ws.other_errors,
        if ws.last_error.is_empty() {
            "-"
        } else {
            &ws.last_error
        }
    );
    println!(
        "rollback write downtime vs target < 5 s: {}",
        if recorded.max(writer_side) < 5.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    assert!(
        differing.is_empty(),
        "tables differ after the rollback: {differing:?}"
    );
    println!(
        "{} tables equal on the target and the source after the rollback",
        tables.len()
    );
}
