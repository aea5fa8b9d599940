use super::*;

fn member(role: &str, state: &str, xlog: u64) -> Option<MemberRecord> {
    Some(MemberRecord {
        role: role.to_owned(),
        state: state.to_owned(),
        timeline: Some(2),
        xlog_location: Some(xlog),
        api_url: "http://10.0.0.1:8008/patroni".to_owned(),
        ..MemberRecord::default()
    })
}

fn pod(name: &str, ready: bool, member: Option<MemberRecord>) -> PodView {
    PodView {
        name: name.to_owned(),
        ready,
        current_revision: true,
        terminating: false,
        member,
    }
}

fn input<'a>(holder: Option<&str>, pods: Vec<PodView>) -> StatusInput<'a> {
    StatusInput {
        generation: Some(4),
        desired_members: 3,
        lease_holder: holder.map(str::to_owned),
        pods,
        spec_errors: &[],
        rollout: None,
        scale_down: None,
        previous: None,
        now: "2026-01-01T00:00:00Z".to_owned(),
    }
}

fn condition<'a>(s: &'a PostgresClusterStatus, kind: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.kind == kind).expect(kind)
}

#[test]
fn healthy_cluster_is_ready_with_primary_members_and_lag() {
    let s = compute(&input(
        Some("pg-1"),
        vec![
            pod("pg-2", true, member("replica", "running", 900)),
            pod("pg-0", true, member("replica", "running", 1000)),
            pod("pg-1", true, member("primary", "running", 1000)),
        ],
    ));
    assert_eq!(s.primary.as_deref(), Some("pg-1"));
    assert_eq!(s.observed_generation, Some(4));
    assert_eq!(s.ready_members, 3);
    let names: Vec<&str> = s.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["pg-0", "pg-1", "pg-2"]);
    assert_eq!(s.members[2].lag_bytes, Some(100));
    assert_eq!(s.members[1].lag_bytes, Some(0));
    assert_eq!(s.members[0].timeline, Some(2));
    assert_eq!(condition(&s, "Ready").status, "True");
    assert_eq!(condition(&s, "Progressing").status, "False");
    assert_eq!(condition(&s, "Degraded").status, "False");
    assert!(s
        .conditions
        .iter()
        .all(|c| c.observed_generation == Some(4)));
}

#[test]
fn members_without_records_are_unknown_and_the_cluster_is_progressing() {
    let s = compute(&input(None, vec![pod("pg-0", false, None)]));
    assert_eq!(s.primary, None);
    assert_eq!(s.members[0].role, "unknown");
    assert_eq!(s.members[0].lag_bytes, None);
    let ready = condition(&s, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoPrimary")
    );
    let progressing = condition(&s, "Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "Scaling")
    );
    assert_eq!(condition(&s, "Degraded").status, "False");
}

#[test]
fn a_lease_naming_a_vanished_pod_is_no_primary() {
    let s = compute(&input(
        Some("pg-9"),
        vec![pod("pg-0", true, member("replica", "running", 1))],
    ));
    assert_eq!(s.primary, None);
    assert_eq!(condition(&s, "Degraded").reason, "NoPrimary");
}

#[test]
fn failed_members_and_invalid_specs_degrade() {
    let s = compute(&input(
        Some("pg-0"),
        vec![
            pod("pg-0", true, member("primary", "running", 5)),
            pod("pg-1", false, member("replica", "start failed", 1)),
        ],
    ));
    let d = condition(&s, "Degraded");
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "MemberFailed")
    );
    assert!(d.message.contains("pg-1"));

    let errors = [SpecError {
        field: "ha".to_owned(),
        reason: "bad".to_owned(),
    }];
    let mut i = input(
        Some("pg-0"),
        vec![pod("pg-0", true, member("primary", "running", 5))],
    );
    i.spec_errors = &errors;
    let s = compute(&i);
    let d = condition(&s, "Degraded");
    assert_eq!(
        (d.status.as_str(), d.reason.as_str(), d.message.as_str()),
        ("True", "InvalidSpec", "spec.ha: bad")
    );
    assert_eq!(condition(&s, "Ready").reason, "InvalidSpec");
}

#[test]
fn transition_time_is_kept_while_the_status_stays() {
    let pods = vec![pod("pg-0", true, member("primary", "running", 5))];
    let mut first = input(Some("pg-0"), pods.clone());
    first.desired_members = 1;
    let s1 = compute(&first);
    let mut second = input(Some("pg-0"), pods);
    second.desired_members = 1;
    second.now = "2026-01-02T00:00:00Z".to_owned();
    second.previous = Some(&s1);
    let s2 = compute(&second);
    assert_eq!(s1, s2, "nothing changed, so nothing to write");
    // Ready flips: a new transition time.
    let mut third = input(
        None,
        vec![pod("pg-0", false, member("replica", "stopped", 5))],
    );
    third.desired_members = 1;
    third.now = "2026-01-03T00:00:00Z".to_owned();
    third.previous = Some(&s2);
    let s3 = compute(&third);
    assert_eq!(
        condition(&s3, "Ready").last_transition_time.as_deref(),
        Some("2026-01-03T00:00:00Z")
    );
}

#[test]
fn member_records_parse_as_patroni_writes_them() {
    let json = r#"{"conn_url":"postgres://10.0.0.1:5432/postgres","api_url":"http://10.0.0.1:8008/patroni","state":"running","role":"primary","version":"4.1.4","xlog_location":50331856,"timeline":4,"tags":{"clonefrom":true}}"#;
    let m = member_of(Some(json)).expect("parses");
    assert!(m.is_primary_role());
    assert_eq!(m.xlog_location, Some(50_331_856));
    assert_eq!(m.timeline, Some(4));
    assert_eq!(member_of(Some("not json")), None);
    assert_eq!(member_of(None), None);
}

#[test]
fn a_waiting_scale_down_is_reported_before_the_rollout() {
    let mut i = input(
        Some("pg-2"),
        vec![
            pod("pg-0", true, member("replica", "running", 5)),
            pod("pg-1", true, member("replica", "running", 5)),
            pod("pg-2", true, member("primary", "running", 5)),
        ],
    );
    i.desired_members = 2;
    i.rollout = Some("waiting: pg-1 is not ready".to_owned());
    i.scale_down = Some(ProgressNote {
        reason: "ScaleDownBlocked",
        message: "scaling down to 2 members waits".to_owned(),
    });
    let s = compute(&i);
    let p = condition(&s, "Progressing");
    assert_eq!(
        (p.status.as_str(), p.reason.as_str(), p.message.as_str()),
        (
            "True",
            "ScaleDownBlocked",
            "scaling down to 2 members waits"
        )
    );
    assert_eq!(condition(&s, "Ready").status, "True");
    assert_eq!(condition(&s, "Degraded").status, "False");
}
