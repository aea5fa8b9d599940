//! Members as Pods: each agent publishes Patroni's member JSON in the `status` annotation of its
//! own Pod and labels the Pod with its role, so that Services can select the primary. The other
//! members are the Pods selected by `kubernetes.labels` plus `<scope_label>=<scope>`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::lease::parse_resource_version;
use crate::dcs::model::{Member, MemberRecord};

/// Annotation holding the member record (Patroni's name).
pub const MEMBER_ANNOTATION: &str = "status";

/// Role label keys and values (`kubernetes.role_label`, `*_label_value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleLabels {
    pub key: String,
    pub leader: String,
    pub follower: String,
    pub standby_leader: String,
}

impl RoleLabels {
    /// The label value for a member record's `role`. Only a running primary (or one that holds
    /// the lock while postgres restarts) gets the leader's value, so a Service selecting it
    /// follows the leader within one HA cycle of a promotion or demotion.
    pub fn value_for(&self, role: &str) -> &str {
        match role {
            "primary" | "master" => &self.leader,
            "standby_leader" => &self.standby_leader,
            _ => &self.follower,
        }
    }
}

/// `k=v,k=v` selecting the cluster's member Pods (and the agent's ConfigMaps).
pub fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The member a Pod represents, if it carries a readable member record.
pub fn member_of(pod: &Pod) -> Option<Member> {
    let name = pod.metadata.name.clone()?;
    let raw = pod.metadata.annotations.as_ref()?.get(MEMBER_ANNOTATION)?;
    let record = MemberRecord::parse(raw)?;
    Some(Member {
        name,
        record,
        revision: pod
            .metadata
            .resource_version
            .as_deref()
            .and_then(parse_resource_version)
            .unwrap_or(0),
        lease: 0,
    })
}

/// What this agent last saw or wrote on its own Pod: member record and role label.
pub type PodMark = (Option<String>, Option<String>);

/// The member record and role label currently on `pod`.
pub fn mark_of(pod: &Pod, role_key: &str) -> PodMark {
    (
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(MEMBER_ANNOTATION).cloned()),
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(role_key).cloned()),
    )
}

/// Pods other than `own` that still carry the leader's (or standby leader's) role label: while
/// `own` holds the Lease they are former leaders, dead or not yet demoted, and a Service
/// selecting the label must stop sending clients to them. Returns each Pod's name and the
/// `resourceVersion` the label was seen at.
pub fn stale_leader_pods(pods: &[Pod], role: &RoleLabels, own: &str) -> Vec<(String, String)> {
    let leader_values = [role.leader.as_str(), role.standby_leader.as_str()];
    if leader_values.contains(&role.follower.as_str()) {
        // A label that does not tell leaders from followers is not ours to clear.
        return Vec::new();
    }
    pods.iter()
        .filter(|p| p.metadata.name.as_deref() != Some(own))
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(&role.key))
                .is_some_and(|v| leader_values.contains(&v.as_str()))
        })
        .filter_map(|p| {
            Some((
                p.metadata.name.clone()?,
                p.metadata.resource_version.clone()?,
            ))
        })
        .collect()
}

/// JSON merge patch removing the role label from a Pod, only if the Pod is still at
/// `resource_version` (409 otherwise: its agent wrote meanwhile and knows better).
pub fn unlabel_patch(role_key: &str, resource_version: &str) -> serde_json::Value {
    json!({"metadata": {
        "resourceVersion": resource_version,
        "labels": {role_key: null},
    }})
}

/// JSON merge patch setting (or, with `None`, removing) the record and the role label.
pub fn mark_patch(role_key: &str, mark: &PodMark) -> serde_json::Value {
    json!({"metadata": {
        "annotations": {MEMBER_ANNOTATION: mark.0},
        "labels": {role_key: mark.1},
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> RoleLabels {
        RoleLabels {
            key: "role".into(),
            leader: "master".into(),
            follower: "replica".into(),
            standby_leader: "standby".into(),
        }
    }

    #[test]
    fn only_a_primary_gets_the_leader_value() {
        let l = labels();
        assert_eq!(l.value_for("primary"), "master");
        assert_eq!(l.value_for("standby_leader"), "standby");
        for other in ["replica", "demoted", "uninitialized", "promoted"] {
            assert_eq!(l.value_for(other), "replica");
        }
    }

    #[test]
    fn pods_without_a_readable_record_are_not_members() {
        let mut pod: Pod = serde_json::from_value(json!({"metadata": {"name": "pg-0",
            "resourceVersion": "42",
            "annotations": {"status": "{\"conn_url\":\"postgres://10.0.0.1:5432/postgres\",\"api_url\":\"http://10.0.0.1:8008/patroni\",\"state\":\"running\",\"role\":\"replica\",\"version\":\"4.1.4\"}"}}}))
            .expect("pod");
        let m = member_of(&pod).expect("member");
        assert_eq!((m.name.as_str(), m.revision), ("pg-0", 42));
        pod.metadata.annotations = None;
        assert!(member_of(&pod).is_none());
    }

    #[test]
    fn only_other_pods_labelled_leader_are_stale() {
        let pod = |name: &str, role: Option<&str>| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "resourceVersion": "7",
                "labels": role.map(|r| json!({"role": r})).unwrap_or(json!({}))}}))
            .expect("pod")
        };
        let pods = [
            pod("pg-0", Some("master")),
            pod("pg-1", Some("master")),
            pod("pg-2", Some("replica")),
            pod("pg-3", Some("standby")),
            pod("pg-4", None),
        ];
        let stale = stale_leader_pods(&pods, &labels(), "pg-0");
        assert_eq!(
            stale,
            vec![("pg-1".into(), "7".into()), ("pg-3".into(), "7".into())]
        );
        let mut same = labels();
        same.follower = "master".into();
        assert!(stale_leader_pods(&pods, &same, "pg-0").is_empty());
        let patch = unlabel_patch("role", "7");
        assert_eq!(patch["metadata"]["resourceVersion"], json!("7"));
        assert_eq!(patch["metadata"]["labels"]["role"], json!(null));
    }

    #[test]
    fn removing_the_mark_sends_nulls() {
        let patch = mark_patch("role", &(None, None));
        assert_eq!(patch["metadata"]["annotations"]["status"], json!(null));
        assert_eq!(patch["metadata"]["labels"]["role"], json!(null));
        assert_eq!(
            label_selector(&BTreeMap::from([
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), "2".to_owned())
            ])),
            "a=1,b=2"
        );
    }
}
