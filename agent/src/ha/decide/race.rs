//! The leader race: nobody holds the lock. Who may take over (the one eligibility rule,
//! [`may_take_over`]) and whether we are the healthiest candidate (Patroni
//! `is_healthiest_node`, `is_failover_possible`).

use crate::dcs::ClusterView;
use crate::postgres::supervisor::StopMode;

use super::{Action, Decision, MemberFacts, NotEligible, Outcome, StreamFrom, SyncRule};
use crate::ha::observe::{Observation, PeerAnswer, PostgresView};

/// The WAL position a member races with: a running standby's received or replayed position,
/// a stopped former primary's last checkpoint. `None` for a running primary (its own writes
/// are the newest) and for anything else.
pub fn racing_position(obs: &Observation) -> Option<u64> {
    match &obs.postgres {
        PostgresView::Running(s) if s.in_recovery => s.wal_position(),
        PostgresView::Down | PostgresView::Crashed | PostgresView::StartFailed(_)
            if obs.data_dir.was_primary() =>
        {
            obs.data_dir.checkpoint_lsn()
        }
        _ => None,
    }
}

/// Has the last leader position (`status`) moved beyond `maximum_lag` ahead of `position`?
/// Checked again on a fresh view once the lock is won: the race was decided on an observation
/// that may be old (simulation seed 1796900006320: an agent frozen for 40 s between observing
/// and racing won the lock while another leader had come, written and died meanwhile).
pub fn lagging_on(view: &ClusterView, position: u64, maximum_lag: u64) -> Option<u64> {
    let lag = view.status.as_ref()?.optime.saturating_sub(position);
    (lag > maximum_lag).then_some(lag)
}

/// Patroni's `is_healthiest_node` (§5.5 steps 10–12) on what observe gathered.
fn healthiest(
    view: &ClusterView,
    me: &MemberFacts,
    my_timeline: Option<u32>,
    my_position: u64,
    peers: &[PeerAnswer],
    wall_now: chrono::DateTime<chrono::Utc>,
    former_primary: bool,
) -> Result<(), NotEligible> {
    // Without a `sync` key only the former primary is known to have every acknowledged write.
    let rule = me.sync_rule();
    let sync_key_lost = rule != SyncRule::Off && view.sync.is_none();
    let may_race = super::sync::may_race(rule, &me.name, view) || (former_primary && sync_key_lost);
    if !may_race {
        return Err(NotEligible::NotSynchronous);
    }
    // Patroni's `check_timeline`: the cluster is on the timeline after the last `history`
    // line; a member that has not reached it lacks that timeline's writes.
    if let Some(last) = view.history.last().filter(|_| me.check_timeline) {
        let cluster = last.timeline.saturating_add(1);
        if my_timeline.is_none_or(|mine| mine < cluster) {
            return Err(NotEligible::TimelineBehind {
                mine: my_timeline,
                cluster,
            });
        }
    }
    // Patroni §5.5 step 8: a member the leader did not ask in its failsafe rounds may have
    // missed that the leader still runs.
    if outside_failsafe_topology(view, me, &me.name) {
        return Err(NotEligible::NotInFailsafeTopology);
    }
    if let Some(lag) = lagging_on(view, my_position, me.maximum_lag_on_failover) {
        return Err(NotEligible::Lagging {
            lag,
            maximum: me.maximum_lag_on_failover,
        });
    }
    let former = handed_over(view, wall_now);
    // Quorum commit (Patroni's `is_healthiest_node`): the members `sync` names, its leader
    // included, vote; one at or behind us says we have what it acknowledged. `sync.quorum`
    // votes (ours counted when we are one of them) find every acknowledged write.
    let quorum = match (rule, view.sync.as_ref()) {
        (SyncRule::Quorum, Some(key)) => Some(&key.value),
        _ => None,
    };
    for peer in peers {
        let Some(p) = &peer.status else { continue };
        if !p.is_primary && former == Some(peer.name.as_str()) {
            continue;
        }
        // In synchronous mode only the recorded synchronous standby may take over (Patroni's
        // `is_healthiest_node` filters the candidates by `sync`): deferring to a member that
        // may not race would leave the cluster without a leader. With quorum commit only the
        // members of `sync` are asked.
        let counted = match quorum {
            Some(key) => key.names(&peer.name),
            None => super::sync::may_race(rule, &peer.name, view),
        };
        if !p.is_primary && !counted {
            continue;
        }
        if p.nofailover && !p.is_primary {
            // Patroni ignores nofailover members' answers, except that a live primary is
            // always a reason not to race.
            continue;
        }
        // Nor does a member outside the failsafe topology count (it may not race, above):
        // Patroni defers to it when it is ahead, and then nobody takes over until a leader
        // rewrites the topology (simulation seed 98 with failsafe mode: the only leader that
        // could have done so had crashed).
        if outside_failsafe_topology(view, me, &peer.name) && !p.is_primary {
            continue;
        }
        if p.is_primary {
            return Err(NotEligible::PrimaryStillAlive(p.name.clone()));
        }
        if p.watchdog_failed {
            continue;
        }
        let sync_leader = quorum.is_some_and(|k| k.leader_is(&peer.name));
        if p.wal_position > my_position {
            // The former leader may still answer, ahead of us: it is not racing.
            if sync_leader {
                continue;
            }
            return Err(NotEligible::PeerAhead(p.name.clone()));
        }
        if p.wal_position == my_position
            && p.failover_priority > me.failover_priority
            && !sync_leader
        {
            return Err(NotEligible::PeerHigherPriority(p.name.clone()));
        }
    }
    quorum_votes(view, me, my_position, peers)
}

