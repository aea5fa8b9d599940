//! Scaling down without failing over.
//!
//! A StatefulSet removes its highest ordinals. When the leader is among them, lowering
//! `replicas` at once would stop the leader's Pod and make the agents fail over (a lost leader,
//! a wait for a new election, possibly writes in flight refused). Instead, each reconcile asks
//! [`plan`] what to do:
//!
//! 1. not a scale-down, no leader to protect, or the leader stays: lower `replicas` now;
//! 2. the leader departs: keep the current `replicas` and ask the leader's agent for a planned
//!    switchover to a healthy staying member (the lowest ordinal, streaming preferred);
//! 3. once the agents publish that member as leader, rule 1 applies;
//! 4. nobody staying can take over, or the cluster is paused (a paused cluster is under manual
//!    control, and with no automatic failover a removed leader would leave it without one):
//!    keep the current `replicas` and say why; every later reconcile looks again.
//!
//! Pure: the reconciler gathers the Pods, the leader Lease and the pause flag, and acts.

use crate::status::{PodView, ProgressNote};

/// What the scale-down needs this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The StatefulSet gets the spec's `replicas`.
    Proceed,
    /// The leader departs: the StatefulSet keeps `keep` members while the leader hands over.
    Switchover {
        primary: String,
        candidate: String,
        keep: i32,
        target: i32,
    },
    /// Not yet: the StatefulSet keeps `keep` members; `reason` says why.
    Hold {
        keep: i32,
        target: i32,
        reason: String,
    },
}

impl Plan {
    /// The `replicas` the StatefulSet gets this time.
    pub fn replicas(&self, desired: i32) -> i32 {
        match self {
            Plan::Proceed => desired,
            Plan::Switchover { keep, .. } | Plan::Hold { keep, .. } => *keep,
        }
    }

    /// What goes into the `Progressing` condition while the scale-down waits.
    pub fn note(&self) -> Option<ProgressNote> {
        match self {
            Plan::Proceed => None,
            Plan::Switchover { .. } => Some(ProgressNote {
                reason: "ScaleDownSwitchover",
                message: self.to_string(),
            }),
            Plan::Hold { .. } => Some(ProgressNote {
                reason: "ScaleDownBlocked",
                message: self.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Proceed => write!(f, "nothing stands in the way of the member count"),
            Plan::Switchover {
                primary,
                candidate,
                target,
                ..
            } => write!(
                f,
                "switching over from {primary} to {candidate} before scaling down to {target} \
                 members ({primary} would be removed)"
            ),
            Plan::Hold {
                keep,
                target,
                reason,
            } => write!(
                f,
                "scaling down to {target} members waits ({keep} kept): {reason}; retrying"
            ),
        }
    }
}

/// The scale-down step. `desired`: the spec's member count; `current`: the StatefulSet's
/// `replicas` (`None` before it exists); `pods`: the member Pods; `leader`: the holder of the
/// leader Lease; `paused`: the agents' `config.pause`.
pub fn plan(
    desired: i32,
    current: Option<i32>,
    pods: &[PodView],
    leader: Option<&str>,
    paused: bool,
) -> Plan {
    let Some(current) = current.filter(|c| *c > desired) else {
        return Plan::Proceed;
    };
    // No leader (an election under way, or a Lease naming a Pod that is gone): there is nobody
    // to hand over from, and holding members back would not help the agents elect one.
    let Some(leader_pod) = leader.and_then(|l| pods.iter().find(|p| p.name == l)) else {
        return Plan::Proceed;
    };
    if !departs(&leader_pod.name, desired) {
        return Plan::Proceed;
    }
    let hold = |reason: String| Plan::Hold {
        keep: current,
        target: desired,
        reason,
    };
    let leader = leader_pod.name.as_str();
    if paused {
        return hold(format!(
            "the leader {leader} would be removed and the cluster is paused (no switchover while \
             paused); resume it or switch over to a staying member by hand"
        ));
    }
    if leader_pod.terminating || !healthy(leader_pod) {
        return hold(format!(
            "the leader {leader} would be removed and is not ready to hand over"
        ));
    }
    let candidate = pods
        .iter()
        .filter(|p| p.name != leader && !departs(&p.name, desired))
        .filter(|p| !p.terminating && healthy(p))
        .filter(|p| {
            p.member.as_ref().is_some_and(|m| {
                m.replication_state.as_deref() != Some("in archive recovery") && !nofailover(m)
            })
        })
        // The lowest ordinal is the last a later scale-down removes; a streaming one first.
        .min_by_key(|p| {
            let streaming = p
                .member
                .as_ref()
                .and_then(|m| m.replication_state.as_deref())
                == Some("streaming");
            (!streaming, ordinal(&p.name).unwrap_or(i64::MAX))
        });
    match candidate {
        Some(c) => Plan::Switchover {
            primary: leader.to_owned(),
            candidate: c.name.clone(),
            keep: current,
            target: desired,
        },
        None => hold(format!(
            "the leader {leader} would be removed and no staying member is ready and \
             replicating to take over"
        )),
    }
}

/// Pods left after the scale-down: ordinals below `desired`. A name without an ordinal is not
/// the StatefulSet's to remove.
pub fn stays(name: &str, desired: i32) -> bool {
    !departs(name, desired)
}

fn departs(name: &str, desired: i32) -> bool {
    ordinal(name).is_some_and(|o| o >= i64::from(desired))
}

/// Ready, and its agent reports postgres running.
fn healthy(pod: &PodView) -> bool {
    pod.ready && pod.member.as_ref().is_some_and(|m| m.state == "running")
}

/// The `nofailover` tag: the agents never promote such a member, and refuse it as a candidate.
fn nofailover(member: &crate::status::MemberRecord) -> bool {
    member
        .tags
        .get("nofailover")
        .and_then(pgwarden_api::parse_bool)
        .unwrap_or(false)
}

/// The StatefulSet ordinal at the end of a Pod name (`pg-2` → 2).
pub fn ordinal(name: &str) -> Option<i64> {
    name.rsplit_once('-')
        .and_then(|(_, o)| o.parse().ok())
        .filter(|o: &i64| *o >= 0)
}

#[cfg(test)]
mod tests;
