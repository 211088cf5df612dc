//! The executor against fake stages and the in-memory store: no server, a few milliseconds each.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{Executor, Node, Outcome, Selection};
use crate::error::{Error, ErrorKind, Result};
use crate::stages::{Stage, StageContext};
use crate::state::memory::MemoryStore;
use crate::state::{StageState, StateStore};

/// What each stage did, in order: `start a`, `end a`, `attempt a 2`, ...
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: String) {
        self.0.lock().expect("log").push(s);
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("log").clone()
    }

    fn index(&self, line: &str) -> usize {
        self.lines()
            .iter()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("`{line}` not in {:?}", self.lines()))
    }
}

enum Does {
    /// Succeeds at once.
    Succeed,
    /// Fails with a transient error this many times, then succeeds.
    FailTransient(AtomicU32),
    /// Fails permanently.
    Fail,
    /// Works until the run stops it (a long stage).
    Block,
    /// A continuous stage: ready at once, then runs until stopped.
    Continuous,
    /// Waits at a barrier shared with another stage (both must run at once to pass).
    Meet(Arc<tokio::sync::Barrier>),
    /// Records a checkpoint per key, skipping those done before.
    Checkpoints(&'static [&'static str]),
    /// Records checkpoint `first`, waits until the stage running beside it has seen it (the
    /// barrier), then records `second`, or fails when `fail_after` is set.
    Produce {
        first: &'static str,
        second: &'static str,
        seen: Arc<tokio::sync::Barrier>,
        fail_after: bool,
    },
    /// Runs beside `upstream`: waits for each of its checkpoints `keys` in turn (meeting the
    /// producer at the barrier after the first), then ends.
    Consume {
        upstream: &'static str,
        keys: &'static [&'static str],
        seen: Arc<tokio::sync::Barrier>,
    },
    /// Succeeds when `stage` is recorded done in the store, fails otherwise.
    SeeDone(&'static str),
}

struct Fake {
    id: &'static str,
    does: Does,
    log: Log,
}

#[async_trait]
impl Stage for Fake {
    fn describe(&self) -> Vec<String> {
        vec![format!("fake {}", self.id)]
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        self.log.push(format!("start {} {}", self.id, cx.attempt));
        let r = match &self.does {
            Does::Succeed => Ok(()),
            Does::FailTransient(left) => {
                if left.load(Ordering::SeqCst) > 0 {
                    left.fetch_sub(1, Ordering::SeqCst);
                    Err(Error::transient("connection lost"))
                } else {
                    Ok(())
                }
            }
            Does::Fail => Err(Error::permanent("broken")),
            Does::Block => {
                cx.cancel.cancelled().await;
                Err(Error::interrupted())
            }
            Does::Continuous => {
                cx.mark_ready();
                cx.cancel.cancelled().await;
                Err(Error::interrupted())
            }
            Does::Meet(barrier) => tokio::time::timeout(Duration::from_secs(2), barrier.wait())
                .await
                .map(drop)
                .map_err(|_| Error::permanent("the other stage never ran alongside")),
            Does::Produce {
                first,
                second,
                seen,
                fail_after,
            } => {
                cx.mark_done(first, serde_json::json!({})).await?;
                tokio::time::timeout(Duration::from_secs(2), seen.wait())
                    .await
                    .map_err(|_| Error::permanent("nothing ran beside the producer"))?;
                if *fail_after {
                    Err(Error::permanent("the producer broke"))
                } else {
                    cx.mark_done(second, serde_json::json!({})).await?;
                    // Still running after its last checkpoint: a stage beside it must not be
                    // recorded done before this one.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(())
                }
            }
            Does::Consume {
                upstream,
                keys,
                seen,
            } => {
                let Some(mut up) = cx.upstream(upstream) else {
                    return Err(Error::permanent("started without the upstream running"));
                };
                for (n, key) in keys.iter().enumerate() {
                    loop {
                        let done = cx
                            .store
                            .checkpoint(upstream, key)
                            .await?
                            .is_some_and(|v| v["done"] == true);
                        if done {
                            break;
                        }
                        tokio::select! {
                            r = up.changed() => { r?; }
                            _ = cx.cancel.cancelled() => return Err(Error::interrupted()),
                        }
                    }
                    self.log.push(format!("saw {} {key}", self.id));
                    if n == 0 {
                        seen.wait().await;
                    }
                }
                Ok(())
            }
            Does::SeeDone(stage) => {
                match cx.store.stages().await?.iter().find(|r| r.stage == *stage) {
                    Some(r) if r.state == StageState::Done => Ok(()),
                    r => Err(Error::permanent(format!(
                        "{stage} is {:?}",
                        r.map(|r| r.state)
                    ))),
                }
            }
            Does::Checkpoints(keys) => {
                for key in *keys {
                    cx.check_cancelled()?;
                    if cx.is_done(key).await? {
                        self.log.push(format!("skip {} {key}", self.id));
                        continue;
                    }
                    self.log.push(format!("do {} {key}", self.id));
                    cx.mark_done(key, serde_json::json!({})).await?;
                }
                Ok(())
            }
        };
        self.log.push(format!("end {}", self.id));
        r
    }
}

