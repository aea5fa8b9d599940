//! Custom bootstrap methods and the `post_bootstrap` script, as Patroni 4.1 runs them
//! (`patroni/postgresql/bootstrap.py`, docs "Replica imaging and bootstrap"):
//!
//! ```yaml
//! bootstrap:
//!   method: clone
//!   clone:
//!     command: /usr/local/bin/clone-cluster --from db1   # split as a POSIX shell would
//!     no_params: false                  # true: no --scope/--datadir
//!     keep_existing_recovery_conf: false
//!     recovery_conf:                    # recovery settings for the first start
//!       recovery_target_action: promote
//!       restore_command: cp /archive/%f %p
//!     source: nightly                   # any other key: --source=nightly
//!   post_bootstrap: /usr/local/bin/after-bootstrap   # gets a conninfo as its last argument
//! ```
//!
//! # Guarantees
//! - The command runs only on an empty (or missing) data directory and gets `--scope=<scope>
//!   --datadir=<data_dir>` (unless `no_params`), then `--<key>=<value>` for every other key of
//!   the section, in the order written, as Patroni passes them.
//! - A command that fails, or a postgres that stops before its recovery ends, leaves nothing a
//!   restart would take for a cluster: postgres is stopped and the data directory set aside
//!   (removed when the agent created it), as a failed pgBackRest bootstrap
//!   ([`super::data_dir::set_aside`]); the HA loop then withdraws `initialize` and exits.
//! - With `recovery_conf`, postgres starts in recovery (`recovery.signal`) with those settings
//!   and the bootstrap waits, as Patroni does, until recovery ends and postgres runs as a
//!   primary; the settings are then removed and postgres restarted once without them. Without
//!   it, recovery settings and signal files the command left are removed first, unless
//!   `keep_existing_recovery_conf`.
//! - The roles are created or updated (the copied cluster may have other passwords), then the
//!   `post_bootstrap` command runs with `dbname=postgres user=<superuser> host=… port=…` and
//!   a private password file in `PGPASSFILE`; a non-zero exit fails the bootstrap.
//! - Neither command gets the agent's variables that hold a password.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tracing::{info, warn};

use crate::config::{BootstrapConfig, Config};

use super::conf::{self, ManagedFiles};
use super::data_dir;
use super::method_section::{scalar, MethodError, MethodSection};
use super::probe::Probe;
use super::supervisor::{StopMode, Supervisor};

/// The keys of a method's section that are not passed to its command (Patroni's
/// `reserved_args`).
const RESERVED: [&str; 6] = [
    "command",
    "no_params",
    "keep_existing_recovery_conf",
    "recovery_conf",
    "scope",
    "datadir",
];

/// `bootstrap.<name>` for the method `bootstrap.method` names.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomBootstrap {
    pub name: String,
    /// The command's words, as a POSIX shell splits `command`.
    pub command: Vec<String>,
    pub no_params: bool,
    pub keep_existing_recovery_conf: bool,
    /// `(name, value)` in the order written.
    pub recovery_conf: Option<Vec<(String, String)>>,
    /// `--key=value` arguments from the section's other keys.
    pub args: Vec<String>,
}

impl CustomBootstrap {
    /// The custom method `bootstrap.method` selects; `Ok(None)` for `initdb`, `pgbackrest` or
    /// no method.
    pub fn of(bootstrap: &BootstrapConfig) -> Result<Option<CustomBootstrap>, MethodError> {
        match bootstrap.method.as_deref() {
            Some(name) if bootstrap.is_custom() => Self::parse(bootstrap, name).map(Some),
            _ => Ok(None),
        }
    }

