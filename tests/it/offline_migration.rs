//! Whole offline plans against real clusters — preflight, schema_dump, provision, full_load,
//! post_data, sequence_reset — into a target database that does not exist yet: the target ends up
//! equal to the source (rows, sequences, large objects, schema), `status --json` says so, a second
//! run has nothing to do, a run killed during the full load or during post_data resumes to the same
//! result, and the password shows nowhere.

use crate::support;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::support::compare::assert_same;
use crate::support::{Cluster, Gate, PASSWORD, TestPlan, pair, show, wait_for};

/// The offline plan: preflight → schema → provision → load → indexes → sequences.
fn offline_stages(load_jobs: u32, index_jobs: u32) -> String {
    format!(
        "[stages.preflight]\nkind = \"preflight\"\n\n\
         [stages.schema]\nkind = \"schema_dump\"\nafter = [\"preflight\"]\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = {load_jobs}\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = {index_jobs}\n\n\
         [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"indexes\"]\n"
    )
}

/// A fresh source database with Pagila, two large objects and its materialized view populated;
/// `None` when Pagila is not available (a failure under CI, a loud SKIPPED line elsewhere).
fn pagila_source(prefix: &str) -> Option<String> {
    let p = pair();
    let s = p.source.fresh_database(prefix);
    if !support::load_pagila(&p.source, &s) {
        return None;
    }
    p.source.psql(
        &s,
        "SELECT lo_from_bytea(0, convert_to(repeat('a large object in Pagila; ', 2000), 'UTF8'));
         SELECT lo_from_bytea(0, '\\x00ff7f80');
         REFRESH MATERIALIZED VIEW public.rental_by_category;",
    );
    Some(s)
}

/// The name of a target database that does not exist yet (provision creates it).
fn new_target(source_db: &str) -> String {
    let t = format!("{source_db}_tgt");
    assert!(!database_exists(&pair().target, &t), "{t} exists already");
    t
}

fn database_exists(c: &Cluster, db: &str) -> bool {
    c.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'"),
    ) == "1"
}

/// Runs the plan to completion and checks it succeeded.
fn run_to_completion(plan: &TestPlan) -> Output {
    let started = Instant::now();
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    eprintln!("[test] {}: run took {:.2?}", plan.name, started.elapsed());
    out
}

/// Waits until the killed runner's sessions on the target database are gone (the server notices
/// the closed connections and rolls back what they had open). pgferry names its sessions
/// `pgferry PURPOSE`; the tests' own are `pgferry-tests`.
fn wait_for_sessions_to_end(plan: &TestPlan) {
    wait_for(
        "the killed run's sessions to end",
        Duration::from_secs(30),
        || {
            pair().target.psql(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name LIKE 'pgferry %'",
                    plan.target_db
                ),
            ) == "0"
        },
    );
}

/// True once the checkpoint store exists (the first run creates it, and with it the target database).
fn store_exists(plan: &TestPlan) -> bool {
    let p = pair();
    database_exists(&p.target, &plan.target_db)
        && p.target.psql(
            &plan.target_db,
            "SELECT to_regclass('pgferry.checkpoints') IS NOT NULL AND to_regclass('pgferry.tables') IS NOT NULL",
        ) == "t"
}

fn store(plan: &TestPlan, sql: &str) -> String {
    pair().target.psql(&plan.target_db, sql)
}

fn stage_state(plan: &TestPlan, stage: &str) -> String {
    store(
        plan,
        &format!(
            "SELECT coalesce((SELECT state FROM pgferry.stages WHERE migration = '{}' AND stage = '{stage}'), 'absent')",
            plan.name
        ),
    )
}

/// The post_data objects checkpointed as built.
fn post_data_items_done(plan: &TestPlan) -> i64 {
    store(
        plan,
        &format!(
            "SELECT count(*) FROM pgferry.checkpoints WHERE migration = '{}' AND stage = 'indexes' \
             AND key LIKE 'database:%:item:%' AND (value->>'done')::bool",
            plan.name
        ),
    )
    .parse()
    .unwrap()
}

