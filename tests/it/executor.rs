//! The executor against real clusters: ordering and concurrency, resume after SIGKILL, refusal of a
//! changed configuration, the runner lock, retries of transient errors, failures with context, and a
//! clean stop on SIGTERM. Stages here are `preflight` and `sql`, which touch real databases.

use crate::support;

use std::time::Duration;

use crate::support::{Gate, TestPlan, pair, show, wait_for};
use pgferry::pg::lsn::Lsn;
use pgferry::state::StateStore;

/// Fresh source and target databases, with a `log` table on the target that stages write to.
fn setup(prefix: &str) -> (String, String) {
    let p = pair();
    let source = p.source.fresh_database(&format!("{prefix}_src"));
    let target = p.target.fresh_database(&format!("{prefix}_tgt"));
    p.source.psql(
        &source,
        "CREATE TABLE public.item (id int PRIMARY KEY, name text)",
    );
    p.target.psql(
        &target,
        "CREATE TABLE public.log (stage text NOT NULL, t0 timestamptz NOT NULL, t1 timestamptz)",
    );
    (source, target)
}

/// A `sql` stage that logs its start, sleeps, and logs its end, in one transaction.
fn timed_stage(id: &str, after: &[&str], sleep: &str) -> String {
    let after: Vec<String> = after.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[stages.{id}]\nkind = \"sql\"\non = \"target\"\nafter = [{}]\nsql = \"\"\"\nINSERT INTO public.log (stage, t0) VALUES ('{id}', clock_timestamp());\nSELECT pg_sleep({sleep});\nUPDATE public.log SET t1 = clock_timestamp() WHERE stage = '{id}' AND t1 IS NULL;\n\"\"\"\n\n",
        after.join(", ")
    )
}

/// A `sql` stage that logs its start, waits at the test's gate (`support::Gate`) until the test
/// opens it, and logs its end, in one transaction: the test decides how long it runs.
fn gated_stage(id: &str, after: &[&str]) -> String {
    let after: Vec<String> = after.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[stages.{id}]\nkind = \"sql\"\non = \"target\"\nafter = [{}]\nsql = \"\"\"\nINSERT INTO public.log (stage, t0) VALUES ('{id}', clock_timestamp());\nSELECT pg_advisory_xact_lock_shared({});\nUPDATE public.log SET t1 = clock_timestamp() WHERE stage = '{id}' AND t1 IS NULL;\n\"\"\"\n\n",
        after.join(", "),
        support::gate::KEY,
    )
}

/// A `sql` stage that logs its start, then waits (up to 60 s, else fails) until a session running
/// stage `other`'s statement is active beside it (or `other` committed, which it only does after
/// seeing this one), and logs its end: two of them prove that both stages ran at the same time,
/// however slow or fast the machine.
fn rendezvous_stage(id: &str, other: &str, after: &[&str]) -> String {
    let after: Vec<String> = after.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[stages.{id}]\nkind = \"sql\"\non = \"target\"\nafter = [{}]\nsql = \"\"\"\nINSERT INTO public.log (stage, t0) VALUES ('{id}', clock_timestamp());\n\
         DO $$ BEGIN /* rendezvous of {id} */ FOR i IN 1..6000 LOOP \
           IF EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname = current_database() \
                      AND state = 'active' AND query LIKE '%rendezvous of {other}%') \
              OR EXISTS (SELECT 1 FROM public.log WHERE stage = '{other}') THEN RETURN; END IF; \
           PERFORM pg_sleep(0.01); END LOOP; \
           RAISE EXCEPTION 'stage {id} never saw stage {other} running beside it: %', (SELECT string_agg(pid || ' ' || state || ': ' || left(query, 300), ' | ') FROM pg_stat_activity WHERE datname = current_database()); END $$;\n\
         UPDATE public.log SET t1 = clock_timestamp() WHERE stage = '{id}' AND t1 IS NULL;\n\"\"\"\n\n",
        after.join(", ")
    )
}

fn q(db: &str, sql: &str) -> String {
    pair().target.psql(db, sql)
}

fn stage_state(plan: &TestPlan, stage: &str) -> String {
    q(
        &plan.target_db,
        &format!(
            "SELECT coalesce((SELECT state FROM pgferry.stages WHERE migration = '{}' AND stage = '{stage}'), 'absent')",
            plan.name
        ),
    )
}

