//! PostgreSQL's own regression database (what `make installcheck` leaves behind: ~540 tables, 79
//! partitioned, ~525 without a primary key, custom base types, domains, enums, ranges,
//! multiranges, generated and identity columns, NOT VALID constraints, rules, policies,
//! publications, large objects) migrated offline by pgferry, compared with what
//! `pg_dump -Fc | pg_restore` makes of it: every table's rows, every sequence, the large objects and
//! `pg_dump --schema-only`, and the two durations; and migrated online with an UPDATE, a DELETE and
//! an INSERT on every table during cdc, compared with the source after the cutover.
//!
//! The database comes from `scripts/regression-db.sh` (cached per machine; `.ci/run` builds it
//! first). Without it the test fails under `CI=true` saying how to build it, and is skipped loudly
//! otherwise.

use crate::support;

use std::process::Command;
use std::time::Instant;

use crate::support::compare::first_differences;
use crate::support::{Cluster, TestPlan, pair, show};

use crate::support::corpus::{corpus, restore};

/// `schema.table count:md5` of every table of the database, one query per table run inside the
/// server (`\gexec`), sorted.
fn digests(c: &Cluster, db: &str, kinds: &str) -> String {
    let script = format!(
        "SELECT format('SELECT %L || '' '' || count(*) || '':'' || coalesce(md5(string_agg(md5(t::text), '','' ORDER BY md5(t::text))), '''') FROM %s t', \
                      n.nspname || '.' || c.relname, c.oid::regclass) \
                    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                   WHERE c.relkind IN ({kinds}) AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') \
                     AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1 \\gexec\n"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("digests.sql");
    std::fs::write(&path, &script).expect("write script");
    let out = Command::new(c.bindir.join("psql"))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&path)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ])
        .env("PGPASSWORD", support::PASSWORD)
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines.join("\n")
}

fn sequences(c: &Cluster, db: &str) -> String {
    c.psql(
        db,
        "SELECT coalesce(string_agg(schemaname || '.' || sequencename || '=' || coalesce(last_value::text, 'null'), ' ' ORDER BY 1), '') \
           FROM pg_sequences WHERE schemaname <> 'pgferry'",
    )
}

const OFFLINE: &str = "[stages.schema]\nkind = \"schema_dump\"\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
    [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
    [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"indexes\"]\n";

#[test]
fn the_regression_database_migrates_offline_like_pg_dump_and_pg_restore() {
    let Some(dir) = corpus() else { return };
    let p = pair();
    let s = restore(&p.source, &dir, "regress_src");
    let tables = p.source.psql(
        &s,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
    );
    let tables: i64 = tables.parse().expect("a count");
    assert!(tables > 300, "the corpus has {tables} tables");

    // The reference: pg_dump -Fc | pg_restore into a database of the target cluster.
    let reference = p.target.fresh_database("regress_ref");
    let started = Instant::now();
    let dump = tempfile::tempdir().expect("temp dir");
    let file = dump.path().join("ref.dump");
    let file = file.to_str().expect("utf-8 path");
    p.source.run_tool("pg_dump", &s, &["-Fc", "-f", file, &s]);
    p.target.run_tool(
        "pg_restore",
        &reference,
        &["--exit-on-error", "-d", &reference, file],
    );
    let reference_time = started.elapsed();

    // pgferry, offline.
    let t = p.target.fresh_database("regress_tgt");
    let plan = TestPlan::new(p, "regress", &s, &t, OFFLINE);
    let started = Instant::now();
    let out = plan.run(&["run"]);
    let pgferry_time = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    eprintln!(
        "[corpus] {tables} tables: pg_dump | pg_restore {:.2?}, pgferry {:.2?} ({:.2}x)",
        reference_time,
        pgferry_time,
        pgferry_time.as_secs_f64() / reference_time.as_secs_f64()
    );

    // Rows of every table, sequences, large objects, schema.
    let kinds = "'r', 'm'";
    let (a, b) = (
        digests(&p.target, &reference, kinds),
        digests(&p.target, &t, kinds),
    );
    assert!(a.lines().count() > 300, "{a}");
    assert!(a == b, "rows differ: {}", first_differences(&a, &b));
    assert_eq!(sequences(&p.target, &reference), sequences(&p.target, &t));
    assert_eq!(
        p.target.psql(&reference, support::compare::LARGE_OBJECTS),
        p.target.psql(&t, support::compare::LARGE_OBJECTS)
    );
    let (a, b) = (
        support::compare::schema_dump(&p.target, &reference),
        support::compare::schema_dump(&p.target, &t),
    );
    assert!(a == b, "schemas differ: {}", first_differences(&a, &b));
}

/// Runs a `\gexec` script on `db` with psql, errors allowed (each generated statement is its own
/// transaction; a statement the table refuses, such as a duplicate key, is skipped). Returns how
/// many statements succeeded.
fn gexec_allowing_errors(c: &Cluster, db: &str, script: &str) -> usize {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("writes.sql");
    std::fs::write(&path, script).expect("write script");
    let out = Command::new(c.bindir.join("psql"))
        .args(["-X", "-At", "-f"])
        .arg(&path)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
        ])
        .env("PGPASSWORD", support::PASSWORD)
        .output()
        .expect("psql");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("UPDATE ") || l.starts_with("DELETE ") || l.starts_with("INSERT ")
        })
        .count()
}

