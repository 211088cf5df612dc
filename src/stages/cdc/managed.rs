//! Applying without `session_replication_role = replica`: the *managed* apply mode.
//!
//! On a managed service (Azure Flexible Server, RDS/Aurora, Cloud SQL) the migration's role is not a
//! superuser and cannot be granted SET on `session_replication_role`, so the apply session runs in
//! the `origin` role: user triggers would fire on replicated rows, and foreign keys would reject
//! what the grouped apply reorders (changes are grouped per table, see [`super::changeset`]) and
//! rows copied at different LSNs during catch-up. Foreign-key checks are *system* triggers, which
//! only a superuser may disable. What the role can do is what a table's owner may, and it owns the
//! target tables because it created them. So, before it applies anything, cdc puts the target in
//! the state replica mode would give it:
//!
//! - every user trigger and rule that would not fire in replica mode (`tgenabled`/`ev_enabled`
//!   `O`) is disabled, and those enabled for replica only (`R`) are enabled `ALWAYS`, so exactly
//!   the triggers a replica session fires still fire;
//! - every foreign key is dropped, its definition (`pg_get_constraintdef`) kept;
//! - on a target older than 13, a partitioned table's row trigger, whose copies on the partitions are
//!   internal triggers no one but a superuser may disable, is dropped, its definition
//!   (`pg_get_triggerdef`) kept, and created again.
//!
//! Each object is recorded in `<state schema>.cdc_held` *in the target database*, in the same
//! transaction as its `ALTER TABLE`: a crash keeps both or loses both, so the target never has a
//! trigger off or a constraint missing without the record that puts it back. [`restore`] does that
//! in one transaction (triggers and rules as they were, foreign keys added back `NOT VALID`, which
//! does not read the tables), run by the cutover once cdc has drained (inside the write downtime),
//! by the cleanup stage and by `pgferry reset --keep-target`; [`validate`] then validates each
//! foreign key (`VALIDATE CONSTRAINT` takes a `SHARE UPDATE EXCLUSIVE` lock: writes go on), run by
//! the cutover after it has measured the downtime, and again by cleanup and reset for any left.
//! The store shows it: counters `managedApply`, `heldTriggers`, `heldForeignKeys` and
//! `unvalidatedForeignKeys` per database (`status`, `report`), and an event when cdc holds them.

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::ident::{QualifiedName, quote_ident, quote_literal};

/// The record table, in the state schema of each target database.
pub fn record_table(state_schema: &str) -> String {
    format!("{}.cdc_held", quote_ident(state_schema))
}

/// `CREATE TABLE IF NOT EXISTS` for the record table (the state schema exists).
pub fn create_sql(state_schema: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (kind text NOT NULL, schema_name text NOT NULL, table_name text NOT NULL, \
         name text NOT NULL, enabled text NOT NULL DEFAULT '', definition text NOT NULL DEFAULT '', \
         restored boolean NOT NULL DEFAULT false, held_at timestamptz NOT NULL DEFAULT now(), \
         PRIMARY KEY (kind, schema_name, table_name, name))",
        record_table(state_schema)
    )
}

/// What cdc holds on one target database.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Held {
    pub triggers: i64,
    pub rules: i64,
    pub foreign_keys: i64,
    /// How many of them this call held (the rest were held by an earlier session).
    pub new: i64,
}

/// Whether the session on `client` may set `session_replication_role`: tries it (`SET`, then
/// `RESET`), so the answer is the server's own. Only "permission denied" (42501) means no.
pub async fn can_set_replication_role(client: &Client) -> Result<bool> {
    let may = set_replication_role(client).await?;
    if may {
        client
            .batch_execute("RESET session_replication_role")
            .await
            .map_err(|e| Error::pg(&e, "resetting session_replication_role"))?;
    }
    Ok(may)
}

/// Sets `session_replication_role = replica` on the session of `client` when its role may:
/// `false` (nothing set) on "permission denied" (42501), the managed mode's cue.
pub async fn set_replication_role(client: &Client) -> Result<bool> {
    match client
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.code().map(|c| c.code()) == Some("42501") => Ok(false),
        Err(e) => Err(Error::pg(
            &e,
            "setting session_replication_role = replica on the target",
        )),
    }
}

