use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};

use super::*;
use crate::crd::{PostgresClusterSpec, PvcRetention};

fn cluster(name: &str, spec_yaml: &str) -> PostgresCluster {
    let spec: PostgresClusterSpec = serde_yaml::from_str(spec_yaml).expect("spec");
    let mut pg = PostgresCluster::new(name, spec);
    pg.metadata.namespace = Some("db".to_owned());
    pg.metadata.uid = Some("11111111-2222-3333-4444-555555555555".to_owned());
    pg
}

fn minimal() -> PostgresCluster {
    cluster("pg", "instances: {replicas: 3, storage: {size: 1Gi}}")
}

fn example(file: &str) -> PostgresCluster {
    let path = repo_root().join("deploy/examples").join(file);
    let text = std::fs::read_to_string(&path).expect("example");
    let mut pg: PostgresCluster = serde_yaml::from_str(&text).expect("example parses");
    pg.metadata.namespace = Some("db".to_owned());
    pg.metadata.uid = Some("11111111-2222-3333-4444-555555555555".to_owned());
    pg
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn env_value<'a>(
    sts: &'a StatefulSet,
    name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::EnvVar> {
    sts.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
}

/// Every object a cluster is rendered into, with fixed passwords, as (file name, YAML).
fn render_all(pg: &PostgresCluster) -> Vec<(String, String)> {
    fn doc<T: serde::Serialize + kube::Resource<DynamicType = ()>>(obj: &T) -> (String, String) {
        let name = format!(
            "{}-{}.yaml",
            T::kind(&()).to_lowercase(),
            obj.meta().name.clone().unwrap_or_default()
        );
        (name, serde_yaml::to_string(obj).expect("yaml"))
    }
    let cm = configmap::configmap(pg);
    let hash = configmap::config_hash(pg);
    let mut n = 0;
    let mut out = vec![
        doc(&statefulset::statefulset(pg, &hash)),
        doc(&cm),
        doc(&services::headless(pg)),
        doc(&services::primary(pg)),
        doc(&services::replicas(pg)),
        doc(&rbac::service_account(pg)),
        doc(&rbac::role(pg)),
        doc(&rbac::role_binding(pg)),
        doc(&pdb::pdb(pg)),
    ];
    for s in secrets::secrets(pg, || {
        n += 1;
        format!("fixed-password-{n}")
    }) {
        out.push(doc(&s));
    }
    if let Some(spec) = &pg.spec.pooler {
        for read_only in pooler::wanted(pg) {
            out.push(doc(&pooler::deployment(pg, spec, read_only)));
            out.push(doc(&pooler::service(pg, read_only)));
            out.push(doc(&pooler::configmap(pg, spec, read_only)));
        }
        out.push(doc(&pooler::secret(pg, "fixed-pooler-password".to_owned())));
    }
    out
}

/// The rendered objects of each example match the golden files in `controller/tests/golden/`.
/// `PGWARDEN_UPDATE_GOLDEN=1 cargo test -p pgwarden-controller golden` rewrites them after an
/// intended change; review the diff.
#[test]
fn examples_render_to_the_golden_files() {
    let update = std::env::var_os("PGWARDEN_UPDATE_GOLDEN").is_some();
    for file in ["minimal.yaml", "production.yaml", "standby.yaml"] {
        let pg = example(file);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(file.trim_end_matches(".yaml"));
        if update {
            std::fs::create_dir_all(&dir).expect("mkdir");
        }
        for (name, yaml) in render_all(&pg) {
            let path = dir.join(&name);
            if update {
                std::fs::write(&path, &yaml).expect("write golden");
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (PGWARDEN_UPDATE_GOLDEN=1 creates it)",
                    path.display()
                )
            });
            assert_eq!(
                yaml,
                want,
                "{} differs from the golden file",
                path.display()
            );
        }
    }
}

/// What the controller sends survives a round trip through the k8s-openapi types unchanged:
/// no field we set is one the API types do not know.
#[test]
fn rendered_objects_round_trip_through_the_api_types() {
    let pg = example("production.yaml");
    let cm = configmap::configmap(&pg);
    let sts = statefulset::statefulset(&pg, &configmap::config_hash(&pg));
    let json = serde_json::to_value(&sts).expect("json");
    let back: StatefulSet = serde_json::from_value(json.clone()).expect("parse");
    assert_eq!(serde_json::to_value(&back).expect("json"), json);
    let svc = services::primary(&pg);
    let back: Service =
        serde_json::from_value(serde_json::to_value(&svc).expect("json")).expect("parse");
    assert_eq!(back, svc);
    let back: ConfigMap =
        serde_json::from_value(serde_json::to_value(&cm).expect("json")).expect("parse");
    assert_eq!(back, cm);
}

