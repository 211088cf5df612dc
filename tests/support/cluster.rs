//! Throwaway PostgreSQL clusters for integration tests, launched by the library's
//! [`pgferry::pg::cluster`] (the same launcher as `pgferry demo`: its own directory, 127.0.0.1 on a
//! free port and a private Unix socket, logical replication, `runuser -u postgres` when root).
//!
//! What is test-only lives here: each cluster's directory under `/tmp`, a fixed password, a
//! detached "reaper" shell loop that watches the test process and, once it is gone (normal exit,
//! panic or SIGKILL), stops the server and removes the directory; the shared pair, per-test
//! databases, version packages, psql helpers that panic with context, Pagila.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgferry::pg::cluster as launcher;

/// Password of the `postgres` superuser in every test cluster.
///
/// Fixed so that tests can assert it never shows up in pgferry's output,
/// logs or reports.
pub const PASSWORD: &str = "ferry-Secret-7x!";

/// Database superuser created by initdb.
pub const SUPERUSER: &str = launcher::SUPERUSER;
/// OS user the server runs as when the tests run as root.
const OS_USER: &str = launcher::OS_USER;
/// Longest identifier PostgreSQL keeps without truncating (NAMEDATALEN - 1).
const MAX_IDENT_LEN: usize = 63;

static DB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One running throwaway PostgreSQL cluster. The launcher's fields (`port`, `dir`, `data_dir`,
/// `bindir`, `major`, `name`) and methods (`server_log`, ...) are reached through `Deref`.
#[derive(Debug)]
pub struct Cluster {
    /// The launched server.
    server: launcher::Cluster,
    /// Directory of the client programs (psql, pg_dump, ...) the tests use on this cluster: the
    /// server's own when it has them, else the newest installation that has them (a client is
    /// compatible with older servers, never the other way round).
    pub tools_bindir: PathBuf,
}

impl std::ops::Deref for Cluster {
    type Target = launcher::Cluster;

    fn deref(&self) -> &launcher::Cluster {
        &self.server
    }
}

/// The source and target clusters shared by all tests of one test binary.
#[derive(Debug)]
pub struct Pair {
    pub source: Cluster,
    pub target: Cluster,
}

impl Cluster {
    /// Creates, configures and starts a new cluster. Blocks until it accepts
    /// connections; panics with context (including the server log) on failure.
    pub fn start(name: &str) -> Cluster {
        Cluster::start_with(name, "", &[])
    }

    /// Like [`Cluster::start`], with `extra_conf` appended to postgresql.conf and `files`
    /// (name relative to the data directory, contents) written into the data directory before
    /// the server starts, mode 0600 and owned by the server's OS user (server keys need both).
    /// For tests that need their own server (TLS, restarts); the shared [`pair`] never uses it.
    pub fn start_with(name: &str, extra_conf: &str, files: &[(&str, &[u8])]) -> Cluster {
        Cluster::start_in(find_bindir(), name, extra_conf, files)
    }

    /// Starts a cluster of PostgreSQL `major` (12 to 18), from the binaries
    /// `scripts/pg-versions.sh` installs (see [`version_bindir`]). `None`, after a loud SKIPPED
    /// line, when they are not installed; under `CI=true` that is a failure naming the command
    /// that installs them.
    pub fn start_version(major: u32, name: &str) -> Option<Cluster> {
        let bindir = version_bindir(major)?;
        Some(Cluster::start_in(bindir, name, "", &[]))
    }

