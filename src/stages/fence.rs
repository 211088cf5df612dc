//! The cutover's `revoke_writes` fence: for a source where the migration role may not make the
//! database read-only (`ALTER DATABASE` needs its owner) or end the application's sessions (a
//! managed service's admin without `pg_signal_backend`), but owns the application's tables (or has
//! their owner's privileges), which it needs anyway for the publication.
//!
//! At the fence it takes INSERT, UPDATE, DELETE and TRUNCATE on every selected table (partitioned
//! roots and partitions), and USAGE and UPDATE on their sequences, from every role that holds them
//! (the owner and PUBLIC included): privileges are checked at each statement, so the application's
//! open sessions can no longer write, without being ended. The revoke runs in the transaction of a
//! SHARE lock on the tables, which waits for the transactions that wrote before to end, so nothing
//! commits after the drain position is read.
//!
//! Every privilege is recorded in the store (pseudo-stage [`RECORD_STAGE`], key
//! `fence_revoked:<db>`, which no `--rerun` clears) *before* it is revoked, and granted back by
//! [`restore`]: when the cutover fails after the fence, by `pgferry unfence`, and by `pgferry reset`.

use tokio_postgres::Client;

use super::replica_identity::RECORD_STAGE;
use crate::error::{Error, Result};
use crate::pg::catalog::{self, TableInfo};
use crate::pg::ident::{QualifiedName, quote_ident};
use crate::select::Selection;
use crate::state::StateStore;

fn record_key(db: &str) -> String {
    format!("fence_revoked:{db}")
}

/// One privilege the fence took.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    /// `TABLE` or `SEQUENCE`.
    pub kind: String,
    pub schema: String,
    pub name: String,
    /// The role, or `PUBLIC`.
    pub grantee: String,
    pub privilege: String,
    pub grantable: bool,
}

impl Revoked {
    fn object(&self) -> String {
        format!(
            "{} {}",
            self.kind,
            QualifiedName::new(self.schema.clone(), self.name.clone()).quoted()
        )
    }

    fn grantee_sql(&self) -> String {
        if self.grantee == "PUBLIC" {
            "PUBLIC".into()
        } else {
            quote_ident(&self.grantee)
        }
    }
}

/// The selected tables of `db` (with their partitioned roots) and their sequences.
async fn objects(
    client: &Client,
    state_schema: &str,
    db: &crate::plan::Database,
) -> Result<(Vec<QualifiedName>, Vec<QualifiedName>)> {
    let all = catalog::tables(client, state_schema).await?;
    let selection = Selection::new(&db.tables, &db.exclude);
    let selected: Vec<&TableInfo> = catalog::select(&all, &selection);
    let mut tables: Vec<QualifiedName> = selected.iter().map(|t| t.name.clone()).collect();
    for t in &selected {
        if let Some(r) = &t.root
            && !tables.contains(r)
        {
            tables.push(r.clone());
        }
    }
    let sequences = super::sequence_reset::sequences_of(client, &selected).await?;
    Ok((tables, sequences))
}

