//! Replica identities for keyless source tables: the provision option
//! `replica_identity = "refuse" | "index" | "full"`.
//!
//! Logical replication carries UPDATE and DELETE only for tables with a replica identity; once a
//! keyless table is published, the source refuses those statements on it. With `refuse` (the
//! default) provision and preflight refuse such tables. With `index` provision gives each selected
//! table without a usable identity `REPLICA IDENTITY USING INDEX` on a unique index of NOT NULL
//! columns where one exists (cdc then finds rows by that key, grouped), otherwise `FULL`; with
//! `full` always `FULL`. Each change is recorded in the checkpoint store (under the pseudo-stage
//! [`RECORD_STAGE`], which no `--rerun` clears, with the table's original setting) before it is
//! made, and the cleanup stage and `pgferry reset` put the original setting back once the
//! publication is gone.

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::catalog::TableInfo;
use crate::pg::ident::{QualifiedName, quote_ident};
use crate::pg::names::publication_name;
use crate::plan::StageKind;
use crate::plan::{Plan, StageOptions};
use crate::state::StateStore;

/// The checkpoint "stage" the records live under: not a valid stage id, so never a stage's own.
pub const RECORD_STAGE: &str = ":source";

/// What provision does with selected tables that have no replica identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Refuse,
    Index,
    Full,
}

impl Mode {
    /// From the option's value (the plan's schema allows only these three).
    pub fn parse(v: &str) -> Mode {
        match v {
            "index" => Mode::Index,
            "full" => Mode::Full,
            _ => Mode::Refuse,
        }
    }
}

/// The mode the plan's (first) provision stage sets for database `db` (an index into
/// `plan.databases`).
pub fn mode(plan: &Plan, db: usize) -> Mode {
    plan.stages
        .iter()
        .filter(|s| s.kind == StageKind::Provision)
        .find_map(|s| match s.options.get(db) {
            Some(StageOptions::Provision(o)) => Some(Mode::parse(o.replica_identity())),
            _ => None,
        })
        .unwrap_or(Mode::Refuse)
}

fn record_key(db: &str) -> String {
    format!("replica_identity:{db}")
}

/// One table's replica identity, as provision sets it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Change {
    pub schema: String,
    pub table: String,
    /// `relreplident` before: `d` (default: no primary key, or one with a generated column), `n`
    /// (nothing) or `i` (an index with a generated column, [`Change::original_index`]).
    pub original: String,
    /// The index of an original `i` identity.
    #[serde(default)]
    pub original_index: Option<String>,
    /// The unique index used (`index` mode, when one exists); `None`: FULL.
    pub index: Option<String>,
}

impl Change {
    pub fn name(&self) -> QualifiedName {
        QualifiedName::new(self.schema.clone(), self.table.clone())
    }

    /// `schema.table: FULL` or `schema.table: USING INDEX i`, for people.
    pub fn describe(&self) -> String {
        match &self.index {
            Some(i) => format!("{}: USING INDEX {i}", self.name()),
            None => format!("{}: FULL", self.name()),
        }
    }

    fn alter_sql(&self) -> String {
        match &self.index {
            Some(i) => format!(
                "ALTER TABLE {} REPLICA IDENTITY USING INDEX {}",
                self.name().quoted(),
                quote_ident(i)
            ),
            None => format!("ALTER TABLE {} REPLICA IDENTITY FULL", self.name().quoted()),
        }
    }
}

/// The selected tables that cannot replicate UPDATE and DELETE (no primary key, no replica
/// identity, or one whose key has a generated column, which logical replication does not send):
/// ordinary tables and partitions that can be published (not unlogged), and partitioned
/// tables. A partitioned table is published by its root (`publish_via_partition_root`), and pgoutput
/// writes a leaf's old row in the shape of the root's identity: without one on the root, cdc gets no
/// old row to find the target's by.
pub fn lacking(selected: &[TableInfo]) -> Vec<&TableInfo> {
    selected
        .iter()
        .filter(|t| (t.kind == "r" || t.kind == "p") && !t.unlogged && !t.has_usable_identity())
        .collect()
}

/// What `mode` would change: one [`Change`] per table in `lacking`. For `index`, a unique,
/// immediate, valid, non-partial index on plain NOT NULL columns (the smallest such, by column count
/// then name) where the table has one; partitioned tables and partitions always get FULL (a leaf's
/// old row reaches cdc in the shape of its root's identity, and only FULL on both keeps every
/// column of it).
pub async fn changes(client: &Client, mode: Mode, lacking: &[&TableInfo]) -> Result<Vec<Change>> {
    if mode == Mode::Refuse || lacking.is_empty() {
        return Ok(Vec::new());
    }
    let schemas: Vec<&str> = lacking.iter().map(|t| t.name.schema.as_str()).collect();
    let names: Vec<&str> = lacking.iter().map(|t| t.name.name.as_str()).collect();
    let rows = client
        .query(
            "SELECT u.s, u.r, c.relreplident::text, \
                    (SELECT ic.relname::text FROM pg_catalog.pg_index i \
                       JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
                      WHERE $3 AND c.relkind = 'r' AND NOT c.relispartition AND i.indrelid = c.oid AND i.indisunique AND i.indimmediate AND i.indisvalid \
                        AND i.indpred IS NULL AND i.indexprs IS NULL \
                        AND NOT EXISTS (SELECT 1 FROM pg_catalog.unnest(i.indkey::int2[]) k \
                                         LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k \
                                        WHERE a.attnum IS NULL OR NOT a.attnotnull OR a.attgenerated <> '') \
                      ORDER BY i.indnatts, ic.relname LIMIT 1), \
                    (SELECT ic.relname::text FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
                      WHERE i.indrelid = c.oid AND i.indisreplident) \
               FROM unnest($1::text[], $2::text[]) AS u(s, r) \
               JOIN pg_catalog.pg_namespace n ON n.nspname = u.s \
               JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.r \
              ORDER BY 1, 2",
            &[&schemas, &names, &(mode == Mode::Index)],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking for unique indexes on the keyless tables"))?;
    Ok(rows
        .iter()
        .map(|r| Change {
            schema: r.get(0),
            table: r.get(1),
            original: r.get(2),
            index: r.get(3),
            original_index: r.get(4),
        })
        .collect())
}

