//! pgBackRest under the agent: WAL archiving, stanza management, scheduled and on-demand
//! backups, replicas and bootstraps restored from the repository.
//!
//! - [`settings`]: the `pgbackrest` configuration section, `bootstrap.pgbackrest`, validation.
//! - [`render`]: `pgbackrest.conf` and the `archive_command`/`restore_command` postgres runs
//!   (pure).
//! - [`command`]: running pgBackRest as a supervised child (process group, timeout, logs).
//! - [`interrupt`]: ending a running backup before the HA loop stops postgres on purpose.
//! - [`schedule`]: cron schedules (pure).
//! - [`service`]: the task that runs stanza-create/check, backups under the DCS lock, archive
//!   status polls.
//! - [`archive`]: archive status and the WAL catch-up after a promotion.
//! - [`restore`]: `create_replica_methods` and `bootstrap.method: pgbackrest`.
//! - [`report`]: what `/patroni` and `/metrics` show.
//! - [`standby`]: backups from a standby: the endpoint each member publishes, the choice of
//!   the replica (pure).
//! - [`server`]: `pgbackrest server` (pgBackRest's TLS server) as a supervised child.
//!
//! Hooks elsewhere are small: the HA loop passes [`archive_parameters`] to
//! `postgres::conf::parameters` (postgres/ does not depend on backup/), calls [`restore`] for
//! replica creation and bootstrap and [`Interrupter::end_running_backup`] before a planned stop
//! of postgres, `run.rs` writes the config and
//! spawns the service, the REST API routes `POST /backup` and `GET /backups` here, the HA loop
//! adds [`standby::member_fields`] to the member record.

/// A file in the data directory that `pgwarden upgrade-data-dir` leaves after a major-version
/// upgrade: the leader runs `stanza-upgrade` before its next stanza-create, then removes it.
pub const STANZA_UPGRADE_MARKER: &str = "pgwarden.stanza-upgrade";

pub mod archive;
pub mod command;
pub mod interrupt;
pub mod render;
pub mod report;
pub mod restore;
pub mod schedule;
pub mod server;
pub mod service;
pub mod settings;
pub mod standby;

pub use interrupt::Interrupter;
pub use standby::member_fields;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::ApiReply;
use crate::config::Config;
use crate::dcs::Dcs;
use crate::postgres::probe::Probe;
use crate::state::AgentStatus;

use self::command::Runner;
use self::report::BackupReport;
use self::settings::Resolved;

/// pgBackRest's backup types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    Full,
    Diff,
    Incr,
}

impl BackupType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
            BackupType::Incr => "incr",
        }
    }

    /// Bigger backups first.
    pub fn rank(self) -> u8 {
        match self {
            BackupType::Full => 0,
            BackupType::Diff => 1,
            BackupType::Incr => 2,
        }
    }

    pub fn parse(s: &str) -> Option<BackupType> {
        match s {
            "full" => Some(BackupType::Full),
            "diff" => Some(BackupType::Diff),
            "incr" => Some(BackupType::Incr),
            _ => None,
        }
    }
}

impl std::fmt::Display for BackupType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The runner and resolved paths, when the `pgbackrest` section is configured.
pub fn runner(config: &Config) -> Option<(Runner, Resolved)> {
    let pb = config.pgbackrest.as_ref()?;
    let resolved = pb.resolve(config);
    Some((
        Runner {
            command: resolved.command.clone(),
            config_file: resolved.config_file.clone(),
            pgpass: crate::postgres::replica::pgpass(config),
            timeout: resolved.timeout,
        },
        resolved,
    ))
}

/// Writes `pgbackrest.conf` (before postgres can run `archive_command`).
/// How a backup-layer operation failed: a reason, or a context with the error that caused it.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Failed(String),
    #[error("{context}")]
    Caused {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another layer's error, as it is.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl BackupError {
    /// `map_err(BackupError::caused_by)`: another layer's error, kept whole.
    pub fn caused_by<E>(source: E) -> BackupError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        BackupError::Other(Box::new(source))
    }

    /// `map_err(BackupError::caused("cannot …"))`: the error becomes the source.
    pub fn caused<E>(context: impl Into<String>) -> impl FnOnce(E) -> BackupError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let context = context.into();
        move |source| BackupError::Caused {
            context,
            source: Box::new(source),
        }
    }
}

impl From<String> for BackupError {
    fn from(reason: String) -> Self {
        BackupError::Failed(reason)
    }
}

impl From<&str> for BackupError {
    fn from(reason: &str) -> Self {
        BackupError::Failed(reason.to_owned())
    }
}

/// The postgres parameters that archive into the configured stanza (none without a
/// `pgbackrest` section), for `postgres::conf::parameters`.
pub fn archive_parameters(config: &Config) -> std::collections::BTreeMap<String, String> {
    config
        .pgbackrest
        .as_ref()
        .map(|pb| render::archive_parameters(&pb.resolve(config)))
        .unwrap_or_default()
}

pub fn write_config(config: &Config) -> Result<(), crate::backup::BackupError> {
    let Some(pb) = &config.pgbackrest else {
        return Ok(());
    };
    let resolved = pb.resolve(config);
    render::write(&resolved, &render::conf(config, pb, &resolved)).map_err(BackupError::caused(
        format!(
            "cannot write {} (pgbackrest.config_dir must be writable by the agent's user)",
            resolved.config_file.display()
        ),
    ))
}

