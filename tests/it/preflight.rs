//! Preflight and the dry run against real clusters: every finding reported at once, with the fix;
//! nothing changed anywhere by `pgferry plan`.

use crate::support;

use crate::support::{PASSWORD, TestPlan, pair, show};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn findings(plan: &TestPlan) -> serde_json::Value {
    let text = pair().target.psql(
        &plan.target_db,
        &format!("SELECT detail->'findings' FROM pgferry.stages WHERE migration = '{}' AND stage = 'pre'", plan.name),
    );
    serde_json::from_str(&text).expect("findings JSON")
}

fn checks(f: &serde_json::Value, level: &str) -> Vec<String> {
    let mut v: Vec<String> = f
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["level"] == level)
        .map(|x| x["check"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

const ONLINE_STAGES: &str =
    "[stages.pre]\nkind = \"preflight\"\n\n[stages.cdc]\nkind = \"cdc\"\nafter = [\"pre\"]\n";

#[test]
fn online_preflight_reports_every_problem_at_once() {
    let p = pair();
    let s = p.source.fresh_database("pf_online_src");
    let t = p.target.fresh_database("pf_online_tgt");
    p.source.psql(
        &s,
        "CREATE TABLE public.film (id int PRIMARY KEY, title text);
         CREATE TABLE public.nokey (a int, b text);
         CREATE UNLOGGED TABLE public.scratch (id int PRIMARY KEY);
         SELECT lo_from_bytea(0, 'hello');",
    );
    let plan = TestPlan::new(p, "pf_online", &s, &t, ONLINE_STAGES);
    // Select with a pattern that matches nothing, too.
    let text = std::fs::read_to_string(&plan.path).unwrap().replace(
        &format!("target = \"{t}\"\n"),
        &format!("target = \"{t}\"\ntables = [\"public.*\", \"public.nosuch_*\"]\n"),
    );
    std::fs::write(&plan.path, text).unwrap();

    let out = plan.run(&["run", "--until", "pre"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("stage `pre`: 2 error(s), 2 warning(s):"),
        "{}",
        show(&out)
    );
    assert!(
        err.contains(&format!("error: [{s}] the pattern `public.nosuch_*` in `tables` matches no table of source database {s}")),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("1 table(s) have no primary key or replica identity, so UPDATE and DELETE cannot be replicated (and would fail on the source once published): public.nokey"),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("fix: add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL"),
        "{}",
        show(&out)
    );
    let f = findings(&plan);
    assert_eq!(checks(&f, "error"), vec!["replica_identity", "selection"]);
    assert_eq!(
        checks(&f, "warning"),
        vec!["large_objects", "unlogged_tables"]
    );
    assert!(checks(&f, "info").contains(&"versions".to_string()));
    let unlogged = f
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["check"] == "unlogged_tables")
        .unwrap();
    assert_eq!(unlogged["message"], "1 unlogged table(s): public.scratch");

    // Fix both errors: the stage passes (its configuration changed after a failure, so it starts over).
    p.source
        .psql(&s, "ALTER TABLE public.nokey REPLICA IDENTITY FULL");
    let text = std::fs::read_to_string(&plan.path)
        .unwrap()
        .replace(", \"public.nosuch_*\"", "");
    std::fs::write(&plan.path, text).unwrap();
    let out = plan.run(&["run", "--until", "pre"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let f = findings(&plan);
    assert!(checks(&f, "error").is_empty(), "{f}");
}

#[test]
fn offline_plans_skip_the_online_checks() {
    let p = pair();
    let s = p.source.fresh_database("pf_offline_src");
    let t = p.target.fresh_database("pf_offline_tgt");
    p.source.psql(
        &s,
        "CREATE TABLE public.nokey (a int); CREATE UNLOGGED TABLE public.u (a int)",
    );
    let plan = TestPlan::new(
        p,
        "pf_offline",
        &s,
        &t,
        "[stages.pre]\nkind = \"preflight\"\n",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let f = findings(&plan);
    assert!(checks(&f, "error").is_empty(), "{f}");
    assert!(checks(&f, "warning").is_empty(), "{f}");
    assert!(
        checks(&f, "info").contains(&"unlogged_tables".to_string()),
        "{f}"
    );
}

#[test]
fn missing_privileges_are_found_with_the_fix() {
    let p = pair();
    let s = p.source.fresh_database("pf_priv_src");
    let t = p.target.fresh_database("pf_priv_tgt");
    let role = format!("{s}_ro");
    p.source.psql(
        &s,
        &format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}';
             CREATE TABLE public.open (id int PRIMARY KEY);
             CREATE TABLE public.secret (id int PRIMARY KEY);
             GRANT SELECT ON public.open TO {role};"
        ),
    );
    let plan = TestPlan::new(p, "pf_priv", &s, &t, ONLINE_STAGES);
    let text = std::fs::read_to_string(&plan.path).unwrap().replacen(
        "postgres://postgres@",
        &format!("postgres://{role}@"),
        1,
    );
    std::fs::write(&plan.path, text).unwrap();
    let out = plan.run(&["run", "--until", "pre"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "role {role} cannot read 1 selected table(s): public.secret"
        )),
        "{}",
        show(&out)
    );
    assert!(
        err.contains(&format!("source role {role} may not replicate")),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("fix: ALTER ROLE ... REPLICATION"),
        "{}",
        show(&out)
    );
    // Owning neither table nor allowed to create in the database, it could not publish them.
    assert!(
        err.contains(&format!(
            "source role {role} does not own 2 selected table(s)"
        )),
        "{}",
        show(&out)
    );
    assert_eq!(
        checks(&findings(&plan), "error"),
        vec![
            "privileges",
            "replication_privilege",
            "source_ownership",
            "source_publication"
        ]
    );
}

#[test]
fn unreachable_servers_and_wrong_passwords_are_findings_not_crashes() {
    let p = pair();
    let s = p.source.fresh_database("pf_reach_src");
    let t = p.target.fresh_database("pf_reach_tgt");
    let plan = TestPlan::new(
        p,
        "pf_reach",
        &s,
        &t,
        "[stages.pre]\nkind = \"preflight\"\n",
    );
    // The source on a closed port; the target password wrong.
    let text = std::fs::read_to_string(&plan.path).unwrap().replacen(
        &format!("127.0.0.1:{}", p.source.port),
        "127.0.0.1:1",
        1,
    );
    std::fs::write(&plan.path, text).unwrap();
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "cannot connect to the source postgres@127.0.0.1:1/{s}"
        )),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("fix: check that the server is running and reachable from here"),
        "{}",
        show(&out)
    );

    // A wrong target password: the store cannot even be opened; the message says what to check.
    let out = plan
        .command(&["run"])
        .env(support::PASSWORD_VAR, "not-the-password")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains("password authentication failed for user \"postgres\" (SQLSTATE 28P01)"),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("hint: check the user and password"),
        "{}",
        show(&out)
    );
    assert!(
        !err.contains("not-the-password"),
        "the password must never be printed"
    );
    assert!(!err.contains(PASSWORD));
}

