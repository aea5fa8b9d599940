//! Each test names the rule it checks and where Patroni states it.
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::dcs::{ClusterView, LeaderKey, LeaseRenewal, Member, MemberRecord, Versioned};
use crate::ha::observe::{LeaseCheck, PeerAnswer, PostgresView};
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
        synchronous_standby_names: None,
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
        initialize: initialize.map(|value| Versioned {
            value: value.to_owned(),
            revision: 1,
        }),
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

fn obs(dcs: DcsView, lease: LeaseCheck, data_dir: DataDir, postgres: PostgresView) -> Observation {
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
        history_recorded_for: None,
        bootstrap_claim_abandoned: false,
        primary_start_overdue: false,
        replay_paused_for_parameters: false,
        failsafe_leader: None,
        failsafe_held: false,
        paused_when_last_seen: false,
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
            v.initialize = Some(Versioned {
                value: initialize.to_owned(),
                revision: 17,
            });
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
    // Only the claim that was timed: a newer one (another revision) stays.
    assert_eq!(d.actions, vec![Action::WithdrawBootstrapClaim(17)]);
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
    let mut v = known(view(None, Some("")));
    assert_eq!(unfinished_bootstrap_claim_without_leader(&v), Some(1));
    v.members[1].record.state = "initializing new cluster".into();
    assert_eq!(unfinished_bootstrap_claim_without_leader(&v), None);
    v.members[1].record.state = "running custom bootstrap script".into();
    assert_eq!(unfinished_bootstrap_claim_without_leader(&v), None);
    v.members.remove(1);
    assert_eq!(unfinished_bootstrap_claim_without_leader(&v), Some(1));
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

/// A `failover` key as `patronictl switchover` (with `leader`) or `failover` writes it.
fn with_failover(dcs: DcsView, leader: Option<&str>, member: Option<&str>) -> DcsView {
    match dcs {
        DcsView::Known(v) => {
            let mut v = (*v).clone();
            v.failover = Some(Versioned {
                value: crate::dcs::FailoverRequest {
                    leader: leader.map(Into::into),
                    member: member.map(Into::into),
                    scheduled_at: None,
                },
                revision: 3,
            });
            DcsView::Known(Arc::new(v))
        }
        unknown => unknown,
    }
}

fn known(dcs: DcsView) -> ClusterView {
    match dcs {
        DcsView::Known(v) => (*v).clone(),
        DcsView::Unknown(_) => unreachable!("the test built a known view"),
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
            from: StreamFrom::member("pg1")
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
        vec![
            Action::ApplyConfig {
                upstream: Some(StreamFrom::member("pg2"))
            },
            Action::SyncSlots
        ]
    );
}

/// A view whose members carry these states and tags (`replicatefrom`, `clonefrom`).
fn tagged_view(leader: &str, members: &[(&str, &str, serde_json::Value)]) -> DcsView {
    let DcsView::Known(base) = view(Some(leader), Some(SYSID)) else {
        unreachable!("view() is known");
    };
    let mut v = (*base).clone();
    v.members = members
        .iter()
        .enumerate()
        .map(|(i, (name, state, tags))| {
            let mut m = member(name, 5000 + i as u16);
            m.record.state = (*state).to_owned();
            m.record.tags = tags.as_object().cloned().unwrap_or_default();
            m
        })
        .collect();
    DcsView::Known(Arc::new(v))
}

/// Patroni's `get_slot_name_on_primary`: a cascading member's feedback reaches the leader
/// through the slot of the chain's first member; a `nostream` link breaks the chain.
#[test]
fn the_slot_on_the_leader_of_a_cascading_member_is_its_chains_first() {
    use super::topology::slot_on_leader;
    use serde_json::json;
    let chain = tagged_view(
        "pg0",
        &[
            ("pg0", "running", json!({})),
            ("pg1", "running", json!({})),
            ("pg2", "running", json!({"replicatefrom": "pg1"})),
            ("pg3", "running", json!({"replicatefrom": "pg2"})),
        ],
    );
    let DcsView::Known(v) = &chain else {
        unreachable!()
    };
    assert_eq!(
        slot_on_leader(v, "pg0", "pg1", None, false).as_deref(),
        Some("pg1")
    );
    assert_eq!(
        slot_on_leader(v, "pg0", "pg3", Some("pg2"), false).as_deref(),
        Some("pg1")
    );
    assert_eq!(slot_on_leader(v, "pg0", "pg1", None, true), None);
    let broken = tagged_view(
        "pg0",
        &[
            ("pg0", "running", json!({})),
            ("pg1", "running", json!({"nostream": true})),
            ("pg2", "running", json!({"replicatefrom": "pg1"})),
        ],
    );
    let DcsView::Known(v) = &broken else {
        unreachable!()
    };
    assert_eq!(slot_on_leader(v, "pg0", "pg2", Some("pg1"), false), None);
}

/// Patroni's `should_enforce_hot_standby_feedback` below a member: a `nofailover` pg1 keeps
/// no logical slots, but pg2 cascading from it does (also through a `nofailover` pg3 in
/// between), so pg1 must pass its feedback on; a `nofailover` or `nostream` cascade does not.
#[test]
fn a_member_passes_on_feedback_when_a_member_below_it_keeps_logical_slots() {
    use super::topology::cascade_keeps_logical_slots;
    use serde_json::json;
    let keeps_below = |members: &[(&str, &str, serde_json::Value)]| {
        let DcsView::Known(v) = tagged_view("pg0", members) else {
            unreachable!()
        };
        cascade_keeps_logical_slots(&v, "pg0", "pg1")
    };
    let pg0 = ("pg0", "running", json!({}));
    let pg1 = ("pg1", "running", json!({"nofailover": true}));
    assert!(keeps_below(&[
        pg0.clone(),
        pg1.clone(),
        ("pg2", "running", json!({"replicatefrom": "pg1"})),
    ]));
    assert!(keeps_below(&[
        pg0.clone(),
        pg1.clone(),
        (
            "pg3",
            "running",
            json!({"replicatefrom": "pg1", "nofailover": true})
        ),
        ("pg2", "running", json!({"replicatefrom": "pg3"})),
    ]));
    assert!(!keeps_below(&[
        pg0.clone(),
        pg1.clone(),
        (
            "pg2",
            "running",
            json!({"replicatefrom": "pg1", "nofailover": true})
        ),
    ]));
    assert!(!keeps_below(&[
        pg0.clone(),
        pg1.clone(),
        (
            "pg2",
            "running",
            json!({"replicatefrom": "pg1", "nostream": true})
        ),
    ]));
    assert!(!keeps_below(&[pg0, pg1, ("pg2", "running", json!({})),]));
}

/// `replicatefrom`: a replica streams from the tagged member while it runs, from the leader
/// when it does not; the upstream keeps the slot, the leader does not.
#[test]
fn a_replicatefrom_member_cascades_while_its_upstream_runs() {
    use super::topology::{downstream_of, upstream_of};
    use serde_json::json;
    let running = tagged_view(
        "pg0",
        &[
            ("pg0", "running", json!({})),
            ("pg1", "running", json!({})),
            ("pg2", "running", json!({"replicatefrom": "pg1"})),
        ],
    );
    let mut facts = me();
    facts.name = "pg2".into();
    facts.replicatefrom = Some("pg1".into());
    let d = decide(
        &obs(
            running.clone(),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(10)),
        ),
        &facts,
    );
    assert_eq!(
        d.actions[0],
        Action::ApplyConfig {
            upstream: Some(StreamFrom::member("pg1"))
        }
    );
    let DcsView::Known(v) = &running else {
        unreachable!()
    };
    assert_eq!(
        downstream_of(v, "pg0", "pg0")
            .into_iter()
            .collect::<Vec<_>>(),
        ["pg1"]
    );
    assert_eq!(
        downstream_of(v, "pg0", "pg1")
            .into_iter()
            .collect::<Vec<_>>(),
        ["pg2"]
    );

    // The upstream is down: follow the leader, whose slot it is again.
    let stopped = tagged_view(
        "pg0",
        &[
            ("pg0", "running", json!({})),
            ("pg1", "stopped", json!({})),
            ("pg2", "running", json!({"replicatefrom": "pg1"})),
        ],
    );
    let d = decide(
        &obs(
            stopped.clone(),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(10)),
        ),
        &facts,
    );
    assert_eq!(
        d.actions[0],
        Action::ApplyConfig {
            upstream: Some(StreamFrom::member("pg0"))
        }
    );
    let DcsView::Known(v) = &stopped else {
        unreachable!()
    };
    assert!(downstream_of(v, "pg0", "pg0").contains("pg2"));

    // Two members naming each other: no loop, the named one follows the leader.
    let looped = tagged_view(
        "pg0",
        &[
            ("pg0", "running", json!({})),
            ("pg1", "running", json!({"replicatefrom": "pg2"})),
            ("pg2", "running", json!({"replicatefrom": "pg1"})),
        ],
    );
    let DcsView::Known(v) = &looped else {
        unreachable!()
    };
    assert_eq!(upstream_of(v, "pg0", "pg2", Some("pg1")), "pg0");
    assert_eq!(upstream_of(v, "pg0", "pg1", Some("pg2")), "pg0");
}

