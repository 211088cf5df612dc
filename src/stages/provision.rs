//! The `provision` stage, once per database:
//!
//! 1. Creates the target database when it is missing, with the source database's encoding,
//!    collation and character classification (and locale provider): `CREATE DATABASE ... TEMPLATE
//!    template0 ENCODING ... LC_COLLATE ... LC_CTYPE ...`. A database that exists (the checkpoint
//!    store creates the first one) is used as it is, with a warning when its encoding differs.
//! 2. Applies the pre-data schema that `schema_dump` stored in ONE transaction: sent whole as one
//!    simple-query message (an implicit transaction; on the regression database 0.19 s against
//!    0.34-0.41 s for psql's statement-by-statement round trips) when [`one_message`] allows it,
//!    else with psql (`--single-transaction`, `ON_ERROR_STOP`), which also runs it again to name
//!    the failing statement and its line when the message fails. A failure leaves nothing
//!    behind, so running again after fixing the cause simply applies it again.
//!    Before that it looks for the selected tables on the target. None there: apply. Some there:
//!    with `existing = "compare"` (the default) the columns of every selected table (name, type,
//!    NOT NULL, position) are compared with the source; when all tables are there and match, the
//!    schema is taken as already provisioned and not applied again; anything else is refused with
//!    the list of differences. With `existing = "refuse"` any selected table already on the target
//!    is refused.
//! 3. When the plan has a `cdc` stage, creates (or, when it exists, updates to the current
//!    selection) the publication CDC reads on the source: the selected tables, partitioned tables
//!    by their root, `publish_via_partition_root = true` (13+; a PostgreSQL 12 source cannot
//!    publish a partitioned table, so there its leaf partitions are published one by one and cdc
//!    applies each change to the same leaf on the target). Unlogged tables cannot be published; they
//!    are left out (preflight warns about them). Tables that cannot replicate UPDATE and DELETE (no
//!    primary key or replica identity) are refused first, since publishing them would make those
//!    statements fail on the source, unless `replica_identity = "index"` or `"full"` has provision
//!    give them one first ([`super::replica_identity`], recorded and restored by cleanup).
//!
//! Each database is checkpointed when all of this is done.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::process::Command;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::replica_identity::{self, Mode};
use super::{Env, Stage, StageContext, pre_data_artifact};
use crate::error::{Error, Result};
use crate::pg::catalog::TableInfo;
use crate::pg::ident::{QualifiedName, quote_ident, quote_literal};
use crate::pg::names::publication_name;
use crate::pg::publication;
use crate::pg::tools;
use crate::pg::version::ServerVersion;
use crate::plan::StageKind;
use crate::plan::{Database, StageOptions};
use crate::select::Selection;

pub struct Provision {
    env: Arc<Env>,
    index: usize,
}

/// What to do when selected tables already exist on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Compare,
    Refuse,
}

impl Provision {
    pub fn new(env: Arc<Env>, index: usize) -> Provision {
        Provision { env, index }
    }

