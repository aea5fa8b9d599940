//! On-demand backups from the resource, as PGO's users know them: the annotation
//! `pgwarden.io/backup: <id>` asks for one backup of `spec.backups.manual` (type, and
//! repository as `repoName`), the controller sends `POST /backup` (`{"type", "repo": <n>}`)
//! to the leader's agent once per id and follows it in
//! `status.manualBackup` until the agent reports how it ended (`GET /patroni`, key
//! `pgbackrest`: `running`, then `last`, both carrying the `started_at` of the 202 answer).
//!
//! An id is recorded in `status.manualBackup` as soon as the agent accepted it and is never
//! started again; a refused request (a backup already running, no leader, a switchover due)
//! is retried at the next reconcile.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::crd::{ManualBackupStatus, PostgresCluster, BACKUP_ANNOTATION};

/// What the reconcile should do about the annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// No annotation, no backups configured, or the recorded backup ended.
    Nothing,
    /// Ask the leader for the backup `id`, into repository number `repo` (`None`: the
    /// agent's default, repo1).
    Start {
        id: String,
        kind: Option<String>,
        repo: Option<u32>,
    },
    /// Follow the recorded backup on its member.
    Follow,
}

/// The annotation's id against `status.manualBackup`.
pub fn need(pg: &PostgresCluster) -> Need {
    let Some(id) = pg
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BACKUP_ANNOTATION))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
    else {
        return Need::Nothing;
    };
    let Some(backups) = &pg.spec.backups else {
        return Need::Nothing;
    };
    match pg.status.as_ref().and_then(|s| s.manual_backup.as_ref()) {
        Some(done) if done.id == id => {
            if done.finished {
                Need::Nothing
            } else {
                Need::Follow
            }
        }
        _ => Need::Start {
            id,
            kind: backups.manual.as_ref().and_then(|m| m.kind.clone()),
            // The agent numbers repositories by position (`validate` keeps names in order
            // and refuses a `repoName` that is not listed).
            repo: backups
                .manual
                .as_ref()
                .and_then(|m| m.repo_name.as_ref())
                .and_then(|name| {
                    backups
                        .pgbackrest
                        .repos
                        .iter()
                        .position(|r| &r.name == name)
                })
                .and_then(|i| u32::try_from(i + 1).ok()),
        },
    }
}

/// The status of a backup the agent accepted, from its 202 body.
pub fn accepted(id: &str, body: &str) -> Option<ManualBackupStatus> {
    let v: Value = serde_json::from_str(body).ok()?;
    Some(ManualBackupStatus {
        id: id.to_owned(),
        kind: v["type"].as_str()?.to_owned(),
        repo_name: v["repo"].as_u64().map(|n| format!("repo{n}")),
        member: v["member"].as_str()?.to_owned(),
        started_at: v["started_at"].as_str()?.to_owned(),
        ..ManualBackupStatus::default()
    })
}

/// A backup the agent no longer reports (neither running nor its last one) is given up after
/// this long: the agent restarted or lost its leadership before it recorded the run.
const LOST_AFTER_SECONDS: i64 = 60;

