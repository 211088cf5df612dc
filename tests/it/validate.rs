//! The validate stage and `pgferry verify` against real clusters: an offline copy of a small
//! database with awkward types and names is identical (empty report, exit 0); then a target row is
//! changed, one deleted, one added, a sequence set back — in turn — and each time the report names
//! exactly that row (kind, key, columns) and the exit code is 3. Count and full modes, the stage
//! failing inside `pgferry run` with `status` showing `dataErrorsCount`, and an online verify on
//! Pagila while a writer changes the source and cdc applies.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{TestPlan, pair, row_digest, show, wait_for};
use serde_json::{Value, json};

const SETUP: &str = r#"
CREATE SCHEMA "Mixed Case";
CREATE TABLE "Mixed Case"."Order" (
    "select" int PRIMARY KEY, "Value" numeric, ts timestamptz, t timestamp, b bytea, j jsonb,
    arr int[], f float8, iv interval, d date);
INSERT INTO "Mixed Case"."Order" VALUES
    (1, 'NaN', 'infinity', '-infinity', '\x00ff', '{"a": [1, 2]}', '{1,2,NULL}', 'NaN', '1 day 2 hours', 'infinity'),
    (2, 1.5, '-infinity', 'infinity', '\x', '[]', '{}', 'Infinity', '-3 mons', '2020-02-29'),
    (3, -0.000001, '2024-03-31 02:30:00+02', '1999-12-31 23:59:59.999999', NULL, 'null', NULL, 0.1, '0', NULL),
    (4, 12345678901234567890.123, '1970-01-01 00:00:00+00', NULL, '\xdeadbeef', '{"ü": "ß"}', '{-1}', -0.0, NULL, '0001-01-01 BC');
CREATE TABLE public.items (
    id bigserial PRIMARY KEY, name text NOT NULL, price numeric(12, 2),
    name_len int GENERATED ALWAYS AS (length(name)) STORED);
INSERT INTO public.items (name, price) SELECT 'item ' || g, g / 7.0 FROM generate_series(1, 30000) g;
CREATE TABLE public.nokey (a int, b text);
INSERT INTO public.nokey VALUES (1, 'same'), (1, 'same'), (2, 'other'), (3, NULL);
CREATE TABLE public.composite (a int NOT NULL, b text NOT NULL, v text, UNIQUE (a, b));
INSERT INTO public.composite SELECT g % 100, 'k' || g, 'v' || g FROM generate_series(1, 5000) g;
CREATE TABLE public.events (at timestamptz PRIMARY KEY, v int);
INSERT INTO public.events SELECT '2020-01-01 00:00:00+00'::timestamptz + g * interval '1 hour 1 second', g FROM generate_series(1, 20000) g;
CREATE TABLE public.words (w text PRIMARY KEY, n int);
INSERT INTO public.words SELECT md5(g::text), g FROM generate_series(1, 20000) g;
CREATE SEQUENCE public.standalone;
SELECT nextval('public.standalone') FROM generate_series(1, 5);
"#;

fn stages(mode: &str) -> String {
    format!(
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
         [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"indexes\"]\n\n\
         [stages.validate]\nkind = \"validate\"\nafter = [\"sequences\"]\nmode = \"{mode}\"\njobs = 3\nchunk_rows = 1000\n"
    )
}

/// A migrated copy: (plan, source db, target db), after a first successful run.
fn migrated(prefix: &str) -> (TestPlan, String, String) {
    let p = pair();
    let s = p.source.fresh_database(&format!("{prefix}_src"));
    let t = format!("{s}_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(p, prefix, &s, &t, &stages("checksum"));
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for table in [
        "\"Mixed Case\".\"Order\"",
        "public.items",
        "public.nokey",
        "public.composite",
        "public.events",
        "public.words",
    ] {
        assert_eq!(
            row_digest(&p.source, &s, table),
            row_digest(&p.target, &t, table),
            "{table}"
        );
    }
    (plan, s, t)
}

/// `pgferry verify` with a report file: (exit code, report).
fn verify(plan: &TestPlan, extra: &[&str]) -> (Option<i32>, Value) {
    let file = plan.dir.path().join("report.json");
    let _ = std::fs::remove_file(&file);
    let mut args = vec!["verify", "--report", file.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let out = plan.run(&args);
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(3)),
        "verify failed: {}",
        show(&out)
    );
    (code, read_report(&file))
}

fn read_report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("report written");
    serde_json::from_str(&text).expect("report is JSON")
}

