//! Loading: YAML file < environment (`PGWARDEN_*`, then Patroni's `PATRONI_*`) < command-line
//! flags; unknown keys become warnings with their full path; type errors and invalid values are
//! errors naming the key path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::schema::{Config, Credentials, Etcd3Config, KubernetesConfig, LogFormat};
use super::validate::FieldError;

/// Values given on the command line; `None` = not given.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub scope: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub restapi_listen: Option<String>,
    pub restapi_connect_address: Option<String>,
    pub etcd3_hosts: Option<Vec<String>>,
    pub postgresql_listen: Option<String>,
    pub postgresql_connect_address: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
    pub log_type: Option<LogFormat>,
    pub log_level: Option<String>,
}

/// A loaded, validated configuration and the warnings to log.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax error or a value of the wrong type, at `path`.
    #[error("`{path}`: {reason}")]
    Parse { path: String, reason: String },
    /// Values that parse but are not acceptable: every problem, each with its path.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

/// Loads from an optional file, the environment map and flags.
pub fn load(
    path: Option<&Path>,
    env: &BTreeMap<String, String>,
    overrides: &Overrides,
) -> Result<Loaded, ConfigError> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.to_owned(),
            source,
        })?,
        None => String::new(),
    };
    load_str(&text, env, overrides)
}

/// Like [`load`], from YAML text.
pub fn load_str(
    yaml: &str,
    env: &BTreeMap<String, String>,
    overrides: &Overrides,
) -> Result<Loaded, ConfigError> {
    let (mut config, mut warnings) = parse_yaml(yaml)?;
    apply_env(&mut config, env)?;
    apply_overrides(&mut config, overrides);
    apply_defaults(&mut config);
    config.validate().map_err(ConfigError::Invalid)?;
    warnings.extend(tls_warnings(&config));
    warnings.extend(config.bootstrap.dcs.unimplemented("bootstrap.dcs"));
    // `postgresql.<name>` sections other than custom replica methods (of this cluster or, for
    // its first member, of the standby cluster it bootstraps) are not used.
    let standby_methods = config
        .bootstrap
        .dcs
        .standby_cluster
        .as_ref()
        .map(|s| s.create_replica_methods.as_slice())
        .unwrap_or_default();
    for k in config.postgresql.sections.keys() {
        if !config.postgresql.create_replica_methods.contains(k) && !standby_methods.contains(k) {
            warnings.push(unknown_key(&format!("postgresql.{k}")));
        }
    }
    // `bootstrap.<name>` sections other than the selected custom method are not used.
    warnings.extend(
        config
            .bootstrap
            .sections
            .keys()
            .filter(|k| config.bootstrap.method.as_deref() != Some(k.as_str()))
            .map(|k| unknown_key(&format!("bootstrap.{k}"))),
    );
    for (prefix, params) in [
        (
            "bootstrap.dcs.postgresql.parameters",
            &config.bootstrap.dcs.postgresql.parameters,
        ),
        ("postgresql.parameters", &config.postgresql.parameters),
    ] {
        warnings.extend(super::dynamic::managed_warnings(
            params.iter().map(|(k, v)| (k, v.as_setting())),
            prefix,
        ));
    }
    warnings.extend(config.bootstrap.dcs.adjust_timeouts("bootstrap.dcs"));
    Ok(Loaded { config, warnings })
}

/// The roles' libpq TLS options reach replication, pg_basebackup and pg_rewind; the agent's
/// own SQL sessions (status queries, the pre-rewind check) are made without TLS, which a user
/// who asked for encryption must be told.
fn tls_warnings(config: &Config) -> Vec<String> {
    let auth = &config.postgresql.authentication;
    [
        ("superuser", Some(&auth.superuser)),
        ("rewind", auth.rewind.as_ref()),
    ]
    .into_iter()
    .filter_map(|(role, creds)| {
        let mode = creds?.sslmode.as_deref()?;
        matches!(mode, "require" | "verify-ca" | "verify-full").then(|| {
            format!(
                "`postgresql.authentication.{role}.sslmode` = {mode} applies to pg_rewind; \
                 the agent's own SQL connections (to the local postgres, and its check of \
                 the leader before a rewind) do not use TLS"
            )
        })
    })
    .collect()
}

