//! Custom replica creation methods, as Patroni 4.1 runs them (`Bootstrap.create_replica`):
//!
//! ```yaml
//! postgresql:
//!   create_replica_methods: [from_backup, basebackup]
//!   from_backup:
//!     command: /usr/local/bin/restore-replica --fast
//!     keep_data: false   # true: the data directory is not emptied before or after
//!     no_params: false   # true: none of the arguments below
//!     envdir: /etc/wal-e # any other key: --envdir=/etc/wal-e
//! ```
//!
//! # Guarantees
//! - The command gets, after its own words, every key of the section but `command` as
//!   `--key=value` in the order written, then `--scope`, `--role=replica`, `--datadir` and
//!   `--connstring` (the leader's address for the replication user, without password: the
//!   agent's password file is in `PGPASSFILE`), exactly as Patroni passes them; with
//!   `no_params`, only the section's own keys, without `no_params`, `no_leader`, `keep_data`.
//! - A method that fails (or exits 0 without leaving a data directory) is followed by the next
//!   one in `create_replica_methods`; what it left is removed unless `keep_data`.
//! - The command does not get the agent's variables that hold a password.
//! - `no_leader` (`no_master`): the method may run while no leader runs (Patroni's "bootstrap
//!   (without leader)"); it then gets an empty `--connstring=`. Other methods wait for a leader.

use std::path::Path;

use tracing::info;

use crate::config::Config;

use super::custom_bootstrap::{conninfo_escape, user_command};
use super::method_section::{MethodError, MethodSection};
use super::replica::Upstream;

/// The keys Patroni drops from the arguments when `no_params` is set.
const DROPPED_WITH_NO_PARAMS: [&str; 4] = ["no_params", "no_leader", "no_master", "keep_data"];

/// `postgresql.<name>` for a name in `create_replica_methods`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaMethod {
    pub name: String,
    pub command: Vec<String>,
    /// The section's keys but `command`, in the order written, as argument text.
    pub params: Vec<(String, String)>,
    pub no_params: bool,
    pub keep_data: bool,
    /// `no_leader` (or its old name `no_master`): works without a leader.
    pub no_leader: bool,
}

impl ReplicaMethod {
    /// Whether the method `name` is a custom one, run from its `postgresql.<name>` section.
    /// `basebackup` is always pg_basebackup. `pgbackrest` is what Patroni's documentation
    /// defines as a custom method (`postgresql.pgbackrest.command: pgbackrest --stanza=…
    /// --delta restore`, the usual way to restore replicas or clone a standby cluster from a
    /// repository, another cluster's too); without a `command` there, it is pgwarden's own
    /// restore from the `pgbackrest` section (this cluster's stanza).
    pub fn is_custom(config: &Config, name: &str) -> bool {
        match name {
            "basebackup" => false,
            "pgbackrest" => config
                .postgresql
                .sections
                .get(name)
                .is_some_and(|section| section.get("command").is_some()),
            _ => true,
        }
    }

    /// The custom method `name` of `create_replica_methods`, from its `postgresql.<name>`
    /// section.
    pub fn of(config: &Config, name: &str) -> Result<ReplicaMethod, MethodError> {
        let path = format!("postgresql.{name}");
        let needs = "a custom replica creation method (any but basebackup, and pgbackrest \
                     without the pgbackrest section) needs this section with a `command`";
        let Some(value) = config.postgresql.sections.get(name) else {
            return Err(MethodError::new(path, needs));
        };
        let section = MethodSection::new(path, value, needs)?;
        Ok(ReplicaMethod {
            name: name.to_owned(),
            command: section.command("is missing")?,
            params: section.params(&["command"])?,
            no_params: section.flag("no_params")?,
            keep_data: section.flag("keep_data")?,
            no_leader: section.flag("no_leader")? || section.flag("no_master")?,
        })
    }

    /// The command line for cloning `upstream` into `data_dir`.
    pub fn argv(&self, scope: &str, data_dir: &Path, connstring: &str) -> Vec<String> {
        let mut params = self.params.clone();
        if self.no_params {
            params.retain(|(k, _)| !DROPPED_WITH_NO_PARAMS.contains(&k.as_str()));
        } else {
            // Patroni's dict.update: a key the section already has keeps its place.
            for (k, v) in [
                ("scope", scope.to_owned()),
                ("role", "replica".to_owned()),
                ("datadir", data_dir.display().to_string()),
                ("connstring", connstring.to_owned()),
            ] {
                match params.iter_mut().find(|(key, _)| key == k) {
                    Some(existing) => existing.1 = v,
                    None => params.push((k.to_owned(), v)),
                }
            }
        }
        let mut argv = self.command.clone();
        argv.extend(params.into_iter().map(|(k, v)| format!("--{k}={v}")));
        argv
    }
}

/// The leader's address for the replication user, as Patroni's `format_dsn` writes it (no
/// password: the password file holds it).
pub fn connstring(config: &Config, upstream: &Upstream) -> String {
    let repl = &config.postgresql.authentication.replication;
    format!(
        "dbname=postgres user={} host={} port={}",
        conninfo_escape(&repl.username),
        conninfo_escape(&upstream.host),
        upstream.port
    )
}

