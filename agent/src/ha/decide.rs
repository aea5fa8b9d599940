//! The HA decision: a pure function from an [`Observation`] to a [`Decision`].
//!
//! It follows the order of Patroni's `_run_cycle` (`patroni/ha.py`): long action in progress →
//! data directory checks → DCS reachable? → our own lock → someone else's lock → no lock (race).
//! The caller performs the actions in order and stops at the first one that fails or loses a
//! race, then runs a new cycle at once.

use std::fmt;

use crate::dcs::ClusterView;
use crate::postgres::supervisor::StopMode;

use super::observe::{
    DataDir, DcsView, LeaseCheck, Observation, PeerAnswer, PostgresView, TaskKind, TaskView,
};

/// The member's settings the decision depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFacts {
    pub name: String,
    /// Tagged `nofailover` (or `failover_priority: 0`): never takes the leader key.
    pub nofailover: bool,
    /// `failover_priority` tag (default 1): among equally advanced replicas the higher wins.
    pub failover_priority: i64,
    /// Bytes a replica may lag behind `status.optime` and still race.
    pub maximum_lag_on_failover: u64,
    /// Rewind a former primary before it follows a new leader.
    pub use_pg_rewind: bool,
    /// `synchronous_mode` is on: only members listed in `sync` may race.
    pub synchronous_mode: bool,
}

impl MemberFacts {
    /// Defaults for a member named `name`.
    pub fn named(name: &str) -> Self {
        MemberFacts {
            name: name.to_owned(),
            nofailover: false,
            failover_priority: 1,
            maximum_lag_on_failover: 1_048_576,
            use_pg_rewind: true,
            synchronous_mode: false,
        }
    }
}

/// One step for the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create `initialize` with this value if absent; losing stops the plan.
    RaceInitialize(String),
    /// Overwrite `initialize` with the system identifier.
    SetInitialize(String),
    /// Delete `initialize` after a failed bootstrap.
    CancelInitialize,
    /// Write `config` from `bootstrap.dcs` if it is absent.
    SeedConfig,
    /// Create `leader` if absent, then confirm the lease and arm the fence; losing stops the plan.
    AcquireLeader,
    /// Delete `leader` if it still names us.
    ReleaseLeader,
    /// Run initdb and the first start in the background.
    StartBootstrap,
    /// Clone the named leader with pg_basebackup in the background, then start as its replica.
    StartCreateReplica { leader: String },
    /// Rewind the former primary against the named leader in the background.
    StartRewind { leader: String },
    /// Start postgres as a primary, or as a standby following `upstream` (`None`: read-only
    /// with no upstream).
    StartPostgres {
        primary: bool,
        upstream: Option<String>,
    },
    /// Render the configuration for the running postgres (a primary when `upstream` is `None`,
    /// else a standby of that member) and reload if anything changed: follows a new leader
    /// without a restart and applies changed parameters.
    ApplyConfig { upstream: Option<String> },
    /// `pg_promote()`.
    Promote,
    /// Stop postgres (demotion: it must not accept writes).
    StopPostgres(StopMode),
    /// Publish our WAL position in `status`.
    WriteStatus,
    /// Append the timeline switches from postgres' history file to `history`.
    WriteHistory,
    /// `CHECKPOINT` on the primary before a graceful stop, so the shutdown checkpoint is short.
    Checkpoint,
    /// Clear the `failover` key (write `{}`, compare-and-set on the revision read).
    ClearFailover,
    /// Keep a physical replication slot for every other member, drop slots of departed ones.
    SyncSlots,
    /// Maintain `synchronous_standby_names` and the `sync` key (see `ha::sync`).
    ManageSync,
    /// Synchronous mode, before postgres opens for writes: record `sync` as
    /// `{leader: me, sync_standby: null}` (compare-and-set) unless it already names us. Until
    /// then the previous leader and its standbys stay eligible in `sync`, although they may
    /// lack the writes our standbys acknowledge once we are primary.
    ClaimSync,
    /// Stop the agent with an error; nothing is touched.
    Fatal(String),
}

impl Action {
    /// Bookkeeping that must not stop the rest of the plan when it fails (it is retried next
    /// cycle); everything else is a step the following actions depend on.
    pub fn is_housekeeping(&self) -> bool {
        matches!(
            self,
            Action::WriteStatus
                | Action::WriteHistory
                | Action::SyncSlots
                | Action::ManageSync
                | Action::ApplyConfig { .. }
                | Action::SeedConfig
                | Action::SetInitialize(_)
                | Action::ClearFailover
        )
    }
}

/// What to undo when a plan stops early (an action failed or lost a race) after `done` were
/// carried out. A won bootstrap race whose lock or bootstrap did not follow is withdrawn, as
/// Patroni's `cancel_initialization`: otherwise `initialize` stays claimed by a member that
/// never bootstraps and every member waits forever (simulation seed 100, 3 members).
pub fn compensation(done: &[Action]) -> Vec<Action> {
    let won_bootstrap_race = done
        .iter()
        .any(|a| matches!(a, Action::RaceInitialize(v) if v.is_empty()));
    let bootstrapping = done.iter().any(|a| matches!(a, Action::StartBootstrap));
    if won_bootstrap_race && !bootstrapping {
        vec![Action::CancelInitialize]
    } else {
        vec![]
    }
}

/// Why a member did not race for a free lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotEligible {
    NoFailoverTag,
    PostgresNotReady,
    Lagging {
        lag: u64,
        maximum: u64,
    },
    PrimaryStillAlive(String),
    PeerAhead(String),
    PeerHigherPriority(String),
    FormerLeaderInSwitchover,
    NotSynchronous,
    Paused,
    /// Postgres exited soon after each of the last starts: the lock is not taken until the
    /// next start is due (`HaLoop::hold_back_failing_starts`).
    StartsFailing(String),
}

impl fmt::Display for NotEligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotEligible::NoFailoverTag => write!(f, "tagged nofailover"),
            NotEligible::PostgresNotReady => write!(f, "postgres is not running"),
            NotEligible::Lagging { lag, maximum } => write!(
                f,
                "lagging {lag} bytes behind the last known leader position (maximum_lag_on_failover {maximum})"
            ),
            NotEligible::PrimaryStillAlive(n) => write!(f, "primary {n} is still alive"),
            NotEligible::PeerAhead(n) => write!(f, "{n} has a higher WAL position"),
            NotEligible::Paused => write!(f, "the cluster is paused (maintenance mode)"),
            NotEligible::StartsFailing(why) => write!(f, "{why}"),
            NotEligible::NotSynchronous => {
                write!(f, "synchronous mode is on and this member is not a synchronous standby")
            }
            NotEligible::FormerLeaderInSwitchover => {
                write!(f, "this member handed over the lock in a switchover")
            }
            NotEligible::PeerHigherPriority(n) => {
                write!(f, "{n} is as advanced and has a higher failover_priority")
            }
        }
    }
}

/// What the cycle concluded, one sentence in the log (Patroni's `_run_cycle` return value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    TaskInProgress(TaskKind),
    TaskFailed(TaskKind, String),
    Refused(String),
    DcsUnknownHolding { reason: String },
    DcsUnknownWaiting { reason: String },
    TryingToBootstrap,
    WaitingForBootstrap,
    WithdrawingAbandonedBootstrapClaim,
    CloningLeader { leader: String },
    WaitingForLeaderAddress { leader: String },
    LeaderHealthy,
    LeaderPromoting,
    LeaderStartingPostgres { after_crash: bool },
    LeaderWaitingForPostgres,
    LeaderStartingReadOnly,
    LeaderStartFailed(String),
    PrimaryStartTimedOut,
    LeaseUnconfirmed,
    LostLock,
    DemotingForOtherLeader { leader: String },
    RewindingToFollow { leader: String },
    WaitingForLeaderCheckpoint { leader: String },
    DivergedFromLeader { leader: String },
    RestartingForPrimarySettings { leader: String },
    StartingAsReplica { leader: String },
    FollowingLeader { leader: String },
    NoLeaderRacing,
    NoLeaderStartingReadOnly,
    SwitchoverDemoting { candidate: Option<String> },
    SwitchoverScheduled { at: String },
    SwitchoverAborted(String),
    DeferringToCandidate { candidate: String },
    TakingOverAsCandidate,
    PausedNoAction(String),
    NoLeaderNotEligible(NotEligible),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::TaskInProgress(k) => write!(f, "{k} in progress"),
            Outcome::TaskFailed(k, r) => write!(f, "{k} failed: {r}"),
            Outcome::Refused(r) => write!(f, "refusing to run: {r}"),
            Outcome::DcsUnknownHolding { reason } => write!(
                f,
                "DCS is not accessible ({reason}); continuing as primary until the fence deadline"
            ),
            Outcome::DcsUnknownWaiting { reason } => {
                write!(f, "DCS is not accessible ({reason}); waiting")
            }
            Outcome::TryingToBootstrap => write!(f, "trying to bootstrap a new cluster"),
            Outcome::WaitingForBootstrap => {
                write!(f, "waiting for the leader to bootstrap the cluster")
            }
            Outcome::WithdrawingAbandonedBootstrapClaim => write!(
                f,
                "`initialize` was claimed for a bootstrap but nobody has held the leader key since; withdrawing the claim"
            ),
            Outcome::CloningLeader { leader } => {
                write!(f, "creating a replica from the leader {leader}")
            }
            Outcome::WaitingForLeaderAddress { leader } => {
                write!(f, "waiting for the leader {leader} to publish its address")
            }
            Outcome::LeaderHealthy => write!(f, "no action: I am the leader with the lock"),
            Outcome::LeaderPromoting => write!(f, "promoting self: I hold the lock"),
            Outcome::LeaderStartingPostgres { after_crash: true } => {
                write!(
                    f,
                    "postgres crashed; restarting it as primary, keeping the lock"
                )
            }
            Outcome::LeaderStartingPostgres { after_crash: false } => {
                write!(f, "starting postgres as primary: I hold the lock")
            }
            Outcome::LeaderStartingReadOnly => write!(
                f,
                "holding the lock with a standby's data; starting postgres read-only to promote it"
            ),
            Outcome::LeaderWaitingForPostgres => {
                write!(f, "holding the lock while postgres starts")
            }
            Outcome::LeaderStartFailed(r) => {
                write!(f, "postgres failed to start ({r}); releasing the lock")
            }
            Outcome::PrimaryStartTimedOut => write!(
                f,
                "postgres is not running as primary within primary_start_timeout and a healthy replica can take over; releasing the lock"
            ),
            Outcome::LeaseUnconfirmed => write!(
                f,
                "lease renewal not confirmed; postgres is fenced if it stays unconfirmed"
            ),
            Outcome::LostLock => write!(f, "the leader lock is no longer mine; demoting"),
            Outcome::DemotingForOtherLeader { leader } => {
                write!(f, "{leader} holds the leader lock; demoting self")
            }
            Outcome::RewindingToFollow { leader } => {
                write!(f, "former primary: rewinding before following {leader}")
            }
            Outcome::WaitingForLeaderCheckpoint { leader } => write!(
                f,
                "waiting for {leader} to run as a primary and checkpoint after its promotion before pg_rewind"
            ),
            Outcome::DivergedFromLeader { leader } => write!(
                f,
                "this standby's timeline was abandoned before its position; stopping to rewind against {leader}"
            ),
            Outcome::RestartingForPrimarySettings { leader } => write!(
                f,
                "WAL replay paused: {leader} runs with higher hot-standby settings; restarting with them"
            ),
            Outcome::StartingAsReplica { leader } => {
                write!(f, "starting as a replica of {leader}")
            }
            Outcome::FollowingLeader { leader } => {
                write!(f, "no action: I am a replica following {leader}")
            }
            Outcome::NoLeaderRacing => write!(f, "no leader; racing for the lock"),
            Outcome::NoLeaderStartingReadOnly => {
                write!(f, "no leader; starting postgres read-only before racing")
            }
            Outcome::SwitchoverDemoting { candidate: Some(c) } => {
                write!(f, "manual switchover to {c}: demoting myself")
            }
            Outcome::SwitchoverDemoting { candidate: None } => {
                write!(f, "manual switchover: demoting myself")
            }
            Outcome::SwitchoverScheduled { at } => {
                write!(f, "no action: a switchover is scheduled at {at}")
            }
            Outcome::SwitchoverAborted(why) => write!(f, "switchover cancelled: {why}"),
            Outcome::DeferringToCandidate { candidate } => {
                write!(
                    f,
                    "no leader; deferring to the switchover candidate {candidate}"
                )
            }
            Outcome::PausedNoAction(what) => write!(f, "paused: {what}; no action"),
            Outcome::TakingOverAsCandidate => {
                write!(f, "no leader; taking over as the switchover candidate")
            }
            Outcome::NoLeaderNotEligible(why) => {
                write!(f, "no leader, and this member may not take it: {why}")
            }
        }
    }
}