    fn existing(&self, db: usize) -> Existing {
        match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::Provision(o)) if o.existing.as_deref() == Some("refuse") => {
                Existing::Refuse
            }
            _ => Existing::Compare,
        }
    }

    async fn provision_database(
        &self,
        cx: &StageContext,
        i: usize,
        db: &Database,
    ) -> Result<serde_json::Value> {
        let purpose = format!("provision {}", cx.stage);
        let online = self.env.plan.has_kind(StageKind::Cdc);
        let source_label = format!("source database `{}`", db.name);
        let target_label = format!("target database `{}`", db.target);

        // The selection, from the source.
        let (source, source_version) = self
            .env
            .source_for(db)
            .connect_versioned(&purpose)
            .await
            .map_err(|e| e.context(source_label.clone()))?;
        source
            .batch_execute("SET search_path = pg_catalog")
            .await
            .map_err(|e| Error::pg(&e, "configuring the session").context(source_label.clone()))?;
        let selected: Vec<TableInfo> = self
            .env
            .selected_tables(&source, db)
            .await
            .map_err(|e| e.context(source_label.clone()))?;
        let mode = replica_identity::mode(&self.env.plan, i);
        if online && mode == Mode::Refuse {
            check_identities(&selected).map_err(|e| e.context(source_label.clone()))?;
        }
        cx.check_cancelled()?;

        // 1. The target database.
        let created = self
            .ensure_database(db, &source, &purpose)
            .await
            .map_err(|e| e.context(target_label.clone()))?;
        let database_settings = self
            .copy_database_settings(db, &source, &purpose)
            .await
            .map_err(|e| e.context(target_label.clone()))?;
        cx.check_cancelled()?;

        // 2. The pre-data schema.
        let target_conn = self.env.target_for(db);
        let target = target_conn
            .connect(&purpose)
            .await
            .map_err(|e| e.context(target_label.clone()))?;
        target
            .batch_execute("SET search_path = pg_catalog")
            .await
            .map_err(|e| Error::pg(&e, "configuring the session").context(target_label.clone()))?;
        let names: Vec<QualifiedName> = selected.iter().map(|t| t.name.clone()).collect();
        let present = self
            .compare_existing(i, db, &source, &target, &names)
            .await
            .map_err(|e| e.context(target_label.clone()))?;
        let schema = if present {
            tracing::info!(stage = %cx.stage, database = %db.name, "all {} selected table(s) already exist on target database {} and match the source; not applying the pre-data schema again", names.len(), db.target);
            "already present"
        } else {
            self.apply_pre_data(cx, db, &purpose, target)
                .await
                .map_err(|e| e.context(target_label.clone()))?;
            "applied"
        };
        cx.check_cancelled()?;

        // 3. The publication for CDC, once every selected table can replicate UPDATE and DELETE
        // (before it is published: the source refuses them on a published keyless table).
        let mut published = None;
        let mut identities = Vec::new();
        if online && mode != Mode::Refuse {
            let changes =
                replica_identity::changes(&source, mode, &replica_identity::lacking(&selected))
                    .await
                    .map_err(|e| e.context(source_label.clone()))?;
            replica_identity::apply(&source, cx.store.as_ref(), &db.name, &changes)
                .await
                .map_err(|e| e.context(source_label.clone()))?;
            identities = changes.iter().map(|c| c.describe()).collect();
            if !changes.is_empty() {
                let indexed = changes.iter().filter(|c| c.index.is_some()).count();
                tracing::info!(stage = %cx.stage, database = %db.name, "gave {} keyless table(s) a replica identity ({indexed} USING INDEX, {} FULL; the stage's detail lists them; cleanup restores them)", changes.len(), changes.len() - indexed);
            }
        }
        if online {
            let n = self
                .publish(&source, source_version, &selected)
                .await
                .map_err(|e| e.context(source_label.clone()))?;
            published = Some(n);
        }
        // 4. The DDL capture (`ddl = "replicate"`), once the publication it adds new tables to
        // exists.
        let ddl_capture = online && crate::stages::cdc::ddl::replicates(&self.env.plan, i);
        if ddl_capture {
            if !source_version.pgoutput_messages() {
                return Err(Error::permanent(format!(
                    "`ddl = \"replicate\"` needs a source of PostgreSQL 14 or later (pgoutput's `messages` option); this source is {source_version}"
                ))
                .hint("set `ddl = \"stop\"` on the cdc stage")
                .context(source_label.clone()));
            }
            crate::pg::event_trigger::install(
                &source,
                &self.env.plan.name,
                &Selection::new(&db.tables, &db.exclude),
            )
            .await
            .map_err(|e| e.context(source_label.clone()))?;
            tracing::info!(stage = %cx.stage, database = %db.name, "DDL capture installed (event triggers; cleanup removes them)");
        }
        Ok(serde_json::json!({
            "ddl_capture": ddl_capture,
            "database_created": created,
            "database_settings": database_settings,
            "schema": schema,
            "selected_tables": names.len(),
            "publication": published.map(|_| publication_name(&self.env.plan.name)),
            "published_tables": published,
            "replica_identities_set": identities,
        }))
    }

    /// Creates the target database from the source's settings unless it exists. Returns whether it
    /// was created.
    async fn ensure_database(&self, db: &Database, source: &Client, purpose: &str) -> Result<bool> {
        let row = source
            .query_one(
                "SELECT pg_catalog.to_jsonb(d), pg_catalog.pg_encoding_to_char(d.encoding)::text \
                 FROM pg_catalog.pg_database d WHERE d.datname = current_database()",
                &[],
            )
            .await
            .map_err(|e| Error::pg(&e, "reading the source database's settings"))?;
        let settings: serde_json::Value = row.get(0);
        let encoding: String = row.get(1);
        let text = |k: &str| {
            settings
                .get(k)
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };

        let admin = self
            .env
            .target_for(db)
            .with_dbname("postgres")
            .connect(purpose)
            .await?;
        let existing = admin
            .query_opt(
                "SELECT pg_catalog.pg_encoding_to_char(encoding)::text FROM pg_catalog.pg_database WHERE datname = $1",
                &[&db.target],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking up the target database"))?;
        if let Some(row) = existing {
            let target_encoding: String = row.get(0);
            if target_encoding != encoding {
                tracing::warn!(database = %db.name, "target database {} exists with encoding {target_encoding}, the source uses {encoding}; text that {target_encoding} cannot represent will fail to load", db.target);
            }
            return Ok(false);
        }

        let mut sql = format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING {}",
            quote_ident(&db.target),
            quote_literal(&encoding)
        );
        if let Some(v) = text("datcollate") {
            sql.push_str(&format!(" LC_COLLATE {}", quote_literal(&v)));
        }
        if let Some(v) = text("datctype") {
            sql.push_str(&format!(" LC_CTYPE {}", quote_literal(&v)));
        }
        // PostgreSQL 15 and later: the locale provider (ICU, and the builtin one of 17).
        let locale = text("datlocale").or_else(|| text("daticulocale"));
        match (text("datlocprovider").as_deref(), locale) {
            (Some("i"), Some(l)) => {
                sql.push_str(&format!(
                    " LOCALE_PROVIDER icu ICU_LOCALE {}",
                    quote_literal(&l)
                ));
                if let Some(rules) = text("daticurules") {
                    sql.push_str(&format!(" ICU_RULES {}", quote_literal(&rules)));
                }
            }
            (Some("b"), Some(l)) => {
                sql.push_str(&format!(
                    " LOCALE_PROVIDER builtin BUILTIN_LOCALE {}",
                    quote_literal(&l)
                ));
            }
            _ => {}
        }
        match admin.batch_execute(&sql).await {
            Ok(()) => {
                tracing::info!(database = %db.name, "created target database {} ({encoding})", db.target);
                Ok(true)
            }
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(false),
            Err(e) => {
                let err = Error::pg(&e, format!("creating the target database: {sql}"));
                let hint = if err.hint.is_none() {
                    Some(
                        "create the target database yourself (with the encoding and a locale the target server supports) and run again",
                    )
                } else {
                    None
                };
                Err(match hint {
                    Some(h) => err.hint(h),
                    None => err,
                })
            }
        }
    }

    /// Gives the target database the source database's own settings (`ALTER DATABASE ... SET`, for
    /// every role; pg_dump carries them only with `--create`), such as a `search_path` that an
    /// expression index or the application depends on. A setting the target database already has
    /// is left as it is; one the target server does not know, or refuses, is skipped with a
    /// warning. Returns the settings applied, as `name = value`.
    async fn copy_database_settings(
        &self,
        db: &Database,
        source: &Client,
        purpose: &str,
    ) -> Result<Vec<String>> {
        let read = "SELECT pg_catalog.unnest(s.setconfig) FROM pg_catalog.pg_db_role_setting s \
                    JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase \
                    WHERE s.setrole = 0 AND d.datname = $1";
        let theirs: Vec<String> = source
            .query(read, &[&db.name])
            .await
            .map_err(|e| {
                Error::pg(
                    &e,
                    "reading the source database's settings (pg_db_role_setting)",
                )
            })?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if theirs.is_empty() {
            return Ok(Vec::new());
        }
        let admin = self
            .env
            .target_for(db)
            .with_dbname("postgres")
            .connect(purpose)
            .await?;
        let ours: HashSet<String> = admin
            .query(read, &[&db.target])
            .await
            .map_err(|e| {
                Error::pg(
                    &e,
                    "reading the target database's settings (pg_db_role_setting)",
                )
            })?
            .iter()
            .filter_map(|r| setting_parts(&r.get::<_, String>(0)).map(|(n, _)| n.to_lowercase()))
            .collect();
        let known: HashSet<String> = admin
            .query("SELECT name FROM pg_catalog.pg_settings", &[])
            .await
            .map_err(|e| Error::pg(&e, "reading the target server's settings (pg_settings)"))?
            .iter()
            .map(|r| r.get::<_, String>(0).to_lowercase())
            .collect();
        let mut applied = Vec::new();
        for entry in &theirs {
            let Some((name, value)) = setting_parts(entry) else {
                continue;
            };
            let key = name.to_lowercase();
            if ours.contains(&key) {
                continue;
            }
            // Custom settings (`app.x`) need no definition; others must exist on the target.
            if !key.contains('.') && !known.contains(&key) {
                tracing::warn!(database = %db.name, "the source database sets {name}, which the target server does not know; not carried over");
                continue;
            }
            let sql = alter_database_set(&db.target, name, value);
            match admin.batch_execute(&sql).await {
                Ok(()) => applied.push(format!("{name} = {value}")),
                Err(e) => {
                    let why = e
                        .as_db_error()
                        .map_or_else(|| e.to_string(), |d| d.message().to_string());
                    tracing::warn!(database = %db.name, "the source database sets {name} = {value}; the target refused it ({why}); set it yourself with ALTER DATABASE {} SET ...", quote_ident(&db.target));
                }
            }
        }
        if !applied.is_empty() {
            tracing::info!(database = %db.name, "target database {} given the source database's settings: {}", db.target, applied.join("; "));
        }
        Ok(applied)
    }

    /// Looks for the selected tables on the target. Returns true when they are all there and match
    /// the source (the schema is already provisioned), false when none is there (apply it), and an
    /// error otherwise.
    async fn compare_existing(
        &self,
        i: usize,
        db: &Database,
        source: &Client,
        target: &Client,
        names: &[QualifiedName],
    ) -> Result<bool> {
        let theirs = shapes(target, names).await?;
        if theirs.is_empty() {
            return Ok(false);
        }
        let mut there: Vec<String> = theirs.keys().map(ToString::to_string).collect();
        there.sort();
        if self.existing(i) == Existing::Refuse {
            return Err(Error::permanent(format!(
                "target database `{}` already has {} of the {} selected table(s) (existing = \"refuse\"):\n{}",
                db.target,
                there.len(),
                names.len(),
                bullets(&there)
            ))
            .hint("drop them (or the target database) and run again, or set existing = \"compare\" on the provision stage to continue when they match the source"));
        }
        let ours = shapes(source, names).await?;
        let differences = compare_shapes(names, &ours, &theirs);
        if differences.is_empty() {
            return Ok(true);
        }
        Err(Error::permanent(format!(
            "target database `{}` already has {} of the {} selected table(s), and the target does not match the source ({} difference(s)):\n{}",
            db.target,
            there.len(),
            names.len(),
            differences.len(),
            bullets(&differences)
        ))
        .hint(format!(
            "drop the target database (or the tables listed) and run again, so provision creates them from the source's schema; or make them match the source. `existing = \"compare\"` continues only when every selected table is there and matches; `existing = \"refuse\"` never reuses existing tables (the pre-data schema is in artifact `{}`)",
            pre_data_artifact(db)
        )))
    }

    /// Runs the stored pre-data SQL on the target database in one transaction: sent whole, as
    /// one simple-query message, on `target` when the script allows it ([`one_message`]), else
    /// (and to name the failing statement when that fails) with psql.
    async fn apply_pre_data(
        &self,
        cx: &StageContext,
        db: &Database,
        purpose: &str,
        target: Client,
    ) -> Result<()> {
        let name = pre_data_artifact(db);
        let sql = cx.store.artifact(&name).await?.ok_or_else(|| {
            Error::permanent(format!(
                "there is no pre-data schema for database `{}` (artifact `{name}`)",
                db.name
            ))
            .hint("run a schema_dump stage before provision (put it in provision's `after`)")
        })?;
        if let Some(script) = std::str::from_utf8(&sql).ok().and_then(one_message) {
            let started = std::time::Instant::now();
            let r = tokio::select! {
                r = target.batch_execute(&script) => r,
                _ = cx.cancel.cancelled() => {
                    // The message is one transaction: cancelled, none of it stays.
                    let _ = target.cancel_token().cancel_query(tokio_postgres::NoTls).await;
                    return Err(Error::interrupted());
                }
            };
            match r {
                Ok(()) => {
                    tracing::info!(stage = %cx.stage, database = %db.name, elapsed_ms = started.elapsed().as_millis() as u64, "pre-data schema applied to target database {} (one message)", db.target);
                    return Ok(());
                }
                // Nothing of it was applied (one implicit transaction): psql runs it again
                // statement by statement and names the one that fails, with its line.
                Err(e) => {
                    tracing::info!(stage = %cx.stage, database = %db.name, "the pre-data schema sent as one message failed ({e}); applying it with psql to find the failing statement");
                }
            }
        }
        drop(target);
        let tools = tokio::task::spawn_blocking(tools::find)
            .await
            .map_err(|e| Error::permanent(format!("internal: {e}")))??;
        // psql reads the script from a file, not a pipe: with --single-transaction, psql commits at
        // the end of its input, so a pipe cut short (pgferry killed mid-write) would commit half a
        // schema. A file is always read whole.
        let dir = tools::PrivateTempDir::new("pgferry-provision")?;
        let script = dir.path().join("pre-data.sql");
        std::fs::write(&script, &sql).map_err(|e| {
            Error::permanent(format!(
                "cannot write the pre-data script to {}: {e}",
                script.display()
            ))
        })?;
        let mut cmd = Command::new(tools.psql());
        cmd.arg("--no-psqlrc")
            .arg("--no-password")
            .arg("--quiet")
            .arg("--set=ON_ERROR_STOP=1")
            .arg("--single-transaction")
            .arg(format!("--file={}", script.display()));
        self.env.target_for(db).configure_child(&mut cmd, purpose);
        let started = std::time::Instant::now();
        let out = tools::run_tool(cmd, None, &cx.cancel).await?;
        if !out.status.success() {
            let e = tools::tool_failure(
                "psql",
                &out,
                "applying the pre-data schema (in one transaction, so nothing of it was applied)",
            );
            if e.hint.is_some() {
                return Err(e);
            }
            let err = &out.stderr;
            let hint = if err.contains("role \"") && err.contains("does not exist") {
                "create the source's roles on the target first (pg_dumpall --roles-only on the source, applied with psql on the target), or set no_owner = true and no_privileges = true on the schema_dump stage and rerun it (--rerun STAGE)".to_string()
            } else if err.contains("already exists") {
                "the target already has an object of that name: drop it (or start from an empty target database) and run again".to_string()
            } else if err.contains("extension") {
                "install the extension's package on the target server (on managed services: allow-list it) and run again".to_string()
            } else {
                format!(
                    "fix the cause named above and run again; the SQL is artifact `{name}` in the checkpoint store"
                )
            };
            return Err(e.hint(hint));
        }
        for line in out.stderr.lines().filter(|l| !l.trim().is_empty()) {
            tracing::warn!(stage = %cx.stage, database = %db.name, "psql: {line}");
        }
        tracing::info!(stage = %cx.stage, database = %db.name, elapsed_ms = started.elapsed().as_millis() as u64, "pre-data schema applied to target database {}", db.target);
        Ok(())
    }

    /// Creates or updates pgferry's publication on the source to publish exactly the selected
    /// tables: partitioned ones by their root where the version can
    /// ([`ServerVersion::publishes_partitioned_tables`]), else each leaf partition. Returns the
    /// number of tables published.
    async fn publish(
        &self,
        source: &Client,
        version: ServerVersion,
        selected: &[TableInfo],
    ) -> Result<usize> {
        let by_root = version.publishes_partitioned_tables();
        let name = publication_name(&self.env.plan.name);
        let q = quote_ident(&name);
        let unlogged: Vec<String> = selected
            .iter()
            .filter(|t| t.root.is_none() && t.unlogged)
            .map(|t| t.name.to_string())
            .collect();
        if !unlogged.is_empty() {
            tracing::warn!(
                "unlogged tables cannot be published, leaving them out of publication {name}: {}",
                unlogged.join(", ")
            );
        }
        let tables = publication::tables_to_publish(selected, by_root);
        let exists = publication::exists(source, &name, "the publication").await?;
        let options = publication::options(by_root);
        let sql = if !exists {
            publication::create_sql(&name, &tables, by_root)
        } else {
            let set = if tables.is_empty() {
                // SET TABLE needs at least one table: drop the current ones instead.
                let rows = source
                    .query(
                        "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) \
                         FROM pg_catalog.pg_publication_rel r \
                         JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid \
                         JOIN pg_catalog.pg_class c ON c.oid = r.prrelid \
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1",
                        &[&name],
                    )
                    .await
                    .map_err(|e| Error::pg(&e, "listing the publication's tables"))?;
                let current: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                if current.is_empty() {
                    String::new()
                } else {
                    format!("ALTER PUBLICATION {q} DROP TABLE {};", current.join(", "))
                }
            } else {
                format!("ALTER PUBLICATION {q} SET TABLE {};", tables.join(", "))
            };
            format!("BEGIN; ALTER PUBLICATION {q} SET ({options}); {set} COMMIT;")
        };
        source
            .batch_execute(&sql)
            .await
            .map_err(|e| {
                let err = Error::pg(
                    &e,
                    format!(
                        "{} publication {name}",
                        if exists { "updating" } else { "creating" }
                    ),
                );
                if err.hint.is_none() {
                    err.hint("the source role needs CREATE on the database and ownership of the selected tables (or superuser); a publication defined FOR ALL TABLES must be dropped first")
                } else {
                    err
                }
            })?;
        tracing::info!(
            "publication {name} {} with {} table(s)",
            if exists { "updated" } else { "created" },
            tables.len()
        );
        Ok(tables.len())
    }
}

