//! Finding the PostgreSQL client programs pgferry runs as child processes: `pg_dump`, `pg_restore`
//! and `psql`, all three from one directory so that they agree on the dump format; and running them
//! ([`run_tool`]: cancellable, passwords only in their environment, in a [`PrivateTempDir`]).
//!
//! `PGFERRY_PG_BINDIR`, when set, names the directory to use and nothing else is searched.
//! Otherwise: pg_dump refuses to dump a server newer than itself, so pgferry uses the NEWEST
//! pg_dump installed:
//! it looks in `/usr/lib/postgresql/*/bin` (Debian, Ubuntu), `/usr/pgsql-*/bin` (RHEL), the
//! directory `pg_config --bindir` names, and every directory of `PATH`; asks each candidate for
//! `--version`; and keeps the highest version whose directory also has pg_restore and psql (the
//! first one found wins a tie, so a real binary is preferred over Debian's `pg_wrapper` in
//! `/usr/bin`). The search runs once per process.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::pg::version::ServerVersion;

/// The client programs of one PostgreSQL installation.
#[derive(Debug, Clone)]
pub struct PgTools {
    /// The directory holding pg_dump, pg_restore and psql.
    pub bindir: PathBuf,
    /// The version as pg_dump prints it (`15.18`).
    pub version: String,
    /// The version as a number comparable with `server_version_num` (`150018`).
    pub version_num: i32,
    /// Every pg_dump the search found, `path (version)`, for messages.
    pub found: Vec<String>,
}

impl PgTools {
    pub fn pg_dump(&self) -> PathBuf {
        self.bindir.join("pg_dump")
    }

    pub fn pg_restore(&self) -> PathBuf {
        self.bindir.join("pg_restore")
    }

    pub fn psql(&self) -> PathBuf {
        self.bindir.join("psql")
    }

    /// `pg_dump 15.18 (/usr/lib/postgresql/15/bin)`, for messages.
    pub fn describe(&self) -> String {
        format!("pg_dump {} ({})", self.version, self.bindir.display())
    }

    /// Refuses a pg_dump older than either server's major version: it cannot dump a newer source,
    /// and the SQL it writes (applied with the psql next to it) must know the target's version.
    pub fn check_can_dump(&self, source: ServerVersion, target: ServerVersion) -> Result<()> {
        let newest = source.max(target);
        if major_num(self.version_num) >= major_num(newest.num() as i32) {
            return Ok(());
        }
        let which = if source.major() >= target.major() {
            format!("the source server (PostgreSQL {source})")
        } else {
            format!("the target server (PostgreSQL {target})")
        };
        let need = newest.major();
        Err(Error::permanent(format!(
            "the newest pg_dump pgferry found is {} at {}, older than {which}; schema_dump needs a pg_dump at least as new as both servers (found: {})",
            self.version,
            self.pg_dump().display(),
            self.found.join(", ")
        ))
        .hint(format!(
            "install the PostgreSQL {need} client programs (or newer), e.g. `apt-get install postgresql-client-{need}` from the PostgreSQL apt repository, or point {BINDIR_VAR} at a directory holding pg_dump, pg_restore and psql {need}+"
        )))
    }
}

/// The environment variable that names the directory of the client programs to use, instead of
/// searching for the newest.
pub const BINDIR_VAR: &str = "PGFERRY_PG_BINDIR";

/// The major version part of a version number: `150018` -> `150000`, `90624` -> `90600`.
pub fn major_num(version_num: i32) -> i32 {
    if version_num >= 100_000 {
        version_num / 10_000 * 10_000
    } else {
        version_num / 100 * 100
    }
}

/// `15`, or `9.6` for versions before 10.
pub fn major_label(version_num: i32) -> String {
    if version_num >= 100_000 {
        (version_num / 10_000).to_string()
    } else {
        format!("{}.{}", version_num / 10_000, version_num / 100 % 100)
    }
}

/// Parses `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` (or `16devel`, `17beta1`,
/// `9.6.24`) into the printed version and a `server_version_num`-style number.
pub fn parse_version(text: &str) -> Option<(String, i32)> {
    let line = text.lines().next()?;
    // The version is the first word that starts with a digit, after the program's name.
    let word = line
        .split_whitespace()
        .skip(1)
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let numeric: String = word
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let parts: Vec<i32> = numeric
        .split('.')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let num = match parts.as_slice() {
        [major, rest @ ..] if *major >= 10 => major * 10_000 + rest.first().copied().unwrap_or(0),
        [major, minor, rest @ ..] => {
            major * 10_000 + minor * 100 + rest.first().copied().unwrap_or(0)
        }
        _ => return None,
    };
    Some((word.trim_end_matches(',').to_string(), num))
}

