//! The `schema_dump` stage: dumps the schema of each source database with the newest pg_dump
//! installed (`--section=pre-data --section=post-data --format=custom`, the checkpoint schema excluded), filters the
//! archive's table of contents down to the selected tables (the rule is in [`crate::pg::dump`]),
//! and stores the two halves pg_restore writes as artifacts: pre-data (what `provision` creates
//! before the load: schemas, types, functions, tables, ...) and post-data (what `post_data` builds
//! after it: indexes, constraints, triggers, ...). Large objects are not part of a schema-only dump;
//! `full_load` copies them.
//!
//! The catalog analysis and pg_dump share one snapshot (`pg_export_snapshot` + `--snapshot`), so
//! the filter matches the archive exactly. Each database is checkpointed once both artifacts are
//! stored; a resumed run skips it. Passwords reach the child processes only in their environment.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::process::Command;

use super::{Env, Stage, StageContext, post_data_artifact, pre_data_artifact};
use crate::error::{Error, Result};
use crate::pg::catalog;
use crate::pg::dump;
use crate::pg::ident::{QualifiedName, quote_ident};
use crate::pg::names::publication_name;
use crate::pg::tools::{self, PgTools, PrivateTempDir};
use crate::pg::version::{self, ServerVersion};
use crate::plan::raw::SchemaDumpOptions;
use crate::plan::{Database, StageOptions};
use crate::select::Selection;

pub struct SchemaDump {
    env: Arc<Env>,
    index: usize,
}

impl SchemaDump {
    pub fn new(env: Arc<Env>, index: usize) -> SchemaDump {
        SchemaDump { env, index }
    }

