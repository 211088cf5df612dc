//! Schema changes during cdc (`ddl = "replicate"` on the cdc stage): an application migration
//! interleaved with a writer is replayed on the target at its place in the stream, and after the
//! cutover the target equals the source (rows, sequences and `pg_dump --schema-only`); a kill in
//! the middle of a transaction holding DDL applies it exactly once; a statement that cannot be
//! replayed stops cdc with the commands that resolve it, and cdc resumes after the operator's fix.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::compare::{assert_same, assert_same_rows};
use crate::support::{
    Cluster, Gate, PASSWORD, TestPlan, pair, row_digest, show, wait_for, wait_for_exit,
};

const SETUP: &str = "\
    CREATE TYPE public.mood AS ENUM ('calm', 'busy');\n\
    CREATE TABLE public.accounts (id int PRIMARY KEY, name text NOT NULL, balance int NOT NULL DEFAULT 0, mood public.mood, legacy text);\n\
    CREATE TABLE public.events (id bigserial PRIMARY KEY, account int NOT NULL, note text);\n\
    CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.note := coalesce(NEW.note, '') || ' v1'; RETURN NEW; END $$;\n\
    CREATE TRIGGER events_stamp BEFORE INSERT ON public.events FOR EACH ROW EXECUTE FUNCTION public.stamp();\n\
    INSERT INTO public.accounts SELECT g, 'acct ' || g, g, 'calm', 'old' FROM generate_series(1, 200) g;\n\
    INSERT INTO public.events (account, note) SELECT g % 200 + 1, 'e' FROM generate_series(1, 500) g;\n\
    CREATE TABLE public.orders (id bigserial, at date NOT NULL, qty int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);\n\
    CREATE TABLE public.orders_2026 PARTITION OF public.orders FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');\n\
    INSERT INTO public.orders (at, qty) SELECT date '2026-01-01' + g, g FROM generate_series(1, 100) g;\n";

fn stages(cdc_extra: &str, rest: &str) -> String {
    format!(
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\nddl = \"replicate\"\n{cdc_extra}\n{rest}"
    )
}

/// A migration of [`SETUP`] whose cdc (`ddl = "replicate"`) has caught up once and stopped, so what
/// the source runs next is a backlog at the next `run`: (clusters, source db, target db, plan).
fn caught_up(name: &str) -> (&'static crate::support::Pair, String, String, TestPlan) {
    let p = pair();
    let s = p.source.fresh_database(&format!("{name}_src"));
    let t = p.target.fresh_database(&format!("{name}_tgt"));
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(p, name, &s, &t, &stages("", ""));
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    (p, s, t, plan)
}

/// Runs SQL the way a migration tool does: one statement at a time (`psql -f`).
fn migrate(c: &Cluster, db: &str, sql: &str) {
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(file.path(), sql).expect("writing the migration");
    c.psql_file(db, file.path());
}

fn capture_installed(c: &Cluster, db: &str) -> bool {
    c.psql(
        db,
        "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgferry_ddl_%'",
    ) != "0"
}

/// The application keeps writing while the migration runs.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(db: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicUsize::new(0));
        let (s, w, db) = (stop.clone(), writes.clone(), db.to_string());
        let thread = std::thread::spawn(move || {
            let p = pair();
            let mut i = 0usize;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                p.source.psql(
                    &db,
                    &format!(
                        "INSERT INTO public.events (account, note) VALUES ({a}, 'w{i}'); \
                         UPDATE public.accounts SET balance = balance + 1 WHERE id = {a}",
                        a = i % 200 + 1
                    ),
                );
                w.fetch_add(1, Ordering::SeqCst);
            }
        });
        Writer {
            stop,
            writes,
            thread: Some(thread),
        }
    }

    fn wait_writes(&self, n: usize) {
        let start = self.writes.load(Ordering::SeqCst);
        wait_for("the writer", Duration::from_secs(30), || {
            self.writes.load(Ordering::SeqCst) >= start + n
        });
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the writer");
        }
        self.writes.load(Ordering::SeqCst)
    }
}

