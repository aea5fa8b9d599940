//! One member's agent: the loop of `pgwarden::ha` (observe → the real `decide` → execute) as an
//! async task whose every DCS request, peer call and postgres action takes simulated time.
//!
//! It mirrors `agent/src/ha/mod.rs` step by step (the same order of observation, the same
//! lease and fence arithmetic from `ha::timing`, the same sync planner `ha::sync::plan`, the same
//! history merge); only the IO underneath is simulated. Dropping the future is `kill -9`.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pgwarden::dcs::{FailoverRequest, LeaderStatus, LeaseRenewal, MemberRecord, SyncState};
use pgwarden::ha::decide::{decide, Action, MemberFacts, Outcome};
use pgwarden::ha::observe::{
    DataDir, DcsView, LeaseCheck, Observation, PeerAnswer, PostgresView, TaskKind, TaskView,
};
use pgwarden::ha::sync;
use pgwarden::ha::timing::{self, FencePolicy};
use pgwarden::peer::PeerStatus;
use pgwarden::postgres::controldata::{ClusterState, ControlData};
use pgwarden::postgres::supervisor::StopMode;
use pgwarden::state::PostgresStatus;

use crate::world::{api_url, conn_url, Event, PgRun, Shared, Store, Us, MS, SEC, SYSID};

/// Sleeps until a global instant; `idle` waits also end on a watch event.
pub struct Sleep {
    world: Shared,
    node: usize,
    until: Us,
    idle: bool,
}

impl Future for Sleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        let mut w = self.world.borrow_mut();
        let now = w.now;
        let n = &mut w.nodes[self.node];
        if now >= self.until || (self.idle && n.woken) {
            n.woken = false;
            n.idle = false;
            Poll::Ready(())
        } else {
            n.wake_at = self.until;
            n.idle = self.idle;
            Poll::Pending
        }
    }
}

/// Why a simulated DCS request failed (the trait's `DcsError` split).
#[derive(Debug)]
enum DcsErr {
    Unreachable,
    Rejected,
    LeaseLost,
}

enum ActionError {
    Failed(String),
    Fatal(String),
}

impl From<DcsErr> for ActionError {
    fn from(e: DcsErr) -> Self {
        ActionError::Failed(format!("{e:?}"))
    }
}

enum Next {
    Wait,
    Now,
}

/// A background task (bootstrap, clone, rewind) and when it finishes.
#[derive(Debug, Clone)]
struct Task {
    kind: TaskKind,
    done_at: Us,
    leader: Option<usize>,
    /// What pg_rewind fetched from the source when it started (it connects once, at start).
    snapshot: Option<crate::world::Pg>,
}

/// Patroni's default `primary_start_timeout` (seconds): the simulated configuration does not vary it.
const PRIMARY_START_TIMEOUT: u64 = 300;

/// The dynamic configuration the agent applies from `config`.
#[derive(Debug, Clone, Copy)]
struct Dynamic {
    ttl: u64,
    loop_wait: u64,
    retry_timeout: u64,
    strict: bool,
}

/// The agent process's memory (lost on a crash).
pub struct Agent {
    w: Shared,
    me: usize,
    name: String,
    facts: MemberFacts,
    dynamic: Dynamic,
    /// TTL for future leases (`Dcs::set_ttl`).
    lease_ttl: u64,
    fence: FencePolicy,
    lease: Option<i64>,
    last_keepalive: Option<Us>,
    believes_leader: bool,
    lease_certain_until: Option<std::time::Instant>,
    task: Option<Task>,
    task_failed: Option<(TaskKind, String)>,
    following: Option<String>,
    checkpoint_after_promote_pending: bool,
    /// As `ha/mod.rs`: since when (local clock) `initialize` has held an unfinished claim
    /// with no `leader`.
    unclaimed_bootstrap_since: Option<Us>,
    /// As `ha/mod.rs`: since when (local clock) we have held the lock with postgres down.
    primary_down_since: Option<Us>,
    sync_standby_names: String,
    last_member: Option<(MemberRecord, i64)>,
    /// `leader` (holder, lease) in this cycle's view, until a renewal has used it: the etcd
    /// cache that vouches for the view confirms the renewal without a compare.
    view_leader: Option<(String, i64)>,
}

impl Agent {
    pub fn new(w: Shared, me: usize) -> Self {
        let (name, tags, dynamic) = {
            let world = w.borrow();
            let n = &world.nodes[me];
            let dynamic = Dynamic {
                ttl: world.initial.ttl,
                loop_wait: world.initial.loop_wait,
                retry_timeout: world.initial.retry_timeout,
                strict: world.initial.strict,
            };
            (n.name.clone(), n.tags, dynamic)
        };
        let facts = MemberFacts {
            nofailover: tags.nofailover || tags.failover_priority == 0,
            failover_priority: tags.failover_priority,
            maximum_lag_on_failover: w.borrow().initial.maximum_lag_on_failover,
            synchronous_mode: w.borrow().initial.synchronous_mode,
            ..MemberFacts::named(&name)
        };
        Agent {
            me,
            name,
            facts,
            lease_ttl: dynamic.ttl,
            dynamic,
            fence: FencePolicy::default(),
            lease: None,
            last_keepalive: None,
            believes_leader: false,
            lease_certain_until: None,
            task: None,
            task_failed: None,
            following: None,
            checkpoint_after_promote_pending: false,
            unclaimed_bootstrap_since: None,
            primary_down_since: None,
            sync_standby_names: if w.borrow().initial.strict && w.borrow().initial.synchronous_mode
            {
                "*".into()
            } else {
                String::new()
            },
            last_member: None,
            view_leader: None,
            w,
        }
    }

