//! The `schema_dump` and `provision` stages against real clusters: Pagila's schema arrives intact,
//! a partial selection takes what it needs and nothing of what it leaves out, provisioning twice
//! is harmless while a drifted target is refused, the CDC publication follows the selection, a
//! failing schema leaves nothing behind, and no password ever shows.

use crate::support;

use std::process::Output;

use crate::support::{Cluster, PASSWORD, PASSWORD_VAR, TestPlan, pair, show};

const STAGES: &str = "[stages.pre]\nkind = \"preflight\"\n\n[stages.schema]\nkind = \"schema_dump\"\nafter = [\"pre\"]\n\n[stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that no output of a run shows the password.
fn no_password(out: &Output) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains(PASSWORD),
        "the password shows in the output:\n{}",
        show(out)
    );
}

/// Adds `tables`/`exclude` (TOML arrays) to the plan's `[[databases]]` entry.
fn select(plan: &TestPlan, tables: &[&str], exclude: &[&str]) {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let anchor = format!("target = \"{}\"\n", plan.target_db);
    let text = std::fs::read_to_string(&plan.path).unwrap().replace(
        &anchor,
        &format!(
            "{anchor}tables = [{}]\nexclude = [{}]\n",
            list(tables),
            list(exclude)
        ),
    );
    std::fs::write(&plan.path, text).unwrap();
}

/// Keeps the checkpoint store in database `state_db` of the target server.
fn state_in(plan: &TestPlan, state_db: &str) {
    let text = std::fs::read_to_string(&plan.path).unwrap().replace(
        "[[databases]]",
        &format!(
            "[state]\nurl = \"postgres://postgres@127.0.0.1:{}/{state_db}?sslmode=disable\"\npassword = \"{{{{ env.{PASSWORD_VAR} }}}}\"\n\n[[databases]]",
            pair().target.port
        ),
    );
    std::fs::write(&plan.path, text).unwrap();
}

/// An artifact of the plan's migration, as text.
fn artifact(store: &Cluster, store_db: &str, plan: &TestPlan, name: &str) -> String {
    store.psql(
        store_db,
        &format!(
            "SELECT convert_from(content, 'UTF8') FROM pgferry.artifacts WHERE migration = '{}' AND name = '{name}'",
            plan.name
        ),
    )
}

/// `pg_dump --schema-only --section=pre-data` of a database, without the lines that differ
/// between two dumps of the same schema (`\restrict` keys, comments) and without pgferry's schema.
fn pre_data(cluster: &Cluster, db: &str) -> String {
    let dump = cluster.run_tool(
        "pg_dump",
        db,
        &[
            "--schema-only",
            "--section=pre-data",
            "--exclude-schema=pgferry",
        ],
    );
    support::strip_restrict(&dump)
        .lines()
        .filter(|l| !l.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The relations (tables, views, materialized views) of schema `public`, sorted.
fn relations(cluster: &Cluster, db: &str) -> String {
    cluster.psql(
        db,
        "SELECT coalesce(string_agg(relname, ',' ORDER BY relname), '') FROM pg_class \
         WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm')",
    )
}

/// Shows the first lines where two texts differ.
fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}:\n  source: {x}\n  target: {y}", i + 1);
        }
    }
    format!(
        "one is a prefix of the other ({} vs {} lines)",
        a.lines().count(),
        b.lines().count()
    )
}

