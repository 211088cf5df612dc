//! Errors: what failed, where (stage, database, table) and what to do next, with a kind that decides
//! the retry policy. Database errors are classified from their SQLSTATE.

use std::fmt;
use std::time::Duration;

/// What the executor should do with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth retrying after a pause: connection lost, server shutting down, serialization failure,
    /// deadlock, too many connections.
    Transient,
    /// Retrying will not help: fix something first.
    Permanent,
    /// The run was asked to stop (Ctrl-C, SIGTERM); the next run resumes.
    Interrupted,
    /// Validation found that the source and the target hold different data (exit code 3). Not
    /// retried: the data has to be fixed (or the migration rerun) first.
    DataDiffers,
    /// The configuration of a stage that is done (or running, or ready) changed since it ran: the
    /// run is refused before it starts anything (exit code 2), until the configuration is restored
    /// or the stage is rerun on purpose (`--rerun`).
    ConfigChanged,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// Where, outermost first: `stage `load``, `database `dvdrental``, `table `public.film``.
    pub context: Vec<String>,
    pub hint: Option<String>,
    pub sqlstate: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn permanent(message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Permanent,
            message: message.into(),
            context: Vec::new(),
            hint: None,
            sqlstate: None,
        }
    }

    pub fn transient(message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Transient,
            ..Error::permanent(message)
        }
    }

    /// Validation found differences between the source and the target.
    pub fn data_differs(message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::DataDiffers,
            ..Error::permanent(message)
        }
    }

    /// A stage that has run would run with another configuration (see [`ErrorKind::ConfigChanged`]).
    pub fn config_changed(message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::ConfigChanged,
            ..Error::permanent(message)
        }
    }

    pub fn interrupted() -> Error {
        Error {
            kind: ErrorKind::Interrupted,
            ..Error::permanent("interrupted")
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Error {
        self.hint = Some(hint.into());
        self
    }

    /// Adds an outer context (`stage `x``); contexts read outermost first.
    pub fn context(mut self, ctx: impl Into<String>) -> Error {
        self.context.insert(0, ctx.into());
        self
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// A database error, with what we were doing when it happened (`reading the catalog of ...`).
    pub fn pg(e: &tokio_postgres::Error, doing: impl fmt::Display) -> Error {
        let (message, sqlstate, hint) = match e.as_db_error() {
            Some(db) => (
                format!("{doing}: {}: {}", db.severity(), db.message()),
                Some(db.code().code().to_string()),
                db.hint().map(str::to_string),
            ),
            None => (format!("{doing}: {}", describe_client_error(e)), None, None),
        };
        let kind = match &sqlstate {
            Some(code) => classify_sqlstate(code),
            // No SQLSTATE: the connection broke or could not be made.
            None if e.is_closed() || is_io(e) => ErrorKind::Transient,
            None => ErrorKind::Permanent,
        };
        let mut err = Error {
            kind,
            message,
            context: Vec::new(),
            hint: None,
            sqlstate,
        };
        if let Some(h) = hint {
            err.hint = Some(h);
        } else if let Some(h) = err.sqlstate.as_deref().and_then(hint_for_sqlstate) {
            err.hint = Some(h.to_string());
        }
        err
    }

    /// Delay before retry `attempt` (1-based): 1 s, 2 s, 4 s ... capped at 30 s.
    pub fn backoff(attempt: u32) -> Duration {
        Duration::from_secs(1u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(30))
    }
}

fn is_io(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    let mut src = e.source();
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// The client error's text including its causes (tokio-postgres puts the useful part in the source).
fn describe_client_error(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        src = s.source();
    }
    text
}

/// Transient or permanent, from the SQLSTATE (PostgreSQL appendix A).
pub fn classify_sqlstate(code: &str) -> ErrorKind {
    match code {
        // connection exceptions
        c if c.starts_with("08") => ErrorKind::Transient,
        // admin_shutdown, crash_shutdown, cannot_connect_now, database_dropped is permanent
        "57P01" | "57P02" | "57P03" => ErrorKind::Transient,
        // serialization_failure, deadlock_detected, transaction rollback in general
        c if c.starts_with("40") => ErrorKind::Transient,
        // insufficient resources (too many connections, out of memory, disk full is 53100: permanent)
        "53000" | "53200" | "53300" | "53400" => ErrorKind::Transient,
        // lock_not_available
        "55P03" => ErrorKind::Transient,
        // idle_session_timeout
        "57P05" => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    }
}

fn hint_for_sqlstate(code: &str) -> Option<&'static str> {
    Some(match code {
        "28P01" | "28000" => {
            "check the user and password: `password` in the plan, PGPASSWORD, or ~/.pgpass"
        }
        "3D000" => "check the database name in the plan's URL or [[databases]] entry",
        "42501" => {
            "grant the migration role the privilege named above, or run as a role that has it"
        }
        "53100" => "the server is out of disk space; free some and run again",
        "55000" => {
            "the server is not configured for this; see the message for the setting to change"
        }
        _ => return None,
    })
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.context.is_empty() {
            write!(f, "{}: ", self.context.join(", "))?;
        }
        write!(f, "{}", self.message)?;
        if let Some(code) = &self.sqlstate {
            write!(f, " (SQLSTATE {code})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::permanent(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify_sqlstate("08006"), ErrorKind::Transient);
        assert_eq!(classify_sqlstate("57P01"), ErrorKind::Transient);
        assert_eq!(classify_sqlstate("40001"), ErrorKind::Transient);
        assert_eq!(classify_sqlstate("40P01"), ErrorKind::Transient);
        assert_eq!(classify_sqlstate("42P01"), ErrorKind::Permanent);
        assert_eq!(classify_sqlstate("28P01"), ErrorKind::Permanent);
    }

    #[test]
    fn renders_context_and_hint() {
        let e = Error::permanent("relation missing")
            .context("table `public.film`")
            .context("database `dvd`")
            .context("stage `load`")
            .hint("run provision first");
        assert_eq!(
            e.to_string(),
            "stage `load`, database `dvd`, table `public.film`: relation missing\n  hint: run provision first"
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(Error::backoff(1), Duration::from_secs(1));
        assert_eq!(Error::backoff(3), Duration::from_secs(4));
        assert_eq!(Error::backoff(20), Duration::from_secs(30));
    }
}