/// The relations of user schemas (not `state_schema`, not the system's).
const USER_RELATION: &str = "n.nspname <> $1 AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' \
     AND c.relkind IN ('r', 'p')";

/// Holds, on the target database of `client`, the user triggers, rules and foreign keys replica
/// mode would keep quiet, recording each (see the module's documentation). One transaction;
/// idempotent (what is already held stays recorded once).
pub async fn hold(client: &Client, state_schema: &str) -> Result<Held> {
    let table = record_table(state_schema);
    let fail = |e: &tokio_postgres::Error, what: String| {
        Error::pg(e, what).hint(
            "without session_replication_role = replica, cdc disables the target's user triggers and drops its foreign keys while it applies (put back by the cutover), which needs the role to own the target tables: run provision as this role, or have the tables' owner GRANT its role to it",
        )
    };
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL search_path = pg_catalog, pg_temp; {}",
            create_sql(state_schema)
        ))
        .await
        .map_err(|e| Error::pg(&e, format!("creating {table} on the target")))?;
    let result = async {
        let mut new = 0;
        let version: String = client
            .query_one("SELECT current_setting('server_version_num')", &[])
            .await
            .map_err(|e| Error::pg(&e, "reading the target's version"))?
            .get(0);
        let version = crate::pg::version::ServerVersion::from_num(version.parse().map_err(|_| {
            Error::permanent(format!(
                "the target reports server_version_num {version:?}, which is not a number"
            ))
        })?);
        // Where a partitioned table's row trigger has internal copies on its partitions (before
        // 13), it is dropped (its definition kept) rather than disabled.
        let drop_partitioned = version.partition_triggers_are_internal();
        let triggers = client
            .query(
                &format!(
                    "SELECT n.nspname::text, c.relname::text, t.tgname::text, t.tgenabled::text, \
                            c.relkind = 'p', pg_catalog.pg_get_triggerdef(t.oid) \
                       FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                      WHERE NOT t.tgisinternal AND t.tgenabled IN ('O', 'R') AND {USER_RELATION} ORDER BY 1, 2, 3"
                ),
                &[&state_schema],
            )
            .await
            .map_err(|e| Error::pg(&e, "listing the target's triggers"))?;
        for r in &triggers {
            let (schema, name, object, enabled, partitioned, definition): (
                String,
                String,
                String,
                String,
                bool,
                String,
            ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            if !(drop_partitioned && partitioned) {
                continue;
            }
            let q = QualifiedName::new(schema.clone(), name.clone());
            let sql = format!(
                "INSERT INTO {table} (kind, schema_name, table_name, name, enabled, definition) VALUES ('trigger_def', {}, {}, {}, {}, {}) ON CONFLICT DO NOTHING; \
                 DROP TRIGGER {} ON {}",
                quote_literal(&schema),
                quote_literal(&name),
                quote_literal(&object),
                quote_literal(&enabled),
                quote_literal(&definition),
                quote_ident(&object),
                q.quoted()
            );
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| fail(&e, format!("target table {q}: dropping trigger {object}")))?;
            new += 1;
        }
        let triggers: Vec<&tokio_postgres::Row> = triggers
            .iter()
            .filter(|r| !(drop_partitioned && r.get::<_, bool>(4)))
            .collect();
        let rules = client
            .query(
                &format!(
                    "SELECT n.nspname::text, c.relname::text, r.rulename::text, r.ev_enabled::text \
                       FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace \
                      WHERE r.rulename <> '_RETURN' AND r.ev_enabled IN ('O', 'R') AND {USER_RELATION} ORDER BY 1, 2, 3"
                ),
                &[&state_schema],
            )
            .await
            .map_err(|e| Error::pg(&e, "listing the target's rules"))?;
        let rules: Vec<&tokio_postgres::Row> = rules.iter().collect();
        for (kind, rows) in [("trigger", &triggers), ("rule", &rules)] {
            for r in rows.iter() {
                let (schema, name, object, enabled): (String, String, String, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                let q = QualifiedName::new(schema.clone(), name.clone());
                let what = if kind == "trigger" { "TRIGGER" } else { "RULE" };
                let action = if enabled == "R" { "ENABLE ALWAYS" } else { "DISABLE" };
                let sql = format!(
                    "INSERT INTO {table} (kind, schema_name, table_name, name, enabled) VALUES ({}, {}, {}, {}, {}) ON CONFLICT DO NOTHING; \
                     ALTER TABLE ONLY {} {action} {what} {}",
                    quote_literal(kind),
                    quote_literal(&schema),
                    quote_literal(&name),
                    quote_literal(&object),
                    quote_literal(&enabled),
                    q.quoted(),
                    quote_ident(&object)
                );
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| fail(&e, format!("target table {q}: {action} {what} {object}")))?;
                new += 1;
            }
        }
        // Foreign keys of their own (not a partition's copy of its parent's), defined with
        // qualified names (search_path is pg_catalog only).
        let fks = client
            .query(
                &format!(
                    "SELECT n.nspname::text, c.relname::text, k.conname::text, pg_catalog.pg_get_constraintdef(k.oid) \
                       FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                      WHERE k.contype = 'f' AND k.conparentid = 0 AND {USER_RELATION} ORDER BY 1, 2, 3"
                ),
                &[&state_schema],
            )
            .await
            .map_err(|e| Error::pg(&e, "listing the target's foreign keys"))?;
        for r in &fks {
            let (schema, name, object, definition): (String, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let q = QualifiedName::new(schema.clone(), name.clone());
            let sql = format!(
                "INSERT INTO {table} (kind, schema_name, table_name, name, definition) VALUES ('foreign_key', {}, {}, {}, {}) \
                   ON CONFLICT (kind, schema_name, table_name, name) DO UPDATE SET definition = EXCLUDED.definition, restored = false; \
                 ALTER TABLE {} DROP CONSTRAINT {}",
                quote_literal(&schema),
                quote_literal(&name),
                quote_literal(&object),
                quote_literal(&definition),
                q.quoted(),
                quote_ident(&object)
            );
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| fail(&e, format!("target table {q}: dropping foreign key {object}")))?;
            new += 1;
        }
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE kind IN ('trigger', 'trigger_def')), count(*) FILTER (WHERE kind = 'rule'), \
                            count(*) FILTER (WHERE kind = 'foreign_key') FROM {table}"
                ),
                &[],
            )
            .await
            .map_err(|e| Error::pg(&e, format!("counting {table}")))?;
        Ok::<_, Error>(Held {
            triggers: row.get(0),
            rules: row.get(1),
            foreign_keys: row.get(2),
            new,
        })
    }
    .await;
    match result {
        Ok(held) => {
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| Error::pg(&e, format!("committing {table}")))?;
            Ok(held)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn record_exists(client: &Client, state_schema: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[&record_table(state_schema)],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking for what cdc held on the target"))?
        .get(0))
}