#[test]
fn an_application_migration_during_cdc_is_replayed_and_the_cutover_is_exact() {
    let p = pair();
    let s = p.source.fresh_database("ddl_app_src");
    let t = p.target.fresh_database("ddl_app_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(
        p,
        "ddl_app",
        &s,
        &t,
        &stages(
            "",
            "[stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\n\n\
             [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
             [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"sequences\"]\n",
        ),
    );
    let mut child = plan.spawn(&["run"]);
    plan.wait_until_cdc_ready(p, &mut child);
    assert!(
        capture_installed(&p.source, &s),
        "provision installs the capture"
    );

    let owner = format!("{s}_owner");
    for c in [&p.source, &p.target] {
        c.psql("postgres", &format!("CREATE ROLE {owner}"));
    }
    // (Captured too: the GRANT reaches the target through cdc.)
    p.source
        .psql(&s, &format!("GRANT CREATE ON SCHEMA public TO {owner}"));

    let writer = Writer::start(&s);
    let steps = [
        // A volatile default: the source computes a value per row, which the stream does not carry.
        "ALTER TABLE public.accounts ADD COLUMN opened_at timestamptz NOT NULL DEFAULT clock_timestamp();",
        "ALTER TABLE public.accounts RENAME COLUMN name TO title;",
        "ALTER TABLE public.accounts ALTER COLUMN balance TYPE bigint;\n\
         UPDATE public.accounts SET balance = balance + 3000000000 WHERE id = 1;",
        "ALTER TYPE public.mood ADD VALUE 'ecstatic';\n\
         UPDATE public.accounts SET mood = 'ecstatic' WHERE id <= 10;",
        "CREATE TABLE public.audit (id bigserial PRIMARY KEY, account int, what text, at timestamptz NOT NULL DEFAULT now());\n\
         INSERT INTO public.audit (account, what) SELECT g, 'opened' FROM generate_series(1, 50) g;",
        "CREATE INDEX CONCURRENTLY accounts_opened_idx ON public.accounts (opened_at);",
        "ALTER TABLE public.accounts DROP COLUMN legacy;",
        // An identity added to a table with rows: numbered by the rewrite, in each server's order.
        "ALTER TABLE public.accounts ADD COLUMN seq_no bigint GENERATED ALWAYS AS IDENTITY;",
        // A new table without a key: published, its UPDATEs and DELETEs still work on the source.
        "CREATE TABLE public.notes (k int, v text);\n\
         INSERT INTO public.notes SELECT g, 'note ' || g FROM generate_series(1, 20) g;\n\
         UPDATE public.notes SET v = 'edited' WHERE k <= 3;\n\
         DELETE FROM public.notes WHERE k = 20;",
        // A new partition of a selected partitioned table (its name matches nothing by itself).
        "CREATE TABLE public.orders_2027 PARTITION OF public.orders FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');\n\
         INSERT INTO public.orders (at, qty) SELECT date '2027-01-01' + g, g FROM generate_series(1, 50) g;",
        "CREATE OR REPLACE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.note := coalesce(NEW.note, '') || ' v2'; RETURN NEW; END $$;\n\
         DROP TRIGGER events_stamp ON public.events;\n\
         CREATE TRIGGER events_stamp BEFORE INSERT OR UPDATE ON public.events FOR EACH ROW EXECUTE FUNCTION public.stamp();",
        // DDL and data changes in one transaction.
        "BEGIN;\n\
         ALTER TABLE public.events ADD COLUMN origin text DEFAULT 'app';\n\
         INSERT INTO public.events (account, note, origin) VALUES (1, 'with origin', 'migration');\n\
         COMMIT;",
    ];
    for step in steps {
        writer.wait_writes(3);
        migrate(&p.source, &s, step);
    }
    // DDL run by the application's own role: the target's new table has the same owner (the
    // schema dumps below compare the owners).
    writer.wait_writes(3);
    migrate(
        &p.source,
        &s,
        &format!(
            "SET ROLE {owner};\n\
             CREATE TABLE public.owned (id int PRIMARY KEY, v text);\n\
             INSERT INTO public.owned VALUES (1, 'mine');\n\
             RESET ROLE;"
        ),
    );
    writer.wait_writes(3);
    let writes = writer.stop();
    assert!(
        writes > 20,
        "the writer wrote during the migration ({writes})"
    );
    p.source.psql(
        &s,
        "INSERT INTO public.audit (account, what) VALUES (1, 'last')",
    );

    let out = plan.run(&["cutover"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = wait_for_exit(child, "the run to finish", Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        !capture_installed(&p.source, &s),
        "cleanup removes the capture"
    );
    assert_eq!(
        p.source.psql(
            &s,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry_capture'"
        ),
        "0"
    );
    assert_eq!(
        p.source.psql(
            &s,
            "SELECT relreplident FROM pg_class WHERE oid = 'public.notes'::regclass"
        ),
        "d",
        "cleanup put back the keyless table's replica identity"
    );
    // Rows (the source's values of the volatile default too), sequences and the schema dump.
    assert_same(&s, &t);
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT tableowner FROM pg_tables WHERE tablename = 'owned'"
        ),
        owner
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'public.accounts_opened_idx'::regclass"
        ),
        "t"
    );
    // The record on the target: every statement, none left deferred.
    let statuses = p.target.psql(
        &t,
        "SELECT status || ':' || count(*) FROM pgferry.cdc_ddl GROUP BY status ORDER BY status",
    );
    assert!(!statuses.contains("deferred"), "{statuses}");
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pgferry.cdc_ddl WHERE status = 'applied'"
        ),
        "16",
        "{}",
        p.target.psql(
            &t,
            "SELECT lsn || ' ' || status || ' ' || statement FROM pgferry.cdc_ddl ORDER BY lsn"
        )
    );
    // `status` and `report` list them with their positions.
    let out = plan.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ddl       16 statement(s):")
            && text.contains("applied: ALTER TABLE public.accounts RENAME COLUMN name TO title;")
            && text.contains(
                "applied after its transaction: CREATE INDEX CONCURRENTLY accounts_opened_idx"
            ),
        "{}",
        show(&out)
    );
    let out = plan.run(&["report"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{s}: 16 DDL statement(s)"))
            && text.contains("applied: ALTER TYPE public.mood ADD VALUE 'ecstatic';"),
        "{}",
        show(&out)
    );
    let page = plan.dir.path().join("report.html");
    let out = plan.run(&["report", "--html", page.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", show(&out));
    let page = std::fs::read_to_string(&page).expect("the HTML report");
    assert!(
        page.contains(&format!("Schema changes replayed in {s} (16)"))
            && page.contains("<code>ALTER TYPE public.mood ADD VALUE &#39;ecstatic&#39;;</code>"),
        "{page}"
    );
}

#[test]
fn a_kill_in_a_transaction_holding_ddl_applies_it_exactly_once() {
    let (p, s, t, plan) = caught_up("ddl_kill");

    // The transaction's DDL is replayed, then its row waits at the gate inside the same target
    // transaction when the runner is killed.
    Gate::install_when(&p.target, &t, "public.events", "NEW.note = 'gated v1'");
    migrate(
        &p.source,
        &s,
        "BEGIN;\n\
         ALTER TABLE public.accounts ADD COLUMN tier int NOT NULL DEFAULT 1;\n\
         UPDATE public.accounts SET tier = 2 WHERE id <= 5;\n\
         INSERT INTO public.events (account, note) VALUES (1, 'gated');\n\
         COMMIT;\n\
         INSERT INTO public.events (account, note) VALUES (2, 'after');",
    );
    let gate = Gate::close(&p.target, &t);
    let mut child = plan.spawn(&["run"]);
    gate.wait_blocked(&p.target, "pgferry cdc apply", Duration::from_secs(60));
    if let Ok(Some(status)) = child.try_wait() {
        panic!("the runner finished before it could be killed: {status:?}");
    }
    child.kill().expect("SIGKILL the runner");
    let _ = child.wait();
    gate.open();
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.accounts'::regclass AND attname = 'tier'"
        ),
        "0",
        "the killed transaction's DDL was rolled back with it"
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pgferry.cdc_ddl WHERE status = 'applied'"
        ),
        "0"
    );

    // A backlog, streamed at once: a value added to an enum and, in the next transaction, used.
    // Both would land in one target transaction, where the value cannot be used yet.
    migrate(
        &p.source,
        &s,
        "ALTER TYPE public.mood ADD VALUE 'ecstatic';
         UPDATE public.accounts SET mood = 'ecstatic' WHERE id <= 3;",
    );

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    Gate::uninstall(&p.target, &t, "public.events");
    for table in ["public.accounts", "public.events"] {
        assert_same_rows(&p.source, &s, &p.target, &t, table);
    }
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) || ' ' || string_agg(statement, ' | ' ORDER BY lsn) FROM pgferry.cdc_ddl WHERE status = 'applied'"
        ),
        "2 ALTER TABLE public.accounts ADD COLUMN tier int NOT NULL DEFAULT 1; | ALTER TYPE public.mood ADD VALUE 'ecstatic';"
    );
}

