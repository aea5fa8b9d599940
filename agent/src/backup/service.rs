//! The backup service: one task beside the HA loop that follows the agent's published status.
//!
//! - **Leadership term**: when this member becomes the leader with a writable postgres, it
//!   pushes the WAL of earlier timelines still in `pg_wal` (see [`super::archive`]), runs
//!   `stanza-create` (idempotent) and `check`, and reports the result; on failure it retries
//!   every [`PREPARE_RETRY`]. Postgres is never touched: a broken repository is reported, not
//!   fatal.
//! - **Backups** (scheduled or `POST /backup`) run only on the leader, under the DCS lock
//!   `backup_lock` attached to this agent's lease, so two never run at once anywhere in the
//!   cluster and a dead agent's lock goes with its lease. The fire time a backup serves is
//!   recorded in `backup_schedule` (no lease) per repository and type, so a new leader does not
//!   repeat a fire its predecessor already ran, and does run one the predecessor missed, and
//!   one repository's run does not stand for another's. Each backup names its repository
//!   (`pgbackrest --repo=<n> backup`).
//! - A backup is cancelled (its process group killed) when leadership is lost or a switchover
//!   is due, and no backup starts while one is due. Before a planned stop of postgres the HA
//!   loop ends it first and waits (see [`super::interrupt`]); such a run is interrupted, not
//!   failed, and its fire is handed back.
//! - Archive status is polled on every member; a lag is logged once and shown in `/metrics`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::api::ApiReply;
use crate::dcs::Dcs;
use crate::postgres::probe::Probe;
use crate::state::AgentStatus;

use super::command::{Invocation, Runner};
use super::interrupt::Interrupter;
use super::report::{Attempt, BackupReport, CheckResult, Running, Trigger};
use super::schedule::{Fire, Schedules};
use super::settings::{PgBackRestConfig, Resolved};
use super::BackupType;
use crate::config::Config;

/// DCS key of the cluster-wide backup lock.
pub const LOCK_KEY: &str = "backup_lock";
/// DCS key recording the last schedule fire handled per repository and backup type (keys:
/// `schedule::record_key`).
pub const SCHEDULE_KEY: &str = "backup_schedule";

/// Retry period of a failed stanza-create/check.
const PREPARE_RETRY: Duration = Duration::from_secs(30);
/// Period of `pgbackrest info` refreshes.
const INFO_PERIOD: Duration = Duration::from_secs(60);
/// Period of archive status polls.
const ARCHIVE_PERIOD: Duration = Duration::from_secs(5);
/// A segment waiting longer than this to be archived is a lag worth a warning.
const ARCHIVE_LAG_WARN: Duration = Duration::from_secs(120);

/// Requests from the REST API.
#[derive(Debug)]
pub enum Request {
    Start {
        kind: BackupType,
        /// The repository (1 = `repo1`), checked against the configuration by the caller.
        repo: u32,
        reply: oneshot::Sender<ApiReply>,
    },
}

enum JobKind {
    Prepare,
    Backup {
        running: Running,
        fire: Option<Fire>,
        /// What `backup_schedule` said for this fire's repository and type before this run
        /// was recorded: put back when the run is cancelled (switchover, lost leadership), so
        /// the next leader runs it.
        previous: Option<DateTime<Utc>>,
    },
}

struct Job {
    kind: JobKind,
    cancel: CancellationToken,
    handle: JoinHandle<Result<(), crate::backup::BackupError>>,
}

/// `pgbackrest.backup_standby`: what the leader needs to write the per-backup config file.
pub struct StandbyBackup {
    pub fallback: bool,
    pub config: Config,
    pub pgbackrest: PgBackRestConfig,
    pub resolved: Resolved,
    /// `<config_dir>/pgbackrest-standby.conf`, rewritten before each backup.
    pub file: PathBuf,
}

/// Per leadership term.
struct Term {
    /// `None` until the first stanza-create/check finished.
    prepared: Option<bool>,
    retry_at: Instant,
}

