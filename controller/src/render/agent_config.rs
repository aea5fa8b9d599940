//! The agent's configuration file in Kubernetes mode, in Patroni's YAML schema as the agent reads
//! it (`agent/src/config/schema.rs`). Per-Pod values (name, namespace, Pod IP, passwords) are
//! not in the file: they come from the environment the StatefulSet sets (`PATRONI_NAME`,
//! `PATRONI_KUBERNETES_NAMESPACE`, `PATRONI_KUBERNETES_POD_IP`, `PATRONI_*_PASSWORD`, ...), so
//! one ConfigMap serves every member.

use serde_json::{json, Map, Value};

use super::{
    Names, API_PORT, APPLICATION, APPLICATION_LABEL, POSTGRES_PORT, ROLE_LABEL, SCOPE_LABEL,
};
use crate::crd::PostgresClusterSpec;

/// Where the StatefulSet mounts the ConfigMap, and the file name in it.
pub const CONFIG_DIR: &str = "/etc/pgwarden";
/// Mount point of the data volume; postgres gets a subdirectory because a fresh volume's root
/// may hold `lost+found`, which initdb refuses.
pub const DATA_MOUNT: &str = "/var/lib/postgresql/data";
pub const DATA_DIR: &str = "/var/lib/postgresql/data/pgdata";
pub const SUPERUSER: &str = "postgres";
pub const REPLICATION_USER: &str = "replicator";
pub const RESTAPI_USER: &str = "pgwarden";

/// The configuration of the member with this StatefulSet ordinal, as a YAML document. Members
/// differ only in their `tags` (`spec.instances.failoverPriority`).
///
/// `upgraded_from`: the Pods are made for an upgrade from that major version
/// ([`with_upgrade_binaries`]).
pub fn render(
    names: &Names,
    spec: &PostgresClusterSpec,
    ordinal: i32,
    upgraded_from: Option<u32>,
) -> String {
    let mut config = value(names, spec);
    if let Some(priority) = spec.instances.failover_priority.get(&ordinal.to_string()) {
        // Patroni: priority 0 means never promoted automatically.
        config["tags"] = json!({"failover_priority": priority, "nofailover": *priority == 0});
    }
    with_upgrade_binaries(&mut config, spec, upgraded_from);
    // Serializing a `serde_json::Value` to YAML cannot fail (string keys only).
    let mut yaml = serde_yaml::to_value(&config).unwrap_or_default();
    // The agent reads `bin_dirs` by major version: numbers as keys, which JSON cannot write.
    if let Some(dirs) = config["postgresql"]["bin_dirs"].as_object() {
        let by_major: serde_yaml::Mapping = dirs
            .iter()
            .filter_map(|(major, dir)| {
                Some((
                    serde_yaml::Value::from(major.parse::<u64>().ok()?),
                    serde_yaml::Value::from(dir.as_str()?),
                ))
            })
            .collect();
        yaml["postgresql"]["bin_dirs"] = serde_yaml::Value::Mapping(by_major);
    }
    serde_yaml::to_string(&yaml).unwrap_or_default()
}

/// For Pods made for an upgrade from `upgraded_from` (`crate::upgrade`): the binaries of both
/// versions in `postgresql.bin_dirs`, so each data directory runs on its own version's (the
/// first member's upgraded data on the new, a replica's old data until its init container
/// moves it aside, a clone on the newest) and `pgwarden upgrade-data-dir` finds the old ones.
pub fn with_upgrade_binaries(
    config: &mut Value,
    spec: &PostgresClusterSpec,
    upgraded_from: Option<u32>,
) {
    let Some(from) = upgraded_from.filter(|from| *from != spec.postgres_version) else {
        return;
    };
    let mut dirs = Map::new();
    for version in [from, spec.postgres_version] {
        dirs.insert(version.to_string(), json!(super::bin_dir(version)));
    }
    config["postgresql"]["bin_dirs"] = Value::Object(dirs);
}

/// The file name of a member's configuration in the ConfigMap: the Pod name, which the
/// container's command finds through `$(PATRONI_NAME)`.
pub fn member_file(names: &Names, ordinal: i32) -> String {
    format!("{}.yml", names.pod(ordinal))
}

