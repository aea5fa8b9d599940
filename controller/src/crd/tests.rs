use kube::CustomResourceExt;

use super::*;

fn spec(yaml: &str) -> PostgresClusterSpec {
    serde_yaml::from_str(yaml).expect("spec parses")
}

fn minimal() -> PostgresClusterSpec {
    spec("instances: {replicas: 3, storage: {size: 10Gi}}")
}

fn fields(result: Result<(), Vec<SpecError>>) -> Vec<String> {
    result
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.field)
        .collect()
}

#[test]
fn defaults_are_patroni_defaults() {
    let s = minimal();
    assert_eq!(s.image, "pgwarden/pgwarden:0.1.0-pg15");
    assert_eq!(s.postgres_version, 15);
    assert_eq!((s.ha.ttl, s.ha.loop_wait, s.ha.retry_timeout), (30, 10, 10));
    assert_eq!(s.ha.maximum_lag_on_failover, 1_048_576);
    assert_eq!(s.pvc_retention, PvcRetention::Retain);
    assert_eq!(s.instances.anti_affinity, AntiAffinity::Preferred);
    assert_eq!(s.instances.termination_grace_period_seconds, 120);
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn parameters_are_integers_or_strings() {
    let s = spec("instances: {replicas: 1, storage: {size: 1Gi}}\npostgresql: {parameters: {max_connections: 100, work_mem: 8MB}}");
    assert_eq!(
        s.postgresql.parameters["max_connections"],
        ParamValue::Int(100)
    );
    assert_eq!(
        s.postgresql.parameters["work_mem"],
        ParamValue::Text("8MB".to_owned())
    );
    // A list is no parameter value (the API server's schema refuses it first).
    assert!(serde_yaml::from_str::<PostgresClusterSpec>(
        "instances: {replicas: 1, storage: {size: 1Gi}}\npostgresql: {parameters: {a: [1]}}"
    )
    .is_err());
}

#[test]
fn lease_timing_rule_is_checked() {
    let mut s = minimal();
    s.ha.ttl = 20;
    s.ha.loop_wait = 10;
    s.ha.retry_timeout = 10;
    let errors = s.validate().expect_err("invalid");
    assert_eq!(errors[0].field, "ha");
    assert!(
        errors[0]
            .to_string()
            .starts_with("spec.ha: loopWait + 2 * retryTimeout (30)"),
        "{}",
        errors[0]
    );
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let s = spec(
        r#"
instances: {replicas: 2, storage: {size: 0Gi}, failoverPriority: {"5": 1}}
postgresql: {parameters: {port: 5433, "bad name": 1}, pgHba: ["a\nb"]}
users: [{name: app}, {name: app}, {name: postgres}]
databases: [{name: d, owner: nobody}]
ha: {synchronousModeStrict: true, quorumCommit: true}
restore: {repo: repo1}
"#,
    );
    assert_eq!(
        fields(s.validate()),
        [
            "ha.synchronousModeStrict",
            "ha.quorumCommit",
            "instances.storage.size",
            "postgresql.parameters.bad name",
            "postgresql.parameters.port",
            "postgresql.pgHba[0]",
            "users[1].name",
            "users[2].name",
            "databases[0].owner",
            "restore.repo",
            "instances.failoverPriority.5",
        ]
    );
}

#[test]
fn quantities() {
    assert_eq!(parse_quantity("10Gi"), Some(10 << 30));
    assert_eq!(parse_quantity("500M"), Some(500_000_000));
    assert_eq!(parse_quantity("1.5Ki"), Some(1536));
    assert_eq!(parse_quantity("1024"), Some(1024));
    for bad in ["", "Gi", "10GB", "1.", "-1Gi", "1.5.5Gi", "ten"] {
        assert_eq!(parse_quantity(bad), None, "{bad}");
    }
}

/// The schema carries the validation, so the API server refuses bad manifests at `apply`.
#[test]
fn crd_schema_validates_replicas_storage_and_parameters() {
    let crd = serde_json::to_value(PostgresCluster::crd()).expect("json");
    assert_eq!(crd["spec"]["group"], "pgwarden.io");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let instances = &spec["instances"]["properties"];
    assert_eq!(instances["replicas"]["minimum"], 1.0);
    assert_eq!(instances["replicas"]["maximum"], 15.0);
    assert!(instances["storage"]["properties"]["size"]["pattern"].is_string());
    assert_eq!(
        spec["postgresql"]["properties"]["parameters"]["additionalProperties"],
        serde_json::json!({"x-kubernetes-int-or-string": true})
    );
    assert_eq!(
        spec["pvcRetention"]["enum"],
        serde_json::json!(["Retain", "Delete"])
    );
    // Structural: no unions of types anywhere (a 1.20 API server refuses such a CRD).
    let text = crd.to_string();
    for word in ["\"anyOf\"", "\"oneOf\"", "\"allOf\""] {
        assert!(!text.contains(word), "schema contains {word}");
    }
}

/// `deploy/crd.yaml` is what `pgwarden-controller crd` prints; regenerate it with
/// `cargo run -p pgwarden-controller -- crd > deploy/crd.yaml`.
#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crd.yaml");
    let committed = std::fs::read_to_string(&path).expect("deploy/crd.yaml");
    let generated = serde_yaml::to_string(&PostgresCluster::crd()).expect("yaml");
    assert!(
        committed == generated,
        "deploy/crd.yaml is stale: run `cargo run -p pgwarden-controller -- crd > deploy/crd.yaml`"
    );
}

#[test]
fn examples_are_valid_specs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let pg: PostgresCluster =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(pg.spec.validate(), Ok(()), "{}", path.display());
        n += 1;
    }
    assert!(n >= 3);
}

#[test]
fn every_repository_may_have_schedules_and_a_posix_one_a_shared_volume() {
    let s = spec(
        r#"
instances: {replicas: 2, storage: {size: 1Gi}}
backups:
  pgbackrest:
    repos:
      - {name: repo1, path: /pgbackrest, schedules: {full: "0 1 * * 0"}, volume: {claimName: backups}}
      - {name: repo2, path: /repo2, schedules: {full: "0 2 * * 0", incr: "0 * * * *"}}
  manual: {type: full, repoName: repo2}
"#,
    );
    assert_eq!(s.validate(), Ok(()));
    let s = spec(
        r#"
instances: {replicas: 2, storage: {size: 1Gi}}
backups:
  pgbackrest:
    repos:
      - {name: repo1, path: /var/lib/postgresql/data/repo, volume: {claimName: backups}}
      - name: repo2
        volume: {claimName: b2}
        s3: {bucket: b, endpoint: e, region: r, credentialsSecret: s}
      - {name: repo3, path: relative, volume: {claimName: " "}}
  manual: {repoName: repo4}
"#,
    );
    assert_eq!(
        fields(s.validate()),
        [
            "backups.pgbackrest.repos[0].path",
            "backups.pgbackrest.repos[1].volume",
            "backups.pgbackrest.repos[2].path",
            "backups.pgbackrest.repos[2].volume.claimName",
            "backups.manual.repoName",
        ]
    );
}
