//! The backup service's rules with an in-memory DCS and a scripted `pgbackrest`: no backup
//! starts while a switchover is pending, a running one is cancelled when a switchover is
//! requested, the cluster-wide lock refuses a second backup, replicas refuse on-demand ones.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::api::ApiReply;
use crate::config::Config;
use crate::dcs::{
    ClusterView, Dcs, DcsError, FailoverRequest, HistoryLine, LeaderKey, LeaderStatus,
    LeaseRenewal, MemberRecord, SyncState, Versioned, Wakeup,
};
use crate::postgres::probe::{LocalConnection, Probe};
use crate::state::{AgentStatus, PostgresStatus};

use super::command::Runner;
use super::report::BackupReport;
use super::schedule::Schedules;
use super::service::{Request, Service, LOCK_KEY};
use super::BackupType;

/// Only the plain keys the backup service uses.
#[derive(Default)]
struct MemoryDcs {
    keys: Mutex<BTreeMap<String, String>>,
}

fn refused<T>() -> Result<T, DcsError> {
    Err(DcsError::rejected("not part of this fake"))
}

#[async_trait]
impl Dcs for MemoryDcs {
    async fn cluster(&self) -> Result<ClusterView, DcsError> {
        refused()
    }
    async fn race_initialize(&self, _: &str) -> Result<bool, DcsError> {
        refused()
    }
    async fn set_initialize(&self, _: &str) -> Result<(), DcsError> {
        refused()
    }
    async fn cancel_initialize(&self, _: Option<i64>) -> Result<bool, DcsError> {
        refused()
    }
    async fn write_config(&self, _: &serde_json::Value, _: Option<i64>) -> Result<bool, DcsError> {
        refused()
    }
    async fn acquire_leader(&self) -> Result<bool, DcsError> {
        refused()
    }
    async fn renew_leader(&self) -> Result<LeaseRenewal, DcsError> {
        refused()
    }
    async fn release_leader(&self) -> Result<(), DcsError> {
        refused()
    }
    async fn touch_member(&self, _: &MemberRecord) -> Result<(), DcsError> {
        refused()
    }
    async fn write_status(&self, _: &LeaderStatus) -> Result<(), DcsError> {
        refused()
    }
    async fn write_history(&self, _: &[HistoryLine]) -> Result<(), DcsError> {
        refused()
    }
    async fn write_failover(&self, _: &FailoverRequest, _: Option<i64>) -> Result<bool, DcsError> {
        refused()
    }
    async fn write_sync(&self, _: Option<&SyncState>, _: Option<i64>) -> Result<bool, DcsError> {
        refused()
    }
    async fn revoke_lease(&self) -> Result<(), DcsError> {
        refused()
    }
    async fn wait_for_change(&self, timeout: Duration) -> Wakeup {
        tokio::time::sleep(timeout).await;
        Wakeup::Timeout
    }
    async fn acquire_lease_key(&self, key: &str, value: &str) -> Result<bool, DcsError> {
        let mut keys = self.keys.lock().expect("lock");
        if keys.contains_key(key) {
            return Ok(false);
        }
        keys.insert(key.to_owned(), value.to_owned());
        Ok(true)
    }
    async fn release_lease_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        let mut keys = self.keys.lock().expect("lock");
        if keys.get(key).map(String::as_str) == Some(value) {
            keys.remove(key);
        }
        Ok(())
    }
    async fn read_key(&self, key: &str) -> Result<Option<String>, DcsError> {
        Ok(self.keys.lock().expect("lock").get(key).cloned())
    }
    async fn write_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        self.keys
            .lock()
            .expect("lock")
            .insert(key.to_owned(), value.to_owned());
        Ok(())
    }
}

