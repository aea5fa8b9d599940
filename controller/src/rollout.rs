//! The order of restarts when the Pod template changed (a new StatefulSet revision).
//!
//! The StatefulSet uses `OnDelete`, so nothing restarts until the controller deletes a Pod.
//! Each reconcile asks [`next_step`] for one step:
//!
//! 1. never while the agents have no leader, or while a member is stopping or not ready (one
//!    restart at a time, and never on top of a failover);
//! 2. outdated replicas first, highest ordinal first;
//! 3. then a switchover to the healthiest updated replica through the agents' REST API;
//! 4. the former primary is then a replica and restarts by rule 2.
//!
//! A single-member cluster has nobody to hand over to: its only Pod is restarted last.

use crate::status::PodView;

/// What the controller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Every Pod runs the current revision.
    UpToDate,
    /// Nothing to do this time; the reason goes into the `Progressing` condition.
    Wait(String),
    /// Delete this replica's Pod; the StatefulSet re-creates it from the new template.
    RestartReplica(String),
    /// Ask the primary's agent to hand over to `candidate`.
    Switchover { primary: String, candidate: String },
    /// Delete the primary's Pod: only in a single-member cluster.
    RestartPrimary(String),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::UpToDate => write!(f, "all members run the current revision"),
            Step::Wait(reason) => write!(f, "waiting: {reason}"),
            Step::RestartReplica(pod) => write!(f, "restarting replica {pod}"),
            Step::Switchover { primary, candidate } => {
                write!(f, "switching over from {primary} to {candidate}")
            }
            Step::RestartPrimary(pod) => write!(f, "restarting the only member {pod}"),
        }
    }
}

/// The next rollout step. `pods` are the cluster's member Pods; `leader` is the holder of the
/// leader Lease.
pub fn next_step(pods: &[PodView], leader: Option<&str>) -> Step {
    if pods.iter().all(|p| p.current_revision) {
        return Step::UpToDate;
    }
    if let Some(p) = pods.iter().find(|p| p.terminating) {
        return Step::Wait(format!("{} is stopping", p.name));
    }
    let Some(leader) = leader.filter(|l| pods.iter().any(|p| p.name == *l)) else {
        return Step::Wait("the agents have no leader".to_owned());
    };
    if let Some(p) = pods.iter().find(|p| !healthy(p)) {
        return Step::Wait(format!("{} is not ready", p.name));
    }

    let mut outdated_replicas: Vec<&PodView> = pods
        .iter()
        .filter(|p| !p.current_revision && p.name != leader)
        .collect();
    outdated_replicas.sort_by_key(|p| std::cmp::Reverse(ordinal(&p.name)));
    if let Some(p) = outdated_replicas.first() {
        return Step::RestartReplica(p.name.clone());
    }

    // Only the primary is left.
    if pods.len() == 1 {
        return Step::RestartPrimary(leader.to_owned());
    }
    let candidate = pods
        .iter()
        .filter(|p| p.name != leader && p.current_revision)
        .filter(|p| {
            p.member
                .as_ref()
                .is_some_and(|m| m.replication_state.as_deref() != Some("in archive recovery"))
        })
        .max_by_key(|p| {
            (
                p.member.as_ref().and_then(|m| m.xlog_location).unwrap_or(0),
                std::cmp::Reverse(ordinal(&p.name)),
            )
        });
    match candidate {
        Some(c) => Step::Switchover {
            primary: leader.to_owned(),
            candidate: c.name.clone(),
        },
        None => Step::Wait("no updated replica is streaming to switch over to".to_owned()),
    }
}

/// Ready, and its agent reports postgres running.
fn healthy(pod: &PodView) -> bool {
    pod.ready && pod.member.as_ref().is_some_and(|m| m.state == "running")
}

/// The StatefulSet ordinal at the end of a Pod name (`pg-2` → 2).
fn ordinal(name: &str) -> i64 {
    name.rsplit('-')
        .next()
        .and_then(|o| o.parse().ok())
        .unwrap_or(-1)
}

#[cfg(test)]
mod tests;
