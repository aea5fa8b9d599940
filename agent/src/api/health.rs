//! Patroni's health checks (`patroni-compat.md` §2.3, §2.4) as pure functions of the published
//! status, the request path and query, and the time.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::state::{AgentStatus, PgState, Role};

/// Parses `?lag=` values: plain bytes or `16kB`, `64MB`, `1GB`, `1TB` (powers of 1024).
pub fn parse_size(value: &str) -> Option<u64> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// What the request asks to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    StandbyLeader,
    Leader,
    Primary,
    Replica,
    ReadOnly,
    Health,
    Sync,
    Async,
    ReadOnlySync,
    Quorum,
    ReadOnlyQuorum,
    Unknown,
}

/// Patroni's substring routing, first match wins.
pub fn classify(path: &str) -> Check {
    let p = path.to_ascii_lowercase();
    if p.contains("standby_leader") || p.contains("standby-leader") {
        Check::StandbyLeader
    } else if p.contains("leader") {
        Check::Leader
    } else if p.contains("master") || p.contains("primary") || p.contains("read-write") || p == "/"
    {
        Check::Primary
    } else if p.contains("replica") {
        Check::Replica
    } else if p.contains("read-only") && !p.contains("sync") && !p.contains("quorum") {
        Check::ReadOnly
    } else if p.contains("health") {
        Check::Health
    } else if p == "/sync" || p == "/synchronous" {
        Check::Sync
    } else if p == "/async" || p == "/asynchronous" {
        Check::Async
    } else if p == "/read-only-sync" || p == "/read-only-synchronous" {
        Check::ReadOnlySync
    } else if p == "/quorum" {
        Check::Quorum
    } else if p == "/read-only-quorum" {
        Check::ReadOnlyQuorum
    } else {
        Check::Unknown
    }
}

/// Listed in `sync` by the current leader: `Some(true)` as a quorum standby (quorum commit),
/// `Some(false)` as a synchronous standby.
fn listed_in_sync(status: &AgentStatus, now: Instant) -> Option<bool> {
    status
        .cluster_valid(now)
        .filter(|c| c.is_sync_listed(&status.name))
        .map(|c| c.synchronous_mode().is_quorum())
}

fn is_sync_standby(status: &AgentStatus, now: Instant) -> bool {
    listed_in_sync(status, now) == Some(false)
}

fn is_quorum_standby(status: &AgentStatus, now: Instant) -> bool {
    listed_in_sync(status, now) == Some(true)
}

/// Whether `tag_<k>=<v>` filters all match the configured tags.
fn tags_match(status: &AgentStatus, query: &BTreeMap<String, String>) -> bool {
    query
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("tag_").map(|t| (t, v)))
        .all(|(tag, want)| {
            status.tags.get(tag).is_some_and(|have| {
                let have = match have {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                &have == want
            })
        })
}

/// The leader's last known position: `status.optime` from the cached view.
fn leader_optime(status: &AgentStatus) -> Option<u64> {
    status
        .cluster
        .as_ref()
        .and_then(|c| c.status.as_ref())
        .map(|s| s.optime)
}

fn replica_ok(status: &AgentStatus, query: &BTreeMap<String, String>) -> bool {
    if status.effective_role() != Role::Replica || status.state != PgState::Running {
        return false;
    }
    if status
        .tags
        .get("noloadbalance")
        .and_then(crate::config::flex::parse_bool)
        == Some(true)
    {
        return false;
    }
    let pg = status.postgres.as_ref();
    // Paused replay serves ever staler reads, whatever the WAL receiver still gets.
    if pg.is_some_and(|p| p.replay_paused) {
        return false;
    }
    if let Some(lag) = query.get("lag") {
        let Some(max) = parse_size(lag) else {
            return false;
        };
        let replayed = pg.and_then(|p| p.replay_lsn).unwrap_or(0);
        if leader_optime(status).is_some_and(|o| o > replayed.saturating_add(max)) {
            return false;
        }
    }
    if let Some(want) = query.get("replication_state") {
        let have = match pg {
            Some(p) if p.streaming => "streaming",
            Some(_) => "in archive recovery",
            None => "",
        };
        if have != want {
            return false;
        }
    }
    true
}

