//! Throwaway PostgreSQL clusters for integration tests.
//!
//! Each cluster lives in its own directory under `/tmp`, listens on
//! `127.0.0.1` on a free port (and on a Unix socket inside its own
//! directory), and is configured for logical replication. A detached
//! "reaper" shell loop watches the test process and, once it is gone (normal
//! exit, panic or SIGKILL), stops the server and removes the directory.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root every
//! server-side tool (initdb, pg_ctl and therefore postgres) runs as the
//! `postgres` OS user through `runuser`.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Password of the `postgres` superuser in every test cluster.
///
/// Fixed so that tests can assert it never shows up in pgferry's output,
/// logs or reports.
pub const PASSWORD: &str = "ferry-Secret-7x!";

/// Database superuser created by initdb.
const SUPERUSER: &str = "postgres";
/// OS user the server runs as when the tests run as root.
const OS_USER: &str = "postgres";
/// How many ports to try before giving up on starting a cluster.
const START_ATTEMPTS: usize = 5;
/// Longest identifier PostgreSQL keeps without truncating (NAMEDATALEN - 1).
const MAX_IDENT_LEN: usize = 63;

static DB_COUNTER: AtomicU64 = AtomicU64::new(0);
static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One running throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct Cluster {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Temporary root directory (data dir, log, Unix socket live in here).
    pub dir: PathBuf,
    /// The cluster's data directory (`<dir>/data`).
    pub data_dir: PathBuf,
    /// Directory holding initdb, pg_ctl, postgres (and, for the system installation, psql).
    pub bindir: PathBuf,
    /// Directory of the client programs (psql, pg_dump, ...) the tests use on this cluster: the
    /// server's own when it has them, else the newest installation that has them (a client is
    /// compatible with older servers, never the other way round).
    pub tools_bindir: PathBuf,
    /// The server's major version (12, 13, ..., 18).
    pub major: u32,
    /// Name given to [`Cluster::start`]; used for directory naming and logs.
    pub name: String,
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
        let major = server_major(&bindir);
        let tools_bindir = if bindir.join("psql").is_file() && bindir.join("pg_dump").is_file() {
            bindir.clone()
        } else {
            newest_tools_bindir()
        };
        let dir = make_temp_root(name);
        let data_dir = dir.join("data");
        // Arrange for cleanup before anything else can fail.
        spawn_reaper(&bindir, &dir, &data_dir);
        if is_root() {
            chown_to_os_user(&dir);
        }

        let cluster = Cluster {
            port: 0,
            dir,
            data_dir,
            bindir,
            tools_bindir,
            major,
            name: name.to_string(),
        };
        cluster.initdb();
        cluster.configure();
        for (file, contents) in files {
            let path = cluster.data_dir.join(file);
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            f.write_all(contents)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            if is_root() {
                chown_to_os_user(&path);
            }
        }
        if !extra_conf.is_empty() {
            append(
                &cluster.data_dir.join("postgresql.conf"),
                &format!("\n# --- extra settings of this test ---\n{extra_conf}\n"),
            );
        }
        let cluster = cluster.start_on_free_port();
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
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .password(PASSWORD)
            .dbname(db)
            .application_name("pgferry-tests")
            .connect_timeout(Duration::from_secs(15));
        let (client, connection) =
            config
                .connect(tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "connecting to cluster {:?} (127.0.0.1:{}) database {db:?} failed: {}",
                        self.name,
                        self.port,
                        describe_error(&e)
                    )
                });
        let label = format!("{}/{db}", self.name);
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
        let mut cmd = self.psql_command(db);
        cmd.arg("-c").arg(sql);
        let out = run(&mut cmd, "psql");
        if !out.status.success() {
            panic!(
                "psql on cluster {:?} database {db:?} failed ({}) running:\n{sql}\n--- stderr ---\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        stdout
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
        if let Err(msg) = self.try_pg_ctl(args) {
            panic!("{msg}");
        }
    }

    /// Contents of the server log file (empty if it doesn't exist yet).
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

    pub fn server_log(&self) -> String {
        match fs::read(self.log_file()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    // ----- internals -------------------------------------------------------

    fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A command for a server-side tool in `bindir`, run as the `postgres`
    /// OS user when we are root.
    fn server_tool(&self, tool: &str) -> Command {
        let exe = self.bindir.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(OS_USER).arg("--").arg(exe);
            c
        } else {
            Command::new(exe)
        };
        // A directory the server user can enter, so tools don't warn about
        // being unable to chdir back to the caller's cwd.
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
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

    fn initdb(&self) {
        let pwfile = self.dir.join("pwfile");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pwfile)
                .unwrap_or_else(|e| panic!("creating {}: {e}", pwfile.display()));
            writeln!(f, "{PASSWORD}").expect("writing password file");
        }
        if is_root() {
            chown_to_os_user(&pwfile);
        }
        let mut cmd = self.server_tool("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-U")
            .arg(SUPERUSER)
            .arg("--auth-local=trust")
            .arg("--auth-host=scram-sha-256")
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-E")
            .arg("UTF8")
            .arg("--locale=C")
            .arg("--no-sync");
        if self.major >= 14 {
            // 14+ only; older initdbs refuse the option.
            cmd.arg("--no-instructions");
        }
        let out = run(&mut cmd, "initdb");
        let _ = fs::remove_file(&pwfile);
        if !out.status.success() {
            panic!(
                "initdb for cluster {:?} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Appends the test settings to postgresql.conf and makes sure pg_hba.conf
    /// allows password (SCRAM) connections, normal and replication, from
    /// 127.0.0.1.
    fn configure(&self) {
        let conf = format!(
            "\n# --- added by pgferry's test support ---\n\
             include_if_exists = '{port_conf}'\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket_dir}'\n\
             wal_level = logical\n\
             max_replication_slots = 32\n\
             max_wal_senders = 32\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 128MB\n\
             max_connections = 200\n\
             log_min_messages = warning\n",
            port_conf = PORT_CONF,
            socket_dir = conf_quote(&self.dir.display().to_string()),
        );
        append(&self.data_dir.join("postgresql.conf"), &conf);

        let hba_path = self.data_dir.join("pg_hba.conf");
        let hba = fs::read_to_string(&hba_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", hba_path.display()));
        let mut missing = String::new();
        for wanted in [
            "host all all 127.0.0.1/32 scram-sha-256",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ] {
            let present = hba.lines().any(|line| {
                let line = line.split('#').next().unwrap_or("");
                line.split_whitespace().collect::<Vec<_>>().join(" ") == wanted
            });
            if !present {
                missing.push_str(wanted);
                missing.push('\n');
            }
        }
        if !missing.is_empty() {
            append(
                &hba_path,
                &format!("\n# added by pgferry's test support\n{missing}"),
            );
        }
    }

    /// Picks a free port, writes it to the port include file and starts the
    /// server; retries with another port if the chosen one got taken.
    fn start_on_free_port(mut self) -> Cluster {
        for attempt in 1..=START_ATTEMPTS {
            self.port = free_port();
            let port_conf = self.data_dir.join(PORT_CONF);
            fs::write(&port_conf, format!("port = {}\n", self.port))
                .unwrap_or_else(|e| panic!("writing {}: {e}", port_conf.display()));
            if is_root() {
                chown_to_os_user(&port_conf);
            }
            let log_before = self.server_log().len();
            match self.try_pg_ctl(&["start"]) {
                Ok(()) => return self,
                Err(msg) => {
                    let log = self.server_log();
                    let new_log = log.get(log_before..).unwrap_or(&log);
                    let port_taken = new_log.contains("Address already in use")
                        || new_log.contains("could not bind")
                        || new_log.contains("could not create any TCP/IP sockets");
                    if port_taken && attempt < START_ATTEMPTS {
                        eprintln!(
                            "[support] cluster {:?}: port {} was taken, retrying on another port",
                            self.name, self.port
                        );
                        continue;
                    }
                    panic!("starting cluster {:?} failed: {msg}", self.name);
                }
            }
        }
        unreachable!("the last start attempt either returns or panics")
    }

    fn try_pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        // pg_ctl's output goes to a file, never to our (cargo's) pipes: the
        // postmaster it forks must not hold them open.
        let out_path = self.dir.join("pg_ctl.out");
        let out_file = File::create(&out_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", out_path.display()));
        let err_file = out_file.try_clone().expect("cloning pg_ctl output file");
        let mut cmd = self.server_tool("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.log_file())
            .args(args)
            .arg("-w")
            .arg("-t")
            .arg("60")
            .stdout(Stdio::from(out_file))
            .stderr(Stdio::from(err_file));
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("running pg_ctl for cluster {:?}: {e}", self.name));
        if status.success() {
            return Ok(());
        }
        let output = fs::read_to_string(&out_path).unwrap_or_default();
        Err(format!(
            "`pg_ctl {}` on cluster {:?} (port {}) failed ({status}):\n{}\n--- tail of server log {} ---\n{}",
            args.join(" "),
            self.name,
            self.port,
            output.trim_end(),
            self.log_file().display(),
            tail(&self.server_log(), 40)
        ))
    }
}

/// Name of the file (inside the data dir) holding `port = N`.
const PORT_CONF: &str = "pgferry_test_port.conf";

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

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid/gid of the `postgres` OS user (only needed when running as root).
fn os_user_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let name = CString::new(OS_USER).expect("user name has no NUL");
        // SAFETY: `name` is a valid C string; the returned record is read
        // immediately, and the OnceLock serializes calls from this module.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            panic!(
                "running as root, but there is no `{OS_USER}` OS user to run PostgreSQL as \
                 (PostgreSQL refuses to run as root). Install the server with \
                 `apt-get install -y postgresql`, which creates that user."
            );
        }
        // SAFETY: checked non-null above.
        unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
    })
}