#[test]
fn pagila_schema_arrives_intact() {
    let p = pair();
    let s = p.source.fresh_database("pagila_src");
    if !support::load_pagila(&p.source, &s) {
        return;
    }
    let t = format!("{s}_tgt");
    let plan = TestPlan::new(p, "pagila", &s, &t, STAGES);
    let started = std::time::Instant::now();
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    eprintln!(
        "[test] pagila schema_dump + provision in {:.2?}",
        started.elapsed()
    );
    no_password(&out);
    // pg_dump's script (UTF8, only its \restrict guards as meta-commands) goes as one message,
    // not through psql.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("pre-data schema applied to target database") && log.contains("(one message)"),
        "provision did not send the pre-data schema as one message:\n{log}"
    );

    let source = pre_data(&p.source, &s);
    let target = pre_data(&p.target, &t);
    assert!(source.contains("CREATE TABLE public.film ("), "{source}");
    assert!(
        source == target,
        "the target's pre-data schema differs from the source's: {}",
        first_difference(&source, &target)
    );

    let post = artifact(&p.target, &t, &plan, &format!("schema/{s}/post-data.sql"));
    assert!(
        post.contains("CREATE INDEX idx_actor_last_name ON public.actor"),
        "{post}"
    );
    assert!(
        post.contains("ADD CONSTRAINT address_city_id_fkey FOREIGN KEY (city_id) REFERENCES public.city(city_id)"),
        "{post}"
    );
    assert!(post.contains("ADD CONSTRAINT film_pkey PRIMARY KEY (film_id)"));
    let pre = artifact(&p.target, &t, &plan, &format!("schema/{s}/pre-data.sql"));
    assert!(pre.contains("CREATE TABLE public.payment ("), "{pre}");
    assert!(!pre.contains("FOREIGN KEY"), "constraints are post-data");
    // The checkpoint records the dump.
    let detail = p.target.psql(
        &t,
        &format!(
            "SELECT value->>'pg_dump' || ' ' || (value->>'left_out_entries') FROM pgferry.checkpoints \
             WHERE migration = '{}' AND stage = 'schema' AND key = 'database:{s}'",
            plan.name
        ),
    );
    assert!(detail.ends_with(" 0"), "nothing left out: {detail}");
}

#[test]
fn a_partial_selection_takes_what_it_needs_and_nothing_else() {
    let p = pair();
    // A LATIN1 source, so that the target database provision creates must copy its settings.
    let s = format!("sel_src_{}", std::process::id());
    p.source.psql(
        "postgres",
        &format!(
            "CREATE DATABASE {s} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
        ),
    );
    p.source.psql(
        &s,
        "CREATE TABLE public.a (id int PRIMARY KEY, name text);
         CREATE TABLE public.c (id int PRIMARY KEY, v text CHECK (v <> ''));
         CREATE TABLE public.b (id int PRIMARY KEY, a_id int REFERENCES public.a (id), c_id int);
         ALTER TABLE public.b ADD CONSTRAINT b_c_fkey FOREIGN KEY (c_id) REFERENCES public.c (id);
         CREATE INDEX b_a_idx ON public.b (a_id);
         CREATE INDEX c_v_idx ON public.c (v);
         COMMENT ON TABLE public.c IS 'left out';
         COMMENT ON COLUMN public.c.v IS 'left out too';
         GRANT SELECT ON public.c TO PUBLIC;
         CREATE SEQUENCE public.c_seq OWNED BY public.c.id;
         ALTER TABLE public.a ALTER COLUMN id SET DEFAULT nextval('public.c_seq');
         CREATE VIEW public.cv AS SELECT * FROM public.c;
         CREATE VIEW public.cvv AS SELECT * FROM public.cv;
         CREATE VIEW public.av AS SELECT * FROM public.a;
         CREATE FUNCTION public.all_c() RETURNS SETOF public.c LANGUAGE sql AS 'SELECT * FROM public.c';
         CREATE TABLE public.p (id int PRIMARY KEY, k int) PARTITION BY RANGE (id);
         CREATE TABLE public.p1 PARTITION OF public.p FOR VALUES FROM (0) TO (10);
         CREATE INDEX p_k_idx ON public.p (k);",
    );
    let state = p.target.fresh_database("sel_state");
    let t = format!("{s}_tgt");
    let plan = TestPlan::new(p, "selection", &s, &t, STAGES);
    select(&plan, &["public.a", "public.b"], &[]);
    state_in(&plan, &state);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    no_password(&out);

    // provision created the target database with the source's settings.
    assert_eq!(
        p.target.psql(
            "postgres",
            &format!("SELECT pg_encoding_to_char(encoding) || ' ' || datcollate FROM pg_database WHERE datname = '{t}'")
        ),
        "LATIN1 C"
    );
    // a, b and the view over a; nothing of c, cv, cvv, p.
    assert_eq!(relations(&p.target, &t), "a,av,b");
    assert_eq!(
        p.target
            .psql(&t, "SELECT count(*) FROM pg_proc WHERE proname = 'all_c'"),
        "0"
    );
    // The sequence a's default uses is kept, though c owned it.
    assert_eq!(
        p.target.psql(&t, "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'public.a'::regclass"),
        "nextval('c_seq'::regclass)"
    );

    let post = artifact(
        &p.target,
        &state,
        &plan,
        &format!("schema/{s}/post-data.sql"),
    );
    assert!(
        post.contains("ADD CONSTRAINT b_a_id_fkey FOREIGN KEY (a_id) REFERENCES public.a(id)"),
        "{post}"
    );
    assert!(post.contains("CREATE INDEX b_a_idx ON public.b"), "{post}");
    for gone in [
        "public.c ",
        "public.c(",
        "b_c_fkey",
        "c_v_idx",
        "public.p ",
        "p_k_idx",
        "p1",
    ] {
        assert!(!post.contains(gone), "`{gone}` in the post-data:\n{post}");
    }
    let pre = artifact(
        &p.target,
        &state,
        &plan,
        &format!("schema/{s}/pre-data.sql"),
    );
    for gone in [
        "public.c ",
        "public.cv",
        "all_c",
        "left out",
        "OWNED BY public.c",
        "public.p ",
    ] {
        assert!(!pre.contains(gone), "`{gone}` in the pre-data:\n{pre}");
    }
    // The post-data section applies cleanly on top of what provision created.
    let file = plan.dir.path().join("post.sql");
    std::fs::write(&file, &post).unwrap();
    p.target.psql_file(&t, &file);
    assert_eq!(
        p.target.psql(&t, "SELECT string_agg(conname, ',' ORDER BY conname) FROM pg_constraint WHERE connamespace = 'public'::regnamespace"),
        "a_pkey,b_a_id_fkey,b_pkey"
    );
    // The checkpoint names what was left out beyond c's own objects.
    let detail = p.target.psql(
        &state,
        &format!(
            "SELECT string_agg(key || '=' || value::text, ' ') FROM pgferry.checkpoints \
             WHERE migration = '{}' AND stage = 'schema'",
            plan.name
        ),
    );
    for name in [
        "constraint b_c_fkey on table public.b",
        "view public.cv",
        "view public.cvv",
        "function public.all_c()",
    ] {
        assert!(detail.contains(name), "`{name}` not in {detail}");
    }
}

