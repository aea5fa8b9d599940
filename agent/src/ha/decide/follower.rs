//! The follower's side of the decision: another member holds the lock, so follow it (clone,
//! rewind or restart as a standby as needed) and demote if we run as a primary.

use crate::dcs::ClusterView;
use crate::postgres::supervisor::StopMode;

use super::{topology, Action, Decision, MemberFacts, Outcome, StreamFrom};
use crate::ha::observe::{DataDir, Observation, PostgresView};

pub(super) fn decide_with_other_leader(
    obs: &Observation,
    view: &ClusterView,
    me: &MemberFacts,
    leader: &str,
) -> Decision {
    // Where this member streams from: the leader, or the member its `replicatefrom` names.
    let upstream = StreamFrom::Member(topology::upstream_of(
        view,
        leader,
        &me.name,
        me.replicatefrom.as_deref(),
    ));
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
            // A standby cluster records no `history` (its timelines are the source's): the
            // divergence rules below read it, so they do not apply there.
            let diverged = match &obs.data_dir {
                _ if me.standby_cluster => false,
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
                        upstream: Some(upstream),
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
                && !me.standby_cluster
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
            // SyncSlots: the slots of the members that cascade from this one, and the copies of
            // the permanent logical slots.
            vec![
                Action::ApplyConfig {
                    upstream: Some(upstream),
                },
                Action::SyncSlots,
            ],
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