fn chown_to_os_user(path: &Path) {
    let (uid, gid) = os_user_ids();
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {} to {OS_USER}: {e}", path.display()));
}

/// `pg_config --bindir` if it has initdb, else the highest-versioned
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            let has_server = |dir: &Path| {
                dir.join("initdb").is_file()
                    && dir.join("pg_ctl").is_file()
                    && dir.join("postgres").is_file()
            };
            if let Ok(out) = Command::new("pg_config")
                .arg("--bindir")
                .stdin(Stdio::null())
                .output()
                && out.status.success()
            {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_server(&dir) {
                    return dir;
                }
            }
            let mut best: Option<(Vec<u64>, PathBuf)> = None;
            if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
                for entry in entries.flatten() {
                    let version: Vec<u64> = entry
                        .file_name()
                        .to_string_lossy()
                        .split('.')
                        .map(|part| part.parse().unwrap_or(0))
                        .collect();
                    let bin = entry.path().join("bin");
                    if has_server(&bin) && best.as_ref().is_none_or(|(v, _)| version > *v) {
                        best = Some((version, bin));
                    }
                }
            }
            match best {
                Some((_, bin)) => bin,
                None => panic!(
                    "no PostgreSQL server binaries found (neither `pg_config --bindir` nor \
                     /usr/lib/postgresql/*/bin has initdb, pg_ctl and postgres). \
                     Install them with: apt-get install -y postgresql"
                ),
            }
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
    let has_server = |dir: &Path| {
        dir.join("initdb").is_file()
            && dir.join("pg_ctl").is_file()
            && dir.join("postgres").is_file()
    };
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