pub struct Service {
    pub(super) name: String,
    pub(super) stanza: String,
    pub(super) data_dir: PathBuf,
    pub(super) runner: Runner,
    pub(super) dcs: Arc<dyn Dcs>,
    pub(super) status: watch::Receiver<Arc<AgentStatus>>,
    pub(super) probe: Arc<Probe>,
    pub(super) report: watch::Sender<Arc<BackupReport>>,
    pub(super) requests: mpsc::Receiver<Request>,
    pub(super) schedules: Schedules,
    pub(super) state: BackupReport,
    standby: Option<StandbyBackup>,
    /// Shared with the HA loop, which ends a running backup before it stops postgres.
    interrupter: Interrupter,
    term: Option<Term>,
    job: Option<Job>,
    next_archive_poll: Instant,
    next_info: Instant,
    archive_lagging: bool,
    archive_failed_seen: u64,
    archive_failing: bool,
    /// The cluster was bootstrapped from a backup: its first full backup runs right after
    /// the stanza is ready, not at the first scheduled fire.
    first_full_pending: bool,
    /// Why this member could not run a due scheduled backup, for the "missed" log line.
    blocked: Option<String>,
}

impl Service {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        stanza: String,
        data_dir: PathBuf,
        runner: Runner,
        dcs: Arc<dyn Dcs>,
        status: watch::Receiver<Arc<AgentStatus>>,
        probe: Arc<Probe>,
        report: watch::Sender<Arc<BackupReport>>,
        requests: mpsc::Receiver<Request>,
        schedules: Schedules,
    ) -> Service {
        let now = Instant::now();
        Service {
            state: BackupReport {
                stanza: stanza.clone(),
                ..Default::default()
            },
            name,
            stanza,
            data_dir,
            runner,
            dcs,
            status,
            probe,
            report,
            requests,
            schedules,
            standby: None,
            interrupter: Interrupter::default(),
            term: None,
            job: None,
            next_archive_poll: now,
            next_info: now + Duration::from_secs(5),
            archive_lagging: false,
            archive_failed_seen: 0,
            archive_failing: false,
            first_full_pending: false,
            blocked: None,
        }
    }

    /// The cluster was bootstrapped from a backup (`bootstrap.method: pgbackrest`).
    pub fn restored(mut self, restored: bool) -> Service {
        self.first_full_pending = restored;
        self
    }

    /// Shares `interrupter` with the HA loop.
    pub fn with_interrupter(mut self, interrupter: Interrupter) -> Service {
        self.interrupter = interrupter;
        self
    }

    /// Backs up from a replica (`pgbackrest.backup_standby`).
    pub fn with_standby(mut self, standby: StandbyBackup) -> Service {
        self.standby = Some(standby);
        self
    }

    /// Runs until `shutdown`; a running pgBackRest command is killed with its group first.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let job_done = async {
                match self.job.as_mut() {
                    Some(job) => (&mut job.handle).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(request) = self.requests.recv() => self.handle_request(request).await,
                result = job_done => {
                    let result = result.unwrap_or_else(|e| Err(format!("the job panicked or was aborted: {e}").into()));
                    self.job_finished(result).await;
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            self.tick().await;
            self.publish();
        }
        // The agent stops: a running backup is interrupted like before a switchover (its fire
        // handed back, the lock released) while the HA loop waits to stop postgres.
        if let Some(job) = self.job.as_mut() {
            job.cancel.cancel();
            match tokio::time::timeout(super::interrupt::MAX_WAIT, &mut job.handle).await {
                Ok(result) => {
                    let result = result.unwrap_or_else(|e| {
                        Err(format!("the job panicked or was aborted: {e}").into())
                    });
                    self.job_finished(result).await;
                }
                Err(_) => {
                    if let Some(Job {
                        kind: JobKind::Backup { .. },
                        ..
                    }) = self.job.take()
                    {
                        let _ = self
                            .dcs
                            .release_lease_key(LOCK_KEY, &self.lock_value())
                            .await;
                    }
                }
            }
            self.publish();
        }
        self.interrupter.ended();
    }

    fn publish(&mut self) {
        self.state.next = self
            .schedules
            .next_fires()
            .into_iter()
            .map(|f| (super::schedule::record_key(f.repo, f.kind), f.at))
            .collect();
        let state = self.state.clone();
        self.report.send_if_modified(|current| {
            if **current == state {
                false
            } else {
                *current = Arc::new(state);
                true
            }
        });
    }

    fn lock_value(&self) -> String {
        json!({"member": self.name}).to_string()
    }

    /// The leader's REST URL, for a 421 answer on a replica.
    fn leader_api_url(&self) -> Option<String> {
        let status = self.status.borrow().clone();
        let cluster = status.cluster.as_ref()?;
        let leader = cluster.leader_name()?;
        cluster
            .member(leader)
            .map(|m| m.record.api_url.clone())
            .filter(|u| !u.is_empty())
    }

    /// Leader with a writable postgres, and whether a switchover is pending.
    fn role(&self) -> (bool, bool, Option<String>) {
        let status = self.status.borrow().clone();
        let leader = status.is_leader(Instant::now())
            && status.postgres.as_ref().is_some_and(|p| !p.in_recovery);
        // A switchover scheduled for later does not stop backups: only one that is due (or
        // has no time) does. Blocking from the request on, a switchover scheduled 10 minutes
        // ahead skipped every backup in between.
        let now = Utc::now();
        let switchover = status.cluster.as_ref().is_some_and(|c| {
            c.failover.as_ref().is_some_and(|f| {
                f.value.scheduled_at.as_deref().is_none_or(|at| {
                    DateTime::parse_from_rfc3339(at).map_or(true, |t| t.with_timezone(&Utc) <= now)
                })
            })
        });
        let leader_name = status
            .cluster
            .as_ref()
            .and_then(|c| c.leader_name().map(str::to_owned));
        (leader, switchover, leader_name)
    }

    async fn tick(&mut self) {
        let (leader, switchover, _) = self.role();
        let now = Instant::now();
        let running_pg = self.status.borrow().postgres.is_some();

        // Term bookkeeping, and stopping a backup that must not continue.
        if !leader {
            if self.term.take().is_some() {
                info!("no longer the leader: backups and stanza checks stop here");
            }
            if let Some(job) = &self.job {
                if !job.cancel.is_cancelled() {
                    warn!("leadership lost: cancelling the running pgbackrest command");
                    job.cancel.cancel();
                }
            }
        } else if self.term.is_none() {
            self.term = Some(Term {
                prepared: None,
                retry_at: now,
            });
        }
        if switchover {
            if let Some(job) = &self.job {
                if matches!(job.kind, JobKind::Backup { .. }) && !job.cancel.is_cancelled() {
                    warn!("a switchover was requested: cancelling the running backup");
                    job.cancel.cancel();
                }
            }
        }

        if running_pg && now >= self.next_archive_poll {
            self.next_archive_poll = now + ARCHIVE_PERIOD;
            self.poll_archive().await;
        }
        if now >= self.next_info {
            self.next_info = now + INFO_PERIOD;
            self.refresh_info().await;
        }

        let due = self.schedules.due(Utc::now());
        self.report_missed(leader);
        if !leader {
            self.blocked = Some("this member was not the leader".into());
            return;
        }
        if let Some(job) = &self.job {
            self.blocked = Some(match &job.kind {
                JobKind::Backup { running, .. } => format!("a {} backup was running", running.kind),
                JobKind::Prepare => "the stanza was being created and checked".into(),
            });
            return;
        }
        if self.interrupter.held() {
            self.blocked = Some("postgres was being stopped on purpose".into());
            return;
        }
        if let Some(term) = &self.term {
            if term.prepared != Some(true) && now >= term.retry_at {
                self.start_prepare();
                return;
            }
            if term.prepared.is_none() {
                self.blocked = Some("the stanza was being created and checked".into());
                return;
            }
        }
        if switchover {
            self.blocked = Some("a switchover or failover is due".into());
            return;
        }
        if self.first_full_pending {
            self.first_full_pending = false;
            self.refresh_info().await;
            if self.state.info_error.is_none() && self.state.repos.is_empty() {
                match self.take_lock().await {
                    Ok(()) => {
                        info!(stanza = %self.stanza, "restored from a backup: taking this cluster's first full backup now");
                        let _ = self
                            .start_backup(BackupType::Full, 1, Trigger::Bootstrap, None, None)
                            .await;
                        return;
                    }
                    Err(reply) => {
                        debug!(reason = %reply.body, "the first full backup waits");
                        self.first_full_pending = true;
                    }
                }
            }
        }
        if let Some(fire) = due {
            self.try_scheduled(fire).await;
        }
    }

    /// Logs and counts scheduled fires that were replaced by a newer one before they ran.
    fn report_missed(&mut self, leader: bool) {
        let missed = self.schedules.take_missed();
        if !leader {
            // Every member computes the fires; only the leader's misses are the cluster's.
            return;
        }
        for fire in missed {
            let reason = self
                .blocked
                .clone()
                .unwrap_or_else(|| "another backup was running".into());
            warn!(kind = %fire.kind, repo = fire.repo, fire = %fire.at.to_rfc3339(), %reason, "scheduled backup missed");
            *self
                .state
                .missed
                .entry(super::schedule::record_key(fire.repo, fire.kind))
                .or_default() += 1;
        }
    }

    fn start_prepare(&mut self) {
        let timeline = self
            .status
            .borrow()
            .postgres
            .as_ref()
            .and_then(|p| p.timeline)
            .unwrap_or(1);
        let runner = self.runner.clone();
        let stanza = self.stanza.clone();
        let data_dir = self.data_dir.clone();
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        info!(stanza = %self.stanza, "leader: pushing earlier timelines' WAL, then stanza-create and check");
        let handle = tokio::spawn(async move {
            let mut problems = Vec::new();
            // After `pgwarden upgrade-data-dir`: the stanza still describes the old version and
            // system identifier, and stanza-create and every archive-push would refuse the
            // new cluster. A stanza that does not exist yet makes this fail; stanza-create
            // below then makes it. The marker goes once the stanza checks out.
            let upgraded = data_dir.join(super::STANZA_UPGRADE_MARKER);
            if upgraded.exists() {
                info!(stanza = %stanza, "the data directory was upgraded to a new major version: stanza-upgrade");
                let r = runner
                    .run(
                        Invocation {
                            what: "stanza-upgrade",
                            stanza: &stanza,
                            args: vec![],
                            loud: true,
                            capture: false,
                        },
                        &token,
                    )
                    .await;
                if let Err(e) = r {
                    info!(stanza = %stanza, error = %crate::error::error_chain(&e), "stanza-upgrade did not run; stanza-create follows");
                }
            }
            // The stanza first: a segment pushed before it exists fails (a cluster restored
            // from a backup logged a spurious ERROR each time).
            runner
                .run(
                    Invocation {
                        what: "stanza-create",
                        stanza: &stanza,
                        args: vec![],
                        loud: true,
                        capture: false,
                    },
                    &token,
                )
                .await
                .map_err(crate::backup::BackupError::caused_by)?;
            if timeline > 1 {
                for segment in super::archive::earlier_timeline_segments(&data_dir, timeline) {
                    let r = runner
                        .run(
                            Invocation {
                                what: "archive-push",
                                stanza: &stanza,
                                args: vec![segment.display().to_string()],
                                loud: false,
                                capture: false,
                            },
                            &token,
                        )
                        .await;
                    if let Err(e) = r {
                        problems.push(crate::error::error_chain(&e));
                    }
                }
            }
            for what in ["check"] {
                runner
                    .run(
                        Invocation {
                            what,
                            stanza: &stanza,
                            args: vec![],
                            loud: true,
                            capture: false,
                        },
                        &token,
                    )
                    .await
                    .map_err(crate::backup::BackupError::caused_by)?;
            }
            if upgraded.exists() {
                if let Err(e) = std::fs::remove_file(&upgraded) {
                    warn!(path = %upgraded.display(), error = %e, "cannot remove the stanza-upgrade marker; stanza-upgrade runs again at the next start (harmless)");
                }
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "stanza is ready, but pushing earlier timelines' WAL failed: {}",
                    problems.join("; ")
                )
                .into())
            }
        });
        self.job = Some(Job {
            kind: JobKind::Prepare,
            cancel,
            handle,
        });
    }

    /// Takes the cluster-wide lock; `Err` is the reply for an on-demand request.
    async fn take_lock(&self) -> Result<(), ApiReply> {
        match self
            .dcs
            .acquire_lease_key(LOCK_KEY, &self.lock_value())
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                let holder = self
                    .dcs
                    .read_key(LOCK_KEY)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
                    .and_then(|v| v["member"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "another member".into());
                Err(ApiReply::new(
                    409,
                    format!("a backup is already running on {holder}"),
                ))
            }
            Err(e) => Err(ApiReply::new(
                503,
                format!(
                    "cannot take the backup lock in the DCS: {}",
                    crate::error::error_chain(&e)
                ),
            )),
        }
    }

    async fn try_scheduled(&mut self, fire: Fire) {
        let (kind, repo) = (fire.kind, fire.repo);
        // RFC 3339 keeps the log field one word.
        let fire_text = fire.at.to_rfc3339();
        if let Err(reply) = self.take_lock().await {
            debug!(%kind, repo, fire = %fire_text, reason = %reply.body, "scheduled backup waits");
            return;
        }
        // Did a previous leader already run this fire?
        let mut record: BTreeMap<String, DateTime<Utc>> = match self
            .dcs
            .read_key(SCHEDULE_KEY)
            .await
        {
            Ok(v) => v
                .and_then(|v| serde_json::from_str(&v).ok())
                .unwrap_or_default(),
            Err(e) => {
                warn!(error = %crate::error::error_chain(&e), "cannot read the backup schedule record; trying again");
                let _ = self
                    .dcs
                    .release_lease_key(LOCK_KEY, &self.lock_value())
                    .await;
                return;
            }
        };
        if super::schedule::already_ran(&record, &fire) {
            info!(%kind, repo, fire = %fire_text, "this scheduled backup already ran on a previous leader");
            self.schedules.settle(&fire);
            let _ = self
                .dcs
                .release_lease_key(LOCK_KEY, &self.lock_value())
                .await;
            return;
        }
        let previous = record.insert(super::schedule::record_key(repo, kind), fire.at);
        if let Err(e) = self
            .dcs
            .write_key(
                SCHEDULE_KEY,
                &serde_json::to_string(&record).unwrap_or_default(),
            )
            .await
        {
            warn!(error = %crate::error::error_chain(&e), "cannot record the scheduled backup; trying again");
            let _ = self
                .dcs
                .release_lease_key(LOCK_KEY, &self.lock_value())
                .await;
            return;
        }
        info!(%kind, repo, fire = %fire_text, "starting the scheduled backup");
        self.blocked = None;
        let _ = self
            .start_backup(kind, repo, Trigger::Scheduled, Some(fire), previous)
            .await;
    }

    /// The runner for the next backup, and the replica it copies from. With `backup_standby`
    /// this picks the replica and writes the per-backup config file naming it; `Err` is why
    /// the backup must be skipped (no usable replica and no fallback, or the file could not be
    /// written).
    fn backup_source(&self) -> Result<(Runner, Option<String>), String> {
        let Some(sb) = &self.standby else {
            return Ok((self.runner.clone(), None));
        };
        let cluster = self.status.borrow().cluster.clone();
        match super::standby::choose(cluster.as_deref(), &self.name) {
            Ok(chosen) => {
                let text = super::render::standby_backup_conf(
                    &sb.config,
                    &sb.pgbackrest,
                    &sb.resolved,
                    &chosen.endpoint,
                );
                super::render::write_file(&sb.file, &text)
                    .map_err(|e| format!("cannot write {}: {e}", sb.file.display()))?;
                info!(standby = %chosen.name, lag_bytes = ?chosen.lag, host = %chosen.endpoint.tls_host, port = chosen.endpoint.tls_port, "backing up from the standby");
                Ok((
                    Runner {
                        config_file: sb.file.clone(),
                        ..self.runner.clone()
                    },
                    Some(chosen.name),
                ))
            }
            Err(e) if sb.fallback => {
                warn!(reason = %e, "no usable standby: backing up from the primary (backup_standby_fallback)");
                Ok((self.runner.clone(), None))
            }
            Err(e) => Err(format!(
                "{e}; the backup is skipped (backup_standby_fallback is off)"
            )),
        }
    }

    /// Starts a backup under the lock this member already holds. On `Err` (see
    /// [`Self::backup_source`]) the lock is released and the skip is reported like a failed
    /// backup, so a scheduled one is retried at its next fire.
    async fn start_backup(
        &mut self,
        kind: BackupType,
        repo: u32,
        trigger: Trigger,
        fire: Option<Fire>,
        previous: Option<DateTime<Utc>>,
    ) -> Result<(), crate::backup::BackupError> {
        let (runner, standby) = match self.backup_source() {
            Ok(source) => source,
            Err(reason) => {
                let _ = self
                    .dcs
                    .release_lease_key(LOCK_KEY, &self.lock_value())
                    .await;
                self.state.failures += 1;
                self.state.last_finished_ok = Some(false);
                error!(%kind, repo, ?trigger, error = %reason, "backup not started");
                self.state.last = Some(Attempt {
                    kind,
                    repo,
                    trigger,
                    started_at: Utc::now(),
                    duration_seconds: 0.0,
                    ok: false,
                    interrupted: false,
                    standby: None,
                    error: Some(reason.clone()),
                });
                if let Some(fire) = &fire {
                    self.schedules.settle(fire);
                }
                return Err(reason.into());
            }
        };
        let running = Running {
            kind,
            repo,
            trigger,
            started_at: Utc::now(),
            standby,
        };
        let stanza = self.stanza.clone();
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let handle = tokio::spawn(async move {
            runner
                .run(
                    Invocation {
                        what: "backup",
                        stanza: &stanza,
                        // Always named, also repo1: without it pgBackRest backs up into the
                        // lowest-numbered repository, whatever the schedule meant.
                        args: vec![
                            format!("--repo={repo}"),
                            format!("--type={}", kind.as_str()),
                        ],
                        loud: true,
                        capture: false,
                    },
                    &token,
                )
                .await
                .map(drop)
                .map_err(crate::backup::BackupError::caused_by)
        });
        self.state.running = Some(running.clone());
        self.interrupter.started(cancel.clone());
        self.job = Some(Job {
            kind: JobKind::Backup {
                running,
                fire,
                previous,
            },
            cancel,
            handle,
        });
        Ok(())
    }

    async fn job_finished(&mut self, result: Result<(), crate::backup::BackupError>) {
        let Some(job) = self.job.take() else { return };
        match job.kind {
            JobKind::Prepare => {
                let ok = result.is_ok();
                match &result {
                    Ok(()) => info!(stanza = %self.stanza, "stanza-create and check passed"),
                    Err(e) => {
                        error!(stanza = %self.stanza, error = %e, "the pgBackRest repository is not usable; WAL archiving and backups fail until it is fixed (postgres keeps running); retrying")
                    }
                }
                self.state.check = Some(CheckResult {
                    ok,
                    at: Utc::now(),
                    error: result.err().map(|e| crate::error::error_chain(&e)),
                });
                if let Some(term) = &mut self.term {
                    term.prepared = Some(ok);
                    term.retry_at = Instant::now() + PREPARE_RETRY;
                }
                self.next_info = Instant::now();
            }
            JobKind::Backup {
                running,
                fire,
                previous,
            } => {
                // Stopped for a switchover, a restart or a shutdown of postgres (the HA loop
                // ended it and waits, see `interrupt`), or a lost leadership, by our
                // cancellation or by postgres' shutdown that came first: not a failure of the
                // backup. Its fire is handed back (before the lock goes, so the next leader
                // sees it) and retried by the next leader.
                let (leader, switchover, _) = self.role();
                let reason = self.interrupter.reason().unwrap_or_else(|| {
                    if switchover {
                        "a switchover or failover is due".into()
                    } else if !leader {
                        "this member is no longer the leader".into()
                    } else {
                        "the agent stops".into()
                    }
                });
                let interrupted =
                    result.is_err() && (job.cancel.is_cancelled() || !leader || switchover);
                if interrupted {
                    if let Some(fire) = &fire {
                        self.hand_back(fire, previous).await;
                    }
                }
                if let Err(e) = self
                    .dcs
                    .release_lease_key(LOCK_KEY, &self.lock_value())
                    .await
                {
                    warn!(error = %crate::error::error_chain(&e), "could not release the backup lock; it expires with this agent's lease");
                }
                let duration = (Utc::now() - running.started_at)
                    .to_std()
                    .unwrap_or_default()
                    .as_secs_f64();
                match &result {
                    Ok(()) => {
                        info!(kind = %running.kind, repo = running.repo, trigger = ?running.trigger, duration_seconds = duration, "backup finished")
                    }
                    Err(e) if interrupted => {
                        warn!(kind = %running.kind, repo = running.repo, trigger = ?running.trigger, %reason, error = %e, "backup interrupted (not failed) by a switchover, a restart, a shutdown or a change of leader; a scheduled one is run again by the leader");
                    }
                    Err(e) => {
                        self.state.failures += 1;
                        error!(kind = %running.kind, repo = running.repo, trigger = ?running.trigger, error = %e, "backup failed; a scheduled backup is retried at its next fire");
                    }
                }
                if interrupted {
                    self.state.interrupted += 1;
                } else {
                    self.state.last_finished_ok = Some(result.is_ok());
                }
                self.state.last = Some(Attempt {
                    kind: running.kind,
                    repo: running.repo,
                    trigger: running.trigger,
                    started_at: running.started_at,
                    duration_seconds: duration,
                    ok: result.is_ok(),
                    interrupted,
                    standby: running.standby.clone(),
                    error: result.err().map(|e| crate::error::error_chain(&e)),
                });
                self.state.running = None;
                // An interrupted fire stays pending here too: if this member is (again) the
                // leader, for example after `POST /restart`, it runs it once postgres is back.
                if let Some(fire) = fire.filter(|_| !interrupted) {
                    self.schedules.settle(&fire);
                }
                self.next_info = Instant::now();
                self.publish();
                self.interrupter.ended();
            }
        }
    }

    /// Undoes the record of a cancelled scheduled run in `backup_schedule`, so the next leader
    /// does not take it for done ("already ran on a previous leader") and runs it again.
    async fn hand_back(&mut self, fire: &Fire, previous: Option<DateTime<Utc>>) {
        let (kind, repo) = (fire.kind, fire.repo);
        let key = super::schedule::record_key(repo, kind);
        let mut record: BTreeMap<String, DateTime<Utc>> = match self
            .dcs
            .read_key(SCHEDULE_KEY)
            .await
        {
            Ok(v) => v
                .and_then(|v| serde_json::from_str(&v).ok())
                .unwrap_or_default(),
            Err(e) => {
                warn!(error = %crate::error::error_chain(&e), %kind, "cannot read the backup schedule record; the cancelled backup is not retried by the next leader");
                return;
            }
        };
        if record.get(&key) != Some(&fire.at) {
            return;
        }
        match previous {
            Some(p) => record.insert(key, p),
            None => record.remove(&key),
        };
        match self
            .dcs
            .write_key(
                SCHEDULE_KEY,
                &serde_json::to_string(&record).unwrap_or_default(),
            )
            .await
        {
            Ok(()) => {
                info!(%kind, repo, fire = %fire.at.to_rfc3339(), "the cancelled scheduled backup is left to the next leader")
            }
            Err(e) => {
                warn!(error = %crate::error::error_chain(&e), %kind, "cannot hand the cancelled backup back; the next leader skips it")
            }
        }
    }

    async fn handle_request(&mut self, request: Request) {
        let Request::Start { kind, repo, reply } = request;
        let (leader, switchover, leader_name) = self.role();
        let answer = if !leader {
            // 421 Misdirected Request: the request is fine, this member is the wrong one. The
            // body says where to send it (also with backup_standby: the leader runs the
            // backup, the standby only serves files). Without a known leader nobody can take
            // it now: 503.
            match (leader_name, self.leader_api_url()) {
                (Some(name), Some(url)) => ApiReply::new(
                    421,
                    json!({
                        "message": format!("only the leader runs backups; send it to {name}"),
                        "leader": name,
                        "api_url": url,
                    })
                    .to_string(),
                ),
                (name, _) => ApiReply::new(
                    503,
                    format!(
                        "only the leader runs backups; the leader is {}",
                        name.unwrap_or_else(|| "unknown".into())
                    ),
                ),
            }
        } else if switchover {
            ApiReply::new(503, "a switchover is in progress; try again after it")
        } else if self.interrupter.held() {
            ApiReply::new(
                503,
                "postgres is being stopped (switchover, restart or shutdown); try again after it",
            )
        } else if let Some(job) = &self.job {
            match &job.kind {
                JobKind::Backup { running, .. } => ApiReply::new(
                    409,
                    format!(
                        "a {} backup is already running on {}",
                        running.kind, self.name
                    ),
                ),
                JobKind::Prepare => ApiReply::new(
                    503,
                    "the stanza is being created and checked; try again in a moment",
                ),
            }
        } else {
            match self.take_lock().await {
                Err(reply) => reply,
                Ok(()) => {
                    info!(%kind, repo, "starting an on-demand backup");
                    match self
                        .start_backup(kind, repo, Trigger::Manual, None, None)
                        .await
                    {
                        Ok(()) => {
                            let standby =
                                self.state.running.as_ref().and_then(|r| r.standby.clone());
                            // The same instant as `running`/`last` in `/patroni`, so a caller
                            // can follow this backup there.
                            let started_at = self
                                .state
                                .running
                                .as_ref()
                                .map_or_else(Utc::now, |r| r.started_at);
                            ApiReply::new(
                                202,
                                json!({"type": kind, "repo": repo, "member": self.name, "standby": standby, "started_at": started_at})
                                    .to_string(),
                            )
                        }
                        Err(reason) => ApiReply::new(503, crate::error::error_chain(&reason)),
                    }
                }
            }
        };
        let _ = reply.send(answer);
        self.publish();
    }

    async fn poll_archive(&mut self) {
        match super::archive::status(&self.probe, &self.data_dir).await {
            Ok(a) => {
                let lagging = a.ready_count > 0
                    && a.oldest_ready_age_seconds > ARCHIVE_LAG_WARN.as_secs_f64();
                if lagging && !self.archive_lagging {
                    warn!(ready_segments = a.ready_count, oldest_age_seconds = a.oldest_ready_age_seconds, last_failed_wal = ?a.last_failed_wal, "WAL archiving lags behind");
                } else if !lagging && self.archive_lagging {
                    info!("WAL archiving caught up");
                }
                // Once per change of state: postgres retries every few seconds, and each
                // failure logged at INFO made 816 lines a minute during an outage.
                let failing = a
                    .last_failed_time
                    .is_some_and(|f| f > a.last_archived_time.unwrap_or(0.0));
                if failing && !self.archive_failing {
                    warn!(last_failed_wal = ?a.last_failed_wal, failed_count = a.failed_count, "WAL archiving fails: postgres' archive_command does not reach the repository (its segments wait in pg_wal; see pgbackrest's lines)");
                } else if !failing && self.archive_failing {
                    info!(last_archived_wal = ?a.last_archived_wal, "WAL archiving works again");
                } else if a.failed_count > self.archive_failed_seen && self.archive_failed_seen > 0
                {
                    debug!(failed_count = a.failed_count, last_failed_wal = ?a.last_failed_wal, "archive_command failures");
                }
                self.archive_failing = failing;
                self.archive_failed_seen = a.failed_count;
                self.archive_lagging = lagging;
                self.state.archive = Some(a);
            }
            Err(e) => debug!(error = %e, "archive status unavailable"),
        }
    }

    async fn refresh_info(&mut self) {
        let result = self
            .runner
            .info_json(&self.stanza, Duration::from_secs(60))
            .await
            .map_err(crate::backup::BackupError::caused_by)
            .and_then(|out| Ok(super::report::parse_info(&out, &self.stanza)?));
        match result {
            Ok(repos) => {
                self.state.repos = repos;
                self.state.info_error = None;
            }
            Err(e) => {
                debug!(error = %e, "pgbackrest info failed");
                self.state.info_error = Some(crate::error::error_chain(&e));
            }
        }
    }
}