    fn start_in(bindir: PathBuf, name: &str, extra_conf: &str, files: &[(&str, &[u8])]) -> Cluster {
        let started = Instant::now();
        let tools_bindir = if bindir.join("psql").is_file() && bindir.join("pg_dump").is_file() {
            bindir.clone()
        } else {
            newest_tools_bindir()
        };
        let fail = |what: &str, e: pgferry::error::Error| -> ! {
            panic!("{what} of cluster {name:?} failed: {e}")
        };
        let server = launcher::Cluster::create(&bindir, Path::new("/tmp"), "pgferry-test", name)
            .unwrap_or_else(|e| fail("creating the directory", e));
        // Arrange for cleanup before anything else can fail.
        spawn_reaper(&bindir, &server.dir, &server.data_dir);
        let mut cluster = Cluster {
            server,
            tools_bindir,
        };
        let server = &mut cluster.server;
        server
            .initdb(PASSWORD)
            .unwrap_or_else(|e| fail("initdb", e));
        server
            .configure(
                "pgferry's test support",
                "max_replication_slots = 32\n\
                 max_wal_senders = 32\n\
                 max_connections = 200\n",
            )
            .unwrap_or_else(|e| fail("configuring", e));
        for (file, contents) in files {
            server
                .write_data_file(file, contents)
                .unwrap_or_else(|e| fail("writing a file into the data directory", e));
        }
        if !extra_conf.is_empty() {
            server
                .append_conf(&format!(
                    "\n# --- extra settings of this test ---\n{extra_conf}\n"
                ))
                .unwrap_or_else(|e| fail("configuring", e));
        }
        if let Err(e) = server.start(0) {
            panic!(
                "starting cluster {name:?} failed: {e}\n--- tail of server log {} ---\n{}",
                server.log_file().display(),
                server.log_tail(40).join("\n")
            );
        }
        eprintln!(
            "[support] cluster {:?} started on 127.0.0.1:{} in {:.2?} (dir {})",
            cluster.name,
            cluster.port,
            started.elapsed(),
            cluster.dir.display()
        );
        cluster
    }

