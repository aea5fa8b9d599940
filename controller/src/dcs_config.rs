//! `spec.postgresql.parameters` applied through the agents' DCS `config`, as `pgwarden
//! edit-config` (and `patronictl edit-config`) does, instead of through the Pod template.
//!
//! The agents keep the cluster's dynamic configuration in the `config` annotation of the
//! `<cluster>-config` ConfigMap (`docs/kubernetes.md`). Each agent applies a changed `config`
//! itself: a parameter that a reload takes is reloaded on every member with no restart; one that
//! needs a restart makes the members publish `pending_restart`, and only then does the rollout
//! restart Pods (replicas first, a switchover, the former primary last).
//!
//! The controller owns the parameters of the spec and nothing else in `config`: the names it
//! wrote are kept in [`MANAGED_ANNOTATION`] on the same ConfigMap, so a parameter removed from
//! the spec is removed from `config` while one set by hand with `edit-config` stays. The time of
//! the last change ([`CHANGED_ANNOTATION`]) tells a member that still has to restart (its Pod
//! is older) from one whose `pending_restart` has another cause (its Pod is newer: restarting it
//! again would not help, and would loop).
//!
//! `spec.standby` is kept in `config` as `standby_cluster` the same way: the controller sets the
//! keys it renders (`host`, `port`, `primary_slot_name`) and keeps the others an administrator
//! added (`restore_command`, ...); when `spec.standby` is removed it deletes `standby_cluster`,
//! which promotes the cluster, but only if it is the one that kept it there
//! ([`MANAGED_STANDBY_ANNOTATION`]): a `standby_cluster` set by hand on a cluster the spec never
//! made a standby is not the controller's to remove.
//!
//! Everything here is pure; `reconcile` reads and writes the ConfigMap.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{json, Map, Value};

/// Annotation holding the DCS `config` (the agents' name).
pub const CONFIG_ANNOTATION: &str = "config";
/// The parameter names the controller wrote into `config`, as a JSON array.
pub const MANAGED_ANNOTATION: &str = "pgwarden.io/managed-parameters";
/// When the controller last changed parameters in `config` (RFC 3339).
pub const CHANGED_ANNOTATION: &str = "pgwarden.io/parameters-changed-at";
/// `"true"` while `config.standby_cluster` is kept from `spec.standby`.
pub const MANAGED_STANDBY_ANNOTATION: &str = "pgwarden.io/managed-standby";

/// What the spec wants in `config`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wanted {
    /// `spec.postgresql.parameters`.
    pub parameters: BTreeMap<String, Value>,
    /// `spec.standby` as `standby_cluster` (an object), or `None` for an ordinary cluster.
    pub standby_cluster: Option<Value>,
}

/// The agents' ConfigMap holding `config`, `initialize` and `history`.
pub fn configmap_name(cluster: &str) -> String {
    format!("{cluster}-config")
}

/// The annotations to write on the agents' `config` ConfigMap so that `config` carries
/// `wanted`, or `None` when it already does. `None` too while the cluster has no `config` yet:
/// the agents' bootstrap writes it from `bootstrap.dcs`, which carries the same.
pub fn update(map: &ConfigMap, wanted: &Wanted, now: &str) -> Option<BTreeMap<String, String>> {
    let annotations = map.metadata.annotations.as_ref()?;
    let mut config: Value = serde_json::from_str(annotations.get(CONFIG_ANNOTATION)?).ok()?;
    let config_obj = config.as_object_mut()?;
    let standby_was_managed = annotations
        .get(MANAGED_STANDBY_ANNOTATION)
        .is_some_and(|v| v == "true");
    let standby_changed = update_standby_cluster(
        config_obj,
        wanted.standby_cluster.as_ref(),
        standby_was_managed,
    );
    let standby_managed = wanted.standby_cluster.is_some();
    let previous: Vec<String> = annotations
        .get(MANAGED_ANNOTATION)
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or_default();
    let postgresql = config_obj.entry("postgresql").or_insert_with(|| json!({}));
    if !postgresql.is_object() {
        *postgresql = json!({});
    }
    let parameters = postgresql
        .as_object_mut()?
        .entry("parameters")
        .or_insert_with(|| json!({}));
    if !parameters.is_object() {
        *parameters = json!({});
    }
    let parameters: &mut Map<String, Value> = parameters.as_object_mut()?;
    let mut changed = false;
    for name in previous
        .iter()
        .filter(|n| !wanted.parameters.contains_key(*n))
    {
        changed |= parameters.remove(name).is_some();
    }
    for (name, value) in &wanted.parameters {
        if parameters.get(name) != Some(value) {
            parameters.insert(name.clone(), value.clone());
            changed = true;
        }
    }
    let managed: Vec<&String> = wanted.parameters.keys().collect();
    let managed_text = serde_json::to_string(&managed).unwrap_or_default();
    let managed_changed = annotations.get(MANAGED_ANNOTATION) != Some(&managed_text)
        || standby_managed != standby_was_managed;
    if !changed && !standby_changed && !managed_changed {
        return None;
    }
    let mut out = BTreeMap::from([
        (MANAGED_ANNOTATION.to_owned(), managed_text),
        (
            MANAGED_STANDBY_ANNOTATION.to_owned(),
            standby_managed.to_string(),
        ),
    ]);
    if changed || standby_changed {
        out.insert(CONFIG_ANNOTATION.to_owned(), config.to_string());
    }
    if changed {
        // Only parameters: the rollout reads this time to tell which Pods still need a
        // restart, and a standby_cluster change needs none.
        out.insert(CHANGED_ANNOTATION.to_owned(), now.to_owned());
    }
    Some(out)
}

