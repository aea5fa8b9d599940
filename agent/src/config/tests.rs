//! Loader and validator tests: a Patroni-style file loads unchanged; every invalid value names
//! its key path and a reason.

use std::collections::BTreeMap;

use super::*;

/// Patroni's `postgres0.yml` style, restricted to the options pgwarden implements.
const PATRONI_YML: &str = r#"
scope: batman
namespace: /service/
name: postgresql0
restapi:
  listen: 127.0.0.1:8008
  connect_address: 127.0.0.1:8008
etcd3:
  hosts: 127.0.0.1:2379
bootstrap:
  dcs:
    ttl: 30
    loop_wait: 10
    retry_timeout: 10
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        max_connections: 100
        wal_level: replica
        hot_standby: "on"
  initdb:
  - encoding: UTF8
  - data-checksums
postgresql:
  listen: 127.0.0.1:5432
  connect_address: 127.0.0.1:5432
  data_dir: data/postgresql0
  pgpass: /tmp/pgpass0
  authentication:
    replication:
      username: replicator
      password: rep-pass
    superuser:
      username: postgres
      password: zalando
  parameters:
    unix_socket_directories: '/var/run/postgresql'
  pg_hba:
  - host replication replicator 127.0.0.1/32 md5
  - host all all 0.0.0.0/0 md5
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
"#;

fn no_env() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn load_ok(yaml: &str) -> Loaded {
    load_str(yaml, &no_env(), &Overrides::default()).unwrap_or_else(|e| panic!("should load: {e}"))
}

