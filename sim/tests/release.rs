//! The fence guard's release after a kill -9 of the leader's agent (issue 20 items 1 and 8),
//! on hand-written schedules: a killed leader is replaced long before its lease would run out;
//! a frozen leader, or a lost host, is not released; a quick restart waits for the guard.

use pgwarden_sim::guard::{Death, Fate, Style};
use pgwarden_sim::world::{Clock, Initial, Tags, Us, SEC};
use pgwarden_sim::{run_schedule, Fault, Report, Schedule};

const TTL: u64 = 30;
const CRASH_AT: Us = 30 * SEC;

/// Three members, asynchronous, ttl 30 s, one fault at 30 s, then quiet.
fn schedule(seed: u64, style: Style, fault: Fault) -> Schedule {
    schedule_with(seed, style, vec![(CRASH_AT, fault)], false)
}

/// With more faults, and `nofailover` on every member but pg0 if `only_pg0`.
fn schedule_with(seed: u64, style: Style, faults: Vec<(Us, Fault)>, only_pg0: bool) -> Schedule {
    let initial = Initial {
        ttl: TTL,
        loop_wait: 5,
        retry_timeout: 2,
        maximum_lag_on_failover: 16 * 1024 * 1024,
        synchronous_mode: false,
        strict: false,
        quorum: false,
        synchronous_node_count: 1,
        failsafe_mode: false,
    };
    Schedule {
        seed,
        members: 3,
        initial,
        failsafe_allowed: true,
        tags: (0..3)
            .map(|i| Tags {
                nofailover: only_pg0 && i > 0,
                failover_priority: 1,
            })
            .collect(),
        clocks: (0..3)
            .map(|i| Clock {
                offset: i * 7 * SEC,
                drift: 0.0,
            })
            .collect(),
        faults,
        release_style: style,
        quiet_at: CRASH_AT + 70 * SEC,
        liveness_bound: 60 * SEC,
        end: CRASH_AT + 140 * SEC,
    }
}

fn kill_leader(linger: Us, fate: Fate, down: Us) -> Fault {
    Fault::Crash {
        node: 0,
        down,
        death: Death {
            linger,
            fate,
            hits_leader: true,
        },
    }
}

fn run(sched: Schedule) -> (Report, Vec<String>) {
    let (result, lines) = run_schedule(sched, true);
    match result {
        Ok(r) => (r, lines),
        Err(v) => panic!("{v}\n{}", lines.join("\n")),
    }
}

/// Seconds of the first trace line at or after `from` that contains `needle`.
fn first(lines: &[String], needle: &str, from: f64) -> Option<f64> {
    lines.iter().find_map(|l| {
        let (t, rest) = l.trim_start().split_once("s ")?;
        let t: f64 = t.parse().ok()?;
        (t >= from && rest.contains(needle)).then_some(t)
    })
}

const CRASH: f64 = CRASH_AT as f64 / SEC as f64;

#[test]
fn a_killed_leader_is_replaced_long_before_its_lease_runs_out() {
    for style in [Style::Etcd, Style::Kubernetes] {
        let (report, lines) = run(schedule(
            1,
            style,
            kill_leader(300_000, Fate::Releases, 60 * SEC),
        ));
        assert_eq!(report.released, 1, "{style:?}\n{}", lines.join("\n"));
        let released = first(&lines, "released the leader record", CRASH).expect("released");
        let promoted = first(&lines, "promoted", CRASH).expect("a new leader");
        assert!(
            released >= CRASH + 0.3 && promoted < CRASH + 10.0,
            "{style:?}: released at {released}, promoted at {promoted}\n{}",
            lines.join("\n")
        );
    }
}

#[test]
fn a_lost_host_is_not_released_and_its_lease_runs_out() {
    let (report, lines) = run(schedule(
        1,
        Style::Etcd,
        kill_leader(300_000, Fate::HostLost, 60 * SEC),
    ));
    assert_eq!(report.released, 0);
    assert_eq!(first(&lines, "release command", 0.0), None);
    let promoted = first(&lines, "promoted", CRASH).expect("a new leader");
    // The lease was renewed at most loop_wait before the kill.
    assert!(
        promoted >= CRASH + (TTL - 5) as f64,
        "promoted at {promoted}"
    );
}

#[test]
fn a_frozen_leader_is_not_released() {
    let (report, lines) = run(schedule(
        1,
        Style::Etcd,
        Fault::Freeze {
            node: 0,
            dur: 50 * SEC,
        },
    ));
    assert_eq!(report.released, 0);
    assert_eq!(first(&lines, "fence guard", 0.0), None);
}

#[test]
fn a_quick_restart_waits_for_the_guard() {
    // Postgres lingers 2 s, the agent is restarted after 0.1 s: it waits for the release (which
    // may fail: the restarted agent then finds the key still naming it).
    let (_, lines) = run(schedule(
        1,
        Style::Etcd,
        kill_leader(2 * SEC, Fate::Releases, 100_000),
    ));
    let done = first(&lines, "the fence guard is done", CRASH).expect("guard done");
    let restarted = first(&lines, "agent restarted (it waited", CRASH).expect("restart");
    assert!(
        done >= CRASH + 2.0 && restarted >= done,
        "{done} {restarted}"
    );
}

#[test]
fn a_release_applied_after_the_guard_gave_up_is_harmless() {
    for after in [0, SEC / 2, 2 * SEC] {
        let (report, lines) = run(schedule(
            1,
            Style::Etcd,
            kill_leader(100_000, Fate::AppliesLate { after }, 100_000),
        ));
        assert!(report.released <= 1);
        let gave_up = first(&lines, "the release request timed out", CRASH).expect("timeout");
        let applied = first(&lines, "the late release request is", CRASH).expect("late");
        let restarted = first(&lines, "agent restarted", CRASH).expect("restart");
        assert!(
            applied >= gave_up && restarted >= gave_up,
            "{gave_up} {applied} {restarted}"
        );
    }
}

#[test]
fn nothing_is_released_while_paused() {
    let (report, lines) = run(schedule_with(
        1,
        Style::Etcd,
        vec![
            (CRASH_AT - 5 * SEC, Fault::Pause { dur: 60 * SEC }),
            (CRASH_AT, kill_leader(300_000, Fate::Releases, 60 * SEC)),
        ],
        false,
    ));
    assert_eq!(report.released, 0);
    assert!(
        first(&lines, "the record is kept", CRASH).is_some(),
        "{}",
        lines.join("\n")
    );
}

#[test]
fn nothing_is_released_when_nobody_else_may_take_over() {
    let (report, lines) = run(schedule_with(
        1,
        Style::Etcd,
        vec![(CRASH_AT, kill_leader(300_000, Fate::Releases, 10 * SEC))],
        true,
    ));
    assert_eq!(report.released, 0);
    assert!(first(&lines, "the record is kept", CRASH).is_some());
    // The restarted agent resumes with the key it still holds.
    assert!(first(
        &lines,
        "pg0: postgres accepts connections (recovery false)",
        CRASH
    )
    .is_some());
}