/// `clonefrom`: a new replica clones a running member tagged `clonefrom`, else the leader.
#[test]
fn a_new_replica_clones_from_a_running_clonefrom_member() {
    use serde_json::json;
    let mut facts = me();
    facts.name = "pg2".into();
    for (state, from) in [("running", "pg1"), ("stopped", "pg0")] {
        let v = tagged_view(
            "pg0",
            &[
                ("pg0", "running", json!({})),
                ("pg1", state, json!({"clonefrom": true})),
                ("pg2", "stopped", json!({})),
            ],
        );
        let d = decide(
            &obs(v, LeaseCheck::NotHeld, DataDir::Empty, PostgresView::Down),
            &facts,
        );
        assert_eq!(
            d.actions,
            vec![Action::StartCreateReplica {
                from: StreamFrom::member(from)
            }],
            "clonefrom member {state}"
        );
    }
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
            upstream: Some(StreamFrom::member("pg1"))
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
    let dcs = with_failover(paused(view(None, Some(SYSID))), None, Some("pg0"));
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
    let dcs = with_failover(view(Some("pg0"), Some(SYSID)), Some("pg0"), Some("pg1"));
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
    let dcs = with_failover(view(Some("pg0"), Some(SYSID)), None, Some("pg1"));
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

/// [`with_sync`] with quorum commit's `quorum`.
fn with_quorum(dcs: DcsView, leader: &str, voters: &str, quorum: u32) -> DcsView {
    match with_sync(dcs, leader, voters) {
        DcsView::Known(v) => {
            let mut v = (*v).clone();
            if let Some(s) = v.sync.as_mut() {
                s.value.quorum = quorum;
            }
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
    let with_request = |dcs: DcsView| with_failover(dcs, Some("pg0"), None);
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
    // Still a primary (the request came while it was cut off and its key expired): it
    // demotes, or the others, which do not race while a primary answers, never take over
    // (simulation seed 414993956585).
    let mut still_primary = obs(
        with_request(view(None, Some(SYSID))),
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(pg(false)),
    );
    still_primary.peers = Some(vec![peer("pg1", 100, false)]);
    let d = decide(&still_primary, &me());
    assert_eq!(
        d.outcome,
        Outcome::NoLeaderNotEligible(NotEligible::FormerLeaderInSwitchover)
    );
    assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Immediate)]);
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
    let dcs = with_failover(
        with_sync(view(Some("pg0"), Some(SYSID)), "pg0", "pg2"),
        Some("pg0"),
        None,
    );
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
    let dcs = with_failover(view(None, Some(SYSID)), None, Some("pg2"));
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
/// (seed 641023133062); without synchronous mode a `sync` key left from when it was on is
/// deleted first (seed 1797800002584), and without one nothing is added.
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
        vec![
            Action::AcquireLeader,
            Action::DropSync,
            Action::Promote,
            Action::SyncSlots
        ]
    );
    let without_key = obs(
        view(None, Some(SYSID)),
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(replica(100)),
    );
    assert_eq!(
        decide(&without_key, &me()).actions,
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

fn standby_member() -> MemberFacts {
    MemberFacts {
        standby_cluster: true,
        ..me()
    }
}

fn standby(streaming_at: u64) -> PostgresStatus {
    PostgresStatus {
        receive_lsn: Some(streaming_at),
        replay_lsn: Some(streaming_at),
        streaming: true,
        ..pg(true)
    }
}

/// Patroni's `bootstrap_standby_leader`: the first member of a standby cluster clones the
/// source instead of running initdb; a failed clone withdraws the claim.
#[test]
fn a_standby_cluster_bootstraps_by_cloning_its_source() {
    let d = decide(
        &obs(
            view(None, None),
            LeaseCheck::NotHeld,
            DataDir::Empty,
            PostgresView::Down,
        ),
        &standby_member(),
    );
    assert_eq!(d.outcome, Outcome::BootstrappingStandbyLeader);
    assert_eq!(
        d.actions,
        vec![
            Action::RaceInitialize(String::new()),
            Action::StartCreateReplica {
                from: StreamFrom::StandbySource
            }
        ]
    );
    assert_eq!(
        compensation(&[Action::RaceInitialize(String::new())]),
        vec![Action::CancelInitialize]
    );
    assert_eq!(compensation(&d.actions), vec![]);
    // While it clones, its claim is not abandoned.
    let mut v = known(view(None, Some("")));
    v.members[0].record.state = "creating replica".into();
    assert_eq!(unfinished_bootstrap_claim_without_leader(&v), None);
}

/// The lock holder of a standby cluster follows the source and is never promoted; a primary
/// (the section was just added) is stopped to come back as the standby leader.
#[test]
fn the_standby_leader_follows_the_source_and_is_never_promoted() {
    let me = standby_member();
    let follow = Some(StreamFrom::StandbySource);
    let d = decide(
        &obs(
            view(Some("pg0"), Some(SYSID)),
            renewed(),
            initialized(),
            PostgresView::Running(standby(500)),
        ),
        &me,
    );
    assert_eq!(d.outcome, Outcome::StandbyLeaderHealthy);
    assert!(!d.actions.contains(&Action::Promote), "{:?}", d.actions);
    assert!(d.actions.contains(&Action::ApplyConfig {
        upstream: follow.clone()
    }));
    let d = decide(
        &obs(
            view(Some("pg0"), Some(SYSID)),
            renewed(),
            initialized(),
            PostgresView::Down,
        ),
        &me,
    );
    assert_eq!(
        (d.outcome, d.actions),
        (
            Outcome::StandbyLeaderStarting,
            vec![Action::StartPostgres {
                primary: false,
                upstream: follow.clone()
            }]
        )
    );
    let d = decide(
        &obs(
            view(Some("pg0"), Some(SYSID)),
            renewed(),
            initialized(),
            PostgresView::Running(pg(false)),
        ),
        &me,
    );
    assert_eq!(d.outcome, Outcome::DemotingToStandbyLeader);
    assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Fast)]);
    // Without `standby_cluster` the same member promotes (the promotion of a standby cluster).
    let d = decide(
        &obs(
            view(Some("pg0"), Some(SYSID)),
            renewed(),
            initialized(),
            PostgresView::Running(standby(500)),
        ),
        &MemberFacts::named("pg0"),
    );
    assert_eq!(d.actions, vec![Action::Promote]);
}

