//! Whole online plans against real clusters: Pagila with an application writing to it during the
//! full load and cdc (inserts, updates, deletes, rows moving between partitions, a TRUNCATE, large
//! transactions, a large object, an unlogged table), an automatic cutover with the source fenced
//! read-only, and then every table, sequence, large object and the schema equal on both sides; and a
//! runner killed during the cutover's drain, resumed to the same result with nothing applied twice.

use crate::support;

use std::time::Duration;

use crate::support::compare::assert_same;
use crate::support::{
    FENCE_CODES, Gate, TestPlan, Writer, WriterSpec, pair, row_digest, show, wait_for,
    wait_for_exit,
};

const ONLINE: &str = "[stages.schema]\nkind = \"schema_dump\"\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
    [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
    [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
    [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\nmax_lag = \"1s\"\nquiet_for = \"1s\"\nfence = \"read_only\"\n\n\
    [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
    [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"sequences\"]\n";

/// The application's step `i` on the Pagila source (`lo`: a large object it writes into), until
/// the fence stops it.
fn pagila_step(lo: u32, i: i64) -> String {
    let customer = (i % 599) + 1;
    match i % 9 {
        0 => format!(
            "INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date) \
             VALUES ({customer}, 1, {}, 0.42, '2022-03-15 10:00:00+00')",
            (i % 16000) + 1
        ),
        1 => format!(
            "UPDATE public.customer SET email = 'writer{i}@example.com', active = {} WHERE customer_id = {customer}",
            i % 2
        ),
        // A row moving to another partition.
        2 => "UPDATE public.payment SET payment_date = '2022-05-10 10:00:00+00', amount = 0.43 \
              WHERE payment_id = (SELECT max(payment_id) FROM public.payment WHERE amount = 0.42)"
            .into(),
        3 => "DELETE FROM public.payment WHERE payment_id = (SELECT min(payment_id) FROM public.payment WHERE amount = 0.43)"
            .into(),
        4 => format!(
            "BEGIN; INSERT INTO public.scratch VALUES ({i} + 1000000, 'row {i}'); UPDATE public.film SET rental_rate = rental_rate + 0.01 WHERE film_id = {}; COMMIT",
            (i % 1000) + 1
        ),
        5 if i % 45 == 5 => "TRUNCATE public.scratch".into(),
        6 if i % 600 == 6 => format!(
            "INSERT INTO public.bulk SELECT g::bigint + {i}::bigint * 100000, md5(g::text) FROM generate_series(1, 5000) g"
        ),
        7 => format!(
            "SELECT lo_put({lo}, {}, '\\x41'::bytea); INSERT INTO public.cache VALUES ({i}, 'cached') ON CONFLICT (k) DO UPDATE SET v = 'again'",
            i % 100
        ),
        _ => format!(
            "INSERT INTO public.actor (first_name, last_name) VALUES ('Writer', 'No {i}')"
        ),
    }
}

fn checkpoint(plan: &TestPlan, stage: &str, key: &str, field: &str) -> String {
    pair().target.psql(
        &plan.target_db,
        &format!(
            "SELECT value->>'{field}' FROM pgferry.checkpoints WHERE migration = '{}' AND stage = '{stage}' AND key = '{key}'",
            plan.name
        ),
    )
}

#[test]
fn pagila_with_a_concurrent_writer_cuts_over_to_an_equal_copy() {
    let p = pair();
    let s = p.source.fresh_database("on_pagila_src");
    if !support::load_pagila(&p.source, &s) {
        return;
    }
    p.source.psql(
        &s,
        "CREATE TABLE public.bulk (id bigint PRIMARY KEY, v text);
         CREATE TABLE public.scratch (id bigint PRIMARY KEY, v text);
         CREATE UNLOGGED TABLE public.cache (k bigint PRIMARY KEY, v text);
         INSERT INTO public.cache SELECT g, 'initial' FROM generate_series(1, 50) g;
         INSERT INTO public.scratch SELECT g, 'initial' FROM generate_series(1, 10) g;
         SELECT lo_from_bytea(0, convert_to(repeat('a large object in Pagila; ', 2000), 'UTF8'));
         SELECT lo_from_bytea(0, '\\x00ff7f80');
         REFRESH MATERIALIZED VIEW public.rental_by_category;",
    );
    let t = p.target.fresh_database("on_pagila_tgt");
    let plan = TestPlan::new(p, "on_pagila", &s, &t, ONLINE);

    let lo: u32 = p
        .source
        .psql(&s, "SELECT min(oid) FROM pg_largeobject_metadata")
        .parse()
        .expect("a large object");
    let mut writer = Writer::start(
        WriterSpec {
            name: "the writer",
            port: p.source.port,
            db: s.clone(),
            user: None,
            every: Duration::from_millis(10),
            fenced_by: FENCE_CODES,
        },
        move |i| pagila_step(lo, i as i64),
    );
    let out = plan.run(&["run"]);
    let n = writer.stop();
    let fenced = writer.fenced();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        fenced,
        "the writer was still writing when the run ended: the fence did not stop it"
    );
    assert!(n > 50, "the writer wrote only {n} transactions");

    // cdc carried changes (not only the load).
    let applied: i64 = p
        .target
        .psql(
            &t,
            &format!("SELECT coalesce(sum(value), 0) FROM pgferry.counters WHERE migration = 'on_pagila' AND scope = '{s}' AND name = 'totalChangesApplied'"),
        )
        .parse()
        .expect("a number");
    assert!(applied > 0, "cdc applied nothing");
    // The source stays fenced.
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "on"
    );

    // Every table (partitions included), sequence, large object and the schema.
    assert_same(&s, &t);
    // The materialized view holds what its query gives on the fenced source now (the source's own
    // copy is as old as its last refresh).
    let definition = p.source.psql(
        &s,
        "SELECT pg_get_viewdef('public.rental_by_category'::regclass)",
    );
    let query = format!("({})", definition.trim().trim_end_matches(';'));
    assert_eq!(
        row_digest(&p.target, &t, "public.rental_by_category"),
        row_digest(&p.source, &s, &query),
        "the materialized view was refreshed after the fence"
    );
    assert_eq!(
        row_digest(&p.target, &t, "public.cache"),
        row_digest(&p.source, &s, "public.cache"),
        "the unlogged table was copied again after the fence"
    );
    let key = format!("database:{s}");
    let downtime: f64 = checkpoint(&plan, "cutover", &key, "downtime_seconds")
        .parse()
        .expect("the cutover recorded its downtime");
    assert!(downtime > 0.0);
    let resync = checkpoint(&plan, "cutover", &key, "resync");
    assert!(
        resync.contains("public.cache") && resync.contains("public.rental_by_category"),
        "{resync}"
    );
    eprintln!(
        "[test] {n} writer transactions, {applied} changes applied by cdc, write downtime {downtime:.2}s"
    );
}

const SMALL: &str = "\
    CREATE TABLE public.items (id int PRIMARY KEY, name text);\n\
    CREATE TABLE public.logs (n int, v text);\n\
    ALTER TABLE public.logs REPLICA IDENTITY FULL;\n\
    CREATE SEQUENCE public.counter;\n\
    SELECT nextval('public.counter') FROM generate_series(1, 7);\n\
    INSERT INTO public.items SELECT g, 'item ' || g FROM generate_series(1, 100) g;\n";

#[test]
fn killed_during_the_cutover_drain_then_resumed() {
    let p = pair();
    let s = p.source.fresh_database("on_killcut_src");
    let t = p.target.fresh_database("on_killcut_tgt");
    // An unlogged table: the cutover copies it again after the drain, which is where the test
    // holds the cutover (a gate on the target's copy) and kills the runner: fenced and drained,
    // not finished, however fast each step is.
    p.source.psql(
        &s,
        &format!(
            "{SMALL}CREATE UNLOGGED TABLE public.scratch (n int, v text);\n\
             INSERT INTO public.scratch SELECT g, 'scratch ' || g FROM generate_series(1, 100) g;\n"
        ),
    );
    let stages = ONLINE.replace("approval = \"auto\"", "approval = \"manual\"");
    let plan = TestPlan::new(p, "on_killcut", &s, &t, &stages);
    let mut child = plan.spawn(&["run"]);
    plan.wait_until_cdc_ready(p, &mut child);
    Gate::install(&p.target, &t, "public.scratch");
    let gate = Gate::close(&p.target, &t);
    // A backlog (no primary key: a change applied twice would show).
    p.source.psql(
        &s,
        "INSERT INTO public.logs SELECT g, 'backlog' FROM generate_series(1, 100000) g;\n\
         UPDATE public.items SET name = 'changed' WHERE id <= 10;\n\
         UPDATE public.scratch SET v = 'changed' WHERE n <= 10;\n\
         SELECT nextval('public.counter') FROM generate_series(1, 5);",
    );
    let out = plan.run(&["cutover"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    gate.wait_blocked(&p.target, "pgferry cutover%", Duration::from_secs(120));
    assert_eq!(
        p.target.psql(
            &t,
            &format!("SELECT count(*) FROM pgferry.checkpoints WHERE migration = 'on_killcut' AND stage = 'cutover' AND key = 'drain:{s}'"),
        ),
        "1",
        "the cutover recorded its drain target"
    );
    child.kill().expect("SIGKILL the runner");
    let _ = child.wait();
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT state FROM pgferry.stages WHERE migration = 'on_killcut' AND stage = 'cutover'"
        ),
        "running",
        "the kill came after the cutover finished: nothing was tested"
    );
    // Open, the killed run's copy session goes on to read from its vanished client and ends.
    gate.open();
    wait_for(
        "the killed run's sessions to end",
        Duration::from_secs(30),
        || {
            p.target.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{t}' AND application_name LIKE 'pgferry %'"),
        ) == "0"
        },
    );
    // The fence held while nobody ran the cutover.
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "on"
    );

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FROM public.logs"),
        "100000",
        "every backlog row applied exactly once"
    );
    for table in ["public.items", "public.logs", "public.scratch"] {
        assert_eq!(
            row_digest(&p.target, &t, table),
            row_digest(&p.source, &s, table),
            "{table} differs"
        );
    }
    assert_eq!(
        p.target.psql(&t, "SELECT last_value FROM public.counter"),
        p.source.psql(&s, "SELECT last_value FROM public.counter"),
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT string_agg(stage || '=' || state, ',' ORDER BY stage) FROM pgferry.stages WHERE migration = 'on_killcut' AND stage IN ('cutover', 'sequences', 'cleanup')"
        ),
        "cleanup=done,cutover=done,sequences=done"
    );
    // cleanup dropped the slot and the publication on the fenced source.
    assert_eq!(
        p.source.psql(
            &s,
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry_on_killcut%') + (SELECT count(*) FROM pg_publication WHERE pubname = 'pgferry_on_killcut')"
        ),
        "0"
    );
}

