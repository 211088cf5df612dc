//! The PostgreSQL server versions pgferry supports, and every difference between them that pgferry
//! depends on, decided in one place.
//!
//! The version is read when a session opens (the `server_version` parameter the server reports at
//! startup, so it costs no query), and code that sends a version-dependent statement, setting,
//! catalog query or replication option asks a [`ServerVersion`] instead of testing numbers itself.

use std::fmt;

/// The oldest source or target major version pgferry supports.
pub const OLDEST_SUPPORTED_MAJOR: u32 = 12;
/// The newest major version pgferry is tested with.
pub const NEWEST_TESTED_MAJOR: u32 = 18;

/// A server's version as `server_version_num` spells it: `120022` for 12.22, `180006` for 18.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerVersion {
    num: u32,
}

impl ServerVersion {
    /// From `server_version_num` (`150018`).
    pub fn from_num(num: u32) -> ServerVersion {
        ServerVersion { num }
    }

    /// From the `server_version` text (`12.22`, `18.6 (Debian 18.6-1)`, `18beta1`, `9.6.24`).
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let word = text.split_whitespace().next()?;
        // `18beta1`, `17rc1`, `16devel`: the major version alone.
        let numeric: String = word
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = numeric.split('.').filter(|p| !p.is_empty());
        let major: u32 = parts.next()?.parse().ok()?;
        let second: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let num = if major >= 10 {
            major * 10_000 + second
        } else {
            let third: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            major * 10_000 + second * 100 + third
        };
        Some(ServerVersion { num })
    }

    /// `server_version_num`.
    pub fn num(self) -> u32 {
        self.num
    }

    /// The major version (12, 13, ..., 18; 9 for 9.x).
    pub fn major(self) -> u32 {
        self.num / 10_000
    }

    /// Whether pgferry supports this version as a source or a target at all.
    pub fn is_supported(self) -> bool {
        self.major() >= OLDEST_SUPPORTED_MAJOR
    }

    /// `client_connection_check_interval` (14+): the server notices a vanished client during a
    /// long statement instead of finishing (and committing) it. Older servers refuse the setting,
    /// and inside a transaction that refusal aborts it.
    pub fn has_client_connection_check_interval(self) -> bool {
        self.major() >= 14
    }

    /// The statement pgferry sends on every session it opens, if this version has it.
    pub fn session_setup_sql(self) -> Option<&'static str> {
        self.has_client_connection_check_interval()
            .then_some("SET client_connection_check_interval = '1s'")
    }

    /// `publish_via_partition_root` (13+): a partitioned table is published as itself and its
    /// changes carry the root's name. On 12 a partitioned table cannot be added to a publication at
    /// all: its leaf partitions are published one by one, and their changes carry the leaf's name.
    pub fn publishes_partitioned_tables(self) -> bool {
        self.major() >= 13
    }

    /// pgoutput's `messages` option (logical decoding messages in the stream): 14+.
    pub fn pgoutput_messages(self) -> bool {
        self.major() >= 14
    }

    /// pgoutput's `origin` option (16+): with `origin = 'none'` a stream leaves out the changes
    /// written by a session that had set up a replication origin. The fallback stream uses it so
    /// that nothing pgferry's forward apply wrote to the target goes back to the source.
    pub fn pgoutput_origin_filter(self) -> bool {
        self.major() >= 16
    }

    /// pgoutput's `streaming` of large in-progress transactions (protocol version 2): 14+. pgferry
    /// asks for protocol version 1 on every version (see [`ServerVersion::pgoutput_proto_version`]).
    pub fn pgoutput_streaming(self) -> bool {
        self.major() >= 14
    }

    /// The pgoutput protocol version pgferry asks for: 1, which every supported version speaks.
    /// (A transaction is decoded once it commits; streaming in-progress transactions, version 2 on
    /// 14+, is not used: the apply groups whole transactions.)
    pub fn pgoutput_proto_version(self) -> u32 {
        1
    }

    /// `pg_replication_slots.wal_status` and `safe_wal_size` (13+).
    pub fn has_slot_wal_status(self) -> bool {
        self.major() >= 13
    }

    /// The expression reading `wal_status` of the `pg_replication_slots` row aliased `alias`
    /// (a text NULL where the version has no such column).
    pub fn slot_wal_status_column(self, alias: &str) -> String {
        if self.has_slot_wal_status() {
            format!("{alias}.wal_status")
        } else {
            "NULL::text".to_string()
        }
    }

    /// Session settings that a newer pg_dump writes at the top of every script it prints and that
    /// this version (as the target) does not know, so applying the script would fail on them:
    /// `transaction_timeout` (17+).
    pub fn settings_unknown_to_target(self) -> &'static [&'static str] {
        if self.major() >= 17 {
            &[]
        } else {
            &["transaction_timeout"]
        }
    }

    /// `GRANT SET ON PARAMETER` (15+).
    pub fn has_grant_set_on_parameter(self) -> bool {
        self.major() >= 15
    }

    /// A row trigger of a partitioned table is copied to each partition as an *internal* trigger
    /// (before 13; from 13 on the copies are ordinary triggers with `tgparentid`): only a superuser
    /// may disable the copies, so cdc's managed mode drops and recreates such a trigger instead.
    pub fn partition_triggers_are_internal(self) -> bool {
        self.major() < 13
    }

    /// The predefined role `pg_read_all_data` (14+).
    pub fn has_pg_read_all_data(self) -> bool {
        self.major() >= 14
    }

    /// What works differently when this version is the source, in preflight's words: one line per
    /// limitation, empty when there is none.
    pub fn source_limitations(self) -> Vec<String> {
        let mut out = Vec::new();
        let v = self.major();
        if !self.publishes_partitioned_tables() {
            out.push(format!(
                "PostgreSQL {v} cannot publish a partitioned table: its leaf partitions are published one by one and each change is applied to the same partition on the target; a partition created or attached after provision is not published, so its rows would be missing on the target (validate reports them): create the partitions the migration needs before it starts"
            ));
        }
        if !self.has_client_connection_check_interval() {
            out.push(format!(
                "PostgreSQL {v} has no client_connection_check_interval: a statement of a killed runner runs on to its end on the source (it is never committed there, pgferry only reads)"
            ));
        }
        if !self.has_slot_wal_status() {
            out.push(format!(
                "PostgreSQL {v} reports no wal_status for replication slots: status cannot warn that the slot's WAL is about to be removed"
            ));
        }
        if !self.pgoutput_streaming() {
            out.push(format!(
                "PostgreSQL {v} cannot stream in-progress transactions (pgoutput version 2 is 14+): a large transaction reaches cdc only once it commits"
            ));
        }
        out
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.major() >= 10 {
            write!(f, "{}.{}", self.major(), self.num % 10_000)
        } else {
            write!(
                f,
                "{}.{}.{}",
                self.major(),
                (self.num / 100) % 100,
                self.num % 100
            )
        }
    }
}