fn store_exists(plan: &TestPlan) -> bool {
    q(
        &plan.target_db,
        "SELECT to_regclass('pgferry.stages') IS NOT NULL",
    ) == "t"
}

#[test]
fn runs_in_dependency_order_with_independent_stages_at_once() {
    let (s, t) = setup("order");
    let stages = format!(
        "[stages.pre]\nkind = \"preflight\"\n\n{}{}{}",
        rendezvous_stage("a", "b", &["pre"]),
        rendezvous_stage("b", "a", &["pre"]),
        timed_stage("c", &["a", "b"], "0.1"),
    );
    let plan = TestPlan::new(pair(), "order", &s, &t, &stages);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    // a and b overlapped; c started after both ended.
    let overlap = q(
        &t,
        "SELECT a.t0 < b.t1 AND b.t0 < a.t1 FROM public.log a, public.log b WHERE a.stage = 'a' AND b.stage = 'b'",
    );
    assert_eq!(overlap, "t", "a and b should run at the same time");
    let c_after = q(
        &t,
        "SELECT c.t0 >= greatest(a.t1, b.t1) FROM public.log a, public.log b, public.log c \
         WHERE a.stage = 'a' AND b.stage = 'b' AND c.stage = 'c'",
    );
    assert_eq!(c_after, "t", "c must start after a and b end");
    for st in ["pre", "a", "b", "c"] {
        assert_eq!(stage_state(&plan, st), "done", "stage {st}");
    }
    // The preflight stage recorded its findings.
    let findings = q(
        &t,
        &format!(
            "SELECT detail ? 'findings' FROM pgferry.stages WHERE migration = '{}' AND stage = 'pre'",
            plan.name
        ),
    );
    assert_eq!(findings, "t");

    // A second run does nothing.
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to do"),
        "{}",
        show(&out)
    );
    assert_eq!(q(&t, "SELECT count(*) FROM public.log"), "3");
}

#[test]
fn sigkill_during_a_stage_then_resume_finishes_exactly_once() {
    let (s, t) = setup("kill");
    let stages = format!(
        "[stages.pre]\nkind = \"preflight\"\n\n{}{}",
        gated_stage("slow", &["pre"]),
        timed_stage("next", &["slow"], "0"),
    );
    let plan = TestPlan::new(pair(), "killed", &s, &t, &stages);
    let gate = Gate::close(&pair().target, &t);
    let mut child = plan.spawn(&["run"]);
    // Wait until the slow stage is inside its transaction, stopped at the gate.
    gate.wait_blocked(&pair().target, "pgferry%", Duration::from_secs(30));
    assert_eq!(stage_state(&plan, "slow"), "running");
    child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), None, "killed by a signal");

    // The store still says running; the killed transaction left nothing behind.
    assert_eq!(stage_state(&plan, "slow"), "running");
    assert_eq!(stage_state(&plan, "pre"), "done");
    wait_for(
        "the killed statement to be aborted",
        Duration::from_secs(10),
        || {
            q(
                &t,
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%pg_advisory_xact_lock_shared({})%' AND pid <> pg_backend_pid()",
                    support::gate::KEY
                ),
            ) == "0"
        },
    );
    assert_eq!(q(&t, "SELECT count(*) FROM public.log"), "0");
    gate.open();

    // The second run resumes: pre is skipped, slow and next run once.
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ran slow, next; already done: pre"),
        "{}",
        show(&out)
    );
    assert_eq!(
        q(
            &t,
            "SELECT string_agg(stage, ',' ORDER BY t0) FROM public.log"
        ),
        "slow,next"
    );
    assert_eq!(
        q(
            &t,
            &format!(
                "SELECT attempts FROM pgferry.stages WHERE migration = '{}' AND stage = 'slow'",
                plan.name
            )
        ),
        "2"
    );

    // A third run does nothing and exits 0.
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to do"),
        "{}",
        show(&out)
    );
    assert_eq!(q(&t, "SELECT count(*) FROM public.log"), "2");
    // Three runs recorded: the killed one never ended.
    assert_eq!(
        q(
            &t,
            &format!(
                "SELECT string_agg(coalesce(outcome, 'killed'), ',' ORDER BY id) FROM pgferry.runs WHERE migration = '{}'",
                plan.name
            )
        ),
        "killed,done,done"
    );
}