#[test]
fn every_object_is_owned_by_the_cluster_and_labelled() {
    let pg = minimal();
    let owner = owner_reference(&pg);
    assert_eq!(owner.kind, "PostgresCluster");
    assert_eq!(owner.api_version, "pgwarden.io/v1alpha1");
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.uid, "11111111-2222-3333-4444-555555555555");
    let cm = configmap::configmap(&pg);
    let metas = vec![
        statefulset::statefulset(&pg, "h").metadata,
        cm.metadata.clone(),
        services::headless(&pg).metadata,
        services::primary(&pg).metadata,
        services::replicas(&pg).metadata,
        rbac::service_account(&pg).metadata,
        rbac::role(&pg).metadata,
        rbac::role_binding(&pg).metadata,
        pdb::pdb(&pg).metadata,
    ]
    .into_iter()
    .chain(
        secrets::secrets(&pg, secrets::generate_password)
            .into_iter()
            .map(|s| s.metadata),
    );
    for meta in metas {
        assert_eq!(
            meta.owner_references.as_deref(),
            Some(&[owner.clone()][..]),
            "{:?}",
            meta.name
        );
        assert_eq!(meta.namespace.as_deref(), Some("db"));
        let labels = meta.labels.expect("labels");
        assert_eq!(labels.get(SCOPE_LABEL).map(String::as_str), Some("pg"));
        assert_eq!(
            labels.get(APPLICATION_LABEL).map(String::as_str),
            Some(APPLICATION)
        );
    }
}

