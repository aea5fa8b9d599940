//! Pure builders: one function per object kind, from a `PostgresCluster` to the object the
//! controller applies. No IO here, so each builder is tested on its own (`render/tests.rs`) and
//! the whole set against golden files (`controller/tests/golden/`).
//!
//! Every object carries the cluster's labels and an owner reference to the `PostgresCluster`
//! (controller = true), so the garbage collector removes it with the cluster. The PVCs that the
//! StatefulSet creates from its claim template are the exception: nobody owns them, so data
//! survives a deleted cluster unless `spec.pvcRetention: Delete`.

pub mod agent_config;
pub mod configmap;
pub mod pdb;
pub mod pooler;
pub mod rbac;
pub mod secrets;
pub mod services;
pub mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::PostgresCluster;

/// Field manager of every server-side apply the controller makes.
pub const FIELD_MANAGER: &str = "pgwarden-controller";

/// Label on every member Pod naming the application, as Patroni's `kubernetes.labels` default
/// (`application: patroni`) does for Patroni.
pub const APPLICATION_LABEL: &str = "application";
pub const APPLICATION: &str = "pgwarden";
/// The agents' `kubernetes.scope_label`: its value is the cluster name (= the agents' scope).
pub const SCOPE_LABEL: &str = "cluster-name";
/// The agents' `kubernetes.role_label`, which each agent sets on its own Pod.
pub const ROLE_LABEL: &str = "role";
pub const ROLE_PRIMARY: &str = "primary";
pub const ROLE_REPLICA: &str = "replica";
/// Annotation on the Pod template: hash of the agent configuration, so a config change
/// produces a new StatefulSet revision (and a controlled rollout).
pub const CONFIG_HASH_ANNOTATION: &str = "pgwarden.io/config-hash";

/// Annotation on the StatefulSet (not its Pod template: no rollout): the PostgreSQL major
/// version its template runs, so a raised `spec.postgresVersion` is recognised as an upgrade
/// (`crate::upgrade`).
pub const POSTGRES_VERSION_ANNOTATION: &str = "pgwarden.io/postgres-version";
/// On the StatefulSet while its members stop for an upgrade to this version (`crate::upgrade`).
/// On a `PostgresCluster` given to the builders: render the StatefulSet with it.
pub const UPGRADE_TO_ANNOTATION: &str = "pgwarden.io/upgrade-to";
/// On the StatefulSet whose template was made for an upgrade from this version: the agents
/// have that version's binaries too (`postgresql.bin_dirs`) and an init container upgrades a
/// member's data before its agent starts (`crate::upgrade`). On a `PostgresCluster` given to
/// the builders: render for it.
pub const UPGRADED_FROM_ANNOTATION: &str = "pgwarden.io/upgraded-from";

/// A version annotation of `pg` ([`UPGRADE_TO_ANNOTATION`], [`UPGRADED_FROM_ANNOTATION`]).
pub fn version_annotation(pg: &PostgresCluster, key: &str) -> Option<u32> {
    pg.annotations().get(key).and_then(|v| v.parse().ok())
}

/// The directory of a PostgreSQL major version's binaries in the image (Debian's layout).
pub fn bin_dir(version: u32) -> String {
    format!("/usr/lib/postgresql/{version}/bin")
}

/// Ports inside each Pod.
pub const POSTGRES_PORT: i32 = 5432;
pub const API_PORT: i32 = 8008;

/// Names of everything one cluster owns, derived from the cluster's name in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
}

impl Names {
    pub fn of(pg: &PostgresCluster) -> Names {
        Names {
            cluster: pg.name_any(),
            namespace: pg.namespace().unwrap_or_else(|| "default".to_owned()),
        }
    }
    /// StatefulSet, PodDisruptionBudget.
    pub fn statefulset(&self) -> String {
        self.cluster.clone()
    }
    /// Headless Service giving each member a stable DNS name.
    pub fn headless_service(&self) -> String {
        format!("{}-pods", self.cluster)
    }
    pub fn primary_service(&self) -> String {
        format!("{}-primary", self.cluster)
    }
    pub fn replicas_service(&self) -> String {
        format!("{}-replicas", self.cluster)
    }
    /// ConfigMap with the agent's YAML. Not `<scope>-config`: the agents keep their DCS
    /// `config` under that name.
    pub fn agent_configmap(&self) -> String {
        format!("{}-agent", self.cluster)
    }
    /// ServiceAccount, Role and RoleBinding of the agents.
    pub fn agent_account(&self) -> String {
        format!("{}-agent", self.cluster)
    }
    pub fn superuser_secret(&self) -> String {
        format!("{}-superuser", self.cluster)
    }
    pub fn replication_secret(&self) -> String {
        format!("{}-replication", self.cluster)
    }
    /// Basic-auth credentials of the agents' REST API (the controller uses them to request a
    /// switchover).
    pub fn restapi_secret(&self) -> String {
        format!("{}-restapi", self.cluster)
    }
    pub fn user_secret(&self, user: &str) -> String {
        format!("{}-user-{}", self.cluster, user.replace('_', "-"))
    }
    /// The Lease the agents elect their leader with (`<scope>-leader`).
    pub fn leader_lease(&self) -> String {
        format!("{}-leader", self.cluster)
    }
    /// Deployment, Service and ConfigMap of a PgBouncer pooler: `<cluster>-pooler` in front of
    /// the primary Service, `<cluster>-pooler-ro` in front of the replicas Service.
    pub fn pooler(&self, read_only: bool) -> String {
        if read_only {
            format!("{}-pooler-ro", self.cluster)
        } else {
            format!("{}-pooler", self.cluster)
        }
    }
    /// The `pgbouncer` role's password (and PgBouncer's `auth_file` made from it).
    pub fn pooler_secret(&self) -> String {
        format!("{}-pooler-auth", self.cluster)
    }
    pub fn pod(&self, ordinal: i32) -> String {
        format!("{}-{}", self.cluster, ordinal)
    }
}

/// Labels that select every member Pod of a cluster (StatefulSet selector, Services, PDB) and
/// that the agents use to find each other.
pub fn selector_labels(names: &Names) -> BTreeMap<String, String> {
    BTreeMap::from([
        (APPLICATION_LABEL.to_owned(), APPLICATION.to_owned()),
        (SCOPE_LABEL.to_owned(), names.cluster.clone()),
    ])
}

/// Labels of every object the controller creates.
pub fn labels(names: &Names) -> BTreeMap<String, String> {
    let mut labels = selector_labels(names);
    labels.insert("app.kubernetes.io/name".to_owned(), "pgwarden".to_owned());
    labels.insert(
        "app.kubernetes.io/instance".to_owned(),
        names.cluster.clone(),
    );
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        FIELD_MANAGER.to_owned(),
    );
    labels
}

/// The owner reference every child carries. A cluster read from the API server always has a
/// uid; one built in a test without it gets an empty uid, which the server would refuse.
pub fn owner_reference(pg: &PostgresCluster) -> OwnerReference {
    pg.controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: PostgresCluster::api_version(&()).into_owned(),
            kind: PostgresCluster::kind(&()).into_owned(),
            name: pg.name_any(),
            uid: String::new(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

/// Metadata of a child object: name, namespace, labels, owner reference.
pub fn child_meta(pg: &PostgresCluster, name: String) -> ObjectMeta {
    let names = Names::of(pg);
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels(&names)),
        owner_references: Some(vec![owner_reference(pg)]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
mod tests;