/// Refuses tables that cannot replicate UPDATE and DELETE: publishing them would make those
/// statements fail on the source.
fn check_identities(selected: &[TableInfo]) -> Result<()> {
    let bad: Vec<String> = selected
        .iter()
        .filter(|t| t.kind == "r" && !t.unlogged && !t.has_usable_identity())
        .map(|t| t.name.to_string())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::permanent(format!(
        "{} selected table(s) have no primary key or replica identity; publishing them for CDC would make UPDATE and DELETE fail on the source: {}",
        bad.len(),
        bad.join(", ")
    ))
    .hint("add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX on a unique not-null index), or leave the tables out of the selection"))
}

/// `name=value` of a `setconfig` entry.
fn setting_parts(entry: &str) -> Option<(&str, &str)> {
    entry.split_once('=').filter(|(n, _)| !n.is_empty())
}

/// Settings whose value is a list of names (pg_dump's `variable_is_guc_list_quote`): each element
/// is its own literal, so `app, public` stays two schemas.
const LIST_SETTINGS: [&str; 6] = [
    "local_preload_libraries",
    "search_path",
    "session_preload_libraries",
    "shared_preload_libraries",
    "temp_tablespaces",
    "unix_socket_directories",
];

/// `ALTER DATABASE db SET name TO value`, everything quoted.
fn alter_database_set(database: &str, name: &str, value: &str) -> String {
    let quoted_name = name
        .split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".");
    let values = if LIST_SETTINGS.contains(&name.to_lowercase().as_str()) {
        split_list(value)
            .iter()
            .map(|v| quote_literal(v))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        quote_literal(value)
    };
    let values = if values.is_empty() {
        "''".to_string()
    } else {
        values
    };
    format!(
        "ALTER DATABASE {} SET {quoted_name} TO {values}",
        quote_ident(database)
    )
}