    fn now(&self) -> Us {
        self.w.borrow().now
    }

    fn local(&self) -> Us {
        let w = self.w.borrow();
        w.nodes[self.me].local_now(w.now)
    }

    fn instant_now(&self) -> std::time::Instant {
        let local = self.local();
        self.w.borrow().instant(local)
    }

    fn check_lease_for_writes(&self) -> Result<(), ActionError> {
        if timing::may_open_for_writes(self.lease_certain_until, self.fence, self.instant_now()) {
            Ok(())
        } else {
            Err(ActionError::Failed("lease not certain long enough".into()))
        }
    }

    fn log(&self, line: impl FnOnce() -> String) {
        let name = self.name.clone();
        self.w.borrow_mut().log(|| format!("{name}: {}", line()));
    }

    /// Sleeps a duration of the member's own clock.
    fn sleep(&self, local: Us) -> Sleep {
        let until = {
            let w = self.w.borrow();
            w.now + w.nodes[self.me].clock.global_len(local).max(1)
        };
        Sleep {
            world: self.w.clone(),
            node: self.me,
            until,
            idle: false,
        }
    }

    fn idle_until(&self, global: Us) -> Sleep {
        Sleep {
            world: self.w.clone(),
            node: self.me,
            until: global,
            idle: true,
        }
    }

    /// One DCS request: it takes a random latency, is applied halfway through if the store is
    /// reachable, and times out after `retry_timeout` (then it may or may not have been
    /// applied, as the trait says).
    async fn dcs<R>(&self, op: impl FnOnce(&mut Store, Us) -> R) -> Result<R, DcsErr> {
        let timeout = self.dynamic.retry_timeout * SEC;
        let latency = {
            let mut w = self.w.borrow_mut();
            let slow = !w.quiet && w.chance(0.02);
            if slow {
                w.between(timeout / 2, timeout * 3 / 2)
            } else {
                w.between(MS, 20 * MS)
            }
        };
        let half = latency.min(timeout) / 2;
        self.sleep(half).await;
        let applied = {
            let mut w = self.w.borrow_mut();
            let reach = w.reaches_dcs(self.me) && (latency <= timeout || w.chance(0.5));
            if reach {
                let now = w.now;
                w.store.expire(now);
                Some(op(&mut w.store, now))
            } else {
                None
            }
        };
        if latency > timeout || applied.is_none() {
            self.sleep(timeout - half).await;
            return Err(DcsErr::Unreachable);
        }
        self.sleep(latency - half).await;
        if !self.w.borrow().reaches_dcs(self.me) {
            return Err(DcsErr::Unreachable);
        }
        applied.ok_or(DcsErr::Unreachable)
    }

    async fn ensure_lease(&mut self) -> Result<i64, DcsErr> {
        if let Some(id) = self.lease {
            return Ok(id);
        }
        let (me, ttl) = (self.me, self.lease_ttl * SEC);
        let id = self.dcs(move |s, now| s.grant(me, ttl, now)).await?;
        self.lease = Some(id);
        Ok(id)
    }

    /// `EtcdDcs::renew_leader`: keepalive, then, unless the view of this cycle already showed the
    /// key with our name on our lease (the watch cache vouches for it), confirm (or re-attach)
    /// the key in one compare.
    async fn renew_leader(&mut self) -> Result<LeaseRenewal, DcsErr> {
        let lease = self.ensure_lease().await?;
        let sent_local = self.local();
        let sent_at = self.w.borrow().instant(sent_local);
        let ttl = match self.dcs(move |s, now| s.keepalive(lease, now)).await? {
            Some(ttl) => ttl,
            None => {
                self.lease = None;
                self.last_member = None;
                return Err(DcsErr::LeaseLost);
            }
        };
        self.last_keepalive = Some(sent_local);
        let vouched = self
            .view_leader
            .take()
            .is_some_and(|(holder, held_on)| holder == self.name && held_on == lease);
        if vouched {
            return Ok(LeaseRenewal {
                sent_at,
                ttl: std::time::Duration::from_micros(ttl),
            });
        }
        let name = self.name.clone();
        let confirmed = self
            .dcs(move |s, _| {
                let ours = s.leader.as_ref().is_some_and(|l| l.name == name);
                let same_lease = s.leader.as_ref().is_some_and(|l| l.lease == lease);
                if ours && !same_lease {
                    s.put_leader(&name, lease);
                }
                ours
            })
            .await?;
        if confirmed {
            Ok(LeaseRenewal {
                sent_at,
                ttl: std::time::Duration::from_micros(ttl),
            })
        } else {
            Err(DcsErr::Rejected)
        }
    }