/// A `pgbackrest` that logs its arguments, answers `info` with no stanza and takes 60 s for a
/// backup.
fn fake_pgbackrest(dir: &Path) -> Runner {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("pgbackrest");
    std::fs::write(
        &path,
        "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\ncase \"$*\" in\n  \
         *' backup '*) exec sleep 60 ;;\n  *info*) echo '[]' ;;\nesac\n",
    )
    .expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Runner {
        command: path,
        config_file: dir.join("pgbackrest.conf"),
        pgpass: None,
        timeout: Duration::from_secs(120),
    }
}

fn calls(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
}

fn status(leader: bool, switchover: bool) -> AgentStatus {
    let config = Config {
        scope: "s".into(),
        name: "pg0".into(),
        ..Default::default()
    };
    let mut s = crate::ha::initial_status(&config);
    s.leader_valid_until = leader.then(|| Instant::now() + Duration::from_secs(3600));
    s.postgres = Some(PostgresStatus {
        in_recovery: !leader,
        server_version: 150000,
        timeline: Some(1),
        postmaster_start_time: None,
        postmaster_start_epoch: None,
        wal_flush_lsn: None,
        receive_lsn: None,
        replay_lsn: None,
        replayed_timestamp: None,
        replay_paused: false,
        streaming: false,
        system_identifier: None,
        replication: vec![],
        pending_restart: vec![],
        min_recovery: None,
        synchronous_standby_names: None,
    });
    s.cluster = Some(Arc::new(ClusterView {
        leader: Some(LeaderKey {
            name: if leader { "pg0" } else { "pg1" }.into(),
            revision: 1,
            lease: 0,
        }),
        failover: switchover.then(|| Versioned {
            value: FailoverRequest {
                leader: Some("pg0".into()),
                member: Some("pg1".into()),
                scheduled_at: None,
            },
            revision: 1,
        }),
        ..Default::default()
    }));
    s
}

struct Harness {
    dir: tempfile::TempDir,
    dcs: Arc<MemoryDcs>,
    status: watch::Sender<Arc<AgentStatus>>,
    report: watch::Receiver<Arc<BackupReport>>,
    requests: mpsc::Sender<Request>,
    interrupter: super::Interrupter,
    shutdown: CancellationToken,
}