/// The elements of a list setting's stored value (`"$user", public`): split at commas outside
/// double quotes, trimmed, quotes removed (`""` inside them is one `"`).
fn split_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                current.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut current)),
            c if c.is_whitespace() && !quoted => {}
            c => current.push(c),
        }
    }
    if !current.is_empty() || !out.is_empty() {
        out.push(current);
    }
    out
}

fn bullets(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("  - {s}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A column as the comparison sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    name: String,
    ty: String,
    not_null: bool,
    position: i64,
}

impl Column {
    fn signature(&self) -> String {
        if self.not_null {
            format!("{} NOT NULL", self.ty)
        } else {
            self.ty.clone()
        }
    }
}

/// A relation's kind and columns.
#[derive(Debug, Clone)]
struct Shape {
    kind: String,
    columns: Vec<Column>,
}

/// The shapes of the named relations that exist on a server (search_path must be pg_catalog, so
/// that type names are qualified alike on both sides).
async fn shapes(
    client: &Client,
    names: &[QualifiedName],
) -> Result<BTreeMap<QualifiedName, Shape>> {
    let schemas: Vec<&str> = names.iter().map(|n| n.schema.as_str()).collect();
    let rels: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relkind::text, a.attname::text, \
                    pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) \
             FROM unnest($1::text[], $2::text[]) AS u(s, r) \
             JOIN pg_catalog.pg_namespace n ON n.nspname = u.s \
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.r \
             LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY 1, 2, 7",
            &[&schemas, &rels],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading table columns"))?;
    let mut out: BTreeMap<QualifiedName, Shape> = BTreeMap::new();
    for r in &rows {
        let key = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let shape = out.entry(key).or_insert_with(|| Shape {
            kind: r.get(2),
            columns: Vec::new(),
        });
        if let Some(name) = r.get::<_, Option<String>>(3) {
            shape.columns.push(Column {
                name,
                ty: r.get(4),
                not_null: r.get(5),
                position: r.get(6),
            });
        }
    }
    Ok(out)
}

