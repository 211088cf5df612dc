//! CDC benchmarks on the test harness's source/target pair of PostgreSQL clusters:
//!
//! - `drain`: a backlog of pgbench transactions built while nothing applies, then drained by
//!   pgferry (`pgferry run`, start-up included) and, separately, by PostgreSQL's native logical
//!   replication (`CREATE SUBSCRIPTION ... WITH (copy_data = false)`, disabled during the backlog);
//!   prints both times and native / pgferry (target >= 2, issue 14). All three databases are compared
//!   afterwards.
//! - `drain-pagila`: the same with a backlog of Pagila writer transactions (a rental and its
//!   payment, a customer update, an actor update, a film_actor row deleted and put back: the soak
//!   benchmark's transaction), every table of Pagila published.
//! - `bigtx`: one source transaction of `--rows` rows applied by a running cdc stage; samples the
//!   runner's RSS every 50 ms (target: peak < 200 MB).
//! - `cutover`: Pagila with a concurrent writer, auto cutover with `fence = "read_only"`; the write
//!   downtime pgferry records and the one the writer sees (target < 5 s).
//! - `cutover-managed`: the same as the managed services' roles on both sides (no superuser: cdc in
//!   the managed apply mode, `docs/managed-services.md`), then as the superuser; both downtimes.
//!
//! ```sh
//! cargo bench --bench cdc -- drain --scale 10 --tx 200000 --clients 4 --repeat 2
//! cargo bench --bench cdc -- drain-pagila --tx 20000 --repeat 2
//! cargo bench --bench cdc -- bigtx --rows 1000000
//! cargo bench --bench cdc -- cutover --rate 200
//! cargo bench --bench cdc -- cutover-managed --rate 200
//! cargo bench --bench cdc -- all
//! BENCH_VERBOSE=1 cargo bench --bench cdc -- drain     # pgferry's log and status after each run
//! ```

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    Db, children_cpu, expect_exit, fresh_target, hash_digest, pgferry_cmd, poll, run_pg_dump, sh,
    tail, user_tables,
};
use support::{Cluster, PASSWORD, Pair, TestPlan, load_pagila, pair, row_digest};

struct Args {
    what: String,
    scale: u32,
    tx: u32,
    clients: u32,
    repeat: u32,
    rows: u32,
    rate: u32,
    /// `wal_sender_timeout` to set on the source for bigtx (server default 60s when unset).
    wal_sender_timeout: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        what: "all".into(),
        scale: 10,
        tx: 200_000,
        clients: 4,
        repeat: 1,
        rows: 1_000_000,
        rate: 200,
        wal_sender_timeout: None,
    };
    let mut it = std::env::args().skip(1).filter(|x| x != "--bench");
    while let Some(x) = it.next() {
        let mut num = |d: u32| it.next().and_then(|v| v.parse().ok()).unwrap_or(d);
        match x.as_str() {
            "--scale" => a.scale = num(a.scale),
            "--tx" => a.tx = num(a.tx),
            "--clients" => a.clients = num(a.clients).max(1),
            "--repeat" => a.repeat = num(a.repeat).max(1),
            "--rows" => a.rows = num(a.rows),
            "--rate" => a.rate = num(a.rate).max(1),
            "--wal-sender-timeout" => a.wal_sender_timeout = it.next(),
            "drain" | "drain-pagila" | "bigtx" | "cutover" | "cutover-managed" | "all" => {
                a.what = x
            }
            _ => {}
        }
    }
    a
}

fn verbose() -> bool {
    std::env::var_os("BENCH_VERBOSE").is_some()
}

// ----- processes --------------------------------------------------------------------------------

/// User + system CPU seconds of a live process (None once it is gone).
fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// `VmRSS` / `VmHWM` of a live process in kB.
fn proc_mem(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Read and write system calls (`syscr`, `syscw` of `/proc/PID/io`) and voluntary context
/// switches of a live process: one request/response round trip to a server costs at least one of
/// each, so they count round trips.
fn proc_calls(pid: u32) -> Option<Calls> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    // /proc/PID/status counts the main thread only; sum over every thread.
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
            switches += field(&status, "voluntary_ctxt_switches:").unwrap_or(0);
        }
    }
    Some((field(&io, "syscr:")?, field(&io, "syscw:")?, switches))
}

/// The last CPU figure seen for each of a few processes, sampled while they live.
/// Read syscalls, write syscalls, voluntary context switches.
type Calls = (u64, u64, u64);

#[derive(Default)]
struct CpuWatch {
    /// Label, pid, CPU seconds, calls.
    seen: Vec<(String, u32, f64, Calls)>,
}

impl CpuWatch {
    fn watch(&mut self, label: &str, pid: Option<u32>) {
        let Some(pid) = pid else { return };
        if let Some(cpu) = proc_cpu(pid) {
            let calls = proc_calls(pid).unwrap_or_default();
            match self.seen.iter_mut().find(|e| e.1 == pid) {
                Some(e) => {
                    e.2 = cpu;
                    e.3 = calls;
                }
                None => self.seen.push((label.to_string(), pid, cpu, calls)),
            }
        }
    }

