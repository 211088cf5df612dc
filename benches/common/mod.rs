//! Helpers shared by the benchmarks (`offline.rs`, `cdc.rs`): running a tool and timing it, the CPU
//! time of child processes, finding a program, and the `pg_dump | psql` anchor.
//!
//! Not every benchmark uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::Cluster;

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