fn kind_name(kind: &str) -> &'static str {
    match kind {
        "r" => "a table",
        "p" => "a partitioned table",
        "v" => "a view",
        "m" => "a materialized view",
        "f" => "a foreign table",
        "S" => "a sequence",
        "i" | "I" => "an index",
        "c" => "a composite type",
        _ => "another kind of relation",
    }
}

/// Every difference between the source's and the target's selected tables, one line each.
fn compare_shapes(
    names: &[QualifiedName],
    ours: &BTreeMap<QualifiedName, Shape>,
    theirs: &BTreeMap<QualifiedName, Shape>,
) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        let Some(src) = ours.get(name) else { continue };
        let Some(tgt) = theirs.get(name) else {
            out.push(format!("{name}: missing on the target"));
            continue;
        };
        if src.kind != tgt.kind {
            out.push(format!(
                "{name}: is {} on the source but {} on the target",
                kind_name(&src.kind),
                kind_name(&tgt.kind)
            ));
        }
        for c in &src.columns {
            match tgt.columns.iter().find(|t| t.name == c.name) {
                None => out.push(format!(
                    "{name}: column `{}` ({}) is missing on the target",
                    c.name,
                    c.signature()
                )),
                Some(t) if t.ty != c.ty || t.not_null != c.not_null => out.push(format!(
                    "{name}: column `{}` is {} on the source but {} on the target",
                    c.name,
                    c.signature(),
                    t.signature()
                )),
                Some(t) if t.position != c.position => out.push(format!(
                    "{name}: column `{}` is column {} on the source but column {} on the target",
                    c.name, c.position, t.position
                )),
                Some(_) => {}
            }
        }
        let src_names: HashSet<&str> = src.columns.iter().map(|c| c.name.as_str()).collect();
        for t in &tgt.columns {
            if !src_names.contains(t.name.as_str()) {
                out.push(format!(
                    "{name}: extra column `{}` ({}) on the target, not on the source",
                    t.name,
                    t.signature()
                ));
            }
        }
    }
    out
}