#[test]
fn a_statement_that_cannot_be_replayed_stops_cdc_until_the_operator_resolves_it() {
    let p = pair();
    let s = p.source.fresh_database("ddl_stop_src");
    let t = p.target.fresh_database("ddl_stop_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(p, "ddl_stop", &s, &t, &stages("", ""));
    let text = std::fs::read_to_string(&plan.path).unwrap().replacen(
        &format!("target = \"{t}\"\n"),
        &format!("target = \"{t}\"\nexclude = [\"public.scratch*\"]\n"),
        1,
    );
    std::fs::write(&plan.path, text).unwrap();
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // A table the target has already (made by hand): replaying its CREATE fails there.
    p.target.psql(&t, "CREATE TABLE public.clash (id int)");

    migrate(
        &p.source,
        &s,
        // Outside the selection, and temporary: not for the target. Then DDL from a DO block:
        // replaying the block could run data changes twice.
        "CREATE TABLE public.scratch (id int);\n\
         INSERT INTO public.scratch VALUES (1);\n\
         ALTER TABLE public.scratch ADD COLUMN v text;\n\
         CREATE TEMP TABLE tmp AS SELECT 1 AS one;\n\
         CREATE INDEX ON tmp (one);\n\
         INSERT INTO public.events (account, note) VALUES (3, 'before');\n\
         DO $$ BEGIN EXECUTE 'ALTER TABLE public.accounts ADD COLUMN nickname text'; END $$;\n\
         UPDATE public.accounts SET nickname = 'n' || id WHERE id <= 3;\n\
         INSERT INTO public.events (account, note) VALUES (4, 'after');\n\
         CREATE TABLE public.clash (id int PRIMARY KEY, v text);\n\
         INSERT INTO public.clash VALUES (1, 'one'), (2, 'two');\n\
         ALTER TABLE public.scratch RENAME TO moved;\n\
         INSERT INTO public.moved VALUES (2, 'two');",
    );
    let out = plan.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cdc stopped at the ALTER TABLE statement at")
            && stderr.contains("DO $$ BEGIN EXECUTE"),
        "{}",
        show(&out)
    );
    // Nothing of the statement's transaction or after it is applied (what came before may be, as
    // cdc groups small transactions).
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM public.events WHERE note LIKE 'after%'"
        ),
        "0"
    );
    // The operator does what the message says: the change by hand, then the mark.
    let mark = stderr
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("INSERT INTO"))
        .unwrap_or_else(|| panic!("the message names the command to mark it: {stderr}"))
        .trim_end_matches(';')
        .to_string();
    p.target
        .psql(&t, "ALTER TABLE public.accounts ADD COLUMN nickname text");
    p.target.psql(&t, &mark);

    // Next stop: the statement the target rejects, with the target's reason.
    let out = plan.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cdc stopped at the CREATE TABLE statement at")
            && stderr.contains("the target refused it: relation \"clash\" already exists"),
        "{}",
        show(&out)
    );
    // The first way out: make the target accept it.
    p.target.psql(&t, "DROP TABLE public.clash");

    // Next: a table renamed into the selection (from `scratch`, excluded), which nothing publishes.
    let out = plan.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cdc stopped at the ALTER TABLE statement at")
            && stderr.contains("public.moved entered the selection by a rename or a move"),
        "{}",
        show(&out)
    );
    let mark = stderr
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("INSERT INTO"))
        .unwrap_or_else(|| panic!("the message names the command to mark it: {stderr}"))
        .trim_end_matches(';')
        .to_string();
    // What the message says: publish it, copy it, mark the statement.
    p.source.psql(
        &s,
        "ALTER PUBLICATION pgferry_ddl_stop ADD TABLE public.moved",
    );
    p.target.psql(
        &t,
        "CREATE TABLE public.moved (id int, v text); INSERT INTO public.moved VALUES (1, NULL), (2, 'two')",
    );
    p.target.psql(&t, &mark);

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for table in [
        "public.accounts",
        "public.events",
        "public.clash",
        "public.moved",
    ] {
        assert_same_rows(&p.source, &s, &p.target, &t, table);
    }
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM public.accounts WHERE nickname IS NOT NULL"
        ),
        "3"
    );
    assert_eq!(
        p.target
            .psql(&t, "SELECT to_regclass('public.scratch') IS NULL"),
        "t"
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT string_agg(status, ',' ORDER BY lsn) FROM pgferry.cdc_ddl"
        ),
        "ignored,ignored,skipped,applied,skipped,ignored"
    );
}

