//! The `PostgresCluster` status, computed from what the agents publish: the holder of the
//! leader Lease and each member's record (Patroni's member JSON) in its Pod's annotation.
//! A pure function of its inputs; the reconciler gathers them and writes the result.

use crate::crd::{Condition, MemberStatus, PostgresClusterStatus, SpecError};

/// Annotation on each member Pod holding its member record, as Patroni's Kubernetes DCS writes
/// it.
pub const MEMBER_ANNOTATION: &str = "status";

/// The member record agents publish (shared with the agent: `pgwarden-api`).
pub use pgwarden_api::MemberRecord;

/// The member record in a Pod's annotation; `None` when it is missing or unreadable (a Pod
/// whose agent has not published yet).
pub fn member_of(annotation: Option<&str>) -> Option<MemberRecord> {
    annotation.and_then(MemberRecord::parse)
}

/// One member Pod as the reconciler saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodView {
    pub name: String,
    /// The Pod's Ready condition.
    pub ready: bool,
    /// The Pod runs the StatefulSet's current revision.
    pub current_revision: bool,
    /// Being deleted (a restart in progress).
    pub terminating: bool,
    pub member: Option<MemberRecord>,
}

/// A `Progressing` condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressNote {
    pub reason: &'static str,
    pub message: String,
}

/// Everything the status is computed from.
#[derive(Debug, Clone, Default)]
pub struct StatusInput<'a> {
    pub generation: Option<i64>,
    pub desired_members: i32,
    /// `holderIdentity` of the leader Lease, if there is a Lease with a holder.
    pub lease_holder: Option<String>,
    pub pods: Vec<PodView>,
    /// Problems in the spec that the schema could not reject.
    pub spec_errors: &'a [SpecError],
    /// What the rollout is doing, if anything (`rollout::Step` as a sentence).
    pub rollout: Option<String>,
    /// Why a scale-down waits, if it does (`scale_down::Plan`); it comes before the rollout.
    pub scale_down: Option<ProgressNote>,
    /// The previous status, for `lastTransitionTime`.
    pub previous: Option<&'a PostgresClusterStatus>,
    /// RFC 3339 now.
    pub now: String,
}

/// States after which a member will not come back without help.
const FAILED_STATES: &[&str] = &[
    "initdb failed",
    "custom bootstrap failed",
    "start failed",
    "restart failed",
    "stop failed",
    "crashed",
];