/// The plan of one cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub actions: Vec<Action>,
}

impl Decision {
    pub(super) fn new(outcome: Outcome, actions: Vec<Action>) -> Self {
        Decision { outcome, actions }
    }
}

/// A system identifier as Patroni validates it in `initialize`.
fn is_sysid(s: &str) -> bool {
    s.len() >= 10 && s.bytes().all(|b| b.is_ascii_digit())
}

/// The member states of a bootstrap in progress (Patroni's names).
pub const BOOTSTRAPPING_STATES: [&str; 2] = [
    "initializing new cluster",
    "running custom bootstrap script",
];

/// `initialize` claims a bootstrap that has not finished (no system identifier yet), no member
/// holds `leader` and no member says it is bootstrapping: the loop times how long this lasts
/// (`Observation::bootstrap_claim_abandoned`). The leader lock is taken only after the bootstrap
/// (as Patroni does), so a slow initdb or restore must not count as abandoned while its member
/// keeps a record saying so: that record vanishes with the member's lease when it dies, and
/// only then may another member withdraw the claim and bootstrap (never two at once).
pub fn unfinished_bootstrap_claim_without_leader(view: &ClusterView) -> bool {
    view.leader.is_none()
        && view.initialize.as_deref().is_some_and(|i| !is_sysid(i))
        && !view
            .members
            .iter()
            .any(|m| BOOTSTRAPPING_STATES.contains(&m.record.state.as_str()))
}

/// Decides what to do this cycle.
pub fn decide(obs: &Observation, me: &MemberFacts) -> Decision {
    let mut decision = decide_inner(obs, me);
    if me.synchronous_mode {
        // A new primary claims `sync` first (simulation seed 641023133062, 3 members: a
        // promoted leader acknowledged writes through an unrecorded standby, died, and the old
        // leader, still named in `sync`, took over without them).
        let opens = decision.actions.iter().position(|a| {
            matches!(
                a,
                Action::Promote | Action::StartPostgres { primary: true, .. }
            )
        });
        if let Some(i) = opens {
            decision.actions.insert(i, Action::ClaimSync);
        }
    }
    decision
}

fn decide_inner(obs: &Observation, me: &MemberFacts) -> Decision {
    match &obs.task {
        TaskView::Running(kind) => return Decision::new(Outcome::TaskInProgress(*kind), vec![]),
        TaskView::Failed(TaskKind::Bootstrap, reason) => {
            return Decision::new(
                Outcome::TaskFailed(TaskKind::Bootstrap, reason.clone()),
                vec![
                    Action::CancelInitialize,
                    Action::ReleaseLeader,
                    Action::Fatal(format!("bootstrap failed: {reason}")),
                ],
            )
        }
        // Replica creation and rewind are retried on the next cycle; the failure is logged.
        TaskView::Failed(kind, reason) => {
            return Decision::new(Outcome::TaskFailed(*kind, reason.clone()), vec![])
        }
        TaskView::Idle => {}
    }

    if let DataDir::Unusable(reason) = &obs.data_dir {
        return Decision::new(
            Outcome::Refused(reason.clone()),
            vec![Action::Fatal(reason.clone())],
        );
    }

    let view = match &obs.dcs {
        DcsView::Known(view) => view,
        DcsView::Unknown(reason) => {
            // The fence in the supervisor stops a primary whose lease is no longer certain;
            // until then a short DCS outage does not cost availability.
            let outcome = if obs.postgres.is_writable_primary() {
                Outcome::DcsUnknownHolding {
                    reason: reason.clone(),
                }
            } else {
                Outcome::DcsUnknownWaiting {
                    reason: reason.clone(),
                }
            };
            return Decision::new(outcome, vec![]);
        }
    };

    // Data that belongs to another cluster is refused and left untouched.
    if let (Some(ours), Some(cluster)) = (obs.data_dir.system_identifier(), &view.initialize) {
        if is_sysid(cluster) && cluster != ours {
            let reason = format!(
                "the data directory belongs to another cluster: its system identifier is {ours}, \
                 but this cluster's `initialize` key says {cluster}"
            );
            return Decision::new(
                Outcome::Refused(reason.clone()),
                vec![Action::Fatal(reason)],
            );
        }
    }

    let leader = view.leader_name();
    match (&obs.data_dir, leader) {
        (DataDir::Empty, None) if view.initialize.is_none() => {
            if me.nofailover {
                Decision::new(Outcome::WaitingForBootstrap, vec![])
            } else {
                Decision::new(
                    Outcome::TryingToBootstrap,
                    // The leader lock follows the bootstrap (Patroni's `post_bootstrap`):
                    // `/primary` and the lock never name a member whose postgres does not
                    // exist yet; the `initialize` claim keeps the others waiting meanwhile.
                    vec![
                        Action::RaceInitialize(String::new()),
                        Action::StartBootstrap,
                    ],
                )
            }
        }
        // A claim nobody acts on is withdrawn, and the race runs again next cycle (simulation
        // seed 1796308256532: the winner's create request timed out but was applied).
        (DataDir::Empty, None)
            if obs.bootstrap_claim_abandoned
                && !me.nofailover
                && unfinished_bootstrap_claim_without_leader(view) =>
        {
            Decision::new(
                Outcome::WithdrawingAbandonedBootstrapClaim,
                vec![Action::CancelInitialize],
            )
        }
        (DataDir::Empty, None) => Decision::new(Outcome::WaitingForBootstrap, vec![]),
        (DataDir::Empty, Some(l)) if l == me.name => {
            // We hold the key but have no data (the bootstrap task is gone, or it never started
            // because the lease could not be confirmed): give it back, and if `initialize` is
            // still our empty claim, withdraw it too, or every member waits for a bootstrap
            // that nobody runs (Patroni's `cancel_initialization` after a failed take_leader).
            let mut actions = Vec::new();
            if view.initialize.as_deref().is_some_and(|i| !is_sysid(i)) {
                actions.push(Action::CancelInitialize);
            }
            actions.push(Action::ReleaseLeader);
            Decision::new(
                Outcome::LeaderStartFailed("no data directory".into()),
                actions,
            )
        }
        (DataDir::Empty, Some(l)) => {
            let leader = l.to_owned();
            if view
                .member(l)
                .is_some_and(|m| m.record.host_port().is_some())
            {
                Decision::new(
                    Outcome::CloningLeader {
                        leader: leader.clone(),
                    },
                    vec![Action::StartCreateReplica { leader }],
                )
            } else {
                Decision::new(Outcome::WaitingForLeaderAddress { leader }, vec![])
            }
        }
        (DataDir::Initialized { control, .. }, _) => {
            let sysid = control.system_identifier.clone();
            let mut actions = Vec::new();
            if view.initialize.is_none() {
                // Adopting a running cluster: record which data it is (Patroni case (d)).
                actions.push(Action::RaceInitialize(sysid.clone()));
            }
            let decision = match leader {
                Some(l) if l == me.name => decide_as_lock_holder(obs, view, me, &sysid),
                Some(l) => decide_with_other_leader(obs, view, me, l),
                None => decide_without_leader(obs, view, me),
            };
            actions.extend(decision.actions);
            Decision::new(decision.outcome, actions)
        }
        (DataDir::Unusable(reason), _) => Decision::new(
            Outcome::Refused(reason.clone()),
            vec![Action::Fatal(reason.clone())],
        ),
    }
}