    /// `HaLoop::renew`.
    async fn renew(&mut self) -> LeaseCheck {
        match self.renew_leader().await {
            Ok(renewal) if !timing::renewal_confirms(renewal, self.fence, self.instant_now()) => {
                LeaseCheck::Unconfirmed
            }
            Ok(renewal) => {
                self.believes_leader = true;
                self.lease_certain_until = Some(timing::lease_certain_until(renewal, self.fence));
                let deadline = timing::fence_deadline(renewal, self.fence);
                let local = self.w.borrow().local_of_instant(deadline);
                self.w.borrow_mut().nodes[self.me].fence = Some(local);
                LeaseCheck::Renewed(renewal)
            }
            Err(DcsErr::Unreachable) => LeaseCheck::Unconfirmed,
            Err(_) => {
                self.believes_leader = false;
                self.lease_certain_until = None;
                LeaseCheck::Lost
            }
        }
    }

    fn set_fence(&self, deadline: Option<Us>) {
        self.w.borrow_mut().nodes[self.me].fence = deadline;
    }

    /// `HaLoop::apply_dynamic_config`.
    fn apply_dynamic_config(&mut self, value: &serde_json::Value) {
        // The agent's parser: value by value, Patroni's timeout adjustment.
        let (d, _warnings) = pgwarden::config::DynamicConfig::from_dcs(
            value,
            &pgwarden::config::DynamicConfig::default(),
        );
        if u64::from(d.ttl) != self.dynamic.ttl {
            self.lease_ttl = u64::from(d.ttl.max(1));
        }
        self.facts.maximum_lag_on_failover = d.maximum_lag_on_failover;
        self.facts.use_pg_rewind = d.postgresql.use_pg_rewind;
        self.facts.synchronous_mode = d.synchronous_mode;
        if !d.synchronous_mode {
            // As `ha/mod.rs`: nothing maintains synchronous standbys in asynchronous mode.
            self.sync_standby_names.clear();
        }
        self.dynamic = Dynamic {
            ttl: u64::from(d.ttl.max(1)),
            loop_wait: u64::from(d.loop_wait.max(1)),
            retry_timeout: u64::from(d.retry_timeout.max(1)),
            strict: d.synchronous_mode_strict,
        };
    }

    fn data_dir(&self) -> DataDir {
        let w = self.w.borrow();
        let pg = &w.nodes[self.me].pg;
        if !pg.initialized {
            return DataDir::Empty;
        }
        DataDir::Initialized {
            control: ControlData {
                system_identifier: SYSID.into(),
                state: pg.control.clone(),
                timeline: Some(pg.timeline),
                checkpoint_lsn: Some(pg.position()),
                raw: Default::default(),
            },
            standby_signal: pg.standby_signal,
        }
    }

    fn postgres_status(&self) -> Option<PostgresStatus> {
        let w = self.w.borrow();
        let pg = &w.nodes[self.me].pg;
        if pg.run != PgRun::Running {
            return None;
        }
        let pos = pg.position();
        Some(PostgresStatus {
            in_recovery: pg.in_recovery,
            server_version: 150_000,
            timeline: Some(pg.timeline),
            postmaster_start_time: None,
            postmaster_start_epoch: None,
            wal_flush_lsn: (!pg.in_recovery).then_some(pos),
            receive_lsn: pg.in_recovery.then_some(pos),
            replay_lsn: pg.in_recovery.then_some(pos),
            replayed_timestamp: None,
            replay_paused: false,
            streaming: pg.streaming_from.is_some(),
            system_identifier: Some(SYSID.into()),
            replication: if pg.in_recovery {
                vec![]
            } else {
                w.replication_rows(self.me)
            },
            pending_restart: vec![],
            min_recovery: pg.in_recovery.then_some((pg.timeline, pos)),
        })
    }

    fn postgres_view(&self) -> PostgresView {
        let run = self.w.borrow().nodes[self.me].pg.run;
        match run {
            PgRun::Down => PostgresView::Down,
            PgRun::Crashed => PostgresView::Crashed,
            PgRun::Starting { .. } => PostgresView::Starting,
            PgRun::Running => match self.postgres_status() {
                Some(s) => PostgresView::Running(s),
                None => PostgresView::Unresponsive,
            },
        }
    }

