//! The `PostgresCluster` custom resource (`pgwarden.io/v1alpha1`): what a user declares, and the
//! status the controller reports back.
//!
//! The OpenAPI schema that the API server validates against is derived from these types
//! (`pgwarden-controller crd` prints it; `deploy/crd.yaml` is that output). Validation that the
//! schema can express lives here as `#[schemars(...)]` attributes, so a bad manifest is refused by
//! `kubectl apply` itself; what it cannot express is checked by [`PostgresClusterSpec::validate`]
//! and reported in the `Degraded` condition.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every pgwarden resource.
pub const GROUP: &str = "pgwarden.io";

/// A highly available PostgreSQL cluster: one pgwarden agent per Pod of a StatefulSet, electing
/// its primary through a Lease. The controller only creates and updates objects; failover is
/// decided by the agents alone.
#[derive(CustomResource, Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "pgwarden.io",
    version = "v1alpha1",
    kind = "PostgresCluster",
    namespaced,
    status = "PostgresClusterStatus",
    shortname = "pgc",
    category = "pgwarden",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.primary"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.readyMembers"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterSpec {
    /// The Pods that run PostgreSQL.
    pub instances: Instances,
    /// Container image with `pgwarden` and PostgreSQL (`postgres`, `initdb`, `pg_ctl`, ... on
    /// `PATH` or under `/usr/lib/postgresql/<version>/bin`).
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// `IfNotPresent` (default), `Always` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// PostgreSQL major version in the image; selects `/usr/lib/postgresql/<version>/bin`.
    #[serde(default = "default_postgres_version")]
    #[schemars(range(min = 13, max = 17))]
    pub postgres_version: u32,
    /// Server parameters and client authentication.
    #[serde(default)]
    pub postgresql: PostgresqlSpec,
    /// Roles the controller creates on the primary, each with a generated password kept in a
    /// Secret `<cluster>-user-<name>` that is never overwritten once it exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserSpec>,
    /// Databases the controller creates on the primary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabaseSpec>,
    /// Leader election and failover settings (Patroni's `bootstrap.dcs`).
    #[serde(default)]
    pub ha: HaSpec,
    /// pgBackRest repositories, schedules and retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<BackupsSpec>,
    /// Types of the primary and replicas Services.
    #[serde(default)]
    pub services: ServicesSpec,
    /// Run as a standby of another cluster (Patroni's `standby_cluster`): the leader follows
    /// that cluster instead of accepting writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbySpec>,
    /// Create the cluster from a pgBackRest backup instead of an empty initdb.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
    /// What happens to the data volumes when the PostgresCluster is deleted: `Retain`
    /// (default; the PVCs stay and a re-created cluster of the same name reuses them) or
    /// `Delete`.
    #[serde(default)]
    pub pvc_retention: PvcRetention,
    /// PgBouncer in front of the primary Service (and, with `readOnly`, a second one in front
    /// of the replicas Service). Removing it removes the poolers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooler: Option<PoolerSpec>,
}

fn default_image() -> String {
    "pgwarden/pgwarden:0.1.0-pg15".to_owned()
}

fn default_postgres_version() -> u32 {
    15
}

/// How the kubelet pulls the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// `spec.instances`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Instances {
    /// Number of members (1 primary + replicas).
    #[schemars(range(min = 1, max = 15))]
    pub replicas: i32,
    /// CPU and memory for the PostgreSQL container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The data volume of each member.
    pub storage: StorageSpec,
    /// Scheduling. Without `affinity`, members prefer different nodes (see `antiAffinity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// `preferred` (default): spread members across nodes when possible; `required`: never two
    /// members on one node; `none`. Ignored when `affinity` is given.
    #[serde(default)]
    pub anti_affinity: AntiAffinity,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Seconds a Pod gets to stop. The agent hands leadership over before postgres stops, so
    /// this must cover a checkpoint and a switchover (default 120).
    #[serde(default = "default_grace")]
    #[schemars(range(min = 30, max = 3600))]
    pub termination_grace_period_seconds: i64,
    /// `failover_priority` tag per member ordinal (`0` = never promote). Members not listed get
    /// the agent's default.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failover_priority: BTreeMap<String, i64>,
}