#[test]
fn preflight_refuses_replicate_where_the_source_cannot_capture() {
    let p = pair();
    // A role that may replicate but not create event triggers.
    let s = p.source.fresh_database("ddl_pf_src");
    let t = p.target.fresh_database("ddl_pf_tgt");
    let role = format!("{s}_app");
    p.source.psql(
        &s,
        &format!(
            "{SETUP}\nCREATE ROLE {role} LOGIN REPLICATION PASSWORD '{PASSWORD}';\n\
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};"
        ),
    );
    let preflight = format!("[stages.pre]\nkind = \"preflight\"\n\n{}", stages("", ""));
    let plan = TestPlan::new(p, "ddl_pf", &s, &t, &preflight);
    let text = std::fs::read_to_string(&plan.path).unwrap().replacen(
        "postgres://postgres@",
        &format!("postgres://{role}@"),
        1,
    );
    std::fs::write(&plan.path, text).unwrap();
    let out = plan.run(&["run", "--until", "pre"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the cdc stage has ddl = \"replicate\", which this source cannot do")
            && err.contains(&format!("role {role} may not create event triggers")),
        "{}",
        show(&out)
    );

    // A PostgreSQL 13 source: pgoutput cannot carry the captured statements.
    let Some(old) = Cluster::start_version(13, "ddl13") else {
        return;
    };
    let s13 = old.fresh_database("ddl_pf13_src");
    let plan = TestPlan::new(p, "ddl_pf13", &s13, &t, &preflight);
    let text = std::fs::read_to_string(&plan.path).unwrap().replacen(
        &format!("127.0.0.1:{}/", p.source.port),
        &format!("127.0.0.1:{}/", old.port),
        1,
    );
    std::fs::write(&plan.path, text).unwrap();
    old.psql(&s13, "CREATE TABLE public.t (id int PRIMARY KEY)");
    let out = plan.run(&["run", "--until", "pre"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "the source is PostgreSQL 13, whose pgoutput cannot carry the captured statements"
        ),
        "{}",
        show(&out)
    );
}

