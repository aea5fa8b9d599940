//! `GET /metrics` with Patroni's metric names and labels (`patroni-compat.md` §4).
//!
//! Patroni's three counters have no `_total` suffix, which prometheus-client would append to a
//! Counter, so every Patroni metric is registered as a gauge: names stay identical, and Patroni
//! 4.1.4 itself turned one of them (timeline) into a gauge.

use std::sync::atomic::AtomicU64;
use std::time::{Instant, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::{AgentStatus, PgState, Role};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    scope: String,
    name: String,
}

/// `4.1.4` → 40104 (each part zero-padded to two digits, as Patroni does).
fn version_number(v: &str) -> i64 {
    v.split('.')
        .take(3)
        .fold(0, |acc, p| acc * 100 + p.parse::<i64>().unwrap_or(0))
}

/// Renders the metrics text.
/// `failsafe_active`, `failsafe_enabled`: failsafe mode's state, which the REST API shares with
/// the HA loop rather than reading it from the published status.
pub fn render_metrics(
    status: &AgentStatus,
    failsafe_active: bool,
    failsafe_enabled: bool,
    now: Instant,
) -> String {
    let labels = Labels {
        scope: status.scope.clone(),
        name: status.name.clone(),
    };
    let mut registry = Registry::default();
    let mut int = |name: &str, help: &str, value: i64| {
        let family = Family::<Labels, Gauge>::default();
        family.get_or_create(&labels).set(value);
        registry.register(name, help, family);
    };
    let pg = status.postgres.as_ref();
    let role = status.effective_role();
    let b = |x: bool| i64::from(x);
    let i = |x: Option<u64>| x.map(|v| i64::try_from(v).unwrap_or(i64::MAX)).unwrap_or(0);
    let cluster = status.cluster_valid(now);
    int(
        "patroni_version",
        "Patroni API version this agent emulates",
        version_number(crate::dcs::PATRONI_API_VERSION),
    );
    int(
        "patroni_postgres_running",
        "Value is 1 if Postgres is running, 0 otherwise.",
        b(status.state == PgState::Running),
    );
    int(
        "patroni_primary",
        "Value is 1 if this node is the leader, 0 otherwise.",
        b(role == Role::Primary && pg.is_some()),
    );
    int(
        "patroni_xlog_location",
        "Current location of the Postgres transaction log, 0 if this node is not the leader.",
        i(pg.filter(|p| !p.in_recovery).and_then(|p| p.wal_flush_lsn)),
    );
    int(
        "patroni_standby_leader",
        "Value is 1 if this node is the standby_leader, 0 otherwise.",
        b(role == Role::StandbyLeader),
    );
    int(
        "patroni_replica",
        "Value is 1 if this node is a replica, 0 otherwise.",
        b(role == Role::Replica && pg.is_some()),
    );
    let listed = cluster.filter(|c| c.is_sync_listed(&status.name));
    let quorum = listed.is_some_and(|c| c.synchronous_mode().is_quorum());
    int(
        "patroni_sync_standby",
        "Value is 1 if this node is a sync standby replica, 0 otherwise.",
        b(listed.is_some() && !quorum),
    );
    int(
        "patroni_quorum_standby",
        "Value is 1 if this node is a quorum standby replica, 0 otherwise.",
        b(quorum),
    );
    let standby = pg.filter(|p| p.in_recovery);
    int(
        "patroni_xlog_received_location",
        "Current location of the received Postgres transaction log, 0 if this node is not a replica.",
        i(standby.and_then(|p| p.receive_lsn)),
    );
    int(
        "patroni_xlog_replayed_location",
        "Current location of the replayed Postgres transaction log, 0 if this node is not a replica.",
        i(standby.and_then(|p| p.replay_lsn)),
    );
    int(
        "patroni_xlog_paused",
        "Value is 1 if the Postgres xlog is paused, 0 otherwise.",
        b(standby.is_some_and(|p| p.replay_paused)),
    );
    int(
        "patroni_postgres_streaming",
        "Value is 1 if Postgres is streaming, 0 otherwise.",
        b(standby.is_some_and(|p| p.streaming)),
    );
    int(
        "patroni_postgres_in_archive_recovery",
        "Value is 1 if Postgres is replicating from archive, 0 otherwise.",
        b(standby.is_some_and(|p| !p.streaming)),
    );
    int(
        "patroni_postgres_server_version",
        "Version of Postgres (if running), 0 otherwise.",
        pg.map(|p| i64::from(p.server_version)).unwrap_or(0),
    );
    int(
        "patroni_cluster_unlocked",
        "Value is 1 if the cluster is unlocked, 0 if locked.",
        b(cluster.is_none_or(|c| c.leader.is_none())),
    );
    int(
        "patroni_failsafe_mode_is_active",
        "Value is 1 if failsafe mode is active, 0 if inactive.",
        b(failsafe_active),
    );
    int(
        "patroni_failsafe_mode_enabled",
        "Value is 1 if failsafe_mode is enabled, 0 otherwise.",
        b(failsafe_enabled),
    );
    int(
        "patroni_failsafe_member",
        "Value is 1 if this node is a member of failsafe, 0 otherwise.",
        b(status
            .cluster
            .as_ref()
            .and_then(|c| c.failsafe.as_ref())
            .is_some_and(|t| t.contains_key(&status.name))),
    );
    int(
        "patroni_postgres_timeline",
        "Postgres timeline of this node (if running), 0 otherwise.",
        pg.and_then(|p| p.timeline).map(i64::from).unwrap_or(0),
    );
    int(
        "patroni_dcs_last_seen",
        "Epoch timestamp when DCS was last contacted successfully by Patroni.",
        status
            .dcs_last_seen
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
            .unwrap_or(0),
    );
    int(
        "patroni_pending_restart",
        "Value is 1 if the node needs a restart, 0 otherwise.",
        b(status.pending_restart),
    );
    int(
        "patroni_is_paused",
        "Value is 1 if auto failover is disabled, 0 otherwise.",
        b(status.paused),
    );
    int(
        "patroni_postgres_state",
        "Numeric representation of Postgres state.",
        status.state.metric_value(),
    );
    let priority = if status
        .tags
        .get("nofailover")
        .and_then(crate::config::flex::parse_bool)
        == Some(true)
    {
        0
    } else {
        status
            .tags
            .get("failover_priority")
            .and_then(crate::config::flex::parse_int)
            .unwrap_or(1)
    };
    int(
        "patroni_failover_priority",
        "Value is 0 or the failover priority tag when failover is allowed.",
        priority,
    );
    let lease_left = status
        .leader_valid_until
        .map(|u| u.saturating_duration_since(now).as_secs_f64())
        .unwrap_or(0.0);
    let mut float = |name: &str, help: &str, value: f64| {
        let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        family.get_or_create(&labels).set(value);
        registry.register(name, help, family);
    };
    float(
        "patroni_postmaster_start_time",
        "Epoch seconds since Postgres started.",
        status.postmaster_start_epoch.unwrap_or(0.0),
    );
    let replayed_ts = standby
        .and_then(|p| p.replayed_timestamp.as_deref())
        .and_then(|t| chrono::DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%:z").ok())
        .map(|t| t.timestamp_micros() as f64 / 1e6)
        .unwrap_or(0.0);
    float(
        "patroni_xlog_replayed_timestamp",
        "Current timestamp of the replayed Postgres transaction log, 0 if null.",
        replayed_ts,
    );
    float(
        "pgwarden_leader_lease_certain_seconds",
        "Seconds the leader lease is certain to remain valid (0 when not the leader).",
        lease_left,
    );
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

    #[test]
    fn patroni_version_is_encoded_like_patroni() {
        assert_eq!(version_number("4.1.4"), 40104);
        assert_eq!(version_number("3.0.2"), 30002);
    }
}