fn default_grace() -> i64 {
    120
}

/// `spec.instances.antiAffinity`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AntiAffinity {
    #[default]
    Preferred,
    Required,
    None,
}

/// `spec.instances.storage`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each member's volume, a Kubernetes quantity (`10Gi`).
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// StorageClass of the volumes; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// `spec.postgresql`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresqlSpec {
    /// Server parameters (`postgresql.conf`), as integers or strings (`work_mem: 8MB`,
    /// `max_connections: 200`, `wal_log_hints: "on"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, ParamValue>,
    /// `pg_hba.conf` lines, placed after the lines the controller needs (local access for the
    /// agent, replication between members).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pg_hba: Vec<String>,
}

/// A parameter value: an integer or a string. The schema says `x-kubernetes-int-or-string`, so a
/// list, a map or a boolean is refused by the API server (write booleans as `"on"`/`"off"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    Int(i64),
    Text(String),
}

impl ParamValue {
    /// The value as it is written into the agent configuration.
    pub fn to_yaml(&self) -> serde_json::Value {
        match self {
            ParamValue::Int(i) => serde_json::Value::from(*i),
            ParamValue::Text(s) => serde_json::Value::from(s.clone()),
        }
    }
}

impl JsonSchema for ParamValue {
    fn schema_name() -> String {
        "ParamValue".to_owned()
    }

    fn json_schema(_: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        // Structural schemas have no `anyOf` of types; int-or-string is the one union
        // Kubernetes allows.
        let mut schema = schemars::schema::SchemaObject::default();
        schema
            .extensions
            .insert("x-kubernetes-int-or-string".to_owned(), true.into());
        schema.into()
    }
}

/// One role in `spec.users`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    /// Role name (lower case; also part of the Secret's name).
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub name: String,
    /// Role attributes, as in `CREATE ROLE ... WITH`: `LOGIN` is implied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<RoleOption>,
}

/// The role attributes the controller may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum RoleOption {
    Superuser,
    Createdb,
    Createrole,
    Replication,
    Bypassrls,
}

impl RoleOption {
    /// Every attribute, with its `pg_roles` column.
    pub const ALL: [(RoleOption, &'static str); 5] = [
        (RoleOption::Superuser, "rolsuper"),
        (RoleOption::Createdb, "rolcreatedb"),
        (RoleOption::Createrole, "rolcreaterole"),
        (RoleOption::Replication, "rolreplication"),
        (RoleOption::Bypassrls, "rolbypassrls"),
    ];

    pub fn as_sql(self) -> &'static str {
        match self {
            RoleOption::Superuser => "SUPERUSER",
            RoleOption::Createdb => "CREATEDB",
            RoleOption::Createrole => "CREATEROLE",
            RoleOption::Replication => "REPLICATION",
            RoleOption::Bypassrls => "BYPASSRLS",
        }
    }
}

/// One database in `spec.databases`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub name: String,
    /// Owner role: one of `spec.users`, or the superuser when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// `spec.ha`: the agents' cluster-wide settings, seeded into the DCS `config` at bootstrap.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HaSpec {
    /// Leader lease duration in seconds.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 5, max = 3600))]
    pub ttl: u32,
    /// Seconds between two HA cycles.
    #[serde(default = "default_loop_wait")]
    #[schemars(range(min = 1, max = 3600))]
    pub loop_wait: u32,
    /// Bound of one API server request or postgres query, in seconds.
    #[serde(default = "default_retry_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub retry_timeout: u32,
    /// Bytes a replica may lag and still be promoted automatically.
    #[serde(default = "default_max_lag")]
    #[schemars(range(min = 0))]
    pub maximum_lag_on_failover: u64,
    /// Synchronous replication managed by the leader.
    #[serde(default)]
    pub synchronous_mode: bool,
    /// With `synchronousMode`: writes wait rather than be acknowledged by one copy.
    #[serde(default)]
    pub synchronous_mode_strict: bool,
    /// With `synchronousMode`: quorum commit (Patroni's `synchronous_mode: quorum`), commits
    /// wait for any `synchronousNodeCount` of the standbys instead of all of them.
    #[serde(default)]
    pub quorum_commit: bool,
    /// With `synchronousMode`: how many synchronous standbys (Patroni's
    /// `synchronous_node_count`).
    #[serde(default = "default_node_count")]
    #[schemars(range(min = 1, max = 100))]
    pub synchronous_node_count: u32,
    /// `use_pg_rewind` (default on: a former primary rejoins without a full clone).
    #[serde(default = "default_true")]
    pub use_pg_rewind: bool,
}

