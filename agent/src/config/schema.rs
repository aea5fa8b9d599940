//! The configuration file's schema: Patroni's YAML layout for every option pgwarden implements.
//!
//! A `patroni.yml` that uses only these options loads unchanged. Unknown keys are not errors here
//! (they are collected with their full path and warned about by the loader).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::flex;

/// The whole local configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// Cluster name; the DCS base path is `/<namespace>/<scope>`.
    pub scope: String,
    /// DCS namespace, default `/service/`.
    pub namespace: String,
    /// This member's name, unique in the cluster.
    pub name: String,
    pub restapi: RestApiConfig,
    pub etcd3: Option<Etcd3Config>,
    /// Kubernetes mode (`docs/kubernetes.md`): the DCS is the Kubernetes API.
    pub kubernetes: Option<KubernetesConfig>,
    pub bootstrap: BootstrapConfig,
    pub postgresql: PostgresqlConfig,
    pub tags: Tags,
    pub log: LogConfig,
    /// WAL archiving, backups and restores with pgBackRest (`crate::backup`).
    pub pgbackrest: Option<crate::backup::settings::PgBackRestConfig>,
}

/// `restapi`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct RestApiConfig {
    /// `host:port` to bind, default `0.0.0.0:8008` (Patroni requires it; we default it).
    pub listen: String,
    /// `host:port` other members and clients use; published in `api_url`.
    pub connect_address: String,
    pub authentication: Option<Credentials>,
    /// Serve the API over TLS with this certificate chain (PEM) and key.
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    /// CA (PEM) that other members' certificates are verified against when calling their
    /// `https` API; without it any certificate is accepted.
    pub cafile: Option<PathBuf>,
    /// Patroni's client-certificate check: only `none` is supported (validation refuses
    /// `optional` and `required` rather than serve without the check the user asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_client: Option<String>,
}

/// `etcd3`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Etcd3Config {
    /// `host:port` endpoints. Patroni also accepts a comma-separated string.
    #[serde(deserialize_with = "string_or_list")]
    pub hosts: Vec<String>,
    /// Single endpoint form (`host: 127.0.0.1:2379`), merged into `hosts`.
    pub host: Option<String>,
    /// `http` (default) or `https`.
    pub protocol: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// `kubernetes`: Patroni's section where it applies (`docs/kubernetes.md`). The leader is a
/// `coordination.k8s.io/v1` Lease instead of Patroni's Endpoints/ConfigMap annotations.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct KubernetesConfig {
    /// Namespace of the Pods, the Lease and the ConfigMaps. Default: the service account's
    /// namespace inside a Pod, else `default`.
    pub namespace: Option<String>,
    /// Labels every member Pod carries (and that the ConfigMaps get); with `scope_label` they
    /// select the members.
    pub labels: BTreeMap<String, String>,
    /// Label whose value is the scope (default `cluster-name`).
    pub scope_label: String,
    /// Label the agent sets on its own Pod to its role (default `role`).
    pub role_label: String,
    /// Role label values: `primary` (Patroni ≥ 4; choose `master` for older Services),
    /// `replica`, and the standby leader's (default: the leader's).
    pub leader_label_value: String,
    pub follower_label_value: String,
    pub standby_leader_label_value: Option<String>,
    /// The Pod's IP (`status.podIP`); the default host of `restapi.connect_address` and
    /// `postgresql.connect_address` when those are unset.
    pub pod_ip: Option<String>,
    /// Accepted as Patroni's (ports of the leader Endpoints); pgwarden writes no Endpoints, so
    /// they are not used.
    pub ports: Vec<serde_json::Value>,
    /// Name of the leader Lease (default `<scope>-leader`).
    pub leader_lease: Option<String>,
    /// Patroni's Endpoints-based leader; not supported (validation rejects `true`).
    pub use_endpoints: bool,
    /// Accepted for compatibility; the client always talks to the configured API server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bypass_api_service: Option<bool>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            namespace: None,
            labels: BTreeMap::new(),
            scope_label: "cluster-name".to_owned(),
            role_label: "role".to_owned(),
            leader_label_value: "primary".to_owned(),
            follower_label_value: "replica".to_owned(),
            standby_leader_label_value: None,
            pod_ip: None,
            ports: Vec::new(),
            leader_lease: None,
            use_endpoints: false,
            bypass_api_service: None,
        }
    }
}

