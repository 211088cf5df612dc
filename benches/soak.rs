//! Soak: can cdc keep up with a live stream? A steady writer runs against the source at a fixed
//! rate while pgferry's cdc and PostgreSQL's native logical replication (a subscription into a
//! second target database, same clusters, same run, same WAL) both follow it. Every 250 ms the
//! bench reads the source's WAL insert position and then both followers' applied positions in one
//! query on the target (the same moment for both), measured the same way for both:
//!
//! - pgferry: the applied LSN it stores with each commit (`pgferry.cdc_applied`);
//! - native: `pg_replication_origin_status.remote_lsn` of the subscription's origin.
//!
//! Lag in bytes is the source position minus the applied one; lag in seconds is how long ago the
//! source first passed the applied position (the age of the oldest change not yet applied, at the
//! sampling's resolution). It prints p50, p99 and max of both, and whether the lag grows: the mean
//! of the last third of the samples against the first third. Then it stops the writer, waits for
//! both to catch up and compares every table of both targets with the source.
//!
//! Workloads: `pagila` (a five-statement transaction: a rental and its payment, a customer update,
//! an actor update, a film_actor row deleted and put back) and `pgbench` (TPC-B-like, `pgbench -R`).
//! A rate of `max` runs the writer's clients without pause.
//!
//! ```sh
//! cargo bench --bench soak -- --workload pagila --rates 200,800,max --seconds 300 --clients 4
//! cargo bench --bench soak -- --workload pgbench --rates 800 --seconds 300
//! cargo bench --bench soak -- --rates max --seconds 60 --batch-delay 20ms   # the cdc option
//! cargo bench --bench soak -- --rates 800 --seconds 60 --profile   # where the target's time goes
//! cargo bench --bench soak -- --rates 800 --seconds 60 --target-synchronous-commit on --source-wal-writer-delay 10
//! ```
//!
//! `--target-synchronous-commit on|off` sets the target cluster's `synchronous_commit` (the
//! harness's clusters run `off`; production targets usually `on`), `--source-wal-writer-delay MS`
//! the source's `wal_writer_delay` (200 ms by default: with asynchronous commits the source's WAL
//! reaches both followers in stretches of this period). Both by `ALTER SYSTEM` and a reload, and
//! printed with the figures.
//!
//! `--sample-every MS` samples every MS milliseconds instead of 250 (to see how each follower
//! takes a stretch of WAL: more samples, slightly more load on both clusters, the same for both).
//!
//! `--samples FILE` writes every sample to `FILE.<rate>` as CSV: seconds since the writer
//! started, the source's WAL insert position, pgferry's and native's applied positions (bytes).
//!
//! `--profile` loads `pg_stat_statements` (with `track_planning`) on the target cluster and prints,
//! for the writer's run, each follower's statements on the target (calls, rows, planning and
//! execution time) and the CPU time of pgferry, its target sessions, native's apply worker and
//! both walsenders (from `/proc`).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Db, fresh_target, hash_digest, pgferry_cmd, poll, run_pg_dump, tail, user_tables};
use support::{Cluster, PASSWORD, Pair, TestPlan, load_pagila, pair};

struct Args {
    workload: String,
    rates: Vec<Option<u32>>,
    seconds: u64,
    clients: u32,
    /// The cdc stage's `batch_delay`, when given.
    batch_delay: Option<String>,
    /// Profile the target side (`--profile`).
    profile: bool,
    /// `synchronous_commit` of the target cluster (`--target-synchronous-commit on|off`; the
    /// harness's clusters run `off`, production targets usually `on`).
    target_synchronous_commit: Option<String>,
    /// `wal_writer_delay` of the source cluster in ms (`--source-wal-writer-delay`; 200 by
    /// default): with asynchronous commits on the source, both followers receive its WAL in
    /// stretches of this period.
    source_wal_writer_delay: Option<u32>,
    /// Every sample as CSV (`--samples FILE`: seconds, source, pgferry and native positions).
    samples: Option<String>,
    /// Time between samples (`--sample-every MS`, 250 by default): shorter to see how the two
    /// followers take each stretch of WAL (more samples, a little more load on both clusters).
    sample_every: Duration,
}