#[async_trait]
impl Stage for Provision {
    fn describe(&self) -> Vec<String> {
        let online = self.env.plan.has_kind(StageKind::Cdc);
        let mut out = Vec::new();
        for (i, db) in self.env.plan.databases.iter().enumerate() {
            let existing = match self.existing(i) {
                Existing::Compare => "tables already there must match the source",
                Existing::Refuse => "refused if any selected table is already there",
            };
            out.push(format!(
                "create target database {} if missing (encoding and collation of source database {}); apply its pre-data schema in one transaction ({existing})",
                db.target, db.name
            ));
            if online {
                out.push(format!(
                    "create or update publication {} on source database {} for the selected tables (partitioned tables by their root)",
                    publication_name(&self.env.plan.name),
                    db.name
                ));
                if crate::stages::cdc::ddl::replicates(&self.env.plan, i) {
                    out.push(format!(
                        "install the DDL capture on source database {} (event triggers and functions in schema {}; cleanup removes them)",
                        db.name,
                        crate::pg::names::CAPTURE_SCHEMA
                    ));
                }
            }
        }
        out
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        cx.for_each_database(
            self.env.plan.databases.iter().enumerate(),
            |i, db| async move {
                // Stopping drops the work: psql is killed and connections are closed, so the server
                // rolls back whatever was in flight (the schema is applied in one transaction).
                tokio::select! {
                    r = self.provision_database(cx, i, db) => r,
                    _ = cx.cancel.cancelled() => Err(Error::interrupted()),
                }
            },
        )
        .await
    }
}