/// `bootstrap`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct BootstrapConfig {
    /// Seeds the DCS `config` key when this member initializes the cluster.
    pub dcs: DynamicConfig,
    /// Extra initdb options, in Patroni's form: strings (`data-checksums`) or one-key maps
    /// (`encoding: UTF8`).
    pub initdb: Vec<InitdbOption>,
    /// `initdb` (default), `pgbackrest` (restore the repository instead of running initdb) or
    /// the name of a custom method: a `bootstrap.<name>` section with a `command`
    /// ([`crate::postgres::custom_bootstrap`]).
    pub method: Option<String>,
    /// Restore settings for `method: pgbackrest`.
    pub pgbackrest: Option<crate::backup::settings::BootstrapFromBackup>,
    /// A command run once after the bootstrap (any method), with a connection string for the
    /// local superuser as its last argument (Patroni's `post_bootstrap`, formerly `post_init`).
    #[serde(alias = "post_init")]
    pub post_bootstrap: Option<String>,
    /// Every other `bootstrap.<name>` section, as written: the custom method that `method`
    /// names is parsed at validation; the others are warned about as unknown keys.
    #[serde(flatten)]
    pub sections: BTreeMap<String, serde_yaml::Value>,
    /// Patroni's custom bootstrap method written under the name `pgbackrest` (a
    /// `bootstrap.pgbackrest` section with a `command`, as Patroni's documentation shows it):
    /// taken out of `pgbackrest` at load (`config::load`), which then stays pgwarden's own
    /// restore settings.
    #[serde(skip)]
    pub custom_pgbackrest: Option<serde_yaml::Value>,
}

impl BootstrapConfig {
    /// `method: pgbackrest` is pgwarden's own restore from the repository, not Patroni's
    /// custom method of that name.
    pub fn restores_with_pgbackrest(&self) -> bool {
        self.method.as_deref() == Some("pgbackrest") && self.custom_pgbackrest.is_none()
    }

    /// `method` names a custom method (neither initdb nor pgwarden's own restore).
    pub fn is_custom(&self) -> bool {
        !matches!(self.method.as_deref(), None | Some("initdb")) && !self.restores_with_pgbackrest()
    }

    /// The `bootstrap.<name>` section of the custom method `name`.
    pub fn custom_section(&self, name: &str) -> Option<&serde_yaml::Value> {
        match name {
            "pgbackrest" => self.custom_pgbackrest.as_ref(),
            _ => self.sections.get(name),
        }
    }
}

/// `synchronous_mode`: off, on (every listed standby acknowledges a commit, Patroni's
/// `FIRST n`), or `quorum` (any `synchronous_node_count` of them, `ANY n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynchronousMode {
    #[default]
    Off,
    On,
    Quorum,
}

impl SynchronousMode {
    /// Who may take over under this mode.
    pub fn race_rule(self) -> crate::ha::decide::SyncRule {
        match self {
            SynchronousMode::Off => crate::ha::decide::SyncRule::Off,
            SynchronousMode::On => crate::ha::decide::SyncRule::Listed,
            SynchronousMode::Quorum => crate::ha::decide::SyncRule::Quorum,
        }
    }

    /// Read from a raw `config` value as leniently as Patroni does; absent or unreadable is
    /// off.
    pub fn of_config(value: Option<&serde_json::Value>) -> Self {
        value
            .and_then(|v| flex::synchronous_mode(v.clone()).ok())
            .unwrap_or_default()
    }

    /// Synchronous replication in either form.
    pub fn is_on(self) -> bool {
        self != SynchronousMode::Off
    }

    pub fn is_quorum(self) -> bool {
        self == SynchronousMode::Quorum
    }
}

impl Serialize for SynchronousMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SynchronousMode::Off => s.serialize_bool(false),
            SynchronousMode::On => s.serialize_bool(true),
            SynchronousMode::Quorum => s.serialize_str("quorum"),
        }
    }
}

impl<'de> Deserialize<'de> for SynchronousMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        flex::synchronous_mode(d)
    }
}

/// One `bootstrap.initdb` entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum InitdbOption {
    Flag(String),
    Value(BTreeMap<String, serde_yaml::Value>),
}