fn default_ttl() -> u32 {
    30
}
fn default_loop_wait() -> u32 {
    10
}
fn default_retry_timeout() -> u32 {
    10
}
fn default_max_lag() -> u64 {
    1_048_576
}
fn default_true() -> bool {
    true
}
fn default_node_count() -> u32 {
    1
}

impl Default for HaSpec {
    fn default() -> Self {
        HaSpec {
            ttl: default_ttl(),
            loop_wait: default_loop_wait(),
            retry_timeout: default_retry_timeout(),
            maximum_lag_on_failover: default_max_lag(),
            synchronous_mode: false,
            synchronous_mode_strict: false,
            quorum_commit: false,
            synchronous_node_count: default_node_count(),
            use_pg_rewind: true,
        }
    }
}

/// `spec.backups`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupsSpec {
    pub pgbackrest: PgBackRestSpec,
    /// The on-demand backup that the annotation `pgwarden.io/backup: <id>` starts (once per
    /// id), as PGO's `spec.backups.pgbackrest.manual` with its `pgbackrest-backup` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<ManualBackupSpec>,
}

/// `spec.backups.manual`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManualBackupSpec {
    /// `full`, `diff` or `incr` (default, as pgBackRest: a full one when none exists).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(full|diff|incr)$"))]
    pub kind: Option<String>,
    /// The repository of `spec.backups.pgbackrest.repos` the backup goes into (as PGO's
    /// `manual.repoName`); default `repo1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^repo[1-4]$"))]
    pub repo_name: Option<String>,
}

/// The annotation that asks for an on-demand backup; its value identifies the request.
pub const BACKUP_ANNOTATION: &str = "pgwarden.io/backup";

/// `spec.backups.pgbackrest`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PgBackRestSpec {
    /// Stanza name; the cluster's name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stanza: Option<String>,
    #[schemars(length(min = 1, max = 4))]
    pub repos: Vec<RepoSpec>,
}

/// One pgBackRest repository (`repo1` ... `repo4`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepoSpec {
    /// `repo1` ... `repo4`.
    #[schemars(regex(pattern = r"^repo[1-4]$"))]
    pub name: String,
    /// Repository path on a volume (`repo-path`), or the prefix in the bucket for `s3`.
    #[serde(default = "default_repo_path")]
    pub path: String,
    /// An S3-compatible bucket; the credentials come from `s3.credentialsSecret`
    /// (keys `key` and `keySecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Repo>,
    /// Cron schedules (5 fields) of backups into this repository; every repository has its
    /// own.
    #[serde(default)]
    pub schedules: BackupSchedules,
    /// For a posix repository: the volume mounted at `path` in every Pod. The Pods share it,
    /// so it must be a ReadWriteMany claim (NFS, CephFS, ...) that the user creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<RepoVolume>,
    /// Full backups to keep (`repo-retention-full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 9999999))]
    pub retention_full: Option<u32>,
    /// Differential backups to keep (`repo-retention-diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 9999999))]
    pub retention_diff: Option<u32>,
}

fn default_repo_path() -> String {
    "/pgbackrest".to_owned()
}

/// `volume` of a posix repository.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepoVolume {
    /// An existing PersistentVolumeClaim in the cluster's namespace, ReadWriteMany.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
}

/// `s3` of a repository.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Repo {
    pub bucket: String,
    pub endpoint: String,
    pub region: String,
    /// Secret holding `key` and `keySecret`.
    pub credentials_secret: String,
}

/// Cron schedules per backup type.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSchedules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(\S+\s+){4}\S+$"))]
    pub full: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(\S+\s+){4}\S+$"))]
    pub diff: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(\S+\s+){4}\S+$"))]
    pub incr: Option<String>,
}

