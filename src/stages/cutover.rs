//! The `cutover` stage, per database: waits for approval, fences the source, has cdc drain to the
//! source's WAL position of the fence, and reports the write downtime.
//!
//! - approval "manual" (default) waits for the `cutover` request that `pgferry cutover PLAN` records
//!   in the store, then for cdc to be within `max_lag` of the source (it says why it waits, every
//!   10 s, in the log and the store's events). "auto" proceeds once cdc has stayed within `max_lag`
//!   of the source for `quiet_for` (defaults in `plan::raw::defaults`): every `max_lag` it samples the
//!   source's WAL position and counts the lag as small when cdc's applied position has reached the
//!   previous sample (or the current position).
//! - fence "read_only" (default): `ALTER DATABASE <source> SET default_transaction_read_only = on`,
//!   then terminates the database's other client sessions (not walsenders). "revoke_writes": takes
//!   the write privileges on the selected tables from every role and waits for the transactions that
//!   wrote ([`super::fence`]; for a role that may do neither). "none": no fence.
//! - Then it records `pg_current_wal_insert_lsn()` (every commit so far is before it, also with
//!   asynchronous commit) in its checkpoint `drain:<db>`; cdc applies up to at least that
//!   position and finishes (done). The cutover waits for that (at most `timeout`),
//!   then copies what logical decoding does not carry (unlogged tables, large objects; see
//!   [`super::unreplicated`]) and refreshes materialized views, and reports the downtime: fence to
//!   all of that done.
//! - A failure after the fence resets `default_transaction_read_only` on the source and says so. A
//!   successful cutover keeps the fence.
//! - A rehearsal (`run --rehearsal`) fences nothing and ends no session: see [`Cutover::rehearse`].
//!   A manual approval is not waited for (it proceeds once cdc is within `max_lag`, and says so);
//!   the detail records `simulated_downtime_seconds` instead of `downtime_seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::cdc::{applied_position, drain_key, drain_lsn};
use super::hold::{self, Hold};
use super::{Env, Stage, StageContext};
use crate::error::{Error, Result};
use crate::pg::ident::quote_ident;
use crate::pg::lsn::{self, Lsn};
use crate::pg::privileges;
use crate::plan::StageKind;
use crate::plan::{Database, StageOptions};
use crate::state::StageState;
use crate::status::{CUTOVER_DETAIL_KEY, CutoverPhase};

const POLL: Duration = Duration::from_millis(250);

struct Options {
    manual: bool,
    max_lag: Duration,
    quiet_for: Duration,
    fence: bool,
    /// The `revoke_writes` fence ([`super::fence`]).
    revoke: bool,
    timeout: Duration,
    analyze: bool,
}

pub struct Cutover {
    env: Arc<Env>,
    index: usize,
}

impl Cutover {
    pub fn new(env: Arc<Env>, index: usize) -> Cutover {
        Cutover { env, index }
    }

    fn options(&self, db: usize) -> Options {
        let o = match self.env.plan.stages[self.index].options.get(db) {
            Some(StageOptions::Cutover(o)) => o.clone(),
            _ => Default::default(),
        };
        Options {
            manual: o.manual(),
            max_lag: o.max_lag().max(Duration::from_millis(200)),
            quiet_for: o.quiet_for(),
            fence: o.read_only_fence(),
            revoke: o.revoke_writes_fence(),
            timeout: o.timeout(),
            analyze: o.analyze(),
        }
    }

    /// The cdc stage this cutover drains.
    fn cdc_stage(&self) -> Option<String> {
        let plan = &self.env.plan;
        plan.stages[self.index]
            .after
            .iter()
            .map(|&i| &plan.stages[i])
            .chain(plan.stages.iter())
            .find(|s| s.kind == StageKind::Cdc)
            .map(|s| s.id.clone())
    }

