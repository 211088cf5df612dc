//! Managed services simulated on the local clusters: nobody is a superuser.
//!
//! - The **managed target**: [`TARGET_ADMIN`], LOGIN NOSUPERUSER CREATEDB CREATEROLE REPLICATION,
//!   member of the group role [`ADMIN_GROUP`] (like Azure Flexible Server's `azure_pg_admin`, RDS's
//!   `rds_superuser`, Cloud SQL's `cloudsqlsuperuser`), with no SET privilege on any
//!   superuser-only parameter (`session_replication_role` among them).
//! - The **managed source**: [`SOURCE_ROLE`], LOGIN NOSUPERUSER REPLICATION, member of
//!   [`ADMIN_GROUP`], of `pg_signal_backend` (the services' admin roles may end other roles'
//!   sessions) and of [`APP_OWNER`], the role that owns the application's database and every
//!   object in it ([`make_managed_source`]).
//! - The application writes as [`APP_WRITER`], a role with DML privileges only.
//!
//! `docs/managed-services.md` maps these to what each service grants. Every role's password is
//! [`PASSWORD`], so a plan reads it from the same environment variable as the superuser's.

use std::collections::HashSet;
use std::process::Command;
use std::sync::Mutex;

use super::cluster::{Cluster, PASSWORD, Pair};
use super::compare::{Snapshot, first_differences};
use super::plan::TestPlan;

/// The group role of the service's administrators.
pub const ADMIN_GROUP: &str = "managed_pg_admin";
/// The migration's role on the target: the service's admin login.
pub const TARGET_ADMIN: &str = "ferry_admin";
/// The migration's role on the source.
pub const SOURCE_ROLE: &str = "ferry_source";
/// The application's owner role (NOLOGIN): owns the source database and its objects.
pub const APP_OWNER: &str = "app_owner";
/// The application's login: reads and writes the tables, owns nothing.
pub const APP_WRITER: &str = "app_writer";

/// Creates the roles once per cluster (roles are cluster-wide; tests run in parallel).
fn roles_once(c: &Cluster, sql: &str) {
    static DONE: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    let set = done.get_or_insert_with(HashSet::new);
    if set.insert(c.port) {
        c.psql("postgres", sql);
    }
}

fn role_sql(admin: &str, extra: &str) -> String {
    format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ADMIN_GROUP}') THEN
             CREATE ROLE {ADMIN_GROUP} NOLOGIN;
           END IF;
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{admin}') THEN
             CREATE ROLE {admin} LOGIN NOSUPERUSER CREATEDB CREATEROLE REPLICATION PASSWORD '{PASSWORD}' IN ROLE {ADMIN_GROUP};
           END IF;
           {extra}
         END $$"
    )
}

/// The managed target's admin role on `c` ([`TARGET_ADMIN`]).
pub fn managed_target(c: &Cluster) {
    roles_once(c, &role_sql(TARGET_ADMIN, ""));
}

/// The managed source's roles on `c` ([`SOURCE_ROLE`], [`APP_OWNER`], [`APP_WRITER`]).
pub fn managed_source(c: &Cluster) {
    roles_once(
        c,
        &role_sql(
            SOURCE_ROLE,
            &format!(
                "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_OWNER}') THEN
                   CREATE ROLE {APP_OWNER} NOLOGIN;
                 END IF;
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_WRITER}') THEN
                   CREATE ROLE {APP_WRITER} LOGIN PASSWORD '{PASSWORD}';
                 END IF;
                 GRANT {APP_OWNER} TO {SOURCE_ROLE};
                 GRANT pg_signal_backend TO {SOURCE_ROLE};"
            ),
        ),
    );
}