pub fn compute(input: &StatusInput<'_>) -> PostgresClusterStatus {
    let mut pods: Vec<&PodView> = input.pods.iter().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));

    // The primary is who holds the Lease; a Lease naming a Pod that does not exist (any more)
    // is reported as no primary.
    let primary = input
        .lease_holder
        .as_ref()
        .filter(|holder| pods.iter().any(|p| &&p.name == holder))
        .cloned();
    let primary_position = primary.as_ref().and_then(|name| {
        pods.iter()
            .find(|p| &p.name == name)
            .and_then(|p| p.member.as_ref())
            .and_then(|m| m.xlog_location)
    });

    let members: Vec<MemberStatus> = pods
        .iter()
        .map(|pod| {
            let record = pod.member.clone().unwrap_or_default();
            let is_primary = primary.as_deref() == Some(pod.name.as_str());
            let lag_bytes = match (is_primary, primary_position, record.xlog_location) {
                (false, Some(p), Some(own)) => {
                    Some(i64::try_from(p.saturating_sub(own)).unwrap_or(i64::MAX))
                }
                (true, _, _) => Some(0),
                _ => None,
            };
            MemberStatus {
                name: pod.name.clone(),
                role: if pod.member.is_some() {
                    record.role.clone()
                } else {
                    "unknown".to_owned()
                },
                state: if pod.member.is_some() {
                    record.state.clone()
                } else {
                    "unknown".to_owned()
                },
                timeline: record.timeline.map(i64::from),
                lag_bytes,
                ready: pod.ready,
                pending_restart: record.pending_restart.unwrap_or(false),
            }
        })
        .collect();

    let ready_members =
        i32::try_from(members.iter().filter(|m| m.ready).count()).unwrap_or(i32::MAX);
    let primary_running = primary.as_ref().is_some_and(|name| {
        members
            .iter()
            .any(|m| &m.name == name && m.state == "running")
    });
    let failed: Vec<&str> = members
        .iter()
        .filter(|m| FAILED_STATES.contains(&m.state.as_str()))
        .map(|m| m.name.as_str())
        .collect();

    let mut conditions = Vec::new();
    let previous = input
        .previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let mut push = |kind: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" };
        let last_transition_time = previous
            .iter()
            .find(|c| c.kind == kind && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| input.now.clone());
        conditions.push(Condition {
            kind: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time: Some(last_transition_time),
            observed_generation: input.generation,
        });
    };

    // Ready: a running primary and every desired member ready.
    if !input.spec_errors.is_empty() {
        push(
            "Ready",
            false,
            "InvalidSpec",
            join_errors(input.spec_errors),
        );
    } else if !primary_running {
        push(
            "Ready",
            false,
            "NoPrimary",
            "no member holds the leader Lease with postgres running".to_owned(),
        );
    } else if ready_members < input.desired_members {
        push(
            "Ready",
            false,
            "MembersNotReady",
            format!("{ready_members} of {} members ready", input.desired_members),
        );
    } else {
        push(
            "Ready",
            true,
            "AllMembersReady",
            format!("{ready_members} members ready"),
        );
    }

    // Progressing: the cluster is moving towards the spec.
    let existing = i32::try_from(pods.len()).unwrap_or(i32::MAX);
    if let Some(note) = &input.scale_down {
        push("Progressing", true, note.reason, note.message.clone());
    } else if let Some(step) = &input.rollout {
        push("Progressing", true, "RollingUpdate", step.clone());
    } else if existing != input.desired_members {
        push(
            "Progressing",
            true,
            "Scaling",
            format!("{existing} of {} members exist", input.desired_members),
        );
    } else if ready_members < input.desired_members {
        push(
            "Progressing",
            true,
            "MembersStarting",
            format!("{ready_members} of {} members ready", input.desired_members),
        );
    } else {
        push(
            "Progressing",
            false,
            "UpToDate",
            "all members run the current spec".to_owned(),
        );
    }

    // Degraded: something needs a human.
    if !input.spec_errors.is_empty() {
        push(
            "Degraded",
            true,
            "InvalidSpec",
            join_errors(input.spec_errors),
        );
    } else if !failed.is_empty() {
        push(
            "Degraded",
            true,
            "MemberFailed",
            format!("failed members: {}", failed.join(", ")),
        );
    } else if !primary_running && existing > 0 && members.iter().any(|m| m.state == "running") {
        push(
            "Degraded",
            true,
            "NoPrimary",
            "members run but none is primary".to_owned(),
        );
    } else {
        push("Degraded", false, "AsExpected", String::new());
    }

    PostgresClusterStatus {
        observed_generation: input.generation,
        primary,
        ready_members,
        members,
        conditions,
        current_revision: input.previous.and_then(|p| p.current_revision.clone()),
        manual_backup: input.previous.and_then(|p| p.manual_backup.clone()),
        upgrade: input.previous.and_then(|p| p.upgrade.clone()),
    }
}

fn join_errors(errors: &[SpecError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Member Pods as the plans' tests build them.
#[cfg(test)]
pub(crate) mod test_pods {
    use super::{MemberRecord, PodView};

    /// A ready Pod whose agent runs postgres as `role` (a replica streams).
    pub fn pod(name: &str, role: &str) -> PodView {
        PodView {
            name: name.to_owned(),
            ready: true,
            current_revision: true,
            terminating: false,
            member: Some(MemberRecord {
                role: role.to_owned(),
                state: "running".to_owned(),
                xlog_location: Some(100),
                replication_state: (role == "replica").then(|| "streaming".to_owned()),
                ..MemberRecord::default()
            }),
        }
    }

    /// `pg-0` .. `pg-{n-1}`, `leader` the primary.
    pub fn cluster(n: usize, leader: usize) -> Vec<PodView> {
        (0..n)
            .map(|i| {
                let role = if i == leader { "primary" } else { "replica" };
                pod(&format!("pg-{i}"), role)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
