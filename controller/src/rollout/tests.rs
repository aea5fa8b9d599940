use super::*;
use crate::status::MemberRecord;

fn pod(name: &str, current: bool, xlog: u64) -> PodView {
    PodView {
        name: name.to_owned(),
        ready: true,
        current_revision: current,
        terminating: false,
        member: Some(MemberRecord {
            role: "replica".to_owned(),
            state: "running".to_owned(),
            xlog_location: Some(xlog),
            replication_state: Some("streaming".to_owned()),
            ..MemberRecord::default()
        }),
    }
}

#[test]
fn nothing_to_do_when_every_pod_is_current() {
    let pods = [pod("pg-0", true, 1), pod("pg-1", true, 1)];
    assert_eq!(next_step(&pods, Some("pg-0")), Step::UpToDate);
    // Even without a leader: up to date is up to date.
    assert_eq!(next_step(&pods, None), Step::UpToDate);
}

#[test]
fn replicas_restart_first_highest_ordinal_first() {
    let pods = [
        pod("pg-0", false, 5),
        pod("pg-1", false, 5),
        pod("pg-2", false, 5),
    ];
    assert_eq!(
        next_step(&pods, Some("pg-2")),
        Step::RestartReplica("pg-1".to_owned())
    );
    assert_eq!(
        next_step(&pods, Some("pg-1")),
        Step::RestartReplica("pg-2".to_owned())
    );
    let pods = [
        pod("pg-0", false, 5),
        pod("pg-1", true, 5),
        pod("pg-2", true, 5),
    ];
    assert_eq!(
        next_step(&pods, Some("pg-1")),
        Step::RestartReplica("pg-0".to_owned())
    );
}

#[test]
fn the_primary_is_never_restarted_while_it_leads_a_multi_member_cluster() {
    let pods = [
        pod("pg-0", false, 10),
        pod("pg-1", true, 8),
        pod("pg-2", true, 9),
    ];
    // The most advanced updated replica is the candidate.
    assert_eq!(
        next_step(&pods, Some("pg-0")),
        Step::Switchover {
            primary: "pg-0".to_owned(),
            candidate: "pg-2".to_owned()
        }
    );
    // After the switchover the former primary is an outdated replica.
    assert_eq!(
        next_step(&pods, Some("pg-2")),
        Step::RestartReplica("pg-0".to_owned())
    );
}

#[test]
fn waits_instead_of_acting_during_trouble() {
    let mut pods = vec![pod("pg-0", false, 1), pod("pg-1", false, 1)];
    assert!(matches!(next_step(&pods, None), Step::Wait(r) if r.contains("no leader")));
    assert!(matches!(next_step(&pods, Some("pg-7")), Step::Wait(_)));
    pods[1].ready = false;
    assert!(
        matches!(next_step(&pods, Some("pg-0")), Step::Wait(r) if r.contains("pg-1 is not ready"))
    );
    pods[1].ready = true;
    pods[1].terminating = true;
    assert!(matches!(next_step(&pods, Some("pg-0")), Step::Wait(r) if r.contains("stopping")));
    pods[1].terminating = false;
    pods[1].member.as_mut().expect("member").state = "creating replica".to_owned();
    assert!(matches!(next_step(&pods, Some("pg-0")), Step::Wait(_)));
}

#[test]
fn no_switchover_to_a_replica_that_is_not_streaming() {
    let mut pods = vec![pod("pg-0", false, 1), pod("pg-1", true, 1)];
    pods[1].member.as_mut().expect("member").replication_state =
        Some("in archive recovery".to_owned());
    assert!(matches!(next_step(&pods, Some("pg-0")), Step::Wait(r) if r.contains("switch over")));
}

#[test]
fn a_single_member_is_restarted_in_place() {
    let pods = [pod("pg-0", false, 1)];
    assert_eq!(
        next_step(&pods, Some("pg-0")),
        Step::RestartPrimary("pg-0".to_owned())
    );
}