    /// `GET /patroni` of every other member, in parallel, 2 s timeout.
    async fn ask_peers(&self, view: &pgwarden::dcs::ClusterView) -> Vec<PeerAnswer> {
        let mut answers = Vec::new();
        let mut slowest = 5 * MS;
        {
            let w = self.w.borrow();
            for m in view.members.iter().filter(|m| m.name != self.name) {
                let Some(p) = w.node_index(&m.name) else {
                    continue;
                };
                let n = &w.nodes[p];
                let answers_api = n.alive && w.linked(self.me, p);
                // The REST API runs beside the HA loop, so a frozen process does not answer.
                let answers_api = answers_api && w.now >= n.frozen_until;
                let status = answers_api.then(|| PeerStatus {
                    name: m.name.clone(),
                    is_primary: n.pg.writable(),
                    wal_position: if n.pg.initialized { n.pg.position() } else { 0 },
                    nofailover: n.tags.nofailover || n.tags.failover_priority == 0,
                    failover_priority: n.tags.failover_priority,
                    watchdog_failed: false,
                    state: if n.pg.run == PgRun::Running {
                        "running".into()
                    } else {
                        "stopped".into()
                    },
                    timeline: (n.pg.run == PgRun::Running).then_some(n.pg.timeline),
                });
                if status.is_none() {
                    slowest = 2 * SEC;
                }
                answers.push(PeerAnswer {
                    name: m.name.clone(),
                    status,
                });
            }
        }
        self.sleep(slowest).await;
        answers
    }

    async fn observe(&mut self) -> Observation {
        let now_local = self.local();
        self.view_leader = None;
        let dcs = match self.dcs(|s, _| crate::world::view_arc(s)).await {
            Ok(view) => {
                self.view_leader = view.leader.as_ref().map(|l| (l.name.clone(), l.lease));
                if let Some(c) = &view.config {
                    let value = c.value.clone();
                    self.apply_dynamic_config(&value);
                }
                DcsView::Known(view)
            }
            Err(e) => DcsView::Unknown(format!("{e:?}")),
        };
        let holds = match &dcs {
            DcsView::Known(view) => view.is_leader(&self.name),
            DcsView::Unknown(_) => self.believes_leader,
        };
        let lease = if holds {
            self.renew().await
        } else {
            self.believes_leader = false;
            self.lease_certain_until = None;
            self.set_fence(None);
            LeaseCheck::NotHeld
        };
        let failed = match &self.task_failed {
            Some((TaskKind::Rewind, _)) => self.task_failed.clone(),
            _ => self.task_failed.take(),
        };
        let task = match (&self.task, failed) {
            (_, Some((kind, reason))) => TaskView::Failed(kind, reason),
            (Some(t), None) => TaskView::Running(t.kind),
            (None, None) => TaskView::Idle,
        };
        let (data_dir, postgres) = if matches!(task, TaskView::Running(_)) {
            (DataDir::Empty, PostgresView::Starting)
        } else {
            (self.data_dir(), self.postgres_view())
        };
        let holds_with_postgres_down = matches!(task, TaskView::Idle)
            && self.believes_leader
            && matches!(
                postgres,
                PostgresView::Down
                    | PostgresView::Crashed
                    | PostgresView::Starting
                    | PostgresView::Unresponsive
            );
        self.primary_down_since =
            holds_with_postgres_down.then(|| self.primary_down_since.unwrap_or(now_local));
        let primary_start_overdue = self.primary_down_since.is_some_and(|since| {
            pgwarden::ha::timing::primary_start_overdue(
                std::time::Duration::from_micros(now_local.saturating_sub(since)),
                std::time::Duration::from_secs(PRIMARY_START_TIMEOUT),
            )
        });
        let peers = match &dcs {
            DcsView::Known(view)
                if (view.leader.is_none()
                    && !self.facts.nofailover
                    && matches!(data_dir, DataDir::Initialized { .. }))
                    || (view.is_leader(&self.name)
                        && (view.failover.is_some() || primary_start_overdue)) =>
            {
                let view = view.clone();
                Some(self.ask_peers(&view).await)
            }
            _ => None,
        };
        if let DcsView::Known(view) = &dcs {
            self.unclaimed_bootstrap_since =
                pgwarden::ha::decide::unfinished_bootstrap_claim_without_leader(view)
                    .then(|| self.unclaimed_bootstrap_since.unwrap_or(now_local));
        }
        let bootstrap_claim_abandoned = self.unclaimed_bootstrap_since.is_some_and(|since| {
            pgwarden::ha::timing::bootstrap_claim_abandoned(
                std::time::Duration::from_micros(now_local.saturating_sub(since)),
                std::time::Duration::from_secs(self.dynamic.ttl),
                std::time::Duration::from_secs(self.dynamic.loop_wait),
            )
        });
        let w = self.w.borrow();
        Observation {
            now: w.instant(now_local),
            wall_now: w.wall(now_local),
            dcs,
            lease,
            data_dir,
            postgres,
            task,
            peers,
            following: self.following.clone(),
            checkpoint_after_promote_pending: self.checkpoint_after_promote_pending,
            bootstrap_claim_abandoned,
            primary_start_overdue,
            // The simulated postgres has no hot-standby parameters to outgrow.
            replay_paused_for_parameters: false,
        }
    }

