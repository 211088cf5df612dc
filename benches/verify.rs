//! Verification benchmark: the wall time of `pgferry verify` (checksum mode: chunked digests
//! computed in both servers, localizing any mismatch to a key range) against the whole-table
//! hash-sum baseline of pgcopydb's compare — `select count(*), sum(hashtext(t::text)::bigint) from
//! only t` for every table, on both sides, all at once — on the same clusters, in the same run.
//! Both sides hold `pgbench -i -s SCALE` (deterministic: the same rows on both). After the timed
//! rounds, one target row is changed and verify must name exactly it.
//!
//! ```sh
//! cargo bench --bench verify                          # scale 50, 4 jobs, best of 2
//! cargo bench --bench verify -- --scale 5 --repeat 1 --jobs 2
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Cluster, PASSWORD, pair};

struct Args {
    scale: u32,
    repeat: u32,
    jobs: u32,
    chunk_rows: u32,
}

fn args() -> Args {
    let mut a = Args {
        scale: 50,
        repeat: 2,
        jobs: 4,
        chunk_rows: 20_000,
    };
    let mut it = std::env::args().skip(1).filter(|x| x != "--bench");
    while let Some(x) = it.next() {
        let mut next = |d: u32| it.next().and_then(|v| v.parse().ok()).unwrap_or(d);
        match x.as_str() {
            "--scale" => a.scale = next(a.scale),
            "--repeat" => a.repeat = next(a.repeat),
            "--jobs" => a.jobs = next(a.jobs),
            "--chunk-rows" => a.chunk_rows = next(a.chunk_rows),
            _ => {}
        }
    }
    a
}