    /// `postgres://postgres@127.0.0.1:{port}/{db}` — deliberately without the
    /// password.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{}",
            self.port,
            percent_encode(db)
        )
    }

    /// Like [`Cluster::url`] but with the (percent-encoded) password.
    pub fn url_with_password(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{}",
            percent_encode(PASSWORD),
            self.port,
            percent_encode(db)
        )
    }

    /// Connects over TCP with the password and spawns the connection task on
    /// the current tokio runtime.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        connect_as(
            &format!("cluster {:?}", self.name),
            self.port,
            SUPERUSER,
            db,
        )
        .await
    }

    /// Creates a new, empty database named `{prefix}_{pid}_{counter}`
    /// (lowercased, sanitized to `[a-z0-9_]`, prefix shortened if needed so
    /// the name fits in 63 bytes) and returns its name. Unique across threads.
    pub fn fresh_database(&self, prefix: &str) -> String {
        let counter = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let suffix = format!("_{}_{counter}", std::process::id());
        let mut base = sanitize(prefix);
        if base.is_empty() {
            base.push_str("db");
        }
        base.truncate(MAX_IDENT_LEN - suffix.len());
        let name = format!("{base}{suffix}");
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        name
    }

    /// Runs `psql -X -v ON_ERROR_STOP=1 -At -c <sql>` over TCP (password via
    /// `PGPASSWORD`) and returns its stdout, minus the final newline.
    /// Panics with stderr on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Cluster::psql`] that returns its failure instead of panicking: for polling while a fence
    /// may end the session (`terminating connection due to administrator command`).
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = self.psql_command(db);
        cmd.arg("-c").arg(sql);
        let out = run(&mut cmd, "psql");
        if !out.status.success() {
            return Err(format!(
                "psql on cluster {:?} database {db:?} failed ({}) running:\n{sql}\n--- stderr ---\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        Ok(stdout)
    }

    /// Runs an SQL file with `psql -X -v ON_ERROR_STOP=1 -At -q -f <path>`.
    /// Panics with stderr on failure.
    pub fn psql_file(&self, db: &str, path: &Path) {
        let mut cmd = self.psql_command(db);
        cmd.arg("-q").arg("-f").arg(path);
        let out = run(&mut cmd, "psql");
        if !out.status.success() {
            panic!(
                "psql on cluster {:?} database {db:?} failed ({}) running file {}\n--- stderr ---\n{}",
                self.name,
                out.status,
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs `pg_ctl -D <data_dir> -l <log> <args> -w -t 60` (as `postgres`
    /// when root), e.g. `&["restart", "-m", "fast"]`. Panics on failure with
    /// pg_ctl's output and the tail of the server log.
    pub fn pg_ctl(&self, args: &[&str]) {
        let mut all = args.to_vec();
        all.extend(["-w", "-t", "60"]);
        if let Err(e) = self.server.pg_ctl(&all) {
            panic!(
                "{e}\n--- tail of server log {} ---\n{}",
                self.log_file().display(),
                self.log_tail(40).join("\n")
            );
        }
    }

    /// Runs a client program of this cluster's installation (pg_dump, pg_restore, ...) against
    /// `db` over TCP with the test password, ignoring any libpq settings of the environment;
    /// returns its stdout, panicking with its stderr when it fails.
    pub fn run_tool(&self, program: &str, db: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(self.tools_bindir.join(program));
        for k in [
            "PGHOST",
            "PGHOSTADDR",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGPASSFILE",
            "PGSERVICE",
            "PGOPTIONS",
            "PGSSLMODE",
        ] {
            cmd.env_remove(k);
        }
        cmd.args(args)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", SUPERUSER)
            .env("PGDATABASE", db)
            .env("PGPASSWORD", PASSWORD)
            .stdin(Stdio::null());
        let out = cmd.output().expect("run a PostgreSQL client program");
        assert!(
            out.status.success(),
            "{program} {args:?} on {db} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub(crate) fn psql_command(&self, db: &str) -> Command {
        let mut cmd = Command::new(self.tools_bindir.join("psql"));
        cmd.arg("-X")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg("-At")
            .arg("--dbname")
            .arg(self.conninfo(db));
        clear_libpq_env(&mut cmd);
        cmd.env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "15")
            .stdin(Stdio::null());
        cmd
    }

    /// libpq keyword/value connection string for `db` over TCP.
    fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={} application_name=pgferry-tests",
            self.port,
            conninfo_quote(db)
        )
    }
}

/// The shared source+target pair for this test binary, started lazily (both
/// clusters in parallel) on first use. Safe to call from many threads; if
/// startup fails, every caller panics with the original error.
pub fn pair() -> &'static Pair {
    static PAIR: OnceLock<Result<Pair, String>> = OnceLock::new();
    let result = PAIR.get_or_init(|| {
        let started = Instant::now();
        // `PGFERRY_TEST_SOURCE_MAJOR` / `PGFERRY_TEST_TARGET_MAJOR` (the benchmarks' old-to-new
        // runs): clusters of those versions instead of the system's.
        let major = |var: &str| {
            std::env::var(var).ok().map(|v| {
                v.parse::<u32>()
                    .unwrap_or_else(|_| panic!("{var}={v:?} is not a major version"))
            })
        };
        let start = |role: &str, var: &str| match major(var) {
            Some(m) => Cluster::start_version(m, role).unwrap_or_else(|| {
                panic!("{var}={m}: PostgreSQL {m} is not installed (scripts/pg-versions.sh {m})")
            }),
            None => Cluster::start(role),
        };
        let (source, target) = std::thread::scope(|s| {
            let source = s.spawn(|| start("source", "PGFERRY_TEST_SOURCE_MAJOR"));
            let target = s.spawn(|| start("target", "PGFERRY_TEST_TARGET_MAJOR"));
            (source.join(), target.join())
        });
        match (source, target) {
            (Ok(source), Ok(target)) => {
                eprintln!(
                    "[support] source (port {}) and target (port {}) ready in {:.2?}",
                    source.port,
                    target.port,
                    started.elapsed()
                );
                Ok(Pair { source, target })
            }
            (source, target) => {
                let mut msg = String::new();
                if let Err(p) = source {
                    msg.push_str(&format!("source: {}\n", panic_message(&*p)));
                }
                if let Err(p) = target {
                    msg.push_str(&format!("target: {}\n", panic_message(&*p)));
                }
                Err(msg)
            }
        }
    });
    match result {
        Ok(pair) => pair,
        Err(msg) => panic!("the test cluster pair failed to start:\n{msg}"),
    }
}

/// `$PGFERRY_PAGILA_DIR`, else `../shared/data/pagila` relative to the crate root, if
/// `pagila-schema.sql` and `pagila-data.sql` are there. Otherwise [`super::require::missing`]: a
/// failure under CI, a loud SKIPPED line elsewhere.
pub fn pagila_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PGFERRY_PAGILA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/pagila"));
    if dir.join("pagila-schema.sql").is_file() && dir.join("pagila-data.sql").is_file() {
        Some(dir.canonicalize().unwrap_or(dir))
    } else {
        super::require::missing(
            &format!(
                "Pagila is not at {} (pagila-schema.sql and pagila-data.sql)",
                dir.display()
            ),
            "put Pagila's pagila-schema.sql and pagila-data.sql in shared/data/pagila beside the \
             checkout (CI's copy of shared/ has them), or point PGFERRY_PAGILA_DIR at them",
        );
        None
    }
}

/// Loads Pagila's schema and then its data into `db` on `cluster`. Returns false when Pagila
/// isn't available (a failure under CI, see [`pagila_dir`]); the caller returns.
pub fn load_pagila(cluster: &Cluster, db: &str) -> bool {
    let Some(dir) = pagila_dir() else {
        return false;
    };
    let started = Instant::now();
    cluster.psql_file(db, &dir.join("pagila-schema.sql"));
    cluster.psql_file(db, &dir.join("pagila-data.sql"));
    eprintln!(
        "[support] loaded Pagila into {}/{db} in {:.2?}",
        cluster.name,
        started.elapsed()
    );
    true
}

/// The pgferry binary under test, with `PGPASSWORD` removed from its
/// environment and `NO_COLOR=1`.
pub fn pgferry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
    cmd.env_remove("PGPASSWORD").env("NO_COLOR", "1");
    cmd
}