/// `spec.standby` as the agents' `standby_cluster`: in `bootstrap.dcs` for a new cluster, and
/// kept in the DCS `config` afterwards (`crate::dcs_config`), so that removing `spec.standby`
/// promotes the cluster.
pub fn standby_cluster(spec: &PostgresClusterSpec) -> Option<Value> {
    let standby = spec.standby.as_ref()?;
    let mut standby_cluster = json!({"host": standby.host, "port": standby.port});
    if let Some(slot) = &standby.primary_slot_name {
        standby_cluster["primary_slot_name"] = json!(slot);
    }
    Some(standby_cluster)
}

/// The configuration as a JSON value (the tests compare fields of it).
pub fn value(names: &Names, spec: &PostgresClusterSpec) -> Value {
    let ha = &spec.ha;
    let parameters: Map<String, Value> = spec
        .postgresql
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.to_yaml()))
        .collect();

    let mut dcs = json!({
        "ttl": ha.ttl,
        "loop_wait": ha.loop_wait,
        "retry_timeout": ha.retry_timeout,
        "maximum_lag_on_failover": ha.maximum_lag_on_failover,
        "synchronous_mode": match (ha.synchronous_mode, ha.quorum_commit) {
            (true, true) => json!("quorum"),
            (on, _) => json!(on),
        },
        "synchronous_mode_strict": ha.synchronous_mode_strict,
        "postgresql": {
            "use_pg_rewind": ha.use_pg_rewind,
            "use_slots": true,
        },
    });
    // Only when not the default, so an upgrade does not change every cluster's configuration
    // (and its hash, which rolls the pods).
    if ha.synchronous_node_count != 1 {
        dcs["synchronous_node_count"] = json!(ha.synchronous_node_count);
    }
    // The parameters are dynamic configuration, not the members' local files: the bootstrap
    // writes them into the DCS `config`, and later changes go there too (`dcs_config`), where
    // each agent reloads what a reload takes. Local parameters would override `config`.
    if !parameters.is_empty() {
        dcs["postgresql"]["parameters"] = Value::Object(parameters);
    }
    if let Some(standby_cluster) = standby_cluster(spec) {
        dcs["standby_cluster"] = standby_cluster;
    }

    // The agent connects locally through the socket; members replicate over the Pod network.
    let mut pg_hba = vec![
        "local all all trust".to_owned(),
        format!("host replication {REPLICATION_USER} 0.0.0.0/0 scram-sha-256"),
        format!("host replication {REPLICATION_USER} ::/0 scram-sha-256"),
    ];
    pg_hba.extend(spec.postgresql.pg_hba.iter().cloned());
    pg_hba.push("host all all 0.0.0.0/0 scram-sha-256".to_owned());
    pg_hba.push("host all all ::/0 scram-sha-256".to_owned());

    let mut config = json!({
        "scope": names.cluster,
        "restapi": {
            "listen": format!("0.0.0.0:{API_PORT}"),
        },
        "kubernetes": {
            "labels": { APPLICATION_LABEL: APPLICATION },
            "scope_label": SCOPE_LABEL,
            "role_label": ROLE_LABEL,
            "ports": [{"name": "postgresql", "port": POSTGRES_PORT}],
        },
        "bootstrap": {
            "dcs": dcs,
            "initdb": ["data-checksums", {"encoding": "UTF8"}, {"auth-host": "scram-sha-256"}],
        },
        "postgresql": {
            "listen": format!("0.0.0.0:{POSTGRES_PORT}"),
            "data_dir": DATA_DIR,
            "bin_dir": super::bin_dir(spec.postgres_version),
            "parameters": {},
            "pg_hba": pg_hba,
            "use_unix_socket": true,
            "authentication": {
                "superuser": {"username": SUPERUSER},
                "replication": {"username": REPLICATION_USER},
            },
        },
        "log": {"type": "json", "level": "INFO"},
    });
    if let Some(backups) = &spec.backups {
        // The agent runs pgBackRest itself (`docs/backup.md`): it writes pgbackrest.conf, sets
        // archive_command/restore_command, creates the stanza and runs the scheduled backups
        // on the leader. S3 keys are not in the file: the agent reads them from
        // `PGWARDEN_PGBACKREST_REPO<n>_S3_KEY`/`_S3_KEY_SECRET`, which the StatefulSet sets
        // from the Secret.
        let mut repos: Vec<Value> = backups
            .pgbackrest
            .repos
            .iter()
            .map(|repo| {
                let mut r = json!({"path": repo.path});
                if let Some(s3) = &repo.s3 {
                    r["type"] = json!("s3");
                    r["s3_bucket"] = json!(s3.bucket);
                    r["s3_endpoint"] = json!(s3.endpoint);
                    r["s3_region"] = json!(s3.region);
                } else {
                    r["type"] = json!("posix");
                }
                if let Some(full) = repo.retention_full {
                    r["retention_full"] = json!(full);
                }
                if let Some(diff) = repo.retention_diff {
                    r["retention_diff"] = json!(diff);
                }
                r
            })
            .collect();
        // repo1's schedules stay in `pgbackrest.schedule` (the agent's form for repo1): moved
        // into `repos[0]`, every existing cluster's configuration, and so its hash, would
        // change and roll its Pods on a controller upgrade. The other repositories carry
        // theirs (`pgbackrest --repo=<n> backup`).
        for (i, repo) in backups.pgbackrest.repos.iter().enumerate().skip(1) {
            let s = schedule(&repo.schedules);
            if !s.is_empty() {
                if let Some(r) = repos.get_mut(i) {
                    r["schedule"] = Value::Object(s);
                }
            }
        }
        let schedule = backups
            .pgbackrest
            .repos
            .first()
            .map(|r| schedule(&r.schedules))
            .unwrap_or_default();
        let source = stanza(names, spec).unwrap_or_else(|| names.cluster.clone());
        // A cluster restored from a backup has its source's system identifier: it archives into
        // a stanza of its own, or its WAL would join the source's history (the agent refuses
        // restoring from the stanza it archives into).
        let own = if spec.restore.is_some() {
            format!("{source}-restored")
        } else {
            source.clone()
        };
        config["pgbackrest"] = json!({
            "stanza": own,
            "repos": repos,
            "schedule": schedule,
        });
        // New replicas restore from the repository when it has a backup, else stream one.
        config["postgresql"]["create_replica_methods"] = json!(["pgbackrest", "basebackup"]);
        if let Some(restore) = &spec.restore {
            // Patroni's custom-bootstrap shape; the agent runs the restore itself.
            let mut recovery_conf = Map::new();
            if let Some(t) = &restore.target_time {
                recovery_conf.insert("recovery_target_time".to_owned(), json!(t));
                recovery_conf.insert("recovery_target_action".to_owned(), json!("promote"));
            }
            config["bootstrap"]["method"] = json!("pgbackrest");
            config["bootstrap"]["pgbackrest"] =
                json!({"stanza": source, "recovery_conf": recovery_conf});
            // `restore.repo` names a repository of `spec.backups` (`validate` checks it): the
            // agent passes its number to `pgbackrest restore --repo`.
            if let Some(i) = backups
                .pgbackrest
                .repos
                .iter()
                .position(|r| r.name == restore.repo)
            {
                config["bootstrap"]["pgbackrest"]["repo"] = json!(i + 1);
            }
        }
    }
    config
}

/// A repository's `schedules` as the agent's `schedule` object (types without one left out).
fn schedule(schedules: &crate::crd::BackupSchedules) -> Map<String, Value> {
    let mut out = Map::new();
    for (kind, cron) in [
        ("full", &schedules.full),
        ("diff", &schedules.diff),
        ("incr", &schedules.incr),
    ] {
        if let Some(c) = cron {
            out.insert(kind.to_owned(), json!(c));
        }
    }
    out
}

/// A stable 64-bit FNV-1a hash in hex. Stable across Rust releases (unlike `DefaultHasher`), so
/// upgrading the controller does not by itself roll every cluster.
pub fn content_hash(data: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in data.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The pgBackRest stanza of a cluster with backups.
pub fn stanza(names: &Names, spec: &PostgresClusterSpec) -> Option<String> {
    let backups = spec.backups.as_ref()?;
    Some(
        backups
            .pgbackrest
            .stanza
            .clone()
            .unwrap_or_else(|| names.cluster.clone()),
    )
}
