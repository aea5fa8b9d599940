//! The distributed configuration store (DCS): one trait, implemented over etcd v3 ([`etcd`]) and
//! the Kubernetes API ([`kubernetes`]).
//!
//! The trait follows Patroni's `AbstractDCS` operation list. Every method talks to the store; the
//! caller (the HA loop) decides what a failure means. A failed read is never "no leader": it is
//! reported as an error, and the HA core treats the cluster as unknown.

pub mod etcd;
pub mod keys;
pub mod kubernetes;
pub mod model;
mod release_token;
mod wake;

use std::time::{Duration, Instant};

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

pub use model::{
    ClusterView, FailoverRequest, HistoryLine, LeaderKey, LeaderStatus, Member, MemberRecord,
    SyncState, Versioned, PATRONI_API_VERSION,
};
pub use release_token::{ReleaseToken, ReleaseTokenSink};

/// The key (etcd) or `status` ConfigMap annotation (Kubernetes) holding the failsafe topology,
/// written with [`Dcs::write_key`] as Patroni does.
pub const FAILSAFE_KEY: &str = "failsafe";

/// The cause of a DCS failure: the client's own error, or a message when there is none.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// How a DCS operation failed. The split matters for fencing (`patroni-compat.md` §5.4).
#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    /// The store did not answer in time, or the connection failed. The operation may or may not
    /// have been applied.
    #[error("DCS unreachable")]
    Unreachable(#[source] Cause),
    /// The store answered and refused (compare failed, lease unknown, permission denied, ...).
    #[error("DCS refused the operation")]
    Rejected(#[source] Cause),
    /// Our lease is gone in the store: keys attached to it have been deleted.
    #[error("the agent's lease no longer exists")]
    LeaseLost,
}

impl DcsError {
    /// True when the store may simply have been out of reach: retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, DcsError::Unreachable(_))
    }

    /// `Unreachable`, caused by `cause` (an error, or a message).
    pub fn unreachable(cause: impl Into<Cause>) -> DcsError {
        DcsError::Unreachable(cause.into())
    }

    /// `Rejected`, caused by `cause` (an error, or a message).
    pub fn rejected(cause: impl Into<Cause>) -> DcsError {
        DcsError::Rejected(cause.into())
    }
}

/// What a successful lease renewal proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRenewal {
    /// When the renewal request was sent, by our clock. The store can only have refreshed the
    /// lease after this instant, so `sent_at + ttl` is a lower bound of the expiry.
    pub sent_at: Instant,
    /// TTL the store granted on this renewal.
    pub ttl: Duration,
}

/// The outcome of waiting for a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// The timeout elapsed.
    Timeout,
    /// The `leader` key changed (acquired, released, expired).
    LeaderChanged,
    /// Another watched key (`config`, `failover`, `status`, members) changed.
    ClusterChanged,
}

/// The operations the agent needs from a DCS.
///
/// Callers may assume: a method that returns `Ok` was applied; a method that returns
/// `Err(Unreachable)` may or may not have been applied; `Err(Rejected)` was not applied.
/// Each call is bounded by the implementation's request timeout (`retry_timeout`), so no call
/// blocks the HA loop for longer than that.
#[async_trait]
pub trait Dcs: Send + Sync {
    /// Reads the whole cluster (linearizable: it reflects every change acknowledged before the
    /// call).
    async fn cluster(&self) -> Result<ClusterView, DcsError>;

    /// The view the HA loop decides on each cycle. It may come from a watch instead of a read
    /// (etcd), but only when the implementation can vouch that it contains every write this
    /// agent made, that the store answered our last request, and that it was refreshed by a
    /// linearizable read within one `ttl`. It is read like [`Dcs::cluster`] whenever it shows no
    /// leader, because members decide to race for the key on it. The default reads.
    /// Shared, not copied: an idle cluster's view is the same cycle after cycle.
    async fn cluster_view(&self) -> Result<Arc<ClusterView>, DcsError> {
        self.cluster().await.map(Arc::new)
    }

    /// Bootstrap race: creates `initialize` with `value` only if the key does not exist.
    /// `Ok(true)` means this member won.
    async fn race_initialize(&self, value: &str) -> Result<bool, DcsError>;

    /// Sets `initialize` to the system identifier unconditionally.
    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError>;

