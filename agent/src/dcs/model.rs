//! The cluster as the DCS holds it, in Patroni's wire format.
//!
//! Values are read tolerantly, as Patroni reads them (`patroni-compat.md` §1.7): an unparsable
//! `status`, `failover`, `sync` or `history` value counts as empty rather than as an error, and any
//! JSON spacing is accepted. Values are written compactly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The Patroni API level we emulate; readers parse this as integers (`patroni-compat.md` §7.3).
pub const PATRONI_API_VERSION: &str = "4.1.4";

/// A value read from the DCS together with the revision needed for a compare-and-set write.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    /// etcd `mod_revision` (or the Kubernetes `resourceVersion` mapped to an integer).
    pub revision: i64,
}

/// Holder of the `leader` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    /// Member name of the holder (the key's plain-string value).
    pub name: String,
    /// `mod_revision` of the key; used to notice a re-acquisition.
    pub revision: i64,
    /// Lease the key is attached to (0 when unknown).
    pub lease: i64,
}

/// Content of `status`: the leader's last published WAL position and slot positions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStatus {
    pub optime: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub slots: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retain_slots: Vec<String>,
}

impl LeaderStatus {
    /// Parses `status`, which may also be a bare integer (legacy optime). Unparsable ⇒ `None`.
    pub fn parse(raw: &str) -> Option<Self> {
        let value: serde_json::Value = serde_json::from_str(raw.trim()).ok()?;
        match value {
            serde_json::Value::Number(n) => n.as_u64().map(|optime| LeaderStatus {
                optime,
                ..Default::default()
            }),
            other => serde_json::from_value(other).ok(),
        }
    }
}

/// Content of `failover`: a requested switchover (`leader` set) or failover (`member` only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The candidate. Patroni stores it as `member`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<String>,
}

impl FailoverRequest {
    /// Parses `failover`; also the legacy `leader:candidate` string. Empty or unparsable ⇒ `None`.
    pub fn parse(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        let parsed = match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(serde_json::Value::Object(map)) => {
                let text = |k: &str| {
                    map.get(k)
                        .and_then(|v| v.as_str())
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                };
                FailoverRequest {
                    leader: text("leader"),
                    member: text("member"),
                    scheduled_at: text("scheduled_at"),
                }
            }
            Ok(_) => return None,
            Err(_) => {
                let (leader, member) = raw.split_once(':')?;
                FailoverRequest {
                    leader: Some(leader.to_owned()).filter(|s| !s.is_empty()),
                    member: Some(member.to_owned()).filter(|s| !s.is_empty()),
                    scheduled_at: None,
                }
            }
        };
        (parsed.leader.is_some() || parsed.member.is_some()).then_some(parsed)
    }
}

/// Content of `sync`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub leader: Option<String>,
    /// Comma-joined, sorted names, or null.
    pub sync_standby: Option<String>,
    #[serde(default)]
    pub quorum: u32,
}

impl SyncState {
    /// Parses `sync`; empty when `leader` is missing (`patroni-compat.md` §1.7).
    pub fn parse(raw: &str) -> Option<Self> {
        let parsed: SyncState = serde_json::from_str(raw.trim()).ok()?;
        parsed.leader.is_some().then_some(parsed)
    }

    /// Names listed as synchronous standbys.
    pub fn standbys(&self) -> Vec<String> {
        self.sync_standby
            .as_deref()
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Case-insensitive membership test, as Patroni HEAD does.
    pub fn lists(&self, name: &str) -> bool {
        self.standbys().iter().any(|s| s.eq_ignore_ascii_case(name))
    }

    /// Whether `leader` is `name` (case-insensitive, as postgres compares standby names).
    pub fn leader_is(&self, name: &str) -> bool {
        self.leader
            .as_deref()
            .is_some_and(|l| l.eq_ignore_ascii_case(name))
    }

    /// Listed, or the leader: Patroni's `matches(name, check_leader=True)`, the members that
    /// may race in synchronous mode and that vote with quorum commit.
    pub fn names(&self, name: &str) -> bool {
        self.leader_is(name) || self.lists(name)
    }
}

/// One line of `history`: `[timeline, lsn, reason, timestamp, new_leader]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryLine {
    pub timeline: u32,
    pub lsn: u64,
    pub reason: String,
    pub timestamp: Option<String>,
    pub new_leader: Option<String>,
}