/// Loads what the operator CLI needs (scope, namespace, etcd, REST credentials) without
/// requiring the agent-only settings such as the data directory.
pub fn load_ctl(
    path: Option<&Path>,
    env: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.to_owned(),
            source,
        })?,
        None => String::new(),
    };
    let (mut config, _) = parse_yaml(&text)?;
    apply_env(&mut config, env)?;
    apply_defaults(&mut config);
    let mut errors = Vec::new();
    if config.scope.is_empty() {
        errors.push(FieldError {
            path: "scope".into(),
            reason: "is required to find the cluster".into(),
        });
    }
    match (&config.etcd3, &config.kubernetes) {
        (Some(_), Some(_)) => errors.push(FieldError {
            path: "kubernetes".into(),
            reason: "and etcd3 are both configured: choose one DCS".into(),
        }),
        // Kubernetes mode: the API server and credentials come from the kubeconfig
        // (`KUBECONFIG`, `~/.kube/config`) or the Pod's service account, as patronictl's.
        (None, Some(_)) => {}
        (etcd, None) => {
            if etcd.as_ref().is_none_or(|e| e.hosts.is_empty()) {
                errors.push(FieldError {
                    path: "etcd3.hosts".into(),
                    reason: "is required to reach the cluster's etcd (or `kubernetes` for a cluster in Kubernetes)".into(),
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(errors))
    }
}

/// Formats a serde path (`a.b[0].c`) from serde_ignored/serde_path_to_error segments.
fn parse_yaml(yaml: &str) -> Result<(Config, Vec<String>), ConfigError> {
    if yaml.trim().is_empty() {
        return Ok((Config::default(), Vec::new()));
    }
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(yaml).map_err(|e| ConfigError::Parse {
            path: e
                .location()
                .map(|l| format!("line {}, column {}", l.line(), l.column()))
                .unwrap_or_else(|| "(document)".into()),
            reason: e.to_string(),
        })?;
    if !value.is_mapping() {
        return Err(ConfigError::Parse {
            path: "(document)".into(),
            reason: "the configuration must be a mapping of keys to values".into(),
        });
    }
    let mut normalized = normalize_bootstrap_dcs(&mut value);
    let custom_pgbackrest = take_custom_pgbackrest(&mut value);
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
    let result: Result<Config, _> = serde_ignored::deserialize(deserializer, |path| {
        unknown.push(path.to_string());
    });
    match result {
        Ok(mut config) => {
            config.bootstrap.custom_pgbackrest = custom_pgbackrest;
            let mut warnings: Vec<String> = unknown.iter().map(|p| unknown_key(p)).collect();
            warnings.append(&mut normalized);
            Ok((config, warnings))
        }
        Err(e) => {
            let path = track.path().to_string();
            let reason = explain(&path, &e.to_string());
            Err(ConfigError::Parse { path, reason })
        }
    }
}

/// Patroni's old names and spellings in `bootstrap.dcs` (`dynamic::normalize`), applied to the
/// YAML before it is parsed.
/// Takes out `bootstrap.pgbackrest` when it is Patroni's custom bootstrap method of that name
/// (it has a `command`) rather than pgwarden's own restore settings.
fn take_custom_pgbackrest(value: &mut serde_yaml::Value) -> Option<serde_yaml::Value> {
    let bootstrap = value.get_mut("bootstrap")?.as_mapping_mut()?;
    let custom = bootstrap
        .get("pgbackrest")
        .is_some_and(|section| section.get("command").is_some());
    if custom {
        bootstrap.remove("pgbackrest")
    } else {
        None
    }
}

fn normalize_bootstrap_dcs(value: &mut serde_yaml::Value) -> Vec<String> {
    let Some(dcs) = value
        .get_mut("bootstrap")
        .and_then(|b| b.get_mut("dcs"))
        .filter(|d| d.is_mapping())
    else {
        return Vec::new();
    };
    // A mapping with keys JSON cannot hold is left for the parser to report.
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::to_value(&*dcs) else {
        return Vec::new();
    };
    let warnings = super::dynamic::normalize(&mut obj, "bootstrap.dcs");
    if let Ok(v) = serde_yaml::to_value(serde_json::Value::Object(obj)) {
        *dcs = v;
    }
    warnings
}

/// The warning for a key the schema does not know; Patroni options get the reason.
fn unknown_key(path: &str) -> String {
    let top = path.split(['.', '[']).next().unwrap_or(path);
    match top {
        "watchdog" => format!(
            "`{path}` ignored: pgwarden does not drive a watchdog device; its fence and the \
             separate fence-guard process stop postgres before the leader lease can expire \
             (docs/fencing.md)"
        ),
        "ctl" | "citus" | "raft" | "zookeeper" | "consul" | "etcd" | "exhibitor" => {
            format!("`{path}` ignored: this Patroni option is not implemented by pgwarden")
        }
        _ => format!("unknown configuration key `{path}` ignored"),
    }
}

/// Turns serde's untagged-enum message into something a person can act on.
fn explain(path: &str, message: &str) -> String {
    if message.contains("did not match any variant of untagged enum PgValue") {
        return "a postgresql parameter must be a string, a number or a boolean".into();
    }
    if message.contains("did not match any variant of untagged enum InitdbOption") {
        return format!(
            "an initdb option must be a flag (`- data-checksums`) or a one-key mapping \
             (`- encoding: UTF8`) (at {path})"
        );
    }
    message.to_owned()
}

fn env_value<'a>(env: &'a BTreeMap<String, String>, suffix: &str) -> Option<(&'a str, String)> {
    for prefix in ["PGWARDEN_", "PATRONI_"] {
        let key = format!("{prefix}{suffix}");
        if let Some((k, v)) = env.get_key_value(&key) {
            return Some((v.as_str(), k.clone()));
        }
    }
    None
}

fn apply_env(config: &mut Config, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let get = |suffix: &str| env_value(env, suffix).map(|(v, _)| v.to_owned());
    if let Some(v) = get("SCOPE") {
        config.scope = v;
    }
    if let Some(v) = get("NAME") {
        config.name = v;
    }
    if let Some(v) = get("NAMESPACE") {
        config.namespace = v;
    }
    if let Some(v) = get("RESTAPI_LISTEN") {
        config.restapi.listen = v;
    }
    if let Some(v) = get("RESTAPI_CONNECT_ADDRESS") {
        config.restapi.connect_address = v;
    }
    if let Some(v) = get("RESTAPI_USERNAME") {
        config
            .restapi
            .authentication
            .get_or_insert_with(Credentials::default)
            .username = v;
    }
    if let Some(v) = get("RESTAPI_CERTFILE") {
        config.restapi.certfile = Some(PathBuf::from(v));
    }
    if let Some(v) = get("RESTAPI_KEYFILE") {
        config.restapi.keyfile = Some(PathBuf::from(v));
    }
    if let Some(v) = get("RESTAPI_CAFILE") {
        config.restapi.cafile = Some(PathBuf::from(v));
    }
    if let Some(v) = get("RESTAPI_VERIFY_CLIENT") {
        config.restapi.verify_client = Some(v);
    }
    if let Some(v) = get("RESTAPI_PASSWORD") {
        config
            .restapi
            .authentication
            .get_or_insert_with(Credentials::default)
            .password = Some(v);
    }
    let etcd_keys = [
        "ETCD3_HOSTS",
        "ETCD3_HOST",
        "ETCD3_PROTOCOL",
        "ETCD3_USERNAME",
        "ETCD3_PASSWORD",
    ];
    if etcd_keys.iter().any(|k| get(k).is_some()) {
        let etcd = config.etcd3.get_or_insert_with(Etcd3Config::default);
        if let Some(v) = get("ETCD3_HOSTS") {
            etcd.hosts = split_list(&v);
        }
        if let Some(v) = get("ETCD3_HOST") {
            etcd.host = Some(v);
        }
        if let Some(v) = get("ETCD3_PROTOCOL") {
            etcd.protocol = Some(v);
        }
        if let Some(v) = get("ETCD3_USERNAME") {
            etcd.username = Some(v);
        }
        if let Some(v) = get("ETCD3_PASSWORD") {
            etcd.password = Some(v);
        }
    }
    apply_kubernetes_env(config, env)?;
    // S3 credentials of a repository from a Secret (the controller's StatefulSet), so they
    // need not be in the configuration file: PGWARDEN_PGBACKREST_REPO<n>_S3_KEY[_SECRET].
    if let Some(backrest) = &mut config.pgbackrest {
        for (i, repo) in backrest.repos.iter_mut().enumerate() {
            let n = i + 1;
            if let Some(v) = get(&format!("PGBACKREST_REPO{n}_S3_KEY")) {
                repo.s3_key = Some(v);
            }
            if let Some(v) = get(&format!("PGBACKREST_REPO{n}_S3_KEY_SECRET")) {
                repo.s3_key_secret = Some(v);
            }
        }
    }
    if let Some(v) = get("POSTGRESQL_LISTEN") {
        config.postgresql.listen = v;
    }
    if let Some(v) = get("POSTGRESQL_CONNECT_ADDRESS") {
        config.postgresql.connect_address = v;
    }
    if let Some(v) = get("POSTGRESQL_DATA_DIR") {
        config.postgresql.data_dir = PathBuf::from(v);
    }
    if let Some(v) = get("POSTGRESQL_BIN_DIR") {
        config.postgresql.bin_dir = Some(PathBuf::from(v));
    }
    if let Some(v) = get("POSTGRESQL_PGPASS") {
        config.postgresql.pgpass = Some(PathBuf::from(v));
    }
    let auth = &mut config.postgresql.authentication;
    if let Some(v) = get("SUPERUSER_USERNAME") {
        auth.superuser.username = v;
    }
    if let Some(v) = get("SUPERUSER_PASSWORD") {
        auth.superuser.password = Some(v);
    }
    if let Some(v) = get("REPLICATION_USERNAME") {
        auth.replication.username = v;
    }
    if let Some(v) = get("REPLICATION_PASSWORD") {
        auth.replication.password = Some(v);
    }
    // Patroni's PATRONI_REWIND_*: a container image sets the rewind role by environment too.
    if let Some(v) = get("REWIND_USERNAME") {
        auth.rewind
            .get_or_insert_with(Credentials::default)
            .username = v;
    }
    if let Some(v) = get("REWIND_PASSWORD") {
        auth.rewind
            .get_or_insert_with(Credentials::default)
            .password = Some(v);
    }
    // Patroni's PATRONI_<ROLE>_SSLMODE etc.: libpq TLS options of each postgres role.
    for (role, creds) in [
        ("SUPERUSER", Some(&mut auth.superuser)),
        ("REPLICATION", Some(&mut auth.replication)),
        ("REWIND", auth.rewind.as_mut()),
    ] {
        let Some(creds) = creds else { continue };
        if let Some(v) = get(&format!("{role}_SSLMODE")) {
            creds.sslmode = Some(v);
        }
        for (suffix, field) in [
            ("SSLCERT", &mut creds.sslcert),
            ("SSLKEY", &mut creds.sslkey),
            ("SSLROOTCERT", &mut creds.sslrootcert),
            ("SSLCRL", &mut creds.sslcrl),
        ] {
            if let Some(v) = get(&format!("{role}_{suffix}")) {
                *field = Some(PathBuf::from(v));
            }
        }
    }
    if let Some((v, key)) = env_value(env, "LOG_TYPE") {
        config.log.kind = match v.to_ascii_lowercase().as_str() {
            "plain" => LogFormat::Plain,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::Parse {
                    path: key,
                    reason: format!("unknown log type {other:?}: use plain or json"),
                })
            }
        };
    }
    if let Some(v) = get("LOG_LEVEL") {
        config.log.level = v;
    }
    if let Some(v) = get("LOG_FORMAT") {
        config.log.format = Some(serde_yaml::Value::String(v));
    }
    if let Some(v) = get("LOG_DATEFORMAT") {
        config.log.dateformat = Some(serde_yaml::Value::String(v));
    }
    Ok(())
}