    fn parse(bootstrap: &BootstrapConfig, name: &str) -> Result<CustomBootstrap, MethodError> {
        let Some(value) = bootstrap.custom_section(name) else {
            return Err(MethodError::new(
                "bootstrap.method",
                format!(
                    "{name:?} is neither initdb nor pgbackrest, and there is no \
                     `bootstrap.{name}` section with a `command` for a custom method"
                ),
            ));
        };
        let section = MethodSection::new(
            format!("bootstrap.{name}"),
            value,
            "a custom bootstrap method is a mapping with at least a `command`",
        )?;
        let command = section.command(
            "is missing: a custom bootstrap method runs this command (Patroni would silently \
             run initdb instead)",
        )?;
        let recovery_conf = match section.map.get("recovery_conf") {
            None | Some(serde_yaml::Value::Null) => None,
            Some(serde_yaml::Value::Mapping(m)) => {
                let mut settings = Vec::new();
                for (k, v) in m {
                    let Some(k) = k.as_str() else {
                        return Err(MethodError::new(
                            section.at("recovery_conf"),
                            "setting names must be strings",
                        ));
                    };
                    let value = scalar(v, false).ok_or_else(|| {
                        MethodError::new(
                            section.at(&format!("recovery_conf.{k}")),
                            "must be a string, a number or a boolean",
                        )
                    })?;
                    settings.push((k.to_owned(), value));
                }
                Some(settings)
            }
            Some(_) => {
                return Err(MethodError::new(
                    section.at("recovery_conf"),
                    "must be a mapping of recovery settings",
                ))
            }
        };
        Ok(CustomBootstrap {
            name: name.to_owned(),
            command,
            no_params: section.flag("no_params")?,
            keep_existing_recovery_conf: section.flag("keep_existing_recovery_conf")?,
            recovery_conf,
            args: section
                .params(&RESERVED)?
                .into_iter()
                .map(|(k, v)| format!("--{k}={v}"))
                .collect(),
        })
    }

    /// The command line: the command's words, `--scope`/`--datadir` unless `no_params`, then
    /// the section's other keys.
    pub fn argv(&self, scope: &str, data_dir: &Path) -> Vec<String> {
        let mut argv = self.command.clone();
        if !self.no_params {
            argv.push(format!("--scope={scope}"));
            argv.push(format!("--datadir={}", data_dir.display()));
        }
        argv.extend(self.args.iter().cloned());
        argv
    }
}

/// The bootstrap task for a custom method: the command, the first start (in recovery with
/// `recovery_conf`), the end of recovery, a restart without the recovery settings, the roles
/// and `post_bootstrap`. A failure at any step stops postgres and sets the data directory
/// aside, so that the next start bootstraps afresh.
pub async fn bootstrap(
    config: &Config,
    method: &CustomBootstrap,
    supervisor: &Supervisor,
    probe: &Probe,
    files: &ManagedFiles,
) -> Result<(), CustomBootstrapError> {
    let data_dir = &config.postgresql.data_dir;
    let created = data_dir::prepare_empty(data_dir).map_err(CustomBootstrapError::Prepare)?;
    match run_and_start(config, method, supervisor, probe, files).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let what = data_dir::abandon_bootstrap(supervisor, probe, data_dir, created).await;
            Err(CustomBootstrapError::SetAside {
                what: format!("{what}, so the next start bootstraps afresh"),
                source: Box::new(e),
            })
        }
    }
}

