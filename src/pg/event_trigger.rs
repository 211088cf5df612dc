//! The DDL capture on a source database (`ddl = "replicate"` on the cdc stage): two event triggers
//! (`ddl_command_end`, `sql_drop`) that write every DDL statement into the WAL as a transactional
//! logical decoding message (`pg_logical_emit_message(true, 'pgferry', <json>)`), so it reaches cdc
//! inside its transaction, in order with the data changes around it (pgoutput's `messages` option,
//! PostgreSQL 14+).
//!
//! Objects, in the schema [`CAPTURE_SCHEMA`] of the source database:
//! - `pgferry_ddl_trigger_<migration>()`: the event trigger function, with the rights of whoever
//!   runs the DDL; it only passes the event, the command tag and `current_user` on.
//! - `pgferry_ddl_capture_<migration>(event, tag, role)`: `SECURITY DEFINER` (owned by the role that
//!   installed it, a superuser), so an application role needs no right on the publication. It reads
//!   what the statement touched (`pg_event_trigger_ddl_commands()` / `..._dropped_objects()`, which
//!   refuse to run outside an event trigger: calling it by hand emits nothing), adds a new table
//!   that matches the plan's selection to the publication (in the same transaction, so none of its
//!   rows is missed; a keyless one gets `REPLICA IDENTITY FULL` first, as its UPDATEs and DELETEs
//!   would fail once published, and cdc records it for cleanup to undo), and emits the message: the migration, the event, the tag, the whole client
//!   query string (`current_query()`), `search_path`, the role (the caller's, when the session's
//!   user may be it), a key identifying the client query string (`statement_timestamp()` and its
//!   md5: one string with several statements fires once per statement, cdc replays it once), the
//!   objects with the `[schema, table]` each belongs to (a partition's: its root's), and the tables
//!   it published.
//! - the event triggers `pgferry_ddl_end_<migration>` and `pgferry_ddl_drop_<migration>`.
//!
//! pgferry's own sessions (`application_name` `pgferry ...`) are not captured: the DDL the tool
//! runs on the source (replica identities, the publication) is not the application's.

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::pg::ident::{quote_ident, quote_literal};
use crate::pg::names::{CAPTURE_SCHEMA, capture_object_name, name_stem, publication_name};
use crate::select::Selection;

/// The prefix of the capture's logical decoding messages.
pub const MESSAGE_PREFIX: &str = "pgferry";

