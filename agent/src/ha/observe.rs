//! What one HA cycle saw: the input of [`super::decide::decide`].
//!
//! "Unknown" is modelled apart from "absent": a failed DCS read is [`DcsView::Unknown`], never a
//! cluster without a leader, and a postgres that does not answer is
//! [`PostgresView::Unresponsive`], not down.

use std::sync::Arc;
use std::time::Instant;

use crate::dcs::{ClusterView, LeaseRenewal};
use crate::postgres::controldata::ControlData;
use crate::state::PostgresStatus;

/// The DCS as seen this cycle.
#[derive(Debug, Clone, PartialEq)]
pub enum DcsView {
    Known(Arc<ClusterView>),
    /// The read failed; the text says why.
    Unknown(String),
}

/// The result of trying to renew our lease this cycle (only tried while we hold `leader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseCheck {
    /// We did not believe we held `leader`, so nothing was renewed.
    NotHeld,
    Renewed(LeaseRenewal),
    /// The store did not answer: the lease may still be valid until the fence deadline.
    Unconfirmed,
    /// The store answered that the key or the lease is no longer ours.
    Lost,
}

/// The data directory before anything was started.
#[derive(Debug, Clone, PartialEq)]
pub enum DataDir {
    /// Missing or empty: a new member.
    Empty,
    Initialized {
        control: ControlData,
        /// `standby.signal` exists: the directory was last run as a standby.
        standby_signal: bool,
    },
    /// Non-empty but not a usable postgres data directory; never touched.
    Unusable(String),
}

impl DataDir {
    pub fn system_identifier(&self) -> Option<&str> {
        match self {
            DataDir::Initialized { control, .. } => Some(&control.system_identifier),
            _ => None,
        }
    }

    /// Last run as a primary (not a standby): following another leader may need a rewind.
    pub fn was_primary(&self) -> bool {
        use crate::postgres::controldata::ClusterState;
        match self {
            DataDir::Initialized {
                control,
                standby_signal,
            } => {
                !standby_signal
                    && matches!(
                        control.state,
                        ClusterState::InProduction | ClusterState::ShutDown
                    )
            }
            _ => false,
        }
    }

    /// WAL position known from the control file (the last checkpoint).
    pub fn checkpoint_lsn(&self) -> Option<u64> {
        match self {
            DataDir::Initialized { control, .. } => control.checkpoint_lsn,
            _ => None,
        }
    }
}

/// The local postgres.
// One observation per cycle, matched everywhere by value: boxing the status would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum PostgresView {
    Down,
    /// The postmaster runs but does not accept connections yet (or is stopping).
    Starting,
    Running(PostgresStatus),
    /// Accepts connections by its pidfile, but the status query failed.
    Unresponsive,
    /// Exited without being asked to.
    Crashed,
    StartFailed(String),
}

impl PostgresView {
    /// Running and out of recovery: it would acknowledge writes.
    pub fn is_writable_primary(&self) -> bool {
        matches!(self, PostgresView::Running(s) if !s.in_recovery)
    }

    /// The process exists (whatever its readiness).
    pub fn is_up(&self) -> bool {
        matches!(
            self,
            PostgresView::Running(_) | PostgresView::Starting | PostgresView::Unresponsive
        )
    }
}

/// The kinds of long action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Bootstrap,
    CreateReplica,
    Rewind,
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskKind::Bootstrap => "bootstrap",
            TaskKind::CreateReplica => "replica creation",
            TaskKind::Rewind => "rewind",
        })
    }
}

/// A long action running in the background while the loop keeps deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskView {
    Idle,
    Running(TaskKind),
    Failed(TaskKind, String),
}

/// A peer's answer during a leader race; `status` is `None` when it did not answer usably.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAnswer {
    pub name: String,
    pub status: Option<crate::peer::PeerStatus>,
}

/// Everything one cycle observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub now: Instant,
    /// Wall-clock time, only for `scheduled_at` of a switchover.
    pub wall_now: chrono::DateTime<chrono::Utc>,
    pub dcs: DcsView,
    pub lease: LeaseCheck,
    pub data_dir: DataDir,
    pub postgres: PostgresView,
    pub task: TaskView,
    /// Other members' `/patroni`, asked only when racing for a free lock.
    pub peers: Option<Vec<PeerAnswer>>,
    /// The upstream our standby configuration currently points at (`host:port`).
    pub following: Option<String>,
    /// We promoted and have not completed a CHECKPOINT since: replicas must not pg_rewind
    /// against us yet (our control file still names the old timeline).
    pub checkpoint_after_promote_pending: bool,
    /// The timeline whose lineage this agent last wrote to `history` (`HaCore`).
    pub history_recorded_for: Option<u32>,
    /// `initialize` has held an unfinished bootstrap claim while no member held `leader` for
    /// longer than `timing::bootstrap_claim_abandoned` allows: whoever claimed it is gone.
    pub bootstrap_claim_abandoned: bool,
    /// We hold the lock and our postgres has not run as a primary for longer than
    /// `primary_start_timeout` allows (`timing::primary_start_overdue`).
    pub primary_start_overdue: bool,
    /// Our standby paused its replay because the primary runs with a higher `max_connections`
    /// (or another hot-standby parameter) than ours: it must restart with the primary's values.
    pub replay_paused_for_parameters: bool,
    /// Failsafe mode, on a replica: the leader that confirmed within `ttl` that it runs.
    pub failsafe_leader: Option<String>,
    /// Failsafe mode, on the leader: the DCS is out of reach and every member of the topology
    /// accepted this cycle's `POST /failsafe`; the fence moved as for a renewal.
    pub failsafe_held: bool,
    /// The last view read from the DCS had the cluster paused: while the DCS is out of reach,
    /// maintenance mode is assumed to last.
    pub paused_when_last_seen: bool,
}