#[test]
fn statefulset_runs_the_agent_with_probes_downward_api_and_a_claim_template() {
    let pg = minimal();
    let sts = statefulset::statefulset(&pg, "abc");
    let spec = sts.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.service_name, "pg-pods");
    // The controller orders restarts itself (replicas first).
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|u| u.type_.as_deref()),
        Some("OnDelete")
    );
    let template = &spec.template;
    assert_eq!(
        template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
            .map(String::as_str),
        Some("abc")
    );
    let pod = template.spec.as_ref().expect("pod");
    assert_eq!(pod.service_account_name.as_deref(), Some("pg-agent"));
    assert_eq!(pod.termination_grace_period_seconds, Some(120));
    let c = &pod.containers[0];
    assert_eq!(
        c.command.as_deref(),
        Some(
            &[
                "pgwarden-init".to_owned(),
                "--".to_owned(),
                "pgwarden".to_owned(),
                "/etc/pgwarden/$(PATRONI_NAME).yml".to_owned()
            ][..]
        )
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(
        probe_path(&c.readiness_probe).as_deref(),
        Some("/readiness")
    );
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/liveness"));
    for (var, path) in [
        ("PATRONI_NAME", "metadata.name"),
        ("PATRONI_KUBERNETES_NAMESPACE", "metadata.namespace"),
        ("PATRONI_KUBERNETES_POD_IP", "status.podIP"),
    ] {
        let env = env_value(&sts, var).expect(var);
        assert_eq!(
            env.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some(path)
        );
    }
    let su = env_value(&sts, "PATRONI_SUPERUSER_PASSWORD").expect("superuser password");
    let key = su
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("secret ref");
    assert_eq!(key.name.as_deref(), Some("pg-superuser"));
    // Default scheduling: prefer one member per node.
    let anti = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .expect("anti-affinity");
    let preferred = anti
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .expect("preferred");
    assert_eq!(
        preferred[0].pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    let claims = spec.volume_claim_templates.as_ref().expect("claims");
    let size = claims[0]
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    assert_eq!(size.map(|q| q.0.as_str()), Some("1Gi"));
}

#[test]
fn required_anti_affinity_and_explicit_affinity() {
    let pg = cluster(
        "pg",
        "instances: {replicas: 2, storage: {size: 1Gi}, antiAffinity: required}",
    );
    let sts = statefulset::statefulset(&pg, "h");
    let pod = sts.spec.and_then(|s| s.template.spec).expect("pod");
    let anti = pod
        .affinity
        .and_then(|a| a.pod_anti_affinity)
        .expect("anti");
    assert!(anti
        .required_during_scheduling_ignored_during_execution
        .is_some());
    assert!(anti
        .preferred_during_scheduling_ignored_during_execution
        .is_none());

    let pg = cluster(
        "pg",
        "instances: {replicas: 2, storage: {size: 1Gi}, antiAffinity: none}",
    );
    let pod = statefulset::statefulset(&pg, "h")
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod");
    assert!(pod.affinity.is_none());
}

#[test]
fn services_select_members_by_role_label() {
    let pg = example("production.yaml");
    let primary = services::primary(&pg).spec.expect("spec");
    assert_eq!(primary.type_.as_deref(), Some("LoadBalancer"));
    let sel = primary.selector.expect("selector");
    assert_eq!(sel.get(ROLE_LABEL).map(String::as_str), Some(ROLE_PRIMARY));
    assert_eq!(sel.get(SCOPE_LABEL).map(String::as_str), Some("orders"));
    let replicas = services::replicas(&pg).spec.expect("spec");
    assert_eq!(
        replicas
            .selector
            .expect("sel")
            .get(ROLE_LABEL)
            .map(String::as_str),
        Some(ROLE_REPLICA)
    );
    let headless = services::headless(&pg).spec.expect("spec");
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    assert!(!headless.selector.expect("sel").contains_key(ROLE_LABEL));
}

#[test]
fn agent_config_is_patroni_yaml_in_kubernetes_mode() {
    let pg = example("production.yaml");
    let names = Names::of(&pg);
    let v = agent_config::value(&names, &pg.spec);
    assert_eq!(v["scope"], "orders");
    assert!(v.get("etcd3").is_none());
    assert_eq!(v["kubernetes"]["scope_label"], SCOPE_LABEL);
    assert_eq!(v["kubernetes"]["role_label"], ROLE_LABEL);
    assert_eq!(v["kubernetes"]["labels"][APPLICATION_LABEL], APPLICATION);
    let dcs = &v["bootstrap"]["dcs"];
    assert_eq!(dcs["ttl"], 30);
    assert_eq!(dcs["synchronous_mode"], true);
    assert!(
        dcs.get("synchronous_node_count").is_none(),
        "the default is not written"
    );
    assert_eq!(dcs["maximum_lag_on_failover"], 16_777_216);
    // Quorum commit is Patroni's `synchronous_mode: quorum`.
    let mut quorum = pg.spec.clone();
    quorum.ha.quorum_commit = true;
    quorum.ha.synchronous_node_count = 2;
    let q = agent_config::value(&names, &quorum);
    assert_eq!(q["bootstrap"]["dcs"]["synchronous_mode"], "quorum");
    assert_eq!(q["bootstrap"]["dcs"]["synchronous_node_count"], 2);
    // Parameters are dynamic configuration (the DCS `config`), none in the local file.
    assert_eq!(v["postgresql"]["parameters"], serde_json::json!({}));
    let params = &dcs["postgresql"]["parameters"];
    assert_eq!(params["max_connections"], 300);
    assert_eq!(params["shared_buffers"], "2GB");
    // The agent owns archiving and the schedules (`docs/backup.md`); keys come from the env.
    assert!(params.get("archive_command").is_none());
    let backrest = &v["pgbackrest"];
    assert_eq!(backrest["stanza"], "orders");
    assert_eq!(backrest["repos"][0]["type"], "s3");
    assert_eq!(backrest["repos"][0]["s3_bucket"], "backups");
    assert_eq!(backrest["repos"][0]["retention_full"], 4);
    assert!(backrest["repos"][0].get("s3_key").is_none());
    assert_eq!(backrest["schedule"]["full"], "0 1 * * 0");
    assert_eq!(backrest["schedule"]["diff"], "0 1 * * 1-6");
    assert_eq!(v["postgresql"]["bin_dir"], "/usr/lib/postgresql/15/bin");
    assert_eq!(
        v["postgresql"]["authentication"]["superuser"]["username"],
        "postgres"
    );
    let hba: Vec<String> = serde_json::from_value(v["postgresql"]["pg_hba"].clone()).expect("hba");
    let user_line = hba
        .iter()
        .position(|l| l.starts_with("hostssl"))
        .expect("user line");
    let catch_all = hba
        .iter()
        .position(|l| l == "host all all 0.0.0.0/0 scram-sha-256")
        .expect("catch-all");
    assert!(
        user_line < catch_all,
        "the spec's lines come before the catch-all: {hba:?}"
    );
    // The rendered file parses as YAML into the same value.
    let text = agent_config::render(&names, &pg.spec, 0, None);
    let back: serde_json::Value = serde_yaml::from_str(&text).expect("yaml");
    assert_eq!(back, v);
}

#[test]
fn standby_and_restore_render_patroni_sections() {
    let pg = example("standby.yaml");
    let v = agent_config::value(&Names::of(&pg), &pg.spec);
    assert_eq!(
        v["bootstrap"]["dcs"]["standby_cluster"]["host"],
        "orders-primary.production.svc"
    );
    assert_eq!(v["bootstrap"]["dcs"]["standby_cluster"]["port"], 5432);

    let pg = cluster(
        "r",
        "instances: {replicas: 1, storage: {size: 1Gi}}\nbackups: {pgbackrest: {repos: [{name: repo1, path: /b}, {name: repo2, path: /c}]}}\nrestore: {repo: repo2, targetTime: '2026-01-01 00:00:00+00'}",
    );
    let v = agent_config::value(&Names::of(&pg), &pg.spec);
    assert_eq!(v["bootstrap"]["method"], "pgbackrest");
    let recovery = &v["bootstrap"]["pgbackrest"]["recovery_conf"];
    assert_eq!(recovery["recovery_target_time"], "2026-01-01 00:00:00+00");
    assert_eq!(recovery["recovery_target_action"], "promote");
    assert!(v["bootstrap"]["pgbackrest"].get("command").is_none());
    assert_eq!(v["pgbackrest"]["repos"][0]["path"], "/b");
    assert_eq!(v["bootstrap"]["pgbackrest"]["stanza"], "r");
    assert_eq!(v["pgbackrest"]["stanza"], "r-restored");
    assert_eq!(v["bootstrap"]["pgbackrest"]["repo"], 2);
}

#[test]
fn every_repository_renders_its_schedules_and_a_posix_volume_is_mounted_at_its_path() {
    let pg = cluster(
        "pg",
        "instances: {replicas: 2, storage: {size: 1Gi}}\nbackups: {pgbackrest: {repos: [\
         {name: repo1, path: /pgbackrest, schedules: {full: '0 1 * * 0'}, volume: {claimName: shared-backups}}, \
         {name: repo2, path: /repo2, schedules: {full: '0 2 * * 0', incr: '0 * * * *'}}, \
         {name: repo3, path: /r3, s3: {bucket: b, endpoint: e, region: r, credentialsSecret: s}}]}}",
    );
    let v = agent_config::value(&Names::of(&pg), &pg.spec);
    let backrest = &v["pgbackrest"];
    // repo1's stay in the agent's `schedule` (so existing clusters' configuration is unchanged).
    assert_eq!(
        backrest["schedule"],
        serde_json::json!({"full": "0 1 * * 0"})
    );
    assert!(backrest["repos"][0].get("schedule").is_none());
    assert_eq!(
        backrest["repos"][1]["schedule"],
        serde_json::json!({"full": "0 2 * * 0", "incr": "0 * * * *"})
    );
    assert!(backrest["repos"][2].get("schedule").is_none());

    let sts = statefulset::statefulset(&pg, "h");
    let pod = sts.spec.expect("spec").template.spec.expect("pod");
    let volumes = pod.volumes.expect("volumes");
    let repo1 = volumes
        .iter()
        .find(|v| v.name == "repo1")
        .expect("repo1's volume");
    assert_eq!(
        repo1
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()),
        Some("shared-backups")
    );
    // Only repositories that name a claim get a volume (repo2 is on the user's own volume or
    // none, repo3 is S3).
    assert_eq!(volumes.len(), 2, "{volumes:?}");
    let mounts = pod.containers[0].volume_mounts.clone().expect("mounts");
    let mount = mounts
        .iter()
        .find(|m| m.name == "repo1")
        .expect("repo1 is mounted");
    assert_eq!(mount.mount_path, "/pgbackrest");
    assert_eq!(mount.read_only, None);
    assert_eq!(mounts.len(), 3, "{mounts:?}");
    // A cluster without a repository volume renders the Pod as before.
    let plain = statefulset::statefulset(&minimal(), "h");
    let plain_pod = plain.spec.expect("spec").template.spec.expect("pod");
    assert_eq!(plain_pod.volumes.map(|v| v.len()), Some(1));
}