#[test]
fn a_changed_stage_is_refused_unless_rerun() {
    let (s, t) = setup("changed");
    let stage = |text: &str| {
        format!(
            "[stages.fill]\nkind = \"sql\"\non = \"target\"\nsql = \"INSERT INTO public.log (stage, t0) VALUES ('{text}', now())\"\n\n[stages.after]\nkind = \"sql\"\non = \"target\"\nafter = [\"fill\"]\nsql = \"INSERT INTO public.log (stage, t0) VALUES ('after', now())\"\n"
        )
    };
    let plan = TestPlan::new(pair(), "changed", &s, &t, &stage("one"));
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    plan.write(pair(), &stage("two"));
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the configuration of stage `fill` (done) changed since it ran"),
        "{}",
        show(&out)
    );
    assert!(err.contains("--rerun fill"), "{}", show(&out));
    assert_eq!(
        q(
            &t,
            "SELECT string_agg(stage, ',' ORDER BY stage) FROM public.log"
        ),
        "after,one"
    );

    // --rerun runs it and everything after it again.
    let out = plan.run(&["run", "--rerun", "fill"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        q(
            &t,
            "SELECT string_agg(stage, ',' ORDER BY stage) FROM public.log"
        ),
        "after,after,one,two"
    );
    // And the new configuration is now the recorded one.
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(q(&t, "SELECT count(*) FROM public.log"), "4");
}

#[test]
fn a_second_runner_is_refused_and_names_the_holder() {
    let (s, t) = setup("lock");
    let stages = gated_stage("slow", &[]);
    let plan = TestPlan::new(pair(), "locked", &s, &t, &stages);
    // The first runner's stage waits at the gate until the second runner has been refused.
    let gate = Gate::close(&pair().target, &t);
    let mut first = plan.spawn(&["run"]);
    gate.wait_blocked(&pair().target, "pgferry%", Duration::from_secs(30));
    assert!(store_exists(&plan));
    assert_eq!(stage_state(&plan, "slow"), "running");
    let before = q(
        &t,
        "SELECT state || attempts FROM pgferry.stages WHERE stage = 'slow'",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let pid = first.id();
    assert!(
        err.contains(&"migration `locked` is already being run by pgferry on host ".to_string())
            && err.contains(&format!("pid {pid}, since ")),
        "{}",
        show(&out)
    );
    // The refused runner changed nothing.
    assert_eq!(
        q(
            &t,
            "SELECT state || attempts FROM pgferry.stages WHERE stage = 'slow'"
        ),
        before
    );
    assert_eq!(
        q(
            &t,
            "SELECT count(*) FROM pgferry.runs WHERE migration = 'locked'"
        ),
        "1",
        "the refused run must not be recorded"
    );
    gate.open();
    let status = first.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        q(&t, "SELECT count(*) FROM public.log WHERE t1 IS NOT NULL"),
        "1"
    );
}

#[test]
fn transient_errors_are_retried() {
    let (s, t) = setup("retry");
    // Fails with serialization_failure (40001) on its first attempt: the sequence is not transactional.
    q(&t, "CREATE SEQUENCE public.tries");
    let stages = r#"[stages.flaky]
kind = "sql"
on = "target"
sql = """
DO $$ BEGIN
  IF nextval('public.tries') < 2 THEN
    RAISE EXCEPTION 'simulated conflict' USING ERRCODE = 'serialization_failure';
  END IF;
END $$;
INSERT INTO public.log (stage, t0) VALUES ('flaky', now());
"""
"#;
    let plan = TestPlan::new(pair(), "retry", &s, &t, stages);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(q(&t, "SELECT count(*) FROM public.log"), "1");
    assert_eq!(q(&t, "SELECT last_value FROM public.tries"), "2");
    let ev = q(
        &t,
        "SELECT count(*) FROM pgferry.events WHERE migration = 'retry' AND stage = 'flaky' AND message LIKE 'transient failure (attempt 1 of 4)%40001%'",
    );
    assert_eq!(ev, "1", "the retry is in the run log");
}

