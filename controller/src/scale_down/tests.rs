use super::*;
use crate::status::test_pods::cluster;
use crate::status::MemberRecord;

fn member(pods: &mut [PodView], i: usize) -> &mut MemberRecord {
    pods[i].member.as_mut().expect("member")
}

#[test]
fn not_a_scale_down_or_a_staying_leader_proceeds() {
    let pods = cluster(3, 2);
    // Scaling up, no StatefulSet yet, the same count.
    assert_eq!(plan(5, Some(3), &pods, Some("pg-2"), false), Plan::Proceed);
    assert_eq!(plan(3, None, &pods, Some("pg-2"), false), Plan::Proceed);
    assert_eq!(plan(3, Some(3), &pods, Some("pg-2"), false), Plan::Proceed);
    // The leader stays: the departing members are replicas.
    let pods = cluster(3, 1);
    assert_eq!(plan(2, Some(3), &pods, Some("pg-1"), false), Plan::Proceed);
    assert_eq!(plan(2, Some(3), &pods, Some("pg-1"), true), Plan::Proceed);
    assert_eq!(Plan::Proceed.replicas(2), 2);
    assert_eq!(Plan::Proceed.note(), None);
}

#[test]
fn a_departing_leader_hands_over_to_the_lowest_streaming_staying_member_first() {
    let pods = cluster(3, 2);
    let p = plan(2, Some(3), &pods, Some("pg-2"), false);
    assert_eq!(
        p,
        Plan::Switchover {
            primary: "pg-2".to_owned(),
            candidate: "pg-0".to_owned(),
            keep: 3,
            target: 2,
        }
    );
    assert_eq!(p.replicas(2), 3, "the leader's Pod is kept meanwhile");
    let note = p.note().expect("note");
    assert_eq!(note.reason, "ScaleDownSwitchover");
    assert!(
        note.message.contains("from pg-2 to pg-0"),
        "{}",
        note.message
    );

    // Never to a member that departs too, even the most advanced one.
    let mut pods = cluster(5, 4);
    member(&mut pods, 3).xlog_location = Some(900);
    assert!(matches!(
        plan(2, Some(5), &pods, Some("pg-4"), false),
        Plan::Switchover { candidate, keep: 5, .. } if candidate == "pg-0"
    ));
    // A streaming member before one that is not (yet) known to stream.
    member(&mut pods, 0).replication_state = None;
    assert!(matches!(
        plan(2, Some(5), &pods, Some("pg-4"), false),
        Plan::Switchover { candidate, .. } if candidate == "pg-1"
    ));
    // The leader at ordinal 1 of a scale-down to one member: pg-0 takes over.
    let pods = cluster(3, 1);
    assert!(matches!(
        plan(1, Some(3), &pods, Some("pg-1"), false),
        Plan::Switchover { candidate, .. } if candidate == "pg-0"
    ));
}

#[test]
fn once_a_staying_member_leads_the_scale_down_proceeds() {
    let pods = cluster(3, 0);
    assert_eq!(plan(2, Some(3), &pods, Some("pg-0"), false), Plan::Proceed);
}

#[test]
fn no_staying_member_able_to_take_over_holds_the_members_and_says_why() {
    let blocked = |pods: &[PodView]| {
        let p = plan(2, Some(3), pods, Some("pg-2"), false);
        assert_eq!(p.replicas(2), 3, "nothing is removed: {p:?}");
        let note = p.note().expect("note");
        assert_eq!(note.reason, "ScaleDownBlocked");
        assert!(
            note.message.contains("no staying member is ready"),
            "{}",
            note.message
        );
    };
    let mut pods = cluster(3, 2);
    pods[0].ready = false;
    pods[1].terminating = true;
    blocked(&pods);
    let mut pods = cluster(3, 2);
    member(&mut pods, 0).state = "creating replica".to_owned();
    pods[1].member = None;
    blocked(&pods);
    let mut pods = cluster(3, 2);
    member(&mut pods, 0).replication_state = Some("in archive recovery".to_owned());
    member(&mut pods, 1)
        .tags
        .insert("nofailover".to_owned(), serde_json::json!(true));
    blocked(&pods);
    // A single staying member that is fine is enough.
    member(&mut pods, 1).tags.clear();
    assert!(matches!(
        plan(2, Some(3), &pods, Some("pg-2"), false),
        Plan::Switchover { candidate, .. } if candidate == "pg-1"
    ));
}

#[test]
fn a_paused_cluster_is_not_switched_over_and_keeps_its_leader() {
    let pods = cluster(3, 2);
    let p = plan(2, Some(3), &pods, Some("pg-2"), true);
    assert_eq!(p.replicas(2), 3);
    let note = p.note().expect("note");
    assert_eq!(note.reason, "ScaleDownBlocked");
    assert!(note.message.contains("paused"), "{}", note.message);
}

#[test]
fn a_leader_that_is_not_ready_is_not_asked_to_hand_over() {
    let mut pods = cluster(3, 2);
    pods[2].ready = false;
    assert!(matches!(
        plan(2, Some(3), &pods, Some("pg-2"), false),
        Plan::Hold { keep: 3, reason, .. } if reason.contains("not ready to hand over")
    ));
}

#[test]
fn without_a_leader_among_the_pods_there_is_nothing_to_protect() {
    let pods = cluster(3, 2);
    assert_eq!(plan(2, Some(3), &pods, None, false), Plan::Proceed);
    assert_eq!(plan(2, Some(3), &pods, Some("pg-9"), false), Plan::Proceed);
}

#[test]
fn only_ordinals_at_or_above_the_count_depart() {
    assert!(stays("pg-1", 2));
    assert!(!stays("pg-2", 2));
    assert!(!stays("my-pg-10", 3));
    assert!(
        stays("pg", 0),
        "no ordinal: not the StatefulSet's to remove"
    );
}
