//! The HA loop's IO, as traits: the loop ([`super::HaLoop`]) is generic over them, the agent
//! runs it with the implementations of [`super::local`] (etcd or Kubernetes, the real
//! postgres supervisor and probe, HTTP peers, the monotonic clock), and the simulation
//! (`sim/`) runs the very same loop with simulated ones.
//!
//! The DCS port is the [`crate::dcs::Dcs`] trait itself. What the loop may assume when a
//! method fails is documented on each trait: every failure is reported, never hidden as a
//! default value, and none of them stops the loop on its own.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use crate::config::Config;
use crate::postgres::conf::ManagedFiles;
use crate::postgres::controldata::ControlData;
use crate::postgres::replica::Upstream;
use crate::postgres::slots::{PrimarySlot, ReplicationSlot};
use crate::postgres::supervisor::{Postmaster, StopMode};
use crate::state::PostgresStatus;

use super::decide::Decision;
use super::observe::{DataDir, PeerAnswer};
use super::slots::SlotChange;

/// How a long task (bootstrap, replica creation, rewind) ended without success.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// It changed nothing (pg_rewind could not connect to the leader): the next cycle decides
    /// again, as if it had not been started.
    #[error("{0}")]
    NotStarted(String),
    /// It failed; a failed rewind keeps the member down until an operator acts.
    #[error("{0}")]
    Failed(String),
    /// It failed (as `Failed`): `context`, because of `source`.
    #[error("{context}")]
    Caused {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// It failed (as `Failed`) in pgBackRest.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
}

impl From<String> for TaskError {
    fn from(reason: String) -> Self {
        TaskError::Failed(reason)
    }
}

/// Why a step of a slot plan failed.
#[derive(Debug, thiserror::Error)]
pub enum SlotChangeError {
    /// A copy of a logical slot cannot be advanced any more: the WAL it needs is gone
    /// (SQLSTATE 58P01) or it was invalidated (55000). Patroni copies it again.
    #[error("{0}")]
    CopyUnusable(String),
    /// Anything else; the next cycle plans again.
    #[error("{0}")]
    Failed(String),
}

/// A long task running beside the loop. It resolves to the task's result, or to `Err` with a
/// reason when the task itself panicked or was cancelled.
pub trait LongTask:
    Future<Output = Result<Result<(), TaskError>, String>> + Send + Unpin + 'static
{
    /// Stops the task (the loop is shutting down, or a reinitialisation replaces it).
    fn abort(&self);
}