/// Every index of the user's schemas with its table and definition, sorted (duplicates kept).
const INDEXES: &str = "SELECT coalesce(string_agg(d, E'\\n' ORDER BY d), '') FROM (\
                       SELECT i.indrelid::regclass::text || ' ' || pg_get_indexdef(i.indexrelid) AS d \
                       FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg_toast%') x";

/// Every constraint of the user's schemas with its table and definition, sorted.
const CONSTRAINTS: &str = "SELECT coalesce(string_agg(d, E'\\n' ORDER BY d), '') FROM (\
                           SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) AS d \
                           FROM pg_constraint WHERE conrelid <> 0 \
                           AND connamespace::regnamespace::text NOT IN ('pg_catalog', 'information_schema', 'pgferry')) x";

#[test]

fn pagila_migrates_exactly() {
    let p = pair();
    let Some(s) = pagila_source("om_pagila_src") else {
        return;
    };
    let t = new_target(&s);
    let plan = TestPlan::new(p, "om_pagila", &s, &t, &offline_stages(3, 2));

    let out = run_to_completion(&plan);
    assert!(database_exists(&p.target, &t), "the run created {t}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ran preflight, schema, provision, load, indexes, sequences"),
        "{}",
        show(&out)
    );

    let compared = assert_same(&s, &t);
    // Pagila's partitions and its materialized view came along.
    assert!(
        compared
            .tables
            .iter()
            .any(|(_, plain)| plain == "public.payment_p2022_01"),
        "{:?}",
        compared.tables
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT relispopulated FROM pg_class WHERE oid = 'public.rental_by_category'::regclass"
        ),
        "t"
    );
    assert_eq!(
        p.target
            .psql(&t, "SELECT count(*) FROM public.rental_by_category"),
        p.source
            .psql(&s, "SELECT count(*) FROM public.rental_by_category")
    );
    assert_eq!(p.target.psql(&t, INDEXES), p.source.psql(&s, INDEXES));
    assert_eq!(
        p.target.psql(&t, CONSTRAINTS),
        p.source.psql(&s, CONSTRAINTS)
    );

    // (f) a second run has nothing to do.
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to do"),
        "{}",
        show(&out)
    );

    // (e) status --json, with Azure DMS's field names.
    let out = plan.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)));
    let output = json["output"].as_array().expect("output[]");
    let of_type = |kind: &str| -> Vec<&serde_json::Value> {
        output.iter().filter(|o| o["resultType"] == kind).collect()
    };
    let migration = of_type("MigrationLevelOutput");
    assert_eq!(migration.len(), 1, "{json:#}");
    assert_eq!(migration[0]["migrationState"], "COMPLETED", "{json:#}");
    let database = of_type("DatabaseLevelOutput");
    assert_eq!(database.len(), 1, "{json:#}");
    let db = database[0];
    assert_eq!(db["databaseName"], s.as_str());
    assert_eq!(db["targetDatabaseName"], t.as_str());
    assert_eq!(db["migrationState"], "COMPLETED");
    assert_eq!(db["initializationCompleted"], true);
    let table_outputs = of_type("TableLevelOutput");
    let reported: BTreeSet<&str> = table_outputs
        .iter()
        .map(|o| o["tableName"].as_str().expect("tableName"))
        .collect();
    let expected: BTreeSet<&str> = compared.tables.iter().map(|t| t.1.as_str()).collect();
    assert_eq!(
        reported, expected,
        "TableLevelOutput names every table, and only tables"
    );
    for o in &table_outputs {
        assert_eq!(o["state"], "COMPLETED", "{o:#}");
    }
    assert_eq!(
        db["fullLoadCompletedTables"],
        compared.tables.len(),
        "{db:#}"
    );
    assert_eq!(db["fullLoadLoadingTables"], 0, "{db:#}");
    assert_eq!(db["fullLoadQueuedTables"], 0, "{db:#}");
    assert_eq!(db["fullLoadErroredTables"], 0, "{db:#}");
    assert_eq!(db["fullLoadTotalRows"], compared.total_rows(), "{db:#}");
}