async fn run_and_start(
    config: &Config,
    method: &CustomBootstrap,
    supervisor: &Supervisor,
    probe: &Probe,
    files: &ManagedFiles,
) -> Result<(), CustomBootstrapError> {
    let data_dir = &config.postgresql.data_dir;
    run_command(method, config).await?;
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| CustomBootstrapError::Prepare(format!("{what}: {e}"))
    };
    // Marked until the end: an agent killed meanwhile leaves a directory the next start sets
    // aside instead of taking it for a cluster.
    std::fs::write(data_dir.join(data_dir::UNFINISHED_MARKER), "")
        .map_err(io("cannot mark the new data directory"))?;
    prepare_recovery(method, data_dir).map_err(io("cannot write the recovery settings"))?;
    conf::write(data_dir, files).map_err(io("cannot write the configuration files"))?;
    supervisor
        .start()
        .await
        .map_err(|e| CustomBootstrapError::Prepare(crate::error::error_chain(&e)))?;
    let in_recovery =
        data_dir.join("recovery.signal").exists() || data_dir.join("standby.signal").exists();
    if in_recovery {
        info!(method = %method.name, "postgres started in recovery; waiting for it to promote");
        wait_for_end_of_recovery(supervisor, probe).await?;
        // Without its recovery settings from here on: they would follow the cluster into
        // every replica copied from it.
        supervisor
            .stop(StopMode::Fast, Duration::from_secs(120))
            .await
            .map_err(|e| CustomBootstrapError::Prepare(crate::error::error_chain(&e)))?;
        probe.reset().await;
        data_dir::strip_recovery_settings(data_dir)
            .map_err(io("cannot clean postgresql.auto.conf"))?;
        let _ = std::fs::remove_file(data_dir.join("recovery.signal"));
        supervisor
            .start()
            .await
            .map_err(|e| CustomBootstrapError::Prepare(crate::error::error_chain(&e)))?;
    }
    if !supervisor.wait_ready(Duration::from_secs(120)).await {
        return Err(CustomBootstrapError::Recovery(
            "postgres did not accept connections after the custom bootstrap".into(),
        ));
    }
    if let Ok(s) = probe.status().await {
        if s.in_recovery {
            return Err(CustomBootstrapError::Recovery(
                "postgres runs as a standby after the custom bootstrap (standby.signal kept by                  keep_existing_recovery_conf?); a new cluster must end its recovery"
                    .into(),
            ));
        }
    }
    super::initdb::post_bootstrap(config, probe)
        .await
        .map_err(|e| CustomBootstrapError::Prepare(crate::error::error_chain(&e)))?;
    std::fs::remove_file(data_dir.join(data_dir::UNFINISHED_MARKER))
        .map_err(io("cannot remove the unfinished-bootstrap mark"))?;
    Ok(())
}

/// Why a custom bootstrap failed.
#[derive(Debug, thiserror::Error)]
pub enum CustomBootstrapError {
    #[error("{0}")]
    Prepare(String),
    #[error("the custom bootstrap failed ({what})")]
    SetAside {
        what: String,
        #[source]
        source: Box<CustomBootstrapError>,
    },
    #[error("cannot run the bootstrap command {argv:?}")]
    Spawn {
        argv: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("the bootstrap command {argv:?} failed ({status})")]
    Failed {
        argv: Vec<String>,
        status: std::process::ExitStatus,
    },
    #[error("the bootstrap command exited 0 but left no cluster in {0} (no PG_VERSION)")]
    NoCluster(String),
    #[error("{0}")]
    Recovery(String),
    #[error("cannot run the post_bootstrap command {argv:?}")]
    PostSpawn {
        argv: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("the post_bootstrap command {argv:?} failed ({status})")]
    PostFailed {
        argv: Vec<String>,
        status: std::process::ExitStatus,
    },
}

