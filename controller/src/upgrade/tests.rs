use super::*;
use crate::status::test_pods::cluster;

fn template(version: u32) -> Template {
    Template {
        version,
        ..Template::default()
    }
}

struct Case {
    target: u32,
    template: Option<Template>,
    desired: i32,
    current: i32,
    pods: Vec<PodView>,
    leader: Option<String>,
    paused: bool,
    backup: BackupCheck,
    majors: BTreeMap<String, u32>,
    previous: Option<UpgradeStatus>,
}

impl Case {
    /// A healthy 3-member cluster on 15 led by `pg-<leader>`, the spec raised to 17.
    fn raised(leader: usize) -> Case {
        Case {
            target: 17,
            template: Some(template(15)),
            desired: 3,
            current: 3,
            pods: cluster(3, leader),
            leader: Some(format!("pg-{leader}")),
            paused: false,
            backup: BackupCheck::NotConfigured,
            majors: BTreeMap::new(),
            previous: None,
        }
    }

    fn plan(&self) -> Plan {
        plan(&Input {
            target: self.target,
            template: self.template,
            desired: self.desired,
            current_replicas: Some(self.current),
            pods: &self.pods,
            leader: self.leader.as_deref(),
            paused: self.paused,
            backup: self.backup.clone(),
            server_majors: &self.majors,
            previous: self.previous.as_ref(),
        })
    }
}

#[test]
fn the_same_version_or_a_new_cluster_is_steady() {
    let mut c = Case::raised(0);
    c.target = 15;
    assert_eq!(
        c.plan(),
        Plan::Steady {
            upgraded_from: None
        }
    );
    c.target = 17;
    c.template = None;
    assert_eq!(
        c.plan(),
        Plan::Steady {
            upgraded_from: None
        }
    );
    assert_eq!(c.plan().rendering(17).version, 17);
}

#[test]
fn a_lowered_version_is_refused_naming_the_field_and_the_way_back() {
    let mut c = Case::raised(0);
    c.target = 14;
    let Plan::Refused(e) = c.plan() else {
        panic!("refused: {:?}", c.plan());
    };
    assert_eq!(e.field, "postgresVersion");
    assert!(e.reason.contains("set back to 15"), "{e}");
}

#[test]
fn nothing_is_stopped_while_a_precondition_is_missing() {
    let mut c = Case::raised(0);
    c.paused = true;
    assert!(matches!(c.plan(), Plan::Pending { ref reason, .. } if reason.contains("paused")));
    let mut c = Case::raised(0);
    c.pods[2].ready = false;
    assert!(matches!(c.plan(), Plan::Pending { ref reason, .. } if reason.contains("pg-2")));
    let mut c = Case::raised(0);
    c.leader = None;
    assert!(matches!(c.plan(), Plan::Pending { ref reason, .. } if reason.contains("no leader")));
    let mut c = Case::raised(0);
    c.backup = BackupCheck::Missing("the repository has no backup".to_owned());
    let plan = c.plan();
    assert!(
        matches!(plan, Plan::Pending { ref reason, .. } if reason.contains("no backup") && reason.contains("pgwarden.io/backup")),
        "{plan:?}"
    );
    // Pending renders the old version and leaves the member count alone.
    let r = plan.rendering(17);
    assert_eq!((r.version, r.upgrade_to, r.replicas), (15, None, None));
    let status = plan.status(None, 17, "t0").expect("status");
    assert_eq!(
        (status.phase.as_str(), status.from, status.to),
        ("Pending", 15, 17)
    );
    // Set back to 15 before anything stopped: the pending upgrade is reported cancelled.
    let mut back = Case::raised(0);
    back.target = 15;
    let cancelled = back.plan().status(Some(&status), 15, "t1").expect("status");
    assert_eq!(
        (cancelled.phase.as_str(), cancelled.from, cancelled.to),
        ("Cancelled", 15, 17)
    );
    assert_eq!(back.plan().status(Some(&cancelled), 15, "t2"), None);
}

#[test]
fn a_leader_at_ordinal_zero_keeps_leading_while_the_replicas_stop_then_stops_last() {
    let mut c = Case::raised(0);
    c.backup = BackupCheck::Recent;
    let plan = c.plan();
    let r = plan.rendering(17);
    // Committed: the old template, `upgrade-to` recorded, one member.
    assert_eq!(
        (r.version, r.upgrade_to, r.replicas),
        (15, Some(17), Some(1))
    );
    // The next reconcile reads `upgrade-to`: still stopping, also without the backup check.
    c.template = Some(Template {
        upgrade_to: Some(17),
        ..template(15)
    });
    c.backup = BackupCheck::NotAsked;
    c.current = 1;
    assert_eq!(c.plan().rendering(17).replicas, Some(1), "{:?}", c.plan());
    assert!(c.plan().note().expect("note").message.contains("pg-1"));
    c.pods.truncate(1);
    let r = c.plan().rendering(17);
    assert_eq!(
        (r.version, r.upgrade_to, r.replicas),
        (15, Some(17), Some(0))
    );
    c.current = 0;
    assert_eq!(c.plan().rendering(17).replicas, Some(0));
    c.pods.clear();
    c.leader = None;
    let plan = c.plan();
    let r = plan.rendering(17);
    assert_eq!(
        (r.version, r.upgrade_to, r.upgraded_from, r.replicas),
        (17, None, Some(15), Some(1)),
        "{plan:?}"
    );
}

