//! What the backup service publishes: the last stanza check, the running and last backup, the
//! newest backup per repository (from `pgbackrest info`) and WAL archiving from
//! `pg_stat_archiver`; rendered into `/patroni` (key `pgbackrest`) and `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::Value;

use super::BackupType;

/// Why a backup ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Scheduled,
    Manual,
    /// The first full backup of a cluster restored from a backup, right after promotion.
    Bootstrap,
}

/// The result of `stanza-create` + `check` (or of the WAL catch-up before them).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub ok: bool,
    pub at: DateTime<Utc>,
    /// The failure, with pgBackRest's error line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A backup running on this member.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Running {
    #[serde(rename = "type")]
    pub kind: BackupType,
    /// The repository it goes into (`--repo`, 1 = `repo1`).
    pub repo: u32,
    pub trigger: Trigger,
    pub started_at: DateTime<Utc>,
    /// The replica the files are copied from (`backup_standby`); absent: from the primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
}

/// The last backup this member ran (or tried to).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attempt {
    #[serde(rename = "type")]
    pub kind: BackupType,
    /// As [`Running::repo`].
    pub repo: u32,
    pub trigger: Trigger,
    pub started_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub ok: bool,
    /// Ended by the agent for a switchover, a restart, a shutdown or a lost leadership: not a
    /// failure (`ok` is false, `failures` does not count it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// As [`Running::standby`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The newest backup of one repository, from `pgbackrest info`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RepoBackup {
    pub repo: u32,
    pub label: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub start: i64,
    pub stop: i64,
    /// Database size.
    pub size: u64,
    /// Size in the repository (after compression).
    pub repo_size: u64,
}

/// WAL archiving, from `pg_stat_archiver` and `pg_wal/archive_status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ArchiveStatus {
    pub archived_count: u64,
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<f64>,
    pub failed_count: u64,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<f64>,
    /// Segments waiting to be archived (`.ready` files).
    pub ready_count: u64,
    /// Age of the oldest of them, in seconds.
    pub oldest_ready_age_seconds: f64,
}

/// The whole report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BackupReport {
    pub stanza: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Attempt>,
    /// Backups that failed on this member since the agent started.
    pub failures: u64,
    /// Backups the agent ended for a switchover, a restart, a shutdown or a lost leadership.
    #[serde(skip_serializing_if = "is_zero")]
    pub interrupted: u64,
    /// Whether the last backup that ran to its end (not interrupted) succeeded: an interrupted
    /// run is retried, so it neither clears a failure nor raises a "last backup failed" alert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_finished_ok: Option<bool>,
    pub repos: Vec<RepoBackup>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveStatus>,
    /// Next scheduled fire per repository and type: `full` for repo1 (as before per-repository
    /// schedules), `repo2-full` for the others (`schedule::record_key`).
    pub next: BTreeMap<String, DateTime<Utc>>,
    /// Scheduled fires this member missed as the leader, per repository and type, keyed as
    /// [`Self::next`] (the log says why).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub missed: BTreeMap<String, u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl BackupReport {
    /// Postgres' last archive attempt failed (`pg_stat_archiver`): WAL is not reaching the
    /// repository.
    pub fn archive_failing(&self) -> bool {
        self.archive.as_ref().is_some_and(|a| {
            a.last_failed_time
                .is_some_and(|f| f > a.last_archived_time.unwrap_or(0.0))
        })
    }
}

