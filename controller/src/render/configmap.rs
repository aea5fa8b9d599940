//! The ConfigMap the Pods mount at `/etc/pgwarden`: the agent's YAML, and `pgbackrest.conf`
//! when backups are configured.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::agent_config::{self, CONFIG_FILE};
use super::{child_meta, Names};
use crate::crd::PostgresCluster;

pub fn configmap(pg: &PostgresCluster) -> ConfigMap {
    let names = Names::of(pg);
    let mut data = BTreeMap::new();
    data.insert(
        CONFIG_FILE.to_owned(),
        agent_config::render(&names, &pg.spec),
    );
    if let Some(conf) = agent_config::pgbackrest_conf(&names, &pg.spec) {
        data.insert("pgbackrest.conf".to_owned(), conf);
    }
    ConfigMap {
        metadata: child_meta(pg, names.agent_configmap()),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Hash of what the Pods read from the ConfigMap: goes into the Pod template, so a changed
/// configuration is a new StatefulSet revision.
pub fn config_hash(cm: &ConfigMap) -> String {
    let mut all = String::new();
    for (key, value) in cm.data.iter().flatten() {
        all.push_str(key);
        all.push('\0');
        all.push_str(value);
        all.push('\0');
    }
    agent_config::content_hash(&all)
}
