//! `pgwarden list` and `pgwarden topology`: the cluster as patronictl 4.1 prints it (a table,
//! or a tree by replication source), or as JSON.

use serde::Serialize;
use serde_json::Value;

use crate::dcs::{ClusterView, Member};
use crate::postgres::controldata::format_lsn;

/// One row of the listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub member: String,
    pub host: String,
    pub role: String,
    /// For replicas the published `replication_state` (`streaming`, `in archive recovery`)
    /// when there is one, else the member's `state`, as patronictl 4.1 shows it.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// Bytes behind `status.optime` of the WAL position (max of received and replayed);
    /// `None` for the leader or when unknown. Kept for scripts written against older output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// Received WAL: position and bytes behind `status.optime`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_lag: Option<u64>,
    /// Replayed WAL: a replica whose replay is paused falls behind here while it still
    /// receives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_lag: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pending_restart: bool,
    /// `param: old->new` per parameter, when the member publishes `pending_restart_reason`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_restart_reason: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_restart: Option<String>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub tags: serde_json::Map<String, Value>,
}

/// `synchronous_mode` of the dynamic configuration, as Patroni reads it: `(sync, quorum)`.
fn sync_modes(view: &ClusterView) -> (bool, bool) {
    let config = view.config.as_ref().map(|c| &c.value);
    let mode = config.and_then(|c| c.get("synchronous_mode"));
    let standby = config
        .and_then(|c| c.get("standby_cluster"))
        .is_some_and(|s| s.as_object().is_some_and(|o| !o.is_empty()));
    let quorum = mode.and_then(Value::as_str) == Some("quorum");
    let on = match mode {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => {
            matches!(s.to_ascii_lowercase().as_str(), "on" | "true" | "quorum")
        }
        _ => false,
    };
    (on && !standby, quorum && !standby)
}

fn is_standby_cluster(view: &ClusterView) -> bool {
    view.config
        .as_ref()
        .and_then(|c| c.value.get("standby_cluster"))
        .is_some_and(|s| s.as_object().is_some_and(|o| !o.is_empty()))
}

/// `(lsn, lag)` of one position against the leader's last known LSN, as patronictl computes it.
fn position(cluster_lsn: u64, lsn: Option<u64>) -> (Option<String>, Option<u64>) {
    match lsn {
        None | Some(0) => (None, None),
        Some(l) => (Some(format_lsn(l)), Some(cluster_lsn.saturating_sub(l))),
    }
}