fn decide_as_lock_holder(
    obs: &Observation,
    view: &ClusterView,
    me: &MemberFacts,
    sysid: &str,
) -> Decision {
    let paused = view.is_paused();
    if paused && !matches!(obs.lease, LeaseCheck::Lost) && !obs.postgres.is_writable_primary() {
        // Patroni §5.9: a paused leader whose postgres is down gives the key up instead of
        // starting anything. One whose postgres still runs keeps the key: it may be a
        // promotion under way, and releasing would let another member lead while it opens for
        // writes (simulation seed 351818649976, 3 members: two primaries).
        if obs.postgres.is_up() {
            return Decision::new(
                Outcome::PausedNoAction(
                    "postgres runs but is not a primary; keeping the lock".into(),
                ),
                vec![],
            );
        }
        return Decision::new(
            Outcome::PausedNoAction(
                "postgres is not running as primary; releasing the lock".into(),
            ),
            vec![Action::ReleaseLeader],
        );
    }
    match obs.lease {
        LeaseCheck::Lost if paused => {
            return Decision::new(
                Outcome::PausedNoAction("the lock was lost; postgres is left as it is".into()),
                vec![],
            )
        }
        LeaseCheck::Lost => {
            let actions = if obs.postgres.is_up() {
                vec![Action::StopPostgres(StopMode::Immediate)]
            } else {
                vec![]
            };
            return Decision::new(Outcome::LostLock, actions);
        }
        LeaseCheck::Unconfirmed => return Decision::new(Outcome::LeaseUnconfirmed, vec![]),
        LeaseCheck::Renewed(_) | LeaseCheck::NotHeld => {}
    }
    let mut housekeeping = Vec::new();
    if !view.initialize.as_deref().is_some_and(is_sysid) {
        housekeeping.push(Action::SetInitialize(sysid.to_owned()));
    }
    if view.config.is_none() {
        housekeeping.push(Action::SeedConfig);
    }
    if let (PostgresView::Running(status), Some(request)) = (&obs.postgres, &view.failover) {
        if !status.in_recovery {
            if let Some(decision) = leader_handles_failover(
                obs,
                view,
                &request.value,
                status,
                me.maximum_lag_on_failover,
                me.synchronous_mode,
            ) {
                // A switchover requested right after our promotion may be handled before any
                // healthy cycle ran: record our timeline switch first, or `history` would
                // lose who led it.
                let mut decision = decision;
                if history_outdated(view, status) {
                    decision.actions.insert(0, Action::WriteHistory);
                }
                return decision;
            }
        }
    }
    // Patroni §5.3: a primary that does not come back within `primary_start_timeout` (at once
    // when it is 0) hands the lock to a healthy replica instead of keeping the cluster without
    // a writable primary (a full disk kept one `unknown` for minutes while replicas waited).
    let primary_down = matches!(
        obs.postgres,
        PostgresView::Down
            | PostgresView::Crashed
            | PostgresView::Starting
            | PostgresView::Unresponsive
    );
    if primary_down
        && obs.primary_start_overdue
        && obs
            .peers
            .as_deref()
            .is_some_and(|peers| others_may_take_over(view, me, peers))
    {
        let mut actions = Vec::new();
        if obs.postgres.is_up() {
            actions.push(Action::StopPostgres(StopMode::Immediate));
        }
        actions.push(Action::ReleaseLeader);
        return Decision::new(Outcome::PrimaryStartTimedOut, actions);
    }
    let (outcome, mut actions) = match &obs.postgres {
        PostgresView::Running(status) if !status.in_recovery => {
            let mut actions = vec![Action::WriteStatus];
            if obs.checkpoint_after_promote_pending {
                actions.push(Action::Checkpoint);
            }
            if me.synchronous_mode || view.sync.is_some() {
                actions.push(Action::ManageSync);
            }
            actions.push(Action::ApplyConfig { upstream: None });
            actions.push(Action::SyncSlots);
            if history_outdated(view, status) {
                actions.insert(1, Action::WriteHistory);
            }
            (Outcome::LeaderHealthy, actions)
        }
        PostgresView::Running(_) => (Outcome::LeaderPromoting, vec![Action::Promote]),
        // A lock holder whose data directory was last a standby (it won the race, then its
        // postgres went down before the promotion) comes back read-only and is promoted next
        // cycle: started as a primary it would skip the timeline switch and continue the old
        // timeline behind the former primary's WAL, which no member could follow any more
        // (simulation seed 30394, 3 members).
        PostgresView::Down | PostgresView::Crashed if !obs.data_dir.was_primary() => (
            Outcome::LeaderStartingReadOnly,
            vec![Action::StartPostgres {
                primary: false,
                upstream: None,
            }],
        ),
        PostgresView::Down => (
            Outcome::LeaderStartingPostgres { after_crash: false },
            vec![Action::StartPostgres {
                primary: true,
                upstream: None,
            }],
        ),
        PostgresView::Crashed => (
            Outcome::LeaderStartingPostgres { after_crash: true },
            vec![Action::StartPostgres {
                primary: true,
                upstream: None,
            }],
        ),
        PostgresView::Starting | PostgresView::Unresponsive => {
            (Outcome::LeaderWaitingForPostgres, vec![])
        }
        PostgresView::StartFailed(reason) => (
            Outcome::LeaderStartFailed(reason.clone()),
            vec![Action::ReleaseLeader],
        ),
    };
    actions.extend(housekeeping);
    Decision::new(outcome, actions)
}

/// Patroni records history when its last line is not the timeline before ours.
fn history_outdated(view: &ClusterView, status: &crate::state::PostgresStatus) -> bool {
    let recorded = view.history.last().map(|l| l.timeline);
    status
        .timeline
        .filter(|t| *t > 1)
        .is_some_and(|tl| recorded != Some(tl - 1))
}

/// A peer known to run on a timeline older than ours (unknown counts as not behind, as in
/// Patroni, whose members may not publish it).
fn behind_on_timeline(peer: Option<u32>, ours: Option<u32>) -> bool {
    matches!((peer, ours), (Some(p), Some(o)) if p < o)
}

/// How far in the past a scheduled switchover counts as stale (Patroni: 1.5 × loop_wait; we
/// use a fixed minute, since loop_wait is not part of the facts).
const STALE_SWITCHOVER: chrono::Duration = chrono::Duration::seconds(60);

/// The leader's side of a `failover` key (Patroni `process_manual_failover_from_leader`, §5.6).
/// `None` means the key is not for us and the leader carries on.
fn leader_handles_failover(
    obs: &Observation,
    view: &ClusterView,
    request: &crate::dcs::FailoverRequest,
    status: &crate::state::PostgresStatus,
    maximum_lag: u64,
    synchronous_mode: bool,
) -> Option<Decision> {
    let me = view.leader_name()?;
    if request.leader.as_deref().is_some_and(|l| l != me) {
        // Addressed to another leader: stale; clear it.
        return Some(Decision::new(
            Outcome::SwitchoverAborted(format!(
                "it names {} as the leader",
                request.leader.as_deref().unwrap_or_default()
            )),
            vec![Action::WriteStatus, Action::ClearFailover],
        ));
    }
    if request.member.as_deref() == Some(me) {
        // "Switch over to myself": nothing to do.
        return Some(Decision::new(
            Outcome::SwitchoverAborted("the candidate is the current leader".into()),
            vec![Action::WriteStatus, Action::ClearFailover],
        ));
    }
    if let Some(at) = &request.scheduled_at {
        match chrono::DateTime::parse_from_rfc3339(at) {
            Ok(at_time) => {
                let at_utc = at_time.with_timezone(&chrono::Utc);
                if at_utc > obs.wall_now {
                    return Some(Decision::new(
                        Outcome::SwitchoverScheduled { at: at.clone() },
                        vec![Action::WriteStatus, Action::SyncSlots],
                    ));
                }
                if obs.wall_now - at_utc > STALE_SWITCHOVER {
                    return Some(Decision::new(
                        Outcome::SwitchoverAborted(format!("it was scheduled at {at}, long ago")),
                        vec![Action::WriteStatus, Action::ClearFailover],
                    ));
                }
            }
            Err(_) => {
                return Some(Decision::new(
                    Outcome::SwitchoverAborted(format!("unparsable scheduled_at {at:?}")),
                    vec![Action::WriteStatus, Action::ClearFailover],
                ))
            }
        }
    }
    let optime = status.wal_flush_lsn.unwrap_or(0);
    let peers = obs.peers.as_deref().unwrap_or_default();
    // In synchronous mode only a synchronous standby can take over: handing over to another
    // one would leave nobody allowed to race, and the old leader would take the lock back and
    // hand over again, forever (simulation seed 4020, 3 members).
    let healthy = |p: &PeerAnswer| {
        may_take_over(p, me, view, synchronous_mode, optime, maximum_lag)
            // A standby still on an older timeline (a demoted leader that has not streamed
            // from us yet) would promote to a timeline ID we already use: two histories under
            // one number, and nobody could follow it.
            && p.status
                .as_ref()
                .is_some_and(|s| !behind_on_timeline(s.timeline, status.timeline))
    };
    let candidate_ok = match &request.member {
        Some(candidate) => peers.iter().any(|p| &p.name == candidate && healthy(p)),
        None => peers.iter().any(healthy),
    };
    if !candidate_ok {
        let behind = |c: &str| {
            peers
                .iter()
                .find(|p| p.name == c)
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.timeline)
                .filter(|t| behind_on_timeline(Some(*t), status.timeline))
        };
        let why = match &request.member {
            Some(c) => match (behind(c), status.timeline) {
                (Some(theirs), Some(ours)) => format!(
                    "the candidate {c} is still on timeline {theirs}, behind ours ({ours}); \
                     retry once it streams from us"
                ),
                _ => format!("the candidate {c} is not healthy or not reachable"),
            },
            None => "no healthy candidate was found".to_owned(),
        };
        return Some(Decision::new(
            Outcome::SwitchoverAborted(why),
            vec![Action::WriteStatus, Action::ClearFailover],
        ));
    }
    Some(Decision::new(
        Outcome::SwitchoverDemoting {
            candidate: request.member.clone(),
        },
        vec![
            Action::Checkpoint,
            Action::StopPostgres(StopMode::Fast),
            Action::ReleaseLeader,
        ],
    ))
}

fn decide_with_other_leader(
    obs: &Observation,
    view: &ClusterView,
    me: &MemberFacts,
    leader: &str,
) -> Decision {
    let leader = leader.to_owned();
    let paused = view.is_paused();
    if paused && !matches!(&obs.postgres, PostgresView::Running(s) if s.in_recovery) {
        return Decision::new(
            Outcome::PausedNoAction(format!(
                "{leader} holds the lock; postgres is left as it is"
            )),
            vec![],
        );
    }
    if obs.postgres.is_writable_primary() {
        return Decision::new(
            Outcome::DemotingForOtherLeader { leader },
            vec![Action::StopPostgres(StopMode::Immediate)],
        );
    }
    if view
        .member(&leader)
        .is_none_or(|m| m.record.host_port().is_none())
    {
        return Decision::new(Outcome::WaitingForLeaderAddress { leader }, vec![]);
    }
    match &obs.postgres {
        PostgresView::Down | PostgresView::Crashed | PostgresView::StartFailed(_) => {
            // Patroni `check_leader_is_not_in_recovery`: rewind only against a leader that
            // runs as a primary and has checkpointed after its promotion. A switchover
            // candidate that took the key but could not promote yet is still a standby
            // (simulation seed 3074).
            let leader_checkpointed = view.member(&leader).is_none_or(|m| {
                m.record.checkpoint_after_promote != Some(false)
                    && matches!(m.record.role.as_str(), "primary" | "master" | "")
            });
            let diverged = match &obs.data_dir {
                DataDir::Initialized { control, .. } => {
                    diverged_from(
                        view,
                        &leader,
                        control.timeline,
                        control.checkpoint_lsn,
                        true,
                    ) || control.min_recovery().is_some_and(|(tl, at)| {
                        diverged_from(view, &leader, Some(tl), Some(at), true)
                    })
                }
                _ => false,
            };
            let needs_rewind = obs.data_dir.was_primary() || diverged;
            if needs_rewind && me.use_pg_rewind && !leader_checkpointed {
                Decision::new(Outcome::WaitingForLeaderCheckpoint { leader }, vec![])
            } else if needs_rewind && me.use_pg_rewind {
                Decision::new(
                    Outcome::RewindingToFollow {
                        leader: leader.clone(),
                    },
                    vec![Action::StartRewind { leader }],
                )
            } else {
                Decision::new(
                    Outcome::StartingAsReplica {
                        leader: leader.clone(),
                    },
                    vec![Action::StartPostgres {
                        primary: false,
                        upstream: Some(leader),
                    }],
                )
            }
        }
        // A standby on a timeline the cluster left before its position cannot stream from the
        // leader ever again (Patroni `_check_timeline_and_lsn`): stop it, so that the next
        // cycle rewinds it. Found by the simulation (seed 1002, 3 members): a replica that had
        // streamed from a short-lived leader stayed stuck on its abandoned timeline.
        PostgresView::Running(s)
            if s.in_recovery
                && !s.streaming
                && me.use_pg_rewind
                && (diverged_from(view, &leader, s.timeline, s.wal_position(), false)
                    || s.min_recovery.is_some_and(|(tl, at)| {
                        diverged_from(view, &leader, Some(tl), Some(at), true)
                    })) =>
        {
            Decision::new(
                Outcome::DivergedFromLeader {
                    leader: leader.clone(),
                },
                vec![Action::StopPostgres(StopMode::Fast)],
            )
        }
        // Replay stopped at the primary's raised `max_connections` (or a sibling parameter):
        // the standby serves ever staler reads until it restarts with the primary's values,
        // which the next start takes from the control file (Patroni restarts it too).
        PostgresView::Running(s)
            if s.in_recovery && obs.replay_paused_for_parameters && !paused =>
        {
            Decision::new(
                Outcome::RestartingForPrimarySettings {
                    leader: leader.clone(),
                },
                vec![Action::StopPostgres(StopMode::Fast)],
            )
        }
        PostgresView::Running(_) => Decision::new(
            Outcome::FollowingLeader {
                leader: leader.clone(),
            },
            vec![Action::ApplyConfig {
                upstream: Some(leader),
            }],
        ),
        PostgresView::Starting | PostgresView::Unresponsive => {
            Decision::new(Outcome::FollowingLeader { leader }, vec![])
        }
    }
}