impl HistoryLine {
    pub fn to_json(&self) -> serde_json::Value {
        let mut line = vec![
            serde_json::json!(self.timeline),
            serde_json::json!(self.lsn),
            serde_json::json!(self.reason),
        ];
        if let Some(ts) = &self.timestamp {
            line.push(serde_json::json!(ts));
            if let Some(leader) = &self.new_leader {
                line.push(serde_json::json!(leader));
            }
        }
        serde_json::Value::Array(line)
    }

    /// Parses the whole `history` value; lines that do not parse are skipped.
    pub fn parse_all(raw: &str) -> Vec<HistoryLine> {
        let Ok(serde_json::Value::Array(lines)) = serde_json::from_str(raw.trim()) else {
            return Vec::new();
        };
        lines
            .iter()
            .filter_map(|line| {
                let items = line.as_array()?;
                Some(HistoryLine {
                    timeline: u32::try_from(items.first()?.as_u64()?).ok()?,
                    lsn: items.get(1)?.as_u64()?,
                    reason: items
                        .get(2)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    timestamp: items.get(3).and_then(|v| v.as_str()).map(str::to_owned),
                    new_leader: items.get(4).and_then(|v| v.as_str()).map(str::to_owned),
                })
            })
            .collect()
    }

    pub fn encode_all(lines: &[HistoryLine]) -> String {
        serde_json::Value::Array(lines.iter().map(HistoryLine::to_json).collect()).to_string()
    }
}

pub use pgwarden_api::MemberRecord;

/// A member as listed in the cluster view.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub record: MemberRecord,
    pub revision: i64,
    pub lease: i64,
}

/// The whole cluster as read from the DCS at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    /// `None`: no `initialize` key. `""`: a node is bootstrapping. Otherwise the sysid. The
    /// revision tells one bootstrap claim from the next, which may hold the same `""`.
    pub initialize: Option<Versioned<String>>,
    /// Raw dynamic configuration JSON; `None` when the key is absent or empty.
    pub config: Option<Versioned<serde_json::Value>>,
    pub leader: Option<LeaderKey>,
    pub members: Vec<Member>,
    pub status: Option<LeaderStatus>,
    pub failover: Option<Versioned<FailoverRequest>>,
    pub sync: Option<Versioned<SyncState>>,
    pub history: Vec<HistoryLine>,
    /// `failsafe`: the members (name → REST API URL) the leader last published while
    /// `failsafe_mode` is on; `None` when the key is absent or not such an object.
    pub failsafe: Option<BTreeMap<String, String>>,
    /// The store revision this view was read at.
    pub revision: i64,
}

/// Parses the `failsafe` key: a JSON object of member names to API URLs. Anything else is
/// no topology at all (Patroni discards a `failsafe` key that is not such an object).
pub fn parse_failsafe(raw: &str) -> Option<BTreeMap<String, String>> {
    serde_json::from_str(raw).ok()
}

