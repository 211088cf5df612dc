//! Throwaway PostgreSQL clusters for the demo, started from the server binaries installed on the
//! machine.
//!
//! Each cluster lives in its own directory under the temporary directory (`$TMPDIR`, else `/tmp`):
//! `data/` (initdb), `server.log`, and the Unix socket. It listens on 127.0.0.1 only, with SCRAM
//! password authentication over TCP (a random password, never printed) and `trust` on its own
//! socket, whose directory only the server's OS user (and root) can enter. PostgreSQL refuses to
//! run as root, so as root every server program runs as the `postgres` OS user through `runuser`.
//! Dropping a [`Cluster`] stops the server and removes its directory, unless it was kept.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::error::{Error, Result};

/// Overrides where the server binaries are looked for (a directory with initdb, pg_ctl, postgres).
pub const BINDIR_VAR: &str = "PGFERRY_PG_BINDIR";
/// The database superuser initdb creates.
pub const SUPERUSER: &str = "postgres";
/// The OS user the server runs as when we are root.
const OS_USER: &str = "postgres";
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// Where the server binaries are: `$PGFERRY_PG_BINDIR` when set (and only there), else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`, else the Homebrew/Postgres.app
/// locations. The error says what to install.
pub fn find_bindir() -> Result<PathBuf> {
    let has_server = |dir: &Path| SERVER_PROGRAMS.iter().all(|p| dir.join(p).is_file());
    if let Some(dir) = std::env::var_os(BINDIR_VAR) {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        return Err(missing_binaries(&format!(
            "{BINDIR_VAR}={} has no {}",
            dir.display(),
            missing_in(&dir).join(", ")
        )));
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    for root in ["/usr/lib/postgresql", "/usr/local/opt", "/opt/homebrew/opt"] {
        let Ok(entries) = fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version_text = match root {
                "/usr/lib/postgresql" => name.as_str(),
                _ => match name.strip_prefix("postgresql@") {
                    Some(v) => v,
                    None => continue,
                },
            };
            let version: Vec<u64> = version_text
                .split('.')
                .map(|p| p.parse().unwrap_or(0))
                .collect();
            let bin = entry.path().join("bin");
            if has_server(&bin) && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    match best {
        Some((_, bin)) => Ok(bin),
        None => Err(missing_binaries(
            "neither `pg_config --bindir` nor /usr/lib/postgresql/*/bin has initdb, pg_ctl and postgres",
        )),
    }
}

fn missing_in(dir: &Path) -> Vec<&'static str> {
    SERVER_PROGRAMS
        .iter()
        .copied()
        .filter(|p| !dir.join(p).is_file())
        .collect()
}

fn missing_binaries(why: &str) -> Error {
    Error::permanent(format!(
        "the demo needs the PostgreSQL server programs (initdb, pg_ctl, postgres), and none were found: {why}"
    ))
    .hint(
        "install the PostgreSQL server: `apt-get install postgresql` (Debian, Ubuntu), \
         `dnf install postgresql-server` (Fedora, RHEL), `brew install postgresql@16` (macOS); \
         or point PGFERRY_PG_BINDIR at a directory holding initdb, pg_ctl and postgres",
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the OS user the server runs as (when we are root).
fn server_user_ids() -> Result<(u32, u32)> {
    let name = std::ffi::CString::new(OS_USER)
        .map_err(|_| Error::permanent("internal: OS user name has a NUL byte"))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getpwnam_r writes only into `pwd` and `buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(Error::permanent(format!(
            "running as root, but there is no `{OS_USER}` OS user to run PostgreSQL as (it refuses to run as root)"
        ))
        .hint("run the demo as an ordinary user, or install the server package (`apt-get install postgresql` creates that user)"));
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// A random password for a throwaway cluster (hex from the OS's random source).
pub fn random_password() -> Result<String> {
    let mut bytes = [0u8; 18];
    let mut f = File::open("/dev/urandom")
        .map_err(|e| Error::permanent(format!("reading /dev/urandom: {e}")))?;
    std::io::Read::read_exact(&mut f, &mut bytes)
        .map_err(|e| Error::permanent(format!("reading /dev/urandom: {e}")))?;
    Ok(hex::encode(bytes))
}

/// One running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub port: u16,
    /// Root directory: `data/`, `server.log`, the socket.
    pub dir: PathBuf,
    bindir: PathBuf,
    keep: bool,
    running: bool,
}

impl Cluster {
    /// initdb, configure and start on 127.0.0.1:`port` (0: a free port). Blocking.
    pub fn start(bindir: &Path, name: &str, port: u16, password: &str) -> Result<Cluster> {
        let owner = if is_root() {
            Some(server_user_ids()?)
        } else {
            None
        };
        let dir = make_dir(name)?;
        let mut cluster = Cluster {
            name: name.to_string(),
            port,
            dir,
            bindir: bindir.to_path_buf(),
            keep: false,
            running: false,
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&cluster.dir, Some(uid), Some(gid)).map_err(|e| {
                Error::permanent(format!(
                    "giving {} to the `{OS_USER}` user: {e}",
                    cluster.dir.display()
                ))
            })?;
        }
        cluster.initdb(password, owner)?;
        cluster.configure()?;
        let fixed = port != 0;
        for attempt in 1..=5 {
            if !fixed {
                cluster.port = free_port()?;
            }
            fs::write(
                cluster.data_dir().join("pgferry_demo_port.conf"),
                format!("port = {}\n", cluster.port),
            )
            .map_err(|e| Error::permanent(format!("writing the port setting: {e}")))?;
            match cluster.pg_ctl(&["start", "-w", "-t", "60"]) {
                Ok(()) => {
                    cluster.running = true;
                    return Ok(cluster);
                }
                Err(e) if !fixed && attempt < 5 && cluster.log_tail().contains("could not") => {
                    tracing::debug!("port {} taken? retrying: {e}", cluster.port);
                }
                Err(e) => {
                    return Err(e.hint(if fixed {
                        format!(
                            "is port {} free? choose other ports with --port-base",
                            cluster.port
                        )
                    } else {
                        format!("the server log is {}", cluster.log_file().display())
                    }));
                }
            }
        }
        Err(Error::permanent(format!(
            "could not start the {name} cluster on a free port"
        )))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The URL the plan uses (no password in it).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// How a person connects to it (over the trusted Unix socket: no password needed).
    pub fn psql_command(&self, db: &str) -> String {
        format!(
            "psql -h {} -p {} -U {SUPERUSER} {db}",
            shell_quote(&self.dir.display().to_string()),
            self.port
        )
    }

    /// Leave it running (and its directory in place) when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Stops the server (fast shutdown) and removes its directory. Blocking.
    pub fn stop(&mut self) -> Result<()> {
        if self.running {
            self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])
                .or_else(|_| self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]))?;
            self.running = false;
        }
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)
                .map_err(|e| Error::permanent(format!("removing {}: {e}", self.dir.display())))?;
        }
        Ok(())
    }

    /// A server program, run as the server's OS user when we are root.
    fn server_program(&self, program: &str) -> Command {
        let exe = self.bindir.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(OS_USER).arg("--").arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    fn initdb(&self, password: &str, owner: Option<(u32, u32)>) -> Result<()> {
        let pwfile = self.dir.join("pwfile");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&pwfile)
                .map_err(|e| Error::permanent(format!("creating {}: {e}", pwfile.display())))?;
            writeln!(f, "{password}")
                .map_err(|e| Error::permanent(format!("writing {}: {e}", pwfile.display())))?;
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))
                .map_err(|e| Error::permanent(format!("chown {}: {e}", pwfile.display())))?;
        }
        let out = self
            .server_program("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            // No --no-instructions: 14+ only, and the output is captured anyway.
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .output();
        let _ = fs::remove_file(&pwfile);
        let out = out.map_err(|e| Error::permanent(format!("running initdb: {e}")))?;
        if !out.status.success() {
            let err = Error::permanent(format!(
                "initdb for the {} cluster failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return Err(if is_root() {
                err.hint(format!(
                    "the `{OS_USER}` OS user runs the server and must be able to enter {}; set TMPDIR to a directory it can reach (such as /tmp)",
                    std::env::temp_dir().display()
                ))
            } else {
                err
            });
        }
        Ok(())
    }

    fn configure(&self) -> Result<()> {
        let conf = format!(
            "\n# added by `pgferry demo`\n\
             include_if_exists = 'pgferry_demo_port.conf'\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = logical\n\
             max_replication_slots = 16\n\
             max_wal_senders = 16\n\
             max_connections = 100\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 128MB\n\
             max_wal_size = 2GB\n\
             log_min_messages = warning\n",
            self.dir.display().to_string().replace('\'', "''")
        );
        let append = |path: PathBuf, text: &str| -> Result<()> {
            OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|e| Error::permanent(format!("writing {}: {e}", path.display())))
        };
        append(self.data_dir().join("postgresql.conf"), &conf)?;
        append(
            self.data_dir().join("pg_hba.conf"),
            "\n# added by `pgferry demo`\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host replication all 127.0.0.1/32 scram-sha-256\n",
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        // Output to a file, never to our pipes: the postmaster pg_ctl forks must not hold them.
        let out_path = self.dir.join("pg_ctl.out");
        let file = File::create(&out_path)
            .map_err(|e| Error::permanent(format!("creating {}: {e}", out_path.display())))?;
        let err = file
            .try_clone()
            .map_err(|e| Error::permanent(format!("creating {}: {e}", out_path.display())))?;
        let status = self
            .server_program("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(args)
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .status()
            .map_err(|e| Error::permanent(format!("running pg_ctl: {e}")))?;
        if status.success() {
            return Ok(());
        }
        let output = fs::read_to_string(&out_path).unwrap_or_default();
        Err(Error::permanent(format!(
            "`pg_ctl {}` for the {} cluster failed: {}; server log: {}",
            args.first().copied().unwrap_or(""),
            self.name,
            output.trim(),
            self.log_tail()
        )))
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = self.stop() {
            eprintln!("warning: {e}");
        }
    }
}

/// A new private directory for one cluster under the temporary directory.
fn make_dir(name: &str) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for n in 0..100u32 {
        let dir = base.join(format!(
            "pgferry-demo-{name}-{}-{nanos:08x}{n}",
            std::process::id()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::permanent(format!("chmod {}: {e}", dir.display())))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::permanent(format!(
                    "creating a directory under {}: {e}",
                    base.display()
                ))
                .hint("set TMPDIR to a writable directory"));
            }
        }
    }
    Err(Error::permanent(format!(
        "could not create a unique directory under {}",
        base.display()
    )))
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::permanent(format!("finding a free port on 127.0.0.1: {e}")))
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Starts both clusters at once.
pub fn start_pair(
    bindir: &Path,
    port_base: Option<u16>,
    password: &str,
) -> Result<(Cluster, Cluster)> {
    let started = Instant::now();
    let (sp, tp) = match port_base {
        Some(p) => (p, p.checked_add(1).unwrap_or(0)),
        None => (0, 0),
    };
    let (s, t) = std::thread::scope(|scope| {
        let s = scope.spawn(|| Cluster::start(bindir, "source", sp, password));
        let t = scope.spawn(|| Cluster::start(bindir, "target", tp, password));
        (s.join(), t.join())
    });
    let join = |r: std::thread::Result<Result<Cluster>>| {
        r.unwrap_or_else(|_| Err(Error::permanent("internal: starting a cluster panicked")))
    };
    let (s, t) = (join(s), join(t));
    let pair = (s?, t?);
    tracing::debug!("clusters started in {:.1?}", started.elapsed());
    Ok(pair)
}