/// Why a pair of servers cannot be migrated, if it cannot: the target is older than the source (its
/// catalog cannot hold what the newer source's schema may use, and pg_dump's output for the newer
/// version need not load into it), or either is older than [`OLDEST_SUPPORTED_MAJOR`].
pub fn pair_refusal(source: ServerVersion, target: ServerVersion) -> Option<String> {
    if !source.is_supported() {
        return Some(format!(
            "the source runs PostgreSQL {source}; pgferry supports sources from PostgreSQL {OLDEST_SUPPORTED_MAJOR} on (PostgreSQL {} is past its end of life and is not tested)",
            source.major()
        ));
    }
    if !target.is_supported() {
        return Some(format!(
            "the target runs PostgreSQL {target}; pgferry supports targets from PostgreSQL {OLDEST_SUPPORTED_MAJOR} on"
        ));
    }
    if target.major() < source.major() {
        return Some(format!(
            "the target runs PostgreSQL {target}, older than the source's PostgreSQL {source}: a migration goes to the same or a newer major version (the source's schema may use what {} lacks, and pg_dump does not write for older servers)",
            target.major()
        ));
    }
    None
}

/// Whether the source's planner statistics can be carried over to the target instead of being
/// gathered there with ANALYZE: pg_dump 18 dumps them (`--statistics-only`) as calls of
/// `pg_restore_relation_stats` and `pg_restore_attribute_stats`, functions the target has from 18
/// on; pgferry carries them only from a source of 18 or newer, the pairing it tests. `Err` says
/// why not. `pg_dump_num` is pg_dump's version as a `server_version_num`.
pub fn statistics_carry_over(
    source: ServerVersion,
    target: ServerVersion,
    pg_dump_num: i32,
) -> std::result::Result<(), String> {
    const FROM: u32 = 18;
    if target.major() < FROM {
        return Err(format!(
            "the target runs PostgreSQL {target}, which cannot restore statistics (pg_restore_relation_stats is new in {FROM})"
        ));
    }
    if source.major() < FROM {
        return Err(format!(
            "the source runs PostgreSQL {source}; statistics are carried over from PostgreSQL {FROM} or newer"
        ));
    }
    if pg_dump_num < (FROM * 10_000) as i32 {
        return Err(format!(
            "the pg_dump found is older than {FROM} and cannot dump statistics"
        ));
    }
    Ok(())
}