/// `pg_dump [dump_args] sdb | psql tdb` with the installed client programs (the database `tdb`
/// must exist); panics with psql's stderr if either side fails.
pub fn pipe_dump(source: &Cluster, sdb: &str, dump_args: &[&str], target: &Cluster, tdb: &str) {
    let source_port = source.port.to_string();
    let mut dump = Command::new(source.tools_bindir.join("pg_dump"))
        .args(dump_args)
        .args(["-h", "127.0.0.1", "-p", &source_port, "-U", SUPERUSER, sdb])
        .env("PGPASSWORD", PASSWORD)
        .stdout(Stdio::piped())
        .spawn()
        .expect("pg_dump");
    let target_port = target.port.to_string();
    let out = Command::new(target.tools_bindir.join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &target_port,
            "-U",
            SUPERUSER,
            "-d",
            tdb,
        ])
        .env("PGPASSWORD", PASSWORD)
        .stdin(dump.stdout.take().expect("pipe"))
        .stdout(Stdio::null())
        .output()
        .expect("psql");
    assert!(dump.wait().expect("pg_dump").success(), "pg_dump failed");
    assert!(
        out.status.success(),
        "pg_dump | psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `"{count}:{md5}"` over the rows of `table` (a caller-quoted, qualified
/// name), independent of row order.
pub fn row_digest(cluster: &Cluster, db: &str, table: &str) -> String {
    let sql = format!(
        "select count(*) || ':' || coalesce(md5(string_agg(md5(t::text), ',' order by md5(t::text))), '') from {table} t"
    );
    cluster.psql(db, &sql).trim().to_string()
}

// ----- helpers --------------------------------------------------------------

/// The server binaries the library's launcher finds ([`launcher::find_bindir`]: `PGFERRY_PG_BINDIR`,
/// `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`, ...), found once.
pub fn find_bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            launcher::find_bindir()
                .unwrap_or_else(|e| panic!("{e}. Install them with: apt-get install -y postgresql"))
        })
        .clone()
}

/// Where `scripts/pg-versions.sh` installs one directory per major version.
pub fn versions_dir() -> PathBuf {
    std::env::var_os("PGFERRY_PG_VERSIONS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pgferry/pg"))
}

/// The bindir of PostgreSQL `major`: `$PGFERRY_PG<major>_BINDIR`, else
/// `<versions_dir>/<major>/bin`, else `/usr/lib/postgresql/<major>/bin`. `None` after a loud
/// SKIPPED line when none has the server; under `CI=true` a panic with the install command.
pub fn version_bindir(major: u32) -> Option<PathBuf> {
    let has_server = |dir: &Path| launcher::has_server(dir);
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os(format!("PGFERRY_PG{major}_BINDIR")) {
        candidates.push(PathBuf::from(dir));
    }
    candidates.push(versions_dir().join(major.to_string()).join("bin"));
    candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    if let Some(dir) = candidates.iter().find(|d| has_server(d)) {
        return Some(dir.clone());
    }
    let how = if major == 15 {
        "apt-get install -y postgresql-15 (what .ci/run does)".to_string()
    } else {
        format!("scripts/pg-versions.sh {major} (what .ci/run does)")
    };
    let msg = format!(
        "PostgreSQL {major} server binaries not found (looked in {})",
        candidates
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    super::require::missing(
        &msg,
        &format!(
            "{how}, or point PGFERRY_PG{major}_BINDIR at a directory with initdb, pg_ctl and postgres"
        ),
    );
    None
}

/// The client programs of the newest installation that has psql and pg_dump: the version
/// cache's (18 first), else the system's.
pub fn newest_tools_bindir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let has_tools = |dir: &Path| dir.join("psql").is_file() && dir.join("pg_dump").is_file();
        let mut best: Option<(u32, PathBuf)> = None;
        let mut consider = |dir: PathBuf| {
            if has_tools(&dir) {
                let out = Command::new(dir.join("pg_dump")).arg("--version").output();
                let major = out
                    .ok()
                    .and_then(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .split_whitespace()
                            .last()
                            .and_then(|v| v.split('.').next())
                            .and_then(|m| m.parse::<u32>().ok())
                    })
                    .unwrap_or(0);
                if best.as_ref().is_none_or(|(m, _)| major > *m) {
                    best = Some((major, dir));
                }
            }
        };
        for root in [versions_dir(), PathBuf::from("/usr/lib/postgresql")] {
            if let Ok(entries) = fs::read_dir(&root) {
                for entry in entries.flatten() {
                    consider(entry.path().join("bin"));
                }
            }
        }
        consider(find_bindir());
        best.map(|(_, d)| d).unwrap_or_else(find_bindir)
    })
    .clone()
}