/// A stage of the test DAG: id, dependencies (ids), what it does.
struct Spec {
    id: &'static str,
    after: &'static [&'static str],
    does: Does,
    fingerprint: &'static str,
    retries: u32,
    /// Dependencies it may run beside.
    overlaps: &'static [&'static str],
}

fn spec(id: &'static str, after: &'static [&'static str], does: Does) -> Spec {
    Spec {
        id,
        after,
        does,
        fingerprint: "f1",
        retries: 0,
        overlaps: &[],
    }
}

fn executor(
    specs: Vec<Spec>,
    store: &Arc<MemoryStore>,
    cancel: &CancellationToken,
    log: &Log,
) -> Executor {
    let ids: Vec<&str> = specs.iter().map(|s| s.id).collect();
    let nodes = specs
        .into_iter()
        .map(|s| Node {
            id: s.id.to_string(),
            kind: "fake".into(),
            fingerprint: s.fingerprint.to_string(),
            deps: s
                .after
                .iter()
                .map(|a| ids.iter().position(|i| i == a).expect("known stage"))
                .collect(),
            retries: s.retries,
            continuous: matches!(s.does, Does::Continuous),
            overlaps: s
                .overlaps
                .iter()
                .map(|a| ids.iter().position(|i| i == a).expect("known stage"))
                .collect(),
            stage: Some(Arc::new(Fake {
                id: s.id,
                does: s.does,
                log: log.clone(),
            }) as Arc<dyn Stage>),
        })
        .collect();
    let store: Arc<dyn StateStore> = store.clone();
    Executor::new(nodes, store, cancel.clone()).with_backoff(|_| Duration::ZERO)
}

async fn state_of(store: &MemoryStore, id: &str) -> Option<StageState> {
    store
        .stages()
        .await
        .expect("stages")
        .into_iter()
        .find(|r| r.stage == id)
        .map(|r| r.state)
}

/// Runs `sel`, failing (not hanging) when the executor does not finish within seconds.
async fn run(ex: &Executor, sel: Selection) -> Result<Outcome> {
    tokio::time::timeout(Duration::from_secs(5), ex.run(&sel))
        .await
        .expect("the run finishes within 5 s")
}

fn done(ran: &[&str], skipped: &[&str]) -> Outcome {
    Outcome::Done {
        ran: ran.iter().map(|s| s.to_string()).collect(),
        skipped: skipped.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn stages_start_after_their_dependencies_and_independent_ones_together() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let ex = executor(
        vec![
            spec("a", &[], Does::Succeed),
            spec("b", &["a"], Does::Meet(barrier.clone())),
            spec("c", &["a"], Does::Meet(barrier)),
            spec("d", &["b", "c"], Does::Succeed),
        ],
        &store,
        &cancel,
        &log,
    );
    let out = run(&ex, Selection::default()).await.expect("run");
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    assert!(log.index("end a") < log.index("start b 1"));
    assert!(log.index("end a") < log.index("start c 1"));
    assert!(log.index("end b") < log.index("start d 1"));
    assert!(log.index("end c") < log.index("start d 1"));
    for id in ["a", "b", "c", "d"] {
        assert_eq!(state_of(&store, id).await, Some(StageState::Done), "{id}");
    }
}

#[tokio::test]
async fn a_ready_continuous_stage_lets_its_dependents_run_and_is_parked_after() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let ex = executor(
        vec![
            spec("cdc", &[], Does::Continuous),
            spec("check", &["cdc"], Does::Succeed),
        ],
        &store,
        &cancel,
        &log,
    );
    let out = run(&ex, Selection::default()).await.expect("run");
    assert_eq!(out, done(&["cdc", "check"], &[]));
    // Still running (ready) when its dependent started; parked (stopped, still ready) at the end.
    assert!(log.index("start check 1") < log.index("end cdc"));
    assert_eq!(state_of(&store, "cdc").await, Some(StageState::Ready));
    assert_eq!(state_of(&store, "check").await, Some(StageState::Done));
}

#[tokio::test]
async fn transient_failures_are_retried_and_then_give_up() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let mut flaky = spec("flaky", &[], Does::FailTransient(AtomicU32::new(2)));
    flaky.retries = 2;
    let ex = executor(vec![flaky], &store, &cancel, &log);
    assert_eq!(
        run(&ex, Selection::default()).await.expect("run"),
        done(&["flaky"], &[])
    );
    for attempt in 1..=3 {
        log.index(&format!("start flaky {attempt}"));
    }

    let (store, log) = (Arc::new(MemoryStore::new()), Log::default());
    let mut flaky = spec("flaky", &[], Does::FailTransient(AtomicU32::new(3)));
    flaky.retries = 2;
    let ex = executor(vec![flaky], &store, &cancel, &log);
    match run(&ex, Selection::default()).await.expect("run") {
        Outcome::Failed { stage, error, .. } => {
            assert_eq!(stage, "flaky");
            assert!(error.contains("connection lost"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        log.lines()
            .iter()
            .filter(|l| l.starts_with("start"))
            .count(),
        3
    );
    assert_eq!(state_of(&store, "flaky").await, Some(StageState::Failed));
}

#[tokio::test]
async fn an_interrupted_run_leaves_the_stage_pending_and_the_next_run_resumes_it() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let ex = executor(
        vec![
            spec("a", &[], Does::Succeed),
            spec("long", &["a"], Does::Block),
        ],
        &store,
        &cancel,
        &log,
    );
    let stopper = {
        let (cancel, log) = (cancel.clone(), log.clone());
        tokio::spawn(async move {
            while !log.lines().iter().any(|l| l == "start long 1") {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            cancel.cancel();
        })
    };
    assert_eq!(
        run(&ex, Selection::default()).await.expect("run"),
        Outcome::Interrupted
    );
    stopper.await.expect("stopper");
    assert_eq!(state_of(&store, "long").await, Some(StageState::Pending));
    assert_eq!(state_of(&store, "a").await, Some(StageState::Done));

    // The next run skips what is done and runs the rest.
    let (cancel, log) = (CancellationToken::new(), Log::default());
    let ex = executor(
        vec![
            spec("a", &[], Does::Succeed),
            spec("long", &["a"], Does::Succeed),
        ],
        &store,
        &cancel,
        &log,
    );
    assert_eq!(
        run(&ex, Selection::default()).await.expect("run"),
        done(&["long"], &["a"])
    );
}

#[tokio::test]
async fn a_failure_stops_its_siblings_and_nothing_after_it_starts() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let ex = executor(
        vec![
            spec("sibling", &[], Does::Block),
            spec("broken", &[], Does::Fail),
            spec("after", &["broken"], Does::Succeed),
        ],
        &store,
        &cancel,
        &log,
    );
    match run(&ex, Selection::default()).await.expect("run") {
        Outcome::Failed {
            stage,
            error,
            data_differs,
        } => {
            assert_eq!(stage, "broken");
            assert!(
                error.contains("stage `broken`") && error.contains("broken"),
                "{error}"
            );
            assert!(!data_differs);
        }
        other => panic!("{other:?}"),
    }
    // The sibling was stopped at its checkpoint, resumable; the dependent never started.
    log.index("end sibling");
    assert_eq!(state_of(&store, "sibling").await, Some(StageState::Pending));
    assert_eq!(state_of(&store, "broken").await, Some(StageState::Failed));
    assert_eq!(state_of(&store, "after").await, None);
    assert!(!log.lines().iter().any(|l| l.starts_with("start after")));
}

#[tokio::test]
async fn a_done_stage_whose_configuration_changed_is_refused_unless_rerun() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let plan = |fingerprint: &'static str| {
        let mut a = spec("a", &[], Does::Checkpoints(&["x", "y"]));
        a.fingerprint = fingerprint;
        vec![a, spec("b", &["a"], Does::Succeed)]
    };
    run(
        &executor(plan("f1"), &store, &cancel, &log),
        Selection::default(),
    )
    .await
    .expect("first run");

    let err = run(
        &executor(plan("f2"), &store, &cancel, &log),
        Selection::default(),
    )
    .await
    .expect_err("a changed configuration is refused");
    assert_eq!(err.kind, ErrorKind::ConfigChanged);
    assert!(err.message.contains("`a` (done)"), "{}", err.message);

    // --rerun a: its checkpoints are forgotten, it and what follows it run again.
    let log = Log::default();
    let ex = executor(plan("f2"), &store, &cancel, &log);
    let out = run(
        &ex,
        Selection {
            until: None,
            rerun: vec![0],
        },
    )
    .await
    .expect("rerun");
    assert_eq!(out, done(&["a", "b"], &[]));
    log.index("do a x");
    log.index("do a y");
}

