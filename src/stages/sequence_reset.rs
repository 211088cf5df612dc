//! The `sequence_reset` stage: logical replication does not carry sequences, so once the source takes
//! no more writes, every target sequence of the selected tables is set to the source's current
//! `last_value` and `is_called`, read when the stage runs.
//!
//! The sequences of a database entry: those owned by a column of a selected table (serial columns,
//! `OWNED BY`: pg_depend `a`; identity columns: `i`), those a selected table's column defaults use,
//! and the standalone sequences (owned by no table) in the selected tables' schemas. Extension
//! members are left alone. Values are read with `SELECT last_value, is_called FROM seq` (which, unlike
//! `pg_sequences.last_value`, keeps the value of `setval(seq, n, false)`), and written with
//! `setval(seq, last_value, is_called)`, only where they differ. Setting a sequence is idempotent,
//! so a rerun is harmless; each database is checkpointed with how many sequences it has and how many
//! changed.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;
use tokio_postgres::Client;

use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::pg::catalog;
use crate::pg::ident::QualifiedName;
use crate::plan::Database;

/// Sequences read per query.
const CHUNK: usize = 500;

pub struct SequenceReset {
    env: Arc<Env>,
    /// The stage's position in the plan (the kind has no options to read yet).
    #[allow(dead_code)]
    index: usize,
}

/// A sequence's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeqValue {
    pub(crate) last_value: i64,
    pub(crate) is_called: bool,
}

impl std::fmt::Display for SeqValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_called {
            write!(f, "{}", self.last_value)
        } else {
            write!(f, "{} (not yet called)", self.last_value)
        }
    }
}

impl SequenceReset {
    pub fn new(env: Arc<Env>, index: usize) -> SequenceReset {
        SequenceReset { env, index }
    }

    /// Resets one database's sequences; returns (sequences, changed).
    pub(crate) async fn reset(&self, cx: &StageContext, db: &Database) -> Result<(usize, usize)> {
        let source_label = format!("source database `{}`", db.name);
        let target_label = format!("target database `{}`", db.target);
        let purpose = format!("sequence_reset {}", cx.stage);
        let source = self
            .env
            .source_for(db)
            .connect(&purpose)
            .await
            .map_err(|e| e.context(source_label.clone()))?;
        source
            .batch_execute("SET default_transaction_read_only = on")
            .await
            .map_err(|e| {
                Error::pg(&e, "configuring a read-only session").context(source_label.clone())
            })?;
        let selected = self
            .env
            .selected_tables(&source, db)
            .await
            .map_err(|e| e.context(source_label.clone()))?;
        let sequences = sequences_of(&source, &selected)
            .await
            .map_err(|e| e.context(source_label.clone()))?;
        cx.check_cancelled()?;
        let wanted = read_values(&source, &sequences)
            .await
            .map_err(|e| e.context(source_label.clone()))?;

        let target = self
            .env
            .target_for(db)
            .connect(&purpose)
            .await
            .map_err(|e| e.context(target_label.clone()))?;
        let present = target_sequences(&target)
            .await
            .map_err(|e| e.context(target_label.clone()))?;
        let missing: Vec<String> = sequences
            .iter()
            .filter(|s| !present.contains(*s))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(Error::permanent(format!(
                "{} sequence{} of the source {} missing on the target: {}",
                missing.len(),
                if missing.len() == 1 { "" } else { "s" },
                if missing.len() == 1 { "is" } else { "are" },
                missing.join(", ")
            ))
            .context(target_label)
            .hint("create them on the target (the provision stage creates the pre-data schema), or exclude the tables that use them"));
        }
        let current = read_values(&target, &sequences)
            .await
            .map_err(|e| e.context(target_label.clone()))?;

        let mut changed = 0;
        for ((seq, new), old) in sequences.iter().zip(&wanted).zip(&current) {
            cx.check_cancelled()?;
            if new == old {
                tracing::debug!(stage = %cx.stage, database = %db.name, "{seq}: {old} (unchanged)");
                continue;
            }
            target
                .execute(
                    "SELECT pg_catalog.setval($1::text::regclass, $2, $3)",
                    &[&seq.quoted(), &new.last_value, &new.is_called],
                )
                .await
                .map_err(|e| {
                    Error::pg(&e, format!("setting sequence {seq} to {new}"))
                        .context(target_label.clone())
                })?;
            changed += 1;
            tracing::info!(stage = %cx.stage, database = %db.name, "{seq}: {old} -> {new}");
        }
        Ok((sequences.len(), changed))
    }
}