/// The cluster-wide ("dynamic") configuration, as stored in the DCS `config` key.
///
/// Keys we do not model are kept in `extra` so a round trip through the DCS loses nothing.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct DynamicConfig {
    /// Lease TTL in seconds (default 30).
    #[serde(deserialize_with = "flex::u32")]
    pub ttl: u32,
    /// HA loop period in seconds (default 10).
    #[serde(deserialize_with = "flex::u32")]
    pub loop_wait: u32,
    /// Deadline for one DCS operation or postgres query, in seconds (default 10).
    #[serde(deserialize_with = "flex::u32")]
    pub retry_timeout: u32,
    /// Bytes a replica may lag and still race for leadership (default 1 MiB).
    #[serde(deserialize_with = "flex::u64")]
    pub maximum_lag_on_failover: u64,
    /// Seconds a crashed primary may take to restart in place (default 300). Patroni's
    /// pre-4.0 name `master_start_timeout` is renamed to it when loaded.
    #[serde(deserialize_with = "flex::u32")]
    pub primary_start_timeout: u32,
    /// Seconds the leader keeps the replication slot of a member whose key is gone
    /// (default 1800; 0 drops it at once), published as `retain_slots` in `status`.
    #[serde(deserialize_with = "flex::u32")]
    pub member_slots_ttl: u32,
    /// `true`/`on`/… as Patroni spells booleans, or `quorum`.
    pub synchronous_mode: SynchronousMode,
    #[serde(deserialize_with = "flex::bool")]
    pub synchronous_mode_strict: bool,
    /// How many synchronous standbys the leader keeps in synchronous mode (default 1, at
    /// least 1); fewer while fewer are eligible, as in Patroni.
    #[serde(deserialize_with = "flex::node_count")]
    pub synchronous_node_count: u32,
    /// Bytes a synchronous standby may lag behind the most advanced candidate (or the leader,
    /// when it is the only one) before a closer standby replaces it; 0 or less (default -1)
    /// never replaces one for lag, as in Patroni.
    #[serde(deserialize_with = "flex::lag_on_syncnode")]
    pub maximum_lag_on_syncnode: i64,
    #[serde(deserialize_with = "flex::bool")]
    pub check_timeline: bool,
    /// Patroni's `failsafe_mode`: with the DCS out of reach, the leader stays primary while
    /// every member of the `failsafe` topology accepts its `POST /failsafe` (`crate::ha::failsafe`).
    #[serde(
        skip_serializing_if = "std::ops::Not::not",
        deserialize_with = "flex::bool"
    )]
    pub failsafe_mode: bool,
    pub postgresql: DynamicPostgresql,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "flex::opt_bool"
    )]
    pub pause: Option<bool>,
    /// Run as a standby of another cluster (Patroni's `standby_cluster`): the leader, the
    /// standby leader, replicates from `host:port` or from the archive, and nothing accepts
    /// writes until this is removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_cluster: Option<StandbyCluster>,
    /// Patroni's permanent slots, by name (`super::slots`); `permanent_slots` and
    /// `permanent_replication_slots`, its other names, are read as this.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub slots: BTreeMap<String, serde_json::Value>,
    /// Slots pgwarden leaves alone although it did not create them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignore_slots: Vec<super::slots::IgnoreSlot>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl DynamicConfig {
    /// Patroni's `is_standby_cluster`: a `standby_cluster` section that names a source.
    pub fn standby_source(&self) -> Option<&StandbyCluster> {
        self.standby_cluster.as_ref().filter(|s| s.names_a_source())
    }
}

/// `standby_cluster`: where the standby leader of a standby cluster takes its WAL from.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct StandbyCluster {
    /// The source's primary (or anything that streams its WAL, e.g. its primary Service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "flex::opt_port"
    )]
    pub port: Option<u16>,
    /// A slot on the source to stream through; without it the standby leader uses none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_slot_name: Option<String>,
    /// How the first member clones the source (`basebackup`, `pgbackrest`, a custom method of
    /// `postgresql`); default: `basebackup`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub create_replica_methods: Vec<String>,
    /// Fetches WAL from the source's archive, on every member of the standby cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_cleanup_command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_min_apply_delay: Option<PgValue>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl StandbyCluster {
    /// Patroni counts a section as a standby cluster when it has `host`, `port` or
    /// `restore_command`.
    pub fn names_a_source(&self) -> bool {
        self.host.is_some() || self.port.is_some() || self.restore_command.is_some()
    }

    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(5432)
    }
}

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig {
            ttl: 30,
            loop_wait: 10,
            retry_timeout: 10,
            maximum_lag_on_failover: 1_048_576,
            primary_start_timeout: 300,
            member_slots_ttl: 1800,
            synchronous_mode: SynchronousMode::Off,
            synchronous_mode_strict: false,
            synchronous_node_count: 1,
            maximum_lag_on_syncnode: -1,
            check_timeline: false,
            failsafe_mode: false,
            postgresql: DynamicPostgresql::default(),
            pause: None,
            standby_cluster: None,
            slots: BTreeMap::new(),
            ignore_slots: Vec::new(),
            extra: BTreeMap::new(),
        }
    }
}

