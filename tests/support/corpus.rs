//! PostgreSQL's own regression database, as `scripts/regression-db.sh` builds and caches it: found
//! (building it when the cache is empty) and restored into a fresh database, for the corpus tests
//! and the offline benchmark.

use std::path::PathBuf;
use std::process::Command;

use super::cluster::Cluster;

/// The cache directory `scripts/regression-db.sh` fills (it does nothing when the cache is there).
pub fn corpus() -> Option<PathBuf> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/regression-db.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("running scripts/regression-db.sh");
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from);
    match dir {
        Some(d) if out.status.success() && d.join("regression.dump").is_file() => Some(d),
        _ => {
            super::require::missing(
                &format!(
                    "the regression database is not available: `bash scripts/regression-db.sh` failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                "run `bash scripts/regression-db.sh` as root (it installs dpkg-dev and \
                 postgresql-server-dev-<major>, fetches the server's source with apt-get source and \
                 runs the suite once; .ci/run does it)",
            );
            None
        }
    }
}

/// Restores the corpus into a fresh database of `cluster` (roles first).
pub fn restore(cluster: &Cluster, dir: &std::path::Path, prefix: &str) -> String {
    let roles = std::fs::read_to_string(dir.join("roles.sql")).expect("roles.sql");
    // Every statement on its own: the roles that exist already (postgres) fail alone.
    for stmt in roles.lines().filter(|l| {
        (l.starts_with("CREATE ROLE") || l.starts_with("ALTER ROLE")) && !l.contains(" postgres")
    }) {
        let exists = cluster.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_roles WHERE rolname = {}",
                literal(role_of(stmt))
            ),
        );
        if stmt.starts_with("CREATE ROLE") && exists != "0" {
            continue;
        }
        cluster.psql("postgres", stmt);
    }
    let db = cluster.fresh_database(prefix);
    let path = dir.join("regression.dump");
    cluster.run_tool(
        "pg_restore",
        &db,
        &[
            "--exit-on-error",
            "-d",
            &db,
            path.to_str().expect("utf-8 path"),
        ],
    );
    db
}

fn role_of(stmt: &str) -> &str {
    stmt.split_whitespace()
        .nth(2)
        .unwrap_or("")
        .trim_end_matches(';')
        .trim_matches('"')
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