const TABLES: &[&str] = &[
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

fn pgbench_init(c: &Cluster, db: &str, scale: u32) {
    let out = Command::new(c.tools_bindir.join("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &c.port.to_string(),
            "-U",
            "postgres",
            db,
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("pgbench");
    assert!(
        out.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.psql(db, "VACUUM ANALYZE");
}

/// The baseline: every table's count and hash sum, on both sides, all queries at once.
fn baseline(s: &Cluster, sdb: &str, t: &Cluster, tdb: &str) -> (Duration, bool) {
    let start = Instant::now();
    let results: Vec<(bool, String, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = TABLES
            .iter()
            .flat_map(|table| [(true, *table), (false, *table)])
            .map(|(source, table)| {
                scope.spawn(move || {
                    let (c, db) = if source { (s, sdb) } else { (t, tdb) };
                    let v = c.psql(
                        db,
                        &format!(
                            "select count(*), sum(hashtext(t::text)::bigint) from only public.{table} t"
                        ),
                    );
                    (source, table.to_string(), v)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("baseline query"))
            .collect()
    });
    let took = start.elapsed();
    let same = TABLES.iter().all(|table| {
        let side = |src: bool| {
            results
                .iter()
                .find(|(s, t, _)| *s == src && t == table)
                .map(|r| r.2.clone())
        };
        side(true) == side(false)
    });
    (took, same)
}

fn verify(plan: &std::path::Path, jobs: u32, report: &std::path::Path) -> (Duration, Option<i32>) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .arg("verify")
        .arg(plan)
        .args(["--jobs", &jobs.to_string(), "--report"])
        .arg(report)
        .arg("-q")
        .env("BENCH_PASSWORD", PASSWORD)
        .output()
        .expect("pgferry verify");
    let took = start.elapsed();
    if !matches!(out.status.code(), Some(0) | Some(3)) {
        panic!(
            "pgferry verify failed ({:?}):\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
    (took, out.status.code())
}

fn main() {
    let a = args();
    let p = pair();
    let (sdb, tdb) = ("bench_verify_src", "bench_verify_tgt");
    for (c, db) in [(&p.source, sdb), (&p.target, tdb)] {
        c.psql("postgres", &format!("DROP DATABASE IF EXISTS {db}"));
        c.psql("postgres", &format!("CREATE DATABASE {db}"));
    }
    let start = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| pgbench_init(&p.source, sdb, a.scale));
        scope.spawn(|| pgbench_init(&p.target, tdb, a.scale));
    });
    eprintln!(
        "[bench] pgbench -i -s {} on both sides in {:.1?}: {}",
        a.scale,
        start.elapsed(),
        p.source.psql(
            sdb,
            "SELECT pg_size_pretty(pg_database_size(current_database()))"
        )
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("verify.toml");
    let report = dir.path().join("report.json");
    std::fs::write(
        &plan,
        format!(
            r#"version = 1
name = "bench_verify"

[source]
url = "postgres://postgres@127.0.0.1:{sp}/{sdb}?sslmode=disable"
password = "{{{{ env.BENCH_PASSWORD }}}}"

[target]
url = "postgres://postgres@127.0.0.1:{tp}/{tdb}?sslmode=disable"
password = "{{{{ env.BENCH_PASSWORD }}}}"

[[databases]]
name = "{sdb}"
target = "{tdb}"

[stages.validate]
kind = "validate"
jobs = {jobs}
chunk_rows = {chunk_rows}
"#,
            sp = p.source.port,
            tp = p.target.port,
            jobs = a.jobs,
            chunk_rows = a.chunk_rows,
        ),
    )
    .expect("plan");

    let mut base = Vec::new();
    let mut ferry = Vec::new();
    for r in 0..a.repeat {
        eprintln!("[bench] round {}", r + 1);
        // Alternate which goes first, so neither always gets the warmer cache.
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            if which == 0 {
                let (d, same) = baseline(&p.source, sdb, &p.target, tdb);
                assert!(same, "the baseline finds the two sides different");
                eprintln!("[bench]   baseline hash sum: {:.2}s", d.as_secs_f64());
                base.push(d.as_secs_f64());
            } else {
                let (d, code) = verify(&plan, a.jobs, &report);
                assert_eq!(code, Some(0), "verify finds the two sides different");
                eprintln!("[bench]   pgferry verify: {:.2}s", d.as_secs_f64());
                ferry.push(d.as_secs_f64());
            }
        }
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    let chunks: u64 = summary["tables"]
        .as_array()
        .map(|t| t.iter().filter_map(|x| x["chunks"].as_u64()).sum())
        .unwrap_or(0);

    // Localization: one changed row on the target is named, with its column.
    let aid = 4 * 100_000 * a.scale as i64 / 5 + 17;
    p.target.psql(
        tdb,
        &format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {aid}"),
    );
    let (d_bad, code) = verify(&plan, a.jobs, &report);
    let found: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    assert_eq!(code, Some(3));
    assert_eq!(
        found["mismatches"],
        serde_json::json!([{"database": sdb, "table": "public.pgbench_accounts", "key": {"aid": aid}, "kind": "different", "columns": ["abalance"]}]),
        "verify must name exactly the changed row"
    );
    p.target.psql(
        tdb,
        &format!("UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid = {aid}"),
    );

    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "\npgbench scale {}, best of {} round(s), source and target on this host, verify jobs = {}, chunk_rows = {} ({chunks} chunks)",
        a.scale, a.repeat, a.jobs, a.chunk_rows
    );
    println!("{:<44} {:>9} {:>8}", "what", "seconds", "ratio");
    println!(
        "{:<44} {:>9.2} {:>7.2}x",
        "baseline: count + sum(hashtext), both sides",
        best(&base),
        1.0
    );
    println!(
        "{:<44} {:>9.2} {:>7.2}x",
        "pgferry verify (checksum, chunked)",
        best(&ferry),
        best(&ferry) / best(&base)
    );
    println!(
        "{:<44} {:>9.2} {:>7.2}x",
        "pgferry verify, one row changed (named)",
        d_bad.as_secs_f64(),
        d_bad.as_secs_f64() / best(&base)
    );
}