    /// The agent's whole life: cycles until the process is killed (the future dropped).
    pub async fn run(mut self) {
        loop {
            let started = self.local();
            let next = match self.cycle().await {
                Ok(next) => next,
                Err(reason) => {
                    let me = self.me;
                    let mut w = self.w.borrow_mut();
                    w.events.push(Event::Fatal { node: me, reason });
                    w.nodes[me].alive = false;
                    return;
                }
            };
            let now_local = self.local();
            let due_local = match next {
                Next::Now => started.max(now_local) + 50 * MS,
                Next::Wait => (started + self.dynamic.loop_wait * SEC).max(now_local),
            };
            let due = {
                let w = self.w.borrow();
                w.nodes[self.me].clock.global(due_local)
            };
            let wake = match &self.task {
                Some(t) => due.min(t.done_at),
                None => due,
            };
            self.idle_until(wake).await;
            if self.task.as_ref().is_some_and(|t| self.now() >= t.done_at) {
                if let Some(t) = self.task.take() {
                    if let Err(e) = self.finish_task(&t) {
                        self.log(|| format!("{} failed: {e}", t.kind));
                        self.task_failed = Some((t.kind, e));
                    }
                }
            }
        }
    }

    async fn cycle(&mut self) -> Result<Next, String> {
        let obs = self.observe().await;
        let decision = decide(&obs, &self.facts);
        {
            let (outcome, actions) = (decision.outcome.to_string(), decision.actions.clone());
            self.log(|| format!("{outcome} {actions:?}"));
        }
        let next = self
            .execute(&obs, &decision.outcome, decision.actions)
            .await?;
        self.touch_member(&obs).await;
        Ok(next)
    }

    async fn execute(
        &mut self,
        obs: &Observation,
        outcome: &Outcome,
        actions: Vec<Action>,
    ) -> Result<Next, String> {
        let mut done = Vec::new();
        for action in actions {
            match self.execute_one(obs, outcome, &action).await {
                Ok(true) => done.push(action),
                Ok(false) => {
                    self.compensate(obs, outcome, &done).await;
                    return Ok(Next::Now);
                }
                Err(ActionError::Fatal(r)) => return Err(r),
                Err(ActionError::Failed(r)) if action.is_housekeeping() => {
                    self.log(|| format!("housekeeping {action:?} failed: {r}"));
                }
                Err(ActionError::Failed(r)) => {
                    self.log(|| format!("{action:?} failed: {r}"));
                    self.compensate(obs, outcome, &done).await;
                    return Ok(Next::Wait);
                }
            }
        }
        Ok(Next::Wait)
    }

    async fn compensate(&mut self, obs: &Observation, outcome: &Outcome, done: &[Action]) {
        for action in pgwarden::ha::decide::compensation(done) {
            let _ = Box::pin(self.execute_one(obs, outcome, &action)).await;
        }
    }

    fn leader_index(&self, obs: &Observation, leader: &str) -> Result<usize, ActionError> {
        let DcsView::Known(view) = &obs.dcs else {
            return Err(ActionError::Failed("the DCS view is unknown".into()));
        };
        view.member(leader)
            .filter(|m| m.record.host_port().is_some())
            .and_then(|_| self.w.borrow().node_index(leader))
            .ok_or_else(|| ActionError::Failed(format!("no address for the leader {leader}")))
    }

    fn start_task(&mut self, kind: TaskKind, leader: Option<usize>, lo: Us, hi: Us) {
        let done_at = {
            let mut w = self.w.borrow_mut();
            let d = w.between(lo, hi);
            w.now + d
        };
        let snapshot = (kind == TaskKind::Rewind)
            .then(|| leader.map(|l| self.w.borrow().nodes[l].pg.clone()))
            .flatten();
        self.task = Some(Task {
            kind,
            done_at,
            leader,
            snapshot,
        });
    }

    /// A background task's effect, when it ends.
    fn finish_task(&mut self, t: &Task) -> Result<(), String> {
        let me = self.me;
        let mut w = self.w.borrow_mut();
        match t.kind {
            TaskKind::Bootstrap => {
                let ready = w.now + 200 * MS;
                let pg = &mut w.nodes[me].pg;
                pg.initialized = true;
                pg.wal = vec![0];
                pg.timeline = 1;
                pg.standby_signal = false;
                pg.sync_names = self.sync_standby_names.clone();
                pg.run = PgRun::Starting { ready_at: ready };
                Ok(())
            }
            TaskKind::CreateReplica | TaskKind::Rewind => {
                let Some(src) = t.leader else {
                    return Err("no source".into());
                };
                let reachable = w.nodes[src].pg.run == PgRun::Running && w.linked(me, src);
                if !reachable && t.snapshot.is_none() {
                    return Err(format!(
                        "could not connect to {}",
                        w.nodes[src].name.clone()
                    ));
                }
                let source = t
                    .snapshot
                    .clone()
                    .unwrap_or_else(|| w.nodes[src].pg.clone());
                let pg = &mut w.nodes[me].pg;
                // pg_rewind against a source whose WAL this data directory already contains
                // (same history, source behind): "no rewind required", our WAL stays.
                let contained = pg.initialized
                    && source.wal.len() <= pg.wal.len()
                    && pg.wal[..source.wal.len()] == source.wal[..];
                if t.kind == TaskKind::Rewind && contained {
                    pg.standby_signal = true;
                    pg.control = ClusterState::ShutDownInRecovery;
                    pg.upstream = Some(src);
                    return Ok(());
                }
                pg.initialized = true;
                pg.wal = source.wal;
                pg.timeline = source.timeline;
                pg.tl_history = source.tl_history;
                pg.standby_signal = true;
                pg.control = ClusterState::ShutDownInRecovery;
                pg.upstream = Some(src);
                Ok(())
            }
        }
    }

