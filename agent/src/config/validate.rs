//! Semantic checks of a loaded configuration, all reported at once, each with its key path
//! (Patroni's `validator.py` does the same).

use std::fmt;

use super::schema::Config;

/// One invalid value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted key path, e.g. `bootstrap.dcs.loop_wait`.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.path, self.reason)
    }
}

/// Checks `host:port` (IPv6 in brackets); hosts may be a comma-separated list when `list`.
fn check_address(value: &str, list: bool) -> Result<(), String> {
    let Some((hosts, port)) = value.rsplit_once(':') else {
        return Err(format!("{value:?} is not host:port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{port:?} is not a port number (1–65535)")),
    }
    let hosts: Vec<&str> = if list {
        hosts.split(',').map(str::trim).collect()
    } else {
        vec![hosts]
    };
    for h in hosts {
        if h.is_empty() {
            return Err(format!("{value:?} has an empty host"));
        }
        if h.contains(char::is_whitespace) {
            return Err(format!("host {h:?} contains white space"));
        }
        if h.contains(':') && !(h.starts_with('[') && h.ends_with(']')) && list {
            // `::1` inside a listen list is fine: postgres takes IPv6 literals bare.
            continue;
        }
    }
    Ok(())
}

fn is_guc_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

const HBA_TYPES: [&str; 9] = [
    "local",
    "host",
    "hostssl",
    "hostnossl",
    "hostgssenc",
    "hostnogssenc",
    "include",
    "include_if_exists",
    "include_dir",
];

const SSL_MODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

const LOG_LEVELS: [&str; 7] = [
    "DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL",
];

