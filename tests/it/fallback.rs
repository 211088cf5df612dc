//! Taking a cutover back (issue 18): an online migration with a writer on the source, a cutover
//! that arms the fallback stream, an application writing on the target afterwards (inserts,
//! updates, deletes, a TRUNCATE, a large transaction, sequences), then `pgferry rollback`: the
//! source must equal the target exactly, sequences included, and be writable again. The same
//! with the runner killed while the reverse stream applies and while the rollback drains (a gate
//! on the source stops the reverse apply exactly there), and across versions (16 -> 18, where the
//! stream also filters by replication origin).

use std::process::Child;
use std::time::Duration;

use crate::support::compare::assert_same_on;
use crate::support::{
    Cluster, FENCE_CODES, Gate, Pair, TestPlan, Writer, WriterSpec, pair, show, wait_for,
};

const PLAN: &str = "[stages.schema]\nkind = \"schema_dump\"\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
    [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
    [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
    [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\nmax_lag = \"1s\"\nquiet_for = \"1s\"\n\n\
    [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
    [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"sequences\"]\n\n\
    [stages.fallback]\nkind = \"fallback\"\nafter = [\"cutover\"]\n";

/// A partitioned table, identity and serial columns, a standalone sequence, a foreign key, a
/// REPLICA IDENTITY FULL table, a large object, a materialized view.
const FIXTURE: &str = "\
    CREATE TABLE public.items (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL, price numeric(10,2));\n\
    CREATE TABLE public.events (id bigserial, at date NOT NULL, kind text, payload jsonb, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);\n\
    CREATE TABLE public.events_2024 PARTITION OF public.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');\n\
    CREATE TABLE public.events_2025 PARTITION OF public.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');\n\
    CREATE TABLE public.orders (id serial PRIMARY KEY, item_id int REFERENCES public.items (id), qty int, note text);\n\
    CREATE TABLE public.audit (id int PRIMARY KEY, v text);\n\
    ALTER TABLE public.audit REPLICA IDENTITY FULL;\n\
    CREATE SEQUENCE public.tickets START 100;\n\
    SELECT nextval('public.tickets') FROM generate_series(1, 7);\n\
    INSERT INTO public.items (name, price) SELECT 'item ' || g, g * 1.5 FROM generate_series(1, 500) g;\n\
    INSERT INTO public.events (at, kind, payload) SELECT date '2024-01-01' + (g % 700), 'k' || (g % 5), jsonb_build_object('g', g) FROM generate_series(1, 2000) g;\n\
    INSERT INTO public.orders (item_id, qty, note) SELECT (g % 500) + 1, g % 7, repeat('n', g % 50) FROM generate_series(1, 1000) g;\n\
    INSERT INTO public.audit SELECT g, 'a' || g FROM generate_series(1, 100) g;\n\
    CREATE MATERIALIZED VIEW public.kinds AS SELECT kind, count(*) AS n FROM public.events GROUP BY kind;\n\
    SELECT lo_from_bytea(0, convert_to(repeat('a large object; ', 500), 'UTF8'));\n";

/// An application writing small transactions to `db` on the cluster at `port` (`tag` in what it
/// writes) until a fence refuses it.
fn writer(port: u16, db: String, tag: &'static str) -> Writer {
    Writer::start(
        WriterSpec {
            name: if tag == "source" {
                "the source writer"
            } else {
                "the target writer"
            },
            port,
            db,
            user: None,
            every: Duration::from_millis(5),
            fenced_by: FENCE_CODES,
        },
        move |i| step(tag, i as i64),
    )
}

/// The application's step `i`.
fn step(tag: &str, i: i64) -> String {
    match i % 6 {
        0 => format!("INSERT INTO public.items (name, price) VALUES ('{tag} {i}', {i} % 100)"),
        1 => format!(
            "UPDATE public.items SET price = price + 1 WHERE id = {}",
            (i % 500) + 1
        ),
        2 => format!(
            "INSERT INTO public.events (at, kind, payload) VALUES (date '2024-06-01' + ({i} % 400), '{tag}', '{{\"i\": {i}}}')"
        ),
        3 => format!(
            "BEGIN; INSERT INTO public.orders (item_id, qty, note) VALUES ({}, 1, '{tag}'); UPDATE public.audit SET v = '{tag} {i}' WHERE id = {}; COMMIT",
            (i % 500) + 1,
            (i % 100) + 1
        ),
        4 => {
            "DELETE FROM public.orders WHERE id = (SELECT min(id) FROM public.orders WHERE qty = 1)"
                .into()
        }
        _ => "SELECT nextval('public.tickets')".into(),
    }
}

fn stage_state(p: &Pair, plan: &TestPlan, stage: &str) -> String {
    p.target.psql(
        &plan.target_db,
        &format!(
            "SELECT coalesce((SELECT state FROM pgferry.stages WHERE migration = '{}' AND stage = '{stage}'), '')",
            plan.name
        ),
    )
}

fn wait_stage(p: &Pair, plan: &TestPlan, child: &mut Child, stage: &str, state: &str) {
    wait_for(
        &format!("stage {stage} to be {state}"),
        Duration::from_secs(180),
        || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the runner stopped early: {status:?}\n{}", log(plan, "run"));
            }
            p.target.psql(
                &plan.target_db,
                "SELECT to_regclass('pgferry.stages') IS NOT NULL",
            ) == "t"
                && stage_state(p, plan, stage) == state
        },
    );
}

/// Starts `pgferry <what> PLAN` in the background, its output going to files in the plan's
/// directory (a pipe nobody reads would block a long run).
fn spawn(plan: &TestPlan, what: &str) -> Child {
    let file = |ext: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(plan.dir.path().join(format!("{what}.{ext}")))
            .expect("log file")
    };
    plan.command(&[what])
        .stdout(file("out"))
        .stderr(file("err"))
        .spawn()
        .expect("spawn pgferry")
}

/// What `pgferry <what>` wrote (every run of it, appended), stdout then stderr.
fn log(plan: &TestPlan, what: &str) -> String {
    let read = |ext: &str| {
        std::fs::read_to_string(plan.dir.path().join(format!("{what}.{ext}"))).unwrap_or_default()
    };
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        read("out"),
        read("err")
    )
}

