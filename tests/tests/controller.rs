//! The controller against a real kube-apiserver v1.20 and kube-controller-manager (shared by
//! the tests of this file, one namespace each): the CRD from `deploy/crd.yaml`, the controller as
//! a `pgwarden-controller` process authorized by exactly the ClusterRole of
//! `deploy/controller.yaml`, clusters applied as `kubectl apply --server-side` would, the
//! StatefulSet controller creating the Pods, and the harness playing the kubelet
//! (`harness::operator::PodKubelet`: one real agent per Pod, from the Pod's own spec).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1beta1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ApiResource, DeleteParams, PostParams};
use kube::{Resource, ResourceExt};
use pgwarden_controller::crd::PostgresCluster;
use pgwarden_controller::render::FIELD_MANAGER;
use pgwarden_tests::harness::kube::{KubeAccess, KubeCluster};
use pgwarden_tests::harness::operator::{
    apply_manifest, bind_controller_role, install_crd, yaml_documents, ControllerProcess,
    EventKind, PodKubelet,
};
use pgwarden_tests::harness::pooler::PoolerKubelet;
use pgwarden_tests::harness::wait_until;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

struct Setup {
    access: KubeAccess,
    ns: String,
    admin: kube::Client,
    dir: tempfile::TempDir,
}

async fn setup(prefix: &str) -> Setup {
    let access = KubeCluster::shared();
    install_crd(&access).await.expect("install the CRD");
    let ns = access.create_namespace(prefix).await.expect("namespace");
    bind_controller_role(&access, &ns)
        .await
        .expect("bind the controller's ClusterRole");
    let admin = access.admin_client().await.expect("admin client");
    let dir = tempfile::Builder::new()
        .prefix("pgw-ctl")
        .tempdir()
        .expect("tempdir");
    Setup {
        access,
        ns,
        admin,
        dir,
    }
}

impl Setup {
    fn controller(&self, identity: &str) -> ControllerProcess {
        ControllerProcess::start(&self.access, &self.ns, self.dir.path(), identity)
            .expect("start pgwarden-controller")
    }

    fn clusters(&self) -> Api<PostgresCluster> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    async fn apply(&self, manifest: &Value) -> Result<(), kube::Error> {
        apply_manifest(&self.admin, &self.ns, &pgc_resource(), manifest)
            .await
            .map(|_| ())
    }

    async fn cluster(&self, name: &str) -> PostgresCluster {
        self.clusters().get(name).await.expect("read the cluster")
    }
}

fn pgc_resource() -> ApiResource {
    ApiResource::erase::<PostgresCluster>(&())
}

/// `deploy/examples/minimal.yaml` as JSON, renamed and edited.
fn example(name: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let doc = yaml_documents("deploy/examples/minimal.yaml")
        .expect("read the example")
        .into_iter()
        .next()
        .expect("one document");
    let mut v: Value = serde_json::to_value(doc).expect("YAML as JSON");
    v["metadata"]["name"] = json!(name);
    edit(&mut v);
    v
}

fn condition<'a>(
    pg: &'a PostgresCluster,
    kind: &str,
) -> Option<&'a pgwarden_controller::crd::Condition> {
    pg.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.kind == kind)
}

fn owned_by(refs: &[OwnerReference], pg: &PostgresCluster) -> bool {
    refs.iter().any(|r| {
        r.kind == "PostgresCluster"
            && r.api_version == "pgwarden.io/v1alpha1"
            && Some(&r.uid) == pg.uid().as_ref()
            && r.controller == Some(true)
    })
}

async fn exists<K>(api: &Api<K>, name: &str) -> bool
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    matches!(api.get_opt(name).await, Ok(Some(_)))
}

