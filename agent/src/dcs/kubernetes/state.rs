//! Cluster state in ConfigMap annotations, with the etcd keys' semantics.
//!
//! | etcd key | ConfigMap | annotation |
//! |---|---|---|
//! | `config`, `initialize`, `history` | `<scope>-config` | same names |
//! | `failover` | `<scope>-failover` | `failover` |
//! | `sync` | `<scope>-sync` | `sync` |
//! | `status` | `<scope>-status` | `status` |
//!
//! Values are the etcd values (Patroni's JSON). A compare-and-set on a key compares the
//! ConfigMap's `resourceVersion` (the `revision` a [`crate::dcs::Versioned`] carries), so a
//! concurrent write to another annotation of the same ConfigMap makes it fail too (the caller
//! re-reads and retries, as after any lost compare). "Only if absent" compares the annotation
//! itself on the `resourceVersion` it was read at.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::lease::parse_resource_version;

/// Which of the cluster's ConfigMaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateMap {
    Config,
    Failover,
    Sync,
    Status,
}

impl StateMap {
    pub fn name(self, scope: &str) -> String {
        let suffix = match self {
            StateMap::Config => "config",
            StateMap::Failover => "failover",
            StateMap::Sync => "sync",
            StateMap::Status => "status",
        };
        format!("{scope}-{suffix}")
    }

    pub fn all() -> [StateMap; 4] {
        [
            StateMap::Config,
            StateMap::Failover,
            StateMap::Sync,
            StateMap::Status,
        ]
    }
}

/// The condition a write is made under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Unconditional.
    Any,
    /// Only if the annotation is absent (an empty value is present, as an empty etcd key is:
    /// `initialize = ""` marks a bootstrap in progress).
    Absent,
    /// Only if the ConfigMap is still at this `resourceVersion`.
    Revision(i64),
}

impl Expect {
    /// etcd's convention: `Some(0)` = only if absent, `Some(rev)` = at that revision.
    pub fn from_revision(expected: Option<i64>) -> Expect {
        match expected {
            None => Expect::Any,
            Some(0) => Expect::Absent,
            Some(rev) => Expect::Revision(rev),
        }
    }

    /// Whether a write may go ahead on `current` (the ConfigMap as just read).
    pub fn holds(self, current: Option<&ConfigMap>, annotation: &str) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => !current
                .and_then(|m| m.metadata.annotations.as_ref())
                .is_some_and(|a| a.contains_key(annotation)),
            Expect::Revision(rev) => current.and_then(revision_of) == Some(rev),
        }
    }
}

/// A non-empty annotation's value.
pub fn annotation_of<'a>(map: Option<&'a ConfigMap>, key: &str) -> Option<&'a str> {
    map?.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

pub fn revision_of(map: &ConfigMap) -> Option<i64> {
    map.metadata
        .resource_version
        .as_deref()
        .and_then(parse_resource_version)
}

/// `current` (or a new ConfigMap named `name`) with `updates` applied (`None` removes) and the
/// selector labels present, ready for a create or a replace with its `resourceVersion`.
pub fn updated(
    current: Option<&ConfigMap>,
    name: &str,
    labels: &BTreeMap<String, String>,
    updates: &[(&str, Option<String>)],
) -> ConfigMap {
    let mut map = current.cloned().unwrap_or_else(|| {
        let mut m = ConfigMap::default();
        m.metadata.name = Some(name.to_owned());
        m
    });
    let annotations = map.metadata.annotations.get_or_insert_with(BTreeMap::new);
    for (key, value) in updates {
        match value {
            Some(v) => {
                annotations.insert((*key).to_owned(), v.clone());
            }
            None => {
                annotations.remove(*key);
            }
        }
    }
    let own = map.metadata.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in labels {
        own.insert(k.clone(), v.clone());
    }
    map
}

/// A lock "attached to the leader lease" (the etcd keys of `Dcs::acquire_lease_key`) as an
/// annotation: the value with the Lease holder and its `leaseTransitions`/`acquireTime` when it
/// was taken. It counts only while that same holder still holds that same term of the Lease, so
/// it disappears with the leadership as an etcd key disappears with its lease.
pub fn lease_key_record(value: &str, holder: &str, lease: &super::lease::LeaseRecord) -> String {
    serde_json::json!({
        "value": value,
        "lease_holder": holder,
        "lease_transitions": lease.transitions,
        "lease_acquire_time": lease.acquire_time,
    })
    .to_string()
}