/// `bootstrap.dcs.postgresql` / `config.postgresql`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct DynamicPostgresql {
    pub parameters: BTreeMap<String, PgValue>,
    #[serde(deserialize_with = "flex::bool")]
    pub use_pg_rewind: bool,
    #[serde(deserialize_with = "flex::bool")]
    pub use_slots: bool,
    /// Cluster-wide `pg_hba.conf` lines (Patroni's sample configuration puts them here); the
    /// local `postgresql.pg_hba` wins when it is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_hba: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Default for DynamicPostgresql {
    fn default() -> Self {
        DynamicPostgresql {
            parameters: BTreeMap::new(),
            use_pg_rewind: false,
            use_slots: true,
            pg_hba: None,
            extra: BTreeMap::new(),
        }
    }
}

/// A postgres parameter value as YAML/JSON may spell it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PgValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl PgValue {
    /// The value as it goes into `postgresql.conf` (quoted by the renderer).
    pub fn as_setting(&self) -> String {
        match self {
            PgValue::Bool(true) => "on".to_owned(),
            PgValue::Bool(false) => "off".to_owned(),
            PgValue::Int(i) => i.to_string(),
            PgValue::Float(f) => f.to_string(),
            PgValue::Text(s) => s.clone(),
        }
    }
}

/// `postgresql`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct PostgresqlConfig {
    /// `host[,host...]:port` to listen on.
    pub listen: String,
    /// `host:port` published in `conn_url`.
    pub connect_address: String,
    pub data_dir: PathBuf,
    /// Directory with `postgres`, `initdb`, `pg_ctl`, `pg_controldata`; found on `PATH` or under
    /// `/usr/lib/postgresql/<newest>/bin` when unset.
    pub bin_dir: Option<PathBuf>,
    /// pgwarden's own: the binaries of each PostgreSQL major version (`15: /usr/lib/...`),
    /// for major-version upgrades. A data directory runs on the entry of its `PG_VERSION`
    /// (else `bin_dir`); a new one (initdb, a clone) on the newest entry (docs/upgrade.md).
    pub bin_dirs: BTreeMap<u32, PathBuf>,
    pub parameters: BTreeMap<String, PgValue>,
    /// `pg_hba.conf` lines; when empty, initdb's file is left as it is.
    pub pg_hba: Vec<String>,
    pub authentication: Authentication,
    /// Connect to the local postgres through its unix socket instead of TCP.
    pub use_unix_socket: bool,
    /// Path of the `.pgpass` file the agent writes for replication and rewind.
    pub pgpass: Option<PathBuf>,
    pub remove_data_directory_on_rewind_failure: bool,
    pub remove_data_directory_on_diverged_timelines: bool,
    /// How a new replica gets its data, tried in order (Patroni's list): `pgbackrest` (restore
    /// from the repository), `basebackup`, or the name of a custom method: a
    /// `postgresql.<name>` section with a `command` ([`crate::postgres::replica_method`]).
    /// Empty: `basebackup` only.
    pub create_replica_methods: Vec<String>,
    /// Scripts run on postgres' start, stop, restart, reload and role change (Patroni's
    /// `postgresql.callbacks`, see [`crate::postgres::callbacks`]).
    #[serde(skip_serializing_if = "CallbacksConfig::is_empty")]
    pub callbacks: CallbacksConfig,
    /// Every other `postgresql.<name>` section, as written: those that
    /// `create_replica_methods` names are custom replica creation methods; the others are
    /// warned about as unknown keys.
    #[serde(flatten)]
    pub sections: BTreeMap<String, serde_yaml::Value>,
}

/// `postgresql.callbacks`: one command line per action, split as a POSIX shell would.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct CallbacksConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_stop: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_restart: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_reload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_role_change: Option<String>,
}

impl CallbacksConfig {
    pub fn is_empty(&self) -> bool {
        self == &CallbacksConfig::default()
    }

    /// The command configured for `action`.
    pub fn command(&self, action: crate::postgres::callbacks::CallbackAction) -> Option<&str> {
        use crate::postgres::callbacks::CallbackAction as A;
        match action {
            A::OnStart => self.on_start.as_deref(),
            A::OnStop => self.on_stop.as_deref(),
            A::OnRestart => self.on_restart.as_deref(),
            A::OnReload => self.on_reload.as_deref(),
            A::OnRoleChange => self.on_role_change.as_deref(),
        }
    }

