//! Major-version upgrades: raising `spec.postgresVersion` (15 → 17) on a running cluster.
//!
//! One step per reconcile, each decided by [`plan`] from what is observed, so a controller
//! restarted midway (or another one taking over) carries on where the last one stopped:
//!
//! 1. **Pending**: nothing is changed until the cluster can be upgraded safely: every member
//!    ready, a leader, not paused, and, when backups are configured, a backup that finished
//!    within [`BACKUP_MAX_AGE_HOURS`] hours (`pg_upgrade --link` leaves no way back to the old
//!    version but a backup). The status says what is missing.
//! 2. **Stopping**: the StatefulSet shrinks to one member. A leader other than ordinal 0 first
//!    hands over to it (the scale-down's switchover, [`crate::scale_down`]); then ordinal 0,
//!    the leader, is stopped last, cleanly, so nobody takes over and its shutdown checkpoint
//!    is the cluster's last WAL.
//! 3. **Upgrading**: with no Pod left, the template switches to the new version: the agent gets
//!    the binaries of both versions (`postgresql.bin_dirs`) and an init container runs
//!    `pgwarden upgrade-data-dir --if-needed` before every start. Ordinal 0 starts alone; its
//!    init container upgrades its data (`pg_upgrade --link`) and records the new system
//!    identifier; its agent leads on the new version.
//! 4. **Recloning**: every member: the replicas' init containers move their old data aside
//!    (it is of the cluster before the upgrade) and their agents clone the upgraded leader.
//! 5. **Succeeded** once every member is ready on the new version.
//!
//! The state is kept on the StatefulSet, written by the same apply that changes it:
//! [`POSTGRES_VERSION_ANNOTATION`](crate::render::POSTGRES_VERSION_ANNOTATION) (the version its
//! template runs), [`UPGRADE_TO_ANNOTATION`](crate::render::UPGRADE_TO_ANNOTATION) (stopping for
//! an upgrade, the template still the old version) and
//! [`UPGRADED_FROM_ANNOTATION`](crate::render::UPGRADED_FROM_ANNOTATION) (the template carries
//! the old binaries and the upgrade container; kept afterwards, so the finished upgrade does
//! not change the template again and restart every Pod).
//!
//! Pure: the reconciler gathers the inputs and acts.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::crd::{PostgresCluster, SpecError, UpgradeStatus};
use crate::render::{POSTGRES_VERSION_ANNOTATION, UPGRADED_FROM_ANNOTATION, UPGRADE_TO_ANNOTATION};
use crate::scale_down;
use crate::status::{PodView, ProgressNote};

/// A backup older than this does not count as a way back.
pub const BACKUP_MAX_AGE_HOURS: i64 = 24;

/// What the StatefulSet's annotations say about its template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Template {
    /// The major version the template runs.
    pub version: u32,
    /// Stopping for an upgrade to this version.
    pub upgrade_to: Option<u32>,
    /// The template was made for an upgrade from this version.
    pub upgraded_from: Option<u32>,
}

/// Whether a backup allows the upgrade, as the reconciler found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupCheck {
    /// `spec.backups` is not set: nothing to check.
    NotConfigured,
    /// Not asked (the plan does not need it at this step).
    NotAsked,
    /// A backup finished recently enough.
    Recent,
    /// None did, or the repository could not be read: why.
    Missing(String),
}

/// Everything the plan is decided from.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// `spec.postgresVersion`.
    pub target: u32,
    /// `None` before the StatefulSet exists (a new cluster starts on the target version), or
    /// when an older controller made it without the version annotation.
    pub template: Option<Template>,
    /// `spec.instances.replicas`.
    pub desired: i32,
    /// The StatefulSet's `spec.replicas`.
    pub current_replicas: Option<i32>,
    pub pods: &'a [PodView],
    /// Holder of the leader Lease.
    pub leader: Option<&'a str>,
    pub paused: bool,
    pub backup: BackupCheck,
    /// The PostgreSQL major version each member's agent reports (`GET /patroni`'s
    /// `server_version`), for the members that answered; only gathered when [`needs_versions`].
    pub server_majors: &'a BTreeMap<String, u32>,
    /// The previous `status.upgrade`.
    pub previous: Option<&'a UpgradeStatus>,
}

