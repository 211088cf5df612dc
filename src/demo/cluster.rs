//! The demo's two throwaway clusters, started with the library's launcher ([`crate::pg::cluster`]):
//! each in its own directory under the temporary directory (`$TMPDIR`, else `/tmp`), reached over
//! 127.0.0.1 with a random SCRAM password (never printed) or over its private socket (trust).
//! Dropping a [`Cluster`] stops the server and removes its directory, unless it was kept.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

pub use crate::pg::cluster::{Cluster, SUPERUSER, find_bindir};

use crate::error::{Error, Result};

/// A random password for a throwaway cluster (hex from the OS's random source).
pub fn random_password() -> Result<String> {
    let mut bytes = [0u8; 18];
    let mut f = File::open("/dev/urandom")
        .map_err(|e| Error::permanent(format!("reading /dev/urandom: {e}")))?;
    std::io::Read::read_exact(&mut f, &mut bytes)
        .map_err(|e| Error::permanent(format!("reading /dev/urandom: {e}")))?;
    Ok(hex::encode(bytes))
}

/// initdb, configure and start on 127.0.0.1:`port` (0: a free port). Blocking.
pub fn start(bindir: &Path, name: &str, port: u16, password: &str) -> Result<Cluster> {
    let mut cluster =
        Cluster::create(bindir, &std::env::temp_dir(), "pgferry-demo", name)?.stop_on_drop();
    cluster.initdb(password)?;
    cluster.configure(
        "`pgferry demo`",
        "max_replication_slots = 16\n\
         max_wal_senders = 16\n\
         max_connections = 100\n\
         max_wal_size = 2GB\n",
    )?;
    cluster.start(port).map_err(|e| {
        e.hint(if port != 0 {
            format!("is port {port} free? choose other ports with --port-base")
        } else {
            format!("the server log is {}", cluster.log_file().display())
        })
    })?;
    Ok(cluster)
}

/// How a person connects to a demo cluster (over the trusted Unix socket: no password needed).
pub fn psql_command(cluster: &Cluster, db: &str) -> String {
    format!(
        "psql -h {} -p {} -U {SUPERUSER} {db}",
        shell_quote(&cluster.dir.display().to_string()),
        cluster.port
    )
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
        let s = scope.spawn(|| start(bindir, "source", sp, password));
        let t = scope.spawn(|| start(bindir, "target", tp, password));
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