#[test]
fn a_parameter_change_keeps_the_config_hash_other_changes_do_not() {
    let a = minimal();
    let mut b = minimal();
    b.spec.postgresql.parameters.insert(
        "work_mem".to_owned(),
        crate::crd::ParamValue::Text("8MB".to_owned()),
    );
    let ha = configmap::config_hash(&a);
    let hb = configmap::config_hash(&b);
    // Parameters reach the members through the DCS `config`, not by rolling the Pods.
    assert_eq!(ha, hb);
    let mut ttl = minimal();
    ttl.spec.ha.ttl += 1;
    assert_ne!(ha, configmap::config_hash(&ttl));
    assert_eq!(ha, configmap::config_hash(&minimal()), "stable");
    // Changes that do not touch the running members keep the hash: the retention policy,
    // and scaling (a new member gets its own file).
    let mut c = minimal();
    c.spec.pvc_retention = PvcRetention::Delete;
    c.spec.instances.replicas = 5;
    assert_eq!(ha, configmap::config_hash(&c));
    let mut d = minimal();
    d.spec.instances.failover_priority.insert("1".to_owned(), 0);
    assert_ne!(ha, configmap::config_hash(&d));
    // spec.standby is applied through the DCS `config` too: a promotion restarts nothing.
    let standby = example("standby.yaml");
    let mut promoted = standby.clone();
    promoted.spec.standby = None;
    assert_eq!(
        configmap::config_hash(&standby),
        configmap::config_hash(&promoted)
    );
}