#[test]
fn a_failing_stage_says_where_and_blocks_its_dependents() {
    let (s, t) = setup("fail");
    let bad = "[stages.bad]\nkind = \"sql\"\non = \"target\"\nsql = \"INSERT INTO public.log (stage, t0) VALUES ('bad', now()); SELEC 1\"\n\n[stages.later]\nkind = \"sql\"\non = \"target\"\nafter = [\"bad\"]\nsql = \"INSERT INTO public.log (stage, t0) VALUES ('later', now())\"\n";
    let plan = TestPlan::new(pair(), "failing", &s, &t, bad);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("error: stage `bad`, target database `{t}`: running the stage's SQL: ERROR: syntax error at or near \"SELEC\" (SQLSTATE 42601)")),
        "{}",
        show(&out)
    );
    assert_eq!(stage_state(&plan, "bad"), "failed");
    assert_eq!(stage_state(&plan, "later"), "absent");
    assert_eq!(
        q(&t, "SELECT count(*) FROM public.log"),
        "0",
        "the failed transaction rolled back"
    );

    // status shows the failure.
    let st = plan.run(&["status", "--json"]);
    assert_eq!(st.status.code(), Some(0), "{}", show(&st));
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    assert_eq!(v["output"][0]["resultType"], "MigrationLevelOutput");
    assert_eq!(v["output"][0]["migrationState"], "FAILED");
    assert_eq!(v["output"][1]["databaseName"], s.as_str());
    let bad_row = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == "bad")
        .unwrap();
    assert_eq!(bad_row["state"], "failed");
    assert!(bad_row["error"].as_str().unwrap().contains("42601"));
    // The migration and its database are FAILED, no runner works on it, the failed stage is named
    // with its error, and the next step says what to do.
    let path = plan.path.display().to_string();
    assert_eq!(v["output"][0]["state"], "FAILED");
    assert_eq!(v["output"][0]["runner"], serde_json::Value::Null);
    assert_eq!(v["output"][1]["migrationState"], "FAILED");
    assert_eq!(
        v["output"][0]["nextStep"],
        format!(
            "stage `bad` failed; fix the cause of its error (shown with it under `failed`), or the plan, then `pgferry run {path}` resumes from the checkpoints"
        )
    );
    let failed = v["output"][0]["failedStages"]
        .as_array()
        .expect("failedStages");
    assert_eq!(failed.len(), 1, "{v:#}");
    assert_eq!(failed[0]["stage"], "bad");
    assert_eq!(failed[0]["kind"], "sql");
    assert_eq!(failed[0]["attempts"], 1);
    assert_eq!(failed[0]["error"], bad_row["error"]);
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("syntax error at or near \"SELEC\" (SQLSTATE 42601)")),
        "{v:#}"
    );
    let later_row = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == "later")
        .unwrap();
    assert_eq!(later_row["state"], "pending");
    // The text view says the same.
    let st = plan.run(&["status"]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("state:     FAILED / FAILED"), "{text}");
    assert!(text.contains("next:      stage `bad` failed;"), "{text}");
    assert!(
        text.contains("failed:    `bad`: ") && text.contains("(SQLSTATE 42601)"),
        "{text}"
    );

    // Fixing the SQL of a failed stage lets it start over without --rerun.
    let good = bad.replace("; SELEC 1", "");
    plan.write(pair(), &good);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        q(
            &t,
            "SELECT string_agg(stage, ',' ORDER BY t0, stage) FROM public.log"
        ),
        "bad,later"
    );
    let st = plan.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    assert_eq!(v["output"][0]["migrationState"], "COMPLETED");
    assert_eq!(v["output"][0]["state"], "SUCCEEDED");
}