/// Puts back what [`hold`] held, in one transaction: triggers and rules as they were, foreign keys
/// added `NOT VALID` (kept in the record until [`validate`]). Returns one line per object. Idempotent;
/// an object whose table is gone is only forgotten.
pub async fn restore(client: &Client, state_schema: &str) -> Result<Vec<String>> {
    if !record_exists(client, state_schema).await? {
        return Ok(Vec::new());
    }
    let table = record_table(state_schema);
    let rows = client
        .query(
            &format!(
                "SELECT r.kind, r.schema_name, r.table_name, r.name, r.enabled, r.definition, \
                        c.oid IS NOT NULL, \
                        EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid AND k.conname = r.name), \
                        EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = r.name) \
                   FROM {table} r \
                   LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = r.schema_name \
                   LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = r.table_name \
                  WHERE NOT r.restored ORDER BY r.kind DESC, 2, 3, 4"
            ),
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("reading {table} on the target")))?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = String::from("BEGIN; SET LOCAL search_path = pg_catalog, pg_temp;\n");
    let mut out = Vec::new();
    for r in &rows {
        let (kind, schema, name, object, enabled, definition): (
            String,
            String,
            String,
            String,
            String,
            String,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        let (table_exists, constraint_exists, trigger_exists): (bool, bool, bool) =
            (r.get(6), r.get(7), r.get(8));
        let key = format!(
            "kind = {} AND schema_name = {} AND table_name = {} AND name = {}",
            quote_literal(&kind),
            quote_literal(&schema),
            quote_literal(&name),
            quote_literal(&object)
        );
        let q = QualifiedName::new(schema, name);
        if !table_exists {
            sql.push_str(&format!("DELETE FROM {table} WHERE {key};\n"));
            continue;
        }
        match kind.as_str() {
            "trigger_def" => {
                if !trigger_exists {
                    sql.push_str(&definition);
                    sql.push_str(";\n");
                    if enabled == "R" {
                        sql.push_str(&format!(
                            "ALTER TABLE {} ENABLE REPLICA TRIGGER {};\n",
                            q.quoted(),
                            quote_ident(&object)
                        ));
                    }
                    out.push(format!("trigger {object} of {q} is created again"));
                }
                sql.push_str(&format!("DELETE FROM {table} WHERE {key};\n"));
            }
            "foreign_key" => {
                if !constraint_exists {
                    let not_valid = if definition.ends_with(" NOT VALID") {
                        ""
                    } else {
                        " NOT VALID"
                    };
                    sql.push_str(&format!(
                        "ALTER TABLE {} ADD CONSTRAINT {} {definition}{not_valid};\n",
                        q.quoted(),
                        quote_ident(&object)
                    ));
                    out.push(format!(
                        "foreign key {object} of {q} is back (NOT VALID until validated)"
                    ));
                }
                sql.push_str(&format!(
                    "UPDATE {table} SET restored = true WHERE {key};\n"
                ));
            }
            _ => {
                let what = if kind == "trigger" { "TRIGGER" } else { "RULE" };
                let action = if enabled == "R" {
                    "ENABLE REPLICA"
                } else {
                    "ENABLE"
                };
                sql.push_str(&format!(
                    "ALTER TABLE ONLY {} {action} {what} {};\nDELETE FROM {table} WHERE {key};\n",
                    q.quoted(),
                    quote_ident(&object)
                ));
                out.push(format!("{kind} {object} of {q} is enabled again"));
            }
        }
    }
    sql.push_str("COMMIT;");
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(Error::pg(
            &e,
            "putting back the triggers and foreign keys cdc held on the target",
        )
        .hint(format!(
            "they are listed in {table} in the target database; run the plan's cutover or cleanup again (or `pgferry reset --keep-target`) once the cause is fixed"
        )));
    }
    Ok(out)
}