/// With no standby leader, the healthiest replica takes the lock and follows the source
/// instead of promoting (Patroni: "promoted self to a standby leader by acquiring session
/// lock").
#[test]
fn a_replica_of_a_standby_cluster_takes_over_as_the_standby_leader() {
    let d = decide(
        &obs(
            view(None, Some(SYSID)),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(standby(500)),
        ),
        &standby_member(),
    );
    assert_eq!(d.outcome, Outcome::NoLeaderRacing);
    assert_eq!(
        d.actions,
        vec![
            Action::AcquireLeader,
            Action::ApplyConfig {
                upstream: Some(StreamFrom::StandbySource)
            },
            Action::SyncSlots
        ]
    );
}

/// A switchover inside a standby cluster: the standby leader hands over without a
/// CHECKPOINT (it has no writes of its own).
#[test]
fn a_standby_leader_hands_over_in_a_switchover() {
    let mut o = obs(
        with_failover(view(Some("pg0"), Some(SYSID)), Some("pg0"), Some("pg1")),
        renewed(),
        initialized(),
        PostgresView::Running(standby(500)),
    );
    o.peers = Some(vec![PeerAnswer {
        name: "pg1".into(),
        status: Some(PeerStatus {
            name: "pg1".into(),
            is_primary: false,
            wal_position: 500,
            nofailover: false,
            failover_priority: 1,
            watchdog_failed: false,
            state: "running".into(),
            timeline: Some(1),
        }),
    }]);
    let d = decide(&o, &standby_member());
    assert_eq!(
        d.actions,
        vec![Action::StopPostgres(StopMode::Fast), Action::ReleaseLeader],
        "{:?}",
        d.outcome
    );
}

