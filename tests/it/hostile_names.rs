//! Hostile names against real clusters: a schema named `x"; DROP TABLE y; --`, tables and columns
//! named `select`, `Ünïcødé table`, `a b`, `semi;colon` and `"quoted"`, with an index, a
//! standalone sequence used by a default, a foreign key and a partitioned table among them. An
//! offline plan and an online plan (changes during cdc, then a manual cutover) migrate them: every
//! table's rows are equal on both sides (row digests), the index, the foreign key, the partitions
//! and the sequence value arrived, and `public.y` — the injection's target — still exists.

use std::time::Duration;

use crate::support::{Cluster, TestPlan, pair, row_digest, show, wait_for_exit};

const SCHEMA: &str = r#""x""; DROP TABLE y; --""#;

fn setup_sql() -> String {
    let s = SCHEMA;
    format!(
        r#"CREATE TABLE public.y (id int PRIMARY KEY);
INSERT INTO public.y VALUES (1);
CREATE SCHEMA {s};
CREATE SEQUENCE {s}."seq;""s"" 1" START 100;
CREATE TABLE {s}."select" (
    "a b" int PRIMARY KEY,
    "semi;colon" text,
    """quoted""" text DEFAULT 'q',
    "select" bigint NOT NULL DEFAULT nextval('{s_lit}."seq;""s"" 1"')
);
CREATE INDEX "idx ""x""; DROP TABLE y; --" ON {s}."select" ("semi;colon");
CREATE TABLE public."Ünïcødé table" (
    id serial PRIMARY KEY,
    "Ünïcødé" text,
    "ref a b" int REFERENCES {s}."select" ("a b")
);
CREATE TABLE public."a b" ("semi;colon" int, "select" text);
ALTER TABLE public."a b" REPLICA IDENTITY FULL;
CREATE TABLE {s}."semi;colon" (id int, k text, "v a;l" text, PRIMARY KEY (id, k)) PARTITION BY LIST (k);
CREATE TABLE {s}."semi;colon 1" PARTITION OF {s}."semi;colon" FOR VALUES IN ('a');
CREATE TABLE {s}."semi;colon ""2""" PARTITION OF {s}."semi;colon" FOR VALUES IN ('b');
INSERT INTO {s}."select" ("a b", "semi;colon") SELECT g, 'row ' || g || '; DROP TABLE y; --' FROM generate_series(1, 200) g;
INSERT INTO public."Ünïcødé table" ("Ünïcødé", "ref a b") SELECT 'ünï ' || g, 1 + g % 200 FROM generate_series(1, 300) g;
INSERT INTO public."a b" SELECT g, 'ab ' || g FROM generate_series(1, 50) g;
INSERT INTO {s}."semi;colon" SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END, 'v' || g FROM generate_series(1, 100) g;
"#,
        // Inside a string literal the schema's own quotes stay, the single quotes double.
        s_lit = s.replace('\'', "''"),
    )
}

/// Changes on every hostile table (cdc applies them).
fn changes_sql() -> String {
    let s = SCHEMA;
    format!(
        r#"INSERT INTO {s}."select" ("a b", "semi;colon") VALUES (1000, 'new'), (1001, 'new 2');
UPDATE {s}."select" SET "semi;colon" = 'upd', """quoted""" = 'it''s' WHERE "a b" BETWEEN 10 AND 20;
DELETE FROM public."Ünïcødé table" WHERE id % 7 = 0;
UPDATE public."Ünïcødé table" SET "Ünïcødé" = 'çhängéd' WHERE id % 5 = 0;
INSERT INTO public."Ünïcødé table" ("Ünïcødé", "ref a b") VALUES ('nëw', 1000);
DELETE FROM public."a b" WHERE "semi;colon" < 5;
UPDATE public."a b" SET "select" = 'x"; DROP TABLE y; --' WHERE "semi;colon" = 10;
INSERT INTO {s}."semi;colon" VALUES (500, 'a', 'live'), (501, 'b', 'live');
UPDATE {s}."semi;colon" SET "v a;l" = 'upd' WHERE id < 10;
DELETE FROM {s}."semi;colon" WHERE id BETWEEN 20 AND 30;
"#
    )
}