/// Validates each foreign key [`restore`] added back and forgets it; one transaction each. Returns
/// the lines done and the foreign keys that failed (left recorded, with the server's reason).
pub async fn validate(client: &Client, state_schema: &str) -> Result<(Vec<String>, Vec<String>)> {
    if !record_exists(client, state_schema).await? {
        return Ok((Vec::new(), Vec::new()));
    }
    let table = record_table(state_schema);
    let rows = client
        .query(
            &format!(
                "SELECT r.schema_name, r.table_name, r.name, r.definition, \
                        coalesce((SELECT NOT k.convalidated FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid AND k.conname = r.name), false) \
                   FROM {table} r \
                   LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = r.schema_name \
                   LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = r.table_name \
                  WHERE r.kind = 'foreign_key' AND r.restored ORDER BY 1, 2, 3"
            ),
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, format!("reading {table} on the target")))?;
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for r in &rows {
        let (schema, name, object, definition, not_valid): (String, String, String, String, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let forget = format!(
            "DELETE FROM {table} WHERE kind = 'foreign_key' AND schema_name = {} AND table_name = {} AND name = {}",
            quote_literal(&schema),
            quote_literal(&name),
            quote_literal(&object)
        );
        let q = QualifiedName::new(schema, name);
        // A foreign key NOT VALID on the source stays so; one gone is only forgotten.
        let sql = if not_valid && !definition.ends_with(" NOT VALID") {
            format!(
                "BEGIN; ALTER TABLE {} VALIDATE CONSTRAINT {}; {forget}; COMMIT",
                q.quoted(),
                quote_ident(&object)
            )
        } else {
            forget
        };
        match client.batch_execute(&sql).await {
            Ok(()) => {
                if not_valid {
                    done.push(format!("foreign key {object} of {q} validated"));
                }
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                failed.push(format!(
                    "foreign key {object} of {q}: {}",
                    Error::pg(&e, "VALIDATE CONSTRAINT")
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or("")
                ));
            }
        }
    }
    Ok((done, failed))
}