#[test]
fn provisioning_again_compares_and_refuses_a_drifted_target() {
    let p = pair();
    let s = p.source.fresh_database("again_src");
    let t = p.target.fresh_database("again_tgt");
    p.source.psql(
        &s,
        "CREATE TYPE public.mood AS ENUM ('sad', 'happy');
         CREATE TABLE public.a (id int PRIMARY KEY, m public.mood NOT NULL, note varchar(20));
         CREATE TABLE public.b (id bigint PRIMARY KEY, a_id int REFERENCES public.a (id));",
    );
    let plan = TestPlan::new(p, "again", &s, &t, STAGES);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let first = pre_data(&p.target, &t);
    assert!(first.contains("CREATE TABLE public.a"), "{first}");

    // Provisioning again finds the same tables and leaves them alone.
    let out = plan.run(&["run", "--rerun", "provision"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stderr(&out).contains("already exist on target database"),
        "{}",
        show(&out)
    );
    assert_eq!(pre_data(&p.target, &t), first);

    // A target that drifted is refused, with the difference.
    p.target
        .psql(&t, "ALTER TABLE public.a ADD COLUMN extra integer; ALTER TABLE public.b ALTER COLUMN a_id SET NOT NULL");
    let out = plan.run(&["run", "--rerun", "provision"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    no_password(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("target database `{t}` already has 2 of the 2 selected table(s), and the target does not match the source (2 difference(s))")),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("public.a: extra column `extra` (integer) on the target, not on the source"),
        "{}",
        show(&out)
    );
    assert!(
        err.contains(
            "public.b: column `a_id` is integer on the source but integer NOT NULL on the target"
        ),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("hint: drop the target database"),
        "{}",
        show(&out)
    );

    // existing = "refuse" refuses any selected table already there.
    plan.write(p, &format!("{STAGES}existing = \"refuse\"\n"));
    let out = plan.run(&["run", "--rerun", "provision"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    no_password(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("target database `{t}` already has 2 of the 2 selected table(s) (existing = \"refuse\"):\n  - public.a\n  - public.b")),
        "{}",
        show(&out)
    );
}

#[test]
fn the_publication_follows_the_selection() {
    let p = pair();
    let s = p.source.fresh_database("pub_src");
    let t = p.target.fresh_database("pub_tgt");
    p.source.psql(
        &s,
        "CREATE TABLE public.a (id int PRIMARY KEY);
         CREATE TABLE public.b (id int PRIMARY KEY);
         CREATE TABLE public.\"Mixed Case\" (id int PRIMARY KEY);
         CREATE TABLE public.p (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE public.p1 PARTITION OF public.p FOR VALUES FROM (0) TO (10);
         CREATE TABLE public.p2 PARTITION OF public.p FOR VALUES FROM (10) TO (20);",
    );
    let stages = format!("{STAGES}\n[stages.cdc]\nkind = \"cdc\"\nafter = [\"provision\"]\n");
    let plan = TestPlan::new(p, "pub", &s, &t, &stages);
    select(&plan, &["public.a", "public.Mixed Case", "public.p"], &[]);
    let out = plan.run(&["run", "--until", "provision"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let published = || {
        p.source.psql(
            &s,
            "SELECT string_agg(schemaname || '.' || tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = 'pgferry_pub'",
        )
    };
    assert_eq!(published(), "public.Mixed Case,public.a,public.p");
    assert_eq!(
        p.source.psql(
            &s,
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'pgferry_pub'"
        ),
        "t"
    );
    // The publication stays on the source: it is not part of the target's schema.
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FROM pg_publication"),
        "0"
    );

    // A narrower selection: the tables still there match, and the publication follows.
    plan.write(p, &stages);
    select(&plan, &["public.a", "public.p"], &[]);
    let out = plan.run(&["run", "--until", "provision", "--rerun", "pre"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(published(), "public.a,public.p");
    // The second dump saw the publication on the source, and left it out.
    let post = artifact(&p.target, &t, &plan, &format!("schema/{s}/post-data.sql"));
    assert!(post.contains("ALTER TABLE ONLY public.a"), "{post}");
    assert!(!post.contains("PUBLICATION"), "{post}");
}

#[test]
fn a_failing_schema_leaves_nothing_behind() {
    let p = pair();
    let s = p.source.fresh_database("fail_src");
    let t = p.target.fresh_database("fail_tgt");
    p.source.psql(
        &s,
        "CREATE TABLE public.a (id int PRIMARY KEY);
         CREATE TABLE public.b (id int PRIMARY KEY);
         CREATE SEQUENCE public.zz_seq;",
    );
    // Not a selected table, so the comparison does not see it; the script fails after a and b.
    p.target.psql(&t, "CREATE SEQUENCE public.zz_seq");
    let plan = TestPlan::new(p, "failing", &s, &t, STAGES);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    no_password(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("error: stage `provision`, target database `{t}`: psql failed (exit status: 3) applying the pre-data schema (in one transaction, so nothing of it was applied):")),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("ERROR:  relation \"zz_seq\" already exists"),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("hint: the target already has an object of that name"),
        "{}",
        show(&out)
    );
    assert_eq!(
        relations(&p.target, &t),
        "",
        "nothing of the schema was applied"
    );
    // The recorded error and the run log do not show the password either.
    let recorded = p.target.psql(
        &t,
        "SELECT coalesce(string_agg(error, ''), '') || (SELECT string_agg(message, '') FROM pgferry.events) FROM pgferry.stages",
    );
    assert!(recorded.contains("zz_seq"), "{recorded}");
    assert!(!recorded.contains(PASSWORD));

    // Fixed, the next run applies it.
    p.target.psql(&t, "DROP SEQUENCE public.zz_seq");
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(relations(&p.target, &t), "a,b");
}

#[test]
fn a_failing_pg_dump_says_why_and_cleans_up() {
    let p = pair();
    let s = p.source.fresh_database("dumpfail_src");
    let t = p.target.fresh_database("dumpfail_tgt");
    let role = format!("limited_{}", std::process::id());
    p.source.psql(
        &s,
        &format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}';
             CREATE TABLE public.secret (id int PRIMARY KEY);
             REVOKE ALL ON public.secret FROM PUBLIC;"
        ),
    );
    let plan = TestPlan::new(
        p,
        "dumpfail",
        &s,
        &t,
        "[stages.schema]\nkind = \"schema_dump\"\n",
    );
    let text = std::fs::read_to_string(&plan.path).unwrap().replacen(
        &format!("postgres://postgres@127.0.0.1:{}", p.source.port),
        &format!("postgres://{role}@127.0.0.1:{}", p.source.port),
        1,
    );
    std::fs::write(&plan.path, text).unwrap();
    let child = plan.spawn(&["run"]);
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    no_password(&out);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("error: stage `schema`, source database `{s}`: pg_dump failed (exit status: 1) dumping the schema of source database `{s}`:")),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("permission denied for table secret"),
        "{}",
        show(&out)
    );
    assert!(
        err.contains("hint: pg_dump must be able to read every object"),
        "{}",
        show(&out)
    );
    // The private temporary directory is gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("pgferry-schema-{pid}-")))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}
