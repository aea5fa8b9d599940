//! The HA side of the REST write commands that only the loop can carry out (`POST /reload`,
//! `POST`/`DELETE /restart`, `POST /reinitialize`): typed requests in, typed replies out.
//! `api::commands` parses the HTTP request and maps each reply to Patroni's status code and
//! message; the loop knows no HTTP.

use tokio::sync::oneshot;

use super::observe::TaskKind;
use super::restart::RestartRequest;

/// Requests only the HA loop itself can carry out.
#[derive(Debug)]
pub enum LoopRequest {
    /// Re-read the local configuration file (`POST /reload`, SIGHUP).
    Reload { reply: oneshot::Sender<ReloadReply> },
    /// Restart postgres now, or schedule a restart (`POST /restart`).
    Restart {
        request: RestartRequest,
        reply: oneshot::Sender<RestartReply>,
    },
    /// Cancel the scheduled restart (`DELETE /restart`).
    CancelScheduledRestart {
        reply: oneshot::Sender<CancelRestartReply>,
    },
    /// Remove the data directory and clone the leader again (`POST /reinitialize`).
    Reinitialize {
        force: bool,
        reply: oneshot::Sender<ReinitializeReply>,
    },
}

/// The answer to [`LoopRequest::Reload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadReply {
    /// Applied (or nothing to re-read): takes effect in the next cycle.
    Scheduled,
    /// The file renames the member or the cluster, which only an agent restart may do.
    NameOrScopeChanged,
    /// The file does not validate; the running configuration stays.
    Invalid(String),
}

/// The answer to [`LoopRequest::Restart`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartReply {
    /// A scheduled restart was recorded.
    Scheduled,
    /// A scheduled restart is already waiting (only one at a time, as in Patroni).
    AlreadyScheduled,
    /// The request's conditions (role, version, pending flag) do not hold now.
    ConditionsNotSatisfied,
    /// A long action runs; a restart would interrupt it.
    TaskInProgress(TaskKind),
    /// Postgres was restarted and accepts connections.
    Restarted,
    /// Stopping postgres failed.
    StopFailed(String),
    /// The cycle after the stop failed, or postgres did not come back.
    Failed,
    /// Postgres runs but did not accept connections within the timeout.
    StillStarting,
}

/// The answer to [`LoopRequest::CancelScheduledRestart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRestartReply {
    Cancelled,
    NoneScheduled,
}

/// The answer to [`LoopRequest::Reinitialize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReinitializeReply {
    /// The data directory is removed; the next cycles clone the leader.
    Started,
    /// There is no leader to clone from.
    NoLeader,
    /// We hold the lock: the leader cannot reinitialise itself.
    IsLeader,
    /// A long action runs and `force` was not given.
    TaskInProgress(TaskKind),
    /// Removing the data directory failed.
    RemoveFailed(String),
}