fn with_failsafe(v: DcsView, topology: &[&str]) -> DcsView {
    match v {
        DcsView::Known(v) => {
            let mut v = (*v).clone();
            v.failsafe = Some(
                topology
                    .iter()
                    .map(|n| (n.to_string(), format!("http://{n}:8008/patroni")))
                    .collect(),
            );
            DcsView::Known(Arc::new(v))
        }
        unknown => unknown,
    }
}

fn failsafe_me() -> MemberFacts {
    MemberFacts {
        failsafe_mode: true,
        api_url: "http://127.0.0.1:6000/patroni".into(),
        ..me()
    }
}

/// Patroni §5.8: a replica that a leader asked within `ttl` (`POST /failsafe`) does not race
/// for the key it sees expired: that leader still runs as primary.
#[test]
fn failsafe_a_replica_asked_by_a_live_leader_does_not_race() {
    let mut o = obs(
        with_failsafe(view(None, Some(SYSID)), &["pg0", "pg1", "pg2"]),
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(pg(true)),
    );
    o.failsafe_leader = Some("pg1".into());
    let d = decide(&o, &failsafe_me());
    assert_eq!(
        d.outcome,
        Outcome::NoLeaderNotEligible(NotEligible::FailsafeLeaderAlive("pg1".into()))
    );
    assert!(d.actions.is_empty(), "{:?}", d.actions);
}