#[test]
fn secrets_hold_generated_credentials_for_agents_and_users() {
    let pg = example("production.yaml");
    let all: Vec<Secret> = secrets::secrets(&pg, secrets::generate_password);
    let names: Vec<String> = all
        .iter()
        .map(|s| s.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        [
            "orders-superuser",
            "orders-replication",
            "orders-restapi",
            "orders-user-orders-app",
            "orders-user-orders-admin"
        ]
    );
    let passwords: std::collections::BTreeSet<String> = all
        .iter()
        .map(|s| {
            s.string_data
                .as_ref()
                .and_then(|d| d.get("password"))
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(passwords.len(), all.len(), "every password differs");
    assert!(passwords
        .iter()
        .all(|p| p.len() == 32 && p.chars().all(|c| c.is_ascii_alphanumeric())));
}

#[test]
fn agent_role_is_exactly_leases_pods_configmaps() {
    let role = rbac::role(&minimal());
    let rules = role.rules.expect("rules");
    let resources: Vec<&str> = rules
        .iter()
        .flat_map(|r| r.resources.iter().flatten())
        .map(String::as_str)
        .collect();
    assert_eq!(resources, ["leases", "pods", "configmaps"]);
    assert!(!rules.iter().any(|r| r.verbs.iter().any(|v| v == "*")));
    let binding = rbac::role_binding(&minimal());
    assert_eq!(binding.role_ref.name, "pg-agent");
    assert_eq!(
        binding.subjects.expect("subjects")[0].namespace.as_deref(),
        Some("db")
    );
}

#[test]
fn pdb_allows_one_member_down() {
    let pdb = pdb::pdb(&minimal());
    let spec = pdb.spec.expect("spec");
    assert_eq!(
        spec.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(
        spec.selector.and_then(|s| s.match_labels),
        Some(selector_labels(&Names::of(&minimal())))
    );
}

#[test]
fn each_member_gets_its_own_file_with_its_failover_priority() {
    let pg = cluster(
        "pg",
        "instances: {replicas: 3, storage: {size: 1Gi}, failoverPriority: {'1': 0, '2': 5}}",
    );
    let cm = configmap::configmap(&pg);
    let data = cm.data.expect("data");
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, ["pg-0.yml", "pg-1.yml", "pg-2.yml"]);
    let tags = |file: &str| {
        serde_yaml::from_str::<serde_json::Value>(&data[file]).expect("yaml")["tags"].clone()
    };
    assert_eq!(tags("pg-0.yml"), serde_json::Value::Null);
    assert_eq!(
        tags("pg-1.yml"),
        serde_json::json!({"failover_priority": 0, "nofailover": true})
    );
    assert_eq!(
        tags("pg-2.yml"),
        serde_json::json!({"failover_priority": 5, "nofailover": false})
    );
}

#[test]
fn the_pooler_is_pgbouncer_in_front_of_the_primary_and_the_replicas_services() {
    let pg = cluster(
        "pg",
        "instances: {replicas: 3, storage: {size: 1Gi}}
pooler:
  replicas: 2
  poolMode: transaction
  defaultPoolSize: 15
  maxClientConn: 300
  readOnly: true
  resources: {limits: {memory: 64Mi}}",
    );
    let spec = pg.spec.pooler.clone().expect("pooler");
    assert_eq!(pooler::wanted(&pg), vec![false, true]);
    let names = Names::of(&pg);

    // pgbouncer.ini: every database on the role's Service, auth through auth_query.
    let ini = pooler::ini(&pg, &spec, false);
    for line in [
        "* = host=pg-primary.db.svc port=5432",
        "listen_port = 5432",
        "auth_type = md5",
        "auth_file = /etc/pgbouncer/userlist.txt",
        "auth_user = pgbouncer",
        "auth_query = SELECT * FROM pgbouncer.get_auth($1)",
        "pool_mode = transaction",
        "default_pool_size = 15",
        "max_client_conn = 300",
    ] {
        assert!(ini.lines().any(|l| l == line), "{line:?} not in\n{ini}");
    }
    assert!(ini.contains(
        "server_check_query = SELECT CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN 1"
    ));
    let ro = pooler::ini(&pg, &spec, true);
    assert!(
        ro.contains("server_check_query = SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN 1")
    );
    assert!(ro.lines().any(|l| l == "server_lifetime = 300"));
    // A standby cluster's leader is in recovery: its pooler checks for that.
    let mut standby = pg.clone();
    standby.spec.standby = serde_yaml::from_str("{host: source-primary}").expect("standby");
    assert_eq!(
        pooler::ini(&standby, &spec, false),
        ini.replace(
            "WHEN NOT pg_catalog.pg_is_in_recovery()",
            "WHEN pg_catalog.pg_is_in_recovery()"
        )
    );
    assert!(
        ro.lines()
            .any(|l| l == "* = host=pg-replicas.db.svc port=5432"),
        "{ro}"
    );

    for (read_only, name, upstream) in [
        (false, "pg-pooler", "pg-primary"),
        (true, "pg-pooler-ro", "pg-replicas"),
    ] {
        let cm = pooler::configmap(&pg, &spec, read_only);
        assert_eq!(cm.metadata.name.as_deref(), Some(name));
        assert!(cm.data.as_ref().expect("data")["pgbouncer.ini"].contains(upstream));

        let d = pooler::deployment(&pg, &spec, read_only);
        assert_eq!(d.metadata.name.as_deref(), Some(name));
        let dspec = d.spec.as_ref().expect("spec");
        assert_eq!(dspec.replicas, Some(2));
        let selector = dspec.selector.match_labels.clone().expect("selector");
        assert_eq!(
            selector,
            std::collections::BTreeMap::from([(pooler::POOLER_LABEL.to_owned(), name.to_owned())])
        );
        let labels = dspec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("labels");
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        // The member Services, the PDB and the agents select members by these labels: a
        // pooler Pod must not carry them.
        assert!(
            !selector_labels(&names)
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v)),
            "pooler Pods would be taken for members: {labels:?}"
        );
        let pod = dspec.template.spec.as_ref().expect("pod");
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some(pg.spec.image.as_str()));
        assert_eq!(
            c.command.clone().expect("command"),
            vec![
                "pgwarden-init",
                "--reload-on-change",
                "/etc/pgbouncer/pgbouncer.ini",
                "--reload-on-change",
                "/etc/pgbouncer/userlist.txt",
                "--",
                "pgbouncer",
                "/etc/pgbouncer/pgbouncer.ini"
            ]
        );
        assert_eq!(c.resources, spec.resources);
        assert!(c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.tcp_socket.as_ref())
            .is_some());
        let sources = pod.volumes.as_ref().expect("volumes")[0]
            .projected
            .as_ref()
            .and_then(|p| p.sources.clone())
            .expect("projected");
        assert_eq!(
            sources[0]
                .config_map
                .as_ref()
                .and_then(|c| c.name.as_deref()),
            Some(name)
        );
        assert_eq!(
            sources[1].secret.as_ref().and_then(|s| s.name.as_deref()),
            Some("pg-pooler-auth")
        );
        assert_eq!(
            c.volume_mounts.as_ref().expect("mounts")[0].mount_path,
            "/etc/pgbouncer"
        );

        let svc = pooler::service(&pg, read_only);
        let sspec = svc.spec.as_ref().expect("spec");
        assert_eq!(sspec.selector.as_ref(), Some(&selector));
        let port = &sspec.ports.as_ref().expect("ports")[0];
        assert_eq!(port.port, 5432);

        for meta in [&cm.metadata, &d.metadata, &svc.metadata] {
            assert_eq!(
                meta.owner_references.as_deref(),
                Some(&[owner_reference(&pg)][..])
            );
        }
    }

    let secret = pooler::secret(&pg, "pw".to_owned());
    assert_eq!(secret.metadata.name.as_deref(), Some("pg-pooler-auth"));
    let data = secret.string_data.expect("data");
    assert_eq!(data["username"], "pgbouncer");
    assert_eq!(data["password"], "pw");
    assert_eq!(data["userlist.txt"], "\"pgbouncer\" \"pw\"\n");

    // An image of its own; no read-only pooler; no pooler at all.
    let pg = cluster(
        "pg",
        "instances: {replicas: 1, storage: {size: 1Gi}}\npooler: {image: example/pgbouncer:1}",
    );
    let spec = pg.spec.pooler.clone().expect("pooler");
    assert_eq!(pooler::wanted(&pg), vec![false]);
    assert_eq!(spec.pool_mode, crate::crd::PoolMode::Session);
    let d = pooler::deployment(&pg, &spec, false);
    assert_eq!(
        d.spec.expect("spec").template.spec.expect("pod").containers[0]
            .image
            .as_deref(),
        Some("example/pgbouncer:1")
    );
    assert!(pooler::wanted(&minimal()).is_empty());
}

