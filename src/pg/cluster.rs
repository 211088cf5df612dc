//! Throwaway PostgreSQL clusters started from the server binaries installed on the machine: the one
//! launcher of `pgferry demo` (`demo/cluster.rs`) and of the integration tests
//! (`tests/support/cluster.rs`, which adds its test-only parts on top: per-test databases, version
//! packages, a reaper, fixtures).
//!
//! A cluster lives in its own private directory (mode 0700): `data/` (initdb), `server.log`, and the
//! Unix socket. It listens on 127.0.0.1 only, with SCRAM password authentication over TCP (normal
//! and replication connections) and `trust` on its own socket, whose directory only the server's OS
//! user (and root) can enter; it is configured for logical replication and for speed, not safety
//! (`fsync = off`): it is meant to be thrown away. PostgreSQL refuses to run as root, so as root
//! every server program runs as the `postgres` OS user through `runuser`, and the directory is
//! given to that user.
//!
//! The steps are separate so a caller can act between them: [`Cluster::create`] (the directory),
//! [`Cluster::initdb`], [`Cluster::configure`] (and [`Cluster::write_data_file`],
//! [`Cluster::append_conf`]), [`Cluster::start`] on a given or a free port. A cluster made with
//! [`Cluster::stop_on_drop`] is stopped and its directory removed when dropped, unless kept.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::pg::tools::BINDIR_VAR;

/// The database superuser initdb creates.
pub const SUPERUSER: &str = "postgres";
/// The OS user the server runs as when we are root.
pub const OS_USER: &str = "postgres";
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// The file (in the data directory) holding `port = N`, included by postgresql.conf.
const PORT_CONF: &str = "pgferry_port.conf";
/// How many free ports to try before giving up on starting a cluster.
const START_ATTEMPTS: usize = 5;

/// Whether `dir` has the server programs.
pub fn has_server(dir: &Path) -> bool {
    SERVER_PROGRAMS.iter().all(|p| dir.join(p).is_file())
}

