//! The full load against real clusters: exact copies (row digests on both sides), from one snapshot,
//! split tables, generated and identity columns, large objects, the online slot snapshot, and resume
//! after SIGKILL.

use crate::support;

use std::time::Duration;

use crate::support::{Cluster, Gate, TestPlan, pair, row_digest, show, wait_for};

/// Applies the source's pre-data schema to the target with the installed pg_dump | psql, standing in
/// for the schema_dump and provision stages.
fn copy_schema(source: &Cluster, sdb: &str, target: &Cluster, tdb: &str) {
    support::cluster::pipe_dump(
        source,
        sdb,
        &["--schema-only", "--section=pre-data"],
        target,
        tdb,
    );
}

/// Every ordinary table (and partition) of a database, quoted.
fn tables(c: &Cluster, db: &str) -> Vec<String> {
    c.psql(
        db,
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') ORDER BY 1",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn assert_same_data(sdb: &str, tdb: &str) {
    let p = pair();
    let list = tables(&p.source, sdb);
    assert!(!list.is_empty());
    for t in &list {
        assert_eq!(
            row_digest(&p.source, sdb, t),
            row_digest(&p.target, tdb, t),
            "table {t} differs"
        );
    }
}

const OFFLINE: &str = "[stages.pre]\nkind = \"preflight\"\n\n[stages.load]\nkind = \"full_load\"\nafter = [\"pre\"]\njobs = 3\n";

#[test]
fn pagila_is_copied_exactly() {
    let p = pair();
    let s = p.source.fresh_database("fl_pagila_src");
    if !support::load_pagila(&p.source, &s) {
        return;
    }
    let t = p.target.fresh_database("fl_pagila_tgt");
    copy_schema(&p.source, &s, &p.target, &t);
    let plan = TestPlan::new(p, "fl_pagila", &s, &t, OFFLINE);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_same_data(&s, &t);
    // Every table (partitions included) has a checkpoint with its row count.
    let copied = p.target.psql(
        &t,
        "SELECT count(*) FROM pgferry.tables WHERE migration = 'fl_pagila' AND state = 'copied'",
    );
    assert_eq!(copied, tables(&p.source, &s).len().to_string());
    let rental = p.target.psql(&t, "SELECT rows FROM pgferry.tables WHERE migration = 'fl_pagila' AND table_name = 'public.rental'");
    assert_eq!(
        rental,
        p.source.psql(&s, "SELECT count(*) FROM ONLY public.rental")
    );
    // COPY FREEZE: the copied pages are all-frozen already (no anti-wraparound vacuum needed).
    p.target
        .psql(&t, "CREATE EXTENSION IF NOT EXISTS pg_visibility");
    let frozen = p.target.psql(
        &t,
        "SELECT v.all_frozen = pg_relation_size('public.rental') / 8192 FROM pg_visibility_map_summary('public.rental') v",
    );
    assert_eq!(frozen, "t", "public.rental should be frozen by COPY FREEZE");
}

/// A load killed after a commit and before its checkpoint leaves rows that the next run must
/// replace, in each way a table is loaded: a big table alone (TRUNCATE + COPY FREEZE), small tables
/// in one group transaction (DELETE + COPY), tables the snapshot sees empty (not copied: emptied
/// only where the target has rows).
#[test]
fn rows_already_on_the_target_are_replaced_in_every_path() {
    let p = pair();
    let s = p.source.fresh_database("fl_stale_src");
    let t = p.target.fresh_database("fl_stale_tgt");
    p.source.psql(
        &s,
        "CREATE TABLE public.big (id int PRIMARY KEY, pad text);
         INSERT INTO public.big SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g;
         CREATE TABLE public.small1 (id int, v text);
         INSERT INTO public.small1 SELECT g, 'v' || g FROM generate_series(1, 10) g;
         CREATE TABLE public.small2 (id int);
         INSERT INTO public.small2 SELECT generate_series(1, 3);
         CREATE TABLE public.empty1 (id int);
         CREATE TABLE public.empty2 (id int);
         ANALYZE;",
    );
    copy_schema(&p.source, &s, &p.target, &t);
    p.target.psql(
        &t,
        "INSERT INTO public.big VALUES (-1, 'stale'), (1, 'duplicate');
         INSERT INTO public.small1 VALUES (-1, 'stale'), (1, 'duplicate');
         INSERT INTO public.empty1 VALUES (-1);",
    );
    let plan = TestPlan::new(
        p,
        "fl_stale",
        &s,
        &t,
        "[stages.load]\nkind = \"full_load\"\njobs = 1\n",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_same_data(&s, &t);
    assert_eq!(
        p.target.psql(&t, "SELECT string_agg(table_name || '=' || rows, ',' ORDER BY table_name) FROM pgferry.tables WHERE migration = 'fl_stale' AND state = 'copied'"),
        "public.big=20000,public.empty1=0,public.empty2=0,public.small1=10,public.small2=3"
    );
    // The small tables were loaded in one transaction; the big one alone, frozen.
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(DISTINCT xmin::text) FROM (SELECT xmin FROM public.small1 UNION ALL SELECT xmin FROM public.small2) x"
        ),
        "1"
    );
    p.target
        .psql(&t, "CREATE EXTENSION IF NOT EXISTS pg_visibility");
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT v.all_frozen = pg_relation_size('public.big') / 8192 FROM pg_visibility_map_summary('public.big') v"
        ),
        "t"
    );
}

