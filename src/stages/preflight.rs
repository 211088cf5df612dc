//! The `preflight` stage: checks both servers for each database before anything is changed, and
//! reports every finding at once with the fix to apply. Reachability, versions, the selection, read
//! privileges, extensions, unlogged tables, large objects; and, when the plan has a `cdc` stage,
//! `wal_level`, replication slots and WAL senders, the replication privilege, replica identities and
//! the target's ability to silence triggers. Read-only: every session it opens is read-only.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use tokio_postgres::Client;

use super::replica_identity::{self, Change, Mode};
use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::pg::catalog::{self, ServerInfo, TableInfo};
use crate::pg::connect::ConnInfo;
use crate::pg::privileges;
use crate::pg::version;
use crate::plan::StageKind;
use crate::plan::{Database, StageOptions};
use crate::select::{Glob, Selection};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warning,
    Info,
}

/// One thing preflight found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    pub database: String,
    /// A short, stable name of the check (`wal_level`, `replica_identity`, ...).
    pub check: &'static str,
    pub message: String,
    pub hint: Option<String>,
    /// Every table the finding is about, when it is about tables (the message names ten at most).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Info => "info",
        };
        write!(f, "{level}: [{}] {}", self.database, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n    fix: {h}")?;
        }
        Ok(())
    }
}

/// What preflight learned about one database.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseReport {
    pub database: String,
    pub target: String,
    pub source_server: Option<ServerInfo>,
    pub target_server: Option<ServerInfo>,
    pub target_exists: Option<bool>,
    pub tables: Vec<TableInfo>,
    pub findings: Vec<Finding>,
}

/// Opens a read-only session.
async fn read_only(conn: &ConnInfo, purpose: &str) -> Result<Client> {
    let client = conn.connect(purpose).await?;
    client
        .batch_execute("SET default_transaction_read_only = on; SET statement_timeout = '60s'")
        .await
        .map_err(|e| Error::pg(&e, "configuring a read-only session"))?;
    Ok(client)
}

/// Inspects one database on both servers. Never fails for what it finds; only the store or a bug
/// makes it fail.
pub async fn inspect(env: &Env, db: &Database, online: bool) -> DatabaseReport {
    let mut r = DatabaseReport {
        database: db.name.clone(),
        target: db.target.clone(),
        source_server: None,
        target_server: None,
        target_exists: None,
        tables: Vec::new(),
        findings: Vec::new(),
    };
    let dbname = db.name.clone();
    let mut add = |level, check, message: String, hint: Option<String>| {
        r.findings.push(Finding {
            level,
            database: dbname.clone(),
            check,
            message,
            hint,
            tables: Vec::new(),
        });
    };

    // The source.
    let source_conn = env.source_for(db);
    let source = match read_only(&source_conn, "preflight").await {
        Ok(c) => Some(c),
        Err(e) => {
            add(
                Level::Error,
                "source_reachable",
                format!("cannot connect to the source {}: {}", source_conn.describe(), e.message),
                e.hint.clone().or(Some("check the [source] url, the password, and that the server accepts connections from here".into())),
            );
            None
        }
    };
    // The target: its database may not exist yet (provision creates it).
    let target_conn = env.target_for(db);
    let target = match read_only(&target_conn, "preflight").await {
        Ok(c) => {
            r.target_exists = Some(true);
            Some(c)
        }
        Err(e) if e.sqlstate.as_deref() == Some("3D000") => {
            r.target_exists = Some(false);
            match read_only(&target_conn.with_dbname("postgres"), "preflight").await {
                Ok(c) => Some(c),
                Err(e2) => {
                    add(
                        Level::Error,
                        "target_reachable",
                        format!(
                            "cannot connect to the target server {}: {}",
                            target_conn.describe(),
                            e2.message
                        ),
                        e2.hint.clone(),
                    );
                    None
                }
            }
        }
        Err(e) => {
            add(
                Level::Error,
                "target_reachable",
                format!("cannot connect to the target {}: {}", target_conn.describe(), e.message),
                e.hint.clone().or(Some("check the [target] url, the password, and that the server accepts connections from here".into())),
            );
            None
        }
    };
    let mut findings = std::mem::take(&mut r.findings);

    if let Some(src) = &source
        && let Err(e) = check_source(env, db, online, src, &mut r, &mut findings).await
    {
        findings.push(Finding {
            level: Level::Error,
            database: db.name.clone(),
            check: "source_catalog",
            message: e.to_string(),
            hint: None,
            tables: Vec::new(),
        });
    }
    if let Some(tgt) = &target
        && let Err(e) = check_target(db, online, tgt, &mut r, &mut findings).await
    {
        findings.push(Finding {
            level: Level::Error,
            database: db.name.clone(),
            check: "target_catalog",
            message: e.to_string(),
            hint: None,
            tables: Vec::new(),
        });
    }
    if let (Some(src), Some(tgt)) = (&source, &target)
        && let Err(e) = check_pair(db, src, tgt, &r, &mut findings).await
    {
        findings.push(Finding {
            level: Level::Error,
            database: db.name.clone(),
            check: "compare",
            message: e.to_string(),
            hint: None,
            tables: Vec::new(),
        });
    }
    if online
        && super::fallback::planned(env)
        && let (Some(s), Some(t), Some(tgt)) = (&r.source_server, &r.target_server, &target)
    {
        match super::fallback::preflight_findings(env, db, s, t, tgt).await {
            Ok(f) => findings.extend(f),
            Err(e) => findings.push(Finding {
                level: Level::Error,
                database: db.name.clone(),
                check: "fallback",
                message: e.to_string(),
                hint: None,
                tables: Vec::new(),
            }),
        }
    }
    findings.sort_by_key(|f| f.level);
    r.findings = findings;
    r
}