async fn secret_password(s: &Setup, name: &str) -> Option<String> {
    let secret = s.api::<Secret>().get_opt(name).await.ok().flatten()?;
    let data = secret.data?;
    Some(String::from_utf8_lossy(&data.get("password")?.0).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_clusters_are_refused_by_the_schema_or_reported_and_the_controller_keeps_working()
{
    let s = setup("pgc-bad").await;
    let mut ctl = s.controller("ctl-bad");

    // The API server's validation, from the schema generated out of the Rust types.
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "a storage size that is no quantity",
            example("bad-size", |v| {
                v["spec"]["instances"]["storage"]["size"] = json!("ten gigs")
            }),
            "spec.instances.storage.size",
        ),
        (
            "negative replicas",
            example("bad-replicas", |v| {
                v["spec"]["instances"]["replicas"] = json!(-1)
            }),
            "spec.instances.replicas",
        ),
        (
            "a list as a parameter value",
            example("bad-param", |v| {
                v["spec"]["postgresql"] = json!({"parameters": {"shared_buffers": [1, 2]}})
            }),
            "spec.postgresql.parameters.shared_buffers",
        ),
        (
            "a boolean as a parameter value",
            example("bad-bool", |v| {
                v["spec"]["postgresql"] = json!({"parameters": {"fsync": true}})
            }),
            "spec.postgresql.parameters.fsync",
        ),
        (
            "a ttl below the minimum",
            example("bad-ttl", |v| v["spec"]["ha"] = json!({"ttl": 1})),
            "spec.ha.ttl",
        ),
    ];
    for (what, manifest, field) in &cases {
        match s.apply(manifest).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{what}: {e:?}");
                assert!(e.message.contains(field), "{what}: {}", e.message);
            }
            other => panic!("{what} must be refused by the schema, got {other:?}"),
        }
    }

    // Valid for the schema, not for the controller: reported, nothing created.
    let invalid = example("odd", |v| {
        v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 5, "retryTimeout": 5});
        v["spec"]["postgresql"] = json!({"parameters": {"port": 5433, "work_mem": "8MB"}});
    });
    s.apply(&invalid).await.expect("the schema accepts it");
    wait_until("the invalid spec is reported", T, || async {
        let pg = s.cluster("odd").await;
        condition(&pg, "Degraded").is_some_and(|c| {
            c.status == "True"
                && c.reason == "InvalidSpec"
                && c.message.contains("spec.ha")
                && c.message.contains("spec.postgresql.parameters.port")
        }) && condition(&pg, "Ready").is_some_and(|c| c.reason == "InvalidSpec")
    })
    .await;
    assert!(
        !exists(&s.api::<StatefulSet>(), "odd").await,
        "nothing is created from an invalid spec"
    );
    assert!(!exists(&s.api::<ConfigMap>(), "odd-agent").await);
    assert!(ctl.process.is_running(), "the controller survives");

    // Fixed, the same cluster is reconciled.
    let fixed = example("odd", |v| {
        v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
        v["spec"]["postgresql"] = json!({"parameters": {"work_mem": "8MB"}});
    });
    s.apply(&fixed).await.expect("apply the fixed spec");
    wait_until("the fixed cluster gets its StatefulSet", T, || async {
        exists(&s.api::<StatefulSet>(), "odd").await
    })
    .await;
    let cleared = || async {
        let pg = s.cluster("odd").await;
        let generation = pg.metadata.generation;
        pg.status.as_ref().and_then(|st| st.observed_generation) == generation
            && condition(&pg, "Degraded").is_some_and(|c| c.reason != "InvalidSpec")
    };
    wait_until("the condition clears", T, &cleared).await;
    assert!(ctl.process.is_running(), "the controller survives");

    // A raised major version is an upgrade (`upgrade.rs`); without running members it waits
    // (`Pending`) and nothing is changed: the StatefulSet and ConfigMap stay on 15.
    let with_version = |version: u32| {
        example("odd", |v| {
            v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
            v["spec"]["postgresql"] = json!({"parameters": {"work_mem": "8MB"}});
            v["spec"]["postgresVersion"] = json!(version);
        })
    };
    s.apply(&with_version(16))
        .await
        .expect("the schema accepts it");
    wait_until("the upgrade waits for a leader", T, || async {
        let pg = s.cluster("odd").await;
        pg.status
            .as_ref()
            .and_then(|st| st.upgrade.as_ref())
            .is_some_and(|u| u.phase == "Pending" && u.to == 16 && u.message.contains("no leader"))
            && condition(&pg, "Progressing").is_some_and(|c| c.reason == "Upgrading")
    })
    .await;
    let unchanged = || async {
        let sts = s.api::<StatefulSet>().get("odd").await.expect("sts");
        let cm = s.api::<ConfigMap>().get("odd-agent").await.expect("cm");
        sts.annotations()
            .get("pgwarden.io/postgres-version")
            .map(String::as_str)
            == Some("15")
            && !sts.annotations().contains_key("pgwarden.io/upgrade-to")
            && cm
                .data
                .unwrap_or_default()
                .values()
                .all(|y| !y.contains("postgresql/16"))
    };
    assert!(unchanged().await, "nothing changed while pending");
    // A lowered one is refused, naming the version to set back.
    s.apply(&with_version(14))
        .await
        .expect("the schema accepts it");
    wait_until("the lowered version is refused", T, || async {
        let pg = s.cluster("odd").await;
        condition(&pg, "Degraded").is_some_and(|c| {
            c.reason == "InvalidSpec"
                && c.message.contains("spec.postgresVersion")
                && c.message.contains("set back to 15")
        })
    })
    .await;
    assert!(unchanged().await, "nothing changed when refused");
    s.apply(&fixed).await.expect("set the version back");
    wait_until("the condition clears again", T, &cleared).await;
    wait_until("the pending upgrade is reported cancelled", T, || async {
        let pg = s.cluster("odd").await;
        pg.status
            .and_then(|st| st.upgrade)
            .is_some_and(|u| u.phase == "Cancelled")
    })
    .await;
    assert_eq!(ctl.stop().map(|st| st.success()), Some(true), "clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_creates_owned_objects_updates_them_keeps_secrets_and_deletion_keeps_the_pvcs() {
    let s = setup("pgc-objects").await;
    // A Secret that exists before the cluster: used as is, never overwritten or adopted.
    let kept: Secret = serde_json::from_value(json!({
        "metadata": {"name": "minimal-superuser"},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": "postgres", "password": "kept-password"},
    }))
    .expect("secret");
    s.api::<Secret>()
        .create(&PostParams::default(), &kept)
        .await
        .expect("create the existing secret");
    let _ctl = s.controller("ctl-objects");

    s.apply(&example("minimal", |_| {}))
        .await
        .expect("kubectl apply of the minimal example");
    wait_until("the StatefulSet and its PDB exist", T, || async {
        exists(&s.api::<StatefulSet>(), "minimal").await
            && exists(&s.api::<PodDisruptionBudget>(), "minimal").await
    })
    .await;
    let pg = s.cluster("minimal").await;

    // Every child carries an owner reference to the cluster.
    let mut owners: Vec<(String, Vec<OwnerReference>)> = Vec::new();
    let meta = |kind: &str, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (
            format!("{kind} {}", m.name.clone().unwrap_or_default()),
            m.owner_references.clone().unwrap_or_default(),
        )
    };
    let sts = s.api::<StatefulSet>().get("minimal").await.expect("sts");
    owners.push(meta("StatefulSet", &sts.metadata));
    for name in ["minimal-pods", "minimal-primary", "minimal-replicas"] {
        let svc = s.api::<Service>().get(name).await.expect(name);
        owners.push(meta("Service", &svc.metadata));
    }
    let cm = s.api::<ConfigMap>().get("minimal-agent").await.expect("cm");
    owners.push(meta("ConfigMap", &cm.metadata));
    for name in ["minimal-replication", "minimal-restapi"] {
        let secret = s.api::<Secret>().get(name).await.expect(name);
        owners.push(meta("Secret", &secret.metadata));
    }
    let sa = s
        .api::<ServiceAccount>()
        .get("minimal-agent")
        .await
        .expect("sa");
    owners.push(meta("ServiceAccount", &sa.metadata));
    let role = s.api::<Role>().get("minimal-agent").await.expect("role");
    owners.push(meta("Role", &role.metadata));
    let rb = s
        .api::<RoleBinding>()
        .get("minimal-agent")
        .await
        .expect("rb");
    owners.push(meta("RoleBinding", &rb.metadata));
    let pdb = s
        .api::<PodDisruptionBudget>()
        .get("minimal")
        .await
        .expect("pdb");
    owners.push(meta("PodDisruptionBudget", &pdb.metadata));
    for (what, refs) in &owners {
        assert!(
            owned_by(refs, &pg),
            "{what} is owned by the cluster: {refs:?}"
        );
    }

    // The agents' Role is exactly deploy/agent-rbac.yaml's.
    let deployed = yaml_documents("deploy/agent-rbac.yaml")
        .expect("agent rbac")
        .into_iter()
        .find(|d| d.get("kind").and_then(|k| k.as_str()) == Some("Role"))
        .expect("a Role");
    let deployed: Role = serde_yaml::from_value(deployed).expect("role");
    assert_eq!(role.rules, deployed.rules);

    // The existing Secret is untouched; the generated ones have 32-character passwords.
    let superuser = s
        .api::<Secret>()
        .get("minimal-superuser")
        .await
        .expect("su");
    assert_eq!(
        secret_password(&s, "minimal-superuser").await.as_deref(),
        Some("kept-password")
    );
    assert!(superuser.owner_references().is_empty(), "not adopted");
    let replication = secret_password(&s, "minimal-replication")
        .await
        .expect("pw");
    assert_eq!(replication.len(), 32);

    // The StatefulSet controller creates a PVC and a Pod per member.
    wait_until("three PVCs and three Pods exist", T, || async {
        let pvcs = s
            .api::<PersistentVolumeClaim>()
            .list(&Default::default())
            .await;
        let pods = s.api::<Pod>().list(&Default::default()).await;
        pvcs.is_ok_and(|l| l.items.len() == 3) && pods.is_ok_and(|l| l.items.len() == 3)
    })
    .await;
    wait_until("the status describes the generation", T, || async {
        let pg = s.cluster("minimal").await;
        pg.status.as_ref().and_then(|st| st.observed_generation) == pg.metadata.generation
            && condition(&pg, "Ready").is_some_and(|c| c.status == "False")
    })
    .await;

    // A reconcile that changes nothing of the StatefulSet leaves it alone: the 1.20 apiserver
    // writes a new version for every apply of a StatefulSet, even an unchanged one, and the
    // controller's watch of it would wake the next reconcile, forever.
    let ours_applied_at = |sts: &StatefulSet| {
        sts.metadata
            .managed_fields
            .iter()
            .flatten()
            .find(|f| f.manager.as_deref() == Some(FIELD_MANAGER))
            .and_then(|f| f.time.clone())
            .map(|t| t.0)
    };
    let before = s.api::<StatefulSet>().get("minimal").await.expect("sts");
    for reload_only in [false, true] {
        // managedFields times have a resolution of a second: an apply now would show.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        s.apply(&example("minimal", |v| {
            v["spec"]["services"] = json!({"primary": {"type": "NodePort"}});
            if reload_only {
                v["spec"]["postgresql"] = json!({"parameters": {"work_mem": "8MB"}});
            }
        }))
        .await
        .expect("apply a change the StatefulSet does not show");
        wait_until("the status describes the new generation", T, || async {
            let pg = s.cluster("minimal").await;
            pg.status.as_ref().and_then(|st| st.observed_generation) == pg.metadata.generation
        })
        .await;
    }
    wait_until("the primary Service became a NodePort", T, || async {
        let svc = s.api::<Service>().get("minimal-primary").await;
        svc.is_ok_and(|svc| svc.spec.and_then(|sp| sp.type_).as_deref() == Some("NodePort"))
    })
    .await;
    let after = s.api::<StatefulSet>().get("minimal").await.expect("sts");
    assert!(
        ours_applied_at(&before).is_some(),
        "the controller applied it"
    );
    assert_eq!(
        ours_applied_at(&after),
        ours_applied_at(&before),
        "reconciles that change nothing of the StatefulSet do not apply it"
    );
    assert_eq!(after.metadata.generation, before.metadata.generation);

    // A spec change updates the objects (and makes a new Pod template).
    let hash_of = |sts: &StatefulSet| {
        sts.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("pgwarden.io/config-hash").cloned())
    };
    let old_hash = hash_of(&sts).expect("a config hash");
    s.apply(&example("minimal", |v| {
        v["spec"]["services"] = json!({"primary": {"type": "NodePort"}});
        v["spec"]["postgresql"] = json!({"parameters": {"work_mem": "8MB"}});
        v["spec"]["ha"] = json!({"ttl": 31});
    }))
    .await
    .expect("apply the change");
    wait_until(
        "the change reaches the Service, ConfigMap and StatefulSet",
        T,
        || async {
            let svc = s.api::<Service>().get("minimal-primary").await;
            let cm = s.api::<ConfigMap>().get("minimal-agent").await;
            let sts = s.api::<StatefulSet>().get("minimal").await;
            svc.is_ok_and(|svc| svc.spec.and_then(|sp| sp.type_).as_deref() == Some("NodePort"))
                && cm.is_ok_and(|cm| {
                    cm.data
                        .and_then(|d| d.get("minimal-0.yml").cloned())
                        .is_some_and(|y| y.contains("work_mem: 8MB"))
                })
                && sts.is_ok_and(|sts| hash_of(&sts).is_some_and(|h| h != old_hash))
        },
    )
    .await;
    assert_eq!(
        secret_password(&s, "minimal-replication").await.as_deref(),
        Some(replication.as_str()),
        "a generated password is never replaced"
    );
    // A hand edit of a field the controller sets is taken back (forced server-side apply).
    s.api::<Service>()
        .patch(
            "minimal-primary",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&json!({"spec": {"selector": {"role": "replica"}}})),
        )
        .await
        .expect("edit the selector");
    wait_until(
        "the controller restores the primary Service's selector",
        T,
        || async {
            let svc = s.api::<Service>().get("minimal-primary").await;
            svc.is_ok_and(|svc| {
                svc.spec
                    .and_then(|sp| sp.selector)
                    .and_then(|sel| sel.get("role").cloned())
                    .as_deref()
                    == Some("primary")
            })
        },
    )
    .await;
    assert_eq!(
        secret_password(&s, "minimal-superuser").await.as_deref(),
        Some("kept-password")
    );

    // A cluster whose PVCs go with it.
    s.apply(&example("scratch", |v| {
        v["spec"]["instances"]["replicas"] = json!(1);
        v["spec"]["pvcRetention"] = json!("Delete");
    }))
    .await
    .expect("apply scratch");
    wait_until("scratch has its finalizer and PVC", T, || async {
        let pg = s.cluster("scratch").await;
        pg.finalizers()
            .iter()
            .any(|f| f == "pgwarden.io/delete-pvcs")
            && exists(&s.api::<PersistentVolumeClaim>(), "data-scratch-0").await
    })
    .await;

    // Deleting: the garbage collector removes the children, the PVCs stay.
    s.clusters()
        .delete("minimal", &DeleteParams::default())
        .await
        .expect("delete minimal");
    wait_until(
        "the garbage collector removed minimal's objects",
        T,
        || async {
            !exists(&s.api::<StatefulSet>(), "minimal").await
                && !exists(&s.api::<Service>(), "minimal-primary").await
                && !exists(&s.api::<Service>(), "minimal-pods").await
                && !exists(&s.api::<Service>(), "minimal-replicas").await
                && !exists(&s.api::<ConfigMap>(), "minimal-agent").await
                && !exists(&s.api::<Secret>(), "minimal-replication").await
                && !exists(&s.api::<Secret>(), "minimal-restapi").await
                && !exists(&s.api::<ServiceAccount>(), "minimal-agent").await
                && !exists(&s.api::<Role>(), "minimal-agent").await
                && !exists(&s.api::<RoleBinding>(), "minimal-agent").await
                && !exists(&s.api::<PodDisruptionBudget>(), "minimal").await
        },
    )
    .await;
    wait_until("minimal's Pods are gone", T, || async {
        let pods = s.api::<Pod>().list(&Default::default()).await;
        pods.is_ok_and(|l| {
            l.items
                .iter()
                .all(|p| !p.name_any().starts_with("minimal-"))
        })
    })
    .await;
    for i in 0..3 {
        let pvc = s
            .api::<PersistentVolumeClaim>()
            .get(&format!("data-minimal-{i}"))
            .await
            .expect("the PVC is kept");
        assert!(
            pvc.metadata.deletion_timestamp.is_none(),
            "not being deleted"
        );
    }
    assert_eq!(
        secret_password(&s, "minimal-superuser").await.as_deref(),
        Some("kept-password"),
        "a Secret the cluster does not own stays"
    );

    s.clusters()
        .delete("scratch", &DeleteParams::default())
        .await
        .expect("delete scratch");
    wait_until("scratch is gone and so is its PVC", T, || async {
        let pvc = s
            .api::<PersistentVolumeClaim>()
            .get_opt("data-scratch-0")
            .await;
        // Without the pvc-protection controller a deleted PVC stays Terminating.
        !exists(&s.clusters(), "scratch").await
            && pvc.is_ok_and(|p| p.is_none_or(|p| p.metadata.deletion_timestamp.is_some()))
    })
    .await;
}

/// Shared by the last scenario: the state of the Pods and the cluster.
async fn pod_uids(s: &Setup) -> BTreeMap<String, String> {
    s.api::<Pod>()
        .list(&Default::default())
        .await
        .expect("pods")
        .items
        .into_iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect()
}

async fn endpoint_pods(s: &Setup, service: &str) -> Vec<String> {
    let Ok(Some(ep)) = s.api::<Endpoints>().get_opt(service).await else {
        return Vec::new();
    };
    let mut pods: Vec<String> = ep
        .subsets
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| s.addresses.unwrap_or_default())
        .filter_map(|a| a.target_ref.and_then(|r| r.name))
        .collect();
    pods.sort();
    pods
}