/// Patroni §5.5 step 8: with a non-empty `failsafe` topology, only its members race.
#[test]
fn failsafe_only_members_of_the_topology_race() {
    let o = obs(
        with_failsafe(view(None, Some(SYSID)), &["pg1", "pg2"]),
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(pg(true)),
    );
    let d = decide(&o, &failsafe_me());
    assert_eq!(
        d.outcome,
        Outcome::NoLeaderNotEligible(NotEligible::NotInFailsafeTopology)
    );
    // Without the mode the stale key means nothing.
    let d = decide(&o, &me());
    assert_eq!(d.outcome, Outcome::NoLeaderRacing);
}

/// A member outside the failsafe topology may not race, so it does not hold the others back
/// either when it is ahead (simulation seed 98: nobody took over after the leader that wrote
/// the topology crashed); a live primary outside it still does.
#[test]
fn failsafe_a_member_outside_the_topology_does_not_hold_the_race_back() {
    let mut o = obs(
        with_failsafe(view(None, Some(SYSID)), &["pg0", "pg2"]),
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(replica(100)),
    );
    o.peers = Some(vec![peer("pg1", 200, false)]);
    assert_eq!(decide(&o, &failsafe_me()).outcome, Outcome::NoLeaderRacing);
    assert_eq!(
        decide(&o, &me()).outcome,
        Outcome::NoLeaderNotEligible(NotEligible::PeerAhead("pg1".into()))
    );
    o.peers = Some(vec![peer("pg1", 50, true)]);
    assert_eq!(
        decide(&o, &failsafe_me()).outcome,
        Outcome::NoLeaderNotEligible(NotEligible::PrimaryStillAlive("pg1".into()))
    );
}