async fn check_source(
    env: &Env,
    db: &Database,
    online: bool,
    client: &Client,
    r: &mut DatabaseReport,
    out: &mut Vec<Finding>,
) -> Result<()> {
    let mut add = |level, check, message: String, hint: Option<&str>| {
        out.push(Finding {
            level,
            database: db.name.clone(),
            check,
            message,
            hint: hint.map(str::to_string),
            tables: Vec::new(),
        });
    };
    let info = catalog::server_info(client).await?;
    let all = catalog::tables(client, &env.plan.state.schema).await?;
    let selection = Selection::new(&db.tables, &db.exclude);
    // Patterns that select nothing are almost always typos.
    for pattern in &db.tables {
        if let Ok(g) = Glob::parse(pattern)
            && !all
                .iter()
                .any(|t| g.matches(&t.selection_name().schema, &t.selection_name().name))
        {
            add(
                Level::Error,
                "selection",
                format!(
                    "the pattern `{pattern}` in `tables` matches no table of source database {}",
                    db.name
                ),
                Some(
                    "check the spelling (patterns are schema.table, case-sensitive), or remove the pattern",
                ),
            );
        }
    }
    let selected: Vec<TableInfo> = catalog::select(&all, &selection)
        .into_iter()
        .cloned()
        .collect();
    if selected.is_empty() && !all.is_empty() {
        add(
            Level::Error,
            "selection",
            format!("no table of source database {} is selected", db.name),
            Some("check `tables` and `exclude` in the [[databases]] entry"),
        );
    } else if all.is_empty() {
        add(
            Level::Warning,
            "selection",
            format!("source database {} has no tables", db.name),
            None,
        );
    }
    let unreadable: Vec<String> = selected
        .iter()
        .filter(|t| !t.can_select)
        .map(|t| t.name.to_string())
        .collect();
    if !unreadable.is_empty() {
        add(
            Level::Error,
            "privileges",
            format!(
                "role {} cannot read {} selected table(s): {}",
                info.current_user,
                unreadable.len(),
                short_list(&unreadable)
            ),
            Some(if info.server_version().has_pg_read_all_data() {
                "GRANT SELECT ON ALL TABLES IN SCHEMA ... TO the migration role (or GRANT pg_read_all_data)"
            } else {
                "GRANT SELECT ON ALL TABLES IN SCHEMA ... TO the migration role"
            }),
        );
    }
    let unlogged: Vec<String> = selected
        .iter()
        .filter(|t| t.unlogged)
        .map(|t| t.name.to_string())
        .collect();
    if !unlogged.is_empty() {
        let (level, hint) = if online {
            (
                Level::Warning,
                "logical decoding does not see unlogged tables: their rows are copied again after the cutover fence, so keep them small, or make them logged (ALTER TABLE ... SET LOGGED)",
            )
        } else {
            (Level::Info, "they are copied like any other table")
        };
        add(
            level,
            "unlogged_tables",
            format!(
                "{} unlogged table(s): {}",
                unlogged.len(),
                short_list(&unlogged)
            ),
            Some(hint),
        );
    }
    let lobs = catalog::large_object_count(client).await?;
    if lobs > 0 {
        let (level, hint) = if online {
            (
                Level::Warning,
                "logical decoding does not carry large objects: they are copied during the full load and again after the cutover fence",
            )
        } else {
            (Level::Info, "they are copied with the data")
        };
        add(
            level,
            "large_objects",
            format!("{lobs} large object(s) in source database {}", db.name),
            Some(hint),
        );
    }
    if online {
        let wal_level = catalog::setting(client, "wal_level").await?;
        if wal_level != "logical" {
            add(
                Level::Error,
                "wal_level",
                format!("source wal_level is `{wal_level}`; online migration needs `logical`"),
                Some(
                    "ALTER SYSTEM SET wal_level = logical; then restart the source server (on managed services: set the logical replication parameter)",
                ),
            );
        }
        let (max_slots, used_slots, max_senders, used_senders) =
            catalog::replication_capacity(client).await?;
        // One slot per database, and one more for a temporary slot when a load resumes.
        let need = env.plan.databases.len() as i64 + 1;
        if max_slots - used_slots < need {
            add(
                Level::Error,
                "replication_slots",
                format!(
                    "the source has {} free replication slot(s) of {max_slots}; this plan needs {need}",
                    max_slots - used_slots
                ),
                Some(
                    "raise max_replication_slots (restart needed), or drop unused slots (SELECT * FROM pg_replication_slots)",
                ),
            );
        }
        if max_senders - used_senders < need {
            add(
                Level::Error,
                "wal_senders",
                format!(
                    "the source has {} free WAL sender(s) of {max_senders}; this plan needs {need}",
                    max_senders - used_senders
                ),
                Some("raise max_wal_senders (restart needed)"),
            );
        }
        if !info.is_superuser && !info.can_replicate {
            add(
                Level::Error,
                "replication_privilege",
                format!("source role {} may not replicate", info.current_user),
                Some(
                    "ALTER ROLE ... REPLICATION (on managed services: grant the provider's replication role, e.g. rds_replication)",
                ),
            );
        }
        if !info.is_superuser {
            managed_source_findings(env, db, client, &info, &selected, out).await?;
        }
        let lacking = replica_identity::lacking(&selected);
        let mode = env
            .plan
            .databases
            .iter()
            .position(|d| d.name == db.name)
            .map_or(Mode::Refuse, |i| replica_identity::mode(&env.plan, i));
        if !lacking.is_empty() {
            let finding = if mode == Mode::Refuse {
                let names: Vec<String> = lacking.iter().map(|t| t.name.to_string()).collect();
                let generated: Vec<String> = lacking
                    .iter()
                    .filter(|t| t.identity_generated)
                    .map(|t| t.name.to_string())
                    .collect();
                let generated = if generated.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({}: the key has a generated column, which logical replication does not send)",
                        short_list(&generated)
                    )
                };
                Finding {
                    level: Level::Error,
                    database: db.name.clone(),
                    check: "replica_identity",
                    message: format!(
                        "{} table(s) have no primary key or replica identity, so UPDATE and DELETE cannot be replicated (and would fail on the source once published): {}{generated}",
                        names.len(),
                        short_list(&names)
                    ),
                    hint: Some(
                        "add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL (or USING INDEX on a unique not-null index), or set replica_identity = \"index\" (or \"full\") on the provision stage to have provision do it for them (and cleanup undo it)".into(),
                    ),
                    tables: names,
                }
            } else {
                let changes = replica_identity::changes(client, mode, &lacking).await?;
                let indexed = changes.iter().filter(|c| c.index.is_some()).count();
                Finding {
                    level: Level::Info,
                    database: db.name.clone(),
                    check: "replica_identity",
                    message: format!(
                        "provision will give {} table(s) without a primary key a replica identity ({indexed} USING INDEX, {} FULL), restored by cleanup: {}",
                        changes.len(),
                        changes.len() - indexed,
                        short_list(&changes.iter().map(Change::describe).collect::<Vec<_>>())
                    ),
                    hint: None,
                    tables: changes.iter().map(Change::describe).collect(),
                }
            };
            out.push(finding);
        }
    }
    let index = env.plan.databases.iter().position(|d| d.name == db.name);
    if online && index.is_some_and(|i| crate::stages::cdc::ddl::replicates(&env.plan, i)) {
        ddl_capture_findings(db, client, &info, out).await?;
    }
    r.source_server = Some(info);
    r.tables = selected;
    Ok(())
}

