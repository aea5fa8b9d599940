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
pub fn render(names: &Names, spec: &PostgresClusterSpec, ordinal: i32) -> String {
    let mut config = value(names, spec);
    if let Some(priority) = spec.instances.failover_priority.get(&ordinal.to_string()) {
        // Patroni: priority 0 means never promoted automatically.
        config["tags"] = json!({"failover_priority": priority, "nofailover": *priority == 0});
    }
    // Serializing a `serde_json::Value` to YAML cannot fail (string keys only).
    serde_yaml::to_string(&config).unwrap_or_default()
}

/// The file name of a member's configuration in the ConfigMap: the Pod name, which the
/// container's command finds through `$(PATRONI_NAME)`.
pub fn member_file(names: &Names, ordinal: i32) -> String {
    format!("{}.yml", names.pod(ordinal))
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
        "synchronous_mode": ha.synchronous_mode,
        "synchronous_mode_strict": ha.synchronous_mode_strict,
        "postgresql": {
            "use_pg_rewind": ha.use_pg_rewind,
            "use_slots": true,
        },
    });
    if let Some(standby) = &spec.standby {
        let mut standby_cluster = json!({"host": standby.host, "port": standby.port});
        if let Some(slot) = &standby.primary_slot_name {
            standby_cluster["primary_slot_name"] = json!(slot);
        }
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
            "bin_dir": format!("/usr/lib/postgresql/{}/bin", spec.postgres_version),
            "parameters": parameters,
            "pg_hba": pg_hba,
            "use_unix_socket": true,
            "authentication": {
                "superuser": {"username": SUPERUSER},
                "replication": {"username": REPLICATION_USER},
            },
        },
        "log": {"type": "json", "level": "INFO"},
    });
    if let Some(stanza) = stanza(names, spec) {
        let params = &mut config["postgresql"]["parameters"];
        params["archive_mode"] = json!("on");
        params["archive_command"] = json!(format!("pgbackrest --stanza={stanza} archive-push %p"));
        config["postgresql"]["recovery_conf"] = json!({"restore_command": format!("pgbackrest --stanza={stanza} archive-get %f \"%p\"")});
        if let Some(restore) = &spec.restore {
            // Patroni's custom bootstrap method: the first member restores instead of initdb.
            let repo = restore.repo.trim_start_matches("repo");
            let mut command = format!("pgbackrest --stanza={stanza} --repo={repo} restore --delta");
            if let Some(t) = &restore.target_time {
                command.push_str(&format!(
                    " --type=time --target=\"{t}\" --target-action=promote"
                ));
            }
            config["bootstrap"]["method"] = json!("pgbackrest");
            config["bootstrap"]["pgbackrest"] = json!({
                "command": command,
                "keep_existing_recovery_conf": true,
                "no_params": true,
            });
        }
    }
    config
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

/// `pgbackrest.conf` for the members (mounted beside the agent's file), in pgBackRest's INI
/// format: one `[global]` section with the repositories and retention, one stanza section with
/// the data directory. S3 credentials are not in the file: pgBackRest reads
/// `PGBACKREST_REPO<n>_S3_KEY`/`_KEY_SECRET` from the environment the StatefulSet sets.
pub fn pgbackrest_conf(names: &Names, spec: &PostgresClusterSpec) -> Option<String> {
    let backups = spec.backups.as_ref()?;
    let stanza = stanza(names, spec)?;
    let mut out = String::from("[global]\nlog-level-console=info\nstart-fast=y\n");
    for repo in &backups.pgbackrest.repos {
        let n = repo.name.trim_start_matches("repo");
        out.push_str(&format!("repo{n}-path={}\n", repo.path));
        if let Some(s3) = &repo.s3 {
            out.push_str(&format!(
                "repo{n}-type=s3\nrepo{n}-s3-bucket={}\nrepo{n}-s3-endpoint={}\nrepo{n}-s3-region={}\n",
                s3.bucket, s3.endpoint, s3.region
            ));
        }
        if let Some(full) = repo.retention_full {
            out.push_str(&format!("repo{n}-retention-full={full}\n"));
        }
        if let Some(diff) = repo.retention_diff {
            out.push_str(&format!("repo{n}-retention-diff={diff}\n"));
        }
    }
    out.push_str(&format!(
        "\n[{stanza}]\npg1-path={DATA_DIR}\npg1-socket-path=/var/run/postgresql\n"
    ));
    Some(out)
}