/// How the backup stands in the member's `GET /patroni` body; `None`: still running (or not
/// known yet). A later answer never changes a finished status.
pub fn progress(
    current: &ManualBackupStatus,
    patroni: &Value,
    now: DateTime<Utc>,
) -> Option<ManualBackupStatus> {
    let ours = DateTime::parse_from_rfc3339(&current.started_at).ok()?;
    // Agents before the 202 answer carried `running.started_at` answered with their clock a
    // moment later: a manual run started within 2 s before the answer is the same one.
    let same = |v: &Value| {
        v["started_at"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .is_some_and(|t| {
                t == ours
                    || (v["trigger"].as_str() == Some("manual")
                        && t <= ours
                        && (ours - t).num_milliseconds() <= 2000)
            })
    };
    let report = &patroni["pgbackrest"];
    if same(&report["running"]) {
        return None;
    }
    let last = &report["last"];
    if same(last) {
        let ok = last["ok"].as_bool() == Some(true);
        let message = if ok {
            String::new()
        } else if last["interrupted"].as_bool() == Some(true) {
            "interrupted by the agent (a switchover, a restart or a lost leadership)".to_owned()
        } else {
            last["error"].as_str().unwrap_or("failed").to_owned()
        };
        return Some(ManualBackupStatus {
            finished: true,
            succeeded: ok,
            message,
            ..current.clone()
        });
    }
    if (now - ours.with_timezone(&Utc)).num_seconds() > LOST_AFTER_SECONDS {
        return Some(ManualBackupStatus {
            finished: true,
            succeeded: false,
            message: format!(
                "{} no longer reports this backup (restarted or no longer the leader)",
                current.member
            ),
            ..current.clone()
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(annotation: Option<&str>, status: Option<ManualBackupStatus>) -> PostgresCluster {
        let mut pg: PostgresCluster = serde_json::from_value(json!({
            "apiVersion": "pgwarden.io/v1alpha1",
            "kind": "PostgresCluster",
            "metadata": {"name": "pg", "namespace": "db"},
            "spec": {
                "postgresVersion": 16,
                "instances": {"replicas": 1, "storage": {"size": "1Gi"}},
                "backups": {"pgbackrest": {"repos": [{"name": "repo1"}, {"name": "repo2", "path": "/r2"}]}, "manual": {"type": "full"}},
            },
        }))
        .expect("cluster");
        if let Some(a) = annotation {
            pg.metadata.annotations = Some([(BACKUP_ANNOTATION.to_owned(), a.to_owned())].into());
        }
        if let Some(s) = status {
            pg.status = Some(crate::crd::PostgresClusterStatus {
                manual_backup: Some(s),
                ..Default::default()
            });
        }
        pg
    }

    fn recorded(id: &str, finished: bool) -> ManualBackupStatus {
        ManualBackupStatus {
            id: id.to_owned(),
            kind: "full".to_owned(),
            repo_name: None,
            member: "pg-0".to_owned(),
            started_at: "2026-12-05T08:00:00Z".to_owned(),
            finished,
            succeeded: finished,
            message: String::new(),
        }
    }

    #[test]
    fn an_id_starts_once_and_is_followed_until_it_ends() {
        assert_eq!(need(&cluster(None, None)), Need::Nothing);
        let start = Need::Start {
            id: "b1".to_owned(),
            kind: Some("full".to_owned()),
            repo: None,
        };
        assert_eq!(need(&cluster(Some("b1"), None)), start);
        assert_eq!(
            need(&cluster(Some("b1"), Some(recorded("b1", false)))),
            Need::Follow
        );
        assert_eq!(
            need(&cluster(Some("b1"), Some(recorded("b1", true)))),
            Need::Nothing
        );
        assert_eq!(
            need(&cluster(Some(" b1 "), Some(recorded("b1", true)))),
            Need::Nothing
        );
        assert_eq!(
            need(&cluster(Some("b2"), Some(recorded("b1", true)))),
            Need::Start {
                id: "b2".to_owned(),
                kind: Some("full".to_owned()),
                repo: None,
            }
        );
    }

    #[test]
    fn a_named_repository_is_passed_as_its_number() {
        let mut pg = cluster(Some("b1"), None);
        if let Some(b) = pg.spec.backups.as_mut() {
            b.manual = Some(crate::crd::ManualBackupSpec {
                kind: None,
                repo_name: Some("repo2".to_owned()),
            });
        }
        assert_eq!(
            need(&pg),
            Need::Start {
                id: "b1".to_owned(),
                kind: None,
                repo: Some(2),
            }
        );
        let status = accepted(
            "b1",
            r#"{"type":"incr","repo":2,"member":"pg-0","started_at":"2026-12-05T08:00:00Z"}"#,
        )
        .expect("understood");
        assert_eq!(status.repo_name.as_deref(), Some("repo2"));
    }

    #[test]
    fn progress_follows_running_then_last_of_the_same_start() {
        let cur = recorded("b1", false);
        let now = DateTime::parse_from_rfc3339("2026-12-05T08:00:30Z")
            .expect("time")
            .with_timezone(&Utc);
        let running =
            json!({"pgbackrest": {"running": {"started_at": "2026-12-05T08:00:00.000Z"}}});
        assert_eq!(progress(&cur, &running, now), None);
        let ok =
            json!({"pgbackrest": {"last": {"started_at": "2026-12-05T08:00:00Z", "ok": true}}});
        let done = progress(&cur, &ok, now).expect("finished");
        assert!(done.finished && done.succeeded);
        let failed = json!({"pgbackrest": {"last": {"started_at": "2026-12-05T08:00:00Z", "ok": false, "error": "boom"}}});
        let done = progress(&cur, &failed, now).expect("finished");
        assert!(done.finished && !done.succeeded);
        assert_eq!(done.message, "boom");
        // Another member's report, or a report from before the start: keep waiting, then give up.
        let other =
            json!({"pgbackrest": {"last": {"started_at": "2026-12-05T07:00:00Z", "ok": true}}});
        assert_eq!(progress(&cur, &other, now), None);
        let later = now + chrono::Duration::seconds(120);
        assert!(progress(&cur, &other, later).is_some_and(|s| s.finished && !s.succeeded));
        assert_eq!(
            accepted(
                "b1",
                r#"{"type":"full","member":"pg-0","standby":null,"started_at":"2026-12-05T08:00:00Z"}"#
            ),
            Some(cur)
        );
    }
}