/// The pre-data script as one simple-query message, when it can be sent so: every line that
/// starts with a backslash is one of pg_dump's `\restrict` / `\unrestrict` guards (psql
/// meta-commands, which only psql understands; dropped here, they protect psql's input only), and
/// the script's client encoding is UTF8 (the connection's; a script in another encoding goes to
/// psql, which converts). Sent whole, the server runs the statements as one implicit
/// transaction, as psql's `--single-transaction` does, without a round trip per statement.
fn one_message(sql: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    let mut utf8 = false;
    for line in sql.split_inclusive('\n') {
        if line.starts_with('\\') {
            let command = line.split_whitespace().next().unwrap_or("");
            if command == "\\restrict" || command == "\\unrestrict" {
                continue;
            }
            return None;
        }
        if let Some(rest) = line.trim_end().strip_prefix("SET client_encoding = ") {
            utf8 = rest == "'UTF8';";
            if !utf8 {
                return None;
            }
        }
        out.push_str(line);
    }
    utf8.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_data_script_is_sent_as_one_message_only_without_other_meta_commands() {
        let script = "\\restrict abc\nSET client_encoding = 'UTF8';\nCREATE TABLE t (a int);\n\\unrestrict abc\n";
        assert_eq!(
            one_message(script).as_deref(),
            Some("SET client_encoding = 'UTF8';\nCREATE TABLE t (a int);\n")
        );
        // A backslash line inside a statement is not at a line start after pg_dump's quoting,
        // but any other meta-command sends the script to psql.
        assert_eq!(
            one_message("SET client_encoding = 'UTF8';\n\\connect other\n"),
            None
        );
        assert_eq!(
            one_message("SET client_encoding = 'LATIN1';\nCREATE TABLE t ();\n"),
            None
        );
        // No encoding line: not known to be UTF8.
        assert_eq!(one_message("CREATE TABLE t ();\n"), None);
    }

    fn col(name: &str, ty: &str, not_null: bool, position: i64) -> Column {
        Column {
            name: name.into(),
            ty: ty.into(),
            not_null,
            position,
        }
    }

    #[test]
    fn database_settings_are_quoted() {
        assert_eq!(
            alter_database_set("my db", "search_path", "app, \"$user\", \"a\"\"b, c\""),
            "ALTER DATABASE \"my db\" SET \"search_path\" TO 'app', '$user', 'a\"b, c'"
        );
        assert_eq!(
            alter_database_set("d", "work_mem", "64MB"),
            "ALTER DATABASE \"d\" SET \"work_mem\" TO '64MB'"
        );
        assert_eq!(
            alter_database_set("d", "app.Note", "it's"),
            "ALTER DATABASE \"d\" SET \"app\".\"Note\" TO 'it''s'"
        );
        assert_eq!(setting_parts("a=b=c"), Some(("a", "b=c")));
    }

    #[test]
    fn compares_columns() {
        let a = QualifiedName::new("public", "a");
        let b = QualifiedName::new("public", "b");
        let ours: BTreeMap<_, _> = [
            (
                a.clone(),
                Shape {
                    kind: "r".into(),
                    columns: vec![col("id", "integer", true, 1), col("name", "text", false, 2)],
                },
            ),
            (
                b.clone(),
                Shape {
                    kind: "p".into(),
                    columns: vec![col("id", "integer", true, 1)],
                },
            ),
        ]
        .into();
        assert!(compare_shapes(&[a.clone(), b.clone()], &ours, &ours).is_empty());
        let theirs: BTreeMap<_, _> = [(
            a.clone(),
            Shape {
                kind: "r".into(),
                columns: vec![
                    col("id", "bigint", true, 1),
                    col("name", "text", false, 2),
                    col("extra", "integer", false, 3),
                ],
            },
        )]
        .into();
        let d = compare_shapes(&[a, b], &ours, &theirs);
        assert_eq!(
            d,
            vec![
                "public.a: column `id` is integer NOT NULL on the source but bigint NOT NULL on the target",
                "public.a: extra column `extra` (integer) on the target, not on the source",
                "public.b: missing on the target",
            ]
        );
    }
}