/// The sequences of the selected tables: owned by their columns (serial, identity), used by their
/// column defaults, and standalone ones in their schemas; extension members excluded.
pub(crate) async fn sequences_of(
    client: &Client,
    selected: &[impl std::borrow::Borrow<catalog::TableInfo>],
) -> Result<Vec<QualifiedName>> {
    let schemas: Vec<String> = selected
        .iter()
        .map(|t| t.borrow().name.schema.clone())
        .collect();
    let tables: Vec<String> = selected
        .iter()
        .map(|t| t.borrow().name.name.clone())
        .collect();
    let rows = client
        .query(
            "WITH sel AS (SELECT c.oid, c.relnamespace \
                          FROM unnest($1::text[], $2::text[]) AS s(nsp, rel) \
                          JOIN pg_catalog.pg_namespace n ON n.nspname = s.nsp \
                          JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = s.rel), \
                  owned AS (SELECT d.objid, d.refobjid FROM pg_catalog.pg_depend d \
                            WHERE d.classid = 'pg_catalog.pg_class'::regclass \
                              AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i')) \
             SELECT n.nspname::text, s.relname::text \
             FROM pg_catalog.pg_class s JOIN pg_catalog.pg_namespace n ON n.oid = s.relnamespace \
             WHERE s.relkind = 'S' \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend e \
                               WHERE e.classid = 'pg_catalog.pg_class'::regclass AND e.objid = s.oid AND e.deptype = 'e') \
               AND (EXISTS (SELECT 1 FROM owned o JOIN sel ON sel.oid = o.refobjid WHERE o.objid = s.oid) \
                    OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                               JOIN pg_catalog.pg_attrdef a ON d.classid = 'pg_catalog.pg_attrdef'::regclass AND a.oid = d.objid \
                               JOIN sel ON sel.oid = a.adrelid \
                               WHERE d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = s.oid) \
                    OR (NOT EXISTS (SELECT 1 FROM owned o WHERE o.objid = s.oid) \
                        AND s.relnamespace IN (SELECT relnamespace FROM sel))) \
             ORDER BY 1, 2",
            &[&schemas, &tables],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing the sequences of the selected tables"))?;
    Ok(rows
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Every sequence of the target.
pub(crate) async fn target_sequences(client: &Client) -> Result<HashSet<QualifiedName>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S'",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "listing sequences"))?;
    Ok(rows
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// `last_value` and `is_called` of each sequence, in order, a few hundred per query.
pub(crate) async fn read_values(
    client: &Client,
    sequences: &[QualifiedName],
) -> Result<Vec<SeqValue>> {
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(CHUNK) {
        let sql = chunk
            .iter()
            .enumerate()
            .map(|(i, s)| format!("SELECT {i} AS i, last_value, is_called FROM {}", s.quoted()))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let rows = client
            .query(
                &format!("SELECT last_value, is_called FROM ({sql}) v ORDER BY i"),
                &[],
            )
            .await
            .map_err(|e| {
                let first = &chunk[0];
                let what = if chunk.len() == 1 {
                    format!("reading sequence {first}")
                } else {
                    format!("reading sequences {first} ... {}", chunk[chunk.len() - 1])
                };
                Error::pg(&e, what)
            })?;
        out.extend(rows.iter().map(|r| SeqValue {
            last_value: r.get(0),
            is_called: r.get(1),
        }));
    }
    Ok(out)
}

#[async_trait]
impl Stage for SequenceReset {
    fn describe(&self) -> Vec<String> {
        self.env
            .plan
            .databases
            .iter()
            .map(|db| {
                format!(
                    "on target database {}: sets the sequences of the selected tables (serial, identity, used by defaults, and standalone ones in their schemas) to the values they have on source database {} when the stage runs",
                    db.target, db.name
                )
            })
            .collect()
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        cx.for_each_database(
            self.env.plan.databases.iter().enumerate(),
            |_, db| async move {
                let (n, changed) = self
                    .reset(cx, db)
                    .await
                    .map_err(|e| e.context(format!("database `{}`", db.name)))?;
                let msg = format!(
                    "database `{}`: {changed} of {n} sequence{} set to the source's values",
                    db.name,
                    if n == 1 { "" } else { "s" }
                );
                tracing::info!(stage = %cx.stage, "{msg}");
                cx.store.event(Some(&cx.stage), "info", &msg).await?;
                Ok(json!({ "sequences": n, "changed": changed }))
            },
        )
        .await
    }
}