impl ClusterView {
    /// The value of `initialize`, if the key exists.
    pub fn initialize_value(&self) -> Option<&str> {
        self.initialize.as_ref().map(|i| i.value.as_str())
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn leader_name(&self) -> Option<&str> {
        self.leader.as_ref().map(|l| l.name.as_str())
    }

    pub fn is_leader(&self, name: &str) -> bool {
        self.leader_name() == Some(name)
    }

    /// `name` as the member spells it (postgres compares standby names case-insensitively);
    /// as given when no member has it.
    pub fn member_spelling(&self, name: &str) -> String {
        self.members
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
            .map_or_else(|| name.to_owned(), |m| m.name.clone())
    }

    /// `config.synchronous_mode` (off when absent or unreadable).
    pub fn synchronous_mode(&self) -> crate::config::SynchronousMode {
        crate::config::SynchronousMode::of_config(
            self.config
                .as_ref()
                .and_then(|c| c.value.get("synchronous_mode")),
        )
    }

    /// `name` is a synchronous standby, or with quorum commit a quorum standby: synchronous
    /// mode is on and the `sync` key of the current leader lists it (Patroni's
    /// `is_sync_standby`).
    pub fn is_sync_listed(&self, name: &str) -> bool {
        self.synchronous_mode().is_on()
            && self.sync.as_ref().is_some_and(|s| {
                s.value.lists(name) && self.leader_name().is_some_and(|l| s.value.leader_is(l))
            })
    }

    /// `config.pause` (Patroni accepts any truthy JSON here).
    pub fn is_paused(&self) -> bool {
        self.config
            .as_ref()
            .and_then(|c| c.value.get("pause"))
            .map(|p| crate::config::flex::parse_bool(p).unwrap_or(false))
            .unwrap_or(false)
    }

    /// Cluster timeline: last history line + 1; `[]` ⇒ 1 (`patroni-compat.md` §1.7).
    pub fn timeline(&self) -> u32 {
        self.history.last().map(|l| l.timeline + 1).unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_accepts_bare_integer_and_object() {
        assert_eq!(LeaderStatus::parse("123").map(|s| s.optime), Some(123));
        let s = LeaderStatus::parse(r#"{"optime": 5, "slots": {"a": 3}}"#);
        assert_eq!(s.map(|s| (s.optime, s.slots.len())), Some((5, 1)));
        assert_eq!(LeaderStatus::parse("garbage"), None);
    }

    #[test]
    fn failover_empty_object_means_none_and_legacy_string_parses() {
        assert_eq!(FailoverRequest::parse("{}"), None);
        assert_eq!(FailoverRequest::parse(""), None);
        let legacy = FailoverRequest::parse("a:b");
        assert_eq!(
            legacy.map(|f| (f.leader, f.member)),
            Some((Some("a".into()), Some("b".into())))
        );
        let spaced = FailoverRequest::parse(r#"{"leader": "a", "member": null}"#);
        assert_eq!(
            spaced.map(|f| (f.leader, f.member)),
            Some((Some("a".into()), None))
        );
    }

    #[test]
    fn member_record_round_trips_unknown_fields_and_parses_host() {
        let raw = r#"{"conn_url":"postgres://10.0.0.1:5433/postgres","api_url":"http://10.0.0.1:8008/patroni","state":"running","role":"primary","version":"4.1.4","xlog_location":5,"future":1}"#;
        let m = MemberRecord::parse(raw).expect("parses");
        assert_eq!(m.host_port(), Some(("10.0.0.1".into(), 5433)));
        assert_eq!(m.extra.get("future"), Some(&serde_json::json!(1)));
        assert!(m.encode().contains("\"future\":1"));
    }

    #[test]
    fn history_tolerates_short_lines() {
        let h = HistoryLine::parse_all(
            r#"[[1, 100, "no recovery target specified"], [2,200,"x","2026-01-01T00:00:00+00:00","n1"]]"#,
        );
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].new_leader.as_deref(), Some("n1"));
        assert_eq!(
            HistoryLine::encode_all(&h),
            r#"[[1,100,"no recovery target specified"],[2,200,"x","2026-01-01T00:00:00+00:00","n1"]]"#
        );
    }

    #[test]
    fn sync_lists_case_insensitively() {
        let s =
            SyncState::parse(r#"{"leader":"a","sync_standby":"B,c","quorum":0}"#).expect("parses");
        assert!(s.lists("b"));
        assert!(!s.lists("a"));
        assert_eq!(SyncState::parse(r#"{"sync_standby":"b"}"#), None);
    }
}