/// Replaces the first line that starts with `from` (after trimming) by `to`.
fn edit(from: &str, to: &str) -> String {
    let mut done = false;
    PATRONI_YML
        .lines()
        .map(|l| {
            if !done && l.trim_start().starts_with(from) {
                done = true;
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}{to}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads `yaml` and returns `(path, reason)` of every error.
fn errors(yaml: &str) -> Vec<(String, String)> {
    match load_str(yaml, &no_env(), &Overrides::default()) {
        Ok(_) => panic!("should be refused:\n{yaml}"),
        Err(ConfigError::Parse { path, reason }) => vec![(path, reason)],
        Err(ConfigError::Invalid(list)) => list.into_iter().map(|e| (e.path, e.reason)).collect(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn assert_error(yaml: &str, path: &str, reason_part: &str) {
    let errs = errors(yaml);
    assert!(
        errs.iter()
            .any(|(p, r)| p == path && r.contains(reason_part)),
        "expected an error at `{path}` containing {reason_part:?}, got {errs:?}"
    );
}

#[test]
fn a_patroni_file_loads_unchanged_without_warnings() {
    let loaded = load_ok(PATRONI_YML);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    assert_eq!(c.scope, "batman");
    assert_eq!(c.dcs_base_path(), "/service/batman");
    assert_eq!(
        c.etcd3.as_ref().map(|e| e.hosts.clone()),
        Some(vec!["127.0.0.1:2379".to_owned()])
    );
    assert_eq!(c.bootstrap.dcs.ttl, 30);
    assert_eq!(c.bootstrap.initdb.len(), 2);
    assert_eq!(
        c.postgresql.authentication.superuser.password.as_deref(),
        Some("zalando")
    );
    assert_eq!(c.postgresql.pg_hba.len(), 2);
    assert_eq!(c.api_url(), "http://127.0.0.1:8008/patroni");
    assert_eq!(c.conn_url(), "postgres://127.0.0.1:5432/postgres");
}

#[test]
fn defaults_are_patronis() {
    let c = load_ok(&edit("ttl: 30", "ttl: 30").replace(
        "    ttl: 30\n    loop_wait: 10\n    retry_timeout: 10\n    maximum_lag_on_failover: 1048576\n",
        "",
    ))
    .config;
    assert_eq!(
        (
            c.bootstrap.dcs.ttl,
            c.bootstrap.dcs.loop_wait,
            c.bootstrap.dcs.retry_timeout
        ),
        (30, 10, 10)
    );
    assert_eq!(c.bootstrap.dcs.maximum_lag_on_failover, 1_048_576);
}

#[test]
fn unknown_keys_are_warned_about_by_full_path() {
    let yaml = format!("{PATRONI_YML}\nwatchdog_x: 1\n").replace(
        "  pgpass: /tmp/pgpass0",
        "  pgpass: /tmp/pgpass0\n  paramters: {a: 1}",
    );
    let loaded = load_ok(&yaml);
    let w = loaded.warnings.join("\n");
    assert!(w.contains("`postgresql.paramters`"), "{w}");
    assert!(w.contains("`watchdog_x`"), "{w}");
}

/// Sections of custom methods are used only when their method is selected; the others are
/// warned about by path (`no_leader` is implemented: no warning).
#[test]
fn custom_method_sections_are_used_or_warned_about() {
    let yaml = PATRONI_YML.replace(
        "  pgpass: /tmp/pgpass0",
        "  pgpass: /tmp/pgpass0\n  create_replica_methods: [copy, basebackup]\n  \
         copy: {command: /bin/copy, no_leader: 1}\n  wal_g: {command: /bin/wal-g}",
    ) + "\n";
    let yaml = yaml.replace(
        "bootstrap:\n",
        "bootstrap:\n  users: {admin: {}}\n  old_method: {command: x}\n",
    );
    let loaded = load_ok(&yaml);
    let w = loaded.warnings.join("\n");
    for path in [
        "`postgresql.wal_g`",
        "`bootstrap.users`",
        "`bootstrap.old_method`",
    ] {
        assert!(w.contains(path), "no warning for {path}: {w}");
    }
    assert!(!w.contains("`postgresql.copy"), "{w}");
}

/// Patroni's documented pgBackRest bootstrap is a custom method named `pgbackrest`
/// (`bootstrap.pgbackrest.command`); without a `command` the section is pgwarden's own
/// restore settings.
#[test]
fn a_bootstrap_pgbackrest_section_with_a_command_is_patronis_custom_method() {
    let yaml = PATRONI_YML.replace(
        "bootstrap:\n",
        "bootstrap:\n  method: pgbackrest\n  pgbackrest:\n    command: /usr/bin/pgbackrest \
         --stanza=demo --delta restore\n    keep_existing_recoveryconf: True\n    \
         no_params: True\n    recovery_conf:\n      recovery_target_action: promote\n      \
         restore_command: pgbackrest --stanza=demo archive-get %f \"%p\"\n",
    );
    let loaded = load_ok(&yaml);
    let boot = &loaded.config.bootstrap;
    assert!(boot.is_custom() && !boot.restores_with_pgbackrest());
    let method = crate::postgres::custom_bootstrap::CustomBootstrap::of(boot)
        .expect("valid")
        .expect("a custom method");
    assert_eq!(
        method.command,
        ["/usr/bin/pgbackrest", "--stanza=demo", "--delta", "restore"]
    );
    let w = loaded.warnings.join("\n");
    assert!(!w.contains("bootstrap.pgbackrest"), "{w}");

    let builtin = PATRONI_YML.replace(
        "bootstrap:\n",
        "bootstrap:\n  method: pgbackrest\n  pgbackrest:\n    stanza: old\n",
    );
    let mut c: crate::config::Config = serde_yaml::from_str(&builtin).expect("parses");
    c.bootstrap.custom_pgbackrest = None;
    assert!(c.bootstrap.restores_with_pgbackrest() && !c.bootstrap.is_custom());
}

/// The topology tags are implemented: no warning.
#[test]
fn topology_tags_are_not_warned_about() {
    let yaml = PATRONI_YML.replace(
        "  nosync: false",
        "  nosync: false\n  nostream: true\n  replicatefrom: pg1",
    );
    let loaded = load_ok(&yaml);
    let w = loaded.warnings.join("\n");
    assert!(!w.contains("`tags.nostream`"), "implemented: {w}");
    assert!(!w.contains("`tags.replicatefrom`"), "implemented: {w}");
    assert!(!w.contains("`tags.clonefrom`"), "{w}");
}

#[test]
fn environment_beats_the_file_and_flags_beat_the_environment() {
    let mut env = BTreeMap::new();
    env.insert("PATRONI_NAME".to_owned(), "from-patroni-env".to_owned());
    env.insert("PGWARDEN_NAME".to_owned(), "from-pgwarden-env".to_owned());
    env.insert("PATRONI_SCOPE".to_owned(), "envscope".to_owned());
    env.insert(
        "PGWARDEN_ETCD3_HOSTS".to_owned(),
        "10.0.0.1:2379, 10.0.0.2:2379".to_owned(),
    );
    let c = load_str(PATRONI_YML, &env, &Overrides::default())
        .expect("loads")
        .config;
    assert_eq!(c.name, "from-pgwarden-env", "PGWARDEN_ wins over PATRONI_");
    assert_eq!(c.scope, "envscope");
    assert_eq!(c.etcd3.map(|e| e.hosts.len()), Some(2));
    let flags = Overrides {
        name: Some("from-flag".into()),
        ..Default::default()
    };
    let c = load_str(PATRONI_YML, &env, &flags).expect("loads").config;
    assert_eq!(c.name, "from-flag");
}

#[test]
fn everything_can_come_from_the_environment() {
    let env: BTreeMap<String, String> = [
        ("PATRONI_SCOPE", "s"),
        ("PATRONI_NAME", "n"),
        ("PATRONI_RESTAPI_LISTEN", "127.0.0.1:8008"),
        ("PATRONI_ETCD3_HOSTS", "127.0.0.1:2379"),
        ("PATRONI_POSTGRESQL_LISTEN", "127.0.0.1:5432"),
        ("PATRONI_POSTGRESQL_DATA_DIR", "/tmp/d"),
        ("PATRONI_SUPERUSER_USERNAME", "postgres"),
        ("PATRONI_REPLICATION_USERNAME", "replicator"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let c = load(None, &env, &Overrides::default())
        .expect("loads")
        .config;
    assert_eq!(
        c.restapi.connect_address, "127.0.0.1:8008",
        "derived from listen"
    );
    assert_eq!(c.postgresql.connect_address, "127.0.0.1:5432");
}

#[test]
fn rewind_credentials_come_from_patroni_rewind_variables() {
    let env: BTreeMap<String, String> = [
        ("PATRONI_REWIND_USERNAME", "rewinder"),
        ("PGWARDEN_REWIND_PASSWORD", "s3cret"),
        ("PATRONI_REWIND_PASSWORD", "loses"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let c = load_str(PATRONI_YML, &env, &Overrides::default())
        .expect("loads")
        .config;
    let rewind = c.postgresql.authentication.rewind.expect("rewind role set");
    assert_eq!(rewind.username, "rewinder");
    assert_eq!(rewind.password.as_deref(), Some("s3cret"), "PGWARDEN_ wins");
}

#[test]
fn invalid_env_value_names_the_variable() {
    let mut env = BTreeMap::new();
    env.insert("PGWARDEN_LOG_TYPE".to_owned(), "xml".to_owned());
    match load_str(PATRONI_YML, &env, &Overrides::default()) {
        Err(ConfigError::Parse { path, reason }) => {
            assert_eq!(path, "PGWARDEN_LOG_TYPE");
            assert!(reason.contains("plain or json"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_configurations_name_the_key_and_the_reason() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            edit("ttl: 30", "ttl: abc"),
            "bootstrap.dcs.ttl",
            "invalid type",
        ),
        (edit("ttl: 30", "ttl: 2"), "bootstrap.dcs.ttl", "too small"),
        (
            edit("maximum_lag_on_failover", "maximum_lag_on_failover: -1"),
            "bootstrap.dcs.maximum_lag_on_failover",
            "invalid value",
        ),
        (edit("scope: batman", "scope: ''"), "scope", "required"),
        (
            edit("name: postgresql0", "name: a/b"),
            "name",
            "must not contain",
        ),
        (
            edit("listen: 127.0.0.1:8008", "listen: 127.0.0.1:99999"),
            "restapi.listen",
            "not a port",
        ),
        (
            edit(
                "connect_address: 127.0.0.1:8008",
                "connect_address: nonsense",
            ),
            "restapi.connect_address",
            "not host:port",
        ),
        (
            edit("hosts: 127.0.0.1:2379", "hosts: [localhost]"),
            "etcd3.hosts[0]",
            "not host:port",
        ),
        (
            edit("data_dir: data/postgresql0", "data_dir: ''"),
            "postgresql.data_dir",
            "required",
        ),
        (
            edit("username: postgres", "username: ''"),
            "postgresql.authentication.superuser.username",
            "required",
        ),
        (
            edit("unix_socket_directories", "unix_socket_directories: {a: 1}"),
            "postgresql.parameters.unix_socket_directories",
            "string, a number or a boolean",
        ),
        (
            edit(
                "- host all all 0.0.0.0/0 md5",
                "- hots all all 0.0.0.0/0 md5",
            ),
            "postgresql.pg_hba[1]",
            "not a pg_hba connection type",
        ),
        (
            edit("nofailover: false", "nofailover: maybe"),
            "tags",
            "`tags.nofailover`: \"maybe\" is not a boolean",
        ),
        (
            format!("{PATRONI_YML}\nlog: {{level: CHATTY}}\n"),
            "log.level",
            "not one of",
        ),
        (
            edit("listen: 127.0.0.1:5432", "listen: 127.0.0.1:x"),
            "postgresql.listen",
            "not a port",
        ),
    ];
    assert!(cases.len() >= 12);
    for (yaml, path, reason) in cases {
        assert_error(&yaml, path, reason);
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let yaml = edit("scope: batman", "scope: ''").replace("name: postgresql0", "name: x/y");
    let errs = errors(&yaml);
    assert!(errs.len() >= 2, "{errs:?}");
}

#[test]
fn missing_dcs_section_is_an_error() {
    let yaml = PATRONI_YML.replace("etcd3:\n  hosts: 127.0.0.1:2379\n", "");
    assert_error(&yaml, "etcd3", "is required");
}

#[test]
fn kubernetes_mode_from_patronis_environment_with_connect_addresses_from_the_pod_ip() {
    let yaml = PATRONI_YML
        .replace("etcd3:\n  hosts: 127.0.0.1:2379\n", "")
        .replace(
            "  listen: 127.0.0.1:8008\n  connect_address: 127.0.0.1:8008\n",
            "  listen: 0.0.0.0:8008\n",
        )
        .replace(
            "  listen: 127.0.0.1:5432\n  connect_address: 127.0.0.1:5432\n",
            "  listen: 0.0.0.0:5432\n",
        );
    let env: BTreeMap<String, String> = [
        ("PATRONI_KUBERNETES_NAMESPACE", "db"),
        ("PATRONI_KUBERNETES_POD_IP", "10.1.2.3"),
        (
            "PATRONI_KUBERNETES_LABELS",
            r#"{"application": "pgwarden"}"#,
        ),
        ("PATRONI_KUBERNETES_LEADER_LABEL_VALUE", "master"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let c = load_str(&yaml, &env, &Overrides::default())
        .expect("loads")
        .config;
    let k = c.kubernetes.expect("kubernetes mode");
    assert_eq!(k.namespace.as_deref(), Some("db"));
    assert_eq!(
        k.labels.get("application").map(String::as_str),
        Some("pgwarden")
    );
    assert_eq!(
        (k.scope_label.as_str(), k.role_label.as_str()),
        ("cluster-name", "role")
    );
    assert_eq!(k.leader_label_value, "master");
    assert_eq!(c.restapi.connect_address, "10.1.2.3:8008");
    assert_eq!(c.postgresql.connect_address, "10.1.2.3:5432");
}

#[test]
fn kubernetes_section_errors_name_the_key() {
    let base = PATRONI_YML.replace("etcd3:\n  hosts: 127.0.0.1:2379\n", "");
    assert_error(
        &format!("{base}\nkubernetes:\n  use_endpoints: true\n"),
        "kubernetes.use_endpoints",
        "not supported",
    );
    assert_error(
        &format!("{base}\nkubernetes:\n  labels: {{cluster-name: x}}\n"),
        "kubernetes.labels",
        "scope label",
    );
    assert_error(
        &format!("{PATRONI_YML}\nkubernetes:\n  namespace: db\n"),
        "kubernetes",
        "choose one",
    );
    let mut env = BTreeMap::new();
    env.insert("PATRONI_KUBERNETES_LABELS".to_owned(), "app=x".to_owned());
    match load_str(&base, &env, &Overrides::default()) {
        Err(ConfigError::Parse { path, reason }) => {
            assert_eq!(path, "PATRONI_KUBERNETES_LABELS");
            assert!(reason.contains("JSON object"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn patroni_spellings_load_string_tags_old_names_and_wal_keep_segments() {
    let yaml = PATRONI_YML
        .replace(
            "    maximum_lag_on_failover: 1048576\n",
            "    maximum_lag_on_failover: 1048576\n    master_start_timeout: 120\n    synchronous_mode: \"on\"\n",
        )
        .replace("        max_connections: 100\n", "        max_connections: 100\n        wal_keep_segments: 100\n")
        .replace("  nofailover: false\n", "  nofailover: \"true\"\n  failover_priority: \"1\"\n  zone: a\n");
    let loaded = load_ok(&yaml);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    assert_eq!(c.bootstrap.dcs.primary_start_timeout, 120);
    assert_eq!(c.bootstrap.dcs.synchronous_mode, SynchronousMode::On);
    assert!(c.tags.nofailover);
    assert_eq!(c.tags.failover_priority, Some(1));
    let tags = c.effective_tags();
    assert_eq!(tags["nofailover"], serde_json::json!("true"));
    assert_eq!(tags["failover_priority"], serde_json::json!("1"));
    assert_eq!(tags["zone"], serde_json::json!("a"));
    assert!(
        !tags.contains_key("clonefrom"),
        "false tags are not published"
    );
}

#[test]
fn inconsistent_timeouts_are_adjusted_as_patroni_does_with_a_warning() {
    let yaml = edit("ttl: 30", "ttl: 20").replace("loop_wait: 10", "loop_wait: 2");
    let loaded = load_ok(&yaml);
    let dcs = &loaded.config.bootstrap.dcs;
    assert_eq!((dcs.ttl, dcs.loop_wait, dcs.retry_timeout), (20, 1, 9));
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("bootstrap.dcs") && w.contains("loop_wait = 1, retry_timeout = 9")),
        "{:?}",
        loaded.warnings
    );
    // Only loop_wait needs to give way here.
    let mut d = DynamicConfig {
        ttl: 30,
        loop_wait: 15,
        retry_timeout: 10,
        ..Default::default()
    };
    d.adjust_timeouts("config");
    assert_eq!((d.ttl, d.loop_wait, d.retry_timeout), (30, 10, 10));
    // A ttl below Patroni's 20 s is kept, with a warning that says why.
    let mut d = DynamicConfig {
        ttl: 10,
        loop_wait: 1,
        retry_timeout: 3,
        ..Default::default()
    };
    let w = d.adjust_timeouts("config");
    assert_eq!(d.ttl, 10);
    assert!(w.iter().any(|w| w.contains("fencing.md")), "{w:?}");
}

#[test]
fn unimplemented_options_are_warned_about_and_a_standby_cluster_is_read() {
    let yaml = PATRONI_YML.replace(
        "    maximum_lag_on_failover: 1048576\n",
        "    maximum_lag_on_failover: 1048576\n    max_timelines_history: 3\n    synchronous_mode: quorum\n",
    ) + "watchdog:\n  mode: required\n";
    let loaded = load_ok(&yaml);
    for path in ["bootstrap.dcs.max_timelines_history", "watchdog"] {
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains(&format!("`{path}`"))),
            "no warning for {path}: {:?}",
            loaded.warnings
        );
    }
    assert!(
        !loaded
            .warnings
            .iter()
            .any(|w| w.contains("synchronous_mode")),
        "quorum commit is implemented: {:?}",
        loaded.warnings
    );
    assert_eq!(
        loaded.config.bootstrap.dcs.synchronous_mode,
        SynchronousMode::Quorum
    );
    let yaml = PATRONI_YML.replace(
        "    maximum_lag_on_failover: 1048576\n",
        "    maximum_lag_on_failover: 1048576\n    standby_cluster:\n      host: 10.0.0.1\n      port: \"5433\"\n      primary_slot_name: dr\n      restore_command: cp /a/%f %p\n      recovery_min_apply_delay: 5min\n      unknown_knob: 1\n",
    );
    let loaded = load_ok(&yaml);
    let standby = loaded
        .config
        .bootstrap
        .dcs
        .standby_source()
        .expect("a standby cluster");
    assert_eq!(standby.host.as_deref(), Some("10.0.0.1"));
    assert_eq!(standby.port_or_default(), 5433);
    assert_eq!(standby.primary_slot_name.as_deref(), Some("dr"));
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("`bootstrap.dcs.standby_cluster.unknown_knob`")),
        "{:?}",
        loaded.warnings
    );
    assert!(!loaded
        .warnings
        .iter()
        .any(|w| w.contains("standby_cluster.host")));
    let yaml = PATRONI_YML.replace(
        "    maximum_lag_on_failover: 1048576\n",
        "    maximum_lag_on_failover: 1048576\n    standby_cluster:\n      port: 70000\n",
    );
    assert_error(&yaml, "bootstrap.dcs.standby_cluster.port", "port");
}

#[test]
fn an_invalid_value_in_the_dcs_config_costs_only_that_value() {
    let previous = DynamicConfig {
        ttl: 25,
        ..Default::default()
    };
    let raw = serde_json::json!({
        "ttl": "abc",
        "loop_wait": 3,
        "retry_timeout": "4",
        "synchronous_mode": "sometimes",
        "master_start_timeout": 60,
        "postgresql": {"use_slots": "maybe", "parameters": {"work_mem": "8MB", "bad": {"x": 1}}},
        "maximum_lag_on_failover": 5
    });
    let (c, warnings) = DynamicConfig::from_dcs(&raw, &previous);
    assert_eq!(c.ttl, 25, "the previous ttl is kept");
    assert_eq!((c.loop_wait, c.retry_timeout), (3, 4));
    assert_eq!(
        c.synchronous_mode,
        SynchronousMode::Off,
        "the previous value is kept"
    );
    assert_eq!(c.primary_start_timeout, 60);
    assert_eq!(c.maximum_lag_on_failover, 5);
    assert!(c.postgresql.use_slots, "the default use_slots is kept");
    assert_eq!(
        c.postgresql.parameters.get("work_mem"),
        Some(&PgValue::Text("8MB".into()))
    );
    assert!(!c.postgresql.parameters.contains_key("bad"));
    for key in [
        "config.ttl",
        "config.postgresql.use_slots",
        "config.postgresql.parameters.bad",
        "config.synchronous_mode",
    ] {
        assert!(
            warnings.iter().any(|w| w.contains(&format!("`{key}`"))),
            "no warning for {key}: {warnings:?}"
        );
    }
    let (c, warnings) = DynamicConfig::from_dcs(&serde_json::json!([1]), &previous);
    assert_eq!(c, previous);
    assert_eq!(warnings.len(), 1);
}

#[test]
fn patch_config_refuses_invalid_values_naming_the_key() {
    use super::dynamic::check_patch;
    let check = |v: serde_json::Value| check_patch(v.as_object().expect("object"));
    for (patch, key) in [
        (serde_json::json!({"ttl": "abc"}), "`ttl`"),
        (serde_json::json!({"ttl": -5}), "`ttl`"),
        (serde_json::json!({"ttl": 0}), "`ttl`"),
        (
            serde_json::json!({"member_slots_ttl": -1}),
            "`member_slots_ttl`",
        ),
        (
            serde_json::json!({"synchronous_mode": "sometimes"}),
            "`synchronous_mode`",
        ),
        (
            serde_json::json!({"standby_cluster": {"primary_slot_name": "a"}}),
            "`standby_cluster`",
        ),
        (
            serde_json::json!({"standby_cluster": {"host": "a", "port": "x"}}),
            "`standby_cluster.port`",
        ),
        (
            serde_json::json!({"standby_cluster": {"host": "a", "hots": "b"}}),
            "`standby_cluster.hots`",
        ),
        (
            serde_json::json!({"postgresql": {"use_slots": "maybe"}}),
            "`postgresql.use_slots`",
        ),
        (
            serde_json::json!({"failsafe_mode": "sometimes"}),
            "`failsafe_mode`",
        ),
    ] {
        let e = check(patch.clone()).expect_err(&patch.to_string());
        assert!(e.contains(key), "{patch}: {e}");
    }
    for ok in [
        serde_json::json!({"ttl": 30, "loop_wait": "5", "pause": true}),
        serde_json::json!({"pause": null, "standby_cluster": null}),
        serde_json::json!({"master_start_timeout": 10, "synchronous_mode": "on"}),
        serde_json::json!({"member_slots_ttl": 0}),
        serde_json::json!({"failsafe_mode": true}),
        serde_json::json!({"standby_cluster": {"host": "a", "port": 5433, "create_replica_methods": ["basebackup"]}}),
        serde_json::json!({"postgresql": {"parameters": {"work_mem": "8MB", "x": null}}}),
    ] {
        assert_eq!(check(ok.clone()), Ok(()), "{ok}");
    }
}

#[test]
fn patroni_restapi_and_ssl_environment_variables_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("c.pem");
    // `restapi.cafile` is validated (it must hold a usable certificate): a real self-signed one.
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.path().join("k.pem"))
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs (scripts/install-deps.sh installs it)");
    assert!(made.status.success(), "{made:?}");
    let env: BTreeMap<String, String> = [
        ("PATRONI_RESTAPI_CERTFILE", cert.to_str().expect("utf8")),
        ("PATRONI_RESTAPI_KEYFILE", cert.to_str().expect("utf8")),
        ("PATRONI_RESTAPI_CAFILE", cert.to_str().expect("utf8")),
        ("PATRONI_RESTAPI_VERIFY_CLIENT", "none"),
        ("PATRONI_REPLICATION_SSLMODE", "verify-ca"),
        ("PATRONI_REPLICATION_SSLROOTCERT", "/ca.pem"),
        ("PATRONI_SUPERUSER_SSLMODE", "require"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let c = load_str(PATRONI_YML, &env, &Overrides::default())
        .expect("loads")
        .config;
    assert_eq!(c.restapi.certfile.as_deref(), Some(cert.as_path()));
    assert_eq!(c.restapi.keyfile.as_deref(), Some(cert.as_path()));
    assert_eq!(c.restapi.cafile.as_deref(), Some(cert.as_path()));
    assert_eq!(c.api_url(), "https://127.0.0.1:8008/patroni");
    let auth = &c.postgresql.authentication;
    assert_eq!(auth.replication.sslmode.as_deref(), Some("verify-ca"));
    assert_eq!(
        auth.replication.sslrootcert.as_deref(),
        Some(std::path::Path::new("/ca.pem"))
    );
    assert_eq!(auth.superuser.sslmode.as_deref(), Some("require"));
    let mut env = env;
    env.insert("PATRONI_RESTAPI_VERIFY_CLIENT".into(), "required".into());
    match load_str(PATRONI_YML, &env, &Overrides::default()) {
        Err(ConfigError::Invalid(errors)) => {
            assert!(
                errors.iter().any(|e| e.path == "restapi.verify_client"),
                "{errors:?}"
            )
        }
        other => panic!("verify_client required must be refused: {other:?}"),
    }
}

#[test]
fn parameters_replication_depends_on_are_kept_usable_with_a_warning() {
    use super::dynamic::managed_replacement;
    assert_eq!(managed_replacement("wal_level", "minimal"), Some("replica"));
    assert_eq!(managed_replacement("wal_level", "logical"), None);
    assert_eq!(managed_replacement("hot_standby", "off"), Some("on"));
    assert_eq!(managed_replacement("hot_standby", "on"), None);
    assert_eq!(managed_replacement("max_wal_senders", "1"), Some("10"));
    assert_eq!(managed_replacement("max_connections", "50"), None);
    assert_eq!(managed_replacement("work_mem", "1kB"), None);
    let yaml = PATRONI_YML.replace(
        "        hot_standby: \"on\"\n",
        "        hot_standby: \"off\"\n",
    );
    let loaded = load_ok(&yaml);
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("`bootstrap.dcs.postgresql.parameters.hot_standby`")),
        "{:?}",
        loaded.warnings
    );
    let p = crate::postgres::conf::parameters(
        &loaded.config,
        &loaded.config.bootstrap.dcs,
        &Default::default(),
    );
    assert_eq!(p["hot_standby"], "on");
}

#[test]
fn callbacks_load_without_warnings_and_bad_commands_are_refused_by_path() {
    // Patroni's `postgresql.callbacks`: one command line per action.
    let yaml = PATRONI_YML.replace(
        "  pgpass: /tmp/pgpass0",
        "  pgpass: /tmp/pgpass0\n  callbacks:\n    on_role_change: /usr/local/bin/vip.sh --dev 'eth 0'\n    on_start: /bin/true\n    on_reload:",
    );
    let loaded = load_ok(&yaml);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let cb = &loaded.config.postgresql.callbacks;
    assert_eq!(
        cb.on_role_change.as_deref(),
        Some("/usr/local/bin/vip.sh --dev 'eth 0'")
    );
    assert_eq!(cb.on_start.as_deref(), Some("/bin/true"));
    assert_eq!(
        (cb.on_stop.as_deref(), cb.on_reload.as_deref()),
        (None, None)
    );

    let bad = PATRONI_YML.replace(
        "  pgpass: /tmp/pgpass0",
        "  pgpass: /tmp/pgpass0\n  callbacks:\n    on_stop: ''\n    on_restart: \"/bin/x 'open\"",
    );
    assert_error(&bad, "postgresql.callbacks.on_stop", "program");
    assert_error(&bad, "postgresql.callbacks.on_restart", "quote");
    let unknown = PATRONI_YML.replace(
        "  pgpass: /tmp/pgpass0",
        "  pgpass: /tmp/pgpass0\n  callbacks:\n    on_failover: /bin/true",
    );
    let w = load_ok(&unknown).warnings.join("\n");
    assert!(w.contains("`postgresql.callbacks.on_failover`"), "{w}");
}

#[test]
fn the_cli_reaches_etcd_or_kubernetes_never_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let load = |text: &str| {
        let path = dir.path().join("ctl.yml");
        std::fs::write(&path, text).expect("write");
        load_ctl(Some(&path), &no_env())
    };
    let kube = load("scope: pg\nkubernetes:\n  namespace: db\n").expect("kubernetes mode");
    assert_eq!(
        kube.kubernetes.and_then(|k| k.namespace).as_deref(),
        Some("db")
    );
    assert!(load("scope: pg\netcd3:\n  hosts: 127.0.0.1:2379\n").is_ok());
    let both = load("scope: pg\netcd3:\n  hosts: 127.0.0.1:2379\nkubernetes: {}\n");
    assert!(both.is_err_and(|e| e.to_string().contains("choose one DCS")));
    let none = load("scope: pg\n");
    assert!(none.is_err_and(|e| e.to_string().contains("etcd3.hosts")));
}

#[test]
fn permanent_slots_are_read_under_patronis_three_names_in_its_order() {
    let raw = serde_json::json!({
        "permanent_slots": {"from_permanent_slots": 0},
        "slots": {"from_slots": 0},
        "ignore_slots": [{"name": "external"}, {"nme": "typo"}],
    });
    let (c, warnings) = DynamicConfig::from_dcs(&raw, &DynamicConfig::default());
    assert_eq!(
        c.slots.keys().collect::<Vec<_>>(),
        ["from_permanent_slots"],
        "permanent_slots takes precedence over slots"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("`config.slots` ignored")),
        "{warnings:?}"
    );
    assert_eq!(c.ignore_slots.len(), 2);
    assert!(c.ignore_slots[0].matches_physical("external"));
    assert!(
        !c.ignore_slots[1].matches_physical("typo"),
        "an attribute no slot has matches nothing (not everything)"
    );
    let warnings = c.unimplemented("config");
    assert!(
        warnings.iter().any(|w| w.contains(
            "`config.ignore_slots[1].nme` is not a slot attribute (name, type, database, plugin)"
        )),
        "{warnings:?}"
    );
    let logical = serde_json::json!({"type": "logical", "database": "app", "plugin": "pgoutput"});
    let raw = serde_json::json!({"slots": {"cdc": logical, "phys": 0},
                                 "standby_cluster": {"host": "10.0.0.1"}});
    let (c, _) = DynamicConfig::from_dcs(&raw, &DynamicConfig::default());
    assert_eq!(
        c.unimplemented("config")
            .iter()
            .filter(|w| w.contains("`config.slots."))
            .collect::<Vec<_>>(),
        ["`config.slots.cdc` ignored: a standby cluster keeps no logical slot (as in Patroni)"]
    );
    let raw = serde_json::json!({"slots": {"cdc": logical}, "postgresql": {"use_slots": false}});
    let (c, _) = DynamicConfig::from_dcs(&raw, &DynamicConfig::default());
    assert!(
        c.unimplemented("config")
            .iter()
            .any(|w| w.contains("`config.slots.cdc` ignored: `config.postgresql.use_slots` is off")),
        "{:?}",
        c.unimplemented("config")
    );
    let raw =
        serde_json::json!({"permanent_replication_slots": {"a": 0}, "permanent_slots": {"b": 0}});
    let (c, _) = DynamicConfig::from_dcs(&raw, &DynamicConfig::default());
    assert_eq!(c.slots.keys().collect::<Vec<_>>(), ["a"]);
}

/// Patroni 4's synchronous-replication knobs are implemented: read in every spelling, no
/// warning, and an invalid value named with its reason.
#[test]
fn synchronous_node_count_maximum_lag_on_syncnode_and_sync_priority_are_read() {
    let yaml = PATRONI_YML
        .replace(
            "    maximum_lag_on_failover: 1048576\n",
            "    maximum_lag_on_failover: 1048576\n    synchronous_mode: true\n    synchronous_node_count: \"2\"\n    maximum_lag_on_syncnode: 16777216\n",
        )
        .replace("  nosync: false\n", "  nosync: false\n  sync_priority: \"3\"\n");
    let loaded = load_ok(&yaml);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = loaded.config;
    assert_eq!(c.bootstrap.dcs.synchronous_node_count, 2);
    assert_eq!(c.bootstrap.dcs.maximum_lag_on_syncnode, 16_777_216);
    assert_eq!(c.tags.sync_priority, Some(3));
    // Published as written; the written `nosync: false` goes with it, as Patroni does.
    let tags = c.effective_tags();
    assert_eq!(tags["sync_priority"], serde_json::json!("3"));
    assert_eq!(tags["nosync"], serde_json::json!(false));
    let record = pgwarden_api::MemberRecord {
        tags,
        ..Default::default()
    };
    assert_eq!(record.sync_priority(), 3);

    // Defaults: one standby, no lag check; `sync_priority` alone publishes no `nosync`.
    let d = DynamicConfig::default();
    assert_eq!(
        (d.synchronous_node_count, d.maximum_lag_on_syncnode),
        (1, -1)
    );
    let loaded = load_ok(&PATRONI_YML.replace("  nosync: false\n", "  sync_priority: 0\n"));
    let tags = loaded.config.effective_tags();
    assert_eq!(tags["sync_priority"], serde_json::json!(0));
    assert!(!tags.contains_key("nosync"), "{tags:?}");

    let dcs = |line: &str| {
        PATRONI_YML.replace(
            "    maximum_lag_on_failover: 1048576\n",
            &format!("    maximum_lag_on_failover: 1048576\n    {line}\n"),
        )
    };
    let rejected = |yaml: &str, path: &str, reason: &str| {
        let e = load_str(yaml, &no_env(), &Overrides::default())
            .err()
            .unwrap_or_else(|| panic!("{path} should be refused"))
            .to_string();
        assert!(e.contains(path) && e.contains(reason), "{path}: {e}");
    };
    rejected(
        &dcs("synchronous_node_count: 0"),
        "synchronous_node_count",
        "at least 1",
    );
    rejected(
        &dcs("synchronous_node_count: two"),
        "synchronous_node_count",
        "not an integer",
    );
    rejected(
        &dcs("maximum_lag_on_syncnode: -2"),
        "maximum_lag_on_syncnode",
        "below -1",
    );
    assert_error(
        &PATRONI_YML.replace("  nosync: false\n", "  sync_priority: -1\n"),
        "tags.sync_priority",
        "negative",
    );
    rejected(
        &PATRONI_YML.replace("  nosync: false\n", "  sync_priority: high\n"),
        "tags.sync_priority",
        "not an integer",
    );
}

#[test]
fn invalid_synchronous_knobs_in_the_dcs_keep_their_previous_values() {
    let previous = DynamicConfig {
        synchronous_node_count: 2,
        maximum_lag_on_syncnode: 1000,
        ..Default::default()
    };
    let raw = serde_json::json!({
        "synchronous_node_count": 0,
        "maximum_lag_on_syncnode": -5,
    });
    let (c, warnings) = DynamicConfig::from_dcs(&raw, &previous);
    assert_eq!(
        (c.synchronous_node_count, c.maximum_lag_on_syncnode),
        (2, 1000)
    );
    for key in [
        "config.synchronous_node_count",
        "config.maximum_lag_on_syncnode",
    ] {
        assert!(
            warnings.iter().any(|w| w.contains(&format!("`{key}`"))),
            "no warning for {key}: {warnings:?}"
        );
    }
    let raw = serde_json::json!({"synchronous_node_count": "3", "maximum_lag_on_syncnode": 0});
    let (c, warnings) = DynamicConfig::from_dcs(&raw, &previous);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        (c.synchronous_node_count, c.maximum_lag_on_syncnode),
        (3, 0)
    );

    use super::dynamic::check_patch;
    let check = |v: serde_json::Value| check_patch(v.as_object().expect("object"));
    for (patch, reason) in [
        (
            serde_json::json!({"synchronous_node_count": 0}),
            "at least 1",
        ),
        (
            serde_json::json!({"synchronous_node_count": "x"}),
            "not an integer",
        ),
        (
            serde_json::json!({"maximum_lag_on_syncnode": -2}),
            "out of range",
        ),
        (
            serde_json::json!({"maximum_lag_on_syncnode": []}),
            "not an integer",
        ),
    ] {
        let key = patch
            .as_object()
            .and_then(|o| o.keys().next().cloned())
            .unwrap_or_default();
        let e = check(patch.clone()).expect_err(&patch.to_string());
        assert!(
            e.contains(&format!("`{key}`")) && e.contains(reason),
            "{patch}: {e}"
        );
    }
    for ok in [
        serde_json::json!({"synchronous_node_count": 2, "maximum_lag_on_syncnode": -1}),
        serde_json::json!({"synchronous_node_count": "1", "maximum_lag_on_syncnode": "1048576"}),
        serde_json::json!({"maximum_lag_on_syncnode": 0}),
    ] {
        assert_eq!(check(ok.clone()), Ok(()), "{ok}");
    }
}