/// What the reconciler does about the version this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No upgrade under way: the template runs the spec's version (keeping `upgraded_from`).
    Steady { upgraded_from: Option<u32> },
    /// The spec's version cannot be applied; nothing is changed.
    Refused(SpecError),
    /// An upgrade waits for a precondition; nothing is changed yet.
    Pending { from: u32, to: u32, reason: String },
    /// Stopping the members for the upgrade; the template stays at `from`.
    Stopping {
        from: u32,
        to: u32,
        replicas: i32,
        /// The leader hands over to ordinal 0 first.
        switchover: Option<(String, String)>,
        note: String,
    },
    /// The template runs `to` with the upgrade container; `replicas` members.
    Starting {
        from: u32,
        to: u32,
        replicas: i32,
        phase: Phase,
        note: String,
        /// A member that is not ready and runs an older template (the spec changed since it
        /// started, e.g. an image that has the new version): deleted, so it starts again on
        /// the current one. Outside an upgrade the rollout does that; it waits for the upgrade.
        restart: Option<String>,
    },
    /// Every member is ready on `to`.
    Succeeded { from: u32, to: u32 },
}

/// `status.upgrade.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Stopping,
    Upgrading,
    Recloning,
    Succeeded,
    /// The spec went back to the running version while the upgrade was pending.
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Stopping => "Stopping",
            Phase::Upgrading => "Upgrading",
            Phase::Recloning => "Recloning",
            Phase::Succeeded => "Succeeded",
            Phase::Cancelled => "Cancelled",
        }
    }
}

/// How the objects are rendered for this plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rendering {
    /// The binaries' major version (the template's `postgres-version`).
    pub version: u32,
    pub upgrade_to: Option<u32>,
    pub upgraded_from: Option<u32>,
    /// The StatefulSet's `replicas`, when the plan decides it.
    pub replicas: Option<i32>,
}

impl Rendering {
    /// The cluster as the builders ([`crate::render`]) render it for this step: the version's
    /// binaries, and the upgrade's annotations for the StatefulSet, ConfigMap and template.
    pub fn apply_to(&self, pg: &PostgresCluster) -> PostgresCluster {
        let mut rendered = pg.clone();
        rendered.spec.postgres_version = self.version;
        let annotations = rendered.annotations_mut();
        for (key, value) in [
            (UPGRADE_TO_ANNOTATION, self.upgrade_to),
            (UPGRADED_FROM_ANNOTATION, self.upgraded_from),
        ] {
            match value {
                Some(v) => {
                    annotations.insert(key.to_owned(), v.to_string());
                }
                None => {
                    annotations.remove(key);
                }
            }
        }
        rendered
    }
}

/// What the StatefulSet's annotations say; `None` without the version annotation.
pub fn template_of(annotations: &BTreeMap<String, String>) -> Option<Template> {
    let read = |key: &str| annotations.get(key).and_then(|v| v.parse().ok());
    Some(Template {
        version: read(POSTGRES_VERSION_ANNOTATION)?,
        upgrade_to: read(UPGRADE_TO_ANNOTATION),
        upgraded_from: read(UPGRADED_FROM_ANNOTATION),
    })
}

/// Whether the plan needs the members' server versions at this point (asking every agent at
/// every reconcile of every cluster would be wasted).
pub fn needs_versions(
    target: u32,
    template: Option<Template>,
    previous: Option<&UpgradeStatus>,
) -> bool {
    template.is_some_and(|t| {
        t.version == target
            && t.upgraded_from.is_some()
            && !previous.is_some_and(|p| p.to == target && p.phase == Phase::Succeeded.as_str())
    })
}

/// Whether the plan needs to know about backups at this point: only before it commits.
pub fn needs_backup_check(target: u32, template: Option<Template>) -> bool {
    template.is_some_and(|t| target > t.version && t.upgrade_to.is_none())
}