impl Config {
    /// Every cross-field and value check; `Err` lists all problems.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |path: &str, reason: String| {
            errors.push(FieldError {
                path: path.to_owned(),
                reason,
            })
        };

        if self.scope.trim().is_empty() {
            err("scope", "is required: the cluster's name".into());
        } else if self.scope.contains('/') {
            err("scope", "must not contain `/`".into());
        }
        if self.name.trim().is_empty() {
            err("name", "is required: this member's unique name".into());
        } else if self.name.contains('/') {
            err("name", "must not contain `/`".into());
        }

        if let Err(r) = check_address(&self.restapi.listen, false) {
            err("restapi.listen", r);
        }
        if self.restapi.connect_address.is_empty() {
            err(
                "restapi.connect_address",
                "is required when restapi.listen binds a wildcard address: other members and \
                 clients must know where to reach this member"
                    .into(),
            );
        } else if let Err(r) = check_address(&self.restapi.connect_address, false) {
            err("restapi.connect_address", r);
        }
        if self.restapi.certfile.is_some() != self.restapi.keyfile.is_some() {
            err(
                "restapi.keyfile",
                "certfile and keyfile must be given together".into(),
            );
        }
        for (key, file) in [
            ("restapi.certfile", &self.restapi.certfile),
            ("restapi.keyfile", &self.restapi.keyfile),
            ("restapi.cafile", &self.restapi.cafile),
        ] {
            if let Some(f) = file {
                if std::fs::metadata(f).is_err() {
                    err(key, format!("{} cannot be read", f.display()));
                } else if key == "restapi.cafile" {
                    // Refused here rather than failing every call to a peer at run time.
                    if let Err(reason) = crate::peer::cafile_client(f) {
                        err(key, reason);
                    }
                }
            }
        }

        if let Some(v) = &self.restapi.verify_client {
            if !v.eq_ignore_ascii_case("none") {
                err(
                    "restapi.verify_client",
                    format!(
                        "{v:?} is not supported: pgwarden cannot check client certificates yet; \
                         use none (and restapi.authentication to protect the write endpoints)"
                    ),
                );
            }
        }

        match (&self.etcd3, &self.kubernetes) {
            (None, None) => err(
                "etcd3",
                "is required (or `kubernetes`): pgwarden needs a DCS".into(),
            ),
            (Some(_), Some(_)) => err(
                "kubernetes",
                "and etcd3 are both configured: choose one DCS".into(),
            ),
            (None, Some(k)) => {
                if k.use_endpoints {
                    err(
                        "kubernetes.use_endpoints",
                        "is not supported: pgwarden elects its leader with a Lease".into(),
                    );
                }
                for (key, value) in [
                    ("kubernetes.scope_label", &k.scope_label),
                    ("kubernetes.role_label", &k.role_label),
                    ("kubernetes.leader_label_value", &k.leader_label_value),
                    ("kubernetes.follower_label_value", &k.follower_label_value),
                ] {
                    if value.trim().is_empty() {
                        err(key, "must not be empty".into());
                    }
                }
                if k.labels.contains_key(&k.scope_label) {
                    err(
                        "kubernetes.labels",
                        format!(
                            "must not contain the scope label {:?}: its value is the scope",
                            k.scope_label
                        ),
                    );
                }
                if k.namespace.as_deref().is_some_and(|n| n.trim().is_empty()) {
                    err("kubernetes.namespace", "must not be empty".into());
                }
            }
            (Some(etcd), None) => {
                if etcd.hosts.is_empty() {
                    err("etcd3.hosts", "needs at least one host:port".into());
                }
                for (i, h) in etcd.hosts.iter().enumerate() {
                    let bare = h
                        .strip_prefix("http://")
                        .or_else(|| h.strip_prefix("https://"))
                        .unwrap_or(h);
                    if let Err(r) = check_address(bare, false) {
                        err(&format!("etcd3.hosts[{i}]"), r);
                    }
                }
                if let Some(p) = &etcd.protocol {
                    if p != "http" && p != "https" {
                        err("etcd3.protocol", format!("{p:?} is neither http nor https"));
                    }
                }
                if etcd.username.is_some() != etcd.password.is_some() {
                    err(
                        "etcd3.password",
                        "username and password must be given together".into(),
                    );
                }
            }
        }

        let dcs = &self.bootstrap.dcs;
        if dcs.ttl < 5 {
            err(
                "bootstrap.dcs.ttl",
                format!("{} is too small: at least 5 seconds", dcs.ttl),
            );
        }
        if dcs.loop_wait < 1 {
            err(
                "bootstrap.dcs.loop_wait",
                "must be at least 1 second".into(),
            );
        }
        if dcs.retry_timeout < 1 {
            err(
                "bootstrap.dcs.retry_timeout",
                "must be at least 1 second".into(),
            );
        }
        // `loop_wait + 2 × retry_timeout ≤ ttl` is restored with a warning after validation
        // (`DynamicConfig::adjust_timeouts`), as Patroni does, instead of refused.
        if let Some(standby) = &dcs.standby_cluster {
            if standby.host.as_deref().is_some_and(|h| h.trim().is_empty()) {
                err(
                    "bootstrap.dcs.standby_cluster.host",
                    "is empty: name the source cluster's primary".into(),
                );
            }
        }
        for name in dcs.postgresql.parameters.keys() {
            if !is_guc_name(name) {
                err(
                    &format!("bootstrap.dcs.postgresql.parameters.{name}"),
                    "is not a valid parameter name".into(),
                );
            }
        }

        let pg = &self.postgresql;
        if pg.data_dir.as_os_str().is_empty() {
            err("postgresql.data_dir", "is required".into());
        }
        if pg.listen.is_empty() {
            err(
                "postgresql.listen",
                "is required (host[,host...]:port)".into(),
            );
        } else if let Err(r) = check_address(&pg.listen, true) {
            err("postgresql.listen", r);
        }
        if pg.connect_address.is_empty() {
            err(
                "postgresql.connect_address",
                "is required when postgresql.listen binds a wildcard address".into(),
            );
        } else if let Err(r) = check_address(&pg.connect_address, false) {
            err("postgresql.connect_address", r);
        }
        if let Some(bin) = &pg.bin_dir {
            if !bin.join("postgres").exists() {
                err(
                    "postgresql.bin_dir",
                    format!("{} has no `postgres` binary", bin.display()),
                );
            }
        }
        for (major, bin) in &pg.bin_dirs {
            if !bin.join("postgres").exists() {
                err(
                    &format!("postgresql.bin_dirs.{major}"),
                    format!("{} has no `postgres` binary", bin.display()),
                );
            }
        }
        for name in pg.parameters.keys() {
            if !is_guc_name(name) {
                err(
                    &format!("postgresql.parameters.{name}"),
                    "is not a valid parameter name".into(),
                );
            }
        }
        for key in ["listen_addresses", "port"] {
            if pg.parameters.contains_key(key) && !pg.listen.is_empty() {
                err(
                    &format!("postgresql.parameters.{key}"),
                    "is managed from postgresql.listen; set it there".into(),
                );
            }
        }
        for (key, command) in pg.callbacks.entries() {
            let Some(command) = command else { continue };
            match shlex::split(command) {
                None => err(
                    &format!("postgresql.callbacks.{key}"),
                    "cannot be split into words: a quote is not closed or a `\\` ends it".into(),
                ),
                Some(words) if words.iter().all(|w| w.is_empty()) => err(
                    &format!("postgresql.callbacks.{key}"),
                    "must name the program to run".into(),
                ),
                Some(_) => {}
            }
        }
        for (i, line) in pg.pg_hba.iter().enumerate() {
            let first = line.split_whitespace().next();
            match first {
                None => err(&format!("postgresql.pg_hba[{i}]"), "is empty".into()),
                Some(t) if t.starts_with('#') => {}
                Some(t) if !HBA_TYPES.contains(&t) => err(
                    &format!("postgresql.pg_hba[{i}]"),
                    format!("{t:?} is not a pg_hba connection type (local, host, hostssl, …)"),
                ),
                Some(_) => {}
            }
        }
        let auth = &pg.authentication;
        for (role, creds) in [
            ("superuser", Some(&auth.superuser)),
            ("replication", Some(&auth.replication)),
            ("rewind", auth.rewind.as_ref()),
        ] {
            if let Some(mode) = creds.and_then(|c| c.sslmode.as_deref()) {
                if !SSL_MODES.contains(&mode) {
                    err(
                        &format!("postgresql.authentication.{role}.sslmode"),
                        format!("{mode:?} is not one of {}", SSL_MODES.join(", ")),
                    );
                }
            }
        }
        if pg.authentication.superuser.username.trim().is_empty() {
            err(
                "postgresql.authentication.superuser.username",
                "is required".into(),
            );
        }
        if pg.authentication.replication.username.trim().is_empty() {
            err(
                "postgresql.authentication.replication.username",
                "is required".into(),
            );
        }

        if let Some(p) = self.tags.failover_priority {
            if p < 0 {
                err(
                    "tags.failover_priority",
                    format!("{p} is negative: use 0 to never fail over here"),
                );
            }
        }

        if let Some(p) = self.tags.sync_priority {
            if p < 0 {
                err(
                    "tags.sync_priority",
                    format!("{p} is negative: use 0 to never be a synchronous standby"),
                );
            }
        }

        let level = self.log.level.trim();
        if !level.contains('=') && !LOG_LEVELS.contains(&level.to_ascii_uppercase().as_str()) {
            err(
                "log.level",
                format!("{level:?} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
            );
        }

        crate::logging::validate(&self.log, &mut errors);
        crate::backup::settings::validate(self, &mut errors);

        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// `/<namespace>/<scope>`, runs of `/` collapsed.
    pub fn dcs_base_path(&self) -> String {
        crate::dcs::keys::base_path(&self.namespace, &self.scope)
    }
}