/// Makes database `db` on `c` look like an application's database on a managed service: the
/// database and every object in it (schemas, tables, sequences, views, functions, types, large
/// objects) owned by [`APP_OWNER`], [`APP_WRITER`] allowed to read and write the tables. Load the
/// data as the superuser first (as a service's import would), then call this.
pub fn make_managed_source(c: &Cluster, db: &str) {
    managed_source(c);
    c.psql(
        db,
        &format!(
            r#"ALTER DATABASE "{db}" OWNER TO {APP_OWNER};
DO $$ DECLARE r record; BEGIN
  -- Schema public keeps its owner (the services leave it alone).
  FOR r IN SELECT n.nspname FROM pg_namespace n
            WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname NOT IN ('information_schema', 'public') LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO {APP_OWNER}', r.nspname);
  END LOOP;
  -- Tables (their owned sequences and indexes follow), views, materialized views, standalone
  -- sequences.
  FOR r IN SELECT c.oid::regclass AS rel, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
              AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
              AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                        AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
            ORDER BY c.oid LOOP
    EXECUTE format('ALTER %s %s OWNER TO {APP_OWNER}',
      CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                     WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.rel);
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure AS f, p.prokind FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') LOOP
    EXECUTE format('ALTER %s %s OWNER TO {APP_OWNER}', CASE r.prokind WHEN 'a' THEN 'AGGREGATE' WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, r.f);
  END LOOP;
  FOR r IN SELECT t.oid::regtype AS ty, t.typtype FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
              AND t.typtype IN ('d', 'e', 'r', 'c') AND t.typelem = 0
              AND (t.typtype <> 'c' OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype IN ('e', 'i')) LOOP
    EXECUTE format('ALTER %s %s OWNER TO {APP_OWNER}', CASE r.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, r.ty);
  END LOOP;
  FOR r IN SELECT oid FROM pg_largeobject_metadata LOOP
    EXECUTE format('ALTER LARGE OBJECT %s OWNER TO {APP_OWNER}', r.oid);
    EXECUTE format('GRANT SELECT, UPDATE ON LARGE OBJECT %s TO {APP_WRITER}', r.oid);
  END LOOP;
  FOR r IN SELECT n.nspname FROM pg_namespace n
            WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema' LOOP
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO {APP_WRITER}', r.nspname);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA %I TO {APP_WRITER}', r.nspname);
    EXECUTE format('GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %I TO {APP_WRITER}', r.nspname);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA %I TO {APP_WRITER}', r.nspname);
  END LOOP;
END $$;"#
        ),
    );
    // Nothing of the application is left to the superuser.
    let left = c.psql(
        db,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' \
            AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND pg_get_userbyid(c.relowner) = 'postgres'",
    );
    assert_eq!(left, "0", "every relation of {db} is owned by {APP_OWNER}");
}

/// Both sides of the shared pair as managed services: the roles exist.
pub fn managed_pair(p: &Pair) {
    managed_source(&p.source);
    managed_target(&p.target);
}

/// A plan like [`TestPlan::new`] that connects as [`SOURCE_ROLE`] to the source and as
/// [`TARGET_ADMIN`] to the target. The target database is not created here: provision creates it,
/// owned by the managed admin.
pub fn managed_plan(p: &Pair, name: &str, sdb: &str, tdb: &str, stages: &str) -> TestPlan {
    managed_pair(p);
    let plan = TestPlan::new(p, name, sdb, tdb, stages);
    rewrite_users(&plan, p);
    plan
}

/// Points an existing plan file at the managed roles (after [`TestPlan::write`]).
pub fn rewrite_users(plan: &TestPlan, p: &Pair) {
    let text = std::fs::read_to_string(&plan.path).expect("read plan");
    let text = text
        .replace(
            &format!("postgres://postgres@127.0.0.1:{}/", p.source.port),
            &format!("postgres://{SOURCE_ROLE}@127.0.0.1:{}/", p.source.port),
        )
        .replace(
            &format!("postgres://postgres@127.0.0.1:{}/", p.target.port),
            &format!("postgres://{TARGET_ADMIN}@127.0.0.1:{}/", p.target.port),
        );
    assert!(text.contains(SOURCE_ROLE) && text.contains(TARGET_ADMIN));
    std::fs::write(&plan.path, text).expect("write plan");
}

