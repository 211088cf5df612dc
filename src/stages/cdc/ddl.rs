//! Schema changes made on the source during cdc (`ddl = "replicate"`): the statements the capture
//! ([`crate::pg::event_trigger`]) writes into the stream as transactional messages are replayed on
//! the target at their place, in the same target transaction as the changes around them.
//!
//! - A message is decided once per client query string (its `key`; a string of several statements
//!   fires the event trigger once per statement): [`decide`] ignores what only touches tables
//!   outside the selection, refuses what cannot be replayed safely, and otherwise gives the text to
//!   run (the string's statements without its `SET`/`RESET`s, whose effect on `search_path` is
//!   captured as such).
//! - Replay: under the captured `search_path` and, when the target has it, the role that ran the
//!   statement on the source (`SET LOCAL ROLE`), so new objects get the same owner. Each statement
//!   is recorded in `<state schema>.cdc_ddl` on the target (slot, message LSN, commit LSN, tag,
//!   statement, status `applied` / `ignored` / `deferred` / `skipped`), in the same transaction.
//!   The prepared statements of the apply are forgotten; pgoutput describes every relation whose
//!   shape changed again (a Relation message) before its next change, and the apply re-reads the
//!   target's columns from it.
//! - A source transaction holding DDL ends its target transaction at its commit: a value added to
//!   an enum cannot be used in the transaction that added it, and later changes must see the
//!   committed schema.
//! - `CREATE INDEX CONCURRENTLY` / `DROP INDEX CONCURRENTLY` cannot run in a transaction: recorded
//!   `deferred` in the target transaction, run right after it commits, then recorded `applied`; a
//!   deferred statement left by a crash runs when cdc starts again.
//! - Refused, or failing on the target: cdc stops with the statement, its LSN, the reason, and the
//!   commands that resolve it: fix the target so the statement can run, or apply the equivalent
//!   change by hand and mark the statement `skipped` in `cdc_ddl` (an `INSERT` the message spells
//!   out); then `pgferry run` resumes with that source transaction.
//! - Every replayed, ignored or deferred statement is also listed in the cdc stage's detail
//!   ([`DETAIL_KEY`]), for `status` and `report`.

use serde::Deserialize;

use super::apply::Applier;
use super::{DbStream, Loop};
use crate::error::{Error, Result};
use crate::pg::event_trigger::MESSAGE_PREFIX;
use crate::pg::ident::{quote_ident, quote_literal};
use crate::pg::lsn::Lsn;
use crate::pg::names::name_stem;
use crate::pg::pgoutput::LogicalMessage;
use crate::plan::{Plan, StageOptions};
use crate::select::Selection;

/// Whether the plan's cdc stage replicates DDL for database `db` (`ddl = "replicate"`).
pub fn replicates(plan: &Plan, db: usize) -> bool {
    plan.stages
        .iter()
        .filter(|s| s.kind == crate::plan::StageKind::Cdc)
        .any(|s| matches!(s.options.get(db), Some(StageOptions::Cdc(o)) if o.replicates_ddl()))
}

/// The record of replayed DDL in a target database.
pub fn record_table(state_schema: &str) -> String {
    format!("{}.cdc_ddl", quote_ident(state_schema))
}

pub fn create_sql(state_schema: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (slot text NOT NULL, lsn pg_lsn NOT NULL, commit_lsn pg_lsn NOT NULL, \
         tag text NOT NULL, statement text NOT NULL, status text NOT NULL, search_path text, role text, \
         recorded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (slot, lsn));",
        record_table(state_schema)
    )
}

/// Where the cdc stage's detail lists the DDL of each database: `{"ddl": {"<db>": [{"lsn",
/// "commit_lsn", "tag", "statement", "status"}, ...]}}` (for `status` and `report`).
pub const DETAIL_KEY: &str = "ddl";

static DETAIL_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One captured statement, as the event trigger wrote it.
#[derive(Debug, Clone, Deserialize)]
pub struct Captured {
    /// The migration (its name stem) whose capture wrote it.
    pub m: String,
    pub event: String,
    pub tag: String,
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub search_path: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    pub key: String,
    #[serde(default)]
    pub objects: Vec<Object>,
    #[serde(default)]
    pub published: Vec<Vec<String>>,
    /// New keyless tables the capture gave `REPLICA IDENTITY FULL` (to be undone by cleanup).
    #[serde(default)]
    pub identity_full: Vec<Vec<String>>,
    /// Tables an `ALTER TABLE` left matching the selection but not published (renamed or moved
    /// into it).
    #[serde(default)]
    pub unpublished: Vec<Vec<String>>,
    /// The columns, by number, of the tables an `ALTER TABLE` touched, as they were right after
    /// it (absent from captures installed by pgferry 0.1 before this field).
    #[serde(default)]
    pub columns: Vec<TableColumns>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A table an `ALTER TABLE` touched: its OID on the source and its columns' numbers by name.
#[derive(Debug, Clone, Deserialize)]
pub struct TableColumns {
    pub schema: String,
    pub table: String,
    pub rel: i64,
    #[serde(default)]
    pub cols: std::collections::HashMap<String, i16>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Object {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub identity: Option<String>,
    /// `[schema, table]` of the table the object is or belongs to.
    #[serde(default)]
    pub table: Option<Vec<String>>,
}

/// What to do with a captured statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing on the target (why).
    Ignore(String),
    /// Run `sql` on the target; after the transaction commits when `concurrently`.
    Replay { sql: String, concurrently: bool },
    /// Cannot be replayed safely (why).
    Refuse(String),
}

/// The upper-cased leading words of a statement (comments and whitespace skipped).
fn leading_words(stmt: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = stmt;
    while out.len() < n {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
            continue;
        }
        if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        out.push(rest[..end].to_ascii_uppercase());
        rest = &rest[end..];
    }
    out
}

