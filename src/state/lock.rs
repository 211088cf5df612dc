//! The runner lock as every store offers it: one runner per migration, held for as long as the
//! [`RunnerLock`] guard lives, and [`LockHolder`], who holds it (named in the refusal of a second
//! runner and shown by `status`). How a store holds it is its own: `postgres/lock.rs` takes a
//! session advisory lock on a dedicated connection; `memory.rs` a flag in the process.

/// Who holds a migration's runner lock.
#[derive(Debug, Clone)]
pub struct LockHolder {
    pub host: Option<String>,
    pub pid: Option<i32>,
    pub since: Option<String>,
    pub backend_pid: i32,
    pub application: String,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.host, self.pid) {
            (Some(h), Some(p)) => write!(f, "pgferry on host {h}, pid {p}")?,
            _ => write!(f, "session `{}`", self.application)?,
        }
        if let Some(s) = &self.since {
            write!(f, ", since {s}")?;
        }
        write!(f, " (server backend pid {})", self.backend_pid)
    }
}

/// The runner lock: held for as long as this value lives (what holds it is the store's: a
/// dedicated session for the PostgreSQL store, which a killed runner loses with its connection).
pub struct RunnerLock {
    _held: Box<dyn std::any::Any + Send + Sync>,
}

impl RunnerLock {
    /// A lock held for as long as `held` lives (dropping it releases the lock).
    pub fn new(held: impl std::any::Any + Send + Sync) -> RunnerLock {
        RunnerLock {
            _held: Box::new(held),
        }
    }
}

/// This machine's name, as recorded with runs, locks and requests.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}