/// The cluster is whole: the status names `primary` (if given, else anyone) with every member
/// ready and Ready=True.
async fn wait_until_whole(s: &Setup, name: &str, primary: Option<&str>) -> String {
    wait_until_members_ready(s, name, primary, 3).await
}

/// `name`'s status names a primary (`primary` when given) and `members` ready running members.
async fn wait_until_members_ready(
    s: &Setup,
    name: &str,
    primary: Option<&str>,
    members: usize,
) -> String {
    let found = std::sync::Mutex::new(String::new());
    wait_until(
        &format!("{name} is whole with primary {primary:?}"),
        Duration::from_secs(180),
        || async {
            let pg = s.cluster(name).await;
            let Some(st) = pg.status.as_ref() else {
                return false;
            };
            let Some(p) = st.primary.clone() else {
                return false;
            };
            let ok = primary.is_none_or(|want| want == p)
                && usize::try_from(st.ready_members) == Ok(members)
                && st.members.len() == members
                && st
                    .members
                    .iter()
                    .all(|m| m.ready && m.state == "running" && m.timeline.is_some())
                && st
                    .members
                    .iter()
                    .filter(|m| m.role == "primary" || m.role == "master")
                    .map(|m| m.name.clone())
                    .collect::<Vec<_>>()
                    == vec![p.clone()]
                && condition(&pg, "Ready").is_some_and(|c| c.status == "True");
            if ok {
                *found.lock().unwrap_or_else(|e| e.into_inner()) = p;
            }
            ok
        },
    )
    .await;
    found.into_inner().unwrap_or_else(|e| e.into_inner())
}

async fn lease_holder(s: &Setup, cluster: &str) -> Option<String> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(s.admin.clone(), &s.ns)
        .get_opt(&format!("{cluster}-leader"))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|sp| sp.holder_identity)
        .filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_comes_up_fails_over_without_the_controller_and_rolls_out_replicas_first() {
    let s = setup("pgc-ha").await;
    let kubelet = PodKubelet::start(s.access.clone(), &s.ns, "ha")
        .await
        .expect("kubelet");
    let mut ctl = s.controller("ctl-ha");
    s.apply(&example("ha", |v| {
        v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
        v["spec"]["users"] = json!([{"name": "app", "options": ["CREATEDB"]}]);
        v["spec"]["databases"] = json!([{"name": "appdb", "owner": "app"}]);
    }))
    .await
    .expect("apply the cluster");

    // The whole cluster comes up from the StatefulSet's Pods.
    let first = wait_until_whole(&s, "ha", None).await;
    wait_until(
        "the Services select the primary and the replicas",
        T,
        || async {
            let mut replicas: Vec<String> = (0..3)
                .map(|i| format!("ha-{i}"))
                .filter(|p| *p != first)
                .collect();
            replicas.sort();
            endpoint_pods(&s, "ha-primary").await == vec![first.clone()]
                && endpoint_pods(&s, "ha-replicas").await == replicas
        },
    )
    .await;
    // spec.users and spec.databases exist in PostgreSQL, with the Secret's password.
    let app_password = secret_password(&s, "ha-user-app")
        .await
        .expect("the user's Secret");
    let app_port = kubelet
        .state
        .lock()
        .await
        .member(&first)
        .expect("member")
        .pg_port;
    wait_until("the application user logs into its database", T, || async {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(app_port)
            .user("app")
            .password(&app_password)
            .dbname("appdb")
            .connect_timeout(Duration::from_secs(3));
        let Ok((client, conn)) = cfg.connect(tokio_postgres::NoTls).await else {
            return false;
        };
        tokio::spawn(conn);
        client
            .query_one(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()",
                &[],
            )
            .await
            .is_ok_and(|row| row.get::<_, String>(0) == "app")
    })
    .await;
    {
        let k = kubelet.state.lock().await;
        let primary = k.member(&first).expect("primary member");
        primary
            .sql("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
            .await
            .expect("write on the primary");
    }
    wait_until("the replicas have the row", T, || async {
        let k = kubelet.state.lock().await;
        for i in 0..3 {
            let Some(m) = k.member(&format!("ha-{i}")) else {
                return false;
            };
            if m.sql("SELECT count(*) FROM t").await.ok() != Some(vec!["1".to_owned()]) {
                return false;
            }
        }
        true
    })
    .await;

    // Not a single point of failure: no controller, the leader agent is killed, the agents
    // fail over by themselves.
    assert_eq!(ctl.stop().map(|st| st.success()), Some(true), "clean stop");
    {
        let mut k = kubelet.state.lock().await;
        k.held.insert(first.clone());
        k.member_mut(&first)
            .and_then(|m| m.process.as_mut())
            .expect("the leader's agent")
            .kill9();
    }
    wait_until("another member takes the Lease", T, || async {
        lease_holder(&s, "ha").await.is_some_and(|h| h != first)
    })
    .await;
    let second = lease_holder(&s, "ha").await.expect("holder");
    wait_until("the new leader accepts writes", T, || async {
        let k = kubelet.state.lock().await;
        let m = k.member(&second).expect("member");
        m.sql("INSERT INTO t VALUES (2)").await.is_ok()
    })
    .await;
    wait_until("the primary Service follows the new leader", T, || async {
        endpoint_pods(&s, "ha-primary").await == vec![second.clone()]
    })
    .await;
    // The kubelet restarts the killed container; it rejoins as a replica.
    kubelet.state.lock().await.held.remove(&first);
    wait_until(&format!("{first} rejoins as a replica"), T, || async {
        let k = kubelet.state.lock().await;
        let m = k.member(&first).expect("member");
        m.api_get("/replica").await.map(|(c, _)| c) == Some(200)
    })
    .await;

    // The controller comes back and converges without touching the running primary.
    let postmaster = {
        let k = kubelet.state.lock().await;
        k.member(&second)
            .and_then(|m| m.postmaster_pid())
            .expect("postmaster")
    };
    let uids = pod_uids(&s).await;
    let sts_generation = s
        .api::<StatefulSet>()
        .get("ha")
        .await
        .expect("sts")
        .metadata
        .generation;
    let stops_before = kubelet
        .events()
        .await
        .iter()
        .filter(|e| e.kind == EventKind::Stopped)
        .count();
    let log_before = ctl.log_text().len();
    let mut ctl = s.controller("ctl-ha");
    wait_until_whole(&s, "ha", Some(&second)).await;
    wait_until(
        "the restarted controller completed reconciles",
        T,
        || async {
            ctl.log_text()
                .get(log_before..)
                .is_some_and(|new| new.matches("reconciled").count() >= 2)
        },
    )
    .await;
    assert_eq!(
        lease_holder(&s, "ha").await.as_deref(),
        Some(second.as_str())
    );
    {
        let k = kubelet.state.lock().await;
        assert_eq!(
            k.member(&second).and_then(|m| m.postmaster_pid()),
            Some(postmaster),
            "the primary's postmaster was not restarted"
        );
    }
    assert_eq!(pod_uids(&s).await, uids, "no Pod was replaced");
    assert_eq!(
        s.api::<StatefulSet>()
            .get("ha")
            .await
            .expect("sts")
            .metadata
            .generation,
        sts_generation,
        "the StatefulSet is unchanged"
    );
    let stops_after = kubelet
        .events()
        .await
        .iter()
        .filter(|e| e.kind == EventKind::Stopped)
        .count();
    assert_eq!(stops_after, stops_before, "no Pod was stopped");

    // Waits until every member shows `setting = value` and the rollout is done.
    let all_show = |setting: &'static str, value: &'static str| {
        let s = &s;
        let kubelet = &kubelet;
        async move {
            wait_until(
                &format!("every member runs with {setting} = {value}"),
                Duration::from_secs(240),
                || async {
                    let pg = s.cluster("ha").await;
                    let up_to_date = condition(&pg, "Progressing")
                        .is_some_and(|c| c.reason == "UpToDate")
                        && pg.status.as_ref().and_then(|st| st.observed_generation)
                            == pg.metadata.generation;
                    if !up_to_date {
                        return false;
                    }
                    let k = kubelet.state.lock().await;
                    for i in 0..3 {
                        let Some(m) = k.member(&format!("ha-{i}")) else {
                            return false;
                        };
                        if m.sql(&format!("SHOW {setting}")).await.ok()
                            != Some(vec![value.to_owned()])
                        {
                            return false;
                        }
                    }
                    true
                },
            )
            .await
        }
    };
    let spec = |parameters: Value, users: Value, owner: &str| {
        example("ha", |v| {
            v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
            v["spec"]["users"] = users;
            v["spec"]["databases"] = json!([{"name": "appdb", "owner": owner}]);
            v["spec"]["postgresql"] = json!({ "parameters": parameters });
        })
    };
    // What the primary has of `spec.users`/`spec.databases`.
    let roles = || async {
        let primary = lease_holder(&s, "ha").await.unwrap_or_default();
        let k = kubelet.state.lock().await;
        let Some(m) = k.member(&primary) else {
            return Vec::new();
        };
        m.sql(
            "SELECT string_agg(rolname || ':' || rolcreatedb || rolcreaterole, ',' ORDER BY rolname) \
             || '/' || (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'appdb') \
             FROM pg_roles WHERE rolname LIKE 'app%'",
        )
        .await
        .unwrap_or_default()
    };

    // A parameter a reload takes goes through the DCS `config`: every member reloads it, no
    // Pod restarts. Users: changed options, a new one owning the database.
    let uids = pod_uids(&s).await;
    s.apply(&spec(
        json!({"work_mem": "8MB"}),
        json!([{"name": "app", "options": ["CREATEROLE"]}, {"name": "app2"}]),
        "app2",
    ))
    .await
    .expect("apply the change");
    all_show("work_mem", "8MB").await;
    wait_until("the users and the owner follow the spec", T, || async {
        roles().await == vec!["app:falsetrue,app2:falsefalse/app2".to_owned()]
    })
    .await;
    assert_eq!(pod_uids(&s).await, uids, "no Pod was replaced for a reload");
    let stops_after_reload = kubelet
        .events()
        .await
        .iter()
        .filter(|e| e.kind == EventKind::Stopped)
        .count();
    assert_eq!(stops_after_reload, stops_before, "no Pod was stopped");
    assert!(ctl
        .log_text()
        .contains("wrote the spec's parameters and standby source into the DCS config"));

    // One that needs a restart: the members report pending_restart, and only then are the
    // replicas restarted first, then a switchover; the former primary restarts as a replica.
    let events_before = kubelet.events().await.len();
    // The removed user is dropped once the database went back to its first owner.
    s.apply(&spec(
        json!({"work_mem": "8MB", "shared_buffers": "64MB"}),
        json!([{"name": "app", "options": ["CREATEROLE"]}]),
        "app",
    ))
    .await
    .expect("apply the change");
    all_show("shared_buffers", "64MB").await;
    wait_until("the removed user is dropped", T, || async {
        roles().await == vec!["app:falsetrue/app".to_owned()]
    })
    .await;
    let third = wait_until_whole(&s, "ha", None).await;
    let stops: Vec<_> = kubelet.events().await[events_before..]
        .iter()
        .filter(|e| e.kind == EventKind::Stopped)
        .cloned()
        .collect();
    let mut stopped: Vec<String> = stops.iter().map(|e| e.pod.clone()).collect();
    stopped.sort();
    let mut replicas: Vec<String> = (0..3)
        .map(|i| format!("ha-{i}"))
        .filter(|p| *p != second)
        .collect();
    replicas.sort();
    // The former primary restarted postgres when it demoted: its Pod stays unless it still
    // reports pending_restart.
    assert!(
        stopped == replicas || stopped == vec!["ha-0", "ha-1", "ha-2"],
        "each replica's Pod restarted once: {stops:?}"
    );
    for e in &stops {
        assert_ne!(
            e.leader.as_deref(),
            Some(e.pod.as_str()),
            "{} was stopped while it was the primary: {stops:?}",
            e.pod
        );
    }
    assert_ne!(third, second, "the former primary handed over");
    assert!(
        ctl.log_text()
            .contains(&format!("switching over from {second} to ")),
        "the controller requested the switchover"
    );
    eprintln!("rollout: {stops:?}");
    for line in ctl.log_text().lines().filter(|l| l.contains("WARN")) {
        eprintln!("controller: {line}");
    }
    {
        let k = kubelet.state.lock().await;
        let m = k.member(&third).expect("member");
        assert_eq!(
            m.sql("SELECT count(*) FROM t").await.expect("read"),
            vec!["2".to_owned()],
            "no write was lost"
        );
    }
    assert!(ctl.process.is_running());
}

/// Every member configuration the controller renders for the example clusters is one the agent
/// accepts (`pgwarden validate-config`), with the environment the StatefulSet gives its Pods.
#[test]
fn the_agent_accepts_the_configuration_rendered_for_every_example() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut clusters = Vec::new();
    for example in ["minimal", "production", "standby"] {
        let doc = yaml_documents(&format!("deploy/examples/{example}.yaml"))
            .expect("example")
            .into_iter()
            .next()
            .expect("a document");
        let pg: PostgresCluster = serde_yaml::from_value(doc).expect("a PostgresCluster");
        clusters.push((example.to_owned(), pg));
    }
    // Created from a backup, to a point in time.
    let mut restored = clusters[1].1.clone();
    restored.spec.restore = Some(pgwarden_controller::crd::RestoreSpec {
        repo: "repo1".to_owned(),
        target_time: Some("2026-01-02 03:04:05+00".to_owned()),
    });
    assert_eq!(restored.spec.validate(), Ok(()));
    clusters.push(("production with restore".to_owned(), restored));
    // Made for an upgrade from 15 to 17: both versions' binaries in `bin_dirs`.
    let upgrading = pgwarden_controller::upgrade::Rendering {
        version: 17,
        upgrade_to: None,
        upgraded_from: Some(15),
        replicas: None,
    }
    .apply_to(&clusters[0].1);
    clusters.push(("minimal upgraded from 15".to_owned(), upgrading));
    // The test host has 17 where `scripts/build-postgres17.sh` puts it, not where the image does.
    let pg17 = pgwarden_tests::harness::pg17_bin_dir();
    for (example, mut pg) in clusters {
        pg.metadata.namespace = Some("db".to_owned());
        let cm = pgwarden_controller::render::configmap::configmap(&pg);
        let sts = pgwarden_controller::render::statefulset::statefulset(&pg, "hash");
        let container = &sts
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod")
            .containers[0];
        for (file, text) in cm.data.expect("data") {
            if !file.ends_with(".yml") {
                continue;
            }
            let path = dir.path().join(&file);
            let text = match &pg17 {
                Some(dir) => text.replace("/usr/lib/postgresql/17/bin", &dir.display().to_string()),
                None if text.contains("/usr/lib/postgresql/17/bin") => continue,
                None => text,
            };
            std::fs::write(&path, &text).expect("write");
            let pod = file.trim_end_matches(".yml");
            let mut cmd = std::process::Command::new(pgwarden_tests::harness::agent_binary());
            cmd.arg("validate-config").arg(&path);
            // The Pod's environment: downward API and Secret values stand-ins.
            for e in container.env.iter().flatten() {
                let value = match (&e.value, &e.value_from) {
                    (Some(v), _) => v.replace("$(PATRONI_KUBERNETES_POD_IP)", "10.0.0.1"),
                    (None, Some(from)) => {
                        match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                            Some("metadata.name") => pod.to_owned(),
                            Some("metadata.namespace") => "db".to_owned(),
                            Some("status.podIP") => "10.0.0.1".to_owned(),
                            _ => "secret-value".to_owned(),
                        }
                    }
                    (None, None) => String::new(),
                };
                cmd.env(&e.name, value);
            }
            let out = cmd.output().expect("run pgwarden validate-config");
            assert!(
                out.status.success(),
                "{example}/{file} is refused by the agent:\n{}{}\n--- the file ---\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

async fn controller_lease_holder(s: &Setup) -> Option<String> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(s.admin.clone(), &s.ns)
        .get_opt("pgwarden-controller")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|sp| sp.holder_identity)
        .filter(|h| !h.is_empty())
}

/// A controller stopped by SIGTERM gives its election Lease up on the way out, so a waiting
/// replica takes over at its next round instead of after a whole lease duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_stopped_by_sigterm_releases_its_lease() {
    let s = setup("pgc-rel").await;
    let mut first = s.controller("ctl-first");
    wait_until("ctl-first holds the controller Lease", T, || async {
        controller_lease_holder(&s).await.as_deref() == Some("ctl-first")
            && first.log_text().contains("became the active controller")
    })
    .await;
    let status = first.stop().expect("ctl-first exits");
    assert!(status.success(), "clean stop: {status:?}");
    assert_eq!(
        controller_lease_holder(&s).await,
        None,
        "the Lease is released on SIGTERM; log:\n{}",
        first.log_text()
    );
    assert!(first.log_text().contains("released the controller lease"));
}