/// Records `changes` for source database `db` (merged with earlier records, the first original
/// setting kept), then makes them on the source, in one transaction.
pub async fn apply(
    source: &Client,
    store: &dyn StateStore,
    db: &str,
    changes: &[Change],
) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    record(store, db, changes).await?;
    let mut sql = String::from("BEGIN;\n");
    for c in changes {
        sql.push_str(&c.alter_sql());
        sql.push_str(";\n");
    }
    sql.push_str("COMMIT;");
    if let Err(e) = source.batch_execute(&sql).await {
        let _ = source.batch_execute("ROLLBACK").await;
        return Err(Error::pg(&e, "giving the keyless tables a replica identity").hint(
            "the source role must own the tables (or be a superuser); or set replica_identity = \"refuse\" and give them a primary key yourself",
        ));
    }
    Ok(())
}

/// Records `changes` made (or about to be made) for source database `db`, merged with earlier
/// records (the first original setting kept), so cleanup and `reset` put them back. The DDL
/// capture's new keyless tables, given `REPLICA IDENTITY FULL`, are recorded here too.
pub async fn record(store: &dyn StateStore, db: &str, changes: &[Change]) -> Result<()> {
    let mut recorded = recorded(store, db).await?;
    for c in changes {
        if !recorded
            .iter()
            .any(|r| r.schema == c.schema && r.table == c.table)
        {
            recorded.push(c.clone());
        }
    }
    store
        .put_checkpoint(
            RECORD_STAGE,
            &record_key(db),
            &serde_json::to_value(&recorded)
                .map_err(|e| Error::permanent(format!("internal: {e}")))?,
        )
        .await
}

async fn recorded(store: &dyn StateStore, db: &str) -> Result<Vec<Change>> {
    match store.checkpoint(RECORD_STAGE, &record_key(db)).await? {
        Some(v) => serde_json::from_value(v).map_err(|e| {
            Error::permanent(format!(
                "the recorded replica identity changes of database `{db}` cannot be read: {e}"
            ))
        }),
        None => Ok(Vec::new()),
    }
}

/// Puts back the original replica identity of every table recorded for source database `db`, once
/// the migration's publication is gone (before, UPDATE and DELETE on those tables would fail on the
/// source again). A table whose setting someone changed since is left alone. Returns one line per
/// table.
pub async fn restore(
    source: &Client,
    store: &dyn StateStore,
    plan_name: &str,
    db: &str,
) -> Result<Vec<String>> {
    let recorded = recorded(store, db).await?;
    if recorded.is_empty() {
        return Ok(Vec::new());
    }
    let publication = publication_name(plan_name);
    let published: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
            &[&publication],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking for the publication"))?
        .get(0);
    if published {
        return Ok(vec![format!(
            "kept the replica identity of {} table(s) of source database {db}: publication {publication} still exists (drop it, then run cleanup or reset again)",
            recorded.len()
        )]);
    }
    let mut out = Vec::new();
    let mut sql = String::from("BEGIN;\n");
    for c in &recorded {
        let row = source
            .query_opt(
                "SELECT c.relreplident::text, (SELECT ic.relname::text FROM pg_catalog.pg_index i \
                   JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid AND i.indisreplident) \
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[&c.schema, &c.table],
            )
            .await
            .map_err(|e| Error::pg(&e, format!("reading the replica identity of {}", c.name())))?;
        let Some(row) = row else { continue };
        let (now, index): (String, Option<String>) = (row.get(0), row.get(1));
        let ours = match &c.index {
            Some(i) => now == "i" && index.as_deref() == Some(i.as_str()),
            None => now == "f",
        };
        if !ours {
            out.push(format!(
                "left the replica identity of {} as it is (changed since pgferry set it)",
                c.name()
            ));
            continue;
        }
        let back = match (c.original.as_str(), &c.original_index) {
            ("n", _) => "NOTHING".to_string(),
            ("i", Some(i)) => format!("USING INDEX {}", quote_ident(i)),
            _ => "DEFAULT".to_string(),
        };
        sql.push_str(&format!(
            "ALTER TABLE {} REPLICA IDENTITY {back};\n",
            c.name().quoted()
        ));
        out.push(format!(
            "replica identity of {} is {back} again (source database {db})",
            c.name()
        ));
    }
    sql.push_str("COMMIT;");
    if let Err(e) = source.batch_execute(&sql).await {
        let _ = source.batch_execute("ROLLBACK").await;
        return Err(
            Error::pg(&e, "putting back the original replica identities").hint(format!(
                "the tables are recorded in the checkpoint store (stage `{RECORD_STAGE}`, key `{}`); run cleanup or reset again",
                record_key(db)
            )),
        );
    }
    store
        .put_checkpoint(RECORD_STAGE, &record_key(db), &serde_json::json!([]))
        .await?;
    Ok(out)
}