/// A source of the oldest version that can capture (14) and a newer target (18): the capture's
/// SQL runs on 14, the statements go through the target's parser, and after the cutover the
/// target equals the source (its schema as the 18 server prints it).
#[test]
fn ddl_is_replayed_from_14_to_18() {
    let (old, new) = std::thread::scope(|scope| {
        let s = scope.spawn(|| Cluster::start_version(14, "ddl14src"));
        let t = scope.spawn(|| Cluster::start_version(18, "ddl18tgt"));
        (s.join().expect("source"), t.join().expect("target"))
    });
    let (Some(source), Some(target)) = (old, new) else {
        return;
    };
    let p = crate::support::Pair { source, target };
    let s = p.source.fresh_database("ddl_v_src");
    let t = p.target.fresh_database("ddl_v_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(
        &p,
        "ddl_v",
        &s,
        &t,
        &stages(
            "",
            "[stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\n\n\
             [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
             [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"sequences\"]\n",
        ),
    );
    let mut child = plan.spawn(&["run"]);
    plan.wait_until_cdc_ready(&p, &mut child);
    migrate(
        &p.source,
        &s,
        // (No new partition here: PostgreSQL 18 names the NOT NULL constraints of a partition
        // created with PARTITION OF after its parent's, and a dump restored on 18 after the
        // partition's own table, so the two schemas would differ in those names only.)
        "ALTER TABLE public.orders ADD COLUMN note text DEFAULT 'n';\n\
         UPDATE public.orders SET note = 'changed' WHERE qty < 10;\n\
         ALTER TABLE public.accounts ADD COLUMN opened_at timestamptz NOT NULL DEFAULT clock_timestamp();\n\
         CREATE INDEX CONCURRENTLY accounts_opened_idx ON public.accounts (opened_at);\n\
         ALTER TYPE public.mood ADD VALUE 'ecstatic' BEFORE 'busy';\n\
         UPDATE public.accounts SET mood = 'ecstatic' WHERE id <= 10;\n\
         CREATE VIEW public.rich AS SELECT id, balance FROM public.accounts WHERE balance > 100;\n\
         COMMENT ON VIEW public.rich IS 'accounts above 100';\n",
    );
    let out = plan.run(&["cutover"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = wait_for_exit(child, "the run to finish", Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    crate::support::compare::assert_same_on(&p, &s, &t);
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pgferry.cdc_ddl WHERE status = 'applied'"
        ),
        "6"
    );
}

/// `CREATE INDEX CONCURRENTLY` runs after its target transaction commits: it is recorded
/// `deferred` in that transaction, so a kill while it waits leaves the record, and the next run
/// builds the index before it streams on.
#[test]
fn an_index_built_after_its_transaction_survives_a_kill() {
    use std::io::Write as _;
    let (p, s, t, plan) = caught_up("ddl_cic");

    // A session on the target holds the lock CREATE INDEX CONCURRENTLY waits for.
    let mut holder = p
        .target
        .psql_command(&t)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    holder
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"BEGIN; LOCK TABLE public.accounts IN SHARE UPDATE EXCLUSIVE MODE;\n")
        .expect("lock");
    wait_for("the lock", Duration::from_secs(30), || {
        p.target.psql(
            &t,
            "SELECT count(*) FROM pg_locks WHERE relation = 'public.accounts'::regclass AND mode = 'ShareUpdateExclusiveLock' AND granted",
        ) == "1"
    });
    migrate(
        &p.source,
        &s,
        "CREATE INDEX CONCURRENTLY accounts_name_idx ON public.accounts (name);\n\
         INSERT INTO public.events (account, note) VALUES (1, 'after the index');",
    );
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgferry cdc apply' \
                   AND query LIKE 'CREATE INDEX CONCURRENTLY%'";
    let mut child = plan.spawn(&["run"]);
    wait_for("the index build to wait", Duration::from_secs(60), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the runner stopped early: {status:?}");
        }
        p.target
            .psql(&t, &format!("{waiting} AND wait_event_type = 'Lock'"))
            == "1"
    });
    child.kill().expect("SIGKILL the runner");
    let _ = child.wait();
    // The server ends the killed runner's statement (client_connection_check_interval).
    wait_for("the killed build to end", Duration::from_secs(30), || {
        p.target.psql(&t, waiting) == "0"
    });
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT status FROM pgferry.cdc_ddl WHERE statement LIKE 'CREATE INDEX CONCURRENTLY%'"
        ),
        "deferred"
    );
    assert_eq!(
        p.target
            .psql(&t, "SELECT to_regclass('public.accounts_name_idx') IS NULL"),
        "t"
    );
    let _ = holder.kill();
    let _ = holder.wait();

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'public.accounts_name_idx'::regclass"
        ),
        "t"
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT status FROM pgferry.cdc_ddl WHERE statement LIKE 'CREATE INDEX CONCURRENTLY%'"
        ),
        "applied"
    );
    assert_eq!(
        row_digest(&p.source, &s, "public.events"),
        row_digest(&p.target, &t, "public.events")
    );

    // A schema dump taken again while the capture is installed leaves it out.
    assert!(capture_installed(&p.source, &s));
    let out = plan.run(&["run", "--rerun", "schema", "--until", "schema"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for section in ["pre-data", "post-data"] {
        let dump = p.target.psql(
            &t,
            &format!(
                "SELECT convert_from(content, 'UTF8') FROM pgferry.artifacts WHERE migration = 'ddl_cic' AND name = 'schema/{s}/{section}.sql'"
            ),
        );
        assert!(dump.contains("CREATE"), "{section}: {dump}");
        assert!(
            !dump.contains("pgferry_capture") && !dump.contains("pgferry_ddl_"),
            "{section}: {dump}"
        );
    }
}

/// The default, `ddl = "stop"`: nothing is installed on the source, and a column added there stops
/// cdc with the difference named; the same change on the target resumes it.
#[test]
fn the_stop_policy_names_the_column_difference_and_resumes_after_the_same_change() {
    let p = pair();
    let s = p.source.fresh_database("ddl_pol_src");
    let t = p.target.fresh_database("ddl_pol_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(
        p,
        "ddl_pol",
        &s,
        &t,
        &stages("", "").replace("ddl = \"replicate\"\n", ""),
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(!capture_installed(&p.source, &s), "stop installs nothing");
    migrate(
        &p.source,
        &s,
        "ALTER TABLE public.accounts ADD COLUMN tier int;\n\
         UPDATE public.accounts SET tier = 2 WHERE id <= 5;",
    );
    let out = plan.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "the schema of table `public.accounts` changed on the source: the source has column(s) tier that the target lacks"
        ),
        "{}",
        show(&out)
    );
    p.target
        .psql(&t, "ALTER TABLE public.accounts ADD COLUMN tier int");
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        row_digest(&p.source, &s, "public.accounts"),
        row_digest(&p.target, &t, "public.accounts")
    );
}