/// `spec.services`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicesSpec {
    #[serde(default)]
    pub primary: ServiceSpec,
    #[serde(default)]
    pub replicas: ServiceSpec,
}

/// One Service's settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub kind: ServiceType,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes Service types we render.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// `spec.standby`: follow another cluster (Patroni's `standby_cluster`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StandbySpec {
    /// Host of the source cluster's primary (usually its primary Service).
    #[schemars(length(min = 1))]
    pub host: String,
    #[serde(default = "default_pg_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Replication slot to use on the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_slot_name: Option<String>,
}

fn default_pg_port() -> u16 {
    5432
}

/// `spec.restore`: create the cluster from a backup.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// Repository of `spec.backups` to restore from.
    #[schemars(regex(pattern = r"^repo[1-4]$"))]
    pub repo: String,
    /// Point in time to recover to (`--type=time --target=...`); the end of the WAL when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_time: Option<String>,
}

/// `spec.pooler`: a PgBouncer Deployment (`<cluster>-pooler`) whose clients reach the primary,
/// as PGO's `proxy.pgBouncer` and CloudNativePG's `Pooler` do. Clients log in with their own
/// PostgreSQL password: PgBouncer looks it up with `auth_query` as the `pgbouncer` role.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolerSpec {
    /// PgBouncer Pods (each pooler; they share nothing, a client may use any).
    #[serde(default = "default_pooler_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    /// When a server connection returns to the pool: after the client disconnects (`session`,
    /// default), after each transaction (`transaction`), or after each statement
    /// (`statement`).
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Server connections per user and database pair (`default_pool_size`).
    #[serde(default = "default_pool_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub default_pool_size: u32,
    /// Client connections each PgBouncer accepts (`max_client_conn`).
    #[serde(default = "default_max_client_conn")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_client_conn: u32,
    /// CPU and memory of the PgBouncer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Also a pooler in front of the replicas Service (`<cluster>-pooler-ro`), with the same
    /// settings.
    #[serde(default)]
    pub read_only: bool,
    /// Image with `pgbouncer` and `pgwarden-init`; `spec.image` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
}

fn default_pooler_replicas() -> i32 {
    1
}
fn default_pool_size() -> u32 {
    20
}
fn default_max_client_conn() -> u32 {
    100
}

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Session,
    Transaction,
    Statement,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

/// `spec.pvcRetention`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum PvcRetention {
    #[default]
    Retain,
    Delete,
}

/// What the controller observed, written by it alone.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Holder of the leader Lease, as the agents elected it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Members that are running and ready.
    #[serde(default)]
    pub ready_members: i32,
    /// Every member the agents published, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Hash of the Pod template the rollout last completed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// The last on-demand backup (`pgwarden.io/backup` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_backup: Option<ManualBackupStatus>,
    /// The last major-version upgrade (a raised `spec.postgresVersion`), step by step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeStatus>,
}

/// `status.upgrade`: where a major-version upgrade stands (`crate::upgrade`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStatus {
    /// The major version the cluster ran before.
    pub from: u32,
    /// The major version it is upgraded to.
    pub to: u32,
    /// `Pending` (waits for a precondition, nothing changed), `Stopping`, `Upgrading` (the first
    /// member's data), `Recloning` (the replicas), `Succeeded`; `Cancelled` (the version was set
    /// back while `Pending`).
    pub phase: String,
    /// What the step does or waits for.
    pub message: String,
    /// When the controller first saw this upgrade (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When every member ran the new version (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// `status.manualBackup`: the backup started for one value of the `pgwarden.io/backup`