/// Pagila plus `public.big`, whose copy the test holds at a gate on the target (installed after
/// provisioning) until the runner is killed: other tables copied, `public.big` being copied.
#[test]
fn killed_during_full_load_then_resumed() {
    let p = pair();
    let Some(s) = pagila_source("om_killload_src") else {
        return;
    };
    let started = Instant::now();
    p.source.psql(
        &s,
        "CREATE TABLE public.big (id bigint NOT NULL, pad text NOT NULL);
         INSERT INTO public.big SELECT g, lpad(g::text, 64, 'pgferry-') FROM generate_series(1, 200000) g;
         ALTER TABLE public.big ADD CONSTRAINT big_pkey PRIMARY KEY (id);
         ANALYZE public.big;",
    );
    eprintln!(
        "[test] public.big ({}) made in {:.2?}",
        p.source
            .psql(&s, "SELECT pg_size_pretty(pg_table_size('public.big'))"),
        started.elapsed()
    );
    let t = new_target(&s);
    let plan = TestPlan::new(p, "om_killload", &s, &t, &offline_stages(2, 2));
    let out = plan.run(&["run", "--until", "provision"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    Gate::install(&p.target, &t, "public.big");
    let gate = Gate::close(&p.target, &t);

    let started = Instant::now();
    let mut child = plan.spawn(&["run"]);
    let state_of = |table: &str| {
        store(
            &plan,
            &format!(
                "SELECT coalesce((SELECT state FROM pgferry.tables WHERE migration = '{}' AND stage = 'load' AND table_name = '{table}'), 'absent')",
                plan.name
            ),
        )
    };
    let copied = || {
        store(
            &plan,
            &format!(
                "SELECT count(*) FROM pgferry.tables WHERE migration = '{}' AND stage = 'load' AND state = 'copied'",
                plan.name
            ),
        )
        .parse::<i64>()
        .unwrap()
    };
    wait_for(
        "a table copied while public.big is being copied",
        Duration::from_secs(120),
        || store_exists(&plan) && copied() >= 1 && state_of("public.big") == "copying",
    );
    child.kill().expect("SIGKILL pgferry");
    let killed = child.wait_with_output().expect("wait for pgferry");
    assert_ne!(killed.status.code(), Some(0), "{}", show(&killed));
    eprintln!("[test] killed the load after {:.2?}", started.elapsed());
    gate.open();
    // Once its sessions are gone, nothing the killed run sent can still change the store.
    wait_for_sessions_to_end(&plan);
    assert_ne!(
        state_of("public.big"),
        "copied",
        "public.big was still being copied"
    );
    assert_eq!(stage_state(&plan, "load"), "running");
    // What was copied before the kill, and when.
    let copied_before = store(
        &plan,
        &format!(
            "SELECT string_agg(quote_literal(table_name), ',') FROM pgferry.tables \
             WHERE migration = '{}' AND stage = 'load' AND state = 'copied'",
            plan.name
        ),
    );
    let kept = |plan: &TestPlan| {
        store(
            plan,
            &format!(
                "SELECT string_agg(table_name || '@' || ended_at, ',' ORDER BY table_name) FROM pgferry.tables \
                 WHERE migration = '{}' AND stage = 'load' AND table_name IN ({copied_before})",
                plan.name
            ),
        )
    };
    let kept_before = kept(&plan);
    assert_eq!(
        kept_before.matches('@').count(),
        copied_before.split(',').count(),
        "{kept_before}"
    );

    let out = run_to_completion(&plan);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already done: preflight, schema, provision"),
        "{}",
        show(&out)
    );
    // The tables copied before the kill were not copied again.
    assert_eq!(
        kept(&plan),
        kept_before,
        "tables copied before the kill were kept"
    );
    assert_eq!(state_of("public.big"), "copied");
    Gate::uninstall(&p.target, &t, "public.big");
    let compared = assert_same(&s, &t);
    assert!(
        compared.tables.iter().any(|(q, _)| q == "public.big"),
        "{:?}",
        compared.tables
    );
    assert_eq!(p.target.psql(&t, INDEXES), p.source.psql(&s, INDEXES));
}

/// post_data runs beside full_load: Pagila's indexes and constraints are built while
/// `public.big` is held at a gate on the target in the middle of its copy, `public.big`'s own
/// primary key waits for its copy, and a SIGKILL while both stages run resumes to the same target
/// (rows, sequences, large objects, schema, every index once and valid).
#[test]
fn index_builds_overlap_the_load_and_a_kill_during_both_resumes() {
    let p = pair();
    let Some(s) = pagila_source("om_overlap_src") else {
        return;
    };
    p.source.psql(
        &s,
        "CREATE TABLE public.big (id bigint NOT NULL, pad text NOT NULL);
         INSERT INTO public.big SELECT g, lpad(g::text, 64, 'pgferry-') FROM generate_series(1, 100000) g;
         ALTER TABLE public.big ADD CONSTRAINT big_pkey PRIMARY KEY (id);
         CREATE INDEX big_pad_idx ON public.big (pad);
         ANALYZE public.big;",
    );
    let t = new_target(&s);
    let plan = TestPlan::new(p, "om_overlap", &s, &t, &offline_stages(2, 2));
    let out = plan.run(&["run", "--until", "provision"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    Gate::install(&p.target, &t, "public.big");
    let gate = Gate::close(&p.target, &t);

    let mut child = plan.spawn(&["run"]);
    let built = |object: &str| {
        store(
            &plan,
            &format!(
                "SELECT count(*) FROM pgferry.checkpoints WHERE migration = '{}' AND stage = 'indexes' \
                 AND key = 'database:{s}:item:{object}' AND (value->>'done')::bool",
                plan.name
            ),
        ) == "1"
    };
    let big_state = || {
        store(
            &plan,
            &format!(
                "SELECT coalesce((SELECT state FROM pgferry.tables WHERE migration = '{}' AND stage = 'load' AND table_name = 'public.big'), 'absent')",
                plan.name
            ),
        )
    };
    // The condition is made, not raced: public.big cannot finish its copy while the gate is closed.
    wait_for(
        "Pagila's primary keys built while public.big is being copied",
        Duration::from_secs(90),
        || {
            store_exists(&plan)
                && built("CONSTRAINT:public.actor actor_pkey")
                && built("CONSTRAINT:public.rental rental_pkey")
                && big_state() == "copying"
        },
    );
    assert_eq!(stage_state(&plan, "load"), "running");
    assert_eq!(stage_state(&plan, "indexes"), "running");
    assert!(
        !built("CONSTRAINT:public.big big_pkey") && !built("INDEX:public.big_pad_idx"),
        "public.big's objects wait for its copy"
    );
    // ... and are not even started (they would wait for the copy's lock, holding a session).
    assert_eq!(
        p.target.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{t}' \
                 AND application_name LIKE 'pgferry post_data%' AND query LIKE '%public.big%'"
            ),
        ),
        "0",
        "no post_data session works on public.big while it is copied"
    );
    // Foreign keys wait for the whole load.
    assert_eq!(
        store(
            &plan,
            &format!(
                "SELECT count(*) FROM pgferry.checkpoints WHERE migration = '{}' AND stage = 'indexes' \
                 AND key LIKE 'database:%:item:FK CONSTRAINT:%'",
                plan.name
            ),
        ),
        "0"
    );
    child.kill().expect("SIGKILL pgferry");
    let killed = child.wait_with_output().expect("wait for pgferry");
    assert_ne!(killed.status.code(), Some(0), "{}", show(&killed));
    gate.open();
    wait_for_sessions_to_end(&plan);
    assert_ne!(big_state(), "copied");
    let done_before = post_data_items_done(&plan);
    eprintln!(
        "[test] killed with full_load and post_data running, {done_before} post-data object(s) built"
    );
    let invalid = "SELECT coalesce(string_agg(indexrelid::regclass::text, ','), '') FROM pg_index WHERE NOT indisvalid OR NOT indisready";
    // Nothing half-built; a partitioned table's index stays invalid until its partitions' indexes
    // are attached (phase 2), as in pg_restore.
    let half_built = "SELECT coalesce(string_agg(indexrelid::regclass::text, ','), '') FROM pg_index i \
        JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relkind <> 'I' AND (NOT indisvalid OR NOT indisready)";
    assert_eq!(p.target.psql(&t, half_built), "");

    let out = run_to_completion(&plan);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ran load, indexes, sequences; already done: preflight, schema, provision"),
        "{}",
        show(&out)
    );
    // Objects built before the kill were not built again.
    assert!(post_data_items_done(&plan) > done_before);
    Gate::uninstall(&p.target, &t, "public.big");
    assert_same(&s, &t);
    assert_eq!(p.target.psql(&t, invalid), "");
    assert_eq!(p.target.psql(&t, INDEXES), p.source.psql(&s, INDEXES));
    assert_eq!(
        p.target.psql(&t, CONSTRAINTS),
        p.source.psql(&s, CONSTRAINTS)
    );
}