/// The newest installed client programs (searched once per process).
pub fn find() -> Result<&'static PgTools> {
    static TOOLS: OnceLock<std::result::Result<PgTools, Error>> = OnceLock::new();
    TOOLS.get_or_init(search).as_ref().map_err(Clone::clone)
}

/// Directories that may hold pg_dump, in order of preference for equal versions.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for (root, pattern) in [("/usr/lib/postgresql", None), ("/usr", Some("pgsql-"))] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| pattern.is_none_or(|p| e.file_name().to_string_lossy().starts_with(p)))
            .map(|e| e.path().join("bin"))
            .collect();
        found.sort();
        found.reverse();
        dirs.extend(found);
    }
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            dirs.push(PathBuf::from(dir));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path).filter(|p| p.is_absolute()));
    }
    dirs
}

fn version_of(pg_dump: &Path) -> Option<(String, i32)> {
    let out = Command::new(pg_dump)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

fn search() -> std::result::Result<PgTools, Error> {
    if let Some(dir) = std::env::var_os(BINDIR_VAR).filter(|d| !d.is_empty()) {
        return from_bindir(PathBuf::from(dir));
    }
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    let mut best: Option<(PathBuf, String, i32)> = None;
    let mut incomplete = Vec::new();
    for dir in candidate_dirs() {
        let pg_dump = dir.join("pg_dump");
        if !pg_dump.is_file() || !seen.insert(dir.clone()) {
            continue;
        }
        let Some((version, num)) = version_of(&pg_dump) else {
            continue;
        };
        found.push(format!("{} ({version})", pg_dump.display()));
        if !dir.join("pg_restore").is_file() || !dir.join("psql").is_file() {
            incomplete.push(dir.display().to_string());
            continue;
        }
        if best.as_ref().is_none_or(|(_, _, b)| num > *b) {
            best = Some((dir, version, num));
        }
    }
    match best {
        Some((bindir, version, version_num)) => {
            tracing::debug!(bindir = %bindir.display(), %version, "PostgreSQL client programs");
            Ok(PgTools {
                bindir,
                version,
                version_num,
                found,
            })
        }
        None => {
            let mut msg = String::from(
                "no usable pg_dump found (searched /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, `pg_config --bindir` and PATH)",
            );
            if !incomplete.is_empty() {
                msg.push_str(&format!(
                    "; these directories have pg_dump but not pg_restore and psql next to it: {}",
                    incomplete.join(", ")
                ));
            }
            Err(Error::permanent(msg).hint(
                "install the PostgreSQL client programs of the source server's major version or newer, e.g. `apt-get install postgresql-client-NN`",
            ))
        }
    }
}

/// The programs of the directory [`BINDIR_VAR`] names, and nothing else.
fn from_bindir(bindir: PathBuf) -> std::result::Result<PgTools, Error> {
    let pg_dump = bindir.join("pg_dump");
    let missing: Vec<&str> = ["pg_dump", "pg_restore", "psql"]
        .into_iter()
        .filter(|p| !bindir.join(p).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(Error::permanent(format!(
            "{BINDIR_VAR} is {}, which has no {}",
            bindir.display(),
            missing.join(", ")
        ))
        .hint(format!("point {BINDIR_VAR} at the bin directory of a PostgreSQL installation with its client programs, or unset it to use the newest pg_dump found")));
    }
    let Some((version, version_num)) = version_of(&pg_dump) else {
        return Err(Error::permanent(format!(
            "{} (from {BINDIR_VAR}) does not run or print its version",
            pg_dump.display()
        ))
        .hint(format!("check the installation, or unset {BINDIR_VAR}")));
    };
    tracing::debug!(bindir = %bindir.display(), %version, "PostgreSQL client programs from {BINDIR_VAR}");
    Ok(PgTools {
        found: vec![format!(
            "{} ({version}, from {BINDIR_VAR})",
            pg_dump.display()
        )],
        bindir,
        version,
        version_num,
    })
}

// ----- a private temporary directory ------------------------------------------------------------

/// Creates a new directory under `base`, mode 0700, named `{stem}-{pid}-{n}-{nanos}` so that
/// concurrent processes and calls never share one. The caller owns it (nothing removes it).
pub fn create_private_dir(base: &Path, stem: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{stem}-{}-{n}-{nanos:08x}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::permanent(format!(
                    "cannot create a directory in {}: {e}",
                    base.display()
                ))
                .hint("check that the directory (TMPDIR, or /tmp, for temporary ones) exists, is writable and has free space"));
            }
        }
    }
    Err(Error::permanent(format!(
        "cannot create a unique directory in {}",
        base.display()
    )))
}

/// A directory under the system temp dir, mode 0700, removed (with its contents) on drop.
pub struct PrivateTempDir {
    path: PathBuf,
}

impl PrivateTempDir {
    pub fn new(prefix: &str) -> Result<PrivateTempDir> {
        Ok(PrivateTempDir {
            path: create_private_dir(&std::env::temp_dir(), prefix)?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateTempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), "could not remove a temporary directory: {e}");
        }
    }
}

