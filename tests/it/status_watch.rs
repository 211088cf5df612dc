//! `pgferry status --watch` refreshes a compact view of a real run; `pgferry graph` shows the
//! stages' states once a run exists (without `--state`) and draws the plain graph when the store
//! cannot be reached.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{TestPlan, pair, pgferry, row_digest, show};

const STAGES: &str = "[stages.schema]\nkind = \"schema_dump\"\n\n\
    [stages.provision]\nkind = \"provision\"\nafter = [\"schema\"]\n\n\
    [stages.load]\nkind = \"full_load\"\nafter = [\"provision\"]\n";

fn loaded_plan(prefix: &str) -> TestPlan {
    let p = pair();
    let s = p.source.fresh_database(&format!("{prefix}_src"));
    let t = p.target.fresh_database(&format!("{prefix}_tgt"));
    p.source.psql(
        &s,
        "CREATE TABLE public.items (id int PRIMARY KEY, name text);\n\
         INSERT INTO public.items SELECT g, 'item ' || g FROM generate_series(1, 1234) g;",
    );
    let plan = TestPlan::new(p, prefix, &s, &t, STAGES);
    let out = plan.run(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        row_digest(&p.source, &s, "public.items"),
        row_digest(&p.target, &t, "public.items")
    );
    plan
}

#[test]
fn status_watch_refreshes_stage_states_and_counters() {
    let plan = loaded_plan("watch");
    let mut child = plan
        .command(&["status", "--watch", "--interval", "300ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn status --watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Ctrl-C to stop") {
                let _ = tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    // Let it refresh three times, then stop it as a person would (Ctrl-C).
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("status --watch refreshed");
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "status --watch did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = reader.join().expect("reader");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(0), "{text}\n{err}");
    let refreshes = text.matches("Ctrl-C to stop").count();
    assert!(refreshes >= 3, "{refreshes} refreshes:\n{text}");
    // The last refresh shows every stage done, the table and the load's counters.
    let last = text.rsplit("Ctrl-C to stop").next().unwrap_or("");
    for stage in ["schema", "provision", "load"] {
        assert!(
            last.lines()
                .any(|l| l.starts_with(&format!("{stage} ")) && l.contains(" done ")),
            "stage {stage} not done in:\n{last}"
        );
    }
    assert!(last.contains("tables: 1/1 copied"), "{last}");
    assert!(
        last.lines()
            .any(|l| l.contains("full_load_rows") && l.trim_end().ends_with(" 1234")),
        "{last}"
    );
    assert!(last.contains("SUCCEEDED"), "{last}");
}

#[test]
fn graph_shows_states_once_a_run_exists() {
    let plan = loaded_plan("graph_states");
    let out = plan.run(&["graph", "--format", "mermaid"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for stage in ["schema", "provision", "load"] {
        assert!(text.contains(&format!("{stage}<br/>")), "{text}");
    }
    assert_eq!(text.matches("[done]").count(), 3, "{text}");
}

#[test]
fn graph_without_a_reachable_store_draws_the_plain_graph() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("plan.toml");
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    std::fs::write(
        &path,
        format!(
            "version = 1\nname = \"nostore\"\n\n[source]\nurl = \"postgres://u@127.0.0.1:1/s\"\n\n\
             [target]\nurl = \"postgres://u@127.0.0.1:1/t\"\n\n[[databases]]\nname = \"s\"\n\n{STAGES}"
        ),
    )
    .expect("write plan");
    let out = pgferry()
        .args([
            "graph",
            path.to_str().expect("utf-8 path"),
            "--format",
            "mermaid",
        ])
        .output()
        .expect("run graph");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("flowchart LR"), "{text}");
    assert!(
        !text.contains("[pending]") && !text.contains("classDef"),
        "{text}"
    );
    assert!(out.stderr.is_empty(), "{}", show(&out));
    // With --state the unreachable store is an error.
    let out = pgferry()
        .args(["graph", path.to_str().expect("utf-8 path"), "--state"])
        .output()
        .expect("run graph --state");
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
}