/// With quorum commit, whether the members of `sync` that answered prove that a member at
/// `my_position` has every acknowledged write: none of them but the former leader is ahead,
/// and `sync.quorum` of them (us included when listed) are at or behind it.
fn quorum_votes(
    view: &ClusterView,
    me: &MemberFacts,
    my_position: u64,
    peers: &[PeerAnswer],
) -> Result<(), NotEligible> {
    let (SyncRule::Quorum, Some(key)) = (me.sync_rule(), view.sync.as_ref().map(|k| &k.value))
    else {
        return Ok(());
    };
    let mut votes: i64 = if key.names(&me.name) { 0 } else { -1 };
    let mut former_leader_ahead = false;
    for p in peers.iter().filter_map(|p| p.status.as_ref()) {
        if !key.names(&p.name) || !able_to_take_over(p) || p.is_primary {
            continue;
        }
        if p.wal_position > my_position {
            if key.leader_is(&p.name) {
                former_leader_ahead = true;
                continue;
            }
            return Err(NotEligible::PeerAhead(p.name.clone()));
        }
        if p.wal_position > 0 {
            votes += 1;
        }
    }
    let former_leader_unopposed = key.leader_is(&me.name) && !former_leader_ahead;
    if !former_leader_unopposed && votes < i64::from(key.quorum) {
        return Err(NotEligible::QuorumNotReached {
            votes,
            quorum: key.quorum,
        });
    }
    Ok(())
}

/// Could another member take the lock: a running replica that may race, is not tagged
/// `nofailover` and is within `maximum_lag_on_failover` of the last leader position (Patroni's
/// `is_failover_possible`)? A lagging replica may not race, so deferring to it left a cluster
/// without a leader (simulation seed 1796307428762).
/// In failsafe mode a member outside a non-empty `failsafe` topology may not race either
/// (simulation seed 1797000001206: the former leader deferred to such a member for good).
pub(super) fn others_may_take_over(
    view: &ClusterView,
    me: &MemberFacts,
    peers: &[PeerAnswer],
) -> bool {
    let racers: Vec<PeerAnswer> = peers
        .iter()
        .filter(|p| !outside_failsafe_topology(view, me, &p.name))
        .cloned()
        .collect();
    someone_else_may_take_over(
        view,
        &me.name,
        &racers,
        me.sync_rule(),
        me.maximum_lag_on_failover,
    )
}