/// What the REST API uses.
#[derive(Clone)]
pub struct BackupHandle {
    report: watch::Receiver<Arc<BackupReport>>,
    requests: mpsc::Sender<service::Request>,
    interrupter: Interrupter,
    runner: Runner,
    stanza: String,
    scope: String,
    name: String,
    /// How many repositories `pgbackrest.repos` has: a request names one of 1 to this.
    repos: u32,
}

impl BackupHandle {
    /// What the HA loop uses to end a running backup before it stops postgres.
    pub fn interrupter(&self) -> Interrupter {
        self.interrupter.clone()
    }

    pub fn report(&self) -> Arc<BackupReport> {
        self.report.borrow().clone()
    }

    /// The `pgbackrest` object of `GET /patroni`.
    pub fn patroni_json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.report()).unwrap_or_default()
    }

    /// The backup metrics for `GET /metrics`.
    pub fn metrics(&self) -> String {
        report::render_metrics(&self.report(), &self.scope, &self.name)
    }

    /// `POST /backup` with `{"type": "full"|"diff"|"incr", "repo": <n>}` (default `incr`, as
    /// pgBackRest, into repo1).
    pub async fn start(&self, body: &serde_json::Map<String, serde_json::Value>) -> ApiReply {
        let (kind, repo) = match parse_request(body, self.repos) {
            Ok(request) => request,
            Err(reason) => return ApiReply::new(400, reason),
        };
        let (reply, answer) = oneshot::channel();
        if self
            .requests
            .send(service::Request::Start { kind, repo, reply })
            .await
            .is_err()
        {
            return ApiReply::new(503, "the backup service is not running");
        }
        answer
            .await
            .unwrap_or_else(|_| ApiReply::new(503, "the backup service did not answer"))
    }

    /// `GET /backups`: `pgbackrest info --output=json` of the stanza.
    pub async fn info(&self) -> ApiReply {
        let result = self
            .runner
            .info_json(&self.stanza, Duration::from_secs(60))
            .await;
        match result {
            Ok(out) => ApiReply::new(200, out.trim().to_owned()),
            Err(e) => ApiReply::new(503, crate::error::error_chain(&e)),
        }
    }
}

/// The type and repository of a `POST /backup` body, or why it is refused (a 400): the type
/// one of full, diff, incr (default incr), the repository a number from 1 to `repos`
/// (default 1).
pub fn parse_request(
    body: &serde_json::Map<String, serde_json::Value>,
    repos: u32,
) -> Result<(BackupType, u32), String> {
    let kind = match body.get("type") {
        None | Some(serde_json::Value::Null) => BackupType::Incr,
        Some(v) => v
            .as_str()
            .and_then(BackupType::parse)
            .ok_or_else(|| format!("type {v} is not one of full, diff, incr"))?,
    };
    let repo = match body.get("repo") {
        None | Some(serde_json::Value::Null) => 1,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if (1..=repos).contains(&n) => n,
            _ => {
                return Err(format!(
                    "repo {v} is not a configured repository: pgbackrest.repos has {repos} \
                     (repo 1 to {repos})"
                ))
            }
        },
    };
    Ok((kind, repo))
}

/// Starts the backup service; `None` when `pgbackrest` is not configured.
pub fn spawn(
    config: &Config,
    dcs: Arc<dyn Dcs>,
    status: watch::Receiver<Arc<AgentStatus>>,
    probe: Arc<Probe>,
    shutdown: CancellationToken,
) -> Option<(BackupHandle, JoinHandle<()>)> {
    let pb = config.pgbackrest.as_ref()?;
    let (runner, resolved) = runner(config)?;
    let (report_tx, report_rx) = watch::channel(Arc::new(BackupReport {
        stanza: resolved.stanza.clone(),
        ..Default::default()
    }));
    let (req_tx, req_rx) = mpsc::channel(8);
    let schedules = schedule::Schedules::new(&pb.schedules(), chrono::Utc::now());
    let mut service = service::Service::new(
        config.name.clone(),
        resolved.stanza.clone(),
        config.postgresql.data_dir.clone(),
        runner.clone(),
        dcs,
        status,
        probe,
        report_tx,
        req_rx,
        schedules,
    );
    let interrupter = Interrupter::default();
    service = service
        .restored(config.bootstrap.restores_with_pgbackrest())
        .with_interrupter(interrupter.clone());
    if pb.backup_standby {
        service = service.with_standby(service::StandbyBackup {
            fallback: pb.backup_standby_fallback,
            config: config.clone(),
            pgbackrest: pb.clone(),
            resolved: resolved.clone(),
            file: resolved.config_dir.join("pgbackrest-standby.conf"),
        });
    }
    // Every member runs the TLS server when configured: any replica may be chosen as the
    // standby, and a leader may become a replica.
    let server = pb.tls_server.is_some().then(|| runner.clone());
    let task = tokio::spawn(async move {
        let server = async {
            if let Some(runner) = server {
                server::supervise(runner, shutdown.clone()).await;
            }
        };
        tokio::join!(service.run(shutdown.clone()), server);
    });
    Some((
        BackupHandle {
            report: report_rx,
            requests: req_tx,
            interrupter,
            runner,
            stanza: resolved.stanza,
            scope: config.scope.clone(),
            name: config.name.clone(),
            repos: u32::try_from(pb.repos.len()).unwrap_or(u32::MAX),
        },
        task,
    ))
}

#[cfg(test)]
mod tests;