/// A primary that finds the key free and does not race (here it defers to a manual
/// failover's candidate) demotes, or nothing would ever stop it (simulation seed
/// 1797100002513); paused, it is left alone.
#[test]
fn a_primary_that_does_not_race_for_the_free_key_demotes() {
    let mut v = known(with_failover(view(None, Some(SYSID)), None, Some("pg1")));
    let mut o = obs(
        DcsView::Known(Arc::new(v.clone())),
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(pg(false)),
    );
    o.peers = Some(vec![peer("pg1", 100, false)]);
    let d = decide(&o, &me());
    assert_eq!(
        d.outcome,
        Outcome::DeferringToCandidate {
            candidate: "pg1".into()
        }
    );
    assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Immediate)]);
    v.config = Some(Versioned {
        value: serde_json::json!({"pause": true}),
        revision: 4,
    });
    o.dcs = DcsView::Known(Arc::new(v));
    assert!(decide(&o, &me()).actions.is_empty());
}

/// The former leader of a switchover does not count on a member outside the failsafe
/// topology to take over: that member may not race (simulation seed 1797000001206).
#[test]
fn failsafe_the_former_switchover_leader_races_when_only_outsiders_remain() {
    let mut o = obs(
        with_failover(
            with_failsafe(view(None, Some(SYSID)), &["pg0", "pg2"]),
            Some("pg0"),
            None,
        ),
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(replica(100)),
    );
    o.peers = Some(vec![peer("pg1", 100, false)]);
    assert_eq!(
        decide(&o, &me()).outcome,
        Outcome::NoLeaderNotEligible(NotEligible::FormerLeaderInSwitchover)
    );
    assert_eq!(decide(&o, &failsafe_me()).outcome, Outcome::NoLeaderRacing);
}

/// The leader that every member vouched for this cycle keeps running with the DCS down, and
/// says why; without that it only waits for its fence.
#[test]
fn failsafe_a_vouched_for_leader_holds_through_a_dcs_outage() {
    let mut o = obs(
        DcsView::Unknown("etcd timed out".into()),
        LeaseCheck::Unconfirmed,
        initialized(),
        PostgresView::Running(pg(false)),
    );
    o.failsafe_held = true;
    let d = decide(&o, &failsafe_me());
    assert!(
        matches!(d.outcome, Outcome::FailsafeHolding { .. }),
        "{:?}",
        d.outcome
    );
    assert!(d.actions.is_empty());
    o.failsafe_held = false;
    let d = decide(&o, &failsafe_me());
    assert!(
        matches!(d.outcome, Outcome::DcsUnknownHolding { .. }),
        "{:?}",
        d.outcome
    );
}

/// With the DCS out of reach, a primary that holds no lease of ours (lost, or acquired and
/// never confirmed) has no fence to stop it: it demotes at once, as Patroni does, except in
/// maintenance mode, where postgres is left as it is.
#[test]
fn an_unleased_primary_demotes_when_the_dcs_is_out_of_reach_unless_paused() {
    let mut o = obs(
        DcsView::Unknown("etcd timed out".into()),
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(pg(false)),
    );
    let d = decide(&o, &me());
    assert!(
        matches!(d.outcome, Outcome::DcsUnknownDemoting { .. }),
        "{:?}",
        d.outcome
    );
    assert_eq!(d.actions, vec![Action::StopPostgres(StopMode::Immediate)]);
    o.paused_when_last_seen = true;
    let d = decide(&o, &me());
    assert!(
        matches!(d.outcome, Outcome::DcsUnknownHolding { .. }),
        "{:?}",
        d.outcome
    );
    assert!(d.actions.is_empty());
    // A replica just waits.
    o.paused_when_last_seen = false;
    o.postgres = PostgresView::Running(pg(true));
    let d = decide(&o, &me());
    assert!(d.actions.is_empty(), "{:?}", d.actions);
}