    async fn sleep(&self, cx: &StageContext, d: Duration) -> Result<()> {
        tokio::select! {
            _ = cx.cancel.cancelled() => Err(Error::interrupted()),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }

    async fn approve(&self, cx: &StageContext, db: &Database, o: &Options) -> Result<()> {
        let waiting_for = if o.manual && !self.env.rehearsal {
            format!("waiting for `pgferry cutover {}`", self.env.plan.path)
        } else {
            format!(
                "waiting until cdc stays within max_lag ({}) for {}",
                humantime::format_duration(o.max_lag),
                humantime::format_duration(if o.manual {
                    Duration::ZERO
                } else {
                    o.quiet_for
                })
            )
        };
        record_phase(cx, db, CutoverPhase::ReadyToComplete, &waiting_for).await?;
        if o.manual && self.env.rehearsal {
            let msg = format!(
                "rehearsal: the cutover of {} has approval = \"manual\"; a rehearsal does not wait for `pgferry cutover` and proceeds once cdc is within max_lag ({})",
                db.name,
                humantime::format_duration(o.max_lag)
            );
            announce(cx, &msg).await?;
        } else if o.manual {
            let plan = &self.env.plan;
            let mut said = false;
            loop {
                if let Some(at) = cx.store.requested("cutover").await? {
                    tracing::info!(database = %db.name, requested_at = %at, "cutover approved; fencing once cdc is within max_lag");
                    record_phase(
                        cx,
                        db,
                        CutoverPhase::CuttingOver,
                        &format!("approved at {at}; fencing once cdc is within max_lag"),
                    )
                    .await?;
                    break;
                }
                if !said {
                    tracing::info!(database = %db.name, "waiting for `pgferry cutover {}`", plan.path);
                    said = true;
                }
                self.sleep(cx, Duration::from_secs(1)).await?;
            }
        }
        let control = self
            .env
            .source_for(db)
            .past_fence()
            .connect("cutover")
            .await?;
        // Approved (manual) or automatic: fence only once cdc is close behind the source, so the
        // write downtime stays short. A manual approval does not also wait for `quiet_for`.
        let quiet_for = if o.manual {
            Duration::ZERO
        } else {
            o.quiet_for
        };
        let mut quiet_since: Option<Instant> = None;
        let mut previous: Option<Lsn> = None;
        let mut last_said: Option<Instant> = None;
        loop {
            let now = lsn::current_insert_lsn(&control).await?;
            let applied: Option<Lsn> = cx.store.position(&applied_position(&db.name)).await?;
            let lag = crate::lag::Lag::new(
                cx.store
                    .counter(&db.name, crate::lag::OLDEST_UNAPPLIED_GAUGE)
                    .await?,
                crate::lag::now_ms(),
                Some(now),
                applied,
            );
            // Small: the oldest commit cdc has received and not applied is at most `max_lag` old,
            // and cdc has received everything the source had written one `max_lag` ago (a commit
            // still in the source's WAL, not yet sent, is behind too).
            let received = match (previous, applied) {
                (_, Some(a)) if a >= now => true,
                (Some(p), Some(a)) => a >= p,
                _ => false,
            };
            let recent = lag.seconds.is_none_or(|s| s <= o.max_lag.as_secs_f64());
            let small = received && recent;
            if small {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= quiet_for {
                    tracing::info!(database = %db.name, "cutover: lag within max_lag; proceeding");
                    record_phase(
                        cx,
                        db,
                        CutoverPhase::CuttingOver,
                        "cdc is within max_lag: fencing",
                    )
                    .await?;
                    return Ok(());
                }
            } else {
                quiet_since = None;
                if previous.is_some()
                    && last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    let msg = if applied.is_none() {
                        format!(
                            "cutover of {} waits before fencing: cdc has applied nothing yet, so it is everything behind the source; max_lag is {}",
                            db.name,
                            humantime::format_duration(o.max_lag)
                        )
                    } else if recent {
                        format!(
                            "cutover of {} waits before fencing: cdc is {lag} the source and has not yet received all the source had written max_lag ({}) ago",
                            db.name,
                            humantime::format_duration(o.max_lag)
                        )
                    } else {
                        format!(
                            "cutover of {} waits before fencing: cdc is {lag} the source, more than max_lag ({})",
                            db.name,
                            humantime::format_duration(o.max_lag)
                        )
                    };
                    announce(cx, &msg).await?;
                    last_said = Some(Instant::now());
                }
            }
            previous = Some(now);
            self.sleep(cx, o.max_lag).await?;
        }
    }