    /// Each configured command with its key.
    pub fn entries(&self) -> [(&'static str, Option<&str>); 5] {
        [
            ("on_start", self.on_start.as_deref()),
            ("on_stop", self.on_stop.as_deref()),
            ("on_restart", self.on_restart.as_deref()),
            ("on_reload", self.on_reload.as_deref()),
            ("on_role_change", self.on_role_change.as_deref()),
        ]
    }
}

/// `postgresql.authentication`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Authentication {
    pub superuser: Credentials,
    pub replication: Credentials,
    pub rewind: Option<Credentials>,
}

/// A user name and password, and for the postgres roles Patroni's libpq TLS options
/// (`sslmode`, `sslcert`, …), used in the connections made as that role.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Credentials {
    pub username: String,
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslcrl: Option<PathBuf>,
}

/// `tags`. Patroni accepts `"true"`/`"1"` where a boolean or a number is meant and publishes
/// every tag as it was written, so `given` keeps the written values next to the parsed ones.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, try_from = "BTreeMap<String, serde_json::Value>")]
pub struct Tags {
    pub nofailover: bool,
    pub failover_priority: Option<i64>,
    pub noloadbalance: bool,
    pub clonefrom: bool,
    pub nosync: bool,
    /// Patroni's `sync_priority` (default 1): 0 never synchronous, like `nosync`; the higher
    /// is picked first as a synchronous standby. `nosync: true` wins over it.
    pub sync_priority: Option<i64>,
    pub nostream: bool,
    pub replicatefrom: Option<String>,
    /// Any other tag, published as is.
    #[serde(flatten)]
    pub custom: BTreeMap<String, serde_json::Value>,
    /// The predefined tags as written in the file.
    #[serde(skip)]
    pub given: BTreeMap<String, serde_json::Value>,
}

impl TryFrom<BTreeMap<String, serde_json::Value>> for Tags {
    type Error = String;

    fn try_from(map: BTreeMap<String, serde_json::Value>) -> Result<Self, String> {
        let mut tags = Tags::default();
        for (key, value) in map {
            let flag = |v: &serde_json::Value| {
                flex::parse_bool(v).ok_or_else(|| {
                    format!("`tags.{key}`: {v} is not a boolean (true/false, on/off, yes/no, 1/0)")
                })
            };
            match key.as_str() {
                "nofailover" => tags.nofailover = flag(&value)?,
                "noloadbalance" => tags.noloadbalance = flag(&value)?,
                "clonefrom" => tags.clonefrom = flag(&value)?,
                "nosync" => tags.nosync = flag(&value)?,
                "nostream" => tags.nostream = flag(&value)?,
                "failover_priority" => {
                    tags.failover_priority = match &value {
                        serde_json::Value::Null => None,
                        v => Some(flex::parse_int(v).ok_or_else(|| {
                            format!("`tags.failover_priority`: {v} is not an integer")
                        })?),
                    }
                }
                "sync_priority" => {
                    tags.sync_priority = match &value {
                        serde_json::Value::Null => None,
                        v => Some(flex::parse_int(v).ok_or_else(|| {
                            format!("`tags.sync_priority`: {v} is not an integer")
                        })?),
                    }
                }
                "replicatefrom" => {
                    tags.replicatefrom = match &value {
                        serde_json::Value::Null => None,
                        serde_json::Value::String(s) => Some(s.clone()),
                        v => Some(v.to_string()),
                    }
                }
                _ => {
                    tags.custom.insert(key, value);
                    continue;
                }
            }
            tags.given.insert(key, value);
        }
        Ok(tags)
    }
}

/// `log`. `format` and `dateformat` lay plain lines out as Patroni does (`crate::logging`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct LogConfig {
    /// `plain` (default) or `json`, as Patroni's `log.type`.
    #[serde(rename = "type")]
    pub kind: LogFormat,
    /// Patroni's level names (`DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`) or a tracing
    /// filter directive such as `pgwarden=debug`.
    pub level: String,
    /// A Python logging format string for plain lines (Patroni's JSON field list is not used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<serde_yaml::Value>,
    /// A `strftime` format for `%(asctime)s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dateformat: Option<serde_yaml::Value>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            kind: LogFormat::Plain,
            level: "INFO".to_owned(),
            format: None,
            dateformat: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

fn string_or_list<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Hosts {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Hosts::deserialize(deserializer)? {
        Hosts::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Hosts::Many(v) => v,
    })
}