#[test]
fn plan_is_a_dry_run_that_changes_nothing() {
    let p = pair();
    let s = p.source.fresh_database("pf_plan_src");
    let t = format!("{s}_absent_target");
    p.source.psql(
        &s,
        "CREATE TABLE public.big (id int PRIMARY KEY, pad text);
         INSERT INTO public.big SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g;
         CREATE TABLE public.small (id int PRIMARY KEY);
         CREATE TABLE public.audit_log (id int PRIMARY KEY);
         CREATE TABLE public.parts (id int, k int) PARTITION BY RANGE (k);
         CREATE TABLE public.parts_a PARTITION OF public.parts FOR VALUES FROM (0) TO (10);
         CREATE TABLE public.parts_b PARTITION OF public.parts FOR VALUES FROM (10) TO (20);
         INSERT INTO public.parts SELECT g, g % 20 FROM generate_series(1, 1000) g;
         ANALYZE;",
    );
    let stages = "[stages.pre]\nkind = \"preflight\"\n\n[stages.load]\nkind = \"full_load\"\nafter = [\"pre\"]\n\n[stages.stats]\nkind = \"sql\"\non = \"target\"\nafter = [\"load\"]\nsql = \"ANALYZE\"\n";
    let plan = TestPlan::new(p, "pf_plan", &s, &t, stages);
    let text = std::fs::read_to_string(&plan.path).unwrap().replace(
        &format!("target = \"{t}\"\n"),
        &format!("target = \"{t}\"\nexclude = [\"public.audit_*\"]\n"),
    );
    std::fs::write(&plan.path, text).unwrap();
    // This database's slots only: tests of other modules share the cluster.
    let slots = format!("SELECT count(*) FROM pg_replication_slots WHERE database = '{s}'");
    let before_slots = p.source.psql("postgres", &slots);

    let out = plan.run(&["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("  1. pre (preflight) [pending]\n"),
        "{}",
        show(&out)
    );
    assert!(
        stdout.contains("  2. load (full_load) [pending] after pre\n"),
        "{}",
        show(&out)
    );
    assert!(stdout.contains(&format!("  3. stats (sql) [pending] after load\n       on target database {t}, in one transaction: ANALYZE\n")), "{}", show(&out));
    assert!(
        // The partitioned table's own estimate (its partitions' sum) is not counted twice.
        stdout.contains("  5 table(s) selected, ~6000 rows"),
        "{}",
        show(&out)
    );
    assert!(
        stdout.contains("    public.big      ~      5000 rows"),
        "{}",
        show(&out)
    );
    assert!(
        !stdout.contains("audit_log"),
        "excluded tables are not listed"
    );
    assert!(
        stdout.contains(&format!(
            "info: [{s}] target database {t} does not exist; provision will create it"
        )),
        "{}",
        show(&out)
    );

    // Nothing was created: no target database, no store, no slot.
    assert_eq!(
        p.target.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{t}'")
        ),
        "0"
    );
    assert_eq!(
        p.source.psql(
            &s,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"
        ),
        "0"
    );
    assert_eq!(p.source.psql("postgres", &slots), before_slots);
}
