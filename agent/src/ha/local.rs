//! The ports of the HA loop as the agent runs it ([`super::ports`]): the real postgres
//! supervisor, probe and data directory, HTTP peers and the system clocks. The DCS port is the
//! `Arc<dyn Dcs>` of etcd or Kubernetes, chosen at start.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::postgres::conf::{self, ManagedFiles};
use crate::postgres::controldata::{self, ControlData};
use crate::postgres::custom_bootstrap::{self, CustomBootstrap};
use crate::postgres::initdb;
use crate::postgres::probe::{self, Probe};
use crate::postgres::replica::{self, Upstream};
use crate::postgres::slots::{self, PrimarySlot, ReplicationSlot};
use crate::postgres::supervisor::{Postmaster, StopMode, Supervisor};
use crate::state::PostgresStatus;

use super::dynamic_copy;
use super::error_chain;
use super::failsafe::{FailsafeAnswer, FailsafeRequest};
use super::observe::{DataDir, PeerAnswer};
use super::ports::{LongTask, Peers, Postgres, Runtime, SlotChangeError, TaskError};
use super::slots::SlotChange;

/// The HA loop of the agent binary.
pub type AgentLoop = super::HaLoop<dyn crate::dcs::Dcs, LocalPostgres, HttpPeers, SystemRuntime>;

/// The local postgres: its supervisor, its probe and its data directory.
pub struct LocalPostgres {
    supervisor: Supervisor,
    probe: Arc<Probe>,
    /// Resolved at each use ([`crate::config::BinDirs`]): the data directory's version may
    /// change (an upgrade) or be set only now (a bootstrap, a clone).
    bin_dirs: crate::config::BinDirs,
    data_dir: PathBuf,
    /// The managed files as last written, so unchanged ones are not read back every cycle.
    conf_written: Mutex<conf::LastWrite>,
    /// Ends a running pgBackRest backup before a planned stop of postgres.
    backups: crate::backup::Interrupter,
    /// Logical slots being created in the background (see [`LocalPostgres::create_logical`]).
    creating_logical: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl LocalPostgres {
    /// The binaries for the data directory as it is now.
    fn bin_dir(&self) -> PathBuf {
        self.bin_dirs.for_data_dir(&self.data_dir)
    }

    pub fn new(config: &Config, supervisor: Supervisor, probe: Arc<Probe>) -> Self {
        LocalPostgres {
            supervisor,
            probe,
            bin_dirs: config.postgres_bin_dirs(),
            data_dir: config.postgresql.data_dir.clone(),
            conf_written: Mutex::new(conf::LastWrite::default()),
            backups: crate::backup::Interrupter::default(),
            creating_logical: Arc::default(),
        }
    }

    /// Creates a logical slot in the background, as Patroni does without a time limit: the
    /// creation waits for every transaction running when it starts, which can take longer than
    /// any cycle, and bounded it would be cancelled and started again forever under a workload
    /// that always has one. The HA loop asks again each cycle until the slot exists; while one
    /// creation runs, another is not started. A demotion or stop of postgres ends it.
    fn create_logical(&self, name: &str, slot: &crate::config::slots::LogicalSlot) {
        let Ok(mut creating) = self.creating_logical.lock() else {
            return;
        };
        if !creating.insert(name.to_owned()) {
            debug!(slot = %name, "the logical replication slot is still being created");
            return;
        }
        drop(creating);
        info!(slot = %name, database = %slot.database, plugin = %slot.plugin, "creating a logical replication slot (it waits for the transactions running now)");
        let probe = self.probe.clone();
        let creating = self.creating_logical.clone();
        let (name, database) = (name.to_owned(), slot.database.clone());
        let sql = slots::create_logical_sql(&name, &slot.plugin);
        tokio::spawn(async move {
            let done = probe.execute_in_unbounded(&database, &sql).await;
            if let Ok(mut creating) = creating.lock() {
                creating.remove(&name);
            }
            match done {
                Ok(()) => info!(slot = %name, "created the logical replication slot"),
                Err(e) => {
                    warn!(slot = %name, error = %error_chain(&e), "could not create the logical replication slot; trying again next cycle")
                }
            }
        });
    }

    /// The backup service's handle: a planned stop of postgres ends its running backup first.
    pub fn with_backups(mut self, backups: crate::backup::Interrupter) -> Self {
        self.backups = backups;
        self
    }
}

/// A long task spawned on the tokio runtime.
pub struct SpawnedTask(JoinHandle<Result<(), TaskError>>);

impl std::future::Future for SpawnedTask {
    type Output = Result<Result<(), TaskError>, String>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(|e| format!("task panicked or was cancelled: {e}")))
    }
}