/// Whether the plan's cutover fences the source read-only (`fence = "read_only"`).
fn plan_fences(env: &Env) -> bool {
    env.plan.stages.iter().any(|s| {
        s.kind == StageKind::Cutover
            && matches!(s.options.first(), Some(StageOptions::Cutover(o)) if o.read_only_fence())
    })
}

/// An online migration whose source role is not a superuser (a managed service's admin): what it
/// may do, and what it cannot (the publication needs the tables' ownership and CREATE on the
/// database, the fence the database's ownership and the right to end the application's sessions).
async fn managed_source_findings(
    env: &Env,
    db: &Database,
    client: &Client,
    info: &ServerInfo,
    selected: &[TableInfo],
    out: &mut Vec<Finding>,
) -> Result<()> {
    let mut add = |level, check, message: String, hint: Option<String>, tables: Vec<String>| {
        out.push(Finding {
            level,
            database: db.name.clone(),
            check,
            message,
            hint,
            tables,
        });
    };
    let tables: Vec<(String, String)> = selected
        .iter()
        .map(|t| (t.name.schema.clone(), t.name.name.clone()))
        .collect();
    let caps = privileges::source_capabilities(client, &db.name, &tables).await?;
    let role = &info.current_user;
    if !caps.not_owned.is_empty() {
        add(
            Level::Error,
            "source_ownership",
            format!(
                "source role {role} does not own {} selected table(s) (nor has their owner's privileges), which the publication (CREATE PUBLICATION ... FOR TABLE) needs: {}",
                caps.not_owned.len(),
                short_list(&caps.not_owned)
            ),
            Some(format!(
                "GRANT the tables' owner role TO {role} (a managed service's admin may grant itself the application's role), or leave those tables out of the selection"
            )),
            caps.not_owned.clone(),
        );
    }
    if !caps.may_create_publication {
        add(
            Level::Error,
            "source_publication",
            format!(
                "source role {role} may not create the migration's publication in database {}",
                db.name
            ),
            Some(format!(
                "GRANT CREATE ON DATABASE {} TO {role}",
                crate::pg::ident::quote_ident(&db.name)
            )),
            Vec::new(),
        );
    }
    let fence = plan_fences(env);
    if fence && !caps.owns_database {
        add(
            Level::Error,
            "fence",
            format!(
                "the cutover's fence sets default_transaction_read_only on source database {} (ALTER DATABASE), which needs its owner's privileges; role {role} does not have them",
                db.name
            ),
            Some(format!(
                "GRANT the database owner's role TO {role}, or set fence = \"revoke_writes\" on the cutover (it takes the write privileges on the selected tables instead, and needs no session ended)"
            )),
            Vec::new(),
        );
    }
    let stuck = if fence {
        privileges::sessions_it_cannot_end(client, &db.name).await?
    } else {
        Vec::new()
    };
    if !stuck.is_empty() {
        let list: Vec<String> = stuck.iter().map(|(r, n)| format!("{r} ({n})")).collect();
        add(
            Level::Warning,
            "fence",
            format!(
                "sessions of role(s) {} are connected to source database {} and role {role} may not end them: the cutover refuses to fence while such sessions remain",
                list.join(", "),
                db.name
            ),
            Some(format!(
                "GRANT pg_signal_backend TO {role} (the managed services' admin roles have it), or GRANT those roles TO {role}, or set fence = \"revoke_writes\" on the cutover (it ends no session)"
            )),
            Vec::new(),
        );
    }
    add(
        Level::Info,
        "source_role",
        format!(
            "source role {role} is not a superuser: REPLICATION {}, owns {} of {} selected table(s){}",
            if info.can_replicate { "yes" } else { "no" },
            selected.len() - caps.not_owned.len(),
            selected.len(),
            if !fence {
                String::new()
            } else if caps.signal_backend {
                "; the fence ends the application's sessions as a member of pg_signal_backend (any role but a superuser)".into()
            } else {
                "; the fence may end only the sessions of roles it is a member of (not a member of pg_signal_backend)".into()
            }
        ),
        None,
        Vec::new(),
    );
    Ok(())
}