    /// [`Cutover::approve`], with the target's planner statistics gathered meanwhile (unless
    /// `analyze = false` or an earlier attempt did): both must be done before the fence.
    async fn approve_and_analyze(
        &self,
        cx: &StageContext,
        db: &Database,
        o: &Options,
    ) -> Result<()> {
        let key = super::analyze::checkpoint_key(&db.name);
        let analyze = async {
            if !o.analyze || cx.store.checkpoint(&cx.stage, &key).await?.is_some() {
                return Ok(());
            }
            let (carried, carried_at) =
                super::statistics::carried_tables(&self.env, cx, db).await?;
            let mut done = super::analyze::analyze(&self.env, db, &carried, &cx.cancel).await?;
            if let (Some(obj), Some(at)) = (done.as_object_mut(), carried_at) {
                // Every table carried over, partitions included (ANALYZE counts roots).
                obj.insert("carried_over".into(), serde_json::json!(carried.len()));
                obj.insert("carried_over_at".into(), serde_json::json!(at));
            }
            cx.store.put_checkpoint(&cx.stage, &key, &done).await?;
            let msg = format!(
                "planner statistics of {} gathered on the target: ANALYZE of {} table(s) in {:.1}s, before the fence{}",
                db.target,
                done.get("tables")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                done.get("seconds")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.0),
                if carried.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} carried over from the source by post_data, not analyzed)",
                        carried.len()
                    )
                }
            );
            announce(cx, &msg).await
        };
        tokio::try_join!(self.approve(cx, db, o), analyze)?;
        Ok(())
    }

    /// What the checkpoint says of the statistics of `db`, for the cutover's detail.
    async fn statistics(
        &self,
        cx: &StageContext,
        db: &Database,
        o: &Options,
    ) -> Result<serde_json::Value> {
        if !o.analyze {
            return Ok(serde_json::json!({ "analyze": false }));
        }
        Ok(cx
            .store
            .checkpoint(&cx.stage, &super::analyze::checkpoint_key(&db.name))
            .await?
            .unwrap_or(serde_json::Value::Null))
    }

    async fn fenced_part(
        &self,
        cx: &StageContext,
        db: &Database,
        o: &Options,
        source: &tokio_postgres::Client,
    ) -> Result<Lsn> {
        if o.fence {
            // Sessions of roles this one may not end (a superuser's, on a managed service) would
            // keep writing past the drain position: refuse (the caller unfences).
            let stuck = privileges::sessions_it_cannot_end(source, &db.name).await?;
            if !stuck.is_empty() {
                let list: Vec<String> = stuck.iter().map(|(r, n)| format!("{r} ({n})")).collect();
                return Err(Error::permanent(format!(
                    "the fence cannot end the sessions of role(s) {} on source database {}: the migration role may not signal them",
                    list.join(", "),
                    db.name
                ))
                .hint("end those sessions first (or stop their application), or GRANT pg_signal_backend (or the roles themselves) to the migration role; preflight lists the roles"));
            }
            let ended = privileges::end_sessions(source, &db.name).await?;
            // pg_terminate_backend only signals: a session in the middle of its COMMIT may still
            // write its commit record. Wait (briefly) until those sessions are gone before taking
            // the target. Only those: an application that reconnects at once opens sessions that
            // start read-only, and waiting for every session kept the fence waiting its whole
            // 10 s (seen in the cutover benchmark, whose writer reconnects: 10.3 s of downtime
            // in 2 runs of 4, 0.5 s in the others).
            let gone_by = Instant::now() + Duration::from_secs(10);
            loop {
                let left = privileges::sessions_left(source, &ended).await?;
                if left == 0 || Instant::now() > gone_by {
                    break;
                }
                self.sleep(cx, Duration::from_millis(50)).await?;
            }
        }
        let cdc = self.cdc_stage();
        let cdc_done = |records: &[crate::state::StageRecord]| match &cdc {
            None => true,
            Some(id) => records
                .iter()
                .any(|s| &s.stage == id && s.state == StageState::Done),
        };
        let earlier = cx.store.checkpoint(&cx.stage, &drain_key(&db.name)).await?;
        let earlier = drain_lsn(earlier.as_ref())?;
        if let (Some(target), true) = (earlier, cdc_done(&cx.store.stages().await?)) {
            // An earlier attempt drained cdc and stopped it; nothing may have come since.
            self.nothing_left_in_slot(db, source).await?;
            return Ok(target);
        }
        // The insert position, not pg_current_wal_lsn() (the write position): with
        // synchronous_commit = off the last commit records may still sit in the WAL buffers,
        // behind the write position, and a drain to that position would miss them.
        let target = lsn::current_insert_lsn(source).await?;
        cx.store
            .put_checkpoint(
                &cx.stage,
                &drain_key(&db.name),
                &serde_json::json!({ "lsn": target.to_string() }),
            )
            .await?;
        self.wait_drained(cx, db, o, target).await?;
        Ok(target)
    }

    /// Waits (at most `timeout`) until cdc has applied up to `target` and finished.
    async fn wait_drained(
        &self,
        cx: &StageContext,
        db: &Database,
        o: &Options,
        target: Lsn,
    ) -> Result<()> {
        let cdc = self.cdc_stage();
        let cdc_done = |records: &[crate::state::StageRecord]| match &cdc {
            None => true,
            Some(id) => records
                .iter()
                .any(|s| &s.stage == id && s.state == StageState::Done),
        };
        let deadline = Instant::now() + o.timeout;
        loop {
            let applied: Option<Lsn> = cx.store.position(&applied_position(&db.name)).await?;
            let drained = applied.is_some_and(|a| a >= target);
            if drained && cdc_done(&cx.store.stages().await?) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::permanent(format!(
                    "cdc did not drain to {target} within {} (applied: {})",
                    humantime::format_duration(o.timeout),
                    applied.map(|a| a.to_string()).unwrap_or_else(|| "none".into())
                ))
                .hint("look at the cdc stage's errors (`pgferry status PLAN`), then run the plan again"));
            }
            self.sleep(cx, POLL).await?;
        }
    }

    /// After cdc finished in an earlier attempt: the slot must hold no change of the publication
    /// (the source was fenced all along). Changes there mean the source was written after an
    /// unfence, and cdc has to run again.
    async fn nothing_left_in_slot(
        &self,
        db: &Database,
        source: &tokio_postgres::Client,
    ) -> Result<()> {
        let slot = crate::pg::names::slot_name(&self.env.plan.name, &db.name);
        let publication = crate::pg::names::publication_name(&self.env.plan.name);
        let exists: bool = source
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await
            .map_err(|e| Error::pg(&e, "looking for the replication slot"))?
            .get(0);
        if !exists {
            return Ok(());
        }
        // pgoutput message types: I(nsert), U(pdate), D(elete), T(runcate).
        let pending: i64 = source
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_logical_slot_peek_binary_changes($1, NULL, NULL,                    'proto_version', '1', 'publication_names', $2)                   WHERE pg_catalog.get_byte(data, 0) IN (73, 85, 68, 84)",
                &[&slot, &publication],
            )
            .await
            .map_err(|e| Error::pg(&e, format!("reading what is left in slot {slot}")))?
            .get(0);
        if pending > 0 {
            return Err(Error::permanent(format!(
                "cdc already finished, but slot {slot} holds {pending} change(s) committed on the source since (it was written to after an earlier cutover attempt made it writable again); nothing of them was applied"
            ))
            .hint(format!(
                "apply them with `pgferry run {} --rerun {}` (cdc streams from its applied position, then the cutover runs again)",
                self.env.plan.path,
                self.cdc_stage().unwrap_or_else(|| "cdc".into())
            )));
        }
        Ok(())
    }

    /// The rehearsal of [`Cutover::cut`]: no fence, no session ended. At the simulated fence it
    /// holds cdc (the validation hold protocol, so cdc cannot apply past what it is about to be
    /// told), reads the source's WAL insert position as the drain target, records it and releases
    /// the hold: cdc applies exactly the transactions committed before the target and finishes,
    /// while the source goes on being written. Then what logical decoding does not carry is copied
    /// as in a real cutover, and the simulated write downtime (simulated fence to all of that done)
    /// recorded.
    async fn rehearse(
        &self,
        cx: &StageContext,
        db: &Database,
        o: &Options,
    ) -> Result<serde_json::Value> {
        let earlier = cx.store.checkpoint(&cx.stage, &drain_key(&db.name)).await?;
        let earlier = drain_lsn(earlier.as_ref())?;
        if earlier.is_none() {
            self.approve_and_analyze(cx, db, o).await?;
        } else {
            record_phase(
                cx,
                db,
                CutoverPhase::CuttingOver,
                "simulated fence taken in an earlier attempt: draining",
            )
            .await?;
        }
        let fenced_at = Instant::now();
        let target = match earlier {
            // An earlier attempt took the simulated fence: the drain goes there still.
            Some(l) => l,
            None => self.simulated_fence(cx, db, o).await?,
        };
        let msg = format!(
            "rehearsal: simulated fence of {} at {target}; the source stays writable, cdc drains to that position",
            db.name
        );
        announce(cx, &msg).await?;
        self.wait_drained(cx, db, o, target).await?;
        let resync = self.resync(cx, db).await?;
        let downtime = fenced_at.elapsed();
        let msg = format!(
            "rehearsal of the cutover of {} -> {} done at {target}; simulated write downtime {:.1}s (the source was not fenced)",
            db.name,
            db.target,
            downtime.as_secs_f64()
        );
        announce(cx, &msg).await?;
        Ok(serde_json::json!({
            "lsn": target.to_string(),
            "rehearsal": true,
            "simulated_downtime_seconds": downtime.as_secs_f64(),
            "fenced": false,
            "resync": resync,
            "managed_apply": super::cdc::managed::after_cutover(&self.env, db, cx).await?,
            "statistics": self.statistics(cx, db, o).await?,
        }))
    }

    /// Copies again what logical replication does not carry (unlogged tables, large objects,
    /// materialized views), after the drain.
    async fn resync(
        &self,
        cx: &StageContext,
        db: &Database,
    ) -> Result<super::unreplicated::Resync> {
        super::unreplicated::resync(&self.env, db, &cx.cancel)
            .await
            .map_err(|e| e.context("copying what logical replication does not carry"))
    }

    /// Takes the drain target of a rehearsal: with cdc held (so it cannot apply past the target
    /// before it reads it), the source's WAL insert position, recorded as `drain:<db>`.
    async fn simulated_fence(&self, cx: &StageContext, db: &Database, o: &Options) -> Result<Lsn> {
        let source = self.env.source_for(db).connect("cutover rehearsal").await?;
        let insert_lsn = async || lsn::current_insert_lsn(&source).await;
        if self.cdc_stage().is_none() {
            let target = insert_lsn().await?;
            cx.store
                .put_checkpoint(
                    &cx.stage,
                    &drain_key(&db.name),
                    &serde_json::json!({ "lsn": target.to_string() }),
                )
                .await?;
            return Ok(target);
        }
        // Validations of this database take turns through the hold protocol; so does this.
        let guard = self.env.target_for(db).connect("cutover rehearsal").await?;
        guard
            .execute(
                "SELECT pg_catalog.pg_advisory_lock($1)",
                &[&hold::lock_key(&self.env.plan.name, &db.name)],
            )
            .await
            .map_err(|e| Error::pg(&e, "waiting for validations of this database to finish"))?;
        let hold = Hold::new(cx.store.as_ref(), &db.name);
        let h0 = insert_lsn().await?;
        hold.request(h0).await?;
        let held = async {
            if hold.wait_held(h0, o.timeout, &cx.cancel).await? {
                return Ok(());
            }
            Err(Error::permanent(format!(
                "cdc did not pause for the simulated fence within {}",
                humantime::format_duration(o.timeout)
            ))
            .hint("look at the cdc stage's state and errors (`pgferry status PLAN`), then run the rehearsal again"))
        };
        let taken = async {
            held.await?;
            let target = insert_lsn().await?;
            cx.store
                .put_checkpoint(
                    &cx.stage,
                    &drain_key(&db.name),
                    &serde_json::json!({ "lsn": target.to_string(), "rehearsal": true }),
                )
                .await?;
            Ok::<_, Error>(target)
        }
        .await;
        // Whatever happened, cdc must not stay held.
        let released = hold.release(h0).await;
        drop(guard);
        let target = taken?;
        released?;
        Ok(target)
    }

    async fn cut(
        &self,
        cx: &StageContext,
        db: &Database,
        o: &Options,
    ) -> Result<serde_json::Value> {
        if self.env.rehearsal {
            return self.rehearse(cx, db, o).await;
        }
        // An earlier attempt that got as far as the fence was approved already: with the source
        // fenced (and cdc perhaps finished) there is no lag left to wait for.
        let fenced_before = cx
            .store
            .checkpoint(&cx.stage, &drain_key(&db.name))
            .await?
            .is_some();
        if fenced_before {
            record_phase(
                cx,
                db,
                CutoverPhase::CuttingOver,
                "fenced in an earlier attempt: draining",
            )
            .await?;
        } else {
            self.approve_and_analyze(cx, db, o).await?;
        }
        let fallback = super::fallback::planned(&self.env);
        if fallback && !fenced_before {
            super::fallback::check_target(&self.env, db).await?;
        }
        let source = self
            .env
            .source_for(db)
            .past_fence()
            .connect("cutover")
            .await?;
        let fenced_at = Instant::now();
        let alter = format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            quote_ident(&db.name)
        );
        if o.fence {
            source
                .batch_execute(&alter)
                .await
                .map_err(|e| Error::pg(&e, "fencing the source database (read only)"))?;
            cx.store
                .event(
                    Some(&cx.stage),
                    "warn",
                    &format!("source database {} is now read-only", db.name),
                )
                .await?;
        }
        let fenced = async {
            if o.revoke {
                let n = super::fence::revoke_writes(
                    &source,
                    cx.store.as_ref(),
                    &self.env.plan.state.schema,
                    db,
                    o.timeout,
                )
                .await?;
                cx.store
                    .event(
                        Some(&cx.stage),
                        "warn",
                        &format!(
                            "source database {}: the fence took {n} write privilege(s) on the selected tables (`pgferry unfence` gives them back)",
                            db.name
                        ),
                    )
                    .await?;
            }
            let lsn = self.fenced_part(cx, db, o, &source).await?;
            let resync = self.resync(cx, db).await?;
            // The reverse stream starts here: after every write of pgferry's, before any of the
            // application's (see `fallback`).
            let armed = match fallback {
                true => Some(super::fallback::arm(&self.env, cx, db, lsn).await?),
                false => None,
            };
            Ok::<_, Error>((lsn, resync, armed))
        };
        match fenced.await {
            Ok((lsn, resync, armed)) => {
                let downtime = fenced_at.elapsed();
                let msg = format!(
                    "cutover of {} -> {} done at {lsn}; write downtime {:.1}s",
                    db.name,
                    db.target,
                    downtime.as_secs_f64()
                );
                announce(cx, &msg).await?;
                Ok(serde_json::json!({
                    "lsn": lsn.to_string(),
                    "downtime_seconds": downtime.as_secs_f64(),
                    "fenced": o.fence || o.revoke,
                    "resync": resync,
                    "managed_apply": super::cdc::managed::after_cutover(&self.env, db, cx).await?,
                    "statistics": self.statistics(cx, db, o).await?,
                    "fallback": armed,
                }))
            }
            Err(e) => {
                if o.revoke {
                    let given = match self
                        .env
                        .source_for(db)
                        .past_fence()
                        .connect("cutover unfence")
                        .await
                    {
                        Ok(c) => super::fence::restore(&c, cx.store.as_ref(), &db.name).await,
                        Err(e) => Err(e),
                    };
                    return Err(match given {
                        Ok(_) => e.context(format!("cutover failed after the fence; the write privileges on source database `{}` are given back", db.name)),
                        Err(u) => e.context(format!("cutover failed after the fence and the write privileges it took on source database `{}` could NOT be given back ({u}); run `pgferry unfence PLAN`", db.name)),
                    });
                }
                if !o.fence {
                    return Err(e);
                }
                let reset = format!(
                    "ALTER DATABASE {} RESET default_transaction_read_only",
                    quote_ident(&db.name)
                );
                let unfence = match self
                    .env
                    .source_for(db)
                    .past_fence()
                    .connect("cutover unfence")
                    .await
                {
                    Ok(c) => c
                        .batch_execute(&reset)
                        .await
                        .map_err(|e| Error::pg(&e, "unfencing")),
                    Err(e) => Err(e),
                };
                Err(match unfence {
                    Ok(()) => e.context(format!("cutover failed after the fence; source database `{}` is writable again", db.name)),
                    Err(u) => e.context(format!(
                        "cutover failed after the fence and the source database `{}` could NOT be made writable again ({u}); run `{reset}` on the source",
                        db.name
                    )),
                })
            }
        }
    }
}

