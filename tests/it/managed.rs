//! Managed services as they are: migrations run with roles that are not superusers on either side
//! (`tests/support/managed.rs` builds them on the local clusters; `docs/managed-services.md` maps
//! them to Azure, RDS/Aurora and Cloud SQL). The target's admin may not set
//! `session_replication_role`, so cdc applies in the managed mode (`src/stages/cdc/managed.rs`):
//! user triggers disabled and foreign keys dropped while it applies, put back by the cutover.

use std::time::Duration;

use crate::support::managed::{
    self, APP_WRITER, SOURCE_ROLE, TARGET_ADMIN, assert_same_managed, make_managed_source,
    managed_plan, psql_as,
};
use crate::support::{self, PASSWORD, Writer, WriterSpec, pair, show};

const ONLINE: &str = "[stages.schema]\nkind = \"schema_dump\"\nno_owner = true\nno_privileges = true\n\n\
    [stages.preflight]\nkind = \"preflight\"\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\", \"preflight\"]\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\njobs = 2\n\n\
    [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\njobs = 2\n\n\
    [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
    [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\nmax_lag = \"1s\"\nquiet_for = \"1s\"\nfence = \"read_only\"\n\n\
    [stages.sequences]\nkind = \"sequence_reset\"\nafter = [\"cutover\"]\n\n\
    [stages.check]\nkind = \"validate\"\nafter = [\"sequences\"]\n\n\
    [stages.cleanup]\nkind = \"cleanup\"\nafter = [\"check\"]\n";

/// The fence's refusals of the application: read-only (25006), a session ended (57P01), and for
/// `revoke_writes` a privilege it no longer has (42501).
const FENCED_BY: &[&str] = &["25006", "57P01", "42501"];

/// The application, writing to Pagila as [`APP_WRITER`] (DML privileges only) until the fence stops
/// it: changes that would fire Pagila's `last_updated` triggers, and rows whose foreign keys the
/// grouped apply reorders (a payment for a new customer, then the customer's deletion).
fn writer(db: String, statement: fn(i64) -> String) -> Writer {
    Writer::start(
        WriterSpec {
            name: "the application",
            port: pair().source.port,
            db,
            user: Some(APP_WRITER),
            every: Duration::from_millis(10),
            fenced_by: FENCED_BY,
        },
        move |i| statement(i as i64),
    )
}

/// The application's statements on Pagila.
fn pagila_statement(i: i64) -> String {
    let customer = (i % 599) + 1;
    match i % 6 {
        0 => format!(
            "INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date) \
             VALUES ({customer}, 1, {}, 0.42, '2022-03-15 10:00:00+00')",
            (i % 16000) + 1
        ),
        1 => format!(
            "UPDATE public.customer SET email = 'writer{i}@example.com' WHERE customer_id = {customer}"
        ),
        2 => format!(
            "BEGIN; INSERT INTO public.actor (first_name, last_name) VALUES ('Writer', 'No {i}'); \
             INSERT INTO public.film_actor (actor_id, film_id) VALUES (currval('public.actor_actor_id_seq'), {}); COMMIT",
            (i % 1000) + 1
        ),
        3 => "BEGIN; DELETE FROM public.film_actor WHERE actor_id = (SELECT max(actor_id) FROM public.actor WHERE first_name = 'Writer'); \
              DELETE FROM public.actor WHERE actor_id = (SELECT max(actor_id) FROM public.actor WHERE first_name = 'Writer'); COMMIT"
            .into(),
        4 => format!(
            "UPDATE public.film SET rental_rate = rental_rate + 0.01 WHERE film_id = {}",
            (i % 1000) + 1
        ),
        _ => format!("INSERT INTO public.scratch VALUES ({i}, 'row {i}')"),
    }
}

/// A Pagila source database as on a managed service, with a large object and an unlogged table.
fn managed_pagila(prefix: &str) -> Option<String> {
    let p = pair();
    let s = p.source.fresh_database(prefix);
    if !support::load_pagila(&p.source, &s) {
        return None;
    }
    p.source.psql(
        &s,
        "CREATE TABLE public.scratch (id bigint PRIMARY KEY, v text);
         CREATE UNLOGGED TABLE public.cache (k bigint PRIMARY KEY, v text);
         INSERT INTO public.cache SELECT g, 'initial' FROM generate_series(1, 50) g;
         SELECT lo_from_bytea(0, convert_to(repeat('a large object in Pagila; ', 2000), 'UTF8'));
         REFRESH MATERIALIZED VIEW public.rental_by_category;",
    );
    make_managed_source(&p.source, &s);
    Some(s)
}

fn counter(tdb: &str, plan: &str, scope: &str, name: &str) -> String {
    pair().target.psql(
        tdb,
        &format!(
            "SELECT coalesce(max(value), -1) FROM pgferry.counters WHERE migration = '{plan}' AND scope = '{scope}' AND name = '{name}'"
        ),
    )
}

/// The roles are what the services give: no superuser, no SET on session_replication_role.
#[test]
fn the_managed_roles_are_not_superusers() {
    let p = pair();
    managed::managed_pair(p);
    for (c, role) in [(&p.target, TARGET_ADMIN), (&p.source, SOURCE_ROLE)] {
        assert_eq!(
            psql_as(
                c,
                role,
                "postgres",
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            )
            .unwrap(),
            "f"
        );
        let refused = psql_as(
            c,
            role,
            "postgres",
            "SET session_replication_role = replica",
        )
        .expect_err("a managed role may not set session_replication_role");
        assert!(refused.contains("permission denied"), "{refused}");
    }
}

/// What one Pagila online run measured.
struct Measured {
    transactions: u64,
    applied: i64,
    downtime: f64,
    validate: f64,
}

/// Pagila online with the application writing and an automatic, fenced cutover, as the managed
/// roles (`managed`) or as the superuser; everything compared exactly.
fn pagila_online(managed: bool) -> Option<Measured> {
    let p = pair();
    let prefix = if managed {
        "mg_pagila_src"
    } else {
        "su_pagila_src"
    };
    let s = managed_pagila(prefix)?;
    let t = format!("{s}_tgt");
    let name = if managed { "mg_pagila" } else { "su_pagila" };
    let plan = if managed {
        managed_plan(p, name, &s, &t, ONLINE)
    } else {
        support::TestPlan::new(p, name, &s, &t, ONLINE)
    };

    let mut app = writer(s.clone(), pagila_statement);
    let out = plan.run(&["run"]);
    let n = app.stop();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mode = if managed {
        "apply mode: managed"
    } else {
        "apply mode: replica"
    };
    assert!(stderr.contains(mode), "{stderr}");
    assert!(app.fenced(), "the fence stopped the application");
    assert!(n > 50, "the application wrote only {n} transactions");

    let owner = if managed { TARGET_ADMIN } else { "postgres" };
    assert_eq!(
        p.target.psql(
            "postgres",
            &format!("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{t}'")
        ),
        owner,
        "provision created the target database as the plan's role"
    );
    if managed {
        // cdc applied in the managed mode, held the triggers and foreign keys, and the cutover put
        // them all back, validated.
        assert_eq!(counter(&t, name, &s, "managedApply"), "1");
        assert_eq!(counter(&t, name, &s, "heldTriggers"), "0");
        assert_eq!(counter(&t, name, &s, "heldForeignKeys"), "0");
        assert_eq!(counter(&t, name, &s, "unvalidatedForeignKeys"), "0");
        assert_eq!(
            p.target.psql(&t, "SELECT count(*) FROM pgferry.cdc_held"),
            "0"
        );
    } else {
        assert_eq!(counter(&t, name, &s, "managedApply"), "-1");
    }
    let applied: i64 = p
        .target
        .psql(&t, &format!("SELECT coalesce(sum(value), 0) FROM pgferry.counters WHERE migration = '{name}' AND scope = '{s}' AND name = 'totalChangesApplied'"))
        .parse()
        .expect("a number");
    assert!(applied > 0, "cdc applied nothing");
    assert_eq!(trigger_facts(&p.source, &s), trigger_facts(&p.target, &t));

    // Rows (the triggers did not touch last_update), sequences, large objects and the schema.
    assert_same_managed(p, &s, &t);

    let key = format!("database:{s}");
    let detail = p.target.psql(
        &t,
        &format!("SELECT value::text FROM pgferry.checkpoints WHERE migration = '{name}' AND stage = 'cutover' AND key = '{key}'"),
    );
    let v: serde_json::Value = serde_json::from_str(&detail).expect("cutover detail");
    let downtime = v["downtime_seconds"].as_f64().expect("downtime");
    let validate = if managed {
        let restored = v["resync"]["held_restored"].as_array().map_or(0, Vec::len);
        assert!(restored > 0, "{detail}");
        v["managed_apply"]["validate_seconds"]
            .as_f64()
            .expect("validate time")
    } else {
        assert!(v["managed_apply"].is_null(), "{detail}");
        0.0
    };
    Some(Measured {
        transactions: n,
        applied,
        downtime,
        validate,
    })
}

/// `disabled triggers:triggers:valid foreign keys` of a database.
fn trigger_facts(c: &support::Cluster, db: &str) -> String {
    let facts = c.psql(
        db,
        "SELECT (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgenabled <> 'O') || ':' || \
                (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal) || ':' || \
                (SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND convalidated)",
    );
    assert!(!facts.ends_with(":0"), "Pagila has foreign keys: {facts}");
    facts
}

/// The Pagila online migration with the application writing and a fenced cutover, as the managed
/// roles on both sides, then (for the figures beside it) as the superuser; prints what each
/// measured.
#[test]
fn pagila_online_with_managed_roles_on_both_sides() {
    let Some(m) = pagila_online(true) else {
        return;
    };
    let Some(su) = pagila_online(false) else {
        return;
    };
    for (mode, r) in [("managed", &m), ("superuser (replica)", &su)] {
        eprintln!(
            "[measure] {mode}: {} application transactions, {} changes applied, write downtime {:.2}s, foreign keys validated after it in {:.2}s",
            r.transactions, r.applied, r.downtime, r.validate
        );
    }
    assert!(
        m.downtime < 5.0,
        "managed mode's write downtime {:.2}s",
        m.downtime
    );
}

/// A runner killed while cdc applies in the managed mode (inside a target transaction, held at a
/// gate) leaves the triggers disabled and the foreign keys dropped *with their record*; the run
/// resumed applies every change once, and the cutover puts everything back.
#[test]
fn killed_during_managed_cdc_then_resumed() {
    let p = pair();
    let Some(s) = managed_pagila("mg_kill_src") else {
        return;
    };
    let t = format!("{s}_tgt");
    let name = "mg_kill";
    let stages = ONLINE.replace("approval = \"auto\"", "approval = \"manual\"");
    let plan = managed_plan(p, name, &s, &t, &stages);
    let mut child = plan.spawn(&["run"]);
    // The run creates the target database (its store lives there) before anything can be read.
    support::wait_for("the target database", Duration::from_secs(60), || {
        p.target.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{t}'"),
        ) == "1"
    });
    plan.wait_until_cdc_ready(p, &mut child);
    let held = p.target.psql(&t, "SELECT count(*) FILTER (WHERE kind = 'trigger') || ':' || count(*) FILTER (WHERE kind = 'foreign_key') FROM pgferry.cdc_held");
    let fks = p
        .target
        .psql(&t, "SELECT count(*) FROM pg_constraint WHERE contype = 'f'");
    assert_eq!(fks, "0", "cdc dropped the foreign keys (held {held})");
    assert_ne!(held, "0:0");

    // A backlog, applied up to a gate on public.actor, where the runner is killed.
    support::Gate::install(&p.target, &t, "public.actor");
    let gate = support::Gate::close(&p.target, &t);
    psql_as(
        &p.source,
        APP_WRITER,
        &s,
        "BEGIN;
         UPDATE public.customer SET email = 'kill' || customer_id || '@example.com' WHERE customer_id <= 100;
         INSERT INTO public.actor (first_name, last_name) SELECT 'Kill', 'No ' || g FROM generate_series(1, 50) g;
         INSERT INTO public.film_actor (actor_id, film_id) SELECT actor_id, 1 FROM public.actor WHERE first_name = 'Kill';
         COMMIT;
         DELETE FROM public.film_actor WHERE actor_id IN (SELECT actor_id FROM public.actor WHERE first_name = 'Kill' AND last_name LIKE 'No 1%');
         DELETE FROM public.actor WHERE first_name = 'Kill' AND last_name LIKE 'No 1%';
         INSERT INTO public.payment (customer_id, staff_id, rental_id, amount, payment_date) VALUES (1, 1, 1, 9.99, '2022-03-15 10:00:00+00');",
    )
    .expect("the application's backlog");
    gate.wait_blocked(&p.target, "pgferry cdc%", Duration::from_secs(60));
    child.kill().expect("SIGKILL the runner");
    let _ = child.wait();
    gate.open();
    support::wait_for(
        "the killed run's sessions to end",
        Duration::from_secs(30),
        || {
            p.target.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{t}' AND application_name LIKE 'pgferry %'"),
        ) == "0"
        },
    );
    support::Gate::uninstall(&p.target, &t, "public.actor");
    // The crash left the target held, and the record says so.
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FILTER (WHERE kind = 'trigger') || ':' || count(*) FILTER (WHERE kind = 'foreign_key') FROM pgferry.cdc_held"),
        held
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgenabled = 'D'"
        ),
        held.split(':').next().unwrap()
    );

    // Resumed, with the cutover approved.
    let mut child = plan.spawn(&["run"]);
    plan.wait_until_cdc_ready(p, &mut child);
    let approve = plan.run(&["cutover"]);
    assert_eq!(approve.status.code(), Some(0), "{}", show(&approve));
    let out = child.wait_with_output().expect("the resumed run");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FROM pgferry.cdc_held"),
        "0"
    );
    assert_eq!(trigger_facts(&p.source, &s), trigger_facts(&p.target, &t));
    assert_same_managed(p, &s, &t);
}