pub fn plan(input: &Input<'_>) -> Plan {
    let target = input.target;
    let Some(template) = input.template else {
        return Plan::Steady {
            upgraded_from: None,
        };
    };
    let from = template.version;
    if let Some(to) = template.upgrade_to.filter(|to| *to > from) {
        if to != target {
            return Plan::Refused(SpecError {
                field: "postgresVersion".to_owned(),
                reason: format!(
                    "is {target}, but an upgrade from {from} to {to} is under way (its members \
                     are being stopped); set it back to {to}"
                ),
            });
        }
        return stopping(input, from, to);
    }
    if target < from {
        return Plan::Refused(SpecError {
            field: "postgresVersion".to_owned(),
            reason: format!(
                "is {target}, but the cluster's data directories are PostgreSQL {from}: a major \
                 version cannot be lowered (pg_upgrade only goes forward; restore a backup into a \
                 new cluster instead); nothing is changed until it is set back to {from}"
            ),
        });
    }
    if target > from {
        return match pending_reason(input) {
            Some(reason) => Plan::Pending {
                from,
                to: target,
                reason,
            },
            // Committed: the apply that shrinks the StatefulSet records `upgrade-to`.
            None => stopping(input, from, target),
        };
    }
    match template.upgraded_from {
        Some(old) if needs_versions(target, input.template, input.previous) => {
            starting(input, old, target)
        }
        upgraded_from => Plan::Steady { upgraded_from },
    }
}

impl Plan {
    pub fn rendering(&self, target: u32) -> Rendering {
        match self {
            Plan::Steady { upgraded_from } => Rendering {
                version: target,
                upgrade_to: None,
                upgraded_from: *upgraded_from,
                replicas: None,
            },
            // The objects stay as they were made (`version` is the template's).
            Plan::Refused(_) => Rendering {
                version: target,
                upgrade_to: None,
                upgraded_from: None,
                replicas: None,
            },
            Plan::Pending { from, .. } => Rendering {
                version: *from,
                upgrade_to: None,
                upgraded_from: None,
                replicas: None,
            },
            Plan::Stopping {
                from, to, replicas, ..
            } => Rendering {
                version: *from,
                upgrade_to: Some(*to),
                upgraded_from: None,
                replicas: Some(*replicas),
            },
            Plan::Starting {
                from, to, replicas, ..
            } => Rendering {
                version: *to,
                upgrade_to: None,
                upgraded_from: Some(*from),
                replicas: Some(*replicas),
            },
            Plan::Succeeded { from, to } => Rendering {
                version: *to,
                upgrade_to: None,
                upgraded_from: Some(*from),
                replicas: None,
            },
        }
    }

    /// Whether the upgrade owns the member count and the restarts this time (no scale-down
    /// or rollout of its own).
    pub fn in_progress(&self) -> bool {
        matches!(
            self,
            Plan::Pending { .. } | Plan::Stopping { .. } | Plan::Starting { .. }
        )
    }

    /// `status.upgrade` after this step (`target`: the spec's version); `None`: kept as it was.
    pub fn status(
        &self,
        previous: Option<&UpgradeStatus>,
        target: u32,
        now: &str,
    ) -> Option<UpgradeStatus> {
        let (from, to, phase, message) = match self {
            // The spec went back to the running version before anything was stopped.
            Plan::Steady { .. }
                if previous
                    .is_some_and(|p| p.phase == Phase::Pending.as_str() && p.from == target) =>
            {
                let p = previous?;
                return Some(UpgradeStatus {
                    phase: Phase::Cancelled.as_str().to_owned(),
                    message: format!(
                        "postgresVersion was set back to {target} before anything was stopped"
                    ),
                    finished_at: Some(now.to_owned()),
                    ..p.clone()
                });
            }
            Plan::Steady { .. } | Plan::Refused(_) => return None,
            Plan::Pending { from, to, reason } => (*from, *to, Phase::Pending, reason.clone()),
            Plan::Stopping { from, to, note, .. } => (*from, *to, Phase::Stopping, note.clone()),
            Plan::Starting {
                from,
                to,
                phase,
                note,
                ..
            } => (*from, *to, *phase, note.clone()),
            Plan::Succeeded { from, to } => (
                *from,
                *to,
                Phase::Succeeded,
                format!(
                    "every member runs PostgreSQL {to}; run `vacuumdb --all --analyze-in-stages` \
                     (pg_upgrade keeps no planner statistics) and remove the old data directories \
                     (`<data_dir>.pre-upgrade-{from}`) once all is well"
                ),
            ),
        };
        let same = previous.filter(|p| p.from == from && p.to == to);
        let started_at = same
            .and_then(|p| p.started_at.clone())
            .unwrap_or_else(|| now.to_owned());
        let finished_at = (phase == Phase::Succeeded).then(|| {
            same.and_then(|p| p.finished_at.clone())
                .unwrap_or_else(|| now.to_owned())
        });
        Some(UpgradeStatus {
            from,
            to,
            phase: phase.as_str().to_owned(),
            message,
            started_at: Some(started_at),
            finished_at,
        })
    }

