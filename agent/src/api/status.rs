//! The JSON documents: `/patroni` (§2.5), `/cluster` (§2.6), `/history`, `/config` (§2.7).

use std::time::{Instant, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::dcs::{ClusterView, PATRONI_API_VERSION};
use crate::postgres::controldata::format_lsn;
use crate::state::{AgentStatus, PostgresStatus};

/// `GET /patroni`, with `pg` the freshest postgres status available.
pub fn patroni_json(status: &AgentStatus, pg: Option<&PostgresStatus>, now: Instant) -> Value {
    let mut o = Map::new();
    o.insert("state".into(), json!(status.state.as_str()));
    let role = match pg {
        Some(p) if !p.in_recovery => "primary",
        Some(_) => "replica",
        None => status.role.as_str(),
    };
    o.insert("role".into(), json!(role));
    if let Some(p) = pg {
        if let Some(t) = &p.postmaster_start_time {
            o.insert("postmaster_start_time".into(), json!(t));
        }
        o.insert("server_version".into(), json!(p.server_version));
        if p.in_recovery {
            o.insert(
                "xlog".into(),
                json!({
                    "received_location": p.receive_lsn.or(p.replay_lsn).unwrap_or(0),
                    "replayed_location": p.replay_lsn.unwrap_or(0),
                    "replayed_timestamp": p.replayed_timestamp,
                    "paused": p.replay_paused,
                }),
            );
            o.insert(
                "replication_state".into(),
                json!(if p.streaming {
                    "streaming"
                } else {
                    "in archive recovery"
                }),
            );
        } else {
            o.insert(
                "xlog".into(),
                json!({ "location": p.wal_flush_lsn.unwrap_or(0) }),
            );
        }
        if let Some(tl) = p.timeline {
            o.insert("timeline".into(), json!(tl));
        }
        if !p.replication.is_empty() {
            o.insert("replication".into(), json!(p.replication));
        }
    }
    let cluster = status.cluster_valid(now);
    if let Some(c) = cluster {
        if c.is_sync_listed(&status.name) && !c.is_leader(&status.name) {
            let key = if c.synchronous_mode().is_quorum() {
                "quorum_standby"
            } else {
                "sync_standby"
            };
            o.insert(key.into(), json!(true));
        }
    }
    if status.paused {
        o.insert("pause".into(), json!(true));
    }
    if cluster.is_none_or(|c| c.leader.is_none()) {
        o.insert("cluster_unlocked".into(), json!(true));
    }
    if let Some(seen) = status.dcs_last_seen {
        if let Ok(d) = seen.duration_since(UNIX_EPOCH) {
            o.insert("dcs_last_seen".into(), json!(d.as_secs()));
        }
    }
    if !status.tags.is_empty() {
        o.insert("tags".into(), Value::Object(status.tags.clone()));
    }
    if let Some(id) = status
        .database_system_identifier
        .as_ref()
        .or(pg.and_then(|p| p.system_identifier.as_ref()))
    {
        o.insert("database_system_identifier".into(), json!(id));
    }
    if status.pending_restart {
        o.insert("pending_restart".into(), json!(true));
    }
    // From our own member record as last read (one cycle behind a change): the HA loop owns
    // the schedule. Patroni leaves `postmaster_start_time` out here.
    if let Some(Value::Object(mut scheduled)) = cluster
        .and_then(|c| c.member(&status.name))
        .and_then(|m| m.record.extra.get("scheduled_restart"))
        .cloned()
    {
        scheduled.remove("postmaster_start_time");
        o.insert("scheduled_restart".into(), Value::Object(scheduled));
    }
    o.insert(
        "patroni".into(),
        json!({"version": PATRONI_API_VERSION, "scope": status.scope, "name": status.name}),
    );
    o.insert("pgwarden".into(), json!({"version": crate::VERSION}));
    Value::Object(o)
}

/// `GET /cluster`.
pub fn cluster_json(scope: &str, view: &ClusterView) -> Value {
    let optime = view.status.as_ref().map(|s| s.optime);
    let listed_role = if view.synchronous_mode().is_quorum() {
        "quorum_standby"
    } else {
        "sync_standby"
    };
    let members: Vec<Value> = view
        .members
        .iter()
        .map(|m| {
            let r = &m.record;
            let is_leader = view.is_leader(&m.name);
            let role = if is_leader {
                "leader"
            } else if view.is_sync_listed(&m.name) {
                listed_role
            } else {
                "replica"
            };
            let mut o = Map::new();
            o.insert("name".into(), json!(m.name));
            o.insert("role".into(), json!(role));
            let state = if is_leader {
                r.state.clone()
            } else {
                r.replication_state
                    .clone()
                    .unwrap_or_else(|| r.state.clone())
            };
            o.insert("state".into(), json!(state));
            o.insert("api_url".into(), json!(r.api_url));
            if let Some((host, port)) = r.host_port() {
                o.insert("host".into(), json!(host));
                o.insert("port".into(), json!(port));
            }
            if let Some(tl) = r.timeline {
                o.insert("timeline".into(), json!(tl));
            }
            if r.pending_restart == Some(true) {
                o.insert("pending_restart".into(), json!(true));
            }
            if let Some(s) = r.extra.get("scheduled_restart") {
                o.insert("scheduled_restart".into(), s.clone());
            }
            if !r.tags.is_empty() {
                o.insert("tags".into(), Value::Object(r.tags.clone()));
            }
            if !is_leader {
                let lag = |lsn: Option<u64>| match (optime, lsn) {
                    (Some(o), Some(l)) => json!(o.saturating_sub(l)),
                    _ => json!("unknown"),
                };
                let position = r.wal_position();
                o.insert("lag".into(), lag(position));
                if let Some(p) = position {
                    o.insert("lsn".into(), json!(format_lsn(p)));
                }
                if let Some(l) = r.receive_lsn {
                    o.insert("receive_lsn".into(), json!(format_lsn(l)));
                }
                o.insert("receive_lag".into(), lag(r.receive_lsn));
                if let Some(l) = r.replay_lsn {
                    o.insert("replay_lsn".into(), json!(format_lsn(l)));
                }
                o.insert("replay_lag".into(), lag(r.replay_lsn));
            }
            Value::Object(o)
        })
        .collect();
    let mut out = Map::new();
    out.insert("members".into(), Value::Array(members));
    out.insert("scope".into(), json!(scope));
    if view.is_paused() {
        out.insert("pause".into(), json!(true));
    }
    if let Some(f) = &view.failover {
        if let Some(at) = &f.value.scheduled_at {
            let mut s = Map::new();
            s.insert("at".into(), json!(at));
            if let Some(l) = &f.value.leader {
                s.insert("from".into(), json!(l));
            }
            if let Some(m) = &f.value.member {
                s.insert("to".into(), json!(m));
            }
            out.insert("scheduled_switchover".into(), Value::Object(s));
        }
    }
    Value::Object(out)
}

/// `GET /history`.
pub fn history_json(view: &ClusterView) -> Value {
    Value::Array(view.history.iter().map(|l| l.to_json()).collect())
}
