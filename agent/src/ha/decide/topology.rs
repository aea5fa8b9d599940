//! Who streams from whom, and who clones from whom: Patroni's `replicatefrom` (cascading
//! replication) and `clonefrom` tags, read from the member records. One function decides a
//! member's upstream, for the member itself (its `primary_conninfo`) and for the member it
//! streams from (which keeps its replication slot), so the two always agree.

use std::collections::BTreeSet;

use crate::dcs::ClusterView;

/// A member usable as an upstream: its record says postgres runs and where to reach it.
fn serves(view: &ClusterView, name: &str) -> bool {
    view.member(name)
        .is_some_and(|m| m.record.state == "running" && m.record.host_port().is_some())
}

fn replicatefrom_of<'a>(view: &'a ClusterView, name: &str) -> Option<&'a str> {
    view.member(name)
        .and_then(|m| m.record.tags.get("replicatefrom"))
        .and_then(|v| v.as_str())
}

/// The member `name` streams from: the one its `replicatefrom` tag names while that member
/// runs and does not itself name `name` (no loop of two); the leader otherwise (Patroni falls
/// back to the leader when the tagged member is gone).
pub fn upstream_of(
    view: &ClusterView,
    leader: &str,
    name: &str,
    replicatefrom: Option<&str>,
) -> String {
    match replicatefrom {
        Some(from)
            if from != name
                && from != leader
                && serves(view, from)
                && replicatefrom_of(view, from) != Some(name) =>
        {
            from.to_owned()
        }
        _ => leader.to_owned(),
    }
}

/// The members that stream from `me` (each by its own record's `replicatefrom`), the leader
/// and members tagged `nostream` (they replay from the archive) excluded: those `me` keeps a
/// replication slot for.
pub fn downstream_of(view: &ClusterView, leader: &str, me: &str) -> BTreeSet<String> {
    view.members
        .iter()
        .filter(|m| m.name != me && m.name != leader && !m.record.tag_bool("nostream"))
        .filter(|m| upstream_of(view, leader, &m.name, replicatefrom_of(view, &m.name)) == me)
        .map(|m| m.name.clone())
        .collect()
}

/// Patroni's `get_slot_name_on_primary`: the physical slot on the leader through which `me`'s
/// WAL and feedback flow — its own, or for a cascading member that of the member of its chain
/// that streams from the leader (chains followed as `upstream_of` does). `None` when a member
/// of the chain (`me` too: `nostream`) does not stream, or the chain loops: such a member
/// keeps no permanent logical slot, its feedback would not reach the leader.
pub fn slot_on_leader(
    view: &ClusterView,
    leader: &str,
    me: &str,
    replicatefrom: Option<&str>,
    nostream: bool,
) -> Option<String> {
    if nostream {
        return None;
    }
    let mut seen = BTreeSet::from([me.to_owned()]);
    let mut name = me.to_owned();
    let mut upstream = upstream_of(view, leader, me, replicatefrom);
    while upstream != leader {
        let streams = view
            .member(&upstream)
            .is_some_and(|m| !m.record.tag_bool("nostream"));
        if !streams || !seen.insert(upstream.clone()) {
            return None;
        }
        name = upstream;
        upstream = upstream_of(view, leader, &name, replicatefrom_of(view, &name));
    }
    Some(crate::postgres::replica::slot_name(&name))
}

/// Patroni's `should_enforce_hot_standby_feedback` for the members below `me`: does a member
/// tagged `replicatefrom: me` (the leader excluded), or one below it, keep permanent logical
/// slots? Their feedback reaches the leader only through `me`, so `me` must pass it on, even
/// when it keeps none itself (`nofailover`). A member keeps them when it may lead and its
/// WAL flows from the leader (see [`slot_on_leader`]).
pub fn cascade_keeps_logical_slots(view: &ClusterView, leader: &str, me: &str) -> bool {
    let mut seen = BTreeSet::from([me.to_owned()]);
    let mut below = vec![me.to_owned()];
    while let Some(name) = below.pop() {
        for m in view
            .members
            .iter()
            .filter(|m| m.name != leader && replicatefrom_of(view, &m.name) == Some(name.as_str()))
        {
            if !seen.insert(m.name.clone()) {
                continue;
            }
            let keeps = !m.record.tag_bool("nofailover")
                && slot_on_leader(
                    view,
                    leader,
                    &m.name,
                    replicatefrom_of(view, &m.name),
                    m.record.tag_bool("nostream"),
                )
                .is_some();
            if keeps {
                return true;
            }
            below.push(m.name.clone());
        }
    }
    false
}

/// Where a new replica is cloned from: a running member tagged `clonefrom` (the first by name;
/// Patroni picks one at random), else the leader.
pub fn clone_source(view: &ClusterView, leader: &str, me: &str) -> String {
    view.members
        .iter()
        .filter(|m| m.name != me && m.record.tag_bool("clonefrom") && serves(view, &m.name))
        .map(|m| m.name.clone())
        .min()
        .unwrap_or_else(|| leader.to_owned())
}