/// Did the cluster leave `timeline` at a position before `position`? Then a member at that
/// timeline and position has WAL the leader does not have and must be rewound to follow. Judged
/// from the DCS `history` (each line: the timeline that ended and where).
/// A timeline newer than the leader's is a branch the leader never had.
///
/// `from_control_file`: `timeline` and `position` are the control file's checkpoint (a stopped
/// member), so they belong together. A running standby reports `pg_control_checkpoint()`'s
/// timeline while its wal receiver is down, which lags behind the position it has replayed:
/// for it only the unambiguous case (a timeline newer than the leader's) counts, or a standby
/// that followed a switch correctly would be stopped and rewound over and over (the e2e test
/// `after_a_switchover_a_killed_leader_still_rejoins` caught that).
fn diverged_from(
    view: &ClusterView,
    leader: &str,
    timeline: Option<u32>,
    position: Option<u64>,
    from_control_file: bool,
) -> bool {
    let (Some(timeline), Some(position)) = (timeline, position) else {
        return false;
    };
    // `history` may name a switch away from the timeline the leader is on again (a stopped
    // former primary of the old timeline took over later): only a leader on a newer timeline
    // makes a member of an old one diverged (simulation seed 7197, 5 members: endless
    // rewinds).
    let Some(leader_timeline) = view.member(leader).and_then(|m| m.record.timeline) else {
        return false;
    };
    // On an older timeline, the member can follow only if `history` shows the cluster left
    // that timeline at or after its position. No such line means it is on a branch that is not
    // in the leader's lineage (a leader that died promoted it; simulation seeds 7233, 8083),
    // or the new leader has not recorded its history yet: stopping and rewinding is safe in
    // both cases (pg_rewind then finds nothing to do).
    timeline > leader_timeline
        || (from_control_file
            && timeline < leader_timeline
            && !view
                .history
                .iter()
                .any(|line| line.timeline == timeline && line.lsn >= position))
}

/// Patroni's `is_healthiest_node` (§5.5 steps 10–12) on what observe gathered.
fn healthiest(
    view: &ClusterView,
    me: &MemberFacts,
    my_position: u64,
    peers: &[PeerAnswer],
    wall_now: chrono::DateTime<chrono::Utc>,
    former_primary: bool,
) -> Result<(), NotEligible> {
    // Without a `sync` key only the former primary is known to have every acknowledged write.
    let sync_key_lost = me.synchronous_mode && view.sync.is_none();
    let may_race = super::sync::may_race(me.synchronous_mode, &me.name, view)
        || (former_primary && sync_key_lost);
    if !may_race {
        return Err(NotEligible::NotSynchronous);
    }
    if let Some(status) = &view.status {
        let lag = status.optime.saturating_sub(my_position);
        if lag > me.maximum_lag_on_failover {
            return Err(NotEligible::Lagging {
                lag,
                maximum: me.maximum_lag_on_failover,
            });
        }
    }
    let former = handed_over(view, wall_now);
    for peer in peers {
        let Some(p) = &peer.status else { continue };
        if !p.is_primary && former == Some(peer.name.as_str()) {
            continue;
        }
        // In synchronous mode only the recorded synchronous standby may take over (Patroni's
        // `is_healthiest_node` filters the candidates by `sync`): deferring to a member that
        // may not race would leave the cluster without a leader.
        if !p.is_primary && !super::sync::may_race(me.synchronous_mode, &peer.name, view) {
            continue;
        }
        if p.nofailover && !p.is_primary {
            // Patroni ignores nofailover members' answers, except that a live primary is
            // always a reason not to race.
            continue;
        }
        if p.is_primary {
            return Err(NotEligible::PrimaryStillAlive(p.name.clone()));
        }
        if p.watchdog_failed {
            continue;
        }
        if p.wal_position > my_position {
            return Err(NotEligible::PeerAhead(p.name.clone()));
        }
        if p.wal_position == my_position && p.failover_priority > me.failover_priority {
            return Err(NotEligible::PeerHigherPriority(p.name.clone()));
        }
    }
    Ok(())
}

/// Could another member take the lock: a running replica that may race, is not tagged
/// `nofailover` and is within `maximum_lag_on_failover` of the last leader position (Patroni's
/// `is_failover_possible`)? A lagging replica may not race, so deferring to it left a cluster
/// without a leader (simulation seed 1796307428762).
fn others_may_take_over(view: &ClusterView, me: &MemberFacts, peers: &[PeerAnswer]) -> bool {
    let last_position = view.status.as_ref().map_or(0, |s| s.optime);
    peers.iter().any(|p| {
        may_take_over(
            p,
            &me.name,
            view,
            me.synchronous_mode,
            last_position,
            me.maximum_lag_on_failover,
        )
    })
}

/// The one eligibility rule for another member taking the lock (Patroni's
/// `is_failover_possible`): not `me`, allowed to race (in synchronous mode: listed in `sync`),
/// able to take over ([`able_to_take_over`]), a standby, and within `maximum_lag` of
/// `last_position`.
fn may_take_over(
    p: &PeerAnswer,
    me: &str,
    view: &ClusterView,
    synchronous_mode: bool,
    last_position: u64,
    maximum_lag: u64,
) -> bool {
    p.name != me
        && super::sync::may_race(synchronous_mode, &p.name, view)
        && p.status.as_ref().is_some_and(|s| {
            able_to_take_over(s)
                && !s.is_primary
                && last_position.saturating_sub(s.wal_position) <= maximum_lag
        })
}

/// A member that answered could take over at all: not tagged `nofailover`, its postgres runs
/// and its watchdog works (Patroni's `failover_limitation`).
fn able_to_take_over(s: &crate::peer::PeerStatus) -> bool {
    !s.nofailover && s.state == "running" && !s.watchdog_failed
}

/// The member that handed over in a due switchover: it stays out of the race, so others do
/// not defer to it.
fn handed_over(view: &ClusterView, wall_now: chrono::DateTime<chrono::Utc>) -> Option<&str> {
    let request = &view.failover.as_ref()?.value;
    let due = request.scheduled_at.as_deref().is_none_or(|at| {
        chrono::DateTime::parse_from_rfc3339(at)
            .is_ok_and(|t| t.with_timezone(&chrono::Utc) <= wall_now)
    });
    due.then_some(request.leader.as_deref()).flatten()
}

fn decide_without_leader(obs: &Observation, view: &ClusterView, me: &MemberFacts) -> Decision {
    if me.nofailover {
        let actions = if obs.postgres.is_writable_primary() {
            vec![Action::StopPostgres(StopMode::Immediate)]
        } else {
            vec![]
        };
        return Decision::new(
            Outcome::NoLeaderNotEligible(NotEligible::NoFailoverTag),
            actions,
        );
    }
    let peers = obs.peers.as_deref().unwrap_or_default();
    if let Some(request) = view.failover.as_ref().map(|r| &r.value) {
        // A scheduled request counts once its time has come (the leader acted on it).
        let due = request.scheduled_at.as_deref().is_none_or(|at| {
            chrono::DateTime::parse_from_rfc3339(at)
                .is_ok_and(|t| t.with_timezone(&chrono::Utc) <= obs.wall_now)
        });
        if due {
            let running_replica =
                matches!(&obs.postgres, PostgresView::Running(s) if s.in_recovery);
            match request.member.as_deref() {
                // The named candidate takes over without the lag and peer checks (§5.6).
                Some(c) if c == me.name && running_replica => {
                    return Decision::new(
                        Outcome::TakingOverAsCandidate,
                        vec![
                            Action::AcquireLeader,
                            Action::Promote,
                            Action::SyncSlots,
                            Action::ClearFailover,
                        ],
                    )
                }
                Some(c) if c != me.name => {
                    // Others wait while the candidate could take over: it answers, may fail
                    // over and its postgres runs (Patroni's `failover_limitation`). Waiting for
                    // a candidate whose postgres is down waits forever (simulation seed 6004).
                    let candidate_alive = peers
                        .iter()
                        .any(|p| p.name == c && p.status.as_ref().is_some_and(able_to_take_over));
                    if candidate_alive {
                        return Decision::new(
                            Outcome::DeferringToCandidate {
                                candidate: c.to_owned(),
                            },
                            vec![],
                        );
                    }
                }
                _ => {}
            }
            // The member that handed over does not race back for the lock, unless nobody
            // else could take it (Patroni: "All nodes are unhealthy, so the old primary
            // should participate in the race"); in synchronous mode with no recorded standby
            // the cluster stayed leaderless (simulation seeds 2024 and 2147).
            if request.leader.as_deref() == Some(me.name.as_str())
                && others_may_take_over(view, me, peers)
            {
                return Decision::new(
                    Outcome::NoLeaderNotEligible(NotEligible::FormerLeaderInSwitchover),
                    vec![],
                );
            }
        }
    }
    if view.is_paused() {
        return Decision::new(Outcome::NoLeaderNotEligible(NotEligible::Paused), vec![]);
    }
    match &obs.postgres {
        // A running primary (our agent restarted) takes the lock without asking peers
        // (Patroni §5.5 step 4).
        PostgresView::Running(s) if !s.in_recovery => {
            Decision::new(Outcome::NoLeaderRacing, vec![Action::AcquireLeader])
        }
        PostgresView::Running(s) => {
            let position = s.wal_position().unwrap_or(0);
            match healthiest(view, me, position, peers, obs.wall_now, false) {
                Ok(()) => Decision::new(
                    Outcome::NoLeaderRacing,
                    vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots],
                ),
                Err(why) => Decision::new(Outcome::NoLeaderNotEligible(why), vec![]),
            }
        }
        // A stopped former primary is the most advanced copy unless a peer says otherwise: the
        // lock comes first, so it is never opened for writes without holding the key.
        PostgresView::Down | PostgresView::Crashed | PostgresView::StartFailed(_)
            if obs.data_dir.was_primary() =>
        {
            let position = obs.data_dir.checkpoint_lsn().unwrap_or(0);
            match healthiest(view, me, position, peers, obs.wall_now, true) {
                Ok(()) => Decision::new(
                    Outcome::NoLeaderRacing,
                    vec![
                        Action::AcquireLeader,
                        Action::StartPostgres {
                            primary: true,
                            upstream: None,
                        },
                    ],
                ),
                Err(why) => Decision::new(Outcome::NoLeaderNotEligible(why), vec![]),
            }
        }
        PostgresView::Down | PostgresView::Crashed | PostgresView::StartFailed(_) => Decision::new(
            Outcome::NoLeaderStartingReadOnly,
            vec![Action::StartPostgres {
                primary: false,
                upstream: None,
            }],
        ),
        PostgresView::Starting | PostgresView::Unresponsive => Decision::new(
            Outcome::NoLeaderNotEligible(NotEligible::PostgresNotReady),
            vec![],
        ),
    }
}

