//! The HA loop: observe → decide (pure) → execute, once per `loop_wait` or at once when the DCS
//! watch, postgres, or a finished background task says something changed.
//!
//! - [`observe`]: the observation types; [`HaLoop::observe`] fills them.
//! - [`decide`]: the pure decision.
//! - [`timing`]: lease and fence arithmetic.
//! - this file: the executor, the published status, the member record, shutdown.

pub mod commands;
pub mod core;
pub mod decide;
pub mod dynamic_copy;
pub mod failsafe;
pub mod local;
pub mod observe;
pub mod ports;
pub mod quorum;
pub mod restart;
pub mod slots;
pub mod sync;
pub mod timing;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Config, DynamicConfig, Timing};
use crate::dcs::{ClusterView, Dcs, DcsError, LeaderStatus, MemberRecord, PATRONI_API_VERSION};
use crate::error::error_chain;
use crate::postgres::conf::{self, ManagedFiles, StandbySettings};
use crate::postgres::controldata;
use crate::postgres::supervisor::{Postmaster, StopMode};
use crate::state::{AgentStatus, PgState, Role};

use self::commands::{CancelRestartReply, ReinitializeReply, ReloadReply, RestartReply};
use self::core::HaCore;
use self::decide::{decide, topology, Action, Decision, MemberFacts, Outcome, StreamFrom};
use self::observe::{
    DataDir, DcsView, LeaseCheck, Observation, PeerAnswer, PostgresView, TaskKind, TaskView,
};
use self::ports::{LongTask, Peers, Postgres, Runtime, TaskError};
use crate::postgres::replica::{self, Upstream};

/// Why the HA loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// The agent must not continue (foreign data directory, failed bootstrap, ...).
    #[error("{0}")]
    Fatal(String),
    /// The loop's task panicked or was cancelled.
    #[error("the HA loop ended abnormally")]
    Aborted(#[source] tokio::task::JoinError),
}

/// How often the loop asks postgres whether a requested promotion has completed.
const PROMOTION_POLL: Duration = Duration::from_millis(50);

/// How a cycle ended, for scheduling the next one.
enum Next {
    /// Wait for `loop_wait` or an event.
    Wait,
    /// Something was lost or changed: run again at once.
    Now,
    /// Waiting for the leader's member record (its address, its checkpoint after promotion),
    /// whose changes do not wake the loop: look again shortly instead of after `loop_wait`.
    Soon,
}

/// Everything the HA loop owns: its ports (`D`: the DCS, `P`: postgres, `N`: the peers'
/// APIs, `R`: clocks) and what it remembers between cycles.
pub struct HaLoop<D: Dcs + ?Sized, P: Postgres, N: Peers, R: Runtime> {
    config: Arc<Config>,
    dynamic: DynamicConfig,
    facts: MemberFacts,
    dcs: Arc<D>,
    pg: P,
    peers: N,
    rt: R,
    status_tx: watch::Sender<Arc<AgentStatus>>,
    pg_changed: Arc<Notify>,
    /// The timing of `dynamic`, derived once per change and read by the DCS client.
    timing: watch::Sender<Timing>,
    task: Option<(TaskKind, P::Task)>,
    task_failed: Option<(TaskKind, String)>,
    /// The DCS `config` value last parsed into `dynamic`.
    applied_config: Option<serde_json::Value>,
    /// What the supervisor was last told: this member is the standby leader (callbacks' role).
    told_standby_leader: bool,
    /// What the loop remembers between cycles, and the rules over it.
    core: HaCore,
    last_view: Option<Arc<ClusterView>>,
    /// Stopping as a synchronous standby: the member key says `nosync` so the leader picks
    /// another one first (Patroni's `while_not_sync_standby`).
    releasing_sync: bool,
    last_read_at: Option<Instant>,
    dcs_last_seen: Option<SystemTime>,
    last_postgres: Option<crate::state::PostgresStatus>,
    control: Option<controldata::ControlData>,
    requests: Option<tokio::sync::mpsc::Receiver<commands::LoopRequest>>,
    reload: Option<ReloadFn>,
    /// Failsafe mode: the leader's rounds and the replicas' memory of them.
    failsafe: Arc<failsafe::Failsafe>,
    /// The `failsafe` topology we last wrote, until a read shows it in the DCS: a read may
    /// still return the older one, and others race by what the DCS holds, so a round asks both
    /// (simulation seed 1797800011494: the round asked the topology read before the write,
    /// which lacked a member that had just come back; cut off from the leader, that member
    /// raced by the newer one and promoted beside it).
    written_failsafe: Option<std::collections::BTreeMap<String, String>>,
    /// `confirmed_flush_lsn` of the permanent logical slots, as the primary last read them:
    /// published in `status.slots` for the replicas' copies.
    slot_positions: std::collections::BTreeMap<String, u64>,
    /// On a replica, the copied logical slots not yet known safe after a failover; `None`
    /// until the first slot sync seeds it with the copies found at start (as Patroni does).
    slot_readiness: Option<slots::Readiness>,
}

/// One of `create_replica_methods` is a custom method marked `no_leader` (Patroni's
/// `can_create_replica_without_replication_connection`).
fn replica_without_leader(config: &Config) -> bool {
    use crate::postgres::replica_method::ReplicaMethod;
    config.postgresql.create_replica_methods.iter().any(|name| {
        ReplicaMethod::is_custom(config, name)
            && ReplicaMethod::of(config, name).is_ok_and(|m| m.no_leader)
    })
}

/// Re-reads the local configuration (`POST /reload`, SIGHUP).
pub type ReloadFn = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Builds the status an agent publishes before its first cycle.
pub fn initial_status(config: &Config) -> AgentStatus {
    AgentStatus {
        scope: config.scope.clone(),
        name: config.name.clone(),
        state: PgState::Stopped,
        role: Role::Uninitialized,
        postgres: None,
        leader_valid_until: None,
        cluster: None,
        cluster_read_at: None,
        dcs_last_seen: None,
        paused: false,
        tags: config.effective_tags(),
        pending_restart: false,
        database_system_identifier: None,
        next_cycle_due: Instant::now(),
        ttl: Duration::from_secs(config.bootstrap.dcs.ttl.into()),
        loop_wait: Duration::from_secs(config.bootstrap.dcs.loop_wait.into()),
        maximum_lag_on_failover: config.bootstrap.dcs.maximum_lag_on_failover,
        postmaster_start_epoch: None,
    }
}