#[async_trait]
impl Stage for Cutover {
    fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, db) in self.env.plan.databases.iter().enumerate() {
            let o = self.options(i);
            out.push(format!(
                "cut over {} -> {}: {}, {}, drain cdc to the source's position, report the downtime",
                db.name,
                db.target,
                if o.manual {
                    "wait for `pgferry cutover`".to_string()
                } else {
                    format!(
                        "when the lag stays under {} for {}",
                        humantime::format_duration(o.max_lag),
                        humantime::format_duration(o.quiet_for)
                    )
                },
                if o.fence {
                    "make the source database read-only and end its sessions"
                } else if o.revoke {
                    "revoke the write privileges on the selected tables and wait for the transactions that wrote"
                } else {
                    "no fence"
                }
            ));
            out.push(if o.analyze {
                format!(
                    "  planner statistics of {}: ANALYZE every selected table on the target while waiting for the approval, done before the fence (pg_dump carries none before PostgreSQL 18)",
                    db.target
                )
            } else {
                format!(
                    "  planner statistics of {}: none gathered (analyze = false); the target's first queries run on whatever statistics it has",
                    db.target
                )
            });
        }
        out
    }

    async fn run(&self, cx: &StageContext) -> Result<()> {
        cx.for_each_database(
            self.env.plan.databases.iter().enumerate(),
            |i, db| async move {
                let o = self.options(i);
                self.cut(cx, db, &o)
                    .await
                    .map_err(|e| e.context(format!("database `{}`", db.name)))
            },
        )
        .await
    }
}

