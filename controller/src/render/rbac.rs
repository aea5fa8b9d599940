//! The agents' identity: a ServiceAccount, the Role the Kubernetes-mode agent needs (the one in
//! `deploy/agent-rbac.yaml`, nothing more; a test
//! compares the two) and the RoleBinding between them.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::{child_meta, Names};
use crate::crd::PostgresCluster;

pub fn service_account(pg: &PostgresCluster) -> ServiceAccount {
    let names = Names::of(pg);
    ServiceAccount {
        metadata: child_meta(pg, names.agent_account()),
        ..ServiceAccount::default()
    }
}

/// What an agent does through the API: elect its leader with a Lease, publish its member
/// record and role label on its own Pod, read the other members' Pods (and, holding the Lease,
/// remove the leader's role label from a former leader's), keep the cluster
/// state (`config`, `initialize`, `history`, `failover`, `sync`) in ConfigMaps.
pub fn agent_rules() -> Vec<PolicyRule> {
    let rule = |group: &str, resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    };
    vec![
        rule(
            "coordination.k8s.io",
            "leases",
            &["get", "list", "watch", "create", "update"],
        ),
        rule("", "pods", &["get", "list", "watch", "patch"]),
        rule(
            "",
            "configmaps",
            &["get", "list", "watch", "create", "update"],
        ),
    ]
}

pub fn role(pg: &PostgresCluster) -> Role {
    let names = Names::of(pg);
    Role {
        metadata: child_meta(pg, names.agent_account()),
        rules: Some(agent_rules()),
    }
}

pub fn role_binding(pg: &PostgresCluster) -> RoleBinding {
    let names = Names::of(pg);
    RoleBinding {
        metadata: child_meta(pg, names.agent_account()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: names.agent_account(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: names.agent_account(),
            namespace: Some(names.namespace.clone()),
            ..Subject::default()
        }]),
    }
}