/// Patroni's `PATRONI_KUBERNETES_*` variables; any of them selects Kubernetes mode.
fn apply_kubernetes_env(
    config: &mut Config,
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let keys = [
        "KUBERNETES_NAMESPACE",
        "KUBERNETES_LABELS",
        "KUBERNETES_SCOPE_LABEL",
        "KUBERNETES_ROLE_LABEL",
        "KUBERNETES_LEADER_LABEL_VALUE",
        "KUBERNETES_FOLLOWER_LABEL_VALUE",
        "KUBERNETES_STANDBY_LEADER_LABEL_VALUE",
        "KUBERNETES_POD_IP",
        "KUBERNETES_PORTS",
        "KUBERNETES_USE_ENDPOINTS",
        "KUBERNETES_LEADER_LEASE",
    ];
    if !keys.iter().any(|k| env_value(env, k).is_some()) {
        return Ok(());
    }
    let get = |suffix: &str| env_value(env, suffix).map(|(v, _)| v.to_owned());
    let k = config
        .kubernetes
        .get_or_insert_with(KubernetesConfig::default);
    if let Some(v) = get("KUBERNETES_NAMESPACE") {
        k.namespace = Some(v);
    }
    if let Some((v, key)) = env_value(env, "KUBERNETES_LABELS") {
        k.labels = serde_json::from_str(v).map_err(|e| ConfigError::Parse {
            path: key,
            reason: format!("must be a JSON object of label names to values: {e}"),
        })?;
    }
    if let Some(v) = get("KUBERNETES_SCOPE_LABEL") {
        k.scope_label = v;
    }
    if let Some(v) = get("KUBERNETES_ROLE_LABEL") {
        k.role_label = v;
    }
    if let Some(v) = get("KUBERNETES_LEADER_LABEL_VALUE") {
        k.leader_label_value = v;
    }
    if let Some(v) = get("KUBERNETES_FOLLOWER_LABEL_VALUE") {
        k.follower_label_value = v;
    }
    if let Some(v) = get("KUBERNETES_STANDBY_LEADER_LABEL_VALUE") {
        k.standby_leader_label_value = Some(v);
    }
    if let Some(v) = get("KUBERNETES_POD_IP") {
        k.pod_ip = Some(v);
    }
    if let Some(v) = get("KUBERNETES_LEADER_LEASE") {
        k.leader_lease = Some(v);
    }
    if let Some((v, key)) = env_value(env, "KUBERNETES_PORTS") {
        k.ports = serde_json::from_str(v).map_err(|e| ConfigError::Parse {
            path: key,
            reason: format!("must be a JSON list of ports: {e}"),
        })?;
    }
    if let Some(v) = get("KUBERNETES_USE_ENDPOINTS") {
        k.use_endpoints = matches!(v.to_ascii_lowercase().as_str(), "true" | "on" | "yes" | "1");
    }
    Ok(())
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn apply_overrides(config: &mut Config, o: &Overrides) {
    let set = |target: &mut String, v: &Option<String>| {
        if let Some(v) = v {
            *target = v.clone();
        }
    };
    set(&mut config.scope, &o.scope);
    set(&mut config.name, &o.name);
    set(&mut config.namespace, &o.namespace);
    set(&mut config.restapi.listen, &o.restapi_listen);
    set(
        &mut config.restapi.connect_address,
        &o.restapi_connect_address,
    );
    set(&mut config.postgresql.listen, &o.postgresql_listen);
    set(
        &mut config.postgresql.connect_address,
        &o.postgresql_connect_address,
    );
    if let Some(hosts) = &o.etcd3_hosts {
        config.etcd3.get_or_insert_with(Etcd3Config::default).hosts = hosts.clone();
    }
    if let Some(d) = &o.data_dir {
        config.postgresql.data_dir = d.clone();
    }
    if let Some(d) = &o.bin_dir {
        config.postgresql.bin_dir = Some(d.clone());
    }
    if let Some(t) = o.log_type {
        config.log.kind = t;
    }
    if let Some(l) = &o.log_level {
        config.log.level = l.clone();
    }
}

fn is_wildcard(host: &str) -> bool {
    matches!(host, "" | "*" | "0.0.0.0" | "::" | "[::]")
}

fn apply_defaults(config: &mut Config) {
    if config.namespace.is_empty() {
        config.namespace = "/service/".into();
    }
    if config.name.is_empty() {
        if let Ok(host) = nix::unistd::gethostname() {
            config.name = host.to_string_lossy().into_owned();
        }
    }
    if config.restapi.listen.is_empty() {
        config.restapi.listen = "0.0.0.0:8008".into();
    }
    // In a Pod the wildcard listen addresses are reachable at the Pod's IP.
    let pod_ip = config.kubernetes.as_ref().and_then(|k| k.pod_ip.clone());
    if let Some(ip) = pod_ip.filter(|ip| !ip.is_empty()) {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        if config.restapi.connect_address.is_empty() {
            if let Some((_, port)) = config.restapi.listen.rsplit_once(':') {
                config.restapi.connect_address = format!("{host}:{port}");
            }
        }
        if config.postgresql.connect_address.is_empty() {
            if let Some((_, port)) = config.postgresql.listen.rsplit_once(':') {
                config.postgresql.connect_address = format!("{host}:{port}");
            }
        }
    }
    if config.restapi.connect_address.is_empty() {
        if let Some((host, _)) = config.restapi.listen.rsplit_once(':') {
            if !is_wildcard(host) {
                config.restapi.connect_address = config.restapi.listen.clone();
            }
        }
    }
    if config.postgresql.connect_address.is_empty() {
        if let Some((hosts, port)) = config.postgresql.listen.rsplit_once(':') {
            let first = hosts.split(',').next().unwrap_or("").trim();
            if !is_wildcard(first) {
                config.postgresql.connect_address = format!("{first}:{port}");
            }
        }
    }
    if let Some(etcd) = &mut config.etcd3 {
        if let Some(host) = etcd.host.take() {
            if !etcd.hosts.contains(&host) {
                etcd.hosts.push(host);
            }
        }
    }
}
