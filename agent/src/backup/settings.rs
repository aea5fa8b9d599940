//! The `pgbackrest` section of the configuration, `bootstrap.pgbackrest` (bootstrap from a
//! backup) and their validation.
//!
//! The section is pgwarden's own (Patroni leaves pgBackRest to the user); the bootstrap section
//! keeps Patroni's custom-bootstrap shape (`bootstrap.method: pgbackrest` with
//! `recovery_conf`), except that pgwarden runs the restore itself instead of a `command`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::BackupType;
use crate::config::{Config, FieldError, PgValue};

/// `pgbackrest`: enables WAL archiving to, backups into and restores from pgBackRest
/// repositories.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct PgBackRestConfig {
    /// Stanza name; empty means the cluster's `scope`.
    pub stanza: String,
    /// The `pgbackrest` executable.
    pub command: PathBuf,
    /// Where the agent writes `pgbackrest.conf` and keeps pgBackRest's lock, log and spool
    /// files; default `<parent of data_dir>/pgbackrest`. It must not be inside the data
    /// directory: a delta restore would delete it.
    pub config_dir: Option<PathBuf>,
    /// Repositories, `repo1`, `repo2`, … in this order.
    pub repos: Vec<RepoConfig>,
    /// `compress-type`: `none`, `gz`, `lz4`, `zst`, `bz2`.
    pub compress_type: Option<String>,
    /// `compress-level`.
    pub compress_level: Option<u32>,
    /// `process-max`: parallel processes for backup, restore and async archiving.
    pub process_max: Option<u32>,
    /// `start-fast`: force a checkpoint at backup start instead of waiting for the next one.
    pub start_fast: bool,
    /// Cron schedules (5 fields, or 6 with seconds first; local time) per backup type, of
    /// `repo1`: the form from before per-repository schedules, kept so existing files keep
    /// their meaning. The same as `repos[0].schedule`; setting both is refused.
    pub schedule: ScheduleConfig,
    /// A backup (or stanza-create/check/restore) running longer than this many seconds is
    /// killed with its process group.
    pub timeout: u64,
    /// Extra `[global]` options passed to pgBackRest as they are (`key: value`).
    pub options: BTreeMap<String, PgValue>,
    /// Take backups from a streaming replica (pgBackRest's `backup-standby=y`): the leader
    /// still runs `pgbackrest backup`, which copies the files from the chosen replica through
    /// that replica's pgBackRest TLS server. Needs `tls_server` on every member.
    pub backup_standby: bool,
    /// With `backup_standby`, when no replica is usable: `true` backs up from the primary alone
    /// (pgBackRest's later `prefer`), `false` (default, pgBackRest's `y`) skips the backup and
    /// reports it as failed.
    pub backup_standby_fallback: bool,
    /// The `pgbackrest server` the agent runs beside postgres, so that the leader's backup can
    /// read this member's data directory.
    pub tls_server: Option<TlsServerConfig>,
}

/// `pgbackrest.tls_server`: pgBackRest's TLS server on this member (`pgbackrest server`,
/// supervised by the agent). The same certificate is the client certificate the leader
/// presents to the replicas' servers, so every member's certificate must be signed by
/// `ca_file` and carry `client_cn` as its common name, and name `connect_address` (as a DNS
/// name: pgBackRest 2.45 does not match IP addresses in certificates).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct TlsServerConfig {
    /// `tls-server-address`: the address the server binds.
    pub address: String,
    /// The host name the leader connects to (`pgN-host`), published in the member record;
    /// default `address` unless that is a wildcard.
    pub connect_address: Option<String>,
    /// `tls-server-port`.
    pub port: u16,
    /// PEM files: this member's certificate and key, and the CA that signed every member's.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    /// Common name of the client certificates the server accepts (`tls-server-auth`).
    pub client_cn: String,
}

impl Default for TlsServerConfig {
    fn default() -> Self {
        TlsServerConfig {
            address: "localhost".into(),
            connect_address: None,
            port: 8432,
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            client_cn: String::new(),
        }
    }
}

fn is_wildcard(address: &str) -> bool {
    matches!(address, "" | "0.0.0.0" | "::" | "[::]" | "*")
}