impl LongTask for SpawnedTask {
    fn abort(&self) {
        self.0.abort();
    }
}

#[async_trait]
impl Postgres for LocalPostgres {
    type Task = SpawnedTask;

    fn state(&self) -> Postmaster {
        self.supervisor.state()
    }

    async fn start(&self) -> Result<(), String> {
        self.supervisor.start().await.map_err(|e| e.to_string())
    }

    async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), String> {
        self.supervisor
            .stop(mode, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn stop_for_restart(&self, mode: StopMode, timeout: Duration) -> Result<(), String> {
        self.supervisor
            .stop_for_restart(mode, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn demote(&self, mode: StopMode, timeout: Duration) -> Result<(), String> {
        self.supervisor
            .demote(mode, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    fn set_fence(&self, deadline: Option<Instant>) {
        self.supervisor.set_fence(deadline);
    }

    async fn wait_ready(&self, timeout: Duration) -> bool {
        self.supervisor.wait_ready(timeout).await
    }

    async fn end_backup(&self, why: &str, budget: Duration) {
        self.backups.end_running_backup(why, budget).await;
    }

    async fn status(&self) -> Result<PostgresStatus, String> {
        self.probe.status().await.map_err(|e| e.to_string())
    }

    fn changes(&self) -> u64 {
        self.probe.changes()
    }

    async fn reset(&self) {
        self.probe.reset().await;
    }

    async fn promote(&self) -> Result<(), String> {
        self.probe
            .execute("SELECT pg_promote(false)")
            .await
            .map_err(|e| e.to_string())?;
        // Runs `on_role_change` with `primary` at once, as Patroni does after `pg_ctl promote`.
        self.supervisor.promoted().await;
        Ok(())
    }

    async fn set_standby_leader(&self, standby_leader: bool) {
        self.supervisor.set_standby_leader(standby_leader).await;
    }

    async fn checkpoint(&self) -> Result<(), String> {
        self.probe
            .execute("CHECKPOINT")
            .await
            .map_err(|e| e.to_string())
    }

    async fn reload(&self) -> Result<(), String> {
        // SIGHUP from the supervisor, as `pg_ctl reload`, which then runs `on_reload`.
        self.supervisor.reload().await.map_err(|e| e.to_string())
    }

    async fn replication_slots(&self) -> Result<Vec<ReplicationSlot>, String> {
        self.probe
            .slots()
            .await
            .map_err(|e| format!("cannot list replication slots: {}", error_chain(&e)))
    }

    async fn change_slot(&self, change: &SlotChange) -> Result<(), SlotChangeError> {
        let done = match change {
            SlotChange::Drop { name, .. } => self.probe.execute(&slots::drop_sql(name)).await,
            SlotChange::CreatePhysical { name } => {
                self.probe.execute(&slots::create_physical_sql(name)).await
            }
            SlotChange::CreateLogical { name, slot } => {
                self.create_logical(name, slot);
                Ok(())
            }
            SlotChange::AdvancePhysical { name, lsn } => {
                self.probe.execute(&slots::advance_sql(name, *lsn)).await
            }
            SlotChange::Advance {
                name,
                database,
                lsn,
            } => {
                self.probe
                    .execute_in(database, &slots::advance_sql(name, *lsn))
                    .await
            }
        };
        done.map_err(|e| {
            use tokio_postgres::error::SqlState;
            let code = match &e {
                probe::ProbeError::Query(q) => q.code(),
                _ => None,
            };
            let advancing = matches!(change, SlotChange::Advance { .. });
            if advancing
                && (code == Some(&SqlState::UNDEFINED_FILE)
                    || code == Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE))
            {
                SlotChangeError::CopyUnusable(error_chain(&e))
            } else {
                SlotChangeError::Failed(error_chain(&e))
            }
        })
    }

    async fn read_primary_slots(
        &self,
        config: &Config,
        primary: &Upstream,
        names: &[String],
        with_state: bool,
    ) -> Result<Vec<PrimarySlot>, String> {
        // Short: a replica asks every cycle while a copy is not yet safe, and a primary that
        // went away must not hold up the loop that is to replace it.
        slots::read_from_primary(config, primary, names, with_state, Duration::from_secs(2))
            .await
            .map_err(|e| error_chain(&e))
    }

    async fn install_slots(&self, copied: &[PrimarySlot]) -> Result<(), String> {
        let data_dir = self.data_dir.clone();
        let copied = copied.to_vec();
        tokio::task::spawn_blocking(move || slots::install(&data_dir, &copied))
            .await
            .map_err(|e| format!("the slot copy panicked or was cancelled: {e}"))?
            .map_err(|e| error_chain(&e))
    }

    async fn hot_standby_shortfall(&self) -> Option<(ControlData, Vec<String>)> {
        let control = match controldata::read(&self.bin_dir(), &self.data_dir).await {
            Ok(control) => control,
            Err(e) => {
                debug!(error = %e, "cannot read the control file of a paused standby");
                return None;
            }
        };
        let sql = format!(
            "SELECT {}",
            controldata::HOT_STANDBY_PARAMETERS
                .iter()
                .map(|(name, _)| format!("current_setting({})", probe::quote_literal(name)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let running = match self.probe.query_row(&sql).await {
            Ok(row) => row,
            Err(e) => {
                debug!(error = %e, "cannot read the settings of a paused standby");
                return None;
            }
        };
        let too_low: Vec<String> = controldata::HOT_STANDBY_PARAMETERS
            .iter()
            .zip(running)
            .filter_map(|((name, _), value)| {
                let ours: u64 = value?.trim().parse().ok()?;
                let primary = control
                    .hot_standby_minimums()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v)?;
                (primary > ours).then(|| format!("{name} {ours} < {primary}"))
            })
            .collect();
        Some((control, too_low))
    }

    async fn inspect_data_dir(&self) -> DataDir {
        let data_dir = &self.data_dir;
        if initdb::is_empty_dir(data_dir) {
            return DataDir::Empty;
        }
        if !data_dir.join("PG_VERSION").exists() || !data_dir.join("global/pg_control").exists() {
            return DataDir::Unusable(format!(
                "data directory {} is not empty but is not a PostgreSQL data directory \
                 (no PG_VERSION or global/pg_control); refusing to touch it",
                data_dir.display()
            ));
        }
        match controldata::read(&self.bin_dir(), data_dir).await {
            Ok(control) => DataDir::Initialized {
                control,
                standby_signal: self.standby_signal(),
            },
            Err(e) => DataDir::Unusable(format!(
                "cannot read the control file of {}: {e}; refusing to touch it",
                data_dir.display()
            )),
        }
    }

    fn standby_signal(&self) -> bool {
        self.data_dir.join("standby.signal").exists()
    }

    async fn control_checkpoint(&self) -> Option<u64> {
        controldata::read(&self.bin_dir(), &self.data_dir)
            .await
            .ok()
            .and_then(|c| c.checkpoint_lsn)
    }

    async fn write_conf(&self, files: &ManagedFiles) -> Result<bool, String> {
        let mut last = self
            .conf_written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        last.write(&self.data_dir, files)
            .map_err(|e| format!("cannot write the configuration files: {e}"))
    }

    async fn remove_data_dir(&self) -> Result<(), String> {
        match std::fs::remove_dir_all(&self.data_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove the data directory: {e}")),
        }
    }

    async fn timeline_history(&self, timeline: u32) -> Result<String, String> {
        let file = self
            .data_dir
            .join("pg_wal")
            .join(format!("{timeline:08X}.history"));
        std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))
    }

    fn load_dynamic_copy(&self) -> Option<serde_json::Value> {
        dynamic_copy::load(&self.data_dir)
    }

    fn save_dynamic_copy(&self, value: &serde_json::Value) -> Result<(), String> {
        dynamic_copy::save(&self.data_dir, value).map_err(|e| e.to_string())
    }

    async fn leader_ready_for_rewind(
        &self,
        config: &Config,
        upstream: &Upstream,
    ) -> Result<(), String> {
        replica::leader_ready_for_rewind(config, upstream, Duration::from_secs(3)).await
    }

    fn bootstrap(&self, config: Arc<Config>, files: ManagedFiles) -> SpawnedTask {
        let bin_dir = self.bin_dir();
        let supervisor = self.supervisor.clone();
        let probe = self.probe.clone();
        SpawnedTask(tokio::spawn(async move {
            Ok(bootstrap(&config, &bin_dir, &supervisor, &probe, &files).await?)
        }))
    }

    fn create_replica(
        &self,
        config: Arc<Config>,
        upstream: Option<Upstream>,
        files: ManagedFiles,
    ) -> SpawnedTask {
        let bin_dir = self.bin_dir();
        SpawnedTask(tokio::spawn(async move {
            crate::backup::restore::create_replica(&config, &bin_dir, upstream.as_ref()).await?;
            conf::write(&config.postgresql.data_dir, &files)
                .map_err(|e| format!("cannot write the configuration files: {e}"))?;
            Ok(())
        }))
    }

    fn rewind(
        &self,
        config: Arc<Config>,
        upstream: Upstream,
        crashed: bool,
        files: ManagedFiles,
    ) -> SpawnedTask {
        let bin_dir = self.bin_dir();
        SpawnedTask(tokio::spawn(async move {
            rewind(&config, &bin_dir, &upstream, crashed, &files).await
        }))
    }
}

/// The bootstrap task: initdb, configuration, first start, roles.
async fn bootstrap(
    config: &Config,
    bin_dir: &Path,
    supervisor: &Supervisor,
    probe: &Probe,
    files: &ManagedFiles,
) -> Result<(), String> {
    if config.bootstrap.restores_with_pgbackrest() {
        return crate::backup::restore::bootstrap(config, supervisor, probe, files)
            .await
            .map_err(|e| crate::error::error_chain(&e));
    }
    if let Some(method) = CustomBootstrap::of(&config.bootstrap).map_err(|e| e.to_string())? {
        return custom_bootstrap::bootstrap(config, &method, supervisor, probe, files)
            .await
            .map_err(|e| error_chain(&e));
    }
    // A new system must not archive into a stanza that holds another one's backups.
    crate::backup::restore::refuse_existing_stanza(config)
        .await
        .map_err(|e| crate::error::error_chain(&e))?;
    info!("running initdb");
    initdb::initdb(config, bin_dir)
        .await
        .map_err(|e| error_chain(&e))?;
    conf::write(&config.postgresql.data_dir, files)
        .map_err(|e| format!("cannot write the configuration files: {e}"))?;
    supervisor.start().await.map_err(|e| error_chain(&e))?;
    if !supervisor.wait_ready(Duration::from_secs(120)).await {
        return Err("postgres did not accept connections after initdb".into());
    }
    initdb::post_bootstrap(config, probe)
        .await
        .map_err(|e| error_chain(&e))?;
    Ok(())
}

/// The rewind task: crash recovery if needed, pg_rewind, then the standby configuration.
async fn rewind(
    config: &Config,
    bin_dir: &Path,
    upstream: &Upstream,
    crashed: bool,
    files: &ManagedFiles,
) -> Result<(), TaskError> {
    let data_dir = &config.postgresql.data_dir;
    if let Some(pid) = crate::postgres::supervisor::live_postmaster_pid(data_dir) {
        // A postmaster still shutting down (seen under load): single-user mode and pg_rewind
        // would both refuse the directory, and that refusal must not stick; the next cycle
        // tries again once it is gone.
        return Err(TaskError::NotStarted(format!(
            "postgres (PID {pid}) still runs in the data directory"
        )));
    }
    if crashed {
        info!("running crash recovery in single-user mode before pg_rewind");
        // The conf must not start a standby for single-user recovery: write the primary form.
        replica::single_user_recovery(bin_dir, data_dir)
            .await
            .map_err(|e| error_chain(&e))?;
    }
    info!(leader = %upstream.name, "running pg_rewind");
    if let Err(e) = replica::rewind(config, bin_dir, upstream).await {
        let reason = error_chain(&e);
        if e.is_connection_failure() {
            // pg_rewind changes nothing before it has connected to the source.
            return Err(TaskError::NotStarted(reason));
        }
        if config.postgresql.remove_data_directory_on_rewind_failure
            || config
                .postgresql
                .remove_data_directory_on_diverged_timelines
        {
            warn!(%reason, "pg_rewind failed; removing the data directory to clone the leader again, as configured");
            std::fs::remove_dir_all(data_dir)
                .map_err(|e| format!("cannot remove the data directory: {e}"))?;
            return Ok(());
        }
        return Err(TaskError::Failed(format!(
            "{reason}; the member stays down. Set postgresql.remove_data_directory_on_rewind_failure \
             to re-create it from the leader, or reinitialise it"
        )));
    }
    conf::write(data_dir, files)
        .map_err(|e| format!("cannot write the configuration files: {e}"))?;
    Ok(())
}

/// Peers over HTTP(S): `GET /patroni`, `POST /failsafe` (with `restapi.authentication`, as
/// the members' write endpoints require it).
#[derive(Default)]
pub struct HttpPeers {
    pub auth: Option<(String, String)>,
}

#[async_trait]
impl Peers for HttpPeers {
    async fn ask(&self, members: Vec<(String, String)>, timeout: Duration) -> Vec<PeerAnswer> {
        let asks = members.into_iter().map(|(name, api_url)| async move {
            let status = crate::peer::fetch_status(&name, &api_url, timeout).await;
            if let Err(e) = &status {
                debug!(peer = %name, error = %e, "peer did not answer usably");
            }
            PeerAnswer {
                name,
                status: status.ok(),
            }
        });
        futures::future::join_all(asks).await
    }

    async fn post_failsafe(
        &self,
        members: Vec<(String, String)>,
        request: &FailsafeRequest,
        timeout: Duration,
    ) -> Vec<FailsafeAnswer> {
        let body = match serde_json::to_value(request) {
            Ok(body) => body,
            Err(e) => {
                let refusal = format!("cannot encode the failsafe request: {e}");
                return members
                    .into_iter()
                    .map(|(name, _)| FailsafeAnswer::from_result(name, Err(refusal.clone())))
                    .collect();
            }
        };
        let auth = self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        let posts = members.into_iter().map(|(name, api_url)| {
            let body = &body;
            async move {
                let url = crate::peer::endpoint_url(&api_url, "failsafe");
                let answer = crate::peer::request("POST", &url, Some(body), auth, timeout).await;
                let answer = match answer {
                    Ok((200, text)) if text == "Accepted" => Ok(()),
                    Ok((code, text)) => Err(format!("{code} {text}")),
                    Err(e) => Err(e.to_string()),
                };
                FailsafeAnswer::from_result(name, answer)
            }
        });
        futures::future::join_all(posts).await
    }
}

/// The system's clocks (tokio's paused clock in tests, through `tokio::time::Instant`).
pub struct SystemRuntime;

#[async_trait]
impl Runtime for SystemRuntime {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn wall_now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }

    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await
    }
}