#[test]
fn volatile_values_converge_when_the_backlog_later_renames_or_drops_their_columns() {
    // cdc replays an ADD COLUMN with a volatile default, or an ALTER COLUMN TYPE with a USING
    // expression, and then copies the values the source computed. When the stream is replayed from
    // a backlog, the source may have renamed or dropped the column (or renamed its table) since:
    // the copy must find them by what they were then.
    let (p, s, t, plan) = caught_up("ddl_later");

    // Written while no runner follows the stream: all of it is a backlog at the next run.
    migrate(
        &p.source,
        &s,
        "ALTER TABLE public.accounts ADD COLUMN token float8 DEFAULT random();\n\
         ALTER TABLE public.accounts ADD COLUMN gone timestamptz DEFAULT clock_timestamp();\n\
         UPDATE public.accounts SET balance = balance + 1 WHERE id <= 10;\n\
         ALTER TABLE public.accounts RENAME COLUMN token TO secret;\n\
         ALTER TABLE public.accounts RENAME COLUMN id TO account_id;\n\
         ALTER TABLE public.accounts DROP COLUMN gone;\n\
         ALTER TABLE public.accounts ALTER COLUMN balance TYPE numeric USING balance + random();\n\
         ALTER TABLE public.events ADD COLUMN weight float8 DEFAULT random();\n\
         ALTER TABLE public.events RENAME TO journal;\n\
         INSERT INTO public.journal (account, note) VALUES (7, 'renamed');\n\
         ALTER TABLE public.orders ADD COLUMN r float8 DEFAULT random();",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // `public.orders` is partitioned: the event trigger names only the parent, whose partitions
    // the statement rewrote too.
    for table in ["public.accounts", "public.journal", "public.orders"] {
        assert_same_rows(&p.source, &s, &p.target, &t, table);
    }
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM public.accounts WHERE secret IS NULL OR secret < 0 OR secret >= 1"
        ),
        "0",
        "every row has the source's random value"
    );
}

