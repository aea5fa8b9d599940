//! The files in `deploy/` are what users install: they must parse, and Prometheus' own tool must
//! accept the scrape configuration and the alert rules (with their unit tests).

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Deserialize;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) {
    let dir = deploy().join("monitoring");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool (Debian package prometheus, installed by scripts/install-deps.sh): {e}"
            )
        });
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_scrape_config() {
    promtool(&["check", "config", "prometheus.yml"]);
}

#[test]
fn promtool_accepts_the_alert_rules_and_their_unit_tests_pass() {
    promtool(&["check", "rules", "pgwarden-alerts.yml"]);
    promtool(&["test", "rules", "pgwarden-alerts.test.yml"]);
}

/// The metric names the agent exports, read from its source.
fn agent_metric_names() -> Vec<String> {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src/api/metrics.rs"),
    )
    .expect("agent metrics source");
    src.split('"')
        .filter(|s| {
            (s.starts_with("patroni_") || s.starts_with("pgwarden_"))
                && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

fn metric_names_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("patroni_") || w.starts_with("pgwarden_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn dashboard_and_alerts_use_only_metrics_the_agent_exports() {
    let known = agent_metric_names();
    assert!(known.contains(&"patroni_primary".to_owned()), "{known:?}");
    let text = std::fs::read_to_string(deploy().join("monitoring/grafana-dashboard.json"))
        .expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() >= 10);
    let alerts =
        std::fs::read_to_string(deploy().join("monitoring/pgwarden-alerts.yml")).expect("alerts");
    exprs.push(alerts);
    for expr in &exprs {
        for name in metric_names_in(expr) {
            assert!(
                known.contains(&name),
                "{name} (in {expr:?}) is not a metric of the agent"
            );
        }
    }
}

/// `deploy/controller.yaml` parses document by document into the API types.
#[test]
fn controller_manifest_parses_into_api_types() {
    let text = std::fs::read_to_string(deploy().join("controller.yaml")).expect("controller.yaml");
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc).expect("yaml");
        let kind = value["kind"].as_str().expect("kind").to_owned();
        let json = serde_json::to_value(&value).expect("json");
        match kind.as_str() {
            "Namespace" => drop(serde_json::from_value::<Namespace>(json).expect("Namespace")),
            "ServiceAccount" => {
                drop(serde_json::from_value::<ServiceAccount>(json).expect("ServiceAccount"))
            }
            "ClusterRole" => {
                drop(serde_json::from_value::<ClusterRole>(json).expect("ClusterRole"))
            }
            "ClusterRoleBinding" => drop(
                serde_json::from_value::<ClusterRoleBinding>(json).expect("ClusterRoleBinding"),
            ),
            "Role" => drop(serde_json::from_value::<Role>(json).expect("Role")),
            "RoleBinding" => {
                drop(serde_json::from_value::<RoleBinding>(json).expect("RoleBinding"))
            }
            "Deployment" => {
                let d: Deployment = serde_json::from_value(json).expect("Deployment");
                let pod = d.spec.and_then(|s| s.template.spec).expect("pod spec");
                assert_eq!(
                    pod.service_account_name.as_deref(),
                    Some("pgwarden-controller")
                );
            }
            other => panic!("unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    assert!(kinds.contains(&"Deployment".to_owned()) && kinds.contains(&"ClusterRole".to_owned()));
}
