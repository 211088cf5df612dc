//! Security against real clusters: a whole online plan (schema, provision, full load, cdc up to
//! ready, then more changes applied), run with the known test password at the default, debug and
//! trace log levels in text and JSON, plus a failing run: the password appears in no output, no
//! `status` (text or JSON), no table of the checkpoint store (a `pg_dump --data-only` of it) and no
//! argument of the child processes pgferry starts (pg_dump, pg_restore, psql are replaced by
//! wrappers on PATH that record their arguments and whether the password came by environment).
//! And the checkpoint schema is usable by the migration role only.
//!
//! The offline plan's outputs and store are covered by `offline_migration::password_never_leaks`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::{PASSWORD, PASSWORD_VAR, TestPlan, pair, row_digest, show};

/// The password without its last character (`!` percent-encodes as `%21`), so any spelling of it
/// — raw, percent-encoded, JSON-escaped — contains this.
fn secret() -> &'static str {
    let s = PASSWORD.trim_end_matches('!');
    assert!(s.len() > 8 && PASSWORD.starts_with(s));
    s
}

const SETUP: &str = "\
    CREATE TABLE public.accounts (id serial PRIMARY KEY, owner text NOT NULL, balance numeric(12, 2));\n\
    CREATE TABLE public.audit (at timestamptz NOT NULL DEFAULT now(), what text);\n\
    ALTER TABLE public.audit REPLICA IDENTITY FULL;\n\
    CREATE INDEX accounts_owner_idx ON public.accounts (owner);\n\
    INSERT INTO public.accounts (owner, balance) SELECT 'owner ' || g, g * 3.5 FROM generate_series(1, 500) g;\n\
    INSERT INTO public.audit (what) SELECT 'event ' || g FROM generate_series(1, 50) g;\n";

const STAGES: &str = "[stages.preflight]\nkind = \"preflight\"\n\n\
    [stages.schema]\nkind = \"schema_dump\"\nafter = [\"preflight\"]\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
    [stages.indexes]\nkind = \"post_data\"\nafter = [\"load\"]\n\n\
    [stages.cdc]\nkind = \"cdc\"\nafter = [\"indexes\"]\n";

/// Writes the plan with the password in the URL itself (the riskiest spelling: every place that
/// prints the URL must redact it) instead of the `password` key.
fn write_plan_with_password_in_url(plan: &TestPlan, stages: &str) {
    let p = pair();
    let text = format!(
        r#"version = 1
name = "{name}"

[source]
url = "postgres://postgres:{{{{ env.{var} }}}}@127.0.0.1:{sport}/{sdb}?sslmode=disable"

[target]
url = "postgres://postgres:{{{{ env.{var} }}}}@127.0.0.1:{tport}/{tdb}?sslmode=disable"

[[databases]]
name = "{sdb}"
target = "{tdb}"

{stages}
"#,
        name = plan.name,
        var = PASSWORD_VAR,
        sport = p.source.port,
        tport = p.target.port,
        sdb = plan.source_db,
        tdb = plan.target_db,
    );
    std::fs::write(&plan.path, text).expect("write plan");
}

/// A directory of `pg_dump`, `pg_restore` and `psql` wrappers that claim a newer version than the
/// installed ones (so pgferry picks them), append their arguments and whether PGPASSWORD /
/// PGPASSFILE were set to `log`, and run the real program.
fn wrapper_dir(dir: &Path, log: &Path) -> PathBuf {
    let real = pair().source.bindir.clone();
    let bin = dir.join("wrapped-bin");
    std::fs::create_dir_all(&bin).expect("wrapper dir");
    for tool in ["pg_dump", "pg_restore", "psql"] {
        let script = format!(
            "#!/bin/sh\n\
             if [ \"$1\" = \"--version\" ]; then echo '{tool} (PostgreSQL) 15.99'; exit 0; fi\n\
             {{ printf '%s' '{tool}'; for a in \"$@\"; do printf ' [%s]' \"$a\"; done; \
             printf ' PGPASSWORD=%s PGPASSFILE=%s\\n' \"${{PGPASSWORD:+set}}\" \"${{PGPASSFILE:+set}}\"; }} >> '{log}'\n\
             exec '{real}' \"$@\"\n",
            log = log.display(),
            real = real.join(tool).display(),
        );
        let path = bin.join(tool);
        std::fs::write(&path, script).expect("write wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    bin
}

fn assert_no_secret(label: &str, out: &Output) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains(secret()),
        "the password shows in the output of `{label}`:\n{}",
        show(out)
    );
}