#[test]
fn a_table_created_with_its_rows_reaches_the_target_with_them() {
    // `CREATE TABLE AS` / `SELECT INTO` write the new table's rows before the capture can publish
    // it: the capture writes them again once it has, and cdc replays the statement.
    let (p, s, t, plan) = caught_up("ddl_ctas");

    migrate(
        &p.source,
        &s,
        // Volatile values: computed again on the target, they would differ.
        "CREATE TABLE public.snapshot AS SELECT id, balance, random() AS r FROM public.accounts WHERE id <= 50;\n\
         ALTER TABLE public.snapshot ADD PRIMARY KEY (id);\n\
         UPDATE public.snapshot SET balance = -balance WHERE id <= 10;\n\
         SELECT id, clock_timestamp() AS at INTO public.stamped FROM public.accounts WHERE id % 7 = 0;\n\
         INSERT INTO public.stamped VALUES (1000, now());\n\
         BEGIN;\n\
         CREATE TABLE public.empty_now AS SELECT * FROM public.accounts WITH NO DATA;\n\
         INSERT INTO public.empty_now SELECT * FROM public.accounts WHERE id = 1;\n\
         COMMIT;",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for table in ["public.snapshot", "public.stamped", "public.empty_now"] {
        assert_same_rows(&p.source, &s, &p.target, &t, table);
    }
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FROM public.snapshot"),
        "50"
    );
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FROM public.stamped"),
        "29"
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT string_agg(tag, ', ' ORDER BY lsn) FROM pgferry.cdc_ddl WHERE status = 'applied'"
        ),
        "CREATE TABLE AS, ALTER TABLE, SELECT INTO, CREATE TABLE AS"
    );
}

