//! The PgBouncer poolers of `spec.pooler`: for the primary (`<cluster>-pooler`) and, with
//! `readOnly`, for the replicas (`<cluster>-pooler-ro`), each a Deployment, a Service and a
//! ConfigMap with `pgbouncer.ini`; both share the Secret `<cluster>-pooler-auth`.
//!
//! PgBouncer's upstream is the cluster's primary (or replicas) Service by its DNS name, never a
//! Pod: the agents move the `role` label, the Service's endpoints follow, and PgBouncer's next
//! server connection goes to the new primary without any change here. Clients authenticate
//! with their own PostgreSQL password: PgBouncer logs in as `pgbouncer` (password from its
//! `auth_file`, made from the Secret) and asks `pgbouncer.get_auth($1)` for the client's
//! secret (`crate::pooler` creates the role and the function).
//!
//! A changed `pgbouncer.ini` reaches the running Pods through the ConfigMap volume; the
//! container's init (`pgwarden-init --reload-on-change`) sends PgBouncer SIGHUP when the file
//! changes, and PgBouncer reloads without closing client connections. Nothing in the Pod
//! template depends on the ini, so a settings change rolls no Pod.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, Container, ContainerPort, KeyToPath, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, Secret, SecretProjection, Service,
    ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{child_meta, Names, FIELD_MANAGER, POSTGRES_PORT};
use crate::crd::{PoolerSpec, PostgresCluster, PullPolicy};
use crate::pooler::POOLER_ROLE;

/// Where the pooler container finds `pgbouncer.ini` and `userlist.txt` (one projected volume).
pub const POOLER_DIR: &str = "/etc/pgbouncer";
pub const INI_FILE: &str = "pgbouncer.ini";
pub const USERLIST_FILE: &str = "userlist.txt";
/// Port PgBouncer listens on, in the Pod and on the Service: PostgreSQL's, so a client changes
/// only the host name to go through the pooler.
pub const POOLER_PORT: i32 = 5432;
/// Label selecting one pooler's Pods (value: the pooler's name). Not the members' labels: the
/// member Services, the PodDisruptionBudget and the agents select `application` and
/// `cluster-name`, which the pooler Pods must not match.
pub const POOLER_LABEL: &str = "pgwarden.io/pooler";
/// The function `auth_query` calls; `crate::pooler` creates it in every database.
pub const AUTH_QUERY: &str = "SELECT * FROM pgbouncer.get_auth($1)";
/// UID/GID of Debian's `postgres` user, which PgBouncer runs as in the instance image.
const POOLER_UID: i64 = 999;

/// The poolers the spec asks for: `false` = the primary's, `true` = the replicas'.
pub fn wanted(pg: &PostgresCluster) -> Vec<bool> {
    match &pg.spec.pooler {
        None => Vec::new(),
        Some(p) if p.read_only => vec![false, true],
        Some(_) => vec![false],
    }
}

/// The Service a pooler sends its server connections to, as a DNS name in the namespace.
pub fn upstream_host(names: &Names, read_only: bool) -> String {
    let service = if read_only {
        names.replicas_service()
    } else {
        names.primary_service()
    };
    format!("{service}.{}.svc", names.namespace)
}

/// `pgbouncer.ini` of one pooler.
pub fn ini(pg: &PostgresCluster, spec: &PoolerSpec, read_only: bool) -> String {
    let names = Names::of(pg);
    let host = upstream_host(&names, read_only);
    format!(
        "\
; Rendered by {FIELD_MANAGER} from spec.pooler of {cluster}; edits are overwritten.
[databases]
; Every database, on the {role} Service (its endpoints follow the agents' role labels).
* = host={host} port={POSTGRES_PORT}

[pgbouncer]
listen_addr = *
listen_port = {POOLER_PORT}
unix_socket_dir =
; Clients log in with their PostgreSQL password, looked up as {POOLER_ROLE} (SCRAM secrets
; are used for SCRAM, and passed through to the server).
auth_type = md5
auth_file = {POOLER_DIR}/{USERLIST_FILE}
auth_user = {POOLER_ROLE}
auth_query = {AUTH_QUERY}
stats_users = {POOLER_ROLE}
pool_mode = {mode}
default_pool_size = {pool_size}
max_client_conn = {max_client}
; After a failover or switchover the first login to the new primary is retried soon, not
; after PgBouncer's default 15 s.
server_login_retry = 2
; A server connection idle for a second is checked before reuse: on a member no longer in
; the {role} role the check ends its own session, and PgBouncer connects again through the
; Service. (A failing query would not do: PgBouncer 1.18 reuses the connection anyway.)
server_check_query = {check}
server_check_delay = 1
{lifetime}ignore_startup_parameters = extra_float_digits
",
        cluster = names.cluster,
        role = if read_only { "replicas" } else { "primary" },
        mode = spec.pool_mode.as_str(),
        pool_size = spec.default_pool_size,
        max_client = spec.max_client_conn,
        check = check_query(read_only, pg.spec.standby.is_some()),
        // A promotion keeps the sessions to the promoted replica open (a demotion restarts
        // postgres, which ends those to the former primary): a replicas' pool busy enough never
        // to idle a second is bounded by the server connections' lifetime.
        lifetime = if read_only {
            "; Bounds how long a busy pool may keep reading from a promoted replica.\nserver_lifetime = 300\n"
        } else {
            ""
        },
    )
}

/// `server_check_query`: on a member no longer in the role the pooler is for, the session
/// terminates itself (any role may signal its own backend), which PgBouncer sees as a closed
/// server connection.
///
/// On a standby cluster the primary Service's member (the standby leader) is in recovery too,
/// so both poolers check for a member in recovery.
pub fn check_query(read_only: bool, standby_cluster: bool) -> &'static str {
    if read_only || standby_cluster {
        "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN 1 \
         ELSE pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid())::int END"
    } else {
        "SELECT CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN 1 \
         ELSE pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid())::int END"
    }
}