impl TlsServerConfig {
    /// The host the leader's backup connects to.
    pub fn host(&self) -> Option<String> {
        match &self.connect_address {
            Some(h) if !h.trim().is_empty() => Some(h.trim().to_owned()),
            _ if !is_wildcard(self.address.trim()) => Some(self.address.trim().to_owned()),
            _ => None,
        }
    }
}

impl Default for PgBackRestConfig {
    fn default() -> Self {
        PgBackRestConfig {
            stanza: String::new(),
            command: PathBuf::from("pgbackrest"),
            config_dir: None,
            repos: Vec::new(),
            compress_type: None,
            compress_level: None,
            process_max: None,
            start_fast: true,
            schedule: ScheduleConfig::default(),
            timeout: 6 * 3600,
            options: BTreeMap::new(),
            backup_standby: false,
            backup_standby_fallback: false,
            tls_server: None,
        }
    }
}

/// `pgbackrest.schedule` and `pgbackrest.repos[i].schedule`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ScheduleConfig {
    pub full: Option<String>,
    pub diff: Option<String>,
    pub incr: Option<String>,
}

impl ScheduleConfig {
    /// Each backup type with its expression (if any).
    pub fn by_type(&self) -> [(BackupType, &Option<String>); 3] {
        [
            (BackupType::Full, &self.full),
            (BackupType::Diff, &self.diff),
            (BackupType::Incr, &self.incr),
        ]
    }

    pub fn is_empty(&self) -> bool {
        self.by_type().iter().all(|(_, e)| e.is_none())
    }
}

/// Repository kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoType {
    #[default]
    Posix,
    S3,
}

/// One entry of `pgbackrest.repos`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct RepoConfig {
    #[serde(rename = "type")]
    pub kind: RepoType,
    /// `repoN-path`: a directory for posix (required, absolute, writable by the user running
    /// postgres), the prefix inside the bucket for S3.
    pub path: Option<PathBuf>,
    /// `repoN-retention-full` (count of full backups, or days with `retention_full_type: time`).
    pub retention_full: Option<u32>,
    pub retention_full_type: Option<String>,
    pub retention_diff: Option<u32>,
    pub retention_archive: Option<u32>,
    pub retention_archive_type: Option<String>,
    pub s3_bucket: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_key: Option<String>,
    pub s3_key_secret: Option<String>,
    /// `host` or `path`.
    pub s3_uri_style: Option<String>,
    pub s3_verify_tls: Option<bool>,
    /// Cron schedules of backups into this repository (`pgbackrest --repo=<n> backup`).
    #[serde(skip_serializing_if = "ScheduleConfig::is_empty")]
    pub schedule: ScheduleConfig,
}

/// `bootstrap.pgbackrest`: how a new cluster is restored from a repository.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct BootstrapFromBackup {
    /// Stanza to restore from; default the configured `pgbackrest.stanza`. After promotion the
    /// cluster archives into the configured stanza, so this may name an older cluster's.
    pub stanza: Option<String>,
    /// Backup set label (`--set`); default the latest one that can reach the target.
    pub set: Option<String>,
    /// Repository to restore from (`--repo`, 1 = the first of `pgbackrest.repos`); default:
    /// pgBackRest searches the repositories in order.
    pub repo: Option<u32>,
    /// Patroni's `recovery_conf`: `recovery_target_time`, `recovery_target_lsn`,
    /// `recovery_target: immediate`, `recovery_target_inclusive`, `recovery_target_timeline`,
    /// `recovery_target_action` (only `promote`). No target: recover to the end of the WAL.
    pub recovery_conf: BTreeMap<String, PgValue>,
    /// Patroni's custom command is not supported: pgwarden runs the restore itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// Where to stop recovery when bootstrapping from a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay all the WAL in the archive.
    EndOfWal,
    /// `recovery_target_time` (a timestamp postgres understands, with a time zone).
    Time(String),
    /// `recovery_target_lsn`.
    Lsn(String),
    /// `recovery_target: immediate`: stop at the end of the backup.
    Immediate,
}