#[test]
fn special_columns_split_tables_and_large_objects() {
    let p = pair();
    let s = p.source.fresh_database("fl_special_src");
    let t = p.target.fresh_database("fl_special_tgt");
    p.source.psql(
        &s,
        "CREATE TABLE public.gen (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a int, doubled int GENERATED ALWAYS AS (a * 2) STORED, note text);
         INSERT INTO public.gen (a, note) SELECT g, 'n' || g FROM generate_series(1, 1000) g;
         CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE public.\"Mixed Case\" (\"select\" int PRIMARY KEY, m public.mood, arr int[], j jsonb, b bytea, n numeric, ts timestamptz, r int4range);
         INSERT INTO public.\"Mixed Case\" VALUES (1, 'ok', '{1,2}', '{\"a\": 1}', '\\x00ff', 'NaN', 'infinity', '[1,5)'), (2, NULL, NULL, NULL, NULL, 1.5, '-infinity', 'empty');
         CREATE TABLE public.big_pk (id bigint PRIMARY KEY, pad text);
         INSERT INTO public.big_pk SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 40000) g;
         CREATE TABLE public.big_nopk (v int, pad text);
         INSERT INTO public.big_nopk SELECT g % 100, repeat(md5(g::text), 8) FROM generate_series(1, 40000) g;
         SELECT lo_from_bytea(0, convert_to(repeat('large object ', 1000), 'UTF8'));
         SELECT lo_from_bytea(0, '\\x0102');
         ANALYZE;",
    );
    copy_schema(&p.source, &s, &p.target, &t);
    let stages =
        "[stages.load]\nkind = \"full_load\"\njobs = 3\nsplit_tables_larger_than = \"1MB\"\n";
    let plan = TestPlan::new(p, "fl_special", &s, &t, stages);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_same_data(&s, &t);
    // The generated column was computed by the target; the identity values were kept.
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT sum(doubled) = 2 * sum(a) AND max(id) = 1000 FROM public.gen"
        ),
        "t"
    );
    // The big tables were split into ranges.
    let ranges = p.target.psql(&t, "SELECT count(*) FROM pgferry.tables WHERE migration = 'fl_special' AND table_name LIKE 'public.big_%#%'");
    assert!(ranges.parse::<i32>().unwrap() >= 4, "ranges: {ranges}");
    // Large objects are equal.
    let lo = "SELECT string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid) FROM pg_largeobject_metadata";
    assert_eq!(p.source.psql(&s, lo), p.target.psql(&t, lo));
    // A second run copies nothing again.
    let out = plan.run(&["run"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to do"),
        "{}",
        show(&out)
    );
}

