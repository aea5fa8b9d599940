//! What the agent knows about itself at an instant, published by the HA loop for the REST API and
//! metrics. The loop replaces the whole value at the end of every cycle (and when postgres changes
//! state), so readers never see half an update.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

use crate::dcs::ClusterView;

/// Patroni's `state` strings (`patroni-compat.md` §1.6), with their `/metrics` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PgState {
    InitializingNewCluster,
    /// A custom `bootstrap.method` runs (Patroni's `CUSTOM_BOOTSTRAP`).
    RunningCustomBootstrap,
    InitdbFailed,
    CreatingReplica,
    Running,
    Starting,
    StartFailed,
    Restarting,
    RestartFailed,
    Stopping,
    Stopped,
    StopFailed,
    Crashed,
    /// Believed running, but the status query failed.
    Unknown,
}

impl PgState {
    pub fn as_str(self) -> &'static str {
        match self {
            PgState::InitializingNewCluster => "initializing new cluster",
            PgState::RunningCustomBootstrap => "running custom bootstrap script",
            PgState::InitdbFailed => "initdb failed",
            PgState::CreatingReplica => "creating replica",
            PgState::Running => "running",
            PgState::Starting => "starting",
            PgState::StartFailed => "start failed",
            PgState::Restarting => "restarting",
            PgState::RestartFailed => "restart failed",
            PgState::Stopping => "stopping",
            PgState::Stopped => "stopped",
            PgState::StopFailed => "stop failed",
            PgState::Crashed => "crashed",
            PgState::Unknown => "unknown",
        }
    }

    /// Number used by `patroni_postgres_state`.
    pub fn metric_value(self) -> i64 {
        match self {
            PgState::InitializingNewCluster => 0,
            PgState::RunningCustomBootstrap => 2,
            PgState::InitdbFailed => 1,
            PgState::CreatingReplica => 4,
            PgState::Running => 5,
            PgState::Starting => 6,
            PgState::StartFailed => 8,
            PgState::Restarting => 9,
            PgState::RestartFailed => 10,
            PgState::Stopping => 11,
            PgState::Stopped => 12,
            PgState::StopFailed => 13,
            PgState::Crashed => 14,
            PgState::Unknown => -1,
        }
    }
}

impl std::fmt::Display for PgState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Patroni's `role` values (4.x spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Role {
    Primary,
    Replica,
    StandbyLeader,
    Demoted,
    Uninitialized,
    Promoted,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::StandbyLeader => "standby_leader",
            Role::Demoted => "demoted",
            Role::Uninitialized => "uninitialized",
            Role::Promoted => "promoted",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One walsender row (`pg_stat_replication`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicationRow {
    pub usename: String,
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: String,
    pub sync_state: String,
    pub sync_priority: i32,
    /// How far the standby has written, flushed and replayed (bytes; `None` until it
    /// streams). Used to pick synchronous standbys; not part of Patroni's `replication` list
    /// in `GET /patroni`, so never serialized.
    #[serde(skip)]
    pub write_lsn: Option<u64>,
    #[serde(skip)]
    pub flush_lsn: Option<u64>,
    #[serde(skip)]
    pub replay_lsn: Option<u64>,
}

/// What a status query against the running postgres returned.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresStatus {
    pub in_recovery: bool,
    pub server_version: i32,
    pub timeline: Option<u32>,
    pub postmaster_start_time: Option<String>,
    /// Postmaster start as Unix epoch seconds (`patroni_postmaster_start_time`).
    pub postmaster_start_epoch: Option<f64>,
    /// Primary: `pg_current_wal_flush_lsn()`.
    pub wal_flush_lsn: Option<u64>,
    /// Standby: `pg_last_wal_receive_lsn()`.
    pub receive_lsn: Option<u64>,
    /// Standby: `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<u64>,
    pub replayed_timestamp: Option<String>,
    pub replay_paused: bool,
    /// `streaming` when a WAL receiver is streaming.
    pub streaming: bool,
    pub system_identifier: Option<String>,
    pub replication: Vec<ReplicationRow>,
    /// Parameters changed in the configuration that only take effect after a restart.
    pub pending_restart: Vec<String>,
    /// Standby: the minimum recovery point, `(timeline, LSN)` from `pg_control_recovery()`.
    /// Pages on disk never reflect WAL past it, and unlike `timeline` (the last restartpoint's
    /// while the wal receiver is down) the pair is consistent.
    pub min_recovery: Option<(u32, u64)>,
    /// The `synchronous_standby_names` postgres runs with (after its last reload).
    pub synchronous_standby_names: Option<String>,
}

impl PostgresStatus {
    /// The position Patroni publishes as `xlog_location`.
    pub fn wal_position(&self) -> Option<u64> {
        if self.in_recovery {
            match (self.receive_lsn, self.replay_lsn) {
                (Some(r), Some(p)) => Some(r.max(p)),
                (r, p) => r.or(p),
            }
        } else {
            self.wal_flush_lsn
        }
    }
}

/// The agent's published state.
#[derive(Debug, Clone)]
pub struct AgentStatus {
    pub scope: String,
    pub name: String,
    pub state: PgState,
    /// Agent's role; when postgres answers, taken from `pg_is_in_recovery()`.
    pub role: Role,
    /// Last successful status query while postgres runs; `None` when it is down.
    pub postgres: Option<PostgresStatus>,
    /// We hold `leader` and our last confirmed renewal keeps it valid until then.
    pub leader_valid_until: Option<Instant>,
    /// Last successfully read cluster view and when it was read.
    pub cluster: Option<Arc<ClusterView>>,
    pub cluster_read_at: Option<Instant>,
    /// Wall-clock time of the last successful DCS read (`dcs_last_seen`).
    pub dcs_last_seen: Option<SystemTime>,
    pub paused: bool,
    /// Effective tags as Patroni publishes them.
    pub tags: serde_json::Map<String, serde_json::Value>,
    pub pending_restart: bool,
    pub database_system_identifier: Option<String>,
    /// When the HA loop is next due to run; `/liveness` fails when this is far in the past.
    pub next_cycle_due: Instant,
    pub ttl: Duration,
    pub loop_wait: Duration,
    pub maximum_lag_on_failover: u64,
    pub postmaster_start_epoch: Option<f64>,
}

impl AgentStatus {
    /// Patroni's `is_leader`: holds the lock and the last update is less than `ttl` old.
    pub fn is_leader(&self, now: Instant) -> bool {
        self.leader_valid_until.is_some_and(|until| now < until)
    }

    /// The cached view is valid for `ttl` after the last successful read.
    pub fn cluster_valid(&self, now: Instant) -> Option<&ClusterView> {
        match (self.cluster.as_deref(), self.cluster_read_at) {
            (Some(view), Some(at)) if now.saturating_duration_since(at) < self.ttl => Some(view),
            _ => None,
        }
    }

    /// Role as reported to clients: postgres' own answer when it is up.
    pub fn effective_role(&self) -> Role {
        match &self.postgres {
            Some(pg) if !pg.in_recovery => Role::Primary,
            Some(_) if self.role == Role::StandbyLeader => Role::StandbyLeader,
            Some(_) => Role::Replica,
            None => self.role,
        }
    }
}

/// A fresh postgres status on demand, for `GET /patroni`: peers racing for the leader key compare
/// WAL positions, and a value cached for a whole loop could make them pick the wrong winner.
#[async_trait]
pub trait LiveProbe: Send + Sync {
    /// Queries postgres now; `None` when it is down or does not answer in time.
    async fn postgres_now(&self) -> Option<PostgresStatus>;
}