/// [`wait_for`], printing the runner's log when it times out.
fn wait_logged(plan: &TestPlan, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                log(plan, "run")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a background command; returns its exit code.
fn finish(mut child: Child, what: &str) -> Option<i32> {
    wait_for(
        &format!("pgferry {what} to finish"),
        Duration::from_secs(180),
        || matches!(child.try_wait(), Ok(Some(_))),
    );
    child.wait().expect("exit status").code()
}

/// What the application does on the target after the switch, besides the writer: a large
/// transaction, a TRUNCATE, deletes, updates of the REPLICA IDENTITY FULL table, sequences.
const ON_TARGET: &str = "\
    BEGIN; INSERT INTO public.orders (item_id, qty, note) SELECT (g % 500) + 1, 3, md5(g::text) FROM generate_series(1, 30000) g; \
      UPDATE public.items SET name = name || ' (big)' WHERE id % 7 = 0; COMMIT;\n\
    TRUNCATE public.audit;\n\
    INSERT INTO public.audit SELECT g, 'after truncate ' || g FROM generate_series(1, 40) g;\n\
    UPDATE public.audit SET v = 'changed' WHERE id % 3 = 0;\n\
    DELETE FROM public.audit WHERE id % 5 = 0;\n\
    DELETE FROM public.events WHERE at < date '2024-02-01';\n\
    UPDATE public.events SET at = date '2025-03-01' WHERE id IN (SELECT id FROM public.events WHERE at < date '2024-03-01' LIMIT 20);\n\
    SELECT setval('public.tickets', 5000);\n";

/// Runs the whole scenario on `p`. `kill`: kill the runner once while the reverse stream
/// applies and once while the rollback drains. Returns the rollback's output.
fn scenario(p: &'static Pair, prefix: &str, kill: bool, origin: bool) -> String {
    let s = p.source.fresh_database(&format!("{prefix}_src"));
    p.source.psql(&s, FIXTURE);
    if kill {
        // A gate the reverse apply's changes to items wait at while the test holds it (the
        // trigger is part of the schema, so the target has it too, never closed there).
        Gate::install(&p.source, &s, "public.items");
    }
    let t = p.target.fresh_database(&format!("{prefix}_tgt"));
    let plan = TestPlan::new(p, prefix, &s, &t, PLAN);

    // The online migration, with an application writing to the source until the fence.
    let mut on_source = writer(p.source.port, s.clone(), "source");
    let mut child = spawn(&plan, "run");
    wait_stage(p, &plan, &mut child, "cutover", "done");
    on_source.stop();
    assert!(
        on_source.fenced(),
        "the source writer was not stopped by the cutover's fence"
    );
    // The cutover armed the reverse stream: a slot on the target.
    let slots = p.target.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_{}\\_%\\_fb'", plan.name),
    );
    assert_eq!(
        slots, "1",
        "the cutover created no fallback slot on the target"
    );

    // The application now writes to the target, once its sequences are set.
    wait_stage(p, &plan, &mut child, "sequences", "done");
    if origin {
        origin_filter(p, &plan);
    }
    let mut on_target = writer(p.target.port, t.clone(), "target");
    p.target.psql(&t, ON_TARGET);
    // The reverse stream keeps the source in step while the target is written: the large
    // transaction reaches the source before any rollback.
    let gate = kill.then(|| {
        // The next reverse change to items waits at the gate: the runner is killed there.
        let gate = Gate::close(&p.source, &s);
        gate.wait_blocked(&p.source, "pgferry cdc apply", Duration::from_secs(60));
        let _ = child.kill();
        let _ = child.wait();
        gate
    });
    if let Some(gate) = gate {
        child = spawn(&plan, "run");
        gate.open();
    }
    wait_logged(
        &plan,
        "the large transaction to reach the source",
        Duration::from_secs(120),
        || {
            p.source.psql(
                &s,
                "SELECT count(*) FROM public.orders WHERE qty = 3 AND note ~ '^[0-9a-f]{32}$'",
            ) == "30000"
        },
    );
    let reverse_applied = p.target.psql(
        &t,
        &format!(
            "SELECT coalesce(sum(value), 0) FROM pgferry.counters WHERE migration = '{prefix}' AND scope = 'fallback:{s}' AND name = 'totalChangesApplied'"
        ),
    );
    // `status` shows the reverse stream and its lag.
    let out = plan.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("[test] pgferry status:\n{text}");
    assert!(
        text.contains(&format!(
            "fallback {s} (target back to the source): streaming"
        )) && text.contains("the target\n"),
        "{text}"
    );
    let out = plan.run(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let fb = json["output"]
        .as_array()
        .and_then(|o| o.iter().find(|d| d["fallback"].is_object()))
        .map(|d| d["fallback"].clone())
        .unwrap_or_else(|| panic!("no fallback in status --json: {json}"));
    assert_eq!(fb["state"], "streaming", "{fb}");
    assert!(
        fb["lagBytes"].is_i64() && fb["appliedLsn"].is_string(),
        "{fb}"
    );
    // `verify` compares in reverse while the application writes to the target: both sides as of
    // one target LSN (the fallback stream held there).
    let out = plan.run(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("[test] pgferry verify:\n{text}");
    assert!(text.contains("compared in reverse"), "{text}");

    // Roll back. With `kill`, the reverse apply is stopped at the gate during the drain and the
    // runner killed there, then resumed.
    let gate = kill.then(|| Gate::close(&p.source, &s));
    let mut rollback = spawn(&plan, "rollback");
    if let Some(gate) = gate {
        // The writer changes items until the fence: the drain has items to apply, and waits at
        // the gate with the target fenced and the drain target recorded.
        gate.wait_blocked(&p.source, "pgferry cdc apply", Duration::from_secs(60));
        wait_for(
            "the rollback to fence the target",
            Duration::from_secs(60),
            // The fence ends sessions on the target, this poll's among them: a failed poll is
            // "not yet".
            || {
                p.target.try_psql(&t, "SHOW default_transaction_read_only").as_deref() == Ok("on")
                && p.target.try_psql(
                    &t,
                    &format!("SELECT count(*) FROM pgferry.checkpoints WHERE migration = '{prefix}' AND stage = 'fallback' AND key = 'drain:{s}'"),
                ).as_deref() == Ok("1")
            },
        );
        let _ = child.kill();
        let _ = child.wait();
        child = spawn(&plan, "run");
        gate.open();
    }
    if kill {
        // Then SIGKILLs at random moments of the rest of the rollback (the drain, the resync, the
        // sequences, the slot's drop, the unfence), each run resumed; the seed is printed.
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 | 1)
            .unwrap_or(1);
        eprintln!("[test] random kills during the rollback, seed {seed}");
        for _ in 0..3 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(Duration::from_millis(100 + seed % 700));
            if matches!(rollback.try_wait(), Ok(Some(_))) {
                break;
            }
            let _ = child.kill();
            let _ = child.wait();
            child = spawn(&plan, "run");
        }
    }
    let code = finish(rollback, "rollback");
    assert_eq!(code, Some(0), "{}", log(&plan, "rollback"));
    on_target.stop();
    assert!(
        on_target.fenced(),
        "the target writer was not stopped by the rollback's fence"
    );
    let code = finish(child, "run");
    assert_eq!(code, Some(0), "{}", log(&plan, "run"));

    // The source has every write made on the target, sequences included, and is writable again;
    // the target is fenced; the fallback slot and publication are gone.
    assert_same_on(p, &s, &t);
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "off"
    );
    assert_eq!(
        p.target.psql(&t, "SHOW default_transaction_read_only"),
        "on"
    );
    // The target's setval (and the writer's nextval after it) reached the source's sequence.
    let tickets: i64 = p
        .source
        .psql(&s, "SELECT last_value FROM public.tickets")
        .parse()
        .expect("a number");
    assert!(tickets >= 5000, "tickets is {tickets} on the source");
    assert_eq!(
        p.target.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_{}\\_%\\_fb'", plan.name)
        ),
        "0"
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgferry%_fb'"
        ),
        "0"
    );
    // Identity columns are GENERATED ALWAYS on the source again: the application inserts there.
    p.source.psql(
        &s,
        "INSERT INTO public.items (name, price) VALUES ('after rollback', 1)",
    );
    let out = plan.run(&["report"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("[test] pgferry report:\n{text}");
    assert!(
        text.contains(&format!("fallback (fallback) of {s}: rolled back;"))
            && text.contains("write downtime"),
        "{text}"
    );
    let stdout = log(&plan, "rollback");
    assert!(stdout.contains("write downtime"), "{stdout}");
    let n = on_target.transactions();
    eprintln!(
        "[test] {n} writer transactions on the target, {reverse_applied} changes applied back before the rollback\n{stdout}"
    );
    assert!(n > 20, "the target writer wrote only {n} transactions");
    stdout
}

/// On a 16+ target: the forward apply tagged its transactions with pgferry's replication origin,
/// and the fallback stream leaves out what is written under it (`origin = 'none'`). A write under
/// that origin (as a forward apply run again after the cutover would make) stays on the target,
/// while an ordinary write after it reaches the source. Both are undone before the comparison.
fn origin_filter(p: &Pair, plan: &TestPlan) {
    let (s, t) = (&plan.source_db, &plan.target_db);
    let origin = p.target.psql(
        t,
        &format!(
            "SELECT roname FROM pg_replication_origin WHERE roname LIKE 'pgferry\\_{}\\_%'",
            plan.name
        ),
    );
    assert!(
        !origin.is_empty(),
        "the forward apply set up no replication origin on the 16+ target"
    );
    p.target.psql(
        t,
        &format!(
            "SELECT pg_replication_origin_session_setup('{origin}'); \
             INSERT INTO public.audit VALUES (900001, 'written under the origin'); \
             SELECT pg_replication_origin_session_reset(); \
             INSERT INTO public.audit VALUES (900002, 'written by the application');"
        ),
    );
    wait_for(
        "the ordinary write to reach the source",
        Duration::from_secs(60),
        || {
            p.source
                .psql(s, "SELECT count(*) FROM public.audit WHERE id = 900002")
                == "1"
        },
    );
    assert_eq!(
        p.source
            .psql(s, "SELECT count(*) FROM public.audit WHERE id = 900001"),
        "0",
        "a change written under pgferry's replication origin went back to the source"
    );
    p.target.psql(
        t,
        &format!(
            "SELECT pg_replication_origin_session_setup('{origin}'); \
             DELETE FROM public.audit WHERE id = 900001; \
             SELECT pg_replication_origin_session_reset();"
        ),
    );
}

#[test]
fn rollback_brings_every_target_write_back_to_the_source() {
    scenario(pair(), "fb_plain", false, false);
}

#[test]
fn rollback_resumes_after_the_runner_is_killed() {
    scenario(pair(), "fb_kill", true, false);
}

/// A newer target rolled back to an older source (the pair 16 -> 18 of the version matrix); the
/// 18 target filters by replication origin as well as by position.
#[test]
fn rollback_from_an_18_target_to_a_16_source() {
    across_versions(16, 18);
}

/// The widest pair of the matrix: a 12 source (whose partitions were published leaf by leaf)
/// taking back what an 18 target publishes by the partitioned root.
#[test]
fn rollback_from_an_18_target_to_a_12_source() {
    across_versions(12, 18);
}

fn across_versions(source: u32, target: u32) {
    let (s, t) = std::thread::scope(|scope| {
        let s = scope.spawn(|| Cluster::start_version(source, &format!("fb{source}src")));
        let t = scope.spawn(|| Cluster::start_version(target, &format!("fb{target}tgt")));
        (s.join().expect("source"), t.join().expect("target"))
    });
    let (Some(source_cluster), Some(target_cluster)) = (s, t) else {
        eprintln!(
            "\n*** SKIPPED rollback from {target} to {source}: PostgreSQL {source} or {target} is not installed (scripts/pg-versions.sh) ***\n"
        );
        return;
    };
    let p: &'static Pair = Box::leak(Box::new(Pair {
        source: source_cluster,
        target: target_cluster,
    }));
    scenario(p, &format!("fb_{source}_{target}"), false, target >= 16);
}