/// `ddl = "replicate"`: the source must send logical decoding messages (14+) and let the role
/// create the capture's event triggers.
async fn ddl_capture_findings(
    db: &Database,
    client: &Client,
    info: &catalog::ServerInfo,
    out: &mut Vec<Finding>,
) -> Result<()> {
    let mut problems = Vec::new();
    if !info.server_version().pgoutput_messages() {
        problems.push(format!(
            "the source is PostgreSQL {}, whose pgoutput cannot carry the captured statements (the `messages` option is 14+)",
            info.major()
        ));
    }
    if !crate::pg::event_trigger::can_install(client).await? {
        problems.push(format!(
            "role {} may not create event triggers (a superuser may; on Amazon RDS a member of rds_superuser)",
            info.current_user
        ));
    }
    if !problems.is_empty() {
        out.push(Finding {
            level: Level::Error,
            database: db.name.clone(),
            check: "ddl_capture",
            message: format!(
                "the cdc stage has ddl = \"replicate\", which this source cannot do: {}",
                problems.join("; ")
            ),
            hint: Some(
                "connect as a role that may create event triggers on a source of PostgreSQL 14 or later, or set ddl = \"stop\" on the cdc stage (cdc then stops when a replicated table's columns change, naming the difference)".into(),
            ),
            tables: Vec::new(),
        });
    }
    Ok(())
}