/// The container resources' CPU request in the cluster's StatefulSet, if it exists.
async fn statefulset_cpu_request(s: &Setup, name: &str) -> Option<String> {
    let sts = s.api::<StatefulSet>().get_opt(name).await.ok()??;
    let container = sts.spec?.template.spec?.containers.into_iter().next()?;
    container
        .resources?
        .requests?
        .get("cpu")
        .map(|q| q.0.clone())
}

/// Two controller replicas, as `deploy/controller.yaml` runs them: one is active, the other
/// reconciles nothing while it waits; frozen (SIGSTOP) past its Lease, the active one is
/// replaced, and once resumed it exits instead of acting beside the new one, which reconciles
/// the next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_elect_one_and_a_frozen_active_one_is_replaced_and_exits_when_resumed() {
    let s = setup("pgc-two").await;
    let mut a = s.controller("ctl-a");
    let mut b = s.controller("ctl-b");
    wait_until("one of the two holds the controller Lease", T, || async {
        match controller_lease_holder(&s).await.as_deref() {
            Some("ctl-a") => a.log_text().contains("became the active controller"),
            Some("ctl-b") => b.log_text().contains("became the active controller"),
            _ => false,
        }
    })
    .await;
    let first = controller_lease_holder(&s).await;
    let (active, standby) = if first.as_deref() == Some("ctl-a") {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    s.apply(&example("two", |v| {
        v["spec"]["instances"]["resources"] = json!({"requests": {"cpu": "100m"}});
    }))
    .await
    .expect("apply the cluster");
    wait_until(
        "the active controller creates the StatefulSet",
        T,
        || async { statefulset_cpu_request(&s, "two").await.as_deref() == Some("100m") },
    )
    .await;
    // The active one logs each reconcile at debug level (after the objects are written), as
    // the standby would if it acted.
    wait_until("the active controller logs its reconcile", T, || async {
        active.log_text().contains("reconciled")
    })
    .await;
    let log = standby.log_text();
    assert!(
        !log.contains("became the active controller") && !log.contains("reconciled"),
        "the standby controller acted:\n{log}"
    );

    // Frozen well past its 3 s Lease: the standby takes over.
    active.process.signal(nix::sys::signal::Signal::SIGSTOP);
    let standby_name = if standby.log.ends_with("ctl-a.log") {
        "ctl-a"
    } else {
        "ctl-b"
    };
    wait_until("the standby takes the controller Lease over", T, || async {
        controller_lease_holder(&s).await.as_deref() == Some(standby_name)
            && standby.log_text().contains("became the active controller")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    active.process.signal(nix::sys::signal::Signal::SIGCONT);
    let status = active
        .process
        .wait_exit(Duration::from_secs(20))
        .expect("the resumed controller exits");
    assert!(!status.success(), "{status:?}");
    assert!(
        active
            .log_text()
            .contains("lost the controller lease; exiting"),
        "{}",
        active.log_text()
    );
    assert_eq!(
        controller_lease_holder(&s).await.as_deref(),
        Some(standby_name)
    );

    // The new active controller reconciles the next change.
    s.apply(&example("two", |v| {
        v["spec"]["instances"]["resources"] = json!({"requests": {"cpu": "200m"}});
    }))
    .await
    .expect("change the cluster");
    wait_until(
        "the new active controller applies the change",
        T,
        || async { statefulset_cpu_request(&s, "two").await.as_deref() == Some("200m") },
    )
    .await;
}

async fn pvc_names(s: &Setup) -> Vec<String> {
    let mut names: Vec<String> = s
        .api::<PersistentVolumeClaim>()
        .list(&Default::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| p.name_any())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Scaling down removes the departed members' Pods (and with them their member records, which
/// are Pod annotations); with `pvcRetention: Delete` their data PVCs go too, with `Retain` they
/// stay for a later scale-up. (No kubelet: the Pods need not run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_deletes_the_departed_members_pvcs_only_with_pvc_retention_delete() {
    let s = setup("pgc-scale").await;
    let _ctl = s.controller("ctl-scale");
    for (name, retention) in [("gone", "Delete"), ("kept", "Retain")] {
        s.apply(&example(name, |v| {
            v["spec"]["instances"]["replicas"] = json!(3);
            v["spec"]["pvcRetention"] = json!(retention);
        }))
        .await
        .expect("apply");
    }
    wait_until("six PVCs exist", T, || async {
        pvc_names(&s).await.len() == 6
    })
    .await;
    for name in ["gone", "kept"] {
        s.apply(&example(name, |v| {
            v["spec"]["instances"]["replicas"] = json!(1);
            v["spec"]["pvcRetention"] = json!(if name == "gone" { "Delete" } else { "Retain" });
        }))
        .await
        .expect("scale down");
    }
    wait_until("the departed members' Pods are gone", T, || async {
        let pods = s.api::<Pod>().list(&Default::default()).await;
        pods.is_ok_and(|l| {
            let mut names: Vec<String> = l.items.iter().map(|p| p.name_any()).collect();
            names.sort();
            names == vec!["gone-0", "kept-0"]
        })
    })
    .await;
    wait_until(
        "the Delete cluster's departed PVCs are deleted",
        T,
        || async {
            pvc_names(&s).await == vec!["data-gone-0", "data-kept-0", "data-kept-1", "data-kept-2"]
        },
    )
    .await;
    // And they stay so: the Retain cluster's are not deleted later either.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pvc_names(&s).await,
        vec!["data-gone-0", "data-kept-0", "data-kept-1", "data-kept-2"]
    );
}

/// Sets or removes `pause` in the agents' DCS `config` (as `pgwarden pause`/`resume` would),
/// compare-and-set on the ConfigMap's `resourceVersion`.
async fn set_pause(s: &Setup, cluster: &str, pause: bool) {
    let name = format!("{cluster}-config");
    wait_until(
        &format!("pause = {pause} written into {name}"),
        T,
        || async {
            let Ok(map) = s.api::<ConfigMap>().get(&name).await else {
                return false;
            };
            let Some(text) = map.annotations().get("config") else {
                return false;
            };
            let Ok(mut config) = serde_json::from_str::<Value>(text) else {
                return false;
            };
            let Some(obj) = config.as_object_mut() else {
                return false;
            };
            if pause {
                obj.insert("pause".to_owned(), json!(true));
            } else {
                obj.remove("pause");
            }
            let patch = json!({"metadata": {
                "resourceVersion": map.resource_version(),
                "annotations": {"config": config.to_string()},
            }});
            s.api::<ConfigMap>()
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .is_ok()
        },
    )
    .await;
}

/// A switchover from `primary` to `candidate` through `primary`'s agent, with the cluster's
/// REST API credentials (as `pgwarden switchover` or the controller asks for one).
async fn switch_over(
    s: &Setup,
    kubelet: &PodKubelet,
    cluster: &str,
    primary: &str,
    candidate: &str,
) {
    let secret = s
        .api::<Secret>()
        .get(&format!("{cluster}-restapi"))
        .await
        .expect("the REST API Secret");
    let field = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .expect("credential")
    };
    let credentials = pgwarden_controller::agent_api::ApiCredentials {
        username: field("username"),
        password: field("password"),
    };
    let port = kubelet
        .state
        .lock()
        .await
        .member(primary)
        .expect("member")
        .api_port;
    pgwarden_controller::agent_api::switchover(
        &format!("http://127.0.0.1:{port}/patroni"),
        primary,
        candidate,
        Some(&credentials),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("switchover from {primary} to {candidate}: {e}"));
}