#[test]
fn a_leader_elsewhere_hands_over_to_ordinal_zero_before_anything_stops() {
    let c = Case::raised(2);
    match c.plan() {
        Plan::Stopping {
            replicas,
            switchover: Some((primary, candidate)),
            ..
        } => {
            assert_eq!(replicas, 3);
            assert_eq!((primary.as_str(), candidate.as_str()), ("pg-2", "pg-0"));
        }
        other => panic!("a switchover first: {other:?}"),
    }
}

#[test]
fn another_version_while_stopping_is_refused() {
    let mut c = Case::raised(0);
    c.target = 16;
    c.template = Some(Template {
        upgrade_to: Some(17),
        ..template(15)
    });
    assert!(matches!(c.plan(), Plan::Refused(ref e) if e.reason.contains("back to 17")));
}

#[test]
fn the_first_member_starts_alone_until_it_leads_on_the_new_version_then_the_replicas_clone() {
    let mut c = Case::raised(0);
    c.template = Some(Template {
        upgraded_from: Some(15),
        ..template(17)
    });
    c.current = 1;
    c.pods = cluster(1, 0);
    c.pods[0].ready = false;
    c.leader = None;
    let plan = c.plan();
    assert!(
        matches!(
            plan,
            Plan::Starting {
                replicas: 1,
                phase: Phase::Upgrading,
                ..
            }
        ),
        "{plan:?}"
    );
    // Ready and leading, but its agent not (yet) known to run 17: still alone.
    c.pods[0].ready = true;
    c.leader = Some("pg-0".to_owned());
    c.majors.insert("pg-0".to_owned(), 15);
    assert!(matches!(c.plan(), Plan::Starting { replicas: 1, .. }));
    c.majors.insert("pg-0".to_owned(), 17);
    let plan = c.plan();
    assert!(
        matches!(
            plan,
            Plan::Starting {
                replicas: 3,
                phase: Phase::Recloning,
                ..
            }
        ),
        "{plan:?}"
    );
    assert_eq!(plan.rendering(17).upgraded_from, Some(15));
    c.pods = cluster(3, 0);
    c.current = 3;
    c.pods[1].ready = false;
    c.majors.insert("pg-1".to_owned(), 17);
    c.majors.insert("pg-2".to_owned(), 17);
    assert!(matches!(c.plan(), Plan::Starting { replicas: 3, .. }));
    c.pods[1].ready = true;
    let done = c.plan();
    assert_eq!(done, Plan::Succeeded { from: 15, to: 17 });
    let status = done
        .status(
            Some(&UpgradeStatus {
                from: 15,
                to: 17,
                phase: "Recloning".to_owned(),
                message: String::new(),
                started_at: Some("t0".to_owned()),
                finished_at: None,
            }),
            17,
            "t1",
        )
        .expect("status");
    assert_eq!(status.phase, "Succeeded");
    assert_eq!(status.started_at.as_deref(), Some("t0"));
    assert_eq!(status.finished_at.as_deref(), Some("t1"));
    // Once recorded, the members are not asked again and the template stays as it is (no
    // second restart of every Pod).
    c.previous = Some(status);
    assert!(!needs_versions(17, c.template, c.previous.as_ref()));
    assert_eq!(
        c.plan(),
        Plan::Steady {
            upgraded_from: Some(15)
        }
    );
}

/// A first member that cannot start (say the image lacked the new version) is restarted once
/// the template changed (a fixed `spec.image`), not before; a ready one never.
#[test]
fn a_stuck_member_of_an_older_template_is_restarted_during_the_upgrade() {
    let mut c = Case::raised(0);
    c.template = Some(Template {
        upgraded_from: Some(15),
        ..template(17)
    });
    c.current = 1;
    c.pods = cluster(1, 0);
    c.pods[0].ready = false;
    c.leader = None;
    let restart = |plan: Plan| match plan {
        Plan::Starting { restart, .. } => restart,
        other => panic!("starting: {other:?}"),
    };
    assert_eq!(restart(c.plan()), None, "current template: wait");
    c.pods[0].current_revision = false;
    assert_eq!(restart(c.plan()).as_deref(), Some("pg-0"));
    c.pods[0].terminating = true;
    assert_eq!(restart(c.plan()), None, "already going");
}

#[test]
fn backups_count_when_one_finished_within_a_day() {
    let now = 1_800_000_000;
    let info = serde_json::json!([{"name": "pg", "backup": [
        {"type": "full", "timestamp": {"start": now - 90_000, "stop": now - 89_000}},
        {"type": "incr", "error": true, "timestamp": {"start": now - 100, "stop": now - 50}},
    ]}]);
    assert!(
        matches!(backup_check(&info, now), BackupCheck::Missing(ref m) if m.contains("24 hours ago"))
    );
    let info = serde_json::json!([{"name": "pg", "backup": [
        {"type": "diff", "timestamp": {"start": now - 600, "stop": now - 500}},
    ]}]);
    assert_eq!(backup_check(&info, now), BackupCheck::Recent);
    let empty = serde_json::json!([{"name": "pg", "backup": []}]);
    assert!(
        matches!(backup_check(&empty, now), BackupCheck::Missing(ref m) if m.contains("no backup"))
    );
}