impl<D: Dcs + ?Sized, P: Postgres, N: Peers, R: Runtime> HaLoop<D, P, N, R> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        dcs: Arc<D>,
        pg: P,
        peers: N,
        rt: R,
        status_tx: watch::Sender<Arc<AgentStatus>>,
        pg_changed: Arc<Notify>,
    ) -> Self {
        let facts = MemberFacts {
            name: config.name.clone(),
            nofailover: config.tags.nofailover || config.tags.failover_priority == Some(0),
            failover_priority: config.tags.failover_priority.unwrap_or(1),
            maximum_lag_on_failover: config.bootstrap.dcs.maximum_lag_on_failover,
            use_pg_rewind: config.bootstrap.dcs.postgresql.use_pg_rewind,
            synchronous_mode: config.bootstrap.dcs.synchronous_mode.is_on()
                && config.bootstrap.dcs.standby_source().is_none(),
            quorum_commit: config.bootstrap.dcs.synchronous_mode.is_quorum(),
            standby_cluster: config.bootstrap.dcs.standby_source().is_some(),
            replicatefrom: config.tags.replicatefrom.clone(),
            failsafe_mode: config.bootstrap.dcs.failsafe_mode,
            api_url: config.api_url(),
            replica_without_leader: replica_without_leader(&config),
            check_timeline: config.bootstrap.dcs.check_timeline,
        };
        let failsafe = Arc::new(failsafe::Failsafe::new());
        failsafe.configure(
            config.bootstrap.dcs.failsafe_mode,
            Duration::from_secs(config.bootstrap.dcs.ttl.into()),
        );
        let strict_placeholder = if config.bootstrap.dcs.synchronous_mode_strict {
            "*".to_owned()
        } else {
            String::new()
        };
        let timing = Timing::bootstrap(&config);
        let mut core = HaCore::new(strict_placeholder);
        core.fence = timing.fence;
        HaLoop {
            dynamic: config.bootstrap.dcs.clone(),
            facts,
            config,
            dcs,
            pg,
            peers,
            rt,
            status_tx,
            pg_changed,
            timing: watch::channel(timing).0,
            task: None,
            task_failed: None,
            applied_config: None,
            told_standby_leader: false,
            core,
            last_view: None,
            releasing_sync: false,
            last_read_at: None,
            dcs_last_seen: None,
            last_postgres: None,
            control: None,
            requests: None,
            reload: None,
            failsafe,
            written_failsafe: None,
            slot_positions: Default::default(),
            slot_readiness: None,
        }
    }

    /// The failsafe state this loop shares with the REST API (`POST /failsafe`).
    pub fn with_failsafe(mut self, failsafe: Arc<failsafe::Failsafe>) -> Self {
        failsafe.configure(self.dynamic.failsafe_mode, self.ttl());
        self.failsafe = failsafe;
        self
    }

    /// Before a planned stop of postgres (switchover, demotion, restart, shutdown): a running
    /// backup is ended and recorded as interrupted first, instead of being killed by the
    /// shutdown and counted as failed. Waits at most 15 s, within the lease.
    async fn end_backup(&self, why: &str) {
        let budget =
            crate::backup::interrupt::wait_budget(self.core.lease_certain_until, self.rt.now());
        self.pg.end_backup(why, budget).await;
    }

    /// How to re-read the local configuration on `POST /reload`.
    pub fn with_reload(mut self, reload: ReloadFn) -> Self {
        self.reload = Some(reload);
        self
    }

    /// Applies a re-read local configuration: parameters and tags take effect in the next
    /// cycle (the managed files are rewritten and postgres reloaded when they changed).
    fn reload_config(&mut self) -> ReloadReply {
        let Some(reload) = &self.reload else {
            return ReloadReply::Scheduled;
        };
        match reload() {
            Ok(config) => {
                if config.name != self.config.name || config.scope != self.config.scope {
                    return ReloadReply::NameOrScopeChanged;
                }
                self.facts.nofailover =
                    config.tags.nofailover || config.tags.failover_priority == Some(0);
                self.facts.failover_priority = config.tags.failover_priority.unwrap_or(1);
                self.facts.replicatefrom = config.tags.replicatefrom.clone();
                self.facts.replica_without_leader = replica_without_leader(&config);
                self.config = Arc::new(config);
                info!("local configuration reloaded");
                ReloadReply::Scheduled
            }
            Err(e) => {
                warn!(error = %e, "reload refused: the configuration file is invalid");
                ReloadReply::Invalid(e.to_string())
            }
        }
    }

    /// Requests from the REST API that only the loop can carry out (restart, reinitialise).
    pub fn with_requests(mut self, rx: tokio::sync::mpsc::Receiver<commands::LoopRequest>) -> Self {
        self.requests = Some(rx);
        self
    }

    /// Where the loop sends the timing it derives from the DCS `config` key: the DCS client
    /// holds the receiving end.
    pub fn with_timing(mut self, timing: watch::Sender<Timing>) -> Self {
        timing.send_replace(*self.timing.borrow());
        self.timing = timing;
        self
    }

    fn loop_wait(&self) -> Duration {
        self.timing.borrow().loop_wait
    }

    fn ttl(&self) -> Duration {
        self.timing.borrow().ttl
    }

    fn retry_timeout(&self) -> Duration {
        self.timing.borrow().retry_timeout
    }

    /// Runs until `shutdown` is cancelled (then stops postgres and releases the lock) or a fatal
    /// condition is met.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), HaError> {
        let result = loop {
            let started = self.rt.now();
            self.run_scheduled_restart().await;
            let next = match self.cycle().await {
                Ok(next) => next,
                Err(e) => break Err(e),
            };
            let due = match next {
                Next::Now => started.max(self.rt.now()) + Duration::from_millis(50),
                Next::Soon => started.max(self.rt.now()) + Duration::from_millis(250),
                Next::Wait => timing::next_cycle(started, self.loop_wait(), self.rt.now()),
            };
            // Wake for a scheduled restart on time rather than up to `loop_wait` late.
            let due = match self
                .core
                .scheduled_restart
                .as_ref()
                .and_then(|(r, _)| r.schedule)
            {
                Some(at) => match restart::due(at, self.rt.wall_now(), self.loop_wait()) {
                    restart::Due::Later(d) => due.min(self.rt.now() + d),
                    _ => due,
                },
                None => due,
            };
            self.publish_due(due);
            let wait = due.saturating_duration_since(self.rt.now());
            let promoting = self.promotion_in_flight();
            let task_done = async {
                match self.task.as_mut() {
                    Some((kind, t)) => Some((*kind, t.await)),
                    None => std::future::pending().await,
                }
            };
            let request = async {
                match self.requests.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            // Nothing wakes the loop when a requested promotion completes: without this, the
            // member record, role label, `status`, `history`, the checkpoint and the health
            // endpoints would wait for the next tick, up to `loop_wait` after postgres
            // already accepts writes.
            let promoted = async {
                if !promoting {
                    return std::future::pending().await;
                }
                loop {
                    self.rt.sleep(PROMOTION_POLL).await;
                    if let Ok(status) = self.pg.status().await {
                        if !status.in_recovery {
                            return status;
                        }
                    }
                }
            };
            // Biased: the branches are polled in this order, so that a simulated run is the
            // same every time (the order matters only when several are ready at once).
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                Some(r) = request => self.handle_request(r).await,
                w = self.dcs.wait_for_change(wait) => debug!(wakeup = ?w, "HA loop woken"),
                _ = self.pg_changed.notified() => debug!("postgres state changed"),
                status = promoted => {
                    info!("postgres left recovery: running a cycle now");
                    self.publish_promoted(status);
                }
                r = task_done => {
                    self.task = None;
                    match r {
                        Some((kind, Ok(Ok(())))) => {
                            info!(task = %kind, "finished");
                            if kind == TaskKind::CreateReplica {
                                self.replace_cloned_dynamic_copy();
                            }
                        }
                        Some((kind, Ok(Err(TaskError::NotStarted(e))))) => {
                            warn!(task = %kind, error = %e, "could not start; deciding again next cycle");
                        }
                        Some((kind, Ok(Err(e)))) => {
                            let e = error_chain(&e);
                            error!(task = %kind, error = %e, "failed");
                            self.task_failed = Some((kind, e));
                        }
                        Some((kind, Err(e))) => self.task_failed = Some((kind, e)),
                        None => {}
                    }
                }
            }
        };
        self.shutdown().await;
        result
    }

    async fn handle_request(&mut self, request: commands::LoopRequest) {
        match request {
            commands::LoopRequest::Reload { reply } => {
                let answer = self.reload_config();
                let _ = reply.send(answer);
                // Apply at once rather than at the next tick.
                let _ = self.cycle().await;
            }
            commands::LoopRequest::Restart { request, reply } => {
                if request.schedule.is_some() {
                    let answer = if self.core.scheduled_restart.is_some() {
                        RestartReply::AlreadyScheduled
                    } else {
                        let started = self
                            .last_postgres
                            .as_ref()
                            .and_then(|p| p.postmaster_start_time.clone());
                        info!(?request, "restart scheduled through the REST API");
                        self.core.scheduled_restart = Some((request, started));
                        RestartReply::Scheduled
                    };
                    let _ = reply.send(answer);
                    // Publish it in the member record at once (patronictl list shows it).
                    let _ = self.cycle().await;
                    return;
                }
                if let Some(reason) = self.restart_unmet(&request) {
                    info!(reason, "not proceeding with the restart");
                    let _ = reply.send(RestartReply::ConditionsNotSatisfied);
                    return;
                }
                if let Some((kind, _)) = &self.task {
                    let _ = reply.send(RestartReply::TaskInProgress(*kind));
                    return;
                }
                info!("restart requested through the REST API");
                let answer = self.restart_postgres(request.timeout).await;
                let _ = reply.send(answer);
            }
            commands::LoopRequest::CancelScheduledRestart { reply } => {
                let answer = if self.core.scheduled_restart.take().is_some() {
                    info!("scheduled restart cancelled through the REST API");
                    CancelRestartReply::Cancelled
                } else {
                    CancelRestartReply::NoneScheduled
                };
                let _ = reply.send(answer);
                let _ = self.cycle().await;
            }
            commands::LoopRequest::Reinitialize { force, reply } => {
                let view = self.last_view.clone();
                let answer = match view.as_deref().map(|v| v.leader_name()) {
                    None | Some(None) => ReinitializeReply::NoLeader,
                    Some(Some(l)) if l == self.facts.name => ReinitializeReply::IsLeader,
                    Some(Some(_)) => match &self.task {
                        Some((kind, _)) if !force => ReinitializeReply::TaskInProgress(*kind),
                        _ => {
                            if let Some((_, t)) = self.task.take() {
                                t.abort();
                            }
                            warn!("reinitialize requested: removing the data directory to clone the leader again");
                            let _ = self
                                .pg
                                .stop(StopMode::Immediate, Duration::from_secs(30))
                                .await;
                            self.pg.reset().await;
                            self.task_failed = None;
                            match self.pg.remove_data_dir().await {
                                Ok(()) => ReinitializeReply::Started,
                                Err(e) => ReinitializeReply::RemoveFailed(e),
                            }
                        }
                    },
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Why a restart's conditions do not hold now (role, version, pending flag).
    fn restart_unmet(&self, request: &restart::RestartRequest) -> Option<&'static str> {
        let role = self.status_tx.borrow().role;
        let pg = self.last_postgres.as_ref();
        request.unmet(
            role.as_str(),
            pg.map(|p| p.server_version),
            pg.is_some_and(|p| !p.pending_restart.is_empty()),
        )
    }

    /// Stops postgres; the cycle run next starts it in the role the cluster needs. Waits up
    /// to `timeout` seconds (default 60) for it to accept connections again. On the leader the
    /// `timeout` also replaces `primary_start_timeout` for this start, as in Patroni: a primary
    /// that is not back in time hands the lock to a healthy replica.
    async fn restart_postgres(&mut self, timeout: Option<u64>) -> RestartReply {
        self.core.restart_start_timeout = timeout.map(Duration::from_secs);
        self.end_backup("a restart of postgres").await;
        self.release_sync_standby().await;
        let stopped = self
            .pg
            .stop_for_restart(StopMode::Fast, Duration::from_secs(60))
            .await;
        // Back as a candidate once it runs again.
        self.releasing_sync = false;
        self.pg.reset().await;
        if let Err(e) = stopped {
            return RestartReply::StopFailed(e);
        }
        if self.cycle().await.is_err() {
            return RestartReply::Failed;
        }
        let wait = Duration::from_secs(timeout.unwrap_or(60));
        if self.pg.wait_ready(wait).await {
            RestartReply::Restarted
        } else if self.pg.state().is_running() {
            RestartReply::StillStarting
        } else {
            RestartReply::Failed
        }
    }

    /// Carries out a scheduled restart that is due (Patroni's `evaluate_scheduled_restart`):
    /// not while paused or while a task runs; dropped when postgres restarted meanwhile, when
    /// it is stale, or when its conditions do not hold at its time.
    async fn run_scheduled_restart(&mut self) {
        let Some((request, started)) = self.core.scheduled_restart.clone() else {
            return;
        };
        let Some(at) = request.schedule else {
            self.core.scheduled_restart = None;
            return;
        };
        let paused = self.last_view.as_ref().is_some_and(|v| v.is_paused());
        if self.task.is_some() || paused {
            return;
        }
        let now_started = self
            .last_postgres
            .as_ref()
            .and_then(|p| p.postmaster_start_time.clone());
        if let (Some(then), Some(now)) = (&started, &now_started) {
            if then != now {
                info!(
                    started = %now,
                    "cancelling the scheduled restart: postgres has restarted since it was scheduled"
                );
                self.core.scheduled_restart = None;
                return;
            }
        }
        match restart::due(at, self.rt.wall_now(), self.loop_wait()) {
            restart::Due::Later(_) => {}
            restart::Due::Stale => {
                warn!(schedule = %at, "dropping a stale scheduled restart");
                self.core.scheduled_restart = None;
            }
            restart::Due::Now => {
                self.core.scheduled_restart = None;
                if let Some(reason) = self.restart_unmet(&request) {
                    warn!(
                        reason,
                        "scheduled restart: restart conditions are not satisfied"
                    );
                    return;
                }
                info!(schedule = %at, "scheduled restart");
                self.end_backup("a scheduled restart of postgres").await;
                self.release_sync_standby().await;
                // Stopped here; the cycle that follows starts postgres again.
                if let Err(e) = self
                    .pg
                    .stop_for_restart(StopMode::Fast, Duration::from_secs(60))
                    .await
                {
                    error!(error = %e, "scheduled restart: could not stop postgres");
                }
                self.releasing_sync = false;
                self.pg.reset().await;
            }
        }
    }

    /// Observes, decides, executes.
    async fn cycle(&mut self) -> Result<Next, HaError> {
        let obs = self.observe().await;
        let decision = self.hold_back_failing_starts(&obs, decide(&obs, &self.facts));
        let sentence = decision.outcome.to_string();
        if sentence != self.core.last_outcome {
            info!(outcome = %sentence, actions = ?decision.actions, "HA cycle");
            self.core.last_outcome = sentence;
        } else {
            debug!(outcome = %sentence, actions = ?decision.actions, "HA cycle");
        }
        self.rt.decided(&decision);
        // Member keys change every cycle somewhere in the cluster, so the watch does not wake
        // the loop for them; a former primary waiting for the new leader's checkpoint waited a
        // whole `loop_wait` after it was done (benchmark: 2.8 s instead of 0.8 s to rejoin).
        let waits_for_leader_record = matches!(
            decision.outcome,
            Outcome::WaitingForLeaderAddress { .. } | Outcome::WaitingForLeaderCheckpoint { .. }
        );
        let probe_changes = self.pg.changes();
        let mut next = self.execute(&obs, decision).await?;
        if waits_for_leader_record && matches!(next, Next::Wait) {
            next = Next::Soon;
        }
        self.refresh_postgres_after_actions(probe_changes).await;
        let standby_leader = self.core.believes_leader && self.facts.standby_cluster;
        if standby_leader != self.told_standby_leader {
            self.told_standby_leader = standby_leader;
            self.pg.set_standby_leader(standby_leader).await;
        }
        self.publish(&obs);
        self.touch_member(&obs).await;
        Ok(next)
    }

    async fn observe(&mut self) -> Observation {
        let now = self.rt.now();
        let dcs = match self.dcs.cluster_view().await {
            Ok(view) => {
                self.core.remember(&view, now, self.ttl());
                if self.written_failsafe.is_some() && view.failsafe == self.written_failsafe {
                    self.written_failsafe = None;
                }
                self.last_view = Some(view.clone());
                self.last_read_at = Some(now);
                self.dcs_last_seen = Some(self.rt.system_now());
                self.apply_dynamic_config(&view);
                DcsView::Known(view)
            }
            Err(e) => DcsView::Unknown(error_chain(&e)),
        };
        let holds = match &dcs {
            DcsView::Known(view) => view.is_leader(&self.facts.name),
            DcsView::Unknown(_) => self.core.believes_leader,
        };
        let mut disarm_fence = false;
        let lease = if holds {
            match (&dcs, self.core.dcs_renewal) {
                // The view of this cycle (the watched key, or a read) names us; between
                // renewals that is all a cycle needs to confirm.
                (DcsView::Known(_), Some(last))
                    if !timing::renewal_due(
                        last,
                        self.core.fence,
                        self.loop_wait(),
                        self.retry_timeout(),
                        self.rt.now(),
                    ) =>
                {
                    LeaseCheck::Renewed(last)
                }
                _ => self.renew().await,
            }
        } else {
            if self.core.believes_leader {
                info!("the leader key no longer names this member");
            }
            self.core.lease_dropped();
            // The fence is disarmed below only once postgres is not a writable primary: a
            // primary whose key expired (failsafe mode kept it running) keeps the deadline of
            // its last renewal or accepted failsafe round until it takes a key again or stops
            // (simulation seed 1797500004734: disarmed here, it ran on beside a new leader).
            disarm_fence = true;
            LeaseCheck::NotHeld
        };
        // A failed rewind keeps the member down until an operator acts (reinit), instead of
        // retrying pg_rewind every cycle.
        let failed = match &self.task_failed {
            Some((TaskKind::Rewind, _)) => self.task_failed.clone(),
            _ => self.task_failed.take(),
        };
        // The fence stays armed in maintenance mode (Patroni disables its watchdog there): a
        // paused leader that cannot renew would otherwise keep accepting writes after its lease
        // expired, and once the cluster is resumed (which it may not even see) another member
        // takes over. Simulation seed 8 (3 members) found two primaries that way.
        let task = match (&self.task, failed) {
            (_, Some((kind, reason))) => TaskView::Failed(kind, reason),
            (Some((kind, _)), None) => TaskView::Running(*kind),
            (None, None) => TaskView::Idle,
        };
        let (data_dir, postgres) = if matches!(task, TaskView::Running(_)) {
            (DataDir::Empty, PostgresView::Starting)
        } else {
            (self.inspect_data_dir().await, self.inspect_postgres().await)
        };
        if disarm_fence && !postgres.is_writable_primary() {
            self.pg.set_fence(None);
        }
        let replay_paused_for_parameters = match &postgres {
            PostgresView::Running(status) if status.in_recovery && status.replay_paused => {
                self.replay_paused_for_parameters().await
            }
            _ => false,
        };
        let holds_with_postgres_down = matches!(task, TaskView::Idle)
            && self.core.believes_leader
            && matches!(
                postgres,
                PostgresView::Down
                    | PostgresView::Crashed
                    | PostgresView::Starting
                    | PostgresView::Unresponsive
            );
        let primary_start_overdue = self.core.primary_start_overdue(
            holds_with_postgres_down,
            now,
            Duration::from_secs(self.dynamic.primary_start_timeout.into()),
        );
        // Peers are asked only when their answers matter: in a race for a free lock, when the
        // leader checks a switchover candidate, and when it looks for a replica to hand over to
        // because its postgres did not come back within `primary_start_timeout`.
        let peers = match &dcs {
            DcsView::Known(view)
                if (view.leader.is_none()
                    && !self.facts.nofailover
                    && matches!(data_dir, DataDir::Initialized { .. }))
                    || (view.is_leader(&self.facts.name)
                        && (view.failover.is_some() || primary_start_overdue)) =>
            {
                Some(self.ask_peers(view).await)
            }
            _ => None,
        };
        let known = match &dcs {
            DcsView::Known(view) => Some(view.as_ref()),
            DcsView::Unknown(_) => None,
        };
        let bootstrap_claim_abandoned =
            self.core
                .bootstrap_claim_abandoned(known, now, self.ttl(), self.loop_wait());
        let dcs_out_of_reach =
            matches!(dcs, DcsView::Unknown(_)) || matches!(lease, LeaseCheck::Unconfirmed);
        let failsafe_held = match &postgres {
            PostgresView::Running(status)
                if self.facts.failsafe_mode
                    && self.core.believes_leader
                    && dcs_out_of_reach
                    && !status.in_recovery =>
            {
                self.failsafe_round(status).await
            }
            _ => {
                if !dcs_out_of_reach {
                    self.failsafe.release();
                }
                false
            }
        };
        Observation {
            now,
            wall_now: self.rt.wall_now(),
            dcs,
            lease,
            data_dir,
            postgres,
            task,
            peers,
            following: self.core.following.clone(),
            checkpoint_after_promote_pending: self.core.checkpoint_after_promote_pending,
            history_recorded_for: self.core.history_recorded_for,
            bootstrap_claim_abandoned,
            primary_start_overdue,
            replay_paused_for_parameters,
            failsafe_leader: self.failsafe.live_leader(now),
            failsafe_held,
            paused_when_last_seen: self.last_view.as_ref().is_some_and(|v| v.is_paused()),
        }
    }

    /// The leader, with the DCS out of reach: asks every member of the last `failsafe`
    /// topology to accept `POST /failsafe`. When all do, the fence moves as if the lease had
    /// been renewed when the round was sent (`failsafe`'s module comment says why that is safe).
    async fn failsafe_round(&mut self, status: &crate::state::PostgresStatus) -> bool {
        let read = self.last_view.as_ref().and_then(|v| v.failsafe.clone());
        let topology = match (read, self.written_failsafe.clone()) {
            (Some(mut read), Some(written)) => {
                read.extend(written);
                Some(read)
            }
            (read, written) => read.or(written),
        };
        let Some(topology) = topology else {
            warn!(
                "failsafe mode: no `failsafe` topology was read before the DCS became unreachable"
            );
            self.failsafe.release();
            return false;
        };
        if !topology.contains_key(&self.facts.name) {
            warn!("failsafe mode: the `failsafe` topology does not name this member");
            self.failsafe.release();
            return false;
        }
        let others: Vec<(String, String)> = topology
            .into_iter()
            .filter(|(name, _)| *name != self.facts.name)
            .collect();
        let position = status.wal_flush_lsn.unwrap_or(0);
        let request = failsafe::FailsafeRequest {
            name: self.facts.name.clone(),
            conn_url: Some(self.config.conn_url()),
            api_url: Some(self.facts.api_url.clone()),
            slots: Some(std::iter::once((self.facts.name.clone(), position)).collect()),
            ttl: Some(self.ttl().as_secs()),
        };
        let sent_at = self.rt.now();
        let answers = if others.is_empty() {
            Vec::new()
        } else {
            self.peers
                .post_failsafe(others, &request, Duration::from_secs(2))
                .await
        };
        let refused: Vec<String> = answers
            .iter()
            .filter(|a| !a.accepted)
            .map(|a| {
                format!(
                    "{} ({})",
                    a.name,
                    a.refusal.as_deref().unwrap_or("not accepted")
                )
            })
            .collect();
        if !refused.is_empty() {
            warn!(refused = %refused.join(", "), "failsafe mode: not every member accepted POST /failsafe; postgres is fenced when the lease runs out");
            self.failsafe.release();
            return false;
        }
        let renewal = crate::dcs::LeaseRenewal {
            sent_at,
            ttl: self.ttl(),
        };
        if !timing::renewal_confirms(renewal, self.core.fence, self.rt.now()) {
            warn!("failsafe mode: the members' answers came after the fence deadline of the round");
            self.failsafe.release();
            return false;
        }
        let deadline = self.core.lease_renewed(renewal);
        self.pg.set_fence(Some(deadline));
        self.failsafe.held(sent_at);
        true
    }

    /// A standby whose replay is paused: is it because the primary runs with a parameter higher
    /// than ours ("hot standby is not possible because of insufficient parameter settings")?
    /// The control file records the primary's values as soon as replay reaches them.
    async fn replay_paused_for_parameters(&mut self) -> bool {
        let Some((control, too_low)) = self.pg.hot_standby_shortfall().await else {
            return false;
        };
        self.control = Some(control);
        if too_low.is_empty() {
            return false;
        }
        warn!(
            settings = %too_low.join(", "),
            "WAL replay is paused: the primary runs with higher settings than this standby"
        );
        true
    }

    /// Asks every other member's `/patroni` in parallel (2 s timeout, as Patroni), those
    /// missing from `view` but seen recently too.
    async fn ask_peers(&self, view: &ClusterView) -> Vec<PeerAnswer> {
        let remembered = self.core.remembered_members(view);
        let mut asks: Vec<(String, String)> = view
            .members
            .iter()
            .chain(remembered)
            .filter(|m| m.name != self.facts.name && !m.record.api_url.is_empty())
            .map(|m| (m.name.clone(), m.record.api_url.clone()))
            .collect();
        // Patroni races "among not only existing cluster members, but also all known members
        // from the failsafe config": a failsafe leader whose member key expired in the outage
        // still runs as primary, and an agent restarted meanwhile remembers nothing of it
        // (simulation seed 1797000004001: two primaries).
        if self.facts.failsafe_mode {
            if let Some(topology) = &view.failsafe {
                for (name, api_url) in topology {
                    if *name != self.facts.name
                        && !api_url.is_empty()
                        && !asks.iter().any(|(n, _)| n == name)
                    {
                        asks.push((name.clone(), api_url.clone()));
                    }
                }
            }
        }
        self.peers.ask(asks, Duration::from_secs(2)).await
    }

    /// Renews the lease and moves the fence forward on success.
    async fn renew(&mut self) -> LeaseCheck {
        match self.dcs.renew_leader().await {
            Ok(renewal) if !timing::renewal_confirms(renewal, self.core.fence, self.rt.now()) => {
                warn!("the lease renewal was answered after its fence deadline; treating it as unconfirmed");
                LeaseCheck::Unconfirmed
            }
            Ok(renewal) => {
                let deadline = self.core.dcs_renewed(renewal);
                self.pg.set_fence(Some(deadline));
                LeaseCheck::Renewed(renewal)
            }
            Err(DcsError::Unreachable(reason)) => {
                warn!(%reason, certain_until = ?self.core.lease_certain_until.map(|u| u.saturating_duration_since(self.rt.now())), "could not renew the leader lease");
                LeaseCheck::Unconfirmed
            }
            Err(e) => {
                error!(error = %error_chain(&e), "the leader lease is lost");
                self.core.lease_dropped();
                LeaseCheck::Lost
            }
        }
    }

    fn apply_dynamic_config(&mut self, view: &ClusterView) {
        let Some(raw) = &view.config else { return };
        // Parsed once per change of the value, not once per cycle.
        if self.applied_config.as_ref() != Some(&raw.value) {
            self.applied_config = Some(raw.value.clone());
            self.parse_dynamic_config(&raw.value);
        }
        if !self.dynamic.synchronous_mode.is_on() && !self.core.sync_standby_names.is_empty() {
            // Nothing maintains synchronous standbys in asynchronous mode (the leader runs no
            // ManageSync once `sync` is gone): a name kept here, such as strict mode's `*` from
            // the bootstrap file of an agent restarted after synchronous mode was turned off,
            // would make every commit wait for a standby (simulation seed 10242). The next
            // ApplyConfig writes it out.
            info!(
                synchronous_standby_names = %self.core.sync_standby_names,
                "synchronous mode is off; clearing synchronous_standby_names"
            );
            self.core.sync_standby_names.clear();
        }
    }

    /// A clone brings the `patroni.dynamic.json` of the member it was taken from; cloned from a
    /// standby cluster's source, that is the other cluster's configuration, and seeding the DCS
    /// from it (SeedConfig prefers the copy) turned a new standby cluster into a second primary.
    /// Patroni reads the copy only at startup, so it never sees a cloned one; here the copy is
    /// replaced at once by this cluster's configuration as this member applies it.
    fn replace_cloned_dynamic_copy(&self) {
        let value = match &self.applied_config {
            Some(raw) => Ok(raw.clone()),
            None => serde_json::to_value(&self.dynamic),
        };
        let saved = value
            .map_err(|e| e.to_string())
            .and_then(|v| self.pg.save_dynamic_copy(&v));
        if let Err(e) = saved {
            warn!(error = %e, "cannot replace the cloned copy of the dynamic configuration");
        }
    }

    fn parse_dynamic_config(&mut self, raw: &serde_json::Value) {
        // One invalid value costs only that value (`DynamicConfig::from_dcs`).
        let (dynamic, warnings) = DynamicConfig::from_dcs(raw, &self.dynamic);
        for warning in &warnings {
            warn!("{warning}");
        }
        let timing = Timing::of(&dynamic);
        let old = *self.timing.borrow();
        if timing != old {
            info!(
                ttl = ?timing.ttl,
                loop_wait = ?timing.loop_wait,
                retry_timeout = ?timing.retry_timeout,
                old_ttl = ?old.ttl,
                old_loop_wait = ?old.loop_wait,
                old_retry_timeout = ?old.retry_timeout,
                "timing changed in the DCS config"
            );
            self.timing.send_replace(timing);
        }
        self.facts.maximum_lag_on_failover = dynamic.maximum_lag_on_failover;
        self.facts.use_pg_rewind = dynamic.postgresql.use_pg_rewind;
        // Patroni: no synchronous replication inside a standby cluster (its leader is a
        // standby; nothing commits there).
        let standby_cluster = dynamic.standby_source().is_some();
        if standby_cluster != self.facts.standby_cluster {
            info!(
                standby_cluster,
                "the cluster {} a standby cluster",
                if standby_cluster {
                    "is now"
                } else {
                    "is no longer"
                }
            );
        }
        self.facts.synchronous_mode = dynamic.synchronous_mode.is_on() && !standby_cluster;
        self.facts.quorum_commit = dynamic.synchronous_mode.is_quorum();
        self.facts.standby_cluster = standby_cluster;
        if dynamic.failsafe_mode != self.facts.failsafe_mode {
            info!(
                failsafe_mode = dynamic.failsafe_mode,
                "failsafe mode changed in the DCS config"
            );
        }
        self.facts.failsafe_mode = dynamic.failsafe_mode;
        self.facts.check_timeline = dynamic.check_timeline;
        self.failsafe.configure(dynamic.failsafe_mode, timing.ttl);
        self.dynamic = dynamic;
        if let Err(e) = self.pg.save_dynamic_copy(raw) {
            warn!(error = %e, "cannot keep a copy of the dynamic configuration in the data directory");
        }
    }

    async fn inspect_data_dir(&mut self) -> DataDir {
        // pg_controldata's state is only meaningful while postgres is down; while it runs, the
        // identifier we read before is still right, and a directory postgres runs in is neither
        // empty nor foreign: listing it and looking for PG_VERSION and pg_control each cycle
        // was a sixth of an idle cycle's CPU. A directory removed under a running postgres
        // shows once postgres has crashed on it.
        if self.pg.state().is_running() {
            if let Some(control) = &self.control {
                return DataDir::Initialized {
                    control: control.clone(),
                    standby_signal: self.pg.standby_signal(),
                };
            }
        }
        let data_dir = self.pg.inspect_data_dir().await;
        match &data_dir {
            DataDir::Empty => self.control = None,
            DataDir::Initialized { control, .. } => self.control = Some(control.clone()),
            DataDir::Unusable(_) => {}
        }
        data_dir
    }

    /// [`HaCore::hold_back_failing_starts`] with how postgres last exited; logs the release.
    fn hold_back_failing_starts(&self, obs: &Observation, decision: Decision) -> Decision {
        let last_exit = match self.pg.state() {
            Postmaster::Crashed { exit, .. } => exit,
            _ => "unknown".into(),
        };
        let (decision, release) =
            self.core
                .hold_back_failing_starts(obs, decision, &last_exit, self.rt.now());
        match release {
            Some((true, why)) => {
                error!(%why, "releasing the leader lock instead of restarting postgres again")
            }
            Some((false, why)) => debug!(%why, "releasing the leader lock"),
            None => {}
        }
        decision
    }

    async fn inspect_postgres(&mut self) -> PostgresView {
        let view = match self.pg.state() {
            Postmaster::NotRunning => PostgresView::Down,
            Postmaster::Crashed { .. } => PostgresView::Crashed,
            Postmaster::StartFailed { reason } => PostgresView::StartFailed(reason),
            Postmaster::Running { .. } if !self.pg.state().accepts_connections() => {
                PostgresView::Starting
            }
            Postmaster::Running { .. } => match self.pg.status().await {
                Ok(status) => PostgresView::Running(status),
                Err(e) => {
                    debug!(error = %e, "postgres status query failed");
                    PostgresView::Unresponsive
                }
            },
        };
        self.last_postgres = match &view {
            PostgresView::Running(s) => Some(s.clone()),
            _ => None,
        };
        self.core.observed_postgres(&view, self.rt.now());
        view
    }

    /// Reads the status again if this cycle's actions ran SQL or dropped the connection
    /// (`probe_changes`: [`crate::postgres::probe::Probe::changes`] before them); otherwise the
    /// read in `observe` stands, and an idle cycle costs one status query instead of two.
    async fn refresh_postgres_after_actions(&mut self, probe_changes: u64) {
        if self.pg.changes() == probe_changes && self.pg.state().is_running() {
            return;
        }
        if self.pg.state().accepts_connections() {
            if let Ok(status) = self.pg.status().await {
                self.last_postgres = Some(status);
                return;
            }
        }
        if !self.pg.state().is_running() {
            self.last_postgres = None;
        }
    }

    fn forget_sync_choice(&mut self) {
        self.core.forget_sync_choice(
            self.dynamic.synchronous_mode.is_on(),
            self.dynamic.synchronous_mode_strict,
        );
    }

    /// The files for a primary (`standby: false`) or a standby of `upstream` (`None`: a
    /// read-only standby with nowhere to stream from).
    fn managed_files(&self, standby: bool, upstream: Option<&Upstream>) -> ManagedFiles {
        self.managed_files_from(standby, upstream, false)
    }

    /// [`Self::managed_files`]; `from_source`: `upstream` is the `standby_cluster` source,
    /// whose slot and recovery settings come from that section.
    fn managed_files_from(
        &self,
        standby: bool,
        upstream: Option<&Upstream>,
        from_source: bool,
    ) -> ManagedFiles {
        let use_slots = self.dynamic.postgresql.use_slots;
        let mut parameters = conf::parameters(
            &self.config,
            &self.dynamic,
            &crate::backup::archive_parameters(&self.config),
        );
        if self.enforces_hot_standby_feedback() {
            parameters.insert("hot_standby_feedback".into(), "on".into());
        }
        if let (true, Some(control)) = (standby, &self.control) {
            let raised = conf::raise_to_primary_minimums(&mut parameters, control);
            if !raised.is_empty() {
                debug!(?raised, "raised to the primary's values for hot standby");
            }
        }
        if standby && self.dynamic.synchronous_mode.is_on() && self.dynamic.synchronous_mode_strict
        {
            // Takes effect only if this standby is promoted: until the new leader has confirmed
            // a synchronous standby, commits wait instead of being acknowledged by one copy.
            parameters.insert("synchronous_standby_names".into(), "*".into());
        } else if !standby
            && (self.dynamic.synchronous_mode.is_on() || !self.core.sync_standby_names.is_empty())
        {
            parameters.insert(
                "synchronous_standby_names".into(),
                self.core.sync_standby_names.clone(),
            );
        }
        let source = self.dynamic.standby_source().filter(|_| standby);
        if let Some(source) = source {
            // Patroni gives every member of a standby cluster the source's archive commands;
            // the apply delay only to the standby leader.
            let from_source_settings = [
                ("restore_command", source.restore_command.clone()),
                (
                    "archive_cleanup_command",
                    source.archive_cleanup_command.clone(),
                ),
            ]
            .into_iter()
            .chain([(
                "recovery_min_apply_delay",
                source
                    .recovery_min_apply_delay
                    .as_ref()
                    .filter(|_| from_source)
                    .map(|d| d.as_setting()),
            )]);
            for (name, value) in from_source_settings {
                if let Some(value) = value {
                    parameters.insert(name.into(), value);
                }
            }
        }
        // `nostream` (Patroni): a standby that only replays from the archive
        // (`restore_command`), so no primary_conninfo and no slot.
        let upstream = upstream.filter(|_| !self.config.tags.nostream || from_source);
        let primary_slot_name = match (from_source, source) {
            (true, Some(source)) => source.primary_slot_name.clone(),
            _ => upstream
                .filter(|_| use_slots)
                .map(|_| replica::slot_name(&self.config.name)),
        };
        ManagedFiles {
            parameters,
            pg_hba: conf::pg_hba(&self.config, &self.dynamic),
            standby: standby.then(|| StandbySettings {
                primary_conninfo: upstream
                    .filter(|u| !u.host.is_empty())
                    .map(|u| replica::primary_conninfo(&self.config, u)),
                primary_slot_name,
                recovery_target_timeline: conf::DEFAULT_RECOVERY_TARGET_TIMELINE.into(),
            }),
            pgpass: replica::pgpass(&self.config),
        }
    }

    /// The files for a standby streaming `from` (`None`: read-only with no upstream).
    fn standby_files(
        &self,
        from: Option<&StreamFrom>,
        upstream: Option<&Upstream>,
    ) -> ManagedFiles {
        self.managed_files_from(
            true,
            upstream,
            matches!(from, Some(StreamFrom::StandbySource)),
        )
    }

    fn upstream(&self, obs: &Observation, from: &StreamFrom) -> Result<Upstream, ActionError> {
        let leader = match from {
            StreamFrom::Member(leader) => leader,
            StreamFrom::StandbySource => {
                let Some(source) = self.dynamic.standby_source() else {
                    return Err(ActionError::Failed(
                        "the cluster is no longer a standby cluster".into(),
                    ));
                };
                // No host: the source is only an archive (`restore_command`); the standby
                // leader then has no primary_conninfo.
                return Ok(Upstream {
                    name: "standby_cluster".into(),
                    host: source.host.clone().unwrap_or_default(),
                    port: source.port_or_default(),
                    system_identifier: None,
                });
            }
        };
        let DcsView::Known(view) = &obs.dcs else {
            return Err(ActionError::Failed("the DCS view is unknown".into()));
        };
        view.member(leader)
            .and_then(|m| Upstream::from_member(leader, &m.record))
            .map(|up| Upstream {
                system_identifier: view.initialize_value().map(str::to_owned),
                ..up
            })
            .ok_or_else(|| ActionError::Failed(format!("no address for the leader {leader}")))
    }

    fn spawn_task(&mut self, kind: TaskKind, task: P::Task) {
        info!(task = %kind, "starting");
        self.task = Some((kind, task));
    }

    async fn execute(&mut self, obs: &Observation, decision: Decision) -> Result<Next, HaError> {
        let mut done = Vec::new();
        for action in decision.actions {
            match self.execute_one(obs, &action).await {
                Ok(true) => done.push(action),
                Ok(false) => {
                    debug!(?action, "plan stopped: a race was lost");
                    self.compensate(obs, &done).await;
                    return Ok(Next::Now);
                }
                Err(ActionError::Fatal(reason)) => return Err(HaError::Fatal(reason)),
                Err(e) if action.is_housekeeping() => {
                    let reason = error_chain(&e);
                    warn!(?action, %reason, "housekeeping failed; retrying next cycle");
                }
                Err(e) => {
                    let reason = error_chain(&e);
                    warn!(?action, %reason, "action failed; retrying next cycle");
                    self.compensate(obs, &done).await;
                    return Ok(Next::Wait);
                }
            }
        }
        Ok(Next::Wait)
    }

    /// Postgres may become writable only while the lease is certain for at least the stop
    /// margin; a plan that runs late (the agent was frozen after deciding) must not open for
    /// writes on a lease that may have expired.
    fn check_lease_for_writes(&self) -> Result<(), ActionError> {
        if self.core.may_open_for_writes(self.rt.now()) {
            Ok(())
        } else {
            Err(ActionError::Failed(
                "the leader lease is not certain long enough to open postgres for writes".into(),
            ))
        }
    }

    /// Undoes what a plan that stopped early must not leave behind (`decide::compensation`).
    async fn compensate(&mut self, obs: &Observation, done: &[Action]) {
        for action in decide::compensation(done) {
            if let Err(e) = self.execute_one(obs, &action).await {
                let reason = error_chain(&e);
                warn!(?action, %reason, "could not undo the stopped plan");
            }
        }
    }

    /// After winning a race for a free lock: the lag rule on a fresh view, with the position
    /// the race was decided with. Not for a running primary, a bootstrap, or the candidate of a
    /// manual failover (which takes over without the lag check, §5.6).
    async fn lags_behind_fresh_status(
        &self,
        obs: &Observation,
    ) -> Result<Option<u64>, ActionError> {
        let DcsView::Known(seen) = &obs.dcs else {
            return Ok(None);
        };
        let candidate = seen
            .failover
            .as_ref()
            .and_then(|f| f.value.member.as_deref())
            == Some(self.facts.name.as_str());
        let Some(position) = decide::racing_position(obs) else {
            return Ok(None);
        };
        if seen.leader.is_some() || candidate {
            return Ok(None);
        }
        let fresh = self.dcs.cluster().await?;
        Ok(decide::lagging_on(
            &fresh,
            position,
            self.facts.maximum_lag_on_failover,
        ))
    }

    /// Performs one action; `Ok(false)` means a race was lost and the plan must stop.
    async fn execute_one(
        &mut self,
        obs: &Observation,
        action: &Action,
    ) -> Result<bool, ActionError> {
        match action {
            Action::RaceInitialize(value) => {
                let won = self.dcs.race_initialize(value).await?;
                if won {
                    info!(value = %value, "won the initialize race");
                }
                Ok(won)
            }
            Action::SetInitialize(sysid) => {
                self.dcs.set_initialize(sysid).await?;
                info!(%sysid, "recorded the system identifier in `initialize`");
                Ok(true)
            }
            Action::CancelInitialize => {
                if let Err(e) = self.dcs.cancel_initialize(None).await {
                    warn!(error = %error_chain(&e), "could not delete `initialize` after the failed bootstrap");
                }
                Ok(true)
            }
            Action::WithdrawBootstrapClaim(revision) => {
                if self.dcs.cancel_initialize(Some(*revision)).await? {
                    info!(
                        revision,
                        "withdrew the abandoned bootstrap claim in `initialize`"
                    );
                } else {
                    info!("`initialize` changed since the abandoned claim was seen; left it");
                }
                Ok(true)
            }
            Action::SeedConfig => {
                // The copy kept in the data directory is the cluster's configuration as last
                // applied; bootstrap.dcs only describes a new cluster (Patroni restores from
                // `patroni.dynamic.json` too). Re-seeding from the file after the key was lost
                // undid every edit-config change.
                let (value, source) = match self.pg.load_dynamic_copy() {
                    Some(value) => (value, dynamic_copy::FILE_NAME),
                    None => (
                        serde_json::to_value(&self.config.bootstrap.dcs)
                            .map_err(ActionError::caused("cannot encode config"))?,
                        "bootstrap.dcs",
                    ),
                };
                if self.dcs.write_config(&value, Some(0)).await? {
                    info!(source, "seeded the DCS `config`");
                }
                Ok(true)
            }
            Action::AcquireLeader => {
                if !self.dcs.acquire_leader().await? {
                    return Ok(false);
                }
                info!("acquired the leader lock");
                if let DcsView::Known(view) = &obs.dcs {
                    let retained = view.status.as_ref().map(|s| s.retain_slots.as_slice());
                    self.core
                        .inherit_retained_slots(retained.unwrap_or_default(), self.rt.now());
                }
                // Confirm at once so the fence is armed before postgres can be made writable.
                if !matches!(self.renew().await, LeaseCheck::Renewed(_)) {
                    return Err(ActionError::Failed(
                        "could not confirm the freshly acquired lease".into(),
                    ));
                }
                if let Some(lag) = self.lags_behind_fresh_status(obs).await? {
                    warn!(
                        lag,
                        maximum = self.facts.maximum_lag_on_failover,
                        "won the lock on an old observation, but the last leader position has moved further ahead than maximum_lag_on_failover since; giving the lock back"
                    );
                    self.dcs.release_leader().await?;
                    self.core.lease_dropped();
                    self.pg.set_fence(None);
                    return Ok(false);
                }
                Ok(true)
            }
            Action::ReleaseLeader => {
                // After a stop, publish the shutdown checkpoint so replicas' lag checks compare
                // against the final position.
                if !self.pg.state().is_running() {
                    if let Some(optime) = self.pg.control_checkpoint().await {
                        let status = LeaderStatus {
                            optime,
                            slots: self.slot_positions.clone(),
                            retain_slots: self.core.retained_slot_names(),
                        };
                        if let Err(e) = self.dcs.write_status(&status).await {
                            debug!(error = %error_chain(&e), "could not write the final status");
                        }
                    }
                }
                self.dcs.release_leader().await?;
                self.core.lease_dropped();
                self.pg.set_fence(None);
                info!("released the leader lock");
                Ok(true)
            }
            Action::StartBootstrap => {
                let mut files = self.managed_files(false, None);
                // The post-bootstrap SQL (roles for replication and rewind) must commit while no
                // standby can exist yet: strict synchronous mode's `*` made it wait forever. The
                // first cycle as leader writes the setting (Patroni, too, manages it only from
                // the HA loop).
                files.parameters.remove("synchronous_standby_names");
                let task = self.pg.bootstrap(self.config.clone(), files);
                self.spawn_task(TaskKind::Bootstrap, task);
                Ok(true)
            }
            Action::StartCreateReplica { from } => {
                let upstream = self.upstream(obs, from)?;
                let files = self.standby_files(Some(from), Some(&upstream));
                self.core.following = Some(upstream.name.clone());
                let config = match (from, self.dynamic.standby_source()) {
                    // The source is cloned by `standby_cluster.create_replica_methods`
                    // (Patroni: default `basebackup`), not by this member's own methods.
                    (StreamFrom::StandbySource, Some(source)) => {
                        let mut config = (*self.config).clone();
                        config.postgresql.create_replica_methods =
                            source.create_replica_methods.clone();
                        Arc::new(config)
                    }
                    _ => self.config.clone(),
                };
                let task = self.pg.create_replica(config, Some(upstream), files);
                self.spawn_task(TaskKind::CreateReplica, task);
                Ok(true)
            }
            Action::StartCreateReplicaWithoutLeader => {
                let files = self.standby_files(None, None);
                self.core.following = None;
                let task = self.pg.create_replica(self.config.clone(), None, files);
                self.spawn_task(TaskKind::CreateReplica, task);
                Ok(true)
            }
            Action::StartRewind { leader } => {
                let upstream = self.upstream(obs, &StreamFrom::member(leader))?;
                // As Patroni checks the leader before pg_rewind (`check_leader_is_not_in_recovery`,
                // with pg_rewind's own credentials): a leader that does not answer is retried
                // next cycle, while a failed pg_rewind keeps the member down. Without this, a
                // short partition left a former primary down for good (simulation seed 6, 3
                // members). A TCP connect is not enough: a proxy or a postgres that is shutting
                // down accepts the connection and then closes it (fault campaign, seed 20261214).
                if let Err(why) = self
                    .pg
                    .leader_ready_for_rewind(&self.config, &upstream)
                    .await
                {
                    return Err(ActionError::Failed(format!(
                        "the leader {leader} is not ready for pg_rewind ({why}); retrying next cycle"
                    )));
                }
                let files = self.managed_files(true, Some(&upstream));
                let crashed = matches!(
                    &obs.data_dir,
                    DataDir::Initialized { control, .. }
                        if control.state == controldata::ClusterState::InProduction
                );
                self.core.following = Some(leader.clone());
                let task = self
                    .pg
                    .rewind(self.config.clone(), upstream, crashed, files);
                self.spawn_task(TaskKind::Rewind, task);
                Ok(true)
            }
            Action::StartPostgres { primary, upstream } => {
                if *primary {
                    self.check_lease_for_writes()?;
                }
                if let Some(wait) = self.core.restart_backoff(self.rt.now()) {
                    return Err(ActionError::Failed(format!(
                        "postgres crashed {} time(s) right after starting; next start in {:.0?}",
                        self.core.quick_crashes, wait
                    )));
                }
                self.core.starting(self.rt.now());
                let from = upstream;
                let upstream = match from {
                    Some(from) => Some(self.upstream(obs, from)?),
                    None => None,
                };
                self.core.following = upstream.as_ref().map(|u| u.name.clone());
                let files = if *primary {
                    self.managed_files(false, None)
                } else {
                    self.forget_sync_choice();
                    self.standby_files(from.as_ref(), upstream.as_ref())
                };
                self.pg
                    .write_conf(&files)
                    .await
                    .map_err(ActionError::Failed)?;
                self.pg.reset().await;
                self.pg.start().await.map_err(ActionError::Failed)?;
                Ok(true)
            }
            Action::ApplyConfig { upstream } => {
                let from = upstream;
                let upstream = match from {
                    Some(from) => Some(self.upstream(obs, from)?),
                    None => None,
                };
                let files = if upstream.is_some() {
                    self.forget_sync_choice();
                    self.standby_files(from.as_ref(), upstream.as_ref())
                } else {
                    self.managed_files(false, None)
                };
                let changed = self
                    .pg
                    .write_conf(&files)
                    .await
                    .map_err(ActionError::Failed)?;
                let following = upstream.as_ref().map(|u| u.name.clone());
                if changed {
                    info!(upstream = ?following, "configuration changed; reloading postgres");
                    self.pg
                        .reload()
                        .await
                        .map_err(|e| ActionError::Failed(format!("reload failed: {e}")))?;
                }
                self.core.following = following;
                Ok(true)
            }
            Action::SyncSlots => {
                if let DcsView::Known(view) = &obs.dcs {
                    if self.dynamic.postgresql.use_slots {
                        self.sync_slots(obs, view).await?;
                    }
                }
                Ok(true)
            }
            Action::ManageSync => {
                let (DcsView::Known(view), PostgresView::Running(status)) =
                    (&obs.dcs, &obs.postgres)
                else {
                    return Ok(true);
                };
                self.manage_sync(view, status).await?;
                Ok(true)
            }
            Action::ClaimSync => {
                let DcsView::Known(view) = &obs.dcs else {
                    return Err(ActionError::Failed("the DCS view is unknown".into()));
                };
                let current = view.sync.as_ref();
                // A key that names us stays only if postgres will not acknowledge through a
                // standby it does not list: an agent restarted as lock holder has lost its
                // chosen names and starts with strict mode's `*` (simulation seed
                // 1796308787880: a write acknowledged by a standby not in `sync` was lost when
                // the recorded one took over). With quorum commit: only if what postgres
                // will wait for overlaps every set of voters that can elect.
                if current.is_some_and(|s| {
                    s.value.leader.as_deref() == Some(&self.facts.name)
                        && if self.facts.quorum_commit {
                            self.quorum_key_holds(&s.value)
                        } else {
                            sync::acknowledges_only_through_recorded(
                                &self.core.sync_standby_names,
                                &s.value,
                            )
                        }
                }) {
                    return Ok(true);
                }
                let claim = crate::dcs::SyncState {
                    leader: Some(self.facts.name.clone()),
                    sync_standby: None,
                    quorum: 0,
                };
                let revision = current.map(|s| s.revision).unwrap_or(0);
                if !self.dcs.write_sync(Some(&claim), Some(revision)).await? {
                    return Err(ActionError::Failed(
                        "the `sync` key changed under us; not opening for writes".into(),
                    ));
                }
                info!("claimed `sync` before opening postgres for writes");
                Ok(true)
            }
            Action::DropSync => {
                let DcsView::Known(view) = &obs.dcs else {
                    return Ok(true);
                };
                if let Some(current) = &view.sync {
                    if self.dcs.write_sync(None, Some(current.revision)).await? {
                        info!("synchronous mode is off: removed the `sync` key before opening for writes");
                    }
                }
                Ok(true)
            }
            Action::Promote => {
                self.check_lease_for_writes()?;
                self.pg
                    .promote()
                    .await
                    .map_err(|e| ActionError::Failed(format!("pg_promote failed: {e}")))?;
                info!("promotion requested");
                self.core.checkpoint_after_promote_pending = true;
                if let Some(readiness) = self.slot_readiness.take() {
                    let unsafe_slots: Vec<&str> = readiness.pending().collect();
                    if !unsafe_slots.is_empty() {
                        warn!(
                            slots = ?unsafe_slots,
                            "logical replication slots that might be unsafe to use after promote"
                        );
                    }
                }
                Ok(true)
            }
            Action::StopPostgres(mode) => {
                // A fast stop is a planned one (switchover, demotion); an immediate one fences
                // and must not wait.
                if *mode == StopMode::Fast {
                    self.end_backup("a switchover or planned demotion").await;
                }
                warn!(?mode, "stopping postgres");
                self.pg
                    .demote(*mode, Duration::from_secs(30))
                    .await
                    .map_err(ActionError::Failed)?;
                self.pg.reset().await;
                Ok(true)
            }
            Action::WriteStatus => {
                if let PostgresView::Running(status) = &obs.postgres {
                    // A standby leader publishes what it received from the source (Patroni's
                    // `last_operation`), so its replicas' lag is measured against it.
                    let optime = match status.wal_flush_lsn {
                        None if self.facts.standby_cluster => status.wal_position(),
                        flush => flush,
                    };
                    if let Some(optime) = optime {
                        let retain_slots = match &obs.dcs {
                            DcsView::Known(view) => self.member_slots(view).into_iter().collect(),
                            DcsView::Unknown(_) => self.core.retained_slot_names(),
                        };
                        let status = LeaderStatus {
                            optime,
                            slots: self.slot_positions.clone(),
                            retain_slots,
                        };
                        let unchanged = matches!(&obs.dcs, DcsView::Known(v) if v.status.as_ref() == Some(&status));
                        if !unchanged {
                            self.dcs.write_status(&status).await?;
                        }
                    }
                }
                Ok(true)
            }
            Action::WriteHistory => {
                let (DcsView::Known(view), PostgresView::Running(status)) =
                    (&obs.dcs, &obs.postgres)
                else {
                    return Ok(true);
                };
                let Some(timeline) = status.timeline else {
                    return Ok(true);
                };
                let text = self
                    .pg
                    .timeline_history(timeline)
                    .await
                    .map_err(ActionError::Failed)?;
                // A lost `history` key is rebuilt from what this member saw last, so the
                // timestamps and leaders of earlier switches survive.
                let recorded = if view.history.is_empty() {
                    &self.core.known_history
                } else {
                    &view.history
                };
                let history = merge_history(
                    recorded,
                    &text,
                    &self
                        .rt
                        .wall_now()
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
                    &self.facts.name,
                );
                self.dcs.write_history(&history).await?;
                self.core.history_recorded_for = Some(timeline);
                info!(timeline, "recorded the timeline switch in `history`");
                Ok(true)
            }
            Action::Checkpoint => {
                self.pg
                    .checkpoint()
                    .await
                    .map_err(|e| ActionError::Failed(format!("CHECKPOINT failed: {e}")))?;
                if self.core.checkpoint_after_promote_pending
                    && matches!(&obs.postgres, PostgresView::Running(s) if !s.in_recovery)
                {
                    info!("checkpoint after promotion done: replicas may rewind against us");
                    self.core.checkpoint_after_promote_pending = false;
                }
                Ok(true)
            }
            Action::ClearFailover => {
                let expected = match &obs.dcs {
                    DcsView::Known(view) => view.failover.as_ref().map(|f| f.revision),
                    DcsView::Unknown(_) => None,
                };
                if expected.is_some() {
                    let cleared = self
                        .dcs
                        .write_failover(&crate::dcs::FailoverRequest::default(), expected)
                        .await?;
                    if cleared {
                        info!("cleared the failover key");
                    }
                }
                Ok(true)
            }
            Action::WriteFailsafe => {
                if let DcsView::Known(view) = &obs.dcs {
                    let topology = failsafe::topology(view, &self.facts.name, &self.facts.api_url);
                    let value = serde_json::to_string(&topology)
                        .map_err(ActionError::caused("cannot encode the failsafe topology"))?;
                    self.dcs.write_key(crate::dcs::FAILSAFE_KEY, &value).await?;
                    info!(members = %value, "published the failsafe topology");
                    self.written_failsafe = Some(topology);
                }
                Ok(true)
            }
            Action::Fatal(reason) => Err(ActionError::Fatal(reason.clone())),
        }
    }

    /// Quorum commit: does `key` (naming us) still keep every acknowledged write electable
    /// with the `synchronous_standby_names` we run?
    fn quorum_key_holds(&self, key: &crate::dcs::SyncState) -> bool {
        let Some(setting) = sync::parse_standby_setting(&self.core.sync_standby_names) else {
            return false;
        };
        if setting.names.contains(&sync::StandbyName::Star) {
            // Any standby, listed or not, may acknowledge.
            return key.standbys().is_empty();
        }
        quorum::overlaps(quorum::QuorumInput {
            leader: self.facts.name.clone(),
            quorum: key.quorum,
            voters: key.standbys().into_iter().collect(),
            numsync: setting.num,
            sync: setting.spelled(str::to_owned),
            numsync_confirmed: 0,
            active: quorum::Names::new(),
            sync_wanted: 1,
            leader_wanted: self.facts.name.clone(),
        })
    }

    /// The listed standbys known to have caught up since postgres' `synchronous_standby_names`
    /// last changed (`quorum::Readiness`); `None` while postgres' value is unknown.
    fn caught_up_standbys(
        &mut self,
        view: &ClusterView,
        status: &crate::state::PostgresStatus,
    ) -> Option<quorum::Names> {
        let running = status.synchronous_standby_names.as_deref()?;
        let listed = sync::parse_standby_setting(running)
            .map(|s| s.spelled(|n| view.member_spelling(n)))
            .unwrap_or_default();
        Some(self.ready_standbys(view, status, running, &listed, sync::LsnKind::Flush, "sync"))
    }

    /// [`quorum::Readiness`] on this cycle's `pg_stat_replication`: which of `listed` (in
    /// `running`, postgres' value) have caught up, judged by `lsn`, in `waited_state`.
    fn ready_standbys(
        &mut self,
        view: &ClusterView,
        status: &crate::state::PostgresStatus,
        running: &str,
        listed: &quorum::Names,
        lsn: sync::LsnKind,
        waited_state: &str,
    ) -> quorum::Names {
        let rows: Vec<(String, String, Option<u64>)> = status
            .replication
            .iter()
            .filter(|r| r.state == "streaming")
            .map(|r| {
                (
                    view.member_spelling(&r.application_name),
                    r.sync_state.clone(),
                    lsn.of(r),
                )
            })
            .collect();
        self.core
            .quorum_ready
            .observe(running, listed, status.wal_flush_lsn, &rows, waited_state)
    }

    /// Runs postgres with `value` as `synchronous_standby_names` (rewrite and reload).
    async fn set_standby_names(&mut self, value: String) -> Result<(), ActionError> {
        if value == self.core.sync_standby_names {
            return Ok(());
        }
        info!(synchronous_standby_names = %value, "changing synchronous standbys");
        self.core.sync_standby_names = value;
        let files = self.managed_files(false, None);
        if self
            .pg
            .write_conf(&files)
            .await
            .map_err(ActionError::Failed)?
        {
            self.pg
                .reload()
                .await
                .map_err(|e| ActionError::Failed(format!("reload failed: {e}")))?;
        }
        Ok(())
    }

    /// One cycle of quorum commit (`synchronous_mode: quorum`): the steps of
    /// [`quorum::transitions`] from what postgres runs and what `sync` says, in their order. At
    /// most one write of `sync` per cycle, and none after postgres' value changed (it must be
    /// in force first): the rest follows on the next cycles, planned afresh.
    async fn manage_quorum(
        &mut self,
        mode: sync::SyncMode,
        view: &ClusterView,
        status: &crate::state::PostgresStatus,
    ) -> Result<(), ActionError> {
        let me = self.facts.name.clone();
        let Some(key) = view.sync.as_ref() else {
            // Patroni's `_maybe_enable_synchronous_mode`: nobody may race but us until the
            // standbys are confirmed.
            let claim = crate::dcs::SyncState {
                leader: Some(me.clone()),
                sync_standby: None,
                quorum: 0,
            };
            if self.dcs.write_sync(Some(&claim), Some(0)).await? {
                info!("enabled quorum commit: `sync` names us with no voters yet");
            }
            return Ok(());
        };
        let canonical = |name: &str| view.member_spelling(name);
        let running = status
            .synchronous_standby_names
            .clone()
            .unwrap_or_else(|| self.core.sync_standby_names.clone());
        let setting = sync::parse_standby_setting(&running).unwrap_or_else(|| {
            warn!(synchronous_standby_names = %running, "cannot read synchronous_standby_names");
            sync::StandbySetting {
                any: false,
                num: 0,
                names: vec![],
            }
        });
        let listed = setting.spelled(canonical);
        let voters: quorum::Names = key.value.standbys().iter().map(|n| canonical(n)).collect();
        let active = sync::quorum_active(
            mode,
            &me,
            view,
            &status.replication,
            &voters,
            status.wal_position(),
        );
        let ready = self.ready_standbys(view, status, &running, &listed, mode.lsn, "quorum");
        let confirmed = ready.intersection(&active).count();
        if active.is_empty() {
            if mode.strict {
                // Patroni's strict mode: commits wait, for the voters while there are some.
                let value = if voters.is_empty() {
                    "*".to_owned()
                } else {
                    let quorum = usize::try_from(key.value.quorum).unwrap_or(usize::MAX);
                    let numsync = voters.len().saturating_sub(quorum).max(1);
                    quorum::render_any(u32::try_from(numsync).unwrap_or(u32::MAX), &voters)
                };
                return self.set_standby_names(value).await;
            }
            if voters.is_empty() && !listed.is_empty() {
                return self.set_standby_names(String::new()).await;
            }
        }
        let input = quorum::QuorumInput {
            leader: key
                .value
                .leader
                .as_deref()
                .map(canonical)
                .unwrap_or_default(),
            quorum: key.value.quorum,
            voters,
            numsync: setting.num,
            sync: listed.clone(),
            numsync_confirmed: u32::try_from(confirmed).unwrap_or(u32::MAX),
            active,
            sync_wanted: mode.node_count.max(1),
            leader_wanted: me.clone(),
        };
        let steps = match quorum::transitions(input) {
            Ok(steps) => steps,
            Err(e) => {
                warn!("{e}; synchronous standbys left as they are");
                return Ok(());
            }
        };
        if steps.is_empty() {
            // Postgres' value, as ANY (a leader restarted over a running postgres adopts it;
            // Patroni turns FIRST into ANY).
            if !listed.contains("*") {
                let numsync = setting
                    .num
                    .min(u32::try_from(listed.len()).unwrap_or(u32::MAX));
                return self
                    .set_standby_names(quorum::render_any(numsync, &listed))
                    .await;
            }
            return Ok(());
        }
        let mut revision = key.revision;
        let mut wrote_key = false;
        let mut changed_postgres = false;
        for step in steps {
            match step {
                quorum::Transition::Quorum {
                    leader,
                    quorum,
                    voters,
                } => {
                    if wrote_key || changed_postgres {
                        break;
                    }
                    let state = crate::dcs::SyncState {
                        leader: Some(leader),
                        sync_standby: (!voters.is_empty())
                            .then(|| voters.iter().cloned().collect::<Vec<_>>().join(",")),
                        quorum,
                    };
                    if !self.dcs.write_sync(Some(&state), Some(revision)).await? {
                        return Err(ActionError::Failed(
                            "the `sync` key changed under us".into(),
                        ));
                    }
                    info!(
                        quorum,
                        voters = ?state.sync_standby,
                        "quorum commit: updated `sync`"
                    );
                    wrote_key = true;
                    revision = -1;
                }
                quorum::Transition::Sync { numsync, sync } => {
                    self.set_standby_names(quorum::render_any(numsync, &sync))
                        .await?;
                    changed_postgres = true;
                }
                quorum::Transition::Restart => break,
            }
        }
        Ok(())
    }

    /// Applies one cycle of the synchronous replication plan, keeping Patroni's order.
    async fn manage_sync(
        &mut self,
        view: &ClusterView,
        status: &crate::state::PostgresStatus,
    ) -> Result<(), ActionError> {
        // The local setting wins over the cluster-wide one, as in the files we write.
        let synchronous_commit = self
            .config
            .postgresql
            .parameters
            .get("synchronous_commit")
            .or_else(|| self.dynamic.postgresql.parameters.get("synchronous_commit"))
            .map(|v| v.as_setting());
        let mode = sync::SyncMode {
            enabled: self.dynamic.synchronous_mode.is_on(),
            strict: self.dynamic.synchronous_mode_strict,
            node_count: self.dynamic.synchronous_node_count,
            max_lag: sync::SyncMode::max_lag_from_config(self.dynamic.maximum_lag_on_syncnode),
            lsn: sync::LsnKind::for_synchronous_commit(synchronous_commit.as_deref()),
        };
        if self.facts.quorum_commit && self.facts.synchronous_mode {
            return self.manage_quorum(mode, view, status).await;
        }
        let caught_up = self.caught_up_standbys(view, status);
        let plan = sync::plan_with_readiness(
            mode,
            &self.facts.name,
            view,
            &status.replication,
            status.wal_position(),
            caught_up.as_ref(),
        );
        let revision = view.sync.as_ref().map(|s| s.revision);
        if plan.delete_key {
            self.dcs.write_sync(None, revision).await?;
            info!("synchronous mode is off: removed the `sync` key");
        }
        let mut revision = revision.unwrap_or(0);
        if let Some(state) = &plan.key_before {
            if !self.dcs.write_sync(Some(state), Some(revision)).await? {
                return Err(ActionError::Failed(
                    "the `sync` key changed under us".into(),
                ));
            }
            info!(sync_standby = ?state.sync_standby, "updated `sync` before changing postgres");
            // The next compare must be against the revision we just wrote: re-read next cycle.
            revision = -1;
        }
        self.set_standby_names(plan.standby_names.clone()).await?;
        if let (Some(state), true) = (&plan.key_after, revision >= 0) {
            if self.dcs.write_sync(Some(state), Some(revision)).await? {
                info!(sync_standby = ?state.sync_standby, "published the confirmed synchronous standby");
            }
        }
        Ok(())
    }

    /// Keeps one physical slot per other member so a replica's WAL is retained while it is
    /// away, drops inactive slots of members that left, and keeps the permanent slots: see
    /// [`slots`] for the rules, which this carries out.
    async fn sync_slots(
        &mut self,
        obs: &Observation,
        view: &ClusterView,
    ) -> Result<(), ActionError> {
        let PostgresView::Running(status) = &obs.postgres else {
            return Ok(());
        };
        let me = self.facts.name.clone();
        let own = replica::slot_name(&me);
        let leader = if self.core.believes_leader {
            Some(me.as_str())
        } else {
            view.leader_name()
        };
        let Some(leader) = leader else {
            return Ok(());
        };
        let leads = leader == me;
        // Slots for the members that stream from this one (`decide::topology`): on the leader
        // all but those cascading from another member, on a replica those that cascade from it.
        let downstream = topology::downstream_of(view, leader, &me);
        let mut physical: std::collections::BTreeSet<String> =
            downstream.iter().map(|m| replica::slot_name(m)).collect();
        // Warnings for the entries that are neither came with the configuration.
        let permanent = crate::config::slots::permanent(&self.dynamic.slots, "config").0;
        let published = view.status.as_ref().map(|s| &s.slots);
        let mut advance_leader = std::collections::BTreeMap::new();
        if leads {
            // Patroni 4 with `member_slots_ttl` on: the leader also keeps the slots of the
            // members that cascade from another member, advanced to the position they report,
            // so one that falls back to the leader (its upstream gone) streams at once.
            let keeps_cascading = self.dynamic.member_slots_ttl > 0;
            let mut not_here = std::collections::BTreeSet::new();
            for m in view
                .members
                .iter()
                .filter(|m| m.name != me && !downstream.contains(&m.name))
            {
                let slot = replica::slot_name(&m.name);
                if keeps_cascading && !m.record.tag_bool("nostream") {
                    let lsn = member_slot_target(m, published.and_then(|p| p.get(&slot)));
                    advance_leader.insert(slot, lsn);
                } else {
                    not_here.insert(slot);
                }
            }
            let retained = self.member_slots(view);
            physical.extend(retained.into_iter().filter(|s| !not_here.contains(s)));
            physical.extend(permanent.physical);
        }
        physical.remove(&own);
        let advance_physical = if leads {
            advance_leader
        } else {
            let kept = self.replica_physical_slots(view, &downstream);
            let advance = kept
                .iter()
                .map(|slot| {
                    let at_leader = published.and_then(|p| p.get(slot));
                    let member = view
                        .members
                        .iter()
                        .find(|m| replica::slot_name(&m.name) == *slot);
                    let lsn = match member {
                        Some(m) => member_slot_target(m, at_leader),
                        None => at_leader.copied().unwrap_or(0),
                    };
                    (slot.clone(), lsn)
                })
                .collect();
            physical.extend(kept);
            physical.remove(&own);
            advance
        };
        // The leader keeps the configured logical slots whatever its own tags: Patroni would
        // drop them on a primary tagged `nofailover` or `nostream`, losing the consumers'
        // positions for good.
        let keeps_logical = if leads {
            self.dynamic.postgresql.use_slots && self.dynamic.standby_source().is_none()
        } else {
            self.holds_logical_slots()
        };
        let logical = if keeps_logical {
            permanent
                .logical
                .into_iter()
                .filter(|(name, _)| !physical.contains(name))
                .map(|(name, slot)| {
                    // The leader copies nothing from itself: a copy it has is kept as it is.
                    let published_lsn = published
                        .filter(|_| !leads)
                        .and_then(|p| p.get(&name))
                        .copied();
                    let wanted = slots::WantedLogical {
                        slot,
                        published_lsn,
                    };
                    (name, wanted)
                })
                .collect()
        } else {
            Default::default()
        };
        let wanted = slots::WantedSlots {
            physical,
            logical,
            advance_physical,
        };
        let existing = self
            .pg
            .replication_slots()
            .await
            .map_err(ActionError::Failed)?;
        let local = slots::LocalState {
            primary: !status.in_recovery,
            replay_lsn: status.replay_lsn,
            paused: view.is_paused(),
        };
        let mut plan = slots::plan(&wanted, &existing, &self.dynamic.ignore_slots, local);
        let mut recopy = Vec::new();
        // A replica seeds the check with the copies it has (Patroni's forced readiness check
        // at start); a leader has nothing to check (a promotion still in recovery included).
        if !local.primary && !leads && self.slot_readiness.is_none() {
            let mut seeded = slots::Readiness::default();
            for slot in existing
                .iter()
                .filter(|s| wanted.logical.contains_key(&s.name))
            {
                seeded.copied(&slot.name);
            }
            self.slot_readiness = Some(seeded);
        }
        for change in &plan.changes {
            match change {
                slots::SlotChange::Drop { name, reason } => {
                    info!(slot = %name, %reason, "dropping a replication slot");
                    if let Some(readiness) = self.slot_readiness.as_mut() {
                        readiness.forget(name);
                    }
                }
                slots::SlotChange::CreatePhysical { name } => {
                    info!(slot = %name, "creating a physical replication slot")
                }
                // Logged by the port, which creates it in the background.
                slots::SlotChange::CreateLogical { name, .. } => {
                    debug!(slot = %name, "a logical replication slot is missing")
                }
                slots::SlotChange::Advance { name, lsn, .. } => debug!(
                    slot = %name,
                    lsn = %crate::postgres::slots::format_lsn(*lsn),
                    "advancing the copy of a logical slot"
                ),
                slots::SlotChange::AdvancePhysical { name, lsn } => debug!(
                    slot = %name,
                    lsn = %crate::postgres::slots::format_lsn(*lsn),
                    "advancing a physical slot to the leader's position"
                ),
            }
            // One failed step does not stop the others; the next cycle plans again.
            match self.pg.change_slot(change).await {
                Ok(()) => {}
                Err(ports::SlotChangeError::CopyUnusable(e)) => {
                    if let slots::SlotChange::Advance { name, .. } = change {
                        warn!(slot = %name, error = %e, "the copy of a logical slot cannot be advanced: copying it again");
                        recopy.push(name.clone());
                    }
                }
                Err(e) => warn!(?change, error = %e, "could not change a replication slot"),
            }
        }
        if local.primary {
            self.slot_positions = plan.positions;
            self.slot_positions
                .extend(self.published_physical_positions(status, &wanted, &existing));
            self.slot_readiness = None;
            return Ok(());
        }
        self.slot_positions.clear();
        if leads {
            return Ok(());
        }
        let Some(primary) = view
            .member(leader)
            .and_then(|m| Upstream::from_member(leader, &m.record))
        else {
            return Ok(());
        };
        self.check_slot_readiness(view, &primary, &existing).await;
        plan.copy_from_primary.extend(recopy);
        if !plan.copy_from_primary.is_empty() {
            self.copy_logical_slots(&primary, &wanted, &plan.copy_from_primary)
                .await?;
        }
        Ok(())
    }

    /// The physical slots a replica keeps besides those of the members cascading from it
    /// (Patroni 4's `_get_members_slots` and `_get_permanent_slots`): with `member_slots_ttl`
    /// on, one per other streaming member (the leader's included) and the leader's
    /// `retain_slots`, so that once promoted it has every member's slot; and the permanent
    /// physical slots. A `nofailover` member never leads: it keeps none of these; nor does a
    /// member of a standby cluster (deliberately narrower than Patroni).
    fn replica_physical_slots(
        &self,
        view: &ClusterView,
        downstream: &std::collections::BTreeSet<String>,
    ) -> std::collections::BTreeSet<String> {
        let mut kept = std::collections::BTreeSet::new();
        // A standby leader publishes no slot positions to advance the copies with.
        if !self.dynamic.postgresql.use_slots
            || self.facts.nofailover
            || self.dynamic.standby_source().is_some()
        {
            return kept;
        }
        if self.dynamic.member_slots_ttl > 0 {
            kept.extend(
                view.members
                    .iter()
                    .filter(|m| m.name != self.facts.name && !m.record.tag_bool("nostream"))
                    .filter(|m| !downstream.contains(&m.name))
                    .map(|m| replica::slot_name(&m.name)),
            );
            if let Some(status) = &view.status {
                kept.extend(status.retain_slots.iter().cloned());
            }
        }
        let permanent = crate::config::slots::permanent(&self.dynamic.slots, "config").0;
        kept.extend(permanent.physical);
        kept
    }

    /// What the leader publishes in `status.slots` besides its logical slots (Patroni's
    /// `Postgresql.slots` through `maybe_filter_permanent_slots`): the `restart_lsn` of its
    /// physical slots and its own WAL position under its own slot name, so replicas advance
    /// the copies they keep; with `member_slots_ttl` off, only the permanent physical slots.
    fn published_physical_positions(
        &self,
        status: &crate::state::PostgresStatus,
        wanted: &slots::WantedSlots,
        existing: &[crate::postgres::slots::ReplicationSlot],
    ) -> std::collections::BTreeMap<String, u64> {
        let all = self.dynamic.member_slots_ttl > 0;
        let permanent = crate::config::slots::permanent(&self.dynamic.slots, "config").0;
        let mut positions: std::collections::BTreeMap<String, u64> = existing
            .iter()
            .filter(|s| s.kind == crate::postgres::slots::SlotType::Physical)
            .filter(|s| wanted.physical.contains(&s.name))
            .filter(|s| all || permanent.physical.contains(&s.name))
            .filter_map(|s| Some((s.name.clone(), s.restart_lsn?)))
            .collect();
        if all && self.dynamic.postgresql.use_slots {
            if let Some(position) = status.wal_flush_lsn {
                positions.insert(replica::slot_name(&self.facts.name), position);
            }
        }
        positions
    }

    /// Patroni's `_get_permanent_slots`: a member that may become the leader and streams keeps
    /// the permanent logical slots; a `nofailover` or `nostream` member, one whose cascade
    /// does not stream, or a member of a standby cluster, has none (and drops them as unknown).
    fn holds_logical_slots(&self) -> bool {
        self.dynamic.postgresql.use_slots
            && !self.facts.nofailover
            && self.dynamic.standby_source().is_none()
            && match self.last_view.as_deref() {
                Some(view) => self.slot_on_leader(view).is_some(),
                None => !self.config.tags.nostream,
            }
    }

    /// Patroni's `enforce_hot_standby_feedback`: the primary must keep the catalog rows the
    /// copies of logical slots need, which it learns from this feedback (on every role, so a
    /// promotion or a demotion does not change it): on when this member keeps the permanent
    /// logical slots, or passes on the feedback of a member cascading from it that does.
    fn enforces_hot_standby_feedback(&self) -> bool {
        if crate::config::slots::permanent(&self.dynamic.slots, "config")
            .0
            .logical
            .is_empty()
        {
            return false;
        }
        if self.holds_logical_slots() {
            return true;
        }
        let Some(view) = self.last_view.as_deref() else {
            return false;
        };
        let leader = view.leader_name().unwrap_or(self.facts.name.as_str());
        self.dynamic.postgresql.use_slots
            && self.dynamic.standby_source().is_none()
            && self.slot_on_leader(view).is_some()
            && topology::cascade_keeps_logical_slots(view, leader, &self.facts.name)
    }

    /// This member's physical slot on the leader (see [`topology::slot_on_leader`]).
    fn slot_on_leader(&self, view: &ClusterView) -> Option<String> {
        let leader = view.leader_name().unwrap_or(self.facts.name.as_str());
        topology::slot_on_leader(
            view,
            leader,
            &self.facts.name,
            self.facts.replicatefrom.as_deref(),
            self.config.tags.nostream,
        )
    }

    /// Patroni's `check_logical_slots_readiness`: logs each copied slot once it is safe after a
    /// failover, judged by the physical slot on the primary that carries this member's
    /// feedback (a cascading member's goes through its chain's first member).
    async fn check_slot_readiness(
        &mut self,
        view: &ClusterView,
        primary: &Upstream,
        existing: &[crate::postgres::slots::ReplicationSlot],
    ) {
        let Some(own) = self.slot_on_leader(view) else {
            return;
        };
        let Some(readiness) = self.slot_readiness.as_mut() else {
            return;
        };
        if readiness.pending().next().is_none() {
            return;
        }
        let mut names = readiness.unremembered();
        names.push(own.clone());
        let rows = match self
            .pg
            .read_primary_slots(&self.config, primary, &names, false)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "cannot check the physical slot of this member on the primary");
                return;
            }
        };
        let Some(physical) = rows.iter().find(|r| r.name == own) else {
            warn!(slot = %own, "the physical slot of this member does not exist on the primary");
            return;
        };
        let Some(physical_catalog_xmin) = physical.catalog_xmin else {
            // hot_standby_feedback (on while logical slots are kept) has not reached it yet.
            debug!(slot = %own, "the physical slot on the primary has no catalog_xmin yet");
            return;
        };
        let on_primary = rows
            .iter()
            .filter(|r| r.name != own)
            .filter_map(|r| Some((r.name.clone(), r.catalog_xmin?)))
            .collect();
        let local = existing
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.catalog_xmin?)))
            .collect();
        let Some(readiness) = self.slot_readiness.as_mut() else {
            return;
        };
        for name in readiness.check(physical_catalog_xmin, &on_primary, &local) {
            info!(slot = %name, "logical slot is safe to be used after a failover");
        }
    }

    /// Patroni's `copy_logical_slots`: reads the slots' state files from the primary, stops
    /// postgres, writes them into the data directory and starts postgres again, which then
    /// loads them. Blocks the loop for the restart (Patroni runs it as an async action).
    async fn copy_logical_slots(
        &mut self,
        primary: &Upstream,
        wanted: &slots::WantedSlots,
        names: &[String],
    ) -> Result<(), ActionError> {
        let rows = match self
            .pg
            .read_primary_slots(&self.config, primary, names, true)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "cannot copy logical slots from the primary");
                return Ok(());
            }
        };
        let copies: Vec<_> = rows
            .into_iter()
            .filter(|row| {
                let Some(want) = wanted.logical.get(&row.name) else {
                    return false;
                };
                let same = row.kind == crate::postgres::slots::SlotType::Logical
                    && row.database.as_deref() == Some(want.slot.database.as_str())
                    && row.plugin.as_deref() == Some(want.slot.plugin.as_str());
                if !same {
                    warn!(
                        slot = %row.name,
                        configured = ?want.slot,
                        on_primary = ?(&row.database, &row.plugin),
                        "will not copy the logical slot: the primary's differs from the configuration"
                    );
                }
                same
            })
            .collect();
        if copies.is_empty() {
            return Ok(());
        }
        let copied: Vec<&str> = copies.iter().map(|c| c.name.as_str()).collect();
        info!(slots = ?copied, "copying logical slots from the primary: restarting postgres");
        self.pg
            .stop(StopMode::Fast, Duration::from_secs(60))
            .await
            .map_err(ActionError::Failed)?;
        self.pg.reset().await;
        let installed = self.pg.install_slots(&copies).await;
        // Start again whatever the copy did: the replica must not stay down for it.
        self.pg.start().await.map_err(ActionError::Failed)?;
        installed.map_err(|e| ActionError::Failed(format!("cannot install copied slots: {e}")))?;
        let readiness = self.slot_readiness.get_or_insert_with(Default::default);
        for name in &copied {
            readiness.copied(name);
        }
        info!(slots = ?copied, "copied logical slots from the primary");
        Ok(())
    }

    /// The member slots the leader keeps (ours included, for the next leader): the members
    /// in `view` and those gone for less than `member_slots_ttl`; none without `use_slots`.
    fn member_slots(&mut self, view: &ClusterView) -> std::collections::BTreeSet<String> {
        if !self.dynamic.postgresql.use_slots {
            return Default::default();
        }
        let members = view
            .members
            .iter()
            .map(|m| m.name.as_str())
            .chain([self.facts.name.as_str()])
            .map(replica::slot_name)
            .collect::<Vec<_>>();
        let ttl = Duration::from_secs(self.dynamic.member_slots_ttl.into());
        self.core.retain_member_slots(members, self.rt.now(), ttl)
    }

    fn pg_state(&self) -> PgState {
        match &self.task {
            Some((TaskKind::Bootstrap, _)) => {
                return if self.config.bootstrap.is_custom() {
                    PgState::RunningCustomBootstrap
                } else {
                    PgState::InitializingNewCluster
                };
            }
            Some((TaskKind::CreateReplica, _)) => return PgState::CreatingReplica,
            Some((TaskKind::Rewind, _)) => return PgState::Stopped,
            None => {}
        }
        match self.pg.state() {
            Postmaster::NotRunning => PgState::Stopped,
            Postmaster::Crashed { .. } => PgState::Crashed,
            Postmaster::StartFailed { .. } => PgState::StartFailed,
            Postmaster::Running { .. } if self.last_postgres.is_some() => PgState::Running,
            Postmaster::Running { .. } if self.pg.state().accepts_connections() => PgState::Unknown,
            Postmaster::Running { .. } => PgState::Starting,
        }
    }

    fn role(&self, obs: &Observation) -> Role {
        match (&self.last_postgres, &obs.data_dir) {
            (Some(pg), _) if !pg.in_recovery => Role::Primary,
            (Some(_), _) if self.core.believes_leader && self.facts.standby_cluster => {
                Role::StandbyLeader
            }
            (Some(_), _) => Role::Replica,
            (None, DataDir::Empty) => Role::Uninitialized,
            (None, _) if self.core.believes_leader && self.facts.standby_cluster => {
                Role::StandbyLeader
            }
            (None, _) if self.core.believes_leader => Role::Primary,
            (None, _) => Role::Demoted,
        }
    }

    /// Promotion was requested and postgres was last seen in recovery: the loop polls it every
    /// [`PROMOTION_POLL`] until it leaves recovery (or the next tick).
    fn promotion_in_flight(&self) -> bool {
        self.core.believes_leader
            && self.core.checkpoint_after_promote_pending
            && self.task.is_none()
            && self.pg.state().accepts_connections()
            && self.last_postgres.as_ref().is_some_and(|p| p.in_recovery)
    }

    /// Publishes at once that postgres left recovery, before the cycle that follows (its
    /// DCS writes and checkpoint take a while): `GET /primary` answers 200 as soon as writes
    /// succeed. The lease still decides it (`leader_valid_until` is unchanged).
    fn publish_promoted(&mut self, status: crate::state::PostgresStatus) {
        self.last_postgres = Some(status.clone());
        self.status_tx.send_modify(|s| {
            let s = Arc::make_mut(s);
            s.postgres = Some(status);
            s.role = Role::Primary;
        });
    }

    fn publish_due(&self, due: Instant) {
        // Copied only if a reader still holds the previous status.
        self.status_tx
            .send_modify(|s| Arc::make_mut(s).next_cycle_due = due);
    }

    fn publish(&self, obs: &Observation) {
        let now = self.rt.now();
        let status = AgentStatus {
            scope: self.config.scope.clone(),
            name: self.config.name.clone(),
            state: self.pg_state(),
            role: self.role(obs),
            postgres: self.last_postgres.clone(),
            leader_valid_until: if self.core.believes_leader {
                self.core.lease_certain_until
            } else {
                None
            },
            cluster: self.last_view.clone(),
            cluster_read_at: self.last_read_at,
            dcs_last_seen: self.dcs_last_seen,
            paused: self.last_view.as_ref().is_some_and(|v| v.is_paused()),
            tags: self.config.effective_tags(),
            pending_restart: self
                .last_postgres
                .as_ref()
                .is_some_and(|p| !p.pending_restart.is_empty()),
            database_system_identifier: obs.data_dir.system_identifier().map(str::to_owned),
            next_cycle_due: now + self.loop_wait(),
            ttl: self.ttl(),
            loop_wait: self.loop_wait(),
            maximum_lag_on_failover: self.dynamic.maximum_lag_on_failover,
            postmaster_start_epoch: self
                .last_postgres
                .as_ref()
                .and_then(|p| p.postmaster_start_epoch),
        };
        self.status_tx.send_replace(Arc::new(status));
    }

    fn member_record(&self, obs: &Observation) -> MemberRecord {
        self.member_record_as(self.role(obs))
    }

    fn member_record_as(&self, role: Role) -> MemberRecord {
        let pg = self.last_postgres.as_ref();
        let paused = self.last_view.as_ref().is_some_and(|v| v.is_paused());
        MemberRecord {
            conn_url: self.config.conn_url(),
            api_url: self.config.api_url(),
            state: self.pg_state().as_str().to_owned(),
            role: role.as_str().to_owned(),
            version: PATRONI_API_VERSION.to_owned(),
            // A standby whose replay is paused serves what it has replayed, however much it
            // receives: its lag in `list` and `/cluster` is the replay lag.
            xlog_location: pg.and_then(|p| {
                if p.in_recovery && p.replay_paused {
                    p.replay_lsn.or(p.wal_position())
                } else {
                    p.wal_position()
                }
            }),
            receive_lsn: pg.filter(|p| p.in_recovery).and_then(|p| p.receive_lsn),
            replay_lsn: pg.filter(|p| p.in_recovery).and_then(|p| p.replay_lsn),
            replication_state: pg.filter(|p| p.in_recovery).map(|p| {
                if p.streaming {
                    "streaming"
                } else {
                    "in archive recovery"
                }
                .to_owned()
            }),
            timeline: pg.and_then(|p| p.timeline),
            tags: {
                let mut tags = self.config.effective_tags();
                if self.releasing_sync {
                    tags.insert("nosync".into(), true.into());
                }
                tags
            },
            pending_restart: pg.filter(|p| !p.pending_restart.is_empty()).map(|_| true),
            pause: paused.then_some(true),
            checkpoint_after_promote: self.core.checkpoint_after_promote_pending.then_some(false),
            pgwarden_version: Some(crate::VERSION.to_owned()),
            // Where the leader's backup from a standby reaches this member (pgBackRest's TLS
            // server); an extra field that Patroni's readers ignore.
            extra: {
                let mut extra = crate::backup::member_fields(&self.config);
                if let Some((request, started)) = &self.core.scheduled_restart {
                    extra.insert(
                        "scheduled_restart".into(),
                        request.record_json(started.as_deref()),
                    );
                }
                extra
            },
        }
    }

    async fn touch_member(&self, obs: &Observation) {
        let DcsView::Known(view) = &obs.dcs else {
            return;
        };
        if view.member(&self.facts.name).is_none() {
            self.dcs.member_key_lost().await;
        }
        if let Err(e) = self.dcs.touch_member(&self.member_record(obs)).await {
            debug!(error = %error_chain(&e), "could not update the member key");
        }
    }

    /// A synchronous (or quorum) standby about to stop (agent shutdown, restart) asks the leader to pick another one
    /// first, so commits do not wait for it meanwhile (Patroni's `while_not_sync_standby`): it
    /// publishes `nosync` and waits up to two `loop_wait`s for `sync` to drop it. Only a hint:
    /// when the DCS does not answer it stops anyway.
    async fn release_sync_standby(&mut self) {
        let replica = self.last_postgres.as_ref().is_some_and(|p| p.in_recovery);
        if self.core.believes_leader
            || !replica
            || !self.dynamic.synchronous_mode.is_on()
            || self.config.tags.nosync
        {
            return;
        }
        let me = self.facts.name.clone();
        match self.dcs.cluster().await {
            Ok(view) if view.is_sync_listed(&me) => {}
            _ => return,
        }
        self.releasing_sync = true;
        if let Err(e) = self
            .dcs
            .touch_member(&self.member_record_as(Role::Replica))
            .await
        {
            warn!(error = %error_chain(&e), "could not publish nosync; stopping as a synchronous standby");
            return;
        }
        info!("asking the leader to release us from synchronous standby before stopping");
        let waited_from = self.rt.now();
        let limit = Duration::from_secs(u64::from(self.dynamic.loop_wait) * 2);
        loop {
            self.rt.sleep(Duration::from_secs(1)).await;
            match self.dcs.cluster().await {
                Ok(view) if !view.is_sync_listed(&me) => {
                    info!("released from synchronous standby");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %error_chain(&e), "cannot read the cluster; stopping without waiting for the release");
                    return;
                }
            }
            if self.rt.now().saturating_duration_since(waited_from) >= limit {
                warn!("the leader did not release us from synchronous standby in time; stopping anyway");
                return;
            }
        }
    }

    /// Graceful stop (Patroni §5.10): fast shutdown, then release `leader` so replicas race at
    /// once instead of after `ttl`, then revoke the lease so the member key disappears.
    async fn shutdown(&mut self) {
        info!("shutting down: stopping postgres");
        if let Some((_, task)) = self.task.take() {
            task.abort();
        }
        self.end_backup("the agent shuts down").await;
        self.release_sync_standby().await;
        let stopped = self.pg.stop(StopMode::Fast, Duration::from_secs(60)).await;
        self.pg.set_fence(None);
        match stopped {
            Ok(()) => {
                if self.core.believes_leader {
                    if let Some(optime) = self.pg.control_checkpoint().await {
                        let _ = self
                            .dcs
                            .write_status(&LeaderStatus {
                                optime,
                                slots: self.slot_positions.clone(),
                                retain_slots: self.core.retained_slot_names(),
                            })
                            .await;
                    }
                    match self.dcs.release_leader().await {
                        Ok(()) => info!("released the leader lock"),
                        Err(e) => {
                            warn!(error = %error_chain(&e), "could not release the leader lock")
                        }
                    }
                }
            }
            // If postgres did not stop, keeping the key is the safe choice: it expires with the
            // lease, and nobody promotes while this one might still accept writes.
            Err(e) => error!(error = %e, "postgres did not stop; leaving the leader key to expire"),
        }
        if let Err(e) = self.dcs.revoke_lease().await {
            warn!(error = %error_chain(&e), "could not revoke the lease; the member key expires with it");
        }
    }
}