async fn pod_names(s: &Setup) -> Vec<String> {
    let mut names: Vec<String> = s
        .api::<Pod>()
        .list(&Default::default())
        .await
        .map(|l| l.items.iter().map(|p| p.name_any()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Scaling down while the leader is the highest ordinal: the controller first asks the leader's
/// agent for a switchover to a staying member and lowers the StatefulSet's replicas only once
/// that member leads, so the leader's Pod is never stopped while it holds the Lease (no
/// failover). While the cluster is paused it does not switch over: the scale-down waits,
/// reported in `Progressing`, and goes on once the cluster is resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_switches_a_departing_leader_over_to_a_staying_member_first() {
    let s = setup("pgc-down").await;
    let kubelet = PodKubelet::start(s.access.clone(), &s.ns, "down")
        .await
        .expect("kubelet");
    let ctl = s.controller("ctl-down");
    let manifest = |replicas: i32| {
        example("down", |v| {
            v["spec"]["instances"]["replicas"] = json!(replicas);
            v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
            v["spec"]["pvcRetention"] = json!("Delete");
        })
    };
    s.apply(&manifest(3)).await.expect("apply the cluster");
    let first = wait_until_whole(&s, "down", None).await;

    // The leader is made the highest ordinal, the one a scale-down removes.
    if first != "down-2" {
        switch_over(&s, &kubelet, "down", &first, "down-2").await;
    }
    wait_until_whole(&s, "down", Some("down-2")).await;
    wait_until("both replicas stream from down-2", T, || async {
        let k = kubelet.state.lock().await;
        let Some(leader_port) = k.member("down-2").map(|m| m.pg_port) else {
            return false;
        };
        for pod in ["down-0", "down-1"] {
            let Some(m) = k.member(pod) else {
                return false;
            };
            if streams_from(m).await != Some(leader_port) {
                return false;
            }
        }
        true
    })
    .await;
    {
        let k = kubelet.state.lock().await;
        k.member("down-2")
            .expect("member")
            .sql(pgwarden_tests::harness::writer::CREATE_TABLE)
            .await
            .expect("the writer's table");
    }

    // Paused: no switchover, and the leader's Pod stays; the status says why.
    set_pause(&s, "down", true).await;
    s.apply(&manifest(2)).await.expect("scale down to 2");
    wait_until(
        "the scale-down is reported blocked by the pause",
        T,
        || async {
            let pg = s.cluster("down").await;
            pg.status.as_ref().and_then(|st| st.observed_generation) == pg.metadata.generation
                && condition(&pg, "Progressing").is_some_and(|c| {
                    c.status == "True"
                        && c.reason == "ScaleDownBlocked"
                        && c.message.contains("paused")
                })
        },
    )
    .await;
    assert_eq!(
        s.api::<StatefulSet>()
            .get("down")
            .await
            .expect("sts")
            .spec
            .and_then(|sp| sp.replicas),
        Some(3),
        "the StatefulSet keeps the leader's Pod while paused"
    );
    assert_eq!(pod_names(&s).await, vec!["down-0", "down-1", "down-2"]);
    assert_eq!(lease_holder(&s, "down").await.as_deref(), Some("down-2"));
    assert!(
        !ctl.log_text().contains("switching over from down-2"),
        "no switchover was requested while paused"
    );

    // Resumed: a switchover to the lowest staying ordinal, then the member count drops.
    let writer = {
        let k = kubelet.state.lock().await;
        pgwarden_tests::harness::writer::Writer::start(k.env.writer_targets())
    };
    // The resume must find the writer writing on down-2 (a clean-clone CI run resumed before
    // its first write, and the switchover came first).
    wait_until("the writer wrote on down-2", T, || async {
        let k = kubelet.state.lock().await;
        let Some(m) = k.member("down-2") else {
            return false;
        };
        m.sql("SELECT count(*) > 0 FROM pgwarden_writer WHERE member = 'down-2'")
            .await
            .ok()
            == Some(vec!["t".to_owned()])
    })
    .await;
    let events_before = kubelet.events().await.len();
    set_pause(&s, "down", false).await;
    wait_until("down-2's Pod is gone", Duration::from_secs(180), || async {
        pod_names(&s).await == vec!["down-0", "down-1"]
    })
    .await;
    let leader = wait_until_members_ready(&s, "down", None, 2).await;
    wait_until("the writer wrote on the new leader", T, || async {
        let k = kubelet.state.lock().await;
        let Some(m) = k.member(&leader) else {
            return false;
        };
        m.sql(&format!(
            "SELECT count(*) > 0 FROM pgwarden_writer WHERE member = '{leader}'"
        ))
        .await
        .ok()
            == Some(vec!["t".to_owned()])
    })
    .await;
    let acks = writer.stop().await;
    pgwarden_tests::harness::writer::assert_no_split_brain(&acks);

    assert!(
        leader == "down-0" || leader == "down-1",
        "a staying member leads: {leader}"
    );
    assert_eq!(
        lease_holder(&s, "down").await.as_deref(),
        Some(leader.as_str())
    );
    assert!(
        ctl.log_text()
            .contains(&format!("switching over from down-2 to {leader}")),
        "the controller handed the leadership to {leader} by a switchover"
    );
    // Not a failover: down-2 no longer held the Lease when its Pod was stopped.
    let stops: Vec<_> = kubelet.events().await[events_before..]
        .iter()
        .filter(|e| e.kind == EventKind::Stopped)
        .cloned()
        .collect();
    assert_eq!(
        stops.iter().map(|e| e.pod.as_str()).collect::<Vec<_>>(),
        vec!["down-2"],
        "only the departing Pod stopped: {stops:?}"
    );
    assert!(
        stops[0].leader.as_deref().is_some_and(|l| l != "down-2"),
        "down-2 was stopped while it held the Lease: {stops:?}"
    );
    // Every acknowledged write, wherever it was made, is on the new leader.
    assert!(
        acks.iter().any(|a| a.member == "down-2"),
        "the writer wrote on down-2 before the switchover"
    );
    assert!(
        acks.iter().any(|a| a.member == leader),
        "the writer wrote on {leader} after it"
    );
    let stored: std::collections::BTreeSet<i64> = {
        let k = kubelet.state.lock().await;
        let m = k.member(&leader).expect("member");
        m.sql("SELECT id FROM pgwarden_writer")
            .await
            .expect("read the writes")
            .iter()
            .filter_map(|id| id.parse().ok())
            .collect()
    };
    let lost: Vec<&pgwarden_tests::harness::writer::Ack> =
        acks.iter().filter(|a| !stored.contains(&a.id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // pvcRetention: Delete as before: the departed member's volume goes once its Pod is gone.
    wait_until("down-2's data PVC is deleted", T, || async {
        pvc_names(&s).await == vec!["data-down-0", "data-down-1"]
    })
    .await;
    let pg = s.cluster("down").await;
    assert!(
        condition(&pg, "Progressing").is_some_and(|c| c.reason != "ScaleDownBlocked"),
        "{:?}",
        pg.status
    );
}

/// Full backups (`…F` labels) of `stanza` in a posix repository.
fn full_backups(repo: &std::path::Path, stanza: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(repo.join("backup").join(stanza))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with('F'))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotation_backs_up_once_into_the_named_repository_and_a_new_cluster_restores_from_it_to_a_point_in_time(
) {
    let s = setup("pgc-bk").await;
    let source = PodKubelet::start(s.access.clone(), &s.ns, "src")
        .await
        .expect("kubelet");
    // One directory shared by both clusters' Pods, as a network volume would be.
    let volumes = {
        let mut k = source.state.lock().await;
        k.env.shared_dir("volumes/pgbackrest");
        k.env.shared_dir("volumes/pgbackrest2");
        let root = k.env.dir.path().join("volumes");
        k.volume_root = Some(root.clone());
        root
    };
    let repo = volumes.join("pgbackrest");
    let repo2 = volumes.join("pgbackrest2");
    let _ctl = s.controller("ctl-bk");
    let repos = json!([
        {"name": "repo1", "path": "/pgbackrest"},
        {"name": "repo2", "path": "/pgbackrest2"},
    ]);
    let backups = json!({
        "pgbackrest": {"repos": repos.clone()},
        "manual": {"type": "full", "repoName": "repo2"},
    });
    s.apply(&example("src", |v| {
        v["spec"]["instances"]["replicas"] = json!(2);
        v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
        v["spec"]["backups"] = backups.clone();
    }))
    .await
    .expect("apply the source cluster");
    let primary = wait_until_members_ready(&s, "src", None, 2).await;
    let sql = |q: &'static str| {
        let state = source.state.clone();
        let primary = primary.clone();
        async move {
            let k = state.lock().await;
            k.member(&primary)
                .expect("primary member")
                .sql(q)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e:#}"))
        }
    };
    sql("CREATE TABLE t (v int); INSERT INTO t SELECT generate_series(1, 100)").await;
    assert!(
        full_backups(&repo, "src").is_empty() && full_backups(&repo2, "src").is_empty(),
        "no backup before the annotation"
    );

    // The annotation asks for a backup; status follows it to its end.
    let annotate = |id: &'static str| {
        let clusters = s.clusters();
        async move {
            let patch = json!({"metadata": {"annotations": {"pgwarden.io/backup": id}}});
            clusters
                .patch(
                    "src",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .expect("annotate the cluster");
        }
    };
    annotate("b1").await;
    wait_until("status reports the on-demand backup b1 done", T, || async {
        let pg = s.cluster("src").await;
        pg.status
            .and_then(|st| st.manual_backup)
            .is_some_and(|b| b.id == "b1" && b.finished)
    })
    .await;
    let b1 = s
        .cluster("src")
        .await
        .status
        .and_then(|st| st.manual_backup)
        .expect("manualBackup");
    assert!(b1.succeeded, "b1 failed: {b1:?}");
    assert_eq!(b1.kind, "full");
    assert_eq!(b1.repo_name.as_deref(), Some("repo2"));
    assert_eq!(b1.member, primary, "the leader ran it");
    assert_eq!(full_backups(&repo2, "src").len(), 1, "b1 went into repo2");
    assert!(full_backups(&repo, "src").is_empty(), "and not into repo1");

    // Writes after the backup, a point in time, more writes; the WAL past it is archived.
    sql("INSERT INTO t SELECT generate_series(101, 150)").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let target =
        sql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
            .await
            .remove(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    sql("INSERT INTO t SELECT generate_series(151, 175)").await;
    let segment = sql("SELECT pg_walfile_name(pg_switch_wal())")
        .await
        .remove(0);
    wait_until("the WAL past the target is archived", T, || async {
        let k = source.state.lock().await;
        let last = k
            .member(&primary)
            .expect("primary")
            .sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
            .await
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default();
        last.as_str() >= segment.as_str()
    })
    .await;

    // The same id again (any reconcile, a spec change) starts nothing.
    s.apply(&example("src", |v| {
        v["spec"]["instances"]["replicas"] = json!(2);
        v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
        v["spec"]["backups"] = backups.clone();
        v["metadata"]["labels"] = json!({"touched": "yes"});
    }))
    .await
    .expect("re-apply the source cluster");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(full_backups(&repo2, "src").len(), 1, "b1 ran once");
    assert_eq!(
        s.cluster("src")
            .await
            .status
            .and_then(|st| st.manual_backup),
        Some(b1.clone())
    );

    // A new cluster restored from repo2 (the only one with a backup) at the point in time has
    // exactly the rows before it.
    let restored = PodKubelet::start(s.access.clone(), &s.ns, "dst")
        .await
        .expect("kubelet");
    restored.state.lock().await.volume_root = Some(volumes.clone());
    // The restored data has the source's roles and passwords: its Secrets are the source's
    // (a Secret that exists before the cluster is used as is).
    for kind in ["superuser", "replication"] {
        let from = s
            .api::<Secret>()
            .get(&format!("src-{kind}"))
            .await
            .expect("the source's secret");
        let copy = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(format!("dst-{kind}")),
                ..Default::default()
            },
            data: from.data,
            ..Default::default()
        };
        s.api::<Secret>()
            .create(&PostParams::default(), &copy)
            .await
            .expect("create the restored cluster's secret");
    }
    s.apply(&example("dst", |v| {
        v["spec"]["instances"]["replicas"] = json!(1);
        v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
        v["spec"]["backups"] = json!({"pgbackrest": {
            "stanza": "src",
            "repos": repos.clone(),
        }});
        v["spec"]["restore"] = json!({"repo": "repo2", "targetTime": target});
    }))
    .await
    .expect("apply the restored cluster");
    let restored_primary = wait_until_members_ready(&s, "dst", None, 1).await;
    {
        let k = restored.state.lock().await;
        let m = k.member(&restored_primary).expect("member");
        assert_eq!(
            m.sql("SELECT count(*)::text || ' ' || max(v)::text FROM t")
                .await
                .expect("count"),
            vec!["150 150".to_owned()],
            "restored to {target}"
        );
    }
    // It archives into a stanza of its own, with its own first full backup (into repo1, the
    // first repository); the source's stanza keeps its one backup.
    wait_until("the restored cluster's first full backup", T, || async {
        full_backups(&repo, "src-restored").len() == 1
    })
    .await;
    assert_eq!(full_backups(&repo2, "src").len(), 1);
    assert!(full_backups(&repo, "src").is_empty());
}

/// The port a member's WAL receiver streams from, if it streams.
async fn streams_from(m: &pgwarden_tests::harness::Member) -> Option<u16> {
    m.streaming_from().await.map(|(port, _)| port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_example_replicates_from_its_source_and_removing_spec_standby_promotes_it() {
    let s = setup("pgc-sb").await;
    let source = PodKubelet::start(s.access.clone(), &s.ns, "src")
        .await
        .expect("kubelet");
    let standby = PodKubelet::start(s.access.clone(), &s.ns, "dr")
        .await
        .expect("kubelet");
    let _ctl = s.controller("ctl-sb");
    let fast = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
    s.apply(&example("src", |v| {
        v["spec"]["instances"]["replicas"] = json!(1);
        v["spec"]["ha"] = fast.clone();
    }))
    .await
    .expect("apply the source cluster");
    let src_primary = wait_until_members_ready(&s, "src", None, 1).await;
    let src_port = {
        let k = source.state.lock().await;
        let m = k.member(&src_primary).expect("member");
        m.sql("CREATE TABLE t (v int); INSERT INTO t SELECT generate_series(1, 10)")
            .await
            .expect("rows on the source");
        m.pg_port
    };

    // As the example says: the standby's replication and superuser Secrets hold the source's
    // credentials (its data directory is a copy of the source's, roles included).
    for role in ["replication", "superuser"] {
        let src_secret = s
            .api::<Secret>()
            .get(&format!("src-{role}"))
            .await
            .expect("the source's Secret");
        let mut copy = Secret {
            data: src_secret.data.clone(),
            ..Secret::default()
        };
        copy.metadata.name = Some(format!("dr-{role}"));
        s.api::<Secret>()
            .create(&PostParams::default(), &copy)
            .await
            .expect("create the standby's Secret");
    }

    // deploy/examples/standby.yaml, pointed at the source's primary (its Pod listens on
    // loopback here; in a real cluster this is the source's primary Service).
    let doc = yaml_documents("deploy/examples/standby.yaml")
        .expect("read the example")
        .into_iter()
        .next()
        .expect("one document");
    let mut manifest: Value = serde_json::to_value(doc).expect("YAML as JSON");
    manifest["metadata"]["name"] = json!("dr");
    manifest["spec"]["ha"] = fast.clone();
    manifest["spec"]["standby"]["host"] = json!("127.0.0.1");
    manifest["spec"]["standby"]["port"] = json!(src_port);
    s.apply(&manifest).await.expect("apply the standby cluster");

    wait_until(
        "dr has a standby leader streaming from the source and a replica streaming from it",
        Duration::from_secs(180),
        || async {
            let Some(leader) = lease_holder(&s, "dr").await else {
                return false;
            };
            let k = standby.state.lock().await;
            let Some(l) = k.member(&leader) else {
                return false;
            };
            let other = if leader == "dr-0" { "dr-1" } else { "dr-0" };
            let Some(r) = k.member(other) else {
                return false;
            };
            l.api_get("/standby-leader").await.map(|(c, _)| c) == Some(200)
                && l.api_get("/primary").await.map(|(c, _)| c) == Some(503)
                && streams_from(l).await == Some(src_port)
                && streams_from(r).await == Some(l.pg_port)
        },
    )
    .await;
    {
        let k = source.state.lock().await;
        k.member(&src_primary)
            .expect("member")
            .sql("INSERT INTO t SELECT generate_series(11, 20)")
            .await
            .expect("more rows on the source");
    }
    wait_until(
        "the source's rows reach both standby members",
        T,
        || async {
            let k = standby.state.lock().await;
            for pod in ["dr-0", "dr-1"] {
                let Some(m) = k.member(pod) else {
                    return false;
                };
                if m.sql("SELECT count(*) FROM t").await.ok() != Some(vec!["20".to_owned()]) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let dr_leader = lease_holder(&s, "dr").await.expect("holder");
    assert!(
        standby
            .state
            .lock()
            .await
            .member(&dr_leader)
            .expect("member")
            .sql("INSERT INTO t VALUES (100)")
            .await
            .is_err(),
        "the standby leader refused a write"
    );
    let revision_before = s
        .api::<StatefulSet>()
        .get("dr")
        .await
        .expect("sts")
        .status
        .and_then(|st| st.update_revision);

    // Promotion: spec.standby removed.
    manifest["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("standby");
    s.apply(&manifest)
        .await
        .expect("apply without spec.standby");
    let promoted = wait_until_members_ready(&s, "dr", None, 2).await;
    wait_until("the promoted standby accepts writes", T, || async {
        let k = standby.state.lock().await;
        k.member(&promoted)
            .expect("member")
            .sql("INSERT INTO t VALUES (1000)")
            .await
            .is_ok()
    })
    .await;
    let other = if promoted == "dr-0" { "dr-1" } else { "dr-0" };
    wait_until("the replica follows the promoted leader", T, || async {
        let k = standby.state.lock().await;
        let (l, r) = (
            k.member(&promoted).expect("member"),
            k.member(other).expect("member"),
        );
        streams_from(r).await == Some(l.pg_port)
            && r.sql("SELECT count(*) FROM t").await.ok() == Some(vec!["21".to_owned()])
    })
    .await;
    assert_eq!(
        source
            .state
            .lock()
            .await
            .member(&src_primary)
            .expect("member")
            .sql("SELECT count(*) FROM t")
            .await
            .ok(),
        Some(vec!["20".to_owned()]),
        "the source is untouched"
    );
    assert_eq!(
        s.api::<StatefulSet>()
            .get("dr")
            .await
            .expect("sts")
            .status
            .and_then(|st| st.update_revision),
        revision_before,
        "the promotion went through the DCS config, not a rollout"
    );
}

/// A client session through a pooler's Service (the harness's proxy on loopback).
async fn pooled(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// `SHOW CONFIG` of the PgBouncer behind `port`, on its admin console as the `pgbouncer`
/// role (`stats_users`).
async fn pgbouncer_config(port: u16, password: &str) -> BTreeMap<String, String> {
    let Ok(client) = pooled(port, "pgbouncer", password, "pgbouncer").await else {
        return BTreeMap::new();
    };
    let Ok(rows) = client.simple_query("SHOW CONFIG").await else {
        return BTreeMap::new();
    };
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                r.get(0).unwrap_or_default().to_owned(),
                r.get(1).unwrap_or_default().to_owned(),
            )),
            _ => None,
        })
        .collect()
}

/// One row written through the pooler: the id PostgreSQL gave it and the port of the server
/// that acknowledged it.
#[derive(Debug, Clone, Copy)]
struct Ack {
    id: i64,
    server_port: u16,
}

/// What a client writing through the pooler across a switchover saw.
#[derive(Debug, Default)]
struct WriterLog {
    acks: Vec<Ack>,
    /// Statements that failed on an established session (the in-flight ones).
    failed_statements: Vec<String>,
    /// Attempts to open a session through the pooler that failed.
    failed_connects: Vec<String>,
    sessions: usize,
}

/// Writes one row at a time through the pooler at `port` until `stop` turns true; a failed
/// statement ends the session, and the client reconnects to the same address, as an
/// application's pool would.
async fn pooled_writer(
    port: u16,
    password: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut session: Option<tokio_postgres::Client> = None;
    let mut v = 0;
    while !*stop.borrow() {
        let client = match session.take() {
            Some(c) => c,
            None => match pooled(port, "app", &password, "appdb").await {
                Ok(c) => {
                    log.sessions += 1;
                    c
                }
                Err(e) => {
                    log.failed_connects.push(format!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        v += 1;
        match client
            .query_one(
                "INSERT INTO orders (v) VALUES ($1) RETURNING id, inet_server_port()",
                &[&v],
            )
            .await
        {
            Ok(row) => {
                log.acks.push(Ack {
                    id: row.get(0),
                    server_port: u16::try_from(row.get::<_, i32>(1)).unwrap_or_default(),
                });
                session = Some(client);
            }
            Err(e) => log.failed_statements.push(match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => e.to_string(),
            }),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_follows_the_primary_across_a_switchover_reloads_its_settings_and_goes_with_the_spec(
) {
    let s = setup("pgc-pool").await;
    let kubelet = PodKubelet::start(s.access.clone(), &s.ns, "pool")
        .await
        .expect("kubelet");
    let poolers = PoolerKubelet::start(s.access.clone(), &s.ns, kubelet.state.clone())
        .await
        .expect("pooler kubelet");
    let ctl = s.controller("ctl-pool");
    let spec = |pool_size: u32, pooler: bool| {
        example("pool", |v| {
            v["spec"]["instances"]["replicas"] = json!(2);
            v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
            v["spec"]["users"] = json!([{"name": "app"}]);
            v["spec"]["databases"] = json!([{"name": "appdb", "owner": "app"}]);
            if pooler {
                v["spec"]["pooler"] = json!({
                    "replicas": 1, "poolMode": "session", "defaultPoolSize": pool_size,
                    "maxClientConn": 50, "readOnly": true,
                });
            }
        })
    };
    s.apply(&spec(10, true)).await.expect("apply the cluster");
    let first = wait_until_members_ready(&s, "pool", None, 2).await;
    let pg = s.cluster("pool").await;

    // The objects, owned by the cluster; the poolers' Pods run and are behind their Services.
    for name in ["pool-pooler", "pool-pooler-ro"] {
        let deployment = s
            .api::<Deployment>()
            .get(name)
            .await
            .expect("the pooler Deployment");
        assert!(owned_by(deployment.owner_references(), &pg), "{name}");
        let service = s.api::<Service>().get(name).await.expect("the Service");
        assert!(owned_by(service.owner_references(), &pg), "{name}");
        let ini = s.api::<ConfigMap>().get(name).await.expect("the ConfigMap");
        assert!(owned_by(ini.owner_references(), &pg), "{name}");
    }
    let auth = s
        .api::<Secret>()
        .get("pool-pooler-auth")
        .await
        .expect("the pooler's Secret");
    assert!(owned_by(auth.owner_references(), &pg));
    wait_until("each pooler's Pod is behind its Service", T, || async {
        endpoint_pods(&s, "pool-pooler").await.len() == 1
            && endpoint_pods(&s, "pool-pooler-ro").await.len() == 1
    })
    .await;
    let (rw, ro) = {
        let mut p = poolers.state.lock().await;
        (
            p.service_port("pool-pooler").await.expect("proxy"),
            p.service_port("pool-pooler-ro").await.expect("proxy"),
        )
    };
    let app_password = secret_password(&s, "pool-user-app")
        .await
        .expect("the user's Secret");
    let pooler_password = secret_password(&s, "pool-pooler-auth")
        .await
        .expect("the pooler's password");
    let superuser_password = secret_password(&s, "pool-superuser")
        .await
        .expect("the superuser's password");

    // The application user logs in through the pooler with its own password (auth_query as
    // `pgbouncer`) and writes on the primary.
    wait_until(
        "the app user writes on the primary through the pooler",
        T,
        || async {
            let Ok(c) = pooled(rw, "app", &app_password, "appdb").await else {
                return false;
            };
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, v int); \
                 INSERT INTO orders (v) VALUES (0)",
            )
            .await
            .is_ok()
                && c.query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .is_ok_and(|r| !r.get::<_, bool>(0))
        },
    )
    .await;
    // The read-only pooler reaches the replica, which has the row.
    wait_until("the -ro pooler reaches a replica", T, || async {
        let Ok(c) = pooled(ro, "app", &app_password, "appdb").await else {
            return false;
        };
        c.query_one(
            "SELECT pg_is_in_recovery(), (SELECT count(*) FROM orders)",
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, bool>(0) && r.get::<_, i64>(1) >= 1)
    })
    .await;
    // get_auth answers nothing for a superuser: it cannot log in through the pooler.
    assert!(
        pooled(rw, "postgres", &superuser_password, "postgres")
            .await
            .is_err(),
        "a superuser logged in through the pooler"
    );

    // A settings change is a reload: the running PgBouncer takes it, and a connected client
    // keeps its session (the same server backend).
    let held = pooled(rw, "app", &app_password, "appdb")
        .await
        .expect("a session through the pooler");
    let backend: i32 = held
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend")
        .get(0);
    assert_eq!(
        pgbouncer_config(rw, &pooler_password)
            .await
            .get("default_pool_size")
            .map(String::as_str),
        Some("10")
    );
    let (pooler_pod, pgbouncer_pid) = {
        let p = poolers.state.lock().await;
        let (name, pod) = p
            .pods
            .iter()
            .find(|(_, pod)| pod.pooler == "pool-pooler")
            .expect("the pooler's Pod runs");
        (name.clone(), pod.pgbouncer_pid())
    };
    assert!(pgbouncer_pid.is_some(), "PgBouncer runs under the init");
    s.apply(&spec(7, true)).await.expect("apply the change");
    wait_until("PgBouncer reloaded default_pool_size = 7", T, || async {
        pgbouncer_config(rw, &pooler_password)
            .await
            .get("default_pool_size")
            .map(String::as_str)
            == Some("7")
    })
    .await;
    let still: i32 = held
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("the held session still works after the reload")
        .get(0);
    assert_eq!(still, backend, "the client kept its server connection");
    {
        let p = poolers.state.lock().await;
        let pod = p.pods.get(&pooler_pod).expect("the same pooler Pod");
        assert_eq!(
            pod.pgbouncer_pid(),
            pgbouncer_pid,
            "PgBouncer was not restarted"
        );
        assert!(
            pod.log_text()
                .contains("changed; sending SIGHUP to pgbouncer"),
            "{}",
            pod.log_text()
        );
    }
    drop(held);

    // A switchover, asked of the leader's agent: a client writing through the pooler loses at
    // most its in-flight statement, reconnects to the same address and goes on writing on the
    // new primary.
    let other = if first == "pool-0" {
        "pool-1"
    } else {
        "pool-0"
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(pooled_writer(rw, app_password.clone(), stop_rx));
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let field = |k: &str| {
            let s = &s;
            let k = k.to_owned();
            async move {
                let secret = s.api::<Secret>().get("pool-restapi").await.expect("secret");
                secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&k))
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                    .expect("credential")
            }
        };
        let credentials = pgwarden_controller::agent_api::ApiCredentials {
            username: field("username").await,
            password: field("password").await,
        };
        let port = kubelet
            .state
            .lock()
            .await
            .member(&first)
            .expect("member")
            .api_port;
        pgwarden_controller::agent_api::switchover(
            &format!("http://127.0.0.1:{port}/patroni"),
            &first,
            other,
            Some(&credentials),
            Duration::from_secs(60),
        )
        .await
        .expect("switchover");
    }
    wait_until_members_ready(&s, "pool", Some(other), 2).await;
    let new_port = kubelet
        .state
        .lock()
        .await
        .member(other)
        .expect("member")
        .pg_port;
    let old_port = kubelet
        .state
        .lock()
        .await
        .member(&first)
        .expect("member")
        .pg_port;
    wait_until(
        "a new session through the pooler lands on the new primary",
        T,
        || async {
            let Ok(c) = pooled(rw, "app", &app_password, "appdb").await else {
                return false;
            };
            c.query_one("SELECT inet_server_port()", &[])
                .await
                .is_ok_and(|r| r.get::<_, i32>(0) == i32::from(new_port))
        },
    )
    .await;
    // The writer goes on for a while on the new primary.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send(true).expect("stop the writer");
    let log = writer.await.expect("the writer");
    eprintln!(
        "writer: {} rows acknowledged in {} sessions; failed statements {:?}; failed connects {:?}",
        log.acks.len(),
        log.sessions,
        log.failed_statements,
        log.failed_connects
    );
    assert!(
        log.acks.iter().any(|a| a.server_port == old_port),
        "the writer wrote on the first primary"
    );
    let after: Vec<&Ack> = log
        .acks
        .iter()
        .filter(|a| a.server_port == new_port)
        .collect();
    assert!(
        after.len() >= 10,
        "the writer went on writing on the new primary: {log:?}"
    );
    assert!(
        log.acks
            .iter()
            .all(|a| a.server_port == old_port || a.server_port == new_port),
        "every write was acknowledged by a primary: {log:?}"
    );
    assert!(
        log.failed_statements.len() <= 1,
        "only the in-flight statement failed: {log:?}"
    );
    // Every acknowledged row is on the new primary.
    {
        let c = pooled(rw, "app", &app_password, "appdb")
            .await
            .expect("a session");
        let ids: Vec<i64> = c
            .query("SELECT id FROM orders", &[])
            .await
            .expect("read")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<i64> = log
            .acks
            .iter()
            .map(|a| a.id)
            .filter(|id| !ids.contains(id))
            .collect();
        assert!(missing.is_empty(), "acknowledged rows missing: {missing:?}");
    }
    // The -ro pooler reaches a replica again, the former primary: its server connection to the
    // promoted member ends itself at the check before its next use after a second idle. (The
    // client waits 2 s between sessions for that: a pool busy without pause keeps it until
    // `server_lifetime`.)
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Ok(c) = pooled(ro, "app", &app_password, "appdb").await {
            let row = c
                .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
                .await;
            if row.is_ok_and(|r| r.get::<_, bool>(0) && r.get::<_, i32>(1) == i32::from(old_port)) {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the -ro pooler did not reach the former primary as a replica"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Without spec.pooler the poolers go: Deployments, Services, ConfigMaps, the Secret, and
    // their Pods (the garbage collector removes those of the deleted Deployments).
    s.apply(&spec(7, false))
        .await
        .expect("apply without the pooler");
    wait_until("the pooler objects are deleted", T, || async {
        let mut gone = !exists(&s.api::<Secret>(), "pool-pooler-auth").await;
        for name in ["pool-pooler", "pool-pooler-ro"] {
            gone = gone
                && !exists(&s.api::<Deployment>(), name).await
                && !exists(&s.api::<Service>(), name).await
                && !exists(&s.api::<ConfigMap>(), name).await;
        }
        gone
    })
    .await;
    wait_until("the pooler Pods are gone", T, || async {
        poolers.state.lock().await.pods.is_empty()
    })
    .await;
    // The cluster itself is untouched.
    wait_until_members_ready(&s, "pool", Some(other), 2).await;
    assert!(!ctl.log_text().contains(" ERROR "), "{}", ctl.log_text());
}

/// An on-demand backup through the `pgwarden.io/backup` annotation, followed to its success.
async fn backup_now(s: &Setup, cluster: &str, id: &str) {
    let patch = json!({"metadata": {"annotations": {"pgwarden.io/backup": id}}});
    s.clusters()
        .patch(
            cluster,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("annotate the cluster");
    wait_until(&format!("the on-demand backup {id} is done"), T, || async {
        s.cluster(cluster)
            .await
            .status
            .and_then(|st| st.manual_backup)
            .is_some_and(|b| b.id == id && b.finished)
    })
    .await;
    let b = s
        .cluster(cluster)
        .await
        .status
        .and_then(|st| st.manual_backup);
    assert!(b.as_ref().is_some_and(|b| b.succeeded), "{id}: {b:?}");
}

const CHECKSUM: &str =
    "SELECT count(*)::text || ' ' || md5(string_agg(t::text, ',' ORDER BY id)) FROM t";

async fn sql_on(kubelet: &PodKubelet, pod: &str, query: &str) -> anyhow::Result<Vec<String>> {
    let k = kubelet.state.lock().await;
    k.member(pod)
        .ok_or_else(|| anyhow::anyhow!("no member {pod}"))?
        .sql(query)
        .await
}

/// `spec.postgresVersion` raised from 15 to 17 on a three-member cluster with data whose leader
/// is not ordinal 0: the controller switches over to ordinal 0, stops the replicas, stops the
/// leader last, switches the template (both versions' binaries, the `upgrade` init container),
/// starts ordinal 0 alone (its init container runs pg_upgrade --link), then the replicas (their
/// init containers move the old data aside, the agents clone). Every step is in
/// `status.upgrade`; the data is the same (row count and an md5 over every row, on every
/// member); every member runs 17 and streams; a switchover works afterwards; lowering the
/// version again is refused. With backups configured, it waits until a backup is taken, and
/// the repository's stanza is upgraded with the cluster (a backup of the new version works).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_postgres_version_upgrades_the_cluster_to_17_with_its_data_and_it_is_ha_again() {
    if pgwarden_tests::harness::pg17_bin_dir().is_none() {
        return;
    }
    let s = setup("pgc-up").await;
    let kubelet = PodKubelet::start(s.access.clone(), &s.ns, "up")
        .await
        .expect("kubelet");
    // A posix repository on a volume every Pod shares.
    let repo = {
        let mut k = kubelet.state.lock().await;
        let repo = k.env.shared_dir("volumes/pgbackrest");
        k.volume_root = Some(k.env.dir.path().join("volumes"));
        repo
    };
    let _ctl = s.controller("ctl-up");
    let manifest = |version: u32| {
        example("up", |v| {
            v["spec"]["postgresVersion"] = json!(version);
            v["spec"]["instances"]["replicas"] = json!(3);
            v["spec"]["ha"] = json!({"ttl": 10, "loopWait": 1, "retryTimeout": 3});
            v["spec"]["backups"] = json!({
                "pgbackrest": {"repos": [{"name": "repo1", "path": "/pgbackrest"}]},
                "manual": {"type": "full"},
            });
        })
    };
    s.apply(&manifest(15)).await.expect("apply the cluster");
    let first = wait_until_whole(&s, "up", None).await;
    // Ordinal 0 is the member that is stopped last and upgraded: make another one lead.
    let leader = if first == "up-0" {
        switch_over(&s, &kubelet, "up", "up-0", "up-2").await;
        wait_until_whole(&s, "up", Some("up-2")).await
    } else {
        first
    };
    sql_on(
        &kubelet,
        &leader,
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL); \
         INSERT INTO t (id, v) SELECT g, md5(g::text) FROM generate_series(1, 10000) g",
    )
    .await
    .expect("the primary accepts writes");
    let before = sql_on(&kubelet, &leader, CHECKSUM)
        .await
        .expect("checksum")
        .remove(0);
    assert!(before.starts_with("10000 "), "{before}");
    let events_before = kubelet.events().await.len();

    // No backup yet: the upgrade waits, and nothing is stopped.
    s.apply(&manifest(17)).await.expect("raise postgresVersion");
    wait_until("the upgrade waits for a backup", T, || async {
        let pg = s.cluster("up").await;
        let pending = pg
            .status
            .as_ref()
            .and_then(|st| st.upgrade.as_ref())
            .is_some_and(|u| u.phase == "Pending" && u.message.contains("no backup"));
        pending
            && condition(&pg, "Progressing").is_some_and(|c| {
                c.reason == "Upgrading" && c.message.contains("pgwarden.io/backup")
            })
    })
    .await;
    assert_eq!(pod_names(&s).await, vec!["up-0", "up-1", "up-2"]);
    assert_eq!(
        kubelet.events().await.len(),
        events_before,
        "nothing was stopped"
    );
    backup_now(&s, "up", "before-upgrade").await;
    let phases = std::sync::Mutex::new(Vec::<String>::new());
    wait_until(
        "status.upgrade reaches Succeeded",
        Duration::from_secs(420),
        || async {
            let pg = s.cluster("up").await;
            let Some(u) = pg.status.and_then(|st| st.upgrade) else {
                return false;
            };
            assert_eq!((u.from, u.to), (15, 17), "{u:?}");
            let mut seen = phases.lock().unwrap_or_else(|e| e.into_inner());
            if seen.last() != Some(&u.phase) {
                eprintln!("upgrade: {} - {}", u.phase, u.message);
                seen.push(u.phase.clone());
            }
            u.phase == "Succeeded"
        },
    )
    .await;
    let phases = phases.into_inner().unwrap_or_else(|e| e.into_inner());
    for phase in ["Stopping", "Upgrading", "Recloning"] {
        assert!(
            phases.iter().any(|p| p == phase),
            "{phase} not seen in {phases:?}"
        );
    }
    let leader = wait_until_whole(&s, "up", Some("up-0")).await;

    // Stopped replicas first and the leader last, while it still led (no failover); started
    // ordinal 0 first, alone.
    let events: Vec<_> = kubelet.events().await.split_off(events_before);
    let stops: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Stopped)
        .collect();
    let starts: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Started)
        .map(|e| e.pod.as_str())
        .collect();
    assert_eq!(stops.len(), 3, "{events:#?}");
    assert_eq!(stops[2].pod, "up-0", "{events:#?}");
    assert_eq!(stops[2].leader.as_deref(), Some("up-0"), "{events:#?}");
    assert_eq!(starts.first().copied(), Some("up-0"), "{events:#?}");
    assert_eq!(starts.len(), 3, "{events:#?}");

    for pod in ["up-0", "up-1", "up-2"] {
        let version = sql_on(
            &kubelet,
            pod,
            "SELECT current_setting('server_version_num')",
        )
        .await
        .expect("sql");
        assert!(version[0].starts_with("17"), "{pod}: {version:?}");
        wait_until(&format!("{pod} has every row"), T, || async {
            sql_on(&kubelet, pod, CHECKSUM)
                .await
                .ok()
                .and_then(|mut r| r.pop())
                == Some(before.clone())
        })
        .await;
    }
    {
        let k = kubelet.state.lock().await;
        let leader_port = k.member("up-0").expect("member").pg_port;
        for pod in ["up-1", "up-2"] {
            let m = k.member(pod).expect("member");
            assert_eq!(
                streams_from(m).await,
                Some(leader_port),
                "{pod} streams from up-0"
            );
            let mut kept = m.data_dir().into_os_string();
            kept.push(".pre-upgrade-15");
            assert!(
                std::path::Path::new(&kept).exists(),
                "{pod}'s old data is kept aside"
            );
        }
    }
    let sts = s.api::<StatefulSet>().get("up").await.expect("sts");
    let annotations = sts.annotations();
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
    assert!(!annotations.contains_key("pgwarden.io/upgrade-to"));

    // The repository's stanza was upgraded with the cluster: a backup of the new version.
    backup_now(&s, "up", "after-upgrade").await;
    assert_eq!(
        full_backups(&repo, "up").len(),
        2,
        "one backup of each version"
    );

    // HA again: a switchover to a re-cloned replica, which accepts writes.
    switch_over(&s, &kubelet, "up", &leader, "up-1").await;
    wait_until_whole(&s, "up", Some("up-1")).await;
    sql_on(
        &kubelet,
        "up-1",
        "INSERT INTO t (id, v) VALUES (10001, 'after')",
    )
    .await
    .expect("the new primary accepts writes");

    // Down again is refused, and nothing is changed.
    s.apply(&manifest(15)).await.expect("apply 15");
    wait_until("lowering the version is reported", T, || async {
        let pg = s.cluster("up").await;
        condition(&pg, "Degraded").is_some_and(|c| {
            c.status == "True"
                && c.reason == "InvalidSpec"
                && c.message.contains("cannot be lowered")
        })
    })
    .await;
    let sts = s.api::<StatefulSet>().get("up").await.expect("sts");
    assert_eq!(
        sts.annotations()
            .get("pgwarden.io/postgres-version")
            .map(String::as_str),
        Some("17")
    );
}