/// The report's mismatches without the fields that do not identify them.
fn mismatches(report: &Value) -> Vec<Value> {
    report["mismatches"]
        .as_array()
        .expect("mismatches")
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(o) = m.as_object_mut() {
                o.remove("database");
                o.remove("detail");
            }
            m
        })
        .collect()
}

#[test]
fn identical_copy_then_each_corruption_is_named_exactly() {
    let p = pair();
    let (plan, _s, t) = migrated("val_each");

    // Identical: empty report, exit 0; every table compared, several chunks for the big one.
    let (code, report) = verify(&plan, &[]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["mismatch_count"], 0);
    assert_eq!(mismatches(&report), Vec::<Value>::new());
    let tables = report["tables"].as_array().expect("tables");
    assert_eq!(tables.len(), 6, "{report:#}");
    // Every row lands in exactly one chunk, whatever the key's type and order.
    for (name, rows) in [
        ("public.items", 30000),
        ("public.events", 20000),
        ("public.words", 20000),
        ("public.composite", 5000),
    ] {
        let t = tables.iter().find(|x| x["table"] == name).expect("summary");
        assert_eq!(t["source_rows"], rows, "{t}");
        assert_eq!(t["target_rows"], rows, "{t}");
        assert!(t["chunks"].as_u64().unwrap_or(0) >= 4, "{t}");
    }
    let items = tables
        .iter()
        .find(|x| x["table"] == "public.items")
        .expect("items summary");
    assert_eq!(items["source_rows"], 30000);
    assert_eq!(items["target_rows"], 30000);
    assert!(items["chunks"].as_u64().unwrap_or(0) >= 5, "{items}");
    let nokey = tables
        .iter()
        .find(|x| x["table"] == "public.nokey")
        .expect("nokey summary");
    assert_eq!(nokey["key"], json!([]));
    assert_eq!(report["snapshots"][0]["method"], "offline");
    assert!(report["sequences_compared"].as_u64().unwrap_or(0) >= 2);

    // A changed row: the generated column follows the changed one on the target.
    p.target
        .psql(&t, "UPDATE public.items SET name = 'x' WHERE id = 12345");
    let (code, report) = verify(&plan, &[]);
    assert_eq!(code, Some(3));
    assert_eq!(
        mismatches(&report),
        vec![
            json!({"table": "public.items", "key": {"id": 12345}, "kind": "different", "columns": ["name", "name_len"]})
        ]
    );
    p.target.psql(
        &t,
        "UPDATE public.items SET name = 'item 12345' WHERE id = 12345",
    );

    // A changed value of an awkward type in a mixed-case table with a reserved column name.
    p.target.psql(
        &t,
        r#"UPDATE "Mixed Case"."Order" SET ts = '2024-03-31 00:30:01+00' WHERE "select" = 3"#,
    );
    let (code, report) = verify(&plan, &[]);
    assert_eq!(code, Some(3));
    assert_eq!(
        mismatches(&report),
        vec![
            json!({"table": "Mixed Case.Order", "key": {"select": 3}, "kind": "different", "columns": ["ts"]})
        ]
    );
    p.target.psql(
        &t,
        r#"UPDATE "Mixed Case"."Order" SET ts = '2024-03-31 02:30:00+02' WHERE "select" = 3"#,
    );

    // A deleted row.
    let row = p.target.psql(
        &t,
        "SELECT name || '|' || price FROM public.items WHERE id = 777",
    );
    p.target.psql(&t, "DELETE FROM public.items WHERE id = 777");
    let (code, report) = verify(&plan, &[]);
    assert_eq!(code, Some(3));
    assert_eq!(
        mismatches(&report),
        vec![json!({"table": "public.items", "key": {"id": 777}, "kind": "missing"})]
    );
    let (name, price) = row.split_once('|').expect("name|price");
    p.target.psql(
        &t,
        &format!("INSERT INTO public.items (id, name, price) VALUES (777, '{name}', {price})"),
    );

    // An added row, in a table keyed by a two-column unique constraint.
    p.target
        .psql(&t, "INSERT INTO public.composite VALUES (7, 'zz', 'new')");
    let (code, report) = verify(&plan, &[]);
    assert_eq!(code, Some(3));
    assert_eq!(
        mismatches(&report),
        vec![json!({"table": "public.composite", "key": {"a": 7, "b": "zz"}, "kind": "extra"})]
    );
    p.target
        .psql(&t, "DELETE FROM public.composite WHERE a = 7 AND b = 'zz'");

    // A table without a key: one of two identical rows deleted.
    p.target.psql(
        &t,
        "DELETE FROM public.nokey WHERE ctid = (SELECT min(ctid) FROM public.nokey WHERE a = 1)",
    );
    let (code, report) = verify(&plan, &[]);
    assert_eq!(code, Some(3));
    assert_eq!(
        mismatches(&report),
        vec![json!({"table": "public.nokey", "key": {"a": 1, "b": "same"}, "kind": "missing"})]
    );
    p.target
        .psql(&t, "INSERT INTO public.nokey VALUES (1, 'same')");

    // A sequence set back on the target.
    p.target
        .psql(&t, "SELECT setval('public.items_id_seq', 100)");
    let (code, report) = verify(&plan, &[]);
    assert_eq!(code, Some(3));
    assert_eq!(
        mismatches(&report),
        vec![
            json!({"table": "public.items_id_seq", "key": null, "kind": "different", "columns": ["last_value"]})
        ]
    );
    p.target
        .psql(&t, "SELECT setval('public.items_id_seq', 30000)");

    // Everything restored: identical again.
    let (code, report) = verify(&plan, &[]);
    assert_eq!(code, Some(0), "{report:#}");
}