/// The status code of a health check.
pub fn evaluate(
    check: Check,
    status: &AgentStatus,
    query: &BTreeMap<String, String>,
    now: Instant,
) -> u16 {
    let is_leader = status.is_leader(now);
    let cluster_valid = status.cluster_valid(now).is_some();
    let role = status.effective_role();
    let (leader, primary, standby_leader) = if !cluster_valid && status.paused {
        (
            matches!(role, Role::Primary | Role::StandbyLeader),
            role == Role::Primary,
            role == Role::StandbyLeader,
        )
    } else if is_leader && role == Role::StandbyLeader {
        // The standby leader of a standby cluster: `/leader` and `/standby-leader` say 200
        // while its postgres runs (it serves reads), `/primary` never does.
        let running = status.state == PgState::Running;
        (running, false, running)
    } else if is_leader {
        (true, true, false)
    } else {
        (false, false, false)
    };
    // The lock alone is not enough: during bootstrap, a crash restart or a start that cannot
    // finish (a full disk) the leader holds it while no write can succeed, and HAProxy must not
    // send clients there (Patroni #2756). 200 only while postgres answers as a primary.
    let writable = status.state == PgState::Running
        && status.postgres.as_ref().is_some_and(|p| !p.in_recovery);
    let leader = leader && (writable || standby_leader);
    let primary = primary && writable;
    let with_tags = |ok: bool| ok && tags_match(status, query);
    let ok = match check {
        Check::StandbyLeader => standby_leader,
        Check::Leader => leader,
        Check::Primary => primary,
        Check::Replica => with_tags(replica_ok(status, query)),
        Check::ReadOnly => with_tags(primary || standby_leader || replica_ok(status, query)),
        Check::Health => with_tags(status.state == PgState::Running),
        Check::Sync => {
            with_tags(cluster_valid && is_sync_standby(status, now) && replica_ok(status, query))
        }
        Check::Async => with_tags(
            cluster_valid && listed_in_sync(status, now).is_none() && replica_ok(status, query),
        ),
        Check::Quorum => {
            with_tags(cluster_valid && is_quorum_standby(status, now) && replica_ok(status, query))
        }
        Check::ReadOnlyQuorum => with_tags(
            primary
                || standby_leader
                || (is_quorum_standby(status, now) && replica_ok(status, query)),
        ),
        Check::ReadOnlySync => with_tags(
            primary
                || standby_leader
                || (is_sync_standby(status, now) && replica_ok(status, query)),
        ),
        Check::Unknown => false,
    };
    if ok {
        200
    } else {
        503
    }
}

/// `GET /liveness`: the HA loop is not stuck.
pub fn liveness(status: &AgentStatus, now: Instant) -> u16 {
    if status.paused {
        return 200;
    }
    let limit = if status.effective_role() == Role::Primary {
        status.ttl
    } else {
        status.ttl * 2
    };
    if now.saturating_duration_since(status.next_cycle_due) > limit {
        503
    } else {
        200
    }
}

/// `GET /readiness` (Patroni HEAD rules). `failsafe_active`: a streaming replica whose DCS
/// view is stale stays ready while failsafe mode is in force (its leader vouched for itself).
pub fn readiness(
    status: &AgentStatus,
    query: &BTreeMap<String, String>,
    failsafe_active: bool,
    now: Instant,
) -> u16 {
    if status.is_leader(now) {
        return 200;
    }
    if status.state != PgState::Running {
        return 503;
    }
    let Some(pg) = &status.postgres else {
        return 503;
    };
    if !pg.in_recovery {
        // A primary without the lock is about to be demoted.
        return 503;
    }
    if !pg.streaming {
        return 503;
    }
    if status.cluster_valid(now).is_none() {
        return if failsafe_active { 200 } else { 503 };
    }
    let max = match query.get("lag") {
        Some(v) => match parse_size(v) {
            Some(m) => m,
            None => return 503,
        },
        None => status.maximum_lag_on_failover,
    };
    let position = if query.get("mode").map(String::as_str) == Some("write") {
        pg.receive_lsn
    } else {
        pg.replay_lsn
    }
    .unwrap_or(0);
    match leader_optime(status) {
        Some(o) if o > position.saturating_add(max) => 503,
        _ => 200,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("16kB"), Some(16 * 1024));
        assert_eq!(parse_size("64MB"), Some(64 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("1PB"), None);
    }

    #[test]
    fn routing_follows_patronis_substring_rules() {
        assert_eq!(classify("/"), Check::Primary);
        assert_eq!(classify("/master"), Check::Primary);
        assert_eq!(classify("/read-write"), Check::Primary);
        assert_eq!(classify("/leader"), Check::Leader);
        assert_eq!(classify("/standby-leader"), Check::StandbyLeader);
        assert_eq!(classify("/replica"), Check::Replica);
        assert_eq!(classify("/read-only"), Check::ReadOnly);
        assert_eq!(classify("/health"), Check::Health);
        assert_eq!(classify("/sync"), Check::Sync);
        assert_eq!(classify("/asynchronous"), Check::Async);
        assert_eq!(classify("/read-only-sync"), Check::ReadOnlySync);
        assert_eq!(classify("/nonsense"), Check::Unknown);
    }
}