/// Where the server binaries are: `$PGFERRY_PG_BINDIR` ([`BINDIR_VAR`], which also names the
/// client programs pgferry runs) when set (and only there), else
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`, else the Homebrew/Postgres.app
/// locations. The error says what to install.
pub fn find_bindir() -> Result<PathBuf> {
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
        "starting a throwaway PostgreSQL cluster needs the server programs (initdb, pg_ctl, postgres), and none were found: {why}"
    ))
    .hint(
        "install the PostgreSQL server: `apt-get install postgresql` (Debian, Ubuntu), \
         `dnf install postgresql-server` (Fedora, RHEL), `brew install postgresql@16` (macOS); \
         or point PGFERRY_PG_BINDIR at a directory holding initdb, pg_ctl and postgres",
    )
}

/// The major version `postgres --version` in `bindir` reports.
pub fn server_major(bindir: &Path) -> Result<u32> {
    let exe = bindir.join("postgres");
    let out = Command::new(&exe)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::permanent(format!("running {} --version: {e}", exe.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .last()
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| {
            Error::permanent(format!(
                "cannot read the version of {}: {text:?}",
                exe.display()
            ))
        })
}

/// Whether this process runs as root (the server then runs as [`OS_USER`]).
pub fn is_root() -> bool {
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
        .hint("run as an ordinary user, or install the server package (`apt-get install postgresql` creates that user)"));
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

/// Gives `path` to the server's OS user when we are root (the server must own its files).
pub fn give_to_server_user(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (uid, gid) = server_user_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
        Error::permanent(format!(
            "giving {} to the `{OS_USER}` user: {e}",
            path.display()
        ))
    })
}

/// One throwaway cluster (see the module documentation).
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    /// The TCP port on 127.0.0.1 (0 until started).
    pub port: u16,
    /// The root directory: `data/`, `server.log`, the socket.
    pub dir: PathBuf,
    /// The data directory (`<dir>/data`).
    pub data_dir: PathBuf,
    /// Where initdb, pg_ctl and postgres are.
    pub bindir: PathBuf,
    /// The server's major version (12, 13, ..., 18).
    pub major: u32,
    running: bool,
    stop_on_drop: bool,
}

impl Cluster {
    /// A new cluster's private directory `<base>/<prefix>-<name>-<pid>-<n>-<nanos>` (given to the
    /// server's OS user when we are root); nothing is initialized yet.
    pub fn create(bindir: &Path, base: &Path, prefix: &str, name: &str) -> Result<Cluster> {
        let major = server_major(bindir)?;
        let dir = make_dir(base, prefix, name)?;
        give_to_server_user(&dir)?;
        Ok(Cluster {
            name: name.to_string(),
            port: 0,
            data_dir: dir.join("data"),
            dir,
            bindir: bindir.to_path_buf(),
            major,
            running: false,
            stop_on_drop: false,
        })
    }

    /// Stop the server and remove the directory when this value is dropped (unless kept).
    pub fn stop_on_drop(mut self) -> Cluster {
        self.stop_on_drop = true;
        self
    }

    /// Leave it running (and its directory in place) when dropped.
    pub fn keep(&mut self) {
        self.stop_on_drop = false;
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server log (empty when there is none yet).
    pub fn server_log(&self) -> String {
        match fs::read(self.log_file()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> Vec<String> {
        let log = self.server_log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// A server program of `bindir`, run as the server's OS user when we are root, in the cluster's
    /// directory (which that user can enter), stdin closed.
    pub fn server_program(&self, program: &str) -> Command {
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

    /// initdb: superuser [`SUPERUSER`] with `password` (SCRAM over TCP, trust on the socket), UTF8,
    /// locale C.
    pub fn initdb(&self, password: &str) -> Result<()> {
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
        give_to_server_user(&pwfile)?;
        let mut cmd = self.server_program("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--locale=C", "--no-sync"]);
        if self.major >= 14 {
            // 14+ only; older initdbs refuse the option.
            cmd.arg("--no-instructions");
        }
        let out = cmd.output();
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
                    self.dir.parent().unwrap_or(&self.dir).display()
                ))
            } else {
                err
            });
        }
        Ok(())
    }

    /// Appends the settings every throwaway cluster has (loopback and the private socket, logical
    /// replication, no fsync) and `settings` (more postgresql.conf lines) under a `# added by
    /// {by}` comment, and lets password (SCRAM) connections, normal and replication, in from
    /// 127.0.0.1.
    pub fn configure(&self, by: &str, settings: &str) -> Result<()> {
        let conf = format!(
            "\n# added by {by}\n\
             include_if_exists = '{PORT_CONF}'\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = logical\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 128MB\n\
             log_min_messages = warning\n\
             {settings}",
            self.dir.display().to_string().replace('\'', "''")
        );
        self.append_conf(&conf)?;
        let hba_path = self.data_dir.join("pg_hba.conf");
        let hba = fs::read_to_string(&hba_path)
            .map_err(|e| Error::permanent(format!("reading {}: {e}", hba_path.display())))?;
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
        if missing.is_empty() {
            return Ok(());
        }
        append(&hba_path, &format!("\n# added by {by}\n{missing}"))
    }

    /// Appends `text` to postgresql.conf.
    pub fn append_conf(&self, text: &str) -> Result<()> {
        append(&self.data_dir.join("postgresql.conf"), text)
    }

    /// Writes `contents` to `name` (relative to the data directory), mode 0600, owned by the
    /// server's OS user (server keys need both).
    pub fn write_data_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        let path = self.data_dir.join(name);
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(contents))
            .map_err(|e| Error::permanent(format!("writing {}: {e}", path.display())))?;
        give_to_server_user(&path)
    }

    /// Starts the server on 127.0.0.1:`port`, or on a free port when `port` is 0 (another one when
    /// the chosen port was taken meanwhile), and waits until it accepts connections.
    pub fn start(&mut self, port: u16) -> Result<()> {
        let fixed = port != 0;
        for attempt in 1..=START_ATTEMPTS {
            self.port = if fixed { port } else { free_port()? };
            self.write_data_file(PORT_CONF, format!("port = {}\n", self.port).as_bytes())?;
            let log_before = self.server_log().len();
            match self.pg_ctl(&["start", "-w", "-t", "60"]) {
                Ok(()) => {
                    self.running = true;
                    return Ok(());
                }
                Err(e) => {
                    let log = self.server_log();
                    let new_log = log.get(log_before..).unwrap_or(&log);
                    let port_taken = new_log.contains("Address already in use")
                        || new_log.contains("could not bind")
                        || new_log.contains("could not create any TCP/IP sockets");
                    if !fixed && port_taken && attempt < START_ATTEMPTS {
                        tracing::debug!(
                            "cluster {}: port {} was taken, retrying on another port",
                            self.name,
                            self.port
                        );
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Err(Error::permanent(format!(
            "could not start the {} cluster on a free port",
            self.name
        )))
    }

    /// Runs `pg_ctl -D <data> -l <log> <args>` as the server's user. The error has pg_ctl's output
    /// and the last lines of the server log.
    pub fn pg_ctl(&self, args: &[&str]) -> Result<()> {
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
            .arg(&self.data_dir)
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
            "`pg_ctl {}` for the {} cluster (port {}) failed ({status}): {}; server log: {}",
            args.join(" "),
            self.name,
            self.port,
            output.trim(),
            self.log_tail(5).join(" | ")
        )))
    }

    /// Stops the server (fast shutdown, else immediate) and removes its directory.
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
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stop_on_drop {
            return;
        }
        if let Err(e) = self.stop() {
            eprintln!("warning: {e}");
        }
    }
}

/// A new private directory for one cluster under `base`.
fn make_dir(base: &Path, prefix: &str, name: &str) -> Result<PathBuf> {
    let label: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(20)
        .collect();
    let label = if label.is_empty() {
        "cluster".to_string()
    } else {
        label
    };
    crate::pg::tools::create_private_dir(base, &format!("{prefix}-{label}"))
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::permanent(format!("finding a free port on 127.0.0.1: {e}")))
}

fn append(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::permanent(format!("writing {}: {e}", path.display())))
}
