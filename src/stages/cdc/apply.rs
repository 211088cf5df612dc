//! Applying decoded pgoutput changes to one target database, on one session, in commit order.
//!
//! - The session runs with `session_replication_role = replica`, so target triggers and foreign keys
//!   do not fire (the source already enforced them). A role that may not set it (a managed
//!   service's admin) applies in the *managed* mode instead ([`managed`]): the target's user
//!   triggers are disabled and its foreign keys dropped while cdc applies, recorded, and put back by
//!   the cutover.
//! - The applied position lives in the target database, in `<state schema>.cdc_applied` (`slot`,
//!   `lsn`), and is updated in the same transaction as the changes it covers: a crash either keeps
//!   both or loses both, so a restart never applies a change twice.
//! - Every value is sent as text and cast to the target column's type
//!   (`$1::text::<format_type>`); statements are prepared once per relation and shape (which columns
//!   are set, how the row is found), and the session keeps their generic plans
//!   (`plan_cache_mode = force_generic_plan`: see [`Applier::open`]).
//! - Changes are gathered per table for the open target transaction ([`super::changeset`]) and
//!   sent as set-based statements of up to [`MAX_INSERT_ROWS`] rows: `INSERT ... SELECT ... FROM
//!   unnest($1::text[], ...)`, `UPDATE ... FROM unnest(...)` with the updates of one key merged,
//!   `DELETE ... USING unnest(...)`. They are sent at the commit, before a TRUNCATE or a catalog
//!   query, and whenever [`MAX_QUEUED_ROWS`] rows or [`MAX_QUEUED_BYTES`] are gathered (a large
//!   source transaction streams through in bounded memory). A grouped statement that fails sets
//!   [`Applier::grouped_failure`]: the caller rolls back and applies that stretch again in
//!   *strict* mode, change by change in source order, where a real error names its change.
//! - Changes that are not grouped (strict mode; REPLICA IDENTITY FULL; key changes; tables with
//!   triggers or rules that fire in replica mode, whose changes keep their place relative to every
//!   other table's) are sent one statement each (consecutive inserts of one source transaction as
//!   one multi-row INSERT).
//! - Statements are pipelined: each is sent at once and its result checked later, in order, with
//!   at most [`MAX_IN_FLIGHT`] statements and [`MAX_ROWS_IN_FLIGHT`] rows awaiting their result.
//!   Everything in flight is settled before a catalog query and a TRUNCATE. The commit is
//!   pipelined too ([`Applier::commit`]: `BEGIN`, `COMMIT` and the position's upsert are prepared
//!   once): a failed change aborts its target transaction, whose `COMMIT` then rolls back the
//!   position with it, and the next transaction begins only once that `COMMIT` has been answered,
//!   so nothing is committed past a failed change.
//! - Rows are found by the old key tuple (`K`), else by the new tuple's key columns; with REPLICA
//!   IDENTITY FULL (`O`) by every column (`=`, or `IS NULL` for NULLs, NULLs being part of the
//!   statement's shape), and exactly one matching row is changed (`(tableoid, ctid) = (SELECT ...
//!   LIMIT 1)`), so duplicates stay duplicates. A FULL table with no index on the target gets a
//!   hash index on its most distinct column before its first UPDATE or DELETE, kept while cdc
//!   applies ([`identity::lookup_index`]), so a change is not a scan of the table (and an
//!   insert-only table maintains no index).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::error::{Error, Result};
use crate::pg::connect::ConnInfo;
use crate::pg::ident::{QualifiedName, quote_ident};
use crate::pg::lsn::Lsn;
use crate::pg::pgoutput::{OldTuple, Relation, ReplicaIdentity, TupleData, TupleValue};

use super::changeset::{ChangeSet, Row, Run, TableQueue, Val, encode_key};
use super::identity;
use super::managed;

/// One target column of a replicated relation, in the Relation message's order.
struct Col {
    quoted: String,
    /// `format_type` of the target column.
    ty: String,
    key: bool,
    /// Compared as text: types without an equality operator, or whose `=` is not the equality of a
    /// btree or hash operator class (`box = box` compares areas, `path = path` point counts), which
    /// would match the wrong row of a REPLICA IDENTITY FULL table.
    text_compare: bool,
}

/// What the applier knows of one relation of the stream.
pub struct Rel {
    /// `schema.table`, for messages and counters.
    pub name: String,
    label: Arc<str>,
    quoted: String,
    partitioned: bool,
    /// Triggers or rules fire on it in replica mode (`ENABLE ALWAYS` / `ENABLE REPLICA`): its
    /// changes are applied in source order relative to every other table's.
    ordered: bool,
    cols: Vec<Col>,
    /// Changes committed at or before this source LSN are already in the copied data.
    pub copied_lsn: Option<Lsn>,
    statements: HashMap<String, Statement>,
    /// REPLICA IDENTITY FULL: the lookup index still to be made before the first change that
    /// finds a row by its values.
    lookup: Option<Lookup>,
}

/// A REPLICA IDENTITY FULL table's lookup index, not made yet (see [`Applier::lookup_index`]).
struct Lookup {
    schema: String,
    table: String,
    /// The columns a hash index may serve (`=` with a hash operator class).
    candidates: Vec<String>,
}

/// How an UPDATE or DELETE finds its row.
enum Find<'a> {
    /// By the key columns of this tuple.
    Key(&'a TupleData),
    /// By every column of this tuple (REPLICA IDENTITY FULL), one row only.
    Full(&'a TupleData),
}

/// The columns of target table `$1.$2` (schema, name), prepared once per session
/// ([`Applier::relation`]): relkind, name, `format_type`, generated (or no column at all), compared
/// as text (no hash or btree equality), `GENERATED ALWAYS` identity.
const DESCRIBE_SQL: &str = "SELECT c.relkind::text, a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                coalesce(a.attgenerated <> '', true), \
                NOT EXISTS (SELECT 1 FROM pg_catalog.pg_operator o \
                             JOIN pg_catalog.pg_amop ao ON ao.amopopr = o.oid AND ao.amopstrategy = 1 \
                             JOIN pg_catalog.pg_am am ON am.oid = ao.amopmethod AND am.amname = 'hash' \
                            WHERE o.oprname = '=' AND o.oprleft = a.atttypid AND o.oprright = a.atttypid) \
                  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_operator o \
                             JOIN pg_catalog.pg_amop ao ON ao.amopopr = o.oid AND ao.amopstrategy = 3 \
                             JOIN pg_catalog.pg_am am ON am.oid = ao.amopmethod AND am.amname = 'btree' \
                            WHERE o.oprname = '=' AND o.oprleft = a.atttypid AND o.oprright = a.atttypid), \
                coalesce(a.attidentity = 'a', false) \
           FROM pg_catalog.pg_class c \
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
           LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
          WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum";

/// Whether triggers or rules fire in replica mode on target table `$1.$2` or its partitions
/// (`to_regclass`: a missing table is reported by [`DESCRIBE_SQL`]'s empty answer).
const FIRES_SQL: &str = "WITH r AS (SELECT pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::text, $2::text)) AS oid), \
              t AS (SELECT oid FROM r WHERE oid IS NOT NULL \
                    UNION SELECT p.relid FROM r, pg_catalog.pg_partition_tree(r.oid) p) \
         SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g JOIN t ON g.tgrelid = t.oid \
                         WHERE NOT g.tgisinternal AND g.tgenabled IN ('A', 'R')) \
             OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite w JOIN t ON w.ev_class = t.oid \
                         WHERE w.rulename <> '_RETURN' AND w.ev_enabled IN ('A', 'R'))";

/// How many changes may await their result at once.
pub const MAX_IN_FLIGHT: usize = 512;

/// How many commits may be in flight at once (see [`Applier::may_commit`]).
pub const COMMITS_IN_FLIGHT: usize = 8;

/// The most rows one multi-row INSERT (or grouped UPDATE / DELETE) carries.
pub const MAX_INSERT_ROWS: usize = 1000;

/// The most rows gathered per table before they are sent (see [`super::changeset`]).
pub const MAX_QUEUED_ROWS: usize = 20_000;

/// The most bytes of values gathered before they are sent.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

/// Inserts gathered for one multi-row statement: column-major text values.
struct InsertBatch {
    oid: u32,
    commit_lsn: Lsn,
    rows: usize,
    columns: Vec<Vec<Option<String>>>,
}

/// `INSERT INTO t (...) OVERRIDING SYSTEM VALUE VALUES ($1::text::type, ...)` for one row
/// (`OVERRIDING SYSTEM VALUE`: identity columns take the source's values; a no-op for the others).
/// A table with no column the stream carries (none at all, or only generated ones) gets
/// `DEFAULT VALUES`.
fn insert_sql(rel: &Rel) -> String {
    if rel.cols.is_empty() {
        return format!("INSERT INTO {} DEFAULT VALUES", rel.quoted);
    }
    let names: Vec<&str> = rel.cols.iter().map(|c| c.quoted.as_str()).collect();
    let values: Vec<String> = rel
        .cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::text::{}", i + 1, c.ty))
        .collect();
    format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
        rel.quoted,
        names.join(", "),
        values.join(", ")
    )
}