/// A command for the user's script: its own process group, no password in its environment,
/// output into the agent's log.
pub(crate) fn user_command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name
            .to_string_lossy()
            .to_ascii_uppercase()
            .contains("PASSWORD")
        {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// Runs the custom method's command on the empty data directory.
pub async fn run_command(
    method: &CustomBootstrap,
    config: &Config,
) -> Result<(), CustomBootstrapError> {
    let data_dir = &config.postgresql.data_dir;
    let argv = method.argv(&config.scope, data_dir);
    info!(method = %method.name, ?argv, "running the custom bootstrap command");
    let status =
        user_command(&argv)
            .status()
            .await
            .map_err(|source| CustomBootstrapError::Spawn {
                argv: argv.clone(),
                source,
            })?;
    if !status.success() {
        return Err(CustomBootstrapError::Failed { argv, status });
    }
    if !data_dir.join("PG_VERSION").exists() {
        return Err(CustomBootstrapError::NoCluster(
            data_dir.display().to_string(),
        ));
    }
    Ok(())
}

/// After the command: the recovery settings for the first start (Patroni's `_post_restore`
/// and `write_recovery_conf`/`remove_recovery_conf`).
pub fn prepare_recovery(method: &CustomBootstrap, data_dir: &Path) -> std::io::Result<()> {
    // A trigger file left by the copy would promote postgres at once.
    let _ = std::fs::remove_file(data_dir.join("promote"));
    match &method.recovery_conf {
        Some(settings) => {
            data_dir::strip_recovery_settings(data_dir)?;
            let path = data_dir.join("postgresql.auto.conf");
            let mut text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(data_dir::RECOVERY_BLOCK_HEADER);
            text.push('\n');
            for (name, value) in settings {
                text.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
            }
            std::fs::write(&path, text)?;
            let _ = std::fs::remove_file(data_dir.join("standby.signal"));
            std::fs::write(data_dir.join("recovery.signal"), "")
        }
        None if method.keep_existing_recovery_conf => Ok(()),
        None => {
            data_dir::strip_recovery_settings(data_dir)?;
            for signal in ["recovery.signal", "standby.signal"] {
                match std::fs::remove_file(data_dir.join(signal)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        }
    }
}

/// Waits until postgres, started in recovery, has promoted itself (Patroni: "waiting for end
/// of recovery after bootstrap"). No deadline, as in Patroni: a long recovery is normal; a
/// postgres that stops (a target that cannot be reached ends it) fails the bootstrap.
pub async fn wait_for_end_of_recovery(
    supervisor: &Supervisor,
    probe: &Probe,
) -> Result<(), CustomBootstrapError> {
    let mut next_note = Instant::now() + Duration::from_secs(30);
    loop {
        if !supervisor.state().is_running() {
            return Err(CustomBootstrapError::Recovery(
                "postgres stopped before its recovery ended (is the recovery target reachable? \
                 see the postgres log lines above)"
                    .into(),
            ));
        }
        if supervisor.state().accepts_connections() {
            if let Ok(s) = probe.status().await {
                if !s.in_recovery {
                    return Ok(());
                }
            }
        }
        if Instant::now() > next_note {
            info!("waiting for the end of recovery after the custom bootstrap");
            next_note = Instant::now() + Duration::from_secs(60);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Patroni's conninfo escaping: a backslash before `'`, `\` and space.
pub(crate) fn conninfo_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '\'' | '\\' | ' ') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Runs `bootstrap.post_bootstrap` with the local superuser's conninfo as its last argument;
/// the password goes through a private password file (`PGPASSFILE`), never the command line.
pub async fn run_post_bootstrap(
    command: &str,
    config: &Config,
    host: &str,
    port: u16,
) -> Result<(), CustomBootstrapError> {
    let Some(mut argv) = shlex::split(command).filter(|w| !w.is_empty()) else {
        return Err(CustomBootstrapError::Prepare(format!(
            "`bootstrap.post_bootstrap` cannot be split into words: {command:?}"
        )));
    };
    let superuser = &config.postgresql.authentication.superuser;
    argv.push(format!(
        "dbname=postgres user={} host={} port={port}",
        conninfo_escape(&superuser.username),
        conninfo_escape(host)
    ));
    let mut cmd = user_command(&argv);
    cmd.env(
        "PGOPTIONS",
        "-c synchronous_commit=local -c statement_timeout=0",
    );
    // NamedTempFile is created 0600: libpq ignores a password file others can read.
    let passfile = match &superuser.password {
        Some(password) => {
            use std::io::Write;
            let mut f = tempfile::NamedTempFile::new().map_err(|e| {
                CustomBootstrapError::Prepare(format!("cannot write a password file: {e}"))
            })?;
            let escape = |v: &str| v.replace('\\', "\\\\").replace(':', "\\:");
            writeln!(
                f,
                "*:*:*:{}:{}",
                escape(&superuser.username),
                escape(password)
            )
            .map_err(|e| {
                CustomBootstrapError::Prepare(format!("cannot write a password file: {e}"))
            })?;
            cmd.env("PGPASSFILE", f.path());
            Some(f)
        }
        None => None,
    };
    info!(?argv, "running the post_bootstrap command");
    let status = cmd
        .status()
        .await
        .map_err(|source| CustomBootstrapError::PostSpawn {
            argv: argv.clone(),
            source,
        })?;
    drop(passfile);
    if status.success() {
        Ok(())
    } else {
        warn!(?argv, %status, "the post_bootstrap command failed");
        Err(CustomBootstrapError::PostFailed { argv, status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap(yaml: &str) -> BootstrapConfig {
        serde_yaml::from_str(yaml).expect("valid YAML")
    }

    #[test]
    fn the_command_gets_scope_datadir_and_the_other_keys_in_order() {
        let b = bootstrap(
            "method: clone\nclone:\n  command: /bin/clone --from 'db 1'\n  source: nightly\n  \
             recovery_conf:\n    recovery_target_action: promote\n  verbose: true\n  \
             scope: ignored\n",
        );
        let m = CustomBootstrap::of(&b).expect("valid").expect("custom");
        assert_eq!(
            m.argv("main", Path::new("/d")),
            vec![
                "/bin/clone",
                "--from",
                "db 1",
                "--scope=main",
                "--datadir=/d",
                "--source=nightly",
                "--verbose=True"
            ]
        );
        assert_eq!(
            m.recovery_conf,
            Some(vec![("recovery_target_action".into(), "promote".into())])
        );
        let quiet = bootstrap("method: c\nc:\n  command: x\n  no_params: true\n");
        let m = CustomBootstrap::of(&quiet).expect("valid").expect("custom");
        assert_eq!(m.argv("main", Path::new("/d")), vec!["x"]);
    }

    #[test]
    fn a_method_without_its_section_or_command_is_refused_by_path() {
        let e = CustomBootstrap::of(&bootstrap("method: clone\n")).expect_err("refused");
        assert_eq!(e.path, "bootstrap.method");
        let e = CustomBootstrap::of(&bootstrap("method: clone\nclone:\n  source: x\n"))
            .expect_err("refused");
        assert_eq!(e.path, "bootstrap.clone.command");
        let e = CustomBootstrap::of(&bootstrap(
            "method: c\nc:\n  command: x\n  recovery_conf:\n    a: [1]\n",
        ))
        .expect_err("refused");
        assert_eq!(e.path, "bootstrap.c.recovery_conf.a");
        assert!(CustomBootstrap::of(&bootstrap("method: initdb\n"))
            .expect("valid")
            .is_none());
    }

    #[test]
    fn recovery_settings_are_written_for_the_first_start_and_removed_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("postgresql.auto.conf"), "work_mem = '8MB'\n").expect("write");
        std::fs::write(d.join("standby.signal"), "").expect("write");
        let b = bootstrap(
            "method: c\nc:\n  command: x\n  recovery_conf:\n    recovery_target: immediate\n    \
             restore_command: cp /a/%f '%p'\n",
        );
        let m = CustomBootstrap::of(&b).expect("valid").expect("custom");
        prepare_recovery(&m, d).expect("prepare");
        let text = std::fs::read_to_string(d.join("postgresql.auto.conf")).expect("read");
        assert!(text.starts_with("work_mem = '8MB'\n"));
        assert!(text.contains("recovery_target = 'immediate'"));
        assert!(text.contains("restore_command = 'cp /a/%f ''%p'''"));
        assert!(d.join("recovery.signal").exists());
        assert!(!d.join("standby.signal").exists());
        assert!(data_dir::strip_recovery_settings(d).expect("remove"));
        assert_eq!(
            std::fs::read_to_string(d.join("postgresql.auto.conf")).expect("read"),
            "work_mem = '8MB'\n"
        );

        // Without recovery_conf, what the command left is removed, unless kept.
        std::fs::write(d.join("standby.signal"), "").expect("write");
        let plain = bootstrap("method: c\nc:\n  command: x\n  keep_existing_recovery_conf: true\n");
        let m = CustomBootstrap::of(&plain).expect("valid").expect("custom");
        prepare_recovery(&m, d).expect("prepare");
        assert!(d.join("standby.signal").exists());
        let plain = bootstrap("method: c\nc:\n  command: x\n");
        let m = CustomBootstrap::of(&plain).expect("valid").expect("custom");
        prepare_recovery(&m, d).expect("prepare");
        assert!(!d.join("standby.signal").exists() && !d.join("recovery.signal").exists());
    }

    #[test]
    fn the_conninfo_is_escaped_as_patroni_does() {
        assert_eq!(conninfo_escape("a b'c\\"), "a\\ b\\'c\\\\");
    }
}
