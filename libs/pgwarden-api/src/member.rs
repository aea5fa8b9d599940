//! The member record (`patroni-compat.md` §1.5).

use serde::{Deserialize, Serialize};

/// Member record `members/<name>` (`patroni-compat.md` §1.5). Unknown fields are kept so that a
/// record written by another agent survives a read-modify-write untouched.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub conn_url: String,
    pub api_url: String,
    pub state: String,
    pub role: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xlog_location: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub tags: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_after_promote: Option<bool>,
    /// Our own version; `version` carries the Patroni API level for compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgwarden_version: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl MemberRecord {
    /// Parses a member value. Legacy `postgres://…?application_name=<api_url>` values are accepted.
    pub fn parse(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        if raw.starts_with("postgres") {
            let (conn, query) = raw.split_once('?').unwrap_or((raw, ""));
            let api_url = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("application_name="))
                .unwrap_or_default();
            return Some(MemberRecord {
                conn_url: conn.to_owned(),
                api_url: api_url.to_owned(),
                ..Default::default()
            });
        }
        serde_json::from_str(raw).ok()
    }

    /// Whether the member runs as a primary (`master` is Patroni's pre-4.0 name).
    pub fn is_primary_role(&self) -> bool {
        matches!(self.role.as_str(), "primary" | "master" | "standby_leader")
    }

    /// The record as Patroni writes it: compact JSON.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// `(host, port)` parsed out of `conn_url`, as patronictl does.
    pub fn host_port(&self) -> Option<(String, u16)> {
        let rest = self.conn_url.split("://").nth(1)?;
        let authority = rest.split('/').next()?;
        let authority = authority.rsplit('@').next()?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
            _ => (authority, 5432),
        };
        Some((host.trim_matches(['[', ']']).to_owned(), port))
    }

    /// WAL position used for lag: max(receive, replay) on a standby, `xlog_location` otherwise.
    pub fn wal_position(&self) -> Option<u64> {
        match (self.receive_lsn, self.replay_lsn) {
            (Some(r), Some(p)) => Some(r.max(p)),
            _ => self.xlog_location,
        }
    }

    /// A boolean tag, written as Patroni accepts it (`true`, `"true"`, `"on"`, …).
    pub fn tag_bool(&self, tag: &str) -> bool {
        self.tags
            .get(tag)
            .and_then(crate::parse_bool)
            .unwrap_or(false)
    }

    /// Patroni's `sync_priority`: 0 when tagged `nosync`, else the `sync_priority` tag, 1 when
    /// it is absent or unreadable (as in Patroni). 0 means never a synchronous standby; among
    /// candidates the higher value is picked first.
    pub fn sync_priority(&self) -> i64 {
        if self.tag_bool("nosync") {
            return 0;
        }
        self.tags
            .get("sync_priority")
            .and_then(crate::parse_int)
            .unwrap_or(1)
    }

    /// Patroni's `nofailover`: the `nofailover` tag when it is written, else a
    /// `failover_priority` of 0 or less.
    pub fn nofailover(&self) -> bool {
        match self.tags.get("nofailover").filter(|v| !v.is_null()) {
            Some(v) => crate::parse_bool(v).unwrap_or(false),
            None => self
                .tags
                .get("failover_priority")
                .and_then(crate::parse_int)
                .is_some_and(|p| p <= 0),
        }
    }
}