/// Pagila plus a table with a few indexes and a small table whose indexes call a function that is
/// slow on the target (about 1.5 s per index; instant on the source, so the setup stays quick), so
/// that post_data lasts long enough to be killed halfway.
#[test]
fn killed_during_post_data_then_resumed() {
    let p = pair();
    let Some(s) = pagila_source("om_killpd_src") else {
        return;
    };
    let started = Instant::now();
    p.source.psql(
        &s,
        "CREATE TABLE public.big (id bigint NOT NULL, v int NOT NULL, pad text NOT NULL);
         INSERT INTO public.big SELECT g, g % 1009, md5(g::text) FROM generate_series(1, 400000) g;
         ALTER TABLE public.big ADD CONSTRAINT big_pkey PRIMARY KEY (id);
         CREATE INDEX big_v_idx ON public.big (v);
         CREATE INDEX big_pad_idx ON public.big (pad);
         CREATE UNIQUE INDEX big_pad_id_key ON public.big (pad, id);
         CREATE FUNCTION public.slow(i int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS
           $$BEGIN IF right(current_database(), 4) = '_tgt' THEN PERFORM pg_sleep(0.01); END IF; RETURN i; END$$;
         CREATE TABLE public.slowt (id int NOT NULL, v int);
         INSERT INTO public.slowt SELECT g, g FROM generate_series(1, 150) g;
         ALTER TABLE public.slowt ADD CONSTRAINT slowt_pkey PRIMARY KEY (id);
         CREATE INDEX slowt_s1 ON public.slowt (public.slow(id));
         CREATE INDEX slowt_s2 ON public.slowt ((public.slow(id) + 1));
         CREATE INDEX slowt_s3 ON public.slowt ((public.slow(v) + 2));
         ALTER TABLE public.slowt ADD CONSTRAINT slowt_big_fkey FOREIGN KEY (id) REFERENCES public.big (id);
         ANALYZE;",
    );
    eprintln!(
        "[test] public.big and public.slowt made in {:.2?}",
        started.elapsed()
    );
    let t = new_target(&s);
    let plan = TestPlan::new(p, "om_killpd", &s, &t, &offline_stages(2, 2));

    let started = Instant::now();
    let mut child = plan.spawn(&["run"]);
    let building = || {
        store(
            &plan,
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' \
             AND application_name LIKE 'pgferry post_data%' AND query LIKE 'CREATE%INDEX%'",
        ) == "t"
    };
    wait_for(
        "post_data running after the load with an object checkpointed and an index being built",
        Duration::from_secs(120),
        || {
            store_exists(&plan)
                // post_data starts beside the load; this kill is meant for post_data alone.
                && stage_state(&plan, "load") == "done"
                && stage_state(&plan, "indexes") == "running"
                && post_data_items_done(&plan) >= 1
                && building()
        },
    );
    child.kill().expect("SIGKILL pgferry");
    let killed = child.wait_with_output().expect("wait for pgferry");
    assert_ne!(killed.status.code(), Some(0), "{}", show(&killed));
    let killed_after = started.elapsed();
    let waited = Instant::now();
    wait_for_sessions_to_end(&plan);
    let done_before = post_data_items_done(&plan);
    eprintln!(
        "[test] killed post_data after {killed_after:.2?} with {done_before} object(s) checkpointed; \
         its sessions ended within {:.2?}",
        waited.elapsed()
    );
    assert_eq!(stage_state(&plan, "indexes"), "running");
    assert_eq!(stage_state(&plan, "sequences"), "absent");
    // Nothing the killed run left half-built stays behind as invalid.
    let invalid = "SELECT coalesce(string_agg(indexrelid::regclass::text, ','), '') FROM pg_index WHERE NOT indisvalid OR NOT indisready";
    assert_eq!(p.target.psql(&t, invalid), "");

    let out = run_to_completion(&plan);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ran indexes, sequences; already done: preflight, schema, provision, load"),
        "{}",
        show(&out)
    );
    assert_same(&s, &t);
    // Every index is valid and exists once, as on the source; so does every constraint.
    assert_eq!(p.target.psql(&t, invalid), "");
    let indexes = p.target.psql(&t, INDEXES);
    assert!(indexes.contains("slowt_s3"), "{indexes}");
    assert_eq!(indexes, p.source.psql(&s, INDEXES));
    assert_eq!(
        p.target.psql(&t, CONSTRAINTS),
        p.source.psql(&s, CONSTRAINTS)
    );
    let checkpoint = store(
        &plan,
        &format!(
            "SELECT value::text FROM pgferry.checkpoints WHERE migration = '{}' AND stage = 'indexes' AND key = 'database:{s}'",
            plan.name
        ),
    );
    let summary: serde_json::Value = serde_json::from_str(&checkpoint).expect("JSON checkpoint");
    let count = |k: &str| {
        summary[k]
            .as_i64()
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    assert_eq!(
        count("skipped"),
        done_before,
        "the resumed run skipped the objects built before the kill: {summary}"
    );
    assert!(
        done_before < count("objects"),
        "the kill interrupted post_data: {summary}"
    );
    assert_eq!(
        count("skipped") + count("built") + count("already_existed"),
        count("objects"),
        "{summary}"
    );
    assert_eq!(post_data_items_done(&plan), count("objects"));
}

/// Whole runs with debug logs, as text and as JSON, and every report: the password (or any
/// encoding of it) shows in no output and in no table of the checkpoint store.
#[test]
fn password_never_leaks() {
    let p = pair();
    let s = p.source.fresh_database("om_secret_src");
    p.source.psql(
        &s,
        "CREATE TABLE public.customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE);
         CREATE TABLE public.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                     customer_id int NOT NULL REFERENCES public.customers (id),
                                     total numeric(10, 2), at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX orders_customer_idx ON public.orders (customer_id);
         CREATE VIEW public.big_orders AS SELECT * FROM public.orders WHERE total > 100;
         INSERT INTO public.customers (name, email) SELECT 'c' || g, 'c' || g || '@example.com' FROM generate_series(1, 200) g;
         INSERT INTO public.orders (customer_id, total) SELECT 1 + g % 200, g * 1.5 FROM generate_series(1, 2000) g;
         SELECT lo_from_bytea(0, 'not a secret');",
    );
    // The password, however it might be written: as is, percent-encoded, JSON-escaped.
    let secret = PASSWORD.trim_end_matches('!');
    assert!(secret.len() > 8 && PASSWORD.starts_with(secret));

    let mut outputs: Vec<(String, Output)> = Vec::new();
    let mut stores: Vec<TestPlan> = Vec::new();
    for (n, format) in ["text", "json"].into_iter().enumerate() {
        let t = format!("{s}_tgt{n}");
        assert!(!database_exists(&p.target, &t));
        let plan = TestPlan::new(
            p,
            &format!("om_secret_{format}"),
            &s,
            &t,
            &offline_stages(2, 2),
        );
        let cmd = |args: &[&str]| {
            let mut c = plan.command(args);
            c.args(["--log-format", format]).env("RUST_LOG", "debug");
            let out = c.output().expect("run pgferry");
            (format!("{} ({format} logs)", args.join(" ")), out)
        };
        let before = cmd(&["plan"]);
        let run = cmd(&["run"]);
        assert_eq!(run.1.status.code(), Some(0), "{}", show(&run.1));
        let after = cmd(&["plan"]);
        let status = cmd(&["status"]);
        let status_json = cmd(&["status", "--json"]);
        let again = cmd(&["run"]);
        assert!(
            String::from_utf8_lossy(&again.1.stderr).contains("nothing to do"),
            "{}",
            show(&again.1)
        );
        for (label, out) in [before, run, after, status, status_json, again] {
            assert!(
                !out.stdout.is_empty() || !out.stderr.is_empty(),
                "{label} printed nothing"
            );
            outputs.push((label, out));
        }
        assert_same(&s, &t);
        stores.push(plan);
    }
    // The debug logs really are on, in both formats.
    let run_stderr = |i: usize| String::from_utf8_lossy(&outputs[i].1.stderr).into_owned();
    assert!(run_stderr(1).contains("DEBUG"), "{}", run_stderr(1));
    assert!(
        run_stderr(7).contains("\"level\":\"DEBUG\""),
        "{}",
        run_stderr(7)
    );
    for (label, out) in &outputs {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !all.contains(secret),
            "the password shows in the output of `{label}`:\n{}",
            show(out)
        );
    }

    // Every table of the checkpoint store, every column (bytea decoded too).
    for plan in &stores {
        let t = &plan.target_db;
        let tables = p.target.psql(
            t,
            "SELECT string_agg(quote_ident(relname), ',' ORDER BY relname) FROM pg_class \
             WHERE relnamespace = 'pgferry'::regnamespace AND relkind IN ('r', 'p')",
        );
        let tables: Vec<&str> = tables.split(',').collect();
        assert!(
            tables.len() >= 8 && tables.contains(&"artifacts") && tables.contains(&"events"),
            "{tables:?}"
        );
        for table in tables {
            let rows = p
                .target
                .psql(t, &format!("SELECT t::text FROM pgferry.{table} t"));
            assert!(
                !rows.contains(secret),
                "the password is stored in pgferry.{table} of {t}:\n{rows}"
            );
            let bytea = p.target.psql(
                t,
                &format!(
                    "SELECT coalesce(string_agg(quote_ident(attname), ','), '') FROM pg_attribute \
                     WHERE attrelid = 'pgferry.{table}'::regclass AND atttypid = 'bytea'::regtype AND attnum > 0 AND NOT attisdropped"
                ),
            );
            for column in bytea.split(',').filter(|c| !c.is_empty()) {
                let text = p.target.psql(
                    t,
                    &format!(
                        "SELECT coalesce(string_agg(encode({column}, 'escape'), E'\\n'), '') FROM pgferry.{table}"
                    ),
                );
                assert!(
                    !text.contains(secret),
                    "the password is stored in pgferry.{table}.{column} of {t}"
                );
            }
        }
        // The artifacts were decoded and really hold the schema.
        let artifacts = p.target.psql(
            t,
            "SELECT coalesce(string_agg(encode(content, 'escape'), ''), '') FROM pgferry.artifacts",
        );
        assert!(
            artifacts.contains("CREATE TABLE public.orders"),
            "{artifacts}"
        );
    }
}