/// Patroni writes `failsafe` after each lock update when it changed: every member's
/// `api_url`, its own included.
#[test]
fn failsafe_the_leader_publishes_the_topology_when_it_changed() {
    let o = obs(
        view(Some("pg0"), Some(SYSID)),
        renewed(),
        initialized(),
        PostgresView::Running(pg(false)),
    );
    let d = decide(&o, &failsafe_me());
    assert!(
        d.actions.contains(&Action::WriteFailsafe),
        "{:?}",
        d.actions
    );
    assert!(!decide(&o, &me()).actions.contains(&Action::WriteFailsafe));
    let DcsView::Known(v) = &o.dcs else {
        unreachable!()
    };
    let mut current = (**v).clone();
    current.failsafe = Some(crate::ha::failsafe::topology(
        v,
        "pg0",
        &failsafe_me().api_url,
    ));
    let o = Observation {
        dcs: DcsView::Known(Arc::new(current)),
        ..o
    };
    let d = decide(&o, &failsafe_me());
    assert!(
        !d.actions.contains(&Action::WriteFailsafe),
        "{:?}",
        d.actions
    );
}

/// Patroni's "bootstrap (without leader)": an empty member with a `no_leader` replica method
/// is created while no leader runs, once the cluster exists; never during a bootstrap, and
/// without such a method it waits.
#[test]
fn an_empty_member_with_a_no_leader_method_is_created_without_a_leader() {
    let facts = MemberFacts {
        replica_without_leader: true,
        ..me()
    };
    let empty = |initialize| {
        obs(
            view(None, initialize),
            LeaseCheck::NotHeld,
            DataDir::Empty,
            PostgresView::Down,
        )
    };
    let d = decide(&empty(Some(SYSID)), &facts);
    assert_eq!(d.outcome, Outcome::CloningWithoutLeader);
    assert_eq!(d.actions, vec![Action::StartCreateReplicaWithoutLeader]);
    let d = decide(&empty(Some("")), &facts);
    assert_eq!(d.outcome, Outcome::WaitingForBootstrap);
    let d = decide(&empty(Some(SYSID)), &me());
    assert_eq!(d.outcome, Outcome::WaitingForBootstrap);
    // A new cluster is bootstrapped, not restored from someone's backup.
    let d = decide(&empty(None), &facts);
    assert_eq!(d.outcome, Outcome::TryingToBootstrap);
}

/// Patroni's `check_timeline` (`is_healthiest_node`): with `history` ending on timeline 1 the
/// cluster is on timeline 2; a replica still on 1 may not race, one on 2 may. Off, the
/// timeline is not looked at.
#[test]
fn check_timeline_keeps_a_replica_behind_the_cluster_timeline_out_of_the_race() {
    let with_history = match view(None, Some(SYSID)) {
        DcsView::Known(v) => {
            let mut v = (*v).clone();
            v.history = vec![crate::dcs::HistoryLine {
                timeline: 1,
                lsn: 50,
                reason: "no recovery target specified".into(),
                timestamp: None,
                new_leader: Some("pg1".into()),
            }];
            DcsView::Known(Arc::new(v))
        }
        unknown => unknown,
    };
    let on = |timeline| {
        let mut status = pg(true);
        status.timeline = Some(timeline);
        obs(
            with_history.clone(),
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(status),
        )
    };
    let checking = MemberFacts {
        check_timeline: true,
        ..me()
    };
    assert_eq!(
        decide(&on(1), &checking).outcome,
        Outcome::NoLeaderNotEligible(NotEligible::TimelineBehind {
            mine: Some(1),
            cluster: 2
        })
    );
    assert_eq!(decide(&on(2), &checking).outcome, Outcome::NoLeaderRacing);
    assert_eq!(decide(&on(1), &me()).outcome, Outcome::NoLeaderRacing);
}

/// Patroni manages the synchronous standbys in pause too (`synchronous_node_count`,
/// `maximum_lag_on_syncnode` and `sync_priority` keep applying): only failover is paused.
#[test]
fn a_paused_leader_still_manages_its_synchronous_standbys() {
    let sync_on = MemberFacts {
        synchronous_mode: true,
        ..me()
    };
    let d = decide(
        &obs(
            paused(view(Some("pg0"), Some(SYSID))),
            renewed(),
            initialized(),
            PostgresView::Running(pg(false)),
        ),
        &sync_on,
    );
    assert_eq!(d.outcome, Outcome::LeaderHealthy);
    assert!(d.actions.contains(&Action::ManageSync), "{:?}", d.actions);
}