#[test]
fn sigterm_stops_at_the_next_checkpoint_and_the_next_run_resumes() {
    let (s, t) = setup("term");
    let stages = "[stages.pre]\nkind = \"preflight\"\n\n[stages.wait]\nkind = \"sql\"\non = \"target\"\nafter = [\"pre\"]\nsql = \"SELECT pg_sleep({{ vars.sleep }}); INSERT INTO public.log (stage, t0) VALUES ('wait', now())\"\n";
    let plan = TestPlan::new(pair(), "term", &s, &t, stages);
    let child = plan.spawn(&["run", "--var", "sleep=60"]);
    wait_for("the stage to start", Duration::from_secs(30), || {
        store_exists(&plan)
            && stage_state(&plan, "wait") == "running"
            && q(
                &t,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()",
            ) == "1"
    });
    let started = std::time::Instant::now();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped promptly"
    );
    assert_eq!(out.status.code(), Some(130), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run the same command again to resume"),
        "{}",
        show(&out)
    );
    assert_eq!(stage_state(&plan, "wait"), "pending");
    // The statement was cancelled on the server, not left running.
    wait_for(
        "the statement to be cancelled",
        Duration::from_secs(5),
        || {
            q(
                &t,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()",
            ) == "0"
        },
    );
    assert_eq!(q(&t, "SELECT count(*) FROM public.log"), "0");
    assert_eq!(
        q(
            &t,
            "SELECT outcome FROM pgferry.runs WHERE migration = 'term' ORDER BY id DESC LIMIT 1"
        ),
        "interrupted"
    );
    // status: STOPPED (no runner), the migration where it stopped, and how to resume.
    let st = plan.run(&["status", "--json", "--var", "sleep=0"]);
    assert_eq!(st.status.code(), Some(0), "{}", show(&st));
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    let path = plan.path.display().to_string();
    assert_eq!(v["output"][0]["state"], "STOPPED", "{v:#}");
    assert_eq!(v["output"][0]["migrationState"], "PENDING", "{v:#}");
    assert_eq!(v["output"][0]["runner"], serde_json::Value::Null);
    assert_eq!(
        v["output"][0]["failedStages"],
        serde_json::json!([]),
        "{v:#}"
    );
    assert_eq!(
        v["output"][0]["nextStep"],
        format!(
            "no runner works on it (the last run was interrupted (SIGTERM or Ctrl-C)); `pgferry run {path}` resumes it from its checkpoints"
        )
    );
    assert_eq!(v["lastRun"]["outcome"], "interrupted", "{v:#}");
    let rows = v["stages"].as_array().expect("stages");
    assert_eq!(rows[0]["stage"], "pre");
    assert_eq!(rows[0]["state"], "done");
    assert_eq!(rows[1]["stage"], "wait");
    assert_eq!(rows[1]["state"], "pending");

    let out = plan.run(&["run", "--var", "sleep=0"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ran wait; already done: pre"),
        "{}",
        show(&out)
    );
    assert_eq!(q(&t, "SELECT count(*) FROM public.log"), "1");
}

#[test]
fn until_runs_a_stage_and_what_it_needs_only() {
    let (s, t) = setup("until");
    let stages = format!(
        "[stages.pre]\nkind = \"preflight\"\n\n{}{}{}",
        timed_stage("a", &["pre"], "0"),
        timed_stage("b", &["pre"], "0"),
        timed_stage("c", &["a"], "0"),
    );
    let plan = TestPlan::new(pair(), "until", &s, &t, &stages);
    let out = plan.run(&["run", "--until", "a"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        q(
            &t,
            "SELECT string_agg(stage, ',' ORDER BY stage) FROM public.log"
        ),
        "a"
    );
    assert_eq!(stage_state(&plan, "b"), "absent");
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        q(
            &t,
            "SELECT string_agg(stage, ',' ORDER BY stage) FROM public.log"
        ),
        "a,b,c"
    );
}