/// `INSERT INTO t (...) OVERRIDING SYSTEM VALUE SELECT ... FROM unnest($1::text[], ...)`: one row
/// per array element. A table with no column the stream carries takes one array of as many NULLs as
/// rows (see [`insert_arrays`]).
fn multi_insert_sql(rel: &Rel) -> String {
    if rel.cols.is_empty() {
        return format!("INSERT INTO {} SELECT FROM unnest($1::text[])", rel.quoted);
    }
    let names: Vec<&str> = rel.cols.iter().map(|c| c.quoted.as_str()).collect();
    let arrays: Vec<String> = (1..=rel.cols.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let aliases: Vec<String> = (1..=rel.cols.len()).map(|i| format!("c{i}")).collect();
    let values: Vec<String> = rel
        .cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("u.c{}::{}", i + 1, c.ty))
        .collect();
    format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM unnest({}) AS u({})",
        rel.quoted,
        names.join(", "),
        values.join(", "),
        arrays.join(", "),
        aliases.join(", ")
    )
}

/// `UPDATE t SET c = u.v::type ... FROM unnest(<key arrays>, <set arrays>) u WHERE t.k = u.k::type`:
/// the rows of distinct keys, each set to its new values. Parameters: the key columns' arrays,
/// then those of the columns in `set`, in column order.
fn grouped_update_sql(rel: &Rel, set: &[bool]) -> String {
    let mut arrays = Vec::new();
    let mut aliases = Vec::new();
    let mut conds = Vec::new();
    let mut sets = Vec::new();
    for c in rel.cols.iter().filter(|c| c.key) {
        arrays.push(format!("${}::text[]", arrays.len() + 1));
        aliases.push(format!("a{}", aliases.len() + 1));
        conds.push(format!("t.{} = u.a{}::{}", c.quoted, aliases.len(), c.ty));
    }
    for (c, _) in rel.cols.iter().zip(set).filter(|(_, s)| **s) {
        arrays.push(format!("${}::text[]", arrays.len() + 1));
        aliases.push(format!("a{}", aliases.len() + 1));
        sets.push(format!("{} = u.a{}::{}", c.quoted, aliases.len(), c.ty));
    }
    format!(
        "UPDATE {} AS t SET {} FROM unnest({}) AS u({}) WHERE {}",
        rel.quoted,
        sets.join(", "),
        arrays.join(", "),
        aliases.join(", "),
        conds.join(" AND ")
    )
}

/// `DELETE FROM t USING unnest(<key arrays>) u WHERE t.k = u.k::type`.
fn grouped_delete_sql(rel: &Rel) -> String {
    let mut arrays = Vec::new();
    let mut conds = Vec::new();
    for c in rel.cols.iter().filter(|c| c.key) {
        arrays.push(format!("${}::text[]", arrays.len() + 1));
        conds.push(format!("t.{} = u.a{}::{}", c.quoted, arrays.len(), c.ty));
    }
    let aliases: Vec<String> = (1..=arrays.len()).map(|i| format!("a{i}")).collect();
    format!(
        "DELETE FROM {} AS t USING unnest({}) AS u({}) WHERE {}",
        rel.quoted,
        arrays.join(", "),
        aliases.join(", "),
        conds.join(" AND ")
    )
}

/// The parameters of a [`multi_insert_sql`] of `rows` rows: its column-major arrays, or for a table
/// with no column, one array with an element per row.
fn insert_arrays(columns: Vec<Vec<Option<String>>>, rows: usize) -> Vec<Vec<Option<String>>> {
    if columns.is_empty() {
        vec![vec![None; rows]]
    } else {
        columns
    }
}

/// Row-major rows to column-major arrays of `ncols` columns.
fn columns_of(rows: Vec<Row>, ncols: usize) -> Vec<Vec<Option<String>>> {
    let mut columns: Vec<Vec<Option<String>>> =
        (0..ncols).map(|_| Vec::with_capacity(rows.len())).collect();
    for row in rows {
        for (c, v) in columns.iter_mut().zip(row) {
            c.push(v);
        }
    }
    columns
}

/// What a change in flight is, to report its result.
struct InFlight {
    table: Arc<str>,
    /// Inserts must insert; updates and deletes that find no row are reported.
    what: &'static str,
    commit_lsn: Lsn,
    /// Rows the statement carries (memory held until its result is in).
    rows: usize,
    /// A set-based statement of grouped changes (see [`super::changeset`]).
    grouped: bool,
    /// The `COMMIT` of a target transaction that makes this applied position durable.
    commits: Option<Lsn>,
    /// A WAL probe ([`Applier::probe`]): the target's WAL flush and insert positions, filled in
    /// by its answer.
    wal: Option<(Lsn, Lsn)>,
}

/// The most rows that may await their result at once (bounds memory with multi-row inserts).
pub const MAX_ROWS_IN_FLIGHT: usize = 4096;

type Pending =
    FuturesOrdered<BoxFuture<'static, (std::result::Result<u64, tokio_postgres::Error>, InFlight)>>;

pub struct Applier {
    client: Arc<Client>,
    pending: Pending,
    inserts: Option<InsertBatch>,
    rows_in_flight: usize,
    state_schema: String,
    slot: String,
    rels: HashMap<u32, Rel>,
    /// `schema.table` -> LSN its copy is consistent with (leaf tables, from full_load).
    copied: HashMap<String, Lsn>,
    in_tx: bool,
    /// Changes gathered for set-based statements (not in strict mode).
    changes: ChangeSet,
    /// Apply change by change in source order (a stretch where grouping failed before).
    strict: bool,
    /// The highest source commit LSN in the open target transaction.
    tx_max_commit: Lsn,
    /// Set when a grouped statement failed: re-apply up to this commit LSN in strict mode.
    grouped_failed: Option<Lsn>,
    /// The managed mode ([`managed`]): what the apply holds on the target because it may not set
    /// `session_replication_role`; `None` in replica mode.
    pub held: Option<managed::Held>,
    /// `BEGIN`, the position's upsert and `COMMIT`, prepared once: a target transaction is sent
    /// without waiting for any answer (see [`Applier::commit`]).
    begin: Statement,
    position: Statement,
    /// The position's update once the slot's row exists: it fails (and so rolls its transaction
    /// back) unless the position on record has reached the one given with it, the position of a
    /// commit still in flight before it (see [`Applier::may_commit`]); `0/0` when there is none.
    update_position: Statement,
    commit: Statement,
    /// Commits (`COMMIT`s, and position writes outside a transaction) sent and not answered yet.
    commits_in_flight: usize,
    /// The position the last of them writes.
    last_sent: Lsn,
    /// The highest source commit LSN of the transaction whose `COMMIT` is in flight.
    committing_max: Lsn,
    /// The highest applied position whose target commit has been answered.
    confirmed: Lsn,
    /// The highest applied position whose target commit is flushed to the target's WAL: the only
    /// one the slot may be told (see [`Applier::probe`]).
    flushed: Lsn,
    /// `SELECT pg_current_wal_flush_lsn(), pg_current_wal_insert_lsn()`, prepared once.
    probe: Statement,
    /// [`DESCRIBE_SQL`] and [`FIRES_SQL`], prepared once: a relation the stream describes costs
    /// one round trip, not a parse and plan of two catalog queries.
    describe: Statement,
    fires: Statement,
    /// A probe is in flight, and when the last one was sent.
    probing: bool,
    probed_at: Instant,
    /// Answered positions waiting for the target's WAL to be flushed: (the target's WAL insert
    /// position a probe read after their commits, the position), oldest first.
    unflushed: VecDeque<(Lsn, Lsn)>,
    /// Since when `confirmed` has been ahead of `flushed` (see [`Applier::flush_overdue`]).
    behind_since: Option<Instant>,
    /// A statement failed: nothing committed after it counts (its transaction rolled back).
    failed: bool,
}

/// How often at most a WAL probe is sent while commits wait to be flushed.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// How long an answered commit may wait for the target's WAL writer before the apply flushes it
/// itself ([`Applier::make_durable`]), so that the slot follows within about a second even when
/// the target's `wal_writer_delay` is long or the WAL ends on a page boundary.
pub const FLUSH_WAIT: Duration = Duration::from_secs(1);

fn value_param(v: &TupleValue) -> Result<Option<&str>> {
    match v {
        TupleValue::Null => Ok(None),
        TupleValue::Text(b) => std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| Error::permanent("a replicated value is not valid UTF-8")),
        TupleValue::Binary(_) => Err(Error::permanent(
            "binary replicated values are not supported (the stream uses text)",
        )),
        TupleValue::UnchangedToast => Err(Error::permanent(
            "internal: an unchanged TOAST value cannot be written",
        )),
    }
}

fn mask(bits: impl Iterator<Item = bool>) -> String {
    bits.map(|b| if b { '1' } else { '0' }).collect()
}