/// How many objects are still held and how many foreign keys still wait for validation, for the
/// store's counters: (triggers + rules + foreign keys not yet restored, foreign keys not validated).
pub async fn outstanding(client: &Client, state_schema: &str) -> Result<(i64, i64)> {
    if !record_exists(client, state_schema).await? {
        return Ok((0, 0));
    }
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE NOT restored), count(*) FILTER (WHERE kind = 'foreign_key' AND restored) FROM {}",
                record_table(state_schema)
            ),
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "counting what cdc held on the target"))?;
    Ok((row.get(0), row.get(1)))
}

/// [`restore`] then [`validate`], for cleanup and reset: lines done, and an error naming every
/// foreign key that does not validate.
pub async fn restore_and_validate(client: &Client, state_schema: &str) -> Result<Vec<String>> {
    let mut out = restore(client, state_schema).await?;
    let (done, failed) = validate(client, state_schema).await?;
    out.extend(done);
    if !failed.is_empty() {
        return Err(Error::permanent(format!(
            "{} foreign key(s) cdc held do not validate on the target: {}",
            failed.len(),
            failed.join("; ")
        ))
        .hint(format!(
            "they are back NOT VALID and listed in {} in the target database; fix the rows they name (compare with the source), then run cleanup again",
            record_table(state_schema)
        )));
    }
    Ok(out)
}

/// The cutover's last step, once it has measured the write downtime: validates the foreign keys
/// [`restore`] added back (writes go on meanwhile) and updates the store's counters. A foreign key
/// that does not validate is a warning here (the switch is done; the key stays `NOT VALID`,
/// recorded) and an error of the cleanup stage. Returns the record for the cutover's detail, `null`
/// when the apply was not in the managed mode.
pub async fn after_cutover(
    env: &crate::stages::Env,
    db: &crate::plan::Database,
    cx: &crate::stages::StageContext,
) -> Result<serde_json::Value> {
    if cx.store.counter(&db.name, "managedApply").await?.is_none() {
        return Ok(serde_json::Value::Null);
    }
    let client = env.target_for(db).connect("cutover validate").await?;
    let schema = &env.plan.state.schema;
    let started = std::time::Instant::now();
    let (validated, failed) = validate(&client, schema).await?;
    let seconds = started.elapsed().as_secs_f64();
    for l in &validated {
        tracing::info!(database = %db.name, "{l}");
    }
    for f in &failed {
        let msg = format!("does not validate, left NOT VALID (cleanup retries it): {f}");
        tracing::warn!(database = %db.name, "{msg}");
        cx.store.event(Some(&cx.stage), "warn", &msg).await?;
    }
    let (held, unvalidated) = outstanding(&client, schema).await?;
    cx.store
        .set_counters(&[
            (db.name.clone(), "heldTriggers".into(), 0),
            (db.name.clone(), "heldForeignKeys".into(), held),
            (
                db.name.clone(),
                "unvalidatedForeignKeys".into(),
                unvalidated,
            ),
        ])
        .await?;
    Ok(serde_json::json!({
        "mode": "managed",
        "validated_foreign_keys": validated.len(),
        "validate_seconds": seconds,
        "not_validated": failed,
    }))
}