/// The columns an `ALTER TABLE` statement changes the type of with a `USING` expression, as the
/// catalog spells them (a quoted name as written, another folded to lower case).
fn retyped_with_using(stmt: &str) -> Vec<String> {
    use crate::pg::sql_lexer::{Tok, tokens};
    // The statement's top-level, comma-separated parts (its subcommands).
    let mut parts: Vec<Vec<Tok>> = vec![Vec::new()];
    let mut depth = 0i32;
    for t in tokens(stmt) {
        match t {
            Tok::Sym('(') => depth += 1,
            Tok::Sym(')') => depth -= 1,
            Tok::Sym(',') if depth == 0 => parts.push(Vec::new()),
            t if depth == 0 => {
                if let Some(p) = parts.last_mut() {
                    p.push(t);
                }
            }
            _ => {}
        }
    }
    let upper = |t: Option<&Tok>| match t {
        Some(Tok::Word { upper, .. }) => upper.clone(),
        _ => String::new(),
    };
    let mut out = Vec::new();
    for part in &parts {
        if !part.iter().any(|t| upper(Some(t)) == "USING") {
            continue;
        }
        for k in 0..part.len() {
            if upper(part.get(k)) != "ALTER" {
                continue;
            }
            let at = if upper(part.get(k + 1)) == "COLUMN" {
                k + 2
            } else {
                k + 1
            };
            // `ALTER TABLE name ...` is the statement's head, not a column.
            let Some(Tok::Word {
                text: name,
                upper: word,
            }) = part.get(at)
            else {
                continue;
            };
            if word == "TABLE" {
                continue;
            }
            let retyped = upper(part.get(at + 1)) == "TYPE"
                || (upper(part.get(at + 1)) == "SET"
                    && upper(part.get(at + 2)) == "DATA"
                    && upper(part.get(at + 3)) == "TYPE");
            if retyped && !out.contains(name) {
                out.push(name.clone());
            }
        }
    }
    out
}

/// Statements that change the schema and can be replayed as they are.
const REPLAYABLE: &[&str] = &[
    "CREATE", "ALTER", "DROP", "COMMENT", "GRANT", "REVOKE", "SECURITY", "REFRESH",
];

/// The `[schema, table]` of each object that is or belongs to a table.
fn object_tables(c: &Captured) -> Vec<(&str, &str)> {
    c.objects
        .iter()
        .filter_map(|o| match o.table.as_deref() {
            Some([s, t, ..]) => Some((s.as_str(), t.as_str())),
            _ => None,
        })
        .collect()
}

/// Whether every object of the statement is temporary (`pg_temp...`): session-local, nothing for
/// the target.
fn only_temporary(c: &Captured) -> bool {
    let temp = |o: &Object| {
        o.table
            .as_deref()
            .and_then(|t| t.first())
            .is_some_and(|s| s.starts_with("pg_temp"))
            || o.identity
                .as_deref()
                .is_some_and(|i| i.starts_with("pg_temp"))
    };
    !c.objects.is_empty() && c.objects.iter().all(temp)
}

/// Decides what to do with a captured statement for a plan selecting `selection`; `on_target`
/// tells whether a table exists in the target database (a table outside the selection that does is
/// kept in step too).
pub fn decide(
    c: &Captured,
    selection: &Selection,
    on_target: impl Fn(&str, &str) -> bool,
) -> Decision {
    if let Some(e) = &c.error {
        return Decision::Refuse(format!(
            "the capture could not add the new table to the publication ({e}), so its rows would not reach the target"
        ));
    }
    if let Some(t) = c.unpublished.first() {
        return Decision::Refuse(format!(
            "{} entered the selection by a rename or a move, so it is not published and its rows are not on the target (copy it to the target, add it to the publication with ALTER PUBLICATION ... ADD TABLE on the source, then mark the statement)",
            t.join(".")
        ));
    }
    let Some(query) = c.query.as_deref().filter(|q| !q.trim().is_empty()) else {
        return Decision::Refuse("the source did not say which statement ran".into());
    };
    let statements = match crate::pg::sql_lexer::split_statements(query) {
        Ok(s) => s,
        Err(e) => return Decision::Refuse(format!("the query string cannot be split: {e}")),
    };
    let mut replay = Vec::new();
    for stmt in &statements {
        let words = leading_words(stmt, 5);
        let first = words.first().map(String::as_str).unwrap_or("");
        if matches!(first, "SET" | "RESET") {
            continue;
        }
        // `SELECT ... INTO t` creates a table (tag SELECT INTO); any other SELECT is data.
        let select_into = first == "SELECT" && c.tag == "SELECT INTO";
        if !REPLAYABLE.contains(&first) && !select_into {
            return Decision::Refuse(if statements.len() == 1 {
                format!(
                    "the DDL ran inside a `{first}` statement (a function, a DO block or a data-changing statement): replaying it would run its data changes twice"
                )
            } else {
                format!(
                    "the DDL came in one query string with a `{first}` statement: replaying the string would run it on the target too"
                )
            });
        }
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["CREATE" | "ALTER", "EXTENSION", ..] => {
                return Decision::Refuse(
                    "an extension needs its files on the target server (installed with the server's packages) and may run scripts of its own".into(),
                );
            }
            ["CREATE" | "ALTER" | "DROP", "SUBSCRIPTION", ..] => {
                return Decision::Refuse(
                    "a subscription connects to another server; it is not part of the migrated schema".into(),
                );
            }
            ["IMPORT", ..] => {}
            _ => {}
        }
        if matches!(
            w.as_slice(),
            ["CREATE", "OR", "REPLACE", "FUNCTION" | "PROCEDURE", ..]
                | ["CREATE", "FUNCTION" | "PROCEDURE", ..]
        ) && is_c_language(stmt)
        {
            return Decision::Refuse(
                "a C-language function needs its shared library on the target server".into(),
            );
        }
        replay.push(stmt.as_str());
    }
    if replay.is_empty() {
        return Decision::Ignore("only session settings".into());
    }
    if only_temporary(c) {
        if statements.len() > 1 {
            return Decision::Refuse(
                "the query string creates or changes temporary objects along with other DDL: replaying it would leave them in cdc's session".into(),
            );
        }
        return Decision::Ignore("temporary objects live in the source's session only".into());
    }
    if matches!(
        c.tag.as_str(),
        "CREATE PUBLICATION" | "ALTER PUBLICATION" | "DROP PUBLICATION"
    ) {
        return Decision::Ignore("publications are not part of the migrated schema".into());
    }
    // Objects of tables: a statement that touches only tables outside the selection is not for
    // the target (where those tables do not exist).
    let tables = object_tables(c);
    let selected = tables.iter().any(|(s, t)| selection.selects(s, t));
    if statements.len() == 1
        && !tables.is_empty()
        && !selected
        && !tables.iter().any(|(s, t)| on_target(s, t))
    {
        let (s, t) = tables[0];
        return Decision::Ignore(format!("{s}.{t} is not selected"));
    }
    // A selected table created with its rows (`CREATE TABLE AS` / `SELECT INTO`) is replayed as
    // it is: the capture wrote its rows again once it was published, after a TRUNCATE, so the
    // stream empties what the target computed and carries the source's rows.
    if matches!(c.tag.as_str(), "CREATE TABLE AS" | "SELECT INTO")
        && selected
        && c.published.is_empty()
    {
        return Decision::Refuse(
            "a table created with its rows (CREATE TABLE AS / SELECT INTO) was not published by the capture (a capture installed by an earlier pgferry), so the stream does not carry its rows".into(),
        );
    }
    let concurrently = replay.len() == 1
        && matches!(
            leading_words(replay[0], 4)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice(),
            ["CREATE", "INDEX", "CONCURRENTLY", ..]
                | ["CREATE", "UNIQUE", "INDEX", "CONCURRENTLY"]
                | ["DROP", "INDEX", "CONCURRENTLY", ..]
        );
    Decision::Replay {
        sql: replay.join("\n"),
        concurrently,
    }
}

