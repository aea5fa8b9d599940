//! The lock holder's side of the decision (Patroni `process_healthy_cluster` with our own
//! lock): keep or release the lock, restart a crashed primary, hand over on a `failover` key.

use crate::dcs::ClusterView;
use crate::postgres::supervisor::StopMode;

use super::race::{may_take_over, others_may_take_over, quorum_of};
use super::{is_sysid, Action, Decision, MemberFacts, Outcome, StreamFrom, SyncRule};
use crate::ha::observe::{LeaseCheck, Observation, PeerAnswer, PostgresView};

pub(super) fn decide_as_lock_holder(
    obs: &Observation,
    view: &ClusterView,
    me: &MemberFacts,
    sysid: &str,
) -> Decision {
    let paused = view.is_paused();
    if paused && me.standby_cluster && !matches!(obs.lease, LeaseCheck::Lost) {
        // Patroni keeps a paused standby leader's lock whatever its postgres does: nothing is
        // promoted in a standby cluster, so there is nothing to hand over.
        return Decision::new(
            Outcome::PausedNoAction("standby leader; postgres is left as it is".into()),
            vec![],
        );
    }
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
        LeaseCheck::Unconfirmed if obs.failsafe_held => {
            return Decision::new(
                Outcome::FailsafeHolding {
                    reason: "the lease renewal was not answered".into(),
                },
                vec![],
            )
        }
        LeaseCheck::Unconfirmed => return Decision::new(Outcome::LeaseUnconfirmed, vec![]),
        LeaseCheck::Renewed(_) | LeaseCheck::NotHeld => {}
    }
    let mut housekeeping = Vec::new();
    if !view.initialize_value().is_some_and(is_sysid) {
        housekeeping.push(Action::SetInitialize(sysid.to_owned()));
    }
    if view.config.is_none() {
        housekeeping.push(Action::SeedConfig);
    }
    if me.failsafe_mode
        && view.failsafe.as_ref()
            != Some(&crate::ha::failsafe::topology(view, &me.name, &me.api_url))
    {
        housekeeping.push(Action::WriteFailsafe);
    }
    if let (PostgresView::Running(status), Some(request)) = (&obs.postgres, &view.failover) {
        // A standby leader hands over too (a switchover inside the standby cluster).
        if !status.in_recovery || me.standby_cluster {
            if let Some(decision) = leader_handles_failover(
                obs,
                view,
                &request.value,
                status,
                me.maximum_lag_on_failover,
                me.sync_rule(),
            ) {
                // A switchover requested right after our promotion may be handled before any
                // healthy cycle ran: record our timeline switch first, or `history` would
                // lose who led it.
                let mut decision = decision;
                if history_outdated(view, status, obs.history_recorded_for) {
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
    if me.standby_cluster {
        let mut decision = decide_as_standby_leader(obs);
        decision.actions.extend(housekeeping);
        return decision;
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
            if history_outdated(view, status, obs.history_recorded_for) {
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

/// The lock holder of a standby cluster (Patroni's `enforce_follow_remote_member`): it runs as
/// a standby of the `standby_cluster` source and is never promoted; a primary (the section was
/// just added) is stopped and comes back as that standby, keeping the lock.
fn decide_as_standby_leader(obs: &Observation) -> Decision {
    let follow_source = || Some(StreamFrom::StandbySource);
    match &obs.postgres {
        PostgresView::Running(status) if !status.in_recovery => Decision::new(
            Outcome::DemotingToStandbyLeader,
            vec![Action::StopPostgres(StopMode::Fast)],
        ),
        PostgresView::Running(_) => Decision::new(
            Outcome::StandbyLeaderHealthy,
            vec![
                Action::WriteStatus,
                Action::ApplyConfig {
                    upstream: follow_source(),
                },
                Action::SyncSlots,
            ],
        ),
        PostgresView::Down | PostgresView::Crashed => Decision::new(
            Outcome::StandbyLeaderStarting,
            vec![Action::StartPostgres {
                primary: false,
                upstream: follow_source(),
            }],
        ),
        PostgresView::Starting | PostgresView::Unresponsive => {
            Decision::new(Outcome::LeaderWaitingForPostgres, vec![])
        }
        PostgresView::StartFailed(reason) => Decision::new(
            Outcome::LeaderStartFailed(reason.clone()),
            vec![Action::ReleaseLeader],
        ),
    }
}

/// Patroni records history when its last line is not the timeline before ours.
/// Does `history` still miss our timeline's lineage? Its last line is normally the switch from
/// the timeline before ours, but timeline numbers may skip (a branch that died took the next
/// one): once this agent has written its lineage for the timeline, only a lost key is outdated.
fn history_outdated(
    view: &ClusterView,
    status: &crate::state::PostgresStatus,
    recorded_for: Option<u32>,
) -> bool {
    let recorded = view.history.last().map(|l| l.timeline);
    status.timeline.filter(|t| *t > 1).is_some_and(|tl| {
        view.history.is_empty() || (recorded != Some(tl - 1) && recorded_for != Some(tl))
    })
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
    rule: SyncRule,
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
    // A standby leader's position is what it received from the source.
    let optime = status
        .wal_flush_lsn
        .or_else(|| status.wal_position())
        .unwrap_or(0);
    let peers = obs.peers.as_deref().unwrap_or_default();
    // In synchronous mode only a synchronous standby can take over: handing over to another
    // one would leave nobody allowed to race, and the old leader would take the lock back and
    // hand over again, forever (simulation seed 4020, 3 members).
    let healthy = |p: &PeerAnswer| {
        may_take_over(p, me, view, rule, optime, maximum_lag)
            // A standby still on an older timeline (a demoted leader that has not streamed
            // from us yet) would promote to a timeline ID we already use: two histories under
            // one number, and nobody could follow it.
            && p.status
                .as_ref()
                .is_some_and(|s| !behind_on_timeline(s.timeline, status.timeline))
    };
    let candidate_ok = match &request.member {
        Some(candidate) => peers.iter().any(|p| &p.name == candidate && healthy(p)),
        // With quorum commit the one who races needs `sync.quorum` others' votes.
        None => peers.iter().filter(|p| healthy(p)).count() > quorum_of(rule, view),
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
    // A standby leader has no writes to flush; CHECKPOINT is for a primary's short shutdown.
    let checkpoint = (!status.in_recovery).then_some(Action::Checkpoint);
    Some(Decision::new(
        Outcome::SwitchoverDemoting {
            candidate: request.member.clone(),
        },
        checkpoint
            .into_iter()
            .chain([Action::StopPostgres(StopMode::Fast), Action::ReleaseLeader])
            .collect(),
    ))
}