    fn report(&self) -> String {
        self.seen
            .iter()
            .map(|(l, _, c, (r, w, v))| {
                format!("{l} {c:.1}s CPU, {r} read / {w} write syscalls, {v} voluntary switches")
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn pid_of(db: &Db, sql: &str) -> Option<u32> {
    db.one(sql).parse().ok()
}

fn sigint(child: &Child) {
    // SAFETY: kill with a pid we spawned and still own (not yet waited for).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
}

const POLL: Duration = Duration::from_millis(50);

/// `schema_dump`, `provision`, `full_load`, `post_data`, `cdc` (+ `extra`).
fn online_stages(extra: &str) -> String {
    format!(
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n{extra}"
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

fn applied_at_least(db: &Db, lsn: &str) -> bool {
    applied(db, lsn, ">=")
}

/// Past `lsn`: the applied position is a commit's end, so past a position read inside a
/// transaction means that transaction (or a later one) is applied.
fn applied_past(db: &Db, lsn: &str) -> bool {
    applied(db, lsn, ">")
}

fn applied(db: &Db, lsn: &str, op: &str) -> bool {
    db.is("SELECT to_regclass('pgferry.cdc_applied') IS NOT NULL")
        && db.is(&format!(
            "SELECT coalesce(bool_and(lsn {op} '{lsn}'::pg_lsn), false) FROM pgferry.cdc_applied"
        ))
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ----- drain --------------------------------------------------------------------------------------

struct DrainRound {
    backlog_secs: f64,
    /// ENABLE to the origin's remote_lsn past the backlog (applied).
    native: f64,
    /// ENABLE to the slot's confirmed_flush_lsn past the backlog (what the drain measured before).
    native_confirmed: f64,
    ferry_applied: f64,
    ferry_exit: f64,
    ferry_idle: f64,
    /// Start to the marker's row applied on the target, from its trigger's clock (not polled).
    native_exact: f64,
    ferry_exact: f64,
}

/// The end of a drain's backlog: one row the source updates once after the backlog, in a table of
/// its own (a trigger on a busy table would make pgferry apply that table in source order).
const MARKER_SETUP: &str = "CREATE TABLE public.bench_marker (id int PRIMARY KEY, n bigint NOT NULL);\n\
     INSERT INTO public.bench_marker VALUES (1, 0);";

/// On a follower's target: an `ENABLE ALWAYS` trigger (it fires for native's apply worker and for
/// pgferry's, replica mode or not) that writes the clock when the marker's update is applied, so
/// the drain's time does not depend on when a poll happens to look (50 ms apart, against drains of
/// 0.3-0.8 s).
const MARKER_SEEN: &str = "CREATE TABLE public.bench_marker_seen (at timestamptz NOT NULL);\n\
     CREATE FUNCTION public.bench_marker_seen() RETURNS trigger LANGUAGE plpgsql AS \
       $$BEGIN INSERT INTO public.bench_marker_seen VALUES (clock_timestamp()); RETURN NULL; END$$;\n\
     CREATE TRIGGER bench_marker_seen AFTER UPDATE ON public.bench_marker FOR EACH ROW \
       EXECUTE FUNCTION public.bench_marker_seen();\n\
     ALTER TABLE public.bench_marker ENABLE ALWAYS TRIGGER bench_marker_seen;";

/// Seconds since the Unix epoch, the clock `bench_marker_seen` is compared with.
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Seconds from `started` (epoch) to when the marker was applied on `db`'s target.
fn marker_seen(db: &Db, started: f64) -> f64 {
    let at: f64 = db
        .one("SELECT extract(epoch FROM max(at)) FROM public.bench_marker_seen")
        .parse()
        .expect("the marker's trigger fired once the backlog was applied");
    at - started
}

const PGBENCH_TABLES: &str = "public.pgbench_accounts, public.pgbench_branches, public.pgbench_tellers, public.pgbench_history";

fn pgbench(src: &Cluster, db: &str, args: &[&str]) -> Duration {
    sh(
        Command::new(src.tools_bindir.join("pgbench"))
            .args(args)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &src.port.to_string(),
                "-U",
                "postgres",
                db,
            ])
            .env("PGPASSWORD", PASSWORD)
            .stdout(Stdio::null()),
        "pgbench",
    )
}

/// What the drain's backlog is made of.
#[derive(Clone, Copy, PartialEq)]
enum Workload {
    /// `pgbench -n -c N -j 2 -t T/N` (TPC-B-like) on `pgbench -i -s scale`.
    Pgbench,
    /// The soak benchmark's Pagila transaction, `--tx` times from one session.
    Pagila,
}

/// `--tx` Pagila writer transactions in one session (a DO block committing each): the soak
/// benchmark's five statements, with keys drawn at random.
fn pagila_backlog(src: &Cluster, db: &str, tx: u32) -> Duration {
    let t = Instant::now();
    src.psql(
        db,
        &format!(
            "DO $$ DECLARE inv int; cust int; act int; fil int; BEGIN \
               FOR i IN 1..{tx} LOOP \
                 inv := 1 + floor(random() * 4581)::int; cust := 1 + floor(random() * 599)::int; \
                 act := 1 + floor(random() * 200)::int; fil := 1 + floor(random() * 1000)::int; \
                 WITH r AS (INSERT INTO public.rental (rental_date, inventory_id, customer_id, staff_id) \
                   VALUES (clock_timestamp(), inv, cust, 1) RETURNING rental_id, customer_id) \
                 INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date) \
                   SELECT customer_id, 1, rental_id, 4.99, timestamptz '2022-07-20 00:00+00' FROM r; \
                 UPDATE public.customer SET email = 'drain_' || i || '@example.org' WHERE customer_id = cust; \
                 UPDATE public.actor SET last_update = now() WHERE actor_id = act; \
                 WITH d AS (DELETE FROM public.film_actor WHERE actor_id = act AND film_id = \
                   (SELECT min(film_id) FROM public.film_actor WHERE actor_id = act AND film_id >= fil) \
                   RETURNING actor_id, film_id) \
                 INSERT INTO public.film_actor (actor_id, film_id) SELECT actor_id, film_id FROM d; \
                 COMMIT; \
               END LOOP; END $$"
        ),
    );
    t.elapsed()
}

fn drain_round(a: &Args, p: &Pair, src: &str, round: u32, w: Workload) -> DrainRound {
    let migration = format!("cdcdrain{round}");
    let tf = "drain_ferry";
    let tn = "drain_native";
    let sub = format!("bench_native_{round}");
    fresh_target(&p.target, tf);
    fresh_target(&p.target, tn);
    let sdb = Db::connect(&p.source, src);

    // pgferry: load and catch up (the run ends by itself once cdc is ready: nothing after it).
    let plan = TestPlan::new(p, &migration, src, tf, &online_stages(""));
    let (mut cmd, log) = pgferry_cmd(&plan, &["run"], "setup.log");
    let t = Instant::now();
    let mut child = cmd.spawn().expect("spawn pgferry");
    expect_exit(&mut child, 0, &log, "pgferry setup run");
    eprintln!(
        "[bench]   pgferry load + catch-up: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let tdb = Db::connect(&p.target, tf);
    assert_eq!(
        stage_state(&tdb, &migration, "cdc"),
        "ready",
        "cdc not ready"
    );
    p.target.psql(tf, MARKER_SEEN);

    // Native: same data by pg_dump | psql (no writes since the load), a subscription without copy.
    let d = run_pg_dump(&p.source, src, &p.target, tn);
    eprintln!(
        "[bench]   native target by pg_dump | psql: {:.1}s",
        d.as_secs_f64()
    );
    p.target.psql(tn, MARKER_SEEN);
    let tables: Vec<String> = match w {
        Workload::Pgbench => PGBENCH_TABLES
            .split(", ")
            .chain(["public.bench_marker"])
            .map(str::to_string)
            .collect(),
        Workload::Pagila => user_tables(&p.source, src),
    };
    let published = match w {
        Workload::Pgbench => format!("TABLE {PGBENCH_TABLES}, public.bench_marker"),
        Workload::Pagila => "ALL TABLES".to_string(),
    };
    p.source.psql(
        src,
        &format!("DROP PUBLICATION IF EXISTS bench_native; CREATE PUBLICATION bench_native FOR {published}"),
    );
    // The launcher starts a subscription's apply worker at most once per
    // `wal_retrieve_retry_interval` (default 5 s): the ENABLE of the timed drain, a few seconds
    // after this setup's start, would otherwise wait up to 5 s for a worker (measured: native's
    // drain of 20,000 Pagila transactions took 6.0 s, of which its worker used 0.8 s of CPU).
    // A DBA enabling a subscription once does not meet that wait; the benchmark must not either.
    p.target.psql(
        "postgres",
        "ALTER SYSTEM SET wal_retrieve_retry_interval = '50ms'",
    );
    p.target.psql("postgres", "SELECT pg_reload_conf()");
    p.target.psql(
        tn,
        &format!(
            "CREATE SUBSCRIPTION {sub} CONNECTION 'host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname={src}' \
             PUBLICATION bench_native WITH (copy_data = false)",
            p.source.port
        ),
    );
    poll(
        "the native subscription to stream",
        Duration::from_secs(60),
        POLL,
        || {
            sdb.is(&format!(
                "SELECT count(*) = 1 FROM pg_stat_replication WHERE application_name = '{sub}' AND state = 'streaming'"
            ))
        },
    );
    p.target
        .psql(tn, &format!("ALTER SUBSCRIPTION {sub} DISABLE"));
    poll(
        "the native slot to be released",
        Duration::from_secs(60),
        POLL,
        || {
            sdb.is(&format!(
                "SELECT NOT active FROM pg_replication_slots WHERE slot_name = '{sub}'"
            ))
        },
    );

    // One backlog for both.
    let per_client = (a.tx / a.clients).max(1);
    let total = per_client * a.clients;
    let d = match w {
        Workload::Pgbench => pgbench(
            &p.source,
            src,
            &[
                "-n",
                "-c",
                &a.clients.to_string(),
                "-j",
                "2",
                "-t",
                &per_client.to_string(),
            ],
        ),
        Workload::Pagila => pagila_backlog(&p.source, src, total),
    };
    // The end of the backlog, the same for both followers: one marker transaction after it (the
    // update of `bench_marker`), whose WAL insert position is read inside it, before its COMMIT.
    // A follower has applied the whole backlog once its applied position (pgferry's stored
    // `cdc_applied`, native's origin `remote_lsn`: both the end of the last applied commit) is
    // past that position, which only the marker's commit record can be. The slot's confirmed
    // position is not a measure of "applied": native reports only what its target has flushed,
    // up to a WAL-writer cycle later. The insert position, not pg_current_wal_lsn() (the write
    // position, which acknowledged asynchronous commits can lie beyond). The polls below wait for
    // that; the time reported is the marker trigger's clock on the target (`MARKER_SEEN`).
    let marker = "UPDATE public.bench_marker SET n = n + 1 WHERE id = 1";
    sdb.one("BEGIN");
    sdb.one(marker);
    let l = sdb.one("SELECT pg_current_wal_insert_lsn()");
    sdb.one("COMMIT");
    eprintln!(
        "[bench]   backlog: {total} {} transactions in {:.1}s ({:.0} tx/s), source at {l}; retained WAL: {}",
        w.name(),
        d.as_secs_f64(),
        f64::from(total) / d.as_secs_f64(),
        sdb.one(&format!(
            "SELECT string_agg(slot_name || ' ' || pg_size_pretty(pg_wal_lsn_diff('{l}', confirmed_flush_lsn)), ', ' ORDER BY slot_name) FROM pg_replication_slots WHERE database = '{src}'"
        ))
    );
    let backlog_secs = d.as_secs_f64();

    let ndb = Db::connect(&p.target, tn);
    let run_native = || -> (f64, f64, f64) {
        p.source.psql(src, "CHECKPOINT");
        p.target.psql("postgres", "CHECKPOINT");
        let mut cpu = CpuWatch::default();
        let mut started = None;
        let origin = format!(
            "SELECT coalesce(remote_lsn > '{l}'::pg_lsn, false) FROM pg_replication_origin_status \
             WHERE external_id = (SELECT 'pg_' || oid FROM pg_subscription WHERE subname = '{sub}')"
        );
        let t = Instant::now();
        let t0 = epoch_now();
        ndb.one(&format!("ALTER SUBSCRIPTION {sub} ENABLE"));
        poll(
            "the native subscription to apply the backlog",
            Duration::from_secs(3600),
            POLL,
            || {
                cpu.watch(
                    "walsender",
                    pid_of(
                        &sdb,
                        &format!(
                            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{sub}'"
                        ),
                    ),
                );
                let worker = pid_of(
                    &ndb,
                    &format!(
                        "SELECT pid FROM pg_stat_subscription WHERE subname = '{sub}' AND relid IS NULL"
                    ),
                );
                if worker.is_some() && started.is_none() {
                    started = Some(t.elapsed().as_secs_f64());
                }
                cpu.watch("apply worker", worker);
                ndb.is(&origin)
            },
        );
        let took = t.elapsed().as_secs_f64();
        let exact = marker_seen(&ndb, t0);
        poll(
            "the native slot to be confirmed past the backlog",
            Duration::from_secs(3600),
            POLL,
            || {
                sdb.is(&format!(
                    "SELECT coalesce(confirmed_flush_lsn > '{l}'::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = '{sub}'"
                ))
            },
        );
        let confirmed = t.elapsed().as_secs_f64();
        ndb.one(&format!("ALTER SUBSCRIPTION {sub} DISABLE"));
        eprintln!(
            "[bench]   native drain: apply worker seen after {:.2}s, marker applied after {exact:.3}s (polled: past {l} after {took:.2}s), slot confirmed after {confirmed:.1}s; CPU (last sampled): {}",
            started.unwrap_or(f64::NAN),
            cpu.report()
        );
        (took, confirmed, exact)
    };
    let run_ferry = || -> (f64, f64, f64) {
        p.source.psql(src, "CHECKPOINT");
        p.target.psql("postgres", "CHECKPOINT");
        let mut cpu = CpuWatch::default();
        let mut peak_rss = 0u64;
        let cpu_before = children_cpu();
        let (mut cmd, log) = pgferry_cmd(&plan, &["run"], "drain.log");
        let t = Instant::now();
        let t0 = epoch_now();
        let mut child = cmd.spawn().expect("spawn pgferry");
        let pid = child.id();
        poll("pgferry to drain", Duration::from_secs(3600), POLL, || {
            if let Some(kb) = proc_mem(pid, "VmRSS") {
                peak_rss = peak_rss.max(kb);
            }
            cpu.watch("pgferry", Some(pid));
            cpu.watch(
                    "walsender",
                    pid_of(
                        &sdb,
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_%' AND active",
                    ),
                );
            cpu.watch(
                "target apply backend",
                pid_of(
                    &tdb,
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgferry cdc apply'",
                ),
            );
            if let Ok(Some(status)) = child.try_wait() {
                // It may have finished between two polls; the position decides.
                if !applied_past(&tdb, &l) {
                    panic!(
                        "pgferry exited ({status:?}) before applying up to {l}\n{}",
                        tail(&log, 60)
                    );
                }
            }
            applied_past(&tdb, &l)
        });
        let applied = t.elapsed().as_secs_f64();
        expect_exit(&mut child, 0, &log, "pgferry drain run");
        let exited = t.elapsed().as_secs_f64();
        eprintln!(
            "[bench]   pgferry drain: applied up to {l} after {applied:.1}s, exited after {exited:.1}s; pgferry's CPU (rusage) {:.1}s; last sampled: {}; peak RSS {:.0} MB",
            children_cpu() - cpu_before,
            cpu.report(),
            mb(peak_rss)
        );
        if verbose() {
            eprintln!("{}", tail(&log, 40));
        }
        let exact = marker_seen(&tdb, t0);
        eprintln!(
            "[bench]   pgferry drain: started at {t0:.3} (epoch), marker applied after {exact:.3}s"
        );
        (applied, exited, exact)
    };
    let ((native, native_confirmed, native_exact), (ferry_applied, ferry_exit, ferry_exact)) =
        if round.is_multiple_of(2) {
            let f = run_ferry();
            (run_native(), f)
        } else {
            let n = run_native();
            (n, run_ferry())
        };

    // pgferry's fixed cost: a run with nothing to drain.
    let (mut cmd, log) = pgferry_cmd(&plan, &["run"], "idle.log");
    let t = Instant::now();
    let mut child = cmd.spawn().expect("spawn pgferry");
    expect_exit(&mut child, 0, &log, "pgferry idle run");
    let ferry_idle = t.elapsed().as_secs_f64();
    eprintln!("[bench]   pgferry run with nothing to drain: {ferry_idle:.1}s");
    if verbose() {
        let out = plan.run(&["status"]);
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }

    // Both targets must equal the source.
    for table in &tables {
        let s = hash_digest(&p.source, src, table);
        let f = hash_digest(&p.target, tf, table);
        let n = hash_digest(&p.target, tn, table);
        assert_eq!(s, f, "pgferry's target differs from the source in {table}");
        assert_eq!(s, n, "native's target differs from the source in {table}");
    }
    eprintln!("[bench]   both targets equal the source (count and hashtext sum per table)");

    // Cleanup: the subscription drops its slot; pgferry's slot and publication go by hand.
    p.target.psql(tn, &format!("DROP SUBSCRIPTION {sub}"));
    p.source.psql(
        src,
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_%' AND NOT active",
    );
    p.source.psql(
        src,
        &format!("DROP PUBLICATION IF EXISTS bench_native, pgferry_{migration}"),
    );
    DrainRound {
        backlog_secs,
        native,
        native_confirmed,
        ferry_applied,
        ferry_exit,
        ferry_idle,
        native_exact,
        ferry_exact,
    }
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Pgbench => "pgbench (TPC-B-like)",
            Workload::Pagila => "Pagila writer",
        }
    }
}

fn drain(a: &Args, w: Workload) {
    let p = pair();
    // Both followers' target databases in the target's buffer cache at once: at scale 10 each
    // one's `pgbench_accounts` is ~150 MB with its index, and with the harness's 128 MB the second
    // drain of a round found its pages evicted by the first's (the order alternates per round).
    p.target
        .psql("postgres", "ALTER SYSTEM SET shared_buffers = '768MB'");
    p.target.pg_ctl(&["restart", "-m", "fast"]);
    let src = match w {
        Workload::Pgbench => "drain_src",
        Workload::Pagila => "drain_pagila_src",
    };
    p.source
        .psql("postgres", &format!("DROP DATABASE IF EXISTS {src}"));
    p.source.psql("postgres", &format!("CREATE DATABASE {src}"));
    let t = Instant::now();
    match w {
        Workload::Pgbench => {
            pgbench(&p.source, src, &["-i", "-q", "-s", &a.scale.to_string()]);
            // pgbench_history has no key; pgferry refuses to publish such a table (its UPDATEs
            // and DELETEs would fail on the source). pgbench only inserts into it, and REPLICA
            // IDENTITY FULL changes nothing in the WAL of an INSERT: the same backlog for both.
            p.source.psql(
                src,
                "ALTER TABLE public.pgbench_history REPLICA IDENTITY FULL",
            );
        }
        Workload::Pagila => {
            if !load_pagila(&p.source, src) {
                let msg = "drain-pagila: Pagila not found (put it under ../shared/data/pagila)";
                assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
                println!("\n{msg}: SKIPPED");
                return;
            }
        }
    }
    p.source.psql(src, MARKER_SETUP);
    p.source.psql(src, "VACUUM ANALYZE");
    eprintln!(
        "[bench] drain: {} data set loaded in {:.1?}",
        w.name(),
        t.elapsed()
    );
    let mut rounds = Vec::new();
    for r in 0..a.repeat {
        eprintln!("[bench] drain round {}", r + 1);
        rounds.push(drain_round(a, p, src, r, w));
    }
    let total = f64::from((a.tx / a.clients).max(1) * a.clients);
    let best = |f: fn(&DrainRound) -> f64| rounds.iter().map(f).fold(f64::INFINITY, f64::min);
    let native = best(|r| r.native);
    let applied = best(|r| r.ferry_applied);
    let exited = best(|r| r.ferry_exit);
    let idle = best(|r| r.ferry_idle);
    println!(
        "\ndrain: {total} {} transactions, {} changes{}, built in {:.1}s; best of {} round(s)",
        w.name(),
        if w == Workload::Pagila {
            format!("up to {}", total * 6.0)
        } else {
            format!("{}", total * 4.0)
        },
        if w == Workload::Pagila {
            String::new()
        } else {
            format!(", scale {}, {} clients", a.scale, a.clients)
        },
        best(|r| r.backlog_secs),
        a.repeat
    );
    let native_exact = best(|r| r.native_exact);
    let ferry_exact = best(|r| r.ferry_exact);
    println!("{:<56} {:>9} {:>10}", "", "seconds", "tx/s");
    let native_confirmed = best(|r| r.native_confirmed);
    let row = |label: &str, secs: f64, rate: bool| {
        if rate {
            println!("{label:<56} {secs:>9.3} {:>10.0}", total / secs);
        } else {
            println!("{label:<56} {secs:>9.3} {:>10}", "-");
        }
    };
    row(
        "native subscription (ENABLE to marker applied)",
        native_exact,
        true,
    );
    row(
        "native subscription (ENABLE to applied > L, polled)",
        native,
        true,
    );
    row(
        "native subscription (ENABLE to slot confirmed > L)",
        native_confirmed,
        true,
    );
    row("pgferry run (start to marker applied)", ferry_exact, true);
    row("pgferry run (start to applied > L, polled)", applied, true);
    row("pgferry run (start to exit)", exited, false);
    row(
        "pgferry run with nothing to drain (fixed cost)",
        idle,
        false,
    );
    println!(
        "ratio native / pgferry: {:.2}x (target >= 2x: {}); polled every {} ms: {:.2}x",
        native_exact / ferry_exact,
        if native_exact / ferry_exact >= 2.0 {
            "met"
        } else {
            "NOT met"
        },
        POLL.as_millis(),
        native / applied,
    );
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "  round {}: native {:.3}s (polled {:.2}s, slot confirmed {:.2}s), pgferry {:.3}s (polled {:.2}s) -> {:.2}x (polled {:.2}x)",
            i + 1,
            r.native_exact,
            r.native,
            r.native_confirmed,
            r.ferry_exact,
            r.ferry_applied,
            r.native_exact / r.ferry_exact,
            r.native / r.ferry_applied
        );
    }
}

// ----- bigtx ------------------------------------------------------------------------------------

fn bigtx(a: &Args) {
    let p = pair();
    let src = "bigtx_src";
    let tgt = "bigtx_tgt";
    let migration = "cdcbigtx";
    p.source.psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {src} WITH (FORCE)"),
    );
    p.source.psql("postgres", &format!("CREATE DATABASE {src}"));
    fresh_target(&p.target, tgt);
    p.source
        .psql(src, "CREATE TABLE public.t (id int PRIMARY KEY, v text)");
    // The server default (60s) unless asked: cdc must keep the walsender informed while it applies
    // a transaction that takes longer than that.
    let timeout = a.wal_sender_timeout.as_deref().unwrap_or("60s");
    p.source.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET wal_sender_timeout = '{}'",
            timeout.replace('\'', "")
        ),
    );
    p.source.psql("postgres", "SELECT pg_reload_conf()");
    // A manual cutover after cdc keeps the runner (and cdc) running.
    let plan = TestPlan::new(
        p,
        migration,
        src,
        tgt,
        &online_stages("[stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\n"),
    );
    let (mut cmd, log) = pgferry_cmd(&plan, &["run"], "bigtx.log");
    let mut child = cmd.spawn().expect("spawn pgferry");
    let pid = child.id();
    let tdb = Db::connect_when_created(&p.target, tgt, &mut child, &log);
    poll("cdc to be ready", Duration::from_secs(300), POLL, || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pgferry stopped early ({status:?})\n{}", tail(&log, 60));
        }
        stage_state(&tdb, migration, "cdc") == "ready"
    });
    let baseline = proc_mem(pid, "VmRSS").unwrap_or(0);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let stop = stop.clone();
        let peak = peak.clone();
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if let Some(kb) = proc_mem(pid, "VmRSS") {
                    peak.fetch_max(kb, Ordering::SeqCst);
                    samples += 1;
                }
                std::thread::sleep(POLL);
            }
            samples
        })
    };
    let cpu_ferry = proc_cpu(pid).unwrap_or(0.0);
    let calls_before = proc_calls(pid).unwrap_or_default();
    let t = Instant::now();
    p.source.psql(
        src,
        &format!(
            "INSERT INTO public.t SELECT g, repeat('x', 100) FROM generate_series(1, {}) g",
            a.rows
        ),
    );
    let committed = t.elapsed().as_secs_f64();
    let sdb = Db::connect(&p.source, src);
    // The insert position: with synchronous_commit = off (the harness's setting) acknowledged
    // commits can lie beyond pg_current_wal_lsn(), the write position.
    let l = sdb.one("SELECT pg_current_wal_insert_lsn()");
    poll(
        "the big transaction to be applied",
        Duration::from_secs(3600),
        POLL,
        || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("pgferry stopped early ({status:?})\n{}", tail(&log, 60));
            }
            applied_at_least(&tdb, &l)
        },
    );
    let applied = t.elapsed().as_secs_f64();
    let hwm = proc_mem(pid, "VmHWM").unwrap_or(0);
    let cpu_ferry = proc_cpu(pid).unwrap_or(0.0) - cpu_ferry;
    let calls = proc_calls(pid).unwrap_or_default();
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().expect("sampler");
    sigint(&child);
    expect_exit(&mut child, 130, &log, "pgferry (SIGINT)");
    let peak = peak.load(Ordering::SeqCst);
    let restarts = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("transient failure"))
        .count();
    if verbose() {
        eprintln!("{}", tail(&log, 40));
    }

    let s = hash_digest(&p.source, src, "public.t");
    let d = hash_digest(&p.target, tgt, "public.t");
    if s != d {
        eprintln!(
            "[bench] bigtx: the target DIFFERS; big transaction committed before {l}; applied: {}; pgferry's log:\n{}",
            tdb.one("SELECT string_agg(slot || ' ' || lsn, ', ') FROM pgferry.cdc_applied"),
            tail(&log, 80)
        );
    }
    assert_eq!(
        s, d,
        "the target differs from the source after the big transaction"
    );
    eprintln!("[bench] bigtx: target equals the source ({s})");
    p.source.psql(
        src,
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_%' AND NOT active",
    );

    println!(
        "\nbigtx: one source transaction inserting {} rows (int + 100-byte text) while cdc runs",
        a.rows
    );
    println!("{:<44} {:>10.1}", "source INSERT ... COMMIT (s)", committed);
    println!(
        "{:<44} {:>10.1}",
        "commit to applied on the target (s)",
        applied - committed
    );
    println!(
        "{:<44} {:>10.0}",
        "rows applied per second (after the commit)",
        f64::from(a.rows) / (applied - committed).max(1e-9)
    );
    println!(
        "{:<44} {:>10.1}",
        "pgferry CPU while applying (s)", cpu_ferry
    );
    println!(
        "{:<44} {:>10}",
        "pgferry read / write syscalls while applying",
        format!(
            "{} / {}",
            calls.0.saturating_sub(calls_before.0),
            calls.1.saturating_sub(calls_before.1)
        )
    );
    println!(
        "{:<44} {:>10}",
        "pgferry voluntary context switches",
        calls.2.saturating_sub(calls_before.2)
    );
    println!(
        "{:<44} {:>10}",
        format!("cdc restarts (wal_sender_timeout {timeout})"),
        restarts
    );
    println!("{:<44} {:>10.1}", "RSS before (MB)", mb(baseline));
    println!(
        "{:<44} {:>10.1}",
        format!("peak RSS, sampled every 50 ms x{samples} (MB)"),
        mb(peak)
    );
    println!("{:<44} {:>10.1}", "VmHWM at the end (MB)", mb(hwm));
    println!(
        "peak memory vs target < 200 MB: {}",
        if mb(peak.max(hwm)) < 200.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}

