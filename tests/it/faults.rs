//! Faults against real clusters, each ending with an exact comparison of source and target: the
//! runner's sessions terminated by the server during the copy and during the apply (the stage
//! retries and finishes), the source restarted during cdc, the target restarted during the apply,
//! and the slot or the publication dropped behind pgferry's back (a clear error that says what
//! happened and how to recover, and no claim of success).
//!
//! Some of these tests restart servers, so this binary has its own cluster pair (not
//! `support::pair()`); a restarting test runs alone (`exclusive`), the others side by side
//! (`shared`). The index build's terminated session is covered by
//! `post_data_stages::a_terminated_session_is_retried_and_the_stage_resumes`, a second runner by
//! `executor::a_second_runner_is_refused_and_names_the_holder`.

use crate::support;

use std::process::{Child, Output};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use crate::support::{Cluster, Gate, Pair, TestPlan, row_digest, show, wait_for};

const TIMEOUT: Duration = Duration::from_secs(90);

/// This binary's own source and target, started on first use.
fn fpair() -> &'static Pair {
    static PAIR: OnceLock<Pair> = OnceLock::new();
    PAIR.get_or_init(|| {
        let (source, target) = std::thread::scope(|s| {
            let source = s.spawn(|| Cluster::start("fault_source"));
            let target = s.spawn(|| Cluster::start("fault_target"));
            (
                source.join().expect("start the source"),
                target.join().expect("start the target"),
            )
        });
        Pair { source, target }
    })
}

static SERVERS: RwLock<()> = RwLock::new(());

/// For a test that restarts a server: runs alone.
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    SERVERS.write().unwrap_or_else(|e| e.into_inner())
}

/// For a test that only touches its own databases and sessions: runs beside the others like it.
fn shared() -> RwLockReadGuard<'static, ()> {
    SERVERS.read().unwrap_or_else(|e| e.into_inner())
}

const SETUP: &str = "\
    CREATE TABLE public.items (id int PRIMARY KEY, name text, pad text);\n\
    CREATE TABLE public.events (n int, v text);\n\
    ALTER TABLE public.events REPLICA IDENTITY FULL;\n\
    CREATE INDEX items_name_idx ON public.items (name);\n\
    INSERT INTO public.items SELECT g, 'item ' || g, repeat(md5(g::text), 4) FROM generate_series(1, 20000) g;\n\
    INSERT INTO public.events SELECT g, 'event ' || g FROM generate_series(1, 1000) g;\n";