/// For every leaf table: an UPDATE of one row (its first column set to itself: the whole row goes
/// through cdc), a DELETE of another, and an INSERT copying a row (identity values overridden,
/// generated columns computed).
const WRITES: &str = "\\set QUIET off\n\
SELECT format('UPDATE %s SET %I = %I WHERE ctid = (SELECT min(ctid) FROM %s)', c.oid::regclass, a.attname, a.attname, c.oid::regclass) \
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
  JOIN LATERAL (SELECT attname FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped AND attgenerated = '' AND attidentity <> 'a' ORDER BY attnum LIMIT 1) a ON true \
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg_%' ORDER BY 1 \\gexec\n\
SELECT format('DELETE FROM %s WHERE ctid = (SELECT max(ctid) FROM %s)', c.oid::regclass, c.oid::regclass) \
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg_%' ORDER BY 1 \\gexec\n\
SELECT format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s LIMIT 1', c.oid::regclass, cols, cols, c.oid::regclass) \
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
  JOIN LATERAL (SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) AS cols FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped AND attgenerated = '') a ON a.cols IS NOT NULL \
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg_%' ORDER BY 1 \\gexec\n";

const ONLINE: &str = "[stages.schema]\nkind = \"schema_dump\"\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\nreplica_identity = \"index\"\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
    [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
    [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
    [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\n\n\
    [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
    [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"sequences\"]\n";

/// The regression database migrated online, with an UPDATE, a DELETE and an INSERT on every table
/// while cdc runs (ordinary, partitions, inheritance children, typed tables, generated and
/// identity columns, domains, composite types, enums, ranges and multiranges, money, xml, json and
/// jsonb, tsvector, bit, inet, ...), keyless tables given a replica identity by the plan's one
/// line: after the cutover every table's rows, the sequences and the schema equal the source's.
#[test]
fn the_regression_database_migrates_online_with_writes_to_every_table() {
    let Some(dir) = corpus() else { return };
    let p = pair();
    let s = restore(&p.source, &dir, "regress_on_src");
    let t = p.target.fresh_database("regress_on_tgt");
    let plan = TestPlan::new(p, "regress_on", &s, &t, ONLINE);
    let started = Instant::now();
    let mut child = plan.spawn(&["run"]);
    // Read its output all along: a full pipe would stop the runner.
    let stderr = child.stderr.take().expect("piped stderr");
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    // Loading ~600 tables online takes longer than TestPlan's minute.
    let ready_by = Instant::now() + std::time::Duration::from_secs(600);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().expect("the run");
            panic!(
                "the run stopped before cdc was ready: {}\n{}",
                show(&out),
                log.join().unwrap_or_default()
            );
        }
        let ready = p
            .target
            .psql(&t, "SELECT to_regclass('pgferry.stages') IS NOT NULL")
            == "t"
            && p.target.psql(
                &t,
                "SELECT count(*) FROM pgferry.stages WHERE migration = 'regress_on' AND stage = 'cdc' AND state = 'ready'",
            ) == "1";
        if ready {
            break;
        }
        if Instant::now() > ready_by {
            let _ = child.kill();
            let out = child.wait_with_output().expect("the run");
            panic!(
                "cdc not ready after 600 s: {}\n{}",
                show(&out),
                log.join().unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eprintln!("[corpus online] cdc ready after {:.2?}", started.elapsed());
    let writes = gexec_allowing_errors(&p.source, &s, WRITES);
    assert!(writes > 1000, "only {writes} writes succeeded");
    let out = child.wait_with_output().expect("the run");
    let log = log.join().unwrap_or_default();
    assert_eq!(out.status.code(), Some(0), "{}\n{log}", show(&out));
    eprintln!(
        "[corpus online] {writes} writes during cdc; the whole plan took {:.2?}",
        started.elapsed()
    );
    // Tables only: the cutover refreshes the target's materialized views, the source's are as
    // they were.
    let (a, b) = (digests(&p.source, &s, "'r'"), digests(&p.target, &t, "'r'"));
    let differing: Vec<String> = a
        .lines()
        .zip(b.lines())
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("{x} | {y}"))
        .collect();
    assert!(
        a.lines().count() == b.lines().count() && differing.is_empty(),
        "rows differ in {} table(s):\n{}",
        differing.len(),
        differing.join("\n")
    );
    assert_eq!(sequences(&p.source, &s), sequences(&p.target, &t));
    let (a, b) = (
        support::compare::schema_dump(&p.source, &s),
        support::compare::schema_dump(&p.target, &t),
    );
    assert!(a == b, "schemas differ: {}", first_differences(&a, &b));
}