/// `LANGUAGE c` (or `'c'`) in a function's definition.
fn is_c_language(stmt: &str) -> bool {
    let words: Vec<String> = stmt
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .map(|w| w.trim_matches('\'').to_ascii_lowercase())
        .collect();
    words.windows(2).any(|w| w[0] == "language" && w[1] == "c")
}

/// A statement to run after the target transaction commits.
pub struct Deferred {
    pub lsn: Lsn,
    pub sql: String,
    pub search_path: Option<String>,
    pub role: Option<String>,
}

impl DbStream<'_> {
    /// A logical decoding message of the current source transaction.
    pub(super) async fn message(
        &self,
        ap: &mut Applier,
        st: &mut Loop,
        m: LogicalMessage,
    ) -> Result<()> {
        if st.skip_tx || !m.transactional || m.prefix != MESSAGE_PREFIX || !st.replicate_ddl {
            return Ok(());
        }
        let c: Captured = serde_json::from_slice(&m.content).map_err(|e| {
            Error::permanent(format!(
                "a DDL capture message at {} cannot be read: {e}",
                m.lsn
            ))
        })?;
        if c.m != name_stem(&self.env.plan.name) || st.ddl_key.as_deref() == Some(c.key.as_str()) {
            // Another migration's capture, or a further statement of a query string replayed
            // already.
            return Ok(());
        }
        let single = c
            .query
            .as_deref()
            .and_then(|q| crate::pg::sql_lexer::split_statements(q).ok())
            .is_some_and(|v| v.len() == 1);
        st.ddl_key = Some(c.key.clone());
        if only_temporary(&c) && c.error.is_none() && single {
            // Session-local objects (an application may create temporary tables all day): not
            // recorded, and the batch goes on.
            tracing::debug!(database = %self.db.name, lsn = %m.lsn, "cdc: DDL on temporary objects not replayed");
            return Ok(());
        }
        let made_full: Vec<crate::stages::replica_identity::Change> = c
            .identity_full
            .iter()
            .filter_map(|t| match t.as_slice() {
                [schema, table] => Some(crate::stages::replica_identity::Change {
                    schema: schema.clone(),
                    table: table.clone(),
                    original: "d".into(),
                    original_index: None,
                    index: None,
                }),
                _ => None,
            })
            .collect();
        if !made_full.is_empty() {
            crate::stages::replica_identity::record(
                self.cx.store.as_ref(),
                &self.db.name,
                &made_full,
            )
            .await?;
        }
        let i = self
            .env
            .plan
            .databases
            .iter()
            .position(|d| d.name == self.db.name)
            .unwrap_or(0);
        let db = &self.env.plan.databases[i];
        let client = ap.before_ddl().await?;
        let (schemas, names): (Vec<String>, Vec<String>) = object_tables(&c)
            .into_iter()
            .map(|(s, t)| (s.to_string(), t.to_string()))
            .unzip();
        let present: Vec<(String, String)> = client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                   JOIN unnest($1::text[], $2::text[]) AS u(s, t) ON u.s = n.nspname AND u.t = c.relname",
                &[&schemas, &names],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking up the DDL statement's tables on the target"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let decision = decide(&c, &Selection::new(&db.tables, &db.exclude), |s, t| {
            present.iter().any(|(a, b)| a == s && b == t)
        });
        let table = record_table(ap.state_schema());
        let slot = ap.slot().to_string();
        let marked: Option<String> = client
            .query_opt(
                &format!("SELECT status FROM {table} WHERE slot = $1 AND lsn = $2::text::pg_lsn"),
                &[&slot, &m.lsn.to_string()],
            )
            .await
            .map_err(|e| Error::pg(&e, "reading the record of replayed DDL"))?
            .map(|r| r.get(0));
        let query = c.query.clone().unwrap_or_default();
        let commit_lsn = st.commit_lsn;
        let record = |status: &str, sql: &str| {
            serde_json::json!({
                "lsn": m.lsn.to_string(),
                "commit_lsn": commit_lsn.to_string(),
                "tag": c.tag,
                "statement": sql,
                "status": status,
            })
        };
        if let Some(status) = marked {
            tracing::info!(database = %self.db.name, lsn = %m.lsn, %status, "cdc: DDL statement already handled on the target, not replayed: {query}");
            st.ddl_log.push(record(&status, &query));
            return Ok(());
        }
        let insert = format!(
            "INSERT INTO {table} (slot, lsn, commit_lsn, tag, statement, status, search_path, role) VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, $5, $6, $7, $8)"
        );
        let write = |status: &'static str, sql: String| {
            let client = client.clone();
            let insert = insert.clone();
            let slot = slot.clone();
            let lsn = m.lsn.to_string();
            let commit = commit_lsn.to_string();
            let tag = c.tag.clone();
            let (search_path, role) = (c.search_path.clone(), c.role.clone());
            async move {
                client
                    .execute(
                        &insert,
                        &[
                            &slot,
                            &lsn,
                            &commit,
                            &tag,
                            &sql,
                            &status,
                            &search_path,
                            &role,
                        ],
                    )
                    .await
                    .map_err(|e| Error::pg(&e, "recording a replayed DDL statement"))
            }
        };
        match decision {
            Decision::Ignore(why) => {
                // Nothing changes on the target: the batch goes on.
                tracing::info!(database = %self.db.name, lsn = %m.lsn, "cdc: DDL not replayed ({why}): {query}");
                write("ignored", query.clone()).await?;
                st.ddl_log.push(record("ignored", &query));
            }
            Decision::Refuse(why) => {
                return Err(self.ddl_stop(ap, st, &c, m.lsn, &why, &query, false));
            }
            Decision::Replay {
                sql,
                concurrently: true,
            } => {
                st.ddl_in_tx = true;
                write("deferred", sql.clone()).await?;
                st.deferred.push(Deferred {
                    lsn: m.lsn,
                    sql: sql.clone(),
                    search_path: c.search_path.clone(),
                    role: c.role.clone(),
                });
                st.ddl_log
                    .push(record("applied after its transaction", &sql));
            }
            Decision::Replay {
                sql,
                concurrently: false,
            } => {
                st.ddl_in_tx = true;
                let role = self.replay_role(&client, c.role.as_deref()).await?;
                let old: String = client
                    .query_one("SELECT pg_catalog.current_setting('search_path')", &[])
                    .await
                    .map_err(|e| Error::pg(&e, "reading the apply session's search_path"))?
                    .get(0);
                let mut setup = String::new();
                if let Some(r) = &role {
                    setup.push_str(&format!("SET LOCAL ROLE {};", quote_ident(r)));
                }
                if let Some(p) = &c.search_path {
                    setup.push_str(&format!(
                        "SELECT pg_catalog.set_config('search_path', {}, true);",
                        quote_literal(p)
                    ));
                }
                // Columns before, to find the ones the statement adds (see [`resync_columns`]).
                let tables = touched_tables(&c, &Selection::new(&db.tables, &db.exclude));
                let mut before = Vec::new();
                for (schema, table) in &tables {
                    before.push(column_numbers(&client, schema, table).await?);
                }
                client
                    .batch_execute(&setup)
                    .await
                    .map_err(|e| Error::pg(&e, "preparing to replay a DDL statement"))?;
                if let Err(e) = client.batch_execute(&sql).await {
                    let why = match e.as_db_error() {
                        Some(d) => format!("the target refused it: {}", d.message()),
                        None => format!("the target refused it: {e}"),
                    };
                    if e.as_db_error().is_none() {
                        return Err(Error::pg(&e, "replaying a DDL statement"));
                    }
                    return Err(self.ddl_stop(ap, st, &c, m.lsn, &why, &sql, true));
                }
                client
                    .batch_execute(&format!(
                        "{}SELECT pg_catalog.set_config('search_path', {}, true);",
                        if role.is_some() { "RESET ROLE;" } else { "" },
                        quote_literal(&old)
                    ))
                    .await
                    .map_err(|e| {
                        Error::pg(&e, "restoring the apply session after a DDL statement")
                    })?;
                // `ALTER COLUMN ... TYPE ... USING <expression>`: the expression may be volatile
                // (or read other tables), so the source's results are copied like a new column's.
                let retyped = if tables.len() == 1 {
                    retyped_with_using(&sql)
                } else {
                    Vec::new()
                };
                // One source session for every table of the statement that needs its values.
                let mut source = None;
                for ((schema, table), before) in tables.iter().zip(&before) {
                    let Some(before) = before else {
                        continue;
                    };
                    let added = rewritten_columns(&client, schema, table, before).await?;
                    let mut copy = added.clone();
                    for col in &retyped {
                        if !copy.contains(col) {
                            copy.push(col.clone());
                        }
                    }
                    if !copy.is_empty() {
                        // A GENERATED ALWAYS identity takes the source's values only BY DEFAULT
                        // (until the cutover, as for every such column cdc writes).
                        let always: Vec<String> = client
                            .query(
                                "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
                                  WHERE a.attrelid = pg_catalog.format('%I.%I', $1::text, $2::text)::regclass \
                                    AND a.attname = ANY ($3) AND a.attidentity = 'a'",
                                &[schema, table, &added],
                            )
                            .await
                            .map_err(|e| Error::pg(&e, "reading the new identity columns"))?
                            .iter()
                            .map(|r| r.get(0))
                            .collect();
                        if !always.is_empty() {
                            super::identity::relax(
                                &client,
                                ap.state_schema(),
                                schema,
                                table,
                                &always,
                            )
                            .await?;
                        }
                        let then = c
                            .columns
                            .iter()
                            .find(|x| &x.schema == schema && &x.table == table);
                        self.resync_columns(&client, &mut source, schema, table, &copy, then)
                            .await
                            .map_err(|e| {
                                e.context(format!(
                                    "copying the values of {schema}.{table}'s new or retyped column(s) {} from the source (replayed at {})",
                                    copy.join(", "),
                                    m.lsn
                                ))
                            })?;
                    }
                }
                write("applied", sql.clone()).await?;
                ap.forget_prepared();
                tracing::info!(database = %self.db.name, lsn = %m.lsn, commit = %st.commit_lsn, "cdc: replayed DDL: {sql}");
                st.ddl_log.push(record("applied", &sql));
            }
        }
        Ok(())
    }

    /// The error that stops cdc at a statement it cannot replay.
    #[allow(clippy::too_many_arguments)]
    fn ddl_stop(
        &self,
        ap: &Applier,
        st: &Loop,
        c: &Captured,
        lsn: Lsn,
        why: &str,
        statement: &str,
        failed: bool,
    ) -> Error {
        let table = record_table(ap.state_schema());
        let mark = format!(
            "INSERT INTO {table} (slot, lsn, commit_lsn, tag, statement, status) VALUES ({}, '{lsn}', '{}', {}, {}, 'skipped')",
            quote_literal(ap.slot()),
            st.commit_lsn,
            quote_literal(&c.tag),
            quote_literal(statement),
        );
        let first = if failed {
            "make the target accept it (create what it needs there) and run the plan again, cdc replays it; or"
        } else {
            ""
        };
        Error::permanent(format!(
            "database {}: cdc stopped at the {} statement at {lsn} (source transaction committed at {}): {why}. Statement: {statement}",
            self.db.name, c.tag, st.commit_lsn
        ))
        .hint(format!(
            "{first} apply the equivalent change to target database {} yourself, mark the statement handled there with\n    {mark};\nthen run the plan again (`pgferry run PLAN`): cdc resumes with this source transaction, applies its other changes and skips the statement",
            self.db.target
        ))
    }

    /// Runs the statements deferred until their target transaction committed, and records them
    /// applied; then lists the transaction's DDL in the store.
    pub(super) async fn after_commit(&self, ap: &mut Applier, st: &mut Loop) -> Result<()> {
        let deferred = std::mem::take(&mut st.deferred);
        for d in deferred {
            self.run_deferred(ap, &d).await?;
        }
        if !st.ddl_log.is_empty() {
            let entries = std::mem::take(&mut st.ddl_log);
            // The databases' streams share the stage's detail.
            let _guard = DETAIL_LOCK.lock().await;
            let mut detail = self
                .cx
                .store
                .stages()
                .await?
                .into_iter()
                .find(|r| r.stage == self.cx.stage)
                .map(|r| r.detail)
                .filter(serde_json::Value::is_object)
                .unwrap_or_else(|| serde_json::json!({}));
            let list = detail
                .as_object_mut()
                .map(|o| o.entry(DETAIL_KEY).or_insert_with(|| serde_json::json!({})))
                .and_then(serde_json::Value::as_object_mut)
                .map(|o| {
                    o.entry(self.db.name.clone())
                        .or_insert_with(|| serde_json::json!([]))
                })
                .and_then(serde_json::Value::as_array_mut);
            if let Some(list) = list {
                for e in entries {
                    let lsn = e.get("lsn").cloned();
                    if !list.iter().any(|x| x.get("lsn") == lsn.as_ref()) {
                        list.push(e);
                    }
                }
            }
            self.cx
                .store
                .set_stage_detail(&self.cx.stage, &detail)
                .await?;
        }
        Ok(())
    }

    /// The role a statement is replayed as: the one that ran it on the source, so new objects get
    /// the same owner, when the target has it and the plan's schema kept owners; otherwise (None)
    /// cdc's own role, which then owns what the statement creates, as it owns the objects
    /// provision created from a dump without owners.
    async fn replay_role(
        &self,
        client: &tokio_postgres::Client,
        role: Option<&str>,
    ) -> Result<Option<String>> {
        let no_owner = self.env.plan.stages.iter().any(|s| {
            s.options
                .iter()
                .any(|o| matches!(o, StageOptions::SchemaDump(o) if o.no_owner))
        });
        let Some(role) = role.filter(|_| !no_owner) else {
            return Ok(None);
        };
        if target_has_role(client, role).await? {
            return Ok(Some(role.to_string()));
        }
        tracing::warn!(database = %self.db.name, role, "cdc: the role that ran a DDL statement on the source does not exist on the target; replaying it as cdc's own role, which will own what it creates");
        Ok(None)
    }

    /// Runs the deferred statements a stopped run left (recorded `deferred` on the target).
    pub(super) async fn deferred_left(&self, ap: &mut Applier) -> Result<()> {
        let client = ap.session();
        let rows = client
            .query(
                &format!(
                    "SELECT lsn::text, statement, search_path, role FROM {} WHERE slot = $1 AND status = 'deferred' ORDER BY lsn",
                    record_table(ap.state_schema())
                ),
                &[&ap.slot()],
            )
            .await
            .map_err(|e| Error::pg(&e, "reading the deferred DDL statements"))?;
        for r in rows {
            let lsn: Lsn = r.get::<_, String>(0).parse()?;
            let d = Deferred {
                lsn,
                sql: r.get(1),
                search_path: r.get(2),
                role: r.get(3),
            };
            self.run_deferred(ap, &d).await?;
        }
        Ok(())
    }

    async fn run_deferred(&self, ap: &mut Applier, d: &Deferred) -> Result<()> {
        let client = ap.session();
        let role = self.replay_role(&client, d.role.as_deref()).await?;
        let mut setup = String::new();
        if let Some(r) = &role {
            setup.push_str(&format!("SET ROLE {};", quote_ident(r)));
        }
        if let Some(p) = &d.search_path {
            setup.push_str(&format!(
                "SELECT pg_catalog.set_config('search_path', {}, false);",
                quote_literal(p)
            ));
        }
        if !setup.is_empty() {
            client
                .batch_execute(&setup)
                .await
                .map_err(|e| Error::pg(&e, "preparing to replay a DDL statement"))?;
        }
        let mut result = client.batch_execute(&d.sql).await;
        // A stopped run's index build that got as far as creating the index leaves it invalid:
        // dropped and built again.
        if result
            .as_ref()
            .err()
            .and_then(|e| e.code())
            .is_some_and(|c| *c == tokio_postgres::error::SqlState::DUPLICATE_TABLE)
            && let Some(name) = concurrent_index_name(&d.sql)
        {
            let invalid: Vec<String> = client
                .query(
                    "SELECT c.oid::pg_catalog.regclass::text FROM pg_catalog.pg_class c \
                       JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid \
                      WHERE c.relname = $1 AND NOT i.indisvalid AND pg_catalog.pg_table_is_visible(c.oid)",
                    &[&name],
                )
                .await
                .map_err(|e| Error::pg(&e, "looking for an invalid index left by a stopped build"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if let [index] = invalid.as_slice() {
                tracing::warn!(database = %self.db.name, lsn = %d.lsn, %index, "cdc: an invalid index left by a stopped build; dropping it and building it again");
                client
                    .batch_execute(&format!("DROP INDEX CONCURRENTLY {index}"))
                    .await
                    .map_err(|e| Error::pg(&e, format!("dropping the invalid index {index}")))?;
                result = client.batch_execute(&d.sql).await;
            }
        }
        client
            .batch_execute("RESET ROLE; RESET search_path;")
            .await
            .map_err(|e| Error::pg(&e, "restoring the apply session after a DDL statement"))?;
        match result {
            Ok(()) => {}
            // A stopped run's statement that got done before it stopped.
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_TABLE)
                    || (e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT)
                        && leading_words(&d.sql, 1).first().map(String::as_str)
                            == Some("DROP")) =>
            {
                tracing::warn!(database = %self.db.name, lsn = %d.lsn, "cdc: the deferred statement's object exists on the target already: {}", d.sql);
            }
            Err(e) => {
                return Err(Error::pg(&e, format!("replaying `{}` (at {}) after its transaction", d.sql, d.lsn))
                    .hint(format!(
                        "make the target accept it, or run the equivalent yourself on target database {} and set its record's status to 'applied': UPDATE {} SET status = 'applied' WHERE slot = {} AND lsn = '{}'; then run the plan again",
                        self.db.target,
                        record_table(ap.state_schema()),
                        quote_literal(ap.slot()),
                        d.lsn
                    )));
            }
        }
        client
            .execute(
                &format!(
                    "UPDATE {} SET status = 'applied', recorded_at = now() WHERE slot = $1 AND lsn = $2::text::pg_lsn",
                    record_table(ap.state_schema())
                ),
                &[&ap.slot(), &d.lsn.to_string()],
            )
            .await
            .map_err(|e| Error::pg(&e, "recording a deferred DDL statement applied"))?;
        tracing::info!(database = %self.db.name, lsn = %d.lsn, "cdc: replayed DDL after its transaction: {}", d.sql);
        Ok(())
    }
}