fn pending_restart_reason(m: &Member) -> Vec<String> {
    let Some(Value::Object(reasons)) = m.record.extra.get("pending_restart_reason") else {
        return Vec::new();
    };
    reasons
        .iter()
        .map(|(param, v)| {
            let text = |k: &str| match v.get(k) {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            format!("{param}: {}->{}", text("old_value"), text("new_value"))
        })
        .collect()
}

fn scheduled_restart(m: &Member) -> Option<String> {
    let s = m.record.extra.get("scheduled_restart")?;
    let mut value = s.get("schedule")?.as_str()?.to_owned();
    if let Some(v) = s.get("postgres_version").and_then(Value::as_str) {
        value.push_str(&format!(" if version < {v}"));
    }
    Some(value)
}

/// Rows sorted by member name, with Patroni's role names.
pub fn rows(view: &ClusterView) -> Vec<Row> {
    let cluster_lsn = view.status.as_ref().map_or(0, |s| s.optime);
    let (sync_mode, quorum) = sync_modes(view);
    let standby_cluster = is_standby_cluster(view);
    let sync = view.sync.as_ref().map(|s| &s.value);
    let hosts: Vec<Option<(String, u16)>> =
        view.members.iter().map(|m| m.record.host_port()).collect();
    // patronictl shows the port only when it tells members apart or is not the default.
    let append_port = {
        let known: Vec<&(String, u16)> = hosts.iter().flatten().collect();
        let mut names: Vec<&str> = known.iter().map(|(h, _)| h.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        known.iter().any(|(_, p)| *p != 5432) || names.len() < known.len()
    };
    view.members
        .iter()
        .zip(hosts)
        .map(|(m, host)| {
            let is_leader = view.is_leader(&m.name);
            let role = if is_leader {
                if standby_cluster || m.record.role == "standby_leader" {
                    "Standby Leader"
                } else {
                    "Leader"
                }
            } else if sync_mode && sync.is_some_and(|s| s.lists(&m.name)) {
                if quorum {
                    "Quorum Standby"
                } else {
                    "Sync Standby"
                }
            } else {
                "Replica"
            };
            let state = match (&m.record.replication_state, role) {
                (Some(s), r) if r != "Leader" && !s.is_empty() => s.clone(),
                _ => m.record.state.clone(),
            };
            let (mut receive_lsn, mut receive_lag, mut replay_lsn, mut replay_lag) =
                (None, None, None, None);
            let (mut lsn, mut lag) = (None, None);
            if !is_leader {
                (receive_lsn, receive_lag) = position(cluster_lsn, m.record.receive_lsn);
                (replay_lsn, replay_lag) = position(cluster_lsn, m.record.replay_lsn);
                (lsn, lag) = position(cluster_lsn, m.record.wal_position());
                // A member that publishes only `xlog_location` (older agents): show it under
                // receive while it streams, else under replay, as patronictl does.
                if receive_lsn.is_none() && replay_lsn.is_none() && lsn.is_some() {
                    if state == "streaming" {
                        (receive_lsn, receive_lag) = (lsn.clone(), lag);
                    } else {
                        (replay_lsn, replay_lag) = (lsn.clone(), lag);
                    }
                }
            }
            Row {
                member: m.name.clone(),
                host: match host {
                    Some((h, p)) if append_port => format!("{h}:{p}"),
                    Some((h, _)) => h,
                    None => String::new(),
                },
                role: role.to_owned(),
                state,
                timeline: m.record.timeline,
                lag,
                lsn,
                receive_lsn,
                receive_lag,
                replay_lsn,
                replay_lag,
                pending_restart: m.record.pending_restart.unwrap_or(false),
                pending_restart_reason: pending_restart_reason(m),
                scheduled_restart: scheduled_restart(m),
                tags: m.record.tags.clone(),
            }
        })
        .collect()
}

/// Leader first, then each member under the one it replicates from (`replicatefrom` when that
/// names another replica, else the leader), names indented as patronictl's `topology` does.
pub fn topology_order(rows: Vec<Row>) -> Vec<Row> {
    let is_leader = |r: &Row| r.role.ends_with("Leader");
    let leader = rows.iter().find(|r| is_leader(r)).map(|r| r.member.clone());
    let replicas: Vec<String> = rows
        .iter()
        .filter(|r| !is_leader(r))
        .map(|r| r.member.clone())
        .collect();
    let parent_of = |r: &Row| -> Option<String> {
        match r.tags.get("replicatefrom").and_then(Value::as_str) {
            Some(p) if p != r.member && replicas.iter().any(|n| n == p) => Some(p.to_owned()),
            _ => leader.clone(),
        }
    };
    let mut out = Vec::new();
    fn walk(
        level: usize,
        parent: Option<&str>,
        rows: &[Row],
        parent_of: &dyn Fn(&Row) -> Option<String>,
        is_leader: &dyn Fn(&Row) -> bool,
        out: &mut Vec<Row>,
    ) {
        for r in rows
            .iter()
            .filter(|r| !is_leader(r) && parent_of(r).as_deref() == parent)
        {
            let mut shown = r.clone();
            shown.member = format!("{}+ {}", " ".repeat(level * 2), r.member);
            out.push(shown);
            // A cycle of `replicatefrom` tags is left out, as in patronictl.
            if level < rows.len() {
                walk(level + 1, Some(&r.member), rows, parent_of, is_leader, out);
            }
        }
    }
    if let Some(l) = rows.iter().find(|r| is_leader(r)) {
        out.push(l.clone());
    }
    walk(
        0,
        leader.as_deref(),
        &rows,
        &parent_of,
        &is_leader,
        &mut out,
    );
    out
}

/// A text table in prettytable's layout: the title inside the top rule, centred headers,
/// multi-line cells (with a rule between all rows then).
pub fn render_grid(
    title: &str,
    headers: &[String],
    cells: &[Vec<String>],
    right: &[bool],
) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in cells {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            for line in c.split('\n') {
                *w = (*w).max(line.chars().count());
            }
        }
    }
    let rule = |title: Option<&str>| {
        let mut line = String::from("+");
        for w in &widths {
            line.push_str(&"-".repeat(w + 2));
            line.push('+');
        }
        if let Some(t) = title.filter(|t| !t.is_empty()) {
            let label = format!(" {t} ");
            if label.len() + 1 < line.len() {
                line.replace_range(1..1 + label.len(), &label);
            } else {
                line = format!("+{label}+");
            }
        }
        line
    };
    let row_lines = |values: &[String], header: bool| {
        let split: Vec<Vec<&str>> = values.iter().map(|v| v.split('\n').collect()).collect();
        let height = split.iter().map(Vec::len).max().unwrap_or(1);
        let mut out = String::new();
        for i in 0..height {
            let mut line = String::from("|");
            for (col, w) in widths.iter().enumerate() {
                let v = split.get(col).and_then(|l| l.get(i)).copied().unwrap_or("");
                let pad = w.saturating_sub(v.chars().count());
                if header {
                    let left = pad / 2;
                    line.push_str(&format!(
                        " {}{v}{} |",
                        " ".repeat(left),
                        " ".repeat(pad - left)
                    ));
                } else if right.get(col).copied().unwrap_or(false) {
                    line.push_str(&format!(" {}{v} |", " ".repeat(pad)));
                } else {
                    line.push_str(&format!(" {v}{} |", " ".repeat(pad)));
                }
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    };
    let multi_line = cells.iter().any(|r| r.iter().any(|c| c.contains('\n')));
    let mut out = String::new();
    out.push_str(&rule(Some(title)));
    out.push('\n');
    out.push_str(&row_lines(headers, true));
    out.push_str(&rule(None));
    out.push('\n');
    for (i, row) in cells.iter().enumerate() {
        out.push_str(&row_lines(row, false));
        if multi_line && i + 1 < cells.len() {
            out.push_str(&rule(None));
            out.push('\n');
        }
    }
    out.push_str(&rule(None));
    out.push('\n');
    out
}

fn lag_mb(lag: Option<u64>) -> String {
    lag.map(|l| format!("{}", (l as f64 / (1024.0 * 1024.0)).round() as u64))
        .unwrap_or_default()
}

/// Renders the table (or the tree with `topology`) with a title line naming the cluster, and
/// the maintenance and scheduled switchover notes below it. `extended` shows the pending and
/// scheduled restart and tag columns even when no member has a value for them.
pub fn render_table(scope: &str, view: &ClusterView, topology: bool, extended: bool) -> String {
    let mut rows = rows(view);
    if topology {
        rows = topology_order(rows);
    }
    let mut headers: Vec<String> = [
        "Member",
        "Host",
        "Role",
        "State",
        "TL",
        "Receive LSN",
        "Lag",
        "Replay LSN",
        "Lag",
    ]
    .iter()
    .map(|h| (*h).to_owned())
    .collect();
    let mut right = vec![false, false, false, false, true, true, true, true, true];
    let pending = extended || rows.iter().any(|r| r.pending_restart);
    let reasons = extended || rows.iter().any(|r| !r.pending_restart_reason.is_empty());
    let scheduled = extended || rows.iter().any(|r| r.scheduled_restart.is_some());
    let tags = extended || rows.iter().any(|r| !r.tags.is_empty());
    for (shown, name) in [
        (pending, "Pending restart"),
        (reasons, "Pending restart reason"),
        (scheduled, "Scheduled restart"),
        (tags, "Tags"),
    ] {
        if shown {
            headers.push(name.to_owned());
            right.push(false);
        }
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.member.clone(),
                r.host.clone(),
                r.role.clone(),
                r.state.clone(),
                r.timeline.map(|t| t.to_string()).unwrap_or_default(),
                r.receive_lsn.clone().unwrap_or_default(),
                lag_mb(r.receive_lag),
                r.replay_lsn.clone().unwrap_or_default(),
                lag_mb(r.replay_lag),
            ];
            if pending {
                row.push(if r.pending_restart { "*" } else { "" }.to_owned());
            }
            if reasons {
                row.push(
                    r.pending_restart_reason
                        .iter()
                        .map(|d| {
                            if d.len() > 50 {
                                let param = d.split(':').next().unwrap_or(d);
                                format!("{param}: [hidden - too long]")
                            } else {
                                d.clone()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
            if scheduled {
                row.push(r.scheduled_restart.clone().unwrap_or_default());
            }
            if tags {
                row.push(if r.tags.is_empty() {
                    String::new()
                } else {
                    serde_yaml::to_string(&r.tags)
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                });
            }
            row
        })
        .collect();
    let initialize = match view.initialize_value() {
        None => "uninitialized",
        Some("") => "initializing",
        Some(sysid) => sysid,
    };
    let mut out = render_grid(
        &format!("Cluster: {scope} ({initialize})"),
        &headers,
        &cells,
        &right,
    );
    if view.is_paused() {
        out.push_str(" Maintenance mode: on\n");
    }
    if let Some(f) = view.failover.as_ref().map(|f| &f.value) {
        if let Some(at) = &f.scheduled_at {
            out.push_str(&format!(" Switchover scheduled at: {at}\n"));
            if let Some(from) = &f.leader {
                out.push_str(&format!("{:>24}: {from}\n", "from"));
            }
            if let Some(to) = &f.member {
                out.push_str(&format!("{:>24}: {to}\n", "to"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::{LeaderKey, LeaderStatus, MemberRecord, Versioned};

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

    fn view(members: Vec<Member>, optime: u64) -> ClusterView {
        ClusterView {
            initialize: Some(Versioned {
                value: "7310000000000000001".into(),
                revision: 1,
            }),
            leader: Some(LeaderKey {
                name: "pg0".into(),
                revision: 1,
                lease: 1,
            }),
            members,
            status: Some(LeaderStatus {
                optime,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const MB: u64 = 1024 * 1024;

    #[test]
    fn leader_and_replicas_with_receive_and_replay_lag() {
        let mut streaming = member("pg1", 5433, 0, "running");
        streaming.record.replication_state = Some("streaming".into());
        streaming.record.receive_lsn = Some(10 * MB);
        streaming.record.replay_lsn = Some(10 * MB);
        // Replay paused: it still receives, but replays nothing.
        let mut paused = member("pg2", 5434, 0, "running");
        paused.record.replication_state = Some("streaming".into());
        paused.record.receive_lsn = Some(10 * MB);
        paused.record.replay_lsn = Some(3 * MB);
        paused.record.pending_restart = Some(true);
        let v = view(
            vec![member("pg0", 5432, 10 * MB, "running"), streaming, paused],
            10 * MB,
        );
        let table = render_table("batman", &v, false, false);
        assert!(
            table.starts_with("+ Cluster: batman (7310000000000000001) "),
            "{table}"
        );
        let line = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(&format!("| {name} ")))
                .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(
            line("pg0")[1..11],
            [
                "pg0",
                "127.0.0.1:5432",
                "Leader",
                "running",
                "2",
                "",
                "",
                "",
                "",
                ""
            ]
        );
        assert_eq!(
            line("pg1")[1..11],
            [
                "pg1",
                "127.0.0.1:5433",
                "Replica",
                "streaming",
                "2",
                "0/A00000",
                "0",
                "0/A00000",
                "0",
                ""
            ]
        );
        assert_eq!(
            line("pg2")[1..11],
            [
                "pg2",
                "127.0.0.1:5434",
                "Replica",
                "streaming",
                "2",
                "0/A00000",
                "0",
                "0/300000",
                "7",
                "*"
            ]
        );
        assert!(table.contains("| Pending restart |"), "{table}");
    }

    #[test]
    fn older_members_without_receive_and_replay_positions() {
        let mut archive = member("pg1", 5432, 2 * MB, "running");
        archive.record.conn_url = "postgres://10.0.0.2:5432/postgres".into();
        archive.record.replication_state = Some("in archive recovery".into());
        let mut leader = member("pg0", 5432, 4 * MB, "running");
        leader.record.conn_url = "postgres://10.0.0.1:5432/postgres".into();
        let rows = rows(&view(vec![leader, archive], 4 * MB));
        assert_eq!(rows[0].host, "10.0.0.1");
        assert_eq!(rows[1].state, "in archive recovery");
        assert_eq!(rows[1].receive_lsn, None);
        assert_eq!(rows[1].replay_lsn.as_deref(), Some("0/200000"));
        assert_eq!(rows[1].replay_lag, Some(2 * MB));
    }

    #[test]
    fn topology_nests_cascading_replicas() {
        let mut cascade = member("pg2", 5434, MB, "running");
        cascade
            .record
            .tags
            .insert("replicatefrom".into(), Value::String("pg1".into()));
        let mut other = member("pg3", 5435, MB, "running");
        other
            .record
            .tags
            .insert("replicatefrom".into(), Value::String("nobody".into()));
        let v = view(
            vec![
                member("pg0", 5432, MB, "running"),
                member("pg1", 5433, MB, "running"),
                cascade,
                other,
            ],
            MB,
        );
        let names: Vec<String> = topology_order(rows(&v))
            .into_iter()
            .map(|r| r.member)
            .collect();
        assert_eq!(names, ["pg0", "+ pg1", "  + pg2", "+ pg3"]);
        let table = render_table("batman", &v, true, false);
        assert!(table.contains("|   + pg2 | "), "{table}");
        assert!(table.contains(" Tags "), "{table}");
        assert!(table.contains("replicatefrom: pg1"), "{table}");
    }
}