/// Runs the method; on failure, removes what it left unless `keep_data`.
pub async fn create(
    method: &ReplicaMethod,
    config: &Config,
    upstream: Option<&Upstream>,
) -> Result<(), String> {
    let data_dir = &config.postgresql.data_dir;
    if !method.keep_data && !super::initdb::is_empty_dir(data_dir) {
        super::data_dir::clear_dir(data_dir);
    }
    // Postgres refuses a data directory others can read; the script may copy into this one.
    super::data_dir::make_private(data_dir)
        .map_err(|e| format!("cannot prepare {}: {e}", data_dir.display()))?;
    let connstring = upstream.map(|u| connstring(config, u)).unwrap_or_default();
    let argv = method.argv(&config.scope, data_dir, &connstring);
    let mut cmd = user_command(&argv);
    if let Some(pgpass) = super::replica::pgpass(config) {
        pgpass
            .write()
            .map_err(|e| format!("cannot write {}: {e}", pgpass.path.display()))?;
        cmd.env("PGPASSFILE", &pgpass.path);
    }
    let leader = upstream.map_or("(none)", |u| u.name.as_str());
    info!(method = %method.name, ?argv, %leader, "creating the replica with a custom method");
    let result = match cmd.status().await {
        Ok(status) if status.success() && data_dir.join("PG_VERSION").exists() => {
            super::data_dir::make_private(data_dir)
                .map_err(|e| format!("cannot chmod {}: {e}", data_dir.display()))?;
            // The agent writes the recovery settings (Patroni's `_sanitize_auto_conf`): a
            // `restore_command` that `pgbackrest restore` left in postgresql.auto.conf would
            // override them.
            super::data_dir::strip_recovery_settings(data_dir)
                .map(drop)
                .map_err(|e| format!("cannot clean postgresql.auto.conf: {e}"))
        }
        Ok(status) if status.success() => Err(format!(
            "{argv:?} exited 0 but left no data directory in {}",
            data_dir.display()
        )),
        Ok(status) => Err(format!("{argv:?} failed ({status})")),
        Err(e) => Err(format!("cannot run {argv:?}: {e}")),
    };
    if result.is_err() && !method.keep_data {
        super::data_dir::clear_dir(data_dir);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        serde_yaml::from_str(yaml).expect("valid YAML")
    }

    /// Patroni's documented pgBackRest replica method (`replica_bootstrap.rst`) is a custom
    /// method named `pgbackrest`; without a `command` the name means pgwarden's own restore.
    #[test]
    fn pgbackrest_with_a_command_is_patronis_custom_method() {
        let c = config(
            "scope: main\npostgresql:\n  data_dir: /d\n  create_replica_methods: [pgbackrest, basebackup]\n  \
             pgbackrest:\n    command: /usr/bin/pgbackrest --stanza=main --delta restore\n    \
             keep_data: True\n    no_params: True\n  basebackup:\n    checkpoint: fast\n",
        );
        assert!(ReplicaMethod::is_custom(&c, "pgbackrest"));
        assert!(!ReplicaMethod::is_custom(&c, "basebackup"));
        let m = ReplicaMethod::of(&c, "pgbackrest").expect("valid");
        assert!(m.keep_data && m.no_params);
        assert_eq!(
            m.argv("main", Path::new("/d"), "host=h"),
            vec!["/usr/bin/pgbackrest", "--stanza=main", "--delta", "restore"]
        );
        let mut errors = Vec::new();
        crate::backup::settings::validate(&c, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let builtin = config(
            "scope: main\npostgresql:\n  data_dir: /d\n  create_replica_methods: [pgbackrest]\n",
        );
        assert!(!ReplicaMethod::is_custom(&builtin, "pgbackrest"));
    }

    #[test]
    fn the_command_gets_the_sections_keys_then_patronis_parameters() {
        let c = config(
            "scope: main\npostgresql:\n  data_dir: /d\n  create_replica_methods: [wal_e]\n  \
             wal_e:\n    command: /bin/restore --fast\n    envdir: /etc/wal-e\n    \
             keep_data: true\n    role: ignored\n",
        );
        let m = ReplicaMethod::of(&c, "wal_e").expect("valid");
        assert!(m.keep_data);
        assert_eq!(
            m.argv(
                "main",
                Path::new("/d"),
                "dbname=postgres user=r host=h port=5"
            ),
            vec![
                "/bin/restore",
                "--fast",
                "--envdir=/etc/wal-e",
                "--keep_data=True",
                "--role=replica",
                "--scope=main",
                "--datadir=/d",
                "--connstring=dbname=postgres user=r host=h port=5",
            ]
        );
        let c = config(
            "postgresql:\n  wal_e:\n    command: x\n    no_params: true\n    no_leader: 1\n    \
             envdir: /e\n",
        );
        let m = ReplicaMethod::of(&c, "wal_e").expect("valid");
        assert_eq!(m.argv("s", Path::new("/d"), "c"), vec!["x", "--envdir=/e"]);
    }

    #[test]
    fn a_method_without_its_section_or_command_is_refused_by_path() {
        let e = ReplicaMethod::of(&config("postgresql: {}\n"), "wal_e").expect_err("refused");
        assert_eq!(e.path, "postgresql.wal_e");
        let e = ReplicaMethod::of(&config("postgresql:\n  wal_e:\n    envdir: /e\n"), "wal_e")
            .expect_err("refused");
        assert_eq!(e.path, "postgresql.wal_e.command");
    }
}
