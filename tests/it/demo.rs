//! `pgferry demo` as a person runs it: the real binary, real throwaway clusters. The summary's
//! numbers are checked against what the generator and the writer must have produced, and the
//! clusters' directories must be gone afterwards (also after Ctrl-C).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::{pgferry, show};

/// A private temporary directory the `postgres` OS user can enter (the demo puts its clusters in
/// `$TMPDIR`).
fn tmpdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read temp dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// `name source target status` rows of the summary's table.
fn summary_rows(stdout: &str) -> Vec<(String, i64, i64, String)> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("table "))
        .skip(1)
        .take_while(|l| !l.starts_with("total"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "summary line {l:?}");
            (
                f[0].to_string(),
                f[1].parse().expect("source rows"),
                f[2].parse().expect("target rows"),
                f[3].to_string(),
            )
        })
        .collect()
}

/// The number after `label` in `text` (e.g. "transactions" in "writer: 488 transactions").
fn number_before(text: &str, label: &str) -> i64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} not in {text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|w| w.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no number before {label:?} in {text}"))
}

#[test]
fn demo_migrates_online_and_removes_its_clusters() {
    let tmp = tmpdir();
    let started = Instant::now();
    let out = pgferry()
        .args(["demo", "--scale", "1"])
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run pgferry demo");
    let elapsed = started.elapsed();
    eprintln!("demo took {elapsed:.1?}");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);

    // Every table: target equals source.
    let rows = summary_rows(&stdout);
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "category",
            "actor",
            "film",
            "film_actor",
            "film_category",
            "store",
            "customer",
            "inventory",
            "rental",
            "payment"
        ]
    );
    for (t, s, n, status) in &rows {
        assert_eq!(s, n, "{t}: {}", show(&out));
        assert_eq!(status, "ok", "{t}");
    }
    // The source counts are what the generator makes at scale 1 plus what the writer did.
    let count = |t: &str| rows.iter().find(|r| r.0 == t).map(|r| r.1).expect(t);
    for (t, n) in [
        ("category", 16),
        ("actor", 200),
        ("film", 1000),
        ("film_actor", 5000),
        ("film_category", 1000),
        ("store", 2),
        ("customer", 600),
        ("inventory", 4500),
    ] {
        assert_eq!(count(t), n, "{t}");
    }
    let transactions = number_before(&stdout, "transactions on the source");
    let inserted = number_before(&stdout, "rows inserted");
    let deleted = number_before(&stdout, "deleted)");
    assert!(transactions > 10, "the writer barely wrote: {}", show(&out));
    // Each insert transaction adds one rental and one payment; deletes remove payments.
    assert_eq!(count("rental"), 160_000 + inserted / 2, "{stdout}");
    assert_eq!(
        count("payment"),
        144_000 + inserted / 2 - deleted,
        "{stdout}"
    );
    assert!(
        stdout.contains("the source refused writes (the cutover fence)"),
        "{stdout}"
    );
    assert!(stdout.contains("write downtime (fence to last change applied): "));
    // The validate stage compared both sides as of one moment and found them equal.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("validation: no differences: ")),
        "{stdout}"
    );
    for stage in [
        "preflight",
        "schema",
        "provision",
        "load",
        "indexes",
        "cdc",
        "cutover",
        "sequences",
        "verify",
        "cleanup",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{stage} ")) && l.trim_end().ends_with("done")),
            "stage {stage} not done in the summary: {stdout}"
        );
    }
    assert!(
        leftovers(tmp.path()).is_empty(),
        "left behind: {:?}",
        leftovers(tmp.path())
    );
}

#[test]
fn demo_says_what_to_install_without_server_binaries() {
    let empty = tempfile::tempdir().expect("temp dir");
    let out = pgferry()
        .arg("demo")
        .env("PGFERRY_PG_BINDIR", empty.path())
        .output()
        .expect("run pgferry demo");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("initdb, pg_ctl, postgres"), "{stderr}");
    assert!(stderr.contains("apt-get install postgresql"), "{stderr}");
    assert!(stderr.contains("brew install postgresql@16"), "{stderr}");
    assert!(
        stderr.contains(&empty.path().display().to_string()),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn ctrl_c_stops_the_demo_and_removes_its_clusters() {
    let tmp = tmpdir();
    let mut child = pgferry()
        .args(["demo", "--scale", "1"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgferry demo");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("stage started stage=load") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the demo reached the load stage");
    assert_eq!(leftovers(tmp.path()).len(), 2, "two cluster directories");
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let status = child.wait().expect("wait for the demo");
    let log = reader.join().expect("stderr reader");
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("stopping the demo"), "{log}");
    assert!(
        leftovers(tmp.path()).is_empty(),
        "left behind: {:?}\n{log}",
        leftovers(tmp.path())
    );
}