#[tokio::test]
async fn a_failed_stage_whose_configuration_was_fixed_starts_over() {
    let (store, cancel) = (Arc::new(MemoryStore::new()), CancellationToken::new());
    // An earlier attempt did `x`, then failed.
    store
        .put_checkpoint("a", "x", &serde_json::json!({"done": true}))
        .await
        .expect("checkpoint");
    store
        .set_stage("a", "fake", StageState::Failed, "old", Some("broken"))
        .await
        .expect("state");
    let log = Log::default();
    let ex = executor(
        vec![spec("a", &[], Does::Checkpoints(&["x", "y"]))],
        &store,
        &cancel,
        &log,
    );
    run(&ex, Selection::default()).await.expect("run");
    log.index("do a x");

    // With the same configuration, a failed stage resumes from its checkpoints instead.
    let store = Arc::new(MemoryStore::new());
    store
        .put_checkpoint("a", "x", &serde_json::json!({"done": true}))
        .await
        .expect("checkpoint");
    store
        .set_stage("a", "fake", StageState::Failed, "f1", Some("broken"))
        .await
        .expect("state");
    let log = Log::default();
    let ex = executor(
        vec![spec("a", &[], Does::Checkpoints(&["x", "y"]))],
        &store,
        &cancel,
        &log,
    );
    run(&ex, Selection::default()).await.expect("run");
    log.index("skip a x");
    log.index("do a y");
}

