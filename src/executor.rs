//! The executor runs a DAG of stages: every stage whose dependencies are satisfied starts at once
//! (tokio tasks); states go `pending -> running -> done | failed` (and `ready` for continuous stages)
//! and are recorded in the checkpoint store, with each stage's fingerprint. A second run skips what is
//! done and resumes what was running; a done stage whose configuration changed is refused unless it is
//! rerun on purpose. Transient failures are retried with backoff. It knows nothing of PostgreSQL:
//! stages are `dyn Stage`, the store is `dyn StateStore`.
//!
//! **Overlap.** A stage may declare that it can run beside some of its dependencies
//! ([`Node::overlaps`]; the plan decides which kinds, `plan::StageKind::overlaps`). Such a stage starts
//! as soon as those dependencies are *running* (its other dependencies still `done` or `ready`), and
//! its context holds an [`Upstream`] for each one still running: a signal the executor sets to
//! `done` once it has recorded the dependency done (or `stopped` when it failed or was
//! interrupted), and a counter the dependency bumps through its [`Progress`] after each
//! checkpoint it writes (`StageContext::mark_done` bumps it too). What the dependency has finished
//! is read from the store, where it is checkpointed anyway, so a resumed run sees the same thing.
//! The contract for the dependent: it touches only what the dependency's checkpoints say is
//! finished, stops when the signal says `stopped` (or its token is cancelled: a failure anywhere
//! cancels every stage), and is never `done` before the dependency: after its `run` returns, the
//! executor waits for every upstream's `done` before recording it. Stages that do not declare
//! the overlap wait for `done` as always.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::dag::Dag;
use crate::error::{Error, ErrorKind, Result};
use crate::stages::{Progress, Stage, StageContext, Upstream, UpstreamSignal, UpstreamState};
use crate::state::{StageState, StateStore};

/// One stage as the executor sees it.
pub struct Node {
    pub id: String,
    pub kind: String,
    pub fingerprint: String,
    pub deps: Vec<usize>,
    pub retries: u32,
    pub continuous: bool,
    /// Dependencies (a subset of `deps`) this stage may run beside: it starts once they are
    /// running, and learns through [`Upstream`] what they finished and when they are done.
    pub overlaps: Vec<usize>,
    /// `None` for stages outside the run's selection (they are never started).
    pub stage: Option<Arc<dyn Stage>>,
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Stop after this stage (and everything it needs).
    pub until: Option<usize>,
    /// Run these stages (and everything after them) again, even if done.
    pub rerun: Vec<usize>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every selected stage is done (or ready, for continuous stages with nothing after them).
    Done {
        ran: Vec<String>,
        skipped: Vec<String>,
    },
    /// Stopped on request; the next run resumes.
    Interrupted,
    /// A stage failed; the others were stopped.
    Failed {
        stage: String,
        error: String,
        /// The failure is a validation that found differences (exit code 3).
        data_differs: bool,
    },
}

/// The stages a selection covers: `--until` takes a stage and everything it needs.
pub fn selection(dag: &Dag, sel: &Selection) -> BTreeSet<usize> {
    match sel.until {
        Some(u) => {
            let mut s = dag.ancestors(u);
            s.insert(u);
            s
        }
        None => (0..dag.len()).collect(),
    }
}

pub struct Executor {
    nodes: Vec<Node>,
    dag: Dag,
    store: Arc<dyn StateStore>,
    cancel: CancellationToken,
    /// Pause before retrying attempt n (1-based); the default is [`Error::backoff`].
    backoff: fn(u32) -> std::time::Duration,
}

/// Done stages whose configuration changed since they ran.
#[derive(Debug, Clone)]
pub struct ChangedStage {
    pub id: String,
    pub state: StageState,
}

impl Executor {
    pub fn new(
        nodes: Vec<Node>,
        store: Arc<dyn StateStore>,
        cancel: CancellationToken,
    ) -> Executor {
        let deps: Vec<Vec<usize>> = nodes.iter().map(|n| n.deps.clone()).collect();
        Executor {
            dag: Dag::new(&deps),
            nodes,
            store,
            cancel,
            backoff: Error::backoff,
        }
    }