#[test]
fn fallback_stop_drops_the_slot_and_keeps_the_source_fenced() {
    let p = pair();
    let s = p.source.fresh_database("fb_stop_src");
    p.source.psql(&s, FIXTURE);
    let t = p.target.fresh_database("fb_stop_tgt");
    let plan = TestPlan::new(p, "fb_stop", &s, &t, PLAN);
    let mut child = spawn(&plan, "run");
    wait_stage(p, &plan, &mut child, "cutover", "done");
    p.target.psql(
        &t,
        "INSERT INTO public.audit VALUES (1000, 'on the target')",
    );
    wait_for(
        "the insert to reach the source",
        Duration::from_secs(60),
        || {
            p.source
                .psql(&s, "SELECT count(*) FROM public.audit WHERE id = 1000")
                == "1"
        },
    );
    // While the stream runs, `unfence` is refused: the source is being written by it.
    let out = plan.run(&["unfence"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is armed"),
        "{}",
        show(&out)
    );
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "on"
    );
    let out = plan.run(&["fallback-stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let code = finish(child, "run");
    assert_eq!(code, Some(0), "{}", log(&plan, "run"));
    assert_eq!(
        p.target.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_{}\\_%\\_fb'", plan.name)
        ),
        "0"
    );
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "on"
    );
    // A rollback is refused now: the target's writes from here on cannot go back.
    let out = plan.run(&["rollback"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fallback-stop"),
        "{}",
        show(&out)
    );
    // The stream is over: `unfence` makes the source writable (without the target's writes).
    let out = plan.run(&["unfence"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "off"
    );
}

/// Preflight of a plan with a fallback stage checks the target as a replication source: here its
/// `wal_level` is `replica`, which it names before anything is changed.
#[test]
fn preflight_names_a_target_that_cannot_replicate() {
    let (source, target) = std::thread::scope(|scope| {
        let s = scope.spawn(|| Cluster::start("fbpresrc"));
        let t = scope.spawn(|| Cluster::start_with("fbpretgt", "wal_level = replica\n", &[]));
        (s.join().expect("source"), t.join().expect("target"))
    });
    let p: &'static Pair = Box::leak(Box::new(Pair { source, target }));
    let s = p.source.fresh_database("fb_pre_src");
    p.source
        .psql(&s, "CREATE TABLE public.t (id int PRIMARY KEY, v text)");
    let t = p.target.fresh_database("fb_pre_tgt");
    let stages = format!(
        "[stages.pre]\nkind = \"preflight\"\n\n{}",
        PLAN.replacen(
            "[stages.schema]\nkind = \"schema_dump\"\n",
            "[stages.schema]\nkind = \"schema_dump\"\nafter = [\"pre\"]\n",
            1,
        )
    );
    let plan = TestPlan::new(p, "fb_pre", &s, &t, &stages);
    let out = plan.run(&["run", "--until", "pre"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("target wal_level is `replica`; the fallback stream (reverse replication after the cutover) needs `logical` on the target"),
        "{}",
        show(&out)
    );
}

/// `pgferry reset` drops the fallback slot and publication on the target too.
#[test]
fn reset_drops_the_fallback_slot() {
    let p = pair();
    let s = p.source.fresh_database("fb_reset_src");
    p.source.psql(&s, FIXTURE);
    let t = p.target.fresh_database("fb_reset_tgt");
    let plan = TestPlan::new(p, "fb_reset", &s, &t, PLAN);
    let mut child = spawn(&plan, "run");
    wait_stage(p, &plan, &mut child, "fallback", "running");
    let _ = child.kill();
    let _ = child.wait();
    let slots = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_{}\\_%\\_fb'",
        plan.name
    );
    assert_eq!(p.target.psql("postgres", &slots), "1");
    let out = plan.run(&["reset", "--yes", "--keep-target"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(p.target.psql("postgres", &slots), "0", "{}", show(&out));
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'pgferry%_fb'"
        ),
        "0"
    );
}

/// A rehearsal of a plan with a fallback stage: the rehearsal's cutover fences nothing and arms
/// nothing, and the fallback stage says so instead of failing.
#[test]
fn a_rehearsal_arms_no_fallback() {
    let p = pair();
    let s = p.source.fresh_database("fb_reh_src");
    p.source.psql(&s, FIXTURE);
    let t = p.target.fresh_database("fb_reh_tgt");
    let plan = TestPlan::new(p, "fb_reh", &s, &t, PLAN);
    let out = plan.run(&["run", "--rehearsal"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rehearsal: no fallback stream"),
        "{}",
        show(&out)
    );
    let slots = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry\\_{}\\_%\\_fb'",
        plan.name
    );
    assert_eq!(p.target.psql("postgres", &slots), "0");
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "off"
    );
}

/// `pgferry rollback --no-wait` while no runner runs records the request; the next `pgferry run`
/// carries it out before streaming (the target written meanwhile loses nothing).
#[test]
fn a_rollback_requested_without_a_runner_is_done_by_the_next_run() {
    let p = pair();
    let s = p.source.fresh_database("fb_later_src");
    p.source.psql(&s, FIXTURE);
    let t = p.target.fresh_database("fb_later_tgt");
    let plan = TestPlan::new(p, "fb_later", &s, &t, PLAN);
    let mut child = spawn(&plan, "run");
    wait_stage(p, &plan, &mut child, "fallback", "running");
    wait_stage(p, &plan, &mut child, "sequences", "done");
    let _ = child.kill();
    let _ = child.wait();
    // Written while nothing streams back.
    p.target.psql(
        &t,
        "INSERT INTO public.items (name, price) SELECT 'later ' || g, g FROM generate_series(1, 300) g; \
         DELETE FROM public.audit WHERE id <= 10; SELECT setval('public.tickets', 777)",
    );
    let out = plan.run(&["rollback", "--no-wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_same_on(p, &s, &t);
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "off"
    );
    assert_eq!(
        p.target.psql(&t, "SHOW default_transaction_read_only"),
        "on"
    );
    assert_eq!(
        p.source.psql(&s, "SELECT last_value FROM public.tickets"),
        "777"
    );
}