fn u(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

/// The newest backup per repository and type from `pgbackrest info --output=json` of one
/// stanza: the newest full stays listed (and in the metrics) after incrementals follow it.
pub fn parse_info(json: &str, stanza: &str) -> Result<Vec<RepoBackup>, String> {
    let doc: Value =
        serde_json::from_str(json).map_err(|e| format!("pgbackrest info is not JSON: {e}"))?;
    let Some(entry) = doc
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"].as_str() == Some(stanza)))
    else {
        return Ok(Vec::new());
    };
    let mut newest: BTreeMap<(u32, u8, String), RepoBackup> = BTreeMap::new();
    for b in entry["backup"].as_array().into_iter().flatten() {
        if b["error"].as_bool() == Some(true) {
            continue;
        }
        let repo = u32::try_from(u(b["database"].get("repo-key"))).unwrap_or(1);
        let candidate = RepoBackup {
            repo,
            label: b["label"].as_str().unwrap_or("").to_owned(),
            kind: b["type"].as_str().unwrap_or("").to_owned(),
            start: b["timestamp"]["start"].as_i64().unwrap_or(0),
            stop: b["timestamp"]["stop"].as_i64().unwrap_or(0),
            size: u(b["info"].get("size")),
            repo_size: u(b["info"]["repository"].get("size")),
        };
        let rank = BackupType::parse(&candidate.kind).map_or(3, BackupType::rank);
        let key = (repo, rank, candidate.kind.clone());
        match newest.get(&key) {
            Some(old) if old.stop >= candidate.stop => {}
            _ => {
                newest.insert(key, candidate);
            }
        }
    }
    Ok(newest.into_values().collect())
}

/// The system identifiers a stanza holds backups or WAL of, from `pgbackrest info
/// --output=json` (pgBackRest's `db` list: one entry per database the stanza has served, more
/// than one after `stanza-upgrade`); empty when the stanza does not exist.
pub fn stanza_system_ids(json: &str, stanza: &str) -> Vec<String> {
    let Ok(doc) = serde_json::from_str::<Value>(json) else {
        return Vec::new();
    };
    let Some(entry) = doc
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"].as_str() == Some(stanza)))
    else {
        return Vec::new();
    };
    let mut ids: Vec<String> = entry["db"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|db| db["system-id"].as_u64().map(|id| id.to_string()))
        .collect();
    ids.dedup();
    ids
}

/// The label of the newest backup of `system` in `pgbackrest info --output=json` of `stanza`
/// (a stanza upgraded to a new major version holds backups of each system it had).
pub fn newest_backup_of_system(json: &str, stanza: &str, system: &str) -> Option<String> {
    let doc = serde_json::from_str::<Value>(json).ok()?;
    let entry = doc
        .as_array()?
        .iter()
        .find(|s| s["name"].as_str() == Some(stanza))?;
    // A database's id is per repository (`repo-key`, 1 when absent).
    let key = |v: &Value| Some((v["id"].as_u64()?, v["repo-key"].as_u64().unwrap_or(1)));
    let dbs: Vec<(u64, u64)> = entry["db"]
        .as_array()?
        .iter()
        .filter(|db| db["system-id"].as_u64().map(|id| id.to_string()).as_deref() == Some(system))
        .filter_map(key)
        .collect();
    entry["backup"]
        .as_array()?
        .iter()
        .filter(|b| b["error"].as_bool() != Some(true))
        .filter(|b| key(&b["database"]).is_some_and(|k| dbs.contains(&k)))
        .max_by_key(|b| b["timestamp"]["stop"].as_i64().unwrap_or(0))
        .and_then(|b| b["label"].as_str().map(str::to_owned))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    scope: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepoLabels {
    scope: String,
    name: String,
    repo: String,
    #[prometheus(flatten)]
    kind: TypeLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

/// The `pgwarden_backup_*` and `pgwarden_wal_archive_*` metrics.
pub fn render_metrics(report: &BackupReport, scope: &str, name: &str) -> String {
    let labels = Labels {
        scope: scope.to_owned(),
        name: name.to_owned(),
    };
    let mut registry = Registry::default();
    let float = |registry: &mut Registry, metric: &str, help: &str, value: f64| {
        let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        family.get_or_create(&labels).set(value);
        registry.register(metric, help, family);
    };
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    float(
        &mut registry,
        "pgwarden_backup_repo_ok",
        "1 if the last stanza-create and check of the repository succeeded and postgres' last archive attempt did not fail, 0 otherwise, -1 if not run (replicas).",
        report
            .check
            .as_ref()
            .map(|c| b(c.ok && !report.archive_failing()))
            .unwrap_or(-1.0),
    );
    let missed = Family::<RepoLabels, Gauge<f64, AtomicU64>>::default();
    // repo1's three types always (alerts need the series before the first miss); another
    // repository's once it has a schedule or a miss.
    let keys = ["full", "diff", "incr"]
        .into_iter()
        .map(str::to_owned)
        .chain(report.next.keys().cloned())
        .chain(report.missed.keys().cloned());
    for key in keys {
        let (repo, kind) = match key.split_once('-') {
            Some((repo, kind)) => (repo.to_owned(), kind.to_owned()),
            None => ("repo1".to_owned(), key.clone()),
        };
        missed
            .get_or_create(&RepoLabels {
                scope: scope.to_owned(),
                name: name.to_owned(),
                repo,
                kind: TypeLabel { r#type: kind },
            })
            .set(report.missed.get(&key).copied().unwrap_or(0) as f64);
    }
    registry.register(
        "pgwarden_backup_missed",
        "Scheduled backups of a repository this member missed as the leader since the agent started (the log says why).",
        missed,
    );
    float(
        &mut registry,
        "pgwarden_backup_running",
        "1 while this member runs a backup.",
        b(report.running.is_some()),
    );
    float(
        &mut registry,
        "pgwarden_backup_last_run_ok",
        "1 if the last backup this member ran to its end succeeded, 0 if it failed, -1 if none did (interrupted runs leave it as it was).",
        report.last_finished_ok.map(b).unwrap_or(-1.0),
    );
    float(
        &mut registry,
        "pgwarden_backup_interrupted",
        "Backups this member ended for a switchover, a restart, a shutdown or a lost leadership since the agent started (a scheduled one is run again).",
        report.interrupted as f64,
    );
    float(
        &mut registry,
        "pgwarden_backup_failures",
        "Backups that failed on this member since the agent started.",
        report.failures as f64,
    );
    if let Some(a) = &report.archive {
        for (metric, help, value) in [
            (
                "pgwarden_wal_archive_archived_count",
                "pg_stat_archiver.archived_count.",
                a.archived_count as f64,
            ),
            (
                "pgwarden_wal_archive_failed_count",
                "pg_stat_archiver.failed_count.",
                a.failed_count as f64,
            ),
            (
                "pgwarden_wal_archive_last_archived_time",
                "Epoch seconds of the last archived segment, 0 if none.",
                a.last_archived_time.unwrap_or(0.0),
            ),
            (
                "pgwarden_wal_archive_last_failed_time",
                "Epoch seconds of the last failed archive attempt, 0 if none.",
                a.last_failed_time.unwrap_or(0.0),
            ),
            (
                "pgwarden_wal_archive_ready_segments",
                "WAL segments waiting to be archived.",
                a.ready_count as f64,
            ),
            (
                "pgwarden_wal_archive_oldest_ready_age_seconds",
                "Age of the oldest segment waiting to be archived, 0 if none.",
                a.oldest_ready_age_seconds,
            ),
        ] {
            float(&mut registry, metric, help, value);
        }
    }
    let per_repo = |metric: &str, help: &str, value: &dyn Fn(&RepoBackup) -> f64| {
        let family = Family::<RepoLabels, Gauge<f64, AtomicU64>>::default();
        for r in &report.repos {
            family
                .get_or_create(&RepoLabels {
                    scope: scope.to_owned(),
                    name: name.to_owned(),
                    repo: r.repo.to_string(),
                    kind: TypeLabel {
                        r#type: r.kind.clone(),
                    },
                })
                .set(value(r));
        }
        (metric.to_owned(), help.to_owned(), family)
    };
    for (metric, help, family) in [
        per_repo(
            "pgwarden_backup_last_success_time",
            "Epoch seconds when the newest backup of the repository finished.",
            &|r| r.stop as f64,
        ),
        per_repo(
            "pgwarden_backup_last_duration_seconds",
            "Duration of the newest backup of the repository.",
            &|r| (r.stop - r.start).max(0) as f64,
        ),
        per_repo(
            "pgwarden_backup_last_size_bytes",
            "Database size of the newest backup of the repository.",
            &|r| r.size as f64,
        ),
        per_repo(
            "pgwarden_backup_last_repo_size_bytes",
            "Size in the repository of the newest backup.",
            &|r| r.repo_size as f64,
        ),
    ] {
        registry.register(metric, help, family);
    }
    let mut out = String::new();
    if encode(&mut out, &registry).is_err() {
        return String::new();
    }
    out.lines()
        .filter(|l| *l != "# EOF")
        .map(|l| format!("{l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"[{"name":"batman","backup":[
      {"label":"20260101-000000F","type":"full","error":false,"database":{"id":1,"repo-key":1},
       "timestamp":{"start":100,"stop":160},"info":{"size":1000,"repository":{"size":300}}},
      {"label":"20260101-000000F_20260101-010000I","type":"incr","error":false,"database":{"id":1,"repo-key":1},
       "timestamp":{"start":200,"stop":210},"info":{"size":1000,"repository":{"size":20}}},
      {"label":"20260101-000000F","type":"full","error":false,"database":{"id":1,"repo-key":2},
       "timestamp":{"start":100,"stop":170},"info":{"size":1000,"repository":{"size":250}}}
    ]},{"name":"other","backup":[]}]"#;

    #[test]
    fn info_gives_the_newest_backup_per_repository_and_type() {
        let repos = parse_info(INFO, "batman").expect("parses");
        assert_eq!(repos.len(), 3);
        assert_eq!((repos[0].repo, repos[0].kind.as_str()), (1, "full"));
        assert_eq!(repos[0].stop, 160);
        assert_eq!((repos[1].repo, repos[1].kind.as_str()), (1, "incr"));
        assert_eq!(repos[1].repo_size, 20);
        assert_eq!(repos[2].repo, 2);
        assert_eq!(repos[2].stop, 170);
        assert!(parse_info(INFO, "missing").expect("parses").is_empty());
        assert!(parse_info("ERROR", "batman").is_err());
    }

    #[test]
    fn a_replica_restores_the_newest_backup_of_the_clusters_own_system() {
        let info = r#"[{"name":"pg","db":[{"id":1,"system-id":7301,"version":"15"},{"id":2,"system-id":7402,"version":"17"}],
            "backup":[
              {"label":"F1","database":{"id":1},"timestamp":{"stop":100}},
              {"label":"F2","database":{"id":2},"timestamp":{"stop":200}},
              {"label":"F3","database":{"id":1},"timestamp":{"stop":300}},
              {"label":"F4","database":{"id":2},"timestamp":{"stop":400},"error":true}]}]"#;
        assert_eq!(
            newest_backup_of_system(info, "pg", "7402").as_deref(),
            Some("F2")
        );
        assert_eq!(
            newest_backup_of_system(info, "pg", "7301").as_deref(),
            Some("F3")
        );
        assert_eq!(newest_backup_of_system(info, "pg", "9999"), None);
        assert_eq!(newest_backup_of_system(info, "other", "7402"), None);
    }

    #[test]
    fn stanza_system_ids_are_read_from_info() {
        let info = r#"[{"name":"old","status":{"code":0},"db":[{"id":1,"system-id":7301,"version":"15"}]},
                       {"name":"new","status":{"code":1,"message":"missing stanza path"},"db":[]}]"#;
        assert_eq!(stanza_system_ids(info, "old"), vec!["7301".to_owned()]);
        assert!(stanza_system_ids(info, "new").is_empty());
        assert!(stanza_system_ids(info, "absent").is_empty());
        assert!(stanza_system_ids("not json", "old").is_empty());
    }

    #[test]
    fn metrics_carry_repository_and_type_labels() {
        let report = BackupReport {
            repos: parse_info(INFO, "batman").expect("parses"),
            check: Some(CheckResult {
                ok: false,
                at: Utc::now(),
                error: Some("x".into()),
            }),
            ..Default::default()
        };
        let text = render_metrics(&report, "s", "pg0");
        assert!(text.contains(
            "pgwarden_backup_last_success_time{scope=\"s\",name=\"pg0\",repo=\"1\",type=\"incr\"} 210"
        ), "{text}");
        // The full backup's figures stay once an incremental follows it.
        assert!(text.contains(
            "pgwarden_backup_last_size_bytes{scope=\"s\",name=\"pg0\",repo=\"1\",type=\"full\"} 1000"
        ), "{text}");
        assert!(
            text.contains("pgwarden_backup_repo_ok{scope=\"s\",name=\"pg0\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("pgwarden_backup_last_run_ok{scope=\"s\",name=\"pg0\"} -1"),
            "{text}"
        );
        // An interrupted run after a successful one leaves the alert's input at 1.
        let interrupted = BackupReport {
            last: Some(Attempt {
                kind: BackupType::Full,
                repo: 1,
                trigger: Trigger::Scheduled,
                started_at: Utc::now(),
                duration_seconds: 1.0,
                ok: false,
                interrupted: true,
                standby: None,
                error: Some("ended for a switchover".into()),
            }),
            last_finished_ok: Some(true),
            interrupted: 1,
            ..Default::default()
        };
        let text = render_metrics(&interrupted, "s", "pg0");
        assert!(
            text.contains("pgwarden_backup_last_run_ok{scope=\"s\",name=\"pg0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pgwarden_backup_interrupted{scope=\"s\",name=\"pg0\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "pgwarden_backup_missed{scope=\"s\",name=\"pg0\",repo=\"repo1\",type=\"full\"} 0"
            ),
            "{text}"
        );
        // Another repository's series come with its schedule or its misses.
        let repo2 = BackupReport {
            next: [("repo2-diff".to_owned(), Utc::now())].into(),
            missed: [("repo2-full".to_owned(), 3)].into(),
            ..Default::default()
        };
        let text = render_metrics(&repo2, "s", "pg0");
        for line in [
            "pgwarden_backup_missed{scope=\"s\",name=\"pg0\",repo=\"repo2\",type=\"full\"} 3",
            "pgwarden_backup_missed{scope=\"s\",name=\"pg0\",repo=\"repo2\",type=\"diff\"} 0",
            "pgwarden_backup_missed{scope=\"s\",name=\"pg0\",repo=\"repo1\",type=\"incr\"} 0",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn repo_ok_is_zero_while_the_last_archive_attempt_failed() {
        let mut report = BackupReport {
            check: Some(CheckResult {
                ok: true,
                at: Utc::now(),
                error: None,
            }),
            archive: Some(ArchiveStatus {
                last_archived_time: Some(100.0),
                last_failed_time: Some(90.0),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ok = |r: &BackupReport| {
            render_metrics(r, "s", "pg0")
                .lines()
                .find(|l| l.starts_with("pgwarden_backup_repo_ok{"))
                .and_then(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        };
        assert_eq!(ok(&report), Some(1.0));
        if let Some(a) = report.archive.as_mut() {
            a.last_failed_time = Some(110.0);
        }
        assert!(report.archive_failing());
        assert_eq!(ok(&report), Some(0.0));
    }
}