#[test]
fn ddl_between_the_schema_dump_and_the_load_stops_the_load_with_how_to_start_over() {
    // The capture and the slot start after schema_dump: a column added in between is in neither
    // the dump nor the stream. The load's snapshot sees it, and the load stops instead of copying
    // into a target without it.
    let p = pair();
    let s = p.source.fresh_database("ddl_gap_src");
    let t = p.target.fresh_database("ddl_gap_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(p, "ddl_gap", &s, &t, &stages("", ""));
    let out = plan.run(&["run", "--until", "provision"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    migrate(
        &p.source,
        &s,
        "ALTER TABLE public.accounts DROP COLUMN legacy;\n\
         ALTER TABLE public.events ADD COLUMN at timestamptz DEFAULT clock_timestamp();",
    );
    let out = plan.run(&["run"]);
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the source's tables changed after schema_dump")
            && stderr.contains("public.accounts: only the target has (legacy)")
            && stderr.contains("public.events: only the source has (at)")
            && stderr.contains("pgferry reset"),
        "{}",
        show(&out)
    );
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FROM public.accounts"),
        "0"
    );

    // The way on the message names: start over, the schema dumped again (this target database
    // existed before pgferry: emptied by hand, and kept).
    p.target
        .psql(&t, "DROP SCHEMA public CASCADE; CREATE SCHEMA public");
    let out = plan.run(&["reset", "--yes", "--keep-target"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for table in ["public.accounts", "public.events"] {
        assert_same_rows(&p.source, &s, &p.target, &t, table);
    }
}