/// `script` (a pg_dump/pg_restore SQL script) without the `SET name = ...;` lines of its header
/// (before the first object) for the settings `target` does not know
/// ([`ServerVersion::settings_unknown_to_target`]).
pub fn script_for_target(script: &[u8], target: ServerVersion) -> Vec<u8> {
    let unknown = target.settings_unknown_to_target();
    if unknown.is_empty() {
        return script.to_vec();
    }
    let mut out = Vec::with_capacity(script.len());
    let mut in_header = true;
    for line in script.split_inclusive(|b| *b == b'\n') {
        if in_header && (line.starts_with(b"-- Name:") || line.starts_with(b"CREATE ")) {
            in_header = false;
        }
        let drop = in_header
            && unknown.iter().any(|name| {
                line.strip_prefix(b"SET ")
                    .and_then(|rest| rest.strip_prefix(name.as_bytes()))
                    .is_some_and(|rest| rest.starts_with(b" = ") || rest.starts_with(b" TO "))
            });
        if !drop {
            out.extend_from_slice(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_servers_report() {
        assert_eq!(ServerVersion::parse("12.22").map(|v| v.num()), Some(120022));
        assert_eq!(
            ServerVersion::parse("18.6 (Debian 18.6-1.pgdg12+1)").map(|v| v.num()),
            Some(180006)
        );
        assert_eq!(
            ServerVersion::parse("18beta1").map(|v| v.num()),
            Some(180000)
        );
        assert_eq!(ServerVersion::parse("9.6.24").map(|v| v.num()), Some(90624));
        assert_eq!(ServerVersion::parse("x"), None);
        assert_eq!(ServerVersion::from_num(120022).to_string(), "12.22");
        assert_eq!(ServerVersion::from_num(90624).to_string(), "9.6.24");
    }

    #[test]
    fn capabilities_follow_the_major_version() {
        let v = |n| ServerVersion::from_num(n);
        assert!(!v(120022).publishes_partitioned_tables());
        assert!(v(130023).publishes_partitioned_tables());
        assert_eq!(v(130023).session_setup_sql(), None);
        assert!(v(140022).session_setup_sql().is_some());
        assert!(v(120022).source_limitations().len() == 4);
        assert!(v(180006).source_limitations().is_empty());
    }

    #[test]
    fn scripts_lose_the_settings_an_older_target_lacks() {
        let script = b"SET statement_timeout = 0;\nSET transaction_timeout = 0;\nSET client_encoding = 'UTF8';\n--\n-- Name: f\nCREATE FUNCTION f() AS $$\nSET transaction_timeout = 0;\n$$;\n";
        let for16 = script_for_target(script, ServerVersion::from_num(160014));
        assert_eq!(
            String::from_utf8_lossy(&for16),
            "SET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n--\n-- Name: f\nCREATE FUNCTION f() AS $$\nSET transaction_timeout = 0;\n$$;\n"
        );
        assert_eq!(
            script_for_target(script, ServerVersion::from_num(170010)),
            script.to_vec()
        );
    }

    #[test]
    fn statistics_are_carried_over_between_18s_with_pg_dump_18() {
        let v = |n| ServerVersion::from_num(n);
        assert_eq!(statistics_carry_over(v(180001), v(180006), 180006), Ok(()));
        assert!(
            statistics_carry_over(v(170005), v(180006), 180006)
                .is_err_and(|r| r.contains("the source runs PostgreSQL 17.5"))
        );
        assert!(
            statistics_carry_over(v(180006), v(170005), 180006)
                .is_err_and(|r| r.contains("the target runs PostgreSQL 17.5"))
        );
        assert!(
            statistics_carry_over(v(180006), v(180006), 170005)
                .is_err_and(|r| r.contains("older than 18"))
        );
    }

    #[test]
    fn refuses_an_older_target() {
        let v = |n| ServerVersion::from_num(n);
        assert!(pair_refusal(v(120022), v(180006)).is_none());
        assert!(pair_refusal(v(150010), v(150002)).is_none());
        let why = pair_refusal(v(160014), v(150018)).expect("refused");
        assert!(why.contains("older than the source"), "{why}");
        assert!(pair_refusal(v(110022), v(180006)).is_some());
    }
}