    /// Deletes `initialize`; with `expected_revision`, only if the key is still at that revision
    /// (the claim that was seen, not a newer one). `Ok(false)` means the compare failed.
    async fn cancel_initialize(&self, expected_revision: Option<i64>) -> Result<bool, DcsError>;

    /// Writes `config`. With `expected_revision`, only if the key is still at that revision
    /// (`Some(0)` = only if absent). `Ok(false)` means the compare failed.
    async fn write_config(
        &self,
        config: &serde_json::Value,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError>;

    /// Creates `leader` with our name, attached to our lease, only if it is absent.
    async fn acquire_leader(&self) -> Result<bool, DcsError>;

    /// Refreshes our lease (and re-attaches `leader` if the lease had to be re-granted).
    /// Must only be called while we believe we hold `leader`.
    async fn renew_leader(&self) -> Result<LeaseRenewal, DcsError>;

    /// Deletes `leader` if and only if it still holds our name.
    async fn release_leader(&self) -> Result<(), DcsError>;

    /// Writes `members/<name>` attached to our lease, keeping the lease alive.
    async fn touch_member(&self, record: &MemberRecord) -> Result<(), DcsError>;

    /// The cluster view lacks our member key although we wrote it (it was deleted: `patronictl
    /// remove`, an emptied store): the next `touch_member` must write even an unchanged record.
    async fn member_key_lost(&self) {}

    /// Writes `status`.
    async fn write_status(&self, status: &LeaderStatus) -> Result<(), DcsError>;

    /// Writes `history`.
    async fn write_history(&self, history: &[HistoryLine]) -> Result<(), DcsError>;

    /// Writes `failover` (`{}` clears it). With `expected_revision`, compare-and-set.
    async fn write_failover(
        &self,
        request: &FailoverRequest,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError>;

    /// Writes or deletes (`None`) `sync`, compare-and-set on `expected_revision` when given.
    async fn write_sync(
        &self,
        sync: Option<&SyncState>,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError>;

    /// Revokes our lease: our member key (and `leader`, if still attached) disappear at once.
    async fn revoke_lease(&self) -> Result<(), DcsError>;

    /// Waits until a watched key changes or `timeout` elapses.
    async fn wait_for_change(&self, timeout: Duration) -> Wakeup;

    /// Creates `<base>/<key>` with `value`, attached to this agent's lease, only if the key is
    /// absent: a lock that disappears with the agent (the backup lock, `crate::backup`).
    /// `Ok(false)` means someone else holds it. The default refuses: a DCS that cannot do this
    /// runs no backups rather than risking two at once.
    async fn acquire_lease_key(&self, key: &str, value: &str) -> Result<bool, DcsError> {
        let _ = value;
        Err(DcsError::rejected(format!(
            "this DCS does not support the `{key}` lock"
        )))
    }

    /// Deletes `<base>/<key>` if and only if it still holds `value`.
    async fn release_lease_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        let _ = value;
        Err(DcsError::rejected(format!(
            "this DCS does not support the `{key}` lock"
        )))
    }

    /// Reads `<base>/<key>` (`None`: absent).
    async fn read_key(&self, key: &str) -> Result<Option<String>, DcsError> {
        Err(DcsError::rejected(format!(
            "this DCS does not support reading `{key}`"
        )))
    }

    /// Writes `<base>/<key>` (no lease: it outlives the writer).
    async fn write_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        let _ = value;
        Err(DcsError::rejected(format!(
            "this DCS does not support writing `{key}`"
        )))
    }

    /// The leader record as this client last wrote or confirmed it, as a token the fence guard
    /// keeps for a crash release (`crate::postgres::crash_release`): `None` while we do not
    /// hold the leader. The default never has one (no crash release).
    fn release_token(&self) -> watch::Receiver<Option<String>> {
        watch::channel(None).1
    }

    /// Hands the [`Dcs::release_token`] to `sink` now and at every change, synchronously: a
    /// token set right before a write reaches the sink before the write is sent. The default
    /// (no crash release) never has a token.
    fn on_release_token(&self, _sink: ReleaseTokenSink) {}

    /// After this member's agent died and its postgres was proven stopped: releases the leader
    /// record only if it is still the one `token` names. `Ok(false)`: it was not (another
    /// member leads, or it ran out), nothing was changed.
    async fn release_dead_leader(&self, token: &str) -> Result<bool, DcsError> {
        Err(DcsError::rejected(format!(
            "this DCS cannot release the leader record {token}"
        )))
    }
}