    /// The `Progressing` condition while the upgrade runs.
    pub fn note(&self) -> Option<ProgressNote> {
        let message = match self {
            Plan::Pending { from, to, reason } => {
                format!("the upgrade from PostgreSQL {from} to {to} waits: {reason}")
            }
            Plan::Stopping { note, .. } | Plan::Starting { note, .. } => note.clone(),
            _ => return None,
        };
        Some(ProgressNote {
            reason: "Upgrading",
            message,
        })
    }
}

/// Why the upgrade cannot start now; `None`: it can.
fn pending_reason(input: &Input<'_>) -> Option<String> {
    if input.paused {
        return Some("the cluster is paused (resume it first)".to_owned());
    }
    if !input
        .leader
        .is_some_and(|l| input.pods.iter().any(|p| p.name == l))
    {
        return Some("the members have no leader".to_owned());
    }
    let existing = i32::try_from(input.pods.len()).unwrap_or(i32::MAX);
    if input.current_replicas != Some(existing) {
        return Some(format!(
            "{existing} member Pods exist, the StatefulSet has {}",
            input.current_replicas.unwrap_or(0)
        ));
    }
    if let Some(p) = input.pods.iter().find(|p| !healthy(p)) {
        return Some(format!("{} is not ready", p.name));
    }
    if let Some(p) = input.pods.iter().find(|p| p.terminating) {
        return Some(format!("{} is stopping", p.name));
    }
    match &input.backup {
        BackupCheck::NotConfigured | BackupCheck::Recent => None,
        BackupCheck::NotAsked => Some("the backups are being checked".to_owned()),
        BackupCheck::Missing(why) => Some(format!(
            "backups are configured but {why}: pg_upgrade --link leaves no way back to the old \
             version but a backup; take one (annotation `pgwarden.io/backup`) first"
        )),
    }
}

/// Step 2: shrink to ordinal 0 as the leader, then to none.
fn stopping(input: &Input<'_>, from: u32, to: u32) -> Plan {
    let current = input.current_replicas.unwrap_or(0);
    let others: Vec<&PodView> = input
        .pods
        .iter()
        .filter(|p| scale_down::ordinal(&p.name) != Some(0))
        .collect();
    let first = input
        .pods
        .iter()
        .find(|p| scale_down::ordinal(&p.name) == Some(0));
    let stop = |replicas: i32, switchover: Option<(String, String)>, note: String| Plan::Stopping {
        from,
        to,
        replicas,
        switchover,
        note,
    };
    if current > 1 {
        return match scale_down::plan(1, Some(current), input.pods, input.leader, input.paused) {
            scale_down::Plan::Switchover {
                primary, candidate, ..
            } => stop(
                current,
                Some((primary.clone(), candidate.clone())),
                format!(
                    "upgrading to PostgreSQL {to}: switching over from {primary} to {candidate}, \
                     which is stopped last"
                ),
            ),
            scale_down::Plan::Hold { reason, .. } => stop(
                current,
                None,
                format!("upgrading to PostgreSQL {to}: stopping the replicas waits: {reason}"),
            ),
            scale_down::Plan::Proceed if input.leader.is_none() => stop(
                current,
                None,
                format!(
                    "upgrading to PostgreSQL {to}: waiting for a leader before the replicas are \
                     stopped"
                ),
            ),
            scale_down::Plan::Proceed => stop(
                1,
                None,
                format!("upgrading to PostgreSQL {to}: stopping the replicas"),
            ),
        };
    }
    if current == 1 {
        if let Some(p) = others.first() {
            return stop(
                1,
                None,
                format!(
                    "upgrading to PostgreSQL {to}: waiting for {} to stop",
                    p.name
                ),
            );
        }
        return stop(
            0,
            None,
            format!(
                "upgrading to PostgreSQL {to}: stopping {} last",
                first.map_or("the leader", |p| p.name.as_str())
            ),
        );
    }
    if let Some(p) = input.pods.first() {
        return stop(
            0,
            None,
            format!(
                "upgrading to PostgreSQL {to}: waiting for {} to stop",
                p.name
            ),
        );
    }
    // Every member is down: the template switches (the next reconcile sees `Starting`).
    Plan::Starting {
        from,
        to,
        replicas: 1,
        phase: Phase::Upgrading,
        note: upgrading_note(from, to, "starting"),
        restart: None,
    }
}

