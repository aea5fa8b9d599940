//! The HA decision: a pure function from an [`Observation`] to a [`Decision`].
//!
//! It follows the order of Patroni's `_run_cycle` (`patroni/ha.py`): long action in progress →
//! data directory checks → DCS reachable? → our own lock → someone else's lock → no lock (race).
//! The caller performs the actions in order and stops at the first one that fails or loses a
//! race, then runs a new cycle at once.

use std::fmt;

use crate::dcs::ClusterView;
use crate::postgres::supervisor::StopMode;

use super::observe::{DataDir, DcsView, LeaseCheck, Observation, TaskKind, TaskView};

// The seams of the decision, in `decide_inner`'s order: our own lock, someone else's lock, no
// lock. `sync` is named here so the parts reach it as `super::sync`.
use super::sync;

mod follower;
mod leader;
mod race;
pub mod topology;
pub use race::{lagging_on, racing_position, someone_else_may_take_over};
#[cfg(test)]
mod tests;

use self::follower::decide_with_other_leader;
use self::leader::decide_as_lock_holder;
use self::race::decide_without_leader;

/// Which members `sync` lets take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRule {
    /// Asynchronous: anyone.
    Off,
    /// Synchronous mode: the `sync` leader and the standbys it lists.
    Listed,
    /// Quorum commit: a member that gathers `sync.quorum` votes.
    Quorum,
}

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
    /// `synchronous_mode: quorum`: any member may race, with `sync.quorum` votes of the
    /// members `sync` lists (its `leader` included) at or behind it.
    pub quorum_commit: bool,
    /// The cluster is a standby cluster (`standby_cluster` names a source): the lock holder,
    /// the standby leader, replicates from that source and nothing is promoted.
    pub standby_cluster: bool,
    /// The `replicatefrom` tag: stream from that member rather than the leader while it runs.
    pub replicatefrom: Option<String>,
    /// `failsafe_mode` is on: the leader publishes the `failsafe` topology, and only members
    /// named in it may race.
    pub failsafe_mode: bool,
    /// Our REST API URL, as published in the member record and the `failsafe` topology.
    pub api_url: String,
    /// A replica creation method marked `no_leader` is configured: an empty member may be
    /// created while no leader runs.
    pub replica_without_leader: bool,
    /// `check_timeline`: a member behind the cluster's last timeline (`history`) may not race.
    pub check_timeline: bool,
}

impl MemberFacts {
    /// Who may race under the synchronous settings.
    pub fn sync_rule(&self) -> SyncRule {
        match (self.synchronous_mode, self.quorum_commit) {
            (false, _) => SyncRule::Off,
            (true, false) => SyncRule::Listed,
            (true, true) => SyncRule::Quorum,
        }
    }

    /// Defaults for a member named `name`.
    pub fn named(name: &str) -> Self {
        MemberFacts {
            name: name.to_owned(),
            nofailover: false,
            failover_priority: 1,
            maximum_lag_on_failover: 1_048_576,
            use_pg_rewind: true,
            synchronous_mode: false,
            quorum_commit: false,
            standby_cluster: false,
            replicatefrom: None,
            failsafe_mode: false,
            api_url: String::new(),
            replica_without_leader: false,
            check_timeline: false,
        }
    }
}

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFrom {
    /// A member of this cluster (its leader).
    Member(String),
    /// The source cluster named by `standby_cluster` (the standby leader's upstream).
    StandbySource,
}

impl StreamFrom {
    pub fn member(name: &str) -> Self {
        StreamFrom::Member(name.to_owned())
    }
}