/// The SQL condition (on the text expression `name`, `schema.table`) that a table is selected.
fn selection_condition(selection: &Selection, name: &str) -> String {
    let any = |globs: &[crate::select::Glob]| -> String {
        globs
            .iter()
            .map(|g| format!("{name} ~ {}", quote_literal(&g.to_regex())))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let include = if selection.include.is_empty() {
        "true".to_string()
    } else {
        format!("({})", any(&selection.include))
    };
    if selection.exclude.is_empty() {
        include
    } else {
        format!("{include} AND NOT ({})", any(&selection.exclude))
    }
}

fn qualified(migration: &str, what: &str) -> String {
    format!(
        "{}.{}",
        quote_ident(CAPTURE_SCHEMA),
        quote_ident(&capture_object_name(migration, what))
    )
}

/// The statements that install (or replace) the capture of `migration` in one source database.
pub fn install_sql(migration: &str, selection: &Selection) -> String {
    let schema = quote_ident(CAPTURE_SCHEMA);
    let capture = qualified(migration, "capture");
    let trigger = qualified(migration, "trigger");
    let end = quote_ident(&capture_object_name(migration, "end"));
    let drop = quote_ident(&capture_object_name(migration, "drop"));
    let stem = quote_literal(&name_stem(migration));
    let publication = quote_literal(&publication_name(migration));
    let selected = selection_condition(selection, "(n.nspname::text || '.' || t.relname::text)");
    format!(
        r#"CREATE SCHEMA IF NOT EXISTS {schema};
CREATE OR REPLACE FUNCTION {capture}(event text, tag text, role text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $pgferry$
DECLARE
  objs jsonb;
  tabs jsonb;
  t jsonb;
  fulls jsonb := '[]';
  outside jsonb;
  cols jsonb;
  failure text;
BEGIN
  IF event = 'sql_drop' THEN
    SELECT jsonb_agg(jsonb_build_object(
             'type', d.object_type, 'identity', d.object_identity,
             'table', CASE WHEN d.object_type IN ('table', 'table column')
                                AND array_length(d.address_names, 1) >= 2
                           THEN to_jsonb(d.address_names[1:2]) END))
      INTO objs FROM pg_event_trigger_dropped_objects() d;
  ELSE
    SELECT jsonb_agg(jsonb_build_object(
             'type', c.object_type, 'identity', c.object_identity,
             'table', (SELECT jsonb_build_array(n.nspname, t.relname)
                         FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
                        WHERE t.relkind IN ('r', 'p')
                          AND t.oid = coalesce(pg_partition_root(r.rel), r.rel))))
      INTO objs
      FROM pg_event_trigger_ddl_commands() c,
           LATERAL (SELECT CASE c.classid
                          WHEN 'pg_class'::regclass THEN
                            coalesce((SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = c.objid), c.objid)
                          WHEN 'pg_trigger'::regclass THEN
                            (SELECT g.tgrelid FROM pg_trigger g WHERE g.oid = c.objid)
                          WHEN 'pg_constraint'::regclass THEN
                            (SELECT k.conrelid FROM pg_constraint k WHERE k.oid = c.objid)
                          WHEN 'pg_attrdef'::regclass THEN
                            (SELECT a.adrelid FROM pg_attrdef a WHERE a.oid = c.objid)
                          END::regclass AS rel) r
     WHERE NOT c.in_extension;
    SELECT jsonb_agg(DISTINCT jsonb_build_array(n.nspname, t.relname))
      INTO tabs
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_class t ON c.classid = 'pg_class'::regclass AND t.oid = c.objid
      JOIN pg_namespace n ON n.oid = t.relnamespace
     WHERE c.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
       AND t.relkind IN ('r', 'p') AND t.relpersistence = 'p' AND NOT t.relispartition
       AND {selected};
    -- A table renamed or moved into the selection is not published: cdc stops on it.
    SELECT jsonb_agg(DISTINCT jsonb_build_array(n.nspname, t.relname))
      INTO outside
      FROM pg_event_trigger_ddl_commands() c
      JOIN pg_class t ON c.classid = 'pg_class'::regclass AND t.oid = c.objid
      JOIN pg_namespace n ON n.oid = t.relnamespace
     WHERE c.command_tag IN ('ALTER TABLE')
       AND t.relkind IN ('r', 'p') AND t.relpersistence = 'p' AND NOT t.relispartition
       AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                        WHERE p.pubname = {publication} AND pr.prrelid = t.oid)
       AND {selected};
    -- The columns of the tables an ALTER TABLE touched, by number: a later rename or drop on the
    -- source does not lose cdc the column whose values it copies (a volatile default).
    IF tag = 'ALTER TABLE' THEN
      SELECT jsonb_agg(jsonb_build_object(
               'schema', n.nspname, 'table', t.relname, 'rel', t.oid::bigint,
               'cols', (SELECT jsonb_object_agg(a.attname, a.attnum) FROM pg_attribute a
                         WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped)))
        INTO cols
        FROM (SELECT DISTINCT coalesce(pg_partition_root(c.objid), c.objid) AS rel
                FROM pg_event_trigger_ddl_commands() c
               WHERE c.classid = 'pg_class'::regclass AND NOT c.in_extension) o
        JOIN pg_class t ON t.oid = o.rel AND t.relkind IN ('r', 'p')
        JOIN pg_namespace n ON n.oid = t.relnamespace;
    END IF;
    BEGIN
      PERFORM set_config('pgferry.capture_off', 'on', true);
      FOR t IN SELECT * FROM jsonb_array_elements(coalesce(tabs, '[]')) LOOP
        -- A published table without a key would refuse its UPDATEs and DELETEs on the source.
        IF NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = t->>0 AND c.relname = t->>1
                          AND (c.relkind = 'p' OR c.relreplident IN ('f', 'i')
                               OR (c.relreplident = 'd' AND EXISTS (
                                     SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))) THEN
          EXECUTE format('ALTER TABLE %I.%I REPLICA IDENTITY FULL', t->>0, t->>1);
          fulls := fulls || jsonb_build_array(t);
        END IF;
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I', {publication}, t->>0, t->>1);
      END LOOP;
      PERFORM set_config('pgferry.capture_off', 'off', true);
    EXCEPTION WHEN OTHERS THEN
      failure := SQLERRM;
      tabs := NULL;
      fulls := '[]';
    END;
  END IF;
  PERFORM pg_logical_emit_message(true, 'pgferry', jsonb_build_object(
    'm', {stem}, 'event', event, 'tag', tag,
    'query', current_query(),
    'search_path', current_setting('search_path'),
    'role', CASE WHEN pg_has_role(session_user, role, 'MEMBER') THEN role ELSE session_user::text END,
    'key', statement_timestamp()::text || ' ' || md5(coalesce(current_query(), '')),
    'objects', coalesce(objs, '[]'),
    'published', coalesce(tabs, '[]'),
    'identity_full', fulls,
    'unpublished', coalesce(outside, '[]'),
    'columns', coalesce(cols, '[]'),
    'error', failure)::text);
  IF tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
    -- The new table's rows were written before it was published, so the stream would not carry
    -- them: written again now that it is, after the statement's message (cdc creates the table
    -- first) and a TRUNCATE the stream carries too (it empties what the target computed). The
    -- table is new in this transaction: no trigger, index, rule or reference sees this.
    PERFORM set_config('pgferry.capture_off', 'on', true);
    FOR t IN SELECT * FROM jsonb_array_elements(coalesce(tabs, '[]')) LOOP
      EXECUTE format('CREATE TEMPORARY TABLE pgferry_ctas_rows ON COMMIT DROP AS SELECT * FROM %I.%I', t->>0, t->>1);
      EXECUTE format('TRUNCATE %I.%I', t->>0, t->>1);
      EXECUTE format('INSERT INTO %I.%I SELECT * FROM pg_temp.pgferry_ctas_rows', t->>0, t->>1);
      DROP TABLE pg_temp.pgferry_ctas_rows;
    END LOOP;
    PERFORM set_config('pgferry.capture_off', 'off', true);
  END IF;
END
$pgferry$;
REVOKE ALL ON FUNCTION {capture}(text, text, text) FROM PUBLIC;
CREATE OR REPLACE FUNCTION {trigger}() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $pgferry$
BEGIN
  IF current_setting('application_name') LIKE 'pgferry %'
     OR coalesce(current_setting('pgferry.capture_off', true), '') = 'on' THEN
    RETURN;
  END IF;
  PERFORM {capture}(TG_EVENT, TG_TAG, current_user::text);
END
$pgferry$;
GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
GRANT EXECUTE ON FUNCTION {capture}(text, text, text) TO PUBLIC;
DROP EVENT TRIGGER IF EXISTS {end};
DROP EVENT TRIGGER IF EXISTS {drop};
CREATE EVENT TRIGGER {end} ON ddl_command_end EXECUTE PROCEDURE {trigger}();
CREATE EVENT TRIGGER {drop} ON sql_drop EXECUTE PROCEDURE {trigger}();
"#
    )
}