/// How an action failed.
#[derive(Debug, thiserror::Error)]
enum ActionError {
    /// Retry in the next cycle.
    #[error("{0}")]
    Failed(String),
    /// Retry in the next cycle: `context`, because of `source`.
    #[error("{context}")]
    Caused {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A DCS request failed: retry in the next cycle.
    #[error(transparent)]
    Dcs(#[from] DcsError),
    /// Stop the agent.
    #[error("{0}")]
    Fatal(String),
}

impl ActionError {
    /// `map_err(ActionError::caused("cannot …"))`: the error becomes the source.
    fn caused<E>(context: &'static str) -> impl FnOnce(E) -> ActionError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        move |source| ActionError::Caused {
            context,
            source: Box::new(source),
        }
    }
}

/// Where a member's physical slot that nobody streams from here is advanced to (Patroni's
/// `_get_members_slots`): the position the leader publishes for it; for a member that cascades
/// from another (`replicatefrom`), whose slot on the leader does not move by itself, the
/// position it reports if that is further (postgres caps an advance at what it has).
fn member_slot_target(member: &crate::dcs::Member, published: Option<&u64>) -> u64 {
    let published = published.copied().unwrap_or(0);
    let cascades = member
        .record
        .tags
        .get("replicatefrom")
        .and_then(|v| v.as_str())
        .is_some_and(|from| !from.is_empty());
    if cascades {
        published.max(member.record.xlog_location.unwrap_or(0))
    } else {
        published
    }
}

/// The DCS `history` for the leader's timeline: the lines of postgres' timeline history file
/// (`tli<TAB>lsn<TAB>reason`), which is the leader's own lineage, as Patroni writes it. A line
/// already recorded for the same switch (timeline and position) keeps its reason, timestamp and
/// leader; the newest switch, if not recorded, gets our timestamp and name. Recorded lines of
/// another branch are dropped: a line saying the cluster left a timeline later than it really
/// did made a standby with WAL past the real switch look as if it could still follow, and it
/// never streamed again (simulation seed 1796800006141, 5 members: a candidate that had not
/// streamed the previous leader's new timeline was promoted from the old one).
pub fn merge_history(
    recorded: &[crate::dcs::HistoryLine],
    file: &str,
    timestamp: &str,
    new_leader: &str,
) -> Vec<crate::dcs::HistoryLine> {
    let from_file: Vec<crate::dcs::HistoryLine> = file
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            let timeline = parts.next()?.trim().parse().ok()?;
            let lsn = controldata::parse_lsn(parts.next()?)?;
            let reason = parts.next().unwrap_or("").trim().to_owned();
            Some(crate::dcs::HistoryLine {
                timeline,
                lsn,
                reason,
                timestamp: None,
                new_leader: None,
            })
        })
        .collect();
    if from_file.is_empty() {
        return recorded.to_vec();
    }
    let last = from_file.last().map(|l| l.timeline);
    from_file
        .into_iter()
        .map(|mut line| {
            match recorded
                .iter()
                .find(|r| r.timeline == line.timeline && r.lsn == line.lsn)
            {
                Some(known) => known.clone(),
                None => {
                    if Some(line.timeline) == last {
                        line.timestamp = Some(timestamp.to_owned());
                        line.new_leader = Some(new_leader.to_owned());
                    }
                    line
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_merge_appends_new_timelines_with_timestamp_and_leader() {
        let recorded = vec![crate::dcs::HistoryLine {
            timeline: 1,
            lsn: 100,
            reason: "old".into(),
            timestamp: Some("t0".into()),
            new_leader: Some("a".into()),
        }];
        let file =
            "1\t0/64\tno recovery target specified\n2\t0/4000A0\tno recovery target specified\n";
        let merged = merge_history(&recorded, file, "t1", "b");
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].reason, "old");
        assert_eq!(merged[1].timeline, 2);
        assert_eq!(merged[1].lsn, 0x4000A0);
        assert_eq!(merged[1].new_leader.as_deref(), Some("b"));
    }

    /// Simulation seed 1796800006141: `history` said timeline 1 ended at 0/C8 (a leader on
    /// timeline 2 that died), the new leader left timeline 1 at 0/64: its own lineage wins.
    #[test]
    fn history_is_the_leaders_lineage_not_an_abandoned_branch() {
        let recorded = vec![crate::dcs::HistoryLine {
            timeline: 1,
            lsn: 200,
            reason: "promoted".into(),
            timestamp: Some("t0".into()),
            new_leader: Some("pg3".into()),
        }];
        let merged = merge_history(
            &recorded,
            "1\t0/64\tno recovery target specified\n",
            "t1",
            "pg4",
        );
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].lsn, 100);
        assert_eq!(merged[0].new_leader.as_deref(), Some("pg4"));
        assert_eq!(merged[0].timestamp.as_deref(), Some("t1"));
        // An unreadable (empty) file leaves what is recorded.
        assert_eq!(merge_history(&recorded, "", "t1", "pg4"), recorded);
    }
}