// ----- cutover ----------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct WriterStats {
    ok: u64,
    read_only_errors: u64,
    other_errors: u64,
    /// Successful writes after the first failed one (a write after the fence would be lost).
    ok_after_failure: u64,
    last_ok: Option<Instant>,
    first_failure: Option<Instant>,
    last_error: String,
    /// The last few successful writes: number (as in `writer{i}@example.org`) and when.
    recent: std::collections::VecDeque<(u64, Instant)>,
}

/// Small transactions against Pagila at `rate` per second until `stop`: a rental with its
/// payment, a customer update, the deletion of a payment and rental it inserted earlier.
fn writer(
    port: u16,
    db: String,
    rate: u32,
    stop: Arc<AtomicBool>,
    user: &'static str,
) -> WriterStats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut st = WriterStats::default();
        let mut config = support::cluster::config_as(port, user, &db);
        config
            .application_name("bench writer")
            .connect_timeout(Duration::from_secs(5));
        let mut client: Option<tokio_postgres::Client> = None;
        let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let every = Duration::from_secs_f64(1.0 / f64::from(rate));
        let mut due = tokio::time::Instant::now();
        let mut i: u64 = 0;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            // A steady rate; time lost (slow writes, reconnects) is not caught up in a burst.
            due = (due + every).max(tokio::time::Instant::now());
            tokio::time::sleep_until(due).await;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match config.connect(tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        client = Some(c);
                    }
                    Err(e) => {
                        st.other_errors += 1;
                        st.first_failure.get_or_insert_with(Instant::now);
                        st.last_error = e.to_string();
                        continue;
                    }
                }
            }
            let Some(c) = client.as_ref() else { continue };
            // No BEGIN/COMMIT: a multi-statement simple query is one implicit transaction, rolled
            // back whole on error.
            let sql = match i % 4 {
                0 | 1 => format!(
                    "WITH r AS (INSERT INTO public.rental (rental_date, inventory_id, customer_id, staff_id) \
                     VALUES (now(), {}, {}, 1) RETURNING rental_id, customer_id) \
                     INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date) \
                     SELECT customer_id, 1, rental_id, 7.77, timestamptz '2022-07-20 00:00+00' + random() * interval '5 days' FROM r",
                    next() % 4581 + 1,
                    next() % 599 + 1
                ),
                2 => format!(
                    "UPDATE public.customer SET email = 'writer{i}@example.org', active = {} WHERE customer_id = {}",
                    next() % 2,
                    next() % 599 + 1
                ),
                _ => "WITH d AS (DELETE FROM public.payment WHERE payment_id = \
                      (SELECT min(payment_id) FROM public.payment_p2022_07 WHERE amount = 7.77) RETURNING rental_id) \
                      DELETE FROM public.rental WHERE rental_id IN (SELECT rental_id FROM d)"
                    .to_string(),
            };
            match c.batch_execute(&sql).await {
                Ok(()) => {
                    st.ok += 1;
                    st.last_ok = Some(Instant::now());
                    st.recent.push_back((i, Instant::now()));
                    if st.recent.len() > 8 {
                        st.recent.pop_front();
                    }
                    if st.first_failure.is_some() {
                        st.ok_after_failure += 1;
                    }
                }
                Err(e) => {
                    if e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
                    {
                        st.read_only_errors += 1;
                    } else {
                        st.other_errors += 1;
                        st.last_error = e.to_string();
                    }
                    st.first_failure.get_or_insert_with(Instant::now);
                }
            }
        }
        st
    })
}