/// One set-based statement of gathered changes, built before any is sent (see
/// [`Applier::send_queues`]).
struct Grouped {
    oid: u32,
    /// The key of its prepared statement in [`Rel::statements`].
    shape: String,
    kind: GroupedKind,
    /// One `text[]` per parameter.
    params: Vec<Vec<Option<String>>>,
    rows: usize,
}

enum GroupedKind {
    Insert,
    /// The columns set (the key columns never are).
    Update(Vec<bool>),
    Delete,
}

impl GroupedKind {
    fn sql(&self, rel: &Rel) -> String {
        match self {
            GroupedKind::Insert => multi_insert_sql(rel),
            GroupedKind::Update(set) => grouped_update_sql(rel, set),
            GroupedKind::Delete => grouped_delete_sql(rel),
        }
    }

    fn what(&self) -> &'static str {
        match self {
            GroupedKind::Insert => "insert",
            GroupedKind::Update(_) => "update",
            GroupedKind::Delete => "delete",
        }
    }
}

impl Applier {
    /// Opens the apply session on `conn` and reads the applied position of `slot`.
    pub async fn open(
        conn: &ConnInfo,
        state_schema: &str,
        slot: &str,
        copied: HashMap<String, Lsn>,
        allow_managed: bool,
    ) -> Result<(Applier, Option<Lsn>)> {
        let client = conn.connect("cdc apply").await?;
        // Replica mode when the role may set it (set here, in one round trip); else the managed
        // mode holds the target's triggers and foreign keys instead (below, once the state schema
        // exists), where allowed.
        let replica = managed::set_replication_role(&client).await?;
        if !replica && !allow_managed {
            return Err(Error::permanent(
                "the apply role may not set session_replication_role = replica on this database",
            )
            .hint("this stream applies with target triggers and foreign keys quiet, which needs a superuser (or, on PostgreSQL 15+, a role granted SET on session_replication_role); the managed mode, which holds them instead, is for the forward cdc only"));
        }
        // Generic plans for the prepared statements: a grouped statement's `unnest` of parameter
        // arrays is estimated at 10 rows in a generic plan and at its real length in a custom one,
        // so the planner's cost comparison kept choosing a fresh custom plan for every execution
        // (a Pagila DELETE ... USING unnest: 34 us planning against 8 us executing, per call). The
        // generic plan finds rows by key, as the apply wants at any batch size. Since 12.
        // Commits are asynchronous, like native's apply worker (the subscription's default): the
        // slot is told only positions whose commit the target has flushed ([`Applier::probe`]),
        // so a target that crashes and loses its last commits has them streamed again.
        // The settings and the state tables are sent together (pipelined), each answer checked.
        let schema = quote_ident(state_schema);
        let position_table = format!("{schema}.cdc_applied");
        let tables_sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; \
             CREATE TABLE IF NOT EXISTS {position_table} (slot text PRIMARY KEY, lsn pg_lsn NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()); \
             {}; {}",
            identity::create_sql(state_schema),
            super::ddl::create_sql(state_schema)
        );
        let (settings, tables) = tokio::join!(
            client.batch_execute(
                "SET plan_cache_mode = force_generic_plan; SET synchronous_commit = off"
            ),
            client.batch_execute(&tables_sql),
        );
        settings.map_err(|e| {
            Error::pg(
                &e,
                "setting plan_cache_mode and synchronous_commit on the target",
            )
        })?;
        tables.map_err(|e| Error::pg(&e, format!("creating {position_table} on the target")))?;
        let held = if replica {
            None
        } else {
            Some(managed::hold(&client, state_schema).await?)
        };
        let prepare = |sql: String, types: &'static [Type]| {
            let client = &client;
            async move {
                client
                    .prepare_typed(&sql, types)
                    .await
                    .map_err(|e| Error::pg(&e, format!("preparing `{sql}` on the target")))
            }
        };
        // The position and the session's statements, pipelined: one round trip.
        let read_position = async {
            client
                .query_opt(
                    &format!("SELECT lsn::text FROM {position_table} WHERE slot = $1"),
                    &[&slot],
                )
                .await
                .map_err(|e| Error::pg(&e, "reading the applied position"))
        };
        let (row, begin, probe, commit, position, update_position, describe, fires) = tokio::try_join!(
            read_position,
            prepare("BEGIN".into(), &[]),
            // Both functions exist on every supported version (10+).
            prepare(
                "SELECT pg_catalog.pg_current_wal_flush_lsn()::text, pg_catalog.pg_current_wal_insert_lsn()::text".into(),
                &[],
            ),
            prepare("COMMIT".into(), &[]),
            prepare(
                format!(
                    "INSERT INTO {t} (slot, lsn) VALUES ($1, $2::text::pg_lsn) \
                     ON CONFLICT (slot) DO UPDATE SET lsn = GREATEST({t}.lsn, excluded.lsn), applied_at = now()",
                    t = position_table
                ),
                &[Type::TEXT, Type::TEXT],
            ),
            // `lsn` is NOT NULL: a transaction sent behind an unanswered one fails here when that
            // one did not commit (its changes, rolled back, must come before this one's).
            prepare(
                format!(
                    "UPDATE {t} SET lsn = CASE WHEN lsn >= $3::text::pg_lsn THEN GREATEST(lsn, $2::text::pg_lsn) END, \
                     applied_at = now() WHERE slot = $1",
                    t = position_table
                ),
                &[Type::TEXT, Type::TEXT, Type::TEXT],
            ),
            prepare(DESCRIBE_SQL.into(), &[Type::TEXT, Type::TEXT]),
            prepare(FIRES_SQL.into(), &[Type::TEXT, Type::TEXT]),
        )?;
        let applied = crate::pg::lsn::parse_opt(row.map(|r| r.get(0)))?;
        let mut ap = Applier {
            client: Arc::new(client),
            pending: FuturesOrdered::new(),
            inserts: None,
            rows_in_flight: 0,
            state_schema: state_schema.to_string(),
            slot: slot.to_string(),
            rels: HashMap::new(),
            copied,
            in_tx: false,
            changes: ChangeSet::default(),
            strict: false,
            tx_max_commit: Lsn::INVALID,
            grouped_failed: None,
            held,
            begin,
            position,
            commit,
            update_position,
            commits_in_flight: 0,
            last_sent: applied.unwrap_or(Lsn::INVALID),
            committing_max: Lsn::INVALID,
            confirmed: applied.unwrap_or(Lsn::INVALID),
            // What the target has on record survived whatever came before this session.
            flushed: applied.unwrap_or(Lsn::INVALID),
            probe,
            describe,
            fires,
            probing: false,
            probed_at: Instant::now(),
            unflushed: VecDeque::new(),
            behind_since: None,
            failed: false,
        };
        // The position on record may come from an asynchronous commit of an earlier session that
        // the target has not flushed yet: made durable before the slot is told it.
        if let Some(at) = applied {
            ap.sync_position(at).await?;
        }
        Ok((ap, applied))
    }

    /// Tags every transaction this session commits with the replication origin `name` (created
    /// when missing), so that a stream of the same database with `origin = 'none'` (PostgreSQL
    /// 16+, the fallback stream of [`crate::stages::fallback`]) leaves them out. The origin
    /// functions are for superusers unless EXECUTE on them was granted: the caller decides what a
    /// refusal means.
    pub async fn use_origin(&mut self, name: &str) -> Result<()> {
        self.client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_create($1) \
                  WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1)",
                &[&name],
            )
            .await
            .map_err(|e| Error::pg(&e, format!("creating replication origin {name}")))?;
        self.client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                &[&name],
            )
            .await
            .map_err(|e| Error::pg(&e, format!("setting up replication origin {name}")))?;
        Ok(())
    }

    pub fn rel(&self, oid: u32) -> Result<&Rel> {
        self.rels.get(&oid).ok_or_else(|| {
            Error::permanent(format!(
                "a change refers to relation {oid}, which the stream has not described"
            ))
        })
    }

    /// Learns (or re-learns) a relation from its Relation message and checks it against the target
    /// table: the source's columns must be the target's non-generated columns.
    pub async fn relation(&mut self, r: &Relation) -> Result<()> {
        // A relation described again (a replayed DDL changed it) has its gathered changes sent in
        // the old shape first; a new one leaves the other tables' gathered changes alone (they
        // are sent together at the commit, their new statements prepared together). The catalog
        // queries below wait for their answers: nothing may be in flight.
        if self.rels.contains_key(&r.oid) {
            self.settle().await?;
        } else {
            // The inserts of the ungrouped path (strict mode, ordered tables) still go first.
            self.flush_inserts().await?;
            self.settle_in_flight().await?;
        }
        let name = format!("{}.{}", r.namespace, r.name);
        // The columns, and whether triggers or rules fire in replica mode, in one round trip
        // (`to_regclass`: a missing table is reported by the first query, below).
        let (rows, ordered) = tokio::try_join!(
            async {
                self.client
                    .query(&self.describe, &[&r.namespace, &r.name])
                    .await
                    .map_err(|e| {
                        Error::pg(&e, format!("reading the columns of target table {name}"))
                    })
            },
            async {
                self.client
                    .query_one(&self.fires, &[&r.namespace, &r.name])
                    .await
                    .map(|row| row.get::<_, bool>(0))
                    .map_err(|e| {
                        Error::pg(&e, format!("reading the triggers of target table {name}"))
                    })
            },
        )?;
        if rows.is_empty() {
            return Err(Error::permanent(format!(
                "table `{name}` is replicated from the source but does not exist in the target database"
            ))
            .hint("create it on the target (same columns), then run the plan again: cdc resumes where it stopped"));
        }
        let partitioned = rows[0].get::<_, String>(0) == "p";
        let mut target: HashMap<String, (String, bool)> = HashMap::new();
        let mut target_order = Vec::new();
        for row in &rows {
            // Generated columns, and the one row of a table with no column (no attribute joined).
            let generated: bool = row.get(3);
            if generated {
                continue;
            }
            let col: String = row.get(1);
            target_order.push(col.clone());
            target.insert(col, (row.get(2), row.get(4)));
        }
        let source: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
        let missing: Vec<&str> = source
            .iter()
            .copied()
            .filter(|c| !target.contains_key(*c))
            .collect();
        let extra: Vec<&str> = target_order
            .iter()
            .map(String::as_str)
            .filter(|c| !source.contains(c))
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            let mut diff = Vec::new();
            if !missing.is_empty() {
                diff.push(format!(
                    "the source has column(s) {} that the target lacks",
                    missing.join(", ")
                ));
            }
            if !extra.is_empty() {
                diff.push(format!(
                    "the target has column(s) {} that the source no longer sends",
                    extra.join(", ")
                ));
            }
            return Err(Error::permanent(format!(
                "the schema of table `{name}` changed on the source: {}",
                diff.join("; ")
            ))
            .hint(format!(
                "apply the same change to `{name}` on the target (ALTER TABLE ...), then run the plan again: cdc resumes from its applied position"
            )));
        }
        let cols = r
            .columns
            .iter()
            .map(|c| {
                let (ty, no_eq) = target[c.name.as_str()].clone();
                Col {
                    quoted: quote_ident(&c.name),
                    ty,
                    key: c.is_key(),
                    text_compare: no_eq,
                }
            })
            .collect();
        // GENERATED ALWAYS identity columns take the source's values on UPDATE too (see
        // [`identity`]); in the open target transaction when there is one, so a rollback forgets
        // the change and its record together.
        let always: Vec<String> = rows
            .iter()
            .filter(|row| !row.get::<_, bool>(3) && row.get::<_, bool>(5))
            .map(|row| row.get(1))
            .collect();
        if !always.is_empty() {
            let own_tx = self.begin_own().await?;
            identity::relax(
                &self.client,
                &self.state_schema,
                &r.namespace,
                &r.name,
                &always,
            )
            .await?;
            self.commit_own(own_tx, "the identity columns' change")
                .await?;
            tracing::info!(table = %name, columns = ?always, "cdc: identity columns are GENERATED BY DEFAULT on the target until the cutover");
        }
        // REPLICA IDENTITY FULL: rows are found by their values. A target table without any index
        // would be scanned once per change; before its first UPDATE or DELETE, cdc gives it a hash
        // index on one column ([`Applier::lookup_index`]).
        let lookup = matches!(r.replica_identity, ReplicaIdentity::Full).then(|| Lookup {
            schema: r.namespace.clone(),
            table: r.name.clone(),
            candidates: rows
                .iter()
                .filter(|row| !row.get::<_, bool>(3) && !row.get::<_, bool>(4))
                .map(|row| row.get(1))
                .collect(),
        });
        let copied_lsn = self.copied_lsn(&name, &r.namespace, &r.name).await?;
        self.rels.insert(
            r.oid,
            Rel {
                label: Arc::from(name.as_str()),
                name,
                quoted: QualifiedName::new(r.namespace.clone(), r.name.clone()).quoted(),
                partitioned,
                ordered,
                cols,
                copied_lsn,
                statements: HashMap::new(),
                lookup,
            },
        );
        Ok(())
    }

    /// For a statement outside the stream's changes (identity columns, lookup index): opens a
    /// target transaction of its own when none is open; whether it did, for
    /// [`Applier::commit_own`].
    async fn begin_own(&mut self) -> Result<bool> {
        let own = !self.in_tx;
        if own {
            self.begin_if_needed().await?;
        }
        Ok(own)
    }

    /// Commits the transaction [`Applier::begin_own`] opened, if it opened one (`what` names the
    /// change in an error).
    async fn commit_own(&mut self, own: bool, what: &str) -> Result<()> {
        if own {
            self.client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| Error::pg(&e, format!("committing {what}")))?;
            self.in_tx = false;
        }
        Ok(())
    }

    /// Before the first change of a REPLICA IDENTITY FULL table that finds its row by its values:
    /// when the target table has no index, a hash index on one column ([`identity::lookup_index`]),
    /// in the open target transaction (or one of its own). Once per relation and run; an
    /// insert-only table never gets one, and its inserts do not maintain it.
    async fn lookup_index(&mut self, oid: u32) -> Result<()> {
        let Some(l) = self.rels.get_mut(&oid).and_then(|r| r.lookup.take()) else {
            return Ok(());
        };
        self.settle().await?;
        let own_tx = self.begin_own().await?;
        let made = identity::lookup_index(
            &self.client,
            &self.state_schema,
            &l.schema,
            &l.table,
            &l.candidates,
        )
        .await?;
        self.commit_own(own_tx, "the lookup index").await?;
        if let Some(made) = made {
            tracing::info!(table = %format!("{}.{}", l.schema, l.table), index = %made.name, column = %made.column, chosen = made.chosen_by.describe(), "cdc: REPLICA IDENTITY FULL table without an index on the target: lookup index created until the cutover");
        }
        Ok(())
    }

    /// The LSN a relation's data was copied at. A leaf table: its own. A partitioned table (the
    /// root, with `publish_via_partition_root`): the highest LSN of its leaves, so a change is
    /// skipped only when every leaf was copied after it. `None`: not copied by the load (nothing is
    /// skipped).
    async fn copied_lsn(&mut self, name: &str, schema: &str, table: &str) -> Result<Option<Lsn>> {
        if let Some(l) = self.copied.get(name) {
            return Ok(Some(*l));
        }
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text || '.' || c.relname::text \
                   FROM pg_catalog.pg_partition_tree(pg_catalog.format('%I.%I', $1::text, $2::text)::regclass) p \
                   JOIN pg_catalog.pg_class c ON c.oid = p.relid \
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                  WHERE p.isleaf",
                &[&schema, &table],
            )
            .await
            .map_err(|e| Error::pg(&e, format!("listing the partitions of {name}")))?;
        Ok(rows
            .iter()
            .filter_map(|r| self.copied.get(&r.get::<_, String>(0)).copied())
            .max())
    }

    /// Opens a target transaction when none is open. Its `BEGIN` is pipelined (sent, answered
    /// later); a `COMMIT` still in flight is answered first, so that nothing of a new transaction
    /// is sent before the previous one is known to have committed (after a failed statement the
    /// `COMMIT` rolls back, and the next transaction must not commit behind it). For the
    /// statements outside the stream's changes (identity columns, lookup index, TRUNCATE).
    async fn begin_if_needed(&mut self) -> Result<()> {
        if !self.in_tx && self.commits_in_flight > 0 {
            self.settle_in_flight().await?;
        }
        self.begin_pipelined().await
    }

    /// [`Applier::begin_if_needed`] for the stream's changes: the new transaction may be sent
    /// behind `COMMIT`s still in flight, as its position update is guarded (see
    /// [`Applier::may_commit`]); behind [`COMMITS_IN_FLIGHT`] of them, or without a guard, they
    /// are answered first.
    async fn begin_pipelined(&mut self) -> Result<()> {
        if !self.in_tx {
            if self.commits_in_flight > 0 && !self.can_guard() {
                self.settle_in_flight().await?;
            }
            let stmt = self.begin.clone();
            self.pipeline(stmt, "begin", None);
            self.poll_ready()?;
            self.in_tx = true;
        }
        Ok(())
    }

    /// Queues a statement without parameters (`BEGIN`, `COMMIT`) behind the changes in flight.
    fn pipeline(&mut self, stmt: Statement, what: &'static str, commits: Option<Lsn>) {
        let client = self.client.clone();
        let info = InFlight {
            table: Arc::from(what),
            what,
            commit_lsn: commits.unwrap_or(Lsn::INVALID),
            rows: 0,
            grouped: false,
            commits,
            wal: None,
        };
        self.pending
            .push_back(async move { (client.execute(&stmt, &[]).await, info) }.boxed());
        self.sent(commits);
    }

    /// A statement was queued; `commits`: it commits that position, and is in flight until
    /// [`Applier::check`] takes its answer (which counts it out).
    fn sent(&mut self, commits: Option<Lsn>) {
        if let Some(lsn) = commits {
            self.commits_in_flight += 1;
            self.last_sent = self.last_sent.max(lsn);
        }
    }

    /// Sends what is queued and checks the answers already in, without waiting.
    pub fn poll_ready(&mut self) -> Result<()> {
        while let Some(Some(r)) = self.pending.next().now_or_never() {
            self.check(r)?;
        }
        Ok(())
    }

    /// The highest applied position whose target transaction is known to have committed (the
    /// answers in so far; see [`Applier::poll_ready`]).
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Waits for the next answer of the target and checks it (cancellation-safe).
    pub async fn next_answer(&mut self) -> Result<()> {
        match self.pending.next().await {
            Some(r) => self.check(r),
            None => Ok(()),
        }
    }

    /// Nothing sent awaits its answer.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether to commit the open batch of `changes` changes now: when the target has answered
    /// everything sent, or when the batch is at least as large as what the target still works
    /// on (and fewer than [`COMMITS_IN_FLIGHT`] commits are in flight). The second rule makes a
    /// stretch of WAL that arrives at once commit in batches that double (1, 1, 2, 4, ... source
    /// transactions), each sent behind the last without waiting for its answer: the applied
    /// position climbs through the stretch instead of jumping once at its end, and the target
    /// goes from one commit to the next without a round trip between them. In a backlog the
    /// batches still grow to what arrives while the target works.
    ///
    /// A transaction sent behind a commit in flight has a guarded position update: it fails
    /// unless the position on record has reached the one the commit before it writes, so when
    /// that one rolled back (a failed statement) this one rolls back too, and every one behind
    /// it: nothing commits out of order.
    pub fn may_commit(&self, changes: usize) -> bool {
        self.idle() || (self.can_guard() && changes >= self.rows_in_flight)
    }

    /// A transaction can be sent behind the commits in flight (see [`Applier::may_commit`]):
    /// not in source order mode (a stretch being re-applied goes one answered commit at a time),
    /// and the position table has this slot's row for the guarded update to find.
    fn can_guard(&self) -> bool {
        !self.strict && self.row_known() && self.commits_in_flight < COMMITS_IN_FLIGHT
    }

    /// The target has a row for this slot in its position table: a position is confirmed only
    /// once it was read there at open or a write of it (in an answered commit, or synchronous)
    /// succeeded. What a guarded position update needs.
    fn row_known(&self) -> bool {
        self.confirmed != Lsn::INVALID
    }

    pub fn in_tx(&self) -> bool {
        self.in_tx
    }

    /// For a replayed DDL statement ([`super::ddl`]): everything gathered before it is sent and
    /// settled, a target transaction is open, and the session is returned to run it on.
    pub async fn before_ddl(&mut self) -> Result<Arc<Client>> {
        self.settle().await?;
        self.begin_if_needed().await?;
        Ok(self.client.clone())
    }

    /// The apply session, outside any transaction (a statement that cannot run in one).
    pub fn session(&self) -> Arc<Client> {
        debug_assert!(!self.in_tx);
        self.client.clone()
    }

    /// After a replayed DDL statement: the statements prepared for the old shapes are forgotten
    /// (pgoutput describes a changed relation again before its next change).
    pub fn forget_prepared(&mut self) {
        for rel in self.rels.values_mut() {
            rel.statements.clear();
        }
    }

    /// The target's `<state schema>` (unquoted) and the slot this applier records positions for.
    pub fn state_schema(&self) -> &str {
        &self.state_schema
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Makes the changes applied so far durable together with the position `lsn`: sends what is
    /// gathered, the position and `COMMIT`, without waiting for their answers. The commit counts
    /// once answered ([`Applier::confirmed`], after [`Applier::poll_ready`] or
    /// [`Applier::settle`]); a statement that failed before it is reported then, and its
    /// transaction (position included) is rolled back: exactly once either way.
    pub async fn commit(&mut self, lsn: Lsn) -> Result<()> {
        self.flush_inserts().await?;
        self.send_changes().await?;
        self.begin_pipelined().await?;
        // Behind a commit in flight only with a guard that can tell whether it committed: the
        // position must move past the one on record.
        if self.commits_in_flight > 0 && (!self.can_guard() || lsn <= self.last_sent) {
            self.settle_in_flight().await?;
        }
        let after = (self.commits_in_flight > 0).then_some(self.last_sent);
        if let Some(after) = after {
            tracing::debug!(position = %lsn, %after, "cdc apply: transaction sent behind a commit in flight");
        }
        self.queue_position(lsn, None, after);
        let stmt = self.commit.clone();
        self.pipeline(stmt, "commit", Some(lsn));
        self.in_tx = false;
        self.committing_max = self.tx_max_commit;
        self.tx_max_commit = Lsn::INVALID;
        self.probe_if_due();
        self.poll_ready()
    }

    /// Records `lsn` as applied outside a batch (nothing pending: the stream is idle there) and
    /// waits for the target's answer: [`Applier::advance_idle_pipelined`] after everything in
    /// flight, then settled (a stop or a hold at an exact position).
    pub async fn advance_idle(&mut self, lsn: Lsn) -> Result<()> {
        debug_assert!(!self.in_tx);
        self.settle().await?;
        self.advance_idle_pipelined(lsn)?;
        self.settle_in_flight().await
    }

    /// Records `lsn` as applied outside a batch without waiting: the position write is sent
    /// behind nothing (the applier is idle) and counts once answered, like a commit. For the
    /// steady stream's idle keepalives: a synchronous round trip there held back the next stretch
    /// of the stream.
    pub fn advance_idle_pipelined(&mut self, lsn: Lsn) -> Result<()> {
        debug_assert!(!self.in_tx && self.idle());
        // Outside a transaction the write commits by itself: it is answered as a commit.
        self.queue_position(lsn, Some(lsn), None);
        self.probe_if_due();
        self.poll_ready()
    }

    /// Queues the position write of `lsn` behind what is in flight; `commits` when it is a commit
    /// of its own (outside a target transaction); `after`: the position of a commit still in
    /// flight before it, which must be on record for this write to succeed (see
    /// [`Applier::may_commit`]). Once the slot's row is known to exist it is the prepared UPDATE
    /// (a third of the upsert's cost on the target); before, the upsert that creates it.
    fn queue_position(&mut self, lsn: Lsn, commits: Option<Lsn>, after: Option<Lsn>) {
        let client = self.client.clone();
        let info = InFlight {
            table: Arc::from("position"),
            what: "position",
            commit_lsn: lsn,
            rows: 0,
            grouped: false,
            commits,
            wal: None,
        };
        let (slot, at) = (self.slot.clone(), lsn.to_string());
        if self.row_known() {
            let stmt = self.update_position.clone();
            let after = after.unwrap_or(Lsn::INVALID).to_string();
            self.pending.push_back(
                async move { (client.execute(&stmt, &[&slot, &at, &after]).await, info) }.boxed(),
            );
        } else {
            debug_assert!(after.is_none());
            let stmt = self.position.clone();
            self.pending.push_back(
                async move { (client.execute(&stmt, &[&slot, &at]).await, info) }.boxed(),
            );
        }
        self.sent(commits);
    }

    /// The highest applied position whose target commit is flushed to the target's WAL (what a
    /// crash of the target keeps): the only one the slot may be told.
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// A commit of `lsn` was answered.
    fn answered(&mut self, lsn: Lsn) {
        self.confirmed = self.confirmed.max(lsn);
        if self.confirmed > self.flushed && self.behind_since.is_none() {
            self.behind_since = Some(Instant::now());
        }
    }

    /// Positions up to `lsn` are flushed on the target.
    fn flushed_to(&mut self, lsn: Lsn) {
        self.flushed = self.flushed.max(lsn.min(self.confirmed));
        if self.flushed >= self.confirmed {
            self.behind_since = None;
        }
    }

    /// Sends a WAL probe (pipelined, outside a target transaction) when commits wait to be
    /// flushed and none was sent in the last [`PROBE_EVERY`]. Its answer ([`Applier::check`])
    /// holds the target's WAL insert position, which is past the end of every commit answered
    /// before it (they are ahead of it on this session), and its flush position: a position is
    /// flushed once a probe's flush position reaches the insert position read after its commit.
    /// This is how native's apply worker decides what it reports (the end of each local commit
    /// against the flush position), with the probe standing in for the commit's end, which a
    /// client is not told.
    pub fn probe_if_due(&mut self) {
        let waiting = self.commits_in_flight > 0 || self.confirmed > self.flushed;
        if self.in_tx || self.probing || !waiting || self.probed_at.elapsed() < PROBE_EVERY {
            return;
        }
        self.probing = true;
        self.probed_at = Instant::now();
        let client = self.client.clone();
        let stmt = self.probe.clone();
        let info = InFlight {
            table: Arc::from("probe"),
            what: "probe",
            commit_lsn: Lsn::INVALID,
            rows: 0,
            grouped: false,
            commits: None,
            wal: None,
        };
        self.pending.push_back(
            async move {
                let mut info = info;
                match client.query_one(&stmt, &[]).await {
                    Ok(row) => {
                        let lsn = |i: usize| {
                            row.get::<_, Option<String>>(i)
                                .and_then(|v| v.parse::<Lsn>().ok())
                                .unwrap_or(Lsn::INVALID)
                        };
                        info.wal = Some((lsn(0), lsn(1)));
                        (Ok(1), info)
                    }
                    Err(e) => (Err(e), info),
                }
            }
            .boxed(),
        );
    }

    /// Commits waited longer than [`FLUSH_WAIT`] for the target to flush them.
    pub fn flush_overdue(&self) -> bool {
        self.behind_since.is_some_and(|t| t.elapsed() >= FLUSH_WAIT)
    }

    /// Makes every answered commit durable now: everything in flight is settled, then the position
    /// is written again in a transaction committed with `synchronous_commit = on`, which flushes
    /// the target's WAL up to its own commit and so past every earlier one. For the end of a drain
    /// (the cutover hands the target over), a validation hold, a stop, and an idle stream whose
    /// commits the target's WAL writer has not flushed within [`FLUSH_WAIT`].
    /// Nothing happens inside an open target transaction (an unfinished source transaction): its
    /// commit would carry changes without their position.
    pub async fn make_durable(&mut self) -> Result<()> {
        if self.in_tx {
            return Ok(());
        }
        self.settle().await?;
        if self.confirmed > self.flushed {
            let at = self.confirmed;
            self.sync_position(at).await?;
        }
        Ok(())
    }

    /// Writes the position `lsn` (never lowering it) in a synchronously committed transaction:
    /// on return, the target's WAL is flushed past every commit made before.
    async fn sync_position(&mut self, lsn: Lsn) -> Result<()> {
        // The prepared upsert every commit sends, in a transaction of its own that commits
        // synchronously (`SET LOCAL`: the session keeps `synchronous_commit = off`).
        // Pipelined: one round trip. The three are sent at the join's first poll, so the COMMIT
        // ends the transaction whatever failed before it (a failed write aborts it, and the
        // COMMIT then rolls it back).
        let lsn_text = lsn.to_string();
        let params: [&(dyn ToSql + Sync); 2] = [&self.slot, &lsn_text];
        let written = tokio::try_join!(
            self.client
                .batch_execute("BEGIN; SET LOCAL synchronous_commit = on"),
            self.client.execute(&self.position, &params),
            self.client.batch_execute("COMMIT"),
        );
        if let Err(e) = written {
            return Err(Error::pg(&e, "flushing the applied position on the target"));
        }
        self.confirmed = self.confirmed.max(lsn);
        self.flushed_to(self.confirmed);
        self.unflushed.clear();
        Ok(())
    }

    /// Checks the result of a change that was in flight.
    fn check(
        &mut self,
        result: (std::result::Result<u64, tokio_postgres::Error>, InFlight),
    ) -> Result<()> {
        let (r, f) = result;
        self.rows_in_flight -= f.rows;
        if r.is_err() {
            self.failed = true;
        }
        if f.commits.is_some() {
            self.commits_in_flight = self.commits_in_flight.saturating_sub(1);
        }
        if f.what == "position" && matches!(r, Ok(0)) {
            // The UPDATE found no row: the state schema's position row was removed under the run.
            self.failed = true;
            return Err(Error::permanent(format!(
                "the applied position of slot {} is missing from {}.cdc_applied on the target",
                self.slot, self.state_schema
            ))
            .hint("the state schema was changed while cdc ran (leave it to pgferry during a migration): a new cdc session would start again from the load's position, so run the migration again from its load"));
        }
        if let Some(lsn) = f.commits {
            return match r {
                Ok(_) if !self.failed => {
                    self.answered(lsn);
                    Ok(())
                }
                // The transaction was rolled back by the error already reported.
                Ok(_) => Ok(()),
                Err(e) => Err(Error::pg(&e, "committing applied changes")
                    .context(format!("source transactions up to {lsn}"))),
            };
        }
        if f.what == "probe" {
            self.probing = false;
            let (flush, insert) = match (r, f.wal) {
                (Ok(_), Some(w)) => w,
                (Err(e), _) => return Err(Error::pg(&e, "reading the target's WAL positions")),
                (Ok(_), None) => return Ok(()),
            };
            // Every commit answered so far was ahead of the probe on this session.
            if self.confirmed > self.flushed
                && self
                    .unflushed
                    .back()
                    .is_none_or(|(_, p)| *p < self.confirmed)
            {
                self.unflushed.push_back((insert, self.confirmed));
            }
            while let Some((at, pos)) = self.unflushed.front().copied()
                && at <= flush
            {
                self.unflushed.pop_front();
                self.flushed_to(pos);
            }
            return Ok(());
        }
        if matches!(f.what, "begin" | "position") {
            return r
                .map(|_| ())
                .map_err(|e| Error::pg(&e, format!("applying changes ({})", f.what)));
        }
        match r {
            Ok(n) if f.what != "insert" && n < f.rows as u64 => {
                if f.grouped {
                    tracing::warn!(table = %f.table, "{} of {} replicated {}s found no row on the target", f.rows as u64 - n, f.rows, f.what);
                } else {
                    tracing::warn!(table = %f.table, lsn = %f.commit_lsn, "the row of a replicated {} is missing on the target", f.what);
                }
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) if f.grouped => {
                let err = Error::pg(
                    &e,
                    format!("applying {} grouped {}s to {}", f.rows, f.what, f.table),
                );
                // A lost session or a serialization failure is retried as it is; anything else
                // is re-applied in source order, where the failing change is named precisely.
                if !err.is_transient() {
                    self.grouped_failed = Some(self.tx_max_commit.max(self.committing_max));
                }
                Err(err)
            }
            Err(e) => Err(
                Error::pg(&e, format!("applying an {} to {}", f.what, f.table))
                    .context(format!("source transaction committed at {}", f.commit_lsn)),
            ),
        }
    }

    /// When a grouped statement failed: the commit LSN up to which the stream must be applied
    /// again change by change.
    pub fn grouped_failure(&self) -> Option<Lsn> {
        self.grouped_failed
    }

    /// A source transaction begins; `strict`: apply it change by change, in source order.
    pub async fn begin_source_tx(&mut self, commit_lsn: Lsn, strict: bool) -> Result<()> {
        if strict && !self.strict {
            self.send_changes().await?;
        }
        self.strict = strict;
        self.tx_max_commit = self.tx_max_commit.max(commit_lsn);
        Ok(())
    }

    /// Sends every gathered change (the statements' results are checked later).
    async fn send_changes(&mut self) -> Result<()> {
        let queues = self.changes.take();
        self.send_queues(queues).await
    }

    /// Sends the gathered changes of one table.
    async fn send_table(&mut self, oid: u32) -> Result<()> {
        let queue = self.changes.take_table(oid);
        self.send_queues(queue).await
    }

    /// Sends gathered changes as set-based statements, in order. The shapes not prepared yet are
    /// prepared first, all at once: the first batch of a stream (a statement per table and kind)
    /// waits for one round trip instead of one per shape, each behind the execution of the
    /// statement before it.
    async fn send_queues(&mut self, queues: impl IntoIterator<Item = TableQueue>) -> Result<()> {
        let mut statements = Vec::new();
        for q in queues {
            self.grouped_statements(q, &mut statements)?;
        }
        if statements.is_empty() {
            return Ok(());
        }
        self.prepare_grouped(&statements).await?;
        let lsn = self.tx_max_commit;
        for g in statements {
            let kind = g.kind;
            let what = kind.what();
            self.send(
                g.oid,
                g.shape,
                move |rel| kind.sql(rel),
                Type::TEXT_ARRAY,
                g.params,
                g.rows,
                what,
                lsn,
                true,
            )
            .await?;
        }
        Ok(())
    }

    /// Prepares the shapes of `statements` this session has not prepared yet, together.
    async fn prepare_grouped(&mut self, statements: &[Grouped]) -> Result<()> {
        let mut missing: Vec<(u32, String, String, Vec<Type>)> = Vec::new();
        for g in statements {
            let rel = self.rel(g.oid)?;
            if rel.statements.contains_key(&g.shape)
                || missing
                    .iter()
                    .any(|(o, s, ..)| *o == g.oid && *s == g.shape)
            {
                continue;
            }
            let types = vec![Type::TEXT_ARRAY; g.params.len()];
            missing.push((g.oid, g.shape.clone(), g.kind.sql(rel), types));
        }
        if missing.is_empty() {
            return Ok(());
        }
        self.begin_pipelined().await?;
        self.prepare_shapes(missing).await
    }

    /// Prepares statement shapes, `(relation, shape, SQL, parameter types)`, and keeps them with
    /// their relations: all in one pipelined round trip, after what is in flight is settled (a
    /// prepare waits for its answer, and the answers of the statements before it are read only
    /// by polling theirs).
    async fn prepare_shapes(
        &mut self,
        shapes: Vec<(u32, String, String, Vec<Type>)>,
    ) -> Result<()> {
        self.settle_in_flight().await?;
        let client = self.client.clone();
        let together = shapes.len();
        let prepared =
            futures_util::future::try_join_all(shapes.iter().map(|(_, _, sql, types)| {
                let client = &client;
                async move {
                    tracing::debug!(%sql, together, "cdc apply: preparing");
                    client
                        .prepare_typed(sql, types)
                        .await
                        .map_err(|e| Error::pg(&e, format!("preparing `{sql}`")))
                }
            }))
            .await?;
        for ((oid, shape, ..), stmt) in shapes.into_iter().zip(prepared) {
            if let Some(rel) = self.rels.get_mut(&oid) {
                rel.statements.insert(shape, stmt);
            }
        }
        Ok(())
    }

    /// One table's runs, in order, as set-based statements of at most [`MAX_INSERT_ROWS`] rows,
    /// appended to `out`.
    fn grouped_statements(&self, q: TableQueue, out: &mut Vec<Grouped>) -> Result<()> {
        let oid = q.oid;
        let rel = self.rel(oid)?;
        for run in q.runs {
            match run {
                Run::Insert(run) => {
                    let mut rows = run.rows.into_iter().peekable();
                    while rows.peek().is_some() {
                        let chunk: Vec<Row> = rows.by_ref().take(MAX_INSERT_ROWS).collect();
                        let n = chunk.len();
                        out.push(Grouped {
                            oid,
                            shape: "M".into(),
                            kind: GroupedKind::Insert,
                            params: insert_arrays(columns_of(chunk, rel.cols.len()), n),
                            rows: n,
                        });
                    }
                }
                Run::Update(run) => {
                    // One statement shape per set of changed columns.
                    let keys: Vec<bool> = rel.cols.iter().map(|c| c.key).collect();
                    let mut shapes: Vec<(Vec<bool>, Vec<Vec<Val>>)> = Vec::new();
                    for row in run.rows {
                        let set: Vec<bool> = row
                            .iter()
                            .zip(&keys)
                            .map(|(v, k)| !k && *v != Val::Unset)
                            .collect();
                        if !set.iter().any(|b| *b) {
                            continue;
                        }
                        match shapes.iter_mut().find(|(s, _)| *s == set) {
                            Some((_, rows)) => rows.push(row),
                            None => shapes.push((set, vec![row])),
                        }
                    }
                    for (set, rows) in shapes {
                        let mut rows = rows.into_iter().peekable();
                        while rows.peek().is_some() {
                            let chunk: Vec<Vec<Val>> =
                                rows.by_ref().take(MAX_INSERT_ROWS).collect();
                            let n = chunk.len();
                            // Key columns first, then the changed ones, each as one text[].
                            let mut columns: Vec<Vec<Option<String>>> = Vec::new();
                            for wanted in [true, false] {
                                for (i, k) in keys.iter().enumerate() {
                                    if (wanted && *k) || (!wanted && set[i]) {
                                        columns.push(
                                            chunk
                                                .iter()
                                                .map(|r| match &r[i] {
                                                    Val::Text(t) => Some(t.clone()),
                                                    Val::Null | Val::Unset => None,
                                                })
                                                .collect(),
                                        );
                                    }
                                }
                            }
                            out.push(Grouped {
                                oid,
                                shape: format!("G{}", mask(set.iter().copied())),
                                kind: GroupedKind::Update(set.clone()),
                                params: columns,
                                rows: n,
                            });
                        }
                    }
                }
                Run::Delete(run) => {
                    let nkeys = run.keys.first().map_or(0, Vec::len);
                    let mut keys = run.keys.into_iter().peekable();
                    while keys.peek().is_some() {
                        let chunk: Vec<Row> = keys.by_ref().take(MAX_INSERT_ROWS).collect();
                        let n = chunk.len();
                        out.push(Grouped {
                            oid,
                            shape: "X".into(),
                            kind: GroupedKind::Delete,
                            params: columns_of(chunk, nkeys),
                            rows: n,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends the inserts gathered for one multi-row statement (see [`Applier::insert`]).
    async fn flush_inserts(&mut self) -> Result<()> {
        let Some(batch) = self.inserts.take() else {
            return Ok(());
        };
        let n = batch.rows;
        if n == 1 {
            let params: Vec<Option<String>> = batch
                .columns
                .into_iter()
                .map(|c| c.into_iter().next().flatten())
                .collect();
            return self
                .send(
                    batch.oid,
                    "I".into(),
                    insert_sql,
                    Type::TEXT,
                    params,
                    1,
                    "insert",
                    batch.commit_lsn,
                    false,
                )
                .await;
        }
        self.send(
            batch.oid,
            "M".into(),
            multi_insert_sql,
            Type::TEXT_ARRAY,
            insert_arrays(batch.columns, n),
            n,
            "insert",
            batch.commit_lsn,
            false,
        )
        .await
    }

    /// Waits for every change in flight and checks their results, in order.
    pub async fn settle(&mut self) -> Result<()> {
        self.flush_inserts().await?;
        self.send_changes().await?;
        self.settle_in_flight().await
    }

    /// Waits for the statements already sent and checks their results, in order.
    async fn settle_in_flight(&mut self) -> Result<()> {
        let mut first: Option<Error> = None;
        while let Some(r) = self.pending.next().await {
            if let Err(e) = self.check(r)
                && first.is_none()
            {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Sends one change; its result is checked later (see [`Applier::settle`]).
    async fn run(
        &mut self,
        oid: u32,
        shape: String,
        build: impl FnOnce(&Rel) -> String,
        params: &[Option<&str>],
        what: &'static str,
        commit_lsn: Lsn,
    ) -> Result<()> {
        self.flush_inserts().await?;
        let owned: Vec<Option<String>> = params.iter().map(|p| p.map(str::to_string)).collect();
        self.send(
            oid,
            shape,
            build,
            Type::TEXT,
            owned,
            1,
            what,
            commit_lsn,
            false,
        )
        .await
    }

    /// Sends a statement of relation `oid` (prepared once per `shape`, every parameter of type
    /// `ty`); its result is checked later.
    #[allow(clippy::too_many_arguments)]
    async fn send<P: ToSql + Sync + Send + 'static>(
        &mut self,
        oid: u32,
        shape: String,
        build: impl FnOnce(&Rel) -> String,
        ty: Type,
        owned: Vec<P>,
        rows: usize,
        what: &'static str,
        commit_lsn: Lsn,
        grouped: bool,
    ) -> Result<()> {
        self.begin_pipelined().await?;
        let rel = self.rel(oid)?;
        if !rel.statements.contains_key(&shape) {
            let sql = build(rel);
            let types = vec![ty; owned.len()];
            self.prepare_shapes(vec![(oid, shape.clone(), sql, types)])
                .await?;
        }
        let rel = self.rel(oid)?;
        let stmt = rel.statements.get(&shape).cloned().ok_or_else(|| {
            Error::permanent(format!(
                "internal: statement {shape} of {} was not prepared",
                rel.name
            ))
        })?;
        let client = self.client.clone();
        let info = InFlight {
            table: rel.label.clone(),
            what,
            commit_lsn,
            rows,
            grouped,
            commits: None,
            wal: None,
        };
        self.rows_in_flight += rows;
        let fut = async move {
            let refs: Vec<&(dyn ToSql + Sync)> =
                owned.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            (client.execute(&stmt, &refs).await, info)
        }
        .boxed();
        self.pending.push_back(fut);
        // Poll everything queued (the new change is sent now, in order) and take the results
        // that are in; wait for the oldest when too many are in flight.
        while let Some(Some(r)) = self.pending.next().now_or_never() {
            self.check(r)?;
        }
        while self.pending.len() >= MAX_IN_FLIGHT || self.rows_in_flight >= MAX_ROWS_IN_FLIGHT {
            match self.pending.next().await {
                Some(r) => self.check(r)?,
                None => break,
            }
        }
        Ok(())
    }

    /// Inserts a row. Consecutive inserts into one table (of one source transaction) are gathered
    /// and sent as one multi-row `INSERT ... SELECT ... FROM unnest(...)`, up to
    /// [`MAX_INSERT_ROWS`] rows; any other change sends them first, so the order holds.
    pub async fn insert(&mut self, oid: u32, new: &TupleData, commit_lsn: Lsn) -> Result<()> {
        let params = new
            .values
            .iter()
            .map(value_param)
            .collect::<Result<Vec<_>>>()?;
        let ncols = self.rel(oid)?.cols.len();
        if params.len() != ncols {
            return Err(Error::permanent(format!(
                "an insert into {} has {} values for {ncols} columns",
                self.rel(oid)?.name,
                params.len()
            )));
        }
        if !self.strict {
            if !self.rel(oid)?.ordered {
                self.flush_inserts().await?;
                let key = Self::key_of(self.rel(oid)?, new).map(|(k, _)| k);
                let row: Row = params.into_iter().map(|v| v.map(str::to_string)).collect();
                let n = self.changes.insert(oid, key, row);
                return self.bound(oid, n).await;
            }
            self.send_changes().await?;
        }
        let same = self
            .inserts
            .as_ref()
            .is_some_and(|b| b.oid == oid && b.commit_lsn == commit_lsn);
        if !same {
            self.flush_inserts().await?;
            self.inserts = Some(InsertBatch {
                oid,
                commit_lsn,
                rows: 0,
                columns: vec![Vec::new(); ncols],
            });
        }
        if let Some(b) = self.inserts.as_mut() {
            for (c, v) in b.columns.iter_mut().zip(params) {
                c.push(v.map(str::to_string));
            }
            b.rows += 1;
            if b.rows >= MAX_INSERT_ROWS {
                self.flush_inserts().await?;
            }
        }
        Ok(())
    }

    fn find<'a>(old: Option<&'a OldTuple>, new: &'a TupleData) -> Find<'a> {
        match old {
            Some(OldTuple::Full(t)) => Find::Full(t),
            Some(OldTuple::Key(t)) => Find::Key(t),
            None => Find::Key(new),
        }
    }

    /// The WHERE clause for `find`, numbering parameters from `first`; pushes the values.
    fn where_clause<'a>(
        rel: &Rel,
        find: &Find<'a>,
        first: usize,
        params: &mut Vec<Option<&'a str>>,
        shape: &mut String,
    ) -> Result<String> {
        let mut n = first;
        let mut conds = Vec::new();
        match find {
            Find::Key(t) => {
                shape.push('K');
                for (i, c) in rel.cols.iter().enumerate() {
                    if !c.key {
                        continue;
                    }
                    params.push(value_param(&t.values[i])?);
                    conds.push(format!("{} = ${n}::text::{}", c.quoted, c.ty));
                    n += 1;
                }
                if conds.is_empty() {
                    return Err(Error::permanent(format!(
                        "table `{}` has no replica identity key to find rows by",
                        rel.name
                    )));
                }
                Ok(conds.join(" AND "))
            }
            Find::Full(t) => {
                shape.push('F');
                let used: Vec<bool> = t
                    .values
                    .iter()
                    .map(|v| !matches!(v, TupleValue::UnchangedToast))
                    .collect();
                shape.push_str(&mask(used.iter().copied()));
                // NULLs are part of the shape: `c IS NULL` for them and `c = $n` for the others
                // (what IS NOT DISTINCT FROM means, in a form an index can serve).
                let nulls: Vec<bool> = t
                    .values
                    .iter()
                    .map(|v| matches!(v, TupleValue::Null))
                    .collect();
                shape.push('/');
                shape.push_str(&mask(nulls.iter().copied()));
                for (i, c) in rel.cols.iter().enumerate() {
                    if !used[i] {
                        continue;
                    }
                    if nulls[i] {
                        conds.push(format!("{} IS NULL", c.quoted));
                        continue;
                    }
                    params.push(value_param(&t.values[i])?);
                    if c.text_compare {
                        conds.push(format!("{}::text = ${n}::text::{}::text", c.quoted, c.ty));
                    } else {
                        conds.push(format!("{} = ${n}::text::{}", c.quoted, c.ty));
                    }
                    n += 1;
                }
                Ok(format!(
                    "(tableoid, ctid) = (SELECT tableoid, ctid FROM {} WHERE {} LIMIT 1)",
                    rel.quoted,
                    if conds.is_empty() {
                        "true".to_string()
                    } else {
                        conds.join(" AND ")
                    }
                ))
            }
        }
    }

    /// After gathering a change of `oid` whose table's last run now has `run_rows` rows: a run
    /// that fills a statement is sent at once (the target works while the stream is read; an
    /// update run loses only the merging of later updates of the same keys, which go to a new
    /// run), and everything is sent once [`MAX_QUEUED_ROWS`] rows or [`MAX_QUEUED_BYTES`] are
    /// held.
    async fn bound(&mut self, oid: u32, run_rows: usize) -> Result<()> {
        if run_rows >= MAX_INSERT_ROWS {
            self.send_table(oid).await?;
        }
        if self.changes.rows() >= MAX_QUEUED_ROWS || self.changes.bytes() >= MAX_QUEUED_BYTES {
            self.send_changes().await?;
        }
        Ok(())
    }

    /// Before a change that is applied on its own: what was gathered of its table is sent first
    /// (or everything, when the table's triggers may look at other tables).
    async fn before_single(&mut self, oid: u32) -> Result<()> {
        if self.strict {
            return Ok(());
        }
        if self.rel(oid)?.ordered {
            self.send_changes().await
        } else {
            self.send_table(oid).await
        }
    }

    /// The key of a row found by its replica identity key, when every key column has a value.
    fn key_of(rel: &Rel, t: &TupleData) -> Option<(String, Row)> {
        if !rel.cols.iter().any(|c| c.key) || t.values.len() != rel.cols.len() {
            return None;
        }
        let mut values = Vec::new();
        for (c, v) in rel.cols.iter().zip(&t.values) {
            if !c.key {
                continue;
            }
            match v {
                TupleValue::Text(b) => values.push(Some(std::str::from_utf8(b).ok()?.to_string())),
                _ => return None,
            }
        }
        Some((encode_key(values.iter().map(|v| v.as_deref())), values))
    }

    pub async fn update(
        &mut self,
        oid: u32,
        old: Option<&OldTuple>,
        new: &TupleData,
        commit_lsn: Lsn,
    ) -> Result<()> {
        // An update that keeps the key (no old tuple) of a table without replica-mode triggers
        // is gathered; the others go on their own, in order.
        if !self.strict && old.is_none() {
            let rel = self.rel(oid)?;
            if !rel.ordered
                && let Some((key, _)) = Self::key_of(rel, new)
            {
                let mut row = Vec::with_capacity(new.values.len());
                for v in &new.values {
                    row.push(match v {
                        TupleValue::UnchangedToast => Val::Unset,
                        other => match value_param(other)? {
                            Some(t) => Val::Text(t.to_string()),
                            None => Val::Null,
                        },
                    });
                }
                self.flush_inserts().await?;
                let n = self.changes.update(oid, key, row);
                return self.bound(oid, n).await;
            }
        }
        if let Some(OldTuple::Full(_)) = old {
            self.lookup_index(oid).await?;
        }
        self.before_single(oid).await?;
        let find = Self::find(old, new);
        let rel = self.rel(oid)?;
        let set: Vec<bool> = new
            .values
            .iter()
            .map(|v| !matches!(v, TupleValue::UnchangedToast))
            .collect();
        let mut shape = format!("U{}", mask(set.iter().copied()));
        let mut params = Vec::new();
        let mut sets = Vec::new();
        for (i, c) in rel.cols.iter().enumerate() {
            if set[i] {
                params.push(value_param(&new.values[i])?);
                sets.push(format!("{} = ${}::text::{}", c.quoted, params.len(), c.ty));
            }
        }
        if sets.is_empty() {
            return Ok(());
        }
        let cond = Self::where_clause(rel, &find, params.len() + 1, &mut params, &mut shape)?;
        let sql = format!("UPDATE {} SET {} WHERE {cond}", rel.quoted, sets.join(", "));
        self.run(oid, shape, move |_| sql, &params, "update", commit_lsn)
            .await
    }

    pub async fn delete(&mut self, oid: u32, old: &OldTuple, commit_lsn: Lsn) -> Result<()> {
        if !self.strict
            && let OldTuple::Key(t) = old
        {
            let rel = self.rel(oid)?;
            if !rel.ordered
                && let Some((key, values)) = Self::key_of(rel, t)
            {
                self.flush_inserts().await?;
                let n = self.changes.delete(oid, key, values);
                return self.bound(oid, n).await;
            }
        }
        if let OldTuple::Full(_) = old {
            self.lookup_index(oid).await?;
        }
        self.before_single(oid).await?;
        let find = match old {
            OldTuple::Full(t) => Find::Full(t),
            OldTuple::Key(t) => Find::Key(t),
        };
        let rel = self.rel(oid)?;
        let mut shape = "D".to_string();
        let mut params = Vec::new();
        let cond = Self::where_clause(rel, &find, 1, &mut params, &mut shape)?;
        let sql = format!("DELETE FROM {} WHERE {cond}", rel.quoted);
        self.run(oid, shape, move |_| sql, &params, "delete", commit_lsn)
            .await
    }

    pub async fn truncate(&mut self, oids: &[u32], cascade: bool, restart: bool) -> Result<()> {
        if oids.is_empty() {
            return Ok(());
        }
        self.settle().await?;
        let mut names = Vec::new();
        for oid in oids {
            let rel = self.rel(*oid)?;
            // ONLY: the source sends every truncated table itself; a partitioned table has no
            // rows of its own and refuses ONLY.
            names.push(if rel.partitioned {
                rel.quoted.clone()
            } else {
                format!("ONLY {}", rel.quoted)
            });
        }
        let sql = format!(
            "TRUNCATE {}{}{}",
            names.join(", "),
            if restart { " RESTART IDENTITY" } else { "" },
            if cascade { " CASCADE" } else { "" }
        );
        self.begin_if_needed().await?;
        self.client
            .batch_execute(&sql)
            .await
            .map_err(|e| Error::pg(&e, format!("applying `{sql}`")))?;
        Ok(())
    }
}