/// A cluster rendered for an upgrade from 15 (`crate::upgrade`): the StatefulSet records it,
/// the Pods get an `upgrade` init container with the agent's own configuration, environment
/// and volumes, and the agent both versions' binaries, by major version (numbers as keys).
#[test]
fn a_cluster_made_for_an_upgrade_has_both_binaries_and_the_upgrade_init_container() {
    let pg = crate::upgrade::Rendering {
        version: 17,
        upgrade_to: None,
        upgraded_from: Some(15),
        replicas: None,
    }
    .apply_to(&minimal());
    let sts = statefulset::statefulset(&pg, "h");
    let annotations = sts.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("pgwarden.io/postgres-version")
            .map(String::as_str),
        Some("17")
    );
    assert_eq!(
        annotations
            .get("pgwarden.io/upgraded-from")
            .map(String::as_str),
        Some("15")
    );
    let pod = sts.spec.and_then(|s| s.template.spec).expect("pod");
    let init = pod.init_containers.expect("init containers");
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].name, "upgrade");
    assert_eq!(
        init[0].command.as_deref(),
        Some(
            &[
                "pgwarden".to_owned(),
                "upgrade-data-dir".to_owned(),
                "--if-needed".to_owned(),
                "/etc/pgwarden/$(PATRONI_NAME).yml".to_owned()
            ][..]
        )
    );
    assert_eq!(init[0].env, pod.containers[0].env);
    assert_eq!(init[0].volume_mounts, pod.containers[0].volume_mounts);
    assert!(init[0].readiness_probe.is_none() && init[0].liveness_probe.is_none());

    let cm = configmap::configmap(&pg);
    let text = cm
        .data
        .expect("data")
        .into_values()
        .next()
        .expect("a member file");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let dirs = &yaml["postgresql"]["bin_dirs"];
    assert_eq!(
        dirs[serde_yaml::Value::from(15u64)].as_str(),
        Some("/usr/lib/postgresql/15/bin")
    );
    assert_eq!(
        dirs[serde_yaml::Value::from(17u64)].as_str(),
        Some("/usr/lib/postgresql/17/bin")
    );
    assert_eq!(
        yaml["postgresql"]["bin_dir"].as_str(),
        Some("/usr/lib/postgresql/17/bin")
    );
    // The hash covers it: the template of the upgrade differs from a plain 17 one.
    let plain = crate::upgrade::Rendering {
        version: 17,
        upgrade_to: None,
        upgraded_from: None,
        replicas: None,
    }
    .apply_to(&minimal());
    assert_ne!(configmap::config_hash(&pg), configmap::config_hash(&plain));
    assert!(statefulset::statefulset(&plain, "h")
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod")
        .init_containers
        .is_none());
}