#[cfg(test)]
mod tests {
    //! Each test names the rule it checks and where Patroni states it.
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::dcs::{ClusterView, LeaderKey, LeaseRenewal, Member, MemberRecord, Versioned};
    use crate::peer::PeerStatus;
    use crate::postgres::controldata::{ClusterState, ControlData};
    use crate::state::PostgresStatus;

    const SYSID: &str = "7310000000000000001";

    fn me() -> MemberFacts {
        MemberFacts::named("pg0")
    }

    fn pg(in_recovery: bool) -> PostgresStatus {
        PostgresStatus {
            in_recovery,
            server_version: 150018,
            timeline: Some(1),
            postmaster_start_time: None,
            postmaster_start_epoch: None,
            wal_flush_lsn: (!in_recovery).then_some(100),
            receive_lsn: None,
            replay_lsn: None,
            replayed_timestamp: None,
            replay_paused: false,
            streaming: false,
            system_identifier: Some(SYSID.into()),
            replication: vec![],
            pending_restart: vec![],
            min_recovery: None,
        }
    }

    fn initialized() -> DataDir {
        DataDir::Initialized {
            control: ControlData {
                system_identifier: SYSID.into(),
                state: ClusterState::InProduction,
                timeline: Some(1),
                checkpoint_lsn: Some(1),
                raw: Default::default(),
            },
            standby_signal: false,
        }
    }

    fn member(name: &str, port: u16) -> Member {
        Member {
            name: name.into(),
            record: MemberRecord {
                conn_url: format!("postgres://127.0.0.1:{port}/postgres"),
                api_url: format!("http://127.0.0.1:{}/patroni", port + 1000),
                ..Default::default()
            },
            revision: 1,
            lease: 1,
        }
    }

    fn view(leader: Option<&str>, initialize: Option<&str>) -> DcsView {
        DcsView::Known(Arc::new(ClusterView {
            members: vec![
                member("pg0", 5000),
                member("pg1", 5001),
                member("pg2", 5002),
            ],
            initialize: initialize.map(str::to_owned),
            leader: leader.map(|name| LeaderKey {
                name: name.into(),
                revision: 1,
                lease: 1,
            }),
            config: Some(Versioned {
                value: serde_json::json!({"ttl": 30}),
                revision: 1,
            }),
            ..Default::default()
        }))
    }

    fn renewed() -> LeaseCheck {
        LeaseCheck::Renewed(LeaseRenewal {
            sent_at: Instant::now(),
            ttl: Duration::from_secs(30),
        })
    }

    fn obs(
        dcs: DcsView,
        lease: LeaseCheck,
        data_dir: DataDir,
        postgres: PostgresView,
    ) -> Observation {
        Observation {
            now: Instant::now(),
            wall_now: chrono::Utc::now(),
            dcs,
            lease,
            data_dir,
            postgres,
            task: TaskView::Idle,
            peers: None,
            following: None,
            checkpoint_after_promote_pending: false,
            bootstrap_claim_abandoned: false,
            primary_start_overdue: false,
            replay_paused_for_parameters: false,
        }
    }

    /// An `initialize` claim that nobody has acted on (no `leader`) for long enough is
    /// withdrawn so the race can run again (simulation seed 1796308256532); a fresh claim, a
    /// finished bootstrap (a system identifier) or a `nofailover` member leaves it alone.
    #[test]
    fn an_abandoned_bootstrap_claim_is_withdrawn() {
        let claimed = |initialize: &str| match view(None, None) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.initialize = Some(initialize.to_owned());
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let mut o = obs(
            claimed(""),
            LeaseCheck::NotHeld,
            DataDir::Empty,
            PostgresView::Down,
        );
        assert_eq!(decide(&o, &me()).outcome, Outcome::WaitingForBootstrap);
        o.bootstrap_claim_abandoned = true;
        let d = decide(&o, &me());
        assert_eq!(d.outcome, Outcome::WithdrawingAbandonedBootstrapClaim);
        assert_eq!(d.actions, vec![Action::CancelInitialize]);
        let mut nofailover = me();
        nofailover.nofailover = true;
        assert_eq!(decide(&o, &nofailover).actions, vec![]);
        let mut finished = obs(
            claimed(SYSID),
            LeaseCheck::NotHeld,
            DataDir::Empty,
            PostgresView::Down,
        );
        finished.bootstrap_claim_abandoned = true;
        assert_eq!(decide(&finished, &me()).actions, vec![]);
    }

    /// The leader lock follows the bootstrap, so a slow bootstrap has no leader for a long
    /// time: its claim is not abandoned while the bootstrapping member's record says so (it
    /// vanishes with the member's lease when that member dies).
    #[test]
    fn a_claim_whose_member_is_still_bootstrapping_is_not_abandoned() {
        let mut v = match view(None, Some("")) {
            DcsView::Known(v) => (*v).clone(),
            DcsView::Unknown(_) => unreachable!(),
        };
        assert!(unfinished_bootstrap_claim_without_leader(&v));
        v.members[1].record.state = "initializing new cluster".into();
        assert!(!unfinished_bootstrap_claim_without_leader(&v));
        v.members[1].record.state = "running custom bootstrap script".into();
        assert!(!unfinished_bootstrap_claim_without_leader(&v));
        v.members.remove(1);
        assert!(unfinished_bootstrap_claim_without_leader(&v));
    }

    /// Patroni `ha.py` bootstrap: empty PGDATA, no leader, no `initialize` ⇒ race, then bootstrap.
    #[test]
    fn empty_member_of_new_cluster_races_for_initialize_then_bootstraps() {
        let d = decide(
            &obs(
                view(None, None),
                LeaseCheck::NotHeld,
                DataDir::Empty,
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(d.outcome, Outcome::TryingToBootstrap);
        assert_eq!(
            d.actions,
            vec![
                Action::RaceInitialize(String::new()),
                Action::StartBootstrap
            ]
        );
    }

    /// A `nofailover` member never bootstraps (patroni-compat §1.3 `initialize` (a)).
    #[test]
    fn nofailover_member_waits_for_someone_else_to_bootstrap() {
        let d = decide(
            &obs(
                view(None, None),
                LeaseCheck::NotHeld,
                DataDir::Empty,
                PostgresView::Down,
            ),
            &MemberFacts {
                nofailover: true,
                ..me()
            },
        );
        assert_eq!(d.outcome, Outcome::WaitingForBootstrap);
        assert!(d.actions.is_empty());
    }

    /// Someone is bootstrapping (`initialize` = "") ⇒ wait.
    #[test]
    fn bootstrapping_elsewhere_means_wait() {
        let d = decide(
            &obs(
                view(None, Some("")),
                LeaseCheck::NotHeld,
                DataDir::Empty,
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(d.outcome, Outcome::WaitingForBootstrap);
    }

    /// A data directory from another cluster is refused and untouched.
    #[test]
    fn foreign_data_directory_is_refused() {
        let d = decide(
            &obs(
                view(None, Some("7399999999999999999")),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Down,
            ),
            &me(),
        );
        assert!(matches!(d.outcome, Outcome::Refused(_)));
        assert_eq!(d.actions.len(), 1);
        assert!(matches!(&d.actions[0], Action::Fatal(r) if r.contains("another cluster")));
    }

    /// A non-postgres, non-empty directory is refused (never initdb over it).
    #[test]
    fn unusable_data_directory_is_refused_before_anything_else() {
        let d = decide(
            &obs(
                view(None, None),
                LeaseCheck::NotHeld,
                DataDir::Unusable("junk".into()),
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(d.actions, vec![Action::Fatal("junk".into())]);
    }

    /// The leader keeps its lock and restarts a crashed postmaster in place (patroni-compat §5.3.3).
    #[test]
    fn leader_restarts_crashed_postgres_and_keeps_the_lock() {
        let d = decide(
            &obs(
                view(Some("pg0"), Some(SYSID)),
                renewed(),
                initialized(),
                PostgresView::Crashed,
            ),
            &me(),
        );
        assert_eq!(
            d.outcome,
            Outcome::LeaderStartingPostgres { after_crash: true }
        );
        assert_eq!(
            d.actions,
            vec![Action::StartPostgres {
                primary: true,
                upstream: None
            }]
        );
    }

    /// Patroni §5.3: a primary that is not back within `primary_start_timeout` hands the lock
    /// to a healthy replica (stopping a postgres that still hangs in its start), and keeps
    /// waiting when no replica could take over.
    #[test]
    fn an_overdue_primary_start_releases_the_lock_only_for_a_healthy_replica() {
        for (postgres, stops) in [
            (PostgresView::Crashed, false),
            (PostgresView::Down, false),
            (PostgresView::Unresponsive, true),
            (PostgresView::Starting, true),
        ] {
            let mut o = obs(
                view(Some("pg0"), Some(SYSID)),
                renewed(),
                initialized(),
                postgres.clone(),
            );
            o.primary_start_overdue = true;
            o.peers = Some(vec![peer("pg1", 0, false)]);
            let d = decide(&o, &me());
            assert_eq!(d.outcome, Outcome::PrimaryStartTimedOut, "{postgres:?}");
            let mut expected = vec![Action::ReleaseLeader];
            if stops {
                expected.insert(0, Action::StopPostgres(StopMode::Immediate));
            }
            assert_eq!(d.actions, expected, "{postgres:?}");

            // Nobody to hand over to (a replica that is itself down): keep the lock.
            let mut down = peer("pg1", 0, false);
            if let Some(s) = down.status.as_mut() {
                s.state = "stopped".into();
            }
            o.peers = Some(vec![down]);
            assert_ne!(decide(&o, &me()).outcome, Outcome::PrimaryStartTimedOut);

            // Not overdue yet: restart in place.
            o.peers = Some(vec![peer("pg1", 0, false)]);
            o.primary_start_overdue = false;
            assert_ne!(decide(&o, &me()).outcome, Outcome::PrimaryStartTimedOut);
        }
    }

    /// A standby whose replay paused for insufficient parameter settings restarts (with the
    /// primary's values, taken from the control file at the next start); not in pause.
    #[test]
    fn a_standby_paused_for_the_primarys_settings_restarts() {
        let standby = || {
            PostgresView::Running(PostgresStatus {
                replay_paused: true,
                ..pg(true)
            })
        };
        let mut o = obs(
            view(Some("pg1"), Some(SYSID)),
            LeaseCheck::NotHeld,
            initialized(),
            standby(),
        );
        o.replay_paused_for_parameters = true;
        let d = decide(&o, &me());
        assert_eq!(
            d.outcome,
            Outcome::RestartingForPrimarySettings {
                leader: "pg1".into()
            }
        );
        assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Fast)]);

        o.dcs = paused(view(Some("pg1"), Some(SYSID)));
        assert!(!decide(&o, &me())
            .actions
            .contains(&Action::StopPostgres(StopMode::Fast)));
    }

    /// A healthy leader publishes its position; after bootstrap it records the sysid.
    #[test]
    fn healthy_leader_writes_status_and_records_sysid_after_bootstrap() {
        let d = decide(
            &obs(
                view(Some("pg0"), Some("")),
                renewed(),
                initialized(),
                PostgresView::Running(pg(false)),
            ),
            &me(),
        );
        assert_eq!(d.outcome, Outcome::LeaderHealthy);
        assert_eq!(
            d.actions,
            vec![
                Action::WriteStatus,
                Action::ApplyConfig { upstream: None },
                Action::SyncSlots,
                Action::SetInitialize(SYSID.into())
            ]
        );
    }

    /// The store said the key or lease is gone ⇒ demote immediately, without releasing
    /// (patroni-compat §5.4 `immediate-nolock`).
    #[test]
    fn lost_lock_demotes_immediately() {
        let d = decide(
            &obs(
                view(Some("pg0"), Some(SYSID)),
                LeaseCheck::Lost,
                initialized(),
                PostgresView::Running(pg(false)),
            ),
            &me(),
        );
        assert_eq!(d.outcome, Outcome::LostLock);
        assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Immediate)]);
    }