fn args() -> Args {
    let mut a = Args {
        workload: "pagila".into(),
        rates: vec![Some(200), Some(800)],
        seconds: 300,
        clients: 4,
        batch_delay: None,
        profile: false,
        target_synchronous_commit: None,
        source_wal_writer_delay: None,
        samples: None,
        sample_every: SAMPLE_EVERY,
    };
    let mut it = std::env::args().skip(1).filter(|x| x != "--bench");
    while let Some(x) = it.next() {
        match x.as_str() {
            "--workload" => a.workload = it.next().unwrap_or(a.workload),
            "--rates" => {
                if let Some(v) = it.next() {
                    a.rates = v
                        .split(',')
                        .map(|r| if r == "max" { None } else { r.parse().ok() })
                        .collect();
                }
            }
            "--batch-delay" => a.batch_delay = it.next(),
            "--profile" => a.profile = true,
            "--target-synchronous-commit" => {
                a.target_synchronous_commit = it.next().filter(|v| v == "on" || v == "off");
                assert!(
                    a.target_synchronous_commit.is_some(),
                    "--target-synchronous-commit takes on or off"
                );
            }
            "--source-wal-writer-delay" => {
                a.source_wal_writer_delay = it.next().and_then(|v| v.parse().ok());
                assert!(
                    a.source_wal_writer_delay
                        .is_some_and(|v| (1..=10_000).contains(&v)),
                    "--source-wal-writer-delay takes milliseconds, 1 to 10000"
                );
            }
            "--samples" => a.samples = it.next(),
            "--sample-every" => {
                let ms = it.next().and_then(|v| v.parse::<u64>().ok());
                assert!(
                    ms.is_some_and(|m| (1..=10_000).contains(&m)),
                    "--sample-every takes milliseconds, 1 to 10000"
                );
                a.sample_every = Duration::from_millis(ms.unwrap_or(250));
            }
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).unwrap_or(300),
            "--clients" => a.clients = it.next().and_then(|v| v.parse().ok()).unwrap_or(4).max(1),
            _ => {}
        }
    }
    a
}

const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// One follower's samples: (seconds since start, lag bytes, lag seconds).
#[derive(Default)]
struct Lags {
    bytes: Vec<f64>,
    secs: Vec<f64>,
}

impl Lags {
    fn summary(&self) -> String {
        format!(
            "bytes p50 {} p99 {} max {} | seconds p50 {:.2} p99 {:.2} max {:.2} | growth (last third / first third, bytes) {}",
            kb(pct(&self.bytes, 50.0)),
            kb(pct(&self.bytes, 99.0)),
            kb(pct(&self.bytes, 100.0)),
            pct(&self.secs, 50.0),
            pct(&self.secs, 99.0),
            pct(&self.secs, 100.0),
            growth(&self.bytes)
        )
    }
}

fn kb(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.0} kB", b / 1024.0)
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)]
}

/// "x1.05 (bounded)" or "x3.2 (GROWS)": mean of the last third over the first third, with 64 kB
/// added to both so that a near-zero lag does not make noise look like growth.
fn growth(v: &[f64]) -> String {
    let n = v.len() / 3;
    if n == 0 {
        return "n/a".into();
    }
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64 + 65536.0;
    let r = mean(&v[v.len() - n..]) / mean(&v[..n]);
    format!("x{r:.2} ({})", if r > 1.5 { "GROWS" } else { "bounded" })
}