/// The selected tables an `ALTER TABLE` touched (for [`rewritten_columns`]).
fn touched_tables(c: &Captured, selection: &Selection) -> Vec<(String, String)> {
    if c.tag != "ALTER TABLE" {
        return Vec::new();
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for o in &c.objects {
        if let Some([s, t, ..]) = o.table.as_deref()
            && selection.selects(s, t)
            && !out.iter().any(|(a, b)| a == s && b == t)
        {
            out.push((s.clone(), t.clone()));
        }
    }
    out
}

/// The column numbers of `schema.table` on the target; `None` when there is no such table yet (the
/// statement creates it, or renames or moves a table to that name: it adds no column then).
async fn column_numbers(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
) -> Result<Option<Vec<i16>>> {
    let row = client
        .query_opt(
            "SELECT ARRAY(SELECT a.attnum FROM pg_catalog.pg_attribute a \
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) \
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("reading the columns of {schema}.{table}")))?;
    Ok(row.map(|r| r.get(0)))
}

/// The columns a replayed statement added whose values were computed row by row: a default that
/// is not stored as the column's "missing" value (a volatile one such as `clock_timestamp()` or a
/// sequence's `nextval`, which rewrites the table), or an identity. The source computed other
/// values than the target just did, and logical decoding carries none of them.
async fn rewritten_columns(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    before: &[i16],
) -> Result<Vec<String>> {
    let before: Vec<i16> = before.to_vec();
    Ok(client
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
               JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                AND a.attgenerated = '' AND ((a.atthasdef AND NOT a.atthasmissing) OR a.attidentity <> '') \
                AND NOT (a.attnum = ANY ($3)) ORDER BY a.attnum",
            &[&schema, &table, &before],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("reading the new columns of {schema}.{table}")))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A column's name on the source now and on the target at this point of the stream.
type Names = (String, String);

impl DbStream<'_> {
    /// Gives the target's rows of `schema.table` the source's values of the columns `cols`, by key
    /// (the source's primary key or replica identity index), in the open target transaction. The
    /// values are the source's current ones, which may be newer than the statement: every later
    /// change of such a row is in the stream after it and carries the column, so the target
    /// converges to the source as those changes are applied.
    ///
    /// The target's names are the ones at this point of the stream; the source may have renamed
    /// the table or its columns, or dropped them, since. With the capture's record of the table
    /// (`then`: its OID and column numbers right after the statement) they are found by number: a
    /// column dropped since is skipped (the stream drops it on the target later, and every change
    /// in between carries its values), a renamed one read under its new name.
    #[allow(clippy::too_many_arguments)]
    async fn resync_columns(
        &self,
        target: &tokio_postgres::Client,
        source: &mut Option<tokio_postgres::Client>,
        schema: &str,
        table: &str,
        cols: &[String],
        then: Option<&TableColumns>,
    ) -> Result<()> {
        use futures_util::{StreamExt, pin_mut};
        let source = match source {
            Some(c) => c,
            None => source.insert(self.env.source_for(self.db).connect("cdc ddl").await?),
        };
        let key_sql = "SELECT a.attnum, a.attname::text FROM pg_catalog.pg_index i \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                  WHERE i.indrelid = $1::bigint::pg_catalog.oid \
                    AND (i.indisreplident OR (i.indisprimary AND NOT EXISTS ( \
                         SELECT 1 FROM pg_catalog.pg_index r WHERE r.indrelid = i.indrelid AND r.indisreplident))) \
                  ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum)";
        // (source name, target name) of the key columns and of the columns to copy.
        let (source_table, keys, copy): (String, Vec<Names>, Vec<Names>) = match then {
            Some(then) => {
                let Some(row) = source
                    .query_opt(
                        "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
                               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                              WHERE c.oid = $1::bigint::pg_catalog.oid AND c.relkind IN ('r', 'p')",
                        &[&then.rel],
                    )
                    .await
                    .map_err(|e| Error::pg(&e, "finding the table on the source"))?
                else {
                    tracing::info!(database = %self.db.name, table = %format!("{schema}.{table}"), "cdc: the table was dropped on the source since; its new column(s) keep the target's values until the stream drops it");
                    return Ok(());
                };
                let now: std::collections::HashMap<i16, String> = source
                        .query(
                            "SELECT a.attnum, a.attname::text FROM pg_catalog.pg_attribute a \
                              WHERE a.attrelid = $1::bigint::pg_catalog.oid AND a.attnum > 0 AND NOT a.attisdropped",
                            &[&then.rel],
                        )
                        .await
                        .map_err(|e| Error::pg(&e, "reading the table's columns on the source"))?
                        .iter()
                        .map(|r| (r.get(0), r.get(1)))
                        .collect();
                let name_then = |num: i16| {
                    then.cols
                        .iter()
                        .find(|(_, n)| **n == num)
                        .map(|(name, _)| name.clone())
                };
                let mut keys = Vec::new();
                for r in source
                    .query(key_sql, &[&then.rel])
                    .await
                    .map_err(|e| Error::pg(&e, "reading the table's key on the source"))?
                {
                    let (num, name): (i16, String) = (r.get(0), r.get(1));
                    let Some(at_target) = name_then(num) else {
                        return Err(Error::permanent(format!(
                            "the key of {schema}.{table} on the source (column {name}) was added after the statement, so the values the source computed for its new column(s) cannot be matched to the target's rows"
                        )));
                    };
                    keys.push((name, at_target));
                }
                let mut copy = Vec::new();
                for col in cols {
                    match then.cols.get(col).and_then(|n| now.get(n)) {
                        Some(name) => copy.push((name.clone(), col.clone())),
                        None => {
                            tracing::info!(database = %self.db.name, table = %format!("{schema}.{table}"), column = %col, "cdc: the column was dropped on the source since; it keeps the target's values until the stream drops it");
                        }
                    }
                }
                let (s, t): (String, String) = (row.get(0), row.get(1));
                (
                    format!("{}.{}", quote_ident(&s), quote_ident(&t)),
                    keys,
                    copy,
                )
            }
            None => {
                // A capture installed before the column numbers were recorded: by name.
                let rel: i64 = source
                        .query_one(
                            "SELECT pg_catalog.format('%I.%I', $1::text, $2::text)::regclass::oid::bigint",
                            &[&schema, &table],
                        )
                        .await
                        .map_err(|e| Error::pg(&e, "finding the table on the source"))?
                        .get(0);
                let keys = source
                    .query(key_sql, &[&rel])
                    .await
                    .map_err(|e| Error::pg(&e, "reading the table's key on the source"))?
                    .iter()
                    .map(|r| (r.get::<_, String>(1), r.get::<_, String>(1)))
                    .collect();
                let copy = cols.iter().map(|c| (c.clone(), c.clone())).collect();
                (
                    format!("{}.{}", quote_ident(schema), quote_ident(table)),
                    keys,
                    copy,
                )
            }
        };
        if keys.is_empty() {
            return Err(Error::permanent(format!(
                "{schema}.{table} has no primary key or replica identity index on the source, so the values the source computed for its new column(s) cannot be matched to the target's rows"
            )));
        }
        if copy.is_empty() {
            return Ok(());
        }
        if let Some((_, k)) = keys.iter().find(|(_, k)| copy.iter().any(|(_, c)| c == k)) {
            return Err(Error::permanent(format!(
                "the statement computed new values of {schema}.{table}'s key column {k} (ALTER COLUMN ... TYPE ... USING): the target's rows cannot be matched to the source's by that key"
            )));
        }
        let all: Vec<&(String, String)> = keys.iter().chain(&copy).collect();
        let mut types = Vec::new();
        for (_, c) in &all {
            let ty: String = target
                .query_one(
                    "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a \
                      WHERE a.attrelid = pg_catalog.format('%I.%I', $1::text, $2::text)::regclass AND a.attname = $3",
                    &[&schema, &table, c],
                )
                .await
                .map_err(|e| Error::pg(&e, "reading a column's type on the target"))?
                .get(0);
            types.push(ty);
        }
        let quoted = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let select = format!(
            "SELECT {} FROM {source_table}",
            all.iter()
                .map(|(c, _)| format!("{}::text", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let arrays: Vec<String> = (1..=all.len()).map(|i| format!("${i}::text[]")).collect();
        let aliases: Vec<String> = (1..=all.len()).map(|i| format!("a{i}")).collect();
        let conds: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, (_, k))| format!("t.{} = u.a{}::{}", quote_ident(k), i + 1, types[i]))
            .collect();
        let sets: Vec<String> = copy
            .iter()
            .enumerate()
            .map(|(j, (_, c))| {
                let i = keys.len() + j;
                format!("{} = u.a{}::{}", quote_ident(c), i + 1, types[i])
            })
            .collect();
        let update = format!(
            "UPDATE {quoted} AS t SET {} FROM unnest({}) AS u({}) WHERE {}",
            sets.join(", "),
            arrays.join(", "),
            aliases.join(", "),
            conds.join(" AND ")
        );
        let update = target
            .prepare(&update)
            .await
            .map_err(|e| Error::pg(&e, "preparing the copy of the new column's values"))?;
        let rows = source
            .query_raw(&select, std::iter::empty::<i32>())
            .await
            .map_err(|e| Error::pg(&e, "reading the new column's values on the source"))?;
        pin_mut!(rows);
        let mut batch: Vec<Vec<Option<String>>> = vec![Vec::new(); all.len()];
        let mut total = 0u64;
        loop {
            let next = rows.next().await;
            let done = next.is_none();
            if let Some(row) = next {
                let row = row
                    .map_err(|e| Error::pg(&e, "reading the new column's values on the source"))?;
                for (i, col) in batch.iter_mut().enumerate() {
                    col.push(row.get(i));
                }
            }
            if batch[0].len() >= 5000 || (done && !batch[0].is_empty()) {
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = batch
                    .iter()
                    .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                total += target
                    .execute(&update, &params)
                    .await
                    .map_err(|e| Error::pg(&e, "copying the new column's values"))?;
                batch = vec![Vec::new(); all.len()];
            }
            if done {
                break;
            }
        }
        tracing::info!(database = %self.db.name, table = %format!("{schema}.{table}"), columns = ?cols, rows = total, "cdc: the values the source computed for new column(s) copied to the target");
        Ok(())
    }
}

/// The name of the index a `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ...` builds, as
/// the catalog spells it (a quoted name as written, another folded to lower case).
fn concurrent_index_name(sql: &str) -> Option<String> {
    let words = leading_words(sql, 7);
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let skip = match w.as_slice() {
        ["CREATE", "INDEX", "CONCURRENTLY", "IF", "NOT", "EXISTS", ..] => 6,
        [
            "CREATE",
            "UNIQUE",
            "INDEX",
            "CONCURRENTLY",
            "IF",
            "NOT",
            "EXISTS",
            ..,
        ] => 7,
        ["CREATE", "INDEX", "CONCURRENTLY", ..] => 3,
        ["CREATE", "UNIQUE", "INDEX", "CONCURRENTLY", ..] => 4,
        _ => return None,
    };
    // The text after those keywords.
    let mut rest = sql;
    for _ in 0..skip {
        rest = rest.trim_start();
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    let rest = rest.trim_start();
    if let Some(q) = rest.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = q.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                } else {
                    return Some(name);
                }
            } else {
                name.push(c);
            }
        }
        return None;
    }
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(rest.len());
    let name = &rest[..end];
    (!name.is_empty() && !name.eq_ignore_ascii_case("ON")).then(|| name.to_lowercase())
}