/// Installs (or replaces) the capture of `migration`, in one transaction.
pub async fn install(client: &Client, migration: &str, selection: &Selection) -> Result<()> {
    client
        .batch_execute(&format!(
            "BEGIN; {} COMMIT;",
            install_sql(migration, selection)
        ))
        .await
        .map_err(|e| {
            Error::pg(&e, "installing the DDL capture (event triggers)").hint(
                "`ddl = \"replicate\"` needs a source role that may create event triggers: a superuser (on Amazon RDS, a member of rds_superuser); otherwise set `ddl = \"stop\"` on the cdc stage",
            )
        })
}

/// Whether the capture of `migration` is installed in the database of `client`.
pub async fn installed(client: &Client, migration: &str) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_event_trigger WHERE evtname IN ($1, $2)",
            &[
                &capture_object_name(migration, "end"),
                &capture_object_name(migration, "drop"),
            ],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking for the DDL capture's event triggers"))?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Removes the capture of `migration` (its event triggers, then its functions, then the schema
/// when nothing else is left in it). Returns whether there was anything to remove. Idempotent.
pub async fn remove(client: &Client, migration: &str) -> Result<bool> {
    let had = installed(client, migration).await?;
    let schema_exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
            &[&CAPTURE_SCHEMA],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking for the DDL capture's schema"))?
        .get(0);
    if !had && !schema_exists {
        return Ok(false);
    }
    let sql = format!(
        "BEGIN; \
         DROP EVENT TRIGGER IF EXISTS {end}; \
         DROP EVENT TRIGGER IF EXISTS {drop}; \
         DROP FUNCTION IF EXISTS {trigger}(); \
         DROP FUNCTION IF EXISTS {capture}(text, text, text); \
         COMMIT;",
        end = quote_ident(&capture_object_name(migration, "end")),
        drop = quote_ident(&capture_object_name(migration, "drop")),
        trigger = qualified(migration, "trigger"),
        capture = qualified(migration, "capture"),
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| Error::pg(&e, "removing the DDL capture (event triggers)"))?;
    // The schema goes when no other migration's capture is in it.
    let empty: bool = client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
               JOIN pg_catalog.pg_namespace n ON d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND d.refobjid = n.oid \
              WHERE n.nspname = $1)",
            &[&CAPTURE_SCHEMA],
        )
        .await
        .map_err(|e| Error::pg(&e, "looking into the DDL capture's schema"))?
        .get(0);
    if empty && schema_exists {
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {}",
                quote_ident(CAPTURE_SCHEMA)
            ))
            .await
            .map_err(|e| Error::pg(&e, "dropping the DDL capture's schema"))?;
    }
    Ok(had)
}

/// Whether the connected role may create event triggers: a superuser, or (Amazon RDS / Aurora) a
/// member of `rds_superuser`.
pub async fn can_install(client: &Client) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT r.rolsuper OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles s \
                WHERE s.rolname = 'rds_superuser' AND pg_catalog.pg_has_role(current_user, s.oid, 'MEMBER')) \
               FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| Error::pg(&e, "checking whether the source role may create event triggers"))?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_becomes_a_condition() {
        let s = Selection::new(&["public.*".into()], &["public.audit_*".into()]);
        assert_eq!(
            selection_condition(&s, "x"),
            "(x ~ E'^public\\\\..*$') AND NOT (x ~ E'^public\\\\.audit_.*$')"
        );
        let all = Selection::new(&[], &[]);
        assert_eq!(selection_condition(&all, "x"), "true");
    }
}
