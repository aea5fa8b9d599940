//! The ConfigMap the Pods mount at `/etc/pgwarden`: one agent YAML per member (the agent writes
//! `pgbackrest.conf` itself from its `pgbackrest` section).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::agent_config;
use super::{child_meta, Names};
use crate::crd::PostgresCluster;

pub fn configmap(pg: &PostgresCluster) -> ConfigMap {
    let names = Names::of(pg);
    let upgraded_from = super::version_annotation(pg, super::UPGRADED_FROM_ANNOTATION);
    let mut data = BTreeMap::new();
    for ordinal in 0..pg.spec.instances.replicas.max(0) {
        data.insert(
            agent_config::member_file(&names, ordinal),
            agent_config::render(&names, &pg.spec, ordinal, upgraded_from),
        );
    }
    ConfigMap {
        metadata: child_meta(pg, names.agent_configmap()),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Hash of what the Pods read from the ConfigMap: goes into the Pod template, so a changed
/// configuration is a new StatefulSet revision. Not a hash of the ConfigMap itself: scaling
/// adds a member file, and that must not restart the existing members. Nor of the parameters:
/// they reach the members through the DCS `config` (`crate::dcs_config`), and only those that
/// need a restart restart Pods; the hash is computed as if there were none, so it is the same
/// as before for a cluster without parameters. `spec.standby` too: the members apply a changed
/// `standby_cluster` from the DCS `config` (a promotion, a new source) without a restart.
pub fn config_hash(pg: &PostgresCluster) -> String {
    let names = Names::of(pg);
    let mut value = agent_config::value(&names, &pg.spec);
    agent_config::with_upgrade_binaries(
        &mut value,
        &pg.spec,
        super::version_annotation(pg, super::UPGRADED_FROM_ANNOTATION),
    );
    if let Some(dcs_pg) = value["bootstrap"]["dcs"]["postgresql"].as_object_mut() {
        dcs_pg.remove("parameters");
    }
    if let Some(dcs) = value["bootstrap"]["dcs"].as_object_mut() {
        dcs.remove("standby_cluster");
    }
    let mut all = serde_json::to_string(&value).unwrap_or_default();
    all.push('\0');
    all.push_str(&serde_json::to_string(&pg.spec.instances.failover_priority).unwrap_or_default());
    // Where a pgbackrest.conf used to be hashed: kept, so the hash of clusters without backups
    // (and so their Pod template) does not change with this controller version.
    all.push('\0');
    agent_config::content_hash(&all)
}