/// Failsafe mode is on and the `failsafe` topology, not empty, does not name `name`: that
/// member may not win a race (Patroni §5.5 step 8).
fn outside_failsafe_topology(view: &ClusterView, me: &MemberFacts, name: &str) -> bool {
    me.failsafe_mode
        && view
            .failsafe
            .as_ref()
            .is_some_and(|t| !t.is_empty() && !t.contains_key(name))
}

/// Could any member but `me` take the lock on these answers ([`may_take_over`])? Asked by the
/// crash release (`crate::run::release_dead_leader`): releasing the record of a leader nobody
/// can replace would only stop its own agent, restarted, from resuming.
pub fn someone_else_may_take_over(
    view: &ClusterView,
    me: &str,
    peers: &[PeerAnswer],
    rule: SyncRule,
    maximum_lag: u64,
) -> bool {
    let last_position = view.status.as_ref().map_or(0, |s| s.optime);
    let able = peers
        .iter()
        .filter(|p| may_take_over(p, me, view, rule, last_position, maximum_lag))
        .count();
    able > quorum_of(rule, view)
}

/// With quorum commit, how many candidates besides the one racing must be able to vote
/// (Patroni's `is_failover_possible`: `sync.quorum`); 0 otherwise.
pub(super) fn quorum_of(rule: SyncRule, view: &ClusterView) -> usize {
    match (rule, view.sync.as_ref()) {
        (SyncRule::Quorum, Some(key)) => usize::try_from(key.value.quorum).unwrap_or(usize::MAX),
        _ => 0,
    }
}