impl BootstrapFromBackup {
    pub fn target(&self) -> RecoveryTarget {
        let get = |k: &str| self.recovery_conf.get(k).map(PgValue::as_setting);
        if let Some(t) = get("recovery_target_time") {
            RecoveryTarget::Time(t)
        } else if let Some(l) = get("recovery_target_lsn") {
            RecoveryTarget::Lsn(l)
        } else if get("recovery_target").as_deref() == Some("immediate") {
            RecoveryTarget::Immediate
        } else {
            RecoveryTarget::EndOfWal
        }
    }

    /// `recovery_target_inclusive` (default true, as postgres).
    pub fn inclusive(&self) -> bool {
        self.recovery_conf
            .get("recovery_target_inclusive")
            .map(|v| !matches!(v.as_setting().as_str(), "off" | "false" | "0"))
            .unwrap_or(true)
    }

    pub fn timeline(&self) -> Option<String> {
        self.recovery_conf
            .get("recovery_target_timeline")
            .map(PgValue::as_setting)
    }
}

const RECOVERY_KEYS: [&str; 6] = [
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
];

const COMPRESS_TYPES: [&str; 5] = ["none", "gz", "lz4", "zst", "bz2"];

/// Resolved values the agent uses at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub stanza: String,
    pub command: PathBuf,
    pub config_dir: PathBuf,
    pub config_file: PathBuf,
    pub timeout: Duration,
}

impl PgBackRestConfig {
    /// Every schedule as (repository number, type, expression): `pgbackrest.schedule` is
    /// repo1's, like `repos[0].schedule` (validation refuses both set).
    pub fn schedules(&self) -> Vec<(u32, BackupType, Option<String>)> {
        let mut out = Vec::new();
        for (i, repo) in self.repos.iter().enumerate() {
            let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
            for (kind, expr) in repo.schedule.by_type() {
                out.push((n, kind, expr.clone()));
            }
        }
        // Without repositories (refused by validation) the old form still names repo1.
        for (kind, expr) in self.schedule.by_type() {
            if let Some(e) = expr {
                match out.iter_mut().find(|(n, k, _)| *n == 1 && *k == kind) {
                    Some(slot) => slot.2 = Some(e.clone()),
                    None => out.push((1, kind, Some(e.clone()))),
                }
            }
        }
        out
    }

    /// The stanza, the paths and the timeout, with defaults applied.
    pub fn resolve(&self, config: &Config) -> Resolved {
        let stanza = if self.stanza.trim().is_empty() {
            config.scope.clone()
        } else {
            self.stanza.clone()
        };
        let config_dir = self.config_dir.clone().unwrap_or_else(|| {
            let data = &config.postgresql.data_dir;
            data.parent()
                .unwrap_or_else(|| Path::new("/"))
                .join("pgbackrest")
        });
        Resolved {
            stanza,
            command: self.command.clone(),
            config_file: config_dir.join("pgbackrest.conf"),
            config_dir,
            timeout: Duration::from_secs(self.timeout.max(1)),
        }
    }
}

fn is_option_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Options pgwarden sets itself: passing them through would break archiving or restores.
const MANAGED_OPTIONS: [&str; 7] = [
    "pg1-path",
    "pg1-port",
    "pg1-socket-path",
    "pg1-user",
    "lock-path",
    "stanza",
    "backup-standby",
];

/// Managed option families: the TLS server (`pgbackrest.tls_server`) and the other hosts
/// (`pg2-…` to `pg8-…`, written for a backup from a standby).
fn is_managed(name: &str) -> bool {
    if MANAGED_OPTIONS.contains(&name) || name.starts_with("tls-server-") {
        return true;
    }
    name.strip_prefix("pg")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(n, _)| n.parse::<u32>().is_ok_and(|n| n >= 2))
}