fn tables(c: &Cluster, db: &str) -> Vec<String> {
    c.psql(
        db,
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') ORDER BY 1",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Same tables with the same rows, the index, the foreign key and the partitions in place, and
/// `public.y` untouched.
fn assert_same(sdb: &str, tdb: &str) {
    let p = pair();
    let list = tables(&p.source, sdb);
    assert_eq!(list.len(), 7, "{list:?}");
    assert_eq!(list, tables(&p.target, tdb), "the target has other tables");
    for t in &list {
        let (a, b) = (row_digest(&p.source, sdb, t), row_digest(&p.target, tdb, t));
        assert_eq!(a, b, "table {t} differs");
        assert!(!a.starts_with("0:"), "{t} is empty");
    }
    assert_eq!(p.target.psql(tdb, "SELECT count(*) FROM public.y"), "1");
    let objects = "SELECT (SELECT string_agg(indexrelid::regclass::text, ',' ORDER BY indexrelid::regclass::text) FROM pg_index \
                   WHERE indexrelid::regclass::text LIKE '%idx%' AND indexrelid::regclass::text NOT LIKE 'pgferry.%'), \
                   (SELECT string_agg(conrelid::regclass::text || ' ' || pg_get_constraintdef(oid), ',' ORDER BY conname) \
                   FROM pg_constraint WHERE contype = 'f'), \
                   (SELECT string_agg(inhrelid::regclass::text || ' ' || pg_get_expr(c.relpartbound, c.oid), ',' ORDER BY c.relname) \
                   FROM pg_inherits JOIN pg_class c ON c.oid = inhrelid)";
    let on_source = p.source.psql(sdb, objects);
    assert!(
        on_source.contains("idx ") && on_source.contains("REFERENCES"),
        "{on_source}"
    );
    assert_eq!(on_source, p.target.psql(tdb, objects));
}

fn sequence_value(c: &Cluster, db: &str) -> String {
    c.psql(
        db,
        &format!("SELECT last_value || ' ' || is_called FROM {SCHEMA}.\"seq;\"\"s\"\" 1\""),
    )
}

#[test]
fn offline_plan_migrates_hostile_names() {
    let p = pair();
    let s = p.source.fresh_database("hostile_off_src");
    let t = p.target.fresh_database("hostile_off_tgt");
    p.source.psql(&s, &setup_sql());
    let plan = TestPlan::new(
        p,
        "hostile_offline",
        &s,
        &t,
        "[stages.preflight]\nkind = \"preflight\"\n\n\
         [stages.schema]\nkind = \"schema_dump\"\nafter = [\"preflight\"]\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
         [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"indexes\"]\n",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_same(&s, &t);
    assert_eq!(sequence_value(&p.source, &s), "299 true");
    assert_eq!(sequence_value(&p.target, &t), "299 true");
    // Status names the hostile tables without breaking its JSON.
    let out = plan.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)));
    assert!(json.to_string().contains("Ünïcødé table"), "{json}");
}

#[test]
fn online_plan_with_cdc_and_cutover_migrates_hostile_names() {
    let p = pair();
    let s = p.source.fresh_database("hostile_on_src");
    let t = p.target.fresh_database("hostile_on_tgt");
    p.source.psql(&s, &setup_sql());
    let plan = TestPlan::new(
        p,
        "hostile_online",
        &s,
        &t,
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\n\n\
         [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n",
    );
    let mut child = plan.spawn(&["run"]);
    plan.wait_until_cdc_ready(p, &mut child);
    p.source.psql(&s, &changes_sql());
    let out = plan.run(&["cutover"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = wait_for_exit(child, "the run to finish", Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_same(&s, &t);
    assert_eq!(sequence_value(&p.source, &s), "301 true");
    assert_eq!(sequence_value(&p.target, &t), "301 true");
}

/// The online plan as a managed service's roles on both sides (`tests/support/managed.rs`): the
/// source's objects owned by the application's role, the target's admin no superuser, so cdc applies
/// in the managed mode, holding a trigger and the foreign key with hostile names, which the cutover
/// puts back.
#[test]
fn online_plan_as_managed_roles_migrates_hostile_names() {
    use crate::support::managed::{self, APP_WRITER};
    let p = pair();
    let s = p.source.fresh_database("hostile_mg_src");
    let t = format!("{s}_tgt");
    let schema = SCHEMA;
    p.source.psql(
        &s,
        &format!(
            "{}CREATE FUNCTION {schema}.\"trg; fn\"() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.\"semi;colon\" := NEW.\"semi;colon\" || ' (trigger)'; RETURN NEW; END $$;\n\
             CREATE TRIGGER \"trg \"\"x\"\"; DROP TABLE y; --\" BEFORE INSERT OR UPDATE ON {schema}.\"select\" FOR EACH ROW EXECUTE FUNCTION {schema}.\"trg; fn\"();\n",
            setup_sql()
        ),
    );
    managed::make_managed_source(&p.source, &s);
    let plan = managed::managed_plan(
        p,
        "hostile_managed",
        &s,
        &t,
        "[stages.schema]\nkind = \"schema_dump\"\nno_owner = true\nno_privileges = true\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\nfence = \"read_only\"\n\n\
         [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
         [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"sequences\"]\n",
    );
    let mut child = plan.spawn(&["run"]);
    managed::wait_for_database(&p.target, &t);
    plan.wait_until_cdc_ready(p, &mut child);
    // Held while cdc applies: the hostile trigger disabled, the foreign key dropped.
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT string_agg(kind || ' ' || name, ',' ORDER BY kind) FROM pgferry.cdc_held"
        ),
        "foreign_key Ünïcødé table_ref a b_fkey,trigger trg \"x\"; DROP TABLE y; --"
    );
    managed::psql_as(&p.source, APP_WRITER, &s, &changes_sql()).expect("the application's changes");
    let out = plan.run(&["cutover"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = wait_for_exit(child, "the run to finish", Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // The trigger fired on the source only; cdc carried its result, not a second firing.
    assert_eq!(
        p.source.psql(&s, &format!("SELECT count(*) FROM {schema}.\"select\" WHERE \"semi;colon\" LIKE '% (trigger) (trigger)'")),
        "0"
    );
    assert_same(&s, &t);
    assert_eq!(sequence_value(&p.target, &t), sequence_value(&p.source, &s));
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FROM pgferry.cdc_held"),
        "0"
    );
    let triggers = "SELECT string_agg(tgname || ' ' || tgenabled::text, ',') FROM pg_trigger WHERE NOT tgisinternal";
    assert_eq!(p.target.psql(&t, triggers), p.source.psql(&s, triggers));
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND convalidated"
        ),
        "1"
    );
    assert_eq!(
        p.source.psql(
            &s,
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'select'"
        ),
        managed::APP_OWNER
    );
}