async fn check_target(
    db: &Database,
    online: bool,
    client: &Client,
    r: &mut DatabaseReport,
    out: &mut Vec<Finding>,
) -> Result<()> {
    let mut add = |level, check, message: String, hint: Option<&str>| {
        out.push(Finding {
            level,
            database: db.name.clone(),
            check,
            message,
            hint: hint.map(str::to_string),
            tables: Vec::new(),
        });
    };
    let info = catalog::server_info(client).await?;
    if r.target_exists == Some(false) {
        if info.is_superuser || info.can_create_db {
            add(
                Level::Info,
                "target_database",
                format!(
                    "target database {} does not exist; provision will create it",
                    db.target
                ),
                None,
            );
        } else {
            add(
                Level::Error,
                "target_database",
                format!(
                    "target database {} does not exist and role {} may not create databases",
                    db.target, info.current_user
                ),
                Some("create the database by hand, or ALTER ROLE ... CREATEDB"),
            );
        }
    }
    // What cdc will do: it tries the SET (a superuser, a grant of SET on 15+, or a managed
    // service's hook may allow it), so preflight asks the server the same way.
    let may_set_role = crate::stages::cdc::managed::can_set_replication_role(client).await?;
    if online {
        let (message, hint) = if may_set_role {
            (
                format!(
                    "apply mode: replica (target role {} may set session_replication_role, so target triggers and foreign keys stay quiet while cdc applies)",
                    info.current_user
                ),
                None,
            )
        } else {
            (
                format!(
                    "apply mode: managed (target role {} is not a superuser and may not set session_replication_role): while cdc applies, the target's user triggers are disabled and its foreign keys dropped, recorded in the target database; the cutover puts them back after the drain (foreign keys NOT VALID, validated once the write downtime is over)",
                    info.current_user
                ),
                Some(if info.server_version().has_grant_set_on_parameter() {
                    "this needs the role to own the target tables (it does when provision creates them as this role); a superuser may instead GRANT SET ON PARAMETER session_replication_role TO the role, which keeps foreign keys in place during cdc"
                } else {
                    "this needs the role to own the target tables (it does when provision creates them as this role)"
                }),
            )
        };
        add(Level::Info, "apply_mode", message, hint);
        // The managed mode alters the target's tables: an existing target must be the role's.
        if !may_set_role && r.target_exists == Some(true) {
            let foreign = privileges::tables_not_owned(client).await?;
            if !foreign.is_empty() {
                add(
                    Level::Error,
                    "target_ownership",
                    format!(
                        "target role {} does not own {} table(s) of target database {}, whose triggers and foreign keys the managed apply mode must hold: {}",
                        info.current_user,
                        foreign.len(),
                        db.target,
                        short_list(&foreign)
                    ),
                    Some(
                        "let provision create the tables as this role (drop the target database, or point the plan at a new one), or GRANT the tables' owner role to it",
                    ),
                );
            }
        }
    }
    r.target_server = Some(info);
    Ok(())
}