/// Brings `config.standby_cluster` to `wanted`; true if it changed.
fn update_standby_cluster(
    config: &mut Map<String, Value>,
    wanted: Option<&Value>,
    was_managed: bool,
) -> bool {
    match wanted.and_then(Value::as_object) {
        Some(wanted) => {
            let current = config.entry("standby_cluster").or_insert_with(|| json!({}));
            if !current.is_object() {
                *current = json!({});
            }
            let Some(current) = current.as_object_mut() else {
                return false;
            };
            let mut changed = false;
            for (key, value) in wanted {
                if current.get(key) != Some(value) {
                    current.insert(key.clone(), value.clone());
                    changed = true;
                }
            }
            changed
        }
        None if was_managed => config.remove("standby_cluster").is_some(),
        None => false,
    }
}

/// When the controller last changed parameters, from the agents' `config` ConfigMap.
pub fn changed_at(map: Option<&ConfigMap>) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = map?
        .metadata
        .annotations
        .as_ref()?
        .get(CHANGED_ANNOTATION)?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// `config.pause` in the agents' `config` ConfigMap, truthy as Patroni reads it (`true`,
/// `"on"`, `1`, ...). An unreadable `config` is not a pause: the agents read it the same way.
pub fn paused(map: Option<&ConfigMap>) -> bool {
    let Some(text) = map
        .and_then(|m| m.metadata.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_ANNOTATION))
    else {
        return false;
    };
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|config| config.get("pause").and_then(pgwarden_api::parse_bool))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_is_read_from_config_as_the_agents_read_it() {
        assert!(!paused(None));
        assert!(!paused(Some(&map(&[]))));
        assert!(!paused(Some(&map(&[("config", r#"{"ttl": 30}"#)]))));
        assert!(!paused(Some(&map(&[("config", "not json")]))));
        assert!(!paused(Some(&map(&[("config", r#"{"pause": false}"#)]))));
        assert!(paused(Some(&map(&[("config", r#"{"pause": true}"#)]))));
        assert!(paused(Some(&map(&[("config", r#"{"pause": "on"}"#)]))));
    }

    fn map(annotations: &[(&str, &str)]) -> ConfigMap {
        let mut m = ConfigMap::default();
        m.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        m
    }

    fn wanted(pairs: &[(&str, Value)]) -> Wanted {
        Wanted {
            parameters: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            standby_cluster: None,
        }
    }

    #[test]
    fn spec_parameters_are_set_and_hand_edits_kept() {
        let m = map(&[(
            "config",
            r#"{"ttl":30,"postgresql":{"use_slots":true,"parameters":{"log_min_duration_statement":"1s"}}}"#,
        )]);
        let out = update(&m, &wanted(&[("work_mem", json!("8MB"))]), "T1").expect("a change");
        let config: Value = serde_json::from_str(&out["config"]).expect("json");
        assert_eq!(config["ttl"], 30);
        assert_eq!(config["postgresql"]["use_slots"], true);
        assert_eq!(config["postgresql"]["parameters"]["work_mem"], "8MB");
        assert_eq!(
            config["postgresql"]["parameters"]["log_min_duration_statement"], "1s",
            "set by edit-config, not ours"
        );
        assert_eq!(out[MANAGED_ANNOTATION], r#"["work_mem"]"#);
        assert_eq!(out[CHANGED_ANNOTATION], "T1");
    }

    #[test]
    fn nothing_to_write_when_config_matches_or_is_absent() {
        let m = map(&[
            (
                "config",
                r#"{"postgresql":{"parameters":{"work_mem":"8MB"}}}"#,
            ),
            (MANAGED_ANNOTATION, r#"["work_mem"]"#),
            (MANAGED_STANDBY_ANNOTATION, "false"),
        ]);
        assert_eq!(
            update(&m, &wanted(&[("work_mem", json!("8MB"))]), "T"),
            None
        );
        // Before the bootstrap wrote `config`, bootstrap.dcs carries the parameters.
        assert_eq!(
            update(&map(&[]), &wanted(&[("work_mem", json!("8MB"))]), "T"),
            None
        );
    }

    #[test]
    fn a_parameter_removed_from_the_spec_leaves_config() {
        let m = map(&[
            (
                "config",
                r#"{"postgresql":{"parameters":{"work_mem":"8MB","shared_buffers":"256MB","other":"x"}}}"#,
            ),
            (MANAGED_ANNOTATION, r#"["shared_buffers","work_mem"]"#),
        ]);
        let out = update(&m, &wanted(&[("work_mem", json!("8MB"))]), "T2").expect("a change");
        let config: Value = serde_json::from_str(&out["config"]).expect("json");
        let params = &config["postgresql"]["parameters"];
        assert!(params.get("shared_buffers").is_none());
        assert_eq!(params["work_mem"], "8MB");
        assert_eq!(params["other"], "x");
        assert_eq!(out[MANAGED_ANNOTATION], r#"["work_mem"]"#);
    }

    #[test]
    fn spec_standby_is_kept_in_config_and_its_removal_promotes() {
        let standby = Wanted {
            standby_cluster: Some(json!({"host": "src.prod.svc", "port": 5432})),
            ..Wanted::default()
        };
        // Seeded from bootstrap.dcs, plus a key set by hand: the controller starts managing it.
        let m = map(&[(
            "config",
            r#"{"ttl":30,"standby_cluster":{"host":"src.prod.svc","port":5432,"restore_command":"x"}}"#,
        )]);
        let out = update(&m, &standby, "T").expect("the marker is written");
        assert_eq!(out[MANAGED_STANDBY_ANNOTATION], "true");
        assert!(
            !out.contains_key(CONFIG_ANNOTATION),
            "config already matches"
        );

        // A new source host: set, the hand-written key kept, no parameter change time.
        let moved = Wanted {
            standby_cluster: Some(json!({"host": "src2.prod.svc", "port": 5432})),
            ..Wanted::default()
        };
        let m = map(&[
            (
                "config",
                r#"{"standby_cluster":{"host":"src.prod.svc","port":5432,"restore_command":"x"}}"#,
            ),
            (MANAGED_ANNOTATION, "[]"),
            (MANAGED_STANDBY_ANNOTATION, "true"),
        ]);
        let out = update(&m, &moved, "T").expect("a change");
        let config: Value = serde_json::from_str(&out[CONFIG_ANNOTATION]).expect("json");
        assert_eq!(config["standby_cluster"]["host"], "src2.prod.svc");
        assert_eq!(config["standby_cluster"]["restore_command"], "x");
        assert!(!out.contains_key(CHANGED_ANNOTATION));

        // spec.standby removed: standby_cluster goes, which promotes the cluster.
        let out = update(&m, &Wanted::default(), "T").expect("a change");
        let config: Value = serde_json::from_str(&out[CONFIG_ANNOTATION]).expect("json");
        assert!(config.get("standby_cluster").is_none(), "{config}");
        assert_eq!(out[MANAGED_STANDBY_ANNOTATION], "false");

        // Set by hand on a cluster the spec never made a standby: not the controller's.
        let m = map(&[
            ("config", r#"{"standby_cluster":{"host":"h","port":5432}}"#),
            (MANAGED_ANNOTATION, "[]"),
            (MANAGED_STANDBY_ANNOTATION, "false"),
        ]);
        assert_eq!(update(&m, &Wanted::default(), "T"), None);
    }

    #[test]
    fn the_change_time_is_read_back() {
        assert!(changed_at(None).is_none());
        let m = map(&[(CHANGED_ANNOTATION, "2026-12-05T08:00:00Z")]);
        assert_eq!(
            changed_at(Some(&m)).map(|t| t.to_rfc3339()),
            Some("2026-12-05T08:00:00+00:00".to_owned())
        );
    }
}