fn upgrading_note(from: u32, to: u32, what: &str) -> String {
    format!(
        "upgrading from PostgreSQL {from} to {to}: the first member is {what} (its init container \
         `upgrade` runs pg_upgrade)"
    )
}

/// Steps 3 to 5: ordinal 0 alone until it leads on the new version, then every member.
fn starting(input: &Input<'_>, from: u32, to: u32) -> Plan {
    let restart = input
        .pods
        .iter()
        .find(|p| !p.ready && !p.current_revision && !p.terminating)
        .map(|p| p.name.clone());
    let on_target = |p: &PodView| healthy(p) && input.server_majors.get(&p.name) == Some(&to);
    let first = input
        .pods
        .iter()
        .find(|p| scale_down::ordinal(&p.name) == Some(0));
    let first_leads = first.is_some_and(|p| input.leader == Some(p.name.as_str()) && on_target(p));
    if !first_leads {
        // Nobody else starts before the upgraded leader has recorded the new identifier: a
        // replica's data would look like the cluster's own and be refused.
        let what = match first {
            None => "starting".to_owned(),
            Some(p) if !p.ready => format!("{} upgrading or starting", p.name),
            Some(p) => format!("{} starting", p.name),
        };
        return Plan::Starting {
            from,
            to,
            replicas: 1,
            phase: Phase::Upgrading,
            note: upgrading_note(from, to, &what),
            restart,
        };
    }
    let desired = input.desired.max(1);
    let ready = input.pods.iter().filter(|p| on_target(p)).count();
    let all = usize::try_from(desired).is_ok_and(|d| ready == d && input.pods.len() == d);
    if all {
        return Plan::Succeeded { from, to };
    }
    Plan::Starting {
        from,
        to,
        replicas: desired,
        phase: Phase::Recloning,
        note: format!(
            "upgrading from PostgreSQL {from} to {to}: the replicas clone the upgraded leader \
             ({ready} of {desired} members ready on {to})"
        ),
        restart,
    }
}

fn healthy(pod: &PodView) -> bool {
    pod.ready && !pod.terminating && pod.member.as_ref().is_some_and(|m| m.state == "running")
}

/// Whether a finished backup in `pgbackrest info --output=json` (the leader's `GET /backups`)
/// is recent enough, at `now` (seconds since the epoch).
pub fn backup_check(info: &serde_json::Value, now: i64) -> BackupCheck {
    let newest = info
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|stanza| stanza["backup"].as_array().into_iter().flatten())
        .filter(|b| b["error"].as_bool() != Some(true))
        .filter_map(|b| b["timestamp"]["stop"].as_i64())
        .max();
    match newest {
        None => BackupCheck::Missing("the repository has no backup".to_owned()),
        Some(stop) if now - stop > BACKUP_MAX_AGE_HOURS * 3600 => BackupCheck::Missing(format!(
            "the newest backup finished {} hours ago (more than {BACKUP_MAX_AGE_HOURS})",
            (now - stop) / 3600
        )),
        Some(_) => BackupCheck::Recent,
    }
}

#[cfg(test)]
mod tests;