/// A small application database: a foreign key and a trigger on it, owned by the application.
const SMALL: &str = "CREATE TABLE public.parent (id int PRIMARY KEY, v text);
     CREATE TABLE public.child (id int PRIMARY KEY, parent int REFERENCES public.parent DEFERRABLE INITIALLY DEFERRED, v text);
     CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.v := NEW.v || ' (stamped)'; RETURN NEW; END $$;
     CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON public.child FOR EACH ROW EXECUTE FUNCTION public.stamp();
     INSERT INTO public.parent SELECT g, 'p' || g FROM generate_series(1, 100) g;
     INSERT INTO public.child SELECT g, 1 + g % 100, 'c' || g FROM generate_series(1, 500) g;";

/// While cdc applies in the managed mode, `status` says so and what it holds; a runner killed then
/// leaves the target held, and `reset --keep-target` puts the trigger and the foreign key back
/// (validated) on the target it keeps.
#[test]
fn status_shows_the_managed_mode_and_reset_keep_target_puts_everything_back() {
    let p = pair();
    let s = p.source.fresh_database("mg_reset_src");
    p.source.psql(&s, SMALL);
    make_managed_source(&p.source, &s);
    let t = format!("{s}_tgt");
    let plan = managed_plan(
        p,
        "mg_reset",
        &s,
        &t,
        "[stages.schema]\nkind = \"schema_dump\"\nno_owner = true\nno_privileges = true\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\n",
    );
    let mut child = plan.spawn(&["run"]);
    managed::wait_for_database(&p.target, &t);
    plan.wait_until_cdc_ready(p, &mut child);
    let held = "SELECT (SELECT string_agg(tgname || ' ' || tgenabled::text, ',') FROM pg_trigger WHERE NOT tgisinternal) || ' | ' || \
                (SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND convalidated)";
    assert_eq!(p.target.psql(&t, held), "stamp D | 0");
    // Changes the trigger must not touch again, and a child whose parent comes later in the same
    // transaction (reordered by the grouped apply: the foreign key is not there to refuse it).
    psql_as(
        &p.source,
        APP_WRITER,
        &s,
        "BEGIN; INSERT INTO public.child VALUES (1000, 1000, 'late parent'); INSERT INTO public.parent VALUES (1000, 'p'); COMMIT;
         UPDATE public.child SET v = 'updated' WHERE id <= 10;",
    )
    .expect("the application's changes");
    let digest = |c: &support::Cluster, db: &str| support::row_digest(c, db, "public.child");
    support::wait_for("cdc to apply the changes", Duration::from_secs(60), || {
        digest(&p.target, &t) == digest(&p.source, &s)
    });

    let out = plan.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mode      managed (no session_replication_role): 1 trigger(s)/rule(s) disabled and 1 foreign key(s) dropped"),
        "{}",
        show(&out)
    );
    let out = plan.run(&["status", "--json"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"heldForeignKeys\": 1"), "{json}");

    child.kill().expect("SIGKILL the runner");
    let _ = child.wait();
    assert_eq!(
        p.target.psql(&t, held),
        "stamp D | 0",
        "held across the crash"
    );
    let out = plan.run(&["reset", "--yes", "--keep-target"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("trigger stamp of public.child is enabled again"),
        "{}",
        show(&out)
    );
    assert!(
        stdout.contains("foreign key child_parent_fkey of public.child validated"),
        "{}",
        show(&out)
    );
    assert_eq!(p.target.psql(&t, held), "stamp O | 1");
    assert_eq!(digest(&p.target, &t), digest(&p.source, &s));
}