async fn check_pair(
    db: &Database,
    src: &Client,
    tgt: &Client,
    r: &DatabaseReport,
    out: &mut Vec<Finding>,
) -> Result<()> {
    let mut add = |level, check, message: String, hint: Option<String>| {
        out.push(Finding {
            level,
            database: db.name.clone(),
            check,
            message,
            hint,
            tables: Vec::new(),
        });
    };
    if let (Some(s), Some(t)) = (&r.source_server, &r.target_server) {
        let (sv, tv) = (s.server_version(), t.server_version());
        if let Some(why) = version::pair_refusal(sv, tv) {
            add(
                Level::Error,
                "versions",
                format!(
                    "cannot migrate from PostgreSQL {} to PostgreSQL {}: {why}",
                    s.version, t.version
                ),
                Some(format!(
                    "migrate from a source of PostgreSQL {}-{} to a target of the same or a newer major version (upgrade an older source in place first, e.g. with pg_upgrade)",
                    version::OLDEST_SUPPORTED_MAJOR,
                    version::NEWEST_TESTED_MAJOR
                )),
            );
        } else {
            add(
                Level::Info,
                "versions",
                format!(
                    "source PostgreSQL {} -> target PostgreSQL {}",
                    s.version, t.version
                ),
                None,
            );
            if tv.major() > version::NEWEST_TESTED_MAJOR {
                add(
                    Level::Warning,
                    "versions",
                    format!(
                        "target PostgreSQL {} is newer than the newest version pgferry is tested with ({})",
                        t.version,
                        version::NEWEST_TESTED_MAJOR
                    ),
                    Some("rehearse the migration first (run --rehearsal)".into()),
                );
            }
            for limitation in sv.source_limitations() {
                add(
                    Level::Info,
                    "version_limitations",
                    format!("degraded: {limitation}"),
                    None,
                );
            }
        }
    }
    // Migrating a database onto itself would destroy it.
    if let (Ok(a), Ok(b)) = (catalog::identity(src).await, catalog::identity(tgt).await)
        && a.0 == b.0
        && r.target_exists == Some(true)
        && a.1 == b.1
    {
        add(Level::Error, "same_database", format!("source and target are the same database ({} on the same server)", a.1), Some("point [target] at another server, or give the [[databases]] entry another `target`".into()));
    }
    let extensions = catalog::extensions(src).await?;
    let available = catalog::available_extensions(tgt).await?;
    let missing: Vec<String> = extensions
        .iter()
        .filter(|(n, _)| !available.contains(n))
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    if !missing.is_empty() {
        add(
            Level::Error,
            "extensions",
            format!("extension(s) used by the source are not available on the target: {}", missing.join(", ")),
            Some("install the packages that provide them on the target server (on managed services: allow-list them)".into()),
        );
    }
    Ok(())
}