#[test]
fn online_load_uses_the_slot_snapshot_and_resumes_after_sigkill() {
    let p = pair();
    let s = p.source.fresh_database("fl_online_src");
    let t = p.target.fresh_database("fl_online_tgt");
    p.source.psql(
        &s,
        "CREATE TABLE public.a (id int PRIMARY KEY, pad text);
         INSERT INTO public.a SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g;
         CREATE TABLE public.b (id int PRIMARY KEY, pad text);
         INSERT INTO public.b SELECT g, repeat('y', 200) FROM generate_series(1, 40000) g;
         CREATE TABLE public.c (id int PRIMARY KEY);
         INSERT INTO public.c SELECT generate_series(1, 10);",
    );
    copy_schema(&p.source, &s, &p.target, &t);
    let stages = "[stages.load]\nkind = \"full_load\"\njobs = 1\n\n[stages.cdc]\nkind = \"cdc\"\nafter = [\"load\"]\n\n[stages.cleanup]\nkind = \"cleanup\"\nafter = [\"load\"]\n";
    let plan = TestPlan::new(p, "fl_online", &s, &t, stages);
    // Tables go largest first, one at a time: public.b is copied, then the copy of public.a stops
    // at the test's gate on the target, where the runner is killed.
    Gate::install(&p.target, &t, "public.a");
    let gate = Gate::close(&p.target, &t);
    let mut child = plan.spawn(&["run", "--until", "load"]);
    gate.wait_blocked(&p.target, "pgferry%", Duration::from_secs(60));
    assert_eq!(
        p.target.psql(&t, "SELECT string_agg(table_name || '=' || state, ',' ORDER BY table_name) FROM pgferry.tables WHERE migration = 'fl_online' AND state IN ('copying', 'copied')"),
        "public.a=copying,public.b=copied"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    gate.open();
    Gate::uninstall(&p.target, &t, "public.a");
    let slot = p.source.psql(
        &s,
        "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'pgferry_fl_online_%'",
    );
    assert!(!slot.is_empty(), "the slot was created");
    let first_lsn = p.target.psql(
        &t,
        "SELECT lsn FROM pgferry.tables WHERE migration = 'fl_online' AND state = 'copied'",
    );
    let slot_lsn = p.source.psql(
        &s,
        &format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    );
    assert_eq!(
        first_lsn, slot_lsn,
        "the first table was copied at the slot's consistent point"
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT lsn FROM pgferry.positions WHERE migration = 'fl_online' AND name LIKE 'slot:%'"
        ),
        slot_lsn
    );

    // Writes between the runs: the resumed copy sees them, at a later LSN.
    p.source.psql(&s, "INSERT INTO public.c VALUES (11); UPDATE public.a SET pad = 'changed' WHERE id = 1; UPDATE public.b SET pad = 'changed' WHERE id = 1");
    let out = plan.run(&["run", "--until", "load"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let lsns = p.target.psql(
        &t,
        "SELECT count(DISTINCT lsn) FROM pgferry.tables WHERE migration = 'fl_online' AND state = 'copied' AND table_name NOT LIKE '%#%'",
    );
    assert_eq!(
        lsns, "2",
        "tables copied after the resume carry the new snapshot's LSN"
    );
    // Tables copied after the resume equal the source now; the one copied before is as of the slot.
    for table in tables(&p.source, &s) {
        let copied_before = p.target.psql(&t, &format!(
            "SELECT lsn = '{first_lsn}' FROM pgferry.tables WHERE migration = 'fl_online' AND table_name = '{}'",
            table.replace('"', "")
        ));
        if copied_before != "t" {
            assert_eq!(
                row_digest(&p.source, &s, &table),
                row_digest(&p.target, &t, &table),
                "table {table}"
            );
        }
    }
    // Only the permanent slot remains (the temporary one died with its session).
    wait_for("the temporary slot to go", Duration::from_secs(10), || {
        p.source.psql(
            "postgres",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry_tmp_%'",
        ) == "0"
    });

    // The cleanup stage drops the slot (and would drop the publication), idempotently.
    let out = plan.run(&["run", "--until", "cleanup"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ran cleanup"),
        "{}",
        show(&out)
    );
    assert_eq!(
        p.source.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")
        ),
        "0"
    );
}