/// `Some(Some(value))`: a lease-attached lock still held; `Some(None)`: one whose lease term
/// ended (free); `None`: the annotation is a plain value.
pub fn live_lease_key(
    raw: &str,
    lease: Option<&super::lease::LeaseRecord>,
) -> Option<Option<String>> {
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    let holder = v.get("lease_holder")?.as_str()?;
    let live = lease.is_some_and(|l| {
        l.holder.as_deref() == Some(holder)
            && v["lease_transitions"].as_i64() == Some(i64::from(l.transitions))
            && v["lease_acquire_time"].as_str() == l.acquire_time.as_deref()
    });
    Some(live.then(|| v["value"].as_str().unwrap_or_default().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rv: &str, annotations: &[(&str, &str)]) -> ConfigMap {
        let mut m = ConfigMap::default();
        m.metadata.resource_version = Some(rv.to_owned());
        m.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        m
    }

    #[test]
    fn expectations_follow_the_etcd_conventions() {
        // The bootstrap race: an empty `initialize` is taken already.
        let m = map("12", &[("initialize", "")]);
        assert!(!Expect::from_revision(Some(0)).holds(Some(&m), "initialize"));
        assert!(Expect::from_revision(Some(0)).holds(Some(&m), "config"));
        assert!(Expect::from_revision(Some(0)).holds(None, "initialize"));
        let m = map("12", &[("initialize", "7000")]);
        assert!(!Expect::Absent.holds(Some(&m), "initialize"));
        assert!(Expect::from_revision(Some(12)).holds(Some(&m), "config"));
        assert!(!Expect::from_revision(Some(11)).holds(Some(&m), "config"));
        assert!(!Expect::Revision(11).holds(None, "config"));
        assert!(Expect::from_revision(None).holds(None, "config"));
    }

    #[test]
    fn updates_keep_other_annotations_and_add_the_labels() {
        let m = map("3", &[("history", "[]"), ("initialize", "1")]);
        let labels = BTreeMap::from([("cluster-name".to_owned(), "pg".to_owned())]);
        let u = updated(
            Some(&m),
            "pg-config",
            &labels,
            &[("initialize", None), ("config", Some("{}".into()))],
        );
        let a = u.metadata.annotations.expect("annotations");
        assert_eq!(a.get("history").map(String::as_str), Some("[]"));
        assert_eq!(a.get("config").map(String::as_str), Some("{}"));
        assert!(!a.contains_key("initialize"));
        assert_eq!(u.metadata.resource_version.as_deref(), Some("3"));
        assert_eq!(u.metadata.labels, Some(labels));
        assert_eq!(StateMap::Failover.name("pg"), "pg-failover");
    }

    #[test]
    fn a_lease_attached_lock_lives_only_for_its_lease_term() {
        let lease = super::super::lease::LeaseRecord {
            resource_version: "1".into(),
            holder: Some("pg-0".into()),
            renew_time: None,
            duration: std::time::Duration::from_secs(30),
            transitions: 3,
            acquire_time: Some("2026-12-05T08:00:00.000000Z".into()),
        };
        let raw = lease_key_record("{\"member\":\"pg-0\"}", "pg-0", &lease);
        assert_eq!(
            live_lease_key(&raw, Some(&lease)),
            Some(Some("{\"member\":\"pg-0\"}".to_owned()))
        );
        // A new term (even of the same holder) or another holder frees it.
        let next = super::super::lease::LeaseRecord {
            transitions: 4,
            ..lease.clone()
        };
        assert_eq!(live_lease_key(&raw, Some(&next)), Some(None));
        let other = super::super::lease::LeaseRecord {
            holder: Some("pg-1".into()),
            ..lease.clone()
        };
        assert_eq!(live_lease_key(&raw, Some(&other)), Some(None));
        assert_eq!(live_lease_key(&raw, None), Some(None));
        assert_eq!(live_lease_key("{\"fire\":1}", Some(&lease)), None);
        assert_eq!(live_lease_key("plain", Some(&lease)), None);
    }
}