impl fmt::Display for StreamFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamFrom::Member(name) => write!(f, "{name}"),
            StreamFrom::StandbySource => write!(f, "the standby_cluster source"),
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
    /// Delete `initialize` after a failed bootstrap (our own claim).
    CancelInitialize,
    /// Delete an abandoned bootstrap claim, only if `initialize` is still at this revision:
    /// another member may have withdrawn it and claimed anew meanwhile.
    WithdrawBootstrapClaim(i64),
    /// Write `config` from `bootstrap.dcs` if it is absent.
    SeedConfig,
    /// Create `leader` if absent, then confirm the lease and arm the fence; losing stops the plan.
    AcquireLeader,
    /// Delete `leader` if it still names us.
    ReleaseLeader,
    /// Run initdb and the first start in the background.
    StartBootstrap,
    /// Clone the leader (or, bootstrapping a standby cluster, its source) in the background
    /// with the replica creation methods, then start as its replica.
    StartCreateReplica { from: StreamFrom },
    /// Create this empty member with the replica methods marked `no_leader` (from a backup),
    /// in the background, while no leader runs; it then starts as a standby without upstream.
    StartCreateReplicaWithoutLeader,
    /// Rewind the former primary against the named leader in the background.
    StartRewind { leader: String },
    /// Start postgres as a primary, or as a standby following `upstream` (`None`: read-only
    /// with no upstream).
    StartPostgres {
        primary: bool,
        upstream: Option<StreamFrom>,
    },
    /// Render the configuration for the running postgres (a primary when `upstream` is `None`,
    /// else a standby of that upstream) and reload if anything changed: follows a new leader
    /// without a restart and applies changed parameters.
    ApplyConfig { upstream: Option<StreamFrom> },
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
    /// Publish the `failsafe` topology (every member's API URL, ours included).
    WriteFailsafe,
    /// Keep a physical replication slot for every other member, drop slots of departed ones,
    /// keep the permanent slots (logical ones: created on the primary, copied to and advanced
    /// on replicas; see `ha::slots`).
    SyncSlots,
    /// Maintain `synchronous_standby_names` and the `sync` key (see `ha::sync`).
    ManageSync,
    /// Synchronous mode, before postgres opens for writes: record `sync` as
    /// `{leader: me, sync_standby: null}` (compare-and-set) unless it already names us. Until
    /// then the previous leader and its standbys stay eligible in `sync`, although they may
    /// lack the writes our standbys acknowledge once we are primary.
    ClaimSync,
    /// Synchronous mode off, before postgres opens for writes: delete a `sync` key left from
    /// when it was on (compare-and-set), as Patroni's new leader does. Left in place, it would
    /// bind the next race to a leader and standbys recorded before writes this primary
    /// acknowledges without them, once synchronous mode is switched on again (simulation seed
    /// 1797800002584: the primary froze right after its promotion, and with the stale key
    /// naming a member that could not race, nobody could take over).
    DropSync,
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
                | Action::WriteFailsafe
                | Action::DropSync
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
    let bootstrapping = done.iter().any(|a| {
        matches!(
            a,
            Action::StartBootstrap
                | Action::StartCreateReplica {
                    from: StreamFrom::StandbySource
                }
        )
    });
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
    /// Failsafe mode: the leader named here said within `ttl` (`POST /failsafe`) that it runs,
    /// although the DCS shows no leader key.
    FailsafeLeaderAlive(String),
    /// Failsafe mode: the published `failsafe` topology does not name this member.
    NotInFailsafeTopology,
    /// `check_timeline`: our timeline (unknown: `None`) is behind the cluster's.
    TimelineBehind {
        mine: Option<u32>,
        cluster: u32,
    },
    /// Quorum commit: fewer members of `sync` than its `quorum` said they are not ahead.
    QuorumNotReached {
        votes: i64,
        quorum: u32,
    },
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
            NotEligible::FailsafeLeaderAlive(n) => write!(
                f,
                "failsafe mode: the leader {n} confirmed within ttl that it runs (POST /failsafe)"
            ),
            NotEligible::TimelineBehind { mine, cluster } => write!(
                f,
                "check_timeline: my timeline {} is behind the last known cluster timeline {cluster}",
                mine.map_or("(unknown)".to_owned(), |t| t.to_string())
            ),
            NotEligible::QuorumNotReached { votes, quorum } => write!(
                f,
                "quorum commit: {} vote(s) from the members in `sync`, {quorum} needed",
                (*votes).max(0)
            ),
            NotEligible::NotInFailsafeTopology => {
                write!(f, "failsafe mode: the `failsafe` key does not name this member")
            }
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
    DcsUnknownHolding {
        reason: String,
    },
    DcsUnknownDemoting {
        reason: String,
    },
    DcsUnknownWaiting {
        reason: String,
    },
    /// The DCS is out of reach, and every member of the failsafe topology accepted our
    /// `POST /failsafe`.
    FailsafeHolding {
        reason: String,
    },
    TryingToBootstrap,
    BootstrappingStandbyLeader,
    WaitingForBootstrap,
    WithdrawingAbandonedBootstrapClaim,
    CloningWithoutLeader,
    CloningLeader {
        leader: String,
    },
    WaitingForLeaderAddress {
        leader: String,
    },
    LeaderHealthy,
    StandbyLeaderHealthy,
    StandbyLeaderStarting,
    DemotingToStandbyLeader,
    LeaderPromoting,
    LeaderStartingPostgres {
        after_crash: bool,
    },
    LeaderWaitingForPostgres,
    LeaderStartingReadOnly,
    LeaderStartFailed(String),
    PrimaryStartTimedOut,
    LeaseUnconfirmed,
    LostLock,
    DemotingForOtherLeader {
        leader: String,
    },
    RewindingToFollow {
        leader: String,
    },
    WaitingForLeaderCheckpoint {
        leader: String,
    },
    DivergedFromLeader {
        leader: String,
    },
    RestartingForPrimarySettings {
        leader: String,
    },
    StartingAsReplica {
        leader: String,
    },
    FollowingLeader {
        leader: String,
    },
    NoLeaderRacing,
    NoLeaderStartingReadOnly,
    SwitchoverDemoting {
        candidate: Option<String>,
    },
    SwitchoverScheduled {
        at: String,
    },
    SwitchoverAborted(String),
    DeferringToCandidate {
        candidate: String,
    },
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
            Outcome::FailsafeHolding { reason } => write!(
                f,
                "DCS is not accessible ({reason}); continuing to run as the leader because failsafe mode is enabled and all members are accessible"
            ),
            Outcome::DcsUnknownDemoting { reason } => write!(
                f,
                "DCS is not accessible ({reason}) and this member does not hold the leader lock; demoting"
            ),
            Outcome::DcsUnknownWaiting { reason } => {
                write!(f, "DCS is not accessible ({reason}); waiting")
            }
            Outcome::TryingToBootstrap => write!(f, "trying to bootstrap a new cluster"),
            Outcome::BootstrappingStandbyLeader => write!(
                f,
                "trying to bootstrap a new standby leader: cloning the standby_cluster source"
            ),
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
            Outcome::CloningWithoutLeader => write!(
                f,
                "no leader: creating a replica with a replica method marked no_leader"
            ),
            Outcome::WaitingForLeaderAddress { leader } => {
                write!(f, "waiting for the leader {leader} to publish its address")
            }
            Outcome::LeaderHealthy => write!(f, "no action: I am the leader with the lock"),
            Outcome::StandbyLeaderHealthy => write!(
                f,
                "no action: I am the standby leader with the lock, following the standby_cluster source"
            ),
            Outcome::StandbyLeaderStarting => write!(
                f,
                "starting as a standby leader because I hold the lock in a standby cluster"
            ),
            Outcome::DemotingToStandbyLeader => write!(
                f,
                "cannot be a real primary in a standby cluster: restarting as the standby leader"
            ),
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