/// The write privileges held on `objects` of `kind` (`r` tables, `s` sequences).
async fn held(client: &Client, kind: &str, objects: &[QualifiedName]) -> Result<Vec<Revoked>> {
    let (schemas, names): (Vec<&str>, Vec<&str>) = objects
        .iter()
        .map(|q| (q.schema.as_str(), q.name.as_str()))
        .unzip();
    let privileges: &[&str] = if kind == "r" {
        &["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    } else {
        &["USAGE", "UPDATE"]
    };
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, \
                    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee)::text END, \
                    a.privilege_type::text, a.is_grantable \
               FROM unnest($1::text[], $2::text[]) AS o(schema_name, table_name) \
               JOIN pg_catalog.pg_namespace n ON n.nspname = o.schema_name \
               JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = o.table_name, \
                    LATERAL pg_catalog.aclexplode(coalesce(c.relacl, pg_catalog.acldefault($3::text::\"char\", c.relowner))) a \
              WHERE a.privilege_type = ANY ($4::text[]) ORDER BY 1, 2, 3, 4",
            &[&schemas, &names, &kind, &privileges],
        )
        .await
        .map_err(|e| Error::pg(&e, "reading the write privileges of the selected tables"))?;
    Ok(rows
        .iter()
        .map(|r| Revoked {
            kind: if kind == "r" { "TABLE" } else { "SEQUENCE" }.into(),
            schema: r.get(0),
            name: r.get(1),
            grantee: r.get(2),
            privilege: r.get(3),
            grantable: r.get(4),
        })
        .collect())
}

async fn recorded(store: &dyn StateStore, db: &str) -> Result<Vec<Revoked>> {
    match store.checkpoint(RECORD_STAGE, &record_key(db)).await? {
        Some(v) => serde_json::from_value(v).map_err(|e| {
            Error::permanent(format!(
                "the privileges the fence took in database `{db}` cannot be read from the store: {e}"
            ))
        }),
        None => Ok(Vec::new()),
    }
}

/// Fences source database `db` by revoking the write privileges (see the module's documentation),
/// then waits (at most `timeout`) for the transactions that wrote before. Returns how many
/// privileges it took.
pub async fn revoke_writes(
    source: &Client,
    store: &dyn StateStore,
    state_schema: &str,
    db: &crate::plan::Database,
    timeout: std::time::Duration,
) -> Result<usize> {
    let (tables, sequences) = objects(source, state_schema, db).await?;
    let mut taken = held(source, "r", &tables).await?;
    taken.extend(held(source, "s", &sequences).await?);
    // Recorded first (merged with an earlier attempt's): a crash after the revoke still finds it.
    let mut all = recorded(store, &db.name).await?;
    for r in &taken {
        if !all.contains(r) {
            all.push(r.clone());
        }
    }
    store
        .put_checkpoint(
            RECORD_STAGE,
            &record_key(&db.name),
            &serde_json::to_value(&all).map_err(|e| Error::permanent(e.to_string()))?,
        )
        .await?;
    // One transaction: the SHARE lock waits for the transactions that hold a write lock on the
    // tables (they wrote before the fence) and holds off new writers until the revoke commits;
    // those then find their privilege gone. (After the revoke the lock could no longer be taken:
    // the owner's own privileges are revoked too.)
    let mut sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms';\n",
        timeout.as_millis().max(1)
    );
    if !tables.is_empty() {
        let list: Vec<String> = tables.iter().map(QualifiedName::quoted).collect();
        sql.push_str(&format!("LOCK TABLE {} IN SHARE MODE;\n", list.join(", ")));
    }
    for r in &taken {
        sql.push_str(&format!(
            "REVOKE {} ON {} FROM {} CASCADE;\n",
            r.privilege,
            r.object(),
            r.grantee_sql()
        ));
    }
    sql.push_str("COMMIT;");
    if let Err(e) = source.batch_execute(&sql).await {
        let _ = source.batch_execute("ROLLBACK").await;
        return Err(Error::pg(
            &e,
            "revoking the write privileges (the fence), after the transactions that wrote",
        )
        .hint(
            "the revoke_writes fence needs the privileges of the tables' owner: GRANT the owner role to the migration role",
        ));
    }
    Ok(taken.len())
}

/// Grants back every privilege the fence took in source database `db` and forgets the record.
/// Returns what it did, one line. Idempotent; a table or role gone since is skipped.
pub async fn restore(source: &Client, store: &dyn StateStore, db: &str) -> Result<Vec<String>> {
    let all = recorded(store, db).await?;
    if all.is_empty() {
        return Ok(Vec::new());
    }
    let mut given = 0;
    for r in &all {
        let exists: bool = source
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                                 WHERE n.nspname = $1 AND c.relname = $2) \
                        AND ($3 = 'PUBLIC' OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $3))",
                &[&r.schema, &r.name, &r.grantee],
            )
            .await
            .map_err(|e| Error::pg(&e, "checking what the fence took"))?
            .get(0);
        if !exists {
            continue;
        }
        let sql = format!(
            "GRANT {} ON {} TO {}{}",
            r.privilege,
            r.object(),
            r.grantee_sql(),
            if r.grantable {
                " WITH GRANT OPTION"
            } else {
                ""
            }
        );
        source.batch_execute(&sql).await.map_err(|e| {
            Error::pg(&e, format!("giving back a privilege the fence took: `{sql}`")).hint(
                "the privileges are recorded in the store; fix the cause and run `pgferry unfence PLAN` again",
            )
        })?;
        given += 1;
    }
    store
        .put_checkpoint(RECORD_STAGE, &record_key(db), &serde_json::json!([]))
        .await?;
    Ok(vec![format!(
        "gave back {given} write privilege(s) the fence took in source database {db}"
    )])
}