fn short_list(items: &[String]) -> String {
    const MAX: usize = 10;
    if items.len() <= MAX {
        items.join(", ")
    } else {
        format!(
            "{}, and {} more",
            items[..MAX].join(", "),
            items.len() - MAX
        )
    }
}

pub struct Preflight {
    env: Arc<Env>,
    index: usize,
}

impl Preflight {
    pub fn new(env: Arc<Env>, index: usize) -> Preflight {
        Preflight { env, index }
    }

    fn fail_on_warning(&self) -> bool {
        matches!(self.env.plan.stages[self.index].options.first(), Some(StageOptions::Preflight(o)) if o.fail_on_warning)
    }
}

#[async_trait]
impl Stage for Preflight {
    fn describe(&self) -> Vec<String> {
        let online = self.env.plan.has_kind(StageKind::Cdc);
        let mut v = vec![format!(
            "check {} database(s) on both servers: reachability, versions, selection, privileges, extensions, unlogged tables, large objects",
            self.env.plan.databases.len()
        )];
        if online {
            v.push("online checks (the plan has a cdc stage): wal_level, free replication slots and WAL senders, REPLICATION privilege, replica identities, trigger suppression on the target".into());
        }
        v
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        let online = self.env.plan.has_kind(StageKind::Cdc);
        let mut reports = Vec::new();
        for db in &self.env.plan.databases {
            cx.check_cancelled()?;
            reports.push(inspect(&self.env, db, online).await);
        }
        let findings: Vec<&Finding> = reports.iter().flat_map(|r| &r.findings).collect();
        for f in &findings {
            match f.level {
                Level::Error => {
                    tracing::error!(stage = %cx.stage, database = %f.database, check = f.check, "{}", f.message)
                }
                Level::Warning => {
                    tracing::warn!(stage = %cx.stage, database = %f.database, check = f.check, "{}", f.message)
                }
                Level::Info => {
                    tracing::info!(stage = %cx.stage, database = %f.database, check = f.check, "{}", f.message)
                }
            }
        }
        let detail = serde_json::json!({
            "findings": findings,
            "tables": reports.iter().map(|r| serde_json::json!({"database": r.database, "selected": r.tables.len()})).collect::<Vec<_>>(),
        });
        cx.store.set_stage_detail(&cx.stage, &detail).await?;
        let errors = findings.iter().filter(|f| f.level == Level::Error).count();
        let warnings = findings
            .iter()
            .filter(|f| f.level == Level::Warning)
            .count();
        if errors > 0 || (warnings > 0 && self.fail_on_warning()) {
            let list: Vec<String> = findings
                .iter()
                .filter(|f| {
                    f.level == Level::Error || (self.fail_on_warning() && f.level == Level::Warning)
                })
                .map(|f| format!("  - {f}"))
                .collect();
            return Err(Error::permanent(format!(
                "{errors} error(s), {warnings} warning(s):\n{}",
                list.join("\n")
            ))
            .hint("fix the findings above and run again; `pgferry plan PLAN` shows them without running anything"));
        }
        Ok(())
    }
}