/// `pgbackrest.backup_standby` and `pgbackrest.tls_server`.
fn validate_standby(pb: &PgBackRestConfig, err: &mut impl FnMut(&str, String)) {
    if pb.backup_standby && pb.tls_server.is_none() {
        err(
            "pgbackrest.tls_server",
            "is required with backup_standby: the leader's backup reads the replica's data \
             directory through the replica's pgBackRest TLS server"
                .into(),
        );
    }
    if pb.backup_standby_fallback && !pb.backup_standby {
        err(
            "pgbackrest.backup_standby_fallback",
            "only applies with backup_standby: true".into(),
        );
    }
    let Some(tls) = &pb.tls_server else { return };
    if tls.address.trim().is_empty() {
        err("pgbackrest.tls_server.address", "must not be empty".into());
    }
    if tls.host().is_none() {
        err(
            "pgbackrest.tls_server.connect_address",
            format!(
                "is required when address is the wildcard {:?}: the leader needs a host name \
                 to connect to",
                tls.address
            ),
        );
    }
    if tls.port == 0 {
        err(
            "pgbackrest.tls_server.port",
            "must be between 1 and 65535".into(),
        );
    }
    for (key, path) in [
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
        ("ca_file", &tls.ca_file),
    ] {
        let at = format!("pgbackrest.tls_server.{key}");
        if path.as_os_str().is_empty() {
            err(&at, "is required (a PEM file)".into());
        } else if !path.is_absolute() {
            err(&at, "must be an absolute path".into());
        } else if let Err(e) = std::fs::File::open(path) {
            // Checked here so a typo stops the agent with the field named, instead of a
            // server that keeps failing in the background.
            err(&at, format!("cannot be read: {e}"));
        }
    }
    let cn = tls.client_cn.trim();
    if cn.is_empty() {
        err(
            "pgbackrest.tls_server.client_cn",
            "is required: the common name of the members' certificates".into(),
        );
    } else if cn.contains(['=', ',', ' ']) {
        err(
            "pgbackrest.tls_server.client_cn",
            format!("{cn:?} cannot contain `=`, `,` or spaces (pgBackRest's tls-server-auth)"),
        );
    }
}