/// A member's state while it clones; with no leader, that is the first member of a standby
/// cluster cloning the source (its bootstrap).
pub const CREATING_REPLICA_STATE: &str = "creating replica";

/// `initialize` claims a bootstrap that has not finished (no system identifier yet), no member
/// holds `leader` and no member says it is bootstrapping: the loop times how long this lasts
/// (`Observation::bootstrap_claim_abandoned`). The leader lock is taken only after the bootstrap
/// (as Patroni does), so a slow initdb or restore must not count as abandoned while its member
/// keeps a record saying so: that record vanishes with the member's lease when it dies, and
/// only then may another member withdraw the claim and bootstrap (never two at once).
/// Returns the claim's revision: a claim withdrawn and made anew (by the same member or
/// another) is a new claim, timed from scratch (simulation seed 1796600013456).
pub fn unfinished_bootstrap_claim_without_leader(view: &ClusterView) -> Option<i64> {
    let claim = view.initialize.as_ref().filter(|i| !is_sysid(&i.value))?;
    let bootstrapping = view.members.iter().any(|m| {
        BOOTSTRAPPING_STATES.contains(&m.record.state.as_str())
            || m.record.state == CREATING_REPLICA_STATE
    });
    (view.leader.is_none() && !bootstrapping).then_some(claim.revision)
}

