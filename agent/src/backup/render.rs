//! Pure rendering: the `pgbackrest.conf` the agent owns, and the archiving parameters postgres
//! runs with.
//!
//! Every pgBackRest command pgwarden runs, and the `archive_command`/`restore_command` postgres
//! runs, name this file with `--config`, so a member never reads `/etc/pgbackrest.conf` by
//! accident and members sharing a host (tests, `local-cluster.sh`) never share lock files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::config::Config;

use super::settings::{PgBackRestConfig, RepoType, Resolved};
use super::standby::Endpoint;

/// Quotes a word for `/bin/sh` (postgres runs archive and restore commands through it).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The unix socket directory pgBackRest connects through (it does not use TCP for the local
/// postgres): the first `unix_socket_directories` entry, else Debian's default.
pub fn socket_dir(config: &Config) -> String {
    config
        .postgresql
        .parameters
        .get("unix_socket_directories")
        .map(|v| v.as_setting())
        .and_then(|d| d.split(',').next().map(|s| s.trim().to_owned()))
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/var/run/postgresql".to_owned())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "y"
    } else {
        "n"
    }
}

/// Renders `pgbackrest.conf`.
pub fn conf(config: &Config, pb: &PgBackRestConfig, resolved: &Resolved) -> String {
    conf_with(config, pb, resolved, None)
}

/// The file the leader's `pgbackrest backup` reads when it backs up from `standby`: the same
/// as `pgbackrest.conf` plus `backup-standby=y` and the standby as `pg2-*`, reached through its
/// TLS server with this member's certificate as the client certificate. A separate file, so
/// that `archive_command` and the other commands never depend on which replica was chosen.
pub fn standby_backup_conf(
    config: &Config,
    pb: &PgBackRestConfig,
    resolved: &Resolved,
    standby: &Endpoint,
) -> String {
    conf_with(config, pb, resolved, Some(standby))
}

fn conf_with(
    config: &Config,
    pb: &PgBackRestConfig,
    resolved: &Resolved,
    standby: Option<&Endpoint>,
) -> String {
    let mut global: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| global.push((k, v));
    for (i, repo) in pb.repos.iter().enumerate() {
        let n = i + 1;
        let kind = match repo.kind {
            RepoType::Posix => "posix",
            RepoType::S3 => "s3",
        };
        set(format!("repo{n}-type"), kind.into());
        if let Some(p) = &repo.path {
            set(format!("repo{n}-path"), p.display().to_string());
        }
        let opt = |v: &Option<u32>| v.map(|v| v.to_string());
        for (key, value) in [
            ("retention-full", opt(&repo.retention_full)),
            ("retention-full-type", repo.retention_full_type.clone()),
            ("retention-diff", opt(&repo.retention_diff)),
            ("retention-archive", opt(&repo.retention_archive)),
            (
                "retention-archive-type",
                repo.retention_archive_type.clone(),
            ),
            ("s3-bucket", repo.s3_bucket.clone()),
            ("s3-endpoint", repo.s3_endpoint.clone()),
            ("s3-region", repo.s3_region.clone()),
            ("s3-key", repo.s3_key.clone()),
            ("s3-key-secret", repo.s3_key_secret.clone()),
            ("s3-uri-style", repo.s3_uri_style.clone()),
            (
                "s3-verify-tls",
                repo.s3_verify_tls.map(|b| yes_no(b).into()),
            ),
        ] {
            if let Some(v) = value {
                set(format!("repo{n}-{key}"), v);
            }
        }
    }
    if let Some(t) = &pb.compress_type {
        set("compress-type".into(), t.clone());
    }
    if let Some(l) = pb.compress_level {
        set("compress-level".into(), l.to_string());
    }
    if let Some(p) = pb.process_max {
        set("process-max".into(), p.to_string());
    }
    set("start-fast".into(), yes_no(pb.start_fast).into());
    let dir = &resolved.config_dir;
    set("lock-path".into(), dir.join("lock").display().to_string());
    set("log-path".into(), dir.join("log").display().to_string());
    set("spool-path".into(), dir.join("spool").display().to_string());
    // archive-push runs under postgres, whose log gets the console output: warnings only.
    set("log-level-console".into(), "warn".into());
    set("log-level-file".into(), "info".into());
    if let Some(tls) = &pb.tls_server {
        // Only `pgbackrest server` reads these; other commands ignore them in the file.
        set("tls-server-address".into(), tls.address.clone());
        set("tls-server-port".into(), tls.port.to_string());
        set(
            "tls-server-cert-file".into(),
            tls.cert_file.display().to_string(),
        );
        set(
            "tls-server-key-file".into(),
            tls.key_file.display().to_string(),
        );
        set(
            "tls-server-ca-file".into(),
            tls.ca_file.display().to_string(),
        );
        set(
            "tls-server-auth".into(),
            format!("{}={}", tls.client_cn.trim(), resolved.stanza),
        );
    }
    // Pass-through options come last and win, except those pgwarden must own.
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    let mut order = Vec::new();
    for (k, v) in global {
        if merged.insert(k.clone(), v).is_none() {
            order.push(k);
        }
    }
    for (k, v) in &pb.options {
        if merged.insert(k.clone(), v.as_setting()).is_none() {
            order.push(k.clone());
        }
    }
    let mut out = String::from(
        "# Managed by pgwarden: edits are overwritten. Change the `pgbackrest` section instead.\n[global]\n",
    );
    for k in &order {
        let _ = writeln!(out, "{k}={}", merged[k]);
    }
    let superuser = &config.postgresql.authentication.superuser.username;
    let (_, port) = crate::postgres::conf::split_listen(&config.postgresql.listen);
    // A cluster bootstrapped from another cluster's stanza reads that stanza during recovery
    // (restore, archive-get): it needs this member's pg1-* options too.
    let mut stanzas = vec![resolved.stanza.clone()];
    if config.bootstrap.restores_with_pgbackrest() {
        if let Some(source) = config
            .bootstrap
            .pgbackrest
            .as_ref()
            .and_then(|b| b.stanza.clone())
        {
            if !stanzas.contains(&source) {
                stanzas.push(source);
            }
        }
    }
    for stanza in stanzas {
        let _ = write!(
            out,
            "\n[{stanza}]\npg1-path={data}\npg1-port={port}\npg1-socket-path={socket}\npg1-user={user}\n",
            data = config.postgresql.data_dir.display(),
            port = port.unwrap_or(5432),
            socket = socket_dir(config),
            user = superuser,
        );
        if let (Some(sb), Some(tls), true) = (standby, &pb.tls_server, stanza == resolved.stanza) {
            let _ = write!(
                out,
                "backup-standby=y\npg2-host={host}\npg2-host-type=tls\npg2-host-port={tls_port}\n\
                 pg2-host-cert-file={cert}\npg2-host-key-file={key}\npg2-host-ca-file={ca}\n\
                 pg2-path={path}\npg2-port={port}\npg2-socket-path={socket}\npg2-user={user}\n",
                host = sb.tls_host,
                tls_port = sb.tls_port,
                cert = tls.cert_file.display(),
                key = tls.key_file.display(),
                ca = tls.ca_file.display(),
                path = sb.pg_path.display(),
                port = sb.pg_port,
                socket = sb.pg_socket_path,
                user = sb.pg_user,
            );
        }
    }
    out
}