fn md5_4242() -> String {
    pair().source.psql("postgres", "SELECT md5('4242')")
}

#[test]
fn count_and_full_modes() {
    let p = pair();
    let (plan, _s, t) = migrated("val_modes");
    p.target.psql(
        &t,
        "DELETE FROM public.composite WHERE a = 5 AND b = 'k5'; \
         UPDATE public.items SET price = price + 1 WHERE id = 20000; \
         UPDATE \"Mixed Case\".\"Order\" SET f = 'NaN', j = '{\"a\": [1, 3]}' WHERE \"select\" = 2; \
         UPDATE public.events SET v = -1 WHERE at = '2020-01-01 00:00:00+00'::timestamptz + 7777 * interval '1 hour 1 second'; \
         DELETE FROM public.words WHERE w = md5('4242')",
    );

    // Count: only the tables that lost a row, as counts.
    let (code, report) = verify(&plan, &["--mode", "count"]);
    assert_eq!(code, Some(3));
    assert_eq!(report["mode"], "count");
    let mut found = mismatches(&report);
    found.sort_by_key(|m| m["table"].to_string());
    assert_eq!(
        found,
        vec![
            json!({"table": "public.composite", "key": null, "kind": "missing", "count": 1}),
            json!({"table": "public.words", "key": null, "kind": "missing", "count": 1}),
        ]
    );

    // Full: every row of the mismatched chunks compared column by column.
    let (code, report) = verify(&plan, &["--mode", "full", "--jobs", "2"]);
    assert_eq!(code, Some(3));
    assert_eq!(report["mode"], "full");
    let mut found = mismatches(&report);
    found.sort_by_key(|m| m["table"].to_string());
    assert_eq!(
        found,
        vec![
            json!({"table": "Mixed Case.Order", "key": {"select": 2}, "kind": "different", "columns": ["j", "f"]}),
            json!({"table": "public.composite", "key": {"a": 5, "b": "k5"}, "kind": "missing"}),
            json!({"table": "public.events", "key": {"at": "2020-11-20T03:09:37+00:00"}, "kind": "different", "columns": ["v"]}),
            json!({"table": "public.items", "key": {"id": 20000}, "kind": "different", "columns": ["price"]}),
            json!({"table": "public.words", "key": {"w": md5_4242()}, "kind": "missing"}),
        ]
    );
}