fn start(initial: AgentStatus, schedule: Option<&str>) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let dcs = Arc::new(MemoryDcs::default());
    let (status_tx, status_rx) = watch::channel(Arc::new(initial));
    let (report_tx, report_rx) = watch::channel(Arc::new(BackupReport::default()));
    let (req_tx, req_rx) = mpsc::channel(4);
    let probe = Probe::new(LocalConnection {
        host: "127.0.0.1".into(),
        port: 1,
        user: "postgres".into(),
        password: None,
        timeout: Duration::from_millis(200),
    });
    let schedules = Schedules::new(
        &[(1, BackupType::Full, schedule.map(str::to_owned))],
        chrono::Utc::now(),
    );
    let service = Service::new(
        "pg0".into(),
        "s".into(),
        dir.path().join("data"),
        fake_pgbackrest(dir.path()),
        dcs.clone(),
        status_rx,
        probe,
        report_tx,
        req_rx,
        schedules,
    );
    let interrupter = super::Interrupter::default();
    let service = service.with_interrupter(interrupter.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(service.run(shutdown.clone()));
    Harness {
        dir,
        dcs,
        status: status_tx,
        report: report_rx,
        requests: req_tx,
        interrupter,
        shutdown,
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn ask(h: &Harness, kind: BackupType) -> ApiReply {
    let (reply, answer) = oneshot::channel();
    h.requests
        .send(Request::Start {
            kind,
            repo: 1,
            reply,
        })
        .await
        .expect("service runs");
    answer.await.expect("answered")
}

#[tokio::test]
async fn no_backup_starts_during_a_switchover_and_a_requested_switchover_cancels_one() {
    let h = start(status(true, true), Some("* * * * * *"));
    eventually("the stanza was created and checked", || {
        h.report.borrow().check.as_ref().is_some_and(|c| c.ok)
    })
    .await;
    // Fires every second, but a switchover is pending.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !calls(h.dir.path()).contains(" backup "),
        "{}",
        calls(h.dir.path())
    );
    assert_eq!(
        ask(&h, BackupType::Full).await.status,
        503,
        "on-demand backups wait for the switchover too"
    );

    h.status.send_replace(Arc::new(status(true, false)));
    eventually("a scheduled backup runs", || {
        h.report.borrow().running.is_some()
    })
    .await;
    assert!(h.dcs.keys.lock().expect("lock").contains_key(LOCK_KEY));
    assert_eq!(ask(&h, BackupType::Incr).await.status, 409);

    h.status.send_replace(Arc::new(status(true, true)));
    eventually("the backup was cancelled", || {
        let r = h.report.borrow();
        r.running.is_none()
            && r.last.as_ref().is_some_and(|l| {
                !l.ok && l.error.as_deref().is_some_and(|e| e.contains("cancelled"))
            })
    })
    .await;
    assert!(!h.dcs.keys.lock().expect("lock").contains_key(LOCK_KEY));
    h.shutdown.cancel();
}

/// A switchover scheduled for later stops nothing before its time: scheduled and on-demand
/// backups run meanwhile.
#[tokio::test]
async fn a_switchover_scheduled_for_later_does_not_stop_backups() {
    let mut later = status(true, true);
    let cluster = later.cluster.as_deref().cloned().expect("cluster");
    let mut cluster = cluster;
    if let Some(f) = cluster.failover.as_mut() {
        f.value.scheduled_at = Some((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    }
    later.cluster = Some(Arc::new(cluster));
    let h = start(later, Some("* * * * * *"));
    // The fake pgbackrest records its call once it runs, a moment after `running` is
    // published: wait for the call itself (checking it right after `running` was flaky).
    eventually("a scheduled backup runs", || {
        calls(h.dir.path()).contains(" backup ")
    })
    .await;
    h.shutdown.cancel();
}

#[tokio::test]
async fn the_cluster_wide_lock_and_leadership_gate_on_demand_backups() {
    let h = start(status(true, false), None);
    eventually("the stanza was created and checked", || {
        h.report.borrow().check.as_ref().is_some_and(|c| c.ok)
    })
    .await;
    h.dcs
        .write_key(LOCK_KEY, r#"{"member":"pg9"}"#)
        .await
        .expect("write");
    let reply = ask(&h, BackupType::Full).await;
    assert_eq!(reply.status, 409);
    assert!(reply.body.contains("pg9"), "{}", reply.body);
    assert!(!calls(h.dir.path()).contains(" backup "));

    h.status.send_replace(Arc::new(status(false, false)));
    let reply = ask(&h, BackupType::Full).await;
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains("pg1"), "{}", reply.body);
    h.shutdown.cancel();
}

/// `POST /backup` on a replica names the leader and its REST URL (421 Misdirected Request).
#[tokio::test]
async fn a_replica_answers_misdirected_with_the_leaders_address() {
    let mut s = status(false, false);
    let mut view = (**s.cluster.as_ref().expect("view")).clone();
    view.members.push(crate::dcs::Member {
        name: "pg1".into(),
        record: MemberRecord {
            api_url: "http://127.0.0.1:8009/patroni".into(),
            role: "primary".into(),
            ..Default::default()
        },
        revision: 1,
        lease: 1,
    });
    s.cluster = Some(Arc::new(view));
    let h = start(s, None);
    let reply = ask(&h, BackupType::Full).await;
    assert_eq!(reply.status, 421, "{}", reply.body);
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    assert_eq!(body["leader"], "pg1");
    assert_eq!(body["api_url"], "http://127.0.0.1:8009/patroni");
    h.shutdown.cancel();
}

fn standby_settings(dir: &Path, fallback: bool) -> super::service::StandbyBackup {
    let yaml = format!(
        "scope: s\nname: pg0\npostgresql:\n  listen: 127.0.0.1:5433\n  data_dir: {d}/data\n  \
         authentication: {{superuser: {{username: postgres}}, replication: {{username: r}}}}\n\
         pgbackrest:\n  repos: [{{path: {d}/repo}}]\n  backup_standby: true\n  \
         tls_server: {{address: localhost, cert_file: /c.pem, key_file: /k.pem, ca_file: /ca.pem, \
         client_cn: pgwarden}}\n",
        d = dir.display()
    );
    let config: Config = serde_yaml::from_str(&yaml).expect("yaml");
    let pb = config.pgbackrest.clone().expect("section");
    let resolved = pb.resolve(&config);
    super::service::StandbyBackup {
        fallback,
        file: dir.join("pgbackrest-standby.conf"),
        config,
        pgbackrest: pb,
        resolved,
    }
}

fn with_replica(mut s: AgentStatus, tls: bool) -> AgentStatus {
    let mut view = (**s.cluster.as_ref().expect("view")).clone();
    let mut record = MemberRecord {
        role: "replica".into(),
        state: "running".into(),
        replication_state: Some("streaming".into()),
        ..Default::default()
    };
    if tls {
        record.extra.insert(
            super::standby::MEMBER_KEY.into(),
            serde_json::json!({"tls_host": "localhost", "tls_port": 8555, "pg_path": "/pg1/data",
                               "pg_port": 5434, "pg_socket_path": "/run/pg1", "pg_user": "postgres"}),
        );
    }
    view.members.push(crate::dcs::Member {
        name: "pg1".into(),
        record,
        revision: 1,
        lease: 1,
    });
    s.cluster = Some(Arc::new(view));
    s
}

fn start_standby(initial: AgentStatus, fallback: bool) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let dcs = Arc::new(MemoryDcs::default());
    let (status_tx, status_rx) = watch::channel(Arc::new(initial));
    let (report_tx, report_rx) = watch::channel(Arc::new(BackupReport::default()));
    let (req_tx, req_rx) = mpsc::channel(4);
    let probe = Probe::new(LocalConnection {
        host: "127.0.0.1".into(),
        port: 1,
        user: "postgres".into(),
        password: None,
        timeout: Duration::from_millis(200),
    });
    let service = Service::new(
        "pg0".into(),
        "s".into(),
        dir.path().join("data"),
        fake_pgbackrest(dir.path()),
        dcs.clone(),
        status_rx,
        probe,
        report_tx,
        req_rx,
        Schedules::default(),
    )
    .with_standby(standby_settings(dir.path(), fallback));
    let interrupter = super::Interrupter::default();
    let service = service.with_interrupter(interrupter.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(service.run(shutdown.clone()));
    Harness {
        dir,
        dcs,
        status: status_tx,
        report: report_rx,
        requests: req_tx,
        interrupter,
        shutdown,
    }
}

/// `backup_standby` without a usable replica and without the fallback: skipped, reported,
/// the lock released; with one: the backup reads the per-backup file naming it as pg2.
#[tokio::test]
async fn a_backup_from_a_standby_is_skipped_without_a_usable_replica_and_names_it_otherwise() {
    let h = start_standby(with_replica(status(true, false), false), false);
    eventually("the stanza was created and checked", || {
        h.report.borrow().check.as_ref().is_some_and(|c| c.ok)
    })
    .await;
    let reply = ask(&h, BackupType::Full).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply.body.contains("pg1: no pgBackRest TLS server"),
        "{}",
        reply.body
    );
    {
        let r = h.report.borrow();
        let last = r.last.as_ref().expect("reported");
        assert!(!last.ok);
        assert_eq!(r.failures, 1);
    }
    assert!(!h.dcs.keys.lock().expect("lock").contains_key(LOCK_KEY));
    assert!(!calls(h.dir.path()).contains(" backup "));

    h.status
        .send_replace(Arc::new(with_replica(status(true, false), true)));
    let reply = ask(&h, BackupType::Full).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert!(reply.body.contains("\"standby\":\"pg1\""), "{}", reply.body);
    eventually("the backup runs", || {
        calls(h.dir.path()).contains(" backup ")
    })
    .await;
    let line = calls(h.dir.path())
        .lines()
        .find(|l| l.contains(" backup "))
        .map(str::to_owned)
        .expect("a backup call");
    assert!(line.contains("pgbackrest-standby.conf"), "{line}");
    let file = std::fs::read_to_string(h.dir.path().join("pgbackrest-standby.conf"))
        .expect("the per-backup file");
    assert!(file.contains("pg2-path=/pg1/data"), "{file}");
    assert!(file.contains("backup-standby=y"), "{file}");
    assert_eq!(
        h.report
            .borrow()
            .running
            .as_ref()
            .and_then(|r| r.standby.clone()),
        Some("pg1".into())
    );
    h.shutdown.cancel();
}

#[tokio::test]
async fn with_the_fallback_a_backup_without_a_usable_replica_runs_from_the_primary() {
    let h = start_standby(status(true, false), true);
    eventually("the stanza was created and checked", || {
        h.report.borrow().check.as_ref().is_some_and(|c| c.ok)
    })
    .await;
    let reply = ask(&h, BackupType::Full).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    eventually("the backup runs", || {
        calls(h.dir.path()).contains(" backup ")
    })
    .await;
    assert!(!calls(h.dir.path()).contains("pgbackrest-standby.conf"));
    h.shutdown.cancel();
}

/// Before the HA loop stops postgres on purpose it ends the running backup and waits: the run
/// is recorded as interrupted (not failed), its fire is handed back in `backup_schedule` and
/// the lock is released before the call returns.
#[tokio::test]
async fn a_backup_ended_before_postgres_stops_is_interrupted_handed_back_and_unlocked() {
    let h = start(status(true, false), Some("*/2 * * * * *"));
    eventually("a scheduled backup runs", || {
        calls(h.dir.path()).contains(" backup ")
    })
    .await;
    let recorded = h
        .dcs
        .read_key(super::service::SCHEDULE_KEY)
        .await
        .expect("read")
        .expect("the fire is recorded");
    let t = Instant::now();
    h.interrupter
        .end_running_backup("a switchover", Duration::from_secs(15))
        .await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!h.interrupter.is_running());
    let report = h.report.borrow().clone();
    let last = report.last.as_ref().expect("the run is reported");
    assert!(last.interrupted && !last.ok, "{last:?}");
    assert_eq!(report.failures, 0);
    assert_eq!(report.interrupted, 1);
    // The interrupted run is not a failed one for the "last backup failed" alert.
    assert_ne!(report.last_finished_ok, Some(false));
    assert!(report.running.is_none());
    assert_eq!(h.dcs.read_key(LOCK_KEY).await.expect("read"), None);
    let after = h
        .dcs
        .read_key(super::service::SCHEDULE_KEY)
        .await
        .expect("read")
        .unwrap_or_default();
    assert_ne!(after, recorded, "the fire was not handed back");
    h.shutdown.cancel();
}

#[test]
fn a_backup_request_names_a_type_and_a_configured_repository() {
    let body = |v: serde_json::Value| v.as_object().cloned().expect("an object");
    assert_eq!(
        super::parse_request(&body(serde_json::json!({})), 2),
        Ok((BackupType::Incr, 1))
    );
    assert_eq!(
        super::parse_request(&body(serde_json::json!({"type": "full", "repo": 2})), 2),
        Ok((BackupType::Full, 2))
    );
    for bad in [
        serde_json::json!({"repo": 3}),
        serde_json::json!({"repo": 0}),
        serde_json::json!({"repo": "repo2"}),
        serde_json::json!({"repo": -1}),
    ] {
        let reason = super::parse_request(&body(bad.clone()), 2).expect_err("refused");
        assert!(
            reason.contains("is not a configured repository") && reason.contains("repo 1 to 2"),
            "{bad}: {reason}"
        );
    }
    assert!(
        super::parse_request(&body(serde_json::json!({"type": "big"})), 2)
            .expect_err("refused")
            .contains("not one of full, diff, incr")
    );
}