    fn options(&self, db: usize) -> SchemaDumpOptions {
        match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::SchemaDump(o)) => o.clone(),
            _ => SchemaDumpOptions::default(),
        }
    }

    /// Dumps one database and stores its two artifacts; returns the checkpoint detail.
    async fn dump_database(
        &self,
        cx: &StageContext,
        i: usize,
        db: &Database,
    ) -> Result<serde_json::Value> {
        let opts = self.options(i);
        let purpose = format!("schema_dump {}", cx.stage);
        let conn = self.env.source_for(db);
        let client = conn.connect(&purpose).await?;

        // One snapshot for our catalog reads and for pg_dump. (With search_path = pg_catalog the
        // objects we name in messages come out schema-qualified.)
        client
            .batch_execute(
                "SET search_path = pg_catalog; BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            )
            .await
            .map_err(|e| Error::pg(&e, "starting a read-only transaction"))?;
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version'), pg_catalog.pg_export_snapshot()",
                &[],
            )
            .await
            .map_err(|e| Error::pg(&e, "exporting a snapshot for pg_dump"))?;
        let (version_num, snapshot): (i32, String) = (row.get(0), row.get(2));
        let source_version = ServerVersion::from_num(u32::try_from(version_num).unwrap_or(0));
        // The target's version too: the dump is applied there with the psql next to pg_dump.
        // (The plan's target database may not exist yet: then the server's `postgres` database.)
        let target_version = match self.env.target.connect_versioned(&purpose).await {
            Ok((_, v)) => v,
            Err(e) if e.sqlstate.as_deref() == Some("3D000") => {
                self.env
                    .target
                    .with_dbname("postgres")
                    .connect_versioned(&purpose)
                    .await
                    .map_err(|e| e.context("reading the target server's version"))?
                    .1
            }
            Err(e) => return Err(e.context("reading the target server's version")),
        };
        // Searched for since the stage started (see `run`); found once per process.
        let tools: &PgTools = tokio::task::spawn_blocking(tools::find)
            .await
            .map_err(|e| Error::permanent(format!("internal: {e}")))??;
        tools.check_can_dump(source_version, target_version)?;
        tracing::info!(stage = %cx.stage, database = %db.name, "source PostgreSQL {source_version}, target PostgreSQL {target_version}: dumping with {}", tools.describe());

        let state_schema = &self.env.plan.state.schema;
        let all = catalog::tables_unsized(&client, state_schema).await?;
        let selection = Selection::new(&db.tables, &db.exclude);
        let (selected, unselected): (Vec<QualifiedName>, Vec<QualifiedName>) = {
            let chosen: std::collections::HashSet<&QualifiedName> =
                catalog::select(&all, &selection)
                    .into_iter()
                    .map(|t| &t.name)
                    .collect();
            let (s, u): (Vec<_>, Vec<_>) = all.iter().partition(|t| chosen.contains(&t.name));
            (
                s.into_iter().map(|t| t.name.clone()).collect(),
                u.into_iter().map(|t| t.name.clone()).collect(),
            )
        };
        let (filter, report) = dump::analyze_selection(
            &client,
            &selected,
            &unselected,
            &publication_name(&self.env.plan.name),
        )
        .await?;
        cx.check_cancelled()?;

        let dir = PrivateTempDir::new("pgferry-schema")?;
        let archive = dir.path().join("schema.dump");
        let mut cmd = Command::new(tools.pg_dump());
        // The pre-data and post-data sections, not `--schema-only`: that one drops the
        // MATERIALIZED VIEW DATA entries post_data needs to refresh them. Large objects are
        // copied by full_load.
        cmd.arg("--section=pre-data")
            .arg("--section=post-data")
            .arg("--no-blobs")
            .arg("--encoding=UTF8")
            .arg("--format=custom")
            .arg("--no-password")
            .arg("--no-sync")
            .arg(format!("--snapshot={snapshot}"))
            // A quoted pattern matches the name exactly.
            .arg(format!("--exclude-schema={}", quote_ident(state_schema)))
            // The DDL capture's functions (`ddl = "replicate"`), when a dump is taken again.
            .arg(format!(
                "--exclude-schema={}",
                quote_ident(crate::pg::names::CAPTURE_SCHEMA)
            ))
            .arg(format!("--file={}", archive.display()));
        conn.configure_child(&mut cmd, &purpose);
        let started = std::time::Instant::now();
        let out = tools::run_tool(cmd, None, &cx.cancel).await?;
        if !out.status.success() {
            return Err(tools::tool_failure(
                "pg_dump",
                &out,
                &format!("dumping the schema of source database `{}`", db.name),
            )
            .hint_if_none("pg_dump must be able to read every object of the database: run as its owner or a superuser (or grant pg_read_all_data), and check the message above"));
        }
        for line in out.stderr.lines().filter(|l| !l.trim().is_empty()) {
            tracing::warn!(stage = %cx.stage, database = %db.name, "{line}");
        }
        // pg_dump has its snapshot; ours can go.
        let _ = client.batch_execute("COMMIT").await;
        drop(client);

        // The table of contents, filtered to the selection.
        let mut cmd = Command::new(tools.pg_restore());
        cmd.arg("--list").arg(&archive);
        let out = tools::run_tool(cmd, None, &cx.cancel).await?;
        if !out.status.success() {
            return Err(tools::tool_failure(
                "pg_restore",
                &out,
                &format!("listing the schema dump of source database `{}`", db.name),
            ));
        }
        let toc = String::from_utf8_lossy(&out.stdout).into_owned();
        let filtered = dump::filter_toc(&toc, &filter);
        let list = dir.path().join("selected.list");
        std::fs::write(&list, &filtered.list)
            .map_err(|e| Error::permanent(format!("writing {}: {e}", list.display())))?;

        // The two sections are written by two pg_restore processes at once (each reads the whole
        // archive; ~60 ms apiece on PostgreSQL's regression database).
        cx.check_cancelled()?;
        let write_section = |section: &'static str| {
            let file = dir.path().join(format!("{section}.sql"));
            let mut cmd = Command::new(tools.pg_restore());
            cmd.arg(format!("--use-list={}", list.display()))
                .arg(format!("--section={section}"))
                .arg(format!("--file={}", file.display()));
            if opts.no_owner {
                cmd.arg("--no-owner");
            }
            if opts.no_privileges {
                cmd.arg("--no-privileges");
            }
            cmd.arg(&archive);
            async move {
                let out = tools::run_tool(cmd, None, &cx.cancel).await?;
                if !out.status.success() {
                    return Err(tools::tool_failure(
                        "pg_restore",
                        &out,
                        &format!(
                            "writing the {section} schema of source database `{}`",
                            db.name
                        ),
                    ));
                }
                let sql = std::fs::read(&file)
                    .map_err(|e| Error::permanent(format!("reading {}: {e}", file.display())))?;
                // A pg_dump newer than the target writes settings the target may not know.
                Ok::<_, Error>(version::script_for_target(&sql, target_version))
            }
        };
        let (pre, post) = tokio::try_join!(write_section("pre-data"), write_section("post-data"))?;
        let sections = [pre, post];
        cx.check_cancelled()?;
        cx.store
            .put_artifact(&pre_data_artifact(db), &sections[0])
            .await?;
        cx.store
            .put_artifact(&post_data_artifact(db), &sections[1])
            .await?;

        for fk in &report.dropped_foreign_keys {
            tracing::warn!(stage = %cx.stage, database = %db.name, "leaving out {fk}: it references a table that is not selected");
        }
        for obj in &report.dropped_objects {
            tracing::warn!(stage = %cx.stage, database = %db.name, "leaving out {obj}: it depends on a table that is not selected");
        }
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            stage = %cx.stage,
            database = %db.name,
            pre_data_bytes = sections[0].len(),
            post_data_bytes = sections[1].len(),
            entries = filtered.entries,
            left_out = filtered.dropped.len(),
            "schema dumped with {}",
            tools.describe()
        );
        Ok(serde_json::json!({
            "pg_dump": tools.version,
            "source_version": row.get::<_, String>(1),
            "target_version": target_version.to_string(),
            "pre_data_bytes": sections[0].len(),
            "post_data_bytes": sections[1].len(),
            "toc_entries": filtered.entries,
            "left_out_entries": filtered.dropped.len(),
            "objects": filtered.kept_by_desc,
            "selected_tables": selected.len(),
            "unselected_tables": report.unselected_tables,
            "dropped_foreign_keys": report.dropped_foreign_keys,
            "dropped_objects": report.dropped_objects,
            "elapsed_ms": ms,
        }))
    }
}