#[test]
fn validate_stage_fails_with_exit_3_and_status_counts_the_errors() {
    let p = pair();
    let (plan, s, t) = migrated("val_stage");
    // The first run ended with the validate stage done: a clean report in the store.
    let status = plan.run(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(v["validation"]["dataErrorsCount"], 0, "{v:#}");
    assert_eq!(v["validation"]["stage"], "validate");

    p.target
        .psql(&t, "UPDATE public.items SET name = 'broken' WHERE id = 3");
    p.target.psql(&t, "DELETE FROM public.items WHERE id = 4");
    let out = plan.run(&["run", "--rerun", "validate"]);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 difference(s)"), "{stderr}");

    let status = plan.run(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let items = v["output"]
        .as_array()
        .expect("output")
        .iter()
        .find(|o| o["resultType"] == "TableLevelOutput" && o["tableName"] == "public.items")
        .expect("items table output")
        .clone();
    assert_eq!(items["dataErrorsCount"], 2, "{items:#}");
    assert_eq!(v["validation"]["dataErrorsCount"], 2);
    assert_eq!(
        v["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .find(|x| x["stage"] == "validate")
            .expect("validate row")["state"],
        "failed"
    );
    let text = plan.run(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("validation (validate at") && text.contains("{\"id\":4}"),
        "{text}"
    );
    // The counters in the store follow the latest report.
    let counter = p.target.psql(
        &t,
        &format!(
            "SELECT value FROM pgferry.counters WHERE migration = 'val_stage' AND scope = '{s}.public.items' AND name = 'dataErrorsCount'"
        ),
    );
    assert_eq!(counter, "2");

    // Fixed: the stage passes and the counter is back to 0.
    p.target
        .psql(&t, "UPDATE public.items SET name = 'item 3' WHERE id = 3");
    p.target.psql(
        &t,
        &format!(
            "INSERT INTO public.items (id, name, price) SELECT 4, 'item 4', {} ",
            p.source
                .psql(&s, "SELECT price FROM public.items WHERE id = 4")
        ),
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let counter = p.target.psql(
        &t,
        &format!(
            "SELECT value FROM pgferry.counters WHERE migration = 'val_stage' AND scope = '{s}.public.items' AND name = 'dataErrorsCount'"
        ),
    );
    assert_eq!(counter, "0");
}

/// Online: Pagila with cdc running and a writer changing the source the whole time.
#[test]
fn online_verify_on_pagila_while_writes_continue() {
    let p = pair();
    let s = p.source.fresh_database("val_online_src");
    if !support::load_pagila(&p.source, &s) {
        return;
    }
    let t = format!("{s}_tgt");
    let stages = "[stages.schema]\nkind = \"schema_dump\"\n\n\
        [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
        [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
        [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
        [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\nbatch_delay = \"20ms\"\n\n\
        [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\n\n\
        [stages.validate]\nkind = \"validate\"\nafter = [\"cdc\"]\njobs = 2\nchunk_rows = 2000\nhold_timeout = \"60s\"\n";
    let plan = TestPlan::new(p, "val_online", &s, &t, stages);
    // Keep cdc running: the manual cutover waits for approval that never comes; the validate stage
    // in the same run checks the copy while cdc is ready.
    let mut runner = plan.spawn(&["run"]);
    wait_for("cdc to be ready", Duration::from_secs(120), || {
        if let Ok(Some(status)) = runner.try_wait() {
            panic!("the runner stopped early: {status:?}");
        }
        p.target.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{t}'"),
        ) == "1"
            && p.target
                .psql(&t, "SELECT to_regclass('pgferry.stages') IS NOT NULL")
                == "t"
            && p.target.psql(
                &t,
                "SELECT count(*) FROM pgferry.stages WHERE migration = 'val_online' AND stage = 'cdc' AND state = 'ready'",
            ) == "1"
    });

    // A writer: inserts, updates and deletes on the source until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let s = s.clone();
        std::thread::spawn(move || {
            let p = pair();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                p.source.psql(
                    &s,
                    &format!(
                        "BEGIN; \
                         INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date) \
                           VALUES (1 + {n} % 500, 1, 1 + {n} % 1000, {n} % 10 + 0.99, '2022-02-01 10:00:00+00'); \
                         UPDATE public.customer SET last_update = now(), email = 'writer{n}@example.com' WHERE customer_id = 1 + {n} % 599; \
                         UPDATE public.film SET rental_rate = rental_rate + 0.01 WHERE film_id = 1 + {n} % 1000; \
                         DELETE FROM public.film_actor WHERE (actor_id, film_id) IN (SELECT actor_id, film_id FROM public.film_actor ORDER BY film_id DESC, actor_id LIMIT 1); \
                         COMMIT;"
                    ),
                );
                n += 1;
            }
            n
        })
    };

    std::thread::sleep(Duration::from_secs(1));
    // No false mismatches while the source keeps changing.
    for _ in 0..2 {
        if let Ok(Some(_)) = runner.try_wait() {
            stop.store(true, Ordering::SeqCst);
            let out = runner.wait_with_output().expect("runner output");
            panic!("the runner stopped early: {}", show(&out));
        }
        let (code, report) = verify(&plan, &["--jobs", "2"]);
        assert_eq!(code, Some(0), "{report:#}");
        assert_eq!(report["snapshots"][0]["method"], "online", "{report:#}");
        assert!(report["snapshots"][0]["lsn"].is_string());
        assert!(report["tables"].as_array().map_or(0, Vec::len) >= 15);
    }

    // A corruption on the target while everything runs is found, and only it.
    p.target.psql(
        &t,
        "SET session_replication_role = replica; UPDATE public.actor SET first_name = 'CORRUPT' WHERE actor_id = 42",
    );
    let (code, report) = verify(&plan, &["--jobs", "2"]);
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().expect("writer thread");
    assert!(writes > 5, "the writer barely ran ({writes} transactions)");
    assert_eq!(code, Some(3), "{report:#}");
    assert_eq!(
        mismatches(&report),
        vec![
            json!({"table": "public.actor", "key": {"actor_id": 42}, "kind": "different", "columns": ["first_name"]})
        ]
    );

    // The validate stage of the run itself ran online too and found nothing (it ran before the
    // corruption).
    let v: Value = serde_json::from_slice(&plan.run(&["status", "--json"]).stdout).expect("status");
    let row = v["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|x| x["stage"] == "validate")
        .expect("validate row")
        .clone();
    assert_eq!(row["state"], "done", "{v:#}");
    assert_eq!(row["detail"]["snapshots"][0]["method"], "online", "{row:#}");
    let _ = runner.kill();
    let _ = runner.wait();

    // cdc is still recorded as ready, but no runner applies anything: verify says so at once
    // instead of waiting for a hold nobody answers.
    wait_for("the runner lock to go", Duration::from_secs(10), || {
        p.target.psql(
            &t,
            // This store's runner only: other tests' runners share the cluster.
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'pgferry runner%'",
        ) == "0"
    });
    let out = plan.run(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no `pgferry run` is running"),
        "{}",
        show(&out)
    );
}