/// pgferry's and native's applied positions read by one query on the target, so that both are
/// taken at the same moment: both followers write to the same cluster, and the origin's status is
/// shared memory, readable from pgferry's database. Two queries in a row favoured the one read
/// second (by the WAL written during the first round trip, which on a loaded machine is several
/// kB at 800 tx/s).
fn both_applied(tdb: &Db, origin: &str, ferry_applied: &str) -> (u64, u64) {
    let row = tdb.one(&format!(
        "SELECT coalesce(({ferry_applied}), '0/0') || ' ' || coalesce(({origin}), '0/0')"
    ));
    let (f, n) = row.split_once(' ').unwrap_or(("0/0", "0/0"));
    (lsn(f), lsn(n))
}

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// The steady writer: `clients` sessions, each at `rate / clients` transactions a second (or
/// without pause), until `stop`. Returns the transactions committed.
fn pagila_writer(
    port: u16,
    db: &str,
    rate: Option<u32>,
    clients: u32,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let db = db.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut tasks = Vec::new();
            for c in 0..clients {
                let stop = stop.clone();
                let done = done.clone();
                let db = db.clone();
                tasks.push(tokio::spawn(async move {
                    let mut config = tokio_postgres::Config::new();
                    config
                        .host("127.0.0.1")
                        .port(port)
                        .user("postgres")
                        .password(PASSWORD)
                        .dbname(&db)
                        .application_name("soak writer");
                    let (client, conn) = config
                        .connect(tokio_postgres::NoTls)
                        .await
                        .expect("writer connects");
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    let every = rate.map(|r| {
                        Duration::from_secs_f64(f64::from(clients) / f64::from(r.max(1)))
                    });
                    let mut due = tokio::time::Instant::now();
                    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (u64::from(c) << 32);
                    let mut next = || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    let mut i: u64 = 0;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        if let Some(every) = every {
                            due = (due + every).max(tokio::time::Instant::now());
                            tokio::time::sleep_until(due).await;
                        }
                        let (inv, cust, actor, film) = (
                            next() % 4581 + 1,
                            next() % 599 + 1,
                            next() % 200 + 1,
                            next() % 1000 + 1,
                        );
                        let sql = format!(
                            "BEGIN;\
                             WITH r AS (INSERT INTO public.rental (rental_date, inventory_id, customer_id, staff_id) \
                               VALUES (now(), {inv}, {cust}, 1) RETURNING rental_id, customer_id) \
                             INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date) \
                               SELECT customer_id, 1, rental_id, 4.99, timestamptz '2022-07-20 00:00+00' FROM r;\
                             UPDATE public.customer SET email = 'soak{c}_{i}@example.org' WHERE customer_id = {cust};\
                             UPDATE public.actor SET last_update = now() WHERE actor_id = {actor};\
                             WITH d AS (DELETE FROM public.film_actor WHERE actor_id = {actor} AND film_id = \
                               (SELECT min(film_id) FROM public.film_actor WHERE actor_id = {actor} AND film_id >= {film}) \
                               RETURNING actor_id, film_id) \
                             INSERT INTO public.film_actor (actor_id, film_id) SELECT actor_id, film_id FROM d;\
                             COMMIT;"
                        );
                        match client.batch_execute(&sql).await {
                            Ok(()) => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                let _ = client.batch_execute("ROLLBACK").await;
                                eprintln!("[soak] writer error: {e}");
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    })
}

/// pgbench's TPC-B-like script at `rate` (or unthrottled) for `seconds`.
fn pgbench_writer(src: &Cluster, db: &str, rate: Option<u32>, clients: u32, seconds: u64) -> Child {
    let mut cmd = Command::new(src.bindir.join("pgbench"));
    cmd.args(["-n", "-c", &clients.to_string(), "-j", "2"])
        .args(["-T", &seconds.to_string()]);
    if let Some(r) = rate {
        cmd.args(["-R", &r.to_string()]);
    }
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &src.port.to_string(),
        "-U",
        "postgres",
        db,
    ])
    .env("PGPASSWORD", PASSWORD)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("pgbench")
}

fn stages(batch_delay: Option<&str>) -> String {
    let delay = batch_delay.map_or(String::new(), |d| format!("batch_delay = \"{d}\"\n"));
    format!(
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
     [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
     [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
     [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
     [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n{delay}\n\
     [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\n"
    )
}

fn round(a: &Args, p: &Pair, src: &str, n: usize, rate: Option<u32>) {
    let rate_s = rate.map_or("max".to_string(), |r| format!("{r} tx/s"));
    eprintln!(
        "\n[soak] {} at {rate_s}, {} clients, {} s",
        a.workload, a.clients, a.seconds
    );
    let migration = format!("soak{n}");
    let tf = format!("soak_ferry{n}");
    let tn = format!("soak_native{n}");
    let sub = format!("soak_native_{n}");
    fresh_target(&p.target, &tf);

    // pgferry: load and follow (a manual cutover nobody approves keeps cdc running).
    let plan = TestPlan::new(p, &migration, src, &tf, &stages(a.batch_delay.as_deref()));
    let (mut cmd, log) = pgferry_cmd(&plan, &["run"], "soak.log");
    let mut child = cmd.spawn().expect("spawn pgferry");
    let tdb = Db::connect_when_created(&p.target, &tf, &mut child, &log);
    poll(
        "cdc to be ready",
        Duration::from_secs(600),
        Duration::from_millis(200),
        || {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("pgferry stopped ({s:?})\n{}", tail(&log, 60));
            }
            tdb.is("SELECT to_regclass('pgferry.stages') IS NOT NULL")
                && tdb.one(&format!(
                    "SELECT state FROM pgferry.stages WHERE migration = '{migration}' AND stage = 'cdc'"
                )) == "ready"
        },
    );

    // Native: the same data (nothing writes yet), a subscription that starts from now.
    run_pg_dump(&p.source, src, &p.target, &tn);
    p.source.psql(
        src,
        "DROP PUBLICATION IF EXISTS soak_native; CREATE PUBLICATION soak_native FOR ALL TABLES",
    );
    p.target.psql(
        &tn,
        &format!(
            "CREATE SUBSCRIPTION {sub} CONNECTION 'host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname={src}' \
             PUBLICATION soak_native WITH (copy_data = false)",
            p.source.port
        ),
    );
    let sdb = Db::connect(&p.source, src);
    let ndb = Db::connect(&p.target, &tn);
    poll(
        "the subscription to stream",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            sdb.is(&format!(
                "SELECT count(*) = 1 FROM pg_stat_replication WHERE application_name = '{sub}' AND state = 'streaming'"
            ))
        },
    );
    let origin = format!(
        "SELECT coalesce(remote_lsn::text, '0/0') FROM pg_replication_origin_status \
         WHERE external_id = (SELECT 'pg_' || oid FROM pg_subscription WHERE subname = '{sub}')"
    );
    let ferry_applied = "SELECT coalesce(max(lsn)::text, '0/0') FROM pgferry.cdc_applied";

    let prof = a
        .profile
        .then(|| Profile::begin(p, src, &tf, &tn, child.id()));
    // The writer, and the samples.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut pgbench = None;
    let writer = if a.workload == "pgbench" {
        pgbench = Some(pgbench_writer(&p.source, src, rate, a.clients, a.seconds));
        None
    } else {
        Some(pagila_writer(
            p.source.port,
            src,
            rate,
            a.clients,
            stop.clone(),
            done.clone(),
        ))
    };
    let start = Instant::now();
    let mut history: Vec<(f64, u64)> = Vec::new();
    let (mut ferry, mut native) = (Lags::default(), Lags::default());
    let lag_secs = |history: &[(f64, u64)], now: f64, applied: u64| -> f64 {
        // The first sample at which the source was past the applied position.
        history
            .iter()
            .find(|(_, l)| *l > applied)
            .map_or(0.0, |(t, _)| (now - t).max(0.0))
    };
    let mut last_print = Instant::now();
    // Samples count once both followers have applied a transaction of the writer's (native has no
    // remote position before its first one).
    let begin = lsn(&sdb.one("SELECT pg_current_wal_insert_lsn()::text"));
    let mut samples = a.samples.as_ref().map(|path| {
        let path = format!("{path}.{}", rate_s.replace([' ', '/'], ""));
        eprintln!("[soak]   samples to {path}");
        std::io::BufWriter::new(std::fs::File::create(&path).expect("samples file"))
    });
    while start.elapsed() < Duration::from_secs(a.seconds) {
        let t = start.elapsed().as_secs_f64();
        let src_row = sdb.one(&format!(
            "SELECT pg_current_wal_insert_lsn()::text || ' ' || coalesce((SELECT max(sent_lsn) FROM pg_stat_replication WHERE application_name <> '{sub}')::text, '0/0') || ' ' || coalesce((SELECT max(sent_lsn) FROM pg_stat_replication WHERE application_name = '{sub}')::text, '0/0')"
        ));
        let mut src_parts = src_row.split(' ').map(lsn);
        let src_lsn = src_parts.next().unwrap_or(0);
        let (sent_f, sent_n) = (src_parts.next().unwrap_or(0), src_parts.next().unwrap_or(0));
        let (f, nl) = both_applied(&tdb, &origin, ferry_applied);
        history.push((t, src_lsn));
        if let Some(w) = samples.as_mut() {
            use std::io::Write;
            writeln!(w, "{t:.3},{src_lsn},{f},{nl},{sent_f},{sent_n}").expect("samples file");
        }
        if ferry.bytes.is_empty() && (f < begin || nl < begin) {
            std::thread::sleep(a.sample_every);
            continue;
        }
        for (lags, applied) in [(&mut ferry, f), (&mut native, nl)] {
            lags.bytes.push(src_lsn.saturating_sub(applied) as f64);
            lags.secs.push(lag_secs(&history, t, applied));
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "[soak]   {t:>5.0}s: {} tx; lag pgferry {} / {:.2}s, native {} / {:.2}s",
                done.load(Ordering::Relaxed),
                kb(*ferry.bytes.last().unwrap_or(&0.0)),
                ferry.secs.last().unwrap_or(&0.0),
                kb(*native.bytes.last().unwrap_or(&0.0)),
                native.secs.last().unwrap_or(&0.0),
            );
        }
        std::thread::sleep(a.sample_every);
    }
    stop.store(true, Ordering::SeqCst);
    if let Some(w) = writer {
        w.join().expect("writer");
    }
    if let Some(mut pb) = pgbench {
        let _ = pb.wait();
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(prof) = prof {
        prof.end(p, &tf, &tn, elapsed);
    }
    let tx = done.load(Ordering::Relaxed);
    let wal = history.last().map_or(0, |h| h.1) - history.first().map_or(0, |h| h.1);
    eprintln!(
        "[soak]   writer: {} tx in {elapsed:.0}s ({:.0} tx/s); source WAL {:.0} kB/s",
        if a.workload == "pgbench" {
            "pgbench".to_string()
        } else {
            tx.to_string()
        },
        tx as f64 / elapsed,
        wal as f64 / elapsed / 1024.0
    );
    eprintln!("[soak]   pgferry: {}", ferry.summary());
    eprintln!("[soak]   native:  {}", native.summary());
    println!(
        "| {} | {rate_s} | pgferry | {} | {} | {:.2} s | {:.2} s | {} |",
        a.workload,
        kb(pct(&ferry.bytes, 50.0)),
        kb(pct(&ferry.bytes, 99.0)),
        pct(&ferry.secs, 50.0),
        pct(&ferry.secs, 99.0),
        growth(&ferry.bytes)
    );
    println!(
        "| {} | {rate_s} | native | {} | {} | {:.2} s | {:.2} s | {} |",
        a.workload,
        kb(pct(&native.bytes, 50.0)),
        kb(pct(&native.bytes, 99.0)),
        pct(&native.secs, 50.0),
        pct(&native.secs, 99.0),
        growth(&native.bytes)
    );

    // Both catch up, then both equal the source.
    let end = sdb.one("SELECT pg_current_wal_insert_lsn()::text");
    let end_n = lsn(&end);
    let caught = Instant::now();
    poll(
        "both followers to catch up",
        Duration::from_secs(1800),
        Duration::from_millis(100),
        || lsn(&tdb.one(ferry_applied)) >= end_n && lsn(&ndb.one(&origin)) >= end_n,
    );
    eprintln!(
        "[soak]   both caught up with {end} {:.1}s after the writer stopped",
        caught.elapsed().as_secs_f64()
    );
    for table in user_tables(&p.source, src) {
        let s = hash_digest(&p.source, src, &table);
        assert_eq!(
            s,
            hash_digest(&p.target, &tf, &table),
            "pgferry differs in {table}"
        );
        assert_eq!(
            s,
            hash_digest(&p.target, &tn, &table),
            "native differs in {table}"
        );
    }
    eprintln!("[soak]   both targets equal the source, table by table");

    let _ = child.kill();
    let _ = child.wait();
    p.target.psql(&tn, &format!("DROP SUBSCRIPTION {sub}"));
    p.source.psql(
        src,
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_%' AND NOT active",
    );
    p.source.psql(
        src,
        &format!("DROP PUBLICATION IF EXISTS soak_native, \"pgferry_{migration}\""),
    );
}

/// `--profile`: the target's statements and the CPU of each process of both followers while the
/// writer runs.
struct Profile {
    /// (what, pid, CPU seconds at the start).
    procs: Vec<(String, u32, f64)>,
}

/// User + system CPU seconds of a process (all its threads), 0 when it is gone.
fn proc_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

impl Profile {
    fn begin(p: &Pair, src: &str, tf: &str, tn: &str, ferry_pid: u32) -> Profile {
        p.target.psql(
            "postgres",
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        );
        p.target
            .psql("postgres", "SELECT pg_stat_statements_reset()");
        let rows = |c: &Cluster, db: &str, sql: &str| -> Vec<(String, u32)> {
            c.psql(db, sql)
                .lines()
                .filter_map(|l| {
                    let (what, pid) = l.rsplit_once('|')?;
                    Some((what.to_string(), pid.trim().parse().ok()?))
                })
                .collect()
        };
        let mut procs = vec![("pgferry process".to_string(), ferry_pid)];
        for (db, who) in [(tf, "pgferry"), (tn, "native")] {
            for (what, pid) in rows(
                &p.target,
                "postgres",
                &format!(
                    "SELECT '{who} target: ' || backend_type || ' ' || coalesce(application_name, ''), pid                      FROM pg_stat_activity WHERE datname = '{db}'                      AND coalesce(application_name, '') <> 'pgferry-tests'"
                ),
            ) {
                procs.push((what, pid));
            }
        }
        for (what, pid) in rows(
            &p.source,
            src,
            "SELECT 'walsender ' || application_name, pid FROM pg_stat_replication",
        ) {
            procs.push((what, pid));
        }
        let procs = procs
            .into_iter()
            .map(|(w, pid)| {
                let c = proc_cpu(pid);
                (w, pid, c)
            })
            .collect();
        Profile { procs }
    }

    fn end(self, p: &Pair, tf: &str, tn: &str, elapsed: f64) {
        eprintln!("[soak]   profile, CPU over the writer's {elapsed:.0} s:");
        for (what, pid, c0) in &self.procs {
            let c = proc_cpu(*pid) - c0;
            eprintln!(
                "[soak]     {what:<60} {c:>6.2} s ({:.0}% of a core)",
                100.0 * c / elapsed
            );
        }
        for db in [tf, tn] {
            eprintln!(
                "[soak]   target statements in {db} (calls | rows | plans | plan ms | exec ms | exec us/call | query):"
            );
            let out = p.target.psql(
                "postgres",
                &format!(
                    "SELECT calls, rows, plans, round(total_plan_time::numeric, 1),                      round(total_exec_time::numeric, 1), round((1000 * total_exec_time / calls)::numeric, 1),                      left(regexp_replace(query, '\\s+', ' ', 'g'), 160)                      FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid                      WHERE d.datname = '{db}' ORDER BY total_exec_time + total_plan_time DESC LIMIT 25"
                ),
            );
            for l in out.lines() {
                eprintln!("[soak]     {l}");
            }
        }
    }
}

fn main() {
    let a = args();
    let p = pair();
    if a.profile {
        p.target.psql(
            "postgres",
            "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
        );
        p.target.pg_ctl(&["restart", "-m", "fast"]);
        // Known once the library is loaded.
        for set in [
            "ALTER SYSTEM SET pg_stat_statements.track_planning = on",
            "ALTER SYSTEM SET pg_stat_statements.track = 'all'",
            "SELECT pg_reload_conf()",
        ] {
            p.target.psql("postgres", set);
        }
    }
    if let Some(v) = &a.target_synchronous_commit {
        p.target.psql(
            "postgres",
            &format!("ALTER SYSTEM SET synchronous_commit = {v}"),
        );
        p.target.psql("postgres", "SELECT pg_reload_conf()");
    }
    if let Some(ms) = a.source_wal_writer_delay {
        p.source.psql(
            "postgres",
            &format!("ALTER SYSTEM SET wal_writer_delay = '{ms}ms'"),
        );
        p.source.psql("postgres", "SELECT pg_reload_conf()");
    }
    eprintln!(
        "[soak] target synchronous_commit = {}, source wal_writer_delay = {}",
        p.target.psql("postgres", "SHOW synchronous_commit"),
        p.source.psql("postgres", "SHOW wal_writer_delay")
    );
    let src = "soak_src";
    p.source.psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {src} WITH (FORCE)"),
    );
    p.source.psql("postgres", &format!("CREATE DATABASE {src}"));
    if a.workload == "pgbench" {
        common::sh(
            Command::new(p.source.bindir.join("pgbench"))
                .args(["-i", "-q", "-s", "10", "-h", "127.0.0.1"])
                .args(["-p", &p.source.port.to_string(), "-U", "postgres", src])
                .env("PGPASSWORD", PASSWORD)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "pgbench -i",
        );
        // pgbench_history has no key: native and pgferry need a replica identity for it.
        p.source.psql(
            src,
            "ALTER TABLE public.pgbench_history REPLICA IDENTITY FULL",
        );
    } else {
        assert!(
            load_pagila(&p.source, src),
            "Pagila not found: put it under ../shared/data/pagila"
        );
    }
    println!(
        "\n| workload | rate | follower | lag p50 | lag p99 | lag p50 (s) | lag p99 (s) | growth |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (n, rate) in a.rates.iter().enumerate() {
        round(&a, p, src, n, *rate);
    }
}