#[test]
fn an_approved_cutover_waits_for_the_lag_and_says_why() {
    let p = pair();
    let s = p.source.fresh_database("on_lagcut_src");
    let t = p.target.fresh_database("on_lagcut_tgt");
    p.source.psql(&s, SMALL);
    let stages = ONLINE.replace("approval = \"auto\"", "approval = \"manual\"");
    let plan = TestPlan::new(p, "on_lagcut", &s, &t, &stages);
    let mut child = plan.spawn(&["run"]);
    plan.wait_until_cdc_ready(p, &mut child);
    // A backlog cdc cannot apply until the test opens the gate on the target's public.logs, then
    // the approval right away.
    Gate::install(&p.target, &t, "public.logs");
    let gate = Gate::close(&p.target, &t);
    p.source.psql(
        &s,
        "INSERT INTO public.logs SELECT g, 'backlog ' || g FROM generate_series(1, 10000) g;",
    );
    let out = plan.run(&["cutover"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let waiting = format!(
        "SELECT count(*) FROM pgferry.events WHERE migration = 'on_lagcut' AND message LIKE 'cutover of {s} waits before fencing: cdc is % behind the source%'"
    );
    let fenced = format!(
        "SELECT count(*) FROM pgferry.checkpoints WHERE migration = 'on_lagcut' AND stage = 'cutover' AND key = 'drain:{s}'"
    );
    wait_for(
        "the cutover to say why it waits",
        Duration::from_secs(60),
        || {
            let said = p.target.psql(&t, &waiting) != "0";
            if !said {
                assert_eq!(
                    p.target.psql(&t, &fenced),
                    "0",
                    "the cutover fenced without waiting for the lag"
                );
            }
            said
        },
    );
    assert_eq!(
        p.target.psql(&t, &fenced),
        "0",
        "fenced while cdc was behind"
    );
    gate.open();
    let out = wait_for_exit(child, "the run to finish", Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        row_digest(&p.target, &t, "public.logs"),
        row_digest(&p.source, &s, "public.logs")
    );
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "on"
    );
}

/// `status --json` of `plan`: the migration-level state, the database-level one, and the whole
/// document.
fn states(plan: &TestPlan) -> (String, String, serde_json::Value) {
    let out = plan.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let state = |i: usize| {
        v["output"][i]["migrationState"]
            .as_str()
            .unwrap_or_else(|| panic!("no migrationState in output[{i}]: {v:#}"))
            .to_string()
    };
    (state(0), state(1), v)
}

fn stage_state(v: &serde_json::Value, stage: &str) -> String {
    v["stages"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["stage"] == stage))
        .and_then(|r| r["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

/// Polls `status --json` until `until` holds of it, recording every migration state seen (once
/// each, in order); fails when the runner stops first.
fn poll_states(
    plan: &TestPlan,
    child: &mut std::process::Child,
    seen: &mut Vec<String>,
    what: &str,
    until: impl Fn(&str, &serde_json::Value) -> bool,
) {
    wait_for(what, Duration::from_secs(90), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the runner stopped while waiting for {what}: {status:?}; states seen: {seen:?}"
            );
        }
        let (migration, database, v) = states(plan);
        assert_eq!(
            migration, database,
            "one database: the same state at both levels"
        );
        if seen.last() != Some(&migration) {
            seen.push(migration.clone());
        }
        until(&migration, &v)
    });
}