/// The Pagila cutover under a writer. `managed`: as the managed services' roles on both sides
/// (`tests/support/managed.rs`; cdc applies in the managed mode, the writer is the application's
/// role); otherwise as the superuser. Returns the write downtime pgferry recorded, or `None` when
/// Pagila is missing.
fn cutover(a: &Args, managed: bool) -> Option<f64> {
    let p = pair();
    let (src, tgt, migration) = if managed {
        ("cutmg_src", "cutmg_tgt", "cdccutmg")
    } else {
        ("cut_src", "cut_tgt", "cdccut")
    };
    p.source.psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {src} WITH (FORCE)"),
    );
    p.source.psql("postgres", &format!("CREATE DATABASE {src}"));
    if !load_pagila(&p.source, src) {
        println!("\ncutover: SKIPPED (Pagila not found)");
        return None;
    }
    fresh_target(&p.target, tgt);
    let stages = online_stages(
        "[stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\nfence = \"read_only\"\n",
    );
    let (plan, user) = if managed {
        support::managed::make_managed_source(&p.source, src);
        let stages = stages.replacen(
            "kind = \"schema_dump\"\n",
            "kind = \"schema_dump\"\nno_owner = true\nno_privileges = true\n",
            1,
        );
        (
            support::managed::managed_plan(p, migration, src, tgt, &stages),
            support::managed::APP_WRITER,
        )
    } else {
        (TestPlan::new(p, migration, src, tgt, &stages), "postgres")
    };
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let stop = stop.clone();
        let port = p.source.port;
        let rate = a.rate;
        let db = src.to_string();
        std::thread::spawn(move || writer(port, db, rate, stop, user))
    };
    // Let the writer get going, so the load and cdc run under writes.
    std::thread::sleep(Duration::from_secs(2));
    let (mut cmd, log) = pgferry_cmd(&plan, &["run"], "cutover.log");
    let t = Instant::now();
    let mut child = cmd.spawn().expect("spawn pgferry");
    let tdb = Db::connect_when_created(&p.target, tgt, &mut child, &log);
    let mut ready_at = None;
    poll(
        "the cutover to finish",
        Duration::from_secs(900),
        POLL,
        || {
            if let Ok(Some(status)) = child.try_wait() {
                if stage_state(&tdb, migration, "cutover") == "done" {
                    return true;
                }
                panic!(
                    "pgferry stopped before the cutover was done ({status:?})\n{}",
                    tail(&log, 60)
                );
            }
            if ready_at.is_none() && stage_state(&tdb, migration, "cdc") == "ready" {
                ready_at = Some(t.elapsed().as_secs_f64());
            }
            stage_state(&tdb, migration, "cutover") == "done"
        },
    );
    let done = Instant::now();
    let done_secs = t.elapsed().as_secs_f64();
    expect_exit(&mut child, 0, &log, "pgferry cutover run");
    let exited = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let ws = w.join().expect("writer");
    if verbose() {
        eprintln!("{}", tail(&log, 40));
    }

    let recorded = tdb.one(&format!(
        "SELECT value->>'downtime_seconds' FROM pgferry.checkpoints WHERE migration = '{migration}' AND stage = 'cutover' AND key = 'database:{src}'"
    ));
    let event = tdb.one(&format!(
        "SELECT message FROM pgferry.events WHERE migration = '{migration}' AND message LIKE '%write downtime%' ORDER BY id DESC LIMIT 1"
    ));
    let recorded: f64 = recorded
        .parse()
        .unwrap_or_else(|_| panic!("no downtime_seconds recorded ({recorded:?})"));
    let last_ok = ws.last_ok.expect("the writer never wrote");
    let writer_side = done.saturating_duration_since(last_ok).as_secs_f64();
    let failure_to_done = ws
        .first_failure
        .map(|f| done.saturating_duration_since(f).as_secs_f64());

    // Every table equal on both sides (the source is fenced: nothing moves any more). A
    // difference is shown row by row, with the writer's last writes, before the figures.
    let tables = user_tables(&p.source, src);
    let mut differing = Vec::new();
    for table in &tables {
        if row_digest(&p.source, src, table) != row_digest(&p.target, tgt, table) {
            differing.push(table.clone());
            let rows = |c: &Cluster, db: &str| -> std::collections::BTreeSet<String> {
                c.psql(db, &format!("SELECT t::text FROM {table} t"))
                    .lines()
                    .map(str::to_string)
                    .collect()
            };
            let (s_rows, t_rows) = (rows(&p.source, src), rows(&p.target, tgt));
            eprintln!("[bench] cutover: {table} DIFFERS after the cutover");
            for r in s_rows.difference(&t_rows).take(10) {
                eprintln!("  only on the source: {r}");
            }
            for r in t_rows.difference(&s_rows).take(10) {
                eprintln!("  only on the target: {r}");
            }
        }
    }
    if !differing.is_empty() {
        eprintln!(
            "[bench] cutover target LSN: {}; writer's last successful writes (number, ms before cutover done): {:?}; first failure {:?} ms before done",
            tdb.one(&format!(
                "SELECT value->>'lsn' FROM pgferry.checkpoints WHERE migration = '{migration}' AND stage = 'cutover' AND key = 'database:{src}'"
            )),
            ws.recent
                .iter()
                .map(|(i, at)| (*i, done.saturating_duration_since(*at).as_millis()))
                .collect::<Vec<_>>(),
            ws.first_failure
                .map(|f| done.saturating_duration_since(f).as_millis())
        );
    } else {
        eprintln!(
            "[bench] cutover: {} tables equal on both sides",
            tables.len()
        );
    }

    println!(
        "\ncutover{}: Pagila, writer at {} tx/s (rental+payment inserts, customer updates, deletes), approval = auto (max_lag {}, quiet_for {}: the defaults; lag in seconds is the age of the oldest source commit not yet applied), fence = read_only",
        if managed {
            " as the managed services' roles (no superuser; cdc in the managed apply mode)"
        } else {
            " as the superuser"
        },
        a.rate,
        humantime::format_duration(pgferry::plan::raw::defaults::CUTOVER_MAX_LAG),
        humantime::format_duration(pgferry::plan::raw::defaults::CUTOVER_QUIET_FOR)
    );
    println!(
        "{:<58} {:>8.1}",
        "run start to cdc ready (s)",
        ready_at.unwrap_or(f64::NAN)
    );
    println!("{:<58} {:>8.1}", "run start to cutover done (s)", done_secs);
    println!("{:<58} {:>8.1}", "run start to exit (s)", exited);
    println!(
        "{:<58} {:>8.2}",
        "write downtime recorded by pgferry (fence to done, s)", recorded
    );
    println!(
        "{:<58} {:>8.2}",
        "writer: last successful write to cutover done (s)", writer_side
    );
    println!(
        "{:<58} {:>8.2}",
        "writer: first failed write to cutover done (s)",
        failure_to_done.unwrap_or(f64::NAN)
    );
    println!(
        "writer: {} writes ok, {} refused read-only, {} other errors (last: {})",
        ws.ok,
        ws.read_only_errors,
        ws.other_errors,
        if ws.last_error.is_empty() {
            "-"
        } else {
            &ws.last_error
        }
    );
    println!("pgferry's event: {event}");
    assert!(
        differing.is_empty(),
        "tables differ after the cutover: {differing:?}"
    );
    assert_eq!(
        ws.ok_after_failure, 0,
        "writes succeeded after the fence: {ws:?}"
    );
    if managed {
        let detail = tdb.one(&format!(
            "SELECT value->'managed_apply'->>'validate_seconds' FROM pgferry.checkpoints WHERE migration = '{migration}' AND stage = 'cutover' AND key = 'database:{src}'"
        ));
        println!(
            "{:<58} {:>8}",
            "foreign keys validated after the downtime (s)", detail
        );
    }
    println!(
        "write downtime vs target < 5 s: {}",
        if recorded.max(writer_side) < 5.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    Some(recorded)
}

/// The cutover as the managed roles and as the superuser, same clusters, same run.
fn cutover_managed(a: &Args) {
    let Some(managed) = cutover(a, true) else {
        return;
    };
    let Some(superuser) = cutover(a, false) else {
        return;
    };
    println!(
        "\nwrite downtime, managed roles {managed:.2} s vs superuser {superuser:.2} s: {:.2}x",
        managed / superuser
    );
}

fn main() {
    let a = args();
    match a.what.as_str() {
        "drain" => drain(&a, Workload::Pgbench),
        "drain-pagila" => drain(&a, Workload::Pagila),
        "bigtx" => bigtx(&a),
        "cutover" => {
            cutover(&a, false);
        }
        "cutover-managed" => cutover_managed(&a),
        _ => {
            drain(&a, Workload::Pgbench);
            drain(&a, Workload::Pagila);
            bigtx(&a);
            cutover(&a, false);
            cutover(&a, true);
        }
    }
}
