//! Helpers shared by the benchmarks (`offline.rs`, `cdc.rs`, `soak.rs`): running a tool and timing it, the CPU
//! time of child processes, finding a program, the `pg_dump | psql` anchor, a polling session and
//! a pgferry runner with its log in a file.
//!
//! Not every benchmark uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Cluster, TestPlan};

/// Runs `cmd` to completion and returns its wall time; panics with its output when it fails.
pub fn sh(cmd: &mut Command, what: &str) -> Duration {
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = start.elapsed();
    if !out.status.success() {
        panic!(
            "{what} failed ({:?}):\n{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    took
}

/// User + system CPU seconds of all waited-for child processes so far.
pub fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_CHILDREN has no other preconditions.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Drops database `name` on `t` (if it exists) and checkpoints, so the next tool starts clean.
pub fn fresh_target(t: &Cluster, name: &str) {
    t.psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
    t.psql("postgres", "CHECKPOINT");
}

/// `pg_dump sdb | psql tdb` into a new database `tdb`; returns the wall time of the pipe.
pub fn run_pg_dump(s: &Cluster, sdb: &str, t: &Cluster, tdb: &str) -> Duration {
    fresh_target(t, tdb);
    t.psql("postgres", &format!("CREATE DATABASE {tdb}"));
    let start = Instant::now();
    crate::support::cluster::pipe_dump(s, sdb, &[], t, tdb);
    start.elapsed()
}

// ----- a polling session ----------------------------------------------------------------------

/// A tokio-postgres session for cheap polling (a psql process per poll would cost more CPU than
/// the thing measured on a 2-core machine).
pub struct Db {
    pub rt: tokio::runtime::Runtime,
    pub client: tokio_postgres::Client,
}

impl Db {
    pub fn connect(c: &Cluster, db: &str) -> Db {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = rt.block_on(c.client(db));
        Db { rt, client }
    }

    /// The first column of the first row (empty when there is none, "" for NULL).
    pub fn one(&self, sql: &str) -> String {
        let msgs = self
            .rt
            .block_on(self.client.simple_query(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        for m in msgs {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                return r.get(0).unwrap_or("").to_string();
            }
        }
        String::new()
    }

    /// Connects once `db` exists (pgferry's provision creates the target database).
    pub fn connect_when_created(c: &Cluster, db: &str, child: &mut Child, log: &PathBuf) -> Db {
        poll(
            &format!("database {db} to be created"),
            Duration::from_secs(300),
            Duration::from_millis(50),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("pgferry stopped early ({status:?})\n{}", tail(log, 60));
                }
                c.psql(
                    "postgres",
                    &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'"),
                ) == "1"
            },
        );
        Db::connect(c, db)
    }

    pub fn is(&self, sql: &str) -> bool {
        self.one(sql) == "t"
    }
}

/// A pgferry command on `plan`, with its log in the plan's directory (a pipe would fill up and
/// block a long-running runner).
pub fn pgferry_cmd(plan: &TestPlan, args: &[&str], log: &str) -> (Command, PathBuf) {
    let path = plan.dir.path().join(log);
    let file = std::fs::File::create(&path).expect("log file");
    let mut cmd = plan.command(args);
    cmd.stdout(Stdio::from(file.try_clone().expect("log file")))
        .stderr(Stdio::from(file))
        .stdin(Stdio::null());
    (cmd, path)
}

pub fn tail(path: &PathBuf, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn expect_exit(child: &mut Child, code: i32, log: &PathBuf, what: &str) {
    let status = child.wait().expect("wait for pgferry");
    if status.code() != Some(code) {
        panic!(
            "{what}: pgferry exited with {status:?}, expected {code}\n--- log ---\n{}",
            tail(log, 60)
        );
    }
}

pub fn poll(what: &str, timeout: Duration, every: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// The user tables of `db` (schema-qualified, quoted), pgferry's own left out.
pub fn user_tables(c: &Cluster, db: &str) -> Vec<String> {
    c.psql(
        db,
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') ORDER BY 1",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// `count:sum(hashtext(row))` per table: cheap enough for millions of rows.
pub fn hash_digest(c: &Cluster, db: &str, table: &str) -> String {
    c.psql(
        db,
        &format!(
            "SELECT count(*) || ':' || coalesce(sum(hashtext(t::text)::bigint), 0) FROM {table} t"
        ),
    )
}