fn online_stages() -> String {
    "[stages.schema]\nkind = \"schema_dump\"\n\n\
     [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
     [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
     [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
     [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
     [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\n"
        .to_string()
}

fn assert_same(sdb: &str, tdb: &str) {
    let p = fpair();
    for t in ["public.items", "public.events"] {
        assert_eq!(
            row_digest(&p.source, sdb, t),
            row_digest(&p.target, tdb, t),
            "{t} differs"
        );
    }
}

fn stage_state(plan: &TestPlan, stage: &str) -> String {
    let t = &fpair().target;
    if t.psql(
        &plan.target_db,
        "SELECT to_regclass('pgferry.stages') IS NULL",
    ) == "t"
    {
        return "absent".into();
    }
    t.psql(
        &plan.target_db,
        &format!(
            "SELECT coalesce((SELECT state FROM pgferry.stages WHERE migration = '{}' AND stage = '{stage}'), 'absent')",
            plan.name
        ),
    )
}

/// A fresh source with `SETUP` and an empty target, and the plan.
fn prepare(name: &str, stages: &str) -> TestPlan {
    let p = fpair();
    let s = p.source.fresh_database(&format!("{name}_src"));
    let t = p.target.fresh_database(&format!("{name}_tgt"));
    p.source.psql(&s, SETUP);
    TestPlan::new(p, name, &s, &t, stages)
}

/// Starts the online plan and waits until cdc is ready (the cutover waits for approval).
fn start_online(name: &str) -> (TestPlan, Child) {
    let plan = prepare(name, &online_stages());
    let mut child = plan.spawn(&["run"]);
    wait_for("cdc to be ready", TIMEOUT, || {
        assert_running(&mut child);
        stage_state(&plan, "cdc") == "ready"
    });
    (plan, child)
}

fn assert_running(child: &mut Child) {
    if let Ok(Some(status)) = child.try_wait() {
        let out = std::mem::replace(child, dummy()).wait_with_output();
        panic!("the runner stopped early ({status:?}): {out:?}");
    }
}

/// A finished process to swap in for a child whose output we take.
fn dummy() -> Child {
    std::process::Command::new("true")
        .spawn()
        .expect("spawn true")
}

fn wait_exit(child: Child) -> Output {
    let mut child = child;
    let start = std::time::Instant::now();
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("runner output");
            panic!(
                "the runner did not finish within {TIMEOUT:?}:\n{}",
                show(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("runner output")
}

/// Approves the cutover and waits for the runner to finish it.
fn cut_over(plan: &TestPlan, child: Child) -> Output {
    let out = plan.run(&["cutover"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = wait_exit(child);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    out
}

/// The cdc apply session's `application_name`.
const APPLY: &str = "pgferry cdc apply";

/// Closes a gate on the target's `public.events` (see `support::gate`), so the apply of the next
/// change to that table stops there until the test opens it: the test makes the window it injects
/// its fault in, whatever the apply's speed.
fn close_gate(plan: &TestPlan) -> Gate {
    let t = &fpair().target;
    Gate::install(t, &plan.target_db, "public.events");
    Gate::close(t, &plan.target_db)
}

/// One large source transaction: `rows` inserts into `public.events` and 2000 updates of
/// `public.items`.
fn big_transaction(plan: &TestPlan, rows: u32) {
    fpair().source.psql(
        &plan.source_db,
        &format!(
            "BEGIN; INSERT INTO public.events SELECT g, 'big ' || g FROM generate_series(1, {rows}) g; \
             UPDATE public.items SET name = name || ' changed' WHERE id % 10 = 0; COMMIT;"
        ),
    );
}

/// Whether the applied position on the target has reached the source's current WAL position.
fn caught_up(plan: &TestPlan) -> bool {
    let p = fpair();
    let lsn = p
        .source
        .psql(&plan.source_db, "SELECT pg_current_wal_lsn()");
    p.target.psql(
        &plan.target_db,
        &format!(
            "SELECT coalesce(bool_and(lsn >= '{lsn}'::pg_lsn), false) FROM pgferry.cdc_applied"
        ),
    ) == "t"
}

#[test]
fn terminated_copy_sessions_are_retried_and_the_load_finishes() {
    let _servers = shared();
    let p = fpair();
    let plan = prepare(
        "fault_copy",
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n",
    );
    // Enough rows that the copy takes a moment.
    p.source.psql(
        &plan.source_db,
        "INSERT INTO public.events SELECT g, repeat(md5(g::text), 8) FROM generate_series(1001, 300000) g",
    );
    let mut child = plan.spawn(&["run"]);
    // Only this test's sessions: the others run beside it.
    let copying = |db: &str| {
        format!(
            "FROM pg_stat_activity WHERE datname = '{db}' AND application_name LIKE 'pgferry%' AND query ILIKE 'COPY %'"
        )
    };
    wait_for("a COPY on the target", TIMEOUT, || {
        assert_running(&mut child);
        p.target.psql(
            "postgres",
            &format!("SELECT count(*) {}", copying(&plan.target_db)),
        ) != "0"
    });
    let terminate = |c: &Cluster, db: &str| -> i64 {
        c.psql(
            "postgres",
            &format!("SELECT count(pg_terminate_backend(pid)) {}", copying(db)),
        )
        .parse()
        .expect("a count")
    };
    let killed = terminate(&p.target, &plan.target_db);
    let killed_source = terminate(&p.source, &plan.source_db);
    assert!(killed + killed_source >= 1, "nothing to terminate");
    let out = wait_exit(child);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("transient failure"),
        "the load was retried: {}",
        show(&out)
    );
    assert_same(&plan.source_db, &plan.target_db);
}

#[test]
fn terminated_apply_and_walsender_sessions_are_retried() {
    let _servers = shared();
    let p = fpair();
    let (plan, mut child) = start_online("fault_apply");
    let gate = close_gate(&plan);
    big_transaction(&plan, 20000);
    gate.wait_blocked(&p.target, APPLY, TIMEOUT);
    assert_running(&mut child);
    // The first stream's walsender, to tell the reopened one from it (the old one may still be
    // exiting when the retried stage connects).
    let first_walsender = p.source.psql(
        "postgres",
        &format!(
            "SELECT coalesce(string_agg(pid::text, ','), '0') FROM pg_stat_activity WHERE datname = '{}' AND backend_type = 'walsender'",
            plan.source_db
        ),
    );
    let killed = p.target.psql(
        "postgres",
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{}' AND application_name = '{APPLY}'",
            plan.target_db
        ),
    );
    assert_eq!(killed, "1");
    // And the stream: the walsender on the source, once the retried stage has reopened it.
    let reopened = format!(
        "FROM pg_stat_activity WHERE datname = '{}' AND backend_type = 'walsender' AND pid NOT IN ({first_walsender})",
        plan.source_db
    );
    wait_for("the stream to be reopened", TIMEOUT, || {
        p.source
            .psql("postgres", &format!("SELECT count(*) {reopened}"))
            == "1"
    });
    let killed = p.source.psql(
        "postgres",
        &format!("SELECT count(pg_terminate_backend(pid)) {reopened}"),
    );
    assert_eq!(killed, "1");
    // Both faults hit a transaction that was not applied yet: nothing of it may be on the target.
    assert_eq!(
        p.target.psql(
            &plan.target_db,
            "SELECT count(*) FROM public.events WHERE v LIKE 'big %'"
        ),
        "0"
    );
    gate.open();
    p.source
        .psql(&plan.source_db, "DELETE FROM public.items WHERE id < 100");
    let out = cut_over(&plan, child);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("transient failure"),
        "{}",
        show(&out)
    );
    assert_same(&plan.source_db, &plan.target_db);
}

#[test]
fn source_restart_during_cdc() {
    let _servers = exclusive();
    let p = fpair();
    let (plan, mut child) = start_online("fault_src_restart");
    p.source.psql(
        &plan.source_db,
        "INSERT INTO public.events SELECT g, 'before restart' FROM generate_series(1, 5000) g",
    );
    p.source.pg_ctl(&["restart", "-m", "fast"]);
    assert_running(&mut child);
    p.source.psql(
        &plan.source_db,
        "INSERT INTO public.events SELECT g, 'after restart' FROM generate_series(1, 5000) g; \
         UPDATE public.items SET name = 'after restart' WHERE id < 50",
    );
    cut_over(&plan, child);
    assert_same(&plan.source_db, &plan.target_db);
}

#[test]
fn target_restart_during_apply() {
    let _servers = exclusive();
    let p = fpair();
    let (plan, mut child) = start_online("fault_tgt_restart");
    let gate = close_gate(&plan);
    big_transaction(&plan, 20000);
    gate.wait_blocked(&p.target, APPLY, TIMEOUT);
    assert_running(&mut child);
    // The restart ends the gate's session too, which opens it.
    p.target.pg_ctl(&["restart", "-m", "fast"]);
    drop(gate);
    p.source
        .psql(&plan.source_db, "DELETE FROM public.items WHERE id < 100");
    cut_over(&plan, child);
    assert_same(&plan.source_db, &plan.target_db);
}

/// Drops `slot` while a walsender streams it: terminate the walsender, drop as soon as it is
/// inactive (before the runner reconnects).
fn drop_slot_now(c: &Cluster, db: &str, slot: &str) {
    c.psql(
        db,
        &format!(
            "DO $$ BEGIN \
               PERFORM pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active_pid IS NOT NULL; \
               FOR i IN 1..500 LOOP \
                 IF NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}' AND active) THEN \
                   PERFORM pg_drop_replication_slot('{slot}'); RETURN; END IF; \
                 PERFORM pg_sleep(0.01); \
               END LOOP; RAISE EXCEPTION 'slot {slot} stayed active'; END $$"
        ),
    );
}

fn slot_of(c: &Cluster, db: &str) -> String {
    c.psql(
        db,
        "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()",
    )
}

#[test]
fn a_slot_dropped_behind_our_back_fails_clearly() {
    let _servers = shared();
    let p = fpair();
    let (plan, child) = start_online("fault_slot");
    let slot = slot_of(&p.source, &plan.source_db);
    assert!(!slot.is_empty());
    drop_slot_now(&p.source, &plan.source_db, &slot);
    cdc_fails_naming_the_missing(&plan, child, &slot);
    assert_ne!(stage_state(&plan, "cutover"), "done");
}

/// After the source lost `object` (a slot or publication) behind pgferry's back and a change came
/// in: the run fails, names the object, says how to recover, and cdc is failed.
fn cdc_fails_naming_the_missing(plan: &TestPlan, child: Child, object: &str) {
    fpair().source.psql(
        &plan.source_db,
        "INSERT INTO public.events VALUES (-1, 'after the drop')",
    );
    let out = wait_exit(child);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("[test] {err}");
    assert!(
        err.contains(object) && err.contains("does not exist"),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("dropped outside pgferry") && err.contains("pgferry reset"),
        "says how to recover: {}",
        show(&out)
    );
    assert_eq!(stage_state(plan, "cdc"), "failed");
}

#[test]
fn a_publication_dropped_behind_our_back_fails_clearly() {
    let _servers = shared();
    let p = fpair();
    let (plan, child) = start_online("fault_pub");
    let publication = p
        .source
        .psql(&plan.source_db, "SELECT pubname FROM pg_publication");
    assert!(!publication.is_empty());
    p.source.psql(
        &plan.source_db,
        &format!("DROP PUBLICATION \"{publication}\""),
    );
    cdc_fails_naming_the_missing(&plan, child, &publication);
}

/// A source transaction whose apply takes longer than the source's `wal_sender_timeout` (the test
/// holds it at a gate for 15 s, past the 12 s timeout): pgferry
/// keeps sending status updates while it applies, so the walsender never times out and nothing is
/// retried. (Before the fix the status update waited for a pause in the stream, which a large
/// transaction never has: "terminating walsender process due to replication timeout".)
#[test]
fn an_apply_longer_than_wal_sender_timeout_keeps_the_stream() {
    let _servers = shared();
    let p = fpair();
    let plan = prepare("fault_timeout", &online_stages());
    // Walsenders of this database time out after 12 s without a word from pgferry (status
    // updates go every 10 s).
    p.source.psql(
        "postgres",
        &format!(
            "ALTER DATABASE {} SET wal_sender_timeout = '12s'",
            plan.source_db
        ),
    );
    let mut child = plan.spawn(&["run"]);
    wait_for("cdc to be ready", TIMEOUT, || {
        assert_running(&mut child);
        stage_state(&plan, "cdc") == "ready"
    });
    // Stop the apply in the middle of a large transaction for longer than wal_sender_timeout,
    // whatever the apply's speed: a gate on the target's `public.events`, held for 15 s once the
    // apply is stopped at it.
    let gate = close_gate(&plan);
    let log_before = p.source.server_log().len();
    let started = std::time::Instant::now();
    big_transaction(&plan, 20000);
    gate.wait_blocked(&p.target, APPLY, TIMEOUT);
    std::thread::sleep(Duration::from_secs(15));
    assert_running(&mut child);
    gate.open();
    wait_for("the big transaction to be applied", TIMEOUT, || {
        assert_running(&mut child);
        caught_up(&plan)
    });
    let took = started.elapsed();
    eprintln!("[test] 22000 changes applied in {took:.1?}");
    Gate::uninstall(&p.target, &plan.target_db, "public.events");
    let log = p.source.server_log();
    let new_log = log.get(log_before..).unwrap_or(&log);
    assert!(
        !new_log.contains("replication timeout"),
        "the walsender timed out:\n{new_log}"
    );
    let out = cut_over(&plan, child);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("transient failure"),
        "{}",
        show(&out)
    );
    assert!(
        took > Duration::from_secs(12),
        "the apply took {took:?}, not longer than wal_sender_timeout: the test proves nothing"
    );
    assert_same(&plan.source_db, &plan.target_db);
}

/// A source with `wal_level = replica` and no replication slots or WAL senders at all: preflight
/// reports both (and the fix) before anything changes, and the run stops there.
#[test]
fn preflight_finds_wal_level_and_no_free_slots() {
    let _servers = shared();
    let p = fpair();
    let source = Cluster::start_with(
        "replica_only",
        "wal_level = replica\nmax_replication_slots = 0\nmax_wal_senders = 0",
        &[],
    );
    let s = source.fresh_database("pf_wal_src");
    source.psql(&s, "CREATE TABLE public.t (id int PRIMARY KEY)");
    let t = p.target.fresh_database("pf_wal_tgt");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("plan.toml");
    std::fs::write(
        &path,
        format!(
            "version = 1\nname = \"pf_wal\"\n\n\
             [source]\nurl = \"postgres://postgres@127.0.0.1:{sport}/{s}?sslmode=disable\"\npassword = \"{{{{ env.{var} }}}}\"\n\n\
             [target]\nurl = \"postgres://postgres@127.0.0.1:{tport}/{t}?sslmode=disable\"\npassword = \"{{{{ env.{var} }}}}\"\n\n\
             [[databases]]\nname = \"{s}\"\ntarget = \"{t}\"\n\n\
             [stages.pre]\nkind = \"preflight\"\n\n[stages.cdc]\nkind = \"cdc\"\nafter = [\"pre\"]\n",
            sport = source.port,
            tport = p.target.port,
            var = support::PASSWORD_VAR,
        ),
    )
    .expect("write plan");
    let plan = TestPlan {
        dir,
        path,
        name: "pf_wal".into(),
        source_db: s.clone(),
        target_db: t.clone(),
        bindir: None,
    };
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "source wal_level is `replica`; online migration needs `logical`",
        "ALTER SYSTEM SET wal_level = logical",
        "free replication slot(s) of 0",
        "raise max_replication_slots",
        "raise max_wal_senders",
    ] {
        assert!(err.contains(expected), "lacks `{expected}`: {}", show(&out));
    }
    // Nothing was created on the source.
    assert_eq!(source.psql(&s, "SELECT count(*) FROM pg_publication"), "0");
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pgferry.stages WHERE migration = 'pf_wal' AND stage = 'cdc' AND state <> 'pending'"
        ),
        "0"
    );
}
