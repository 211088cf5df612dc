//! Rehearsals against real clusters: `run --rehearsal` on an online plan with an application
//! writing all along (the source is never fenced; the target holds exactly the source's commits
//! before the simulated fence), `reset` tearing the target down while keeping the runs and reports,
//! a second rehearsal after it, a real run refused while a rehearsal is not reset, `plan` showing
//! estimates from the latest rehearsal report, and reset refusing a target database it did not
//! create (then `--keep-target`, and a real run allowed after the reset).

use std::time::{Duration, Instant};

use crate::support::{Cluster, TestPlan, Writer, WriterSpec, pair, row_digest, show};

/// Validation while cdc runs (`check`), then the cutover (manual approval, which a rehearsal does
/// not wait for), then a validation after it (`final`), which a rehearsal cannot do honestly.
const STAGES: &str = "[stages.schema]\nkind = \"schema_dump\"\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
    [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
    [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\nbatch_changes = 50\n\n\
    [stages.check]\nkind = \"validate\"\nafter = [\"cdc\"]\n\n\
    [stages.cutover]\nkind = \"cutover\"\nafter = [\"check\"]\napproval = \"manual\"\nmax_lag = \"1s\"\n\n\
    [stages.final]\nkind = \"validate\"\nafter = [\"cutover\"]\n";

const SETUP: &str = "\
    CREATE TABLE public.items (id int PRIMARY KEY, name text);\n\
    INSERT INTO public.items SELECT g, 'item ' || g FROM generate_series(1, 5000) g;\n\
    CREATE TABLE public.seq_log (n bigint PRIMARY KEY, at_lsn pg_lsn NOT NULL);\n\
    CREATE TABLE public.tick (id int PRIMARY KEY, v bigint NOT NULL);\n\
    INSERT INTO public.tick VALUES (1, 0);\n";

/// An application: transaction `n` inserts row `n` into seq_log (with the WAL insert position
/// during the insert, before its commit) and sets tick to `n`, one transaction after the other on
/// one session, so commit order is `n` order.
struct App {
    writer: Writer,
    /// The `n` before its first transaction.
    start: i64,
}

impl App {
    fn start(db: &str) -> App {
        let start: i64 = pair()
            .source
            .psql(db, "SELECT coalesce(max(n), 0) FROM public.seq_log")
            .parse()
            .expect("max n");
        let writer = Writer::start(
            WriterSpec {
                name: "the application",
                port: pair().source.port,
                db: db.to_string(),
                user: None,
                every: Duration::from_millis(3),
                fenced_by: &[],
            },
            move |i| {
                let n = start + i as i64;
                format!(
                    "BEGIN; INSERT INTO public.seq_log VALUES ({n}, pg_current_wal_insert_lsn()); \
                     UPDATE public.tick SET v = {n} WHERE id = 1; COMMIT"
                )
            },
        );
        App { writer, start }
    }

    /// The last `n` committed.
    fn written(&self) -> i64 {
        self.start + self.writer.transactions() as i64
    }

    /// Stops the application (its failure fails the test); returns the last `n` committed.
    fn stop(mut self) -> i64 {
        self.start + self.writer.stop() as i64
    }
}

fn store_sql(tdb: &str, sql: &str) -> String {
    pair().target.psql(tdb, sql)
}

/// The source database is writable for a new session, and carries no fence setting.
fn assert_not_fenced(source: &Cluster, db: &str) {
    assert_eq!(
        source.psql(db, "SHOW default_transaction_read_only"),
        "off",
        "a new session on the source is read-only after a rehearsal"
    );
    assert_eq!(
        source.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase \
                  WHERE d.datname = '{db}'"
            )
        ),
        "0",
        "the source database has per-database settings after a rehearsal"
    );
    source.psql(
        db,
        "CREATE TABLE public.probe (x int); DROP TABLE public.probe",
    );
}