async fn target_has_role(client: &tokio_postgres::Client, role: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking up a role on the target"))?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(tag: &str, query: &str, tables: &[(&str, &str)]) -> Captured {
        Captured {
            m: "m".into(),
            event: "ddl_command_end".into(),
            tag: tag.into(),
            query: Some(query.into()),
            search_path: None,
            role: None,
            key: "k".into(),
            objects: tables
                .iter()
                .map(|(s, t)| Object {
                    kind: Some("table".into()),
                    identity: None,
                    table: Some(vec![s.to_string(), t.to_string()]),
                })
                .collect(),
            published: Vec::new(),
            columns: Vec::new(),
            identity_full: Vec::new(),
            unpublished: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn concurrent_index_names() {
        assert_eq!(
            concurrent_index_name("create index concurrently Acc_I on t (c)").as_deref(),
            Some("acc_i")
        );
        assert_eq!(
            concurrent_index_name(
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"My \"\"x\" ON t (c)"
            )
            .as_deref(),
            Some("My \"x")
        );
        assert_eq!(
            concurrent_index_name("CREATE INDEX CONCURRENTLY ON t (c)"),
            None
        );
        assert_eq!(concurrent_index_name("DROP INDEX CONCURRENTLY i"), None);
    }

    #[test]
    fn decisions() {
        let sel = Selection::new(&["app.*".into()], &[]);
        let d = |tag, q, t: &[(&str, &str)]| decide(&captured(tag, q, t), &sel, |_, _| false);
        assert_eq!(
            d("ALTER TABLE", "ALTER TABLE t ADD c int", &[("app", "t")]),
            Decision::Replay {
                sql: "ALTER TABLE t ADD c int".into(),
                concurrently: false
            }
        );
        assert!(matches!(
            d("ALTER TABLE", "alter table t add c int", &[("other", "t")]),
            Decision::Ignore(_)
        ));
        assert_eq!(
            d(
                "CREATE INDEX",
                "/* m */ create index concurrently i on t (c);",
                &[("app", "t")]
            ),
            Decision::Replay {
                sql: "/* m */ create index concurrently i on t (c);".into(),
                concurrently: true
            }
        );
        assert_eq!(
            d(
                "ALTER TABLE",
                "SET lock_timeout = '1s'; ALTER TABLE t ADD c int; ALTER TABLE t ADD d int;",
                &[("app", "t")]
            ),
            Decision::Replay {
                sql: "ALTER TABLE t ADD c int;\nALTER TABLE t ADD d int;".into(),
                concurrently: false
            }
        );
        assert!(matches!(
            d(
                "ALTER TABLE",
                "ALTER TABLE t ADD c int; INSERT INTO t VALUES (1)",
                &[]
            ),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            d(
                "ALTER TABLE",
                "DO $$ BEGIN EXECUTE 'ALTER TABLE t ADD c int'; END $$",
                &[]
            ),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            d(
                "CREATE TABLE AS",
                "CREATE TEMP TABLE x AS SELECT 1",
                &[("pg_temp_3", "x")]
            ),
            Decision::Ignore(_)
        ));
        assert_eq!(
            retyped_with_using(
                "ALTER TABLE public.t ALTER COLUMN a TYPE bigint USING a * random()::int, \
                 ALTER \"Odd, name\" SET DATA TYPE text USING (\"Odd, name\" || 'x, y'), \
                 ALTER COLUMN b TYPE bigint, ADD COLUMN c int"
            ),
            vec!["a".to_string(), "Odd, name".to_string()]
        );
        assert_eq!(
            retyped_with_using("ALTER TABLE type ALTER COLUMN a TYPE int -- USING later\n"),
            Vec::<String>::new()
        );
        assert_eq!(
            retyped_with_using(
                "ALTER TABLE t ALTER a TYPE text USING a || $x$, ALTER b TYPE int$x$, ALTER c TYPE int"
            ),
            vec!["a".to_string()]
        );
        assert_eq!(
            retyped_with_using("ALTER TABLE ONLY s.t ALTER id TYPE uuid USING gen_random_uuid();"),
            vec!["id".to_string()]
        );
        // A selected table with its rows: replayed when the capture published it (and wrote its
        // rows again), refused when it could not.
        let mut ctas = captured(
            "CREATE TABLE AS",
            "CREATE TABLE app.totals AS SELECT 1 AS n",
            &[("app", "totals")],
        );
        assert!(matches!(
            decide(&ctas, &sel, |_, _| false),
            Decision::Refuse(_)
        ));
        ctas.published = vec![vec!["app".into(), "totals".into()]];
        assert!(matches!(
            decide(&ctas, &sel, |_, _| false),
            Decision::Replay {
                concurrently: false,
                ..
            }
        ));
        assert!(matches!(
            d(
                "CREATE TABLE",
                "CREATE TEMP TABLE x (a int); CREATE INDEX i ON app.t (c);",
                &[("pg_temp_3", "x")]
            ),
            Decision::Refuse(_)
        ));
        // Outside the selection but on the target: kept in step.
        assert!(matches!(
            decide(
                &captured("DROP TABLE", "DROP TABLE other.t", &[("other", "t")]),
                &sel,
                |s, t| s == "other" && t == "t"
            ),
            Decision::Replay { .. }
        ));
        let mut renamed = captured(
            "ALTER TABLE",
            "ALTER TABLE other.t SET SCHEMA app",
            &[("app", "t")],
        );
        renamed.unpublished = vec![vec!["app".into(), "t".into()]];
        assert!(matches!(
            decide(&renamed, &sel, |_, _| false),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            d("CREATE EXTENSION", "CREATE EXTENSION hstore", &[]),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            d(
                "CREATE FUNCTION",
                "CREATE FUNCTION f() RETURNS int AS 'lib', 'f' LANGUAGE C",
                &[]
            ),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            d(
                "CREATE FUNCTION",
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$",
                &[]
            ),
            Decision::Replay { .. }
        ));
    }
}