    pub fn with_backoff(mut self, backoff: fn(u32) -> std::time::Duration) -> Executor {
        self.backoff = backoff;
        self
    }

    /// The stages a selection covers.
    pub fn selected(&self, sel: &Selection) -> BTreeSet<usize> {
        selection(&self.dag, sel)
    }

    /// Stages that have run (or are running) with another configuration than the plan's now.
    pub async fn changed_stages(&self, sel: &Selection) -> Result<Vec<ChangedStage>> {
        let records = self.store.stages().await?;
        let rerun = self.rerun_set(sel);
        let selected = self.selected(sel);
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if !selected.contains(&i) || rerun.contains(&i) {
                continue;
            }
            if let Some(r) = records.iter().find(|r| r.stage == node.id) {
                let changed = r
                    .fingerprint
                    .as_deref()
                    .is_some_and(|f| f != node.fingerprint);
                if changed
                    && matches!(
                        r.state,
                        StageState::Done | StageState::Running | StageState::Ready
                    )
                {
                    out.push(ChangedStage {
                        id: node.id.clone(),
                        state: r.state,
                    });
                }
            }
        }
        Ok(out)
    }

    fn rerun_set(&self, sel: &Selection) -> BTreeSet<usize> {
        let mut set = BTreeSet::new();
        for &r in &sel.rerun {
            set.insert(r);
            set.extend(self.dag.descendants(r));
        }
        set
    }

    /// Runs the selection to its end, a failure, or an interruption.
    pub async fn run(&self, sel: &Selection) -> Result<Outcome> {
        let changed = self.changed_stages(sel).await?;
        if !changed.is_empty() {
            let list: Vec<String> = changed
                .iter()
                .map(|c| format!("`{}` ({})", c.id, c.state))
                .collect();
            let first = &changed[0].id;
            return Err(Error::config_changed(format!(
                "the configuration of stage{} {} changed since {} ran",
                if changed.len() == 1 { "" } else { "s" },
                list.join(", "),
                if changed.len() == 1 { "it" } else { "they" },
            ))
            .hint(format!(
                "restore the previous configuration, or run it again on purpose with `--rerun {first}` (stages after it run again too)"
            )));
        }
        let selected = self.selected(sel);
        let rerun = self.rerun_set(sel);
        for &r in &rerun {
            if selected.contains(&r) {
                self.store.reset_stage(&self.nodes[r].id).await?;
                self.store
                    .event(Some(&self.nodes[r].id), "info", "reset for --rerun")
                    .await?;
            }
        }
        let records: HashMap<String, crate::state::StageRecord> = self
            .store
            .stages()
            .await?
            .into_iter()
            .map(|r| (r.stage.clone(), r))
            .collect();

        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        enum S {
            Pending,
            Running,
            Ready,
            Done,
        }
        let mut state: Vec<S> = vec![S::Pending; self.nodes.len()];
        let mut skipped = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            match records.get(&node.id) {
                Some(r) if r.state == StageState::Done => {
                    state[i] = S::Done;
                    if selected.contains(&i) {
                        skipped.push(node.id.clone());
                    }
                }
                Some(r)
                    if r.state == StageState::Failed
                        && r.fingerprint.as_deref() != Some(&node.fingerprint) =>
                {
                    // A failed stage whose configuration was fixed starts over.
                    self.store.reset_stage(&node.id).await?;
                    self.store
                        .event(
                            Some(&node.id),
                            "info",
                            "configuration changed after a failure; starting the stage over",
                        )
                        .await?;
                }
                _ => {}
            }
        }

        // Each stage's signal to the stages that run beside it (see the module doc).
        let signals: Vec<Arc<watch::Sender<UpstreamSignal>>> = self
            .nodes
            .iter()
            .map(|_| {
                Arc::new(
                    watch::channel(UpstreamSignal {
                        state: UpstreamState::Running,
                        progress: 0,
                    })
                    .0,
                )
            })
            .collect();
        let signal = |i: usize, state: UpstreamState| {
            signals[i].send_modify(|s| s.state = state);
        };

        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<String>();
        let mut tasks: JoinSet<(usize, Result<()>)> = JoinSet::new();
        let mut tokens: HashMap<usize, CancellationToken> = HashMap::new();
        // Continuous stages we stopped because nothing after them needs them any more.
        let mut parked: BTreeSet<usize> = BTreeSet::new();
        let mut ran = Vec::new();
        let mut failure: Option<(String, Error)> = None;
        let mut interrupted = false;

        loop {
            // Start every selected stage whose dependencies are satisfied.
            if failure.is_none() && !interrupted && !self.cancel.is_cancelled() {
                for i in selected.iter().copied() {
                    if state[i] != S::Pending {
                        continue;
                    }
                    let node = &self.nodes[i];
                    let deps_ok = node.deps.iter().all(|&d| {
                        matches!(state[d], S::Done | S::Ready)
                            || (state[d] == S::Running && node.overlaps.contains(&d))
                    });
                    if !deps_ok {
                        continue;
                    }
                    let Some(stage) = self.nodes[i].stage.clone() else {
                        return Err(Error::permanent(format!(
                            "internal: stage `{}` was selected but not built",
                            self.nodes[i].id
                        )));
                    };
                    state[i] = S::Running;
                    let node = &self.nodes[i];
                    self.store
                        .set_stage(
                            &node.id,
                            &node.kind,
                            StageState::Running,
                            &node.fingerprint,
                            None,
                        )
                        .await?;
                    self.store.event(Some(&node.id), "info", "started").await?;
                    tracing::info!(stage = %node.id, kind = %node.kind, "stage started");
                    ran.push(node.id.clone());
                    let token = self.cancel.child_token();
                    tokens.insert(i, token.clone());
                    let store = self.store.clone();
                    let ready = node.continuous.then(|| ready_tx.clone());
                    let (id, retries, backoff) = (node.id.clone(), node.retries, self.backoff);
                    let upstreams: Vec<Upstream> = node
                        .deps
                        .iter()
                        .filter(|&&d| state[d] == S::Running)
                        .map(|&d| Upstream::new(&self.nodes[d].id, signals[d].subscribe()))
                        .collect();
                    if !upstreams.is_empty() {
                        let names: Vec<&str> = upstreams.iter().map(|u| u.stage.as_str()).collect();
                        tracing::info!(stage = %node.id, "started beside {}, still running", names.join(", "));
                    }
                    let overlap = (Progress::new(signals[i].clone()), upstreams);
                    tasks.spawn(async move {
                        let r = run_with_retries(
                            stage, &id, retries, store, token, ready, backoff, overlap,
                        )
                        .await;
                        (i, r)
                    });
                }
            }
            // Park continuous stages that are ready and that nothing selected still waits for.
            for i in selected.iter().copied() {
                if state[i] == S::Ready && !parked.contains(&i) {
                    let waiting = self.dag.descendants(i).iter().any(|d| {
                        selected.contains(d) && matches!(state[*d], S::Pending | S::Running)
                    });
                    if !waiting || failure.is_some() {
                        if let Some(t) = tokens.get(&i) {
                            t.cancel();
                        }
                        parked.insert(i);
                    }
                }
            }
            if tasks.is_empty() {
                break;
            }
            tokio::select! {
                joined = tasks.join_next() => {
                    let Some(joined) = joined else { break };
                    let (i, result) = match joined {
                        Ok(x) => x,
                        Err(e) => {
                            // A stage panicked: treat it as a permanent failure of the whole run.
                            return Err(Error::permanent(format!("internal: a stage task failed: {e}")));
                        }
                    };
                    let node = &self.nodes[i];
                    tokens.remove(&i);
                    match result {
                        Ok(()) => {
                            state[i] = S::Done;
                            self.store.set_stage(&node.id, &node.kind, StageState::Done, &node.fingerprint, None).await?;
                            signal(i, UpstreamState::Done);
                            self.store.event(Some(&node.id), "info", "done").await?;
                            tracing::info!(stage = %node.id, "stage done");
                        }
                        Err(e) if e.kind == ErrorKind::Interrupted => {
                            if parked.contains(&i) {
                                // Stopped while ready: stays ready, the next run resumes it.
                                state[i] = S::Ready;
                                signal(i, UpstreamState::Stopped);
                                self.store.event(Some(&node.id), "info", "paused while ready").await?;
                            } else {
                                state[i] = S::Pending;
                                signal(i, UpstreamState::Stopped);
                                interrupted = true;
                                self.store.set_stage(&node.id, &node.kind, StageState::Pending, &node.fingerprint, Some("interrupted; the next run resumes it")).await?;
                                self.store.event(Some(&node.id), "warn", "interrupted").await?;
                                tracing::warn!(stage = %node.id, "stage interrupted; the next run resumes it");
                            }
                        }
                        Err(e) => {
                            let e = e.context(format!("stage `{}`", node.id));
                            let text = e.to_string();
                            state[i] = S::Pending;
                            signal(i, UpstreamState::Stopped);
                            self.store.set_stage(&node.id, &node.kind, StageState::Failed, &node.fingerprint, Some(&text)).await?;
                            self.store.event(Some(&node.id), "error", &text).await?;
                            tracing::error!(stage = %node.id, "stage failed: {text}");
                            if failure.is_none() {
                                failure = Some((node.id.clone(), e));
                                // Stop everything else at its next checkpoint.
                                for t in tokens.values() {
                                    t.cancel();
                                }
                            }
                        }
                    }
                }
                Some(id) = ready_rx.recv() => {
                    if let Some(i) = self.nodes.iter().position(|n| n.id == id)
                        && state[i] == S::Running {
                            state[i] = S::Ready;
                            let node = &self.nodes[i];
                            self.store.set_stage(&node.id, &node.kind, StageState::Ready, &node.fingerprint, None).await?;
                            self.store.event(Some(&node.id), "info", "ready").await?;
                            tracing::info!(stage = %node.id, "stage ready");
                        }
                }
                _ = self.cancel.cancelled(), if !interrupted => {
                    interrupted = true;
                    tracing::warn!("stopping at the next checkpoint");
                }
            }
        }

        if let Some((stage, e)) = failure {
            return Ok(Outcome::Failed {
                stage,
                error: e.to_string(),
                data_differs: e.kind == ErrorKind::DataDiffers,
            });
        }
        if interrupted || self.cancel.is_cancelled() {
            let unfinished = selected
                .iter()
                .any(|&i| !matches!(state[i], S::Done | S::Ready));
            if unfinished {
                return Ok(Outcome::Interrupted);
            }
        }
        Ok(Outcome::Done { ran, skipped })
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_with_retries(
    stage: Arc<dyn Stage>,
    id: &str,
    retries: u32,
    store: Arc<dyn StateStore>,
    cancel: CancellationToken,
    ready: Option<mpsc::UnboundedSender<String>>,
    backoff: fn(u32) -> std::time::Duration,
    (progress, upstreams): (Progress, Vec<Upstream>),
) -> Result<()> {
    let mut attempt = 1;
    loop {
        let cx = StageContext::new(id, attempt, store.clone(), cancel.clone(), ready.clone())
            .with_overlap(progress.clone(), upstreams.clone());
        let started = Instant::now();
        let result = stage.run(&cx).await;
        match result {
            Ok(()) => {
                tracing::debug!(stage = %id, elapsed = ?started.elapsed(), "stage finished");
                // Never done before a dependency it ran beside.
                for mut u in upstreams {
                    if u.state() != UpstreamState::Done {
                        tracing::debug!(stage = %id, "waiting for {} to be done", u.stage);
                    }
                    tokio::select! {
                        r = u.done() => r?,
                        _ = cancel.cancelled() => return Err(Error::interrupted()),
                    }
                }
                return Ok(());
            }
            Err(e) if e.is_transient() && attempt <= retries && !cancel.is_cancelled() => {
                let pause = backoff(attempt);
                let msg = format!(
                    "transient failure (attempt {attempt} of {}), retrying in {}: {e}",
                    retries + 1,
                    humantime::format_duration(pause)
                );
                tracing::warn!(stage = %id, "{msg}");
                let _ = store.event(Some(id), "warn", &msg).await;
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = cancel.cancelled() => return Err(Error::interrupted()),
                }
                attempt += 1;
            }
            Err(e)
                if cancel.is_cancelled()
                    && !matches!(e.kind, ErrorKind::Permanent | ErrorKind::DataDiffers) =>
            {
                return Err(Error::interrupted());
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