/// Quorum commit (Patroni's `is_healthiest_node`): a member takes over once `sync.quorum`
/// members named in `sync` (its leader included) answer that they are not ahead; one outside
/// `sync` needs a vote more; the former leader answering ahead of us is no reason to wait.
#[test]
fn with_quorum_commit_a_member_races_on_the_votes_of_sync() {
    let quorum_view =
        |voters: &str, quorum: u32| with_quorum(view(None, Some(SYSID)), "pg2", voters, quorum);
    let facts = MemberFacts {
        synchronous_mode: true,
        quorum_commit: true,
        ..me()
    };
    let race = |dcs: DcsView, peers: Vec<PeerAnswer>| {
        let mut o = obs(
            dcs,
            LeaseCheck::NotHeld,
            initialized(),
            PostgresView::Running(replica(100)),
        );
        o.peers = Some(peers);
        decide(&o, &facts)
    };
    // Voters pg0 and pg1, quorum 1: pg1 at or behind us is the vote needed.
    let d = race(quorum_view("pg0,pg1", 1), vec![peer("pg1", 90, false)]);
    assert_eq!(d.actions.first(), Some(&Action::AcquireLeader), "{d:?}");
    let d = race(quorum_view("pg0,pg1", 1), vec![]);
    assert_eq!(
        d.outcome,
        Outcome::NoLeaderNotEligible(NotEligible::QuorumNotReached {
            votes: 0,
            quorum: 1
        })
    );
    let d = race(quorum_view("pg0,pg1", 1), vec![peer("pg1", 110, false)]);
    assert_eq!(
        d.outcome,
        Outcome::NoLeaderNotEligible(NotEligible::PeerAhead("pg1".into()))
    );
    // The former leader answering ahead of us is ignored, and is no vote.
    let d = race(
        quorum_view("pg0,pg1", 1),
        vec![peer("pg2", 120, false), peer("pg1", 100, false)],
    );
    assert_eq!(d.actions.first(), Some(&Action::AcquireLeader), "{d:?}");
    // Not a voter (voters pg1, quorum 0): pg1's vote is still needed.
    let d = race(quorum_view("pg1", 0), vec![]);
    assert_eq!(
        d.outcome,
        Outcome::NoLeaderNotEligible(NotEligible::QuorumNotReached {
            votes: -1,
            quorum: 0
        })
    );
    let d = race(quorum_view("pg1", 0), vec![peer("pg1", 100, false)]);
    assert_eq!(d.actions.first(), Some(&Action::AcquireLeader), "{d:?}");
    // A member outside `sync` is not asked, so it neither votes nor holds us back.
    let d = race(quorum_view("pg1", 0), vec![peer("pg3", 500, false)]);
    assert_eq!(
        d.outcome,
        Outcome::NoLeaderNotEligible(NotEligible::QuorumNotReached {
            votes: -1,
            quorum: 0
        })
    );
}

/// Quorum commit: a switchover candidate whose leader died before handing over takes the lock
/// only with the votes of `sync`; without them the request is dropped so that everyone races
/// (simulation seed 5400: it took over lacking writes acknowledged through another standby).
#[test]
fn with_quorum_commit_a_candidate_left_without_its_leader_needs_the_votes() {
    let dcs = with_failover(
        with_quorum(view(None, Some(SYSID)), "pg2", "pg0,pg1", 1),
        Some("pg2"),
        Some("pg0"),
    );
    let facts = MemberFacts {
        synchronous_mode: true,
        quorum_commit: true,
        ..me()
    };
    let mut o = obs(
        dcs,
        LeaseCheck::NotHeld,
        initialized(),
        PostgresView::Running(replica(100)),
    );
    o.peers = Some(vec![peer("pg1", 120, false)]);
    let d = decide(&o, &facts);
    assert_eq!(
        d.outcome,
        Outcome::NoLeaderNotEligible(NotEligible::PeerAhead("pg1".into()))
    );
    assert_eq!(d.actions, vec![Action::ClearFailover]);
    o.peers = Some(vec![peer("pg1", 100, false)]);
    let d = decide(&o, &facts);
    assert_eq!(d.outcome, Outcome::TakingOverAsCandidate);
}
