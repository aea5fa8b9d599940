//! Synchronous replication management (`synchronous_mode`), as a pure planner.
//!
//! Invariant (Patroni §5.7): a name is written to `sync` only after postgres has it in
//! `synchronous_standby_names` **and** reports it as `sync` in `pg_stat_replication`; removals go
//! to `sync` first, then to postgres. Only members listed in `sync` (and its `leader`) may race
//! for the lock, so every write acknowledged under synchronous commit exists on whoever can
//! become the next leader.

use std::collections::BTreeSet;

use crate::dcs::{ClusterView, SyncState};
use crate::state::ReplicationRow;

/// Whether postgres running with `standby_names` acknowledges commits only through standbys
/// that `recorded` lists (or without waiting for any): then a `sync` key that already names us
/// as leader stays true once we open for writes. `*` matches any standby, so it never is.
pub fn acknowledges_only_through_recorded(standby_names: &str, recorded: &SyncState) -> bool {
    standby_names
        .split(',')
        .map(|n| n.trim().trim_matches('"'))
        .filter(|n| !n.is_empty())
        .all(|n| n != "*" && recorded.lists(n))
}

/// The cluster's synchronous settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncMode {
    pub enabled: bool,
    /// Never fall back to asynchronous commit: block writes when no standby is synchronous.
    pub strict: bool,
}

/// What the leader must do this cycle, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    /// Write `sync` before touching postgres (shrinking the set, or taking the key over).
    pub key_before: Option<SyncState>,
    /// The value of `synchronous_standby_names` postgres must run with.
    pub standby_names: String,
    /// Write `sync` after postgres confirmed the new standby.
    pub key_after: Option<SyncState>,
    /// Delete `sync` (synchronous mode was switched off).
    pub delete_key: bool,
}

fn state(me: &str, names: &BTreeSet<String>) -> SyncState {
    SyncState {
        leader: Some(me.to_owned()),
        sync_standby: (!names.is_empty())
            .then(|| names.iter().cloned().collect::<Vec<_>>().join(",")),
        quorum: 0,
    }
}

/// Plans one cycle of synchronous replication management for leader `me`.
///
/// `nosync` lists members tagged `nosync`; `replication` is the leader's `pg_stat_replication`.
pub fn plan(
    mode: SyncMode,
    me: &str,
    view: &ClusterView,
    replication: &[ReplicationRow],
    nosync: &BTreeSet<String>,
) -> SyncPlan {
    if !mode.enabled {
        return SyncPlan {
            key_before: None,
            standby_names: String::new(),
            key_after: None,
            delete_key: view.sync.is_some(),
        };
    }
    let recorded = view.sync.as_ref().map(|s| &s.value);
    let ours = recorded.is_some_and(|s| s.leader.as_deref() == Some(me));
    let current: BTreeSet<String> = if ours {
        recorded
            .map(|s| s.standbys().into_iter().collect())
            .unwrap_or_default()
    } else {
        BTreeSet::new()
    };
    let member = |app: &str| {
        view.members
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(app))
            .map(|m| m.name.clone())
    };
    let streaming: Vec<(String, &ReplicationRow)> = replication
        .iter()
        .filter(|r| r.state == "streaming")
        .filter_map(|r| member(&r.application_name).map(|name| (name, r)))
        .filter(|(name, _)| name != me && !nosync.contains(name))
        .collect();
    let keep: BTreeSet<String> = streaming
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| current.contains(n))
        .collect();
    let desired: BTreeSet<String> = if keep.is_empty() {
        streaming
            .iter()
            .map(|(n, _)| n.clone())
            .min()
            .into_iter()
            .collect()
    } else {
        keep.iter().take(1).cloned().collect()
    };
    let confirmed: BTreeSet<String> = streaming
        .iter()
        .filter(|(n, r)| desired.contains(n) && r.sync_state == "sync")
        .map(|(n, _)| n.clone())
        .collect();
    let after_before: BTreeSet<String> = current.intersection(&desired).cloned().collect();
    let key_before = (!ours || after_before != current).then(|| state(me, &after_before));
    let key_after = (confirmed != after_before).then(|| state(me, &confirmed));
    let standby_names = if desired.is_empty() {
        if mode.strict {
            "*".to_owned()
        } else {
            String::new()
        }
    } else {
        desired
            .iter()
            .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(",")
    };
    SyncPlan {
        key_before,
        standby_names,
        key_after,
        delete_key: false,
    }
}

