//! The `post_data` and `sequence_reset` stages against real clusters. Until the schema_dump,
//! provision and full_load stages run in these tests, each test builds their output itself: the
//! source's pre-data schema and rows are copied to the target with pg_dump | psql, and the
//! post-data section (`pg_dump --section=post-data`, the same SQL `pg_restore --section=post-data
//! -f` writes) is put into the checkpoint store as the artifact schema_dump would store.

use crate::support;

use std::path::Path;
use std::time::Duration;

use crate::support::{Cluster, TestPlan, pair, show, wait_for};

const PREFLIGHT: &str = "[stages.pre]\nkind = \"preflight\"\n\n";

/// The three-stage plan most tests run: preflight, post_data, sequence_reset.
fn stages(jobs: u32, extra: &str) -> String {
    format!(
        "{PREFLIGHT}[stages.indexes]\nkind = \"post_data\"\nafter = [\"pre\"]\njobs = {jobs}\n{extra}\n\
         [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"indexes\"]\n"
    )
}

fn pg_dump(cluster: &Cluster, db: &str, args: &[&str]) -> String {
    cluster.run_tool("pg_dump", db, args)
}

/// Runs an SQL script with psql (ON_ERROR_STOP).
fn psql_script(cluster: &Cluster, db: &str, dir: &Path, sql: &str) {
    let path = dir.join(format!("script-{}.sql", rand_suffix()));
    std::fs::write(&path, sql).expect("write script");
    cluster.psql_file(db, &path);
    let _ = std::fs::remove_file(&path);
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `\restrict` / `\unrestrict` lines carry a random key: drop them before comparing dumps.
fn strip_restrict(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a test prepared: the plan, and the post-data script it stored.
struct Prepared {
    plan: TestPlan,
    post_data: String,
}

/// Fresh databases; `source_sql` on the source; its pre-data schema and rows copied to the target;
/// `target_sql` on the target; the store created (`run --until pre`); the post-data artifact stored.
fn prepare(prefix: &str, source_sql: &str, target_sql: &str, stage_text: &str) -> Prepared {
    let p = pair();
    let s = p.source.fresh_database(&format!("{prefix}_src"));
    let t = p.target.fresh_database(&format!("{prefix}_tgt"));
    let plan = TestPlan::new(p, prefix, &s, &t, stage_text);
    if !source_sql.is_empty() {
        psql_script(&p.source, &s, plan.dir.path(), source_sql);
    }
    copy_schema_and_rows(&plan, target_sql);
    let post_data = pg_dump(&p.source, &s, &["--section=post-data"]);
    create_store(&plan);
    put_artifact(&plan, &post_data);
    Prepared { plan, post_data }
}

fn copy_schema_and_rows(plan: &TestPlan, target_sql: &str) {
    let p = pair();
    let pre = pg_dump(&p.source, &plan.source_db, &["--section=pre-data"]);
    psql_script(&p.target, &plan.target_db, plan.dir.path(), &pre);
    let data = pg_dump(&p.source, &plan.source_db, &["--data-only"]);
    psql_script(&p.target, &plan.target_db, plan.dir.path(), &data);
    if !target_sql.is_empty() {
        psql_script(&p.target, &plan.target_db, plan.dir.path(), target_sql);
    }
}

/// The store lives in the first target database; a run of the preflight stage creates it.
fn create_store(plan: &TestPlan) {
    let out = plan.run(&["run", "--until", "pre"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

/// Stores the post-data script under the name schema_dump uses (`schema/DB/post-data.sql`).
fn put_artifact(plan: &TestPlan, content: &str) {
    let tag = "$pgferry_test_artifact$";
    assert!(!content.contains(tag));
    let sql = format!(
        "INSERT INTO pgferry.artifacts (migration, name, content, sha256) \
         SELECT '{m}', 'schema/{db}/post-data.sql', c, encode(sha256(c), 'hex') \
         FROM (SELECT convert_to({tag}{content}{tag}, 'UTF8') AS c) x \
         ON CONFLICT (migration, name) DO UPDATE SET content = excluded.content, sha256 = excluded.sha256;",
        m = plan.name,
        db = plan.source_db,
    );
    psql_script(&pair().target, &plan.target_db, plan.dir.path(), &sql);
}

fn t(plan: &TestPlan, sql: &str) -> String {
    pair().target.psql(&plan.target_db, sql)
}

fn s(plan: &TestPlan, sql: &str) -> String {
    pair().source.psql(&plan.source_db, sql)
}

/// The `-- Name:` header lines of a post-data script (but not the fake one the comment of
/// `builds_every_phase_in_order_with_two_jobs` has in its text).
fn headers(script: &str) -> impl Iterator<Item = &str> {
    script
        .lines()
        .filter(|l| l.starts_with("-- Name: ") && !l.starts_with("-- Name: fake;"))
}

/// The number of objects in a post-data script.
fn header_count(script: &str) -> usize {
    headers(script).count()
}

fn checkpoint(plan: &TestPlan, stage: &str, key: &str) -> String {
    t(
        plan,
        &format!(
            "SELECT coalesce((SELECT value::text FROM pgferry.checkpoints WHERE migration = '{}' AND stage = '{stage}' AND key = '{key}'), 'absent')",
            plan.name
        ),
    )
}

fn items_done(plan: &TestPlan) -> i64 {
    t(
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

/// The target's whole schema (pgferry's store left out) equals the source's.
fn assert_same_schema(plan: &TestPlan) {
    let p = pair();
    let source = strip_restrict(&pg_dump(&p.source, &plan.source_db, &["--schema-only"]));
    let target = strip_restrict(&pg_dump(
        &p.target,
        &plan.target_db,
        &["--schema-only", "--exclude-schema=pgferry"],
    ));
    if source != target {
        let diff: Vec<String> = source
            .lines()
            .zip(target.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(10)
            .map(|(n, (a, b))| format!("line {}:\n  source: {a}\n  target: {b}", n + 1))
            .collect();
        panic!(
            "schemas differ ({} vs {} lines); first differences:\n{}",
            source.lines().count(),
            target.lines().count(),
            diff.join("\n")
        );
    }
}

fn invalid_indexes(plan: &TestPlan) -> String {
    t(
        plan,
        "SELECT coalesce(string_agg(c.relname, ', '), '') FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT i.indisvalid AND n.nspname <> 'pgferry'",
    )
}

const SEQUENCES: &str = "SELECT string_agg(schemaname || '.' || sequencename || '=' || coalesce(last_value::text, 'null'), ', ' ORDER BY schemaname, sequencename) \
                         FROM pg_sequences WHERE schemaname <> 'pgferry'";

#[test]
fn pagila_post_data_and_sequences_match_the_source() {
    let p = pair();
    let s_db = p.source.fresh_database("pagila_pd_src");
    if !support::load_pagila(&p.source, &s_db) {
        return;
    }
    // Pagila creates its materialized view WITH NO DATA; populate it so the dump refreshes it.
    p.source
        .psql(&s_db, "REFRESH MATERIALIZED VIEW public.rental_by_category");
    let t_db = p.target.fresh_database("pagila_pd_tgt");
    let plan = TestPlan::new(p, "pagila_pd", &s_db, &t_db, &stages(4, ""));
    // The rows' copy also sets the sequences: put them back to their start, as after a COPY.
    copy_schema_and_rows(
        &plan,
        "SELECT setval(c.oid::regclass, s.seqstart, false) FROM pg_class c JOIN pg_sequence s ON s.seqrelid = c.oid;",
    );
    let post_data = pg_dump(&p.source, &s_db, &["--section=post-data"]);
    assert!(
        post_data.contains("Type: MATERIALIZED VIEW DATA"),
        "the dump should refresh the view"
    );
    create_store(&plan);
    put_artifact(&plan, &post_data);
    assert_ne!(
        t(&plan, SEQUENCES),
        s(&plan, SEQUENCES),
        "sequences differ before the run"
    );

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    assert_same_schema(&plan);
    assert_eq!(invalid_indexes(&plan), "", "invalid indexes on the target");
    assert_eq!(
        t(
            &plan,
            "SELECT relispopulated FROM pg_class WHERE oid = 'public.rental_by_category'::regclass"
        ),
        "t"
    );
    assert_eq!(
        t(&plan, "SELECT count(*) FROM public.rental_by_category"),
        s(&plan, "SELECT count(*) FROM public.rental_by_category")
    );
    assert_eq!(t(&plan, SEQUENCES), s(&plan, SEQUENCES));
    // Every object was built and checkpointed, and counted.
    let n = header_count(&post_data) as i64;
    assert!(n > 100, "Pagila has over 100 post-data objects, got {n}");
    assert_eq!(items_done(&plan), n);
    assert_eq!(
        t(
            &plan,
            &format!(
                "SELECT value FROM pgferry.counters WHERE migration = '{}' AND scope = '{s_db}' AND name = 'post_data_items_done'",
                plan.name
            )
        ),
        n.to_string()
    );
    // Every Pagila sequence belongs to a table (or to its schema), and they were all behind.
    let summary = checkpoint(&plan, "sequences", &format!("database:{s_db}"));
    let sequences = s(
        &plan,
        "SELECT count(*) FROM pg_sequences WHERE schemaname = 'public'",
    );
    assert!(
        summary.contains(&format!("\"sequences\": {sequences}")),
        "{summary}"
    );
    let changed: i64 = t(
        &plan,
        &format!(
            "SELECT (value->>'changed')::int FROM pgferry.checkpoints WHERE migration = '{}' AND stage = 'sequences'",
            plan.name
        ),
    )
    .parse()
    .unwrap();
    assert!(changed > 0, "{summary}");
}

/// Every kind of object and every phase, two at a time: indexes on a 100k-row table, constraints,
/// a foreign-key cycle, a partitioned table (index attachments), a materialized view with a unique
/// index, a trigger, a rule, a policy, comments, quoted names and an index in the default
/// tablespace after a `SET`.
#[test]
fn builds_every_phase_in_order_with_two_jobs() {
    let source = r#"
CREATE SCHEMA "Odd Schema";
CREATE TABLE public.parent (id int NOT NULL, name text NOT NULL);
CREATE TABLE public.child (id int NOT NULL, parent_id int NOT NULL, note text);
CREATE TABLE public.big (id int NOT NULL, a int, b text, c int);
CREATE TABLE public.a (id int NOT NULL, b_id int);
CREATE TABLE public.b (id int NOT NULL, a_id int);
CREATE TABLE "Odd Schema"."Mixed Case" ("Id" int NOT NULL, parent_id int);
CREATE TABLE public.meas (id int NOT NULL, at date NOT NULL, v int) PARTITION BY RANGE (at);
CREATE TABLE public.meas_2023 PARTITION OF public.meas FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE public.meas_2024 PARTITION OF public.meas FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
INSERT INTO public.parent SELECT g, 'p' || g FROM generate_series(1, 1000) g;
INSERT INTO public.child SELECT g, 1 + g % 1000, md5(g::text) FROM generate_series(1, 20000) g;
INSERT INTO public.big SELECT g, g % 977, md5(g::text), (g * 7) % 100003 FROM generate_series(1, 100000) g;
INSERT INTO public.a SELECT g, g FROM generate_series(1, 100) g;
INSERT INTO public.b SELECT g, g FROM generate_series(1, 100) g;
INSERT INTO "Odd Schema"."Mixed Case" SELECT g, g FROM generate_series(1, 100) g;
INSERT INTO public.meas SELECT g, DATE '2023-01-01' + (g % 700), g FROM generate_series(1, 5000) g;
ALTER TABLE public.parent ADD CONSTRAINT parent_pkey PRIMARY KEY (id);
ALTER TABLE public.parent ADD CONSTRAINT parent_name_key UNIQUE (name);
ALTER TABLE public.child ADD CONSTRAINT child_pkey PRIMARY KEY (id);
ALTER TABLE public.child ADD CONSTRAINT child_parent_fkey FOREIGN KEY (parent_id) REFERENCES public.parent(id);
ALTER TABLE public.child ADD CONSTRAINT child_note_check CHECK (note <> '') NOT VALID;
ALTER TABLE public.big ADD CONSTRAINT big_pkey PRIMARY KEY (id);
CREATE INDEX big_a_idx ON public.big (a);
CREATE INDEX big_b_idx ON public.big (b);
CREATE INDEX big_c_idx ON public.big (c, a);
CREATE UNIQUE INDEX big_b_c_key ON public.big (b, c);
ALTER TABLE public.big CLUSTER ON big_a_idx;
ALTER TABLE public.a ADD CONSTRAINT a_pkey PRIMARY KEY (id);
ALTER TABLE public.b ADD CONSTRAINT b_pkey PRIMARY KEY (id);
ALTER TABLE public.a ADD CONSTRAINT a_b_fkey FOREIGN KEY (b_id) REFERENCES public.b(id);
ALTER TABLE public.b ADD CONSTRAINT b_a_fkey FOREIGN KEY (a_id) REFERENCES public.a(id);
ALTER TABLE "Odd Schema"."Mixed Case" ADD CONSTRAINT "Mixed Case_pkey" PRIMARY KEY ("Id");
ALTER TABLE "Odd Schema"."Mixed Case" ADD CONSTRAINT "Mixed; Type: FK" FOREIGN KEY (parent_id) REFERENCES public.parent(id);
ALTER TABLE public.meas ADD CONSTRAINT meas_pkey PRIMARY KEY (id, at);
CREATE INDEX meas_v_idx ON public.meas (v);
CREATE MATERIALIZED VIEW public.child_counts AS SELECT parent_id, count(*) AS n FROM public.child GROUP BY parent_id;
CREATE UNIQUE INDEX child_counts_parent_id_idx ON public.child_counts (parent_id);
CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.note := coalesce(NEW.note, '') || '!'; RETURN NEW; END$$;
CREATE TRIGGER child_touch BEFORE UPDATE ON public.child FOR EACH ROW EXECUTE FUNCTION public.touch();
CREATE RULE parent_no_delete AS ON DELETE TO public.parent DO INSTEAD NOTHING;
ALTER TABLE public.big ENABLE ROW LEVEL SECURITY;
CREATE POLICY big_small ON public.big USING (a < 500);
COMMENT ON INDEX public.big_b_idx IS 'a comment; with -- and a fake header:
--
-- Name: fake; Type: INDEX; Schema: public; Owner: x
--';
COMMENT ON CONSTRAINT child_parent_fkey ON public.child IS 'the parent';
"#;
    let prepared = prepare(
        "phases",
        source,
        "",
        &stages(2, "maintenance_work_mem = \"64MB\""),
    );
    let plan = &prepared.plan;
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    assert_same_schema(plan);
    assert_eq!(invalid_indexes(plan), "");
    assert_eq!(
        t(
            plan,
            "SELECT relispopulated FROM pg_class WHERE oid = 'public.child_counts'::regclass"
        ),
        "t"
    );
    assert_eq!(t(plan, "SELECT count(*) FROM public.child_counts"), "1000");
    assert_eq!(
        t(
            plan,
            "SELECT indisclustered FROM pg_index WHERE indexrelid = 'public.big_a_idx'::regclass"
        ),
        "t"
    );
    assert_eq!(items_done(plan), header_count(&prepared.post_data) as i64);

    // The phases followed each other: every foreign key started after every index and constraint
    // had ended, and the materialized view was refreshed after everything else.
    let progress = |cond: &str, agg: &str, col: &str| {
        format!(
            "(SELECT {agg}({col}) FROM pgferry.tables WHERE migration = '{}' AND stage = 'indexes' AND {cond})",
            plan.name
        )
    };
    let builds = "(table_name LIKE 'INDEX %' OR table_name LIKE 'CONSTRAINT %')";
    let fks = "table_name LIKE 'FK CONSTRAINT %'";
    let refresh = "table_name LIKE 'MATERIALIZED VIEW DATA %'";
    let tracked = [
        "INDEX",
        "CONSTRAINT",
        "FK CONSTRAINT",
        "MATERIALIZED VIEW DATA",
    ]
    .iter()
    .map(|k| {
        headers(&prepared.post_data)
            .filter(|l| l.contains(&format!("; Type: {k}; ")))
            .count()
    })
    .sum::<usize>();
    assert!(tracked > 20, "{tracked}");
    assert_eq!(
        t(
            plan,
            &format!(
                "SELECT count(*) FILTER (WHERE state = 'copied') || '/' || count(*) FROM pgferry.tables WHERE migration = '{}' AND stage = 'indexes'",
                plan.name
            )
        ),
        format!("{tracked}/{tracked}"),
        "indexes, constraints, foreign keys and the refresh are tracked"
    );
    assert_eq!(
        t(
            plan,
            &format!(
                "SELECT {} >= {}",
                progress(fks, "min", "started_at"),
                progress(builds, "max", "ended_at")
            )
        ),
        "t",
        "foreign keys must start after the indexes they need"
    );
    assert_eq!(
        t(
            plan,
            &format!(
                "SELECT {} >= {}",
                progress(refresh, "min", "started_at"),
                progress(&format!("NOT {refresh}"), "max", "ended_at")
            )
        ),
        "t",
        "the materialized view is refreshed last"
    );
    // The rule, the policy and the trigger work.
    t(plan, "DELETE FROM public.parent WHERE id = 1");
    assert_eq!(t(plan, "SELECT count(*) FROM public.parent"), "1000");
    t(plan, "UPDATE public.child SET note = 'x' WHERE id = 1");
    assert_eq!(t(plan, "SELECT note FROM public.child WHERE id = 1"), "x!");
    assert_eq!(
        t(
            plan,
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.big'::regclass"
        ),
        "t"
    );
}

/// SIGKILL while an index is being built, after another one was checkpointed: the next run builds
/// the rest, each index exactly once, and a third run has nothing to do. The indexes call a function
/// that sleeps, so they take long enough to be caught mid-build without a huge table.
#[test]
fn resumes_after_sigkill_during_an_index_build() {
    let source = r#"
CREATE FUNCTION public.slow(i int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$BEGIN PERFORM pg_sleep(0.01); RETURN i; END$$;
CREATE TABLE public.slowt (id int NOT NULL, v int);
INSERT INTO public.slowt SELECT g, g FROM generate_series(1, 150) g;
ALTER TABLE public.slowt ADD CONSTRAINT slowt_pkey PRIMARY KEY (id);
CREATE INDEX slowt_s1 ON public.slowt (public.slow(id));
CREATE INDEX slowt_s2 ON public.slowt ((public.slow(id) + 1));
CREATE INDEX slowt_s3 ON public.slowt ((public.slow(v) + 2));
"#;
    let prepared = prepare("killed_pd", source, "", &stages(1, ""));
    let plan = &prepared.plan;
    let mut child = plan.spawn(&["run"]);
    wait_for(
        "an object checkpointed and another index being built",
        Duration::from_secs(60),
        || {
            items_done(plan) >= 1
                && t(
                    plan,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' \
                     AND application_name LIKE 'pgferry post_data%' AND query LIKE 'CREATE INDEX%'",
                ) == "1"
        },
    );
    child.kill().expect("SIGKILL pgferry");
    let killed = child.wait_with_output().expect("wait for pgferry");
    assert_ne!(killed.status.code(), Some(0));
    let done_before = items_done(plan);
    assert!(
        (1..4).contains(&done_before),
        "{done_before} objects checkpointed before the kill"
    );
    // The server notices the vanished client and aborts its statement.
    wait_for(
        "the killed run's sessions to end",
        Duration::from_secs(30),
        || {
            t(
                plan,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'pgferry %'",
            ) == "0"
        },
    );

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        t(
            plan,
            "SELECT string_agg(c.relname || ':' || i.indisvalid, ',' ORDER BY c.relname) FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'public.slowt'::regclass"
        ),
        "slowt_pkey:true,slowt_s1:true,slowt_s2:true,slowt_s3:true"
    );
    assert_same_schema(plan);
    assert_eq!(items_done(plan), 4);
    let summary = checkpoint(plan, "indexes", &format!("database:{}", plan.source_db));
    assert!(
        summary.contains(&format!("\"skipped\": {done_before}")),
        "{summary}"
    );

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to do"),
        "{}",
        show(&out)
    );
}

/// Objects already on the target (built by hand, or by a run killed before its checkpoint) count as
/// built and are not duplicated; a primary key's "multiple primary keys" error is recognised too.
#[test]
fn objects_already_on_the_target_count_as_built() {
    let source = r#"
CREATE TABLE public.t (id int NOT NULL, v int, w text);
INSERT INTO public.t SELECT g, g % 10, md5(g::text) FROM generate_series(1, 1000) g;
ALTER TABLE public.t ADD CONSTRAINT t_pkey PRIMARY KEY (id);
CREATE INDEX t_v_idx ON public.t (v);
CREATE INDEX t_w_idx ON public.t (w);
ALTER TABLE public.t CLUSTER ON t_w_idx;
CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER t_noop BEFORE INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION public.noop();
"#;
    let by_hand = r#"
CREATE INDEX t_v_idx ON public.t (v);
CREATE INDEX t_w_idx ON public.t (w);
ALTER TABLE public.t ADD CONSTRAINT t_pkey PRIMARY KEY (id);
CREATE TRIGGER t_noop BEFORE INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION public.noop();
"#;
    let prepared = prepare("existing", source, by_hand, &stages(2, ""));
    let plan = &prepared.plan;
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        t(
            plan,
            "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = 'public.t'::regclass"
        ),
        "t_pkey,t_v_idx,t_w_idx"
    );
    assert_eq!(
        t(
            plan,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.t'::regclass AND NOT tgisinternal"
        ),
        "1"
    );
    // The CLUSTER ON that came with the existing index was applied all the same.
    assert_eq!(
        t(
            plan,
            "SELECT indisclustered FROM pg_index WHERE indexrelid = 'public.t_w_idx'::regclass"
        ),
        "t"
    );
    assert_same_schema(plan);
    let existed = t(
        plan,
        &format!(
            "SELECT string_agg(key, ',' ORDER BY key) FROM pgferry.checkpoints WHERE migration = '{}' \
             AND key LIKE 'database:%:item:%' AND (value->>'already_existed')::bool",
            plan.name
        ),
    );
    let db = &plan.source_db;
    assert_eq!(
        existed,
        format!(
            "database:{db}:item:CONSTRAINT:public.t t_pkey,database:{db}:item:INDEX:public.t_v_idx,\
             database:{db}:item:INDEX:public.t_w_idx,database:{db}:item:TRIGGER:public.t t_noop"
        )
    );
}

/// A different object that happens to have the name is not mistaken for the one to build.
#[test]
fn a_different_object_with_the_same_name_fails_the_stage() {
    let source =
        "CREATE TABLE public.u (id int NOT NULL, v int);\nCREATE INDEX u_v_idx ON public.u (v);\n";
    let prepared = prepare(
        "clash",
        source,
        "CREATE TABLE public.u_v_idx (x int);",
        &stages(2, ""),
    );
    let plan = &prepared.plan;
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("INDEX public.u_v_idx"), "{stderr}");
    assert!(
        stderr.contains("CREATE INDEX u_v_idx ON public.u"),
        "{stderr}"
    );
    assert!(stderr.contains("42P07"), "{stderr}");
    assert!(
        stderr.contains(&format!("database `{}`", plan.source_db)),
        "{stderr}"
    );
}

#[test]
fn post_data_without_the_artifact_says_to_run_schema_dump() {
    let p = pair();
    let s_db = p.source.fresh_database("noartifact_src");
    let t_db = p.target.fresh_database("noartifact_tgt");
    p.source
        .psql(&s_db, "CREATE TABLE public.x (id int PRIMARY KEY)");
    let plan = TestPlan::new(p, "noartifact", &s_db, &t_db, &stages(2, ""));
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("run the schema_dump stage first"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("database `{s_db}`")), "{stderr}");
}

#[test]
fn sequence_reset_copies_values_of_the_selected_tables() {
    let p = pair();
    let s_db = p.source.fresh_database("seq_src");
    let t_db = p.target.fresh_database("seq_tgt");
    let source = r#"
CREATE TABLE public.ser (id serial PRIMARY KEY, v text);
INSERT INTO public.ser (v) SELECT 'x' FROM generate_series(1, 42);
CREATE TABLE public.ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
INSERT INTO public.ident (v) SELECT 'y' FROM generate_series(1, 7);
CREATE SEQUENCE public.standalone;
SELECT setval('public.standalone', 99, false);
CREATE SEQUENCE public.unused;
CREATE TABLE public.skipped (id serial PRIMARY KEY);
INSERT INTO public.skipped DEFAULT VALUES;
INSERT INTO public.skipped DEFAULT VALUES;
CREATE SCHEMA other;
CREATE SEQUENCE other.elsewhere;
SELECT setval('other.elsewhere', 500);
CREATE SEQUENCE other.shared;
CREATE TABLE public.uses_shared (id bigint NOT NULL DEFAULT nextval('other.shared'));
INSERT INTO public.uses_shared DEFAULT VALUES;
INSERT INTO public.uses_shared DEFAULT VALUES;
INSERT INTO public.uses_shared DEFAULT VALUES;
"#;
    let plan = TestPlan::new(p, "seqs", &s_db, &t_db, "");
    // A plan of its own: public.skipped is excluded.
    let text = format!(
        "version = 1\nname = \"seqs\"\n\n[source]\nurl = \"postgres://postgres@127.0.0.1:{sp}/{s_db}?sslmode=disable\"\n\
         password = \"{{{{ env.{var} }}}}\"\n\n[target]\nurl = \"postgres://postgres@127.0.0.1:{tp}/{t_db}?sslmode=disable\"\n\
         password = \"{{{{ env.{var} }}}}\"\n\n[[databases]]\nname = \"{s_db}\"\ntarget = \"{t_db}\"\nexclude = [\"public.skipped\"]\n\n\
         {PREFLIGHT}[stages.seqs]\nkind = \"sequence_reset\"\nafter = [\"pre\"]\n",
        sp = p.source.port,
        tp = p.target.port,
        var = support::PASSWORD_VAR,
    );
    std::fs::write(&plan.path, text).unwrap();
    psql_script(&p.source, &s_db, plan.dir.path(), source);
    let pre = pg_dump(&p.source, &s_db, &["--section=pre-data"]);
    psql_script(&p.target, &t_db, plan.dir.path(), &pre);

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let value = |c: &Cluster, db: &str, seq: &str| {
        c.psql(
            db,
            &format!("SELECT last_value || ',' || is_called FROM {seq}"),
        )
    };
    for seq in [
        "public.ser_id_seq",
        "public.ident_id_seq",
        "public.standalone",
        "public.unused",
        "other.shared",
    ] {
        assert_eq!(
            value(&p.target, &t_db, seq),
            value(&p.source, &s_db, seq),
            "{seq}"
        );
    }
    assert_eq!(value(&p.source, &s_db, "public.ser_id_seq"), "42,true");
    assert_eq!(value(&p.source, &s_db, "public.standalone"), "99,false");
    // Not selected: the excluded table's sequence and one in a schema without selected tables.
    assert_eq!(value(&p.target, &t_db, "public.skipped_id_seq"), "1,false");
    assert_eq!(value(&p.target, &t_db, "other.elsewhere"), "1,false");
    let cp = |plan: &TestPlan| {
        p.target.psql(
            &t_db,
            &format!(
                "SELECT (value->>'sequences') || '/' || (value->>'changed') FROM pgferry.checkpoints \
                 WHERE migration = '{}' AND stage = 'seqs' AND key = 'database:{s_db}'",
                plan.name
            ),
        )
    };
    // ser, ident, standalone, unused (unchanged: never used on either side), other.shared.
    assert_eq!(cp(&plan), "5/4");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("public.ser_id_seq: 1 (not yet called) -> 42"),
        "{stderr}"
    );

    // Again, later: the values moved on the source; only those are changed.
    p.source
        .psql(&s_db, "INSERT INTO public.ser (v) VALUES ('z')");
    let out = plan.run(&["run", "--rerun", "seqs"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(value(&p.target, &t_db, "public.ser_id_seq"), "43,true");
    assert_eq!(cp(&plan), "5/1");

    // A sequence missing on the target is named.
    p.target.psql(&t_db, "DROP SEQUENCE public.standalone");
    let out = plan.run(&["run", "--rerun", "seqs"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing on the target: public.standalone"),
        "{stderr}"
    );
}

const SLOW_SCHEMA: &str = r#"
CREATE FUNCTION public.slow(i int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$BEGIN PERFORM pg_sleep(0.01); RETURN i; END$$;
CREATE TABLE public.slowt (id int NOT NULL, v int);
INSERT INTO public.slowt SELECT g, g FROM generate_series(1, 150) g;
ALTER TABLE public.slowt ADD CONSTRAINT slowt_pkey PRIMARY KEY (id);
CREATE INDEX slowt_s1 ON public.slowt (public.slow(id));
CREATE INDEX slowt_s2 ON public.slowt ((public.slow(id) + 1));
"#;

fn index_building(plan: &TestPlan) -> bool {
    t(
        plan,
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' \
         AND application_name LIKE 'pgferry post_data%' AND query LIKE 'CREATE INDEX%'",
    ) == "t"
}

fn slowt_indexes(plan: &TestPlan) -> String {
    t(
        plan,
        "SELECT string_agg(c.relname || ':' || i.indisvalid, ',' ORDER BY c.relname) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'public.slowt'::regclass",
    )
}

/// SIGTERM while indexes are being built: the builds are cancelled on the server, the run exits 130
/// with the stage pending, and the next run finishes it.
#[test]
fn sigterm_cancels_the_builds_and_the_next_run_finishes() {
    let prepared = prepare("sigterm_pd", SLOW_SCHEMA, "", &stages(2, ""));
    let plan = &prepared.plan;
    let child = plan.spawn(&["run"]);
    wait_for("an index being built", Duration::from_secs(60), || {
        index_building(plan)
    });
    // SAFETY: kill(2) on the pid of a child we spawned and have not waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().expect("wait for pgferry");
    assert_eq!(out.status.code(), Some(130), "{}", show(&out));
    // pgferry cancelled them before exiting (and the server would abort them once it noticed
    // the closed connections anyway).
    wait_for("the builds to stop", Duration::from_secs(5), || {
        !index_building(plan)
    });
    assert_eq!(
        t(
            plan,
            &format!(
                "SELECT state FROM pgferry.stages WHERE migration = '{}' AND stage = 'indexes'",
                plan.name
            )
        ),
        "pending"
    );
    assert!(items_done(plan) < 3);

    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        slowt_indexes(plan),
        "slowt_pkey:true,slowt_s1:true,slowt_s2:true"
    );
    assert_eq!(items_done(plan), 3);
}

/// A build's session is terminated on the server (a transient error): the executor retries the
/// stage, which resumes from its checkpoints and finishes.
#[test]
fn a_terminated_session_is_retried_and_the_stage_resumes() {
    let prepared = prepare("terminated_pd", SLOW_SCHEMA, "", &stages(2, ""));
    let plan = &prepared.plan;
    let child = plan.spawn(&["run"]);
    wait_for("an index being built", Duration::from_secs(60), || {
        index_building(plan)
    });
    t(
        plan,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE 'pgferry post_data%' AND query LIKE 'CREATE INDEX%'",
    );
    let out = child.wait_with_output().expect("wait for pgferry");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("transient failure"),
        "{}",
        show(&out)
    );
    assert_eq!(
        slowt_indexes(plan),
        "slowt_pkey:true,slowt_s1:true,slowt_s2:true"
    );
    assert_eq!(items_done(plan), 3);
    assert_same_schema(plan);
}