/// Checks `pgbackrest`, `bootstrap.pgbackrest` and `postgresql.create_replica_methods`,
/// adding one error per bad field.
pub fn validate(config: &Config, errors: &mut Vec<FieldError>) {
    let mut err = |path: &str, reason: String| {
        errors.push(FieldError {
            path: path.to_owned(),
            reason,
        })
    };
    for (i, method) in config.postgresql.create_replica_methods.iter().enumerate() {
        if crate::postgres::replica_method::ReplicaMethod::is_custom(config, method) {
            if let Err(e) = crate::postgres::replica_method::ReplicaMethod::of(config, method) {
                err(&e.path, e.reason);
            }
        } else if method == "pgbackrest" && config.pgbackrest.is_none() {
            err(
                &format!("postgresql.create_replica_methods[{i}]"),
                "`pgbackrest` needs the pgbackrest section".into(),
            );
        }
    }
    match config.bootstrap.method.as_deref() {
        None | Some("initdb") => {}
        Some("pgbackrest") if config.bootstrap.restores_with_pgbackrest() => {
            if config.pgbackrest.is_none() {
                err(
                    "bootstrap.method",
                    "`pgbackrest` needs the pgbackrest section (the repository to restore from)"
                        .into(),
                );
            }
            let boot = config.bootstrap.pgbackrest.clone().unwrap_or_default();
            if let Some(pb) = &config.pgbackrest {
                // A restored cluster has its source's system identifier: pgBackRest would
                // accept its new timeline into the source's archive.
                let own = pb.resolve(config).stanza;
                let source = boot.stanza.clone().unwrap_or_else(|| own.clone());
                if source == own {
                    err(
                        "bootstrap.pgbackrest.stanza",
                        format!(
                            "restores from {source:?}, the stanza this cluster archives into \
                             (pgbackrest.stanza{}): the restored cluster would write its WAL \
                             and backups into its source's archive; set pgbackrest.stanza to a \
                             new name (for example {own}-restored) and \
                             bootstrap.pgbackrest.stanza to {source:?}",
                            if pb.stanza.trim().is_empty() {
                                ", which defaults to the scope"
                            } else {
                                ""
                            }
                        ),
                    );
                }
                if let Some(n) = boot.repo {
                    if n == 0 || n as usize > pb.repos.len() {
                        err(
                            "bootstrap.pgbackrest.repo",
                            format!(
                                "is {n}, but pgbackrest.repos has {} repositories (repo numbers \
                                 start at 1)",
                                pb.repos.len()
                            ),
                        );
                    }
                }
            }
            if boot.command.is_some() {
                err(
                    "bootstrap.pgbackrest.command",
                    "is not supported: pgwarden runs `pgbackrest restore` itself; set \
                     recovery_conf (and stanza) instead"
                        .into(),
                );
            }
            for key in boot.recovery_conf.keys() {
                if !RECOVERY_KEYS.contains(&key.as_str()) {
                    err(
                        &format!("bootstrap.pgbackrest.recovery_conf.{key}"),
                        format!(
                            "is not a recovery target setting ({})",
                            RECOVERY_KEYS.join(", ")
                        ),
                    );
                }
            }
            if let Some(action) = boot.recovery_conf.get("recovery_target_action") {
                if action.as_setting() != "promote" {
                    err(
                        "bootstrap.pgbackrest.recovery_conf.recovery_target_action",
                        "only `promote` is supported: a bootstrapped cluster must become writable"
                            .into(),
                    );
                }
            }
            if let Some(t) = boot.recovery_conf.get("recovery_target") {
                if t.as_setting() != "immediate" {
                    err(
                        "bootstrap.pgbackrest.recovery_conf.recovery_target",
                        "only `immediate` is valid".into(),
                    );
                }
            }
            if let RecoveryTarget::Lsn(lsn) = boot.target() {
                if crate::postgres::controldata::parse_lsn(&lsn).is_none() {
                    err(
                        "bootstrap.pgbackrest.recovery_conf.recovery_target_lsn",
                        format!("{lsn:?} is not an LSN such as 0/3000060"),
                    );
                }
            }
            if let RecoveryTarget::Time(t) = boot.target() {
                if chrono::DateTime::parse_from_str(&t, "%Y-%m-%d %H:%M:%S%.f%#z").is_err()
                    && chrono::DateTime::parse_from_rfc3339(&t).is_err()
                {
                    err(
                        "bootstrap.pgbackrest.recovery_conf.recovery_target_time",
                        format!(
                            "{t:?} is not a timestamp with a time zone \
                             (2024-05-01 12:00:00+00 or RFC 3339)"
                        ),
                    );
                }
            }
        }
        Some(_) => {
            if let Err(e) =
                crate::postgres::custom_bootstrap::CustomBootstrap::of(&config.bootstrap)
            {
                err(&e.path, e.reason);
            }
        }
    }

    let Some(pb) = &config.pgbackrest else { return };
    let stanza = pb.resolve(config).stanza;
    if stanza.is_empty()
        || !stanza
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        err(
            "pgbackrest.stanza",
            format!("{stanza:?} is not a valid stanza name (letters, digits, -, _, .)"),
        );
    }
    if let Some(dir) = &pb.config_dir {
        if !dir.is_absolute() {
            err("pgbackrest.config_dir", "must be an absolute path".into());
        }
        if dir.starts_with(&config.postgresql.data_dir)
            && !config.postgresql.data_dir.as_os_str().is_empty()
        {
            err(
                "pgbackrest.config_dir",
                "must not be inside postgresql.data_dir: a delta restore would delete it".into(),
            );
        }
    }
    if pb.repos.is_empty() {
        err(
            "pgbackrest.repos",
            "needs at least one repository (type: posix with a path)".into(),
        );
    }
    if pb.repos.len() > 4 {
        err(
            "pgbackrest.repos",
            "pgBackRest supports at most 4 repositories".into(),
        );
    }
    for (i, repo) in pb.repos.iter().enumerate() {
        let at = |k: &str| format!("pgbackrest.repos[{i}].{k}");
        match (&repo.path, repo.kind) {
            (None, RepoType::Posix) => {
                err(&at("path"), "is required for a posix repository".into())
            }
            (Some(p), _) if !p.is_absolute() => err(&at("path"), "must be an absolute path".into()),
            (Some(p), RepoType::Posix) if p.starts_with(&config.postgresql.data_dir) => {
                err(&at("path"), "must not be inside postgresql.data_dir".into())
            }
            _ => {}
        }
        if repo.kind == RepoType::S3 {
            for (key, value) in [
                ("s3_bucket", &repo.s3_bucket),
                ("s3_endpoint", &repo.s3_endpoint),
                ("s3_region", &repo.s3_region),
                ("s3_key", &repo.s3_key),
                ("s3_key_secret", &repo.s3_key_secret),
            ] {
                if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                    err(&at(key), "is required for an s3 repository".into());
                }
            }
            if let Some(style) = &repo.s3_uri_style {
                if style != "host" && style != "path" {
                    err(
                        &at("s3_uri_style"),
                        format!("{style:?} is neither host nor path"),
                    );
                }
            }
        } else {
            for (key, set) in [
                ("s3_bucket", repo.s3_bucket.is_some()),
                ("s3_endpoint", repo.s3_endpoint.is_some()),
                ("s3_key", repo.s3_key.is_some()),
            ] {
                if set {
                    err(&at(key), "only applies to `type: s3`".into());
                }
            }
        }
        for (key, value) in [
            ("retention_full_type", &repo.retention_full_type),
            ("retention_archive_type", &repo.retention_archive_type),
        ] {
            if let Some(v) = value {
                let allowed: &[&str] = if key == "retention_full_type" {
                    &["count", "time"]
                } else {
                    &["full", "diff", "incr"]
                };
                if !allowed.contains(&v.as_str()) {
                    err(
                        &at(key),
                        format!("{v:?} is not one of {}", allowed.join(", ")),
                    );
                }
            }
        }
        for (key, value) in [
            ("retention_full", repo.retention_full),
            ("retention_diff", repo.retention_diff),
            ("retention_archive", repo.retention_archive),
        ] {
            if value == Some(0) {
                err(&at(key), "must be at least 1".into());
            }
        }
    }
    if let Some(t) = &pb.compress_type {
        if !COMPRESS_TYPES.contains(&t.as_str()) {
            err(
                "pgbackrest.compress_type",
                format!("{t:?} is not one of {}", COMPRESS_TYPES.join(", ")),
            );
        }
    }
    if let Some(level) = pb.compress_level {
        if level > 22 {
            err(
                "pgbackrest.compress_level",
                format!("{level} is out of range (0–22, depending on compress_type)"),
            );
        }
    }
    if pb.process_max == Some(0) || pb.process_max.is_some_and(|p| p > 999) {
        err("pgbackrest.process_max", "must be between 1 and 999".into());
    }
    if pb.timeout == 0 {
        err("pgbackrest.timeout", "must be at least 1 second".into());
    }
    let mut check_schedule = |at: &str, schedule: &ScheduleConfig| {
        for (kind, expr) in schedule.by_type() {
            if let Some(expr) = expr {
                if let Err(reason) = super::schedule::parse(expr) {
                    err(&format!("{at}.{kind}"), reason);
                }
            }
        }
    };
    check_schedule("pgbackrest.schedule", &pb.schedule);
    for (i, repo) in pb.repos.iter().enumerate() {
        check_schedule(&format!("pgbackrest.repos[{i}].schedule"), &repo.schedule);
    }
    if !pb.schedule.is_empty() && pb.repos.first().is_some_and(|r| !r.schedule.is_empty()) {
        // Both name repo1: merging them would hide which one the operator meant.
        err(
            "pgbackrest.repos[0].schedule",
            "conflicts with pgbackrest.schedule, which is also repo1's schedule: set one of them"
                .into(),
        );
    }
    for name in pb.options.keys() {
        if !is_option_name(name) {
            err(
                &format!("pgbackrest.options.{name}"),
                "is not a pgBackRest option name (lower case, digits and `-`)".into(),
            );
        } else if is_managed(name) {
            err(
                &format!("pgbackrest.options.{name}"),
                "is set by pgwarden (from the postgresql section, tls_server or \
                 backup_standby) and cannot be overridden"
                    .into(),
            );
        }
    }
    validate_standby(pb, &mut err);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        let mut c = Config {
            scope: "batman".into(),
            ..Default::default()
        };
        c.postgresql.data_dir = "/pg/data".into();
        c
    }

    fn errors(c: &Config) -> Vec<String> {
        let mut e = Vec::new();
        validate(c, &mut e);
        e.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn a_posix_repository_needs_an_absolute_path_outside_the_data_directory() {
        let mut c = base();
        let yaml = "repos:\n  - type: posix\n  - path: relative\n  - path: /pg/data/repo\n";
        c.pgbackrest = Some(serde_yaml::from_str(yaml).expect("yaml"));
        assert_eq!(
            errors(&c),
            vec![
                "pgbackrest.repos[0].path",
                "pgbackrest.repos[1].path",
                "pgbackrest.repos[2].path"
            ]
        );
    }

    #[test]
    fn defaults_resolve_stanza_to_scope_and_config_next_to_the_data_directory() {
        let mut c = base();
        c.pgbackrest = Some(serde_yaml::from_str("repos: [{path: /repo}]").expect("yaml"));
        assert!(errors(&c).is_empty());
        let r = c.pgbackrest.as_ref().expect("set").resolve(&c);
        assert_eq!(r.stanza, "batman");
        assert_eq!(
            r.config_file,
            PathBuf::from("/pg/pgbackrest/pgbackrest.conf")
        );
    }

    #[test]
    fn bad_values_are_reported_with_their_paths() {
        let mut c = base();
        let yaml = "repos: [{type: s3, path: /x, s3_bucket: b}]\ncompress_type: rar\n\
                    process_max: 0\nschedule: {full: 'not cron'}\noptions: {pg1-path: /x, Bad: 1}\n";
        c.pgbackrest = Some(serde_yaml::from_str(yaml).expect("yaml"));
        c.postgresql.create_replica_methods = vec!["wal_e".into()];
        let e = errors(&c);
        for path in [
            "pgbackrest.repos[0].s3_endpoint",
            "pgbackrest.repos[0].s3_region",
            "pgbackrest.repos[0].s3_key",
            "pgbackrest.repos[0].s3_key_secret",
            "pgbackrest.compress_type",
            "pgbackrest.process_max",
            "pgbackrest.schedule.full",
            "pgbackrest.options.pg1-path",
            "pgbackrest.options.Bad",
            // A custom method needs its section with a command.
            "postgresql.wal_e",
        ] {
            assert!(e.contains(&path.to_owned()), "{path} missing from {e:?}");
        }
    }

    #[test]
    fn each_repository_has_its_own_schedule_and_the_old_form_means_repo1() {
        let mut c = base();
        let yaml = "repos:\n  - {path: /r1}\n  - {path: /r2, schedule: {full: '0 1 * * 0', \
                    incr: '0 * * * *'}}\nschedule: {diff: '0 3 * * *'}\n";
        c.pgbackrest = Some(serde_yaml::from_str(yaml).expect("yaml"));
        assert!(errors(&c).is_empty(), "{:?}", errors(&c));
        let set: Vec<(u32, BackupType, String)> = c
            .pgbackrest
            .as_ref()
            .expect("set")
            .schedules()
            .into_iter()
            .filter_map(|(n, k, e)| e.map(|e| (n, k, e)))
            .collect();
        assert_eq!(
            set,
            vec![
                (1, BackupType::Diff, "0 3 * * *".to_owned()),
                (2, BackupType::Full, "0 1 * * 0".to_owned()),
                (2, BackupType::Incr, "0 * * * *".to_owned()),
            ]
        );
    }

    #[test]
    fn a_bad_repository_schedule_is_named_and_repo1_cannot_have_two() {
        let mut c = base();
        let yaml = "repos:\n  - {path: /r1, schedule: {full: '0 1 * * 0'}}\n  \
                    - {path: /r2, schedule: {incr: 'hourly'}}\nschedule: {full: '0 2 * * 0'}\n";
        c.pgbackrest = Some(serde_yaml::from_str(yaml).expect("yaml"));
        let mut e = Vec::new();
        validate(&c, &mut e);
        let got: Vec<(String, String)> = e.into_iter().map(|e| (e.path, e.reason)).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "pgbackrest.repos[1].schedule.incr");
        assert!(got[0].1.contains("not a cron expression"), "{got:?}");
        assert_eq!(got[1].0, "pgbackrest.repos[0].schedule");
        assert!(got[1].1.contains("pgbackrest.schedule"), "{got:?}");
    }

    #[test]
    fn bootstrap_targets_are_parsed_and_checked() {
        let mut c = base();
        c.pgbackrest = Some(serde_yaml::from_str("repos: [{path: /repo}]").expect("yaml"));
        c.bootstrap.method = Some("pgbackrest".into());
        c.bootstrap.pgbackrest = Some(
            serde_yaml::from_str(
                "stanza: old\nrecovery_conf: {recovery_target_time: '2026-01-02 03:04:05.123+00', \
                 recovery_target_action: pause}",
            )
            .expect("yaml"),
        );
        assert_eq!(
            errors(&c),
            vec!["bootstrap.pgbackrest.recovery_conf.recovery_target_action"]
        );
        let boot = c.bootstrap.pgbackrest.as_ref().expect("set");
        assert_eq!(
            boot.target(),
            RecoveryTarget::Time("2026-01-02 03:04:05.123+00".into())
        );
        let lsn: BootstrapFromBackup =
            serde_yaml::from_str("stanza: old\nrecovery_conf: {recovery_target_lsn: 'x/y'}")
                .expect("yaml");
        c.bootstrap.pgbackrest = Some(lsn);
        assert_eq!(
            errors(&c),
            vec!["bootstrap.pgbackrest.recovery_conf.recovery_target_lsn"]
        );
        // Restoring from the stanza the cluster archives into (the default) is refused.
        c.bootstrap.pgbackrest = None;
        assert_eq!(errors(&c), vec!["bootstrap.pgbackrest.stanza"]);
        c.bootstrap.pgbackrest = Some(serde_yaml::from_str("stanza: batman").expect("yaml"));
        assert_eq!(errors(&c), vec!["bootstrap.pgbackrest.stanza"]);
        c.bootstrap.pgbackrest = Some(serde_yaml::from_str("stanza: old").expect("yaml"));
        assert!(errors(&c).is_empty());
        assert_eq!(
            BootstrapFromBackup::default().target(),
            RecoveryTarget::EndOfWal
        );
    }

    #[test]
    fn backup_standby_needs_a_tls_server_and_its_fields_are_checked() {
        let mut c = base();
        c.pgbackrest = Some(
            serde_yaml::from_str("repos: [{path: /repo}]\nbackup_standby: true").expect("yaml"),
        );
        assert_eq!(errors(&c), vec!["pgbackrest.tls_server"]);

        let yaml = "repos: [{path: /repo}]\nbackup_standby_fallback: true\n\
                    tls_server: {address: '0.0.0.0', port: 0, cert_file: relative.pem, \
                    key_file: /nonexistent/key.pem, client_cn: 'a=b'}\n";
        c.pgbackrest = Some(serde_yaml::from_str(yaml).expect("yaml"));
        assert_eq!(
            errors(&c),
            vec![
                "pgbackrest.backup_standby_fallback",
                "pgbackrest.tls_server.connect_address",
                "pgbackrest.tls_server.port",
                "pgbackrest.tls_server.cert_file",
                "pgbackrest.tls_server.key_file",
                "pgbackrest.tls_server.ca_file",
                "pgbackrest.tls_server.client_cn",
            ]
        );
    }

    #[test]
    fn a_complete_tls_server_passes_and_its_options_cannot_be_passed_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = dir.path().join("m.pem");
        std::fs::write(&pem, "x").expect("write");
        let mut c = base();
        let yaml = format!(
            "repos: [{{path: /repo}}]\nbackup_standby: true\nbackup_standby_fallback: true\n\
             tls_server: {{address: '0.0.0.0', connect_address: db1, cert_file: {p}, \
             key_file: {p}, ca_file: {p}, client_cn: pgwarden}}\n\
             options: {{pg2-host: x, tls-server-port: 1, backup-standby: y, pg1-host-type: ssh, \
             archive-async: y}}\n",
            p = pem.display()
        );
        c.pgbackrest = Some(serde_yaml::from_str(&yaml).expect("yaml"));
        assert_eq!(
            errors(&c),
            vec![
                "pgbackrest.options.backup-standby",
                "pgbackrest.options.pg2-host",
                "pgbackrest.options.tls-server-port",
            ]
        );
    }
}