/// A session of the superuser, held open on `db` until [`end_session`].
fn superuser_session(c: &support::Cluster, db: &str) -> std::process::Child {
    let child = c
        .psql_command(db)
        .arg("-c")
        .arg("SELECT pg_sleep(300)")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    support::wait_for("the superuser's session", Duration::from_secs(30), || {
        c.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE 'SELECT pg_sleep(300)%' AND pid <> pg_backend_pid()"),
        ) == "1"
    });
    child
}

/// Ends the session [`superuser_session`] opened (its server process too: pg_sleep does not notice
/// its client is gone).
fn end_session(c: &support::Cluster, db: &str, mut child: std::process::Child) {
    c.psql(
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND query LIKE 'SELECT pg_sleep(300)%' AND pid <> pg_backend_pid()"),
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Preflight, as a managed source's role: says what it is and may do, names a selected table it
/// does not own (the publication needs ownership) and the sessions the fence could not end.
#[test]
fn preflight_names_what_a_managed_source_role_cannot_do() {
    let p = pair();
    let s = p.source.fresh_database("mg_pre_src");
    p.source.psql(&s, SMALL);
    make_managed_source(&p.source, &s);
    p.source.psql(
        &s,
        "CREATE TABLE public.not_ours (id int PRIMARY KEY); GRANT SELECT ON public.not_ours TO app_owner;",
    );
    let t = format!("{s}_tgt");
    let plan = managed_plan(
        p,
        "mg_pre",
        &s,
        &t,
        "[stages.pre]\nkind = \"preflight\"\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"pre\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\nfence = \"read_only\"\n",
    );
    // A target database someone else made, with a table the managed admin does not own.
    p.target
        .psql("postgres", &format!("CREATE DATABASE \"{t}\""));
    p.target.psql(
        &t,
        &format!("CREATE TABLE public.theirs (id int); GRANT CREATE ON DATABASE \"{t}\" TO {TARGET_ADMIN}"),
    );
    let session = superuser_session(&p.source, &s);
    let out = plan.run(&["run", "--until", "pre"]);
    end_session(&p.source, &s, session);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for wording in [
        "source role ferry_source does not own 1 selected table(s) (nor has their owner's privileges), which the publication (CREATE PUBLICATION ... FOR TABLE) needs: public.not_ours",
        "sessions of role(s) postgres (1) are connected to source database",
        "source role ferry_source is not a superuser: REPLICATION yes, owns 2 of 3 selected table(s); the fence ends the application's sessions as a member of pg_signal_backend",
        "apply mode: managed (target role ferry_admin is not a superuser",
        "target role ferry_admin does not own 1 table(s) of target database",
    ] {
        assert!(
            stderr.contains(wording),
            "preflight does not say {wording:?}:\n{}",
            show(&out)
        );
    }
}

/// The cutover, as a managed source's role, refuses to go on past the fence while a session it may
/// not end (the superuser's) is connected, and makes the source writable again; without it, the
/// same run finishes with the target equal.
#[test]
fn the_fence_refuses_sessions_it_cannot_end_and_unfences() {
    let p = pair();
    let s = p.source.fresh_database("mg_fence_src");
    p.source.psql(&s, SMALL);
    make_managed_source(&p.source, &s);
    let t = format!("{s}_tgt");
    let plan = managed_plan(
        p,
        "mg_fence",
        &s,
        &t,
        "[stages.schema]\nkind = \"schema_dump\"\nno_owner = true\nno_privileges = true\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\nmax_lag = \"1s\"\nquiet_for = \"0s\"\nfence = \"read_only\"\n",
    );
    let session = superuser_session(&p.source, &s);
    let out = plan.run(&["run"]);
    end_session(&p.source, &s, session);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "the fence cannot end the sessions of role(s) postgres (1) on source database"
        ) && stderr.contains("is writable again"),
        "{}",
        show(&out)
    );
    assert_eq!(
        p.source.psql("postgres", &format!("SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase WHERE d.datname = '{s}'")),
        "0",
        "the fence was lifted"
    );
    psql_as(
        &p.source,
        APP_WRITER,
        &s,
        "UPDATE public.child SET v = 'after the refusal' WHERE id = 1",
    )
    .expect("the application writes again");
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for table in ["public.parent", "public.child"] {
        assert_eq!(
            support::row_digest(&p.target, &t, table),
            support::row_digest(&p.source, &s, table)
        );
    }
    // reset after the cutover, as the managed roles: the slot and the publication go (a target
    // that went through a real cutover is kept: --keep-target).
    let out = plan.run(&["reset", "--yes", "--keep-target"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        p.source.psql(&s, "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry_mg_fence%') + (SELECT count(*) FROM pg_publication)"),
        "0"
    );
}

/// The source role of a service that lets it own the application's tables but neither alter the
/// database nor end other roles' sessions: REPLICATION, member of [`managed::APP_OWNER`] only.
const MINIMAL_SOURCE: &str = "ferry_minimal";

/// `fence = "revoke_writes"`, as a role that may not make the database read-only nor end the
/// application's session: the application, connected across the fence, is refused (42501) instead;
/// the target is equal; `pgferry unfence` gives every privilege back as it was.
#[test]
fn the_revoke_writes_fence_stops_an_application_it_cannot_disconnect() {
    let p = pair();
    let s = p.source.fresh_database("mg_revoke_src");
    p.source.psql(&s, SMALL);
    make_managed_source(&p.source, &s);
    p.source.psql(
        &s,
        &format!(
            "ALTER DATABASE \"{s}\" OWNER TO postgres; GRANT CREATE ON DATABASE \"{s}\" TO {};
             DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{MINIMAL_SOURCE}') THEN
                 CREATE ROLE {MINIMAL_SOURCE} LOGIN REPLICATION PASSWORD '{PASSWORD}' IN ROLE {};
               END IF;
             END $$;",
            managed::APP_OWNER,
            managed::APP_OWNER
        ),
    );
    let acl = "SELECT string_agg(c.relname || '=' || coalesce(c.relacl::text, '-'), ' ' ORDER BY c.relname) \
               FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'S')";
    let before = p.source.psql(&s, acl);
    let t = format!("{s}_tgt");
    let plan = managed_plan(
        p,
        "mg_revoke",
        &s,
        &t,
        "[stages.pre]\nkind = \"preflight\"\n\n\
         [stages.schema]\nkind = \"schema_dump\"\nno_owner = true\nno_privileges = true\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\", \"pre\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"manual\"\nfence = \"revoke_writes\"\n",
    );
    let text = std::fs::read_to_string(&plan.path).expect("plan");
    std::fs::write(&plan.path, text.replace(SOURCE_ROLE, MINIMAL_SOURCE)).expect("plan");

    let mut app = writer(s.clone(), |i| {
        format!(
            "BEGIN; INSERT INTO public.parent VALUES ({} + 1000, 'app'); UPDATE public.child SET v = 'app {i}' WHERE id = {}; COMMIT",
            i,
            1 + i % 500
        )
    });
    let mut child = plan.spawn(&["run"]);
    managed::wait_for_database(&p.target, &t);
    plan.wait_until_cdc_ready(p, &mut child);
    let approve = plan.run(&["cutover"]);
    assert_eq!(approve.status.code(), Some(0), "{}", show(&approve));
    let out = child.wait_with_output().expect("the run");
    let n = app.stop();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(app.fenced(), "the application was refused by the fence");
    assert!(n > 10, "the application wrote only {n} transactions");
    // Fenced: nobody holds a write privilege; the database itself was not touched.
    assert_eq!(
        p.source.psql(&s, &format!("SELECT has_table_privilege('{APP_WRITER}', 'public.child', 'UPDATE')::text || has_table_privilege('{}', 'public.parent', 'INSERT')::text", managed::APP_OWNER)),
        "falsefalse"
    );
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "off"
    );
    for table in ["public.parent", "public.child"] {
        assert_eq!(
            support::row_digest(&p.target, &t, table),
            support::row_digest(&p.source, &s, table),
            "{table}"
        );
    }
    let out = plan.run(&["unfence"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("gave back"),
        "{}",
        show(&out)
    );
    assert_eq!(
        p.source.psql(&s, acl),
        before,
        "every privilege is back as it was"
    );
    psql_as(
        &p.source,
        APP_WRITER,
        &s,
        "UPDATE public.child SET v = 'after' WHERE id = 1",
    )
    .expect("the application writes again");
}

/// A rehearsal as the managed roles: the simulated cutover puts back what cdc held (the source is
/// never fenced), and a full `reset` then drops the rehearsal's target database, which the managed
/// admin created and owns, with the slot and the publication.
#[test]
fn a_managed_rehearsal_puts_everything_back_and_reset_drops_its_target() {
    let p = pair();
    let s = p.source.fresh_database("mg_reh_src");
    p.source.psql(&s, SMALL);
    make_managed_source(&p.source, &s);
    let t = format!("{s}_tgt");
    let plan = managed_plan(
        p,
        "mg_reh",
        &s,
        &t,
        "[stages.schema]\nkind = \"schema_dump\"\nno_owner = true\nno_privileges = true\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n\n\
         [stages.cutover]\nkind = \"cutover\"\nafter = [\"cdc\"]\napproval = \"auto\"\nmax_lag = \"1s\"\nquiet_for = \"0s\"\n",
    );
    let out = plan.run(&["run", "--rehearsal"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cdc applies to"),
        "{}",
        show(&out)
    );
    assert_eq!(
        p.source.psql(&s, "SHOW default_transaction_read_only"),
        "off"
    );
    let facts = "SELECT (SELECT string_agg(tgname || ' ' || tgenabled::text, ',') FROM pg_trigger WHERE NOT tgisinternal) || ' | ' || \
                 (SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND convalidated)";
    assert_eq!(p.target.psql(&t, facts), "stamp O | 1");
    assert_eq!(
        p.target.psql(&t, "SELECT count(*) FROM pgferry.cdc_held"),
        "0"
    );
    for table in ["public.parent", "public.child"] {
        assert_eq!(
            support::row_digest(&p.target, &t, table),
            support::row_digest(&p.source, &s, table)
        );
    }
    let out = plan.run(&["reset", "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // Dropped; the database of the same name now holds only the store, made again for the runs
    // and reports reset keeps.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("dropped target database {t}")),
        "{}",
        show(&out)
    );
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT count(*) FROM pg_class WHERE relname IN ('parent', 'child')"
        ),
        "0"
    );
    assert_eq!(
        p.source.psql(&s, "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgferry_mg_reh%') + (SELECT count(*) FROM pg_publication)"),
        "0"
    );
}