/// Decides what to do this cycle.
pub fn decide(obs: &Observation, me: &MemberFacts) -> Decision {
    let mut decision = decide_inner(obs, me);
    let opens = decision.actions.iter().position(|a| {
        matches!(
            a,
            Action::Promote | Action::StartPostgres { primary: true, .. }
        )
    });
    let stale_sync = matches!(&obs.dcs, DcsView::Known(v) if v.sync.is_some());
    match opens {
        // A new primary claims `sync` first (simulation seed 641023133062, 3 members: a
        // promoted leader acknowledged writes through an unrecorded standby, died, and the old
        // leader, still named in `sync`, took over without them).
        Some(i) if me.synchronous_mode => decision.actions.insert(i, Action::ClaimSync),
        Some(i) if stale_sync => decision.actions.insert(i, Action::DropSync),
        _ => {}
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
            let primary = obs.postgres.is_writable_primary();
            let outcome = if primary && obs.failsafe_held {
                Outcome::FailsafeHolding {
                    reason: reason.clone(),
                }
            } else if primary
                && matches!(obs.lease, LeaseCheck::NotHeld)
                && !obs.paused_when_last_seen
            {
                // No lease of ours arms the fence (the lock was lost, or its acquisition was
                // never confirmed before the DCS went away), so nothing else would stop this
                // primary while another member takes the key: demote now, as Patroni does
                // when the DCS is not accessible. Found by the failsafe e2e test: etcd cut
                // between acquiring the key and confirming the lease.
                return Decision::new(
                    Outcome::DcsUnknownDemoting {
                        reason: reason.clone(),
                    },
                    vec![Action::StopPostgres(StopMode::Immediate)],
                );
            } else if primary {
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
    if let (Some(ours), Some(cluster)) = (obs.data_dir.system_identifier(), view.initialize_value())
    {
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
            } else if me.standby_cluster {
                // Patroni's `bootstrap_standby_leader`: the first member clones the source
                // instead of running initdb, and takes the lock once it has data.
                Decision::new(
                    Outcome::BootstrappingStandbyLeader,
                    vec![
                        Action::RaceInitialize(String::new()),
                        Action::StartCreateReplica {
                            from: StreamFrom::StandbySource,
                        },
                    ],
                )
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
        (DataDir::Empty, None) if obs.bootstrap_claim_abandoned && !me.nofailover => {
            match unfinished_bootstrap_claim_without_leader(view) {
                Some(revision) => Decision::new(
                    Outcome::WithdrawingAbandonedBootstrapClaim,
                    vec![Action::WithdrawBootstrapClaim(revision)],
                ),
                None => Decision::new(Outcome::WaitingForBootstrap, vec![]),
            }
        }
        // Patroni's "bootstrap (without leader)": the cluster exists (or this member may not
        // bootstrap it) and a method can create the replica from a backup; never while
        // another member is bootstrapping (`initialize` claimed but not yet a system id).
        (DataDir::Empty, None)
            if me.replica_without_leader && view.initialize_value() != Some("") =>
        {
            Decision::new(
                Outcome::CloningWithoutLeader,
                vec![Action::StartCreateReplicaWithoutLeader],
            )
        }
        (DataDir::Empty, None) => Decision::new(Outcome::WaitingForBootstrap, vec![]),
        (DataDir::Empty, Some(l)) if l == me.name => {
            // We hold the key but have no data (the bootstrap task is gone, or it never started
            // because the lease could not be confirmed): give it back, and if `initialize` is
            // still our empty claim, withdraw it too, or every member waits for a bootstrap
            // that nobody runs (Patroni's `cancel_initialization` after a failed take_leader).
            let mut actions = Vec::new();
            if view.initialize_value().is_some_and(|i| !is_sysid(i)) {
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
                    vec![Action::StartCreateReplica {
                        from: StreamFrom::Member(topology::clone_source(view, l, &me.name)),
                    }],
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