/// Records how far the cutover of `db` got in the stage's detail, which `status` reads to tell
/// `READY_TO_COMPLETE` (waiting for the approval or the lag condition) from `CUTTING_OVER`.
async fn record_phase(
    cx: &StageContext,
    db: &Database,
    phase: CutoverPhase,
    note: &str,
) -> Result<()> {
    let mut detail = cx
        .store
        .stages()
        .await?
        .into_iter()
        .find(|r| r.stage == cx.stage)
        .map(|r| r.detail)
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    let entry = serde_json::json!({
        "phase": phase,
        "since": crate::state::Timestamp::now(),
        "note": note,
    });
    if let Some(obj) = detail.as_object_mut() {
        let dbs = obj
            .entry(CUTOVER_DETAIL_KEY)
            .or_insert_with(|| serde_json::json!({}));
        if !dbs.is_object() {
            *dbs = serde_json::json!({});
        }
        if let Some(dbs) = dbs.as_object_mut() {
            dbs.insert(db.name.clone(), entry);
        }
    }
    cx.store.set_stage_detail(&cx.stage, &detail).await
}

/// Says `msg` in the log and in the run's events.
async fn announce(cx: &StageContext, msg: &str) -> Result<()> {
    tracing::info!("{msg}");
    cx.store.event(Some(&cx.stage), "info", msg).await
}