/// Azure DMS's migration states appear in `status --json` in order, each held by the test until it
/// has been seen: the load is held by a gate on the source (an `sql` stage beside it waits for the
/// gate's lock), cdc's apply by a gate on the target, a manual cutover waits for `pgferry cutover`,
/// and the approved cutover's drain by the target gate again.
#[test]
fn status_shows_each_azure_dms_state_in_order() {
    use crate::support::gate::{Gate, KEY};
    let p = pair();
    let s = p.source.fresh_database("states_src");
    let t = p.target.fresh_database("states_tgt");
    p.source.psql(
        &s,
        "CREATE TABLE public.items (id int PRIMARY KEY, v text);
         INSERT INTO public.items SELECT g, 'row ' || g FROM generate_series(1, 1000) g;",
    );
    let stages = format!(
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.hold]\nkind = \"sql\"\non = \"source\"\nafter = [\"load\"]\nsql = \"SELECT pg_advisory_xact_lock_shared({KEY})\"\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\", \"hold\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\nmax_lag = \"1s\"\n\n\
         [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"cutover\"]\n"
    );
    // A name as a person types it: the slot and publication names are derived from it.
    let plan = TestPlan::new(p, "Prod Move 2026", &s, &t, &stages);
    let mut seen: Vec<String> = Vec::new();

    // Before the run: PENDING.
    let (state, _, v) = states(&plan);
    assert_eq!(state, "PENDING");
    assert_eq!(v["output"][0]["state"], "PENDING");
    seen.push(state);

    let load_gate = Gate::close(&p.source, &s);
    let apply_gate = Gate::close(&p.target, &t);
    // The runner's log goes to a file the test can read while it runs.
    let mut child = plan.spawn_logging(plan.command(&["run"]), "run.log");
    let log_text = || plan.log("run.log");

    // FULL_LOAD: the load is done, the stage beside it holds everything after it.
    poll_states(
        &plan,
        &mut child,
        &mut seen,
        "the load to finish",
        |_, v| stage_state(v, "load") == "done" && stage_state(v, "hold") == "running",
    );
    assert_eq!(seen.last().map(String::as_str), Some("FULL_LOAD"));
    // A change for cdc, which the target gate will stop.
    Gate::install(&p.target, &t, "public.items");
    p.source
        .psql(&s, "INSERT INTO public.items VALUES (1001, 'during cdc')");
    load_gate.open();

    // CATCHING_UP: cdc runs and is held at the gate applying that change.
    poll_states(&plan, &mut child, &mut seen, "cdc to run", |state, v| {
        state == "CATCHING_UP" && stage_state(v, "cdc") == "running"
    });
    apply_gate.wait_blocked(&p.target, "pgferry cdc apply", Duration::from_secs(90));
    let (state, _, _) = states(&plan);
    assert_eq!(state, "CATCHING_UP", "cdc is held: still catching up");
    // One lag: in seconds the age of the held commit, growing while it is held; in bytes the
    // source's position minus the applied one.
    let mut first: Option<f64> = None;
    wait_for(
        "the lag in seconds to grow",
        Duration::from_secs(30),
        || {
            let (_, _, v) = states(&plan);
            let db = &v["output"][1];
            let secs = db["lagSeconds"].as_f64().expect("lagSeconds");
            assert_eq!(
                db["latency"], db["lagSeconds"],
                "latency is the lag in seconds"
            );
            let lsn = |k: &str| {
                let text = db[k].as_str().unwrap_or_else(|| panic!("no {k}: {db:#}"));
                let (hi, lo) = text.split_once('/').expect("an LSN");
                (u64::from_str_radix(hi, 16).expect("hex") << 32)
                    + u64::from_str_radix(lo, 16).expect("hex")
            };
            let bytes = db["lagBytes"].as_i64().expect("lagBytes");
            assert_eq!(bytes as u64, lsn("sourceLsn") - lsn("appliedLsn"), "{db:#}");
            assert!(bytes > 0, "the held change is not applied: {db:#}");
            let shown = db["lag"].as_str().unwrap_or_default();
            assert!(
                shown.ends_with(" behind") && shown.contains(&format!("{secs:.1}s (")),
                "{shown}"
            );
            let first = *first.get_or_insert(secs);
            secs >= 1.0 && secs > first
        },
    );
    // And the runner's log says the apply is stalled, and where to look.
    wait_for(
        "cdc to log the stalled apply",
        Duration::from_secs(60),
        || log_text().contains("cdc: applying on the target has been waiting for "),
    );
    apply_gate.open();

    // READY_TO_COMPLETE: cdc caught up, the manual cutover waits for `pgferry cutover`.
    poll_states(
        &plan,
        &mut child,
        &mut seen,
        "the cutover to wait for its approval",
        |state, v| {
            state == "READY_TO_COMPLETE"
                && stage_state(v, "cutover") == "running"
                && v["stages"]
                    .as_array()
                    .and_then(|r| r.iter().find(|r| r["stage"] == "cutover"))
                    .is_some_and(|r| {
                        r["detail"]["databases"][s.as_str()]["phase"] == "ready_to_complete"
                    })
        },
    );
    // It stays there: the cutover never goes on by itself.
    let (state, _, v) = states(&plan);
    assert_eq!(state, "READY_TO_COMPLETE");
    assert_eq!(
        v["output"][1]["lagSeconds"], 0.0,
        "caught up: nothing unapplied"
    );
    // cdc says how it is doing every 10 s: changes applied, their rate, the lag in both units.
    p.source.psql(
        &s,
        "INSERT INTO public.items SELECT g, 'ready' FROM generate_series(2001, 2005) g",
    );
    wait_for("cdc to log its progress", Duration::from_secs(60), || {
        log_text().lines().any(|l| {
            l.contains("cdc: ")
                && l.contains(" change(s) applied in the last ")
                && l.contains("/s, ")
                && l.contains("s (")
                && l.contains(") behind the source")
        })
    });

    // `plan` names the slot and the publication the run created on the source.
    let dry = plan.run(&["plan"]);
    assert_eq!(dry.status.code(), Some(0), "{}", show(&dry));
    let text = String::from_utf8_lossy(&dry.stdout);
    let shown = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .unwrap_or_else(|| panic!("no `{label}` in:\n{text}"))
            .trim()
            .to_string()
    };
    assert!(
        text.contains(&format!(
            "planner statistics of {t}: ANALYZE every selected table on the target while waiting for the approval, done before the fence"
        )),
        "`plan` says how the target gets its statistics:\n{text}"
    );
    let slot = shown("replication slot on the source:");
    let publication = shown("publication on the source:");
    let count = |sql: String| p.source.psql(&s, &sql);
    let slots = |name: &str| {
        count(format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}'"
        ))
    };
    let publications = |name: &str| {
        count(format!(
            "SELECT count(*) FROM pg_publication WHERE pubname = '{name}'"
        ))
    };
    assert!(slot.starts_with("pgferry_prod_move_2026_"), "{slot}");
    assert!(
        publication.starts_with("pgferry_prod_move_2026_"),
        "{publication}"
    );
    assert_eq!(slots(&slot), "1", "the slot `plan` shows is the run's");
    assert_eq!(publications(&publication), "1");

    // CUTTING_OVER from the approval on, held by a change cdc cannot apply yet.
    let drain_gate = Gate::close(&p.target, &t);
    p.source.psql(
        &s,
        "INSERT INTO public.items VALUES (1002, 'before the approval')",
    );
    drain_gate.wait_blocked(&p.target, "pgferry cdc apply", Duration::from_secs(90));
    let out = plan.run(&["cutover"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    poll_states(
        &plan,
        &mut child,
        &mut seen,
        "the cutover to start",
        |state, _| state == "CUTTING_OVER",
    );
    // The cutover says why it waits, in the same terms: seconds and bytes against max_lag.
    let waiting = format!(
        "SELECT message FROM pgferry.events WHERE migration = 'Prod Move 2026' \
          AND message LIKE 'cutover of {s} waits before fencing: cdc is %s (%) behind the source, more than max_lag (1s)' LIMIT 1"
    );
    wait_for(
        "the cutover to say why it waits",
        Duration::from_secs(60),
        || !p.target.psql(&t, &waiting).is_empty(),
    );
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "off",
        "the approved cutover waits for the lag before it fences"
    );
    drain_gate.open();

    let status = child.wait().expect("the runner");
    assert_eq!(status.code(), Some(0), "{}", log_text());
    let (state, database, v) = states(&plan);
    assert_eq!(
        (state.as_str(), database.as_str()),
        ("COMPLETED", "COMPLETED")
    );
    assert_eq!(v["output"][0]["state"], "SUCCEEDED");
    if seen.last() != Some(&state) {
        seen.push(state);
    }
    assert_eq!(
        seen,
        [
            "PENDING",
            "FULL_LOAD",
            "CATCHING_UP",
            "READY_TO_COMPLETE",
            "CUTTING_OVER",
            "COMPLETED"
        ]
    );
    // And the data made it: both changes, every row.
    Gate::uninstall(&p.target, &t, "public.items");
    assert_eq!(
        row_digest(&p.target, &t, "public.items"),
        row_digest(&p.source, &s, "public.items")
    );
    assert_eq!(
        p.target
            .psql(&t, "SELECT count(*) FROM public.items WHERE id > 1000"),
        "7"
    );
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "on"
    );
    // Cleanup found them by the same derived names.
    assert_eq!(slots(&slot), "0");
    assert_eq!(publications(&publication), "0");

    // Planner statistics: every loaded table was analyzed (by pgferry, not autovacuum) before the
    // fence, though the plan has no ANALYZE stage.
    assert_eq!(
        p.target.psql(
            &t,
            &format!(
                "SELECT count(*) FILTER (WHERE s.last_analyze IS NOT NULL AND s.last_analyze < f.at) || '/' || count(*) \
                   FROM pg_stat_user_tables s, \
                        (SELECT min(at) AS at FROM pgferry.events WHERE migration = 'Prod Move 2026' \
                          AND message = 'source database {s} is now read-only') f \
                  WHERE s.schemaname = 'public'"
            )
        ),
        "1/1",
        "public.items analyzed before the fence"
    );
    assert_ne!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND tablename = 'items'"
        ),
        "0",
        "pg_stats has the loaded table's columns"
    );
    // The report says when.
    let out = plan.run(&["report", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report JSON");
    let stats = &r["cutover"][0]["statistics"];
    assert_eq!(stats["tables"], 1, "{r:#}");
    assert!(stats["finished_at"].as_f64().is_some(), "{stats}");
    let out = plan.run(&["report"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("planner statistics before the fence: 1 table(s) analyzed in"),
        "{text}"
    );
}