// ----- running a client program -----------------------------------------------------------------

/// What a finished child process left.
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs a prepared command to completion, feeding `stdin` when given (else /dev/null) and collecting
/// stdout and stderr. When `cancel` fires, the child is killed and `Interrupted` returned.
pub async fn run_tool(
    mut cmd: tokio::process::Command,
    stdin: Option<Vec<u8>>,
    cancel: &CancellationToken,
) -> Result<ToolOutput> {
    let program = Path::new(cmd.as_std().get_program())
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        Error::permanent(format!(
            "cannot start {}: {e}",
            cmd.as_std().get_program().to_string_lossy()
        ))
    })?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => Some(tokio::spawn(async move {
            // The child may exit before reading everything (psql stops at the first error).
            let _ = pipe.write_all(&data).await;
            let _ = pipe.shutdown().await;
        })),
        _ => None,
    };
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut buf).await;
        }
        buf
    });
    let err_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut buf).await;
        }
        buf
    });
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| Error::permanent(format!("waiting for {program}: {e}")))?,
        _ = cancel.cancelled() => {
            let _ = child.kill().await;
            if let Some(w) = writer {
                w.abort();
            }
            out_task.abort();
            err_task.abort();
            return Err(Error::interrupted());
        }
    };
    if let Some(w) = writer {
        let _ = w.await;
    }
    let stdout = out_task.await.unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err_task.await.unwrap_or_default()).into_owned();
    Ok(ToolOutput {
        status,
        stdout,
        stderr,
    })
}

/// The last `n` non-empty lines of a program's stderr, indented for an error message.
pub fn stderr_tail(stderr: &str, n: usize) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("    ... ({start} earlier line(s))\n"));
    }
    out.push_str(
        &lines[start..]
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    out
}

/// Whether a client program's stderr says the connection failed or broke (worth retrying), as
/// opposed to an error in what it was asked to do.
pub fn is_connection_failure(stderr: &str) -> bool {
    const SIGNS: &[&str] = &[
        "could not connect to server",
        "Connection refused",
        "server closed the connection unexpectedly",
        "terminating connection due to administrator command",
        "the database system is starting up",
        "the database system is shutting down",
        "the database system is in recovery mode",
        "remaining connection slots are reserved",
        "too many clients already",
        "could not receive data from server",
        "could not send data to server",
        "SSL SYSCALL error",
        "timeout expired",
    ];
    SIGNS.iter().any(|s| stderr.contains(s))
}

/// The error for a client program that exited unsuccessfully: what it was doing, its exit status
/// and the end of its stderr. Transient when the connection failed, permanent otherwise.
pub fn tool_failure(program: &str, out: &ToolOutput, doing: &str) -> Error {
    let message = format!(
        "{program} failed ({}) {doing}:\n{}",
        out.status,
        stderr_tail(&out.stderr, 20)
    );
    let mut e = if is_connection_failure(&out.stderr) {
        Error::transient(message)
    } else {
        Error::permanent(message)
    };
    if out.stderr.contains("password authentication failed")
        || out.stderr.contains("no password supplied")
    {
        e = e.hint("check the user and password: `password` in the plan, PGPASSWORD, or ~/.pgpass");
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(("15.18".into(), 150018))
        );
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 9.6.24"),
            Some(("9.6.24".into(), 90624))
        );
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 17beta1"),
            Some(("17beta1".into(), 170000))
        );
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 16devel"),
            Some(("16devel".into(), 160000))
        );
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn majors_compare() {
        assert_eq!(major_num(150018), 150000);
        assert_eq!(major_num(90624), 90600);
        assert!(major_num(150000) > major_num(90624));
        assert_eq!(major_label(90624), "9.6");
        assert_eq!(major_label(170002), "17");
        let tools = PgTools {
            bindir: "/x/bin".into(),
            version: "15.18".into(),
            version_num: 150018,
            found: vec!["/x/bin/pg_dump (15.18)".into()],
        };
        let v = ServerVersion::from_num;
        assert!(tools.check_can_dump(v(150002), v(150002)).is_ok());
        assert!(tools.check_can_dump(v(140010), v(150001)).is_ok());
        let e = tools.check_can_dump(v(160004), v(160004)).unwrap_err();
        assert!(
            e.message
                .contains("older than the source server (PostgreSQL 16.4)"),
            "{}",
            e.message
        );
        assert!(e.hint.unwrap().contains("postgresql-client-16"));
        let e = tools.check_can_dump(v(130023), v(180006)).unwrap_err();
        assert!(
            e.message
                .contains("older than the target server (PostgreSQL 18.6)"),
            "{}",
            e.message
        );
        assert!(e.hint.unwrap().contains("PGFERRY_PG_BINDIR"));
    }
}