/// Sets a hint only when the error has none yet (a more specific one wins).
trait HintIfNone {
    fn hint_if_none(self, hint: &str) -> Self;
}

impl HintIfNone for Error {
    fn hint_if_none(self, hint: &str) -> Error {
        if self.hint.is_some() {
            self
        } else {
            self.hint(hint)
        }
    }
}

fn selection_text(db: &Database) -> String {
    let mut s = if db.tables.is_empty() {
        "every table".to_string()
    } else {
        format!("tables {}", db.tables.join(", "))
    };
    if !db.exclude.is_empty() {
        s.push_str(&format!(" except {}", db.exclude.join(", ")));
    }
    s
}

#[async_trait]
impl Stage for SchemaDump {
    fn describe(&self) -> Vec<String> {
        let tool = match tools::find() {
            Ok(t) => t.describe(),
            Err(e) => format!("pg_dump (not found: {})", e.message),
        };
        self.env
            .plan
            .databases
            .iter()
            .enumerate()
            .map(|(i, db)| {
                let o = self.options(i);
                let mut flags = Vec::new();
                if o.no_owner {
                    flags.push("no owners");
                }
                if o.no_privileges {
                    flags.push("no privileges");
                }
                let flags = if flags.is_empty() {
                    String::new()
                } else {
                    format!(", {}", flags.join(", "))
                };
                format!(
                    "dump the schema of source database {} ({}{flags}) with {tool}; store its pre-data and post-data sections",
                    db.name,
                    selection_text(db)
                )
            })
            .collect()
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        // The client programs are searched for (pg_config, `pg_dump --version` of every candidate
        // directory: ~90 ms with Debian's wrapper scripts) while the first database's sessions
        // open; `dump_database` waits for the result, which is kept for the process.
        drop(tokio::task::spawn_blocking(|| {
            let _ = tools::find();
        }));
        cx.for_each_database(
            self.env.plan.databases.iter().enumerate(),
            |i, db| async move {
                // Stopping drops the work: child processes are killed, connections closed (the
                // server then aborts their statements), the temporary directory removed.
                tokio::select! {
                    r = self.dump_database(cx, i, db) => {
                        r.map_err(|e| e.context(format!("source database `{}`", db.name)))
                    }
                    _ = cx.cancel.cancelled() => Err(Error::interrupted()),
                }
            },
        )
        .await
    }
}