/// The labels of one pooler's Pods; [`POOLER_LABEL`] alone is the Deployment's and the
/// Service's selector.
fn pod_labels(names: &Names, read_only: bool) -> BTreeMap<String, String> {
    BTreeMap::from([
        (POOLER_LABEL.to_owned(), names.pooler(read_only)),
        ("app.kubernetes.io/name".to_owned(), "pgbouncer".to_owned()),
        (
            "app.kubernetes.io/instance".to_owned(),
            names.cluster.clone(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            "pooler".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            FIELD_MANAGER.to_owned(),
        ),
    ])
}

fn selector(names: &Names, read_only: bool) -> BTreeMap<String, String> {
    BTreeMap::from([(POOLER_LABEL.to_owned(), names.pooler(read_only))])
}

pub fn configmap(pg: &PostgresCluster, spec: &PoolerSpec, read_only: bool) -> ConfigMap {
    let names = Names::of(pg);
    ConfigMap {
        metadata: child_meta(pg, names.pooler(read_only)),
        data: Some(BTreeMap::from([(
            INI_FILE.to_owned(),
            ini(pg, spec, read_only),
        )])),
        ..ConfigMap::default()
    }
}

/// The `pgbouncer` role's password, and PgBouncer's `auth_file` holding it (PgBouncer logs in
/// with it to run `auth_query`). Created once, like every Secret of the controller.
pub fn secret(pg: &PostgresCluster, password: String) -> Secret {
    let names = Names::of(pg);
    Secret {
        metadata: child_meta(pg, names.pooler_secret()),
        type_: Some("kubernetes.io/basic-auth".to_owned()),
        string_data: Some(BTreeMap::from([
            ("username".to_owned(), POOLER_ROLE.to_owned()),
            (USERLIST_FILE.to_owned(), userlist(&password)),
            ("password".to_owned(), password),
        ])),
        ..Secret::default()
    }
}

/// PgBouncer's `auth_file` line for the `pgbouncer` role (generated passwords are
/// alphanumeric; a `"` would be doubled, as PgBouncer reads it).
pub fn userlist(password: &str) -> String {
    format!("\"{POOLER_ROLE}\" \"{}\"\n", password.replace('"', "\"\""))
}

pub fn service(pg: &PostgresCluster, read_only: bool) -> Service {
    let names = Names::of(pg);
    Service {
        metadata: child_meta(pg, names.pooler(read_only)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector(&names, read_only)),
            ports: Some(vec![ServicePort {
                name: Some("pgbouncer".to_owned()),
                port: POOLER_PORT,
                target_port: Some(IntOrString::String("pgbouncer".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The container's command: PgBouncer under the image's init, which sends it SIGHUP when the
/// mounted configuration or auth file changes (a ConfigMap or Secret volume update).
pub fn command() -> Vec<String> {
    let ini = format!("{POOLER_DIR}/{INI_FILE}");
    let userlist = format!("{POOLER_DIR}/{USERLIST_FILE}");
    [
        "pgwarden-init",
        "--reload-on-change",
        &ini,
        "--reload-on-change",
        &userlist,
        "--",
        "pgbouncer",
        &ini,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

pub fn deployment(pg: &PostgresCluster, spec: &PoolerSpec, read_only: bool) -> Deployment {
    let names = Names::of(pg);
    let tcp_probe = |initial: i32, period: i32| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("pgbouncer".to_owned()),
            host: None,
        }),
        initial_delay_seconds: Some(initial),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let container = Container {
        name: "pgbouncer".to_owned(),
        image: Some(spec.image.clone().unwrap_or_else(|| pg.spec.image.clone())),
        image_pull_policy: Some(
            pg.spec
                .image_pull_policy
                .unwrap_or(PullPolicy::IfNotPresent)
                .as_str()
                .to_owned(),
        ),
        command: Some(command()),
        ports: Some(vec![ContainerPort {
            name: Some("pgbouncer".to_owned()),
            container_port: POOLER_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(tcp_probe(0, 5)),
        liveness_probe: Some(tcp_probe(10, 10)),
        resources: spec.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: "config".to_owned(),
            mount_path: POOLER_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let volume = Volume {
        name: "config".to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: Some(names.pooler(read_only)),
                        items: Some(vec![KeyToPath {
                            key: INI_FILE.to_owned(),
                            path: INI_FILE.to_owned(),
                            mode: None,
                        }]),
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: Some(names.pooler_secret()),
                        items: Some(vec![KeyToPath {
                            key: USERLIST_FILE.to_owned(),
                            path: USERLIST_FILE.to_owned(),
                            mode: None,
                        }]),
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            default_mode: None,
        }),
        ..Volume::default()
    };
    Deployment {
        metadata: child_meta(pg, names.pooler(read_only)),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(&names, read_only)),
                ..LabelSelector::default()
            },
            // A new Pod serves before an old one goes (an image or resources change).
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(&names, read_only)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // PgBouncer never calls the Kubernetes API.
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_user: Some(POOLER_UID),
                        run_as_group: Some(POOLER_UID),
                        run_as_non_root: Some(true),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![volume]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}