fn tables(db: &str) -> Vec<String> {
    pair()
        .source
        .psql(
            db,
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables \
             WHERE schemaname = 'public' ORDER BY 1",
        )
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn online_plan_leaks_the_password_nowhere() {
    let p = pair();
    let s = p.source.fresh_database("sec_src");
    let t = p.target.fresh_database("sec_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(p, "sec_online", &s, &t, STAGES);
    write_plan_with_password_in_url(&plan, STAGES);
    let log = plan.dir.path().join("children.log");
    let bin = wrapper_dir(plan.dir.path(), &log);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut outputs: Vec<(String, Output)> = Vec::new();
    let run = |args: &[&str], format: &str, level: Option<&str>| -> (String, Output) {
        let mut c = plan.command(args);
        c.args(["--log-format", format]).env("PATH", &path);
        match level {
            Some(l) => c.env("RUST_LOG", l),
            None => c.env_remove("RUST_LOG"),
        };
        let out = c.output().expect("run pgferry");
        (
            format!("{} ({format} logs, level {level:?})", args.join(" ")),
            out,
        )
    };
    outputs.push(run(&["plan"], "text", Some("debug")));
    // Loads, then stops once cdc has caught up (nothing after cdc needs it).
    let first = run(&["run"], "json", Some("debug"));
    assert_eq!(first.1.status.code(), Some(0), "{}", show(&first.1));
    assert!(
        String::from_utf8_lossy(&first.1.stderr).contains("\"level\":\"DEBUG\""),
        "debug logs are on: {}",
        show(&first.1)
    );
    outputs.push(first);
    // Changes streamed by cdc on the next runs, at other levels and formats.
    p.source.psql(
        &s,
        "INSERT INTO public.accounts (owner, balance) VALUES ('late', 1);\n\
         UPDATE public.accounts SET balance = 0 WHERE id < 10;\n\
         DELETE FROM public.audit WHERE what = 'event 7';",
    );
    let second = run(&["run"], "text", None);
    assert_eq!(second.1.status.code(), Some(0), "{}", show(&second.1));
    outputs.push(second);
    p.source
        .psql(&s, "INSERT INTO public.audit (what) VALUES ('traced');");
    let third = run(&["run"], "json", Some("trace"));
    assert_eq!(third.1.status.code(), Some(0), "{}", show(&third.1));
    assert!(
        String::from_utf8_lossy(&third.1.stderr).contains("\"level\":\"TRACE\""),
        "trace logs are on"
    );
    outputs.push(third);
    for format in ["text", "json"] {
        outputs.push(run(&["status"], format, Some("debug")));
        outputs.push(run(&["status", "--json"], format, Some("debug")));
    }
    for (label, out) in &outputs {
        assert!(
            !out.stdout.is_empty() || !out.stderr.is_empty(),
            "{label} printed nothing"
        );
        assert_no_secret(label, out);
    }
    for table in tables(&s) {
        assert_eq!(
            row_digest(&p.source, &s, &table),
            row_digest(&p.target, &t, &table),
            "{table} differs"
        );
    }

    // A failing stage: the error path prints the server address, never the password.
    let failing = format!(
        "{STAGES}\n[stages.broken]\nkind = \"sql\"\non = \"target\"\nafter = [\"cdc\"]\nsql = \"SELECT no_such_function()\"\n"
    );
    write_plan_with_password_in_url(&plan, &failing);
    let (label, out) = run(&["run"], "text", Some("debug"));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no_such_function"),
        "{}",
        show(&out)
    );
    assert_no_secret(&label, &out);

    // The child processes: every call recorded, the password in none of their arguments, and
    // given to them through the environment. (provision sends Pagila's pre-data schema as one
    // message on its own session, so psql runs only where a script needs it; every child gets
    // its connection the same way, `ConnInfo::configure_child`.)
    let calls = std::fs::read_to_string(&log).expect("the wrappers recorded the child processes");
    assert!(
        calls.lines().any(|l| l.starts_with("pg_dump ")),
        "pgferry ran pg_dump through the wrappers:\n{calls}"
    );
    assert!(
        !calls.contains(secret()),
        "the password is in a child's arguments:\n{calls}"
    );
    // pg_restore without a database (`--list`, `--file`) turns a local archive into text and
    // connects nowhere.
    let connects =
        |l: &&str| !l.starts_with("pg_restore ") || l.contains("[--dbname") || l.contains("[-d]");
    for line in calls.lines().filter(connects) {
        assert!(
            line.ends_with("PGPASSWORD=set PGPASSFILE=") || line.ends_with("PGPASSFILE=set"),
            "the child got its password neither by PGPASSWORD nor by a passfile: {line}"
        );
    }

    // The whole checkpoint store, dumped.
    let dump = p.target.run_tool(
        "pg_dump",
        &t,
        &["--data-only", "--schema", "pgferry", "--no-owner"],
    );
    assert!(
        dump.contains("COPY pgferry.stages") && dump.contains("COPY pgferry.cdc_applied"),
        "{dump}"
    );
    assert!(
        !dump.contains(secret()),
        "the password is in the checkpoint store"
    );
}

/// The checkpoint schema (in the target database, created by the first run) is the migration
/// role's only: PUBLIC has no privilege on the schema, another role can read none of its tables.
#[test]
fn the_checkpoint_schema_is_private_to_the_migration_role() {
    let p = pair();
    let s = p.source.fresh_database("sec_priv_src");
    let t = p.target.fresh_database("sec_priv_tgt");
    p.source.psql(&s, SETUP);
    let plan = TestPlan::new(
        p,
        "sec_priv",
        &s,
        &t,
        "[stages.schema]\nkind = \"schema_dump\"\n\n\
         [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
         [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n\n\
         [stages.cdc]\nkind = \"cdc\"\nafter = [\"load\"]\n",
    );
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let role = format!("snoop_{}", std::process::id());
    p.target.psql(
        "postgres",
        &format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF; END $$"
        ),
    );
    // The schema's ACL holds the owner only: no PUBLIC (grantee 0), no other role.
    assert_eq!(
        p.target.psql(
            &t,
            "SELECT coalesce(string_agg(grantee::regrole::text, ','), 'none') FROM pg_namespace, aclexplode(nspacl) \
             WHERE nspname = 'pgferry' AND grantee <> nspowner"
        ),
        "none"
    );
    let tables = p.target.psql(
        &t,
        "SELECT string_agg(quote_ident(relname), ',' ORDER BY relname) FROM pg_class \
         WHERE relnamespace = 'pgferry'::regnamespace AND relkind IN ('r', 'p')",
    );
    let tables: Vec<&str> = tables.split(',').collect();
    assert!(
        tables.contains(&"stages") && tables.contains(&"cdc_applied") && tables.len() >= 8,
        "{tables:?}"
    );
    assert_eq!(
        p.target.psql(
            &t,
            &format!("SELECT has_schema_privilege('{role}', 'pgferry', 'USAGE, CREATE')")
        ),
        "f"
    );
    // Reading any table as the other role fails on the schema.
    for table in &tables {
        let sql = format!("SET ROLE {role}; SELECT count(*) FROM pgferry.{table}");
        let out = std::process::Command::new(p.target.bindir.join("psql"))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", &sql])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname={t}",
                p.target.port
            ))
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("psql");
        assert!(!out.status.success(), "{role} read pgferry.{table}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("permission denied for schema pgferry"),
            "pgferry.{table}: {err}"
        );
    }
}