    fn stop_postgres(&self, mode: StopMode) {
        let me = self.me;
        let mut w = self.w.borrow_mut();
        let clean = !matches!(mode, StopMode::Immediate);
        if clean && w.nodes[me].pg.writable() {
            w.flush_to_standbys(me);
        }
        w.nodes[me].pg.stop(clean);
        let name = self.name.clone();
        w.log(|| format!("{name}: postgres stopped ({mode:?})"));
    }

    async fn execute_one(
        &mut self,
        obs: &Observation,
        outcome: &Outcome,
        action: &Action,
    ) -> Result<bool, ActionError> {
        match action {
            Action::RaceInitialize(value) => {
                let v = value.clone();
                Ok(self
                    .dcs(move |s, _| {
                        if s.initialize.is_some() {
                            return false;
                        }
                        s.initialize = Some(v);
                        s.changed = true;
                        true
                    })
                    .await?)
            }
            Action::SetInitialize(sysid) => {
                let v = sysid.clone();
                self.dcs(move |s, _| s.initialize = Some(v)).await?;
                Ok(true)
            }
            Action::CancelInitialize => {
                let _ = self.dcs(|s, _| s.initialize = None).await;
                Ok(true)
            }
            Action::SeedConfig => {
                let value = self.w.borrow().initial.config_json();
                self.dcs(move |s, _| {
                    if s.config.is_none() {
                        s.put_config(value);
                    }
                })
                .await?;
                Ok(true)
            }
            Action::AcquireLeader => {
                let lease = self.ensure_lease().await?;
                let name = self.name.clone();
                let won = self
                    .dcs(move |s, _| {
                        if s.leader.is_some() || !s.leases.contains_key(&lease) {
                            return false;
                        }
                        s.put_leader(&name, lease);
                        true
                    })
                    .await?;
                if !won {
                    return Ok(false);
                }
                self.log(|| "acquired the leader lock".into());
                match self.renew().await {
                    LeaseCheck::Renewed(_) => Ok(true),
                    _ => Err(ActionError::Failed(
                        "could not confirm the freshly acquired lease".into(),
                    )),
                }
            }
            Action::ReleaseLeader => {
                let running = self.w.borrow().nodes[self.me].pg.is_up();
                if !running {
                    let optime = self.w.borrow().nodes[self.me].pg.position();
                    let _ = self
                        .dcs(move |s, _| {
                            s.put_status(LeaderStatus {
                                optime,
                                ..Default::default()
                            })
                        })
                        .await;
                }
                let name = self.name.clone();
                self.dcs(move |s, _| {
                    if s.leader.as_ref().is_some_and(|l| l.name == name) {
                        s.leader = None;
                        s.changed = true;
                        s.rev += 1;
                    }
                })
                .await?;
                self.believes_leader = false;
                self.lease_certain_until = None;
                self.set_fence(None);
                self.log(|| "released the leader lock".into());
                Ok(true)
            }
            Action::StartBootstrap => {
                self.start_task(TaskKind::Bootstrap, None, SEC, 3 * SEC);
                Ok(true)
            }
            Action::StartCreateReplica { leader } => {
                let src = self.leader_index(obs, leader)?;
                self.following = Some(leader.clone());
                self.start_task(TaskKind::CreateReplica, Some(src), SEC, 4 * SEC);
                Ok(true)
            }
            Action::StartRewind { leader } => {
                let src = self.leader_index(obs, leader)?;
                let reachable = {
                    let w = self.w.borrow();
                    // As `ha/mod.rs`: the leader answers a query and runs as a primary.
                    w.linked(self.me, src) && w.nodes[src].pg.writable()
                };
                if !reachable {
                    self.sleep(2 * SEC).await;
                    return Err(ActionError::Failed(format!(
                        "the leader {leader} is not reachable for pg_rewind"
                    )));
                }
                self.following = Some(leader.clone());
                self.start_task(TaskKind::Rewind, Some(src), 500 * MS, 3 * SEC);
                Ok(true)
            }
            Action::StartPostgres { primary, upstream } => {
                let up = match upstream {
                    Some(l) => Some(self.leader_index(obs, l)?),
                    None => None,
                };
                self.following = upstream.clone();
                if *primary {
                    self.check_lease_for_writes()?;
                    let automatic = !matches!(outcome, Outcome::TakingOverAsCandidate);
                    self.w.borrow_mut().events.push(Event::OpensForWrites {
                        node: self.me,
                        automatic,
                        outcome: outcome.to_string(),
                    });
                }
                if !*primary {
                    self.forget_sync_choice();
                }
                let names = self.primary_sync_names(!*primary);
                let me = self.me;
                let mut w = self.w.borrow_mut();
                let delay = w.between(300 * MS, 2 * SEC);
                let ready_at = w.now + delay;
                let pg = &mut w.nodes[me].pg;
                pg.standby_signal = !*primary;
                pg.upstream = up;
                pg.sync_names = names;
                pg.run = PgRun::Starting { ready_at };
                Ok(true)
            }
            Action::ApplyConfig { upstream } => {
                let up = match upstream {
                    Some(l) => Some(self.leader_index(obs, l)?),
                    None => None,
                };
                if upstream.is_some() {
                    self.forget_sync_choice();
                }
                let names = self.primary_sync_names(upstream.is_some());
                let me = self.me;
                {
                    let mut w = self.w.borrow_mut();
                    let pg = &mut w.nodes[me].pg;
                    pg.upstream = up;
                    pg.standby_signal = upstream.is_some();
                    pg.sync_names = names;
                }
                self.following = upstream.clone();
                Ok(true)
            }
            Action::SyncSlots => Ok(true),
            Action::ClaimSync => {
                let DcsView::Known(view) = &obs.dcs else {
                    return Err(ActionError::Failed("the DCS view is unknown".into()));
                };
                let current = view.sync.as_ref();
                if current.is_some_and(|s| {
                    s.value.leader.as_deref() == Some(&self.name)
                        && sync::acknowledges_only_through_recorded(
                            &self.sync_standby_names,
                            &s.value,
                        )
                }) {
                    return Ok(true);
                }
                let claim = SyncState {
                    leader: Some(self.name.clone()),
                    sync_standby: None,
                    quorum: 0,
                };
                let revision = current.map(|s| s.revision).unwrap_or(0);
                if !self
                    .dcs(move |s, _| s.put_sync(Some(claim), Some(revision)))
                    .await?
                {
                    return Err(ActionError::Failed("the `sync` key changed".into()));
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
            Action::Promote => {
                self.check_lease_for_writes()?;
                let automatic = !matches!(outcome, Outcome::TakingOverAsCandidate);
                let me = self.me;
                let mut w = self.w.borrow_mut();
                if w.nodes[me].pg.run != PgRun::Running || !w.nodes[me].pg.in_recovery {
                    return Err(ActionError::Failed("pg_promote failed".into()));
                }
                w.events.push(Event::OpensForWrites {
                    node: me,
                    automatic,
                    outcome: outcome.to_string(),
                });
                let d = w.between(100 * MS, SEC);
                w.nodes[me].pg.promote_at = Some(w.now + d);
                drop(w);
                self.checkpoint_after_promote_pending = true;
                Ok(true)
            }
            Action::StopPostgres(mode) => {
                let latency = match mode {
                    StopMode::Immediate => 10 * MS,
                    _ => {
                        let mut w = self.w.borrow_mut();
                        w.between(100 * MS, SEC)
                    }
                };
                self.sleep(latency).await;
                self.stop_postgres(*mode);
                Ok(true)
            }
            Action::WriteStatus => {
                if let PostgresView::Running(status) = &obs.postgres {
                    if let Some(optime) = status.wal_flush_lsn {
                        let status = LeaderStatus {
                            optime,
                            ..Default::default()
                        };
                        let unchanged = matches!(&obs.dcs, DcsView::Known(v) if v.status.as_ref() == Some(&status));
                        if !unchanged {
                            self.dcs(move |s, _| s.put_status(status)).await?;
                        }
                    }
                }
                Ok(true)
            }
            Action::WriteHistory => {
                let (DcsView::Known(view), PostgresView::Running(_)) = (&obs.dcs, &obs.postgres)
                else {
                    return Ok(true);
                };
                let text: String = self.w.borrow().nodes[self.me]
                    .pg
                    .tl_history
                    .iter()
                    .map(|(tl, lsn)| {
                        format!(
                            "{tl}\t{:X}/{:X}\tno recovery target specified\n",
                            lsn >> 32,
                            lsn & 0xffff_ffff
                        )
                    })
                    .collect();
                let stamp = {
                    let w = self.w.borrow();
                    w.wall(self.local()).to_rfc3339()
                };
                let history = pgwarden::ha::merge_history(&view.history, &text, &stamp, &self.name);
                self.dcs(move |s, _| s.put_history(history)).await?;
                Ok(true)
            }
            Action::Checkpoint => {
                self.sleep(50 * MS).await;
                let writable = self.w.borrow().nodes[self.me].pg.writable();
                if !self.w.borrow().nodes[self.me].pg.is_up() {
                    return Err(ActionError::Failed("CHECKPOINT failed".into()));
                }
                if self.checkpoint_after_promote_pending && writable {
                    self.checkpoint_after_promote_pending = false;
                }
                Ok(true)
            }
            Action::ClearFailover => {
                let expected = match &obs.dcs {
                    DcsView::Known(view) => view.failover.as_ref().map(|f| f.revision),
                    DcsView::Unknown(_) => None,
                };
                if expected.is_some() {
                    self.dcs(move |s, _| s.put_failover(FailoverRequest::default(), expected))
                        .await?;
                }
                Ok(true)
            }
            Action::Fatal(reason) => Err(ActionError::Fatal(reason.clone())),
        }
    }

    /// As `ha/mod.rs`: a standby forgets the synchronous standbys it chose as a leader.
    fn forget_sync_choice(&mut self) {
        self.sync_standby_names = if self.facts.synchronous_mode && self.dynamic.strict {
            "*".into()
        } else {
            String::new()
        };
    }

    /// `synchronous_standby_names` for the files of a primary (`standby` false) or a standby.
    fn primary_sync_names(&self, standby: bool) -> String {
        let sync_on = self.facts.synchronous_mode;
        if standby && sync_on && self.dynamic.strict {
            "*".into()
        } else if !standby && (sync_on || !self.sync_standby_names.is_empty()) {
            self.sync_standby_names.clone()
        } else {
            String::new()
        }
    }

    /// `HaLoop::manage_sync`.
    async fn manage_sync(
        &mut self,
        view: &pgwarden::dcs::ClusterView,
        status: &PostgresStatus,
    ) -> Result<(), ActionError> {
        let mode = sync::SyncMode {
            enabled: self.facts.synchronous_mode,
            strict: self.dynamic.strict,
        };
        let nosync: BTreeSet<String> = BTreeSet::new();
        let plan = sync::plan(mode, &self.name, view, &status.replication, &nosync);
        let revision = view.sync.as_ref().map(|s| s.revision);
        if plan.delete_key {
            self.dcs(move |s, _| s.put_sync(None, revision)).await?;
        }
        let mut revision = revision.unwrap_or(0);
        if let Some(state) = &plan.key_before {
            let st = state.clone();
            if !self
                .dcs(move |s, _| s.put_sync(Some(st), Some(revision)))
                .await?
            {
                return Err(ActionError::Failed(
                    "the `sync` key changed under us".into(),
                ));
            }
            revision = -1;
        }
        if plan.standby_names != self.sync_standby_names {
            self.sync_standby_names = plan.standby_names.clone();
            let names = self.primary_sync_names(false);
            let me = self.me;
            self.w.borrow_mut().nodes[me].pg.sync_names = names;
        }
        if let (Some(state), true) = (&plan.key_after, revision >= 0) {
            let st: SyncState = state.clone();
            self.dcs(move |s, _| s.put_sync(Some(st), Some(revision)))
                .await?;
        }
        Ok(())
    }

    fn member_record(&self, obs: &Observation) -> MemberRecord {
        let status = self.postgres_status();
        let w = self.w.borrow();
        let node = &w.nodes[self.me];
        let role = match (&status, &obs.data_dir) {
            (Some(pg), _) if !pg.in_recovery => "primary",
            (Some(_), _) => "replica",
            (None, DataDir::Empty) => "uninitialized",
            (None, _) if self.believes_leader => "primary",
            (None, _) => "demoted",
        };
        let mut tags = serde_json::Map::new();
        if node.tags.nofailover {
            tags.insert("nofailover".into(), true.into());
        }
        if node.tags.failover_priority != 1 {
            tags.insert(
                "failover_priority".into(),
                node.tags.failover_priority.into(),
            );
        }
        MemberRecord {
            conn_url: conn_url(self.me),
            api_url: api_url(self.me),
            // As the agent's `pg_state`: a bootstrap in progress says so, which keeps its
            // `initialize` claim from being judged abandoned before the lock is taken.
            state: if self
                .task
                .as_ref()
                .is_some_and(|t| t.kind == TaskKind::Bootstrap)
            {
                "initializing new cluster"
            } else if status.is_some() {
                "running"
            } else {
                "stopped"
            }
            .into(),
            role: role.into(),
            version: pgwarden::dcs::PATRONI_API_VERSION.into(),
            xlog_location: status.as_ref().and_then(|p| p.wal_position()),
            timeline: status.as_ref().and_then(|p| p.timeline),
            tags,
            checkpoint_after_promote: self.checkpoint_after_promote_pending.then_some(false),
            ..Default::default()
        }
    }

    /// `EtcdDcs::touch_member` after every cycle with a known view.
    async fn touch_member(&mut self, obs: &Observation) {
        if matches!(obs.dcs, DcsView::Unknown(_)) {
            return;
        }
        let Ok(mut lease) = self.ensure_lease().await else {
            return;
        };
        let fresh = self
            .last_keepalive
            .is_some_and(|at| self.local().saturating_sub(at) < SEC);
        if !fresh {
            let sent = self.local();
            match self.dcs(move |s, now| s.keepalive(lease, now)).await {
                Ok(Some(_)) => self.last_keepalive = Some(sent),
                Ok(None) => {
                    self.lease = None;
                    self.last_member = None;
                    match self.ensure_lease().await {
                        Ok(l) => lease = l,
                        Err(_) => return,
                    }
                }
                Err(_) => return,
            }
        }
        let record = self.member_record(obs);
        if self.last_member.as_ref() == Some(&(record.clone(), lease)) {
            return;
        }
        let name = self.name.clone();
        let r = record.clone();
        if self
            .dcs(move |s, _| {
                if s.leases.contains_key(&lease) {
                    s.put_member(&name, r, lease);
                }
            })
            .await
            .is_ok()
        {
            self.last_member = Some((record, lease));
        }
    }
}
