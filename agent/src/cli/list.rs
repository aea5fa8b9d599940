//! `pgwarden list`: the cluster as a table, like `patronictl list`, or as JSON.

use serde::Serialize;

use crate::dcs::ClusterView;
use crate::postgres::controldata::format_lsn;

/// One row of the listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub member: String,
    pub host: String,
    pub role: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Bytes behind `status.optime`; `None` for the leader or when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub tags: serde_json::Map<String, serde_json::Value>,
}

/// Rows sorted by member name, with Patroni's role names.
pub fn rows(view: &ClusterView) -> Vec<Row> {
    let optime = view.status.as_ref().map(|s| s.optime);
    let sync = view.sync.as_ref().map(|s| &s.value);
    view.members
        .iter()
        .map(|m| {
            let is_leader = view.is_leader(&m.name);
            let role = if is_leader {
                if m.record.role == "standby_leader" {
                    "Standby Leader"
                } else {
                    "Leader"
                }
            } else if sync.is_some_and(|s| s.lists(&m.name)) {
                "Sync Standby"
            } else {
                "Replica"
            };
            let state = if is_leader {
                m.record.state.clone()
            } else {
                m.record
                    .replication_state
                    .clone()
                    .unwrap_or_else(|| m.record.state.clone())
            };
            let position = m.record.wal_position();
            Row {
                member: m.name.clone(),
                host: m
                    .record
                    .host_port()
                    .map(|(h, p)| format!("{h}:{p}"))
                    .unwrap_or_default(),
                role: role.to_owned(),
                state,
                timeline: m.record.timeline,
                lag: if is_leader {
                    None
                } else {
                    match (optime, position) {
                        (Some(o), Some(p)) => Some(o.saturating_sub(p)),
                        _ => None,
                    }
                },
                lsn: position.map(format_lsn),
                tags: m.record.tags.clone(),
            }
        })
        .collect()
}

/// Renders the table with a title line naming the cluster.
pub fn render_table(scope: &str, view: &ClusterView) -> String {
    let rows = rows(view);
    let headers = ["Member", "Host", "Role", "State", "TL", "Lag in MB"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.member.clone(),
                r.host.clone(),
                r.role.clone(),
                r.state.clone(),
                r.timeline.map(|t| t.to_string()).unwrap_or_default(),
                match (&r.lag, r.role.as_str()) {
                    (_, "Leader" | "Standby Leader") => String::new(),
                    (Some(lag), _) => format!("{}", lag / (1024 * 1024)),
                    (None, _) => "unknown".to_owned(),
                },
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let rule = |title: Option<&str>| {
        let mut line = String::from("+");
        for w in &widths {
            line.push_str(&"-".repeat(w + 2));
            line.push('+');
        }
        if let Some(t) = title {
            let label = format!(" {t} ");
            if label.len() + 1 < line.len() {
                line.replace_range(1..1 + label.len(), &label);
            }
        }
        line
    };
    let row_line = |values: &[String]| {
        let mut line = String::from("|");
        for (i, (w, v)) in widths.iter().zip(values.iter()).enumerate() {
            // Numbers right-aligned, as patronictl does.
            if i >= 4 {
                line.push_str(&format!(" {v:>w$} |"));
            } else {
                line.push_str(&format!(" {v:<w$} |"));
            }
        }
        line
    };
    let sysid = view
        .initialize
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    let mut out = String::new();
    out.push_str(&rule(Some(&format!("Cluster: {scope}{sysid}"))));
    out.push('\n');
    out.push_str(&row_line(
        &headers.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    ));
    out.push('\n');
    out.push_str(&rule(None));
    out.push('\n');
    for row in &cells {
        out.push_str(&row_line(row));
        out.push('\n');
    }
    out.push_str(&rule(None));
    out.push('\n');
    if view.is_paused() {
        out.push_str(" Maintenance mode: on\n");
    }
    if let Some(at) = view
        .failover
        .as_ref()
        .and_then(|f| f.value.scheduled_at.as_ref())
    {
        out.push_str(&format!(" Switchover scheduled at: {at}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::{LeaderKey, LeaderStatus, Member, MemberRecord};

    fn member(name: &str, port: u16, xlog: u64, state: &str) -> Member {
        Member {
            name: name.into(),
            record: MemberRecord {
                conn_url: format!("postgres://127.0.0.1:{port}/postgres"),
                api_url: String::new(),
                state: state.into(),
                role: "replica".into(),
                version: "4.1.4".into(),
                xlog_location: Some(xlog),
                timeline: Some(2),
                ..Default::default()
            },
            revision: 1,
            lease: 1,
        }
    }

    #[test]
    fn leader_and_replicas_with_lag_in_megabytes() {
        let mut replica = member("pg1", 5433, 1, "running");
        replica.record.replication_state = Some("streaming".into());
        let view = ClusterView {
            initialize: Some("7310000000000000001".into()),
            leader: Some(LeaderKey {
                name: "pg0".into(),
                revision: 1,
                lease: 1,
            }),
            members: vec![member("pg0", 5432, 3 * 1024 * 1024 + 1, "running"), replica],
            status: Some(LeaderStatus {
                optime: 3 * 1024 * 1024 + 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = render_table("batman", &view);
        assert!(table.starts_with("+ Cluster: batman (7310000000000000001) "));
        assert!(
            table.contains("| pg0    | 127.0.0.1:5432 | Leader  | running   |  2 |           |")
        );
        assert!(
            table.contains("| pg1    | 127.0.0.1:5433 | Replica | streaming |  2 |         3 |")
        );
    }
}