/// Postgres as the loop drives it: the supervised postmaster, the SQL probe on the local
/// connection, the data directory and the long tasks.
///
/// Errors are the reason as text, for the loop's log lines and REST replies; a failed call
/// changed nothing the loop relies on, and the next cycle observes again.
#[async_trait]
pub trait Postgres: Send + Sync + 'static {
    /// The handle of a long task.
    type Task: LongTask;

    // The supervisor.

    /// The postmaster as last seen (no IO).
    fn state(&self) -> Postmaster;
    /// Starts postgres with the files last written.
    async fn start(&self) -> Result<(), String>;
    /// Stops postgres, escalating to SIGKILL after `timeout`.
    async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), String>;
    /// [`Self::stop`] as the first half of a restart (the callbacks report `on_restart`).
    async fn stop_for_restart(&self, mode: StopMode, timeout: Duration) -> Result<(), String> {
        self.stop(mode, timeout).await
    }
    /// [`Self::stop`] of a member that must not stay primary (the callbacks report the role
    /// `demoted`, then `on_role_change` when it comes back as a replica).
    async fn demote(&self, mode: StopMode, timeout: Duration) -> Result<(), String> {
        self.stop(mode, timeout).await
    }
    /// Arms (or disarms, `None`) the fence: postgres is stopped at `deadline` whatever the
    /// loop is doing.
    fn set_fence(&self, deadline: Option<Instant>);
    /// Waits up to `timeout` for postgres to accept connections.
    async fn wait_ready(&self, timeout: Duration) -> bool;
    /// Before a planned stop: ends a running backup (recorded as interrupted), waiting at most
    /// `budget`. Without backups, nothing to do.
    async fn end_backup(&self, why: &str, budget: Duration) {
        let _ = (why, budget);
    }

    // The probe.

    /// Role, positions and replication of the running postgres.
    async fn status(&self) -> Result<PostgresStatus, String>;
    /// A counter that moves whenever SQL ran or the connection was dropped: a status read
    /// before an unchanged counter still stands.
    fn changes(&self) -> u64;
    /// Drops the connection (postgres was stopped or restarted).
    async fn reset(&self);
    /// `pg_promote()` (then `on_role_change`).
    async fn promote(&self) -> Result<(), String>;
    /// `CHECKPOINT`.
    async fn checkpoint(&self) -> Result<(), String>;
    /// This member holds (or no longer holds) the lock of a standby cluster: the callbacks'
    /// role of a running standby becomes `standby_leader` (or `replica`).
    async fn set_standby_leader(&self, _standby_leader: bool) {}
    /// Makes postgres re-read its configuration (then `on_reload`).
    async fn reload(&self) -> Result<(), String>;
    /// The non-temporary replication slots, physical and logical.
    async fn replication_slots(&self) -> Result<Vec<ReplicationSlot>, String>;
    /// Carries out one step of a slot plan (`super::slots::plan`).
    async fn change_slot(&self, change: &SlotChange) -> Result<(), SlotChangeError>;
    /// Reads the slots `names` from the primary `primary`, with their `state` files when
    /// `with_state`; a primary in recovery answers none.
    async fn read_primary_slots(
        &self,
        config: &Config,
        primary: &Upstream,
        names: &[String],
        with_state: bool,
    ) -> Result<Vec<PrimarySlot>, String>;
    /// Writes slots copied from the primary into the data directory; postgres is stopped.
    async fn install_slots(&self, slots: &[PrimarySlot]) -> Result<(), String>;
    /// For a standby whose replay is paused: the control file and the hot-standby settings
    /// below the primary's (`name ours < primary`), `None` when they cannot be read.
    async fn hot_standby_shortfall(&self) -> Option<(ControlData, Vec<String>)>;

    // The data directory.

    /// Empty, initialised (with its control file) or unusable. Reads the control file.
    async fn inspect_data_dir(&self) -> DataDir;
    /// `standby.signal` exists.
    fn standby_signal(&self) -> bool;
    /// The checkpoint position of the control file (postgres stopped).
    async fn control_checkpoint(&self) -> Option<u64>;
    /// Writes the managed files; `Ok(true)` when something changed.
    async fn write_conf(&self, files: &ManagedFiles) -> Result<bool, String>;
    /// Removes the data directory (reinitialise); absent counts as removed.
    async fn remove_data_dir(&self) -> Result<(), String>;
    /// The timeline history file of `timeline` (`tli<TAB>lsn<TAB>reason` lines).
    async fn timeline_history(&self, timeline: u32) -> Result<String, String>;
    /// The copy of the DCS `config` kept in the data directory.
    fn load_dynamic_copy(&self) -> Option<serde_json::Value>;
    /// Keeps a copy of the DCS `config` in the data directory.
    fn save_dynamic_copy(&self, value: &serde_json::Value) -> Result<(), String>;

    // Long tasks.

    /// Is the leader ready to be the source of pg_rewind (it answers queries as a primary)?
    async fn leader_ready_for_rewind(
        &self,
        config: &Config,
        upstream: &Upstream,
    ) -> Result<(), String>;
    /// initdb (or a restore), the files, the first start, the roles.
    fn bootstrap(&self, config: std::sync::Arc<Config>, files: ManagedFiles) -> Self::Task;
    /// A new replica of `upstream`, then its files. Without an upstream, only the replica
    /// methods marked `no_leader` are tried (Patroni's "bootstrap (without leader)").
    fn create_replica(
        &self,
        config: std::sync::Arc<Config>,
        upstream: Option<Upstream>,
        files: ManagedFiles,
    ) -> Self::Task;
    /// Crash recovery if `crashed`, pg_rewind against `upstream`, then the standby files.
    fn rewind(
        &self,
        config: std::sync::Arc<Config>,
        upstream: Upstream,
        crashed: bool,
        files: ManagedFiles,
    ) -> Self::Task;
}

/// The other members' REST APIs.
#[async_trait]
pub trait Peers: Send + Sync + 'static {
    /// Asks each `(name, api_url)` for its `/patroni` status, in parallel, each bounded by
    /// `timeout`; a member that did not answer usably has no status.
    async fn ask(&self, members: Vec<(String, String)>, timeout: Duration) -> Vec<PeerAnswer>;

    /// Sends `POST /failsafe` with `request` to each `(name, api_url)`, in parallel, each
    /// bounded by `timeout`. The default reaches nobody: every member counts as not accepting,
    /// which keeps a leader out of failsafe (it is fenced as without the mode).
    async fn post_failsafe(
        &self,
        members: Vec<(String, String)>,
        request: &super::failsafe::FailsafeRequest,
        timeout: Duration,
    ) -> Vec<super::failsafe::FailsafeAnswer> {
        let _ = (request, timeout);
        members
            .into_iter()
            .map(|(name, _)| super::failsafe::FailsafeAnswer {
                name,
                accepted: false,
                refusal: Some("this runtime does not reach the members' REST APIs".into()),
            })
            .collect()
    }
}

/// Time as the loop sees it, and where its decisions are reported.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The monotonic clock.
    fn now(&self) -> Instant;
    /// Wall-clock time, for `history` timestamps and scheduled switchovers and restarts.
    fn wall_now(&self) -> chrono::DateTime<chrono::Utc>;
    /// Wall-clock time as published in the status (`dcs_last_seen`).
    fn system_now(&self) -> SystemTime;
    /// Waits `duration` on the monotonic clock (a simulation advances its own time).
    async fn sleep(&self, duration: Duration);
    /// Each cycle's decision, after it was logged; a simulation records it.
    fn decided(&self, decision: &Decision) {
        let _ = decision;
    }
}