/// `psql -At -c sql` on `c` as `user` (password [`PASSWORD`]); stdout, or the error text.
pub fn psql_as(c: &Cluster, user: &str, db: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(c.tools_bindir.join("psql"));
    for k in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSFILE",
        "PGSERVICE",
        "PGOPTIONS",
        "PGSSLMODE",
    ] {
        cmd.env_remove(k);
    }
    let out = cmd
        .arg("-X")
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg("-At")
        .arg("--dbname")
        .arg(format!(
            "host=127.0.0.1 port={} user={user} dbname='{}'",
            c.port,
            db.replace('\\', "\\\\").replace('\'', "\\'")
        ))
        .arg("-c")
        .arg(sql)
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `pg_dump --schema-only --no-owner --no-privileges`: on a managed service the target's objects
/// belong to the service's admin, the source's to the application's owner, and the application's
/// roles do not exist on the target.
fn schema_without_owners(c: &Cluster, db: &str) -> String {
    super::cluster::strip_restrict(&c.run_tool(
        "pg_dump",
        db,
        &[
            "--schema-only",
            "--exclude-schema=pgferry",
            "--no-owner",
            "--no-privileges",
        ],
    ))
    .lines()
    .filter(|l| !l.starts_with("-- Dumped from database version"))
    .collect::<Vec<_>>()
    .join("\n")
    // A source whose schema public has another owner than the default (Pagila gives it to
    // postgres) has this entry; without owners it says nothing.
    .replace(
        "--\n-- Name: public; Type: SCHEMA; Schema: -; Owner: -\n--\n\n-- *not* creating schema, since initdb creates it\n\n\n",
        "",
    )
}

/// Like `compare::assert_same_on` (same major versions): every table's rows, every sequence, the
/// large objects and the schema equal, the schema compared without owners and privileges.
pub fn assert_same_managed(p: &Pair, sdb: &str, tdb: &str) {
    let (source, target) = std::thread::scope(|scope| {
        let source = scope.spawn(|| Snapshot::take(&p.source, sdb));
        let target = scope.spawn(|| Snapshot::take(&p.target, tdb));
        (
            source.join().expect("reading the source"),
            target.join().expect("reading the target"),
        )
    });
    assert!(source.tables.len() > 1, "{:?}", source.tables);
    assert_eq!(
        source.tables, target.tables,
        "the same tables on both sides"
    );
    for ((quoted, _), (s, t)) in source
        .tables
        .iter()
        .zip(source.digests.iter().zip(&target.digests))
    {
        assert_eq!(s, t, "table {quoted} differs (count:md5)");
    }
    assert!(source.total_rows() > 0);
    assert_eq!(source.sequences, target.sequences, "sequences differ");
    assert_eq!(
        source.large_objects, target.large_objects,
        "large objects differ"
    );
    let (s, t) = (
        schema_without_owners(&p.source, sdb),
        schema_without_owners(&p.target, tdb),
    );
    assert!(s.contains("CREATE TABLE"));
    assert!(
        s == t,
        "the target's schema differs from the source's: {}",
        first_differences(&s, &t)
    );
    eprintln!(
        "[test] {sdb} vs {tdb} (managed roles): {} tables, {} rows, {} sequences, {} schema lines equal",
        source.tables.len(),
        source.total_rows(),
        source.sequences.len(),
        s.lines().count()
    );
}

/// Waits until database `db` exists on `c` (a managed plan's run creates its target database, where
/// its store lives).
pub fn wait_for_database(c: &Cluster, db: &str) {
    super::plan::wait_for(
        "the target database",
        std::time::Duration::from_secs(60),
        || {
            c.psql(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_database WHERE datname = '{}'",
                    db.replace('\'', "''")
                ),
            ) == "1"
        },
    );
}
