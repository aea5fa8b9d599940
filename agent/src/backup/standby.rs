//! Backups from a standby (`pgbackrest.backup_standby`), pure parts: what each member publishes
//! so the leader can reach its data directory, and which replica the leader backs up from.
//!
//! pgBackRest's `backup-standby=y` runs on the primary's host (it starts and stops the backup
//! there and copies `pg_control` and the WAL from there) but reads the data files from a
//! standby it reaches as `pg2-host`. pgwarden uses pgBackRest's TLS server for that: every
//! member runs `pgbackrest server` (see [`super::server`]) and publishes where it listens and
//! where its postgres lives in its member record, under [`MEMBER_KEY`] (an extra field; Patroni's
//! readers ignore unknown keys, `patroni-compat.md` §1.5). Before each backup the leader picks
//! one replica with [`choose`] and writes a separate config file naming it.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::dcs::{ClusterView, MemberRecord};

/// The member record field holding this member's [`Endpoint`].
pub const MEMBER_KEY: &str = "pgbackrest";

/// How the leader's backup reaches a member: its pgBackRest TLS server and its postgres (the
/// `pg2-*` options, all needed on the leader's side because the remote only gets what the
/// client sends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub tls_host: String,
    pub tls_port: u16,
    pub pg_path: PathBuf,
    pub pg_port: u16,
    pub pg_socket_path: String,
    pub pg_user: String,
}

/// This member's endpoint, when it runs a TLS server.
pub fn own_endpoint(config: &Config) -> Option<Endpoint> {
    let tls = config.pgbackrest.as_ref()?.tls_server.as_ref()?;
    let (_, port) = crate::postgres::conf::split_listen(&config.postgresql.listen);
    Some(Endpoint {
        tls_host: tls.host()?,
        tls_port: tls.port,
        pg_path: config.postgresql.data_dir.clone(),
        pg_port: port.unwrap_or(5432),
        pg_socket_path: super::render::socket_dir(config),
        pg_user: config.postgresql.authentication.superuser.username.clone(),
    })
}

/// The extra member record fields of this member (empty without a TLS server).
pub fn member_fields(config: &Config) -> serde_json::Map<String, serde_json::Value> {
    let mut fields = serde_json::Map::new();
    if let Some(value) = own_endpoint(config).and_then(|e| serde_json::to_value(e).ok()) {
        fields.insert(MEMBER_KEY.to_owned(), value);
    }
    fields
}

/// The endpoint another member published; `None` when it has none or it does not parse (an
/// older agent, a Patroni member).
pub fn endpoint_of(record: &MemberRecord) -> Option<Endpoint> {
    serde_json::from_value(record.extra.get(MEMBER_KEY)?.clone()).ok()
}

/// The replica a backup reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub name: String,
    pub endpoint: Endpoint,
    /// Bytes behind the leader's published WAL position, when both are known.
    pub lag: Option<u64>,
}

/// Why a member cannot serve a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not a replica (the leader itself, a standby leader, or no role yet).
    NotReplica,
    /// Postgres is not running, or not streaming from the primary (archive recovery,
    /// starting): its files may be far behind, and pgBackRest would wait for its replay.
    NotStreaming,
    /// Tagged `nofailover`: such members are often delayed or remote on purpose.
    NoFailover,
    /// Publishes no pgBackRest TLS server (`pgbackrest.tls_server` unset, or an older agent).
    NoTlsServer,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::NotReplica => "not a replica",
            Rejection::NotStreaming => "not streaming",
            Rejection::NoFailover => "tagged nofailover",
            Rejection::NoTlsServer => "no pgBackRest TLS server published",
        })
    }
}

/// No replica can serve the backup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoStandby {
    /// The agent has not read the cluster from the DCS yet.
    #[error("the cluster view is not known yet")]
    NoView,
    /// Every other member was rejected (the list may be empty: no other member).
    #[error("no replica can serve a backup from a standby{}", list(.rejected))]
    NoneUsable { rejected: Vec<(String, Rejection)> },
}

fn list(rejected: &[(String, Rejection)]) -> String {
    if rejected.is_empty() {
        return " (there is no other member)".into();
    }
    let items: Vec<String> = rejected.iter().map(|(n, r)| format!("{n}: {r}")).collect();
    format!(" ({})", items.join(", "))
}

fn check(record: &MemberRecord) -> Result<Endpoint, Rejection> {
    if record.role != "replica" {
        return Err(Rejection::NotReplica);
    }
    // Patroni ≥ 3.0 writes `state: streaming` for a streaming replica; we write `running` with
    // `replication_state: streaming`. Accept both.
    let running = matches!(record.state.as_str(), "running" | "streaming");
    if !running || record.replication_state.as_deref() != Some("streaming") {
        return Err(Rejection::NotStreaming);
    }
    if record.tag_bool("nofailover") {
        return Err(Rejection::NoFailover);
    }
    endpoint_of(record).ok_or(Rejection::NoTlsServer)
}