/// May `me` race for the lock under synchronous mode? Only the `sync` leader and its listed
/// standbys may. Without a `sync` key nobody knows who has every acknowledged write (the key
/// may have been lost with the DCS's state, not just be unwritten yet): no standby may, and
/// the cluster waits for its former primary (`decide` lets a former primary race) or an
/// operator, as Patroni does.
pub fn may_race(enabled: bool, me: &str, view: &ClusterView) -> bool {
    if !enabled {
        return true;
    }
    match view.sync.as_ref().map(|s| &s.value) {
        None => false,
        Some(s) => {
            s.leader
                .as_deref()
                .is_some_and(|l| l.eq_ignore_ascii_case(me))
                || s.lists(me)
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_listed_names_keep_a_sync_key_true() {
        let recorded = SyncState {
            leader: Some("a".into()),
            sync_standby: Some("b".into()),
            quorum: 0,
        };
        assert!(acknowledges_only_through_recorded("", &recorded));
        assert!(acknowledges_only_through_recorded("\"b\"", &recorded));
        assert!(!acknowledges_only_through_recorded("*", &recorded));
        assert!(!acknowledges_only_through_recorded(
            "\"b\",\"c\"",
            &recorded
        ));
    }
    use super::*;
    use crate::dcs::{Member, MemberRecord, Versioned};

    fn view(sync: Option<SyncState>) -> ClusterView {
        ClusterView {
            members: ["a", "b", "c"]
                .iter()
                .map(|n| Member {
                    name: (*n).into(),
                    record: MemberRecord::default(),
                    revision: 1,
                    lease: 1,
                })
                .collect(),
            sync: sync.map(|value| Versioned { value, revision: 1 }),
            ..Default::default()
        }
    }

    fn row(app: &str, sync_state: &str) -> ReplicationRow {
        ReplicationRow {
            usename: "replicator".into(),
            application_name: app.into(),
            client_addr: None,
            state: "streaming".into(),
            sync_state: sync_state.into(),
            sync_priority: 0,
        }
    }

    const ON: SyncMode = SyncMode {
        enabled: true,
        strict: false,
    };

    #[test]
    fn new_standby_is_published_only_after_postgres_confirms_it() {
        let v = view(Some(state("a", &BTreeSet::new())));
        let p = plan(ON, "a", &v, &[row("b", "async")], &BTreeSet::new());
        assert_eq!(p.standby_names, "\"b\"");
        assert_eq!(p.key_after, None, "not yet confirmed by postgres");
        let p = plan(ON, "a", &v, &[row("b", "sync")], &BTreeSet::new());
        assert_eq!(
            p.key_after.and_then(|s| s.sync_standby),
            Some("b".to_owned())
        );
    }

    #[test]
    fn a_standby_that_stopped_streaming_leaves_the_key_before_postgres() {
        let v = view(Some(state("a", &["b".to_owned()].into())));
        let p = plan(ON, "a", &v, &[row("c", "async")], &BTreeSet::new());
        assert_eq!(
            p.key_before.map(|s| s.sync_standby),
            Some(None),
            "b removed from sync first"
        );
        assert_eq!(p.standby_names, "\"c\"");
    }

    #[test]
    fn a_new_leader_takes_the_key_over_without_naming_unconfirmed_standbys() {
        let v = view(Some(state("a", &["b".to_owned()].into())));
        let p = plan(ON, "b", &v, &[row("c", "async")], &BTreeSet::new());
        assert_eq!(
            p.key_before,
            Some(SyncState {
                leader: Some("b".into()),
                sync_standby: None,
                quorum: 0
            })
        );
    }

    #[test]
    fn strict_mode_blocks_writes_without_a_standby_and_nosync_is_skipped() {
        let v = view(None);
        let strict = SyncMode {
            enabled: true,
            strict: true,
        };
        let p = plan(
            strict,
            "a",
            &v,
            &[row("b", "async")],
            &["b".to_owned()].into(),
        );
        assert_eq!(p.standby_names, "*");
        let p = plan(ON, "a", &v, &[], &BTreeSet::new());
        assert_eq!(p.standby_names, "");
    }

    #[test]
    fn switching_sync_mode_off_deletes_the_key() {
        let v = view(Some(state("a", &BTreeSet::new())));
        let p = plan(SyncMode::default(), "a", &v, &[], &BTreeSet::new());
        assert!(p.delete_key);
        assert_eq!(p.standby_names, "");
    }

    #[test]
    fn only_sync_members_may_race() {
        let v = view(Some(state("a", &["b".to_owned()].into())));
        assert!(may_race(true, "b", &v));
        assert!(may_race(true, "a", &v));
        assert!(!may_race(true, "c", &v));
        assert!(may_race(false, "c", &v));
        // A lost (or not yet written) `sync` key names nobody.
        let lost = view(None);
        assert!(!may_race(true, "b", &lost));
        assert!(may_race(false, "b", &lost));
    }
}