/// annotation. An id recorded here is never started again.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManualBackupStatus {
    /// The annotation's value.
    pub id: String,
    /// `full`, `diff` or `incr`, as the agent runs it.
    #[serde(rename = "type")]
    pub kind: String,
    /// The repository it goes into (`repo2`), as the agent runs it; absent from agents that
    /// predate per-repository backups (theirs go to `repo1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_name: Option<String>,
    /// The member (the leader) that runs it.
    pub member: String,
    /// As the agent reported it (RFC 3339).
    pub started_at: String,
    /// The backup ended (successfully or not).
    #[serde(default)]
    pub finished: bool,
    /// It ended successfully.
    #[serde(default)]
    pub succeeded: bool,
    /// The agent's error, or why it is not known how it ended.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One member as its agent published it on its Pod.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    pub name: String,
    /// `primary`, `replica`, `standby_leader`, ... (Patroni's roles), `unknown` when the Pod
    /// carries no member record yet.
    pub role: String,
    /// Patroni's state string (`running`, `creating replica`, ...).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<i64>,
    /// Bytes behind the primary's published position, when both are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// Whether the Pod's Ready condition is true.
    #[serde(default)]
    pub ready: bool,
    /// The agent reports a parameter change that needs a restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending_restart: bool,
}

/// A status condition, with the fields of `metav1.Condition`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    /// Omitted when empty. (Also keeps `default: ""` out of the schema: kube-apiserver 1.20
    /// refuses the CRD with "default: Invalid value: null: must be of type string".)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A spec problem that the schema cannot express, named by its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

/// Parameters the controller sets itself; a value in the spec would break the Pods' wiring.
pub const MANAGED_PARAMETERS: &[&str] = &[
    "listen_addresses",
    "port",
    "data_directory",
    "hba_file",
    "ident_file",
    "config_file",
    "hot_standby",
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
];