/// Starts a detached shell loop (own session, stdio on /dev/null) that waits
/// for this process to disappear, then stops the cluster and deletes `dir`.
fn spawn_reaper(bindir: &Path, dir: &Path, data_dir: &Path) {
    let as_server_user = if launcher::is_root() {
        format!("runuser -u {OS_USER} -- ")
    } else {
        String::new()
    };
    let script = format!(
        "cd / ; \
         while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         if [ -f {pidfile} ]; then {as_server_user}{pg_ctl} -D {data} stop -m immediate -w -t 30; fi; \
         rm -rf {dir}",
        pid = std::process::id(),
        pidfile = sh_quote(&data_dir.join("postmaster.pid").display().to_string()),
        pg_ctl = sh_quote(&bindir.join("pg_ctl").display().to_string()),
        data = sh_quote(&data_dir.display().to_string()),
        dir = sh_quote(&dir.display().to_string()),
    );
    // The outer `sh` backgrounds the loop and exits at once (so we can wait
    // for it and leave no zombie); the loop itself is re-parented to init.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("( {script} ) </dev/null >/dev/null 2>&1 &"))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; nothing else runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("starting the cleanup reaper: {e}"));
    assert!(status.success(), "starting the cleanup reaper: {status}");
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {what} ({cmd:?}): {e}"))
}

/// Drops libpq environment variables that could redirect or alter psql's
/// connection.
fn clear_libpq_env(cmd: &mut Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGSSLMODE",
        "PGREQUIRESSL",
        "PGTARGETSESSIONATTRS",
    ] {
        cmd.env_remove(var);
    }
}

/// Lowercases and replaces everything outside `[a-z0-9_]` with `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Quotes a value for a libpq keyword/value connection string.
fn conninfo_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "(non-string panic payload)".to_string()
    }
}

fn describe_error(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    if let Some(db) = e.as_db_error() {
        let detail = format!("{}: {}", db.severity(), db.message());
        if !text.contains(db.message()) {
            text.push_str(&format!(" ({detail})"));
        }
    } else {
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            let s_text = s.to_string();
            if !text.contains(&s_text) {
                text.push_str(&format!(": {s_text}"));
            }
            source = s.source();
        }
    }
    text
}

/// A dump's text without psql's `\restrict` / `\unrestrict` lines, which carry a random key and so
/// differ between two dumps of the same schema.
pub fn strip_restrict(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The connection settings for database `db` on 127.0.0.1:`port` as `user` (password
/// [`PASSWORD`]), for a client that connects (and reconnects) itself; [`connect_as`] adds the
/// tests' application name and timeout.
pub fn config_as(port: u16, user: &str, db: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(PASSWORD)
        .dbname(db);
    config
}

/// Connects to database `db` on 127.0.0.1:`port` as `user` (password [`PASSWORD`]) and spawns
/// the connection task on the current tokio runtime; panics when it cannot. `label` names the
/// cluster or the client in the panic and in the log line of a connection that ends in error.
pub async fn connect_as(label: &str, port: u16, user: &str, db: &str) -> tokio_postgres::Client {
    let mut config = config_as(port, user, db);
    config
        .application_name("pgferry-tests")
        .connect_timeout(Duration::from_secs(15));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connecting to {label} (127.0.0.1:{port}) database {db:?} as {user} failed: {}",
                describe_error(&e)
            )
        });
    let label = format!("{label}/{db}");
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!(
                "[support] connection to {label} ended with error: {}",
                describe_error(&e)
            );
        }
    });
    client
}
