//! A gate a test holds to stop the cdc apply exactly where it wants it, instead of hoping to catch
//! the apply inside a timing window that a faster implementation could close.
//!
//! [`Gate::close`] takes an exclusive advisory lock in a session of its own (a `psql` child kept
//! open on a pipe). [`Gate::install`] puts an `ENABLE ALWAYS` trigger on a target table whose
//! function takes the same lock shared: ALWAYS triggers fire under `session_replication_role =
//! replica` too, so the apply blocks on the first row it writes to that table and stays blocked,
//! however fast it is, until the gate opens ([`Gate::open`], or the holding session ends: dropped
//! gate, server restart). [`Gate::wait_blocked`] waits for the apply to be stopped there.

use std::io::Write as _;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::cluster::Cluster;
use super::plan::wait_for;

/// The advisory lock key the gate trigger and the holding session share.
pub const KEY: i64 = 70_014_220;

/// An exclusive advisory lock held by a `psql` child until [`Gate::open`] or drop.
pub struct Gate {
    child: Option<Child>,
    db: String,
}

impl Gate {
    /// Creates the gate trigger on `table` (a caller-quoted, qualified name) in `db`. It passes
    /// every row unchanged; it only waits while a gate is closed.
    pub fn install(cluster: &Cluster, db: &str, table: &str) {
        cluster.psql(
            db,
            &format!(
                "CREATE OR REPLACE FUNCTION public.pgferry_test_gate() RETURNS trigger LANGUAGE plpgsql AS \
                 $$BEGIN PERFORM pg_advisory_xact_lock_shared({KEY}); RETURN NEW; END$$; \
                 CREATE TRIGGER pgferry_test_gate BEFORE INSERT OR UPDATE ON {table} \
                   FOR EACH ROW EXECUTE FUNCTION public.pgferry_test_gate(); \
                 ALTER TABLE {table} ENABLE ALWAYS TRIGGER pgferry_test_gate;"
            ),
        );
    }

    /// Removes the gate trigger and its function.
    pub fn uninstall(cluster: &Cluster, db: &str, table: &str) {
        cluster.psql(
            db,
            &format!(
                "DROP TRIGGER pgferry_test_gate ON {table}; DROP FUNCTION public.pgferry_test_gate();"
            ),
        );
    }

    /// Closes the gate in `db`: returns once the lock is held (checked in `pg_locks`).
    pub fn close(cluster: &Cluster, db: &str) -> Gate {
        let mut cmd = cluster.psql_command(db);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start psql to hold the gate: {e}"));
        {
            let stdin = child.stdin.as_mut().expect("piped stdin");
            stdin
                .write_all(format!("SELECT pg_advisory_lock({KEY});\n").as_bytes())
                .and_then(|()| stdin.flush())
                .unwrap_or_else(|e| panic!("could not write to the gate's psql: {e}"));
        }
        let gate = Gate {
            child: Some(child),
            db: db.to_string(),
        };
        wait_for("the gate to close", Duration::from_secs(30), || {
            gate.held_by_holder(cluster)
        });
        gate
    }

    fn held_by_holder(&self, cluster: &Cluster) -> bool {
        cluster.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                 WHERE l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.granted \
                   AND l.classid = 0 AND l.objid = {KEY} AND l.objsubid = 1 AND d.datname = '{}'",
                self.db
            ),
        ) == "1"
    }

    /// Waits until a session with `application_name` in the gate's database is blocked on it.
    pub fn wait_blocked(&self, cluster: &Cluster, application_name: &str, timeout: Duration) {
        wait_for(
            &format!("`{application_name}` to be stopped at the gate"),
            timeout,
            || {
                cluster.psql(
                    "postgres",
                    &format!(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                         WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objid = {KEY} \
                           AND a.datname = '{}' AND a.application_name = '{application_name}'",
                        self.db
                    ),
                ) != "0"
            },
        );
    }

    /// Opens the gate: ends the holding session, which releases the lock.
    pub fn open(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.end();
    }
}
