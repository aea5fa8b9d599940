//! The StatefulSet: one Pod per member, the agent as the container's entrypoint.
//!
//! `updateStrategy: OnDelete`: the StatefulSet controller never restarts a Pod by itself. The
//! pgwarden controller deletes outdated Pods in the order of `rollout.rs` (replicas first, then
//! a switchover, then the former primary), which the built-in rolling update (highest ordinal
//! first, whatever its role) cannot do.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretKeySelector, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::agent_config::{CONFIG_DIR, DATA_MOUNT};
use super::{
    child_meta, labels, selector_labels, Names, API_PORT, CONFIG_HASH_ANNOTATION, POSTGRES_PORT,
    POSTGRES_VERSION_ANNOTATION, UPGRADED_FROM_ANNOTATION, UPGRADE_TO_ANNOTATION,
};
use crate::crd::{AntiAffinity, PostgresCluster, PullPolicy};

/// UID/GID of `postgres` in Debian's postgresql packages (and so in our image).
const POSTGRES_UID: i64 = 999;
const HOSTNAME_TOPOLOGY: &str = "kubernetes.io/hostname";

/// The StatefulSet of a cluster. `config_hash` is [`agent_config::content_hash`] of everything
/// the Pods read from the ConfigMap.
pub fn statefulset(pg: &PostgresCluster, config_hash: &str) -> StatefulSet {
    let names = Names::of(pg);
    let spec = &pg.spec;
    let instances = &spec.instances;

    let mut template_annotations = BTreeMap::new();
    template_annotations.insert(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned());

    let pod = PodSpec {
        service_account_name: Some(names.agent_account()),
        termination_grace_period_seconds: Some(instances.termination_grace_period_seconds),
        security_context: Some(PodSecurityContext {
            run_as_user: Some(POSTGRES_UID),
            run_as_group: Some(POSTGRES_UID),
            fs_group: Some(POSTGRES_UID),
            run_as_non_root: Some(true),
            ..PodSecurityContext::default()
        }),
        affinity: affinity(pg),
        tolerations: none_if_empty(instances.tolerations.clone()),
        topology_spread_constraints: none_if_empty(instances.topology_spread_constraints.clone()),
        node_selector: if instances.node_selector.is_empty() {
            None
        } else {
            Some(instances.node_selector.clone())
        },
        priority_class_name: instances.priority_class_name.clone(),
        init_containers: super::version_annotation(pg, UPGRADED_FROM_ANNOTATION)
            .map(|_| vec![upgrade_container(pg)]),
        containers: vec![agent_container(pg)],
        volumes: Some(
            std::iter::once(Volume {
                name: "config".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: Some(names.agent_configmap()),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            })
            .chain(repo_volumes(pg).into_iter().map(|(volume, _)| volume))
            .collect(),
        ),
        ..PodSpec::default()
    };

    let mut claim_resources = BTreeMap::new();
    claim_resources.insert(
        "storage".to_owned(),
        Quantity(instances.storage.size.clone()),
    );
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_owned()),
            // Copied onto every PVC: how the cleanup of `pvcRetention: Delete` finds them.
            labels: Some(selector_labels(&names)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: instances.storage.storage_class_name.clone(),
            resources: Some(ResourceRequirements {
                requests: Some(claim_resources),
                ..ResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };

    let mut metadata = child_meta(pg, names.statefulset());
    let mut annotations = BTreeMap::from([(
        POSTGRES_VERSION_ANNOTATION.to_owned(),
        spec.postgres_version.to_string(),
    )]);
    for key in [UPGRADE_TO_ANNOTATION, UPGRADED_FROM_ANNOTATION] {
        if let Some(version) = super::version_annotation(pg, key) {
            annotations.insert(key.to_owned(), version.to_string());
        }
    }
    metadata.annotations = Some(annotations);
    StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(instances.replicas),
            service_name: names.headless_service(),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&names)),
                ..LabelSelector::default()
            },
            // Members start in parallel: the agents decide among themselves who initializes.
            pod_management_policy: Some("Parallel".to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_owned()),
                rolling_update: None,
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&names)),
                    annotations: Some(template_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

fn agent_container(pg: &PostgresCluster) -> Container {
    let names = Names::of(pg);
    let spec = &pg.spec;
    let mut env = vec![
        field_env("PATRONI_NAME", "metadata.name"),
        field_env("PATRONI_KUBERNETES_NAMESPACE", "metadata.namespace"),
        field_env("PATRONI_KUBERNETES_POD_IP", "status.podIP"),
        // Kubernetes expands $(VAR) from variables defined earlier in the list.
        plain_env(
            "PATRONI_RESTAPI_CONNECT_ADDRESS",
            &format!("$(PATRONI_KUBERNETES_POD_IP):{API_PORT}"),
        ),
        plain_env(
            "PATRONI_POSTGRESQL_CONNECT_ADDRESS",
            &format!("$(PATRONI_KUBERNETES_POD_IP):{POSTGRES_PORT}"),
        ),
        secret_env(
            "PATRONI_SUPERUSER_PASSWORD",
            &names.superuser_secret(),
            "password",
        ),
        secret_env(
            "PATRONI_REPLICATION_PASSWORD",
            &names.replication_secret(),
            "password",
        ),
        secret_env(
            "PATRONI_RESTAPI_USERNAME",
            &names.restapi_secret(),
            "username",
        ),
        secret_env(
            "PATRONI_RESTAPI_PASSWORD",
            &names.restapi_secret(),
            "password",
        ),
    ];
    // The agent's `pgbackrest.repos[n-1].s3_key`/`s3_key_secret` (`docs/backup.md`), kept out
    // of the ConfigMap.
    for (i, repo) in spec
        .backups
        .iter()
        .flat_map(|b| b.pgbackrest.repos.iter())
        .enumerate()
    {
        if let Some(s3) = &repo.s3 {
            let n = i + 1;
            env.push(secret_env(
                &format!("PGWARDEN_PGBACKREST_REPO{n}_S3_KEY"),
                &s3.credentials_secret,
                "key",
            ));
            env.push(secret_env(
                &format!("PGWARDEN_PGBACKREST_REPO{n}_S3_KEY_SECRET"),
                &s3.credentials_secret,
                "keySecret",
            ));
        }
    }
    Container {
        name: "postgres".to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(
            spec.image_pull_policy
                .unwrap_or(PullPolicy::IfNotPresent)
                .as_str()
                .to_owned(),
        ),
        // The image's init as PID 1 with the agent as its child (as the image's ENTRYPOINT): a
        // crashed agent then leaves its fence guard running to release the leader key.
        command: Some(vec![
            "pgwarden-init".to_owned(),
            "--".to_owned(),
            "pgwarden".to_owned(),
            // Kubernetes expands $(PATRONI_NAME) from the env: each member reads its own file.
            format!("{CONFIG_DIR}/$(PATRONI_NAME).yml"),
        ]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("postgresql".to_owned()),
                container_port: POSTGRES_PORT,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("api".to_owned()),
                container_port: API_PORT,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        // Readiness is the agent's view (running, streaming, not lagging): a replica that is
        // not ready leaves the replicas Service. Liveness only fails when the HA loop is stuck;
        // restarting a live agent would only cause a failover.
        readiness_probe: Some(http_probe("/readiness", 5, 3)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(30),
            ..http_probe("/liveness", 10, 6)
        }),
        resources: spec.instances.resources.clone(),
        volume_mounts: Some(
            [
                VolumeMount {
                    name: "data".to_owned(),
                    mount_path: DATA_MOUNT.to_owned(),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "config".to_owned(),
                    mount_path: CONFIG_DIR.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
            ]
            .into_iter()
            .chain(repo_volumes(pg).into_iter().map(|(_, mount)| mount))
            .collect(),
        ),
        ..Container::default()
    }
}

/// The init container of a template made for a major-version upgrade (`crate::upgrade`):
/// `pgwarden upgrade-data-dir --if-needed` with the agent's own configuration, environment and
/// volumes, before every start of the agent. It upgrades the first member's data (pg_upgrade
/// --link), moves a replica's old data aside for a clone, and does nothing to data already of
/// the new version or to an empty volume.
fn upgrade_container(pg: &PostgresCluster) -> Container {
    let agent = agent_container(pg);
    Container {
        name: "upgrade".to_owned(),
        command: Some(vec![
            "pgwarden".to_owned(),
            "upgrade-data-dir".to_owned(),
            "--if-needed".to_owned(),
            format!("{CONFIG_DIR}/$(PATRONI_NAME).yml"),
        ]),
        ports: None,
        readiness_probe: None,
        liveness_probe: None,
        ..agent
    }
}

/// The shared volume of each posix repository that names one (`repos[].volume`), mounted at
/// the repository's path: the leader backs up into it, every member's `archive_command`
/// pushes into it and new replicas restore from it, so all Pods need the same files (a
/// ReadWriteMany claim; `fsGroup` makes it writable by postgres on volumes that honour it).
/// The volume is named after the repository (`repo1` ... `repo4`).
pub fn repo_volumes(pg: &PostgresCluster) -> Vec<(Volume, VolumeMount)> {
    pg.spec
        .backups
        .iter()
        .flat_map(|b| b.pgbackrest.repos.iter())
        .filter(|repo| repo.s3.is_none())
        .filter_map(|repo| {
            let claim = repo.volume.as_ref()?;
            Some((
                Volume {
                    name: repo.name.clone(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.claim_name.clone(),
                        read_only: None,
                    }),
                    ..Volume::default()
                },
                VolumeMount {
                    name: repo.name.clone(),
                    mount_path: repo.path.clone(),
                    ..VolumeMount::default()
                },
            ))
        })
        .collect()
}

/// Default scheduling: members on different nodes (preferred or required), so a node loss
/// takes at most one member.
fn affinity(pg: &PostgresCluster) -> Option<Affinity> {
    let instances = &pg.spec.instances;
    if let Some(affinity) = &instances.affinity {
        return Some(affinity.clone());
    }
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(&Names::of(pg))),
            ..LabelSelector::default()
        }),
        topology_key: HOSTNAME_TOPOLOGY.to_owned(),
        ..PodAffinityTerm::default()
    };
    let anti = match instances.anti_affinity {
        AntiAffinity::None => return None,
        AntiAffinity::Preferred => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..PodAntiAffinity::default()
        },
        AntiAffinity::Required => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
    };
    Some(Affinity {
        pod_anti_affinity: Some(anti),
        ..Affinity::default()
    })
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(API_PORT),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: Some("v1".to_owned()),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: Some(secret.to_owned()),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn none_if_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    if v.is_empty() {
        None
    } else {
        Some(v)
    }
}