/// Writes a rendered file next to `pgbackrest.conf` (mode 0600).
pub fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    write_private(path, text)
}

/// The `pgbackrest --config=… --stanza=…` prefix of the commands postgres runs.
fn command_prefix(resolved: &Resolved, stanza: &str) -> String {
    format!(
        "{} --config={} --stanza={}",
        shell_quote(&resolved.command.display().to_string()),
        shell_quote(&resolved.config_file.display().to_string()),
        shell_quote(stanza)
    )
}

/// `restore_command` reading from `stanza`.
pub fn restore_command(resolved: &Resolved, stanza: &str) -> String {
    format!("{} archive-get %f \"%p\"", command_prefix(resolved, stanza))
}

/// The postgres parameters for archiving into the configured stanza. They come before the
/// user's parameters, so a `postgresql.parameters.archive_command` still wins.
pub fn archive_parameters(resolved: &Resolved) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("archive_mode".to_owned(), "on".to_owned()),
        (
            "archive_command".to_owned(),
            format!(
                "{} archive-push \"%p\"",
                command_prefix(resolved, &resolved.stanza)
            ),
        ),
        (
            "restore_command".to_owned(),
            restore_command(resolved, &resolved.stanza),
        ),
    ])
}

/// Writes `pgbackrest.conf` and creates the lock, log and spool directories (mode 0700: the
/// file may hold S3 secrets).
pub fn write(resolved: &Resolved, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = &resolved.config_dir;
    for sub in ["lock", "log", "spool"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    write_private(&resolved.config_file, text)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("pgwarden-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PgValue;

    fn config() -> Config {
        let mut c: Config = serde_yaml::from_str(
            "scope: batman\npostgresql:\n  listen: 127.0.0.1:5433\n  data_dir: /srv/pg/data\n  \
             parameters: {unix_socket_directories: '/run/pg, /tmp'}\n  \
             authentication: {superuser: {username: postgres}, replication: {username: r}}\n\
             pgbackrest:\n  repos:\n    - {path: /backups, retention_full: 2}\n    \
             - {type: s3, path: /pg, s3_bucket: b, s3_endpoint: e, s3_region: r, s3_key: k, \
             s3_key_secret: s, s3_verify_tls: false}\n  compress_type: lz4\n  process_max: 2\n  \
             options: {archive-timeout: 30, start-fast: n}\n",
        )
        .expect("yaml");
        c.name = "pg0".into();
        c
    }

    #[test]
    fn conf_has_repositories_options_and_the_stanza_for_this_member() {
        let mut c = config();
        c.bootstrap.method = Some("pgbackrest".into());
        c.bootstrap.pgbackrest = Some(serde_yaml::from_str("stanza: old").expect("yaml"));
        let pb = c.pgbackrest.clone().expect("set");
        let r = pb.resolve(&c);
        let text = conf(&c, &pb, &r);
        for line in [
            "[global]",
            "repo1-type=posix",
            "repo1-path=/backups",
            "repo1-retention-full=2",
            "repo2-type=s3",
            "repo2-s3-bucket=b",
            "repo2-s3-verify-tls=n",
            "compress-type=lz4",
            "process-max=2",
            "lock-path=/srv/pg/pgbackrest/lock",
            "archive-timeout=30",
            "[batman]",
            "[old]",
            "pg1-path=/srv/pg/data",
            "pg1-port=5433",
            "pg1-socket-path=/run/pg",
            "pg1-user=postgres",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // A pass-through option overrides pgwarden's default instead of duplicating it.
        assert_eq!(text.matches("start-fast=").count(), 1);
        assert!(text.contains("start-fast=n"));
    }

    #[test]
    fn archive_commands_name_the_config_and_stanza_and_quote_paths() {
        let mut c = config();
        if let Some(pb) = c.pgbackrest.as_mut() {
            pb.config_dir = Some("/srv/my dir".into());
            pb.options.insert("x".into(), PgValue::Int(1));
        }
        let r = c.pgbackrest.as_ref().expect("set").resolve(&c);
        let p = archive_parameters(&r);
        assert_eq!(p["archive_mode"], "on");
        assert_eq!(
            p["archive_command"],
            "pgbackrest --config='/srv/my dir/pgbackrest.conf' --stanza=batman archive-push \"%p\""
        );
        assert!(p["restore_command"].ends_with("archive-get %f \"%p\""));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn the_standby_backup_file_adds_the_tls_server_and_the_standby_as_pg2() {
        let mut c = config();
        if let Some(pb) = c.pgbackrest.as_mut() {
            pb.backup_standby = true;
            pb.tls_server = Some(
                serde_yaml::from_str(
                    "{address: 127.0.0.1, connect_address: localhost, port: 8555, \
                     cert_file: /tls/m.pem, key_file: /tls/m.key, ca_file: /tls/ca.pem, \
                     client_cn: pgwarden}",
                )
                .expect("yaml"),
            );
        }
        let pb = c.pgbackrest.clone().expect("set");
        let r = pb.resolve(&c);
        let plain = conf(&c, &pb, &r);
        for line in [
            "tls-server-address=127.0.0.1",
            "tls-server-port=8555",
            "tls-server-auth=pgwarden=batman",
            "tls-server-ca-file=/tls/ca.pem",
        ] {
            assert!(
                plain.lines().any(|l| l == line),
                "{line} missing in\n{plain}"
            );
        }
        assert!(!plain.contains("pg2-"), "{plain}");
        assert!(!plain.contains("backup-standby"), "{plain}");
        let standby = Endpoint {
            tls_host: "localhost".into(),
            tls_port: 8556,
            pg_path: "/srv/pg1/data".into(),
            pg_port: 5434,
            pg_socket_path: "/run/pg1".into(),
            pg_user: "postgres".into(),
        };
        let text = standby_backup_conf(&c, &pb, &r, &standby);
        let section = text.split("[batman]").nth(1).expect("stanza section");
        for line in [
            "backup-standby=y",
            "pg1-path=/srv/pg/data",
            "pg2-host=localhost",
            "pg2-host-type=tls",
            "pg2-host-port=8556",
            "pg2-host-cert-file=/tls/m.pem",
            "pg2-host-key-file=/tls/m.key",
            "pg2-host-ca-file=/tls/ca.pem",
            "pg2-path=/srv/pg1/data",
            "pg2-port=5434",
            "pg2-socket-path=/run/pg1",
            "pg2-user=postgres",
        ] {
            assert!(
                section.lines().any(|l| l == line),
                "{line} missing in\n{text}"
            );
        }
    }
}