/// Picks the replica to back up from: a streaming replica, not tagged `nofailover`, that
/// publishes a TLS server, with the lowest lag behind `leader`'s published position; ties
/// (and unknown lags, which sort last) go to the smallest name, so every member would pick
/// the same one from the same view.
pub fn choose(view: Option<&ClusterView>, leader: &str) -> Result<Chosen, NoStandby> {
    let view = view.ok_or(NoStandby::NoView)?;
    let leader_wal = view
        .member(leader)
        .and_then(|m| m.record.xlog_location)
        .or_else(|| view.status.as_ref().map(|s| s.optime));
    let mut rejected = Vec::new();
    let mut usable = Vec::new();
    for m in view.members.iter().filter(|m| m.name != leader) {
        match check(&m.record) {
            Ok(endpoint) => {
                let lag = match (leader_wal, m.record.wal_position()) {
                    (Some(l), Some(p)) => Some(l.saturating_sub(p)),
                    _ => None,
                };
                usable.push(Chosen {
                    name: m.name.clone(),
                    endpoint,
                    lag,
                });
            }
            Err(r) => rejected.push((m.name.clone(), r)),
        }
    }
    rejected.sort_by(|a, b| a.0.cmp(&b.0));
    usable
        .into_iter()
        .min_by(|a, b| {
            (a.lag.unwrap_or(u64::MAX), &a.name).cmp(&(b.lag.unwrap_or(u64::MAX), &b.name))
        })
        .ok_or(NoStandby::NoneUsable { rejected })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::Member;

    fn endpoint(port: u16) -> serde_json::Value {
        serde_json::json!({"tls_host": "localhost", "tls_port": port, "pg_path": "/pg/data",
                           "pg_port": 5432, "pg_socket_path": "/run/pg", "pg_user": "postgres"})
    }

    fn member(name: &str, role: &str, wal: u64, tls: Option<u16>) -> Member {
        let mut record = MemberRecord {
            role: role.into(),
            state: "running".into(),
            xlog_location: Some(wal),
            replication_state: (role == "replica").then(|| "streaming".into()),
            ..Default::default()
        };
        if let Some(port) = tls {
            record.extra.insert(MEMBER_KEY.into(), endpoint(port));
        }
        Member {
            name: name.into(),
            record,
            revision: 1,
            lease: 1,
        }
    }

    fn view(members: Vec<Member>) -> ClusterView {
        ClusterView {
            members,
            ..Default::default()
        }
    }

    #[test]
    fn the_streaming_replica_with_the_lowest_lag_is_chosen_and_ties_go_to_the_smallest_name() {
        let v = view(vec![
            member("pg0", "primary", 1000, Some(1)),
            member("pg3", "replica", 900, Some(4)),
            member("pg2", "replica", 990, Some(3)),
            member("pg1", "replica", 990, Some(2)),
        ]);
        let c = choose(Some(&v), "pg0").expect("a standby");
        assert_eq!((c.name.as_str(), c.lag), ("pg1", Some(10)));
        assert_eq!(c.endpoint.tls_port, 2);
    }

    #[test]
    fn replicas_that_do_not_stream_are_nofailover_or_publish_no_server_are_rejected_with_reasons() {
        let mut archive = member("pg1", "replica", 1000, Some(2));
        archive.record.replication_state = Some("in archive recovery".into());
        let mut nofailover = member("pg2", "replica", 1000, Some(3));
        nofailover
            .record
            .tags
            .insert("nofailover".into(), serde_json::Value::Bool(true));
        let patroni = member("pg3", "replica", 1000, None);
        let mut stopped = member("pg4", "replica", 1000, Some(5));
        stopped.record.state = "stopped".into();
        let v = view(vec![
            member("pg0", "primary", 1000, Some(1)),
            archive,
            nofailover,
            patroni,
            stopped,
        ]);
        let e = choose(Some(&v), "pg0").expect_err("none usable");
        assert_eq!(
            e,
            NoStandby::NoneUsable {
                rejected: vec![
                    ("pg1".into(), Rejection::NotStreaming),
                    ("pg2".into(), Rejection::NoFailover),
                    ("pg3".into(), Rejection::NoTlsServer),
                    ("pg4".into(), Rejection::NotStreaming),
                ]
            }
        );
        assert!(e.to_string().contains("pg2: tagged nofailover"), "{e}");
        assert_eq!(choose(None, "pg0"), Err(NoStandby::NoView));
        let alone = choose(
            Some(&view(vec![member("pg0", "primary", 1, Some(1))])),
            "pg0",
        );
        assert!(
            alone
                .expect_err("alone")
                .to_string()
                .contains("no other member"),
            "single member"
        );
    }

    #[test]
    fn a_member_publishes_its_endpoint_only_with_a_tls_server_and_it_reads_back() {
        let mut c: Config = serde_yaml::from_str(
            "scope: s\npostgresql:\n  listen: 127.0.0.1:5433\n  data_dir: /pg/data\n  \
             authentication: {superuser: {username: postgres}, replication: {username: r}}\n\
             pgbackrest:\n  repos: [{path: /repo}]\n",
        )
        .expect("yaml");
        assert!(member_fields(&c).is_empty());
        if let Some(pb) = c.pgbackrest.as_mut() {
            pb.tls_server =
                Some(serde_yaml::from_str("{address: db1.example, port: 8555}").expect("yaml"));
        }
        let record = MemberRecord {
            extra: member_fields(&c),
            ..Default::default()
        };
        // Through the DCS encoding, as another member reads it.
        let parsed = MemberRecord::parse(&record.encode()).expect("parses");
        let e = endpoint_of(&parsed).expect("endpoint");
        assert_eq!(
            (e.tls_host.as_str(), e.tls_port, e.pg_port),
            ("db1.example", 8555, 5433)
        );
        assert_eq!(e.pg_path, PathBuf::from("/pg/data"));
    }
}