#[tokio::test]
async fn until_runs_a_stage_and_what_it_needs_only() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let ex = executor(
        vec![
            spec("a", &[], Does::Succeed),
            spec("other", &[], Does::Succeed),
            spec("b", &["a"], Does::Succeed),
            spec("c", &["b"], Does::Succeed),
        ],
        &store,
        &cancel,
        &log,
    );
    let out = run(
        &ex,
        Selection {
            until: Some(2),
            rerun: Vec::new(),
        },
    )
    .await
    .expect("run");
    assert_eq!(out, done(&["a", "b"], &[]));
    assert_eq!(state_of(&store, "other").await, None);
    assert_eq!(state_of(&store, "c").await, None);
}

/// `use`, after `load` and declared to run beside it, consuming `load`'s checkpoints `t1` and `t2`
/// (meeting the test at `seen` once it has seen `t1`).
fn consumer_beside_load(seen: &Arc<tokio::sync::Barrier>) -> Spec {
    let mut use_ = spec(
        "use",
        &["load"],
        Does::Consume {
            upstream: "load",
            keys: &["t1", "t2"],
            seen: seen.clone(),
        },
    );
    use_.overlaps = &["load"];
    use_
}

/// The overlap contract: `use` runs beside `load` and sees its checkpoints as they are written;
/// `seq`, which does not overlap, waits for `load` to be done; `use` is recorded done only after
/// `load` (`check`, after `use` alone, finds `load` done).
#[tokio::test]
async fn an_overlapping_stage_runs_beside_its_dependency_and_is_done_after_it() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let seen = Arc::new(tokio::sync::Barrier::new(2));
    let use_ = consumer_beside_load(&seen);
    let ex = executor(
        vec![
            spec("prep", &[], Does::Succeed),
            spec(
                "load",
                &["prep"],
                Does::Produce {
                    first: "t1",
                    second: "t2",
                    seen,
                    fail_after: false,
                },
            ),
            use_,
            spec("seq", &["load"], Does::Succeed),
            spec("check", &["use"], Does::SeeDone("load")),
        ],
        &store,
        &cancel,
        &log,
    );
    let out = run(&ex, Selection::default()).await.expect("run");
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    assert!(log.index("end prep") < log.index("start use 1"));
    assert!(log.index("start use 1") < log.index("end load"));
    assert!(log.index("saw use t1") < log.index("end load"));
    assert!(log.index("end load") < log.index("start seq 1"));
    for id in ["prep", "load", "use", "seq", "check"] {
        assert_eq!(state_of(&store, id).await, Some(StageState::Done), "{id}");
    }

    // Without the overlap, `use` starts after `load` is done (and finds no upstream to watch).
    let (store, log) = (Arc::new(MemoryStore::new()), Log::default());
    let ex = executor(
        vec![
            spec("load", &[], Does::Checkpoints(&["t1", "t2"])),
            spec(
                "use",
                &["load"],
                Does::Consume {
                    upstream: "load",
                    keys: &["t1"],
                    seen: Arc::new(tokio::sync::Barrier::new(1)),
                },
            ),
        ],
        &store,
        &cancel,
        &log,
    );
    let out = run(&ex, Selection::default()).await.expect("run");
    assert!(
        matches!(&out, Outcome::Failed { stage, error, .. } if stage == "use" && error.contains("without the upstream")),
        "{out:?}"
    );
}

/// The dependency failing stops the stage running beside it at its next checkpoint: it is left
/// pending (resumable), not failed, and the run reports the dependency's failure.
#[tokio::test]
async fn a_failing_dependency_stops_the_stage_running_beside_it() {
    let (store, cancel, log) = (
        Arc::new(MemoryStore::new()),
        CancellationToken::new(),
        Log::default(),
    );
    let seen = Arc::new(tokio::sync::Barrier::new(2));
    let use_ = consumer_beside_load(&seen);
    let ex = executor(
        vec![
            spec(
                "load",
                &[],
                Does::Produce {
                    first: "t1",
                    second: "t2",
                    seen,
                    fail_after: true,
                },
            ),
            use_,
        ],
        &store,
        &cancel,
        &log,
    );
    let out = run(&ex, Selection::default()).await.expect("run");
    assert!(
        matches!(&out, Outcome::Failed { stage, .. } if stage == "load"),
        "{out:?}"
    );
    log.index("saw use t1");
    assert_eq!(state_of(&store, "load").await, Some(StageState::Failed));
    assert_eq!(state_of(&store, "use").await, Some(StageState::Pending));
    assert!(!log.lines().contains(&"saw use t2".to_string()));
}