/// Runs one rehearsal with the writer running before, during and after it, and checks what it
/// left: the target holds exactly the source's transactions before the simulated fence. Returns
/// the rehearsal's wall-clock time.
fn rehearse(plan: &TestPlan, s: &str, t: &str) -> Duration {
    let p = pair();
    let writer = App::start(s);
    let started = Instant::now();
    let out = plan.run(&["run", "--rehearsal"]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // The application keeps writing after the rehearsal, on the same session.
    let at_end = writer.written();
    let wait = Instant::now();
    while writer.written() < at_end + 20 && wait.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let total = writer.stop();
    assert!(
        total >= at_end + 20,
        "the writer stopped writing after the rehearsal ({at_end} then {total})"
    );
    assert_not_fenced(&p.source, s);

    // The cutover's record: a rehearsal, no fence, a simulated downtime, the drain position.
    let detail = store_sql(
        t,
        &format!(
            "SELECT value::text FROM pgferry.checkpoints WHERE migration = '{}' AND stage = 'cutover' AND key = 'database:{s}'",
            plan.name
        ),
    );
    let detail: serde_json::Value = serde_json::from_str(&detail).expect("cutover detail");
    assert_eq!(detail["rehearsal"], true, "{detail}");
    assert_eq!(detail["fenced"], false, "{detail}");
    assert!(detail.get("downtime_seconds").is_none(), "{detail}");
    let downtime = detail["simulated_downtime_seconds"]
        .as_f64()
        .expect("simulated_downtime_seconds");
    assert!(downtime > 0.0 && downtime < 60.0, "{detail}");
    let drain = detail["lsn"].as_str().expect("drain lsn").to_string();

    // The target holds exactly transactions 1..=k, and k is where the simulated fence was: row k
    // was inserted before the drain position, row k+2 began after row k+1 committed, and k+1 is
    // not on the target, so k+1 committed at or after the drain position.
    let k: i64 = store_sql(t, "SELECT coalesce(max(n), 0) FROM public.seq_log")
        .parse()
        .expect("k");
    assert_eq!(
        store_sql(t, "SELECT count(*) FROM public.seq_log"),
        k.to_string(),
        "the target's rows are not a prefix of the writer's transactions"
    );
    assert_eq!(
        store_sql(t, "SELECT v FROM public.tick WHERE id = 1"),
        k.to_string(),
        "the target's tick does not match its last row"
    );
    assert!(k > 0 && k < total, "k = {k}, total = {total}");
    assert_eq!(
        p.source.psql(
            s,
            &format!("SELECT at_lsn < '{drain}'::pg_lsn FROM public.seq_log WHERE n = {k}")
        ),
        "t",
        "row {k} on the target was inserted after the drain position {drain}"
    );
    if total >= k + 2 {
        assert_eq!(
            p.source.psql(
                s,
                &format!(
                    "SELECT at_lsn > '{drain}'::pg_lsn FROM public.seq_log WHERE n = {}",
                    k + 2
                )
            ),
            "t",
            "row {} was missing from the target though row {} began after it committed, before the drain position {drain}",
            k + 1,
            k + 2
        );
    }
    // The rows up to k are the same on both sides; the static table too.
    assert_eq!(
        p.source.psql(
            s,
            &format!("SELECT md5(string_agg(n || '/' || at_lsn, ',' ORDER BY n)) FROM public.seq_log WHERE n <= {k}")
        ),
        store_sql(
            t,
            "SELECT md5(string_agg(n || '/' || at_lsn, ',' ORDER BY n)) FROM public.seq_log"
        )
    );
    assert_eq!(
        row_digest(&p.source, s, "public.items"),
        row_digest(&p.target, t, "public.items")
    );

    // The validation while cdc ran compared every table; the one after the cutover was skipped
    // and says why.
    let check: serde_json::Value = serde_json::from_str(&store_sql(
        t,
        &format!(
            "SELECT detail::text FROM pgferry.stages WHERE migration = '{}' AND stage = 'check'",
            plan.name
        ),
    ))
    .expect("check detail");
    assert_eq!(check["tables"], 3, "{check}");
    assert_eq!(check["mismatches"], 0, "{check}");
    let fin: serde_json::Value = serde_json::from_str(&store_sql(
        t,
        &format!(
            "SELECT detail::text FROM pgferry.stages WHERE migration = '{}' AND stage = 'final'",
            plan.name
        ),
    ))
    .expect("final detail");
    assert_eq!(fin["skipped"], "rehearsal", "{fin}");
    // The manual approval was not waited for, and the log says so.
    let events = store_sql(
        t,
        &format!(
            "SELECT string_agg(message, E'\\n') FROM pgferry.events WHERE migration = '{}'",
            plan.name
        ),
    );
    assert!(
        events.contains("does not wait for `pgferry cutover`"),
        "{events}"
    );
    assert!(events.contains("simulated fence"), "{events}");
    eprintln!(
        "rehearsal: {took:.1?} wall clock, simulated downtime {downtime:.2}s, {k} of {total} writer transactions before the simulated fence"
    );
    took
}

/// A target database name that does not exist yet (pgferry creates it).
fn new_target_name(prefix: &str) -> String {
    let p = pair();
    let t = p.target.fresh_database(prefix);
    p.target.psql("postgres", &format!("DROP DATABASE \"{t}\""));
    t
}

#[test]
fn rehearsal_reset_and_rehearse_again() {
    let p = pair();
    let s = p.source.fresh_database("reh_src");
    let t = new_target_name("reh_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(p, "reh_main", &s, &t, STAGES);

    // No rehearsal yet: plan says so (and creates no store).
    let out = plan.run(&["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no rehearsal yet"),
        "{}",
        show(&out)
    );

    let first = rehearse(&plan, &s, &t);
    assert_eq!(
        store_sql(
            &t,
            "SELECT string_agg(mode, ',' ORDER BY id) FROM pgferry.runs WHERE migration = 'reh_main'"
        ),
        "rehearsal"
    );

    // `verify` cannot compare either, and says why.
    let out = plan.run(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot compare: the rehearsal's cutover"),
        "{}",
        show(&out)
    );

    // A real run now would take the rehearsal's stages for its own: refused, with the way out.
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds a rehearsal") && err.contains("pgferry reset"),
        "{}",
        show(&out)
    );
    assert_eq!(
        store_sql(
            &t,
            "SELECT count(*) FROM pgferry.runs WHERE migration = 'reh_main'"
        ),
        "1",
        "the refused run was recorded"
    );

    // What `pgferry report` stores for a rehearsal (the fields `plan` reads), read by `plan`.
    store_sql(
        &t,
        "INSERT INTO pgferry.reports (migration, run_id, mode, report) VALUES ('reh_main', 999999, 'rehearsal', \
         '{\"stages\": [{\"id\": \"load\", \"seconds\": 1.25, \"started_at\": 1000.0, \"ended_at\": 1001.25}, \
                        {\"id\": \"indexes\", \"seconds\": 1.5, \"started_at\": 1000.5, \"ended_at\": 1002.0}, \
                        {\"id\": \"cutover\", \"seconds\": 3.5, \"started_at\": 1002.0, \"ended_at\": 1005.5}, {\"id\": \"final\", \"seconds\": null}], \
           \"cutover\": [{\"stage\": \"cutover\", \"database\": \"x\", \"fenced\": false, \"simulated_downtime_seconds\": 0.75}]}')",
    );
    let out = plan.run(&["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |stage: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(stage) && l.contains('~'))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert!(
        text.contains("estimates from the latest rehearsal (run 999999"),
        "{}",
        show(&out)
    );
    assert_eq!(
        line("load").as_deref(),
        Some("load ~1.2s (+0.0s to +1.2s)"),
        "{}",
        show(&out)
    );
    // The index builds ran beside the load: the whole run is not the sum of the stages.
    assert_eq!(
        line("indexes").as_deref(),
        Some("indexes ~1.5s (+0.5s to +2.0s)"),
        "{}",
        show(&out)
    );
    assert_eq!(
        line("cutover").as_deref(),
        Some("cutover ~3.5s (+2.0s to +5.5s)"),
        "{}",
        show(&out)
    );
    assert!(
        text.contains("whole run  ~5.5s from the first stage's start to the last one's end (their durations add up to 6.2s: some ran beside others)"),
        "{}",
        show(&out)
    );
    assert!(
        text.contains("write downtime of the real run: ~0.8s"),
        "{}",
        show(&out)
    );

    // Reset: the slot, the publication and the target database go; runs and reports stay.
    let out = plan.run(&["reset", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("dropped target database {t}")),
        "{}",
        show(&out)
    );
    assert_eq!(
        p.source.psql(
            &s,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%reh_main%'"
        ),
        "0"
    );
    assert_eq!(
        p.source.psql(&s, "SELECT count(*) FROM pg_publication"),
        "0"
    );
    assert_eq!(
        store_sql(
            &t,
            "SELECT to_regclass('public.seq_log') IS NULL AND to_regclass('public.items') IS NULL"
        ),
        "t",
        "the target's tables survived the reset"
    );
    assert_eq!(
        store_sql(
            &t,
            "SELECT (SELECT count(*) FROM pgferry.runs WHERE migration = 'reh_main' AND mode = 'rehearsal') || '/' || \
                    (SELECT count(*) FROM pgferry.reports WHERE migration = 'reh_main' AND run_id = 999999) || '/' || \
                    (SELECT count(*) FROM pgferry.stages WHERE migration = 'reh_main') || '/' || \
                    (SELECT count(*) FROM pgferry.checkpoints WHERE migration = 'reh_main' AND stage <> '(store)')"
        ),
        "1/1/0/0",
        "runs and reports kept, stages and checkpoints gone"
    );
    assert_not_fenced(&p.source, &s);

    // A second rehearsal works again, to the same result; the run ids go on.
    let second = rehearse(&plan, &s, &t);
    assert_eq!(
        store_sql(
            &t,
            "SELECT string_agg(id::text || mode, ',' ORDER BY id) FROM pgferry.runs WHERE migration = 'reh_main'"
        )
        .matches("rehearsal")
        .count(),
        2
    );
    assert_eq!(
        store_sql(
            &t,
            "SELECT count(DISTINCT id) FROM pgferry.runs WHERE migration = 'reh_main'"
        ),
        "2"
    );
    eprintln!("first rehearsal {first:.1?}, second {second:.1?}");

    // `report` compares the two real rehearsals side by side (kept across the reset), with the
    // simulated downtime of each.
    store_sql(
        &t,
        "DELETE FROM pgferry.reports WHERE migration = 'reh_main' AND run_id = 999999",
    );
    let ids: Vec<String> = store_sql(
        &t,
        "SELECT run_id FROM pgferry.reports WHERE migration = 'reh_main' AND mode = 'rehearsal' ORDER BY run_id",
    )
    .lines()
    .map(str::to_string)
    .collect();
    assert!(ids.len() >= 2, "a report kept per rehearsal: {ids:?}");
    let out = plan.run(&["report"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("comparison of the last"), "{}", show(&out));
    for id in &ids[ids.len() - 2..] {
        assert!(
            text.contains(&format!("RUN {id} (rehearsal)")),
            "run {id} missing from the comparison: {}",
            show(&out)
        );
    }
    assert!(text.contains("simulated write downtime"), "{}", show(&out));
    // `plan` now estimates from the newest real rehearsal.
    let newest = ids.last().cloned().unwrap_or_default();
    let out = plan.run(&["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "estimates from the latest rehearsal (run {newest}"
        )),
        "{}",
        show(&out)
    );
    assert!(
        text.contains("write downtime of the real run: ~"),
        "{}",
        show(&out)
    );

    // Reset again, so the cluster is left clean.
    let out = plan.run(&["reset", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn reset_refuses_a_target_database_pgferry_did_not_create() {
    let p = pair();
    let s = p.source.fresh_database("reh_own_src");
    // The target database exists before the first run: pgferry did not create it.
    let t = p.target.fresh_database("reh_own_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(p, "reh_own", &s, &t, STAGES);
    let out = plan.run(&["run", "--rehearsal", "--until", "cdc"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let slot_count = || {
        p.source.psql(
            &s,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%reh_own%'",
        )
    };
    assert_eq!(slot_count(), "1");

    let out = plan.run(&["reset", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("no record of creating {t}")) && err.contains("--keep-target"),
        "{}",
        show(&out)
    );
    // Nothing changed: the slot, the target's tables and the checkpoints are all there.
    assert_eq!(slot_count(), "1");
    assert_eq!(store_sql(&t, "SELECT count(*) FROM public.items"), "5000");
    assert_ne!(
        store_sql(
            &t,
            "SELECT count(*) FROM pgferry.stages WHERE migration = 'reh_own'"
        ),
        "0"
    );

    // --keep-target: the source side and the checkpoints go, the target database stays.
    let out = plan.run(&["reset", "--yes", "--keep-target"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(slot_count(), "0");
    assert_eq!(store_sql(&t, "SELECT count(*) FROM public.items"), "5000");
    assert_eq!(
        store_sql(
            &t,
            "SELECT (SELECT count(*) FROM pgferry.stages WHERE migration = 'reh_own') || '/' || \
                    (SELECT count(*) FROM pgferry.runs WHERE migration = 'reh_own')"
        ),
        "0/1"
    );

    // After the reset a real run is no longer refused (here up to the load, into the kept target).
    let out = plan.run(&["run", "--until", "load"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        row_digest(&p.source, &s, "public.items"),
        row_digest(&p.target, &t, "public.items")
    );
    assert_eq!(
        store_sql(
            &t,
            "SELECT string_agg(mode, ',' ORDER BY id) FROM pgferry.runs WHERE migration = 'reh_own'"
        ),
        "rehearsal,run"
    );
    // ... and now a rehearsal is refused, since the store holds a real run's progress.
    let out = plan.run(&["run", "--rehearsal"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("progress of a real run"),
        "{}",
        show(&out)
    );
    let out = plan.run(&["reset", "--yes", "--keep-target"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

/// After a real cutover the target databases are the migrated ones: `reset` refuses to drop them
/// (changing nothing), and `--keep-target` drops only the source side and the checkpoints.
#[test]
fn reset_never_drops_a_target_that_went_through_a_real_cutover() {
    let p = pair();
    let s = p.source.fresh_database("reh_real_src");
    let t = new_target_name("reh_real_tgt");
    p.source.psql(&s, SETUP);
    let stages = "[stages.schema]\nkind = \"schema_dump\"\n\n\
        [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
        [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
        [stages.cdc]\nkind = \"cdc\"\nafter = [\"load\"]\n\n\
        [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\nquiet_for = \"0s\"\n";
    let plan = TestPlan::new(p, "reh_real", &s, &t, stages);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        row_digest(&p.source, &s, "public.items"),
        row_digest(&p.target, &t, "public.items")
    );
    let out = plan.run(&["reset", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("went through a real cutover") && err.contains("--keep-target"),
        "{}",
        show(&out)
    );
    // Nothing changed: the target and its data, the slot.
    assert_eq!(store_sql(&t, "SELECT count(*) FROM public.items"), "5000");
    let slots = || {
        p.source.psql(
            &s,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%reh_real%'",
        )
    };
    assert_eq!(slots(), "1");
    p.source.psql(
        "postgres",
        &format!("ALTER DATABASE \"{s}\" RESET default_transaction_read_only"),
    );
    let out = plan.run(&["reset", "--yes", "--keep-target"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(slots(), "0");
    assert_eq!(store_sql(&t, "SELECT count(*) FROM public.items"), "5000");
}