#[test]
fn the_store_database_is_created_and_positions_only_move_forward() {
    let p = pair();
    let s = p.source.fresh_database("store_src");
    // A target database that does not exist yet: the first run creates it for the store.
    let t = format!("{s}_new_target");
    let stages = "[stages.pre]\nkind = \"preflight\"\n";
    let plan = TestPlan::new(p, "store", &s, &t, stages);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        q(&t, "SELECT max(version) FROM pgferry.schema_version"),
        "2"
    );
    assert_eq!(stage_state(&plan, "pre"), "done");
    // Positions only move forward, through the store's own API.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let endpoint = pgferry::plan::Endpoint {
            url: p.target.url(&t),
            password: Some(pgferry::secret::Secret::new(support::PASSWORD)),
        };
        let conn = pgferry::pg::connect::ConnInfo::new(&endpoint, None).expect("conn info");
        let store = pgferry::state::postgres::PgStore::open(conn, "pgferry", "store")
            .await
            .expect("open store")
            .expect("the store exists");
        let lsn = |s: &str| s.parse::<Lsn>().unwrap();
        assert_eq!(
            store
                .advance_position("applied", lsn("0/10"))
                .await
                .unwrap(),
            lsn("0/10")
        );
        assert_eq!(
            store.advance_position("applied", lsn("0/5")).await.unwrap(),
            lsn("0/10")
        );
        assert_eq!(
            store.advance_position("applied", lsn("1/0")).await.unwrap(),
            lsn("1/0")
        );
        assert_eq!(store.position("applied").await.unwrap(), Some(lsn("1/0")));
        assert_eq!(store.position("other").await.unwrap(), None);
        // Artifacts and counters round-trip.
        store
            .put_artifact("pre-data.sql", b"CREATE TABLE x ();")
            .await
            .unwrap();
        assert_eq!(
            store.artifact("pre-data.sql").await.unwrap().as_deref(),
            Some(&b"CREATE TABLE x ();"[..])
        );
        assert_eq!(store.add_counter("db", "rows", 5).await.unwrap(), 5);
        assert_eq!(store.add_counter("db", "rows", 7).await.unwrap(), 12);
    });
    // The store's schema grants nothing to PUBLIC.
    assert_eq!(
        q(
            &t,
            "SELECT has_schema_privilege('public', 'pgferry', 'USAGE')"
        ),
        "f"
    );
}

/// A full_load that fails for real (the target has no table to load into): status says FAILED for
/// the migration and its database, names the stage with its error, and says how to go on; once the
/// cause is fixed, the same command resumes and the migration is COMPLETED.
#[test]
fn a_failing_full_load_shows_failed_and_the_next_run_completes() {
    let (s, t) = setup("failload");
    pair().source.psql(
        &s,
        "INSERT INTO public.item SELECT g, 'item ' || g FROM generate_series(1, 50) g",
    );
    let stages = "[stages.pre]\nkind = \"preflight\"\n\n[stages.load]\nkind = \"full_load\"\nafter = [\"pre\"]\n";
    let plan = TestPlan::new(pair(), "failload", &s, &t, stages);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(stage_state(&plan, "pre"), "done");
    assert_eq!(stage_state(&plan, "load"), "failed");

    let st = plan.run(&["status", "--json"]);
    assert_eq!(st.status.code(), Some(0), "{}", show(&st));
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    let path = plan.path.display().to_string();
    assert_eq!(v["output"][0]["state"], "FAILED", "{v:#}");
    assert_eq!(v["output"][0]["migrationState"], "FAILED", "{v:#}");
    assert_eq!(v["output"][1]["databaseName"], s.as_str());
    assert_eq!(v["output"][1]["migrationState"], "FAILED", "{v:#}");
    assert_eq!(
        v["output"][0]["nextStep"],
        format!(
            "stage `load` failed; fix the cause of its error (shown with it under `failed`), or the plan, then `pgferry run {path}` resumes from the checkpoints"
        )
    );
    let failed = v["output"][0]["failedStages"]
        .as_array()
        .expect("failedStages");
    assert_eq!(failed.len(), 1, "{v:#}");
    assert_eq!(failed[0]["stage"], "load");
    assert_eq!(failed[0]["kind"], "full_load");
    let error = failed[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("item"), "the error names the table: {error}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(error.lines().next().unwrap_or("?")),
        "status shows the error the run printed:\n{error}\n{}",
        show(&out)
    );

    // Fixed (the table exists on the target): the next run resumes and completes.
    pair().target.psql(
        &t,
        "CREATE TABLE public.item (id int PRIMARY KEY, name text)",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let st = plan.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    assert_eq!(v["output"][0]["state"], "SUCCEEDED", "{v:#}");
    assert_eq!(v["output"][0]["migrationState"], "COMPLETED", "{v:#}");
    assert_eq!(v["output"][0]["failedStages"], serde_json::json!([]));
    assert_eq!(v["output"][0]["nextStep"], serde_json::Value::Null);
    assert_eq!(
        q(&t, "SELECT count(*) || ' ' || sum(id) FROM public.item"),
        "50 1275"
    );
    assert_eq!(
        support::row_digest(&pair().target, &t, "public.item"),
        support::row_digest(&pair().source, &s, "public.item")
    );
}