impl PostgresClusterSpec {
    /// Cross-field checks the OpenAPI schema cannot express; every problem at once.
    pub fn validate(&self) -> Result<(), Vec<SpecError>> {
        let mut errors = Vec::new();
        let mut err = |field: String, reason: String| errors.push(SpecError { field, reason });
        let ha = &self.ha;
        if ha.loop_wait + 2 * ha.retry_timeout > ha.ttl {
            err(
                "ha".to_owned(),
                format!(
                    "loopWait + 2 * retryTimeout ({}) must not exceed ttl ({}): a leader could \
                     lose its lease before it notices",
                    ha.loop_wait + 2 * ha.retry_timeout,
                    ha.ttl
                ),
            );
        }
        if ha.synchronous_mode_strict && !ha.synchronous_mode {
            err(
                "ha.synchronousModeStrict".to_owned(),
                "needs synchronousMode".to_owned(),
            );
        }
        if ha.quorum_commit && !ha.synchronous_mode {
            err(
                "ha.quorumCommit".to_owned(),
                "needs synchronousMode".to_owned(),
            );
        }
        if parse_quantity(&self.instances.storage.size).is_none_or(|b| b == 0) {
            err(
                "instances.storage.size".to_owned(),
                format!(
                    "{:?} is not a positive quantity such as 10Gi",
                    self.instances.storage.size
                ),
            );
        }
        for name in self.postgresql.parameters.keys() {
            if MANAGED_PARAMETERS.contains(&name.as_str()) {
                err(
                    format!("postgresql.parameters.{name}"),
                    "is set by the controller and cannot be overridden".to_owned(),
                );
            } else if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                err(
                    format!("postgresql.parameters.{name}"),
                    "is not a parameter name".to_owned(),
                );
            }
        }
        for (i, line) in self.postgresql.pg_hba.iter().enumerate() {
            if line.contains('\n') {
                err(
                    format!("postgresql.pgHba[{i}]"),
                    "must be one line".to_owned(),
                );
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, user) in self.users.iter().enumerate() {
            if !seen.insert(user.name.as_str()) {
                err(
                    format!("users[{i}].name"),
                    format!("{:?} is listed twice", user.name),
                );
            }
            if matches!(
                user.name.as_str(),
                "postgres" | "replicator" | "rewind_user" | crate::pooler::POOLER_ROLE
            ) {
                err(
                    format!("users[{i}].name"),
                    format!("{:?} is reserved for the agents and the pooler", user.name),
                );
            }
            if user.name.len() > 40 {
                err(
                    format!("users[{i}].name"),
                    "must be at most 40 characters (it becomes part of a Secret name)".to_owned(),
                );
            }
        }
        for (i, db) in self.databases.iter().enumerate() {
            if let Some(owner) = &db.owner {
                if !self.users.iter().any(|u| &u.name == owner) {
                    err(
                        format!("databases[{i}].owner"),
                        format!("{owner:?} is not one of spec.users"),
                    );
                }
            }
        }
        if let Some(restore) = &self.restore {
            let known = self
                .backups
                .as_ref()
                .is_some_and(|b| b.pgbackrest.repos.iter().any(|r| r.name == restore.repo));
            if !known {
                err(
                    "restore.repo".to_owned(),
                    format!("{:?} is not a repository of spec.backups", restore.repo),
                );
            }
            if self.standby.is_some() {
                err(
                    "restore".to_owned(),
                    "cannot be combined with spec.standby".to_owned(),
                );
            }
        }
        if let Some(backups) = &self.backups {
            let mut names = std::collections::BTreeSet::new();
            for (i, repo) in backups.pgbackrest.repos.iter().enumerate() {
                if !names.insert(repo.name.as_str()) {
                    err(
                        format!("backups.pgbackrest.repos[{i}].name"),
                        format!("{:?} is listed twice", repo.name),
                    );
                } else if repo.name != format!("repo{}", i + 1) {
                    // The agent numbers repositories by position (pgBackRest's repo<n>).
                    err(
                        format!("backups.pgbackrest.repos[{i}].name"),
                        format!("must be repo{} (repositories are listed in order)", i + 1),
                    );
                }
                if repo.s3.is_some() && repo.volume.is_some() {
                    err(
                        format!("backups.pgbackrest.repos[{i}].volume"),
                        "only applies to a posix repository (this one is s3)".to_owned(),
                    );
                }
                if let Some(v) = &repo.volume {
                    if !repo.path.starts_with('/') || repo.path == "/" {
                        err(
                            format!("backups.pgbackrest.repos[{i}].path"),
                            format!(
                                "{:?} must be an absolute directory (not /): the volume is \
                                 mounted there",
                                repo.path
                            ),
                        );
                    } else if let Some(mount) = [
                        crate::render::agent_config::DATA_MOUNT,
                        crate::render::agent_config::CONFIG_DIR,
                    ]
                    .into_iter()
                    .find(|m| {
                        let (p, m) = (std::path::Path::new(&repo.path), std::path::Path::new(m));
                        p.starts_with(m) || m.starts_with(p)
                    }) {
                        // Nested mounts would hide one volume inside the other.
                        err(
                            format!("backups.pgbackrest.repos[{i}].path"),
                            format!(
                                "{:?} overlaps {mount}, which the Pod already mounts",
                                repo.path
                            ),
                        );
                    }
                    if v.claim_name.trim().is_empty() {
                        err(
                            format!("backups.pgbackrest.repos[{i}].volume.claimName"),
                            "must name a PersistentVolumeClaim".to_owned(),
                        );
                    }
                }
            }
            if let Some(repo_name) = backups.manual.as_ref().and_then(|m| m.repo_name.as_ref()) {
                if !backups
                    .pgbackrest
                    .repos
                    .iter()
                    .any(|r| &r.name == repo_name)
                {
                    err(
                        "backups.manual.repoName".to_owned(),
                        format!("{repo_name:?} is not a repository of spec.backups.pgbackrest"),
                    );
                }
            }
        }
        for key in self.instances.failover_priority.keys() {
            let ordinal_ok = key
                .parse::<i32>()
                .is_ok_and(|o| o >= 0 && o < self.instances.replicas);
            if !ordinal_ok {
                err(
                    format!("instances.failoverPriority.{key}"),
                    format!(
                        "keys are member ordinals 0..{}",
                        self.instances.replicas.max(1) - 1
                    ),
                );
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Bytes in a Kubernetes quantity as storage sizes use it; `None` if it is not one.
pub fn parse_quantity(s: &str) -> Option<u128> {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return None,
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if !frac.chars().all(|c| c.is_ascii_digit()) || (number.contains('.') && frac.is_empty()) {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let mut value = whole.checked_mul(multiplier)?;
    if !frac.is_empty() {
        let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
        let frac: u128 = frac.parse().ok()?;
        value = value.checked_add(frac.checked_mul(multiplier)? / scale)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests;
