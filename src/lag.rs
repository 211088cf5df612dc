//! The one definition of cdc lag, used by `status`, `status --watch`, `report`, the cutover and
//! cdc's progress log alike:
//!
//! - **in seconds**: the age of the oldest source commit cdc has received and not yet applied (0
//!   when everything received is applied). This is what the cutover's `max_lag` bounds and what
//!   Azure DMS calls latency. cdc keeps the commit time of that transaction in the gauge
//!   [`OLDEST_UNAPPLIED_GAUGE`]; readers compute its age at the moment they read it, so a stalled
//!   apply shows a lag that grows.
//! - **in bytes**: the source's WAL insert position minus cdc's applied position.
//!
//! Both are shown by [`Lag`]'s `Display` in the same words everywhere: `2.3s (1.2 MB) behind`.

use std::fmt;

use crate::pg::lsn::Lsn;
use crate::plan::units::human_bytes;

/// The per-database gauge (a store counter) holding the commit time, in milliseconds since the
/// Unix epoch, of the oldest source transaction cdc has received and not yet applied; 0 when
/// there is none.
pub const OLDEST_UNAPPLIED_GAUGE: &str = "cdcOldestUnappliedCommitMs";

/// cdc's lag behind the source: either part may be unknown (the source unreachable, cdc not
/// started).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Lag {
    pub seconds: Option<f64>,
    pub bytes: Option<i64>,
}

impl Lag {
    /// The lag from the gauge and the two positions, as of `now_ms` (Unix epoch milliseconds).
    pub fn new(
        oldest_unapplied_ms: Option<i64>,
        now_ms: i64,
        source: Option<Lsn>,
        applied: Option<Lsn>,
    ) -> Lag {
        Lag {
            seconds: oldest_unapplied_ms.map(|t| seconds(t, now_ms)),
            bytes: match (source, applied) {
                (Some(s), Some(a)) => Some(bytes(s, a)),
                _ => None,
            },
        }
    }
}

/// Lag in seconds: the age at `now_ms` of the oldest unapplied commit at `oldest_unapplied_ms`
/// (0: none).
pub fn seconds(oldest_unapplied_ms: i64, now_ms: i64) -> f64 {
    if oldest_unapplied_ms <= 0 {
        return 0.0;
    }
    (now_ms.saturating_sub(oldest_unapplied_ms)).max(0) as f64 / 1000.0
}

/// Lag in bytes: source WAL insert position minus applied position (never negative).
pub fn bytes(source: Lsn, applied: Lsn) -> i64 {
    i64::try_from(source.0.saturating_sub(applied.0)).unwrap_or(i64::MAX)
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl fmt::Display for Lag {
    /// `2.3s (1.2 MB) behind`, with `?` for a part not known.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self
            .seconds
            .map_or_else(|| "?".to_string(), |s| format!("{s:.1}s"));
        let bytes = self
            .bytes
            .map_or_else(|| "?".to_string(), |b| human_bytes(b.max(0) as u64));
        write!(f, "{secs} ({bytes}) behind")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_definition() {
        assert_eq!(seconds(0, 5_000), 0.0, "nothing unapplied");
        assert_eq!(seconds(1_000, 3_500), 2.5);
        assert_eq!(seconds(4_000, 3_000), 0.0, "a clock behind the source's");
        assert_eq!(bytes(Lsn(100), Lsn(40)), 60);
        assert_eq!(bytes(Lsn(40), Lsn(100)), 0);
        let lag = Lag::new(Some(1_000), 3_500, Some(Lsn(3 << 20)), Some(Lsn(1 << 20)));
        assert_eq!(lag.to_string(), "2.5s (2.0 MB) behind");
        assert_eq!(Lag::default().to_string(), "? (?) behind");
    }
}