/// The major version `postgres --version` in `bindir` reports.
fn server_major(bindir: &Path) -> u32 {
    let exe = bindir.join("postgres");
    let out = Command::new(&exe)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {} --version: {e}", exe.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .last()
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the version of {}: {text:?}", exe.display()))
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

/// Creates a fresh directory under /tmp (which the `postgres` user can
/// traverse) for one cluster.
fn make_temp_root(name: &str) -> PathBuf {
    let base = Path::new("/tmp");
    let label = match sanitize(name) {
        s if s.is_empty() => "cluster".to_string(),
        mut s => {
            s.truncate(20);
            s
        }
    };
    for _ in 0..100 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = base.join(format!(
            "pgferry-test-{label}-{}-{n}-{nanos:08x}",
            std::process::id()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
                return dir;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("creating {}: {e}", dir.display()),
        }
    }
    panic!(
        "could not create a unique directory under {}",
        base.display()
    );
}

/// Starts a detached shell loop (own session, stdio on /dev/null) that waits
/// for this process to disappear, then stops the cluster and deletes `dir`.
fn spawn_reaper(bindir: &Path, dir: &Path, data_dir: &Path) {
    let as_server_user = if is_root() {
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free port on 127.0.0.1: {e}"))
}

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
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

/// Escapes a value for a single-quoted postgresql.conf string.
fn conf_quote(s: &str) -> String {
    s.replace('\'', "''")
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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