/// The one eligibility rule for another member taking the lock (Patroni's
/// `is_failover_possible`): not `me`, allowed to race (in synchronous mode and with quorum
/// commit: listed in `sync`),
/// able to take over ([`able_to_take_over`]), a standby, and within `maximum_lag` of
/// `last_position`.
pub(super) fn may_take_over(
    p: &PeerAnswer,
    me: &str,
    view: &ClusterView,
    rule: SyncRule,
    last_position: u64,
    maximum_lag: u64,
) -> bool {
    // With quorum commit the candidates are the standbys `sync` lists, as in Patroni (another
    // member may gather the votes too, but is not counted on).
    let candidate = match rule {
        SyncRule::Quorum => view.sync.as_ref().is_some_and(|k| k.value.lists(&p.name)),
        _ => super::sync::may_race(rule, &p.name, view),
    };
    p.name != me
        && candidate
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

/// What a running standby does once it holds the lock: promote, or in a standby cluster
/// follow the source as the new standby leader (Patroni's `enforce_follow_remote_member`).
fn take_over(me: &MemberFacts) -> Action {
    if me.standby_cluster {
        Action::ApplyConfig {
            upstream: Some(StreamFrom::StandbySource),
        }
    } else {
        Action::Promote
    }
}

pub(super) fn decide_without_leader(
    obs: &Observation,
    view: &ClusterView,
    me: &MemberFacts,
) -> Decision {
    let mut decision = race(obs, view, me);
    // A primary that does not race for the free key demotes (Patroni: "demoting self because
    // i am not the healthiest node"): the others do not race while a primary answers, and
    // nothing would ever fence it. Simulation seed 1797100002513 (failsafe mode): a failsafe
    // leader whose key expired deferred to a manual failover's candidate and ran on, unfenced,
    // until the candidate promoted beside it.
    let races = decision.actions.contains(&Action::AcquireLeader);
    let stops = decision
        .actions
        .iter()
        .any(|a| matches!(a, Action::StopPostgres(_)));
    if obs.postgres.is_writable_primary() && !view.is_paused() && !races && !stops {
        decision
            .actions
            .push(Action::StopPostgres(StopMode::Immediate));
    }
    decision
}

fn race(obs: &Observation, view: &ClusterView, me: &MemberFacts) -> Decision {
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
    if let Some(leader) = obs.failsafe_leader.as_ref().filter(|l| **l != me.name) {
        // Patroni puts this leader back into the view; it still runs as primary, so nothing
        // may race for its key (its fence is what ends it if it stops asking).
        if !obs.postgres.is_writable_primary() {
            return Decision::new(
                Outcome::NoLeaderNotEligible(NotEligible::FailsafeLeaderAlive(leader.clone())),
                vec![],
            );
        }
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
                // The named candidate takes over without the lag and peer checks (§5.6). With
                // quorum commit, only once the votes prove it has every acknowledged write:
                // the leader that was to hand over may have died first. Otherwise the request
                // is dropped and everyone races (nobody would take over while others wait for
                // this candidate).
                Some(c) if c == me.name && running_replica => {
                    // Not while another member still answers as a primary: a leader whose key
                    // expired while it ran on failsafe mode's word may still take writes
                    // (simulation seed 1797400005486, in pause, where it is left running).
                    let primary = peers
                        .iter()
                        .filter_map(|p| p.status.as_ref())
                        .find(|p| p.is_primary && p.name != me.name);
                    if let Some(p) = primary {
                        return Decision::new(
                            Outcome::NoLeaderNotEligible(NotEligible::PrimaryStillAlive(
                                p.name.clone(),
                            )),
                            vec![],
                        );
                    }
                    let position = racing_position(obs).unwrap_or(0);
                    if let Err(why) = quorum_votes(view, me, position, peers) {
                        return Decision::new(
                            Outcome::NoLeaderNotEligible(why),
                            vec![Action::ClearFailover],
                        );
                    }
                    return Decision::new(
                        Outcome::TakingOverAsCandidate,
                        vec![
                            Action::AcquireLeader,
                            take_over(me),
                            Action::SyncSlots,
                            Action::ClearFailover,
                        ],
                    );
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
                // Still running as primary (the request came while it was cut off from the
                // DCS, and its key expired), it demotes: `decide_without_leader` (simulation
                // seed 414993956585, failsafe mode).
                return Decision::new(
                    Outcome::NoLeaderNotEligible(NotEligible::FormerLeaderInSwitchover),
                    vec![],
                );
            }
        }
    }
    // Patroni's pause.rst: "If there is no leader lock in the cluster, the running primary
    // acquires the lock" — which also arms its fence again. Left without it, a paused primary
    // that had lost its key ran unfenced; resumed while it could not see the DCS, it kept
    // running while another member promoted (simulation seed 1797300003792, failsafe mode).
    if view.is_paused() && !obs.postgres.is_writable_primary() {
        return Decision::new(Outcome::NoLeaderNotEligible(NotEligible::Paused), vec![]);
    }
    match &obs.postgres {
        // A running primary (our agent restarted) takes the lock without asking peers
        // (Patroni §5.5 step 4).
        PostgresView::Running(s) if !s.in_recovery => {
            Decision::new(Outcome::NoLeaderRacing, vec![Action::AcquireLeader])
        }
        PostgresView::Running(s) => {
            let position = racing_position(obs).unwrap_or(0);
            match healthiest(view, me, s.timeline, position, peers, obs.wall_now, false) {
                Ok(()) => Decision::new(
                    Outcome::NoLeaderRacing,
                    vec![Action::AcquireLeader, take_over(me), Action::SyncSlots],
                ),
                Err(why) => Decision::new(Outcome::NoLeaderNotEligible(why), vec![]),
            }
        }
        // A stopped former primary is the most advanced copy unless a peer says otherwise: the
        // lock comes first, so it is never opened for writes without holding the key.
        PostgresView::Down | PostgresView::Crashed | PostgresView::StartFailed(_)
            if obs.data_dir.was_primary() =>
        {
            let position = racing_position(obs).unwrap_or(0);
            let timeline = match &obs.data_dir {
                crate::ha::observe::DataDir::Initialized { control, .. } => control.timeline,
                _ => None,
            };
            match healthiest(view, me, timeline, position, peers, obs.wall_now, true) {
                Ok(()) => Decision::new(
                    Outcome::NoLeaderRacing,
                    vec![
                        Action::AcquireLeader,
                        if me.standby_cluster {
                            Action::StartPostgres {
                                primary: false,
                                upstream: Some(StreamFrom::StandbySource),
                            }
                        } else {
                            Action::StartPostgres {
                                primary: true,
                                upstream: None,
                            }
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