    /// Another holder ⇒ a writable primary stops at once.
    #[test]
    fn primary_demotes_when_another_member_holds_the_lock() {
        let d = decide(
            &obs(
                view(Some("pg1"), Some(SYSID)),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(pg(false)),
            ),
            &me(),
        );
        assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Immediate)]);
    }

    /// An unreachable DCS is not "no leader": nothing is raced or started.
    #[test]
    fn unknown_dcs_never_races_or_starts_postgres() {
        for postgres in [PostgresView::Down, PostgresView::Running(pg(false))] {
            let d = decide(
                &obs(
                    DcsView::Unknown("timeout".into()),
                    LeaseCheck::Unconfirmed,
                    initialized(),
                    postgres,
                ),
                &me(),
            );
            assert!(d.actions.is_empty(), "{:?}", d);
        }
    }

    /// An existing primary data directory without a leader: lock first, then start as primary.
    #[test]
    fn adopted_data_directory_takes_the_lock_before_opening_for_writes() {
        let d = decide(
            &obs(
                view(None, None),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![
                Action::RaceInitialize(SYSID.into()),
                Action::AcquireLeader,
                Action::StartPostgres {
                    primary: true,
                    upstream: None
                }
            ]
        );
    }

    /// A standby-signalled directory that wins the lock promotes.
    #[test]
    fn replica_that_wins_the_lock_promotes() {
        let d = decide(
            &obs(
                view(None, Some(SYSID)),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(pg(true)),
            ),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots]
        );
    }

    /// A failed bootstrap removes `initialize` and stops (Patroni deletes the key and exits).
    #[test]
    fn failed_bootstrap_cancels_initialize_and_stops() {
        let mut o = obs(
            view(Some("pg0"), Some("")),
            renewed(),
            DataDir::Empty,
            PostgresView::Down,
        );
        o.task = TaskView::Failed(TaskKind::Bootstrap, "initdb: boom".into());
        let d = decide(&o, &me());
        assert_eq!(d.actions[0], Action::CancelInitialize);
        assert_eq!(d.actions[1], Action::ReleaseLeader);
        assert!(matches!(d.actions[2], Action::Fatal(_)));
    }

    fn replica(receive: u64) -> PostgresStatus {
        PostgresStatus {
            receive_lsn: Some(receive),
            replay_lsn: Some(receive),
            ..pg(true)
        }
    }

    fn with_status(dcs: DcsView, optime: u64) -> DcsView {
        match dcs {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.status = Some(crate::dcs::LeaderStatus {
                    optime,
                    ..Default::default()
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        }
    }

    fn peer(name: &str, position: u64, is_primary: bool) -> PeerAnswer {
        PeerAnswer {
            name: name.into(),
            status: Some(PeerStatus {
                name: name.into(),
                is_primary,
                wal_position: position,
                nofailover: false,
                failover_priority: 1,
                watchdog_failed: false,
                state: "running".into(),
                timeline: None,
            }),
        }
    }

    /// An empty member clones the leader (Patroni `clone`, basebackup method).
    #[test]
    fn empty_member_clones_the_leader() {
        let d = decide(
            &obs(
                view(Some("pg1"), Some(SYSID)),
                LeaseCheck::NotHeld,
                DataDir::Empty,
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![Action::StartCreateReplica {
                leader: "pg1".into()
            }]
        );
    }

    /// A running replica keeps following whoever holds the lock.
    #[test]
    fn running_replica_follows_the_current_leader() {
        let d = decide(
            &obs(
                view(Some("pg2"), Some(SYSID)),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(replica(10)),
            ),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![Action::ApplyConfig {
                upstream: Some("pg2".into())
            }]
        );
    }

    /// A stopped former primary is rewound before it follows a new leader (Patroni
    /// `_rewind`/`use_pg_rewind`).
    #[test]
    fn stopped_former_primary_rewinds_before_following() {
        let d = decide(
            &obs(
                view(Some("pg1"), Some(SYSID)),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![Action::StartRewind {
                leader: "pg1".into()
            }]
        );
        let no_rewind = MemberFacts {
            use_pg_rewind: false,
            ..me()
        };
        let d = decide(
            &obs(
                view(Some("pg1"), Some(SYSID)),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Down,
            ),
            &no_rewind,
        );
        assert_eq!(
            d.actions,
            vec![Action::StartPostgres {
                primary: false,
                upstream: Some("pg1".into())
            }]
        );
    }

    /// §5.5 step 10: a replica further behind `status.optime` than maximum_lag_on_failover
    /// does not race.
    #[test]
    fn lagging_replica_does_not_race() {
        let d = decide(
            &obs(
                with_status(view(None, Some(SYSID)), 10_000_000),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(replica(100)),
            ),
            &me(),
        );
        assert!(matches!(
            d.outcome,
            Outcome::NoLeaderNotEligible(NotEligible::Lagging { .. })
        ));
        assert!(d.actions.is_empty());
    }

    /// §5.5 step 12: a peer with a higher WAL position, or a live primary, stops the race.
    #[test]
    fn replica_behind_a_peer_or_with_a_live_primary_does_not_race() {
        let mut o = obs(
            view(None, Some(SYSID)),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        o.peers = Some(vec![peer("pg1", 200, false)]);
        assert_eq!(
            decide(&o, &me()).outcome,
            Outcome::NoLeaderNotEligible(NotEligible::PeerAhead("pg1".into()))
        );
        o.peers = Some(vec![peer("pg1", 50, true)]);
        assert_eq!(
            decide(&o, &me()).outcome,
            Outcome::NoLeaderNotEligible(NotEligible::PrimaryStillAlive("pg1".into()))
        );
        o.peers = Some(vec![
            peer("pg1", 100, false),
            PeerAnswer {
                name: "pg2".into(),
                status: None,
            },
        ]);
        assert_eq!(
            decide(&o, &me()).actions,
            vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots]
        );
    }

    /// Equal positions: the higher failover_priority wins; a nofailover peer's answer is ignored.
    #[test]
    fn failover_priority_breaks_ties() {
        let mut o = obs(
            view(None, Some(SYSID)),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        let mut p = peer("pg1", 100, false);
        if let Some(s) = p.status.as_mut() {
            s.failover_priority = 5;
        }
        o.peers = Some(vec![p]);
        assert_eq!(
            decide(&o, &me()).outcome,
            Outcome::NoLeaderNotEligible(NotEligible::PeerHigherPriority("pg1".into()))
        );
        let mut q = peer("pg1", 500, false);
        if let Some(s) = q.status.as_mut() {
            s.nofailover = true;
        }
        o.peers = Some(vec![q]);
        assert_eq!(
            decide(&o, &me()).actions,
            vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots]
        );
    }

    fn paused(dcs: DcsView) -> DcsView {
        match dcs {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.config = Some(Versioned {
                    value: serde_json::json!({"ttl": 30, "pause": true}),
                    revision: 2,
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        }
    }

    /// §5.9: no automatic failover while paused.
    #[test]
    fn paused_replicas_do_not_race() {
        let d = decide(
            &obs(
                paused(view(None, Some(SYSID))),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(replica(100)),
            ),
            &me(),
        );
        assert_eq!(d.outcome, Outcome::NoLeaderNotEligible(NotEligible::Paused));
        assert!(d.actions.is_empty());
    }

    /// §5.9: a paused leader never restarts postgres; it releases the lock instead.
    #[test]
    fn paused_leader_does_not_restart_crashed_postgres() {
        let d = decide(
            &obs(
                paused(view(Some("pg0"), Some(SYSID))),
                renewed(),
                initialized(),
                PostgresView::Crashed,
            ),
            &me(),
        );
        assert_eq!(d.actions, vec![Action::ReleaseLeader]);
    }

    /// §5.6: a manual failover to a named candidate works while paused.
    #[test]
    fn paused_cluster_still_fails_over_to_a_named_candidate() {
        let dcs = match paused(view(None, Some(SYSID))) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.failover = Some(Versioned {
                    value: crate::dcs::FailoverRequest {
                        leader: None,
                        member: Some("pg0".into()),
                        scheduled_at: None,
                    },
                    revision: 3,
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let d = decide(
            &obs(
                dcs,
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(replica(1)),
            ),
            &me(),
        );
        assert_eq!(d.outcome, Outcome::TakingOverAsCandidate);
    }

    /// Patroni's `checkpoint_after_promote`: no pg_rewind against a leader whose control file
    /// still names the old timeline.
    #[test]
    fn rewind_waits_for_the_new_leaders_checkpoint_after_promotion() {
        let dcs = match view(Some("pg1"), Some(SYSID)) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                if let Some(m) = v.members.iter_mut().find(|m| m.name == "pg1") {
                    m.record.checkpoint_after_promote = Some(false);
                }
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let d = decide(
            &obs(dcs, LeaseCheck::NotHeld, initialized(), PostgresView::Down),
            &me(),
        );
        assert_eq!(
            d.outcome,
            Outcome::WaitingForLeaderCheckpoint {
                leader: "pg1".into()
            }
        );
        assert!(d.actions.is_empty());
    }

    /// A freshly promoted leader checkpoints at once.
    #[test]
    fn a_promoted_leader_checkpoints() {
        let mut o = obs(
            view(Some("pg0"), Some(SYSID)),
            renewed(),
            initialized(),
            PostgresView::Running(pg(false)),
        );
        o.checkpoint_after_promote_pending = true;
        assert!(decide(&o, &me()).actions.contains(&Action::Checkpoint));
    }
    /// A switchover handled in the first cycle after our promotion still records our
    /// timeline switch before demoting (else `history` loses who led timeline 2).
    #[test]
    fn a_switchover_right_after_promotion_records_history_first() {
        let dcs = match view(Some("pg0"), Some(SYSID)) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.failover = Some(Versioned {
                    value: crate::dcs::FailoverRequest {
                        leader: Some("pg0".into()),
                        member: Some("pg1".into()),
                        scheduled_at: None,
                    },
                    revision: 3,
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let mut o = obs(
            dcs,
            renewed(),
            initialized(),
            PostgresView::Running(PostgresStatus {
                timeline: Some(2),
                ..pg(false)
            }),
        );
        o.peers = Some(vec![peer("pg1", 100, false)]);
        let d = decide(&o, &me());
        assert_eq!(
            d.outcome,
            Outcome::SwitchoverDemoting {
                candidate: Some("pg1".into())
            }
        );
        assert_eq!(d.actions.first(), Some(&Action::WriteHistory));
        assert!(d.actions.contains(&Action::StopPostgres(StopMode::Fast)));
    }

    /// A candidate still on an older timeline than the leader's (a demoted leader that has
    /// not streamed from us yet) is refused: promoted, it would reuse our timeline ID.
    #[test]
    fn a_handover_to_a_standby_behind_on_timeline_is_refused() {
        let dcs = match view(Some("pg0"), Some(SYSID)) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.failover = Some(Versioned {
                    value: crate::dcs::FailoverRequest {
                        leader: None,
                        member: Some("pg1".into()),
                        scheduled_at: None,
                    },
                    revision: 3,
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let running_on = |tl| {
            PostgresView::Running(PostgresStatus {
                timeline: Some(tl),
                ..pg(false)
            })
        };
        let candidate_on = |tl: Option<u32>| {
            let mut p = peer("pg1", 100, false);
            if let Some(s) = p.status.as_mut() {
                s.timeline = tl;
            }
            p
        };
        let mut o = obs(dcs.clone(), renewed(), initialized(), running_on(2));
        o.peers = Some(vec![candidate_on(Some(1))]);
        let d = decide(&o, &me());
        assert!(
            matches!(&d.outcome, Outcome::SwitchoverAborted(why) if why.contains("timeline 1")),
            "{:?}",
            d.outcome
        );
        assert!(d.actions.contains(&Action::ClearFailover));
        assert!(!d.actions.contains(&Action::StopPostgres(StopMode::Fast)));

        for same_or_unknown in [Some(2), None] {
            let mut o = obs(dcs.clone(), renewed(), initialized(), running_on(2));
            o.peers = Some(vec![candidate_on(same_or_unknown)]);
            assert_eq!(
                decide(&o, &me()).outcome,
                Outcome::SwitchoverDemoting {
                    candidate: Some("pg1".into())
                },
                "candidate on {same_or_unknown:?}"
            );
        }
    }

    fn with_sync(dcs: DcsView, leader: &str, standby: &str) -> DcsView {
        match dcs {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.sync = Some(Versioned {
                    value: crate::dcs::SyncState {
                        leader: Some(leader.into()),
                        sync_standby: Some(standby.into()),
                        quorum: 0,
                    },
                    revision: 1,
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        }
    }

    /// Patroni `is_healthiest_node`: in synchronous mode only the recorded synchronous standby
    /// is a candidate, so it does not defer to an asynchronous peer that is as advanced with a
    /// higher priority, or ahead (simulation seed 7, 3 members: nobody ever took over).
    #[test]
    fn sync_standby_does_not_defer_to_a_member_that_may_not_race() {
        let mut o = obs(
            with_sync(view(None, Some(SYSID)), "pg2", "pg0"),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        let mut p = peer("pg1", 100, false);
        if let Some(s) = p.status.as_mut() {
            s.failover_priority = 5;
        }
        o.peers = Some(vec![p, peer("pg2", 100, false)]);
        let sync_on = MemberFacts {
            synchronous_mode: true,
            ..me()
        };
        assert_eq!(
            decide(&o, &sync_on).actions,
            vec![
                Action::AcquireLeader,
                Action::ClaimSync,
                Action::Promote,
                Action::SyncSlots
            ]
        );
        // Without synchronous mode the higher priority still wins.
        assert_eq!(
            decide(&o, &me()).outcome,
            Outcome::NoLeaderNotEligible(NotEligible::PeerHigherPriority("pg1".into()))
        );
        // A live primary is a reason not to race, synchronous or not.
        o.peers = Some(vec![peer("pg1", 100, true)]);
        assert_eq!(
            decide(&o, &sync_on).outcome,
            Outcome::NoLeaderNotEligible(NotEligible::PrimaryStillAlive("pg1".into()))
        );
    }

    /// Patroni `cancel_initialization`: a member that won the `initialize` race but could not
    /// confirm its lease before bootstrapping withdraws the empty claim along with the lock, or
    /// every member waits forever for a bootstrap nobody runs (simulation seed 100, 3 members).
    #[test]
    fn lock_holder_without_data_withdraws_its_empty_initialize_claim() {
        let d = decide(
            &obs(
                view(Some("pg0"), Some("")),
                renewed(),
                DataDir::Empty,
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![Action::CancelInitialize, Action::ReleaseLeader]
        );
        let d = decide(
            &obs(
                view(Some("pg0"), Some(SYSID)),
                renewed(),
                DataDir::Empty,
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(d.actions, vec![Action::ReleaseLeader]);
    }

    /// A bootstrap plan that stopped after winning `initialize` withdraws the claim; one that
    /// lost the race, or started the bootstrap, leaves `initialize` alone.
    #[test]
    fn a_won_bootstrap_race_without_a_bootstrap_is_withdrawn() {
        let race = Action::RaceInitialize(String::new());
        assert_eq!(
            compensation(std::slice::from_ref(&race)),
            vec![Action::CancelInitialize]
        );
        assert_eq!(
            compensation(&[race.clone(), Action::AcquireLeader]),
            vec![Action::CancelInitialize]
        );
        assert!(compensation(&[]).is_empty());
        assert!(compensation(&[race, Action::AcquireLeader, Action::StartBootstrap]).is_empty());
        assert!(compensation(&[Action::RaceInitialize(SYSID.into())]).is_empty());
    }

    /// Patroni `_check_timeline_and_lsn`: a standby whose timeline the cluster left before its
    /// position, or that is on a timeline newer than the leader's, stops to be rewound; one at
    /// or before the switch point keeps following (simulation seeds 1002 and 2013).
    #[test]
    fn a_standby_on_an_abandoned_timeline_stops_to_rewind() {
        let with_history = |dcs: DcsView, leader_tl: u32| match dcs {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.history = vec![crate::dcs::HistoryLine {
                    timeline: 1,
                    lsn: 150,
                    reason: String::new(),
                    timestamp: None,
                    new_leader: Some("pg1".into()),
                }];
                if let Some(m) = v.members.iter_mut().find(|m| m.name == "pg1") {
                    m.record.timeline = Some(leader_tl);
                }
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let standby = |position: u64, timeline: u32| PostgresStatus {
            timeline: Some(timeline),
            streaming: false,
            ..replica(position)
        };
        // Running, its reported timeline may be a stale checkpoint's: no judgement.
        let d = decide(
            &obs(
                with_history(view(Some("pg1"), Some(SYSID)), 2),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(standby(200, 1)),
            ),
            &me(),
        );
        assert!(matches!(d.outcome, Outcome::FollowingLeader { .. }));
        let d = decide(
            &obs(
                with_history(view(Some("pg1"), Some(SYSID)), 2),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(standby(150, 1)),
            ),
            &me(),
        );
        assert!(matches!(d.outcome, Outcome::FollowingLeader { .. }));
        let d = decide(
            &obs(
                with_history(view(Some("pg1"), Some(SYSID)), 2),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(standby(100, 3)),
            ),
            &me(),
        );
        assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Fast)]);
        // Stopped, the diverged standby is rewound although it never was a primary.
        let stopped_standby = DataDir::Initialized {
            control: ControlData {
                system_identifier: SYSID.into(),
                state: ClusterState::ShutDownInRecovery,
                timeline: Some(1),
                checkpoint_lsn: Some(200),
                raw: Default::default(),
            },
            standby_signal: true,
        };
        let d = decide(
            &obs(
                with_history(view(Some("pg1"), Some(SYSID)), 2),
                LeaseCheck::NotHeld,
                stopped_standby,
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![Action::StartRewind {
                leader: "pg1".into()
            }]
        );
    }

    /// Patroni `manual_failover_process_no_leader`: the member that handed over races when no
    /// other member could take the lock (simulation seeds 2024, 2147); otherwise it stays out,
    /// and the others do not defer to it.
    #[test]
    fn the_former_leader_of_a_switchover_races_only_when_nobody_else_can() {
        let with_request = |dcs: DcsView| match dcs {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.failover = Some(Versioned {
                    value: crate::dcs::FailoverRequest {
                        leader: Some("pg0".into()),
                        member: None,
                        scheduled_at: None,
                    },
                    revision: 3,
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let mut o = obs(
            with_request(view(None, Some(SYSID))),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        o.peers = Some(vec![peer("pg1", 100, false)]);
        assert_eq!(
            decide(&o, &me()).outcome,
            Outcome::NoLeaderNotEligible(NotEligible::FormerLeaderInSwitchover)
        );
        // pg1 is tagged nofailover: nobody else can take over, so pg0 races.
        let mut p = peer("pg1", 100, false);
        if let Some(s) = p.status.as_mut() {
            s.nofailover = true;
        }
        o.peers = Some(vec![p]);
        assert_eq!(
            decide(&o, &me()).actions,
            vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots]
        );
        // pg1 lags beyond maximum_lag_on_failover behind the last leader position, so it may
        // not race either: pg0, which never got to hand over, races (simulation seed
        // 1796307428762: a scheduled switchover came due while the leader was cut off).
        let mut lagging = obs(
            with_request(with_status(view(None, Some(SYSID)), 5_000_000)),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(5_000_000)),
        );
        lagging.peers = Some(vec![peer("pg1", 100, false)]);
        assert_eq!(
            decide(&lagging, &me()).actions,
            vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots]
        );
        // pg1 does not defer to pg0's higher priority: pg0 handed over.
        let mut o1 = obs(
            with_request(view(None, Some(SYSID))),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        let mut former = peer("pg0", 100, false);
        if let Some(s) = former.status.as_mut() {
            s.failover_priority = 9;
        }
        o1.peers = Some(vec![former]);
        assert_eq!(
            decide(&o1, &MemberFacts::named("pg1")).actions,
            vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots]
        );
    }

    /// Patroni refuses a switchover to a member that is not a synchronous standby in
    /// synchronous mode; the leader aborts it instead of handing over to nobody (seed 4020).
    #[test]
    fn a_sync_leader_hands_over_only_to_its_synchronous_standby() {
        let dcs = match with_sync(view(Some("pg0"), Some(SYSID)), "pg0", "pg2") {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.failover = Some(Versioned {
                    value: crate::dcs::FailoverRequest {
                        leader: Some("pg0".into()),
                        member: None,
                        scheduled_at: None,
                    },
                    revision: 3,
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let mut o = obs(
            dcs,
            renewed(),
            initialized(),
            PostgresView::Running(pg(false)),
        );
        o.peers = Some(vec![peer("pg1", 100, false)]);
        let sync_on = MemberFacts {
            synchronous_mode: true,
            ..me()
        };
        assert!(matches!(
            decide(&o, &sync_on).outcome,
            Outcome::SwitchoverAborted(_)
        ));
        o.peers = Some(vec![peer("pg1", 100, false), peer("pg2", 100, false)]);
        assert!(matches!(
            decide(&o, &sync_on).outcome,
            Outcome::SwitchoverDemoting { candidate: None }
        ));
    }

    /// §5.9 with the simulation's correction: a paused leader releases the lock only when
    /// postgres is down, never while it runs (a promotion may be completing) (seed
    /// 351818649976).
    #[test]
    fn a_paused_leader_keeps_the_lock_while_postgres_runs() {
        for postgres in [
            PostgresView::Running(pg(true)),
            PostgresView::Starting,
            PostgresView::Unresponsive,
        ] {
            let d = decide(
                &obs(
                    paused(view(Some("pg0"), Some(SYSID))),
                    renewed(),
                    initialized(),
                    postgres,
                ),
                &me(),
            );
            assert_eq!(d.actions, vec![], "{:?}", d.outcome);
        }
    }

    /// Patroni `failover_limitation`: members defer to a manual failover candidate only while
    /// its postgres runs; a stopped candidate cannot take over, so the others race (seed 6004).
    #[test]
    fn members_do_not_wait_for_a_failover_candidate_whose_postgres_is_down() {
        let dcs = match view(None, Some(SYSID)) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.failover = Some(Versioned {
                    value: crate::dcs::FailoverRequest {
                        leader: None,
                        member: Some("pg2".into()),
                        scheduled_at: None,
                    },
                    revision: 3,
                });
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let mut o = obs(
            dcs,
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        o.peers = Some(vec![peer("pg2", 50, false)]);
        assert_eq!(
            decide(&o, &me()).outcome,
            Outcome::DeferringToCandidate {
                candidate: "pg2".into()
            }
        );
        let mut stopped = peer("pg2", 50, false);
        if let Some(s) = stopped.status.as_mut() {
            s.state = "stopped".into();
        }
        o.peers = Some(vec![stopped]);
        assert_eq!(
            decide(&o, &me()).actions,
            vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots]
        );
    }

    /// Patroni `check_leader_is_not_in_recovery`: a former primary does not pg_rewind against
    /// a leader that still runs as a standby (a switchover candidate that took the key but has
    /// not promoted yet); it waits (simulation seed 3074).
    #[test]
    fn rewind_waits_until_the_leader_runs_as_a_primary() {
        let with_role = |role: &str| match view(Some("pg1"), Some(SYSID)) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                if let Some(m) = v.members.iter_mut().find(|m| m.name == "pg1") {
                    m.record.role = role.into();
                }
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let d = decide(
            &obs(
                with_role("replica"),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(
            d.outcome,
            Outcome::WaitingForLeaderCheckpoint {
                leader: "pg1".into()
            }
        );
        let d = decide(
            &obs(
                with_role("primary"),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Down,
            ),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![Action::StartRewind {
                leader: "pg1".into()
            }]
        );
    }

    /// A standby on the leader's own timeline is never diverged, even when `history` records a
    /// switch away from that timeline at an earlier position (the leader of the old timeline
    /// took over again); rewinding it would loop forever (simulation seed 7197, 5 members).
    #[test]
    fn a_standby_on_the_leaders_timeline_is_not_diverged() {
        let dcs = match view(Some("pg1"), Some(SYSID)) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.history = vec![crate::dcs::HistoryLine {
                    timeline: 1,
                    lsn: 150,
                    reason: String::new(),
                    timestamp: None,
                    new_leader: Some("pg2".into()),
                }];
                if let Some(m) = v.members.iter_mut().find(|m| m.name == "pg1") {
                    m.record.timeline = Some(1);
                }
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let standby = PostgresStatus {
            timeline: Some(1),
            streaming: false,
            ..replica(200)
        };
        let d = decide(
            &obs(
                dcs,
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(standby),
            ),
            &me(),
        );
        assert!(matches!(d.outcome, Outcome::FollowingLeader { .. }));
    }

    /// A stopped standby on an older timeline that `history` does not show the cluster
    /// leaving at or after its checkpoint is on a branch the leader never had: it is rewound
    /// (simulation seeds 7233 and 8083, 5 members, once stopped).
    #[test]
    fn a_stopped_standby_on_a_branch_outside_the_leaders_lineage_is_rewound() {
        let dcs = match view(Some("pg1"), Some(SYSID)) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                // The leader went 1 -> 3; timeline 2 was another member's branch.
                v.history = vec![crate::dcs::HistoryLine {
                    timeline: 1,
                    lsn: 150,
                    reason: String::new(),
                    timestamp: None,
                    new_leader: Some("pg1".into()),
                }];
                if let Some(m) = v.members.iter_mut().find(|m| m.name == "pg1") {
                    m.record.timeline = Some(3);
                }
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let stopped = DataDir::Initialized {
            control: ControlData {
                system_identifier: SYSID.into(),
                state: ClusterState::ShutDownInRecovery,
                timeline: Some(2),
                checkpoint_lsn: Some(120),
                raw: Default::default(),
            },
            standby_signal: true,
        };
        let d = decide(
            &obs(dcs, LeaseCheck::NotHeld, stopped, PostgresView::Down),
            &me(),
        );
        assert_eq!(
            d.actions,
            vec![Action::StartRewind {
                leader: "pg1".into()
            }]
        );
    }

    /// Synchronous mode with the `sync` key lost: a running standby does not guess that it has
    /// every acknowledged write; a stopped former primary may take the lock back.
    #[test]
    fn without_a_sync_key_only_the_former_primary_races_in_synchronous_mode() {
        let sync_on = MemberFacts {
            synchronous_mode: true,
            ..me()
        };
        let standby = obs(
            view(None, Some(SYSID)),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        assert_eq!(
            decide(&standby, &sync_on).outcome,
            Outcome::NoLeaderNotEligible(NotEligible::NotSynchronous)
        );
        let former_primary = obs(
            view(None, Some(SYSID)),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Down,
        );
        assert!(decide(&former_primary, &sync_on)
            .actions
            .contains(&Action::AcquireLeader));
    }

    /// In synchronous mode every path that opens postgres for writes claims `sync` first
    /// (seed 641023133062); without synchronous mode nothing changes.
    #[test]
    fn a_synchronous_leader_claims_sync_before_opening_for_writes() {
        let o = obs(
            with_sync(view(None, Some(SYSID)), "pg1", "pg0"),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        let sync_on = MemberFacts {
            synchronous_mode: true,
            ..me()
        };
        assert_eq!(
            decide(&o, &sync_on).actions,
            vec![
                Action::AcquireLeader,
                Action::ClaimSync,
                Action::Promote,
                Action::SyncSlots
            ]
        );
        assert_eq!(
            decide(&o, &me()).actions,
            vec![Action::AcquireLeader, Action::Promote, Action::SyncSlots]
        );
        let crashed = obs(
            view(Some("pg0"), Some(SYSID)),
            renewed(),
            initialized(),
            PostgresView::Crashed,
        );
        assert_eq!(
            decide(&crashed, &sync_on).actions[..2],
            [
                Action::ClaimSync,
                Action::StartPostgres {
                    primary: true,
                    upstream: None
                }
            ]
        );
    }

    /// A running standby is judged by its minimum recovery point, a consistent (timeline, LSN)
    /// pair: past the point where `history` shows its timeline ending, it stops to be rewound;
    /// on the leader's timeline it follows, whatever its stale checkpoint timeline says
    /// (simulation seeds 2013, 7233, 8083; the e2e rewind loop of the first attempt).
    #[test]
    fn a_running_standby_is_judged_by_its_minimum_recovery_point() {
        let dcs = || match view(Some("pg1"), Some(SYSID)) {
            DcsView::Known(v) => {
                let mut v = (*v).clone();
                v.history = vec![crate::dcs::HistoryLine {
                    timeline: 1,
                    lsn: 150,
                    reason: String::new(),
                    timestamp: None,
                    new_leader: Some("pg1".into()),
                }];
                if let Some(m) = v.members.iter_mut().find(|m| m.name == "pg1") {
                    m.record.timeline = Some(2);
                }
                DcsView::Known(Arc::new(v))
            }
            other => other,
        };
        let standby = |min_recovery: (u32, u64)| PostgresStatus {
            timeline: Some(1),
            streaming: false,
            min_recovery: Some(min_recovery),
            ..replica(200)
        };
        let d = decide(
            &obs(
                dcs(),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(standby((1, 200))),
            ),
            &me(),
        );
        assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Fast)]);
        let d = decide(
            &obs(
                dcs(),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(standby((2, 200))),
            ),
            &me(),
        );
        assert!(matches!(d.outcome, Outcome::FollowingLeader { .. }));
        let d = decide(
            &obs(
                dcs(),
                LeaseCheck::NotHeld,
                initialized(),
                PostgresView::Running(standby((1, 140))),
            ),
            &me(),
        );
        assert!(matches!(d.outcome, Outcome::FollowingLeader { .. }));
    }

    /// A lock holder whose postgres went down before its promotion (data directory last a
    /// standby) starts read-only, then promotes, so the timeline switches; a former primary
    /// restarts as primary (seed 30394).
    #[test]
    fn a_lock_holder_that_was_a_standby_comes_back_read_only() {
        let standby_dir = DataDir::Initialized {
            control: ControlData {
                system_identifier: SYSID.into(),
                state: ClusterState::InArchiveRecovery,
                timeline: Some(1),
                checkpoint_lsn: Some(1),
                raw: Default::default(),
            },
            standby_signal: true,
        };
        let d = decide(
            &obs(
                view(Some("pg0"), Some(SYSID)),
                renewed(),
                standby_dir,
                PostgresView::Crashed,
            ),
            &me(),
        );
        assert_eq!(
            d.actions[0],
            Action::StartPostgres {
                primary: false,
                upstream: None
            }
        );
        let d = decide(
            &obs(
                view(Some("pg0"), Some(SYSID)),
                renewed(),
                initialized(),
                PostgresView::Crashed,
            ),
            &me(),
        );
        assert_eq!(
            d.actions[0],
            Action::StartPostgres {
                primary: true,
                upstream: None
            }
        );
    }
}
